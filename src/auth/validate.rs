//! ValidateToken, the hot path: verify the JWT in process, ask the hot state whether its
//! session was revoked, never touch SQL. "Last active" is noted in memory and written
//! behind in batches.

use time::OffsetDateTime;
use uuid::Uuid;

use super::{Auth, AuthError, BearerProblem, Principal};
use crate::{
    hot::{HotError, HotState},
    token::{AccessClaims, TokenRejection},
};

/// Why a token does not pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    Token(TokenRejection),
    SessionRevoked,
    MissingRole,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValidToken {
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub roles: Vec<String>,
    pub expires_at: OffsetDateTime,
    pub email_verified: bool,
    /// How the session was authenticated (RFC 8176: `pwd`, `otp`).
    pub amr: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenCheck {
    Valid(ValidToken),
    Invalid(InvalidReason),
}

/// Anything that answers ValidateToken: the full server ([`Auth`]) or the validator
/// (sidecar) mode, which has no database. The gRPC and ext_authz adapters take either.
#[async_trait::async_trait]
pub trait ValidatesTokens: Send + Sync + 'static {
    /// Checks a token and, optionally, that it carries every role in `required_roles`.
    /// `Err` only when the answer cannot be known (hot state down): fail closed.
    async fn validate_token(&self, token: &str, required_roles: &[String]) -> Result<TokenCheck, AuthError>;
}

/// The decision once the signature is checked (or answered from the verified-claims
/// cache): well-formed ids, not revoked, the roles asked for. Shared by both modes.
pub async fn decide(
    verified: Result<std::sync::Arc<AccessClaims>, TokenRejection>,
    hot: &dyn HotState,
    required_roles: &[String],
) -> Result<TokenCheck, HotError> {
    let claims = match verified {
        Ok(claims) => claims,
        Err(rejection) => return Ok(TokenCheck::Invalid(InvalidReason::Token(rejection))),
    };
    let (Ok(user_id), Ok(session_id), Ok(expires_at)) = (
        Uuid::parse_str(&claims.sub),
        Uuid::parse_str(&claims.sid),
        OffsetDateTime::from_unix_timestamp(claims.exp),
    ) else {
        return Ok(TokenCheck::Invalid(InvalidReason::Token(TokenRejection::Malformed)));
    };
    if hot.is_session_revoked(session_id).await? {
        return Ok(TokenCheck::Invalid(InvalidReason::SessionRevoked));
    }
    if !required_roles.iter().all(|role| claims.roles.contains(role)) {
        return Ok(TokenCheck::Invalid(InvalidReason::MissingRole));
    }
    Ok(TokenCheck::Valid(ValidToken {
        user_id,
        session_id,
        roles: claims.roles.clone(),
        expires_at,
        email_verified: claims.email_verified,
        amr: claims.amr.clone(),
    }))
}

#[async_trait::async_trait]
impl ValidatesTokens for Auth {
    async fn validate_token(&self, token: &str, required_roles: &[String]) -> Result<TokenCheck, AuthError> {
        Auth::validate_token(self, token, required_roles).await
    }
}

impl Auth {
    /// Checks a token and, optionally, that it carries every role in `required_roles`, and
    /// notes the session active (written behind). `Err` only when the answer cannot be
    /// known (hot state down): fail closed.
    pub async fn validate_token(
        &self,
        token: &str,
        required_roles: &[String],
    ) -> Result<TokenCheck, AuthError> {
        let check = decide(self.tokens.verify_cached(token), &*self.hot, required_roles)
            .await
            .inspect_err(|_| self.resync.notify_one())?;
        if let TokenCheck::Valid(valid) = &check {
            self.activity.record(valid.session_id, OffsetDateTime::now_utc());
        }
        Ok(check)
    }

    /// The caller of a user call, from its bearer token (`None` when the call had none).
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, AuthError> {
        let token = bearer.ok_or(AuthError::Unauthenticated(BearerProblem::Missing))?;
        match self.validate_token(token, &[]).await? {
            TokenCheck::Valid(valid) => {
                crate::telemetry::record_user_id(valid.user_id);
                Ok(Principal {
                    user_id: valid.user_id,
                    session_id: valid.session_id,
                    roles: valid.roles,
                    amr: valid.amr,
                })
            }
            TokenCheck::Invalid(InvalidReason::Token(rejection)) => {
                Err(AuthError::Unauthenticated(BearerProblem::Rejected(rejection)))
            }
            TokenCheck::Invalid(_) => Err(AuthError::Unauthenticated(BearerProblem::SessionRevoked)),
        }
    }
}
