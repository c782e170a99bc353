//! The flows: register, login, refresh, logout, token validation and session management.
//! They know nothing of protobuf, tonic or which database runs underneath.

mod account;
pub mod activity;
pub mod client;
mod devices;
pub mod domain;
pub mod error;
mod guard;
mod history;
mod limits;
mod login;
mod mail;
mod mfa;
mod password;
mod refresh;
mod register;
pub mod revocation;
mod sessions;
#[cfg(test)]
mod tests;
mod validate;
mod verification;

use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

pub use account::{AccountView, ProfileUpdate, ProfileUpdated};
pub use activity::ActivityRecorder;
pub use client::ClientInfo;
pub use error::{AuthError, BearerProblem, FieldViolation};
pub use history::HistoryPage;
pub use login::{LoginOutcome, LoginResult};
pub use mfa::{MfaChallengeIssued, MfaStatus, TotpEnrollment};
pub use register::Registration;
pub use validate::{InvalidReason, TokenCheck, ValidToken, ValidatesTokens, decide};

use crate::{
    config::{LimitSettings, LoginSettings, MailSettings, MfaSettings, SessionSettings},
    hot::DynHotState,
    mail::Templates,
    password::{PasswordHasher, PasswordPolicy},
    store::{DynStore, SessionRecord, UserRecord},
    token::AccessTokens,
};

/// Everything the flows depend on, built once at start-up.
pub struct Auth {
    store: DynStore,
    hot: DynHotState,
    hasher: PasswordHasher,
    policy: PasswordPolicy,
    tokens: AccessTokens,
    activity: std::sync::Arc<ActivityRecorder>,
    sessions: SessionSettings,
    /// How long a revocation must be remembered in the hot state: until every access
    /// token issued before it has expired.
    revocation_ttl: Duration,
    /// Woken when the hot state fails, so the reconciler re-publishes revocations as soon
    /// as it is back.
    resync: tokio::sync::Notify,
    templates: Templates,
    mail: MailSettings,
    /// Wakes the outbox worker right after a mail is committed.
    outbox: std::sync::Arc<tokio::sync::Notify>,
    login: LoginSettings,
    limits: LimitSettings,
    mfa: MfaSettings,
    limiter: limits::Limiter,
    /// Keys the hashes of emailed login codes.
    otp_key: crate::mfa::OtpKey,
    /// Encrypts TOTP secrets at rest.
    sealer: crate::mfa::SecretSealer,
    /// Bounds the work done after answering (reset and verification mails).
    background: std::sync::Arc<tokio::sync::Semaphore>,
    geo: Option<crate::geo::GeoIp>,
}

/// At most this many post-answer jobs at once.
const BACKGROUND_JOBS: usize = 64;

/// The authenticated caller of a user call (from `authorization: Bearer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub roles: Vec<String>,
    /// How the caller's session was authenticated (RFC 8176 method references).
    pub amr: Vec<String>,
}

/// An access token with the instant it expires.
#[derive(Debug, Clone)]
pub struct IssuedAccessToken {
    pub token: String,
    pub expires_at: OffsetDateTime,
}

/// What login and refresh hand out.
#[derive(Debug, Clone)]
pub struct IssuedTokens {
    pub access: IssuedAccessToken,
    pub refresh_token: String,
    /// When the refresh token stops working if unused (idle timeout or absolute end).
    pub refresh_expires_at: OffsetDateTime,
}

/// The parts of [`Auth`] that are built elsewhere.
pub struct AuthParts {
    pub store: DynStore,
    pub hot: DynHotState,
    pub hasher: PasswordHasher,
    pub policy: PasswordPolicy,
    pub tokens: AccessTokens,
    pub activity: std::sync::Arc<ActivityRecorder>,
    pub sessions: SessionSettings,
    pub leeway: Duration,
    pub mail: MailSettings,
    pub outbox: std::sync::Arc<tokio::sync::Notify>,
    pub login: LoginSettings,
    pub limits: LimitSettings,
    pub mfa: MfaSettings,
    /// The server secret (the password pepper) the MFA keys are derived from.
    pub server_secret: Vec<u8>,
    pub geo: Option<crate::geo::GeoIp>,
}

impl Auth {
    pub fn new(parts: AuthParts) -> Auth {
        // Leeway twice: it is the clock-skew budget between the replica that signed a token
        // and the one that checks it.
        let revocation_ttl = parts.tokens.ttl() + 2 * parts.leeway + Duration::from_secs(1);
        Auth {
            store: parts.store,
            hot: parts.hot.clone(),
            hasher: parts.hasher,
            policy: parts.policy,
            tokens: parts.tokens,
            activity: parts.activity,
            sessions: parts.sessions,
            revocation_ttl,
            resync: tokio::sync::Notify::new(),
            templates: Templates::new(&parts.mail),
            mail: parts.mail,
            outbox: parts.outbox,
            limiter: limits::Limiter::new(parts.hot.clone()),
            otp_key: crate::mfa::OtpKey::derive(&parts.server_secret, "portcullis email otp v1"),
            sealer: crate::mfa::SecretSealer::derive(&parts.server_secret, "portcullis totp secret v1"),
            login: parts.login,
            limits: parts.limits,
            mfa: parts.mfa,
            background: std::sync::Arc::new(tokio::sync::Semaphore::new(BACKGROUND_JOBS)),
            geo: parts.geo,
        }
    }

    pub fn tokens(&self) -> &AccessTokens {
        &self.tokens
    }

    /// Signs an access token for `user` in `session`, and its refresh companion's expiry.
    fn issue_tokens(
        &self,
        user: &UserRecord,
        session: &SessionRecord,
        refresh_token: String,
        now: OffsetDateTime,
    ) -> Result<IssuedTokens, AuthError> {
        let amr: Vec<&str> = session.amr.iter().map(String::as_str).collect();
        let subject = crate::token::access::Subject {
            user_id: user.id,
            session_id: session.id,
            roles: &user.roles,
            amr: &amr,
            email_verified: user.email_verified_at.is_some(),
        };
        let (token, claims) = self.tokens.issue(&subject, now).map_err(|e| AuthError::Internal(e.into()))?;
        let expires_at =
            OffsetDateTime::from_unix_timestamp(claims.exp).map_err(|e| AuthError::Internal(e.into()))?;
        let idle_end = session.refreshed_at + self.sessions.idle_timeout;
        Ok(IssuedTokens {
            access: IssuedAccessToken { token, expires_at },
            refresh_token,
            refresh_expires_at: idle_end.min(session.expires_at),
        })
    }
}
