//! Rate limiting (SPEC §4): GCRA buckets per rule and key, narrowest key first, the
//! first denial stops evaluation, memory bounded by `max_keys`.
//!
//! Why not governor's keyed limiter: it has no hard cap on keys (every unseen key is
//! inserted), one fixed quota per limiter, and its eviction (`retain_recent`) cannot be
//! asked to keep limited clients while dropping the rest at a cap. The spec needs all
//! three: `max_keys`, `limit_scale` applied to existing buckets without losing their
//! state, and eviction that never forgives a client still over its limit. GCRA keeps
//! one timestamp per key, so the store below is small.

mod compile;
mod shared;

pub(crate) use compile::compile;

use crate::config::{HeadersMode, OnRedisError, RuleRate, When};
use crate::metrics::Metrics;
use crate::problem::{whole_seconds, Code, Problem};
use crate::units::Rate;
use http::{HeaderName, HeaderValue};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

const SHARDS: usize = 64;

/// The bucket parameters of one request's evaluation: a rate (with its burst) after
/// `limit_scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    /// Nanoseconds between two admitted requests at the sustained rate.
    pub emission: u64,
    pub burst: u32,
    /// The window the policy wrote (`/min` -> 60 s), for the `w` of the headers.
    pub window: Duration,
    /// Requests per window after scaling, for `q`.
    pub count: u32,
}

/// A rule's rate and burst as written, with the quota they make unscaled: the usual
/// case (`limit_scale` 1) costs no arithmetic per request.
#[derive(Debug, Clone, Copy)]
struct RateAndBurst {
    rate: Rate,
    burst: u32,
    unscaled: Quota,
}

impl RateAndBurst {
    fn new(rate: Rate, burst: u32) -> RateAndBurst {
        RateAndBurst {
            rate,
            burst,
            unscaled: Quota::new(rate, burst, 1.0),
        }
    }

    fn quota(&self, scale: f64) -> Quota {
        if scale == 1.0 {
            self.unscaled
        } else {
            Quota::new(self.rate, self.burst, scale)
        }
    }
}

impl Quota {
    pub fn new(rate: Rate, burst: u32, scale: f64) -> Quota {
        let scale = if scale.is_finite() && scale > 0.0 {
            scale
        } else {
            1.0
        };
        let count = ((rate.count as f64 * scale).round() as u32).max(1);
        let burst = ((burst as f64 * scale).round() as u32).max(1);
        let emission =
            (rate.period.as_nanos() as f64 / (rate.count as f64 * scale)).max(1.0) as u64;
        Quota {
            emission,
            burst,
            window: rate.period,
            count,
        }
    }

    fn tolerance(&self) -> u64 {
        self.emission.saturating_mul(self.burst as u64)
    }
}

/// What one bucket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Requests left right now.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until the next request would be admitted (zero when allowed).
    pub retry_after: Duration,
}

/// Keys are `key_hash` outputs, already hashed with a per-process random seed: hashing
/// them again would only cost time.
type Shard = HashMap<u64, u64, nohash_hasher::BuildNoHashHasher<u64>>;

/// One rule's buckets: key hash -> theoretical arrival time (GCRA), sharded, capped.
pub struct Buckets {
    shards: Box<[Mutex<Shard>]>,
    keys: AtomicUsize,
    max_keys: usize,
}

