//! The sender of a sync: holds the new version and answers the receiver's
//! requests for tree listings and bytes. Works without an allocator: its
//! state is a small fixed queue, and frames are written into the caller's
//! buffer.

#[cfg(feature = "alloc")]
use crate::chunker::PIECE_MAX;
use crate::chunker::{Chunker, PIECE_MIN};
use crate::error::{ErrorCode, SessionError};
use crate::frame::{self, MAX_DATA};
use crate::hash::{Hash, PieceHasher, ShortId};
use crate::machine::{self, Machine, Poll};
use crate::message::{self, DELTA_MAX, Message, Outcome, PACKED_ENTRY_MAX, PackedEntry};
use crate::source::Source;
use crate::time::{IDLE_TIMEOUT_MS, Instant};
use crate::tree::{Summary, TreeView};

/// Most entries in one `Entries` frame.
const MAX_ENTRIES_PER_FRAME: u32 = 2048;
/// Room a frame needs besides its packed entries or data.
const FRAME_OVERHEAD: usize = 48;

/// How many of `left` file bytes the next `Data` frame into `out` carries:
/// as many as the frame and `out` hold (`Capacity` if that is none).
pub(crate) fn data_room(out: &[u8], left: u64) -> Result<usize, SessionError> {
    let room = out.len().min(frame::MAX_ENCODED).saturating_sub(FRAME_OVERHEAD).min(MAX_DATA);
    if room == 0 {
        return Err(SessionError::Capacity);
    }
    Ok(left.min(room as u64) as usize)
}

#[derive(Clone, Copy, Debug)]
enum Request {
    Children {
        level: u8,
        index: u32,
        count: u32,
        /// Asked as `GetChildrenV2` (shorter ids).
        v2: V2,
    },
    Data {
        offset: u64,
        len: u64,
    },
    Suffix {
        offset: u64,
        len: u64,
        have: u64,
        id: ShortId,
    },
    Pieces {
        offset: u64,
        len: u64,
        v2: V2,
    },
    #[cfg(feature = "alloc")]
    Fine {
        offset: u64,
        len: u64,
    },
}

#[derive(Clone, Copy, Debug)]
enum Active {
    /// Listing entries `next..end` at `level`, the next one at `offset`.
    Entries { level: u8, next: u32, end: u32, offset: u64, v2: V2 },
    /// Sending bytes `offset..end`.
    Data { offset: u64, end: u64 },
    /// Listing the pieces of `offset..end`, the next one at `offset`
    /// (cut by [`Chunker::pieces_v2`] if `v2`).
    Pieces { offset: u64, end: u64, v2: V2 },
    /// Listing the fine pieces of `offset..offset + len` (one frame).
    #[cfg(feature = "alloc")]
    Fine { offset: u64, len: u64 },
    /// Answering a `GetSuffix` whose bytes differ: an empty `Data`.
    Refuse { offset: u64 },
}

/// Bytes a receiver may have a sender of `size` bytes hash for deltas:
/// an honest one asks for the pieces of changed runs (at most the file),
/// the fine pieces of some of those pieces (at most the file again) and
/// two suffixes (a probe and the last run). A receiver that asks for more,
/// answered with little, would have this side hash for nothing.
fn delta_budget(size: u64) -> u64 {
    size.saturating_mul(2).saturating_add(2 * DELTA_MAX)
}

/// Whether a listing was asked in its second form (`GetChildrenV2`,
/// `GetPiecesV2`: shorter ids, pieces that resynchronise). Only hosts are
/// asked so: in builds without `alloc` it is a unit, and their listing
/// code stays what it was.
#[cfg(feature = "alloc")]
type V2 = bool;
#[cfg(not(feature = "alloc"))]
type V2 = ();

/// Whether `v` says the second form.
#[cfg(feature = "alloc")]
fn is_v2(v: V2) -> bool {
    v
}
#[cfg(not(feature = "alloc"))]
fn is_v2(_: V2) -> bool {
    false
}

/// The first form.
#[cfg(feature = "alloc")]
const V1: V2 = false;
#[cfg(not(feature = "alloc"))]
const V1: V2 = ();

