//! What a reload from one policy to the next changes (SPEC §1 `check --against`, the
//! reload event): routes, upstreams and rate-limit rules added, changed and removed;
//! the state that starts afresh; the settings that wait for a restart.
//!
//! "Changed" compares what the operator wrote, value by value (source positions do not
//! count: a route that only moved down the file is moved, not changed). "Starts
//! afresh" compares what the compiler did: `new` must have been compiled with `old` as
//! its previous policy, so carried-over state is the very same object and what is
//! reported as reset is exactly what the reload resets.

use super::Policy;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// Names added, changed and removed.
#[derive(Debug, Default, PartialEq, Serialize)]
pub(crate) struct Difference {
    pub(crate) added: Vec<String>,
    pub(crate) changed: Vec<String>,
    pub(crate) removed: Vec<String>,
}

/// A route at another place in the list: routes match first to last.
#[derive(Debug, PartialEq, Serialize)]
pub(crate) struct Moved {
    pub(crate) route: String,
    /// 1-based positions.
    pub(crate) from: usize,
    pub(crate) to: usize,
}

/// State a reload does not carry over.
#[derive(Debug, PartialEq, Serialize)]
#[serde(tag = "part", rename_all = "snake_case")]
pub(crate) enum Reset {
    /// A rule whose key, rate or burst changed: its buckets start full.
    RateLimit { rule: String, tracked_keys: usize },
    /// A removed rule: its buckets are dropped.
    RateLimitDropped { rule: String, tracked_keys: usize },
    /// The pool's servers or breaker settings changed: the breaker starts closed.
    Breaker { upstream: String },
    /// The bulkhead's limits changed: requests in flight keep their slots in the old one.
    Bulkhead { upstream: String },
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct PolicyDiff {
    pub(crate) routes: Difference,
    pub(crate) moved: Vec<Moved>,
    pub(crate) upstreams: Difference,
    pub(crate) rules: Difference,
    pub(crate) reset: Vec<Reset>,
    /// Top-level sections whose settings changed (`server`, `identity`, …).
    pub(crate) sections: Vec<&'static str>,
    /// Settings that take effect only after a restart.
    pub(crate) restart_only: Vec<&'static str>,
    /// Health-checked servers no longer in the policy: `(upstream, server)`, whose
    /// metric series end.
    #[serde(skip)]
    pub(crate) servers_removed: Vec<(String, String)>,
}

impl PolicyDiff {
    pub(crate) fn between(old: &Policy, new: &Policy) -> PolicyDiff {
        let mut diff = PolicyDiff::default();
        diff.compare_routes(old, new);
        diff.upstreams = compare_by_name(
            old.config.upstreams.value.iter(),
            new.config.upstreams.value.iter(),
        );
        diff.rules = compare_by_name(
            old.config.rate_limits.iter().map(|r| (&r.name.value, r)),
            new.config.rate_limits.iter().map(|r| (&r.name.value, r)),
        );
        diff.compare_state(old, new);
        let (was, is) = (&old.config, &new.config);
        let sections = [
            ("server", differs(&was.server, &is.server)),
            ("admin", differs(&was.admin, &is.admin)),
            ("identity", differs(&was.identity, &is.identity)),
            (
                "rate_limiting",
                differs(&was.rate_limiting, &is.rate_limiting),
            ),
            ("shedding", differs(&was.shedding, &is.shedding)),
            ("access_log", differs(&was.access_log, &is.access_log)),
            ("cache", differs(&was.cache, &is.cache)),
            ("tracing", differs(&was.tracing, &is.tracing)),
        ];
        diff.sections = sections
            .into_iter()
            .filter_map(|(name, changed)| changed.then_some(name))
            .collect();
        let tls = |p: &Policy| {
            p.server
                .tls
                .as_ref()
                .map(|t| (t.listen, t.cert.clone(), t.key.clone()))
        };
        let restart_only = [
            (old.server.listen != new.server.listen, "server.listen"),
            (old.server.threads != new.server.threads, "server.threads"),
            (old.admin.listen != new.admin.listen, "admin.listen"),
            (tls(old) != tls(new), "server.tls"),
        ];
        diff.restart_only = restart_only
            .into_iter()
            .filter_map(|(changed, what)| changed.then_some(what))
            .collect();
        let health_checked = |p: &Policy| -> Vec<(String, String)> {
            p.upstreams
                .iter()
                .filter(|(_, pool)| pool.health_check.is_some())
                .flat_map(|(name, pool)| {
                    pool.servers
                        .iter()
                        .map(move |s| (name.clone(), s.label.to_string()))
                })
                .collect()
        };
        let kept = health_checked(new);
        diff.servers_removed = health_checked(old)
            .into_iter()
            .filter(|s| !kept.contains(s))
            .collect();
        diff
    }

