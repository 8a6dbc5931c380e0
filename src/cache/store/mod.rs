//! The storage behind Pingora's cache: a moka cache bounded by bytes and by entries,
//! the path index for purges, hits and fills (Pingora's `Storage` trait), and the
//! hand-off to the shared Redis tier.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::cache::eviction::CacheEntryId;
use pingora::cache::key::CacheHashKey;
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::storage::{
    HandleHit, HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, Storage};
use pingora::http::{RequestHeader, ResponseHeader};
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

mod shared;

use super::rfc9111::{keep_for, key_path, variance};
use super::{paths, CacheResult, Settings};

/// A filling request that holds the lock longer than this is presumed stuck; its
/// waiters are released.
const LOCK_AGE: Duration = Duration::from_secs(30);
/// Purge tags kept per entry, and their length: tags come from upstream headers and
/// must not make an entry's bookkeeping unbounded.
pub(super) const MAX_TAGS: usize = 32;
pub(super) const MAX_TAG_LEN: usize = 256;

/// Which entries `POST /cache/purge` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selector {
    /// The path, with any query when it has none itself; exactly that path and query
    /// when it has one.
    Path(String),
    Prefix(String),
    Tag(String),
    All,
}

impl Selector {
    /// The form purges are broadcast in to other replicas.
    pub(super) fn encode(&self) -> String {
        match self {
            Selector::Path(path) => format!("path {path}"),
            Selector::Prefix(prefix) => format!("prefix {prefix}"),
            Selector::Tag(tag) => format!("tag {tag}"),
            Selector::All => "all".to_string(),
        }
    }

    pub(super) fn decode(text: &str) -> Option<Selector> {
        match text.split_once(' ') {
            Some(("path", path)) => Some(Selector::Path(path.to_string())),
            Some(("prefix", prefix)) => Some(Selector::Prefix(prefix.to_string())),
            Some(("tag", tag)) => Some(Selector::Tag(tag.to_string())),
            None if text == "all" => Some(Selector::All),
            _ => None,
        }
    }

    fn matches(&self, entry: &Entry) -> bool {
        match self {
            Selector::Path(path) if path.contains('?') => &*entry.path == path,
            Selector::Path(path) => entry.path.split('?').next() == Some(path.as_str()),
            Selector::Prefix(prefix) => entry.path.starts_with(prefix.as_str()),
            Selector::Tag(tag) => entry.tags.iter().any(|t| **t == **tag),
            Selector::All => true,
        }
    }
}

/// One stored response. The meta stays serialized, as Pingora hands out a fresh
/// `CacheMeta` per hit.
pub(super) struct Entry {
    pub(super) meta: (Vec<u8>, Vec<u8>),
    pub(super) body: Bytes,
    pub(super) path: Box<str>,
    pub(super) tags: Box<[Box<str>]>,
    /// How long to keep the entry: its freshness plus the longest stale window.
    pub(super) keep_for: Duration,
    /// The meta decoded once, for hits the gateway answers itself; `None` inside when
    /// the entry varies (Pingora resolves variants).
    decoded: OnceLock<Option<Decoded>>,
}

struct Decoded {
    header: ResponseHeader,
    fresh_until: SystemTime,
    /// The time `Age` counts from.
    epoch: SystemTime,
}

impl Entry {
    pub(super) fn new(
        meta: (Vec<u8>, Vec<u8>),
        body: Bytes,
        path: Box<str>,
        tags: Box<[Box<str>]>,
        keep_for: Duration,
    ) -> Entry {
        Entry {
            meta,
            body,
            path,
            tags,
            keep_for,
            decoded: OnceLock::new(),
        }
    }

    /// Bytes held, the decoded header estimated at four times its compressed size.
    pub(super) fn size(&self) -> u64 {
        let tags: usize = self.tags.iter().map(|t| t.len()).sum();
        (self.meta.0.len() + 5 * self.meta.1.len() + self.body.len() + self.path.len() + tags)
            as u64
            + std::mem::size_of::<Entry>() as u64
    }

