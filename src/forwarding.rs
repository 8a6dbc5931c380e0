//! What a proxy owes the request and response passing through it: the real client
//! address behind trusted proxies, `X-Forwarded-*`, request ids, rejecting ambiguous
//! framing, and keeping hop-by-hop fields on their own hop.

use http::header::{self, HeaderMap, HeaderName};
use pingora::http::{RequestHeader, ResponseHeader};
use std::cell::RefCell;
use std::net::IpAddr;

// Prebuilt names: looked up without a parse, inserted without a copy.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The client address (SPEC §4 Identity): the TCP peer, unless the peer is a trusted
/// proxy; then the right-most `X-Forwarded-For` address that is not itself trusted.
/// An unparsable hop ends the walk at the last address that could be believed.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: impl Fn(IpAddr) -> bool) -> IpAddr {
    if !trusted(peer) {
        return peer;
    }
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(value) = value.to_str() else {
            return client;
        };
        for hop in value.rsplit(',') {
            match parse_hop(hop.trim()) {
                Some(ip) if trusted(ip) => client = ip,
                Some(ip) => return ip,
                None => return client,
            }
        }
    }
    client
}

/// An `X-Forwarded-For` element: an address, possibly bracketed or with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(sock) = hop.parse::<std::net::SocketAddr>() {
        return Some(sock.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Sets `X-Forwarded-For/-Proto/-Host` on the upstream request. From a trusted peer the
/// existing chain is extended; from anyone else client-supplied values are replaced,
/// and `Forwarded` and `X-Real-IP` removed, so a spoofed client address never reaches
/// the application.
pub(crate) fn set_forwarded_headers(
    upstream: &mut RequestHeader,
    peer: IpAddr,
    peer_trusted: bool,
    scheme: &'static str,
) -> pingora::Result<()> {
    let existing_chain = peer_trusted
        .then(|| joined(upstream.headers.get_all(&X_FORWARDED_FOR).iter()))
        .flatten();
    match existing_chain {
        Some(chain) => {
            let mut peer_text = [0u8; 46];
            let peer_text = format_ip(peer, &mut peer_text);
            upstream.insert_header_alike(&X_FORWARDED_FOR, format!("{chain}, {peer_text}"))?
        }
        None => upstream.insert_header_alike(&X_FORWARDED_FOR, peer_value(peer))?,
    }
    // Other spellings of the client address are believed only as far as the
    // X-Forwarded-* fields are: from anyone but a trusted proxy, they go.
    // One pass over the names finds them: two lookups hash both names on every request,
    // which nearly never carries either.
    if !peer_trusted
        && upstream
            .headers
            .keys()
            .any(|name| name == FORWARDED || name == X_REAL_IP)
    {
        upstream.remove_header(&FORWARDED);
        upstream.remove_header(&X_REAL_IP);
    }
    if !(peer_trusted && upstream.headers.contains_key(&X_FORWARDED_PROTO)) {
        // Static: a `&str` would be copied into a new allocation on every request.
        upstream.insert_header_alike(&X_FORWARDED_PROTO, http::HeaderValue::from_static(scheme))?;
    }
    if !(peer_trusted && upstream.headers.contains_key(&X_FORWARDED_HOST)) {
        let host = upstream.headers.get(header::HOST).cloned().or_else(|| {
            upstream
                .uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
        });
        match host {
            Some(host) => upstream.insert_header_alike(&X_FORWARDED_HOST, host)?,
            None => {
                upstream.remove_header(&X_FORWARDED_HOST);
            }
        }
    }
    Ok(())
}

/// `peer` as a field value. A thread keeps the last one it made, as nginx keeps each
/// connection's address text: a sidecar's requests come from a few peers (the node's
/// proxy, the mesh), one after another, and a value made per request costs a format, a
/// validation and an allocation; a kept one, two reference counts.
fn peer_value(peer: IpAddr) -> http::HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(IpAddr, http::HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((ip, value)) if *ip == peer => value.clone(),
        _ => {
            let mut text = [0u8; 46];
            let value = http::HeaderValue::from_str(format_ip(peer, &mut text))
                .expect("an address is a valid field value");
            *last = Some((peer, value.clone()));
            value
        }
    })
}

