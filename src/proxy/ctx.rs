//! What one request carries from phase to phase.

use crate::breaker;
use crate::cache;
use crate::gateway::{Gateway, InflightRequest};
use crate::identity::Principal;
use crate::policy::{Policy, Route};
use crate::problem::Code;
use crate::upstream::{InflightGuard, Pool};
use http::HeaderValue;
use pingora::cache::CacheKey;
use pingora::http::ResponseHeader;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything one request carries through the phases, grouped by who fills it in.
/// The policy is loaded once, in `new`, so a request sees a single generation even if
/// a reload lands mid-way.
pub(crate) struct RequestCtx {
    pub(crate) policy: Arc<Policy>,
    _inflight: InflightRequest,
    pub(crate) started: Instant,
    pub(crate) route: Option<usize>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) client: Client,
    pub(crate) limits: Limits,
    pub(crate) attempt: Attempt,
    pub(crate) cache: Cache,
    pub(crate) request_body_bytes: u64,
    /// Set when the gateway answered itself: the error code, for logs and metrics.
    pub(crate) answered: Option<Code>,
}

/// Who is asking: filled in by `request_filter` and admission.
#[derive(Default)]
pub(crate) struct Client {
    pub(crate) ip: Option<IpAddr>,
    pub(crate) peer_trusted: bool,
    /// The resolved user; `None` is anonymous.
    pub(crate) principal: Option<Arc<Principal>>,
    pub(crate) request_id: Option<HeaderValue>,
    /// The W3C trace this request belongs to (continued or started).
    pub(crate) trace: Option<crate::trace::TraceContext>,
}

/// What the rate limits said.
#[derive(Default)]
pub(crate) struct Limits {
    /// What the response says about the limits.
    pub(crate) advert: Option<crate::ratelimit::Advert>,
    /// The rule that denied the request, or the shadow rules that would have.
    pub(crate) limited_by: Option<Arc<str>>,
    pub(crate) shadow_limited: Vec<Arc<str>>,
}

/// The current upstream attempt, and what earlier attempts left behind.
#[derive(Default)]
pub(crate) struct Attempt {
    pub(crate) pool: Option<Arc<Pool>>,
    pub(crate) server: Option<usize>,
    pub(crate) failed_servers: Vec<usize>,
    pub(crate) server_inflight: Option<InflightGuard>,
    pub(crate) sent: Option<Instant>,
    pub(crate) duration: Option<Duration>,
    pub(crate) status: Option<u16>,
    /// The pool's breaker let this request through; its outcome is recorded at the end.
    pub(crate) breaker_ticket: Option<breaker::Ticket>,
    /// A place in the pool's bulkhead, held until the request ends.
    pub(crate) bulkhead_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The upstream outcome has been counted (breaker, outlier ejection).
    pub(crate) settled: bool,
    /// Retries taken so far, and the wait before the next attempt.
    pub(crate) retries: u32,
    pub(crate) retry_backoff: Option<Duration>,
    /// Each attempt's span, kept only while `tracing` exports spans.
    pub(crate) spans: Vec<crate::trace::export::AttemptSpan>,
}

/// What the cache did.
#[derive(Default)]
pub(crate) struct Cache {
    /// Once known; a caching route's requests without one were answered by the
    /// gateway before the cache (BYPASS).
    pub(crate) outcome: Option<cache::CacheResult>,
    /// The key computed for the fast hit check, handed on to Pingora's cache on a miss.
    pub(crate) key: Option<CacheKey>,
    /// The upstream's 304 to a revalidation, whose fields update the stored ones
    /// (Pingora merges only a few of them).
    pub(crate) not_modified: Option<Box<pingora::http::ResponseHeader>>,
}

/// Why the gateway answered a request itself, or served it from the cache: the access
/// log's `reason` and the server span's `tollgate.reason`.
pub(crate) enum Reason<'a> {
    RateLimited(&'a str),
    Other(&'static str),
}

impl std::fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::RateLimited(rule) => write!(f, "rate_limited:{rule}"),
            Reason::Other(reason) => f.write_str(reason),
        }
    }
}

impl RequestCtx {
    pub(crate) fn reason(&self) -> Option<Reason<'_>> {
        match (&self.limits.limited_by, self.answered, self.cache.outcome) {
            (Some(rule), _, _) => Some(Reason::RateLimited(rule)),
            (None, Some(code), _) => Some(Reason::Other(code.as_str())),
            (None, None, Some(cache::CacheResult::Hit)) => Some(Reason::Other("cache_hit")),
            (None, None, Some(cache::CacheResult::Stale)) => Some(Reason::Other("cache_stale")),
            (None, None, _) => None,
        }
    }

    pub(crate) fn new(gateway: &Arc<Gateway>) -> RequestCtx {
        RequestCtx {
            policy: gateway.policy.load_full(),
            _inflight: InflightRequest::new(gateway),
            started: Instant::now(),
            route: None,
            deadline: None,
            client: Client::default(),
            limits: Limits::default(),
            attempt: Attempt::default(),
            cache: Cache::default(),
            request_body_bytes: 0,
            answered: None,
        }
    }

    pub(crate) fn route(&self) -> Option<&Route> {
        self.route.map(|i| &self.policy.routes[i])
    }

    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Headers on every response: the request id and the policy's security headers.
    pub(crate) fn decorate(&self, header: &mut ResponseHeader) {
        for (name, value) in &self.policy.server.response_headers {
            let _ = header.insert_header_alike(name, value.clone());
        }
        if let Some(id) = &self.client.request_id {
            let _ = header.insert_header_alike(&self.policy.server.request_id_header, id.clone());
        }
        if self.route().is_some_and(|r| r.cache.is_some())
            && !header.headers.contains_key(&cache::X_CACHE)
        {
            let _ =
                header.insert_header_alike(&cache::X_CACHE, cache::CacheResult::Bypass.header());
        }
    }
}
