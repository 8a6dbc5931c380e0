//! RFC 9111 decisions, and nothing else: whether a request may use the cache, the key
//! it uses, whether a response may be stored and for how long, when a stale entry may
//! stand in. What a reviewer checks against the RFC and the cache-tests suite.

use pingora::cache::cache_control::{CacheControl, Cacheable, InterpretCacheControl};
use pingora::cache::filters::{calculate_expires_header_time, calculate_serve_stale_durations};
use pingora::cache::key::HashBinary;
use pingora::cache::{
    CacheKey, CacheMeta, CacheMetaDefaults, NoCacheReason, RespCacheable, VarianceBuilder,
};
use pingora::http::{RequestHeader, ResponseHeader};
use std::time::{Duration, SystemTime};

use super::RouteCache;

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
pub(crate) fn credentials_allow(
    rc: &RouteCache,
    req: &RequestHeader,
    stored: &ResponseHeader,
) -> bool {
    rc.per_user
        || !req.headers.contains_key(http::header::AUTHORIZATION)
        || directives(rc, stored)
            .0
            .is_some_and(|cc| cc.allow_caching_authorized_req())
}

/// RFC 9213 §2.2: the first of the route's targeted fields (`cache.targeted`) with a
/// valid, non-empty structured-field dictionary; `None` when Cache-Control speaks.
pub(crate) fn targeted_field<'a>(
    rc: &'a RouteCache,
    headers: &http::HeaderMap,
) -> Option<&'a http::HeaderName> {
    rc.targeted.iter().find(|name| {
        let mut lines = headers.get_all(*name).iter();
        let Some(first) = lines.next() else {
            return false;
        };
        let parsed = match lines.next() {
            None => sfv::Parser::parse_dictionary(first.as_bytes()),
            // Several lines are one list (RFC 9110 §5.3).
            Some(second) => {
                let mut value = [first.as_bytes(), second.as_bytes()].join(&b", "[..]);
                for line in lines {
                    value.extend_from_slice(b", ");
                    value.extend_from_slice(line.as_bytes());
                }
                sfv::Parser::parse_dictionary(&value)
            }
        };
        parsed.is_ok_and(|dictionary| !dictionary.is_empty())
    })
}

/// The directives this cache obeys: a targeted field's when one is present and valid
/// (then Cache-Control and Expires are ignored; the field is returned), else
/// Cache-Control's.
fn directives<'a>(
    rc: &'a RouteCache,
    resp: &ResponseHeader,
) -> (Option<CacheControl>, Option<&'a http::HeaderName>) {
    match targeted_field(rc, &resp.headers) {
        Some(name) => (
            CacheControl::from_resp_headers_named(name.as_str(), resp),
            Some(name),
        ),
        None => (CacheControl::from_resp_headers(resp), None),
    }
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
pub(crate) fn key(
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
                    primary.push_str(&crate::digest::hex(&digest));
                }
            }
        }
    }
    for name in &rc.vary {
        primary.push('\n');
        primary.push_str(name.as_str());
        primary.push(':');
        primary.push_str(&String::from_utf8_lossy(&variant(
            req.headers.get_all(name),
        )));
    }
    // Pingora would hash the key with BLAKE2b (a 128-byte block, twelve rounds) where
    // anything needs it: the entry's slot, the cache lock. One BLAKE3 block (64 bytes,
    // seven rounds) is as collision-resistant at 128 bits and a quarter of the work
    // (467 instructions against 1,892 per hit); every user of the key reads the override. Replicas sharing entries through Redis must
    // run the same digest (a release that changes it starts the shared tier cold).
    let digest = blake3::hash(primary.as_bytes());
    let mut key = CacheKey::new(primary, "");
    key.set_primary_bin_override(digest.as_bytes()[..16].try_into().expect("16 of 32 bytes"));
    key
}

