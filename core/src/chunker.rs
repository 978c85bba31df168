//! Streaming chunkers: fixed-size (the classic mode) and content-defined.
//!
//! A chunker is fed arbitrary slices and reports where the current chunk
//! ends. Its state is the position inside the current chunk (and, for
//! content-defined chunking, the rolling hash), so the boundaries it finds do
//! not depend on how the input was split.
//!
//! Content-defined sizes: minimum 2 KiB, normal 4 KiB, maximum 16 KiB.
//! - A 4 KiB average keeps a small edit cheap: a 4 KiB overwrite touches two or
//!   three chunks, well under the 24 KiB budget, and the per-chunk metadata
//!   (about 11 bytes in a listing) stays under 0.3% of the data.
//! - Skipping the first 2 KiB of every chunk (as FastCDC does) halves the bytes
//!   the rolling hash must scan, which is what lets chunking plus SHA-256 run
//!   near the speed of SHA-256 alone.
//! - Two masks (FastCDC's "normalized chunking") make cuts harder before 4 KiB
//!   and easier after, which narrows the size spread; 16 KiB caps the cost of a
//!   chunk that must be resent and of data that never matches the mask (zeros).
//!
//! Large files use the same scheme with every size doubled `n` times
//! ([`ChunkerKind::CdcScaled`]), chosen by [`ChunkerKind::for_size`] so that
//! a file has at most about [`TARGET_CHUNKS`] chunks: what a peer keeps per
//! chunk (ids, an index) then stays bounded whatever the file's size, as
//! rsync's block size grows with the file.

use serde::{Deserialize, Serialize};

/// Smallest content-defined chunk (except the last of a file).
pub const CDC_MIN: usize = 2 * 1024;
/// Normal content-defined chunk size.
pub const CDC_AVG: usize = 4 * 1024;
/// Largest content-defined chunk.
pub const CDC_MAX: usize = 16 * 1024;
/// Smallest piece [`Chunker::pieces`] cuts (but the last of a range).
pub const PIECE_MIN: usize = 64;
/// Largest piece [`Chunker::pieces`] cuts.
pub const PIECE_MAX: usize = 1024;
/// Smallest fine piece [`Chunker::fine`] cuts (but the last of a range).
pub const FINE_MIN: usize = 16;
/// Largest fine piece [`Chunker::fine`] cuts: its length fits one byte.
pub const FINE_MAX: usize = 128;
/// Largest fixed chunk size accepted from a peer.
pub const FIXED_MAX: u32 = 1 << 20;
/// Smallest fixed chunk size accepted from a peer: tiny chunks would make
/// the other side build a tree with an entry for every few bytes.
pub const FIXED_MIN: u32 = 1024;
/// Largest scale of [`ChunkerKind::CdcScaled`]: 4 MiB normal chunks, 16 MiB
/// at most.
pub const CDC_MAX_SHIFT: u8 = 10;
/// The chunk count [`ChunkerKind::for_size`] aims below: 2^18 (1 GiB in
/// 4 KiB chunks).
pub const TARGET_CHUNKS: u64 = 1 << 18;
/// A kind [`suits`](ChunkerKind::suits) a size that would take up to 1.5 x
/// [`TARGET_CHUNKS`] normal chunks, so a file that grows a little past a
/// scale's range keeps its kind (and its chunks) for the next delta.
pub const MAX_CHUNKS: u64 = TARGET_CHUNKS * 3 / 2;

// Cut when the top bits of the gear hash are all zero: 12 bits (1 in 4096)
// before the normal size, 10 bits (1 in 1024) after, one more of each per
// doubling of the sizes. The high bits are used because they depend on the
// most input bytes (up to 64).
const fn top_bits(n: u32) -> u64 {
    !0u64 << (64 - n)
}

