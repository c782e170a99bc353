use std::fmt;

/// 3 to 32 characters of `[A-Za-z0-9._-]`, starting with a letter or digit, not reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

/// Names that would let a user pass for the service or its operators.
const RESERVED: &[&str] = &[
    "admin",
    "administrator",
    "root",
    "system",
    "support",
    "security",
    "portcullis",
    "postmaster",
    "abuse",
    "noreply",
    "no-reply",
    "help",
    "moderator",
    "staff",
    "official",
];

impl Username {
    pub const MIN: usize = 3;
    pub const MAX: usize = 32;

    pub fn parse(raw: &str) -> Result<Username, String> {
        let name = raw.trim();
        if name.is_empty() {
            return Err("is required".into());
        }
        if name.len() < Self::MIN || name.len() > Self::MAX {
            return Err(format!("must be {} to {} characters long", Self::MIN, Self::MAX));
        }
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err("may contain only letters, digits, '.', '_' and '-'".into());
        }
        if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err("must start with a letter or a digit".into());
        }
        if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
            return Err("is reserved".into());
        }
        Ok(Username(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The case-folded form usernames are unique and found by.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_folds() {
        let name = Username::parse("Alice_99").unwrap();
        assert_eq!(name.as_str(), "Alice_99");
        assert_eq!(name.key(), "alice_99");
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "ab", "a b c", "_alice", "alice!", "élodie", "Admin", &"x".repeat(33)] {
            assert!(Username::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
