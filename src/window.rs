//! A rolling window of two counters (e.g. requests and failures, or requests and
//! retries), kept as ten time slices of atomics so that counting never takes a lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const SLICES: usize = 10;

#[derive(Default)]
struct Slice {
    /// Which slice of time (`now / slice_len`) the counts belong to.
    epoch: AtomicU64,
    first: AtomicU32,
    second: AtomicU32,
}

pub(crate) struct RollingPair {
    slices: [Slice; SLICES],
    slice_len_ms: u64,
}

impl RollingPair {
    pub(crate) fn new(window: Duration) -> RollingPair {
        RollingPair {
            slices: Default::default(),
            slice_len_ms: (window.as_millis() as u64 / SLICES as u64).max(1),
        }
    }

    /// Adds to the slice of `now_ms` (milliseconds of [`crate::clock::millis`]).
    pub(crate) fn add(&self, now_ms: u64, first: u32, second: u32) {
        let epoch = now_ms / self.slice_len_ms;
        let slice = &self.slices[(epoch % SLICES as u64) as usize];
        let seen = slice.epoch.load(Ordering::Relaxed);
        if seen != epoch
            && slice
                .epoch
                .compare_exchange(seen, epoch, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // A slice from a window ago starts over (adds racing with this reset may be
            // lost: the window is an estimate, not an audit).
            slice.first.store(0, Ordering::Relaxed);
            slice.second.store(0, Ordering::Relaxed);
        }
        slice.first.fetch_add(first, Ordering::Relaxed);
        slice.second.fetch_add(second, Ordering::Relaxed);
    }

    /// Both counters summed over the window ending at `now_ms`.
    pub(crate) fn totals(&self, now_ms: u64) -> (u32, u32) {
        let epoch = now_ms / self.slice_len_ms;
        self.slices
            .iter()
            .filter(|s| epoch.saturating_sub(s.epoch.load(Ordering::Relaxed)) < SLICES as u64)
            .fold((0, 0), |(a, b), s| {
                (
                    a + s.first.load(Ordering::Relaxed),
                    b + s.second.load(Ordering::Relaxed),
                )
            })
    }

    pub(crate) fn clear(&self) {
        for slice in &self.slices {
            slice.first.store(0, Ordering::Relaxed);
            slice.second.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_age_out_after_the_window() {
        let w = RollingPair::new(Duration::from_secs(10));
        w.add(500, 1, 0);
        w.add(9_500, 2, 1);
        assert_eq!(w.totals(9_500), (3, 1));
        assert_eq!(w.totals(10_500), (2, 1), "the first second left the window");
        w.add(20_000, 1, 1);
        assert_eq!(w.totals(20_000), (1, 1));
        w.clear();
        assert_eq!(w.totals(20_000), (0, 0));
    }
}
