//! Chunk hints: what a client remembers of a version it chunked, so that
//! building the tree of the next, mostly unchanged version neither re-chunks
//! nor re-hashes with SHA-256 what did not change (std only).
//!
//! Hints list every chunk (length and SHA-256) and cut the chunks into
//! content-defined groups of about 40 chunks (160 KiB), each with the BLAKE3
//! hash of its bytes. A build with hints walks the new file from the start:
//! where the next old group begins, one BLAKE3 pass over as many bytes tells
//! whether the whole group is unchanged; if so its chunks and ids are taken
//! as they are. BLAKE3 runs at about three times the speed of chunking plus
//! SHA-256 on 4 KiB chunks here, and a group needs no chunker at all.
//!
//! Why this is sound:
//! - A chunk's cut depends only on its own bytes (the chunker restarts at
//!   every cut), so a group of whole chunks that starts at a true cut and
//!   holds the same bytes ends at the same cuts. The file's last chunk ends
//!   at the end of the file rather than at a cut, so it never belongs to a
//!   group.
//! - BLAKE3 is a cryptographic hash: a group that matches holds the same
//!   bytes, so the SHA-256 ids taken over are the right ones.
//! - Anything else (an edited group) is chunked and hashed as usual, one
//!   chunk at a time; a chunk whose SHA-256 is an old chunk's puts the walk
//!   back in step with the old groups, so an insertion or a deletion costs
//!   only the group around it. Hints that do not describe the file at all
//!   (many chunks in a row not seen before) are dropped, and the rest of the
//!   file is chunked with every thread.
//!
//! The result is the same chunk list a plain build finds; hints only make it
//! cheaper. They are a cache: whoever stores them keys them as it likes (the
//! client keys them by server and file name), and wrong or stale hints cost
//! time, never correctness.

use crate::build::{Group, ReadAt, chunk_ids_from, first_chunk, tree_of_chunks};
use deltasync_core::Hash;
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::tree::{Tree, TreeView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;

/// Fewest chunks in a group.
const GROUP_MIN: u32 = 8;
/// Most chunks in a group.
const GROUP_MAX: u32 = 128;
/// Chunks in a row not found among the old ones after which the hints are
/// dropped for the rest of the file.
const GIVE_UP: u32 = 256;
/// Bytes read at a time.
const WINDOW: usize = 1 << 20;
/// Starts a stored hints file.
const MAGIC: &[u8; 8] = b"DSHINTS2";

/// Whether `id`, the `count`-th chunk of its group, ends the group. Uses a
/// different byte of the id than the tree's node boundaries.
pub(crate) fn ends_group(id: &Hash, count: u32) -> bool {
    count >= GROUP_MAX || (count >= GROUP_MIN && id.0[30] & 31 == 0)
}

/// What a build remembers of a version, for the next build of the same file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHints {
    kind: ChunkerKind,
    /// Every chunk as (length, SHA-256), in file order.
    chunks: Vec<(u32, Hash)>,
    /// Consecutive groups from the first chunk as (chunks, BLAKE3 of their
    /// bytes). Chunks after the last group (at least the file's last chunk)
    /// belong to none.
    groups: Vec<(u32, [u8; 32])>,
    /// The root of the version's tree, and its whole-file SHA-256 once
    /// known (the server reports it after an upload).
    root: Hash,
    sha256: Option<Hash>,
}

/// Groups whose BLAKE3 hash a build computed from the same read of the
/// bytes as their chunks' ids (or took, with the ids, from matching hints):
/// start offset -> (end offset, BLAKE3). [`ChunkHints::collect`] reuses
/// them instead of reading those bytes again.
#[derive(Clone, Debug, Default)]
pub struct Known {
    groups: HashMap<u64, (u64, [u8; 32])>,
    /// Groups taken from the old hints: (start offset, bytes).
    taken: Vec<(u64, u64)>,
}

