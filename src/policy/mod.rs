//! The runtime policy: `gateway.yaml` compiled and validated once into immutable,
//! ready-to-use parts (route table, upstream pools, header values, metric handles).
//! The request path reads it through one `ArcSwap` load and never parses anything.
//!
//! Compilation collects every semantic error it finds, each pointing at the line and
//! column of the offending value, and takes over the stateful parts (server counters,
//! SLO windows, metric handles) of the previous policy wherever their definition
//! did not change.

pub(crate) mod compile;
mod diff;

pub(crate) use diff::PolicyDiff;

use crate::config::{self, Config, ConfigError, Priority, SloConfig, UpstreamRef};
use crate::events::EventLog;
use crate::metrics::{Metrics, RouteMetrics};
use crate::routing::RouteMatcher;
use crate::slo::SloTracker;
use crate::upstream::Pool;
use compile::Compile;
use http::{HeaderName, HeaderValue};
use ipnet::IpNet;
use serde_saphyr::{Location, Spanned};
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub struct Policy {
    pub(crate) generation: u64,
    pub(crate) sha256: String,
    pub(crate) loaded_at: SystemTime,
    pub(crate) source: PathBuf,
    pub(crate) server: ServerSettings,
    pub(crate) admin: AdminSettings,
    pub routes: Vec<Route>,
    pub(crate) upstreams: BTreeMap<String, Arc<Pool>>,
    pub(crate) access_log: AccessLog,
    /// Span export (`tracing`); absent, trace context is still propagated.
    pub(crate) tracing: Option<crate::trace::Tracing>,
    pub(crate) identity: Option<crate::identity::Identity>,
    pub(crate) rate_limits: crate::ratelimit::RateLimits,
    pub(crate) shedding: Option<crate::shed::Shedding>,
    pub(crate) cache: crate::cache::Settings,
    /// Other files the policy reads (API keys, JWT keys): a change to one is a change
    /// to the policy, for the watcher and the generation.
    pub(crate) read_files: Vec<PathBuf>,
    /// The parsed file, kept for `check --against` and for compiling the next generation.
    pub(crate) config: Config,
}

pub(crate) struct ServerSettings {
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) tls: Option<TlsSettings>,
    pub(crate) threads: usize,
    pub(crate) max_request_body: u64,
    pub(crate) trusted_proxies: Vec<IpNet>,
    /// Fields the gateway adds are spelled like the head's own names (Pingora's
    /// `insert_header_alike`), so the policy's spelling of these is not kept.
    pub(crate) request_id_header: HeaderName,
    pub(crate) response_headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) shutdown_grace: Duration,
    /// How long a client connection may sit without sending a request.
    pub(crate) idle_timeout: Duration,
    /// How long a request head may take to arrive, from its first byte (408 after).
    pub(crate) header_timeout: Duration,
    /// The longest wait between two reads of a request body (408 after).
    pub(crate) body_timeout: Duration,
    /// `false`: framing field names spelled with `_` are refused, other `_` names are
    /// not forwarded (nginx's `underscores_in_headers off`).
    pub(crate) allow_underscores_in_headers: bool,
}

