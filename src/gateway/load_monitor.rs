//! The service behind load shedding (`shed`): every tick the monitor reads the load
//! and decides a level; a new level brings its rate-limit scale, metric, log line and
//! event. An operator's forced level (`PUT /shedding`) goes through the same door.

use super::{Gateway, Ticks};
use crate::shed::{Monitor, TICK};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) struct LoadMonitor {
    pub(crate) gateway: Arc<Gateway>,
}

#[async_trait::async_trait]
impl BackgroundService for LoadMonitor {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut monitor = Monitor::new();
        let mut ticks = Ticks::every(TICK, shutdown);
        while ticks.next().await {
            let gateway = &self.gateway;
            let policy = gateway.policy.load_full();
            let reading = monitor.tick(
                &gateway.load,
                gateway.inflight(),
                policy.shedding.as_ref(),
                Instant::now(),
            );
            gateway.metrics.load_ratio.set(reading.ratio);
            set_level(gateway, reading.level, reading.ratio);
        }
    }
}

/// Forces `level` for `duration`, in force for the very next request (an operator
/// forcing a level in an incident expects that); `None` returns to automatic at the
/// monitor's next tick.
pub(crate) fn force(gateway: &Gateway, level: Option<(u8, Duration)>) {
    gateway.load.set_forced(level);
    if let Some((level, _)) = level {
        let levels = gateway
            .policy
            .load()
            .shedding
            .as_ref()
            .map_or(0, |s| s.levels.len());
        set_level(gateway, level.min(levels as u8), gateway.load.ratio());
    }
}

/// Puts `level` in force, with its rate-limit scale, metric and event when it changed.
fn set_level(gateway: &Gateway, level: u8, ratio: f64) {
    let Some(previous) = gateway.load.set_level(level) else {
        return;
    };
    let policy = gateway.policy.load();
    let scale = policy
        .shedding
        .as_ref()
        .and_then(|s| s.levels.get((level as usize).checked_sub(1)?))
        .map_or(1.0, |l| l.limit_scale);
    gateway.set_limit_scale(scale);
    gateway.metrics.shedding_level.set(i64::from(level));
    let forced = gateway.load.forced().is_some();
    tracing::warn!(
        from = previous,
        to = level,
        ratio,
        forced,
        limit_scale = scale,
        "shedding level"
    );
    gateway.events.record(
        "shedding",
        &format!("shedding level {previous} -> {level}"),
        serde_json::json!({ "from": previous, "to": level, "ratio": ratio, "forced": forced, "limit_scale": scale }),
    );
}
