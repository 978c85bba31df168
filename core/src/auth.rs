//! Mutual authentication over a pre-shared token.
//!
//! Each side sends a fresh 32-byte nonce; each proves it holds the token with
//! `HMAC-SHA256(token, role || client_nonce || server_nonce)`, the role label
//! keeping a proof from being reflected back. Proofs are checked in constant
//! time (`hmac`'s `verify_slice`). The nonces also seed the session's short-id
//! salt, so neither side alone chooses it.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Which side is proving itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The connecting side.
    Client,
    /// The listening side.
    Server,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Client => b"deltasync-v1 client",
            Role::Server => b"deltasync-v1 server",
        }
    }
}

fn mac(token: &[u8], role: Role, client_nonce: &[u8; 32], server_nonce: &[u8; 32]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(token).expect("HMAC takes any key length");
    m.update(role.label());
    m.update(client_nonce);
    m.update(server_nonce);
    m
}

/// The proof `role` sends for these nonces.
pub fn prove(token: &[u8], role: Role, client_nonce: &[u8; 32], server_nonce: &[u8; 32]) -> [u8; 32] {
    mac(token, role, client_nonce, server_nonce).finalize().into_bytes().into()
}

/// Checks, in constant time, a proof received from `role`.
pub fn verify(
    token: &[u8],
    role: Role,
    client_nonce: &[u8; 32],
    server_nonce: &[u8; 32],
    proof: &[u8; 32],
) -> bool {
    mac(token, role, client_nonce, server_nonce).verify_slice(proof).is_ok()
}

/// The short-id salt of a session with these nonces.
pub fn session_salt(client_nonce: &[u8; 32], server_nonce: &[u8; 32]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(b"deltasync-v1 salt");
    h.update(client_nonce);
    h.update(server_nonce);
    let d = h.finalize();
    let mut salt = [0u8; 8];
    salt.copy_from_slice(&d[..8]);
    salt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_token_role_and_nonces() {
        let (c, s) = ([1u8; 32], [2u8; 32]);
        let p = prove(b"secret", Role::Client, &c, &s);
        assert!(verify(b"secret", Role::Client, &c, &s, &p));
        assert!(!verify(b"wrong", Role::Client, &c, &s, &p));
        assert!(!verify(b"secret", Role::Server, &c, &s, &p), "no reflection");
        assert!(!verify(b"secret", Role::Client, &s, &c, &p));
    }

    #[test]
    fn matches_an_independent_hmac_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let out: [u8; 32] = m.finalize().into_bytes().into();
        assert_eq!(
            crate::Hash(out).to_hex().as_str(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
