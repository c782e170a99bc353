//! Ephemeral state shared by every replica: Redis in production, process memory by default.
//!
//! Both implement [`HotState`]; `tests/hot_conformance.rs` runs one suite against both.
//! Nothing here is the source of truth: what must survive a Redis flush lives in the store
//! and is re-published from it (see `auth::revocation`).

mod memory;
mod mirror;
mod redis;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use uuid::Uuid;

pub use self::memory::MemoryHotState;
pub use self::redis::{RedisHotState, RedisTls};

#[async_trait]
pub trait HotState: Send + Sync + 'static {
    /// Cheap round trip, for health checks.
    async fn ping(&self) -> Result<(), HotError>;

    /// Marks a session revoked for `ttl` (long enough for every access token issued for it
    /// to expire). Idempotent; a second call extends nothing beyond the new `ttl`.
    async fn revoke_session(&self, session_id: Uuid, ttl: Duration) -> Result<(), HotError>;

    /// Whether the session was revoked within its `ttl`.
    async fn is_session_revoked(&self, session_id: Uuid) -> Result<bool, HotError>;

    /// Whether the revocations are known to be complete: false once the hot state lost its
    /// data (a restart without persistence, FLUSHALL) since the last
    /// [`mark_revocations_complete`](Self::mark_revocations_complete). Process memory cannot
    /// lose them on its own.
    async fn revocations_complete(&self) -> Result<bool, HotError> {
        Ok(true)
    }

    /// Notes that every live revocation has just been (re-)published.
    async fn mark_revocations_complete(&self) -> Result<(), HotError> {
        Ok(())
    }

    /// Atomically: if `key` is blocked, or the window already holds `limit.limit` events, answers
    /// Denied and changes nothing (a denied call never extends a block or a window). Otherwise
    /// records one event named `member` (unique per call; the caller makes it) and answers Allowed;
    /// when this event makes the count reach `limit.limit` and `limit.block` is non-zero, the key
    /// becomes blocked for `limit.block`, the block remembering `member`.
    /// retry_after when blocked = remaining block time; when the window is full = time until its
    /// oldest event leaves the window (more exactly: until the window holds fewer than
    /// `limit.limit` events, which is the same unless the limit was lowered since).
    ///
    /// `key` is a plain string such as `login:ip:203.0.113.7`, non-empty and without `{` or `}`
    /// (the Redis implementation wraps it in a Cluster hash tag). A `limit.limit` of zero denies
    /// every hit (retry after the window, or 1 s when the window is zero); a zero window counts
    /// as 1 ms.
    async fn limit_hit(&self, key: &str, limit: Limit, member: &str) -> Result<LimitDecision, HotError>;

    /// Takes back event `member` (the caller's attempt turned out fine, e.g. a successful login):
    /// removes it from the window, and lifts the block if (and only if) that event set it.
    /// Unknown member or key: does nothing.
    async fn limit_refund(&self, key: &str, member: &str) -> Result<(), HotError>;

    /// What `limit_hit` would answer, without counting (`Allowed { count }` = events currently
    /// in the window).
    async fn limit_peek(&self, key: &str, limit: Limit) -> Result<LimitDecision, HotError>;

    /// Forgets the key's window and block.
    async fn limit_clear(&self, key: &str) -> Result<(), HotError>;
}

pub type DynHotState = Arc<dyn HotState>;

#[derive(Debug, thiserror::Error)]
pub enum HotError {
    #[error("hot state unavailable")]
    Unavailable(#[source] ::redis::RedisError),
}

impl HotError {
    /// A failed Redis call, counted in `portcullis_hot_state_errors_total`.
    pub(crate) fn unavailable(error: ::redis::RedisError) -> HotError {
        crate::metrics::hot_state_error();
        HotError::Unavailable(error)
    }
}

/// One sliding-window limit: at most `limit` events within `window`; once an event fills the
/// window and `block` is non-zero, the key stays blocked for `block` from that event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub limit: u32,
    pub window: Duration,
    pub block: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitDecision {
    /// Counted: `count` events are in the window now, this one included.
    Allowed { count: u32 },
    /// Not counted, nothing changed: try again after `retry_after` (> 0).
    Denied { retry_after: Duration },
}

/// Shortest window honoured: a zero window would let every event leave it at once, i.e. no
/// limit at all, which is not what anyone configuring one means.
const MIN_WINDOW: Duration = Duration::from_millis(1);

/// Retry hint of a zero limit with a zero window (a zero limit denies everything, so any
/// positive hint is as true as another; this one keeps clients from spinning).
const ZERO_LIMIT_ZERO_WINDOW_RETRY: Duration = Duration::from_secs(1);

impl Limit {
    /// The window actually applied: never shorter than [`MIN_WINDOW`].
    fn effective_window(self) -> Duration {
        self.window.max(MIN_WINDOW)
    }

    /// The answer to every call when the limit is zero (nothing can ever be allowed, so
    /// neither implementation needs to look anything up), `None` otherwise.
    fn zero_limit_denial(self) -> Option<LimitDecision> {
        (self.limit == 0).then(|| LimitDecision::Denied {
            retry_after: if self.window.is_zero() { ZERO_LIMIT_ZERO_WINDOW_RETRY } else { self.window },
        })
    }
}

/// Checks what callers guarantee about a limit key (see [`HotState::limit_hit`]): a brace
/// would break the Redis Cluster hash tag, and an empty tag is ignored by Cluster, putting the
/// window and block keys of one limit in different slots.
fn debug_assert_limit_key(key: &str) {
    debug_assert!(!key.is_empty(), "empty rate-limit key");
    debug_assert!(!key.contains(['{', '}']), "rate-limit key {key:?} contains a brace");
}
