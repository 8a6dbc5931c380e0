//! Load shedding (SPEC §4 "Shedding"): forced levels shed exactly the listed
//! priorities and never critical routes; organic overload raises the level and recovery
//! lowers it without flapping; limit_scale reaches the rate limits.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn policy(app: &Upstream, shedding: &str) -> String {
    format!(
        "upstreams:
  app:
    servers: [\"{}\"]
routes:
  - name: health
    match: {{ path: /health }}
    upstream: app
    priority: critical
  - name: search
    match: {{ path_prefix: /api/search }}
    upstream: app
    priority: high
  - name: predict
    match: {{ path_prefix: /api/predict }}
    upstream: app
  - name: suggest
    match: {{ path_prefix: /api/suggest }}
    upstream: app
    priority: low
    fallback: {{ status: 200, body: '{{\"suggestions\": [], \"degraded\": true}}' }}
  - name: learning
    match: {{ path_prefix: /api/learning }}
    upstream: app
    priority: low
shedding:
{shedding}",
        app.addr
    )
}

const PATHS: [&str; 5] = [
    "/health",
    "/api/search",
    "/api/predict",
    "/api/suggest",
    "/api/learning/metrics",
];

fn statuses(gw: &Tollgate) -> Vec<u16> {
    PATHS.iter().map(|p| gw.get(p).status().as_u16()).collect()
}

fn level(gw: &Tollgate) -> u64 {
    gw.admin_json("/status")["load"]["level"].as_u64().unwrap()
}

fn force(gw: &Tollgate, body: Value) -> reqwest::blocking::Response {
    gw.admin_put_json("/shedding", &body)
}

#[test]
fn forced_levels_shed_exactly_the_listed_priorities() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "  max_inflight: 1000\n  levels:\n    - { above: 80%, shed: [low], limit_scale: 0.5 }\n    - { above: 95%, shed: [low, normal, high, critical], limit_scale: 0.25 }\n  retry_after: 7s\n",
    ));
    assert_eq!(statuses(&gw), [200; 5]);

    assert_eq!(force(&gw, json!({ "level": 1, "for": "1m" })).status(), 200);
    assert!(wait_for(Duration::from_secs(3), || level(&gw) == 1));
    let status = gw.admin_json("/status");
    assert_eq!(status["load"]["forced"], true);
    assert_eq!(statuses(&gw), [200, 200, 200, 200, 503]);
    let degraded = gw.get("/api/suggest");
    assert_eq!(degraded.headers()["x-tollgate-fallback"], "overloaded");
    assert_eq!(
        degraded.text().unwrap(),
        "{\"suggestions\": [], \"degraded\": true}"
    );
    let shed = gw.get("/api/learning/metrics");
    assert_eq!(shed.headers()["retry-after"], "7");
    let doc: Value = shed.json().unwrap();
    assert_eq!(doc["error"], "overloaded");

    // Level 2 lists critical too: it is kept anyway.
    assert_eq!(force(&gw, json!({ "level": 2, "for": "1m" })).status(), 200);
    assert!(wait_for(Duration::from_secs(3), || level(&gw) == 2));
    assert_eq!(statuses(&gw), [200, 503, 503, 200, 503]);
    let explained: Value = gw
        .admin_post_json("/explain", &json!({ "path": "/api/predict" }))
        .json()
        .unwrap();
    assert_eq!(explained["decision"]["error"], "overloaded");
    assert_eq!(explained["shedding"]["would_shed"], true);

    assert_eq!(force(&gw, json!({ "level": null })).status(), 200);
    assert!(
        wait_for(Duration::from_secs(3), || level(&gw) == 0),
        "{}",
        gw.admin_json("/status")
    );
    assert_eq!(statuses(&gw), [200; 5]);
    assert_eq!(gw.admin_json("/status")["load"]["forced"], false);

    assert_eq!(
        gw.metric("tollgate_shed_requests_total{priority=\"low\",route=\"learning\"}"),
        Some(3.0)
    );
    assert_eq!(
        gw.metric("tollgate_shed_requests_total{priority=\"high\",route=\"search\"}"),
        Some(1.0)
    );
    let levels: Vec<u64> = gw.admin_json("/events")["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "shedding")
        .map(|e| e["to"].as_u64().unwrap())
        .collect();
    assert_eq!(levels, [0, 2, 1], "newest first");
    assert_eq!(force(&gw, json!({ "level": 3, "for": "1m" })).status(), 400);
    assert_eq!(
        force(&gw, json!({ "level": 1, "for": "soon" })).status(),
        400
    );
}

