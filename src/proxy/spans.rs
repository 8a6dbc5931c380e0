//! The request's spans for the OTLP exporter (`tracing`): exported when the trace is
//! sampled, or, with `sample_errors`, when the gateway answered itself with 429, 502,
//! 503 or 504. The span of the whole request carries the route, status, user tier (never
//! who the user is) and the gateway's reason; one child span per upstream attempt.

use super::ctx::RequestCtx;
use super::Proxy;
use crate::trace::export::ServerSpan;
use pingora::proxy::Session;
use std::borrow::Cow;
use std::time::Duration;

impl Proxy {
    pub(super) fn export_spans(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        status: u16,
        elapsed: Duration,
    ) {
        let (Some(tracing), Some(trace)) = (&ctx.policy.tracing, &ctx.client.trace) else {
            return;
        };
        let gateway_made = ctx.answered.is_some() && matches!(status, 429 | 502 | 503 | 504);
        if !(trace.sampled() || tracing.sample_errors && gateway_made) {
            return;
        }
        let req = session.req_header();
        self.gateway.spans.send(
            &ServerSpan {
                trace,
                method: req.method.as_str(),
                path: req.uri.path(),
                route: ctx.route().map(|r| &*r.name),
                status,
                start: ctx.started,
                end: ctx.started + elapsed,
                tier: ctx.client.principal.as_ref().map(|p| &*p.tier),
                reason: ctx.reason().map(|r| Cow::Owned(r.to_string())),
                cache: ctx.cache.outcome.map(|o| o.header()),
            },
            &ctx.attempt.spans,
        );
    }
}
