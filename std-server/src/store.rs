//! Files under a root directory, with per-file hash-tree indexes in a hidden
//! metadata directory. Everything under the root is reached through
//! [`Root`]: resolved beneath the root's descriptor by the kernel, never
//! through a symlink, and never by a path checked earlier.
//!
//! Layout under the root (`HASH` is the hex SHA-256 of a file's name, so
//! that every name the server accepts has files of bounded name length
//! here, and a name that is a file in one place and a directory in another
//! cannot collide):
//! - `NAME`: the stored files (subdirectories allowed);
//! - `.deltasync/lock`: locked by the server using the root (a second one
//!   refuses to start);
//! - `.deltasync/index/HASH.idx`: the tree of `NAME`, stamped with the
//!   file's size, modification time, inode and change time, rebuilt when
//!   they no longer match, followed by the SHA-256 state after every 16 MiB of the file
//!   (so that a new version that starts like the old one is hashed from
//!   where it differs, not from its first byte);
//! - `.deltasync/upload/HASH-PID-N`: an upload in progress, renamed onto
//!   `NAME` when verified;
//! - `.deltasync/upload/HASH-PID-N.name`: the name it is for;
//! - `.deltasync/partial/HASH`: the prefix an interrupted upload assembled,
//!   reused by the next upload of `NAME`; `HASH.name` holds `NAME` (for
//!   listings);
//! - `.deltasync/trash/N`: a replaced version, unlinked in the background
//!   after the new one is published (emptied at start);
//! - `.deltasync/quarantine/`: leftovers that start-up could not recover,
//!   moved aside (and logged) so that the server starts anyway.
//!
//! Listings skip every name starting with `.deltasync`.

use crate::beneath::{Root, join};
use crate::sketches::Sketches;
use deltasync_core::Hash;
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::server::{PartialFile, Published, Store, StoredFile};
use deltasync_core::error::ErrorCode;
use deltasync_core::message::{EntryKind, Expect, MAX_NAME, MODE_BITS, Meta};
use deltasync_core::source::{FileSource, IoFailed, Output};
use deltasync_core::tree::{Summary, Tree, TreeIndexer};
use deltasync_host::build::{build_tree, build_tree_unhashed};
use deltasync_host::readback::{Follow, ReadBack};
use rustix::fs::FileType;
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::UNIX_EPOCH;

const META: &str = ".deltasync";
/// The whole-file SHA-256 state is kept after every this many bytes.
pub(crate) const MIDSTATE_STEP: u64 = 16 << 20;
/// Temporary files of uploads before this layout, written beside their
/// destination (recovered at start like the newer ones).
const OLD_PART_PREFIX: &str = ".deltasync-part-";
const INDEX_MAGIC: &[u8; 8] = b"DSIDX002";
/// An index's header: the magic, then the file's size, modification time,
/// inode and change time (an index of any other file, or of this one
/// changed since, is stale; a change in place with the old size and
/// modification time put back still moves the change time).
const INDEX_HEAD: usize = 8 + 8 + 16 + 8 + 16;
/// Present once the layout before hashed names has been migrated.
const LAYOUT_MARK: &str = "layout-2";
/// Suffix of the file beside an upload or a partial that holds its name.
const LABEL: &str = ".name";

/// The extended attribute that keeps a client's mode when it lacks what the
/// server needs of its own files (see [`apply_meta`]).
const MODE_XATTR: &str = "user.deltasync.mode";

/// What the server keeps of the owner's bits whatever a client asks: read
/// and write (and search, on a directory), to serve and replace it.
fn owner_needs(dir: bool) -> u32 {
    if dir { 0o700 } else { 0o600 }
}

/// Gives an open file or directory a client's time and mode. On disk the
/// mode keeps [`owner_needs`] and never lets the group or others write
/// (other users of the server's machine must not swap what it stores); a
/// client's mode that differs from that is kept exactly in [`MODE_XATTR`]
/// (where the file system has none, the file's own mode is what a listing
/// reports).
fn apply_meta(fd: impl std::os::fd::AsFd, meta: Meta, dir: bool) -> io::Result<()> {
    let mode = meta.mode & MODE_BITS;
    let on_disk = (mode | owner_needs(dir)) & !0o022;
    rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(on_disk))?;
    if on_disk != mode {
        if let Err(e) = rustix::fs::fsetxattr(
            &fd,
            MODE_XATTR,
            mode.to_string().as_bytes(),
            rustix::fs::XattrFlags::empty(),
        ) {
            tracing::debug!(error = %e, "mode kept without its owner bits: no extended attributes here");
        }
    } else {
        let _ = rustix::fs::fremovexattr(&fd, MODE_XATTR);
    }
    let times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        last_modification: rustix::fs::Timespec {
            tv_sec: meta.modified.min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(meta.nanos.min(999_999_999)) as _,
        },
    };
    rustix::fs::futimens(&fd, &times)?;
    Ok(())
}

/// The mode a client gave an open file or directory whose own mode is
/// `st_mode` (see [`apply_meta`]).
fn mode_of(fd: impl std::os::fd::AsFd, st_mode: u32) -> u32 {
    let mut buf = [0u8; 8];
    match rustix::fs::fgetxattr(&fd, MODE_XATTR, &mut buf) {
        Ok(n) => std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|t| t.parse::<u32>().ok())
            .map_or(st_mode & MODE_BITS, |m| m & MODE_BITS),
        Err(_) => st_mode & MODE_BITS,
    }
}

/// Whether an index header describes the file with this metadata.
fn index_is_fresh(head: &[u8], meta: &fs::Metadata) -> bool {
    head.len() == INDEX_HEAD
        && &head[..8] == INDEX_MAGIC
        && head[8..16] == meta.len().to_le_bytes()
        && head[16..32] == mtime_ns(meta).to_le_bytes()
        && head[32..40] == meta.ino().to_le_bytes()
        && head[40..56] == ctime_ns(meta).to_le_bytes()
}

/// The server's storage: cheap to clone, one per connection.
#[derive(Clone, Debug)]
pub struct FsStore {
    /// The root, locked for this process, with `.deltasync` pinned.
    root: Arc<Root>,
    /// Serializes the rename-and-index step of commits.
    commit: Arc<Mutex<()>>,
    /// Threads used to hash a file whose index is missing.
    threads: usize,
    /// Names whose new index a background thread is writing (see
    /// `publish`): whoever reads or replaces one of them waits for it.
    indexing: IndexingSet,
    /// How long, and how much, interrupted uploads are kept.
    partials: PartialLimits,
    /// Each file's sketch, for an upload whose data another file holds.
    sketches: Arc<Sketches>,
}

/// How long interrupted uploads are kept for resuming, and how many bytes
/// of them at most (the oldest go first).
#[derive(Clone, Copy, Debug)]
pub struct PartialLimits {
    /// Age (since its last write) after which a partial is dropped.
    pub max_age: std::time::Duration,
    /// Total size of all partials.
    pub max_bytes: u64,
}

impl Default for PartialLimits {
    fn default() -> Self {
        PartialLimits { max_age: std::time::Duration::from_secs(24 * 3600), max_bytes: 8 << 30 }
    }
}

/// Names whose index is being written, and a condvar woken as each is done.
type IndexingSet = Arc<(Mutex<HashSet<String>>, Condvar)>;

/// A name in [`FsStore::indexing`]; taken out (and waiters woken) on drop.
struct Indexing {
    set: IndexingSet,
    name: String,
}

impl Drop for Indexing {
    fn drop(&mut self) {
        let (set, cv) = &*self.set;
        set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.name);
        cv.notify_all();
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn storage(e: io::Error) -> ErrorCode {
    tracing::warn!(error = %e, "storage error");
    if is_out_of_space(&e) { ErrorCode::NoSpace } else { ErrorCode::Storage }
}

/// Whether `e` says the disk (or the user's quota) is full.
fn is_out_of_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) || e.kind() == io::ErrorKind::StorageFull
}

/// What an error reaching a client's name means: a symlink on the way, or
/// something else than a file where a directory is needed, is a name this
/// server will not serve; a missing one is missing.
fn reach(e: io::Error) -> ErrorCode {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorCode::NotFound,
        Some(libc::ELOOP | libc::EXDEV | libc::ENOTDIR | libc::EISDIR) => ErrorCode::BadName,
        _ if e.kind() == io::ErrorKind::InvalidInput => ErrorCode::BadName,
        _ => storage(e),
    }
}

/// The hex SHA-256 of a name: its files' names in the metadata directory.
fn name_hash(name: &str) -> String {
    Hash(Sha256::digest(name.as_bytes()).into()).to_string()
}

/// Whether `s` is a name hash.
fn is_name_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn stat_is_file(s: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(s.st_mode) == FileType::RegularFile
}

fn mtime_ns(m: &fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

fn ctime_ns(m: &fs::Metadata) -> i128 {
    i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec())
}

/// Which version of a name is stored. Every version the server publishes
/// is a new file (inode); one changed in place behind its back has another
/// size or modification time; and an inode number reused after the old
/// version was unlinked comes with the change time of its new file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VersionId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl VersionId {
    fn of_stat(s: &rustix::fs::Stat) -> VersionId {
        let ns = |secs: i64, nsec: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
        VersionId {
            dev: s.st_dev,
            ino: s.st_ino,
            size: s.st_size as u64,
            mtime_ns: ns(s.st_mtime, s.st_mtime_nsec as i64),
            ctime_ns: ns(s.st_ctime, s.st_ctime_nsec as i64),
        }
    }

    fn of_meta(m: &fs::Metadata) -> VersionId {
        let ctime_ns = i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec());
        VersionId { dev: m.dev(), ino: m.ino(), size: m.len(), mtime_ns: mtime_ns(m), ctime_ns }
    }
}

/// Writes `name` into the new label file `rel` (see [`LABEL`]).
fn write_label(root: &Root, rel: &str, name: &str) -> io::Result<()> {
    let _ = root.remove_file(rel);
    root.create_new(rel, 0o600)?.write_all(name.as_bytes())
}

/// The name a label file holds, if it is one whose hash is `hash`.
fn read_label(root: &Root, rel: &str, hash: &str) -> Option<String> {
    let mut buf = Vec::with_capacity(64);
    root.open_file(rel).ok()?.take(MAX_NAME as u64 + 1).read_to_end(&mut buf).ok()?;
    let name = String::from_utf8(buf).ok()?;
    (deltasync_core::message::validate_name(&name).is_ok() && name_hash(&name) == hash).then_some(name)
}

/// The time of a stat, in seconds since the Unix epoch.
fn stat_mtime(s: &rustix::fs::Stat) -> u64 {
    s.st_mtime.max(0) as u64
}

