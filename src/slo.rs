//! Per-route service-level tracking for `GET /slo`: availability and latency quantiles
//! over the last 5 minutes and the last hour, against the route's `slo` targets.
//!
//! Sixty one-minute buckets, each a fixed log-scale latency histogram of atomics, so
//! recording is a handful of relaxed adds with no lock. A bucket is recycled by the
//! first request of a new minute; a request racing that reset may be lost, which is
//! noise against a window of minutes.

use crate::config::SloConfig;
use crate::histogram::{self, Counts, Histogram};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const MINUTES: usize = 60;

struct Minute {
    epoch: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

pub(crate) struct SloTracker {
    minutes: Box<[Minute]>,
}

impl Default for SloTracker {
    fn default() -> Self {
        SloTracker {
            minutes: (0..MINUTES)
                .map(|_| Minute {
                    epoch: AtomicU64::new(u64::MAX),
                    requests: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    latency: Histogram::default(),
                })
                .collect(),
        }
    }
}

struct Window {
    requests: u64,
    errors: u64,
    latency: Counts,
}

impl SloTracker {
    /// Records one finished request; `failed` means it counts against availability.
    pub(crate) fn record(&self, unix_minute: u64, latency: Duration, failed: bool) {
        let minute = &self.minutes[(unix_minute % MINUTES as u64) as usize];
        let seen = minute.epoch.load(Ordering::Acquire);
        if seen != unix_minute
            && minute
                .epoch
                .compare_exchange(seen, unix_minute, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            minute.requests.store(0, Ordering::Relaxed);
            minute.errors.store(0, Ordering::Relaxed);
            minute.latency.clear();
        }
        minute.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            minute.errors.fetch_add(1, Ordering::Relaxed);
        }
        minute.latency.record(latency);
    }

    fn window(&self, now_minute: u64, minutes: u64) -> Window {
        let mut w = Window {
            requests: 0,
            errors: 0,
            latency: [0; histogram::BUCKETS],
        };
        for m in &*self.minutes {
            let epoch = m.epoch.load(Ordering::Acquire);
            if epoch <= now_minute && now_minute - epoch < minutes {
                w.requests += m.requests.load(Ordering::Relaxed);
                w.errors += m.errors.load(Ordering::Relaxed);
                m.latency.add_to(&mut w.latency);
            }
        }
        w
    }

    /// The `/slo` entry of one route.
    pub(crate) fn report(&self, now_minute: u64, targets: &SloConfig) -> Value {
        let window = |minutes: u64| {
            let w = self.window(now_minute, minutes);
            let availability = (w.requests > 0).then(|| 1.0 - w.errors as f64 / w.requests as f64);
            let quantile = |q: f64| histogram::quantile(&w.latency, q).map(|d| d.as_secs_f64());
            let (p50, p95, p99) = (quantile(0.50), quantile(0.95), quantile(0.99));
            let burn_rate = match (targets.availability, availability) {
                (Some(target), Some(actual)) if target.0 < 1.0 => {
                    Some((1.0 - actual) / (1.0 - target.0))
                }
                _ => None,
            };
            let met = |actual: Option<f64>, target: Option<f64>, lower_is_better: bool| match (
                actual, target,
            ) {
                (Some(a), Some(t)) => json!(if lower_is_better { a <= t } else { a >= t }),
                (None, Some(_)) => json!(true),
                _ => Value::Null,
            };
            json!({
                "requests": w.requests,
                "errors": w.errors,
                "availability": availability,
                "p50_seconds": p50,
                "p95_seconds": p95,
                "p99_seconds": p99,
                "error_budget_burn_rate": burn_rate,
                "met": {
                    "availability": met(availability, targets.availability.map(|p| p.0), false),
                    "p95": met(p95, targets.p95.map(|d| d.0.as_secs_f64()), true),
                    "p99": met(p99, targets.p99.map(|d| d.0.as_secs_f64()), true),
                },
            })
        };
        json!({
            "targets": {
                "availability": targets.availability.map(|p| p.0),
                "p95_seconds": targets.p95.map(|d| d.0.as_secs_f64()),
                "p99_seconds": targets.p99.map(|d| d.0.as_secs_f64()),
            },
            "last_5m": window(5),
            "last_1h": window(60),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{Duration as D, Percent};

    #[test]
    fn quantiles_and_availability_over_windows() {
        let t = SloTracker::default();
        let now = 1_000_000;
        for i in 0..100u64 {
            t.record(now, Duration::from_millis(10 + i), i >= 98);
        }
        // An hour-old minute only counts in the hour window... and one older not at all.
        t.record(now - 30, Duration::from_secs(5), true);
        t.record(now - 61, Duration::from_secs(9), true);
        let targets = SloConfig {
            availability: Some(Percent(0.99)),
            p95: Some(D::from_millis(200)),
            p99: None,
        };
        let r = t.report(now, &targets);
        assert_eq!(r["last_5m"]["requests"], 100);
        assert_eq!(r["last_5m"]["errors"], 2);
        assert_eq!(r["last_1h"]["requests"], 101);
        let p95 = r["last_5m"]["p95_seconds"].as_f64().unwrap();
        assert!((0.104..0.140).contains(&p95), "p95 {p95}");
        assert_eq!(r["last_5m"]["met"]["p95"], true);
        assert_eq!(r["last_5m"]["met"]["availability"], false);
        let burn = r["last_5m"]["error_budget_burn_rate"].as_f64().unwrap();
        assert!((burn - 2.0).abs() < 1e-9, "burn {burn}");
    }

    #[test]
    fn a_recycled_minute_starts_from_zero() {
        let t = SloTracker::default();
        t.record(7, Duration::from_millis(1), true);
        t.record(7 + MINUTES as u64, Duration::from_millis(1), false);
        let w = t.window(7 + MINUTES as u64, 5);
        assert_eq!((w.requests, w.errors), (1, 0));
    }
}
