//! [`HotState`] in process memory: the default for a single replica, and for tests.
//!
//! Revocations and rate limits are not shared between processes, so a deployment with
//! several replicas must use [`RedisHotState`](super::RedisHotState) instead.
//!
//! Memory stays bounded by what the last TTLs and windows need. Revocations: an expired entry
//! is removed when it is looked up, and all expired entries are dropped by a sweep once the
//! map has grown by as many revocations as it held after the previous sweep (at least
//! [`SWEEP_EVERY`]): each sweep's cost is paid for by the revocations since the last one, and
//! the map never holds more than about twice the revocations of the last TTL (plus
//! [`SWEEP_EVERY`]). Rate limits are kept in a map of their own, bounded the same way: a key
//! whose window is empty and whose block has expired is removed when it is looked up, and by
//! a sweep once as many keys were added as were left by the previous sweep (at least
//! [`SWEEP_EVERY`]); so the map holds at most about twice the keys hit within the last window
//! (or block) plus [`SWEEP_EVERY`], and each key at most `limit` events (a full window takes
//! no more). No background task.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use uuid::Uuid;

use super::{HotError, HotState, Limit, LimitDecision, debug_assert_limit_key};

/// Least number of insertions between two sweeps of expired entries.
const SWEEP_EVERY: usize = 1024;

/// Longest ttl, window or block honoured (a larger one is capped, so `Instant` arithmetic
/// cannot overflow).
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[derive(Debug, Default)]
pub struct MemoryHotState {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Session id → instant from which it is no longer revoked.
    revoked: HashMap<Uuid, Instant>,
    revoked_sweeps: SweepSchedule,
    /// Rate-limit key → its window and block.
    limits: HashMap<String, LimitEntry>,
    limits_sweeps: SweepSchedule,
}

/// When a map is next due for a sweep: after as many insertions as it held after the last
/// one (at least [`SWEEP_EVERY`]), so the sweeps cost O(1) amortised per insertion.
#[derive(Debug, Default)]
struct SweepSchedule {
    /// Insertions since the last sweep.
    since_sweep: usize,
    /// Number of entries left by the last sweep.
    len_after_sweep: usize,
}

impl SweepSchedule {
    /// Notes one insertion; whether the map is due for a sweep now.
    fn note_insertion(&mut self) -> bool {
        self.since_sweep += 1;
        self.since_sweep >= self.len_after_sweep.max(SWEEP_EVERY)
    }

    /// Notes a sweep that left `len` entries.
    fn swept(&mut self, len: usize) {
        self.since_sweep = 0;
        self.len_after_sweep = len;
    }
}

/// One rate-limit key.
#[derive(Debug)]
struct LimitEntry {
    /// Events still (as of the last look) in the window, oldest first, each with the member
    /// naming it. Ordered because every event is timed while holding the lock.
    events: VecDeque<(Instant, String)>,
    /// Until when the key is blocked, and the member of the event that blocked it.
    block: Option<(Instant, String)>,
    /// From when the entry holds nothing that matters (all its events have left the window
    /// of the last hit and its block has expired), for the sweep.
    idle_from: Instant,
}

impl LimitEntry {
    fn new(now: Instant) -> Self {
        Self { events: VecDeque::new(), block: None, idle_from: now }
    }

    /// Drops the events that left `window` and an expired block.
    fn expire(&mut self, now: Instant, window: Duration) {
        // An event at `t` is in the window while `t + window > now`.
        while self.events.front().is_some_and(|(at, _)| *at + window <= now) {
            self.events.pop_front();
        }
        if self.block.as_ref().is_some_and(|(until, _)| *until <= now) {
            self.block = None;
        }
    }

    /// Whether nothing is left (after [`Self::expire`]): the entry can be dropped.
    fn is_idle(&self) -> bool {
        self.events.is_empty() && self.block.is_none()
    }

    /// What a hit would answer now, without counting it (after [`Self::expire`]).
    fn decide(&self, now: Instant, limit: Limit, window: Duration) -> LimitDecision {
        if let Some((until, _)) = &self.block {
            return LimitDecision::Denied { retry_after: *until - now };
        }
        let count = self.events.len();
        let limit = limit.limit as usize;
        if count >= limit {
            // The window has room again once the event that now makes it full leaves it: the
            // oldest one, unless the limit was lowered and there are more events than it allows.
            let (at, _) = &self.events[count - limit];
            return LimitDecision::Denied { retry_after: *at + window - now };
        }
        LimitDecision::Allowed { count: count_u32(count) }
    }
}

