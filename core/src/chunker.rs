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

use serde::{Deserialize, Serialize};

/// Smallest content-defined chunk (except the last of a file).
pub const CDC_MIN: usize = 2 * 1024;
/// Normal content-defined chunk size.
pub const CDC_AVG: usize = 4 * 1024;
/// Largest content-defined chunk.
pub const CDC_MAX: usize = 16 * 1024;
/// Largest fixed chunk size accepted from a peer.
pub const FIXED_MAX: u32 = 1 << 20;
/// Smallest fixed chunk size accepted from a peer: tiny chunks would make
/// the other side build a tree with an entry for every few bytes.
pub const FIXED_MIN: u32 = 1024;

// Cut when these bits of the gear hash are all zero: 12 bits (1 in 4096)
// before the normal size, 10 bits (1 in 1024) after. The high bits are used
// because they depend on the most input bytes (up to 64).
const MASK_HARD: u64 = 0xfff0_0000_0000_0000;
const MASK_EASY: u64 = 0xffc0_0000_0000_0000;

/// How a file is cut into chunks. Both peers must use the same kind for
/// their versions to share chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ChunkerKind {
    /// Content-defined (gear hash, FastCDC-style), 2/4/16 KiB.
    #[default]
    Cdc,
    /// Fixed-size chunks of the given length, the classic rsync-like mode.
    Fixed(u32),
}

impl ChunkerKind {
    /// The classic 4096-byte fixed mode.
    pub const CLASSIC: ChunkerKind = ChunkerKind::Fixed(4096);

    /// Whether a peer may ask for this kind.
    pub fn is_valid(&self) -> bool {
        match *self {
            ChunkerKind::Cdc => true,
            ChunkerKind::Fixed(n) => (FIXED_MIN..=FIXED_MAX).contains(&n),
        }
    }

    /// The largest chunk this kind produces.
    pub fn max_chunk(&self) -> usize {
        match *self {
            ChunkerKind::Cdc => CDC_MAX,
            ChunkerKind::Fixed(n) => n as usize,
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
    /// Bytes already in the current chunk.
    pos: usize,
    hash: u64,
}

impl Chunker {
    /// A chunker at the start of a chunk.
    pub fn new(kind: ChunkerKind) -> Self {
        Chunker { kind, pos: 0, hash: 0 }
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
            ChunkerKind::Cdc => self.next_cdc(data),
        }
    }

    fn next_cdc(&mut self, data: &[u8]) -> Option<usize> {
        // `i` indexes `data`; the byte data[i] sits at chunk position pos + i.
        let mut i = 0usize;
        if self.pos < CDC_MIN {
            let skip = CDC_MIN - self.pos;
            if data.len() < skip {
                self.pos += data.len();
                return None;
            }
            i = skip;
        }
        let base = self.pos;
        let mut h = self.hash;
        // Hard mask up to the normal size.
        if base + i < CDC_AVG {
            let end = (CDC_AVG - base).min(data.len());
            if let Some(n) = scan(&data[i..end], &mut h, MASK_HARD) {
                self.reset();
                return Some(i + n);
            }
            i = end;
        }
        // Easy mask up to the maximum; the byte that makes the chunk CDC_MAX
        // long always ends it.
        let end = (CDC_MAX - base).min(data.len());
        if i < end {
            if let Some(n) = scan(&data[i..end], &mut h, MASK_EASY) {
                self.reset();
                return Some(i + n);
            }
            i = end;
        }
        if base + i == CDC_MAX {
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
fn scan(bytes: &[u8], h: &mut u64, mask: u64) -> Option<usize> {
    let mut x = *h;
    for (k, &b) in bytes.iter().enumerate() {
        x = (x << 1).wrapping_add(GEAR[b as usize]);
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
pub fn for_each_chunk(kind: ChunkerKind, data: &[u8], mut f: impl FnMut(&[u8])) -> usize {
    let mut c = Chunker::new(kind);
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
            fixed in prop_oneof![Just(None), (1u32..9000).prop_map(Some)],
        ) {
            let data = random_bytes(seed, len);
            let kind = fixed.map_or(ChunkerKind::Cdc, ChunkerKind::Fixed);
            let whole = cuts(kind, &data, &[]);
            let split = cuts(kind, &data, &splits);
            prop_assert_eq!(whole, split);
        }
    }
}
