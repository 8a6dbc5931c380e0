//! SPEC §3 `rate_limits`, `rate_limiting` and `shedding`.

use crate::units::{Duration, Percent};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;

/// One rate-limit rule (SPEC §3 `rate_limits`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimitRule {
    pub(crate) name: Spanned<String>,
    pub(crate) key: Spanned<RuleKey>,
    pub(crate) rate: Spanned<RuleRate>,
    #[serde(default)]
    pub(crate) burst: Option<u32>,
    #[serde(default)]
    pub(crate) when: When,
    #[serde(default)]
    pub(crate) routes: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(crate) shadow: bool,
}

/// `key: user` or `key: [user, route]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub(crate) enum RuleKey {
    One(String),
    Composite(Vec<String>),
}

/// `rate: 20/min` or per tier `rate: { free: 10/min, standard: 100/min }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub(crate) enum RuleRate {
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
pub(crate) enum When {
    #[default]
    Always,
    Anonymous,
    Authenticated,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RateLimitingConfig {
    pub(crate) backend: Spanned<Backend>,
    pub(crate) redis: Option<RedisConfig>,
    pub(crate) headers: HeadersMode,
    pub(crate) max_keys: usize,
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
pub(crate) enum Backend {
    #[default]
    Local,
    Redis,
}

/// The shared bucket store (SPEC §3 `rate_limiting.redis`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedisConfig {
    pub(crate) url: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) cluster: Option<Spanned<Vec<String>>>,
    #[serde(default = "default_redis_timeout")]
    pub(crate) timeout: Duration,
    #[serde(default)]
    pub(crate) on_error: OnRedisError,
}

pub(super) fn default_redis_timeout() -> Duration {
    Duration(std::time::Duration::from_millis(50))
}

/// What a request gets when Redis does not answer within `timeout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OnRedisError {
    /// This replica's own buckets decide (each replica then admits up to the full rate).
    #[default]
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum HeadersMode {
    #[default]
    Draft,
    Legacy,
    Both,
    None,
}

/// SPEC §3 `shedding`: the load signal and the levels it moves through.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SheddingConfig {
    pub(crate) max_inflight: usize,
    pub(crate) latency_target: Option<Duration>,
    pub(crate) cpu: bool,
    pub(crate) smoothing: Duration,
    pub(crate) levels: Spanned<Vec<ShedLevelConfig>>,
    pub(crate) recover_below_margin: Percent,
    pub(crate) hold: Duration,
    pub(crate) retry_after: Duration,
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
pub(crate) struct ShedLevelConfig {
    pub(crate) above: Percent,
    #[serde(default)]
    pub(crate) shed: Vec<Priority>,
    #[serde(default = "default_limit_scale")]
    pub(crate) limit_scale: f64,
}

fn default_limit_scale() -> f64 {
    1.0
}

/// How much a route matters when the gateway is overloaded (`critical` is never shed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Priority {
    Critical,
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}
