//! Tree syncs over one connection: `push` a local directory to a prefix on
//! the server, `pull` a prefix into a local directory. Core's [`Plan`]
//! decides what to send, copy, touch, make and delete; this shell lists
//! and hashes local files, runs the protocol's machines, and writes here.
//!
//! Symlinks are never followed nor sent: they are skipped with a warning on
//! both sides (a pull never writes through one). Names that are not UTF-8,
//! or that the server would refuse, are skipped the same way. Excludes
//! (`--exclude` and a `.deltasyncignore` at the local tree's root, both in
//! gitignore syntax) apply to both sides: an excluded name is neither sent
//! nor deleted. The ignore file itself stays local, like every name that
//! starts with `.deltasync` (the server keeps those for itself).

use crate::{ClientError, Connection, LocalOut, Progress, RemoveOnDrop, Sending, set_local_meta};
use deltasync_core::Hash;
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::batch::{Batch, Listings};
use deltasync_core::conn::fetch::FetchBatch;
use deltasync_core::conn::put::{PutBatch, PutFile, PutResult};
use deltasync_core::conn::server::{Direction, StoredFile};

use deltasync_core::error::ErrorCode;
use deltasync_core::message::CAP_ZSTD;
use deltasync_core::message::{Entry, EntryKind, MODE_BITS, Meta, validate_name};
use deltasync_core::plan::{Op, Options, Plan, Step};
use deltasync_host::local::now;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The file at a local tree's root that lists what to exclude.
pub const IGNORE_FILE: &str = ".deltasyncignore";

/// What a tree sync is asked to do.
#[derive(Clone, Debug, Default)]
pub struct TreeOptions {
    /// Delete what the destination has and the source does not.
    pub delete: bool,
    /// Compare contents even where size and time agree.
    pub checksum: bool,
    /// Only say what would change.
    pub dry_run: bool,
    /// Gitignore-style patterns to leave out, beside the tree's
    /// [`IGNORE_FILE`].
    pub excludes: Vec<String>,
}

/// What a tree sync did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TreeReport {
    /// Files in the source.
    pub files: u64,
    /// Files sent, new or changed.
    pub changed: u64,
    /// Files copied from another name on the destination (no file data).
    pub copied: u64,
    /// Files and directories whose time or mode only was set.
    pub touched: u64,
    /// Files already up to date.
    pub unchanged: u64,
    /// Files and directories deleted.
    pub deleted: u64,
    /// Directories made.
    pub made_dirs: u64,
    /// Names skipped (symlinks, names the server refuses, a file on one
    /// side that is a directory on the other).
    pub skipped: u64,
    /// Operations that failed (the rest went on).
    pub failed: u64,
    /// Sizes of the files sent.
    pub file_bytes: u64,
    /// File bytes that crossed the wire (before compression).
    pub literal_bytes: u64,
    /// Bytes sent on the connection.
    pub wire_bytes_sent: u64,
    /// Bytes received on the connection.
    pub wire_bytes_received: u64,
    /// Wall time.
    pub duration_ms: u64,
    /// Nothing was changed: this says what would have been.
    pub dry_run: bool,
}

/// One thing a tree sync did, as it happens (for listings and logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A file sent (or fetched): its name and size.
    Sent(String, u64),
    /// A file copied on the destination from another name.
    Copied {
        /// The name copied from.
        from: String,
        /// The new name.
        to: String,
    },
    /// A time or mode set.
    Touched(String),
    /// A directory made.
    MadeDir(String),
    /// A file or directory deleted.
    Deleted(String),
    /// A name left alone, and why.
    Skipped(String, &'static str),
    /// An operation that failed, and why (the sync went on).
    Failed(String, String),
}

/// What a tree sync reports as it goes.
pub trait Observer {
    /// Something happened.
    fn change(&mut self, change: &Change);
    /// Progress of the file being sent, and of the whole sync: bytes of the
    /// source's files done so far (sent, or found to need no data).
    fn progress(&mut self, file: &str, p: Progress, tree_bytes: u64);
}

/// An observer that ignores everything.
impl Observer for () {
    fn change(&mut self, _: &Change) {}
    fn progress(&mut self, _: &str, _: Progress, _: u64) {}
}

/// Excludes: patterns and the tree's ignore file.
struct Filter(Gitignore);

