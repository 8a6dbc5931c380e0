//! Retries (SPEC §3 `upstreams.*.retry`): which requests may be sent again, how long to
//! wait first, and the budget that keeps a failing pool from receiving a retry storm.
//!
//! Only methods listed in `methods`, or requests carrying `Idempotency-Key`, are
//! retried, and only before any of the response reached the client. The budget is a
//! share of the pool's requests over the last 10 s, plus `min_retries_per_second` so a
//! quiet pool can still retry (Finagle's and linkerd's retry budgets work this way).

use crate::breaker::FailureOn;
use crate::config;
use crate::policy::compile::Compile;
use crate::window::RollingPair;
use http::Method;
use std::time::Duration;

/// The window the budget is measured over.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

pub(crate) struct RetryPolicy {
    /// Extra tries after the first.
    pub(crate) attempts: u32,
    /// Outcomes worth another try.
    pub(crate) on: FailureOn,
    methods: Vec<Method>,
    backoff_base: Duration,
    backoff_max: Duration,
    budget: f64,
    min_retries_per_second: u32,
    /// Requests and retries to this pool over the budget window.
    spent: RollingPair,
    retries_total: prometheus::IntCounter,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("attempts", &self.attempts)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// How a pool's `retry` section reads once validated.
pub(crate) struct RetrySettings {
    pub(crate) attempts: u32,
    pub(crate) on: FailureOn,
    pub(crate) methods: Vec<Method>,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) budget: f64,
    pub(crate) min_retries_per_second: u32,
}

impl RetryPolicy {
    pub(crate) fn new(
        settings: RetrySettings,
        retries_total: prometheus::IntCounter,
    ) -> RetryPolicy {
        RetryPolicy {
            attempts: settings.attempts,
            on: settings.on,
            methods: settings.methods,
            backoff_base: settings.backoff_base,
            backoff_max: settings.backoff_max,
            budget: settings.budget,
            min_retries_per_second: settings.min_retries_per_second,
            spent: RollingPair::new(BUDGET_WINDOW),
            retries_total,
        }
    }

    /// Whether the request may be sent twice: a listed method, or an idempotency key.
    pub(crate) fn eligible(&self, method: &Method, headers: &http::HeaderMap) -> bool {
        self.methods.contains(method) || headers.contains_key("idempotency-key")
    }

    /// Counts a request sent to the pool (the budget's base).
    pub(crate) fn count_request(&self) {
        self.spent.add(crate::clock::millis(), 1, 0);
    }

    /// Takes one retry from the budget, if it has one left.
    pub(crate) fn take_retry(&self) -> bool {
        let now = crate::clock::millis();
        let (requests, retries) = self.spent.totals(now);
        let floor = f64::from(self.min_retries_per_second) * BUDGET_WINDOW.as_secs_f64();
        if f64::from(retries) >= self.budget * f64::from(requests) + floor {
            return false;
        }
        self.spent.add(now, 0, 1);
        self.retries_total.inc();
        true
    }

    /// The wait before retry number `retry` (1-based): exponential with full jitter,
    /// so retries of many clients spread out instead of arriving together.
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.backoff_max);
        ceiling.mul_f64(fastrand::f64())
    }
}

pub(crate) fn compile(
    cx: &mut Compile<'_>,
    pool: &str,
    r: &config::RetryConfig,
) -> Option<RetryPolicy> {
    let on = match FailureOn::parse(&r.on.value) {
        Ok(on) => on,
        Err(e) => {
            cx.error(&r.on.referenced, e.replace("failure_on", "retry.on"));
            return None;
        }
    };
    let mut methods = Vec::new();
    for m in &r.methods {
        match Method::from_bytes(m.value.to_ascii_uppercase().as_bytes()) {
            Ok(method) => methods.push(method),
            Err(_) => cx.error(
                &m.referenced,
                format!("`{}` is not an HTTP method", m.value),
            ),
        }
    }
    Some(RetryPolicy::new(
        RetrySettings {
            attempts: r.attempts,
            on,
            methods,
            backoff_base: r.backoff.base.0,
            backoff_max: r.backoff.max.0.max(r.backoff.base.0),
            budget: r.budget.0,
            min_retries_per_second: r.min_retries_per_second,
        },
        cx.metrics.retries(pool),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(budget: f64, floor: u32) -> RetryPolicy {
        RetryPolicy::new(
            RetrySettings {
                attempts: 2,
                on: FailureOn::default(),
                methods: vec![Method::GET],
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(1),
                budget,
                min_retries_per_second: floor,
            },
            prometheus::IntCounter::new("r", "r").unwrap(),
        )
    }

    #[test]
    fn the_budget_is_a_share_of_requests_plus_a_floor() {
        let p = policy(0.2, 0);
        for _ in 0..100 {
            p.count_request();
        }
        let granted = (0..100).filter(|_| p.take_retry()).count();
        assert_eq!(granted, 20);
        let quiet = policy(0.2, 1);
        let granted = (0..100).filter(|_| quiet.take_retry()).count();
        assert_eq!(granted, 10, "one per second over the 10 s window");
    }

    #[test]
    fn backoff_is_jittered_below_an_exponential_ceiling() {
        let p = policy(0.2, 0);
        for retry in 1..8 {
            let ceiling =
                Duration::from_millis(100 * (1 << (retry - 1))).min(Duration::from_secs(1));
            for _ in 0..50 {
                assert!(p.backoff(retry) <= ceiling);
            }
        }
    }

    #[test]
    fn methods_or_an_idempotency_key_make_a_request_eligible() {
        let p = policy(0.2, 0);
        let mut headers = http::HeaderMap::new();
        assert!(p.eligible(&Method::GET, &headers));
        assert!(!p.eligible(&Method::POST, &headers));
        headers.insert("idempotency-key", "k1".parse().unwrap());
        assert!(p.eligible(&Method::POST, &headers));
    }
}
