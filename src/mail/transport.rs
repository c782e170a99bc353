//! How a mail leaves the process: SMTP in production, `.eml` files otherwise.
//!
//! Both build the same RFC 5322 message: `From` from `mail.from`, one recipient,
//! multipart/alternative with the text part first and the HTML part second (clients show
//! the last part they can), and a `Message-ID` derived from the outbox id, so a mail sent
//! twice (delivery is at-least-once) carries the same id and receivers can tell.
//!
//! Secrets: the SMTP URL may hold a password. It is handed to lettre and never put into a
//! [`MailError`] or a log line; errors about the URL say what is wrong, not what it is.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, MultiPart},
    transport::smtp::PoolConfig,
};

use crate::{config::Settings, store::OutboxMail};

/// How long one SMTP network operation (connect, TLS handshake, each command) may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one mail from the outbox. Implementations must be safe to call again for the same
/// mail: the outbox delivers at least once.
#[async_trait]
pub trait MailTransport: Send + Sync {
    async fn send(&self, mail: &OutboxMail) -> Result<(), MailError>;
}

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// `mail.smtp_url` cannot be used; the reason only, never the URL (it may hold a
    /// password).
    #[error("mail.smtp_url is not a usable SMTP URL: {0}")]
    SmtpUrl(String),
    #[error("mail.from is not a valid mailbox: {0}")]
    From(String),
    /// The outbox row's address cannot be parsed: retrying cannot help.
    #[error("invalid recipient address: {0}")]
    Recipient(String),
    /// The message cannot be built from the row: retrying cannot help.
    #[error("cannot build the message: {0}")]
    Message(String),
    #[error("SMTP delivery failed: {0}")]
    Smtp(#[source] lettre::transport::smtp::Error),
    #[error("delivery timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot write mail file {}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl MailError {
    /// Whether trying again can never succeed (the row itself is bad), so the outbox gives
    /// the mail up at once. SMTP errors, even 5xx ones, are not: a rejected login or a full
    /// mailbox may well be fixed before the attempts run out.
    pub fn is_permanent(&self) -> bool {
        matches!(self, MailError::Recipient(_) | MailError::Message(_))
    }
}

/// Delivers through an SMTP server, over pooled connections.
pub struct SmtpTransport {
    mailer: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl SmtpTransport {
    /// `url` is `smtp://host[:port]` (plain, port 25), `smtp://host?tls=required`
    /// (STARTTLS, port 587), `smtps://host` (implicit TLS, port 465), with optional
    /// `user:password@` (percent-encoded) and `/ehlo-name`. Certificates are checked against
    /// the Mozilla roots (webpki-roots). Create and drop it inside a Tokio runtime: lettre's
    /// pool spawns tasks then.
    pub fn new(url: &str, from: &str) -> Result<SmtpTransport, MailError> {
        let from = parse_from(from)?;
        if sends_credentials_in_clear(url) {
            // Allowed (a relay on localhost), but worth knowing. The URL is not logged.
            tracing::warn!("mail.smtp_url sends its credentials unencrypted: use smtps:// or ?tls=required");
        }
        // lettre's URL errors name the problem (bad scheme, bad port), not the URL.
        let mailer = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|error| MailError::SmtpUrl(error.to_string()))?
            .timeout(Some(SMTP_TIMEOUT))
            // The worker sends one mail at a time; a few connections cover several replicas'
            // worth of bursts without hogging the relay.
            .pool_config(PoolConfig::new().max_size(4).idle_timeout(Duration::from_secs(60)))
            .build();
        Ok(SmtpTransport { mailer, from })
    }
}

impl std::fmt::Debug for SmtpTransport {
    // lettre's Debug shows connection details; this one cannot leak credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTransport").field("from", &self.from.to_string()).finish_non_exhaustive()
    }
}

#[async_trait]
impl MailTransport for SmtpTransport {
    async fn send(&self, mail: &OutboxMail) -> Result<(), MailError> {
        let message = build_message(&self.from, mail)?;
        self.mailer.send(message).await.map_err(MailError::Smtp)?;
        Ok(())
    }
}

/// Writes each mail as `<dir>/<outbox id>.eml` (mode 0600: they hold live tokens) and logs
/// its recipient, subject and file path (never its links: they carry the tokens), so a
/// developer without an SMTP server can open it and click through sign-up and password
/// reset. Sending again overwrites the same file.
#[derive(Debug)]
pub struct FileTransport {
    dir: PathBuf,
    from: Mailbox,
}

impl FileTransport {
    /// The directory is created now if missing (a bad path fails at start-up) and again
    /// before each write (in case it was removed meanwhile).
    pub fn new(dir: impl Into<PathBuf>, from: &str) -> Result<FileTransport, MailError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| MailError::File { path: dir.clone(), source })?;
        Ok(FileTransport { dir, from: parse_from(from)? })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[async_trait]
impl MailTransport for FileTransport {
    async fn send(&self, mail: &OutboxMail) -> Result<(), MailError> {
        let message = build_message(&self.from, mail)?;
        let path = self.dir.join(format!("{}.eml", mail.id));
        write_atomically(&self.dir, &path, &message.formatted()).await?;
        // The file, never its links: they carry live tokens (reset, verification, codes), and
        // logs travel further than `<data_dir>/mail`. The developer opens the file.
        tracing::info!(
            to = %mail.to,
            subject = %mail.subject,
            file = %path.display(),
            "mail written to a file (no SMTP server configured)"
        );
        Ok(())
    }
}

