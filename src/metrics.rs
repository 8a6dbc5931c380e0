//! Prometheus metrics (SPEC §6). Families are registered once per process; the request
//! path only touches handles resolved when a policy is compiled, so a request costs a
//! few atomic adds and no label hashing.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};
use std::sync::OnceLock;

/// OpenTelemetry's HTTP duration buckets with sub-millisecond ones in front: answers the
/// gateway writes itself (429, cache hits) take well under a millisecond.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0,
];

/// Methods with their own counter slot; anything else counts as `OTHER`, which keeps the
/// `method` label bounded whatever clients send.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];
const OTHER_METHOD: usize = METHODS.len();
/// Status codes 100..=599 each get a slot.
const CODES: usize = 500;

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    pub inflight: IntGauge,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub config_last_success: IntGauge,
    ratelimit_decisions: IntCounterVec,
    circuit_state: IntGaugeVec,
    circuit_transitions: IntCounterVec,
    bulkhead_rejections: IntCounterVec,
    server_healthy: IntGaugeVec,
    retries: IntCounterVec,
    pub load_ratio: Gauge,
    pub shedding_level: IntGauge,
    shed_requests: IntCounterVec,
    cache_requests: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    /// Clients cut off with 408: a request head slower than `header_timeout`, or a
    /// body that stalled longer than `body_timeout` between reads.
    pub header_timeouts: IntCounter,
    pub body_timeouts: IntCounter,
    /// Access-log lines dropped because the writer's queue was full.
    pub access_log_dropped: IntCounter,
    /// Spans that never reached the collector: a full queue or a failed export.
    pub trace_spans_dropped: IntCounter,
    slo_availability: GaugeVec,
    /// `server.threads` above 1: how many serve connections, what each serves, and
    /// the kept-alive connections moved between them.
    pub threads_in_use: IntGauge,
    pub thread_connections: IntGaugeVec,
    pub connections_moved: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Requests answered, by route, method and status code",
            ),
            &["route", "method", "code"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_request_duration_seconds",
                "Time from request start to the end of the response, by route",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_upstream_request_duration_seconds",
                "Time from sending a request upstream to its response header, by upstream pool",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["upstream"],
        )
        .expect("valid metric");
        let inflight = IntGauge::new("tollgate_inflight_requests", "Requests being processed")
            .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "tollgate_config_reloads_total",
                "Policy reload attempts, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let config_generation = IntGauge::new(
            "tollgate_config_generation",
            "Generation of the policy in force; grows when a reload changes the policy",
        )
        .expect("valid metric");
        let config_last_success = IntGauge::new(
            "tollgate_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful policy load",
        )
        .expect("valid metric");
        let ratelimit_decisions = IntCounterVec::new(
            Opts::new(
                "tollgate_ratelimit_decisions_total",
                "Rate-limit rule decisions: allowed, limited, or shadow_limited (dry run)",
            ),
            &["rule", "decision"],
        )
        .expect("valid metric");
        let circuit_state = IntGaugeVec::new(
            Opts::new(
                "tollgate_circuit_state",
                "Circuit breaker state per upstream pool: 0 closed, 1 half-open, 2 open",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let circuit_transitions = IntCounterVec::new(
            Opts::new(
                "tollgate_circuit_transitions_total",
                "Circuit breaker state changes per upstream pool, by the state entered",
            ),
            &["upstream", "to"],
        )
        .expect("valid metric");
        let bulkhead_rejections = IntCounterVec::new(
            Opts::new(
                "tollgate_bulkhead_rejections_total",
                "Requests refused because a pool's bulkhead and its queue were full, or the queue timed out",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let server_healthy = IntGaugeVec::new(
            Opts::new(
                "tollgate_upstream_server_healthy",
                "1 while a server passes its pool's active health checks, else 0",
            ),
            &["upstream", "server"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "tollgate_retries_total",
                "Requests sent to an upstream pool again after a failed attempt",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let load_ratio = Gauge::new(
            "tollgate_load_ratio",
            "Smoothed load: the highest of in-flight, latency and CPU against their limits",
        )
        .expect("valid metric");
        let shedding_level = IntGauge::new(
            "tollgate_shedding_level",
            "Shedding level in force: 0 normal, n the policy's n-th level",
        )
        .expect("valid metric");
        let shed_requests = IntCounterVec::new(
            Opts::new(
                "tollgate_shed_requests_total",
                "Requests answered with a fallback or 503 overloaded because of load",
            ),
            &["route", "priority"],
        )
        .expect("valid metric");
        let cache_requests = IntCounterVec::new(
            Opts::new(
                "tollgate_cache_requests_total",
                "Requests on caching routes, by route and result: hit, miss, stale or bypass",
            ),
            &["route", "result"],
        )
        .expect("valid metric");
        let cache_entries = IntGauge::new("tollgate_cache_entries", "Responses held in the cache")
            .expect("valid metric");
        let cache_bytes = IntGauge::new(
            "tollgate_cache_bytes",
            "Bytes held in the cache: bodies, headers and bookkeeping",
        )
        .expect("valid metric");
        let client_timeouts = IntCounterVec::new(
            Opts::new(
                "tollgate_client_timeouts_total",
                "Requests answered 408 because the client sent them too slowly, by phase (header|body)",
            ),
            &["phase"],
        )
        .expect("valid metric");
        let access_log_dropped = IntCounter::new(
            "tollgate_access_log_dropped_total",
            "Access-log lines dropped because the log writer fell behind (a request never waits on it)",
        )
        .expect("valid metric");
        let trace_spans_dropped = IntCounter::new(
            "tollgate_trace_spans_dropped_total",
            "Spans not exported: the export queue was full or the collector failed (a request never waits on it)",
        )
        .expect("valid metric");
        let slo_availability = GaugeVec::new(
            Opts::new(
                "tollgate_slo_availability_objective",
                "The availability objective of each route with an `slo` (a ratio: 0.999); burn-rate alerts divide the error ratio by 1 minus it",
            ),
            &["route"],
        )
        .expect("valid metric");
        let threads_in_use = IntGauge::new(
            "tollgate_threads_in_use",
            "Proxy threads serving connections: the fewest the load needs, of server.threads",
        )
        .expect("valid metric");
        let thread_connections = IntGaugeVec::new(
            Opts::new(
                "tollgate_thread_connections",
                "Client connections each proxy thread serves (server.threads above 1)",
            ),
            &["thread"],
        )
        .expect("valid metric");
        let connections_moved = IntCounter::new(
            "tollgate_connections_moved_total",
            "Kept-alive client connections moved to another proxy thread between two requests",
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("tollgate_build_info", "Always 1; labelled with the version"),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(inflight.clone()),
            Box::new(config_reloads.clone()),
            Box::new(config_generation.clone()),
            Box::new(config_last_success.clone()),
            Box::new(ratelimit_decisions.clone()),
            Box::new(circuit_state.clone()),
            Box::new(circuit_transitions.clone()),
            Box::new(bulkhead_rejections.clone()),
            Box::new(server_healthy.clone()),
            Box::new(retries.clone()),
            Box::new(load_ratio.clone()),
            Box::new(shedding_level.clone()),
            Box::new(shed_requests.clone()),
            Box::new(cache_requests.clone()),
            Box::new(cache_entries.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(client_timeouts.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(slo_availability.clone()),
            Box::new(trace_spans_dropped.clone()),
            Box::new(threads_in_use.clone()),
            Box::new(thread_connections.clone()),
            Box::new(connections_moved.clone()),
            Box::new(crate::redis::store_errors().clone()),
            Box::new(build_info),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            registry
                .register(collector)
                .expect("metric registered once");
        }
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            inflight,
            config_reloads,
            config_generation,
            config_last_success,
            ratelimit_decisions,
            circuit_state,
            circuit_transitions,
            bulkhead_rejections,
            server_healthy,
            retries,
            load_ratio,
            shedding_level,
            shed_requests,
            cache_requests,
            cache_entries,
            cache_bytes,
            header_timeouts: client_timeouts.with_label_values(&["header"]),
            body_timeouts: client_timeouts.with_label_values(&["body"]),
            access_log_dropped,
            trace_spans_dropped,
            slo_availability,
            threads_in_use,
            thread_connections,
            connections_moved,
        }
    }

    /// The objectives of the policy now in force (a reload may add, change or drop them).
    pub(crate) fn set_slo_objectives<'a>(&self, objectives: impl Iterator<Item = (&'a str, f64)>) {
        self.slo_availability.reset();
        for (route, objective) in objectives {
            self.slo_availability
                .with_label_values(&[route])
                .set(objective);
        }
    }

    pub(crate) fn cache_requests(&self, route: &str, result: &str) -> IntCounter {
        self.cache_requests.with_label_values(&[route, result])
    }

    pub(crate) fn shed_requests(&self, route: &str, priority: &str) -> IntCounter {
        self.shed_requests.with_label_values(&[route, priority])
    }

    pub(crate) fn retries(&self, upstream: &str) -> IntCounter {
        self.retries.with_label_values(&[upstream])
    }

    pub(crate) fn server_healthy(&self, upstream: &str, server: &str) -> IntGauge {
        self.server_healthy.with_label_values(&[upstream, server])
    }

    pub(crate) fn bulkhead_rejections(&self, upstream: &str) -> IntCounter {
        self.bulkhead_rejections.with_label_values(&[upstream])
    }

    pub(crate) fn circuit_state(&self, upstream: &str) -> IntGauge {
        self.circuit_state.with_label_values(&[upstream])
    }

    pub(crate) fn circuit_transitions(&self, upstream: &str, to: &str) -> IntCounter {
        self.circuit_transitions.with_label_values(&[upstream, to])
    }

    pub(crate) fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            name: route.into(),
            requests: self.requests.clone(),
            counters: (0..(METHODS.len() + 1) * CODES)
                .map(|_| OnceLock::new())
                .collect(),
            duration: self.request_duration.with_label_values(&[route]),
        }
    }

    pub(crate) fn ratelimit_decision(&self, rule: &str, decision: &str) -> IntCounter {
        self.ratelimit_decisions
            .with_label_values(&[rule, decision])
    }

    pub(crate) fn upstream_duration(&self, upstream: &str) -> Histogram {
        self.upstream_duration.with_label_values(&[upstream])
    }

    /// Removes label sets of routes, upstreams and rate-limit rules that a new policy
    /// no longer has, so `/metrics` does not keep advertising them after a rename.
    pub(crate) fn forget(
        &self,
        routes: &[String],
        upstreams: &[String],
        rules: &[String],
        servers: &[(String, String)],
    ) {
        for (upstream, server) in servers {
            let _ = self
                .server_healthy
                .remove_label_values(&[upstream.as_str(), server.as_str()]);
        }
        for route in routes {
            let _ = self.request_duration.remove_label_values(&[route.as_str()]);
            for result in ["hit", "miss", "stale", "bypass"] {
                let _ = self
                    .cache_requests
                    .remove_label_values(&[route.as_str(), result]);
            }
            for priority in ["critical", "high", "normal", "low"] {
                let _ = self
                    .shed_requests
                    .remove_label_values(&[route.as_str(), priority]);
            }
            for method in METHODS.iter().chain(std::iter::once(&"OTHER")) {
                for code in 100..600u16 {
                    let _ = self.requests.remove_label_values(&[
                        route.as_str(),
                        method,
                        &code.to_string(),
                    ]);
                }
            }
        }
        for upstream in upstreams {
            let _ = self
                .upstream_duration
                .remove_label_values(&[upstream.as_str()]);
            let _ = self.circuit_state.remove_label_values(&[upstream.as_str()]);
            let _ = self
                .bulkhead_rejections
                .remove_label_values(&[upstream.as_str()]);
            let _ = self.retries.remove_label_values(&[upstream.as_str()]);
            for to in ["closed", "half_open", "open"] {
                let _ = self
                    .circuit_transitions
                    .remove_label_values(&[upstream.as_str(), to]);
            }
        }
        for rule in rules {
            for decision in ["allowed", "limited", "shadow_limited"] {
                let _ = self
                    .ratelimit_decisions
                    .remove_label_values(&[rule.as_str(), decision]);
            }
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A route's handles. Counters for (method, code) are created on first use and then
/// reused for the life of the policy.
pub(crate) struct RouteMetrics {
    name: Box<str>,
    requests: IntCounterVec,
    counters: Box<[OnceLock<IntCounter>]>,
    pub(crate) duration: Histogram,
}

impl RouteMetrics {
    pub(crate) fn count(&self, method: &http::Method, code: u16) {
        let method_slot = METHODS
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(OTHER_METHOD);
        let code = code.clamp(100, 599);
        let slot = method_slot * CODES + (code - 100) as usize;
        self.counters[slot]
            .get_or_init(|| {
                let method = METHODS.get(method_slot).copied().unwrap_or("OTHER");
                self.requests
                    .with_label_values(&[&self.name, method, &code.to_string()])
            })
            .inc();
    }
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.name)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_counters_are_labelled_and_bounded() {
        let metrics = Metrics::new();
        let route = metrics.route("predict");
        route.count(&http::Method::GET, 200);
        route.count(&http::Method::GET, 200);
        route.count(&http::Method::from_bytes(b"BREW").unwrap(), 418);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains(r#"tollgate_requests_total{code="200",method="GET",route="predict"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tollgate_requests_total{code="418",method="OTHER",route="predict"} 1"#
            ),
            "{text}"
        );
        let rule = metrics.ratelimit_decision("per-ip", "limited");
        rule.inc();
        assert!(String::from_utf8(metrics.encode())
            .unwrap()
            .contains(r#"rule="per-ip""#));
        metrics.forget(&["predict".to_string()], &[], &["per-ip".to_string()], &[]);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(!text.contains(r#"route="predict""#), "{text}");
        assert!(!text.contains(r#"rule="per-ip""#), "{text}");
    }
}
