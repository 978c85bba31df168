//! Connections: the handshake on both sides, the client's operations, and
//! (with `alloc`) the server's request loop over a [`server::Store`].
//!
//! Message flow (client `C`, server `S`):
//! ```text
//! C: Hello{version, cipher, key id, noise: -> psk, e}   in clear
//! S: Accept{noise: <- e, ee}  (or Error(AuthFailed) and close)
//! every later frame is sealed (see `crate::channel`); then any number of
//! requests, each checked against the key's permissions:
//! C: List                     S: Info* ListEnd
//! C: ListAll                  S: Info* Partial* ListEnd            (6)
//! C: Stat{name}               S: Info | Error                      (5)
//!                             S: Info? Partial? ListEnd | Error    (6)
//! C: Delete{name}             S: Deleted | Error
//! C: Upload{name, offer}      C is the sender, S the receiver:
//!                             S: GetChildren/GetData*  C: Entries/Data*
//!                             S: Replaced? Done(outcome, hash?) | Error
//! C: UploadIf{name, offer, expect}                                 (6)
//!                             as Upload, or Error(Conflict) at once or
//!                             instead of Done if the stored version is
//!                             not (or no longer) the one expected
//! C: Download{name}           S: Offer | Error; then S is the sender,
//!                             C the receiver, and C ends with Done(outcome)
//! ```
//! An upload offer may leave the whole-file SHA-256 unknown
//! ([`crate::Hash::UNKNOWN`]): the server computes it while writing and
//! returns it in `Done`, so the client hashes its file only once (chunk ids).
//!
//! A first upload may leave the root unknown too, so that its bytes go out
//! while the client still hashes them; the root follows when it is known:
//! ```text
//! C: Upload{name, offer without root}
//!                             S: GetData*   C: Data* ... Root{root, height} ... Data*
//!                             S: Done(outcome, hash) | Error
//! ```
//! A server holding a version or an interrupted upload of that name answers
//! such an offer with `Error(NeedTree)` instead, and the client offers again
//! with its tree (a delta).
//!
//! Requests marked (6) exist from protocol 6 on; in a session of version 5
//! the client operations here refuse them with `Peer(Unsupported)` before
//! sending anything, as the server would.

use crate::channel::{Channel, CipherKind, ClientKey, Handshake, KEY_ID_LEN};
use crate::chunker::ChunkerKind;
use crate::error::{ErrorCode, SessionError};
use crate::hash::Hash;
use crate::machine::{self, Machine, Poll};
use crate::message::{CAPS, Entry, Expect, FileInfo, Message, Meta, Outcome, PartialInfo};
use crate::sender::Sender;
use crate::source::Source;
use crate::time::{IDLE_TIMEOUT_MS, Instant};
use crate::tree::TreeView;
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// The version two peers use: the older of the newest each speaks, if this
/// side still speaks it.
fn agree(mine: u16, theirs: u16) -> Result<u16, SessionError> {
    let v = mine.min(theirs);
    if v < MIN_PROTOCOL_VERSION {
        return Err(SessionError::Protocol(ErrorCode::VersionMismatch));
    }
    Ok(v)
}

/// The Noise prologue: the clear fields of the client's hello, so that
/// neither side can be talked into another version, cipher or key.
fn prologue(version: u16, cipher: CipherKind, key: &[u8; KEY_ID_LEN]) -> [u8; 20] {
    let mut p = [0u8; 20];
    p[..9].copy_from_slice(b"deltasync");
    p[9..11].copy_from_slice(&version.to_be_bytes());
    p[11] = cipher as u8;
    p[12..].copy_from_slice(key);
    p
}

/// The short-id salt of a session: the start of its handshake hash, which
/// neither side chooses alone.
fn session_salt(channel: &Channel) -> [u8; 8] {
    let b = channel.binding();
    [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]
}

