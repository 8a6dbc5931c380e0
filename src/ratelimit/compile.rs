//! Compiling `rate_limits` and `rate_limiting` (SPEC §3): rules narrowest key first,
//! each keeping its buckets across a reload while its `BucketKey` holds, and the Redis
//! backend reusing its connection while its address holds.

use super::{
    policy_value_cache, sf_string, shared, BucketKey, KeyPart, RateAndBurst, RateLimits, Rule,
    RuleMetrics, RuleRates, Store,
};
use crate::config::Backend;
use crate::policy::compile::Compile;

/// How narrow a key is: per-client keys first, then per-route, then global.
fn narrowness(key: &[KeyPart]) -> u8 {
    if key.iter().any(|p| {
        matches!(
            p,
            KeyPart::Ip | KeyPart::User | KeyPart::UserOrIp | KeyPart::Header(_)
        )
    }) {
        0
    } else if key.iter().any(|p| matches!(p, KeyPart::Route)) {
        1
    } else {
        2
    }
}

/// Compiles `rate_limits`, taking over the bucket state of every rule of `previous`
/// whose name, key and rates are unchanged.
pub(crate) fn compile(
    cx: &mut Compile<'_>,
    rules: &[crate::config::RateLimitRule],
    settings: &crate::config::RateLimitingConfig,
    route_names: &[&str],
    previous: Option<&RateLimits>,
) -> RateLimits {
    let (path, metrics, errors) = (cx.path, cx.metrics, &mut cx.errors);
    use crate::config::{ConfigError, RuleKey, RuleRate};
    let mut compiled = Vec::new();
    let mut names = std::collections::HashSet::new();
    for r in rules {
        let name = r.name.value.as_str();
        if !names.insert(name) {
            errors.push(ConfigError::at(
                path,
                &r.name.referenced,
                format!("rule name `{name}` is used twice"),
            ));
        }
        let words: Vec<&str> = match &r.key.value {
            RuleKey::One(k) => vec![k.as_str()],
            RuleKey::Composite(ks) => ks.iter().map(String::as_str).collect(),
        };
        let mut key = Vec::new();
        for word in &words {
            let part = match *word {
                "global" => KeyPart::Global,
                "ip" => KeyPart::Ip,
                "user" => KeyPart::User,
                "user_or_ip" => KeyPart::UserOrIp,
                "route" => KeyPart::Route,
                other => match other
                    .strip_prefix("header:")
                    .map(|h| http::HeaderName::from_bytes(h.trim().as_bytes()))
                {
                    Some(Ok(header)) => KeyPart::Header(header),
                    _ => {
                        errors.push(ConfigError::at(path, &r.key.referenced, format!("key `{other}`: expected global, ip, user, user_or_ip, route or header:NAME")));
                        continue;
                    }
                },
            };
            key.push(part);
        }
        if key.is_empty() || key.len() > 6 {
            errors.push(ConfigError::at(
                path,
                &r.key.referenced,
                "a key has one to six parts",
            ));
            continue;
        }
        let with_burst =
            |rate: crate::units::Rate| RateAndBurst::new(rate, r.burst.unwrap_or(rate.count));
        if r.burst == Some(0) {
            errors.push(ConfigError::at(
                path,
                &r.rate.referenced,
                "burst must be at least 1",
            ));
        }
        let rates = match &r.rate.value {
            RuleRate::One(rate) => RuleRates::One(with_burst(*rate)),
            RuleRate::PerTier(tiers) => RuleRates::PerTier(
                tiers
                    .iter()
                    .map(|(t, rate)| (t.clone(), with_burst(*rate)))
                    .collect(),
            ),
        };
        let sf_name = sf_string(name).unwrap_or_else(|| {
            errors.push(ConfigError::at(
                path,
                &r.name.referenced,
                format!(
                    "rule name `{name}`: only printable ASCII (the RateLimit headers carry it)"
                ),
            ));
            name.into()
        });
        let routes = r.routes.as_ref().map(|list| {
            list.iter()
                .filter_map(
                    |route| match route_names.iter().position(|n| *n == route.value) {
                        Some(index) => Some(index),
                        None => {
                            errors.push(ConfigError::at(
                                path,
                                &route.referenced,
                                format!("unknown route `{}`", route.value),
                            ));
                            None
                        }
                    },
                )
                .collect()
        });
        let bucket_key = BucketKey::new(&words, &r.rate.value, r.burst);
        let store = previous
            .and_then(|p| {
                p.rules
                    .iter()
                    .find(|old| &*old.name == name && old.bucket_key == bucket_key)
            })
            .map(|old| old.store.clone())
            .unwrap_or_else(|| std::sync::Arc::new(Store::for_key(&key, settings.max_keys)));
        let global = matches!(*store, Store::Global(_));
        compiled.push(Rule {
            name: name.into(),
            key,
            global,
            rates,
            sf_name,
            when: r.when,
            routes,
            shadow: r.shadow,
            store,
            bucket_key,
            metrics: RuleMetrics::new(metrics, name),
        });
    }
    compiled.sort_by_key(|rule| narrowness(&rule.key));
    let shared = shared_backend(path, settings, previous, errors);
    RateLimits {
        policy_values: policy_value_cache(compiled.len()),
        rules: compiled,
        headers: settings.headers,
        shared,
    }
}