/// How [`piece_at`] cuts: as [`Chunker::pieces`] (what devices are asked
/// for), [`Chunker::pieces_v2`] or [`Chunker::fine`].
#[derive(Clone, Copy)]
enum Cut {
    Pieces,
    #[cfg(feature = "alloc")]
    PiecesV2,
    #[cfg(feature = "alloc")]
    Fine,
}

impl Cut {
    /// The pieces a listing asked in form `v2` is cut into.
    #[cfg_attr(not(feature = "alloc"), allow(unused_variables))]
    fn of(v2: V2) -> Cut {
        #[cfg(feature = "alloc")]
        if is_v2(v2) {
            return Cut::PiecesV2;
        }
        Cut::Pieces
    }

    fn chunker(self) -> Chunker {
        match self {
            Cut::Pieces => Chunker::pieces(),
            #[cfg(feature = "alloc")]
            Cut::PiecesV2 => Chunker::pieces_v2(),
            #[cfg(feature = "alloc")]
            Cut::Fine => Chunker::fine(),
        }
    }
}

/// Bytes read at a time while cutting and hashing pieces (on the stack).
const PIECE_READ: usize = 256;

/// The id of bytes `offset..end` of `source` (see [`crate::hash::piece_id`]),
/// or with a chunker `cut`, of the piece it cuts from `offset` (ending at
/// `end` at the latest), with its length.
fn piece_at<S: Source>(
    source: &mut S,
    salt: &[u8; 8],
    offset: u64,
    end: u64,
    cut: Option<Cut>,
) -> Result<(ShortId, u64), SessionError> {
    let mut cut = cut.map(Cut::chunker);
    let mut hasher = PieceHasher::new(salt);
    let mut buf = [0u8; PIECE_READ];
    let mut len = 0u64;
    while offset + len < end {
        let want = (end - offset - len).min(PIECE_READ as u64) as usize;
        let bytes = &mut buf[..want];
        source.read_at(offset + len, bytes).map_err(|_| SessionError::Read)?;
        match cut.as_mut().and_then(|c| c.next_boundary(bytes)) {
            Some(n) => {
                hasher.update(&bytes[..n]);
                len += n as u64;
                break;
            }
            None => {
                hasher.update(bytes);
                len += want as u64;
            }
        }
    }
    Ok((hasher.finish(), len))
}

/// Serves one version to a receiver.
pub struct Sender<T, S> {
    tree: T,
    source: S,
    summary: Summary,
    salt: [u8; 8],
    queue: heapless::Deque<Request, { message::SENDER_QUEUE }>,
    active: Option<Active>,
    outcome: Option<Outcome>,
    peer_hash: Option<Hash>,
    deadline: Instant,
    sent_bytes: u64,
    /// Bytes that `GetSuffix` and `GetPieces` may still have this side
    /// hash (see [`delta_budget`]).
    delta_left: u64,
    /// A root given by [`Sender::set_root`] and not yet sent.
    root_due: bool,
    #[cfg(feature = "compress")]
    zstd: Option<alloc::boxed::Box<Compress>>,
}

/// zstd for `Data` frames, with the buffers it reuses.
#[cfg(feature = "compress")]
pub(crate) struct Compress {
    ctx: zstd::bulk::Compressor<'static>,
    raw: alloc::vec::Vec<u8>,
    packed: alloc::vec::Vec<u8>,
    /// Frames still to send without trying (after one that did not shrink).
    skip: u32,
}

/// zstd level for `Data` frames: fast, and most of what text gives.
#[cfg(feature = "compress")]
const ZSTD_LEVEL: i32 = 3;
/// After a frame that does not shrink by 1/16, this many go out as they are
/// before the next try, so incompressible data costs little time.
#[cfg(feature = "compress")]
const ZSTD_SKIP: u32 = 15;
/// The smallest piece whose failure to shrink starts [`ZSTD_SKIP`].
#[cfg(feature = "compress")]
const SKIP_AFTER: usize = 16 * 1024;

impl<T: TreeView, S: Source> Sender<T, S> {
    /// A sender of the version `summary` describes, whose tree is `tree` and
    /// whose bytes `source` reads. `salt` comes from the handshake.
    pub fn new(tree: T, source: S, summary: Summary, salt: [u8; 8], now: Instant) -> Self {
        Sender {
            tree,
            source,
            summary,
            salt,
            queue: heapless::Deque::new(),
            active: None,
            outcome: None,
            peer_hash: None,
            deadline: now.plus_ms(IDLE_TIMEOUT_MS),
            sent_bytes: 0,
            delta_left: delta_budget(summary.size),
            root_due: false,
            #[cfg(feature = "compress")]
            zstd: None,
        }
    }

