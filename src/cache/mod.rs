//! The response cache (SPEC §3 `cache` and `routes[].cache`, §4 "Caching").
//!
//! Pingora's `pingora-cache` runs the HTTP state machine: lookup, collapsed forwarding
//! through its cache lock, stale-while-revalidate with one background refresh,
//! stale-if-error, conditional revalidation and 304 merging, HEAD from a GET entry.
//! This module gives it what it leaves to the application: the storage (its bundled
//! one is for tests only), the key, and the RFC 9111 decision whether a response may
//! be stored and for how long.
//!
//! The storage is a moka cache with LRU eviction, bounded twice: by bytes (`max_size`)
//! and by entries (`max_entries`). moka weighs against one capacity, so each entry
//! weighs at least one slot of `max_size / max_entries` bytes: the byte total and the
//! entry count then both stay within their bounds.
//!
//! `rfc9111` holds the HTTP caching rules, `store` the storage (and `store::shared`
//! its Redis tier), `paths` the path index purges use; this file the settings
//! (the warmer is a service of the running gateway, `gateway::warmer`).

mod paths;
mod rfc9111;
mod store;

pub use rfc9111::{
    cacheability, request_bypass, request_wants_revalidation, update_stored, variance,
};
pub(crate) use rfc9111::{credentials_allow, error_allows_stale, key, targeted_field};
pub(crate) use store::{Fresh, Selector, Store};

use crate::config::{self, ConfigError, RouteCacheConfig};
use crate::policy::compile::Compile;
use crate::units;
use http::{HeaderName, Method};
use pingora::cache::{CacheOptionOverrides, CachePhase};
use serde_saphyr::Location;
use std::time::Duration;

/// How long a request waits for another one filling the same key before it goes
/// upstream itself (NGINX's `proxy_cache_lock_timeout`).
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(5);
pub(crate) fn lock_options() -> CacheOptionOverrides {
    let mut options = CacheOptionOverrides::default();
    options.wait_timeout = Some(LOCK_WAIT);
    options
}

/// A route's compiled cache settings.
pub struct RouteCache {
    pub(crate) ttl: Duration,
    pub(crate) force_ttl: bool,
    pub(crate) stale_while_revalidate: u32,
    pub(crate) stale_if_error: u32,
    pub(crate) per_user: bool,
    pub(crate) vary: Vec<HeaderName>,
    pub(crate) methods: Vec<Method>,
    pub(crate) statuses: Vec<u16>,
    pub(crate) warm: Vec<WarmTarget>,
    /// RFC 9213 fields that stand for Cache-Control in this cache, first present wins.
    pub(crate) targeted: Vec<HeaderName>,
    /// RFC 9111 §4.2.2: the share of a response's age since `Last-Modified` it stays
    /// fresh when it says nothing of its freshness (0: the route's `ttl` instead).
    pub(crate) heuristic: f64,
    pub(crate) heuristic_max: Duration,
    /// `tollgate_cache_requests_total{route, result}`, indexed by [`CacheResult`].
    pub(crate) requests: [prometheus::IntCounter; 4],
}

/// The process-wide limits every caching route shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) max_size: u64,
    pub(crate) max_entries: u64,
    pub(crate) max_object: usize,
    pub(crate) tag_header: HeaderName,
    /// The shared second tier: its URL and per-call timeout.
    pub(crate) redis: Option<(String, Duration)>,
}

impl Settings {
    /// Whether `other` keeps this shelf: the same bounds and tag header.
    fn same_shelf(&self, other: &Settings) -> bool {
        (
            self.max_size,
            self.max_entries,
            self.max_object,
            &self.tag_header,
        ) == (
            other.max_size,
            other.max_entries,
            other.max_object,
            &other.tag_header,
        )
    }
}

pub(crate) fn compile_settings(cx: &mut Compile<'_>, c: &config::CacheConfig) -> Option<Settings> {
    let (path, errors) = (cx.path, &mut cx.errors);
    let mut ok = true;
    let mut error = |at: &Location, message: String| {
        errors.push(ConfigError::at(path, at, message));
        ok = false;
    };
    if c.max_entries.value == 0 {
        error(
            &c.max_entries.referenced,
            "cache.max_entries must be at least 1".into(),
        );
    }
    if c.max_size.0 == 0 {
        error(&Location::UNKNOWN, "cache.max_size must be above 0".into());
    }
    if c.max_object.0 > c.max_size.0 {
        error(
            &Location::UNKNOWN,
            format!(
                "cache.max_object ({}) is larger than cache.max_size ({})",
                c.max_object, c.max_size
            ),
        );
    }
    let tag_header = HeaderName::from_bytes(c.tag_header.as_bytes());
    if tag_header.is_err() {
        error(
            &Location::UNKNOWN,
            format!("cache.tag_header `{}` is not a header name", c.tag_header),
        );
    }
    let redis = c.redis.as_ref().map(|r| {
        if let Err(e) = ::redis::Client::open(r.url.value.as_str()) {
            error(
                &r.url.referenced,
                format!(
                    "cache.redis url `{}`: {e}",
                    crate::redis::Address::Server(r.url.value.clone())
                ),
            );
        }
        if r.timeout.0.is_zero() {
            error(
                &r.url.referenced,
                "cache.redis timeout must be above 0s".into(),
            );
        }
        (r.url.value.clone(), r.timeout.0)
    });
    ok.then(|| Settings {
        max_size: c.max_size.0,
        max_entries: c.max_entries.value,
        max_object: usize::try_from(c.max_object.0).unwrap_or(usize::MAX),
        tag_header: tag_header.expect("checked above"),
        redis,
    })
}

