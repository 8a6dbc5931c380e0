//! Rate limiting (SPEC §4) through real sockets: per IP, per user and tier, global,
//! route scope, `when`, header keys, shadow rules, narrowest-first fairness, spoofing,
//! exact headers, burst timing and state across reloads.

mod common;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

fn sha(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Two routes (`a` on /a, `b` everywhere else) to one app, then `extra` sections.
fn policy(app: &Upstream, extra: &str) -> String {
    format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\nroutes:\n  - name: a\n    match: {{ path_prefix: /a }}\n    upstream: app\n  - name: b\n    upstream: app\n{extra}",
        app.addr
    )
}

const TRUST_LOOPBACK: &str = "  trusted_proxies: [\"127.0.0.0/8\"]\n";

fn from(gw: &Tollgate, path: &str, ip: &str) -> reqwest::blocking::Response {
    gw.client
        .get(gw.url(path))
        .header("x-forwarded-for", ip)
        .send()
        .unwrap()
}

fn statuses(gw: &Tollgate, path: &str, ip: &str, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| from(gw, path, ip).status().as_u16())
        .collect()
}

#[test]
fn per_ip_limit_with_exact_headers_and_problem_body() {
    let app = upstream("app");
    let gw = Tollgate::start_with(
        &policy(
            &app,
            "rate_limits:\n  - name: per-ip\n    key: ip\n    rate: 3/min\n",
        ),
        TRUST_LOOPBACK,
        &[],
    );
    let first = from(&gw, "/health", "198.51.100.1");
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["ratelimit-policy"], "\"per-ip\";q=3;w=60");
    assert_eq!(first.headers()["ratelimit"], "\"per-ip\";r=2;t=20");
    assert_eq!(
        from(&gw, "/health", "198.51.100.1").headers()["ratelimit"],
        "\"per-ip\";r=1;t=40"
    );
    assert_eq!(from(&gw, "/health", "198.51.100.1").status(), 200);

    let before = app.requests();
    let denied = from(&gw, "/health", "198.51.100.1");
    assert_eq!(denied.status(), 429);
    assert_eq!(denied.headers()["content-type"], "application/problem+json");
    let retry_after: u64 = denied.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((19..=20).contains(&retry_after), "{retry_after}");
    assert_eq!(
        denied.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .split(";r=")
            .nth(1)
            .unwrap()
            .split(';')
            .next(),
        Some("0")
    );
    let body: Value = denied.json().unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["rule"], "per-ip");
    assert_eq!(body["retry_after"], retry_after);
    assert_eq!(body["status"], 429);
    assert_eq!(
        app.requests(),
        before,
        "a limited request never reaches upstream"
    );

    // Another client has its own bucket.
    assert_eq!(from(&gw, "/health", "198.51.100.2").status(), 200);
    assert_eq!(
        gw.metric("tollgate_ratelimit_decisions_total{decision=\"limited\",rule=\"per-ip\"}"),
        Some(1.0)
    );
    assert_eq!(
        gw.metric("tollgate_ratelimit_decisions_total{decision=\"allowed\",rule=\"per-ip\"}"),
        Some(4.0)
    );
    assert_eq!(gw.admin_json("/status")["rate_limits"]["per-ip"]["keys"], 2);
    assert!(wait_for(Duration::from_secs(5), || gw
        .access_log()
        .iter()
        .any(|l| l["reason"] == "rate_limited:per-ip")));
}

#[test]
fn spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "rate_limits:\n  - name: per-ip\n    key: ip\n    rate: 2/min\n",
    ));
    assert_eq!(from(&gw, "/health", "203.0.113.1").status(), 200);
    assert_eq!(from(&gw, "/health", "203.0.113.2").status(), 200);
    assert_eq!(
        from(&gw, "/health", "203.0.113.3").status(),
        429,
        "all three are the same peer, 127.0.0.1"
    );
}

#[test]
fn narrowest_key_first_so_an_abuser_cannot_drain_the_global_budget() {
    let app = upstream("app");
    let rules = "rate_limits:\n  - name: global\n    key: global\n    rate: 5/min\n  - name: per-ip\n    key: ip\n    rate: 2/min\n";
    let gw = Tollgate::start_with(&policy(&app, rules), TRUST_LOOPBACK, &[]);
    assert_eq!(
        statuses(&gw, "/health", "192.0.2.66", 10),
        [200, 200, 429, 429, 429, 429, 429, 429, 429, 429]
    );
    assert_eq!(
        statuses(&gw, "/health", "192.0.2.7", 3),
        [200, 200, 429],
        "the global budget was not drained"
    );
    assert_eq!(
        statuses(&gw, "/health", "192.0.2.8", 2),
        [200, 429],
        "global: 5 in all"
    );
    let denied: Value = from(&gw, "/health", "192.0.2.9").json().unwrap();
    assert_eq!(denied["rule"], "global");
}

