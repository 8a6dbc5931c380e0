//! Hostile and malformed HTTP/1 input through real sockets: each shape is sent raw to
//! the gateway in front of a recording origin, and the test checks both what the client
//! got and exactly what reached the origin (SPEC §4: malformed HTTP gets a 400 and never
//! reaches upstream).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The gateway in front of `origin`, everything routed to it, `/cached/` with a cache.
fn gateway(origin: &Origin, server_extra: &str) -> Tollgate {
    Tollgate::start_with(
        &format!(
            "upstreams:\n  origin:\n    servers: [\"{}\"]\n    timeouts: {{ connect: 1s, read: 5s }}\n    retry: {{ attempts: 0 }}\nroutes:\n  - name: cached\n    match: {{ path_prefix: /cached/ }}\n    upstream: origin\n    cache: {{ ttl: 5m }}\n  - name: all\n    upstream: origin\n",
            origin.addr
        ),
        server_extra,
        &[],
    )
}

/// Sends `bytes` on a fresh connection; the whole answer, and how long it took to end.
fn exchange(gw: &Tollgate, bytes: &[u8]) -> (String, Duration) {
    let started = Instant::now();
    let answer = raw_request(([127, 0, 0, 1], gw.port).into(), bytes);
    (answer, started.elapsed())
}

fn statuses(answer: &str) -> Vec<u16> {
    answer
        .match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| answer[at + 9..].get(..3)?.parse().ok())
        .collect()
}

#[test]
fn request_targets_not_in_origin_form_are_400_and_never_reach_the_origin() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "");
    let refused: [&[u8]; 5] = [
        // Two spaces: Pingora would forward `%20/nope` while the pipeline saw `/`.
        b"GET  /cached/nope HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET \t/cached/nope HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET cached/nope HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET ?q=1 HTTP/1.1\r\nHost: a\r\n\r\n",
    ];
    for case in refused {
        let (answer, _) = exchange(&gw, case);
        assert_eq!(
            raw_status(&answer),
            Some(400),
            "{:?} -> {answer}",
            String::from_utf8_lossy(case)
        );
    }
    assert!(origin.seen().is_empty(), "{:?}", origin.seen());

    // Nothing was stored under `/` either: the cache's `/` is still the origin's.
    let (answer, _) = exchange(
        &gw,
        b"GET /cached/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.contains("x-cache: MISS"), "{answer}");

    // Absolute-form is accepted and goes upstream in origin form; a Host that names
    // another authority is refused.
    let (answer, _) = exchange(
        &gw,
        b"GET http://b.example/abs?q=1 HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    let last = origin.seen().pop().unwrap();
    assert_eq!(last.request_line(), "GET /abs?q=1 HTTP/1.1");
    assert_eq!(last.fields("host"), ["b.example"]);
    let (answer, _) = exchange(&gw, b"GET http://b.example/abs HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(raw_status(&answer), Some(400), "{answer}");
    assert_eq!(
        origin.seen().len(),
        2,
        "only `/cached/` and the absolute-form request"
    );

    let (answer, _) = exchange(
        &gw,
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    assert_eq!(
        origin.seen().pop().unwrap().request_line(),
        "OPTIONS * HTTP/1.1"
    );
}

#[test]
fn pipelined_requests_are_all_answered_in_order() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "");
    let (answer, _) = exchange(
        &gw,
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
          GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(statuses(&answer), [200, 200, 200], "{answer}");
    let lines: Vec<String> = origin
        .seen()
        .iter()
        .map(|r| r.request_line().to_string())
        .collect();
    assert_eq!(
        lines,
        [
            "GET /one HTTP/1.1",
            "POST /two HTTP/1.1",
            "GET /three HTTP/1.1"
        ]
    );
    assert_eq!(origin.seen()[1].body, b"abc");
}

#[test]
fn the_gateways_own_answers_name_no_upstream_address() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "");
    // A chunked body that turns out broken only once the request is on its way.
    let (answer, _) = exchange(
        &gw,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n\r\n",
    );
    let status = raw_status(&answer);
    assert!(status.is_some_and(|s| (400..600).contains(&s)), "{answer}");
    let port = origin.addr.port().to_string();
    assert!(
        !answer.contains(&port) && !answer.contains("Peer"),
        "the answer shows the upstream: {answer}"
    );
}

#[test]
fn short_requests_are_answered_at_once() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "  idle_timeout: 30s\n");
    // Fewer bytes than an HTTP/2 preface: decided on what was read, not after a wait.
    let (answer, took) = exchange(&gw, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (answer, took) = exchange(&gw, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(raw_status(&answer), Some(400), "{answer}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(origin.seen().len(), 1);
}

#[test]
fn framing_fields_spelled_with_underscores_are_refused_and_other_underscores_dropped() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "");
    for smuggle in [
        &b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\nContent-Length: 0\r\n\r\nhello",
    ] {
        let (answer, _) = exchange(&gw, smuggle);
        assert_eq!(
            raw_status(&answer),
            Some(400),
            "{:?} -> {answer}",
            String::from_utf8_lossy(smuggle)
        );
    }
    assert!(origin.seen().is_empty(), "{:?}", origin.seen());

    let (answer, _) = exchange(
        &gw,
        b"GET /x HTTP/1.1\r\nHost: a\r\nX_Tenant: other\r\nX-Tenant: mine\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    let seen = origin.seen().pop().unwrap();
    assert!(seen.fields("x_tenant").is_empty(), "{}", seen.head);
    assert_eq!(seen.fields("x-tenant"), ["mine"]);
}

#[test]
fn underscores_are_forwarded_when_the_policy_allows_them() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "  allow_underscores_in_headers: true\n");
    let (answer, _) = exchange(
        &gw,
        b"GET /x HTTP/1.1\r\nHost: a\r\nX_Tenant: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    assert_eq!(origin.seen()[0].fields("x_tenant"), ["t"]);
}

