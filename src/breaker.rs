//! Circuit breaking per upstream pool (SPEC §4 "Upstreams and circuit breaking").
//!
//! Closed: every request passes; consecutive failures, or a failure share over a
//! rolling window with a minimum number of requests, open it. Open: nothing reaches the
//! pool for `open_for` (doubling on every re-open up to `max_open_for`). Half-open: at
//! most `half_open_requests` trials run at once; `success_threshold` successes in a row
//! close it, any failure re-opens it.
//!
//! The closed state, where nearly all traffic is, costs two atomic loads to admit and a
//! few atomic adds to record; the mutex is only taken on failures and transitions.

use crate::config::{CircuitBreakerConfig, FailureCondition};
use crate::events::EventLog;
use crate::policy::compile::Compile;
use crate::window::RollingPair;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    pub(crate) consecutive_failures: Option<u32>,
    /// Share of failures (0..=1) that opens the breaker, with `min_requests` and `window`.
    pub(crate) failure_rate: Option<f64>,
    pub(crate) min_requests: u32,
    pub(crate) window: Duration,
    pub(crate) open_for: Duration,
    pub(crate) max_open_for: Duration,
    pub(crate) half_open_requests: u32,
    pub(crate) success_threshold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl State {
    fn from_u8(value: u8) -> State {
        match value {
            1 => State::HalfOpen,
            2 => State::Open,
            _ => State::Closed,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }
}

/// What the breaker reports when it changes state (metrics, log, events).
pub(crate) trait Observer: Send + Sync {
    fn transition(&self, to: State, open_for: Option<Duration>);
}

struct Transitions {
    /// While open: when half-open begins (process milliseconds).
    open_until: u64,
    /// The open period the next re-open uses.
    next_open_for: Duration,
    half_open_successes: u32,
}

pub(crate) struct Breaker {
    settings: Settings,
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    trials_inflight: AtomicU32,
    window: RollingPair,
    transitions: Mutex<Transitions>,
    observer: Box<dyn Observer>,
}

/// Permission for one request to reach the pool; record its outcome with
/// [`Ticket::record`]. A ticket dropped unrecorded (the client went away) counts as
/// neither success nor failure.
pub(crate) struct Ticket {
    breaker: Arc<Breaker>,
    trial: bool,
}

/// Why a request may not reach the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejected {
    /// Until the breaker lets trials through again.
    pub(crate) retry_after: Duration,
}

impl Breaker {
    pub(crate) fn new(settings: Settings, observer: Box<dyn Observer>) -> Arc<Breaker> {
        let window = settings.window;
        Arc::new(Breaker {
            transitions: Mutex::new(Transitions {
                open_until: 0,
                next_open_for: settings.open_for,
                half_open_successes: 0,
            }),
            settings,
            state: AtomicU8::new(State::Closed as u8),
            consecutive_failures: AtomicU32::new(0),
            trials_inflight: AtomicU32::new(0),
            window: RollingPair::new(window),
            observer,
        })
    }

    pub(crate) fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether a request now would be turned away without a trial: the circuit is open
    /// and its open period has not run out.
    pub(crate) fn rejects_now(&self) -> bool {
        self.state() == State::Open && crate::clock::millis() < self.lock().open_until
    }

    pub(crate) fn admit(self: &Arc<Self>) -> Result<Ticket, Rejected> {
        self.admit_at(crate::clock::millis())
    }

