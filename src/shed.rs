//! Load-based shedding (SPEC §3 `shedding`, §4 "Shedding").
//!
//! A background monitor turns three signals into one load ratio — in-flight requests
//! against `max_inflight`, upstream p95 latency against `latency_target`, process CPU
//! against the cgroup quota — each smoothed over `smoothing`, and moves through the
//! policy's levels: up at once when the load passes a level's `above`, down one level
//! only after the load stayed under `above - recover_below_margin` for `hold`.
//!
//! Recovery looks at the *offered* load: what is measured plus what the shed requests
//! would add if they were let through (their rate × the shed priorities' own recent
//! upstream time, Little's law). Measured load alone drops as soon as shedding relieves
//! it, so a gateway at 1.5× capacity would leave the level, be overloaded again, and
//! cycle with the hold. The shed priorities' upstream time is what they cost when they
//! last got through, within the last `smoothing`: with no fresh sample it counts for
//! nothing, so shed requests can never hold a level up on their own once the load that
//! raised it is gone (recovery within `smoothing + hold`). The
//! request path reads the level with one atomic load; at a level, routes whose
//! priority it lists are answered with their fallback or 503 `overloaded`, and every
//! rate limit is scaled by the level's `limit_scale`.

use crate::config;
use crate::config::Priority;
use crate::histogram::Histogram;
use crate::policy::compile::Compile;
use crate::problem::{Code, Problem};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the monitor samples the signals.
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// `shedding` as compiled from the policy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shedding {
    pub(crate) max_inflight: usize,
    pub(crate) latency_target: Option<Duration>,
    pub(crate) cpu: bool,
    pub(crate) smoothing: Duration,
    pub(crate) levels: Vec<Level>,
    pub(crate) margin: f64,
    pub(crate) hold: Duration,
    pub(crate) retry_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Level {
    pub(crate) above: f64,
    pub(crate) shed: Vec<Priority>,
    pub(crate) limit_scale: f64,
}

impl Level {
    /// `critical` is never shed, whatever a level lists.
    pub(crate) fn sheds(&self, priority: Priority) -> bool {
        priority != Priority::Critical && self.shed.contains(&priority)
    }
}

/// The live load state, shared by the monitor, the request path and the admin API.
#[derive(Default)]
pub(crate) struct Load {
    /// 0 = normal; `n` = the policy's `levels[n - 1]`.
    level: AtomicU8,
    ratio: AtomicU64,
    signals: [AtomicU64; 3],
    /// Upstream response times since the monitor's last tick: all of them, and those
    /// of each priority that can be shed (`Priority::sheddable_index`).
    upstream_latency: Histogram,
    sheddable_latency: [Histogram; SHEDDABLE],
    /// Requests shed so far (for the offered load).
    shed: AtomicU64,
    forced: Mutex<Option<Forced>>,
    /// An operator released a forced level the monitor may not have seen yet.
    released: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct Forced {
    level: u8,
    until: Instant,
}

/// The smoothed signals, as load ratios; `None` when the policy does not use one.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Signals {
    pub(crate) inflight: f64,
    pub(crate) latency: Option<f64>,
    pub(crate) cpu: Option<f64>,
}

/// Priorities a level may shed: all but `critical`.
const SHEDDABLE: usize = 3;

fn sheddable_index(priority: Priority) -> Option<usize> {
    match priority {
        Priority::Critical => None,
        Priority::High => Some(0),
        Priority::Normal => Some(1),
        Priority::Low => Some(2),
    }
}

impl Load {
    /// Records how long the upstream took to answer a request of `priority`.
    pub(crate) fn record_upstream(&self, latency: Duration, priority: Priority) {
        self.upstream_latency.record(latency);
        if let Some(i) = sheddable_index(priority) {
            self.sheddable_latency[i].record(latency);
        }
    }

    /// Counts a request answered by shedding.
    pub(crate) fn count_shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn level(&self) -> u8 {
        self.level.load(Ordering::Relaxed)
    }

    pub(crate) fn ratio(&self) -> f64 {
        f64::from_bits(self.ratio.load(Ordering::Relaxed))
    }

    pub(crate) fn signals(&self) -> Signals {
        let read = |i: usize| f64::from_bits(self.signals[i].load(Ordering::Relaxed));
        let optional = |v: f64| (!v.is_nan()).then_some(v);
        Signals {
            inflight: read(0),
            latency: optional(read(1)),
            cpu: optional(read(2)),
        }
    }