pub(crate) fn compile_route(
    cx: &mut Compile<'_>,
    route: &str,
    c: &RouteCacheConfig,
) -> Option<RouteCache> {
    let (path, metrics, errors) = (cx.path, cx.metrics, &mut cx.errors);
    let before = errors.len();
    let vary = c
        .vary
        .iter()
        .filter_map(|h| match HeaderName::from_bytes(h.value.as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                errors.push(ConfigError::at(
                    path,
                    &h.referenced,
                    format!(
                        "route `{route}`: cache.vary `{}` is not a header name",
                        h.value
                    ),
                ));
                None
            }
        })
        .collect();
    let methods = c
        .methods
        .iter()
        .filter_map(|m| match m.value.to_ascii_uppercase().as_str() {
            "GET" => Some(Method::GET),
            "HEAD" => Some(Method::HEAD),
            other => {
                errors.push(ConfigError::at(
                    path,
                    &m.referenced,
                    format!("route `{route}`: cache.methods can hold GET and HEAD, not `{other}`: other methods are not cacheable"),
                ));
                None
            }
        })
        .collect();
    for status in &c.statuses {
        if !(200..600).contains(&status.value) || status.value == 206 || status.value == 304 {
            errors.push(ConfigError::at(
                path,
                &status.referenced,
                format!(
                    "route `{route}`: cache.statuses cannot hold {}: use final statuses 200-599 other than 206 and 304",
                    status.value
                ),
            ));
        }
    }
    let mut targeted: Vec<HeaderName> = Vec::with_capacity(c.targeted.len());
    for field in &c.targeted {
        match HeaderName::from_bytes(field.value.as_bytes()) {
            Ok(name) if name == http::header::CACHE_CONTROL => errors.push(ConfigError::at(
                path,
                &field.referenced,
                format!("route `{route}`: cache.targeted lists fields that stand for Cache-Control, not Cache-Control itself"),
            )),
            Ok(name) if targeted.contains(&name) => errors.push(ConfigError::at(
                path,
                &field.referenced,
                format!("route `{route}`: cache.targeted lists `{name}` twice"),
            )),
            Ok(name) => targeted.push(name),
            Err(_) => errors.push(ConfigError::at(
                path,
                &field.referenced,
                format!(
                    "route `{route}`: cache.targeted `{}` is not a header name",
                    field.value
                ),
            )),
        }
    }
    if c.heuristic.0 > 0.0 && c.heuristic_max.0.is_zero() {
        errors.push(ConfigError::at(
            path,
            &Location::UNKNOWN,
            format!(
                "route `{route}`: cache.heuristic_max must be above 0s when cache.heuristic is on"
            ),
        ));
    }
    let warm = c
        .warm
        .iter()
        .filter_map(|w| match WarmTarget::parse(&w.value) {
            Some(target) => Some(target),
            None => {
                errors.push(ConfigError::at(
                    path,
                    &w.referenced,
                    format!(
                        "route `{route}`: cache.warm `{}` must be a path starting with / or an http(s):// URL",
                        w.value
                    ),
                ));
                None
            }
        })
        .collect();
    let seconds = |d: units::Duration| u32::try_from(d.0.as_secs()).unwrap_or(u32::MAX);
    (errors.len() == before).then(|| RouteCache {
        ttl: c.ttl.0,
        force_ttl: c.force_ttl,
        stale_while_revalidate: seconds(c.stale_while_revalidate),
        stale_if_error: seconds(c.stale_if_error),
        per_user: c.per_user,
        vary,
        methods,
        statuses: c.statuses.iter().map(|s| s.value).collect(),
        warm,
        targeted,
        heuristic: c.heuristic.0,
        heuristic_max: c.heuristic_max.0,
        requests: CacheResult::ALL.map(|o| metrics.cache_requests(route, o.label())),
    })
}

/// One `warm` entry. Keys hold the Host, so a path alone is fetched with the gateway's
/// listener address as Host; a URL names the Host clients use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WarmTarget {
    pub(crate) host: Option<String>,
    pub(crate) path: String,
}

impl WarmTarget {
    fn parse(text: &str) -> Option<WarmTarget> {
        if text.starts_with('/') {
            return Some(WarmTarget {
                host: None,
                path: text.to_string(),
            });
        }
        let uri: http::Uri = text.parse().ok()?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return None;
        }
        Some(WarmTarget {
            host: Some(uri.authority()?.to_string()),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        })
    }
}

/// The field that tells the client what the cache did (a `static`: looking a `&str` up
/// parses the name on every call).
pub(crate) static X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// What the cache did for one request: the `x-cache` header and the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheResult {
    Hit,
    Miss,
    Stale,
    Bypass,
}

impl CacheResult {
    pub(crate) const ALL: [CacheResult; 4] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Stale,
        CacheResult::Bypass,
    ];

    pub(crate) fn header(self) -> &'static str {
        match self {
            CacheResult::Hit => "HIT",
            CacheResult::Miss => "MISS",
            CacheResult::Stale => "STALE",
            CacheResult::Bypass => "BYPASS",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
            CacheResult::Bypass => "bypass",
        }
    }

    /// A revalidated entry (the upstream answered 304) is served from the cache: a hit.
    pub(crate) fn of(phase: CachePhase) -> CacheResult {
        match phase {
            CachePhase::Hit | CachePhase::Revalidated => CacheResult::Hit,
            CachePhase::Stale | CachePhase::StaleUpdating => CacheResult::Stale,
            _ => CacheResult::Miss,
        }
    }
}
