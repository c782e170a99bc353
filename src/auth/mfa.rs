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
    store::{AttemptOutcome, MfaMethod, NewMfaChallenge, UserRecord},
    token::opaque,
};

/// Prefix of MFA challenge tokens.
const CHALLENGE_PREFIX: &str = "pcmc_";

/// What `login` answers when a second factor is needed.
#[derive(Debug, Clone)]
pub struct MfaChallengeIssued {
    pub token: String,
    pub method: MfaMethod,
    pub expires_at: OffsetDateTime,
}

/// The second factors of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MfaStatus {
    pub email_otp_enabled: bool,
    pub totp_enabled: bool,
    pub recovery_codes_remaining: u32,
}

/// A begun TOTP enrolment: what the authenticator app needs.
#[derive(Debug, Clone)]
pub struct TotpEnrollment {
    pub secret_base32: String,
    pub otpauth_uri: String,
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
        let guard = Guard::second_factor(user.id, self.mfa.code_lockout);
        let reserved = match self.reserve_try(&guard).await? {
            Ok(reserved) => reserved,
            Err(retry_after) => {
                self.store.consume_mfa_challenges_of(user.id, now).await?;
                self.record_attempt(
                    &user.username,
                    Some(user.id),
                    AttemptOutcome::Failure,
                    "mfa_locked",
                    client,
                )
                .await;
                return Err(AuthError::TooManyAttempts { retry_after });
            }
        };

        let good = match challenge.method {
            MfaMethod::EmailOtp => challenge
                .code_hash
                .as_deref()
                .is_some_and(|stored| self.otp_key.verify_code(challenge.id.as_bytes(), code, stored)),
            MfaMethod::Totp => self.check_totp_or_recovery(&user, code, now).await?,
        };
        if !good {
            if let Some(locked_for) = self.try_failed(&guard, reserved).await {
                tracing::warn!(user_id = %user.id, ?locked_for, "second-factor budget used up: challenges closed");
                self.store.consume_mfa_challenges_of(user.id, now).await?;
            }
            self.record_attempt(
                &user.username,
                Some(user.id),
                AttemptOutcome::Failure,
                "invalid_mfa_code",
                client,
            )
            .await;
            return Err(AuthError::InvalidMfaCode);
        }
        // Exactly one of concurrent right answers opens a session.
        if !self.store.consume_mfa_challenge(challenge.id, now).await? {
            return Err(AuthError::MfaChallengeInvalid);
        }
        self.try_succeeded(&guard).await;
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

    /// Switches the emailed login code on or off; needs the password.
    pub async fn set_email_otp(
        &self,
        principal: &Principal,
        enabled: bool,
        current_password: &str,
    ) -> Result<MfaStatus, AuthError> {
        let verified = self.password_for_mfa_change(principal, current_password).await?;
        let mut tx = self.store.begin().await?;
        let user = self.lock_unchanged(&mut tx, &verified, "current_password").await?;
        tx.set_email_otp(user.id, enabled, now_micros()).await?;
        tx.commit().await?;
        tracing::info!(user_id = %user.id, enabled, "email login code switched");
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
    /// clear: the store keeps their hashes).
    pub async fn confirm_totp(
        &self,
        principal: &Principal,
        code: &str,
    ) -> Result<(Vec<String>, MfaStatus), AuthError> {
        if code.trim().is_empty() {
            return Err(AuthError::invalid("code", "code is required"));
        }
        let not_begun = AuthError::FailedPrecondition {
            reason: "TOTP_NOT_PENDING",
            message: "no TOTP enrolment to confirm: call BeginTotpEnrollment first",
        };
        let state = self.store.totp_state(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        let Some(sealed) = state.pending_secret else { return Err(not_begun) };
        let secret = self.open_totp_secret(principal.user_id, &sealed)?;
        let now = now_micros();
        let Some(step) = mfa::totp::verify(&secret, code, unix(now), self.mfa.totp_skew_steps) else {
            return Err(AuthError::invalid("code", "code is incorrect"));
        };
        let codes = mfa::generate_recovery_codes(self.mfa.recovery_codes as usize);
        let hashes: Vec<Vec<u8>> = codes
            .iter()
            .filter_map(|c| mfa::normalize_recovery_code(c))
            .map(|c| self.recovery_hash(principal.user_id, &c))
            .collect();
        let mut tx = self.store.begin().await?;
        tx.lock_user(principal.user_id).await?.ok_or(AuthError::NotFound("account"))?;
        if !tx.activate_totp(principal.user_id, &sealed, step_i64(step), &hashes, now).await? {
            return Err(not_begun);
        }
        tx.commit().await?;
        tracing::info!(user_id = %principal.user_id, "TOTP enabled");
        Ok((codes, self.mfa_status(principal.user_id).await?))
    }

    /// Turns TOTP off and deletes the recovery codes; needs the password.
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

    async fn password_for_mfa_change(
        &self,
        principal: &Principal,
        password: &str,
    ) -> Result<UserRecord, AuthError> {
        if password.is_empty() {
            return Err(AuthError::invalid("current_password", "current_password is required"));
        }
        self.verify_own_password(principal, password, "current_password").await
    }
}

fn unix(now: OffsetDateTime) -> u64 {
    u64::try_from(now.unix_timestamp()).unwrap_or(0)
}

fn step_i64(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX)
}