    /// Whether the summary's root is still unknown: an upload offered
    /// before its tree was built, whose root [`Sender::set_root`] gives.
    /// Such a sender lists no tree (its receiver fetches every byte).
    pub fn awaiting_root(&self) -> bool {
        !self.summary.root.is_known()
    }

    /// The summary to offer, once: a root given before the offer goes out
    /// with it rather than in a `Root` of its own.
    pub(crate) fn offer(&mut self) -> Summary {
        self.root_due = false;
        self.summary
    }

    /// Gives the root and height of a version offered without them (see
    /// [`Sender::awaiting_root`]); it goes to the receiver as
    /// [`Message::Root`] with the next frame. Ignored once known.
    pub fn set_root(&mut self, root: Hash, height: u8) {
        if self.awaiting_root() && root.is_known() {
            self.summary.root = root;
            self.summary.height = height;
            self.root_due = true;
        }
    }

    /// Compresses the bytes it sends with zstd (as [`Message::DataZ`]) when
    /// `on` and it pays; the caller sets `on` only if the receiver announced
    /// [`crate::message::CAP_ZSTD`]. Without the `compress` feature, bytes
    /// always go as they are.
    #[cfg_attr(not(feature = "compress"), allow(unused_mut))]
    pub fn compress(mut self, on: bool) -> Self {
        #[cfg(feature = "compress")]
        {
            self.zstd = if on { Compress::new() } else { None };
        }
        #[cfg(not(feature = "compress"))]
        let _ = on;
        self
    }

    /// The source of the version's bytes, taken back.
    pub fn into_source(self) -> S {
        self.source
    }

    /// The version being sent.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The whole-file SHA-256 the receiver reported in `Done`, if the
    /// summary left it unknown.
    pub fn reported_hash(&self) -> Option<Hash> {
        self.peer_hash
    }

    /// File bytes sent so far (literal data, excluding framing).
    pub fn literal_bytes(&self) -> u64 {
        self.sent_bytes
    }

    fn check(&self, r: Request) -> Result<(), ErrorCode> {
        let ok = match r {
            Request::Children { level, index, count, .. } => {
                level >= 1
                    && level <= self.tree.height()
                    && count >= 1
                    && index.checked_add(count).is_some_and(|e| e <= self.tree.level_len(level))
            }
            Request::Data { offset, len } => {
                len >= 1 && offset.checked_add(len).is_some_and(|e| e <= self.summary.size)
            }
            Request::Suffix { offset, len, have, .. } => {
                have >= 1
                    && have < len
                    && have <= DELTA_MAX
                    && offset.checked_add(len).is_some_and(|e| e <= self.summary.size)
            }
            Request::Pieces { offset, len, .. } => {
                (1..=DELTA_MAX).contains(&len)
                    && offset.checked_add(len).is_some_and(|e| e <= self.summary.size)
            }
            #[cfg(feature = "alloc")]
            Request::Fine { offset, len } => {
                (1..=PIECE_MAX as u64).contains(&len)
                    && offset.checked_add(len).is_some_and(|e| e <= self.summary.size)
            }
        };
        if ok { Ok(()) } else { Err(ErrorCode::OutOfRange) }
    }

    fn start(&mut self, r: Request) -> Result<Active, SessionError> {
        let bad = SessionError::Protocol(ErrorCode::OutOfRange);
        Ok(match r {
            Request::Children { level, index, count, v2 } => {
                let next = self.tree.first_child(level, index).ok_or(bad)?;
                let end = self.tree.first_child(level, index + count).ok_or(bad)?;
                let offset = self.tree.entry(level - 1, next).map_or(self.summary.size, |e| e.offset);
                Active::Entries { level: level - 1, next, end: end.max(next), offset, v2 }
            }
            Request::Data { offset, len } => Active::Data { offset, end: offset + len },
            Request::Suffix { offset, len, have, id } => {
                let (mine, _) = piece_at(&mut self.source, &self.salt, offset, offset + have, None)?;
                // Another start: an empty `Data` says so.
                if mine == id {
                    Active::Data { offset: offset + have, end: offset + len }
                } else {
                    Active::Refuse { offset }
                }
            }
            Request::Pieces { offset, len, v2 } => Active::Pieces { offset, end: offset + len, v2 },
            #[cfg(feature = "alloc")]
            Request::Fine { offset, len } => Active::Fine { offset, len },
        })
    }

