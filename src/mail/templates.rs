//! What each mail says: a subject, a plain-text part and an HTML part, rendered from code
//! rather than a template language (six short mails do not need one).
//!
//! Two rules keep them safe:
//! * every value that is not ours (names, device strings, addresses, IPs) is stripped of
//!   control characters, and HTML-escaped in the HTML part: a name like `<script>` shows as
//!   text. In fact everything that goes into the HTML part is escaped; the markup around it
//!   is the only HTML written here.
//! * links are built from `mail.frontend_base_url` alone, never from anything in a request
//!   (a forged `Host` header must not be able to send reset tokens to an attacker's site),
//!   with the token percent-encoded as a query parameter.

use std::fmt::Write as _;
use std::time::Duration;

use time::{OffsetDateTime, UtcOffset, macros::format_description};

use crate::config::MailSettings;

/// Renders the mails; built once from the settings.
#[derive(Debug, Clone)]
pub struct Templates {
    product_name: String,
    /// Without a trailing slash, so paths can be appended as `{base}/path`.
    frontend_base_url: String,
}

/// A mail ready for the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// The request a mail about account activity reports: when, from where, from what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub at: OffsetDateTime,
    pub ip: String,
    /// A readable description, e.g. "Firefox on Linux".
    pub device: String,
    /// Where the IP address is, e.g. "London, GB"; empty when unknown.
    pub location: String,
}

impl Templates {
    pub fn new(settings: &MailSettings) -> Templates {
        Templates {
            product_name: clean(&settings.product_name),
            frontend_base_url: settings.frontend_base_url.trim_end_matches('/').to_string(),
        }
    }