/// The path and query a key was made for (see [`key`]), for purges.
pub(super) fn key_path(primary: &str) -> &str {
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
            let seen = variant(req.headers.get_all(name.as_str()));
            builder.add_owned_name_value(name, seen);
        }
    }
    builder.finalize()
}

/// What selects a variant of a varied field (RFC 9111 §4.1 lets a cache normalise):
/// its list members, trimmed, lowercased and sorted, so `fr, EN` and `en,fr` are one
/// variant. No field and an empty one are one variant too.
/// Two allocations whatever the number of members: it runs for every request of a
/// route with `vary`.
fn variant(lines: http::header::GetAll<'_, http::HeaderValue>) -> Vec<u8> {
    fn lowercase(member: &[u8]) -> impl Iterator<Item = u8> + '_ {
        member.iter().map(u8::to_ascii_lowercase)
    }
    let mut members: Vec<&[u8]> = lines
        .iter()
        .flat_map(|line| line.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|member| !member.is_empty())
        .collect();
    members.sort_unstable_by(|a, b| lowercase(a).cmp(lowercase(b)));
    let mut variant = Vec::with_capacity(members.iter().map(|m| m.len() + 1).sum());
    for (i, member) in members.iter().enumerate() {
        if i > 0 {
            variant.push(b',');
        }
        variant.extend(lowercase(member));
    }
    variant
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
    let vary_any = resp
        .headers
        .get_all(http::header::VARY)
        .iter()
        .any(|v| v.to_str().unwrap_or("").split(',').any(|n| n.trim() == "*"));
    if vary_any {
        return uncacheable();
    }
    let (cc, targeted) = directives(rc, resp);
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
    let mut header = resp.clone();
    if let Some(cc) = &cc {
        cc.strip_private_headers(&mut header);
    }
    if let Some(name) = targeted {
        header.remove_header(name);
    }
    let expires = if targeted.is_some() {
        None
    } else {
        calculate_expires_header_time(resp)
    };
    let explicit = cc
        .as_ref()
        .and_then(|cc| cc.fresh_duration())
        .or(expires.is_some().then_some(Duration::ZERO));
    // A cookie is somebody's (NGINX and Varnish never store it): stored only when the
    // origin itself said how long the response may be shared (RFC 9111 §3.1 allows
    // that), never on the route's own `ttl`. `private="set-cookie"` and
    // `no-cache="set-cookie"` stored it without the field, above.
    let public = cc.as_ref().is_some_and(|cc| cc.public());
    if header.headers.contains_key(http::header::SET_COOKIE) && explicit.is_none() && !public {
        return uncacheable();
    }
    let now = SystemTime::now();
    let no_cache = cc.as_ref().is_some_and(|cc| cc.no_cache());
    let date = date(resp);
    let lifetime = if no_cache {
        Duration::ZERO
    } else if rc.force_ttl {
        rc.ttl
    } else {
        match cc.as_ref().and_then(|cc| cc.fresh_duration()) {
            Some(fresh) => fresh,
            // §4.2.1: Expires counts from the origin's Date, not from our clock; one
            // before Date, or one that does not parse, is already past.
            None => match expires {
                Some(expires) => expires
                    .duration_since(date.unwrap_or(now))
                    .unwrap_or_default(),
                None => heuristic_lifetime(rc, resp, date.unwrap_or(now)).unwrap_or(rc.ttl),
            },
        }
    };
    // §4.2.3: the age it arrived with — what the upstream's Age says, or the time since
    // its Date, whichever is more (whole seconds, HTTP's resolution). The entry is dated
    // that much earlier, so freshness and every hit's Age count it.
    let apparent_age = date
        .and_then(|date| now.duration_since(date).ok())
        .map_or(Duration::ZERO, |age| Duration::from_secs(age.as_secs()));
    let initial_age = age_value(resp).unwrap_or_default().max(apparent_age);
    let created = now
        .checked_sub(initial_age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // Zero freshness, or an age beyond it: stored already stale, served only after
    // revalidation.
    let stale_now = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
    let fresh_until = match created.checked_add(lifetime) {
        Some(until) if !lifetime.is_zero() && until > now => until,
        _ => stale_now,
    };
    let defaults = CacheMetaDefaults::new(|_| None, rc.stale_while_revalidate, rc.stale_if_error);
    let (stale_while_revalidate, stale_if_error) = if no_cache {
        (0, 0)
    } else {
        calculate_serve_stale_durations(cc.as_ref(), &defaults)
    };
    Store(CacheMeta::new(
        fresh_until,
        created,
        stale_while_revalidate,
        stale_if_error,
        header,
    ))
}

