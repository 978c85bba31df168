//! The secure channel: the Noise protocol, pattern
//! `NNpsk0_25519_{ChaChaPoly,AESGCM}_SHA256`, through the `clatter` crate
//! (no_std, no allocator).
//!
//! ```text
//! NNpsk0:
//!   -> psk, e          (Hello: the key id in clear, then e and an encrypted payload)
//!   <- e, ee           (Accept)
//! ```
//! The 256-bit secret of the client's key is the PSK; the key id, the cipher
//! and the protocol version travel in clear (the server needs them to begin)
//! and are bound into the handshake as its prologue, so changing any of them
//! on the way fails the handshake. Every frame after the handshake is one
//! Noise transport message: ciphertext and a 16-byte tag, under Noise's
//! implicit nonce counters, so a frame altered, dropped, repeated or moved
//! fails to open.
//!
//! This module holds the cryptographic state only; [`crate::conn`] runs the
//! handshake and [`crate::driver::Pump`] seals and opens frames.

#[cfg(not(feature = "ring"))]
use clatter::crypto::cipher::ChaChaPoly;
use clatter::crypto::dh::X25519;
use clatter::crypto::hash::Sha256;
use clatter::handshakepattern::noise_nn_psk0;
use clatter::traits::{Dh, Handshaker};
use clatter::transportstate::TransportState;
use clatter::{KeyPair, NqHandshakeCore};
use serde::{Deserialize, Serialize};

#[cfg(feature = "ring")]
use crate::ringaead::{RingAesGcm as AesGcm, RingChaChaPoly as ChaChaPoly};

/// Bytes a sealed frame adds to its plaintext (the AEAD tag).
pub const TAG_LEN: usize = 16;
/// Largest Noise message (plaintext plus tag).
pub const MAX_MESSAGE: usize = 65_535;
/// Length of a key id.
pub const KEY_ID_LEN: usize = 8;
/// Length of a key's secret: 256 bits, the Noise PSK.
pub const SECRET_LEN: usize = 32;
/// Bytes the handshake adds around its payloads: `e` (32) plus a tag.
pub const HANDSHAKE_OVERHEAD: usize = 32 + TAG_LEN;

/// The AEAD cipher of a session, chosen by the client and named in its
/// `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CipherKind {
    /// ChaCha20-Poly1305: fast in software (devices, CPUs without AES).
    ChaChaPoly,
    /// AES-256-GCM: several times faster on CPUs with AES instructions.
    AesGcm,
}

impl CipherKind {
    /// Whether this build implements it (AES-GCM needs the `ring` feature:
    /// hosts have it, devices do not).
    pub fn supported(self) -> bool {
        match self {
            CipherKind::ChaChaPoly => true,
            CipherKind::AesGcm => cfg!(feature = "ring"),
        }
    }

    /// The cipher clients use unless told otherwise: AES-256-GCM where this
    /// build has `ring` and the CPU has AES and carry-less multiply
    /// instructions (there ring seals and opens it about four times as fast
    /// as ChaCha20-Poly1305: BENCHMARKS.md §11), ChaCha20-Poly1305
    /// elsewhere (devices, CPUs without AES instructions, where software AES
    /// is slow).
    pub fn preferred() -> CipherKind {
        #[cfg(all(feature = "ring", feature = "std"))]
        if crate::ringaead::aes_is_fast() {
            return CipherKind::AesGcm;
        }
        CipherKind::ChaChaPoly
    }

    /// Parses `chacha20-poly1305` or `aes-256-gcm`.
    pub fn from_name(name: &str) -> Option<CipherKind> {
        match name {
            "chacha20-poly1305" | "chacha" => Some(CipherKind::ChaChaPoly),
            "aes-256-gcm" | "aes-gcm" | "aes" => Some(CipherKind::AesGcm),
            _ => None,
        }
    }

