//! The shape every state machine shares, so one driver runs them all.

use crate::error::SessionError;
use crate::message::Message;
use crate::time::Instant;

/// What a state machine wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll<T> {
    /// A frame of this many bytes is at the start of the output buffer.
    Transmit(usize),
    /// Nothing to send: wait for input, or call again at this instant.
    Wait(Instant),
    /// Finished.
    Done(T),
}

/// A sans-IO protocol state machine: fed messages, drained of frames.
pub trait Machine {
    /// What it yields when finished.
    type Output;

    /// Takes one message from the peer. An `Err(SessionError::Protocol(code))`
    /// means the peer broke the protocol; the driver tells it `code`.
    fn handle(&mut self, now: Instant, msg: Message<'_>) -> Result<(), SessionError>;

    /// Writes the next frame into `out` (at least
    /// [`crate::frame::MAX_ENCODED`] bytes is always enough), or says to wait,
    /// or finishes.
    fn poll(&mut self, now: Instant, out: &mut [u8]) -> Result<Poll<Self::Output>, SessionError>;

    /// The secure channel a handshake just established, once: the driver
    /// seals every later frame with it and opens every later frame from
    /// the peer. Asked after every `handle` and `poll`; the frame a `poll`
    /// returned goes out as it was produced (the last handshake message is
    /// sent in clear).
    fn take_channel(&mut self) -> Option<crate::channel::Channel> {
        None
    }
}

/// Encodes a small control message, mapping a too-small buffer to
/// [`SessionError::Capacity`].
pub(crate) fn emit<T>(msg: &Message<'_>, out: &mut [u8]) -> Result<Poll<T>, SessionError> {
    crate::frame::encode(msg, out).map(Poll::Transmit).map_err(|_| SessionError::Capacity)
}

/// What a machine answers a message it has no use for: the peer's own
/// error if it is one, else a protocol violation.
pub(crate) fn unexpected(msg: &Message<'_>) -> SessionError {
    match msg {
        Message::Error(c) => SessionError::Peer(*c),
        _ => SessionError::Protocol(crate::error::ErrorCode::UnexpectedMessage),
    }
}

/// Fails with [`SessionError::Timeout`] past `deadline`, else waits for it.
pub(crate) fn wait_until<T>(now: Instant, deadline: Instant) -> Result<Poll<T>, SessionError> {
    if now >= deadline { Err(SessionError::Timeout) } else { Ok(Poll::Wait(deadline)) }
}
