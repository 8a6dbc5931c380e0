//! Renders a request's access-log line (SPEC §3 `access_log`), straight into bytes:
//! no JSON value tree, no allocation per field. The line goes to the queue of
//! `crate::access_log`, which writes it off the request path.

use super::ctx::{Reason, RequestCtx};
use crate::access_log::Sink;
use pingora::proxy::Session;
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// A member's name with its punctuation, `,"name":`: written in one copy. The first
/// member of a line drops the comma for the opening brace.
macro_rules! name {
    ($name:literal) => {
        Name(concat!(",\"", $name, "\":"))
    };
}

/// A member's name as `name!` writes it.
#[derive(Clone, Copy)]
struct Name(&'static str);

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
    sink.append(|buf| render(buf, session, ctx, status, elapsed));
}

fn render(buf: &mut Vec<u8>, session: &Session, ctx: &RequestCtx, status: u16, elapsed: Duration) {
    let req = session.req_header();
    let route = ctx.route();
    let mut line = Line::new(buf);
    line.key(name!("timestamp"));
    timestamp(line.buf, SystemTime::now());
    line.str(name!("type"), Some("access"));
    line.str(
        name!("request_id"),
        ctx.client.request_id.as_ref().and_then(|v| v.to_str().ok()),
    );
    line.str(
        name!("trace_id"),
        ctx.client.trace.as_ref().map(|t| t.trace_id()),
    );
    match ctx.client.ip {
        Some(ip) => line.ip(name!("client_ip"), ip),
        None => line.str(name!("client_ip"), None),
    }
    line.str(name!("method"), Some(req.method.as_str()));
    line.str(name!("authority"), crate::routing::request_host(req));
    line.str(name!("path"), Some(req.uri.path()));
    line.str(name!("protocol"), Some(protocol(req.version)));
    line.int(name!("status"), u64::from(status));
    line.str(name!("route"), route.map(|r| &*r.name));
    line.str(
        name!("upstream"),
        ctx.attempt.pool.as_ref().map(|p| &*p.name),
    );
    let upstream_addr = match (&ctx.attempt.pool, ctx.attempt.server) {
        (Some(pool), Some(i)) => Some(&*pool.servers[i].label),
        _ => None,
    };
    line.str(name!("upstream_addr"), upstream_addr);
    line.str(
        name!("user"),
        ctx.client.principal.as_ref().map(|p| &*p.user),
    );
    line.str(
        name!("tier"),
        ctx.client.principal.as_ref().map(|p| &*p.tier),
    );
    match ctx.reason() {
        Some(Reason::RateLimited(rule)) => {
            line.key(name!("reason"));
            line.buf.extend_from_slice(b"\"rate_limited:");
            escape_into(line.buf, rule);
            line.buf.push(b'"');
        }
        Some(Reason::Other(reason)) => line.str(name!("reason"), Some(reason)),
        None => line.str(name!("reason"), None),
    }
    line.str(name!("cache"), ctx.cache.outcome.map(|o| o.header()));
    line.key(name!("shadow_limited"));
    line.buf.push(b'[');
    for (i, rule) in ctx.limits.shadow_limited.iter().enumerate() {
        if i > 0 {
            line.buf.push(b',');
        }
        line.string(rule);
    }
    line.buf.push(b']');
    line.int(name!("bytes_received"), session.body_bytes_read() as u64);
    line.int(name!("bytes_sent"), session.body_bytes_sent() as u64);
    line.millis(name!("duration_ms"), Some(elapsed));
    line.millis(name!("upstream_duration_ms"), ctx.attempt.duration);
    line.key(name!("request_headers"));
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
                escape_value_into(line.buf, value.as_bytes());
                line.buf.push(b'"');
            }
            continue;
        }
        if previous.is_some() {
            line.buf.push(b',');
        }
        previous = Some(name);
        line.buf.push(b'"');
        escape_into(line.buf, name.as_str());
        line.buf.extend_from_slice(b"\":\"");
        if redact.contains(name) {
            line.buf.extend_from_slice(b"[redacted]");
        } else {
            escape_value_into(line.buf, value.as_bytes());
        }
        line.buf.push(b'"');
    }
    line.buf.extend_from_slice(b"}}\n");
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

/// A JSON object written member by member at the end of `buf`.
struct Line<'a> {
    buf: &'a mut Vec<u8>,
    /// Where the object starts in `buf`.
    start: usize,
}

