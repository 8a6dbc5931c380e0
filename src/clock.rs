//! One process-wide monotonic clock as plain integers, for state kept in atomics
//! (bucket timestamps, breaker and ejection deadlines).

use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the clock's first use in this process.
pub(crate) fn nanos() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub(crate) fn millis() -> u64 {
    nanos() / 1_000_000
}
