//! Forgotten and changed passwords.
//!
//! A reset link goes to the address on file — never to one taken from the request — and
//! its host comes from configuration. Resetting spends the token, sets the password and
//! ends every session in one transaction; changing needs the current password and ends the
//! other sessions. Both kill pending reset and email-change links and mail a notice.
//!
//! Lock order, in every flow: the user row first, then its tokens.

use std::sync::Arc;

use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Auth, AuthError, ClientInfo, Principal, domain::LoginIdentifier, mail::greeting_name,
    register::now_micros,
};
use crate::{
    password::{NewPassword, PasswordPolicy},
    store::{RevokeReason, SpentToken, StoreTx, TokenPurpose, UserRecord},
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
        // Keyed on what was typed, never on whether it names an account: the answer says
        // nothing about that either way.
        let ip = super::limits::ip_part(client.ip);
        self.enforce_limits(vec![
            (format!("forgot:ip:{ip}"), &self.limits.forgot_password_per_ip),
            (
                format!("forgot:id:{}", super::limits::key_part(identifier.key())),
                &self.limits.forgot_password_per_account,
            ),
        ])
        .await?;
        let client = client.clone();
        self.in_background("password reset mail", move |auth| async move {
            auth.send_reset_link(&identifier, &client).await
        });
        Ok(())
    }

    async fn send_reset_link(
        &self,
        identifier: &LoginIdentifier,
        client: &ClientInfo,
    ) -> Result<(), AuthError> {
        // Look first, outside any transaction: an unknown identifier costs no write lock.
        let Some(found) = self.store.find_user_by_login(identifier.key()).await? else { return Ok(()) };
        // The account's own limit too, whichever of its names was typed (silently).
        if !self
            .mail_allowed(
                format!("forgot:user:{}", found.id.simple()),
                &self.limits.forgot_password_per_account,
            )
            .await
        {
            return Ok(());
        }
        let mut tx = self.store.begin().await?;
        // Locking the user serialises concurrent requests, so only the newest link lives.
        let Some(user) = tx.lock_user(found.id).await? else { return Ok(()) };
        // Issuing kills the user's older reset links.
        // The address on file, whatever the request said.
        self.queue_reset_link(&mut tx, &user, &user.email, client).await?;
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
        let (mut tx, user, _) = self.spend_token(&hash, TokenPurpose::ResetPassword, now).await?;
        // Dropping `tx` on this error rolls back: the token stays usable.
        self.check_identity("new_password", &password, &user)?;
        tx.set_password_hash(user.id, &password_hash, now).await?;
        self.kill_account_links(&mut tx, user.id, now).await?;
        let revoked = tx.revoke_user_sessions(user.id, None, RevokeReason::PasswordReset, now).await?;
        let mail = self.templates.password_changed(greeting_name(&user), &self.activity(client));
        self.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
        self.commit_with_mail(tx).await?;
        crate::metrics::revoked(RevokeReason::PasswordReset.as_str(), revoked.len());
        tracing::info!(user_id = %user.id, sessions = revoked.len(), "password reset");
        self.publish_committed(&revoked).await;
        Ok(())
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
        self.check_own_password(&user, current, "current_password").await?;
        if password.expose() == current {
            return Err(AuthError::invalid("new_password", "new_password must differ from the current one"));
        }
        let password_hash = self.hasher.hash(password.expose()).await?;

        let now = now_micros();
        let mut tx = self.store.begin().await?;
        let user = self.lock_unchanged(&mut tx, &user, "current_password").await?;
        tx.set_password_hash(user.id, &password_hash, now).await?;
        self.kill_account_links(&mut tx, user.id, now).await?;
        let revoked = tx
            .revoke_user_sessions(user.id, Some(principal.session_id), RevokeReason::PasswordChanged, now)
            .await?;
        let mail = self.templates.password_changed(greeting_name(&user), &self.activity(client));
        self.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
        self.commit_with_mail(tx).await?;
        crate::metrics::revoked(RevokeReason::PasswordChanged.as_str(), revoked.len());
        tracing::info!(user_id = %user.id, sessions = revoked.len(), "password changed");
        self.publish_committed(&revoked).await;
        Ok(revoked.len())
    }

    /// Locks the user whose password was just verified against `verified.password_hash`,
    /// and insists the hash is unchanged: a reset that committed meanwhile wins, and a
    /// stale "current password" must not act after it.
    pub(crate) async fn lock_unchanged(
        &self,
        tx: &mut Box<dyn StoreTx>,
        verified: &UserRecord,
        field: &'static str,
    ) -> Result<UserRecord, AuthError> {
        let locked = tx.lock_user(verified.id).await?.ok_or(AuthError::NotFound("account"))?;
        if locked.password_hash != verified.password_hash {
            return Err(AuthError::invalid(field, format!("{field} is incorrect")));
        }
        Ok(locked)
    }

    /// Opens a transaction that has spent a mailed token and holds its owner's row locked.
    /// The owner is looked up first without locking, so the user row is locked BEFORE the
    /// token — the lock order of every flow, so flows on one user never deadlock.
    pub(crate) async fn spend_token(
        &self,
        hash: &[u8],
        purpose: TokenPurpose,
        now: OffsetDateTime,
    ) -> Result<(Box<dyn StoreTx>, UserRecord, SpentToken), AuthError> {
        let owner =
            self.store.peek_token(hash, purpose, now).await?.ok_or(AuthError::InvalidToken("token"))?;
        let mut tx = self.store.begin().await?;
        let user = tx.lock_user(owner).await?.ok_or(AuthError::InvalidToken("token"))?;
        match tx.consume_token(hash, purpose, now).await? {
            // A concurrent call spent it between the look-up and here: it won.
            Some(spent) if spent.user_id == user.id => Ok((tx, user, spent)),
            _ => Err(AuthError::InvalidToken("token")),
        }
    }

    /// Kills every mailed link that could take the account over (pending resets and email
    /// changes) and every open MFA challenge (a login begun with the old password must
    /// not complete): after a password reset or change, only the new password holds the keys.
    pub(crate) async fn kill_account_links(
        &self,
        tx: &mut Box<dyn StoreTx>,
        user: Uuid,
        now: OffsetDateTime,
    ) -> Result<(), AuthError> {
        tx.invalidate_tokens(user, TokenPurpose::ResetPassword, now).await?;
        tx.invalidate_tokens(user, TokenPurpose::ChangeEmail, now).await?;
        tx.close_mfa_challenges(user, now).await?;
        Ok(())
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
