//! Upstream pools: their servers, how a server is chosen, and the Pingora peer for it.
//!
//! Per-server state (in-flight counts, the round-robin cursor) lives in `Arc`s that a
//! reload hands over to the next policy when the pool keeps the server, so least_conn
//! keeps counting requests that are still running across a reload.

mod compile;

pub(crate) use compile::compile;

use crate::breaker::{FailureOn, PoolBreaker};
use crate::bulkhead::Bulkhead;
use crate::config::{Balance, Timeouts, UpstreamTls};
use crate::health::HealthCheck;
use crate::retry::RetryPolicy;
use crate::units::Duration;
use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::HttpPeer;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration as StdDuration;

/// What a pool's consistent hash is computed over.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum HashOn {
    Ip,
    User,
    Header(http::HeaderName),
    Path,
}

#[derive(Debug, Default)]
pub(crate) struct ServerState {
    pub(crate) inflight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Ejected until this instant of [`crate::clock::millis`]; 0 when never ejected.
    ejected_until: AtomicU64,
    /// Set by active health checks; a server starts healthy.
    unhealthy: AtomicBool,
    /// Probes in a row with the same result: positive passed, negative failed.
    probe_streak: AtomicI32,
    pub(crate) next_probe_at: AtomicU64,
    pub(crate) probing: AtomicBool,
}

impl ServerState {
    pub(crate) fn is_healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }

    /// Counts one probe (probes of a server never overlap); returns the new health when
    /// this probe changed it.
    pub(crate) fn count_probe(
        &self,
        passed: bool,
        healthy_after: u32,
        unhealthy_after: u32,
    ) -> Option<bool> {
        let streak = self.probe_streak.load(Ordering::Relaxed);
        let streak = match (passed, streak) {
            (true, s) if s > 0 => s.saturating_add(1),
            (true, _) => 1,
            (false, s) if s < 0 => s.saturating_sub(1),
            (false, _) => -1,
        };
        self.probe_streak.store(streak, Ordering::Relaxed);
        let healthy = self.is_healthy();
        if passed && !healthy && streak.unsigned_abs() >= healthy_after {
            self.unhealthy.store(false, Ordering::Relaxed);
            return Some(true);
        }
        if !passed && healthy && streak.unsigned_abs() >= unhealthy_after {
            self.unhealthy.store(true, Ordering::Relaxed);
            return Some(false);
        }
        None
    }
}

/// Passive outlier ejection: `consecutive_failures` failed attempts in a row take a
/// server out of rotation for `eject_for`, never more than `max_ejected` of the pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Outlier {
    pub(crate) consecutive_failures: u32,
    pub(crate) eject_for: StdDuration,
    pub(crate) max_ejected: f64,
}

#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    /// The address as written in the policy: the `server` label and what `/status` shows.
    pub(crate) label: Arc<str>,
    /// `label` escaped for the access log's lines.
    pub(crate) json_label: crate::json::Escaped,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
    pub(crate) state: Arc<ServerState>,
    /// Boxed as Pingora takes it: a box's clone is written straight into the new
    /// allocation, where cloning the peer and boxing it copies its 672 bytes twice.
    peer: Box<HttpPeer>,
}

#[derive(Debug, Default)]
pub(crate) struct PoolState {
    cursor: AtomicUsize,
}

#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) name: Arc<str>,
    /// `name` escaped for the access log's lines.
    pub(crate) json_name: crate::json::Escaped,
    pub(crate) servers: Vec<Server>,
    pub(crate) balance: Balance,
    pub(crate) hash_on: Option<HashOn>,
    pub(crate) keepalive: usize,
    pub(crate) state: Arc<PoolState>,
    /// Server indices in smooth weighted round-robin order (primaries only).
    schedule: Vec<usize>,
    primaries: Vec<usize>,
    backups: Vec<usize>,
    pub(crate) upstream_duration: prometheus::Histogram,
    pub(crate) breaker: Option<PoolBreaker>,
    pub(crate) bulkhead: Option<Arc<Bulkhead>>,
    /// What counts as a failed attempt, for the breaker and outlier ejection.
    pub(crate) failure_on: FailureOn,
    pub(crate) outlier: Option<Outlier>,
    pub(crate) health_check: Option<HealthCheck>,
    pub(crate) retry: Option<RetryPolicy>,
}

