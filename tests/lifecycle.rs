//! The process from outside: `tollgate check`, start-up errors, graceful shutdown, the
//! admin endpoints, metrics and the access log.

mod common;

use common::*;
use serde_json::Value;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn tollgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_accepts_the_bundled_policy() {
    let bundled = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.yaml");
    let out = tollgate(&["check", bundled]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_reports_typos_with_line_and_column() {
    let (_dir, path) = policy_file(
        &format!(
            "{}{}",
            head(8080, 9901, ""),
            simple_policy(&["127.0.0.1:3000".into()])
        )
        .replace("    servers:", "    severs:"),
    );
    let out = tollgate(&["check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:11:5: unknown field `severs`", path.display());
    assert!(stderr.starts_with(&expected), "{stderr}");
}

#[test]
fn check_against_prints_what_a_reload_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old.yaml"), dir.path().join("new.yaml"));
    let policy = |servers: &[String]| format!("{}{}", head(8080, 9901, ""), simple_policy(servers));
    std::fs::write(&old, policy(&["127.0.0.1:3000".into()])).unwrap();
    let mut changed = policy(&["127.0.0.1:3001".into()]);
    changed.push_str("  - name: extra\n    match: { path: /extra }\n    upstream: app\n");
    std::fs::write(&new, changed).unwrap();
    let out = tollgate(&[
        "check",
        new.to_str().unwrap(),
        "--against",
        old.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("route `extra` added"), "{stdout}");
    assert!(stdout.contains("upstream `app` changed"), "{stdout}");
    assert!(!stdout.contains("route `all`"), "{stdout}");
}

#[test]
fn check_against_lists_rule_changes_and_the_state_a_reload_resets() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old.yaml"), dir.path().join("new.yaml"));
    let policy = |rules: &str, open_for: &str| {
        format!(
            "{}upstreams:\n  app:\n    servers: [\"127.0.0.1:3000\"]\n    circuit_breaker: {{ open_for: {open_for} }}\n    max_concurrent: 10\nroutes:\n  - name: all\n    upstream: app\nrate_limits:\n{rules}",
            head(8080, 9901, "")
        )
    };
    std::fs::write(
        &old,
        policy(
            "  - { name: global, key: global, rate: 1000/min }\n  - { name: per-ip, key: ip, rate: 20/min }\n  - { name: gone, key: ip, rate: 5/min }\n",
            "60s",
        ),
    )
    .unwrap();
    std::fs::write(
        &new,
        policy(
            "  - { name: global, key: global, rate: 1000/min, shadow: true }\n  - { name: per-ip, key: ip, rate: 30/min }\n  - { name: fresh, key: user_or_ip, rate: 5/min }\n",
            "30s",
        ),
    )
    .unwrap();
    let out = tollgate(&[
        "check",
        new.to_str().unwrap(),
        "--against",
        old.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "rate-limit rule `fresh` added",
        "rate-limit rule `gone` removed: its limiter state is dropped",
        "rate-limit rule `per-ip` changed: its key, rate or burst differ, so its limiter state is reset",
        "rate-limit rule `global` changed; its limiter state is kept",
        "upstream `app`: its circuit breaker starts afresh",
    ] {
        assert!(stdout.contains(expected), "no `{expected}` in:\n{stdout}");
    }
    assert!(
        !stdout.contains("bulkhead"),
        "the bulkhead did not change:\n{stdout}"
    );
}

#[test]
fn a_busy_port_is_a_clear_start_up_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (dir, path) = policy_file(&format!(
        "{}{}",
        head(port, free_port(), ""),
        simple_policy(&["127.0.0.1:3000".into()])
    ));
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "-c", path.to_str().unwrap()])
        .env("TOLLGATE_RUN_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn listeners_that_share_a_port_are_refused_before_anything_listens() {
    let (port, admin_port) = (free_port(), free_port());
    let (dir, path) = policy_file(&format!(
        "version: 1\nserver:\n  listen: [\"127.0.0.1:{port}\", \"0.0.0.0:{port}\"]\nadmin:\n  listen: \"127.0.0.1:{admin_port}\"\n{}",
        simple_policy(&["127.0.0.1:3000".into()])
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "-c", path.to_str().unwrap()])
        .env("TOLLGATE_RUN_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_for(Duration::from_secs(10), || {
        child.try_wait().is_ok_and(|s| s.is_some())
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(exited, "still running after 10 s; stderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "server.listen `0.0.0.0:{port}` takes the port of server.listen `127.0.0.1:{port}`"
        )),
        "{stderr}"
    );
    for p in [port, admin_port] {
        assert!(std::net::TcpStream::connect(("127.0.0.1", p)).is_err());
    }
}

