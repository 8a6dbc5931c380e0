//! The response cache through real sockets (SPEC §4 "Caching"): RFC 9111 directives,
//! collapsed forwarding, stale serving, purge, bounds, and the breaker's fallback chain.

mod common;

use common::*;
use reqwest::blocking::Response;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// One pool `app` and a caching route `cached` on `/api/`; `cache` is the route's
/// cache map, `extra` more top-level sections.
fn policy(app: &Upstream, cache: &str, extra: &str) -> String {
    format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\n    timeouts: {{ connect: 1s, read: 5s }}\nroutes:\n  - name: cached\n    match: {{ path_prefix: /api/ }}\n    upstream: app\n    cache: {cache}\n  - name: plain\n    match: {{ path_prefix: / }}\n    upstream: app\n{extra}",
        app.addr
    )
}

fn x_cache(response: &Response) -> &str {
    response
        .headers()
        .get("x-cache")
        .map_or("", |v| v.to_str().unwrap())
}

fn get_with(gw: &Tollgate, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut request = gw.client.get(gw.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().unwrap()
}

#[test]
fn hits_carry_age_and_upstream_freshness_is_honoured() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(&app, "{ ttl: 5m, stale_while_revalidate: 0s }", ""));

    let first = gw.get("/api/search?q=a");
    assert_eq!(first.status(), 200);
    assert_eq!(x_cache(&first), "MISS");
    let body = first.text().unwrap();
    let second = gw.get("/api/search?q=a");
    assert_eq!(x_cache(&second), "HIT");
    assert!(second.headers().contains_key("age"));
    assert_eq!(second.text().unwrap(), body);
    assert_eq!(app.requests(), 1, "the hit reached the upstream");

    // Another query string is another entry; a route without cache has no header.
    assert_eq!(x_cache(&gw.get("/api/search?q=b")), "MISS");
    assert!(!gw.get("/health").headers().contains_key("x-cache"));

    // no-store and private are never stored; max-age=0 is stored stale.
    for cc in ["no-store", "private", "max-age%3D0"] {
        let path = format!("/api/search?q=cc&cache_control={cc}");
        let before = app.requests();
        assert_eq!(x_cache(&gw.get(&path)), "MISS");
        assert_eq!(
            x_cache(&gw.get(&path)),
            "MISS",
            "{cc} was served from cache"
        );
        assert_eq!(app.requests(), before + 2);
    }

    // The upstream's hop-by-hop fields are not stored: a hit carries none of them.
    let path = "/api/search?q=hop&set_header=connection:x-upstream-private&set_header=x-upstream-private:1&set_header=keep-alive:timeout%3D5";
    for expected in ["MISS", "HIT"] {
        let response = gw.get(path);
        assert_eq!(x_cache(&response), expected);
        for hop in ["x-upstream-private", "keep-alive"] {
            assert!(
                !response.headers().contains_key(hop),
                "{expected} carried {hop}"
            );
        }
    }

    // HEAD is answered from the GET entry.
    let before = app.requests();
    let head = gw.client.head(gw.url("/api/search?q=a")).send().unwrap();
    assert_eq!(x_cache(&head), "HIT");
    assert_eq!(app.requests(), before);

    // A Range request is answered from the entry: the bytes asked for, or 416.
    let part = get_with(&gw, "/api/search?q=a", &[("range", "bytes=2-6")]);
    assert_eq!(part.status(), 206);
    assert_eq!(x_cache(&part), "HIT");
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 2-6/{}", body.len()).as_str()
    );
    assert_eq!(part.text().unwrap(), body[2..7]);
    let beyond = format!("bytes={}-", body.len() + 10);
    let unsatisfiable = get_with(&gw, "/api/search?q=a", &[("range", &beyond)]);
    assert_eq!(unsatisfiable.status(), 416);
    assert_eq!(app.requests(), before);

    // A POST is not cached, and a successful one invalidates the URI.
    let post = gw.client.post(gw.url("/api/search?q=a")).send().unwrap();
    assert_eq!(x_cache(&post), "BYPASS");
    assert_eq!(x_cache(&gw.get("/api/search?q=a")), "MISS");

    gw.wait_idle();
    assert!(wait_for(Duration::from_secs(5), || gw
        .access_log()
        .iter()
        .any(|l| l["reason"] == "cache_hit" && l["cache"] == "HIT")));
    assert!(
        gw.metric("tollgate_cache_requests_total{result=\"hit\",route=\"cached\"}") >= Some(2.0)
    );
    assert!(gw.metric("tollgate_cache_entries").unwrap() >= 2.0);
    let status = gw.admin_json("/status");
    assert!(status["cache"]["entries"].as_u64().unwrap() >= 2);
    assert!(status["cache"]["hit_ratio"].as_f64().unwrap() > 0.0);
}

