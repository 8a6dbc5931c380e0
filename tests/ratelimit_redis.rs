//! `rate_limiting.backend: redis` (SPEC §4) against a real `redis-server`: replicas
//! share one budget, and a dead or silent Redis falls back per `on_error` within
//! `timeout`.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

fn policy(app: &Upstream, rule: &str, redis: &str) -> String {
    format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\nroutes:\n  - name: all\n    upstream: app\nrate_limits:\n{rule}rate_limiting:\n  backend: redis\n  redis: {{ {redis} }}\n",
        app.addr
    )
}

const TRUST_LOOPBACK: &str = "  trusted_proxies: [\"127.0.0.0/8\"]\n";

fn from(gw: &Tollgate, ip: &str) -> reqwest::blocking::Response {
    gw.client
        .get(gw.url("/health"))
        .header("x-forwarded-for", ip)
        .send()
        .unwrap()
}

/// The `r` of the `RateLimit` header.
fn remaining(response: &reqwest::blocking::Response) -> Option<u32> {
    let header = response.headers().get("ratelimit")?.to_str().ok()?;
    header.split(";r=").nth(1)?.split(';').next()?.parse().ok()
}

#[test]
fn three_replicas_share_one_budget() {
    let redis = RedisServer::start();
    let app = upstream("app");
    let body = policy(
        &app,
        "  - name: shared\n    key: global\n    rate: 10/min\n",
        &format!("url: \"{}\", timeout: 2s, on_error: deny", redis.url()),
    );
    let replicas: Vec<Tollgate> = (0..3).map(|_| Tollgate::start(&body)).collect();

    let mut admitted = Vec::new();
    for n in 0..30 {
        let gw = &replicas[n % 3];
        let response = gw.get("/health");
        match response.status().as_u16() {
            200 => admitted.push((n % 3, remaining(&response))),
            429 => {
                let doc: Value = response.json().unwrap();
                assert_eq!(doc["rule"], "shared");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        admitted.len(),
        10,
        "three replicas admit what one would: {admitted:?}"
    );
    // The quota each replica reports counts the others' requests too.
    let reported: Vec<Option<u32>> = admitted.iter().map(|(_, r)| *r).collect();
    assert_eq!(reported, (0..10).rev().map(Some).collect::<Vec<_>>());
    assert!(
        (0..3).all(|g| admitted.iter().any(|(by, _)| *by == g)),
        "every replica admitted some: {admitted:?}"
    );
    assert_eq!(app.requests(), 10);
    // `/explain` on any replica reads the shared bucket.
    let report: Value = replicas[1]
        .admin_post_json("/explain", &serde_json::json!({ "path": "/health" }))
        .json()
        .unwrap();
    assert_eq!(report["decision"]["rule"], "shared");
    assert_eq!(report["rate_limits"]["rules"][0]["remaining"], 0);
    assert_eq!(
        replicas[0]
            .metric("tollgate_ratelimit_decisions_total{decision=\"limited\",rule=\"shared\"}"),
        Some(6.0),
        "replica 0 saw requests 0, 3, .., 27 and admitted the first four"
    );
}

#[test]
fn killed_redis_falls_back_per_on_error_within_the_timeout() {
    let mut redis = RedisServer::start();
    let app = upstream("app");
    let rule = "  - name: per-ip\n    key: ip\n    rate: 2/min\n";
    let start = |on_error: &str| {
        Tollgate::start_with(
            &policy(
                &app,
                rule,
                &format!(
                    "url: \"{}\", timeout: 300ms, on_error: {on_error}",
                    redis.url()
                ),
            ),
            TRUST_LOOPBACK,
            &[],
        )
    };
    let (local, allow, deny) = (start("local"), start("allow"), start("deny"));
    // With Redis up the three share the client's two requests.
    assert_eq!(from(&local, "203.0.113.9").status(), 200);
    assert_eq!(from(&allow, "203.0.113.9").status(), 200);
    let third = from(&deny, "203.0.113.9");
    assert_eq!(third.status(), 429);

    redis.kill();
    let timed = |gw: &Tollgate| {
        let started = Instant::now();
        let response = from(gw, "203.0.113.9");
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(300 + 500),
            "a dead Redis delayed a request by {elapsed:?}"
        );
        response
    };
    // local: this replica's own buckets, which have not seen the client yet.
    let local_statuses: Vec<u16> = (0..3).map(|_| timed(&local).status().as_u16()).collect();
    assert_eq!(local_statuses, [200, 200, 429]);
    // allow: admitted, without quota headers it cannot know.
    for _ in 0..4 {
        let response = timed(&allow);
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("ratelimit").is_none());
    }
    // deny: refused, naming the rule it could not check.
    let denied = timed(&deny);
    assert_eq!(denied.status(), 429);
    assert_eq!(denied.headers()["retry-after"], "1");
    let doc: Value = denied.json().unwrap();
    assert_eq!(doc["rule"], "per-ip");

    // Redis back on the same port: the shared buckets are used again (the client's
    // earlier requests are gone with the old server's memory).
    let _redis = RedisServer::start_on(redis.port);
    assert!(
        wait_for(Duration::from_secs(10), || {
            remaining(&from(&allow, "203.0.113.10")).is_some()
        }),
        "the gateway did not go back to Redis"
    );
}