/// The request attributes a server choice may depend on.
pub(crate) struct SelectionKey<'a> {
    pub(crate) client_ip: Option<IpAddr>,
    pub(crate) user: Option<&'a str>,
    pub(crate) header: Option<&'a [u8]>,
    pub(crate) path: &'a str,
}

pub(crate) struct PoolSpec<'a> {
    pub(crate) name: &'a str,
    /// Trust anchors for the servers' certificates, when `tls.ca` names a file.
    pub(crate) ca: Option<Arc<CaType>>,
    pub(crate) servers: Vec<crate::breaker::Server>,
    pub(crate) balance: Balance,
    pub(crate) hash_on: Option<HashOn>,
    pub(crate) tls: &'a UpstreamTls,
    pub(crate) timeouts: Timeouts,
    pub(crate) keepalive: usize,
    pub(crate) breaker: Option<PoolBreaker>,
    pub(crate) bulkhead: Option<Arc<Bulkhead>>,
    pub(crate) failure_on: FailureOn,
    pub(crate) outlier: Option<Outlier>,
    pub(crate) health_check: Option<HealthCheck>,
    pub(crate) retry: Option<RetryPolicy>,
}

impl Pool {
    /// Builds a pool, taking over the state of the same-named pool of the previous policy.
    pub(crate) fn build(
        spec: PoolSpec<'_>,
        previous: Option<&Pool>,
        upstream_duration: prometheus::Histogram,
    ) -> Pool {
        let servers: Vec<Server> = spec
            .servers
            .into_iter()
            .map(|(addr, label, weight, backup)| {
                let state = previous
                    .and_then(|p| p.servers.iter().find(|s| s.addr == addr))
                    .map(|s| s.state.clone())
                    .unwrap_or_default();
                Server {
                    addr,
                    peer: Box::new(make_peer(
                        addr,
                        &label,
                        spec.tls,
                        spec.ca.clone(),
                        &spec.timeouts,
                    )),
                    json_label: crate::json::Escaped::new(&label),
                    label,
                    weight,
                    backup,
                    state,
                }
            })
            .collect();
        let primaries: Vec<usize> = (0..servers.len()).filter(|&i| !servers[i].backup).collect();
        let backups: Vec<usize> = (0..servers.len()).filter(|&i| servers[i].backup).collect();
        let schedule = smooth_weighted_schedule(&servers, &primaries);
        Pool {
            name: spec.name.into(),
            json_name: crate::json::Escaped::new(spec.name),
            servers,
            balance: spec.balance,
            hash_on: spec.hash_on,
            keepalive: spec.keepalive,
            state: previous.map(|p| p.state.clone()).unwrap_or_default(),
            schedule,
            primaries,
            backups,
            upstream_duration,
            breaker: spec.breaker,
            bulkhead: spec.bulkhead,
            failure_on: spec.failure_on,
            outlier: spec.outlier,
            health_check: spec.health_check,
            retry: spec.retry,
        }
    }

    /// Picks a server that is not in `exclude` (servers this request already failed on)
    /// and neither ejected nor unhealthy: a primary when one is left, else a backup.
    /// When every server left is out, they are tried anyway (panic mode): refusing all
    /// traffic would be worse than trying servers that failed recently.
    pub(crate) fn select(&self, key: &SelectionKey<'_>, exclude: &[usize]) -> Option<usize> {
        if self.outlier.is_some() || self.health_check.is_some() {
            let now = crate::clock::millis();
            if (0..self.servers.len()).any(|i| self.is_out(i, now)) {
                let mut avoid = exclude.to_vec();
                avoid.extend((0..self.servers.len()).filter(|&i| self.is_out(i, now)));
                if let Some(index) = self.select_available(key, &avoid) {
                    return Some(index);
                }
            }
        }
        self.select_available(key, exclude)
    }