    /// One line per change, as `check --against` prints them and the log records them.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.to_string().lines().map(str::to_string).collect()
    }

    /// Whether a rule's buckets start afresh.
    fn resets_rule(&self, rule: &str) -> Option<usize> {
        self.reset.iter().find_map(|r| match r {
            Reset::RateLimit {
                rule: name,
                tracked_keys,
            } if name == rule => Some(*tracked_keys),
            _ => None,
        })
    }

    fn compare_routes(&mut self, old: &Policy, new: &Policy) {
        let position = |p: &Policy| -> HashMap<String, usize> {
            p.config
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| (r.name.value.clone(), i))
                .collect()
        };
        let (was, is) = (position(old), position(new));
        self.routes = compare_by_name(
            old.config.routes.iter().map(|r| (&r.name.value, r)),
            new.config.routes.iter().map(|r| (&r.name.value, r)),
        );
        for route in &new.config.routes {
            let name = &route.name.value;
            if let Some(&from) = was.get(name) {
                if from != is[name] {
                    self.moved.push(Moved {
                        route: name.clone(),
                        from: from + 1,
                        to: is[name] + 1,
                    });
                }
            }
        }
    }

    fn compare_state(&mut self, old: &Policy, new: &Policy) {
        for rule in &new.rate_limits.rules {
            let before = old.rate_limits.rules.iter().find(|o| o.name == rule.name);
            if let Some(before) = before.filter(|b| !Arc::ptr_eq(&b.store, &rule.store)) {
                self.reset.push(Reset::RateLimit {
                    rule: rule.name.to_string(),
                    tracked_keys: before.store.len(),
                });
            }
        }
        for rule in &old.rate_limits.rules {
            if !new.rate_limits.rules.iter().any(|r| r.name == rule.name) {
                self.reset.push(Reset::RateLimitDropped {
                    rule: rule.name.to_string(),
                    tracked_keys: rule.store.len(),
                });
            }
        }
        for (name, pool) in &new.upstreams {
            let Some(before) = old.upstreams.get(name) else {
                continue;
            };
            if let (Some(was), Some(is)) = (&before.breaker, &pool.breaker) {
                if !Arc::ptr_eq(&was.breaker, &is.breaker) {
                    self.reset.push(Reset::Breaker {
                        upstream: name.clone(),
                    });
                }
            }
            if let (Some(was), Some(is)) = (&before.bulkhead, &pool.bulkhead) {
                if !Arc::ptr_eq(was, is) {
                    self.reset.push(Reset::Bulkhead {
                        upstream: name.clone(),
                    });
                }
            }
        }
    }
}

impl fmt::Display for PolicyDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (kind, difference) in [("route", &self.routes), ("upstream", &self.upstreams)] {
            for name in &difference.added {
                writeln!(f, "{kind} `{name}` added")?;
            }
            for name in &difference.changed {
                writeln!(f, "{kind} `{name}` changed")?;
            }
            for name in &difference.removed {
                writeln!(f, "{kind} `{name}` removed")?;
            }
            if kind == "route" {
                for moved in &self.moved {
                    writeln!(
                        f,
                        "route `{}` moved from position {} to {}",
                        moved.route, moved.from, moved.to
                    )?;
                }
            }
        }
        for name in &self.rules.added {
            writeln!(f, "rate-limit rule `{name}` added")?;
        }
        // A rule can reset without a change of its own text: another rule took its
        // name's place, or the backend changed.
        let mut changed: Vec<&String> = self.rules.changed.iter().collect();
        for reset in &self.reset {
            if let Reset::RateLimit { rule, .. } = reset {
                if !changed.contains(&rule) {
                    changed.push(rule);
                }
            }
        }
        for name in changed {
            match self.resets_rule(name) {
                Some(keys) => writeln!(
                    f,
                    "rate-limit rule `{name}` changed: its key, rate or burst differ, so its limiter state is reset ({keys} tracked keys)"
                )?,
                None => writeln!(f, "rate-limit rule `{name}` changed; its limiter state is kept")?,
            }
        }
        for reset in &self.reset {
            match reset {
                Reset::RateLimit { .. } => {}
                Reset::RateLimitDropped { rule, tracked_keys } => writeln!(
                    f,
                    "rate-limit rule `{rule}` removed: its limiter state is dropped ({tracked_keys} tracked keys)"
                )?,
                Reset::Breaker { upstream } => writeln!(
                    f,
                    "upstream `{upstream}`: its circuit breaker starts afresh (closed)"
                )?,
                Reset::Bulkhead { upstream } => writeln!(
                    f,
                    "upstream `{upstream}`: its bulkhead starts afresh (requests in flight keep their slots in the old one)"
                )?,
            }
        }
        for section in &self.sections {
            writeln!(f, "`{section}` settings changed")?;
        }
        for what in &self.restart_only {
            writeln!(f, "{what} changed: takes effect only after a restart")?;
        }
        Ok(())
    }
}