    fn decoded(&self) -> Option<&Decoded> {
        self.decoded
            .get_or_init(|| {
                let meta = CacheMeta::deserialize(&self.meta.0, &self.meta.1).ok()?;
                let varies =
                    meta.variance().is_some() || meta.headers().contains_key(http::header::VARY);
                if varies {
                    return None;
                }
                // What every fresh hit writes the same, settled once: the framing,
                // `x-cache: HIT`, and an `Age` slot that each hit only overwrites.
                let mut header = with_room(meta.response_header())?;
                if !header.headers.contains_key(http::header::CONTENT_LENGTH) {
                    header.remove_header(&http::header::TRANSFER_ENCODING);
                    header
                        .insert_header_alike(&http::header::CONTENT_LENGTH, self.body.len())
                        .ok()?;
                }
                header.insert_header_alike(&http::header::AGE, 0).ok()?;
                header
                    .insert_header_alike(&crate::cache::X_CACHE, CacheResult::Hit.header())
                    .ok()?;
                Some(Decoded {
                    header,
                    fresh_until: meta.fresh_until(),
                    epoch: meta.epoch(),
                })
            })
            .as_ref()
    }
}

/// Fields a hit adds to or rewrites in the stored head (`Age`, `x-cache`, the request
/// id, a `traceparent`, the framing) beyond the stored ones.
const HIT_ROOM: usize = 8;

/// A copy of `stored` whose header maps have room for `HIT_ROOM` more fields: each hit
/// clones the decoded head, and a map at capacity grows (rehashing every field) on the
/// first insert, even of a field it holds.
fn with_room(stored: &ResponseHeader) -> Option<ResponseHeader> {
    let mut header =
        ResponseHeader::build(stored.status, Some(stored.headers.len() + HIT_ROOM)).ok()?;
    header.set_version(stored.version);
    header.set_reason_phrase(stored.get_reason_phrase()).ok()?;
    for (name, value) in stored.case_header_iter() {
        header.append_header(name, value.clone()).ok()?;
    }
    Some(header)
}

/// A fresh stored response, with its `Age` set, ready to be written.
pub(crate) struct Fresh {
    pub(crate) header: ResponseHeader,
    pub(crate) body: Bytes,
}

struct KeepFor;

impl moka::Expiry<u128, Arc<Entry>> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &u128,
        entry: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.keep_for)
    }

    fn expire_after_update(
        &self,
        _key: &u128,
        entry: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.keep_for)
    }
}

/// The entries under one pair of bounds; replaced whole when a reload changes them.
struct Shelf {
    settings: Settings,
    entries: moka::sync::Cache<u128, Arc<Entry>>,
    bytes: Arc<AtomicU64>,
    paths: Arc<paths::PathIndex>,
}

impl Shelf {
    fn new(settings: Settings) -> Shelf {
        let bytes = Arc::new(AtomicU64::new(0));
        let paths = Arc::new(paths::PathIndex::new());
        let slot = (settings.max_size / settings.max_entries).max(1);
        let released = bytes.clone();
        let unindexed = paths.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(settings.max_size)
            .weigher(move |_, entry: &Arc<Entry>| {
                u32::try_from(entry.size().max(slot)).unwrap_or(u32::MAX)
            })
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(KeepFor)
            .eviction_listener(move |slot: Arc<u128>, entry: Arc<Entry>, cause| {
                released.fetch_sub(entry.size(), Ordering::Relaxed);
                // A replacement lives in the same slot, under the same path.
                if cause != moka::notification::RemovalCause::Replaced {
                    unindexed.remove(&entry.path, *slot);
                }
            })
            .build();
        Shelf {
            settings,
            entries,
            bytes,
            paths,
        }
    }

    fn insert(&self, key: u128, entry: Arc<Entry>) {
        self.bytes.fetch_add(entry.size(), Ordering::Relaxed);
        self.paths.add(&entry.path, key);
        self.entries.insert(key, entry);
    }
}

/// The cache storage Pingora reads and fills; one per process (Pingora wants it
/// `'static`).
pub(crate) struct Store {
    shelf: ArcSwap<Shelf>,
    shared: arc_swap::ArcSwapOption<shared::SharedTier>,
    lock: &'static CacheKeyLockImpl,
    served: [AtomicU64; 4],
}