    fn publish(&self, level: u8, ratio: f64, signals: Signals) -> Reading {
        self.ratio.store(ratio.to_bits(), Ordering::Relaxed);
        let store = |i: usize, v: f64| self.signals[i].store(v.to_bits(), Ordering::Relaxed);
        store(0, signals.inflight);
        store(1, signals.latency.unwrap_or(f64::NAN));
        store(2, signals.cpu.unwrap_or(f64::NAN));
        Reading { level, ratio }
    }

    /// Puts `level` in force for the request path (one atomic); the level it replaced,
    /// if it changed.
    pub(crate) fn set_level(&self, level: u8) -> Option<u8> {
        let previous = self.level.swap(level, Ordering::Relaxed);
        (previous != level).then_some(previous)
    }

    /// The forced level and until when, if one is in force.
    pub(crate) fn forced(&self) -> Option<(u8, Instant)> {
        let forced = *self.forced.lock().unwrap_or_else(|e| e.into_inner());
        forced
            .filter(|f| f.until > Instant::now())
            .map(|f| (f.level, f.until))
    }

    pub(crate) fn set_forced(&self, level: Option<(u8, Duration)>) {
        let mut forced = self.forced.lock().unwrap_or_else(|e| e.into_inner());
        if forced.is_some() && level.is_none() {
            self.released.store(true, Ordering::Relaxed);
        }
        *forced = level.map(|(level, d)| Forced {
            level,
            until: Instant::now() + d,
        });
    }
}

/// The 503 a shed request of `priority` gets when its route has no fallback.
pub(crate) fn overloaded(shedding: &Shedding, priority: Priority) -> Problem {
    Problem::new(
        Code::Overloaded,
        format!(
            "the gateway is shedding {} priority traffic under load",
            priority.as_str()
        ),
    )
    .retry_after(shedding.retry_after)
}

/// The level the request path should apply to `priority`, if it sheds it.
pub(crate) fn shed_level<'a>(
    load: &Load,
    shedding: &'a Shedding,
    priority: Priority,
) -> Option<&'a Level> {
    let level = load.level() as usize;
    let level = shedding.levels.get(level.checked_sub(1)?)?;
    level.sheds(priority).then_some(level)
}

/// The monitor's memory between ticks: smoothed signals, CPU counters, and since when
/// the load has been low enough to leave the current level.
pub(crate) struct Monitor {
    smoothed: Option<Signals>,
    /// The smoothed in-flight ratio the shed requests would add.
    shed_extra: f64,
    shed_seen: u64,
    /// Per sheddable priority: its last upstream median, in seconds, and when it was
    /// seen.
    sheddable_latency: [Option<(f64, Instant)>; SHEDDABLE],
    cpu: CpuMeter,
    recovering_since: Option<Instant>,
    was_forced: bool,
}

impl Default for Monitor {
    fn default() -> Monitor {
        Monitor::new()
    }
}

/// One tick's verdict: the level to put in force, and the load ratio.
pub(crate) struct Reading {
    pub(crate) level: u8,
    pub(crate) ratio: f64,
}

impl Monitor {
    pub(crate) fn new() -> Monitor {
        Monitor {
            smoothed: None,
            shed_extra: 0.0,
            shed_seen: 0,
            sheddable_latency: [None; SHEDDABLE],
            cpu: CpuMeter::new(),
            recovering_since: None,
            was_forced: false,
        }
    }

