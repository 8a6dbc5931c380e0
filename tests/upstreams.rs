//! Server choice and upstream failures: balancing algorithms, weights, canary splits,
//! backups, failover on refused connections, 502 and 504.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn tally(gw: &Tollgate, path: &str, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let doc: Value = gw.get(path).json().unwrap();
        let server = doc["server"]
            .as_str()
            .unwrap_or_else(|| panic!("not an upstream's answer: {doc}"));
        *counts.entry(server.to_string()).or_default() += 1;
    }
    counts
}

#[test]
fn weighted_round_robin_follows_weights() {
    let (a, b) = (upstream("a"), upstream("b"));
    let gw = Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers:\n      - {{ addr: \"{}\", weight: 3 }}\n      - \"{}\"\nroutes:\n  - name: all\n    upstream: app\n",
        a.addr, b.addr
    ));
    let counts = tally(&gw, "/health", 40);
    assert_eq!((counts["a"], counts["b"]), (30, 10), "{counts:?}");
}

#[test]
fn canary_split_sends_a_share_to_each_pool() {
    let (stable, canary) = (upstream("stable"), upstream("canary"));
    let gw = Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\n  app-v2:\n    servers: [\"{}\"]\nroutes:\n  - name: all\n    upstream: {{ app: 80, app-v2: 20 }}\n",
        stable.addr, canary.addr
    ));
    let counts = tally(&gw, "/health", 400);
    let share = counts.get("canary").copied().unwrap_or(0) as f64 / 400.0;
    assert!(
        (0.12..0.28).contains(&share),
        "canary share {share}: {counts:?}"
    );
}

#[test]
fn consistent_hash_keeps_a_key_on_one_server() {
    let servers: Vec<Upstream> = (0..3).map(|i| upstream(&format!("s{i}"))).collect();
    let list: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    let gw = Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers: [{}]\n    balance: consistent_hash\n    hash_on: header:x-tenant\nroutes:\n  - name: all\n    upstream: app\n",
        list.join(", ")
    ));
    let mut owners = HashMap::new();
    for tenant in 0..30 {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let doc: Value = gw
                .client
                .get(gw.url("/health"))
                .header("x-tenant", format!("t{tenant}"))
                .send()
                .unwrap()
                .json()
                .unwrap();
            seen.push(doc["server"].as_str().unwrap().to_string());
        }
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "tenant {tenant} moved: {seen:?}"
        );
        *owners.entry(seen[0].clone()).or_insert(0) += 1;
    }
    assert!(
        owners.len() >= 2,
        "30 tenants all on one server: {owners:?}"
    );
}

#[test]
fn least_conn_avoids_the_busy_server() {
    let (slow, fast) = (upstream("slow"), upstream("fast"));
    slow.knobs.latency_ms.store(1500, Ordering::Relaxed);
    let gw = Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\", \"{}\"]\n    balance: least_conn\nroutes:\n  - name: all\n    upstream: app\n",
        slow.addr, fast.addr
    ));
    // Occupy the slow server, then every quick request should go to the idle one.
    let url = gw.url("/health");
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || reqwest::blocking::get(url).map(|r| r.status().as_u16()))
        })
        .collect();
    // One request went to each server. The fast one's may still count against it for a
    // moment after the fast server answered: wait for the gateway's own view too.
    let inflight = |doc: &Value, addr: std::net::SocketAddr| {
        doc["upstreams"]["app"]["servers"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["addr"] == addr.to_string()))
            .and_then(|s| s["inflight"].as_u64())
    };
    assert!(wait_for(Duration::from_secs(5), || {
        let status = gw.admin_json("/status");
        (slow.requests(), fast.requests()) == (1, 1)
            && inflight(&status, slow.addr) == Some(1)
            && inflight(&status, fast.addr) == Some(0)
    }));
    let during = slow.requests();
    let counts = tally(&gw, "/health", 10);
    assert_eq!(counts.get("fast"), Some(&10), "{counts:?}");
    assert_eq!(slow.requests(), during);
    for b in busy {
        assert_eq!(b.join().unwrap().unwrap(), 200);
    }
}

#[test]
fn refused_connections_fail_over_and_backups_serve_last() {
    let (primary, backup) = (upstream("primary"), upstream("backup"));
    let dead = closed_addr();
    let gw = Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers:\n      - \"{dead}\"\n      - \"{}\"\n      - {{ addr: \"{}\", backup: true }}\nroutes:\n  - name: all\n    upstream: app\n",
        primary.addr, backup.addr
    ));
    let counts = tally(&gw, "/health", 20);
    assert_eq!(
        counts.get("primary"),
        Some(&20),
        "a refused server is skipped, backups stay idle: {counts:?}"
    );
    assert_eq!(backup.requests(), 0);

    primary.stop();
    assert!(wait_for(Duration::from_secs(5), || {
        std::net::TcpStream::connect(primary.addr).is_err()
    }));
    let counts = tally(&gw, "/health", 5);
    assert_eq!(counts.get("backup"), Some(&5), "{counts:?}");
}

