//! The runtime policy: `gateway.yaml` compiled and validated once into immutable,
//! ready-to-use parts (route table, upstream pools, header values, metric handles).
//! The request path reads it through one `ArcSwap` load and never parses anything.
//!
//! Compilation collects every semantic error it finds, each pointing at the line and
//! column of the offending value, and takes over the stateful parts (server counters,
//! SLO windows, metric handles) of the previous policy wherever their definition
//! did not change.

mod diff;

pub use diff::{Difference, Moved, PolicyDiff, Reset};

use crate::breaker::FailureOn;
use crate::bulkhead::Bulkhead;
use crate::config::{self, Config, ConfigError, Priority, SloConfig, UpstreamRef};
use crate::events::EventLog;
use crate::health::HealthCheck;
use crate::metrics::{Metrics, RouteMetrics};
use crate::retry::{RetryPolicy, RetrySettings};
use crate::routing::{HostMatch, PathMatch, RouteMatcher};
use crate::slo::SloTracker;
use crate::upstream::{HashOn, Pool, PoolSpec};
use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use serde_saphyr::{Location, Spanned};
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub struct Policy {
    pub generation: u64,
    pub sha256: String,
    pub loaded_at: SystemTime,
    pub source: PathBuf,
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub routes: Vec<Route>,
    pub upstreams: BTreeMap<String, Arc<Pool>>,
    pub access_log: AccessLog,
    pub identity: Option<crate::identity::Identity>,
    pub rate_limits: crate::ratelimit::RateLimits,
    pub shedding: Option<crate::shed::Shedding>,
    pub cache: crate::cache::Settings,
    /// Other files the policy reads (API keys, JWT keys): a change to one is a change
    /// to the policy, for the watcher and the generation.
    pub read_files: Vec<PathBuf>,
    /// The parsed file, kept for `check --against` and for compiling the next generation.
    pub config: Config,
}

pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    pub tls: Option<TlsSettings>,
    pub threads: usize,
    pub max_request_body: u64,
    pub trusted_proxies: Vec<IpNet>,
    pub request_id_header: HeaderName,
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    pub shutdown_grace: Duration,
    /// How long a client connection may sit without sending a request.
    pub idle_timeout: Duration,
    /// How long a request head may take to arrive, from its first byte (408 after).
    pub header_timeout: Duration,
    /// The longest wait between two reads of a request body (408 after).
    pub body_timeout: Duration,
    /// `false`: framing field names spelled with `_` are refused, other `_` names are
    /// not forwarded (nginx's `underscores_in_headers off`).
    pub allow_underscores_in_headers: bool,
}

pub struct TlsSettings {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct AdminSettings {
    pub listen: SocketAddr,
    /// The bearer token mutating admin calls must carry, read from `token_env`.
    pub token: Option<String>,
}

pub struct AccessLog {
    pub enabled: bool,
    pub redact: Vec<HeaderName>,
    pub output: crate::access_log::Output,
}

pub struct Route {
    pub name: Arc<str>,
    pub matcher: RouteMatcher,
    pub target: Target,
    pub timeout: Option<Duration>,
    /// The prefix to remove from the path before forwarding (`strip_prefix: true`).
    pub strip_prefix: Option<String>,
    pub slo: Option<(SloConfig, Arc<SloTracker>)>,
    pub metrics: Arc<RouteMetrics>,
    /// Answered instead of 503 while the pool's circuit is open, or the route is shed.
    pub fallback: Option<Fallback>,
    pub priority: Priority,
    /// Counts this route's shed requests.
    pub shed: prometheus::IntCounter,
    pub cache: Option<crate::cache::RouteCache>,
}

pub struct Fallback {
    pub status: http::StatusCode,
    pub content_type: HeaderValue,
    pub body: bytes::Bytes,
}

pub enum Target {
    Pool(Arc<Pool>),
    /// Pools with cumulative weights: a request draws a number below the total.
    Split(Vec<(Arc<Pool>, u32)>),
}

impl Target {
    pub fn choose(&self) -> &Arc<Pool> {
        match self {
            Target::Pool(pool) => pool,
            Target::Split(split) => {
                let total = split.last().map_or(0, |(_, cumulative)| *cumulative);
                let draw = fastrand::u32(..total.max(1));
                split
                    .iter()
                    .find(|(_, cumulative)| draw < *cumulative)
                    .map_or(&split[0].0, |(pool, _)| pool)
            }
        }
    }

