//! The receiver of a sync: holds an old version (or nothing), walks the
//! sender's tree from the root, asks only for what it does not hold, rebuilds
//! the new version in order and verifies it.
//!
//! The walk: every entry the sender lists is looked up by short id among all
//! entries (chunks and nodes, any level) of the old version. A hit is reused
//! wherever it was in the old file, so moved data costs nothing; a missing
//! chunk is fetched; a missing node is expanded with `GetChildren`. Runs of
//! adjacent missing chunks are fetched with one `GetData`.
//!
//! Verification: reused chunks keep their (trusted, stored) ids, fetched bytes
//! are re-chunked and hashed, and the tree is rebuilt from them; the new
//! version is accepted only if its root and size equal the offer's, and its
//! whole-file SHA-256 too when the offer carries one. Otherwise the outcome
//! is [`Outcome::Integrity`] and the shell keeps its old version. An upload
//! offer may leave that hash unknown: the new tree then leaves it unknown
//! too, and the server's store computes it over the bytes it wrote (see
//! [`crate::conn::server::Store::finish`]). An offer may also leave its root
//! unknown (a first upload that starts before the sender has hashed): then
//! nothing is walked or reused, every byte is fetched, and the root that
//! follows in `Message::Root` is checked like an offered one.

use crate::chunker::{FINE_MAX, FINE_MIN, PIECE_MAX, PIECE_MIN};
use crate::error::{ErrorCode, SessionError};
use crate::hash::{ShortId, piece_id};
use crate::machine::{self, Machine, Poll};
use crate::message::{self, DELTA_MAX, HOST_INFLIGHT, MAX_INFLIGHT, Message, Outcome};
use crate::source::{Output, Source};
use crate::time::{IDLE_TIMEOUT_MS, Instant};
use crate::tree::{Entry, Indexer, Levels, Summary, Tree, TreeView};
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

/// Bytes per millisecond a sender is assumed to hash at least (16 MB/s):
/// once a rootless offer's bytes are all in, its root is waited for the
/// idle timeout plus as long as hashing them at that rate takes.
const ROOT_RATE: u64 = 16_000;

/// Bytes copied per read when reusing old data.
const COPY_BUF: usize = 256 * 1024;

/// The old version a receiver may reuse: its tree and its bytes.
pub struct Base<T, R> {
    /// The old version's tree.
    pub tree: T,
    /// The old version's bytes.
    pub source: R,
}

/// Old bytes a changed run of chunks is compared with, piece by piece: up
/// to this many after the old data before it, and as many before the old
/// data after it; no more than the run's length and a piece on each side,
/// so that the old bytes hashed stay within about four times the changed
/// ones (a run is a chunk at least: 1 KiB or more).
const DELTA_REACH: u64 = DELTA_MAX / 2;

/// How far from the old data around a changed run of `len` bytes its old
/// bytes are looked for (see [`DELTA_REACH`]).
fn reach(len: u64) -> u64 {
    DELTA_REACH.min(len + PIECE_MAX as u64)
}

/// The old bytes a changed stretch is compared with: up to `reach` bytes
/// after the old data before it ends (`after`), and up to `reach` before
/// the old data after it starts (`before`), of an old version of
/// `old_size` bytes. When both are known and in order, the old bytes
/// between them are what the stretch replaced: neither range goes past
/// them (a piece cut at `before` can then match the stretch's last).
fn old_around(after: Option<u64>, before: Option<u64>, reach: u64, old_size: u64) -> [(u64, u64); 2] {
    let limit = match (after, before) {
        (Some(a), Some(b)) if a <= b => b.min(old_size),
        _ => old_size,
    };
    let head = after.map_or((0, 0), |a| (a.min(limit), a.saturating_add(reach).min(limit)));
    let tail = before.map_or((0, 0), |b| (b.saturating_sub(reach).max(head.1).min(b), b.min(old_size)));
    [head, tail]
}

/// Where the old bytes of a segment start in the old version, and how
/// many: a reused entry's or copied bytes' (`None` for fetched ones).
fn old_span<T: TreeView>(tree: &T, s: Option<&Seg>) -> Option<(u64, u64)> {
    match s {
        Some(&Seg::Copy { from, len, .. }) => Some((from, len)),
        Some(&Seg::Reuse { level, index, len, .. }) => tree.entry(level, index).map(|e| (e.offset, len)),
        _ => None,
    }
}

/// A stretch of the new version and where its bytes come from. `cut`: it
/// ends a run of whole chunks (the indexer ends a chunk there).
#[derive(Clone, Copy, Debug)]
enum Seg {
    /// Whole old chunks or nodes, whose ids are known.
    Reuse { at: u64, len: u64, level: u8, index: u32 },
    /// Bytes asked of the sender.
    Fetch { at: u64, len: u64, cut: bool },
    /// Old bytes at `from` that a piece of a changed chunk has (hashed anew).
    Copy { at: u64, len: u64, from: u64, cut: bool },
}

impl Seg {
    fn at(&self) -> u64 {
        match *self {
            Seg::Reuse { at, .. } | Seg::Fetch { at, .. } | Seg::Copy { at, .. } => at,
        }
    }
    fn len(&self) -> u64 {
        match *self {
            Seg::Reuse { len, .. } | Seg::Fetch { len, .. } | Seg::Copy { len, .. } => len,
        }
    }
}

/// A request for bytes: a whole range, or a range whose first `have` bytes
/// the receiver holds at old offset `from` if their id is `id`.
#[derive(Clone, Copy, Debug)]
enum Get {
    Data { offset: u64, len: u64 },
    Suffix { offset: u64, len: u64, have: u64, id: ShortId, from: u64 },
}

