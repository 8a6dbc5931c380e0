//! The client connection beneath Pingora's HTTP layer: which protocol a plaintext
//! connection speaks, decided from its first bytes within `server.idle_timeout`, and how
//! long an HTTP/1 request head may take to arrive (`server.header_timeout`, against
//! slowloris clients).
//!
//! Pingora's own h2c detection reads the 24-byte HTTP/2 preface with no deadline, so a
//! whole request shorter than that (`GET / HTTP/1.0` and a blank line) waited for bytes
//! that never came, and its per-read timeout lets a head trickle in forever one byte at
//! a time. Here the protocol is decided as soon as the bytes read cannot be the preface,
//! and each HTTP/1 connection is wrapped in a [`ClientStream`] that times the head of
//! every request from its first bytes (from the first read that waits for more of it:
//! a head that arrives whole costs no clock read), and the wait for the next request
//! (`server.idle_timeout`) from the answer, both on one timer the connection keeps:
//! Pingora's keep-alive wait would make, box, register and cancel a timer per request.
//! The proxy marks when a head is complete ([`head_complete`]) and when a request is
//! answered ([`request_done`]).

use crate::gateway::Gateway;
use crate::placement::{Placed, Placement};
use crate::problem::{Code, Problem};
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    Digest, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The listener's app: hands each connection to the HTTP/1 app (which also serves
/// HTTP/2 negotiated by TLS ALPN) or, when it starts with the HTTP/2 preface, to the
/// h2c app.
pub(crate) struct Connections<A> {
    pub(crate) http1: Arc<A>,
    pub(crate) h2c: Arc<A>,
    pub(crate) gateway: Arc<Gateway>,
    /// Which thread serves each connection, under `server.threads` above 1.
    pub(crate) placement: Option<Arc<Placement>>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Connections<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let (idle, header_timeout) = {
            let policy = self.gateway.policy.load();
            (policy.server.idle_timeout, policy.server.header_timeout)
        };
        let head_clock =
            || HeadClock::started(header_timeout, &self.gateway.metrics.header_timeouts);
        let placed = self.placement.as_ref().and_then(|p| p.arrived());
        if stream.get_ssl_digest().is_some() {
            if stream.selected_alpn_proto() == Some(ALPN::H2) {
                let _placed = placed;
                return self.http1.process_new(stream, shutdown).await;
            }
            let stream = ClientStream::new(stream, Vec::new(), Some(head_clock()), placed);
            return self.http1.process_new(Box::new(stream), shutdown).await;
        }
        let mut first = [0u8; H2_PREFACE.len()];
        let mut read = 0;
        let deadline = Instant::now() + idle;
        let h2c = loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut first[read..])).await {
                Ok(Ok(n)) if n > 0 => read += n,
                // Nothing within the idle timeout, or the client left.
                _ => return None,
            }
            if first[..read] != H2_PREFACE[..read] {
                break false;
            }
            if read == H2_PREFACE.len() {
                break true;
            }
        };
        let first = first[..read].to_vec();
        if h2c {
            let stream = ClientStream::new(stream, first, None, placed);
            self.h2c.process_new(Box::new(stream), shutdown).await
        } else {
            let stream = ClientStream::new(stream, first, Some(head_clock()), placed);
            self.http1.process_new(Box::new(stream), shutdown).await
        }
    }

    async fn cleanup(&self) {
        self.http1.cleanup().await;
        self.h2c.cleanup().await;
    }

    fn runtime_for_new_connection(&self) -> Option<tokio::runtime::Handle> {
        self.placement.as_ref()?.runtime_for_new_connection()
    }
}

/// Where a connection is in its current request, as far as its deadlines go.
/// Answered (the wait for the next request is timed from then), and no read has found
/// the socket empty yet: the idle timer is not armed.
const IDLE: u8 = 0;
/// The head's deadline runs.
const HEAD: u8 = 1;
const PAST_HEAD: u8 = 2;
/// Answered, and a read found nothing: the idle deadline runs.
const WAITING: u8 = 3;
/// Bytes of a head arrived and no read has waited for more yet: the head's deadline is
/// set by the first that does. A head that arrives whole (nearly every one) never reads
/// the clock for it; one that does not starts its clock microseconds after its first
/// bytes, in the same poll of the connection.
const HEAD_ARRIVING: u8 = 4;

