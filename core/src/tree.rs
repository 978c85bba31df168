//! The hash tree: a Merkle tree over chunk ids whose node boundaries are
//! content-defined.
//!
//! Level 0 holds the chunks. A node at level `l + 1` groups a run of level-`l`
//! entries; the run ends after an entry whose id has its two low bits of the
//! last byte clear (1 in 4), once the node has at least [`MIN_FANOUT`]
//! entries, or when it reaches [`MAX_FANOUT`]. Because the decision looks only
//! at the entry itself, an edit changes the nodes on its own path and at most
//! a neighbour per level: an insertion costs O(depth) new nodes, not a new
//! tree. Levels are added until one node (the root) remains; an empty file is
//! a root with no children.
//!
//! A node's id is `SHA-256("dsn1" || level || (child id || child len as u64
//! LE)*)`, so the root commits to every byte through full SHA-256 ids.

use crate::chunker::{Chunker, ChunkerKind};
use crate::hash::Hash;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A node never ends before it has this many children (unless it is the last).
pub const MIN_FANOUT: u32 = 2;
/// A node always ends when it has this many children.
pub const MAX_FANOUT: u32 = 32;
/// Deepest tree the builder supports: at least 2^32 chunks (terabytes) even
/// with the smallest fanout of 2.
pub const MAX_LEVELS: usize = 32;

/// A chunk or node: its id and the number of file bytes it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// SHA-256 of the chunk bytes, or the node id.
    pub id: Hash,
    /// File bytes covered.
    pub len: u64,
}

/// An entry of a stored tree with its position in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeRef {
    /// The entry's id.
    pub id: Hash,
    /// Offset of its first byte in the file.
    pub offset: u64,
    /// File bytes covered.
    pub len: u64,
}

/// What identifies a version: enough for a receiver to start a sync and to
/// verify the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// File length in bytes.
    pub size: u64,
    /// Root of the hash tree.
    pub root: Hash,
    /// Level of the root (chunks are level 0, so the root is at least 1).
    pub height: u8,
    /// SHA-256 of the whole file, or [`Hash::UNKNOWN`] in an upload offer
    /// whose sender left it to the receiver.
    pub file_hash: Hash,
    /// How the file was chunked.
    pub chunking: ChunkerKind,
}

/// Whether `id`, the `count`-th entry of its node, ends the node.
#[inline]
pub fn ends_node(id: &Hash, count: u32) -> bool {
    count >= MAX_FANOUT || (count >= MIN_FANOUT && id.0[31] & 3 == 0)
}

/// The tree has more entries than its storage holds, or more levels than
/// [`MAX_LEVELS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeFull;

/// Receives the entries of a tree as they are completed.
pub trait TreeSink {
    /// Records an entry at `level`; `children` is 0 for chunks. Entries of
    /// one level arrive in file order; the root arrives last.
    fn add(&mut self, level: u8, entry: &Entry, children: u32) -> Result<(), TreeFull>;
}

impl<S: TreeSink + ?Sized> TreeSink for &mut S {
    fn add(&mut self, level: u8, entry: &Entry, children: u32) -> Result<(), TreeFull> {
        (**self).add(level, entry, children)
    }
}

/// Read access to a stored tree, for a sender answering requests and a
/// receiver reusing its old version.
pub trait TreeView {
    /// Level of the root.
    fn height(&self) -> u8;
    /// Number of entries at `level`.
    fn level_len(&self, level: u8) -> u32;
    /// The entry at `level`, `index`.
    fn entry(&self, level: u8, index: u32) -> Option<NodeRef>;
    /// Index (at `level - 1`) of the first child of node `index` at `level`.
    /// `index == level_len(level)` gives `level_len(level - 1)`.
    fn first_child(&self, level: u8, index: u32) -> Option<u32>;

