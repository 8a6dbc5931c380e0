//! Renders a request's access-log line (SPEC §3 `access_log`), straight into bytes:
//! no JSON value tree, no allocation per field. The line goes to the queue of
//! `crate::access_log`, which writes it off the request path.

use super::ctx::{Reason, RequestCtx};
use crate::access_log::Sink;
use crate::json::{escape_into, escape_value_into};
use pingora::proxy::Session;
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// A member's name with its punctuation and a string value's opening quote,
/// `,"name":"`, or with `null`: either written in one copy (without the quote for other
/// values).
macro_rules! name {
    ($name:literal) => {
        Name {
            string: concat!(",\"", $name, "\":\""),
            null: concat!(",\"", $name, "\":null"),
        }
    };
}

/// A member's name as `name!` writes it.
#[derive(Clone, Copy)]
struct Name {
    string: &'static str,
    null: &'static str,
}

/// Renders this request's line and queues it.
pub(crate) fn write(
    sink: &Sink,
    session: &Session,
    ctx: &RequestCtx,
    status: u16,
    elapsed: Duration,
) {
    if !sink.wanted() {
        return;
    }
    sink.append(|buf| render(buf, session, ctx, status, elapsed));
}

fn render(buf: &mut Vec<u8>, session: &Session, ctx: &RequestCtx, status: u16, elapsed: Duration) {
    let req = session.req_header();
    let mut line = Line::new(buf, SystemTime::now());
    line.value(
        name!("request_id"),
        ctx.client.request_id.as_ref().map(|v| v.as_bytes()),
    );
    line.verbatim(
        name!("trace_id"),
        ctx.client.trace.as_ref().map(|t| t.trace_id_hex()),
    );
    match ctx.client.ip {
        Some(ip) => line.ip(name!("client_ip"), ip),
        None => line.null(name!("client_ip")),
    }
    // `http` accepts only tokens (RFC 9110 §5.6.2) as methods and field names: they
    // never need escaping (`tokens_need_no_escaping` holds `http` to that).
    line.verbatim(name!("method"), Some(req.method.as_str().as_bytes()));
    line.value(name!("authority"), crate::routing::request_host_bytes(req));
    line.str(name!("path"), Some(req.uri.path()));
    line.verbatim(name!("protocol"), Some(protocol(req.version).as_bytes()));
    line.int(name!("status"), u64::from(status));
    // Route names are letters, digits, '-', '_' and '.' (the policy's compilation checks);
    // pool and server names come escaped from it.
    line.verbatim(name!("route"), ctx.route().map(|r| r.name.as_bytes()));
    let pool = ctx.attempt.pool.as_deref();
    line.verbatim(name!("upstream"), pool.map(|p| p.json_name.as_bytes()));
    let server = pool.zip(ctx.attempt.server).map(|(p, i)| &p.servers[i]);
    line.verbatim(
        name!("upstream_addr"),
        server.map(|s| s.json_label.as_bytes()),
    );
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
            line.open_string(name!("reason"));
            line.buf.extend_from_slice(b"rate_limited:");
            escape_into(line.buf, rule);
            line.buf.push(b'"');
        }
        Some(Reason::Other(reason)) => line.str(name!("reason"), Some(reason)),
        None => line.null(name!("reason")),
    }
    line.verbatim(
        name!("cache"),
        ctx.cache.outcome.map(|o| o.header().as_bytes()),
    );
    line.key(name!("shadow_limited"));
    match ctx.limits.shadow_limited.split_first() {
        None => line.buf.extend_from_slice(b"[]"),
        Some((first, rest)) => {
            line.buf.push(b'[');
            line.string(first);
            for rule in rest {
                line.buf.push(b',');
                line.string(rule);
            }
            line.buf.push(b']');
        }
    }
    line.int(name!("bytes_received"), session.body_bytes_read() as u64);
    line.int(name!("bytes_sent"), session.body_bytes_sent() as u64);
    line.millis(name!("duration_ms"), Some(elapsed));
    line.millis(name!("upstream_duration_ms"), ctx.attempt.duration);
    line.buf.extend_from_slice(b",\"request_headers\":{");
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
        line.buf
            .extend_from_slice(if previous.is_some() { b",\"" } else { b"\"" });
        previous = Some(name);
        line.buf.extend_from_slice(name.as_str().as_bytes());
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

/// A JSON object written member by member at the end of `buf`, from its first,
/// `timestamp`. The member writers are inlined: at each call site the name's length is a
/// constant, and its copy a few moves instead of a call.
struct Line<'a> {
    buf: &'a mut Vec<u8>,
}

