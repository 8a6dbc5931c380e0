//! The chart's alert rules (`helm/tollgate/files/alerts.yaml`) and Grafana dashboard
//! (`helm/tollgate/files/grafana-dashboard.json`): every expression parses as PromQL and
//! names only metrics a running gateway exports, checked against a scrape of the real
//! binary after traffic that touches every feature the expressions watch.

mod common;

use common::*;
use promql_parser::parser::{self, Expr};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const CHART_FILES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/tollgate/files");

/// Every metric name a PromQL expression selects.
fn metric_names(expr: &Expr, names: &mut BTreeSet<String>) {
    match expr {
        Expr::Aggregate(e) => {
            metric_names(&e.expr, names);
            if let Some(param) = &e.param {
                metric_names(param, names);
            }
        }
        Expr::Unary(e) => metric_names(&e.expr, names),
        Expr::Binary(e) => {
            metric_names(&e.lhs, names);
            metric_names(&e.rhs, names);
        }
        Expr::Paren(e) => metric_names(&e.expr, names),
        Expr::Subquery(e) => metric_names(&e.expr, names),
        Expr::VectorSelector(vs) => {
            names.insert(vs.name.clone().expect("selectors name their metric"));
        }
        Expr::MatrixSelector(ms) => {
            names.insert(ms.vs.name.clone().expect("selectors name their metric"));
        }
        Expr::Call(call) => call.args.args.iter().for_each(|a| metric_names(a, names)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// (where, expression) for every alert, panel target and annotation query.
fn expressions() -> Vec<(String, String)> {
    let mut all = Vec::new();
    let alerts: Vec<Value> = serde_saphyr::from_str(
        &std::fs::read_to_string(format!("{CHART_FILES}/alerts.yaml")).unwrap(),
    )
    .unwrap();
    for rule in &alerts {
        let name = rule["alert"].as_str().expect("every rule is an alert");
        assert!(
            rule["annotations"]["runbook"].is_string() && rule["labels"]["severity"].is_string(),
            "{name} lacks a runbook or severity"
        );
        all.push((
            format!("alert {name}"),
            rule["expr"].as_str().unwrap().to_string(),
        ));
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{CHART_FILES}/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            all.push((
                format!("panel {}", panel["title"]),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for annotation in dashboard["annotations"]["list"].as_array().unwrap() {
        all.push((
            format!("annotation {}", annotation["name"]),
            annotation["expr"].as_str().unwrap().to_string(),
        ));
    }
    assert!(all.len() > 20, "{} expressions", all.len());
    all
}

#[test]
fn alerts_and_dashboard_are_promql_over_exported_metrics() {
    // Parse first: a syntax error needs no gateway to be found.
    let mut wanted = BTreeSet::new();
    for (origin, expr) in expressions() {
        // Grafana's variables, as Grafana substitutes them before querying.
        let query = expr
            .replace("$__rate_interval", "5m")
            .replace("$route", ".*");
        let parsed = parser::parse(&query).unwrap_or_else(|e| panic!("{origin}: {e}\n{expr}"));
        let mut names = BTreeSet::new();
        metric_names(&parsed, &mut names);
        assert!(!names.is_empty(), "{origin} selects no metric");
        wanted.extend(names.into_iter().map(|n| (n, origin.clone())));
    }

    // A gateway where each of them has a sample: a route with an SLO and a cache, a rate
    // limit on a Redis that is down, a pool whose circuit opens, a forced shedding level.
    let app = upstream("app");
    let down = closed_addr();
    let redis = closed_addr();
    let gw = Tollgate::start(&format!(
        "upstreams:
  app:
    servers: [\"{app}\"]
    max_concurrent: 10
    retry: {{ attempts: 1 }}
    health_check: {{ path: /health, interval: 1s }}
  down:
    servers: [\"{down}\"]
    timeouts: {{ connect: 200ms }}
    circuit_breaker: {{ consecutive_failures: 1, open_for: 1m }}
routes:
  - name: cached
    match: {{ path_prefix: /api/search }}
    upstream: app
    cache: {{ ttl: 1m }}
  - name: down
    match: {{ path_prefix: /down }}
    upstream: down
  - name: api
    match: {{ path_prefix: / }}
    upstream: app
    priority: low
    slo: {{ availability: 99.9% }}
rate_limits:
  - name: per-ip
    key: ip
    rate: 2/h
rate_limiting:
  backend: redis
  redis: {{ url: \"redis://{redis}\", timeout: 50ms, on_error: local }}
shedding:
  levels:
    - {{ above: 80%, shed: [low] }}
",
        app = app.addr
    ));
    for path in [
        "/api/search?q=a",
        "/api/search?q=a",
        "/down",
        "/api/predict",
    ] {
        gw.get(path);
    }
    assert_eq!(gw.get("/api/predict").status(), 429);
    assert_eq!(
        gw.admin_put_json("/shedding", &json!({ "level": 1, "for": "1m" }))
            .status(),
        200
    );
    assert!(wait_for(Duration::from_secs(3), || gw
        .get("/api/predict")
        .status()
        == 503));
    let reloaded = gw.admin_post("/reload", None);
    assert_eq!(reloaded.status(), 200);

    // Health checks publish their first verdict on their own schedule.
    assert!(wait_for(Duration::from_secs(5), || gw
        .admin_get("/metrics")
        .is_ok_and(|r| r
            .text()
            .unwrap()
            .contains("tollgate_upstream_server_healthy{"))));
    let scrape = gw
        .client
        .get(gw.admin_url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let exported: BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| &l[..l.find(['{', ' ']).unwrap()])
        .collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(name, _)| !exported.contains(name.as_str()))
        .map(|(name, origin)| format!("{origin}: {name}"))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:#?}\n{scrape}");
}
