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

use crate::config::ConfigError;
mod paths;
mod shared;
pub mod warm;

use crate::config::{self, RouteCacheConfig};
use crate::units;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, Method};
use pingora::cache::cache_control::{CacheControl, Cacheable, InterpretCacheControl};
use pingora::cache::eviction::CacheEntryId;
use pingora::cache::filters::{calculate_expires_header_time, calculate_serve_stale_durations};
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{
    CacheKey, CacheMeta, CacheMetaDefaults, CacheOptionOverrides, CachePhase, NoCacheReason,
    RespCacheable, Storage, VarianceBuilder,
};
use pingora::http::{RequestHeader, ResponseHeader};
use serde_saphyr::Location;
use std::any::Any;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// How long a request waits for another one filling the same key before it goes
/// upstream itself (NGINX's `proxy_cache_lock_timeout`).
pub const LOCK_WAIT: Duration = Duration::from_secs(5);
pub fn lock_options() -> CacheOptionOverrides {
    let mut options = CacheOptionOverrides::default();
    options.wait_timeout = Some(LOCK_WAIT);
    options
}

/// A filling request that holds the lock longer than this is presumed stuck; its
/// waiters are released.
const LOCK_AGE: Duration = Duration::from_secs(30);
/// Purge tags kept per entry, and their length: tags come from upstream headers and
/// must not make an entry's bookkeeping unbounded.
const MAX_TAGS: usize = 32;
const MAX_TAG_LEN: usize = 256;

/// A route's compiled cache settings.
pub struct RouteCache {
    pub ttl: Duration,
    pub force_ttl: bool,
    pub stale_while_revalidate: u32,
    pub stale_if_error: u32,
    pub per_user: bool,
    pub vary: Vec<HeaderName>,
    pub methods: Vec<Method>,
    pub statuses: Vec<u16>,
    pub warm: Vec<WarmTarget>,
    /// `tollgate_cache_requests_total{route, result}`, indexed by [`Outcome`].
    pub requests: [prometheus::IntCounter; 4],
}

/// The process-wide limits every caching route shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub max_size: u64,
    pub max_entries: u64,
    pub max_object: usize,
    pub tag_header: HeaderName,
    /// The shared second tier: its URL and per-call timeout.
    pub redis: Option<(String, Duration)>,
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

pub fn compile_settings(
    path: &Path,
    c: &config::CacheConfig,
    errors: &mut Vec<ConfigError>,
) -> Option<Settings> {
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

pub fn compile_route(
    path: &Path,
    route: &str,
    c: &RouteCacheConfig,
    metrics: &crate::metrics::Metrics,
    errors: &mut Vec<ConfigError>,
) -> Option<RouteCache> {
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
        requests: Outcome::ALL.map(|o| metrics.cache_requests(route, o.label())),
    })
}

/// One `warm` entry. Keys hold the Host, so a path alone is fetched with the gateway's
/// listener address as Host; a URL names the Host clients use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmTarget {
    pub host: Option<String>,
    pub path: String,
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
pub static X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// What the cache did for one request: the `x-cache` header and the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Stale,
    Bypass,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [Outcome::Hit, Outcome::Miss, Outcome::Stale, Outcome::Bypass];

    pub fn header(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Stale => "STALE",
            Outcome::Bypass => "BYPASS",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
        }
    }

    /// A revalidated entry (the upstream answered 304) is served from the cache: a hit.
    pub fn of(phase: CachePhase) -> Outcome {
        match phase {
            CachePhase::Hit | CachePhase::Revalidated => Outcome::Hit,
            CachePhase::Stale | CachePhase::StaleUpdating => Outcome::Stale,
            _ => Outcome::Miss,
        }
    }
}

/// Why a request does not use the cache, or `None` when it may.
pub fn request_bypass(rc: &RouteCache, req: &RequestHeader) -> Option<&'static str> {
    if !rc.methods.contains(&req.method) {
        return Some("the method is not cached on this route");
    }
    if CacheControl::from_req_headers(req).is_some_and(|cc| cc.no_store()) {
        return Some("the request says Cache-Control: no-store");
    }
    None
}

