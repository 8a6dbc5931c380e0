//! Cache warming (SPEC §3 `routes[].cache.warm`): at start and after every reload the
//! warm paths are requested through the gateway's own listener, so they take the whole
//! pipeline (rate limits, breaker, metrics, access log) and fill the cache like any
//! client's miss. Keys hold the Host: a warm path is fetched with the listener address
//! as Host, a warm URL with its own. A path whose upstream is down is tried again on the next ticks, then
//! given up on with a warning until the next reload.

use super::{Gateway, Ticks};
use crate::cache::WarmTarget;
use pingora::connectors::http::Connector;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

const TICK: Duration = Duration::from_millis(500);
/// Rounds a generation's warm paths get before they are given up on.
const ROUNDS: u32 = 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Warmer {
    pub(crate) gateway: Arc<Gateway>,
}

#[async_trait::async_trait]
impl BackgroundService for Warmer {
    async fn start(&self, shutdown: ShutdownWatch) {
        let connector = Connector::new(None);
        let mut warmed_generation = 0;
        let mut pending: Vec<WarmTarget> = Vec::new();
        let mut rounds = 0;
        let mut ticks = Ticks::every(TICK, shutdown);
        while ticks.next().await {
            let policy = self.gateway.policy.load_full();
            if policy.generation != warmed_generation {
                warmed_generation = policy.generation;
                pending = policy
                    .routes
                    .iter()
                    .filter_map(|r| r.cache.as_ref())
                    .flat_map(|c| c.warm.iter().cloned())
                    .collect();
                rounds = 0;
            }
            let Some(listen) = policy.server.listen.first().map(|a| reachable(*a)) else {
                pending.clear();
                continue;
            };
            if pending.is_empty() {
                continue;
            }
            let mut failed = Vec::new();
            for target in pending.drain(..) {
                match fetch(&connector, listen, &target).await {
                    Some(status) if status < 500 => {
                        tracing::info!(path = target.path, host = ?target.host, status, "cache warmed");
                    }
                    _ => failed.push(target),
                }
            }
            rounds += 1;
            if rounds >= ROUNDS && !failed.is_empty() {
                tracing::warn!(paths = ?failed, "cache warming gave up until the next reload");
                failed.clear();
            }
            pending = failed;
        }
    }
}

/// The listener as a client reaches it: a wildcard address is reached on loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET` the target through the gateway, reading the whole body (the cache stores a
/// response once its body is complete); the status, or `None` when nothing came back.
async fn fetch(connector: &Connector, listen: SocketAddr, target: &WarmTarget) -> Option<u16> {
    let peer = HttpPeer::new(listen, false, String::new());
    let host = target.host.clone().unwrap_or_else(|| listen.to_string());
    crate::upstream::get_once(
        connector,
        &peer,
        &target.path,
        &host,
        "tollgate-cache-warmer",
        true,
        REQUEST_TIMEOUT,
    )
    .await
}
