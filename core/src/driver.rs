//! Drivers: run any [`Machine`] over a byte stream. [`Pump`] is the sans-IO
//! part shared by both; [`run_blocking`] drives it over `embedded_io` (the
//! command-line client, the GUI, the smoltcp device), and [`run_async`] over
//! `embedded_io_async` (the server's tokio tasks, through
//! `embedded-io-adapters`), handing each burst of machine work to the shell.

use crate::channel::{Channel, TAG_LEN};
use crate::error::{ErrorCode, SessionError};
#[cfg(feature = "alloc")]
use crate::frame::Payload;
use crate::frame::{self, FrameDecoder, FrameError, MAX_HEADER};
use crate::machine::{Machine, Poll};
use crate::message::Message;
use crate::time::Instant;

/// Why a driver stopped.
#[non_exhaustive]
#[derive(Debug)]
pub enum DriveError<E> {
    /// The state machine failed.
    Session(SessionError),
    /// The peer sent a frame that could not be accepted.
    Frame(FrameError),
    /// The transport failed.
    Io(E),
    /// The peer closed the connection.
    Closed,
}

impl<E: core::fmt::Debug> core::fmt::Display for DriveError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DriveError::Session(e) => write!(f, "{e}"),
            DriveError::Frame(FrameError::TooLong(n)) => {
                write!(f, "peer sent a frame of {n} bytes, over the limit")
            }
            DriveError::Frame(e) => write!(f, "bad frame from peer: {e:?}"),
            DriveError::Io(e) => write!(f, "connection error: {e:?}"),
            DriveError::Closed => f.write_str("connection closed by peer"),
        }
    }
}

impl<E: core::fmt::Debug> core::error::Error for DriveError<E> {}

/// What the transport must do next.
#[derive(Debug)]
pub enum Step<T> {
    /// Write `Pump::output()[..n]`.
    Write(usize),
    /// Read into `Pump::input()`, then call `Pump::filled`.
    Read(Instant),
    /// Call `step` again.
    Again,
    /// The machine finished.
    Done(T),
    /// Write `Pump::output()[..n]`: then the machine is finished (its last
    /// messages went into a batch, see [`BATCH_MAX`]; only batching pumps,
    /// which need `alloc`, finish so).
    #[cfg(feature = "alloc")]
    Finish(usize, T),
}

/// Most plaintext bytes of the several messages a batching pump seals as
/// one frame (when both peers announced
/// [`crate::message::CAP_BATCH`]): messages ready at once (answers to the
/// requests of one read, a receiver's requests) share one frame and its
/// tag. A longer message goes alone, as without batching. Small enough
/// that a server holding a connection small between requests takes any
/// batch.
pub const BATCH_MAX: usize = 1024;

/// Where a batching pump has its machine write each message: past the
/// batch being filled (with the room to seal it in place).
const STAGE: usize = MAX_HEADER + BATCH_MAX + TAG_LEN + 1;

/// What a batching pump's output buffer needs on top of one frame's room:
/// give it [`frame::MAX_ENCODED`] + `BATCH_ROOM` to send full `Data`
/// frames. (A pump whose output is shorter than `BATCH_ROOM` plus
/// `MAX_NAME + 512` sends every message alone.)
pub const BATCH_ROOM: usize = STAGE;

/// Which buffer holds the messages of an opened frame not yet handled.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "alloc"), allow(dead_code))]
enum Held {
    /// The input buffer.
    Input,
    /// The frame decoder's buffer.
    Frame,
}

