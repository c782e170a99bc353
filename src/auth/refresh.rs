//! Refresh: rotate the refresh token atomically; a spent token presented again (after a
//! short grace for concurrent refreshes) means it was stolen, so the session is revoked
//! (RFC 9700 §4.14.2).

use super::{Auth, AuthError, IssuedTokens, register::now_micros};
use crate::{
    store::{RefreshRotation, RevokeReason, RotateOutcome},
    token::refresh,
};

impl Auth {
    pub async fn refresh(&self, presented: &str) -> Result<IssuedTokens, AuthError> {
        if presented.is_empty() {
            return Err(AuthError::invalid("refresh_token", "refresh_token is required"));
        }
        if !refresh::looks_valid(presented) {
            return Err(AuthError::InvalidRefreshToken);
        }
        let now = now_micros();
        let (new_token, new_hash) = refresh::generate();
        let rotation = RefreshRotation {
            presented_hash: refresh::hash(presented),
            new_hash,
            now,
            idle_cutoff: now - self.sessions.idle_timeout,
        };
        match self.store.rotate_refresh_token(&rotation).await? {
            RotateOutcome::Rotated(session) => {
                crate::telemetry::record_user_id(session.user_id);
                // Roles and verification state are read afresh: changes apply at refresh.
                let user =
                    self.store.find_user(session.user_id).await?.ok_or(AuthError::InvalidRefreshToken)?;
                self.issue_tokens(&user, &session, new_token, now)
            }
            RotateOutcome::Superseded(session) => {
                let since_rotation = now - session.refreshed_at;
                if since_rotation <= self.sessions.refresh_reuse_grace {
                    tracing::info!(session_id = %session.id, "refresh token presented twice within the grace period");
                } else {
                    tracing::warn!(
                        user_id = %session.user_id,
                        session_id = %session.id,
                        "refresh token reuse detected: revoking the session"
                    );
                    let reason = RevokeReason::RefreshTokenReuse;
                    if self.store.revoke_session(session.user_id, session.id, reason, now).await? {
                        crate::metrics::revoked(reason.as_str(), 1);
                    }
                    // The owner hears of it even if Redis is down right now; the
                    // reconciler publishes what this cannot.
                    self.mail_refresh_reuse(&session).await;
                    self.publish_committed(&[session.id]).await;
                }
                Err(AuthError::InvalidRefreshToken)
            }
            RotateOutcome::Dead(session) => {
                // A recent revocation may have failed to reach the hot state (the call that
                // made it answered UNAVAILABLE): publishing again is idempotent and cheap.
                if session.revoked_at.is_some_and(|at| at > now - self.revocation_ttl) {
                    self.publish_revocations(&[session.id]).await?;
                }
                Err(AuthError::InvalidRefreshToken)
            }
            RotateOutcome::Unknown => Err(AuthError::InvalidRefreshToken),
        }
    }
}
