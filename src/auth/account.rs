//! The user's own account: read it, change profile fields (a new email only after the new
//! mailbox confirms it), delete it.

use super::{
    Auth, AuthError, ClientInfo, FieldViolation, Principal,
    domain::{Bio, Email, PersonName, Phone},
    mail::{activity, greeting_name},
    register::now_micros,
};
use crate::{
    mail::mask_email,
    store::{NewOneTimeToken, ProfileChanges, StoreTx, TokenPurpose, UserRecord},
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
}

/// What `update_profile` did.
#[derive(Debug, Clone)]
pub struct ProfileUpdated {
    pub user: UserRecord,
    pub email_change_pending: bool,
}

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
        let mut parse =
            |field: &'static str, value: Option<String>, parser: fn(&str) -> Result<String, String>| {
                value.and_then(|v| {
                    parser(&v)
                        .map_err(|e| violations.push(FieldViolation::new(field, format!("{field} {e}"))))
                        .ok()
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
        let new_email = match update.email.map(|e| Email::parse(&e)) {
            Some(Ok(email)) => Some(email),
            Some(Err(e)) => {
                violations.push(FieldViolation::new("email", format!("email {e}")));
                None
            }
            None => None,
        };
        if !violations.is_empty() {
            return Err(AuthError::InvalidArgument(violations));
        }

        let now = now_micros();
        let mut tx = self.store.begin().await?;
        let current = tx.lock_user(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        let user = tx.update_profile(current.id, &changes, now).await?;
        let new_email = new_email.filter(|e| e.key() != current.email.to_ascii_lowercase());
        if let Some(email) = &new_email {
            self.queue_email_change(&mut tx, &user, email, client).await?;
        }
        self.commit_with_mail(tx).await?;
        Ok(ProfileUpdated { user, email_change_pending: new_email.is_some() })
    }

    /// Sends the confirmation link to the new address and a notice to the old one.
    async fn queue_email_change(
        &self,
        tx: &mut Box<dyn StoreTx>,
        user: &UserRecord,
        email: &Email,
        client: &ClientInfo,
    ) -> Result<(), AuthError> {
        if tx.find_user_by_login(&email.key()).await?.is_some_and(|other| other.id != user.id) {
            return Err(AuthError::AlreadyExists("email"));
        }
        let now = now_micros();
        let (token, hash) = one_time::generate(TokenPurpose::ChangeEmail);
        tx.issue_token(&NewOneTimeToken {
            hash,
            user_id: user.id,
            purpose: TokenPurpose::ChangeEmail,
            created_at: now,
            expires_at: now + self.mail.verification_ttl,
            new_email: Some(email.as_str().to_string()),
        })
        .await?;
        let name = greeting_name(user);
        let confirm = self.templates.confirm_new_email(name, &token, self.mail.verification_ttl);
        self.queue_mail(tx, Some(user.id), email.as_str(), confirm).await?;
        let notice =
            self.templates.email_change_requested(name, &mask_email(email.as_str()), &activity(client));
        self.queue_mail(tx, Some(user.id), &user.email, notice).await
    }

    /// Switches to the confirmed new address (verified, since its mailbox answered).
    pub async fn confirm_email_change(&self, token: &str) -> Result<(), AuthError> {
        let hash =
            one_time::parse(token, TokenPurpose::ChangeEmail).ok_or(AuthError::InvalidToken("token"))?;
        let now = now_micros();
        let mut tx = self.store.begin().await?;
        let spent = tx
            .consume_token(&hash, TokenPurpose::ChangeEmail, now)
            .await?
            .ok_or(AuthError::InvalidToken("token"))?;
        let email = spent.new_email.as_deref().map(Email::parse).and_then(Result::ok);
        let email = email
            .ok_or_else(|| AuthError::Internal(anyhow::anyhow!("email-change token without an address")))?;
        tx.set_email(spent.user_id, email.as_str(), &email.key(), now).await?;
        tx.mark_email_verified(spent.user_id, now).await?;
        tx.commit().await?;
        tracing::info!(user_id = %spent.user_id, "email changed");
        Ok(())
    }

    /// Deletes the caller's account after checking their password; every session ends.
    pub async fn delete_account(&self, principal: &Principal, password: &str) -> Result<(), AuthError> {
        if password.is_empty() {
            return Err(AuthError::invalid("password", "password is required"));
        }
        let user = self.store.find_user(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        if !self.hasher.verify(password, Some(&user.password_hash)).await?.matches {
            return Err(AuthError::invalid("password", "password is incorrect"));
        }
        let mut tx = self.store.begin().await?;
        let revoked = tx.delete_user(user.id, now_micros()).await?;
        tx.commit().await?;
        tracing::info!(user_id = %user.id, sessions = revoked.len(), "account deleted");
        self.publish_revocations(&revoked).await
    }
}
