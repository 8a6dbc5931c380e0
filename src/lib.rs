//! tollgate: a reverse-proxy gateway on Pingora, driven by one hot-reloaded policy.
//!
//! `config` (what the operator wrote) → `policy` (compiled, validated, immutable) →
//! `proxy` (the request pipeline reading it through one `ArcSwap` load).
//!
//! Items are `pub(crate)` unless the binary, the examples, the tests or the fuzz
//! targets use them; the public modules below are that surface.

mod access_log;
mod admin;
mod breaker;
mod bulkhead;
pub mod cache;
mod certificate;
mod clock;
pub mod config;
mod connection;
pub mod demo;
mod digest;
pub mod events;
mod explain;
pub mod forwarding;
mod gateway;
mod health;
mod histogram;
mod history;
mod identity;
pub mod inject;
mod json;
pub mod logs;
pub mod metrics;
mod placement;
pub mod policy;
mod problem;
mod proxy;
pub mod ratelimit;
mod redis;
mod reply;
mod retry;
mod routing;
pub mod server;
mod shed;
mod signals;
mod slo;
mod trace;
pub mod units;
mod upstream;
pub mod webhook;
mod window;
mod worker;