#[test]
fn more_threads_than_usable_cpus_is_a_start_up_warning() {
    let (port, admin_port) = (free_port(), free_port());
    // `head` asks for two threads; the process may use one CPU.
    let (dir, path) = policy_file(&format!(
        "{}{}",
        head(port, admin_port, ""),
        simple_policy(&["127.0.0.1:3000".into()])
    ));
    let start = |cpus: &str| {
        let mut child = Command::new("taskset")
            .args(["-c", cpus, env!("CARGO_BIN_EXE_tollgate"), "run", "-c"])
            .arg(&path)
            .env("TOLLGATE_RUN_DIR", dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let lines = collect_lines(child.stdout.take().unwrap());
        let started = wait_for(Duration::from_secs(10), || {
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("tollgate started"))
        });
        let _ = child.kill();
        let _ = child.wait();
        assert!(started, "{:?}", lines.lock().unwrap());
        let warned = lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("server.threads is more than the CPUs"))
            .cloned();
        warned
    };
    let warning = start("0").expect("warned on one CPU");
    let fields: Value = serde_json::from_str(&warning).unwrap();
    assert_eq!(
        (fields["threads"].as_u64(), fields["cpus"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(fields["level"], "WARN");
    assert_eq!(start("0,1"), None);
}

#[test]
fn sigterm_finishes_the_in_flight_request_then_exits_zero() {
    let slow = upstream("slow");
    slow.knobs.latency_ms.store(1500, Ordering::Relaxed);
    let mut gw = Tollgate::start(&simple_policy(&[slow.addr.to_string()]));
    let url = gw.url("/health");
    let in_flight =
        std::thread::spawn(move || reqwest::blocking::get(url).map(|r| r.status().as_u16()));
    assert!(wait_for(Duration::from_secs(5), || slow.requests() == 1));
    let started = Instant::now();
    gw.signal("TERM");
    assert_eq!(
        in_flight.join().unwrap().unwrap(),
        200,
        "the in-flight request completes"
    );
    let status = gw
        .wait_exit(Duration::from_secs(8))
        .expect("exits well before the 10s grace period");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn sigterm_on_an_idle_gateway_exits_at_once() {
    let app = upstream("app");
    let mut gw = Tollgate::start(&simple_policy(&[app.addr.to_string()]));
    let started = Instant::now();
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(5)).expect("exits");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

/// `THP_enabled` of the process in `/proc/<pid>/status`: 0 once `PR_SET_THP_DISABLE` is set.
fn transparent_huge_pages_enabled(gw: &Tollgate) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.child.id())).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn transparent_huge_pages_are_off_unless_the_operator_allows_them() {
    let app = upstream("app");
    let policy = simple_policy(&[app.addr.to_string()]);
    let gw = Tollgate::start(&policy);
    assert_eq!(transparent_huge_pages_enabled(&gw), Some(0));
    let allowed = Tollgate::start_with(&policy, "", &[("MIMALLOC_ALLOW_THP", "1")]);
    assert_eq!(transparent_huge_pages_enabled(&allowed), Some(1));
}

#[test]
fn admin_endpoints_report_state() {
    let app = upstream("app");
    let body = format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\nroutes:\n  - name: predict\n    match: {{ path_prefix: /api/predict }}\n    upstream: app\n    slo: {{ availability: 99.9%, p95: 500ms }}\n  - name: broken\n    match: {{ path: /broken }}\n    upstream: app\n",
        app.addr
    );
    let gw = Tollgate::start(&body);
    for _ in 0..5 {
        assert_eq!(gw.get("/api/predict").status(), 200);
    }
    assert_eq!(gw.get("/api/predict?status=503").status(), 503);
    assert_eq!(gw.get("/broken").status(), 404);
    gw.wait_idle();

    assert_eq!(gw.admin_get("/healthz").unwrap().text().unwrap(), "ok\n");
    assert_eq!(gw.admin_get("/livez").unwrap().status(), 200);
    assert_eq!(gw.admin_get("/readyz").unwrap().status(), 200);
    assert_eq!(gw.admin_get("/nope").unwrap().status(), 404);

    let status = gw.admin_json("/status");
    assert_eq!(status["generation"], 1);
    assert_eq!(status["sha256"].as_str().unwrap().len(), 64);
    assert!(status["loaded_at"].as_str().unwrap().ends_with('Z'));
    let server = &status["upstreams"]["app"]["servers"][0];
    assert_eq!(server["addr"], app.addr.to_string());
    assert_eq!(server["inflight"], 0);

    let slo = gw.admin_json("/slo");
    let five = &slo["routes"]["predict"]["last_5m"];
    assert_eq!(five["requests"], 6);
    assert_eq!(five["errors"], 1);
    assert_eq!(five["met"]["availability"], false);
    assert!(five["p95_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        slo["routes"].get("broken").is_none(),
        "only routes with an slo are reported"
    );

    assert_eq!(
        gw.metric("tollgate_requests_total{code=\"200\",method=\"GET\",route=\"predict\"}"),
        Some(5.0)
    );
    assert_eq!(
        gw.metric("tollgate_requests_total{code=\"503\",method=\"GET\",route=\"predict\"}"),
        Some(1.0)
    );
    assert_eq!(
        gw.metric("tollgate_request_duration_seconds_count{route=\"predict\"}"),
        Some(6.0)
    );
    assert_eq!(
        gw.metric("tollgate_upstream_request_duration_seconds_count{upstream=\"app\"}"),
        Some(7.0)
    );
    assert_eq!(gw.get("/nowhere").status(), 404);
    gw.wait_idle();
    assert_eq!(
        gw.metric("tollgate_requests_total{code=\"404\",method=\"GET\",route=\"_unmatched\"}"),
        Some(1.0)
    );
    assert_eq!(gw.metric("tollgate_config_generation"), Some(1.0));
}

#[test]
fn access_log_has_one_json_line_per_request_with_redaction() {
    let app = upstream("app");
    let gw = Tollgate::start(&simple_policy(&[app.addr.to_string()]));
    let response = gw
        .client
        .get(gw.url("/api/search?q=x"))
        .header("authorization", "Bearer top-secret")
        .header("user-agent", "tests")
        .send()
        .unwrap();
    let line = gw
        .access_line(&request_id(&response), Duration::from_secs(5))
        .expect("the request's line");
    assert_eq!(line["status"], 200);
    assert_eq!(line["route"], "all");
    assert_eq!(line["upstream"], "app");
    assert_eq!(line["upstream_addr"], app.addr.to_string());
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/api/search");
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(line["bytes_sent"].as_u64().unwrap() > 0);
    assert_eq!(line["request_headers"]["authorization"], "[redacted]");
    assert_eq!(line["request_headers"]["user-agent"], "tests");
    assert!(!gw.stdout().iter().any(|l| l.contains("top-secret")));
}

/// What the line copies without escaping (pool names the policy compiled, methods,
/// field names) and what it escapes (the client's values) both leave it valid JSON.
#[test]
fn access_log_lines_stay_json_whatever_the_names_and_values() {
    let app = upstream("app");
    let gw = Tollgate::start(&format!(
        "upstreams:\n  'back\\slash':\n    servers: [\"{}\"]\nroutes:\n  - name: all\n    upstream: 'back\\slash'\n",
        app.addr
    ));
    let response = gw
        .client
        .get(gw.url("/a%22b"))
        .header("user-agent", "quote \" back\\slash \t tab")
        .header("x-custom", &b"caf\xc3\xa9 \xff"[..])
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let line = gw
        .access_line(&request_id(&response), Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no line that parses: {:?}", gw.stdout()));
    assert_eq!(line["status"], status);
    assert_eq!(line["route"], "all");
    assert_eq!(line["upstream"], "back\\slash");
    assert_eq!(line["upstream_addr"], app.addr.to_string());
    assert_eq!(line["method"], "GET");
    assert_eq!(line["authority"], "127.0.0.1");
    assert_eq!(line["path"], "/a%22b");
    assert_eq!(
        line["request_headers"]["user-agent"],
        "quote \" back\\slash \t tab"
    );
    assert_eq!(line["request_headers"]["x-custom"], "café \u{fffd}");
}

#[test]
fn graceful_upgrade_hands_the_sockets_over_without_failed_requests() {
    let app = upstream("app");
    let mut old = Tollgate::start(&simple_policy(&[app.addr.to_string()]));
    let mut new = old.spawn_upgrade();
    // The new process waits for the sockets; the old one sends them on SIGQUIT.
    std::thread::sleep(Duration::from_millis(300));
    old.signal("QUIT");
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut served = 0;
    while old.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the old process did not hand over and exit"
        );
        let response = client
            .get(old.url("/health"))
            .send()
            .expect("no request fails during the hand-over");
        assert_eq!(response.status(), 200);
        served += 1;
    }
    assert!(old.child.try_wait().unwrap().unwrap().success());
    assert!(served > 0);
    assert_eq!(
        client.get(new.url("/health")).send().unwrap().status(),
        200,
        "the new process serves"
    );
    assert_eq!(new.admin_get("/healthz").unwrap().status(), 200);
    assert!(new.wait_exit(Duration::ZERO).is_none());
}