/// The buffers, counters and secure channel of one connection: frames in,
/// frames out. `I` holds received bytes, `F` the largest frame accepted
/// (sealed: [`frame::MAX_SEALED`] for full `Data` frames), `O` the largest
/// frame sent (at least [`frame::MAX_ENCODED`] to send full `Data` frames;
/// smaller buffers just send smaller frames). Once a handshake hands it a
/// channel ([`Machine::take_channel`]), every frame out is sealed and every
/// frame in must open, or the session ends with
/// `SessionError::Protocol(ErrorCode::Tampered)` and the frame is not acted
/// on.
pub struct Pump<I, F, O> {
    input: I,
    start: usize,
    end: usize,
    decoder: FrameDecoder<F>,
    output: O,
    channel: Option<Channel>,
    /// Plaintext bytes of messages waiting to be sealed as one frame, at
    /// `output[MAX_HEADER..]`.
    batched: usize,
    /// A message at `output[STAGE..]`, of this many bytes (its frame
    /// header included), that did not fit the batch sent last.
    staged: usize,
    /// The messages of an opened batched frame not yet handled: where.
    held: Option<(Held, usize, usize)>,
    /// Bytes written to the transport.
    pub sent: u64,
    /// Bytes read from the transport.
    pub received: u64,
    eof: bool,
}