/// A changed run of chunks (`segs[seg]`) to compare piece by piece with
/// the old bytes `old` (up to two ranges); or with `fine`, one changed
/// piece to compare fine piece by fine piece.
#[derive(Clone, Debug)]
struct Refine {
    seg: usize,
    old: [(u64, u64); 2],
    fine: bool,
}

#[derive(Clone, Copy, Debug)]
struct Expand {
    level: u8,
    index: u32,
    count: u32,
    /// File bytes the nodes cover; their children must add up to this.
    bytes: u64,
}

#[derive(Clone, Copy, Debug)]
enum Sent {
    Children {
        level: u8,
        bytes: u64,
        covered: u64,
    },
    /// `suffix`: (have, from) of a `GetSuffix`, until its first frame.
    Data {
        offset: u64,
        len: u64,
        got: u64,
        suffix: Option<(u64, u64)>,
    },
    /// `GetPieces` (or `GetFine`) for `refine[k]`'s run, `covered` bytes
    /// listed so far.
    Pieces {
        k: usize,
        covered: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Start,
    Walk,
    /// Changed chunks are compared piece by piece (`GetPieces`).
    Refine,
    Transfer,
    Finished(Outcome),
}

/// Counters a shell reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// File bytes received from the sender.
    pub literal_bytes: u64,
    /// File bytes taken from the old version.
    pub reused_bytes: u64,
    /// Tree entries received.
    pub entries: u64,
}

/// Rebuilds one version from a sender, reusing an old version. It finishes
/// with the outcome but does not send `Done`: its owner does, once it has
/// published (or discarded) the result.
pub struct Receiver<T, R, W> {
    offer: Summary,
    /// The offer came without its root (it follows in `Root`).
    rootless: bool,
    /// Once every byte is in and only the root is missing: until when it is
    /// waited for.
    root_deadline: Option<Instant>,
    salt: [u8; 8],
    base: Option<Base<T, R>>,
    /// The version held now (root, size): an offer of it is unchanged.
    current: Option<(crate::Hash, u64)>,
    /// Every old entry: (short id, level, index, len), sorted by short id.
    held: Vec<(ShortId, u8, u32, u64)>,
    phase: Phase,
    expand: VecDeque<Expand>,
    sent: VecDeque<Sent>,
    segs: Vec<Seg>,
    fetch: VecDeque<Get>,
    /// May ask for deltas within chunks (the sender announced
    /// [`crate::message::CAP_DELTA`]).
    deltas: bool,
    /// With deltas, may also compare changed runs piece by piece.
    by_pieces: bool,
    /// And compare a changed piece by its fine pieces (the sender announced
    /// [`crate::message::CAP_FINE`]).
    fine: bool,
    /// The changed pieces are being compared by their fine pieces.
    fine_round: bool,
    /// Runs compared piece by piece, and the next one to ask for.
    refine: Vec<Refine>,
    refine_next: usize,
    /// Pieces of the run being listed: (offset, len, id).
    pieces: Vec<(u64, u64, ShortId)>,
    /// What each compared run became, by its index in `segs`.
    splits: Vec<(usize, Vec<Seg>)>,
    /// The last run, asked as a suffix.
    suffix: Option<Get>,
    /// The whole file is asked as the suffix of the old one (no walk yet).
    probing: bool,
    /// That was refused: the old bytes are not the new ones' start.
    probe_refused: bool,
    cursor: usize,
    /// `None` once the output took over indexing (a whole version is
    /// fetched) or once the tree is finished.
    indexer: Option<Indexer<Levels>>,
    /// Bytes given to the output.
    written: u64,
    new_tree: Option<Tree>,
    out: W,
    buf: Vec<u8>,
    deadline: Instant,
    stats: ReceiveStats,
    /// zstd's context and the buffer `DataZ` frames are decompressed into.
    #[cfg(feature = "compress")]
    unzstd: Option<alloc::boxed::Box<(zstd::bulk::Decompressor<'static>, Vec<u8>)>>,
}

impl<T: TreeView, R: Source, W: Output> Receiver<T, R, W> {
    /// A receiver of the version `offer` describes, reusing `base` if given
    /// and writing the new version to `out`. `salt` comes from the handshake.
    pub fn new(
        offer: Summary,
        salt: [u8; 8],
        base: Option<Base<T, R>>,
        out: W,
        now: Instant,
    ) -> Result<Self, SessionError> {
        // A kind too fine for the size would make the new tree unbounded.
        if !offer.chunking.suits(offer.size) {
            return Err(SessionError::Protocol(ErrorCode::Unsupported));
        }
        let mut held = Vec::new();
        if let Some(b) = &base {
            for level in 0..=b.tree.height() {
                for index in 0..b.tree.level_len(level) {
                    if let Some(e) = b.tree.entry(level, index).filter(|e| e.len > 0) {
                        held.push((e.id.short(&salt), level, index, e.len));
                    }
                }
            }
            held.sort_unstable_by_key(|h| h.0);
        }
        let current = base.as_ref().and_then(|b| b.tree.entry(b.tree.height(), 0)).map(|r| (r.id, r.len));
        Ok(Receiver {
            offer,
            rootless: !offer.root.is_known(),
            root_deadline: None,
            salt,
            base,
            current,
            held,
            phase: Phase::Start,
            expand: VecDeque::new(),
            sent: VecDeque::new(),
            segs: Vec::new(),
            fetch: VecDeque::new(),
            deltas: false,
            by_pieces: true,
            fine: false,
            fine_round: false,
            refine: Vec::new(),
            refine_next: 0,
            pieces: Vec::new(),
            splits: Vec::new(),
            suffix: None,
            probing: false,
            probe_refused: false,
            cursor: 0,
            // An offer without the whole-file hash leaves it to the shell
            // (which hashes what it writes, on its own thread).
            indexer: Some(if offer.file_hash.is_known() && !out.hashes_file() {
                Indexer::new(offer.chunking, Levels::default())
            } else {
                Indexer::without_file_hash(offer.chunking, Levels::default())
            }),
            written: 0,
            new_tree: None,
            out,
            buf: Vec::new(),
            deadline: now.plus_ms(IDLE_TIMEOUT_MS),
            stats: ReceiveStats::default(),
            #[cfg(feature = "compress")]
            unzstd: None,
        })
    }

