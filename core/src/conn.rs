//! Connections: the handshake on both sides, the client's operations, and
//! (with `alloc`) the server's request loop over a [`server::Store`].
//!
//! Message flow (client `C`, server `S`):
//! ```text
//! C: Hello{version, caps, nonce_c}
//! S: Challenge{version, caps, nonce_s, proof_s}      C checks proof_s
//! C: Auth{proof_c}                                   S checks proof_c
//! S: Welcome                  (or Error(AuthFailed) and close)
//! then any number of requests:
//! C: List                     S: Info* ListEnd
//! C: Stat{name}               S: Info | Error
//! C: Delete{name}             S: Deleted | Error
//! C: Upload{name, offer}      C is the sender, S the receiver:
//!                             S: GetChildren/GetData*  C: Entries/Data*
//!                             S: Done(outcome, hash?) | Error
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

use crate::auth::{self, Role};
use crate::chunker::ChunkerKind;
use crate::error::{ErrorCode, SessionError};
use crate::hash::Hash;
use crate::machine::{self, Machine, Poll};
use crate::message::{CAPS, FileInfo, Message, Outcome};
use crate::sender::Sender;
use crate::source::Source;
use crate::time::{IDLE_TIMEOUT_MS, Instant};
use crate::tree::TreeView;
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    SendHello,
    AwaitChallenge,
    SendAuth([u8; 32], [u8; 8]),
    AwaitWelcome([u8; 8]),
    Done([u8; 8]),
}

/// The client side of the handshake; yields the session salt.
pub struct ClientHandshake<K> {
    token: K,
    nonce: [u8; 32],
    state: ClientState,
    deadline: Instant,
    caps: u32,
    peer_caps: u32,
    /// The version announced, then the one agreed on.
    version: u16,
}

/// The version two peers use: the older of the newest each speaks, if this
/// side still speaks it.
fn agree(mine: u16, theirs: u16) -> Result<u16, SessionError> {
    let v = mine.min(theirs);
    if v < MIN_PROTOCOL_VERSION {
        return Err(SessionError::Protocol(ErrorCode::VersionMismatch));
    }
    Ok(v)
}

