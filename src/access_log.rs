//! One JSON line per request (SPEC §3 `access_log`), field names after Envoy's JSON
//! access log, written off the request path the way nginx's buffered log is.
//!
//! A request renders its line straight into bytes (no JSON value tree) and hands it to
//! a bounded queue; it never waits on the log. A writer thread drains the queue into a
//! buffer and writes it when it holds `access_log.buffer` bytes or its oldest line is
//! `access_log.flush` old, to stdout or `access_log.path` (reopened on `SIGUSR1`, for
//! logrotate). When the queue is full a line is dropped and counted
//! (`tollgate_access_log_dropped_total`, `/status`). A clean stop flushes what is
//! queued ([`Sink::flush`]). `TOLLGATE_LOG` still governs the lines through the
//! `access` target (`TOLLGATE_LOG=info,access=off`).

use crate::proxy::ctx::RequestCtx;
use pingora::proxy::Session;
use prometheus::IntCounter;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Lines the queue holds between two drains of the writer (every [`TICK`]): room for
/// 800,000 requests a second.
const QUEUE_LINES: usize = 16_384;
/// How often the writer drains the queue; a request never wakes it.
const TICK: Duration = Duration::from_millis(20);

/// Where and how the writer writes; read from the policy in force at every tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub buffer: usize,
    pub flush: Duration,
    /// `None`: standard output.
    pub path: Option<PathBuf>,
}

/// The request side of the log: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Sink {
    lines: SyncSender<Vec<u8>>,
    dropped: IntCounter,
    control: Arc<Control>,
}

#[derive(Default)]
struct Control {
    reopen: AtomicBool,
    /// Flush requests: each is answered once everything queued before it is written.
    flushes: Mutex<Vec<mpsc::Sender<()>>>,
}

impl Sink {
    /// Starts the writer thread. `output` tells it, at every tick, where to write.
    pub fn start(
        dropped: IntCounter,
        output: impl Fn() -> Output + Send + 'static,
    ) -> std::io::Result<Sink> {
        let (lines, queue) = mpsc::sync_channel(QUEUE_LINES);
        let control = Arc::new(Control::default());
        let writer = Writer {
            queue,
            control: control.clone(),
            output,
            current: None,
            target: Target::Stdout,
            pending: Vec::new(),
            oldest: None,
        };
        std::thread::Builder::new()
            .name("access log".into())
            .spawn(move || writer.run())?;
        Ok(Sink {
            lines,
            dropped,
            control,
        })
    }

