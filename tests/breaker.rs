//! Circuit breaking per pool (SPEC §4) against real upstream servers switched to fail:
//! opens after exactly the configured failures, nothing reaches the pool while open,
//! half-open trials, closing, failure-rate mode, fallback, state across reloads.

mod common;

use common::*;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn policy(app: &Upstream, breaker: &str, route_extra: &str) -> String {
    format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\n    circuit_breaker: {{ {breaker} }}\nroutes:\n  - name: all\n    upstream: app\n{route_extra}",
        app.addr
    )
}

fn status(gw: &Tollgate, path: &str) -> u16 {
    gw.get(path).status().as_u16()
}

#[test]
fn opens_after_exactly_the_failures_then_half_opens_and_closes() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "consecutive_failures: 3, failure_rate: 100%, open_for: 1s, half_open_requests: 1, success_threshold: 2",
        "",
    ));
    app.knobs.force_status.store(503, Ordering::Relaxed);
    for _ in 0..2 {
        assert_eq!(status(&gw, "/health"), 503);
    }
    assert_eq!(
        gw.admin_json("/status")["upstreams"]["app"]["breaker"],
        "closed"
    );
    assert_eq!(
        status(&gw, "/health"),
        503,
        "third failure, still from upstream"
    );
    assert_eq!(app.requests(), 3);
    assert_eq!(
        gw.admin_json("/status")["upstreams"]["app"]["breaker"],
        "open"
    );

    // Open: answered by the gateway, nothing reaches the pool.
    let opened = Instant::now();
    let denied = gw.get("/health");
    assert_eq!(denied.status(), 503);
    assert_eq!(denied.headers()["retry-after"], "1");
    let doc: Value = denied.json().unwrap();
    assert_eq!(doc["error"], "circuit_open");
    for _ in 0..5 {
        assert_eq!(status(&gw, "/health"), 503);
    }
    assert_eq!(app.requests(), 3, "a request reached the pool while open");
    let explained = gw
        .admin_post_json("/explain", &serde_json::json!({ "path": "/health" }))
        .json::<Value>()
        .unwrap();
    assert_eq!(explained["decision"]["error"], "circuit_open");
    assert_eq!(
        gw.metric("tollgate_circuit_state{upstream=\"app\"}"),
        Some(2.0)
    );
    assert!(wait_for(Duration::from_secs(5), || gw
        .access_log()
        .iter()
        .any(|l| l["reason"] == "circuit_open")));

    // Half-open after open_for: one trial at a time; a slow trial keeps others out.
    app.knobs.force_status.store(0, Ordering::Relaxed);
    app.knobs.latency_ms.store(600, Ordering::Relaxed);
    assert!(wait_for(Duration::from_secs(3), || opened.elapsed()
        >= Duration::from_millis(1_050)));
    let trial = {
        let url = gw.url("/health");
        std::thread::spawn(move || reqwest::blocking::get(url).unwrap().status().as_u16())
    };
    assert!(wait_for(Duration::from_secs(2), || app.requests() == 4));
    let during = gw.get("/health");
    assert_eq!(
        during.status(),
        503,
        "a second concurrent trial was let through"
    );
    assert_eq!(during.headers()["retry-after"], "1");
    assert_eq!(trial.join().unwrap(), 200);
    assert_eq!(
        gw.admin_json("/status")["upstreams"]["app"]["breaker"],
        "half_open"
    );
    app.knobs.latency_ms.store(0, Ordering::Relaxed);
    assert_eq!(status(&gw, "/health"), 200, "second success closes it");
    assert_eq!(
        gw.admin_json("/status")["upstreams"]["app"]["breaker"],
        "closed"
    );
    assert_eq!(
        gw.metric("tollgate_circuit_state{upstream=\"app\"}"),
        Some(0.0)
    );
    for to in ["open", "half_open", "closed"] {
        assert_eq!(
            gw.metric(&format!(
                "tollgate_circuit_transitions_total{{to=\"{to}\",upstream=\"app\"}}"
            )),
            Some(1.0),
            "{to}"
        );
    }
    let kinds: Vec<String> = gw.admin_json("/events")["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "circuit_breaker")
        .map(|e| e["to"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["closed", "half_open", "open"], "newest first");
}

#[test]
fn a_failed_trial_reopens_for_twice_as_long() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "consecutive_failures: 2, open_for: 1s, max_open_for: 10s",
        "",
    ));
    app.knobs.force_status.store(502, Ordering::Relaxed);
    assert_eq!(status(&gw, "/health"), 502);
    assert_eq!(status(&gw, "/health"), 502);
    let opened = Instant::now();
    assert_eq!(status(&gw, "/health"), 503);
    assert!(wait_for(Duration::from_secs(3), || opened.elapsed()
        >= Duration::from_millis(1_050)));
    assert_eq!(
        status(&gw, "/health"),
        502,
        "the trial reaches the pool and fails"
    );
    let reopened = gw.get("/health");
    assert_eq!(reopened.status(), 503);
    let retry_after: u64 = reopened.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, 2, "open_for doubled");
    assert_eq!(app.requests(), 3);
}

