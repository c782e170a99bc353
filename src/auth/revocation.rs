//! Revocations: the store records them (the source of truth); the hot state makes them
//! visible to ValidateToken on every replica without touching SQL.
//!
//! The hot state can lose them (a Redis restart, failover or eviction; a fresh in-memory
//! state at start-up), so a reconciler re-publishes every revocation whose tokens may still
//! be alive: at start-up, every `revocation_resync_interval`, and as soon as the hot state
//! answers again after an error.

use std::time::Duration;

use uuid::Uuid;

use super::{Auth, AuthError, register::now_micros};

impl Auth {
    /// Tells every replica, through the hot state, that these sessions are over. Tries all
    /// of them even if one fails; the call can then be retried as a whole.
    pub(crate) async fn publish_revocations(&self, sessions: &[Uuid]) -> Result<(), AuthError> {
        let mut failure = None;
        for &session in sessions {
            if let Err(e) = self.hot.revoke_session(session, self.revocation_ttl).await {
                failure = Some(e);
            }
        }
        match failure {
            None => Ok(()),
            Some(e) => {
                self.resync.notify_one();
                Err(e.into())
            }
        }
    }

    /// Publishes revocations whose change has ALREADY committed: a failure is logged and left
    /// to the reconciler (already woken), because answering an error would make the caller
    /// retry a flow that cannot be repeated (a spent token, a changed password).
    pub(crate) async fn publish_committed(&self, sessions: &[Uuid]) {
        if let Err(error) = self.publish_revocations(sessions).await {
            tracing::warn!(error = ?error, sessions = sessions.len(), "revocations committed but not yet published; the reconciler will");
        }
    }

    /// Tells the reconciler the hot state failed: it re-publishes as soon as it answers again.
    pub fn hot_state_failed(&self) {
        self.resync.notify_one();
    }

    /// Re-publishes every revocation whose access tokens may still be alive. Returns how
    /// many.
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
        // Only now: a flush seen after this makes the marker disappear, and the reconciler
        // notices within a second.
        self.hot.mark_revocations_complete().await?;
        Ok(revoked.len())
    }

    /// Keeps the hot state's revocations complete until `stop` resolves: re-publishes every
    /// `interval`, at once when a hot-state error was seen or when the hot state lost its
    /// data (checked every second: the completeness marker is gone after a restart without
    /// persistence or a FLUSHALL), and retries every second while it fails.
    pub async fn reconcile_revocations(
        &self,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        const CHECK_EVERY: Duration = Duration::from_secs(1);
        tokio::pin!(stop);
        let mut due = interval;
        let mut last = std::time::Instant::now();
        loop {
            let republish = tokio::select! {
                () = tokio::time::sleep(CHECK_EVERY.min(due)) => {
                    last.elapsed() >= due || match self.hot.revocations_complete().await {
                        Ok(complete) => {
                            if !complete {
                                tracing::warn!("the hot state lost its revocations (restart or flush): re-publishing now");
                            }
                            !complete
                        }
                        Err(_) => true,
                    }
                }
                () = self.resync.notified() => {
                    // Let the hot state come back before trying.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    true
                }
                () = &mut stop => return,
            };
            if !republish {
                continue;
            }
            last = std::time::Instant::now();
            due = match self.republish_recent_revocations().await {
                Ok(count) => {
                    tracing::debug!(count, "revocations re-published");
                    interval
                }
                Err(error) => {
                    tracing::warn!(error = ?error, "cannot re-publish revocations; retrying");
                    interval.min(Duration::from_secs(1))
                }
            };
        }
    }
}