    /// Sent at sign-up (and on request): proves the address is the user's.
    pub fn verify_email(&self, name: &str, token: &str, valid_for: Duration) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!(
            "Please confirm that this is your email address for your {product} account by \
             opening the link below. It works for {} and only once.",
            human_duration(valid_for)
        ));
        mail.link("Verify email address", &self.link("verify-email", token));
        mail.paragraph(&format!("If you did not create a {product} account, you can ignore this email."));
        mail.finish(format!("Verify your email address for {product}"), product)
    }

    /// Sent once the address is verified.
    pub fn welcome(&self, name: &str) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!(
            "Your email address is verified and your {product} account is ready. Welcome!"
        ));
        mail.link(&format!("Open {product}"), &self.frontend_base_url);
        mail.finish(format!("Welcome to {product}"), product)
    }

    /// Sent when someone asks to reset the password of the account.
    pub fn reset_password(
        &self,
        name: &str,
        token: &str,
        valid_for: Duration,
        activity: &Activity,
    ) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!(
            "We received a request to reset the password of your {product} account. To choose a \
             new password, open the link below. It works for {} and only once.",
            human_duration(valid_for)
        ));
        mail.link("Reset password", &self.link("reset-password", token));
        mail.paragraph("The request came from:");
        mail.activity(activity);
        mail.paragraph("If you didn't ask for this, ignore this email: your password is unchanged.");
        mail.finish(format!("Reset your {product} password"), product)
    }

    /// Sent after the password changed (by a reset or by the signed-in user).
    pub fn password_changed(&self, name: &str, activity: &Activity) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!("The password of your {product} account was just changed, from:"));
        mail.activity(activity);
        mail.paragraph("If this was you, there is nothing more to do.");
        mail.paragraph(&format!(
            "If it wasn't you, someone else may have access to your account: reset your password \
             right away with \"Forgot password\" on the {product} sign-in page, then review your \
             active sessions."
        ));
        mail.link(&format!("Open {product}"), &self.frontend_base_url);
        mail.finish(format!("Your {product} password was changed"), product)
    }

    /// Sent to the NEW address when the user asks to change their email: the change happens
    /// only once this link is opened.
    pub fn confirm_new_email(&self, name: &str, token: &str, valid_for: Duration) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!(
            "Please confirm that you want to use this address for your {product} account by \
             opening the link below. It works for {} and only once. Until then, your account \
             keeps its current address.",
            human_duration(valid_for)
        ));
        mail.link("Confirm email address", &self.link("confirm-email", token));
        mail.paragraph("If you did not ask for this, you can ignore this email.");
        mail.finish(format!("Confirm your new email address for {product}"), product)
    }

    /// Sent to the OLD address when a change of email is requested, so that an attacker who
    /// took over the session cannot quietly move the account away. `new_address_masked`
    /// comes from [`mask_email`].
    pub fn email_change_requested(
        &self,
        name: &str,
        new_address_masked: &str,
        activity: &Activity,
    ) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!(
            "Someone asked to change the email address of your {product} account to {}. The \
             change happens only once the new address is confirmed. The request came from:",
            clean(new_address_masked)
        ));
        mail.activity(activity);
        mail.paragraph("If this was you, there is nothing more to do.");
        mail.paragraph(&format!(
            "If it wasn't you, someone else may have access to your account: change your \
             password right away (\"Forgot password\" on the {product} sign-in page) and review \
             your active sessions."
        ));
        mail.link(&format!("Open {product}"), &self.frontend_base_url);
        mail.finish(format!("Your {product} email address is being changed"), product)
    }

    /// Sent to the OLD address once a change of email has been confirmed: the last word
    /// the old mailbox gets about the account.
    pub fn email_changed(&self, name: &str, new_address_masked: &str) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!(
            "The email address of your {product} account is now {}. Mail about the account \
             goes there from now on.",
            clean(new_address_masked)
        ));
        mail.paragraph(&format!(
            "If you did not make this change, contact {product} support at once: someone else \
             may control your account."
        ));
        mail.finish(format!("Your {product} email address was changed"), product)
    }

    /// Sent when an account logs in from a device it has not used before, with a link that
    /// ends every session and starts a password reset if it was not the owner.
    pub fn new_device_login(
        &self,
        name: &str,
        token: &str,
        valid_for: Duration,
        activity: &Activity,
    ) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!("Your {product} account was just signed in to from a new device:"));
        mail.activity(activity);
        mail.paragraph("If this was you, there is nothing to do.");
        mail.paragraph(&format!(
            "If it wasn't you, use this link: it signs out every device and sends you a link to \
             choose a new password. It works once, for {}.",
            human_duration(valid_for)
        ));
        mail.link("This wasn't me", &self.link("unrecognized-login", token));
        mail.finish(format!("New sign-in to your {product} account"), product)
    }

    /// Sent when a refresh token that was already used comes back: a sign it was copied.
    /// The session it belonged to has been ended.
    pub fn refresh_token_reused(&self, name: &str, session_device: &str) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!(
            "A sign-in token of your {product} account was used twice, which happens when it has \
             been copied. To be safe we signed out that session ({}).",
            clean(session_device)
        ));
        mail.paragraph(&format!(
            "Sign in again on that device. If you don't recognise it, change your password \
             (\"Forgot password\" on the {product} sign-in page) and review your active sessions."
        ));
        mail.link(&format!("Open {product}"), &self.frontend_base_url);
        mail.finish(format!("We signed out one of your {product} sessions"), product)
    }

    /// Sent when too many wrong passwords lock the account. The owner still gets in from a
    /// device they have used before (it keeps a budget of its own), or by resetting the
    /// password.
    pub fn account_locked(&self, name: &str, locked_for: Duration, activity: &Activity) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!(
            "Someone entered the wrong password for your {product} account too many times, so we \
             paused sign-ins with a password for {}. The last try came from:",
            human_duration(locked_for)
        ));
        mail.activity(activity);
        mail.paragraph(
            "If this was you, wait and try again, or sign in from a device you have used before. \
             If it wasn't you, your password held: nobody got in. To be safe, choose a new, \
             unique password (\"Forgot password\" on the sign-in page).",
        );
        mail.link(&format!("Open {product}"), &self.frontend_base_url);
        mail.finish(format!("Sign-ins to your {product} account were paused"), product)
    }

    /// Sent when a recovery code stands in for the authenticator app.
    pub fn recovery_code_used(&self, name: &str, remaining: u32) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!(
            "A recovery code was just used to sign in to your {product} account. {remaining} \
             unused recovery code{} left.",
            if remaining == 1 { " is" } else { "s are" }
        ));
        mail.paragraph(
            "If this wasn't you, someone has your password and one of your recovery codes: \
             reset your password now, then turn your authenticator app off and on again, which \
             issues new recovery codes.",
        );
        mail.link(&format!("Open {product}"), &self.frontend_base_url);
        mail.finish(format!("A recovery code was used for your {product} account"), product)
    }

    /// The second step of a login with the emailed code switched on.
    pub fn login_code(&self, name: &str, code: &str, valid_for: Duration, activity: &Activity) -> Rendered {
        let product = &self.product_name;
        let mut mail = Body::new(name);
        mail.paragraph(&format!(
            "Your {product} sign-in code is {}. It works once, for {}.",
            clean(code),
            human_duration(valid_for)
        ));
        mail.paragraph("It was asked for by a sign-in from:");
        mail.activity(activity);
        mail.paragraph(
            "If this wasn't you, someone knows your password: do not share the code, and choose \
             a new password (\"Forgot password\" on the sign-in page).",
        );
        // Not in the subject: subjects show on lock screens.
        mail.finish(format!("Your {product} sign-in code"), product)
    }

    /// `{base}/{path}?token={token}`, the token percent-encoded.
    fn link(&self, path: &str, token: &str) -> String {
        format!("{}/{path}?token={}", self.frontend_base_url, percent_encode(token))
    }
}