impl Store {
    pub(crate) fn new(settings: Settings) -> &'static Store {
        let lock: &'static CacheLock = Box::leak(CacheLock::new_boxed(LOCK_AGE));
        let store: &'static Store = Box::leak(Box::new(Store {
            shelf: ArcSwap::from_pointee(Shelf::new(settings.clone())),
            shared: Default::default(),
            lock,
            served: Default::default(),
        }));
        store.configure_shared(&settings);
        store
    }

    /// Opens the shared tier the settings name, keeping the connection while the URL
    /// is unchanged.
    fn configure_shared(&'static self, settings: &Settings) {
        let current = self.shared.load_full();
        let next = match &settings.redis {
            None => None,
            Some((url, timeout)) => {
                let address = crate::redis::Address::Server(url.clone());
                match current.clone().filter(|t| t.store.address == address) {
                    Some(tier) if tier.timeout == *timeout => Some(tier),
                    Some(tier) => Some(Arc::new(tier.with_timeout(*timeout))),
                    None => {
                        match crate::redis::RedisStore::open(address, crate::redis::Store::Cache) {
                            Ok(store) => Some(Arc::new(shared::SharedTier::new(store, *timeout))),
                            Err(e) => {
                                tracing::error!("cache.redis: {e}; caching in this replica only");
                                None
                            }
                        }
                    }
                }
            }
        };
        if let Some(tier) = &next {
            if !current.is_some_and(|c| Arc::ptr_eq(&c, tier)) {
                crate::redis::runtime().spawn(shared::follow_purges(self, Arc::downgrade(tier)));
            }
        }
        self.shared.store(next);
    }

    /// Applies a new policy's bounds. Changed bounds start an empty cache: moka's
    /// capacity is fixed at construction.
    pub(crate) fn configure(&'static self, settings: &Settings) {
        let current = self.shelf.load();
        if !current.settings.same_shelf(settings) {
            current.entries.invalidate_all();
            self.shelf.store(Arc::new(Shelf::new(settings.clone())));
        }
        self.configure_shared(settings);
    }

    pub(crate) fn lock(&self) -> &'static CacheKeyLockImpl {
        self.lock
    }

    pub(crate) fn record(&self, outcome: CacheResult) {
        self.served[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Entries and bytes held, after moka's pending evictions have run.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let shelf = self.shelf.load();
        shelf.entries.run_pending_tasks();
        (
            shelf.entries.entry_count(),
            shelf.bytes.load(Ordering::Relaxed),
        )
    }

    /// Hits and stale answers over every request that looked in the cache.
    pub(crate) fn hit_ratio(&self) -> f64 {
        let [hit, miss, stale, _] = self.served.each_ref().map(|c| c.load(Ordering::Relaxed));
        let looked = hit + miss + stale;
        if looked == 0 {
            0.0
        } else {
            (hit + stale) as f64 / looked as f64
        }
    }

    /// The stored response for `key` when it is fresh and does not vary: what the
    /// gateway answers itself, without Pingora's cache state machine, which costs a
    /// header decode per hit. Anything else (missing, stale, varying) is left to it.
    pub(crate) fn fresh(&self, key: &CacheKey) -> Option<Fresh> {
        let entry = self.shelf.load().entries.get(&slot(key))?;
        let decoded = entry.decoded()?;
        let now = SystemTime::now();
        if decoded.fresh_until < now {
            return None;
        }
        let mut header = decoded.header.clone();
        let age = now.duration_since(decoded.epoch).unwrap_or_default();
        header
            .insert_header_alike(&http::header::AGE, age.as_secs())
            .ok()?;
        Some(Fresh {
            header,
            body: entry.body.clone(),
        })
    }

    /// The entry a request would find, variants resolved (for `POST /explain`).
    pub(crate) fn peek(&self, mut key: CacheKey, req: &RequestHeader) -> Option<CacheMeta> {
        let shelf = self.shelf.load();
        let read = |key: &CacheKey| {
            let entry = shelf.entries.get(&slot(key))?;
            CacheMeta::deserialize(&entry.meta.0, &entry.meta.1).ok()
        };
        let primary = read(&key)?;
        match variance(&primary, req) {
            Some(variance) if primary.variance() != Some(variance) => {
                key.set_variance_key(variance);
                read(&key)
            }
            _ => Some(primary),
        }
    }

    /// Removes the selected entries from this replica and from the shared tier;
    /// answers how many distinct entries went.
    pub(crate) async fn purge(&self, selector: &Selector) -> usize {
        let mut purged = self.purge_local(selector);
        if let Some(tier) = self.shared.load_full() {
            purged.extend(tier.purge(selector).await);
        }
        purged.sort_unstable();
        purged.dedup();
        purged.len()
    }

    /// Removes the selected entries of this replica; the shared tier's go in the
    /// background.
    pub(crate) fn invalidate(&self, selector: Selector) {
        self.purge_local(&selector);
        if let Some(tier) = self.shared.load_full() {
            crate::redis::runtime().spawn(async move {
                tier.purge(&selector).await;
            });
        }
    }

    pub(super) fn purge_local(&self, selector: &Selector) -> Vec<u128> {
        let shelf = self.shelf.load();
        let doomed: Vec<u128> = match selector {
            // What every successful unsafe request asks for: looked up, not scanned.
            Selector::Path(path) => shelf
                .paths
                .slots(path)
                .into_iter()
                .filter(|slot| {
                    shelf
                        .entries
                        .get(slot)
                        .is_some_and(|entry| selector.matches(&entry))
                })
                .collect(),
            // Admin purges, rare: a scan of at most `max_entries`.
            Selector::Prefix(_) | Selector::Tag(_) | Selector::All => shelf
                .entries
                .iter()
                .filter(|(_, entry)| selector.matches(entry))
                .map(|(key, _)| *key)
                .collect(),
        };
        doomed
            .into_iter()
            .filter(|key| shelf.entries.remove(key).is_some())
            .collect()
    }
}