    /// The Noise protocol name this cipher gives.
    pub fn protocol_name(self) -> &'static str {
        match self {
            CipherKind::ChaChaPoly => "Noise_NNpsk0_25519_ChaChaPoly_SHA256",
            CipherKind::AesGcm => "Noise_NNpsk0_25519_AESGCM_SHA256",
        }
    }
}

/// Why the channel failed. Nothing a failed frame carried is acted on.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// A handshake message or a frame did not authenticate: the peer holds
    /// another secret, or the bytes were changed, dropped, repeated or
    /// reordered on the way.
    Authentication,
    /// The cipher is not built into this side.
    Unsupported,
    /// A buffer was too small, or a message longer than Noise allows.
    Capacity,
    /// The handshake was used out of order.
    State,
}

impl core::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ChannelError::Authentication => "a message failed authentication",
            ChannelError::Unsupported => "cipher not supported",
            ChannelError::Capacity => "message too long for its buffer",
            ChannelError::State => "handshake used out of order",
        })
    }
}

impl core::error::Error for ChannelError {}

/// Never used: every handshake here is given its ephemeral key by the shell
/// (the state machines are sans-IO, so randomness comes in as input), and
/// clatter draws from its RNG only when it has none.
#[derive(Clone, Default)]
pub struct NoRng;

impl clatter::rand_core::RngCore for NoRng {
    fn next_u32(&mut self) -> u32 {
        unreachable!("ephemeral keys come from the shell")
    }
    fn next_u64(&mut self) -> u64 {
        unreachable!("ephemeral keys come from the shell")
    }
    fn fill_bytes(&mut self, _: &mut [u8]) {
        unreachable!("ephemeral keys come from the shell")
    }
    fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), clatter::rand_core::Error> {
        unreachable!("ephemeral keys come from the shell")
    }
}
impl clatter::rand_core::CryptoRng for NoRng {}

type Hs<C> = NqHandshakeCore<X25519, C, Sha256, NoRng>;

/// Applies the same expression to whichever cipher a value holds.
macro_rules! each_cipher {
    ($v:expr, $enum:ident, $x:ident => $body:expr) => {
        match $v {
            $enum::ChaCha($x) => $body,
            #[cfg(feature = "ring")]
            $enum::Aes($x) => $body,
        }
    };
}

#[allow(clippy::large_enum_variant)]
enum HsInner {
    ChaCha(Hs<ChaChaPoly>),
    #[cfg(feature = "ring")]
    Aes(Hs<AesGcm>),
}

/// A Noise handshake in progress (one side).
pub struct Handshake(HsInner);

impl Handshake {
    /// A handshake of the initiator (client) or responder (server) with
    /// this `cipher`, `prologue` (the clear part of the client's hello),
    /// `psk` (the key's secret) and `ephemeral` (32 fresh random bytes from
    /// the shell: the X25519 ephemeral private key).
    pub fn new(
        initiator: bool,
        cipher: CipherKind,
        prologue: &[u8],
        psk: &[u8; SECRET_LEN],
        ephemeral: [u8; 32],
    ) -> Result<Handshake, ChannelError> {
        fn make<C: clatter::traits::Cipher>(
            initiator: bool,
            prologue: &[u8],
            psk: &[u8; SECRET_LEN],
            ephemeral: [u8; 32],
        ) -> Result<Hs<C>, ChannelError> {
            use clatter::bytearray::ByteArray;
            let secret = <X25519 as Dh>::PrivateKey::from_slice(&ephemeral);
            let e = KeyPair::new(X25519::pubkey(&secret), secret);
            let mut hs = Hs::<C>::new(noise_nn_psk0(), prologue, initiator, None, Some(e), None, None)
                .map_err(|_| ChannelError::State)?;
            hs.push_psk(psk);
            Ok(hs)
        }
        Ok(Handshake(match cipher {
            CipherKind::ChaChaPoly => HsInner::ChaCha(make(initiator, prologue, psk, ephemeral)?),
            #[cfg(feature = "ring")]
            CipherKind::AesGcm => HsInner::Aes(make(initiator, prologue, psk, ephemeral)?),
            #[cfg(not(feature = "ring"))]
            CipherKind::AesGcm => return Err(ChannelError::Unsupported),
        }))
    }