fn joined<'a>(values: impl Iterator<Item = &'a http::HeaderValue>) -> Option<String> {
    let parts: Vec<&str> = values.filter_map(|v| v.to_str().ok()).collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// An address as `Display` writes it. IPv4, nearly every peer, without the formatting
/// machinery: `Display` pads and aligns, about a thousand instructions a request for
/// four numbers.
fn format_ip(ip: IpAddr, buf: &mut [u8; 46]) -> &str {
    let len = match ip {
        IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                let mut digits = itoa::Buffer::new();
                let digits = digits.format(octet).as_bytes();
                buf[len..len + digits.len()].copy_from_slice(digits);
                len += digits.len();
            }
            len
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            write!(cursor, "{v6}").expect("an IPv6 address fits in 46 bytes");
            cursor.position() as usize
        }
    };
    std::str::from_utf8(&buf[..len]).expect("formatted as ASCII")
}

/// A request id from the client is kept when it is a sane token (visible ASCII, at
/// most 128 bytes); otherwise a new one replaces it.
pub(crate) fn acceptable_request_id(value: &http::HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// 32 lowercase hex digits of randomness (a UUID's worth), without allocating.
pub(crate) fn new_request_id() -> http::HeaderValue {
    let mut out = [0u8; 32];
    crate::digest::write_hex(&mut out, &fastrand::u128(..).to_ne_bytes());
    // Owned where it is made: the upstream request and the response each take a clone,
    // which for bytes copied from a slice would first move them to a second allocation.
    http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out))
        .expect("hex digits are a valid header value")
}

/// Field names that decide where a message ends, or where it goes: spelled with `_`
/// they are refused, since an upstream that folds `_` into `-` would frame or route
/// the request otherwise than the gateway did.
const FRAMING_FIELDS: [&str; 4] = ["content-length", "transfer-encoding", "host", "connection"];

/// The fields the pipeline reads from every request but few requests carry, as the one
/// pass of [`normalise`] met them: one it did not meet is not looked up again (a
/// hashed lookup costs more than the comparisons that pass makes). Nothing the
/// pipeline does to the head before those reads adds any of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// The configured request-id field (`server.request_id_header`).
    pub request_id: bool,
    pub traceparent: bool,
    pub tracestate: bool,
}

impl Carried {
    /// For a head `normalise` refused (its pass may not have met every field): any of
    /// them may be there, so each is looked up (a 400 still echoes the request id).
    pub const UNCHECKED: Carried = Carried {
        request_id: true,
        traceparent: true,
        tracestate: true,
    };

    fn note(&mut self, name: &HeaderName, request_id: &HeaderName) {
        if name == crate::trace::TRACEPARENT {
            self.traceparent = true;
        } else if name == crate::trace::TRACESTATE {
            self.tracestate = true;
        } else if name == request_id {
            self.request_id = true;
        }
    }
}

/// Checks a request head and puts it in the one form the whole pipeline and the
/// upstream then see: an absolute-form target becomes origin-form, a repeated but
/// identical `Content-Length` one value, and (unless `allow_underscores`) field names
/// with `_` are dropped. `Err` is the reason for a 400; `Ok` says which of the fields
/// read later the head carries (`request_id` names the request-id field).
pub fn normalise(
    req: &mut RequestHeader,
    allow_underscores: bool,
    request_id: &HeaderName,
) -> Result<Carried, &'static str> {
    if let Some((host, origin_form)) = absolute_target(req) {
        req.set_uri(origin_form);
        req.insert_header_alike(&header::HOST, host)
            .map_err(|_| "invalid request target authority")?;
    }
    let Fields {
        underscored,
        one_length,
        carried,
    } = inspect(req, request_id)?;
    if underscored {
        let underscored: Vec<HeaderName> = req
            .headers
            .keys()
            .filter(|n| n.as_str().contains('_'))
            .cloned()
            .collect();
        for name in underscored {
            let folded = name.as_str().replace('_', "-");
            if FRAMING_FIELDS.contains(&folded.as_str()) {
                return Err("a framing field name spelled with `_`");
            }
            if !allow_underscores {
                req.remove_header(&name);
            }
        }
    }
    if let Some(length) = one_length {
        req.insert_header_alike(&header::CONTENT_LENGTH, length)
            .map_err(|_| "invalid Content-Length")?;
    }
    Ok(carried)
}

