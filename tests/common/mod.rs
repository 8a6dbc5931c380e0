//! Black-box harness: the real `tollgate` binary on ephemeral ports, in-process demo
//! upstream servers on real sockets, and small HTTP helpers.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
pub use tollgate_upstreams::{Handle as Upstream, Knobs};

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime")
    })
}

/// A demo upstream on a free loopback port, named `name` in its answers.
pub fn upstream(name: &str) -> Upstream {
    runtime()
        .block_on(tollgate_upstreams::serve(
            "127.0.0.1:0".parse().unwrap(),
            name,
            Knobs::default(),
        ))
        .expect("upstream binds")
}

/// A demo upstream on `addr` (e.g. to restart one that was stopped), once the address
/// is free again.
pub fn upstream_at(addr: SocketAddr, name: &str) -> Upstream {
    let mut started = None;
    assert!(
        wait_for(Duration::from_secs(5), || {
            started = runtime()
                .block_on(tollgate_upstreams::serve(addr, name, Knobs::default()))
                .ok();
            started.is_some()
        }),
        "{addr} did not become free"
    );
    started.expect("bound")
}

/// A port nothing listens on now, handed out to no other test process while this one
/// runs, and outside the range the kernel picks from for `bind(0)` and outgoing
/// connections. A gateway binds the port it is given a little later, in another
/// process: a port from the kernel's range could be taken in between by any socket
/// of a parallel test (an upstream, a client), and the gateway's listener would then
/// retry while its admin API answers and requests go to that other socket.
pub fn free_port() -> u16 {
    static RESERVED: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let (low, high) = reservable_ports();
    let dir = std::env::temp_dir().join("tollgate-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    let span = usize::from(high - low);
    let start = std::process::id() as usize * 7919;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = low + offset as u16;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .unwrap();
        // The lock is the reservation: it ends with this process, however it ends.
        if lock.try_lock().is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            RESERVED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(lock);
            return port;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// Up to 10,000 ports just below the kernel's ephemeral range.
fn reservable_ports() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral_low.max(2048);
    (high.saturating_sub(10_000).max(1024), high)
}

/// An address that refuses connections for the rest of the test process: the
/// port stays bound but never listens, so no parallel test can take it over
/// (a released port can be handed to the next `bind(0)`).
pub fn closed_addr() -> String {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    std::mem::forget(socket);
    addr.to_string()
}

/// The id the gateway gave a response (`X-Request-Id`), as its access-log line has it.
pub fn request_id(response: &reqwest::blocking::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .expect("a request id is visible ASCII")
        .to_string()
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Tollgate {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    pub policy: PathBuf,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    pub client: reqwest::blocking::Client,
}

/// The `server:`/`admin:` head every test policy starts with; `{extra}` lets a test add
/// server settings.
pub fn head(port: u16, admin_port: u16, server_extra: &str) -> String {
    format!(
        "version: 1\nserver:\n  listen: [\"127.0.0.1:{port}\"]\n  threads: 2\n  shutdown_grace: 10s\n{server_extra}admin:\n  listen: \"127.0.0.1:{admin_port}\"\n  token_env: TEST_ADMIN_TOKEN\n"
    )
}

/// One pool named `app` over `servers`, and one catch-all route `all` to it.
pub fn simple_policy(servers: &[String]) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "upstreams:\n  app:\n    servers: [{}]\n    timeouts: {{ connect: 1s, read: 5s }}\nroutes:\n  - name: all\n    match: {{ path_prefix: / }}\n    upstream: app\n",
        list.join(", ")
    )
}

/// One pool `app` over `server` with one more pool setting, `setting` (e.g.
/// `keepalive: 0`), and one catch-all route to it.
pub fn pool_policy(server: impl std::fmt::Display, setting: &str) -> String {
    format!(
        "upstreams:\n  app:\n    servers: [\"{server}\"]\n    {setting}\nroutes:\n  - name: all\n    upstream: app\n"
    )
}

/// One pool `app` over `server` and one catch-all route `api` to it, then `extra`
/// (top-level sections such as `rate_limits:` or `tracing:`).
pub fn api_policy(server: impl std::fmt::Display, extra: &str) -> String {
    format!(
        "upstreams:\n  app:\n    servers: [\"{server}\"]\nroutes:\n  - name: api\n    match: {{ path_prefix: / }}\n    upstream: app\n{extra}"
    )
}

