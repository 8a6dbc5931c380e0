//! Spans to an OTLP collector (HTTP, protobuf), off the request path: a request hands its
//! spans to a bounded queue and never waits; a thread sends them in batches of up to 512,
//! at least once a second. A full queue or a failed export loses spans, counted in
//! `tollgate_trace_spans_dropped_total`, never delays a request.

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;
use std::borrow::Cow;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const QUEUE: usize = 4_096;
const BATCH: usize = 512;
const EVERY: Duration = Duration::from_secs(1);

/// Where spans go; the exporter is rebuilt when a reload changes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Destination {
    /// The collector's `/v1/traces` URL.
    pub(crate) url: String,
    pub(crate) timeout: Duration,
    pub(crate) service_name: String,
}

/// One upstream attempt of a request whose trace is recorded.
#[derive(Debug, Clone)]
pub(crate) struct AttemptSpan {
    pub(crate) span: u64,
    pub(crate) upstream: Arc<str>,
    pub(crate) server: Arc<str>,
    /// 0 for the first try.
    pub(crate) retry: u32,
    pub(crate) start: Instant,
    /// When the outcome was known, and what it was: a status code or an error.
    pub(crate) end: Option<(Instant, Cow<'static, str>)>,
}

/// The gateway's server span, as the proxy saw the request.
pub(crate) struct ServerSpan<'a> {
    pub(crate) trace: &'a super::TraceContext,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) route: Option<&'a str>,
    pub(crate) status: u16,
    pub(crate) start: Instant,
    pub(crate) end: Instant,
    pub(crate) tier: Option<&'a str>,
    /// Why the gateway answered itself (`rate_limited:RULE`, `cache_hit`, ...).
    pub(crate) reason: Option<Cow<'a, str>>,
    pub(crate) cache: Option<&'static str>,
}

enum Message {
    Span(Box<SpanData>),
    Flush(mpsc::Sender<()>),
}

/// The request side: cheap to clone, never blocks.
#[derive(Clone)]
pub(crate) struct SpanSink {
    queue: SyncSender<Message>,
    dropped: IntCounter,
}

impl SpanSink {
    /// Starts the exporting thread; `destination` tells it, at every batch, where to send
    /// (`None`: the policy has no `tracing` section any more, and queued spans are dropped).
    pub(crate) fn start(
        dropped: IntCounter,
        destination: impl Fn() -> Option<Destination> + Send + 'static,
    ) -> std::io::Result<SpanSink> {
        let (queue, received) = mpsc::sync_channel(QUEUE);
        let exporter = Exporter {
            received,
            destination,
            dropped: dropped.clone(),
            current: None,
            failing: false,
        };
        std::thread::Builder::new()
            .name("span export".into())
            .spawn(move || exporter.run())?;
        Ok(SpanSink { queue, dropped })
    }