impl Known {
    fn add(&mut self, groups: impl IntoIterator<Item = Group>) {
        self.groups.extend(groups.into_iter().map(|(s, e, h)| (s, (e, h))));
    }

    /// The chunks of `src` after `from` (a cut), chunked with `threads`
    /// threads without hints; their groups become known.
    fn chunk_rest<R: ReadAt + ?Sized>(
        &mut self,
        src: &R,
        kind: ChunkerKind,
        threads: usize,
        from: u64,
    ) -> io::Result<Vec<(Hash, u64)>> {
        let (chunks, groups) = chunk_ids_from(src, kind, threads, from, true)?;
        self.add(groups);
        Ok(chunks)
    }

    /// Bytes of the file whose chunk ids were taken from the old hints.
    pub fn reused_bytes(&self) -> u64 {
        self.taken.iter().map(|t| t.1).sum()
    }
}

/// A read-ahead buffer over a [`ReadAt`].
struct Window {
    buf: Vec<u8>,
    at: u64,
    filled: usize,
}

impl Window {
    fn new() -> Self {
        Window { buf: Vec::new(), at: 0, filled: 0 }
    }

    /// `src[from..from + n]`; `from + n` must not pass `len`, the size the
    /// caller saw.
    fn get<R: ReadAt + ?Sized>(&mut self, src: &R, len: u64, from: u64, n: usize) -> io::Result<&[u8]> {
        if from < self.at || from + n as u64 > self.at + self.filled as u64 {
            let want = n.max(WINDOW.min((len - from) as usize));
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            src.read_exact_at(from, &mut self.buf[..want])?;
            self.at = from;
            self.filled = want;
        }
        let s = (from - self.at) as usize;
        Ok(&self.buf[s..s + n])
    }
}

impl ChunkHints {
    /// The hints of a version whose tree is `tree` and whose bytes `src`
    /// holds. `known` lists groups whose BLAKE3 hash is already known (from
    /// the build that made `tree`); every other group is read, hashed, and
    /// its chunks' SHA-256 ids checked against the tree from that same read,
    /// so that a group's hash and ids always describe the same bytes. Fails
    /// with [`io::ErrorKind::InvalidData`] if they differ (the file changed
    /// since the tree was built): such hints would mislead the next build.
    pub fn collect<R: ReadAt + ?Sized>(src: &R, tree: &Tree, known: &Known) -> io::Result<ChunkHints> {
        let summary = tree.summary();
        let n = tree.level_len(0);
        let mut chunks = Vec::with_capacity(n as usize);
        for i in 0..n {
            let e = tree.entry(0, i).ok_or_else(|| io::Error::other("tree without its chunks"))?;
            chunks.push((e.len as u32, e.id));
        }
        let mut groups = Vec::new();
        let mut win = Window::new();
        let (mut start, mut end, mut count, mut groups_chunks) = (0u64, 0u64, 0u32, 0usize);
        for &(len, id) in chunks.iter().take(chunks.len().saturating_sub(1)) {
            end += u64::from(len);
            count += 1;
            if ends_group(&id, count) {
                let hash = match known.groups.get(&start) {
                    Some(&(e, h)) if e == end => h,
                    _ => {
                        let bytes = win.get(src, summary.size, start, (end - start) as usize)?;
                        let members = &chunks[groups_chunks..groups_chunks + count as usize];
                        verify(bytes, members)?;
                        *blake3::hash(bytes).as_bytes()
                    }
                };
                groups.push((count, hash));
                groups_chunks += count as usize;
                (start, count) = (end, 0);
            }
        }
        Ok(ChunkHints { kind: summary.chunking, chunks, groups, root: summary.root, sha256: None })
    }

    /// Records the version's whole-file SHA-256.
    pub fn with_file_hash(mut self, sha256: Hash) -> Self {
        self.sha256 = Some(sha256);
        self
    }

