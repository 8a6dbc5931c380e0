//! Samples the counters into the 15-minute history every 5 seconds (`GET /history`).

use super::{unix_now, Gateway, Ticks};
use crate::history::INTERVAL;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;

pub(crate) struct Historian {
    pub(crate) gateway: Arc<Gateway>,
}

#[async_trait::async_trait]
impl BackgroundService for Historian {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut ticks = Ticks::every(INTERVAL, shutdown);
        while ticks.next().await {
            let families = self.gateway.metrics.registry.gather();
            self.gateway.history.sample(&families, unix_now());
        }
    }
}
