//! Cache warming (SPEC §3 `routes[].cache.warm`): at start and after every reload the
//! warm paths are requested through the gateway's own listener, so they take the whole
//! pipeline (rate limits, breaker, metrics, access log) and fill the cache like any
//! client's miss. Keys hold the Host: a warm path is fetched with the listener address
//! as Host, a warm URL with its own. A path whose upstream is down is tried again every half second, then
//! given up on with a warning until the next reload; with nothing left to warm, the
//! warmer sleeps until a reload.

use super::{pause, Gateway};
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
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let connector = Connector::new(None);
        let mut reloads = self.gateway.reloads();
        let mut warmed_generation = 0;
        let mut pending: Vec<WarmTarget> = Vec::new();
        let mut rounds = 0;
        loop {
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
            match policy.server.listen.first() {
                None => pending.clear(),
                Some(listen) if !pending.is_empty() => {
                    let targets = std::mem::take(&mut pending);
                    pending = warm(&connector, reachable(*listen), targets).await;
                    rounds += 1;
                    if rounds >= ROUNDS && !pending.is_empty() {
                        tracing::warn!(paths = ?pending, "cache warming gave up until the next reload");
                        pending.clear();
                    }
                }
                Some(_) => {}
            }
            let go_on = if pending.is_empty() {
                // Nothing to warm until a reload brings a new policy: no tick to wake for.
                tokio::select! {
                    _ = shutdown.changed() => false,
                    reloaded = reloads.changed() => reloaded.is_ok(),
                }
            } else {
                pause(&mut shutdown, TICK).await
            };
            if !go_on {
                break;
            }
        }
    }
}

/// One round over `targets`: those that could not be warmed, to try again.
async fn warm(
    connector: &Connector,
    listen: SocketAddr,
    targets: Vec<WarmTarget>,
) -> Vec<WarmTarget> {
    let mut failed = Vec::new();
    for target in targets {
        match fetch(connector, listen, &target).await {
            Some(status) if status < 500 => {
                tracing::info!(path = target.path, host = ?target.host, status, "cache warmed");
            }
            _ => failed.push(target),
        }
    }
    failed
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