/// The Redis backend of `rate_limiting`, reusing the previous policy's connection when
/// the address is unchanged.
fn shared_backend(
    path: &std::path::Path,
    settings: &crate::config::RateLimitingConfig,
    previous: Option<&RateLimits>,
    errors: &mut Vec<crate::config::ConfigError>,
) -> Option<shared::SharedBuckets> {
    use crate::config::ConfigError;
    use crate::redis::Address;
    let backend = &settings.backend;
    if backend.value != Backend::Redis {
        return None;
    }
    let Some(redis) = &settings.redis else {
        errors.push(ConfigError::at(
            path,
            &backend.referenced,
            "backend: redis needs a `rate_limiting.redis` section with its `url` (or `cluster`)",
        ));
        return None;
    };
    let (address, location) = match (&redis.url, &redis.cluster) {
        (Some(url), None) => (Address::Server(url.value.clone()), &url.referenced),
        (None, Some(nodes)) if !nodes.value.is_empty() => {
            (Address::Cluster(nodes.value.clone()), &nodes.referenced)
        }
        (None, Some(nodes)) => {
            errors.push(ConfigError::at(
                path,
                &nodes.referenced,
                "redis `cluster` needs at least one node URL",
            ));
            return None;
        }
        (Some(_), Some(nodes)) => {
            errors.push(ConfigError::at(
                path,
                &nodes.referenced,
                "redis takes `url` (one server) or `cluster` (seed nodes), not both",
            ));
            return None;
        }
        (None, None) => {
            errors.push(ConfigError::at(
                path,
                &backend.referenced,
                "backend: redis needs `rate_limiting.redis.url` (or `cluster`)",
            ));
            return None;
        }
    };
    if redis.timeout.0.is_zero() {
        errors.push(ConfigError::at(
            path,
            location,
            "redis `timeout` must be above 0s",
        ));
    }
    let reused = previous
        .and_then(|p| p.shared.as_ref())
        .filter(|s| s.store.address == address)
        .map(|s| s.store.clone());
    let store = match reused {
        Some(store) => store,
        None => match crate::redis::RedisStore::open(address, crate::redis::Store::RateLimit) {
            Ok(store) => store,
            Err(message) => {
                errors.push(ConfigError::at(path, location, message));
                return None;
            }
        },
    };
    Some(shared::SharedBuckets {
        store,
        timeout: redis.timeout.0,
        on_error: redis.on_error,
    })
}
