//! Client operation: small files sent without waiting for the server
//! between them (a tree push's new and changed files up to [`PUT_MAX`]),
//! each whole or as a delta against the version the server holds.
//!
//! ```text
//! C: Sig{name, chunking}     S: Offer(summary) Entries(level 0)* (last) | Error
//!    (the leaves of the stored version, chunked as asked: salted short ids
//!    and lengths)
//! C: Put{name, size, meta, chunking, base}
//!    Ref{offset, len} | Data | DataZ ... in file order (a `Ref` copies
//!    bytes of the stored version `base`), then PutEnd{file_hash}
//!                            S: Done(Written, hash) | Error
//! ```
//! Requests go out up to [`WINDOW`] ahead of their answers, which come in
//! order; a file's `Put` follows once its `Sig` is answered. A delta whose
//! base changed meanwhile fails alone with `Error(Conflict)`.

use crate::chunker::ChunkerKind;
use crate::error::{ErrorCode, SessionError};
use crate::hash::{Hash, ShortId};
use crate::machine::{self, Machine, Poll};
use crate::message::{Message, Meta, unpack_entries};
use crate::time::{IDLE_TIMEOUT_MS, Instant};
use crate::tree::{Summary, Tree, TreeView};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;

/// The largest file sent this way; larger ones go as uploads of their own
/// (their bytes, not round trips, take the time).
pub const PUT_MAX: u64 = 1 << 20;

/// Most requests sent ahead of their answers. Answers stay small enough
/// (a `Sig` of a file up to [`PUT_MAX`] is a few KiB) that a window of
/// them fits in the sockets' buffers: neither side blocks writing while
/// the other does.
pub const WINDOW: usize = 16;

/// Most leaves a `Sig` answer may hold (a version of a few MiB has a few
/// thousand): what a hostile server can make this side keep.
const MAX_LEAVES: usize = 1 << 16;

/// A file to send.
#[derive(Clone, Debug)]
pub struct PutFile {
    /// The server's name.
    pub name: String,
    /// Its bytes.
    pub data: Vec<u8>,
    /// Time and mode to publish it with.
    pub meta: Meta,
    /// How to chunk it (the server's version's kind, if it has one).
    pub kind: ChunkerKind,
    /// Whether the server holds a version to send a delta against.
    pub base: bool,
}

/// How a file went: the SHA-256 published, or why not; and the file bytes
/// that crossed the wire.
pub type PutResult = (Result<Hash, ErrorCode>, u64);

/// A piece of a `Put`: bytes of the stored version, or of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Ref { offset: u64, len: u64 },
    Literal { offset: u64, len: u64 },
}

/// The answer to a `Sig`, as it arrives.
#[derive(Default)]
struct Sig {
    summary: Option<Summary>,
    /// Leaves by salted short id: offset and length in the stored version.
    leaves: BTreeMap<ShortId, (u64, u64)>,
    /// Offset the next `Entries` must start at.
    next: u64,
}

enum Pending {
    Sig(usize),
    Put(usize),
}

/// A `Put` going out: the file, its pieces, the next one, and how far into
/// a literal piece.
struct Out {
    file: usize,
    pieces: Vec<Piece>,
    next: usize,
    within: u64,
    header_sent: bool,
    literal: u64,
}

/// Sends `files` and passes each one's result to `on_result`, in order.
pub struct PutBatch<F> {
    files: Vec<PutFile>,
    salt: [u8; 8],
    version: u16,
    /// Next file to ask a `Sig` for, and next to put.
    next_sig: usize,
    next_put: usize,
    pending: VecDeque<Pending>,
    /// The `Sig` being answered.
    sig: Option<Sig>,
    /// Answered `Sig`s, by file: the base's hash and leaves (`None`: none
    /// to use).
    bases: BTreeMap<usize, Option<Sig>>,
    out: Option<Out>,
    /// Literal bytes of each `Put` sent and not yet answered.
    sent_literal: VecDeque<u64>,
    answered: usize,
    /// File bytes the `Put`s sent so far cover (copied or literal).
    covered: u64,
    on_result: F,
    #[cfg(feature = "compress")]
    zstd: Option<alloc::boxed::Box<crate::sender::Compress>>,
    deadline: Instant,
}

