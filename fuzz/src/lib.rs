//! Fuzz harnesses for deltasync-core, one module per libFuzzer target.
//!
//! Each module's `run(data)` is what its target in `fuzz_targets/` calls; it
//! panics only on a bug in core (a panic inside core, or a broken property
//! checked here). The harnesses use core's public API only. Their inputs are
//! small byte scripts read with [`Input`]; `seeds` (a test) writes valid
//! scripts into `corpus/`, and `cargo test --lib` here replays every corpus
//! and regression file through its harness.

pub mod frame_decoder;
pub mod message_decode;
pub mod receiver;
pub mod server_session;

#[cfg(test)]
mod seeds;

/// Reads a fuzz input front to back. Every read past the end yields `None`
/// (or a short slice), so any input is a valid script.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte.
    pub fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    /// The next `n` bytes, or fewer at the end.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A little-endian u16 (missing bytes read as zero).
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let s = self.bytes(2);
        b[..s.len()].copy_from_slice(s);
        u16::from_le_bytes(b)
    }

    /// A little-endian u32 (missing bytes read as zero).
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let s = self.bytes(4);
        b[..s.len()].copy_from_slice(s);
        u32::from_le_bytes(b)
    }

    /// A little-endian u64 (missing bytes read as zero).
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let s = self.bytes(8);
        b[..s.len()].copy_from_slice(s);
        u64::from_le_bytes(b)
    }

    /// 32 bytes (missing bytes read as zero).
    pub fn array32(&mut self) -> [u8; 32] {
        let mut b = [0u8; 32];
        let s = self.bytes(32);
        b[..s.len()].copy_from_slice(s);
        b
    }

    /// What is left, all of it.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}

/// Appends `v` as a LEB128 varint (the frame header format).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The payload of the frame `frame` holds (header stripped); `None` unless
/// it is exactly one well-formed frame.
pub fn frame_payload(frame: &[u8]) -> Option<&[u8]> {
    let mut v = 0u64;
    for (i, &b) in frame.iter().enumerate().take(3) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let rest = &frame[i + 1..];
            return (rest.len() as u64 == v).then_some(rest);
        }
    }
    None
}
