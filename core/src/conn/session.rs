//! The policy of a client's upload, as one state machine that takes
//! commands from its shell beside the server's messages: which offer to
//! make, when to stream, how to fall back. Shells (the CLI, the GUI, a
//! device) move bytes and build trees when asked, nothing more.
//!
//! ```text
//! C: Stat{name}                      S: Info? Partial? ListEnd | Error(NotFound)
//! the shell is asked for the tree, chunked as the server's version is (if
//! that suits the size) or as `ChunkerKind::for_size` picks;
//! nothing stored, a shell that can stream, a file not empty:
//!   C: Upload{offer without root}    bytes go out while the shell builds
//!                                    the tree; its root follows in `Root`
//!   S: Error(NeedTree)               (the server holds an interrupted
//!                                    upload of the name to reuse)
//!   C: Upload{offer with the tree}   once the shell gave it
//! otherwise, once the shell gave the tree:
//!   C: Upload{offer with the tree}   a delta
//!   (nothing, if `Info` gave the tree's size and SHA-256: unchanged)
//! ```
//! A conditional upload sends `UploadIf` in place of each `Upload`.

use super::{Listed, Query, QueryKind, Upload};
use crate::chunker::ChunkerKind;
use crate::error::{ErrorCode, SessionError};
use crate::hash::Hash;
use crate::machine::{self, Machine, Poll};
use crate::message::{Expect, Message, Meta, Outcome};
use crate::sender::Sender;
use crate::source::Source;
use crate::time::Instant;
use crate::tree::{Summary, TreeView};

/// What an [`UploadSession`] asks of its shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Build the file's tree chunked as `kind` and give it with
    /// [`UploadSession::tree_ready`]. With `streaming`, the file's bytes go
    /// out meanwhile: give its root with [`UploadSession::root_ready`] as
    /// soon as it is known, then the tree (the server may still ask for a
    /// delta).
    Tree {
        /// How to chunk the file.
        kind: ChunkerKind,
        /// Whether the upload streams while the tree is built.
        streaming: bool,
    },
}

type StatQuery<'n> = Query<'n, fn(Listed<'_>)>;

// Devices have no allocator to box the sender with; the state lives as
// long as the upload.
#[allow(clippy::large_enum_variant)]
enum State<'n, T, S> {
    /// Asking how the server's version is chunked.
    Stat(StatQuery<'n>),
    /// Waiting for the shell's tree: nothing to send or to wait for on the
    /// wire meanwhile.
    AwaitTree,
    /// Offering the file; `streamed` while it goes out without its tree.
    Sending {
        op: Upload<'n, Option<T>, S>,
        streamed: bool,
    },
    Done(Outcome),
    Poisoned,
}

/// A client's upload of one file, from the `Stat` that chooses its offer to
/// the server's `Done`. Drive it like any [`Machine`]; after each step,
/// answer [`UploadSession::need`] (build the tree it names), and give what
/// it asked for with [`UploadSession::root_ready`] and
/// [`UploadSession::tree_ready`] when it is done.
pub struct UploadSession<'n, T, S> {
    name: &'n str,
    size: u64,
    salt: [u8; 8],
    version: u16,
    expect: Option<Expect>,
    meta: Option<Meta>,
    stream: bool,
    compress: bool,
    /// Whether the server takes sketches, and whether it holds the name.
    sketches: bool,
    remote: bool,
    /// The size and SHA-256 of the stored version, as `Stat` told.
    stored: Option<(u64, Hash)>,
    kind: ChunkerKind,
    state: State<'n, T, S>,
    /// The file's bytes, until a sender holds them.
    source: Option<S>,
    need: Option<Need>,
    /// A tree the shell gave, until an offer needs it.
    tree: Option<(T, Summary)>,
    /// A root the shell gave before the streamed offer could take it.
    root: Option<(Hash, u8)>,
    literal: u64,
    reported: Option<Hash>,
    replaced: bool,
    /// The time of the latest step (commands from the shell take it).
    clock: Instant,
}

