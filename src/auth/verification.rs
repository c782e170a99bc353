//! Email verification: a single-use, hashed, expiring link mailed at registration (and on
//! request); spending it marks the address verified and sends a welcome mail.

use std::sync::Arc;

use super::{Auth, AuthError, ClientInfo, domain::Email, mail::greeting_name, register::now_micros};
use crate::{
    store::{StoreTx, TokenPurpose, UserRecord},
    token::one_time,
};

impl Auth {
    /// Issues a verification token for `user` (killing older ones) and queues its mail.
    pub(crate) async fn queue_verification(
        &self,
        tx: &mut Box<dyn StoreTx>,
        user: &UserRecord,
    ) -> Result<(), AuthError> {
        let ttl = self.mail.verification_ttl;
        let token = self.issue_link(tx, user.id, TokenPurpose::VerifyEmail, ttl, None).await?;
        // No name: this address has proven nothing yet, and whoever registered chose the
        // name (text an attacker could aim at someone else's mailbox).
        let mail = self.templates.verify_email("", &token, self.mail.verification_ttl);
        self.queue_mail(tx, Some(user.id), &user.email, mail).await
    }

    /// Spends a verification token: the address is verified, a welcome mail goes out.
    pub async fn verify_email(&self, token: &str) -> Result<(), AuthError> {
        let hash =
            one_time::parse(token, TokenPurpose::VerifyEmail).ok_or(AuthError::InvalidToken("token"))?;
        let now = now_micros();
        let (mut tx, mut user, _) = self.spend_token(&hash, TokenPurpose::VerifyEmail, now).await?;
        if tx.mark_email_verified(user.id, now).await? {
            user.email_verified_at = Some(now);
            let mail = self.templates.welcome(greeting_name(&user));
            self.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
        }
        self.commit_with_mail(tx).await?;
        tracing::info!(user_id = %user.id, "email verified");
        Ok(())
    }

    /// Mails a new verification link if `email` belongs to an unverified account. Answers
    /// the same, at once, whatever the case: the work happens after the answer, so neither
    /// the answer nor its timing tells whether the address is registered.
    pub async fn resend_verification(
        self: &Arc<Self>,
        email: &str,
        client: &ClientInfo,
    ) -> Result<(), AuthError> {
        let email = Email::parse(email).map_err(|e| AuthError::invalid("email", format!("email {e}")))?;
        // Keyed on the address typed, whether or not it is registered.
        let ip = super::limits::ip_part(client.ip);
        self.enforce_limits(vec![
            (format!("resend:ip:{ip}"), &self.limits.resend_verification_per_ip),
            (
                format!("resend:email:{}", super::limits::key_part(&email.key())),
                &self.limits.resend_verification_per_account,
            ),
        ])
        .await?;
        self.in_background("verification mail", move |auth| async move {
            auth.resend_verification_now(&email).await
        });
        Ok(())
    }

    async fn resend_verification_now(&self, email: &Email) -> Result<(), AuthError> {
        // Look first, outside any transaction: an unknown address costs no write lock.
        let Some(found) = self.store.find_user_by_login(&email.key()).await? else { return Ok(()) };
        let mut tx = self.store.begin().await?;
        match tx.lock_user(found.id).await? {
            // Only the account whose address this is (not one whose username looks like it).
            Some(user)
                if user.email_verified_at.is_none() && user.email.eq_ignore_ascii_case(email.as_str()) =>
            {
                self.queue_verification(&mut tx, &user).await?;
                self.commit_with_mail(tx).await
            }
            _ => Ok(()),
        }
    }
}
