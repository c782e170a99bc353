//! Second-factor primitives, without I/O: TOTP ([`totp`]), the codes people type
//! ([`codes`]) and the sealing of TOTP secrets at rest ([`seal`]). The flows that use them
//! are in `auth::mfa`.
//!
//! - Emailed login codes have only 10^6 values, so they are stored as an HMAC keyed from the
//!   server secret and bound to their challenge ([`OtpKey`]): a leaked database row does not
//!   give the code away, nor work for another challenge. Guessing is bounded by the callers'
//!   attempt budgets, not here.
//! - TOTP secrets must be read back to compute codes, so they are encrypted, not hashed
//!   ([`SecretSealer`]), with the owner's id as associated data.
//! - A TOTP code is good for its whole time step (and the skew around it):
//!   [`totp::verify`] returns the step it matched, and the caller refuses a step not after
//!   the last one used, so each code works once.
//! - Recovery codes stand in for a lost authenticator. At ~49.5 bits a bare hash could be
//!   brute-forced from a stolen database, so the caller stores them as an [`OtpKey`] HMAC
//!   bound to the account; each works once (the store spends it).
//!
//! In NIST SP 800-63B terms, TOTP is a single-factor OTP device authenticator; the emailed
//! code is not an authenticator at all (email is not an acceptable out-of-band channel), only
//! a check that the person can read the account's mail.

pub mod codes;
pub mod seal;
pub mod totp;

pub use codes::{OtpKey, generate_email_code, generate_recovery_codes, normalize_recovery_code};
pub use seal::{SealError, SecretSealer};
pub use totp::{TotpSecret, TotpSecretError};