impl FsStore {
    /// Opens (creating if needed) the store at `root`, locks it (failing if
    /// another server holds it), and recovers what an earlier run left:
    /// each leftover on its own; what cannot be recovered is moved to the
    /// quarantine and logged.
    pub fn open(root: &Path) -> io::Result<FsStore> {
        Self::open_with(root, PartialLimits::default())
    }

    /// [`Self::open`] keeping interrupted uploads within `partials`.
    pub fn open_with(root: &Path, partials: PartialLimits) -> io::Result<FsStore> {
        let root = Arc::new(Root::open(root)?);
        if let Err(e) = root.lock() {
            return Err(io::Error::other(format!(
                "{} is in use by another deltasync-server (it holds a lock on the directory): {e}",
                root.path().display(),
            )));
        }
        root.create_dirs(META)?;
        // The metadata directory is reached through its descriptor from now
        // on, and must be this user's alone.
        root.pin(META)?;
        if root.others_may_rename() {
            tracing::warn!(
                root = %root.path().display(),
                "other users may rename entries of the storage root (group- or world-writable, no sticky bit): \
                 they could move stored files around; chmod o-w,g-w (or +t) it"
            );
        }
        let threads = deltasync_host::build::default_threads();
        let indexing = Arc::new((Mutex::new(HashSet::new()), Condvar::new()));
        let sketches = Arc::new(Sketches::default());
        let store = FsStore { root, commit: Arc::new(Mutex::new(())), threads, indexing, partials, sketches };
        store.recover();
        for dir in ["index", "partial", "upload", "trash"] {
            let rel = format!("{META}/{dir}");
            if let Err(e) = store.root.create_dirs(&rel) {
                // Something else than a directory there (a file, a
                // symlink): set aside, and a directory made in its place.
                store.quarantine(&rel, &e);
                store.root.create_dirs(&rel)?;
            }
        }
        store.sweep_partials();
        Ok(store)
    }

    /// Reads the stored files' sketches from their indexes (files without a
    /// fresh one are left out until they are uploaded again).
    fn index_sketches(&self) {
        let Ok(files) = self.clone().list() else { return };
        for f in files {
            let Ok(rel) = self.path_of(&f.name) else { continue };
            let Some(meta) = self.root.open_file(&rel).and_then(|file| file.metadata()).ok() else {
                continue;
            };
            if let Some(tree) = self.load_index_unwaited(&f.name, &meta) {
                self.sketches.set(&f.name, &deltasync_core::tree::sketch(&tree));
            }
        }
    }

    /// Drops the partials past their age, then the oldest ones while all
    /// of them together are over the limit. Runs at start, whenever an
    /// upload is interrupted, and when the server asks (hourly).
    pub fn sweep_partials(&self) {
        sweep_partials(&self.root, self.partials);
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    fn index_path(&self, name: &str) -> String {
        format!("{META}/index/{}.idx", name_hash(name))
    }

    fn partial_path(&self, name: &str) -> String {
        format!("{META}/partial/{}", name_hash(name))
    }

    /// Moves `rel` aside into the quarantine, logging why.
    fn quarantine(&self, rel: &str, why: &io::Error) {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let secs = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let leaf: String = rel.rsplit('/').next().unwrap_or("x").chars().take(64).collect();
        let to = format!("{META}/quarantine/{secs}-{n}-{leaf}");
        let moved =
            self.root.create_dirs(&format!("{META}/quarantine")).and_then(|()| self.root.rename(rel, &to));
        match moved {
            Ok(()) => {
                tracing::warn!(leftover = rel, to, error = %why, "could not recover a leftover: quarantined")
            }
            Err(e) => {
                tracing::error!(leftover = rel, error = %why, move_error = %e, "could not recover or quarantine a leftover")
            }
        }
    }

    /// Recovers what an earlier run left, each leftover on its own.
    fn recover(&self) {
        let meta_dir = |d: &str| format!("{META}/{d}");
        // Indexes: kept if they are indexes of this layout; temporaries of
        // interrupted writes and indexes of the old layout go (indexes are
        // rebuilt when needed).
        for (name, kind) in self.root.entries(&meta_dir("index")).unwrap_or_default() {
            let rel = join(&meta_dir("index"), &name);
            let keep = kind == FileType::RegularFile && name.strip_suffix(".idx").is_some_and(is_name_hash);
            if !keep {
                let gone = if kind == FileType::Directory {
                    self.root.remove_all(&rel)
                } else {
                    self.root.remove_file(&rel)
                };
                if let Err(e) = gone {
                    self.quarantine(&rel, &e);
                }
            }
        }
        // Old versions whose removal a crash interrupted.
        if let Err(e) = self.root.remove_all(&meta_dir("trash"))
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            self.quarantine(&meta_dir("trash"), &e);
        }
        // Uploads in progress become their names' partials (with their
        // labels); labels left without an upload go.
        for (name, kind) in self.root.entries(&meta_dir("upload")).unwrap_or_default() {
            if name.ends_with(LABEL) {
                continue;
            }
            let rel = join(&meta_dir("upload"), &name);
            let hash = name.split('-').next().unwrap_or("");
            let r = if kind == FileType::RegularFile && is_name_hash(hash) {
                self.keep_partial(&rel, &format!("{META}/partial/{hash}"), None)
            } else {
                Err(io::Error::other("not an upload of this server"))
            };
            if let Err(e) = r {
                self.quarantine(&rel, &e);
            }
        }
        for (name, _) in self.root.entries(&meta_dir("upload")).unwrap_or_default() {
            if name.ends_with(LABEL) {
                let _ = self.root.remove_file(&join(&meta_dir("upload"), &name));
            }
        }
        // The layout before this one: once migrated, never looked for again
        // (finding its uploads means walking every directory).
        let migrated = format!("{META}/{LAYOUT_MARK}");
        if self.root.is_file(&migrated) {
            return;
        }
        // Partials of the old layout (`partial/NAME`): moved to their hash.
        for (name, kind) in self.root.entries(&meta_dir("partial")).unwrap_or_default() {
            let label = name.strip_suffix(LABEL).is_some_and(is_name_hash);
            if kind == FileType::RegularFile && (is_name_hash(&name) || label) {
                continue;
            }
            self.migrate_partials(&meta_dir("partial"), &name, &name, kind);
        }
        // Uploads of the old layout, beside their destinations.
        self.recover_old_uploads("");
        if let Err(e) = self.root.create_new(&migrated, 0o600) {
            tracing::warn!(error = %e, "could not mark the storage layout as migrated");
        }
    }

    /// Renames the leftover upload `rel` to the partial `to`, or removes it
    /// if it holds nothing. Its label is `name`'s, or the one beside `rel`.
    fn keep_partial(&self, rel: &str, to: &str, name: Option<&str>) -> io::Result<()> {
        let len = self.root.stat(rel)?.st_size;
        if len == 0 {
            return self.root.remove_file(rel);
        }
        self.root.create_dirs(&format!("{META}/partial"))?;
        self.root.rename(rel, to)?;
        let label = format!("{to}{LABEL}");
        let labelled = match name {
            Some(name) => write_label(&self.root, &label, name),
            None => self.root.rename(&format!("{rel}{LABEL}"), &label),
        };
        if let Err(e) = labelled {
            tracing::warn!(error = %e, partial = to, "an interrupted upload's name is unknown: listings leave it out");
        }
        tracing::info!(partial = to, bytes = len, "kept an interrupted upload for resuming");
        Ok(())
    }

    fn migrate_partials(&self, base: &str, name: &str, rel_name: &str, kind: FileType) {
        let rel = join(base, rel_name);
        let r = match kind {
            FileType::RegularFile => self.keep_partial(&rel, &self.partial_path(name), Some(name)),
            FileType::Directory => {
                for (child, k) in self.root.entries(&rel).unwrap_or_default() {
                    self.migrate_partials(base, &join(name, &child), &join(rel_name, &child), k);
                }
                self.root.remove_dir(&rel)
            }
            _ => Err(io::Error::other("not a file")),
        };
        if let Err(e) = r {
            self.quarantine(&rel, &e);
        }
    }

    fn recover_old_uploads(&self, dir: &str) {
        for (name, kind) in self.root.entries(dir).unwrap_or_default() {
            let rel = join(dir, &name);
            if kind == FileType::Directory && !name.starts_with(META) {
                self.recover_old_uploads(&rel);
            } else if kind == FileType::RegularFile
                && let Some(rest) = name.strip_prefix(OLD_PART_PREFIX)
            {
                // PID-N-BASE
                let base = rest.splitn(3, '-').nth(2).unwrap_or("");
                let r = if base.is_empty() {
                    self.root.remove_file(&rel)
                } else {
                    let name = join(dir, base);
                    self.keep_partial(&rel, &self.partial_path(&name), Some(&name))
                };
                if let Err(e) = r {
                    self.quarantine(&rel, &e);
                }
            }
        }
    }

    /// The set of names being indexed, once `busy` no longer holds for it.
    fn indexing_once(
        &self,
        busy: impl FnMut(&mut HashSet<String>) -> bool,
    ) -> MutexGuard<'_, HashSet<String>> {
        let (set, cv) = &*self.indexing;
        let s = set.lock().unwrap_or_else(|p| p.into_inner());
        cv.wait_while(s, busy).unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no background thread writes `name`'s index.
    fn wait_indexed(&self, name: &str) {
        drop(self.indexing_once(|s| s.contains(name)));
    }

    /// Waits until every index being written in the background is written
    /// (before the process exits).
    pub fn wait_indexing(&self) {
        drop(self.indexing_once(|s| !s.is_empty()));
    }

    /// Marks `name`'s index as being written until the result is dropped,
    /// after waiting for any write of it already going on.
    fn start_indexing(&self, name: &str) -> Indexing {
        self.indexing_once(|s| s.contains(name)).insert(name.to_string());
        Indexing { set: self.indexing.clone(), name: name.to_string() }
    }

    /// The place of `name` under the root. Names were checked by the core
    /// (no `..`, `.`, empty or `.deltasync` components, no NUL); every
    /// access then goes through [`Root`], which refuses symlinks on the way
    /// (one pointing out would escape the root, one pointing elsewhere
    /// inside it would escape a key's prefixes).
    fn path_of(&self, name: &str) -> Result<String, ErrorCode> {
        deltasync_core::message::validate_name(name)?;
        Ok(name.to_string())
    }

    fn load_index(&self, name: &str, meta: &fs::Metadata) -> Option<Tree> {
        self.wait_indexed(name);
        self.load_index_unwaited(name, meta)
    }

