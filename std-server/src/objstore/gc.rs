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
//!   the listing (the rest wait for the next run).
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

use super::*;
use object_store::ObjectMeta;
use std::collections::HashSet;

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

    /// The packs a stored version names (cached: versions never change);
    /// `None` if it cannot be read.
    async fn packs_of(&self, version: &str) -> Result<Option<Arc<Vec<PackId>>>, ErrorCode> {
        if let Some(p) = self.0.version_packs.lock().unwrap_or_else(|p| p.into_inner()).get(version) {
            return Ok(Some(p.clone()));
        }
        let Some((bytes, _)) = self.get(&self.version_key(version)).await? else { return Ok(None) };
        let Some(v) = decode::<Version>(KIND_VERSION, &bytes) else {
            tracing::warn!(version, "an unreadable version: no pack is collected while it is there");
            return Ok(None);
        };
        let packs = Arc::new(v.packs);
        self.0
            .version_packs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(version.to_string(), packs.clone());
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
        let names: Vec<String> = refs.iter().filter_map(|m| Self::name_of(top, &m.location)).collect();
        let live_versions: HashSet<String> = futures::stream::iter(names)
            .map(|name| async move { Ok::<_, ErrorCode>(self.get_ref(&name).await?.map(|(r, _)| r.version)) })
            .buffered(LIST_CONCURRENCY)
            .try_filter_map(|v| async move { Ok(v) })
            .try_collect()
            .await?;
        // Live packs: those any stored version or partial names.
        let mut live_packs: HashSet<PackId> = HashSet::new();
        let mut all_known = true;
        let versions: Vec<(String, i64)> = versions.iter().filter_map(|m| named(&areas[2], m)).collect();
        let named_packs: Vec<_> = futures::stream::iter(versions.iter().map(|(v, _)| v.clone()))
            .map(|v| async move { self.packs_of(&v).await })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        for p in named_packs {
            match p {
                Some(p) => live_packs.extend(p.iter().copied()),
                None => all_known = false,
            }
        }
        for m in &partials {
            // One gone since the listing was published or dropped.
            if let Some((bytes, _)) = self.get(&m.location).await? {
                match decode::<Partial>(KIND_PARTIAL, &bytes) {
                    Some(p) => live_packs.extend(p.packs),
                    None => all_known = false,
                }
            }
        }
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
        for (name, modified) in &versions {
            let live = live_versions.contains(name);
            if self.judge(&mut run, "versions", name, live, *modified).await? {
                run.report.deleted_versions += 1;
                self.0.version_packs.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
                self.0.versions.lock().unwrap_or_else(|p| p.into_inner()).lru.pop(name);
            } else {
                run.report.versions += 1;
                run.report.garbage_versions += usize::from(!live);
            }
        }
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
            }
        }
        // Markers of objects no longer there.
        for (area, name) in run.marked.keys() {
            let _ = self.0.os.delete(&self.condemned_key(area, name)).await;
        }
        Ok(run.report)
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
