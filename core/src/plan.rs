//! The policy of a tree sync (`push` a local tree to the server, `pull` a
//! stored tree here): from the two sides' listings, one directory at a
//! time, what to send, copy, touch, make or delete. Shells list, hash and
//! move bytes when a [`Step`] asks, and run the protocol's machines for it;
//! they decide nothing.
//!
//! A file is unchanged if both sides have it with the same size and time
//! (as `rsync` decides), or, when those differ but the sizes agree (or
//! [`Options::checksum`]), with the same SHA-256: then only its time and
//! mode are set. A file the destination lacks whose content it holds
//! under another name is copied there (a rename or a copy costs no file
//! data). Deletions ([`Options::delete`]) wait until everything else is
//! done, so that an interrupted sync never deleted what it had yet to copy.
//! Directory times are not kept (they change with every file written in
//! them); directory modes are.

use crate::conn::server::{Direction, StoredFile};
use crate::hash::Hash;
use crate::message::{EntryKind, Meta};
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Ordering;

/// What the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Delete what the destination has and the source does not.
    pub delete: bool,
    /// Compare contents even where size and time agree.
    pub checksum: bool,
}

/// A change made on the destination without file data (the server's for a
/// push, the local tree for a pull). Names are relative to the trees' roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Make a directory.
    MakeDir {
        /// Its name.
        name: String,
        /// Its mode (and time).
        meta: Meta,
    },
    /// Copy a file the destination holds to a name it lacks.
    Copy {
        /// The file the destination holds.
        from: String,
        /// Its content's SHA-256.
        sha256: Hash,
        /// The new name.
        to: String,
        /// The new file's time and mode.
        meta: Meta,
    },
    /// Set a file's or directory's time and mode.
    SetMeta {
        /// Its name.
        name: String,
        /// The time and mode.
        meta: Meta,
        /// File or directory.
        kind: EntryKind,
    },
    /// Delete a file or an (emptied) directory.
    Delete {
        /// Its name.
        name: String,
        /// File or directory.
        kind: EntryKind,
    },
}

/// A directory to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListDir {
    /// The directory (`""`: the root).
    pub dir: String,
    /// Whether the local tree has it.
    pub local: bool,
    /// Whether the server has it.
    pub remote: bool,
}

/// Most directories listed in one [`Step::List`].
pub const LIST_AHEAD: usize = 64;
/// Small files and ops held back (to go in one stream) until this many...
const HOLD_FILES: usize = 4096;
/// ...or until the small files held add up to this many bytes.
const HOLD_BYTES: u64 = 16 << 20;

/// What the shell is asked to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// List these directories on the sides that have them, and give each
    /// one's listings with [`Plan::listed`], in order (a side without it
    /// gives nothing). Several at once, so that a shell may ask the server
    /// for them all before the first answer.
    List(Vec<ListDir>),
    /// Hash the local file `name` and give its SHA-256 with
    /// [`Plan::hashed`].
    Hash {
        /// The file.
        name: String,
    },
    /// Make these changes on the destination, in order (a shell may send
    /// them all before the first answer).
    Ops(Vec<Op>),
    /// Send these small files (at most [`crate::conn::put::PUT_MAX`] bytes
    /// each) from the source to the destination, as [`Step::Transfer`]
    /// says, without waiting between them where the protocol allows (a
    /// push's [`crate::conn::put::PutBatch`]).
    Transfers(Vec<(StoredFile, Option<StoredFile>)>),
    /// Send `file` from the source to the destination: an upload for a
    /// push, a download for a pull, a delta against `base`, what the
    /// destination holds under that name. The destination's copy gets
    /// `file`'s time and mode.
    Transfer {
        /// The source's file.
        file: StoredFile,
        /// The destination's version of it, if any.
        base: Option<StoredFile>,
    },
    /// A file on one side is a directory on the other: left alone.
    Clash {
        /// The name.
        name: String,
    },
    /// Nothing more.
    Done,
}

