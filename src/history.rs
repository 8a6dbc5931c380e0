//! `GET /history` (SPEC §5): the last 15 minutes in 5-second buckets, in total and per
//! route — requests/s, error share, p50/p99, 429/s by rule, shed/s, cache hit ratio.
//!
//! Sampled from the Prometheus counters every 5 seconds, off the request path (the hot
//! path pays nothing for it): each bucket holds the differences between two samples.
//! Memory is fixed: 180 buckets, each with one entry per route and per rate-limit rule
//! the policy names (label values never come from requests).

use prometheus::proto::{Metric, MetricFamily};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

pub(crate) const INTERVAL: Duration = Duration::from_secs(5);
/// 15 minutes of 5-second buckets.
pub(crate) const BUCKETS: usize = 180;

#[derive(Default)]
pub(crate) struct History {
    ring: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    previous: Option<(u64, Totals)>,
    buckets: VecDeque<Bucket>,
}

/// Cumulative counters at one instant.
#[derive(Default, Clone)]
struct Totals {
    routes: BTreeMap<String, RouteTotals>,
    limited: BTreeMap<String, f64>,
}

#[derive(Default, Clone)]
struct RouteTotals {
    requests: f64,
    errors: f64,
    /// The duration histogram: (upper bound in seconds, cumulative count).
    latency: Vec<(f64, f64)>,
    shed: f64,
    cache_hits: f64,
    cache_lookups: f64,
}

#[derive(Serialize, Clone, Debug)]
pub(crate) struct Bucket {
    /// Unix time of the bucket's end.
    at: u64,
    total: Stats,
    routes: BTreeMap<String, Stats>,
    /// 429s per second, by the rule that answered them.
    limited_per_s: BTreeMap<String, f64>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
struct Stats {
    requests_per_s: f64,
    /// 5xx answers over all answers; `null` without requests.
    error_share: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    shed_per_s: f64,
    /// Hits over cache lookups (hit, miss, stale; not bypass); `null` where nothing was
    /// looked up.
    cache_hit_ratio: Option<f64>,
}

impl History {
    /// Takes a sample of `families` at unix time `at`, closing a bucket since the last.
    pub(crate) fn sample(&self, families: &[MetricFamily], at: u64) {
        let now = Totals::of(families);
        let mut ring = self.ring.lock().expect("history lock");
        if let Some((then, before)) = ring.previous.take() {
            let seconds = at.saturating_sub(then).max(1) as f64;
            let bucket = Bucket::between(&before, &now, seconds, at);
            if ring.buckets.len() == BUCKETS {
                ring.buckets.pop_front();
            }
            ring.buckets.push_back(bucket);
        }
        ring.previous = Some((at, now));
    }

    /// The buckets, oldest first.
    pub(crate) fn buckets(&self) -> Vec<Bucket> {
        self.ring
            .lock()
            .expect("history lock")
            .buckets
            .iter()
            .cloned()
            .collect()
    }
}

fn label<'a>(metric: &'a Metric, name: &str) -> &'a str {
    metric
        .get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

impl Totals {
    fn of(families: &[MetricFamily]) -> Totals {
        let mut totals = Totals::default();
        for family in families {
            for metric in family.get_metric() {
                let route = || label(metric, "route").to_string();
                let counter = || metric.get_counter().get_value();
                match family.name() {
                    "tollgate_requests_total" => {
                        let entry = totals.routes.entry(route()).or_default();
                        entry.requests += counter();
                        if label(metric, "code").starts_with('5') {
                            entry.errors += counter();
                        }
                    }
                    "tollgate_request_duration_seconds" => {
                        totals.routes.entry(route()).or_default().latency = metric
                            .get_histogram()
                            .get_bucket()
                            .iter()
                            .map(|b| (b.upper_bound(), b.cumulative_count() as f64))
                            .collect();
                    }
                    "tollgate_shed_requests_total" => {
                        totals.routes.entry(route()).or_default().shed += counter();
                    }
                    // A bypass (answered before the cache, e.g. a 429) looked nothing up.
                    "tollgate_cache_requests_total" if label(metric, "result") != "bypass" => {
                        let entry = totals.routes.entry(route()).or_default();
                        entry.cache_lookups += counter();
                        if label(metric, "result") == "hit" {
                            entry.cache_hits += counter();
                        }
                    }
                    "tollgate_ratelimit_decisions_total"
                        if label(metric, "decision") == "limited" =>
                    {
                        *totals
                            .limited
                            .entry(label(metric, "rule").to_string())
                            .or_default() += counter();
                    }
                    _ => {}
                }
            }
        }
        totals
    }
}

