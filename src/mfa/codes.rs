//! Codes people type: the 6-digit login code sent by mail, and recovery codes.
//!
//! A login code has only 10^6 values, so a plain hash of it is as good as the code to
//! whoever reads the database. It is stored as HMAC under a key derived from the server
//! secret ([`OtpKey`]) and bound to its challenge, so a leaked row is useless without the
//! secret and cannot be replayed against another challenge.
//!
//! Recovery codes (ten characters of a 31-letter alphabet, about 49.5 bits) are stored the
//! same way, keyed and bound to their account: a bare SHA-256 of 49.5 bits could be
//! brute-forced from a stolen database in about a GPU-day.

use aws_lc_rs::{constant_time::verify_slices_are_equal, hmac};

/// Digits in an emailed login code.
pub const EMAIL_CODE_DIGITS: usize = 6;
/// Characters of a recovery code, without the hyphen.
pub const RECOVERY_CODE_LEN: usize = 10;
/// Lowercase letters and digits without the ones people confuse: 0/o, 1/l/i.
const RECOVERY_ALPHABET: &[u8; 31] = b"23456789abcdefghjkmnpqrstuvwxyz";

/// Keys the hashes of emailed login codes. Its `Debug` does not show the key.
pub struct OtpKey(hmac::Key);

impl OtpKey {
    /// The key for `label` (a purpose and version, e.g. "portcullis email otp v1"):
    /// derived from the server secret with HKDF, so each purpose gets its own key.
    pub fn derive(server_secret: &[u8], label: &str) -> OtpKey {
        OtpKey(hmac::Key::new(hmac::HMAC_SHA256, &derive_key(server_secret, label)))
    }

    /// What to store for `code` sent for `challenge_id`: HMAC(key, challenge_id || code).
    /// Codes have a fixed length, so the concatenation is unambiguous.
    pub fn hash_code(&self, challenge_id: &[u8], code: &str) -> Vec<u8> {
        let mut context = hmac::Context::with_key(&self.0);
        context.update(challenge_id);
        context.update(code.as_bytes());
        context.sign().as_ref().to_vec()
    }

    /// Whether `code` (surrounding whitespace aside) is the one hashed as `stored_hash` for
    /// `challenge_id`; anything but six ASCII digits is refused unhashed. Constant time.
    pub fn verify_code(&self, challenge_id: &[u8], code: &str, stored_hash: &[u8]) -> bool {
        let code = code.trim();
        if code.len() != EMAIL_CODE_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        verify_slices_are_equal(&self.hash_code(challenge_id, code), stored_hash).is_ok()
    }
}

impl std::fmt::Debug for OtpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtpKey(..)")
    }
}

/// 32 bytes of key for one purpose: HKDF-SHA-256 (RFC 5869) of the server secret, with a
/// fixed salt and the purpose's label as info. Not a bare HMAC(secret, label): the password
/// pre-hash is HMAC(secret, password), and a password equal to a label must not be a key.
pub(super) fn derive_key(server_secret: &[u8], label: &str) -> [u8; 32] {
    let salt = aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, b"portcullis key derivation v1");
    let info = [label.as_bytes()];
    let mut key = [0u8; 32];
    salt.extract(server_secret)
        .expand(&info, aws_lc_rs::hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut key))
        .expect("32 bytes is a valid HKDF-SHA-256 output length");
    key
}

/// A new login code: six digits, each of the 10^6 equally likely.
pub fn generate_email_code() -> String {
    const MODULUS: u32 = 10u32.pow(EMAIL_CODE_DIGITS as u32);
    // The largest multiple of the modulus a u32 holds: values from it up would make the
    // low codes likelier, so they are drawn again (about one time in 4,300).
    const LIMIT: u32 = u32::MAX - u32::MAX % MODULUS;
    loop {
        let mut bytes = [0u8; 4];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random source failed");
        let value = u32::from_be_bytes(bytes);
        if value < LIMIT {
            return format!("{:0width$}", value % MODULUS, width = EMAIL_CODE_DIGITS);
        }
    }
}

/// `n` new recovery codes, shown as `xxxxx-xxxxx`.
pub fn generate_recovery_codes(n: usize) -> Vec<String> {
    (0..n).map(|_| generate_recovery_code()).collect()
}

fn generate_recovery_code() -> String {
    // 248 = 8 × 31: bytes from it up would favour the first letters, so they are skipped.
    const LIMIT: u8 = (256 / RECOVERY_ALPHABET.len() * RECOVERY_ALPHABET.len()) as u8;
    let mut chars = Vec::with_capacity(RECOVERY_CODE_LEN);
    while chars.len() < RECOVERY_CODE_LEN {
        let mut bytes = [0u8; 16];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random source failed");
        chars.extend(
            bytes
                .iter()
                .filter(|&&b| b < LIMIT)
                .map(|&b| char::from(RECOVERY_ALPHABET[usize::from(b) % RECOVERY_ALPHABET.len()])),
        );
    }
    chars.truncate(RECOVERY_CODE_LEN);
    let (head, tail) = chars.split_at(RECOVERY_CODE_LEN / 2);
    format!("{}-{}", head.iter().collect::<String>(), tail.iter().collect::<String>())
}

