//! Frames on the byte stream: a LEB128 length, then that many bytes of
//! postcard-encoded [`Message`], sealed after the handshake (the payload is
//! then a Noise transport message, see [`crate::channel`]). One hard cap,
//! [`MAX_SEALED`], bounds every frame; a decoder rejects a longer length
//! before reading any of it.

use crate::channel::TAG_LEN;
use crate::message::Message;
use crate::varint;

/// Largest file payload carried by one `Data` frame: 63 KiB, so that a
/// sealed frame stays within Noise's 65,535-byte message limit.
pub const MAX_DATA: usize = 63 * 1024;
/// Largest plaintext frame payload (a full `Data` frame plus its header).
pub const MAX_FRAME: usize = MAX_DATA + 64;
/// Largest frame payload on the wire: a plaintext frame sealed.
pub const MAX_SEALED: usize = MAX_FRAME + TAG_LEN;
/// Longest frame length header.
pub const MAX_HEADER: usize = 3;
/// Output buffer that holds any frame this crate produces, sealed.
pub const MAX_ENCODED: usize = MAX_HEADER + MAX_SEALED;

const _: () = assert!(MAX_SEALED <= crate::channel::MAX_MESSAGE);

/// Why a frame could not be produced or accepted.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length exceeds the decoder's capacity.
    TooLong(u64),
    /// The length header is malformed.
    BadHeader,
    /// The output buffer is too small for this message.
    BufferTooSmall,
}

/// Encodes `msg` as one frame into `out`; returns the frame length.
pub fn encode(msg: &Message<'_>, out: &mut [u8]) -> Result<usize, FrameError> {
    if out.len() <= MAX_HEADER {
        return Err(FrameError::BufferTooSmall);
    }
    let n = postcard::to_slice(msg, &mut out[MAX_HEADER..]).map_err(|_| FrameError::BufferTooSmall)?.len();
    finish_frame(out, n)
}

/// Encodes a message whose last field is a byte slice (`Entries`, `Data`)
/// without a scratch buffer: `template` carries an empty slice, and `fill`
/// writes the slice's bytes straight into `out`, returning how many.
pub fn encode_with_tail<E>(
    template: &Message<'_>,
    out: &mut [u8],
    fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
) -> Result<Result<usize, FrameError>, E> {
    let mut pre = [0u8; 48];
    let Ok(p) = postcard::to_slice(template, &mut pre).map(|s| s.len()) else {
        return Ok(Err(FrameError::BufferTooSmall));
    };
    // An empty trailing slice encodes as a single zero length byte.
    debug_assert_eq!(pre[p - 1], 0, "template must end with an empty slice");
    let prefix = &pre[..p - 1];
    let start = MAX_HEADER + prefix.len() + MAX_HEADER;
    if out.len() <= start {
        return Ok(Err(FrameError::BufferTooSmall));
    }
    let room = (out.len() - start).min(MAX_FRAME - prefix.len() - MAX_HEADER);
    let n = fill(&mut out[start..start + room])?;
    let n = n.min(room);
    let payload = prefix.len() + varint::len(n as u64) + n;
    let hdr = varint::len(payload as u64);
    let data_at = hdr + prefix.len() + varint::len(n as u64);
    out.copy_within(start..start + n, data_at);
    // Both varints fit: they were reserved at their maximum length above.
    let mut pos = 0;
    let _ = varint::put(out, &mut pos, payload as u64);
    out[hdr..hdr + prefix.len()].copy_from_slice(prefix);
    let mut pos = hdr + prefix.len();
    let _ = varint::put(out, &mut pos, n as u64);
    Ok(Ok(data_at + n))
}

/// Seals the plaintext frame `out[..n]` with `channel`: the payload is
/// encrypted in place and its tag appended, behind a new length header.
/// `out` needs [`TAG_LEN`] + 1 bytes of room past the frame.
pub fn seal(channel: &mut crate::channel::Channel, out: &mut [u8], n: usize) -> Result<usize, FrameError> {
    let mut pos = 0;
    let len = varint::get(&out[..n], &mut pos).ok_or(FrameError::BadHeader)? as usize;
    if pos + len != n {
        return Err(FrameError::BadHeader);
    }
    let hdr = varint::len((len + TAG_LEN) as u64);
    if out.len() < hdr + len + TAG_LEN {
        return Err(FrameError::BufferTooSmall);
    }
    out.copy_within(pos..n, hdr);
    let sealed = channel.seal(&mut out[hdr..], len).map_err(|_| FrameError::BufferTooSmall)?;
    let mut at = 0;
    varint::put(out, &mut at, sealed as u64).ok_or(FrameError::BufferTooSmall)?;
    Ok(hdr + sealed)
}

