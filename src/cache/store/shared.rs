//! The cache's shared tier (`cache.redis`): entries written by one replica are hits
//! for the others. Every call is bounded by the tier's timeout and skipped for a while
//! after a failure (see [`RedisStore::call`]), so a Redis outage degrades to each
//! replica's own cache, never to an error or a stalled request.
//!
//! Layout: `tollgate:cache:e:{slot}` holds an entry (meta, path, tags, body), expiring
//! with it; `tollgate:cache:p:{path}` and `tollgate:cache:t:{tag}` are sets of
//! `"{slot} {path?query}"` members that let a purge by path, prefix or tag find the
//! entries of every replica. Purges are also published on `tollgate:cache:purge`, and
//! every replica applies the ones it hears to its own in-memory entries.
//!
//! An outage must not let a purged response live on: a purge Redis does not take is
//! kept (bounded) and replayed, deletion and broadcast, once Redis answers again; a
//! replica whose subscription was broken drops its own copies when it is back, since it
//! cannot know which purges it missed.

use super::{Entry, Selector, Store, MAX_TAGS};
use crate::cache::rfc9111::keep_for;
use crate::redis::{Address, Link, RedisStore};
use futures_util::StreamExt;
use redis::AsyncCommands;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

const PREFIX: &str = "tollgate:cache:";
const PURGE_CHANNEL: &str = "tollgate:cache:purge";
/// Past this many distinct purges waiting for Redis, they become one purge of all.
const MAX_PENDING: usize = 256;
/// How often waiting purges are retried.
const CATCH_UP_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct SharedTier {
    pub(crate) store: Arc<RedisStore>,
    pub(crate) timeout: Duration,
    /// Purges Redis did not take, oldest first.
    pending: Mutex<Vec<Selector>>,
}

fn entry_key(slot: u128) -> String {
    format!("{PREFIX}e:{slot:032x}")
}

fn path_key(path: &str) -> String {
    format!("{PREFIX}p:{}", path.split('?').next().unwrap_or(path))
}

fn tag_key(tag: &str) -> String {
    format!("{PREFIX}t:{tag}")
}

/// Length-prefixed fields, then the body.
fn encode(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(entry.size() as usize + 32);
    let mut field = |bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    field(&entry.meta.0);
    field(&entry.meta.1);
    field(entry.path.as_bytes());
    field(&(entry.tags.len() as u32).to_be_bytes());
    for tag in entry.tags.iter() {
        field(tag.as_bytes());
    }
    out.extend_from_slice(&entry.body);
    out
}

fn decode(bytes: &[u8]) -> Option<Entry> {
    let mut rest = bytes;
    let mut field = || -> Option<&[u8]> {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let value = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        Some(value)
    };
    let meta = (field()?.to_vec(), field()?.to_vec());
    let path: Box<str> = std::str::from_utf8(field()?).ok()?.into();
    let count = u32::from_be_bytes(field()?.try_into().ok()?) as usize;
    let tags = (0..count.min(MAX_TAGS))
        .map(|_| Some(Box::from(std::str::from_utf8(field()?).ok()?)))
        .collect::<Option<Box<[Box<str>]>>>()?;
    let meta_parsed = pingora::cache::CacheMeta::deserialize(&meta.0, &meta.1).ok()?;
    Some(Entry::new(
        meta,
        bytes::Bytes::copy_from_slice(rest),
        path,
        tags,
        keep_for(&meta_parsed),
    ))
}

impl SharedTier {
    pub(crate) fn new(store: Arc<RedisStore>, timeout: Duration) -> SharedTier {
        SharedTier {
            store,
            timeout,
            pending: Mutex::new(Vec::new()),
        }
    }

