//! The one mapping from [`AuthError`] to `tonic::Status`, with `google.rpc` details:
//! `ErrorInfo` with a stable reason code on every error, `BadRequest` field violations for
//! bad input, `RetryInfo` when retrying later may help. Unexpected errors are logged with
//! their cause chain and answered generically: internals never leak to callers.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    auth::{AuthError, BearerProblem},
    token::TokenRejection,
};

/// The `ErrorInfo.domain` of every error we answer.
pub const ERROR_DOMAIN: &str = "portcullis";

pub fn to_status(error: AuthError) -> Status {
    let (code, message, reason, mut details) = match error {
        AuthError::InvalidArgument(violations) => {
            let message = violations.iter().map(|v| v.description.as_str()).collect::<Vec<_>>().join("; ");
            let mut details = ErrorDetails::new();
            for v in &violations {
                details.add_bad_request_violation(v.field, v.description.clone());
            }
            (Code::InvalidArgument, message, "INVALID_ARGUMENT", details)
        }
        AuthError::AlreadyExists(field) => {
            let details =
                ErrorDetails::with_bad_request_violation(field, format!("{field} is already taken"));
            let reason = if field == "email" { "EMAIL_TAKEN" } else { "USERNAME_TAKEN" };
            (Code::AlreadyExists, format!("{field} is already taken"), reason, details)
        }
        AuthError::InvalidCredentials => (
            Code::Unauthenticated,
            "invalid username, email or password".into(),
            "INVALID_CREDENTIALS",
            ErrorDetails::new(),
        ),
        AuthError::InvalidRefreshToken => (
            Code::Unauthenticated,
            "refresh token is invalid, expired or already used".into(),
            "INVALID_REFRESH_TOKEN",
            ErrorDetails::new(),
        ),
        AuthError::InvalidToken(field) => (
            Code::InvalidArgument,
            format!("{field} is invalid, expired or already used"),
            "INVALID_TOKEN",
            ErrorDetails::with_bad_request_violation(
                field,
                format!("{field} is invalid, expired or already used"),
            ),
        ),
        AuthError::EmailNotVerified => (
            Code::FailedPrecondition,
            "email address not verified: follow the link in the verification mail".into(),
            "EMAIL_NOT_VERIFIED",
            ErrorDetails::new(),
        ),
        AuthError::Unauthenticated(problem) => {
            let (message, reason) = bearer_problem(problem);
            (Code::Unauthenticated, message.into(), reason, ErrorDetails::new())
        }
        AuthError::NotFound(what) => {
            (Code::NotFound, format!("{what} not found"), "NOT_FOUND", ErrorDetails::new())
        }
        AuthError::TooManyAttempts { retry_after } => (
            Code::ResourceExhausted,
            format!("too many failed attempts; retry in {}s", retry_secs(retry_after)),
            "TOO_MANY_ATTEMPTS",
            ErrorDetails::with_retry_info(Some(retry_after)),
        ),
        AuthError::RateLimited { retry_after } => (
            Code::ResourceExhausted,
            format!("too many requests; retry in {}s", retry_secs(retry_after)),
            "RATE_LIMITED",
            ErrorDetails::with_retry_info(Some(retry_after)),
        ),
        AuthError::InvalidMfaCode => {
            (Code::Unauthenticated, "invalid code".into(), "INVALID_MFA_CODE", ErrorDetails::new())
        }
        AuthError::MfaChallengeInvalid => (
            Code::Unauthenticated,
            "MFA challenge is invalid, expired or already used; log in again".into(),
            "MFA_CHALLENGE_INVALID",
            ErrorDetails::new(),
        ),
        AuthError::FailedPrecondition { reason, message } => {
            (Code::FailedPrecondition, message.into(), reason, ErrorDetails::new())
        }
        AuthError::Unavailable(cause) => {
            tracing::warn!(error = format!("{cause:#}"), "dependency unavailable");
            (
                Code::Unavailable,
                "service temporarily unavailable; retry later".into(),
                "UNAVAILABLE",
                ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(1))),
            )
        }
        AuthError::Internal(cause) => {
            tracing::error!(error = format!("{cause:#}"), "internal error");
            (Code::Internal, "internal error".into(), "INTERNAL", ErrorDetails::new())
        }
    };
    details.set_error_info(reason, ERROR_DOMAIN, HashMap::new());
    Status::with_error_details(code, message, details)
}

/// Whole seconds, rounded up: "retry in 0s" would invite a retry that fails again.
fn retry_secs(retry_after: std::time::Duration) -> u64 {
    retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)
}

fn bearer_problem(problem: BearerProblem) -> (&'static str, &'static str) {
    match problem {
        BearerProblem::Missing => {
            ("missing bearer token: send `authorization: Bearer <access token>`", "MISSING_TOKEN")
        }
        BearerProblem::SessionRevoked => ("session has ended", "SESSION_REVOKED"),
        BearerProblem::Rejected(rejection) => match rejection {
            TokenRejection::Expired => ("access token expired", "TOKEN_EXPIRED"),
            TokenRejection::NotYetValid => ("access token not yet valid", "TOKEN_NOT_YET_VALID"),
            TokenRejection::Malformed => ("access token malformed", "TOKEN_MALFORMED"),
            TokenRejection::BadSignature | TokenRejection::WrongIssuer | TokenRejection::WrongAudience => {
                ("access token invalid", "TOKEN_INVALID")
            }
        },
    }
}