impl<I, F, O> Pump<I, F, O>
where
    I: AsRef<[u8]> + AsMut<[u8]>,
    F: AsRef<[u8]> + AsMut<[u8]>,
    O: AsRef<[u8]> + AsMut<[u8]>,
{
    /// A pump over the given buffers.
    pub fn new(input: I, frame: F, output: O) -> Self {
        Pump {
            input,
            start: 0,
            end: 0,
            decoder: FrameDecoder::new(frame),
            output,
            channel: None,
            batched: 0,
            staged: 0,
            held: None,
            sent: 0,
            received: 0,
            eof: false,
        }
    }

    /// The bytes to write after `Step::Write(n)`.
    pub fn output(&self, n: usize) -> &[u8] {
        &self.output.as_ref()[..n]
    }

    /// Where to read into after `Step::Read`.
    pub fn input(&mut self) -> &mut [u8] {
        &mut self.input.as_mut()[self.end..]
    }

    /// Records that `n` bytes were read into `input()`; 0 means end of stream.
    pub fn filled(&mut self, n: usize) {
        if n == 0 {
            self.eof = true;
        }
        self.end += n;
        self.received += n as u64;
    }

    /// Whether a frame is partly received or bytes wait to be decoded.
    pub fn is_mid_frame(&self) -> bool {
        self.start < self.end || self.decoder.is_mid_frame() || self.held.is_some()
    }

    /// Whether a step would have work: the buffered input finishes a frame
    /// (or fails to), the input buffer is full (a step moves it into the
    /// frame being assembled), or the peer has closed. While none holds, a
    /// shell can read more before stepping.
    pub fn has_frame(&self) -> bool {
        self.held.is_some()
            || self.eof
            || self.end == self.input.as_ref().len()
            || self.decoder.would_finish(&self.input.as_ref()[self.start..self.end])
    }

    /// Whether frames are sealed (a handshake has finished).
    pub fn is_secure(&self) -> bool {
        self.channel.is_some()
    }

    /// Takes the channel a handshake just finished, if any.
    fn adopt<M: Machine>(&mut self, m: &mut M) {
        if let Some(c) = m.take_channel() {
            self.channel = Some(c);
        }
    }

    /// Seals the plaintext frame `output[..n]` if the channel is up.
    fn seal(&mut self, n: usize) -> Result<usize, SessionError> {
        match self.channel.as_mut() {
            Some(c) => frame::seal(c, self.output.as_mut(), n).map_err(|_| SessionError::Capacity),
            None => Ok(n),
        }
    }

    /// Advances `m` by one step: sends what it has, else decodes one frame of
    /// buffered input, else asks for more input.
    pub fn step<M: Machine, E>(&mut self, m: &mut M, now: Instant) -> Result<Step<M::Output>, DriveError<E>> {
        #[cfg(feature = "alloc")]
        if self.batching() {
            let r = self.step_batched(m, now);
            if r.is_err() {
                // What the failed session still had to send or handle is
                // not the next one's (a connection may go on).
                (self.batched, self.staged, self.held) = (0, 0, None);
            }
            return r;
        }
        // Room for the tag and a longer length header once sealed.
        let out = self.output.as_mut();
        let room = out.len().saturating_sub(TAG_LEN + 1);
        let polled = m.poll(now, &mut out[..room]).map_err(DriveError::Session)?;
        match polled {
            Poll::Transmit(n) => {
                // The frame goes out under the channel as it was before
                // this poll: a handshake's last message is sent in clear.
                let n = self.seal(n).map_err(DriveError::Session)?;
                self.adopt(m);
                self.sent += n as u64;
                Ok(Step::Write(n))
            }
            Poll::Done(o) => {
                self.adopt(m);
                Ok(Step::Done(o))
            }
            Poll::Wait(deadline) => {
                if self.start < self.end || self.held.is_some() {
                    self.take_frame(m, now)?;
                    return Ok(Step::Again);
                }
                if self.eof {
                    return Err(DriveError::Closed);
                }
                Ok(Step::Read(deadline))
            }
        }
    }

    /// Whether this side seals several messages into one frame: the
    /// channel says both peers read such frames, and the output buffer
    /// has room to stage a message past a batch.
    #[cfg(feature = "alloc")]
    fn batching(&self) -> bool {
        // Devices (no `alloc`) never announce CAP_BATCH: their pump keeps
        // its flash.
        cfg!(feature = "alloc")
            && self.channel.as_ref().is_some_and(Channel::batched)
            && self.output.as_ref().len() >= STAGE + crate::message::MAX_NAME + 512
    }

    /// [`Self::step`] for a batching pump: each message is written at
    /// `STAGE` with the room it would have alone, then joins the batch if
    /// it fits. The batch goes out when the machine waits and no message it
    /// was sent is left to handle, or when a message does not fit.
    #[cfg(feature = "alloc")]
    fn step_batched<M: Machine, E>(
        &mut self,
        m: &mut M,
        now: Instant,
    ) -> Result<Step<M::Output>, DriveError<E>> {
        if self.staged > 0 {
            let n = core::mem::take(&mut self.staged);
            if let Some(w) = self.add_to_batch(n).map_err(DriveError::Session)? {
                return Ok(Step::Write(w));
            }
        }
        let room = self.output.as_ref().len() - (TAG_LEN + 1);
        let polled = m.poll(now, &mut self.output.as_mut()[STAGE..room]).map_err(DriveError::Session)?;
        match polled {
            Poll::Transmit(n) => {
                self.adopt(m);
                match self.add_to_batch(n).map_err(DriveError::Session)? {
                    Some(w) => Ok(Step::Write(w)),
                    None => Ok(Step::Again),
                }
            }
            Poll::Done(o) => {
                self.adopt(m);
                if self.batched > 0 {
                    let w = self.seal_batch().map_err(DriveError::Session)?;
                    return Ok(Step::Finish(w, o));
                }
                Ok(Step::Done(o))
            }
            Poll::Wait(deadline) => {
                if self.start < self.end || self.held.is_some() {
                    self.take_frame(m, now)?;
                    return Ok(Step::Again);
                }
                if self.batched > 0 {
                    return self.seal_batch().map(Step::Write).map_err(DriveError::Session);
                }
                if self.eof {
                    return Err(DriveError::Closed);
                }
                Ok(Step::Read(deadline))
            }
        }
    }

    /// Takes the message of `n` bytes (frame header included) at
    /// `output[STAGE..]` into the batch if it fits. If it does not: seals
    /// it alone if the batch is empty, else seals the batch and keeps the
    /// message for the next step. Returns the bytes to write, if any.
    #[cfg(feature = "alloc")]
    fn add_to_batch(&mut self, n: usize) -> Result<Option<usize>, SessionError> {
        let out = self.output.as_mut();
        let mut hdr = 0;
        let len =
            crate::varint::get(&out[STAGE..STAGE + n], &mut hdr).ok_or(SessionError::Capacity)? as usize;
        if hdr + len != n {
            return Err(SessionError::Capacity);
        }
        if self.batched + len <= BATCH_MAX {
            out.copy_within(STAGE + hdr..STAGE + n, MAX_HEADER + self.batched);
            self.batched += len;
            return Ok(None);
        }
        if self.batched > 0 {
            self.staged = n;
            return self.seal_batch().map(Some);
        }
        self.seal_at(STAGE + hdr, len).map(Some)
    }

    /// Seals the batch.
    #[cfg(feature = "alloc")]
    fn seal_batch(&mut self) -> Result<usize, SessionError> {
        let len = core::mem::take(&mut self.batched);
        self.seal_at(MAX_HEADER, len)
    }

    /// Seals the plaintext `output[at..at + len]` as the frame at the
    /// start of the output; returns its length.
    #[cfg(feature = "alloc")]
    fn seal_at(&mut self, at: usize, len: usize) -> Result<usize, SessionError> {
        let channel = self.channel.as_mut().ok_or(SessionError::Capacity)?;
        let out = self.output.as_mut();
        let hdr = crate::varint::len((len + TAG_LEN) as u64);
        out.copy_within(at..at + len, hdr);
        let sealed = channel.seal(&mut out[hdr..], len).map_err(|_| SessionError::Capacity)?;
        let mut pos = 0;
        crate::varint::put(out, &mut pos, sealed as u64).ok_or(SessionError::Capacity)?;
        self.sent += (hdr + sealed) as u64;
        Ok(hdr + sealed)
    }

    /// Decodes what buffered input holds of the next frame and, once one is
    /// whole, opens it and hands it to `m`. (Devices: their peers never
    /// batch, and this is the smaller code.)
    #[cfg(not(feature = "alloc"))]
    fn take_frame<M: Machine, E>(&mut self, m: &mut M, now: Instant) -> Result<(), DriveError<E>> {
        let (used, payload) = self
            .decoder
            .feed_mut(&mut self.input.as_mut()[self.start..self.end])
            .map_err(DriveError::Frame)?;
        // Consumed even if handling it fails: a connection that goes on
        // after a refused request must not see it again.
        self.start += used;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if let Some(p) = payload {
            let plain = match self.channel.as_mut() {
                Some(c) => match c.open(p) {
                    Ok(n) => &p[..n],
                    Err(_) => return Err(DriveError::Session(SessionError::Protocol(ErrorCode::Tampered))),
                },
                None => &p[..],
            };
            let msg = Message::decode(plain).map_err(|c| DriveError::Session(SessionError::Protocol(c)))?;
            m.handle(now, msg).map_err(DriveError::Session)?;
            self.adopt(m);
        }
        Ok(())
    }

    /// Hands `m` the next message of an opened batched frame if one is
    #[cfg(feature = "alloc")]
    /// left; else decodes what buffered input holds of the next frame and,
    /// once one is whole, opens it and hands it (or its first message) to
    /// `m`.
    fn take_frame<M: Machine, E>(&mut self, m: &mut M, now: Instant) -> Result<(), DriveError<E>> {
        if let Some((held, start, end)) = self.held.take() {
            return self.take_message(m, now, held, start..end);
        }
        let (used, payload) =
            self.decoder.feed_at(&self.input.as_ref()[self.start..self.end]).map_err(DriveError::Frame)?;
        // Consumed even if handling it fails: a connection that goes on
        // after a refused request must not see it again.
        let base = self.start;
        self.start += used;
        let (held, range) = match payload {
            None => {
                self.rewind();
                return Ok(());
            }
            Some(Payload::Input(r)) => (Held::Input, base + r.start..base + r.end),
            Some(Payload::Buffer(n)) => (Held::Frame, 0..n),
        };
        let opened = match self.channel.as_mut() {
            Some(c) => {
                let sealed = match held {
                    Held::Input => &mut self.input.as_mut()[range.clone()],
                    Held::Frame => &mut self.decoder.buffer_mut().as_mut()[range.clone()],
                };
                match c.open(sealed) {
                    Ok(n) => n,
                    Err(_) => return Err(DriveError::Session(SessionError::Protocol(ErrorCode::Tampered))),
                }
            }
            None => range.len(),
        };
        self.take_message(m, now, held, range.start..range.start + opened)
    }

    /// Hands `m` the message (or, from a batching peer, the first of the
    /// messages) in `range` of the `held` buffer, and keeps where the rest
    /// lies.
    #[cfg(feature = "alloc")]
    fn take_message<M: Machine, E>(
        &mut self,
        m: &mut M,
        now: Instant,
        held: Held,
        range: core::ops::Range<usize>,
    ) -> Result<(), DriveError<E>> {
        let batched = cfg!(feature = "alloc") && self.channel.as_ref().is_some_and(Channel::batched);
        let bytes = match held {
            Held::Input => &self.input.as_ref()[range.clone()],
            Held::Frame => &self.decoder.buffer().as_ref()[range.clone()],
        };
        let protocol = |c| DriveError::Session(SessionError::Protocol(c));
        let (msg, rest) = if batched {
            let (msg, rest) = Message::decode_first(bytes).map_err(protocol)?;
            // A peer batches at most BATCH_MAX bytes of messages; only a
            // frame of one message is longer. (So a frame of 64 KiB cannot
            // carry 65,000 one-byte requests.)
            if !rest.is_empty() && range.len() > BATCH_MAX {
                return Err(protocol(ErrorCode::BadMessage));
            }
            (msg, rest)
        } else {
            (Message::decode(bytes).map_err(protocol)?, &[][..])
        };
        let next = (!rest.is_empty()).then(|| (held, range.end - rest.len(), range.end));
        let handled = m.handle(now, msg).map_err(DriveError::Session);
        self.held = next;
        self.rewind();
        handled?;
        self.adopt(m);
        Ok(())
    }

    /// Starts the input buffer over once all it holds was taken (and no
    /// message left in it waits).
    #[cfg(feature = "alloc")]
    fn rewind(&mut self) {
        if self.start == self.end && !matches!(self.held, Some((Held::Input, ..))) {
            self.start = 0;
            self.end = 0;
        }
    }

    /// After a failed write: reads what the peer sent before it closed
    /// (a few reads at most) and feeds it to `m`, returning the error the
    /// peer reported, if it reported one.
    fn last_word<M: Machine, T: embedded_io::Read>(
        &mut self,
        m: &mut M,
        io: &mut T,
        now: &mut impl FnMut() -> Instant,
    ) -> Option<DriveError<T::Error>> {
        // Only what the peer sent is looked at: nothing more is produced
        // (it could not go out), and at most 64 reads are made.
        for _ in 0..64 {
            while self.start < self.end || self.held.is_some() {
                match self.take_frame::<M, T::Error>(m, now()) {
                    Err(e @ DriveError::Session(SessionError::Peer(_))) => return Some(e),
                    Err(_) => return None,
                    Ok(()) => {}
                }
            }
            match io.read(self.input()) {
                Ok(n) if n > 0 => self.filled(n),
                _ => return None,
            }
        }
        None
    }

    /// The `Error` frame to send the peer after `err`, if it should be told.
    pub fn farewell<E>(&mut self, err: &DriveError<E>) -> Option<&[u8]> {
        let code = match err {
            DriveError::Session(SessionError::Protocol(c)) => *c,
            DriveError::Session(SessionError::Timeout) => ErrorCode::Timeout,
            DriveError::Session(SessionError::Read | SessionError::Write) => ErrorCode::Storage,
            DriveError::Session(SessionError::NoSpace) => ErrorCode::NoSpace,
            DriveError::Frame(FrameError::TooLong(_)) => ErrorCode::FrameTooLong,
            DriveError::Frame(_) => ErrorCode::BadMessage,
            _ => return None,
        };
        (self.batched, self.staged) = (0, 0);
        let n = frame::encode(&Message::Error(code), self.output.as_mut()).ok()?;
        let n = self.seal(n).ok()?;
        self.sent += n as u64;
        Some(&self.output.as_ref()[..n])
    }
}