    /// The whole-file SHA-256 of the version whose tree's root is `root`,
    /// if these hints describe it and know it: a tree's root names its
    /// bytes, so a build that finds the same root has the same file. (Hints
    /// are their owner's alone: see the client's `store_hints`.)
    pub fn file_hash_of(&self, root: Hash) -> Option<Hash> {
        self.sha256.filter(|_| root.is_known() && root == self.root)
    }

    /// The hints as bytes to store: a magic, the postcard encoding and a
    /// BLAKE3 hash of both.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(postcard::to_allocvec(self).expect("hints always encode"));
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Hints stored by [`ChunkHints::to_bytes`]; `None` if damaged.
    pub fn from_bytes(bytes: &[u8]) -> Option<ChunkHints> {
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let hints: ChunkHints = postcard::from_bytes(body.strip_prefix(MAGIC)?).ok()?;
        let grouped: u64 = hints.groups.iter().map(|g| u64::from(g.0)).sum();
        // The file's last chunk is never in a group.
        let sane = hints.groups.iter().all(|g| g.0 >= 1)
            && (hints.groups.is_empty() || grouped < hints.chunks.len() as u64);
        sane.then_some(hints)
    }
}

/// Checks that `bytes` are the chunks `members` (length, SHA-256) in order.
fn verify(bytes: &[u8], members: &[(u32, Hash)]) -> io::Result<()> {
    let mut at = 0usize;
    for &(len, id) in members {
        let chunk = bytes.get(at..at + len as usize);
        if chunk.map(Hash::of) != Some(id) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the file changed while it was read"));
        }
        at += len as usize;
    }
    Ok(())
}

/// Builds the tree of `src` without the whole-file SHA-256, as
/// [`crate::build::build_tree_unhashed`] does, taking unchanged groups from
/// `old` (see the module documentation). Also returns the groups found
/// unchanged, for [`ChunkHints::collect`].
pub fn build_tree_hinted<R: ReadAt + ?Sized>(
    src: &R,
    kind: ChunkerKind,
    threads: usize,
    old: Option<&ChunkHints>,
) -> io::Result<(Tree, Known)> {
    let len = src.size();
    let (chunks, known) = match old {
        Some(old) if old.kind == kind && !old.groups.is_empty() => walk(src, len, kind, threads, old)?,
        _ => {
            let mut known = Known::default();
            (known.chunk_rest(src, kind, threads, 0)?, known)
        }
    };
    Ok((tree_of_chunks(len, kind, &chunks, Hash::UNKNOWN), known))
}

/// The old version, indexed for a walk.
struct Old<'a> {
    hints: &'a ChunkHints,
    /// Group by its first chunk: (group, start offset, bytes).
    group_at: HashMap<usize, (usize, u64, u64)>,
    /// Chunk by its id.
    by_id: HashMap<Hash, usize>,
}

/// A walk of the new file from a position, against the old groups.
struct Walk<'a, R: ?Sized> {
    src: &'a R,
    len: u64,
    old: &'a Old<'a>,
    win: Window,
    out: Vec<(Hash, u64)>,
    known: Known,
    pos: u64,
    /// The old chunk expected at `pos`.
    k: usize,
    misses: u32,
}

impl<'a, R: ReadAt + ?Sized> Walk<'a, R> {
    fn new(src: &'a R, len: u64, old: &'a Old<'a>, pos: u64, k: usize) -> Self {
        let out = Vec::with_capacity(old.hints.chunks.len() + 16);
        Walk { src, len, old, win: Window::new(), out, known: Known::default(), pos, k, misses: 0 }
    }

    /// Whether the old group starting at chunk `k` holds the bytes at `pos`.
    fn group_matches(&mut self, pos: u64, k: usize) -> io::Result<Option<(usize, u64)>> {
        let Some(&(g, _, bytes)) = self.old.group_at.get(&k) else { return Ok(None) };
        if pos + bytes > self.len {
            return Ok(None);
        }
        let data = self.win.get(self.src, self.len, pos, bytes as usize)?;
        Ok((blake3::hash(data).as_bytes() == &self.old.hints.groups[g].1).then_some((g, bytes)))
    }

