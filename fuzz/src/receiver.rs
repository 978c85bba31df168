//! The receiving side of a transfer (`Receiver`), fed an honest sender's
//! answers that the fuzz input interleaves with its own messages, corrupts,
//! drops and delays.
//!
//! Input:
//! - flags byte: bit 0 the receiver holds a base (the old version); bit 1
//!   the offer leaves the whole-file hash unknown; bit 2 the offer leaves
//!   the root unknown too (it follows in `Root`); bit 3 the offer lies (a
//!   mask byte, then the fields it names, see [`lie`]); bit 4 the sender
//!   compresses (`DataZ`); bit 5 the output indexes the version itself
//!   (`Output::index_in_background`); bit 6 the base is chunked as `Cdc`
//!   whatever the offer's kind; bit 7 the receiver asks for deltas within
//!   chunks (`GetSuffix`, `GetPieces`).
//! - chunking byte (`% 4`: Cdc, Fixed(1024), Fixed(4096), CdcScaled(1)).
//! - the old version: a seed byte and a u16 LE half-length (pseudo-random
//!   bytes); then an edit count byte (`% 4`) and that many edits, each an
//!   op byte, a u32 LE position and a u16 LE length (see [`edit`]): the
//!   result is the new version, which the honest sender holds.
//! - then operations (`byte % 7`): 0 deliver the sender's next frame; 1
//!   inject a message (u16 LE length, then a payload to `Message::decode`);
//!   2 deliver the sender's next frame with one byte changed (u16 LE
//!   position, xor byte); 3 drop the sender's next frame; 4 advance the
//!   clock (u32 LE ms); 5 give the sender its root (rootless offers); 6 let
//!   both sides run until the receiver waits for nothing the sender has.
//!
//! At the end the sender gets its root and both sides run to the end.
//! Properties: no panic; the receiver writes only messages that decode;
//! `Written` only with exactly the bytes the offer describes (its size, its
//! whole-file hash when known, its root: and the sender's exact bytes when
//! the offer carries the sender's root). When the output indexed the
//! version itself, the receiver leaves the whole-file hash to the output's
//! owner (documented in `Receiver::verify`): then the claim must be passed
//! on in the new tree instead; `Unchanged` only over a base whose
//! root and size are the offer's.

use crate::{Input, frame_payload};
use deltasync_core::chunker::ChunkerKind;
use deltasync_core::error::SessionError;
use deltasync_core::frame::MAX_ENCODED;
use deltasync_core::machine::{Machine, Poll};
use deltasync_core::message::{Message, Outcome};
use deltasync_core::receiver::{Base, Receiver};
use deltasync_core::sender::Sender;
use deltasync_core::sim;
use deltasync_core::source::{IoFailed, Output};
use deltasync_core::tree::{Summary, Tree, TreeIndexer};
use deltasync_core::{Hash, Instant};
use std::collections::VecDeque;

/// The session salt (fixed: runs are deterministic).
pub const SALT: [u8; 8] = *b"fuzzsalt";

/// Polls the receiver may take in a row before it is deemed stuck.
const LOOP_LIMIT: usize = 100_000;

/// What a run did (for tests; the fuzzer ignores it).
#[derive(Debug, Default)]
pub struct Report {
    /// How the receiver finished, if it did.
    pub outcome: Option<Outcome>,
    /// Why it failed, if it did.
    pub error: Option<SessionError>,
    /// Requests the receiver sent.
    pub requests: usize,
    /// File bytes it reused from the base.
    pub reused: u64,
}

/// The new version's output: bytes kept for the checks, and a tree of them
/// built on request, as a store that indexes in the background does.
#[derive(Debug, Default)]
pub struct FuzzOut {
    data: Vec<u8>,
    background: bool,
    index: Option<ChunkerKind>,
}