/// What a sync found and did, counted as it plans.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Files in the source.
    pub files: u64,
    /// Files sent (new or changed).
    pub transferred: u64,
    /// Bytes of the files sent (their sizes, not what crossed the wire).
    pub transferred_bytes: u64,
    /// Files copied from another name on the destination.
    pub copied: u64,
    /// Files and directories whose time or mode only was set.
    pub touched: u64,
    /// Files unchanged.
    pub unchanged: u64,
    /// Bytes of the source's files that need no file data: unchanged,
    /// touched or copied (with the bytes sent, how far a sync has come).
    pub settled_bytes: u64,
    /// Directories made.
    pub made_dirs: u64,
    /// Files and directories deleted.
    pub deleted: u64,
    /// Names that are a file on one side and a directory on the other.
    pub clashes: u64,
}

/// The most destination files remembered by content (for copies); beyond
/// this, new files are sent rather than copied.
const MAX_REMEMBERED: usize = 1 << 20;

/// One directory, listed on both sides and being decided.
struct DirWork {
    /// Pairs of (source, destination) entries with the same name.
    pairs: Vec<(Option<StoredFile>, Option<StoredFile>)>,
    /// Local files still to hash.
    to_hash: VecDeque<String>,
    /// Local files hashed.
    hashes: BTreeMap<String, Hash>,
}

/// A tree sync's plan, made one directory at a time as the shell lists.
pub struct Plan {
    direction: Direction,
    options: Options,
    /// Directories still to visit: name, whether the local and the remote
    /// tree have it.
    stack: Vec<(String, bool, bool)>,
    steps: VecDeque<Step>,
    /// Directories asked for and not yet listed.
    listing: usize,
    /// Directories listed, decided in order.
    works: VecDeque<DirWork>,
    /// Ops and small files decided and held back, to go together (see
    /// [`Step::Ops`] and [`Step::Transfers`]), and the files' bytes.
    held_ops: Vec<Op>,
    held_files: Vec<(StoredFile, Option<StoredFile>)>,
    held_bytes: u64,
    /// New files whose content the destination may hold in a directory
    /// not listed yet, with their hashes.
    held_new: Vec<(StoredFile, Hash)>,
    /// Whether the destination listed anything yet (new files are hashed
    /// to look for a copy only then).
    dest_has_data: bool,
    /// Destination files by content: where a copy may come from.
    by_hash: BTreeMap<Hash, String>,
    /// Deletions, made last.
    deletes: Vec<(String, EntryKind)>,
    counts: Counts,
    done: bool,
    /// Visit only the directories asked for (and what is new or gone
    /// below them), not every directory both sides have.
    shallow: bool,
}

/// Pairs two listings sorted by name.
fn pair(mut a: Vec<StoredFile>, mut b: Vec<StoredFile>) -> Vec<(Option<StoredFile>, Option<StoredFile>)> {
    a.sort_by(|x, y| x.name.cmp(&y.name));
    b.sort_by(|x, y| x.name.cmp(&y.name));
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    let mut out = Vec::new();
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(x), Some(y)) => x.name.cmp(&y.name),
        };
        out.push(match order {
            Ordering::Less => (a.next(), None),
            Ordering::Greater => (None, b.next()),
            Ordering::Equal => (a.next(), b.next()),
        });
    }
}

/// Whether two files agree on size and time (`rsync`'s quick check).
fn quick_same(s: &StoredFile, d: &StoredFile) -> bool {
    s.size == d.size && s.modified == d.modified && s.nanos == d.nanos
}

impl Plan {
    /// A sync in `direction` (`Upload`: push, `Download`: pull) of the
    /// trees' roots, which both sides are assumed to have (a side without
    /// one lists nothing there).
    pub fn new(direction: Direction, options: Options) -> Plan {
        Plan {
            direction,
            options,
            stack: alloc::vec![(String::new(), true, true)],
            steps: VecDeque::new(),
            listing: 0,
            works: VecDeque::new(),
            held_ops: Vec::new(),
            held_files: Vec::new(),
            held_bytes: 0,
            held_new: Vec::new(),
            dest_has_data: false,
            by_hash: BTreeMap::new(),
            deletes: Vec::new(),
            counts: Counts::default(),
            done: false,
            shallow: false,
        }
    }

