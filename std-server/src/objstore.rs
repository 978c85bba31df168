//! Files in an object store (S3 or any S3-compatible server, through the
//! `object_store` crate), shared by any number of server instances.
//!
//! Storage is content-addressed: a file's bytes are cut into chunks (the
//! same content-defined chunks the protocol uses) and each chunk is stored
//! once, in a pack with others; a version names its chunks; a name points
//! at a version. Layout under the store's prefix (`HEX` is lower-case hex):
//! - `packs/HEX`: chunks, back to back (an upload seals a pack every
//!   [`PACK_TARGET`] bytes of new chunks, and its last one smaller);
//! - `versions/HEX`: a version, keyed by the root of its hash tree: its
//!   size, whole-file SHA-256, and where each of its chunks lies (pack and
//!   offset), so that any byte range is a few range requests away;
//! - `refs/NAME`: the version `NAME` holds now, with its time and mode.
//!   Created with `If-None-Match: *` and replaced with `If-Match` on the
//!   ETag read when the upload began: two instances publishing one name
//!   never lose an update silently (see [`ObjStore`]'s `finish`);
//! - `dirs/NAME`: a directory made by a tree sync (others exist because
//!   files are under them), with its time and mode;
//! - `partials/HEX`: what an interrupted upload of a name (`HEX` is the
//!   SHA-256 of the name) had stored, renewed as its packs are sealed, so
//!   that the next upload of the name, through any instance, reuses it.
//!
//! Nothing is ever changed in place except references: packs and versions
//! are written once. Packs and versions no reference reaches are garbage
//! (an upload that was never published, a replaced version).

use crate::store::{FileHash, MIDSTATE_STEP, PartialLimits};
use bytes::Bytes;
use deltasync_core::Hash;
use deltasync_core::chunker::{Chunker, ChunkerKind};
use deltasync_core::conn::server::{PartialFile, Published, Store, StoredFile};
use deltasync_core::error::ErrorCode;
use deltasync_core::message::{EntryKind, Expect, MODE_BITS, Meta, validate_name};
use deltasync_core::source::{IoFailed, Output, Source};
use deltasync_core::tree::{Tree, TreeIndexer};
use deltasync_host::readback::Follow;
use futures::{StreamExt, TryStreamExt};
use object_store::path::{Path as Key, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

mod counted;
mod gc;
pub use counted::Counts;
pub use gc::GcReport;

/// New chunks are sealed into a pack once it holds this many bytes.
pub const PACK_TARGET: usize = 16 << 20;
/// A slow upload records its progress about this often (less often as it
/// grows: see `write`).
const RECORD_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// A read fetches up to this much of a pack ahead, when the version's next
/// chunks follow in it.
const READ_AHEAD: u64 = 4 << 20;
/// Versions kept parsed in memory, by the bytes they hold.
const VERSION_CACHE_BYTES: usize = 64 << 20;
/// Requests in flight for one listing.
const LIST_CONCURRENCY: usize = 32;
/// References kept in memory for listings (each about 200 bytes).
const REF_CACHE: usize = 1 << 16;
/// Longest key an S3 server takes.
const MAX_KEY: usize = 1024;
/// How many times an unconditional upload retries its publication when
/// other instances keep publishing the name meanwhile.
const PUBLISH_TRIES: usize = 16;
/// Marks the start of every object this store writes (after it: the
/// object's kind and format).
const MAGIC: &[u8; 4] = b"DSO1";
/// The mode of a file uploaded without one.
const DEFAULT_MODE: u32 = 0o644;

/// A pack's name: 128 random bits.
type PackId = [u8; 16];

/// The packs a version names, and how many of its bytes lie in each.
type PackUse = Arc<Vec<(PackId, u64)>>;

/// Where a chunk lies.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Chunk {
    /// SHA-256 of its bytes.
    id: Hash,
    /// Index of its pack in the version's (or partial's) pack list.
    pack: u32,
    /// Offset in the pack.
    at: u32,
    /// Length.
    len: u32,
}

/// A stored version: its chunks, in file order, and where they are.
#[derive(Serialize, Deserialize)]
struct Version {
    size: u64,
    file_hash: Hash,
    chunking: ChunkerKind,
    packs: Vec<PackId>,
    chunks: Vec<Chunk>,
    /// The version's tree, when its chunks are not its tree's leaves (the
    /// transfer was chunked otherwise): kept as sent.
    tree: Option<Vec<u8>>,
    /// The whole-file SHA-256's state after every `MIDSTATE_STEP` bytes: a
    /// new version that starts as this one is hashed from there.
    midstates: Vec<Vec<u8>>,
}

/// A name's current version and metadata.
#[derive(Clone, Serialize, Deserialize)]
struct Ref {
    /// The version's key under `versions/`: its root in hex, and after a
    /// `-` a random suffix if that key was condemned when it was published.
    version: String,
    size: u64,
    file_hash: Hash,
    chunking: ChunkerKind,
    modified: u64,
    nanos: u32,
    mode: u32,
    /// The version's sketch (see `deltasync_core::tree::sketch`).
    sketch: Vec<u64>,
}

/// A directory's metadata.
#[derive(Clone, Copy, Serialize, Deserialize)]
struct DirMark {
    modified: u64,
    nanos: u32,
    mode: u32,
}

/// What an interrupted upload stored: a prefix of the version it sent.
#[derive(Serialize, Deserialize)]
struct Partial {
    name: String,
    chunking: ChunkerKind,
    modified: u64,
    packs: Vec<PackId>,
    chunks: Vec<Chunk>,
}

impl Partial {
    fn size(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len)).sum()
    }
}

/// A version read and made ready: its tree and its chunks' end offsets.
struct Loaded {
    /// Its key under `versions/` (`None`: a partial's chunks).
    key: Option<String>,
    version: Version,
    ends: Vec<u64>,
    tree: Tree,
    /// When it was read from the store (see `recent_chunk`).
    read_at: std::time::Instant,
    /// Its chunks by id, built when first asked for.
    by_id: std::sync::OnceLock<HashMap<Hash, u32>>,
}

impl Loaded {
    fn new(key: Option<String>, version: Version) -> Option<Loaded> {
        let mut ends = Vec::with_capacity(version.chunks.len());
        let mut end = 0u64;
        for c in &version.chunks {
            if c.pack as usize >= version.packs.len() {
                return None;
            }
            end += u64::from(c.len);
            ends.push(end);
        }
        if end != version.size {
            return None;
        }
        let tree = match &version.tree {
            Some(bytes) => Tree::from_bytes(bytes)?,
            None => {
                let leaves: Vec<(Hash, u64)> =
                    version.chunks.iter().zip(&ends).map(|(c, &e)| (c.id, e)).collect();
                Tree::from_chunks(version.size, version.chunking, &leaves, version.file_hash)
            }
        };
        (tree.summary().size == version.size).then(|| Loaded {
            key,
            version,
            ends,
            tree,
            read_at: std::time::Instant::now(),
            by_id: std::sync::OnceLock::new(),
        })
    }

    fn weight(&self) -> usize {
        // Chunks, end offsets, the tree's ids and ends, and the index by id.
        self.version.chunks.len() * (std::mem::size_of::<Chunk>() + 8 + 48 + 48)
            + self.version.midstates.iter().map(|m| m.len() + 24).sum::<usize>()
            + 1024
    }

    /// Where chunk `id` is, if this version has it.
    fn find(&self, id: &Hash) -> Option<(PackId, u32, u32)> {
        let by_id = self
            .by_id
            .get_or_init(|| self.version.chunks.iter().enumerate().map(|(i, c)| (c.id, i as u32)).collect());
        let c = self.version.chunks[*by_id.get(id)? as usize];
        Some((self.version.packs[c.pack as usize], c.at, c.len))
    }
}

fn encode<T: Serialize>(kind: u8, v: &T) -> Bytes {
    let mut out = MAGIC.to_vec();
    out.push(kind);
    postcard::to_extend(v, out).expect("serializing into a Vec cannot fail").into()
}

fn decode<T: for<'de> Deserialize<'de>>(kind: u8, bytes: &[u8]) -> Option<T> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let (&k, rest) = rest.split_first()?;
    if k != kind {
        return None;
    }
    postcard::from_bytes(rest).ok()
}

const KIND_VERSION: u8 = 1;
const KIND_REF: u8 = 2;
const KIND_DIR: u8 = 3;
const KIND_PARTIAL: u8 = 4;

fn unix_now() -> (u64, u32) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn os_error(e: object_store::Error) -> ErrorCode {
    match e {
        object_store::Error::NotFound { .. } => ErrorCode::NotFound,
        object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. } => {
            ErrorCode::Conflict
        }
        e => {
            tracing::warn!(error = %e, "object store error");
            ErrorCode::Storage
        }
    }
}

/// Where the store is and how it behaves.
#[derive(Clone, Debug)]
pub struct ObjConfig {
    /// Prefix of every key (`""`: the bucket's root).
    pub prefix: String,
    /// How to name the store in logs (`s3://bucket/prefix`).
    pub label: String,
    /// Limits on interrupted uploads.
    pub partials: PartialLimits,
    /// How long garbage stays before it is collected (see `gc`).
    pub grace: std::time::Duration,
}

struct Inner {
    os: Arc<dyn ObjectStore>,
    counts: Arc<Counts>,
    prefix: Vec<String>,
    label: String,
    rt: Handle,
    partials: PartialLimits,
    grace: std::time::Duration,
    versions: Mutex<VersionCache>,
    /// Each file's sketch, for an upload whose data another file holds:
    /// from the references this instance wrote or read (every one, at
    /// start and at each upkeep).
    sketches: crate::sketches::Sketches,
    /// References read, by name, with their ETag: a listing that shows the
    /// same ETag is described without reading them again.
    refs: Mutex<lru::LruCache<String, (String, Ref)>>,
    /// The packs each version object names, and how many of its bytes lie
    /// in each, for collection; with the object's ETag (or time) when it
    /// was read (collection moves chunks, see `gc`).
    version_packs: Mutex<HashMap<String, (String, PackUse)>>,
}

struct VersionCache {
    lru: lru::LruCache<String, Arc<Loaded>>,
    bytes: usize,
}

impl VersionCache {
    fn forget(&mut self, version: &str) {
        if let Some(old) = self.lru.pop(version) {
            self.bytes -= old.weight();
        }
    }
}

/// Files in an object store; cheap to clone (clones share caches).
///
/// Every method blocks on the object store: call them from blocking
/// threads (the server's workers), never from async code.
#[derive(Clone)]
pub struct ObjStore(Arc<Inner>);

impl ObjStore {
    /// A store over `os`, using `rt` for its requests.
    pub fn new(os: Arc<dyn ObjectStore>, config: ObjConfig, rt: Handle) -> ObjStore {
        let prefix = config.prefix.split('/').filter(|s| !s.is_empty()).map(str::to_string).collect();
        let counts = Arc::new(Counts::default());
        let os: Arc<dyn ObjectStore> = Arc::new(counted::Counted::new(os, counts.clone()));
        ObjStore(Arc::new(Inner {
            os,
            counts,
            prefix,
            label: config.label,
            rt,
            partials: config.partials,
            grace: config.grace,
            version_packs: Mutex::new(HashMap::new()),
            refs: Mutex::new(lru::LruCache::new(NonZeroUsize::new(REF_CACHE).expect("nonzero"))),
            sketches: Default::default(),
            versions: Mutex::new(VersionCache {
                lru: lru::LruCache::new(NonZeroUsize::new(1024).expect("nonzero")),
                bytes: 0,
            }),
        }))
    }