/// How a file is cut into chunks. Both peers must use the same kind for
/// their versions to share chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ChunkerKind {
    /// Content-defined (gear hash, FastCDC-style), 2/4/16 KiB.
    #[default]
    Cdc,
    /// Fixed-size chunks of the given length, the classic rsync-like mode.
    Fixed(u32),
    /// Content-defined with the sizes of [`Cdc`](ChunkerKind::Cdc) doubled
    /// `n` times (1..=[`CDC_MAX_SHIFT`]), for large files.
    CdcScaled(u8),
}

impl ChunkerKind {
    /// The classic 4096-byte fixed mode.
    pub const CLASSIC: ChunkerKind = ChunkerKind::Fixed(4096);

    /// Whether a peer may ask for this kind.
    pub fn is_valid(&self) -> bool {
        match *self {
            ChunkerKind::Cdc => true,
            ChunkerKind::Fixed(n) => (FIXED_MIN..=FIXED_MAX).contains(&n),
            ChunkerKind::CdcScaled(n) => (1..=CDC_MAX_SHIFT).contains(&n),
        }
    }

    /// The content-defined kind for a file of `size` bytes: the finest whose
    /// normal chunk cuts it into at most [`TARGET_CHUNKS`] chunks (4 KiB up to
    /// 1 GiB, 8 KiB up to 2 GiB, ...; the coarsest beyond 1 TiB).
    pub fn for_size(size: u64) -> ChunkerKind {
        let mut shift = 0u8;
        while shift < CDC_MAX_SHIFT && size > ((CDC_AVG as u64) << shift) * TARGET_CHUNKS {
            shift += 1;
        }
        Self::cdc(shift)
    }

    /// `kind` if it [suits](Self::suits) a file of `size` bytes and is not
    /// coarser than it needs to be, otherwise [`for_size`](Self::for_size).
    /// Peers that chunk a new version with the kind of the old one share its
    /// chunks, so a delta across a scale boundary stays a delta.
    pub fn keep_or_choose(kind: Option<ChunkerKind>, size: u64) -> ChunkerKind {
        let fresh = Self::for_size(size);
        match kind {
            Some(k) if k.suits(size) && k.normal_chunk() <= 2 * fresh.normal_chunk() => k,
            _ => fresh,
        }
    }

    /// Whether a peer may be asked to hold the tree of `size` bytes cut this
    /// way: at most [`MAX_CHUNKS`] normal chunks (so a server's memory per
    /// transfer stays bounded), or the coarsest kind there is.
    pub fn suits(&self, size: u64) -> bool {
        self.is_valid()
            && (size.div_ceil(self.normal_chunk() as u64) <= MAX_CHUNKS
                || *self == ChunkerKind::CdcScaled(CDC_MAX_SHIFT))
    }

    fn cdc(shift: u8) -> ChunkerKind {
        if shift == 0 { ChunkerKind::Cdc } else { ChunkerKind::CdcScaled(shift) }
    }

    /// How many times the content-defined sizes are doubled (`None` for a
    /// fixed kind).
    fn shift(&self) -> Option<u32> {
        match *self {
            ChunkerKind::Cdc => Some(0),
            ChunkerKind::CdcScaled(n) => Some(u32::from(n.min(CDC_MAX_SHIFT))),
            ChunkerKind::Fixed(_) => None,
        }
    }

    /// The normal (fixed: the only) chunk size of this kind.
    pub fn normal_chunk(&self) -> usize {
        match (*self, self.shift()) {
            (ChunkerKind::Fixed(n), _) => (n as usize).max(1),
            (_, s) => CDC_AVG << s.unwrap_or(0),
        }
    }

    /// The largest chunk this kind produces.
    pub fn max_chunk(&self) -> usize {
        match (*self, self.shift()) {
            (ChunkerKind::Fixed(n), _) => (n as usize).max(1),
            (_, s) => CDC_MAX << s.unwrap_or(0),
        }
    }
}

