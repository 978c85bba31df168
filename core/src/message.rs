//! The typed messages of the protocol, encoded with postcard.
//!
//! Messages borrow names and bytes from the frame they were decoded from, so
//! decoding never allocates. Messages never know about sessions; sessions
//! never see bytes.

use crate::channel::{CipherKind, KEY_ID_LEN};
use crate::chunker::ChunkerKind;
use crate::error::ErrorCode;
use crate::hash::{Hash, ShortId};
use crate::tree::Summary;
use crate::varint;
use serde::{Deserialize, Serialize};

/// Longest file name accepted, in bytes.
pub const MAX_NAME: usize = 1024;
/// The longest component of a name (between `/`), in bytes: what file
/// systems store.
pub const MAX_COMPONENT: usize = 255;

/// Most requests a receiver may have in flight; a sender queues this many.
pub const MAX_INFLIGHT: usize = 4;

/// Most requests a receiver may have in flight to a sender that announced
/// [`CAP_FINE`] (a host of this version), which queues this many: with
/// [`CAP_BATCH`], the requests of a walk's level share frames.
pub const HOST_INFLIGHT: usize = 64;

/// Requests a sender queues: [`HOST_INFLIGHT`] on hosts (builds with
/// `alloc`, which announce [`CAP_FINE`]), [`MAX_INFLIGHT`] on devices.
pub const SENDER_QUEUE: usize = if cfg!(feature = "alloc") { HOST_INFLIGHT } else { MAX_INFLIGHT };

/// Capability bit: this peer reads [`Message::DataZ`] (zstd), so its peer
/// may send it.
pub const CAP_ZSTD: u32 = 1;

/// Capability bit: this server takes a [`Message::Sketch`] before an
/// upload, so its client may send one.
pub const CAP_SKETCH: u32 = 2;

/// Capability bit: this peer, as a sender, answers [`Message::GetSuffix`]
/// and [`Message::GetPieces`], so its receiver may ask them (deltas within
/// a chunk). Every build has it: answering needs only SHA-256.
pub const CAP_DELTA: u32 = 4;

/// Capability bit: this peer, as a sender, answers [`Message::GetFine`],
/// [`Message::GetPiecesV2`] and [`Message::GetChildrenV2`] (shorter ids),
/// so its receiver may compare changed
/// chunks by pieces that resynchronise, and a changed piece by its fine
/// pieces; and it queues [`HOST_INFLIGHT`] requests. Builds with `alloc`
/// (hosts) have it; devices keep their flash for what they do.
pub const CAP_FINE: u32 = 8;

/// Capability bit: this peer reads sealed frames that carry several
/// messages one after another (see [`crate::driver::Pump`]), so its peer
/// may send them. Builds with `alloc` (hosts) have it.
pub const CAP_BATCH: u32 = 16;

/// Capability bits this build announces in the handshake; unknown bits are
/// ignored, so later versions can add some.
pub const CAPS: u32 = CAP_SKETCH
    | CAP_DELTA
    | if cfg!(feature = "alloc") { CAP_FINE | CAP_BATCH } else { 0 }
    | if cfg!(feature = "compress") { CAP_ZSTD } else { 0 };

/// Most bytes a [`Message::GetPieces`] may cover, and the most a
/// [`Message::GetSuffix`] may say its receiver holds.
pub const DELTA_MAX: u64 = 64 * 1024;

/// Most ids a [`Message::Sketch`] carries.
pub const SKETCH_LEN: usize = 16;

/// Smallest upload a client sends a [`Message::Sketch`] for (and a server
/// looks for a file to reuse for).
pub const SKETCH_MIN: u64 = 1 << 20;

/// How a sync ended, as the receiver tells the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The receiver already held this version; nothing was written.
    Unchanged,
    /// The new version was rebuilt and verified.
    Written,
    /// The rebuilt file did not match; the receiver kept its old version.
    Integrity,
}

/// A stored file, as `LIST` and `STAT` describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo<'a> {
    /// Name relative to the server root, `/`-separated.
    pub name: &'a str,
    /// Length in bytes.
    pub size: u64,
    /// Last modification, seconds since the Unix epoch.
    pub modified: u64,
    /// SHA-256 of the contents.
    pub sha256: Hash,
    /// How the server's tree of this file is chunked: a client chunks a new
    /// version, or the base of a download, the same way to share its chunks.
    pub chunking: ChunkerKind,
}

/// What an interrupted upload left on the server (a prefix of the version
/// it was sending, kept for the next upload of the name to resume from), as
/// listings and `Stat` describe it (protocol 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialInfo<'a> {
    /// Name the upload was for.
    pub name: &'a str,
    /// Bytes kept.
    pub size: u64,
    /// When it was last written to, seconds since the Unix epoch.
    pub modified: u64,
}