/// The largest handshake payload: a version and capability bits (varints).
const HANDSHAKE_PAYLOAD: usize = 8;
/// The largest Noise handshake message either side sends.
const HANDSHAKE_NOISE: usize = crate::channel::HANDSHAKE_OVERHEAD + HANDSHAKE_PAYLOAD;

// The handshake state is large only until the handshake ends, and devices
// have no allocator to box it.
#[allow(clippy::large_enum_variant)]
enum ClientState {
    SendHello([u8; 32]),
    AwaitAccept(Handshake),
    Done([u8; 8]),
    Failed,
}

/// The client side of the handshake; yields the session salt, and hands the
/// channel to the driver ([`Machine::take_channel`]).
pub struct ClientHandshake {
    key: ClientKey,
    cipher: CipherKind,
    state: ClientState,
    channel: Option<Channel>,
    deadline: Instant,
    caps: u32,
    peer_caps: u32,
    /// The version announced, then the one agreed on.
    version: u16,
}

impl ClientHandshake {
    /// A handshake with `key` over `cipher`; `ephemeral` is 32 fresh random
    /// bytes from the shell.
    pub fn new(key: ClientKey, cipher: CipherKind, ephemeral: [u8; 32], now: Instant) -> Self {
        ClientHandshake {
            key,
            cipher,
            state: ClientState::SendHello(ephemeral),
            channel: None,
            deadline: now.plus_ms(IDLE_TIMEOUT_MS),
            caps: CAPS,
            peer_caps: 0,
            version: PROTOCOL_VERSION,
        }
    }

    /// The protocol version of this session: the one announced until the
    /// server accepted, then the one both sides use.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Announces `version` rather than this build's newest, if older: the
    /// session then speaks at most that version (as an older peer would).
    pub fn at_most(mut self, version: u16) -> Self {
        self.version = self.version.min(version);
        self
    }

    /// Announces only those of this build's capabilities that are in `caps`
    /// (e.g. without [`crate::message::CAP_ZSTD`], the server sends
    /// downloads uncompressed).
    pub fn announcing(mut self, caps: u32) -> Self {
        self.caps = caps & CAPS;
        self
    }

    /// The capability bits both this client (as announced) and the server
    /// have (known once the server accepted).
    pub fn shared_caps(&self) -> u32 {
        self.caps & self.peer_caps
    }

    fn accept(&mut self, mut hs: Handshake, noise: &[u8]) -> Result<(), SessionError> {
        let mut payload = [0u8; HANDSHAKE_PAYLOAD];
        // Only the holder of the key's secret can answer: anything else is
        // a server with another key, or bytes changed on the way.
        let n = hs.read(noise, &mut payload).map_err(|_| SessionError::Protocol(ErrorCode::AuthFailed))?;
        let (version, caps) = postcard::from_bytes::<(u16, u32)>(&payload[..n])
            .map_err(|_| SessionError::Protocol(ErrorCode::BadMessage))?;
        // The server answers with the version both speak, never a newer one
        // than this client announced.
        if version > self.version {
            return Err(SessionError::Protocol(ErrorCode::VersionMismatch));
        }
        self.version = agree(self.version, version)?;
        self.peer_caps = caps;
        let mut channel = hs.finish().map_err(|_| SessionError::Protocol(ErrorCode::AuthFailed))?;
        channel.set_batched(self.shared_caps() & crate::message::CAP_BATCH != 0);
        self.state = ClientState::Done(session_salt(&channel));
        self.channel = Some(channel);
        Ok(())
    }
}