/// A `Host` value RFC 9110 §7.2 allows, and no more: one `host[:port]`, where host is
/// a name of letters, digits and `-._~%` or a bracketed IP literal. Refused: empty, a
/// list, spaces, a path.
fn valid_host(value: &[u8]) -> bool {
    let port = if value.first() == Some(&b'[') {
        let Some(end) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &value[1..end];
        let literal_ok = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
        if !literal_ok {
            return false;
        }
        &value[end + 1..]
    } else {
        let split = value
            .iter()
            .rposition(|&b| b == b':')
            .unwrap_or(value.len());
        let host = &value[..split];
        let name_ok = !host.is_empty()
            && host.iter().all(|&b| {
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'%')
            });
        if !name_ok {
            return false;
        }
        &value[split..]
    };
    match port.split_first() {
        None => true,
        Some((b':', digits)) => {
            !digits.is_empty() && digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit)
        }
        Some(_) => false,
    }
}

/// An absolute-form request target (RFC 9112 §3.2.2), as the Host and origin-form
/// target the rest of the pipeline and the upstream use: the target's authority
/// replaces any `Host` (§3.2.2: a server ignores it then). `None` for every other form.
fn absolute_target(req: &RequestHeader) -> Option<(http::HeaderValue, http::Uri)> {
    let raw = req.raw_path();
    if raw.first() == Some(&b'/') || raw == b"*" {
        return None;
    }
    let uri = http::Uri::try_from(raw).ok()?;
    let http_scheme = uri
        .scheme_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"));
    let authority = uri.authority()?;
    if !http_scheme || authority.as_str().contains('@') || authority.host().is_empty() {
        return None;
    }
    let host = http::HeaderValue::from_str(authority.as_str()).ok()?;
    let origin_form = match uri.path_and_query().map(|pq| pq.as_str()) {
        Some(pq) if pq.starts_with('/') => pq.parse().ok()?,
        Some(pq) => format!("/{pq}").parse().ok()?,
        None => http::Uri::from_static("/"),
    };
    Some((host, origin_form))
}

/// What `normalise` has left to do to a head `inspect` accepted.
struct Fields {
    /// Some field name has a `_`.
    underscored: bool,
    /// The one value a repeated or listed (but agreeing) `Content-Length` becomes.
    one_length: Option<String>,
    carried: Carried,
}