    /// The store as `s3://bucket/prefix` (for logs).
    pub fn label(&self) -> &str {
        &self.0.label
    }

    /// Checks that the store answers (a listing of its top).
    pub async fn probe(&self) -> Result<(), object_store::Error> {
        self.0.os.list_with_delimiter(Some(&self.key("refs", []))).await.map(drop)
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        self.0.rt.block_on(f)
    }

    /// The key `area/…parts`.
    fn key<'a>(&'a self, area: &'a str, parts: impl IntoIterator<Item = &'a str>) -> Key {
        let prefix = self.0.prefix.iter().map(String::as_str);
        prefix.chain([area]).chain(parts).map(PathPart::from).collect()
    }

    /// The key of a client's name in `area` (`BadName` if too long for S3).
    fn name_key(&self, area: &str, name: &str) -> Result<Key, ErrorCode> {
        validate_name(name)?;
        let key = self.key(area, name.split('/'));
        if key.as_ref().len() > MAX_KEY { Err(ErrorCode::BadName) } else { Ok(key) }
    }

    /// The area's key prefix for directory `dir` (`""`: the top).
    fn dir_key(&self, area: &str, dir: &str) -> Result<Key, ErrorCode> {
        if dir.is_empty() { Ok(self.key(area, [])) } else { self.name_key(area, dir) }
    }

    fn version_key(&self, version: &str) -> Key {
        self.key("versions", [version])
    }

    /// The marker of a condemned object (`area` is `packs` or `versions`).
    fn condemned_key(&self, area: &str, name: &str) -> Key {
        self.key("gc", ["condemned", area, name])
    }

    fn pack_key(&self, id: &PackId) -> Key {
        self.key("packs", [hex(id).as_str()])
    }

    fn partial_key(&self, name: &str) -> Key {
        let h = Hash(Sha256::digest(name.as_bytes()).into());
        self.key("partials", [h.to_string().as_str()])
    }

    /// The name below `base` that `key` stands for.
    fn name_of(base: &Key, key: &Key) -> Option<String> {
        let parts: Vec<String> = key
            .prefix_match(base)?
            .map(|p| {
                percent_encoding::percent_decode_str(p.as_ref()).decode_utf8().ok().map(|s| s.into_owned())
            })
            .collect::<Option<_>>()?;
        let name = parts.join("/");
        validate_name(&name).is_ok().then_some(name)
    }

    async fn get(&self, key: &Key) -> Result<Option<(Bytes, Option<String>)>, ErrorCode> {
        match self.0.os.get(key).await {
            Ok(r) => {
                let etag = r.meta.e_tag.clone();
                let bytes = r.bytes().await.map_err(os_error)?;
                Ok(Some((bytes, etag)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(os_error(e)),
        }
    }

    /// The reference of `name` and its ETag, if it has one.
    async fn get_ref(&self, name: &str) -> Result<Option<(Ref, UpdateVersion)>, ErrorCode> {
        match self.get_ref_or_broken(name).await? {
            None => Ok(None),
            Some((Some(r), v)) => Ok(Some((r, v))),
            Some((None, _)) => Err(ErrorCode::Storage),
        }
    }

    /// Like `get_ref`, but a reference that cannot be decoded is `None`
    /// with its ETag (logged): an upload replaces it, `rm` removes it.
    async fn get_ref_or_broken(&self, name: &str) -> Result<Option<(Option<Ref>, UpdateVersion)>, ErrorCode> {
        let key = self.name_key("refs", name)?;
        let Some((bytes, etag)) = self.get(&key).await? else { return Ok(None) };
        let Some(r) = decode::<Ref>(KIND_REF, &bytes) else {
            tracing::warn!(%key, "an unreadable reference");
            return Ok(Some((None, UpdateVersion { e_tag: etag, version: None })));
        };
        self.0.sketches.set(name, &r.sketch);
        if let Some(tag) = &etag {
            self.0
                .refs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(name.to_string(), (tag.clone(), r.clone()));
        }
        Ok(Some((Some(r), UpdateVersion { e_tag: etag, version: None })))
    }

    /// Reads every reference's sketch (only those whose ETag changed), and
    /// forgets the names no longer stored.
    pub async fn refresh_sketches(&self) -> Result<(), ErrorCode> {
        let top = self.key("refs", []);
        let metas: Vec<_> = self.0.os.list(Some(&top)).try_collect().await.map_err(os_error)?;
        let files = self.describe_all(&top, metas).await?;
        let names: std::collections::HashSet<&str> = files.iter().map(|f| f.name.as_str()).collect();
        self.0.sketches.retain(|n| names.contains(n));
        Ok(())
    }

    /// The reference of `name` that a listing showed as `meta`: from memory
    /// if it was read with the same ETag, else read. One that cannot be
    /// decoded is left out (and logged), as if it were not there.
    async fn listed_ref(
        &self,
        name: &str,
        meta: &object_store::ObjectMeta,
    ) -> Result<Option<Ref>, ErrorCode> {
        if let Some(tag) = &meta.e_tag
            && let Some((t, r)) = self.0.refs.lock().unwrap_or_else(|p| p.into_inner()).get(name)
            && t == tag
        {
            self.0.sketches.set(name, &r.sketch);
            return Ok(Some(r.clone()));
        }
        let Some((bytes, etag)) = self.get(&meta.location).await? else { return Ok(None) };
        let Some(r) = decode::<Ref>(KIND_REF, &bytes) else {
            tracing::warn!(key = %meta.location, "an unreadable reference: left out of the listing");
            return Ok(None);
        };
        if let Some(tag) = etag {
            self.0.refs.lock().unwrap_or_else(|p| p.into_inner()).put(name.to_string(), (tag, r.clone()));
        }
        self.0.sketches.set(name, &r.sketch);
        Ok(Some(r))
    }

    async fn get_dir(&self, name: &str) -> Result<Option<DirMark>, ErrorCode> {
        let key = self.name_key("dirs", name)?;
        Ok(self.get(&key).await?.and_then(|(b, _)| decode::<DirMark>(KIND_DIR, &b)))
    }

    async fn get_partial(&self, name: &str) -> Result<Option<Partial>, ErrorCode> {
        let key = self.partial_key(name);
        Ok(self
            .get(&key)
            .await?
            .and_then(|(b, _)| decode::<Partial>(KIND_PARTIAL, &b))
            .filter(|p| p.name == name))
    }

    /// A version, from the cache if it was read there lately (a quarter of
    /// the grace period: collection may move its chunks to other packs,
    /// see `gc`), else from the store.
    async fn load(&self, version: &str) -> Result<Arc<Loaded>, ErrorCode> {
        {
            let mut cache = self.0.versions.lock().unwrap_or_else(|p| p.into_inner());
            match cache.lru.get(version) {
                Some(l) if l.read_at.elapsed() < self.0.grace / 4 => return Ok(l.clone()),
                Some(_) => cache.forget(version),
                None => {}
            }
        }
        let key = self.version_key(version);
        let (bytes, _) = self.get(&key).await?.ok_or_else(|| {
            tracing::warn!(%key, "a reference to a version that is not stored");
            ErrorCode::Storage
        })?;
        let stored = decode::<Version>(KIND_VERSION, &bytes).ok_or_else(|| {
            tracing::warn!(%key, bytes = bytes.len(), "an undecodable version");
            ErrorCode::Storage
        })?;
        let loaded = Loaded::new(Some(version.to_string()), stored).ok_or_else(|| {
            tracing::warn!(%key, "a version whose chunks do not add up");
            ErrorCode::Storage
        })?;
        let loaded = Arc::new(loaded);
        let mut cache = self.0.versions.lock().unwrap_or_else(|p| p.into_inner());
        cache.bytes += loaded.weight();
        if let Some((_, old)) = cache.lru.push(version.to_string(), loaded.clone()) {
            cache.bytes -= old.weight();
        }
        while cache.bytes > VERSION_CACHE_BYTES {
            let Some((_, old)) = cache.lru.pop_lru() else { break };
            cache.bytes -= old.weight();
        }
        Ok(loaded)
    }

    /// Where chunk `id` lies in a version read lately (the base of an
    /// upload, a similar file's): read since `since`, so that its packs
    /// stay (see `gc`) until an upload that began half the grace period
    /// after `since` publishes.
    fn recent_chunk(&self, id: &Hash, since: std::time::Instant) -> Option<(PackId, u32, u32)> {
        let cache = self.0.versions.lock().unwrap_or_else(|p| p.into_inner());
        cache.lru.iter().filter(|(_, l)| l.read_at >= since).find_map(|(_, l)| l.find(id))
    }

    /// Whether anything is stored under directory `name`, or it was made.
    async fn is_dir(&self, name: &str) -> Result<bool, ErrorCode> {
        let (below, mark) = futures::try_join!(self.has_below(name), self.get_dir(name))?;
        Ok(below || mark.is_some())
    }

    /// Whether a file or a directory marker is stored under `name/`.
    async fn has_below(&self, name: &str) -> Result<bool, ErrorCode> {
        let any_in = |area: &'static str| async move {
            let key = self.name_key(area, name)?;
            let mut below = self.0.os.list(Some(&key));
            Ok::<_, ErrorCode>(below.next().await.transpose().map_err(os_error)?.is_some())
        };
        let (files, dirs) = futures::try_join!(any_in("refs"), any_in("dirs"))?;
        Ok(files || dirs)
    }

    /// `BadName` if a parent of `name` is a file (a name is a file or a
    /// directory, never both).
    async fn parents_are_dirs(&self, name: &str) -> Result<(), ErrorCode> {
        let parents: Vec<&str> = name.match_indices('/').map(|(i, _)| &name[..i]).collect();
        let found = futures::future::try_join_all(parents.iter().map(|p| self.get_ref(p))).await?;
        if found.iter().any(Option::is_some) { Err(ErrorCode::BadName) } else { Ok(()) }
    }

    fn describe(name: String, r: &Ref) -> StoredFile {
        StoredFile {
            name,
            size: r.size,
            modified: r.modified,
            nanos: r.nanos,
            mode: r.mode,
            sha256: r.file_hash,
            chunking: r.chunking,
            kind: EntryKind::File,
        }
    }

    /// Reads the references `metas` lists, `LIST_CONCURRENCY` at a time.
    async fn describe_all(
        &self,
        base: &Key,
        metas: Vec<object_store::ObjectMeta>,
    ) -> Result<Vec<StoredFile>, ErrorCode> {
        let named: Vec<(String, object_store::ObjectMeta)> =
            metas.into_iter().filter_map(|m| Some((Self::name_of(base, &m.location)?, m))).collect();
        futures::stream::iter(named)
            .map(|(name, meta)| async move {
                let r = self.listed_ref(&name, &meta).await?;
                Ok::<_, ErrorCode>(r.map(|r| Self::describe(name, &r)))
            })
            .buffered(LIST_CONCURRENCY)
            .try_filter_map(|f| async move { Ok(f) })
            .try_collect()
            .await
    }

    /// Publishes `r` as `name`'s reference over the one found (`None`: none
    /// is there). Unless `conditional`, a reference published meanwhile by
    /// someone else is replaced (and `replaced` says so); with it, that is a
    /// `Conflict`.
    async fn publish_ref(
        &self,
        name: &str,
        r: &Ref,
        mut found: Option<UpdateVersion>,
        conditional: bool,
    ) -> Result<bool, ErrorCode> {
        let key = self.name_key("refs", name)?;
        let body = encode(KIND_REF, r);
        let mut replaced = false;
        for _ in 0..PUBLISH_TRIES {
            let mode = match &found {
                Some(v) => PutMode::Update(v.clone()),
                None => PutMode::Create,
            };
            let opts = PutOptions { mode, ..Default::default() };
            match self.0.os.put_opts(&key, PutPayload::from_bytes(body.clone()), opts).await {
                Ok(_) => return Ok(replaced),
                Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                    if conditional {
                        tracing::info!(
                            name,
                            "a conditional upload found another version stored: not published"
                        );
                        return Err(ErrorCode::Conflict);
                    }
                    // Another instance published (or deleted) the name
                    // since: this upload is the newer, it goes over it.
                    replaced = true;
                    found = self.get_ref(name).await?.map(|(_, v)| v);
                }
                // A store without ETags on this object: cannot be done safely.
                Err(e) => return Err(os_error(e)),
            }
        }
        tracing::warn!(name, "gave up publishing: the name kept changing");
        Err(ErrorCode::Conflict)
    }

    /// A stored version's tree chunked as `chunking` (`None`: as
    /// `keep_or_choose` picks), and a reader; `None` if that kind does not
    /// suit its size.
    fn version_as(
        &self,
        loaded: Arc<Loaded>,
        chunking: Option<ChunkerKind>,
    ) -> Result<Option<(Tree, ObjReader)>, ErrorCode> {
        let size = loaded.version.size;
        let stored = loaded.tree.summary().chunking;
        let want = chunking.unwrap_or_else(|| ChunkerKind::keep_or_choose(Some(stored), size));
        let tree = if want == stored {
            loaded.tree.clone()
        } else if !want.suits(size) {
            return Ok(None);
        } else {
            self.rebuild_tree(&loaded, want)?
        };
        Ok(Some((tree, ObjReader::new(self.clone(), loaded))))
    }

    /// An interrupted upload's record, made readable like a version.
    fn partial_loaded(p: Partial) -> Option<Arc<Loaded>> {
        let version = Version {
            size: p.size(),
            file_hash: Hash::UNKNOWN,
            chunking: p.chunking,
            packs: p.packs,
            chunks: p.chunks,
            tree: None,
            midstates: Vec::new(),
        };
        Loaded::new(None, version).map(Arc::new)
    }

    /// What an interrupted upload left, as a base chunked as `chunking`.
    fn partial_as(
        &self,
        loaded: Arc<Loaded>,
        chunking: ChunkerKind,
    ) -> Result<Option<(Tree, ObjReader)>, ErrorCode> {
        let size = loaded.version.size;
        if !chunking.suits(size) {
            return Ok(None);
        }
        let mut tree = if loaded.version.chunking == chunking {
            loaded.tree.clone()
        } else {
            self.rebuild_tree(&loaded, chunking)?
        };
        tree.set_file_hash(Hash::UNKNOWN);
        Ok(Some((tree, ObjReader::new(self.clone(), loaded))))
    }

    /// Builds the tree of a stored version chunked another way, reading it.
    fn rebuild_tree(&self, loaded: &Arc<Loaded>, kind: ChunkerKind) -> Result<Tree, ErrorCode> {
        let mut reader = ObjReader::new(self.clone(), loaded.clone());
        let mut ix = TreeIndexer::without_file_hash(kind);
        let mut buf = vec![0u8; 1 << 20];
        let size = loaded.version.size;
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(buf.len() as u64) as usize;
            reader.read_at(at, &mut buf[..n]).map_err(|_| ErrorCode::Storage)?;
            ix.feed(&buf[..n]);
            at += n as u64;
        }
        let mut tree = ix.finish();
        tree.set_file_hash(loaded.version.file_hash);
        Ok(tree)
    }

    /// Drops what interrupted uploads left that is older than allowed, then
    /// the oldest while they hold more bytes than allowed.
    pub fn sweep_partials(&self) {
        let limits = self.0.partials;
        let mut all = match self.clone().partials() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not list interrupted uploads");
                return;
            }
        };
        let now = unix_now().0;
        all.sort_by_key(|p| std::cmp::Reverse(p.modified));
        let mut kept = 0u64;
        for p in all {
            let old = now.saturating_sub(p.modified) > limits.max_age.as_secs();
            kept = kept.saturating_add(p.size);
            if old || kept > limits.max_bytes {
                tracing::info!(name = p.name, size = p.size, "dropping what an interrupted upload left");
                let key = self.partial_key(&p.name);
                let _ = self.block(self.0.os.delete(&key));
            }
        }
    }
}

