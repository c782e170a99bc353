//! Logout and the user's own session management.

use uuid::Uuid;

use super::{Auth, AuthError, Principal, register::now_micros};
use crate::store::{RevokeReason, SessionRecord};

impl Auth {
    /// Ends the caller's current session.
    pub async fn logout(&self, principal: &Principal) -> Result<(), AuthError> {
        self.revoke_session(principal, principal.session_id, RevokeReason::Logout).await
    }

    /// The caller's live sessions, most recently active first. Activity seen by
    /// ValidateToken and not yet flushed is included.
    pub async fn list_sessions(&self, principal: &Principal) -> Result<Vec<SessionRecord>, AuthError> {
        let now = now_micros();
        let idle_cutoff = now - self.sessions.idle_timeout;
        let mut sessions = self.store.list_active_sessions(principal.user_id, now).await?;
        sessions.retain(|s| s.refreshed_at > idle_cutoff);
        for session in &mut sessions {
            if let Some(seen) = self.activity.pending(session.id) {
                session.last_active_at = session.last_active_at.max(seen);
            }
        }
        sessions.sort_by_key(|s| std::cmp::Reverse(s.last_active_at));
        Ok(sessions)
    }

    /// Ends one of the caller's sessions; another user's session is "not found".
    pub async fn revoke_session(
        &self,
        principal: &Principal,
        session_id: Uuid,
        reason: RevokeReason,
    ) -> Result<(), AuthError> {
        if !self.store.revoke_session(principal.user_id, session_id, reason, now_micros()).await? {
            return Err(AuthError::NotFound("session"));
        }
        crate::metrics::revoked(reason.as_str(), 1);
        self.publish_revocations(&[session_id]).await
    }

    /// Ends the caller's sessions, all of them or all but the current one. Returns how many.
    pub async fn revoke_sessions(
        &self,
        principal: &Principal,
        keep_current: bool,
    ) -> Result<usize, AuthError> {
        let keep = keep_current.then_some(principal.session_id);
        let now = now_micros();
        let revoked = self
            .store
            .revoke_user_sessions(principal.user_id, keep, RevokeReason::RevokedByUser, now)
            .await?;
        crate::metrics::revoked(RevokeReason::RevokedByUser.as_str(), revoked.len());
        // Publish every recent revocation of the user, not only this call's: if an earlier
        // attempt committed but failed to publish, its retry lands here with nothing new.
        let recent = self.store.revoked_sessions_of(principal.user_id, now - self.revocation_ttl).await?;
        self.publish_revocations(&recent).await?;
        Ok(revoked.len())
    }
}