impl<F: FnMut(&PutFile, PutResult)> PutBatch<F> {
    /// A batch in a session of protocol `version` (7 or later) whose salt is
    /// `salt`; with `compress`, literal bytes go as `DataZ` when it pays
    /// (only if the server announced it reads them).
    pub fn new(
        files: Vec<PutFile>,
        salt: [u8; 8],
        version: u16,
        compress: bool,
        on_result: F,
        now: Instant,
    ) -> Self {
        #[cfg(not(feature = "compress"))]
        let _ = compress;
        PutBatch {
            files,
            salt,
            version,
            next_sig: 0,
            next_put: 0,
            pending: VecDeque::new(),
            sig: None,
            bases: BTreeMap::new(),
            out: None,
            sent_literal: VecDeque::new(),
            answered: 0,
            covered: 0,
            on_result,
            #[cfg(feature = "compress")]
            zstd: if compress { crate::sender::Compress::new() } else { None },
            deadline: now.plus_ms(IDLE_TIMEOUT_MS),
        }
    }

    /// The pieces of file `i`: runs of its chunks the base holds (by salted
    /// short id and length) as `Ref`s, the rest as literals.
    fn pieces(&self, i: usize, base: Option<&Sig>) -> Vec<Piece> {
        let f = &self.files[i];
        let size = f.data.len() as u64;
        let Some(base) = base.filter(|b| !b.leaves.is_empty()) else {
            return if size == 0 { Vec::new() } else { alloc::vec![Piece::Literal { offset: 0, len: size }] };
        };
        let tree = Tree::build(&f.data, f.kind);
        let mut out: Vec<Piece> = Vec::new();
        for k in 0..tree.level_len(0) {
            let Some(leaf) = tree.entry(0, k) else { break };
            let piece = match base.leaves.get(&leaf.id.short(&self.salt)) {
                Some(&(offset, len)) if len == leaf.len => Piece::Ref { offset, len },
                _ => Piece::Literal { offset: leaf.offset, len: leaf.len },
            };
            // Runs merge: consecutive in both versions, or in the file.
            match (out.last_mut(), piece) {
                (Some(Piece::Ref { offset: o, len: l }), Piece::Ref { offset, len }) if *o + *l == offset => {
                    *l += len
                }
                (Some(Piece::Literal { offset: o, len: l }), Piece::Literal { offset, len })
                    if *o + *l == offset =>
                {
                    *l += len
                }
                (_, p) => out.push(p),
            }
        }
        out
    }

    /// File bytes covered by what went out so far (by `Ref`s or sent): a
    /// batch's progress.
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// Whether file `i` can be put now (its `Sig`, if it needs one, is
    /// answered).
    fn ready(&self, i: usize) -> bool {
        i < self.files.len() && (!self.files[i].base || self.bases.contains_key(&i))
    }

    fn emit_piece(&mut self, out: &mut [u8]) -> Result<Poll<()>, SessionError> {
        let Some(o) = self.out.as_mut() else { return Ok(Poll::Wait(self.deadline)) };
        let f = &self.files[o.file];
        if !o.header_sent {
            o.header_sent = true;
            let base =
                self.bases.get(&o.file).and_then(|b| b.as_ref()).and_then(|b| b.summary).map(|s| s.file_hash);
            let uses_base = o.pieces.iter().any(|p| matches!(p, Piece::Ref { .. }));
            let m = Message::Put {
                name: &f.name,
                size: f.data.len() as u64,
                meta: f.meta,
                chunking: f.kind,
                base: base.filter(|_| uses_base),
            };
            return machine::emit(&m, out);
        }
        let Some(&piece) = o.pieces.get(o.next) else {
            let file_hash = Hash::of(&f.data);
            let literal = o.literal;
            self.out = None;
            self.sent_literal.push_back(literal);
            return machine::emit(&Message::PutEnd { file_hash }, out);
        };
        match piece {
            Piece::Ref { offset, len } => {
                o.next += 1;
                self.covered += len;
                machine::emit(&Message::Ref { offset, len }, out)
            }
            Piece::Literal { offset, len } => {
                let at = offset + o.within;
                let n = crate::sender::data_room(out, len - o.within)? as u64;
                o.within += n;
                o.literal += n;
                self.covered += n;
                if o.within == len {
                    o.next += 1;
                    o.within = 0;
                }
                let bytes = &f.data[at as usize..(at + n) as usize];
                #[cfg(feature = "compress")]
                if let Some(z) = self.zstd.as_deref_mut()
                    && z.wants_try()
                    && let Some(written) = z.frame(at, bytes, out)?
                {
                    return Ok(Poll::Transmit(written));
                }
                machine::emit(&Message::Data { offset: at, bytes }, out)
            }
        }
    }
}

