//! Second factors: the emailed login code and TOTP (with recovery codes), from the challenge
//! `login` hands out to the session `verify_mfa` opens, and their enrolment.
//!
//! Wrong codes spend the ACCOUNT's durable budget (`otp` guard: asking for a new code does
//! not reset it); when it runs out, every open challenge dies and further tries are refused
//! until the lockout ends. Each challenge is also rate limited in the hot state, and that
//! check fails closed: with Redis down, no code is checked at all.
//!
//! The emailed code is not an NIST SP 800-63B authenticator (email is not a secure channel
//! for out-of-band codes); TOTP is (a single-factor OTP device).

use std::sync::Arc;

use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Auth, AuthError, ClientInfo, Principal,
    guard::Guard,
    limits::Verdict,
    login::{AMR_PASSWORD_AND_OTP, LoginOutcome},
    mail::greeting_name,
    register::now_micros,
};
use crate::{
    mfa::{self, TotpSecret},
    store::{AttemptOutcome, MfaChallenge, MfaMethod, NewMfaChallenge, RevokeReason, UserRecord},
    token::opaque,
};

/// Prefix of MFA challenge tokens.
const CHALLENGE_PREFIX: &str = "pcmc_";

/// What `login` answers when a second factor is needed.
#[derive(Clone)]
pub struct MfaChallengeIssued {
    pub token: String,
    pub method: MfaMethod,
    pub expires_at: OffsetDateTime,
}

impl std::fmt::Debug for MfaChallengeIssued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a bearer secret: never in logs.
        f.debug_struct("MfaChallengeIssued").field("method", &self.method).finish_non_exhaustive()
    }
}

/// The second factors of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MfaStatus {
    pub email_otp_enabled: bool,
    pub totp_enabled: bool,
    pub recovery_codes_remaining: u32,
}

/// A begun TOTP enrolment: what the authenticator app needs.
#[derive(Clone)]
pub struct TotpEnrollment {
    pub secret_base32: String,
    pub otpauth_uri: String,
}

impl std::fmt::Debug for TotpEnrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpEnrollment(..)")
    }
}

/// How a second-factor try ended (settled in a task of its own, see `verify_mfa`).
enum CodeTry {
    Refused(std::time::Duration),
    Wrong,
    Right,
}

impl Auth {
    /// Opens a challenge for `user` (whose password was right); for the emailed code, the
    /// code is mailed in the same transaction. Opening one closes the user's older ones.
    pub(crate) async fn start_mfa(
        self: &Arc<Self>,
        user: &UserRecord,
        client: &ClientInfo,
    ) -> Result<MfaChallengeIssued, AuthError> {
        let method = if user.totp_enabled { MfaMethod::Totp } else { MfaMethod::EmailOtp };
        let now = now_micros();
        // No code is sent while the account's code budget is locked: someone holding the
        // password must not be able to flood the owner's mailbox or keep them locked out.
        let guard = Guard::second_factor(user.id, self.mfa.code_lockout);
        if let Some(until) = self.store.guard_state(&guard.key).await?.and_then(|g| g.locked_until)
            && until > now
        {
            let retry_after = std::time::Duration::try_from(until - now).unwrap_or_default();
            return Err(AuthError::TooManyAttempts {
                retry_after: retry_after.max(std::time::Duration::from_secs(1)),
            });
        }
        if method == MfaMethod::EmailOtp {
            let key = format!("mfa:mail:user:{}", user.id.simple());
            self.enforce_limits(vec![(key, &self.limits.login_codes_per_account)]).await?;
        }
        let id = Uuid::now_v7();
        let (token, token_hash) = opaque::generate(CHALLENGE_PREFIX);
        let mut tx = self.store.begin().await?;
        let (code_hash, ttl) = match method {
            MfaMethod::EmailOtp => {
                let code = mfa::generate_email_code();
                let ttl = self.mfa.email_code_ttl;
                let mail = self.templates.login_code(greeting_name(user), &code, ttl, &self.activity(client));
                self.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
                (Some(self.otp_key.hash_code(id.as_bytes(), &code)), ttl)
            }
            MfaMethod::Totp => (None, self.mfa.totp_challenge_ttl),
        };
        let expires_at = now + ttl;
        tx.create_mfa_challenge(&NewMfaChallenge {
            id,
            token_hash,
            user_id: user.id,
            method,
            code_hash,
            created_at: now,
            expires_at,
        })
        .await?;
        self.commit_with_mail(tx).await?;
        Ok(MfaChallengeIssued { token, method, expires_at })
    }