/// Writes the length header in front of a payload of `n` bytes that was
/// encoded at `out[MAX_HEADER..]`, and closes the gap.
fn finish_frame(out: &mut [u8], n: usize) -> Result<usize, FrameError> {
    if n > MAX_FRAME {
        return Err(FrameError::BufferTooSmall);
    }
    let hdr = varint::len(n as u64);
    out.copy_within(MAX_HEADER..MAX_HEADER + n, hdr);
    let mut pos = 0;
    varint::put(out, &mut pos, n as u64).ok_or(FrameError::BufferTooSmall)?;
    Ok(hdr + n)
}

/// Where a completed frame's payload lies.
pub(crate) enum Payload {
    /// In the input, at this range.
    Input(core::ops::Range<usize>),
    /// At the start of the decoder's buffer, this long.
    Buffer(usize),
}

impl Payload {
    fn slice<'a>(self, input: &'a [u8], buf: &'a [u8]) -> &'a [u8] {
        match self {
            Payload::Input(r) => &input[r],
            Payload::Buffer(n) => &buf[..n],
        }
    }
}

/// Reassembles frames from bytes that arrive in arbitrary pieces, in a
/// buffer `B` whose length is the largest frame accepted.
#[derive(Debug)]
pub struct FrameDecoder<B> {
    buf: B,
    /// Length of the frame being read, once its header is complete.
    want: Option<usize>,
    /// Header value accumulated so far, and its bit shift.
    hdr: u64,
    shift: u32,
    filled: usize,
    poisoned: bool,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> FrameDecoder<B> {
    /// A decoder whose largest frame is `buf.len()` bytes.
    pub fn new(buf: B) -> Self {
        FrameDecoder { buf, want: None, hdr: 0, shift: 0, filled: 0, poisoned: false }
    }

    /// Whether a frame is partly received.
    pub fn is_mid_frame(&self) -> bool {
        self.want.is_some() || self.shift > 0
    }

    /// Consumes bytes from `input`. Returns how many were used and, when a
    /// frame completed, its payload (borrowed from `input` when the frame was
    /// whole in it, otherwise from the decoder's buffer). Call again with the
    /// rest of `input`. After an error the decoder stays failed: the stream
    /// cannot be resynchronised.
    pub fn feed<'a>(&'a mut self, input: &'a [u8]) -> Result<(usize, Option<&'a [u8]>), FrameError> {
        let (used, at) = self.take(input)?;
        Ok((used, at.map(|at| at.slice(input, self.buf.as_ref()))))
    }

    /// [`Self::feed`], saying where the payload lies instead of lending it:
    /// in `input` or in this decoder's buffer ([`Self::buffer_mut`]).
    #[cfg(feature = "alloc")]
    pub(crate) fn feed_at(&mut self, input: &[u8]) -> Result<(usize, Option<Payload>), FrameError> {
        self.take(input)
    }

    /// [`Self::feed`], lending the payload mutably (to open it in place).
    pub fn feed_mut<'a>(
        &'a mut self,
        input: &'a mut [u8],
    ) -> Result<(usize, Option<&'a mut [u8]>), FrameError> {
        let (used, at) = self.take(input)?;
        Ok((
            used,
            at.map(|at| match at {
                Payload::Input(r) => &mut input[r],
                Payload::Buffer(n) => &mut self.buf.as_mut()[..n],
            }),
        ))
    }

    /// Whether feeding `input` would finish a frame or fail, without
    /// consuming it: while it would not, a shell can read more bytes before
    /// waking the state machine (a peer dribbling a frame costs no work).
    pub fn would_finish(&self, input: &[u8]) -> bool {
        if self.poisoned {
            return true;
        }
        let cap = self.buf.as_ref().len() as u64;
        let (mut hdr, mut shift, mut used) = (self.hdr, self.shift, 0);
        let want = loop {
            if let Some(w) = self.want {
                break w;
            }
            let Some(&b) = input.get(used) else {
                return false;
            };
            used += 1;
            match header_byte(hdr, shift, b, cap) {
                Err(_) => return true,
                Ok((_, _, Some(w))) => break w,
                Ok((h, s, None)) => (hdr, shift) = (h, s),
            }
        };
        self.filled + (input.len() - used) >= want
    }

    /// The decoder's buffer.
    #[cfg(feature = "alloc")]
    pub(crate) fn buffer(&self) -> &B {
        &self.buf
    }

    /// The decoder's buffer, to resize it (see [`Self::capacity_needed`]).
    pub fn buffer_mut(&mut self) -> &mut B {
        &mut self.buf
    }

    /// The smallest buffer that still holds what this decoder has taken in
    /// (the length of the frame it is reading, if its header is complete).
    pub fn capacity_needed(&self) -> usize {
        self.want.unwrap_or(self.filled).max(self.filled)
    }

    fn take(&mut self, input: &[u8]) -> Result<(usize, Option<Payload>), FrameError> {
        if self.poisoned {
            return Err(FrameError::BadHeader);
        }
        let cap = self.buf.as_ref().len() as u64;
        let mut used = 0;
        let want = loop {
            if let Some(w) = self.want {
                break w;
            }
            let Some(&b) = input.get(used) else {
                return Ok((used, None));
            };
            used += 1;
            let (hdr, shift, want) =
                header_byte(self.hdr, self.shift, b, cap).inspect_err(|_| self.poisoned = true)?;
            (self.hdr, self.shift, self.want) = (hdr, shift, want);
        };
        let rest = &input[used..];
        if self.filled == 0 && rest.len() >= want {
            self.reset_header();
            return Ok((used + want, Some(Payload::Input(used..used + want))));
        }
        let take = (want - self.filled).min(rest.len());
        self.buf.as_mut()[self.filled..self.filled + take].copy_from_slice(&rest[..take]);
        self.filled += take;
        used += take;
        if self.filled < want {
            return Ok((used, None));
        }
        self.reset_header();
        self.filled = 0;
        Ok((used, Some(Payload::Buffer(want))))
    }

    fn reset_header(&mut self) {
        self.want = None;
        self.hdr = 0;
        self.shift = 0;
    }
}

