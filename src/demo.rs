//! `tollgate demo`: the demo application pool and the gateway in one command.
//!
//! The pool's servers are the ones the policy's first upstream lists on loopback; they
//! run on their own runtime thread in this process, and the gateway then starts with
//! the same policy file.

use crate::config;
use crate::server::{self, RunOptions};
use std::net::SocketAddr;
use std::path::PathBuf;

pub fn run(policy_path: PathBuf) -> Result<(), String> {
    let text = std::fs::read_to_string(&policy_path)
        .map_err(|e| format!("cannot read {}: {e}", policy_path.display()))?;
    let parsed = config::parse(&policy_path, &text).map_err(|e| e.to_string())?;
    let pool: Vec<SocketAddr> = parsed
        .upstreams
        .value
        .values()
        .flat_map(|u| u.servers.value.iter())
        .filter_map(|s| s.addr.value.parse::<SocketAddr>().ok())
        .filter(|a| a.ip().is_loopback())
        .collect();
    if pool.is_empty() {
        return Err(
            "the policy lists no loopback upstream servers for the demo pool to serve".into(),
        );
    }
    let proxy = parsed
        .server
        .listen
        .first()
        .map(|l| l.value.replace("0.0.0.0", "127.0.0.1"))
        .unwrap_or_default();
    let admin = parsed.admin.listen.value.clone();

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("demo pool".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async move {
                let mut handles = Vec::new();
                for addr in pool {
                    match tollgate_upstreams::serve(addr, &addr.to_string(), Default::default())
                        .await
                    {
                        Ok(handle) => handles.push(handle),
                        Err(e) => {
                            let _ = ready_tx
                                .send(Err(format!("demo pool cannot listen on {addr}: {e}")));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(handles.iter().map(|h| h.addr).collect::<Vec<_>>()));
                std::future::pending::<()>().await;
            });
        })
        .map_err(|e| format!("cannot start the demo pool: {e}"))?;
    let addrs = ready_rx.recv().map_err(|e| e.to_string())??;

    println!("tollgate demo");
    println!(
        "  demo pool:  {}",
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  gateway:    http://{proxy}");
    println!("  admin API:  http://{admin}");
    println!("try:");
    println!("  curl -i http://{proxy}/api/predict");
    println!("  curl -i 'http://{proxy}/api/search?q=popular'");
    println!("  curl -i http://{proxy}/nowhere                # 404 no_route, problem+json");
    println!("  curl -i -H 'x-api-key: demo-key' http://{proxy}/api/suggest   # user `demo`, RateLimit headers");
    println!("  for i in $(seq 25); do curl -s -o /dev/null -w '%{{http_code}} ' http://{proxy}/api/predict; done   # 429 after 20");
    println!("  curl http://{admin}/status");
    println!("  curl http://{admin}/metrics | grep tollgate_");
    println!(
        "  edit {} and watch it reload: curl http://{admin}/events",
        policy_path.display()
    );
    println!("Ctrl-C stops everything.");
    server::run(RunOptions {
        policy_path,
        upgrade: false,
    })
}