#[cfg(feature = "alloc")]
impl Pump<alloc::vec::Vec<u8>, alloc::vec::Vec<u8>, alloc::vec::Vec<u8>> {
    /// Resizes the buffers (input, largest frame in, largest frame out), as
    /// a server does to hold a connection small until its peer has
    /// authenticated, and between requests. Call it only between a read
    /// and the next step (never with a frame written but not yet sent).
    /// Returns `false`, changing nothing, if what is buffered would not fit
    /// (with room to read more).
    pub fn resize(&mut self, input: usize, frame: usize, output: usize) -> bool {
        let pending = self.end - self.start;
        // While messages wait in a buffer (a batched frame's) or to be sent,
        // nothing may move: the buffers may only grow, in place (a server
        // grows them as soon as a batched request makes it busy, before the
        // large frames that follow arrive).
        if self.held.is_some() || self.batched > 0 || self.staged > 0 {
            let (i, f, o) = self.sizes();
            if input < i || frame < f || output < o {
                return false;
            }
            self.input.resize(input, 0);
            self.decoder.buffer_mut().resize(frame, 0);
            self.output.resize(output, 0);
            return true;
        }
        // Keep room to read into: an empty input slice would read as the
        // end of the stream.
        if pending >= input || self.decoder.capacity_needed() > frame {
            return false;
        }
        if self.start > 0 {
            self.input.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = pending;
        }
        for (buf, len) in
            [(&mut self.input, input), (self.decoder.buffer_mut(), frame), (&mut self.output, output)]
        {
            if buf.len() != len {
                buf.resize(len, 0);
                buf.shrink_to_fit();
            }
        }
        true
    }