    /// [`Self::load_index`] for the one who marked the name as indexing.
    fn load_index_unwaited(&self, name: &str, meta: &fs::Metadata) -> Option<Tree> {
        let mut bytes = Vec::new();
        self.root.open_file(&self.index_path(name)).ok()?.read_to_end(&mut bytes).ok()?;
        let (head, body) = bytes.split_at_checked(INDEX_HEAD)?;
        let (tree, _midstates) = Tree::take_from_bytes(body)?;
        (index_is_fresh(head, meta) && tree.summary().size == meta.len()).then_some(tree)
    }

    /// The SHA-256 states kept in a fresh index (state `i` after `(i + 1) *`
    /// [`MIDSTATE_STEP`] bytes), read from its end only; empty if none.
    fn load_midstates(&self, name: &str, meta: &fs::Metadata) -> Vec<Vec<u8>> {
        self.wait_indexed(name);
        let read = || -> io::Result<Vec<Vec<u8>>> {
            let f = self.root.open_file(&self.index_path(name))?;
            let len = f.metadata()?.len();
            let mut head = [0u8; INDEX_HEAD + 8];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut head[..INDEX_HEAD], 0)?;
            if !index_is_fresh(&head[..INDEX_HEAD], meta) || len < INDEX_HEAD as u64 + 8 {
                return Ok(Vec::new());
            }
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut head[INDEX_HEAD..], len - 8)?;
            let n = u64::from_le_bytes(head[INDEX_HEAD..].try_into().unwrap_or_default());
            if n > len - INDEX_HEAD as u64 - 8 {
                return Ok(Vec::new());
            }
            let mut body = vec![0u8; n as usize];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut body, len - 8 - n)?;
            Ok(postcard::from_bytes(&body).unwrap_or_default())
        };
        read().unwrap_or_default()
    }

    /// The summary of a fresh index, reading only its first bytes (listings
    /// need the hash, not the tree).
    fn load_summary(&self, name: &str, meta: &fs::Metadata) -> Option<Summary> {
        self.wait_indexed(name);
        let mut f = self.root.open_file(&self.index_path(name)).ok()?;
        let mut buf = [0u8; INDEX_HEAD + 160];
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(_) => return None,
            }
        }
        let (head, body) = buf[..n].split_at_checked(INDEX_HEAD)?;
        let s = Tree::summary_from_prefix(body)?;
        (index_is_fresh(head, meta) && s.size == meta.len()).then_some(s)
    }

    fn save_index(
        &self,
        name: &str,
        meta: &fs::Metadata,
        tree: &Tree,
        midstates: &[Vec<u8>],
    ) -> io::Result<()> {
        let _writing = self.start_indexing(name);
        write_index(&self.root, &self.index_path(name), meta, tree, midstates)
    }

    /// The tree of the stored file chunked with `chunking` (see
    /// [`Store::open`] for `None`), from its index when fresh; `None` if the
    /// kind does not suit the file's size.
    fn tree_of(&self, name: &str, file: &File, chunking: Option<ChunkerKind>) -> io::Result<Option<Tree>> {
        let meta = file.metadata()?;
        let index = self.load_index(name, &meta);
        let stored = index.as_ref().map(|t| t.summary().chunking);
        let kind = chunking.unwrap_or_else(|| ChunkerKind::keep_or_choose(stored, meta.len()));
        if !kind.suits(meta.len()) {
            return Ok(None);
        }
        if let Some(t) = index.filter(|t| t.summary().chunking == kind) {
            return Ok(Some(t));
        }
        let tree = build_tree(file, kind, self.threads)?;
        // Content-defined trees are kept (a fixed kind is one client's
        // choice); the file may have changed while we hashed it, so only if
        // its size is still what we read, and only while it is still the
        // version stored under `name` (a newer one's index stays).
        if !matches!(kind, ChunkerKind::Fixed(_))
            && file.metadata()?.len() == tree.summary().size
            && self.root.stat(name).is_ok_and(|m| m.st_ino == meta.ino())
        {
            self.save_index(name, &meta, &tree, &[])?;
        }
        Ok(Some(tree))
    }

    /// The summary of the stored version of `name` open as `file`, from
    /// its index, or by hashing it.
    fn summary_of(&self, name: &str, file: &File, meta: &fs::Metadata) -> Result<Summary, ErrorCode> {
        match self.load_summary(name, meta) {
            Some(s) => Ok(s),
            None => Ok(self.tree_of(name, file, None).map_err(storage)?.ok_or(ErrorCode::Storage)?.summary()),
        }
    }

    /// Which version is stored at `rel`, if any (`BadName` if something
    /// other than a file is there).
    fn current(&self, rel: &str) -> Result<Option<VersionId>, ErrorCode> {
        match self.root.stat(rel) {
            Ok(m) if stat_is_file(&m) => Ok(Some(VersionId::of_stat(&m))),
            Ok(_) => Err(ErrorCode::BadName),
            Err(e) => match reach(e) {
                ErrorCode::NotFound => Ok(None),
                c => Err(c),
            },
        }
    }

    /// Whether `found`, the version just found at `rel`, is what `expect`
    /// asks for (`Conflict` if not).
    fn check_expect(
        &self,
        name: &str,
        rel: &str,
        found: Option<VersionId>,
        expect: Expect,
    ) -> Result<(), ErrorCode> {
        let holds = match (expect, found) {
            (Expect::Absent, found) => found.is_none(),
            (Expect::Match(_), None) => false,
            (Expect::Match(want), Some(id)) => {
                let file = match self.root.open_file(rel).map_err(reach) {
                    Ok(f) => f,
                    Err(ErrorCode::NotFound) => return Err(ErrorCode::Conflict),
                    Err(c) => return Err(c),
                };
                let meta = file.metadata().map_err(storage)?;
                // Hashed only if it is still the version found.
                VersionId::of_meta(&meta) == id && self.summary_of(name, &file, &meta)?.file_hash == want
            }
        };
        if holds { Ok(()) } else { Err(ErrorCode::Conflict) }
    }

    fn describe(&self, name: String, rel: &str) -> Result<StoredFile, ErrorCode> {
        let file = self.root.open_file(rel).map_err(|e| match reach(e) {
            // Not a regular file, or behind a symlink: nothing stored.
            ErrorCode::BadName => ErrorCode::NotFound,
            c => c,
        })?;
        let meta = file.metadata().map_err(storage)?;
        let summary = self.summary_of(&name, &file, &meta)?;
        let modified =
            meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        Ok(StoredFile {
            name,
            size: meta.len(),
            modified,
            sha256: summary.file_hash,
            chunking: summary.chunking,
            nanos: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
            mode: mode_of(&file, meta.mode()),
            kind: EntryKind::File,
        })
    }

    /// Verifies the written bytes' hash, syncs and renames the new version
    /// into place (if the version stored is still the one the upload
    /// expects), then writes its index; the caller cleans up on error.
    /// Returns the version's hash, and whether the version stored when the
    /// upload began had been replaced meanwhile.
    fn publish(&mut self, name: &str, w: &mut TempFile, mut tree: Tree) -> Result<(Hash, bool), ErrorCode> {
        let dest = self.path_of(name)?;
        w.start_hasher().map_err(storage)?;
        let file = w.file.take().ok_or(ErrorCode::Storage)?;
        let file = file.into_inner().map_err(|e| storage(e.into_error()))?;
        let t = std::time::Instant::now();
        let (hash, recorded) =
            w.hasher.take().ok_or(ErrorCode::Storage)?.finish(w.written).map_err(storage)?;
        let mut midstates = std::mem::take(&mut w.kept_midstates);
        midstates.extend(recorded);
        let claimed = tree.summary().file_hash;
        if claimed.is_known() && claimed != hash {
            tracing::warn!(name, "the written file does not match the offered SHA-256");
            return Err(ErrorCode::Integrity);
        }
        tree.set_file_hash(hash);
        if let Some(meta) = w.meta {
            apply_meta(&file, meta, false).map_err(storage)?;
        }
        file.sync_all().map_err(storage)?;
        tracing::debug!(name, ms = t.elapsed().as_millis() as u64, "hashed and synced the new version");
        // Readers of this name's index wait from before the rename until the
        // new index is written (below, in the background).
        let indexing = self.start_indexing(name);
        let _guard = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        // Every publication and deletion holds the lock: what is stored now
        // stays until this one is done.
        let replaced = self.current(&dest)? != w.found;
        if replaced && w.conditional {
            tracing::info!(name, "a conditional upload found another version stored: not published");
            return Err(ErrorCode::Conflict);
        }
        // Keep the old version alive under another name while renaming, so
        // that the rename does not have to free it; it goes in the background.
        let trash = format!("{META}/trash/{}", TEMP_COUNTER.fetch_add(1, Ordering::Relaxed));
        let old = self.root.hard_link(&dest, &trash).is_ok().then_some(trash);
        // An upload expecting no version never replaces one, even one made
        // behind the server's back since the check.
        let renamed = if w.conditional && w.found.is_none() {
            match self.root.rename_noreplace(&w.path, &dest) {
                // Not on this file system: a hard link fails as atomically
                // if the name exists.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.root.hard_link(&w.path, &dest).map(|()| drop(self.root.remove_file(&w.path)))
                }
                r => r,
            }
        } else {
            self.root.rename(&w.path, &dest)
        };
        if let Err(e) = renamed {
            if let Some(old) = old {
                let _ = self.root.remove_file(&old);
            }
            if e.kind() == io::ErrorKind::AlreadyExists {
                return Err(ErrorCode::Conflict);
            }
            return Err(reach(e));
        }
        if replaced {
            tracing::info!(name, "published over a version stored after this upload began");
        }
        if let Some(old) = old {
            // In the background; here if no thread can be had.
            let root = self.root.clone();
            let unlink = std::thread::Builder::new().name("trash".into()).spawn({
                let old = old.clone();
                move || root.remove_file(&old)
            });
            if unlink.is_err() {
                let _ = self.root.remove_file(&old);
            }
        }
        // Published: from here on a failure is logged, not reported (the
        // client's version is in place, and it must not be told otherwise).
        let parent = dest.rsplit_once('/').map_or("", |(d, _)| d);
        if let Err(e) = self.root.sync_dir(parent) {
            tracing::warn!(error = %e, name, "could not sync the directory of a published version");
        }
        drop_partial(&self.root, &self.partial_path(name));
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, name, "published, but not indexed");
                return Ok((hash, replaced));
            }
        };
        // The index is written while the client gets its answer; until then
        // whoever reads it waits (`wait_indexed`). One never written (no
        // thread to write it, or a crash) is rebuilt when next needed.
        let path = self.index_path(name);
        let root = self.root.clone();
        let job = move || {
            let _done = indexing;
            match write_index(&root, &path, &meta, &tree, &midstates) {
                Ok(()) => tracing::debug!(index = path, "indexed"),
                Err(e) => tracing::warn!(error = %e, index = path, "could not write index"),
            }
        };
        if let Err(e) = std::thread::Builder::new().name("index".into()).spawn(job) {
            tracing::warn!(error = %e, name, "could not start writing the index");
        }
        tracing::debug!(name, ms = t.elapsed().as_millis() as u64, "published");
        Ok((hash, replaced))
    }

    /// Lists the files under `dir`. A directory or file that cannot be
    /// read (permissions, a rename during the walk) is left out and logged:
    /// one bad entry must not break every listing.
    fn walk(&self, dir: &str, out: &mut Vec<StoredFile>) -> Result<(), ErrorCode> {
        let entries = match self.root.entries(dir) {
            Ok(e) => e,
            Err(e) if dir.is_empty() => return Err(storage(e)),
            Err(e) => {
                tracing::warn!(error = %e, dir, "left out of the listing: unreadable directory");
                return Ok(());
            }
        };
        for (fname, kind) in entries {
            if fname.starts_with(META) {
                continue;
            }
            let rel = join(dir, &fname);
            if kind == FileType::Directory {
                self.walk(&rel, out)?;
            } else if kind == FileType::RegularFile {
                match self.describe(rel.clone(), &rel) {
                    Ok(f) => out.push(f),
                    // Deleted while we listed: not an error.
                    Err(ErrorCode::NotFound) => {}
                    Err(e) => tracing::warn!(name = rel, error = %e, "left out of the listing"),
                }
            }
        }
        Ok(())
    }
}

