//! `gateway.yaml` as written by an operator: plain serde structs, nothing compiled yet.
//!
//! Every struct denies unknown keys so that a typo is an error with a line and column,
//! never a silently ignored setting. Values that later need a location in a semantic
//! error (names that refer to other sections, regexes, addresses) are kept `Spanned`.
//! [`crate::policy`] turns this into the runtime `Policy`.

use crate::units::{Duration, Percent, Size};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub version: Spanned<u32>,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    pub upstreams: Spanned<BTreeMap<String, UpstreamConfig>>,
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    #[serde(default)]
    pub rate_limits: Vec<RateLimitRule>,
    #[serde(default)]
    pub rate_limiting: RateLimitingConfig,
    #[serde(default)]
    pub shedding: Option<SheddingConfig>,
    #[serde(default)]
    pub access_log: AccessLogConfig,
    #[serde(default)]
    pub cache: CacheConfig,
}

/// SPEC §3 `cache`: the bounds of the response cache shared by every caching route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub max_size: Size,
    pub max_entries: Spanned<u64>,
    pub max_object: Size,
    pub tag_header: String,
    pub redis: Option<CacheRedisConfig>,
}

/// SPEC §3 `cache.redis`: a second tier shared by replicas.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRedisConfig {
    pub url: Spanned<String>,
    #[serde(default = "default_redis_timeout")]
    pub timeout: Duration,
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
pub struct RouteCacheConfig {
    pub ttl: Duration,
    pub force_ttl: bool,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub per_user: bool,
    pub vary: Vec<Spanned<String>>,
    pub methods: Vec<Spanned<String>>,
    pub statuses: Vec<Spanned<u16>>,
    pub warm: Vec<Spanned<String>>,
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

/// SPEC §3 `shedding`: the load signal and the levels it moves through.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SheddingConfig {
    pub max_inflight: usize,
    pub latency_target: Option<Duration>,
    pub cpu: bool,
    pub smoothing: Duration,
    pub levels: Spanned<Vec<ShedLevelConfig>>,
    pub recover_below_margin: Percent,
    pub hold: Duration,
    pub retry_after: Duration,
}

impl Default for SheddingConfig {
    fn default() -> Self {
        let unknown = serde_saphyr::Location::UNKNOWN;
        SheddingConfig {
            max_inflight: 1000,
            latency_target: None,
            cpu: false,
            smoothing: Duration::from_secs(5),
            levels: Spanned::new(
                vec![
                    ShedLevelConfig {
                        above: Percent(0.8),
                        shed: vec![Priority::Low],
                        limit_scale: 0.5,
                    },
                    ShedLevelConfig {
                        above: Percent(0.95),
                        shed: vec![Priority::Low, Priority::Normal, Priority::High],
                        limit_scale: 0.25,
                    },
                ],
                unknown,
                unknown,
            ),
            recover_below_margin: Percent(0.05),
            hold: Duration::from_secs(10),
            retry_after: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShedLevelConfig {
    pub above: Percent,
    #[serde(default)]
    pub shed: Vec<Priority>,
    #[serde(default = "default_limit_scale")]
    pub limit_scale: f64,
}

fn default_limit_scale() -> f64 {
    1.0
}

/// How much a route matters when the gateway is overloaded (`critical` is never shed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Critical,
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: Vec<Spanned<String>>,
    pub tls: Option<TlsConfig>,
    pub threads: usize,
    pub max_request_body: Size,
    pub trusted_proxies: Vec<Spanned<String>>,
    pub request_id_header: Spanned<String>,
    pub response_headers: BTreeMap<String, String>,
    pub shutdown_grace: Duration,
    pub idle_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub allow_underscores_in_headers: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![unlocated("0.0.0.0:8080".to_string())],
            tls: None,
            threads: 0,
            max_request_body: Size(10 << 20),
            trusted_proxies: Vec::new(),
            request_id_header: unlocated("x-request-id".to_string()),
            response_headers: BTreeMap::new(),
            shutdown_grace: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            allow_underscores_in_headers: false,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: Spanned<String>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: Spanned<String>,
    /// SPEC §3: in force whether the key, or the whole section, is written or not.
    pub token_env: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: unlocated("127.0.0.1:9901".to_string()),
            token_env: "TOLLGATE_ADMIN_TOKEN".to_string(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub servers: Spanned<Vec<ServerEntry>>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub hash_on: Option<Spanned<String>>,
    #[serde(default)]
    pub tls: UpstreamTls,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default = "default_keepalive")]
    pub keepalive: usize,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub outlier: Option<OutlierConfig>,
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    #[serde(default)]
    pub max_concurrent: Option<Spanned<usize>>,
    #[serde(default)]
    pub queue: Option<QueueConfig>,
}

/// Active health checks per server (SPEC §3 `upstreams.*.health_check`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    pub path: Spanned<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    pub expect: Spanned<String>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        let unknown = serde_saphyr::Location::UNKNOWN;
        HealthCheckConfig {
            path: Spanned::new("/health".into(), unknown, unknown),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_after: 2,
            unhealthy_after: 3,
            expect: Spanned::new("200-399".into(), unknown, unknown),
        }
    }
}