impl Output for FuzzOut {
    fn write(&mut self, data: &[u8]) -> Result<(), IoFailed> {
        self.data.extend_from_slice(data);
        Ok(())
    }
    fn index_in_background(&mut self, kind: ChunkerKind) -> bool {
        self.index = Some(kind);
        self.background
    }
    fn finish_tree(&mut self) -> Result<Tree, IoFailed> {
        let mut ix = TreeIndexer::without_file_hash(self.index.ok_or(IoFailed)?);
        ix.feed(&self.data);
        Ok(ix.finish())
    }
}

/// The honest chunking kinds.
pub fn kind(sel: u8) -> ChunkerKind {
    match sel % 4 {
        0 => ChunkerKind::Cdc,
        1 => ChunkerKind::Fixed(1024),
        2 => ChunkerKind::Fixed(4096),
        _ => ChunkerKind::CdcScaled(1),
    }
}

/// Applies one edit read from `input`: op `% 4` is overwrite, insert (of
/// pseudo-random bytes), delete, or truncate, at `pos % (len + 1)`.
pub fn edit(data: &mut Vec<u8>, input: &mut Input<'_>, seed: u64) {
    let op = input.byte().unwrap_or(0);
    let at = input.u32() as usize % (data.len() + 1);
    let len = usize::from(input.u16());
    let bytes = sim::random_bytes(seed, len);
    match op % 4 {
        0 => {
            let end = (at + len).min(data.len());
            data[at..end].copy_from_slice(&bytes[..end - at]);
        }
        1 => {
            data.splice(at..at, bytes);
        }
        2 => {
            let end = (at + len).min(data.len());
            data.drain(at..end);
        }
        _ => data.truncate(at),
    }
}

/// Replaces the offer's fields a mask byte names with values from `input`:
/// bit 0 size (u64), 1 root (32 bytes), 2 height, 3 file hash (32 bytes),
/// 4 chunking (a selector byte, then a u32 or a byte), 5 the old version's
/// root, 6 the old version's size.
pub fn lie(offer: &mut Summary, old: &Summary, input: &mut Input<'_>) {
    let mask = input.byte().unwrap_or(0);
    if mask & 1 != 0 {
        offer.size = input.u64();
    }
    if mask & 2 != 0 {
        offer.root = Hash(input.array32());
    }
    if mask & 4 != 0 {
        offer.height = input.byte().unwrap_or(0);
    }
    if mask & 8 != 0 {
        offer.file_hash = Hash(input.array32());
    }
    if mask & 16 != 0 {
        offer.chunking = match input.byte().unwrap_or(0) % 3 {
            0 => ChunkerKind::Cdc,
            1 => ChunkerKind::Fixed(input.u32()),
            _ => ChunkerKind::CdcScaled(input.byte().unwrap_or(0)),
        };
    }
    if mask & 32 != 0 {
        offer.root = old.root;
        offer.height = old.height;
    }
    if mask & 64 != 0 {
        offer.size = old.size;
    }
}

type Rx<'a> = Receiver<&'a Tree, &'a [u8], FuzzOut>;
type Tx<'a> = Sender<&'a Tree, &'a [u8]>;

enum Status {
    Running,
    Finished(Outcome),
    Failed(SessionError),
}

struct Run<'a> {
    rx: Rx<'a>,
    tx: Tx<'a>,
    tx_alive: bool,
    /// The sender's frames' payloads, not yet delivered.
    queue: VecDeque<Vec<u8>>,
    now: Instant,
    buf: Vec<u8>,
    report: Report,
}

