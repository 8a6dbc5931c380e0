//! W3C Trace Context (SPEC §9): a request's `traceparent` is continued — same trace id
//! and flags, the gateway's own span id as the parent the upstream sees — or, when
//! absent or invalid, a trace is started. `tracestate` travels with a continued trace and
//! is dropped with an invalid one, as the recommendation requires. Nothing is exported.

use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;

// Static names: inserting a custom name built from a string would parse and allocate it
// on every request.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A traceparent is 55 bytes: `00-` trace id (32 hex) `-` parent id (16 hex) `-` flags.
const LEN: usize = 55;

/// The gateway's place in a trace, as the `traceparent` it sends upstream.
#[derive(Clone, Copy)]
pub(crate) struct TraceContext {
    traceparent: [u8; LEN],
    /// Whether the client's trace was continued (its `tracestate` stays valid).
    pub(crate) continued: bool,
}

impl TraceContext {
    /// Continues the request's trace, or starts one.
    pub(crate) fn of(request: &RequestHeader) -> TraceContext {
        let mut received = request.headers.get_all(&TRACEPARENT).iter();
        let parent = match (received.next(), received.next()) {
            (Some(one), None) => parse(one.as_bytes()),
            _ => None,
        };
        let mut traceparent = [0u8; LEN];
        traceparent[..3].copy_from_slice(b"00-");
        traceparent[35] = b'-';
        traceparent[52] = b'-';
        match parent {
            Some((trace_id, flags)) => {
                traceparent[3..35].copy_from_slice(trace_id);
                // Only the sampled and random bits are defined; the rest go out as 0.
                let flags = hex_byte(flags) & 0x03;
                hex(&mut traceparent[53..], u128::from(flags), 2);
            }
            None => {
                hex(&mut traceparent[3..35], nonzero(fastrand::u128(..)), 32);
                traceparent[53..].copy_from_slice(b"00");
            }
        }
        hex(
            &mut traceparent[36..52],
            u128::from(nonzero(fastrand::u64(..))),
            16,
        );
        TraceContext {
            traceparent,
            continued: parent.is_some(),
        }
    }

    pub(crate) fn trace_id(&self) -> &str {
        std::str::from_utf8(&self.traceparent[3..35]).expect("hex digits")
    }

    /// What the upstream receives: this context's `traceparent`, and the client's
    /// `tracestate` only with the client's trace.
    pub(crate) fn propagate(&self, upstream: &mut RequestHeader) -> pingora::Result<()> {
        let value = HeaderValue::from_bytes(&self.traceparent).expect("hex digits and dashes");
        upstream.insert_header(TRACEPARENT, value)?;
        if !self.continued {
            upstream.remove_header(&TRACESTATE);
        }
        Ok(())
    }
}

/// The trace id and flags of a valid `traceparent` (W3C Trace Context §3.2): lowercase
/// hex, no all-zero id, version `ff` refused, version `00` exactly 55 bytes, a later
/// version at least 55 with a `-` after the flags (parsed as `00`).
fn parse(value: &[u8]) -> Option<(&[u8], &[u8])> {
    if value.len() < LEN || (value.len() > LEN && (value.starts_with(b"00") || value[LEN] != b'-'))
    {
        return None;
    }
    let (version, trace_id, parent_id, flags) =
        (&value[..2], &value[3..35], &value[36..52], &value[53..55]);
    let dashes = value[2] == b'-' && value[35] == b'-' && value[52] == b'-';
    let lower_hex = |field: &[u8]| field.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |field: &[u8]| field.iter().any(|b| *b != b'0');
    (dashes
        && version != b"ff"
        && [version, trace_id, parent_id, flags]
            .iter()
            .all(|f| lower_hex(f))
        && nonzero(trace_id)
        && nonzero(parent_id))
    .then_some((trace_id, flags))
}

fn hex_byte(two: &[u8]) -> u8 {
    let digit = |b: u8| {
        if b.is_ascii_digit() {
            b - b'0'
        } else {
            b - b'a' + 10
        }
    };
    digit(two[0]) << 4 | digit(two[1])
}

/// Writes the low `digits` hex digits of `value` into `out`.
fn hex(out: &mut [u8], value: u128, digits: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in out[..digits].iter_mut().enumerate() {
        *byte = HEX[((value >> (4 * (digits - 1 - i))) & 0xf) as usize];
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
        let trace = TraceContext::of(&request);
        trace.propagate(&mut request).unwrap();
        (trace, request)
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
        assert!(trace.continued);
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(&traceparent[..36], &CLIENT[..36]);
        assert_ne!(&traceparent[36..52], "00f067aa0ba902b7");
        assert!(traceparent.ends_with("-01"));
        assert_eq!(
            parse(traceparent.as_bytes()).map(|(t, _)| t.len()),
            Some(32)
        );
        assert_eq!(state.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn a_later_version_is_read_as_00_and_unknown_flags_cleared() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff-what-comes-next";
        let (trace, request) = context(&[later], None);
        assert!(trace.continued);
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
            assert!(!trace.continued, "{invalid}");
            assert_ne!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(parse(traceparent.as_bytes()).is_some(), "{traceparent}");
            assert!(traceparent.ends_with("-00"));
            assert_eq!(state, None, "{invalid}");
        }
        let (trace, _) = context(&[CLIENT, CLIENT], None);
        assert!(!trace.continued, "two traceparent fields are invalid");
        let (first, _) = context(&[], None);
        let (second, _) = context(&[], None);
        assert_ne!(first.trace_id(), second.trace_id());
    }
}