impl crate::store::ServerStore for ObjStore {
    fn upkeep(&self) {
        self.sweep_partials();
        if let Err(e) = self.block(self.refresh_sketches()) {
            tracing::warn!(error = %e, "could not read the stored files' sketches");
        }
        match self.block(self.gc()) {
            Ok(r) if r.skipped => tracing::debug!("another instance is collecting garbage"),
            Ok(r) => tracing::info!(
                deleted_packs = r.deleted_packs,
                deleted_bytes = r.deleted_bytes,
                deleted_versions = r.deleted_versions,
                condemned = r.condemned,
                packs = r.packs,
                "collected garbage"
            ),
            Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
        }
    }

    fn settle(&self) {}

    fn warm(&self) {
        if let Err(e) = self.block(self.refresh_sketches()) {
            tracing::warn!(error = %e, "could not read the stored files' sketches");
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.0.counts.snapshot()
    }

    fn location(&self) -> String {
        self.0.label.clone()
    }
}

impl Store for ObjStore {
    type Reader = ObjReader;
    type Writer = ObjWriter;

    fn open(
        &mut self,
        name: &str,
        chunking: Option<ChunkerKind>,
    ) -> Result<Option<(Tree, ObjReader)>, ErrorCode> {
        let this = self.clone();
        let Some((r, _)) = self.block(this.get_ref(name))? else { return Ok(None) };
        let loaded = self.block(this.load(&r.version))?;
        self.version_as(loaded, chunking)
    }

    fn partial(&mut self, name: &str, chunking: ChunkerKind) -> Result<Option<(Tree, ObjReader)>, ErrorCode> {
        let this = self.clone();
        let Some(p) = self.block(this.get_partial(name))? else { return Ok(None) };
        let Some(loaded) = Self::partial_loaded(p) else { return Ok(None) };
        self.partial_as(loaded, chunking)
    }

    /// What the writer found when it was created: no second lookup.
    fn bases(
        &mut self,
        writer: &ObjWriter,
        _name: &str,
        chunking: ChunkerKind,
    ) -> Result<(Option<(Tree, ObjReader)>, Option<(Tree, ObjReader)>), ErrorCode> {
        let old = match &writer.base {
            Some(l) => self.version_as(l.clone(), Some(chunking))?,
            None => None,
        };
        let partial = match &writer.partial {
            Some(l) => self.partial_as(l.clone(), chunking)?,
            None => None,
        };
        Ok((old, partial))
    }

    fn holds(&mut self, name: &str) -> Result<bool, ErrorCode> {
        let this = self.clone();
        self.block(async move {
            let (r, p) = futures::try_join!(this.get_ref_or_broken(name), this.get_partial(name))?;
            Ok(r.is_some() || p.is_some())
        })
    }

    fn create(&mut self, name: &str, size: u64, expect: Option<Expect>) -> Result<ObjWriter, ErrorCode> {
        self.create_with(name, size, expect, None)
    }

    fn create_with(
        &mut self,
        name: &str,
        size: u64,
        expect: Option<Expect>,
        meta: Option<Meta>,
    ) -> Result<ObjWriter, ErrorCode> {
        let this = self.clone();
        let (found, base, partial) = self.block(async {
            // Every lookup at once: one round trip.
            let (dir, parents, found, partial) = futures::join!(
                this.is_dir(name),
                this.parents_are_dirs(name),
                this.get_ref_or_broken(name),
                this.get_partial(name),
            );
            if dir? {
                return Err(ErrorCode::BadName);
            }
            parents?;
            // A reference that cannot be read is replaced (unless the
            // upload is conditional: then what is stored is not known).
            let found = found?;
            let holds = match (expect, &found) {
                (None, _) => true,
                (Some(Expect::Absent), f) => f.is_none(),
                (Some(Expect::Match(h)), Some((Some(r), _))) => r.file_hash == h,
                (Some(Expect::Match(_)), _) => false,
            };
            if !holds {
                return Err(ErrorCode::Conflict);
            }
            // A version that cannot be read is no base (and is replaced).
            let base = match &found {
                Some((Some(r), _)) => this.load(&r.version).await.ok(),
                _ => None,
            };
            Ok((found, base, partial?))
        })?;
        let mut w = ObjWriter::new(self.clone(), name, ChunkerKind::for_size(size));
        w.found = found.map(|(_, v)| v);
        w.conditional = expect.is_some();
        w.meta = meta;
        if let Some(b) = base {
            w.know(&b.version.packs, &b.version.chunks);
            w.base = Some(b);
        }
        if let Some(p) = partial {
            w.had_partial = true;
            w.partial = Self::partial_loaded(p);
            if let Some(p) = w.partial.clone() {
                w.know(&p.version.packs, &p.version.chunks);
            }
        }
        Ok(w)
    }

