//! The server's side of a connection: handshake, then requests served from a
//! [`Store`] that the shell implements over its storage, each checked
//! against the permissions of the client's key.

use super::{HANDSHAKE_NOISE, HANDSHAKE_PAYLOAD, agree, prologue, session_salt};
use crate::access::{Access, Keys, Operation};
use crate::channel::{Channel, Handshake};
use crate::chunker::ChunkerKind;
use crate::error::{ErrorCode, SessionError};
use crate::hash::Hash;
use crate::machine::{self, Machine, Poll};
use crate::message::{
    CAPS, Entry, EntryKind, Expect, FileInfo, MODE_BITS, Message, Meta, Outcome, PartialInfo, SKETCH_LEN,
    SKETCH_MIN, validate_name,
};
use crate::receiver::{Base, ReceiveStats, Receiver};
use crate::sender::Sender;

/// A client's sketch (see [`Message::Sketch`]).
type Sketch = heapless::Vec<u64, SKETCH_LEN>;
use crate::source::{Output, Source};
use crate::time::{HANDSHAKE_TIMEOUT_MS, IDLE_TIMEOUT_MS, Instant};
use crate::tree::{Chain, Summary, Tree, TreeView};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

mod put;

/// Uploads of new names smaller than this look for no similar file.
const SIMILAR_MIN: u64 = 1 << 20;
/// Directories with more entries than this are not looked through for a
/// similar file.
const SIMILAR_MAX_ENTRIES: usize = 4096;

// Large only while the handshake runs; `ServerConn` boxes the whole
// handshake, which it drops once done.
#[allow(clippy::large_enum_variant)]
enum HsState {
    AwaitHello([u8; 32]),
    SendAccept(Handshake),
    Done,
    Failed,
}

/// The server side of the handshake: finds the client's key in `K`, yields
/// the session salt and the key's permissions, and hands the channel to the
/// driver ([`Machine::take_channel`]).
pub struct ServerHandshake<K> {
    keys: K,
    state: HsState,
    access: Option<Access>,
    channel: Option<Channel>,
    salt: [u8; 8],
    deadline: Instant,
    peer_caps: u32,
    /// The capabilities announced.
    caps: u32,
    version: u16,
}

impl<K: Keys> ServerHandshake<K> {
    /// A handshake checking clients against `keys`; `ephemeral` is 32 fresh
    /// random bytes from the shell. It fails with [`SessionError::Timeout`]
    /// [`HANDSHAKE_TIMEOUT_MS`] after `now` unless finished.
    pub fn new(keys: K, ephemeral: [u8; 32], now: Instant) -> Self {
        ServerHandshake {
            keys,
            state: HsState::AwaitHello(ephemeral),
            access: None,
            channel: None,
            salt: [0; 8],
            deadline: now.plus_ms(HANDSHAKE_TIMEOUT_MS),
            peer_caps: 0,
            caps: CAPS,
            version: crate::PROTOCOL_VERSION,
        }
    }

    /// Announces only `caps` of this build's capabilities (a server whose
    /// store keeps no sketch yet leaves out [`crate::message::CAP_SKETCH`]:
    /// its clients then stream first uploads).
    pub fn announcing(mut self, caps: u32) -> Self {
        self.caps = caps & CAPS;
        self
    }

    /// The protocol version of this session once the client's hello
    /// arrived: the older of the client's and this server's newest.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The capability bits both this build and the client have (known once
    /// the client's hello arrived).
    pub fn shared_caps(&self) -> u32 {
        self.caps & self.peer_caps
    }

    /// The permissions of the client's key, once its hello passed.
    pub fn access(&self) -> Option<&Access> {
        self.access.as_ref()
    }

    fn hello(
        &mut self,
        ephemeral: [u8; 32],
        version: u16,
        cipher: crate::channel::CipherKind,
        key: [u8; crate::channel::KEY_ID_LEN],
        noise: &[u8],
    ) -> Result<(), SessionError> {
        let agreed = agree(crate::PROTOCOL_VERSION, version)?;
        if !cipher.supported() {
            return Err(SessionError::Protocol(ErrorCode::Unsupported));
        }
        let auth_failed = SessionError::Protocol(ErrorCode::AuthFailed);
        // An unknown id and a wrong secret fail alike.
        let (secret, access) = self.keys.find(&key).ok_or(auth_failed)?;
        let mut hs = Handshake::new(false, cipher, &prologue(version, cipher, &key), &secret, ephemeral)
            .map_err(|_| auth_failed)?;
        let mut payload = [0u8; HANDSHAKE_PAYLOAD];
        let n = hs.read(noise, &mut payload).map_err(|_| auth_failed)?;
        self.peer_caps = postcard::from_bytes::<u32>(&payload[..n])
            .map_err(|_| SessionError::Protocol(ErrorCode::BadMessage))?;
        self.version = agreed;
        self.access = Some(access);
        self.state = HsState::SendAccept(hs);
        Ok(())
    }
}

impl<K: Keys> Machine for ServerHandshake<K> {
    type Output = [u8; 8];

    fn handle(&mut self, _now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        match (core::mem::replace(&mut self.state, HsState::Failed), msg) {
            (HsState::AwaitHello(e), Message::Hello { version, cipher, key, noise }) => {
                self.hello(e, version, cipher, key, noise)
            }
            (_, m) => Err(machine::unexpected(&m)),
        }
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<[u8; 8]>, SessionError> {
        match core::mem::replace(&mut self.state, HsState::Failed) {
            HsState::SendAccept(mut hs) => {
                let mut payload = [0u8; HANDSHAKE_PAYLOAD];
                let p = postcard::to_slice(&(self.version, self.caps), &mut payload)
                    .map_err(|_| SessionError::Capacity)?
                    .len();
                let mut noise = [0u8; HANDSHAKE_NOISE];
                let n = hs.write(&payload[..p], &mut noise).map_err(|_| SessionError::Capacity)?;
                let mut channel = hs.finish().map_err(|_| SessionError::Capacity)?;
                channel.set_batched(self.shared_caps() & crate::message::CAP_BATCH != 0);
                self.salt = session_salt(&channel);
                self.channel = Some(channel);
                self.state = HsState::Done;
                machine::emit(&Message::Accept { noise: &noise[..n] }, out)
            }
            HsState::Done => {
                self.state = HsState::Done;
                Ok(Poll::Done(self.salt))
            }
            s @ HsState::AwaitHello(_) => {
                self.state = s;
                machine::wait_until(now, self.deadline)
            }
            HsState::Failed => Err(SessionError::Protocol(ErrorCode::UnexpectedMessage)),
        }
    }

    fn take_channel(&mut self) -> Option<Channel> {
        self.channel.take()
    }
}

/// A stored file (or, in a directory listing, a directory): the one type
/// that describes one, from the store through a tree sync's plan to the
/// client's listings and the dashboard. In JSON: `name`, `size`,
/// `modified`, `nanos`, `mode`, `kind` (`file` or `dir`) and `sha256`
/// (hex).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoredFile {
    /// Name relative to the root.
    pub name: String,
    /// Length in bytes.
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub modified: u64,
    /// SHA-256 of the contents.
    #[serde(serialize_with = "hex")]
    pub sha256: Hash,
    /// How the stored tree of the file is chunked.
    #[serde(skip)]
    pub chunking: ChunkerKind,
    /// Nanoseconds past `modified` (left out of JSON when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub nanos: u32,
    /// Permission bits (see [`Meta`]; left out of JSON when 0, as in a
    /// listing of protocol 6, which has none).
    #[serde(skip_serializing_if = "is_zero")]
    pub mode: u32,
    /// A file, or (only in [`Store::list_dir`]) a directory.
    pub kind: EntryKind,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// A hash as its hex string.
fn hex<S: serde::Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&h.to_hex())
}