    /// The buffers' sizes: input, largest frame in, largest frame out.
    pub fn sizes(&mut self) -> (usize, usize, usize) {
        (self.input.len(), self.decoder.buffer_mut().len(), self.output.len())
    }
}

/// A machine and its pump: what [`run_async`] drives and hands to the
/// shell's runner for each burst of steps.
pub struct Session<M, I, F, O> {
    /// The state machine.
    pub machine: M,
    /// Its buffers and channel.
    pub pump: Pump<I, F, O>,
}

impl<M, I, F, O> Session<M, I, F, O>
where
    M: Machine,
    I: AsRef<[u8]> + AsMut<[u8]>,
    F: AsRef<[u8]> + AsMut<[u8]>,
    O: AsRef<[u8]> + AsMut<[u8]>,
{
    /// Steps the machine until the transport is needed (never returns
    /// [`Step::Again`]), calling `observe` after every step. Sans-IO: this
    /// is the part a server runs off its async workers, since the machine
    /// may touch storage.
    pub fn advance(
        &mut self,
        now: Instant,
        mut observe: impl FnMut(&mut M, &mut Pump<I, F, O>),
    ) -> Result<Step<M::Output>, DriveError<core::convert::Infallible>> {
        loop {
            let step = self.pump.step(&mut self.machine, now);
            observe(&mut self.machine, &mut self.pump);
            match step? {
                Step::Again => {}
                other => return Ok(other),
            }
        }
    }
}