    /// Out of rotation: ejected, or failing its health checks.
    fn is_out(&self, index: usize, now: u64) -> bool {
        self.is_ejected(index, now) || !self.is_healthy(index)
    }

    /// Healthy by the active checks (always, for a pool without them).
    pub(crate) fn is_healthy(&self, index: usize) -> bool {
        self.health_check.is_none() || self.servers[index].state.is_healthy()
    }

    /// The peer for a health probe: the server's own settings with the probe's timeout.
    pub(crate) fn probe_peer(&self, index: usize, timeout: StdDuration) -> Box<HttpPeer> {
        let mut peer = self.servers[index].peer.clone();
        let o = &mut peer.options;
        o.connection_timeout = Some(timeout);
        o.total_connection_timeout = Some(timeout);
        o.read_timeout = Some(timeout);
        o.write_timeout = Some(timeout);
        peer
    }

    /// A primary not in `avoid` when one is left, else a backup.
    fn select_available(&self, key: &SelectionKey<'_>, avoid: &[usize]) -> Option<usize> {
        let usable = |i: &usize| !avoid.contains(i);
        if self.primaries.iter().any(usable) {
            self.select_among(&self.primaries, key, avoid)
        } else if self.backups.iter().any(usable) {
            self.select_among(&self.backups, key, avoid)
        } else {
            None
        }
    }

    pub(crate) fn is_ejected(&self, index: usize, now: u64) -> bool {
        self.servers[index]
            .state
            .ejected_until
            .load(Ordering::Relaxed)
            > now
    }

    /// Counts one attempt's outcome against its server; returns how long the server
    /// is ejected for when this failure ejected it.
    pub(crate) fn record_attempt(&self, index: usize, failure: bool) -> Option<StdDuration> {
        let outlier = self.outlier?;
        let state = &self.servers[index].state;
        if !failure {
            state.consecutive_failures.store(0, Ordering::Relaxed);
            return None;
        }
        let failures = state.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let now = crate::clock::millis();
        if failures < outlier.consecutive_failures || self.is_ejected(index, now) {
            return None;
        }
        let ejected = (0..self.servers.len())
            .filter(|&i| self.is_ejected(i, now))
            .count();
        // At least one server may always be ejected, as in Envoy.
        let allowed = ((self.servers.len() as f64 * outlier.max_ejected) as usize).max(1);
        if ejected >= allowed {
            return None;
        }
        state.consecutive_failures.store(0, Ordering::Relaxed);
        state.ejected_until.store(
            now + outlier.eject_for.as_millis() as u64,
            Ordering::Relaxed,
        );
        Some(outlier.eject_for)
    }

    fn select_among(
        &self,
        candidates: &[usize],
        key: &SelectionKey<'_>,
        exclude: &[usize],
    ) -> Option<usize> {
        let usable = |i: usize| !exclude.contains(&i);
        match self.balance {
            Balance::RoundRobin => {
                let start = self.state.cursor.fetch_add(1, Ordering::Relaxed);
                // The schedule holds primaries; backups rotate evenly among themselves.
                let order: &[usize] = if candidates.as_ptr() == self.primaries.as_ptr() {
                    &self.schedule
                } else {
                    candidates
                };
                (0..order.len())
                    .map(|n| order[(start + n) % order.len()])
                    .find(|&i| usable(i))
            }
            Balance::LeastConn => {
                let start = self.state.cursor.fetch_add(1, Ordering::Relaxed);
                (0..candidates.len())
                    .map(|n| candidates[(start + n) % candidates.len()])
                    .filter(|&i| usable(i))
                    .min_by_key(|&i| self.load_of(i))
            }
            Balance::P2c => {
                let usable_count = candidates.iter().filter(|&&i| usable(i)).count();
                if usable_count == 0 {
                    return None;
                }
                let nth = |n: usize| candidates.iter().copied().filter(|&i| usable(i)).nth(n);
                let a = nth(fastrand::usize(..usable_count))?;
                let b = nth(fastrand::usize(..usable_count))?;
                Some(if self.load_of(b) < self.load_of(a) {
                    b
                } else {
                    a
                })
            }
            Balance::ConsistentHash => {
                let hash = self.key_hash(key);
                candidates
                    .iter()
                    .copied()
                    .filter(|&i| usable(i))
                    .max_by(|&a, &b| {
                        self.rendezvous_score(hash, a)
                            .total_cmp(&self.rendezvous_score(hash, b))
                    })
            }
        }
    }

