//! TOTP (RFC 6238): HMAC-SHA1, 6 digits, 30-second steps, the only parameters every
//! authenticator app honours (many ignore `algorithm`, `digits` and `period` in the URI).
//!
//! [`verify`] answers with the time step the code belongs to rather than a yes/no: a code
//! stays valid for its whole step (and the skew window around it), so the caller keeps the
//! last step used and refuses any step not after it, which makes each code work once.

use std::fmt;

use aws_lc_rs::{constant_time::verify_slices_are_equal, hmac};

/// Digits in a code.
pub const DIGITS: usize = 6;
/// Seconds per time step.
pub const STEP_SECS: u64 = 30;
/// Length of a secret: the output size of SHA-1, as RFC 4226 recommends.
pub const SECRET_LEN: usize = 20;
/// The widest skew [`verify`] accepts, whatever it is asked for: every step in the window
/// is one more code an attacker may hit.
pub const MAX_SKEW_STEPS: u64 = 10;

/// 10^DIGITS.
const MODULUS: u32 = 10u32.pow(DIGITS as u32);
/// RFC 4648 base32 alphabet.
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The shared secret of an authenticator app. Its `Debug` does not show it.
#[derive(Clone)]
pub struct TotpSecret([u8; SECRET_LEN]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TotpSecretError {
    #[error("a TOTP secret is {SECRET_LEN} bytes, not {0}")]
    Length(usize),
    #[error("a TOTP secret is RFC 4648 base32")]
    Base32,
}

impl TotpSecret {
    /// A new random secret.
    pub fn generate() -> TotpSecret {
        let mut bytes = [0u8; SECRET_LEN];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random source failed");
        TotpSecret(bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<TotpSecret, TotpSecretError> {
        let bytes = bytes.try_into().map_err(|_| TotpSecretError::Length(bytes.len()))?;
        Ok(TotpSecret(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The secret as shown to people and put in `otpauth` URIs: base32, uppercase, unpadded.
    pub fn to_base32(&self) -> String {
        base32_encode(&self.0)
    }

    /// Reads a secret as typed or copied: case, spaces and `=` padding do not matter.
    pub fn parse_base32(text: &str) -> Result<TotpSecret, TotpSecretError> {
        let cleaned: String = text.chars().filter(|c| *c != ' ' && *c != '=').collect();
        let bytes = base32_decode(&cleaned).ok_or(TotpSecretError::Base32)?;
        TotpSecret::from_bytes(&bytes)
    }
}

impl fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TotpSecret(..)")
    }
}

/// The enrolment URI authenticator apps read from a QR code (Google's Key URI format).
/// The label is `issuer:account`, and the issuer is repeated as a parameter, which newer
/// apps prefer.
pub fn otpauth_uri(secret: &TotpSecret, issuer: &str, account: &str) -> String {
    let (issuer, account, secret) = (percent_encode(issuer), percent_encode(account), secret.to_base32());
    format!(
        "otpauth://totp/{issuer}:{account}?secret={secret}&issuer={issuer}\
         &algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}"
    )
}

/// The time step `unix_secs` falls in.
pub fn step_at(unix_secs: u64) -> u64 {
    unix_secs / STEP_SECS
}

/// The code for a time step (RFC 4226 HOTP with the step as counter), zero-padded.
pub fn code_at(secret: &TotpSecret, step: u64) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &secret.0);
    let mac = hmac::sign(&key, &step.to_be_bytes());
    let mac = mac.as_ref();
    // Dynamic truncation: the low nibble of the last byte picks 4 bytes, top bit dropped.
    let offset = usize::from(mac[mac.len() - 1] & 0x0f);
    let word = u32::from_be_bytes([mac[offset], mac[offset + 1], mac[offset + 2], mac[offset + 3]]);
    format!("{:0width$}", (word & 0x7fff_ffff) % MODULUS, width = DIGITS)
}

/// The step within `skew_steps` of now (capped at [`MAX_SKEW_STEPS`]) whose code is `code`,
/// preferring the current step, then the nearer ones, earlier before later. `None` for a
/// wrong code or anything but exactly six ASCII digits (surrounding whitespace aside).
///
/// Every step in the window is computed and compared in constant time, whichever matches,
/// so the time taken says nothing about the code. The caller must refuse a step not after
/// the last one it accepted: this function knows nothing of replays.
pub fn verify(secret: &TotpSecret, code: &str, now_unix: u64, skew_steps: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_at(now_unix);
    let skew = skew_steps.min(MAX_SKEW_STEPS);
    let candidates = std::iter::once(Some(now))
        .chain((1..=skew).flat_map(|distance| [now.checked_sub(distance), now.checked_add(distance)]));
    let mut matched = None;
    for step in candidates.flatten() {
        let equal = verify_slices_are_equal(code_at(secret, step).as_bytes(), code.as_bytes()).is_ok();
        if equal && matched.is_none() {
            matched = Some(step);
        }
    }
    matched
}

fn base32_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(BASE32[((buffer >> bits) & 0x1f) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(BASE32[((buffer << (5 - bits)) & 0x1f) as usize]));
    }
    out
}

/// Unpadded base32, either case. `None` for a character outside the alphabet, a length no
/// encoding has, or non-zero leftover bits (so each byte string has exactly one spelling).
fn base32_decode(text: &str) -> Option<Vec<u8>> {
    if matches!(text.len() % 8, 1 | 3 | 6) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let value = match c.to_ascii_uppercase() {
            c @ b'A'..=b'Z' => c - b'A',
            c @ b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        buffer = (buffer << 5) | u32::from(value);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
        buffer &= (1 << bits) - 1;
    }
    (buffer == 0).then_some(out)
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc_secret() -> TotpSecret {
        TotpSecret::from_bytes(b"12345678901234567890").unwrap()
    }

    /// RFC 6238 Appendix B, SHA1 column, cut to the last six of the eight digits.
    const RFC_VECTORS: [(u64, &str); 6] = [
        (59, "287082"),
        (1111111109, "081804"),
        (1111111111, "050471"),
        (1234567890, "005924"),
        (2000000000, "279037"),
        (20000000000, "353130"),
    ];

    #[test]
    fn rfc_6238_vectors() {
        let secret = rfc_secret();
        for (time, code) in RFC_VECTORS {
            assert_eq!(code_at(&secret, step_at(time)), code, "T = {time}");
            assert_eq!(verify(&secret, code, time, 0), Some(step_at(time)), "T = {time}");
        }
    }

    #[test]
    fn base32_round_trips_and_matches_rfc_4648() {
        let secret = rfc_secret();
        assert_eq!(secret.to_base32(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        let parsed = TotpSecret::parse_base32("gezd gnbv gy3t qojq gezd gnbv gy3t qojq").unwrap();
        assert_eq!(parsed.as_bytes(), secret.as_bytes());
        // RFC 4648 section 10, without padding.
        for (plain, encoded) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
        ] {
            assert_eq!(base32_encode(plain.as_bytes()), encoded);
            assert_eq!(base32_decode(encoded).unwrap(), plain.as_bytes());
        }
        for _ in 0..20 {
            let secret = TotpSecret::generate();
            let parsed = TotpSecret::parse_base32(&secret.to_base32()).unwrap();
            assert_eq!(parsed.as_bytes(), secret.as_bytes());
        }
    }

    #[test]
    fn bad_base32_and_lengths_are_refused() {
        assert_eq!(
            TotpSecret::parse_base32("GEZDGNBVGY3TQOJQ1EZDGNBVGY3TQOJQ").unwrap_err(),
            TotpSecretError::Base32
        );
        assert_eq!(TotpSecret::parse_base32("MZXW6YQ").unwrap_err(), TotpSecretError::Length(4));
        assert_eq!(base32_decode("MZXW6YR"), None, "non-zero leftover bits");
        assert_eq!(base32_decode("M"), None);
        assert_eq!(TotpSecret::from_bytes(&[0; 19]).unwrap_err(), TotpSecretError::Length(19));
        assert_eq!(format!("{:?}", rfc_secret()), "TotpSecret(..)");
    }

    #[test]
    fn otpauth_uri_encodes_the_label_and_issuer() {
        let uri = otpauth_uri(&rfc_secret(), "Acme Corp", "ada@example.com");
        assert_eq!(
            uri,
            "otpauth://totp/Acme%20Corp:ada%40example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=Acme%20Corp&algorithm=SHA1&digits=6&period=30"
        );
        assert_eq!(percent_encode("a:b/é?&=~._-"), "a%3Ab%2F%C3%A9%3F%26%3D~._-");
    }

    #[test]
    fn verify_accepts_the_skew_window_and_reports_the_step() {
        let secret = TotpSecret::generate();
        let now = 1_700_000_015;
        let step = step_at(now);
        assert_eq!(verify(&secret, &code_at(&secret, step), now, 1), Some(step));
        assert_eq!(verify(&secret, &code_at(&secret, step - 1), now, 1), Some(step - 1));
        assert_eq!(verify(&secret, &code_at(&secret, step + 1), now, 1), Some(step + 1));
        assert_eq!(verify(&secret, &format!(" {} ", code_at(&secret, step)), now, 0), Some(step));
        for outside in [step - 2, step + 2] {
            let code = code_at(&secret, outside);
            // A random secret's codes may collide across steps; skip the rare such case.
            if code != code_at(&secret, step)
                && code != code_at(&secret, step - 1)
                && code != code_at(&secret, step + 1)
            {
                assert_eq!(verify(&secret, &code, now, 1), None);
            }
        }
        assert_eq!(verify(&secret, &code_at(&secret, step - 1), now, 0), None);
    }

    #[test]
    fn verify_prefers_the_exact_step_then_earlier() {
        // Steps of the RFC secret whose codes collide (found by search with totp.py).
        let secret = rfc_secret();
        assert_eq!(code_at(&secret, 153_567), "468457");
        assert_eq!(code_at(&secret, 153_569), "468457");
        assert_eq!(code_at(&secret, 910_737), "911617");
        assert_eq!(code_at(&secret, 910_738), "911617");
        let at = |step: u64| step * STEP_SECS + 7;
        assert_eq!(verify(&secret, "468457", at(153_568), 1), Some(153_567), "earlier before later");
        assert_eq!(verify(&secret, "468457", at(153_569), 2), Some(153_569), "exact before earlier");
        assert_eq!(verify(&secret, "468457", at(153_567), 2), Some(153_567), "exact before later");
        assert_eq!(verify(&secret, "911617", at(910_738), 1), Some(910_738));
        assert_eq!(verify(&secret, "911617", at(910_737), 1), Some(910_737));
        // Step 0 has no earlier neighbour: the window clips at zero instead of wrapping.
        assert_eq!(verify(&secret, &code_at(&secret, 0), 10, 2), Some(0));
        assert_eq!(verify(&secret, &code_at(&secret, 2), 10, 2), Some(2));
    }

    #[test]
    fn verify_refuses_anything_but_six_digits() {
        let secret = rfc_secret();
        for code in ["", "28708", "2870820", "28708a", "+28708", "２８７０８２", "287 082", "-87082"] {
            assert_eq!(verify(&secret, code, 59, 1), None, "{code:?}");
        }
        assert_eq!(verify(&secret, "287082", 59, u64::MAX), Some(1), "a huge skew is capped, not looped");
    }

    /// Checks against tests/support/totp.py, the independent implementation integration
    /// tests use as the authenticator app.
    #[test]
    fn the_python_authenticator_agrees() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/totp.py");
        let run = |args: &[&str]| std::process::Command::new("python3").arg(script).args(args).output();
        if let Err(e) = run(&["--help"]) {
            println!("SKIPPED: cannot run python3 ({e})");
            return;
        }
        let secrets = [rfc_secret(), TotpSecret::generate(), TotpSecret::generate()];
        for secret in &secrets {
            let base32 = secret.to_base32();
            for time in [0, 59, 1_111_111_109, 1_234_567_890, 1_700_000_000, 20_000_000_000] {
                let out = run(&[&base32, &time.to_string()]).unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), code_at(secret, step_at(time)));
            }
            let out = run(&["--step", "123456", &base32.to_lowercase()]).unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), code_at(secret, 123_456));
        }
    }
}