/// Removes the partial `rel` and its label; whether the partial was there.
fn drop_partial(root: &Root, rel: &str) -> bool {
    let gone = root.remove_file(rel).is_ok();
    let _ = root.remove_file(&format!("{rel}{LABEL}"));
    gone
}

/// See [`FsStore::sweep_partials`].
fn sweep_partials(root: &Root, limits: PartialLimits) {
    let dir = format!("{META}/partial");
    let now = std::time::SystemTime::now();
    let mut kept: Vec<(i64, u64, String)> = Vec::new();
    let entries = root.entries(&dir).unwrap_or_default();
    let names: HashSet<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    for (name, kind) in &entries {
        let rel = join(&dir, name);
        if let Some(of) = name.strip_suffix(LABEL) {
            // The label of a partial that is gone (looked for again: one
            // may have been renamed in while the directory was read).
            if !names.contains(of) && !root.is_file(&join(&dir, of)) {
                let _ = root.remove_file(&rel);
            }
            continue;
        }
        let Ok(st) = root.stat(&rel) else { continue };
        if *kind != FileType::RegularFile {
            continue;
        }
        let modified = UNIX_EPOCH + std::time::Duration::from_secs(stat_mtime(&st));
        let age = now.duration_since(modified).unwrap_or_default();
        if age > limits.max_age {
            if drop_partial(root, &rel) {
                tracing::info!(
                    partial = rel,
                    age_secs = age.as_secs(),
                    "dropped an interrupted upload: too old"
                );
            }
            continue;
        }
        kept.push((st.st_mtime, st.st_size as u64, rel));
    }
    kept.sort();
    let mut total = kept.iter().fold(0u64, |t, k| t.saturating_add(k.1));
    for (_, size, rel) in kept {
        if total <= limits.max_bytes {
            break;
        }
        if drop_partial(root, &rel) {
            total -= size;
            tracing::info!(
                partial = rel,
                bytes = size,
                "dropped an interrupted upload: partials over --max-partial-bytes"
            );
        }
    }
}

/// Writes an index of the file with metadata `meta` to `rel` (replacing it
/// atomically, synced: a torn index could pair ids with the wrong bytes).
fn write_index(
    root: &Root,
    rel: &str,
    meta: &fs::Metadata,
    tree: &Tree,
    midstates: &[Vec<u8>],
) -> io::Result<()> {
    let tmp = format!("{rel}.tmp{}", TEMP_COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut f = BufWriter::new(root.create_new(&tmp, 0o600)?);
    f.write_all(INDEX_MAGIC)?;
    f.write_all(&meta.len().to_le_bytes())?;
    f.write_all(&mtime_ns(meta).to_le_bytes())?;
    f.write_all(&meta.ino().to_le_bytes())?;
    f.write_all(&ctime_ns(meta).to_le_bytes())?;
    f.write_all(&tree.to_bytes())?;
    // The midstates and their length last: `load_midstates` reads them
    // from the end, `load_summary` and `load_index` ignore them.
    let states = postcard::to_allocvec(midstates).map_err(io::Error::other)?;
    f.write_all(&states)?;
    f.write_all(&(states.len() as u64).to_le_bytes())?;
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    root.rename(&tmp, rel)
}

/// A new version being written (under `.deltasync/upload/`). Dropped
/// without being published (the connection broke), it is kept as the name's
/// partial upload so that the next upload resumes from it.
pub struct TempFile {
    root: Arc<Root>,
    partials: PartialLimits,
    file: Option<BufWriter<File>>,
    /// Started once the new version stops matching the old one's first
    /// bytes (see `start_hasher`).
    hasher: Option<ReadBack<FileHash>>,
    /// The version being replaced, while the new one still starts like it.
    base: Option<HashBase>,
    /// The old version's midstates that also hold for the new one.
    kept_midstates: Vec<Vec<u8>>,
    /// Set when the receiver lets us index a whole new version.
    indexer: Option<ReadBack<FileTree>>,
    path: String,
    /// The file holding the name beside `path` (see [`LABEL`]).
    label: String,
    partial: String,
    /// The version stored when the upload began.
    found: Option<VersionId>,
    /// Published only if `found` is still the version stored.
    conditional: bool,
    written: u64,
    /// Bytes already handed to the kernel's writeback (and to the hasher).
    kicked: u64,
    /// The last write failed for want of space.
    out_of_space: bool,
    /// The time and mode to publish with.
    meta: Option<Meta>,
}

/// Bytes written between two writeback requests (and read-back updates).
const WRITEBACK_STEP: u64 = 4 << 20;

/// The version an upload replaces, as far as hashing the new one goes: the
/// file (by device and inode) and its kept SHA-256 midstates.
struct HashBase {
    dev: u64,
    ino: u64,
    midstates: Vec<Vec<u8>>,
}

/// The whole-file SHA-256 from `pos` on, recording the state at every
/// multiple of [`MIDSTATE_STEP`] (both stores keep them with a version: a
/// new version that starts as the old one does is hashed from there).
pub(crate) struct FileHash {
    sha: Sha256,
    pos: u64,
    midstates: Vec<Vec<u8>>,
}

impl FileHash {
    /// From the start of the file.
    pub(crate) fn new() -> FileHash {
        FileHash { sha: Sha256::new(), pos: 0, midstates: Vec::new() }
    }

    /// Bytes hashed so far (the position in the file).
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// The hash of a file whose first `count` midstates are `kept[..count]`
    /// (another version's, with the same bytes up to there), at the last
    /// of them; `None` if one cannot be read.
    pub(crate) fn resume(kept: &[Vec<u8>], count: usize) -> Option<FileHash> {
        let kept = kept.get(..count)?;
        let sha = match kept.last() {
            Some(s) => Sha256::deserialize(&SerializedState::<Sha256>::try_from(&s[..]).ok()?).ok()?,
            None => Sha256::new(),
        };
        Some(FileHash { sha, pos: count as u64 * MIDSTATE_STEP, midstates: kept.to_vec() })
    }
}

impl Follow for FileHash {
    type Out = (Hash, Vec<Vec<u8>>);
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let to_mark = MIDSTATE_STEP - self.pos % MIDSTATE_STEP;
            let n = to_mark.min(data.len() as u64) as usize;
            self.sha.update(&data[..n]);
            self.pos += n as u64;
            data = &data[n..];
            if self.pos.is_multiple_of(MIDSTATE_STEP) {
                self.midstates.push(self.sha.serialize().to_vec());
            }
        }
    }
    fn done(self) -> (Hash, Vec<Vec<u8>>) {
        (Hash(self.sha.finalize().into()), self.midstates)
    }
}

/// The hash tree (chunk ids and nodes), without the whole-file hash.
struct FileTree(TreeIndexer);

impl Follow for FileTree {
    type Out = Tree;
    fn feed(&mut self, data: &[u8]) {
        self.0.feed(data);
    }
    fn done(self) -> Tree {
        self.0.finish()
    }
}

impl Output for TempFile {
    fn write(&mut self, data: &[u8]) -> Result<(), IoFailed> {
        if !data.is_empty() {
            self.start_hasher().map_err(|_| IoFailed)?;
        }
        let f = self.file.as_mut().ok_or(IoFailed)?;
        if let Err(e) = f.write_all(data) {
            tracing::warn!(error = %e, path = self.path, "write failed");
            self.out_of_space = is_out_of_space(&e);
            return Err(IoFailed);
        }
        self.written += data.len() as u64;
        if self.written - self.kicked >= WRITEBACK_STEP {
            self.start_writeback();
        }
        Ok(())
    }

    fn out_of_space(&self) -> bool {
        self.out_of_space
    }

    fn index_in_background(&mut self, kind: ChunkerKind) -> bool {
        let Some(f) = self.file.as_ref() else { return false };
        let started = f.get_ref().try_clone().and_then(|file| {
            ReadBack::start(file, FileTree(TreeIndexer::without_file_hash(kind)), 0, "file-tree")
        });
        match started {
            Ok(r) => {
                let ready = self.kicked;
                r.ready(ready);
                self.indexer = Some(r);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "indexing on this thread instead");
                false
            }
        }
    }

    /// Copies inside the kernel (`copy_file_range`; on ext4 a page-cache
    /// copy without the round trip through user memory), in steps that keep
    /// the writeback and the read-back threads going as plain writes do.
    #[cfg(target_os = "linux")]
    fn copy_from(&mut self, src: &dyn std::any::Any, offset: u64, len: u64) -> Result<bool, IoFailed> {
        let Some(src) = src.downcast_ref::<File>() else { return Ok(false) };
        if !self.continues_base(src, offset) {
            self.start_hasher().map_err(|_| IoFailed)?;
        }
        let f = self.file.as_mut().ok_or(IoFailed)?;
        if let Err(e) = f.flush() {
            tracing::warn!(error = %e, path = self.path, "write failed");
            self.out_of_space = is_out_of_space(&e);
            return Err(IoFailed);
        }
        let (mut from, end) = (offset, offset + len);
        while from < end {
            let step = (end - from).min(WRITEBACK_STEP) as usize;
            let dst = self.file.as_ref().ok_or(IoFailed)?.get_ref();
            // No offset for the destination: it writes at, and advances,
            // the file position, where the next plain write continues.
            let first = from == offset;
            match deltasync_host::copy_step(src, &mut from, dst, step, first) {
                deltasync_host::CopyStep::Copied(n) => self.written += n as u64,
                // The receiver copies through memory instead.
                deltasync_host::CopyStep::Unsupported => return Ok(false),
                deltasync_host::CopyStep::Failed { error, out_of_space } => {
                    tracing::warn!(%error, path = self.path, "copy failed");
                    self.out_of_space = out_of_space;
                    return Err(IoFailed);
                }
            }
            if self.written - self.kicked >= WRITEBACK_STEP {
                self.start_writeback();
            }
        }
        Ok(true)
    }

    /// The store hashes every byte written (or copied) and refuses to
    /// publish a version whose hash is not the offer's.
    fn hashes_file(&self) -> bool {
        true
    }

    fn finish_tree(&mut self) -> Result<Tree, IoFailed> {
        let failed = |e: io::Error| {
            tracing::warn!(error = %e, "indexing the new version failed");
            IoFailed
        };
        self.file.as_mut().ok_or(IoFailed)?.flush().map_err(failed)?;
        self.indexer.take().ok_or(IoFailed)?.finish(self.written).map_err(failed)
    }
}

