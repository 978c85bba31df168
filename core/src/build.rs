//! Building a tree from a file with several threads, streaming through fixed
//! buffers (std only).
//!
//! 1. Each thread finds chunk boundaries in its own slice of the file,
//!    starting from a fresh chunker there.
//! 2. The boundaries are stitched: the true chain continues from the end of
//!    each slice until it lands on a boundary the next thread found; from a
//!    common boundary on, both chains are identical (a chunker's cuts depend
//!    only on the bytes since the last cut), so the rest is adopted. This takes
//!    a few chunks, and the result equals a sequential run exactly.
//! 3. Chunks are hashed in parallel, and the whole-file SHA-256 runs beside.
//! 4. The tree is built from the chunk ids (cheap: about 0.3% of the bytes).

use crate::chunker::{Chunker, ChunkerKind};
use crate::hash::Hash;
use crate::tree::{Entry, Levels, Summary, Tree, TreeBuilder};
use sha2::{Digest, Sha256};
use std::io;
use std::vec;
use std::vec::Vec;

/// Size of each thread's read buffer.
const PIECE: usize = 1 << 20;

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
        let src = self
            .get(start..start + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
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
fn pieces<R: ReadAt + ?Sized>(
    src: &R,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, &[u8]) -> bool,
) -> io::Result<()> {
    let mut buf = vec![0u8; PIECE.min((to - from) as usize).max(1)];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(buf.len());
        src.read_exact_at(at, &mut buf[..n])?;
        if !f(at, &buf[..n]) {
            break;
        }
        at += n as u64;
    }
    Ok(())
}

/// Cuts (chunk end offsets) found by a fresh chunker from `from` up to `to`.
fn cuts_in<R: ReadAt + ?Sized>(
    src: &R,
    kind: ChunkerKind,
    from: u64,
    to: u64,
) -> io::Result<Vec<u64>> {
    let mut c = Chunker::new(kind);
    let mut out = Vec::new();
    pieces(src, from, to, |at, mut data| {
        let mut base = at;
        while let Some(n) = c.next_boundary(data) {
            base += n as u64;
            out.push(base);
            data = &data[n..];
        }
        true
    })?;
    Ok(out)
}

/// The next cut of the true chain after `pos` (or the file end): one read of
/// at most a chunk's maximum length, which always holds the next cut.
fn next_cut<R: ReadAt + ?Sized>(src: &R, kind: ChunkerKind, pos: u64) -> io::Result<u64> {
    let n = (kind.max_chunk() as u64).min(src.size() - pos) as usize;
    let mut buf = vec![0u8; n];
    src.read_exact_at(pos, &mut buf)?;
    Ok(Chunker::new(kind)
        .next_boundary(&buf)
        .map_or(pos + n as u64, |k| pos + k as u64))
}

/// Every chunk end of `src`, as a sequential chunker would find them, using
/// `threads` threads.
pub fn chunk_ends<R: ReadAt + ?Sized>(
    src: &R,
    kind: ChunkerKind,
    threads: usize,
) -> io::Result<Vec<u64>> {
    let len = src.size();
    let threads = threads.clamp(1, 64);
    let bounds: Vec<u64> = (0..=threads as u64)
        .map(|k| len * k / threads as u64)
        .collect();
    let per: Vec<Vec<u64>> = std::thread::scope(|s| {
        let bounds = &bounds;
        let hs: Vec<_> = (0..threads)
            .map(|k| s.spawn(move || cuts_in(src, kind, bounds[k], bounds[k + 1])))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("chunking thread panicked"))
            .collect::<io::Result<_>>()
    })?;
    // Thread 0 started at a true chunk start: its cuts are true.
    let mut all: Vec<u64> = per[0].clone();
    let mut pos = all.last().copied().unwrap_or(0);
    let mut k = 1;
    while pos < len {
        let cut = next_cut(src, kind, pos)?;
        while k < threads && per[k].last().is_none_or(|&l| l < cut) {
            k += 1;
        }
        if let Some(i) = per.get(k).and_then(|c| c.binary_search(&cut).ok()) {
            // Same cut, same state from here: adopt the rest of thread k's cuts.
            all.extend_from_slice(&per[k][i..]);
            pos = *all.last().expect("just extended");
            k += 1;
        } else {
            all.push(cut);
            pos = cut;
        }
    }
    Ok(all)
}