    /// Writes the next handshake message carrying `payload` into `out`;
    /// returns its length.
    pub fn write(&mut self, payload: &[u8], out: &mut [u8]) -> Result<usize, ChannelError> {
        if payload.len() + HANDSHAKE_OVERHEAD > out.len().min(MAX_MESSAGE) {
            return Err(ChannelError::Capacity);
        }
        each_cipher!(&mut self.0, HsInner, h => h.write_message(payload, out))
            .map_err(|_| ChannelError::State)
    }

    /// Reads the peer's handshake message; writes its payload into `out` and
    /// returns the payload's length.
    pub fn read(&mut self, msg: &[u8], out: &mut [u8]) -> Result<usize, ChannelError> {
        if msg.len() > MAX_MESSAGE || msg.len() < HANDSHAKE_OVERHEAD {
            return Err(ChannelError::Authentication);
        }
        if out.len() < msg.len() - HANDSHAKE_OVERHEAD {
            return Err(ChannelError::Capacity);
        }
        each_cipher!(&mut self.0, HsInner, h => h.read_message(msg, out))
            .map_err(|_| ChannelError::Authentication)
    }

    /// The transport channel, once both messages have passed.
    pub fn finish(self) -> Result<Channel, ChannelError> {
        let inner = match self.0 {
            HsInner::ChaCha(h) => ChInner::ChaCha(h.finalize().map_err(|_| ChannelError::State)?),
            #[cfg(feature = "ring")]
            HsInner::Aes(h) => ChInner::Aes(h.finalize().map_err(|_| ChannelError::State)?),
        };
        Ok(Channel { inner, batched: false })
    }
}

#[allow(clippy::large_enum_variant)]
enum ChInner {
    ChaCha(TransportState<ChaChaPoly, Sha256>),
    #[cfg(feature = "ring")]
    Aes(TransportState<AesGcm, Sha256>),
}

/// An established channel: seals frames to the peer and opens the peer's.
pub struct Channel {
    inner: ChInner,
    batched: bool,
}

impl Channel {
    /// Encrypts `buf[..len]` in place and appends the tag; returns the
    /// sealed length (`len + TAG_LEN`).
    pub fn seal(&mut self, buf: &mut [u8], len: usize) -> Result<usize, ChannelError> {
        if len + TAG_LEN > buf.len().min(MAX_MESSAGE) {
            return Err(ChannelError::Capacity);
        }
        each_cipher!(&mut self.inner, ChInner, t => t.send_in_place(buf, len))
            .map_err(|_| ChannelError::Capacity)
    }

    /// Authenticates and decrypts the sealed frame `buf` in place; returns
    /// the plaintext's length. After a failure the channel is unusable (the
    /// peer's nonce no longer matches), and the session must end.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        let len = buf.len();
        if !(TAG_LEN..=MAX_MESSAGE).contains(&len) {
            return Err(ChannelError::Authentication);
        }
        each_cipher!(&mut self.inner, ChInner, t => t.receive_in_place(buf, len))
            .map_err(|_| ChannelError::Authentication)
    }

    /// Whether a sealed frame may carry several messages, one after another
    /// (both peers announced [`crate::message::CAP_BATCH`]; see
    /// [`crate::driver::Pump`]).
    pub fn batched(&self) -> bool {
        self.batched
    }

    /// Sets whether a sealed frame may carry several messages: both sides
    /// must agree, as they do on the capabilities they share.
    pub fn set_batched(&mut self, on: bool) {
        self.batched = on;
    }

    /// The handshake hash: a value both sides share and nobody else can
    /// choose, binding anything derived from it to this session.
    pub fn binding(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        each_cipher!(&self.inner, ChInner, t => out.copy_from_slice(t.get_handshake_hash().as_slice()));
        out
    }
}