/// Passive outlier ejection per server (SPEC §3 `upstreams.*.outlier`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub eject_for: Duration,
    pub max_ejected: Percent,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 3,
            eject_for: Duration::from_secs(30),
            max_ejected: Percent(0.5),
        }
    }
}

/// SPEC §3 `upstreams.*.retry`; omitted keys take the SPEC's values.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub attempts: u32,
    pub on: Spanned<Vec<FailureCondition>>,
    pub methods: Vec<Spanned<String>>,
    pub backoff: BackoffConfig,
    pub budget: Percent,
    pub min_retries_per_second: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let unknown = serde_saphyr::Location::UNKNOWN;
        RetryConfig {
            attempts: 2,
            on: Spanned::new(
                vec![
                    FailureCondition::Word("connect_error".into()),
                    FailureCondition::Status(502),
                    FailureCondition::Status(503),
                    FailureCondition::Status(504),
                ],
                unknown,
                unknown,
            ),
            methods: ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]
                .iter()
                .map(|m| Spanned::new(m.to_string(), unknown, unknown))
                .collect(),
            backoff: BackoffConfig::default(),
            budget: Percent(0.2),
            min_retries_per_second: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    pub base: Duration,
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }
}

/// The waiting room in front of a full bulkhead.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub max: usize,
    #[serde(default = "default_queue_timeout")]
    pub timeout: Duration,
}

fn default_queue_timeout() -> Duration {
    Duration::from_secs(1)
}

/// SPEC §3 `upstreams.*.circuit_breaker`; omitted keys take the SPEC's values.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: Percent,
    pub min_requests: u32,
    pub window: Duration,
    pub open_for: Duration,
    pub half_open_requests: u32,
    pub success_threshold: u32,
    pub max_open_for: Duration,
    pub failure_on: Spanned<Vec<FailureCondition>>,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            consecutive_failures: 5,
            failure_rate: Percent(0.5),
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(60),
            half_open_requests: 3,
            success_threshold: 3,
            max_open_for: Duration::from_secs(300),
            failure_on: Spanned::new(
                vec![
                    FailureCondition::Word("connect_error".into()),
                    FailureCondition::Word("timeout".into()),
                    FailureCondition::Status(502),
                    FailureCondition::Status(503),
                    FailureCondition::Status(504),
                ],
                serde_saphyr::Location::UNKNOWN,
                serde_saphyr::Location::UNKNOWN,
            ),
        }
    }
}

/// One entry of `failure_on`: a status code, or `5xx`, `connect_error`, `timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum FailureCondition {
    Status(u16),
    Word(String),
}

fn default_keepalive() -> usize {
    128
}

/// One upstream server: `"127.0.0.1:3000"` or `{ addr: …, weight: 2, backup: true }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ServerEntry {
    pub addr: Spanned<String>,
    pub weight: u32,
    pub backup: bool,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ServerEntryMap {
    addr: Spanned<String>,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    backup: bool,
}

fn default_weight() -> u32 {
    1
}