/// An instance waiting for the hand-over has opened no socket yet: signals that came
/// then killed it (their default action) before it caught them.
#[test]
fn signals_sent_while_a_new_instance_waits_for_the_hand_over_are_not_lost() {
    const SIGHUP: u32 = 1;
    const SIGINT: u32 = 2;
    const SIGQUIT: u32 = 3;
    const SIGUSR1: u32 = 10;
    const SIGTERM: u32 = 15;
    let app = upstream("app");
    let mut old = Tollgate::start(&simple_policy(&[app.addr.to_string()]));
    let mut new = old.spawn_upgrade();
    let all = [SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGTERM];
    assert!(
        wait_for(Duration::from_secs(5), || {
            let caught = new.caught_signals();
            all.iter().all(|s| caught.contains(s))
        }),
        "caught: {:?}",
        new.caught_signals()
    );
    new.signal("HUP");
    new.signal("USR1");
    assert!(
        new.wait_exit(Duration::ZERO).is_none(),
        "killed by a signal"
    );
    old.signal("QUIT");
    let old_status = old.wait_exit(Duration::from_secs(20)).expect("old exits");
    assert!(old_status.success(), "{old_status:?}");
    assert_eq!(new.get("/health").status(), 200, "the new instance serves");
    // The SIGHUP was kept for the policy watcher, which reloads once it runs.
    assert!(wait_for(Duration::from_secs(5), || new
        .metric("tollgate_config_reloads_total{result=\"success\"}")
        == Some(1.0)));
    assert!(new
        .stdout()
        .iter()
        .any(|l| l.contains("\"trigger\":\"sighup\"")));
    new.stop_cleanly(Duration::from_secs(5));
}