    /// Sets the version the receiver holds now (root and size), when that is
    /// not its whole base: a server's base chains the stored version with
    /// what an interrupted upload left, and only the first is stored. An
    /// offer of exactly this version ends [`Outcome::Unchanged`] at once;
    /// any other is assembled (from the base wherever it can).
    pub fn holding(mut self, current: Option<(crate::Hash, u64)>) -> Self {
        self.current = current;
        self
    }

    /// Asks for changed chunks as deltas against old bytes when `on` (set
    /// only if the sender announced [`crate::message::CAP_DELTA`]): the
    /// suffix of a last chunk that extends the old last one
    /// (`GetSuffix`), and the pieces of a changed run of chunks that the old
    /// bytes around it lack (`GetPieces`).
    pub fn deltas(mut self, on: bool) -> Self {
        self.deltas = on;
        self
    }

    /// With deltas on, also compares a changed piece by its fine pieces
    /// (`GetFine`), if `on` (set only if the sender announced
    /// [`crate::message::CAP_FINE`]).
    ///
    /// Such a sender also lists the walk's entries with shorter ids
    /// (`GetChildrenV2`): the old entries are looked up by as much of
    /// their ids.
    pub fn fine(mut self, on: bool) -> Self {
        if on && !self.fine {
            for h in &mut self.held {
                h.0 = message::short_as(h.0, message::ENTRY_ID_V2);
            }
            self.held.sort_unstable_by_key(|h| h.0);
        }
        self.fine = on;
        self
    }

    /// Most requests in flight: a sender that answers fine pieces queues
    /// [`HOST_INFLIGHT`].
    fn inflight(&self) -> usize {
        if self.fine { HOST_INFLIGHT } else { MAX_INFLIGHT }
    }

    /// Bytes of each id in the walk's entries.
    fn entry_width(&self) -> usize {
        if self.fine { message::ENTRY_ID_V2 } else { 8 }
    }

    /// Bytes of each id in a `Pieces` answer.
    fn piece_width(&self) -> usize {
        if self.fine { message::PIECE_ID_V2 } else { 8 }
    }

    /// With deltas on, asks only for suffixes, never for pieces: which
    /// pieces of a chunk the old bytes hold is for a sender that may read
    /// them (a suffix's id tells no more than the SHA-256 of the old
    /// version, which `Stat` tells every key that may write it).
    pub fn without_pieces(mut self) -> Self {
        self.by_pieces = false;
        self
    }

    /// A `DataZ` frame: decompressed (to exactly `raw` bytes, at most a
    /// frame's worth), then taken as `Data`.
    #[cfg(feature = "compress")]
    fn on_data_z(&mut self, offset: u64, raw: u32, bytes: &[u8]) -> Result<(), SessionError> {
        let bad = SessionError::Protocol(ErrorCode::BadMessage);
        let raw = raw as usize;
        if raw == 0 || raw > crate::frame::MAX_DATA {
            return Err(bad);
        }
        let mut z = match self.unzstd.take() {
            Some(z) => z,
            None => {
                let ctx = zstd::bulk::Decompressor::new().map_err(|_| SessionError::Capacity)?;
                alloc::boxed::Box::new((ctx, Vec::with_capacity(crate::frame::MAX_DATA)))
            }
        };
        let (ctx, out) = &mut *z;
        out.clear();
        // Fails if the frame is damaged or holds more than the buffer's
        // room (a frame's worth); any other size than `raw` is refused too.
        let ok = matches!(ctx.decompress_to_buffer(bytes, out), Ok(n) if n == raw);
        let r = if ok { self.on_data(offset, &z.1) } else { Err(bad) };
        self.unzstd = Some(z);
        r
    }

    /// The version being received.
    pub fn offer(&self) -> &Summary {
        &self.offer
    }

    /// Counters so far.
    pub fn stats(&self) -> ReceiveStats {
        self.stats
    }

    /// Bytes of the new version assembled so far.
    pub fn progress(&self) -> u64 {
        self.written
    }

    /// The output, and the new version's tree if it was written and verified.
    pub fn into_parts(self) -> (W, Option<Tree>) {
        (self.out, self.new_tree)
    }

    fn lookup(&self, short: ShortId, len: u64) -> Option<(u8, u32)> {
        let i = self.held.partition_point(|h| h.0 < short);
        self.held[i..].iter().take_while(|h| h.0 == short).find(|h| h.3 == len).map(|h| (h.1, h.2))
    }

    /// Decides what to do with one entry of the sender's tree.
    fn classify(&mut self, level: u8, index: u32, at: u64, short: ShortId, len: u64) {
        if let Some((l, i)) = self.lookup(short, len) {
            self.segs.push(Seg::Reuse { at, len, level: l, index: i });
        } else if level == 0 {
            self.segs.push(Seg::Fetch { at, len, cut: true });
        } else {
            match self.expand.back_mut() {
                // `index` comes from the peer's `start`: any u32.
                Some(e)
                    if e.level == level && e.index.checked_add(e.count) == Some(index) && e.count < 1024 =>
                {
                    e.count += 1;
                    e.bytes += len;
                }
                _ => self.expand.push_back(Expand { level, index, count: 1, bytes: len }),
            }
        }
    }