/// What a runner of [`run_async`] hands back: the session, and where its
/// burst of steps stopped.
pub type Advanced<S, T> = (S, Result<Step<T>, DriveError<core::convert::Infallible>>);

fn widen<E>(e: DriveError<core::convert::Infallible>) -> DriveError<E> {
    match e {
        DriveError::Session(s) => DriveError::Session(s),
        DriveError::Frame(f) => DriveError::Frame(f),
        DriveError::Closed => DriveError::Closed,
        DriveError::Io(never) => match never {},
    }
}

/// Runs `m` to completion over a blocking transport. `now` reads the clock.
/// A read that fails with `ErrorKind::TimedOut` (a socket read timeout) only
/// wakes the machine so that it can check its deadline.
pub fn run_blocking<M, T, I, F, O>(
    m: &mut M,
    io: &mut T,
    pump: &mut Pump<I, F, O>,
    now: impl FnMut() -> Instant,
) -> Result<M::Output, DriveError<T::Error>>
where
    M: Machine,
    T: embedded_io::Read + embedded_io::Write,
    I: AsRef<[u8]> + AsMut<[u8]>,
    F: AsRef<[u8]> + AsMut<[u8]>,
    O: AsRef<[u8]> + AsMut<[u8]>,
{
    run_blocking_observed(m, io, pump, now, |_, _| {})
}