    /// The range of chunk indices under the entry at `level`, `index`.
    fn leaf_range(&self, level: u8, index: u32) -> Option<core::ops::Range<u32>> {
        let (mut lo, mut hi) = (index, index.checked_add(1)?);
        let mut l = level;
        while l > 0 {
            lo = self.first_child(l, lo)?;
            hi = self.first_child(l, hi)?;
            l -= 1;
        }
        Some(lo..hi)
    }
}

/// No tree (yet): lists nothing. A sender of a version offered without its
/// root holds this until the tree is built.
impl<T: TreeView> TreeView for Option<T> {
    fn height(&self) -> u8 {
        self.as_ref().map_or(0, T::height)
    }
    fn level_len(&self, level: u8) -> u32 {
        self.as_ref().map_or(0, |t| t.level_len(level))
    }
    fn entry(&self, level: u8, index: u32) -> Option<NodeRef> {
        self.as_ref()?.entry(level, index)
    }
    fn first_child(&self, level: u8, index: u32) -> Option<u32> {
        self.as_ref()?.first_child(level, index)
    }
}

/// A tree reached through a pointer is that tree.
macro_rules! tree_view_through {
    ($($(#[$attr:meta])* $ptr:ty),*) => {$(
        $(#[$attr])*
        impl<T: TreeView + ?Sized> TreeView for $ptr {
            fn height(&self) -> u8 {
                (**self).height()
            }
            fn level_len(&self, level: u8) -> u32 {
                (**self).level_len(level)
            }
            fn entry(&self, level: u8, index: u32) -> Option<NodeRef> {
                (**self).entry(level, index)
            }
            fn first_child(&self, level: u8, index: u32) -> Option<u32> {
                (**self).first_child(level, index)
            }
        }
    )*};
}

// `Arc`: a tree shared with another thread (a shell collecting hints from
// the tree a session offers).
tree_view_through!(&T, #[cfg(feature = "std")] std::sync::Arc<T>);

#[derive(Clone)]
struct Pending {
    hasher: Sha256,
    count: u32,
    len: u64,
    /// Nodes already completed at this level.
    done: u32,
}

impl Pending {
    fn new(level: u8) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"dsn1");
        hasher.update([level]);
        Pending { hasher, count: 0, len: 0, done: 0 }
    }
}

/// Builds a tree bottom-up from chunk entries in file order, in memory
/// proportional to the depth (one running hash per level).
pub struct TreeBuilder<S> {
    sink: S,
    /// `levels[i]` is the node being filled at level `i + 1`.
    levels: heapless::Vec<Pending, MAX_LEVELS>,
    chunks: u64,
}

impl<S: TreeSink> TreeBuilder<S> {
    /// An empty builder writing to `sink`.
    pub fn new(sink: S) -> Self {
        TreeBuilder { sink, levels: heapless::Vec::new(), chunks: 0 }
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Number of chunks pushed so far.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Adds the next chunk.
    pub fn push_chunk(&mut self, entry: Entry) -> Result<(), TreeFull> {
        self.sink.add(0, &entry, 0)?;
        self.chunks += 1;
        self.push_at(1, entry)
    }

    /// Adds `entry` as the next child of the open node at `level`.
    fn push_at(&mut self, level: u8, entry: Entry) -> Result<(), TreeFull> {
        let i = usize::from(level) - 1;
        if i == self.levels.len() {
            self.levels.push(Pending::new(level)).map_err(|_| TreeFull)?;
        }
        let p = &mut self.levels[i];
        p.hasher.update(entry.id.0);
        p.hasher.update(entry.len.to_le_bytes());
        p.count += 1;
        p.len += entry.len;
        if ends_node(&entry.id, p.count) {
            let node = self.close(level)?;
            self.push_at(level + 1, node)?;
        }
        Ok(())
    }

    /// Completes the open node at `level` and hands it to the sink.
    fn close(&mut self, level: u8) -> Result<Entry, TreeFull> {
        let i = usize::from(level) - 1;
        let fresh = Pending::new(level);
        let p = &mut self.levels[i];
        let done = p.done + 1;
        let old = core::mem::replace(p, fresh);
        p.done = done;
        let node = Entry { id: Hash(old.hasher.finalize().into()), len: old.len };
        self.sink.add(level, &node, old.count)?;
        Ok(node)
    }

    /// Closes every open node; returns the root, its level, and the sink.
    pub fn finish(mut self) -> Result<(Entry, u8, S), TreeFull> {
        let mut level: u8 = 1;
        loop {
            let i = usize::from(level) - 1;
            if i == self.levels.len() {
                // Nothing reached this level: only an empty file gets here.
                self.levels.push(Pending::new(level)).map_err(|_| TreeFull)?;
            }
            let (count, done) = (self.levels[i].count, self.levels[i].done);
            if done == 0 {
                // The open node is the only one at its level: the root.
                let root = self.close(level)?;
                return Ok((root, level, self.sink));
            }
            if count > 0 {
                let node = self.close(level)?;
                self.push_at(level + 1, node)?;
            }
            level += 1;
        }
    }
}

/// Chunks, hashes and builds the tree of a byte stream fed in any pieces, and
/// computes the whole-file SHA-256 alongside.
pub struct Indexer<S> {
    chunker: Chunker,
    chunk: Sha256,
    /// Bytes in the open chunk.
    open: u64,
    /// The whole-file hash, unless someone else computes it.
    file: Option<Sha256>,
    size: u64,
    tree: TreeBuilder<S>,
}

impl<S: TreeSink> Indexer<S> {
    /// An indexer for a new file.
    pub fn new(kind: ChunkerKind, sink: S) -> Self {
        Indexer {
            chunker: Chunker::new(kind),
            chunk: Sha256::new(),
            open: 0,
            file: Some(Sha256::new()),
            size: 0,
            tree: TreeBuilder::new(sink),
        }
    }

    /// An indexer that leaves the whole-file hash [`Hash::UNKNOWN`] (for a
    /// shell that hashes the file on another thread as it writes it).
    pub fn without_file_hash(kind: ChunkerKind, sink: S) -> Self {
        Indexer { file: None, ..Indexer::new(kind, sink) }
    }

    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        self.tree.sink()
    }

    /// Feeds the next bytes of the file.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), TreeFull> {
        if let Some(f) = &mut self.file {
            f.update(data);
        }
        self.size += data.len() as u64;
        while let Some(n) = self.chunker.next_boundary(data) {
            self.chunk.update(&data[..n]);
            self.open += n as u64;
            self.end_chunk()?;
            data = &data[n..];
        }
        self.chunk.update(data);
        self.open += data.len() as u64;
        Ok(())
    }

    /// Ends the open chunk here, if it holds any bytes. A receiver calls this
    /// at the end of a run of fetched data, which always ends at one of the
    /// sender's boundaries.
    pub fn end_chunk(&mut self) -> Result<(), TreeFull> {
        if self.open == 0 {
            return Ok(());
        }
        self.chunker.reset();
        let id = Hash(core::mem::replace(&mut self.chunk, Sha256::new()).finalize().into());
        let len = core::mem::take(&mut self.open);
        self.tree.push_chunk(Entry { id, len })
    }

    /// Adds bytes whose chunk ids are already known (reused from an earlier
    /// version): they count towards the whole-file hash only. The caller adds
    /// their chunks with [`Indexer::push_known_chunk`].
    pub fn feed_known(&mut self, data: &[u8]) {
        if let Some(f) = &mut self.file {
            f.update(data);
        }
        self.size += data.len() as u64;
    }

    /// Whether this indexer computes the whole-file hash (and so must see
    /// every byte).
    pub fn hashes_file(&self) -> bool {
        self.file.is_some()
    }

    /// Counts `len` bytes whose chunk ids are known without seeing them;
    /// only for an indexer that does not hash the file
    /// ([`Indexer::hashes_file`] is false).
    pub fn skip_known(&mut self, len: u64) {
        debug_assert!(self.file.is_none(), "a file-hashing indexer must see every byte");
        self.size += len;
    }

    /// Adds a chunk whose bytes went through [`Indexer::feed_known`].
    pub fn push_known_chunk(&mut self, entry: Entry) -> Result<(), TreeFull> {
        debug_assert_eq!(self.open, 0, "a known chunk must start at a boundary");
        self.tree.push_chunk(entry)
    }

    /// Ends the last chunk and the tree.
    pub fn finish(mut self) -> Result<(Summary, S), TreeFull> {
        self.end_chunk()?;
        let kind = self.chunker.kind();
        let (root, height, sink) = self.tree.finish()?;
        let summary = Summary {
            size: self.size,
            root: root.id,
            height,
            file_hash: self.file.map_or(Hash::UNKNOWN, |f| Hash(f.finalize().into())),
            chunking: kind,
        };
        Ok((summary, sink))
    }
}