    /// Queues a request's spans: the server span and one client span per attempt.
    pub(crate) fn send(&self, server: &ServerSpan<'_>, attempts: &[AttemptSpan]) {
        // Every time of the request is monotonic and turned into wall-clock time against
        // one reading of both clocks: a span then never starts before its parent, whatever
        // the wall clock does meanwhile.
        let (wall, now) = (SystemTime::now(), Instant::now());
        let wall_clock = |at: Instant| {
            let ago = now.saturating_duration_since(at);
            wall.checked_sub(ago).unwrap_or(wall)
        };
        let trace = server.trace;
        let trace_id = TraceId::from_hex(trace.trace_id()).unwrap_or(TraceId::INVALID);
        let flags = if trace.sampled() {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let context = |span: u64| {
            SpanContext::new(
                trace_id,
                SpanId::from_bytes(span.to_be_bytes()),
                flags,
                false,
                TraceState::default(),
            )
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", server.method.to_string()),
            KeyValue::new("url.path", server.path.to_string()),
            KeyValue::new("http.response.status_code", i64::from(server.status)),
        ];
        if let Some(route) = server.route {
            attributes.push(KeyValue::new("http.route", route.to_string()));
        }
        if let Some(tier) = server.tier {
            attributes.push(KeyValue::new("tollgate.tier", tier.to_string()));
        }
        if let Some(reason) = &server.reason {
            attributes.push(KeyValue::new("tollgate.reason", reason.to_string()));
        }
        if let Some(cache) = server.cache {
            attributes.push(KeyValue::new("tollgate.cache", cache));
        }
        let name = format!("{} {}", server.method, server.route.unwrap_or("unmatched"));
        self.queue_span(SpanData {
            span_context: context(trace.span),
            parent_span_id: trace
                .parent
                .map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.to_be_bytes())),
            parent_span_is_remote: trace.parent.is_some(),
            span_kind: SpanKind::Server,
            name: name.into(),
            start_time: wall_clock(server.start),
            end_time: wall_clock(server.end),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: status(server.status >= 500),
            instrumentation_scope: scope(),
        });
        for attempt in attempts {
            let (end, outcome) = attempt
                .end
                .clone()
                .unwrap_or((server.end, Cow::Borrowed("unfinished")));
            let failed = !outcome.starts_with(['1', '2', '3', '4']);
            self.queue_span(SpanData {
                span_context: context(attempt.span),
                parent_span_id: SpanId::from_bytes(trace.span.to_be_bytes()),
                parent_span_is_remote: false,
                span_kind: SpanKind::Client,
                name: format!("{} upstream {}", server.method, attempt.upstream).into(),
                start_time: wall_clock(attempt.start),
                end_time: wall_clock(end),
                attributes: vec![
                    KeyValue::new("tollgate.upstream", attempt.upstream.to_string()),
                    KeyValue::new("server.address", attempt.server.to_string()),
                    KeyValue::new("tollgate.retry", i64::from(attempt.retry)),
                    KeyValue::new("tollgate.outcome", outcome.into_owned()),
                ],
                dropped_attributes_count: 0,
                events: SpanEvents::default(),
                links: SpanLinks::default(),
                status: status(failed),
                instrumentation_scope: scope(),
            });
        }
    }

    fn queue_span(&self, span: SpanData) {
        match self.queue.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Exports everything queued so far; waits at most `timeout`. For a clean stop.
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = mpsc::channel();
        self.queue.try_send(Message::Flush(done)).is_ok() && wait.recv_timeout(timeout).is_ok()
    }
}

fn status(failed: bool) -> Status {
    if failed {
        Status::error("")
    } else {
        Status::Unset
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("tollgate")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

struct Exporter<F> {
    received: Receiver<Message>,
    destination: F,
    dropped: IntCounter,
    current: Option<(Destination, opentelemetry_otlp::SpanExporter)>,
    /// Logged once per outage.
    failing: bool,
}

impl<F: Fn() -> Option<Destination>> Exporter<F> {
    fn run(mut self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!("span export cannot start: {e}");
                return;
            }
        };
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        let mut oldest: Option<Instant> = None;
        loop {
            let wait = oldest.map_or(EVERY, |t| EVERY.saturating_sub(t.elapsed()));
            match self.received.recv_timeout(wait) {
                Ok(Message::Span(span)) => {
                    oldest.get_or_insert_with(Instant::now);
                    batch.push(*span);
                }
                Ok(Message::Flush(done)) => flushes.push(done),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let due = oldest.is_some_and(|t| t.elapsed() >= EVERY);
            if batch.len() >= BATCH || due || !flushes.is_empty() {
                if !batch.is_empty() {
                    let spans = std::mem::take(&mut batch);
                    runtime.block_on(self.export(spans));
                }
                oldest = None;
                flushes.drain(..).for_each(|done| {
                    let _ = done.send(());
                });
            }
        }
    }

    async fn export(&mut self, spans: Vec<SpanData>) {
        let count = spans.len() as u64;
        let Some(destination) = (self.destination)() else {
            self.dropped.inc_by(count);
            return;
        };
        if self.current.as_ref().map(|(d, _)| d) != Some(&destination) {
            match build(&destination) {
                Ok(exporter) => self.current = Some((destination, exporter)),
                Err(e) => {
                    tracing::warn!(url = %destination.url, "span exporter not built: {e}");
                    self.dropped.inc_by(count);
                    return;
                }
            }
        }
        let (destination, exporter) = self.current.as_ref().expect("built above");
        match exporter.export(spans).await {
            Ok(()) => {
                if std::mem::replace(&mut self.failing, false) {
                    tracing::info!(url = %destination.url, "span export works again");
                }
            }
            Err(e) => {
                self.dropped.inc_by(count);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(url = %destination.url, "span export failed, spans dropped until it works: {e}");
                }
            }
        }
    }
}

fn build(destination: &Destination) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(destination.url.clone())
        .with_timeout(destination.timeout)
        .build()
        .map_err(|e| e.to_string())?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(destination.service_name.clone())
            .build(),
    );
    Ok(exporter)
}