impl Buckets {
    pub fn new(max_keys: usize) -> Buckets {
        Buckets {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            keys: AtomicUsize::new(0),
            max_keys: max_keys.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shard comes from bits the map inside does not use: its buckets from the
    /// lowest, its tags from the top seven.
    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(key >> 32) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one request from `key`'s bucket at `now` (`clock::nanos`), or, with
    /// `consume: false`, only says whether it would be admitted.
    pub fn check(&self, key: u64, quota: &Quota, consume: bool, now: u64) -> Verdict {
        let mut shard = self.shard(key);
        // One probe for a known key: the slot found is the one written.
        let slot = shard.get_mut(&key);
        let (verdict, taken) = gcra(slot.as_deref().copied(), quota, consume, now);
        if let Some(new_tat) = taken {
            match slot {
                Some(tat) => *tat = new_tat,
                None => {
                    self.make_room(&mut shard, now);
                    self.keys.fetch_add(1, Ordering::Relaxed);
                    shard.insert(key, new_tat);
                }
            }
        }
        verdict
    }

    /// Keeps the store under `max_keys` before a new key goes in: first drop the
    /// shard's refilled buckets (they hold no state), and only if none is refilled the
    /// one closest to refilled.
    fn make_room(&self, shard: &mut Shard, now: u64) {
        if self.keys.load(Ordering::Relaxed) < self.max_keys {
            return;
        }
        let before = shard.len();
        shard.retain(|_, tat| *tat > now);
        let mut dropped = before - shard.len();
        if dropped == 0 {
            if let Some((&key, _)) = shard.iter().min_by_key(|(_, tat)| **tat) {
                shard.remove(&key);
                dropped = 1;
            }
        }
        self.keys.fetch_sub(dropped, Ordering::Relaxed);
    }

    /// Drops every refilled bucket; run periodically so the cap is rarely reached.
    pub fn evict_refilled(&self) {
        let now = crate::clock::nanos();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let before = shard.len();
            shard.retain(|_, tat| *tat > now);
            self.keys.fetch_sub(before - shard.len(), Ordering::Relaxed);
            if shard.capacity() > 4 * shard.len().max(16) {
                shard.shrink_to_fit();
            }
        }
    }
}

/// GCRA for one request at `now` on a bucket whose theoretical arrival time is `stored`
/// (none: a full bucket): the verdict, and the time to store when the request is taken
/// (admitted with `consume`).
fn gcra(stored: Option<u64>, quota: &Quota, consume: bool, now: u64) -> (Verdict, Option<u64>) {
    let tolerance = quota.tolerance();
    let tat = stored.unwrap_or(now).max(now);
    let new_tat = tat + quota.emission;
    if new_tat - now > tolerance {
        let denied = Verdict {
            allowed: false,
            remaining: 0,
            reset: Duration::from_nanos(tat - now),
            retry_after: Duration::from_nanos(new_tat - tolerance - now),
        };
        return (denied, None);
    }
    let used = if consume { new_tat - now } else { tat - now };
    let allowed = Verdict {
        allowed: true,
        remaining: ((tolerance - used) / quota.emission) as u32,
        reset: Duration::from_nanos(used),
        retry_after: Duration::ZERO,
    };
    (allowed, consume.then_some(new_tat))
}

/// Where one rule's buckets live in this process.
pub(crate) enum Store {
    Keyed(Buckets),
    /// A rule keyed only by `global` has one bucket, the same for every request: its
    /// theoretical arrival time in an atomic (0: full), with no lock and no map to find
    /// it in, and nothing for two threads to queue on.
    Global(AtomicU64),
}

impl Store {
    /// The store for a rule with this key.
    pub(crate) fn for_key(key: &[KeyPart], max_keys: usize) -> Store {
        if key.iter().all(|part| *part == KeyPart::Global) {
            Store::Global(AtomicU64::new(0))
        } else {
            Store::Keyed(Buckets::new(max_keys))
        }
    }

    /// The buckets kept: a global bucket is kept while it is not full.
    pub(crate) fn len(&self) -> usize {
        match self {
            Store::Keyed(buckets) => buckets.len(),
            Store::Global(tat) => usize::from(tat.load(Ordering::Relaxed) > crate::clock::nanos()),
        }
    }

    /// As `Buckets::check`; a global store has one bucket and ignores `key`.
    pub(crate) fn check(&self, key: u64, quota: &Quota, consume: bool, now: u64) -> Verdict {
        let tat = match self {
            Store::Keyed(buckets) => return buckets.check(key, quota, consume, now),
            Store::Global(tat) => tat,
        };
        let mut stored = tat.load(Ordering::Relaxed);
        loop {
            let (verdict, taken) = gcra(Some(stored), quota, consume, now);
            let Some(new_tat) = taken else {
                return verdict;
            };
            // Another request took from the bucket meanwhile: decide again on its state.
            match tat.compare_exchange_weak(stored, new_tat, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return verdict,
                Err(current) => stored = current,
            }
        }
    }