impl<'de> Deserialize<'de> for ServerEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A bare string or a map: decided on the YAML node itself so that the error of the
        // chosen form (a typo'd key, a bad weight) keeps its own message and location.
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = ServerEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address \"host:port\" or a map { addr, weight, backup }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ServerEntry, E> {
                Ok(ServerEntry {
                    addr: unlocated(v.to_string()),
                    weight: 1,
                    backup: false,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ServerEntry, A::Error> {
                let m = ServerEntryMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ServerEntry {
                    addr: m.addr,
                    weight: m.weight,
                    backup: m.backup,
                })
            }
        }
        let spanned = Spanned::<ServerEntrySpannedShim>::deserialize(deserializer)?;
        let mut entry = spanned.value.0;
        if entry.addr.referenced == serde_saphyr::Location::UNKNOWN {
            entry.addr.referenced = spanned.referenced;
            entry.addr.defined = spanned.defined;
        }
        return Ok(entry);

        struct ServerEntrySpannedShim(ServerEntry);
        impl<'de> Deserialize<'de> for ServerEntrySpannedShim {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(EntryVisitor).map(ServerEntrySpannedShim)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    P2c,
    ConsistentHash,
}

/// `tls: false`, `tls: true` or `tls: { sni, verify, ca }` towards the upstream servers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct UpstreamTls {
    pub enabled: bool,
    pub sni: Option<String>,
    pub verify: bool,
    pub ca: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct UpstreamTlsMap {
    #[serde(default)]
    sni: Option<String>,
    #[serde(default = "default_true")]
    verify: bool,
    #[serde(default)]
    ca: Option<Spanned<String>>,
}

fn default_true() -> bool {
    true
}

impl<'de> Deserialize<'de> for UpstreamTls {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TlsVisitor;
        impl<'de> Visitor<'de> for TlsVisitor {
            type Value = UpstreamTls;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or a map { sni, verify, ca }")
            }
            fn visit_bool<E: de::Error>(self, enabled: bool) -> Result<UpstreamTls, E> {
                Ok(UpstreamTls {
                    enabled,
                    verify: true,
                    ..UpstreamTls::default()
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UpstreamTls, A::Error> {
                let m = UpstreamTlsMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(UpstreamTls {
                    enabled: true,
                    sni: m.sni,
                    verify: m.verify,
                    ca: m.ca,
                })
            }
        }
        deserializer.deserialize_any(TlsVisitor)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(30),
            write: Duration::from_secs(30),
            idle: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: Spanned<String>,
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    pub upstream: Spanned<UpstreamRef>,
    #[serde(default)]
    pub slo: Option<SloConfig>,
    #[serde(default)]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default, deserialize_with = "route_cache")]
    pub cache: Option<RouteCacheConfig>,
}

/// What a route answers instead of 503 when its pool's circuit is open.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    #[serde(default = "default_fallback_status")]
    pub status: Spanned<u16>,
    #[serde(default = "default_fallback_content_type")]
    pub content_type: String,
    #[serde(default)]
    pub body: String,
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
pub struct MatchConfig {
    pub path: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub path_regex: Option<Spanned<String>>,
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A route's target: one pool, or a weighted split `{ app: 95, app-v2: 5 }` for canaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum UpstreamRef {
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
pub struct SloConfig {
    pub availability: Option<Percent>,
    pub p95: Option<Duration>,
    pub p99: Option<Duration>,
}

/// One rate-limit rule (SPEC §3 `rate_limits`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRule {
    pub name: Spanned<String>,
    pub key: Spanned<RuleKey>,
    pub rate: Spanned<RuleRate>,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub when: When,
    #[serde(default)]
    pub routes: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub shadow: bool,
}

/// `key: user` or `key: [user, route]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RuleKey {
    One(String),
    Composite(Vec<String>),
}

/// `rate: 20/min` or per tier `rate: { free: 10/min, standard: 100/min }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RuleRate {
    One(crate::units::Rate),
    PerTier(BTreeMap<String, crate::units::Rate>),
}

