//! `POST /explain` (SPEC §5): what the pipeline would do with a described request —
//! route, identity, every rate-limit rule with its remaining quota, cache and shedding —
//! computed from the live policy and buckets without consuming quota or sending
//! anything upstream. The decision is the proxy's own (`proxy::admission::admit`),
//! taken with `consume: false`.

use crate::forwarding;
use crate::gateway::Gateway;
use crate::problem::{whole_seconds, Code};
use crate::proxy::admission::{self, Credentials, RequestView, Verdict};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

/// The described request. `client_ip` is the TCP peer: when it is a trusted proxy, the
/// client address comes from `X-Forwarded-For` in `headers`, as for a real request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Described {
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
pub(crate) async fn explain(gateway: &Gateway, body: &[u8]) -> Result<Value, String> {
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
    let peer_trusted = described.client_ip.is_some_and(|ip| policy.is_trusted(ip));
    let client_ip = described
        .client_ip
        .map(|peer| forwarding::client_ip(peer, &req.headers, |ip| policy.is_trusted(ip)));
    let framing = forwarding::normalise(
        &mut req,
        policy.server.allow_underscores_in_headers,
        &policy.server.request_id_header,
    );
    let view = RequestView {
        req: &req,
        framing: framing.map(|_| ()),
        client_ip,
        peer_trusted,
        arrived: Instant::now(),
    };
    let admission = admission::admit(&policy, gateway, &view, false).await;

    let mut report = serde_json::Map::new();
    report.insert("generation".into(), policy.generation.into());
    report.insert(
        "client_ip".into(),
        json!(client_ip.map(|ip| ip.to_string())),
    );
    let Some(route_index) = admission.route else {
        report.insert("route".into(), Value::Null);
        return Ok(decided(report, refusal(&admission.verdict)));
    };
    let route = &policy.routes[route_index];
    let pools: Vec<&str> = route.target.pools().iter().map(|p| &*p.name).collect();
    report.insert(
        "route".into(),
        json!({ "name": &*route.name, "upstreams": pools }),
    );
    let principal = admission.principal.as_deref();
    let default_tier = policy.identity.as_ref().map(|i| &*i.default_tier);
    let identity = match admission.credentials {
        Some(Credentials::Valid) => principal.map_or(
            Value::Null,
            |p| json!({ "user": &*p.user, "tier": &*p.tier, "credentials": "valid" }),
        ),
        Some(Credentials::Invalid(reason)) => json!({
            "user": null, "tier": default_tier, "credentials": "invalid", "reason": reason
        }),
        Some(Credentials::None) => {
            json!({ "user": null, "tier": default_tier, "credentials": "none" })
        }
        Some(Credentials::NotChecked) | None => json!({ "user": null, "credentials": "none" }),
    };
    report.insert("identity".into(), identity);
    if matches!(&admission.verdict, Verdict::Refuse(p) if p.code == Code::Unauthorized) {
        return Ok(decided(report, refusal(&admission.verdict)));
    }

    let load = &gateway.load;
    report.insert(
        "shedding".into(),
        match admission.shed {
            None => json!({ "would_shed": false, "reason": "load shedding is not configured" }),
            Some(shed) => json!({
                "would_shed": shed,
                "level": load.level(),
                "load_ratio": load.ratio(),
                "forced": load.forced().is_some(),
                "priority": route.priority.as_str(),
            }),
        },
    );

    // A shed request never reaches the limits; the rules are still shown, as they
    // stand, with `reached: false`.
    let limits = &policy.rate_limits;
    let scale = gateway.limit_scale();
    let reached = admission.shed != Some(true);
    let outcome = match &admission.limits {
        Some(outcome) => outcome,
        None => {
            &limits
                .decide(
                    &policy.subject(
                        route_index,
                        client_ip,
                        principal,
                        &req.headers,
                        view.arrived,
                    ),
                    scale,
                    false,
                )
                .await
        }
    };
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
                "reset_seconds": whole_seconds(verdict.reset),
                "would_admit": verdict.allowed,
            })
        })
        .collect();
    report.insert(
        "rate_limits".into(),
        json!({ "limit_scale": scale, "reached": reached, "rules": rules }),
    );
    let cache = cache_verdict(gateway, route, &req, principal);
    let from_cache = cache["result"] == "hit";
    report.insert("cache".into(), cache);

    let decision = match &admission.verdict {
        Verdict::Refuse(_) => refusal(&admission.verdict),
        Verdict::Fallback(code) => json!({
            "status": route.fallback.as_ref().map(|f| f.status.as_u16()),
            "fallback": code.as_str(),
        }),
        // As the proxy goes on: a fresh entry answers before the pool's breaker.
        Verdict::Forward if from_cache => json!({ "status": null, "answered_by": "cache" }),
        Verdict::Forward => {
            let open_circuit = route.target.pools().into_iter().find(|p| {
                p.breaker
                    .as_ref()
                    .is_some_and(|b| b.breaker.state() == crate::breaker::State::Open)
            });
            match (open_circuit, &route.fallback) {
                (Some(pool), Some(fallback)) => json!({
                    "status": fallback.status.as_u16(),
                    "fallback": Code::CircuitOpen.as_str(),
                    "upstream": &*pool.name,
                }),
                (Some(pool), None) => json!({
                    "status": Code::CircuitOpen.status(),
                    "error": Code::CircuitOpen.as_str(),
                    "upstream": &*pool.name,
                }),
                (None, _) => json!({ "status": null, "forward_to": pools }),
            }
        }
    };
    Ok(decided(report, decision))
}

/// A refusal as the client would read it: status, error code, detail and the
/// problem's own members (`rule`, `retry_after`).
fn refusal(verdict: &Verdict) -> Value {
    let Verdict::Refuse(problem) = verdict else {
        return Value::Null;
    };
    let mut decision = serde_json::Map::new();
    decision.insert("status".into(), problem.code.status().into());
    decision.insert("error".into(), problem.code.as_str().into());
    decision.insert("detail".into(), problem.detail.clone().into());
    decision.extend(problem.extra.clone());
    Value::Object(decision)
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