#[test]
fn request_directives_and_authorization() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(&app, "{ ttl: 5m }", ""));
    let path = "/api/search?q=r&etag=v1";
    assert_eq!(x_cache(&gw.get(path)), "MISS");
    assert_eq!(x_cache(&gw.get(path)), "HIT");

    // Client no-cache: revalidated with the stored validator, the 304 refreshes it.
    let before = app.requests();
    let revalidated = get_with(&gw, path, &[("cache-control", "no-cache")]);
    assert_eq!(revalidated.status(), 200);
    assert_eq!(x_cache(&revalidated), "HIT");
    assert!(
        !revalidated.text().unwrap().is_empty(),
        "304 served without the stored body"
    );
    assert_eq!(app.requests(), before + 1);

    // A request with no-store bypasses the cache.
    assert_eq!(
        x_cache(&get_with(&gw, path, &[("cache-control", "no-store")])),
        "BYPASS"
    );

    // Authorization: not stored unless the response allows it (RFC 9111 §3.5).
    let auth = [("authorization", "Bearer secret")];
    let private_path = "/api/search?q=auth";
    assert_eq!(x_cache(&get_with(&gw, private_path, &auth)), "MISS");
    assert_eq!(
        x_cache(&gw.get(private_path)),
        "MISS",
        "an authorized response was shared"
    );
    let public_path = "/api/search?q=pub&cache_control=public%2C%20max-age%3D60";
    assert_eq!(x_cache(&get_with(&gw, public_path, &auth)), "MISS");
    assert_eq!(x_cache(&gw.get(public_path)), "HIT");
    assert_eq!(
        x_cache(&get_with(&gw, public_path, &auth)),
        "HIT",
        "a public entry is shared with credentials"
    );

    // Nor is what an anonymous request stored served to one with credentials: the
    // origin is asked, every time.
    let anonymous_path = "/api/search?q=anon";
    assert_eq!(x_cache(&gw.get(anonymous_path)), "MISS");
    assert_eq!(x_cache(&gw.get(anonymous_path)), "HIT");
    let before = app.requests();
    for basic in ["Basic dXNlcjpwYXNz", "Basic b3RoZXI6cGFzcw=="] {
        let response = get_with(&gw, anonymous_path, &[("authorization", basic)]);
        assert_eq!(x_cache(&response), "MISS", "{basic}");
    }
    assert_eq!(app.requests(), before + 2);
    assert_eq!(
        x_cache(&gw.get(anonymous_path)),
        "HIT",
        "the anonymous entry is still there"
    );
}

#[test]
fn per_user_keys_and_vary() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "{ ttl: 5m, per_user: true, vary: [x-tenant] }",
        "",
    ));
    let alice = [("authorization", "Bearer alice")];
    let bob = [("authorization", "Bearer bob")];
    let path = "/api/search?q=u";
    assert_eq!(x_cache(&get_with(&gw, path, &alice)), "MISS");
    assert_eq!(x_cache(&get_with(&gw, path, &alice)), "HIT");
    assert_eq!(
        x_cache(&get_with(&gw, path, &bob)),
        "MISS",
        "users share an entry"
    );

    // The route's vary list and the upstream's Vary both split entries.
    let tenant = |t: &'static str| [("x-tenant", t)];
    let varied = "/api/search?q=v&set_header=vary:accept-language";
    assert_eq!(x_cache(&get_with(&gw, varied, &tenant("a"))), "MISS");
    assert_eq!(x_cache(&get_with(&gw, varied, &tenant("a"))), "HIT");
    assert_eq!(x_cache(&get_with(&gw, varied, &tenant("b"))), "MISS");
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    assert_eq!(x_cache(&get_with(&gw, varied, &en)), "MISS");
    assert_eq!(x_cache(&get_with(&gw, varied, &en)), "HIT");
    assert_eq!(x_cache(&get_with(&gw, varied, &fr)), "MISS");
    assert_eq!(x_cache(&get_with(&gw, varied, &fr)), "HIT");
    assert_eq!(x_cache(&get_with(&gw, varied, &en)), "HIT");
}