    pub fn pools(&self) -> Vec<&Arc<Pool>> {
        match self {
            Target::Pool(pool) => vec![pool],
            Target::Split(split) => split.iter().map(|(pool, _)| pool).collect(),
        }
    }
}

impl Policy {
    /// The index of the first route whose match accepts the request.
    pub fn route_for(&self, req: &pingora::http::RequestHeader) -> Option<usize> {
        let host = crate::routing::request_host(req);
        self.routes
            .iter()
            .position(|r| r.matcher.matches(req, host))
    }

    /// The request as the rate-limit rules see it; anonymous requests are in the
    /// identity's default tier.
    pub fn subject<'a>(
        &'a self,
        route: usize,
        client_ip: Option<IpAddr>,
        principal: Option<&'a crate::identity::Principal>,
        headers: &'a http::HeaderMap,
    ) -> crate::ratelimit::Subject<'a> {
        let default_tier = self.identity.as_ref().map_or("free", |i| &*i.default_tier);
        crate::ratelimit::Subject {
            route,
            route_name: &self.routes[route].name,
            client_ip,
            user: principal.map(|p| &*p.user),
            tier: principal.map_or(default_tier, |p| &*p.tier),
            headers,
        }
    }

    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.server
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip))
    }
}

/// Reads, parses and compiles a policy file. `previous` donates state; `generation` is
/// the number the result gets if its content differs from `previous`.
pub fn load(
    path: &Path,
    previous: Option<&Policy>,
    metrics: &Metrics,
    events: &Arc<EventLog>,
) -> Result<Policy, Vec<ConfigError>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError::at(
            path,
            &Location::UNKNOWN,
            format!("cannot read the policy: {e}"),
        )]
    })?;
    compile_text(path, &text, previous, metrics, events)
}

pub fn compile_text(
    path: &Path,
    text: &str,
    previous: Option<&Policy>,
    metrics: &Metrics,
    events: &Arc<EventLog>,
) -> Result<Policy, Vec<ConfigError>> {
    let config = config::parse(path, text).map_err(|e| vec![e])?;
    let mut policy = Compiler {
        path,
        errors: Vec::new(),
        previous,
        metrics,
        events,
        read_files: Vec::new(),
    }
    .compile(config)?;
    policy.sha256 = crate::digest::fingerprint(text, &policy.read_files);
    policy.generation = match previous {
        Some(p) if p.sha256 == policy.sha256 => p.generation,
        Some(p) => p.generation + 1,
        None => 1,
    };
    Ok(policy)
}

/// Reads the PEM certificates of a CA bundle for verifying upstream servers.
fn load_ca(path: &Path) -> Result<Arc<pingora::protocols::tls::CaType>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut anchors = Vec::new();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read: {e}"))? {
        let der = cert
            .map_err(|e| format!("not a PEM certificate bundle: {e}"))?
            .to_vec();
        // Pingora's wrapper panics on DER it cannot parse: check first.
        x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("invalid certificate: {e}"))?;
        anchors.push(pingora::utils::tls::WrappedX509::new(
            der,
            pingora::utils::tls::parse_x509,
        ));
    }
    if anchors.is_empty() {
        return Err("no certificate in the file".to_string());
    }
    Ok(Arc::from(anchors))
}

struct Compiler<'a> {
    path: &'a Path,
    errors: Vec<ConfigError>,
    previous: Option<&'a Policy>,
    metrics: &'a Metrics,
    events: &'a Arc<EventLog>,
    read_files: Vec<PathBuf>,
}

