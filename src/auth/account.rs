//! The user's own account: read it, change profile fields (a new email only with the
//! current password, and only after the new mailbox confirms it), delete it.

use super::{
    Auth, AuthError, ClientInfo, FieldViolation, Principal,
    domain::{Bio, Email, PersonName, Phone},
    mail::greeting_name,
    register::now_micros,
};
use crate::{
    mail::mask_email,
    store::{ProfileChanges, StoreTx, TokenPurpose, UserRecord},
    token::one_time,
};

#[derive(Debug, Clone)]
pub struct AccountView {
    pub user: UserRecord,
    pub active_sessions: usize,
}

/// The fields to change: `Some` for each one named by the caller's field mask.
#[derive(Debug, Clone, Default)]
pub struct ProfileUpdate {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub bio: Option<String>,
    pub email: Option<String>,
    /// Required to change the email: a stolen access token alone must not be enough to
    /// move the account (and its password resets) to another mailbox.
    pub current_password: String,
}

/// What `update_profile` did.
#[derive(Debug, Clone)]
pub struct ProfileUpdated {
    pub user: UserRecord,
    pub email_change_pending: bool,
}

type Parser = fn(&str) -> Result<String, String>;

impl Auth {
    pub async fn get_account(&self, principal: &Principal) -> Result<AccountView, AuthError> {
        let user = self.store.find_user(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        let active_sessions = self.list_sessions(principal).await?.len();
        Ok(AccountView { user, active_sessions })
    }

    pub async fn update_profile(
        &self,
        principal: &Principal,
        update: ProfileUpdate,
        client: &ClientInfo,
    ) -> Result<ProfileUpdated, AuthError> {
        let mut violations = Vec::new();
        let mut parse = |field: &'static str, value: Option<String>, parser: Parser| {
            let parsed = value.map(|v| parser(&v));
            parsed.and_then(|p| {
                p.map_err(|e| violations.push(FieldViolation::new(field, format!("{field} {e}")))).ok()
            })
        };
        let changes = ProfileChanges {
            first_name: parse("first_name", update.first_name, |v| {
                PersonName::parse(v).map(PersonName::into_inner)
            }),
            last_name: parse("last_name", update.last_name, |v| {
                PersonName::parse(v).map(PersonName::into_inner)
            }),
            phone: parse("phone", update.phone, |v| Phone::parse(v).map(Phone::into_inner)),
            bio: parse("bio", update.bio, |v| Bio::parse(v).map(Bio::into_inner)),
        };
        let new_email = match update.email.as_deref().map(Email::parse) {
            Some(Ok(email)) => Some(email),
            Some(Err(e)) => {
                violations.push(FieldViolation::new("email", format!("email {e}")));
                None
            }
            None => None,
        };
        if new_email.is_some() && update.current_password.is_empty() {
            violations.push(FieldViolation::new(
                "current_password",
                "current_password is required to change the email",
            ));
        }
        if !violations.is_empty() {
            return Err(AuthError::InvalidArgument(violations));
        }

        let verified = match &new_email {
            Some(_) => {
                Some(self.verify_own_password(principal, &update.current_password, "current_password").await?)
            }
            None => None,
        };
        let now = now_micros();
        let mut tx = self.store.begin().await?;
        let current = match &verified {
            Some(user) => self.lock_unchanged(&mut tx, user, "current_password").await?,
            None => tx.lock_user(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?,
        };
        let user = tx.update_profile(current.id, &changes, now).await?;
        let pending = match new_email {
            Some(email) if email.key() != current.email.to_ascii_lowercase() => {
                self.queue_email_change(&mut tx, &user, &email, client).await?;
                true
            }
            // Asking for the current address again cancels a pending change.
            Some(_) => {
                tx.invalidate_tokens(user.id, TokenPurpose::ChangeEmail, now).await?;
                false
            }
            None => false,
        };
        self.commit_with_mail(tx).await?;
        Ok(ProfileUpdated { user, email_change_pending: pending })
    }

    /// Sends the confirmation link to the new address and a notice to the old one. Whether
    /// another account holds the new address is NOT checked here (that would tell the
    /// caller); confirming fails then.
    async fn queue_email_change(
        &self,
        tx: &mut Box<dyn StoreTx>,
        user: &UserRecord,
        email: &Email,
        client: &ClientInfo,
    ) -> Result<(), AuthError> {
        let ttl = self.mail.verification_ttl;
        let new_email = Some(email.as_str().to_string());
        let token = self.issue_link(tx, user.id, TokenPurpose::ChangeEmail, ttl, new_email).await?;
        // No name in mail to an address that has proven nothing yet.
        let confirm = self.templates.confirm_new_email("", &token, self.mail.verification_ttl);
        self.queue_mail(tx, Some(user.id), email.as_str(), confirm).await?;
        let masked = mask_email(email.as_str());
        let notice =
            self.templates.email_change_requested(greeting_name(user), &masked, &self.activity(client));
        self.queue_mail(tx, Some(user.id), &user.email, notice).await
    }

    /// Switches to the confirmed new address (verified, since its mailbox answered). Links
    /// mailed to the old address die, and the old address is told.
    pub async fn confirm_email_change(&self, token: &str) -> Result<(), AuthError> {
        let hash =
            one_time::parse(token, TokenPurpose::ChangeEmail).ok_or(AuthError::InvalidToken("token"))?;
        let now = now_micros();
        let (mut tx, user, spent) = self.spend_token(&hash, TokenPurpose::ChangeEmail, now).await?;
        let email = spent.new_email.as_deref().map(Email::parse).and_then(Result::ok);
        let email = email
            .ok_or_else(|| AuthError::Internal(anyhow::anyhow!("email-change token without an address")))?;
        tx.set_email(user.id, email.as_str(), &email.key(), now).await?;
        tx.invalidate_tokens(user.id, TokenPurpose::ResetPassword, now).await?;
        tx.invalidate_tokens(user.id, TokenPurpose::VerifyEmail, now).await?;
        let notice = self.templates.email_changed(greeting_name(&user), &mask_email(email.as_str()));
        self.queue_mail(&mut tx, Some(user.id), &user.email, notice).await?;
        self.commit_with_mail(tx).await?;
        tracing::info!(user_id = %user.id, "email changed");
        Ok(())
    }

    /// Deletes the caller's account after checking their password; every session ends.
    pub async fn delete_account(&self, principal: &Principal, password: &str) -> Result<(), AuthError> {
        if password.is_empty() {
            return Err(AuthError::invalid("password", "password is required"));
        }
        let verified = self.verify_own_password(principal, password, "password").await?;
        let mut tx = self.store.begin().await?;
        let user = self.lock_unchanged(&mut tx, &verified, "password").await?;
        let revoked = tx.delete_user(user.id, now_micros()).await?;
        tx.commit().await?;
        crate::metrics::revoked(crate::store::RevokeReason::AccountDeleted.as_str(), revoked.len());
        tracing::info!(user_id = %user.id, sessions = revoked.len(), "account deleted");
        self.publish_committed(&revoked).await;
        Ok(())
    }

    /// The caller's account, once `password` is checked against it (reported on `field`).
    pub(crate) async fn verify_own_password(
        &self,
        principal: &Principal,
        password: &str,
        field: &'static str,
    ) -> Result<UserRecord, AuthError> {
        let user = self.store.find_user(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        self.check_own_password(&user, password, field).await?;
        Ok(user)
    }
}
