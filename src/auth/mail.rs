//! Mail from the flows: rendered, queued in the outbox in the flow's own transaction, and
//! the outbox worker woken once that transaction has committed.

use time::OffsetDateTime;
use uuid::Uuid;

use super::{Auth, AuthError, ClientInfo};
use crate::{
    mail::{Activity, Rendered},
    store::{NewMail, NewOneTimeToken, StoreTx, TokenPurpose, UserRecord},
    token::one_time,
};

impl Auth {
    /// Queues `mail` to `to` inside `tx`: it is sent if and only if `tx` commits.
    pub(crate) async fn queue_mail(
        &self,
        tx: &mut Box<dyn StoreTx>,
        user: Option<Uuid>,
        to: &str,
        mail: Rendered,
    ) -> Result<(), AuthError> {
        let queued = NewMail {
            id: Uuid::now_v7(),
            user_id: user,
            to: to.to_string(),
            subject: mail.subject,
            text: mail.text,
            html: mail.html,
            created_at: super::register::now_micros(),
        };
        tx.enqueue_mail(&queued).await?;
        Ok(())
    }

    /// Runs `job` after the caller has had its answer. Bounded: with too many jobs already
    /// running the job is dropped (and logged) rather than queued without limit — the
    /// caller got its constant answer either way.
    pub(crate) fn in_background<F, Fut>(self: &std::sync::Arc<Self>, what: &'static str, job: F)
    where
        F: FnOnce(std::sync::Arc<Auth>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), AuthError>> + Send + 'static,
    {
        let Ok(permit) = self.background.clone().try_acquire_owned() else {
            tracing::warn!(what, "too many background jobs running: dropped one");
            return;
        };
        let auth = self.clone();
        // In the calling RPC's span, so the job's lines carry its request id.
        let job = async move {
            let _permit = permit;
            if let Err(error) = job(auth).await {
                tracing::warn!(what, error = ?error, "background job failed");
            }
        };
        tokio::spawn(tracing::Instrument::instrument(job, tracing::Span::current()));
    }

    /// Issues a single-use token for `purpose` inside `tx` (killing the user's older ones of
    /// that purpose) and returns it, for the link of a mail.
    pub(crate) async fn issue_link(
        &self,
        tx: &mut Box<dyn StoreTx>,
        user: Uuid,
        purpose: TokenPurpose,
        valid_for: std::time::Duration,
        new_email: Option<String>,
    ) -> Result<String, AuthError> {
        let now = super::register::now_micros();
        let (token, hash) = one_time::generate(purpose);
        let issued = NewOneTimeToken {
            hash,
            user_id: user,
            purpose,
            created_at: now,
            expires_at: now + valid_for,
            new_email,
        };
        tx.issue_token(&issued).await?;
        Ok(token)
    }

    /// Mails a fresh password-reset link for `user` to `to` (an address the account has
    /// proven: never one taken from a request).
    pub(crate) async fn queue_reset_link(
        &self,
        tx: &mut Box<dyn StoreTx>,
        user: &UserRecord,
        to: &str,
        client: &ClientInfo,
    ) -> Result<(), AuthError> {
        let ttl = self.mail.reset_ttl;
        let token = self.issue_link(tx, user.id, TokenPurpose::ResetPassword, ttl, None).await?;
        let mail = self.templates.reset_password(greeting_name(user), &token, ttl, &self.activity(client));
        self.queue_mail(tx, Some(user.id), to, mail).await
    }

    /// Commits and lets the outbox worker know there is mail.
    pub(crate) async fn commit_with_mail(&self, tx: Box<dyn StoreTx>) -> Result<(), AuthError> {
        tx.commit().await?;
        self.outbox.notify_one();
        Ok(())
    }
}

/// How a mail greets the user: their first name, else their username.
/// Nobody by name while the address is unverified: the registrant chose the name, and
/// could aim text at someone else's mailbox.
pub(crate) fn greeting_name(user: &UserRecord) -> &str {
    if user.email_verified_at.is_none() {
        ""
    } else if user.first_name.is_empty() {
        &user.username
    } else {
        &user.first_name
    }
}

/// A device as a person reads it: "Firefox 125 on Linux".
pub(crate) fn describe_device(device: &crate::store::DeviceInfo) -> String {
    match (device.browser.as_str(), device.os.as_str()) {
        ("", "") => "an unknown device".to_string(),
        (browser, "") => browser.to_string(),
        ("", os) => os.to_string(),
        (browser, os) => format!("{browser} on {os}"),
    }
}

impl Auth {
    /// The request's time, IP, device and (with a GeoIP database) location, for mails about
    /// account activity.
    pub(crate) fn activity(&self, client: &ClientInfo) -> Activity {
        let device = client.device();
        let described = describe_device(&device);
        let location = match self.locate(client) {
            Some(l) if !l.city.is_empty() => format!("{}, {}", l.city, l.country),
            Some(l) => l.country,
            None => String::new(),
        };
        Activity {
            at: OffsetDateTime::now_utc(),
            ip: if device.ip_address.is_empty() { "an unknown address".into() } else { device.ip_address },
            device: described,
            location,
        }
    }
}