    /// A sync of some directories only (a watcher's, where changes were
    /// seen): each is listed on both sides and synced, with whatever is
    /// new in it or gone from it, but directories both sides have below it
    /// are not visited (their changes come as directories of their own).
    pub fn dirs(direction: Direction, options: Options, dirs: impl IntoIterator<Item = String>) -> Plan {
        let mut plan = Plan::new(direction, options);
        plan.shallow = true;
        let mut dirs: Vec<String> = dirs.into_iter().collect();
        dirs.sort();
        dirs.dedup();
        plan.stack = dirs.into_iter().rev().map(|d| (d, true, true)).collect();
        plan
    }

    /// Push (`Upload`) or pull (`Download`).
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// What was found and decided so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The next thing for the shell to do. After [`Step::List`] and
    /// [`Step::Hash`] it must answer before asking again.
    pub fn next_step(&mut self) -> Step {
        loop {
            if let Some(s) = self.steps.pop_front() {
                return s;
            }
            if self.listing > 0 {
                // Listings missing: the shell broke the contract; what
                // was not listed is taken as empty on both sides.
                self.listing = 0;
            }
            if let Some(w) = self.works.front_mut() {
                if let Some(name) = w.to_hash.front() {
                    return Step::Hash { name: name.clone() };
                }
                self.decide();
                continue;
            }
            if !self.stack.is_empty() {
                let n = self.stack.len().min(LIST_AHEAD);
                let dirs: Vec<ListDir> = self
                    .stack
                    .drain(self.stack.len() - n..)
                    .rev()
                    .map(|(dir, local, remote)| ListDir { dir, local, remote })
                    .collect();
                self.listing = dirs.len();
                return Step::List(dirs);
            }
            if !self.held_new.is_empty() {
                self.resolve_new();
                continue;
            }
            if !self.held_ops.is_empty() || !self.held_files.is_empty() {
                self.release();
                continue;
            }
            if !self.done {
                self.done = true;
                let mut deletes: Vec<Op> =
                    self.deletes.drain(..).rev().map(|(name, kind)| Op::Delete { name, kind }).collect();
                self.counts.deleted = deletes.len() as u64;
                if !deletes.is_empty() {
                    deletes.shrink_to_fit();
                    return Step::Ops(deletes);
                }
            }
            return Step::Done;
        }
    }

    /// The listings of the next directory [`Step::List`] asked for: the
    /// local tree's and the server's entries in it (names relative to the
    /// roots, any order). Ignored if no listing is awaited.
    pub fn listed(&mut self, local: Vec<StoredFile>, remote: Vec<StoredFile>) {
        if self.listing == 0 {
            return;
        }
        self.listing -= 1;
        let (src, dst) = match self.direction {
            Direction::Upload => (local, remote),
            Direction::Download => (remote, local),
        };
        let pairs = pair(src, dst);
        if pairs.iter().any(|(_, d)| d.is_some()) {
            self.dest_has_data = true;
        }
        // What the destination holds here may be copied from (known now
        // for the server's files, once hashed for local ones).
        for (_, d) in &pairs {
            if let Some(d) = d.as_ref().filter(|d| d.kind == EntryKind::File && d.sha256.is_known()) {
                self.remember(d.sha256, &d.name);
            }
        }
        // The sizes of the files new here (once, not per pair).
        let new_sizes: BTreeSet<u64> = pairs
            .iter()
            .filter_map(|p| match p {
                (Some(s), None) if s.kind == EntryKind::File => Some(s.size),
                _ => None,
            })
            .collect();
        let mut to_hash = VecDeque::new();
        for p in &pairs {
            if let Some(name) = self.hash_wanted(p, &new_sizes) {
                to_hash.push_back(name);
            }
        }
        self.works.push_back(DirWork { pairs, to_hash, hashes: BTreeMap::new() });
    }