/// SMTP when `mail.smtp_url` is set, else `.eml` files in `settings.mail_dir()`. Must be
/// called inside a Tokio runtime.
pub fn transport_from_settings(settings: &Settings) -> Result<Arc<dyn MailTransport>, MailError> {
    Ok(match &settings.mail.smtp_url {
        Some(url) => Arc::new(SmtpTransport::new(url, &settings.mail.from)?),
        None => Arc::new(FileTransport::new(settings.mail_dir(), &settings.mail.from)?),
    })
}

/// A plain `smtp://` URL (no `tls=` parameter: never encrypted) with a user or password.
fn sends_credentials_in_clear(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("smtp://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.contains('@') && !url.contains("tls=")
}

fn parse_from(from: &str) -> Result<Mailbox, MailError> {
    from.parse().map_err(|error: lettre::address::AddressError| MailError::From(error.to_string()))
}

fn build_message(from: &Mailbox, mail: &OutboxMail) -> Result<Message, MailError> {
    let to: Mailbox = mail.to.parse().map_err(|error: lettre::address::AddressError| {
        MailError::Recipient(format!("{:?}: {error}", mail.to))
    })?;
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(mail.subject.as_str())
        .message_id(Some(format!("<{}@{}>", mail.id, from.email.domain())))
        .multipart(MultiPart::alternative_plain_html(mail.text.clone(), mail.html.clone()))
        .map_err(|error| MailError::Message(error.to_string()))
}

/// Writes to a hidden temporary file, then renames it over `path`: a reader never sees
/// half a mail.
async fn write_atomically(dir: &Path, path: &Path, contents: &[u8]) -> Result<(), MailError> {
    use tokio::io::AsyncWriteExt;

    let failed = |source| MailError::File { path: path.to_path_buf(), source };
    tokio::fs::create_dir_all(dir).await.map_err(failed)?;
    let file_name = path.file_name().map(|name| name.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let result = async {
        let mut file = options.open(&tmp).await?;
        file.write_all(contents).await?;
        file.sync_all().await?;
        tokio::fs::rename(&tmp, path).await
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;
    use uuid::Uuid;

    fn mail(to: &str) -> OutboxMail {
        OutboxMail {
            id: Uuid::now_v7(),
            to: to.into(),
            subject: "Grüße from Acme".into(),
            text: "Hi,\n\nOpen https://app.test/verify-email?token=a%2Bb now.\n".into(),
            html: "<p>Hi,</p><p><a href=\"https://app.test/verify-email?token=a%2Bb\">x</a></p>".into(),
            attempts: 0,
            created_at: OffsetDateTime::now_utc(),
            last_error: None,
        }
    }

    #[test]
    fn notices_credentials_sent_in_clear() {
        assert!(sends_credentials_in_clear("smtp://user:pw@relay.test:25"));
        assert!(!sends_credentials_in_clear("smtp://user:pw@relay.test:587?tls=required"));
        assert!(!sends_credentials_in_clear("smtps://user:pw@relay.test"));
        assert!(!sends_credentials_in_clear("smtp://relay.test/ehlo@name"));
    }

    #[test]
    fn builds_multipart_alternative_with_a_stable_message_id() {
        let from = parse_from("Acme <no-reply@acme.test>").unwrap();
        let mail = mail("alice@example.com");
        let raw = String::from_utf8(build_message(&from, &mail).unwrap().formatted()).unwrap();
        assert!(raw.contains("From: Acme <no-reply@acme.test>\r\n"), "{raw}");
        assert!(raw.contains("To: alice@example.com\r\n"), "{raw}");
        assert!(raw.contains(&format!("Message-ID: <{}@acme.test>\r\n", mail.id)), "{raw}");
        assert!(raw.contains("multipart/alternative"), "{raw}");
        let (plain, html) = (raw.find("text/plain").unwrap(), raw.find("text/html").unwrap());
        assert!(plain < html, "text part first: {raw}");
    }

    #[test]
    fn bad_recipients_are_permanent_errors() {
        let from = parse_from("no-reply@acme.test").unwrap();
        let error = build_message(&from, &mail("not an address")).unwrap_err();
        assert!(error.is_permanent(), "{error}");
        assert!(matches!(parse_from("nope"), Err(MailError::From(_))));
    }

    #[tokio::test]
    async fn url_errors_do_not_reveal_the_url() {
        for url in ["smtp://user:s3cret@mail.test:notaport", "ftp://user:s3cret@mail.test", "s3cret"] {
            let error = SmtpTransport::new(url, "no-reply@acme.test").unwrap_err();
            let shown = format!("{error} {error:?}");
            assert!(matches!(error, MailError::SmtpUrl(_)), "{shown}");
            assert!(!shown.contains("s3cret"), "{shown}");
        }
        let transport = SmtpTransport::new("smtps://user:s3cret@mail.test", "no-reply@acme.test").unwrap();
        assert!(!format!("{transport:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn file_transport_writes_eml_files() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("mail/outbox");
        let transport = FileTransport::new(&nested, "no-reply@acme.test").unwrap();
        std::fs::remove_dir_all(&nested).unwrap(); // re-created on send
        let mail = mail("alice@example.com");
        transport.send(&mail).await.unwrap();
        transport.send(&mail).await.unwrap(); // idempotent: same file
        let files: Vec<_> = std::fs::read_dir(&nested).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(files, [std::ffi::OsString::from(format!("{}.eml", mail.id))]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(nested.join(&files[0])).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
