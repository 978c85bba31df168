//! A server connection (`ServerConn` over an in-memory store) driven by
//! `Pump::step`, with the fuzz input as the client's side of the stream.
//!
//! Input: a config byte, then records until the input ends.
//! - config bit 0: run a real client handshake first (sim's `KEY`, fixed
//!   ephemerals), keep the client's `Channel`, and seal every `FRAME` with
//!   it; otherwise the input is the client from its first byte (the hello).
//! - bits 1-2: which files the store holds ([`preset_files`]).
//! - bit 3: the key may only read under `dir/` (else it may do anything).
//! - bit 4: the handshake uses AES-GCM (else ChaCha20-Poly1305).
//! - bit 5: the store keeps interrupted uploads as partials, to be reused
//!   (else sim's `MemStore`, which keeps none).
//!
//! Records (`tag % 5`):
//! - 0 FRAME: u16 LE length, then that many payload bytes, sent as one frame
//!   (sealed after a handshake).
//! - 1 RAW: u16 LE length, then that many bytes sent as they are.
//! - 2 TIME: u32 LE milliseconds added to the clock.
//! - 3 PIECE: one byte; the server reads at most `byte + 1` bytes at a time
//!   from now on (0: as much as its buffer takes).
//! - 4 EOF: the client closes the stream.
//!
//! After each record the server runs until it waits for input that is not
//! there. When it ends the session and input is left, the client connects
//! again (up to [`MAX_CONNECTIONS`] times) to the same store. Properties: no panic; every frame the server writes is one whole
//! frame that opens under the client's channel (or is clear before the
//! handshake) and decodes as a message; a step loop always settles; an
//! upload the server reports `Written` stored exactly the bytes the offer
//! (and its `Root`) describe.

use crate::Input;
use deltasync_core::access::Access;
use deltasync_core::channel::{Channel, CipherKind, ClientKey, TAG_LEN};
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::conn::ClientHandshake;
use deltasync_core::conn::server::{Direction, Event, PartialFile, Published, ServerConn, Store, StoredFile};
use deltasync_core::driver::Step;
use deltasync_core::error::{ErrorCode, SessionError};
use deltasync_core::frame::{self, FrameDecoder, MAX_SEALED};
use deltasync_core::machine::{Machine, Poll};
use deltasync_core::message::{Expect, Message, Outcome};
use deltasync_core::sim::{self, Files, KEY, MemStore, MemWriter, StdPump};
use deltasync_core::source::{IoFailed, Output};
use deltasync_core::tree::{Summary, Tree};
use deltasync_core::{Hash, Instant};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

/// Steps one record may take before the server is deemed stuck. A record
/// carries at most 64 KiB, and the largest stored file is 100 KB: a few
/// hundred steps are plenty.
const STEP_LIMIT: usize = 100_000;

/// The files a store starts with, by `preset` (0..4).
pub fn preset_files(preset: u8) -> Files {
    thread_local! {
        // Generated once: a run only clones them.
        static PRESETS: [BTreeMap<String, Vec<u8>>; 4] = std::array::from_fn(|p| make_preset(p as u8));
    }
    Rc::new(RefCell::new(PRESETS.with(|p| p[usize::from(preset & 3)].clone())))
}

fn make_preset(preset: u8) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    match preset & 3 {
        0 => {}
        1 => {
            m.insert("a".to_string(), sim::random_bytes(1, 10_000));
        }
        2 => {
            m.insert("a".to_string(), sim::random_bytes(1, 10_000));
            m.insert("dir/b".to_string(), sim::random_bytes(2, 100_000));
            m.insert("empty".to_string(), Vec::new());
        }
        _ => {
            m.insert("dir/log".to_string(), sim::log_lines(3, 60_000));
            m.insert("a".to_string(), sim::random_bytes(1, 10_000));
        }
    }
    m
}

/// The server's keys: sim's `KEY`, with every permission or read-only
/// under `dir/`.
pub fn keys(restricted: bool) -> Vec<(ClientKey, Access)> {
    if restricted {
        let a = Access {
            key: "reader".into(),
            read: true,
            write: false,
            delete: false,
            prefixes: vec!["dir/".into()],
        };
        vec![(KEY, a)]
    } else {
        sim::keys()
    }
}

/// The handshake cipher for config `bit 4`.
pub fn cipher(config: u8) -> CipherKind {
    if config & 0x10 != 0 { CipherKind::AesGcm } else { CipherKind::ChaChaPoly }
}

/// A client handshake that keeps the channel for the harness instead of
/// handing it to its pump, so the harness seals the fuzzer's frames itself.
pub struct KeepChannel {
    /// The real handshake.
    pub inner: ClientHandshake,
    /// Its channel, once established.
    pub channel: Option<Channel>,
}