/// A sink that keeps nothing, for computing a summary alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSink;

impl TreeSink for NoSink {
    fn add(&mut self, _: u8, _: &Entry, _: u32) -> Result<(), TreeFull> {
        Ok(())
    }
}

/// A whole tree in a fixed array of `N` entries (all levels), for devices
/// without an allocator. Lookups scan the array, which suits the small trees
/// such a device holds.
pub struct FixedTree<const N: usize> {
    records: heapless::Vec<(u8, Entry, u32), N>,
    height: u8,
}

impl<const N: usize> Default for FixedTree<N> {
    fn default() -> Self {
        FixedTree { records: heapless::Vec::new(), height: 0 }
    }
}

impl<const N: usize> FixedTree<N> {
    /// Indexes `data` into a fixed tree.
    pub fn build(data: &[u8], kind: ChunkerKind) -> Result<(Summary, Self), TreeFull> {
        let mut tree = FixedTree::default();
        let summary = tree.index(data, kind)?;
        Ok((summary, tree))
    }

    /// Replaces this tree with the tree of `data`, in place (on a device
    /// this avoids moving the array around the stack).
    pub fn index(&mut self, data: &[u8], kind: ChunkerKind) -> Result<Summary, TreeFull> {
        self.records.clear();
        let mut ix = Indexer::new(kind, &mut *self);
        ix.feed(data)?;
        let (summary, _) = ix.finish()?;
        self.height = summary.height;
        Ok(summary)
    }

