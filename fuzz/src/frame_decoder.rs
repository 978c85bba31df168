//! `FrameDecoder` fed arbitrary bytes in arbitrary pieces.
//!
//! Input: capacity (u16 LE, reduced to `0..=MAX_SEALED`), a count `k`
//! (low 4 bits of one byte), `k` piece sizes (1..=256 each, cycled), then the
//! byte stream.
//!
//! Properties: no panic; every frame fits the capacity; a `TooLong(n)` has
//! `n` over it; the frames, the error and the bytes consumed do not depend on
//! how the stream was split (nor on `feed` vs `feed_mut`); frames re-framed
//! with a canonical header decode to the same frames; a frame that decodes as
//! a `Message` and is `frame::encode`d again decodes to the same message.

use crate::{Input, put_varint};
use deltasync_core::frame::{self, FrameDecoder, FrameError, MAX_ENCODED, MAX_SEALED};
use deltasync_core::message::Message;

/// What decoding a whole stream gave.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The frames' payloads, in order.
    pub frames: Vec<Vec<u8>>,
    /// The error that stopped the decoder, if any.
    pub error: Option<FrameError>,
    /// Bytes consumed by successful feeds.
    pub consumed: usize,
    /// Whether a frame was left incomplete.
    pub mid_frame: bool,
}

/// Decodes `stream` fed in pieces of the sizes `pieces` (cycled; empty:
/// all at once), into a decoder of capacity `cap`.
pub fn decode(stream: &[u8], cap: usize, pieces: &[usize]) -> Decoded {
    let mut dec = FrameDecoder::new(vec![0u8; cap]);
    let mut out = Decoded { frames: Vec::new(), error: None, consumed: 0, mid_frame: false };
    let mut at = 0;
    let mut turn = 0usize;
    while at < stream.len() {
        let size = if pieces.is_empty() { stream.len() } else { pieces[turn % pieces.len()] };
        let mut piece = stream[at..(at + size).min(stream.len())].to_vec();
        let use_mut = turn % 2 == 1;
        turn += 1;
        let mut rest = &mut piece[..];
        while !rest.is_empty() {
            let fed = if use_mut {
                dec.feed_mut(rest).map(|(n, f)| (n, f.map(|f| f.to_vec())))
            } else {
                dec.feed(rest).map(|(n, f)| (n, f.map(|f| f.to_vec())))
            };
            match fed {
                Ok((n, f)) => {
                    assert!(n > 0 || f.is_some(), "feed made no progress on {} bytes", rest.len());
                    assert!(n <= rest.len(), "feed used {n} of {} bytes", rest.len());
                    if let Some(f) = f {
                        assert!(
                            f.len() <= cap,
                            "frame of {} bytes from a decoder of capacity {cap}",
                            f.len()
                        );
                        out.frames.push(f);
                    }
                    out.consumed += n;
                    rest = &mut rest[n..];
                }
                Err(e) => {
                    if let FrameError::TooLong(n) = e {
                        assert!(n > cap as u64, "TooLong({n}) from a decoder of capacity {cap}");
                    }
                    // A failed decoder stays failed.
                    assert!(dec.feed(&[0]).is_err(), "decoder recovered after {e:?}");
                    out.error = Some(e);
                    return out;
                }
            }
        }
        at += size;
    }
    out.mid_frame = dec.is_mid_frame();
    out
}

/// The harness.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let cap = usize::from(input.u16()) % (MAX_SEALED + 1);
    let k = usize::from(input.byte().unwrap_or(0) & 15);
    let pieces: Vec<usize> = input.bytes(k).iter().map(|&b| usize::from(b) + 1).collect();
    let stream = input.rest();

    let whole = decode(stream, cap, &[]);
    let split = decode(stream, cap, &pieces);
    let bytewise = decode(stream, cap, &[1]);
    // (A failed feed does not say how much of its piece it read, so the
    // consumed counts are compared only without an error.)
    for (other, how) in [(&split, "the split"), (&bytewise, "one byte at a time")] {
        assert_eq!(whole.frames, other.frames, "frames depend on {how} ({pieces:?})");
        assert_eq!(whole.error, other.error, "the error depends on {how} ({pieces:?})");
        if whole.error.is_none() {
            assert_eq!(other.consumed, stream.len());
            assert_eq!(whole.mid_frame, other.mid_frame, "mid-frame state depends on {how}");
        }
    }

    // Re-framed with canonical headers, the frames come back unchanged.
    let mut again = Vec::new();
    for f in &whole.frames {
        put_varint(&mut again, f.len() as u64);
        again.extend_from_slice(f);
    }
    let re = decode(&again, cap, &pieces);
    assert_eq!(re.frames, whole.frames, "re-framed frames differ");
    assert_eq!(re.error, None);
    assert!(!re.mid_frame);

    // Frames that hold a message survive frame::encode and a decoder again.
    let mut buf = vec![0u8; MAX_ENCODED];
    for f in &whole.frames {
        let Ok(m) = Message::decode(f) else { continue };
        let n = frame::encode(&m, &mut buf).expect("a decoded message encodes again");
        let back = decode(&buf[..n], MAX_SEALED, &pieces);
        assert_eq!(back.frames.len(), 1, "frame::encode gave {:?}", back);
        assert_eq!(Message::decode(&back.frames[0]), Ok(m));
    }
}
