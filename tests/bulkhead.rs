//! Bulkheads (SPEC §3 `max_concurrent`, `queue`): the excess over the limit and its
//! queue gets 503 `bulkhead_full`; a queued request waits at most the queue timeout.

mod common;

use common::*;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn start(app: &Upstream, limits: &str) -> Tollgate {
    Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\n{limits}routes:\n  - name: all\n    upstream: app\n",
        app.addr
    ))
}

/// Sends `n` requests at once; their statuses in completion order.
fn concurrently(gw: &Tollgate, n: usize) -> Vec<(u16, Duration)> {
    let started = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let url = gw.url("/health");
            std::thread::spawn(move || {
                let status = reqwest::blocking::get(url).unwrap().status().as_u16();
                (status, started.elapsed())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn the_excess_over_limit_and_queue_is_refused_at_once() {
    let app = upstream("app");
    app.knobs.latency_ms.store(700, Ordering::Relaxed);
    let gw = start(
        &app,
        "    max_concurrent: 2\n    queue: { max: 1, timeout: 5s }\n",
    );
    let results = concurrently(&gw, 4);
    let mut statuses: Vec<u16> = results.iter().map(|(s, _)| *s).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 503], "{results:?}");
    let refused = results.iter().find(|(s, _)| *s == 503).unwrap();
    assert!(
        refused.1 < Duration::from_millis(600),
        "refused late: {refused:?}"
    );
    // The queued one ran after a slot freed: about two upstream latencies.
    let slowest = results.iter().map(|(_, t)| *t).max().unwrap();
    assert!(slowest >= Duration::from_millis(1_400), "{results:?}");
    assert_eq!(app.requests(), 3);
    assert_eq!(
        gw.metric("tollgate_bulkhead_rejections_total{upstream=\"app\"}"),
        Some(1.0)
    );
    assert!(wait_for(Duration::from_secs(5), || gw
        .access_log()
        .iter()
        .any(|l| l["reason"] == "bulkhead_full")));
}

#[test]
fn a_queued_request_gives_up_after_the_queue_timeout() {
    let app = upstream("app");
    app.knobs.latency_ms.store(1_500, Ordering::Relaxed);
    let gw = start(
        &app,
        "    max_concurrent: 1\n    queue: { max: 5, timeout: 200ms }\n",
    );
    let results = concurrently(&gw, 2);
    let refused = results
        .iter()
        .find(|(s, _)| *s == 503)
        .expect("one refused");
    assert!(
        refused.1 >= Duration::from_millis(200) && refused.1 < Duration::from_millis(1_200),
        "{results:?}"
    );
    assert_eq!(app.requests(), 1);
    // And with no queue at all, the second is refused without waiting.
    app.knobs.latency_ms.store(800, Ordering::Relaxed);
    gw.write_policy(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\n    max_concurrent: 1\nroutes:\n  - name: all\n    upstream: app\n",
        app.addr
    ));
    let generation = gw.generation();
    assert_eq!(gw.admin_post("/reload", None).status(), 200);
    assert!(gw.generation() > generation);
    let results = concurrently(&gw, 2);
    let refused = results
        .iter()
        .find(|(s, _)| *s == 503)
        .expect("one refused");
    assert!(refused.1 < Duration::from_millis(500), "{results:?}");
    let doc: Value = {
        let slow = {
            let url = gw.url("/health");
            std::thread::spawn(move || reqwest::blocking::get(url).unwrap().status())
        };
        assert!(wait_for(Duration::from_secs(2), || app.requests() == 3));
        let doc = gw.get("/health").json().unwrap();
        assert_eq!(slow.join().unwrap(), 200);
        doc
    };
    assert_eq!(doc["error"], "bulkhead_full");
    assert_eq!(doc["status"], 503);
}
