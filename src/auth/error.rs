//! The one error type of the flows. `api::status` maps it to gRPC, in one place.

use crate::{hot::HotError, password::HashError, store::StoreError, token::TokenRejection};

/// A problem with one field of a request, reported back field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: &'static str, description: impl Into<String>) -> FieldViolation {
        FieldViolation { field, description: description.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// The field (`username` or `email`) is taken.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// Wrong password or unknown account: one answer for both.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// Unknown, spent, expired or revoked refresh token: one answer for all.
    #[error("invalid refresh token")]
    InvalidRefreshToken,
    /// A mailed single-use token (in the named field) that is unknown, spent, expired or
    /// of another purpose: one answer for all.
    #[error("invalid or expired token")]
    InvalidToken(&'static str),
    /// The password was right but the account's email is not verified yet.
    #[error("email not verified")]
    EmailNotVerified,
    /// The bearer token of a user call is missing or not valid.
    #[error("not authenticated: {0:?}")]
    Unauthenticated(BearerProblem),
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Login refused before the password was checked: the account is locked, or the
    /// caller's address is blocked or throttled. One answer for all (and for accounts that
    /// do not exist), so it reveals nothing about the account.
    #[error("too many failed attempts")]
    TooManyAttempts { retry_after: std::time::Duration },
    /// A request limit (registrations per address, reset mails per account, ...).
    #[error("rate limited")]
    RateLimited { retry_after: std::time::Duration },
    /// A wrong second-factor code.
    #[error("invalid code")]
    InvalidMfaCode,
    /// The MFA challenge is unknown, used, expired or was cancelled: log in again.
    #[error("invalid MFA challenge")]
    MfaChallengeInvalid,
    /// The request does not fit the account's state (e.g. confirming a TOTP enrolment
    /// that was never begun).
    #[error("{message}")]
    FailedPrecondition { reason: &'static str, message: &'static str },
    /// A dependency (database, Redis) is down: retry later.
    #[error("service unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerProblem {
    Missing,
    Rejected(TokenRejection),
    SessionRevoked,
}

impl AuthError {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> AuthError {
        AuthError::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

impl From<StoreError> for AuthError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(field) => AuthError::AlreadyExists(field),
            StoreError::Unavailable(_) => AuthError::Unavailable(error.into()),
            other => AuthError::Internal(other.into()),
        }
    }
}

impl From<HotError> for AuthError {
    fn from(error: HotError) -> Self {
        AuthError::Unavailable(error.into())
    }
}

impl From<HashError> for AuthError {
    fn from(error: HashError) -> Self {
        match error {
            HashError::Busy => AuthError::Unavailable(error.into()),
            other => AuthError::Internal(other.into()),
        }
    }
}