impl Store {
    /// Stores an entry in this replica and in the shared tier. The shared write is
    /// awaited (within the tier's timeout) so that once a client has the response,
    /// the other replicas can find it.
    async fn keep(&'static self, slot: u128, entry: Entry) {
        let entry = Arc::new(entry);
        self.shelf.load().insert(slot, entry.clone());
        if let Some(tier) = self.shared.load_full() {
            tier.put(slot, &entry).await;
        }
    }
}

fn slot(key: &impl CacheHashKey) -> u128 {
    u128::from_be_bytes(key.combined_bin())
}

#[async_trait]
impl Storage for Store {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> pingora::Result<Option<(CacheMeta, HitHandler)>> {
        let slot = slot(key);
        let shelf = self.shelf.load();
        let entry = match shelf.entries.get(&slot) {
            Some(entry) => entry,
            None => {
                let Some(tier) = self.shared.load_full() else {
                    return Ok(None);
                };
                let Some(entry) = tier.get(slot).await else {
                    return Ok(None);
                };
                let entry = Arc::new(entry);
                shelf.insert(slot, entry.clone());
                entry
            }
        };
        let meta = CacheMeta::deserialize(&entry.meta.0, &entry.meta.1)?;
        Ok(Some((meta, Box::new(Hit::new(entry.body.clone())))))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> pingora::Result<MissHandler> {
        let tag_header = &self.shelf.load().settings.tag_header;
        let tags = meta
            .headers()
            .get_all(tag_header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TAG_LEN)
            .take(MAX_TAGS)
            .map(Box::from)
            .collect();
        let expected = meta
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        Ok(Box::new(Fill {
            store: self,
            slot: slot(key),
            meta: meta.serialize()?,
            keep_for: keep_for(meta),
            path: key_path(key.primary_key_str().unwrap_or("")).into(),
            tags,
            body: Vec::with_capacity(expected.min(self.shelf.load().settings.max_object)),
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> pingora::Result<PurgeOutcome> {
        let slot = slot(target.key());
        if let Some(tier) = self.shared.load_full() {
            crate::redis::runtime().spawn(async move { tier.remove(slot).await });
        }
        Ok(match self.shelf.load().entries.remove(&slot) {
            Some(_) => PurgeOutcome::Purged(None),
            None => PurgeOutcome::NotFound,
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> pingora::Result<bool> {
        let shelf = self.shelf.load();
        let slot = slot(key);
        let Some(old) = shelf.entries.get(&slot) else {
            return Ok(false);
        };
        self.keep(
            slot,
            Entry::new(
                meta.serialize()?,
                old.body.clone(),
                old.path.clone(),
                old.tags.clone(),
                keep_for(meta),
            ),
        )
        .await;
        Ok(true)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// A stored body being served: whole, or the ranges Pingora's range filter seeks to
/// (single and multipart `Range` requests on hits).
struct Hit {
    body: Bytes,
    range: std::ops::Range<usize>,
    done: bool,
}

impl Hit {
    fn new(body: Bytes) -> Hit {
        Hit {
            range: 0..body.len(),
            body,
            done: false,
        }
    }
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> pingora::Result<Option<Bytes>> {
        if std::mem::replace(&mut self.done, true) {
            return Ok(None);
        }
        Ok(Some(self.body.slice(self.range.clone())))
    }

    fn can_seek(&self) -> bool {
        true
    }

    /// `end` is exclusive; `None` reads to the end of the body.
    fn seek(&mut self, start: usize, end: Option<usize>) -> pingora::Result<()> {
        let len = self.body.len();
        if start >= len {
            return pingora::Error::e_explain(
                pingora::ErrorType::InternalError,
                format!("range start {start} is beyond the body's {len} bytes"),
            );
        }
        self.range = start..end.map_or(len, |end| end.min(len));
        self.done = false;
        Ok(())
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> pingora::Result<()> {
        Ok(())
    }

    fn entry_id(&self) -> Option<CacheEntryId> {
        None
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// A response being stored: its body is gathered, then the entry is inserted whole,
/// so a lookup never sees half a body.
struct Fill {
    store: &'static Store,
    slot: u128,
    meta: (Vec<u8>, Vec<u8>),
    keep_for: Duration,
    path: Box<str>,
    tags: Box<[Box<str>]>,
    body: Vec<u8>,
}

#[async_trait]
impl HandleMiss for Fill {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> pingora::Result<()> {
        self.body.extend_from_slice(&data);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> pingora::Result<MissFinishType> {
        let Fill {
            store,
            slot,
            meta,
            keep_for,
            path,
            tags,
            body,
        } = *self;
        let entry = Entry::new(meta, body.into(), path, tags, keep_for);
        let size = entry.size() as usize;
        store.keep(slot, entry).await;
        Ok(MissFinishType::Created(size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    #[test]
    fn a_decoded_head_has_room_for_what_each_hit_adds() {
        let mut stored = ResponseHeader::build(200, None).unwrap();
        for (name, value) in [
            ("Content-Type", "text/plain"),
            ("Cache-Control", "max-age=60"),
            ("Date", "Wed, 02 Dec 2026 10:00:00 GMT"),
            ("X-Seven", "7"),
            ("Content-Length", "2"),
            ("Server", "origin"),
        ] {
            stored.append_header(name, value).unwrap();
        }
        let mut header = with_room(&stored).unwrap();
        let wire = |h: &ResponseHeader| {
            let mut buf = bytes::BytesMut::new();
            h.header_to_h1_wire(&mut buf);
            buf
        };
        assert_eq!(
            wire(&header),
            wire(&stored),
            "the same fields, in the same case"
        );
        header.insert_header(http::header::AGE, 0).unwrap();
        header.insert_header("x-cache", "HIT").unwrap();
        let copy = header.clone();
        assert!(
            copy.headers.capacity() >= copy.headers.len() + HIT_ROOM - 2,
            "{} fields, room for {}",
            copy.headers.len(),
            copy.headers.capacity()
        );
    }

    #[test]
    fn both_bounds_hold_under_a_flood() {
        let store = Store::new(Settings {
            max_size: 64 * 1024,
            max_entries: 16,
            max_object: 8 * 1024,
            tag_header: HeaderName::from_static("cache-tag"),
            redis: None,
        });
        let shelf = store.shelf.load();
        for i in 0..1_000u128 {
            shelf.insert(
                i,
                Arc::new(Entry::new(
                    (vec![0; 64], vec![0; 64]),
                    Bytes::from(vec![0u8; if i % 2 == 0 { 100 } else { 6_000 }]),
                    format!("/p/{i}").into(),
                    Box::new([]),
                    Duration::from_secs(60),
                )),
            );
        }
        let (entries, bytes) = store.usage();
        assert!(entries <= 16, "{entries} entries");
        assert!(bytes <= 64 * 1024, "{bytes} bytes");
        assert!(entries > 0);
        assert_eq!(
            shelf.paths.len() as u64,
            entries,
            "the path index follows the evictions"
        );
    }

    #[test]
    fn purge_selects_by_path_prefix_and_tag() {
        let store = Store::new(Settings {
            max_size: 1 << 20,
            max_entries: 100,
            max_object: 1 << 16,
            tag_header: HeaderName::from_static("cache-tag"),
            redis: None,
        });
        let shelf = store.shelf.load();
        for (i, (path, tag)) in [
            ("/a?x=1", "t1"),
            ("/a?x=2", "t2"),
            ("/ab", "t1"),
            ("/b", "t3"),
        ]
        .into_iter()
        .enumerate()
        {
            shelf.insert(
                i as u128,
                Arc::new(Entry::new(
                    (Vec::new(), Vec::new()),
                    Bytes::new(),
                    path.into(),
                    Box::new([tag.into()]),
                    Duration::from_secs(60),
                )),
            );
        }
        let purge = |selector| store.purge_local(&selector).len();
        assert_eq!(purge(Selector::Path("/a?x=1".into())), 1);
        assert_eq!(purge(Selector::Path("/a".into())), 1, "/a?x=2, not /ab");
        assert_eq!(purge(Selector::Tag("t1".into())), 1);
        assert_eq!(purge(Selector::Prefix("/".into())), 1);
        assert_eq!(purge(Selector::All), 0);
        assert_eq!(store.usage().0, 0);
        assert_eq!(shelf.paths.len(), 0);
    }
}
