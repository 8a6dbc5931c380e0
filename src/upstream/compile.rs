//! Compiling `upstreams` (SPEC §3): pools, their servers, balancing, TLS (with the CA
//! bundle read once), breakers, bulkheads, health checks, retries and outlier ejection,
//! each pool taking over the state of the same-named pool of the previous policy.

use super::{HashOn, Pool, PoolSpec};
use crate::breaker::FailureOn;
use crate::config;
use crate::policy::compile::Compile;
use http::HeaderName;
use serde_saphyr::Spanned;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

pub(crate) fn compile(
    cx: &mut Compile<'_>,
    upstreams: &Spanned<BTreeMap<String, config::UpstreamConfig>>,
    previous: Option<&BTreeMap<String, Arc<Pool>>>,
) -> BTreeMap<String, Arc<Pool>> {
    if upstreams.value.is_empty() {
        cx.error(&upstreams.referenced, "upstreams: define at least one pool");
    }
    let mut pools = BTreeMap::new();
    for (name, u) in &upstreams.value {
        if u.servers.value.is_empty() {
            cx.error(
                &u.servers.referenced,
                format!("upstream `{name}` has no servers"),
            );
            continue;
        }
        let mut servers = Vec::new();
        let mut seen = HashSet::new();
        for entry in &u.servers.value {
            let Some(addr) = cx.socket_addr(&entry.addr, "upstream server") else {
                continue;
            };
            if !seen.insert(addr) {
                cx.error(
                    &entry.addr.referenced,
                    format!(
                        "server `{}` is listed twice in upstream `{name}`",
                        entry.addr.value
                    ),
                );
            }
            if entry.weight == 0 {
                cx.error(
                    &entry.addr.referenced,
                    "weight must be at least 1 (remove the server to take it out)",
                );
            }
            servers.push((
                addr,
                Arc::<str>::from(entry.addr.value.as_str()),
                entry.weight,
                entry.backup,
            ));
        }
        if !servers.is_empty() && servers.iter().all(|s| s.3) {
            cx.error(
                &u.servers.referenced,
                format!(
                    "upstream `{name}` has only backup servers: at least one must be a primary"
                ),
            );
        }
        let hash_on = match (&u.hash_on, u.balance) {
            (None, config::Balance::ConsistentHash) => Some(HashOn::Ip),
            (None, _) => None,
            (Some(h), balance) => {
                if balance != config::Balance::ConsistentHash {
                    cx.error(
                        &h.referenced,
                        "hash_on only applies with balance: consistent_hash",
                    );
                }
                match h.value.as_str() {
                    "ip" => Some(HashOn::Ip),
                    "user" => Some(HashOn::User),
                    "path" => Some(HashOn::Path),
                    other => {
                        match other
                            .strip_prefix("header:")
                            .map(|n| HeaderName::from_bytes(n.trim().as_bytes()))
                        {
                            Some(Ok(header)) => Some(HashOn::Header(header)),
                            _ => {
                                cx.error(
                                    &h.referenced,
                                    format!(
                                        "hash_on `{other}`: expected ip, user, path or header:NAME"
                                    ),
                                );
                                None
                            }
                        }
                    }
                }
            }
        };
        let ca = u.tls.ca.as_ref().and_then(|ca| {
            load_ca(&cx.relative_path(&ca.value))
                .map_err(|e| cx.error(&ca.referenced, format!("tls.ca `{}`: {e}", ca.value)))
                .ok()
        });
        let previous = previous.and_then(|p| p.get(name));
        let failure_on = match &u.circuit_breaker {
            Some(config) => FailureOn::parse(&config.failure_on.value)
                .map_err(|e| cx.error(&config.failure_on.referenced, e))
                .unwrap_or_default(),
            None => FailureOn::default(),
        };
        let breaker = u.circuit_breaker.as_ref().map(|config| {
            crate::breaker::compile(
                cx,
                name,
                config,
                &servers,
                previous.and_then(|p| p.breaker.as_ref()),
            )
        });
        let bulkhead =
            crate::bulkhead::compile(cx, name, u, previous.and_then(|p| p.bulkhead.as_ref()));
        let health_check = u
            .health_check
            .as_ref()
            .and_then(|h| crate::health::compile(cx, h));
        let retry = u
            .retry
            .as_ref()
            .and_then(|r| crate::retry::compile(cx, name, r));
        let pool = Pool::build(
            PoolSpec {
                name,
                ca,
                servers,
                balance: u.balance,
                hash_on,
                tls: &u.tls,
                timeouts: u.timeouts,
                keepalive: u.keepalive,
                breaker,
                bulkhead,
                failure_on,
                health_check,
                retry,
                outlier: u.outlier.as_ref().map(|o| crate::upstream::Outlier {
                    consecutive_failures: o.consecutive_failures.max(1),
                    eject_for: o.eject_for.0,
                    max_ejected: o.max_ejected.0,
                }),
            },
            previous.map(|p| p.as_ref()),
            cx.metrics.upstream_duration(name),
        );
        if pool.health_check.is_some() {
            for server in &pool.servers {
                cx.metrics
                    .server_healthy(name, &server.label)
                    .set(i64::from(server.state.is_healthy()));
            }
        }
        pools.insert(name.clone(), Arc::new(pool));
    }
    pools
}

/// Reads the PEM certificates of a CA bundle for verifying upstream servers.
fn load_ca(path: &Path) -> Result<Arc<pingora::protocols::tls::CaType>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut anchors = Vec::new();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read: {e}"))? {
        let der = cert
            .map_err(|e| format!("not a PEM certificate bundle: {e}"))?
            .to_vec();
        // Pingora's wrapper panics on DER it cannot parse: check first.
        x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("invalid certificate: {e}"))?;
        anchors.push(pingora::utils::tls::WrappedX509::new(
            der,
            pingora::utils::tls::parse_x509,
        ));
    }
    if anchors.is_empty() {
        return Err("no certificate in the file".to_string());
    }
    Ok(Arc::from(anchors))
}