impl<'de> Deserialize<'de> for RuleRate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RateVisitor;
        impl<'de> Visitor<'de> for RateVisitor {
            type Value = RuleRate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate such as `100/min`, or a map of tiers to rates")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RuleRate, E> {
                crate::units::Rate::parse(v)
                    .map(RuleRate::One)
                    .map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RuleRate, A::Error> {
                BTreeMap::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RuleRate::PerTier)
            }
        }
        deserializer.deserialize_any(RateVisitor)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    #[default]
    Always,
    Anonymous,
    Authenticated,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitingConfig {
    pub backend: Spanned<Backend>,
    pub redis: Option<RedisConfig>,
    pub headers: HeadersMode,
    pub max_keys: usize,
}

impl Default for RateLimitingConfig {
    fn default() -> Self {
        RateLimitingConfig {
            backend: Spanned::new(
                Backend::Local,
                serde_saphyr::Location::UNKNOWN,
                serde_saphyr::Location::UNKNOWN,
            ),
            redis: None,
            headers: HeadersMode::Draft,
            max_keys: 1_000_000,
        }
    }
}

/// Where buckets live: in this process, or in Redis so that replicas share them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    #[default]
    Local,
    Redis,
}

/// The shared bucket store (SPEC §3 `rate_limiting.redis`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Option<Spanned<String>>,
    #[serde(default)]
    pub cluster: Option<Spanned<Vec<String>>>,
    #[serde(default = "default_redis_timeout")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_error: OnRedisError,
}

fn default_redis_timeout() -> Duration {
    Duration(std::time::Duration::from_millis(50))
}

/// What a request gets when Redis does not answer within `timeout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// This replica's own buckets decide (each replica then admits up to the full rate).
    #[default]
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadersMode {
    #[default]
    Draft,
    Legacy,
    Both,
    None,
}

/// Who the user of a request is (SPEC §3 `identity`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default)]
    pub api_keys: Option<ApiKeysConfig>,
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[serde(default)]
    pub trusted_user_header: Option<Spanned<String>>,
    #[serde(default)]
    pub on_invalid: OnInvalid,
    #[serde(default = "default_tier")]
    pub default_tier: String,
}

fn default_tier() -> String {
    "free".to_string()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnInvalid {
    #[default]
    Reject,
    Anonymous,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    #[serde(default = "default_api_key_header")]
    pub header: Spanned<String>,
    #[serde(default)]
    pub keys: Vec<ApiKeyEntry>,
    #[serde(default)]
    pub file: Option<Spanned<String>>,
}

fn default_api_key_header() -> Spanned<String> {
    unlocated("x-api-key".to_string())
}

/// One API key, stored only as the sha256 of the raw key.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    pub sha256: Spanned<String>,
    pub user: String,
    #[serde(default)]
    pub tier: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    #[serde(default = "default_jwt_header")]
    pub header: Spanned<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Spanned<String>>,
    #[serde(default)]
    pub hs256_secret_env: Option<Spanned<String>>,
    #[serde(default)]
    pub public_keys: Vec<Spanned<String>>,
    #[serde(default)]
    pub jwks_file: Option<Spanned<String>>,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    #[serde(default = "default_tier_claim")]
    pub tier_claim: String,
    #[serde(default = "default_leeway")]
    pub leeway: Duration,
}

fn default_jwt_header() -> Spanned<String> {
    unlocated("authorization".to_string())
}

fn default_algorithms() -> Vec<Spanned<String>> {
    ["HS256", "RS256", "ES256"]
        .map(|a| unlocated(a.to_string()))
        .into()
}

fn default_user_claim() -> String {
    "sub".to_string()
}

fn default_tier_claim() -> String {
    "tier".to_string()
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    pub enabled: bool,
    pub redact_headers: Vec<String>,
    /// Bytes gathered before a write (nginx's `buffer=`).
    pub buffer: Size,
    /// The longest a line waits in the buffer (nginx's `flush=`).
    pub flush: Duration,
    /// A file to append to (reopened on SIGUSR1); standard output when absent.
    pub path: Option<String>,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: true,
            redact_headers: vec![
                "authorization".to_string(),
                "x-api-key".to_string(),
                "cookie".to_string(),
            ],
            buffer: Size(64 << 10),
            flush: Duration::from_secs(1),
            path: None,
        }
    }
}

