//! Passive outlier ejection (SPEC §3 `outlier`, §4): consecutive failures take a server
//! out for `eject_for`, never more than `max_ejected` of the pool; backups serve only
//! when the primaries are out.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn start(servers: &str, outlier: &str) -> Tollgate {
    Tollgate::start(&format!(
        "upstreams:\n  app:\n    servers: [{servers}]\n    outlier: {{ {outlier} }}\nroutes:\n  - name: all\n    upstream: app\n"
    ))
}

fn send(gw: &Tollgate, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| gw.get("/health").status().as_u16())
        .collect()
}

#[test]
fn a_failing_server_is_ejected_for_a_while_then_returns() {
    let (a, b) = (upstream("a"), upstream("b"));
    let gw = start(
        &format!("\"{}\", \"{}\"", a.addr, b.addr),
        "consecutive_failures: 2, eject_for: 1s, max_ejected: 50%",
    );
    a.knobs.force_status.store(503, Ordering::Relaxed);
    // Round robin: a fails on its first two turns, then it is out.
    let statuses = send(&gw, 4);
    assert_eq!(
        statuses.iter().filter(|&&s| s == 503).count(),
        2,
        "{statuses:?}"
    );
    let ejected_at = Instant::now();
    assert_eq!(a.requests(), 2);
    assert_eq!(send(&gw, 10), [200; 10]);
    assert_eq!(a.requests(), 2, "an ejected server got traffic");
    let status = gw.admin_json("/status");
    let servers = status["upstreams"]["app"]["servers"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(servers[0]["ejected"], true);
    assert_eq!(servers[1]["ejected"], false);
    let events = gw.admin_json("/events");
    assert_eq!(events["events"][0]["kind"], "outlier_ejection");
    assert_eq!(events["events"][0]["server"], a.addr.to_string());

    a.knobs.force_status.store(0, Ordering::Relaxed);
    assert!(wait_for(Duration::from_secs(3), || ejected_at.elapsed()
        >= Duration::from_millis(1_050)));
    send(&gw, 4);
    assert!(a.requests() > 2, "the server did not come back");
}

#[test]
fn never_more_than_max_ejected_of_the_pool() {
    let (a, b) = (upstream("a"), upstream("b"));
    let gw = start(
        &format!("\"{}\", \"{}\"", a.addr, b.addr),
        "consecutive_failures: 1, eject_for: 1m, max_ejected: 50%",
    );
    a.knobs.force_status.store(503, Ordering::Relaxed);
    b.knobs.force_status.store(503, Ordering::Relaxed);
    send(&gw, 6);
    let servers = gw.admin_json("/status")["upstreams"]["app"]["servers"].clone();
    let ejected = servers
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["ejected"] == true)
        .count();
    assert_eq!(ejected, 1, "{servers}");
    // The one left keeps taking every request.
    let (before_a, before_b) = (a.requests(), b.requests());
    send(&gw, 4);
    assert_eq!(a.requests() + b.requests() - before_a - before_b, 4);
}

#[test]
fn backups_serve_only_while_the_primaries_are_out() {
    let (primary, backup) = (upstream("primary"), upstream("backup"));
    let gw = start(
        &format!(
            "\"{}\", {{ addr: \"{}\", backup: true }}",
            primary.addr, backup.addr
        ),
        "consecutive_failures: 2, eject_for: 1s, max_ejected: 50%",
    );
    assert_eq!(send(&gw, 3), [200; 3]);
    assert_eq!(backup.requests(), 0);
    primary.knobs.force_status.store(502, Ordering::Relaxed);
    assert_eq!(send(&gw, 2), [502, 502]);
    let ejected_at = Instant::now();
    primary.knobs.force_status.store(0, Ordering::Relaxed);
    assert_eq!(send(&gw, 5), [200; 5]);
    assert_eq!(
        backup.requests(),
        5,
        "the backup takes over while the primary is out"
    );
    assert!(wait_for(Duration::from_secs(3), || ejected_at.elapsed()
        >= Duration::from_millis(1_050)));
    let before = backup.requests();
    assert_eq!(send(&gw, 3), [200; 3]);
    assert_eq!(backup.requests(), before, "the primary is back");
}

#[test]
fn panic_mode_tries_an_ejected_server_rather_than_refusing() {
    let a = upstream("a");
    let gw = start(
        &format!("\"{}\"", a.addr),
        "consecutive_failures: 1, eject_for: 1m",
    );
    a.knobs.force_status.store(503, Ordering::Relaxed);
    assert_eq!(send(&gw, 1), [503]);
    assert_eq!(
        gw.admin_json("/status")["upstreams"]["app"]["servers"][0]["ejected"],
        true
    );
    a.knobs.force_status.store(0, Ordering::Relaxed);
    assert_eq!(send(&gw, 2), [200, 200]);
}