    /// Takes one old group, or chunks and hashes one chunk. Past
    /// [`GIVE_UP`] unknown chunks in a row, chunks the rest of the file
    /// with `threads` threads instead.
    fn step(&mut self, kind: ChunkerKind, threads: usize) -> io::Result<()> {
        if let Some((g, bytes)) = self.group_matches(self.pos, self.k)? {
            let (count, hash) = self.old.hints.groups[g];
            let mut end = self.pos;
            for &(clen, id) in &self.old.hints.chunks[self.k..self.k + count as usize] {
                end += u64::from(clen);
                self.out.push((id, end));
            }
            self.known.groups.insert(self.pos, (end, hash));
            self.known.taken.push((self.pos, bytes));
            (self.pos, self.k, self.misses) = (end, self.k + count as usize, 0);
            return Ok(());
        }
        let avail = (kind.max_chunk() as u64).min(self.len - self.pos) as usize;
        let (n, id) = first_chunk(kind, self.win.get(self.src, self.len, self.pos, avail)?);
        self.pos += n as u64;
        self.out.push((id, self.pos));
        match self.old.by_id.get(&id) {
            Some(&i) => (self.k, self.misses) = (i + 1, 0),
            None => (self.k, self.misses) = (self.k + 1, self.misses + 1),
        }
        if self.misses >= GIVE_UP && self.pos < self.len {
            let rest = self.known.chunk_rest(self.src, kind, threads, self.pos)?;
            self.out.extend(rest);
            self.pos = self.len;
        }
        Ok(())
    }
}