impl Run<'_> {
    /// Polls the receiver until it waits; its requests go to the sender.
    fn poll_rx(&mut self) -> Status {
        for _ in 0..LOOP_LIMIT {
            match self.rx.poll(self.now, &mut self.buf) {
                Ok(Poll::Transmit(n)) => {
                    self.report.requests += 1;
                    let payload = frame_payload(&self.buf[..n]).expect("the receiver writes whole frames");
                    let msg = Message::decode(payload).expect("the receiver writes messages that decode");
                    if self.tx_alive && self.tx.handle(self.now, msg).is_err() {
                        self.tx_alive = false;
                    }
                }
                Ok(Poll::Wait(_)) => return Status::Running,
                Ok(Poll::Done(o)) => return Status::Finished(o),
                Err(e) => return Status::Failed(e),
            }
        }
        panic!("the receiver sent {LOOP_LIMIT} frames in a row");
    }

    /// The sender's next frame, polling it (once: the fuzzer's operations
    /// stay aligned with the sender's frames) if none is queued.
    fn next_from_tx(&mut self) -> Option<Vec<u8>> {
        if self.queue.is_empty() && self.tx_alive {
            match self.tx.poll(self.now, &mut self.buf) {
                Ok(Poll::Transmit(n)) => {
                    let p = frame_payload(&self.buf[..n]).expect("the sender writes whole frames");
                    self.queue.push_back(p.to_vec());
                }
                Ok(Poll::Wait(_) | Poll::Done(_)) => {}
                Err(_) => self.tx_alive = false,
            }
        }
        self.queue.pop_front()
    }

    fn deliver(&mut self, payload: &[u8]) -> Option<Status> {
        let msg = Message::decode(payload).ok()?;
        Some(match self.rx.handle(self.now, msg) {
            Ok(()) => Status::Running,
            Err(e) => Status::Failed(e),
        })
    }

    /// Both sides run until the receiver waits for nothing the sender has.
    fn exchange(&mut self) -> Status {
        for _ in 0..LOOP_LIMIT {
            match self.poll_rx() {
                Status::Running => {}
                s => return s,
            }
            let Some(p) = self.next_from_tx() else { return Status::Running };
            if let Some(s @ (Status::Finished(_) | Status::Failed(_))) = self.deliver(&p) {
                return s;
            }
        }
        panic!("the exchange did not settle within {LOOP_LIMIT} frames");
    }
}

/// The harness.
pub fn run(data: &[u8]) -> Report {
    let mut input = Input::new(data);
    let flags = input.byte().unwrap_or(0);
    let kind = kind(input.byte().unwrap_or(0));
    let seed = u64::from(input.byte().unwrap_or(0));
    let old = sim::random_bytes(seed, usize::from(input.u16()) * 2);
    let mut new = old.clone();
    for i in 0..input.byte().unwrap_or(0) % 4 {
        edit(&mut new, &mut input, seed + 1 + u64::from(i));
    }
    let base_kind = if flags & 0x40 != 0 { ChunkerKind::Cdc } else { kind };
    let old_tree = Tree::build(&old, base_kind);
    let new_tree = Tree::build(&new, kind);
    let honest = new_tree.summary();

    let mut sent = honest;
    if flags & 2 != 0 {
        sent.file_hash = Hash::UNKNOWN;
    }
    if flags & 4 != 0 {
        sent = Summary { root: Hash::UNKNOWN, height: 0, file_hash: Hash::UNKNOWN, ..sent };
    }
    let mut offer = sent;
    if flags & 8 != 0 {
        lie(&mut offer, &old_tree.summary(), &mut input);
    }

    let now = Instant(1_000);
    let base = (flags & 1 != 0).then(|| Base { tree: &old_tree, source: &old[..] });
    let out = FuzzOut { background: flags & 0x20 != 0, ..FuzzOut::default() };
    let mut report = Report::default();
    let rx = match Receiver::new(offer, SALT, base, out, now) {
        Ok(rx) => rx.deltas(flags & 0x80 != 0),
        Err(e) => {
            assert!(!offer.chunking.suits(offer.size), "a suitable offer was refused: {e:?}");
            report.error = Some(e);
            return report;
        }
    };
    let tx = Sender::new(&new_tree, &new[..], sent, SALT, now).compress(flags & 0x10 != 0);
    let mut r =
        Run { rx, tx, tx_alive: true, queue: VecDeque::new(), now, buf: vec![0u8; MAX_ENCODED], report };

    let mut status = r.poll_rx();
    while matches!(status, Status::Running) {
        let Some(op) = input.byte() else { break };
        let delivered = match op % 7 {
            0 => r.next_from_tx().and_then(|p| r.deliver(&p)),
            1 => {
                let len = usize::from(input.u16());
                r.deliver(input.bytes(len))
            }
            2 => {
                let (at, xor) = (usize::from(input.u16()), input.byte().unwrap_or(1).max(1));
                r.next_from_tx().and_then(|mut p| {
                    if !p.is_empty() {
                        let i = at % p.len();
                        p[i] ^= xor;
                    }
                    r.deliver(&p)
                })
            }
            3 => {
                r.next_from_tx();
                None
            }
            4 => {
                r.now = r.now.plus_ms(u64::from(input.u32()));
                None
            }
            5 => {
                r.tx.set_root(honest.root, honest.height);
                None
            }
            _ => Some(r.exchange()),
        };
        status = match delivered {
            Some(s @ (Status::Finished(_) | Status::Failed(_))) => s,
            _ => r.poll_rx(),
        };
    }
    if matches!(status, Status::Running) {
        r.tx.set_root(honest.root, honest.height);
        status = r.exchange();
    }
    r.report.reused = r.rx.stats().reused_bytes;
    let _ = r.rx.progress();
    match status {
        Status::Running => {}
        Status::Failed(e) => r.report.error = Some(e),
        Status::Finished(o) => {
            r.report.outcome = Some(o);
            let offer = *r.rx.offer();
            let (out, tree) = r.rx.into_parts();
            let indexed_by_output = out.background && out.index.is_some();
            check(o, &offer, out.data, indexed_by_output, tree, &honest, &new, flags & 1 != 0, &old_tree);
        }
    }
    r.report
}