/// Whether a stored response may answer this request (SPEC §4, RFC 9111 §3.5): a
/// request with credentials, on a route that does not cache per user, only gets what
/// the origin marked shareable (`public`, `s-maxage`, `must-revalidate`), never what an
/// anonymous request stored.
pub fn credentials_allow(rc: &RouteCache, req: &RequestHeader, stored: &ResponseHeader) -> bool {
    rc.per_user
        || !req.headers.contains_key(http::header::AUTHORIZATION)
        || CacheControl::from_resp_headers(stored)
            .is_some_and(|cc| cc.allow_caching_authorized_req())
}

/// Whether the request asks for a stored response to be revalidated before use
/// (`no-cache`, `max-age=0`, or `Pragma: no-cache` without Cache-Control).
pub fn request_wants_revalidation(req: &RequestHeader) -> bool {
    match CacheControl::from_req_headers(req) {
        Some(cc) => cc.no_cache() || cc.max_age().ok().flatten() == Some(0),
        None => req
            .headers
            .get_all(http::header::PRAGMA)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache")),
    }
}

/// The key: scheme and host always (a key without them lets one host's response be
/// served for another), the path and query, the route, the user when the route caches
/// per user, and the route's `vary` headers. The upstream's own `Vary` is a variance
/// on top (see [`variance`]).
pub fn key(
    rc: &RouteCache,
    route: &str,
    req: &RequestHeader,
    tls: bool,
    user: Option<&str>,
) -> CacheKey {
    let host = req
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(http::header::HOST)?.to_str().ok())
        .unwrap_or("");
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let scheme = if tls { "https://" } else { "http://" };
    let mut primary = String::with_capacity(scheme.len() + host.len() + path.len() + 64);
    primary.push_str(scheme);
    primary.push_str(host);
    primary[scheme.len()..].make_ascii_lowercase();
    primary.push_str(path);
    primary.push('\n');
    primary.push_str(route);
    if rc.per_user {
        primary.push_str("\nuser:");
        match user {
            Some(user) => primary.push_str(user),
            // No verified identity: credentials still never share an entry.
            None => {
                if let Some(auth) = req.headers.get(http::header::AUTHORIZATION) {
                    let digest = pingora::cache::key::hash_key(auth.as_bytes());
                    primary.push_str("auth-");
                    primary.push_str(&crate::policy::hex(&digest));
                }
            }
        }
    }
    for name in &rc.vary {
        primary.push('\n');
        primary.push_str(name.as_str());
        primary.push(':');
        for value in req.headers.get_all(name) {
            primary.push_str(&String::from_utf8_lossy(value.as_bytes()));
            primary.push(',');
        }
    }
    CacheKey::new(primary, "")
}

/// The path and query a key was made for (see [`key`]), for purges.
fn key_path(primary: &str) -> &str {
    let uri = primary.split('\n').next().unwrap_or("");
    let after_scheme = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    after_scheme
        .find('/')
        .map_or("/", |slash| &after_scheme[slash..])
}

/// The upstream's `Vary` headers, read from the request: `None` when the response
/// does not vary.
pub fn variance(meta: &CacheMeta, req: &RequestHeader) -> Option<HashBinary> {
    let mut builder = VarianceBuilder::new();
    for value in meta.headers().get_all(http::header::VARY) {
        for name in value.to_str().unwrap_or("").split(',') {
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty() {
                continue;
            }
            let seen: Vec<u8> = req
                .headers
                .get_all(name.as_str())
                .iter()
                .flat_map(|v| v.as_bytes().iter().copied().chain([b',']))
                .collect();
            builder.add_owned_name_value(name, seen);
        }
    }
    builder.finalize()
}

