//! Retries (SPEC §4): listed methods or Idempotency-Key only, on another server, capped
//! by the retry budget, and timeouts retried when listed.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn start(a: &Upstream, b: &Upstream, retry: &str) -> Tollgate {
    Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\", \"{}\"]\n    timeouts: {{ connect: 1s, read: 300ms }}\n    retry: {{ {retry} }}\nroutes:\n  - name: all\n    upstream: app\n",
        a.addr, b.addr
    ))
}

fn retries(gw: &Tollgate) -> f64 {
    gw.metric("tollgate_retries_total{upstream=\"app\"}")
        .unwrap_or(0.0)
}

#[test]
fn a_get_is_retried_on_the_other_server() {
    let (a, b) = (upstream("a"), upstream("b"));
    a.knobs.force_status.store(503, Ordering::Relaxed);
    let gw = start(
        &a,
        &b,
        "attempts: 2, on: [503], budget: 100%, backoff: { base: 10ms, max: 50ms }",
    );
    for _ in 0..6 {
        let response = gw.get("/health");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-served-by"], "b");
    }
    // The retry's own pick moves the round-robin cursor on, so every request meets a
    // first and is retried on b.
    assert_eq!(a.requests(), 6);
    assert_eq!(b.requests(), 6);
    assert_eq!(retries(&gw), 6.0);
}

#[test]
fn a_post_is_not_retried_unless_it_carries_an_idempotency_key() {
    let (a, b) = (upstream("a"), upstream("b"));
    a.knobs.force_status.store(503, Ordering::Relaxed);
    let gw = start(&a, &b, "attempts: 1, on: [503], budget: 100%");
    let post = |key: Option<&str>| {
        let mut request = gw.client.post(gw.url("/api/predict")).body("{\"x\": 1}");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send().unwrap().status().as_u16()
    };
    // Round robin: the first goes to a and fails as it is, the second goes to b.
    assert_eq!([post(None), post(None)], [503, 200]);
    assert_eq!(retries(&gw), 0.0);
    // With a key, the request that meets a is sent again, to b, body and all.
    assert_eq!(post(Some("order-17")), 200);
    assert_eq!(retries(&gw), 1.0);
    assert_eq!((a.requests(), b.requests()), (2, 2));
}

#[test]
fn the_budget_caps_retries_against_a_failing_pool() {
    let (a, b) = (upstream("a"), upstream("b"));
    a.knobs.force_status.store(503, Ordering::Relaxed);
    b.knobs.force_status.store(503, Ordering::Relaxed);
    let gw = start(
        &a,
        &b,
        "attempts: 2, on: [503], budget: 20%, min_retries_per_second: 0, backoff: { base: 1ms, max: 2ms }",
    );
    for _ in 0..50 {
        assert_eq!(gw.get("/health").status(), 503);
    }
    let taken = retries(&gw);
    let sent = (a.requests() + b.requests()) as f64;
    assert_eq!(sent, 50.0 + taken, "every retry reached the pool once");
    assert!(
        (8.0..=10.0).contains(&taken),
        "{taken} retries for 50 requests at 20%"
    );
}

#[test]
fn a_timeout_is_retried_when_listed_and_the_client_sees_one_answer() {
    let (a, b) = (upstream("a"), upstream("b"));
    a.knobs.latency_ms.store(2_000, Ordering::Relaxed);
    let gw = start(
        &a,
        &b,
        "attempts: 1, on: [timeout], budget: 100%, backoff: { base: 1ms, max: 1ms }",
    );
    let started = Instant::now();
    let responses: Vec<(u16, String)> = (0..2)
        .map(|_| {
            let r = gw.get("/health");
            (
                r.status().as_u16(),
                r.headers()["x-served-by"].to_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(responses, [(200, "b".to_string()), (200, "b".to_string())]);
    // Each met a first (the retry moves the round-robin cursor on), timed out after the
    // 300 ms read timeout and was answered by b.
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(retries(&gw), 2.0);
}

#[test]
fn a_reset_connection_is_retried_like_a_502() {
    let (a, b) = (upstream("a"), upstream("b"));
    a.knobs.reset_connections.store(true, Ordering::Relaxed);
    let gw = start(
        &a,
        &b,
        "attempts: 1, on: [502], budget: 100%, backoff: { base: 1ms, max: 1ms }",
    );
    for _ in 0..10 {
        let response = gw.get("/health");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-served-by"], "b");
    }
    // A reset that lands before the connection is established is a connect error
    // (failed over, not a retry); one after it, the usual case, is retried.
    let resets = a.requests() as f64;
    assert!(resets >= 1.0, "a was met and reset the connection");
    let taken = retries(&gw);
    assert!(
        taken >= 1.0 && taken <= resets,
        "{taken} retries for {resets} resets"
    );
}