    pub(crate) fn evict_refilled(&self) {
        if let Store::Keyed(buckets) = self {
            buckets.evict_refilled();
        }
    }
}

/// Hashes the parts of a bucket key with a per-process random seed (so clients cannot
/// aim collisions at each other's buckets).
pub fn key_hash(parts: &[&[u8]]) -> u64 {
    static SEED: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    let mut hasher = SEED.get_or_init(Default::default).build_hasher();
    for part in parts {
        part.hash(&mut hasher);
    }
    hasher.finish()
}

/// The decision counters of one rule, resolved when the policy compiles.
pub(crate) struct RuleMetrics {
    pub(crate) allowed: prometheus::IntCounter,
    pub(crate) limited: prometheus::IntCounter,
    pub(crate) shadow_limited: prometheus::IntCounter,
}

impl RuleMetrics {
    pub(crate) fn new(metrics: &Metrics, rule: &str) -> RuleMetrics {
        RuleMetrics {
            allowed: metrics.ratelimit_decision(rule, "allowed"),
            limited: metrics.ratelimit_decision(rule, "limited"),
            shadow_limited: metrics.ratelimit_decision(rule, "shadow_limited"),
        }
    }
}

/// One part of a rule's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyPart {
    Global,
    Ip,
    User,
    UserOrIp,
    Route,
    Header(http::HeaderName),
}

pub(crate) struct Rule {
    pub(crate) name: std::sync::Arc<str>,
    key: Vec<KeyPart>,
    /// The key is only `global`: one bucket for every request (`Store::Global`).
    global: bool,
    /// The rate for every request, or per tier (a tier not listed uses the default
    /// tier's rate; with neither, the rule does not apply).
    rates: RuleRates,
    /// The name as a structured-field string (`"per-user"`), as the headers carry it.
    sf_name: Box<str>,
    when: When,
    /// Route indices the rule covers; `None` is every route.
    routes: Option<Vec<usize>>,
    pub(crate) shadow: bool,
    pub(crate) store: std::sync::Arc<Store>,
    /// What identifies the bucket set across reloads: a rule keeps its state when this
    /// is unchanged.
    pub(crate) bucket_key: BucketKey,
    pub(crate) metrics: RuleMetrics,
}

/// What a rule's buckets count against: its key, rate and burst as written. A rule
/// whose `BucketKey` is unchanged keeps its buckets across a reload; `policy::diff`
/// reports the others as reset.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BucketKey {
    key: Vec<String>,
    rate: RuleRate,
    burst: Option<u32>,
    /// The same, as text: what Redis bucket names are derived from, computed once.
    text: String,
}

impl BucketKey {
    fn new(key: &[&str], rate: &RuleRate, burst: Option<u32>) -> BucketKey {
        BucketKey {
            key: key.iter().map(|w| w.to_string()).collect(),
            rate: rate.clone(),
            burst,
            text: format!("{key:?}|{rate:?}|{burst:?}"),
        }
    }
}

enum RuleRates {
    One(RateAndBurst),
    PerTier(HashMap<String, RateAndBurst>),
}

pub(crate) struct RateLimits {
    /// Narrowest key first (per client, then per route, then global).
    pub(crate) rules: Vec<Rule>,
    pub(crate) headers: HeadersMode,
    /// The `RateLimit-Policy` value of each set of applied rules (bit `i`: rule `i`)
    /// at their one unscaled rate, made on first use: it only changes with the policy.
    /// Empty (nothing kept) with more than `CACHED_POLICY_RULES` rules.
    policy_values: Box<[OnceLock<HeaderValue>]>,
    /// Set when the buckets live in Redis; the local stores then serve only
    /// `on_error: local`.
    shared: Option<shared::SharedBuckets>,
}

