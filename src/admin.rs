//! The admin API (SPEC §5) on its own listener: the dashboard, probes, metrics, status,
//! reload, events, SLO reports, explain and forced shedding. Never served on the public
//! port.

use crate::gateway::reload::{self, ReloadResult, Trigger};
use crate::gateway::{unix_now, Gateway};
use crate::problem::Code;
use crate::reply::{read_body, Reply};
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The largest request body an admin call reads.
const MAX_BODY: usize = 64 * 1024;

pub(crate) struct Admin {
    pub(crate) gateway: Arc<Gateway>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        self.route(session).await.into_response()
    }
}

impl Admin {
    async fn route(&self, session: &mut ServerSession) -> Reply {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let mutating = matches!(
            method,
            Method::POST | Method::PUT | Method::DELETE | Method::PATCH
        );
        if mutating && !self.authorized(session) {
            return Reply::problem(
                Code::Unauthorized,
                "this admin call needs Authorization: Bearer <token>",
                Value::Null,
            );
        }
        match (method, path.as_str()) {
            (Method::GET, "/") => Reply {
                status: StatusCode::OK,
                content_type: "text/html; charset=utf-8",
                body: DASHBOARD.as_bytes().to_vec(),
            },
            (Method::GET, "/healthz" | "/livez") => Reply::text(StatusCode::OK, "ok\n"),
            (Method::GET, "/readyz") => self.readiness(),
            (Method::GET, "/metrics") => {
                let metrics = &self.gateway.metrics;
                let (entries, bytes) = self.gateway.cache.usage();
                metrics.cache_entries.set(entries as i64);
                metrics.cache_bytes.set(bytes as i64);
                Reply {
                    status: StatusCode::OK,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: metrics.encode(),
                }
            }
            (Method::GET, "/status") => Reply::json(StatusCode::OK, &self.status()),
            (Method::GET, "/events") => Reply::json(
                StatusCode::OK,
                &json!({ "events": self.gateway.events.snapshot() }),
            ),
            (Method::GET, "/slo") => Reply::json(StatusCode::OK, &self.slo()),
            (Method::GET, "/history") => Reply::json(
                StatusCode::OK,
                &json!({
                    "interval_seconds": crate::history::INTERVAL.as_secs(),
                    "buckets": self.gateway.history.buckets(),
                }),
            ),
            (Method::POST, "/reload") => self.reload().await,
            (Method::POST, "/explain") => self.explain(session).await,
            (Method::PUT, "/shedding") => self.force_shedding(session).await,
            (Method::POST, "/cache/purge") => self.purge(session).await,
            (
                _,
                "/healthz" | "/livez" | "/readyz" | "/metrics" | "/status" | "/events" | "/slo"
                | "/reload" | "/explain" | "/shedding" | "/cache/purge",
            ) => Reply::problem(
                Code::MethodNotAllowed,
                "this endpoint does not take that method",
                Value::Null,
            ),
            _ => Reply::problem(Code::NotFound, "no such admin endpoint", Value::Null),
        }
    }

