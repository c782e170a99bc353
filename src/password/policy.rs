//! The policy a new password must meet (NIST SP 800-63B, OWASP ASVS 2.1): a length range and
//! not a known common/breached password. No composition rules.

use std::collections::HashSet;

const COMMON_PASSWORDS: &str = include_str!("common_passwords.txt");

pub struct PasswordPolicy {
    min_length: usize,
    max_length: usize,
    common: HashSet<&'static str>,
}

/// A password that met the policy: the only thing that may be hashed for storage.
pub struct NewPassword(String);

impl NewPassword {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for NewPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewPassword(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyViolation {
    TooShort {
        min: usize,
    },
    TooLong {
        max: usize,
    },
    Common,
    /// The password is the account's own username or email.
    SameAsIdentity,
}

impl std::fmt::Display for PolicyViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyViolation::TooShort { min } => write!(f, "must be at least {min} characters long"),
            PolicyViolation::TooLong { max } => write!(f, "must be at most {max} characters long"),
            PolicyViolation::Common => f.write_str("is too common: it appears in lists of leaked passwords"),
            PolicyViolation::SameAsIdentity => f.write_str("must not be your username or email address"),
        }
    }
}

impl PasswordPolicy {
    pub fn new(min_length: usize, max_length: usize) -> PasswordPolicy {
        let common = COMMON_PASSWORDS.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        PasswordPolicy { min_length, max_length, common }
    }

    /// Checks a new password; `identity` holds the account's username and email.
    pub fn parse(&self, raw: String, identity: &[&str]) -> Result<NewPassword, PolicyViolation> {
        // Characters, not bytes: "at least 12" means what the user typed.
        let length = raw.chars().count();
        if length < self.min_length {
            return Err(PolicyViolation::TooShort { min: self.min_length });
        }
        if length > self.max_length {
            return Err(PolicyViolation::TooLong { max: self.max_length });
        }
        if self.common.contains(raw.to_lowercase().as_str()) {
            return Err(PolicyViolation::Common);
        }
        let password = NewPassword(raw);
        Self::check_identity(&password, identity)?;
        Ok(password)
    }

    /// The identity rule alone, for flows that learn the account only later (a reset
    /// token names its user only once spent).
    pub fn check_identity(password: &NewPassword, identity: &[&str]) -> Result<(), PolicyViolation> {
        let folded = password.0.to_lowercase();
        if identity.iter().any(|id| !id.is_empty() && id.to_lowercase() == folded) {
            return Err(PolicyViolation::SameAsIdentity);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforces_length_in_characters() {
        let policy = PasswordPolicy::new(12, 128);
        assert_eq!(policy.parse("short-pw".into(), &[]).unwrap_err(), PolicyViolation::TooShort { min: 12 });
        assert!(policy.parse("ünïcödé-pässwörd".into(), &[]).is_ok());
        assert!(policy.parse("x".repeat(128), &[]).is_ok());
        assert_eq!(policy.parse("x".repeat(129), &[]).unwrap_err(), PolicyViolation::TooLong { max: 128 });
    }

    #[test]
    fn rejects_common_passwords_case_insensitively() {
        let policy = PasswordPolicy::new(8, 128);
        for common in ["password", "Password1", "12345678", "iloveyou", "QWERTYUIOP"] {
            assert_eq!(policy.parse(common.into(), &[]).unwrap_err(), PolicyViolation::Common, "{common}");
        }
        assert!(policy.parse("tangerine-kettle-orbit".into(), &[]).is_ok());
    }

    #[test]
    fn rejects_the_accounts_own_identity() {
        let policy = PasswordPolicy::new(8, 128);
        let err = policy.parse("Alice.Liddell".into(), &["alice.liddell", "a@example.com"]).unwrap_err();
        assert_eq!(err, PolicyViolation::SameAsIdentity);
    }
}