#[test]
fn probe_is_a_healthcheck_without_curl() {
    let app = upstream("app");
    let gw = Tollgate::start(&simple_policy(&[app.addr.to_string()]));
    let ok = tollgate(&["probe", &gw.admin_url("/healthz")]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let missing = tollgate(&["probe", &gw.admin_url("/nope")]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("status 404"));
    let closed = tollgate(&["probe", &format!("http://{}/healthz", closed_addr())]);
    assert_eq!(closed.status.code(), Some(1));
}

#[test]
fn the_last_access_log_lines_are_written_by_a_clean_stop() {
    let app = upstream("app");
    // Nothing is due for an hour and the buffer never fills: only the stop writes.
    let mut gw = Tollgate::start(&format!(
        "{}access_log:\n  flush: 1h\n  buffer: 1MiB\n",
        simple_policy(&[app.addr.to_string()])
    ));
    let id = request_id(&gw.get("/api/search?q=last"));
    gw.wait_idle();
    assert!(
        gw.access_line(&id, Duration::ZERO).is_none(),
        "written before it was due"
    );
    gw.stop_cleanly(Duration::from_secs(8));
    assert!(
        gw.access_line(&id, Duration::from_secs(2)).is_some(),
        "the last line was lost: {:?}",
        gw.stdout()
    );
}

/// `TOLLGATE_LOG` governs the lines through the `access` target: filtered out, none is
/// written, not even by the flush of a clean stop; the process's own logs still are.
#[test]
fn the_log_filter_can_turn_the_access_log_off() {
    let app = upstream("app");
    let mut gw = Tollgate::start_with(
        &simple_policy(&[app.addr.to_string()]),
        "",
        &[("TOLLGATE_LOG", "info,access=off")],
    );
    assert_eq!(gw.get("/api/search?q=x").status(), 200);
    gw.wait_idle();
    gw.stop_cleanly(Duration::from_secs(8));
    assert!(
        wait_for(Duration::from_secs(2), || gw
            .stdout()
            .iter()
            .any(|l| l.contains("\"level\":\"INFO\""))),
        "the process logs nothing: {:?}",
        gw.stdout()
    );
    assert!(gw.access_log().is_empty(), "{:?}", gw.access_log());
}

#[test]
fn the_access_log_file_is_reopened_on_sigusr1() {
    let app = upstream("app");
    let gw = Tollgate::start(&format!(
        "{}access_log:\n  path: access.log\n  flush: 0s\n",
        simple_policy(&[app.addr.to_string()])
    ));
    let log = gw.dir.path().join("access.log");
    let lines = |path: &std::path::Path| -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let request = |path: &str| {
        assert_eq!(gw.get(path).status(), 200);
    };
    request("/echo/before");
    assert!(wait_for(Duration::from_secs(5), || lines(&log).len() == 1));
    assert!(
        !gw.stdout()
            .iter()
            .any(|l| l.contains("\"type\":\"access\"")),
        "a file access log also went to stdout"
    );
    // logrotate: rename, then SIGUSR1; the next line goes to a new file.
    let rotated = gw.dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    gw.signal("USR1");
    assert!(wait_for(Duration::from_secs(5), || {
        request("/echo/after");
        !lines(&log).is_empty()
    }));
    // Lines written before the reopen stayed with the rotated file.
    assert_eq!(lines(&rotated)[0]["path"], "/echo/before");
    assert!(lines(&log).iter().all(|l| l["path"] == "/echo/after"));
}

#[test]
fn check_refuses_invalid_cache_keys_where_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let route = "    upstream: app\n";
    let cases = [
        (
            "    cache: { targeted: [cache-control] }\n",
            "stand for Cache-Control",
        ),
        (
            "    cache: { targeted: [\"not a name\"] }\n",
            "not a header name",
        ),
        ("    cache: { heuristic: 150% }\n", "invalid percentage"),
        (
            "    cache: { heuristic: 10%, heuristic_max: soon }\n",
            "invalid duration",
        ),
    ];
    for (cache, message) in cases {
        let text = format!(
            "{}{}",
            head(8080, 9901, ""),
            simple_policy(&["127.0.0.1:3000".into()])
        )
        .replacen(route, &format!("{route}{cache}"), 1);
        std::fs::write(&path, &text).unwrap();
        let line = text.lines().position(|l| l == cache.trim_end()).unwrap() + 1;
        let out = tollgate(&["check", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{cache}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let at = format!("{}:{line}:", path.display());
        assert!(
            stderr.starts_with(&at) && stderr.contains(message),
            "{cache}: {stderr}"
        );
    }
}