/// What the request looks like to the rules (`Policy::subject`).
pub(crate) struct Subject<'a> {
    pub(crate) route: usize,
    pub(crate) route_name: &'a str,
    pub(crate) client_ip: Option<std::net::IpAddr>,
    pub(crate) user: Option<&'a str>,
    pub(crate) tier: &'a str,
    pub(crate) headers: &'a http::HeaderMap,
    /// When the request arrived: the buckets' time for it (`crate::clock`).
    pub(crate) arrived: std::time::Instant,
}

/// The outcome for one request: every rule that applied, and the denial if any.
#[derive(Default)]
pub(crate) struct Outcome {
    /// (rule index, quota, verdict) for each applied rule, in evaluation order.
    pub(crate) applied: Vec<(usize, Quota, Verdict)>,
    pub(crate) denied: Option<usize>,
    pub(crate) shadow_limited: Vec<usize>,
}

impl RateLimits {
    /// Decides a request against the configured backend. With `consume: false`
    /// nothing is taken (for `/explain`).
    pub(crate) async fn decide(&self, subject: &Subject<'_>, scale: f64, consume: bool) -> Outcome {
        match &self.shared {
            None => self.evaluate(subject, scale, consume),
            // Boxed: a Redis round trip's future is most of a kilobyte, which every
            // request's admission future (allocated per request) would carry otherwise.
            Some(shared) => Box::pin(self.decide_shared(shared, subject, scale, consume)).await,
        }
    }

    async fn decide_shared(
        &self,
        shared: &shared::SharedBuckets,
        subject: &Subject<'_>,
        scale: f64,
        consume: bool,
    ) -> Outcome {
        let mut applicable = Vec::new();
        let mut checks = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            let Some(quota) = rule.quota_for(subject, scale) else {
                continue;
            };
            let Some(key) = rule.with_key(subject, |parts| {
                shared::bucket_key(&rule.name, &rule.bucket_key.text, parts)
            }) else {
                continue;
            };
            applicable.push((index, quota));
            checks.push(shared::SharedCheck {
                key,
                quota,
                shadow: rule.shadow,
            });
        }
        if checks.is_empty() {
            return Outcome::default();
        }
        match shared.check(&checks, consume).await {
            Ok(verdicts) => self.judge(
                applicable
                    .into_iter()
                    .zip(verdicts)
                    .map(|((index, quota), verdict)| (index, quota, verdict)),
                consume,
            ),
            Err(()) => match shared.on_error {
                OnRedisError::Local => self.evaluate(subject, scale, consume),
                OnRedisError::Allow => Outcome::default(),
                OnRedisError::Deny => {
                    let enforced = applicable
                        .into_iter()
                        .find(|(index, _)| !self.rules[*index].shadow);
                    let unknown = |(index, quota): (usize, Quota)| {
                        let verdict = Verdict {
                            allowed: false,
                            remaining: 0,
                            reset: quota.window,
                            retry_after: Duration::from_secs(1),
                        };
                        (index, quota, verdict)
                    };
                    self.judge(enforced.map(unknown).into_iter(), consume)
                }
            },
        }
    }

    /// Evaluates the rules in order against this process's buckets; the first real
    /// denial stops, so a client over its own limit does not also drain the shared
    /// budgets behind it.
    pub(crate) fn evaluate(&self, subject: &Subject<'_>, scale: f64, consume: bool) -> Outcome {
        let now = crate::clock::nanos_at(subject.arrived);
        let mut last_key = None;
        // Lazy: a bucket is only touched if no earlier rule denied.
        let verdicts = self
            .rules
            .iter()
            .enumerate()
            .filter_map(move |(index, rule)| {
                let quota = rule.quota_for(subject, scale)?;
                let key = rule.bucket(subject, &mut last_key)?;
                Some((index, quota, rule.store.check(key, &quota, consume, now)))
            });
        self.judge(verdicts, consume)
    }

    /// Turns verdicts, in evaluation order, into the outcome, counting decisions.
    fn judge(
        &self,
        verdicts: impl Iterator<Item = (usize, Quota, Verdict)>,
        consume: bool,
    ) -> Outcome {
        let mut outcome = Outcome {
            applied: Vec::with_capacity(self.rules.len()),
            ..Outcome::default()
        };
        for (index, quota, verdict) in verdicts {
            let rule = &self.rules[index];
            outcome.applied.push((index, quota, verdict));
            if verdict.allowed {
                if consume {
                    rule.metrics.allowed.inc();
                }
            } else if rule.shadow {
                if consume {
                    rule.metrics.shadow_limited.inc();
                }
                outcome.shadow_limited.push(index);
            } else {
                if consume {
                    rule.metrics.limited.inc();
                }
                outcome.denied = Some(index);
                break;
            }
        }
        outcome
    }

    pub(crate) fn evict_refilled(&self) {
        for rule in &self.rules {
            rule.store.evict_refilled();
        }
    }
}