/// The chunks of `src` as (SHA-256, end offset), reusing `old`'s groups.
///
/// With two threads or more, a second walk starts at the old group nearest
/// the middle, placed where the file's size change says it moved (an edit
/// before it) or where it was (an edit after it), if its bytes are there.
/// The first walk goes until it lands on a cut of the second and adopts the
/// rest (as [`crate::build::chunk_ids`] stitches its threads), so the
/// result is the true chain even if the guess was wrong.
fn walk<R: ReadAt + ?Sized>(
    src: &R,
    len: u64,
    kind: ChunkerKind,
    threads: usize,
    hints: &ChunkHints,
) -> io::Result<(Vec<(Hash, u64)>, Known)> {
    let mut group_at = HashMap::with_capacity(hints.groups.len());
    let (mut first, mut at) = (0usize, 0u64);
    for (g, &(count, _)) in hints.groups.iter().enumerate() {
        let bytes: u64 = hints.chunks[first..first + count as usize].iter().map(|c| u64::from(c.0)).sum();
        group_at.insert(first, (g, at, bytes));
        first += count as usize;
        at += bytes;
    }
    let by_id = hints.chunks.iter().enumerate().map(|(i, c)| (c.1, i)).collect();
    let old = Old { hints, group_at, by_id };
    let old_len: u64 = hints.chunks.iter().map(|c| u64::from(c.0)).sum();

    // The second walk's start: (position, old chunk), if a guess holds.
    let mut a = Walk::new(src, len, &old, 0, 0);
    let mut second = None;
    if threads >= 2 {
        let mid = old.group_at.values().filter(|g| g.1 >= old_len / 2).min_by_key(|g| g.1);
        if let Some(&(g, at, _)) = mid {
            let k: usize = hints.groups[..g].iter().map(|g| g.0 as usize).sum();
            for shift in [0, len as i64 - old_len as i64] {
                let pos = at as i64 + shift;
                if pos > 0 && a.group_matches(pos as u64, k)?.is_some() {
                    second = Some((pos as u64, k));
                    break;
                }
            }
        }
    }
    let Some((start, k)) = second else {
        while a.pos < len {
            a.step(kind, threads)?;
        }
        return Ok((a.out, a.known));
    };
    let (mut a, b) = std::thread::scope(|s| {
        let b = s.spawn(|| {
            let mut b = Walk::new(src, len, &old, start, k);
            while b.pos < len {
                b.step(kind, 1)?;
            }
            io::Result::Ok(b)
        });
        while a.pos < start {
            a.step(kind, 1)?;
        }
        let b = b.join().expect("walking thread panicked")?;
        io::Result::Ok((a, b))
    })?;
    // Continue the first walk until it stands on one of the second's cuts.
    loop {
        let adopt_from = if a.pos == start {
            Some(0)
        } else {
            b.out.binary_search_by_key(&a.pos, |c| c.1).ok().map(|i| i + 1)
        };
        if let Some(i) = adopt_from {
            let cut = a.pos;
            a.out.extend_from_slice(&b.out[i..]);
            a.known.groups.extend(b.known.groups.iter().filter(|g| *g.0 >= cut));
            a.known.taken.extend(b.known.taken.iter().filter(|t| t.0 >= cut));
            break;
        }
        if a.pos >= len {
            break;
        }
        a.step(kind, threads)?;
    }
    Ok((a.out, a.known))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::build_tree_unhashed;
    use deltasync_core::sim::random_bytes;
    use proptest::prelude::*;

    fn hints_of(data: &[u8]) -> ChunkHints {
        hints_of_kind(data, ChunkerKind::Cdc)
    }

    fn hints_of_kind(data: &[u8], kind: ChunkerKind) -> ChunkHints {
        let (tree, known) = build_tree_hinted(data, kind, 2, None).unwrap();
        ChunkHints::collect(data, &tree, &known).unwrap()
    }

    /// Builds `new` with the hints of `old`; checks the tree against a plain
    /// build and returns the bytes taken from the hints.
    fn rebuild(old: &[u8], new: &[u8]) -> u64 {
        rebuild_kind(old, new, ChunkerKind::Cdc)
    }

    fn rebuild_kind(old: &[u8], new: &[u8], kind: ChunkerKind) -> u64 {
        let hints = ChunkHints::from_bytes(&hints_of_kind(old, kind).to_bytes()).expect("hints round-trip");
        let (tree, known) = build_tree_hinted(new, kind, 2, Some(&hints)).unwrap();
        assert_eq!(tree, build_tree_unhashed(new, kind, 2).unwrap());
        // The hints of the new version equal those collected from scratch.
        assert_eq!(ChunkHints::collect(new, &tree, &known).unwrap(), hints_of_kind(new, kind));
        known.reused_bytes()
    }

    #[test]
    fn a_scaled_kind_rebuilds_like_a_plain_build() {
        let old = random_bytes(21, 24 << 20);
        let mut new = old.clone();
        new.insert(5 << 20, 7);
        new[17 << 20..(17 << 20) + 4096].fill(1);
        let reused = rebuild_kind(&old, &new, ChunkerKind::CdcScaled(2));
        assert!(reused > new.len() as u64 * 3 / 4, "{reused}");
        // Hints of another kind are not used at all.
        let other = hints_of_kind(&old, ChunkerKind::Cdc);
        let (tree, known) = build_tree_hinted(&new[..], ChunkerKind::CdcScaled(2), 2, Some(&other)).unwrap();
        assert_eq!(tree, build_tree_unhashed(&new[..], ChunkerKind::CdcScaled(2), 2).unwrap());
        assert_eq!(known.reused_bytes(), 0);
    }

    #[test]
    fn an_unchanged_file_is_taken_from_its_hints() {
        let data = random_bytes(1, 8 << 20);
        let reused = rebuild(&data, &data);
        assert!(reused > data.len() as u64 * 9 / 10, "{reused}");
    }

    #[test]
    fn edits_cost_only_the_groups_around_them() {
        let old = random_bytes(2, 8 << 20);
        let mut overwrite = old.clone();
        overwrite[4 << 20..(4 << 20) + 4096].iter_mut().for_each(|b| *b = !*b);
        let mut insert = old.clone();
        insert.insert(0, b'!');
        let mut delete = old.clone();
        delete.drain(3 << 20..(3 << 20) + 10_000);
        let mut append = old.clone();
        append.extend(random_bytes(3, 1 << 20));
        for (what, new) in
            [("overwrite", overwrite), ("insert", insert), ("delete", delete), ("append", append)]
        {
            let reused = rebuild(&old, &new);
            // Every group but the one or two around the edit (and the tail
            // after the last group) matches.
            assert!(reused + (2 << 20) > old.len() as u64, "{what}: {reused}");
        }
    }

    #[test]
    fn a_wrong_guess_for_the_second_walk_still_gives_the_true_chunks() {
        // Zeros repeat: the second walk's guess finds matching bytes at a
        // place that need not be a cut of the new file.
        let mut old = random_bytes(9, 4 << 20);
        old[1 << 20..3 << 20].fill(0);
        for shift in [1usize, 100, 2047, 2048, 5000, 16 << 10] {
            let mut new = old.clone();
            new.splice(500_000..500_000, random_bytes(shift as u64, shift)).for_each(drop);
            rebuild(&old, &new);
            let mut new = old.clone();
            new.drain(500_000..500_000 + shift).for_each(drop);
            rebuild(&old, &new);
        }
    }

    #[test]
    fn hints_of_another_file_cost_nothing_but_time() {
        let a = random_bytes(4, 4 << 20);
        let b = random_bytes(5, 3 << 20);
        assert_eq!(rebuild(&a, &b), 0);
        assert_eq!(rebuild(&a, &[]), 0);
        assert_eq!(rebuild(&[], &a), 0);
    }

    #[test]
    fn a_first_build_hashes_its_groups_as_it_chunks() {
        let data = random_bytes(7, 8 << 20);
        for threads in [1, 2, 3] {
            let (_, known) = build_tree_hinted(&data[..], ChunkerKind::Cdc, threads, None).unwrap();
            let covered: u64 = known.groups.iter().map(|(s, (e, _))| e - s).sum();
            assert!(covered > data.len() as u64 * 9 / 10, "threads {threads}: {covered}");
        }
    }

    #[test]
    fn hints_are_never_collected_from_bytes_other_than_those_chunked() {
        let data = random_bytes(8, 2 << 20);
        let (tree, _) = build_tree_hinted(&data[..], ChunkerKind::Cdc, 2, None).unwrap();
        let mut changed = data.clone();
        changed[1 << 20] ^= 1;
        let err = ChunkHints::collect(&changed[..], &tree, &Known::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(ChunkHints::collect(&data[..], &tree, &Known::default()).unwrap(), hints_of(&data));
    }

    #[test]
    fn damaged_hints_are_refused() {
        let bytes = hints_of(&random_bytes(6, 1 << 20)).to_bytes();
        for i in [0, 9, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert_eq!(ChunkHints::from_bytes(&bad), None, "byte {i}");
        }
        assert_eq!(ChunkHints::from_bytes(&bytes[..bytes.len() - 1]), None);
        assert_eq!(ChunkHints::from_bytes(&[]), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn hinted_builds_equal_plain_builds(
            seed in any::<u64>(),
            len in 0usize..600_000,
            edits in proptest::collection::vec((any::<u32>(), 0usize..3, 1usize..5000), 0..4),
            zeros in any::<bool>(),
        ) {
            let mut old = random_bytes(seed, len);
            if zeros && len > 100_000 {
                old[10_000..90_000].fill(0);
            }
            let mut new = old.clone();
            for (at, op, n) in edits {
                let at = at as usize % (new.len() + 1);
                let end = (at + n).min(new.len());
                match op {
                    0 => new.splice(at..at, random_bytes(seed ^ at as u64, n)).for_each(drop),
                    1 => new.drain(at..end).for_each(drop),
                    _ => new[at..end].iter_mut().for_each(|b| *b = b.wrapping_add(1)),
                }
            }
            rebuild(&old, &new);
        }
    }
}
