//! Arbitrary `X-Forwarded-For` chains: resolving the client address never panics, an
//! untrusted peer is always the client, and a trusted peer's answer is either the peer
//! or an address the chain names.
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr};

fn trusted(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 10)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let peer = IpAddr::V4(Ipv4Addr::new(
        if first % 2 == 0 { 10 } else { 203 },
        0,
        0,
        first,
    ));
    let mut headers = HeaderMap::new();
    for value in rest.split(|&b| b == b'\n') {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append("x-forwarded-for", value);
        }
    }
    let client = tollgate::forwarding::client_ip(peer, &headers, trusted);
    if !trusted(peer) {
        assert_eq!(client, peer);
    } else if client != peer {
        let named = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains(&client.to_string()) || v.contains(&format!("{client:?}")));
        let bracketed = matches!(client, IpAddr::V6(_));
        assert!(named || bracketed, "{client} is not in the chain");
    }
});
