//! Active health checks (SPEC §3 `upstreams.*.health_check`): a background service
//! probes every server of every pool that has a `health_check`, through the same peer
//! settings (TLS, SNI, CA) as proxied traffic. `unhealthy_after` failed probes in a row
//! take a server out of rotation, `healthy_after` passed ones bring it back.
//!
//! Health lives in each server's shared state, so it survives reloads that keep the
//! server, and a new server starts healthy (traffic is not refused before the first
//! probe has run; its first probe is due at once).

use crate::gateway::Gateway;
use crate::upstream::{Pool, ServerState};
use pingora::connectors::http::Connector;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often the service looks for probes that are due.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
    /// Inclusive status range that passes.
    pub expect: (u16, u16),
}

pub struct HealthChecker {
    pub gateway: Arc<Gateway>,
}

#[async_trait::async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let connector = Arc::new(Connector::new(None));
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
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

/// Parses `expect`: one status (`"200"`) or an inclusive range (`"200-399"`).
pub fn parse_expect(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("expect `{text}`: write a status or a range such as \"200-399\"");
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (low.trim(), high.trim()),
        None => (text.trim(), text.trim()),
    };
    let low: u16 = low.parse().map_err(|_| bad())?;
    let high: u16 = high.parse().map_err(|_| bad())?;
    if !(100..=599).contains(&low) || !(low..=599).contains(&high) {
        return Err(bad());
    }
    Ok((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expect_ranges() {
        assert_eq!(parse_expect("200-399"), Ok((200, 399)));
        assert_eq!(parse_expect("204"), Ok((204, 204)));
        assert!(parse_expect("399-200").is_err());
        assert!(parse_expect("2xx").is_err());
        assert!(parse_expect("600").is_err());
    }

    #[test]
    fn thresholds_flip_health_only_after_streaks() {
        let state = ServerState::default();
        assert!(state.is_healthy());
        assert_eq!(state.count_probe(false, 2, 3), None);
        assert_eq!(state.count_probe(false, 2, 3), None);
        assert_eq!(
            state.count_probe(true, 2, 3),
            None,
            "a pass breaks the streak"
        );
        for _ in 0..2 {
            assert_eq!(state.count_probe(false, 2, 3), None);
        }
        assert_eq!(state.count_probe(false, 2, 3), Some(false));
        assert!(!state.is_healthy());
        assert_eq!(state.count_probe(false, 2, 3), None, "already unhealthy");
        assert_eq!(state.count_probe(true, 2, 3), None);
        assert_eq!(state.count_probe(true, 2, 3), Some(true));
        assert!(state.is_healthy());
    }
}
