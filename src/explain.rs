//! `POST /explain` (SPEC §5): what the pipeline would do with a described request —
//! route, identity, every rate-limit rule with its remaining quota, cache and shedding —
//! computed from the live policy and buckets without consuming quota or sending
//! anything upstream.

use crate::config::OnInvalid;
use crate::forwarding;
use crate::gateway::Gateway;
use crate::identity::Resolution;
use crate::ratelimit::{self, Subject};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The described request. `client_ip` is the TCP peer: when it is a trusted proxy, the
/// client address comes from `X-Forwarded-For` in `headers`, as for a real request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Described {
    #[serde(default = "default_method")]
    method: String,
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    client_ip: Option<IpAddr>,
}

fn default_method() -> String {
    "GET".into()
}

/// Explains `body` (JSON of [`Described`]); `Err` says what is wrong with the body.
pub async fn explain(gateway: &Gateway, body: &[u8]) -> Result<Value, String> {
    let described: Described =
        serde_json::from_slice(body).map_err(|e| format!("request description: {e}"))?;
    let method = http::Method::from_bytes(described.method.as_bytes())
        .map_err(|_| format!("method `{}` is not a valid HTTP method", described.method))?;
    if !described.path.starts_with('/') {
        return Err(format!("path `{}` must start with /", described.path));
    }
    let mut req = pingora::http::RequestHeader::build(method, described.path.as_bytes(), None)
        .map_err(|e| format!("path `{}`: {e}", described.path))?;
    for (name, value) in &described.headers {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name `{name}` is not valid"))?;
        let value = http::HeaderValue::from_str(value)
            .map_err(|_| format!("header `{name}` has a value that is not valid"))?;
        req.append_header(name, value)
            .map_err(|e| format!("header: {e}"))?;
    }

    if !req.headers.contains_key(http::header::HOST) {
        // A description without a Host is a request to no particular host, not the
        // malformed HTTP/1.1 request it would otherwise be.
        req.set_version(http::Version::HTTP_10);
    }

    let policy = gateway.policy.load_full();
    let mut report = serde_json::Map::new();
    let peer_trusted = described.client_ip.is_some_and(|ip| policy.is_trusted(ip));
    let client_ip = described
        .client_ip
        .map(|peer| forwarding::client_ip(peer, &req.headers, |ip| policy.is_trusted(ip)));
    report.insert("generation".into(), policy.generation.into());
    report.insert(
        "client_ip".into(),
        json!(client_ip.map(|ip| ip.to_string())),
    );

    if let Err(reason) = forwarding::normalise(&mut req, policy.server.allow_underscores_in_headers)
    {
        report.insert("route".into(), Value::Null);
        return Ok(decided(
            report,
            json!({ "status": 400, "error": "bad_request", "detail": reason }),
        ));
    }
    let Some(route_index) = policy.route_for(&req) else {
        report.insert("route".into(), Value::Null);
        return Ok(decided(
            report,
            json!({ "status": 404, "error": "no_route" }),
        ));
    };
    let route = &policy.routes[route_index];
    let pools: Vec<&str> = route.target.pools().iter().map(|p| &*p.name).collect();
    let open_circuit = route.target.pools().into_iter().find(|p| {
        p.breaker
            .as_ref()
            .is_some_and(|b| b.breaker.state() == crate::breaker::State::Open)
    });
    report.insert(
        "route".into(),
        json!({ "name": &*route.name, "upstreams": pools }),
    );

    let mut principal = None;
    let mut refused = None;
    let identity_report = match &policy.identity {
        None => json!({ "user": null, "credentials": "none" }),
        Some(identity) => match identity.resolve(&req.headers, peer_trusted) {
            Resolution::User(p) => {
                let report = json!({ "user": &*p.user, "tier": &*p.tier, "credentials": "valid" });
                principal = Some(p);
                report
            }
            Resolution::Anonymous => {
                json!({ "user": null, "tier": &*identity.default_tier, "credentials": "none" })
            }
            Resolution::Invalid(reason) => {
                if identity.on_invalid != OnInvalid::Anonymous {
                    refused = Some(reason);
                }
                json!({ "user": null, "tier": &*identity.default_tier,
                        "credentials": "invalid", "reason": reason })
            }
        },
    };
    report.insert("identity".into(), identity_report);
    if let Some(reason) = refused {
        return Ok(decided(
            report,
            json!({ "status": 401, "error": "unauthorized", "detail": reason }),
        ));
    }

    let limits = &policy.rate_limits;
    let scale = gateway.limit_scale();
    let subject = Subject::new(
        &policy,
        route_index,
        client_ip,
        principal.as_deref(),
        &req.headers,
    );
    let outcome = limits.decide(&subject, scale, false).await;
    let rules: Vec<Value> = outcome
        .applied
        .iter()
        .map(|(index, quota, verdict)| {
            let rule = &limits.rules[*index];
            json!({
                "rule": &*rule.name,
                "shadow": rule.shadow,
                "quota": quota.count,
                "window_seconds": quota.window.as_secs(),
                "remaining": verdict.remaining,
                "reset_seconds": ratelimit::whole_seconds(verdict.reset),
                "would_admit": verdict.allowed,
            })
        })
        .collect();
    report.insert(
        "rate_limits".into(),
        json!({ "limit_scale": scale, "rules": rules }),
    );
    report.insert(
        "cache".into(),
        cache_verdict(gateway, route, &req, principal.as_deref()),
    );
    let load = &gateway.load;
    let shed = policy
        .shedding
        .as_ref()
        .and_then(|s| crate::shed::shed_level(load, s, route.priority).map(|_| s));
    report.insert(
        "shedding".into(),
        match &policy.shedding {
            None => json!({ "would_shed": false, "reason": "load shedding is not configured" }),
            Some(_) => json!({
                "would_shed": shed.is_some(),
                "level": load.level(),
                "load_ratio": load.ratio(),
                "forced": load.forced().is_some(),
                "priority": route.priority.as_str(),
            }),
        },
    );
    if let Some(shedding) = shed {
        let decision = match &route.fallback {
            Some(fallback) => {
                json!({ "status": fallback.status.as_u16(), "fallback": "overloaded" })
            }
            None => json!({
                "status": 503,
                "error": "overloaded",
                "retry_after": ratelimit::retry_after_secs(shedding.retry_after),
            }),
        };
        return Ok(decided(report, decision));
    }
    let decision = match outcome.denied {
        Some(index) => {
            let wait = outcome
                .applied
                .last()
                .map_or(std::time::Duration::ZERO, |(_, _, v)| v.retry_after);
            json!({
                "status": 429,
                "error": "rate_limited",
                "rule": &*limits.rules[index].name,
                "retry_after": ratelimit::retry_after_secs(wait),
            })
        }
        None => match (open_circuit, &route.fallback) {
            (Some(pool), Some(fallback)) => json!({
                "status": fallback.status.as_u16(),
                "fallback": "circuit_open",
                "upstream": &*pool.name,
            }),
            (Some(pool), None) => json!({
                "status": 503,
                "error": "circuit_open",
                "upstream": &*pool.name,
            }),
            (None, _) => json!({ "status": null, "forward_to": pools }),
        },
    };
    Ok(decided(report, decision))
}