#[test]
fn concurrent_misses_send_one_request_upstream() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(&app, "{ ttl: 5m }", ""));
    let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                s.spawn(|| {
                    let r = gw.get("/api/search?q=stampede&latency_ms=300");
                    (r.status().as_u16(), x_cache(&r).to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|(s, _)| *s == 200), "{statuses:?}");
    assert_eq!(app.requests(), 1, "{statuses:?}");
}

#[test]
fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "{ ttl: 1s, stale_while_revalidate: 30s, stale_if_error: 0s }",
        "",
    ));
    let path = "/api/search?q=swr&latency_ms=400";
    assert_eq!(x_cache(&gw.get(path)), "MISS");
    std::thread::sleep(Duration::from_millis(2_100));
    let started = std::time::Instant::now();
    let stale = gw.get(path);
    assert_eq!(x_cache(&stale), "STALE");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert!(wait_for(Duration::from_secs(5), || app.requests() == 2));
    assert!(wait_for(Duration::from_secs(5), || x_cache(&gw.get(path)) == "HIT"));
    assert_eq!(app.requests(), 2, "more than one background refresh");
}

#[test]
fn stale_if_error_on_5xx_and_with_the_circuit_open() {
    let app = upstream("app");
    let body = policy(
        &app,
        "{ ttl: 1s, stale_while_revalidate: 0s, stale_if_error: 10m }",
        "",
    )
    .replacen(
        "    timeouts: { connect: 1s, read: 5s }\n",
        "    timeouts: { connect: 1s, read: 5s }\n    circuit_breaker: { consecutive_failures: 2, open_for: 1m }\n",
        1,
    );
    let gw = Tollgate::start(&body);
    let path = "/api/search?q=sie";
    assert_eq!(x_cache(&gw.get(path)), "MISS");
    std::thread::sleep(Duration::from_millis(2_100));

    // The upstream fails: the stale entry stands in.
    app.knobs.force_status.store(503, Ordering::Relaxed);
    let first = gw.get(path);
    assert_eq!(first.status(), 200);
    assert_eq!(x_cache(&first), "STALE");
    // An uncached path fails through, opening the circuit.
    for _ in 0..2 {
        assert_eq!(gw.get("/api/search?q=never-cached").status(), 503);
    }
    assert!(wait_for(Duration::from_secs(2), || gw
        .admin_json("/status")["upstreams"]["app"]["breaker"]
        == "open"));

    // Circuit open: the stale entry, and nothing reaches the pool; no entry: 503.
    let before = app.requests();
    let stale = gw.get(path);
    assert_eq!(stale.status(), 200);
    assert_eq!(x_cache(&stale), "STALE");
    let refused = gw.get("/api/search?q=other");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.json::<Value>().unwrap()["error"], "circuit_open");
    assert_eq!(app.requests(), before);

    // With a fallback on the route, the fallback comes first (SPEC: fallback, else the
    // stale entry, else 503); a fresh entry is still a hit.
    let with_fallback = body.replacen(
        "    cache: {",
        "    fallback: { status: 200, body: '{\"degraded\": true}' }\n    cache: {",
        1,
    );
    gw.write_policy(&with_fallback);
    assert!(wait_for(Duration::from_secs(5), || gw.generation() == 2));
    let answered = gw.get(path);
    assert_eq!(answered.headers()["x-tollgate-fallback"], "circuit_open");
    assert_eq!(answered.text().unwrap(), "{\"degraded\": true}");
    assert_eq!(app.requests(), before);
}

