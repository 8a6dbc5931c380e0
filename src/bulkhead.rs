//! Bulkheads (SPEC §3 `max_concurrent`, `queue`): at most `max_concurrent` requests in
//! flight to a pool; the next ones wait in a bounded first-in-first-out queue for at
//! most the queue timeout, and the rest get 503 `bulkhead_full` at once. A slow pool
//! then holds a bounded number of the gateway's connections instead of all of them.

use crate::config;
use crate::policy::compile::Compile;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub(crate) struct Bulkhead {
    pub(crate) max_concurrent: usize,
    pub(crate) queue_max: usize,
    pub(crate) queue_timeout: Duration,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    pub(crate) rejections: prometheus::IntCounter,
}

/// Why a request did not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    QueueFull,
    QueueTimeout,
}

/// Counts a waiting request until it leaves the queue, also when its client gives up.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Bulkhead {
    pub(crate) fn new(
        max_concurrent: usize,
        queue_max: usize,
        queue_timeout: Duration,
        rejections: prometheus::IntCounter,
    ) -> Bulkhead {
        Bulkhead {
            max_concurrent,
            queue_max,
            queue_timeout,
            slots: Arc::new(Semaphore::new(max_concurrent)),
            waiting: AtomicUsize::new(0),
            rejections,
        }
    }

    /// A slot held until the permit is dropped (the request's end).
    pub(crate) async fn enter(&self) -> Result<OwnedSemaphorePermit, Full> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue_max {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            self.rejections.inc();
            return Err(Full::QueueFull);
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                self.rejections.inc();
                Err(Full::QueueTimeout)
            }
        }
    }

    pub(crate) fn inflight(&self) -> usize {
        self.max_concurrent - self.slots.available_permits()
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// A pool's bulkhead, kept across a reload (with its in-flight count) while its
/// limits are unchanged.
pub(crate) fn compile(
    cx: &mut Compile<'_>,
    pool: &str,
    u: &config::UpstreamConfig,
    previous: Option<&Arc<Bulkhead>>,
) -> Option<Arc<Bulkhead>> {
    let Some(max) = &u.max_concurrent else {
        if u.queue.is_some() {
            cx.error(
                &u.servers.referenced,
                format!("upstream `{pool}`: queue needs max_concurrent"),
            );
        }
        return None;
    };
    if max.value == 0 {
        cx.error(&max.referenced, "max_concurrent must be at least 1");
        return None;
    }
    let (queue_max, queue_timeout) = u
        .queue
        .as_ref()
        .map_or((0, std::time::Duration::ZERO), |q| (q.max, q.timeout.0));
    if let Some(previous) = previous.filter(|b| {
        (b.max_concurrent, b.queue_max, b.queue_timeout) == (max.value, queue_max, queue_timeout)
    }) {
        return Some(previous.clone());
    }
    Some(Arc::new(Bulkhead::new(
        max.value,
        queue_max,
        queue_timeout,
        cx.metrics.bulkhead_rejections(pool),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulkhead(max: usize, queue: usize, timeout_ms: u64) -> Bulkhead {
        let counter = prometheus::IntCounter::new("r", "r").unwrap();
        Bulkhead::new(max, queue, Duration::from_millis(timeout_ms), counter)
    }

    #[tokio::test]
    async fn admits_the_limit_queues_in_order_and_rejects_the_rest() {
        let b = Arc::new(bulkhead(2, 1, 1_000));
        let first = b.enter().await.unwrap();
        let _second = b.enter().await.unwrap();
        assert_eq!(b.inflight(), 2);
        let queued = {
            let b = b.clone();
            tokio::spawn(async move { b.enter().await.map(|_| ()) })
        };
        while b.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.enter().await.err(), Some(Full::QueueFull));
        drop(first);
        assert_eq!(queued.await.unwrap(), Ok(()));
        assert_eq!(b.rejections.get(), 1);
    }

    #[tokio::test]
    async fn a_queued_request_gives_up_after_the_timeout() {
        let b = bulkhead(1, 5, 50);
        let _held = b.enter().await.unwrap();
        assert_eq!(b.enter().await.err(), Some(Full::QueueTimeout));
        assert_eq!(b.waiting(), 0);
    }
}