impl StoredFile {
    /// Its time and mode.
    pub fn meta(&self) -> Meta {
        Meta { modified: self.modified, nanos: self.nanos, mode: self.mode }
    }

    /// As a listing entry.
    pub fn entry(&self) -> Entry<'_> {
        Entry {
            name: &self.name,
            kind: self.kind,
            size: self.size,
            meta: self.meta(),
            sha256: self.sha256,
            chunking: self.chunking,
        }
    }

    /// As a version-6 description.
    pub fn info(&self) -> FileInfo<'_> {
        FileInfo {
            name: &self.name,
            size: self.size,
            modified: self.modified,
            sha256: self.sha256,
            chunking: self.chunking,
        }
    }
}

/// What an interrupted upload left behind, as the store describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialFile {
    /// Name the upload was for.
    pub name: String,
    /// Bytes kept.
    pub size: u64,
    /// When it was last written to, seconds since the Unix epoch.
    pub modified: u64,
}

/// How [`Store::finish`] ended a version it published or discarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// The whole-file SHA-256 of the version published, if one was.
    pub file_hash: Option<Hash>,
    /// The version stored when the writer was created is no longer the one
    /// stored: another was published, or it was deleted, meanwhile (and,
    /// if this version was published, it replaced that one).
    pub replaced: bool,
}

/// The server's storage, as the connection needs it. Names reaching these
/// methods have passed [`validate_name`]; the store still owns the checks
/// that need the file system (symlinks).
pub trait Store {
    /// Reads a stored version.
    type Reader: Source;
    /// Writes a new version.
    type Writer: Output;

    /// The current version of `name` (its tree and bytes), or `None` if
    /// there is no such file. The tree is chunked with `chunking`, or with
    /// `None` as [`ChunkerKind::keep_or_choose`] picks from the kind of its
    /// stored tree and its size. A kind that does not
    /// [suit](ChunkerKind::suits) the file's size is never used to build a
    /// tree (that tree would not be bounded): the version is then `None`, as
    /// no base for an upload chunked that way.
    fn open(
        &mut self,
        name: &str,
        chunking: Option<ChunkerKind>,
    ) -> Result<Option<(Tree, Self::Reader)>, ErrorCode>;
    /// What an interrupted upload of `name` left behind (a prefix of the
    /// version it was sending), to be reused by the next upload.
    fn partial(
        &mut self,
        name: &str,
        chunking: ChunkerKind,
    ) -> Result<Option<(Tree, Self::Reader)>, ErrorCode> {
        let _ = (name, chunking);
        Ok(None)
    }
    /// What a new version of `name` from `writer` (just created) may reuse,
    /// chunked as `chunking`: the version stored (as [`Store::open`]) and
    /// what an interrupted upload left (as [`Store::partial`]). A store
    /// that looked them up to create the writer answers from there.
    #[allow(clippy::type_complexity)]
    fn bases(
        &mut self,
        writer: &Self::Writer,
        name: &str,
        chunking: ChunkerKind,
    ) -> Result<(Option<(Tree, Self::Reader)>, Option<(Tree, Self::Reader)>), ErrorCode> {
        let _ = writer;
        Ok((self.open(name, Some(chunking))?, self.partial(name, chunking)?))
    }
    /// Stored files whose versions' sketches (see [`crate::tree::sketch`])
    /// share ids with `sketch`, and how many each; any order, files the
    /// session may not read included (it filters them). A store that keeps
    /// no sketches finds none.
    fn resembling(&mut self, sketch: &[u64]) -> Result<Vec<(String, u32)>, ErrorCode> {
        let _ = sketch;
        Ok(Vec::new())
    }
    /// Whether [`Store::resembling`] could find anything (the store keeps
    /// sketches, and of some file): a client offering a new name without
    /// its tree is then asked for it.
    fn may_resemble(&mut self) -> bool {
        false
    }
    /// Whether a version of `name` or what an interrupted upload of it
    /// left behind is stored (what [`Store::open`] or [`Store::partial`]
    /// would offer an upload to reuse), ideally without building any tree.
    fn holds(&mut self, name: &str) -> Result<bool, ErrorCode> {
        Ok(self.open(name, None)?.is_some())
    }
    /// Starts a new version of `name`, expected to be `size` bytes. The
    /// writer remembers which version of `name` is stored now (or that none
    /// is), for [`Store::finish`] to tell whether it was replaced meanwhile.
    /// With `expect`, fails with [`ErrorCode::Conflict`] unless the stored
    /// version is as expected; `finish` then publishes only if it still is.
    fn create(&mut self, name: &str, size: u64, expect: Option<Expect>) -> Result<Self::Writer, ErrorCode>;
    /// Like [`Store::create`]; the version is published with `meta`'s time
    /// and mode (protocol 7). A store that keeps no metadata refuses
    /// (`Unsupported`).
    fn create_with(
        &mut self,
        name: &str,
        size: u64,
        expect: Option<Expect>,
        meta: Option<Meta>,
    ) -> Result<Self::Writer, ErrorCode> {
        match meta {
            None => self.create(name, size, expect),
            Some(_) => Err(ErrorCode::Unsupported),
        }
    }
    /// The entries of directory `dir` (`""`: the root), sorted by name:
    /// its files, and its subdirectories (as [`EntryKind::Dir`]).
    /// [`ErrorCode::NotFound`] if there is no such directory.
    fn list_dir(&mut self, dir: &str) -> Result<Vec<StoredFile>, ErrorCode> {
        let _ = dir;
        Err(ErrorCode::Unsupported)
    }
    /// Sets the time and mode of a stored file or directory.
    fn set_meta(&mut self, name: &str, meta: Meta) -> Result<(), ErrorCode> {
        let _ = (name, meta);
        Err(ErrorCode::Unsupported)
    }
    /// Makes directory `name` and its parents, with `meta`; whether it was
    /// made (an existing one gets `meta`).
    fn make_dir(&mut self, name: &str, meta: Meta) -> Result<bool, ErrorCode> {
        let _ = (name, meta);
        Err(ErrorCode::Unsupported)
    }
    /// Publishes a copy of the stored file `from` as `to`, with `meta`, if
    /// `from` is still the version whose SHA-256 is `sha256`
    /// ([`ErrorCode::Conflict`] otherwise); its hash.
    fn copy(&mut self, from: &str, sha256: Hash, to: &str, meta: Meta) -> Result<Hash, ErrorCode> {
        let _ = (from, sha256, to, meta);
        Err(ErrorCode::Unsupported)
    }
    /// Publishes a verified version (`tree` is `Some`), or discards it
    /// (`None`), and says how (see [`Published`]). If the writer was
    /// created with an expectation and the version stored is no longer the
    /// one it found, nothing is published and this fails with
    /// [`ErrorCode::Conflict`]; the check and the publication are one
    /// step for every writer of the store. (A discard never fails so: it
    /// reports `replaced`, and the connection decides.) If the tree's file hash
    /// is [`Hash::UNKNOWN`] (the client left it to the server) the store
    /// computes it over the bytes it wrote; if it is known and the bytes do
    /// not match, the store keeps the old version and fails with
    /// [`ErrorCode::Integrity`]. A writer dropped without
    /// `finish` belongs to an interrupted upload.
    fn finish(
        &mut self,
        name: &str,
        writer: Self::Writer,
        tree: Option<Tree>,
    ) -> Result<Published, ErrorCode>;
    /// Every stored file.
    fn list(&mut self) -> Result<Vec<StoredFile>, ErrorCode>;
    /// One stored file.
    fn stat(&mut self, name: &str) -> Result<StoredFile, ErrorCode>;
    /// What interrupted uploads left behind (see [`Store::partial`]).
    fn partials(&mut self) -> Result<Vec<PartialFile>, ErrorCode> {
        Ok(Vec::new())
    }
    /// What an interrupted upload of `name` left behind, if anything.
    fn partial_info(&mut self, name: &str) -> Result<Option<PartialFile>, ErrorCode> {
        let _ = name;
        Ok(None)
    }
    /// Removes a file.
    fn delete(&mut self, name: &str) -> Result<(), ErrorCode>;
    /// Removes an empty directory ([`ErrorCode::Conflict`] if not empty).
    fn remove_dir(&mut self, name: &str) -> Result<(), ErrorCode> {
        let _ = name;
        Err(ErrorCode::Unsupported)
    }
}