#[test]
fn purge_by_path_prefix_tag_and_all() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(&app, "{ ttl: 5m }", ""));
    let paths = [
        "/api/search?q=1&set_header=cache-tag:red,blue",
        "/api/search?q=2&set_header=cache-tag:blue",
        "/api/suggest?set_header=cache-tag:green",
        "/api/predict",
    ];
    let fill = || {
        for p in paths {
            gw.get(p);
        }
    };
    let purge = |selector: Value| -> u64 {
        let r = gw.admin_post_json("/cache/purge", &selector);
        assert_eq!(r.status(), 200);
        r.json::<Value>().unwrap()["purged"].as_u64().unwrap()
    };
    fill();
    assert_eq!(x_cache(&gw.get(paths[3])), "HIT");
    assert_eq!(purge(json!({ "tag": "blue" })), 2);
    assert_eq!(x_cache(&gw.get(paths[0])), "MISS");
    assert_eq!(x_cache(&gw.get(paths[2])), "HIT");
    assert_eq!(purge(json!({ "path": "/api/predict" })), 1);
    assert_eq!(x_cache(&gw.get(paths[3])), "MISS");
    assert_eq!(purge(json!({ "prefix": "/api/search" })), 1);
    fill();
    assert_eq!(purge(json!({ "all": true })), 4);
    assert_eq!(gw.admin_json("/status")["cache"]["entries"], 0);
    assert_eq!(
        gw.admin_post_json("/cache/purge", &json!({ "nothing": 1 }))
            .status(),
        400
    );
}

#[test]
fn bounds_hold_under_a_flood_and_large_bodies_stream_through() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "{ ttl: 5m }",
        "cache:\n  max_size: 64KiB\n  max_entries: 20\n  max_object: 1KiB\n",
    ));
    for i in 0..300 {
        assert_eq!(gw.get(&format!("/api/search?q={i}")).status(), 200);
    }
    let status = gw.admin_json("/status");
    assert!(
        status["cache"]["entries"].as_u64().unwrap() <= 20,
        "{status}"
    );
    assert!(
        status["cache"]["bytes"].as_u64().unwrap() <= 64 * 1024,
        "{status}"
    );
    // The most recent entries are the ones kept.
    assert_eq!(x_cache(&gw.get("/api/search?q=299")), "HIT");

    let big = format!("/api/search?q={}", "x".repeat(1_500));
    let first = gw.get(&big);
    assert_eq!(first.status(), 200);
    assert!(first.text().unwrap().len() > 1_024);
    assert_eq!(
        x_cache(&gw.get(&big)),
        "MISS",
        "an object over max_object was stored"
    );
}

#[test]
fn explain_reports_the_cache_verdict() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(&app, "{ ttl: 5m }", ""));
    let host = format!("127.0.0.1:{}", gw.port);
    let explain = |path: &str| -> Value {
        gw.admin_post_json(
            "/explain",
            &json!({ "path": path, "headers": { "host": host } }),
        )
        .json::<Value>()
        .unwrap()["cache"]
            .clone()
    };
    assert_eq!(explain("/api/search?q=e")["result"], "miss");
    gw.get("/api/search?q=e");
    assert_eq!(explain("/api/search?q=e")["result"], "hit");
    assert_eq!(explain("/health")["would_use"], false);
    assert_eq!(app.requests(), 1, "explaining reached the upstream");
}

#[test]
fn warm_paths_fill_the_cache_at_start_and_after_a_reload() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        "{ ttl: 5m, warm: [\"/api/search?q=warm\"] }",
        "",
    ));
    assert!(wait_for(Duration::from_secs(10), || app.requests() == 1));
    assert_eq!(x_cache(&gw.get("/api/search?q=warm")), "HIT");

    let purged = gw.admin_post_json("/cache/purge", &json!({ "all": true }));
    assert_eq!(purged.json::<Value>().unwrap()["purged"], 1);
    gw.write_policy(&policy(
        &app,
        "{ ttl: 5m, warm: [\"/api/search?q=warm\", \"http://api.example/api/suggest\"] }",
        "",
    ));
    assert!(wait_for(Duration::from_secs(10), || app.requests() == 3));
    assert_eq!(x_cache(&gw.get("/api/search?q=warm")), "HIT");
    // A warm URL is stored under its own Host, the one clients send.
    assert_eq!(
        x_cache(&get_with(&gw, "/api/suggest", &[("host", "api.example")])),
        "HIT"
    );
    assert!(wait_for(Duration::from_secs(5), || gw
        .access_log()
        .iter()
        .any(
            |l| l["request_headers"]["user-agent"] == "tollgate-cache-warmer"
        )));
}

/// The caching route with its entries shared through `redis`.
fn shared_policy(app: &Upstream, redis: &RedisServer) -> String {
    let shared = format!(
        "cache:\n  redis: {{ url: \"{}\", timeout: 200ms }}\n",
        redis.url()
    );
    policy(app, "{ ttl: 5m }", &shared)
}

