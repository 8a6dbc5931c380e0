//! Renders a request's access-log line (SPEC §3 `access_log`), straight into bytes:
//! no JSON value tree, no allocation per field. The line goes to the queue of
//! `crate::access_log`, which writes it off the request path.

use super::ctx::{Reason, RequestCtx};
use crate::access_log::Sink;
use pingora::proxy::Session;
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// Renders this request's line and queues it.
pub(crate) fn write(
    sink: &Sink,
    session: &Session,
    ctx: &RequestCtx,
    status: u16,
    elapsed: Duration,
) {
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
        ctx.client.request_id.as_ref().and_then(|v| v.to_str().ok()),
    );
    line.str("trace_id", ctx.client.trace.as_ref().map(|t| t.trace_id()));
    match ctx.client.ip {
        Some(ip) => line.ip("client_ip", ip),
        None => line.str("client_ip", None),
    }
    line.str("method", Some(req.method.as_str()));
    line.str("authority", crate::routing::request_host(req));
    line.str("path", Some(req.uri.path()));
    line.str("protocol", Some(protocol(req.version)));
    line.int("status", u64::from(status));
    line.str("route", route.map(|r| &*r.name));
    line.str("upstream", ctx.attempt.pool.as_ref().map(|p| &*p.name));
    let upstream_addr = match (&ctx.attempt.pool, ctx.attempt.server) {
        (Some(pool), Some(i)) => Some(&*pool.servers[i].label),
        _ => None,
    };
    line.str("upstream_addr", upstream_addr);
    line.str("user", ctx.client.principal.as_ref().map(|p| &*p.user));
    line.str("tier", ctx.client.principal.as_ref().map(|p| &*p.tier));
    match ctx.reason() {
        Some(Reason::RateLimited(rule)) => {
            line.key("reason");
            line.buf.extend_from_slice(b"\"rate_limited:");
            escape_into(&mut line.buf, rule);
            line.buf.push(b'"');
        }
        Some(Reason::Other(reason)) => line.str("reason", Some(reason)),
        None => line.str("reason", None),
    }
    line.str("cache", ctx.cache.outcome.map(|o| o.header()));
    line.key("shadow_limited");
    line.buf.push(b'[');
    for (i, rule) in ctx.limits.shadow_limited.iter().enumerate() {
        if i > 0 {
            line.buf.push(b',');
        }
        line.string(rule);
    }
    line.buf.push(b']');
    line.int("bytes_received", session.body_bytes_read() as u64);
    line.int("bytes_sent", session.body_bytes_sent() as u64);
    line.millis("duration_ms", Some(elapsed));
    line.millis("upstream_duration_ms", ctx.attempt.duration);
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
}