/// What a conditional upload requires of the version stored when the
/// server publishes it (protocol 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// No version of the name is stored.
    Absent,
    /// The stored version has this SHA-256.
    Match(Hash),
}

/// A file's or directory's modification time and permission bits, as tree
/// syncs keep them (protocol 7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Last modification, seconds since the Unix epoch.
    pub modified: u64,
    /// Nanoseconds past `modified`.
    pub nanos: u32,
    /// Unix permission bits (`0o777` at most: no setuid, setgid or sticky
    /// bit is ever kept).
    pub mode: u32,
}

/// The permission bits a [`Meta`] may carry.
pub const MODE_BITS: u32 = 0o777;

/// What a listed entry is (protocol 7). (Names in JSON are lowercase; on
/// the wire only the variant's number counts.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    #[default]
    File,
    /// A directory.
    Dir,
}

/// One entry of a directory listing (`ListDir`, protocol 7): a file with
/// its size, times, mode and hash, or a directory (size 0, no hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<'a> {
    /// Name relative to the server root, `/`-separated.
    pub name: &'a str,
    /// File or directory.
    pub kind: EntryKind,
    /// Length in bytes (0 for a directory).
    pub size: u64,
    /// Times and permissions.
    pub meta: Meta,
    /// SHA-256 of the contents (zero for a directory).
    pub sha256: Hash,
    /// How the server's tree of the file is chunked.
    pub chunking: ChunkerKind,
}