pub(crate) struct TlsSettings {
    pub(crate) listen: SocketAddr,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

pub(crate) struct AdminSettings {
    pub(crate) listen: SocketAddr,
    /// The bearer token mutating admin calls must carry, read from `token_env`.
    pub(crate) token: Option<String>,
}

pub(crate) struct AccessLog {
    pub(crate) enabled: bool,
    pub(crate) redact: Vec<HeaderName>,
    pub(crate) output: crate::access_log::Output,
}

pub struct Route {
    pub name: Arc<str>,
    pub(crate) matcher: RouteMatcher,
    pub(crate) target: Target,
    pub(crate) timeout: Option<Duration>,
    /// The prefix to remove from the path before forwarding (`strip_prefix: true`).
    pub(crate) strip_prefix: Option<String>,
    pub(crate) slo: Option<(SloConfig, Arc<SloTracker>)>,
    pub(crate) metrics: Arc<RouteMetrics>,
    /// Answered instead of 503 while the pool's circuit is open, or the route is shed.
    pub(crate) fallback: Option<Fallback>,
    pub(crate) priority: Priority,
    /// Counts this route's shed requests.
    pub(crate) shed: prometheus::IntCounter,
    pub cache: Option<crate::cache::RouteCache>,
}

pub(crate) struct Fallback {
    pub(crate) status: http::StatusCode,
    pub(crate) content_type: HeaderValue,
    pub(crate) body: bytes::Bytes,
}

pub(crate) enum Target {
    Pool(Arc<Pool>),
    /// Pools with cumulative weights: a request draws a number below the total.
    Split(Vec<(Arc<Pool>, u32)>),
}

impl Target {
    pub(crate) fn choose(&self) -> &Arc<Pool> {
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

    pub(crate) fn pools(&self) -> Vec<&Arc<Pool>> {
        match self {
            Target::Pool(pool) => vec![pool],
            Target::Split(split) => split.iter().map(|(pool, _)| pool).collect(),
        }
    }
}

impl Policy {
    /// Each route's availability objective, for `tollgate_slo_availability_objective`.
    pub(crate) fn slo_objectives(&self) -> impl Iterator<Item = (&str, f64)> {
        self.routes.iter().filter_map(|route| {
            let (targets, _) = route.slo.as_ref()?;
            Some((&*route.name, targets.availability?.0))
        })
    }

    /// The index of the first route whose match accepts the request.
    pub fn route_for(&self, req: &pingora::http::RequestHeader) -> Option<usize> {
        let host = crate::routing::request_host(req);
        self.routes
            .iter()
            .position(|r| r.matcher.matches(req, host))
    }

    /// The request as the rate-limit rules see it; anonymous requests are in the
    /// identity's default tier.
    pub(crate) fn subject<'a>(
        &'a self,
        route: usize,
        client_ip: Option<IpAddr>,
        principal: Option<&'a crate::identity::Principal>,
        headers: &'a http::HeaderMap,
        arrived: std::time::Instant,
    ) -> crate::ratelimit::Subject<'a> {
        let default_tier = self.identity.as_ref().map_or("free", |i| &*i.default_tier);
        crate::ratelimit::Subject {
            route,
            route_name: &self.routes[route].name,
            client_ip,
            user: principal.map(|p| &*p.user),
            tier: principal.map_or(default_tier, |p| &*p.tier),
            headers,
            arrived,
        }
    }

    pub(crate) fn is_trusted(&self, ip: IpAddr) -> bool {
        self.server
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip))
    }
}

/// Reads, parses and compiles a policy file. `previous` donates state; `generation` is
/// the number the result gets if its content differs from `previous`.
pub(crate) fn load(
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
        cx: Compile::new(path, metrics, events),
        previous,
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

/// The sections in order, and the checks that span sections.
struct Compiler<'a> {
    cx: Compile<'a>,
    previous: Option<&'a Policy>,
}

