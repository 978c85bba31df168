//! Client operation: changes to the server's tree that carry no file data
//! (a tree sync's [`Op`]s), sent ahead of their answers so that a
//! thousand of them cost about one round trip, not a thousand.
//!
//! ```text
//! C: MakeDir | SetMeta | Copy | Delete  (up to WINDOW unanswered)
//! S: Done | Deleted | Error(code)       (one each, in order)
//! ```
//! The server serves requests in order, so each answer belongs to the
//! oldest unanswered request; a refused one (`Error`) fails alone.

use crate::error::{ErrorCode, SessionError};
use crate::machine::{self, Machine, Poll};
use crate::message::{EntryKind, Message};
use crate::plan::Op;
use crate::time::{IDLE_TIMEOUT_MS, Instant};
use alloc::vec::Vec;

/// Most requests sent ahead of their answers: what a server reads and
/// answers at once without a large buffer.
pub const WINDOW: usize = 64;

/// Requests sent ahead of their answers, which come in order: which one to
/// send next (while fewer than `window` are unanswered), and which one the
/// next answer is for. `Batch`, `Listings` and `FetchBatch` share it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ahead {
    len: usize,
    window: usize,
    sent: usize,
    answered: usize,
}

impl Ahead {
    /// `len` requests, at most `window` unanswered.
    pub(crate) fn new(len: usize, window: usize) -> Ahead {
        Ahead { len, window, sent: 0, answered: 0 }
    }

    /// The request the next answer is for, if one is out.
    pub(crate) fn answering(&self) -> Option<usize> {
        (self.answered < self.sent).then_some(self.answered)
    }

    /// The request being answered was, in full.
    pub(crate) fn answered(&mut self) {
        self.answered += 1;
    }

    /// Whether every request was answered.
    pub(crate) fn done(&self) -> bool {
        self.answered == self.len
    }

    /// The request to send now, if the window has room, in a session of
    /// protocol `version` (7 or later, which has these requests).
    pub(crate) fn next(&mut self, version: u16) -> Result<Option<usize>, SessionError> {
        if version < 7 {
            return Err(SessionError::Peer(ErrorCode::Unsupported));
        }
        if self.sent < self.len && self.sent - self.answered < self.window {
            self.sent += 1;
            return Ok(Some(self.sent - 1));
        }
        Ok(None)
    }
}

/// Sends [`Op`]s (names as the server knows them) and passes each one's
/// result to `on_result`, in order.
pub struct Batch<F> {
    ops: Vec<Op>,
    ahead: Ahead,
    version: u16,
    on_result: F,
    deadline: Instant,
}

impl<F: FnMut(&Op, Result<(), ErrorCode>)> Batch<F> {
    /// A batch in a session of protocol `version` (7 or later).
    pub fn new(ops: Vec<Op>, version: u16, on_result: F, now: Instant) -> Self {
        let ahead = Ahead::new(ops.len(), WINDOW);
        Batch { ops, ahead, version, on_result, deadline: now.plus_ms(IDLE_TIMEOUT_MS) }
    }
}

impl<F: FnMut(&Op, Result<(), ErrorCode>)> Machine for Batch<F> {
    type Output = ();

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        let Some(op) = self.ahead.answering().and_then(|i| self.ops.get(i)) else {
            return Err(machine::unexpected(&msg));
        };
        let result = match (op, msg) {
            (Op::Delete { .. }, Message::Deleted) => Ok(()),
            (Op::Delete { .. }, Message::Done { .. }) => return Err(machine::unexpected(&msg)),
            (_, Message::Done { .. }) => Ok(()),
            (_, Message::Error(code)) => Err(code),
            (_, m) => return Err(machine::unexpected(&m)),
        };
        (self.on_result)(op, result);
        self.ahead.answered();
        Ok(())
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<()>, SessionError> {
        if self.ahead.done() {
            return Ok(Poll::Done(()));
        }
        if let Some(i) = self.ahead.next(self.version)? {
            let m = match &self.ops[i] {
                Op::MakeDir { name, meta } => Message::MakeDir { name, meta: *meta },
                Op::SetMeta { name, meta, .. } => Message::SetMeta { name, meta: *meta },
                Op::Copy { from, sha256, to, meta } => {
                    Message::Copy { from, sha256: *sha256, to, meta: *meta }
                }
                Op::Delete { name, .. } => Message::Delete { name },
            };
            return machine::emit(&m, out);
        }
        machine::wait_until(now, self.deadline)
    }
}

impl Op {
    /// The name the op changes.
    pub fn name(&self) -> &str {
        match self {
            Op::MakeDir { name, .. } | Op::SetMeta { name, .. } | Op::Delete { name, .. } => name,
            Op::Copy { to, .. } => to,
        }
    }

    /// Whether it is about a directory.
    pub fn is_dir(&self) -> bool {
        matches!(
            self,
            Op::MakeDir { .. }
                | Op::SetMeta { kind: EntryKind::Dir, .. }
                | Op::Delete { kind: EntryKind::Dir, .. }
        )
    }
}

/// Client operation: directory listings (protocol 7) asked for ahead of
/// their answers, like [`Batch`]; each entry is passed to `on_entry` with
/// the index of its directory, and each directory ends with its result
/// (`Err(NotFound)`: no such directory).
pub struct Listings<'d, F> {
    dirs: &'d [&'d str],
    ahead: Ahead,
    version: u16,
    on_entry: F,
    results: Vec<Result<(), ErrorCode>>,
    entries: usize,
    deadline: Instant,
}

/// Most entries one [`Listings`] passes on (a hostile server's listing
/// would otherwise grow its caller's memory without bound).
pub const MAX_LISTED: usize = 1 << 22;

impl<'d, F: FnMut(usize, crate::message::Entry<'_>)> Listings<'d, F> {
    /// Lists `dirs` in a session of protocol `version` (7 or later).
    pub fn new(dirs: &'d [&'d str], version: u16, on_entry: F, now: Instant) -> Self {
        Listings {
            dirs,
            ahead: Ahead::new(dirs.len(), WINDOW),
            version,
            on_entry,
            results: Vec::with_capacity(dirs.len()),
            entries: 0,
            deadline: now.plus_ms(IDLE_TIMEOUT_MS),
        }
    }
}

impl<F: FnMut(usize, crate::message::Entry<'_>)> Machine for Listings<'_, F> {
    /// Each directory's result, in order.
    type Output = Vec<Result<(), ErrorCode>>;

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        let Some(i) = self.ahead.answering() else {
            return Err(machine::unexpected(&msg));
        };
        match msg {
            Message::Entry(e) => {
                self.entries += 1;
                if self.entries > MAX_LISTED {
                    return Err(SessionError::Protocol(ErrorCode::OutOfRange));
                }
                (self.on_entry)(i, e);
                return Ok(());
            }
            Message::ListEnd => self.results.push(Ok(())),
            Message::Error(code) => self.results.push(Err(code)),
            m => return Err(machine::unexpected(&m)),
        }
        self.ahead.answered();
        Ok(())
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Self::Output>, SessionError> {
        if self.ahead.done() {
            return Ok(Poll::Done(core::mem::take(&mut self.results)));
        }
        if let Some(i) = self.ahead.next(self.version)? {
            return machine::emit(&Message::ListDir { dir: self.dirs[i] }, out);
        }
        machine::wait_until(now, self.deadline)
    }
}
