//! The demo application pool: a small JSON API with the reference endpoints of the
//! tollgate policy, and knobs to make it slow, failing or cacheable.
//!
//! Knobs come from three places, the most specific winning: query parameters of one
//! request (`?latency_ms=200&status=503&cache_control=max-age%3D60&set_header=x-a:1&etag=v1`), the server's
//! [`Knobs`] (set from command-line flags or, in tests, changed at run time), and the
//! endpoint defaults.
//!
//! `/echo` answers with what arrived (method, path, headers, body size), which lets
//! tests see exactly what the gateway forwarded.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Server-wide behaviour, adjustable while the server runs.
#[derive(Debug, Default)]
pub struct Knobs {
    /// Added to every response, in milliseconds.
    pub latency_ms: AtomicU64,
    /// Share of requests answered 503, in millionths (0..=1_000_000).
    pub error_rate_ppm: AtomicU32,
    /// When non-zero, every request gets this status.
    pub force_status: AtomicU16,
    /// When set, accepted connections are closed at once without an answer.
    pub reset_connections: AtomicBool,
    pub cache_control: Mutex<Option<String>>,
}

impl Knobs {
    pub fn set_error_rate(&self, share: f64) {
        self.error_rate_ppm.store(
            (share.clamp(0.0, 1.0) * 1_000_000.0) as u32,
            Ordering::Relaxed,
        );
    }
}

/// A running server: its address, knobs and request count.
#[derive(Clone)]
pub struct Handle {
    pub addr: SocketAddr,
    pub name: String,
    pub knobs: Arc<Knobs>,
    requests: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    /// Disconnects once the accept loop and every connection task have ended: each
    /// holds one of its senders and none sends.
    ended: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
}

impl Handle {
    /// Requests this server has answered (or been sent, when resetting connections).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes open connections, like a server going away, and
    /// returns once they are closed: a client that connected before cannot be answered
    /// after. Blocks the calling thread, so it is called from outside the runtime.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        let ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        let _ = ended.recv_timeout(Duration::from_secs(10));
    }
}

