//! `GET /history` (SPEC §5) through the real binary: 5-second buckets of requests/s,
//! error share, latency quantiles and 429s by rule, sampled while traffic flows.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

#[test]
fn history_fills_five_second_buckets_from_live_traffic() {
    let app = upstream("app");
    let gw = Tollgate::start(&api_policy(
        app.addr,
        "rate_limits:\n  - name: per-ip\n    key: ip\n    rate: 20/h\n",
    ));
    let history = || gw.admin_json("/history");
    assert_eq!(history()["interval_seconds"], 5);

    // Traffic across at least one sample boundary: 20 answered, then 429s.
    let busy = |bucket: &Value| bucket["total"]["requests_per_s"].as_f64().unwrap_or(0.0) > 0.0;
    let mut statuses = Vec::new();
    assert!(
        wait_for(Duration::from_secs(15), || {
            statuses.push(gw.get("/api/predict").status().as_u16());
            std::thread::sleep(Duration::from_millis(50));
            history()["buckets"].as_array().unwrap().iter().any(busy)
        }),
        "no bucket with requests: {}",
        history()
    );
    assert!(statuses.contains(&429), "the rule never answered");
    // One more boundary, so that a bucket certainly holds 429s.
    let seen = history()["buckets"].as_array().unwrap().len();
    assert!(wait_for(Duration::from_secs(7), || {
        gw.get("/api/predict");
        std::thread::sleep(Duration::from_millis(50));
        history()["buckets"].as_array().unwrap().len() > seen
    }));

    let buckets = history()["buckets"].as_array().unwrap().clone();
    let ats: Vec<u64> = buckets.iter().map(|b| b["at"].as_u64().unwrap()).collect();
    assert!(ats.windows(2).all(|w| w[0] < w[1]), "oldest first: {ats:?}");
    let bucket = buckets.iter().rev().find(|b| busy(b)).unwrap();
    let api = &bucket["routes"]["api"];
    assert!(api["requests_per_s"].as_f64().unwrap() > 0.0, "{bucket}");
    assert_eq!(api["error_share"], 0.0, "{bucket}");
    assert!(api["p50_ms"].as_f64().unwrap() > 0.0, "{bucket}");
    assert!(api["p99_ms"].as_f64().unwrap() >= api["p50_ms"].as_f64().unwrap());
    assert!(
        buckets
            .iter()
            .any(|b| b["limited_per_s"]["per-ip"].as_f64().unwrap_or(0.0) > 0.0),
        "no 429s by rule: {buckets:?}"
    );
}