#[test]
fn a_forced_level_expires_by_itself_and_scales_the_rate_limits() {
    let app = upstream("app");
    let body = policy(
        &app,
        "  levels:\n    - { above: 80%, shed: [low], limit_scale: 0.5 }\n",
    ) + "rate_limits:\n  - name: global\n    key: global\n    rate: 10/min\n";
    let gw = Tollgate::start(&body);
    let quota = |gw: &Tollgate| {
        gw.get("/health").headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(quota(&gw), "\"global\";q=10;w=60");
    assert_eq!(force(&gw, json!({ "level": 1, "for": "1s" })).status(), 200);
    assert!(wait_for(Duration::from_secs(3), || level(&gw) == 1));
    assert_eq!(quota(&gw), "\"global\";q=5;w=60");
    assert_eq!(gw.admin_json("/status")["limit_scale"], 0.5);
    assert!(wait_for(Duration::from_secs(5), || level(&gw) == 0));
    assert_eq!(quota(&gw), "\"global\";q=10;w=60");
}

/// `n` client threads sending `path` in a loop while `active[i]` holds, counting
/// statuses.
struct Clients {
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Vec<u16>>>,
}

impl Clients {
    fn start(gw: &Tollgate, path: &str, n: usize, active: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(active));
        let threads = (0..n)
            .map(|i| {
                let (stop, active, url) = (stop.clone(), active.clone(), gw.url(path));
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::new();
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        if i >= active.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        seen.push(client.get(&url).send().map_or(0, |r| r.status().as_u16()));
                    }
                    seen
                })
            })
            .collect();
        Clients {
            stop,
            active,
            threads,
        }
    }

    fn finish(self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

#[test]
fn organic_overload_sheds_low_priority_and_critical_keeps_succeeding() {
    let app = upstream("app");
    app.knobs.latency_ms.store(100, Ordering::Relaxed);
    let gw = Tollgate::start(&policy(
        &app,
        "  max_inflight: 8\n  smoothing: 500ms\n  hold: 1s\n  levels:\n    - { above: 80%, shed: [low], limit_scale: 0.5 }\n",
    ));
    // Twelve clients on the low route and two on the critical one: 14 in flight of 8.
    let low = Clients::start(&gw, "/api/learning/metrics", 12, 12);
    let critical = Clients::start(&gw, "/health", 2, 2);
    assert!(wait_for(Duration::from_secs(5), || level(&gw) == 1));
    let raised = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let low = low.finish();
    let critical = critical.finish();
    assert!(low.contains(&503), "low-priority traffic was never shed");
    assert!(
        critical.iter().all(|&s| s == 200),
        "critical requests failed: {:?}",
        critical.iter().filter(|&&s| s != 200).count()
    );
    // Recovery: the load is gone, the level returns to 0 after the hold.
    assert!(wait_for(Duration::from_secs(5), || level(&gw) == 0));
    assert!(
        raised.elapsed() >= Duration::from_secs(1),
        "left before the hold"
    );
    assert_eq!(gw.get("/api/learning/metrics").status(), 200);
}

#[test]
fn load_hovering_at_the_threshold_does_not_flap() {
    let app = upstream("app");
    app.knobs.latency_ms.store(100, Ordering::Relaxed);
    let gw = Tollgate::start(&policy(
        &app,
        "  max_inflight: 10\n  smoothing: 250ms\n  hold: 2s\n  recover_below_margin: 20%\n  levels:\n    - { above: 50%, shed: [low] }\n",
    ));
    // Critical traffic only (never shed, so the load stays put): 3 and 7 clients in
    // turn, unsmoothed, so the load jumps across the 50 % threshold every 300 ms for
    // four seconds. Without hysteresis that is a dozen level changes; with it, one.
    let clients = Clients::start(&gw, "/health", 7, 3);
    let changes = |gw: &Tollgate| {
        gw.admin_json("/events")["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "shedding")
            .count()
    };
    let started = Instant::now();
    let mut high = false;
    while started.elapsed() < Duration::from_secs(4) {
        high = !high;
        clients
            .active
            .store(if high { 7 } else { 3 }, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
    }
    let during = changes(&gw);
    let outcomes = clients.finish();
    assert!(outcomes.iter().all(|&s| s == 200));
    assert_eq!(during, 1, "level changes while hovering");
}

#[test]
fn shed_traffic_cannot_hold_a_level_up_after_the_load_is_gone() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "  max_inflight: 4\n  smoothing: 1s\n  hold: 1s\n  levels:\n    - { above: 80%, shed: [low] }\n",
    ));
    // Twelve slow requests to a critical route raise the level ...
    let slow: Vec<_> = (0..12)
        .map(|_| {
            let url = gw.url("/health?latency_ms=3000");
            std::thread::spawn(move || {
                reqwest::blocking::Client::new()
                    .get(url)
                    .send()
                    .map_or(0, |r| r.status().as_u16())
            })
        })
        .collect();
    // ... while a client keeps calling a low route, twice a second, throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let low = {
        let (stop, url) = (stop.clone(), gw.url("/api/learning/metrics"));
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let _ = client.get(&url).send();
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    assert!(wait_for(Duration::from_secs(3), || level(&gw) == 1));
    for request in slow {
        assert_eq!(request.join().unwrap(), 200);
    }
    let load_gone = Instant::now();
    // smoothing + hold, plus the smoothed in-flight signal's decay from 300 %.
    let recovered = wait_for(Duration::from_secs(5), || level(&gw) == 0);
    let took = load_gone.elapsed();
    stop.store(true, Ordering::Relaxed);
    low.join().unwrap();
    assert!(
        recovered,
        "still shedding {took:?} after the load ended: {}",
        gw.admin_json("/status")["load"]
    );
    assert_eq!(gw.get("/api/learning/metrics").status(), 200);
}

#[test]
fn a_forced_level_is_in_force_for_the_very_next_request() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "  levels:\n    - { above: 80%, shed: [low] }\n",
    ));
    assert_eq!(gw.get("/api/learning/metrics").status(), 200);
    let answer: Value = force(&gw, json!({ "level": 1, "for": "1m" }))
        .json()
        .unwrap();
    assert_eq!(answer["takes_effect_within_ms"], 0);
    assert_eq!(gw.get("/api/learning/metrics").status(), 503);
    assert_eq!(level(&gw), 1);
}
