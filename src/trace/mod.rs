//! W3C Trace Context (SPEC §9): a request's `traceparent` is continued — same trace id
//! and flags, the gateway's own span id as the parent the upstream sees — or, when
//! absent or invalid, a trace is started. `tracestate` travels with a continued trace and
//! is dropped with an invalid one, as the recommendation requires.
//!
//! With a `tracing` section, spans are exported over OTLP ([`export`]): a trace the
//! gateway starts is sampled at `tracing.sample`, a continued one as its parent says.

pub(crate) mod export;

use crate::config::TracingConfig;
use crate::digest::write_hex;
use crate::forwarding::Carried;
use crate::policy::compile::Compile;
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;

// Prebuilt names: looked up without a parse, inserted without a copy.
pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A traceparent is 55 bytes: `00-` trace id (32 hex) `-` parent id (16 hex) `-` flags.
const LEN: usize = 55;
const SAMPLED: u8 = 0x01;

/// The compiled `tracing` section.
#[derive(Debug)]
pub(crate) struct Tracing {
    /// The share of started traces that are sampled.
    pub(crate) sample: f64,
    pub(crate) sample_errors: bool,
    pub(crate) export: export::Destination,
}

pub(crate) fn compile(cx: &mut Compile, config: &TracingConfig) -> Option<Tracing> {
    let endpoint = &config.otlp.endpoint;
    let Some(base) = endpoint.value.strip_prefix("http://") else {
        cx.error(
            &endpoint.referenced,
            format!(
                "tracing.otlp.endpoint `{}` must be an http:// URL (a collector or agent beside the gateway; OTLP over TLS is not supported)",
                endpoint.value
            ),
        );
        return None;
    };
    if base.is_empty() || config.otlp.timeout.0.is_zero() {
        cx.error(
            &endpoint.referenced,
            "tracing.otlp needs a host in `endpoint` and a `timeout` above 0s",
        );
        return None;
    }
    Some(Tracing {
        sample: config.sample.value.0,
        sample_errors: config.sample_errors,
        export: export::Destination {
            url: format!("{}/v1/traces", endpoint.value.trim_end_matches('/')),
            timeout: config.otlp.timeout.0,
            service_name: config.service_name.clone(),
        },
    })
}

/// The gateway's place in a trace, and the `traceparent` it sends upstream.
#[derive(Clone, Copy)]
pub(crate) struct TraceContext {
    traceparent: [u8; LEN],
    /// The client's span, the parent of the gateway's (a continued trace only).
    pub(crate) parent: Option<u64>,
    /// The gateway's span for the whole request.
    pub(crate) span: u64,
    /// The client sent a `tracestate` for a trace not continued: it is no longer valid
    /// and must not go on (with a continued trace it does).
    stray_state: bool,
}

impl TraceContext {
    /// Continues the request's trace, or starts one; `sample` is the share of started
    /// traces marked sampled (`None`: nothing is exported, none is). `carried` says
    /// whether the request has the trace fields at all.
    pub(crate) fn of(
        request: &RequestHeader,
        carried: Carried,
        sample: Option<f64>,
    ) -> TraceContext {
        let parent = if carried.traceparent {
            let mut received = request.headers.get_all(&TRACEPARENT).iter();
            match (received.next(), received.next()) {
                (Some(one), None) => parse(one.as_bytes()),
                _ => None,
            }
        } else {
            None
        };
        let mut traceparent = [0u8; LEN];
        traceparent[..3].copy_from_slice(b"00-");
        traceparent[35] = b'-';
        traceparent[52] = b'-';
        let flags = match parent {
            Some(Parent {
                trace_id, flags, ..
            }) => {
                traceparent[3..35].copy_from_slice(trace_id);
                // Only the sampled and random bits are defined; the rest go out as 0.
                flags & 0x03
            }
            None => {
                write_hex(
                    &mut traceparent[3..35],
                    &nonzero(fastrand::u128(..)).to_be_bytes(),
                );
                if sample.is_some_and(|share| fastrand::f64() < share) {
                    SAMPLED
                } else {
                    0
                }
            }
        };
        write_hex(&mut traceparent[53..], &[flags]);
        let mut context = TraceContext {
            traceparent,
            parent: parent.map(|p| p.span),
            span: 0,
            stray_state: parent.is_none() && carried.tracestate,
        };
        context.span = context.next_span();
        context
    }

    pub(crate) fn trace_id(&self) -> &str {
        std::str::from_utf8(self.trace_id_hex()).expect("hex digits")
    }

    /// The trace id's 32 lowercase hex digits, as bytes: for the access log, which needs
    /// neither their UTF-8 check nor their escaping.
    pub(crate) fn trace_id_hex(&self) -> &[u8] {
        &self.traceparent[3..35]
    }

    pub(crate) fn sampled(&self) -> bool {
        digit(self.traceparent[54]) & SAMPLED != 0
    }

    /// A new span id, written as the parent the upstream will see.
    pub(crate) fn next_span(&mut self) -> u64 {
        let span = nonzero(fastrand::u64(..));
        write_hex(&mut self.traceparent[36..52], &span.to_be_bytes());
        span
    }

    /// What the upstream receives: this context's `traceparent`, and the client's
    /// `tracestate` only with the client's trace.
    pub(crate) fn propagate(&self, upstream: &mut RequestHeader) -> pingora::Result<()> {
        let value = HeaderValue::from_bytes(&self.traceparent).expect("hex digits and dashes");
        upstream.insert_header_alike(&TRACEPARENT, value)?;
        if self.stray_state {
            upstream.remove_header(&TRACESTATE);
        }
        Ok(())
    }
}