/// A window's event count (never above a `u32` limit; saturating just in case).
fn count_u32(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// The window and block applied for `limit` (capped at [`MAX_TTL`]).
fn durations(limit: Limit) -> (Duration, Duration) {
    (limit.effective_window().min(MAX_TTL), limit.block.min(MAX_TTL))
}

impl MemoryHotState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of revocations currently held, expired or not (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().revoked.len()
    }

    /// Whether no revocation is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of rate-limit keys currently held, idle or not (for tests and metrics).
    pub fn limit_keys(&self) -> usize {
        self.lock().limits.len()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the maps consistent (every operation on them is
        // a single insert/remove/retain, or a change of one entry that leaves it valid), so a
        // poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn revoke(&mut self, session_id: Uuid, until: Instant, now: Instant) {
        self.revoked.insert(session_id, until);
        if self.revoked_sweeps.note_insertion() {
            self.revoked.retain(|_, until| *until > now);
            self.revoked_sweeps.swept(self.revoked.len());
        }
    }

    fn limit_hit(&mut self, key: &str, limit: Limit, member: &str, now: Instant) -> LimitDecision {
        let (window, block) = durations(limit);
        let decision = match self.limits.get_mut(key) {
            Some(entry) => {
                entry.expire(now, window);
                entry.decide(now, limit, window)
            }
            None => LimitDecision::Allowed { count: 0 },
        };
        if let LimitDecision::Denied { .. } = decision {
            return decision;
        }
        let entry = match self.limits.get_mut(key) {
            Some(entry) => entry,
            None => {
                if self.limits_sweeps.note_insertion() {
                    self.limits.retain(|_, entry| entry.idle_from > now);
                    self.limits_sweeps.swept(self.limits.len());
                }
                self.limits.entry(key.to_owned()).or_insert_with(|| LimitEntry::new(now))
            }
        };
        entry.events.push_back((now, member.to_owned()));
        entry.idle_from = entry.idle_from.max(now + window);
        let count = count_u32(entry.events.len());
        if count == limit.limit && !block.is_zero() {
            let until = now + block;
            entry.block = Some((until, member.to_owned()));
            entry.idle_from = entry.idle_from.max(until);
        }
        LimitDecision::Allowed { count }
    }

    fn limit_refund(&mut self, key: &str, member: &str) {
        let Some(entry) = self.limits.get_mut(key) else {
            return;
        };
        // A window holds at most `limit` events (a handful): a linear search is fine.
        if let Some(index) = entry.events.iter().position(|(_, m)| m == member) {
            entry.events.remove(index);
        }
        if entry.block.as_ref().is_some_and(|(_, m)| m == member) {
            entry.block = None;
        }
        if entry.is_idle() {
            self.limits.remove(key);
        }
    }

    fn limit_peek(&mut self, key: &str, limit: Limit, now: Instant) -> LimitDecision {
        let (window, _) = durations(limit);
        let Some(entry) = self.limits.get_mut(key) else {
            return LimitDecision::Allowed { count: 0 };
        };
        entry.expire(now, window);
        let decision = entry.decide(now, limit, window);
        if entry.is_idle() {
            self.limits.remove(key);
        }
        decision
    }
}

#[async_trait]
impl HotState for MemoryHotState {
    async fn ping(&self) -> Result<(), HotError> {
        Ok(())
    }

    async fn revoke_session(&self, session_id: Uuid, ttl: Duration) -> Result<(), HotError> {
        let now = Instant::now();
        self.lock().revoke(session_id, now + ttl.min(MAX_TTL), now);
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

    async fn limit_hit(&self, key: &str, limit: Limit, member: &str) -> Result<LimitDecision, HotError> {
        debug_assert_limit_key(key);
        if let Some(denied) = limit.zero_limit_denial() {
            return Ok(denied);
        }
        let mut inner = self.lock();
        // Timed under the lock, so each key's events are stored in time order.
        let now = Instant::now();
        Ok(inner.limit_hit(key, limit, member, now))
    }

    async fn limit_refund(&self, key: &str, member: &str) -> Result<(), HotError> {
        debug_assert_limit_key(key);
        self.lock().limit_refund(key, member);
        Ok(())
    }

    async fn limit_peek(&self, key: &str, limit: Limit) -> Result<LimitDecision, HotError> {
        debug_assert_limit_key(key);
        if let Some(denied) = limit.zero_limit_denial() {
            return Ok(denied);
        }
        let mut inner = self.lock();
        let now = Instant::now();
        Ok(inner.limit_peek(key, limit, now))
    }

    async fn limit_clear(&self, key: &str) -> Result<(), HotError> {
        debug_assert_limit_key(key);
        self.lock().limits.remove(key);
        Ok(())
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

    /// Many distinct keys with tiny windows (one key per millisecond, on a simulated clock):
    /// the map never holds more than about twice [`SWEEP_EVERY`] keys, and live keys survive.
    #[test]
    fn idle_limit_keys_are_swept() {
        let tiny = Limit { limit: 3, window: Duration::ZERO, block: Duration::ZERO };
        let blocking = Limit { limit: 1, window: Duration::ZERO, block: Duration::from_millis(2) };
        let long = Limit { limit: 3, window: Duration::from_secs(3600), block: Duration::ZERO };
        let start = Instant::now();
        let mut inner = Inner::default();
        assert_eq!(
            inner.limit_hit("login:ip:live", long, "live", start),
            LimitDecision::Allowed { count: 1 }
        );
        let mut most = 0;
        for i in 0..8 * SWEEP_EVERY {
            let now = start + Duration::from_millis(i as u64);
            // Every tenth key also blocks, for a little longer than its window.
            let limit = if i % 10 == 0 { blocking } else { tiny };
            let decision =
                inner.limit_hit(&format!("login:ip:10.0.{}.{}", i / 256, i % 256), limit, "m", now);
            assert_eq!(decision, LimitDecision::Allowed { count: 1 });
            most = most.max(inner.limits.len());
        }
        assert!(most <= 2 * SWEEP_EVERY + 1, "{most} keys held at once: unbounded");
        assert!(inner.limits.len() < 2 * SWEEP_EVERY, "{} keys left", inner.limits.len());
        let later = start + Duration::from_millis(8 * SWEEP_EVERY as u64);
        assert_eq!(inner.limit_peek("login:ip:live", long, later), LimitDecision::Allowed { count: 1 });
    }

    /// A key is not dropped while only its block (not its window) is live.
    #[test]
    fn blocked_key_outlives_its_window_in_the_sweep() {
        let blocking = Limit { limit: 1, window: Duration::from_millis(1), block: Duration::from_secs(60) };
        let tiny = Limit { limit: 1, window: Duration::from_millis(1), block: Duration::ZERO };
        let start = Instant::now();
        let mut inner = Inner::default();
        inner.limit_hit("login:ip:blocked", blocking, "m", start);
        for i in 0..4 * SWEEP_EVERY {
            let now = start + Duration::from_millis(10 + i as u64);
            inner.limit_hit(&format!("login:ip:{i}"), tiny, "m", now);
        }
        assert!(inner.limits.len() <= 2 * SWEEP_EVERY, "{} keys left", inner.limits.len());
        let later = start + Duration::from_secs(30);
        assert!(matches!(
            inner.limit_peek("login:ip:blocked", blocking, later),
            LimitDecision::Denied { .. }
        ));
    }

    #[tokio::test]
    async fn idle_limit_key_is_removed_on_lookup() {
        let hot = MemoryHotState::new();
        let limit = Limit { limit: 2, window: Duration::from_millis(1), block: Duration::ZERO };
        hot.limit_hit("login:ip:203.0.113.7", limit, "m").await.unwrap();
        assert_eq!(hot.limit_keys(), 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let decision = hot.limit_peek("login:ip:203.0.113.7", limit).await.unwrap();
        assert_eq!(decision, LimitDecision::Allowed { count: 0 });
        assert_eq!(hot.limit_keys(), 0);
    }

    #[tokio::test]
    async fn fully_refunded_limit_key_is_removed() {
        let hot = MemoryHotState::new();
        let limit = Limit { limit: 1, window: Duration::from_secs(60), block: Duration::from_secs(60) };
        hot.limit_hit("login:ip:203.0.113.7", limit, "m").await.unwrap();
        hot.limit_refund("login:ip:203.0.113.7", "m").await.unwrap();
        assert_eq!(hot.limit_keys(), 0);
    }

    #[tokio::test]
    async fn huge_window_and_block_do_not_panic() {
        let hot = MemoryHotState::new();
        let limit = Limit { limit: 1, window: Duration::MAX, block: Duration::MAX };
        let key = "register:ip:2001:db8::1";
        assert_eq!(hot.limit_hit(key, limit, "a").await.unwrap(), LimitDecision::Allowed { count: 1 });
        match hot.limit_hit(key, limit, "b").await.unwrap() {
            LimitDecision::Denied { retry_after } => assert!(retry_after > Duration::from_secs(3600)),
            other => panic!("second hit: {other:?}"),
        }
        assert!(matches!(hot.limit_peek(key, limit).await.unwrap(), LimitDecision::Denied { .. }));
    }
}
