//! SPEC §3 `routes` (match, target, SLO, fallback, priority) and the cache sections:
//! the shared `cache` bounds and each route's `cache`.

use super::limits::default_redis_timeout;
use super::Priority;
use crate::units::{Duration, Percent, Size};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteConfig {
    pub(crate) name: Spanned<String>,
    #[serde(rename = "match", default)]
    pub(crate) matcher: MatchConfig,
    pub(crate) upstream: Spanned<UpstreamRef>,
    #[serde(default)]
    pub(crate) slo: Option<SloConfig>,
    #[serde(default)]
    pub(crate) timeout: Option<Duration>,
    #[serde(default)]
    pub(crate) strip_prefix: bool,
    #[serde(default)]
    pub(crate) fallback: Option<FallbackConfig>,
    #[serde(default)]
    pub(crate) priority: Priority,
    #[serde(default, deserialize_with = "route_cache")]
    pub(crate) cache: Option<RouteCacheConfig>,
}

/// What a route answers instead of 503 when its pool's circuit is open.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FallbackConfig {
    #[serde(default = "default_fallback_status")]
    pub(crate) status: Spanned<u16>,
    #[serde(default = "default_fallback_content_type")]
    pub(crate) content_type: String,
    #[serde(default)]
    pub(crate) body: String,
}

fn default_fallback_status() -> Spanned<u16> {
    Spanned::new(
        200,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

fn default_fallback_content_type() -> String {
    "application/json".into()
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MatchConfig {
    pub(crate) path: Option<Spanned<String>>,
    pub(crate) path_prefix: Option<Spanned<String>>,
    pub(crate) path_regex: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) methods: Vec<Spanned<String>>,
    pub(crate) host: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, String>,
}

/// A route's target: one pool, or a weighted split `{ app: 95, app-v2: 5 }` for canaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub(crate) enum UpstreamRef {
    Pool(String),
    Split(Vec<(String, u32)>),
}

impl<'de> Deserialize<'de> for UpstreamRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RefVisitor;
        impl<'de> Visitor<'de> for RefVisitor {
            type Value = UpstreamRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an upstream name or a weighted split such as { app: 95, app-v2: 5 }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UpstreamRef, E> {
                Ok(UpstreamRef::Pool(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UpstreamRef, A::Error> {
                let mut split = Vec::new();
                while let Some((name, weight)) = map.next_entry::<String, u32>()? {
                    split.push((name, weight));
                }
                Ok(UpstreamRef::Split(split))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<UpstreamRef, A::Error> {
                Err(de::Error::custom(
                    "a list is not an upstream: use one name, or a map of names to weights",
                ))
            }
        }
        deserializer.deserialize_any(RefVisitor)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct SloConfig {
    pub(crate) availability: Option<Percent>,
    pub(crate) p95: Option<Duration>,
    pub(crate) p99: Option<Duration>,
}

/// SPEC §3 `cache`: the bounds of the response cache shared by every caching route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct CacheConfig {
    pub(crate) max_size: Size,
    pub(crate) max_entries: Spanned<u64>,
    pub(crate) max_object: Size,
    pub(crate) tag_header: String,
    pub(crate) redis: Option<CacheRedisConfig>,
}

/// SPEC §3 `cache.redis`: a second tier shared by replicas.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheRedisConfig {
    pub(crate) url: Spanned<String>,
    #[serde(default = "default_redis_timeout")]
    pub(crate) timeout: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size: Size(256 << 20),
            max_entries: Spanned::new(
                10_000,
                serde_saphyr::Location::UNKNOWN,
                serde_saphyr::Location::UNKNOWN,
            ),
            max_object: Size(8 << 20),
            tag_header: "cache-tag".into(),
            redis: None,
        }
    }
}

/// SPEC §3 `routes[].cache`: `false` (or absent) turns caching off for the route, a
/// map turns it on with these settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RouteCacheConfig {
    pub(crate) ttl: Duration,
    pub(crate) force_ttl: bool,
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) stale_if_error: Duration,
    pub(crate) per_user: bool,
    pub(crate) vary: Vec<Spanned<String>>,
    pub(crate) methods: Vec<Spanned<String>>,
    pub(crate) statuses: Vec<Spanned<u16>>,
    pub(crate) warm: Vec<Spanned<String>>,
    pub(crate) targeted: Vec<Spanned<String>>,
    pub(crate) heuristic: Percent,
    pub(crate) heuristic_max: Duration,
}

impl Default for RouteCacheConfig {
    fn default() -> Self {
        let unknown = serde_saphyr::Location::UNKNOWN;
        RouteCacheConfig {
            ttl: Duration::from_secs(300),
            force_ttl: false,
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(600),
            per_user: false,
            vary: Vec::new(),
            methods: ["GET", "HEAD"]
                .map(|m| Spanned::new(m.to_string(), unknown, unknown))
                .into(),
            statuses: [200, 203, 204, 301, 404, 410]
                .map(|s| Spanned::new(s, unknown, unknown))
                .into(),
            warm: Vec::new(),
            targeted: ["tollgate-cache-control", "cdn-cache-control"]
                .map(|name| Spanned::new(name.to_string(), unknown, unknown))
                .into(),
            heuristic: Percent(0.0),
            heuristic_max: Duration::from_secs(86_400),
        }
    }
}

/// `cache: false` and an absent key both mean no caching; `cache: true` caches with
/// the defaults. A map is read field by field so a misspelt key is reported where it is.
fn route_cache<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<RouteCacheConfig>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Option<RouteCacheConfig>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("false, true, or a map of cache settings")
        }
        fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<Self::Value, E> {
            Ok(on.then(RouteCacheConfig::default))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            RouteCacheConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                .map(Some)
        }
    }
    deserializer.deserialize_any(Visitor)
}
