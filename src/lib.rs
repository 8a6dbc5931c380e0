//! tollgate: a reverse-proxy gateway on Pingora, driven by one hot-reloaded policy.
//!
//! `config` (what the operator wrote) → `policy` (compiled, validated, immutable) →
//! `proxy` (the request pipeline reading it through one `ArcSwap` load).

pub mod access_log;
pub mod admin;
pub mod breaker;
pub mod bulkhead;
pub mod cache;
pub mod clock;
pub mod config;
pub mod connection;
pub mod demo;
pub mod digest;
pub mod events;
pub mod explain;
pub mod forwarding;
pub mod gateway;
pub mod health;
pub mod histogram;
pub mod identity;
pub mod inject;
pub mod logs;
pub mod metrics;
pub mod policy;
pub mod problem;
pub mod proxy;
pub mod ratelimit;
pub mod redis;
pub mod retry;
pub mod routing;
pub mod server;
pub mod shed;
pub mod slo;
pub mod units;
pub mod upstream;
pub mod window;
