//! Hot reload (SPEC §4): by in-place write, editor rename-save, Kubernetes `..data`
//! symlink swap, SIGHUP and `POST /reload`; invalid policies never replace a good one;
//! no request fails while reloading under load.

mod common;

use common::*;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const RELOAD_WITHIN: Duration = Duration::from_secs(2);

fn two_servers() -> (Upstream, Upstream) {
    (upstream("first"), upstream("second"))
}

fn served_by(gw: &Tollgate) -> String {
    let doc: Value = gw.get("/health").json().unwrap();
    doc["server"].as_str().unwrap().to_string()
}

#[test]
fn in_place_write_reloads_and_bumps_the_generation() {
    let (a, b) = two_servers();
    let gw = Tollgate::start(&simple_policy(&[a.addr.to_string()]));
    assert_eq!(gw.generation(), 1);
    assert_eq!(served_by(&gw), "first");
    gw.write_policy(&simple_policy(&[b.addr.to_string()]));
    assert!(wait_for(RELOAD_WITHIN, || gw.generation() == 2));
    assert_eq!(served_by(&gw), "second");
    let events = gw.admin_json("/events");
    assert_eq!(events["events"][0]["kind"], "reload");
    assert_eq!(events["events"][0]["trigger"], "file_change");
    // The event carries the change as data as well as lines.
    let diff = &events["events"][0]["diff"];
    assert_eq!(diff["upstreams"]["changed"], serde_json::json!(["app"]));
    assert_eq!(diff["routes"]["changed"], serde_json::json!([]));
    assert_eq!(
        events["events"][0]["changes"],
        serde_json::json!(["upstream `app` changed"])
    );
    assert_eq!(gw.metric("tollgate_config_generation"), Some(2.0));
    assert_eq!(
        gw.metric("tollgate_config_reloads_total{result=\"success\"}"),
        Some(1.0)
    );
}

#[test]
fn editor_rename_save_reloads() {
    let (a, b) = two_servers();
    let gw = Tollgate::start(&simple_policy(&[a.addr.to_string()]));
    let tmp = gw.dir.path().join(".gateway.yaml.swp");
    std::fs::write(&tmp, gw.policy_text(&simple_policy(&[b.addr.to_string()]))).unwrap();
    std::fs::rename(&tmp, &gw.policy).unwrap();
    assert!(wait_for(RELOAD_WITHIN, || gw.generation() == 2));
    assert_eq!(served_by(&gw), "second");
}

