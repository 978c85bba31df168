//! Noise's two AEAD cipher functions over `ring`'s assembly
//! implementations (hosts only: the `ring` feature). Same protocol, same
//! bytes as clatter's RustCrypto ciphers (the published Noise vectors pass
//! through these, and a property test checks them against clatter's byte for
//! byte); several times the speed on CPUs with AES, carry-less
//! multiply and wide vector instructions (BENCHMARKS.md §11).
//!
//! Noise fixes what each cipher function is (specification, section 5):
//! the 96-bit nonce is 32 zero bits then the 64-bit counter, little-endian
//! for ChaChaPoly and big-endian for AESGCM; the tag is 16 bytes, appended.
//! Only that framing is here; the ciphers are `ring`'s.
//!
//! clatter's cipher interface hands over the key's bytes on every call, so
//! each frame builds ring's key (the AES key schedule) anew: under a
//! microsecond against the 12 us a full frame takes. ring does not zero
//! what it built when it is dropped (clatter's RustCrypto ChaCha did); the
//! session keys themselves stay in clatter's zeroized arrays.

use clatter::bytearray::SensitiveByteArray;
use clatter::error::{CipherError, CipherResult};
use clatter::traits::{Cipher, CryptoComponent};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey};

use crate::channel::TAG_LEN as TAG;

/// One of ring's AEADs with Noise's nonce layout.
trait Algorithm {
    const NAME: &'static str;
    fn algorithm() -> &'static ring::aead::Algorithm;
    fn nonce(n: u64) -> [u8; 8];
}

fn key<A: Algorithm>(k: &[u8; 32]) -> CipherResult<LessSafeKey> {
    UnboundKey::new(A::algorithm(), k).map(LessSafeKey::new).map_err(|_| CipherError::MissingKeyMaterial)
}

fn nonce<A: Algorithm>(n: u64) -> Nonce {
    let mut full = [0u8; 12];
    full[4..].copy_from_slice(&A::nonce(n));
    Nonce::assume_unique_for_key(full)
}

fn seal<A: Algorithm>(k: &[u8; 32], n: u64, ad: &[u8], in_out: &mut [u8], len: usize) -> CipherResult<usize> {
    assert!(len.checked_add(TAG).is_some_and(|l| l <= in_out.len()));
    let (text, rest) = in_out.split_at_mut(len);
    let tag = key::<A>(k)?
        .seal_in_place_separate_tag(nonce::<A>(n), Aad::from(ad), text)
        .map_err(|_| CipherError::Encrypt)?;
    rest[..TAG].copy_from_slice(tag.as_ref());
    Ok(len + TAG)
}

/// Opens `text` in place, authenticated by `tag`. On failure `text` holds
/// no plaintext callers may use (they drop it).
fn open<A: Algorithm>(k: &[u8; 32], n: u64, ad: &[u8], text: &mut [u8], tag: &[u8]) -> CipherResult<()> {
    let tag = Tag::try_from(tag).map_err(|_| CipherError::Decrypt)?;
    key::<A>(k)?
        .open_in_place_separate_tag(nonce::<A>(n), Aad::from(ad), tag, text, 0..)
        .map_err(|_| CipherError::Decrypt)?;
    Ok(())
}

/// Implements clatter's `Cipher` for a marker type over [`Algorithm`].
macro_rules! noise_cipher {
    ($ty:ident) => {
        impl CryptoComponent for $ty {
            fn name() -> &'static str {
                <$ty as Algorithm>::NAME
            }
        }

        impl Cipher for $ty {
            type Key = SensitiveByteArray<[u8; 32]>;

            fn tag_len() -> usize {
                TAG
            }

            fn encrypt(
                k: &Self::Key,
                n: u64,
                ad: &[u8],
                plaintext: &[u8],
                out: &mut [u8],
            ) -> CipherResult<()> {
                assert!(plaintext.len().checked_add(TAG) == Some(out.len()));
                out[..plaintext.len()].copy_from_slice(plaintext);
                seal::<$ty>(k, n, ad, out, plaintext.len()).map(|_| ())
            }

            fn encrypt_in_place(
                k: &Self::Key,
                n: u64,
                ad: &[u8],
                in_out: &mut [u8],
                plaintext_len: usize,
            ) -> CipherResult<usize> {
                seal::<$ty>(k, n, ad, in_out, plaintext_len)
            }

            fn decrypt(
                k: &Self::Key,
                n: u64,
                ad: &[u8],
                ciphertext: &[u8],
                out: &mut [u8],
            ) -> CipherResult<()> {
                assert!(ciphertext.len().checked_sub(TAG) == Some(out.len()));
                let (body, tag) = ciphertext.split_at(out.len());
                out.copy_from_slice(body);
                open::<$ty>(k, n, ad, out, tag)
            }

            fn decrypt_in_place(
                k: &Self::Key,
                n: u64,
                ad: &[u8],
                in_out: &mut [u8],
                ciphertext_len: usize,
            ) -> CipherResult<usize> {
                assert!(ciphertext_len <= in_out.len());
                let text_len = ciphertext_len.checked_sub(TAG).ok_or(CipherError::Decrypt)?;
                let (text, tag) = in_out[..ciphertext_len].split_at_mut(text_len);
                open::<$ty>(k, n, ad, text, tag)?;
                Ok(text_len)
            }
        }
    };
}

