//! The request pipeline through real sockets: routing, forwarding headers, request
//! ids, hop-by-hop fields, body limits, malformed requests and the gateway's own
//! problem+json answers.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn routes_policy(app: &Upstream, other: &Upstream) -> String {
    format!(
        "upstreams:
  app:
    servers: [\"{app}\"]
  other:
    servers: [\"{other}\"]
routes:
  - name: exact
    match: {{ path: /exact }}
    upstream: other
  - name: regex
    match: {{ path_regex: \"^/items/[0-9]+$\" }}
    upstream: other
  - name: beta
    match: {{ path_prefix: /echo, headers: {{ x-beta: \"1\" }} }}
    upstream: other
  - name: hosted
    match: {{ path_prefix: /echo, host: \"*.example.com\" }}
    upstream: other
  - name: post-only
    match: {{ path_prefix: /submit, methods: [POST] }}
    upstream: app
  - name: stripped
    match: {{ path_prefix: /svc/ }}
    upstream: app
    strip_prefix: true
  - name: echo
    match: {{ path_prefix: /echo }}
    upstream: app
",
        app = app.addr,
        other = other.addr
    )
}

fn served_by(response: reqwest::blocking::Response) -> String {
    let doc: Value = response.json().unwrap();
    doc["server"].as_str().unwrap().to_string()
}

#[test]
fn routes_match_first_by_path_method_host_and_header() {
    let (app, other) = (upstream("app"), upstream("other"));
    let gw = Tollgate::start(&routes_policy(&app, &other));
    let client = &gw.client;

    assert_eq!(served_by(gw.get("/exact")), "other");
    assert_eq!(
        gw.get("/exact/more").status(),
        404,
        "exact does not match longer paths"
    );
    assert_eq!(served_by(gw.get("/items/42")), "other");
    assert_eq!(gw.get("/items/abc").status(), 404);
    assert_eq!(served_by(gw.get("/echo")), "app");
    let beta = client
        .get(gw.url("/echo"))
        .header("x-beta", "1")
        .send()
        .unwrap();
    assert_eq!(served_by(beta), "other");
    let hosted = client
        .get(gw.url("/echo"))
        .header("host", "api.example.com")
        .send()
        .unwrap();
    assert_eq!(served_by(hosted), "other");
    let bare = client
        .get(gw.url("/echo"))
        .header("host", "example.com")
        .send()
        .unwrap();
    assert_eq!(
        served_by(bare),
        "app",
        "*.example.com does not match the bare domain"
    );
    assert_eq!(
        gw.get("/submit").status(),
        404,
        "GET does not match a POST-only route"
    );
    assert_eq!(
        client.post(gw.url("/submit")).send().unwrap().status(),
        404,
        "upstream 404: /submit is not an endpoint of the demo app"
    );

    let stripped: Value = gw.get("/svc/echo/x?q=1").json().unwrap();
    assert_eq!(stripped["path"], "/echo/x");
    assert_eq!(stripped["query"], "q=1");
}

#[test]
fn no_route_is_problem_json_and_keeps_the_connection() {
    let (app, other) = (upstream("app"), upstream("other"));
    let gw = Tollgate::start(&routes_policy(&app, &other));
    let mut stream = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 404"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "{text}"
        );
        let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"], "no_route");
        assert_eq!(body["status"], 404);
        assert!(
            body["type"].is_string() && body["title"].is_string() && body["detail"].is_string()
        );
    }
    assert_eq!(app.requests() + other.requests(), 0);
}

#[test]
fn forwarding_headers_request_ids_and_hop_by_hop() {
    let (app, other) = (upstream("app"), upstream("other"));
    let body = routes_policy(&app, &other);
    let gw = Tollgate::start_with(
        &body,
        "  response_headers: { x-frame-options: DENY }\n",
        &[],
    );

    // An untrusted client cannot plant X-Forwarded-* values or hop-by-hop fields.
    let response = gw
        .client
        .get(gw.url("/echo"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "gopher")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("te", "trailers")
        .header("proxy-connection", "keep-alive")
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 32);
    let seen: Value = response.json().unwrap();
    let headers = &seen["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(
        headers["x-forwarded-host"],
        format!("127.0.0.1:{}", gw.port)
    );
    assert_eq!(
        headers["x-request-id"],
        id.as_str(),
        "the generated id goes upstream too"
    );
    for hop in ["x-private", "te", "proxy-connection"] {
        assert!(
            headers.get(hop).is_none(),
            "{hop} reached the upstream: {headers}"
        );
    }

    // A client's own request id is propagated both ways.
    let response = gw
        .client
        .get(gw.url("/echo"))
        .header("x-request-id", "abc-123")
        .send()
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    let seen: Value = response.json().unwrap();
    assert_eq!(seen["headers"]["x-request-id"], "abc-123");

    // Hop-by-hop fields of the upstream's answer stay on the upstream hop.
    let response = gw
        .get("/echo?set_header=keep-alive:timeout%3D5&set_header=connection:x-upstream-private&set_header=x-upstream-private:1&set_header=x-visible:yes");
    assert_eq!(response.headers()["x-visible"], "yes");
    assert!(response.headers().get("x-upstream-private").is_none());
    assert!(response.headers().get("keep-alive").is_none());
}

/// The field names of a raw head, each as written.
fn names(head: &str) -> Vec<&str> {
    head.split("\r\n")
        .skip(1)
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn field_names_keep_their_spelling_and_added_ones_follow_the_head() {
    // The origin answers in the spelling the request asks for.
    let origin = Origin::start(|request, _| {
        let fields: &[(&str, &str)] = match request.field("x-answer").as_deref() {
            Some("title") => &[("Content-Type", "text/plain"), ("X-Served-By", "a")],
            Some("lower") => &[("content-type", "text/plain"), ("x-served-by", "a")],
            _ => &[
                ("Content-Type", "text/plain"),
                ("ETag", "\"1\""),
                ("x-served-by", "a"),
            ],
        };
        http_response("200 OK", fields, "ok")
    });
    let gw = Tollgate::start(&simple_policy(&[origin.addr.to_string()]));
    let addr = ([127, 0, 0, 1], gw.port).into();
    // (request, the spelling of the fields the gateway and Pingora add upstream, and to
    // the response, by the heads' own spellings)
    let cases = [
        (
            "GET /t HTTP/1.1\r\nHost: a.example\r\nX-Answer: title\r\nX-Custom-Field: 1\r\nConnection: close\r\n\r\n",
            ["X-Forwarded-For", "X-Request-Id"],
            ["X-Request-Id", "Date", "Connection"],
        ),
        (
            "GET /l HTTP/1.1\r\nhost: a.example\r\nx-answer: lower\r\nx-custom-field: 1\r\nconnection: close\r\n\r\n",
            ["x-forwarded-for", "x-request-id"],
            ["x-request-id", "date", "connection"],
        ),
        (
            "GET /m HTTP/1.1\r\nHost: a.example\r\nx-answer: mixed\r\nX-API-Key: k\r\nConnection: close\r\n\r\n",
            ["X-Forwarded-For", "X-Request-Id"],
            ["X-Request-Id", "Date", "Connection"],
        ),
    ];
    for (i, (request, added_upstream, added_downstream)) in cases.into_iter().enumerate() {
        let answer = raw_request(addr, request.as_bytes());
        assert_eq!(raw_status(&answer), Some(200), "{answer}");
        let upstream = &origin.seen()[i].head;
        let sent = names(request);
        for name in sent
            .iter()
            .filter(|n| !n.eq_ignore_ascii_case("connection"))
        {
            assert!(names(upstream).contains(name), "{name} in {upstream}");
        }
        for name in added_upstream {
            assert!(names(upstream).contains(&name), "{name} in {upstream}");
        }
        let answered = names(&answer);
        let origin_names: &[&str] = match i {
            0 => &["Content-Type", "X-Served-By"],
            1 => &["content-type", "x-served-by"],
            _ => &["Content-Type", "ETag", "x-served-by"],
        };
        for name in origin_names.iter().chain(&added_downstream) {
            assert!(answered.contains(name), "{name} in {answer}");
        }
    }
}

#[test]
fn trusted_proxy_chain_is_extended() {
    let app = upstream("app");
    let gw = Tollgate::start_with(
        &simple_policy(&[app.addr.to_string()]),
        "  trusted_proxies: [\"127.0.0.0/8\"]\n",
        &[],
    );
    let seen: Value = gw
        .client
        .get(gw.url("/echo"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    let log = gw.access_log();
    assert!(
        wait_for(Duration::from_secs(5), || gw
            .access_log()
            .iter()
            .any(|l| l["client_ip"] == "203.0.113.7")),
        "{log:?}"
    );
}

#[test]
fn request_body_over_the_limit_is_413_and_never_reaches_upstream() {
    let app = upstream("app");
    let gw = Tollgate::start_with(
        &simple_policy(&[app.addr.to_string()]),
        "  max_request_body: 1KiB\n",
        &[],
    );
    let response = gw
        .client
        .post(gw.url("/echo"))
        .body(vec![b'x'; 2048])
        .send()
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let doc: Value = response.json().unwrap();
    assert_eq!(doc["error"], "payload_too_large");
    assert_eq!(app.requests(), 0);

    let ok = gw
        .client
        .post(gw.url("/echo"))
        .body(vec![b'x'; 1024])
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.json::<Value>().unwrap()["body_bytes"], 1024);

    // Chunked: no declared length, so the count stops it mid-stream; the upstream never
    // receives a complete request.
    let before = app.requests();
    let mut chunked =
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'y'; 512]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_request(([127, 0, 0, 1], gw.port).into(), &chunked);
    assert_eq!(raw_status(&answer), Some(413), "{answer}");
    assert_eq!(
        app.requests(),
        before,
        "the upstream answered a truncated body"
    );
}

#[test]
fn malformed_requests_get_400_and_never_reach_upstream() {
    let app = upstream("app");
    let gw = Tollgate::start(&simple_policy(&[app.addr.to_string()]));
    let addr = ([127, 0, 0, 1], gw.port).into();
    let cases: [&[u8]; 7] = [
        b"GET /echo/no-host HTTP/1.1\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Bad : 1\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n  b\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a\r\nBad\x01Name: 1\r\n\r\n",
    ];
    for case in cases {
        let answer = raw_request(addr, case);
        assert_eq!(
            raw_status(&answer),
            Some(400),
            "{:?} -> {answer}",
            String::from_utf8_lossy(case)
        );
    }
    assert_eq!(app.requests(), 0);
    let fine = raw_request(
        addr,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&fine), Some(200), "{fine}");
}

#[test]
fn h2c_prior_knowledge_is_served() {
    let app = upstream("app");
    let gw = Tollgate::start(&simple_policy(&[app.addr.to_string()]));
    let client = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client.get(gw.url("/api/predict")).send().unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
}

#[test]
fn idle_and_trickling_clients_are_disconnected() {
    let app = upstream("app");
    let gw = Tollgate::start_with(
        &simple_policy(&[app.addr.to_string()]),
        "  idle_timeout: 300ms\n  header_timeout: 300ms\n",
        &[],
    );
    let closed_within = |mut stream: TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).unwrap_or(0);
        (n, started.elapsed())
    };
    // Connects and says nothing.
    let silent = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    let (n, elapsed) = closed_within(silent);
    assert_eq!(n, 0);
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");

    // Sends a few bytes and stalls: told 408, then closed.
    let mut trickle = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    trickle.write_all(b"GET / HT").unwrap();
    let mut answer = String::new();
    trickle
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = std::time::Instant::now();
    let _ = trickle.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A kept-alive connection is served while its pauses stay under the idle timeout
    // (four requests over 600 ms: each wait starts the deadline again), then closed
    // once idle for the timeout.
    let mut kept = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for pause in [0, 200, 200, 200] {
        std::thread::sleep(Duration::from_millis(pause));
        kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = kept.read(&mut buf).unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "after {pause} ms: {answer}"
        );
    }
    let (n, elapsed) = closed_within(kept);
    assert_eq!(n, 0, "the idle keep-alive connection stayed open");
    assert!(
        (Duration::from_millis(250)..Duration::from_millis(950)).contains(&elapsed),
        "closed {elapsed:?} after the last answer"
    );

    // Requests in time are unaffected.
    assert_eq!(gw.get("/health").status(), 200);
}

#[test]
fn a_client_that_goes_away_ends_its_request_upstream() {
    let origin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gw = Tollgate::start(&pool_policy(
        origin.local_addr().unwrap(),
        "timeouts: { connect: 1s, read: 60s }",
    ));
    let mut client = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    client
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (mut upstream, _) = origin.accept().unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(read_head(&mut upstream).starts_with("get /slow "));

    // The origin never answers; the client stops waiting.
    drop(client);
    let started = std::time::Instant::now();
    let mut rest = [0u8; 64];
    let n = upstream
        .read(&mut rest)
        .expect("the upstream connection was left open");
    assert_eq!(n, 0, "more than the request reached the upstream");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the gateway kept waiting for a client that left: {:?}",
        started.elapsed()
    );
}

/// Reads an HTTP head (up to the blank line) byte by byte, so nothing after it is taken.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed inside the head");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[test]
fn websocket_upgrades_are_proxied_with_their_upgrade_fields() {
    // A WebSocket server as far as HTTP can tell: 101 to the upgrade, then it echoes
    // whatever bytes come, framing being none of the gateway's business.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let head = read_head(&mut conn);
        conn.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        )
        .unwrap();
        let mut buf = [0u8; 64];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => conn.write_all(&buf[..n]).unwrap(),
            }
        }
        head
    });
    let gw = Tollgate::start(&format!(
        "upstreams:\n  ws:\n    servers: [\"{addr}\"]\nroutes:\n  - name: ws\n    upstream: ws\n"
    ));

    let mut client = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: chat.example\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let answer = read_head(&mut client);
    assert!(answer.starts_with("http/1.1 101"), "{answer}");
    assert!(answer.contains("upgrade: websocket"), "{answer}");
    assert!(answer.contains("connection: upgrade"), "{answer}");
    assert!(answer.contains("sec-websocket-accept: "), "{answer}");

    // Past the handshake the connection is a byte pipe, both ways.
    for message in [&b"\x81\x05hello"[..], &b"\x81\x03bye"[..]] {
        client.write_all(message).unwrap();
        let mut echoed = vec![0u8; message.len()];
        client.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, message);
    }
    drop(client);
    let forwarded = server.join().unwrap();
    assert!(forwarded.contains("upgrade: websocket"), "{forwarded}");
    assert!(forwarded.contains("connection: upgrade"), "{forwarded}");
    assert!(forwarded.contains("sec-websocket-key: "), "{forwarded}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn an_idle_kept_alive_connection_holds_little_memory() {
    let app = upstream("app");
    let gw = Tollgate::start(&simple_policy(&[app.addr.to_string()]));
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let answered = |conn: &mut TcpStream| {
        conn.write_all(request).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(conn.read(&mut byte).unwrap(), 1, "closed before a head");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
    };
    // One at a time, so that one upstream connection serves them all.
    let connect = || {
        let mut conn = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        answered(&mut conn);
        conn
    };
    let warm: Vec<TcpStream> = (0..20).map(|_| connect()).collect();
    let before = rss_kib(gw.child.id());
    const IDLE: u64 = 300;
    let idle: Vec<TcpStream> = (0..IDLE).map(|_| connect()).collect();
    let per_connection = (rss_kib(gw.child.id()).saturating_sub(before)) / IDLE;
    // nginx frees an idle connection's buffers; here the connection keeps its request
    // future, 14-15 KiB in all on a quiet machine. A 64 KiB read buffer per connection
    // (Pingora's default L4 buffer, which a plain HTTP session only copies out of) made
    // it 96, a TLS handshake's future held in place in every connection's task and
    // request future (pingora-core 0020) 34. Beside the full suite it has read 17 and
    // 18. Not the 4 KiB head buffer taken early (pingora-core 0021): with two CPU hogs
    // beside it, strace showed no idle connection reading into one before its next
    // request.
    assert!(
        per_connection < 22,
        "{per_connection} KiB per idle connection"
    );
    drop((warm, idle));
}