    fn at(&self, level: u8) -> impl Iterator<Item = &(u8, Entry, u32)> {
        self.records.iter().filter(move |r| r.0 == level)
    }
}

impl<const N: usize> TreeSink for FixedTree<N> {
    fn add(&mut self, level: u8, entry: &Entry, children: u32) -> Result<(), TreeFull> {
        self.records.push((level, *entry, children)).map_err(|_| TreeFull)
    }
}

impl<const N: usize> TreeView for FixedTree<N> {
    fn height(&self) -> u8 {
        self.height
    }
    fn level_len(&self, level: u8) -> u32 {
        self.at(level).count() as u32
    }
    fn entry(&self, level: u8, index: u32) -> Option<NodeRef> {
        let mut offset = 0;
        for (i, r) in self.at(level).enumerate() {
            if i as u32 == index {
                return Some(NodeRef { id: r.1.id, offset, len: r.1.len });
            }
            offset += r.1.len;
        }
        None
    }
    fn first_child(&self, level: u8, index: u32) -> Option<u32> {
        if level == 0 || index > self.level_len(level) {
            return None;
        }
        Some(self.at(level).take(index as usize).map(|r| r.2).sum())
    }
}

#[cfg(feature = "alloc")]
pub(crate) use owned::Levels;
#[cfg(feature = "alloc")]
pub use owned::{Tree, TreeIndexer};