/// `v` within the versions this crate speaks.
fn clamp_version(v: u16) -> u16 {
    v.clamp(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
}

impl<K: AsRef<[u8]>> ClientHandshake<K> {
    /// A handshake proving `token`, with a fresh random `nonce` from the shell.
    pub fn new(token: K, nonce: [u8; 32], now: Instant) -> Self {
        ClientHandshake {
            token,
            nonce,
            state: ClientState::SendHello,
            deadline: now.plus_ms(IDLE_TIMEOUT_MS),
            caps: CAPS,
            peer_caps: 0,
            version: PROTOCOL_VERSION,
        }
    }

    /// Announces `version` as the newest it speaks (within
    /// [`MIN_PROTOCOL_VERSION`]`..=`[`PROTOCOL_VERSION`]): to reach a server
    /// too old to answer a newer hello with its own version (a version 3
    /// server refuses any other), or to test how this build behaves as an
    /// older one.
    pub fn speaking(mut self, version: u16) -> Self {
        self.version = clamp_version(version);
        self
    }

    /// The protocol version of this session: the one announced until the
    /// server's challenge arrives, then the one both sides use. Features of
    /// a later version (such as offers without a root, version 4) are used
    /// only if it is at least that version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Announces only those of this build's capabilities that are in `caps`
    /// (e.g. without [`crate::message::CAP_ZSTD`], the server sends
    /// downloads uncompressed).
    pub fn announcing(mut self, caps: u32) -> Self {
        self.caps = caps & CAPS;
        self
    }

    /// The capability bits both this client (as announced) and the server
    /// have (known once the server's challenge arrived).
    pub fn shared_caps(&self) -> u32 {
        self.caps & self.peer_caps
    }
}

impl<K: AsRef<[u8]>> Machine for ClientHandshake<K> {
    type Output = [u8; 8];

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        match (self.state, msg) {
            (ClientState::AwaitChallenge, Message::Challenge { version, caps, nonce, proof }) => {
                // The server answers with the version both speak, never a
                // newer one than this client announced.
                if version > self.version {
                    return Err(SessionError::Protocol(ErrorCode::VersionMismatch));
                }
                let agreed = agree(self.version, version)?;
                self.peer_caps = caps;
                let token = self.token.as_ref();
                if !auth::verify(token, Role::Server, &self.nonce, &nonce, &proof) {
                    return Err(SessionError::Protocol(ErrorCode::AuthFailed));
                }
                let mine = auth::prove(token, Role::Client, &self.nonce, &nonce);
                self.version = agreed;
                self.state = ClientState::SendAuth(mine, auth::session_salt(&self.nonce, &nonce));
                Ok(())
            }
            (ClientState::AwaitWelcome(salt), Message::Welcome) => {
                self.state = ClientState::Done(salt);
                Ok(())
            }
            (_, Message::Error(c)) => Err(SessionError::Peer(c)),
            _ => Err(SessionError::Protocol(ErrorCode::UnexpectedMessage)),
        }
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<[u8; 8]>, SessionError> {
        match self.state {
            ClientState::SendHello => {
                self.state = ClientState::AwaitChallenge;
                machine::emit(
                    &Message::Hello { version: self.version, caps: self.caps, nonce: self.nonce },
                    out,
                )
            }
            ClientState::SendAuth(proof, salt) => {
                self.state = ClientState::AwaitWelcome(salt);
                machine::emit(&Message::Auth { proof }, out)
            }
            ClientState::Done(salt) => Ok(Poll::Done(salt)),
            _ => machine::wait_until(now, self.deadline),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerState {
    AwaitHello,
    SendChallenge([u8; 32]),
    AwaitAuth([u8; 32]),
    SendWelcome([u8; 8]),
    Done([u8; 8]),
}

/// The server side of the handshake; yields the session salt.
pub struct ServerHandshake<K> {
    token: K,
    nonce: [u8; 32],
    state: ServerState,
    deadline: Instant,
    peer_caps: u32,
    /// The version announced, then the one agreed on.
    version: u16,
}

impl<K: AsRef<[u8]>> ServerHandshake<K> {
    /// A handshake checking `token`, with a fresh random `nonce` from the shell.
    pub fn new(token: K, nonce: [u8; 32], now: Instant) -> Self {
        ServerHandshake {
            token,
            nonce,
            state: ServerState::AwaitHello,
            deadline: now.plus_ms(IDLE_TIMEOUT_MS),
            peer_caps: 0,
            version: PROTOCOL_VERSION,
        }
    }

    /// Speaks at most `version` (within
    /// [`MIN_PROTOCOL_VERSION`]`..=`[`PROTOCOL_VERSION`]), as a server of
    /// that version would.
    pub fn speaking(mut self, version: u16) -> Self {
        self.version = clamp_version(version);
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
        CAPS & self.peer_caps
    }
}

impl<K: AsRef<[u8]>> Machine for ServerHandshake<K> {
    type Output = [u8; 8];

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        match (self.state, msg) {
            (ServerState::AwaitHello, Message::Hello { version, caps, nonce }) => {
                self.version = agree(self.version, version)?;
                self.peer_caps = caps;
                self.state = ServerState::SendChallenge(nonce);
                Ok(())
            }
            (ServerState::AwaitAuth(client_nonce), Message::Auth { proof }) => {
                if !auth::verify(self.token.as_ref(), Role::Client, &client_nonce, &self.nonce, &proof) {
                    return Err(SessionError::Protocol(ErrorCode::AuthFailed));
                }
                self.state = ServerState::SendWelcome(auth::session_salt(&client_nonce, &self.nonce));
                Ok(())
            }
            (_, Message::Error(c)) => Err(SessionError::Peer(c)),
            _ => Err(SessionError::Protocol(ErrorCode::UnexpectedMessage)),
        }
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<[u8; 8]>, SessionError> {
        match self.state {
            ServerState::SendChallenge(client_nonce) => {
                self.state = ServerState::AwaitAuth(client_nonce);
                let proof = auth::prove(self.token.as_ref(), Role::Server, &client_nonce, &self.nonce);
                let m = Message::Challenge { version: self.version, caps: CAPS, nonce: self.nonce, proof };
                machine::emit(&m, out)
            }
            ServerState::SendWelcome(salt) => {
                self.state = ServerState::Done(salt);
                machine::emit(&Message::Welcome, out)
            }
            ServerState::Done(salt) => Ok(Poll::Done(salt)),
            _ => machine::wait_until(now, self.deadline),
        }
    }
}

/// Client operation: upload a version; the client is the sender.
pub struct Upload<'n, T, S> {
    name: &'n str,
    requested: bool,
    sender: Sender<T, S>,
}

impl<'n, T: TreeView, S: Source> Upload<'n, T, S> {
    /// Uploads the version `sender` holds as `name`.
    pub fn new(name: &'n str, sender: Sender<T, S>) -> Self {
        Upload { name, requested: false, sender }
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
}

impl<T: TreeView, S: Source> Machine for Upload<'_, T, S> {
    type Output = Outcome;

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.sender.handle(now, msg)
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Outcome>, SessionError> {
        if !self.requested {
            self.requested = true;
            return machine::emit(&Message::Upload { name: self.name, offer: self.sender.offer() }, out);
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

/// Which small request a [`Query`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryKind<'n> {
    /// List all files.
    List,
    /// Describe one file.
    Stat(&'n str),
    /// Delete one file.
    Delete(&'n str),
}

/// Client operation for the small requests: `List`, `Stat`, `Delete`.
/// Listed or described files are passed to `on_info` as they arrive.
pub struct Query<'n, F> {
    kind: QueryKind<'n>,
    requested: bool,
    on_info: F,
    done: Option<Option<Stat>>,
    deadline: Instant,
}

impl<'n, F: FnMut(FileInfo<'_>)> Query<'n, F> {
    /// A query; `on_info` sees each file described.
    pub fn new(kind: QueryKind<'n>, on_info: F, now: Instant) -> Self {
        Query { kind, requested: false, on_info, done: None, deadline: now.plus_ms(IDLE_TIMEOUT_MS) }
    }
}

impl<F: FnMut(FileInfo<'_>)> Machine for Query<'_, F> {
    /// For `Stat`, the file's description.
    type Output = Option<Stat>;

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        if self.done.is_some() || !self.requested {
            return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage));
        }
        match (self.kind, msg) {
            (QueryKind::List, Message::Info(i)) => (self.on_info)(i),
            (QueryKind::List, Message::ListEnd) => self.done = Some(None),
            (QueryKind::Stat(_), Message::Info(i)) => {
                (self.on_info)(i);
                self.done = Some(Some(Stat {
                    size: i.size,
                    modified: i.modified,
                    sha256: i.sha256,
                    chunking: i.chunking,
                }));
            }
            (QueryKind::Delete(_), Message::Deleted) => self.done = Some(None),
            (_, Message::Error(c)) => return Err(SessionError::Peer(c)),
            _ => return Err(SessionError::Protocol(ErrorCode::UnexpectedMessage)),
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
            }
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
                    self.state = State::Receiving(Box::new(Receiver::new(offer, self.salt, base, out, now)?));
                    Ok(())
                }
                (State::Receiving(r), m) => r.handle(now, m),
                (_, Message::Error(c)) => Err(SessionError::Peer(c)),
                _ => Err(SessionError::Protocol(ErrorCode::UnexpectedMessage)),
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
pub mod server;
