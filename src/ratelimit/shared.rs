//! Buckets shared by replicas (`rate_limiting.backend: redis`).
//!
//! One request is one round trip: a server-side script evaluates every rule that
//! applies, in the same narrowest-first order and with the same GCRA arithmetic as the
//! local store, stopping at the first enforced denial. (Against a Redis Cluster, where
//! a script only reaches one shard, it is one round trip per bucket, same order, same
//! stop.) Redis's own clock (`TIME`) is the only clock, so replicas with skewed clocks
//! still agree; each bucket expires when it has refilled, so Redis holds state only for
//! clients that are currently spending.
//!
//! A Redis outage must never stall traffic: calls go through
//! [`RedisStore::call`](crate::redis::RedisStore::call), bounded by `timeout` and
//! skipped for a while after a failure, so requests go straight to `on_error`.

use super::{Quota, Verdict};
use crate::config::OnRedisError;
use crate::redis::{Address, RedisStore};
use sha2::{Digest, Sha256};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// GCRA over microseconds (Lua numbers are doubles: nanoseconds since the epoch would
/// lose precision). `ARGV[1]` is 1 to consume, 0 to only look; then per key: emission
/// interval, tolerance (emission × burst), shadow flag. Returns four integers per
/// evaluated key: allowed, remaining, reset, retry after (µs).
const GCRA_SCRIPT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local consume = ARGV[1] == '1'
local out = {}
for i, key in ipairs(KEYS) do
  local base = 1 + (i - 1) * 3
  local emission = tonumber(ARGV[base + 1])
  local tolerance = tonumber(ARGV[base + 2])
  local shadow = ARGV[base + 3] == '1'
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + emission
  if new_tat - now > tolerance then
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = tat - now
    out[#out + 1] = new_tat - tolerance - now
    if not shadow then return out end
  else
    local used = tat - now
    if consume then
      used = new_tat - now
      redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil(used / 1000) + 1000)
    end
    out[#out + 1] = 1
    out[#out + 1] = math.floor((tolerance - used) / emission)
    out[#out + 1] = used
    out[#out + 1] = 0
  end
end
return out
"#;

/// The script, prepared once per process.
fn gcra_script() -> &'static redis::Script {
    static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(GCRA_SCRIPT))
}

/// One bucket the script is asked about.
pub(crate) struct SharedCheck {
    pub(crate) key: String,
    pub(crate) quota: Quota,
    pub(crate) shadow: bool,
}

/// The Redis key of a bucket: readable up to the rule name, then a digest of the rule's
/// definition and the key parts (so a changed rule starts fresh, and user names or
/// header values of any length make keys of one size).
pub(crate) fn bucket_key(rule: &str, definition: &str, parts: &[&[u8]]) -> String {
    let mut digest = Sha256::new();
    digest.update(definition.as_bytes());
    for part in parts {
        digest.update((part.len() as u32).to_be_bytes());
        digest.update(part);
    }
    let digest = digest.finalize();
    let mut key = String::with_capacity(rule.len() + 45);
    key.push_str("tollgate:rl:");
    key.push_str(rule);
    key.push(':');
    for byte in &digest[..16] {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

/// The backend as one policy configures it.
pub(crate) struct SharedBuckets {
    pub(crate) store: Arc<RedisStore>,
    pub(crate) timeout: Duration,
    pub(crate) on_error: OnRedisError,
}

impl SharedBuckets {
    /// Asks Redis about `checks` in order; the answer covers the checks up to and
    /// including the first enforced denial. `Err` when Redis is skipped, fails or does
    /// not answer within the timeout.
    pub(crate) async fn check(
        &self,
        checks: &[SharedCheck],
        consume: bool,
    ) -> Result<Vec<Verdict>, ()> {
        // A script may only touch keys of one cluster shard, and a request's buckets
        // hash to different ones: against a cluster, one round trip per bucket, in the
        // same order, stopping where the script would. All within the one timeout.
        let batch = match self.store.address {
            Address::Server(_) => checks.len().max(1),
            Address::Cluster(_) => 1,
        };
        let invocations: Vec<_> = checks
            .chunks(batch)
            .map(|batch| (invocation(batch, consume), batch))
            .collect();
        self.store
            .call(self.timeout, |mut connection| async move {
                let mut verdicts = Vec::with_capacity(checks.len());
                for (invocation, batch) in invocations {
                    let values = invocation
                        .invoke_async::<Vec<i64>>(&mut connection)
                        .await
                        .map_err(|e| e.to_string())?;
                    let answered = verdicts_of(&values, batch.len())?;
                    let denied = answered
                        .iter()
                        .zip(batch)
                        .any(|(verdict, check)| !verdict.allowed && !check.shadow);
                    verdicts.extend(answered);
                    if denied {
                        break;
                    }
                }
                Ok(verdicts)
            })
            .await
    }
}

/// The script invocation for `checks` (ARGV as the script reads it).
fn invocation(checks: &[SharedCheck], consume: bool) -> redis::ScriptInvocation<'static> {
    let mut invocation = gcra_script().prepare_invoke();
    invocation.arg(u8::from(consume));
    for check in checks {
        let emission = (check.quota.emission / 1_000).max(1);
        invocation
            .key(&check.key)
            .arg(emission)
            .arg(emission.saturating_mul(u64::from(check.quota.burst)))
            .arg(u8::from(check.shadow));
    }
    invocation
}

/// The script's answer, four integers per evaluated key, for at most `asked` keys.
fn verdicts_of(values: &[i64], asked: usize) -> Result<Vec<Verdict>, String> {
    if !values.len().is_multiple_of(4) || values.len() / 4 > asked {
        return Err(format!("unexpected answer of {} values", values.len()));
    }
    let micros = |v: i64| Duration::from_micros(v.max(0) as u64);
    Ok(values
        .chunks_exact(4)
        .map(|v| Verdict {
            allowed: v[0] == 1,
            remaining: v[1].clamp(0, i64::from(u32::MAX)) as u32,
            reset: micros(v[2]),
            retry_after: micros(v[3]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_distinct_and_bounded() {
        let a = bucket_key("per-ip", "def", &[b"\x04\x01\x02\x03\x04"]);
        assert_eq!(a, bucket_key("per-ip", "def", &[b"\x04\x01\x02\x03\x04"]));
        assert!(a.starts_with("tollgate:rl:per-ip:"));
        assert_eq!(a.len(), "tollgate:rl:per-ip:".len() + 32);
        assert_ne!(
            a,
            bucket_key("per-ip", "changed", &[b"\x04\x01\x02\x03\x04"])
        );
        // Part boundaries count: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            bucket_key("r", "d", &[b"ab", b"c"]),
            bucket_key("r", "d", &[b"a", b"bc"])
        );
        let long = vec![b'x'; 10_000];
        assert_eq!(
            bucket_key("r", "d", &[&long]).len(),
            "tollgate:rl:r:".len() + 32
        );
    }
}
