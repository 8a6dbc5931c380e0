//! Active health checks (SPEC §3 `upstreams.*.health_check`): a background service
//! (`gateway::health_checker`) probes every server of every pool that has a `health_check`, through the same peer
//! settings (TLS, SNI, CA) as proxied traffic. `unhealthy_after` failed probes in a row
//! take a server out of rotation, `healthy_after` passed ones bring it back.
//!
//! Health lives in each server's shared state, so it survives reloads that keep the
//! server, and a new server starts healthy (traffic is not refused before the first
//! probe has run; its first probe is due at once).

use crate::config;
use crate::policy::compile::Compile;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthCheck {
    pub(crate) path: String,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) healthy_after: u32,
    pub(crate) unhealthy_after: u32,
    /// Inclusive status range that passes.
    pub(crate) expect: (u16, u16),
}

/// Parses `expect`: one status (`"200"`) or an inclusive range (`"200-399"`).
pub(crate) fn parse_expect(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("expect `{text}`: write a status or a range such as \"200-399\"");
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (low.trim(), high.trim()),
        None => (text.trim(), text.trim()),
    };
    let low: u16 = low.parse().map_err(|_| bad())?;
    let high: u16 = high.parse().map_err(|_| bad())?;
    if !(100..=599).contains(&low) || !(low..=599).contains(&high) {
        return Err(bad());
    }
    Ok((low, high))
}

pub(crate) fn compile(cx: &mut Compile<'_>, h: &config::HealthCheckConfig) -> Option<HealthCheck> {
    if !h.path.value.starts_with('/') {
        cx.error(&h.path.referenced, "health_check path must start with /");
        return None;
    }
    let expect = match crate::health::parse_expect(&h.expect.value) {
        Ok(expect) => expect,
        Err(e) => {
            cx.error(&h.expect.referenced, e);
            return None;
        }
    };
    if h.interval.0.is_zero() || h.timeout.0.is_zero() {
        cx.error(
            &h.path.referenced,
            "health_check interval and timeout must be above 0s",
        );
        return None;
    }
    Some(HealthCheck {
        path: h.path.value.clone(),
        interval: h.interval.0,
        timeout: h.timeout.0,
        healthy_after: h.healthy_after.max(1),
        unhealthy_after: h.unhealthy_after.max(1),
        expect,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::ServerState;

    #[test]
    fn expect_ranges() {
        assert_eq!(parse_expect("200-399"), Ok((200, 399)));
        assert_eq!(parse_expect("204"), Ok((204, 204)));
        assert!(parse_expect("399-200").is_err());
        assert!(parse_expect("2xx").is_err());
        assert!(parse_expect("600").is_err());
    }

    #[test]
    fn thresholds_flip_health_only_after_streaks() {
        let state = ServerState::default();
        assert!(state.is_healthy());
        assert_eq!(state.count_probe(false, 2, 3), None);
        assert_eq!(state.count_probe(false, 2, 3), None);
        assert_eq!(
            state.count_probe(true, 2, 3),
            None,
            "a pass breaks the streak"
        );
        for _ in 0..2 {
            assert_eq!(state.count_probe(false, 2, 3), None);
        }
        assert_eq!(state.count_probe(false, 2, 3), Some(false));
        assert!(!state.is_healthy());
        assert_eq!(state.count_probe(false, 2, 3), None, "already unhealthy");
        assert_eq!(state.count_probe(true, 2, 3), None);
        assert_eq!(state.count_probe(true, 2, 3), Some(true));
        assert!(state.is_healthy());
    }
}