/// A counter's growth; a counter that went down was reset (its route removed and added
/// again by a reload), so all of its value is new.
fn growth(before: f64, now: f64) -> f64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

impl Bucket {
    fn between(before: &Totals, now: &Totals, seconds: f64, at: u64) -> Bucket {
        let empty = RouteTotals::default();
        let mut sum = RouteTotals::default();
        let mut routes = BTreeMap::new();
        for (name, current) in &now.routes {
            let previous = before.routes.get(name).unwrap_or(&empty);
            let delta = RouteTotals {
                requests: growth(previous.requests, current.requests),
                errors: growth(previous.errors, current.errors),
                latency: current
                    .latency
                    .iter()
                    .enumerate()
                    .map(|(i, (bound, count))| {
                        let old = previous.latency.get(i).map_or(0.0, |b| b.1);
                        (*bound, growth(old, *count))
                    })
                    .collect(),
                shed: growth(previous.shed, current.shed),
                cache_hits: growth(previous.cache_hits, current.cache_hits),
                cache_lookups: growth(previous.cache_lookups, current.cache_lookups),
            };
            sum.add(&delta);
            routes.insert(name.clone(), delta.stats(seconds));
        }
        let limited_per_s = now
            .limited
            .iter()
            .map(|(rule, count)| {
                let old = before.limited.get(rule).copied().unwrap_or(0.0);
                (rule.clone(), growth(old, *count) / seconds)
            })
            .collect();
        Bucket {
            at,
            total: sum.stats(seconds),
            routes,
            limited_per_s,
        }
    }
}

impl RouteTotals {
    fn add(&mut self, other: &RouteTotals) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.shed += other.shed;
        self.cache_hits += other.cache_hits;
        self.cache_lookups += other.cache_lookups;
        if self.latency.is_empty() {
            self.latency = other.latency.clone();
        } else {
            for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
                mine.1 += theirs.1;
            }
        }
    }

    fn stats(&self, seconds: f64) -> Stats {
        let ratio = |part: f64, whole: f64| (whole > 0.0).then(|| part / whole);
        Stats {
            requests_per_s: self.requests / seconds,
            error_share: ratio(self.errors, self.requests),
            p50_ms: quantile(&self.latency, 0.50).map(|s| s * 1000.0),
            p99_ms: quantile(&self.latency, 0.99).map(|s| s * 1000.0),
            shed_per_s: self.shed / seconds,
            cache_hit_ratio: ratio(self.cache_hits, self.cache_lookups),
        }
    }
}