/// Noise `AESGCM` (AES-256-GCM) through `ring`.
#[derive(Clone)]
pub struct RingAesGcm;

impl Algorithm for RingAesGcm {
    const NAME: &'static str = "AESGCM";
    fn algorithm() -> &'static ring::aead::Algorithm {
        &ring::aead::AES_256_GCM
    }
    fn nonce(n: u64) -> [u8; 8] {
        n.to_be_bytes()
    }
}

/// Noise `ChaChaPoly` (ChaCha20-Poly1305, RFC 8439) through `ring`.
#[derive(Clone)]
pub struct RingChaChaPoly;

impl Algorithm for RingChaChaPoly {
    const NAME: &'static str = "ChaChaPoly";
    fn algorithm() -> &'static ring::aead::Algorithm {
        &ring::aead::CHACHA20_POLY1305
    }
    fn nonce(n: u64) -> [u8; 8] {
        n.to_le_bytes()
    }
}

noise_cipher!(RingAesGcm);
noise_cipher!(RingChaChaPoly);

/// Whether this CPU runs AES-GCM faster than ChaCha20-Poly1305 in `ring`:
/// it has AES and carry-less multiply instructions.
#[cfg(feature = "std")]
pub fn aes_is_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clatter::bytearray::ByteArray;
    use clatter::crypto::cipher::{AesGcm, ChaChaPoly};
    use proptest::prelude::*;

    /// `Ring` (hosts) and `Theirs` (clatter's RustCrypto cipher of the same
    /// name: devices use its ChaCha) write the same bytes and open each
    /// other's; neither opens a frame with a bit changed, under another
    /// nonce or with other associated data; both rekey alike.
    fn agree<
        Ring: Cipher<Key = SensitiveByteArray<[u8; 32]>>,
        Theirs: Cipher<Key = SensitiveByteArray<[u8; 32]>>,
    >(
        key: [u8; 32],
        n: u64,
        ad: &[u8],
        text: &[u8],
        flip: usize,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(Ring::name(), Theirs::name());
        let k = SensitiveByteArray::<[u8; 32]>::from_slice(&key);
        // Sealed in place in a buffer with room to spare, and by copy.
        let mut ours = text.to_vec();
        ours.resize(text.len() + TAG + 7, 0);
        prop_assert_eq!(
            Ring::encrypt_in_place(&k, n, ad, &mut ours, text.len()).ok(),
            Some(text.len() + TAG)
        );
        ours.truncate(text.len() + TAG);
        let mut theirs = vec![0u8; text.len() + TAG];
        Theirs::encrypt(&k, n, ad, text, &mut theirs).unwrap();
        prop_assert_eq!(&ours, &theirs);

        let mut out = vec![0u8; text.len()];
        Ring::decrypt(&k, n, ad, &theirs, &mut out).unwrap();
        prop_assert_eq!(&out, text);
        let mut bad = ours.clone();
        bad[flip % ours.len()] ^= 1 << (n % 8);
        prop_assert!(Ring::decrypt(&k, n, ad, &bad, &mut out).is_err());
        prop_assert!(Ring::decrypt_in_place(&k, n, ad, &mut bad.clone(), bad.len()).is_err());
        prop_assert!(Theirs::decrypt_in_place(&k, n, ad, &mut bad.clone(), bad.len()).is_err());
        prop_assert!(Ring::decrypt_in_place(&k, n ^ 1, ad, &mut theirs.clone(), ours.len()).is_err());
        let other_ad = [ad, b"!"].concat();
        prop_assert!(Ring::decrypt_in_place(&k, n, &other_ad, &mut theirs.clone(), ours.len()).is_err());
        // Shorter than a tag: refused, not a panic.
        prop_assert!(Ring::decrypt_in_place(&k, n, ad, &mut theirs.clone(), flip % TAG).is_err());
        prop_assert_eq!(Theirs::decrypt_in_place(&k, n, ad, &mut ours, theirs.len()).ok(), Some(text.len()));
        prop_assert_eq!(&ours[..text.len()], text);

        prop_assert_eq!(&Ring::rekey(&k).unwrap()[..], &Theirs::rekey(&k).unwrap()[..]);
        Ok(())
    }

    proptest! {
        #[test]
        fn rings_ciphers_and_clatters_agree_byte_for_byte(
            key in any::<[u8; 32]>(),
            n in any::<u64>(),
            ad in proptest::collection::vec(any::<u8>(), 0..40),
            text in proptest::collection::vec(any::<u8>(), 0..3000),
            flip in any::<usize>(),
        ) {
            agree::<RingChaChaPoly, ChaChaPoly>(key, n, &ad, &text, flip)?;
            agree::<RingAesGcm, AesGcm>(key, n, &ad, &text, flip)?;
        }
    }
}