impl Compiler<'_> {
    fn compile(mut self, config: Config) -> Result<Policy, Vec<ConfigError>> {
        if config.version.value != 1 {
            self.cx.error(
                &config.version.referenced,
                format!(
                    "unsupported version {}: this gateway reads version 1",
                    config.version.value
                ),
            );
        }
        let server = self.server(&config.server);
        let admin = self.admin(&config.admin);
        let upstreams = crate::upstream::compile(
            &mut self.cx,
            &config.upstreams,
            self.previous.map(|p| &p.upstreams),
        );
        let routes = self.routes(&config.routes, &upstreams);
        let identity = config
            .identity
            .as_ref()
            .and_then(|c| crate::identity::compile(&mut self.cx, c));
        let route_names: Vec<&str> = config
            .routes
            .iter()
            .map(|r| r.name.value.as_str())
            .collect();
        let rate_limits = crate::ratelimit::compile(
            &mut self.cx,
            &config.rate_limits,
            &config.rate_limiting,
            &route_names,
            self.previous.map(|p| &p.rate_limits),
        );
        let shedding = config
            .shedding
            .as_ref()
            .and_then(|s| crate::shed::compile(&mut self.cx, s));
        let cache = crate::cache::compile_settings(&mut self.cx, &config.cache);
        let tracing = config
            .tracing
            .as_ref()
            .and_then(|t| crate::trace::compile(&mut self.cx, t));
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
                    .map(|p| self.cx.relative_path(p)),
            },
        };
        if let (Some(server), Some(admin)) = (&server, &admin) {
            self.listeners_apart(&config, server, admin);
        }
        if !self.cx.errors.is_empty() {
            return Err(self.cx.errors);
        }
        Ok(Policy {
            // Both are set by `compile_text`, which knows the text and the read files.
            generation: 0,
            sha256: String::new(),
            loaded_at: SystemTime::now(),
            source: self.cx.path.to_path_buf(),
            server: server.expect("no errors means the section compiled"),
            admin: admin.expect("no errors means the section compiled"),
            routes,
            upstreams,
            access_log,
            tracing,
            identity,
            rate_limits,
            shedding,
            cache: cache.expect("no errors means the section compiled"),
            read_files: self.cx.read_files,
            config,
        })
    }

    /// Every listener needs a port of its own. Pingora aborts on a listed address that
    /// repeats, and retries one a wildcard already covers for half a minute before
    /// giving up on it, so the policy names the two entries instead.
    fn listeners_apart(&mut self, config: &Config, server: &ServerSettings, admin: &AdminSettings) {
        // Compiled sections keep their entries' order, so addresses and texts pair up.
        let mut listeners: Vec<(SocketAddr, &Spanned<String>, &str)> = server
            .listen
            .iter()
            .zip(&config.server.listen)
            .map(|(addr, text)| (*addr, text, "server.listen"))
            .collect();
        if let (Some(tls), Some(text)) = (&server.tls, &config.server.tls) {
            listeners.push((tls.listen, &text.listen, "server.tls.listen"));
        }
        listeners.push((admin.listen, &config.admin.listen, "admin.listen"));
        for (i, (addr, text, key)) in listeners.iter().enumerate() {
            let Some((_, other_text, other_key)) = listeners[..i]
                .iter()
                .find(|(earlier, _, _)| listeners_collide(*earlier, *addr))
            else {
                continue;
            };
            let why = if *key == "admin.listen" {
                "the admin API never shares the public listener"
            } else {
                "two listeners cannot share a port"
            };
            self.cx.error(
                &text.referenced,
                format!(
                    "{key} `{}` takes the port of {other_key} `{}`: {why}",
                    text.value, other_text.value
                ),
            );
        }
    }

    fn server(&mut self, s: &config::ServerConfig) -> Option<ServerSettings> {
        let errors_before = self.cx.errors.len();
        let listen: Vec<SocketAddr> = s
            .listen
            .iter()
            .filter_map(|l| self.cx.socket_addr(l, "listen address"))
            .collect();
        if s.listen.is_empty() {
            self.cx.error(
                &Location::UNKNOWN,
                "server.listen needs at least one address",
            );
        }
        let tls = s.tls.as_ref().and_then(|t| {
            let listen = self.cx.socket_addr(&t.listen, "TLS listen address")?;
            let cert = self.cx.relative_path(&t.cert.value);
            let key = self.cx.relative_path(&t.key.value);
            for (file, spanned) in [(&cert, &t.cert), (&key, &t.key)] {
                if !file.is_file() {
                    self.cx.error(
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
                Err(_) => self.cx.error(
                    &cidr.referenced,
                    format!("`{}` is not an IP address or CIDR range", cidr.value),
                ),
            }
        }
        let request_id_header = match HeaderName::from_bytes(s.request_id_header.value.as_bytes()) {
            Ok(h) => match crate::forwarding::reserved_for_request_id(&h) {
                None => Some(h),
                Some(why) => {
                    self.cx.error(
                        &s.request_id_header.referenced,
                        format!("`{h}` cannot be the request-id field: {why}"),
                    );
                    None
                }
            },
            Err(_) => {
                self.cx.error(
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
                _ => self.cx.error(
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
                self.cx.error(
                    &Location::UNKNOWN,
                    format!("server.{name}: must be more than 0"),
                );
            }
        }
        let threads = if s.threads == 0 {
            usable_cpus()
        } else {
            s.threads
        };
        (self.cx.errors.len() == errors_before).then(|| ServerSettings {
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
        let listen = self.cx.socket_addr(&a.listen, "admin listen address")?;
        let token = std::env::var(&a.token_env).ok().filter(|t| !t.is_empty());
        Some(AdminSettings { listen, token })
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
                self.cx.error(&r.name.referenced, format!("route name `{name}`: use letters, digits, '-', '_' or '.' (it becomes a metric label)"));
            }
            if !names.insert(name.clone()) {
                self.cx.error(
                    &r.name.referenced,
                    format!("route name `{name}` is used twice"),
                );
            }
            let matcher = crate::routing::compile(&mut self.cx, &r.matcher);
            let target = self.target(&r.upstream, pools);
            let strip_prefix = match (&r.matcher.path_prefix, r.strip_prefix) {
                (Some(prefix), true) => Some(prefix.value.trim_end_matches('/').to_string()),
                (None, true) => {
                    self.cx.error(
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
                .unwrap_or_else(|| Arc::new(self.cx.metrics.route(name)));
            let fallback = r.fallback.as_ref().and_then(|f| self.fallback(f));
            let cache = r
                .cache
                .as_ref()
                .and_then(|c| crate::cache::compile_route(&mut self.cx, name, c));
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
                    shed: self.cx.metrics.shed_requests(name, r.priority.as_str()),
                    cache,
                });
            }
        }
        if routes.is_empty() {
            self.cx
                .error(&Location::UNKNOWN, "routes: define at least one route");
        }
        compiled
    }

    fn fallback(&mut self, f: &config::FallbackConfig) -> Option<Fallback> {
        let status = http::StatusCode::from_u16(f.status.value)
            .ok()
            .filter(|s| (200..600).contains(&s.as_u16()));
        let Some(status) = status else {
            self.cx.error(
                &f.status.referenced,
                format!("fallback status {} is not 200-599", f.status.value),
            );
            return None;
        };
        let Ok(content_type) = HeaderValue::from_str(&f.content_type) else {
            self.cx.error(
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

    fn target(
        &mut self,
        upstream: &Spanned<UpstreamRef>,
        pools: &BTreeMap<String, Arc<Pool>>,
    ) -> Option<Target> {
        let lookup = |name: &str, this: &mut Self| match pools.get(name) {
            Some(pool) => Some(pool.clone()),
            None => {
                let known: Vec<&str> = pools.keys().map(String::as_str).collect();
                this.cx.error(
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
                    self.cx.error(
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
                    self.cx.error(
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

/// The CPUs this process may run on: its affinity mask and cgroup quota (what
/// `server.threads: 0` means).
pub(crate) fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Two listening sockets collide on one port when their addresses are equal or one is a
/// wildcard covering the other: `0.0.0.0` covers every IPv4 address, and `[::]` every
/// address, IPv4 too, as Linux binds it dual-stack by default.
fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wildcard: IpAddr, other: IpAddr| match wildcard {
        IpAddr::V4(ip) => ip.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(ip) => ip.is_unspecified(),
    };
    a.port() == b.port() && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
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

    #[test]
    fn listeners_collide_on_one_address_or_under_a_wildcard() {
        let collide = |a: &str, b: &str| {
            let (a, b) = (a.parse().unwrap(), b.parse().unwrap());
            assert_eq!(listeners_collide(a, b), listeners_collide(b, a));
            listeners_collide(a, b)
        };
        assert!(collide("127.0.0.1:80", "127.0.0.1:80"));
        assert!(collide("0.0.0.0:80", "10.0.0.1:80"));
        assert!(collide("[::]:80", "127.0.0.1:80"));
        assert!(collide("[::]:80", "[::1]:80"));
        assert!(!collide("0.0.0.0:80", "0.0.0.0:81"));
        assert!(!collide("127.0.0.1:80", "127.0.0.2:80"));
        assert!(!collide("0.0.0.0:80", "[::1]:80"));
        assert!(!collide("127.0.0.1:80", "[::1]:80"));
    }

    #[test]
    fn listeners_sharing_a_port_are_errors_at_the_later_entry() {
        let errors = |head: &str| -> Vec<String> {
            compile(&format!("{head}{}", &BASE["version: 1\n".len()..]))
                .err()
                .unwrap_or_default()
                .iter()
                .map(|e| e.to_string())
                .collect()
        };
        let listed_twice =
            errors("version: 1\nserver:\n  listen: [\"127.0.0.1:8080\", \"0.0.0.0:8080\"]\n");
        assert_eq!(listed_twice.len(), 1, "{listed_twice:?}");
        assert!(
            listed_twice[0].contains(
                "3:30: server.listen `0.0.0.0:8080` takes the port of server.listen `127.0.0.1:8080`"
            ),
            "{listed_twice:?}"
        );
        let admin = errors(
            "version: 1\nserver:\n  listen: [\"[::]:9000\"]\nadmin:\n  listen: \"127.0.0.1:9000\"\n",
        );
        assert!(
            admin.len() == 1 && admin[0].contains("admin.listen `127.0.0.1:9000` takes the port of server.listen `[::]:9000`: the admin API never shares the public listener"),
            "{admin:?}"
        );
        let keys = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/vendor/pingora-core/examples/keys/server"
        );
        let tls = errors(&format!(
            "version: 1\nserver:\n  listen: [\"0.0.0.0:8443\"]\n  tls: {{ listen: \"0.0.0.0:8443\", cert: {keys}/cert.pem, key: {keys}/key.pem }}\n",
        ));
        assert!(
            tls.iter().any(|e| e.contains(
                "server.tls.listen `0.0.0.0:8443` takes the port of server.listen `0.0.0.0:8443`"
            )),
            "{tls:?}"
        );
        assert!(errors(
            "version: 1\nserver:\n  listen: [\"127.0.0.1:8080\", \"127.0.0.1:8081\"]\n"
        )
        .is_empty());
    }

    #[test]
    fn the_request_id_field_is_not_one_the_gateway_frames_routes_or_writes() {
        let errors = |name: &str| -> Vec<String> {
            compile(&format!(
                "version: 1\nserver:\n  request_id_header: {name}\n{}",
                &BASE["version: 1\n".len()..]
            ))
            .err()
            .unwrap_or_default()
            .iter()
            .map(|e| e.to_string())
            .collect()
        };
        for (name, why) in [
            ("Host", "it frames or routes the message"),
            ("content-length", "it frames or routes the message"),
            ("Connection", "it is hop-by-hop"),
            (
                "x-forwarded-for",
                "the gateway sets the forwarding fields itself",
            ),
            ("traceparent", "it carries the trace context"),
        ] {
            let found = errors(name);
            let expected = format!(
                "3:22: `{}` cannot be the request-id field: {why}",
                name.to_ascii_lowercase()
            );
            assert!(
                found.len() == 1 && found[0].contains(&expected),
                "{name}: {found:?}"
            );
        }
        assert!(errors("x-correlation-id").is_empty());
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
    fn a_rule_name_the_ratelimit_headers_cannot_carry_is_refused() {
        let text =
            format!("{BASE}rate_limits:\n  - {{ name: \"caf\u{e9}\", key: ip, rate: 5/s }}\n");
        let errors = compile(&text).err().expect("the policy is invalid");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].line, errors[0].column),
            (10, 13),
            "{}",
            errors[0]
        );
        assert!(errors[0].message.contains("only printable ASCII"));
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