/// A value that did not come from the file (a default); errors about it name the file only.
pub fn unlocated<T>(value: T) -> Spanned<T> {
    Spanned::new(
        value,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

/// One problem in a policy file, printed as `path:line:column: message` (SPEC §1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

impl ConfigError {
    pub fn at(file: &Path, location: &serde_saphyr::Location, message: impl Into<String>) -> Self {
        let (line, column) = if *location == serde_saphyr::Location::UNKNOWN {
            (0, 0)
        } else {
            (location.line(), location.column())
        };
        // One error, one line: multi-line messages (regex syntax errors draw a caret
        // diagram) are folded so `check` output stays `path:line:column: message`.
        let message: String = message.into();
        let message = message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        ConfigError {
            file: file.display().to_string(),
            line,
            column,
            message,
        }
    }
}

/// Parses an API key file: the same list as `identity.api_keys.keys`.
pub fn parse_api_keys(file: &Path, text: &str) -> Result<Vec<ApiKeyEntry>, ConfigError> {
    serde_saphyr::from_str::<Vec<ApiKeyEntry>>(text).map_err(|e| located(file, &e))
}

fn located(file: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let inner = e.without_snippet().to_string();
    // The plain message carries its position as a trailing " at line L, column C";
    // the position is reported in the `path:line:column:` prefix instead.
    let message = match inner.rsplit_once(" at line ") {
        Some((message, _)) => message.to_string(),
        None => inner,
    };
    let location = e.location().unwrap_or(serde_saphyr::Location::UNKNOWN);
    ConfigError::at(file, &location, message)
}

/// Parses the YAML text of a policy file.
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    serde_saphyr::from_str::<Config>(text).map_err(|e| located(file, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("gateway.yaml"), text)
    }

    const MINIMAL: &str = "version: 1\nupstreams:\n  app:\n    servers: [\"127.0.0.1:3000\"]\nroutes:\n  - name: all\n    match: { path_prefix: / }\n    upstream: app\n";

    #[test]
    fn minimal_policy_takes_defaults() {
        let config = parse_str(MINIMAL).unwrap();
        assert_eq!(config.server.max_request_body, Size(10 << 20));
        assert_eq!(config.server.request_id_header.value, "x-request-id");
        assert_eq!(config.upstreams.value["app"].timeouts, Timeouts::default());
        assert!(config.access_log.enabled);
    }

    #[test]
    fn typo_is_reported_with_line_and_column() {
        let text = MINIMAL.replace("    servers:", "    keepalve: 3\n    servers:");
        let err = parse_str(&text).unwrap_err();
        assert_eq!((err.line, err.column), (4, 5), "{err}");
        assert!(err.message.contains("unknown field `keepalve`"), "{err}");
        assert!(err.to_string().starts_with("gateway.yaml:4:5: "), "{err}");
    }

    #[test]
    fn bad_unit_is_reported_at_the_value() {
        let text = format!("{MINIMAL}server:\n  shutdown_grace: 30 seconds\n");
        let err = parse_str(&text).unwrap_err();
        assert_eq!(err.line, 10, "{err}");
        assert!(err.message.contains("invalid duration"), "{err}");
    }

    #[test]
    fn server_entries_and_splits() {
        let text = "version: 1\nupstreams:\n  app:\n    servers:\n      - \"127.0.0.1:3000\"\n      - { addr: \"127.0.0.1:3001\", weight: 2 }\n      - { addr: \"127.0.0.1:3002\", backup: true }\nroutes:\n  - name: all\n    upstream: { app: 95, other: 5 }\n";
        let config = parse_str(text).unwrap();
        let servers = &config.upstreams.value["app"].servers.value;
        assert_eq!(servers.len(), 3);
        assert_eq!(servers[0].addr.referenced.line(), 5);
        assert_eq!((servers[1].weight, servers[1].backup), (2, false));
        assert!(servers[2].backup);
        assert_eq!(
            config.routes[0].upstream.value,
            UpstreamRef::Split(vec![("app".into(), 95), ("other".into(), 5)])
        );
        let bad = text.replace("weight: 2", "wieght: 2");
        let err = parse_str(&bad).unwrap_err();
        assert!(err.message.contains("unknown field `wieght`"), "{err}");
        assert_eq!(err.line, 6, "{err}");
    }
}