/// The fields of a valid `traceparent` the gateway keeps.
#[derive(Clone, Copy)]
struct Parent<'a> {
    trace_id: &'a [u8],
    span: u64,
    flags: u8,
}

/// A valid `traceparent` (W3C Trace Context §3.2): lowercase hex, no all-zero id,
/// version `ff` refused, version `00` exactly 55 bytes, a later version at least 55 with a
/// `-` after the flags (parsed as `00`).
fn parse(value: &[u8]) -> Option<Parent<'_>> {
    if value.len() < LEN || (value.len() > LEN && (value.starts_with(b"00") || value[LEN] != b'-'))
    {
        return None;
    }
    let (version, trace_id, parent_id, flags) =
        (&value[..2], &value[3..35], &value[36..52], &value[53..55]);
    let dashes = value[2] == b'-' && value[35] == b'-' && value[52] == b'-';
    let lower_hex = |field: &[u8]| field.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |field: &[u8]| field.iter().any(|b| *b != b'0');
    let valid = dashes
        && version != b"ff"
        && [version, trace_id, parent_id, flags]
            .iter()
            .all(|f| lower_hex(f))
        && nonzero(trace_id)
        && nonzero(parent_id);
    valid.then(|| Parent {
        trace_id,
        span: parent_id
            .iter()
            .fold(0, |acc, b| acc << 4 | u64::from(digit(*b))),
        flags: digit(flags[0]) << 4 | digit(flags[1]),
    })
}

fn digit(b: u8) -> u8 {
    if b.is_ascii_digit() {
        b - b'0'
    } else {
        b - b'a' + 10
    }
}

/// An all-zero id is invalid; randomness gives one once in 2^64 at worst.
fn nonzero<T: PartialEq + From<u8>>(value: T) -> T {
    if value == T::from(0) {
        T::from(1)
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(traceparents: &[&str], tracestate: Option<&str>) -> (TraceContext, RequestHeader) {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        for value in traceparents {
            request.append_header(TRACEPARENT, *value).unwrap();
        }
        if let Some(state) = tracestate {
            request.append_header(TRACESTATE, state).unwrap();
        }
        let trace = TraceContext::of(&request, carried(&request), None);
        trace.propagate(&mut request).unwrap();
        (trace, request)
    }

    /// What `forwarding::normalise` says of the trace fields (its own tests check it).
    fn carried(request: &RequestHeader) -> Carried {
        Carried {
            traceparent: request.headers.contains_key(TRACEPARENT),
            tracestate: request.headers.contains_key(TRACESTATE),
            request_id: false,
        }
    }

    fn sent(request: &RequestHeader) -> (String, Option<String>) {
        let get = |name: HeaderName| {
            request
                .headers
                .get(&name)
                .map(|v: &HeaderValue| v.to_str().unwrap().to_string())
        };
        (get(TRACEPARENT).unwrap(), get(TRACESTATE))
    }

    const CLIENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_parent_is_continued_with_a_new_span() {
        let (trace, request) = context(&[CLIENT], Some("congo=t61rcWkgMzE"));
        let (traceparent, state) = sent(&request);
        assert!(trace.parent.is_some());
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(&traceparent[..36], &CLIENT[..36]);
        assert_ne!(&traceparent[36..52], "00f067aa0ba902b7");
        assert!(traceparent.ends_with("-01"));
        assert_eq!(
            parse(traceparent.as_bytes()).map(|p| p.trace_id.len()),
            Some(32)
        );
        assert_eq!(trace.parent, Some(0x00f0_67aa_0ba9_02b7));
        assert_eq!(format!("{:016x}", trace.span), &traceparent[36..52]);
        assert_eq!(state.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn a_later_version_is_read_as_00_and_unknown_flags_cleared() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff-what-comes-next";
        let (trace, request) = context(&[later], None);
        assert!(trace.parent.is_some());
        let (traceparent, _) = sent(&request);
        assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(traceparent.ends_with("-03"));
    }

    #[test]
    fn an_invalid_or_absent_parent_starts_a_trace_and_drops_the_state() {
        for invalid in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.more",
            "",
        ] {
            let (trace, request) = context(&[invalid], Some("congo=t61rcWkgMzE"));
            let (traceparent, state) = sent(&request);
            assert!(trace.parent.is_none(), "{invalid}");
            assert_ne!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(parse(traceparent.as_bytes()).is_some(), "{traceparent}");
            assert!(traceparent.ends_with("-00"));
            assert_eq!(state, None, "{invalid}");
        }
        let (trace, _) = context(&[CLIENT, CLIENT], None);
        assert!(trace.parent.is_none(), "two traceparent fields are invalid");
        let (first, _) = context(&[], None);
        let (second, _) = context(&[], None);
        assert_ne!(first.trace_id(), second.trace_id());
    }

    #[test]
    fn started_traces_are_sampled_at_the_share_continued_ones_as_their_parent() {
        let request = |traceparent: Option<&str>| {
            let mut request = RequestHeader::build("GET", b"/", None).unwrap();
            if let Some(value) = traceparent {
                request.append_header(TRACEPARENT, value).unwrap();
            }
            request
        };
        let of = |traceparent, sample| {
            let request = request(traceparent);
            TraceContext::of(&request, carried(&request), sample)
        };
        assert!(of(None, Some(1.0)).sampled());
        assert!(!of(None, Some(0.0)).sampled());
        assert!(!of(None, None).sampled());
        assert!(of(Some(CLIENT), Some(0.0)).sampled());
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!of(Some(unsampled), Some(1.0)).sampled());
        let mut trace = of(None, Some(1.0));
        let first = trace.span;
        assert_ne!(trace.next_span(), first, "each attempt its own span");
    }
}