#[test]
fn replicas_share_entries_through_redis_and_survive_its_loss() {
    let app = upstream("app");
    let mut redis = RedisServer::start();
    let replica = || Tollgate::start(&shared_policy(&app, &redis));
    let (a, b) = (replica(), replica());

    // Replicas behind one Service see the same Host.
    let host = [("host", "api.example")];
    let path = "/api/search?q=shared&set_header=cache-tag:t1";
    assert_eq!(x_cache(&get_with(&a, path, &host)), "MISS");
    let from_b = get_with(&b, path, &host);
    assert_eq!(x_cache(&from_b), "HIT");
    assert!(from_b.text().unwrap().contains("shared one"));
    assert_eq!(app.requests(), 1, "the second replica went upstream");

    // A purge on one replica clears the shared tier and, by broadcast, the other
    // replicas' own copies; a third replica misses.
    assert_eq!(b.admin_json("/status")["cache"]["entries"], 1);
    let purged = a.admin_post_json("/cache/purge", &json!({ "tag": "t1" }));
    assert_eq!(purged.json::<Value>().unwrap()["purged"], 1);
    assert!(wait_for(Duration::from_secs(5), || b.admin_json("/status")
        ["cache"]["entries"]
        == 0));
    let c = replica();
    assert_eq!(x_cache(&get_with(&c, path, &host)), "MISS");

    // Redis gone: every replica keeps answering from its own tier or the upstream.
    redis.kill();
    let started = std::time::Instant::now();
    let fresh = b.get("/api/search?q=after-redis");
    assert_eq!(fresh.status(), 200);
    assert_eq!(x_cache(&fresh), "MISS");
    assert_eq!(x_cache(&b.get("/api/search?q=after-redis")), "HIT");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// Sends one command to Redis in its inline form; answers the reply's first line.
#[test]
fn purges_are_not_lost_to_a_redis_stall_or_a_broken_subscription() {
    let app = upstream("app");
    let redis = RedisServer::start();
    let replica = || Tollgate::start(&shared_policy(&app, &redis));
    let (a, b) = (replica(), replica());
    let host = [("host", "api.example")];
    let cached_on_both = |path: &str| {
        assert_eq!(x_cache(&get_with(&a, path, &host)), "MISS");
        assert_eq!(x_cache(&get_with(&b, path, &host)), "HIT");
    };
    // Read without a request, which would store the entry again.
    let b_entries = || {
        b.admin_json("/status")["cache"]["entries"]
            .as_u64()
            .unwrap()
    };

    // Redis stalls (every client paused) while a purge is sent to one replica: the
    // purge is replayed once Redis answers, so the shared tier and the other replica
    // lose the entry too.
    cached_on_both("/api/search?q=stalled");
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "6000", "ALL"]).trim(), "OK");
    let purged = a.admin_post_json("/cache/purge", &json!({ "path": "/api/search" }));
    assert_eq!(purged.json::<Value>().unwrap()["purged"], 1);
    assert_eq!(
        x_cache(&get_with(&b, "/api/search?q=stalled", &host)),
        "HIT",
        "b cannot have heard of the purge yet"
    );
    assert_eq!(b_entries(), 1);
    assert!(wait_for(Duration::from_secs(15), || b_entries() == 0));
    let c = replica();
    assert_eq!(
        x_cache(&get_with(&c, "/api/search?q=stalled", &host)),
        "MISS",
        "the shared tier still had the purged entry"
    );

    // The replicas' subscriptions break and a purge is published before they are
    // back: nobody hears it, so a replica that returns drops its own copies.
    cached_on_both("/api/search?q=unheard");
    assert!(redis
        .cli(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .trim()
        .parse::<u32>()
        .is_ok());
    let purged = a.admin_post_json("/cache/purge", &json!({ "path": "/api/search" }));
    assert_eq!(purged.status(), 200);
    assert_eq!(b_entries(), 1);
    assert!(wait_for(Duration::from_secs(15), || b_entries() == 0));
}