/// Direction of a transfer, seen from the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    Upload,
    /// Server to client.
    Download,
}

/// What happened on a connection, for logs and the dashboard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The client proved its key: its first sealed frame opened.
    Authenticated {
        /// The key's name.
        key: String,
    },
    /// A request was refused.
    Refused {
        /// The name asked for, if any.
        name: String,
        /// Why.
        code: ErrorCode,
    },
    /// A transfer began.
    Started {
        /// File name.
        name: String,
        /// Upload or download.
        direction: Direction,
        /// File size of the version being sent.
        size: u64,
        /// Whether an earlier version is being reused (uploads only).
        base: bool,
    },
    /// A transfer ended.
    Finished {
        /// File name.
        name: String,
        /// Upload or download.
        direction: Direction,
        /// File size.
        size: u64,
        /// How it ended.
        outcome: Outcome,
        /// File bytes that crossed the wire.
        literal_bytes: u64,
        /// File bytes reused from the old version (uploads).
        reused_bytes: u64,
        /// Bytes its own frames took on the wire, when they came between
        /// other files' (a `Put` sent without waiting): what the
        /// connection's counters cannot tell apart. `None`: the counters
        /// between `Started` and this tell.
        wire_bytes: Option<u64>,
    },
    /// A file was deleted.
    Deleted {
        /// File name.
        name: String,
    },
    /// A directory was listed (a tree sync's first step).
    Listed {
        /// The directory.
        dir: String,
    },
    /// A stored file was copied (no file data crossed the wire).
    Copied {
        /// The stored file.
        from: String,
        /// The copy.
        to: String,
    },
}

/// A client's time and mode, with every bit but the permissions dropped.
fn clean(meta: Meta) -> Meta {
    Meta { mode: meta.mode & MODE_BITS, nanos: meta.nanos.min(999_999_999), ..meta }
}

/// A transfer in progress, for the dashboard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// File name.
    pub name: String,
    /// Upload or download.
    pub direction: Direction,
    /// Bytes done (assembled for uploads, sent for downloads).
    pub done: u64,
    /// File size.
    pub total: u64,
}

/// What an upload reuses: the stored version, then any partial upload.
type ReuseTree = Chain<Tree, Tree>;
type ReuseSource<R> = Chain<Option<R>, Option<R>>;
type UploadReceiver<S> = Receiver<ReuseTree, ReuseSource<<S as Store>::Reader>, <S as Store>::Writer>;

enum State<S: Store, K> {
    Handshake(Box<ServerHandshake<K>>),
    Idle,
    Reply(VecDeque<Reply>),
    Receiving { name: String, old: Option<Summary>, conditional: bool, rx: Box<UploadReceiver<S>> },
    Sending { name: String, offered: bool, tx: Box<Sender<Tree, S::Reader>> },
    Putting(Box<put::Putting<S>>),
    Giving(Box<put::Giving<S>>),
}

enum Reply {
    Info(StoredFile),
    Entry(StoredFile),
    Partial(PartialFile),
    ListEnd,
    Replaced,
    Deleted,
    Done(Outcome, Option<Hash>),
    Error(ErrorCode),
    Offer(Summary),
    /// A `Sig`'s leaves from this one (at this file offset) on.
    Leaves(Box<Tree>, u32, u64),
}