/// A quantile of cumulative histogram buckets, interpolated within its bucket as
/// Prometheus' `histogram_quantile` does; the last finite bound above it all.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let within = count - lower.1;
            let share = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

    struct Counters {
        registry: Registry,
        requests: IntCounterVec,
        durations: HistogramVec,
        limited: IntCounterVec,
    }

    fn counters() -> Counters {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("tollgate_requests_total", "r"),
            &["route", "method", "code"],
        )
        .unwrap();
        let durations = HistogramVec::new(
            HistogramOpts::new("tollgate_request_duration_seconds", "d")
                .buckets(vec![0.01, 0.1, 1.0]),
            &["route"],
        )
        .unwrap();
        let limited = IntCounterVec::new(
            Opts::new("tollgate_ratelimit_decisions_total", "l"),
            &["rule", "decision"],
        )
        .unwrap();
        registry.register(Box::new(requests.clone())).unwrap();
        registry.register(Box::new(durations.clone())).unwrap();
        registry.register(Box::new(limited.clone())).unwrap();
        Counters {
            registry,
            requests,
            durations,
            limited,
        }
    }

    #[test]
    fn a_bucket_holds_the_rates_between_two_samples() {
        let c = counters();
        let history = History::default();
        c.requests
            .with_label_values(&["api", "GET", "200"])
            .inc_by(100);
        history.sample(&c.registry.gather(), 1_000);
        assert!(history.buckets().is_empty(), "one sample is no interval");
        c.requests
            .with_label_values(&["api", "GET", "200"])
            .inc_by(40);
        c.requests
            .with_label_values(&["api", "GET", "503"])
            .inc_by(10);
        c.requests
            .with_label_values(&["web", "GET", "429"])
            .inc_by(5);
        c.limited
            .with_label_values(&["per-ip", "limited"])
            .inc_by(5);
        c.limited
            .with_label_values(&["per-ip", "allowed"])
            .inc_by(50);
        for _ in 0..99 {
            c.durations.with_label_values(&["api"]).observe(0.005);
        }
        c.durations.with_label_values(&["api"]).observe(0.5);
        history.sample(&c.registry.gather(), 1_005);
        let buckets = history.buckets();
        let bucket = &buckets[0];
        assert_eq!(bucket.at, 1_005);
        assert_eq!(bucket.routes["api"].requests_per_s, 10.0);
        assert_eq!(bucket.routes["api"].error_share, Some(0.2));
        assert_eq!(bucket.total.requests_per_s, 11.0);
        assert_eq!(bucket.limited_per_s["per-ip"], 1.0);
        let p50 = bucket.routes["api"].p50_ms.unwrap();
        assert!(p50 > 0.0 && p50 <= 10.0, "{p50}");
        let p99 = bucket.routes["api"].p99_ms.unwrap();
        assert!(
            p99 <= 10.0,
            "the 99th of 100 is still in the first bucket: {p99}"
        );
        assert_eq!(bucket.routes["web"].p50_ms, None);
        assert_eq!(bucket.routes["web"].cache_hit_ratio, None);
    }

    #[test]
    fn twenty_minutes_of_samples_keep_fifteen() {
        let c = counters();
        let history = History::default();
        for tick in 0..=240u64 {
            c.requests
                .with_label_values(&["api", "GET", "200"])
                .inc_by(tick);
            history.sample(&c.registry.gather(), 1_000 + tick * 5);
        }
        let buckets = history.buckets();
        assert_eq!(buckets.len(), BUCKETS);
        assert_eq!(
            buckets.first().unwrap().at,
            1_000 + 61 * 5,
            "the oldest went first"
        );
        assert_eq!(buckets.last().unwrap().at, 1_000 + 240 * 5);
        assert_eq!(buckets.last().unwrap().total.requests_per_s, 48.0);
    }

    #[test]
    fn a_bypass_is_not_a_cache_lookup() {
        let registry = Registry::new();
        let cache = IntCounterVec::new(
            Opts::new("tollgate_cache_requests_total", "c"),
            &["route", "result"],
        )
        .unwrap();
        registry.register(Box::new(cache.clone())).unwrap();
        let history = History::default();
        history.sample(&registry.gather(), 1_000);
        cache.with_label_values(&["search", "hit"]).inc_by(3);
        cache.with_label_values(&["search", "miss"]).inc_by(1);
        cache.with_label_values(&["search", "bypass"]).inc_by(96);
        history.sample(&registry.gather(), 1_005);
        assert_eq!(
            history.buckets()[0].routes["search"].cache_hit_ratio,
            Some(0.75)
        );
    }

    #[test]
    fn a_reset_counter_counts_from_zero() {
        assert_eq!(growth(100.0, 30.0), 30.0);
        assert_eq!(growth(100.0, 130.0), 30.0);
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let buckets = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(&buckets, 0.5), Some(0.1));
        assert!((quantile(&buckets, 0.75).unwrap() - 0.15).abs() < 1e-9);
        assert_eq!(quantile(&[(0.1, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(
            quantile(&[(0.1, 0.0), (f64::INFINITY, 4.0)], 0.5),
            Some(0.1)
        );
    }
}
