//! One JSON line per request on stdout (SPEC §3 `access_log`), field names after
//! Envoy's JSON access log. Written directly rather than through a tracing formatter
//! so the line is plain JSON whatever `TOLLGATE_LOG_FORMAT` says; `TOLLGATE_LOG`
//! still governs it through the `access` target (`TOLLGATE_LOG=info,access=off`).

use crate::proxy::RequestCtx;
use pingora::proxy::Session;
use serde_json::{Map, Value};
use std::io::Write;
use std::time::{Duration, SystemTime};

pub fn write(session: &Session, ctx: &RequestCtx, status: u16, elapsed: Duration) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    let req = session.req_header();
    let redact = &ctx.policy.access_log.redact;
    let mut headers = Map::new();
    for (name, value) in &req.headers {
        let shown = if redact.contains(name) {
            Value::from("[redacted]")
        } else {
            Value::from(String::from_utf8_lossy(value.as_bytes()))
        };
        headers.insert(name.as_str().to_string(), shown);
    }
    let route = ctx.route();
    let upstream_addr = match (&ctx.pool, ctx.server) {
        (Some(pool), Some(i)) => Value::from(&*pool.servers[i].label),
        _ => Value::Null,
    };
    let reason = match (&ctx.limited_by, ctx.answered, ctx.cache_outcome) {
        (Some(rule), _, _) => Some(format!("rate_limited:{rule}")),
        (None, Some(code), _) => Some(code.as_str().to_string()),
        (None, None, Some(crate::cache::Outcome::Hit)) => Some("cache_hit".to_string()),
        (None, None, Some(crate::cache::Outcome::Stale)) => Some("cache_stale".to_string()),
        (None, None, _) => None,
    };
    let line = serde_json::json!({
        "timestamp": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "type": "access",
        "request_id": ctx.request_id.as_ref().and_then(|v| v.to_str().ok()),
        "client_ip": ctx.client_ip.map(|ip| ip.to_string()),
        "method": req.method.as_str(),
        "authority": crate::routing::request_host(req),
        "path": req.uri.path(),
        "protocol": format!("{:?}", req.version),
        "status": status,
        "route": route.map(|r| &*r.name),
        "upstream": ctx.pool.as_ref().map(|p| &*p.name),
        "upstream_addr": upstream_addr,
        "user": ctx.principal.as_ref().map(|p| &*p.user),
        "tier": ctx.principal.as_ref().map(|p| &*p.tier),
        "reason": reason,
        "cache": ctx.cache_outcome.map(|o| o.header()),
        "shadow_limited": ctx.shadow_limited.iter().map(|r| &**r).collect::<Vec<_>>(),
        "bytes_received": session.body_bytes_read(),
        "bytes_sent": session.body_bytes_sent(),
        "duration_ms": elapsed.as_secs_f64() * 1000.0,
        "upstream_duration_ms": ctx.upstream_duration.map(|d| d.as_secs_f64() * 1000.0),
        "request_headers": headers,
    });
    let mut buf = serde_json::to_vec(&line).expect("JSON of plain values");
    buf.push(b'\n');
    let _ = std::io::stdout().lock().write_all(&buf);
}