/// RFC 9111 §3: whether a response may be stored, and its freshness and stale windows.
/// `authorized` is a request with credentials on a route that does not key by user:
/// then only `public`, `s-maxage` or `must-revalidate` allow storing (§3.5).
pub fn cacheability(rc: &RouteCache, resp: &ResponseHeader, authorized: bool) -> RespCacheable {
    use RespCacheable::{Cacheable as Store, Uncacheable};
    let uncacheable = || Uncacheable(NoCacheReason::OriginNotCache);
    if !rc.statuses.contains(&resp.status.as_u16()) {
        return uncacheable();
    }
    // Like NGINX and Varnish: a response that sets a cookie is somebody's.
    if resp.headers.contains_key(http::header::SET_COOKIE) {
        return uncacheable();
    }
    let vary_any = resp
        .headers
        .get_all(http::header::VARY)
        .iter()
        .any(|v| v.to_str().unwrap_or("").split(',').any(|n| n.trim() == "*"));
    if vary_any {
        return uncacheable();
    }
    let cc = CacheControl::from_resp_headers(resp);
    if authorized
        && !cc
            .as_ref()
            .is_some_and(|cc| cc.allow_caching_authorized_req())
    {
        return uncacheable();
    }
    if cc
        .as_ref()
        .is_some_and(|cc| cc.is_cacheable() == Cacheable::No)
    {
        return uncacheable();
    }
    let now = SystemTime::now();
    let no_cache = cc.as_ref().is_some_and(|cc| cc.no_cache());
    let fresh_for = if no_cache {
        Some(Duration::ZERO)
    } else if rc.force_ttl {
        Some(rc.ttl)
    } else {
        cc.as_ref().and_then(|cc| cc.fresh_duration())
    };
    // Zero freshness or an Expires in the past: stored already stale, served only after
    // revalidation.
    let stale_now = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
    let fresh_until = match fresh_for {
        Some(Duration::ZERO) => stale_now,
        Some(fresh) => now + fresh,
        None => calculate_expires_header_time(resp)
            .unwrap_or(now + rc.ttl)
            .max(stale_now),
    };
    let defaults = CacheMetaDefaults::new(|_| None, rc.stale_while_revalidate, rc.stale_if_error);
    let (stale_while_revalidate, stale_if_error) = if no_cache {
        (0, 0)
    } else {
        calculate_serve_stale_durations(cc.as_ref(), &defaults)
    };
    let mut header = resp.clone();
    if let Some(cc) = &cc {
        cc.strip_private_headers(&mut header);
    }
    Store(CacheMeta::new(
        fresh_until,
        now,
        stale_while_revalidate,
        stale_if_error,
        header,
    ))
}

/// Which entries `POST /cache/purge` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The path, with any query when it has none itself; exactly that path and query
    /// when it has one.
    Path(String),
    Prefix(String),
    Tag(String),
    All,
}

impl Selector {
    /// The form purges are broadcast in to other replicas.
    fn encode(&self) -> String {
        match self {
            Selector::Path(path) => format!("path {path}"),
            Selector::Prefix(prefix) => format!("prefix {prefix}"),
            Selector::Tag(tag) => format!("tag {tag}"),
            Selector::All => "all".to_string(),
        }
    }

    fn decode(text: &str) -> Option<Selector> {
        match text.split_once(' ') {
            Some(("path", path)) => Some(Selector::Path(path.to_string())),
            Some(("prefix", prefix)) => Some(Selector::Prefix(prefix.to_string())),
            Some(("tag", tag)) => Some(Selector::Tag(tag.to_string())),
            None if text == "all" => Some(Selector::All),
            _ => None,
        }
    }

    fn matches(&self, entry: &Entry) -> bool {
        match self {
            Selector::Path(path) if path.contains('?') => &*entry.path == path,
            Selector::Path(path) => entry.path.split('?').next() == Some(path.as_str()),
            Selector::Prefix(prefix) => entry.path.starts_with(prefix.as_str()),
            Selector::Tag(tag) => entry.tags.iter().any(|t| **t == **tag),
            Selector::All => true,
        }
    }
}

/// One stored response. The meta stays serialized, as Pingora hands out a fresh
/// `CacheMeta` per hit.
struct Entry {
    meta: (Vec<u8>, Vec<u8>),
    body: Bytes,
    path: Box<str>,
    tags: Box<[Box<str>]>,
    /// How long to keep the entry: its freshness plus the longest stale window.
    keep_for: Duration,
    /// The meta decoded once, for hits the gateway answers itself; `None` inside when
    /// the entry varies (Pingora resolves variants).
    decoded: OnceLock<Option<Decoded>>,
}

struct Decoded {
    header: ResponseHeader,
    fresh_until: SystemTime,
    /// The time `Age` counts from.
    epoch: SystemTime,
}

impl Entry {
    fn new(
        meta: (Vec<u8>, Vec<u8>),
        body: Bytes,
        path: Box<str>,
        tags: Box<[Box<str>]>,
        keep_for: Duration,
    ) -> Entry {
        Entry {
            meta,
            body,
            path,
            tags,
            keep_for,
            decoded: OnceLock::new(),
        }
    }