    fn start(&mut self) -> Result<(), SessionError> {
        if self.current.is_some_and(|(root, size)| root == self.offer.root && size == self.offer.size) {
            self.phase = Phase::Finished(Outcome::Unchanged);
            return Ok(());
        }
        let old_size = self.old_size();
        if self.offer.size == 0 {
            self.phase = Phase::Transfer;
        } else if self.held.is_empty() || self.rootless {
            // Nothing to reuse, or no root to walk from (it is checked once
            // `Root` arrives): skip the walk and fetch the whole file. The
            // output may index it as it goes, off this thread.
            if self.out.index_in_background(self.offer.chunking) {
                self.indexer = None;
            }
            self.segs.push(Seg::Fetch { at: 0, len: self.offer.size, cut: true });
            self.plan_transfer();
        } else if self.deltas
            && let Some(have) = old_size.filter(|&n| n >= 1 && n < self.offer.size && n <= DELTA_MAX)
        {
            // A small file that grew, most likely appended to: its old
            // bytes are offered as the new one's start before any walk.
            let id = self.old_id(0, have)?;
            self.probing = true;
            self.segs.push(Seg::Fetch { at: 0, len: self.offer.size, cut: true });
            self.fetch.push_back(Get::Suffix { offset: 0, len: self.offer.size, have, id, from: 0 });
            self.phase = Phase::Transfer;
        } else {
            self.walk();
        }
        Ok(())
    }

    /// Starts the walk of the sender's tree from its root.
    fn walk(&mut self) {
        let short = message::short_as(self.offer.root.short(&self.salt), self.entry_width());
        self.classify(self.offer.height, 0, 0, short, self.offer.size);
        self.phase = Phase::Walk;
    }

    /// The old version's size, if there is one.
    fn old_size(&self) -> Option<u64> {
        let tree = &self.base.as_ref()?.tree;
        let last = tree.entry(0, tree.level_len(0).checked_sub(1)?)?;
        Some(last.offset + last.len)
    }

    /// The id (see [`piece_id`]) of old bytes `from..from + len`.
    fn old_id(&mut self, from: u64, len: u64) -> Result<ShortId, SessionError> {
        let base = self.base.as_mut().ok_or(SessionError::Read)?;
        let mut old = vec![0u8; len as usize];
        base.source.read_at(from, &mut old).map_err(|_| SessionError::Read)?;
        Ok(piece_id(&self.salt, &old))
    }

    /// The sender's bytes of a `GetSuffix` range do not start with the old
    /// ones offered: the range is asked whole, or after a first probe, the
    /// tree is walked.
    fn suffix_refused(&mut self, offset: u64, len: u64) {
        if core::mem::take(&mut self.probing) {
            self.probe_refused = true;
            self.segs.clear();
            self.walk();
        } else {
            self.fetch.push_front(Get::Data { offset, len });
        }
    }

    /// Orders the segments found by the walk and queues the fetches.
    fn plan_transfer(&mut self) {
        self.segs.sort_unstable_by_key(Seg::at);
        let mut merged: Vec<Seg> = Vec::with_capacity(self.segs.len());
        for s in self.segs.drain(..) {
            match (merged.last_mut(), s) {
                (Some(Seg::Fetch { at, len, .. }), Seg::Fetch { at: a2, len: l2, .. })
                    if *at + *len == a2 =>
                {
                    *len += l2
                }
                _ => merged.push(s),
            }
        }
        self.segs = merged;
        self.queue_fetches();
    }

    /// Queues a request for every fetched segment, and starts the transfer.
    fn queue_fetches(&mut self) {
        self.fetch = self
            .segs
            .iter()
            .filter_map(|s| match *s {
                Seg::Fetch { at, len, .. } => Some(match self.suffix {
                    Some(g @ Get::Suffix { offset, .. }) if offset == at => g,
                    _ => Get::Data { offset: at, len },
                }),
                Seg::Reuse { .. } | Seg::Copy { .. } => None,
            })
            .collect();
        self.phase = Phase::Transfer;
    }

    /// After the walk, with deltas on: finds the changed runs of chunks
    /// worth a delta against the old bytes around them. The last run, if
    /// it is longer than what follows the old data before it, is asked as
    /// that data's suffix (an appended log); any other run of at most
    /// [`DELTA_MAX`] is compared piece by piece with the old bytes next to
    /// the old data around it.
    fn plan_deltas(&mut self) -> Result<(), SessionError> {
        let Some(old_size) = self.old_size() else {
            return Ok(());
        };
        let Some(base) =
            self.base.as_mut().filter(|_| self.deltas && !self.rootless && self.indexer.is_some())
        else {
            return Ok(());
        };
        let last = self.segs.len() - 1;
        for (i, seg) in self.segs.iter().enumerate() {
            let Seg::Fetch { at, len, .. } = *seg else { continue };
            // The old bytes that the run most likely replaced lie after the
            // old data before it and before the old data after it.
            let after =
                if i == 0 { Some(0) } else { old_span(&base.tree, self.segs.get(i - 1)).map(|(o, l)| o + l) };
            let before = if i == last {
                Some(old_size)
            } else {
                old_span(&base.tree, self.segs.get(i + 1)).map(|(o, _)| o)
            };
            if i == last
                && let Some(from) = after
                && let have = old_size.saturating_sub(from)
                && have >= 1
                && have < len
                && have <= DELTA_MAX
                // Not the probe again, refused already.
                && !(self.probe_refused && at == 0 && from == 0)
            {
                let mut old = vec![0u8; have as usize];
                base.source.read_at(from, &mut old).map_err(|_| SessionError::Read)?;
                let id = piece_id(&self.salt, &old);
                self.suffix = Some(Get::Suffix { offset: at, len, have, id, from });
                continue;
            }
            if len > DELTA_MAX || !self.by_pieces {
                continue;
            }
            let old = old_around(after, before, reach(len), old_size);
            if old.iter().any(|&(a, b)| a < b) {
                self.refine.push(Refine { seg: i, old, fine: false });
            }
        }
        if self.refine.is_empty() {
            self.queue_fetches();
        } else {
            self.phase = Phase::Refine;
        }
        Ok(())
    }