impl TempFile {
    /// Whether copying `src` from `offset` keeps the new version identical
    /// to the old one so far: the same bytes at the same place.
    fn continues_base(&self, src: &File, offset: u64) -> bool {
        let Some(b) = &self.base else { return false };
        offset == self.written && src.metadata().is_ok_and(|m| m.dev() == b.dev && m.ino() == b.ino)
    }

    /// Starts hashing the new version, once it stops being a copy of the
    /// old one's first `written` bytes: from the last midstate within them.
    /// Does nothing if the hasher runs already.
    fn start_hasher(&mut self) -> io::Result<()> {
        if self.hasher.is_some() {
            return Ok(());
        }
        let mut midstates = self.base.take().map(|b| b.midstates).unwrap_or_default();
        midstates.truncate((self.written / MIDSTATE_STEP) as usize);
        let sha = match midstates.last() {
            Some(s) => SerializedState::<Sha256>::try_from(&s[..])
                .ok()
                .and_then(|s| Sha256::deserialize(&s).ok())
                .ok_or_else(|| io::Error::other("bad midstate"))?,
            None => Sha256::new(),
        };
        let from = midstates.len() as u64 * MIDSTATE_STEP;
        let file = self.file.as_ref().ok_or_else(|| io::Error::other("closed"))?.get_ref().try_clone()?;
        let h = ReadBack::start(file, FileHash { sha, pos: from, midstates: Vec::new() }, from, "file-hash")?;
        let ready = self.kicked;
        h.ready(ready);
        self.hasher = Some(h);
        self.kept_midstates = midstates;
        Ok(())
    }

    /// Asks the kernel to start writing what we wrote so far, so that the
    /// disk works while the transfer goes on and the final `fsync` (which
    /// still makes the file durable and reports errors) has little left.
    fn start_writeback(&mut self) {
        let Some(f) = self.file.as_mut() else { return };
        if f.flush().is_err() {
            return; // the next write or the final sync reports it
        }
        deltasync_host::start_writeback(f.get_ref(), self.kicked, self.written - self.kicked);
        self.kicked = self.written;
        let ready = self.written;
        if let Some(h) = &self.hasher {
            h.ready(ready);
        }
        if let Some(t) = &self.indexer {
            t.ready(ready);
        }
    }

    fn discard(mut self) {
        self.file = None;
        self.hasher = None;
        self.indexer = None;
        let _ = self.root.remove_file(&self.path);
        let _ = self.root.remove_file(&self.label);
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        self.hasher = None;
        self.indexer = None;
        let Some(f) = self.file.take() else { return };
        let kept =
            self.written > 0 && f.into_inner().is_ok() && self.root.rename(&self.path, &self.partial).is_ok();
        if kept {
            if self.root.rename(&self.label, &format!("{}{LABEL}", self.partial)).is_err() {
                let _ = self.root.remove_file(&self.label);
            }
            tracing::info!(partial = self.partial, bytes = self.written, "kept interrupted upload");
            sweep_partials(&self.root, self.partials);
        } else {
            let _ = self.root.remove_file(&self.path);
            let _ = self.root.remove_file(&self.label);
        }
    }
}

/// What the server needs of a store besides the sessions' [`Store`]:
/// shared by every connection (clones share the files), and some upkeep.
/// Every method may block: call them from blocking threads.
pub trait ServerStore: Store<Reader: Send, Writer: Send> + Clone + Send + Sync + 'static {
    /// Periodic upkeep: drops what interrupted uploads left past their age
    /// or over the quota.
    fn upkeep(&self);
    /// Waits for work the store does in the background (before the process
    /// exits).
    fn settle(&self);
    /// Where the files are (for logs).
    fn location(&self) -> String;
    /// Work to do once the server starts, in the background: learning the
    /// stored files' sketches (see [`Store::resembling`]).
    fn warm(&self) {}
    /// Requests to the storage by kind, and bytes (`bytes_in`,
    /// `bytes_out`), since start: an object store's (for `/metrics`).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

impl ServerStore for FsStore {
    fn upkeep(&self) {
        self.sweep_partials();
    }

    fn settle(&self) {
        self.wait_indexing();
    }

    fn warm(&self) {
        self.index_sketches();
    }

    fn location(&self) -> String {
        self.root().display().to_string()
    }
}

impl Store for FsStore {
    type Reader = FileSource;
    type Writer = TempFile;

    fn open(
        &mut self,
        name: &str,
        chunking: Option<ChunkerKind>,
    ) -> Result<Option<(Tree, FileSource)>, ErrorCode> {
        let rel = self.path_of(name)?;
        let file = match self.root.open_file(&rel).map_err(reach) {
            Ok(f) => f,
            Err(ErrorCode::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let tree = self.tree_of(name, &file, chunking).map_err(storage)?;
        Ok(tree.map(|t| (t, FileSource(file))))
    }

    fn holds(&mut self, name: &str) -> Result<bool, ErrorCode> {
        Ok(self.root.is_file(&self.path_of(name)?) || self.root.is_file(&self.partial_path(name)))
    }

    fn partial(
        &mut self,
        name: &str,
        chunking: ChunkerKind,
    ) -> Result<Option<(Tree, FileSource)>, ErrorCode> {
        let Ok(file) = self.root.open_file(&self.partial_path(name)) else { return Ok(None) };
        if !chunking.suits(file.metadata().map_err(storage)?.len()) {
            return Ok(None);
        }
        let tree = build_tree_unhashed(&file, chunking, self.threads).map_err(storage)?;
        Ok(Some((tree, FileSource(file))))
    }

    fn create(&mut self, name: &str, _size: u64, expect: Option<Expect>) -> Result<TempFile, ErrorCode> {
        let rel = self.path_of(name)?;
        if let Some((dir, _)) = rel.rsplit_once('/') {
            self.root.create_dirs_mode(dir, 0o777).map_err(reach)?;
        }
        // Something other than a file where the name is (a directory):
        // never replaced by an upload.
        let old = match self.root.stat(&rel) {
            Ok(m) if stat_is_file(&m) => Some(m),
            Ok(_) => return Err(ErrorCode::BadName),
            Err(e) => match reach(e) {
                ErrorCode::NotFound => None,
                c => return Err(c),
            },
        };
        let base = old.as_ref().map(VersionId::of_stat);
        if let Some(expect) = expect {
            self.check_expect(name, &rel, base, expect)?;
        }
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = format!("{META}/upload/{}-{}-{n}", name_hash(name), std::process::id());
        // 0666 less the umask: the file others see once it is published.
        let file = self.root.create_new(&tmp, 0o666).map_err(storage)?;
        let label = format!("{tmp}{LABEL}");
        if let Err(e) = write_label(&self.root, &label, name) {
            tracing::warn!(error = %e, name, "could not label an upload: if interrupted, listings leave it out");
        }
        // The version being replaced and its midstates: hashing the new one
        // waits until it differs from it (see `TempFile::start_hasher`).
        let hash_base = old.and_then(|m| {
            let meta = self.root.open_file(&rel).ok()?.metadata().ok()?;
            (meta.ino() == m.st_ino).then(|| HashBase {
                dev: meta.dev(),
                ino: meta.ino(),
                midstates: self.load_midstates(name, &meta),
            })
        });
        Ok(TempFile {
            root: self.root.clone(),
            partials: self.partials,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            hasher: None,
            base: hash_base.filter(|b| !b.midstates.is_empty()),
            kept_midstates: Vec::new(),
            indexer: None,
            path: tmp,
            label,
            partial: self.partial_path(name),
            found: base,
            conditional: expect.is_some(),
            written: 0,
            kicked: 0,
            out_of_space: false,
            meta: None,
        })
    }

    fn create_with(
        &mut self,
        name: &str,
        size: u64,
        expect: Option<Expect>,
        meta: Option<Meta>,
    ) -> Result<TempFile, ErrorCode> {
        let mut w = self.create(name, size, expect)?;
        w.meta = meta;
        Ok(w)
    }

    fn list_dir(&mut self, dir: &str) -> Result<Vec<StoredFile>, ErrorCode> {
        if !dir.is_empty() {
            self.path_of(dir)?;
        }
        let entries = self.root.entries(dir).map_err(|e| match reach(e) {
            // A file there, or a symlink: no such directory.
            ErrorCode::BadName => ErrorCode::NotFound,
            c => c,
        })?;
        let mut out = Vec::with_capacity(entries.len());
        for (fname, kind) in entries {
            let rel = join(dir, &fname);
            if deltasync_core::message::validate_name(&rel).is_err() {
                continue;
            }
            if kind == FileType::Directory {
                let Ok(fd) = self.root.dir(&rel) else { continue };
                let Ok(st) = rustix::fs::fstat(&fd) else { continue };
                out.push(StoredFile {
                    name: rel,
                    modified: st.st_mtime.max(0) as u64,
                    nanos: st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
                    mode: mode_of(&fd, st.st_mode),
                    kind: EntryKind::Dir,
                    ..Default::default()
                });
            } else if kind == FileType::RegularFile {
                match self.describe(rel.clone(), &rel) {
                    Ok(f) => out.push(f),
                    // Deleted while we listed: not there.
                    Err(ErrorCode::NotFound) => {}
                    // Never a listing with a file left out: a tree sync
                    // would take it for gone (and a pull --delete delete
                    // its copy).
                    Err(e) => {
                        tracing::warn!(name = rel, error = %e, "a file could not be described: listing refused");
                        return Err(e);
                    }
                }
            }
        }
        Ok(out)
    }

    fn set_meta(&mut self, name: &str, meta: Meta) -> Result<(), ErrorCode> {
        let rel = self.path_of(name)?;
        let st = self.root.stat(&rel).map_err(reach)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let fd = self.root.dir(&rel).map_err(reach)?;
            return apply_meta(&fd, meta, true).map_err(storage);
        }
        let file = self.root.open_file(&rel).map_err(reach)?;
        let _indexing = self.start_indexing(name);
        let _guard = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        let before = file.metadata().map_err(storage)?;
        // The index stays fresh: only the time changed, not the bytes.
        let index = self.load_index_unwaited(name, &before);
        apply_meta(&file, meta, false).map_err(storage)?;
        if let (Some(tree), Ok(after)) = (index, file.metadata()) {
            let path = self.index_path(name);
            if let Err(e) = write_index(&self.root, &path, &after, &tree, &[]) {
                tracing::warn!(error = %e, index = path, "could not write index");
            }
        }
        Ok(())
    }

    fn make_dir(&mut self, name: &str, meta: Meta) -> Result<bool, ErrorCode> {
        let rel = self.path_of(name)?;
        let made = match self.root.stat(&rel) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => false,
            Ok(_) => return Err(ErrorCode::BadName),
            Err(_) => {
                self.root.create_dirs_mode(&rel, 0o777).map_err(reach)?;
                true
            }
        };
        let fd = self.root.dir(&rel).map_err(reach)?;
        apply_meta(&fd, meta, true).map_err(storage)?;
        Ok(made)
    }

