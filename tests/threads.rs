//! `server.threads` above 1 (every test policy asks for two): connections gather on
//! one thread while it can carry the load, spread when it is busy, gather again when
//! the load goes, and a kept-alive connection moved between two of its requests keeps
//! serving and keeps its deadlines.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A kept-alive client connection, one request at a time.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(gw: &Tollgate) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client {
            reader: BufReader::new(stream),
        }
    }

    /// Sends a GET and reads its whole response: the status.
    fn get(&mut self, path: &str) -> u16 {
        write!(
            self.reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"
        )
        .unwrap();
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        raw_status(&status_line).expect("a status line")
    }

    /// Whether the gateway closes the connection, idle, within `within`.
    fn closed_by_gateway(&mut self, within: Duration) -> bool {
        self.reader
            .get_ref()
            .set_read_timeout(Some(within))
            .unwrap();
        matches!(self.reader.read(&mut [0; 64]), Ok(0))
    }
}

fn on_thread(gw: &Tollgate, thread: usize) -> f64 {
    gw.metric(&format!(
        "tollgate_thread_connections{{thread=\"{thread}\"}}"
    ))
    .unwrap_or(0.0)
}

#[test]
fn connections_gather_spread_and_gather_again_without_a_failed_request() {
    let app = upstream("app");
    let body = simple_policy(&[app.addr.to_string()]);
    let gw = Tollgate::start(&body);

    // A light load: every connection on the first thread.
    let mut light: Vec<Client> = (0..4).map(|_| Client::connect(&gw)).collect();
    for client in &mut light {
        for _ in 0..3 {
            assert_eq!(client.get("/echo"), 200);
        }
    }
    assert!(wait_for(Duration::from_secs(5), || {
        on_thread(&gw, 0) == 4.0 && on_thread(&gw, 1) == 0.0
    }));
    assert_eq!(gw.metric("tollgate_threads_in_use"), Some(1.0));

    // A load the first thread cannot carry alone: the second is taken into use.
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..8)
        .map(|_| {
            let (stop, url) = (stop.clone(), gw.url("/echo"));
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                let mut failed = 0;
                while !stop.load(Ordering::Relaxed) {
                    if !client.get(&url).send().is_ok_and(|r| r.status() == 200) {
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();
    let spread = wait_for(Duration::from_secs(60), || {
        gw.metric("tollgate_threads_in_use") == Some(2.0)
    });
    // New connections go to the thread in use that serves the fewest.
    let mut later: Vec<Client> = (0..8).map(|_| Client::connect(&gw)).collect();
    for client in &mut later {
        assert_eq!(client.get("/echo"), 200);
    }
    let reached_second = wait_for(Duration::from_secs(10), || on_thread(&gw, 1) > 0.0);
    stop.store(true, Ordering::Relaxed);
    let failed: usize = busy.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(spread, "a busy thread did not take the second into use");
    assert!(
        reached_second,
        "no connection was served on the second thread"
    );
    assert_eq!(failed, 0, "requests failed while connections moved");

    // The load is gone: one thread again. Connections left on the second move to the
    // first after their next request.
    assert!(wait_for(Duration::from_secs(10), || {
        gw.metric("tollgate_threads_in_use") == Some(1.0)
    }));
    // A short idle timeout from the next request on, to see it kept across a move.
    let generation = gw.generation();
    let staged = gw.policy.with_extension("yaml.new");
    std::fs::write(
        &staged,
        format!(
            "{}{body}",
            head(gw.port, gw.admin_port, "  idle_timeout: 2s\n")
        ),
    )
    .unwrap();
    std::fs::rename(&staged, &gw.policy).unwrap();
    assert!(wait_for(Duration::from_secs(10), || gw.generation() > generation));
    let moved_before = gw.metric("tollgate_connections_moved_total").unwrap();
    let left_on_second = on_thread(&gw, 1);
    for client in light.iter_mut().chain(&mut later) {
        assert_eq!(client.get("/echo"), 200);
        assert_eq!(client.get("/echo"), 200);
    }
    assert!(wait_for(Duration::from_secs(5), || on_thread(&gw, 1) == 0.0));
    assert_eq!(on_thread(&gw, 0), 12.0);
    let moved = gw.metric("tollgate_connections_moved_total").unwrap();
    assert!(moved > 0.0, "no connection moved");
    if left_on_second > 0.0 {
        assert!(moved > moved_before);
    }

    // Each connection, moved or not, is closed after server.idle_timeout: its deadline
    // moved with it.
    for client in light.iter_mut().chain(&mut later) {
        assert!(client.closed_by_gateway(Duration::from_secs(10)));
    }
    assert!(wait_for(Duration::from_secs(5), || on_thread(&gw, 0) == 0.0));
}