    /// Completes a login with the second factor; the session's `amr` is `pwd`, `otp`.
    pub async fn verify_mfa(
        self: &Arc<Self>,
        challenge_token: &str,
        code: &str,
        client: &ClientInfo,
    ) -> Result<LoginOutcome, AuthError> {
        if code.trim().is_empty() {
            return Err(AuthError::invalid("code", "code is required"));
        }
        if code.len() > 64 {
            return Err(AuthError::InvalidMfaCode);
        }
        // "123 456" and "123-456" are how people copy codes: not a wrong guess.
        let code = normalize_code(code);
        let challenge_token = challenge_token.trim();
        if !opaque::looks_valid(challenge_token, CHALLENGE_PREFIX) {
            return Err(AuthError::MfaChallengeInvalid);
        }
        let now = now_micros();
        let challenge = self
            .store
            .find_mfa_challenge(&opaque::hash(challenge_token), now)
            .await?
            .ok_or(AuthError::MfaChallengeInvalid)?;
        // Fails closed: without the hot state, no code is checked.
        let key = format!("mfa:challenge:{}", challenge.id.simple());
        let counted = match self.limiter.hit_strict(key, &self.limits.verify_mfa_per_challenge).await {
            Ok(Verdict::Allowed(counted)) => counted,
            Ok(Verdict::Denied { retry_after }) => return Err(AuthError::RateLimited { retry_after }),
            Err(error) => {
                self.resync.notify_one();
                return Err(error.into());
            }
        };
        let user = self.store.find_user(challenge.user_id).await?.ok_or(AuthError::MfaChallengeInvalid)?;
        // A challenge answers for the factor the account has now (changing factors closes
        // challenges; this is the belt to those braces).
        let still_valid = match challenge.method {
            MfaMethod::EmailOtp => user.email_otp_enabled && !user.totp_enabled,
            MfaMethod::Totp => user.totp_enabled,
        };
        if !still_valid {
            return Err(AuthError::MfaChallengeInvalid);
        }

        // Counted, checked and settled in a task of its own: a caller that cancels (a short
        // deadline) cannot leave a counted try unsettled and so dodge the lock.
        let auth = self.clone();
        let (settle_user, settle_code) = (user.clone(), code.clone());
        let settled =
            tokio::spawn(
                async move { auth.settle_code_try(&settle_user, &challenge, &settle_code, now).await },
            )
            .await
            .map_err(|e| AuthError::Internal(e.into()))??;
        match settled {
            CodeTry::Refused(retry_after) => {
                self.record_attempt(
                    &user.username,
                    Some(user.id),
                    AttemptOutcome::Failure,
                    "mfa_locked",
                    client,
                )
                .await;
                Err(AuthError::TooManyAttempts { retry_after })
            }
            CodeTry::Wrong => {
                self.record_attempt(
                    &user.username,
                    Some(user.id),
                    AttemptOutcome::Failure,
                    "invalid_mfa_code",
                    client,
                )
                .await;
                Err(AuthError::InvalidMfaCode)
            }
            CodeTry::Right => {
                self.limiter.refund(&counted).await;
                let outcome = self.open_session(user, client, AMR_PASSWORD_AND_OTP).await?;
                self.record_attempt(
                    &outcome.user.username,
                    Some(outcome.user.id),
                    AttemptOutcome::Success,
                    "ok",
                    client,
                )
                .await;
                Ok(outcome)
            }
        }
    }