    /// Takes a `Pieces` frame of the run asked first.
    fn on_pieces(&mut self, offset: u64, last: bool, packed: &[u8]) -> Result<(), SessionError> {
        let bad = SessionError::Protocol(ErrorCode::BadMessage);
        let Some(Sent::Pieces { k, covered }) = self.sent.front().copied() else {
            return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage));
        };
        let Some(&Seg::Fetch { at, len, .. }) =
            self.refine.get(k).filter(|r| !r.fine).and_then(|r| self.segs.get(r.seg))
        else {
            return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage));
        };
        if offset != at + covered {
            return Err(bad);
        }
        let mut covered = covered;
        for e in message::unpack_entries_as(packed, self.piece_width()) {
            let e = e.map_err(SessionError::Protocol)?;
            // Pieces are cut as the chunker cuts them: only a run's last
            // may be shorter than PIECE_MIN (so a run has at most
            // len / PIECE_MIN + 1, however a sender lists them).
            let short_ok = covered + e.len == len;
            if e.len == 0
                || e.len > PIECE_MAX as u64
                || covered + e.len > len
                || (e.len < PIECE_MIN as u64 && !short_ok)
            {
                return Err(bad);
            }
            self.pieces.push((at + covered, e.len, e.short));
            covered += e.len;
        }
        if !last {
            if let Some(Sent::Pieces { covered: c, .. }) = self.sent.front_mut() {
                *c = covered;
            }
            return Ok(());
        }
        if covered != len {
            return Err(bad);
        }
        self.sent.pop_front();
        let pieces = core::mem::take(&mut self.pieces);
        self.take_split(k, &pieces)
    }

    /// Takes the `Fine` answer to the `GetFine` asked first: every fine
    /// piece of the changed piece, in one frame.
    fn on_fine(&mut self, packed: &[u8]) -> Result<(), SessionError> {
        let bad = SessionError::Protocol(ErrorCode::BadMessage);
        let Some(Sent::Pieces { k, .. }) = self.sent.front().copied() else {
            return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage));
        };
        let Some(&Seg::Fetch { at, len, .. }) =
            self.refine.get(k).filter(|r| r.fine).and_then(|r| self.segs.get(r.seg))
        else {
            return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage));
        };
        let mut pieces = Vec::new();
        let mut covered = 0u64;
        for (id, n) in message::unpack_fine(packed).map_err(SessionError::Protocol)? {
            // Cut as the fine chunker cuts: only the last may be shorter
            // than FINE_MIN.
            let ends = covered + n == len;
            if n == 0 || n > FINE_MAX as u64 || covered + n > len || (n < FINE_MIN as u64 && !ends) {
                return Err(bad);
            }
            pieces.push((at + covered, n, ShortId::from(id)));
            covered += n;
        }
        if covered != len {
            return Err(bad);
        }
        self.sent.pop_front();
        self.take_split(k, &pieces)
    }

    /// Keeps what `refine[k]`'s run becomes, if it reuses anything.
    fn take_split(&mut self, k: usize, pieces: &[(u64, u64, ShortId)]) -> Result<(), SessionError> {
        let split = self.split(k, pieces)?;
        if split.iter().any(|s| matches!(s, Seg::Copy { .. })) {
            self.splits.push((self.refine[k].seg, split));
        }
        Ok(())
    }

    /// The run `refine[k]` as old bytes wherever the old ones around it
    /// have a piece, and fetched bytes elsewhere.
    fn split(&mut self, k: usize, pieces: &[(u64, u64, ShortId)]) -> Result<Vec<Seg>, SessionError> {
        let base = self.base.as_mut().ok_or(SessionError::Read)?;
        let Refine { seg, old, fine } = &self.refine[k];
        let Some(&Seg::Fetch { cut: ends, .. }) = self.segs.get(*seg) else {
            return Err(SessionError::Read);
        };
        // The old pieces: (id, len, offset), sorted.
        let mut old_pieces: Vec<(ShortId, u64, u64)> = Vec::new();
        let mut bytes = Vec::new();
        for &(from, to) in old.iter().filter(|r| r.0 < r.1) {
            bytes.resize((to - from) as usize, 0);
            base.source.read_at(from, &mut bytes).map_err(|_| SessionError::Read)?;
            let mut at = from;
            let (salt, width) = (&self.salt, if self.fine { message::PIECE_ID_V2 } else { 8 });
            let add = |p: &[u8]| {
                let id = if *fine {
                    ShortId::from(message::fine_id(salt, p))
                } else {
                    message::short_as(piece_id(salt, p), width)
                };
                old_pieces.push((id, p.len() as u64, at));
                at += p.len() as u64;
            };
            if *fine {
                crate::chunker::for_each_fine(&bytes, add);
            } else if self.fine {
                crate::chunker::for_each_piece_v2(&bytes, add);
            } else {
                crate::chunker::for_each_piece(&bytes, add);
            }
        }
        old_pieces.sort_unstable();
        let mut out: Vec<Seg> = Vec::new();
        for &(at, len, id) in pieces {
            let i = old_pieces.partition_point(|p| p.0 < id);
            let seg = match old_pieces.get(i) {
                Some(&(pid, plen, from)) if pid == id && plen == len => {
                    Seg::Copy { at, len, from, cut: false }
                }
                _ => Seg::Fetch { at, len, cut: false },
            };
            // Fetched pieces stay apart, so that the first and last of a
            // fetched stretch can be compared by their fine pieces; they
            // are joined before they are asked for (`join_fetches`).
            match (out.last_mut(), seg) {
                (Some(Seg::Copy { len: l, from: f, .. }), Seg::Copy { len: l2, from: f2, .. })
                    if *f + *l == f2 =>
                {
                    *l += l2
                }
                _ => out.push(seg),
            }
        }
        if let Some(Seg::Fetch { cut, .. } | Seg::Copy { cut, .. }) = out.last_mut() {
            *cut = ends;
        }
        Ok(out)
    }

    /// After the runs were compared piece by piece: every fetched piece
    /// next to reused old bytes is compared by its fine pieces with the
    /// old bytes next to those (the first and last piece of a fetched
    /// stretch: a one-byte edit's piece, the ends of an overwritten range).
    /// Returns whether any is.
    fn plan_fine(&mut self) -> bool {
        self.refine.clear();
        self.refine_next = 0;
        let (Some(old_size), Some(base)) = (self.old_size(), self.base.as_ref()) else {
            return false;
        };
        let suffix_at = match self.suffix {
            Some(Get::Suffix { offset, .. }) => Some(offset),
            _ => None,
        };
        for (i, seg) in self.segs.iter().enumerate() {
            // The last run, asked as a suffix, stays whole.
            let Seg::Fetch { at, len, .. } = *seg else { continue };
            if len > PIECE_MAX as u64 || suffix_at == Some(at) {
                continue;
            }
            let after =
                i.checked_sub(1).and_then(|j| old_span(&base.tree, self.segs.get(j))).map(|(o, l)| o + l);
            let before = old_span(&base.tree, self.segs.get(i + 1)).map(|(o, _)| o);
            let old = old_around(after, before, len + FINE_MAX as u64, old_size);
            if old.iter().any(|&(a, b)| a < b) {
                self.refine.push(Refine { seg: i, old, fine: true });
            }
        }
        !self.refine.is_empty()
    }

    /// Joins adjacent fetched stretches that no chunk ends between.
    fn join_fetches(&mut self) {
        let mut joined: Vec<Seg> = Vec::with_capacity(self.segs.len());
        for s in self.segs.drain(..) {
            match (joined.last_mut(), s) {
                (Some(Seg::Fetch { at, len, cut }), Seg::Fetch { at: a2, len: l2, cut: c2 })
                    if !*cut && *at + *len == a2 =>
                {
                    *len += l2;
                    *cut = c2;
                }
                _ => joined.push(s),
            }
        }
        self.segs = joined;
    }

    /// Puts every compared run's pieces in place of the run.
    fn apply_splits(&mut self) {
        if self.splits.is_empty() {
            return;
        }
        self.splits.sort_unstable_by_key(|s| s.0);
        let mut splits = core::mem::take(&mut self.splits).into_iter().peekable();
        let mut segs = Vec::with_capacity(self.segs.len());
        for (i, s) in self.segs.drain(..).enumerate() {
            match splits.next_if(|(k, _)| *k == i) {
                Some((_, parts)) => segs.extend(parts),
                None => segs.push(s),
            }
        }
        self.segs = segs;
    }

    /// Checks that the segments tile the file exactly (a lying sender could
    /// list overlapping or missing ranges).
    fn tiles(&self) -> bool {
        let mut pos = 0u64;
        for s in &self.segs {
            if s.at() != pos || s.len() == 0 {
                return false;
            }
            pos += s.len();
        }
        pos == self.offer.size
    }

    fn on_entries(
        &mut self,
        level: u8,
        start: u32,
        offset: u64,
        last: bool,
        packed: &[u8],
    ) -> Result<(), SessionError> {
        let bad = SessionError::Protocol(ErrorCode::BadMessage);
        let Some(Sent::Children { level: want, bytes, covered }) = self.sent.front().copied() else {
            return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage));
        };
        if level != want {
            return Err(bad);
        }
        let mut at = offset;
        let mut covered = covered;
        for (k, e) in message::unpack_entries_as(packed, self.entry_width()).enumerate() {
            let e = e.map_err(SessionError::Protocol)?;
            let index = u32::try_from(k).ok().and_then(|k| start.checked_add(k)).ok_or(bad)?;
            let end = at.checked_add(e.len).filter(|&end| end <= self.offer.size).ok_or(bad)?;
            // Summed over the frames of one answer: a peer's lengths can
            // add up past u64 (each alone is checked against the size).
            covered = covered.checked_add(e.len).ok_or(bad)?;
            if e.len == 0 || covered > bytes {
                return Err(bad);
            }
            self.stats.entries += 1;
            self.classify(level, index, at, e.short, e.len);
            at = end;
        }
        if last {
            if covered != bytes {
                return Err(bad);
            }
            self.sent.pop_front();
        } else if let Some(Sent::Children { covered: c, .. }) = self.sent.front_mut() {
            *c = covered;
        }
        Ok(())
    }

    fn on_data(&mut self, offset: u64, bytes: &[u8]) -> Result<(), SessionError> {
        let bad = SessionError::Protocol(ErrorCode::BadMessage);
        let Some(Sent::Data { offset: mut o, mut len, got, suffix }) = self.sent.front().copied() else {
            return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage));
        };
        if let Some((have, from)) = suffix {
            // The first frame says whether the sender has the bytes held:
            // it starts after them, or it is empty.
            if bytes.is_empty() && offset == o {
                self.sent.pop_front();
                self.suffix_refused(o, len);
                return Ok(());
            }
            if offset != o + have {
                return Err(bad);
            }
            self.assemble_to(o)?;
            if self.written != o
                || !matches!(self.segs.get(self.cursor), Some(Seg::Fetch { at, .. }) if *at == o)
            {
                return Err(bad);
            }
            self.copy_old(from, have, false)?;
            self.probing = false;
            (o, len) = (o + have, len - have);
            if let Some(front) = self.sent.front_mut() {
                *front = Sent::Data { offset: o, len, got, suffix: None };
            }
        }
        let n = bytes.len() as u64;
        if offset != o + got || n == 0 || got + n > len {
            return Err(bad);
        }
        self.assemble_to(offset)?;
        let Some(&Seg::Fetch { at, len: seg_len, cut }) = self.segs.get(self.cursor) else {
            return Err(bad);
        };
        if self.written != offset {
            return Err(bad);
        }
        self.out.write(bytes).map_err(|_| write_failed(&self.out))?;
        self.written += n;
        if let Some(ix) = self.indexer.as_mut() {
            ix.feed(bytes).map_err(|_| SessionError::Capacity)?;
            if cut && self.written == at + seg_len {
                ix.end_chunk().map_err(|_| SessionError::Capacity)?;
            }
        }
        if self.written == at + seg_len {
            self.cursor += 1;
        }
        self.stats.literal_bytes += n;
        if got + n == len {
            self.sent.pop_front();
        } else if let Some(Sent::Data { got, .. }) = self.sent.front_mut() {
            *got += n;
        }
        Ok(())
    }

    /// Copies every reused segment that starts before `target`.
    fn assemble_to(&mut self, target: u64) -> Result<(), SessionError> {
        loop {
            let (len, level, index) = match self.segs.get(self.cursor) {
                Some(&Seg::Reuse { at, len, level, index }) if at < target => (len, level, index),
                Some(&Seg::Copy { at, len, from, cut }) if at < target => {
                    if self.written != at {
                        return Err(SessionError::Read);
                    }
                    self.copy_old(from, len, cut)?;
                    self.cursor += 1;
                    continue;
                }
                _ => break,
            };
            let (Some(base), Some(ix)) = (self.base.as_mut(), self.indexer.as_mut()) else {
                return Err(SessionError::Read);
            };
            let old = base.tree.entry(level, index).ok_or(SessionError::Read)?;
            if self.buf.is_empty() {
                self.buf = vec![0u8; COPY_BUF];
            }
            // Without a whole-file hash to feed, the output may copy the
            // bytes by itself (inside the kernel, as references to chunks).
            let mut done = match base.source.locate(old.offset, len) {
                Some((src, at))
                    if !ix.hashes_file()
                        && self.out.copy_from(src, at, len).map_err(|_| write_failed(&self.out))? =>
                {
                    ix.skip_known(len);
                    self.written += len;
                    len
                }
                _ => 0,
            };
            while done < len {
                let n = (len - done).min(COPY_BUF as u64) as usize;
                let piece = &mut self.buf[..n];
                base.source.read_at(old.offset + done, piece).map_err(|_| SessionError::Read)?;
                self.out.write(piece).map_err(|_| write_failed(&self.out))?;
                ix.feed_known(piece);
                self.written += n as u64;
                done += n as u64;
            }
            let leaves = base.tree.leaf_range(level, index).ok_or(SessionError::Read)?;
            for i in leaves {
                let c = base.tree.entry(0, i).ok_or(SessionError::Read)?;
                ix.push_known_chunk(Entry { id: c.id, len: c.len }).map_err(|_| SessionError::Capacity)?;
            }
            self.stats.reused_bytes += len;
            self.cursor += 1;
        }
        Ok(())
    }

    /// Writes `len` old bytes from `from` as new ones (hashed anew: no
    /// chunk id is known for them); with `cut`, they end a chunk.
    fn copy_old(&mut self, from: u64, len: u64, cut: bool) -> Result<(), SessionError> {
        let base = self.base.as_mut().ok_or(SessionError::Read)?;
        if self.buf.is_empty() {
            self.buf = vec![0u8; COPY_BUF];
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(COPY_BUF as u64) as usize;
            let piece = &mut self.buf[..n];
            base.source.read_at(from + done, piece).map_err(|_| SessionError::Read)?;
            self.out.write(piece).map_err(|_| write_failed(&self.out))?;
            if let Some(ix) = self.indexer.as_mut() {
                ix.feed(piece).map_err(|_| SessionError::Capacity)?;
            }
            done += n as u64;
        }
        if cut && let Some(ix) = self.indexer.as_mut() {
            ix.end_chunk().map_err(|_| SessionError::Capacity)?;
        }
        self.written += len;
        self.stats.reused_bytes += len;
        Ok(())
    }

    fn verify(&mut self) -> Result<Outcome, SessionError> {
        self.assemble_to(u64::MAX)?;
        if self.cursor != self.segs.len() || self.written != self.offer.size {
            return Ok(Outcome::Integrity);
        }
        let mut tree = match self.indexer.take() {
            Some(ix) => {
                let (summary, levels) = ix.finish().map_err(|_| SessionError::Capacity)?;
                Tree::from_parts(summary, levels)
            }
            // The output indexed the version itself.
            None => self.out.finish_tree().map_err(|_| write_failed(&self.out))?,
        };
        if !tree.summary().file_hash.is_known() {
            // The output hashes the bytes itself: it gets the offer's claim
            // to check (a store refuses to publish on a mismatch).
            tree.set_file_hash(self.offer.file_hash);
        }
        let (s, o) = (tree.summary(), &self.offer);
        let hash_ok = !o.file_hash.is_known() || s.file_hash == o.file_hash;
        if s.root == o.root && hash_ok && s.size == o.size && s.height == o.height {
            self.new_tree = Some(tree);
            Ok(Outcome::Written)
        } else {
            Ok(Outcome::Integrity)
        }
    }
}

