//! Arbitrary response and request header fields (Cache-Control, Expires, Date, Age,
//! Vary, Pragma, ...) through the cache's RFC 9111 rules: never a panic, and nothing
//! the origin marked `no-store` or `private` is ever stored (unless an RFC 9213 targeted
//! field overrules Cache-Control), and a 304 update of what was stored never panics.
#![no_main]

mod compiled;

use libfuzzer_sys::fuzz_target;
use pingora::cache::RespCacheable;
use pingora::http::{RequestHeader, ResponseHeader};
use std::sync::OnceLock;
use tollgate::policy::Policy;

const POLICY: &str = r#"version: 1
upstreams:
  app: { servers: ["127.0.0.1:9"] }
routes:
  - { name: cached, upstream: app, cache: { ttl: 5m, stale_if_error: 1m } }
"#;

fn policy() -> &'static Policy {
    static POLICY_COMPILED: OnceLock<Policy> = OnceLock::new();
    POLICY_COMPILED.get_or_init(|| compiled::compiled(POLICY))
}

const NAMES: [&str; 10] = [
    "cache-control",
    "cdn-cache-control",
    "tollgate-cache-control",
    "expires",
    "date",
    "age",
    "vary",
    "pragma",
    "set-cookie",
    "last-modified",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let rc = policy().routes[0].cache.as_ref().expect("a caching route");
    let mut resp = ResponseHeader::build(200, None).unwrap();
    let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
    for (i, value) in rest.split(|&b| b == b'\n').enumerate() {
        let name = NAMES[(usize::from(selector) + i) % NAMES.len()];
        let _ = resp.append_header(name, value);
        let _ = req.append_header(name, value);
    }
    let authorized = selector & 0x80 != 0;
    let outcome = tollgate::cache::cacheability(rc, &resp, authorized);
    let _ = tollgate::cache::request_bypass(rc, &req);
    let _ = tollgate::cache::request_wants_revalidation(&req);
    if let RespCacheable::Cacheable(meta) = &outcome {
        let said = |directive: &str| {
            resp.headers.get_all("cache-control").iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|d| d.trim().eq_ignore_ascii_case(directive))
                })
            })
        };
        // A targeted field (RFC 9213) may overrule Cache-Control; without one it rules.
        let targeted = ["cdn-cache-control", "tollgate-cache-control"]
            .iter()
            .any(|name| resp.headers.contains_key(*name));
        if !targeted {
            assert!(!said("no-store"), "stored a no-store response");
            assert!(!said("private"), "stored a private response");
        }
        let _ = tollgate::cache::update_stored(meta.response_header(), &resp);
        let _ = tollgate::cache::variance(meta, &req);
    }
});