/// Hides most of an address while leaving it recognisable to its owner:
/// `alice@example.com` → `a***@example.com`.
pub fn mask_email(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => match local.chars().next() {
            Some(first) => format!("{first}***@{domain}"),
            None => format!("***@{domain}"),
        },
        None => "***".to_string(),
    }
}

/// Both parts of a mail, written side by side so they cannot say different things.
struct Body {
    text: String,
    html: String,
}

impl Body {
    fn new(name: &str) -> Body {
        let name = clean(name);
        let greeting = if name.is_empty() { "Hi,".to_string() } else { format!("Hi {name},") };
        let mut body = Body { text: String::new(), html: String::new() };
        body.paragraph(&greeting);
        body
    }

    fn paragraph(&mut self, text: &str) {
        let _ = write!(self.text, "{text}\n\n");
        let _ = writeln!(self.html, "<p>{}</p>", escape(text));
    }

    /// A button in HTML, with the address spelled out too for clients that hide buttons;
    /// the bare address in text.
    fn link(&mut self, label: &str, url: &str) {
        let _ = write!(self.text, "{label}:\n{url}\n\n");
        let (label, url) = (escape(label), escape(url));
        let _ = writeln!(
            self.html,
            "<p><a href=\"{url}\" style=\"display:inline-block;padding:10px 18px;background:#1f6feb;\
             color:#ffffff;text-decoration:none;border-radius:6px\">{label}</a></p>\n\
             <p style=\"font-size:13px;color:#555555\">If the button does not work, copy this \
             link into your browser:<br><a href=\"{url}\">{url}</a></p>"
        );
    }

    fn activity(&mut self, activity: &Activity) {
        let mut rows = vec![
            ("When", format_instant(activity.at)),
            ("IP address", clean(&activity.ip)),
            ("Device", clean(&activity.device)),
        ];
        if !activity.location.is_empty() {
            rows.push(("Location", clean(&activity.location)));
        }
        self.html.push_str("<ul>\n");
        for (label, value) in rows {
            let _ = writeln!(self.text, "  {label}: {value}");
            let _ = writeln!(self.html, "<li>{label}: {}</li>", escape(&value));
        }
        self.text.push('\n');
        self.html.push_str("</ul>\n");
    }

    fn finish(mut self, subject: String, product: &str) -> Rendered {
        self.paragraph(&format!("— The {product} team"));
        let html = format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>{}</title>\n</head>\n<body style=\"margin:0;padding:0;background:#ffffff\">\n\
             <div style=\"max-width:560px;margin:0 auto;padding:24px;font-family:-apple-system,\
             'Segoe UI',Helvetica,Arial,sans-serif;font-size:15px;line-height:1.5;color:#222222\">\n\
             {}</div>\n</body>\n</html>\n",
            escape(&subject),
            self.html
        );
        Rendered { subject, text: self.text.trim_end().to_string() + "\n", html }
    }
}

/// A value from outside (a name, a user agent) made harmless in either part: control
/// characters (newlines included) become spaces, and it is cut to a sane length.
fn clean(value: &str) -> String {
    const MAX_CHARS: usize = 200;
    let cleaned: String =
        value.chars().take(MAX_CHARS).map(|c| if c.is_control() { ' ' } else { c }).collect();
    cleaned.trim().to_string()
}