impl Rule {
    fn quota_for(&self, subject: &Subject<'_>, scale: f64) -> Option<Quota> {
        let applies = match self.when {
            When::Always => true,
            When::Anonymous => subject.user.is_none(),
            When::Authenticated => subject.user.is_some(),
        };
        if !applies
            || self
                .routes
                .as_ref()
                .is_some_and(|r| !r.contains(&subject.route))
        {
            return None;
        }
        let rates = match &self.rates {
            RuleRates::One(rates) => rates,
            RuleRates::PerTier(tiers) => tiers.get(subject.tier)?,
        };
        Some(rates.quota(scale))
    }

    /// This request's bucket in the rule's local store: its key's hash, or `None` when
    /// a part is missing. `last` is the key the previous rule of this request hashed,
    /// by where its parts came from: a rule whose parts come from the same places has
    /// the same key (`ip`, and `user_or_ip` for an anonymous client), hashed once.
    fn bucket(&self, subject: &Subject<'_>, last: &mut Option<KeySources>) -> Option<u64> {
        if self.global {
            // Not looked at: the global store has one bucket.
            return Some(0);
        }
        let Some(sources) = KeySources::of(&self.key, subject)? else {
            return self.with_key(subject, key_hash);
        };
        if let Some(previous) = last.filter(|l| l.parts == sources.parts) {
            return Some(previous.hash);
        }
        let hash = self.with_key(subject, key_hash)?;
        *last = Some(KeySources { hash, ..sources });
        Some(hash)
    }

    /// Hands the parts of this request's bucket key to `make`, or returns `None` when a
    /// part is missing (a `user` rule skips anonymous requests; a `header:` rule skips
    /// requests without the header: they are never pooled into one empty-key bucket).
    fn with_key<K>(&self, subject: &Subject<'_>, make: impl FnOnce(&[&[u8]]) -> K) -> Option<K> {
        // Tagged with the family so an address never shares a bucket with a user name.
        let mut ip_bytes = [0u8; 17];
        let ip: Option<&[u8]> = subject.client_ip.map(|ip| match ip {
            std::net::IpAddr::V4(v4) => {
                ip_bytes[0] = 4;
                ip_bytes[1..5].copy_from_slice(&v4.octets());
                &ip_bytes[..5]
            }
            std::net::IpAddr::V6(v6) => {
                ip_bytes[0] = 6;
                ip_bytes[1..].copy_from_slice(&v6.octets());
                &ip_bytes[..]
            }
        });
        let mut parts: [&[u8]; 6] = [b""; 6];
        for (slot, part) in parts.iter_mut().zip(&self.key) {
            *slot = match part {
                KeyPart::Global => b"*",
                KeyPart::Route => subject.route_name.as_bytes(),
                KeyPart::User => subject.user?.as_bytes(),
                KeyPart::Header(name) => subject.headers.get(name)?.as_bytes(),
                KeyPart::UserOrIp if subject.user.is_some() => subject.user?.as_bytes(),
                KeyPart::Ip | KeyPart::UserOrIp => ip?,
            };
        }
        Some(make(&parts[..self.key.len()]))
    }
}