    /// Reads the load's signals since the last tick (`inflight` requests now) and
    /// decides the level; the ratio and signals are published in `load` at once, the
    /// level by the caller, which knows what a new level changes.
    pub(crate) fn tick(
        &mut self,
        load: &Load,
        inflight: usize,
        shedding: Option<&Shedding>,
        now: Instant,
    ) -> Reading {
        let latency_counts = load.upstream_latency.drain();
        for (latest, histogram) in self
            .sheddable_latency
            .iter_mut()
            .zip(&load.sheddable_latency)
        {
            if let Some(p50) = crate::histogram::quantile(&histogram.drain(), 0.5) {
                *latest = Some((p50.as_secs_f64(), now));
            }
        }
        let cpu_share = self.cpu.sample();
        let Some(shedding) = shedding else {
            self.smoothed = None;
            self.recovering_since = None;
            return load.publish(0, 0.0, Signals::default());
        };
        let raw = Signals {
            inflight: inflight as f64 / shedding.max_inflight.max(1) as f64,
            latency: shedding.latency_target.map(|target| {
                crate::histogram::quantile(&latency_counts, 0.95).map_or(0.0, |p95| {
                    p95.as_secs_f64() / target.as_secs_f64().max(1e-6)
                })
            }),
            cpu: shedding.cpu.then(|| cpu_share.unwrap_or(0.0)),
        };
        let alpha = (TICK.as_secs_f64() / shedding.smoothing.as_secs_f64().max(TICK.as_secs_f64()))
            .min(1.0);
        let blend = |old: f64, new: f64| old + alpha * (new - old);
        let smoothed = match self.smoothed {
            None => raw,
            Some(old) => Signals {
                inflight: blend(old.inflight, raw.inflight),
                latency: raw.latency.map(|n| blend(old.latency.unwrap_or(n), n)),
                cpu: raw.cpu.map(|n| blend(old.cpu.unwrap_or(n), n)),
            },
        };
        self.smoothed = Some(smoothed);
        let ratio = smoothed
            .inflight
            .max(smoothed.latency.unwrap_or(0.0))
            .max(smoothed.cpu.unwrap_or(0.0));

        let shed_now = load.shed.load(Ordering::Relaxed);
        let shed_rate = shed_now.saturating_sub(self.shed_seen) as f64 / TICK.as_secs_f64();
        self.shed_seen = shed_now;
        let typical = self.shed_latency(shedding, load.level(), now);
        // At most one `max_inflight` more: a guess about traffic that is not let
        // through should not outweigh what is measured.
        let extra = (shed_rate * typical / shedding.max_inflight.max(1) as f64).min(1.0);
        self.shed_extra = blend(self.shed_extra, extra);
        let offered = ratio.max(smoothed.inflight + self.shed_extra);

        let current = load.level();
        let released = load.released.swap(false, Ordering::Relaxed);
        let left_forced = std::mem::take(&mut self.was_forced) || released;
        let level = match load.forced() {
            Some((forced, _)) => {
                self.recovering_since = None;
                self.was_forced = true;
                forced.min(shedding.levels.len() as u8)
            }
            // Leaving a forced level: the load decides afresh, without a hold.
            None if left_forced => passed_levels(shedding, ratio),
            None => self.automatic(shedding, current, ratio, offered, now),
        };
        // An operator may have forced a level while this tick computed its own.
        let level = load
            .forced()
            .map_or(level, |(forced, _)| forced.min(shedding.levels.len() as u8));
        load.publish(level, ratio, smoothed)
    }

    /// The upstream time a shed request would take: the slowest recent median among
    /// the priorities `level` sheds, seen within the last `smoothing`; 0 without one.
    fn shed_latency(&self, shedding: &Shedding, level: u8, now: Instant) -> f64 {
        let Some(level) = shedding.levels.get((level as usize).wrapping_sub(1)) else {
            return 0.0;
        };
        let fresh_since = now.checked_sub(shedding.smoothing.max(TICK)).unwrap_or(now);
        level
            .shed
            .iter()
            .filter_map(|&p| self.sheddable_latency[sheddable_index(p)?])
            .filter(|&(_, seen)| seen >= fresh_since)
            .map(|(secs, _)| secs)
            .fold(0.0, f64::max)
    }

    /// Up at once to the highest level the measured load passes; down one level after
    /// the offered load stayed under the current level's threshold minus the margin for
    /// `hold`.
    fn automatic(
        &mut self,
        shedding: &Shedding,
        current: u8,
        ratio: f64,
        offered: f64,
        now: Instant,
    ) -> u8 {
        let target = passed_levels(shedding, ratio);
        let current = current.min(shedding.levels.len() as u8);
        if target >= current {
            self.recovering_since = None;
            return target;
        }
        let threshold = shedding.levels[current as usize - 1].above - shedding.margin;
        if offered >= threshold {
            self.recovering_since = None;
            return current;
        }
        let since = *self.recovering_since.get_or_insert(now);
        if now.duration_since(since) >= shedding.hold {
            self.recovering_since = None;
            current - 1
        } else {
            current
        }
    }
}