/// A version's sketch: the [`crate::message::SKETCH_LEN`] smallest of its
/// chunk ids, each as its first 8 bytes (big-endian), distinct, ascending.
/// Two versions chunked alike that share chunks likely share some of these
/// (a bottom-k sample: the share of ids in common estimates the share of
/// chunks), whatever their names, sizes or the order of their chunks.
pub fn sketch<T: TreeView + ?Sized>(tree: &T) -> heapless::Vec<u64, { crate::message::SKETCH_LEN }> {
    let mut out: heapless::Vec<u64, { crate::message::SKETCH_LEN }> = heapless::Vec::new();
    for i in 0..tree.level_len(0) {
        let Some(e) = tree.entry(0, i).filter(|e| e.len > 0) else { continue };
        let mut first = [0u8; 8];
        first.copy_from_slice(&e.id.0[..8]);
        let v = u64::from_be_bytes(first);
        if let Err(at) = out.binary_search(&v) {
            if out.is_full() {
                if at == out.len() {
                    continue;
                }
                out.pop();
            }
            let _ = out.insert(at, v);
        }
    }
    out
}

#[cfg(feature = "alloc")]
mod owned {
    use super::*;
    use alloc::vec::Vec;

    #[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq, Debug)]
    struct Level {
        ids: Vec<Hash>,
        /// Byte offset where each entry ends.
        ends: Vec<u64>,
        /// For nodes: index (one level down) where each node's children end.
        child_ends: Vec<u32>,
    }

    /// A whole tree in memory: about 44 bytes per chunk (ids and offsets for
    /// every level).
    #[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Debug)]
    pub struct Tree {
        summary: Summary,
        levels: Vec<Level>,
    }

    #[derive(Default)]
    pub(crate) struct Levels(Vec<Level>);

    impl TreeSink for Levels {
        fn add(&mut self, level: u8, entry: &Entry, children: u32) -> Result<(), TreeFull> {
            let l = usize::from(level);
            if self.0.len() <= l {
                self.0.resize_with(l + 1, Level::default);
            }
            let lv = &mut self.0[l];
            let end = lv.ends.last().copied().unwrap_or(0) + entry.len;
            lv.ids.push(entry.id);
            lv.ends.push(end);
            if level > 0 {
                let c = lv.child_ends.last().copied().unwrap_or(0) + children;
                lv.child_ends.push(c);
            }
            Ok(())
        }
    }

    /// Builds a [`Tree`] from bytes fed in pieces.
    pub struct TreeIndexer(Indexer<Levels>);

    impl TreeIndexer {
        /// A new indexer.
        pub fn new(kind: ChunkerKind) -> Self {
            TreeIndexer(Indexer::new(kind, Levels::default()))
        }

        /// An indexer whose tree leaves the whole-file hash
        /// [`Hash::UNKNOWN`].
        pub fn without_file_hash(kind: ChunkerKind) -> Self {
            TreeIndexer(Indexer::without_file_hash(kind, Levels::default()))
        }
        /// Feeds the next bytes.
        pub fn feed(&mut self, data: &[u8]) {
            // The owned sink grows without limit, and chunk counts are bounded
            // by the file size, so the level limit cannot be reached either.
            self.0.feed(data).expect("owned tree sink never fills");
        }
        /// Completes the tree.
        pub fn finish(self) -> Tree {
            let (summary, levels) = self.0.finish().expect("owned tree sink never fills");
            Tree { summary, levels: levels.0 }
        }
    }

    impl Tree {
        /// Indexes a whole byte slice.
        pub fn build(data: &[u8], kind: ChunkerKind) -> Tree {
            let mut ix = TreeIndexer::new(kind);
            ix.feed(data);
            ix.finish()
        }