    /// In-flight requests scaled by weight, in thousandths so integer compare works.
    fn load_of(&self, index: usize) -> u64 {
        let server = &self.servers[index];
        server.state.inflight.load(Ordering::Relaxed) as u64 * 1000 / server.weight.max(1) as u64
    }

    fn key_hash(&self, key: &SelectionKey<'_>) -> u64 {
        let mut hasher = FIXED_HASH.build_hasher();
        let ip_bytes = |ip: Option<IpAddr>| match ip {
            Some(IpAddr::V4(v4)) => v4.octets().to_vec(),
            Some(IpAddr::V6(v6)) => v6.octets().to_vec(),
            None => Vec::new(),
        };
        // A request without the chosen attribute hashes on its client address, so it
        // still sticks to one server rather than being spread at random.
        match &self.hash_on {
            Some(HashOn::Path) => hasher.write(key.path.as_bytes()),
            Some(HashOn::User) if key.user.is_some() => {
                hasher.write(key.user.unwrap_or_default().as_bytes())
            }
            Some(HashOn::Header(_)) if key.header.is_some() => {
                hasher.write(key.header.unwrap_or_default())
            }
            _ => hasher.write(&ip_bytes(key.client_ip)),
        }
        hasher.finish()
    }

    /// Weighted rendezvous (highest random weight) hashing: removing a server only moves
    /// the keys that were on it.
    fn rendezvous_score(&self, key_hash: u64, index: usize) -> f64 {
        let server = &self.servers[index];
        let mut hasher = FIXED_HASH.build_hasher();
        hasher.write_u64(key_hash);
        hasher.write(server.label.as_bytes());
        let unit = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
        let unit = unit.max(f64::MIN_POSITIVE);
        -(server.weight as f64) / unit.ln()
    }

    /// The peer for `index`, with read/write timeouts cut to what remains of `deadline`.
    pub(crate) fn peer(&self, index: usize, remaining: Option<StdDuration>) -> Box<HttpPeer> {
        let mut peer = self.servers[index].peer.clone();
        // Pingora's pool key includes `group_key`: keyed by thread, each worker reuses
        // only the connections it opened, whose sockets its own runtime's I/O driver
        // watches (a reuse on another thread would need that thread to wake this one).
        peer.group_key = crate::worker::index();
        if let Some(remaining) = remaining {
            let remaining = remaining.max(StdDuration::from_millis(1));
            let cap =
                |t: &mut Option<StdDuration>| *t = Some(t.map_or(remaining, |t| t.min(remaining)));
            cap(&mut peer.options.read_timeout);
            cap(&mut peer.options.write_timeout);
            cap(&mut peer.options.connection_timeout);
            cap(&mut peer.options.total_connection_timeout);
        }
        peer
    }
}

/// A fixed-key hasher: the same key must reach the same server in every process.
const FIXED_HASH: std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher> =
    std::hash::BuildHasherDefault::new();

