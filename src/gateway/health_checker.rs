//! The service behind active health checks (`health`): probes each server whose
//! next probe is due, and records the verdict in the server's shared state, metric and
//! events.

use super::{Gateway, Ticks};
use crate::health::HealthCheck;
use crate::upstream::{Pool, ServerState};
use pingora::connectors::http::Connector;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often the service looks for probes that are due.
const TICK: Duration = Duration::from_millis(100);

pub(crate) struct HealthChecker {
    pub(crate) gateway: Arc<Gateway>,
}

#[async_trait::async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, shutdown: ShutdownWatch) {
        let connector = Arc::new(Connector::new(None));
        let mut ticks = Ticks::every(TICK, shutdown);
        while ticks.next().await {
            let policy = self.gateway.policy.load_full();
            let now = crate::clock::millis();
            for pool in policy.upstreams.values() {
                let Some(check) = &pool.health_check else {
                    continue;
                };
                for (index, server) in pool.servers.iter().enumerate() {
                    let state = &server.state;
                    if state.next_probe_at.load(Ordering::Relaxed) > now
                        || state.probing.swap(true, Ordering::Relaxed)
                    {
                        continue;
                    }
                    state
                        .next_probe_at
                        .store(now + check.interval.as_millis() as u64, Ordering::Relaxed);
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