/// A client's key: the id the server looks it up by, and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKey {
    /// Sent in clear in the hello.
    pub id: [u8; KEY_ID_LEN],
    /// The PSK; never leaves this side.
    pub secret: [u8; SECRET_LEN],
}

impl core::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ClientKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Why a key string was refused.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// Not of the form `dsk1-<16 hex digits>-<64 hex digits>`.
    Format,
    /// The secret is shorter than 256 bits (it has this many).
    Weak(usize),
}

impl core::fmt::Display for KeyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            KeyError::Format => f.write_str(
                "not a deltasync key (expected dsk1-<16 hex digits>-<64 hex digits>): \
                 make one with `deltasync-server key add NAME`",
            ),
            KeyError::Weak(bits) => write!(
                f,
                "the key's secret has {bits} bits, and a deltasync key needs 256 random bits \
                 (a shorter one can be guessed offline): make one with `deltasync-server key add NAME`"
            ),
        }
    }
}

impl core::error::Error for KeyError {}

/// Prefix of a key string (version 1 of the format).
pub const KEY_PREFIX: &str = "dsk1-";

impl ClientKey {
    /// Parses `dsk1-<id: 16 hex digits>-<secret: 64 hex digits>`.
    pub fn parse(s: &str) -> Result<ClientKey, KeyError> {
        let rest = s.trim().strip_prefix(KEY_PREFIX).ok_or(KeyError::Format)?;
        let (id_hex, secret_hex) = rest.split_once('-').ok_or(KeyError::Format)?;
        let mut id = [0u8; KEY_ID_LEN];
        hex::decode_to_slice(id_hex, &mut id).map_err(|_| KeyError::Format)?;
        if !secret_hex.bytes().all(|b| b.is_ascii_hexdigit()) || secret_hex.len() % 2 != 0 {
            return Err(KeyError::Format);
        }
        if secret_hex.len() < 2 * SECRET_LEN {
            return Err(KeyError::Weak(secret_hex.len() * 4));
        }
        let mut secret = [0u8; SECRET_LEN];
        hex::decode_to_slice(secret_hex, &mut secret).map_err(|_| KeyError::Format)?;
        Ok(ClientKey { id, secret })
    }