impl Machine for KeepChannel {
    type Output = [u8; 8];
    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.inner.handle(now, msg)?;
        if let Some(c) = self.inner.take_channel() {
            self.channel = Some(c);
        }
        Ok(())
    }
    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<[u8; 8]>, SessionError> {
        self.inner.poll(now, out)
    }
}

/// What the server said, in short (for tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `Accept`.
    Accept,
    /// `Info`.
    Info,
    /// `Partial`.
    Partial,
    /// `ListEnd`.
    ListEnd,
    /// `Deleted`.
    Deleted,
    /// `Offer`.
    Offer,
    /// `Entries`.
    Entries,
    /// `Data` or `DataZ`.
    Data,
    /// `Done`.
    Done(Outcome),
    /// `Error`.
    Error(ErrorCode),
    /// Anything else.
    Other,
}

/// What a run did (for tests; the fuzzer ignores it).
#[derive(Debug, Default)]
pub struct Report {
    /// Whether the harness's own handshake ran.
    pub handshake: bool,
    /// The server's frames that could be read.
    pub replies: Vec<Reply>,
    /// The server's events.
    pub events: Vec<Event>,
    /// Why the session ended, if it did.
    pub end: Option<String>,
}

/// An in-memory store that keeps what an interrupted upload wrote, and
/// offers it to the next upload of that name ([`Store::partial`]).
pub struct PartialStore {
    files: MemStore,
    partials: Rc<RefCell<BTreeMap<String, Vec<u8>>>>,
}

/// A version being written to a [`PartialStore`]; dropped unfinished, it
/// becomes the name's partial.
pub struct PartialWriter {
    name: String,
    /// `None` once finished.
    inner: Option<MemWriter>,
    partials: Rc<RefCell<BTreeMap<String, Vec<u8>>>>,
}

impl Output for PartialWriter {
    fn write(&mut self, data: &[u8]) -> Result<(), IoFailed> {
        self.inner.as_mut().ok_or(IoFailed)?.write(data)
    }
    fn index_in_background(&mut self, kind: ChunkerKind) -> bool {
        self.inner.as_mut().is_some_and(|w| w.index_in_background(kind))
    }
    fn finish_tree(&mut self) -> Result<Tree, IoFailed> {
        self.inner.as_mut().ok_or(IoFailed)?.finish_tree()
    }
}

impl Drop for PartialWriter {
    fn drop(&mut self) {
        if let Some(w) = self.inner.take()
            && !w.data().is_empty()
        {
            self.partials.borrow_mut().insert(self.name.clone(), w.data().to_vec());
        }
    }
}

impl Store for PartialStore {
    type Reader = Vec<u8>;
    type Writer = PartialWriter;

    fn open(
        &mut self,
        name: &str,
        chunking: Option<ChunkerKind>,
    ) -> Result<Option<(Tree, Vec<u8>)>, ErrorCode> {
        self.files.open(name, chunking)
    }
    fn partial(&mut self, name: &str, chunking: ChunkerKind) -> Result<Option<(Tree, Vec<u8>)>, ErrorCode> {
        let p = self.partials.borrow();
        let Some(d) = p.get(name) else { return Ok(None) };
        Ok(chunking.suits(d.len() as u64).then(|| (Tree::build(d, chunking), d.clone())))
    }
    fn holds(&mut self, name: &str) -> Result<bool, ErrorCode> {
        Ok(self.files.0.borrow().contains_key(name) || self.partials.borrow().contains_key(name))
    }
    fn create(&mut self, name: &str, size: u64, expect: Option<Expect>) -> Result<PartialWriter, ErrorCode> {
        Ok(PartialWriter {
            name: name.to_string(),
            inner: Some(self.files.create(name, size, expect)?),
            partials: self.partials.clone(),
        })
    }
    fn finish(
        &mut self,
        name: &str,
        mut w: PartialWriter,
        tree: Option<Tree>,
    ) -> Result<Published, ErrorCode> {
        self.partials.borrow_mut().remove(name);
        let inner = w.inner.take().ok_or(ErrorCode::Storage)?;
        self.files.finish(name, inner, tree)
    }
    fn partials(&mut self) -> Result<Vec<PartialFile>, ErrorCode> {
        let p = self.partials.borrow();
        Ok(p.iter()
            .map(|(n, d)| PartialFile { name: n.clone(), size: d.len() as u64, modified: 0 })
            .collect())
    }
    fn partial_info(&mut self, name: &str) -> Result<Option<PartialFile>, ErrorCode> {
        let p = self.partials.borrow();
        Ok(p.get(name).map(|d| PartialFile { name: name.to_string(), size: d.len() as u64, modified: 0 }))
    }
    fn list(&mut self) -> Result<Vec<StoredFile>, ErrorCode> {
        self.files.list()
    }
    fn stat(&mut self, name: &str) -> Result<StoredFile, ErrorCode> {
        self.files.stat(name)
    }
    fn delete(&mut self, name: &str) -> Result<(), ErrorCode> {
        self.files.delete(name)
    }
}

