//! Login with a password: one answer and one bcrypt for an unknown user, a wrong password
//! or a locked account; throttles per address before any of that; a new session per
//! successful login, or an MFA challenge when the account has a second factor.

use std::sync::Arc;

use uuid::Uuid;

use super::{
    Auth, AuthError, ClientInfo, IssuedTokens,
    devices::device_key,
    domain::LoginIdentifier,
    guard::Guard,
    limits::{Counted, Verdict, ip_part, key_part},
    mfa::MfaChallengeIssued,
    register::now_micros,
};
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

/// What a right password gets.
#[derive(Debug, Clone)]
pub enum LoginResult {
    Authenticated(Box<LoginOutcome>),
    /// The account has a second factor: finish with `verify_mfa`.
    MfaRequired(MfaChallengeIssued),
}

/// How a password try ended.
enum PasswordTry {
    Locked(std::time::Duration),
    Wrong { locked_for: Option<std::time::Duration> },
    Right { needs_rehash: bool },
}

/// The lock worth mailing the owner about: the account's. A known device's own lock (the
/// owner mistyping on their phone) pauses nothing else.
fn locked_for_account(guard: &Guard, locked_for: Option<std::time::Duration>) -> Option<std::time::Duration> {
    locked_for.filter(|_| guard.key.scope == "account")
}

/// Authentication methods (RFC 8176) of a session, as the access token's `amr` claim.
pub(crate) const AMR_PASSWORD: &[&str] = &["pwd"];
pub(crate) const AMR_PASSWORD_AND_OTP: &[&str] = &["pwd", "otp"];

impl Auth {
    /// Every attempt that names an account or a password is recorded in the login history,
    /// whatever its outcome.
    pub async fn login(
        self: &Arc<Self>,
        identifier: &str,
        password: &str,
        client: &ClientInfo,
    ) -> Result<LoginResult, AuthError> {
        let typed = identifier.trim();
        let identifier = LoginIdentifier::parse(identifier)
            .map_err(|e| AuthError::invalid("identifier", format!("identifier {e}")))?;
        if password.is_empty() {
            return Err(AuthError::invalid("password", "password is required"));
        }
        if password.len() > MAX_LOGIN_PASSWORD_BYTES {
            return Err(AuthError::invalid("password", "password is too long"));
        }

        // Per address first: cheap, and refusing here costs no bcrypt (nor a database
        // write: refused tries are not recorded, so a blocked flood stays off the disk).
        // Counted before the password is checked (a parallel burst gets no more than the
        // limit evaluated) and given back if it proves right.
        let client_counts = match self.count_client_failure(client).await {
            Ok(counts) => counts,
            Err(retry_after) => {
                tracing::info!("login refused: address blocked or throttled");
                crate::metrics::login(crate::metrics::LoginOutcome::Throttled);
                return Err(AuthError::TooManyAttempts { retry_after });
            }
        };

        let user = self.store.find_user_by_login(identifier.key()).await?;
        let guard = self.password_guard(identifier.key(), user.as_ref(), client).await?;
        let user_id = user.as_ref().map(|u| u.id);
        // Counted, checked and settled in a task of its own: a caller that cancels (a short
        // deadline) or a full bcrypt queue cannot leave a counted try unsettled and so
        // dodge the lock.
        let (auth, settle_guard) = (self.clone(), guard.clone());
        let (attempt, stored_hash) = (password.to_string(), user.as_ref().map(|u| u.password_hash.clone()));
        let settled = tokio::spawn(async move {
            auth.settle_password_try(&settle_guard, &attempt, stored_hash.as_deref()).await
        })
        .await
        .map_err(|e| AuthError::Internal(e.into()))??;
        let (user, needs_rehash) = match settled {
            PasswordTry::Locked(retry_after) => {
                tracing::info!("login refused: locked");
                self.record_attempt(typed, user_id, AttemptOutcome::Failure, "locked", client).await;
                return Err(AuthError::TooManyAttempts { retry_after });
            }
            // A right password needs a stored hash, so an account.
            PasswordTry::Right { needs_rehash } => (
                user.ok_or_else(|| {
                    AuthError::Internal(anyhow::anyhow!("no account behind a right password"))
                })?,
                needs_rehash,
            ),
            PasswordTry::Wrong { locked_for } => {
                tracing::info!("login failed: invalid credentials");
                if let Some(locked_for) = locked_for_account(&guard, locked_for) {
                    self.on_lockout(user_id, locked_for, client);
                }
                self.record_attempt(typed, user_id, AttemptOutcome::Failure, "invalid_credentials", client)
                    .await;
                return Err(AuthError::InvalidCredentials);
            }
        };

        // The password is right: what it spent from the address throttles comes back.
        for counted in &client_counts {
            self.limiter.refund(counted).await;
        }
        if needs_rehash {
            self.upgrade_hash(&user, password).await;
        }
        // Checked after the password, so it tells nothing to someone who does not know it.
        if self.login.require_verified_email && user.email_verified_at.is_none() {
            self.record_attempt(typed, Some(user.id), AttemptOutcome::Failure, "email_not_verified", client)
                .await;
            return Err(AuthError::EmailNotVerified);
        }
        if user.totp_enabled || user.email_otp_enabled {
            crate::telemetry::record_user_id(user.id);
            let challenge = self.start_mfa(&user, client).await?;
            self.record_attempt(typed, Some(user.id), AttemptOutcome::Failure, "mfa_required", client).await;
            tracing::info!(user_id = %user.id, "password right: second factor required");
            return Ok(LoginResult::MfaRequired(challenge));
        }
        let outcome = self.open_session(user, client, AMR_PASSWORD).await?;
        self.record_attempt(typed, Some(outcome.user.id), AttemptOutcome::Success, "ok", client).await;
        Ok(LoginResult::Authenticated(Box::new(outcome)))
    }

