//! `gateway.yaml` as written by an operator: plain serde structs, nothing compiled yet.
//!
//! Every struct denies unknown keys so that a typo is an error with a line and column,
//! never a silently ignored setting. Values that later need a location in a semantic
//! error (names that refer to other sections, regexes, addresses) are kept `Spanned`.
//! [`crate::policy`] turns this into the runtime `Policy`.

mod identity;
mod limits;
mod routes;
mod upstreams;

pub(crate) use identity::*;
pub(crate) use limits::*;
pub(crate) use routes::*;
pub(crate) use upstreams::*;

use crate::units::{Duration, Percent, Size};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub(crate) version: Spanned<u32>,
    #[serde(default)]
    pub(crate) server: ServerConfig,
    #[serde(default)]
    pub(crate) admin: AdminConfig,
    pub(crate) upstreams: Spanned<BTreeMap<String, UpstreamConfig>>,
    pub(crate) routes: Vec<RouteConfig>,
    #[serde(default)]
    pub(crate) identity: Option<IdentityConfig>,
    #[serde(default)]
    pub(crate) rate_limits: Vec<RateLimitRule>,
    #[serde(default)]
    pub(crate) rate_limiting: RateLimitingConfig,
    #[serde(default)]
    pub(crate) shedding: Option<SheddingConfig>,
    #[serde(default)]
    pub(crate) access_log: AccessLogConfig,
    #[serde(default)]
    pub(crate) cache: CacheConfig,
    #[serde(default)]
    pub(crate) tracing: Option<TracingConfig>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ServerConfig {
    pub(crate) listen: Vec<Spanned<String>>,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) threads: usize,
    pub(crate) max_request_body: Size,
    pub(crate) trusted_proxies: Vec<Spanned<String>>,
    pub(crate) request_id_header: Spanned<String>,
    pub(crate) response_headers: BTreeMap<String, String>,
    pub(crate) shutdown_grace: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) header_timeout: Duration,
    pub(crate) body_timeout: Duration,
    pub(crate) allow_underscores_in_headers: bool,
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
pub(crate) struct TlsConfig {
    pub(crate) listen: Spanned<String>,
    pub(crate) cert: Spanned<String>,
    pub(crate) key: Spanned<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AdminConfig {
    pub(crate) listen: Spanned<String>,
    /// SPEC §3: in force whether the key, or the whole section, is written or not.
    pub(crate) token_env: String,
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
#[serde(deny_unknown_fields, default)]
pub(crate) struct AccessLogConfig {
    pub(crate) enabled: bool,
    pub(crate) redact_headers: Vec<String>,
    /// Bytes gathered before a write (nginx's `buffer=`).
    pub(crate) buffer: Size,
    /// The longest a line waits in the buffer (nginx's `flush=`).
    pub(crate) flush: Duration,
    /// A file to append to (reopened on SIGUSR1); standard output when absent.
    pub(crate) path: Option<String>,
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

/// SPEC §3 `tracing`: spans exported over OTLP/HTTP (protobuf). Absent: trace context is
/// still propagated, nothing is exported.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TracingConfig {
    pub(crate) otlp: OtlpConfig,
    /// Head sampling of traces the gateway starts (a sampled parent is always followed).
    pub(crate) sample: Spanned<Percent>,
    /// Also export the answers the gateway made itself (429, 502, 503, 504).
    pub(crate) sample_errors: bool,
    pub(crate) service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp: OtlpConfig::default(),
            sample: unlocated(Percent(0.01)),
            sample_errors: true,
            service_name: "tollgate".to_string(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OtlpConfig {
    /// The collector's base URL; `/v1/traces` is appended.
    pub(crate) endpoint: Spanned<String>,
    pub(crate) timeout: Duration,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: unlocated("http://127.0.0.1:4318".to_string()),
            timeout: Duration::from_secs(2),
        }
    }
}

/// A value that did not come from the file (a default); errors about it name the file only.
pub(crate) fn unlocated<T>(value: T) -> Spanned<T> {
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
    pub(crate) fn at(
        file: &Path,
        location: &serde_saphyr::Location,
        message: impl Into<String>,
    ) -> Self {
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
pub(crate) fn parse_api_keys(file: &Path, text: &str) -> Result<Vec<ApiKeyEntry>, ConfigError> {
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