/// RFC 9111 §3.2, §4.3.4: the stored response updated by the upstream's 304 to its
/// revalidation. Every field the 304 carries replaces the stored one, except
/// `Content-Length` and the framing fields (they describe the 304's empty body). The
/// stored `Age` and `Date` told how old the response was when it first arrived: the
/// 304's own (or none) tell it now.
pub fn update_stored(stored: &ResponseHeader, not_modified: &ResponseHeader) -> ResponseHeader {
    use http::header::{AGE, CONTENT_LENGTH, CONTENT_RANGE, DATE, TRANSFER_ENCODING};
    let mut updated = stored.clone();
    updated.remove_header(&AGE);
    updated.remove_header(&DATE);
    for name in not_modified.headers.keys() {
        if [CONTENT_LENGTH, TRANSFER_ENCODING, CONTENT_RANGE].contains(name) {
            continue;
        }
        updated.remove_header(name);
        for value in not_modified.headers.get_all(name) {
            updated
                .append_header(name.clone(), value.clone())
                .expect("a field that was already in a header");
        }
    }
    updated
}

/// RFC 9111 §4.2.2, when the route allows it (`cache.heuristic`): a response with a
/// `Last-Modified` and no explicit freshness stays fresh for that share of the time it
/// had gone unmodified when sent, at most `cache.heuristic_max`.
fn heuristic_lifetime(
    rc: &RouteCache,
    resp: &ResponseHeader,
    sent: SystemTime,
) -> Option<Duration> {
    if rc.heuristic <= 0.0 {
        return None;
    }
    let value = resp
        .headers
        .get(http::header::LAST_MODIFIED)?
        .to_str()
        .ok()?;
    let modified = httpdate::parse_http_date(value.trim()).ok()?;
    let unmodified = sent.duration_since(modified).ok()?;
    Some(unmodified.mul_f64(rc.heuristic).min(rc.heuristic_max))
}

/// The `Age` an upstream sent (RFC 9111 §5.1): the first value when there are several
/// or a list; a value that is not a whole number of seconds is ignored; one too large
/// to count saturates at 2^31 seconds (§1.2.2).
fn age_value(resp: &ResponseHeader) -> Option<Duration> {
    let value = resp.headers.get(http::header::AGE)?.to_str().ok()?;
    let first = value.split(',').next()?.trim();
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    const SATURATED: u64 = 1 << 31;
    Some(Duration::from_secs(
        first
            .parse::<u64>()
            .map_or(SATURATED, |secs| secs.min(SATURATED)),
    ))
}

/// The origin's `Date`, in any of the three formats RFC 9110 §5.6.7 makes a recipient
/// accept; `None` when absent or unreadable.
fn date(resp: &ResponseHeader) -> Option<SystemTime> {
    let value = resp.headers.get(http::header::DATE)?.to_str().ok()?;
    httpdate::parse_http_date(value.trim()).ok()
}

/// Kept while fresh or servable stale; at least a second so a just-stale entry can
/// still be revalidated.
pub(super) fn keep_for(meta: &CacheMeta) -> Duration {
    let stale = meta
        .stale_while_revalidate_sec()
        .max(meta.stale_if_error_sec());
    let fresh = meta
        .fresh_until()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    fresh + Duration::from_secs(u64::from(stale).max(1))
}