    /// One password try against `guard`: reserved, checked, settled. A locked guard still
    /// pays one bcrypt (against a dummy hash), so locked, unknown and wrong answers take
    /// the same time. A right password resets the budget it spent — only that one: a
    /// known device's success does not lift a lock an attacker ran up on the account.
    async fn settle_password_try(
        &self,
        guard: &Guard,
        password: &str,
        stored_hash: Option<&str>,
    ) -> Result<PasswordTry, AuthError> {
        let reserved = match self.reserve_try(guard).await? {
            Ok(reserved) => reserved,
            Err(retry_after) => {
                let _ = self.hasher.verify(password, None).await?;
                return Ok(PasswordTry::Locked(retry_after));
            }
        };
        match self.hasher.verify(password, stored_hash).await {
            Ok(verified) if verified.matches && stored_hash.is_some() => {
                self.try_succeeded(guard).await;
                Ok(PasswordTry::Right { needs_rehash: verified.needs_rehash })
            }
            Ok(_) => Ok(PasswordTry::Wrong { locked_for: self.try_failed(guard, reserved).await }),
            Err(error) => {
                // Not checked (bcrypt queue full): still counted as a failure.
                self.try_failed(guard, reserved).await;
                Err(error.into())
            }
        }
    }

    /// A new session with its tokens, once every factor is proven.
    pub(crate) async fn open_session(
        self: &Arc<Self>,
        user: UserRecord,
        client: &ClientInfo,
        amr: &'static [&'static str],
    ) -> Result<LoginOutcome, AuthError> {
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
                amr: amr.iter().map(|m| m.to_string()).collect(),
            })
            .await?;
        let tokens = self.issue_tokens(&user, &session, refresh_token, now)?;
        self.note_device(&user, client);
        crate::telemetry::record_user_id(user.id);
        tracing::info!(user_id = %user.id, session_id = %session.id, "login succeeded");
        Ok(LoginOutcome { user, session, tokens })
    }

    /// The address throttles: failures from this IP across accounts, and from this (IP,
    /// device) in a short window. `Err` is how long to wait.
    async fn count_client_failure(&self, client: &ClientInfo) -> Result<Vec<Counted>, std::time::Duration> {
        // Without an address, one shared bucket: leaving it out must not escape the limits.
        let ip = ip_part(client.ip);
        let device = if client.fingerprint.trim().is_empty() {
            format!("ua:{}", client.user_agent.trim())
        } else {
            format!("fp:{}", client.fingerprint.trim())
        };
        let mut counts = Vec::with_capacity(2);
        for (key, rate) in [
            (format!("login:ip:{ip}"), &self.login.ip_block),
            (format!("login:client:{ip}:{}", key_part(&device)), &self.login.client_throttle),
        ] {
            match self.limiter.hit(key, rate, || self.resync.notify_one()).await {
                Verdict::Allowed(counted) => counts.push(counted),
                Verdict::Denied { retry_after } => {
                    // Refused before any password was checked: not a failure to keep.
                    for counted in &counts {
                        self.limiter.refund(counted).await;
                    }
                    return Err(retry_after);
                }
            }
        }
        Ok(counts)
    }

    /// The budget this password try spends: the device's own when it already logged in to
    /// the account, else the account's (or, for an identifier that names no account, that
    /// identifier's — so a locked answer looks the same whether or not the account exists).
    async fn password_guard(
        &self,
        identifier_key: &str,
        user: Option<&UserRecord>,
        client: &ClientInfo,
    ) -> Result<Guard, AuthError> {
        let device = device_key(client);
        let Some(user) = user else {
            // The same query as for an account, so the two paths cost the same.
            let _ = self.store.is_known_device(Uuid::nil(), &device).await?;
            return Ok(Guard::unknown_identifier(identifier_key, self.login.account_lockout));
        };
        if self.store.is_known_device(user.id, &device).await? {
            Ok(Guard::known_device(user.id, &device, self.login.known_device_lockout))
        } else {
            Ok(Guard::account(user.id, self.login.account_lockout))
        }
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

    /// Mails the owner that password sign-ins are paused (after the answer; best effort).
    fn on_lockout(
        self: &Arc<Self>,
        user_id: Option<Uuid>,
        locked_for: std::time::Duration,
        client: &ClientInfo,
    ) {
        tracing::warn!(user_id = ?user_id, ?locked_for, "account locked after failed logins");
        let Some(user_id) = user_id else { return };
        let client = client.clone();
        self.in_background("lockout alert", move |auth| async move {
            let Some(user) = auth.store.find_user(user_id).await? else { return Ok(()) };
            let mail = auth.templates.account_locked(
                super::mail::greeting_name(&user),
                locked_for,
                &auth.activity(&client),
            );
            let mut tx = auth.store.begin().await?;
            auth.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
            auth.commit_with_mail(tx).await
        });
    }
}
