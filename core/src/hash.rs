//! SHA-256 identifiers and the salted short ids used on the wire.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A SHA-256 digest: the id of a chunk, of a tree node, or of a whole file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Hash(pub [u8; 32]);

/// A 64-bit id derived from a [`Hash`] with a per-session salt.
///
/// Tree listings carry short ids instead of full hashes to keep metadata small.
/// A false match can only make the rebuilt file fail verification (which uses
/// full hashes), never pass it; the salt comes from both peers' handshake
/// nonces, so nobody can prepare colliding data in advance.
pub type ShortId = u64;

impl Hash {
    /// Stands for a whole-file hash its sender did not compute (an upload
    /// offer may leave it to the receiver, which hashes the file as it writes
    /// it and reports the result in `Done`). No SHA-256 input is known to give
    /// 32 zero bytes.
    pub const UNKNOWN: Hash = Hash([0; 32]);

    /// Whether this is a real hash rather than [`Hash::UNKNOWN`].
    pub fn is_known(&self) -> bool {
        *self != Hash::UNKNOWN
    }

    /// The SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Hash {
        Hash(Sha256::digest(data).into())
    }

    /// This hash's short id under `salt`.
    pub fn short(&self, salt: &[u8; 8]) -> ShortId {
        let mut h = Sha256::new();
        h.update(salt);
        h.update(self.0);
        let d = h.finalize();
        u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }

    /// Lower-case hexadecimal form.
    pub fn to_hex(&self) -> heapless::String<64> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = heapless::String::new();
        for b in self.0 {
            // Capacity is exactly 64, so these pushes cannot fail.
            let _ = s.push(HEX[(b >> 4) as usize] as char);
            let _ = s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }

    /// Parses 64 hexadecimal digits.
    pub fn from_hex(s: &str) -> Option<Hash> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            let hi = (b[2 * i] as char).to_digit(16)?;
            let lo = (b[2 * i + 1] as char).to_digit(16)?;
            *o = (hi * 16 + lo) as u8;
        }
        Some(Hash(out))
    }
}

impl core::fmt::Debug for Hash {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", &self.to_hex()[..12])
    }
}

impl core::fmt::Display for Hash {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The id of a piece of a file (see [`crate::message::Message::GetPieces`])
/// or of the bytes a [`crate::message::Message::GetSuffix`] names: the first
/// 8 bytes of SHA-256(salt ‖ bytes), little-endian.
pub fn piece_id(salt: &[u8; 8], bytes: &[u8]) -> ShortId {
    let mut h = PieceHasher::new(salt);
    h.update(bytes);
    h.finish()
}

/// [`piece_id`] over bytes given in parts.
#[derive(Clone)]
pub struct PieceHasher(Sha256);

impl PieceHasher {
    /// A hasher salted with `salt`.
    pub fn new(salt: &[u8; 8]) -> Self {
        let mut h = Sha256::new();
        h.update(salt);
        PieceHasher(h)
    }

    /// Takes the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The id of every byte given.
    pub fn finish(self) -> ShortId {
        let d = self.0.finalize();
        u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc_matches_the_standard_vector() {
        assert_eq!(
            Hash::of(b"abc").to_hex().as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let h = Hash::of(b"x");
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_eq!(Hash::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn short_ids_depend_on_the_salt() {
        let h = Hash::of(b"x");
        assert_ne!(h.short(&[0; 8]), h.short(&[1; 8]));
        assert_eq!(h.short(&[3; 8]), h.short(&[3; 8]));
    }
}