#[test]
fn identical_content_lengths_reach_the_origin_as_one_value() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "");
    for request in [
        &b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"[..],
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello",
    ] {
        let (answer, _) = exchange(&gw, request);
        assert_eq!(raw_status(&answer), Some(200), "{answer}");
        let seen = origin.seen().pop().unwrap();
        assert_eq!(seen.fields("content-length"), ["5"], "{}", seen.head);
        assert_eq!(seen.body, b"hello");
    }
}

#[test]
fn invalid_hosts_are_400() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "");
    for host in ["", "a, b", "a b", "a/b", "a:port"] {
        let request = format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let (answer, _) = exchange(&gw, request.as_bytes());
        assert_eq!(raw_status(&answer), Some(400), "Host: {host:?} -> {answer}");
    }
    assert!(origin.seen().is_empty(), "{:?}", origin.seen());
}

#[test]
fn client_planted_forwarded_and_x_real_ip_never_reach_the_origin() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "");
    let (answer, _) = exchange(
        &gw,
        b"GET /x HTTP/1.1\r\nHost: a\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
          X-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    let seen = origin.seen().pop().unwrap();
    assert!(!seen.head.contains("6.6.6.6"), "{}", seen.head);
    assert_eq!(seen.fields("x-forwarded-for"), ["127.0.0.1"]);
}

/// Reads until the gateway closes the connection (or 10 s pass): what it said, and when.
fn until_closed(stream: &mut TcpStream, started: Instant) -> (String, Duration) {
    let answer = read_until_closed(stream, Duration::from_secs(10));
    (answer, started.elapsed())
}

#[test]
fn heads_sent_too_slowly_get_408_within_header_timeout() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "  header_timeout: 1s\n");
    let timeouts = || gw.metric("tollgate_client_timeouts_total{phase=\"header\"}");

    // A kept-alive connection: a request, a pause longer than header_timeout (idle time
    // is not head time), another request, then a head that trickles in.
    let mut conn = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    let request = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
    conn.write_all(request).unwrap();
    let mut buf = [0u8; 1024];
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = conn.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(1500));
    conn.write_all(request).unwrap();
    let n = conn.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let started = Instant::now();
    let mut trickle = conn.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for byte in b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Slow: 1234567890" {
            if trickle.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let (answer, took) = until_closed(&mut conn, started);
    writer.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"request_timeout\""), "{answer}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(origin.seen().len(), 2, "the slow head reached the origin");
    assert!(wait_for(Duration::from_secs(5), || timeouts() == Some(1.0)));

    // The first head of a connection is timed from its first byte too.
    let mut first = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    first.write_all(b"GET /x HTT").unwrap();
    let (answer, took) = until_closed(&mut first, Instant::now());
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(wait_for(Duration::from_secs(5), || timeouts() == Some(2.0)));
}

#[test]
fn bodies_that_stall_get_408_within_body_timeout() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "  body_timeout: 1s\n");
    let mut conn = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    let started = Instant::now();
    conn.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        .unwrap();
    let (answer, took) = until_closed(&mut conn, started);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(origin.seen().is_empty(), "{:?}", origin.seen());
    assert!(wait_for(Duration::from_secs(5), || gw
        .metric("tollgate_client_timeouts_total{phase=\"body\"}")
        == Some(1.0)));

    // A body that keeps coming, slower in total than body_timeout, is fine.
    let mut conn = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    conn.write_all(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    for byte in b"abcd" {
        std::thread::sleep(Duration::from_millis(400));
        conn.write_all(&[*byte]).unwrap();
    }
    let (answer, _) = until_closed(&mut conn, Instant::now());
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(origin.seen()[0].body, b"abcd");
}

/// Smuggling-shaped heads: each is refused with 400 and nothing reaches the origin.
#[test]
fn ambiguous_framing_is_400_and_never_reaches_the_origin() {
    let origin = Origin::recording();
    let gw = gateway(&origin, "");
    let shapes: [(&str, &[u8]); 14] = [
        ("te not chunked last", b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
        ("te unknown", b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
        ("te twice", b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("te in http/1.0", b"POST /x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("cl negative", b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
        ("cl signed", b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc"),
        ("cl hex", b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\nabc"),
        ("cl two numbers", b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3 3\r\n\r\nabc"),
        ("cl differing list", b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd"),
        ("space before colon", b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\nabc"),
        ("obs-fold", b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\tX-B: 2\r\n\r\n"),
        ("nul in value", b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n"),
        ("hosts twice", b"GET /x HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
        ("junk after version", b"GET /x HTTP/1.1 junk\r\nHost: a\r\n\r\n"),
    ];
    let mut wrong = Vec::new();
    for (shape, request) in shapes {
        let (answer, _) = exchange(&gw, request);
        if raw_status(&answer) != Some(400) {
            wrong.push(format!(
                "{shape}: {}",
                answer.lines().next().unwrap_or("(nothing)")
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(origin.seen().is_empty(), "{:#?}", origin.seen());
}