impl Machine for ClientHandshake {
    type Output = [u8; 8];

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        match (core::mem::replace(&mut self.state, ClientState::Failed), msg) {
            (ClientState::AwaitAccept(hs), Message::Accept { noise }) => self.accept(hs, noise),
            // A server before version 5 cannot parse this hello (its own
            // had another layout), and says so; a later one never does.
            (ClientState::AwaitAccept(_), Message::Error(ErrorCode::BadMessage)) => {
                Err(SessionError::Protocol(ErrorCode::VersionMismatch))
            }
            (_, m) => Err(machine::unexpected(&m)),
        }
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<[u8; 8]>, SessionError> {
        match &self.state {
            ClientState::SendHello(ephemeral) => {
                let ephemeral = *ephemeral;
                let (version, cipher, id) = (self.version, self.cipher, self.key.id);
                let mut hs = Handshake::new(
                    true,
                    cipher,
                    &prologue(version, cipher, &id),
                    &self.key.secret,
                    ephemeral,
                )
                .map_err(|_| SessionError::Protocol(ErrorCode::Unsupported))?;
                let mut payload = [0u8; HANDSHAKE_PAYLOAD];
                let p =
                    postcard::to_slice(&self.caps, &mut payload).map_err(|_| SessionError::Capacity)?.len();
                let mut noise = [0u8; HANDSHAKE_NOISE];
                let n = hs.write(&payload[..p], &mut noise).map_err(|_| SessionError::Capacity)?;
                self.state = ClientState::AwaitAccept(hs);
                machine::emit(&Message::Hello { version, cipher, key: id, noise: &noise[..n] }, out)
            }
            ClientState::Done(salt) => Ok(Poll::Done(*salt)),
            ClientState::AwaitAccept(_) => machine::wait_until(now, self.deadline),
            ClientState::Failed => Err(SessionError::Protocol(ErrorCode::UnexpectedMessage)),
        }
    }

    fn take_channel(&mut self) -> Option<Channel> {
        self.channel.take()
    }
}

/// Client operation: upload a version; the client is the sender.
pub struct Upload<'n, T, S> {
    name: &'n str,
    requested: bool,
    sender: Sender<T, S>,
    /// A conditional upload's expectation, and the session's version.
    expect: Option<(Expect, u16)>,
    /// The time and mode to publish with, and the session's version.
    meta: Option<(Meta, u16)>,
    replaced: bool,
    /// A sketch to send before the request (see [`Message::Sketch`]).
    sketch: Option<heapless::Vec<u64, { crate::message::SKETCH_LEN }>>,
}

impl<'n, T: TreeView, S: Source> Upload<'n, T, S> {
    /// Uploads the version `sender` holds as `name`.
    pub fn new(name: &'n str, sender: Sender<T, S>) -> Self {
        Upload { name, requested: false, sender, expect: None, meta: None, replaced: false, sketch: None }
    }

    /// Sends the version's sketch first (to a server that announced
    /// [`crate::message::CAP_SKETCH`]): it may find the data stored under
    /// another name.
    pub fn with_sketch(mut self, sketch: heapless::Vec<u64, { crate::message::SKETCH_LEN }>) -> Self {
        self.sketch = (!sketch.is_empty()).then_some(sketch);
        self
    }

    /// Publishes the version with `meta`'s time and mode (protocol 7;
    /// `version` is the session's).
    pub fn with_meta(mut self, meta: Meta, version: u16) -> Self {
        self.meta = Some((meta, version));
        self
    }

    /// Makes the upload conditional: published only if the stored version
    /// is as `expect` says, else it fails with `Peer(Conflict)`. `version`
    /// is the session's (conditional uploads need protocol 6).
    pub fn expecting(mut self, expect: Expect, version: u16) -> Self {
        self.expect = Some((expect, version));
        self
    }

    /// Whether the server said that the version stored when the upload
    /// began was replaced by someone else's meanwhile (see
    /// [`Message::Replaced`]).
    pub fn replaced(&self) -> bool {
        self.replaced
    }

    /// The underlying sender (for progress).
    pub fn sender(&self) -> &Sender<T, S> {
        &self.sender
    }

    /// The underlying sender, to give it a root it was offered without
    /// ([`Sender::set_root`]).
    pub fn sender_mut(&mut self) -> &mut Sender<T, S> {
        &mut self.sender
    }

    /// Whether the request (the offer) went out.
    pub fn requested(&self) -> bool {
        self.requested
    }

    /// The underlying sender, taken back (to offer its bytes again).
    pub fn into_sender(self) -> Sender<T, S> {
        self.sender
    }
}