    /// Bytes held, the decoded header estimated at four times its compressed size.
    fn size(&self) -> u64 {
        let tags: usize = self.tags.iter().map(|t| t.len()).sum();
        (self.meta.0.len() + 5 * self.meta.1.len() + self.body.len() + self.path.len() + tags)
            as u64
            + std::mem::size_of::<Entry>() as u64
    }

    fn decoded(&self) -> Option<&Decoded> {
        self.decoded
            .get_or_init(|| {
                let meta = CacheMeta::deserialize(&self.meta.0, &self.meta.1).ok()?;
                let varies =
                    meta.variance().is_some() || meta.headers().contains_key(http::header::VARY);
                if varies {
                    return None;
                }
                // What every fresh hit writes the same, settled once: the framing,
                // `x-cache: HIT`, and an `Age` slot that each hit only overwrites.
                let mut header = meta.response_header_copy();
                if !header.headers.contains_key(http::header::CONTENT_LENGTH) {
                    header.remove_header(&http::header::TRANSFER_ENCODING);
                    header
                        .insert_header(http::header::CONTENT_LENGTH, self.body.len())
                        .ok()?;
                }
                header.insert_header(http::header::AGE, 0).ok()?;
                header
                    .insert_header("x-cache", Outcome::Hit.header())
                    .ok()?;
                Some(Decoded {
                    header,
                    fresh_until: meta.fresh_until(),
                    epoch: meta.epoch(),
                })
            })
            .as_ref()
    }
}

/// A fresh stored response, with its `Age` set, ready to be written.
pub struct Fresh {
    pub header: ResponseHeader,
    pub body: Bytes,
}

struct KeepFor;

impl moka::Expiry<u128, Arc<Entry>> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &u128,
        entry: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.keep_for)
    }

    fn expire_after_update(
        &self,
        _key: &u128,
        entry: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.keep_for)
    }
}

/// The entries under one pair of bounds; replaced whole when a reload changes them.
struct Shelf {
    settings: Settings,
    entries: moka::sync::Cache<u128, Arc<Entry>>,
    bytes: Arc<AtomicU64>,
    paths: Arc<paths::PathIndex>,
}

impl Shelf {
    fn new(settings: Settings) -> Shelf {
        let bytes = Arc::new(AtomicU64::new(0));
        let paths = Arc::new(paths::PathIndex::new());
        let slot = (settings.max_size / settings.max_entries).max(1);
        let released = bytes.clone();
        let unindexed = paths.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(settings.max_size)
            .weigher(move |_, entry: &Arc<Entry>| {
                u32::try_from(entry.size().max(slot)).unwrap_or(u32::MAX)
            })
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(KeepFor)
            .eviction_listener(move |slot: Arc<u128>, entry: Arc<Entry>, cause| {
                released.fetch_sub(entry.size(), Ordering::Relaxed);
                // A replacement lives in the same slot, under the same path.
                if cause != moka::notification::RemovalCause::Replaced {
                    unindexed.remove(&entry.path, *slot);
                }
            })
            .build();
        Shelf {
            settings,
            entries,
            bytes,
            paths,
        }
    }

    fn insert(&self, key: u128, entry: Arc<Entry>) {
        self.bytes.fetch_add(entry.size(), Ordering::Relaxed);
        self.paths.add(&entry.path, key);
        self.entries.insert(key, entry);
    }
}

/// The cache storage Pingora reads and fills; one per process (Pingora wants it
/// `'static`).
pub struct Store {
    shelf: ArcSwap<Shelf>,
    shared: arc_swap::ArcSwapOption<shared::SharedTier>,
    lock: &'static CacheKeyLockImpl,
    served: [AtomicU64; 4],
}

