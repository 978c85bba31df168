//! The server's side of `Sig` and `Put` (see [`crate::conn::put`]): a
//! file written from `Ref`s into the stored version and literal bytes, in
//! file order, checked against the client's SHA-256 when it ends.

use super::Store;
use crate::chunker::ChunkerKind;
use crate::error::ErrorCode;
use crate::frame::MAX_DATA;
use crate::hash::Hash;
use crate::message::{Message, PACKED_ENTRY_MAX, PackedEntry, pack_entry};
use crate::source::{Output, Source};
use crate::tree::{Tree, TreeIndexer, TreeView};
use alloc::vec::Vec;

/// The largest `Put` served: a stream of small files (clients send larger
/// ones as uploads of their own), so that no one message makes a step copy
/// or write without bound.
pub(super) const MAX_SIZE: u64 = 64 << 20;

/// What a frame of a `Put` costs on the wire beside its payload, about: its
/// length, tag, message number and fields.
const FRAME_COST: u64 = 3 + crate::channel::TAG_LEN as u64 + 12;

/// Leaves per `Entries` frame of a `Sig` answer.
const LEAVES_PER_FRAME: usize = (MAX_DATA - 64) / PACKED_ENTRY_MAX;

/// Packs the leaves of `tree` from leaf `start` (at file offset `offset`)
/// into `buf`: how many, the bytes, and whether they are the last.
pub(super) fn pack_leaves(tree: &Tree, salt: &[u8; 8], start: u32, buf: &mut Vec<u8>) -> (u32, bool) {
    let total = tree.level_len(0);
    let end = total.min(start.saturating_add(LEAVES_PER_FRAME as u32));
    buf.clear();
    buf.resize((end - start) as usize * PACKED_ENTRY_MAX, 0);
    let mut pos = 0;
    for k in start..end {
        let Some(leaf) = tree.entry(0, k) else { break };
        let e = PackedEntry { short: leaf.id.short(salt), len: leaf.len };
        if pack_entry(buf, &mut pos, e).is_none() {
            break;
        }
    }
    buf.truncate(pos);
    (end - start, end == total)
}

/// A put that failed: its writer (to discard), if it had one, and why.
pub(super) type Failed<S> = (Option<<S as Store>::Writer>, ErrorCode);

/// A `Put` being received.
pub(super) struct Putting<S: Store> {
    pub name: alloc::string::String,
    writer: Option<S::Writer>,
    /// The stored version the `Ref`s copy from, and its size.
    base: Option<(S::Reader, u64)>,
    /// The tree of what is written, when the writer does not index it.
    indexer: Option<TreeIndexer>,
    pos: u64,
    pub size: u64,
    /// Why this put will fail; the rest of it is read and dropped.
    pub failed: Option<ErrorCode>,
    pub literal: u64,
    pub reused: u64,
    /// Bytes its frames took on the wire, about (payloads, plus each
    /// frame's header, fields and tag).
    pub wire: u64,
    buf: Vec<u8>,
    #[cfg(feature = "compress")]
    unzstd: Option<alloc::boxed::Box<crate::sender::Unpack>>,
}

impl<S: Store> Putting<S> {
    /// A put that fails with `code` once read to its end.
    pub fn refused(name: &str, code: ErrorCode) -> Self {
        Putting {
            name: name.into(),
            writer: None,
            base: None,
            indexer: None,
            pos: 0,
            size: 0,
            failed: Some(code),
            literal: 0,
            reused: 0,
            wire: 0,
            buf: Vec::new(),
            #[cfg(feature = "compress")]
            unzstd: None,
        }
    }

