//! Chaos under sustained traffic (issue: upstream resilience): of three servers, one is
//! killed and restarted and one turns slow, while four clients keep sending requests.
//! Health checks, outlier ejection and retries must hide all of it from the clients.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn a_killed_and_a_slow_server_cost_the_clients_nothing() {
    let (a, b, c) = (upstream("a"), upstream("b"), upstream("c"));
    let gw = Tollgate::start(&format!(
        "upstreams:
  app:
    servers: [\"{}\", \"{}\", \"{}\"]
    timeouts: {{ connect: 200ms, read: 300ms }}
    health_check: {{ path: /health, interval: 200ms, timeout: 250ms, healthy_after: 2, unhealthy_after: 2 }}
    outlier: {{ consecutive_failures: 2, eject_for: 2s, max_ejected: 67% }}
    retry: {{ attempts: 2, on: [connect_error, timeout, 502, 503, 504], budget: 50%, backoff: {{ base: 5ms, max: 20ms }} }}
routes:
  - name: all
    upstream: app
",
        a.addr, b.addr, c.addr
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<(u16, Duration)>::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, outcomes, url) = (stop.clone(), outcomes.clone(), gw.url("/api/search"));
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let status = client.get(&url).send().map_or(0, |r| r.status().as_u16());
                    outcomes.lock().unwrap().push((status, started.elapsed()));
                }
            })
        })
        .collect();

    let at = |ms: u64| std::thread::sleep(Duration::from_millis(ms));
    at(1_000);
    b.stop(); // killed: its connections close, its port refuses
    at(1_000);
    c.knobs.latency_ms.store(1_000, Ordering::Relaxed); // slow: over the read timeout
    at(1_000);
    let b_again = upstream_at(b.addr, "b"); // restarted on the same port
    at(1_500);
    c.knobs.latency_ms.store(0, Ordering::Relaxed);
    // Back in rotation once two probes pass.
    let back = wait_for(Duration::from_secs(5), || {
        let status = gw.admin_json("/status");
        let servers = status["upstreams"]["app"]["servers"]
            .as_array()
            .unwrap()
            .clone();
        servers
            .iter()
            .all(|s| s["healthy"] == true && s["ejected"] == false)
    });
    at(500);
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }

    let outcomes = outcomes.lock().unwrap();
    let errors: Vec<&(u16, Duration)> = outcomes.iter().filter(|(s, _)| *s != 200).collect();
    let mut latencies: Vec<Duration> = outcomes.iter().map(|(_, d)| *d).collect();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let retries = gw
        .metric("tollgate_retries_total{upstream=\"app\"}")
        .unwrap_or(0.0);
    println!(
        "chaos: {} requests, {} errors, {} retries, p99 {:?}, max {:?}; served a {} b {}+{} c {}",
        outcomes.len(),
        errors.len(),
        retries,
        p99,
        latencies.last().unwrap(),
        a.requests(),
        b.requests(),
        b_again.requests(),
        c.requests()
    );
    assert!(back, "every server is back in rotation at the end");
    assert!(
        outcomes.len() > 200,
        "sustained traffic: {}",
        outcomes.len()
    );
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    assert!(
        b_again.requests() > 0,
        "the restarted server took traffic again"
    );
    assert!(
        retries > 0.0,
        "the faults were hidden by retries, not by luck"
    );
}
