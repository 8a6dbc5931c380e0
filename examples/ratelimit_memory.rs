//! Resident memory of one rate-limit rule after N distinct client addresses, with the
//! gateway's allocator: `cargo run --release --example ratelimit_memory -- 1000000 [MAX_KEYS]`.

use std::time::Duration;
use tollgate::ratelimit::{key_hash, Buckets, Quota};
use tollgate::units::Rate;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("a number"));
    let clients = args.next().unwrap_or(1_000_000);
    let max_keys = args.next().unwrap_or(1_000_000);
    let store = Buckets::new(max_keys);
    let quota = Quota::new(
        Rate {
            count: 20,
            period: Duration::from_secs(60),
        },
        20,
        1.0,
    );
    let before = rss_kib();
    // One instant for all: every bucket is still draining, so none is evicted as refilled.
    let now = 1_000_000_000;
    for i in 0..clients as u32 {
        let octets = (0x0a00_0000u32 + i).to_be_bytes();
        let address = [4, octets[0], octets[1], octets[2], octets[3]];
        store.check(key_hash(&[&address]), &quota, true, now);
    }
    let after = rss_kib();
    println!(
        "{clients} distinct addresses, max_keys {max_keys}: {} keys held, RSS +{:.1} MiB ({:.0} bytes per held key)",
        store.len(),
        (after - before) as f64 / 1024.0,
        (after - before) as f64 * 1024.0 / store.len().max(1) as f64
    );
}
