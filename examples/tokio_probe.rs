//! The cheapest reverse proxy a tokio program can be, for `bench/instruments`: what
//! part of tollgate's per-request cost any tokio design pays, and what part is
//! Pingora's. HTTP/1.1 keep-alive on both sides, one current-thread runtime, no
//! framework: each client connection gets its own upstream connection; a request head
//! is forwarded as it came, the response is relayed by its `Content-Length`. No
//! chunked bodies, no request bodies, no pipelining, no error pages: a probe, not a
//! proxy.
//!
//! `tokio_probe LISTEN ORIGIN`

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(origin)) = (args.next(), args.next()) else {
        eprintln!("usage: tokio_probe LISTEN ORIGIN");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN is host:port");
    let origin: SocketAddr = origin.parse().expect("ORIGIN is host:port");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let _ = serve(client, origin).await;
            });
        }
    })
}

/// Relays requests from `client` to one upstream connection until either side closes.
async fn serve(mut client: TcpStream, origin: SocketAddr) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(origin).await?;
    upstream.set_nodelay(true)?;
    let mut request = Vec::with_capacity(4096);
    let mut response = Vec::with_capacity(16 * 1024);
    loop {
        request.clear();
        if !read_head(&mut client, &mut request).await? {
            return Ok(());
        }
        upstream.write_all(&request).await?;
        response.clear();
        if !read_head(&mut upstream, &mut response).await? {
            return Ok(());
        }
        let head_end = head_end(&response).expect("read_head stops after a head");
        let length = content_length(&response[..head_end]).unwrap_or(0);
        while response.len() < head_end + length {
            if upstream.read_buf(&mut response).await? == 0 {
                return Ok(());
            }
        }
        client.write_all(&response).await?;
    }
}

/// Reads until `buf` holds a whole head (`\r\n\r\n`); `false` on a clean close first.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    loop {
        if head_end(buf).is_some() {
            return Ok(true);
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("head too large"));
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}
