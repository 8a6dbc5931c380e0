//! `POST /explain` (SPEC §5): route, identity and every rule's remaining quota for a
//! described request, without consuming quota or reaching upstream.

mod common;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn sha(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Rates slow enough that no token comes back while a test runs on a busy machine
/// (`global` at 1000/min would refill one every 60 ms).
fn start(app: &Upstream) -> Tollgate {
    Tollgate::start_with(
        &format!(
            "upstreams:\n  app:\n    servers: [\"{}\"]\nroutes:\n  - name: predict\n    match: {{ path_prefix: /api/predict }}\n    upstream: app\n  - name: health\n    match: {{ path: /health }}\n    upstream: app\nidentity:\n  api_keys:\n    keys:\n      - {{ sha256: \"{}\", user: alice, tier: pro }}\nrate_limits:\n  - name: global\n    key: global\n    rate: 1000/d\n  - name: per-user\n    key: user\n    rate: {{ free: 5/min, pro: 6/min }}\n  - name: anonymous\n    key: ip\n    when: anonymous\n    rate: 2/min\n  - name: expensive\n    key: user_or_ip\n    routes: [predict]\n    rate: 4/min\n",
            app.addr,
            sha("alice-key")
        ),
        "  trusted_proxies: [\"127.0.0.0/8\"]\n",
        &[],
    )
}

fn explain(gw: &Tollgate, body: Value) -> Value {
    let response = gw.admin_post_json("/explain", &body);
    assert_eq!(response.status(), 200);
    response.json().unwrap()
}

/// `rule name -> remaining`, in evaluation order.
fn remaining(report: &Value) -> Vec<(String, u64)> {
    report["rate_limits"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().unwrap().to_string(),
                r["remaining"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn explains_route_identity_and_quota_without_spending_it() {
    let app = upstream("app");
    let gw = start(&app);
    for _ in 0..2 {
        let response = gw
            .client
            .get(gw.url("/api/predict"))
            .header("x-api-key", "alice-key")
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let served = app.requests();
    let alice = json!({
        "method": "POST",
        "path": "/api/predict",
        "headers": { "x-api-key": "alice-key" },
        "client_ip": "127.0.0.1"
    });
    for _ in 0..5 {
        let report = explain(&gw, alice.clone());
        assert_eq!(report["route"]["name"], "predict");
        assert_eq!(report["route"]["upstreams"], json!(["app"]));
        assert_eq!(report["identity"]["user"], "alice");
        assert_eq!(report["identity"]["tier"], "pro");
        assert_eq!(
            remaining(&report),
            [
                ("per-user".to_string(), 4),
                ("expensive".to_string(), 2),
                ("global".to_string(), 998)
            ]
        );
        let per_user = &report["rate_limits"]["rules"][0];
        assert_eq!(per_user["quota"], 6);
        assert_eq!(per_user["window_seconds"], 60);
        assert_eq!(per_user["would_admit"], true);
        assert_eq!(report["decision"]["forward_to"], json!(["app"]));
    }
    assert_eq!(app.requests(), served, "explaining reached upstream");
    assert_eq!(
        gw.metric("tollgate_ratelimit_decisions_total{decision=\"allowed\",rule=\"per-user\"}"),
        Some(2.0),
        "explaining counted as decisions"
    );
}

#[test]
fn explains_denials_the_way_the_pipeline_would_answer() {
    let app = upstream("app");
    let gw = start(&app);
    // An anonymous client behind a trusted proxy spends its two requests.
    for _ in 0..2 {
        let response = gw
            .client
            .get(gw.url("/health"))
            .header("x-forwarded-for", "198.51.100.4")
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let report = explain(
        &gw,
        json!({ "path": "/health", "headers": { "x-forwarded-for": "198.51.100.4" }, "client_ip": "127.0.0.1" }),
    );
    assert_eq!(report["client_ip"], "198.51.100.4");
    assert_eq!(report["identity"]["user"], Value::Null);
    assert_eq!(report["decision"]["status"], 429);
    assert_eq!(report["decision"]["error"], "rate_limited");
    assert_eq!(report["decision"]["rule"], "anonymous");
    assert!(report["decision"]["retry_after"].as_u64().unwrap() >= 29);
    assert_eq!(remaining(&report), [("anonymous".to_string(), 0)]);

    // The same forwarded-for from an untrusted peer is ignored.
    let spoofed = explain(
        &gw,
        json!({ "path": "/health", "headers": { "x-forwarded-for": "198.51.100.4" }, "client_ip": "203.0.113.1" }),
    );
    assert_eq!(spoofed["client_ip"], "203.0.113.1");
    assert_eq!(spoofed["decision"]["forward_to"], json!(["app"]));

    let bad_key = explain(
        &gw,
        json!({ "path": "/health", "headers": { "x-api-key": "guess" } }),
    );
    assert_eq!(bad_key["identity"]["credentials"], "invalid");
    assert_eq!(bad_key["decision"]["status"], 401);

    let unrouted = explain(&gw, json!({ "path": "/nowhere" }));
    assert_eq!(unrouted["route"], Value::Null);
    assert_eq!(unrouted["decision"]["error"], "no_route");

    for bad in [
        json!({ "method": "GET" }),
        json!({ "path": "no-slash" }),
        json!({ "path": "/health", "client_ip": "not-an-ip" }),
        json!({ "path": "/health", "headers": { "bad header": "x" } }),
    ] {
        let response = gw.admin_post_json("/explain", &bad);
        assert_eq!(response.status(), 400, "{bad}");
        let doc: Value = response.json().unwrap();
        assert_eq!(doc["error"], "bad_request");
    }
}

/// `/explain` takes the proxy's own decision: a declared body over
/// `server.max_request_body` is a 413, and a shed request is shed before any rule
/// looks at it — for a real request and for its description alike.
#[test]
fn explains_body_size_and_shedding_before_limits_as_the_proxy_answers() {
    let app = upstream("app");
    let gw = Tollgate::start_with(
        &format!(
            "upstreams:\n  app:\n    servers: [\"{}\"]\nroutes:\n  - name: reports\n    match: {{ path_prefix: /api/search }}\n    upstream: app\n    priority: low\n  - name: upload\n    match: {{ path_prefix: /api/predict }}\n    upstream: app\nrate_limits:\n  - name: reports-per-ip\n    key: ip\n    routes: [reports]\n    rate: 1/h\nshedding:\n  max_inflight: 1000\n  levels:\n    - {{ above: 80%, shed: [low] }}\n  retry_after: 9s\n",
            app.addr
        ),
        "  max_request_body: 1KiB\n",
        &[],
    );
    let oversized = json!({ "method": "POST", "path": "/api/predict", "headers": { "content-length": "2048" } });
    let report = explain(&gw, oversized);
    assert_eq!(report["decision"]["status"], 413);
    assert_eq!(report["decision"]["error"], "payload_too_large");
    let upload = gw
        .client
        .post(gw.url("/api/predict"))
        .body(vec![b'x'; 2048])
        .send()
        .unwrap();
    assert_eq!(upload.status(), 413);
    let fits = json!({ "method": "POST", "path": "/api/predict", "headers": { "content-length": "1024" } });
    assert_eq!(explain(&gw, fits)["decision"]["forward_to"], json!(["app"]));

    assert_eq!(gw.get("/api/search").status(), 200);
    let limited = explain(
        &gw,
        json!({ "path": "/api/search", "client_ip": "127.0.0.1" }),
    );
    assert_eq!(limited["decision"]["error"], "rate_limited");
    assert_eq!(limited["rate_limits"]["reached"], true);

    let forced = gw.admin_put_json("/shedding", &json!({ "level": 1, "for": "1m" }));
    assert_eq!(forced.status(), 200);
    let shed = explain(
        &gw,
        json!({ "path": "/api/search", "client_ip": "127.0.0.1" }),
    );
    assert_eq!(shed["decision"]["status"], 503);
    assert_eq!(shed["decision"]["error"], "overloaded");
    assert_eq!(shed["decision"]["retry_after"], 9);
    assert_eq!(shed["shedding"]["would_shed"], true);
    assert_eq!(shed["rate_limits"]["reached"], false);
    assert_eq!(remaining(&shed), [("reports-per-ip".to_string(), 0)]);
    let answered = gw.get("/api/search");
    assert_eq!(answered.status(), 503);
    assert_eq!(answered.json::<Value>().unwrap()["error"], "overloaded");
}
