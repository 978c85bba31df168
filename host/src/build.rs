//! Building a tree from a file with several threads, streaming through fixed
//! buffers (std only).
//!
//! 1. Each thread chunks its own slice of the file, starting from a fresh
//!    chunker there, and hashes each chunk while its bytes are in cache.
//! 2. The boundaries are stitched: the true chain continues from the end of
//!    each slice until it lands on a boundary the next thread found; from a
//!    common boundary on, both chains are identical (a chunker's cuts depend
//!    only on the bytes since the last cut), so the rest is adopted. This takes
//!    a few chunks (re-hashed), and the result equals a sequential run.
//! 3. The whole-file SHA-256 runs beside, on its own thread.
//! 4. The tree is built from the chunk ids (cheap: about 0.3% of the bytes).

use deltasync_core::Hash;
use deltasync_core::chunker::{Chunker, ChunkerKind};
use deltasync_core::tree::Tree;
use sha2::{Digest, Sha256};
use std::io;

/// Size of each thread's read buffer.
const PIECE: usize = 1 << 20;

/// Threads worth using for [`build_tree`] on this machine.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Positional reads from something that several threads may read at once.
pub trait ReadAt: Sync {
    /// Total length.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = self.get(start..start + buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

/// Calls `f` on consecutive pieces of `src[from..to]`.
fn pieces<R: ReadAt + ?Sized>(src: &R, from: u64, to: u64, mut f: impl FnMut(u64, &[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; PIECE.min((to - from) as usize).max(1)];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(buf.len());
        src.read_exact_at(at, &mut buf[..n])?;
        f(at, &buf[..n]);
        at += n as u64;
    }
    Ok(())
}

/// A group of chunks (see [`crate::hints`]) hashed by the thread that read
/// its bytes: (start offset, end offset, BLAKE3).
pub(crate) type Group = (u64, u64, [u8; 32]);

/// Chunks as (SHA-256, end offset) and the groups hashed with them.
pub(crate) type Chunked = (Vec<(Hash, u64)>, Vec<Group>);

/// What one thread found in its slice: chunks as (end offset, SHA-256) and,
/// if asked, its groups.
type Segment = (Vec<(u64, Hash)>, Vec<Group>);

/// Chunks of `src[from..to]` found by a fresh chunker at `from`, each hashed
/// while its bytes are still in cache. A trailing partial chunk is included
/// only when `to` is the end of the file. With `grouped`, the chunks are also
/// cut into groups from `from` on, each BLAKE3-hashed from the same bytes.
fn chunk_segment<R: ReadAt + ?Sized>(
    src: &R,
    kind: ChunkerKind,
    from: u64,
    to: u64,
    grouped: bool,
) -> io::Result<Segment> {
    let mut c = Chunker::new(kind);
    let mut h = Sha256::new();
    let mut out = Vec::with_capacity(((to - from) / 4096) as usize + 1);
    let mut groups = Vec::new();
    let (mut g, mut g_start, mut g_count) = (blake3::Hasher::new(), from, 0u32);
    pieces(src, from, to, |at, piece| {
        let (mut base, mut data) = (at, piece);
        // BLAKE3 is given a group's bytes in one slice where it can (it is
        // fastest on long inputs), not chunk by chunk: `piece[g_from..]`
        // is what it has not seen yet.
        let mut g_from = 0;
        while let Some(n) = c.next_boundary(data) {
            h.update(&data[..n]);
            base += n as u64;
            let id = Hash(core::mem::replace(&mut h, Sha256::new()).finalize().into());
            out.push((base, id));
            if grouped {
                g_count += 1;
                if crate::hints::ends_group(&id, g_count) {
                    let end = (base - at) as usize;
                    g.update(&piece[g_from..end]);
                    g_from = end;
                    groups.push((g_start, base, *g.finalize().as_bytes()));
                    (g_start, g_count) = (base, 0);
                    g.reset();
                }
            }
            data = &data[n..];
        }
        h.update(data);
        if grouped {
            g.update(&piece[g_from..]);
        }
    })?;
    if to == src.size() && out.last().map_or(from, |e| e.0) < to {
        out.push((to, Hash(h.finalize().into())));
    }
    Ok((out, groups))
}

/// The chunk that starts at `data[0]`, a cut: (length, SHA-256). `data`
/// holds at least a chunk's maximum length, or the rest of the file.
pub(crate) fn first_chunk(kind: ChunkerKind, data: &[u8]) -> (usize, Hash) {
    let len = Chunker::new(kind).next_boundary(data).unwrap_or(data.len());
    (len, Hash::of(&data[..len]))
}

/// The true chain's next chunk after `pos`: one read of at most a chunk's
/// maximum length, which always holds the next cut.
fn next_chunk<R: ReadAt + ?Sized>(src: &R, kind: ChunkerKind, pos: u64) -> io::Result<(u64, Hash)> {
    let n = (kind.max_chunk() as u64).min(src.size() - pos) as usize;
    let mut buf = vec![0u8; n];
    src.read_exact_at(pos, &mut buf)?;
    let (len, id) = first_chunk(kind, &buf);
    Ok((pos + len as u64, id))
}

/// Every chunk of `src` as (SHA-256, end offset), exactly as a sequential
/// chunker finds them, using `threads` threads.
pub fn chunk_ids<R: ReadAt + ?Sized>(
    src: &R,
    kind: ChunkerKind,
    threads: usize,
) -> io::Result<Vec<(Hash, u64)>> {
    Ok(chunk_ids_from(src, kind, threads, 0, false)?.0)
}

/// Like [`chunk_ids`] for the chunks after `from`, which must be a cut of
/// the true chain (or 0). With `grouped`, also the groups whose chunks were
/// taken from the thread that hashed the group (so each group's hash and its
/// chunks' ids come from one read of the bytes).
pub(crate) fn chunk_ids_from<R: ReadAt + ?Sized>(
    src: &R,
    kind: ChunkerKind,
    threads: usize,
    from: u64,
    grouped: bool,
) -> io::Result<Chunked> {
    let len = src.size();
    let threads = threads.clamp(1, 64);
    let bounds: Vec<u64> = (0..=threads as u64).map(|k| from + (len - from) * k / threads as u64).collect();
    let per: Vec<Segment> = std::thread::scope(|s| {
        let bounds = &bounds;
        let hs: Vec<_> = (0..threads)
            .map(|k| s.spawn(move || chunk_segment(src, kind, bounds[k], bounds[k + 1], grouped)))
            .collect();
        hs.into_iter().map(|h| h.join().expect("chunking thread panicked")).collect::<io::Result<_>>()
    })?;
    // Thread 0 started at a true chunk start: its chunks are true. Each later
    // thread's chunks become true from the first cut the true chain shares
    // with it.
    let mut all: Vec<(u64, Hash)> = per[0].0.clone();
    let mut groups: Vec<Group> = per[0].1.clone();
    let mut pos = all.last().map_or(from, |e| e.0);
    let mut k = 1;
    while pos < len {
        let (cut, id) = next_chunk(src, kind, pos)?;
        all.push((cut, id));
        pos = cut;
        while k < threads && per[k].0.last().is_none_or(|e| e.0 < cut) {
            k += 1;
        }
        if let Some(i) = per.get(k).and_then(|c| c.0.binary_search_by_key(&cut, |e| e.0).ok()) {
            all.extend_from_slice(&per[k].0[i + 1..]);
            groups.extend(per[k].1.iter().filter(|g| g.0 >= cut));
            pos = all.last().map_or(pos, |e| e.0);
            k += 1;
        }
    }
    Ok((all.into_iter().map(|(end, id)| (id, end)).collect(), groups))
}

/// Whole-file SHA-256.
pub fn file_hash<R: ReadAt + ?Sized>(src: &R) -> io::Result<Hash> {
    let mut h = Sha256::new();
    pieces(src, 0, src.size(), |_, d| h.update(d))?;
    Ok(Hash(h.finalize().into()))
}

/// Builds the tree of `src` with `threads` threads. Equal to
/// [`Tree::build`] on the same bytes.
pub fn build_tree<R: ReadAt + ?Sized>(src: &R, kind: ChunkerKind, threads: usize) -> io::Result<Tree> {
    build(src, kind, threads, true)
}

/// Like [`build_tree`] without the whole-file SHA-256 (left
/// [`Hash::UNKNOWN`]): what an uploading client offers, and what a receiver
/// needs of the version it reuses. Saves one sequential pass over the file.
pub fn build_tree_unhashed<R: ReadAt + ?Sized>(
    src: &R,
    kind: ChunkerKind,
    threads: usize,
) -> io::Result<Tree> {
    build(src, kind, threads, false)
}

fn build<R: ReadAt + ?Sized>(src: &R, kind: ChunkerKind, threads: usize, hashed: bool) -> io::Result<Tree> {
    let (chunks, file) = std::thread::scope(|s| {
        let file = hashed.then(|| s.spawn(|| file_hash(src)));
        let chunks = chunk_ids(src, kind, threads);
        let file = file.map_or(Ok(Hash::UNKNOWN), |f| f.join().expect("hashing thread panicked"));
        (chunks, file)
    });
    Ok(tree_of_chunks(src.size(), kind, &chunks?, file?))
}

/// The tree over chunks given as (SHA-256, end offset).
pub(crate) fn tree_of_chunks(size: u64, kind: ChunkerKind, chunks: &[(Hash, u64)], file_hash: Hash) -> Tree {
    Tree::from_chunks(size, kind, chunks, file_hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltasync_core::sim::random_bytes;
    use deltasync_core::tree::Summary;
    use proptest::prelude::*;

    #[test]
    fn parallel_equals_sequential_on_large_inputs() {
        let mut data = random_bytes(4, 9 << 20);
        data[3 << 20..(5 << 20)].fill(0);
        for threads in [1, 2, 3, 8] {
            for kind in [ChunkerKind::Cdc, ChunkerKind::CLASSIC] {
                let t = build_tree(&data[..], kind, threads).unwrap();
                assert_eq!(t, Tree::build(&data, kind), "threads {threads} {kind:?}");
            }
        }
    }

    #[test]
    fn unhashed_trees_lack_only_the_file_hash() {
        let data = random_bytes(5, 300_000);
        let full = build_tree(&data[..], ChunkerKind::Cdc, 2).unwrap();
        let bare = build_tree_unhashed(&data[..], ChunkerKind::Cdc, 2).unwrap();
        assert_eq!(bare.summary().file_hash, Hash::UNKNOWN);
        assert_eq!(full.summary().file_hash, Hash::of(&data));
        assert_eq!(Summary { file_hash: full.summary().file_hash, ..bare.summary() }, full.summary());
        assert_eq!(bare.chunks(), full.chunks());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn parallel_equals_sequential(seed in any::<u64>(), len in 0usize..100_000, threads in 1usize..7, zeros in any::<bool>()) {
            let data = if zeros { vec![0u8; len] } else { random_bytes(seed, len) };
            let t = build_tree(&data[..], ChunkerKind::Cdc, threads).unwrap();
            prop_assert_eq!(t, Tree::build(&data, ChunkerKind::Cdc));
        }
    }
}
