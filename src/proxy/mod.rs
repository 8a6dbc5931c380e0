//! The request pipeline, in the order Pingora calls it. Where does an answer come from?
//!
//! * Beneath it, `connection` — HTTP/1 or h2c from the first bytes, and the request
//!   head's deadline (408 `request_timeout`, written before any phase runs).
//! * `request_filter` — everything decided before the cache, top to bottom:
//!   request id → client address → `admission::admit` (request target and framing
//!   400 → route 404 `no_route` → identity 401 `unauthorized` → shedding: fallback or
//!   503 `overloaded` → rate limits 429 `rate_limited` → body size 413
//!   `payload_too_large`; the same function answers `POST /explain`) → pool →
//!   deadline → a fresh cache entry (`x-cache: HIT`, `serve_fresh_hit`).
//! * `request_cache_filter` / `cache_key_callback` / `cache_hit_filter` — on a caching
//!   route, Pingora's cache looks up what the fast path left: conditional requests,
//!   variants, stale entries (`x-cache: HIT | STALE`), misses; a hit skips everything
//!   below.
//! * `proxy_upstream_filter` — only when going upstream: circuit breaker (fallback,
//!   else a stale entry, else 503 `circuit_open`) → bulkhead (503 `bulkhead_full`);
//!   `attempt` keeps each attempt's breaker, outlier and retry bookkeeping.
//! * `upstream_peer` / `fail_to_connect` — pool and server choice; a server that
//!   refuses the connection is skipped for another (backups last).
//! * `upstream_request_filter` — forwarding headers, prefix stripping.
//! * `upstream_response_filter` — retry on status, upstream latency, hop-by-hop
//!   removal (before the cache stores the response).
//! * `response_cache_filter` — whether the response is stored, and for how long.
//! * `response_filter` — configured headers, request id, `x-cache`.
//! * `fail_to_proxy` — 502 `upstream_unavailable` / 504 `upstream_timeout`, 408 for a
//!   request body that stalled past `server.body_timeout`.
//! * `logging` — the breaker's verdict on the outcome, metrics, SLO windows, access log.

mod access_log;
pub(crate) mod admission;
mod attempt;
pub(crate) mod ctx;
mod spans;