impl<T: TreeView, S: Source> Machine for Upload<'_, T, S> {
    type Output = Outcome;

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        match msg {
            Message::Replaced if self.requested && !self.replaced => {
                self.replaced = true;
                Ok(())
            }
            m => self.sender.handle(now, m),
        }
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Outcome>, SessionError> {
        if !self.requested
            && let Some(sketch) = self.sketch.take()
        {
            let mut ids = [0u8; crate::message::SKETCH_LEN * 8];
            for (i, v) in sketch.iter().enumerate() {
                ids[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
            }
            return machine::emit(&Message::Sketch { ids: &ids[..sketch.len() * 8] }, out);
        }
        if !self.requested {
            self.requested = true;
            let (name, offer) = (self.name, self.sender.offer());
            let m = match (self.expect, self.meta) {
                (_, Some((_, version))) if version < 7 => {
                    return Err(SessionError::Peer(ErrorCode::Unsupported));
                }
                (expect, Some((meta, _))) => {
                    Message::UploadMeta { name, offer, expect: expect.map(|e| e.0), meta }
                }
                (None, None) => Message::Upload { name, offer },
                (Some((_, version)), None) if version < 6 => {
                    return Err(SessionError::Peer(ErrorCode::Unsupported));
                }
                (Some((expect, _)), None) => Message::UploadIf { name, offer, expect },
            };
            return machine::emit(&m, out);
        }
        self.sender.poll(now, out)
    }
}

/// What `Stat` reports about a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Length in bytes.
    pub size: u64,
    /// Last modification, seconds since the Unix epoch.
    pub modified: u64,
    /// SHA-256 of the contents.
    pub sha256: Hash,
    /// How the server's tree of the file is chunked.
    pub chunking: ChunkerKind,
}

/// An entry of a listing or a description, as a [`Query`] passes it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listed<'a> {
    /// A stored file.
    File(FileInfo<'a>),
    /// What an interrupted upload left (protocol 6).
    Partial(PartialInfo<'a>),
    /// An entry of a directory listing (protocol 7).
    Entry(Entry<'a>),
}

impl Listed<'_> {
    /// The name listed.
    pub fn name(&self) -> &str {
        match self {
            Listed::File(f) => f.name,
            Listed::Partial(p) => p.name,
            Listed::Entry(e) => e.name,
        }
    }
}

/// Which small request a [`Query`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryKind<'n> {
    /// List all files.
    List,
    /// List all files, then what interrupted uploads left (protocol 6).
    ListAll,
    /// Describe one file.
    Stat(&'n str),
    /// Delete one file (or, from protocol 7 on, an empty directory).
    Delete(&'n str),
    /// List one directory (protocol 7).
    ListDir(&'n str),
}

/// Client operation for the small requests: `List`, `ListAll`, `Stat`,
/// `Delete`. Listed or described entries are passed to `on_entry` as they
/// arrive.
pub struct Query<'n, F> {
    kind: QueryKind<'n>,
    version: u16,
    requested: bool,
    on_entry: F,
    /// A `Stat`'s file and whether a partial came, while its answer goes
    /// on (protocol 6).
    file: Option<Stat>,
    partial: bool,
    done: Option<Option<Stat>>,
    deadline: Instant,
}

impl<'n, F: FnMut(Listed<'_>)> Query<'n, F> {
    /// A query in a session of protocol `version`; `on_entry` sees each
    /// entry listed or described.
    pub fn new(kind: QueryKind<'n>, version: u16, on_entry: F, now: Instant) -> Self {
        Query {
            kind,
            version,
            requested: false,
            on_entry,
            file: None,
            partial: false,
            done: None,
            deadline: now.plus_ms(IDLE_TIMEOUT_MS),
        }
    }
}