/// RFC 9111 §4.2.3: a response arrives with an age (the upstream's `Age`); it counts
/// against its freshness, and every hit's `Age` goes on from it.
#[test]
fn rfc9111_4_2_3_the_upstream_age_counts_against_freshness_and_in_hits() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(&app, "{ ttl: 5m, stale_while_revalidate: 0s }", ""));

    let old = "/api/search?q=age-old&cache_control=max-age%3D60&set_header=age:3600";
    assert_eq!(x_cache(&gw.get(old)), "MISS");
    let again = gw.get(old);
    assert_ne!(
        x_cache(&again),
        "HIT",
        "an hour-old response served as fresh for a minute"
    );
    assert_eq!(app.requests(), 2);

    let young = "/api/search?q=age-young&cache_control=max-age%3D600&set_header=age:100";
    assert_eq!(x_cache(&gw.get(young)), "MISS");
    let hit = gw.get(young);
    assert_eq!(x_cache(&hit), "HIT");
    let age: u64 = hit.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!((100..110).contains(&age), "Age {age}");
    assert_eq!(app.requests(), 3);
}

/// RFC 9111 §4.2.4, §5.2.2.2, §5.2.2.8, §5.2.2.10: `must-revalidate`, `proxy-revalidate`,
/// `s-maxage` and `no-cache` forbid serving a stale entry — also when the route offers
/// `stale_if_error` and `stale_while_revalidate`, and with the pool's circuit open: then
/// the answer is the error, never the stale body. (`Age` beyond `max-age` stores the
/// entries already stale, so nothing waits for a clock.)
#[test]
fn rfc9111_4_2_4_directives_that_forbid_stale_win_over_the_routes_stale_windows() {
    let app = upstream("app");
    let body = policy(
        &app,
        "{ ttl: 5m, stale_while_revalidate: 10m, stale_if_error: 10m }",
        "",
    )
    .replacen(
        "    timeouts: { connect: 1s, read: 5s }\n",
        "    timeouts: { connect: 1s, read: 5s }\n    circuit_breaker: { consecutive_failures: 2, open_for: 1m }\n",
        1,
    );
    let gw = Tollgate::start(&body);
    let path =
        |q: &str, cc: &str| format!("/api/search?q={q}&cache_control={cc}&set_header=age:30");
    let allowed = path("allowed", "max-age%3D1");
    let forbidding: Vec<String> = [
        "max-age%3D1,%20must-revalidate",
        "max-age%3D1,%20proxy-revalidate",
        "s-maxage%3D1",
        "no-cache",
    ]
    .iter()
    .enumerate()
    .map(|(i, cc)| path(&format!("forbid{i}"), cc))
    .collect();
    for p in std::iter::once(&allowed).chain(&forbidding) {
        assert_eq!(x_cache(&gw.get(p)), "MISS", "{p}");
    }

    // The upstream fails: the entry that allows it stands in, the others do not.
    app.knobs.force_status.store(503, Ordering::Relaxed);
    let stale = gw.get(&allowed);
    assert_eq!((stale.status().as_u16(), x_cache(&stale)), (200, "STALE"));
    for p in &forbidding {
        let answer = gw.get(p);
        assert_eq!(answer.status(), 503, "{p} was served stale");
        assert_ne!(x_cache(&answer), "STALE", "{p}");
    }

    // The circuit opens: still the stale entry where allowed, 503 everywhere else.
    assert!(wait_for(Duration::from_secs(2), || gw
        .admin_json("/status")["upstreams"]["app"]["breaker"]
        == "open"));
    assert_eq!(x_cache(&gw.get(&allowed)), "STALE");
    for p in &forbidding {
        let answer = gw.get(p);
        assert_eq!(
            answer.status(),
            503,
            "{p} was served stale with the circuit open"
        );
        assert_eq!(
            answer.json::<Value>().unwrap()["error"],
            "circuit_open",
            "{p}"
        );
    }
}

/// A route on `/` to `origin`, caching with `cache`.
fn origin_policy(origin: &Origin, cache: &str) -> String {
    format!(
        "upstreams:\n  origin:\n    servers: [\"{}\"]\n    timeouts: {{ connect: 1s, read: 5s }}\nroutes:\n  - name: cached\n    match: {{ path_prefix: / }}\n    upstream: origin\n    cache: {cache}\n",
        origin.addr
    )
}