    fn list_dir(&mut self, dir: &str) -> Result<Vec<StoredFile>, ErrorCode> {
        let this = self.clone();
        self.block(async move {
            let refs = this.dir_key("refs", dir)?;
            let dirs = this.dir_key("dirs", dir)?;
            let (files, marks) = futures::try_join!(
                async { this.0.os.list_with_delimiter(Some(&refs)).await.map_err(os_error) },
                async { this.0.os.list_with_delimiter(Some(&dirs)).await.map_err(os_error) },
            )?;
            let marked: Vec<String> = marks
                .objects
                .iter()
                .filter_map(|m| Self::name_of(&this.key("dirs", []), &m.location))
                .collect();
            let mut implied: Vec<String> = files
                .common_prefixes
                .iter()
                .filter_map(|k| Self::name_of(&this.key("refs", []), k))
                .chain(marks.common_prefixes.iter().filter_map(|k| Self::name_of(&this.key("dirs", []), k)))
                .filter(|d| !marked.contains(d))
                .collect();
            implied.sort();
            implied.dedup();
            // Some servers (SeaweedFS) keep listing a prefix whose last
            // object is gone: a directory without a marker is one only if
            // something is under it.
            let real = futures::future::try_join_all(implied.iter().map(|d| this.is_dir(d))).await?;
            let mut sub: Vec<String> = marked
                .into_iter()
                .chain(implied.into_iter().zip(real).filter(|(_, r)| *r).map(|(d, _)| d))
                .collect();
            sub.sort();
            sub.dedup();
            let top = this.key("refs", []);
            let mut out = this.describe_all(&top, files.objects).await?;
            if out.is_empty() && sub.is_empty() && !dir.is_empty() && this.get_dir(dir).await?.is_none() {
                return Err(ErrorCode::NotFound);
            }
            let marks = futures::future::try_join_all(sub.iter().map(|d| this.get_dir(d))).await?;
            for (d, mark) in sub.into_iter().zip(marks) {
                if out.iter().any(|f| f.name == d) {
                    continue;
                }
                let m = mark.unwrap_or(DirMark { modified: 0, nanos: 0, mode: 0o755 });
                out.push(StoredFile {
                    name: d,
                    modified: m.modified,
                    nanos: m.nanos,
                    mode: m.mode,
                    kind: EntryKind::Dir,
                    ..Default::default()
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }

    fn set_meta(&mut self, name: &str, meta: Meta) -> Result<(), ErrorCode> {
        let this = self.clone();
        self.block(async move {
            let mode = meta.mode & MODE_BITS;
            for _ in 0..PUBLISH_TRIES {
                let Some((mut r, v)) = this.get_ref(name).await? else {
                    if this.is_dir(name).await? {
                        let mark = DirMark { modified: meta.modified, nanos: meta.nanos, mode };
                        let key = this.name_key("dirs", name)?;
                        this.0.os.put(&key, encode(KIND_DIR, &mark).into()).await.map_err(os_error)?;
                        return Ok(());
                    }
                    return Err(ErrorCode::NotFound);
                };
                (r.modified, r.nanos, r.mode) = (meta.modified, meta.nanos, mode);
                match this.publish_ref(name, &r, Some(v), true).await {
                    Err(ErrorCode::Conflict) => continue,
                    other => return other.map(drop),
                }
            }
            Err(ErrorCode::Conflict)
        })
    }

    fn make_dir(&mut self, name: &str, meta: Meta) -> Result<bool, ErrorCode> {
        let this = self.clone();
        self.block(async move {
            if this.get_ref(name).await?.is_some() {
                return Err(ErrorCode::BadName);
            }
            this.parents_are_dirs(name).await?;
            let made = !this.is_dir(name).await?;
            let mark = DirMark { modified: meta.modified, nanos: meta.nanos, mode: meta.mode & MODE_BITS };
            let key = this.name_key("dirs", name)?;
            this.0.os.put(&key, encode(KIND_DIR, &mark).into()).await.map_err(os_error)?;
            Ok(made)
        })
    }

    fn copy(&mut self, from: &str, sha256: Hash, to: &str, meta: Meta) -> Result<Hash, ErrorCode> {
        let this = self.clone();
        self.block(async move {
            let (r, _) = this.get_ref(from).await?.ok_or(ErrorCode::Conflict)?;
            if r.file_hash != sha256 {
                return Err(ErrorCode::Conflict);
            }
            if this.is_dir(to).await? {
                return Err(ErrorCode::BadName);
            }
            this.parents_are_dirs(to).await?;
            let found = this.get_ref(to).await?.map(|(_, v)| v);
            // The same version under another name: no byte is copied.
            let copy = Ref { modified: meta.modified, nanos: meta.nanos, mode: meta.mode & MODE_BITS, ..r };
            this.publish_ref(to, &copy, found, false).await?;
            this.0.sketches.set(to, &copy.sketch);
            Ok(copy.file_hash)
        })
    }

    fn finish(&mut self, name: &str, mut w: ObjWriter, tree: Option<Tree>) -> Result<Published, ErrorCode> {
        let this = self.clone();
        let Some(tree) = tree else {
            let found = w.found.take();
            w.discard();
            let now = self.block(this.get_ref(name))?.map(|(_, v)| v);
            return Ok(Published {
                file_hash: None,
                replaced: now.map(|v| v.e_tag) != found.map(|v| v.e_tag),
            });
        };
        let sketch = deltasync_core::tree::sketch(&tree).to_vec();
        let (version, file_hash) = w.seal_version(tree)?;
        // See `gc`: what an upload reuses is safe from collection for half
        // the grace period from when it was found.
        if w.started.elapsed() > self.0.grace / 2 {
            tracing::warn!(
                name,
                "an upload took longer than half the collection grace period: not published"
            );
            return Err(ErrorCode::Storage);
        }
        let root = w.root;
        let meta = w.meta.unwrap_or_else(|| {
            let (modified, nanos) = unix_now();
            Meta { modified, nanos, mode: DEFAULT_MODE }
        });
        let mut r = Ref {
            version: root.to_string(),
            size: version.size,
            file_hash,
            chunking: version.chunking,
            modified: meta.modified,
            nanos: meta.nanos,
            mode: meta.mode & MODE_BITS,
            sketch,
        };
        let found = w.found.take();
        let conditional = w.conditional;
        let partial = w.wrote_partial || w.had_partial;
        w.done = true;
        let replaced = self.block(async move {
            let body = encode(KIND_VERSION, &version);
            let key = this.version_key(&r.version);
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            match this.0.os.put_opts(&key, body.clone().into(), opts).await {
                Ok(_) => {}
                // The same version is stored already (content-addressed):
                // shared, unless collection has condemned it (it may be
                // deleted at any time), then stored again under a key of
                // its own.
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                    let marker = this.condemned_key("versions", &r.version);
                    let condemned = match this.0.os.head(&marker).await {
                        Err(object_store::Error::NotFound { .. }) => false,
                        Ok(_) => true,
                        Err(e) => return Err(os_error(e)),
                    };
                    // Shared only if it reads as this very version.
                    let same = !condemned && this.load(&r.version).await.is_ok_and(|l| l.tree.root() == root);
                    if !same {
                        r.version = format!("{}-{}", r.version, hex(&rand::random::<[u8; 8]>()));
                        let key = this.version_key(&r.version);
                        this.0.os.put(&key, body.into()).await.map_err(os_error)?;
                    }
                }
                Err(e) => return Err(os_error(e)),
            }
            let replaced = this.publish_ref(name, &r, found, conditional).await?;
            this.0.sketches.set(name, &r.sketch);
            if partial {
                let _ = this.0.os.delete(&this.partial_key(name)).await;
            }
            Ok(replaced)
        })?;
        Ok(Published { file_hash: Some(file_hash), replaced })
    }

    fn list(&mut self) -> Result<Vec<StoredFile>, ErrorCode> {
        let this = self.clone();
        self.block(async move {
            let top = this.key("refs", []);
            let metas: Vec<_> = this.0.os.list(Some(&top)).try_collect().await.map_err(os_error)?;
            let mut out = this.describe_all(&top, metas).await?;
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }

    fn stat(&mut self, name: &str) -> Result<StoredFile, ErrorCode> {
        let this = self.clone();
        let (r, _) = self.block(this.get_ref(name))?.ok_or(ErrorCode::NotFound)?;
        Ok(Self::describe(name.to_string(), &r))
    }

    fn partials(&mut self) -> Result<Vec<PartialFile>, ErrorCode> {
        let this = self.clone();
        self.block(async move {
            let top = this.key("partials", []);
            let metas: Vec<_> = this.0.os.list(Some(&top)).try_collect().await.map_err(os_error)?;
            let mut out: Vec<PartialFile> = futures::stream::iter(metas)
                .map(|m| {
                    let this = this.clone();
                    async move {
                        let got = this.get(&m.location).await?;
                        // Only a record stored under its own name's key.
                        let p = got.and_then(|(b, _)| decode::<Partial>(KIND_PARTIAL, &b)).filter(|p| {
                            validate_name(&p.name).is_ok() && this.partial_key(&p.name) == m.location
                        });
                        Ok::<_, ErrorCode>(p.map(|p| PartialFile {
                            size: p.size(),
                            name: p.name,
                            modified: p.modified,
                        }))
                    }
                })
                .buffered(LIST_CONCURRENCY)
                .try_filter_map(|p| async move { Ok(p) })
                .try_collect()
                .await?;
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }

    fn partial_info(&mut self, name: &str) -> Result<Option<PartialFile>, ErrorCode> {
        validate_name(name)?;
        let this = self.clone();
        let p = self.block(this.get_partial(name))?;
        Ok(p.map(|p| PartialFile { size: p.size(), name: p.name, modified: p.modified }))
    }

    fn delete(&mut self, name: &str) -> Result<(), ErrorCode> {
        let this = self.clone();
        self.block(async move {
            let key = this.name_key("refs", name)?;
            // What an interrupted upload of the name left goes too.
            let partial = this.get_partial(name).await?.is_some();
            if partial {
                this.0.os.delete(&this.partial_key(name)).await.map_err(os_error)?;
            }
            if this.get_ref_or_broken(name).await?.is_none() {
                if partial {
                    return Ok(());
                }
                return Err(if this.is_dir(name).await? { ErrorCode::BadName } else { ErrorCode::NotFound });
            }
            this.0.os.delete(&key).await.map_err(os_error)?;
            this.0.sketches.remove(name);
            Ok(())
        })
    }

    fn resembling(&mut self, sketch: &[u64]) -> Result<Vec<(String, u32)>, ErrorCode> {
        Ok(self.0.sketches.find(sketch))
    }

    fn may_resemble(&mut self) -> bool {
        !self.0.sketches.is_empty()
    }

    fn remove_dir(&mut self, name: &str) -> Result<(), ErrorCode> {
        let this = self.clone();
        self.block(async move {
            if this.get_ref(name).await?.is_some() {
                return Err(ErrorCode::BadName);
            }
            if this.has_below(name).await? {
                return Err(ErrorCode::Conflict);
            }
            if this.get_dir(name).await?.is_none() {
                return Err(ErrorCode::NotFound);
            }
            this.0.os.delete(&this.name_key("dirs", name)?).await.map_err(os_error)
        })
    }
}

/// Reads a stored version with range requests, a window at a time.
pub struct ObjReader {
    store: ObjStore,
    loaded: Arc<Loaded>,
    /// The last range fetched: pack, its offset there, the bytes.
    window: Option<(u32, u64, Bytes)>,
    /// The chunk that follows the window: a fetch from there is sequential.
    after_window: usize,
    /// The range after the window, being read while the window is used.
    ahead: Option<Ahead>,
}

/// A range read ahead: its pack (index in the version's list), where it
/// starts and ends there, the chunk after it, and the request.
struct Ahead {
    pack: u32,
    at: u64,
    end: u64,
    after: usize,
    job: JoinHandle<Result<Bytes, object_store::Error>>,
}

impl Drop for ObjReader {
    fn drop(&mut self) {
        if let Some(a) = self.ahead.take() {
            a.job.abort();
        }
    }
}

impl ObjReader {
    fn new(store: ObjStore, loaded: Arc<Loaded>) -> ObjReader {
        ObjReader { store, loaded, window: None, after_window: 0, ahead: None }
    }

    /// Where a read of chunk `chunk` from `at` (in its pack) for `len`
    /// bytes ends in the pack: on while the version's next chunks follow in
    /// the same pack, up to `READ_AHEAD`; and the chunk after that.
    fn range_from(&self, chunk: usize, at: u64, len: u64) -> (u64, usize) {
        let chunks = &self.loaded.version.chunks;
        let c = chunks[chunk];
        let mut end = u64::from(c.at) + u64::from(c.len);
        let mut next = chunk + 1;
        while next < chunks.len()
            && chunks[next].pack == c.pack
            && u64::from(chunks[next].at) == end
            && end - at < READ_AHEAD
        {
            end += u64::from(chunks[next].len);
            next += 1;
        }
        (end.max(at + len), next)
    }

    /// Starts reading the range from chunk `chunk` on, in the background.
    fn read_ahead(&mut self, chunk: usize) {
        let Some(c) = self.loaded.version.chunks.get(chunk).copied() else { return };
        let at = u64::from(c.at);
        let (end, after) = self.range_from(chunk, at, u64::from(c.len));
        let key = self.store.pack_key(&self.loaded.version.packs[c.pack as usize]);
        let os = self.store.0.os.clone();
        let job = self.store.0.rt.spawn(async move { os.get_range(&key, at..end).await });
        self.ahead = Some(Ahead { pack: c.pack, at, end, after, job });
    }

    /// The bytes read ahead, if they hold `at..at + len` of pack `pack`
    /// (and arrived whole); they become the window.
    fn take_ahead(&mut self, pack: u32, at: u64, len: u64) -> Option<Bytes> {
        let a = self.ahead.take()?;
        if a.pack != pack || at < a.at || at + len > a.end {
            a.job.abort();
            return None;
        }
        let bytes = match self.store.block(a.job) {
            Ok(Ok(b)) if b.len() as u64 == a.end - a.at => b,
            // Read again, and any error told, by the caller.
            _ => return None,
        };
        let from = (at - a.at) as usize;
        let out = bytes.slice(from..from + len as usize);
        self.window = Some((a.pack, a.at, bytes));
        self.after_window = a.after;
        self.read_ahead(a.after);
        Some(out)
    }

    /// Bytes `at..at + len` of the pack where chunk `chunk` lies. If that
    /// pack is gone, collection has moved the version's chunks (see `gc`):
    /// the version is read again and the bytes from where they are now.
    fn fetch(&mut self, chunk: usize, at: u64, len: u64) -> Result<Bytes, IoFailed> {
        let c = self.loaded.version.chunks[chunk];
        if let Some((p, start, bytes)) = &self.window
            && *p == c.pack
            && at >= *start
            && at + len <= start + bytes.len() as u64
        {
            let from = (at - start) as usize;
            return Ok(bytes.slice(from..from + len as usize));
        }
        match self.fetch_from_pack(chunk, at, len) {
            Err(object_store::Error::NotFound { .. }) if self.moved() => {
                let c2 = self.loaded.version.chunks[chunk];
                let at = at - u64::from(c.at) + u64::from(c2.at);
                self.fetch_from_pack(chunk, at, len)
            }
            other => other,
        }
        .map_err(|e| {
            tracing::warn!(error = %e, "reading a pack failed");
            IoFailed
        })
    }

    /// Whether the version now stored under this one's key has the same
    /// chunks (moved to other packs); if so it is read from now on.
    fn moved(&mut self) -> bool {
        let Some(key) = self.loaded.key.clone() else { return false };
        self.store.0.versions.lock().unwrap_or_else(|p| p.into_inner()).forget(&key);
        let store = self.store.clone();
        let Ok(now) = self.store.block(async move { store.load(&key).await }) else { return false };
        let same = now.version.chunks.len() == self.loaded.version.chunks.len()
            && now
                .version
                .chunks
                .iter()
                .zip(&self.loaded.version.chunks)
                .all(|(a, b)| a.id == b.id && a.len == b.len);
        if same {
            self.loaded = now;
            self.window = None;
            if let Some(a) = self.ahead.take() {
                a.job.abort();
            }
        }
        same
    }

    fn fetch_from_pack(&mut self, chunk: usize, at: u64, len: u64) -> Result<Bytes, object_store::Error> {
        let c = self.loaded.version.chunks[chunk];
        if let Some(out) = self.take_ahead(c.pack, at, len) {
            return Ok(out);
        }
        // Reading on from the last window (not a first read: a delta
        // download may want nothing more): the next range is read while
        // this one is used (a download, a read back).
        let sequential = self.window.is_some() && chunk == self.after_window;
        let (end, next) = self.range_from(chunk, at, len);
        let key = self.store.pack_key(&self.loaded.version.packs[c.pack as usize]);
        let os = self.store.0.os.clone();
        let bytes = self.store.block(async move { os.get_range(&key, at..end).await })?;
        if bytes.len() as u64 != end - at {
            return Err(object_store::Error::Generic {
                store: "deltasync",
                source: "a range read returned another length".into(),
            });
        }
        let out = bytes.slice(0..len as usize);
        self.window = Some((c.pack, at, bytes));
        self.after_window = next;
        if sequential {
            self.read_ahead(next);
        }
        Ok(out)
    }
}

impl Source for ObjReader {
    /// The version itself: a writer of the same store takes whole chunks
    /// of it as references (`ObjWriter::copy_from`).
    fn locate(&self, offset: u64, _len: u64) -> Option<(&dyn std::any::Any, u64)> {
        Some((self, offset))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
        let mut filled = 0usize;
        while filled < buf.len() {
            let pos = offset + filled as u64;
            let ends = &self.loaded.ends;
            let i = ends.partition_point(|&e| e <= pos);
            if i >= ends.len() {
                return Err(IoFailed);
            }
            let c = self.loaded.version.chunks[i];
            let start = ends[i] - u64::from(c.len);
            let within = pos - start;
            let take = (u64::from(c.len) - within).min((buf.len() - filled) as u64);
            let bytes = self.fetch(i, u64::from(c.at) + within, take)?;
            buf[filled..filled + take as usize].copy_from_slice(&bytes);
            filled += take as usize;
        }
        Ok(())
    }
}

/// Writes a new version: cuts what it is given into chunks, keeps those the
/// store holds (the old version's, the interrupted upload's) as references
/// and packs the others.
pub struct ObjWriter {
    store: ObjStore,
    name: String,
    /// The reference found when the upload began (`None`: there was none).
    found: Option<UpdateVersion>,
    /// The version it named, and what an interrupted upload left, as found
    /// then (the upload's bases).
    base: Option<Arc<Loaded>>,
    partial: Option<Arc<Loaded>>,
    conditional: bool,
    meta: Option<Meta>,
    chunker: Chunker,
    /// The open chunk's hash.
    chunk: Sha256,
    file: FileHash,
    /// The stored version that every byte so far was copied from, at the
    /// same place (see `copy_from`), and whether that still holds.
    prefix_of: Option<Arc<Loaded>>,
    copied_only: bool,
    /// The reader of the last copy's bytes (see `copy_from`).
    hash_reader: Option<ObjReader>,
    written: u64,
    /// Where the open chunk starts in `pack`.
    chunk_start: usize,
    /// Chunks the store holds: which pack (index in `packs`), where.
    known: HashMap<Hash, (u32, u32, u32)>,
    pack_index: HashMap<PackId, u32>,
    packs: Vec<PackId>,
    chunks: Vec<Chunk>,
    /// The pack being filled, and its index in `packs`.
    pack: Vec<u8>,
    pack_no: Option<u32>,
    /// The pack being stored, and how many chunks are durable once it is.
    in_flight: Option<(JoinHandle<Result<(), ErrorCode>>, usize)>,
    /// Chunks whose bytes are durable.
    durable: usize,
    /// Bytes the last partial record covered.
    partial_bytes: u64,
    /// Chunks the last partial record covered, and when it was made.
    recorded: usize,
    last_record: std::time::Instant,
    /// Bytes the chunks so far cover.
    covered_bytes: u64,
    wrote_partial: bool,
    had_partial: bool,
    failed: bool,
    /// The root of the sealed version.
    root: Hash,
    /// When the upload began (what it reuses was found then).
    started: std::time::Instant,
    /// Published or discarded: nothing to keep on drop.
    done: bool,
}

impl ObjWriter {
    fn new(store: ObjStore, name: &str, kind: ChunkerKind) -> ObjWriter {
        ObjWriter {
            store,
            name: name.to_string(),
            found: None,
            base: None,
            partial: None,
            conditional: false,
            meta: None,
            chunker: Chunker::new(kind),
            chunk: Sha256::new(),
            file: FileHash::new(),
            prefix_of: None,
            copied_only: true,
            hash_reader: None,
            written: 0,
            chunk_start: 0,
            known: HashMap::new(),
            pack_index: HashMap::new(),
            packs: Vec::new(),
            chunks: Vec::new(),
            pack: Vec::new(),
            pack_no: None,
            in_flight: None,
            durable: 0,
            partial_bytes: 0,
            recorded: 0,
            last_record: std::time::Instant::now(),
            covered_bytes: 0,
            wrote_partial: false,
            had_partial: false,
            failed: false,
            root: Hash::UNKNOWN,
            started: std::time::Instant::now(),
            done: false,
        }
    }

    /// Makes the chunks of a stored version (or partial) reusable.
    fn know(&mut self, packs: &[PackId], chunks: &[Chunk]) {
        for c in chunks {
            let Some(id) = packs.get(c.pack as usize) else { continue };
            let p = self.pack_no_of(*id);
            self.known.entry(c.id).or_insert((p, c.at, c.len));
        }
    }

    fn pack_no_of(&mut self, id: PackId) -> u32 {
        *self.pack_index.entry(id).or_insert_with(|| {
            self.packs.push(id);
            (self.packs.len() - 1) as u32
        })
    }

    fn end_chunk(&mut self) -> Result<(), IoFailed> {
        let len = self.pack.len() - self.chunk_start;
        if len == 0 {
            return Ok(());
        }
        self.chunker.reset();
        let id = Hash(std::mem::replace(&mut self.chunk, Sha256::new()).finalize().into());
        let found = self.known.get(&id).copied().or_else(|| {
            // A chunk of a version read for this upload (a similar file's).
            let since = self.started.checked_sub(self.store.0.grace / 2)?;
            let (pack_id, at, len) = self.store.recent_chunk(&id, since)?;
            Some((self.pack_no_of(pack_id), at, len))
        });
        if let Some((pack, at, known_len)) = found
            && known_len as usize == len
        {
            self.pack.truncate(self.chunk_start);
            self.chunks.push(Chunk { id, pack, at, len: len as u32 });
            self.covered_bytes += len as u64;
        } else {
            let pack = match self.pack_no {
                Some(p) => p,
                None => {
                    let p = self.pack_no_of(rand::random());
                    self.pack_no = Some(p);
                    p
                }
            };
            let at = self.chunk_start as u32;
            self.known.insert(id, (pack, at, len as u32));
            self.chunks.push(Chunk { id, pack, at, len: len as u32 });
            self.covered_bytes += len as u64;
            self.chunk_start = self.pack.len();
            if self.pack.len() >= PACK_TARGET {
                self.seal_pack(false)?;
            }
        }
        Ok(())
    }

    /// Stores the pack being filled, in the background (the previous one is
    /// waited for first, so at most one is in flight), and then records
    /// what is stored as the name's partial, each time a quarter more of
    /// the upload is, or when `record` asks (an upload cut off here, even
    /// with its server killed, resumes from there through any instance).
    fn seal_pack(&mut self, record: bool) -> Result<(), IoFailed> {
        self.wait_in_flight()?;
        let covered = self.chunks.len();
        let stored = self.covered_bytes;
        let due = stored >= self.partial_bytes + (self.partial_bytes / 4).max(PACK_TARGET as u64);
        let record = ((record || due) && covered > self.recorded).then(|| {
            self.partial_bytes = stored;
            self.recorded = covered;
            self.last_record = std::time::Instant::now();
            self.wrote_partial = true;
            let p = Partial {
                name: self.name.clone(),
                chunking: self.chunker.kind(),
                modified: unix_now().0,
                packs: self.packs.clone(),
                chunks: self.chunks.clone(),
            };
            (self.store.partial_key(&self.name), encode(KIND_PARTIAL, &p))
        });
        // The open chunk's bytes stay: they start the next pack.
        let open = self.pack.split_off(self.chunk_start);
        self.chunk_start = 0;
        let sealed = std::mem::replace(&mut self.pack, open);
        let pack = match self.pack_no.take() {
            Some(no) if !sealed.is_empty() => {
                Some((self.store.pack_key(&self.packs[no as usize]), Bytes::from(sealed)))
            }
            // Nothing of the pack was kept (every chunk so far was known).
            Some(no) => {
                self.pack_no = Some(no);
                None
            }
            None => None,
        };
        if pack.is_none() && record.is_none() {
            self.durable = covered;
            return Ok(());
        }
        let os = self.store.0.os.clone();
        let job = self.store.0.rt.spawn(async move {
            if let Some((key, bytes)) = pack {
                os.put(&key, bytes.into()).await.map_err(os_error)?;
            }
            if let Some((key, p)) = record
                && let Err(e) = os.put(&key, p.into()).await
            {
                tracing::warn!(error = %e, "could not record an upload's progress");
            }
            Ok(())
        });
        self.in_flight = Some((job, covered));
        Ok(())
    }

    /// Whether the pack in flight (if any) is stored.
    fn in_flight_done(&self) -> bool {
        self.in_flight.as_ref().is_none_or(|(job, _)| job.is_finished())
    }

    /// Waits for the pack in flight.
    fn wait_in_flight(&mut self) -> Result<(), IoFailed> {
        let Some((job, covered)) = self.in_flight.take() else { return Ok(()) };
        match self.store.block(job) {
            Ok(Ok(())) => {
                self.durable = covered;
                Ok(())
            }
            _ => {
                self.failed = true;
                Err(IoFailed)
            }
        }
    }

    /// Ends the last chunk, stores the last pack, checks the bytes against
    /// `tree`: the version to publish and its whole-file hash.
    fn seal_version(&mut self, tree: Tree) -> Result<(Version, Hash), ErrorCode> {
        if self.failed {
            return Err(ErrorCode::Storage);
        }
        self.end_chunk().map_err(|_| ErrorCode::Storage)?;
        self.recorded = usize::MAX;
        self.seal_pack(false).map_err(|_| ErrorCode::Storage)?;
        self.wait_in_flight().map_err(|_| ErrorCode::Storage)?;
        let summary = tree.summary();
        let (file_hash, midstates) = std::mem::replace(&mut self.file, FileHash::new()).done();
        if self.written != summary.size {
            return Err(ErrorCode::Integrity);
        }
        if self.covered_bytes != self.written || self.pack_no.is_some() {
            tracing::error!(
                name = self.name,
                "the chunks stored do not cover the bytes written: not published"
            );
            return Err(ErrorCode::Storage);
        }
        if summary.file_hash.is_known() && summary.file_hash != file_hash {
            tracing::warn!(name = self.name, "the written bytes do not match the offered SHA-256");
            return Err(ErrorCode::Integrity);
        }
        let mut tree = tree;
        tree.set_file_hash(file_hash);
        // Only the packs the version uses.
        let mut used: Vec<Option<u32>> = vec![None; self.packs.len()];
        let mut packs = Vec::new();
        let mut chunks = std::mem::take(&mut self.chunks);
        for c in &mut chunks {
            let slot = &mut used[c.pack as usize];
            let no = *slot.get_or_insert_with(|| {
                packs.push(self.packs[c.pack as usize]);
                (packs.len() - 1) as u32
            });
            c.pack = no;
        }
        let mut version = Version {
            size: summary.size,
            file_hash,
            chunking: summary.chunking,
            packs,
            chunks,
            tree: None,
            midstates,
        };
        // The tree is kept apart only if its leaves are not these chunks.
        let ends: Vec<(Hash, u64)> = version
            .chunks
            .iter()
            .scan(0u64, |end, c| {
                *end += u64::from(c.len);
                Some((c.id, *end))
            })
            .collect();
        let own = Tree::from_chunks(summary.size, summary.chunking, &ends, file_hash);
        if own.root() != tree.root() {
            version.tree = Some(tree.to_bytes());
        }
        self.root = tree.root();
        Ok((version, file_hash))
    }

    /// Forgets the upload; its packs are garbage.
    fn discard(mut self) {
        self.done = true;
    }
}

impl Output for ObjWriter {
    fn write(&mut self, mut data: &[u8]) -> Result<(), IoFailed> {
        if self.failed {
            return Err(IoFailed);
        }
        self.copied_only = false;
        self.file.feed(data);
        self.written += data.len() as u64;
        while let Some(n) = self.chunker.next_boundary(data) {
            self.chunk.update(&data[..n]);
            self.pack.extend_from_slice(&data[..n]);
            self.end_chunk()?;
            data = &data[n..];
        }
        self.chunk.update(data);
        self.pack.extend_from_slice(data);
        // A slow upload records its progress every half second or so, even
        // in small packs: cut off, it resumes from about there. (Each
        // record lists every chunk so far: a large upload records less
        // often, so that records stay a small part of what it writes.)
        let every = RECORD_EVERY * (1 + (self.chunks.len() / 32_768) as u32);
        if self.last_record.elapsed() >= every && self.chunks.len() > self.recorded && self.in_flight_done() {
            self.seal_pack(true)?;
        }
        Ok(())
    }

    /// Bytes of a stored version that begin and end on its chunks'
    /// boundaries, where this writer is between chunks: its chunks are
    /// taken as they are stored (no byte is stored again, nor chunked);
    /// the bytes are read only for the whole-file hash.
    fn copy_from(&mut self, src: &dyn std::any::Any, offset: u64, len: u64) -> Result<bool, IoFailed> {
        let Some(src) = src.downcast_ref::<ObjReader>() else { return Ok(false) };
        if self.failed
            || len == 0
            || self.pack.len() != self.chunk_start
            || !Arc::ptr_eq(&src.store.0, &self.store.0)
        {
            return Ok(false);
        }
        let loaded = &src.loaded;
        let ends = &loaded.ends;
        let first = ends.partition_point(|&e| e <= offset);
        let starts_at = |i: usize| if i == 0 { 0 } else { ends[i - 1] };
        let Some(end) = offset.checked_add(len) else { return Ok(false) };
        let last = ends.partition_point(|&e| e < end);
        if first >= ends.len() || last >= ends.len() || starts_at(first) != offset || ends[last] != end {
            return Ok(false);
        }
        // The whole-file hash, from the stored bytes; if every byte so far
        // is this version's at the same place, from its last midstate in
        // the range (an append, a copy, reads only what follows it).
        let continues = self.copied_only
            && offset == self.written
            && self.prefix_of.as_ref().map_or(self.written == 0, |p| Arc::ptr_eq(p, loaded));
        let mut at = offset;
        if continues {
            self.prefix_of = Some(loaded.clone());
            let count = ((end / MIDSTATE_STEP) as usize).min(loaded.version.midstates.len());
            if count as u64 * MIDSTATE_STEP > self.file.pos()
                && let Some(resumed) = FileHash::resume(&loaded.version.midstates, count)
            {
                at = resumed.pos();
                self.file = resumed;
            }
        } else {
            self.copied_only = false;
        }
        // One reader for consecutive copies: its window and what it reads
        // ahead serve the next range.
        let mut reader = match self.hash_reader.take() {
            Some(r) if Arc::ptr_eq(&r.loaded, loaded) => r,
            _ => ObjReader::new(self.store.clone(), loaded.clone()),
        };
        let mut buf = vec![0u8; ((end - at) as usize).min(1 << 20)];
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            if let Err(e) = reader.read_at(at, &mut buf[..n]) {
                self.failed = true;
                return Err(e);
            }
            self.file.feed(&buf[..n]);
            at += n as u64;
        }
        self.hash_reader = Some(reader);
        for c in &loaded.version.chunks[first..=last] {
            let pack = self.pack_no_of(loaded.version.packs[c.pack as usize]);
            self.chunks.push(Chunk { pack, ..*c });
        }
        self.written += len;
        self.covered_bytes += len;
        Ok(true)
    }

    /// The store hashes every byte written (or copied) and refuses to
    /// publish a version whose hash is not the offer's.
    fn hashes_file(&self) -> bool {
        true
    }

    fn index_in_background(&mut self, kind: ChunkerKind) -> bool {
        // Chunked as the transfer is, this writer's chunks are the tree's
        // leaves; it builds the tree as it goes.
        if self.written == 0 {
            self.chunker = Chunker::new(kind);
            true
        } else {
            false
        }
    }

    fn finish_tree(&mut self) -> Result<Tree, IoFailed> {
        self.end_chunk()?;
        let mut end = 0u64;
        let leaves: Vec<(Hash, u64)> = self
            .chunks
            .iter()
            .map(|c| {
                end += u64::from(c.len);
                (c.id, end)
            })
            .collect();
        Ok(Tree::from_chunks(self.written, self.chunker.kind(), &leaves, Hash::UNKNOWN))
    }
}

impl Drop for ObjWriter {
    /// An upload dropped unfinished is interrupted: what it stored is
    /// recorded (in the background) for the next upload of the name.
    fn drop(&mut self) {
        if self.done || self.failed || self.written == 0 {
            return;
        }
        // Only whole chunks are kept.
        self.pack.truncate(self.chunk_start);
        let in_flight = self.in_flight.take();
        let last = self.pack_no.take().map(|no| (self.packs[no as usize], std::mem::take(&mut self.pack)));
        let store = self.store.clone();
        let name = self.name.clone();
        let chunking = self.chunker.kind();
        let packs = self.packs.clone();
        let chunks = std::mem::take(&mut self.chunks);
        let mut durable = self.durable;
        let covered_in_flight = in_flight.as_ref().map(|(_, n)| *n);
        let job = async move {
            if let Some((job, _)) = in_flight {
                if !matches!(job.await, Ok(Ok(()))) {
                    return;
                }
                durable = covered_in_flight.unwrap_or(durable);
            }
            if let Some((id, bytes)) = last
                && !bytes.is_empty()
            {
                if store.0.os.put(&store.pack_key(&id), bytes.into()).await.is_err() {
                    return;
                }
                durable = chunks.len();
            }
            if durable == 0 {
                return;
            }
            let p = Partial {
                name: name.clone(),
                chunking,
                modified: unix_now().0,
                packs,
                chunks: chunks[..durable].to_vec(),
            };
            if let Err(e) = store.0.os.put(&store.partial_key(&name), encode(KIND_PARTIAL, &p).into()).await {
                tracing::warn!(error = %e, name, "could not keep an interrupted upload");
            }
        };
        drop(self.store.0.rt.spawn(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn store(rt: &tokio::runtime::Runtime) -> ObjStore {
        store_with_grace(rt, std::time::Duration::from_secs(3600))
    }

    fn config() -> ObjConfig {
        ObjConfig {
            prefix: "t".into(),
            label: "memory".into(),
            partials: PartialLimits::default(),
            grace: std::time::Duration::from_secs(3600),
        }
    }

    fn store_with_grace(rt: &tokio::runtime::Runtime, grace: std::time::Duration) -> ObjStore {
        ObjStore::new(Arc::new(InMemory::new()), ObjConfig { grace, ..config() }, rt.handle().clone())
    }

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn put(
        s: &mut ObjStore,
        name: &str,
        bytes: &[u8],
        expect: Option<Expect>,
    ) -> Result<Published, ErrorCode> {
        let mut w = s.create(name, bytes.len() as u64, expect)?;
        for piece in bytes.chunks(10_000) {
            w.write(piece).unwrap();
        }
        let tree = Tree::build(bytes, ChunkerKind::for_size(bytes.len() as u64));
        s.finish(name, w, Some(tree))
    }

    fn read(s: &mut ObjStore, name: &str) -> Vec<u8> {
        let (tree, mut r) = s.open(name, None).unwrap().unwrap();
        let mut out = vec![0u8; tree.summary().size as usize];
        r.read_at(0, &mut out).unwrap();
        out
    }

    #[test]
    fn a_version_reads_back_and_a_second_one_stores_only_new_chunks() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut s = store(&rt);
        let a = data(3 << 20, 7);
        let p = put(&mut s, "d/a", &a, None).unwrap();
        assert_eq!(p.file_hash, Some(Hash(Sha256::digest(&a).into())));
        assert_eq!(read(&mut s, "d/a"), a);
        let mut b = a.clone();
        b[1 << 20] ^= 1;
        put(&mut s, "d/a", &b, None).unwrap();
        assert_eq!(read(&mut s, "d/a"), b);
        let packs: Vec<_> =
            rt.block_on(s.0.os.list(Some(&s.key("packs", []))).try_collect::<Vec<_>>()).unwrap();
        assert_eq!(packs.len(), 2);
        let second = packs.iter().map(|m| m.size).min().unwrap();
        assert!(second < 64 << 10, "the second version stored {second} bytes of packs");
        let listed = s.list_dir("d").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "d/a");
        assert_eq!(s.list_dir("").unwrap()[0].kind, EntryKind::Dir);
    }

    #[test]
    fn a_conditional_upload_publishes_only_over_what_it_expects() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut s = store(&rt);
        put(&mut s, "n", b"one", Some(Expect::Absent)).unwrap();
        assert_eq!(put(&mut s, "n", b"two", Some(Expect::Absent)), Err(ErrorCode::Conflict));
        let one = Hash(Sha256::digest(b"one").into());
        let w1 = s.create("n", 3, Some(Expect::Match(one))).unwrap();
        let w2 = s.create("n", 3, Some(Expect::Match(one))).unwrap();
        let finish = |s: &mut ObjStore, mut w: ObjWriter, b: &[u8]| {
            w.write(b).unwrap();
            s.finish("n", w, Some(Tree::build(b, ChunkerKind::Cdc)))
        };
        finish(&mut s, w1, b"three").unwrap();
        assert_eq!(finish(&mut s, w2, b"four"), Err(ErrorCode::Conflict));
        assert_eq!(read(&mut s, "n"), b"three");
    }

    #[test]
    fn a_wrong_hash_publishes_nothing() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut s = store(&rt);
        let mut w = s.create("n", 3, None).unwrap();
        w.write(b"abc").unwrap();
        let mut tree = Tree::build(b"abd", ChunkerKind::Cdc);
        tree.set_file_hash(Hash([1; 32]));
        assert_eq!(s.finish("n", w, Some(tree)), Err(ErrorCode::Integrity));
        assert_eq!(s.stat("n"), Err(ErrorCode::NotFound));
    }

    #[test]
    fn an_interrupted_upload_is_kept_for_the_next() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut s = store(&rt);
        let a = data(PACK_TARGET + (2 << 20), 3);
        let mut w = s.create("big", a.len() as u64, None).unwrap();
        w.write(&a[..PACK_TARGET + (1 << 20)]).unwrap();
        drop(w);
        // The record is written in the background.
        let mut kept = None;
        for _ in 0..100 {
            kept = s.partial_info("big").unwrap();
            if kept.as_ref().is_some_and(|p| p.size > PACK_TARGET as u64) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let kept = kept.expect("a partial");
        assert!(kept.size > PACK_TARGET as u64 && kept.size <= (PACK_TARGET + (1 << 20)) as u64);
        let (tree, mut r) = s.partial("big", ChunkerKind::for_size(a.len() as u64)).unwrap().unwrap();
        let mut back = vec![0u8; tree.summary().size as usize];
        r.read_at(0, &mut back).unwrap();
        assert_eq!(back, a[..back.len()]);
        assert!(s.holds("big").unwrap());
        put(&mut s, "big", &a, None).unwrap();
        assert_eq!(s.partial_info("big").unwrap(), None);
        assert_eq!(read(&mut s, "big"), a);
    }

    #[test]
    fn directories_copies_and_deletes() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut s = store(&rt);
        let meta = Meta { modified: 1_700_000_000, nanos: 5, mode: 0o750 };
        assert!(s.make_dir("x/y", meta).unwrap());
        assert!(!s.make_dir("x/y", meta).unwrap());
        let top = s.list_dir("").unwrap();
        assert_eq!(
            top.iter().map(|f| (f.name.as_str(), f.kind)).collect::<Vec<_>>(),
            [("x", EntryKind::Dir)]
        );
        let y = &s.list_dir("x").unwrap()[0];
        assert_eq!((y.name.as_str(), y.mode, y.nanos), ("x/y", 0o750, 5));
        put(&mut s, "x/y/f", b"hello", None).unwrap();
        assert_eq!(put(&mut s, "x/y", b"no", None), Err(ErrorCode::BadName));
        assert_eq!(put(&mut s, "x/y/f/g", b"no", None), Err(ErrorCode::BadName));
        let h = Hash(Sha256::digest(b"hello").into());
        assert_eq!(s.copy("x/y/f", Hash([2; 32]), "c", meta), Err(ErrorCode::Conflict));
        assert_eq!(s.copy("x/y/f", h, "c", meta).unwrap(), h);
        assert_eq!(read(&mut s, "c"), b"hello");
        assert_eq!(s.stat("c").unwrap().mode, 0o750);
        assert_eq!(s.remove_dir("x/y"), Err(ErrorCode::Conflict));
        assert_eq!(s.delete("x/y"), Err(ErrorCode::BadName));
        s.delete("x/y/f").unwrap();
        assert_eq!(s.delete("x/y/f"), Err(ErrorCode::NotFound));
        s.remove_dir("x/y").unwrap();
        assert_eq!(s.list_dir("x/y"), Err(ErrorCode::NotFound));
        assert_eq!(s.list().unwrap().iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn a_condemned_version_is_never_shared_by_a_new_upload() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let grace = std::time::Duration::from_millis(1000);
        let mut s = store_with_grace(&rt, grace);
        let a = data(200_000, 9);
        put(&mut s, "first", &a, None).unwrap();
        s.delete("first").unwrap();
        std::thread::sleep(grace + std::time::Duration::from_millis(200));
        let r = rt.block_on(s.gc()).unwrap();
        assert_eq!((r.condemned, r.garbage_versions), (1, 1), "{r:?}");
        // The same bytes again: their version is stored, but condemned.
        put(&mut s, "second", &a, None).unwrap();
        std::thread::sleep(grace + std::time::Duration::from_millis(200));
        let r = rt.block_on(s.gc()).unwrap();
        assert_eq!(r.deleted_versions, 1, "{r:?}");
        s.0.versions.lock().unwrap().lru.clear();
        assert_eq!(read(&mut s, "second"), a);
    }

    #[test]
    fn an_upload_slower_than_half_the_grace_period_is_not_published() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let grace = std::time::Duration::from_millis(400);
        let mut s = store_with_grace(&rt, grace);
        let mut w = s.create("slow", 3, None).unwrap();
        w.write(b"abc").unwrap();
        std::thread::sleep(grace / 2 + std::time::Duration::from_millis(50));
        assert_eq!(s.finish("slow", w, Some(Tree::build(b"abc", ChunkerKind::Cdc))), Err(ErrorCode::Storage));
        assert_eq!(s.stat("slow"), Err(ErrorCode::NotFound));
    }

    #[test]
    fn a_slow_upload_records_its_progress_and_stores_every_byte() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut s = store(&rt);
        let a = data(700_001, 5);
        let mut w = s.create("slow", a.len() as u64, None).unwrap();
        // Pieces that end inside chunks, slower than the records come.
        for piece in a.chunks(233_333) {
            w.write(piece).unwrap();
            std::thread::sleep(RECORD_EVERY + std::time::Duration::from_millis(100));
        }
        let kept = s.partial_info("slow").unwrap().expect("progress recorded").size;
        assert!(kept > 400_000, "{kept}");
        let tree = Tree::build(&a, ChunkerKind::for_size(a.len() as u64));
        s.finish("slow", w, Some(tree)).unwrap();
        s.0.versions.lock().unwrap().lru.clear();
        assert_eq!(read(&mut s, "slow"), a);
    }

    /// Waits out `grace`, then collects.
    fn gc_after(rt: &tokio::runtime::Runtime, s: &ObjStore, grace: std::time::Duration) -> gc::GcReport {
        std::thread::sleep(grace + std::time::Duration::from_millis(150));
        let r = rt.block_on(s.gc()).unwrap();
        assert!(!r.skipped);
        r
    }

    fn pack_sizes(rt: &tokio::runtime::Runtime, s: &ObjStore) -> Vec<u64> {
        let packs: Vec<_> =
            rt.block_on(s.0.os.list(Some(&s.key("packs", []))).try_collect::<Vec<_>>()).unwrap();
        let mut sizes: Vec<u64> = packs.iter().map(|m| m.size).collect();
        sizes.sort_unstable();
        sizes
    }

    #[test]
    fn small_packs_are_compacted_and_a_reader_of_the_old_ones_follows() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let grace = std::time::Duration::from_millis(1000);
        let mut s = store_with_grace(&rt, grace);
        let files: Vec<(String, Vec<u8>)> =
            (0..3).map(|i| (format!("f{i}"), data(300_000 + i * 1000, 20 + i as u64))).collect();
        for (name, bytes) in &files {
            put(&mut s, name, bytes, None).unwrap();
        }
        assert_eq!(pack_sizes(&rt, &s).len(), 3);
        // A download that began before the compaction.
        let (_, mut early) = s.open("f0", None).unwrap().unwrap();
        let r = gc_after(&rt, &s, grace);
        assert_eq!((r.rewritten_packs, r.new_packs, r.rewritten_versions), (3, 1, 3), "{r:?}");
        assert_eq!(r.rewritten_bytes, files.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
        // Another instance reads the new layout.
        let mut other = ObjStore::new(s.0.os.clone(), ObjConfig { grace, ..config() }, rt.handle().clone());
        for (name, bytes) in &files {
            assert_eq!(&read(&mut other, name), bytes);
        }
        let r = gc_after(&rt, &s, grace);
        assert_eq!((r.condemned, r.rewritten_packs), (3, 0), "{r:?}");
        let r = gc_after(&rt, &s, grace);
        assert_eq!((r.deleted_packs, r.packs, r.garbage_packs), (3, 1, 0), "{r:?}");
        assert_eq!(pack_sizes(&rt, &s).len(), 1);
        // The early reader's packs are gone: it finds the version moved.
        let mut back = vec![0u8; files[0].1.len()];
        early.read_at(0, &mut back).unwrap();
        assert_eq!(back, files[0].1);
        for (name, bytes) in &files {
            assert_eq!(&read(&mut s, name), bytes);
        }
    }

    #[test]
    fn a_pack_mostly_dead_is_rewritten_with_only_its_live_chunks() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let grace = std::time::Duration::from_millis(1000);
        let mut s = store_with_grace(&rt, grace);
        let one = data(6 << 20, 31);
        put(&mut s, "big", &one, None).unwrap();
        // A second version keeps the first megabyte, the rest is new.
        let mut two = one[..1 << 20].to_vec();
        two.extend(data(5 << 20, 32));
        put(&mut s, "big", &two, None).unwrap();
        let before = pack_sizes(&rt, &s);
        assert_eq!(before.len(), 2, "{before:?}");
        // The first version is garbage; the live one uses a sixth of the
        // first pack: its chunks there move to a new pack.
        let r = gc_after(&rt, &s, grace);
        assert_eq!(
            (r.condemned, r.rewritten_packs, r.new_packs, r.rewritten_versions),
            (1, 1, 1, 1),
            "{r:?}"
        );
        assert!(r.rewritten_bytes < (3 << 19), "{r:?}");
        assert_eq!(read(&mut s, "big"), two);
        // The old version goes, then the old pack it alone named.
        let r = gc_after(&rt, &s, grace);
        assert_eq!((r.deleted_versions, r.rewritten_packs), (1, 0), "{r:?}");
        let r = gc_after(&rt, &s, grace);
        assert_eq!((r.condemned, r.deleted_packs), (1, 0), "{r:?}");
        let r = gc_after(&rt, &s, grace);
        assert_eq!(r.deleted_packs, 1, "{r:?}");
        let after = pack_sizes(&rt, &s);
        assert_eq!(after.len(), 2);
        assert!(after.iter().sum::<u64>() < (13 << 19), "{before:?} -> {after:?}");
        s.0.versions.lock().unwrap().lru.clear();
        assert_eq!(read(&mut s, "big"), two);
    }

    #[test]
    fn whole_chunks_of_a_stored_version_are_taken_as_references() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut s = store(&rt);
        let one = data(3 << 20, 41);
        put(&mut s, "f", &one, None).unwrap();
        let (tree, reader) = s.open("f", None).unwrap().unwrap();
        // The first chunks of the old version, then new bytes.
        let cut = reader.loaded.ends[reader.loaded.ends.len() / 2];
        let mut two = one[..cut as usize].to_vec();
        two.extend(data(100_000, 42));
        let mut w = s.create("f", two.len() as u64, None).unwrap();
        let (src, at) = reader.locate(1, 10).unwrap();
        assert!(!w.copy_from(src, at, 10).unwrap(), "not on a chunk boundary");
        let (src, at) = reader.locate(0, cut).unwrap();
        assert!(w.copy_from(src, at, cut).unwrap());
        w.write(&two[cut as usize..]).unwrap();
        let mut new_tree = Tree::build(&two, tree.summary().chunking);
        new_tree.set_file_hash(Hash::UNKNOWN);
        let p = s.finish("f", w, Some(new_tree)).unwrap();
        assert_eq!(p.file_hash, Some(Hash(Sha256::digest(&two).into())));
        s.0.versions.lock().unwrap().lru.clear();
        assert_eq!(read(&mut s, "f"), two);
        // Only the new bytes (and the chunk they end) were stored.
        let sizes = pack_sizes(&rt, &s);
        assert_eq!(sizes.len(), 2, "{sizes:?}");
        assert!(sizes[0] < 400_000, "{sizes:?}");
    }

    fn gets(s: &ObjStore) -> u64 {
        s.0.counts.snapshot().iter().find(|(op, _)| *op == "get").map_or(0, |(_, n)| *n)
    }

    #[test]
    fn a_listing_reads_only_the_references_that_changed() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut s = store(&rt);
        for i in 0..5 {
            put(&mut s, &format!("d/f{i}"), format!("file {i}").as_bytes(), None).unwrap();
        }
        let mut other = ObjStore::new(s.0.os.clone(), config(), rt.handle().clone());
        assert_eq!(other.list_dir("d").unwrap().len(), 5);
        let before = gets(&other);
        let listed = other.list_dir("d").unwrap();
        assert_eq!(gets(&other), before, "the second listing read references again");
        assert_eq!(listed[2].size, 6);
        // One changed through the first instance: read again, alone.
        put(&mut s, "d/f2", b"a longer file 2", None).unwrap();
        let before = gets(&other);
        let listed = other.list_dir("d").unwrap();
        assert_eq!(gets(&other), before + 1);
        assert_eq!(listed[2].size, 15);
        assert_eq!(other.list().unwrap()[2].size, 15);
    }

    #[test]
    fn corrupt_objects_in_the_bucket_give_typed_errors_and_lose_nothing_else() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let grace = std::time::Duration::from_millis(1000);
        let mut s = store_with_grace(&rt, grace);
        let a = data(300_000, 51);
        let b = data(200_000, 52);
        let c = data(100_000, 54);
        put(&mut s, "a", &a, None).unwrap();
        put(&mut s, "d/b", &b, None).unwrap();
        put(&mut s, "d/c", &c, None).unwrap();
        let os = s.0.os.clone();
        let put_raw =
            |key: &Key, bytes: &[u8]| rt.block_on(os.put(key, Bytes::copy_from_slice(bytes).into())).unwrap();
        let ref_of = |s: &ObjStore, name: &str| rt.block_on(s.get_ref(name)).unwrap().unwrap().0;
        // A reference that is not one; a version that is not one; a pack
        // cut short; a partial naming another file; a lease of garbage.
        put_raw(&s.name_key("refs", "a").unwrap(), b"DSO1 garbage");
        let vb = ref_of(&s, "d/b").version;
        put_raw(&s.version_key(&vb), &[0xff; 64]);
        let vc = rt.block_on(s.load(&ref_of(&s, "d/c").version)).unwrap();
        let pack_c = s.pack_key(&vc.version.packs[0]);
        put_raw(&pack_c, b"short");
        let forged = Partial {
            name: "a".into(),
            chunking: ChunkerKind::Cdc,
            modified: 1,
            packs: vec![],
            chunks: vec![],
        };
        put_raw(&s.partial_key("elsewhere"), &encode(KIND_PARTIAL, &forged));
        put_raw(&s.key("gc", ["lease"]), b"not a lease");
        let mut fresh = ObjStore::new(os.clone(), ObjConfig { grace, ..config() }, rt.handle().clone());
        assert_eq!(fresh.stat("a").err(), Some(ErrorCode::Storage));
        assert_eq!(fresh.open("a", None).err(), Some(ErrorCode::Storage));
        assert_eq!(fresh.open("d/b", None).err(), Some(ErrorCode::Storage));
        let (tree, mut r) = fresh.open("d/c", None).unwrap().unwrap();
        let mut buf = vec![0u8; tree.summary().size as usize];
        assert_eq!(r.read_at(0, &mut buf), Err(IoFailed));
        // Listings leave out what cannot be read, and list the rest.
        let names: Vec<String> = fresh.list().unwrap().into_iter().map(|f| f.name).collect();
        assert_eq!(names, ["d/b", "d/c"]);
        assert_eq!(fresh.partials().unwrap(), []);
        assert_eq!(fresh.partial_info("elsewhere").unwrap(), None);
        // A new upload over the broken reference replaces it.
        put(&mut fresh, "a", &a, None).unwrap();
        assert_eq!(read(&mut fresh, "a"), a);
        put(&mut fresh, "d/b", &b, None).unwrap();
        assert_eq!(read(&mut fresh, "d/b"), b);
        // And `rm` removes one.
        put_raw(&s.name_key("refs", "d/c").unwrap(), b"DSO1 garbage");
        fresh.delete("d/c").unwrap();
        assert_eq!(fresh.stat("d/c").err(), Some(ErrorCode::NotFound));
        // Collection takes the lease over, and with a version it cannot
        // read, deletes no pack at all.
        let r = gc_after(&rt, &fresh, grace);
        let r2 = gc_after(&rt, &fresh, grace);
        assert_eq!((r.deleted_packs, r2.deleted_packs), (0, 0), "{r:?} {r2:?}");
        assert!(r2.garbage_packs == 0 || r2.condemned + r2.waiting > 0, "{r2:?}");
    }