/// Every message of the protocol. Variants are only ever appended (their
/// numbers are on the wire); those after `Root` exist from protocol 6 on,
/// those after `Replaced` from protocol 7 on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message<'a> {
    /// Client to server, first: the clear part of the handshake (what the
    /// server needs to begin it), then the first Noise message (see
    /// [`crate::channel`]). `version`, `cipher` and `key` are the Noise
    /// prologue, so they cannot be changed on the way. Its variant number and
    /// first field stay what they were in the plaintext versions, so a
    /// server recognises an old client's hello and answers
    /// `Error(VersionMismatch)`.
    Hello {
        /// [`crate::PROTOCOL_VERSION`] of the client: the newest it speaks.
        version: u16,
        /// The AEAD of the session.
        cipher: CipherKind,
        /// Id of the client's key.
        key: [u8; KEY_ID_LEN],
        /// Noise `-> psk, e`, with the client's capabilities as payload.
        noise: &'a [u8],
    },
    /// Server to client: Noise `<- e, ee`, with the agreed version and the
    /// server's capabilities as payload. Every later frame is sealed.
    Accept {
        /// The Noise message.
        noise: &'a [u8],
    },
    /// Unused: was the plaintext versions' `Auth`. Kept so that every later
    /// variant keeps its number (an old peer still reads `Error`).
    RetiredAuth,
    /// Unused: was the plaintext versions' `Welcome` (see `RetiredAuth`).
    RetiredWelcome,
    /// List every stored file.
    List,
    /// Describe one file.
    Stat {
        /// File name.
        name: &'a str,
    },
    /// Upload: the client offers a version and becomes the sender.
    Upload {
        /// File name.
        name: &'a str,
        /// The version offered.
        offer: Summary,
    },
    /// Download: the server will offer its version and become the sender.
    Download {
        /// File name.
        name: &'a str,
    },
    /// Delete a file.
    Delete {
        /// File name.
        name: &'a str,
    },
    /// A file's description (one per file for `List`, then `ListEnd`).
    Info(FileInfo<'a>),
    /// End of a listing.
    ListEnd,
    /// The file was deleted.
    Deleted,
    /// The request or session failed.
    Error(ErrorCode),
    /// The sender's version, in answer to `Download`.
    Offer(Summary),
    /// Receiver to sender: list the children of nodes `index..index+count`
    /// at `level`.
    GetChildren {
        /// Level of the nodes (at least 1).
        level: u8,
        /// First node.
        index: u32,
        /// Number of consecutive nodes.
        count: u32,
    },
    /// Sender to receiver: consecutive entries at `level`, starting at index
    /// `start` and file offset `offset`, packed as (short id u64 LE, varint
    /// length) pairs. `last` ends the answer to one `GetChildren`.
    Entries {
        /// Level of the entries.
        level: u8,
        /// Index of the first entry.
        start: u32,
        /// File offset of the first entry.
        offset: u64,
        /// Whether this ends the answer.
        last: bool,
        /// The packed entries.
        packed: &'a [u8],
    },
    /// Receiver to sender: send file bytes `offset..offset+len`.
    GetData {
        /// First byte.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// Sender to receiver: file bytes starting at `offset`.
    Data {
        /// File offset of `bytes[0]`.
        offset: u64,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// Receiver to sender: the sync is over. `file_hash` is the whole-file
    /// SHA-256 the receiver computed, sent when the offer left it unknown.
    Done {
        /// How the sync ended.
        outcome: Outcome,
        /// The version's SHA-256, if the sender did not know it.
        file_hash: Option<Hash>,
    },
    /// Sender to receiver: like [`Message::Data`], the bytes at `offset`
    /// compressed with zstd (one frame; `raw` bytes once decompressed).
    /// Only sent to a peer that announced [`CAP_ZSTD`].
    DataZ {
        /// Offset in the version of the first decompressed byte.
        offset: u64,
        /// Length once decompressed, at most [`crate::frame::MAX_DATA`].
        raw: u32,
        /// The zstd frame.
        bytes: &'a [u8],
    },
    /// Sender to receiver: the root of the version, for an upload offered
    /// with [`crate::Hash::UNKNOWN`] as its root (a first upload whose bytes
    /// go out while the sender still hashes them). Sent once, at any time
    /// before the receiver's `Done`; the receiver checks what it rebuilt
    /// against it.
    Root {
        /// Root of the hash tree.
        root: Hash,
        /// Level of the root.
        height: u8,
    },
    /// Like [`Message::Upload`], published only if the stored version is
    /// still as `expect` says when the upload ends; otherwise the server
    /// answers `Error(Conflict)` and keeps the version it holds.
    UploadIf {
        /// File name.
        name: &'a str,
        /// The version offered.
        offer: Summary,
        /// What the stored version must be.
        expect: Expect,
    },
    /// List every stored file, then every interrupted upload: `Info*`,
    /// `Partial*`, `ListEnd`.
    ListAll,
    /// An interrupted upload, in a listing (`ListAll`) or a description
    /// (`Stat`, which from protocol 6 on is answered like a listing of one
    /// name: `Info?`, `Partial?`, `ListEnd`, or `Error(NotFound)` if there is
    /// neither).
    Partial(PartialInfo<'a>),
    /// Server to uploader, just before its `Done`: the version stored when
    /// the upload began was replaced or deleted by someone else meanwhile.
    /// With `Done(Written)` this upload's version went over that one (last
    /// writer wins); with `Done(Unchanged)` the version stored is no longer
    /// the uploader's. A conditional upload gets `Error(Conflict)` instead.
    Replaced,
    /// List one directory (`""`: the root): its files and subdirectories,
    /// sorted by name, as `Entry*` then `ListEnd`.
    ListDir {
        /// The directory.
        dir: &'a str,
    },
    /// One entry of a `ListDir` answer.
    Entry(Entry<'a>),
    /// Like [`Message::Upload`] (or [`Message::UploadIf`] with `expect`),
    /// the version published with `meta`'s time and mode.
    UploadMeta {
        /// File name.
        name: &'a str,
        /// The version offered.
        offer: Summary,
        /// What the stored version must be, if anything.
        expect: Option<Expect>,
        /// Times and mode to publish it with.
        meta: Meta,
    },
    /// Sets a stored file's or directory's time and mode; answered with
    /// `Done(Unchanged)`.
    SetMeta {
        /// File or directory name.
        name: &'a str,
        /// The new time and mode.
        meta: Meta,
    },
    /// Makes a directory (and its parents); answered with `Done(Written)`,
    /// or `Done(Unchanged)` if it was there (its time and mode then set).
    MakeDir {
        /// Directory name.
        name: &'a str,
        /// Its time and mode.
        meta: Meta,
    },
    /// Stores a copy of the stored file `from` as `to`, with `meta`, if
    /// `from`'s SHA-256 is `sha256`: no file data crosses the wire (a
    /// renamed or copied file). Answered with `Done(Written, hash)`, or
    /// `Error(Conflict)` if `from` is no longer that version.
    Copy {
        /// The stored file copied.
        from: &'a str,
        /// Its SHA-256, as the client saw it listed.
        sha256: Hash,
        /// The new name.
        to: &'a str,
        /// Time and mode of the copy.
        meta: Meta,
    },
    /// The leaves of the stored version of `name` chunked as `chunking`,
    /// for a `Put` to send a delta against: answered with `Offer` (its
    /// summary), then `Entries` at level 0 (salted short ids and lengths,
    /// from offset 0, the last one `last`), or `Error`.
    Sig {
        /// File name.
        name: &'a str,
        /// How to chunk it.
        chunking: ChunkerKind,
    },
    /// A file sent without waiting for the server: followed by `Ref`,
    /// `Data` and `DataZ` covering `size` bytes in order, then `PutEnd`;
    /// answered with `Done(Written, hash)` or `Error` after `PutEnd`.
    Put {
        /// File name.
        name: &'a str,
        /// Its length.
        size: u64,
        /// Time and mode to publish it with.
        meta: Meta,
        /// How to chunk it for the server's index.
        chunking: ChunkerKind,
        /// The SHA-256 of the stored version that the `Ref`s copy from
        /// (`Error(Conflict)` if it is no longer the one stored).
        base: Option<Hash>,
    },
    /// In a `Put`: the next `len` bytes are the stored version's from
    /// `offset`.
    Ref {
        /// Offset in the stored version.
        offset: u64,
        /// Bytes copied.
        len: u64,
    },
    /// Ends a `Put`: the file's SHA-256, which the server checks.
    PutEnd {
        /// SHA-256 of the whole file.
        file_hash: Hash,
    },
    /// A whole file, sent without waiting for the client: answered with
    /// `Offer`, then `Data` and `DataZ` covering it in order, then
    /// `Done(Written, hash)`; or `Error`. A pull asks for the files it
    /// lacks so, several at once.
    Fetch {
        /// File name.
        name: &'a str,
    },
    /// Client to a server that announced [`CAP_SKETCH`], just before an
    /// upload request, for that upload only: the smallest chunk ids of the
    /// version offered (see [`crate::tree::sketch`]), each as its first 8
    /// bytes, big-endian, at most [`SKETCH_LEN`]. The server may take as
    /// the base a stored file the client's key may read whose sketch shares
    /// some (a file elsewhere with the same data). No answer.
    Sketch {
        /// The ids, 8 bytes each.
        ids: &'a [u8],
    },
    /// Receiver to a sender that announced [`CAP_DELTA`]: like
    /// [`Message::GetData`], but the receiver holds `have` bytes that the
    /// range most likely starts with (an old chunk the new one extends, as
    /// an appended log's last chunk), whose id (see
    /// [`crate::hash::piece_id`]) is `id`. If the sender's first `have`
    /// bytes of the range have that id, it sends the range from
    /// `offset + have`; else it answers one `Data` at `offset` with no
    /// bytes, and the receiver asks otherwise. `0 < have < len`, `have` at
    /// most [`DELTA_MAX`].
    GetSuffix {
        /// First byte.
        offset: u64,
        /// Number of bytes.
        len: u64,
        /// Bytes the receiver may hold at `offset`.
        have: u64,
        /// Their id.
        id: u64,
    },
    /// Receiver to a sender that announced [`CAP_DELTA`]: list the pieces
    /// of bytes `offset..offset + len` (at most [`DELTA_MAX`]), cut by
    /// [`crate::chunker::Chunker::pieces`] from `offset` on, as `Pieces`.
    /// The receiver then asks with `GetData` only for the pieces it does not
    /// hold (a chunk that changed by a few bytes costs those bytes' pieces).
    GetPieces {
        /// First byte.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// Sender to receiver: consecutive pieces of a `GetPieces` range from
    /// file offset `offset`, packed as [`Message::Entries`] packs entries
    /// (a piece's [`crate::hash::piece_id`] and its length). `last` ends the
    /// answer.
    Pieces {
        /// File offset of the first piece.
        offset: u64,
        /// Whether this ends the answer.
        last: bool,
        /// The packed pieces.
        packed: &'a [u8],
    },
    /// Receiver to a sender that announced [`CAP_FINE`]: list the fine
    /// pieces of bytes `offset..offset + len` (one changed piece: at most
    /// [`crate::chunker::PIECE_MAX`]), cut by
    /// [`crate::chunker::Chunker::fine`] from `offset` on, as one `Fine`.
    /// A piece that changed by a byte then costs the fine pieces around
    /// that byte, not the whole piece. (This and the variants after it are
    /// left out of builds without `alloc`, which never see them: a device
    /// keeps its flash.)
    #[cfg(feature = "alloc")]
    GetFine {
        /// First byte.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// Sender to receiver: every fine piece of the `GetFine` range asked
    /// first, in order, packed by [`pack_fine`].
    #[cfg(feature = "alloc")]
    Fine {
        /// The packed fine pieces.
        packed: &'a [u8],
    },
    /// Receiver to a sender that announced [`CAP_FINE`]: like
    /// [`Message::GetPieces`], with the range cut by
    /// [`crate::chunker::Chunker::pieces_v2`], whose cuts fall where the
    /// old bytes' did again soon after a change. Answered by `Pieces`
    /// whose ids are [`PIECE_ID_V2`] bytes.
    #[cfg(feature = "alloc")]
    GetPiecesV2 {
        /// First byte.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// Receiver to a sender that announced [`CAP_FINE`]: like
    /// [`Message::GetChildren`], answered by `Entries` whose ids are
    /// [`ENTRY_ID_V2`] bytes.
    #[cfg(feature = "alloc")]
    GetChildrenV2 {
        /// Level of the nodes (at least 1).
        level: u8,
        /// First node.
        index: u32,
        /// Number of consecutive nodes.
        count: u32,
    },
}

impl<'a> Message<'a> {
    /// Decodes one frame's payload; trailing bytes are an error. A hello
    /// of another protocol version that is not laid out as this version's
    /// (the plaintext versions' hello) is `VersionMismatch`, so that an old
    /// peer is told why.
    pub fn decode(payload: &'a [u8]) -> Result<Message<'a>, ErrorCode> {
        match postcard::take_from_bytes::<Message<'a>>(payload) {
            Ok((m, [])) => Ok(m),
            _ => match hello_version(payload) {
                Some(v) if v != u64::from(crate::PROTOCOL_VERSION) => Err(ErrorCode::VersionMismatch),
                _ => Err(ErrorCode::BadMessage),
            },
        }
    }

    /// Decodes the first of the messages one after another in `payload`
    /// (a batched frame's, see [`CAP_BATCH`]); returns it and the bytes
    /// after it.
    pub fn decode_first(payload: &'a [u8]) -> Result<(Message<'a>, &'a [u8]), ErrorCode> {
        postcard::take_from_bytes::<Message<'a>>(payload).map_err(|_| ErrorCode::BadMessage)
    }
}

/// The version a hello announces, read from its first two fields only
/// (variant 0, then the version), which every protocol version shares.
fn hello_version(payload: &[u8]) -> Option<u64> {
    if payload.first() != Some(&0) {
        return None;
    }
    varint::get(payload, &mut 1)
}

/// One entry of a packed listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedEntry {
    /// Salted short id.
    pub short: ShortId,
    /// Bytes covered.
    pub len: u64,
}

/// Longest encoding of one packed entry.
pub const PACKED_ENTRY_MAX: usize = 8 + 10;

/// Bytes of an id in the `Entries` that answer [`Message::GetChildrenV2`]:
/// the low 40 bits of the [`ShortId`]. An entry is looked up among every
/// entry of the old version (about 80,000 for 256 MiB): a false match is
/// then about one in 10^13 per entry, counting that its length must match
/// too, and is caught by the rebuilt version's check.
pub const ENTRY_ID_V2: usize = 5;

/// Bytes of an id in the `Pieces` that answer [`Message::GetPiecesV2`]:
/// the low 32 bits of the [`crate::hash::piece_id`]. A piece is looked for
/// only among the old ones next to its run (a few dozen).
pub const PIECE_ID_V2: usize = 4;

/// `short` cut to its low `width` bytes (the whole id from 8 on).
pub fn short_as(short: ShortId, width: usize) -> ShortId {
    if width >= 8 { short } else { short & ((1u64 << (8 * width)) - 1) }
}

/// Appends an entry to a packed listing; `None` if `out` is full.
pub fn pack_entry(out: &mut [u8], pos: &mut usize, e: PackedEntry) -> Option<()> {
    pack_entry_as(out, pos, e, 8)
}

/// [`pack_entry`] with the id cut to its low `width` bytes (1 to 8).
#[inline(always)]
pub fn pack_entry_as(out: &mut [u8], pos: &mut usize, e: PackedEntry, width: usize) -> Option<()> {
    let id = out.get_mut(*pos..*pos + width)?;
    id.copy_from_slice(e.short.to_le_bytes().get(..width)?);
    let mut p = *pos + width;
    varint::put(out, &mut p, e.len)?;
    *pos = p;
    Some(())
}

/// Iterates a packed listing; yields `Err` once on malformed input.
pub fn unpack_entries(packed: &[u8]) -> impl Iterator<Item = Result<PackedEntry, ErrorCode>> + '_ {
    unpack_entries_as(packed, 8)
}

/// [`unpack_entries`] of a listing whose ids are `width` bytes (1 to 8).
#[inline(always)]
pub fn unpack_entries_as(
    packed: &[u8],
    width: usize,
) -> impl Iterator<Item = Result<PackedEntry, ErrorCode>> + '_ {
    let mut pos = 0usize;
    let mut failed = false;
    core::iter::from_fn(move || {
        if failed || pos == packed.len() {
            return None;
        }
        let parsed = packed.get(pos..pos + width).and_then(|id| {
            let mut le = [0u8; 8];
            le.get_mut(..width)?.copy_from_slice(id);
            let short = u64::from_le_bytes(le);
            let mut p = pos + width;
            let len = varint::get(packed, &mut p)?;
            pos = p;
            Some(PackedEntry { short, len })
        });
        failed = parsed.is_none();
        Some(parsed.ok_or(ErrorCode::BadMessage))
    })
}

/// Bytes of one packed fine piece: its [`FineId`] (little-endian), then its
/// length (1 to [`crate::chunker::FINE_MAX`]) in one byte.
pub const PACKED_FINE: usize = 5;

/// The id of a fine piece: the low 32 bits of its
/// [`crate::hash::piece_id`]. A fine piece is only looked for among the
/// few old ones next to it (a few hundred bytes), and what is rebuilt from
/// it is checked by its chunk's full id, so 32 bits are enough.
pub type FineId = u32;

/// The [`FineId`] of `bytes`.
pub fn fine_id(salt: &[u8; 8], bytes: &[u8]) -> FineId {
    crate::hash::piece_id(salt, bytes) as FineId
}

/// Appends a fine piece to a packed list; `None` if `out` is full or
/// `len` does not fit a byte.
pub fn pack_fine(out: &mut [u8], pos: &mut usize, id: FineId, len: usize) -> Option<()> {
    let slot = out.get_mut(*pos..*pos + PACKED_FINE)?;
    slot[..4].copy_from_slice(&id.to_le_bytes());
    slot[4] = u8::try_from(len).ok()?;
    *pos += PACKED_FINE;
    Some(())
}

/// The fine pieces of a packed list: (id, length); `Err` if its length is
/// not a whole number of them.
pub fn unpack_fine(packed: &[u8]) -> Result<impl Iterator<Item = (FineId, u64)> + '_, ErrorCode> {
    let pieces = packed.chunks_exact(PACKED_FINE);
    if !pieces.remainder().is_empty() {
        return Err(ErrorCode::BadMessage);
    }
    Ok(pieces.map(|p| {
        let id = FineId::from_le_bytes([p[0], p[1], p[2], p[3]]);
        (id, u64::from(p[4]))
    }))
}

/// Checks a file name: relative, `/`-separated, no empty, `.` or `..`
/// components, no NUL or backslash, no component starting with `.deltasync`
/// (the server's metadata), at most [`MAX_NAME`] bytes.
pub fn validate_name(name: &str) -> Result<(), ErrorCode> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.contains(['\0', '\\'])
        && name.split('/').all(|c| {
            !c.is_empty() && c.len() <= MAX_COMPONENT && c != "." && c != ".." && !c.starts_with(".deltasync")
        });
    if ok { Ok(()) } else { Err(ErrorCode::BadName) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use proptest::prelude::*;

    fn hash() -> impl Strategy<Value = Hash> {
        any::<[u8; 32]>().prop_map(Hash)
    }

    fn summary() -> impl Strategy<Value = Summary> {
        let kind = prop_oneof![
            Just(ChunkerKind::Cdc),
            any::<u32>().prop_map(ChunkerKind::Fixed),
            any::<u8>().prop_map(ChunkerKind::CdcScaled),
        ];
        (any::<u64>(), hash(), any::<u8>(), hash(), kind).prop_map(
            |(size, root, height, file_hash, chunking)| Summary { size, root, height, file_hash, chunking },
        )
    }

    fn code() -> impl Strategy<Value = ErrorCode> {
        proptest::sample::select(ALL_CODES.to_vec())
    }

    /// Every error code, in wire order.
    const ALL_CODES: [ErrorCode; 19] = [
        ErrorCode::BadMessage,
        ErrorCode::UnexpectedMessage,
        ErrorCode::FrameTooLong,
        ErrorCode::VersionMismatch,
        ErrorCode::AuthFailed,
        ErrorCode::BadName,
        ErrorCode::NotFound,
        ErrorCode::OutOfRange,
        ErrorCode::TooManyRequests,
        ErrorCode::Storage,
        ErrorCode::Integrity,
        ErrorCode::Timeout,
        ErrorCode::Busy,
        ErrorCode::Unsupported,
        ErrorCode::NeedTree,
        ErrorCode::PermissionDenied,
        ErrorCode::Tampered,
        ErrorCode::NoSpace,
        ErrorCode::Conflict,
    ];

    #[test]
    fn error_codes_keep_their_wire_numbers() {
        // An old peer reads `Error` as variant 12 and `VersionMismatch` as
        // code 3: both must stay where the plaintext versions had them.
        for (i, code) in ALL_CODES.iter().enumerate() {
            let mut buf = [0u8; 8];
            let n = frame::encode(&Message::Error(*code), &mut buf).unwrap();
            assert_eq!(&buf[..n], &[2, 12, i as u8], "{code:?}");
        }
    }

    #[test]
    fn an_old_hello_is_a_version_mismatch() {
        // Version 4's hello: variant 0, version 4, caps 1, a 32-byte nonce.
        let mut old = vec![0u8, 4, 1];
        old.extend_from_slice(&[0x55; 32]);
        assert_eq!(Message::decode(&old), Err(ErrorCode::VersionMismatch));
        // Garbage that is no hello stays a malformed message.
        assert_eq!(Message::decode(&[1, 2, 3]), Err(ErrorCode::BadMessage));
        let mut hello = [0u8; 80];
        let m = Message::Hello {
            version: crate::PROTOCOL_VERSION,
            cipher: CipherKind::ChaChaPoly,
            key: [1; 8],
            noise: &[2; 49],
        };
        let n = frame::encode(&m, &mut hello).unwrap();
        assert_eq!(Message::decode(&hello[1..n]), Ok(m));
        // This version's hello with a byte missing is malformed, not old.
        assert_eq!(Message::decode(&hello[1..n - 1]), Err(ErrorCode::BadMessage));
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![Just(Outcome::Unchanged), Just(Outcome::Written), Just(Outcome::Integrity)]
    }

    type Fields = (u8, u64, u64, u32, [u8; 32], Summary, String, Vec<u8>, ErrorCode, Outcome, bool);

    /// Every message variant, with arbitrary fields; names and bytes borrow
    /// from the strategy's owned values.
    fn with_message<R>(v: &Fields, f: impl FnOnce(Message<'_>) -> R) -> R {
        let (k, a, b, c, n, s, name, bytes, code, outcome, last) = v;
        let (a, b, c) = (*a, *b, *c);
        let meta = Meta { modified: a, nanos: c, mode: b as u32 };
        let m = match k % 38 {
            0 => Message::Hello {
                version: a as u16,
                cipher: if *last { CipherKind::AesGcm } else { CipherKind::ChaChaPoly },
                key: [n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]],
                noise: bytes,
            },
            1 => Message::Accept { noise: bytes },
            2 => Message::RetiredAuth,
            3 => Message::RetiredWelcome,
            4 => Message::List,
            5 => Message::Stat { name },
            6 => Message::Upload { name, offer: *s },
            7 => Message::Download { name },
            8 => Message::Delete { name },
            9 => Message::Info(FileInfo { name, size: a, modified: b, sha256: s.root, chunking: s.chunking }),
            10 => Message::ListEnd,
            11 => Message::Deleted,
            12 => Message::Error(*code),
            13 => Message::Offer(*s),
            14 => Message::GetChildren { level: a as u8, index: c, count: b as u32 },
            15 => Message::Entries { level: a as u8, start: c, offset: b, last: *last, packed: bytes },
            16 => Message::GetData { offset: a, len: b },
            17 => Message::Data { offset: a, bytes },
            18 => Message::Done { outcome: *outcome, file_hash: Some(s.root) },
            19 => Message::DataZ { offset: a, raw: c, bytes },
            20 => Message::Root { root: s.root, height: a as u8 },
            21 => Message::UploadIf {
                name,
                offer: *s,
                expect: if *last { Expect::Absent } else { Expect::Match(Hash(*n)) },
            },
            22 => Message::ListAll,
            23 => Message::Partial(PartialInfo { name, size: a, modified: b }),
            24 => Message::Replaced,
            25 => Message::ListDir { dir: name },
            26 => Message::Entry(Entry {
                name,
                kind: if *last { EntryKind::Dir } else { EntryKind::File },
                size: a,
                meta,
                sha256: s.file_hash,
                chunking: s.chunking,
            }),
            27 => {
                Message::UploadMeta { name, offer: *s, expect: last.then_some(Expect::Match(Hash(*n))), meta }
            }
            28 => Message::SetMeta { name, meta },
            29 => Message::MakeDir { name, meta },
            30 => Message::Copy { from: name, sha256: Hash(*n), to: name, meta },
            31 => Message::Sig { name, chunking: s.chunking },
            32 => Message::Put { name, size: a, meta, chunking: s.chunking, base: last.then_some(Hash(*n)) },
            33 => Message::Ref { offset: a, len: b },
            34 => Message::PutEnd { file_hash: Hash(*n) },
            35 => Message::Fetch { name },
            36 => Message::Sketch { ids: bytes },
            _ => Message::Done { outcome: *outcome, file_hash: None },
        };
        f(m)
    }

    proptest! {
        #[test]
        fn every_message_round_trips(
            v in (any::<u8>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<[u8; 32]>(),
                  summary(), ".{0,40}", proptest::collection::vec(any::<u8>(), 0..3000),
                  code(), outcome(), any::<bool>())
        ) {
            with_message(&v, |m| {
                let mut buf = vec![0u8; frame::MAX_FRAME + 8];
                let n = frame::encode(&m, &mut buf).unwrap();
                let mut dec = frame::FrameDecoder::new(vec![0u8; frame::MAX_FRAME]);
                let (used, payload) = dec.feed(&buf[..n]).unwrap();
                prop_assert_eq!(used, n);
                let back = Message::decode(payload.unwrap()).unwrap();
                prop_assert_eq!(back, m);
                Ok(())
            })?;
        }

        #[test]
        fn packed_entries_round_trip(entries in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..50)) {
            let mut buf = vec![0u8; entries.len() * PACKED_ENTRY_MAX];
            let mut pos = 0;
            for &(short, len) in &entries {
                pack_entry(&mut buf, &mut pos, PackedEntry { short, len }).unwrap();
            }
            let back: Vec<_> = unpack_entries(&buf[..pos]).map(|e| e.unwrap()).map(|e| (e.short, e.len)).collect();
            prop_assert_eq!(back, entries);
        }
    }

    #[test]
    fn byte_exact_fixtures() {
        let mut buf = [0u8; 64];
        let n = frame::encode(&Message::GetData { offset: 300, len: 5 }, &mut buf).unwrap();
        // length 4, variant 16, varint 300 = ac 02, len 5
        assert_eq!(&buf[..n], &[4, 16, 0xac, 0x02, 5]);
        let n =
            frame::encode(&Message::Done { outcome: Outcome::Written, file_hash: None }, &mut buf).unwrap();
        assert_eq!(&buf[..n], &[3, 18, 1, 0]);
        let n = frame::encode(&Message::Stat { name: "ab" }, &mut buf).unwrap();
        assert_eq!(&buf[..n], &[4, 5, 2, b'a', b'b']);
        // Protocol 6's messages come after version 5's last one (Root, 20).
        let n = frame::encode(&Message::ListAll, &mut buf).unwrap();
        assert_eq!(&buf[..n], &[1, 22]);
        let n = frame::encode(&Message::Replaced, &mut buf).unwrap();
        assert_eq!(&buf[..n], &[1, 24]);
        let n = frame::encode(&Message::Partial(PartialInfo { name: "a", size: 3, modified: 4 }), &mut buf)
            .unwrap();
        assert_eq!(&buf[..n], &[5, 23, 1, b'a', 3, 4]);
        // Protocol 7's come after Replaced (24).
        let n = frame::encode(&Message::ListDir { dir: "d" }, &mut buf).unwrap();
        assert_eq!(&buf[..n], &[3, 25, 1, b'd']);
        let meta = Meta { modified: 5, nanos: 6, mode: 0o644 };
        let n = frame::encode(&Message::SetMeta { name: "a", meta }, &mut buf).unwrap();
        assert_eq!(&buf[..n], &[7, 28, 1, b'a', 5, 6, 0xa4, 0x03]);
    }

    #[test]
    fn malformed_packed_listing_is_an_error() {
        let v: Vec<_> = unpack_entries(&[1, 2, 3]).collect();
        assert_eq!(v, vec![Err(ErrorCode::BadMessage)]);
        let mut buf = [0u8; 9];
        buf[8] = 0x80; // truncated varint
        let v: Vec<_> = unpack_entries(&buf).collect();
        assert_eq!(v, vec![Err(ErrorCode::BadMessage)]);
    }

    #[test]
    fn names_are_checked() {
        for bad in
            ["", "/etc/passwd", "../x", "a/../b", "a//b", "a/./b", "a\0b", "a\\b", ".deltasync/x", "x/"]
        {
            assert_eq!(validate_name(bad), Err(ErrorCode::BadName), "{bad:?}");
        }
        assert_eq!(validate_name(&"a".repeat(MAX_NAME + 1)), Err(ErrorCode::BadName));
        assert_eq!(validate_name(&format!("d/{}", "a".repeat(MAX_COMPONENT))), Ok(()));
        assert_eq!(validate_name(&format!("d/{}/e", "a".repeat(MAX_COMPONENT + 1))), Err(ErrorCode::BadName));
        for good in ["a", "dir/file.txt", "devices/42/log", ".hidden", "..x"] {
            assert_eq!(validate_name(good), Ok(()), "{good:?}");
        }
    }
}
