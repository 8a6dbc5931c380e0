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

/// Each bucket's upper bound in whole microseconds (`FIRST_BOUND_US * GROWTH^i`, rounded
/// down: a whole number of µs is at most a bound exactly when it is at most its floor).
const BOUNDS_US: [u64; BUCKETS] = {
    let mut bounds = [0; BUCKETS];
    let mut bound = FIRST_BOUND_US;
    let mut i = 0;
    while i < BUCKETS {
        bounds[i] = bound as u64;
        bound *= GROWTH;
        i += 1;
    }
    bounds
};

/// The first bucket whose bound holds `latency`, the last for anything longer: a binary
/// search of the bounds, where a logarithm per request cost ~250 instructions.
fn bucket_of(latency: Duration) -> usize {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    BOUNDS_US
        .partition_point(|&bound| bound < us)
        .min(BUCKETS - 1)
}

fn bucket_upper_bound(bucket: usize) -> Duration {
    Duration::from_micros(BOUNDS_US[bucket])
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

    #[test]
    fn a_latency_goes_to_the_first_bucket_whose_bound_holds_it() {
        for (i, &bound) in BOUNDS_US.iter().enumerate() {
            let exact = FIRST_BOUND_US * GROWTH.powi(i as i32);
            assert!(
                (exact - bound as f64).abs() < 1.0 + exact * 1e-12,
                "bucket {i}: {bound} µs"
            );
        }
        let mut us = 0;
        while us < 200_000_000_000 {
            let bucket = bucket_of(Duration::from_micros(us));
            assert!(
                bucket == 0 || us > BOUNDS_US[bucket - 1],
                "{us} µs in {bucket}"
            );
            assert!(
                bucket == BUCKETS - 1 || us <= BOUNDS_US[bucket],
                "{us} µs in {bucket}"
            );
            us = if us < 1_000 { us + 1 } else { us + us / 97 };
        }
        assert_eq!(bucket_of(Duration::MAX), BUCKETS - 1);
        for (i, &bound) in BOUNDS_US.iter().enumerate() {
            assert_eq!(bucket_of(Duration::from_micros(bound)), i);
            assert_eq!(bucket_upper_bound(i), Duration::from_micros(bound));
        }
    }
}