/// One client connection on the server.
pub struct ServerConn<S: Store, K> {
    store: S,
    /// The permissions of the client's key, once the handshake passed.
    access: Option<Access>,
    /// Whether a sealed frame from the client has opened (the hello alone
    /// may be a replay).
    confirmed: bool,
    salt: [u8; 8],
    /// Capabilities this server and the client share.
    caps: u32,
    /// The sketch the client sent for its next request (an upload).
    sketch: Option<Sketch>,
    /// The protocol version of the session, once agreed.
    version: u16,
    state: State<S, K>,
    events: VecDeque<Event>,
    deadline: Instant,
    /// How long the client may stay silent between requests, once
    /// authenticated.
    idle_ms: u64,
}

impl<S: Store, K: Keys> ServerConn<S, K> {
    /// A connection checking clients against `keys`; `ephemeral` is 32
    /// fresh random bytes from the shell; `now` is when it was accepted.
    /// The client has [`HANDSHAKE_TIMEOUT_MS`] from then to prove its key
    /// (its first sealed frame must have opened), and may then stay silent
    /// [`IDLE_TIMEOUT_MS`] between requests (see [`Self::timeouts`]).
    pub fn new(mut store: S, keys: K, ephemeral: [u8; 32], now: Instant) -> Self {
        // Sketches are worth a client's while once the store has some.
        let caps = if store.may_resemble() { CAPS } else { CAPS & !crate::message::CAP_SKETCH };
        let handshake = ServerHandshake::new(keys, ephemeral, now).announcing(caps);
        ServerConn {
            store,
            access: None,
            confirmed: false,
            salt: [0; 8],
            caps: 0,
            sketch: None,
            version: crate::PROTOCOL_VERSION,
            state: State::Handshake(Box::new(handshake)),
            events: VecDeque::new(),
            deadline: now.plus_ms(HANDSHAKE_TIMEOUT_MS),
            idle_ms: IDLE_TIMEOUT_MS,
        }
    }

    /// Sets the time, from `start` (the accept), within which the client
    /// must prove its key, and how long it may then stay silent between
    /// requests. Bytes that do not make a whole frame extend neither.
    pub fn timeouts(mut self, start: Instant, handshake_ms: u64, idle_ms: u64) -> Self {
        self.deadline = start.plus_ms(handshake_ms);
        self.idle_ms = idle_ms;
        if let State::Handshake(h) = &mut self.state {
            h.deadline = self.deadline;
        }
        self
    }

    /// Whether the client has proved its key (see [`Self::key_name`]).
    pub fn is_authenticated(&self) -> bool {
        self.confirmed
    }

    /// Whether a request is being served (a reply or a transfer): the
    /// time a server needs its large buffers.
    pub fn is_busy(&self) -> bool {
        matches!(
            self.state,
            State::Reply(_)
                | State::Receiving { .. }
                | State::Sending { .. }
                | State::Putting(_)
                | State::Giving(_)
        )
    }

    /// The name of the client's key, once the client proved it (its first
    /// sealed frame opened: a replayed hello proves nothing).
    pub fn key_name(&self) -> Option<&str> {
        self.access.as_ref().filter(|_| self.confirmed).map(|a| a.key.as_str())
    }

    fn allowed(&self, op: Operation, name: &str) -> bool {
        self.access.as_ref().is_some_and(|a| a.allows(op, name))
    }

    /// The next event, if any.
    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether the connection sits between requests (a close now is clean).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// The transfer in progress, if any.
    pub fn progress(&self) -> Option<Progress> {
        match &self.state {
            State::Receiving { name, rx, .. } => Some(Progress {
                name: name.clone(),
                direction: Direction::Upload,
                done: rx.progress(),
                total: rx.offer().size,
            }),
            State::Sending { name, tx, .. } => Some(Progress {
                name: name.clone(),
                direction: Direction::Download,
                done: tx.literal_bytes(),
                total: tx.summary().size,
            }),
            State::Giving(g) => Some(Progress {
                name: g.name.clone(),
                direction: Direction::Download,
                done: g.pos.min(g.summary.size),
                total: g.summary.size,
            }),
            State::Putting(p) => Some(Progress {
                name: p.name.clone(),
                direction: Direction::Upload,
                done: p.literal + p.reused,
                total: p.size,
            }),
            _ => None,
        }
    }

    fn refuse(&mut self, name: &str, code: ErrorCode) {
        // Asking for the tree is part of a normal resumed upload, not a
        // refusal to count or show.
        if code != ErrorCode::NeedTree {
            self.events.push_back(Event::Refused { name: name.to_string(), code });
        }
        self.state = State::Reply([Reply::Error(code)].into());
    }

    /// Whether the session's protocol version has `msg` (a client must
    /// not send what the version agreed on lacks).
    fn speaks(&self, msg: &Message<'_>) -> bool {
        let since = match msg {
            Message::UploadIf { .. } | Message::ListAll => 6,
            Message::ListDir { .. }
            | Message::UploadMeta { .. }
            | Message::SetMeta { .. }
            | Message::MakeDir { .. }
            | Message::Copy { .. }
            | Message::Sig { .. }
            | Message::Put { .. }
            | Message::Fetch { .. } => 7,
            _ => 0,
        };
        self.version >= since
    }

    /// Answers `ListDir`: the entries the key may see (its files, and the
    /// directories that lead to them).
    fn list_dir(&mut self, dir: &str) -> Result<(), ErrorCode> {
        let access = self.access.as_ref().ok_or(ErrorCode::PermissionDenied)?;
        let shown = |name: &str| access.covers(name) || access.leads_to(name);
        // Read, not write: a listing tells every name, size and hash.
        if !access.read || !(dir.is_empty() || shown(dir)) {
            return Err(ErrorCode::PermissionDenied);
        }
        // A tree sync's first step, even where nothing is stored yet.
        self.events.push_back(Event::Listed { dir: dir.to_string() });
        let entries = self.store.list_dir(dir)?;
        let mut q: VecDeque<Reply> = entries
            .into_iter()
            .filter(|e| match e.kind {
                EntryKind::File => access.covers(&e.name),
                EntryKind::Dir => shown(&e.name),
            })
            .map(Reply::Entry)
            .collect();
        q.push_back(Reply::ListEnd);
        self.state = State::Reply(q);
        Ok(())
    }

