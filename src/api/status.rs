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