    fn send_entries(
        &mut self,
        level: u8,
        (next, end): (u32, u32),
        offset: u64,
        v2: V2,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let width = if is_v2(v2) { message::ENTRY_ID_V2 } else { 8 };
        let room = out.len().min(frame::MAX_ENCODED).saturating_sub(FRAME_OVERHEAD);
        let fit = (room / PACKED_ENTRY_MAX) as u32;
        if fit == 0 {
            return Err(SessionError::Capacity);
        }
        let n = (end - next).min(fit).min(MAX_ENTRIES_PER_FRAME);
        let last = next + n == end;
        let template = Message::Entries { level, start: next, offset, last, packed: &[] };
        let (tree, salt) = (&self.tree, &self.salt);
        let mut covered = 0u64;
        let written = frame::encode_with_tail(&template, out, |buf| {
            let mut pos = 0;
            for i in next..next + n {
                let e = tree.entry(level, i).ok_or(SessionError::Capacity)?;
                covered += e.len;
                let packed = PackedEntry { short: e.id.short(salt), len: e.len };
                message::pack_entry_as(buf, &mut pos, packed, width).ok_or(SessionError::Capacity)?;
            }
            Ok(pos)
        })?
        .map_err(|_| SessionError::Capacity)?;
        self.active =
            (!last).then_some(Active::Entries { level, next: next + n, end, offset: offset + covered, v2 });
        Ok(written)
    }

    fn send_data(&mut self, offset: u64, end: u64, out: &mut [u8]) -> Result<usize, SessionError> {
        let n = data_room(out, end - offset)?;
        #[cfg(feature = "compress")]
        if let Some(z) = self.zstd.as_deref_mut()
            && z.wants_try()
        {
            return self.send_data_z(offset, end, n, out);
        }
        let source = &mut self.source;
        let written = frame::encode_with_tail(&Message::Data { offset, bytes: &[] }, out, |buf| {
            source.read_at(offset, &mut buf[..n]).map(|_| n).map_err(|_| SessionError::Read)
        })?
        .map_err(|_| SessionError::Capacity)?;
        self.sent(offset, n, end);
        Ok(written)
    }

    /// The next `Pieces` frame of `offset..end`: every piece left if the
    /// most there can be fit (then it is the `last`), else as many as fit
    /// (a last frame may then carry none).
    fn send_pieces(&mut self, offset: u64, end: u64, v2: V2, out: &mut [u8]) -> Result<usize, SessionError> {
        let room = out.len().min(frame::MAX_ENCODED).saturating_sub(FRAME_OVERHEAD);
        let fit = (room / PACKED_ENTRY_MAX) as u64;
        if fit == 0 {
            return Err(SessionError::Capacity);
        }
        // Every piece but a range's last is at least PIECE_MIN long: there
        // are at most (end - offset) / PIECE_MIN + 1.
        let last = (end - offset) / (PIECE_MIN as u64) < fit;
        let (source, salt) = (&mut self.source, &self.salt);
        let width = if is_v2(v2) { message::PIECE_ID_V2 } else { 8 };
        let mut at = offset;
        let template = Message::Pieces { offset, last, packed: &[] };
        let written = frame::encode_with_tail(&template, out, |buf| {
            let (mut pos, mut n) = (0, 0);
            while at < end && n < fit {
                let (short, len) = piece_at(source, salt, at, end, Some(Cut::of(v2)))?;
                message::pack_entry_as(buf, &mut pos, PackedEntry { short, len }, width)
                    .ok_or(SessionError::Capacity)?;
                at += len;
                n += 1;
            }
            Ok(pos)
        })?
        .map_err(|_| SessionError::Capacity)?;
        self.active = (!last).then_some(Active::Pieces { offset: at, end, v2 });
        Ok(written)
    }

