//! The service behind `placement`: every tick it reads how busy each proxy thread was,
//! puts the next plan in force, and shows the threads in use and their connections in
//! the metrics.

use super::{Gateway, Ticks};
use crate::placement::{plan, BusyMeter, Placement, TICK};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;

pub(crate) struct Balancer {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) placement: Arc<Placement>,
}

#[async_trait::async_trait]
impl BackgroundService for Balancer {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut meter = BusyMeter::default();
        let mut ticks = Ticks::every(TICK, shutdown);
        let metrics = &self.gateway.metrics;
        let per_thread: Vec<_> = (0..self.placement.connections().len())
            .map(|thread| {
                metrics
                    .thread_connections
                    .with_label_values(&[&thread.to_string()])
            })
            .collect();
        while ticks.next().await {
            let placement = &self.placement;
            let connections = placement.connections();
            // The proxy's threads are known once one of them has accepted a connection.
            if let Some(busy) = placement.runtimes().and_then(|r| meter.read(r)) {
                placement.apply(&plan(placement.in_use(), &busy, &connections));
            }
            metrics.threads_in_use.set(placement.in_use() as i64);
            for (gauge, count) in per_thread.iter().zip(&connections) {
                gauge.set(*count as i64);
            }
        }
    }
}