/// One more byte of a frame header over the value `hdr` read so far (its
/// next bits at `shift`): the new value and shift, and the frame's length
/// once the header is complete; too long a frame for a `cap`-byte buffer,
/// or a header longer than [`MAX_HEADER`] bytes, is an error.
fn header_byte(hdr: u64, shift: u32, b: u8, cap: u64) -> Result<(u64, u32, Option<usize>), FrameError> {
    let hdr = hdr | u64::from(b & 0x7f) << shift;
    let shift = shift + 7;
    if hdr > cap {
        return Err(FrameError::TooLong(hdr));
    }
    if b & 0x80 == 0 {
        return Ok((hdr, shift, Some(hdr as usize)));
    }
    if shift >= 7 * MAX_HEADER as u32 {
        return Err(FrameError::BadHeader);
    }
    Ok((hdr, shift, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Outcome;
    use proptest::prelude::*;

    fn decode_all(dec: &mut FrameDecoder<Vec<u8>>, mut input: &[u8]) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut frames = Vec::new();
        while !input.is_empty() {
            let (n, f) = dec.feed(input)?;
            if let Some(f) = f {
                frames.push(f.to_vec());
            }
            input = &input[n..];
        }
        Ok(frames)
    }

    #[test]
    fn frames_survive_any_split() {
        let mut stream = Vec::new();
        let mut buf = vec![0u8; MAX_ENCODED];
        let big = vec![7u8; 40_000];
        for m in [
            Message::ListEnd,
            Message::Data { offset: 9, bytes: &big },
            Message::Done { outcome: Outcome::Written, file_hash: None },
        ] {
            let n = encode(&m, &mut buf).unwrap();
            stream.extend_from_slice(&buf[..n]);
        }
        for step in [1usize, 2, 3, 7, 1000, stream.len()] {
            let mut dec = FrameDecoder::new(vec![0u8; MAX_FRAME]);
            let mut frames = Vec::new();
            for piece in stream.chunks(step) {
                frames.extend(decode_all(&mut dec, piece).unwrap());
            }
            assert_eq!(frames.len(), 3, "step {step}");
            assert_eq!(Message::decode(&frames[1]).unwrap(), Message::Data { offset: 9, bytes: &big });
        }
    }

    #[test]
    fn sealed_frames_open_in_place_after_any_split() {
        use crate::channel::{CipherKind, Handshake};
        let mut c = Handshake::new(true, CipherKind::ChaChaPoly, b"", &[3; 32], [1; 32]).unwrap();
        let mut s = Handshake::new(false, CipherKind::ChaChaPoly, b"", &[3; 32], [2; 32]).unwrap();
        let (mut m, mut p) = ([0u8; 128], [0u8; 128]);
        let n = c.write(&[], &mut m).unwrap();
        s.read(&m[..n], &mut p).unwrap();
        let n = s.write(&[], &mut m).unwrap();
        c.read(&m[..n], &mut p).unwrap();
        let (mut c, mut s) = (c.finish().unwrap(), s.finish().unwrap());
        let big = vec![9u8; MAX_DATA];
        let msgs = [Message::ListEnd, Message::Data { offset: 1, bytes: &big }, Message::Stat { name: "x" }];
        let mut stream = Vec::new();
        let mut buf = vec![0u8; MAX_ENCODED];
        for m in &msgs {
            let n = encode(m, &mut buf[..MAX_ENCODED - TAG_LEN - 1]).unwrap();
            let n = seal(&mut c, &mut buf, n).unwrap();
            assert!(n <= MAX_ENCODED);
            stream.extend_from_slice(&buf[..n]);
        }
        let mut dec = FrameDecoder::new(vec![0u8; MAX_SEALED]);
        let mut got = 0;
        for piece in stream.chunks(5000) {
            let mut piece = piece.to_vec();
            let mut rest = &mut piece[..];
            while !rest.is_empty() {
                let (used, f) = dec.feed_mut(rest).unwrap();
                if let Some(f) = f {
                    let n = s.open(f).unwrap();
                    assert_eq!(Message::decode(&f[..n]).unwrap(), msgs[got]);
                    got += 1;
                }
                rest = &mut rest[used..];
            }
        }
        assert_eq!(got, 3);
    }

    #[test]
    fn oversize_frames_are_rejected_from_the_header() {
        let mut dec = FrameDecoder::new([0u8; 100]);
        // 101 as a varint
        assert_eq!(dec.feed(&[101]).unwrap_err(), FrameError::TooLong(101));
        assert!(dec.feed(&[1, 0]).is_err(), "a failed decoder stays failed");
        let mut dec = FrameDecoder::new([0u8; 100]);
        assert_eq!(dec.feed(&[0xff, 0xff, 0x7f]).unwrap_err(), FrameError::TooLong(127));
    }

    #[test]
    fn tail_encoding_matches_plain_encoding() {
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let mut a = vec![0u8; MAX_ENCODED];
        let mut b = vec![0u8; MAX_ENCODED];
        let n = encode(&Message::Data { offset: 123_456, bytes: &payload }, &mut a).unwrap();
        let m = encode_with_tail::<()>(&Message::Data { offset: 123_456, bytes: &[] }, &mut b, |t| {
            t[..payload.len()].copy_from_slice(&payload);
            Ok(payload.len())
        })
        .unwrap()
        .unwrap();
        assert_eq!(&a[..n], &b[..m]);
        let template = Message::Entries { level: 2, start: 7, offset: 99, last: true, packed: &[] };
        let n = encode(
            &Message::Entries { level: 2, start: 7, offset: 99, last: true, packed: &payload[..300] },
            &mut a,
        )
        .unwrap();
        let m = encode_with_tail::<()>(&template, &mut b, |t| {
            t[..300].copy_from_slice(&payload[..300]);
            Ok(300)
        })
        .unwrap()
        .unwrap();
        assert_eq!(&a[..n], &b[..m]);
    }

    #[test]
    fn small_buffers_are_reported() {
        let mut tiny = [0u8; 8];
        assert_eq!(
            encode(&Message::Stat { name: "a-long-name" }, &mut tiny),
            Err(FrameError::BufferTooSmall)
        );
    }

    proptest! {
        #[test]
        fn decoder_never_panics(input in proptest::collection::vec(any::<u8>(), 0..5000), cap in 0usize..300) {
            let mut dec = FrameDecoder::new(vec![0u8; cap]);
            let mut rest = &input[..];
            while !rest.is_empty() {
                match dec.feed(rest) {
                    Ok((n, frame)) => {
                        if let Some(f) = frame {
                            prop_assert!(f.len() <= cap);
                            let _ = Message::decode(f);
                        }
                        prop_assert!(n > 0 || rest.is_empty());
                        rest = &rest[n..];
                    }
                    Err(FrameError::TooLong(n)) => { prop_assert!(n > cap as u64); break; }
                    Err(_) => break,
                }
            }
        }

        #[test]
        fn would_finish_foretells_feed(
            input in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(1usize..400, 1..40),
            cap in 0usize..600,
        ) {
            let mut dec = FrameDecoder::new(vec![0u8; cap]);
            let mut rest = &input[..];
            for cut in cuts {
                let piece = &rest[..cut.min(rest.len())];
                let foretold = dec.would_finish(piece);
                let (used, finished) = match dec.feed(piece) {
                    Ok((n, f)) => (n, f.is_some()),
                    Err(_) => { prop_assert!(foretold); break; }
                };
                prop_assert_eq!(foretold, finished, "piece of {} bytes", piece.len());
                prop_assert!(dec.capacity_needed() <= cap);
                rest = &rest[used..];
            }
        }

        #[test]
        fn message_decoder_never_panics(input in proptest::collection::vec(any::<u8>(), 0..500)) {
            let _ = Message::decode(&input);
        }
    }
}
