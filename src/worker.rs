//! Which thread runs this code, as a small number given out in order of first use:
//! state kept per worker thread (upstream connection pools, the access log's shards) is
//! keyed by it, so a request never contends with one on another thread.

use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) fn index() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static INDEX: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|index| *index)
}
