//! Garbage collection: removing the packs and versions nothing needs any
//! more (replaced and deleted versions, uploads never published), while
//! other instances keep uploading and downloading.
//!
//! One instance collects at a time: it holds a lease, an object created
//! with `If-None-Match: *` (or taken over with `If-Match` once expired).
//! A run lists references, partials, versions, packs and its own markers,
//! then:
//! - a version is *live* if a reference names it; a pack is live if any
//!   stored version (live or not) or partial names it;
//! - an object that is not live and older than the grace period is
//!   *condemned*: a marker `gc/condemned/AREA/NAME` is written;
//! - an object condemned more than the grace period ago and still not live
//!   is deleted, with its marker; one found live again loses its marker;
//! - deletions stop once a quarter of the grace period has passed since
//!   the listing (the rest wait for the next run);
//! - packs older than the grace period that live versions use less than
//!   half of, and small packs (several together), are rewritten: their
//!   live chunks are copied to new packs and the live versions pointed
//!   there (`If-Match`); the old packs are then garbage like any other.
//!
//! Every time is the object store's (its `Last-Modified`), never an
//! instance's clock.
//!
//! Why an upload in flight never loses what it needs: it publishes within
//! half the grace period of its start (`finish` refuses a later one). Its
//! new packs are younger than that, so no run condemns them before its
//! version is stored. The packs it reuses belong to a version or partial
//! that existed when it started: they are condemned only by a run after
//! that object is gone, and deleted a grace period later, when the upload
//! has long published a version naming them. A version found stored (the
//! same content published before) is shared only if it is not condemned;
//! if it is condemned after the upload looked, it is deleted only a grace
//! period later, by a run whose listing sees the upload's reference.
//!
//! Rewriting keeps that true: an instance reuses chunks only from a
//! version it read less than half the grace period before the upload
//! began (`load` reads one older than a quarter again), so an upload that
//! reuses a pack rewritten after that read publishes (within half the
//! grace period of its start) before the pack, condemned no earlier than
//! the rewrite, can be deleted a grace period later; its version names the
//! pack, which is then live again. A download that finds a pack gone reads
//! its version again and goes on from where its chunks are now.

use super::*;
use object_store::ObjectMeta;
use std::collections::{BTreeMap, HashSet};

/// What one collection run found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Another instance was collecting: nothing was done.
    pub skipped: bool,
    /// References (stored files) found.
    pub refs: usize,
    /// Interrupted uploads kept.
    pub partials: usize,
    /// Versions stored (after the run).
    pub versions: usize,
    /// Packs stored (after the run), and their bytes.
    pub packs: usize,
    /// Bytes of the packs stored (after the run).
    pub pack_bytes: u64,
    /// Versions stored that no reference names (after the run).
    pub garbage_versions: usize,
    /// Packs stored that no stored version or partial names (after the run).
    pub garbage_packs: usize,
    /// Objects condemned by this run.
    pub condemned: usize,
    /// Condemned objects found live again.
    pub rescued: usize,
    /// Objects condemned, waiting out the grace period.
    pub waiting: usize,
    /// Versions deleted.
    pub deleted_versions: usize,
    /// Packs deleted, and their bytes.
    pub deleted_packs: usize,
    /// Bytes of the packs deleted.
    pub deleted_bytes: u64,
    /// Packs whose live chunks were moved to new packs (mostly dead ones,
    /// and small ones, compacted), and the bytes moved.
    pub rewritten_packs: usize,
    /// Bytes of chunks moved.
    pub rewritten_bytes: u64,
    /// Packs written for them.
    pub new_packs: usize,
    /// Versions pointed at the new packs.
    pub rewritten_versions: usize,
}

/// Bytes of packs one run reads to rewrite them, at most.
const REWRITE_BYTES: u64 = 256 << 20;
/// A pack smaller than this is compacted with others.
const SMALL_PACK: u64 = PACK_TARGET as u64 / 4;
/// A pack larger than this is never read whole (no writer makes one).
const LARGE_PACK: u64 = 4 * PACK_TARGET as u64;