#[test]
fn configmap_symlink_swap_reloads() {
    let (a, b) = two_servers();
    // The layout kubelet writes: gateway.yaml -> ..data/gateway.yaml, ..data -> ..2026_1
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let write_version = |name: &str, body: &str| {
        let version = dir.path().join(name);
        std::fs::create_dir(&version).unwrap();
        std::fs::write(
            version.join("gateway.yaml"),
            format!("{}{body}", head(port, admin, "")),
        )
        .unwrap();
    };
    write_version("..2026_1", &simple_policy(&[a.addr.to_string()]));
    std::os::unix::fs::symlink("..2026_1", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/gateway.yaml", dir.path().join("gateway.yaml")).unwrap();
    let policy = dir.path().join("gateway.yaml");
    let mut gw = Tollgate::spawn(tempfile::tempdir().unwrap(), policy, port, admin, &[]);
    assert!(wait_for(Duration::from_secs(20), || gw
        .admin_get("/healthz")
        .is_ok()));
    assert!(wait_for(Duration::from_secs(5), || gw
        .client
        .get(gw.url("/health"))
        .send()
        .is_ok()));
    assert_eq!(served_by(&gw), "first");

    write_version("..2026_2", &simple_policy(&[b.addr.to_string()]));
    std::os::unix::fs::symlink("..2026_2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    std::fs::remove_dir_all(dir.path().join("..2026_1")).unwrap();
    assert!(wait_for(RELOAD_WITHIN, || gw.generation() == 2));
    assert_eq!(served_by(&gw), "second");
    assert!(gw.wait_exit(Duration::ZERO).is_none());
}

#[test]
fn sighup_reloads() {
    let (a, _) = two_servers();
    let gw = Tollgate::start(&simple_policy(&[a.addr.to_string()]));
    let successes = || {
        gw.metric("tollgate_config_reloads_total{result=\"success\"}")
            .unwrap()
    };
    assert_eq!(successes(), 0.0);
    gw.signal("HUP");
    assert!(wait_for(RELOAD_WITHIN, || successes() == 1.0));
    assert_eq!(gw.generation(), 1, "same content: same generation");
}

#[test]
fn invalid_policy_is_rejected_and_the_old_one_keeps_serving() {
    let (a, b) = two_servers();
    let gw = Tollgate::start(&simple_policy(&[a.addr.to_string()]));
    let failures = || {
        gw.metric("tollgate_config_reloads_total{result=\"failure\"}")
            .unwrap()
    };

    // By the watcher: logged and counted, generation unchanged.
    let broken = simple_policy(&[b.addr.to_string()]).replace("    timeouts:", "    timeuots:");
    gw.write_policy(&broken);
    assert!(wait_for(RELOAD_WITHIN, || failures() == 1.0));
    assert_eq!(gw.generation(), 1);
    assert_eq!(served_by(&gw), "first");
    // The log line may land a moment after the counter moved.
    let logged = wait_for(Duration::from_secs(5), || {
        gw.stdout()
            .iter()
            .any(|l| l.contains("unknown field `timeuots`") && l.contains("gateway.yaml:"))
    });
    assert!(logged, "{:?}", gw.stdout());
    let event = &gw.admin_json("/events")["events"][0];
    assert_eq!(event["kind"], "reload_failed");

    // By the admin API: 400 problem+json listing path:line:column errors.
    let response = gw.admin_post("/reload", None);
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let doc: Value = response.json().unwrap();
    let error = doc["errors"][0].as_str().unwrap();
    assert!(
        error.contains("gateway.yaml:") && error.contains(": unknown field `timeuots`"),
        "{error}"
    );
    let position: Vec<&str> = error
        .split("gateway.yaml:")
        .nth(1)
        .unwrap()
        .splitn(3, ':')
        .collect();
    assert!(
        position[0].parse::<u32>().is_ok() && position[1].parse::<u32>().is_ok(),
        "{error}"
    );
    assert_eq!(failures(), 2.0);

    // A semantic error is refused just the same.
    gw.write_policy(
        &simple_policy(&[b.addr.to_string()]).replace("upstream: app", "upstream: nope"),
    );
    assert!(wait_for(RELOAD_WITHIN, || failures() == 3.0));
    assert_eq!(served_by(&gw), "first");

    // Fixed: the next reload goes through.
    gw.write_policy(&simple_policy(&[b.addr.to_string()]));
    assert!(wait_for(RELOAD_WITHIN, || gw.generation() == 2));
    assert_eq!(served_by(&gw), "second");
}

#[test]
fn admin_reload_and_its_token() {
    let (a, b) = two_servers();
    let gw = Tollgate::start_with(
        &simple_policy(&[a.addr.to_string()]),
        "",
        &[("TEST_ADMIN_TOKEN", "s3cret")],
    );
    gw.write_policy(&simple_policy(&[b.addr.to_string()]));
    assert_eq!(gw.admin_post("/reload", None).status(), 401);
    assert_eq!(gw.admin_post("/reload", Some("wrong")).status(), 401);
    let response = gw.admin_post("/reload", Some("s3cret"));
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().unwrap();
    // The watcher may have got there first; either way generation 2 is in force.
    assert_eq!(doc["generation"], 2);
    assert_eq!(served_by(&gw), "second");
    assert_eq!(
        gw.admin_get("/status").unwrap().status(),
        200,
        "reads need no token"
    );
}

#[test]
fn admin_token_default_is_in_force_when_token_env_is_not_written() {
    let app = upstream("app");
    let gw = Tollgate::start_from(
        |port, admin_port| {
            format!(
                "version: 1\nserver:\n  listen: [\"127.0.0.1:{port}\"]\nadmin:\n  listen: \"127.0.0.1:{admin_port}\"\n{}",
                simple_policy(&[app.addr.to_string()])
            )
        },
        &[("TOLLGATE_ADMIN_TOKEN", "s3cret")],
    );
    assert_eq!(gw.admin_post("/reload", None).status(), 401);
    let purge = gw
        .client
        .post(gw.admin_url("/cache/purge"))
        .json(&serde_json::json!({"all": true}))
        .send()
        .unwrap();
    assert_eq!(purge.status(), 401);
    let shed = gw.admin_put_json("/shedding", &serde_json::json!({"level": null}));
    assert_eq!(shed.status(), 401);
    assert_eq!(gw.admin_post("/reload", Some("s3cret")).status(), 200);
}

#[test]
fn no_request_fails_during_twenty_reloads_under_load() {
    let (a, b) = two_servers();
    let gw = Tollgate::start(&simple_policy(&[a.addr.to_string()]));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed, url) = (
                stop.clone(),
                ok.clone(),
                failed.clone(),
                gw.url("/api/predict"),
            );
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url).send() {
                        Ok(r) if r.status() == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            failures.push(format!("{other:?}"));
                        }
                    }
                }
                failures
            })
        })
        .collect();
    for round in 0..20u64 {
        let server = if round % 2 == 0 { &b } else { &a };
        gw.write_policy(&simple_policy(&[server.addr.to_string()]));
        assert!(
            wait_for(RELOAD_WITHIN, || gw.generation() == round + 2),
            "reload {round} did not land"
        );
        let floor = ok.load(Ordering::Relaxed) + 20;
        assert!(wait_for(Duration::from_secs(5), || ok
            .load(Ordering::Relaxed)
            >= floor));
    }
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) >= 400);
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(a.requests() > 0 && b.requests() > 0);
}
