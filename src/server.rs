//! Process assembly and lifecycle: the Pingora server with the proxy, admin and
//! reload services, and a shutdown that ends as soon as the last request is done.

use crate::admin::Admin;
use crate::certificate::ReloadingCertificate;
use crate::connection::Connections;
use crate::events::EventLog;
use crate::gateway::reload::Watcher;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::placement::Placement;
use crate::policy::{self, Policy};
use crate::proxy::Proxy;
use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ExecutionPhase, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub struct RunOptions {
    pub policy_path: PathBuf,
    /// Take the listening sockets over from a running instance (Pingora's graceful upgrade).
    pub upgrade: bool,
}

/// Transparent huge pages off for the gateway, unless the operator decided with the
/// allocator's own `MIMALLOC_ALLOW_THP`. mimalloc asks for huge pages on its arenas, so the
/// first touch of each 2 MiB zeroes all of it while the worker thread waits: a burst of new
/// connections, which takes fresh memory for their buffers, held every request in flight
/// for 30 to 100 ms (README, "Added latency at a fixed rate"). The gateway's heap is small
/// and its hot part stays resident, so 4 KiB pages cost it nothing measurable.
fn without_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!("cannot turn transparent huge pages off (prctl PR_SET_THP_DISABLE): {e}");
    }
}

/// Loads the policy and runs the gateway until it is shut down.
pub fn run(options: RunOptions) -> Result<(), String> {
    let signals = crate::signals::catch().map_err(|e| format!("cannot catch signals: {e}"))?;
    without_transparent_huge_pages();
    // Nothing here reads how long a stream's reads waited; timing it is two clock reads
    // per wait, about four a proxied request.
    pingora::protocols::l4::stream::set_pending_time_accounting(false);
    let metrics = Metrics::new();
    let events = Arc::new(EventLog::default());
    let policy = policy::load(&options.policy_path, None, &metrics, &events).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        lines.join("\n")
    })?;
    if !options.upgrade {
        ensure_free(&listen_addresses(&policy))?;
    }
    let conf = server_conf(&policy);
    let threads = policy.server.threads;
    let cpus = policy::usable_cpus();
    if threads > cpus {
        // Threads past the CPUs are taken into use only when the others are busy, and
        // then add wake-ups and context switches on a CPU already busy.
        tracing::warn!(
            threads,
            cpus,
            "server.threads is more than the CPUs this process may use (CPU affinity, cgroup \
             quota): the extra threads add wake-ups and context switches, not capacity"
        );
    }
    let gateway = Gateway::new(policy, metrics, events);
    let policy = gateway.policy.load_full();

    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    // One thread needs no placement, and pays nothing for it.
    let placement = (threads > 1).then(|| {
        Arc::new(Placement::new(
            threads,
            gateway.metrics.connections_moved.clone(),
        ))
    });
    // Two apps over one pipeline: `connection::Connections` tells HTTP/1 from h2c by the
    // first bytes, so Pingora's own preface wait (which has no deadline) never runs.
    let app = |h2c: bool| {
        let mut options = HttpServerOptions::default();
        options.h2c = h2c;
        options.rehome = placement
            .clone()
            .map(|p| p as Arc<dyn pingora::apps::Rehome>);
        let mut app = pingora::proxy::http_proxy(
            &server.configuration,
            Proxy {
                gateway: gateway.clone(),
            },
        );
        app.server_options = Some(options);
        Arc::new(app)
    };
    let mut proxy = Service::new(
        "tollgate proxy".to_string(),
        Connections {
            http1: app(false),
            h2c: app(true),
            gateway: gateway.clone(),
            placement: placement.clone(),
        },
    );
    proxy.threads = Some(threads);
    for addr in &policy.server.listen {
        // No L4 read buffer under plain HTTP: the HTTP/1 session reads into its own
        // buffer, so Pingora's 64 KiB per connection would only be copied out of, and
        // would stay resident on every idle kept-alive connection. (TLS keeps it: the
        // TLS layer reads in small records.)
        proxy.add_listener(
            ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::default().read(0)),
        );
    }
    if let Some(tls) = &policy.server.tls {
        // Read again when the files change: a renewed certificate needs no restart.
        let certificate = ReloadingCertificate::load(tls.cert.clone(), tls.key.clone())
            .map_err(|e| format!("server.tls: {e}"))?;
        let mut settings = TlsSettings::intermediate("", "").map_err(|e| e.to_string())?;
        settings.set_cert_resolver(Arc::new(certificate));
        settings.enable_h2();
        proxy.add_tls_with_settings(&tls.listen.to_string(), None, settings);
    }
    let proxy = server.add_service(proxy);

    let mut admin = Service::new(
        "tollgate admin".to_string(),
        HttpServer::new_app(Admin {
            gateway: gateway.clone(),
        }),
    );
    admin.add_tcp(&policy.admin.listen.to_string());
    admin.threads = Some(1);
    // `/healthz` answers only once the proxy listens (pingora-core 0018): a port taken
    // after `ensure_free` is retried by Pingora, and a process that does not serve must
    // not say it does.
    server.add_service(admin).add_dependency(&proxy);

    server.add_service(background_service(
        "policy watcher",
        Watcher {
            gateway: gateway.clone(),
            reload: signals.reload,
            reopen_log: signals.reopen_log,
        },
    ));
    server.add_service(background_service(
        "load monitor",
        crate::gateway::load_monitor::LoadMonitor {
            gateway: gateway.clone(),
        },
    ));
    server.add_service(background_service(
        "health checks",
        crate::gateway::health_checker::HealthChecker {
            gateway: gateway.clone(),
        },
    ));
    server.add_service(background_service(
        "cache warmer",
        crate::gateway::warmer::Warmer {
            gateway: gateway.clone(),
        },
    ));
    server.add_service(background_service(
        "historian",
        crate::gateway::historian::Historian {
            gateway: gateway.clone(),
        },
    ));
    if let Some(placement) = placement {
        server.add_service(background_service(
            "thread balancer",
            crate::gateway::balancer::Balancer {
                gateway: gateway.clone(),
                placement,
            },
        ));
    }
    server.add_service(background_service(
        "rate limit janitor",
        crate::gateway::janitor::Janitor {
            gateway: gateway.clone(),
        },
    ));

    exit_when_drained(&server, gateway.clone());
    tracing::info!(
        listen = ?policy.server.listen,
        admin = %policy.admin.listen,
        generation = policy.generation,
        routes = policy.routes.len(),
        "tollgate started"
    );
    drop(policy);
    server.run(signals.shutdown);
    Ok(())
}