    /// Answers `List` (`all`: `ListAll`, with interrupted uploads too).
    fn list(&mut self, all: bool) {
        let Some(access) = self.access.as_ref().filter(|a| a.read) else {
            self.refuse("", ErrorCode::PermissionDenied);
            return;
        };
        let listed = self.store.list().and_then(|files| {
            let partials = if all { self.store.partials()? } else { Vec::new() };
            Ok((files, partials))
        });
        match listed {
            Ok((files, partials)) => {
                let files = files.into_iter().filter(|f| access.covers(&f.name)).map(Reply::Info);
                let partials = partials.into_iter().filter(|p| access.covers(&p.name)).map(Reply::Partial);
                let mut q: VecDeque<Reply> = files.chain(partials).collect();
                q.push_back(Reply::ListEnd);
                self.state = State::Reply(q);
            }
            Err(code) => self.refuse("", code),
        }
    }

    /// Answers `Stat`: from protocol 6 on like a listing of one name, with
    /// what an interrupted upload of it left.
    fn stat(&mut self, name: &str) -> Result<(), ErrorCode> {
        if self.version < 6 {
            let f = self.store.stat(name)?;
            self.state = State::Reply([Reply::Info(f)].into());
            return Ok(());
        }
        let file = match self.store.stat(name) {
            Ok(f) => Some(f),
            Err(ErrorCode::NotFound) => None,
            Err(e) => return Err(e),
        };
        let partial = self.store.partial_info(name)?;
        if file.is_none() && partial.is_none() {
            return Err(ErrorCode::NotFound);
        }
        let q = file.map(Reply::Info).into_iter().chain(partial.map(Reply::Partial)).chain([Reply::ListEnd]);
        self.state = State::Reply(q.collect());
        Ok(())
    }