/// [`run_blocking`], calling `observe` after every step (for progress bars,
/// logs and live statistics).
pub fn run_blocking_observed<M, T, I, F, O>(
    m: &mut M,
    io: &mut T,
    pump: &mut Pump<I, F, O>,
    mut now: impl FnMut() -> Instant,
    mut observe: impl FnMut(&mut M, &Pump<I, F, O>),
) -> Result<M::Output, DriveError<T::Error>>
where
    M: Machine,
    T: embedded_io::Read + embedded_io::Write,
    I: AsRef<[u8]> + AsMut<[u8]>,
    F: AsRef<[u8]> + AsMut<[u8]>,
    O: AsRef<[u8]> + AsMut<[u8]>,
{
    use embedded_io::{Error as _, ErrorKind};
    let result = (|| loop {
        let step = pump.step(m, now())?;
        observe(m, pump);
        match step {
            Step::Write(n) => {
                if let Err(e) = io.write_all(pump.output(n)) {
                    // The peer may have said why it stopped before it
                    // closed (a full disk, a refusal): that beats "broken
                    // pipe".
                    return Err(pump.last_word(m, io, &mut now).unwrap_or(DriveError::Io(e)));
                }
            }
            Step::Read(_) => {
                io.flush().map_err(DriveError::Io)?;
                match io.read(pump.input()) {
                    Ok(n) => pump.filled(n),
                    Err(e) if e.kind() == ErrorKind::TimedOut => {}
                    Err(e) => return Err(DriveError::Io(e)),
                }
            }
            Step::Again => {}
            Step::Done(o) => {
                io.flush().map_err(DriveError::Io)?;
                return Ok(o);
            }
            #[cfg(feature = "alloc")]
            Step::Finish(n, o) => {
                if let Err(e) = io.write_all(pump.output(n)) {
                    return Err(pump.last_word(m, io, &mut now).unwrap_or(DriveError::Io(e)));
                }
                io.flush().map_err(DriveError::Io)?;
                return Ok(o);
            }
        }
    })();
    if let Err(e) = &result
        && let Some(bytes) = pump.farewell(e)
    {
        let _ = io.write_all(bytes).and_then(|_| io.flush());
    }
    result
}