impl Line<'_> {
    fn new(buf: &mut Vec<u8>, now: SystemTime) -> Line<'_> {
        buf.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(buf, now);
        buf.extend_from_slice(b"\",\"type\":\"access\"");
        Line { buf }
    }

    /// `name` for a value other than a string.
    #[inline(always)]
    fn key(&mut self, name: Name) {
        self.buf
            .extend_from_slice(&name.string.as_bytes()[..name.string.len() - 1]);
    }

    /// `name` and a string value's opening quote.
    #[inline(always)]
    fn open_string(&mut self, name: Name) {
        self.buf.extend_from_slice(name.string.as_bytes());
    }

    #[inline(always)]
    fn null(&mut self, name: Name) {
        self.buf.extend_from_slice(name.null.as_bytes());
    }

    /// A string outside a member (an array's element), escaped.
    #[inline(always)]
    fn string(&mut self, value: &str) {
        self.buf.push(b'"');
        escape_into(self.buf, value);
        self.buf.push(b'"');
    }

    /// A string member, escaped.
    #[inline(always)]
    fn str(&mut self, name: Name, value: Option<&str>) {
        self.string_member(name, value, escape_into);
    }

    /// A string member from the request's bytes: escaped, invalid UTF-8 replaced.
    #[inline(always)]
    fn value(&mut self, name: Name, value: Option<&[u8]>) {
        self.string_member(name, value, escape_value_into);
    }

    /// A string member that needs no escaping, copied as it is.
    #[inline(always)]
    fn verbatim(&mut self, name: Name, value: Option<&[u8]>) {
        self.string_member(name, value, Vec::extend_from_slice);
    }

    /// A string member whose inside `write` appends, or null.
    #[inline(always)]
    fn string_member<T>(
        &mut self,
        name: Name,
        value: Option<T>,
        write: impl FnOnce(&mut Vec<u8>, T),
    ) {
        match value {
            Some(value) => {
                self.open_string(name);
                write(self.buf, value);
                self.buf.push(b'"');
            }
            None => self.null(name),
        }
    }

    fn ip(&mut self, name: Name, ip: IpAddr) {
        self.open_string(name);
        match ip {
            IpAddr::V4(v4) => {
                // Formatted in place and copied once: four numbers and three dots
                // appended one by one cost twice as much.
                let mut text = [0u8; 16];
                let mut len = 0;
                for octet in v4.octets() {
                    if octet >= 100 {
                        text[len] = b'0' + octet / 100;
                        len += 1;
                    }
                    if octet >= 10 {
                        text[len] = b'0' + octet / 10 % 10;
                        len += 1;
                    }
                    text[len] = b'0' + octet % 10;
                    text[len + 1] = b'.';
                    len += 2;
                }
                self.buf.extend_from_slice(&text[..len - 1]);
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
            self.null(name);
            return;
        };
        let whole = u64::from(value.subsec_millis());
        let millis = value.as_secs().saturating_mul(1000).saturating_add(whole);
        self.int(name, millis);
        let fraction = value.subsec_micros() % 1000;
        self.buf.extend_from_slice(&[
            b'.',
            b'0' + (fraction / 100) as u8,
            b'0' + (fraction / 10 % 10) as u8,
            b'0' + (fraction % 10) as u8,
        ]);
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`; the seconds part is formatted once a second per thread.
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
        buf.extend_from_slice(second.1.as_bytes());
    });
    let millis = since_epoch.subsec_millis();
    buf.extend_from_slice(&[
        b'.',
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What lets `render` copy methods and field names without escaping them: `http`
    /// accepts no byte in either that JSON would need escaped.
    #[test]
    fn tokens_need_no_escaping() {
        let mut accepted = 0;
        for byte in 0..=u8::MAX {
            let needs_escaping = byte < 0x20 || byte == b'"' || byte == b'\\' || byte >= 0x80;
            let name = [b'x', byte];
            if let Ok(name) = http::HeaderName::from_bytes(&name) {
                accepted += 1;
                assert!(!needs_escaping, "field name with {byte:#x}: {name}");
            }
            let method = [b'X', byte];
            if let Ok(method) = http::Method::from_bytes(&method) {
                assert!(!needs_escaping, "method with {byte:#x}: {method}");
            }
            if let Ok(method) = http::Method::from_bytes(&method.repeat(8)) {
                assert!(!needs_escaping, "long method with {byte:#x}: {method}");
            }
        }
        assert!(accepted > 60, "the check saw field names");
    }

    #[test]
    fn lines_are_json_objects() {
        let mut buf = b"{}\n".to_vec();
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_042);
        let mut line = Line::new(&mut buf, now);
        line.str(name!("a"), Some("quote \" and\nnewline"));
        line.str(name!("b"), None);
        line.millis(name!("n"), Some(Duration::from_micros(1_500)));
        line.int(name!("i"), 42);
        line.ip(name!("v4"), "10.0.0.255".parse().unwrap());
        line.ip(name!("v6"), "2001:db8::1".parse().unwrap());
        line.str(name!("c"), Some("tab\t bell\u{7} back\\slash é"));
        line.verbatim(name!("d"), Some(b"as it is"));
        line.value(name!("e"), Some(b"caf\xc3\xa9 \"\xff\""));
        line.null(name!("f"));
        line.millis(name!("g"), None);
        let names = [name!("ip0"), name!("ip1"), name!("ip2")];
        for (name, ip) in names
            .into_iter()
            .zip(["0.0.0.0", "255.255.255.255", "1.20.100.9"])
        {
            line.ip(name, ip.parse().unwrap());
        }
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
        assert_eq!(doc["d"], "as it is");
        assert_eq!(doc["e"], "café \"\u{fffd}\"");
        assert!(doc["f"].is_null());
        assert!(doc["g"].is_null());
        assert_eq!(doc["timestamp"], "2023-11-14T22:13:20.042Z");
        assert_eq!(doc["type"], "access");
        assert_eq!(doc["ip0"], "0.0.0.0");
        assert_eq!(doc["ip1"], "255.255.255.255");
        assert_eq!(doc["ip2"], "1.20.100.9");
    }
}