/// Connections one run may open: when the server ends a session and input
/// is left, the client connects again (to the same store: an interrupted
/// upload's partial is then reused).
pub const MAX_CONNECTIONS: usize = 3;

/// The keys every connection checks against.
pub type Keys = Vec<(ClientKey, Access)>;

/// The harness.
pub fn run(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let config = input.byte().unwrap_or(0);
    with_session(config, |s| s.run(input))
}

/// Calls `f` with a session set up as `config` says (see the module docs),
/// over whichever store it names.
pub fn with_session<R>(config: u8, f: impl FnOnce(&mut dyn Client) -> R) -> R {
    let files = preset_files(config >> 1);
    let restricted = config & 0x08 != 0;
    if config & 0x20 != 0 {
        let partials: Rc<RefCell<BTreeMap<String, Vec<u8>>>> = Rc::default();
        let f2 = files.clone();
        let make = move |now| {
            let store = PartialStore { files: MemStore(f2.clone()), partials: partials.clone() };
            ServerConn::new(store, keys(restricted), [9u8; 32], now)
        };
        f(&mut Session::new(Box::new(make), files, config))
    } else {
        let f2 = files.clone();
        // As `sim::server`, at any time.
        let make = move |now| ServerConn::new(MemStore(f2.clone()), keys(restricted), [9u8; 32], now);
        f(&mut Session::new(Box::new(make), files, config))
    }
}

/// The client's side of a session, whatever the store (the seed generator
/// drives real client machines through it).
pub trait Client {
    /// Runs the harness over the records in `input`.
    fn run(&mut self, input: Input<'_>) -> Report;
    /// Sends one frame holding `payload` (sealed after a handshake).
    fn send_frame(&mut self, payload: &[u8]);
    /// Advances the clock.
    fn advance(&mut self, ms: u64);
    /// The clock.
    fn now(&self) -> Instant;
    /// Runs the server until it waits for input; `false` if it ended.
    fn settle(&mut self, eof: bool) -> bool;
    /// The plaintext payloads of the server's frames since the last call.
    fn take_inbox(&mut self) -> Vec<Vec<u8>>;
    /// The session salt of the harness's handshake.
    fn salt(&self) -> [u8; 8];
    /// What happened so far.
    fn report(&mut self) -> &mut Report;
    /// Connects again, as after the server ended a session.
    fn reconnect(&mut self);
}

struct Session<S: Store> {
    make: Box<dyn Fn(Instant) -> ServerConn<S, Keys>>,
    server: ServerConn<S, Keys>,
    files: Files,
    config: u8,
    sp: StdPump,
    channel: Option<Channel>,
    salt: [u8; 8],
    connections: usize,
    now: Instant,
    wire: VecDeque<u8>,
    piece: usize,
    /// Decodes the server's frames (each write must be one whole frame).
    seen: FrameDecoder<Vec<u8>>,
    /// The last offer sent for each name, with its root once `Root` gave it.
    offers: BTreeMap<String, Summary>,
    last_upload: Option<String>,
    inbox: Vec<Vec<u8>>,
    report: Report,
}

impl<S: Store> Session<S> {
    fn new(make: Box<dyn Fn(Instant) -> ServerConn<S, Keys>>, files: Files, config: u8) -> Self {
        let server = make(Instant(0));
        let mut s = Session {
            make,
            server,
            files,
            config,
            sp: sim::pump(),
            channel: None,
            salt: [0; 8],
            connections: 1,
            now: Instant(0),
            wire: VecDeque::new(),
            piece: usize::MAX,
            seen: FrameDecoder::new(vec![0u8; MAX_SEALED]),
            offers: BTreeMap::new(),
            last_upload: None,
            inbox: Vec::new(),
            report: Report::default(),
        };
        s.handshake();
        s
    }