    /// Starts writing `name` (`size` bytes, chunked as `kind` for the
    /// index), with `base` if the client's `Ref`s copy from the stored
    /// version whose SHA-256 that is.
    pub fn start(
        store: &mut S,
        name: &str,
        size: u64,
        kind: ChunkerKind,
        base: Option<Hash>,
        meta: crate::message::Meta,
    ) -> Result<Self, ErrorCode> {
        if !kind.suits(size) {
            return Err(ErrorCode::Unsupported);
        }
        let base = match base {
            None => None,
            Some(h) => {
                let (tree, reader) = store.open(name, None)?.ok_or(ErrorCode::Conflict)?;
                if tree.summary().file_hash != h {
                    return Err(ErrorCode::Conflict);
                }
                Some((reader, tree.summary().size))
            }
        };
        let mut writer = store.create_with(name, size, None, Some(meta))?;
        let indexer = (!writer.index_in_background(kind)).then(|| TreeIndexer::without_file_hash(kind));
        Ok(Putting {
            writer: Some(writer),
            base,
            indexer,
            size,
            failed: None,
            ..Self::refused(name, ErrorCode::Storage)
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), ErrorCode> {
        let end = self.pos.checked_add(data.len() as u64).filter(|&e| e <= self.size && !data.is_empty());
        let end = end.ok_or(ErrorCode::BadMessage)?;
        let w = self.writer.as_mut().ok_or(ErrorCode::Storage)?;
        w.write(data).map_err(|_| if w.out_of_space() { ErrorCode::NoSpace } else { ErrorCode::Storage })?;
        if let Some(ix) = self.indexer.as_mut() {
            ix.feed(data);
        }
        self.pos = end;
        Ok(())
    }

    fn copy(&mut self, offset: u64, len: u64) -> Result<(), ErrorCode> {
        let (_, base_size) = self.base.as_ref().ok_or(ErrorCode::BadMessage)?;
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > *base_size) {
            return Err(ErrorCode::BadMessage);
        }
        let mut buf = core::mem::take(&mut self.buf);
        let mut done = 0;
        let r = loop {
            if done == len {
                break Ok(());
            }
            let n = (len - done).min(MAX_DATA as u64) as usize;
            buf.resize(n, 0);
            let Some((reader, _)) = self.base.as_mut() else { break Err(ErrorCode::Storage) };
            if reader.read_at(offset + done, &mut buf).is_err() {
                break Err(ErrorCode::Storage);
            }
            if let Err(e) = self.write(&buf) {
                break Err(e);
            }
            done += n as u64;
        };
        self.buf = buf;
        self.reused += done;
        r
    }

    /// One piece of the put; `Some(end hash)` at its `PutEnd`. A failure
    /// is kept, and the rest read and dropped.
    pub fn handle(&mut self, msg: Message<'_>) -> Result<Option<Hash>, ErrorCode> {
        self.wire += FRAME_COST
            + match msg {
                Message::Data { bytes, .. } | Message::DataZ { bytes, .. } => bytes.len() as u64,
                _ => 0,
            };
        let r = match msg {
            Message::PutEnd { file_hash } => return Ok(Some(file_hash)),
            _ if self.failed.is_some() => Ok(()),
            Message::Ref { offset, len } => self.copy(offset, len),
            Message::Data { offset, bytes } if offset == self.pos => {
                self.literal += bytes.len() as u64;
                self.write(bytes)
            }
            #[cfg(feature = "compress")]
            Message::DataZ { offset, raw, bytes } if offset == self.pos => {
                if self.unzstd.is_none() {
                    self.unzstd = crate::sender::Unpack::new();
                }
                let mut z = self.unzstd.take();
                let r = match z.as_deref_mut() {
                    Some(z) => z.data(raw, bytes).and_then(|d| {
                        self.literal += d.len() as u64;
                        self.write(d)
                    }),
                    None => Err(ErrorCode::Storage),
                };
                self.unzstd = z;
                r
            }
            Message::Data { .. } | Message::DataZ { .. } => Err(ErrorCode::BadMessage),
            _ => return Err(ErrorCode::UnexpectedMessage),
        };
        if let Err(e) = r {
            self.failed = Some(e);
        }
        Ok(None)
    }

    /// At `PutEnd`: the writer and the tree of what it holds, the file hash
    /// claimed set in it, or why the put failed.
    pub fn finish(&mut self, file_hash: Hash) -> Result<(S::Writer, Tree), Failed<S>> {
        let mut writer = self.writer.take();
        if let Some(e) = self.failed {
            return Err((writer, e));
        }
        if self.pos != self.size {
            return Err((writer, ErrorCode::BadMessage));
        }
        let tree = match self.indexer.take() {
            Some(ix) => Ok(ix.finish()),
            None => match writer.as_mut() {
                Some(w) => w.finish_tree().map_err(|_| ErrorCode::Storage),
                None => Err(ErrorCode::Storage),
            },
        };
        match (writer, tree) {
            (Some(w), Ok(mut t)) => {
                t.set_file_hash(file_hash);
                Ok((w, t))
            }
            (w, Err(e)) => Err((w, e)),
            (None, Ok(_)) => Err((None, ErrorCode::Storage)),
        }
    }
}

/// A `Fetch` being answered: the stored version's summary, then its bytes
/// in order, then `Done` with its hash.
pub(super) struct Giving<S: Store> {
    pub name: alloc::string::String,
    source: S::Reader,
    pub summary: crate::tree::Summary,
    offered: bool,
    pub pos: u64,
    /// Bytes its frames took on the wire (sealed).
    pub wire: u64,
    buf: Vec<u8>,
    #[cfg(feature = "compress")]
    zstd: Option<alloc::boxed::Box<crate::sender::Compress>>,
}

impl<S: Store> Giving<S> {
    /// Gives the stored version of `name`; `compress` if the client reads
    /// `DataZ`.
    pub fn start(store: &mut S, name: &str, compress: bool) -> Result<Self, ErrorCode> {
        let (tree, source) = store.open(name, None)?.ok_or(ErrorCode::NotFound)?;
        let summary = tree.summary();
        #[cfg(not(feature = "compress"))]
        let _ = compress;
        Ok(Giving {
            name: name.into(),
            source,
            summary,
            offered: false,
            pos: 0,
            wire: 0,
            buf: Vec::new(),
            #[cfg(feature = "compress")]
            zstd: if compress { crate::sender::Compress::new() } else { None },
        })
    }