    /// The same Redis with another timeout; purges still waiting go along.
    pub(crate) fn with_timeout(&self, timeout: Duration) -> SharedTier {
        SharedTier {
            store: self.store.clone(),
            timeout,
            pending: Mutex::new(self.pending().clone()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<Selector>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) async fn get(&self, slot: u128) -> Option<Entry> {
        let key = entry_key(slot);
        let bytes = self
            .store
            .call(self.timeout, |mut c| async move {
                c.get::<_, Option<Vec<u8>>>(key)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .ok()??;
        decode(&bytes)
    }

    pub(crate) async fn put(&self, slot: u128, entry: &Entry) {
        let ttl = entry.keep_for.as_millis().max(1) as u64;
        let member = format!("{slot:032x} {}", entry.path);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(entry_key(slot))
            .arg(encode(entry))
            .arg("PX")
            .arg(ttl)
            .ignore();
        let index =
            std::iter::once(path_key(&entry.path)).chain(entry.tags.iter().map(|t| tag_key(t)));
        for set in index {
            pipe.cmd("SADD").arg(&set).arg(&member).ignore();
            // A set lives as long as its longest-lived member.
            for mode in ["NX", "GT"] {
                pipe.cmd("PEXPIRE").arg(&set).arg(ttl).arg(mode).ignore();
            }
        }
        let _ = self
            .store
            .call(self.timeout, |mut c| async move {
                pipe.query_async::<()>(&mut c)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
    }

    /// Tells the other replicas to apply `selector` to their own entries.
    async fn publish(&self, selector: &Selector) -> bool {
        let message = selector.encode();
        self.store
            .call(self.timeout, |mut c| async move {
                c.publish::<_, _, ()>(PURGE_CHANNEL, message)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .is_ok()
    }

    pub(crate) async fn remove(&self, slot: u128) {
        let key = entry_key(slot);
        let _ = self
            .store
            .call(self.timeout, |mut c| async move {
                c.del::<_, ()>(key).await.map_err(|e| e.to_string())
            })
            .await;
    }

    /// Deletes the selected entries and tells the other replicas; answers the slots
    /// that existed. What Redis does not take waits for [`Self::catch_up`].
    pub(crate) async fn purge(&self, selector: &Selector) -> Vec<u128> {
        match self.delete(selector).await {
            Ok(gone) => {
                if !self.publish(selector).await {
                    self.defer(selector);
                }
                gone
            }
            Err(_) => {
                self.defer(selector);
                Vec::new()
            }
        }
    }

    /// Replays the purges Redis did not take; those it still does not take wait again.
    pub(crate) async fn catch_up(&self) {
        let pending = std::mem::take(&mut *self.pending());
        for selector in &pending {
            self.purge(selector).await;
        }
    }

    fn defer(&self, selector: &Selector) {
        let mut pending = self.pending();
        if pending
            .iter()
            .any(|s| matches!(s, Selector::All) || s == selector)
        {
            return;
        }
        if pending.len() >= MAX_PENDING {
            pending.clear();
            pending.push(Selector::All);
        } else {
            pending.push(selector.clone());
        }
    }

    async fn delete(&self, selector: &Selector) -> Result<Vec<u128>, ()> {
        let timeout = self.timeout.max(Duration::from_secs(5));
        let selector = selector.clone();
        self.store
            .call(timeout, |mut c| async move {
                let fail = |e: redis::RedisError| e.to_string();
                let mut members: Vec<String> = Vec::new();
                let mut sets: Vec<String> = Vec::new();
                match &selector {
                    Selector::All => {
                        let keys = scan(&mut c, &format!("{PREFIX}*")).await?;
                        let slots = keys
                            .iter()
                            .filter_map(|k| k.strip_prefix(&format!("{PREFIX}e:")))
                            .map(|hex| format!("{hex} "))
                            .collect();
                        members = slots;
                        sets = keys;
                    }
                    Selector::Path(path) => {
                        let set = path_key(path);
                        let all: Vec<String> = c.smembers(&set).await.map_err(fail)?;
                        members = if path.contains('?') {
                            all.into_iter()
                                .filter(|m| m.split_once(' ').map(|(_, p)| p) == Some(path))
                                .collect()
                        } else {
                            sets.push(set);
                            all
                        };
                    }
                    Selector::Prefix(prefix) => {
                        let pattern = format!("{PREFIX}p:{}*", glob_escape(prefix));
                        for set in scan(&mut c, &pattern).await? {
                            let all: Vec<String> = c.smembers(&set).await.map_err(fail)?;
                            members.extend(all);
                            sets.push(set);
                        }
                    }
                    Selector::Tag(tag) => {
                        let set = tag_key(tag);
                        members = c.smembers(&set).await.map_err(fail)?;
                        sets.push(set);
                    }
                }
                let mut gone = Vec::new();
                for member in &members {
                    let hex = member.split(' ').next().unwrap_or("");
                    let Ok(slot) = u128::from_str_radix(hex, 16) else {
                        continue;
                    };
                    let deleted: u32 = c.del(entry_key(slot)).await.map_err(fail)?;
                    if deleted > 0 {
                        gone.push(slot);
                    }
                }
                if !sets.is_empty() {
                    c.del::<_, ()>(&sets).await.map_err(fail)?;
                }
                Ok(gone)
            })
            .await
    }
}

/// Applies the purges other replicas publish to this replica's entries, and replays
/// this replica's purges that Redis did not take, for as long as `tier` is the store's
/// shared tier; reconnects a second after a failure.  A replica hears its own purges
/// too, which then find nothing left.
pub(crate) async fn follow_purges(store: &'static Store, tier: Weak<SharedTier>) {
    let mut missed = false;
    loop {
        // `cache.redis` names one server: its tier is never a cluster.
        let Some(Address::Server(url)) = tier.upgrade().map(|t| t.store.address.clone()) else {
            return;
        };
        let subscription = async {
            let client = redis::Client::open(url)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(PURGE_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        if let Ok(pubsub) = subscription.await {
            if missed {
                // Purges published while this replica was not listening are unknown.
                store.purge_local(&Selector::All);
            }
            let mut messages = pubsub.into_on_message();
            let mut catch_up = tokio::time::interval(CATCH_UP_EVERY);
            loop {
                tokio::select! {
                    message = messages.next() => {
                        let Some(message) = message else {
                            break;
                        };
                        let selector = message
                            .get_payload::<String>()
                            .ok()
                            .and_then(|text| Selector::decode(&text));
                        if let Some(selector) = selector {
                            store.purge_local(&selector);
                        }
                    }
                    _ = catch_up.tick() => {
                        let Some(tier) = tier.upgrade() else {
                            return;
                        };
                        tier.catch_up().await;
                    }
                }
            }
        }
        missed = true;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn scan(c: &mut Link, pattern: &str) -> Result<Vec<String>, String> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await
            .map_err(|e| e.to_string())?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_the_round_trip_and_garbage_is_refused() {
        let mut header = pingora::http::ResponseHeader::build(200, None).unwrap();
        header.insert_header("cache-tag", "a,b").unwrap();
        let now = std::time::SystemTime::now();
        let meta =
            pingora::cache::CacheMeta::new(now + Duration::from_secs(60), now, 5, 10, header);
        let entry = Entry::new(
            meta.serialize().unwrap(),
            bytes::Bytes::from_static(b"hello"),
            "/a?b=1".into(),
            Box::new(["a".into(), "b".into()]),
            Duration::from_secs(70),
        );
        let back = decode(&encode(&entry)).unwrap();
        assert_eq!(back.body, entry.body);
        assert_eq!(back.path, entry.path);
        assert_eq!(back.tags, entry.tags);
        assert_eq!(back.meta, entry.meta);
        assert!(back.keep_for > Duration::from_secs(60));
        assert!(decode(b"\x00\x00\x00\x09short").is_none());
        assert_eq!(glob_escape("/a*[b]"), "/a\\*\\[b\\]");
        for selector in [
            Selector::Path("/a b?c".into()),
            Selector::Prefix("/api/".into()),
            Selector::Tag("user-42".into()),
            Selector::All,
        ] {
            let back = Selector::decode(&selector.encode()).unwrap();
            assert_eq!(back.encode(), selector.encode());
        }
    }
}