/// A client connection: the bytes protocol detection read ahead, served first, then the
/// socket; on HTTP/1, the head deadline.
#[derive(Debug)]
pub(crate) struct ClientStream {
    inner: Stream,
    read_ahead: Vec<u8>,
    replayed: usize,
    head: Option<HeadClock>,
    placed: Option<Placed>,
}

#[derive(Debug)]
struct HeadClock {
    limit: Duration,
    phase: AtomicU8,
    /// `server.idle_timeout` in nanoseconds as of the last request, or 0 when the wait
    /// between requests is not timed here (Pingora's own keep-alive wait applies).
    idle: AtomicU64,
    /// When the connection's first head started: what `answered` counts from.
    base: Instant,
    /// When the last request was answered, in nanoseconds after `base`: the wait for the
    /// next request is timed from there, with the clock read the request's own log took.
    answered: AtomicU64,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    timed_out: IntCounter,
}

impl HeadClock {
    /// A clock for a head whose first byte has just arrived.
    fn started(limit: Duration, timed_out: &IntCounter) -> HeadClock {
        let now = Instant::now();
        HeadClock {
            limit,
            phase: AtomicU8::new(HEAD),
            idle: AtomicU64::new(0),
            base: now,
            answered: AtomicU64::new(0),
            deadline: now + limit,
            timer: None,
            timed_out: timed_out.clone(),
        }
    }

    /// Between requests, nothing to read yet: whether the wait for the next request has
    /// lasted `server.idle_timeout`, starting it on the first call and registering the
    /// wake-up at its end. Never when that wait is not timed here.
    fn idle_wait_over(&mut self, cx: &mut Context<'_>) -> bool {
        let idle = self.idle.load(Ordering::Relaxed);
        if idle == 0 {
            return false;
        }
        if self.phase.load(Ordering::Relaxed) == IDLE {
            self.phase.store(WAITING, Ordering::Relaxed);
            let answered = Duration::from_nanos(self.answered.load(Ordering::Relaxed));
            self.deadline = self.base + answered + Duration::from_nanos(idle);
        }
        self.expired(cx)
    }

    /// The head's bytes stopped before its end: its deadline starts now unless it runs.
    fn head_waits(&mut self, cx: &mut Context<'_>) -> bool {
        if self.phase.load(Ordering::Relaxed) == HEAD_ARRIVING {
            self.phase.store(HEAD, Ordering::Relaxed);
            self.deadline = Instant::now() + self.limit;
        }
        self.expired(cx)
    }

    /// Whether the current deadline passed, registering the wake-up when not. A later
    /// deadline than the timer's (each idle wait's) moves the registered timer with
    /// one compare-and-swap.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        std::future::Future::poll(timer.as_mut(), cx).is_ready()
    }
}

impl ClientStream {
    fn new(
        inner: Stream,
        read_ahead: Vec<u8>,
        head: Option<HeadClock>,
        placed: Option<Placed>,
    ) -> ClientStream {
        ClientStream {
            inner,
            read_ahead,
            replayed: 0,
            head,
            placed,
        }
    }

    pub(crate) fn placed(&self) -> Option<&Placed> {
        self.placed.as_ref()
    }

    pub(crate) fn placed_mut(&mut self) -> Option<&mut Placed> {
        self.placed.as_mut()
    }

    /// Moves the connection to `runtime`'s I/O driver and timers, between two requests;
    /// `false` when it cannot move (TLS, bytes in Pingora's L4 buffers).
    pub(crate) fn move_to_runtime(&mut self, runtime: &tokio::runtime::Handle) -> io::Result<bool> {
        let Some(socket) = self
            .inner
            .as_any_mut()
            .downcast_mut::<pingora::protocols::l4::stream::Stream>()
        else {
            return Ok(false);
        };
        if !socket.move_to_runtime(runtime)? {
            return Ok(false);
        }
        if let Some(head) = &mut self.head {
            head.timer = None;
        }
        Ok(true)
    }
}

/// The whole 408 answer, written straight to the socket: the request never reached the
/// pipeline, so there is no session to answer through.
fn header_timeout_answer() -> &'static [u8] {
    static ANSWER: OnceLock<Vec<u8>> = OnceLock::new();
    ANSWER.get_or_init(|| {
        let body = Problem::new(
            Code::RequestTimeout,
            "the request head did not arrive within server.header_timeout",
        )
        .body();
        let mut answer = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n\
             content-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        answer
    })
}