/// The packs to rewrite, among `kept` (id, size, time) that live
/// versions use (`used`: their bytes there): older than `old_before`,
/// used by no partial (which keeps the pack anyway), and either mostly
/// dead (less than half used) or small (with another small one, or with a
/// mostly dead one). Most dead first, then smallest, up to
/// [`REWRITE_BYTES`]. (Versions that are garbage keep using the old pack
/// until they are collected: only live versions are rewritten.)
fn choose_rewrites(
    kept: &[(PackId, u64, i64)],
    used: &HashMap<PackId, u64>,
    by_partials: &HashSet<PackId>,
    old_before: i64,
) -> Vec<PackId> {
    let mut dead = Vec::new();
    let mut small = Vec::new();
    for &(id, size, modified) in kept {
        if modified >= old_before || size > LARGE_PACK || by_partials.contains(&id) {
            continue;
        }
        let Some(&live) = used.get(&id) else { continue };
        if live.saturating_mul(2) < size {
            dead.push((live * 1000 / size.max(1), size, id));
        } else if size < SMALL_PACK {
            small.push((size, size, id));
        }
    }
    if dead.is_empty() && small.len() < 2 {
        return Vec::new();
    }
    dead.sort_unstable();
    small.sort_unstable();
    let mut total = 0u64;
    let mut chosen = Vec::new();
    for (_, size, id) in dead.into_iter().chain(small) {
        if !chosen.is_empty() && total + size > REWRITE_BYTES {
            break;
        }
        total += size;
        chosen.push(id);
    }
    chosen
}

#[derive(Serialize, Deserialize)]
struct Lease {
    owner: [u8; 16],
    /// Held until this store time (ms since the epoch).
    until: i64,
}

const KIND_LEASE: u8 = 5;

/// A listed object's name in its area, and its `Last-Modified` in ms.
fn named(base: &Key, m: &ObjectMeta) -> Option<(String, i64)> {
    let rest: Vec<_> = m.location.prefix_match(base)?.collect();
    let [name] = rest.as_slice() else { return None };
    Some((name.as_ref().to_string(), m.last_modified.timestamp_millis()))
}

/// What tells one state of a listed object from another: its ETag, or
/// its time and size.
fn tag(m: &ObjectMeta) -> String {
    m.e_tag.clone().unwrap_or_else(|| format!("{}/{}", m.last_modified.timestamp_millis(), m.size))
}

impl ObjStore {
    /// The object store's time now, in ms since the epoch (from an
    /// object written for the purpose).
    async fn store_now(&self) -> Result<i64, ErrorCode> {
        let key = self.key("gc", ["clock"]);
        self.0.os.put(&key, PutPayload::from_static(b"")).await.map_err(os_error)?;
        let m = self.0.os.head(&key).await.map_err(os_error)?;
        Ok(m.last_modified.timestamp_millis())
    }

