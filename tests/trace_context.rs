//! W3C Trace Context through the real binary (SPEC §9): the upstream receives the
//! gateway's `traceparent` — the client's trace continued with a new parent id, or a new
//! trace — and `tracestate` only with a continued trace; the access log carries
//! `trace_id`.

mod common;

use common::*;
use std::time::Duration;

const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "0".repeat(32)
        && parts[2] != "0".repeat(16)
}

#[test]
fn traceparent_is_continued_or_started_and_logged() {
    let origin = Origin::recording();
    let gw = Tollgate::start(&simple_policy(&[origin.addr.to_string()]));
    let send = |fields: &[(&str, &str)]| {
        let mut request = gw.client.get(gw.url("/api/x"));
        for (name, value) in fields {
            request = request.header(*name, *value);
        }
        assert_eq!(request.send().unwrap().status(), 200);
    };
    send(&[("traceparent", CLIENT), ("tracestate", "congo=t61rcWkgMzE")]);
    send(&[]);
    send(&[
        (
            "traceparent",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ),
        ("tracestate", "congo=t61rcWkgMzE"),
    ]);
    let seen = origin.seen();
    assert_eq!(seen.len(), 3);
    let traceparent = |i: usize| {
        seen[i]
            .field("traceparent")
            .expect("a traceparent upstream")
    };

    // Continued: same trace and flags, the gateway's span as the parent, state kept.
    let continued = traceparent(0);
    assert!(is_traceparent(&continued), "{continued}");
    assert!(continued.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert!(!continued.contains("00f067aa0ba902b7"));
    assert!(continued.ends_with("-01"));
    assert_eq!(seen[0].fields("traceparent").len(), 1);
    assert_eq!(
        seen[0].field("tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );

    // Started: absent, or invalid (uppercase hex), which also drops the state.
    for i in [1, 2] {
        let started = traceparent(i);
        assert!(is_traceparent(&started), "{started}");
        assert!(
            !started.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
            "{started}"
        );
        assert!(!started.contains("4BF92F"), "{started}");
        assert_eq!(seen[i].field("tracestate"), None);
    }
    assert_ne!(traceparent(1)[3..35], traceparent(2)[3..35]);

    // The access log names each request's trace.
    assert!(wait_for(Duration::from_secs(5), || gw.access_log().len() >= 3));
    let logged: Vec<String> = gw
        .access_log()
        .iter()
        .map(|line| line["trace_id"].as_str().unwrap().to_string())
        .collect();
    let sent: Vec<String> = (0..3).map(|i| traceparent(i)[3..35].to_string()).collect();
    assert_eq!(logged, sent);
}
