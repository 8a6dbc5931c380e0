//! Arbitrary requests against a policy with every kind of route matcher: matching never
//! panics, and the route chosen is the first whose matcher accepts the request.
#![no_main]

mod compiled;

use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;
use std::sync::OnceLock;
use tollgate::policy::Policy;

const POLICY: &str = r#"version: 1
upstreams:
  app: { servers: ["127.0.0.1:9"] }
routes:
  - { name: exact, match: { path: /api/exact }, upstream: app }
  - { name: regex, match: { path_regex: "^/api/v[0-9]+/items/[^/]+$" }, upstream: app }
  - { name: host, match: { path_prefix: /h, host: "*.example.com" }, upstream: app }
  - { name: header, match: { path_prefix: /, headers: { x-beta: "1" }, methods: [POST] }, upstream: app }
  - { name: prefix, match: { path_prefix: /api/ }, upstream: app }
"#;

fn policy() -> &'static Policy {
    static POLICY_COMPILED: OnceLock<Policy> = OnceLock::new();
    POLICY_COMPILED.get_or_init(|| compiled::compiled(POLICY))
}

fuzz_target!(|data: &[u8]| {
    // method \n target \n host \n x-beta
    let mut parts = data.splitn(4, |&b| b == b'\n');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let Ok(method) = std::str::from_utf8(method) else {
        return;
    };
    let Ok(mut req) = RequestHeader::build(method, target, None) else {
        return;
    };
    if let Some(host) = parts.next() {
        if req.insert_header("host", host).is_err() {
            return;
        }
    }
    if let Some(beta) = parts.next() {
        if req.insert_header("x-beta", beta).is_err() {
            return;
        }
    }
    let policy = policy();
    if let Some(index) = policy.route_for(&req) {
        assert!(index < policy.routes.len());
        // Only `prefix` and later routes may win for a path outside the others' shapes.
        let path = req.uri.path();
        if policy.routes[index].name.as_ref() == "exact" {
            assert_eq!(path, "/api/exact");
        }
        if policy.routes[index].name.as_ref() == "prefix" {
            assert!(path.starts_with("/api/"), "{path}");
        }
    }
});
