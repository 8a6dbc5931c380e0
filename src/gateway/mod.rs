//! The running gateway: the state shared by the proxy, the admin API and the
//! background services of one process (the policy in force, metrics, events, and the
//! in-flight count that graceful shutdown waits on), and those services. The concerns
//! (`shed`, `health`, `ratelimit`, `cache`) know their own state; only this module
//! knows the gateway.

pub(crate) mod balancer;
pub(crate) mod health_checker;
pub(crate) mod historian;
pub(crate) mod janitor;
pub(crate) mod load_monitor;
pub(crate) mod reload;
pub(crate) mod warmer;

use crate::events::EventLog;
use crate::metrics::{Metrics, RouteMetrics};
use crate::policy::Policy;
use arc_swap::ArcSwap;
use pingora::server::ShutdownWatch;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) struct Gateway {
    pub(crate) policy: ArcSwap<Policy>,
    pub(crate) policy_path: PathBuf,
    pub(crate) metrics: Metrics,
    pub(crate) events: Arc<EventLog>,
    /// The load level and its signals, kept by the shedding monitor.
    pub(crate) load: crate::shed::Load,
    /// Counts requests no route matched, under route `_unmatched`.
    pub(crate) unmatched: RouteMetrics,
    /// The response cache's storage, shared by every caching route and generation.
    pub(crate) cache: &'static crate::cache::Store,
    /// The access log's queue to its writer thread.
    pub(crate) access_log: crate::access_log::Sink,
    /// The span exporter's queue (`tracing`).
    pub(crate) spans: crate::trace::export::SpanSink,
    /// The last 15 minutes, sampled by the historian (`GET /history`).
    pub(crate) history: crate::history::History,
    inflight: AtomicUsize,
    /// The factor every rate limit is multiplied by (f64 bits); 1.0 unless load
    /// shedding lowers it.
    limit_scale: AtomicU64,
    draining: AtomicBool,
    handing_over: AtomicBool,
    /// Serializes reloads and remembers the last file content seen, good or bad, so
    /// the watcher does not re-report an invalid file that has not changed.
    pub(crate) reload_state: Mutex<Option<String>>,
    /// The generation of the policy in force, for services that wait for a reload.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Gateway {
    pub(crate) fn new(policy: Policy, metrics: Metrics, events: Arc<EventLog>) -> Arc<Gateway> {
        metrics.config_generation.set(policy.generation as i64);
        metrics.config_last_success.set(unix_now() as i64);
        metrics.set_slo_objectives(policy.slo_objectives());
        let seen = Some(policy.sha256.clone());
        let generation = policy.generation;
        let first_output = policy.access_log.output.clone();
        Arc::new_cyclic(|gateway: &std::sync::Weak<Gateway>| {
            let weak = gateway.clone();
            // The span exporter reads where to send from the policy in force at each batch.
            let destination = move || {
                let gateway = weak.upgrade()?;
                let policy = gateway.policy.load();
                policy.tracing.as_ref().map(|t| t.export.clone())
            };
            let gateway = gateway.clone();
            // The writer reads where to write from the policy in force at each tick.
            let output = move || {
                gateway.upgrade().map_or(first_output.clone(), |g| {
                    g.policy.load().access_log.output.clone()
                })
            };
            Gateway {
                access_log: crate::access_log::Sink::start(
                    metrics.access_log_dropped.clone(),
                    output,
                )
                .expect("the access log writer thread starts"),
                spans: crate::trace::export::SpanSink::start(
                    metrics.trace_spans_dropped.clone(),
                    destination,
                )
                .expect("the span export thread starts"),
                unmatched: metrics.route("_unmatched"),
                history: crate::history::History::default(),
                cache: crate::cache::Store::new(policy.cache.clone()),
                policy_path: policy.source.clone(),
                policy: ArcSwap::from_pointee(policy),
                metrics,
                events,
                load: Default::default(),
                inflight: AtomicUsize::new(0),
                limit_scale: AtomicU64::new(1.0f64.to_bits()),
                draining: AtomicBool::new(false),
                handing_over: AtomicBool::new(false),
                reload_state: Mutex::new(seen),
                generation: tokio::sync::watch::channel(generation).0,
            }
        })
    }

    /// Puts `policy` in force and wakes the services waiting for a reload.
    pub(crate) fn install(&self, policy: Policy) {
        let generation = policy.generation;
        self.policy.store(Arc::new(policy));
        self.generation.send_replace(generation);
    }

    /// Sees each policy put in force from now on.
    pub(crate) fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    pub(crate) fn limit_scale(&self) -> f64 {
        f64::from_bits(self.limit_scale.load(Ordering::Relaxed))
    }

    /// Scales every rate limit's rate and burst (SPEC: `limit_scale` of a shedding level).
    pub(crate) fn set_limit_scale(&self, scale: f64) {
        let scale = if scale.is_finite() && scale > 0.0 {
            scale
        } else {
            1.0
        };
        self.limit_scale.store(scale.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// A graceful upgrade is handing the listening sockets to a new process.
    pub(crate) fn start_hand_over(&self) {
        self.handing_over.store(true, Ordering::Release);
    }

    /// Whether responses should end their connection: while the process is on its way
    /// out, clients are sent to a fresh connection (which the new process, or another
    /// replica, accepts) instead of having an idle keep-alive one closed under them.
    pub(crate) fn closes_connections(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.handing_over.load(Ordering::Relaxed)
    }
}

/// One request counted in flight, from its context's creation to its drop.
pub(crate) struct InflightRequest(Arc<Gateway>);

impl InflightRequest {
    pub(crate) fn new(gateway: &Arc<Gateway>) -> Self {
        gateway.inflight.fetch_add(1, Ordering::AcqRel);
        gateway.metrics.inflight.inc();
        InflightRequest(gateway.clone())
    }
}

impl Drop for InflightRequest {
    fn drop(&mut self) {
        self.0.metrics.inflight.dec();
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Waits `wait`; `false` once the server is shutting down.
pub(crate) async fn pause(shutdown: &mut ShutdownWatch, wait: Duration) -> bool {
    tokio::select! {
        _ = shutdown.changed() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// The beat of a background service: `while ticks.next().await { … }` runs its body
/// every `period`, the first time at once, until the server shuts down.
pub(crate) struct Ticks {
    interval: tokio::time::Interval,
    shutdown: ShutdownWatch,
}

impl Ticks {
    pub(crate) fn every(period: Duration, shutdown: ShutdownWatch) -> Ticks {
        Ticks {
            interval: tokio::time::interval(period),
            shutdown,
        }
    }

    /// Waits for the next tick; `false` once the server is shutting down.
    pub(crate) async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.shutdown.changed() => false,
            _ = self.interval.tick() => true,
        }
    }
}
