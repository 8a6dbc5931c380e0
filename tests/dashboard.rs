//! The live dashboard (SPEC §5 `GET /`): rendered by headless Chromium against a running
//! gateway, it must show live values from `/status`, not a static page.

mod common;

use common::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

/// The page's DOM after its scripts ran for `budget_ms` of virtual time.
fn rendered(url: &str, budget_ms: u32) -> String {
    // A fresh profile, and no background traffic: this network is closed, and Chromium
    // would otherwise keep trying Google's hosts at every start.
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--virtual-time-budget={budget_ms}"),
            "--dump-dom",
            url,
        ])
        .output()
        .expect("chromium is installed (.ci/setup installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The pool `app` (with `pool_extra` settings) and the two routes both tests use:
/// `predict` (normal priority) and `suggest` (low, shed first).
fn pool_and_routes(app: &Upstream, pool_extra: &str) -> String {
    format!(
        "upstreams:\n  app:\n    servers: [\"{}\"]\n{pool_extra}routes:\n  - name: predict\n    match: {{ path_prefix: /api/predict }}\n    upstream: app\n  - name: suggest\n    match: {{ path_prefix: /api/suggest }}\n    upstream: app\n    priority: low\n",
        app.addr
    )
}

#[test]
fn the_dashboard_renders_live_state_in_a_browser() {
    let app = upstream("app");
    let gw = Tollgate::start(&format!(
        "{}rate_limits:
  # Refilled buckets are dropped every few seconds: this one takes 6 minutes to refill
  # a token (12 at the forced level's limit_scale), so the client's key is still
  # tracked however long the browser takes (one render took 52 s on a loaded machine,
  # longer than the 36 s a rate of 100/h gave).
  - name: per-ip
    key: ip
    rate: 10/h
  - name: burst-detect
    key: ip
    rate: 50/10s
    shadow: true
shedding:
  levels:
    - {{ above: 80%, shed: [low], limit_scale: 0.5 }}
    - {{ above: 95%, shed: [low, normal, high] }}
",
        pool_and_routes(
            &app,
            "    circuit_breaker: { consecutive_failures: 1, open_for: 1m }\n    max_concurrent: 20\n"
        )
    ));
    assert_eq!(gw.get("/api/predict").status(), 200);
    assert_eq!(
        gw.admin_put_json("/shedding", &json!({ "level": 1, "for": "5m" }))
            .status(),
        200
    );
    assert!(wait_for(Duration::from_secs(3), || {
        gw.admin_json("/status")["load"]["level"] == 1
    }));

    let dom = rendered(&gw.admin_url("/"), 4_000);
    assert!(dom.contains("<b id=\"generation\">1</b>"), "{dom}");
    assert!(
        dom.contains(">live<"),
        "the page did not reach /status: {dom}"
    );
    assert!(
        dom.contains("<td>predict</td><td>normal</td>")
            && dom.contains("<td>suggest</td><td>low</td>"),
        "{dom}"
    );
    assert!(
        dom.contains("<td>per-ip</td><td>1</td><td>enforced</td>"),
        "{dom}"
    );
    assert!(
        dom.contains("level 1 of 2") && dom.contains("forced, "),
        "{dom}"
    );
    assert!(dom.contains(">closed<"), "breaker state shown");
    assert!(dom.contains(&app.addr.to_string()));
    assert!(dom.contains("0/20, 0 waiting"), "bulkhead shown");

    // Live: a change in the gateway shows up on the next render.
    app.knobs
        .force_status
        .store(503, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(gw.get("/api/predict").status(), 503);
    let dom = rendered(&gw.admin_url("/"), 4_000);
    assert!(
        dom.contains("badge bad\">open<"),
        "open breaker not shown: {dom}"
    );
}

#[test]
fn the_dashboard_charts_history_with_event_markers() {
    let app = upstream("app");
    let gw = Tollgate::start(&format!(
        "{}shedding:\n  levels:\n    - {{ above: 80%, shed: [low] }}\n",
        pool_and_routes(&app, "")
    ));
    assert_eq!(
        gw.admin_put_json("/shedding", &json!({ "level": 1, "for": "5m" }))
            .status(),
        200
    );
    // Traffic until a 5-second bucket holds it: answered requests and shed ones.
    let busy = |gw: &Tollgate| {
        gw.admin_json("/history")["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| {
                b["total"]["requests_per_s"].as_f64() > Some(0.0)
                    && b["total"]["shed_per_s"].as_f64() > Some(0.0)
            })
    };
    assert!(wait_for(Duration::from_secs(15), || {
        assert_eq!(gw.get("/api/predict").status(), 200);
        assert_eq!(gw.get("/api/suggest").status(), 503);
        std::thread::sleep(Duration::from_millis(100));
        busy(&gw)
    }));

    let dom = rendered(&gw.admin_url("/"), 4_000);
    let chart = |id: &str| {
        let start = dom
            .find(&format!("id=\"chart-{id}\""))
            .unwrap_or_else(|| panic!("no {id} chart: {dom}"));
        let end = dom[start..].find("</svg>").unwrap() + start;
        dom[start..end].to_string()
    };
    for id in ["rps", "latency", "shed"] {
        let svg = chart(id);
        let max: f64 = svg
            .split("data-max=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{svg}"));
        assert!(max > 0.0, "the {id} series is flat: {svg}");
        assert!(svg.contains("<polyline"), "{svg}");
    }
    // The forced level is marked on every chart's time axis.
    assert!(
        chart("rps").contains("class=\"marker shedding_forced\""),
        "{}",
        chart("rps")
    );
    assert!(
        dom.contains("<option>suggest</option>"),
        "route choice: {dom}"
    );
}