    fn bytes_read(s: &ObjStore) -> u64 {
        s.0.counts.snapshot().iter().find(|(op, _)| *op == "bytes_in").map_or(0, |(_, n)| *n)
    }

    #[test]
    fn an_append_is_hashed_from_the_old_versions_last_midstate() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut s = store(&rt);
        let one = data(40 << 20, 61);
        put(&mut s, "log", &one, None).unwrap();
        let (tree, reader) = s.open("log", None).unwrap().unwrap();
        assert_eq!(reader.loaded.version.midstates.len(), 2);
        let mut two = one.clone();
        two.extend(data(1 << 20, 62));
        let before = bytes_read(&s);
        let mut w = s.create("log", two.len() as u64, None).unwrap();
        let (src, at) = reader.locate(0, one.len() as u64).unwrap();
        assert!(w.copy_from(src, at, one.len() as u64).unwrap());
        w.write(&two[one.len()..]).unwrap();
        let mut new_tree = Tree::build(&two, tree.summary().chunking);
        new_tree.set_file_hash(Hash::UNKNOWN);
        let p = s.finish("log", w, Some(new_tree)).unwrap();
        assert_eq!(p.file_hash, Some(Hash(Sha256::digest(&two).into())));
        // Only what follows the last midstate (8 MiB) was read back.
        let read_back = bytes_read(&s) - before;
        assert!(read_back < (9 << 20), "{read_back} bytes read back");
        s.0.versions.lock().unwrap().lru.clear();
        assert_eq!(read(&mut s, "log"), two);
        // The new version's midstates are right: a third from them.
        let (_, reader) = s.open("log", None).unwrap().unwrap();
        let mut three = two.clone();
        three.extend(b"more");
        let mut w = s.create("log", three.len() as u64, None).unwrap();
        let (src, at) = reader.locate(0, two.len() as u64).unwrap();
        assert!(w.copy_from(src, at, two.len() as u64).unwrap());
        w.write(b"more").unwrap();
        let mut new_tree = Tree::build(&three, tree.summary().chunking);
        new_tree.set_file_hash(Hash::UNKNOWN);
        let p = s.finish("log", w, Some(new_tree)).unwrap();
        assert_eq!(p.file_hash, Some(Hash(Sha256::digest(&three).into())));
    }

