//! Login with a password: one answer and one bcrypt for an unknown user or a wrong
//! password; a new session per successful login.

use uuid::Uuid;

use super::{Auth, AuthError, ClientInfo, IssuedTokens, domain::LoginIdentifier, register::now_micros};
use crate::{
    store::{AttemptOutcome, NewSession, SessionRecord, UserRecord},
    token::refresh,
};

/// Longest password accepted at login: anything longer cannot have been registered, and
/// refusing it early bounds the work an attacker can make us do.
const MAX_LOGIN_PASSWORD_BYTES: usize = 4096;

#[derive(Debug, Clone)]
pub struct LoginOutcome {
    pub user: UserRecord,
    pub session: SessionRecord,
    pub tokens: IssuedTokens,
}

impl Auth {
    /// Every attempt that names an account or a password is recorded in the login history,
    /// whatever its outcome.
    pub async fn login(
        self: &std::sync::Arc<Self>,
        identifier: &str,
        password: &str,
        client: &ClientInfo,
    ) -> Result<LoginOutcome, AuthError> {
        let typed = identifier.trim();
        let identifier = LoginIdentifier::parse(identifier)
            .map_err(|e| AuthError::invalid("identifier", format!("identifier {e}")))?;
        if password.is_empty() {
            return Err(AuthError::invalid("password", "password is required"));
        }
        if password.len() > MAX_LOGIN_PASSWORD_BYTES {
            return Err(AuthError::invalid("password", "password is too long"));
        }

        let user = self.store.find_user_by_login(identifier.key()).await?;
        let verified = self.hasher.verify(password, user.as_ref().map(|u| u.password_hash.as_str())).await?;
        let user = match user {
            Some(user) if verified.matches => user,
            user => {
                tracing::info!("login failed: invalid credentials");
                let user_id = user.map(|u| u.id);
                self.record_attempt(typed, user_id, AttemptOutcome::Failure, "invalid_credentials", client)
                    .await;
                return Err(AuthError::InvalidCredentials);
            }
        };
        if verified.needs_rehash {
            self.upgrade_hash(&user, password).await;
        }
        // Checked after the password, so it tells nothing to someone who does not know it.
        if self.require_verified_email && user.email_verified_at.is_none() {
            self.record_attempt(typed, Some(user.id), AttemptOutcome::Failure, "email_not_verified", client)
                .await;
            return Err(AuthError::EmailNotVerified);
        }

        let now = now_micros();
        let (refresh_token, refresh_hash) = refresh::generate();
        let session = self
            .store
            .create_session(&NewSession {
                id: Uuid::now_v7(),
                user_id: user.id,
                refresh_hash,
                device: client.device(),
                location: self.locate(client),
                created_at: now,
                expires_at: now + self.sessions.absolute_lifetime,
            })
            .await?;
        let tokens = self.issue_tokens(&user, &session, refresh_token, now)?;
        self.record_attempt(typed, Some(user.id), AttemptOutcome::Success, "ok", client).await;
        self.note_device(&user, client);
        tracing::info!(user_id = %user.id, session_id = %session.id, "login succeeded");
        Ok(LoginOutcome { user, session, tokens })
    }

    /// Re-hashes a legacy or outdated hash with the current scheme and cost. A failure
    /// here must not fail the login: the old hash still works.
    async fn upgrade_hash(&self, user: &UserRecord, password: &str) {
        let result = async {
            let hash = self.hasher.hash(password).await?;
            // Only if unchanged since we read it: never undo a concurrent password change.
            self.store.replace_password_hash(user.id, &user.password_hash, &hash).await?;
            Ok::<_, AuthError>(())
        }
        .await;
        match result {
            Ok(()) => tracing::info!(user_id = %user.id, "password hash upgraded"),
            Err(e) => tracing::warn!(user_id = %user.id, error = ?e, "password hash upgrade failed"),
        }
    }
}