    fn copy(&mut self, from: &str, sha256: Hash, to: &str, meta: Meta) -> Result<Hash, ErrorCode> {
        let (tree, FileSource(src)) = self.open(from, None)?.ok_or(ErrorCode::Conflict)?;
        if tree.summary().file_hash != sha256 {
            return Err(ErrorCode::Conflict);
        }
        let size = tree.summary().size;
        let mut w = self.create_with(to, size, None, Some(meta))?;
        let copied = match w.copy_from(&src, 0, size) {
            Ok(done) => done,
            Err(IoFailed) if w.out_of_space() => return Err(ErrorCode::NoSpace),
            Err(IoFailed) => return Err(ErrorCode::Storage),
        };
        if !copied {
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < size {
                let n = std::os::unix::fs::FileExt::read_at(&src, &mut buf, at).map_err(storage)?;
                if n == 0 {
                    return Err(ErrorCode::Conflict);
                }
                w.write(&buf[..n.min((size - at) as usize)]).map_err(|_| ErrorCode::Storage)?;
                at += n as u64;
            }
        }
        // The copy is checked against the hash like any upload.
        let published = self.finish(to, w, Some(tree))?;
        published.file_hash.ok_or(ErrorCode::Storage)
    }

    fn remove_dir(&mut self, name: &str) -> Result<(), ErrorCode> {
        let rel = self.path_of(name)?;
        self.root.remove_dir(&rel).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => ErrorCode::Conflict,
            Some(libc::ENOTDIR) => ErrorCode::BadName,
            _ => reach(e),
        })
    }

    fn finish(&mut self, name: &str, mut w: TempFile, tree: Option<Tree>) -> Result<Published, ErrorCode> {
        let Some(tree) = tree else {
            let replaced = self.current(&self.path_of(name)?) != Ok(w.found);
            w.discard();
            return Ok(Published { file_hash: None, replaced });
        };
        let temp = w.path.clone();
        let sketch = deltasync_core::tree::sketch(&tree);
        let result = self.publish(name, &mut w, tree);
        if result.is_ok() {
            self.sketches.set(name, &sketch);
        }
        let _ = self.root.remove_file(&w.label);
        if result.is_err() {
            // Whatever step failed, no half-published leftover stays behind
            // (after a successful rename this finds nothing to remove).
            w.file = None;
            let _ = self.root.remove_file(&temp);
        }
        result.map(|(hash, replaced)| Published { file_hash: Some(hash), replaced })
    }

    fn list(&mut self) -> Result<Vec<StoredFile>, ErrorCode> {
        let mut out = Vec::new();
        self.walk("", &mut out)?;
        Ok(out)
    }

    fn stat(&mut self, name: &str) -> Result<StoredFile, ErrorCode> {
        let rel = self.path_of(name)?;
        self.describe(name.to_string(), &rel)
    }

    fn partials(&mut self) -> Result<Vec<PartialFile>, ErrorCode> {
        let dir = format!("{META}/partial");
        let mut out = Vec::new();
        for (hash, kind) in self.root.entries(&dir).map_err(storage)? {
            if kind != FileType::RegularFile || !is_name_hash(&hash) {
                continue;
            }
            let rel = join(&dir, &hash);
            let Ok(st) = self.root.stat(&rel) else { continue };
            match read_label(&self.root, &format!("{rel}{LABEL}"), &hash) {
                Some(name) => {
                    out.push(PartialFile { name, size: st.st_size as u64, modified: stat_mtime(&st) })
                }
                None => tracing::debug!(partial = rel, "an interrupted upload without its name: not listed"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn partial_info(&mut self, name: &str) -> Result<Option<PartialFile>, ErrorCode> {
        self.path_of(name)?;
        match self.root.stat(&self.partial_path(name)) {
            Ok(st) if stat_is_file(&st) => Ok(Some(PartialFile {
                name: name.to_string(),
                size: st.st_size as u64,
                modified: stat_mtime(&st),
            })),
            Ok(_) => Ok(None),
            Err(e) => match reach(e) {
                ErrorCode::NotFound => Ok(None),
                c => Err(c),
            },
        }
    }

    fn delete(&mut self, name: &str) -> Result<(), ErrorCode> {
        let rel = self.path_of(name)?;
        // What an interrupted upload of the name left goes too: `rm` is how
        // a client gives up on it.
        let partial = drop_partial(&self.root, &self.partial_path(name));
        match self.root.stat(&rel) {
            Ok(m) if stat_is_file(&m) => {}
            Ok(_) => return Err(ErrorCode::BadName),
            Err(_) if partial => return Ok(()),
            Err(e) => return Err(reach(e)),
        }
        // Marked, so that no new index of the name is written meanwhile.
        let _indexing = self.start_indexing(name);
        let _guard = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        self.root.remove_file(&rel).map_err(reach)?;
        let _ = self.root.remove_file(&self.index_path(name));
        self.sketches.remove(name);
        Ok(())
    }

    fn resembling(&mut self, sketch: &[u64]) -> Result<Vec<(String, u32)>, ErrorCode> {
        Ok(self.sketches.find(sketch))
    }

    fn may_resemble(&mut self) -> bool {
        !self.sketches.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_on_disk_keep_the_owners_bits_and_let_no_one_else_write() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::create(&path).unwrap();
        let on_disk = |f: &File| f.metadata().unwrap().permissions().mode() & 0o7777;
        for (asked, disk, listed) in
            [(0o644, 0o644, 0o644), (0o777, 0o755, 0o777), (0o444, 0o644, 0o444), (0o4755, 0o755, 0o755)]
        {
            apply_meta(&f, Meta { modified: 1_600_000_000, nanos: 7, mode: asked }, false).unwrap();
            assert_eq!(on_disk(&f), disk, "{asked:o} on disk");
            assert_eq!(mode_of(&f, on_disk(&f)), listed, "{asked:o} listed");
        }
        assert_eq!(f.metadata().unwrap().mtime_nsec(), 7);
    }
    use deltasync_core::Hash;

    #[test]
    fn a_file_changed_behind_the_servers_back_gets_a_fresh_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        let path = dir.path().join("f");
        fs::write(&path, vec![1u8; 100_000]).unwrap();
        assert_eq!(store.stat("f").unwrap().sha256, Hash::of(&vec![1u8; 100_000]));
        assert!(dir.path().join(store.index_path("f")).exists(), "stat builds and keeps the index");

        // Same size, new contents and a different mtime: the index is stale.
        fs::write(&path, vec![2u8; 100_000]).unwrap();
        let f = File::options().write(true).open(&path).unwrap();
        f.set_modified(UNIX_EPOCH + std::time::Duration::from_secs(1_000_000)).unwrap();
        assert_eq!(store.stat("f").unwrap().sha256, Hash::of(&vec![2u8; 100_000]));
        let (tree, _) = store.open("f", Some(ChunkerKind::Cdc)).unwrap().unwrap();
        assert_eq!(tree.summary().file_hash, Hash::of(&vec![2u8; 100_000]));
        assert_eq!(store.list().unwrap().len(), 1, "the metadata directory is not listed");

        // Rewritten in place with the same size and its old mtime put
        // back: only the change time moved, and the index is stale still.
        let old = fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&path, vec![3u8; 100_000]).unwrap();
        File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        assert_eq!(store.stat("f").unwrap().sha256, Hash::of(&vec![3u8; 100_000]));
    }

    #[test]
    fn a_wrong_offered_hash_publishes_nothing_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        fs::write(dir.path().join("f"), b"old").unwrap();
        let mut w = store.create("f", 3, None).unwrap();
        w.write(b"new").unwrap();
        let mut tree = Tree::build(b"new", ChunkerKind::Cdc);
        tree.set_file_hash(Hash::of(b"something else"));
        assert_eq!(store.finish("f", w, Some(tree)), Err(ErrorCode::Integrity));
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "only f and the metadata directory: {names:?}");
        assert!(store.partial("f", ChunkerKind::Cdc).unwrap().is_none());

        // Left to the store, the hash is that of the bytes written.
        let mut w = store.create("f", 3, None).unwrap();
        w.write(b"new").unwrap();
        let mut tree = Tree::build(b"new", ChunkerKind::Cdc);
        tree.set_file_hash(Hash::UNKNOWN);
        assert_eq!(store.finish("f", w, Some(tree)).map(|p| p.file_hash), Ok(Some(Hash::of(b"new"))));
        assert_eq!(store.stat("f").unwrap().sha256, Hash::of(b"new"));
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"new");
    }

    /// Publishes `data` as `name` the way an upload does: copies of the
    /// stored version's ranges `(offset, len)` or fresh bytes, in order.
    /// Returns the reported hash and how many of the old version's
    /// midstates the new one started from.
    fn publish(
        store: &mut FsStore,
        name: &str,
        parts: &[Result<(u64, u64), &[u8]>],
    ) -> (Option<Hash>, usize) {
        let old = File::open(store.root().join(name)).ok();
        let mut w = store.create(name, 0, None).unwrap();
        let mut data = Vec::new();
        for p in parts {
            match *p {
                Ok((offset, len)) => {
                    let old = old.as_ref().unwrap();
                    assert!(w.copy_from(old, offset, len).unwrap(), "copy_file_range works here");
                    let mut buf = vec![0u8; len as usize];
                    std::os::unix::fs::FileExt::read_exact_at(old, &mut buf, offset).unwrap();
                    data.extend_from_slice(&buf);
                }
                Err(bytes) => {
                    w.write(bytes).unwrap();
                    data.extend_from_slice(bytes);
                }
            }
        }
        w.start_hasher().unwrap(); // as `finish` would
        let kept = w.kept_midstates.len();
        let mut tree = Tree::build(&data, ChunkerKind::Cdc);
        tree.set_file_hash(Hash::UNKNOWN);
        (store.finish(name, w, Some(tree)).unwrap().file_hash, kept)
    }

    /// The midstates of `data` computed from its first byte.
    fn midstates_of(data: &[u8]) -> Vec<Vec<u8>> {
        let mut h = FileHash { sha: Sha256::new(), pos: 0, midstates: Vec::new() };
        h.feed(data);
        h.done().1
    }

    #[test]
    fn an_index_written_after_the_answer_is_waited_for_by_its_readers() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        for i in 0..20 {
            let data = deltasync_core::sim::random_bytes(i, 300_000 + i as usize);
            assert_eq!(publish(&mut store, "f", &[Err(&data)]).0, Some(Hash::of(&data)));
            // Read at once, as the client's next request would: the new
            // version's index, not the replaced one's (stale, rebuilt).
            let meta = fs::metadata(dir.path().join("f")).unwrap();
            let tree = store.load_index("f", &meta).expect("the new index, written");
            assert_eq!(tree.summary().file_hash, Hash::of(&data));
            assert_eq!(tree.summary().root, Tree::build(&data, ChunkerKind::Cdc).summary().root);
        }
        store.wait_indexing();
        assert!(store.indexing.0.lock().unwrap().is_empty());
    }

    #[test]
    fn with_every_read_back_thread_busy_the_work_is_done_at_the_end() {
        // As if a thousand uploads held every place.
        let busy = deltasync_host::readback::AllBusy::new();
        let dir = tempfile::tempdir().unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        let step = MIDSTATE_STEP as usize;
        let old = deltasync_core::sim::random_bytes(1, 3 * step + 1000);
        assert_eq!(publish(&mut store, "f", &[Err(&old)]), (Some(Hash::of(&old)), 0));
        let mut new = old.clone();
        new[2 * step + 10..2 * step + 5000].fill(3);
        assert_eq!(publish(&mut store, "f", &[Err(&new)]).0, Some(Hash::of(&new)));
        let meta = fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!(store.load_midstates("f", &meta), midstates_of(&new));
        store.wait_indexing();
        let tree = store.load_index("f", &meta).expect("the index");
        assert_eq!(tree.summary().root, Tree::build(&new, ChunkerKind::Cdc).summary().root);
        assert!(busy.only_these(), "deferred read-back work took a place");
        drop(busy);
    }

    #[test]
    fn a_version_that_starts_like_the_old_one_is_hashed_from_a_midstate() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        let step = MIDSTATE_STEP as usize;
        let old = deltasync_core::sim::random_bytes(1, 3 * step + 1000);
        assert_eq!(publish(&mut store, "f", &[Err(&old)]), (Some(Hash::of(&old)), 0));
        let meta = fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!(store.load_midstates("f", &meta), midstates_of(&old));
        assert_eq!(store.load_midstates("f", &meta).len(), 3);

        // Same first 2.5 steps, then new bytes, then the old tail (moved).
        let cut = 2 * step + step / 2;
        let fresh = deltasync_core::sim::random_bytes(2, 5000);
        let mut new = old[..cut].to_vec();
        new.extend_from_slice(&fresh);
        new.extend_from_slice(&old[cut + 10..]);
        let parts = [
            Ok((0, 1000)),
            Ok((1000, cut as u64 - 1000)),
            Err(&fresh[..]),
            Ok((cut as u64 + 10, (old.len() - cut - 10) as u64)),
        ];
        assert_eq!(publish(&mut store, "f", &parts), (Some(Hash::of(&new)), 2));
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), new);
        let meta = fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!(store.load_midstates("f", &meta), midstates_of(&new));

        // A pure prefix (truncation), an unaligned copy, and a rewrite.
        let parts = [Ok((0, (step + 7) as u64))];
        assert_eq!(publish(&mut store, "f", &parts), (Some(Hash::of(&new[..step + 7])), 1));
        let shifted = [Ok((1, (step + 6) as u64))];
        assert_eq!(publish(&mut store, "f", &shifted), (Some(Hash::of(&new[1..step + 7])), 0));
        let meta = fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!(store.load_midstates("f", &meta), midstates_of(&new[1..step + 7]));
        assert_eq!(publish(&mut store, "f", &[Err(b"x")]), (Some(Hash::of(b"x")), 0));
        // A stale index (the file changed behind our back) offers no midstates.
        fs::write(dir.path().join("f"), &old).unwrap();
        let meta = fs::metadata(dir.path().join("f")).unwrap();
        assert!(store.load_midstates("f", &meta).is_empty());
        assert_eq!(publish(&mut store, "f", &[Ok((0, old.len() as u64))]), (Some(Hash::of(&old)), 0));
    }

    #[test]
    fn a_copy_the_kernel_refuses_leaves_the_file_as_it_was() {
        // An old version on another file system (tmpfs): copy_file_range
        // between two different kinds of file system fails with EXDEV, and
        // the receiver then copies through memory (plain writes).
        let dir = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs)");
        let old_path = shm.path().join("old");
        fs::write(&old_path, b"0123456789").unwrap();
        let old = File::open(&old_path).unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        let mut w = store.create("f", 10, None).unwrap();
        w.write(b"ab").unwrap();
        let fs_kind = |p: &Path| rustix::fs::statfs(p).unwrap().f_type;
        let refused = fs_kind(dir.path()) != fs_kind(shm.path());
        assert_eq!(w.copy_from(&old, 2, 5).unwrap(), !refused);
        if refused {
            assert_eq!(w.written, 2, "a refused copy writes nothing");
            w.write(b"23456").unwrap();
        }
        w.write(b"z").unwrap();
        let mut tree = Tree::build(b"ab23456z", ChunkerKind::Cdc);
        tree.set_file_hash(Hash::UNKNOWN);
        assert_eq!(store.finish("f", w, Some(tree)).map(|p| p.file_hash), Ok(Some(Hash::of(b"ab23456z"))));
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"ab23456z");
    }

    #[test]
    fn every_leftover_is_recovered_or_quarantined_and_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let meta = d.join(META);
        for sub in ["index/d", "partial/x", "upload", "trash/t"] {
            fs::create_dir_all(meta.join(sub)).unwrap();
        }
        let h = |n: &str| name_hash(n);
        // This layout: an upload in progress of `a` (kept), an empty one
        // (dropped), something that is no upload (quarantined).
        fs::write(meta.join(format!("upload/{}-77-1", h("a"))), b"prefix of a").unwrap();
        fs::write(meta.join(format!("upload/{}-77-1.name", h("a"))), b"a").unwrap();
        // A label whose upload is gone, and one of an empty upload.
        fs::write(meta.join(format!("upload/{}-77-9.name", h("q"))), b"q").unwrap();
        fs::write(meta.join(format!("upload/{}-77-2.name", h("e"))), b"e").unwrap();
        // A partial whose label names another name (forged or damaged):
        // kept, but never listed under a name it is not.
        fs::write(meta.join(format!("partial/{}", h("w"))), b"w's bytes").unwrap();
        fs::write(meta.join(format!("partial/{}.name", h("w"))), b"a").unwrap();
        fs::write(meta.join(format!("upload/{}-77-2", h("e"))), b"").unwrap();
        fs::write(meta.join("upload/stray"), b"?").unwrap();
        // The old layout: a partial of `x/y` (under a directory `x`) and an
        // upload of `x` in flight beside it (a file `x` and a directory
        // `x` at once: this stopped the old server from starting).
        fs::write(meta.join("partial/x/y"), b"prefix of x/y").unwrap();
        fs::create_dir_all(d.join("z")).unwrap();
        fs::write(d.join("z/.deltasync-part-123-4-log"), b"prefix of z/log").unwrap();
        fs::write(d.join("z/.deltasync-part-123-5-empty"), b"").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", meta.join("partial/evil")).unwrap();
        // Indexes: one of this layout kept; temporaries and old ones go.
        fs::write(meta.join(format!("index/{}.idx", h("k"))), b"kept").unwrap();
        fs::write(meta.join(format!("index/{}.idx.tmp3", h("k"))), b"t").unwrap();
        fs::write(meta.join("index/d/old.idx"), b"o").unwrap();
        fs::write(meta.join("trash/t/old"), b"o").unwrap();

        let mut store = FsStore::open(d).unwrap();
        let partial = |n: &str| fs::read(d.join(store.partial_path(n))).unwrap();
        assert_eq!(partial("a"), b"prefix of a");
        assert_eq!(partial("x/y"), b"prefix of x/y");
        assert_eq!(partial("z/log"), b"prefix of z/log");
        assert!(store.partial("z/log", ChunkerKind::Cdc).unwrap().is_some());
        assert!(!d.join(store.partial_path("e")).exists() && !d.join(store.partial_path("z/empty")).exists());
        assert!(
            !d.join("z/.deltasync-part-123-4-log").exists()
                && !d.join("z/.deltasync-part-123-5-empty").exists()
        );
        assert_eq!(fs::read(meta.join(format!("index/{}.idx", h("k")))).unwrap(), b"kept");
        assert!(!meta.join(format!("index/{}.idx.tmp3", h("k"))).exists() && !meta.join("index/d").exists());
        assert_eq!(fs::read_dir(meta.join("trash")).unwrap().count(), 0);
        let quarantined: Vec<String> = fs::read_dir(meta.join("quarantine"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(quarantined.len(), 2, "{quarantined:?}");
        assert!(
            quarantined.iter().any(|q| q.ends_with("-stray"))
                && quarantined.iter().any(|q| q.ends_with("-evil"))
        );
        assert!(store.list().unwrap().is_empty());
        // Every partial is listed under its name (labels moved with this
        // layout's uploads, written for the old layout's).
        let listed: Vec<(String, u64)> =
            store.partials().unwrap().into_iter().map(|p| (p.name, p.size)).collect();
        assert_eq!(listed, [("a".into(), 11), ("x/y".into(), 13), ("z/log".into(), 15)]);
        assert_eq!(fs::read_dir(meta.join("upload")).unwrap().count(), 0, "labels without uploads go");
    }

    #[test]
    fn a_metadata_directory_that_is_no_directory_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join(META);
        fs::create_dir_all(&meta).unwrap();
        fs::write(meta.join("index"), b"a file").unwrap();
        std::os::unix::fs::symlink("/tmp", meta.join("upload")).unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        assert!(meta.join("index").is_dir() && fs::symlink_metadata(meta.join("upload")).unwrap().is_dir());
        assert_eq!(fs::read_dir(meta.join("quarantine")).unwrap().count(), 2);
        assert_eq!(publish(&mut store, "f", &[Err(b"x")]).0, Some(Hash::of(b"x")));
    }

    #[test]
    fn the_old_layout_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        drop(FsStore::open(dir.path()).unwrap());
        // Written after the migration: not the old server's, left alone.
        fs::write(dir.path().join(".deltasync-part-1-2-later"), b"p").unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        assert!(dir.path().join(".deltasync-part-1-2-later").exists());
        assert!(!dir.path().join(store.partial_path("later")).exists());
    }

    #[test]
    fn a_second_store_on_the_same_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = FsStore::open(dir.path()).unwrap();
        let second = FsStore::open(dir.path()).unwrap_err().to_string();
        assert!(second.contains("in use by another deltasync-server"), "{second}");
        drop(first);
        FsStore::open(dir.path()).unwrap();
    }

    #[test]
    fn a_name_with_a_255_byte_component_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        let name = format!("{}/{}", "d".repeat(255), "f".repeat(255));
        assert_eq!(publish(&mut store, &name, &[Err(b"data")]).0, Some(Hash::of(b"data")));
        assert_eq!(store.stat(&name).unwrap().size, 4);
        assert_eq!(store.list().unwrap()[0].name, name);
        let longer = format!("{}/{}", "d".repeat(255), "f".repeat(256));
        assert_eq!(store.stat(&longer).unwrap_err(), ErrorCode::BadName);
        assert_eq!(store.create(&longer, 1, None).err(), Some(ErrorCode::BadName));
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_never_leads_outside() {
        // A local process that can write under the root keeps swapping
        // `d` (a directory) and a symlink to a directory outside, atomically
        // (renameat2 RENAME_EXCHANGE), while stats, reads and uploads of
        // names under `d` run. Nothing outside is ever read or written.
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("f"), b"OUTSIDE, SECRET").unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/f"), b"inside").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("swap")).unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, root) = (stop.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) && swaps < 5_000_000 {
                    rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        root.join("d"),
                        rustix::fs::CWD,
                        root.join("swap"),
                        rustix::fs::RenameFlags::EXCHANGE,
                    )
                    .unwrap();
                    swaps += 1;
                }
                swaps
            })
        };
        let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let (mut served, mut uploads) = (0, 0);
        while std::time::Instant::now() < until {
            if let Ok(f) = store.stat("d/f") {
                assert_eq!(f.size, 6, "a stat read the file outside");
                served += 1;
            }
            if let Ok(Some((_, src))) = store.open("d/f", None) {
                let mut buf = Vec::new();
                let mut file = src.0;
                file.read_to_end(&mut buf).unwrap();
                assert_eq!(buf, b"inside", "a download read the file outside");
                served += 1;
            }
            if let Ok(mut w) = store.create("d/up", 2, None) {
                w.write(b"up").unwrap();
                if store.finish("d/up", w, Some(Tree::build(b"up", ChunkerKind::Cdc))).is_ok() {
                    uploads += 1;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        let outside_now: Vec<_> =
            fs::read_dir(outside.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(outside_now, vec![std::ffi::OsString::from("f")], "something was written outside");
        assert_eq!(fs::read(outside.path().join("f")).unwrap(), b"OUTSIDE, SECRET");
        eprintln!("{swaps} swaps; {served} reads and {uploads} uploads got through, all inside");
        assert!(
            swaps > 1000 && served > 0 && uploads > 0,
            "the race did not run: {swaps} {served} {uploads}"
        );
    }

    #[test]
    fn partials_expire_and_the_oldest_go_over_the_quota_and_rm_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let limits = PartialLimits { max_age: std::time::Duration::from_secs(3600), max_bytes: 250 };
        let mut store = FsStore::open_with(dir.path(), limits).unwrap();
        let at = |secs_ago: u64| std::time::SystemTime::now() - std::time::Duration::from_secs(secs_ago);
        // Leave partials as interrupted uploads do, then age them.
        for (name, ago) in [("old", 7200), ("a", 300), ("b", 200), ("c", 100)] {
            let mut w = store.create(name, 100, None).unwrap();
            w.write(&[1u8; 100]).unwrap();
            drop(w);
            let f = File::options().write(true).open(dir.path().join(store.partial_path(name))).unwrap();
            f.set_modified(at(ago)).unwrap();
        }
        store.sweep_partials();
        let has = |store: &FsStore, n: &str| dir.path().join(store.partial_path(n)).exists();
        assert!(!has(&store, "old"), "a partial past its age was kept");
        assert!(!has(&store, "a"), "the oldest partial over the quota was kept");
        assert!(has(&store, "b") && has(&store, "c"));
        let names =
            |store: &mut FsStore| store.partials().unwrap().into_iter().map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(names(&mut store), ["b", "c"]);
        let b = store.partial_info("b").unwrap().unwrap();
        assert_eq!(
            (b.size, b.modified),
            (100, stat_mtime(&store.root.stat(&store.partial_path("b")).unwrap()))
        );
        // rm gives up on an interrupted upload.
        assert_eq!(store.delete("b"), Ok(()));
        assert!(!has(&store, "b"));
        assert_eq!(store.partial_info("b"), Ok(None));
        assert_eq!(store.delete("b"), Err(ErrorCode::NotFound));
        assert_eq!(names(&mut store), ["c"]);
        // Nothing but `c` and its label is left.
        assert_eq!(fs::read_dir(dir.path().join(META).join("partial")).unwrap().count(), 2);
    }

    /// Writes `data` as a new version of `name` through `w` and publishes it.
    fn write_and_finish(
        store: &mut FsStore,
        name: &str,
        mut w: TempFile,
        data: &[u8],
    ) -> Result<Published, ErrorCode> {
        w.write(data).unwrap();
        let tree = Tree::build(data, ChunkerKind::Cdc);
        store.finish(name, w, Some(tree))
    }

    #[test]
    fn a_conditional_upload_publishes_only_over_the_version_it_expects() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        let w = store.create("f", 2, None).unwrap();
        write_and_finish(&mut store, "f", w, b"v1").unwrap();
        let v1 = Expect::Match(Hash::of(b"v1"));
        assert_eq!(
            store.create("f", 2, Some(Expect::Match(Hash::of(b"v0")))).err(),
            Some(ErrorCode::Conflict)
        );
        assert_eq!(store.create("f", 2, Some(Expect::Absent)).err(), Some(ErrorCode::Conflict));
        assert_eq!(store.create("g", 2, Some(v1)).err(), Some(ErrorCode::Conflict));
        // Two writers expect v1; the first to finish wins, the other is
        // refused and its version goes.
        let slow = store.create("f", 2, Some(v1)).unwrap();
        let fast = store.create("f", 2, Some(v1)).unwrap();
        let won = write_and_finish(&mut store, "f", fast, b"v2").unwrap();
        assert_eq!(won, Published { file_hash: Some(Hash::of(b"v2")), replaced: false });
        assert_eq!(write_and_finish(&mut store, "f", slow, b"v3"), Err(ErrorCode::Conflict));
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"v2");
        // A plain upload over a version stored meanwhile wins, and says so.
        let plain = store.create("f", 2, None).unwrap();
        let other = store.create("f", 2, None).unwrap();
        write_and_finish(&mut store, "f", other, b"v4").unwrap();
        let r = write_and_finish(&mut store, "f", plain, b"v5").unwrap();
        assert_eq!(r, Published { file_hash: Some(Hash::of(b"v5")), replaced: true });
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"v5");
        // A file changed in place behind the server's back is another version.
        let expecting = store.create("f", 2, Some(Expect::Match(Hash::of(b"v5")))).unwrap();
        fs::write(dir.path().join("f"), b"hand-edited").unwrap();
        assert_eq!(write_and_finish(&mut store, "f", expecting, b"v6"), Err(ErrorCode::Conflict));
        // Expecting none: a file made meanwhile (even behind the server's
        // back) is never replaced.
        let absent = store.create("g", 2, Some(Expect::Absent)).unwrap();
        fs::write(dir.path().join("g"), b"theirs").unwrap();
        assert_eq!(write_and_finish(&mut store, "g", absent, b"mine"), Err(ErrorCode::Conflict));
        assert_eq!(fs::read(dir.path().join("g")).unwrap(), b"theirs");
        let absent = store.create("h", 2, Some(Expect::Absent)).unwrap();
        assert!(write_and_finish(&mut store, "h", absent, b"hh").is_ok());
        // Nothing is left of the refused uploads: no temporary, no label, no partial.
        for sub in ["upload", "partial"] {
            assert_eq!(fs::read_dir(dir.path().join(META).join(sub)).unwrap().count(), 0, "{sub}");
        }
    }

    #[test]
    fn a_fifo_is_no_file_and_blocks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            dir.path().join("pipe"),
            rustix::fs::Mode::from_raw_mode(0o666),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut s = store.clone();
        std::thread::spawn(move || {
            let _ = tx.send((s.stat("pipe"), s.open("pipe", None).map(|o| o.is_some())));
        });
        let (stat, open) =
            rx.recv_timeout(std::time::Duration::from_secs(5)).expect("a FIFO blocked the store");
        assert_eq!(stat.unwrap_err(), ErrorCode::NotFound);
        assert_eq!(open.unwrap_err(), ErrorCode::BadName);
    }

    #[test]
    fn the_metadata_directory_must_be_ours_and_is_held_by_descriptor() {
        // Writable by others, or someone else's: refused.
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(META)).unwrap();
        fs::set_permissions(dir.path().join(META), std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let e = FsStore::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("writable by nobody else"), "{e}");
        if rustix::process::geteuid().is_root() {
            fs::set_permissions(dir.path().join(META), std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
            rustix::fs::chown(dir.path().join(META), Some(rustix::process::Uid::from_raw(65534)), None)
                .unwrap();
            let e = FsStore::open(dir.path()).unwrap_err().to_string();
            assert!(e.contains("must belong to this user"), "{e}");
        }
        // Renamed away while the server runs, with another put in its
        // place: the server keeps using its own.
        let dir = tempfile::tempdir().unwrap();
        let mut store = FsStore::open(dir.path()).unwrap();
        fs::rename(dir.path().join(META), dir.path().join("moved")).unwrap();
        fs::create_dir_all(dir.path().join(META).join("upload")).unwrap();
        let mut w = store.create("f", 2, None).unwrap();
        w.write(b"ok").unwrap();
        assert!(store.finish("f", w, Some(Tree::build(b"ok", ChunkerKind::Cdc))).is_ok());
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"ok");
        assert_eq!(fs::read_dir(dir.path().join(META).join("upload")).unwrap().count(), 0);
        store.wait_indexing();
        assert!(
            dir.path().join("moved").join(store.index_path("f").trim_start_matches(".deltasync/")).exists()
        );
    }
}