    fn admit_at(self: &Arc<Self>, now: u64) -> Result<Ticket, Rejected> {
        match self.state() {
            State::Closed => Ok(Ticket {
                breaker: self.clone(),
                trial: false,
            }),
            State::Open | State::HalfOpen => {
                let mut t = self.lock();
                if self.state() == State::Open {
                    if now < t.open_until {
                        return Err(Rejected {
                            retry_after: Duration::from_millis(t.open_until - now),
                        });
                    }
                    t.half_open_successes = 0;
                    self.trials_inflight.store(0, Ordering::Relaxed);
                    self.set_state(State::HalfOpen, None);
                }
                if self.state() == State::Closed {
                    return Ok(Ticket {
                        breaker: self.clone(),
                        trial: false,
                    });
                }
                if self.trials_inflight.load(Ordering::Relaxed) >= self.settings.half_open_requests
                {
                    // The trials decide soon; a client may come back in a second.
                    return Err(Rejected {
                        retry_after: Duration::from_secs(1),
                    });
                }
                self.trials_inflight.fetch_add(1, Ordering::Relaxed);
                Ok(Ticket {
                    breaker: self.clone(),
                    trial: true,
                })
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Transitions> {
        self.transitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, to: State, open_for: Option<Duration>) {
        self.state.store(to as u8, Ordering::Release);
        self.observer.transition(to, open_for);
    }

    fn record_at(&self, trial: bool, failure: bool, now: u64) {
        if trial {
            self.trials_inflight.fetch_sub(1, Ordering::Relaxed);
            let mut t = self.lock();
            if self.state() != State::HalfOpen {
                return;
            }
            if failure {
                self.open(&mut t, now);
            } else {
                t.half_open_successes += 1;
                if t.half_open_successes >= self.settings.success_threshold {
                    self.close(&mut t);
                }
            }
            return;
        }
        if self.state() != State::Closed {
            // Sent before the breaker opened: the trials decide now.
            return;
        }
        self.window.add(now, 1, u32::from(failure));
        if !failure {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let consecutive = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let by_count = self
            .settings
            .consecutive_failures
            .is_some_and(|limit| consecutive >= limit);
        let by_rate = self.settings.failure_rate.is_some_and(|rate| {
            let (requests, failures) = self.window.totals(now);
            requests >= self.settings.min_requests.max(1)
                && f64::from(failures) >= rate * f64::from(requests)
        });
        if by_count || by_rate {
            let mut t = self.lock();
            if self.state() == State::Closed {
                self.open(&mut t, now);
            }
        }
    }

    fn open(&self, t: &mut Transitions, now: u64) {
        let open_for = t.next_open_for;
        t.open_until = now + open_for.as_millis() as u64;
        t.next_open_for =
            (open_for * 2).min(self.settings.max_open_for.max(self.settings.open_for));
        self.set_state(State::Open, Some(open_for));
    }

    fn close(&self, t: &mut Transitions) {
        t.next_open_for = self.settings.open_for;
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.window.clear();
        self.set_state(State::Closed, None);
    }
}

impl Ticket {
    pub(crate) fn record(mut self, failure: bool) {
        let trial = std::mem::take(&mut self.trial);
        self.breaker
            .record_at(trial, failure, crate::clock::millis());
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.trial {
            // An abandoned trial frees its slot without deciding anything.
            self.breaker.trials_inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Which upstream outcomes count as failures (`failure_on`), for the pool's breaker
/// and its outlier ejection alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FailureOn {
    statuses: Vec<u16>,
    any_5xx: bool,
    pub(crate) connect_error: bool,
    pub(crate) timeout: bool,
}

impl FailureOn {
    pub(crate) fn status(&self, status: u16) -> bool {
        (self.any_5xx && (500..600).contains(&status)) || self.statuses.contains(&status)
    }

    pub(crate) fn parse(conditions: &[FailureCondition]) -> Result<FailureOn, String> {
        let mut on = FailureOn {
            statuses: Vec::new(),
            any_5xx: false,
            connect_error: false,
            timeout: false,
        };
        for condition in conditions {
            match condition {
                FailureCondition::Status(code) if (100..600).contains(code) => {
                    on.statuses.push(*code)
                }
                FailureCondition::Word(word) if word == "5xx" => on.any_5xx = true,
                FailureCondition::Word(word) if word == "connect_error" => on.connect_error = true,
                FailureCondition::Word(word) if word == "timeout" => on.timeout = true,
                other => {
                    return Err(format!(
                        "failure_on: `{}` is not a status code, 5xx, connect_error or timeout",
                        match other {
                            FailureCondition::Status(code) => code.to_string(),
                            FailureCondition::Word(word) => word.clone(),
                        }
                    ))
                }
            }
        }
        Ok(on)
    }
}

impl Default for FailureOn {
    /// SPEC's default: connect errors, timeouts, 502, 503, 504.
    fn default() -> Self {
        FailureOn {
            statuses: vec![502, 503, 504],
            any_5xx: false,
            connect_error: true,
            timeout: true,
        }
    }
}

/// A pool's breaker. `key` decides whether a reload keeps its state.
pub(crate) struct PoolBreaker {
    pub(crate) breaker: Arc<Breaker>,
    key: BreakerKey,
}

/// A pool server as the breaker sees it: address, the address as written, weight and
/// whether it is a backup.
pub(crate) type Server = (SocketAddr, Arc<str>, u32, bool);

/// What a breaker watches: a reload that keeps the pool's servers and the breaker
/// settings keeps the breaker and its state.
#[derive(Debug, Clone, PartialEq)]
struct BreakerKey {
    servers: Vec<Server>,
    settings: Settings,
}

impl std::fmt::Debug for PoolBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolBreaker({})", self.breaker.state().as_str())
    }
}

/// Reports transitions as the operator sees them: metrics, a log line, an event.
struct Report {
    pool: Arc<str>,
    state: prometheus::IntGauge,
    transitions: [prometheus::IntCounter; 3],
    events: Arc<EventLog>,
}

impl Observer for Report {
    fn transition(&self, to: State, open_for: Option<Duration>) {
        self.state.set(to as i64);
        self.transitions[to as usize].inc();
        let open_for_secs = open_for.map(|d| d.as_secs());
        tracing::warn!(upstream = %self.pool, to = to.as_str(), open_for_secs, "circuit breaker");
        self.events.record(
            "circuit_breaker",
            &format!("upstream `{}` circuit {}", self.pool, to.as_str()),
            serde_json::json!({ "upstream": &*self.pool, "to": to.as_str(), "open_for_secs": open_for_secs }),
        );
    }
}

/// Compiles a pool's `circuit_breaker`, keeping the previous breaker (and its state)
/// when the pool's servers and the breaker settings are unchanged.
pub(crate) fn compile(
    cx: &mut Compile<'_>,
    pool: &str,
    config: &CircuitBreakerConfig,
    servers: &[Server],
    previous: Option<&PoolBreaker>,
) -> PoolBreaker {
    let (metrics, events) = (cx.metrics, cx.events);
    let settings = Settings {
        consecutive_failures: Some(config.consecutive_failures).filter(|&n| n > 0),
        failure_rate: Some(config.failure_rate.0).filter(|&r| r > 0.0),
        min_requests: config.min_requests,
        window: config.window.0,
        open_for: config.open_for.0,
        max_open_for: config.max_open_for.0,
        half_open_requests: config.half_open_requests.max(1),
        success_threshold: config.success_threshold.max(1),
    };
    let key = BreakerKey {
        servers: servers.to_vec(),
        settings,
    };
    if let Some(previous) = previous.filter(|p| p.key == key) {
        return PoolBreaker {
            breaker: previous.breaker.clone(),
            key,
        };
    }
    let settings = key.settings.clone();
    let state = metrics.circuit_state(pool);
    state.set(State::Closed as i64);
    let report = Report {
        pool: pool.into(),
        state,
        transitions: [State::Closed, State::HalfOpen, State::Open]
            .map(|s| metrics.circuit_transitions(pool, s.as_str())),
        events: events.clone(),
    };
    PoolBreaker {
        breaker: Breaker::new(settings, Box::new(report)),
        key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    type Transition = (State, Option<Duration>);

    #[derive(Default, Clone)]
    struct Log(Arc<StdMutex<Vec<Transition>>>);

    impl Observer for Log {
        fn transition(&self, to: State, open_for: Option<Duration>) {
            self.0.lock().unwrap().push((to, open_for));
        }
    }

    fn settings() -> Settings {
        Settings {
            consecutive_failures: Some(5),
            failure_rate: None,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(60),
            max_open_for: Duration::from_secs(300),
            half_open_requests: 2,
            success_threshold: 3,
        }
    }

    fn outcome(b: &Arc<Breaker>, failure: bool, now: u64) {
        let ticket = b.admit_at(now).expect("admitted");
        let trial = ticket.trial;
        std::mem::forget(ticket);
        b.record_at(trial, failure, now);
    }

    #[test]
    fn opens_after_exactly_the_consecutive_failures_and_a_success_resets_the_count() {
        let log = Log::default();
        let b = Breaker::new(settings(), Box::new(log.clone()));
        for _ in 0..4 {
            outcome(&b, true, 1_000);
        }
        outcome(&b, false, 1_000);
        for _ in 0..4 {
            outcome(&b, true, 1_000);
        }
        assert_eq!(b.state(), State::Closed);
        outcome(&b, true, 1_000);
        assert_eq!(b.state(), State::Open);
        let rejected = b.admit_at(31_000).err().unwrap();
        assert_eq!(rejected.retry_after, Duration::from_secs(30));
        assert_eq!(
            *log.0.lock().unwrap(),
            [(State::Open, Some(Duration::from_secs(60)))]
        );
    }

    #[test]
    fn half_open_limits_trials_closes_on_successes_and_reopens_longer_on_failure() {
        let log = Log::default();
        let b = Breaker::new(settings(), Box::new(log.clone()));
        for _ in 0..5 {
            outcome(&b, true, 0);
        }
        let first = b.admit_at(60_000).unwrap();
        let second = b.admit_at(60_000).unwrap();
        assert!(first.trial && second.trial);
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.admit_at(60_000).is_err(), "only two concurrent trials");
        drop(second);
        let third = b.admit_at(60_000).unwrap();
        assert!(third.trial, "an abandoned trial frees its slot");
        b.record_at(true, true, 60_000);
        std::mem::forget(first);
        assert_eq!(b.state(), State::Open);
        // Re-opened for twice as long.
        assert!(b.admit_at(60_000 + 119_000).is_err());
        drop(third);
        for _ in 0..3 {
            outcome(&b, false, 60_000 + 120_000);
        }
        assert_eq!(b.state(), State::Closed);
        let states: Vec<State> = log.0.lock().unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(
            states,
            [
                State::Open,
                State::HalfOpen,
                State::Open,
                State::HalfOpen,
                State::Closed
            ]
        );
        assert_eq!(log.0.lock().unwrap()[2].1, Some(Duration::from_secs(120)));
    }

    #[test]
    fn failure_rate_needs_the_minimum_requests_within_the_window() {
        let b = Breaker::new(
            Settings {
                consecutive_failures: None,
                failure_rate: Some(0.5),
                min_requests: 10,
                ..settings()
            },
            Box::new(Log::default()),
        );
        // 4 of 8 fail: half, but under the minimum.
        for n in 0..8 {
            outcome(&b, n % 2 == 0, 1_000);
        }
        assert_eq!(b.state(), State::Closed);
        // Old requests leave the window: 9 more, alternating, within a fresh window.
        for n in 0..9 {
            outcome(&b, n % 2 == 1, 20_000);
        }
        assert_eq!(b.state(), State::Closed, "the first eight aged out");
        outcome(&b, true, 20_000);
        assert_eq!(b.state(), State::Open, "5 of 10 within the window");
    }
}