fn make_peer(
    addr: SocketAddr,
    label: &str,
    tls: &UpstreamTls,
    ca: Option<Arc<CaType>>,
    timeouts: &Timeouts,
) -> HttpPeer {
    // SNI defaults to the host the policy names (a DNS name, or the address itself).
    // Plain HTTP has none: the peer is cloned per request, and an empty name allocates
    // nothing.
    let host = label.rsplit_once(':').map_or(label, |(host, _)| host);
    let sni = match (&tls.sni, tls.enabled) {
        (Some(sni), _) => sni.clone(),
        (None, true) => host.trim_matches(['[', ']']).to_string(),
        (None, false) => String::new(),
    };
    let mut peer = HttpPeer::new(addr, tls.enabled, sni);
    let o = &mut peer.options;
    let secs = |d: Duration| Some(d.0);
    o.connection_timeout = secs(timeouts.connect);
    o.total_connection_timeout = secs(timeouts.connect);
    o.read_timeout = secs(timeouts.read);
    o.write_timeout = secs(timeouts.write);
    o.idle_timeout = secs(timeouts.idle);
    o.verify_cert = tls.verify;
    o.verify_hostname = tls.verify;
    o.ca = ca;
    peer
}

/// Nginx's smooth weighted round-robin, unrolled once per policy: weights {a:5, b:1, c:1}
/// give a a b a c a a rather than five a's in a row.
fn smooth_weighted_schedule(servers: &[Server], members: &[usize]) -> Vec<usize> {
    let total: i64 = members.iter().map(|&i| servers[i].weight as i64).sum();
    let mut current = vec![0i64; members.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &i) in current.iter_mut().zip(members) {
            *c += servers[i].weight as i64;
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .max_by_key(|&(n, c)| (*c, -(n as i64)))
        else {
            break;
        };
        current[best] -= total;
        schedule.push(members[best]);
    }
    schedule
}

/// Counts a request against a server until dropped (also when the request is retried
/// elsewhere or aborted), which keeps least_conn honest.
pub(crate) struct InflightGuard(Arc<ServerState>);

