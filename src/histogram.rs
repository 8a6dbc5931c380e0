//! A fixed log-scale latency histogram of atomics: recording is one relaxed add, no
//! lock. Bucket `i` holds values up to `FIRST_BOUND_US * GROWTH^i` microseconds: 50 µs
//! to about 100 s in 64 buckets, each ~26 % wider than the last. Used by the SLO
//! windows and by the load signal of shedding.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub(crate) const BUCKETS: usize = 64;
const FIRST_BOUND_US: f64 = 50.0;
const GROWTH: f64 = 1.2592;

pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Counts per bucket, summed or drained from [`Histogram`]s.
pub(crate) type Counts = [u64; BUCKETS];

impl Histogram {
    pub(crate) fn record(&self, latency: Duration) {
        self.buckets[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn clear(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
    }

    /// Adds this histogram's counts to `into`.
    pub(crate) fn add_to(&self, into: &mut Counts) {
        for (sum, b) in into.iter_mut().zip(&self.buckets) {
            *sum += b.load(Ordering::Relaxed);
        }
    }

    /// Takes the counts recorded since the last drain.
    pub(crate) fn drain(&self) -> Counts {
        std::array::from_fn(|i| self.buckets[i].swap(0, Ordering::Relaxed))
    }
}

fn bucket_of(latency: Duration) -> usize {
    let us = latency.as_micros() as f64;
    if us <= FIRST_BOUND_US {
        return 0;
    }
    ((us / FIRST_BOUND_US).ln() / GROWTH.ln())
        .ceil()
        .min((BUCKETS - 1) as f64) as usize
}

fn bucket_upper_bound(bucket: usize) -> Duration {
    Duration::from_micros((FIRST_BOUND_US * GROWTH.powi(bucket as i32)) as u64)
}

/// The upper bound of the bucket holding the q-quantile (an over-estimate of at most
/// one bucket width, ~26 %); `None` without samples.
pub(crate) fn quantile(counts: &Counts, q: f64) -> Option<Duration> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(bucket_upper_bound(i));
        }
    }
    Some(bucket_upper_bound(BUCKETS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_overestimate_by_at_most_a_bucket() {
        let h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let counts = h.drain();
        let p95 = quantile(&counts, 0.95).unwrap();
        assert!(
            p95 >= Duration::from_millis(95) && p95 <= Duration::from_millis(120),
            "{p95:?}"
        );
        assert_eq!(quantile(&h.drain(), 0.5), None, "drained");
    }
}