impl<T: TreeView, R: Source, W: Output> Machine for Receiver<T, R, W> {
    type Output = Outcome;

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        match msg {
            Message::Entries { level, start, offset, last, packed } if self.phase == Phase::Walk => {
                self.on_entries(level, start, offset, last, packed)
            }
            Message::Pieces { offset, last, packed } if self.phase == Phase::Refine => {
                self.on_pieces(offset, last, packed)
            }
            Message::Fine { packed } if self.phase == Phase::Refine => self.on_fine(packed),
            Message::Data { offset, bytes } if self.phase == Phase::Transfer => self.on_data(offset, bytes),
            #[cfg(feature = "compress")]
            Message::DataZ { offset, raw, bytes } if self.phase == Phase::Transfer => {
                self.on_data_z(offset, raw, bytes)
            }
            Message::Root { root, height } if !self.offer.root.is_known() && self.phase != Phase::Walk => {
                if !root.is_known() {
                    return Err(SessionError::Protocol(ErrorCode::BadMessage));
                }
                self.offer.root = root;
                self.offer.height = height;
                Ok(())
            }
            m => Err(machine::unexpected(&m)),
        }
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Outcome>, SessionError> {
        loop {
            match self.phase {
                Phase::Start => self.start()?,
                Phase::Walk => {
                    if self.sent.len() < self.inflight()
                        && let Some(e) = self.expand.pop_front()
                    {
                        self.sent.push_back(Sent::Children {
                            level: e.level - 1,
                            bytes: e.bytes,
                            covered: 0,
                        });
                        let (level, index, count) = (e.level, e.index, e.count);
                        let m = if self.fine {
                            Message::GetChildrenV2 { level, index, count }
                        } else {
                            Message::GetChildren { level, index, count }
                        };
                        return machine::emit(&m, out);
                    }
                    if !self.sent.is_empty() {
                        return machine::wait_until(now, self.deadline);
                    }
                    self.plan_transfer();
                    if !self.tiles() {
                        return Err(SessionError::Protocol(ErrorCode::BadMessage));
                    }
                    self.plan_deltas()?;
                }
                Phase::Refine => {
                    if self.sent.len() < self.inflight()
                        && let Some(r) = self.refine.get(self.refine_next)
                        && let Some(&Seg::Fetch { at, len, .. }) = self.segs.get(r.seg)
                    {
                        let m = if r.fine {
                            Message::GetFine { offset: at, len }
                        } else if self.fine {
                            Message::GetPiecesV2 { offset: at, len }
                        } else {
                            Message::GetPieces { offset: at, len }
                        };
                        self.sent.push_back(Sent::Pieces { k: self.refine_next, covered: 0 });
                        self.refine_next += 1;
                        return machine::emit(&m, out);
                    }
                    if !self.sent.is_empty() {
                        return machine::wait_until(now, self.deadline);
                    }
                    self.apply_splits();
                    if self.fine && !core::mem::replace(&mut self.fine_round, true) && self.plan_fine() {
                        continue;
                    }
                    self.join_fetches();
                    self.queue_fetches();
                }
                Phase::Transfer => {
                    if self.sent.len() < self.inflight()
                        && let Some(get) = self.fetch.pop_front()
                    {
                        let (m, sent) = match get {
                            Get::Data { offset, len } => (
                                Message::GetData { offset, len },
                                Sent::Data { offset, len, got: 0, suffix: None },
                            ),
                            Get::Suffix { offset, len, have, id, from } => (
                                Message::GetSuffix { offset, len, have, id },
                                Sent::Data { offset, len, got: 0, suffix: Some((have, from)) },
                            ),
                        };
                        self.sent.push_back(sent);
                        return machine::emit(&m, out);
                    }
                    if !self.sent.is_empty() {
                        return machine::wait_until(now, self.deadline);
                    }
                    if !self.offer.root.is_known() {
                        // The sender may still be hashing what it sent: it
                        // gets the idle timeout plus the time hashing all of
                        // it at ROOT_RATE takes.
                        let until = *self.root_deadline.get_or_insert_with(|| {
                            now.plus_ms(IDLE_TIMEOUT_MS + self.offer.size / ROOT_RATE)
                        });
                        return machine::wait_until(now, until.max(self.deadline));
                    }
                    let outcome = self.verify()?;
                    self.phase = Phase::Finished(outcome);
                }
                Phase::Finished(o) => return Ok(Poll::Done(o)),
            }
        }
    }
}
/// Why writing the new version failed, as the output tells.
fn write_failed<W: Output>(out: &W) -> SessionError {
    if out.out_of_space() { SessionError::NoSpace } else { SessionError::Write }
}
