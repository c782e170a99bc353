//! Refresh tokens: 32 random bytes, base64url, with a recognisable prefix (so secret
//! scanners and humans can tell what leaked). Only their SHA-256 is stored.

use aws_lc_rs::digest::{SHA256, digest};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

pub const PREFIX: &str = "pcrt_";

/// A new refresh token and the hash to store for it.
pub fn generate() -> (String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random source failed");
    let token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&token);
    (token, hash)
}

/// The stored form of a presented token.
pub fn hash(token: &str) -> Vec<u8> {
    digest(&SHA256, token.as_bytes()).as_ref().to_vec()
}

/// Whether the text could be one of ours at all (cheap check before touching storage).
pub fn looks_valid(token: &str) -> bool {
    token.len() == PREFIX.len() + 43
        && token.starts_with(PREFIX)
        && token[PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct_well_formed_and_hashed() {
        let (a, ha) = generate();
        let (b, hb) = generate();
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert!(looks_valid(&a));
        assert_eq!(hash(&a), ha);
        assert_eq!(ha.len(), 32);
        assert!(!looks_valid("pcrt_short"));
        assert!(!looks_valid(&a.replace(PREFIX, "xxxx_")));
    }
}