fn decided(mut report: serde_json::Map<String, Value>, decision: Value) -> Value {
    report.insert("decision".into(), decision);
    Value::Object(report)
}

/// Whether the cache would answer: `hit` (fresh entry, with its age), `stale` (within
/// its stale-while-revalidate window), `miss`, or why the request bypasses it.
fn cache_verdict(
    gateway: &Gateway,
    route: &crate::policy::Route,
    req: &pingora::http::RequestHeader,
    principal: Option<&crate::identity::Principal>,
) -> Value {
    let Some(cache) = &route.cache else {
        return json!({ "would_use": false, "reason": format!("route `{}` does not cache", route.name) });
    };
    if let Some(reason) = crate::cache::request_bypass(cache, req) {
        return json!({ "would_use": false, "result": "bypass", "reason": reason });
    }
    let user = principal.map(|p| &*p.user);
    let key = crate::cache::key(cache, &route.name, req, false, user);
    match gateway.cache.peek(key, req) {
        None => json!({ "would_use": true, "result": "miss" }),
        Some(meta) => {
            let now = std::time::SystemTime::now();
            let result = if meta.is_fresh(now) && !crate::cache::request_wants_revalidation(req) {
                "hit"
            } else if meta.serve_stale_while_revalidate(now) {
                "stale"
            } else {
                "miss"
            };
            json!({ "would_use": true, "result": result, "age_seconds": meta.age().as_secs() })
        }
    }
}
