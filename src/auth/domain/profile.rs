/// A phone number as people write it (`+44 20 7946 0958`, `(555) 010-9999`): 7 to 15
/// digits (E.164's bound) with optional `+`, spaces, dashes, dots and parentheses. Empty
/// clears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phone(String);

impl Phone {
    pub fn parse(raw: &str) -> Result<Phone, String> {
        let phone = raw.trim();
        if phone.is_empty() {
            return Ok(Phone(String::new()));
        }
        if phone.len() > 32 || !phone.chars().all(|c| c.is_ascii_digit() || " +-.()".contains(c)) {
            return Err("must be a phone number such as +44 20 7946 0958".into());
        }
        if phone[1..].contains('+') {
            return Err("may have '+' only at the start".into());
        }
        let digits = phone.chars().filter(char::is_ascii_digit).count();
        if !(7..=15).contains(&digits) {
            return Err("must have 7 to 15 digits".into());
        }
        Ok(Phone(phone.to_string()))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// A short free-text bio: at most 500 characters; line breaks allowed, other control
/// characters not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bio(String);

impl Bio {
    pub const MAX: usize = 500;

    pub fn parse(raw: &str) -> Result<Bio, String> {
        let bio = raw.trim();
        if bio.chars().count() > Self::MAX {
            return Err(format!("must be at most {} characters long", Self::MAX));
        }
        if bio.chars().any(|c| c.is_control() && c != '\n') {
            return Err("must not contain control characters".into());
        }
        Ok(Bio(bio.to_string()))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones() {
        for ok in ["+44 20 7946 0958", "(555) 010-9999", "0151.234.5678", ""] {
            assert!(Phone::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["12345", "call me", "+1 2+3 456 7890", &"1".repeat(16), "+1 555 0100 <b>"] {
            assert!(Phone::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bios() {
        assert_eq!(Bio::parse(" Hello\nworld ").unwrap().into_inner(), "Hello\nworld");
        assert!(Bio::parse(&"x".repeat(501)).is_err());
        assert!(Bio::parse("bell\u{7}").is_err());
    }
}