    /// One code try against the account's budget: reserved, checked, then settled (a
    /// right code spends the challenge; the try that uses up the budget closes every
    /// challenge). Any error after reserving counts as a failure.
    async fn settle_code_try(
        &self,
        user: &UserRecord,
        challenge: &MfaChallenge,
        code: &str,
        now: OffsetDateTime,
    ) -> Result<CodeTry, AuthError> {
        let guard = Guard::second_factor(user.id, self.mfa.code_lockout);
        let reserved = match self.reserve_try(&guard).await? {
            Ok(reserved) => reserved,
            Err(retry_after) => {
                self.store.consume_mfa_challenges_of(user.id, now).await?;
                return Ok(CodeTry::Refused(retry_after));
            }
        };
        let checked = match challenge.method {
            MfaMethod::EmailOtp => Ok(challenge
                .code_hash
                .as_deref()
                .is_some_and(|stored| self.otp_key.verify_code(challenge.id.as_bytes(), code, stored))),
            MfaMethod::Totp => self.check_totp_or_recovery(user, code, now).await,
        };
        match checked {
            Ok(true) => {
                // Exactly one of concurrent right answers opens a session; a loser was not
                // a wrong guess either.
                self.try_succeeded(&guard).await;
                if self.store.consume_mfa_challenge(challenge.id, now).await? {
                    Ok(CodeTry::Right)
                } else {
                    Err(AuthError::MfaChallengeInvalid)
                }
            }
            Ok(false) => {
                if let Some(locked_for) = self.try_failed(&guard, reserved).await {
                    tracing::warn!(user_id = %user.id, ?locked_for, "second-factor budget used up: challenges closed");
                    self.store.consume_mfa_challenges_of(user.id, now).await?;
                }
                Ok(CodeTry::Wrong)
            }
            Err(error) => {
                self.try_failed(&guard, reserved).await;
                Err(error)
            }
        }
    }

    /// A TOTP code (each time step works once: a step not after the last used one is a
    /// replay) or, in its place, an unused recovery code.
    async fn check_totp_or_recovery(
        &self,
        user: &UserRecord,
        code: &str,
        now: OffsetDateTime,
    ) -> Result<bool, AuthError> {
        if let Some(recovery) = mfa::normalize_recovery_code(code) {
            let used = self
                .store
                .consume_recovery_code(user.id, &self.recovery_hash(user.id, &recovery), now)
                .await?;
            if used {
                tracing::warn!(user_id = %user.id, "recovery code used");
                self.mail_recovery_code_used(user).await;
            }
            return Ok(used);
        }
        let Some(secret) = self.totp_secret(user.id).await? else { return Ok(false) };
        let Some(step) = mfa::totp::verify(&secret, code, unix(now), self.mfa.totp_skew_steps) else {
            return Ok(false);
        };
        Ok(self.store.advance_totp_step(user.id, step_i64(step)).await?)
    }

    /// Recovery codes carry ~50 bits: a bare SHA-256 could be brute-forced from a stolen
    /// database, so they are keyed with the server secret and bound to their account.
    fn recovery_hash(&self, user_id: Uuid, normalized: &str) -> Vec<u8> {
        self.otp_key.hash_code(format!("recovery:{user_id}").as_bytes(), normalized)
    }

    async fn totp_secret(&self, user_id: Uuid) -> Result<Option<TotpSecret>, AuthError> {
        let Some(sealed) = self.store.totp_state(user_id).await?.and_then(|s| s.secret) else {
            return Ok(None);
        };
        self.open_totp_secret(user_id, &sealed).map(Some)
    }

    fn open_totp_secret(&self, user_id: Uuid, sealed: &[u8]) -> Result<TotpSecret, AuthError> {
        let secret = self
            .sealer
            .open(user_id.as_bytes(), sealed)
            .map_err(|e| AuthError::Internal(anyhow::anyhow!("cannot open a TOTP secret: {e}")))?;
        TotpSecret::from_bytes(&secret)
            .map_err(|e| AuthError::Internal(anyhow::anyhow!("stored TOTP secret is malformed: {e}")))
    }

