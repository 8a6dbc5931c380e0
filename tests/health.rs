//! Active health checks (SPEC §3 `health_check`, §5 `/readyz`): failing probes take a
//! server out of rotation and flip readiness when a pool has none left; passing probes
//! bring it back.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn served_by(gw: &Tollgate, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let response = gw.get("/api/search");
            assert_eq!(response.status(), 200);
            response.headers()["x-served-by"]
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn healthy(gw: &Tollgate, index: usize) -> bool {
    gw.admin_json("/status")["upstreams"]["app"]["servers"][index]["healthy"]
        .as_bool()
        .unwrap()
}

fn readyz(gw: &Tollgate) -> u16 {
    gw.admin_get("/readyz").unwrap().status().as_u16()
}

#[test]
fn probes_take_servers_out_and_bring_them_back() {
    let (a, b) = (upstream("a"), upstream("b"));
    let gw = Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\", \"{}\"]\n    health_check: {{ path: /health, interval: 100ms, timeout: 500ms, healthy_after: 2, unhealthy_after: 2, expect: \"200-299\" }}\nroutes:\n  - name: all\n    upstream: app\n",
        a.addr, b.addr
    ));
    assert!(wait_for(Duration::from_secs(5), || a.requests() >= 2
        && b.requests() >= 2));
    assert_eq!(readyz(&gw), 200);

    // a answers its probes with 503: out after two of them.
    a.knobs.force_status.store(503, Ordering::Relaxed);
    assert!(wait_for(Duration::from_secs(5), || !healthy(&gw, 0)));
    assert!(healthy(&gw, 1));
    let sample = format!(
        "tollgate_upstream_server_healthy{{server=\"{}\",upstream=\"app\"}}",
        a.addr
    );
    assert_eq!(gw.metric(&sample), Some(0.0));
    // Out of rotation: b serves everything.
    assert!(served_by(&gw, 6).iter().all(|s| s == "b"));
    a.knobs.force_status.store(0, Ordering::Relaxed);
    assert!(wait_for(Duration::from_secs(5), || healthy(&gw, 0)));
    assert_eq!(gw.metric(&sample), Some(1.0));
    assert!(wait_for(Duration::from_secs(5), || served_by(&gw, 4)
        .iter()
        .any(|s| s == "a")));
    let kinds: Vec<bool> = gw.admin_json("/events")["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "health")
        .map(|e| e["healthy"].as_bool().unwrap())
        .collect();
    assert_eq!(kinds, [true, false], "newest first");
}

#[test]
fn no_healthy_server_flips_readyz_and_traffic_still_tries_them() {
    let (a, b) = (upstream("a"), upstream("b"));
    let gw = Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\", \"{}\"]\n    health_check: {{ path: /health, interval: 100ms, timeout: 300ms, unhealthy_after: 1, healthy_after: 1 }}\nroutes:\n  - name: all\n    upstream: app\n",
        a.addr, b.addr
    ));
    assert!(wait_for(Duration::from_secs(5), || readyz(&gw) == 200));
    // Probes time out (the servers answer too slowly); proxied requests still get
    // through, slowly: panic mode rather than refusing everything.
    a.knobs.latency_ms.store(400, Ordering::Relaxed);
    b.knobs.latency_ms.store(400, Ordering::Relaxed);
    assert!(wait_for(Duration::from_secs(5), || readyz(&gw) == 503));
    let reason = gw.admin_get("/readyz").unwrap().text().unwrap();
    assert!(
        reason.contains("no healthy server in upstream app"),
        "{reason}"
    );
    assert_eq!(gw.get("/health").status(), 200);
    a.knobs.latency_ms.store(0, Ordering::Relaxed);
    assert!(wait_for(Duration::from_secs(5), || readyz(&gw) == 200));
    assert!(healthy(&gw, 0));
}
