//! Revocations: the store records them (the source of truth); the hot state makes them
//! visible to ValidateToken on every replica without touching SQL.

use std::time::Duration;

use uuid::Uuid;

use super::{Auth, AuthError, register::now_micros};

impl Auth {
    /// Tells every replica, through the hot state, that these sessions are over.
    pub(crate) async fn publish_revocations(&self, sessions: &[Uuid]) -> Result<(), AuthError> {
        for &session in sessions {
            self.hot.revoke_session(session, self.revocation_ttl).await?;
        }
        Ok(())
    }

    /// Re-publishes every revocation whose access tokens may still be alive. Run at
    /// start-up, so a hot state that lost its data (a Redis restart, a fresh in-memory
    /// state) never lets a revoked session's token validate again.
    pub async fn republish_recent_revocations(&self) -> Result<usize, AuthError> {
        let now = now_micros();
        let since = now - self.revocation_ttl;
        let revoked = self.store.revoked_since(since).await?;
        for (session, revoked_at) in &revoked {
            let remaining = (*revoked_at + self.revocation_ttl - now).max(time::Duration::ZERO);
            let ttl =
                Duration::try_from(remaining).unwrap_or(self.revocation_ttl).max(Duration::from_secs(1));
            self.hot.revoke_session(*session, ttl).await?;
        }
        Ok(revoked.len())
    }
}
