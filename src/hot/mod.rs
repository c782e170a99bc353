//! Ephemeral state shared by every replica: Redis in production, process memory by default.
//!
//! Both implement [`HotState`]; `tests/hot_conformance.rs` runs one suite against both.
//! Nothing here is the source of truth: what must survive a Redis flush lives in the store
//! and is re-published from it (see `auth::revocation`).

mod memory;
mod redis;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use uuid::Uuid;

pub use self::memory::MemoryHotState;
pub use self::redis::RedisHotState;

#[async_trait]
pub trait HotState: Send + Sync + 'static {
    /// Cheap round trip, for health checks.
    async fn ping(&self) -> Result<(), HotError>;

    /// Marks a session revoked for `ttl` (long enough for every access token issued for it
    /// to expire). Idempotent; a second call extends nothing beyond the new `ttl`.
    async fn revoke_session(&self, session_id: Uuid, ttl: Duration) -> Result<(), HotError>;

    /// Whether the session was revoked within its `ttl`.
    async fn is_session_revoked(&self, session_id: Uuid) -> Result<bool, HotError>;
}

pub type DynHotState = Arc<dyn HotState>;

#[derive(Debug, thiserror::Error)]
pub enum HotError {
    #[error("hot state unavailable")]
    Unavailable(#[source] ::redis::RedisError),
}
