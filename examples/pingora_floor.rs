//! What Pingora 0.9 itself costs per request, with no policy at all: the floor under
//! tollgate's figures in the peer benchmark (bench/HISTORY.md, "Pingora's floor").
//!
//! `pingora_floor LISTEN answer` answers every request from `request_filter` with a
//! fixed 1 KiB body (the cache-hit scenario's size: a cache hit cannot cost less).
//! `pingora_floor LISTEN proxy ORIGIN` forwards every request to ORIGIN over pooled
//! keep-alive connections (the baseline scenario: a proxy cannot cost less).
//! Both run as tollgate does: one thread, no work stealing, mimalloc, no downstream
//! modules.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

enum Floor {
    Answer(Bytes),
    Proxy(String),
}

impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let Floor::Answer(body) = self else {
            return Ok(false);
        };
        let mut header = ResponseHeader::build(200, Some(4))?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("content-length", body.len())?;
        header.insert_header("cache-control", "public, max-age=3600")?;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session
            .write_response_body(Some(body.clone()), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        match self {
            Floor::Proxy(origin) => Ok(Box::new(HttpPeer::new(
                origin.as_str(),
                false,
                String::new(),
            ))),
            Floor::Answer(_) => Error::e_explain(InternalError, "answer mode has no upstream"),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let floor = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [_, "answer"] => Floor::Answer(Bytes::from(vec![b'x'; 1024])),
        [_, "proxy", origin] => Floor::Proxy(origin.to_string()),
        _ => {
            eprintln!("usage: pingora_floor LISTEN answer | pingora_floor LISTEN proxy ORIGIN");
            std::process::exit(2);
        }
    };
    // A probe the bench scripts start and stop: no grace period to wait out on SIGTERM.
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, floor);
    service.add_tcp(&args[0]);
    server.add_service(service);
    server.run_forever();
}