#[test]
fn failure_rate_opens_once_the_minimum_is_reached() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "consecutive_failures: 0, failure_rate: 50%, min_requests: 10, window: 10s",
        "",
    ));
    // Alternate: never two failures in a row, half of them failures. The rate is
    // judged when a failure is counted, here the tenth request.
    for n in 0..10 {
        let path = if n % 2 == 1 {
            "/health?status=503"
        } else {
            "/health"
        };
        let expected = if n % 2 == 1 { 503 } else { 200 };
        assert_eq!(status(&gw, path), expected, "request {n}");
    }
    assert_eq!(
        gw.admin_json("/status")["upstreams"]["app"]["breaker"],
        "open",
        "5 failures of 10"
    );
    let before = app.requests();
    assert_eq!(
        gw.get("/health").json::<Value>().unwrap()["error"],
        "circuit_open"
    );
    assert_eq!(app.requests(), before);
}

#[test]
fn an_open_circuit_serves_the_route_fallback() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "consecutive_failures: 1, failure_on: [connect_error, timeout, 5xx]",
        "    fallback:\n      status: 200\n      content_type: application/json\n      body: '{\"suggestions\": [], \"degraded\": true}'\n",
    ));
    assert_eq!(status(&gw, "/health?status=500"), 500);
    let response = gw.get("/health");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-tollgate-fallback"], "circuit_open");
    assert_eq!(
        response.text().unwrap(),
        "{\"suggestions\": [], \"degraded\": true}"
    );
    assert_eq!(app.requests(), 1);
}

#[test]
fn connect_errors_count_and_state_survives_an_unrelated_reload() {
    let dead = closed_addr();
    let body = format!(
        "upstreams:\n  app:\n    servers: [\"{dead}\"]\n    circuit_breaker: {{ consecutive_failures: 2, open_for: 1m }}\nroutes:\n  - name: all\n    upstream: app\n"
    );
    let gw = Tollgate::start(&body);
    assert_eq!(status(&gw, "/health"), 502);
    assert_eq!(status(&gw, "/health"), 502);
    assert_eq!(status(&gw, "/health"), 503);

    // A reload that leaves the pool alone keeps the circuit open.
    let generation = gw.generation();
    gw.write_policy(&format!("{body}access_log:\n  enabled: false\n"));
    assert!(wait_for(Duration::from_secs(10), || gw.generation() > generation));
    assert_eq!(
        gw.admin_json("/status")["upstreams"]["app"]["breaker"],
        "open"
    );
    assert_eq!(status(&gw, "/health"), 503);

    // Changing the pool's servers starts a fresh breaker.
    let app = upstream("app");
    let generation = gw.generation();
    gw.write_policy(&body.replace(&dead, &app.addr.to_string()));
    assert!(wait_for(Duration::from_secs(10), || gw.generation() > generation));
    assert_eq!(status(&gw, "/health"), 200);
}

#[test]
fn invalid_breaker_settings_are_located_errors() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(&app, "consecutive_failures: 5", ""));
    gw.write_policy(&policy(&app, "failure_on: [connect_error, 7xx]", ""));
    let response = gw.admin_post("/reload", None);
    assert_eq!(response.status(), 400);
    let doc: Value = response.json().unwrap();
    let error = doc["errors"][0].as_str().unwrap();
    assert!(
        error.contains("gateway.yaml:") && error.contains("7xx"),
        "{error}"
    );
}