    /// The harness's own handshake, when the config asks for one.
    fn handshake(&mut self) {
        if self.config & 1 == 0 {
            return;
        }
        let mut client = KeepChannel {
            inner: ClientHandshake::new(KEY, cipher(self.config), [1u8; 32], self.now),
            channel: None,
        };
        let mut cp = sim::pump();
        let mut net = sim::Net::new();
        net.clock = self.now;
        match sim::run(&mut client, &mut cp, &mut self.server, &mut self.sp, &mut net) {
            Ok(salt) => self.salt = salt,
            Err(e) => panic!("the simulation's own handshake failed: {e:?}"),
        }
        self.channel = Some(client.channel.take().expect("a finished handshake has a channel"));
        self.report.handshake = true;
    }

    /// Records the offers (and roots) the client sends, to check uploads.
    fn track(&mut self, payload: &[u8]) {
        if self.channel.is_none() {
            return;
        }
        match Message::decode(payload) {
            Ok(
                Message::Upload { name, offer }
                | Message::UploadIf { name, offer, .. }
                | Message::UploadMeta { name, offer, .. },
            ) => {
                self.offers.insert(name.to_string(), offer);
                self.last_upload = Some(name.to_string());
            }
            // A put's size now, its hash at its end: what a `Written` for
            // it must have stored.
            Ok(Message::Put { name, size, chunking, .. }) => {
                let offer =
                    Summary { size, root: Hash::UNKNOWN, height: 0, file_hash: Hash::UNKNOWN, chunking };
                self.offers.insert(name.to_string(), offer);
                self.last_upload = Some(name.to_string());
            }
            Ok(Message::PutEnd { file_hash }) => {
                if let Some(o) = self.last_upload.as_ref().and_then(|n| self.offers.get_mut(n)) {
                    o.file_hash = file_hash;
                }
            }
            Ok(Message::Root { root, height }) if root.is_known() => {
                if let Some(o) = self.last_upload.as_ref().and_then(|n| self.offers.get_mut(n))
                    && !o.root.is_known()
                {
                    o.root = root;
                    o.height = height;
                }
            }
            _ => {}
        }
    }

    /// Checks one frame the server wrote, sealed if `secure`.
    fn check_frame(&mut self, bytes: &[u8], secure: bool) {
        let (used, payload) = self.seen.feed(bytes).expect("the server writes well-formed frames");
        let mut payload = payload.expect("each write is one whole frame").to_vec();
        assert_eq!(used, bytes.len(), "a write holds more than one frame");
        let plain = match (secure, self.channel.as_mut()) {
            (false, _) => &payload[..],
            (true, Some(c)) => {
                let n = c.open(&mut payload).expect("the server's frame opens under the session's channel");
                &payload[..n]
            }
            // A replayed hello was accepted: its channel is not ours.
            (true, None) => return,
        };
        // A session whose peers both announced CAP_BATCH may carry several
        // messages in a frame, one after another.
        let batched = secure && self.channel.as_ref().is_some_and(|c| c.batched());
        let mut rest = plain;
        while !rest.is_empty() {
            let (m, tail) = if batched {
                Message::decode_first(rest).expect("the server writes messages that decode")
            } else {
                (Message::decode(rest).expect("the server writes messages that decode"), &[][..])
            };
            let r = match m {
                Message::Accept { .. } => Reply::Accept,
                Message::Info(_) => Reply::Info,
                Message::Partial(_) => Reply::Partial,
                Message::ListEnd => Reply::ListEnd,
                Message::Deleted => Reply::Deleted,
                Message::Offer(_) => Reply::Offer,
                Message::Entries { .. } => Reply::Entries,
                Message::Data { .. } | Message::DataZ { .. } => Reply::Data,
                Message::Done { outcome, .. } => Reply::Done(outcome),
                Message::Error(c) => Reply::Error(c),
                _ => Reply::Other,
            };
            self.report.replies.push(r);
            self.inbox.push(rest[..rest.len() - tail.len()].to_vec());
            rest = tail;
        }
    }

    fn collect_events(&mut self) {
        // Exercised for coverage; their values are the dashboard's.
        let _ = (self.server.progress(), self.server.key_name(), self.server.is_idle());
        while let Some(ev) = self.server.next_event() {
            if let Event::Finished { name, direction: Direction::Upload, outcome: Outcome::Written, .. } = &ev
            {
                self.check_written(name);
            }
            self.report.events.push(ev);
        }
    }