/// Runs a session to completion over an async transport and hands it back
/// with the result.
///
/// `run` performs each burst of steps ([`Session::advance`]) and returns
/// the session: inline on a device, on a bounded worker pool in a server
/// (the machine may read and write storage and hash, which must not stall
/// the task that moves bytes). The driver calls it only when there is work:
/// at the start, after each write, when a whole frame has arrived, and at
/// the machine's deadline; bytes of an unfinished frame are read without
/// waking the machine. `sleep_until` waits for an instant on the shell's
/// clock; a read still pending at the machine's deadline is abandoned
/// there, so a peer that sends nothing, or dribbles a frame, cannot hold the
/// session past it.
pub async fn run_async<S, M, I, F, O, T, R, RF, W, WF>(
    mut session: S,
    io: &mut T,
    mut run: R,
    mut sleep_until: W,
) -> (S, Result<M::Output, DriveError<T::Error>>)
where
    S: core::ops::DerefMut<Target = Session<M, I, F, O>>,
    M: Machine,
    I: AsRef<[u8]> + AsMut<[u8]>,
    F: AsRef<[u8]> + AsMut<[u8]>,
    O: AsRef<[u8]> + AsMut<[u8]>,
    T: embedded_io_async::Read + embedded_io_async::Write,
    R: FnMut(S) -> RF,
    RF: core::future::Future<Output = Advanced<S, M::Output>>,
    W: FnMut(Instant) -> WF,
    WF: core::future::Future<Output = ()>,
{
    use embedded_io_async::{Error as _, ErrorKind};
    let result = loop {
        let step;
        (session, step) = run(session).await;
        let deadline = match step.map_err(widen) {
            Err(e) => break Err(e),
            Ok(Step::Done(o)) => break io.flush().await.map(|()| o).map_err(DriveError::Io),
            #[cfg(feature = "alloc")]
            Ok(Step::Finish(n, o)) => {
                if let Err(e) = io.write_all(session.pump.output(n)).await {
                    break Err(DriveError::Io(e));
                }
                break io.flush().await.map(|()| o).map_err(DriveError::Io);
            }
            Ok(Step::Write(n)) => {
                if let Err(e) = io.write_all(session.pump.output(n)).await {
                    break Err(DriveError::Io(e));
                }
                continue;
            }
            Ok(Step::Again) => continue,
            Ok(Step::Read(at)) => at,
        };
        if let Err(e) = io.flush().await {
            break Err(DriveError::Io(e));
        }
        // Read until a frame is whole, the peer closes, or time is up.
        let waited = loop {
            let read = io.read(session.pump.input());
            let timer = sleep_until(deadline);
            match first(read, timer).await {
                Some(Ok(n)) => {
                    session.pump.filled(n);
                    if session.pump.has_frame() {
                        break Ok(());
                    }
                }
                Some(Err(e)) if e.kind() == ErrorKind::TimedOut => break Ok(()),
                Some(Err(e)) => break Err(DriveError::Io(e)),
                None => break Ok(()),
            }
        };
        if let Err(e) = waited {
            break Err(e);
        }
    };
    if let Err(e) = &result
        && let Some(bytes) = session.pump.farewell(e)
    {
        let _ = io.write_all(bytes).await;
        let _ = io.flush().await;
    }
    (session, result)
}

/// The output of `a` if it finishes first, `None` if `b` does.
async fn first<A: core::future::Future, B: core::future::Future<Output = ()>>(
    a: A,
    b: B,
) -> Option<A::Output> {
    let (mut a, mut b) = (core::pin::pin!(a), core::pin::pin!(b));
    core::future::poll_fn(|cx| {
        if let core::task::Poll::Ready(v) = a.as_mut().poll(cx) {
            return core::task::Poll::Ready(Some(v));
        }
        b.as_mut().poll(cx).map(|()| None)
    })
    .await
}

#[cfg(feature = "std")]
pub use std_io::TimeoutAsTimedOut;

#[cfg(feature = "std")]
mod std_io {
    use std::io;

    /// A std stream whose read timeouts surface as `TimedOut`: a socket with
    /// a read timeout fails with `WouldBlock` on Unix, which the drivers would
    /// otherwise take for a broken connection. Wrap it in
    /// `embedded_io_adapters::std::FromStd` to drive it.
    #[derive(Debug)]
    pub struct TimeoutAsTimedOut<S>(pub S);

    impl<S: io::Read> io::Read for TimeoutAsTimedOut<S> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf).map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock => io::Error::from(io::ErrorKind::TimedOut),
                _ => e,
            })
        }
    }

    impl<S: io::Write> io::Write for TimeoutAsTimedOut<S> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
    }
}