fn client_stream(session: &pingora::proxy::Session) -> Option<&ClientStream> {
    session
        .as_ref()
        .stream()?
        .as_any()
        .downcast_ref::<ClientStream>()
}

/// The request head has been read: the head deadline stops. Returns whether this
/// connection will time the wait for its next request, `idle` at most, itself (an
/// HTTP/1 connection does; Pingora's keep-alive wait is then told to wait without end).
pub(crate) fn head_complete(session: &pingora::proxy::Session, idle: Duration) -> bool {
    let Some(head) = client_stream(session).and_then(|s| s.head.as_ref()) else {
        return false;
    };
    head.phase.store(PAST_HEAD, Ordering::Relaxed);
    // Nanoseconds fit in 64 bits for 584 years; a zero would mean "not timed here".
    let nanos = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX).max(1);
    head.idle.store(nanos, Ordering::Relaxed);
    true
}

/// The request was answered at `now`: the next bytes start the next head, and the wait
/// for them is timed from `now`.
pub(crate) fn request_done(session: &pingora::proxy::Session, now: std::time::Instant) {
    let Some(head) = client_stream(session).and_then(|s| s.head.as_ref()) else {
        return;
    };
    let since_base = Instant::from_std(now).saturating_duration_since(head.base);
    let nanos = u64::try_from(since_base.as_nanos()).unwrap_or(u64::MAX);
    head.answered.store(nanos, Ordering::Relaxed);
    head.phase.store(IDLE, Ordering::Relaxed);
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.read_ahead.len() {
            let rest = &this.read_ahead[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.read_ahead.len() {
                this.read_ahead = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let Some(head) = &mut this.head else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let filled = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        match head.phase.load(Ordering::Relaxed) {
            IDLE | WAITING if buf.filled().len() > filled => {
                head.phase.store(HEAD_ARRIVING, Ordering::Relaxed);
            }
            IDLE | WAITING if result.is_pending() && head.idle_wait_over(cx) => {
                // Nothing read: the end of the stream, which closes the kept-alive
                // connection quietly, as Pingora's own keep-alive timeout does.
                return Poll::Ready(Ok(()));
            }
            HEAD | HEAD_ARRIVING if result.is_pending() && head.head_waits(cx) => {
                head.phase.store(PAST_HEAD, Ordering::Relaxed);
                head.timed_out.inc();
                // Best effort: a socket that cannot take these bytes at once is closed
                // without them.
                let answer = header_timeout_answer();
                if let Poll::Ready(Ok(n)) = Pin::new(&mut this.inner).poll_write(cx, answer) {
                    if n == answer.len() {
                        let _ = Pin::new(&mut this.inner).poll_flush(cx);
                    }
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head not received within server.header_timeout",
                )));
            }
            _ => {}
        }
        result
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }

    fn take_session_digest(&mut self) -> Option<Box<Digest>> {
        self.inner.take_session_digest()
    }

    fn keep_session_digest(&mut self, digest: Box<Digest>) {
        self.inner.keep_session_digest(digest)
    }
}

/// No peeking: the read-ahead bytes are served by `poll_read`, and the h2c app, told
/// peeking is unsupported, keeps to HTTP/2 as it was asked to.
impl Peek for ClientStream {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_408_answer_is_problem_json_with_its_length() {
        let answer = std::str::from_utf8(header_timeout_answer()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 408 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let doc: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(doc["error"], "request_timeout");
    }

    // Pingora's HTTP/1 sessions give their digest back to the connection for the next
    // request's session: through the wrapper, or each request builds one again.
    #[tokio::test]
    async fn a_sessions_digest_is_kept_on_the_connection_beneath() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let inner: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
        let mut stream = ClientStream::new(inner, Vec::new(), None, None);
        let digest = Box::new(Digest::default());
        let at = &*digest as *const Digest;
        stream.keep_session_digest(digest);
        let taken = stream
            .take_session_digest()
            .expect("kept beneath the wrapper");
        assert_eq!(&*taken as *const Digest, at);
        assert!(stream.take_session_digest().is_none());
    }
}