/// RFC 9111 §4.3.1, §3.2, §4.3.4: a stale entry with validators is revalidated with
/// `If-None-Match` and `If-Modified-Since`; the 304 updates every stored field it
/// carries (`Content-Length` excepted) and its `Date` and freshness count from then, so
/// the entry is fresh again; the client gets the updated stored response.
#[test]
fn rfc9111_4_3_4_a_304_updates_the_stored_fields_and_freshens_the_entry() {
    let modified = http_date(-7200);
    let stored_modified = modified.clone();
    let (first_date, validated_date) = (http_date(-3600), http_date(-1));
    let (sent_first_date, sent_validated_date) = (first_date.clone(), validated_date.clone());
    let origin = Origin::start(move |request, count| {
        if count == 0 {
            let date = &sent_first_date;
            http_response(
                "200 OK",
                &[
                    ("cache-control", "max-age=60"),
                    ("date", date),
                    ("etag", "\"v1\""),
                    ("last-modified", &stored_modified),
                    ("x-version", "1"),
                    ("x-kept", "yes"),
                ],
                "hello",
            )
        } else if request.field("if-none-match").as_deref() == Some("\"v1\"") {
            let date = &sent_validated_date;
            http_response(
                "304 Not Modified",
                &[
                    ("cache-control", "max-age=600"),
                    ("date", date),
                    ("etag", "\"v1\""),
                    ("x-version", "2"),
                ],
                "",
            )
        } else {
            http_response("200 OK", &[("x-version", "unconditional")], "refetched")
        }
    });
    let gw = Tollgate::start(&origin_policy(
        &origin,
        "{ ttl: 5m, stale_while_revalidate: 0s, stale_if_error: 0s }",
    ));

    let first = gw.get("/doc");
    assert_eq!(x_cache(&first), "MISS");
    assert_eq!(
        first.headers()["date"],
        first_date.as_str(),
        "the origin's Date was replaced"
    );
    assert_eq!(first.text().unwrap(), "hello");

    // Stored an hour old with a minute of freshness: revalidated, conditionally.
    let revalidated = gw.get("/doc");
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].field("if-none-match").as_deref(), Some("\"v1\""));
    assert_eq!(seen[1].field("if-modified-since"), Some(modified));
    assert_eq!(revalidated.status(), 200);
    assert_eq!(x_cache(&revalidated), "HIT");
    assert_eq!(
        revalidated.headers()["x-version"],
        "2",
        "the 304's field was lost"
    );
    assert_eq!(revalidated.headers()["x-kept"], "yes");
    assert_eq!(revalidated.headers()["content-length"], "5");
    assert_eq!(revalidated.text().unwrap(), "hello");

    // Fresh again for ten minutes from the 304's Date: no request reaches the origin.
    let hit = gw.get("/doc");
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(hit.headers()["x-version"], "2");
    assert_eq!(
        hit.headers()["date"],
        validated_date.as_str(),
        "a hit carries the stored Date (RFC 9110 §6.6.1)"
    );
    assert_eq!(hit.headers()["cache-control"], "max-age=600");
    let age: u64 = hit.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!(age < 60, "Age {age} after a revalidation");
    assert_eq!(
        origin.seen().len(),
        2,
        "the revalidated entry was not fresh"
    );
}

/// An origin answering each path with the fields the test listed for it (body `ok`),
/// and a `vary: accept-language` path that echoes nothing but varies.
fn fields_origin(
    paths: &'static [(&'static str, &'static [(&'static str, &'static str)])],
) -> Origin {
    Origin::start(move |request, _| {
        let path = request.target();
        let fields = paths
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(&[][..], |(_, f)| *f);
        http_response("200 OK", fields, "ok")
    })
}

fn requests_to(origin: &Origin, path: &str) -> usize {
    origin.seen().iter().filter(|r| r.target() == path).count()
}