impl Compiler<'_> {
    fn error(&mut self, at: &Location, message: impl Into<String>) {
        self.errors.push(ConfigError::at(self.path, at, message));
    }

    fn compile(mut self, config: Config) -> Result<Policy, Vec<ConfigError>> {
        if config.version.value != 1 {
            self.error(
                &config.version.referenced,
                format!(
                    "unsupported version {}: this gateway reads version 1",
                    config.version.value
                ),
            );
        }
        let server = self.server(&config.server);
        let admin = self.admin(&config.admin);
        let upstreams = self.upstreams(&config.upstreams);
        let routes = self.routes(&config.routes, &upstreams);
        let identity = config.identity.as_ref().and_then(|c| {
            crate::identity::compile(self.path, c, &mut self.errors, &mut self.read_files)
        });
        let route_names: Vec<&str> = config
            .routes
            .iter()
            .map(|r| r.name.value.as_str())
            .collect();
        let rate_limits = crate::ratelimit::compile(
            self.path,
            &config.rate_limits,
            &config.rate_limiting,
            &route_names,
            self.previous.map(|p| &p.rate_limits),
            self.metrics,
            &mut self.errors,
        );
        let shedding = config.shedding.as_ref().and_then(|s| self.shedding(s));
        let cache = crate::cache::compile_settings(self.path, &config.cache, &mut self.errors);
        let access_log = AccessLog {
            enabled: config.access_log.enabled,
            redact: config
                .access_log
                .redact_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            output: crate::access_log::Output {
                buffer: config.access_log.buffer.0 as usize,
                flush: config.access_log.flush.0,
                path: config
                    .access_log
                    .path
                    .as_deref()
                    .map(|p| self.relative_path(p)),
            },
        };
        if let (Some(server), Some(admin)) = (&server, &admin) {
            if server.listen.contains(&admin.listen) {
                self.error(&config.admin.listen.referenced, "admin.listen must differ from server.listen: the admin API never shares the public listener");
            }
        }
        if !self.errors.is_empty() {
            return Err(self.errors);
        }
        Ok(Policy {
            // Both are set by `compile_text`, which knows the text and the read files.
            generation: 0,
            sha256: String::new(),
            loaded_at: SystemTime::now(),
            source: self.path.to_path_buf(),
            server: server.expect("no errors means the section compiled"),
            admin: admin.expect("no errors means the section compiled"),
            routes,
            upstreams,
            access_log,
            identity,
            rate_limits,
            shedding,
            cache: cache.expect("no errors means the section compiled"),
            read_files: self.read_files,
            config,
        })
    }

    fn socket_addr(&mut self, text: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        match text.value.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => match text.value.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(addr)) => Some(addr),
                _ => {
                    self.error(
                        &text.referenced,
                        format!("{what} `{}` is not a valid host:port address", text.value),
                    );
                    None
                }
            },
        }
    }

    fn relative_path(&self, file: &str) -> PathBuf {
        let base = self.path.parent().unwrap_or(Path::new("."));
        base.join(file)
    }

    fn server(&mut self, s: &config::ServerConfig) -> Option<ServerSettings> {
        let errors_before = self.errors.len();
        let listen: Vec<SocketAddr> = s
            .listen
            .iter()
            .filter_map(|l| self.socket_addr(l, "listen address"))
            .collect();
        if s.listen.is_empty() {
            self.error(
                &Location::UNKNOWN,
                "server.listen needs at least one address",
            );
        }
        let tls = s.tls.as_ref().and_then(|t| {
            let listen = self.socket_addr(&t.listen, "TLS listen address")?;
            let cert = self.relative_path(&t.cert.value);
            let key = self.relative_path(&t.key.value);
            for (file, spanned) in [(&cert, &t.cert), (&key, &t.key)] {
                if !file.is_file() {
                    self.error(
                        &spanned.referenced,
                        format!("cannot read `{}`", file.display()),
                    );
                }
            }
            Some(TlsSettings { listen, cert, key })
        });
        let mut trusted_proxies = Vec::new();
        for cidr in &s.trusted_proxies {
            let parsed = cidr
                .value
                .parse::<IpNet>()
                .or_else(|_| cidr.value.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => self.error(
                    &cidr.referenced,
                    format!("`{}` is not an IP address or CIDR range", cidr.value),
                ),
            }
        }
        let request_id_header = match HeaderName::from_bytes(s.request_id_header.value.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error(
                    &s.request_id_header.referenced,
                    format!("`{}` is not a valid header name", s.request_id_header.value),
                );
                None
            }
        };
        let mut response_headers = Vec::new();
        for (name, value) in &s.response_headers {
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                (Ok(n), Ok(v)) => response_headers.push((n, v)),
                _ => self.error(
                    &Location::UNKNOWN,
                    format!("server.response_headers: `{name}: {value}` is not a valid header"),
                ),
            }
        }
        for (name, value) in [
            ("header_timeout", s.header_timeout.0),
            ("body_timeout", s.body_timeout.0),
        ] {
            if value.is_zero() {
                self.error(
                    &Location::UNKNOWN,
                    format!("server.{name}: must be more than 0"),
                );
            }
        }
        let threads = if s.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            s.threads
        };
        (self.errors.len() == errors_before).then(|| ServerSettings {
            listen,
            tls,
            threads,
            max_request_body: s.max_request_body.0,
            trusted_proxies,
            request_id_header: request_id_header.expect("checked above"),
            response_headers,
            shutdown_grace: s.shutdown_grace.0,
            idle_timeout: s.idle_timeout.0,
            header_timeout: s.header_timeout.0,
            body_timeout: s.body_timeout.0,
            allow_underscores_in_headers: s.allow_underscores_in_headers,
        })
    }

    fn admin(&mut self, a: &config::AdminConfig) -> Option<AdminSettings> {
        let listen = self.socket_addr(&a.listen, "admin listen address")?;
        let token = std::env::var(&a.token_env).ok().filter(|t| !t.is_empty());
        Some(AdminSettings { listen, token })
    }

    fn upstreams(
        &mut self,
        upstreams: &Spanned<BTreeMap<String, config::UpstreamConfig>>,
    ) -> BTreeMap<String, Arc<Pool>> {
        if upstreams.value.is_empty() {
            self.error(&upstreams.referenced, "upstreams: define at least one pool");
        }
        let mut pools = BTreeMap::new();
        for (name, u) in &upstreams.value {
            if u.servers.value.is_empty() {
                self.error(
                    &u.servers.referenced,
                    format!("upstream `{name}` has no servers"),
                );
                continue;
            }
            let mut servers = Vec::new();
            let mut seen = HashSet::new();
            for entry in &u.servers.value {
                let Some(addr) = self.socket_addr(&entry.addr, "upstream server") else {
                    continue;
                };
                if !seen.insert(addr) {
                    self.error(
                        &entry.addr.referenced,
                        format!(
                            "server `{}` is listed twice in upstream `{name}`",
                            entry.addr.value
                        ),
                    );
                }
                if entry.weight == 0 {
                    self.error(
                        &entry.addr.referenced,
                        "weight must be at least 1 (remove the server to take it out)",
                    );
                }
                servers.push((
                    addr,
                    Arc::<str>::from(entry.addr.value.as_str()),
                    entry.weight,
                    entry.backup,
                ));
            }
            if !servers.is_empty() && servers.iter().all(|s| s.3) {
                self.error(
                    &u.servers.referenced,
                    format!(
                        "upstream `{name}` has only backup servers: at least one must be a primary"
                    ),
                );
            }
            let hash_on = match (&u.hash_on, u.balance) {
                (None, config::Balance::ConsistentHash) => Some(HashOn::Ip),
                (None, _) => None,
                (Some(h), balance) => {
                    if balance != config::Balance::ConsistentHash {
                        self.error(
                            &h.referenced,
                            "hash_on only applies with balance: consistent_hash",
                        );
                    }
                    match h.value.as_str() {
                        "ip" => Some(HashOn::Ip),
                        "user" => Some(HashOn::User),
                        "path" => Some(HashOn::Path),
                        other => {
                            match other
                                .strip_prefix("header:")
                                .map(|n| HeaderName::from_bytes(n.trim().as_bytes()))
                            {
                                Some(Ok(header)) => Some(HashOn::Header(header)),
                                _ => {
                                    self.error(&h.referenced, format!("hash_on `{other}`: expected ip, user, path or header:NAME"));
                                    None
                                }
                            }
                        }
                    }
                }
            };
            let ca = u.tls.ca.as_ref().and_then(|ca| {
                load_ca(&self.relative_path(&ca.value))
                    .map_err(|e| self.error(&ca.referenced, format!("tls.ca `{}`: {e}", ca.value)))
                    .ok()
            });
            let previous = self.previous.and_then(|p| p.upstreams.get(name));
            let failure_on = match &u.circuit_breaker {
                Some(config) => FailureOn::parse(&config.failure_on.value)
                    .map_err(|e| self.error(&config.failure_on.referenced, e))
                    .unwrap_or_default(),
                None => FailureOn::default(),
            };
            let breaker = u.circuit_breaker.as_ref().map(|config| {
                crate::breaker::compile(
                    name,
                    config,
                    &servers,
                    previous.and_then(|p| p.breaker.as_ref()),
                    self.metrics,
                    self.events,
                )
            });
            let bulkhead = self.bulkhead(name, u, previous.and_then(|p| p.bulkhead.as_ref()));
            let health_check = u.health_check.as_ref().and_then(|h| self.health_check(h));
            let retry = u.retry.as_ref().and_then(|r| self.retry(name, r));
            let pool = Pool::build(
                PoolSpec {
                    name,
                    ca,
                    servers,
                    balance: u.balance,
                    hash_on,
                    tls: &u.tls,
                    timeouts: u.timeouts,
                    keepalive: u.keepalive,
                    breaker,
                    bulkhead,
                    failure_on,
                    health_check,
                    retry,
                    outlier: u.outlier.as_ref().map(|o| crate::upstream::Outlier {
                        consecutive_failures: o.consecutive_failures.max(1),
                        eject_for: o.eject_for.0,
                        max_ejected: o.max_ejected.0,
                    }),
                },
                previous.map(|p| p.as_ref()),
                self.metrics.upstream_duration(name),
            );
            if pool.health_check.is_some() {
                for server in &pool.servers {
                    self.metrics
                        .server_healthy(name, &server.label)
                        .set(i64::from(server.state.is_healthy()));
                }
            }
            pools.insert(name.clone(), Arc::new(pool));
        }
        pools
    }

    fn routes(
        &mut self,
        routes: &[config::RouteConfig],
        pools: &BTreeMap<String, Arc<Pool>>,
    ) -> Vec<Route> {
        let mut names = HashSet::new();
        let mut compiled = Vec::new();
        for r in routes {
            let name = &r.name.value;
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                self.error(&r.name.referenced, format!("route name `{name}`: use letters, digits, '-', '_' or '.' (it becomes a metric label)"));
            }
            if !names.insert(name.clone()) {
                self.error(
                    &r.name.referenced,
                    format!("route name `{name}` is used twice"),
                );
            }
            let matcher = self.matcher(&r.matcher);
            let target = self.target(&r.upstream, pools);
            let strip_prefix = match (&r.matcher.path_prefix, r.strip_prefix) {
                (Some(prefix), true) => Some(prefix.value.trim_end_matches('/').to_string()),
                (None, true) => {
                    self.error(
                        &r.name.referenced,
                        format!("route `{name}`: strip_prefix needs match.path_prefix"),
                    );
                    None
                }
                (_, false) => None,
            };
            let previous = self
                .previous
                .and_then(|p| p.routes.iter().find(|old| *old.name == **name));
            let slo = r.slo.clone().map(|targets| {
                let tracker = previous
                    .and_then(|old| old.slo.as_ref().map(|(_, t)| t.clone()))
                    .unwrap_or_default();
                (targets, tracker)
            });
            let metrics = previous
                .map(|old| old.metrics.clone())
                .unwrap_or_else(|| Arc::new(self.metrics.route(name)));
            let fallback = r.fallback.as_ref().and_then(|f| self.fallback(f));
            let cache = r.cache.as_ref().and_then(|c| {
                crate::cache::compile_route(self.path, name, c, self.metrics, &mut self.errors)
            });
            if let (Some(matcher), Some(target)) = (matcher, target) {
                compiled.push(Route {
                    name: name.as_str().into(),
                    matcher,
                    target,
                    timeout: r.timeout.map(|t| t.0),
                    strip_prefix,
                    slo,
                    metrics,
                    fallback,
                    priority: r.priority,
                    shed: self.metrics.shed_requests(name, r.priority.as_str()),
                    cache,
                });
            }
        }
        if routes.is_empty() {
            self.error(&Location::UNKNOWN, "routes: define at least one route");
        }
        compiled
    }

    /// A pool's bulkhead, kept across a reload (with its in-flight count) while its
    /// limits are unchanged.
    fn bulkhead(
        &mut self,
        pool: &str,
        u: &config::UpstreamConfig,
        previous: Option<&Arc<Bulkhead>>,
    ) -> Option<Arc<Bulkhead>> {
        let Some(max) = &u.max_concurrent else {
            if u.queue.is_some() {
                self.error(
                    &u.servers.referenced,
                    format!("upstream `{pool}`: queue needs max_concurrent"),
                );
            }
            return None;
        };
        if max.value == 0 {
            self.error(&max.referenced, "max_concurrent must be at least 1");
            return None;
        }
        let (queue_max, queue_timeout) = u
            .queue
            .as_ref()
            .map_or((0, std::time::Duration::ZERO), |q| (q.max, q.timeout.0));
        if let Some(previous) = previous.filter(|b| {
            (b.max_concurrent, b.queue_max, b.queue_timeout)
                == (max.value, queue_max, queue_timeout)
        }) {
            return Some(previous.clone());
        }
        Some(Arc::new(Bulkhead::new(
            max.value,
            queue_max,
            queue_timeout,
            self.metrics.bulkhead_rejections(pool),
        )))
    }

    fn shedding(&mut self, s: &config::SheddingConfig) -> Option<crate::shed::Shedding> {
        let levels: Vec<crate::shed::Level> = s
            .levels
            .value
            .iter()
            .map(|l| crate::shed::Level {
                above: l.above.0,
                shed: l.shed.clone(),
                limit_scale: l.limit_scale,
            })
            .collect();
        if levels.is_empty() || levels.len() > 8 {
            self.error(&s.levels.referenced, "shedding: define one to eight levels");
            return None;
        }
        if levels.windows(2).any(|w| w[0].above >= w[1].above) {
            self.error(
                &s.levels.referenced,
                "shedding levels must be listed by rising `above`",
            );
            return None;
        }
        if levels
            .iter()
            .any(|l| !(l.limit_scale > 0.0 && l.limit_scale <= 1.0))
        {
            self.error(
                &s.levels.referenced,
                "a level's limit_scale must be above 0 and at most 1",
            );
            return None;
        }
        if s.max_inflight == 0 {
            self.error(
                &s.levels.referenced,
                "shedding max_inflight must be at least 1",
            );
            return None;
        }
        Some(crate::shed::Shedding {
            max_inflight: s.max_inflight,
            latency_target: s.latency_target.map(|d| d.0),
            cpu: s.cpu,
            smoothing: s.smoothing.0,
            levels,
            margin: s.recover_below_margin.0,
            hold: s.hold.0,
            retry_after: s.retry_after.0,
        })
    }

    fn retry(&mut self, pool: &str, r: &config::RetryConfig) -> Option<RetryPolicy> {
        let on = match FailureOn::parse(&r.on.value) {
            Ok(on) => on,
            Err(e) => {
                self.error(&r.on.referenced, e.replace("failure_on", "retry.on"));
                return None;
            }
        };
        let mut methods = Vec::new();
        for m in &r.methods {
            match Method::from_bytes(m.value.to_ascii_uppercase().as_bytes()) {
                Ok(method) => methods.push(method),
                Err(_) => self.error(
                    &m.referenced,
                    format!("`{}` is not an HTTP method", m.value),
                ),
            }
        }
        Some(RetryPolicy::new(
            RetrySettings {
                attempts: r.attempts,
                on,
                methods,
                backoff_base: r.backoff.base.0,
                backoff_max: r.backoff.max.0.max(r.backoff.base.0),
                budget: r.budget.0,
                min_retries_per_second: r.min_retries_per_second,
            },
            self.metrics.retries(pool),
        ))
    }

    fn health_check(&mut self, h: &config::HealthCheckConfig) -> Option<HealthCheck> {
        if !h.path.value.starts_with('/') {
            self.error(&h.path.referenced, "health_check path must start with /");
            return None;
        }
        let expect = match crate::health::parse_expect(&h.expect.value) {
            Ok(expect) => expect,
            Err(e) => {
                self.error(&h.expect.referenced, e);
                return None;
            }
        };
        if h.interval.0.is_zero() || h.timeout.0.is_zero() {
            self.error(
                &h.path.referenced,
                "health_check interval and timeout must be above 0s",
            );
            return None;
        }
        Some(HealthCheck {
            path: h.path.value.clone(),
            interval: h.interval.0,
            timeout: h.timeout.0,
            healthy_after: h.healthy_after.max(1),
            unhealthy_after: h.unhealthy_after.max(1),
            expect,
        })
    }

    fn fallback(&mut self, f: &config::FallbackConfig) -> Option<Fallback> {
        let status = http::StatusCode::from_u16(f.status.value)
            .ok()
            .filter(|s| (200..600).contains(&s.as_u16()));
        let Some(status) = status else {
            self.error(
                &f.status.referenced,
                format!("fallback status {} is not 200-599", f.status.value),
            );
            return None;
        };
        let Ok(content_type) = HeaderValue::from_str(&f.content_type) else {
            self.error(
                &f.status.referenced,
                "fallback content_type is not a valid header value",
            );
            return None;
        };
        Some(Fallback {
            status,
            content_type,
            body: bytes::Bytes::from(f.body.clone()),
        })
    }

    fn matcher(&mut self, m: &config::MatchConfig) -> Option<RouteMatcher> {
        let errors_before = self.errors.len();
        let given = [&m.path, &m.path_prefix, &m.path_regex];
        let mut paths = given.iter().filter_map(|p| p.as_ref());
        let path = match (
            m.path.as_ref(),
            m.path_prefix.as_ref(),
            m.path_regex.as_ref(),
        ) {
            (None, None, None) => PathMatch::Any,
            (Some(p), None, None) => PathMatch::Exact(p.value.clone()),
            (None, Some(p), None) => PathMatch::Prefix(p.value.clone()),
            (None, None, Some(p)) => match regex::Regex::new(&p.value) {
                Ok(re) => PathMatch::Regex(re),
                Err(e) => {
                    self.error(&p.referenced, format!("invalid path_regex: {e}"));
                    PathMatch::Any
                }
            },
            _ => {
                let second = paths.nth(1).expect("two or more are set");
                self.error(
                    &second.referenced,
                    "use only one of path, path_prefix and path_regex",
                );
                PathMatch::Any
            }
        };
        for p in [&m.path, &m.path_prefix].into_iter().flatten() {
            if !p.value.starts_with('/') {
                self.error(
                    &p.referenced,
                    format!("path `{}` must start with '/'", p.value),
                );
            }
        }
        let mut methods = Vec::new();
        for method in &m.methods {
            match Method::from_bytes(method.value.to_ascii_uppercase().as_bytes()) {
                Ok(parsed) => methods.push(parsed),
                Err(_) => self.error(
                    &method.referenced,
                    format!("`{}` is not an HTTP method", method.value),
                ),
            }
        }
        let host = m.host.as_ref().map(|h| {
            if h.value.contains('*') && !h.value.starts_with("*.")
                || h.value.matches('*').count() > 1
            {
                self.error(
                    &h.referenced,
                    format!(
                        "host `{}`: a wildcard is only allowed as a leading `*.`",
                        h.value
                    ),
                );
            }
            HostMatch::parse(&h.value)
        });
        let mut headers = Vec::new();
        for (name, value) in &m.headers {
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                (Ok(n), Ok(v)) => headers.push((n, v)),
                _ => self.error(
                    &Location::UNKNOWN,
                    format!("match.headers: `{name}: {value}` is not a valid header"),
                ),
            }
        }
        (self.errors.len() == errors_before).then_some(RouteMatcher {
            path,
            methods,
            host,
            headers,
        })
    }

    fn target(
        &mut self,
        upstream: &Spanned<UpstreamRef>,
        pools: &BTreeMap<String, Arc<Pool>>,
    ) -> Option<Target> {
        let lookup = |name: &str, this: &mut Self| match pools.get(name) {
            Some(pool) => Some(pool.clone()),
            None => {
                let known: Vec<&str> = pools.keys().map(String::as_str).collect();
                this.error(
                    &upstream.referenced,
                    format!("unknown upstream `{name}` (defined: {})", known.join(", ")),
                );
                None
            }
        };
        match &upstream.value {
            UpstreamRef::Pool(name) => lookup(name, self).map(Target::Pool),
            UpstreamRef::Split(split) => {
                if split.is_empty() {
                    self.error(
                        &upstream.referenced,
                        "a weighted split needs at least one upstream",
                    );
                    return None;
                }
                let mut cumulative = 0;
                let mut out = Vec::new();
                for (name, weight) in split {
                    cumulative += weight;
                    out.push((lookup(name, self)?, cumulative));
                }
                if cumulative == 0 {
                    self.error(
                        &upstream.referenced,
                        "the weights of a split must not all be 0",
                    );
                    return None;
                }
                Some(Target::Split(out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(text: &str) -> Result<Policy, Vec<ConfigError>> {
        compile_text(
            Path::new("gateway.yaml"),
            text,
            None,
            &Metrics::new(),
            &Default::default(),
        )
    }

    const BASE: &str = "version: 1
upstreams:
  app:
    servers: [\"127.0.0.1:3000\", \"127.0.0.1:3001\"]
routes:
  - name: api
    match: { path_prefix: /api, methods: [get] }
    upstream: app
";

    #[test]
    fn compiles_and_routes() {
        let p = compile(BASE).unwrap();
        assert_eq!(p.generation, 1);
        assert_eq!(p.routes.len(), 1);
        let req = pingora::http::RequestHeader::build("GET", b"/api/x", None).unwrap();
        assert_eq!(&*p.routes[p.route_for(&req).unwrap()].name, "api");
        let req = pingora::http::RequestHeader::build("POST", b"/api/x", None).unwrap();
        assert!(p.route_for(&req).is_none());
    }

    #[test]
    fn admin_token_env_defaults_without_the_admin_section() {
        // The only test that touches this variable (nextest runs each in its own process).
        std::env::set_var("TOLLGATE_ADMIN_TOKEN", "from-default");
        let p = compile(BASE).unwrap();
        assert_eq!(p.admin.token.as_deref(), Some("from-default"));
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let text = BASE.replace("upstream: app", "upstream: ap");
        let errors = compile(&text).err().expect("the policy is invalid");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].line, errors[0].column), (8, 15), "{}", errors[0]);
        assert!(errors[0].message.contains("unknown upstream `ap`"));

        let text =
            format!("{BASE}  - name: api\n    match: {{ path_regex: \"[\" }}\n    upstream: app\n");
        let errors = compile(&text).err().expect("the policy is invalid");
        let messages: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("gateway.yaml:9:11: route name `api` is used twice")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("gateway.yaml:10:26: invalid path_regex")
                    && !m.contains('\n')),
            "{messages:?}"
        );
    }

    #[test]
    fn generation_and_state_carry_over() {
        let metrics = Metrics::new();
        let events = Arc::new(EventLog::default());
        let first = compile_text(Path::new("g.yaml"), BASE, None, &metrics, &events).unwrap();
        let same =
            compile_text(Path::new("g.yaml"), BASE, Some(&first), &metrics, &events).unwrap();
        assert_eq!(same.generation, 1);
        let changed_text = BASE.replace("3001", "3002");
        let changed = compile_text(
            Path::new("g.yaml"),
            &changed_text,
            Some(&first),
            &metrics,
            &events,
        )
        .unwrap();
        assert_eq!(changed.generation, 2);
        let (old_pool, new_pool) = (&first.upstreams["app"], &changed.upstreams["app"]);
        assert!(Arc::ptr_eq(
            &old_pool.servers[0].state,
            &new_pool.servers[0].state
        ));
        assert!(!Arc::ptr_eq(
            &old_pool.servers[1].state,
            &new_pool.servers[1].state
        ));
        assert_eq!(
            PolicyDiff::between(&first, &changed).lines(),
            ["upstream `app` changed"]
        );
    }
}