#[test]
fn a_silent_redis_costs_at_most_the_timeout() {
    // Accepts connections (the kernel does) and never answers a command.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = upstream("app");
    let gw = Tollgate::start_with(
        &policy(
            &app,
            "  - name: per-ip\n    key: ip\n    rate: 3/min\n",
            &format!(
                "url: \"redis://{}\", timeout: 200ms, on_error: local",
                silent.local_addr().unwrap()
            ),
        ),
        TRUST_LOOPBACK,
        &[],
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let started = Instant::now();
        statuses.push(from(&gw, "192.0.2.7").status().as_u16());
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(200 + 500),
            "a silent Redis delayed a request by {elapsed:?}"
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert!(gw
        .stdout()
        .iter()
        .any(|l| l.contains("rate-limit store unreachable")));
}

#[test]
fn replicas_share_budgets_through_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let app = upstream("app");
    let rules = "  - name: per-ip\n    key: ip\n    rate: 3/min\n  - name: shared\n    key: global\n    rate: 5/min\n";
    let body = policy(
        &app,
        rules,
        &format!(
            "cluster: {}, timeout: 2s, on_error: deny",
            cluster.urls_yaml()
        ),
    );
    let replicas: Vec<Tollgate> = (0..2)
        .map(|_| Tollgate::start_with(&body, TRUST_LOOPBACK, &[]))
        .collect();

    // One client's three across both replicas, then its own rule refuses it; that
    // refusal spends nothing of the global budget (narrowest first, as on one server).
    let mut seen = Vec::new();
    for n in 0..4 {
        let response = from(&replicas[n % 2], "203.0.113.1");
        seen.push((response.status().as_u16(), remaining(&response)));
        if n == 3 {
            let doc: Value = response.json().unwrap();
            assert_eq!(doc["rule"], "per-ip");
        }
    }
    assert_eq!(
        seen,
        [
            (200, Some(2)),
            (200, Some(1)),
            (200, Some(0)),
            (429, Some(0))
        ]
    );
    // Two of the global five are left for everyone else.
    let other: Vec<u16> = (0..3)
        .map(|n| from(&replicas[n % 2], "203.0.113.2").status().as_u16())
        .collect();
    assert_eq!(other, [200, 200, 429]);
    let doc: Value = from(&replicas[0], "203.0.113.3").json().unwrap();
    assert_eq!(doc["rule"], "shared");
    assert_eq!(app.requests(), 5);
    // The buckets live on more than one shard: what a single script could not reach.
    let shards_holding = cluster
        .nodes
        .iter()
        .filter(|node| node.cli(&["DBSIZE"]).trim() != "0")
        .count();
    assert!(shards_holding >= 2, "all buckets on one shard");

    // The whole cluster gone: `on_error` within the timeout, as with one server.
    let mut cluster = cluster;
    cluster.kill();
    let started = Instant::now();
    let denied = from(&replicas[1], "203.0.113.4");
    assert_eq!(denied.status(), 429);
    assert!(
        started.elapsed() < Duration::from_millis(2_000 + 500),
        "a dead cluster delayed a request by {:?}",
        started.elapsed()
    );

    // Back (its buckets gone with its memory): both replicas use it again.
    cluster.restart();
    for gw in &replicas {
        assert!(
            wait_for(Duration::from_secs(15), || {
                let response = from(gw, "203.0.113.5");
                response.status() == 200 && remaining(&response).is_some()
            }),
            "a replica did not go back to the cluster"
        );
    }
}

