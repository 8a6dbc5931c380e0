//! One process-wide monotonic clock as plain integers, for state kept in atomics
//! (bucket timestamps, breaker and ejection deadlines).

use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the clock's first use in this process.
pub(crate) fn nanos() -> u64 {
    nanos_at(Instant::now())
}

/// `instant` on this clock (0 before its first use): for a time already read, such
/// as a request's arrival, without reading the clock again.
pub(crate) fn nanos_at(instant: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    instant
        .saturating_duration_since(*START.get_or_init(Instant::now))
        .as_nanos() as u64
}

pub(crate) fn millis() -> u64 {
    nanos() / 1_000_000
}