#[test]
fn per_user_tiers_and_anonymous_fallback() {
    let app = upstream("app");
    let extra = format!(
        "identity:\n  api_keys:\n    keys:\n      - {{ sha256: \"{}\", user: alice, tier: enterprise }}\n      - {{ sha256: \"{}\", user: bob }}\n  default_tier: free\nrate_limits:\n  - name: per-user\n    key: user\n    rate: {{ free: 1/min, enterprise: 3/min }}\n  - name: per-ip-anonymous\n    key: ip\n    when: anonymous\n    rate: 2/min\n",
        sha("alice-key"),
        sha("bob-key")
    );
    let gw = Tollgate::start(&policy(&app, &extra));
    let with_key = |key: &str| {
        gw.client
            .get(gw.url("/health"))
            .header("x-api-key", key)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        (0..4).map(|_| with_key("alice-key")).collect::<Vec<_>>(),
        [200, 200, 200, 429]
    );
    assert_eq!(
        (0..2).map(|_| with_key("bob-key")).collect::<Vec<_>>(),
        [200, 429]
    );
    // Anonymous requests skip the user rule and meet the anonymous per-IP one.
    let anonymous: Vec<u16> = (0..3)
        .map(|_| gw.get("/health").status().as_u16())
        .collect();
    assert_eq!(anonymous, [200, 200, 429]);
    assert_eq!(
        with_key("alice-key"),
        429,
        "users are not limited by the anonymous rule, but alice is spent"
    );
}

#[test]
fn route_scope_header_keys_and_legacy_headers() {
    let app = upstream("app");
    let rules = "rate_limits:\n  - name: only-a\n    key: ip\n    routes: [a]\n    rate: 1/min\n  - name: per-tenant\n    key: header:x-tenant\n    rate: 1/min\nrate_limiting:\n  headers: legacy\n";
    let gw = Tollgate::start(&policy(&app, rules));
    assert_eq!(gw.get("/api/predict").status(), 200);
    let second = gw.get("/api/predict");
    assert_eq!(second.status(), 429);
    assert!(second.headers().get("ratelimit").is_none());
    assert_eq!(second.headers()["x-ratelimit-limit"], "1");
    assert_eq!(second.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(
        statuses(&gw, "/health", "ignored", 3),
        [200, 200, 200],
        "route b is outside the scope, and no x-tenant: no bucket"
    );
    let tenant = |t: &str| {
        gw.client
            .get(gw.url("/health"))
            .header("x-tenant", t)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!((tenant("t1"), tenant("t1"), tenant("t2")), (200, 429, 200));
}

#[test]
fn shadow_rules_count_but_never_reject() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "rate_limits:\n  - name: burst-detect\n    key: ip\n    rate: 1/min\n    shadow: true\n",
    ));
    assert_eq!(statuses(&gw, "/health", "", 4), [200, 200, 200, 200]);
    assert_eq!(
        gw.metric(
            "tollgate_ratelimit_decisions_total{decision=\"shadow_limited\",rule=\"burst-detect\"}"
        ),
        Some(3.0)
    );
    assert!(wait_for(Duration::from_secs(5), || gw
        .access_log()
        .iter()
        .filter(|l| l["shadow_limited"][0] == "burst-detect")
        .count()
        == 3));
    assert!(
        gw.get("/health")
            .headers()
            .get("ratelimit-policy")
            .is_none(),
        "a dry-run rule is not advertised"
    );
}

#[test]
fn burst_then_the_sustained_rate() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "rate_limits:\n  - name: fast\n    key: ip\n    rate: 4/s\n    burst: 2\n",
    ));
    assert_eq!(statuses(&gw, "/health", "", 3), [200, 200, 429]);
    let denied_at = Instant::now();
    assert!(wait_for(Duration::from_secs(2), || gw
        .get("/health")
        .status()
        == 200));
    let waited = denied_at.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_millis(1000),
        "one token every 250 ms, waited {waited:?}"
    );
}

#[test]
fn buckets_survive_a_reload_unless_their_rule_changed() {
    let app = upstream("app");
    let rule =
        |rate: &str| format!("rate_limits:\n  - name: per-ip\n    key: ip\n    rate: {rate}\n");
    let gw = Tollgate::start(&policy(&app, &rule("2/min")));
    assert_eq!(statuses(&gw, "/health", "", 3), [200, 200, 429]);

    // An unrelated change: the bucket is still spent.
    gw.write_policy(&(policy(&app, &rule("2/min")) + "access_log:\n  enabled: true\n"));
    assert!(wait_for(Duration::from_secs(3), || gw.generation() == 2));
    assert_eq!(gw.get("/health").status(), 429);

    // The rate changed: the rule starts fresh.
    gw.write_policy(&policy(&app, &rule("3/min")));
    assert!(wait_for(Duration::from_secs(3), || gw.generation() == 3));
    assert_eq!(statuses(&gw, "/health", "", 4), [200, 200, 200, 429]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check")
        .arg(&gw.policy)
        .output()
        .unwrap();
    assert!(out.status.success());
}