/// 256 pseudo-random 64-bit values for the gear hash, generated at compile
/// time with splitmix64 from a fixed seed (any fixed table works; both peers
/// only need the same one).
const GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut s: u64 = 0x6465_6c74_6173_796e; // "deltasyn"
    let mut i = 0;
    while i < 256 {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        t[i] = z ^ (z >> 31);
        i += 1;
    }
    t
};

/// A streaming chunk-boundary finder.
#[derive(Clone, Debug)]
pub struct Chunker {
    kind: ChunkerKind,
    /// Content-defined sizes and masks (unused for a fixed kind).
    cdc: Cdc,
    /// Bytes already in the current chunk.
    pos: usize,
    hash: u64,
}

#[derive(Clone, Copy, Debug)]
struct Cdc {
    min: usize,
    avg: usize,
    max: usize,
    hard: u64,
    easy: u64,
    /// Bits the hash shifts per byte: 1, so that a cut depends on the 64
    /// bytes before it; 4 for fine pieces, so that it depends on the 16
    /// before it only, and cuts of the same bytes from two starts agree
    /// again a few fine pieces on. (Devices cut with 1 only.)
    #[cfg(feature = "alloc")]
    step: u32,
}

impl Chunker {
    /// A chunker at the start of a chunk.
    pub fn new(kind: ChunkerKind) -> Self {
        let s = kind.shift().unwrap_or(0);
        let cdc = Cdc {
            min: CDC_MIN << s,
            avg: CDC_AVG << s,
            max: CDC_MAX << s,
            hard: top_bits(12 + s),
            easy: top_bits(10 + s),
            #[cfg(feature = "alloc")]
            step: 1,
        };
        Chunker { kind, cdc, pos: 0, hash: 0 }
    }

    /// A chunker of pieces: content-defined cuts 64 to 1,024 bytes apart
    /// (256 normally), which deltas within a chunk compare (see
    /// [`crate::message::Message::GetPieces`]).
    pub fn pieces() -> Self {
        let cdc = Cdc {
            min: PIECE_MIN,
            avg: 256,
            max: PIECE_MAX,
            hard: top_bits(8),
            easy: top_bits(6),
            #[cfg(feature = "alloc")]
            step: 1,
        };
        Chunker { kind: ChunkerKind::Cdc, cdc, pos: 0, hash: 0 }
    }

    /// A chunker of pieces whose cuts resynchronise at once: 64 to 1,024
    /// bytes apart (320 normally: 1 in 256 after the first 64), each cut
    /// decided by the 16 bytes before it, not by where the piece started.
    /// [`Chunker::pieces`] cuts with two masks and a 64-byte hash, so after
    /// a changed byte its cuts can take a kilobyte to fall where the old
    /// bytes' did, and every piece until then differs; these fall there
    /// again one or two pieces on (see
    /// [`crate::message::Message::GetPiecesV2`]).
    #[cfg(feature = "alloc")]
    pub fn pieces_v2() -> Self {
        let cdc = Cdc { min: PIECE_MIN, avg: PIECE_MIN, max: PIECE_MAX, hard: 0, easy: top_bits(8), step: 4 };
        Chunker { kind: ChunkerKind::Cdc, cdc, pos: 0, hash: 0 }
    }

    /// A chunker of fine pieces: content-defined cuts 16 to 128 bytes
    /// apart (32 normally: 1 in 16 after the first 16), each decided by
    /// the 16 bytes before it, which a changed piece is compared by (see
    /// [`crate::message::Message::GetFine`]).
    #[cfg(feature = "alloc")]
    pub fn fine() -> Self {
        let cdc = Cdc { min: FINE_MIN, avg: FINE_MIN, max: FINE_MAX, hard: 0, easy: top_bits(4), step: 4 };
        Chunker { kind: ChunkerKind::Cdc, cdc, pos: 0, hash: 0 }
    }

    /// The kind of chunking.
    pub fn kind(&self) -> ChunkerKind {
        self.kind
    }

