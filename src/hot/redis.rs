//! [`HotState`] in Redis, shared by every replica.
//!
//! # Key scheme
//!
//! Every key starts with the configured `key_prefix` (e.g. `portcullis:`), so several
//! deployments, or parallel test runs, can share one Redis without seeing each other:
//!
//! | key                              | value | expiry       | meaning                  |
//! |----------------------------------|-------|--------------|--------------------------|
//! | `{prefix}rev:{<session uuid>}`   | `1`   | `PX` the ttl | the session was revoked  |
//!
//! e.g. `portcullis:rev:{0190f0c4-5e8a-7c3b-9d2e-8f1a2b3c4d5e}`. The braces around the uuid
//! are literal: they are a Redis Cluster hash tag, so every key about one session (this one
//! and any added later) hashes to the same slot. `revoke_session` is `SET key 1 PX ttl_ms`
//! (idempotent; a second call sets the expiry to the new ttl), `is_session_revoked` is
//! `EXISTS key`. Redis expires the keys itself, so nothing here ever deletes one.
//!
//! # Failure
//!
//! [`RedisHotState::connect`] fails fast (PING at connect, short connection and response
//! timeouts, few reconnection retries) so a dead Redis gives [`HotError::Unavailable`],
//! never a hang. Once connected, the [`ConnectionManager`] reconnects by itself; a command
//! sent while Redis is down fails with [`HotError::Unavailable`].

use std::time::Duration;

use async_trait::async_trait;
use redis::{
    Client, RedisError,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use uuid::Uuid;

use super::{HotError, HotState};

/// Timeout of one attempt to open a TCP connection (and handshake) to Redis.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one command's response.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection attempts after a failed one (with exponential backoff, capped below).
const CONNECT_RETRIES: usize = 2;
const RETRY_MIN_DELAY: Duration = Duration::from_millis(100);
const RETRY_MAX_DELAY: Duration = Duration::from_millis(500);
/// Bound on the whole of [`RedisHotState::connect`], whatever the library does.
const CONNECT_DEADLINE: Duration = Duration::from_secs(3);
/// Longest ttl sent to Redis (a larger one is capped; Redis rejects expiries that overflow).
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

#[derive(Clone)]
pub struct RedisHotState {
    conn: ConnectionManager,
    key_prefix: String,
}

impl std::fmt::Debug for RedisHotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection (and its URL, which may hold a password) is left out on purpose.
        f.debug_struct("RedisHotState").field("key_prefix", &self.key_prefix).finish_non_exhaustive()
    }
}

impl RedisHotState {
    /// Connects to `url` (`redis://[:password@]host[:port][/db]`, or `rediss://` for TLS
    /// where the redis crate is built with it) and checks it answers PING. Fails within a few
    /// seconds if Redis is unreachable.
    pub async fn connect(url: &str, key_prefix: impl Into<String>) -> Result<Self, HotError> {
        let key_prefix = key_prefix.into();
        let client = Client::open(url).map_err(HotError::Unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(CONNECT_RETRIES)
            .set_min_delay(RETRY_MIN_DELAY)
            .set_max_delay(RETRY_MAX_DELAY);
        let connect = async {
            let conn = ConnectionManager::new_with_config(client, config).await?;
            let this = Self { conn, key_prefix };
            this.ping_raw().await?;
            Ok::<_, RedisError>(this)
        };
        match tokio::time::timeout(CONNECT_DEADLINE, connect).await {
            Ok(result) => result.map_err(HotError::Unavailable),
            Err(_elapsed) => Err(HotError::Unavailable(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out connecting to redis",
            )))),
        }
    }

    /// The prefix every key of this instance starts with.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    async fn ping_raw(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let _pong: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}

/// `{prefix}rev:{<session uuid>}` (the braces around the uuid are a Cluster hash tag).
fn revoked_key(prefix: &str, session_id: Uuid) -> String {
    format!("{prefix}rev:{{{}}}", session_id.as_hyphenated())
}

/// `ttl` in whole milliseconds for `PX`: rounded up (a revocation is never shorter than
/// asked), at least 1 (Redis rejects `PX 0`), at most [`MAX_TTL_MS`].
fn ttl_millis(ttl: Duration) -> u64 {
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).clamp(1, MAX_TTL_MS)
}

#[async_trait]
impl HotState for RedisHotState {
    async fn ping(&self) -> Result<(), HotError> {
        self.ping_raw().await.map_err(HotError::Unavailable)
    }

    async fn revoke_session(&self, session_id: Uuid, ttl: Duration) -> Result<(), HotError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(revoked_key(&self.key_prefix, session_id))
            .arg(1)
            .arg("PX")
            .arg(ttl_millis(ttl))
            .exec_async(&mut conn)
            .await
            .map_err(HotError::Unavailable)
    }

    async fn is_session_revoked(&self, session_id: Uuid) -> Result<bool, HotError> {
        let mut conn = self.conn.clone();
        let count: u64 = redis::cmd("EXISTS")
            .arg(revoked_key(&self.key_prefix, session_id))
            .query_async(&mut conn)
            .await
            .map_err(HotError::Unavailable)?;
        Ok(count > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_rounded_up_and_clamped() {
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_millis(Duration::from_millis(300)), 300);
        assert_eq!(ttl_millis(Duration::MAX), MAX_TTL_MS);
    }

    #[test]
    fn key_uses_prefix_and_hash_tag() {
        let id = Uuid::parse_str("0190f0c4-5e8a-7c3b-9d2e-8f1a2b3c4d5e").unwrap();
        assert_eq!(revoked_key("portcullis:", id), "portcullis:rev:{0190f0c4-5e8a-7c3b-9d2e-8f1a2b3c4d5e}");
    }
}
