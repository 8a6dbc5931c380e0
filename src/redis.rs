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

/// How long the connection's own attempts may take; each call is bounded by its
/// store's (much shorter) `timeout` anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a store's Redis is: one server, or a cluster reached through its seed nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Address {
    Server(String),
    Cluster(Vec<String>),
}

/// For log lines: the URLs without their credentials.
impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Server(url) => f.write_str(&without_credentials(url)),
            Address::Cluster(nodes) => {
                let nodes: Vec<String> = nodes.iter().map(|n| without_credentials(n)).collect();
                write!(f, "cluster {}", nodes.join(","))
            }
        }
    }
}

/// `redis://user:secret@host/0` as `redis://***@host/0`.
fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// A connection to one server (reconnected by the manager), or to a cluster (each
/// command routed to the shard that owns its key, following MOVED/ASK redirects).
#[derive(Clone)]
pub(crate) enum Link {
    Server(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Link {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Link::Server(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Link::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Server(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// The connection to one Redis, kept across reloads while its address is unchanged.
pub(crate) struct RedisStore {
    pub(crate) address: Address,
    /// What this store is for, in log lines ("rate-limit store", "cache store").
    store: Store,
    connection: Link,
    /// Microseconds on the process clock until which Redis is skipped.
    skip_until: AtomicU64,
    reachable: AtomicBool,
}

/// What a Redis store serves: its name in logs and its `store` label.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Store {
    RateLimit,
    Cache,
}

impl Store {
    fn role(self) -> &'static str {
        match self {
            Store::RateLimit => "rate-limit store",
            Store::Cache => "cache store",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Store::RateLimit => "ratelimit",
            Store::Cache => "cache",
        }
    }
}

/// `tollgate_store_errors_total{store}`: failed calls (errors and timeouts, not the
/// calls skipped after one). Process-wide because a store outlives the policy that
/// opened it, and registered by [`Metrics`](crate::metrics::Metrics).
pub(crate) fn store_errors() -> &'static prometheus::IntCounterVec {
    static ERRORS: OnceLock<prometheus::IntCounterVec> = OnceLock::new();
    ERRORS.get_or_init(|| {
        let errors = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tollgate_store_errors_total",
                "Calls to a shared Redis store that failed or timed out, by store (ratelimit|cache)",
            ),
            &["store"],
        )
        .expect("valid metric");
        for store in [Store::RateLimit, Store::Cache] {
            errors.with_label_values(&[store.label()]);
        }
        errors
    })
}

/// The connection's background tasks need a runtime that outlives every policy (a
/// reload may drop a policy on any thread, where dropping a runtime would panic).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
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
    /// Parses the address and prepares a connection that is made on first use (a Redis
    /// that is down at start must not keep the gateway from starting).
    pub(crate) fn open(address: Address, store: Store) -> Result<Arc<RedisStore>, String> {
        let _context = runtime().enter();
        let connection = match &address {
            Address::Server(url) => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| format!("redis url `{}`: {e}", without_credentials(url)))?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                let manager =
                    redis::aio::ConnectionManager::new_lazy_with_config(client, config)
                        .map_err(|e| format!("redis url `{}`: {e}", without_credentials(url)))?;
                Link::Server(manager)
            }
            Address::Cluster(nodes) => {
                let client =
                    redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                        .retries(2)
                        .build()
                        .map_err(|e| format!("redis cluster: {e}"))?;
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(CONNECT_TIMEOUT);
                Link::Cluster(client.get_pending_async_connection_with_config(config))
            }
        };
        Ok(Arc::new(RedisStore {
            address,
            store,
            connection,
            skip_until: AtomicU64::new(0),
            reachable: AtomicBool::new(true),
        }))
    }

    /// Runs `call` on the connection within `timeout`. `Err` when Redis is being
    /// skipped after a failure, fails, does not answer in time, or `call` rejects the
    /// answer; a failure starts the skip period and is logged once per outage.
    pub(crate) async fn call<T, F, Fut>(&self, timeout: Duration, call: F) -> Result<T, ()>
    where
        F: FnOnce(Link) -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        if crate::clock::nanos() / 1_000 < self.skip_until.load(Ordering::Relaxed) {
            return Err(());
        }
        let failure = match tokio::time::timeout(timeout, call(self.connection.clone())).await {
            Ok(Ok(value)) => {
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!(address = %self.address, "{} reachable again", self.store.role());
                }
                return Ok(value);
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {timeout:?}"),
        };
        store_errors()
            .with_label_values(&[self.store.label()])
            .inc();
        self.skip_until.store(
            crate::clock::nanos() / 1_000 + BACKOFF.as_micros() as u64,
            Ordering::Relaxed,
        );
        if self.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(address = %self.address, error = %failure,
                "{} unreachable; skipping it for {BACKOFF:?} at a time", self.store.role());
        }
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_carry_no_credentials() {
        let server = Address::Server("redis://:s3cret@cache:6379/2".into());
        assert_eq!(server.to_string(), "redis://***@cache:6379/2");
        let cluster = Address::Cluster(vec![
            "rediss://user:pw@a:6379".into(),
            "redis://b:6379".into(),
        ]);
        assert_eq!(
            cluster.to_string(),
            "cluster rediss://***@a:6379,redis://b:6379"
        );
    }
}