#[test]
fn rediss_verifies_the_server_against_the_trusted_roots() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let redis = RedisServer::start_tls(certs.path());
    let app = upstream("app");
    let body = policy(
        &app,
        "  - name: shared\n    key: global\n    rate: 3/min\n",
        &format!("url: \"{}\", timeout: 2s, on_error: allow", redis.url()),
    );
    // The test CA trusted the way the system roots are extended (rustls-native-certs).
    let ca = certs.path().join("ca.pem");
    let trusting = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let replicas: Vec<Tollgate> = (0..2)
        .map(|_| Tollgate::start_with(&body, "", &trusting))
        .collect();
    let seen: Vec<(u16, Option<u32>)> = (0..4)
        .map(|n| {
            let response = replicas[n % 2].get("/health");
            (response.status().as_u16(), remaining(&response))
        })
        .collect();
    assert_eq!(
        seen,
        [
            (200, Some(2)),
            (200, Some(1)),
            (200, Some(0)),
            (429, Some(0))
        ],
        "both replicas spend one budget over TLS"
    );

    // A gateway that does not trust the CA refuses the server: `on_error: allow`
    // admits, without the quota headers only Redis could give.
    let untrusting = Tollgate::start(&body);
    for _ in 0..3 {
        let response = untrusting.get("/health");
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("ratelimit").is_none());
    }
    assert!(wait_for(Duration::from_secs(5), || untrusting
        .stdout()
        .iter()
        .any(
            |l| l.contains("rate-limit store unreachable") && l.contains("certificate")
        )));
}

/// Writes `policy` (after the pool and route every policy here has) and asks for a
/// reload, which must be refused; answers the first error.
fn refused_reload(gw: &Tollgate, app: &Upstream, policy: &str) -> String {
    gw.write_policy(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\nroutes:\n  - name: all\n    upstream: app\n{policy}",
        app.addr
    ));
    let response = gw.admin_post("/reload", None);
    assert_eq!(response.status(), 400);
    let doc: Value = response.json().unwrap();
    doc["errors"][0].as_str().unwrap().to_string()
}

#[test]
fn redis_backend_without_an_address_is_refused_with_its_location() {
    let app = upstream("app");
    let gw = Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\nroutes:\n  - name: all\n    upstream: app\n",
        app.addr
    ));
    let error = refused_reload(&gw, &app, "rate_limiting:\n  backend: redis\n");
    assert!(
        error.contains("gateway.yaml:") && error.contains("rate_limiting.redis"),
        "{error}"
    );
    refused_reload(
        &gw,
        &app,
        "rate_limiting:\n  backend: redis\n  redis: { url: \"http://nope\" }\n",
    );
    let error = refused_reload(
        &gw,
        &app,
        "rate_limiting:\n  backend: redis\n  redis:\n    url: \"redis://127.0.0.1:1\"\n    cluster: [\"redis://127.0.0.1:2\"]\n",
    );
    assert!(
        error.contains("gateway.yaml:") && error.contains("not both"),
        "{error}"
    );
    assert_eq!(gw.get("/health").status(), 200, "the old policy serves on");
}
