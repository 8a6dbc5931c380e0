//! One upstream attempt's bookkeeping: the pool's breaker and bulkhead before it goes
//! out, the verdict on its outcome (breaker, outlier ejection) as soon as it is known,
//! and whether a failed attempt is tried again.

use super::ctx::RequestCtx;
use super::Proxy;
use crate::breaker;
use crate::bulkhead;
use crate::problem::{Code, Problem};
use crate::upstream::Pool;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::borrow::Cow;
use std::time::Instant;

/// Closes the current attempt's span, if one is open, with its outcome.
pub(super) fn end_span(ctx: &mut RequestCtx, outcome: Cow<'static, str>) {
    if let Some(span) = ctx.attempt.spans.last_mut().filter(|s| s.end.is_none()) {
        span.end = Some((Instant::now(), outcome));
    }
}

impl Proxy {
    /// Judges the upstream outcome once, as soon as it is known (the response header,
    /// or the error), before the client sees it: the breaker and outlier state are
    /// then current for the client's next request.
    pub(super) fn settle(&self, ctx: &mut RequestCtx, error: Option<&Error>) {
        if std::mem::replace(&mut ctx.attempt.settled, true) {
            return;
        }
        if !ctx.attempt.spans.is_empty() {
            let outcome = match (ctx.attempt.status, error) {
                (Some(status), _) => Cow::Owned(status.to_string()),
                (None, Some(e)) => Cow::Borrowed(e.etype().as_str()),
                (None, None) => Cow::Borrowed("no answer"),
            };
            end_span(ctx, outcome);
        }
        let Some(pool) = ctx.attempt.pool.clone() else {
            return;
        };
        let failure = attempt_failure(&pool.failure_on, ctx.attempt.status, error);
        if let (Some(ticket), Some(failure)) = (ctx.attempt.breaker_ticket.take(), failure) {
            ticket.record(failure);
        }
        if let (Some(server), Some(failure)) = (ctx.attempt.server, failure) {
            self.record_attempt(&pool, server, failure);
        }
    }

    /// Decides whether the failed attempt is tried again (SPEC §4: listed methods or an
    /// Idempotency-Key, attempts and budget left, nothing sent to the client yet, a body
    /// that can be replayed, time left) and if so readies the next attempt.
    pub(super) fn prepare_retry(&self, session: &Session, ctx: &mut RequestCtx) -> bool {
        let Some(pool) = ctx.attempt.pool.clone() else {
            return false;
        };
        let Some(retry) = &pool.retry else {
            return false;
        };
        let req = session.req_header();
        let allowed = ctx.attempt.retries < retry.attempts
            && session.response_written().is_none()
            && !session.as_ref().retry_buffer_truncated()
            && retry.eligible(&req.method, &req.headers)
            && ctx.remaining().is_none_or(|r| !r.is_zero())
            && retry.take_retry();
        if allowed {
            ctx.attempt.retries += 1;
            ctx.attempt.retry_backoff = Some(retry.backoff(ctx.attempt.retries));
            if let Some(failed) = ctx.attempt.server.take() {
                ctx.attempt.failed_servers.push(failed);
            }
            ctx.attempt.server_inflight = None;
            ctx.attempt.status = None;
            ctx.attempt.settled = false;
        }
        allowed
    }

    /// Counts an attempt against its server; an ejection is logged and recorded.
    pub(super) fn record_attempt(&self, pool: &Pool, server: usize, failure: bool) {
        if let Some(eject_for) = pool.record_attempt(server, failure) {
            let addr = &*pool.servers[server].label;
            tracing::warn!(upstream = %pool.name, server = addr, eject_for_secs = eject_for.as_secs(), "outlier ejected");
            self.gateway.events.record(
                "outlier_ejection",
                &format!("server {addr} of upstream `{}` ejected", pool.name),
                serde_json::json!({ "upstream": &*pool.name, "server": addr, "eject_for_secs": eject_for.as_secs() }),
            );
        }
    }

    /// The pool's circuit breaker and bulkhead; `Ok(true)` when the request was
    /// answered here instead of going upstream.
    pub(super) async fn admit_upstream(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        let Some(pool) = ctx.attempt.pool.clone() else {
            return Ok(false);
        };
        if let Some(guard) = &pool.breaker {
            match guard.breaker.admit() {
                Ok(ticket) => ctx.attempt.breaker_ticket = Some(ticket),
                Err(rejected) => return self.circuit_open(session, ctx, rejected).await,
            }
        }
        if let Some(bulkhead) = &pool.bulkhead {
            match bulkhead.enter().await {
                Ok(slot) => ctx.attempt.bulkhead_slot = Some(slot),
                Err(full) => {
                    let detail = match full {
                        bulkhead::Full::QueueFull => format!(
                            "upstream `{}` has {} requests in flight and {} waiting",
                            pool.name, bulkhead.max_concurrent, bulkhead.queue_max
                        ),
                        bulkhead::Full::QueueTimeout => format!(
                            "no slot to upstream `{}` freed up within {:?}",
                            pool.name, bulkhead.queue_timeout
                        ),
                    };
                    let mut problem = Problem::new(Code::BulkheadFull, detail);
                    problem.headers.push((
                        http::header::RETRY_AFTER,
                        http::HeaderValue::from_static("1"),
                    ));
                    return self.answer(session, ctx, problem).await;
                }
            }
        }
        if let Some(retry) = &pool.retry {
            retry.count_request();
        }

        Ok(false)
    }

    /// The pool's circuit is open: the route's fallback, else 503 `circuit_open`.
    pub(super) async fn circuit_open(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        rejected: breaker::Rejected,
    ) -> Result<bool> {
        let policy = ctx.policy.clone();
        let route = ctx.route.map(|i| &policy.routes[i]);
        if let Some(fallback) = route.and_then(|r| r.fallback.as_ref()) {
            return self
                .fallback(session, ctx, fallback, Code::CircuitOpen)
                .await;
        }
        let pool = ctx.attempt.pool.as_ref().map_or("", |p| &*p.name);
        let problem = Problem::new(
            Code::CircuitOpen,
            format!("upstream `{pool}` is failing; its circuit is open"),
        )
        .retry_after(rejected.retry_after);
        self.answer(session, ctx, problem).await
    }
}

/// Whether an upstream outcome is a failure for the pool's breaker and outlier
/// ejection; `None` when the upstream was never tried or the client went away first.
pub(super) fn attempt_failure(
    failure_on: &breaker::FailureOn,
    upstream_status: Option<u16>,
    error: Option<&Error>,
) -> Option<bool> {
    if let Some(status) = upstream_status {
        return Some(failure_on.status(status));
    }
    let error = error?;
    if matches!(error.esource(), ErrorSource::Downstream) {
        return None;
    }
    Some(match error.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout
        | ErrorType::InvalidCert
        | ErrorType::SocketError
        | ErrorType::BindError => failure_on.connect_error,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => failure_on.timeout,
        ErrorType::HTTPStatus(_) => return None,
        // Resets and broken responses reach the client as 502.
        _ => failure_on.status(502),
    })
}