use crate::cache;
use crate::config::Priority;
use crate::connection;
use crate::forwarding;
use crate::gateway::Gateway;
use crate::policy::Fallback;
use crate::problem::{Code, Problem};
use crate::ratelimit;
use crate::trace::export::AttemptSpan;
use crate::upstream::{HashOn, InflightGuard, SelectionKey};
use admission::Verdict;
use attempt::attempt_failure;
use bytes::Bytes;
pub(crate) use ctx::RequestCtx;
use pingora::cache::key::HashBinary;
use pingora::cache::{
    CacheKey, CacheMeta, ForcedFreshness, HitHandler, NoCacheReason, RespCacheable,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

pub(crate) struct Proxy {
    pub(crate) gateway: Arc<Gateway>,
}

/// The gateway writing a whole response itself: a future of over a kilobyte (Pingora's
/// response writers), boxed where it is made so that the phases that may answer, whose
/// futures Pingora allocates on every request, do not carry it inline when they do not.
type Answering<'a> = Pin<Box<dyn Future<Output = Result<bool>> + Send + 'a>>;

impl Proxy {
    /// Answers the request from the gateway itself and stops the pipeline.
    fn answer<'a>(
        &'a self,
        session: &'a mut Session,
        ctx: &'a mut RequestCtx,
        problem: Problem,
    ) -> Answering<'a> {
        Box::pin(async move {
            if self.gateway.closes_connections() {
                session.set_keepalive(None);
            }
            ctx.answered = Some(problem.code);
            problem.send(session, |h| ctx.decorate(h)).await?;
            Ok(true)
        })
    }

    /// Answers with the route's fallback instead of the 503 `why` (`x-tollgate-fallback`
    /// names it; the access log's reason too).
    fn fallback<'a>(
        &'a self,
        session: &'a mut Session,
        ctx: &'a mut RequestCtx,
        fallback: &'a Fallback,
        why: Code,
    ) -> Answering<'a> {
        Box::pin(self.write_fallback(session, ctx, fallback, why))
    }

    async fn write_fallback(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        fallback: &Fallback,
        why: Code,
    ) -> Result<bool> {
        if self.gateway.closes_connections() {
            session.set_keepalive(None);
        }
        let mut header = ResponseHeader::build(fallback.status, Some(4))?;
        header.insert_header("content-type", fallback.content_type.clone())?;
        header.insert_header("content-length", fallback.body.len())?;
        header.insert_header("x-tollgate-fallback", why.as_str())?;
        ctx.decorate(&mut header);
        ctx.answered = Some(why);
        let head_only = session.req_header().method == http::Method::HEAD;
        session
            .write_response_header(Box::new(header), head_only)
            .await?;
        if !head_only {
            session
                .write_response_body(Some(fallback.body.clone()), true)
                .await?;
        }
        Ok(true)
    }

    /// A fresh, non-varying entry is answered here, at the cache's place in the
    /// pipeline: Pingora's cache state machine would decode the stored header on every
    /// hit. Conditional and range requests, revalidation and everything stale or
    /// varying go through Pingora's cache.
    fn fresh_hit(&self, session: &Session, ctx: &mut RequestCtx) -> Option<cache::Fresh> {
        let policy = ctx.policy.clone();
        let route = &policy.routes[ctx.route?];
        let cache = route.cache.as_ref()?;
        let req = session.req_header();
        // Credentials need the stored header's say (`cache_hit_filter`).
        let credentials = !cache.per_user && req.headers.contains_key(http::header::AUTHORIZATION);
        if cache::request_bypass(cache, req).is_some()
            || credentials
            || cache::request_wants_revalidation(req)
            || req.headers.contains_key(http::header::IF_NONE_MATCH)
            || req.headers.contains_key(http::header::IF_MODIFIED_SINCE)
            || req.headers.contains_key(http::header::RANGE)
        {
            return None;
        }
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let user = ctx.client.principal.as_ref().map(|p| &*p.user);
        let key = cache::key(cache, &route.name, req, tls, user);
        let fresh = self.gateway.cache.fresh(&key);
        if fresh.is_none() {
            ctx.cache.key = Some(key);
        }
        fresh
    }

    fn serve_fresh_hit<'a>(
        &'a self,
        session: &'a mut Session,
        ctx: &'a mut RequestCtx,
        fresh: cache::Fresh,
    ) -> Answering<'a> {
        Box::pin(async move {
            let head_only = session.req_header().method == http::Method::HEAD;
            let mut header = fresh.header;
            ctx.cache.outcome = Some(cache::CacheResult::Hit);
            self.response_filter(session, &mut header, ctx).await?;
            session
                .write_response_header(Box::new(header), head_only)
                .await?;
            if !head_only {
                session.write_response_body(Some(fresh.body), true).await?;
            }
            Ok(true)
        })
    }
}

impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(&self.gateway)
    }

    /// No downstream modules: Pingora adds a (disabled) response-compression module by
    /// default, which still runs on every request and response.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let policy = ctx.policy.clone();
        // The head is in: its deadline stops, and a body may pause this long per read.
        let idle = policy.server.idle_timeout;
        let connection_times_idle = connection::head_complete(session, idle);
        session.set_read_timeout(Some(policy.server.body_timeout));
        // Between kept-alive requests the connection waits `idle_timeout` for the next,
        // timed by the connection itself where it can (0: Pingora waits without end),
        // else by Pingora (whole seconds); one the client asked to close stays closing.
        if session.get_keepalive().is_some() {
            let pingora_wait = if connection_times_idle {
                0
            } else {
                idle.as_secs().max(1)
            };
            session.set_keepalive(Some(pingora_wait));
        }
        // Requests a client sent ahead on this connection are served after this one,
        // in order (RFC 9112 §9.3.2); Pingora would otherwise close and drop them.
        session.set_pipelining_enabled(true);
        let framing = forwarding::normalise(
            session.req_header_mut(),
            policy.server.allow_underscores_in_headers,
            &policy.server.request_id_header,
        );
        let req = session.req_header();
        let carried = framing.unwrap_or(forwarding::Carried::UNCHECKED);

        let client_id = carried
            .request_id
            .then(|| req.headers.get(&policy.server.request_id_header))
            .flatten();
        ctx.client.request_id = Some(match client_id {
            Some(id) if forwarding::acceptable_request_id(id) => id.clone(),
            _ => forwarding::new_request_id(),
        });
        let sample = policy.tracing.as_ref().map(|t| t.sample);
        ctx.client.trace = Some(crate::trace::TraceContext::of(req, carried, sample));

        if let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            ctx.client.peer_trusted = policy.is_trusted(peer);
            ctx.client.ip = Some(forwarding::client_ip(peer, &req.headers, |ip| {
                policy.is_trusted(ip)
            }));
        }

        let view = admission::RequestView {
            req,
            framing: framing.map(|_| ()),
            client_ip: ctx.client.ip,
            peer_trusted: ctx.client.peer_trusted,
            arrived: ctx.started,
        };
        let admission = admission::admit(&policy, &self.gateway, &view, true).await;
        ctx.route = admission.route;
        ctx.client.principal = admission.principal;
        if let Some(outcome) = &admission.limits {
            let limits = &policy.rate_limits;
            ctx.limits.shadow_limited = outcome
                .shadow_limited
                .iter()
                .map(|&i| limits.rules[i].name.clone())
                .collect();
            ctx.limits.advert = ratelimit::Advert::of(limits, outcome);
            ctx.limits.limited_by = outcome.denied.map(|i| limits.rules[i].name.clone());
        }
        match admission.verdict {
            Verdict::Forward => {}
            Verdict::Refuse(mut problem) => {
                let advert = ctx.limits.advert.take();
                if let Some(advert) = advert.filter(|_| problem.code == Code::RateLimited) {
                    advert.fields(&policy.rate_limits, |name, value| {
                        problem.headers.push((name.clone(), value))
                    });
                }
                return self.answer(session, ctx, problem).await;
            }
            Verdict::Fallback(code) => {
                let fallback = admission
                    .route
                    .and_then(|i| policy.routes[i].fallback.as_ref())
                    .expect("a fallback verdict is given only on a route with a fallback");
                return self.fallback(session, ctx, fallback, code).await;
            }
        }

        let route = &policy.routes[admission.route.expect("a forwarded request has a route")];
        ctx.attempt.pool = Some(route.target.choose().clone());
        ctx.deadline = route.timeout.map(|t| ctx.started + t);
        match self.fresh_hit(session, ctx) {
            Some(fresh) => self.serve_fresh_hit(session, ctx, fresh).await,
            None => Ok(false),
        }
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let policy = ctx.policy.clone();
        let Some(cache) = ctx.route.and_then(|i| policy.routes[i].cache.as_ref()) else {
            return Ok(());
        };
        if cache::request_bypass(cache, session.req_header()).is_some() {
            ctx.cache.outcome = Some(cache::CacheResult::Bypass);
            return Ok(());
        }
        let store = self.gateway.cache;
        session.cache.enable(
            store,
            None,
            None,
            Some(store.lock()),
            Some(cache::lock_options()),
        );
        session
            .cache
            .set_max_file_size_bytes(policy.cache.max_object);
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, ctx: &mut RequestCtx) -> Result<CacheKey> {
        if let Some(key) = ctx.cache.key.take() {
            return Ok(key);
        }
        let route = ctx
            .route()
            .expect("the cache is enabled only on a matched route");
        let cache = route
            .cache
            .as_ref()
            .expect("the cache is enabled only on caching routes");
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let user = ctx.client.principal.as_ref().map(|p| &*p.user);
        Ok(cache::key(
            cache,
            &route.name,
            session.req_header(),
            tls,
            user,
        ))
    }

    /// A request with credentials is not answered with an entry the origin did not mark
    /// shareable (a miss instead); a client's `no-cache` forces revalidation. While the
    /// pool's circuit is open, an entry past its freshness but within `stale_if_error`
    /// is served, unless the route has a fallback (SPEC's chain: fallback, else stale
    /// entry, else 503).
    async fn cache_hit_filter(
        &self,
        session: &mut Session,
        meta: &CacheMeta,
        _hit_handler: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<ForcedFreshness>> {
        let req = session.req_header();
        if let Some(cache) = ctx.route().and_then(|r| r.cache.as_ref()) {
            if !cache::credentials_allow(cache, req, meta.response_header()) {
                return Ok(Some(ForcedFreshness::ForceMiss));
            }
        }
        if cache::request_wants_revalidation(req) {
            return Ok(Some(ForcedFreshness::ForceExpired));
        }
        let has_fallback = ctx.route().is_some_and(|r| r.fallback.is_some());
        let circuit_open = ctx
            .attempt
            .pool
            .as_ref()
            .and_then(|p| p.breaker.as_ref())
            .is_some_and(|g| g.breaker.rejects_now());
        if !is_fresh
            && circuit_open
            && !has_fallback
            && meta.serve_stale_if_error(SystemTime::now())
        {
            ctx.cache.outcome = Some(cache::CacheResult::Stale);
            return Ok(Some(ForcedFreshness::ForceFresh));
        }
        Ok(None)
    }

    /// Runs only when the request goes upstream (not for a cache hit): the pool's
    /// circuit breaker (fallback or 503 `circuit_open`) and bulkhead (503
    /// `bulkhead_full`).
    async fn proxy_upstream_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        Ok(!self.admit_upstream(session, ctx).await?)
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<RespCacheable> {
        let not_modified = ctx.cache.not_modified.take();
        let Some(cache) = ctx.route().and_then(|r| r.cache.as_ref()) else {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::NeverEnabled));
        };
        let authorized = !cache.per_user
            && session
                .req_header()
                .headers
                .contains_key(http::header::AUTHORIZATION);
        match not_modified {
            Some(not_modified) => {
                let updated = cache::update_stored(resp, &not_modified);
                Ok(cache::cacheability(cache, &updated, authorized))
            }
            None => Ok(cache::cacheability(cache, resp, authorized)),
        }
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut RequestCtx,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        cache::variance(meta, req)
    }

    /// RFC 5861: during revalidation (`error` is `None`) the entry's own
    /// stale-while-revalidate window decides, which Pingora checks; on an upstream
    /// failure, timeout or 5xx its stale-if-error window.
    fn should_serve_stale(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        error: Option<&Error>,
    ) -> bool {
        error.is_none_or(cache::error_allows_stale)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A chunked body has no declared length: count it as it streams.
        ctx.request_body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        if ctx.request_body_bytes > ctx.policy.server.max_request_body {
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                "request body over max_request_body",
            );
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        if let Some(backoff) = ctx.attempt.retry_backoff.take() {
            tokio::time::sleep(ctx.remaining().map_or(backoff, |r| backoff.min(r))).await;
        }
        if ctx.remaining().is_some_and(|r| r.is_zero()) {
            return Error::e_explain(
                ErrorType::ReadTimedout,
                "route timeout passed before an upstream answered",
            );
        }
        let policy = ctx.policy.clone();
        let route = &policy.routes[ctx
            .route
            .expect("request_filter sets the route before proxying")];
        let pool = ctx
            .attempt
            .pool
            .get_or_insert_with(|| route.target.choose().clone())
            .clone();
        let req = session.req_header();
        let key = SelectionKey {
            client_ip: ctx.client.ip,
            user: ctx.client.principal.as_ref().map(|p| &*p.user),
            header: match &pool.hash_on {
                Some(HashOn::Header(name)) => req.headers.get(name).map(|v| v.as_bytes()),
                _ => None,
            },
            path: req.uri.path(),
        };
        // A retry goes to another server when there is one, else to the same again.
        let index = pool.select(&key, &ctx.attempt.failed_servers).or_else(|| {
            (ctx.attempt.retries > 0)
                .then(|| pool.select(&key, &[]))
                .flatten()
        });
        let Some(index) = index else {
            return Error::e_explain(
                ErrorType::ConnectNoRoute,
                format!("no server of upstream `{}` left to try", pool.name),
            );
        };
        ctx.attempt.server = Some(index);
        ctx.attempt.server_inflight = Some(InflightGuard::new(&pool.servers[index].state));
        // Each attempt its own client span, whose id the upstream sees as its parent.
        // It is recorded only when it may be exported: sampled, or kept for an error.
        if let (Some(tracing), Some(trace)) = (&policy.tracing, &mut ctx.client.trace) {
            let span = trace.next_span();
            if trace.sampled() || tracing.sample_errors {
                ctx.attempt.spans.push(AttemptSpan {
                    span,
                    upstream: pool.name.clone(),
                    server: pool.servers[index].label.clone(),
                    retry: ctx.attempt.retries,
                    start: std::time::Instant::now(),
                    end: None,
                });
            }
        }
        Ok(pool.peer(index, ctx.remaining()))
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.attempt.retry_backoff.is_some() {
            // `upstream_response_filter` already decided to retry this response.
            e.set_retry(true);
            return e;
        }
        let retry_on = ctx
            .attempt
            .pool
            .as_ref()
            .and_then(|p| p.retry.as_ref())
            .map(|r| &r.on);
        if retry_on.and_then(|on| attempt_failure(on, None, Some(&e))) == Some(true) {
            self.settle(ctx, Some(&e));
            if self.prepare_retry(session, ctx) {
                e.set_retry(true);
                return e;
            }
        }
        // Pingora's own rule: an idempotent request that failed on a reused (possibly
        // stale) upstream connection may be sent once more on a fresh one.
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        attempt::end_span(ctx, std::borrow::Cow::Borrowed("connect_error"));
        // Nothing reached the server, so any method may go to another one.
        if let Some(failed) = ctx.attempt.server.take() {
            ctx.attempt.failed_servers.push(failed);
            if let Some(pool) = ctx.attempt.pool.clone() {
                self.record_attempt(&pool, failed, pool.failure_on.connect_error);
            }
        }
        ctx.attempt.server_inflight = None;
        let another_left = ctx
            .attempt
            .pool
            .as_ref()
            .is_some_and(|p| ctx.attempt.failed_servers.len() < p.servers.len());
        let time_left = ctx.remaining().is_none_or(|r| !r.is_zero());
        if another_left && time_left {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let policy = &ctx.policy;
        if let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            let scheme = if session.digest().is_some_and(|d| d.ssl_digest.is_some()) {
                "https"
            } else {
                "http"
            };
            forwarding::set_forwarded_headers(upstream, peer, ctx.client.peer_trusted, scheme)?;
        }
        // The idle pool is one for the process, bounded by the sum over pools: a pool
        // that keeps none says so on each request, and the connection ends with it.
        if ctx.attempt.pool.as_ref().is_some_and(|p| p.keepalive == 0) {
            upstream.insert_header_alike(&http::header::CONNECTION, "close")?;
        }
        if let Some(id) = &ctx.client.request_id {
            upstream.insert_header_alike(&policy.server.request_id_header, id.clone())?;
        }
        if let Some(trace) = &ctx.client.trace {
            trace.propagate(upstream)?;
        }
        if let Some(prefix) = ctx.route().and_then(|r| r.strip_prefix.as_deref()) {
            if let Some(rest) = upstream.uri.path().strip_prefix(prefix) {
                let path = if rest.starts_with('/') {
                    rest.to_string()
                } else {
                    format!("/{rest}")
                };
                let uri = match upstream.uri.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                };
                let uri = uri.parse::<http::Uri>().map_err(|e| {
                    Error::because(ErrorType::InternalError, "stripped path is not a URI", e)
                })?;
                upstream.set_uri(uri);
            }
        }
        ctx.attempt.sent = Some(Instant::now());
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        ctx.attempt.status = Some(status);
        self.settle(ctx, None);
        let retry_wanted = ctx
            .attempt
            .pool
            .as_ref()
            .and_then(|p| p.retry.as_ref())
            .is_some_and(|r| r.on.status(status));
        if retry_wanted && self.prepare_retry(session, ctx) {
            // Nothing of this response has reached the client: drop it and try again.
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                format!("upstream answered {status}; retrying"),
            );
            e.set_retry(true);
            return Err(e);
        }
        if let (Some(sent), Some(pool)) = (ctx.attempt.sent, &ctx.attempt.pool) {
            let elapsed = sent.elapsed();
            ctx.attempt.duration = Some(elapsed);
            pool.upstream_duration.observe(elapsed.as_secs_f64());
            let priority = ctx.route().map_or(Priority::Normal, |r| r.priority);
            self.gateway.load.record_upstream(elapsed, priority);
        }
        // Here, before the cache stores the response (RFC 9111 §3.1), so no hit ever
        // needs stripping again. A switching-protocols answer keeps them: the upgrade
        // needs `Connection`/`Upgrade`.
        if upstream_response.status != http::StatusCode::SWITCHING_PROTOCOLS {
            forwarding::strip_hop_by_hop(upstream_response);
        }
        if status == 304 && session.cache.enabled() {
            ctx.cache.not_modified = Some(Box::new(upstream_response.clone()));
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if self.gateway.closes_connections() {
            session.set_keepalive(None);
        }
        if let Some(rc) = ctx.route.and_then(|i| ctx.policy.routes[i].cache.as_ref()) {
            let req = session.req_header();
            // RFC 9111 §4.4: a successful unsafe request invalidates the stored
            // responses for its URI, before its client can ask again.
            let unsafe_method = !matches!(
                req.method,
                http::Method::GET
                    | http::Method::HEAD
                    | http::Method::OPTIONS
                    | http::Method::TRACE
            );
            if unsafe_method && (200..400).contains(&response.status.as_u16()) {
                let uri = req.uri.path_and_query().map_or("/", |p| p.as_str());
                self.gateway
                    .cache
                    .invalidate(cache::Selector::Path(uri.to_string()));
            }
            let outcome = *ctx
                .cache
                .outcome
                .get_or_insert_with(|| cache::CacheResult::of(session.cache.phase()));
            // RFC 9213: the targeted field this cache obeyed is its own; stored
            // responses were stored without it.
            if matches!(
                outcome,
                cache::CacheResult::Miss | cache::CacheResult::Bypass
            ) {
                if let Some(name) = cache::targeted_field(rc, &response.headers) {
                    response.remove_header(name);
                }
            }
            // A fresh hit's stored header already says HIT (see `cache::Store::fresh`):
            // comparing is far cheaper than Pingora's `insert_header`.
            let said = response.headers.get(&cache::X_CACHE);
            if said.is_none_or(|v| v.as_bytes() != outcome.header().as_bytes()) {
                response.insert_header_alike(&cache::X_CACHE, outcome.header())?;
            }
        }
        ctx.decorate(response);
        if let Some(advert) = ctx.limits.advert.take() {
            // Infallible: the values are header values already.
            advert.fields(&ctx.policy.rate_limits, |name, value| {
                let _ = response.insert_header_alike(name, value);
            });
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        self.settle(ctx, Some(e));
        let code = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(413), _) => Some(Code::PayloadTooLarge),
            (ErrorType::HTTPStatus(status), _) if *status >= 500 => Some(Code::UpstreamUnavailable),
            (ErrorType::HTTPStatus(_), _) => Some(Code::BadRequest),
            (
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout,
                ErrorSource::Upstream | ErrorSource::Unset,
            ) => Some(Code::UpstreamTimeout),
            // The request body stalled longer than `server.body_timeout`.
            (ErrorType::ReadTimedout, ErrorSource::Downstream) => {
                self.gateway.metrics.body_timeouts.inc();
                Some(Code::RequestTimeout)
            }
            (_, ErrorSource::Downstream) => match e.etype() {
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => None,
                _ => Some(Code::BadRequest),
            },
            (_, ErrorSource::Internal) => Some(Code::Internal),
            _ => Some(Code::UpstreamUnavailable),
        };
        let Some(code) = code else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        ctx.answered = Some(code);
        if session.response_written().is_some() {
            // The response already started: all that is left is to cut it short.
            return FailToProxy {
                error_code: code.status(),
                can_reuse_downstream: false,
            };
        }
        // Pingora drops the client connection after a failed proxy attempt whatever
        // this hook answers, so the client must be told not to reuse it.
        session.set_keepalive(None);
        let detail = match code {
            Code::UpstreamTimeout => "the upstream did not answer in time".to_string(),
            Code::UpstreamUnavailable => match &ctx.attempt.pool {
                Some(pool) => format!("upstream `{}` could not be reached", pool.name),
                None => "the upstream could not be reached".to_string(),
            },
            Code::PayloadTooLarge => format!(
                "the request body exceeds the limit of {} bytes",
                ctx.policy.server.max_request_body
            ),
            // Only the kind of error: its context names the upstream peer, an internal
            // address the gateway's own answers never show.
            Code::BadRequest => format!("the request is malformed ({})", e.etype().as_str()),
            Code::RequestTimeout => format!(
                "the request body stalled for longer than server.body_timeout ({:?})",
                ctx.policy.server.body_timeout
            ),
            _ => format!(
                "the gateway could not proxy the request ({})",
                e.etype().as_str()
            ),
        };
        let mut problem = Problem::new(code, detail);
        problem.headers.push((
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        ));
        let _ = problem.send(session, |h| ctx.decorate(h)).await;
        FailToProxy {
            error_code: code.status(),
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        // Clients hanging up is their right, not the gateway's error.
        matches!(error.esource(), ErrorSource::Downstream)
            && matches!(
                error.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            )
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let now = Instant::now();
        connection::request_done(session, now);
        self.settle(ctx, error);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = now.saturating_duration_since(ctx.started);
        ctx.attempt.server_inflight = None;
        ctx.attempt.bulkhead_slot = None;
        let route_metrics = ctx.route().map_or(&self.gateway.unmatched, |r| &*r.metrics);
        route_metrics.count(&session.req_header().method, status);
        route_metrics.duration.observe(elapsed.as_secs_f64());
        if let Some(route) = ctx.route() {
            if let Some(cache) = &route.cache {
                let outcome = ctx.cache.outcome.unwrap_or(cache::CacheResult::Bypass);
                cache.requests[outcome as usize].inc();
                self.gateway.cache.record(outcome);
            }
            if let Some((_, tracker)) = &route.slo {
                tracker.record(
                    crate::gateway::unix_now() / 60,
                    elapsed,
                    status >= 500 || status == 0,
                );
            }
        }
        if ctx.policy.access_log.enabled {
            access_log::write(&self.gateway.access_log, session, ctx, status, elapsed);
        }
        self.export_spans(session, ctx, status, elapsed);
    }
}