impl Filter {
    fn new(root: &Path, excludes: &[String]) -> Result<Filter, ClientError> {
        let mut b = GitignoreBuilder::new(root);
        let file = root.join(IGNORE_FILE);
        if file.is_file()
            && let Some(e) = b.add(&file)
        {
            return Err(ClientError::Local(file, io::Error::other(e.to_string())));
        }
        for x in excludes {
            b.add_line(None, x).map_err(|e| ClientError::Usage(format!("--exclude {x:?}: {e}")))?;
        }
        b.build().map(Filter).map_err(|e| ClientError::Usage(e.to_string()))
    }

    fn excludes(&self, rel: &str, dir: bool) -> bool {
        self.0.matched_path_or_any_parents(rel, dir).is_ignore()
    }
}

/// `a/b` from `a` and `b`; `b` if `a` is empty.
fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

/// A tree sync in progress: the connection, both roots, and what it found.
struct Sync<'c, O> {
    conn: &'c mut Connection,
    root: PathBuf,
    prefix: String,
    options: TreeOptions,
    filter: Filter,
    report: TreeReport,
    observer: O,
    /// A pull (the local tree is the destination).
    pull: bool,
    /// Bytes of files sent so far.
    decided: u64,
    /// Bytes of files that need no data, as the plan last said.
    settled: u64,
    /// Directories made or re-moded by a pull, given their mode last (a
    /// read-only directory is filled first).
    dir_modes: Vec<(String, Meta)>,
}

/// Pushes the local tree `root` to `prefix` on the server (`""`: the
/// server's root).
pub fn push(
    conn: &mut Connection,
    root: &Path,
    prefix: &str,
    options: TreeOptions,
    observer: impl Observer,
) -> Result<TreeReport, ClientError> {
    let plan = Plan::new(Direction::Upload, plan_options(&options));
    run(conn, root, prefix, options, observer, plan)
}

/// Pulls `prefix` on the server (`""`: everything) into the local tree
/// `root`, made if missing.
pub fn pull(
    conn: &mut Connection,
    prefix: &str,
    root: &Path,
    options: TreeOptions,
    observer: impl Observer,
) -> Result<TreeReport, ClientError> {
    if !options.dry_run {
        fs::create_dir_all(root).map_err(|e| ClientError::Local(root.into(), e))?;
    }
    let plan = Plan::new(Direction::Download, plan_options(&options));
    run(conn, root, prefix, options, observer, plan)
}

fn plan_options(o: &TreeOptions) -> Options {
    Options { delete: o.delete, checksum: o.checksum }
}

fn run<O: Observer>(
    conn: &mut Connection,
    root: &Path,
    prefix: &str,
    options: TreeOptions,
    observer: O,
    mut plan: Plan,
) -> Result<TreeReport, ClientError> {
    let direction = plan.direction();
    let start = Instant::now();
    let prefix = prefix.trim_matches('/').to_string();
    if !prefix.is_empty() {
        validate_name(&prefix).map_err(ClientError::Refused)?;
    }
    let meta = fs::symlink_metadata(root).map_err(|e| ClientError::Local(root.into(), e));
    match meta {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ClientError::Local(root.into(), io::Error::other("not a directory"))),
        Err(_) if options.dry_run && direction == Direction::Download => {}
        Err(e) => return Err(e),
    }
    let (s0, r0) = conn.wire_bytes();
    let filter = Filter::new(root, &options.excludes)?;
    let mut sync = Sync {
        conn,
        root: root.to_path_buf(),
        prefix,
        report: TreeReport { dry_run: options.dry_run, ..TreeReport::default() },
        options,
        filter,
        observer,
        pull: direction == Direction::Download,
        decided: 0,
        settled: 0,
        dir_modes: Vec::new(),
    };
    loop {
        match plan.next_step() {
            Step::List(dirs) => {
                let on_server: Vec<&str> = dirs.iter().filter(|d| d.remote).map(|d| d.dir.as_str()).collect();
                let mut remote = sync.list_remote(&on_server)?.into_iter();
                for d in &dirs {
                    let l = if d.local { sync.list_local(&d.dir)? } else { Vec::new() };
                    let r = if d.remote { remote.next().unwrap_or_default() } else { Vec::new() };
                    plan.listed(l, r);
                }
            }
            Step::Hash { name } => {
                let h = File::open(sync.local(&name))
                    .and_then(|f| deltasync_host::build::file_hash(&f))
                    .map_err(|e| sync.failed(&name, &e.to_string()))
                    .ok();
                plan.hashed(&name, h);
            }
            Step::Ops(ops) => sync.ops(direction, ops)?,
            Step::Transfer { file, base } => sync.transfer(direction, file, base)?,
            Step::Transfers(files) if direction == Direction::Upload && !sync.options.dry_run => {
                sync.send_small(files)?
            }
            Step::Transfers(files) if !sync.options.dry_run => {
                // A pull: files this side lacks come without waiting
                // between them; a delta needs its own exchange.
                let (fresh, changed): (Vec<_>, Vec<_>) =
                    files.into_iter().partition(|(_, base)| base.is_none());
                sync.fetch_small(fresh.into_iter().map(|(f, _)| f).collect())?;
                for (file, base) in changed {
                    sync.transfer(direction, file, base)?;
                }
            }
            Step::Transfers(files) => {
                for (file, base) in files {
                    sync.transfer(direction, file, base)?;
                }
            }
            Step::Clash { name } => sync.skip(&name, "a file on one side, a directory on the other"),
            Step::Done => break,
        }
        // Files that need no data count as done once decided.
        let settled = plan.counts().settled_bytes;
        if settled != sync.settled {
            sync.settled = settled;
            sync.observer.progress("", Progress::default(), sync.decided + settled);
        }
    }
    // Directory modes last, deepest first: a read-only one was filled.
    let dir_modes = std::mem::take(&mut sync.dir_modes);
    for (rel, meta) in dir_modes.into_iter().rev() {
        let path = sync.local(&rel);
        let mode = fs::Permissions::from_mode(meta.mode & MODE_BITS);
        if let Err(e) = sync.real_dirs(&rel, true).and_then(|()| fs::set_permissions(&path, mode)) {
            sync.report.failed += 1;
            sync.observer.change(&Change::Failed(path.display().to_string(), e.to_string()));
        }
    }
    let counts = plan.counts();
    let (s1, r1) = sync.conn.wire_bytes();
    let r = &mut sync.report;
    r.files = counts.files;
    r.unchanged = counts.unchanged;
    r.made_dirs = counts.made_dirs;
    r.skipped += counts.clashes;
    r.wire_bytes_sent = s1 - s0;
    r.wire_bytes_received = r1 - r0;
    r.duration_ms = start.elapsed().as_millis() as u64;
    Ok(sync.report)
}