    /// Queues one line; drops (and counts) it when the queue is full.
    pub fn send(&self, line: Vec<u8>) {
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Reopens `access_log.path` at the next tick (logrotate's `postrotate`).
    pub fn reopen(&self) {
        self.control.reopen.store(true, Ordering::Relaxed);
    }

    /// Writes everything queued so far; waits at most `timeout`. For a clean stop.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = mpsc::channel();
        self.control
            .flushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(done);
        wait.recv_timeout(timeout).is_ok()
    }
}

enum Target {
    Stdout,
    File(File),
}

struct Writer<F> {
    queue: Receiver<Vec<u8>>,
    control: Arc<Control>,
    output: F,
    current: Option<Output>,
    target: Target,
    pending: Vec<u8>,
    /// When the oldest line in `pending` was taken from the queue.
    oldest: Option<Instant>,
}

impl<F: Fn() -> Output> Writer<F> {
    fn run(mut self) {
        loop {
            let output = (self.output)();
            let reopen = self.control.reopen.swap(false, Ordering::Relaxed);
            if reopen || self.current.as_ref().map(|o| &o.path) != Some(&output.path) {
                self.write_pending();
                self.open(&output);
            }
            let flushes = std::mem::take(
                &mut *self
                    .control
                    .flushes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            let open = self.drain(&output);
            let due = self.oldest.is_some_and(|t| t.elapsed() >= output.flush);
            if due || !flushes.is_empty() || !open {
                self.write_pending();
            }
            for done in flushes {
                let _ = done.send(());
            }
            self.current = Some(output);
            if !open {
                return;
            }
            std::thread::sleep(TICK);
        }
    }

    /// Moves what is queued into the buffer, writing whenever it is full; `false` when
    /// every sink is gone.
    fn drain(&mut self, output: &Output) -> bool {
        loop {
            match self.queue.try_recv() {
                Ok(line) => {
                    self.oldest.get_or_insert_with(Instant::now);
                    self.pending.extend_from_slice(&line);
                    if self.pending.len() >= output.buffer {
                        self.write_pending();
                    }
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn open(&mut self, output: &Output) {
        self.target = match &output.path {
            None => Target::Stdout,
            Some(path) => match File::options().create(true).append(true).open(path) {
                Ok(file) => Target::File(file),
                Err(e) => {
                    tracing::error!(
                        "cannot open the access log {}: {e}; writing to stdout",
                        path.display()
                    );
                    Target::Stdout
                }
            },
        };
    }

    fn write_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let written = match &mut self.target {
            Target::Stdout => std::io::stdout().lock().write_all(&self.pending),
            Target::File(file) => file.write_all(&self.pending),
        };
        if let Err(e) = written {
            tracing::error!("access log write failed: {e}");
        }
        self.pending.clear();
        self.oldest = None;
    }
}

/// Renders this request's line and queues it.
pub fn write(sink: &Sink, session: &Session, ctx: &RequestCtx, status: u16, elapsed: Duration) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    sink.send(render(session, ctx, status, elapsed));
}

fn render(session: &Session, ctx: &RequestCtx, status: u16, elapsed: Duration) -> Vec<u8> {
    let req = session.req_header();
    let route = ctx.route();
    let mut line = Line::new();
    line.key("timestamp");
    timestamp(&mut line.buf, SystemTime::now());
    line.str("type", Some("access"));
    line.str(
        "request_id",
        ctx.request_id.as_ref().and_then(|v| v.to_str().ok()),
    );
    match ctx.client_ip {
        Some(ip) => line.ip("client_ip", ip),
        None => line.str("client_ip", None),
    }
    line.str("method", Some(req.method.as_str()));
    line.str("authority", crate::routing::request_host(req));
    line.str("path", Some(req.uri.path()));
    line.str("protocol", Some(protocol(req.version)));
    line.int("status", u64::from(status));
    line.str("route", route.map(|r| &*r.name));
    line.str("upstream", ctx.pool.as_ref().map(|p| &*p.name));
    let upstream_addr = match (&ctx.pool, ctx.server) {
        (Some(pool), Some(i)) => Some(&*pool.servers[i].label),
        _ => None,
    };
    line.str("upstream_addr", upstream_addr);
    line.str("user", ctx.principal.as_ref().map(|p| &*p.user));
    line.str("tier", ctx.principal.as_ref().map(|p| &*p.tier));
    match (&ctx.limited_by, ctx.answered, ctx.cache_outcome) {
        (Some(rule), _, _) => {
            line.key("reason");
            line.buf.extend_from_slice(b"\"rate_limited:");
            escape_into(&mut line.buf, rule);
            line.buf.push(b'"');
        }
        (None, Some(code), _) => line.str("reason", Some(code.as_str())),
        (None, None, Some(crate::cache::Outcome::Hit)) => line.str("reason", Some("cache_hit")),
        (None, None, Some(crate::cache::Outcome::Stale)) => line.str("reason", Some("cache_stale")),
        (None, None, _) => line.str("reason", None),
    }
    line.str("cache", ctx.cache_outcome.map(|o| o.header()));
    line.key("shadow_limited");
    line.buf.push(b'[');
    for (i, rule) in ctx.shadow_limited.iter().enumerate() {
        if i > 0 {
            line.buf.push(b',');
        }
        line.string(rule);
    }
    line.buf.push(b']');
    line.int("bytes_received", session.body_bytes_read() as u64);
    line.int("bytes_sent", session.body_bytes_sent() as u64);
    line.millis("duration_ms", Some(elapsed));
    line.millis("upstream_duration_ms", ctx.upstream_duration);
    line.key("request_headers");
    line.buf.push(b'{');
    let redact = &ctx.policy.access_log.redact;
    // A name's values come one after another: repeated fields become one member, their
    // values joined as HTTP would join them.
    let mut previous: Option<&http::HeaderName> = None;
    for (name, value) in req.headers.iter() {
        if previous == Some(name) {
            if !redact.contains(name) {
                line.buf.pop();
                line.buf.extend_from_slice(b", ");
                escape_into(&mut line.buf, &lossy(value.as_bytes()));
                line.buf.push(b'"');
            }
            continue;
        }
        if previous.is_some() {
            line.buf.push(b',');
        }
        previous = Some(name);
        line.buf.push(b'"');
        escape_into(&mut line.buf, name.as_str());
        line.buf.extend_from_slice(b"\":\"");
        if redact.contains(name) {
            line.buf.extend_from_slice(b"[redacted]");
        } else {
            escape_into(&mut line.buf, &lossy(value.as_bytes()));
        }
        line.buf.push(b'"');
    }
    line.buf.extend_from_slice(b"}}\n");
    line.buf
}

fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// A JSON object written member by member into bytes.
struct Line {
    buf: Vec<u8>,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: Vec::with_capacity(768),
        }
    }

    fn key(&mut self, key: &str) {
        self.buf.push(if self.buf.is_empty() { b'{' } else { b',' });
        self.buf.push(b'"');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    fn string(&mut self, value: &str) {
        self.buf.push(b'"');
        escape_into(&mut self.buf, value);
        self.buf.push(b'"');
    }

    fn str(&mut self, key: &str, value: Option<&str>) {
        self.key(key);
        match value {
            Some(value) => self.string(value),
            None => self.buf.extend_from_slice(b"null"),
        }
    }

    fn ip(&mut self, key: &str, ip: IpAddr) {
        self.key(key);
        self.buf.push(b'"');
        match ip {
            IpAddr::V4(v4) => {
                let mut digits = itoa::Buffer::new();
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.buf.push(b'.');
                    }
                    self.buf.extend_from_slice(digits.format(octet).as_bytes());
                }
            }
            IpAddr::V6(v6) => {
                write!(self.buf, "{v6}").expect("writing to a Vec cannot fail");
            }
        }
        self.buf.push(b'"');
    }