    /// The next frame into `out`: its length, or `None` once `Done` went.
    pub fn emit(&mut self, out: &mut [u8]) -> Result<Option<usize>, crate::error::SessionError> {
        use crate::error::SessionError;
        use crate::machine::{Poll, emit};
        let polled = if !self.offered {
            self.offered = true;
            emit::<()>(&Message::Offer(self.summary), out)?
        } else if self.pos < self.summary.size {
            let n = crate::sender::data_room(out, self.summary.size - self.pos)?;
            let at = self.pos;
            self.buf.resize(n, 0);
            self.source.read_at(at, &mut self.buf).map_err(|_| SessionError::Read)?;
            self.pos += n as u64;
            #[cfg(feature = "compress")]
            if let Some(z) = self.zstd.as_deref_mut()
                && z.wants_try()
                && let Some(w) = z.frame(at, &self.buf, out)?
            {
                self.wire += (w + crate::channel::TAG_LEN) as u64;
                return Ok(Some(w));
            }
            emit::<()>(&Message::Data { offset: at, bytes: &self.buf }, out)?
        } else if self.pos == self.summary.size {
            self.pos += 1;
            let m = Message::Done {
                outcome: crate::message::Outcome::Written,
                file_hash: Some(self.summary.file_hash),
            };
            emit::<()>(&m, out)?
        } else {
            return Ok(None);
        };
        match polled {
            Poll::Transmit(n) => {
                self.wire += (n + crate::channel::TAG_LEN) as u64;
                Ok(Some(n))
            }
            _ => Err(SessionError::Capacity),
        }
    }
}