    /// The SHA-256 of the local file [`Step::Hash`] asked for (`None`: it
    /// could not be read, and is then treated as changed).
    pub fn hashed(&mut self, name: &str, sha256: Option<Hash>) {
        if let Some(w) = self.works.front_mut()
            && w.to_hash.front().is_some_and(|n| n == name)
        {
            w.to_hash.pop_front();
            if let Some(h) = sha256 {
                w.hashes.insert(name.into(), h);
            }
        }
    }

    /// Which local file of the pair `p` must be hashed to decide it.
    fn hash_wanted(
        &self,
        p: &(Option<StoredFile>, Option<StoredFile>),
        new_sizes: &BTreeSet<u64>,
    ) -> Option<String> {
        let is_file = |f: &Option<StoredFile>| f.as_ref().is_some_and(|f| f.kind == EntryKind::File);
        match (p, self.direction) {
            // Both have it: its content decides, if size and time do not.
            ((Some(s), Some(d)), dir) if is_file(&p.0) && is_file(&p.1) => {
                let local = if dir == Direction::Upload { s } else { d };
                let unsure = s.size == d.size && (self.options.checksum || !quick_same(s, d));
                unsure.then(|| local.name.clone())
            }
            // A new local file to push: the server may hold its content.
            ((Some(s), None), Direction::Upload) if is_file(&p.0) && s.size > 0 && self.dest_has_data => {
                Some(s.name.clone())
            }
            // A local file the server lacks, when a new one of its size
            // comes: it may be where that one was (a rename).
            ((None, Some(d)), Direction::Download) if is_file(&p.1) && d.size > 0 => {
                new_sizes.contains(&d.size).then(|| d.name.clone())
            }
            _ => None,
        }
    }

    /// The content hash of an entry: listed (the server's) or hashed here.
    fn content(&self, f: &StoredFile, hashes: &BTreeMap<String, Hash>) -> Option<Hash> {
        if f.sha256.is_known() { Some(f.sha256) } else { hashes.get(&f.name).copied() }
    }

    fn remember(&mut self, sha: Hash, name: &str) {
        if self.by_hash.len() < MAX_REMEMBERED {
            self.by_hash.entry(sha).or_insert_with(|| name.into());
        }
    }

    /// Decides the new files held back: copied where the destination holds
    /// their content, sent otherwise.
    fn resolve_new(&mut self) {
        for (file, h) in core::mem::take(&mut self.held_new) {
            if let Some(from) = self.by_hash.get(&h) {
                self.counts.settled_bytes = self.counts.settled_bytes.saturating_add(file.size);
                self.counts.copied += 1;
                self.held_ops.push(Op::Copy {
                    from: from.clone(),
                    sha256: h,
                    to: file.name.clone(),
                    meta: file.meta(),
                });
                continue;
            }
            self.send(file, None);
        }
    }

    /// Counts a file to send, and holds it back with the small ones or
    /// hands it over at once (after what was held) if it is large.
    fn send(&mut self, file: StoredFile, base: Option<StoredFile>) {
        self.counts.transferred += 1;
        self.counts.transferred_bytes = self.counts.transferred_bytes.saturating_add(file.size);
        if file.size <= crate::conn::put::PUT_MAX {
            self.held_bytes = self.held_bytes.saturating_add(file.size);
            self.held_files.push((file, base));
        } else {
            self.release();
            self.steps.push_back(Step::Transfer { file, base });
        }
    }

    /// Hands over what was held back: ops first (a new directory before the
    /// files sent into it), then the small files.
    fn release(&mut self) {
        if !self.held_ops.is_empty() {
            self.steps.push_back(Step::Ops(core::mem::take(&mut self.held_ops)));
        }
        if !self.held_files.is_empty() {
            self.steps.push_back(Step::Transfers(core::mem::take(&mut self.held_files)));
        }
        self.held_bytes = 0;
    }