    /// Bytes in the current, unfinished chunk.
    pub fn pending(&self) -> usize {
        self.pos
    }

    /// Forgets the current chunk (after the caller ended it, e.g. at EOF).
    pub fn reset(&mut self) {
        self.pos = 0;
        self.hash = 0;
    }

    /// Scans `data`, which continues the current chunk. Returns `Some(n)` when
    /// the chunk ends after `data[..n]` (the chunker then starts a new chunk
    /// at `data[n]`), or `None` when all of `data` belongs to the current chunk.
    pub fn next_boundary(&mut self, data: &[u8]) -> Option<usize> {
        match self.kind {
            ChunkerKind::Fixed(size) => {
                let size = size.max(1) as usize;
                let want = size - self.pos;
                if data.len() >= want {
                    self.reset();
                    Some(want)
                } else {
                    self.pos += data.len();
                    None
                }
            }
            ChunkerKind::Cdc | ChunkerKind::CdcScaled(_) => self.next_cdc(data),
        }
    }

    fn next_cdc(&mut self, data: &[u8]) -> Option<usize> {
        let Cdc { min, avg, max, hard, easy, .. } = self.cdc;
        #[cfg(feature = "alloc")]
        let step = self.cdc.step;
        #[cfg(not(feature = "alloc"))]
        let step = 1;
        // `i` indexes `data`; the byte data[i] sits at chunk position pos + i.
        let mut i = 0usize;
        if self.pos < min {
            let skip = min - self.pos;
            if data.len() < skip {
                self.pos += data.len();
                return None;
            }
            i = skip;
        }
        let base = self.pos;
        let mut h = self.hash;
        // Hard mask up to the normal size.
        if base + i < avg {
            let end = (avg - base).min(data.len());
            if let Some(n) = scan(&data[i..end], &mut h, hard, step) {
                self.reset();
                return Some(i + n);
            }
            i = end;
        }
        // Easy mask up to the maximum; the byte that makes the chunk `max`
        // long always ends it.
        let end = (max - base).min(data.len());
        if i < end {
            if let Some(n) = scan(&data[i..end], &mut h, easy, step) {
                self.reset();
                return Some(i + n);
            }
            i = end;
        }
        if base + i == max {
            self.reset();
            return Some(i);
        }
        self.pos = base + i;
        self.hash = h;
        None
    }
}

/// Rolls the gear hash over `bytes`; returns the length up to and including
/// the first byte after which `h & mask == 0`.
#[inline(always)]
fn scan(bytes: &[u8], h: &mut u64, mask: u64, step: u32) -> Option<usize> {
    if cfg!(feature = "alloc") && step == 4 {
        scan_by::<4>(bytes, h, mask)
    } else {
        scan_by::<1>(bytes, h, mask)
    }
}

/// [`scan`] with the hash shifted `STEP` bits per byte.
fn scan_by<const STEP: u32>(bytes: &[u8], h: &mut u64, mask: u64) -> Option<usize> {
    let mut x = *h;
    for (k, &b) in bytes.iter().enumerate() {
        x = (x << STEP).wrapping_add(GEAR[b as usize]);
        if x & mask == 0 {
            *h = x;
            return Some(k + 1);
        }
    }
    *h = x;
    None
}

/// Calls `f` with the length of every complete chunk of `data` (cut as one
/// whole stream), and returns the length of the trailing partial chunk.
pub fn for_each_chunk(kind: ChunkerKind, data: &[u8], f: impl FnMut(&[u8])) -> usize {
    for_each_cut(Chunker::new(kind), data, f)
}

/// Calls `f` with every piece of `data` (see [`Chunker::pieces`]), cut
/// from its start, the last one ending with it.
pub fn for_each_piece(data: &[u8], f: impl FnMut(&[u8])) {
    for_each_cut(Chunker::pieces(), data, f);
}