fn ignore(_: Listed<'_>) {}

type Sketch = heapless::Vec<u64, { crate::message::SKETCH_LEN }>;

impl<'n, T: TreeView, S: Source> UploadSession<'n, T, S> {
    /// Uploads the `size` bytes `source` reads as `name`, in a session of
    /// protocol `version` whose salt is `salt`.
    pub fn new(name: &'n str, size: u64, source: S, salt: [u8; 8], version: u16, now: Instant) -> Self {
        UploadSession {
            name,
            size,
            salt,
            version,
            expect: None,
            meta: None,
            stream: false,
            compress: false,
            sketches: false,
            remote: false,
            stored: None,
            kind: ChunkerKind::for_size(size),
            state: State::Stat(Query::new(QueryKind::Stat(name), version, ignore as fn(Listed<'_>), now)),
            source: Some(source),
            need: None,
            tree: None,
            root: None,
            literal: 0,
            reported: None,
            replaced: false,
            clock: now,
        }
    }

    /// Offers the file chunked as `kind` without asking the server first:
    /// for a shell that alone writes this name and always chunks it so (a
    /// device's log), it saves the `Stat` round trip. Never streams.
    pub fn chunked_as(mut self, kind: ChunkerKind) -> Self {
        self.kind = kind;
        self.need = Some(Need::Tree { kind, streaming: false });
        self.state = State::AwaitTree;
        self
    }

    /// Skips the `Stat`: a tree sync's listing said how the server's
    /// version is chunked (`None`: the server has none). Call after
    /// [`Self::streaming`].
    pub fn listed(mut self, remote: Option<ChunkerKind>) -> Self {
        let now = self.clock;
        self.chose(remote, now);
        self
    }

    /// Publishes the version with `meta`'s time and mode (protocol 7).
    pub fn with_meta(mut self, meta: Option<Meta>) -> Self {
        self.meta = meta;
        self
    }

    /// Publishes only if the stored version is as `expect` says (see
    /// [`Upload::expecting`]).
    pub fn expecting(mut self, expect: Option<Expect>) -> Self {
        self.expect = expect;
        self
    }

    /// Lets a first upload stream while the shell builds its tree in the
    /// background (a shell with threads), rather than wait for the tree.
    pub fn streaming(mut self, on: bool) -> Self {
        self.stream = on;
        self
    }

    /// Compresses the bytes sent (only if the server announced it can read
    /// them so).
    pub fn compress(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// Sends the sketch of a new name's version with its offer (only if
    /// the server announced [`crate::message::CAP_SKETCH`]): the server
    /// may find its data stored under another name.
    pub fn sketches(mut self, on: bool) -> Self {
        self.sketches = on;
        self
    }

    /// What the shell is asked to do, once (see [`Need`]).
    pub fn need(&mut self) -> Option<Need> {
        self.need.take()
    }

    /// How the file is to be chunked (known once the server answered the
    /// `Stat`; until then the kind its size suggests).
    pub fn kind(&self) -> ChunkerKind {
        self.kind
    }

    /// Gives the root of the tree being built for a streamed offer. It
    /// follows the offer in `Root` (never inside it: an offer with a root
    /// must have its tree behind it).
    pub fn root_ready(&mut self, root: Hash, height: u8) {
        match &mut self.state {
            State::Sending { op, streamed: true } if op.requested() => op.sender_mut().set_root(root, height),
            _ => self.root = Some((root, height)),
        }
    }

    /// Gives the tree asked for (chunked as [`Need::Tree`] said; `summary`
    /// its summary, the whole-file hash possibly unknown).
    pub fn tree_ready(&mut self, tree: T, summary: Summary) {
        self.root_ready(summary.root, summary.height);
        self.tree = Some((tree, summary));
        match &self.state {
            State::AwaitTree => self.offer_tree(self.clock),
            // Before the streamed offer went out: the tree is offered instead.
            State::Sending { op, streamed: true } if !op.requested() => {
                let State::Sending { op, .. } = core::mem::replace(&mut self.state, State::AwaitTree) else {
                    return;
                };
                self.source = Some(op.into_sender().into_source());
                self.offer_tree(self.clock);
            }
            _ => {}
        }
    }

    /// File bytes sent so far.
    pub fn literal_bytes(&self) -> u64 {
        match &self.state {
            State::Sending { op, .. } => self.literal + op.sender().literal_bytes(),
            _ => self.literal,
        }
    }

    /// The whole-file SHA-256 the server reported, once done.
    pub fn reported_hash(&self) -> Option<Hash> {
        self.reported
    }

    /// Whether the server said its version changed while this upload ran
    /// (see [`Message::Replaced`]).
    pub fn replaced(&self) -> bool {
        self.replaced
    }

    /// Whether the offer is a streamed one still waiting for its root.
    pub fn awaiting_root(&self) -> bool {
        matches!(&self.state, State::Sending { op, streamed: true } if op.sender().awaiting_root())
    }

    fn upload(&self, sender: Sender<Option<T>, S>, sketch: Option<Sketch>) -> Upload<'n, Option<T>, S> {
        let mut op = Upload::new(self.name, sender.compress(self.compress));
        if let Some(sk) = sketch {
            op = op.with_sketch(sk);
        }
        if let Some(e) = self.expect {
            op = op.expecting(e, self.version);
        }
        if let Some(m) = self.meta {
            op = op.with_meta(m, self.version);
        }
        op
    }

    /// The server's chunking is known (`remote`): ask for the tree, and
    /// stream meanwhile if nothing is there to reuse.
    fn chose(&mut self, remote: Option<ChunkerKind>, now: Instant) {
        self.kind = ChunkerKind::keep_or_choose(remote, self.size);
        self.remote = remote.is_some();
        // A server that takes sketches holds some: a large new file's tree
        // comes first, with its sketch (its data may be stored already).
        let sketched = self.sketches && self.size >= crate::message::SKETCH_MIN;
        let streaming = self.stream && remote.is_none() && self.size > 0 && !sketched;
        self.need = Some(Need::Tree { kind: self.kind, streaming });
        if !streaming {
            self.state = State::AwaitTree;
            return;
        }
        let Some(source) = self.source.take() else {
            self.state = State::Poisoned;
            return;
        };
        let offer = Summary {
            size: self.size,
            root: Hash::UNKNOWN,
            height: 0,
            file_hash: Hash::UNKNOWN,
            chunking: self.kind,
        };
        let sender = Sender::new(None, source, offer, self.salt, now);
        self.state = State::Sending { op: self.upload(sender, None), streamed: true };
    }

    /// Offers the file with its tree.
    fn offer_tree(&mut self, now: Instant) {
        let (Some((tree, summary)), Some(source)) = (self.tree.take(), self.source.take()) else {
            self.state = State::Poisoned;
            return;
        };
        // The server holds this version already (as `Stat` said): nothing
        // to offer, unless it is to be published with a time and mode, or
        // only over a version named.
        if self.expect.is_none()
            && self.meta.is_none()
            && summary.file_hash.is_known()
            && self.stored == Some((summary.size, summary.file_hash))
        {
            self.reported = Some(summary.file_hash);
            self.state = State::Done(Outcome::Unchanged);
            return;
        }
        // A new name's data may be stored under another: say what it is.
        let wanted = self.sketches && !self.remote && self.size >= crate::message::SKETCH_MIN;
        let sketch = wanted.then(|| crate::tree::sketch(&tree));
        let sender = Sender::new(Some(tree), source, summary, self.salt, now);
        self.state = State::Sending { op: self.upload(sender, sketch), streamed: false };
    }

    /// The server wants the tree of a streamed offer: offer it when given.
    fn fall_back(&mut self, now: Instant) {
        let State::Sending { op, .. } = core::mem::replace(&mut self.state, State::AwaitTree) else {
            return;
        };
        let sender = op.into_sender();
        self.literal += sender.literal_bytes();
        self.source = Some(sender.into_source());
        if self.tree.is_some() {
            self.offer_tree(now);
        }
    }
}

impl<T: TreeView, S: Source> Machine for UploadSession<'_, T, S> {
    type Output = Outcome;

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.clock = now;
        match &mut self.state {
            State::Stat(q) => match q.handle(now, msg) {
                Err(SessionError::Peer(ErrorCode::NotFound)) => {
                    self.chose(None, now);
                    Ok(())
                }
                r => r,
            },
            State::Sending { streamed: true, .. } if msg == Message::Error(ErrorCode::NeedTree) => {
                self.fall_back(now);
                Ok(())
            }
            State::Sending { op, .. } => op.handle(now, msg),
            // The server may have given up meanwhile (its idle timeout).
            _ => Err(machine::unexpected(&msg)),
        }
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Outcome>, SessionError> {
        self.clock = now;
        loop {
            match &mut self.state {
                State::Stat(q) => match q.poll(now, out)? {
                    Poll::Done(stat) => {
                        self.stored = stat.map(|s| (s.size, s.sha256));
                        self.chose(stat.map(|s| s.chunking), now)
                    }
                    Poll::Transmit(n) => return Ok(Poll::Transmit(n)),
                    Poll::Wait(t) => return Ok(Poll::Wait(t)),
                },
                // Local work: no deadline on the wire (the shell's tree may
                // take long on a large file, as it always did).
                State::AwaitTree => return Ok(Poll::Wait(Instant(u64::MAX))),
                State::Sending { op, streamed } => match op.poll(now, out)? {
                    // A root given before the offer went out follows it.
                    Poll::Transmit(n) if *streamed && self.root.is_some() => {
                        if let Some((root, height)) = self.root.take() {
                            op.sender_mut().set_root(root, height);
                        }
                        return Ok(Poll::Transmit(n));
                    }
                    Poll::Done(outcome) => {
                        self.literal += op.sender().literal_bytes();
                        // A server tells the hash only when the offer
                        // left it unknown. Else it is the offer's, which
                        // the server checked before it published; for a
                        // version it held already, only if `Stat` told
                        // the same (the offer's is a claim it did not
                        // check: the shell hashes the file).
                        let offer = op.sender().summary();
                        let offered = (offer.file_hash.is_known()).then_some(offer.file_hash);
                        let told = self.stored == offered.map(|h| (offer.size, h));
                        self.reported = op.sender().reported_hash().or(match outcome {
                            Outcome::Written => offered,
                            Outcome::Unchanged if told => offered,
                            _ => None,
                        });
                        self.replaced = op.replaced();
                        self.state = State::Done(outcome);
                    }
                    p => return Ok(p),
                },
                State::Done(o) => return Ok(Poll::Done(*o)),
                State::Poisoned => return Err(SessionError::Capacity),
            }
        }
    }
}

#[cfg(feature = "alloc")]
pub use download::DownloadSession;

#[cfg(feature = "alloc")]
mod download {
    use super::*;
    use crate::conn::Download;
    use crate::receiver::{Base, ReceiveStats};
    use crate::source::Output;
    use crate::tree::Tree;

    enum DState<'n, T, R, W> {
        /// Asking how the server's tree is chunked, to chunk the local
        /// copy the same way.
        Stat(StatQuery<'n>, W, R),
        /// Waiting for the local copy's tree.
        AwaitTree(W, R),
        Receiving(Download<'n, T, R, W>),
        Poisoned,
    }

    /// A client's download of one file, reusing the shell's local copy if
    /// it has one: `Stat` (how the server chunks the file), the copy's tree
    /// from the shell ([`Need::Tree`]), then the download as a delta against
    /// it. Without a local copy the download starts at once.
    pub struct DownloadSession<'n, T, R, W> {
        name: &'n str,
        salt: [u8; 8],
        state: DState<'n, T, R, W>,
        need: Option<Need>,
        /// A tree given before it was asked for.
        tree: Option<T>,
        clock: Instant,
        deltas: bool,
        fine: bool,
    }

    impl<'n, T: TreeView, R: Source, W: Output> DownloadSession<'n, T, R, W> {
        /// Downloads `name` into `out` in a session of protocol `version`
        /// whose salt is `salt`; `local` reads the shell's current copy, if
        /// any (its tree is asked for once the server's chunking is known).
        pub fn new(
            name: &'n str,
            out: W,
            local: Option<R>,
            salt: [u8; 8],
            version: u16,
            now: Instant,
        ) -> Self {
            let state = match local {
                Some(local) => {
                    let stat = Query::new(QueryKind::Stat(name), version, ignore as fn(Listed<'_>), now);
                    DState::Stat(stat, out, local)
                }
                None => DState::Receiving(Download::new(name, salt, None, out, now)),
            };
            DownloadSession {
                name,
                salt,
                state,
                need: None,
                tree: None,
                clock: now,
                deltas: false,
                fine: false,
            }
        }

        /// Asks for deltas within chunks (see
        /// [`crate::receiver::Receiver::deltas`]); set only if the server
        /// announced [`crate::message::CAP_DELTA`].
        pub fn deltas(mut self, on: bool) -> Self {
            self.deltas = on;
            self.state = match core::mem::replace(&mut self.state, DState::Poisoned) {
                DState::Receiving(d) => DState::Receiving(d.deltas(on)),
                s => s,
            };
            self
        }

        /// With deltas, also compares changed pieces by their fine pieces
        /// (see [`crate::receiver::Receiver::fine`]); set only if the
        /// server announced [`crate::message::CAP_FINE`].
        pub fn fine(mut self, on: bool) -> Self {
            self.fine = on;
            self.state = match core::mem::replace(&mut self.state, DState::Poisoned) {
                DState::Receiving(d) => DState::Receiving(d.fine(on)),
                s => s,
            };
            self
        }

        /// Skips the `Stat`: a tree sync's listing said how the server's
        /// version is chunked.
        pub fn listed(mut self, kind: ChunkerKind) -> Self {
            self.state = match core::mem::replace(&mut self.state, DState::Poisoned) {
                DState::Stat(_, w, r) => {
                    self.need = Some(Need::Tree { kind, streaming: false });
                    DState::AwaitTree(w, r)
                }
                s => s,
            };
            self
        }

        /// What the shell is asked to do, once (see [`Need`]).
        pub fn need(&mut self) -> Option<Need> {
            self.need.take()
        }

        /// Gives the local copy's tree, chunked as asked.
        pub fn tree_ready(&mut self, tree: T) {
            self.tree = Some(tree);
            self.start();
        }

        /// Starts the download once the copy's tree is there.
        fn start(&mut self) {
            if matches!(self.state, DState::AwaitTree(..))
                && let Some(tree) = self.tree.take()
                && let DState::AwaitTree(out, local) = core::mem::replace(&mut self.state, DState::Poisoned)
            {
                let base = Base { tree, source: local };
                let d = Download::new(self.name, self.salt, Some(base), out, self.clock)
                    .deltas(self.deltas)
                    .fine(self.fine);
                self.state = DState::Receiving(d);
            }
        }

        fn download(&self) -> Option<&Download<'n, T, R, W>> {
            match &self.state {
                DState::Receiving(d) => Some(d),
                _ => None,
            }
        }

        /// The server's offer, once received.
        pub fn offer(&self) -> Option<&Summary> {
            self.download()?.offer()
        }

        /// Counters of the receiving side.
        pub fn stats(&self) -> ReceiveStats {
            self.download().map(|d| d.stats()).unwrap_or_default()
        }

        /// Bytes of the new version assembled so far.
        pub fn progress(&self) -> u64 {
            self.download().map_or(0, |d| d.progress())
        }

        /// After completion: the output and, if written, the new tree.
        pub fn take_result(&mut self) -> Option<(W, Option<Tree>)> {
            match &mut self.state {
                DState::Receiving(d) => d.take_result(),
                _ => None,
            }
        }
    }

    impl<T: TreeView, R: Source, W: Output> Machine for DownloadSession<'_, T, R, W> {
        type Output = Outcome;

        fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
            self.clock = now;
            match &mut self.state {
                DState::Stat(q, ..) => q.handle(now, msg),
                DState::Receiving(d) => d.handle(now, msg),
                // The server may have given up meanwhile (its idle timeout).
                _ => Err(machine::unexpected(&msg)),
            }
        }

        fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Outcome>, SessionError> {
            self.clock = now;
            loop {
                match &mut self.state {
                    DState::Stat(q, ..) => match q.poll(now, out)? {
                        // Only an interrupted upload of it: no such file.
                        Poll::Done(None) => return Err(SessionError::Peer(ErrorCode::NotFound)),
                        Poll::Done(Some(stat)) => {
                            let DState::Stat(_, w, r) = core::mem::replace(&mut self.state, DState::Poisoned)
                            else {
                                continue;
                            };
                            self.need = Some(Need::Tree { kind: stat.chunking, streaming: false });
                            self.state = DState::AwaitTree(w, r);
                            self.start();
                        }
                        Poll::Transmit(n) => return Ok(Poll::Transmit(n)),
                        Poll::Wait(t) => return Ok(Poll::Wait(t)),
                    },
                    // Local work: no deadline on the wire.
                    DState::AwaitTree(..) => return Ok(Poll::Wait(Instant(u64::MAX))),
                    DState::Receiving(d) => return d.poll(now, out),
                    DState::Poisoned => return Err(SessionError::Capacity),
                }
            }
        }
    }
}
