//! Outgoing mail: what it says (`templates`), how it leaves (`transport`) and when
//! (`worker`).
//!
//! The flows render a mail with [`Templates`] and queue it in the outbox table inside their
//! own transaction, so a mail exists if and only if the change it reports committed. The
//! [`OutboxWorker`] delivers the queue through a [`MailTransport`]: SMTP (lettre, pooled,
//! TLS or STARTTLS per `mail.smtp_url`) in production, `.eml` files (their paths logged,
//! never their links) in the embedded default. Delivery is at least once, retried with exponential backoff and
//! given up after `mail.max_attempts`, the row kept with its last error.

mod templates;
mod transport;
mod worker;

pub use templates::{Activity, Rendered, Templates, mask_email};
pub use transport::{FileTransport, MailError, MailTransport, SmtpTransport, transport_from_settings};
pub use worker::OutboxWorker;
