//! Opaque secrets handed to users (refresh tokens, links in mails): 32 random bytes,
//! base64url, behind a prefix that says what they are (so secret scanners and humans can
//! tell what leaked). Only their SHA-256 is ever stored.

use aws_lc_rs::digest::{SHA256, digest};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

/// Length of the encoded random part.
const ENCODED_LEN: usize = 43;

/// A new token with `prefix`, and the hash to store for it.
pub fn generate(prefix: &str) -> (String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random source failed");
    let token = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&token);
    (token, hash)
}

/// The stored form of a presented token.
pub fn hash(token: &str) -> Vec<u8> {
    digest(&SHA256, token.as_bytes()).as_ref().to_vec()
}

/// Whether the text could be a token with `prefix` at all (cheap check before storage).
pub fn looks_valid(token: &str, prefix: &str) -> bool {
    token.len() == prefix.len() + ENCODED_LEN
        && token.starts_with(prefix)
        && token[prefix.len()..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct_well_formed_and_hashed() {
        let (a, ha) = generate("pct_");
        let (b, hb) = generate("pct_");
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert!(looks_valid(&a, "pct_"));
        assert!(!looks_valid(&a, "pcx_"));
        assert_eq!(hash(&a), ha);
        assert_eq!(ha.len(), 32);
        assert!(!looks_valid("pct_short", "pct_"));
        assert!(!looks_valid(&format!("{a}!"), "pct_"));
    }
}
