//! Drops refilled rate-limit buckets every few seconds, so `max_keys` is a ceiling
//! rarely touched rather than the steady state.

use super::{Gateway, Ticks};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

const INTERVAL: Duration = Duration::from_secs(5);

pub(crate) struct Janitor {
    pub(crate) gateway: Arc<Gateway>,
}

#[async_trait::async_trait]
impl BackgroundService for Janitor {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut ticks = Ticks::every(INTERVAL, shutdown);
        while ticks.next().await {
            let policy = self.gateway.policy.load_full();
            let _ = tokio::task::spawn_blocking(move || policy.rate_limits.evict_refilled()).await;
        }
    }
}