/// RFC 9213: `Tollgate-Cache-Control`, then `CDN-Cache-Control` (the route's
/// `cache.targeted` order) stand for Cache-Control in this cache; the field it obeyed
/// does not reach the client, the other one does; an invalid one is ignored; `[]` turns
/// them off.
#[test]
fn rfc9213_targeted_cache_control_overrides_cache_control_for_this_cache() {
    let origin = fields_origin(&[
        (
            "/cdn",
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=600"),
            ],
        ),
        (
            "/own",
            &[
                ("cache-control", "max-age=600"),
                ("tollgate-cache-control", "no-store"),
                ("cdn-cache-control", "max-age=600"),
            ],
        ),
        (
            "/invalid",
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=\"60"),
            ],
        ),
        (
            "/off/cdn",
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=600"),
            ],
        ),
    ]);
    let body = origin_policy(&origin, "{ ttl: 5m }").replacen(
        "routes:\n",
        "routes:\n  - name: off\n    match: { path_prefix: /off/ }\n    upstream: origin\n    cache: { targeted: [] }\n",
        1,
    );
    let gw = Tollgate::start(&body);
    let twice = |path: &str| [gw.get(path), gw.get(path)];

    let [miss, hit] = twice("/cdn");
    assert_eq!((x_cache(&miss), x_cache(&hit)), ("MISS", "HIT"));
    for response in [&miss, &hit] {
        assert!(!response.headers().contains_key("cdn-cache-control"));
    }
    assert_eq!(requests_to(&origin, "/cdn"), 1);

    let [first, second] = twice("/own");
    assert_eq!((x_cache(&first), x_cache(&second)), ("MISS", "MISS"));
    assert!(!first.headers().contains_key("tollgate-cache-control"));
    assert_eq!(first.headers()["cdn-cache-control"], "max-age=600");
    assert_eq!(requests_to(&origin, "/own"), 2);

    let [first, second] = twice("/invalid");
    assert_eq!((x_cache(&first), x_cache(&second)), ("MISS", "MISS"));
    assert_eq!(requests_to(&origin, "/invalid"), 2);

    let [first, second] = twice("/off/cdn");
    assert_eq!((x_cache(&first), x_cache(&second)), ("MISS", "MISS"));
    assert_eq!(first.headers()["cdn-cache-control"], "max-age=600");
}

/// RFC 9111 §3.1: a response that sets a cookie is stored, `Set-Cookie` and all, when
/// the origin said how long it may be shared; never on the route's own ttl.
#[test]
fn rfc9111_3_1_set_cookie_is_stored_with_explicit_shared_freshness() {
    let origin = fields_origin(&[
        (
            "/shared",
            &[
                ("cache-control", "max-age=600"),
                ("set-cookie", "theme=dark"),
            ],
        ),
        ("/ttl-only", &[("set-cookie", "session=secret")]),
    ]);
    let gw = Tollgate::start(&origin_policy(&origin, "{ ttl: 5m }"));
    assert_eq!(x_cache(&gw.get("/shared")), "MISS");
    let hit = gw.get("/shared");
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(hit.headers()["set-cookie"], "theme=dark");
    assert_eq!(x_cache(&gw.get("/ttl-only")), "MISS");
    assert_eq!(x_cache(&gw.get("/ttl-only")), "MISS");
    assert_eq!(requests_to(&origin, "/ttl-only"), 2);
}

/// RFC 9111 §4.2.2 with `cache.heuristic`: a response with Last-Modified and no explicit
/// freshness is fresh for a share of its age; without Last-Modified the route's ttl
/// (here none) holds.
#[test]
fn rfc9111_4_2_2_heuristic_freshness_from_last_modified() {
    let origin = fields_origin(&[
        (
            "/modified",
            &[("last-modified", "Sat, 01 Jan 2000 00:00:00 GMT")],
        ),
        ("/unmodified", &[]),
    ]);
    let gw = Tollgate::start(&origin_policy(
        &origin,
        "{ ttl: 0s, heuristic: 10%, heuristic_max: 1h, stale_while_revalidate: 0s, stale_if_error: 0s }",
    ));
    assert_eq!(x_cache(&gw.get("/modified")), "MISS");
    let hit = gw.get("/modified");
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(requests_to(&origin, "/modified"), 1);
    gw.get("/unmodified");
    assert_ne!(x_cache(&gw.get("/unmodified")), "HIT");
    assert_eq!(requests_to(&origin, "/unmodified"), 2);
}

/// RFC 9111 §4.1: requests whose varied field differs only in whitespace, case or list
/// order select the same stored variant; another value is another variant.
#[test]
fn rfc9111_4_1_varied_fields_are_normalised() {
    let origin = fields_origin(&[(
        "/varied",
        &[
            ("cache-control", "max-age=600"),
            ("vary", "accept-language"),
        ],
    )]);
    let gw = Tollgate::start(&origin_policy(&origin, "{ ttl: 5m }"));
    let lang = |value: &str| get_with(&gw, "/varied", &[("accept-language", value)]);
    assert_eq!(x_cache(&lang("en, fr")), "MISS");
    assert_eq!(x_cache(&lang("FR,en")), "HIT");
    assert_eq!(x_cache(&lang(" en ,  fr ")), "HIT");
    assert_eq!(x_cache(&lang("de")), "MISS");
    assert_eq!(requests_to(&origin, "/varied"), 2);
}