fn listen_addresses(policy: &Policy) -> Vec<SocketAddr> {
    let mut all = policy.server.listen.clone();
    all.push(policy.admin.listen);
    all.extend(policy.server.tls.as_ref().map(|t| t.listen));
    all
}

/// Pingora retries a busy port for half a minute before it gives up and exits
/// (pingora-core 0019); an operator wants a clear error at once instead.
pub(crate) fn ensure_free(addresses: &[SocketAddr]) -> Result<(), String> {
    for addr in addresses {
        TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }
    Ok(())
}

fn server_conf(policy: &Policy) -> ServerConf {
    let run_dir = run_dir(&policy.server.listen);
    let keepalive: usize = policy
        .upstreams
        .values()
        .map(|p| p.keepalive * p.servers.len())
        .sum();
    ServerConf {
        threads: policy.server.threads,
        // Measured faster for a proxy: no cross-thread task stealing on each wake-up.
        work_stealing: false,
        grace_period_seconds: Some(policy.server.shutdown_grace.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: run_dir.join("tollgate.pid").to_string_lossy().into_owned(),
        upgrade_sock: run_dir.join("upgrade.sock").to_string_lossy().into_owned(),
        upstream_keepalive_pool_size: keepalive.max(1),
        // Timeouts of a second or more on each runtime's own tokio timer wheel instead of
        // Pingora's process-wide one: each runtime is one thread here (no stealing), so
        // the wheel is uncontended, and a registration costs no boxed async block, Arc
        // pair or shared tree (measured: 64,779 -> 63,825 instructions a request).
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        // Pingora's cap on tries per request stays at its default (16): the gateway's
        // own limits decide (failover only while another server is left, retries per
        // the pool's policy), and a fixed cap cannot follow pools that grow on reload.
        ..ServerConf::default()
    }
}

/// Where the pid file and the upgrade socket live: `TOLLGATE_RUN_DIR`, else a directory
/// under the system temp dir named after the listen addresses. Two instances on
/// different ports never collide, and an upgrade finds the instance it replaces.
pub(crate) fn run_dir(listen: &[SocketAddr]) -> PathBuf {
    let dir = match std::env::var_os("TOLLGATE_RUN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let key = format!("{listen:?}");
            let digest = crate::digest::sha256_hex(&key);
            std::env::temp_dir().join(format!("tollgate-{}", &digest[..12]))
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::warn!("cannot create run directory {}: {e}", dir.display());
    }
    dir
}

/// Pingora's graceful shutdown always sleeps its whole grace period. Here the process
/// exits as soon as no request is in flight (or when the grace period ends, by Pingora).
fn exit_when_drained(server: &Server, gateway: Arc<Gateway>) {
    let mut phases = server.watch_execution_phase();
    std::thread::Builder::new()
        .name("drain watcher".into())
        .spawn(move || loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::GracefulUpgradeTransferringFds) => gateway.start_hand_over(),
                Ok(ExecutionPhase::GracefulTerminate | ExecutionPhase::ShutdownGracePeriod) => {
                    gateway.start_draining();
                    tracing::info!(
                        inflight = gateway.inflight(),
                        "draining: waiting for in-flight requests"
                    );
                    wait_until_idle(&gateway);
                    // The last requests' lines are in the access log before the exit.
                    if !gateway.access_log.flush(Duration::from_secs(2)) {
                        tracing::warn!("the access log did not flush within 2 s");
                    }
                    if gateway.policy.load().tracing.is_some()
                        && !gateway.spans.flush(Duration::from_secs(2))
                    {
                        tracing::warn!("the spans were not exported within 2 s");
                    }
                    tracing::info!("drained: exiting");
                    std::process::exit(0);
                }
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        })
        .expect("spawn drain watcher");
}

fn wait_until_idle(gateway: &Gateway) {
    const STEP: Duration = Duration::from_millis(10);
    // Idle must hold for a few steps: a keep-alive request may be in its first bytes.
    let mut idle_steps = 0;
    while idle_steps < 5 {
        std::thread::sleep(STEP);
        idle_steps = if gateway.inflight() == 0 {
            idle_steps + 1
        } else {
            0
        };
    }
}

/// Validates a policy file for `tollgate check`; with `against`, also describes what a
/// reload from that file would change.
pub fn check(path: &Path, against: Option<&Path>) -> Result<Vec<String>, Vec<String>> {
    let metrics = Metrics::new();
    let events = Arc::new(EventLog::default());
    let to_lines = |errors: Vec<crate::config::ConfigError>| {
        errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    };
    let old = match against {
        Some(old) => Some(policy::load(old, None, &metrics, &events).map_err(to_lines)?),
        None => None,
    };
    let new = policy::load(path, old.as_ref(), &metrics, &events).map_err(to_lines)?;
    Ok(match &old {
        Some(old) => policy::PolicyDiff::between(old, &new).lines(),
        None => Vec::new(),
    })
}