/// Framing problems RFC 9112 says a server must reject, found in the parsed header.
/// The HTTP/1 parser already refuses whitespace before a colon, obs-fold and invalid
/// field names; what it lets through is checked here. `Err` is the reason for a 400.
/// One pass over the fields finds the ones judged: this runs for every request, and a
/// hashed lookup per name costs more than looking at the few fields a request has.
///
/// The request target comes first: Pingora's parser percent-encodes what it cannot
/// parse (`GET  /x`, two spaces, becomes `%20/x`) and files any target without a
/// leading `/` under the path `/`, while the upstream gets the bytes as they are. Only
/// origin-form (and `*` for OPTIONS; [`normalise`] rewrites absolute-form to
/// origin-form before this) passes, so the path routing, limits and the cache key decide on is exactly
/// the one sent upstream.
fn inspect(req: &RequestHeader, request_id: &HeaderName) -> Result<Fields, &'static str> {
    let target = req.raw_path();
    let asterisk = target == b"*" && req.method == http::Method::OPTIONS;
    if !(target.first() == Some(&b'/') || asterisk) || !req.raw_path_is_utf8() {
        return Err("the request target is not in origin form");
    }
    let parse_length = |v: &http::HeaderValue| -> Option<u64> {
        let text = v.to_str().ok()?;
        let mut values = text.split(',').map(|s| s.trim().parse::<u64>().ok());
        let first = values.next()??;
        values.all(|v| v == Some(first)).then_some(first)
    };
    let (mut hosts, mut host) = (0, None);
    let (mut lengths, mut length, mut length_value, mut lengths_agree) = (0, None, None, true);
    let (mut codings, mut coding) = (0, None);
    let mut underscored = false;
    let mut carried = Carried::default();
    for (name, value) in &req.headers {
        if name == header::HOST {
            hosts += 1;
            host.get_or_insert(value);
        } else if name == header::CONTENT_LENGTH {
            lengths += 1;
            if length.is_none() {
                length = Some(value);
                length_value = parse_length(value);
            } else if parse_length(value) != length_value {
                lengths_agree = false;
            }
        } else if name == header::TRANSFER_ENCODING {
            codings += 1;
            coding.get_or_insert(value);
        } else {
            underscored |= name.as_str().contains('_');
            carried.note(name, request_id);
        }
    }
    if req.version == http::Version::HTTP_11 && hosts == 0 {
        return Err("an HTTP/1.1 request must carry a Host header");
    }
    if hosts > 1 {
        return Err("more than one Host header");
    }
    if host.is_some_and(|host| !valid_host(host.as_bytes())) {
        return Err("invalid Host header");
    }
    if let Some(first) = length {
        if length_value.is_none() {
            return Err("invalid Content-Length");
        }
        if !lengths_agree {
            return Err("conflicting Content-Length values");
        }
        if coding.is_some() {
            return Err("both Transfer-Encoding and Content-Length");
        }
        let listed = first.as_bytes().contains(&b',');
        if listed || lengths > 1 {
            let one_length = first
                .to_str()
                .ok()
                .and_then(|v| v.split(',').next())
                .map(|v| v.trim().to_string())
                .unwrap_or_default();
            return Ok(Fields {
                underscored,
                one_length: Some(one_length),
                carried,
            });
        }
    }
    if let Some(te) = coding {
        // Only plain chunked is forwarded: another coding would reach the upstream
        // decoded of its chunking but with nothing left to say it is, e.g., gzip.
        let only_chunked = te
            .to_str()
            .is_ok_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
        if !only_chunked || codings > 1 {
            return Err("unsupported Transfer-Encoding: only chunked is accepted");
        }
    }
    Ok(Fields {
        underscored,
        one_length: None,
        carried,
    })
}

/// Why `name` cannot be the request-id field (`server.request_id_header`), which the
/// gateway takes from the client and writes to the upstream request and the response:
/// a field that frames or routes the message, lives on one hop, or that the gateway
/// writes itself would be overwritten with the id, or overwrite it.
pub(crate) fn reserved_for_request_id(name: &HeaderName) -> Option<&'static str> {
    if name == header::HOST || name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
        Some("it frames or routes the message")
    } else if is_hop_by_hop(name) {
        Some("it is hop-by-hop")
    } else if [
        X_FORWARDED_FOR,
        X_FORWARDED_PROTO,
        X_FORWARDED_HOST,
        FORWARDED,
        X_REAL_IP,
    ]
    .contains(name)
    {
        Some("the gateway sets the forwarding fields itself")
    } else if name == crate::trace::TRACEPARENT || name == crate::trace::TRACESTATE {
        Some("it carries the trace context")
    } else {
        None
    }
}

/// The fields RFC 9110 §7.6.1 ties to one connection, plus the legacy `Keep-Alive` and
/// `Proxy-Connection` (Pingora frames bodies itself). A `match` on the name: this runs
/// for every field of every upstream response.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "te" | "trailer" | "upgrade"
    )
}

/// Removes an upstream response's hop-by-hop fields before it goes to the client (or the
/// cache): the standard ones and any its `Connection` names. (A switching-protocols answer
/// keeps them: the upgrade needs `Connection`/`Upgrade`.) One pass over the names when there
/// are none; the usual one, a lone `Connection: keep-alive` (or `close`), goes without
/// collecting the names first.
pub(crate) fn strip_hop_by_hop(response: &mut ResponseHeader) {
    let mut found = response.headers.keys().filter(|n| is_hop_by_hop(n));
    let Some(first) = found.next() else {
        return;
    };
    let lone_connection = first == header::CONNECTION
        && found.next().is_none()
        && response
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .all(|v| v.to_str().is_ok_and(|v| v.split(',').all(names_no_field)));
    if lone_connection {
        response.remove_header(&header::CONNECTION);
        return;
    }
    for name in hop_by_hop_fields(&response.headers) {
        response.remove_header(&name);
    }
}