#[test]
fn nothing_reachable_is_502_upstream_unavailable() {
    let gw = Tollgate::start(&simple_policy(&[closed_addr(), closed_addr()]));
    let response = gw.get("/health");
    assert_eq!(response.status(), 502);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let doc: Value = response.json().unwrap();
    assert_eq!(doc["error"], "upstream_unavailable");
    assert!(wait_for(Duration::from_secs(5), || gw
        .access_log()
        .iter()
        .any(|l| l["reason"] == "upstream_unavailable")));
}

#[test]
fn route_timeout_is_504_upstream_timeout() {
    let slow = upstream("slow");
    slow.knobs.latency_ms.store(3000, Ordering::Relaxed);
    let gw = Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\nroutes:\n  - name: all\n    upstream: app\n    timeout: 300ms\n",
        slow.addr
    ));
    let started = Instant::now();
    let response = gw.get("/health");
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 504);
    let doc: Value = response.json().unwrap();
    assert_eq!(doc["error"], "upstream_timeout");
    assert!(elapsed < Duration::from_millis(2000), "took {elapsed:?}");
}

#[test]
fn upstream_read_timeout_is_504() {
    let slow = upstream("slow");
    slow.knobs.latency_ms.store(3000, Ordering::Relaxed);
    let gw = Tollgate::start(&pool_policy(slow.addr, "timeouts: { read: 200ms }"));
    assert_eq!(gw.get("/health").status(), 504);
}

#[test]
fn upstream_connections_are_kept_alive_on_every_worker_thread() {
    // The harness runs two worker threads; each reuses the upstream connections it opened.
    let origin = Origin::recording();
    let gw = Tollgate::start(&simple_policy(&[origin.addr.to_string()]));
    for _ in 0..50 {
        assert_eq!(gw.get("/sequential").status(), 200);
    }
    assert_eq!(
        origin.connections(),
        1,
        "one client, one upstream connection"
    );

    let clients = 8;
    std::thread::scope(|scope| {
        for _ in 0..clients {
            scope.spawn(|| {
                let client = reqwest::blocking::Client::new();
                for _ in 0..50 {
                    let response = client.get(gw.url("/concurrent")).send().unwrap();
                    assert_eq!(response.status(), 200);
                }
            });
        }
    });
    assert_eq!(origin.seen().len(), 50 + clients * 50);
    // A connection goes back to its thread's pool only once its response is read, so a
    // thread may open one more than it has clients; never one per request.
    assert!(
        origin.connections() <= 1 + 2 * clients,
        "{} upstream connections for {} requests",
        origin.connections(),
        clients * 50
    );
}

#[test]
fn idle_upstream_connections_close_after_the_idle_timeout() {
    let origin = Origin::recording();
    let gw = Tollgate::start(&pool_policy(origin.addr, "timeouts: { idle: 1s }"));
    assert_eq!(gw.get("/").status(), 200);
    let served = Instant::now();
    assert_eq!(origin.open_connections(), 1, "kept for reuse");
    assert!(
        wait_for(Duration::from_secs(10), || origin.open_connections() == 0),
        "the idle upstream connection stayed open"
    );
    let idle = served.elapsed();
    assert!(
        idle >= Duration::from_millis(900),
        "closed after {idle:?}, before its idle timeout"
    );
}

#[test]
fn an_idle_connection_the_server_ends_is_closed_and_not_reused() {
    // A server that answers one request per connection, ends its side a moment later
    // (the connection idle in the gateway's pool by then) without having said so in the
    // response, and waits for the gateway to close the other.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let closed_tx = closed_tx.clone();
            std::thread::spawn(move || {
                use std::io::{BufRead, Read, Write};
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                let mut conn = conn;
                conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .unwrap();
                std::thread::sleep(Duration::from_millis(200));
                conn.shutdown(std::net::Shutdown::Write).unwrap();
                let ended = Instant::now();
                let mut rest = Vec::new();
                let _ = reader.read_to_end(&mut rest);
                closed_tx.send(ended.elapsed()).unwrap();
            });
        }
    });
    let gw = Tollgate::start(&simple_policy(&[addr.to_string()]));
    assert_eq!(gw.get("/first").status(), 200);
    let closed_after = closed_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the gateway kept a connection the server had ended");
    assert!(closed_after < Duration::from_secs(3), "{closed_after:?}");
    assert_eq!(
        gw.get("/second").status(),
        200,
        "served on a new connection"
    );
}

#[test]
fn keepalive_zero_keeps_no_idle_upstream_connection() {
    let origin = Origin::recording();
    let gw = Tollgate::start(&pool_policy(origin.addr, "keepalive: 0"));
    for _ in 0..5 {
        assert_eq!(gw.get("/").status(), 200);
    }
    assert_eq!(origin.connections(), 5, "one connection per request");
    for request in origin.seen() {
        assert_eq!(request.fields("connection"), ["close"]);
    }
    assert!(
        wait_for(Duration::from_secs(5), || origin.open_connections() == 0),
        "{} upstream connections left open",
        origin.open_connections()
    );
}