/// SHA-256 of each chunk `ends[i-1]..ends[i]`.
fn hash_chunks<R: ReadAt + ?Sized>(
    src: &R,
    ends: &[u64],
    first_start: u64,
) -> io::Result<Vec<Hash>> {
    let mut ids = Vec::with_capacity(ends.len());
    let Some(&last) = ends.last() else {
        return Ok(ids);
    };
    let mut h = Sha256::new();
    let mut i = 0;
    pieces(src, first_start, last, |at, mut data| {
        let mut at = at;
        while !data.is_empty() {
            let take = ((ends[i] - at) as usize).min(data.len());
            h.update(&data[..take]);
            data = &data[take..];
            at += take as u64;
            if at == ends[i] {
                ids.push(Hash(
                    core::mem::replace(&mut h, Sha256::new()).finalize().into(),
                ));
                i += 1;
            }
        }
        true
    })?;
    Ok(ids)
}

/// Whole-file SHA-256.
pub fn file_hash<R: ReadAt + ?Sized>(src: &R) -> io::Result<Hash> {
    let mut h = Sha256::new();
    pieces(src, 0, src.size(), |_, d| {
        h.update(d);
        true
    })?;
    Ok(Hash(h.finalize().into()))
}

/// Builds the tree of `src` with `threads` threads. Equal to
/// [`Tree::build`] on the same bytes.
pub fn build_tree<R: ReadAt + ?Sized>(
    src: &R,
    kind: ChunkerKind,
    threads: usize,
) -> io::Result<Tree> {
    let (chunks, file) = std::thread::scope(|s| {
        let file = s.spawn(|| file_hash(src));
        let chunks = chunk_ids(src, kind, threads);
        (chunks, file.join().expect("hashing thread panicked"))
    });
    let mut tb = TreeBuilder::new(Levels::default());
    let mut prev = 0u64;
    for (id, end) in chunks? {
        tb.push_chunk(Entry {
            id,
            len: end - prev,
        })
        .expect("owned tree sink never fills");
        prev = end;
    }
    let (root, height, levels) = tb.finish().expect("owned tree sink never fills");
    let summary = Summary {
        size: src.size(),
        root: root.id,
        height,
        file_hash: file?,
        chunking: kind,
    };
    Ok(Tree::from_parts(summary, levels))
}

/// Every chunk of `src` as (SHA-256, end offset), found and hashed with
/// `threads` threads.
pub fn chunk_ids<R: ReadAt + ?Sized>(
    src: &R,
    kind: ChunkerKind,
    threads: usize,
) -> io::Result<Vec<(Hash, u64)>> {
    let threads = threads.max(1);
    let ends = chunk_ends(src, kind, threads)?;
    // Split the chunks into groups of about equal bytes, one per thread.
    let len = src.size();
    let mut groups = Vec::new();
    let mut lo = 0usize;
    for k in 1..=threads as u64 {
        let target = len * k / threads as u64;
        let hi = ends.partition_point(|&e| e <= target).max(lo);
        groups.push((lo, hi));
        lo = hi;
    }
    if let Some(g) = groups.last_mut() {
        g.1 = ends.len();
    }
    let ids: Vec<Vec<Hash>> = std::thread::scope(|s| {
        let hs: Vec<_> = groups
            .iter()
            .map(|&(lo, hi)| {
                let ends = &ends;
                s.spawn(move || {
                    hash_chunks(src, &ends[lo..hi], if lo == 0 { 0 } else { ends[lo - 1] })
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("hashing thread panicked"))
            .collect::<io::Result<_>>()
    })?;
    Ok(ids.into_iter().flatten().zip(ends).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_bytes;
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