impl<F: FnMut(&PutFile, PutResult)> Machine for PutBatch<F> {
    type Output = ();

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        match (self.pending.front(), msg) {
            (Some(Pending::Sig(_)), Message::Offer(s)) if self.sig.is_none() => {
                if !s.file_hash.is_known() {
                    return Err(SessionError::Protocol(ErrorCode::BadMessage));
                }
                self.sig = Some(Sig { summary: Some(s), ..Sig::default() });
                Ok(())
            }
            (Some(&Pending::Sig(i)), Message::Entries { level: 0, offset, last, packed, .. }) => {
                let sig = self.sig.as_mut().ok_or(SessionError::Protocol(ErrorCode::UnexpectedMessage))?;
                let size = sig.summary.map_or(0, |s| s.size);
                if offset != sig.next {
                    return Err(SessionError::Protocol(ErrorCode::BadMessage));
                }
                for e in unpack_entries(packed) {
                    let e = e.map_err(SessionError::Protocol)?;
                    let end = sig.next.checked_add(e.len).filter(|&end| end <= size && e.len > 0);
                    let end = end.ok_or(SessionError::Protocol(ErrorCode::BadMessage))?;
                    sig.leaves.entry(e.short).or_insert((sig.next, e.len));
                    if sig.leaves.len() > MAX_LEAVES {
                        return Err(SessionError::Protocol(ErrorCode::OutOfRange));
                    }
                    sig.next = end;
                }
                if last {
                    if sig.next != size {
                        return Err(SessionError::Protocol(ErrorCode::BadMessage));
                    }
                    self.pending.pop_front();
                    self.bases.insert(i, self.sig.take());
                }
                Ok(())
            }
            // No version to use (gone, or not chunkable so): sent whole.
            (Some(&Pending::Sig(i)), Message::Error(_)) if self.sig.is_none() => {
                self.pending.pop_front();
                self.bases.insert(i, None);
                Ok(())
            }
            (Some(&Pending::Put(i)), Message::Done { file_hash, .. }) => {
                self.pending.pop_front();
                let literal = self.sent_literal.pop_front().unwrap_or(0);
                let r = file_hash.ok_or(ErrorCode::BadMessage);
                (self.on_result)(&self.files[i], (r, literal));
                self.bases.remove(&i);
                self.answered += 1;
                Ok(())
            }
            (Some(&Pending::Put(i)), Message::Error(code)) => {
                self.pending.pop_front();
                let literal = self.sent_literal.pop_front().unwrap_or(0);
                (self.on_result)(&self.files[i], (Err(code), literal));
                self.bases.remove(&i);
                self.answered += 1;
                Ok(())
            }
            (_, m) => Err(machine::unexpected(&m)),
        }
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<()>, SessionError> {
        if self.answered == self.files.len() {
            return Ok(Poll::Done(()));
        }
        if self.version < 7 {
            return Err(SessionError::Peer(ErrorCode::Unsupported));
        }
        if self.out.is_some() {
            // The server is given its time from when the last piece is sent
            // (one file may take longer than the idle timeout to send).
            self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
            return self.emit_piece(out);
        }
        if self.pending.len() < WINDOW && self.ready(self.next_put) {
            let i = self.next_put;
            self.next_put += 1;
            let base = self.bases.get(&i).and_then(|b| b.as_ref());
            let pieces = self.pieces(i, base);
            self.out = Some(Out { file: i, pieces, next: 0, within: 0, header_sent: false, literal: 0 });
            self.pending.push_back(Pending::Put(i));
            return self.emit_piece(out);
        }
        while self.next_sig < self.files.len()
            && (self.next_sig < self.next_put || !self.files[self.next_sig].base)
        {
            self.next_sig += 1;
        }
        if self.pending.len() < WINDOW && self.next_sig < self.files.len() {
            let i = self.next_sig;
            self.next_sig += 1;
            self.pending.push_back(Pending::Sig(i));
            let f = &self.files[i];
            return machine::emit(&Message::Sig { name: &f.name, chunking: f.kind }, out);
        }
        machine::wait_until(now, self.deadline)
    }
}