/// The highest level whose threshold `ratio` passes.
fn passed_levels(shedding: &Shedding, ratio: f64) -> u8 {
    shedding
        .levels
        .iter()
        .take_while(|l| ratio > l.above)
        .count() as u8
}

/// Process CPU time against the CPUs this process may use: the cgroup v2 quota
/// (`cpu.max`), else v1 (`cfs_quota_us / cfs_period_us`), else the host's CPUs.
struct CpuMeter {
    last: Option<(Instant, f64)>,
    cpus: f64,
}

impl CpuMeter {
    fn new() -> CpuMeter {
        CpuMeter {
            last: None,
            cpus: cgroup_cpus().unwrap_or_else(|| crate::policy::usable_cpus() as f64),
        }
    }

    /// Share of the allowed CPU used since the last sample.
    fn sample(&mut self) -> Option<f64> {
        let now = Instant::now();
        let used = process_cpu_seconds()?;
        let share = self.last.map(|(then, before)| {
            let wall = now.duration_since(then).as_secs_f64().max(1e-3);
            (used - before) / wall / self.cpus
        });
        self.last = Some((now, used));
        share
    }
}

/// User + system CPU seconds of this process (`/proc/self/stat`, in USER_HZ = 100).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

fn cgroup_cpus() -> Option<f64> {
    if let Ok(max) = std::fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        let mut parts = max.split_whitespace();
        let (quota, period) = (parts.next()?, parts.next()?);
        if quota == "max" {
            return None;
        }
        return Some(quota.parse::<f64>().ok()? / period.parse::<f64>().ok()?);
    }
    let read = |f: &str| -> Option<f64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let quota = read("cpu.cfs_quota_us")?;
    (quota > 0.0).then(|| quota / read("cpu.cfs_period_us").unwrap_or(100_000.0))
}