    fn request(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        if !self.speaks(&msg) {
            self.refuse("", ErrorCode::Unsupported);
            return Ok(());
        }
        // For the request that follows it only; no answer.
        if let Message::Sketch { ids } = msg {
            let bad = SessionError::Protocol(ErrorCode::BadMessage);
            if ids.len() % 8 != 0 || ids.len() > SKETCH_LEN * 8 {
                return Err(bad);
            }
            let mut sketch = Sketch::new();
            for id in ids.chunks_exact(8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(id);
                sketch.push(u64::from_be_bytes(b)).map_err(|_| bad)?;
            }
            self.sketch = Some(sketch);
            return Ok(());
        }
        let sketch = self.sketch.take();
        if let Message::Put { name, size, meta, chunking, base } = msg {
            self.start_put(name, size, meta, chunking, base);
            return Ok(());
        }
        let name = match msg {
            Message::List | Message::ListAll => {
                self.list(matches!(msg, Message::ListAll));
                return Ok(());
            }
            Message::ListDir { dir } if dir.is_empty() => {
                if let Err(code) = self.list_dir(dir) {
                    self.refuse(dir, code);
                }
                return Ok(());
            }
            Message::Stat { name }
            | Message::Download { name }
            | Message::Delete { name }
            | Message::Upload { name, .. }
            | Message::UploadIf { name, .. }
            | Message::ListDir { dir: name }
            | Message::UploadMeta { name, .. }
            | Message::SetMeta { name, .. }
            | Message::MakeDir { name, .. }
            | Message::Copy { to: name, .. }
            | Message::Sig { name, .. }
            | Message::Fetch { name } => name,
            Message::Error(c) => return Err(SessionError::Peer(c)),
            _ => return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage)),
        };
        let from = match msg {
            Message::Copy { from, .. } => Some(from),
            _ => None,
        };
        if let Err(code) = validate_name(name).and(from.map_or(Ok(()), validate_name)) {
            self.refuse(name, code);
            return Ok(());
        }
        let permitted = match msg {
            // Checked against what the key sees, in `list_dir`.
            Message::ListDir { .. } => true,
            Message::Copy { from, .. } => {
                self.allowed(Operation::Read, from) && self.allowed(Operation::Write, name)
            }
            // The leaves of a version tell of its bytes: reading.
            Message::Sig { .. } => self.allowed(Operation::Read, name),
            // A writer stats a name before it uploads it.
            Message::Stat { .. } => {
                self.allowed(Operation::Read, name) || self.allowed(Operation::Write, name)
            }
            Message::Download { .. } | Message::Fetch { .. } => self.allowed(Operation::Read, name),
            Message::Upload { .. }
            | Message::UploadIf { .. }
            | Message::UploadMeta { .. }
            | Message::SetMeta { .. }
            | Message::MakeDir { .. } => self.allowed(Operation::Write, name),
            _ => self.allowed(Operation::Delete, name),
        };
        if !permitted {
            self.refuse(name, ErrorCode::PermissionDenied);
            return Ok(());
        }
        let result = match msg {
            Message::Stat { name } => self.stat(name),
            Message::Delete { name } => self.delete(name),
            Message::Upload { name, offer } => self.start_upload(now, name, offer, None, None, sketch),
            Message::UploadIf { name, offer, expect } => {
                self.start_upload(now, name, offer, Some(expect), None, sketch)
            }
            Message::UploadMeta { name, offer, expect, meta } => {
                self.start_upload(now, name, offer, expect, Some(clean(meta)), sketch)
            }
            Message::ListDir { dir } => self.list_dir(dir),
            Message::Sig { name, chunking } => self.sig(name, chunking),
            Message::Fetch { name } => {
                let compress = self.caps & crate::message::CAP_ZSTD != 0;
                put::Giving::start(&mut self.store, name, compress).map(|g| {
                    self.events.push_back(Event::Started {
                        name: name.to_string(),
                        direction: Direction::Download,
                        size: g.summary.size,
                        base: false,
                    });
                    self.state = State::Giving(Box::new(g));
                })
            }
            Message::SetMeta { name, meta } => self.store.set_meta(name, clean(meta)).map(|()| {
                self.state = State::Reply([Reply::Done(Outcome::Unchanged, None)].into());
            }),
            Message::MakeDir { name, meta } => self.store.make_dir(name, clean(meta)).map(|made| {
                let o = if made { Outcome::Written } else { Outcome::Unchanged };
                self.state = State::Reply([Reply::Done(o, None)].into());
            }),
            Message::Copy { from, sha256, to, meta } => {
                self.store.copy(from, sha256, to, clean(meta)).map(|h| {
                    self.events.push_back(Event::Copied { from: from.to_string(), to: to.to_string() });
                    self.state = State::Reply([Reply::Done(Outcome::Written, Some(h))].into());
                })
            }
            Message::Download { name } => self.start_download(now, name),
            _ => Ok(()),
        };
        match result {
            // A tree sync lists what may not exist yet (a new prefix): an
            // answer, not a refusal to count or show.
            Err(ErrorCode::NotFound) if matches!(msg, Message::ListDir { .. }) => {
                self.state = State::Reply([Reply::Error(ErrorCode::NotFound)].into());
            }
            Err(code) => self.refuse(name, code),
            Ok(()) => {}
        }
        Ok(())
    }

    /// Answers `Sig`: the summary and leaves of the stored version chunked
    /// as `chunking`.
    fn sig(&mut self, name: &str, chunking: ChunkerKind) -> Result<(), ErrorCode> {
        let (tree, _) = self.store.open(name, Some(chunking))?.ok_or(ErrorCode::NotFound)?;
        let summary = tree.summary();
        if !summary.file_hash.is_known() {
            return Err(ErrorCode::NotFound);
        }
        self.state = State::Reply([Reply::Offer(summary), Reply::Leaves(Box::new(tree), 0, 0)].into());
        Ok(())
    }

    /// Starts a `Put`. Refused or not, its pieces are read to its
    /// `PutEnd`, which the refusal (or `Done`) answers.
    fn start_put(&mut self, name: &str, size: u64, meta: Meta, chunking: ChunkerKind, base: Option<Hash>) {
        let refusal = if validate_name(name).is_err() {
            Some(ErrorCode::BadName)
        } else if !self.allowed(Operation::Write, name) {
            Some(ErrorCode::PermissionDenied)
        } else if base.is_some() && !self.allowed(Operation::Read, name) {
            // `Ref`s into the stored version, with the hash `Done` tells,
            // would read it a byte at a time: a delta needs reading.
            Some(ErrorCode::PermissionDenied)
        } else if size > put::MAX_SIZE {
            Some(ErrorCode::Unsupported)
        } else {
            None
        };
        let started = match refusal {
            Some(code) => Err(code),
            None => put::Putting::start(&mut self.store, name, size, chunking, base, clean(meta)),
        };
        let p = match started {
            Ok(p) => {
                self.events.push_back(Event::Started {
                    name: name.to_string(),
                    direction: Direction::Upload,
                    size,
                    base: base.is_some(),
                });
                p
            }
            Err(code) => put::Putting::refused(name, code),
        };
        self.state = State::Putting(Box::new(p));
    }

    /// Publishes a `Put` at its end (or discards it), and answers.
    fn end_put(&mut self, file_hash: Hash) {
        let State::Putting(mut p) = core::mem::replace(&mut self.state, State::Idle) else { return };
        let name = core::mem::take(&mut p.name);
        let reply = match p.finish(file_hash) {
            Ok((w, tree)) => match self.store.finish(&name, w, Some(tree)) {
                Ok(published) => {
                    self.events.push_back(Event::Finished {
                        name: name.clone(),
                        direction: Direction::Upload,
                        size: p.size,
                        outcome: Outcome::Written,
                        literal_bytes: p.literal,
                        reused_bytes: p.reused,
                        wire_bytes: Some(p.wire),
                    });
                    Reply::Done(Outcome::Written, published.file_hash)
                }
                Err(code) => Reply::Error(code),
            },
            Err((w, code)) => {
                if let Some(w) = w {
                    let _ = self.store.finish(&name, w, None);
                }
                Reply::Error(code)
            }
        };
        if let Reply::Error(code) = reply {
            self.events.push_back(Event::Refused { name, code });
        }
        self.state = State::Reply([reply].into());
    }

    /// Deletes a file or (from protocol 7 on) an empty directory.
    fn delete(&mut self, name: &str) -> Result<(), ErrorCode> {
        match self.store.delete(name) {
            Err(ErrorCode::BadName) if self.version >= 7 => self.store.remove_dir(name)?,
            r => r?,
        }
        self.events.push_back(Event::Deleted { name: name.to_string() });
        self.state = State::Reply([Reply::Deleted].into());
        Ok(())
    }

    fn start_upload(
        &mut self,
        now: Instant,
        name: &str,
        offer: Summary,
        expect: Option<Expect>,
        meta: Option<Meta>,
        sketch: Option<Sketch>,
    ) -> Result<(), ErrorCode> {
        // A kind too fine for the size would make this server hold a tree
        // without bound: refused (clients pick with `ChunkerKind::for_size`).
        if !offer.chunking.suits(offer.size) {
            return Err(ErrorCode::Unsupported);
        }
        if let Some(expect) = expect {
            // Told before any transfer (and before `NeedTree`); the store
            // checks again, for good, when it publishes.
            let stored = match self.store.stat(name) {
                Ok(f) => Some(f.sha256),
                Err(ErrorCode::NotFound) => None,
                Err(e) => return Err(e),
            };
            let holds = match expect {
                Expect::Absent => stored.is_none(),
                Expect::Match(h) => stored == Some(h),
            };
            if !holds {
                return Err(ErrorCode::Conflict);
            }
        }
        // A new name may still be mostly a file stored elsewhere (a copy,
        // the next build of an artefact): see `resembling` and `similar`.
        let holds = self.store.holds(name)?;
        let fresh = expect.is_none() && !holds;
        let mut similar = None;
        if fresh {
            if let Some(sk) = &sketch {
                similar = self.resembling(name, sk)?;
            }
            if similar.is_none() {
                similar = self.similar(name, offer.size)?;
            }
        }
        // A client that sends sketches, offering a new name without its
        // tree, is asked for it (and its sketch) if the store could hold
        // its data under another name.
        let searchable = fresh
            && self.caps & crate::message::CAP_SKETCH != 0
            && offer.size >= SKETCH_MIN
            && self.store.may_resemble();
        // Without the offer's tree nothing held could be reused: the client
        // builds it and offers again (it streams first uploads only).
        if !offer.root.is_known() && (holds || similar.is_some() || searchable) {
            return Err(ErrorCode::NeedTree);
        }
        // The writer first: it records which version is stored, so that one
        // published while the base is loaded counts as replacing it.
        let writer = self.store.create_with(name, offer.size, expect, meta)?;
        let (old, partial) = self.store.bases(&writer, name, offer.chunking)?;
        let old_summary = old.as_ref().map(|(t, _)| t.summary());
        // Nothing of the name: the similar file is the base (never taken
        // for this name's version: an upload of the same bytes is written).
        let old = match (old, &partial, similar) {
            // Only a help: a file gone or changed since it was found (a
            // directory now, unreadable) is no base, and no failure.
            (None, None, Some(other)) => self.store.open(&other, Some(offer.chunking)).ok().flatten(),
            (old, _, _) => old,
        };
        let has_base = old.is_some() || partial.is_some();
        let base = has_base.then(|| {
            let split = |v: Option<(Tree, S::Reader)>| match v {
                Some((t, r)) => (t, Some(r)),
                None => (Tree::build(&[], offer.chunking), None),
            };
            let ((ta, ra), (tb, rb)) = (split(old), split(partial));
            let a_size = ta.summary().size;
            Base { tree: Chain { a: ta, b: tb, a_size }, source: Chain { a: ra, b: rb, a_size } }
        });
        // Unchanged only against the stored version: a partial that holds
        // all of the offer is copied from, and the version published.
        let rx = Receiver::new(offer, self.salt, base, writer, now)
            .map_err(|_| ErrorCode::Unsupported)?
            .holding(old_summary.map(|s| (s.root, s.size)))
            .deltas(self.caps & crate::message::CAP_DELTA != 0)
            .fine(self.caps & crate::message::CAP_FINE != 0);
        // Which pieces of a chunk the old bytes hold tells far more than
        // which chunks they hold: only to a key that may read them anyway.
        // A device's write-only key still gets its appends as suffixes.
        let rx = if self.allowed(Operation::Read, name) { rx } else { rx.without_pieces() };
        self.events.push_back(Event::Started {
            name: name.to_string(),
            direction: Direction::Upload,
            size: offer.size,
            base: has_base,
        });
        self.state = State::Receiving {
            name: name.to_string(),
            old: old_summary,
            conditional: expect.is_some(),
            rx: Box::new(rx),
        };
        Ok(())
    }

    /// For an upload of `size` bytes to `name`, which the store may not
    /// hold: the file beside it (same directory) that the client's key may
    /// read, whose size is closest and within half to twice `size`, to
    /// reuse as the base (as rsync's `--fuzzy` looks for a basis file).
    /// `None` for
    /// small files, and in directories too large to look through. (What
    /// the client learns, which of its chunks the base holds, it could read
    /// anyway.)
    /// For an upload to `name`, which the store does not hold, of a version
    /// whose sketch is `sketch`: the stored file the client's key may read
    /// whose sketch shares the most ids with it, to reuse as the base
    /// (its data, wherever it is stored). What the client learns, which of
    /// its chunks the base holds, it could read anyway.
    fn resembling(&mut self, name: &str, sketch: &[u64]) -> Result<Option<String>, ErrorCode> {
        let found = self.store.resembling(sketch)?;
        Ok(found
            .into_iter()
            .filter(|(n, hits)| *hits > 0 && n != name && self.allowed(Operation::Read, n))
            .max_by_key(|(n, hits)| (*hits, core::cmp::Reverse(n.clone())))
            .map(|(n, _)| n))
    }

    fn similar(&mut self, name: &str, size: u64) -> Result<Option<String>, ErrorCode> {
        if size < SIMILAR_MIN {
            return Ok(None);
        }
        let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
        let entries = match self.store.list_dir(dir) {
            Ok(e) => e,
            Err(ErrorCode::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        if entries.len() > SIMILAR_MAX_ENTRIES {
            return Ok(None);
        }
        let best = entries
            .into_iter()
            .filter(|f| f.kind == EntryKind::File && f.name != name && f.sha256.is_known())
            .filter(|f| f.size >= size / 2 && f.size <= size.saturating_mul(2))
            .filter(|f| self.allowed(Operation::Read, &f.name))
            .min_by_key(|f| (f.size.abs_diff(size), core::cmp::Reverse((f.modified, f.nanos))));
        Ok(best.map(|f| f.name))
    }

    fn start_download(&mut self, now: Instant, name: &str) -> Result<(), ErrorCode> {
        let (tree, source) = self.store.open(name, None)?.ok_or(ErrorCode::NotFound)?;
        let summary = tree.summary();
        let tx = Sender::new(tree, source, summary, self.salt, now)
            .compress(self.caps & crate::message::CAP_ZSTD != 0);
        self.events.push_back(Event::Started {
            name: name.to_string(),
            direction: Direction::Download,
            size: summary.size,
            base: false,
        });
        self.state = State::Sending { name: name.to_string(), offered: false, tx: Box::new(tx) };
        Ok(())
    }

    /// Ends an upload that failed with `e`. The old version stays. After a
    /// protocol or storage error (a full disk) what was written is
    /// discarded; after a timeout (a client gone quiet) or an error the
    /// client reports, the writer is only dropped, so a store may keep it
    /// for the client's next attempt, as when the connection breaks.
    fn abandon_upload(&mut self, e: SessionError) {
        if let State::Receiving { name, rx, .. } = core::mem::replace(&mut self.state, State::Idle) {
            let (writer, _) = rx.into_parts();
            if !matches!(e, SessionError::Timeout | SessionError::Peer(_)) {
                let _ = self.store.finish(&name, writer, None);
            }
        }
    }

    /// Publishes or discards a finished upload and queues the answer.
    fn end_upload(&mut self, outcome: Outcome) {
        let State::Receiving { name, old, conditional, rx } =
            core::mem::replace(&mut self.state, State::Idle)
        else {
            return;
        };
        let stats: ReceiveStats = rx.stats();
        let offer = *rx.offer();
        let size = offer.size;
        let (writer, tree) = rx.into_parts();
        let tree = if outcome == Outcome::Written { tree } else { None };
        let unchanged = (outcome == Outcome::Unchanged)
            .then(|| old.filter(|s| s.root == offer.root && s.size == offer.size).map(|s| s.file_hash))
            .flatten();
        let mut replies = VecDeque::new();
        let finished = match self.store.finish(&name, writer, tree) {
            // Nothing published, but the version this upload was
            // unchanged from is no longer the one stored.
            Ok(p) if p.replaced && conditional && outcome == Outcome::Unchanged => Err(ErrorCode::Conflict),
            r => r,
        };
        match finished {
            Ok(published) => {
                // The client left the whole-file hash to us: tell it.
                let file_hash = published.file_hash.or(unchanged).filter(|_| !offer.file_hash.is_known());
                self.events.push_back(Event::Finished {
                    name,
                    direction: Direction::Upload,
                    size,
                    outcome,
                    literal_bytes: stats.literal_bytes,
                    reused_bytes: stats.reused_bytes,
                    wire_bytes: None,
                });
                if published.replaced && outcome != Outcome::Integrity && self.version >= 6 {
                    replies.push_back(Reply::Replaced);
                }
                replies.push_back(Reply::Done(outcome, file_hash));
            }
            Err(code) => {
                self.events.push_back(Event::Refused { name, code });
                replies.push_back(Reply::Error(code));
            }
        }
        self.state = State::Reply(replies);
    }
}

impl<S: Store, K: Keys> Machine for ServerConn<S, K> {
    /// The connection has nothing more to do (it never finishes by itself:
    /// the client closes it).
    type Output = ();

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        if !self.confirmed && !matches!(self.state, State::Handshake(_)) {
            // Only the holder of the session's keys could seal this frame.
            self.confirmed = true;
            let key = self.access.as_ref().map(|a| a.key.clone()).unwrap_or_default();
            self.events.push_back(Event::Authenticated { key });
        }
        // Until then the deadline counts from the accept.
        if self.confirmed {
            self.deadline = now.plus_ms(self.idle_ms);
        }
        match &mut self.state {
            State::Handshake(h) => h.handle(now, msg),
            // The root of an upload this server refused (`NeedTree`, say)
            // may have been sent before the refusal arrived: dropped.
            State::Idle | State::Reply(_) if matches!(msg, Message::Root { .. }) => Ok(()),
            State::Idle => self.request(now, msg),
            State::Receiving { rx, .. } => {
                let r = rx.handle(now, msg);
                if let Err(e) = r {
                    self.abandon_upload(e);
                }
                r
            }
            State::Sending { tx, .. } => tx.handle(now, msg),
            State::Putting(p) => match p.handle(msg) {
                Ok(None) => Ok(()),
                Ok(Some(file_hash)) => {
                    self.end_put(file_hash);
                    Ok(())
                }
                Err(code) => {
                    if let State::Putting(mut p) = core::mem::replace(&mut self.state, State::Idle)
                        && let Err((Some(w), _)) = p.finish(Hash::UNKNOWN)
                    {
                        let _ = self.store.finish(&p.name, w, None);
                    }
                    Err(SessionError::Protocol(code))
                }
            },
            State::Reply(_) | State::Giving(_) => Err(SessionError::Protocol(ErrorCode::UnexpectedMessage)),
        }
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<()>, SessionError> {
        loop {
            match &mut self.state {
                State::Handshake(h) => match h.poll(now, out)? {
                    Poll::Done(salt) => {
                        self.salt = salt;
                        self.caps = h.shared_caps();
                        self.version = h.version();
                        self.access = h.access().cloned();
                        self.state = State::Idle;
                    }
                    p => return Ok(p.map_done()),
                },
                State::Idle | State::Putting(_) => return machine::wait_until(now, self.deadline),
                State::Giving(g) => match g.emit(out)? {
                    Some(n) => return Ok(Poll::Transmit(n)),
                    None => {
                        let State::Giving(g) = core::mem::replace(&mut self.state, State::Idle) else {
                            continue;
                        };
                        let size = g.summary.size;
                        self.events.push_back(Event::Finished {
                            name: g.name,
                            direction: Direction::Download,
                            size,
                            outcome: Outcome::Written,
                            literal_bytes: size,
                            reused_bytes: 0,
                            wire_bytes: Some(g.wire),
                        });
                    }
                },
                State::Reply(q) => {
                    let Some(r) = q.pop_front() else {
                        self.state = State::Idle;
                        continue;
                    };
                    if let Reply::Leaves(tree, start, offset) = r {
                        let mut packed = Vec::new();
                        let (n, last) = put::pack_leaves(&tree, &self.salt, start, &mut packed);
                        let m = Message::Entries { level: 0, start, offset, last, packed: &packed };
                        let emitted = machine::emit(&m, out);
                        if !last {
                            let next = tree.entry(0, start + n).map_or(tree.summary().size, |e| e.offset);
                            q.push_front(Reply::Leaves(tree, start + n, next));
                        }
                        return emitted;
                    }
                    let m = match &r {
                        Reply::Info(f) => Message::Info(f.info()),
                        Reply::Entry(f) => Message::Entry(f.entry()),
                        Reply::Partial(p) => Message::Partial(PartialInfo {
                            name: &p.name,
                            size: p.size,
                            modified: p.modified,
                        }),
                        Reply::ListEnd => Message::ListEnd,
                        Reply::Replaced => Message::Replaced,
                        Reply::Deleted => Message::Deleted,
                        Reply::Done(o, h) => Message::Done { outcome: *o, file_hash: *h },
                        Reply::Error(c) => Message::Error(*c),
                        Reply::Offer(s) => Message::Offer(*s),
                        Reply::Leaves(..) => continue,
                    };
                    return machine::emit(&m, out);
                }
                State::Receiving { rx, .. } => match rx.poll(now, out) {
                    Ok(Poll::Done(o)) => self.end_upload(o),
                    Ok(p) => return Ok(p.map_done()),
                    Err(e) => {
                        self.abandon_upload(e);
                        return Err(e);
                    }
                },
                State::Sending { offered, tx, .. } if !*offered => {
                    *offered = true;
                    return machine::emit(&Message::Offer(*tx.summary()), out);
                }
                State::Sending { tx, name, .. } => match tx.poll(now, out)? {
                    Poll::Done(outcome) => {
                        let ev = Event::Finished {
                            name: core::mem::take(name),
                            direction: Direction::Download,
                            size: tx.summary().size,
                            outcome,
                            literal_bytes: tx.literal_bytes(),
                            reused_bytes: 0,
                            wire_bytes: None,
                        };
                        self.events.push_back(ev);
                        self.state = State::Idle;
                    }
                    p => return Ok(p.map_done()),
                },
            }
        }
    }

    fn take_channel(&mut self) -> Option<Channel> {
        match &mut self.state {
            State::Handshake(h) => h.take_channel(),
            _ => None,
        }
    }
}

impl<T> Poll<T> {
    /// Forgets a `Done` value (callers match `Done` before calling this).
    fn map_done<U: Default>(self) -> Poll<U> {
        match self {
            Poll::Transmit(n) => Poll::Transmit(n),
            Poll::Wait(t) => Poll::Wait(t),
            Poll::Done(_) => Poll::Done(U::default()),
        }
    }
}