impl InflightGuard {
    pub(crate) fn new(state: &Arc<ServerState>) -> Self {
        state.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(state.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A one-off `GET path` with `Connection: close` that the gateway makes itself (health
/// probes, cache warming), within `timeout`; the status, or `None` when no answer came.
/// `whole_body` reads the body to its end first.
pub(crate) async fn get_once(
    connector: &pingora::connectors::http::Connector,
    peer: &HttpPeer,
    path: &str,
    host: &str,
    user_agent: &str,
    whole_body: bool,
    timeout: std::time::Duration,
) -> Option<u16> {
    let attempt = async {
        let (mut session, _) = connector.get_http_session(peer).await.ok()?;
        let mut request =
            pingora::http::RequestHeader::build("GET", path.as_bytes(), Some(3)).ok()?;
        request.insert_header("host", host).ok()?;
        request.insert_header("user-agent", user_agent).ok()?;
        request.insert_header("connection", "close").ok()?;
        session.write_request_header(Box::new(request)).await.ok()?;
        session.finish_request_body().await.ok()?;
        session.read_response_header().await.ok()?;
        let status = session.response_header()?.status.as_u16();
        if whole_body {
            while session.read_response_body().await.ok()?.is_some() {}
        }
        session.shutdown().await;
        Some(status)
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: Balance, servers: &[(&str, u32, bool)]) -> Pool {
        let tls = UpstreamTls::default();
        Pool::build(
            PoolSpec {
                name: "app",
                ca: None,
                servers: servers
                    .iter()
                    .map(|(a, w, b)| (a.parse().unwrap(), Arc::from(*a), *w, *b))
                    .collect(),
                balance,
                hash_on: Some(HashOn::Path),
                tls: &tls,
                timeouts: Timeouts::default(),
                keepalive: 8,
                breaker: None,
                bulkhead: None,
                failure_on: FailureOn::default(),
                outlier: None,
                health_check: None,
                retry: None,
            },
            None,
            prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap(),
        )
    }

    fn key(path: &str) -> SelectionKey<'_> {
        SelectionKey {
            client_ip: None,
            user: None,
            header: None,
            path,
        }
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_proportional() {
        let p = pool(
            Balance::RoundRobin,
            &[
                ("127.0.0.1:1", 5, false),
                ("127.0.0.1:2", 1, false),
                ("127.0.0.1:3", 1, false),
            ],
        );
        let picks: Vec<usize> = (0..7).map(|_| p.select(&key("/"), &[]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 5);
        assert!(
            !picks.windows(3).any(|w| w.iter().all(|&i| i == 0)),
            "{picks:?} is not smooth"
        );
        assert_eq!(p.schedule, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn backups_only_when_no_primary_is_left() {
        let p = pool(
            Balance::RoundRobin,
            &[("127.0.0.1:1", 1, false), ("127.0.0.1:2", 1, true)],
        );
        for _ in 0..4 {
            assert_eq!(p.select(&key("/"), &[]), Some(0));
        }
        assert_eq!(p.select(&key("/"), &[0]), Some(1));
        assert_eq!(p.select(&key("/"), &[0, 1]), None);
    }

    #[test]
    fn least_conn_prefers_the_idle_server() {
        let p = pool(
            Balance::LeastConn,
            &[("127.0.0.1:1", 1, false), ("127.0.0.1:2", 1, false)],
        );
        let _busy = InflightGuard::new(&p.servers[0].state);
        for _ in 0..4 {
            assert_eq!(p.select(&key("/"), &[]), Some(1));
        }
    }

    #[test]
    fn p2c_never_picks_the_busier_of_two() {
        let p = pool(
            Balance::P2c,
            &[("127.0.0.1:1", 1, false), ("127.0.0.1:2", 1, false)],
        );
        let _busy = [
            InflightGuard::new(&p.servers[0].state),
            InflightGuard::new(&p.servers[0].state),
        ];
        // Two draws over two servers: either both hit the idle one, or the comparison
        // picks it; only a double draw of the busy one may return it.
        let picks: Vec<usize> = (0..200)
            .map(|_| p.select(&key("/"), &[]).unwrap())
            .collect();
        let idle = picks.iter().filter(|&&i| i == 1).count();
        assert!(idle > 120, "idle server chosen {idle} of 200 times");
        assert_eq!(p.select(&key("/"), &[1]), Some(0));
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_only_the_removed_servers_keys() {
        let three = pool(
            Balance::ConsistentHash,
            &[
                ("127.0.0.1:1", 1, false),
                ("127.0.0.1:2", 1, false),
                ("127.0.0.1:3", 1, false),
            ],
        );
        let paths: Vec<String> = (0..300).map(|i| format!("/item/{i}")).collect();
        let before: Vec<usize> = paths
            .iter()
            .map(|p| three.select(&key(p), &[]).unwrap())
            .collect();
        let again: Vec<usize> = paths
            .iter()
            .map(|p| three.select(&key(p), &[]).unwrap())
            .collect();
        assert_eq!(before, again);
        for i in 0..3 {
            let n = before.iter().filter(|&&s| s == i).count();
            assert!((50..150).contains(&n), "server {i} got {n} of 300 keys");
        }
        let without_2: Vec<usize> = paths
            .iter()
            .map(|p| three.select(&key(p), &[2]).unwrap())
            .collect();
        for (b, a) in before.iter().zip(&without_2) {
            if *b != 2 {
                assert_eq!(b, a, "a key not on the removed server moved");
            }
        }
    }

    #[test]
    fn deadline_caps_timeouts() {
        let p = pool(Balance::RoundRobin, &[("127.0.0.1:1", 1, false)]);
        let peer = p.peer(0, Some(StdDuration::from_millis(300)));
        assert_eq!(
            peer.options.read_timeout,
            Some(StdDuration::from_millis(300))
        );
        let peer = p.peer(0, None);
        assert_eq!(peer.options.read_timeout, Some(StdDuration::from_secs(30)));
    }
}