/// `text` written as `gateway.yaml` in a directory of its own: the directory (removed
/// when dropped) and the file's path.
pub fn policy_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("gateway.yaml");
    std::fs::write(&policy, text).unwrap();
    (dir, policy)
}

/// `tollgate check` on `text` written as `gateway.yaml`, beside `files` (name, content):
/// its exit code and standard error.
pub fn check_policy(text: &str, files: &[(&str, &str)]) -> (Option<i32>, String) {
    let (dir, policy) = policy_file(text);
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check")
        .arg(&policy)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Tollgate {
    /// Starts the gateway with `head(...)` + `body` and waits until it serves.
    pub fn start(body: &str) -> Tollgate {
        Self::start_with(body, "", &[])
    }

    pub fn start_with(body: &str, server_extra: &str, env: &[(&str, &str)]) -> Tollgate {
        Self::start_from(
            |port, admin_port| format!("{}{body}", head(port, admin_port, server_extra)),
            env,
        )
    }

    /// Starts the gateway with the whole policy `text(port, admin_port)` makes.
    /// Another test process (nextest runs each test in its own) may take a port
    /// between `free_port` and the gateway's bind: then it starts again on new ports.
    pub fn start_from(text: impl Fn(u16, u16) -> String, env: &[(&str, &str)]) -> Tollgate {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (port, admin_port) = (free_port(), free_port());
            let dir = tempfile::tempdir().unwrap();
            let policy = dir.path().join("gateway.yaml");
            std::fs::write(&policy, text(port, admin_port)).unwrap();
            let mut gateway = Self::spawn(dir, policy, port, admin_port, env);
            let ready = wait_for(Duration::from_secs(20), || {
                let serving = gateway
                    .admin_get("/healthz")
                    .is_ok_and(|r| r.status() == 200)
                    && TcpStream::connect(("127.0.0.1", port)).is_ok();
                serving || gateway.child.try_wait().is_ok_and(|s| s.is_some())
            }) && gateway.child.try_wait().is_ok_and(|s| s.is_none());
            if ready {
                return gateway;
            }
            let status = gateway.child.try_wait();
            // Its last words arrive through a pipe a thread reads.
            wait_for(Duration::from_secs(2), || !gateway.stderr().is_empty());
            let port_taken = gateway
                .stderr()
                .iter()
                .any(|l| l.contains("cannot listen on") && l.contains("in use"));
            if !(port_taken && attempts < 3) {
                panic!(
                    "tollgate did not start ({status:?}); stderr:\n{}\nstdout:\n{}",
                    gateway.stderr().join("\n"),
                    gateway.stdout().join("\n")
                );
            }
        }
    }

    /// Spawns the binary without waiting for it.
    pub fn spawn(
        dir: tempfile::TempDir,
        policy: PathBuf,
        port: u16,
        admin_port: u16,
        env: &[(&str, &str)],
    ) -> Tollgate {
        Self::spawn_with_args(dir, policy, port, admin_port, env, &[])
    }

    /// A second process that takes this one's listening sockets over (`--upgrade`); it
    /// shares the policy and the run directory, where the hand-over socket lives.
    pub fn spawn_upgrade(&self) -> Tollgate {
        let run_dir = self.dir.path().to_str().unwrap().to_string();
        Self::spawn_with_args(
            tempfile::tempdir().unwrap(),
            self.policy.clone(),
            self.port,
            self.admin_port,
            &[("TOLLGATE_RUN_DIR", &run_dir)],
            &["--upgrade"],
        )
    }

    fn spawn_with_args(
        dir: tempfile::TempDir,
        policy: PathBuf,
        port: u16,
        admin_port: u16,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Tollgate {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .args(["run", "-c"])
            .arg(&policy)
            .args(args)
            .env("TOLLGATE_LOG", "info")
            .env("TOLLGATE_LOG_FORMAT", "json")
            .env("TOLLGATE_RUN_DIR", dir.path())
            .env_remove("TEST_ADMIN_TOKEN")
            .env_remove("TOLLGATE_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn tollgate");
        let stdout = collect_lines(child.stdout.take().unwrap());
        let stderr = collect_lines(child.stderr.take().unwrap());
        Tollgate {
            child,
            port,
            admin_port,
            dir,
            policy,
            stdout,
            stderr,
            client: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        self.client
            .get(self.url(path))
            .send()
            .unwrap_or_else(|e| panic!("gateway answers: {e:?}\n{}", self.output_tail()))
    }

    /// The gateway's last lines of output, for a failure message.
    pub fn output_tail(&self) -> String {
        let tail = |lines: Vec<String>| lines[lines.len().saturating_sub(20)..].join("\n");
        format!(
            "gateway stderr:\n{}\ngateway stdout:\n{}",
            tail(self.stderr()),
            tail(self.stdout())
        )
    }

    pub fn admin_get(&self, path: &str) -> reqwest::Result<reqwest::blocking::Response> {
        self.client.get(self.admin_url(path)).send()
    }

    pub fn admin_json(&self, path: &str) -> Value {
        self.admin_get(path)
            .expect("admin answers")
            .json()
            .expect("admin JSON")
    }

    pub fn admin_post(&self, path: &str, token: Option<&str>) -> reqwest::blocking::Response {
        let mut req = self.client.post(self.admin_url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send().expect("admin answers")
    }

    pub fn admin_put_json(&self, path: &str, body: &Value) -> reqwest::blocking::Response {
        self.client
            .put(self.admin_url(path))
            .json(body)
            .send()
            .expect("admin answers")
    }

    pub fn admin_post_json(&self, path: &str, body: &Value) -> reqwest::blocking::Response {
        self.client
            .post(self.admin_url(path))
            .json(body)
            .send()
            .expect("admin answers")
    }

    /// The value of one sample in `/metrics`, e.g. `tollgate_config_reloads_total{result="success"}`.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let text = self.admin_get("/metrics").ok()?.text().ok()?;
        text.lines()
            .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Waits until no request is in flight. A request's counters, histograms and SLO
    /// window are written in Pingora's logging phase, after its response reached the
    /// client, and its in-flight count drops only after that phase.
    pub fn wait_idle(&self) {
        assert!(
            wait_for(Duration::from_secs(5), || self
                .metric("tollgate_inflight_requests")
                == Some(0.0)),
            "requests still in flight"
        );
    }

    pub fn generation(&self) -> u64 {
        self.admin_json("/status")["generation"].as_u64().unwrap()
    }

    /// Replaces the policy file (the body after the standard head) the way editors and
    /// ConfigMap updates do, by renaming a complete file over it: a plain write has a
    /// moment where the file is empty, which a reload may read and count as a failure.
    pub fn write_policy(&self, body: &str) {
        let staged = self.policy.with_extension("yaml.new");
        std::fs::write(
            &staged,
            format!("{}{body}", head(self.port, self.admin_port, "")),
        )
        .unwrap();
        std::fs::rename(&staged, &self.policy).unwrap();
    }

    pub fn policy_text(&self, body: &str) -> String {
        format!("{}{body}", head(self.port, self.admin_port, ""))
    }

    /// The signals the process has a handler for (`SigCgt` in `/proc/<pid>/status`), by
    /// number.
    pub fn caught_signals(&self) -> Vec<u32> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .map_or(0, |hex| u64::from_str_radix(hex.trim(), 16).unwrap());
        (1..=64).filter(|n| mask & (1 << (n - 1)) != 0).collect()
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// SIGTERM, then a clean exit (status 0) within `timeout`.
    pub fn stop_cleanly(&mut self, timeout: Duration) {
        self.signal("TERM");
        let status = self.wait_exit(timeout).expect("exits");
        assert!(status.success(), "{status:?}");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Access log entries written so far.
    pub fn access_log(&self) -> Vec<Value> {
        self.stdout()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["type"] == "access")
            .collect()
    }

    /// The access-log entry of the request with this id, once written, waiting up to
    /// `timeout` for it.
    pub fn access_line(&self, request_id: &str, timeout: Duration) -> Option<Value> {
        let mut line = None;
        wait_for(timeout, || {
            line = self
                .access_log()
                .into_iter()
                .find(|l| l["request_id"] == request_id);
            line.is_some()
        });
        line
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines `stream` yields, gathered by a thread as they come.
pub fn collect_lines(stream: impl Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// Sends raw bytes on a fresh connection and returns everything read until the server
/// closes or goes quiet for a moment.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(bytes).unwrap();
    read_until_closed(&mut stream, Duration::from_millis(1500))
}

/// Everything the peer sends until it closes, or until nothing came for `quiet`.
pub fn read_until_closed(stream: &mut TcpStream, quiet: Duration) -> String {
    stream.set_read_timeout(Some(quiet)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in raw HTTP/1 text.
pub fn raw_status(response: &str) -> Option<u16> {
    response.split(' ').nth(1)?.parse().ok()
}

/// What an origin read of one request: the head as sent, and the body.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub head: String,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    /// The request target of the request line.
    pub fn target(&self) -> &str {
        self.request_line().split(' ').nth(1).unwrap_or("")
    }

    /// The values of every field `name` (any case), in order.
    pub fn fields(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    pub fn field(&self, name: &str) -> Option<String> {
        self.fields(name).into_iter().next()
    }
}

/// A raw HTTP/1.1 origin that records every request it reads, head as sent and body
/// (it frames bodies itself, Content-Length or chunked, so it sees exactly what the
/// gateway forwarded), and answers each with what `respond` makes of it and the number
/// of requests before it: a raw response, `Content-Length` included. Connections stay
/// open. For tests that need exact fields on either side (framing, validators, dates,
/// 304s).
pub struct Origin {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Recorded>>>,
    accepted: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
}

impl Origin {
    pub fn start(respond: impl Fn(&Recorded, usize) -> String + Send + Sync + 'static) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (record, respond, count) = (seen.clone(), Arc::new(respond), accepted.clone());
        let end = ended.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::Relaxed);
                let (record, respond, end) = (record.clone(), respond.clone(), end.clone());
                std::thread::spawn(move || {
                    serve_recorded(conn, &record, &*respond);
                    end.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        Origin {
            addr,
            seen,
            accepted,
            ended,
        }
    }

    /// An origin that answers every request `200` with the body `ok`.
    pub fn recording() -> Origin {
        Origin::start(|_, _| http_response("200 OK", &[("content-type", "text/plain")], "ok"))
    }

    /// What reached this origin, in order.
    pub fn seen(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    /// How many connections this origin has accepted.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// How many of those the gateway still holds open.
    pub fn open_connections(&self) -> usize {
        self.connections() - self.ended.load(Ordering::Relaxed)
    }
}

fn serve_recorded(
    conn: TcpStream,
    record: &Mutex<Vec<Recorded>>,
    respond: &(dyn Fn(&Recorded, usize) -> String + Send + Sync),
) {
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let end = line == "\r\n" || line == "\n";
            head.push_str(&line);
            if end {
                break;
            }
        }
        let mut request = Recorded {
            head,
            body: Vec::new(),
        };
        let chunked = request
            .field("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                let mut size = String::new();
                if reader.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0u8; size + 2];
                if reader.read_exact(&mut chunk).is_err() {
                    return;
                }
                if size == 0 {
                    break;
                }
                request.body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(length) = request.field("content-length").and_then(|l| l.parse().ok()) {
            request.body = vec![0u8; length];
            if reader.read_exact(&mut request.body).is_err() {
                return;
            }
        }
        let answer = {
            let mut seen = record.lock().unwrap();
            seen.push(request.clone());
            respond(&request, seen.len() - 1)
        };
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// A raw HTTP/1.1 response: status line, the given fields, `Content-Length` and body.
pub fn http_response(status: &str, fields: &[(&str, &str)], body: &str) -> String {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (name, value) in fields {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    out
}

/// An HTTP date `offset_secs` from now (negative: in the past).
pub fn http_date(offset_secs: i64) -> String {
    let now = std::time::SystemTime::now();
    let at = if offset_secs >= 0 {
        now + Duration::from_secs(offset_secs as u64)
    } else {
        now - Duration::from_secs(offset_secs.unsigned_abs())
    };
    httpdate::fmt_http_date(at)
}

/// A throwaway `redis-server` on a loopback port, killed when dropped.
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
    tls: bool,
    log: tempfile::NamedTempFile,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(free_port())
    }

    /// Speaks TLS only, with `tls.crt`/`tls.key` from `certs` (see [`make_certificates`]).
    pub fn start_tls(certs: &std::path::Path) -> RedisServer {
        let port = free_port();
        let file = |name: &str| certs.join(name).to_str().unwrap().to_string();
        let mut server = Self::start_with(
            port,
            &[
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &file("tls.crt"),
                "--tls-key-file",
                &file("tls.key"),
                "--tls-ca-cert-file",
                &file("ca.pem"),
                "--tls-auth-clients",
                "no",
            ],
        );
        server.tls = true;
        server
    }

    /// Starts on `port` (e.g. the port of one that was stopped, to bring it back).
    pub fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &[])
    }

    /// Starts on `port` with more `redis-server` options.
    pub fn start_with(port: u16, options: &[&str]) -> RedisServer {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(options)
            .stdout(log.reopen().unwrap())
            .spawn()
            .expect("redis-server is installed (.ci/setup installs it)");
        let mut server = RedisServer {
            child,
            port,
            tls: false,
            log,
        };
        let mut exited = None;
        let listening = wait_for(Duration::from_secs(10), || {
            exited = server.child.try_wait().unwrap();
            exited.is_some() || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            listening && exited.is_none(),
            "redis-server does not listen on {port} (exit: {exited:?}); its log:\n{}",
            std::fs::read_to_string(server.log.path()).unwrap_or_default()
        );
        server
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the server and waits until its port refuses connections.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of primaries only, each its own `redis-server`, every hash slot
/// assigned and the cluster state `ok` before this returns.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    bus_ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(primaries: usize) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let bus_ports: Vec<u16> = (0..primaries).map(|_| free_port()).collect();
        let nodes: Vec<RedisServer> = bus_ports
            .iter()
            .map(|&bus_port| Self::start_node(&dir, free_port(), bus_port))
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        succeeds(
            std::process::Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addresses)
                .args(["--cluster-replicas", "0", "--cluster-yes"]),
        );
        let cluster = RedisCluster {
            nodes,
            bus_ports,
            dir,
        };
        cluster.wait_ok();
        cluster
    }

    /// A node whose cluster state lives in `dir`, so that it can be restarted into the
    /// same cluster. Its bus port is reserved like its client port: Redis's default,
    /// the client port + 10,000, lies in the kernel's ephemeral range, where any
    /// parallel test's socket may hold it and the node then exits at start.
    fn start_node(dir: &tempfile::TempDir, port: u16, bus_port: u16) -> RedisServer {
        let config = format!("nodes-{port}.conf");
        RedisServer::start_with(
            port,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus_port.to_string(),
                "--cluster-config-file",
                &config,
                "--dir",
                dir.path().to_str().unwrap(),
            ],
        )
    }

    fn wait_ok(&self) {
        assert!(
            wait_for(Duration::from_secs(20), || self.nodes.iter().all(|n| {
                n.cli(&["cluster", "info"]).contains("cluster_state:ok")
            })),
            "the cluster reaches state ok"
        );
    }

    pub fn kill(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Brings every node back on its port, into the cluster it was in (its data gone).
    pub fn restart(&mut self) {
        for (node, &bus_port) in self.nodes.iter_mut().zip(&self.bus_ports) {
            *node = Self::start_node(&self.dir, node.port, bus_port);
        }
        self.wait_ok();
    }

    /// The seed-node URLs, as a YAML flow list.
    pub fn urls_yaml(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        format!("[{}]", urls.join(", "))
    }
}

impl RedisServer {
    /// What `redis-cli` prints for `args` against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli is installed with redis-server");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// Runs `command` to its end; panics with what it printed unless it succeeded.
pub fn succeeds(command: &mut std::process::Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} does not run: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `openssl` with `args` in `dir`.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    succeeds(
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir),
    );
}

/// A CA (`ca.pem`) and a leaf it signed for `localhost` and 127.0.0.1 (`tls.crt`,
/// `tls.key`), written into `dir`.
pub fn make_certificates(dir: &std::path::Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tollgate test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "tls.key",
            "-out",
            "tls.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "tls.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}