    fn int(&mut self, key: &str, value: u64) {
        self.key(key);
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// Milliseconds with microsecond precision, as a JSON number (`12.345`), or null.
    fn millis(&mut self, key: &str, value: Option<Duration>) {
        let Some(value) = value else {
            self.str(key, None);
            return;
        };
        let micros = value.as_micros().min(u128::from(u64::MAX)) as u64;
        self.int(key, micros / 1000);
        let fraction = micros % 1000;
        self.buf.extend_from_slice(&[
            b'.',
            b'0' + (fraction / 100) as u8,
            b'0' + (fraction / 10 % 10) as u8,
            b'0' + (fraction % 10) as u8,
        ]);
    }
}

/// A header value as text, invalid UTF-8 replaced. `str::from_utf8` first: it checks
/// ASCII a word at a time, where `from_utf8_lossy` walks every byte.
fn lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Appends `text` as the inside of a JSON string (RFC 8259 §7): quotation mark,
/// reverse solidus and control characters escaped, everything else as it is.
fn escape_into(buf: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    // Most values need no escaping: skip eight bytes at a time while none does.
    let clean = clean_prefix(bytes);
    buf.extend_from_slice(&bytes[..clean]);
    let mut start = clean;
    for (i, &byte) in bytes.iter().enumerate().skip(clean) {
        let unicode;
        let escaped: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                unicode = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(byte >> 4)],
                    HEX[usize::from(byte & 0xf)],
                ];
                &unicode
            }
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        buf.extend_from_slice(escaped);
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

/// How many leading bytes need no escaping, in whole words of eight (SWAR: a byte is
/// flagged when it is below 0x20, `"` or `\\`).
fn clean_prefix(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut clean = 0;
    for word in bytes.chunks_exact(8) {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
        let quote = has_zero(x ^ (ONES * u64::from(b'"')));
        let backslash = has_zero(x ^ (ONES * u64::from(b'\\')));
        if control | quote | backslash != 0 {
            break;
        }
        clean += 8;
    }
    clean
}

/// `"YYYY-MM-DDTHH:MM:SS.mmmZ"`; the seconds part is formatted once a second per thread.
fn timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != secs {
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            *second = (secs, text.trim_end_matches('Z').to_string());
        }
        buf.push(b'"');
        buf.extend_from_slice(second.1.as_bytes());
    });
    let millis = since_epoch.subsec_millis();
    buf.extend_from_slice(&[
        b'.',
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
        b'"',
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_never_skips_a_byte_that_needs_escaping() {
        for special in [b'"', b'\\', b'\n', 0u8, 0x1f, 0x7f, 0x80, b' '] {
            for at in 0..17 {
                let mut bytes = vec![b'a'; 17];
                bytes[at] = special;
                let clean = clean_prefix(&bytes);
                let needs = special < 0x20 || special == b'"' || special == b'\\';
                if needs {
                    assert!(clean <= at, "{special:#x} at {at}: {clean}");
                } else {
                    assert_eq!(clean, 16, "{special:#x} at {at}");
                }
            }
        }
    }

    #[test]
    fn lines_are_json_objects() {
        let mut line = Line::new();
        line.str("a", Some("quote \" and\nnewline"));
        line.str("b", None);
        line.millis("n", Some(Duration::from_micros(1_500)));
        line.int("i", 42);
        line.ip("v4", "10.0.0.255".parse().unwrap());
        line.ip("v6", "2001:db8::1".parse().unwrap());
        line.str("c", Some("tab\t bell\u{7} back\\slash é"));
        line.key("t");
        timestamp(
            &mut line.buf,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_042),
        );
        line.buf.push(b'}');
        let doc: serde_json::Value = serde_json::from_slice(&line.buf).unwrap();
        assert_eq!(doc["a"], "quote \" and\nnewline");
        assert!(doc["b"].is_null());
        assert_eq!(doc["n"], 1.5);
        assert_eq!(doc["i"], 42);
        assert_eq!(doc["v4"], "10.0.0.255");
        assert_eq!(doc["v6"], "2001:db8::1");
        assert_eq!(doc["c"], "tab\t bell\u{7} back\\slash é");
        assert_eq!(doc["t"], "2023-11-14T22:13:20.042Z");
    }

    fn sink_to(path: PathBuf, buffer: usize, flush: Duration) -> Sink {
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        Sink::start(dropped, move || Output {
            buffer,
            flush,
            path: Some(path.clone()),
        })
        .unwrap()
    }

    #[test]
    fn lines_reach_the_file_by_flush_time_and_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let sink = sink_to(path.clone(), 1 << 20, Duration::from_secs(3600));
        sink.send(b"{\"n\":1}\n".to_vec());
        std::thread::sleep(TICK * 3);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap_or_default(),
            "",
            "neither full nor due"
        );
        assert!(sink.flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":1}\n");

        let due = sink_to(dir.path().join("due.log"), 1 << 20, Duration::ZERO);
        due.send(b"x\n".to_vec());
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(dir.path().join("due.log")).unwrap_or_default() != "x\n" {
            assert!(Instant::now() < deadline, "never written");
            std::thread::sleep(TICK);
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        // The writer asks for its output at every tick: holding `gate` stalls it, so
        // the queue fills whatever the machine's speed.
        let gate = Arc::new(Mutex::new(()));
        let stalled = gate.lock().unwrap();
        let writer_gate = gate.clone();
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        let sink = Sink::start(dropped, move || {
            drop(writer_gate.lock().unwrap_or_else(|e| e.into_inner()));
            Output {
                buffer: 1 << 20,
                flush: Duration::from_secs(3600),
                path: Some(path.clone()),
            }
        })
        .unwrap();
        for _ in 0..QUEUE_LINES * 4 {
            sink.send(b"x\n".to_vec());
        }
        assert_eq!(sink.dropped(), (QUEUE_LINES * 3) as u64);
        drop(stalled);
        assert!(sink.flush(Duration::from_secs(5)));
        let written = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
        assert_eq!(
            written.lines().count() as u64 + sink.dropped(),
            (QUEUE_LINES * 4) as u64,
            "every line is written or counted"
        );
    }
}