    /// The `Fine` frame of `offset..offset + len` (at most a piece: every
    /// fine piece of it fits one frame).
    #[cfg(feature = "alloc")]
    fn send_fine(&mut self, offset: u64, len: u64, out: &mut [u8]) -> Result<usize, SessionError> {
        let (source, salt) = (&mut self.source, &self.salt);
        let written = frame::encode_with_tail(&Message::Fine { packed: &[] }, out, |buf| {
            let (mut pos, mut at) = (0, offset);
            while at < offset + len {
                let (short, n) = piece_at(source, salt, at, offset + len, Some(Cut::Fine))?;
                message::pack_fine(buf, &mut pos, short as message::FineId, n as usize)
                    .ok_or(SessionError::Capacity)?;
                at += n;
            }
            Ok(pos)
        })?
        .map_err(|_| SessionError::Capacity)?;
        self.active = None;
        Ok(written)
    }

    /// Bytes `offset..offset + n` of `..end` went out.
    fn sent(&mut self, offset: u64, n: usize, end: u64) {
        self.sent_bytes += n as u64;
        let next = offset + n as u64;
        self.active = (next < end).then_some(Active::Data { offset: next, end });
    }
}

/// zstd for `DataZ` frames received, with the buffer it reuses.
#[cfg(feature = "compress")]
pub(crate) struct Unpack {
    ctx: zstd::bulk::Decompressor<'static>,
    out: alloc::vec::Vec<u8>,
}

#[cfg(feature = "compress")]
impl Unpack {
    /// A decompressor, if zstd can make one.
    pub(crate) fn new() -> Option<alloc::boxed::Box<Unpack>> {
        let ctx = zstd::bulk::Decompressor::new().ok()?;
        Some(alloc::boxed::Box::new(Unpack { ctx, out: alloc::vec::Vec::with_capacity(MAX_DATA) }))
    }

    /// The `raw` bytes a `DataZ` frame's `bytes` hold: refused unless they
    /// decompress to exactly that many, at most a frame's worth.
    pub(crate) fn data(&mut self, raw: u32, bytes: &[u8]) -> Result<&[u8], ErrorCode> {
        let raw = raw as usize;
        if raw == 0 || raw > MAX_DATA {
            return Err(ErrorCode::BadMessage);
        }
        self.out.clear();
        match self.ctx.decompress_to_buffer(bytes, &mut self.out) {
            Ok(n) if n == raw => Ok(&self.out),
            _ => Err(ErrorCode::BadMessage),
        }
    }
}

#[cfg(feature = "compress")]
impl Compress {
    /// A compressor, if zstd can make one.
    pub(crate) fn new() -> Option<alloc::boxed::Box<Compress>> {
        let ctx = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?;
        Some(alloc::boxed::Box::new(Compress {
            ctx,
            raw: alloc::vec::Vec::new(),
            packed: alloc::vec::Vec::new(),
            skip: 0,
        }))
    }