/// Whether an upstream outcome lets a stale entry stand in (RFC 5861 stale-if-error):
/// the upstream failed, timed out, answered 5xx, or its circuit is open.
pub(crate) fn error_allows_stale(error: &pingora::Error) -> bool {
    use pingora::ErrorType::*;
    match error.etype() {
        HTTPStatus(status) => *status >= 500,
        _ => !matches!(error.esource(), pingora::ErrorSource::Downstream),
    }
}

#[cfg(test)]
mod tests {
    use super::super::compile_route;
    use super::*;
    use crate::config::RouteCacheConfig;
    use pingora::cache::key::CacheHashKey;
    use serde_saphyr::Location;
    use std::path::Path;

    fn route_cache(c: RouteCacheConfig) -> RouteCache {
        let (metrics, events) = (crate::metrics::Metrics::new(), Default::default());
        let mut cx = crate::policy::compile::Compile::new(Path::new("t.yaml"), &metrics, &events);
        compile_route(&mut cx, "r", &c).unwrap()
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

    fn http_date(offset_secs: i64) -> String {
        let now = SystemTime::now();
        let at = if offset_secs >= 0 {
            now + Duration::from_secs(offset_secs as u64)
        } else {
            now - Duration::from_secs(offset_secs.unsigned_abs())
        };
        httpdate::fmt_http_date(at)
    }

    #[test]
    fn rfc9111_4_2_3_the_age_it_arrived_with_counts() {
        let rc = route_cache(RouteCacheConfig::default());
        let stored = |h: &[(&str, &str)]| match cacheability(&rc, &response(200, h), false) {
            RespCacheable::Cacheable(meta) => meta,
            RespCacheable::Uncacheable(_) => panic!("not stored"),
        };
        let now = SystemTime::now();
        // Age beyond max-age: stored stale.
        let old = stored(&[("cache-control", "max-age=60"), ("age", "3600")]);
        assert!(!old.is_fresh(now));
        // Age within it: fresh for the rest, and a hit's Age starts where it arrived.
        let young = stored(&[("cache-control", "max-age=600"), ("age", "100")]);
        assert!(young.is_fresh(now + Duration::from_secs(490)));
        assert!(!young.is_fresh(now + Duration::from_secs(510)));
        assert!(young.age() >= Duration::from_secs(100));
        // §5.1: the first of a list; an invalid value is ignored; a huge one saturates.
        let listed = stored(&[("cache-control", "max-age=600"), ("age", "100, 9000")]);
        assert!(
            listed.age() >= Duration::from_secs(100) && listed.age() < Duration::from_secs(200)
        );
        for invalid in ["-5", "1.5", "soon", ""] {
            let meta = stored(&[("cache-control", "max-age=60"), ("age", invalid)]);
            assert!(meta.is_fresh(now), "Age `{invalid}` was not ignored");
        }
        let huge = stored(&[
            ("cache-control", "max-age=60"),
            ("age", "99999999999999999999"),
        ]);
        assert!(!huge.is_fresh(now));
        // The time since the origin's Date counts as age too.
        let dated = stored(&[("cache-control", "max-age=60"), ("date", &http_date(-120))]);
        assert!(!dated.is_fresh(now));
    }

    #[test]
    fn rfc9111_4_2_1_expires_counts_from_date() {
        let rc = route_cache(RouteCacheConfig::default());
        let fresh = |h: &[(&str, &str)]| match cacheability(&rc, &response(200, h), false) {
            RespCacheable::Cacheable(meta) => meta.is_fresh(SystemTime::now()),
            RespCacheable::Uncacheable(_) => panic!("not stored"),
        };
        // An origin clock an hour ahead: Expires - Date is a minute, not an hour.
        let (date, expires) = (http_date(3600), http_date(3660));
        assert!(fresh(&[("date", &date), ("expires", &expires)]));
        let rc_meta = cacheability(
            &rc,
            &response(200, &[("date", &date), ("expires", &expires)]),
            false,
        );
        let RespCacheable::Cacheable(meta) = rc_meta else {
            panic!("not stored")
        };
        assert!(meta.fresh_sec() <= 60, "fresh for {}s", meta.fresh_sec());
        // Expires before Date: stale, whatever our clock says.
        assert!(!fresh(&[
            ("date", &http_date(3600)),
            ("expires", &http_date(1800))
        ]));
        // An invalid Expires is already past (§5.3); ANSI C's asctime format is a date.
        assert!(!fresh(&[("expires", "0")]));
        let asctime = |imf: String| {
            // "Sun, 06 Nov 1994 08:49:37 GMT" -> "Sun Nov  6 08:49:37 1994"
            let p: Vec<&str> = imf.split(' ').collect();
            let day: u32 = p[1].parse().unwrap();
            format!(
                "{} {} {day:>2} {} {}",
                p[0].trim_end_matches(','),
                p[2],
                p[4],
                p[3]
            )
        };
        let (date, expires) = (asctime(http_date(3600)), asctime(http_date(3660)));
        let RespCacheable::Cacheable(meta) = cacheability(
            &rc,
            &response(200, &[("date", &date), ("expires", &expires)]),
            false,
        ) else {
            panic!("not stored")
        };
        assert!(
            (59..=60).contains(&meta.fresh_sec()),
            "{date} {expires}: {}s",
            meta.fresh_sec()
        );
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

    /// RFC 9213: the first valid targeted field stands for Cache-Control and Expires,
    /// and is not stored; an invalid or empty one is ignored; `[]` turns them off.
    #[test]
    fn rfc9213_targeted_fields_override_cache_control() {
        let rc = route_cache(RouteCacheConfig::default());
        let fresh = |h: &[(&str, &str)]| fresh_secs(cacheability(&rc, &response(200, h), false));
        let cc = ("cache-control", "max-age=60");
        assert_eq!(
            fresh(&[cc, ("cdn-cache-control", "max-age=600")]),
            Some(600)
        );
        assert_eq!(
            fresh(&[
                cc,
                ("cdn-cache-control", "max-age=600"),
                ("tollgate-cache-control", "max-age=900")
            ]),
            Some(900),
            "the route's order decides"
        );
        assert_eq!(fresh(&[cc, ("cdn-cache-control", "no-store")]), None);
        assert_eq!(
            fresh(&[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=600")
            ]),
            Some(600)
        );
        assert_eq!(fresh(&[cc, ("cdn-cache-control", "private")]), None);
        assert_eq!(fresh(&[cc, ("cdn-cache-control", "no-cache")]), Some(-1));
        assert_eq!(
            fresh(&[("expires", "0"), ("cdn-cache-control", "max-age=600")]),
            Some(600),
            "Expires is ignored too"
        );
        for invalid in ["max-age=\"60", "max-age=60,,", "", "MAX-AGE=600"] {
            assert_eq!(
                fresh(&[cc, ("cdn-cache-control", invalid)]),
                Some(60),
                "`{invalid}` was obeyed"
            );
        }
        // Several lines are one dictionary; one invalid line spoils it.
        assert_eq!(
            fresh(&[
                cc,
                ("cdn-cache-control", "max-age=600"),
                ("cdn-cache-control", "must-revalidate")
            ]),
            Some(600)
        );
        assert_eq!(
            fresh(&[
                cc,
                ("cdn-cache-control", "max-age=600"),
                ("cdn-cache-control", "max-age=\"6")
            ]),
            Some(60)
        );
        let RespCacheable::Cacheable(meta) = cacheability(
            &rc,
            &response(
                200,
                &[
                    cc,
                    ("tollgate-cache-control", "max-age=600"),
                    ("cdn-cache-control", "max-age=5"),
                ],
            ),
            false,
        ) else {
            panic!("not stored")
        };
        assert!(!meta.headers().contains_key("tollgate-cache-control"));
        assert!(
            meta.headers().contains_key("cdn-cache-control"),
            "an unused field is the next cache's"
        );
        let off = route_cache(RouteCacheConfig {
            targeted: Vec::new(),
            ..Default::default()
        });
        assert_eq!(
            fresh_secs(cacheability(
                &off,
                &response(200, &[cc, ("cdn-cache-control", "max-age=600")]),
                false
            )),
            Some(60)
        );
    }

    /// RFC 9111 §4.2.2: off by default (the route's ttl); on, a share of the time since
    /// Last-Modified, capped; explicit freshness always wins.
    #[test]
    fn rfc9111_4_2_2_heuristic_freshness_only_when_the_route_says_so() {
        let day_old = http_date(-86_400);
        let last_modified = [("last-modified", day_old.as_str())];
        let default = route_cache(RouteCacheConfig::default());
        assert_eq!(
            fresh_secs(cacheability(
                &default,
                &response(200, &last_modified),
                false
            )),
            Some(300)
        );
        let tenth = route_cache(RouteCacheConfig {
            heuristic: crate::units::Percent(0.1),
            ..Default::default()
        });
        let fresh = |h: &[(&str, &str)]| fresh_secs(cacheability(&tenth, &response(200, h), false));
        let secs = fresh(&last_modified).unwrap();
        assert!((8639..=8640).contains(&secs), "{secs}");
        assert_eq!(
            fresh(&[("cache-control", "max-age=5"), last_modified[0]]),
            Some(5)
        );
        assert_eq!(fresh(&[]), Some(300), "no Last-Modified: the route's ttl");
        let capped = route_cache(RouteCacheConfig {
            heuristic: crate::units::Percent(0.1),
            heuristic_max: crate::units::Duration::from_secs(60),
            ..Default::default()
        });
        assert_eq!(
            fresh_secs(cacheability(&capped, &response(200, &last_modified), false)),
            Some(60)
        );
    }

    /// Set-Cookie is stored when the origin said how long the response may be shared,
    /// never on the route's own ttl; `private="set-cookie"` stores it without the field.
    #[test]
    fn set_cookie_is_stored_only_with_explicit_shared_freshness() {
        let rc = route_cache(RouteCacheConfig::default());
        let stored = |h: &[(&str, &str)]| match cacheability(&rc, &response(200, h), false) {
            RespCacheable::Cacheable(meta) => Some(meta.headers().contains_key("set-cookie")),
            RespCacheable::Uncacheable(_) => None,
        };
        let cookie = ("set-cookie", "a=b");
        assert_eq!(stored(&[cookie]), None);
        assert_eq!(
            stored(&[cookie, ("cache-control", "max-age=60")]),
            Some(true)
        );
        assert_eq!(stored(&[cookie, ("cache-control", "public")]), Some(true));
        assert_eq!(stored(&[cookie, ("expires", &http_date(60))]), Some(true));
        assert_eq!(stored(&[cookie, ("cache-control", "private")]), None);
        assert_eq!(
            stored(&[
                cookie,
                ("cache-control", "max-age=60, private=\"set-cookie\"")
            ]),
            Some(false)
        );
        assert_eq!(
            stored(&[
                cookie,
                ("cache-control", "max-age=60, no-cache=\"set-cookie\"")
            ]),
            Some(false)
        );
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
        // Whitespace, case and order within the varied field select the same variant.
        let listed = k(&req("a.example", "fr, EN"), false, Some("u1"));
        assert_eq!(listed, k(&req("a.example", "en,fr"), false, Some("u1")));
        assert_ne!(listed, base);
        let primary = key(&rc, "r", &req("a.example", "en"), false, None);
        assert_eq!(key_path(primary.primary_key_str().unwrap()), "/a?b=1");
        // The slot every replica files the entry under: BLAKE3 of the key, whatever
        // Pingora's own default digest.
        let text = primary.primary_key_str().unwrap().as_bytes();
        assert_eq!(primary.primary_bin(), blake3::hash(text).as_bytes()[..16]);
    }
}