/// Where one request's key parts come from, for rules without `header:` parts.
#[derive(Clone, Copy)]
struct KeySources {
    parts: [Option<Source>; 6],
    hash: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Global,
    Route,
    User,
    Ip,
}

impl KeySources {
    /// `None` when a part is missing (the rule does not apply), `Some(None)` when a
    /// part is a header (not shared between rules).
    fn of(key: &[KeyPart], subject: &Subject<'_>) -> Option<Option<KeySources>> {
        let mut parts = [None; 6];
        for (slot, part) in parts.iter_mut().zip(key) {
            *slot = Some(match part {
                KeyPart::Global => Source::Global,
                KeyPart::Route => Source::Route,
                KeyPart::User | KeyPart::UserOrIp if subject.user.is_some() => Source::User,
                KeyPart::User => return None,
                KeyPart::Ip | KeyPart::UserOrIp => {
                    subject.client_ip?;
                    Source::Ip
                }
                KeyPart::Header(_) => return Some(None),
            });
        }
        Some(Some(KeySources { parts, hash: 0 }))
    }
}

/// The most rules whose `RateLimit-Policy` values are kept (one per subset: 256).
const CACHED_POLICY_RULES: usize = 8;

fn policy_value_cache(rules: usize) -> Box<[OnceLock<HeaderValue>]> {
    if rules > CACHED_POLICY_RULES {
        return Box::new([]);
    }
    (0..1usize << rules).map(|_| OnceLock::new()).collect()
}

impl RateLimits {
    /// The 429 for a request `rule` denied: the rule's name, and when the tightest
    /// applied rule lets the next request through.
    pub(crate) fn refusal(&self, rule: usize, outcome: &Outcome) -> Problem {
        let rule = &self.rules[rule];
        let wait = outcome
            .applied
            .last()
            .map_or(Duration::ZERO, |(_, _, v)| v.retry_after);
        let mut problem = Problem::new(
            Code::RateLimited,
            format!("rate limit `{}` exceeded", rule.name),
        )
        .retry_after(wait);
        problem.extra.insert("rule".into(), (&*rule.name).into());
        problem
    }
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// What a response tells its client about the limits (SPEC §4, draft-ietf-httpapi-
/// ratelimit-headers structured fields, or the legacy `X-RateLimit-*` trio): the state of
/// the tightest enforced rule, and the quotas of all of them. Taken from the outcome at
/// admission and written when the response head is, straight into it. Shadow rules are
/// left out: they are not enforced, so they are not advertised.
pub(crate) struct Advert {
    /// `RateLimit-Policy`, when the draft fields are sent.
    policy: Option<HeaderValue>,
    /// The tightest rule: the one with the fewest requests left.
    rule: usize,
    count: u32,
    remaining: u32,
    /// Whole seconds until that rule's bucket is full again.
    reset: u64,
}

impl Advert {
    /// `None` when no enforced rule applied, or the policy sends no fields.
    pub(crate) fn of(limits: &RateLimits, outcome: &Outcome) -> Option<Advert> {
        if limits.headers == HeadersMode::None {
            return None;
        }
        let enforced = || {
            outcome
                .applied
                .iter()
                .filter(|(i, _, _)| !limits.rules[*i].shadow)
        };
        let (rule, quota, verdict) = enforced().min_by_key(|(_, _, v)| v.remaining)?;
        let policy = matches!(limits.headers, HeadersMode::Draft | HeadersMode::Both).then(|| {
            let policy = || {
                let mut policy = String::with_capacity(64);
                for (i, q, _) in enforced() {
                    if !policy.is_empty() {
                        policy.push_str(", ");
                    }
                    policy.push_str(&limits.rules[*i].sf_name);
                    policy.push_str(";q=");
                    policy.push_str(itoa::Buffer::new().format(q.count));
                    policy.push_str(";w=");
                    policy.push_str(itoa::Buffer::new().format(q.window.as_secs()));
                }
                sf_value(policy)
            };
            // Kept when each applied rule has its one rate, unscaled: then the set of
            // rules decides the value (a per-tier rate or a `limit_scale` changes it).
            let fixed_rates = enforced().try_fold(0usize, |set, (i, q, _)| {
                let one_rate =
                    matches!(&limits.rules[*i].rates, RuleRates::One(r) if r.unscaled == *q);
                Some(set | 1usize.checked_shl(*i as u32).filter(|_| one_rate)?)
            });
            match fixed_rates.and_then(|set| limits.policy_values.get(set)) {
                Some(kept) => kept.get_or_init(policy).clone(),
                None => policy(),
            }
        });
        Some(Advert {
            policy,
            rule: *rule,
            count: quota.count,
            remaining: verdict.remaining,
            reset: whole_seconds(verdict.reset),
        })
    }