    /// Whether to try compressing the next frame (not for a few after one
    /// that did not shrink).
    pub(crate) fn wants_try(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// `bytes` at `offset` as a `DataZ` frame in `out` if zstd shrinks them
    /// by at least 1/16 (its length); `None` otherwise, and the next few
    /// frames are not tried.
    pub(crate) fn frame(
        &mut self,
        offset: u64,
        bytes: &[u8],
        out: &mut [u8],
    ) -> Result<Option<usize>, SessionError> {
        self.packed.clear();
        self.packed.reserve(bytes.len());
        let worth = bytes.len() - bytes.len() / 16;
        match self.ctx.compress_to_buffer(bytes, &mut self.packed) {
            Ok(m) if m < worth => {}
            _ => {
                // A small piece (a short file's) says little about what
                // follows: only a large one that does not shrink stops
                // the tries for a while.
                if bytes.len() >= SKIP_AFTER {
                    self.skip = ZSTD_SKIP;
                }
                return Ok(None);
            }
        }
        let body = &self.packed[..];
        let template = Message::DataZ { offset, raw: bytes.len() as u32, bytes: &[] };
        let written = frame::encode_with_tail(&template, out, |buf| {
            let dst = buf.get_mut(..body.len()).ok_or(SessionError::Capacity)?;
            dst.copy_from_slice(body);
            Ok(body.len())
        })?
        .map_err(|_| SessionError::Capacity)?;
        Ok(Some(written))
    }
}

#[cfg(feature = "compress")]
impl<T: TreeView, S: Source> Sender<T, S> {
    /// Sends `n` bytes at `offset` as `DataZ` if zstd shrinks them by at
    /// least 1/16, else as `Data` (and skips the next few tries).
    fn send_data_z(
        &mut self,
        offset: u64,
        end: u64,
        n: usize,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let z = self.zstd.as_deref_mut().ok_or(SessionError::Capacity)?;
        let mut raw = core::mem::take(&mut z.raw);
        raw.resize(n, 0);
        self.source.read_at(offset, &mut raw).map_err(|_| SessionError::Read)?;
        let written = match z.frame(offset, &raw, out)? {
            Some(w) => w,
            None => frame::encode_with_tail(&Message::Data { offset, bytes: &[] }, out, |buf| {
                let dst = buf.get_mut(..n).ok_or(SessionError::Capacity)?;
                dst.copy_from_slice(&raw);
                Ok(n)
            })?
            .map_err(|_| SessionError::Capacity)?,
        };
        z.raw = raw;
        self.sent(offset, n, end);
        Ok(written)
    }
}

impl<T: TreeView, S: Source> Machine for Sender<T, S> {
    type Output = Outcome;

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        let r = match msg {
            Message::GetChildren { level, index, count } => Request::Children { level, index, count, v2: V1 },
            #[cfg(feature = "alloc")]
            Message::GetChildrenV2 { level, index, count } => {
                Request::Children { level, index, count, v2: true }
            }
            Message::GetData { offset, len } => Request::Data { offset, len },
            Message::GetSuffix { offset, len, have, id } => Request::Suffix { offset, len, have, id },
            Message::GetPieces { offset, len } => Request::Pieces { offset, len, v2: V1 },
            #[cfg(feature = "alloc")]
            Message::GetPiecesV2 { offset, len } => Request::Pieces { offset, len, v2: true },
            #[cfg(feature = "alloc")]
            Message::GetFine { offset, len } => Request::Fine { offset, len },
            Message::Done { outcome, file_hash } => {
                self.outcome = Some(outcome);
                self.peer_hash = file_hash;
                return Ok(());
            }
            Message::Error(c) => return Err(SessionError::Peer(c)),
            _ => return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage)),
        };
        self.check(r).map_err(SessionError::Protocol)?;
        let hashed = match r {
            Request::Suffix { have, .. } => have,
            Request::Pieces { len, .. } => len,
            #[cfg(feature = "alloc")]
            Request::Fine { len, .. } => len,
            Request::Children { .. } | Request::Data { .. } => 0,
        };
        self.delta_left =
            self.delta_left.checked_sub(hashed).ok_or(SessionError::Protocol(ErrorCode::TooManyRequests))?;
        self.queue.push_back(r).map_err(|_| SessionError::Protocol(ErrorCode::TooManyRequests))
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Outcome>, SessionError> {
        if let Some(o) = self.outcome {
            return Ok(Poll::Done(o));
        }
        if self.root_due {
            self.root_due = false;
            let Summary { root, height, .. } = self.summary;
            return machine::emit(&Message::Root { root, height }, out);
        }
        if self.active.is_none()
            && let Some(r) = self.queue.pop_front()
        {
            self.active = Some(self.start(r)?);
        }
        let n = match self.active {
            None => return machine::wait_until(now, self.deadline),
            Some(Active::Entries { level, next, end, offset, v2 }) => {
                self.send_entries(level, (next, end), offset, v2, out)?
            }
            Some(Active::Data { offset, end }) => self.send_data(offset, end, out)?,
            Some(Active::Pieces { offset, end, v2 }) => self.send_pieces(offset, end, v2, out)?,
            #[cfg(feature = "alloc")]
            Some(Active::Fine { offset, len }) => self.send_fine(offset, len, out)?,
            Some(Active::Refuse { offset }) => {
                self.active = None;
                frame::encode(&Message::Data { offset, bytes: &[] }, out)
                    .map_err(|_| SessionError::Capacity)?
            }
        };
        // The peer is given its time from when this side stops sending (a
        // transfer may take longer than the idle timeout).
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        Ok(Poll::Transmit(n))
    }
}