    pub async fn mfa_status(&self, user_id: Uuid) -> Result<MfaStatus, AuthError> {
        let user = self.store.find_user(user_id).await?.ok_or(AuthError::NotFound("account"))?;
        let recovery_codes_remaining =
            if user.totp_enabled { self.store.remaining_recovery_codes(user.id).await? } else { 0 };
        Ok(MfaStatus {
            email_otp_enabled: user.email_otp_enabled,
            totp_enabled: user.totp_enabled,
            recovery_codes_remaining,
        })
    }

    /// Switches the emailed login code on or off; needs the password (and, on an account
    /// that already has a second factor, a session opened with it). Switching it on ends
    /// the account's other sessions, which were opened without it.
    pub async fn set_email_otp(
        &self,
        principal: &Principal,
        enabled: bool,
        current_password: &str,
    ) -> Result<MfaStatus, AuthError> {
        let verified = self.password_for_mfa_change(principal, current_password).await?;
        let now = now_micros();
        let mut tx = self.store.begin().await?;
        let user = self.lock_unchanged(&mut tx, &verified, "current_password").await?;
        tx.set_email_otp(user.id, enabled, now).await?;
        let revoked = if enabled && !has_second_factor(&user) {
            tx.revoke_user_sessions(
                user.id,
                Some(principal.session_id),
                RevokeReason::SecondFactorEnabled,
                now,
            )
            .await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        crate::metrics::revoked(RevokeReason::SecondFactorEnabled.as_str(), revoked.len());
        self.publish_committed(&revoked).await;
        tracing::info!(user_id = %user.id, enabled, sessions_ended = revoked.len(), "email login code switched");
        self.mfa_status(user.id).await
    }

    /// A new TOTP secret, pending until `confirm_totp` proves the app holds it. Beginning
    /// again replaces a pending secret; an enabled TOTP stays as it is until then.
    pub async fn begin_totp(
        &self,
        principal: &Principal,
        current_password: &str,
    ) -> Result<TotpEnrollment, AuthError> {
        let verified = self.password_for_mfa_change(principal, current_password).await?;
        let secret = TotpSecret::generate();
        let sealed = self.sealer.seal(verified.id.as_bytes(), secret.as_bytes());
        let mut tx = self.store.begin().await?;
        let user = self.lock_unchanged(&mut tx, &verified, "current_password").await?;
        tx.set_totp_pending(user.id, Some(&sealed), now_micros()).await?;
        tx.commit().await?;
        let otpauth_uri = mfa::totp::otpauth_uri(&secret, &self.mfa.issuer, &user.username);
        Ok(TotpEnrollment { secret_base32: secret.to_base32(), otpauth_uri })
    }

    /// Turns TOTP on with a code from the app; returns the recovery codes (only now, in
    /// clear: the store keeps keyed hashes). Wrong codes spend the account's code budget,
    /// so a stolen access token cannot guess its way through a pending enrolment. Ends the
    /// account's other sessions when it is the first second factor.
    pub async fn confirm_totp(
        &self,
        principal: &Principal,
        code: &str,
    ) -> Result<(Vec<String>, MfaStatus), AuthError> {
        if code.trim().is_empty() {
            return Err(AuthError::invalid("code", "code is required"));
        }
        let code = normalize_code(code);
        let not_begun = AuthError::FailedPrecondition {
            reason: "TOTP_NOT_PENDING",
            message: "no TOTP enrolment to confirm: call BeginTotpEnrollment first",
        };
        let state = self.store.totp_state(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        let Some(sealed) = state.pending_secret else { return Err(not_begun) };
        let secret = self.open_totp_secret(principal.user_id, &sealed)?;
        let guard = Guard::second_factor(principal.user_id, self.mfa.code_lockout);
        let reserved = match self.reserve_try(&guard).await? {
            Ok(reserved) => reserved,
            Err(retry_after) => return Err(AuthError::TooManyAttempts { retry_after }),
        };
        let now = now_micros();
        let Some(step) = mfa::totp::verify(&secret, &code, unix(now), self.mfa.totp_skew_steps) else {
            self.try_failed(&guard, reserved).await;
            return Err(AuthError::invalid("code", "code is incorrect"));
        };
        self.try_succeeded(&guard).await;
        let codes = mfa::generate_recovery_codes(self.mfa.recovery_codes as usize);
        let hashes: Vec<Vec<u8>> = codes
            .iter()
            .filter_map(|c| mfa::normalize_recovery_code(c))
            .map(|c| self.recovery_hash(principal.user_id, &c))
            .collect();
        let mut tx = self.store.begin().await?;
        let user = tx.lock_user(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        if !tx.activate_totp(principal.user_id, &sealed, step_i64(step), &hashes, now).await? {
            return Err(not_begun);
        }
        let revoked = if has_second_factor(&user) {
            Vec::new()
        } else {
            tx.revoke_user_sessions(
                user.id,
                Some(principal.session_id),
                RevokeReason::SecondFactorEnabled,
                now,
            )
            .await?
        };
        tx.commit().await?;
        crate::metrics::revoked(RevokeReason::SecondFactorEnabled.as_str(), revoked.len());
        self.publish_committed(&revoked).await;
        tracing::info!(user_id = %principal.user_id, sessions_ended = revoked.len(), "TOTP enabled");
        Ok((codes, self.mfa_status(principal.user_id).await?))
    }

    /// Turns TOTP off and deletes the recovery codes; needs the password and a session
    /// opened with the second factor.
    pub async fn disable_totp(
        &self,
        principal: &Principal,
        current_password: &str,
    ) -> Result<MfaStatus, AuthError> {
        let verified = self.password_for_mfa_change(principal, current_password).await?;
        let mut tx = self.store.begin().await?;
        let user = self.lock_unchanged(&mut tx, &verified, "current_password").await?;
        tx.disable_totp(user.id, now_micros()).await?;
        tx.commit().await?;
        tracing::info!(user_id = %user.id, "TOTP disabled");
        self.mfa_status(user.id).await
    }

    /// The password check of an MFA change. On an account that already has a second
    /// factor, the caller's session must have been opened with it: a thief holding the
    /// password and an older session cannot remove (or replace) the factor.
    async fn password_for_mfa_change(
        &self,
        principal: &Principal,
        password: &str,
    ) -> Result<UserRecord, AuthError> {
        if password.is_empty() {
            return Err(AuthError::invalid("current_password", "current_password is required"));
        }
        let user = self.store.find_user(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        self.require_second_factor_session(principal, &user)?;
        self.verify_own_password(principal, password, "current_password").await
    }

    /// Refuses a sensitive change (second factors, the email address) from a session that
    /// was opened without the account's second factor.
    pub(crate) fn require_second_factor_session(
        &self,
        principal: &Principal,
        user: &UserRecord,
    ) -> Result<(), AuthError> {
        if has_second_factor(user) && !principal.amr.iter().any(|m| m == "otp") {
            return Err(AuthError::FailedPrecondition {
                reason: "SECOND_FACTOR_REQUIRED",
                message: "sign in again with your second factor to change this",
            });
        }
        Ok(())
    }

    /// Tells the owner a recovery code was spent, and how many are left. Best effort.
    async fn mail_recovery_code_used(&self, user: &UserRecord) {
        let result = async {
            let remaining = self.store.remaining_recovery_codes(user.id).await?;
            let mail = self.templates.recovery_code_used(greeting_name(user), remaining);
            let mut tx = self.store.begin().await?;
            self.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
            self.commit_with_mail(tx).await
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(user_id = %user.id, error = ?error, "cannot mail the recovery-code notice");
        }
    }
}

fn has_second_factor(user: &UserRecord) -> bool {
    user.totp_enabled || user.email_otp_enabled
}

/// A code as typed, without the spaces and hyphens people copy codes with (only when what
/// is left is six digits; anything else is kept as typed, e.g. a recovery code).
fn normalize_code(code: &str) -> String {
    let digits: String = code.chars().filter(|c| !c.is_whitespace() && *c != '-').collect();
    if digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits
    } else {
        code.trim().to_string()
    }
}

fn unix(now: OffsetDateTime) -> u64 {
    u64::try_from(now.unix_timestamp()).unwrap_or(0)
}

fn step_i64(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX)
}
