//! Forgotten and changed passwords.
//!
//! A reset link goes to the address on file — never to one taken from the request — and
//! its host comes from configuration. Resetting spends the token, sets the password and
//! ends every session in one transaction; changing needs the current password and ends the
//! other sessions. Both mail a notice.

use std::sync::Arc;

use super::{
    Auth, AuthError, ClientInfo, Principal,
    domain::LoginIdentifier,
    mail::{activity, greeting_name},
    register::now_micros,
};
use crate::{
    password::{NewPassword, PasswordPolicy},
    store::{NewOneTimeToken, RevokeReason, TokenPurpose, UserRecord},
    token::one_time,
};

impl Auth {
    /// Mails a reset link if the identifier names an account. Answers the same, at once,
    /// whatever the case (the work happens after the answer).
    pub async fn forgot_password(
        self: &Arc<Self>,
        identifier: &str,
        client: &ClientInfo,
    ) -> Result<(), AuthError> {
        let identifier = LoginIdentifier::parse(identifier)
            .map_err(|e| AuthError::invalid("identifier", format!("identifier {e}")))?;
        let (auth, client) = (self.clone(), client.clone());
        tokio::spawn(async move {
            if let Err(error) = auth.send_reset_link(&identifier, &client).await {
                tracing::warn!(error = ?error, "sending a password reset mail failed");
            }
        });
        Ok(())
    }

    async fn send_reset_link(
        &self,
        identifier: &LoginIdentifier,
        client: &ClientInfo,
    ) -> Result<(), AuthError> {
        let mut tx = self.store.begin().await?;
        let Some(user) = tx.find_user_by_login(identifier.key()).await? else {
            return Ok(());
        };
        let now = now_micros();
        let (token, hash) = one_time::generate(TokenPurpose::ResetPassword);
        // Issuing kills the user's older reset links.
        tx.issue_token(&NewOneTimeToken {
            hash,
            user_id: user.id,
            purpose: TokenPurpose::ResetPassword,
            created_at: now,
            expires_at: now + self.mail.reset_ttl,
            new_email: None,
        })
        .await?;
        let mail = self.templates.reset_password(
            greeting_name(&user),
            &token,
            self.mail.reset_ttl,
            &activity(client),
        );
        // The address on file, whatever the request said.
        self.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
        self.commit_with_mail(tx).await?;
        tracing::info!(user_id = %user.id, "password reset link sent");
        Ok(())
    }

    /// Whether a reset token is still good, without spending it.
    pub async fn check_reset_token(&self, token: &str) -> Result<bool, AuthError> {
        let Some(hash) = one_time::parse(token, TokenPurpose::ResetPassword) else { return Ok(false) };
        Ok(self.store.peek_token(&hash, TokenPurpose::ResetPassword, now_micros()).await?.is_some())
    }

    /// Sets a new password with a reset token and ends every session of the user.
    pub async fn reset_password(
        &self,
        token: &str,
        new_password: String,
        client: &ClientInfo,
    ) -> Result<(), AuthError> {
        let hash =
            one_time::parse(token, TokenPurpose::ResetPassword).ok_or(AuthError::InvalidToken("token"))?;
        let password = self.new_password("new_password", new_password, &[])?;
        // bcrypt before the transaction: nothing stays locked for its hundreds of ms.
        let password_hash = self.hasher.hash(password.expose()).await?;

        let now = now_micros();
        let mut tx = self.store.begin().await?;
        let spent = tx
            .consume_token(&hash, TokenPurpose::ResetPassword, now)
            .await?
            .ok_or(AuthError::InvalidToken("token"))?;
        let user = tx.lock_user(spent.user_id).await?.ok_or(AuthError::InvalidToken("token"))?;
        // Dropping `tx` on this error rolls back: the token stays usable.
        self.check_identity("new_password", &password, &user)?;
        tx.set_password_hash(user.id, &password_hash, now).await?;
        tx.invalidate_tokens(user.id, TokenPurpose::ResetPassword, now).await?;
        let revoked = tx.revoke_user_sessions(user.id, None, RevokeReason::PasswordReset, now).await?;
        let mail = self.templates.password_changed(greeting_name(&user), &activity(client));
        self.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
        self.commit_with_mail(tx).await?;
        tracing::info!(user_id = %user.id, sessions = revoked.len(), "password reset");
        self.publish_revocations(&revoked).await
    }

    /// The caller changes their password; their other sessions end. Returns how many.
    pub async fn change_password(
        &self,
        principal: &Principal,
        current: &str,
        new_password: String,
        client: &ClientInfo,
    ) -> Result<usize, AuthError> {
        if current.is_empty() {
            return Err(AuthError::invalid("current_password", "current_password is required"));
        }
        let user = self.store.find_user(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        let password = self.new_password("new_password", new_password, &[&user.username, &user.email])?;
        if !self.hasher.verify(current, Some(&user.password_hash)).await?.matches {
            return Err(AuthError::invalid("current_password", "current_password is incorrect"));
        }
        if password.expose() == current {
            return Err(AuthError::invalid("new_password", "new_password must differ from the current one"));
        }
        let password_hash = self.hasher.hash(password.expose()).await?;

        let now = now_micros();
        let mut tx = self.store.begin().await?;
        let user = tx.lock_user(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        tx.set_password_hash(user.id, &password_hash, now).await?;
        tx.invalidate_tokens(user.id, TokenPurpose::ResetPassword, now).await?;
        let revoked = tx
            .revoke_user_sessions(user.id, Some(principal.session_id), RevokeReason::PasswordChanged, now)
            .await?;
        let mail = self.templates.password_changed(greeting_name(&user), &activity(client));
        self.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
        self.commit_with_mail(tx).await?;
        tracing::info!(user_id = %user.id, sessions = revoked.len(), "password changed");
        self.publish_revocations(&revoked).await?;
        Ok(revoked.len())
    }

    /// A new password that meets the policy, reported against `field`.
    pub(crate) fn new_password(
        &self,
        field: &'static str,
        raw: String,
        identity: &[&str],
    ) -> Result<NewPassword, AuthError> {
        self.policy.parse(raw, identity).map_err(|e| AuthError::invalid(field, format!("{field} {e}")))
    }

    fn check_identity(
        &self,
        field: &'static str,
        password: &NewPassword,
        user: &UserRecord,
    ) -> Result<(), AuthError> {
        PasswordPolicy::check_identity(password, &[&user.username, &user.email])
            .map_err(|e| AuthError::invalid(field, format!("{field} {e}")))
    }
}