/// A `Connection` token that names no field to remove: `close`, or `keep-alive`, which
/// names a standard hop-by-hop field (removed as such when present).
fn names_no_field(token: &str) -> bool {
    let token = token.trim();
    token.is_empty()
        || token.eq_ignore_ascii_case("keep-alive")
        || token.eq_ignore_ascii_case("close")
}

/// The hop-by-hop fields present in an upstream response (see [`strip_hop_by_hop`]).
fn hop_by_hop_fields(headers: &HeaderMap) -> Vec<HeaderName> {
    if !headers.keys().any(is_hop_by_hop) {
        return Vec::new();
    }
    let mut fields: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    fields.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter(|token| !names_no_field(token))
            .map(str::trim)
            // Others are looked up by `&str` (parsed on the stack) before a `HeaderName`
            // is made: a custom name allocates.
            .filter(|token| headers.contains_key(*token))
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok()),
    );
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(ip: IpAddr) -> bool {
        ip.to_string().starts_with("10.")
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn an_address_is_formatted_as_display_writes_it() {
        for text in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.12.3",
            "192.168.100.9",
            "::1",
            "::ffff:1.2.3.4",
            "2001:db8:85a3::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let mut buf = [0u8; 46];
            assert_eq!(format_ip(ip, &mut buf), ip.to_string());
        }
    }

    #[test]
    fn a_peers_value_is_its_own_when_peers_alternate() {
        for text in [
            "203.0.113.9",
            "203.0.113.9",
            "2001:db8::1",
            "203.0.113.9",
            "10.0.0.1",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(peer_value(ip), text);
        }
    }

    #[test]
    fn client_ip_ignores_spoofing_from_untrusted_peers() {
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_ip(peer, &xff(&["1.2.3.4"]), trusted), peer);
    }

    #[test]
    fn client_ip_is_the_rightmost_untrusted_hop() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let h = xff(&["6.6.6.6, 1.2.3.4", "10.0.0.7"]);
        assert_eq!(
            client_ip(peer, &h, trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(peer, &HeaderMap::new(), trusted), peer);
        let h = xff(&["garbage, 10.0.0.9"]);
        assert_eq!(
            client_ip(peer, &h, trusted),
            "10.0.0.9".parse::<IpAddr>().unwrap()
        );
        let h = xff(&["[2001:db8::1]:443"]);
        assert_eq!(
            client_ip(peer, &h, trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn forwarded_headers_replace_or_extend() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("host", "api.example.com").unwrap();
        req.insert_header("x-forwarded-for", "6.6.6.6").unwrap();
        req.insert_header("x-forwarded-proto", "gopher").unwrap();
        req.insert_header("forwarded", "for=6.6.6.6").unwrap();
        req.insert_header("x-real-ip", "6.6.6.6").unwrap();
        let mut untrusted = req.clone();
        set_forwarded_headers(
            &mut untrusted,
            "203.0.113.9".parse().unwrap(),
            false,
            "http",
        )
        .unwrap();
        assert_eq!(untrusted.headers["x-forwarded-for"], "203.0.113.9");
        assert_eq!(untrusted.headers["x-forwarded-proto"], "http");
        assert_eq!(untrusted.headers["x-forwarded-host"], "api.example.com");
        assert!(!untrusted.headers.contains_key("forwarded"));
        assert!(!untrusted.headers.contains_key("x-real-ip"));
        set_forwarded_headers(&mut req, "10.0.0.1".parse().unwrap(), true, "http").unwrap();
        assert_eq!(req.headers["x-forwarded-for"], "6.6.6.6, 10.0.0.1");
        assert_eq!(req.headers["x-forwarded-proto"], "gopher");
        assert_eq!(req.headers["forwarded"], "for=6.6.6.6");
        assert_eq!(req.headers["x-real-ip"], "6.6.6.6");
    }

    #[test]
    fn request_ids() {
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert_ne!(id, new_request_id());
        assert!(acceptable_request_id(&id));
        assert!(!acceptable_request_id(&http::HeaderValue::from_static(
            "has space"
        )));
    }

    const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

    fn malformed(req: &RequestHeader) -> Option<&'static str> {
        inspect(req, &X_REQUEST_ID).err()
    }

    #[test]
    fn framing_checks() {
        let build = |headers: &[(&str, &str)]| {
            let mut r = RequestHeader::build("POST", b"/", None).unwrap();
            for (k, v) in headers {
                r.append_header(k.to_string(), *v).unwrap();
            }
            r
        };
        assert_eq!(malformed(&build(&[("host", "a")])), None);
        assert!(malformed(&build(&[])).is_some());
        assert!(malformed(&build(&[("host", "a"), ("host", "b")])).is_some());
        assert!(malformed(&build(&[
            ("host", "a"),
            ("content-length", "3"),
            ("content-length", "4")
        ]))
        .is_some());
        assert_eq!(
            malformed(&build(&[
                ("host", "a"),
                ("content-length", "3"),
                ("content-length", "3")
            ])),
            None
        );
        assert!(malformed(&build(&[
            ("host", "a"),
            ("content-length", "3"),
            ("transfer-encoding", "chunked")
        ]))
        .is_some());
        assert!(malformed(&build(&[("host", "a"), ("transfer-encoding", "gzip")])).is_some());
        assert!(malformed(&build(&[
            ("host", "a"),
            ("transfer-encoding", "gzip, chunked")
        ]))
        .is_some());
        assert_eq!(
            malformed(&build(&[("host", "a"), ("transfer-encoding", "chunked")])),
            None
        );
    }

    #[test]
    fn request_targets() {
        let with_host = |method: &str, target: &[u8]| {
            let mut r = RequestHeader::build(method, target, None).unwrap();
            r.append_header("host", "a").unwrap();
            r
        };
        assert_eq!(malformed(&with_host("GET", b"/x?y=1")), None);
        assert_eq!(malformed(&with_host("OPTIONS", b"*")), None);
        for bad in [&b"%20/x"[..], b"%09/x", b"x", b"*", b"?q=1", b"http://a/x"] {
            assert!(
                malformed(&with_host("GET", bad)).is_some(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }

        let (host, uri) =
            absolute_target(&with_host("GET", b"http://Api.example:8080/p?q=1")).unwrap();
        assert_eq!(
            (host.to_str().unwrap(), uri.to_string().as_str()),
            ("Api.example:8080", "/p?q=1")
        );
        let (_, uri) = absolute_target(&with_host("GET", b"HTTPS://b.example")).unwrap();
        assert_eq!(uri, "/");
        for refused in [
            &b"/x"[..],
            b"*",
            b"ftp://a/x",
            b"http://user@a/x",
            b"x",
            b"%20/x",
        ] {
            assert!(
                absolute_target(&with_host("GET", refused)).is_none(),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
    }

    #[test]
    fn hosts() {
        for good in [
            &b"a"[..],
            b"api.example.com:8080",
            b"[::1]:443",
            b"[2001:db8::1]",
            b"my_host",
        ] {
            assert!(valid_host(good), "{}", String::from_utf8_lossy(good));
        }
        for bad in [
            &b""[..],
            b"a, b",
            b"a b",
            b"a/b",
            b"a:",
            b"a:123456",
            b"[::1",
            b"[]",
            b"a:b:c",
        ] {
            assert!(!valid_host(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn normalised_heads() {
        let head = |fields: &[(&str, &str)]| {
            let mut r = RequestHeader::build("POST", b"/", None).unwrap();
            for (k, v) in fields {
                r.append_header(k.to_string(), *v).unwrap();
            }
            r
        };
        let mut req = head(&[("host", "a"), ("content-length", "5, 5"), ("x_tenant", "t")]);
        normalise(&mut req, false, &X_REQUEST_ID).unwrap();
        let lengths: Vec<_> = req.headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["5"]);
        assert!(!req.headers.contains_key("x_tenant"));
        let mut req = head(&[
            ("host", "a"),
            ("content-length", "5"),
            ("content-length", "5"),
        ]);
        normalise(&mut req, false, &X_REQUEST_ID).unwrap();
        assert_eq!(req.headers.get_all("content-length").iter().count(), 1);
        let mut kept = head(&[("host", "a"), ("x_tenant", "t")]);
        normalise(&mut kept, true, &X_REQUEST_ID).unwrap();
        assert!(kept.headers.contains_key("x_tenant"));
        for (name, refused) in [
            ("transfer_encoding", true),
            ("content_length", true),
            ("x_host", false),
        ] {
            let mut req = head(&[("host", "a"), (name, "chunked")]);
            assert_eq!(
                normalise(&mut req, true, &X_REQUEST_ID).is_err(),
                refused,
                "{name}"
            );
        }
    }

    #[test]
    fn the_pass_says_which_rare_fields_a_head_carries() {
        let head = |fields: &[(&str, &str)]| {
            let mut r = RequestHeader::build("GET", b"/", None).unwrap();
            r.append_header("host", "a").unwrap();
            for (k, v) in fields {
                r.append_header(k.to_string(), *v).unwrap();
            }
            r
        };
        let carried = |fields: &[(&str, &str)], request_id: &str| {
            let request_id = HeaderName::from_bytes(request_id.as_bytes()).unwrap();
            normalise(&mut head(fields), true, &request_id).unwrap()
        };
        assert_eq!(
            carried(&[("accept", "*/*")], "x-request-id"),
            Carried::default()
        );
        let all = [
            (
                "TraceParent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("x-correlation-id", "abc"),
        ];
        assert_eq!(carried(&all, "x-correlation-id"), Carried::UNCHECKED);
        let only_state = carried(&all[1..], "x-request-id");
        assert!(only_state.tracestate && !only_state.traceparent && !only_state.request_id);
        // A standard name can be the request-id field too.
        assert!(carried(&[("from", "ops@example.com")], "from").request_id);
    }

    #[test]
    fn hop_by_hop_fields_stay_on_their_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("content-type", "text/plain".parse().unwrap());
        let mut fields = hop_by_hop_fields(&h);
        fields.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(fields, ["connection", "keep-alive", "x-secret"]);

        h.remove("connection");
        h.remove("keep-alive");
        assert!(
            hop_by_hop_fields(&h).is_empty(),
            "x-secret is not named any more"
        );

        // The usual answer: each field once, in whatever case the token is written.
        h.insert("connection", "Keep-Alive".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        let mut fields = hop_by_hop_fields(&h);
        fields.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(fields, ["connection", "keep-alive"]);
    }

    #[test]
    fn stripping_a_response_leaves_only_its_end_to_end_fields() {
        let strip = |fields: &[(&str, &str)]| {
            let mut response = ResponseHeader::build(200, None).unwrap();
            for (name, value) in fields {
                response.append_header(name.to_string(), *value).unwrap();
            }
            strip_hop_by_hop(&mut response);
            let mut left: Vec<String> = response
                .headers
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect();
            left.sort();
            left
        };
        let end_to_end = ["content-type: text/plain", "x-secret: 1"];
        let with = |fields: &[(&'static str, &'static str)]| {
            let mut all = vec![("content-type", "text/plain"), ("x-secret", "1")];
            all.extend_from_slice(fields);
            strip(&all)
        };
        assert_eq!(with(&[]), end_to_end);
        assert_eq!(with(&[("connection", "keep-alive")]), end_to_end);
        assert_eq!(with(&[("Connection", " Close ")]), end_to_end);
        assert_eq!(
            with(&[("connection", "keep-alive"), ("keep-alive", "timeout=5")]),
            end_to_end
        );
        assert_eq!(
            with(&[("connection", "keep-alive, x-secret")]),
            ["content-type: text/plain"],
            "a field the Connection names goes too"
        );
        assert_eq!(
            with(&[("connection", "keep-alive"), ("connection", "x-secret")]),
            ["content-type: text/plain"]
        );
        assert_eq!(
            with(&[("upgrade", "websocket"), ("te", "trailers")]),
            end_to_end
        );
    }
}