impl Line<'_> {
    fn new(buf: &mut Vec<u8>) -> Line<'_> {
        Line {
            start: buf.len(),
            buf,
        }
    }

    /// `name` as `name!` writes it. The member writers are inlined: at each call site
    /// the name's length is a constant, and its copy a few moves instead of a call.
    #[inline(always)]
    fn key(&mut self, name: Name) {
        if self.buf.len() == self.start {
            self.buf.push(b'{');
            self.buf.extend_from_slice(&name.0.as_bytes()[1..]);
        } else {
            self.buf.extend_from_slice(name.0.as_bytes());
        }
    }

    #[inline(always)]
    fn string(&mut self, value: &str) {
        self.buf.reserve(value.len() + 2);
        self.buf.push(b'"');
        escape_into(self.buf, value);
        self.buf.push(b'"');
    }

    #[inline(always)]
    fn str(&mut self, name: Name, value: Option<&str>) {
        self.key(name);
        match value {
            Some(value) => self.string(value),
            None => self.buf.extend_from_slice(b"null"),
        }
    }

    fn ip(&mut self, name: Name, ip: IpAddr) {
        self.key(name);
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

    #[inline(always)]
    fn int(&mut self, name: Name, value: u64) {
        self.key(name);
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// Milliseconds with microsecond precision, as a JSON number (`12.345`), or null.
    fn millis(&mut self, name: Name, value: Option<Duration>) {
        let Some(value) = value else {
            self.str(name, None);
            return;
        };
        let micros = value.as_micros().min(u128::from(u64::MAX)) as u64;
        self.int(name, micros / 1000);
        let fraction = micros % 1000;
        self.buf.extend_from_slice(&[
            b'.',
            b'0' + (fraction / 100) as u8,
            b'0' + (fraction / 10 % 10) as u8,
            b'0' + (fraction % 10) as u8,
        ]);
    }
}

/// A header value as the inside of a JSON string, invalid UTF-8 replaced; the usual
/// value, ASCII with nothing to escape, is copied as it is.
fn escape_value_into(buf: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.is_ascii() && clean_prefix(bytes) == bytes.len() {
        buf.extend_from_slice(bytes);
    } else {
        escape_into(buf, &lossy(bytes));
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
    // Most values need no escaping: checked eight bytes at a time, then copied at once.
    let clean = clean_prefix(bytes);
    if clean == bytes.len() {
        buf.extend_from_slice(bytes);
        return;
    }
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
/// flagged when it is below 0x20, `"` or `\\`); all of them when none does. The tail is
/// checked as the string's last eight bytes, or byte by byte in a shorter string.
fn clean_prefix(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let flagged = |x: u64| {
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
        let quote = has_zero(x ^ (ONES * u64::from(b'"')));
        let backslash = has_zero(x ^ (ONES * u64::from(b'\\')));
        control | quote | backslash != 0
    };
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    let mut clean = 0;
    for word in words {
        if flagged(u64::from_le_bytes(word.try_into().expect("eight bytes"))) {
            return clean;
        }
        clean += 8;
    }
    let tail_clean = match bytes.len() {
        0 => true,
        1..8 => !tail.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\'),
        len => !flagged(u64::from_le_bytes(
            bytes[len - 8..].try_into().expect("eight bytes"),
        )),
    };
    if tail_clean {
        bytes.len()
    } else {
        clean
    }
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
            for len in 1..=17 {
                for at in 0..len {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = special;
                    let clean = clean_prefix(&bytes);
                    let needs = special < 0x20 || special == b'"' || special == b'\\';
                    if needs {
                        assert!(clean <= at, "{special:#x} at {at} of {len}: {clean}");
                    } else {
                        assert_eq!(clean, len, "{special:#x} at {at} of {len}");
                    }
                }
            }
        }
        assert_eq!(clean_prefix(b""), 0);
    }

    #[test]
    fn header_values_are_copied_escaped_or_repaired() {
        let inside = |bytes: &[u8]| {
            let mut buf = b"\"".to_vec();
            escape_value_into(&mut buf, bytes);
            buf.push(b'"');
            serde_json::from_slice::<String>(&buf).unwrap()
        };
        assert_eq!(inside(b"text/html; q=0.9"), "text/html; q=0.9");
        assert_eq!(inside(b"say \"hi\"\t"), "say \"hi\"\t");
        assert_eq!(inside("café".as_bytes()), "café");
        assert_eq!(inside(b"bad \xff byte"), "bad \u{fffd} byte");
    }

    #[test]
    fn lines_are_json_objects() {
        let mut buf = b"{}\n".to_vec();
        let mut line = Line::new(&mut buf);
        line.str(name!("a"), Some("quote \" and\nnewline"));
        line.str(name!("b"), None);
        line.millis(name!("n"), Some(Duration::from_micros(1_500)));
        line.int(name!("i"), 42);
        line.ip(name!("v4"), "10.0.0.255".parse().unwrap());
        line.ip(name!("v6"), "2001:db8::1".parse().unwrap());
        line.str(name!("c"), Some("tab\t bell\u{7} back\\slash é"));
        line.key(name!("t"));
        timestamp(
            line.buf,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_042),
        );
        line.buf.push(b'}');
        assert_eq!(&buf[..3], b"{}\n", "appended after what the buffer held");
        let doc: serde_json::Value = serde_json::from_slice(&buf[3..]).unwrap();
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