    /// Decides a listed directory whose hashes are in: its ops and small
    /// files are held back to go with others', its large files go now, and
    /// its subdirectories are visited in order.
    fn decide(&mut self) {
        let Some(w) = self.works.pop_front() else { return };
        let (push, pull) = (self.direction == Direction::Upload, self.direction == Direction::Download);
        // What the destination holds here may be copied from, whatever
        // order the names come in (local files now that they are hashed).
        for (_, d) in &w.pairs {
            if let Some(d) = d.as_ref().filter(|d| d.kind == EntryKind::File)
                && let Some(h) = self.content(d, &w.hashes)
            {
                self.remember(h, &d.name);
            }
        }
        let (mut ops, mut transfers, mut children) = (Vec::new(), Vec::new(), Vec::new());
        for (s, d) in w.pairs {
            match (s, d) {
                (Some(s), None) if s.kind == EntryKind::Dir => {
                    self.counts.made_dirs += 1;
                    ops.push(Op::MakeDir { name: s.name.clone(), meta: s.meta() });
                    // Only the source has it (and the local tree is the
                    // source of a push).
                    children.push((s.name, push, pull));
                }
                (Some(s), None) => {
                    self.counts.files += 1;
                    let from = self.content(&s, &w.hashes).filter(|_| s.size > 0).and_then(|h| {
                        let from = self.by_hash.get(&h)?;
                        Some((from.clone(), h))
                    });
                    match from {
                        Some((from, sha256)) => {
                            self.counts.settled_bytes = self.counts.settled_bytes.saturating_add(s.size);
                            self.counts.copied += 1;
                            ops.push(Op::Copy { from, sha256, to: s.name.clone(), meta: s.meta() });
                        }
                        // Perhaps in a directory not listed yet: decided
                        // once every directory is (see `resolve_new`).
                        None => match self.content(&s, &w.hashes).filter(|_| s.size > 0) {
                            Some(h) => self.held_new.push((s, h)),
                            None => transfers.push((s, None)),
                        },
                    }
                }
                (None, Some(d)) => {
                    if self.options.delete {
                        if d.kind == EntryKind::Dir {
                            // Emptied first: visited with only the
                            // destination (the local tree's for a pull).
                            children.push((d.name.clone(), pull, push));
                        }
                        self.deletes.push((d.name, d.kind));
                    }
                }
                (Some(s), Some(d)) if s.kind != d.kind => {
                    self.counts.clashes += 1;
                    self.steps.push_back(Step::Clash { name: s.name });
                }
                (Some(s), Some(d)) if s.kind == EntryKind::Dir => {
                    if s.mode != d.mode {
                        self.counts.touched += 1;
                        ops.push(Op::SetMeta { name: s.name.clone(), meta: s.meta(), kind: EntryKind::Dir });
                    }
                    if !self.shallow {
                        children.push((s.name, true, true));
                    }
                }
                (Some(s), Some(d)) => {
                    self.counts.files += 1;
                    let same = if quick_same(&s, &d) && !self.options.checksum {
                        true
                    } else {
                        let (a, b) = (self.content(&s, &w.hashes), self.content(&d, &w.hashes));
                        s.size == d.size && a.is_some() && a == b
                    };
                    if !same {
                        transfers.push((s, Some(d)));
                    } else if s.meta() != d.meta() {
                        self.counts.settled_bytes = self.counts.settled_bytes.saturating_add(s.size);
                        self.counts.touched += 1;
                        ops.push(Op::SetMeta { name: s.name.clone(), meta: s.meta(), kind: EntryKind::File });
                    } else {
                        self.counts.settled_bytes = self.counts.settled_bytes.saturating_add(s.size);
                        self.counts.unchanged += 1;
                    }
                }
                (None, None) => {}
            }
        }
        // Held back, to go with other directories' in one stream; a
        // large file goes at once, after what was held (its directory
        // first).
        self.held_ops.extend(ops);
        for (file, base) in transfers {
            self.send(file, base);
        }
        if self.held_new.len() >= HOLD_FILES {
            self.resolve_new();
        }
        if self.held_files.len() + self.held_ops.len() >= HOLD_FILES || self.held_bytes >= HOLD_BYTES {
            self.release();
        }
        // Visited in name order: the stack pops the last pushed first.
        self.stack.extend(children.into_iter().rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn file(name: &str, size: u64, modified: u64, content: u8) -> StoredFile {
        StoredFile {
            name: name.into(),
            size,
            modified,
            mode: 0o644,
            sha256: Hash([content; 32]),
            kind: EntryKind::File,
            ..StoredFile::default()
        }
    }

    fn dir(name: &str) -> StoredFile {
        StoredFile { name: name.into(), mode: 0o755, kind: EntryKind::Dir, ..StoredFile::default() }
    }

    /// Children of `dir` in a flat tree.
    fn children(tree: &[StoredFile], dir: &str, hashes: bool) -> Vec<StoredFile> {
        tree.iter()
            .filter(|f| f.name.rsplit_once('/').map_or("", |(d, _)| d) == dir)
            .map(|f| StoredFile { sha256: if hashes { f.sha256 } else { Hash::UNKNOWN }, ..f.clone() })
            .collect()
    }

    /// Runs a plan against a local and a remote tree (the local one's
    /// hashes are known only when asked for), returning every step but the
    /// listings and hashes it answered.
    fn drive(mut plan: Plan, local: &[StoredFile], remote: &[StoredFile]) -> (Vec<Step>, Vec<String>) {
        let (mut steps, mut hashed) = (Vec::new(), Vec::new());
        loop {
            match plan.next_step() {
                Step::List(dirs) => {
                    for d in dirs {
                        let a = if d.local { children(local, &d.dir, false) } else { Vec::new() };
                        let b = if d.remote { children(remote, &d.dir, true) } else { Vec::new() };
                        plan.listed(a, b);
                    }
                }
                Step::Hash { name } => {
                    let h = local.iter().find(|f| f.name == name).map(|f| f.sha256);
                    hashed.push(name.clone());
                    plan.hashed(&name, h);
                }
                Step::Done => return (steps, hashed),
                s => steps.push(s),
            }
        }
    }

    fn push(options: Options) -> Plan {
        Plan::new(Direction::Upload, options)
    }

    #[test]
    fn size_and_time_decide_then_content() {
        let local = [
            file("same", 5, 10, 1),
            file("touched", 5, 11, 2),
            file("edited", 5, 12, 3),
            file("new", 1, 1, 4),
        ];
        let remote = [
            file("same", 5, 10, 1),
            file("touched", 5, 99, 2),
            file("edited", 5, 99, 9),
            file("old", 1, 1, 7),
        ];
        let (steps, hashed) = drive(push(Options::default()), &local, &remote);
        // Only what size and time cannot decide is hashed (and the new
        // file, which may be a copy of something the server holds).
        assert_eq!(hashed, ["edited", "new", "touched"]);
        let meta = Meta { modified: 11, nanos: 0, mode: 0o644 };
        assert_eq!(
            steps,
            [
                Step::Ops(vec![Op::SetMeta { name: "touched".into(), meta, kind: EntryKind::File }]),
                // Small files, together.
                Step::Transfers(vec![
                    (StoredFile { sha256: Hash::UNKNOWN, ..local[2].clone() }, Some(remote[2].clone())),
                    (StoredFile { sha256: Hash::UNKNOWN, ..local[3].clone() }, None),
                ]),
            ]
        );
        // Nothing deleted without --delete; with it, last.
        let (steps, _) = drive(push(Options { delete: true, checksum: false }), &local, &remote);
        assert_eq!(
            steps.last(),
            Some(&Step::Ops(vec![Op::Delete { name: "old".into(), kind: EntryKind::File }]))
        );
        // --checksum hashes even what size and time call the same.
        let (_, hashed) = drive(push(Options { delete: false, checksum: true }), &local, &remote);
        assert!(hashed.contains(&"same".to_string()), "{hashed:?}");
    }

    #[test]
    fn a_renamed_file_is_copied_from_where_the_destination_holds_it() {
        // Pushed: the server holds the content under the old name, in
        // another directory listed first.
        let local = [dir("a"), dir("b"), file("b/new name", 9, 1, 5)];
        let remote = [dir("a"), file("a/old name", 9, 1, 5), dir("b")];
        let (steps, _) = drive(push(Options { delete: true, checksum: false }), &local, &remote);
        let meta = Meta { modified: 1, nanos: 0, mode: 0o644 };
        assert_eq!(
            steps,
            [
                Step::Ops(vec![Op::Copy {
                    from: "a/old name".into(),
                    sha256: Hash([5; 32]),
                    to: "b/new name".into(),
                    meta
                }]),
                Step::Ops(vec![Op::Delete { name: "a/old name".into(), kind: EntryKind::File }]),
            ]
        );
        // Pulled: the local file the server no longer has is hashed, and
        // is where the renamed one comes from.
        let local = [file("old name", 9, 1, 5)];
        let remote = [file("new name", 9, 1, 5)];
        let (steps, hashed) = drive(Plan::new(Direction::Download, Options::default()), &local, &remote);
        assert_eq!(hashed, ["old name"]);
        assert!(
            matches!(&steps[..], [Step::Ops(ops)] if matches!(&ops[..], [Op::Copy { from, .. }] if from == "old name"))
        );
    }

    #[test]
    fn directories_are_made_before_their_files_and_deleted_after_them() {
        let local = [dir("n"), dir("n/m"), file("n/m/f", 1, 1, 1)];
        let remote = [dir("gone"), dir("gone/sub"), file("gone/sub/x", 1, 1, 2), file("gone/y", 1, 1, 3)];
        let (steps, _) = drive(push(Options { delete: true, checksum: false }), &local, &remote);
        let names: Vec<String> = steps
            .iter()
            .flat_map(|s| match s {
                Step::Ops(ops) => ops
                    .iter()
                    .map(|o| {
                        alloc::format!("{o:?}").split(' ').next().unwrap_or("").to_string() + " " + o.name()
                    })
                    .collect::<Vec<_>>(),
                Step::Transfer { file, .. } => vec![alloc::format!("Transfer {}", file.name)],
                Step::Transfers(files) => {
                    files.iter().map(|(f, _)| alloc::format!("Transfer {}", f.name)).collect()
                }
                s => vec![alloc::format!("{s:?}")],
            })
            .collect();
        assert_eq!(
            names,
            [
                "MakeDir n",
                "MakeDir n/m",
                "Transfer n/m/f",
                "Delete gone/sub/x",
                "Delete gone/y",
                "Delete gone/sub",
                "Delete gone"
            ]
        );
    }

    #[test]
    fn a_file_where_a_directory_is_clashes_and_is_left_alone() {
        let local = [file("x", 1, 1, 1)];
        let remote = [dir("x"), file("x/inside", 1, 1, 2)];
        let (steps, _) = drive(push(Options { delete: true, checksum: false }), &local, &remote);
        assert_eq!(steps, [Step::Clash { name: "x".into() }]);
    }

    #[test]
    fn a_watchers_plan_visits_only_its_directories_and_what_is_new_below() {
        let local =
            [dir("a"), dir("a/old"), file("a/old/f", 1, 2, 1), dir("a/new"), file("a/new/g", 1, 1, 2)];
        let remote = [dir("a"), dir("a/old"), file("a/old/f", 1, 1, 1)];
        let (steps, _) =
            drive(Plan::dirs(Direction::Upload, Options::default(), ["a".to_string()]), &local, &remote);
        // a/old changed too, but is not visited: its own events name it.
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert!(
            matches!(&steps[1], Step::Transfers(files) if files.len() == 1 && files[0].0.name == "a/new/g")
        );
    }
}
