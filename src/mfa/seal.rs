//! TOTP secrets at rest. The server needs them back to compute codes, so they cannot be
//! hashed: they are encrypted with AES-256-GCM under a key derived from the server secret.
//!
//! Sealed form: `0x01 || nonce (12 bytes) || ciphertext || tag (16 bytes)`, with the owner's
//! user id as associated data, so a sealed secret copied into another account's row does
//! not open. Nonces are random, which NIST SP 800-38D allows for up to 2^32 seals under one
//! key: a secret is sealed once per enrolment, so that bound is never near.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use super::codes::derive_key;

/// The first byte of a sealed secret: the format and algorithm above.
const VERSION: u8 = 1;
/// Length of the GCM tag.
const TAG_LEN: usize = 16;

/// Seals and opens TOTP secrets. Its `Debug` does not show the key.
pub struct SecretSealer(LessSafeKey);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Too short, or of a version this build does not know.
    #[error("sealed secret is malformed")]
    Malformed,
    /// Wrong key, wrong owner, or altered.
    #[error("sealed secret does not open: wrong key, wrong owner or altered")]
    Rejected,
}

impl SecretSealer {
    /// The sealer for `label` (a purpose and version, e.g. "portcullis totp secret v1"):
    /// its key is derived from the server secret with HKDF, as for [`super::OtpKey`].
    pub fn derive(server_secret: &[u8], label: &str) -> SecretSealer {
        let key = UnboundKey::new(&AES_256_GCM, &derive_key(server_secret, label))
            .expect("AES-256-GCM takes a 32-byte key");
        SecretSealer(LessSafeKey::new(key))
    }

    /// Encrypts `plaintext` for the user `user_id`.
    pub fn seal(&self, user_id: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("the system random source failed");
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
        sealed.push(VERSION);
        sealed.extend_from_slice(&nonce);
        let mut in_out = plaintext.to_vec();
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(user_id), &mut in_out)
            .expect("AES-GCM seals any secret-sized input");
        sealed.extend_from_slice(&in_out);
        sealed
    }

    /// Decrypts what [`seal`](Self::seal) made for the same `user_id`.
    pub fn open(&self, user_id: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (&version, rest) = sealed.split_first().ok_or(SealError::Malformed)?;
        if version != VERSION || rest.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::Malformed);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Malformed)?;
        let mut in_out = ciphertext.to_vec();
        let plaintext =
            self.0.open_in_place(nonce, Aad::from(user_id), &mut in_out).map_err(|_| SealError::Rejected)?;
        Ok(plaintext.to_vec())
    }
}

impl std::fmt::Debug for SecretSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretSealer(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [5; 32];
    const LABEL: &str = "portcullis totp secret v1";

    fn sealer() -> SecretSealer {
        SecretSealer::derive(&SECRET, LABEL)
    }

    #[test]
    fn round_trips_with_the_layout_described() {
        let sealed = sealer().seal(b"user-1", b"twenty bytes secret!");
        assert_eq!(sealed.len(), 1 + NONCE_LEN + 20 + TAG_LEN);
        assert_eq!(sealed[0], VERSION);
        assert!(!sealed.windows(20).any(|w| w == b"twenty bytes secret!"));
        // A sealer derived again (after a restart) opens it.
        assert_eq!(sealer().open(b"user-1", &sealed).unwrap(), b"twenty bytes secret!");
        assert_eq!(sealer().open(b"user-1", &sealer().seal(b"user-1", b"")).unwrap(), b"");
    }

    #[test]
    fn another_owner_or_key_cannot_open() {
        let sealed = sealer().seal(b"user-1", b"secret");
        assert_eq!(sealer().open(b"user-2", &sealed), Err(SealError::Rejected));
        assert_eq!(sealer().open(b"", &sealed), Err(SealError::Rejected));
        let other_label = SecretSealer::derive(&SECRET, "portcullis totp secret v2");
        assert_eq!(other_label.open(b"user-1", &sealed), Err(SealError::Rejected));
        let other_secret = SecretSealer::derive(&[6; 32], LABEL);
        assert_eq!(other_secret.open(b"user-1", &sealed), Err(SealError::Rejected));
    }

    #[test]
    fn any_altered_byte_is_caught() {
        let sealed = sealer().seal(b"user-1", b"secret");
        for i in 1..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 0x01;
            assert_eq!(sealer().open(b"user-1", &altered), Err(SealError::Rejected), "byte {i}");
        }
        let mut versioned = sealed.clone();
        versioned[0] = 2;
        assert_eq!(sealer().open(b"user-1", &versioned), Err(SealError::Malformed));
        assert_eq!(sealer().open(b"user-1", &sealed[..sealed.len() - 1]), Err(SealError::Rejected));
        for short in [&[][..], &[VERSION][..], &sealed[..1 + NONCE_LEN + TAG_LEN - 1]] {
            assert_eq!(sealer().open(b"user-1", short), Err(SealError::Malformed));
        }
    }

    #[test]
    fn each_seal_uses_a_fresh_nonce() {
        let a = sealer().seal(b"user-1", b"secret");
        let b = sealer().seal(b"user-1", b"secret");
        assert_ne!(a[1..1 + NONCE_LEN], b[1..1 + NONCE_LEN]);
        assert_ne!(a, b);
        assert_eq!(format!("{:?}", sealer()), "SecretSealer(..)");
    }
}