/// Names in `new` not in `old`, in both but written differently, in `old` only.
fn compare_by_name<'a, T: Serialize + 'a>(
    old: impl Iterator<Item = (&'a String, &'a T)>,
    new: impl Iterator<Item = (&'a String, &'a T)>,
) -> Difference {
    let old: Vec<(&String, &T)> = old.collect();
    let new: Vec<(&String, &T)> = new.collect();
    let find = |list: &[(&String, &'a T)], name: &str| -> Option<&'a T> {
        list.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    };
    let mut difference = Difference::default();
    for (name, value) in &new {
        match find(&old, name) {
            None => difference.added.push((*name).clone()),
            Some(before) if differs(before, *value) => difference.changed.push((*name).clone()),
            Some(_) => {}
        }
    }
    for (name, _) in &old {
        if find(&new, name).is_none() {
            difference.removed.push((*name).clone());
        }
    }
    difference
}

/// Whether two parts of the policy are written differently, value by value (a value's
/// position in the file does not count).
fn differs<T: Serialize>(old: &T, new: &T) -> bool {
    serde_json::to_value(old).ok() != serde_json::to_value(new).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventLog;
    use crate::metrics::Metrics;
    use std::path::Path;

    const BASE: &str = "version: 1
upstreams:
  app:
    servers: [\"127.0.0.1:3000\"]
routes:
  - name: api
    match: { path_prefix: /api }
    upstream: app
  - name: web
    match: { path_prefix: / }
    upstream: app
rate_limits:
  - name: per-ip
    key: ip
    rate: 10/min
";

    fn reload(old: &str, new: &str) -> PolicyDiff {
        let (metrics, events) = (Metrics::new(), Arc::new(EventLog::default()));
        let path = Path::new("gateway.yaml");
        let old = super::super::compile_text(path, old, None, &metrics, &events).unwrap();
        let new = super::super::compile_text(path, new, Some(&old), &metrics, &events).unwrap();
        PolicyDiff::between(&old, &new)
    }

    #[test]
    fn a_route_written_further_down_is_moved_not_changed() {
        let with_health = BASE.replace(
            "routes:\n",
            "routes:\n  - name: health\n    match: { path: /health }\n    upstream: app\n",
        );
        let diff = reload(BASE, &with_health);
        assert_eq!(diff.routes.added, ["health"]);
        assert!(diff.routes.changed.is_empty(), "{diff:?}");
        assert_eq!(
            diff.moved,
            [
                Moved {
                    route: "api".into(),
                    from: 1,
                    to: 2
                },
                Moved {
                    route: "web".into(),
                    from: 2,
                    to: 3
                }
            ]
        );
        assert!(diff.reset.is_empty());
    }

    #[test]
    fn every_written_setting_of_a_route_counts() {
        let cached = BASE.replace(
            "    match: { path_prefix: /api }\n    upstream: app\n",
            "    match: { path_prefix: /api }\n    upstream: app\n    priority: low\n",
        );
        let diff = reload(BASE, &cached);
        assert_eq!(diff.routes.changed, ["api"]);
        assert_eq!(diff.lines(), ["route `api` changed"]);
    }

    #[test]
    fn rules_and_their_state_and_sections_and_restarts() {
        let new = BASE.replace("rate: 10/min", "rate: 20/min").replace(
            "upstreams:",
            "server:\n  threads: 3\n  max_request_body: 1KiB\nupstreams:",
        );
        let diff = reload(BASE, &new);
        assert_eq!(diff.rules.changed, ["per-ip"]);
        assert_eq!(
            diff.reset,
            [Reset::RateLimit {
                rule: "per-ip".into(),
                tracked_keys: 0
            }]
        );
        assert_eq!(diff.sections, ["server"]);
        assert_eq!(diff.restart_only, ["server.threads"]);
        let json = serde_json::to_value(&diff).unwrap();
        assert_eq!(json["reset"][0]["part"], "rate_limit");
        assert_eq!(json["rules"]["changed"][0], "per-ip");
        assert!(reload(BASE, BASE).lines().is_empty());
    }

    #[test]
    fn a_tracing_section_is_a_section_change() {
        let traced = format!("{BASE}tracing:\n  sample: 5%\n");
        assert_eq!(reload(BASE, &traced).sections, ["tracing"]);
        assert_eq!(
            reload(&traced, BASE).lines(),
            ["`tracing` settings changed"]
        );
    }
}