impl<O: Observer> Sync<'_, O> {
    /// The local path of `rel`.
    fn local(&self, rel: &str) -> PathBuf {
        if rel.is_empty() { self.root.clone() } else { self.root.join(rel) }
    }

    /// The server's name of `rel`.
    fn remote(&self, rel: &str) -> String {
        join(&self.prefix, rel)
    }

    /// Checks that every directory from the root down to `rel`'s parent
    /// (and `rel` itself, with `itself`) is a real directory: nothing is
    /// read or written through a symlink, wherever one was planted.
    fn real_dirs(&self, rel: &str, itself: bool) -> io::Result<()> {
        let mut parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
        if !itself {
            parts.pop();
        }
        let mut p = self.root.clone();
        for c in parts {
            p.push(c);
            if !fs::symlink_metadata(&p)?.is_dir() {
                return Err(io::Error::other("a symlink or a file is in the way"));
            }
        }
        Ok(())
    }

    /// Whether a pull may write file `rel` at `path`: no symlink on the
    /// way, and nothing but a regular file there (opening a FIFO would
    /// block). If not, it is reported as failed or skipped.
    fn may_write(&mut self, rel: &str, path: &Path) -> bool {
        if let Err(e) = self.real_dirs(rel, false) {
            self.failed(rel, &e.to_string());
            return false;
        }
        if fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
            self.skip(rel, "not a regular file here");
            return false;
        }
        true
    }

    fn skip(&mut self, name: &str, why: &'static str) {
        self.report.skipped += 1;
        self.observer.change(&Change::Skipped(name.into(), why));
    }

    fn failed(&mut self, name: &str, why: &str) {
        self.report.failed += 1;
        self.observer.change(&Change::Failed(name.into(), why.into()));
    }

    /// The entries of the local directory `dir` that take part.
    fn list_local(&mut self, dir: &str) -> Result<Vec<StoredFile>, ClientError> {
        let path = self.local(dir);
        // A directory reached through a symlink is not this tree's.
        if let Err(e) = self.real_dirs(dir, true) {
            if e.kind() != io::ErrorKind::NotFound {
                self.skip(dir, "a symlink (not followed)");
            }
            return Ok(Vec::new());
        }
        let rd = match fs::read_dir(&path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ClientError::Local(path, e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| ClientError::Local(path.clone(), e))?;
            let Some(fname) = entry.file_name().to_str().map(str::to_string) else {
                let shown = path.join(entry.file_name()).display().to_string();
                self.skip(&shown, "its name is not UTF-8");
                continue;
            };
            let rel = join(dir, &fname);
            // Our own temporaries and the ignore file (names the server
            // keeps for itself: `.deltasync*` is never stored).
            if fname.starts_with(".deltasync") {
                continue;
            }
            // Not followed: a symlink's own metadata.
            let Ok(meta) = entry.metadata() else { continue };
            let kind = if meta.is_dir() {
                EntryKind::Dir
            } else if meta.is_file() {
                EntryKind::File
            } else {
                if !self.filter.excludes(&rel, false) {
                    let why =
                        if meta.is_symlink() { "a symlink (not followed)" } else { "not a regular file" };
                    self.skip(&rel, why);
                }
                continue;
            };
            if self.filter.excludes(&rel, kind == EntryKind::Dir) {
                continue;
            }
            if validate_name(&self.remote(&rel)).is_err() {
                self.skip(&rel, "a name the server refuses");
                continue;
            }
            out.push(StoredFile {
                name: rel,
                size: if kind == EntryKind::File { meta.len() } else { 0 },
                modified: meta.mtime().max(0) as u64,
                nanos: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
                mode: meta.mode() & MODE_BITS,
                kind,
                sha256: Hash::UNKNOWN,
                ..StoredFile::default()
            });
        }
        Ok(out)
    }

    /// The entries of the server's directories `dirs` that take part (for
    /// each, empty if the server has none there), asked for all at once.
    /// The server is checked: every name must be a child of its directory
    /// that the server itself would accept.
    fn list_remote(&mut self, dirs: &[&str]) -> Result<Vec<Vec<StoredFile>>, ClientError> {
        let remote: Vec<String> = dirs.iter().map(|d| self.remote(d)).collect();
        let names: Vec<&str> = remote.iter().map(String::as_str).collect();
        let mut out: Vec<Vec<StoredFile>> = vec![Vec::new(); dirs.len()];
        let mut bad = None;
        let prefix = self.prefix.clone();
        let on_entry = |i: usize, e: Entry<'_>| match child_of(&prefix, dirs[i], &e) {
            Some(f) => out[i].push(f),
            None => bad = Some((e.name.to_string(), names[i].to_string())),
        };
        let mut q = Listings::new(&names, self.conn.version(), on_entry, now());
        let results = self.conn.run(&mut q, "", |_, _| {})?;
        if let Some((name, dir)) = bad {
            return Err(ClientError::Protocol(format!(
                "the server listed {name:?} in {dir:?}: not a name there"
            )));
        }
        for (r, dir) in results.into_iter().zip(dirs) {
            match r {
                // Nothing there yet: a push makes it. A pull of a prefix
                // the server does not have is an error (with --delete it
                // would empty the local directory).
                Err(ErrorCode::NotFound) if self.pull && dir.is_empty() => {
                    return Err(ClientError::NotFound(self.prefix.clone()));
                }
                Ok(()) | Err(ErrorCode::NotFound) => {}
                Err(code) => return Err(ClientError::Refused(code)),
            }
        }
        for files in &mut out {
            files.retain(|f| !self.filter.excludes(&f.name, f.kind == EntryKind::Dir));
        }
        Ok(out)
    }

    /// Makes `ops` on the destination.
    fn ops(&mut self, direction: Direction, ops: Vec<Op>) -> Result<(), ClientError> {
        if self.options.dry_run {
            for op in &ops {
                self.tell(op);
            }
            return Ok(());
        }
        if direction == Direction::Download {
            for op in ops {
                match (self.local_op(&op), op) {
                    (Ok(()), op) => self.tell(&op),
                    // The copy's source changed: fetched after all.
                    (Err(e), Op::Copy { to, meta, .. }) if e.kind() == io::ErrorKind::InvalidData => {
                        let file = StoredFile { name: to, ..StoredFile::default() };
                        self.fetch(file, meta, None)?;
                    }
                    (Err(e), op) => self.failed(op.name(), &e.to_string()),
                }
            }
            return Ok(());
        }
        let remote: Vec<Op> = ops.iter().map(|op| self.remote_op(op)).collect();
        let mut results = Vec::with_capacity(ops.len());
        let mut batch = Batch::new(remote, self.conn.version(), |_: &Op, r| results.push(r), now());
        self.conn.run(&mut batch, "", |_, _| {})?;
        for (op, r) in ops.iter().zip(results) {
            match (op, r) {
                (_, Ok(())) => self.tell(op),
                // The copy's source changed or went meanwhile: sent after all.
                (Op::Copy { to, meta, .. }, Err(ErrorCode::Conflict | ErrorCode::NotFound)) => {
                    let local = self.local(to);
                    let size = fs::metadata(&local).map_or(0, |m| m.len());
                    let file = StoredFile { name: to.clone(), size, ..StoredFile::default() };
                    self.send(file, *meta, None)?;
                }
                (_, Err(code)) => self.failed(op.name(), &code.to_string()),
            }
        }
        Ok(())
    }

    fn tell(&mut self, op: &Op) {
        let change = match op {
            Op::MakeDir { name, .. } => Change::MadeDir(name.clone()),
            Op::Copy { from, to, .. } => {
                self.report.copied += 1;
                Change::Copied { from: from.clone(), to: to.clone() }
            }
            Op::SetMeta { name, .. } => {
                self.report.touched += 1;
                Change::Touched(name.clone())
            }
            Op::Delete { name, .. } => {
                self.report.deleted += 1;
                Change::Deleted(name.clone())
            }
        };
        self.observer.change(&change);
    }

    /// `op` with the server's names.
    fn remote_op(&self, op: &Op) -> Op {
        match op.clone() {
            Op::MakeDir { name, meta } => Op::MakeDir { name: self.remote(&name), meta },
            Op::Copy { from, sha256, to, meta } => {
                Op::Copy { from: self.remote(&from), sha256, to: self.remote(&to), meta }
            }
            Op::SetMeta { name, meta, kind } => Op::SetMeta { name: self.remote(&name), meta, kind },
            Op::Delete { name, kind } => Op::Delete { name: self.remote(&name), kind },
        }
    }

    /// Makes `op` in the local tree (a pull). Nothing is written through a
    /// symlink: one in the way fails the op.
    fn local_op(&mut self, op: &Op) -> io::Result<()> {
        let path = self.local(op.name());
        self.real_dirs(op.name(), false)?;
        if let Op::Copy { from, .. } = op {
            self.real_dirs(from, false)?;
        }
        if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(io::Error::other("a symlink is in the way"));
        }
        match op {
            Op::MakeDir { meta, .. } => {
                match fs::create_dir(&path) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
                    r => r?,
                }
                self.dir_modes.push((op.name().to_string(), *meta));
            }
            Op::SetMeta { meta, kind: EntryKind::Dir, name } => self.dir_modes.push((name.clone(), *meta)),
            Op::SetMeta { meta, .. } => set_local_meta(&File::open(&path)?, *meta)?,
            Op::Copy { from, sha256, to, meta } => {
                let tmp = self.local(&temp_name(to));
                fs::copy(self.local(from), &tmp)?;
                // The file copied from may have changed since it was
                // hashed (fetched over in this sync, say): only a copy
                // with the content asked for is kept.
                let done = File::open(&tmp).and_then(|f| {
                    if deltasync_host::build::file_hash(&f)? != *sha256 {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "copy source changed"));
                    }
                    set_local_meta(&f, *meta)?;
                    fs::rename(&tmp, &path)
                });
                if done.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                done?;
            }
            Op::Delete { kind: EntryKind::Dir, .. } => fs::remove_dir(&path)?,
            Op::Delete { .. } => fs::remove_file(&path)?,
        }
        Ok(())
    }

    /// Sends `file` (push) or fetches it (pull).
    fn transfer(
        &mut self,
        direction: Direction,
        file: StoredFile,
        base: Option<StoredFile>,
    ) -> Result<(), ClientError> {
        let meta = file.meta();
        if self.options.dry_run {
            self.report.changed += 1;
            self.report.file_bytes += file.size;
            self.observer.change(&Change::Sent(file.name.clone(), file.size));
            return Ok(());
        }
        match direction {
            Direction::Upload => self.send(file, meta, base),
            Direction::Download => {
                let kind = Some(file.chunking);
                self.fetch(file, meta, kind)
            }
        }
    }

    /// Whether a failed transfer leaves the rest of the sync able to go on
    /// (a local file that went, a name refused), or ends it (the
    /// connection is gone).
    fn survivable(e: &ClientError) -> bool {
        matches!(
            e,
            ClientError::Local(..)
                | ClientError::Refused(_)
                | ClientError::NotFound(_)
                | ClientError::Integrity(_)
        )
    }

    /// Sends small files without waiting for the server between them, in
    /// groups of at most [`PUT_BUDGET`] bytes read at once.
    fn send_small(&mut self, files: Vec<(StoredFile, Option<StoredFile>)>) -> Result<(), ClientError> {
        let mut files = files.into_iter().peekable();
        while files.peek().is_some() {
            let (mut group, mut bytes, mut sources) = (Vec::new(), 0u64, Vec::new());
            while let Some((file, base)) = files.next_if(|_| bytes < PUT_BUDGET) {
                let data = match fs::read(self.local(&file.name)) {
                    Ok(d) => d,
                    Err(e) => {
                        self.failed(&file.name, &e.to_string());
                        continue;
                    }
                };
                bytes += data.len() as u64;
                let size = data.len() as u64;
                group.push(PutFile {
                    name: self.remote(&file.name),
                    data,
                    meta: file.meta(),
                    kind: ChunkerKind::keep_or_choose(base.as_ref().map(|b| b.chunking), size),
                    // A delta against a far larger version is not worth
                    // its leaves: sent whole.
                    base: base.as_ref().is_some_and(|b| b.size <= 4 * deltasync_core::conn::put::PUT_MAX),
                });
                sources.push((file, base));
            }
            let mut results = Vec::with_capacity(group.len());
            let (salt, version, compress) =
                (self.conn.salt, self.conn.version(), self.conn.caps & CAP_ZSTD != 0);
            let mut batch = PutBatch::new(
                group,
                salt,
                version,
                compress,
                |_: &PutFile, r: PutResult| results.push(r),
                now(),
            );
            let start = self.decided + self.settled;
            let observer = &mut self.observer;
            self.conn.run(&mut batch, "", |b, _| {
                observer.progress("", Progress::default(), start + b.covered());
            })?;
            for ((file, base), (r, literal)) in sources.into_iter().zip(results) {
                match r {
                    Ok(_) => self.finish_transfer(file, Ok(literal))?,
                    // What the delta was against changed meanwhile: sent
                    // on its own after all.
                    Err(ErrorCode::Conflict) => {
                        let meta = file.meta();
                        self.send(file, meta, base)?;
                    }
                    Err(code) => self.finish_transfer(file, Err(ClientError::Refused(code)))?,
                }
            }
        }
        Ok(())
    }

    /// Fetches files this side lacks without waiting for the server
    /// between them, [`FETCH_GROUP`] at a time; each is written beside its
    /// place and renamed there once whole and verified.
    fn fetch_small(&mut self, files: Vec<StoredFile>) -> Result<(), ClientError> {
        let mut files = files.into_iter().peekable();
        while files.peek().is_some() {
            let (mut group, mut outs, mut guards, mut names) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for file in files.by_ref().take(FETCH_GROUP) {
                let path = self.local(&file.name);
                if !self.may_write(&file.name, &path) {
                    continue;
                }
                let tmp = self.local(&temp_name(&file.name));
                match File::create(&tmp) {
                    Ok(f) => {
                        outs.push(LocalOut::new(std::io::BufWriter::with_capacity(64 << 10, f), false));
                        guards.push(RemoveOnDrop(Some(tmp.clone())));
                        names.push(self.remote(&file.name));
                        group.push((file, path, tmp));
                    }
                    Err(e) => self.failed(&file.name, &e.to_string()),
                }
            }
            if group.is_empty() {
                continue;
            }
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let mut results: Vec<Option<Result<LocalOut, ErrorCode>>> =
                (0..group.len()).map(|_| None).collect();
            let mut batch = FetchBatch::new(
                &refs,
                outs,
                self.conn.version(),
                |i, r| results[i] = Some(r.map(|(w, _)| w)),
                now(),
            );
            self.conn.run(&mut batch, "", |_, _| {})?;
            drop(batch);
            for (((file, path, tmp), r), guard) in group.into_iter().zip(results).zip(guards) {
                let literal = file.size;
                let done = match r {
                    Some(Ok(out)) => out
                        .file
                        .into_inner()
                        .map_err(|e| e.into_error())
                        .and_then(|f| {
                            set_local_meta(&f, file.meta())?;
                            f.sync_all()?;
                            fs::rename(&tmp, &path)
                        })
                        .map_err(|e| ClientError::Local(path.clone(), e)),
                    Some(Err(code)) => Err(ClientError::Refused(code)),
                    None => Err(ClientError::Protocol("no answer".into())),
                };
                drop(guard);
                self.finish_transfer(file, done.map(|()| literal))?;
            }
        }
        Ok(())
    }

    fn send(&mut self, file: StoredFile, meta: Meta, base: Option<StoredFile>) -> Result<(), ClientError> {
        let path = self.local(&file.name);
        let remote = self.remote(&file.name);
        let how = Sending { meta: Some(meta), listed: Some(base.map(|b| b.chunking)), expect: None };
        let decided = self.decided + self.settled;
        let name = file.name.clone();
        let observer = &mut self.observer;
        let r = self.conn.upload_with(&path, &remote, how, |p| observer.progress(&name, p, decided + p.done));
        self.finish_transfer(file, r.map(|r| r.literal_bytes))
    }

    /// Fetches `file` (chunked as `kind` on the server, if a listing said;
    /// else the download asks).
    fn fetch(&mut self, file: StoredFile, meta: Meta, kind: Option<ChunkerKind>) -> Result<(), ClientError> {
        let path = self.local(&file.name);
        if !self.may_write(&file.name, &path) {
            return Ok(());
        }
        let remote = self.remote(&file.name);
        let decided = self.decided + self.settled;
        let name = file.name.clone();
        let observer = &mut self.observer;
        let r = self.conn.download_with(&remote, &path, kind, Some(meta), |p| {
            observer.progress(&name, p, decided + p.done)
        });
        self.finish_transfer(file, r.map(|r| r.literal_bytes))
    }

    fn finish_transfer(&mut self, file: StoredFile, r: Result<u64, ClientError>) -> Result<(), ClientError> {
        self.decided = self.decided.saturating_add(file.size);
        let done = self.decided + self.settled;
        self.observer.progress(&file.name, Progress { done: file.size, total: file.size }, done);
        match r {
            Ok(literal) => {
                self.report.changed += 1;
                self.report.file_bytes += file.size;
                self.report.literal_bytes += literal;
                self.observer.change(&Change::Sent(file.name, file.size));
                Ok(())
            }
            Err(e) if Self::survivable(&e) => {
                self.failed(&file.name, &e.to_string());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// `e` as a tree entry of directory `dir` (relative to the trees' roots),
/// if it is a child of that directory, under `prefix`, with a name the
/// server itself would accept.
fn child_of(prefix: &str, dir: &str, e: &Entry<'_>) -> Option<StoredFile> {
    validate_name(e.name).ok()?;
    let rel = match prefix {
        "" => e.name,
        p => e.name.strip_prefix(p)?.strip_prefix('/')?,
    };
    let leaf = if dir.is_empty() { rel } else { rel.strip_prefix(dir)?.strip_prefix('/')? };
    if leaf.is_empty() || leaf.contains('/') {
        return None;
    }
    // A chunking the size does not suit would make this side build a tree
    // without bound for its base.
    if e.kind == EntryKind::File && !e.chunking.suits(e.size) {
        return None;
    }
    Some(StoredFile {
        name: rel.to_string(),
        size: e.size,
        modified: e.meta.modified,
        nanos: e.meta.nanos.min(999_999_999),
        mode: e.meta.mode & MODE_BITS,
        sha256: e.sha256,
        chunking: e.chunking,
        kind: e.kind,
    })
}

/// Most files fetched in one stream (each holds a temporary file open).
const FETCH_GROUP: usize = 64;

/// Most file bytes read into memory at once for small files sent without
/// waiting.
const PUT_BUDGET: u64 = 16 << 20;

/// A temporary beside `rel` for a pull's local copy.
fn temp_name(rel: &str) -> String {
    let (dir, leaf) = rel.rsplit_once('/').unwrap_or(("", rel));
    join(dir, &format!(".deltasync-cp-{}-{leaf}", std::process::id()))
}

/// Most directories a watch remembers as changed between two syncs;
/// beyond, the next sync is of the whole tree (memory stays bounded
/// however many events arrive).
const MAX_DIRTY: usize = 4096;
/// A watch syncs once changes have been quiet this long...
const QUIET: Duration = Duration::from_millis(300);
/// ...or this long after the first one, whichever comes first.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// What a watcher saw since the last sync.
#[derive(Default)]
struct Dirty {
    dirs: BTreeSet<String>,
    /// Too much to remember, or events lost: sync everything.
    everything: bool,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Dirty {
    fn mark(&mut self, dir: String) {
        if self.dirs.len() < MAX_DIRTY {
            self.dirs.insert(dir);
        } else {
            self.everything = true;
        }
    }

    /// Whether it is time to sync what was seen.
    fn due(&self, now: Instant) -> bool {
        match (self.first, self.last) {
            (Some(f), Some(l)) => now >= l + QUIET || now >= f + MAX_DELAY,
            _ => false,
        }
    }
}

/// Pushes `root` to `prefix`, then keeps watching it and pushes each
/// change (debounced: [`QUIET`], at most [`MAX_DELAY`] late), renames and
/// (with [`TreeOptions::delete`]) deletions included, until `stop` is set.
/// Only the directories where something changed are listed again. The
/// connection is kept; if the server closed it meanwhile (its idle
/// timeout), `connect` makes another. `on_sync` sees each sync's report.
pub fn watch(
    mut connect: impl FnMut() -> Result<Connection, ClientError>,
    root: &Path,
    prefix: &str,
    options: TreeOptions,
    mut observer: impl Observer,
    stop: &AtomicBool,
    mut on_sync: impl FnMut(&TreeReport),
) -> Result<(), ClientError> {
    use notify::{RecursiveMode, Watcher};
    let local = |e: notify::Error| ClientError::Local(root.into(), io::Error::other(e.to_string()));
    let abs = fs::canonicalize(root).map_err(|e| ClientError::Local(root.into(), e))?;
    let dirty = Arc::new(Mutex::new(Dirty::default()));
    let filter = Filter::new(&abs, &options.excludes)?;
    let seen = dirty.clone();
    let base = abs.clone();
    let handler = move |ev: notify::Result<notify::Event>| {
        let mut d = seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        d.first.get_or_insert(now);
        d.last = Some(now);
        let ev = match ev {
            Ok(ev) if !ev.need_rescan() => ev,
            // Events were lost (a queue overflowed): look at everything.
            _ => {
                d.everything = true;
                return;
            }
        };
        for path in &ev.paths {
            let Some(rel) = path.strip_prefix(&base).ok().and_then(|r| r.to_str()) else { continue };
            if rel.is_empty() {
                d.mark(String::new());
                continue;
            }
            let leaf = rel.rsplit('/').next().unwrap_or(rel);
            if leaf.starts_with(".deltasync") || filter.excludes(rel, path.is_dir()) {
                continue;
            }
            // The directory holding what changed is listed again.
            d.mark(rel.rsplit_once('/').map_or(String::new(), |(dir, _)| dir.to_string()));
        }
    };
    // A symlinked directory is not watched (nor pushed).
    let config = notify::Config::default().with_follow_symlinks(false);
    let mut watcher = notify::RecommendedWatcher::new(handler, config).map_err(local)?;
    watcher.watch(&abs, RecursiveMode::Recursive).map_err(local)?;
    let mut conn = connect()?;
    let mut plan = Some(Plan::new(Direction::Upload, plan_options(&options)));
    while !stop.load(Ordering::Relaxed) {
        let Some(p) = plan.take() else {
            std::thread::sleep(Duration::from_millis(50));
            let mut d = dirty.lock().unwrap_or_else(|p| p.into_inner());
            if d.due(Instant::now()) {
                let d = std::mem::take(&mut *d);
                let opts = plan_options(&options);
                plan = Some(if d.everything {
                    Plan::new(Direction::Upload, opts)
                } else {
                    // A directory gone here is synced from its parent.
                    let dirs = d.dirs.into_iter().filter(|dir| abs.join(dir).is_dir());
                    Plan::dirs(Direction::Upload, opts, dirs)
                });
            }
            continue;
        };
        let report = match run(&mut conn, root, prefix, options.clone(), &mut observer, p) {
            // The server hung up while we watched (its idle timeout): once
            // more, on a new connection, with the whole tree (what the
            // failed sync did is unknown).
            Err(
                ClientError::Network(_) | ClientError::Protocol(_) | ClientError::Refused(ErrorCode::Timeout),
            ) => {
                conn = connect()?;
                run(
                    &mut conn,
                    root,
                    prefix,
                    options.clone(),
                    &mut observer,
                    Plan::new(Direction::Upload, plan_options(&options)),
                )?
            }
            r => r?,
        };
        on_sync(&report);
    }
    Ok(())
}

impl<O: Observer + ?Sized> Observer for &mut O {
    fn change(&mut self, change: &Change) {
        (**self).change(change)
    }
    fn progress(&mut self, file: &str, p: Progress, tree_bytes: u64) {
        (**self).progress(file, p, tree_bytes)
    }
}

/// Bytes of the regular files under `dir` (symlinks not followed): what a
/// push of it checks, for a progress display.
pub fn local_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if m.is_file() => total += m.len(),
                _ => {}
            }
        }
    }
    total
}
