//! The service behind active health checks (`health`): probes each server whose
//! next probe is due, and records the verdict in the server's shared state, metric and
//! events.

use super::{pause, Gateway};
use crate::health::HealthCheck;
use crate::upstream::{Pool, ServerState};
use pingora::connectors::http::Connector;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The longest the service sleeps between two looks for due probes: how soon checks a
/// reload adds start. Otherwise it sleeps until the next probe is due, so an idle pod
/// without checks is not woken ten times a second.
const LONGEST_SLEEP: Duration = Duration::from_secs(1);
/// How soon it looks again at a server whose previous probe is still running.
const RETRY: Duration = Duration::from_millis(100);

pub(crate) struct HealthChecker {
    pub(crate) gateway: Arc<Gateway>,
}

#[async_trait::async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let connector = Arc::new(Connector::new(None));
        loop {
            let policy = self.gateway.policy.load_full();
            let now = crate::clock::millis();
            let mut wake = now + LONGEST_SLEEP.as_millis() as u64;
            for pool in policy.upstreams.values() {
                let Some(check) = &pool.health_check else {
                    continue;
                };
                for (index, server) in pool.servers.iter().enumerate() {
                    let state = &server.state;
                    let due = state.next_probe_at.load(Ordering::Relaxed);
                    if due > now {
                        wake = wake.min(due);
                        continue;
                    }
                    if state.probing.swap(true, Ordering::Relaxed) {
                        wake = wake.min(now + RETRY.as_millis() as u64);
                        continue;
                    }
                    let next = now + check.interval.as_millis() as u64;
                    state.next_probe_at.store(next, Ordering::Relaxed);
                    wake = wake.min(next);
                    let (gateway, pool, connector) =
                        (self.gateway.clone(), pool.clone(), connector.clone());
                    let check = check.clone();
                    tokio::spawn(async move {
                        let passed = probe(&connector, &pool, index, &check).await;
                        let state = &pool.servers[index].state;
                        record(&gateway, &pool, index, state, &check, passed);
                        state.probing.store(false, Ordering::Relaxed);
                    });
                }
            }
            let wait = Duration::from_millis(wake.saturating_sub(crate::clock::millis()));
            if !pause(&mut shutdown, wait).await {
                return;
            }
        }
    }
}

/// One probe: `GET path` with `Connection: close`; passes when the status is in range.
async fn probe(connector: &Connector, pool: &Pool, index: usize, check: &HealthCheck) -> bool {
    let peer = pool.probe_peer(index, check.timeout);
    let host = &*pool.servers[index].label;
    let status = crate::upstream::get_once(
        connector,
        &peer,
        &check.path,
        host,
        "tollgate-health-check",
        false,
        check.timeout,
    )
    .await;
    status.is_some_and(|status| (check.expect.0..=check.expect.1).contains(&status))
}

fn record(
    gateway: &Gateway,
    pool: &Pool,
    index: usize,
    state: &ServerState,
    check: &HealthCheck,
    passed: bool,
) {
    let Some(healthy) = state.count_probe(passed, check.healthy_after, check.unhealthy_after)
    else {
        return;
    };
    let addr = &*pool.servers[index].label;
    gateway
        .metrics
        .server_healthy(&pool.name, addr)
        .set(i64::from(healthy));
    let became = if healthy { "healthy" } else { "unhealthy" };
    if healthy {
        tracing::info!(upstream = %pool.name, server = addr, "health check: server healthy");
    } else {
        tracing::warn!(upstream = %pool.name, server = addr, "health check: server unhealthy");
    }
    gateway.events.record(
        "health",
        &format!("server {addr} of upstream `{}` is {became}", pool.name),
        serde_json::json!({ "upstream": &*pool.name, "server": addr, "healthy": healthy }),
    );
}