    /// `PUT /shedding`: `{"level": N, "for": "10m"}` forces a level until it expires;
    /// `{"level": null}` returns to automatic.
    async fn force_shedding(&self, session: &mut ServerSession) -> Reply {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Force {
            level: Option<u8>,
            #[serde(rename = "for", default)]
            duration: Option<String>,
        }
        let body = match read_body(session, MAX_BODY).await {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let bad = |detail: String| Reply::problem(Code::BadRequest, detail, Value::Null);
        let force: Force = match serde_json::from_slice(&body) {
            Ok(force) => force,
            Err(e) => return bad(format!("expected {{\"level\": N, \"for\": \"10m\"}}: {e}")),
        };
        let policy = self.gateway.policy.load();
        let levels = policy.shedding.as_ref().map_or(0, |s| s.levels.len());
        match force.level {
            None => crate::gateway::load_monitor::force(&self.gateway, None),
            Some(level) if usize::from(level) > levels => {
                return bad(format!(
                    "level {level} does not exist: the policy defines {levels} shedding level(s)"
                ))
            }
            Some(level) => {
                let text = force.duration.as_deref().unwrap_or("10m");
                let duration = match crate::units::Duration::parse(text) {
                    Ok(d) if !d.0.is_zero() => d.0,
                    _ => return bad(format!("`for`: `{text}` is not a duration such as \"10m\"")),
                };
                crate::gateway::load_monitor::force(&self.gateway, Some((level, duration)));
            }
        }
        let forced = self.gateway.load.forced();
        self.gateway.events.record(
            "shedding_forced",
            &match forced {
                Some((level, _)) => format!("shedding level {level} forced"),
                None => "shedding back to automatic".to_string(),
            },
            json!({ "level": forced.map(|(l, _)| l) }),
        );
        Reply::json(
            StatusCode::OK,
            &json!({
                "forced": forced.is_some(),
                "level": forced.map(|(l, _)| l),
                "for_seconds": forced.map(|(_, until)| until.saturating_duration_since(std::time::Instant::now()).as_secs()),
                // A forced level is in force already; automatic resumes at the next tick.
                "takes_effect_within_ms": if forced.is_some() { 0 } else { crate::shed::TICK.as_millis() as u64 },
            }),
        )
    }

    /// `POST /cache/purge`: `{"path": "/x"}`, `{"prefix": "/api/"}`, `{"tag": "t"}` or
    /// `{"all": true}`; answers how many entries went.
    async fn purge(&self, session: &mut ServerSession) -> Reply {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Purge {
            path: Option<String>,
            prefix: Option<String>,
            tag: Option<String>,
            #[serde(default)]
            all: bool,
        }
        let body = match read_body(session, MAX_BODY).await {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let usage = "expected one of {\"path\": \"/x\"}, {\"prefix\": \"/api/\"}, {\"tag\": \"t\"}, {\"all\": true}";
        let bad = |detail: String| Reply::problem(Code::BadRequest, detail, Value::Null);
        let purge: Purge = match serde_json::from_slice(&body) {
            Ok(purge) => purge,
            Err(e) => return bad(format!("{usage}: {e}")),
        };
        let selector = match purge {
            Purge {
                path: Some(path),
                prefix: None,
                tag: None,
                all: false,
            } if path.starts_with('/') => crate::cache::Selector::Path(path),
            Purge {
                path: None,
                prefix: Some(prefix),
                tag: None,
                all: false,
            } if prefix.starts_with('/') => crate::cache::Selector::Prefix(prefix),
            Purge {
                path: None,
                prefix: None,
                tag: Some(tag),
                all: false,
            } if !tag.is_empty() => crate::cache::Selector::Tag(tag),
            Purge {
                path: None,
                prefix: None,
                tag: None,
                all: true,
            } => crate::cache::Selector::All,
            _ => return bad(format!("{usage} (paths and prefixes start with /)")),
        };
        let purged = self.gateway.cache.purge(&selector).await;
        self.gateway.events.record(
            "cache_purge",
            &format!("{purged} cache entries purged ({selector:?})"),
            json!({ "purged": purged }),
        );
        Reply::json(StatusCode::OK, &json!({ "purged": purged }))
    }

    async fn explain(&self, session: &mut ServerSession) -> Reply {
        let body = match read_body(session, MAX_BODY).await {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        match crate::explain::explain(&self.gateway, &body).await {
            Ok(report) => Reply::json(StatusCode::OK, &report),
            Err(detail) => Reply::problem(Code::BadRequest, detail, Value::Null),
        }
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let policy = self.gateway.policy.load();
        let Some(token) = &policy.admin.token else {
            return true;
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        constant_time_eq(presented.as_bytes(), token.as_bytes())
    }

    fn readiness(&self) -> Reply {
        if self.gateway.is_draining() {
            return Reply::text(StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down\n");
        }
        let policy = self.gateway.policy.load();
        let used: std::collections::BTreeSet<String> = policy
            .routes
            .iter()
            .flat_map(|r| r.target.pools().into_iter().map(|p| p.name.to_string()))
            .collect();
        let down: Vec<String> = used
            .into_iter()
            .filter(|name| {
                let pool = &policy.upstreams[name];
                !(0..pool.servers.len()).any(|i| pool.is_healthy(i))
            })
            .collect();
        if !down.is_empty() {
            return Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "not ready: no healthy server in upstream {}\n",
                    down.join(", ")
                ),
            );
        }
        Reply::text(
            StatusCode::OK,
            &format!("ready: generation {}\n", policy.generation),
        )
    }

    fn status(&self) -> Value {
        let policy = self.gateway.policy.load_full();
        let (cache_entries, cache_bytes) = self.gateway.cache.usage();
        let upstreams: serde_json::Map<String, Value> = policy
            .upstreams
            .iter()
            .map(|(name, pool)| {
                let now = crate::clock::millis();
                let servers: Vec<Value> = pool
                    .servers
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        json!({
                            "addr": &*s.label,
                            "weight": s.weight,
                            "backup": s.backup,
                            "healthy": pool.is_healthy(i),
                            "ejected": pool.is_ejected(i, now),
                            "inflight": s.state.inflight.load(Ordering::Relaxed),
                        })
                    })
                    .collect();
                (
                    name.clone(),
                    json!({
                        "balance": format!("{:?}", pool.balance),
                        // A pool without a breaker never opens.
                        "breaker": pool.breaker.as_ref().map_or("closed", |b| b.breaker.state().as_str()),
                        "bulkhead": pool.bulkhead.as_ref().map(|b| json!({
                            "max_concurrent": b.max_concurrent,
                            "inflight": b.inflight(),
                            "queue_max": b.queue_max,
                            "waiting": b.waiting(),
                        })),
                        "servers": servers,
                    }),
                )
            })
            .collect();
        let routes: Vec<Value> = policy
            .routes
            .iter()
            .map(|r| {
                let pools: Vec<&str> = r.target.pools().iter().map(|p| &*p.name).collect();
                json!({ "name": &*r.name, "upstreams": pools, "priority": r.priority.as_str() })
            })
            .collect();
        let rate_limits: serde_json::Map<String, Value> = policy
            .rate_limits
            .rules
            .iter()
            .map(|r| {
                (
                    r.name.to_string(),
                    json!({ "keys": r.store.len(), "shadow": r.shadow }),
                )
            })
            .collect();
        let load = &self.gateway.load;
        let signals = load.signals();
        let forced = load.forced();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "load": {
                "ratio": load.ratio(),
                "level": load.level(),
                "levels": policy.shedding.as_ref().map_or(0, |s| s.levels.len()),
                "forced": forced.is_some(),
                "forced_for_seconds": forced.map(|(_, until)| until.saturating_duration_since(std::time::Instant::now()).as_secs()),
                "signals": {
                    "inflight": signals.inflight,
                    "latency": signals.latency,
                    "cpu": signals.cpu,
                },
                "shedding_configured": policy.shedding.is_some(),
            },
            "rate_limits": rate_limits,
            "limit_scale": self.gateway.limit_scale(),
            "generation": policy.generation,
            "sha256": policy.sha256,
            "loaded_at": humantime::format_rfc3339_seconds(policy.loaded_at).to_string(),
            "policy_file": policy.source.display().to_string(),
            "inflight": self.gateway.inflight(),
            "draining": self.gateway.is_draining(),
            "access_log": {
                "enabled": policy.access_log.enabled,
                "dropped": self.gateway.access_log.dropped(),
            },
            "routes": routes,
            "upstreams": upstreams,
            "cache": {
                "entries": cache_entries,
                "bytes": cache_bytes,
                "hit_ratio": self.gateway.cache.hit_ratio(),
                "max_size": policy.cache.max_size,
                "max_entries": policy.cache.max_entries,
            },
        })
    }

    fn slo(&self) -> Value {
        let policy = self.gateway.policy.load_full();
        let minute = unix_now() / 60;
        let routes: serde_json::Map<String, Value> = policy
            .routes
            .iter()
            .filter_map(|r| {
                let (targets, tracker) = r.slo.as_ref()?;
                Some((r.name.to_string(), tracker.report(minute, targets)))
            })
            .collect();
        json!({ "routes": routes })
    }

    async fn reload(&self) -> Reply {
        let gateway = self.gateway.clone();
        let outcome =
            tokio::task::spawn_blocking(move || reload::reload(&gateway, Trigger::Admin)).await;
        match outcome {
            Ok(Ok(ReloadResult::Reloaded {
                generation,
                changes,
            })) => Reply::json(
                StatusCode::OK,
                &json!({ "generation": generation, "changed": true, "changes": changes }),
            ),
            Ok(Ok(ReloadResult::Unchanged { generation })) => Reply::json(
                StatusCode::OK,
                &json!({ "generation": generation, "changed": false, "changes": [] }),
            ),
            Ok(Ok(ReloadResult::NotAttempted)) => {
                unreachable!("only file-change reloads can be skipped")
            }
            Ok(Err(errors)) => {
                let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                Reply::problem(
                    Code::InvalidPolicy,
                    "the new policy is invalid; the previous one keeps serving",
                    json!({ "errors": errors, "generation": self.gateway.policy.load().generation }),
                )
            }
            Err(e) => Reply::problem(
                Code::Internal,
                format!("reload task failed: {e}"),
                Value::Null,
            ),
        }
    }
}

/// The live dashboard: one self-contained page (no external assets) polling `/status`.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Compares without an early exit, so response timing does not reveal how much of a
/// guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
