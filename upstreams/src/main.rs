//! `tollgate-upstream`: runs demo application servers, one per `--listen` address.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use tollgate_upstreams::{serve, Knobs};

const USAGE: &str = "usage: tollgate-upstream --listen ADDR [--listen ADDR ...] [--latency-ms N] [--error-rate 0.0-1.0] [--cache-control VALUE]";

#[tokio::main]
async fn main() {
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut latency_ms = 0;
    let mut error_rate = 0.0;
    let mut cache_control = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--listen" => listen.push(
                value()
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("--listen: {e}"))),
            ),
            "--latency-ms" => {
                latency_ms = value()
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("--latency-ms: {e}")))
            }
            "--error-rate" => {
                error_rate = value()
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("--error-rate: {e}")))
            }
            "--cache-control" => cache_control = Some(value()),
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => fail(&format!("unknown argument `{other}`")),
        }
    }
    if listen.is_empty() {
        fail("at least one --listen address is needed");
    }
    for addr in listen {
        let knobs = Knobs::default();
        knobs.latency_ms.store(latency_ms, Ordering::Relaxed);
        knobs.set_error_rate(error_rate);
        *knobs.cache_control.lock().expect("fresh mutex") = cache_control.clone();
        let handle = serve(addr, &addr.to_string(), knobs)
            .await
            .unwrap_or_else(|e| fail(&format!("cannot listen on {addr}: {e}")));
        println!("demo upstream listening on http://{}", handle.addr);
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn fail(message: &str) -> ! {
    eprintln!("tollgate-upstream: {message}\n{USAGE}");
    std::process::exit(2)
}