        /// The tree over chunks given as (chunk id, end offset), in file
        /// order (a shell that chunked and hashed the file itself, on
        /// several threads say); `file_hash` may be unknown. An end before
        /// the previous one counts as an empty chunk.
        pub fn from_chunks(size: u64, kind: ChunkerKind, chunks: &[(Hash, u64)], file_hash: Hash) -> Tree {
            let mut tb = TreeBuilder::new(Levels::default());
            let mut prev = 0u64;
            for &(id, end) in chunks {
                tb.push_chunk(Entry { id, len: end.saturating_sub(prev) })
                    .expect("owned tree sink never fills");
                prev = prev.max(end);
            }
            let (root, height, levels) = tb.finish().expect("owned tree sink never fills");
            Tree::from_parts(Summary { size, root: root.id, height, file_hash, chunking: kind }, levels)
        }

        /// Assembles a tree from a finished indexer's parts.
        pub(crate) fn from_parts(summary: Summary, levels: Levels) -> Tree {
            Tree { summary, levels: levels.0 }
        }

        /// Sets the whole-file hash (a store that hashed the bytes itself
        /// fills in what an upload offer left [`Hash::UNKNOWN`]).
        pub fn set_file_hash(&mut self, file_hash: Hash) {
            self.summary.file_hash = file_hash;
        }

        /// What identifies this version.
        pub fn summary(&self) -> Summary {
            self.summary
        }

        /// The root id.
        pub fn root(&self) -> Hash {
            self.summary.root
        }

        /// Number of chunks.
        pub fn chunks(&self) -> usize {
            self.levels.first().map_or(0, |l| l.ids.len())
        }

        /// Serializes the tree for an index file.
        pub fn to_bytes(&self) -> Vec<u8> {
            postcard::to_allocvec(self).expect("serializing into a Vec cannot fail")
        }

        /// Reads only the summary at the start of bytes written by
        /// [`Tree::to_bytes`] (a few dozen bytes suffice), without the tree.
        pub fn summary_from_prefix(prefix: &[u8]) -> Option<Summary> {
            postcard::take_from_bytes::<Summary>(prefix).ok().map(|(s, _)| s)
        }

        /// Reads a tree written by [`Tree::to_bytes`], checking its shape.
        pub fn from_bytes(bytes: &[u8]) -> Option<Tree> {
            let t: Tree = postcard::from_bytes(bytes).ok()?;
            t.is_consistent().then_some(t)
        }

        /// Like [`Tree::from_bytes`] for bytes that may go on after the
        /// tree; returns the tree and what follows it.
        pub fn take_from_bytes(bytes: &[u8]) -> Option<(Tree, &[u8])> {
            let (t, rest): (Tree, &[u8]) = postcard::take_from_bytes(bytes).ok()?;
            t.is_consistent().then_some((t, rest))
        }

        pub(crate) fn is_consistent(&self) -> bool {
            let h = usize::from(self.summary.height);
            if self.levels.len() != h + 1 || self.levels[h].ids.len() != 1 {
                return false;
            }
            if self.levels[h].ids[0] != self.summary.root {
                return false;
            }
            self.levels.iter().enumerate().all(|(i, l)| {
                let n = l.ids.len();
                let sizes_ok = l.ends.len() == n
                    && l.ends.windows(2).all(|w| w[0] <= w[1])
                    && l.ends.last().copied().unwrap_or(0) == self.summary.size;
                let kids_ok = if i == 0 {
                    l.child_ends.is_empty()
                } else {
                    l.child_ends.len() == n
                        && l.child_ends.windows(2).all(|w| w[0] <= w[1])
                        && l.child_ends.last().copied().unwrap_or(0) as usize == self.levels[i - 1].ids.len()
                };
                sizes_ok && kids_ok
            })
        }
    }