/// The properties of a finished receiver.
#[allow(clippy::too_many_arguments)]
fn check(
    o: Outcome,
    offer: &Summary,
    data: Vec<u8>,
    indexed_by_output: bool,
    tree: Option<Tree>,
    honest: &Summary,
    new: &[u8],
    has_base: bool,
    old_tree: &Tree,
) {
    match o {
        Outcome::Written => {
            let tree = tree.expect("Written comes with the new tree");
            assert_eq!(data.len() as u64, offer.size, "Written with another size than offered");
            assert_eq!(tree.summary().root, offer.root, "Written with a tree whose root is not the offer's");
            if offer.file_hash.is_known() {
                if indexed_by_output {
                    // By contract the receiver does not hash what the output
                    // indexed: it passes the offer's claim on with the tree,
                    // and the output's owner (a store) refuses a mismatch.
                    assert_eq!(
                        tree.summary().file_hash,
                        offer.file_hash,
                        "the offer's hash is not passed on"
                    );
                } else {
                    assert_eq!(
                        Hash::of(&data),
                        offer.file_hash,
                        "Written with bytes whose hash is not the offer's"
                    );
                }
            }
            if offer.root == honest.root {
                assert!(data == new, "Written with the sender's root but other bytes");
            } else {
                // Not the sender's version: the bytes must still be the
                // offered tree's (as `Tree::build` cuts them; see the
                // server_session harness for why that suffices here).
                let t = Tree::build(&data, offer.chunking).summary();
                assert_eq!(
                    (t.root, t.height),
                    (offer.root, offer.height),
                    "Written bytes are not the offered tree"
                );
            }
        }
        Outcome::Unchanged => {
            let old = old_tree.summary();
            assert!(has_base, "Unchanged without a base");
            assert_eq!((old.root, old.size), (offer.root, offer.size), "Unchanged over another version");
            assert!(data.is_empty(), "Unchanged wrote bytes");
        }
        Outcome::Integrity => assert!(tree.is_none(), "Integrity with a new tree"),
    }
}
