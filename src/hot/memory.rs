//! [`HotState`] in process memory: the default for a single replica, and for tests.
//!
//! Revocations are not shared between processes, so a deployment with several replicas
//! must use [`RedisHotState`](super::RedisHotState) instead.
//!
//! Memory stays bounded by the revocations of the last TTL: an expired entry is removed
//! when it is looked up, and all expired entries are dropped by a sweep once the map has
//! grown by as many revocations as it held after the previous sweep (at least
//! [`SWEEP_EVERY`]): each sweep's cost is paid for by the revocations since the last one, and
//! the map never holds more than about twice the revocations of the last TTL (plus
//! [`SWEEP_EVERY`]). No background task.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use uuid::Uuid;

use super::{HotError, HotState};

/// Least number of revocations between two sweeps of expired entries.
const SWEEP_EVERY: usize = 1024;

/// Longest ttl honoured (a larger one is capped, so `Instant` arithmetic cannot overflow).
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[derive(Debug, Default)]
pub struct MemoryHotState {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Session id → instant from which it is no longer revoked.
    revoked: HashMap<Uuid, Instant>,
    /// Revocations since the last sweep.
    since_sweep: usize,
    /// Number of entries left by the last sweep.
    len_after_sweep: usize,
}

impl MemoryHotState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries currently held, expired or not (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().revoked.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map consistent (every operation on it is
        // a single insert/remove/retain), so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn sweep_if_due(&mut self, now: Instant) {
        self.since_sweep += 1;
        if self.since_sweep >= self.len_after_sweep.max(SWEEP_EVERY) {
            self.revoked.retain(|_, until| *until > now);
            self.since_sweep = 0;
            self.len_after_sweep = self.revoked.len();
        }
    }
}

#[async_trait]
impl HotState for MemoryHotState {
    async fn ping(&self) -> Result<(), HotError> {
        Ok(())
    }

    async fn revoke_session(&self, session_id: Uuid, ttl: Duration) -> Result<(), HotError> {
        let now = Instant::now();
        let until = now + ttl.min(MAX_TTL);
        let mut inner = self.lock();
        inner.revoked.insert(session_id, until);
        inner.sweep_if_due(now);
        Ok(())
    }

    async fn is_session_revoked(&self, session_id: Uuid) -> Result<bool, HotError> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.revoked.get(&session_id) {
            Some(until) if *until > now => Ok(true),
            Some(_) => {
                inner.revoked.remove(&session_id);
                Ok(false)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expired_entries_are_swept() {
        let hot = MemoryHotState::new();
        for _ in 0..SWEEP_EVERY {
            hot.revoke_session(Uuid::new_v4(), Duration::ZERO).await.unwrap();
        }
        // Every entry had expired by the time the sweep ran (ttl zero).
        assert!(hot.len() < SWEEP_EVERY, "len {} not swept", hot.len());
        let live = Uuid::new_v4();
        hot.revoke_session(live, Duration::from_secs(60)).await.unwrap();
        for _ in 0..4 * SWEEP_EVERY {
            hot.revoke_session(Uuid::new_v4(), Duration::ZERO).await.unwrap();
        }
        assert!(hot.len() <= 2 * SWEEP_EVERY, "len {} unbounded", hot.len());
        assert!(hot.is_session_revoked(live).await.unwrap());
    }

    #[tokio::test]
    async fn expired_entry_is_removed_on_lookup() {
        let hot = MemoryHotState::new();
        let id = Uuid::new_v4();
        hot.revoke_session(id, Duration::ZERO).await.unwrap();
        assert_eq!(hot.len(), 1);
        assert!(!hot.is_session_revoked(id).await.unwrap());
        assert!(hot.is_empty());
    }

    #[tokio::test]
    async fn huge_ttl_does_not_panic() {
        let hot = MemoryHotState::new();
        let id = Uuid::new_v4();
        hot.revoke_session(id, Duration::MAX).await.unwrap();
        assert!(hot.is_session_revoked(id).await.unwrap());
    }
}