    #[test]
    fn a_sequential_read_fetches_the_next_range_while_it_uses_one() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut s = store(&rt);
        let a = data(20 << 20, 71);
        put(&mut s, "big", &a, None).unwrap();
        s.0.versions.lock().unwrap().lru.clear();
        let (_, mut r) = s.open("big", None).unwrap().unwrap();
        let before = bytes_read(&s);
        let mut back = vec![0u8; a.len()];
        // The first range alone, then on from there.
        let first = r.range_from(0, 0, 1).0;
        r.read_at(0, &mut back[..first as usize]).unwrap();
        assert!(r.ahead.is_none(), "read ahead on a first read");
        r.read_at(first, &mut back[first as usize..first as usize + 10]).unwrap();
        assert!(r.ahead.is_some(), "nothing read ahead");
        let mut at = first as usize;
        while at < a.len() {
            let n = (a.len() - at).min(65536);
            r.read_at(at as u64, &mut back[at..at + n]).unwrap();
            at += n;
        }
        assert!(back == a);
        // Every byte read once, give or take the last range ahead.
        let read = bytes_read(&s) - before;
        assert!(read <= a.len() as u64 + 2 * READ_AHEAD, "{read}");
        // A jump back is no sequential read: nothing is read ahead then.
        let (_, mut r) = s.open("big", None).unwrap().unwrap();
        let mid = r.loaded.ends[r.loaded.ends.len() / 2];
        r.read_at(mid, &mut back[..10]).unwrap();
        assert!(r.ahead.is_none());
        r.read_at(0, &mut back[..10]).unwrap();
        assert!(r.ahead.is_none());
        assert_eq!(back[..10], a[..10]);
    }
}