impl<F: FnMut(Listed<'_>)> Machine for Query<'_, F> {
    /// For `Stat`, the file's description (`None` if only an interrupted
    /// upload of the name is stored).
    type Output = Option<Stat>;

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        if self.done.is_some() || !self.requested {
            return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage));
        }
        let stat = |i: FileInfo<'_>| Stat {
            size: i.size,
            modified: i.modified,
            sha256: i.sha256,
            chunking: i.chunking,
        };
        let v6 = self.version >= 6;
        match (self.kind, msg) {
            (QueryKind::List | QueryKind::ListAll, Message::Info(i)) => (self.on_entry)(Listed::File(i)),
            (QueryKind::ListAll, Message::Partial(p)) => (self.on_entry)(Listed::Partial(p)),
            (QueryKind::List | QueryKind::ListAll, Message::ListEnd) => self.done = Some(None),
            (QueryKind::ListDir(_), Message::Entry(e)) => (self.on_entry)(Listed::Entry(e)),
            (QueryKind::ListDir(_), Message::ListEnd) => self.done = Some(None),
            // Version 5: the file's `Info` is the whole answer.
            (QueryKind::Stat(_), Message::Info(i)) if !v6 => {
                (self.on_entry)(Listed::File(i));
                self.done = Some(Some(stat(i)));
            }
            // Version 6: at most one of each, about the name asked for.
            (QueryKind::Stat(n), Message::Info(i)) if self.file.is_none() && i.name == n => {
                (self.on_entry)(Listed::File(i));
                self.file = Some(stat(i));
            }
            (QueryKind::Stat(n), Message::Partial(p)) if v6 && !self.partial && p.name == n => {
                (self.on_entry)(Listed::Partial(p));
                self.partial = true;
            }
            (QueryKind::Stat(_), Message::ListEnd) if v6 => self.done = Some(self.file),
            (QueryKind::Delete(_), Message::Deleted) => self.done = Some(None),
            (_, m) => return Err(machine::unexpected(&m)),
        }
        Ok(())
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Option<Stat>>, SessionError> {
        if let Some(d) = self.done {
            return Ok(Poll::Done(d));
        }
        if !self.requested {
            self.requested = true;
            let m = match self.kind {
                QueryKind::List => Message::List,
                QueryKind::ListAll if self.version < 6 => {
                    return Err(SessionError::Peer(ErrorCode::Unsupported));
                }
                QueryKind::ListAll => Message::ListAll,
                QueryKind::ListDir(_) if self.version < 7 => {
                    return Err(SessionError::Peer(ErrorCode::Unsupported));
                }
                QueryKind::ListDir(dir) => Message::ListDir { dir },
                QueryKind::Stat(name) => Message::Stat { name },
                QueryKind::Delete(name) => Message::Delete { name },
            };
            return machine::emit(&m, out);
        }
        machine::wait_until(now, self.deadline)
    }
}

#[cfg(feature = "alloc")]
pub use download::Download;

#[cfg(feature = "alloc")]
mod download {
    use super::*;
    use crate::receiver::{Base, ReceiveStats, Receiver};
    use crate::source::Output;
    use crate::tree::{Summary, Tree};
    use alloc::boxed::Box;

    enum State<T, R, W> {
        Request(Option<Base<T, R>>, W),
        AwaitOffer(Option<Base<T, R>>, W),
        Receiving(Box<Receiver<T, R, W>>),
        Telling(Outcome),
        Done(Outcome),
        Poisoned,
    }