/// HTML-escapes text for element content and double- or single-quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a token is one query
/// value whatever its alphabet.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// "24 hours", "15 minutes", "1 hour and 30 minutes", "7 days". Leftover seconds are
/// dropped: a link is never promised for longer than it works.
fn human_duration(duration: Duration) -> String {
    fn count(n: u64, unit: &str) -> String {
        if n == 1 { format!("1 {unit}") } else { format!("{n} {unit}s") }
    }
    let secs = duration.as_secs();
    if secs < 60 {
        return count(secs.max(1), "second");
    }
    // Whole days from two on; a single day reads better as "24 hours".
    if secs.is_multiple_of(86_400) && secs >= 2 * 86_400 {
        return count(secs / 86_400, "day");
    }
    match (secs / 3600, secs % 3600 / 60) {
        (0, minutes) => count(minutes, "minute"),
        (hours, 0) => count(hours, "hour"),
        (hours, minutes) => format!("{} and {}", count(hours, "hour"), count(minutes, "minute")),
    }
}

/// "23 November 2026, 14:05 UTC", whatever offset the instant carries.
fn format_instant(at: OffsetDateTime) -> String {
    let format = format_description!("[day padding:none] [month repr:long] [year], [hour]:[minute] UTC");
    at.to_offset(UtcOffset::UTC).format(&format).unwrap_or_else(|_| at.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const BASE: &str = "https://app.example.com";

    fn templates() -> Templates {
        Templates::new(&MailSettings {
            product_name: "Acme".into(),
            frontend_base_url: format!("{BASE}/"),
            ..MailSettings::default()
        })
    }

    fn activity() -> Activity {
        Activity {
            at: datetime!(2026-11-23 15:05:09 +01:00),
            ip: "203.0.113.7".into(),
            device: "Firefox <b>on</b> Linux".into(),
            location: "London, GB".into(),
        }
    }

    /// Every mail, rendered for the user `name` with the token `token`.
    fn all(name: &str, token: &str) -> Vec<Rendered> {
        let t = templates();
        let day = Duration::from_secs(24 * 3600);
        vec![
            t.verify_email(name, token, day),
            t.welcome(name),
            t.reset_password(name, token, Duration::from_secs(15 * 60), &activity()),
            t.password_changed(name, &activity()),
            t.confirm_new_email(name, token, day),
            t.email_change_requested(name, "a***@example.org", &activity()),
        ]
    }

    #[test]
    fn every_mail_has_subject_text_and_html() {
        for mail in all("Alice", "tok") {
            assert!(!mail.subject.is_empty() && mail.subject.contains("Acme"), "{mail:?}");
            assert!(mail.text.starts_with("Hi Alice,\n\n"), "{}", mail.text);
            assert!(mail.text.contains("The Acme team"), "{}", mail.text);
            assert!(mail.html.starts_with("<!DOCTYPE html>"), "{}", mail.html);
            assert!(mail.html.contains("<p>Hi Alice,</p>"), "{}", mail.html);
            assert!(mail.html.contains(&format!("<title>{}</title>", escape(&mail.subject))));
        }
    }

    #[test]
    fn user_values_are_escaped_in_html() {
        let name = "<script>alert('x')</script> & co";
        for mail in all(name, "tok") {
            assert!(!mail.html.contains("<script>"), "{}", mail.html);
            assert!(mail.html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co"));
            // The text part is plain text: the name is shown as typed.
            assert!(mail.text.contains(name), "{}", mail.text);
            // Never in a subject (a header).
            assert!(!mail.subject.contains("script"), "{}", mail.subject);
        }
        let reset = &all(name, "tok")[2];
        assert!(reset.html.contains("Firefox &lt;b&gt;on&lt;/b&gt; Linux"), "{}", reset.html);
        assert!(!reset.html.contains("<b>"));
    }

    #[test]
    fn control_characters_in_names_cannot_forge_lines() {
        let mail = templates().welcome("Eve\r\nBcc: x@evil.test");
        assert!(mail.text.starts_with("Hi Eve  Bcc: x@evil.test,\n"), "{}", mail.text);
        assert!(templates().welcome("").text.starts_with("Hi,\n"));
    }

    #[test]
    fn links_use_the_configured_base_and_encode_the_token() {
        let token = "ab+c/d=e&f g";
        let encoded = "ab%2Bc%2Fd%3De%26f%20g";
        let mails = all("Alice", token);
        for (mail, path) in
            [(&mails[0], "verify-email"), (&mails[2], "reset-password"), (&mails[4], "confirm-email")]
        {
            let link = format!("{BASE}/{path}?token={encoded}");
            assert!(mail.text.contains(&format!("\n{link}\n")), "{}", mail.text);
            assert!(mail.html.contains(&format!("href=\"{link}\"")), "{}", mail.html);
            assert!(!mail.text.contains(token) && !mail.html.contains(token));
            assert!(!mail.text.contains("//verify") && !mail.text.contains(".com//"));
        }
        // Mails without a token link only to the front end itself.
        for mail in [&mails[1], &mails[3], &mails[5]] {
            assert!(!mail.text.contains("token="), "{}", mail.text);
            assert!(mail.html.contains(&format!("href=\"{BASE}\"")), "{}", mail.html);
        }
    }

    #[test]
    fn link_attributes_are_escaped_too() {
        let t = Templates::new(&MailSettings {
            frontend_base_url: "https://x.test/?a=1&b=\"2\"".into(),
            ..MailSettings::default()
        });
        let mail = t.verify_email("A", "t", Duration::from_secs(60));
        assert!(mail.html.contains("href=\"https://x.test/?a=1&amp;b=&quot;2&quot;/verify-email?token=t\""));
    }

    #[test]
    fn validity_is_written_humanly() {
        let mails = all("Alice", "tok");
        assert!(mails[0].text.contains("It works for 24 hours and only once."), "{}", mails[0].text);
        assert!(mails[0].html.contains("It works for 24 hours and only once."));
        assert!(mails[2].text.contains("It works for 15 minutes and only once."), "{}", mails[2].text);
        assert!(mails[4].text.contains("24 hours"));

        let cases = [
            (1, "1 second"),
            (45, "45 seconds"),
            (60, "1 minute"),
            (15 * 60 + 30, "15 minutes"),
            (3600, "1 hour"),
            (5400, "1 hour and 30 minutes"),
            (86_400, "24 hours"),
            (2 * 86_400, "2 days"),
            (7 * 86_400, "7 days"),
            (36 * 3600, "36 hours"),
        ];
        for (secs, expected) in cases {
            assert_eq!(human_duration(Duration::from_secs(secs)), expected);
        }
    }

    #[test]
    fn activity_is_shown_in_utc() {
        let mail = templates().password_changed("Alice", &activity());
        assert!(mail.text.contains("  When: 23 November 2026, 14:05 UTC\n"), "{}", mail.text);
        assert!(mail.text.contains("  IP address: 203.0.113.7\n"));
        assert!(mail.html.contains("<li>When: 23 November 2026, 14:05 UTC</li>"), "{}", mail.html);
        assert!(mail.text.contains("If it wasn't you"), "{}", mail.text);
        assert!(mail.text.contains("reset your password"), "{}", mail.text);
    }

    #[test]
    fn reset_says_the_password_is_unchanged() {
        let mail = &all("Alice", "tok")[2];
        let line = "If you didn't ask for this, ignore this email: your password is unchanged.";
        assert!(mail.text.contains(line), "{}", mail.text);
        assert!(mail.html.contains(&escape(line)), "{}", mail.html);
    }

    #[test]
    fn email_change_notice_shows_the_masked_address() {
        let mail = &all("Alice", "tok")[5];
        assert!(mail.text.contains("to a***@example.org."), "{}", mail.text);
        assert!(mail.text.contains("  Device: Firefox <b>on</b> Linux\n"), "{}", mail.text);
    }

    #[test]
    fn masks_addresses() {
        assert_eq!(mask_email("alice@example.com"), "a***@example.com");
        assert_eq!(mask_email("a@example.com"), "a***@example.com");
        assert_eq!(mask_email("élodie@example.fr"), "é***@example.fr");
        assert_eq!(mask_email("@example.com"), "***@example.com");
        assert_eq!(mask_email("not-an-address"), "***");
    }
}
