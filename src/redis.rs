//! Connections to Redis, shared by the rate limiter's buckets
//! (`rate_limiting.backend: redis`) and the cache's second tier (`cache.redis`).
//!
//! A Redis outage must never stall traffic: every call is bounded by a timeout, and
//! after a failure the store is skipped for a short while (callers fall back at once)
//! instead of each request waiting out the timeout again.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// After a failed call, how long calls skip Redis before it is tried again.
const BACKOFF: Duration = Duration::from_secs(1);

/// The connection to one Redis, kept across reloads while its address is unchanged.
pub struct RedisStore {
    pub url: String,
    /// What this store is for, in log lines ("rate-limit store", "cache store").
    role: &'static str,
    connection: redis::aio::ConnectionManager,
    /// Microseconds on the process clock until which Redis is skipped.
    skip_until: AtomicU64,
    reachable: AtomicBool,
}

/// The connection's background tasks need a runtime that outlives every policy (a
/// reload may drop a policy on any thread, where dropping a runtime would panic).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-redis")
            .enable_all()
            .build()
            .expect("the Redis runtime starts")
    })
}

impl RedisStore {
    /// Parses the URL and prepares a connection that is made on first use (a Redis that
    /// is down at start must not keep the gateway from starting).
    pub fn open(url: &str, role: &'static str) -> Result<Arc<RedisStore>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url `{url}`: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let _context = runtime().enter();
        let connection = redis::aio::ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("redis url `{url}`: {e}"))?;
        Ok(Arc::new(RedisStore {
            url: url.to_string(),
            role,
            connection,
            skip_until: AtomicU64::new(0),
            reachable: AtomicBool::new(true),
        }))
    }

    /// Runs `call` on the connection within `timeout`. `Err` when Redis is being
    /// skipped after a failure, fails, does not answer in time, or `call` rejects the
    /// answer; a failure starts the skip period and is logged once per outage.
    pub async fn call<T, F, Fut>(&self, timeout: Duration, call: F) -> Result<T, ()>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        if crate::clock::nanos() / 1_000 < self.skip_until.load(Ordering::Relaxed) {
            return Err(());
        }
        let failure = match tokio::time::timeout(timeout, call(self.connection.clone())).await {
            Ok(Ok(value)) => {
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!(url = %self.url, "{} reachable again", self.role);
                }
                return Ok(value);
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {timeout:?}"),
        };
        self.skip_until.store(
            crate::clock::nanos() / 1_000 + BACKOFF.as_micros() as u64,
            Ordering::Relaxed,
        );
        if self.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(url = %self.url, error = %failure,
                "{} unreachable; skipping it for {BACKOFF:?} at a time", self.role);
        }
        Err(())
    }
}