/// The canonical form of a typed recovery code (lowercase, no spaces or hyphens), or `None`
/// when it cannot be one: so a 6-digit TOTP code is never taken for a recovery code.
pub fn normalize_recovery_code(input: &str) -> Option<String> {
    let normalized: String =
        input.chars().filter(|c| !c.is_whitespace() && *c != '-').map(|c| c.to_ascii_lowercase()).collect();
    let valid =
        normalized.len() == RECOVERY_CODE_LEN && normalized.bytes().all(|b| RECOVERY_ALPHABET.contains(&b));
    valid.then_some(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [9; 32];

    #[test]
    fn keys_differ_by_label_and_secret() {
        let a = OtpKey::derive(&SECRET, "portcullis email otp v1");
        let b = OtpKey::derive(&SECRET, "portcullis email otp v2");
        let c = OtpKey::derive(&[8; 32], "portcullis email otp v1");
        let hash = a.hash_code(b"challenge", "123456");
        assert_eq!(hash.len(), 32);
        assert_eq!(
            OtpKey::derive(&SECRET, "portcullis email otp v1").hash_code(b"challenge", "123456"),
            hash
        );
        assert_ne!(b.hash_code(b"challenge", "123456"), hash);
        assert_ne!(c.hash_code(b"challenge", "123456"), hash);
        assert_eq!(format!("{a:?}"), "OtpKey(..)");
    }

    #[test]
    fn codes_verify_only_for_their_challenge() {
        let key = OtpKey::derive(&SECRET, "test");
        let code = generate_email_code();
        let stored = key.hash_code(b"challenge-1", &code);
        assert!(key.verify_code(b"challenge-1", &code, &stored));
        assert!(key.verify_code(b"challenge-1", &format!("  {code}\n"), &stored));
        assert!(!key.verify_code(b"challenge-2", &code, &stored));
        let other = format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000);
        assert!(!key.verify_code(b"challenge-1", &other, &stored));
        assert!(!key.verify_code(b"challenge-1", &code, &stored[..31]));
        assert!(!key.verify_code(b"challenge-1", &code, &[]));
    }

    #[test]
    fn only_six_ascii_digits_are_checked() {
        let key = OtpKey::derive(&SECRET, "test");
        for odd in ["12345", "1234567", "12345a", "123 456", "+12345", "１２３４５６", ""] {
            // Even a hash made of the odd input itself must not let it through.
            assert!(!key.verify_code(b"c", odd, &key.hash_code(b"c", odd)), "{odd:?}");
        }
    }

    #[test]
    fn email_codes_are_six_digits_and_spread() {
        let codes: Vec<String> = (0..2000).map(|_| generate_email_code()).collect();
        assert!(codes.iter().all(|c| c.len() == 6 && c.bytes().all(|b| b.is_ascii_digit())));
        let distinct: std::collections::HashSet<_> = codes.iter().collect();
        assert!(distinct.len() > 1990, "{} distinct of 2000", distinct.len());
        // Every leading digit shows up (each is expected 200 times).
        for digit in b'0'..=b'9' {
            assert!(
                codes.iter().any(|c| c.as_bytes()[0] == digit),
                "no code starts with {}",
                char::from(digit)
            );
        }
    }

    #[test]
    fn recovery_codes_are_well_formed_and_normalize() {
        let codes = generate_recovery_codes(10);
        assert_eq!(codes.len(), 10);
        let distinct: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(distinct.len(), 10);
        for code in &codes {
            assert_eq!(code.len(), 11, "{code}");
            assert_eq!(&code[5..6], "-");
            let normalized = normalize_recovery_code(code).unwrap();
            assert_eq!(normalized, code.replace('-', ""));
            assert_eq!(normalize_recovery_code(&code.to_uppercase()).as_deref(), Some(&*normalized));
            let spaced = format!(" {} {} ", &normalized[..5], &normalized[5..]);
            assert_eq!(normalize_recovery_code(&spaced).as_deref(), Some(&*normalized));
        }
        assert!(generate_recovery_codes(0).is_empty());
    }

    #[test]
    fn the_alphabet_has_no_confusable_characters_and_enough_entropy() {
        for c in b"01ilo" {
            assert!(!RECOVERY_ALPHABET.contains(c), "{}", char::from(*c));
        }
        let distinct: std::collections::HashSet<_> = RECOVERY_ALPHABET.iter().collect();
        assert_eq!(distinct.len(), RECOVERY_ALPHABET.len());
        let bits = RECOVERY_CODE_LEN as f64 * (RECOVERY_ALPHABET.len() as f64).log2();
        assert!(bits > 49.5, "{bits} bits");
        let all: String = generate_recovery_codes(200).concat();
        assert!(RECOVERY_ALPHABET.iter().all(|c| all.as_bytes().contains(c)), "every character is used");
    }

    #[test]
    fn what_cannot_be_a_recovery_code_is_refused() {
        for input in ["", "123456", "abcde-fghj", "abcde-fghjkm", "abcde-fghj0", "abcde-fghjo", "abcdé-fghjk"]
        {
            assert_eq!(normalize_recovery_code(input), None, "{input:?}");
        }
        assert_eq!(normalize_recovery_code("ABCDE-FGHJK").as_deref(), Some("abcdefghjk"));
    }
}