    /// Hands each field to `field`, in the order a response carries them. `limits` is
    /// the policy's the advert was taken from (its rule indices are that policy's).
    pub(crate) fn fields(
        self,
        limits: &RateLimits,
        mut field: impl FnMut(&HeaderName, HeaderValue),
    ) {
        if let Some(policy) = self.policy {
            field(&RATELIMIT_POLICY, policy);
            let name = &limits.rules[self.rule].sf_name;
            field(
                &RATELIMIT,
                ratelimit_value(name, self.remaining, self.reset),
            );
        }
        if matches!(limits.headers, HeadersMode::Legacy | HeadersMode::Both) {
            field(&X_RATELIMIT_LIMIT, HeaderValue::from(self.count));
            field(&X_RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
            field(&X_RATELIMIT_RESET, HeaderValue::from(self.reset));
        }
    }
}

/// The `RateLimit` value (`"per-user";r=9;t=1`).
fn ratelimit_value(name: &str, remaining: u32, reset: u64) -> HeaderValue {
    let mut digits = itoa::Buffer::new();
    let remaining = digits.format(remaining);
    let mut seconds = itoa::Buffer::new();
    let seconds = seconds.format(reset);
    // Exactly as long as the value: a `String` with room to spare would become a header
    // value through a second allocation.
    let mut text = String::with_capacity(name.len() + remaining.len() + seconds.len() + 6);
    text.push_str(name);
    text.push_str(";r=");
    text.push_str(remaining);
    text.push_str(";t=");
    text.push_str(seconds);
    sf_value(text)
}

/// A structured field made of rule names (`sf_string`: printable ASCII) and numbers.
fn sf_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("rule names are printable ASCII (checked when compiled)")
}

/// `name` as a structured-field string (RFC 8941 §3.3.3), or `None` when it has a
/// character one cannot carry (only printable ASCII can).
pub(crate) fn sf_string(name: &str) -> Option<Box<str>> {
    let mut quoted = String::with_capacity(name.len() + 2);
    sfv::RefItemSerializer::new(&mut quoted)
        .bare_item(&sfv::RefBareItem::String(name))
        .ok()?;
    Some(quoted.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_minute(count: u32) -> Rate {
        Rate {
            count,
            period: Duration::from_secs(60),
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn twenty_per_minute_admits_twenty_then_one_every_three_seconds() {
        let store = Buckets::new(100);
        let quota = Quota::new(per_minute(20), 20, 1.0);
        let t0 = 1_000 * SEC;
        for n in 0..20 {
            let v = store.check(7, &quota, true, t0);
            assert!(v.allowed, "request {n}");
            assert_eq!(v.remaining, 19 - n);
        }
        let denied = store.check(7, &quota, true, t0);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_secs(3));
        assert!(!store.check(7, &quota, true, t0 + 2 * SEC).allowed);
        assert!(store.check(7, &quota, true, t0 + 3 * SEC).allowed);
        assert!(!store.check(7, &quota, true, t0 + 3 * SEC).allowed);
        // Another key has its own bucket.
        assert!(store.check(8, &quota, true, t0).allowed);
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn a_global_rule_has_one_bucket_shared_by_every_thread() {
        let store = Store::for_key(&[KeyPart::Global], 100);
        assert!(matches!(store, Store::Global(_)));
        assert!(matches!(
            Store::for_key(&[KeyPart::Global, KeyPart::Route], 100),
            Store::Keyed(_)
        ));
        let quota = Quota::new(per_minute(40_000), 40_000, 1.0);
        let now = 1_000 * SEC;
        assert_eq!(store.check(1, &quota, false, now).remaining, 40_000);
        // Four threads at once, each trying 20,000 requests: the bucket holds 40,000,
        // and no request is lost or counted twice between them.
        let start = std::sync::Barrier::new(4);
        let admitted: usize = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4u64)
                .map(|key| {
                    let (store, start) = (&store, &start);
                    scope.spawn(move || {
                        start.wait();
                        (0..20_000)
                            .filter(|_| store.check(key, &quota, true, now).allowed)
                            .count()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(admitted, 40_000);
        let denied = store.check(9, &quota, true, now);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_micros(1_500));
        assert!(store.check(9, &quota, true, now + 1_500_000).allowed);
    }

    #[test]
    fn peeking_consumes_nothing() {
        let store = Buckets::new(100);
        let quota = Quota::new(per_minute(2), 2, 1.0);
        for _ in 0..5 {
            let v = store.check(1, &quota, false, SEC);
            assert!(v.allowed);
            assert_eq!(v.remaining, 2);
        }
        assert!(store.is_empty());
    }

    #[test]
    fn limit_scale_multiplies_rate_and_burst() {
        let quota = Quota::new(per_minute(20), 20, 0.5);
        assert_eq!((quota.count, quota.burst), (10, 10));
        assert_eq!(quota.emission, 6 * SEC);
        let store = Buckets::new(100);
        let admitted = (0..20)
            .filter(|_| store.check(1, &quota, true, SEC).allowed)
            .count();
        assert_eq!(admitted, 10);
        // Scaling back up applies to the same bucket state: 10 more fit in the burst.
        let full = Quota::new(per_minute(20), 20, 1.0);
        let admitted = (0..20)
            .filter(|_| store.check(1, &full, true, SEC).allowed)
            .count();
        assert_eq!(
            admitted, 0,
            "the scaled-down bucket's debt carries over, no free burst"
        );
        let later = (0..20)
            .filter(|_| store.check(1, &full, true, 61 * SEC).allowed)
            .count();
        assert_eq!(later, 20);
    }

    #[test]
    fn rule_names_go_out_as_structured_field_strings() {
        assert_eq!(sf_string("per-user").as_deref(), Some("\"per-user\""));
        assert_eq!(sf_string(r#"a"b\c"#).as_deref(), Some(r#""a\"b\\c""#));
        assert_eq!(sf_string("caf\u{e9}"), None);
        assert_eq!(sf_string("tab\there"), None);
    }

    #[test]
    fn the_cap_holds_and_eviction_never_forgives_the_most_limited_client() {
        let store = Buckets::new(SHARDS);
        let quota = Quota::new(per_minute(10), 10, 1.0);
        let t0 = 1_000 * SEC;
        // The abuser (shard 0) spends its whole burst: limited for a minute.
        for _ in 0..10 {
            assert!(store.check(0, &quota, true, t0).allowed);
        }
        assert!(!store.check(0, &quota, true, t0).allowed);
        let in_shard_0 = |i: u64| (i << 32 << SHARDS.trailing_zeros()) | i;
        // A flood of new clients in the same shard, each one request (6 s of debt).
        for i in 1..5_000u64 {
            store.check(in_shard_0(i), &quota, true, t0 + i);
            assert!(store.len() <= SHARDS, "{} keys", store.len());
        }
        let abuser_tat = t0 + 60 * SEC;
        assert_eq!(
            store.shard(0).get(&0),
            Some(&abuser_tat),
            "eviction forgave the abuser"
        );
        // Later the flood's buckets have refilled and go first.
        for i in 5_000..10_000u64 {
            store.check(in_shard_0(i), &quota, true, t0 + 7 * SEC);
        }
        assert_eq!(store.shard(0).get(&0), Some(&abuser_tat));
        assert!(store.len() <= SHARDS);
    }
}