    /// The key string a user pastes into a client.
    pub fn encode(&self) -> heapless::String<{ KEY_PREFIX.len() + 2 * KEY_ID_LEN + 1 + 2 * SECRET_LEN }> {
        let mut s = heapless::String::new();
        let mut buf = [0u8; 2 * SECRET_LEN];
        // Capacity is exact, so the pushes cannot fail.
        let _ = s.push_str(KEY_PREFIX);
        let _ = hex::encode_to_slice(self.id, &mut buf[..2 * KEY_ID_LEN]);
        let _ = s.push_str(core::str::from_utf8(&buf[..2 * KEY_ID_LEN]).unwrap_or_default());
        let _ = s.push('-');
        let _ = hex::encode_to_slice(self.secret, &mut buf);
        let _ = s.push_str(core::str::from_utf8(&buf).unwrap_or_default());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(
        cipher: CipherKind,
        client_psk: [u8; 32],
        server_psk: [u8; 32],
    ) -> Result<(Channel, Channel), ChannelError> {
        let mut c = Handshake::new(true, cipher, b"p", &client_psk, [1; 32])?;
        let mut s = Handshake::new(false, cipher, b"p", &server_psk, [2; 32])?;
        let (mut m, mut p) = ([0u8; 200], [0u8; 200]);
        let n = c.write(b"hi", &mut m)?;
        assert_eq!(n, 2 + HANDSHAKE_OVERHEAD);
        let k = s.read(&m[..n], &mut p)?;
        assert_eq!(&p[..k], b"hi");
        let n = s.write(b"ok", &mut m)?;
        let k = c.read(&m[..n], &mut p)?;
        assert_eq!(&p[..k], b"ok");
        Ok((c.finish()?, s.finish()?))
    }

    #[test]
    fn both_ciphers_carry_frames_and_refuse_any_change() {
        for cipher in [CipherKind::ChaChaPoly, CipherKind::AesGcm] {
            let (mut c, mut s) = pair(cipher, [7; 32], [7; 32]).unwrap();
            assert_eq!(c.binding(), s.binding());
            let mut buf = [0u8; 64];
            buf[..5].copy_from_slice(b"hello");
            let n = c.seal(&mut buf, 5).unwrap();
            assert_eq!(n, 5 + TAG_LEN);
            assert_ne!(&buf[..5], b"hello");
            let mut bad = buf;
            bad[3] ^= 1;
            let mut s2 = pair(cipher, [7; 32], [7; 32]).unwrap().1;
            assert_eq!(s2.open(&mut bad[..n]), Err(ChannelError::Authentication));
            assert_eq!(s.open(&mut buf[..n]), Ok(5));
            assert_eq!(&buf[..5], b"hello");
            // The same frame again (a replay) no longer opens.
            let mut again = [0u8; 64];
            again[..5].copy_from_slice(b"hello");
            let _ = c.seal(&mut again, 5).unwrap();
            let mut replay = again;
            assert_eq!(s.open(&mut again[..n]), Ok(5));
            assert_eq!(s.open(&mut replay[..n]), Err(ChannelError::Authentication));
        }
    }

    #[test]
    fn a_different_secret_or_prologue_fails_the_handshake() {
        assert_eq!(pair(CipherKind::ChaChaPoly, [7; 32], [8; 32]).err(), Some(ChannelError::Authentication));
        let mut c = Handshake::new(true, CipherKind::ChaChaPoly, b"version 5", &[7; 32], [1; 32]).unwrap();
        let mut s = Handshake::new(false, CipherKind::ChaChaPoly, b"version 4", &[7; 32], [2; 32]).unwrap();
        let (mut m, mut p) = ([0u8; 200], [0u8; 200]);
        let n = c.write(&[], &mut m).unwrap();
        assert_eq!(s.read(&m[..n], &mut p), Err(ChannelError::Authentication));
    }

    /// The published Noise test vectors ("cacophony", as the snow and
    /// cacophony implementations carry them) for exactly the two protocols
    /// in use: the handshake messages, the handshake hash and four
    /// transport messages, byte for byte.
    #[test]
    fn the_published_noise_vectors_of_both_protocols_are_reproduced() {
        fn hex32(s: &str) -> [u8; 32] {
            let mut out = [0u8; 32];
            hex::decode_to_slice(s, &mut out).unwrap();
            out
        }
        fn bytes(s: &str) -> std::vec::Vec<u8> {
            (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
        }
        let prologue = bytes("4a6f686e2047616c74");
        let psk = hex32("54686973206973206d7920417573747269616e20706572737065637469766521");
        let e_i = hex32("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a");
        let e_r = hex32("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b");
        let payloads = [
            "4c756477696720766f6e204d69736573",
            "4d757272617920526f746862617264",
            "462e20412e20486179656b",
            "4361726c204d656e676572",
            "4a65616e2d426170746973746520536179",
            "457567656e2042f6686d20766f6e2042617765726b",
        ];
        let vectors = [
            (
                CipherKind::ChaChaPoly,
                "f4d03dc34495c95729ea6de9e1b59004b59733102488b3e24bc441e0be208eaf",
                [
                    "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c794479b962b8aff8485742ac32f905ba45369e2465fb59e138a93d67a0d1266b6a54",
                    "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843d6062704d5a9c422a8e834423f8c1feada7e8d0d910a1a2cd030fb584221e3",
                    "e632c3763d7669067383433197a3baddf146e9e70ad4b4e9e59e0f",
                    "64c6bee32ea91c8474bb4c21d7a700109ad45af77b29764ba5eb1e",
                    "e2fa0bed0603b62d3ccac2ecabbf3fe33f3e86514909b323361626266cb2471cc8",
                    "0c01dc9cec1fe4ddd692e8dd32188aa351088dc91183639a53b57aa4692b5ebdef8b8ca111",
                ],
            ),
            (
                CipherKind::AesGcm,
                "9f3b1f9afd7767767b5b9d1069844a6154fdbdcc36dfb3e31c0fffc5c973d530",
                [
                    "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79447c37a89fc17813788d30df2d59501d6066f5f8aecc3406bbd9829f2d24a531b1",
                    "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088432f29d79368ef9de4e1ae7a362fb05bf0ad668e026bf5714554497b3a720461",
                    "7c01e898a6201f36aecee532e29cd0b7f8ffa29d3366ad0dce39a6",
                    "a9ff535aace3db6a1da1a7fb00fe2de2622bb373abad9fb42c00e0",
                    "6cfc49a3e65472edc2d0152abe5ce950170a8a47c959f30bd48b5f0aacf29adbfd",
                    "9bc86e6d974ed21ba04604a94aa68de21677eb409ead070c0cd569b069ee19ba142aa4c1a9",
                ],
            ),
        ];
        for (cipher, hash, ciphertexts) in vectors {
            assert!(
                cipher.protocol_name().starts_with("Noise_NNpsk0_25519_")
                    && cipher.protocol_name().ends_with("_SHA256")
            );
            let mut i = Handshake::new(true, cipher, &prologue, &psk, e_i).unwrap();
            let mut r = Handshake::new(false, cipher, &prologue, &psk, e_r).unwrap();
            let (mut m, mut p) = ([0u8; 256], [0u8; 256]);
            let n = i.write(&bytes(payloads[0]), &mut m).unwrap();
            assert_eq!(m[..n], bytes(ciphertexts[0])[..], "{cipher:?} message 0");
            let k = r.read(&m[..n], &mut p).unwrap();
            assert_eq!(p[..k], bytes(payloads[0])[..]);
            let n = r.write(&bytes(payloads[1]), &mut m).unwrap();
            assert_eq!(m[..n], bytes(ciphertexts[1])[..], "{cipher:?} message 1");
            let k = i.read(&m[..n], &mut p).unwrap();
            assert_eq!(p[..k], bytes(payloads[1])[..]);
            let (mut i, mut r) = (i.finish().unwrap(), r.finish().unwrap());
            assert_eq!(i.binding(), hex32(hash), "{cipher:?} handshake hash");
            assert_eq!(r.binding(), hex32(hash));
            for k in 2..6 {
                let (tx, rx) = if k % 2 == 0 { (&mut i, &mut r) } else { (&mut r, &mut i) };
                let plain = bytes(payloads[k]);
                m[..plain.len()].copy_from_slice(&plain);
                let n = tx.seal(&mut m, plain.len()).unwrap();
                assert_eq!(m[..n], bytes(ciphertexts[k])[..], "{cipher:?} message {k}");
                assert_eq!(rx.open(&mut m[..n]), Ok(plain.len()));
                assert_eq!(m[..plain.len()], plain[..]);
            }
        }
    }

    #[test]
    fn key_strings_round_trip_and_weak_ones_are_refused() {
        let k = ClientKey { id: [0xab; 8], secret: [0x5c; 32] };
        let s = k.encode();
        assert_eq!(&s[..22], "dsk1-abababababababab-");
        assert_eq!(ClientKey::parse(&s), Ok(k));
        assert_eq!(ClientKey::parse("dsk1-abababababababab-0011"), Err(KeyError::Weak(16)));
        let short = "dsk1-abababababababab-00112233445566778899aabbccddeeff";
        assert_eq!(ClientKey::parse(short), Err(KeyError::Weak(128)));
        assert_eq!(ClientKey::parse("hunter2"), Err(KeyError::Format));
        assert_eq!(ClientKey::parse("dsk1-abab-zz"), Err(KeyError::Format));
    }
}