/// Binds `addr` (port 0 picks a free one) and serves until [`Handle::stop`].
pub async fn serve(addr: SocketAddr, name: &str, knobs: Knobs) -> std::io::Result<Handle> {
    let listener = TcpListener::bind(addr).await?;
    let (stop, mut stopped) = watch::channel(false);
    let (running, ended) = std::sync::mpsc::channel();
    let handle = Handle {
        addr: listener.local_addr()?,
        name: name.to_string(),
        knobs: Arc::new(knobs),
        requests: Arc::new(AtomicU64::new(0)),
        stop,
        ended: Arc::new(Mutex::new(ended)),
    };
    let server = handle.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stopped.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            if server.knobs.reset_connections.load(Ordering::Relaxed) {
                server.requests.fetch_add(1, Ordering::Relaxed);
                // A zero linger makes the close a TCP reset, like a crashed server's.
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let server = server.clone();
            let mut stopped = stopped.clone();
            let running = running.clone();
            tokio::spawn(async move {
                let _running = running;
                let service = service_fn(move |req| {
                    let server = server.clone();
                    async move { Ok::<_, std::convert::Infallible>(server.answer(req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                // Stopping drops kept-alive connections too, as a process exit would.
                tokio::select! {
                    _ = connection => {}
                    _ = stopped.changed() => {}
                }
            });
        }
    });
    Ok(handle)
}

/// Query parameters as (name, value) pairs, percent-decoded.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Handle {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        // A request counts once its body has fully arrived: a truncated one is never
        // answered (the connection is gone anyway).
        let body = match body.collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => return Response::new(Full::new(Bytes::new())),
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let query = query_pairs(parts.uri.query().unwrap_or(""));
        let param = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };

        let latency = param("latency_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| self.knobs.latency_ms.load(Ordering::Relaxed));
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }

        let forced = param("status")
            .and_then(|v| v.parse::<u16>().ok())
            .or_else(|| Some(self.knobs.force_status.load(Ordering::Relaxed)).filter(|s| *s != 0));
        let error_ppm = param("error_rate")
            .and_then(|v| v.parse::<f64>().ok())
            .map(|r| (r.clamp(0.0, 1.0) * 1_000_000.0) as u32)
            .unwrap_or_else(|| self.knobs.error_rate_ppm.load(Ordering::Relaxed));
        let failing = error_ppm > 0 && fastrand_ppm() < error_ppm;

        let path = parts.uri.path();
        let (status, doc) = match forced {
            Some(status) => (status, json!({ "status": status, "forced": true })),
            None if failing => (503, json!({ "error": "injected failure" })),
            None => match endpoint(path, &query) {
                Some(doc) => (200, doc),
                None if path == "/echo" || path.starts_with("/echo/") => {
                    let headers: serde_json::Map<String, Value> = parts
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_string(),
                                Value::from(String::from_utf8_lossy(v.as_bytes())),
                            )
                        })
                        .collect();
                    (
                        200,
                        json!({
                            "method": parts.method.as_str(),
                            "path": path,
                            "query": parts.uri.query(),
                            "headers": headers,
                            "body_bytes": body.len(),
                        }),
                    )
                }
                None => (404, json!({ "error": "not found", "path": path })),
            },
        };
        let mut doc = doc;
        doc["server"] = Value::from(self.name.as_str());
        let cache_control = param("cache_control")
            .map(str::to_string)
            .or_else(|| self.knobs.cache_control.lock().ok().and_then(|c| c.clone()));
        let mut response = Response::builder()
            .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header("content-type", "application/json")
            .header("x-served-by", self.name.as_str());
        if let Some(cc) = cache_control {
            response = response.header("cache-control", cc);
        }
        // `?etag=V` makes the response conditional: a request whose If-None-Match names
        // it gets 304 without a body, as an origin revalidating a cache would answer.
        if let Some(etag) = param("etag").map(|e| format!("\"{e}\"")) {
            response = response.header("etag", etag.as_str());
            let matches = parts
                .headers
                .get("if-none-match")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
            if matches && status == 200 {
                return response
                    .status(StatusCode::NOT_MODIFIED)
                    .body(Full::new(Bytes::new()))
                    .expect("valid response");
            }
        }
        for (name, value) in query
            .iter()
            .filter(|(k, _)| k == "set_header")
            .filter_map(|(_, v)| v.split_once(':'))
        {
            response = response.header(name.trim(), value.trim());
        }
        let body = serde_json::to_vec(&doc).unwrap_or_default();
        response
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    }
}

fn fastrand_ppm() -> u32 {
    use std::cell::Cell;
    thread_local!(static STATE: Cell<u64> = Cell::new(0x9E37_79B9_7F4A_7C15 ^ std::process::id() as u64));
    STATE.with(|s| {
        // xorshift64*: plenty for sampling an error rate.
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % 1_000_000) as u32
    })
}

/// The reference endpoints and their deterministic bodies.
fn endpoint(path: &str, query: &[(String, String)]) -> Option<Value> {
    let q = query
        .iter()
        .find(|(k, _)| k == "q")
        .map_or("", |(_, v)| v.as_str());
    let doc = match path {
        "/health" => json!({ "status": "ok" }),
        "/api/predict" => {
            json!({ "prediction": { "label": "positive", "score": 0.87 }, "model": "demo-v1" })
        }
        "/api/suggest" => json!({ "suggestions": ["alpha", "beta", "gamma"], "degraded": false }),
        "/api/search" => {
            json!({ "query": q, "results": [ { "id": 1, "title": format!("{q} one") }, { "id": 2, "title": format!("{q} two") } ] })
        }
        "/api/maintenance" => json!({ "maintenance": false, "window": null }),
        "/api/learning/metrics" => json!({ "accuracy": 0.91, "loss": 0.23, "epoch": 42 }),
        _ => return None,
    };
    Some(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("max-age%3D60"), "max-age=60");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