    /// An upload reported `Written` stored what its offer describes.
    fn check_written(&self, name: &str) {
        let offer = self.offers.get(name).unwrap_or_else(|| panic!("{name:?} was written without an offer"));
        let files = self.files.borrow();
        let data = files.get(name).unwrap_or_else(|| panic!("{name:?} was written but is not stored"));
        assert_eq!(data.len() as u64, offer.size, "{name:?}: stored size differs from the offer");
        if offer.file_hash.is_known() {
            assert_eq!(
                Hash::of(data),
                offer.file_hash,
                "{name:?}: stored bytes differ from the offer's hash"
            );
        } else {
            // Only the root vouches for the bytes. (A client could offer a
            // tree cut where `Tree::build` would not; the fuzzer cannot
            // compute one, and the seeds hold none.)
            let tree = Tree::build(data, offer.chunking).summary();
            assert_eq!(
                (tree.root, tree.height),
                (offer.root, offer.height),
                "{name:?}: the stored bytes' tree differs from the offer"
            );
        }
    }
}

impl<S: Store> Client for Session<S> {
    fn run(&mut self, mut input: Input<'_>) -> Report {
        while let Some(tag) = input.byte() {
            let mut eof = false;
            match tag % 5 {
                0 => {
                    let len = usize::from(input.u16());
                    self.send_frame(input.bytes(len));
                }
                1 => {
                    let len = usize::from(input.u16());
                    self.wire.extend(input.bytes(len));
                }
                2 => self.advance(u64::from(input.u32())),
                3 => {
                    self.piece = match input.byte().unwrap_or(0) {
                        0 => usize::MAX,
                        b => usize::from(b) + 1,
                    }
                }
                _ => eof = true,
            }
            if !self.settle(eof) {
                if self.connections >= MAX_CONNECTIONS || input.is_empty() {
                    break;
                }
                self.reconnect();
            }
        }
        std::mem::take(&mut self.report)
    }

    fn send_frame(&mut self, payload: &[u8]) {
        self.track(payload);
        let mut buf = Vec::with_capacity(payload.len() + 3 + TAG_LEN + 1);
        crate::put_varint(&mut buf, payload.len() as u64);
        buf.extend_from_slice(payload);
        let n = buf.len();
        if let Some(c) = self.channel.as_mut() {
            buf.resize(n + TAG_LEN + 3, 0);
            match frame::seal(c, &mut buf, n) {
                Ok(sealed) => buf.truncate(sealed),
                // Over Noise's message size: nothing was sealed or sent.
                Err(_) => return,
            }
        }
        self.wire.extend(&buf);
    }

    fn advance(&mut self, ms: u64) {
        self.now = self.now.plus_ms(ms);
    }

    fn now(&self) -> Instant {
        self.now
    }

    fn settle(&mut self, eof: bool) -> bool {
        let mut eof_sent = false;
        for _ in 0..STEP_LIMIT {
            let secure = self.sp.is_secure();
            let step = self.sp.step::<_, ()>(&mut self.server, self.now);
            self.collect_events();
            match step {
                Ok(Step::Write(n)) => {
                    let frame = self.sp.output(n).to_vec();
                    self.check_frame(&frame, secure);
                }
                Ok(Step::Again) => {}
                Ok(Step::Read(_)) => {
                    if self.wire.is_empty() {
                        if eof && !eof_sent {
                            eof_sent = true;
                            self.sp.filled(0);
                            continue;
                        }
                        return true;
                    }
                    let buf = self.sp.input();
                    let n = buf.len().min(self.wire.len()).min(self.piece);
                    assert!(n > 0, "the server asks to read with a full input buffer");
                    for (slot, b) in buf.iter_mut().zip(self.wire.drain(..n)) {
                        *slot = b;
                    }
                    self.sp.filled(n);
                }
                Ok(Step::Done(())) => {
                    self.report.end = Some("done".into());
                    return false;
                }
                Ok(Step::Finish(n, ())) => {
                    let frame = self.sp.output(n).to_vec();
                    self.check_frame(&frame, secure);
                    self.report.end = Some("done".into());
                    return false;
                }
                Err(e) => {
                    let secure = self.sp.is_secure();
                    if let Some(bytes) = self.sp.farewell(&e) {
                        let bytes = bytes.to_vec();
                        self.check_frame(&bytes, secure);
                    }
                    self.report.end = Some(format!("{e:?}"));
                    return false;
                }
            }
        }
        panic!("the server did not settle within {STEP_LIMIT} steps");
    }

    fn take_inbox(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.inbox)
    }

    fn salt(&self) -> [u8; 8] {
        self.salt
    }

    fn report(&mut self) -> &mut Report {
        &mut self.report
    }

    fn reconnect(&mut self) {
        // Dropping the old connection drops an upload's writer: a partial.
        self.server = (self.make)(self.now);
        self.sp = sim::pump();
        self.channel = None;
        self.wire.clear();
        self.inbox.clear();
        self.seen = FrameDecoder::new(vec![0u8; MAX_SEALED]);
        self.offers.clear();
        self.last_upload = None;
        self.connections += 1;
        self.handshake();
    }
}
