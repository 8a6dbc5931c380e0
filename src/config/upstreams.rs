//! SPEC §3 `upstreams`: pools, their servers, TLS, timeouts, health checks, retries,
//! circuit breakers, bulkheads and outlier ejection.

use super::unlocated;
use crate::units::{Duration, Percent};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::fmt;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamConfig {
    pub(crate) servers: Spanned<Vec<ServerEntry>>,
    #[serde(default)]
    pub(crate) balance: Balance,
    #[serde(default)]
    pub(crate) hash_on: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) tls: UpstreamTls,
    #[serde(default)]
    pub(crate) timeouts: Timeouts,
    #[serde(default = "default_keepalive")]
    pub(crate) keepalive: usize,
    #[serde(default)]
    pub(crate) circuit_breaker: Option<CircuitBreakerConfig>,
    #[serde(default)]
    pub(crate) health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub(crate) outlier: Option<OutlierConfig>,
    #[serde(default)]
    pub(crate) retry: Option<RetryConfig>,
    #[serde(default)]
    pub(crate) max_concurrent: Option<Spanned<usize>>,
    #[serde(default)]
    pub(crate) queue: Option<QueueConfig>,
}

/// Active health checks per server (SPEC §3 `upstreams.*.health_check`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct HealthCheckConfig {
    pub(crate) path: Spanned<String>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) healthy_after: u32,
    pub(crate) unhealthy_after: u32,
    pub(crate) expect: Spanned<String>,
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
pub(crate) struct OutlierConfig {
    pub(crate) consecutive_failures: u32,
    pub(crate) eject_for: Duration,
    pub(crate) max_ejected: Percent,
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
pub(crate) struct RetryConfig {
    pub(crate) attempts: u32,
    pub(crate) on: Spanned<Vec<FailureCondition>>,
    pub(crate) methods: Vec<Spanned<String>>,
    pub(crate) backoff: BackoffConfig,
    pub(crate) budget: Percent,
    pub(crate) min_retries_per_second: u32,
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
pub(crate) struct BackoffConfig {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
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
pub(crate) struct QueueConfig {
    pub(crate) max: usize,
    #[serde(default = "default_queue_timeout")]
    pub(crate) timeout: Duration,
}

fn default_queue_timeout() -> Duration {
    Duration::from_secs(1)
}

/// SPEC §3 `upstreams.*.circuit_breaker`; omitted keys take the SPEC's values.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct CircuitBreakerConfig {
    pub(crate) consecutive_failures: u32,
    pub(crate) failure_rate: Percent,
    pub(crate) min_requests: u32,
    pub(crate) window: Duration,
    pub(crate) open_for: Duration,
    pub(crate) half_open_requests: u32,
    pub(crate) success_threshold: u32,
    pub(crate) max_open_for: Duration,
    pub(crate) failure_on: Spanned<Vec<FailureCondition>>,
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
pub(crate) enum FailureCondition {
    Status(u16),
    Word(String),
}

fn default_keepalive() -> usize {
    128
}

/// One upstream server: `"127.0.0.1:3000"` or `{ addr: …, weight: 2, backup: true }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub(crate) struct ServerEntry {
    pub(crate) addr: Spanned<String>,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
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
pub(crate) enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    P2c,
    ConsistentHash,
}

/// `tls: false`, `tls: true` or `tls: { sni, verify, ca }` towards the upstream servers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub(crate) struct UpstreamTls {
    pub(crate) enabled: bool,
    pub(crate) sni: Option<String>,
    pub(crate) verify: bool,
    pub(crate) ca: Option<Spanned<String>>,
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
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) read: Duration,
    pub(crate) write: Duration,
    pub(crate) idle: Duration,
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