    /// Client operation: download a version; the client is the receiver.
    pub struct Download<'n, T, R, W> {
        name: &'n str,
        salt: [u8; 8],
        state: State<T, R, W>,
        result: Option<(W, Option<Tree>)>,
        stats: ReceiveStats,
        offer: Option<Summary>,
        deadline: Instant,
        deltas: bool,
        fine: bool,
    }

    impl<'n, T: TreeView, R: Source, W: Output> Download<'n, T, R, W> {
        /// Downloads `name` into `out`, reusing `base` (the local copy) if any.
        pub fn new(name: &'n str, salt: [u8; 8], base: Option<Base<T, R>>, out: W, now: Instant) -> Self {
            Download {
                name,
                salt,
                state: State::Request(base, out),
                result: None,
                stats: ReceiveStats::default(),
                offer: None,
                deadline: now.plus_ms(IDLE_TIMEOUT_MS),
                deltas: false,
                fine: false,
            }
        }

        /// Asks for deltas within chunks (see [`Receiver::deltas`]); set
        /// only if the server announced [`crate::message::CAP_DELTA`].
        pub fn deltas(mut self, on: bool) -> Self {
            self.deltas = on;
            self
        }

        /// With deltas, also compares changed pieces by their fine pieces
        /// (see [`Receiver::fine`]); set only if the server announced
        /// [`crate::message::CAP_FINE`].
        pub fn fine(mut self, on: bool) -> Self {
            self.fine = on;
            self
        }

        /// The server's offer, once received.
        pub fn offer(&self) -> Option<&Summary> {
            self.offer.as_ref()
        }

        /// Counters of the receiving side.
        pub fn stats(&self) -> ReceiveStats {
            match &self.state {
                State::Receiving(r) => r.stats(),
                _ => self.stats,
            }
        }

        /// Bytes of the new version assembled so far.
        pub fn progress(&self) -> u64 {
            match &self.state {
                State::Receiving(r) => r.progress(),
                _ => 0,
            }
        }

        /// After completion: the output and, if written, the new tree.
        pub fn take_result(&mut self) -> Option<(W, Option<Tree>)> {
            self.result.take()
        }
    }

    impl<T: TreeView, R: Source, W: Output> Machine for Download<'_, T, R, W> {
        type Output = Outcome;

        fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
            self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
            match (&mut self.state, msg) {
                (State::AwaitOffer(..), Message::Offer(offer))
                    if !offer.file_hash.is_known() || !offer.root.is_known() =>
                {
                    // Only an uploader may leave the hash or the root to its
                    // peer; a server always knows those of what it serves.
                    Err(SessionError::Protocol(ErrorCode::BadMessage))
                }
                (State::AwaitOffer(..), Message::Offer(offer)) => {
                    let State::AwaitOffer(base, out) = core::mem::replace(&mut self.state, State::Poisoned)
                    else {
                        unreachable!("matched above")
                    };
                    self.offer = Some(offer);
                    self.state = State::Receiving(Box::new(
                        Receiver::new(offer, self.salt, base, out, now)?.deltas(self.deltas).fine(self.fine),
                    ));
                    Ok(())
                }
                (State::Receiving(r), m) => r.handle(now, m),
                (_, m) => Err(machine::unexpected(&m)),
            }
        }

        fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Outcome>, SessionError> {
            match &mut self.state {
                State::Request(..) => {
                    let State::Request(base, w) = core::mem::replace(&mut self.state, State::Poisoned) else {
                        unreachable!("matched above")
                    };
                    self.state = State::AwaitOffer(base, w);
                    machine::emit(&Message::Download { name: self.name }, out)
                }
                State::AwaitOffer(..) => machine::wait_until(now, self.deadline),
                State::Receiving(r) => match r.poll(now, out)? {
                    Poll::Done(o) => {
                        let State::Receiving(r) = core::mem::replace(&mut self.state, State::Telling(o))
                        else {
                            unreachable!("matched above")
                        };
                        self.stats = r.stats();
                        self.result = Some(r.into_parts());
                        self.poll(now, out)
                    }
                    p => Ok(p),
                },
                State::Telling(o) => {
                    let o = *o;
                    self.state = State::Done(o);
                    machine::emit(&Message::Done { outcome: o, file_hash: None }, out)
                }
                State::Done(o) => Ok(Poll::Done(*o)),
                State::Poisoned => Err(SessionError::Capacity),
            }
        }
    }
}

#[cfg(feature = "alloc")]
pub mod batch;
#[cfg(feature = "alloc")]
pub mod fetch;
#[cfg(feature = "alloc")]
pub mod put;
#[cfg(feature = "alloc")]
pub mod server;
pub mod session;