pub(crate) fn compile(
    cx: &mut Compile<'_>,
    s: &config::SheddingConfig,
) -> Option<crate::shed::Shedding> {
    let levels: Vec<crate::shed::Level> = s
        .levels
        .value
        .iter()
        .map(|l| crate::shed::Level {
            above: l.above.0,
            shed: l.shed.clone(),
            limit_scale: l.limit_scale,
        })
        .collect();
    if levels.is_empty() || levels.len() > 8 {
        cx.error(&s.levels.referenced, "shedding: define one to eight levels");
        return None;
    }
    if levels.windows(2).any(|w| w[0].above >= w[1].above) {
        cx.error(
            &s.levels.referenced,
            "shedding levels must be listed by rising `above`",
        );
        return None;
    }
    if levels
        .iter()
        .any(|l| !(l.limit_scale > 0.0 && l.limit_scale <= 1.0))
    {
        cx.error(
            &s.levels.referenced,
            "a level's limit_scale must be above 0 and at most 1",
        );
        return None;
    }
    if s.max_inflight == 0 {
        cx.error(
            &s.levels.referenced,
            "shedding max_inflight must be at least 1",
        );
        return None;
    }
    Some(crate::shed::Shedding {
        max_inflight: s.max_inflight,
        latency_target: s.latency_target.map(|d| d.0),
        cpu: s.cpu,
        smoothing: s.smoothing.0,
        levels,
        margin: s.recover_below_margin.0,
        hold: s.hold.0,
        retry_after: s.retry_after.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shedding() -> Shedding {
        Shedding {
            max_inflight: 10,
            latency_target: None,
            cpu: false,
            smoothing: TICK,
            levels: vec![
                Level {
                    above: 0.8,
                    shed: vec![Priority::Low],
                    limit_scale: 0.5,
                },
                Level {
                    above: 0.95,
                    shed: vec![
                        Priority::Low,
                        Priority::Normal,
                        Priority::High,
                        Priority::Critical,
                    ],
                    limit_scale: 0.25,
                },
            ],
            margin: 0.05,
            hold: Duration::from_secs(10),
            retry_after: Duration::from_secs(5),
        }
    }

    fn monitor() -> Monitor {
        Monitor::new()
    }

    #[test]
    fn rises_at_once_and_recovers_only_after_hold_below_the_margin() {
        let s = shedding();
        let mut m = monitor();
        let t0 = Instant::now();
        assert_eq!(m.automatic(&s, 0, 0.5, 0.5, t0), 0);
        assert_eq!(
            m.automatic(&s, 0, 0.97, 0.97, t0),
            2,
            "straight to the highest passed"
        );
        // Hovering just under 95 % (inside the margin) never leaves level 2.
        for n in 0..100 {
            let ratio = if n % 2 == 0 { 0.94 } else { 0.96 };
            assert_eq!(
                m.automatic(&s, 2, ratio, ratio, t0 + Duration::from_secs(n)),
                2
            );
        }
        // Under 90 %: one level down after 10 s, not before.
        let t1 = t0 + Duration::from_secs(200);
        assert_eq!(m.automatic(&s, 2, 0.85, 0.85, t1), 2);
        assert_eq!(
            m.automatic(&s, 2, 0.85, 0.85, t1 + Duration::from_secs(9)),
            2
        );
        assert_eq!(
            m.automatic(&s, 2, 0.85, 0.85, t1 + Duration::from_secs(10)),
            1
        );
        // A bounce above the threshold restarts the hold.
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(m.automatic(&s, 1, 0.5, 0.5, t2), 1);
        assert_eq!(
            m.automatic(&s, 1, 0.78, 0.78, t2 + Duration::from_secs(5)),
            1
        );
        assert_eq!(
            m.automatic(&s, 1, 0.5, 0.5, t2 + Duration::from_secs(11)),
            1
        );
        assert_eq!(
            m.automatic(&s, 1, 0.5, 0.5, t2 + Duration::from_secs(21)),
            0
        );
    }

    #[test]
    fn recovery_waits_for_the_offered_load_not_the_relieved_one() {
        let s = shedding();
        let mut m = monitor();
        let t0 = Instant::now();
        assert_eq!(m.automatic(&s, 0, 0.85, 0.85, t0), 1);
        // Shedding brought the measured load to 60 %, but the shed traffic would put it
        // back at 90 %: the level stays, however long.
        for n in 1..60 {
            assert_eq!(m.automatic(&s, 1, 0.6, 0.9, t0 + Duration::from_secs(n)), 1);
        }
        // The offered load itself dropped: down after the hold.
        let t1 = t0 + Duration::from_secs(100);
        assert_eq!(m.automatic(&s, 1, 0.6, 0.6, t1), 1);
        assert_eq!(
            m.automatic(&s, 1, 0.6, 0.6, t1 + Duration::from_secs(10)),
            0
        );
    }

    #[test]
    fn a_shed_priority_counts_its_own_recent_upstream_time_only() {
        let s = shedding();
        let mut m = monitor();
        let t0 = Instant::now();
        // Level 1 sheds low only: a slow normal route says nothing about it.
        m.sheddable_latency[sheddable_index(Priority::Normal).unwrap()] = Some((4.0, t0));
        assert_eq!(m.shed_latency(&s, 1, t0), 0.0);
        m.sheddable_latency[sheddable_index(Priority::Low).unwrap()] = Some((0.2, t0));
        assert_eq!(m.shed_latency(&s, 1, t0), 0.2);
        // Level 2 sheds both: the slower one.
        assert_eq!(m.shed_latency(&s, 2, t0), 4.0);
        // Without a fresh sample within `smoothing`, it counts for nothing.
        assert_eq!(m.shed_latency(&s, 2, t0 + s.smoothing + TICK), 0.0);
        assert_eq!(m.shed_latency(&s, 0, t0), 0.0, "nothing is shed at level 0");
    }

    #[test]
    fn critical_is_never_shed() {
        let s = shedding();
        let load = Load::default();
        load.level.store(2, Ordering::Relaxed);
        assert!(shed_level(&load, &s, Priority::High).is_some());
        assert!(shed_level(&load, &s, Priority::Critical).is_none());
        load.level.store(1, Ordering::Relaxed);
        assert!(shed_level(&load, &s, Priority::Normal).is_none());
        assert_eq!(
            shed_level(&load, &s, Priority::Low).unwrap().limit_scale,
            0.5
        );
    }

    #[test]
    fn cpu_time_is_readable() {
        assert!(process_cpu_seconds().is_some());
        let mut meter = CpuMeter::new();
        assert!(meter.sample().is_none(), "the first sample has no interval");
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {}
        assert!(meter.sample().unwrap() > 0.0);
    }
}
