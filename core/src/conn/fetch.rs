//! Client operation: whole files fetched without waiting for the server
//! between them (a pull's files that the local tree lacks: there is no
//! base for a delta, so nothing to ask for but the bytes).
//!
//! ```text
//! C: Fetch{name}          (up to WINDOW unanswered)
//! S: Offer(summary) Data|DataZ* Done(Written, hash) | Error
//! ```
//! Answers come in order. Each file is checked against its SHA-256 as it
//! arrives; one that does not match fails alone (`Integrity`), and so does
//! one the shell could not write: the stream stays in step.

use super::batch::Ahead;
use crate::error::{ErrorCode, SessionError};
use crate::hash::Hash;
use crate::machine::{self, Machine, Poll};
use crate::message::Message;
use crate::source::{IoFailed, Output};
use crate::time::{IDLE_TIMEOUT_MS, Instant};
use crate::tree::Summary;
use alloc::vec::Vec;
use sha2::{Digest, Sha256};

/// Most files asked for ahead of their answers.
pub const WINDOW: usize = 16;

/// The file being received.
struct Current {
    summary: Summary,
    pos: u64,
    hasher: Sha256,
    /// Why it fails, once a write did.
    failed: Option<ErrorCode>,
}

/// Fetches `names` into the outputs given (one each, in order) and passes
/// each one's result to `on_result`: its output and summary, or why not.
pub struct FetchBatch<'n, W, F> {
    names: &'n [&'n str],
    outs: Vec<Option<W>>,
    ahead: Ahead,
    version: u16,
    current: Option<Current>,
    on_result: F,
    #[cfg(feature = "compress")]
    unzstd: Option<alloc::boxed::Box<crate::sender::Unpack>>,
    deadline: Instant,
}

impl<'n, W: Output, F: FnMut(usize, Result<(W, Summary), ErrorCode>)> FetchBatch<'n, W, F> {
    /// Fetches `names[i]` into `outs[i]`, in a session of protocol
    /// `version` (7 or later).
    pub fn new(names: &'n [&'n str], outs: Vec<W>, version: u16, on_result: F, now: Instant) -> Self {
        FetchBatch {
            names,
            outs: outs.into_iter().map(Some).collect(),
            ahead: Ahead::new(names.len(), WINDOW),
            version,
            current: None,
            on_result,
            #[cfg(feature = "compress")]
            unzstd: None,
            deadline: now.plus_ms(IDLE_TIMEOUT_MS),
        }
    }

    /// Ends file `i`, the one being answered, with `result`.
    fn end(&mut self, i: usize, result: Result<Summary, ErrorCode>) {
        self.ahead.answered();
        self.current = None;
        let out = self.outs.get_mut(i).and_then(Option::take);
        let r = match (result, out) {
            (Ok(s), Some(w)) => Ok((w, s)),
            (Err(e), _) => Err(e),
            (Ok(_), None) => Err(ErrorCode::Storage),
        };
        (self.on_result)(i, r);
    }

    /// Bytes at `offset` of file `i`, the one being received.
    fn data(&mut self, i: usize, offset: u64, bytes: &[u8]) -> Result<(), SessionError> {
        let bad = SessionError::Protocol(ErrorCode::BadMessage);
        let c = self.current.as_mut().ok_or(SessionError::Protocol(ErrorCode::UnexpectedMessage))?;
        let end = c.pos.checked_add(bytes.len() as u64).filter(|&e| e <= c.summary.size && !bytes.is_empty());
        if offset != c.pos || end.is_none() {
            return Err(bad);
        }
        c.pos = end.unwrap_or(c.pos);
        if c.failed.is_some() {
            return Ok(());
        }
        c.hasher.update(bytes);
        if let Some(w) = self.outs.get_mut(i).and_then(Option::as_mut)
            && let Err(IoFailed) = w.write(bytes)
        {
            c.failed = Some(if w.out_of_space() { ErrorCode::NoSpace } else { ErrorCode::Storage });
        }
        Ok(())
    }
}

impl<W: Output, F: FnMut(usize, Result<(W, Summary), ErrorCode>)> Machine for FetchBatch<'_, W, F> {
    type Output = ();

    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError> {
        self.deadline = now.plus_ms(IDLE_TIMEOUT_MS);
        let Some(i) = self.ahead.answering() else {
            return Err(machine::unexpected(&msg));
        };
        match msg {
            Message::Offer(summary) if self.current.is_none() => {
                // A server always knows the hash of what it stores.
                if !summary.file_hash.is_known() {
                    return Err(SessionError::Protocol(ErrorCode::BadMessage));
                }
                self.current = Some(Current { summary, pos: 0, hasher: Sha256::new(), failed: None });
                Ok(())
            }
            Message::Error(code) if self.current.is_none() => {
                self.end(i, Err(code));
                Ok(())
            }
            Message::Data { offset, bytes } => self.data(i, offset, bytes),
            #[cfg(feature = "compress")]
            Message::DataZ { offset, raw, bytes } => {
                if self.unzstd.is_none() {
                    self.unzstd = crate::sender::Unpack::new();
                }
                let mut z = self.unzstd.take().ok_or(SessionError::Capacity)?;
                let r =
                    z.data(raw, bytes).map_err(SessionError::Protocol).and_then(|d| self.data(i, offset, d));
                self.unzstd = Some(z);
                r
            }
            Message::Done { file_hash: Some(h), .. } if self.current.is_some() => {
                let c = self.current.take().ok_or(SessionError::Capacity)?;
                if c.pos != c.summary.size {
                    return Err(SessionError::Protocol(ErrorCode::BadMessage));
                }
                let got = Hash(c.hasher.finalize().into());
                let result = match c.failed {
                    Some(e) => Err(e),
                    None if got == h && h == c.summary.file_hash => Ok(c.summary),
                    None => Err(ErrorCode::Integrity),
                };
                self.end(i, result);
                Ok(())
            }
            m => Err(machine::unexpected(&m)),
        }
    }

    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<()>, SessionError> {
        if self.ahead.done() {
            return Ok(Poll::Done(()));
        }
        if let Some(i) = self.ahead.next(self.version)? {
            return machine::emit(&Message::Fetch { name: self.names[i] }, out);
        }
        machine::wait_until(now, self.deadline)
    }
}
