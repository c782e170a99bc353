/// An optional first or last name: at most 100 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PersonName(String);

impl PersonName {
    pub const MAX: usize = 100;

    pub fn parse(raw: &str) -> Result<PersonName, String> {
        let name = raw.trim();
        if name.chars().count() > Self::MAX {
            return Err(format!("must be at most {} characters long", Self::MAX));
        }
        if name.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(PersonName(name.to_string()))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// What a user logs in with: a username or an email address, matched case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginIdentifier(String);

impl LoginIdentifier {
    pub fn parse(raw: &str) -> Result<LoginIdentifier, String> {
        let id = raw.trim();
        if id.is_empty() {
            return Err("is required".into());
        }
        if id.len() > 254 {
            return Err("must be at most 254 characters long".into());
        }
        Ok(LoginIdentifier(id.to_lowercase()))
    }

    /// The key looked up among usernames and emails.
    pub fn key(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(PersonName::parse("  Ada ").unwrap().into_inner(), "Ada");
        assert!(PersonName::parse(&"x".repeat(101)).is_err());
        assert!(PersonName::parse("bad\u{0007}").is_err());
    }

    #[test]
    fn identifiers_fold_case() {
        assert_eq!(LoginIdentifier::parse(" Alice@Example.com ").unwrap().key(), "alice@example.com");
        assert!(LoginIdentifier::parse("   ").is_err());
    }
}