    /// Takes the collection lease until `now + ttl`, unless another
    /// instance holds it; the lease's version, to give it back.
    async fn take_lease(
        &self,
        owner: [u8; 16],
        now: i64,
        ttl: i64,
    ) -> Result<Option<UpdateVersion>, ErrorCode> {
        let key = self.key("gc", ["lease"]);
        let mine = encode(KIND_LEASE, &Lease { owner, until: now + ttl });
        let mode = match self.get(&key).await? {
            None => PutMode::Create,
            Some((bytes, etag)) => {
                let held = decode::<Lease>(KIND_LEASE, &bytes).is_some_and(|l| l.until > now);
                if held {
                    return Ok(None);
                }
                PutMode::Update(UpdateVersion { e_tag: etag, version: None })
            }
        };
        let opts = PutOptions { mode, ..Default::default() };
        match self.0.os.put_opts(&key, mine.into(), opts).await {
            Ok(r) => Ok(Some(UpdateVersion { e_tag: r.e_tag, version: r.version })),
            // Another instance took it first.
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(None)
            }
            Err(e) => Err(os_error(e)),
        }
    }

    async fn give_back(&self, owner: [u8; 16], lease: UpdateVersion) {
        let key = self.key("gc", ["lease"]);
        let expired = encode(KIND_LEASE, &Lease { owner, until: 0 });
        let opts = PutOptions { mode: PutMode::Update(lease), ..Default::default() };
        // Expires by itself if this fails.
        let _ = self.0.os.put_opts(&key, expired.into(), opts).await;
    }

    async fn list_all(&self, base: &Key) -> Result<Vec<ObjectMeta>, ErrorCode> {
        self.0.os.list(Some(base)).try_collect().await.map_err(os_error)
    }

    /// The packs a stored version names and its bytes in each (cached
    /// while the object is unchanged); `None` if it cannot be read.
    async fn packs_of(&self, version: &str, tag: &str) -> Result<Option<PackUse>, ErrorCode> {
        if let Some((t, p)) = self.0.version_packs.lock().unwrap_or_else(|p| p.into_inner()).get(version)
            && t == tag
        {
            return Ok(Some(p.clone()));
        }
        let Some((bytes, _)) = self.get(&self.version_key(version)).await? else { return Ok(None) };
        let Some(v) = decode::<Version>(KIND_VERSION, &bytes) else {
            tracing::warn!(version, "an unreadable version: no pack is collected while it is there");
            return Ok(None);
        };
        let mut per_pack = vec![0u64; v.packs.len()];
        for c in &v.chunks {
            match per_pack.get_mut(c.pack as usize) {
                Some(n) => *n += u64::from(c.len),
                None => {
                    tracing::warn!(version, "a version naming a pack it does not list");
                    return Ok(None);
                }
            }
        }
        let packs = Arc::new(v.packs.into_iter().zip(per_pack).collect::<Vec<_>>());
        self.0
            .version_packs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(version.to_string(), (tag.to_string(), packs.clone()));
        Ok(Some(packs))
    }

    /// One collection run (see the module's description). Blocks nothing:
    /// call it from async code.
    pub async fn gc(&self) -> Result<GcReport, ErrorCode> {
        let grace = self.0.grace.as_millis() as i64;
        let owner: [u8; 16] = rand::random();
        let now = self.store_now().await?;
        let Some(lease) = self.take_lease(owner, now, (grace / 2).max(1000)).await? else {
            return Ok(GcReport { skipped: true, ..GcReport::default() });
        };
        let listed = std::time::Instant::now();
        let result = self.collect(now, grace, listed).await;
        self.give_back(owner, lease).await;
        result
    }

    async fn collect(&self, now: i64, grace: i64, listed: std::time::Instant) -> Result<GcReport, ErrorCode> {
        let mut report = GcReport::default();
        let areas = ["refs", "partials", "versions", "packs"].map(|a| self.key(a, []));
        let marks_base = self.key("gc", ["condemned"]);
        let (refs, partials, versions, packs, marks) = futures::try_join!(
            self.list_all(&areas[0]),
            self.list_all(&areas[1]),
            self.list_all(&areas[2]),
            self.list_all(&areas[3]),
            self.list_all(&marks_base),
        )?;
        report.refs = refs.len();
        report.partials = partials.len();
        // Live versions: the ones references name.
        let top = &areas[0];
        let listed_refs: Vec<(String, &ObjectMeta)> =
            refs.iter().filter_map(|m| Some((Self::name_of(top, &m.location)?, m))).collect();
        let live_versions: HashSet<String> = futures::stream::iter(listed_refs)
            .map(|(name, m)| async move {
                Ok::<_, ErrorCode>(self.listed_ref(&name, m).await?.map(|r| r.version))
            })
            .buffered(LIST_CONCURRENCY)
            .try_filter_map(|v| async move { Ok(v) })
            .try_collect()
            .await?;
        // Live packs: those any stored version or partial names.
        let mut live_packs: HashSet<PackId> = HashSet::new();
        let mut all_known = true;
        let versions: Vec<(String, i64, String)> =
            versions.iter().filter_map(|m| named(&areas[2], m).map(|(n, t)| (n, t, tag(m)))).collect();
        let named_packs: Vec<_> = futures::stream::iter(versions.iter())
            .map(|(v, _, tag)| async move { self.packs_of(v, tag).await })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        // Bytes of each pack that live versions use (a chunk two of them
        // share counts twice: never less than the truth).
        let mut used: HashMap<PackId, u64> = HashMap::new();
        for ((name, _, _), p) in versions.iter().zip(&named_packs) {
            let Some(p) = p else {
                all_known = false;
                continue;
            };
            let live = live_versions.contains(name);
            for &(id, bytes) in p.iter() {
                live_packs.insert(id);
                if live {
                    *used.entry(id).or_default() += bytes;
                }
            }
        }
        let mut by_partials: HashSet<PackId> = HashSet::new();
        for m in &partials {
            // One gone since the listing was published or dropped.
            if let Some((bytes, _)) = self.get(&m.location).await? {
                match decode::<Partial>(KIND_PARTIAL, &bytes) {
                    Some(p) => by_partials.extend(p.packs),
                    None => all_known = false,
                }
            }
        }
        live_packs.extend(by_partials.iter().copied());
        let budget = std::time::Duration::from_millis((grace / 4).max(1) as u64);
        let mut run = Run { now, grace, listed, budget, marked: HashMap::new(), report };
        for m in &marks {
            let rest: Vec<_> = match m.location.prefix_match(&marks_base) {
                Some(r) => r.map(|p| p.as_ref().to_string()).collect(),
                None => continue,
            };
            if let [area, name] = rest.as_slice() {
                run.marked.insert((area.clone(), name.clone()), m.last_modified.timestamp_millis());
            }
        }
        // Versions first: a pack named only by a version deleted now is
        // still live in this run, condemned by a later one.
        for (name, modified, _) in &versions {
            let live = live_versions.contains(name);
            if self.judge(&mut run, "versions", name, live, *modified).await? {
                run.report.deleted_versions += 1;
                self.0.version_packs.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
                self.0.versions.lock().unwrap_or_else(|p| p.into_inner()).forget(name);
            } else {
                run.report.versions += 1;
                run.report.garbage_versions += usize::from(!live);
            }
        }
        let mut kept_packs = Vec::new();
        for m in &packs {
            let Some((name, modified)) = named(&areas[3], m) else { continue };
            let live = !all_known || parse_pack(&name).is_none_or(|id| live_packs.contains(&id));
            if self.judge(&mut run, "packs", &name, live, modified).await? {
                run.report.deleted_packs += 1;
                run.report.deleted_bytes += m.size;
            } else {
                run.report.garbage_packs += usize::from(!live);
                run.report.packs += 1;
                run.report.pack_bytes += m.size;
                if let Some(id) = parse_pack(&name)
                    && live
                {
                    kept_packs.push((id, m.size, modified));
                }
            }
        }
        if all_known {
            let chosen = choose_rewrites(&kept_packs, &used, &by_partials, now - grace);
            if !chosen.is_empty() && listed.elapsed() < budget {
                let live: Vec<&String> = versions
                    .iter()
                    .zip(&named_packs)
                    .filter(|((name, _, _), p)| {
                        live_versions.contains(name)
                            && p.as_ref().is_some_and(|p| p.iter().any(|(id, _)| chosen.contains(id)))
                    })
                    .map(|((name, _, _), _)| name)
                    .collect();
                self.rewrite(&mut run, &chosen, &live).await?;
            }
        }
        // Markers of objects no longer there.
        for (area, name) in run.marked.keys() {
            let _ = self.0.os.delete(&self.condemned_key(area, name)).await;
        }
        Ok(run.report)
    }

    /// Moves the chunks that `versions` (live, and the only ones using
    /// `chosen` but for partials and garbage, which `choose_rewrites`
    /// leaves out) keep in the packs `chosen` to new packs, and points
    /// each version at them, with `If-Match` on the version read. The old
    /// packs, named by nothing then, are collected like any garbage: a
    /// reader still using the old locations finds the version moved and
    /// reads it again; an upload in flight that reuses them names them in
    /// its version, which keeps them (see the module).
    async fn rewrite(&self, run: &mut Run, chosen: &[PackId], versions: &[&String]) -> Result<(), ErrorCode> {
        let set: HashSet<PackId> = chosen.iter().copied().collect();
        // Each chosen pack's chunks in use: offset and length to id.
        let mut in_use: HashMap<PackId, BTreeMap<(u32, u32), Hash>> = HashMap::new();
        for v in versions {
            let Some((bytes, _)) = self.get(&self.version_key(v)).await? else { continue };
            let Some(ver) = decode::<Version>(KIND_VERSION, &bytes) else { continue };
            for c in &ver.chunks {
                if let Some(id) = ver.packs.get(c.pack as usize)
                    && set.contains(id)
                {
                    in_use.entry(*id).or_default().insert((c.at, c.len), c.id);
                }
            }
        }
        // Copied, checked against their ids, into new packs.
        let mut moved: HashMap<(PackId, u32, u32), (PackId, u32)> = HashMap::new();
        let mut out: Vec<u8> = Vec::new();
        let mut out_id: PackId = rand::random();
        for id in chosen {
            let Some(chunks) = in_use.remove(id) else { continue };
            if run.listed.elapsed() >= run.budget {
                break;
            }
            let pack = match self.0.os.get(&self.pack_key(id)).await {
                Ok(r) if r.meta.size <= LARGE_PACK => r.bytes().await.map_err(os_error)?,
                Ok(_) | Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(os_error(e)),
            };
            let chunks: Vec<((u32, u32), Hash)> = chunks.into_iter().collect();
            let (pack, chunks, sound) = tokio::task::spawn_blocking(move || {
                let sound = chunks.iter().all(|&((at, len), cid)| {
                    let range = at as usize..at as usize + len as usize;
                    pack.get(range).is_some_and(|b| Hash(Sha256::digest(b).into()) == cid)
                });
                (pack, chunks, sound)
            })
            .await
            .map_err(|_| ErrorCode::Storage)?;
            if !sound {
                tracing::warn!(pack = hex(id), "a pack whose chunks do not match their ids: not rewritten");
                continue;
            }
            for ((at, len), _) in chunks {
                moved.insert((*id, at, len), (out_id, out.len() as u32));
                out.extend_from_slice(&pack[at as usize..at as usize + len as usize]);
                run.report.rewritten_bytes += u64::from(len);
            }
            run.report.rewritten_packs += 1;
            if out.len() >= PACK_TARGET {
                let full = std::mem::take(&mut out);
                self.0.os.put(&self.pack_key(&out_id), full.into()).await.map_err(os_error)?;
                run.report.new_packs += 1;
                out_id = rand::random();
            }
        }
        if !out.is_empty() {
            self.0.os.put(&self.pack_key(&out_id), out.into()).await.map_err(os_error)?;
            run.report.new_packs += 1;
        }
        if moved.is_empty() {
            return Ok(());
        }
        // The versions, pointed at where their chunks are now.
        for v in versions {
            let key = self.version_key(v);
            // Without an ETag it could not be replaced conditionally.
            let Some((bytes, e_tag @ Some(_))) = self.get(&key).await? else { continue };
            let Some(mut ver) = decode::<Version>(KIND_VERSION, &bytes) else { continue };
            let mut packs = Vec::new();
            let mut index: HashMap<PackId, u32> = HashMap::new();
            let mut changed = false;
            for c in &mut ver.chunks {
                let Some(&old) = ver.packs.get(c.pack as usize) else { continue };
                let (pack, at) = match moved.get(&(old, c.at, c.len)) {
                    Some(&to) => {
                        changed = true;
                        to
                    }
                    None => (old, c.at),
                };
                c.pack = *index.entry(pack).or_insert_with(|| {
                    packs.push(pack);
                    (packs.len() - 1) as u32
                });
                c.at = at;
            }
            if !changed {
                continue;
            }
            ver.packs = packs;
            let opts = PutOptions {
                mode: PutMode::Update(UpdateVersion { e_tag, version: None }),
                ..Default::default()
            };
            match self.0.os.put_opts(&key, encode(KIND_VERSION, &ver).into(), opts).await {
                Ok(_) => run.report.rewritten_versions += 1,
                // Changed since: it keeps the old packs.
                Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                }
                Err(e) => return Err(os_error(e)),
            }
            self.0.versions.lock().unwrap_or_else(|p| p.into_inner()).forget(v);
        }
        Ok(())
    }

    /// Condemns, rescues or deletes one object of `area` modified at
    /// `modified` (see the module); whether it was deleted. Its marker, if
    /// any, leaves `run.marked`.
    async fn judge(
        &self,
        run: &mut Run,
        area: &str,
        name: &str,
        live: bool,
        modified: i64,
    ) -> Result<bool, ErrorCode> {
        let marker = self.condemned_key(area, name);
        let since = run.marked.remove(&(area.to_string(), name.to_string()));
        match since {
            Some(_) if live => {
                self.0.os.delete(&marker).await.map_err(os_error)?;
                run.report.rescued += 1;
            }
            _ if live || run.now - modified <= run.grace => {}
            None => {
                self.0.os.put(&marker, PutPayload::from_static(b"")).await.map_err(os_error)?;
                run.report.condemned += 1;
            }
            Some(when) if run.now - when > run.grace && run.listed.elapsed() < run.budget => {
                match self.0.os.delete(&self.key(area, [name])).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(os_error(e)),
                }
                self.0.os.delete(&marker).await.map_err(os_error)?;
                return Ok(true);
            }
            Some(_) => run.report.waiting += 1,
        }
        Ok(false)
    }
}

/// One run's clock, budget, markers and findings.
struct Run {
    /// The store's time when the run began, ms.
    now: i64,
    grace: i64,
    listed: std::time::Instant,
    budget: std::time::Duration,
    /// Markers found: (area, name) to when they were written.
    marked: HashMap<(String, String), i64>,
    report: GcReport,
}

fn parse_pack(name: &str) -> Option<PackId> {
    if name.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}