    impl TreeView for Tree {
        fn height(&self) -> u8 {
            self.summary.height
        }
        fn level_len(&self, level: u8) -> u32 {
            self.levels.get(usize::from(level)).map_or(0, |l| l.ids.len() as u32)
        }
        fn entry(&self, level: u8, index: u32) -> Option<NodeRef> {
            let l = self.levels.get(usize::from(level))?;
            let i = index as usize;
            let id = *l.ids.get(i)?;
            let end = l.ends[i];
            let offset = if i == 0 { 0 } else { l.ends[i - 1] };
            Some(NodeRef { id, offset, len: end - offset })
        }
        fn first_child(&self, level: u8, index: u32) -> Option<u32> {
            if level == 0 {
                return None;
            }
            let l = self.levels.get(usize::from(level))?;
            let i = index as usize;
            if i > l.child_ends.len() {
                return None;
            }
            Some(if i == 0 { 0 } else { l.child_ends[i - 1] })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_bytes;

    #[test]
    fn empty_file_has_an_empty_root_at_level_one() {
        let t = Tree::build(&[], ChunkerKind::Cdc);
        assert_eq!(t.summary().height, 1);
        assert_eq!(t.level_len(1), 1);
        assert_eq!(t.level_len(0), 0);
        assert_eq!(t.summary().file_hash, Hash::of(&[]));
    }

    #[test]
    fn tree_is_consistent_and_covers_the_file() {
        for len in [1usize, 4095, 4096, 4097, 300_000, 2_000_000] {
            let data = random_bytes(len as u64, len);
            let t = Tree::build(&data, ChunkerKind::Cdc);
            assert!(t.is_consistent(), "len {len}");
            assert_eq!(t.summary().file_hash, Hash::of(&data));
            for l in 0..=t.height() {
                let n = t.level_len(l);
                let last = t.entry(l, n - 1).unwrap();
                assert_eq!(last.offset + last.len, len as u64);
                if l > 0 {
                    assert_eq!(t.first_child(l, n), Some(t.level_len(l - 1)));
                }
            }
            let all = t.leaf_range(t.height(), 0).unwrap();
            assert_eq!(all, 0..t.level_len(0));
            // Chunk ids are the SHA-256 of their bytes.
            let c = t.entry(0, 0).unwrap();
            assert_eq!(c.id, Hash::of(&data[..c.len as usize]));
        }
    }

    #[test]
    fn one_inserted_byte_changes_only_one_path() {
        let old = random_bytes(9, 8 << 20);
        let mut new = old.clone();
        new.insert(0, 1);
        let a = Tree::build(&old, ChunkerKind::Cdc);
        let b = Tree::build(&new, ChunkerKind::Cdc);
        let mut changed = 0;
        for l in 0..=b.height() {
            for i in 0..b.level_len(l) {
                let id = b.entry(l, i).unwrap().id;
                if !(0..a.level_len(l)).any(|j| a.entry(l, j).unwrap().id == id) {
                    changed += 1;
                }
            }
        }
        // One chunk and roughly one node per level.
        assert!(changed <= 2 * usize::from(b.height()) + 1, "{changed} new entries");
    }

    #[test]
    fn serialization_round_trips_and_rejects_tampering() {
        let data = random_bytes(5, 500_000);
        let t = Tree::build(&data, ChunkerKind::Cdc);
        let bytes = t.to_bytes();
        assert_eq!(Tree::summary_from_prefix(&bytes[..120]), Some(t.summary()));
        assert_eq!(Tree::from_bytes(&bytes), Some(t));
        assert_eq!(Tree::from_bytes(&bytes[..bytes.len() / 2]), None);
    }

    #[test]
    fn fixed_tree_matches_owned_tree() {
        let data = random_bytes(3, 200_000);
        let owned = Tree::build(&data, ChunkerKind::Cdc);
        let (s, fixed) = FixedTree::<256>::build(&data, ChunkerKind::Cdc).unwrap();
        assert_eq!(s, owned.summary());
        for l in 0..=owned.height() {
            assert_eq!(fixed.level_len(l), owned.level_len(l));
            for i in 0..=owned.level_len(l) {
                assert_eq!(fixed.entry(l, i), owned.entry(l, i));
                if l > 0 {
                    assert_eq!(fixed.first_child(l, i), owned.first_child(l, i));
                }
            }
        }
        assert_eq!(FixedTree::<4>::build(&data, ChunkerKind::Cdc).err(), Some(TreeFull));
    }

    #[test]
    fn identical_chunks_still_converge_to_one_root() {
        let data = vec![0u8; 3 << 20];
        let t = Tree::build(&data, ChunkerKind::Fixed(64));
        assert_eq!(t.level_len(t.height()), 1);
        assert!(t.is_consistent());
    }
}

/// Two versions seen as one: the entries of `b` follow those of `a` at every
/// level, and its bytes follow `a`'s. A receiver holding an old version and
/// the partial result of an interrupted transfer reuses both through this.
pub struct Chain<A, B> {
    /// The first tree.
    pub a: A,
    /// The second tree.
    pub b: B,
    /// Bytes covered by `a`.
    pub a_size: u64,
}

impl<A: TreeView, B: TreeView> Chain<A, B> {
    fn a_len(&self, level: u8) -> u32 {
        if level <= self.a.height() { self.a.level_len(level) } else { 0 }
    }
    fn b_len(&self, level: u8) -> u32 {
        if level <= self.b.height() { self.b.level_len(level) } else { 0 }
    }
}

impl<A: TreeView, B: TreeView> TreeView for Chain<A, B> {
    fn height(&self) -> u8 {
        self.a.height().max(self.b.height())
    }
    fn level_len(&self, level: u8) -> u32 {
        self.a_len(level) + self.b_len(level)
    }
    fn entry(&self, level: u8, index: u32) -> Option<NodeRef> {
        let n = self.a_len(level);
        if index < n {
            return self.a.entry(level, index);
        }
        let e = self.b.entry(level, index - n)?;
        Some(NodeRef { offset: e.offset + self.a_size, ..e })
    }
    fn first_child(&self, level: u8, index: u32) -> Option<u32> {
        let n = self.a_len(level);
        if index < n {
            return self.a.first_child(level, index);
        }
        let below = self.a_len(level - 1);
        if index == n && self.b_len(level) == 0 {
            return Some(below);
        }
        Some(self.b.first_child(level, index - n)? + below)
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use crate::testutil::random_bytes;

    #[test]
    fn a_chain_lists_both_trees_with_shifted_offsets() {
        let x = random_bytes(1, 300_000);
        let y = random_bytes(2, 40_000);
        let (tx, ty) = (Tree::build(&x, ChunkerKind::Cdc), Tree::build(&y, ChunkerKind::Cdc));
        let c = Chain { a: &tx, b: &ty, a_size: x.len() as u64 };
        assert_eq!(c.height(), tx.height().max(ty.height()));
        // Every entry of y appears with its offset moved past x, and its
        // leaves are the matching chunks.
        for l in 0..=ty.height() {
            for i in 0..ty.level_len(l) {
                let e = ty.entry(l, i).unwrap();
                let j = c.level_len(l) - ty.level_len(l) + i;
                let ce = c.entry(l, j).unwrap();
                assert_eq!((ce.id, ce.offset, ce.len), (e.id, e.offset + x.len() as u64, e.len));
                let leaves = c.leaf_range(l, j).unwrap();
                let first = c.entry(0, leaves.start).unwrap();
                assert_eq!(first.offset, ce.offset);
                let sum: u64 = leaves.map(|k| c.entry(0, k).unwrap().len).sum();
                assert_eq!(sum, ce.len);
            }
        }
        let empty = Tree::build(&[], ChunkerKind::Cdc);
        let c = Chain { a: &tx, b: &empty, a_size: x.len() as u64 };
        assert_eq!(c.leaf_range(tx.height(), 0), Some(0..tx.level_len(0)));
    }
}