impl Store {
    pub fn new(settings: Settings) -> &'static Store {
        let lock: &'static CacheLock = Box::leak(CacheLock::new_boxed(LOCK_AGE));
        let store: &'static Store = Box::leak(Box::new(Store {
            shelf: ArcSwap::from_pointee(Shelf::new(settings.clone())),
            shared: Default::default(),
            lock,
            served: Default::default(),
        }));
        store.configure_shared(&settings);
        store
    }

    /// Opens the shared tier the settings name, keeping the connection while the URL
    /// is unchanged.
    fn configure_shared(&'static self, settings: &Settings) {
        let current = self.shared.load_full();
        let next = match &settings.redis {
            None => None,
            Some((url, timeout)) => {
                let address = crate::redis::Address::Server(url.clone());
                match current.clone().filter(|t| t.store.address == address) {
                    Some(tier) if tier.timeout == *timeout => Some(tier),
                    Some(tier) => Some(Arc::new(tier.with_timeout(*timeout))),
                    None => match crate::redis::RedisStore::open(address, "cache store") {
                        Ok(store) => Some(Arc::new(shared::SharedTier::new(store, *timeout))),
                        Err(e) => {
                            tracing::error!("cache.redis: {e}; caching in this replica only");
                            None
                        }
                    },
                }
            }
        };
        if let Some(tier) = &next {
            if !current.is_some_and(|c| Arc::ptr_eq(&c, tier)) {
                crate::redis::runtime().spawn(shared::follow_purges(self, Arc::downgrade(tier)));
            }
        }
        self.shared.store(next);
    }

    /// Applies a new policy's bounds. Changed bounds start an empty cache: moka's
    /// capacity is fixed at construction.
    pub fn configure(&'static self, settings: &Settings) {
        let current = self.shelf.load();
        if !current.settings.same_shelf(settings) {
            current.entries.invalidate_all();
            self.shelf.store(Arc::new(Shelf::new(settings.clone())));
        }
        self.configure_shared(settings);
    }

    pub fn lock(&self) -> &'static CacheKeyLockImpl {
        self.lock
    }

    pub fn record(&self, outcome: Outcome) {
        self.served[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Entries and bytes held, after moka's pending evictions have run.
    pub fn usage(&self) -> (u64, u64) {
        let shelf = self.shelf.load();
        shelf.entries.run_pending_tasks();
        (
            shelf.entries.entry_count(),
            shelf.bytes.load(Ordering::Relaxed),
        )
    }

    /// Hits and stale answers over every request that looked in the cache.
    pub fn hit_ratio(&self) -> f64 {
        let [hit, miss, stale, _] = self.served.each_ref().map(|c| c.load(Ordering::Relaxed));
        let looked = hit + miss + stale;
        if looked == 0 {
            0.0
        } else {
            (hit + stale) as f64 / looked as f64
        }
    }

    /// The stored response for `key` when it is fresh and does not vary: what the
    /// gateway answers itself, without Pingora's cache state machine, which costs a
    /// header decode per hit. Anything else (missing, stale, varying) is left to it.
    pub fn fresh(&self, key: &CacheKey) -> Option<Fresh> {
        let entry = self.shelf.load().entries.get(&slot(key))?;
        let decoded = entry.decoded()?;
        let now = SystemTime::now();
        if decoded.fresh_until < now {
            return None;
        }
        let mut header = decoded.header.clone();
        let age = now.duration_since(decoded.epoch).unwrap_or_default();
        header
            .insert_header(http::header::AGE, age.as_secs())
            .ok()?;
        Some(Fresh {
            header,
            body: entry.body.clone(),
        })
    }

    /// The entry a request would find, variants resolved (for `POST /explain`).
    pub fn peek(&self, mut key: CacheKey, req: &RequestHeader) -> Option<CacheMeta> {
        let shelf = self.shelf.load();
        let read = |key: &CacheKey| {
            let entry = shelf.entries.get(&slot(key))?;
            CacheMeta::deserialize(&entry.meta.0, &entry.meta.1).ok()
        };
        let primary = read(&key)?;
        match variance(&primary, req) {
            Some(variance) if primary.variance() != Some(variance) => {
                key.set_variance_key(variance);
                read(&key)
            }
            _ => Some(primary),
        }
    }

    /// Removes the selected entries from this replica and from the shared tier;
    /// answers how many distinct entries went.
    pub async fn purge(&self, selector: &Selector) -> usize {
        let mut purged = self.purge_local(selector);
        if let Some(tier) = self.shared.load_full() {
            purged.extend(tier.purge(selector).await);
        }
        purged.sort_unstable();
        purged.dedup();
        purged.len()
    }

    /// Removes the selected entries of this replica; the shared tier's go in the
    /// background.
    pub fn invalidate(&self, selector: Selector) {
        self.purge_local(&selector);
        if let Some(tier) = self.shared.load_full() {
            crate::redis::runtime().spawn(async move {
                tier.purge(&selector).await;
            });
        }
    }

    fn purge_local(&self, selector: &Selector) -> Vec<u128> {
        let shelf = self.shelf.load();
        let doomed: Vec<u128> = match selector {
            // What every successful unsafe request asks for: looked up, not scanned.
            Selector::Path(path) => shelf
                .paths
                .slots(path)
                .into_iter()
                .filter(|slot| {
                    shelf
                        .entries
                        .get(slot)
                        .is_some_and(|entry| selector.matches(&entry))
                })
                .collect(),
            // Admin purges, rare: a scan of at most `max_entries`.
            Selector::Prefix(_) | Selector::Tag(_) | Selector::All => shelf
                .entries
                .iter()
                .filter(|(_, entry)| selector.matches(entry))
                .map(|(key, _)| *key)
                .collect(),
        };
        doomed
            .into_iter()
            .filter(|key| shelf.entries.remove(key).is_some())
            .collect()
    }
}

impl Store {
    /// Stores an entry in this replica and in the shared tier. The shared write is
    /// awaited (within the tier's timeout) so that once a client has the response,
    /// the other replicas can find it.
    async fn keep(&'static self, slot: u128, entry: Entry) {
        let entry = Arc::new(entry);
        self.shelf.load().insert(slot, entry.clone());
        if let Some(tier) = self.shared.load_full() {
            tier.put(slot, &entry).await;
        }
    }
}

fn slot(key: &impl CacheHashKey) -> u128 {
    u128::from_be_bytes(key.combined_bin())
}

#[async_trait]
impl Storage for Store {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> pingora::Result<Option<(CacheMeta, HitHandler)>> {
        let slot = slot(key);
        let shelf = self.shelf.load();
        let entry = match shelf.entries.get(&slot) {
            Some(entry) => entry,
            None => {
                let Some(tier) = self.shared.load_full() else {
                    return Ok(None);
                };
                let Some(entry) = tier.get(slot).await else {
                    return Ok(None);
                };
                let entry = Arc::new(entry);
                shelf.insert(slot, entry.clone());
                entry
            }
        };
        let meta = CacheMeta::deserialize(&entry.meta.0, &entry.meta.1)?;
        Ok(Some((meta, Box::new(Hit::new(entry.body.clone())))))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> pingora::Result<MissHandler> {
        let tag_header = &self.shelf.load().settings.tag_header;
        let tags = meta
            .headers()
            .get_all(tag_header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TAG_LEN)
            .take(MAX_TAGS)
            .map(Box::from)
            .collect();
        let expected = meta
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        Ok(Box::new(Fill {
            store: self,
            slot: slot(key),
            meta: meta.serialize()?,
            keep_for: keep_for(meta),
            path: key_path(key.primary_key_str().unwrap_or("")).into(),
            tags,
            body: Vec::with_capacity(expected.min(self.shelf.load().settings.max_object)),
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> pingora::Result<PurgeOutcome> {
        let slot = slot(target.key());
        if let Some(tier) = self.shared.load_full() {
            crate::redis::runtime().spawn(async move { tier.remove(slot).await });
        }
        Ok(match self.shelf.load().entries.remove(&slot) {
            Some(_) => PurgeOutcome::Purged(None),
            None => PurgeOutcome::NotFound,
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> pingora::Result<bool> {
        let shelf = self.shelf.load();
        let slot = slot(key);
        let Some(old) = shelf.entries.get(&slot) else {
            return Ok(false);
        };
        self.keep(
            slot,
            Entry::new(
                meta.serialize()?,
                old.body.clone(),
                old.path.clone(),
                old.tags.clone(),
                keep_for(meta),
            ),
        )
        .await;
        Ok(true)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// Kept while fresh or servable stale; at least a second so a just-stale entry can
/// still be revalidated.
fn keep_for(meta: &CacheMeta) -> Duration {
    let stale = meta
        .stale_while_revalidate_sec()
        .max(meta.stale_if_error_sec());
    let fresh = meta
        .fresh_until()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    fresh + Duration::from_secs(u64::from(stale).max(1))
}

/// A stored body being served: whole, or the ranges Pingora's range filter seeks to
/// (single and multipart `Range` requests on hits).
struct Hit {
    body: Bytes,
    range: std::ops::Range<usize>,
    done: bool,
}

impl Hit {
    fn new(body: Bytes) -> Hit {
        Hit {
            range: 0..body.len(),
            body,
            done: false,
        }
    }
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> pingora::Result<Option<Bytes>> {
        if std::mem::replace(&mut self.done, true) {
            return Ok(None);
        }
        Ok(Some(self.body.slice(self.range.clone())))
    }

    fn can_seek(&self) -> bool {
        true
    }

    /// `end` is exclusive; `None` reads to the end of the body.
    fn seek(&mut self, start: usize, end: Option<usize>) -> pingora::Result<()> {
        let len = self.body.len();
        if start >= len {
            return pingora::Error::e_explain(
                pingora::ErrorType::InternalError,
                format!("range start {start} is beyond the body's {len} bytes"),
            );
        }
        self.range = start..end.map_or(len, |end| end.min(len));
        self.done = false;
        Ok(())
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> pingora::Result<()> {
        Ok(())
    }

    fn entry_id(&self) -> Option<CacheEntryId> {
        None
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// A response being stored: its body is gathered, then the entry is inserted whole,
/// so a lookup never sees half a body.
struct Fill {
    store: &'static Store,
    slot: u128,
    meta: (Vec<u8>, Vec<u8>),
    keep_for: Duration,
    path: Box<str>,
    tags: Box<[Box<str>]>,
    body: Vec<u8>,
}

#[async_trait]
impl HandleMiss for Fill {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> pingora::Result<()> {
        self.body.extend_from_slice(&data);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> pingora::Result<MissFinishType> {
        let Fill {
            store,
            slot,
            meta,
            keep_for,
            path,
            tags,
            body,
        } = *self;
        let entry = Entry::new(meta, body.into(), path, tags, keep_for);
        let size = entry.size() as usize;
        store.keep(slot, entry).await;
        Ok(MissFinishType::Created(size))
    }
}

/// Whether an upstream outcome lets a stale entry stand in (RFC 5861 stale-if-error):
/// the upstream failed, timed out, answered 5xx, or its circuit is open.
pub fn error_allows_stale(error: &pingora::Error) -> bool {
    use pingora::ErrorType::*;
    match error.etype() {
        HTTPStatus(status) => *status >= 500,
        _ => !matches!(error.esource(), pingora::ErrorSource::Downstream),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_cache(c: RouteCacheConfig) -> RouteCache {
        let metrics = crate::metrics::Metrics::new();
        compile_route(Path::new("t.yaml"), "r", &c, &metrics, &mut Vec::new()).unwrap()
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(status, None).unwrap();
        for (name, value) in headers {
            resp.append_header(name.to_string(), *value).unwrap();
        }
        resp
    }

    fn fresh_secs(outcome: RespCacheable) -> Option<i64> {
        match outcome {
            RespCacheable::Cacheable(meta) => {
                Some(match meta.fresh_until().duration_since(meta.created()) {
                    Ok(d) => d.as_secs() as i64,
                    Err(_) => -1,
                })
            }
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn freshness_follows_rfc_9111() {
        let rc = route_cache(RouteCacheConfig::default());
        let fresh = |h: &[(&str, &str)]| fresh_secs(cacheability(&rc, &response(200, h), false));
        assert_eq!(
            fresh(&[]),
            Some(300),
            "route ttl without upstream freshness"
        );
        assert_eq!(fresh(&[("cache-control", "max-age=60")]), Some(60));
        assert_eq!(
            fresh(&[("cache-control", "max-age=60, s-maxage=7")]),
            Some(7),
            "s-maxage wins in a shared cache"
        );
        assert_eq!(fresh(&[("cache-control", "no-store")]), None);
        assert_eq!(fresh(&[("cache-control", "private")]), None);
        assert_eq!(
            fresh(&[("cache-control", "no-cache")]),
            Some(-1),
            "stored stale"
        );
        assert_eq!(fresh(&[("set-cookie", "a=b")]), None);
        assert_eq!(fresh(&[("vary", "*")]), None);
        assert_eq!(
            fresh_secs(cacheability(&rc, &response(500, &[]), false)),
            None,
            "status not listed"
        );
        let forced = route_cache(RouteCacheConfig {
            force_ttl: true,
            ..Default::default()
        });
        let forced_fresh =
            |h: &[(&str, &str)]| fresh_secs(cacheability(&forced, &response(200, h), false));
        assert_eq!(forced_fresh(&[("cache-control", "max-age=5")]), Some(300));
        assert_eq!(forced_fresh(&[("cache-control", "no-store")]), None);
    }

    #[test]
    fn authorized_requests_store_only_what_the_origin_allows() {
        let rc = route_cache(RouteCacheConfig::default());
        let stored =
            |h: &[(&str, &str)]| fresh_secs(cacheability(&rc, &response(200, h), true)).is_some();
        assert!(!stored(&[("cache-control", "max-age=60")]));
        assert!(stored(&[("cache-control", "public, max-age=60")]));
        assert!(stored(&[("cache-control", "s-maxage=60")]));
    }

    #[test]
    fn keys_hold_scheme_host_user_and_vary() {
        let rc = route_cache(RouteCacheConfig {
            per_user: true,
            vary: vec![serde_saphyr::Spanned::new(
                "accept-language".into(),
                Location::UNKNOWN,
                Location::UNKNOWN,
            )],
            ..Default::default()
        });
        let req = |host: &str, lang: &str| {
            let mut r = RequestHeader::build("GET", b"/a?b=1", None).unwrap();
            r.insert_header("host", host).unwrap();
            r.insert_header("accept-language", lang).unwrap();
            r
        };
        let k = |r: &RequestHeader, tls, user| key(&rc, "r", r, tls, user).combined_bin();
        let base = k(&req("a.example", "en"), false, Some("u1"));
        assert_ne!(base, k(&req("b.example", "en"), false, Some("u1")));
        assert_ne!(base, k(&req("a.example", "en"), true, Some("u1")));
        assert_ne!(base, k(&req("a.example", "en"), false, Some("u2")));
        assert_ne!(base, k(&req("a.example", "fr"), false, Some("u1")));
        assert_eq!(base, k(&req("A.example", "en"), false, Some("u1")));
        let primary = key(&rc, "r", &req("a.example", "en"), false, None);
        assert_eq!(key_path(primary.primary_key_str().unwrap()), "/a?b=1");
    }

    #[test]
    fn both_bounds_hold_under_a_flood() {
        let store = Store::new(Settings {
            max_size: 64 * 1024,
            max_entries: 16,
            max_object: 8 * 1024,
            tag_header: HeaderName::from_static("cache-tag"),
            redis: None,
        });
        let shelf = store.shelf.load();
        for i in 0..1_000u128 {
            shelf.insert(
                i,
                Arc::new(Entry::new(
                    (vec![0; 64], vec![0; 64]),
                    Bytes::from(vec![0u8; if i % 2 == 0 { 100 } else { 6_000 }]),
                    format!("/p/{i}").into(),
                    Box::new([]),
                    Duration::from_secs(60),
                )),
            );
        }
        let (entries, bytes) = store.usage();
        assert!(entries <= 16, "{entries} entries");
        assert!(bytes <= 64 * 1024, "{bytes} bytes");
        assert!(entries > 0);
        assert_eq!(
            shelf.paths.len() as u64,
            entries,
            "the path index follows the evictions"
        );
    }

    #[test]
    fn purge_selects_by_path_prefix_and_tag() {
        let store = Store::new(Settings {
            max_size: 1 << 20,
            max_entries: 100,
            max_object: 1 << 16,
            tag_header: HeaderName::from_static("cache-tag"),
            redis: None,
        });
        let shelf = store.shelf.load();
        for (i, (path, tag)) in [
            ("/a?x=1", "t1"),
            ("/a?x=2", "t2"),
            ("/ab", "t1"),
            ("/b", "t3"),
        ]
        .into_iter()
        .enumerate()
        {
            shelf.insert(
                i as u128,
                Arc::new(Entry::new(
                    (Vec::new(), Vec::new()),
                    Bytes::new(),
                    path.into(),
                    Box::new([tag.into()]),
                    Duration::from_secs(60),
                )),
            );
        }
        let purge = |selector| store.purge_local(&selector).len();
        assert_eq!(purge(Selector::Path("/a?x=1".into())), 1);
        assert_eq!(purge(Selector::Path("/a".into())), 1, "/a?x=2, not /ab");
        assert_eq!(purge(Selector::Tag("t1".into())), 1);
        assert_eq!(purge(Selector::Prefix("/".into())), 1);
        assert_eq!(purge(Selector::All), 0);
        assert_eq!(store.usage().0, 0);
        assert_eq!(shelf.paths.len(), 0);
    }
}