/// Calls `f` with every piece of `data` as [`Chunker::pieces_v2`] cuts
/// them from its start, the last one ending with it.
#[cfg(feature = "alloc")]
pub fn for_each_piece_v2(data: &[u8], f: impl FnMut(&[u8])) {
    for_each_cut(Chunker::pieces_v2(), data, f);
}

/// Calls `f` with every fine piece of `data` ([`Chunker::fine`]), the last
/// one ending with `data`.
#[cfg(feature = "alloc")]
pub fn for_each_fine(data: &[u8], f: impl FnMut(&[u8])) {
    for_each_cut(Chunker::fine(), data, f);
}

/// Calls `f` with every part of `data` that `c` cuts, the last one ending
/// with `data`; returns that last part's length if `c` did not end it.
fn for_each_cut(mut c: Chunker, data: &[u8], mut f: impl FnMut(&[u8])) -> usize {
    let mut rest = data;
    while let Some(n) = c.next_boundary(rest) {
        f(&rest[..n]);
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        f(rest);
    }
    rest.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_bytes;
    use proptest::prelude::*;

    fn cuts(kind: ChunkerKind, data: &[u8], splits: &[usize]) -> Vec<usize> {
        let mut c = Chunker::new(kind);
        let mut out = Vec::new();
        let mut consumed = 0usize;
        let mut start = 0usize;
        let mut bounds = vec![0, data.len()];
        bounds.extend(splits.iter().copied().filter(|p| *p < data.len()));
        bounds.sort_unstable();
        for w in bounds.windows(2) {
            let mut piece = &data[w[0]..w[1]];
            while let Some(n) = c.next_boundary(piece) {
                consumed += n;
                out.push(consumed - start);
                start = consumed;
                piece = &piece[n..];
            }
            consumed += piece.len();
        }
        out
    }

    #[test]
    fn fixed_cuts_every_size_bytes() {
        let data = [0u8; 10_000];
        assert_eq!(&cuts(ChunkerKind::CLASSIC, &data, &[1, 4095, 4097])[..], &[4096, 4096]);
    }

    #[test]
    fn cdc_sizes_stay_in_bounds_and_average_near_4k() {
        let data = random_bytes(1, 4 << 20);
        let all = cuts(ChunkerKind::Cdc, &data, &[]);
        assert!(all.iter().all(|&n| (CDC_MIN..=CDC_MAX).contains(&n)));
        let avg = all.iter().sum::<usize>() / all.len();
        assert!((3500..5500).contains(&avg), "average chunk {avg}");
    }

    #[test]
    fn zeros_cut_at_a_fixed_period() {
        let data = [0u8; 100_000];
        let all = cuts(ChunkerKind::Cdc, &data, &[]);
        assert!(all.len() >= 6);
        assert!(all.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn an_insertion_only_disturbs_nearby_chunks() {
        let old = random_bytes(2, 1 << 20);
        let mut new = old.clone();
        new.insert(0, 0x55);
        let a = cuts(ChunkerKind::Cdc, &old, &[]);
        let b = cuts(ChunkerKind::Cdc, &new, &[]);
        // Everything after the first chunk is shared.
        assert_eq!(&a[1..], &b[1..]);
    }

    #[test]
    fn peers_may_only_ask_for_sane_chunk_sizes() {
        assert!(ChunkerKind::Cdc.is_valid());
        assert!(ChunkerKind::CLASSIC.is_valid());
        assert!(!ChunkerKind::Fixed(1).is_valid());
        assert!(!ChunkerKind::Fixed(FIXED_MIN - 1).is_valid());
        assert!(!ChunkerKind::Fixed(FIXED_MAX + 1).is_valid());
    }

    #[test]
    fn scaled_sizes_stay_in_bounds_and_average_near_their_normal_size() {
        let data = random_bytes(3, 16 << 20);
        for shift in 1..=3u8 {
            let kind = ChunkerKind::CdcScaled(shift);
            let all = cuts(kind, &data, &[]);
            let (min, max) = (CDC_MIN << shift, kind.max_chunk());
            assert!(all[..all.len() - 1].iter().all(|&n| (min..=max).contains(&n)), "shift {shift}");
            let avg = all.iter().sum::<usize>() / all.len();
            let normal = kind.normal_chunk();
            assert!(avg > normal * 7 / 8 && avg < normal * 11 / 8, "shift {shift}: average {avg}");
        }
    }

    #[test]
    fn the_kind_for_a_size_keeps_the_chunk_count_bounded() {
        const GIB: u64 = 1 << 30;
        assert_eq!(ChunkerKind::for_size(0), ChunkerKind::Cdc);
        assert_eq!(ChunkerKind::for_size(GIB), ChunkerKind::Cdc);
        assert_eq!(ChunkerKind::for_size(GIB + 1), ChunkerKind::CdcScaled(1));
        assert_eq!(ChunkerKind::for_size(5 * GIB), ChunkerKind::CdcScaled(3));
        assert_eq!(ChunkerKind::for_size(u64::MAX), ChunkerKind::CdcScaled(CDC_MAX_SHIFT));
        for size in [1, GIB, 3 * GIB + 7, 100 * GIB, 1 << 40] {
            let k = ChunkerKind::for_size(size);
            assert!(k.suits(size) && k.is_valid());
            assert!(size.div_ceil(k.normal_chunk() as u64) <= TARGET_CHUNKS, "{size}");
        }
        // Too fine for the size: a server refuses to hold such a tree.
        assert!(!ChunkerKind::Cdc.suits(2 * GIB));
        assert!(!ChunkerKind::Fixed(FIXED_MIN).suits(GIB));
        assert!(!ChunkerKind::CdcScaled(CDC_MAX_SHIFT + 1).suits(1));
        // The coarsest kind takes any size.
        assert!(ChunkerKind::CdcScaled(CDC_MAX_SHIFT).suits(u64::MAX));
    }

    #[test]
    fn a_file_keeps_its_kind_near_a_scale_boundary() {
        const GIB: u64 = 1 << 30;
        let keep = ChunkerKind::keep_or_choose;
        // Grown a little past 1 GiB: still 4 KiB chunks, shared with the old version.
        assert_eq!(keep(Some(ChunkerKind::Cdc), GIB + 1), ChunkerKind::Cdc);
        // Grown past 1.5 GiB: the next scale.
        assert_eq!(keep(Some(ChunkerKind::Cdc), 2 * GIB), ChunkerKind::CdcScaled(1));
        // Shrunk a little below a boundary: one scale coarser is kept, two are not.
        assert_eq!(keep(Some(ChunkerKind::CdcScaled(1)), GIB - 1), ChunkerKind::CdcScaled(1));
        assert_eq!(keep(Some(ChunkerKind::CdcScaled(2)), GIB - 1), ChunkerKind::Cdc);
        assert_eq!(keep(None, 3 * GIB), ChunkerKind::CdcScaled(2));
        assert_eq!(keep(Some(ChunkerKind::Fixed(0)), 10), ChunkerKind::Cdc);
    }

    #[test]
    fn gear_table_has_no_repeats() {
        let mut sorted = GEAR.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    proptest! {
        #[test]
        fn boundaries_do_not_depend_on_how_input_is_split(
            seed in any::<u64>(),
            len in 0usize..200_000,
            splits in proptest::collection::vec(0usize..200_000, 0..40),
            kind in prop_oneof![
                Just(ChunkerKind::Cdc),
                (1u32..9000).prop_map(ChunkerKind::Fixed),
                (1u8..=2).prop_map(ChunkerKind::CdcScaled),
            ],
        ) {
            let data = random_bytes(seed, len);
            let whole = cuts(kind, &data, &[]);
            let split = cuts(kind, &data, &splits);
            prop_assert_eq!(whole, split);
        }
    }
}
