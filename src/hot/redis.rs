//! [`HotState`] in Redis, shared by every replica.
//!
//! # Key scheme
//!
//! Every key starts with the configured `key_prefix` (e.g. `portcullis:`), so several
//! deployments, or parallel test runs, can share one Redis without seeing each other:
//!
//! | key                            | value                  | expiry            | meaning                  |
//! |--------------------------------|------------------------|-------------------|--------------------------|
//! | `{prefix}rev:{<session uuid>}` | `1`                    | `PX` the ttl      | the session was revoked  |
//! | `{prefix}lim:{<limit key>}`    | zset: member → time ms | `PX` window + 1 s | a limit's window         |
//! | `{prefix}lim:{<limit key>}:b`  | member that set it     | `PX` the block    | the limit key is blocked |
//!
//! e.g. `portcullis:rev:{0190f0c4-5e8a-7c3b-9d2e-8f1a2b3c4d5e}`. The braces around the uuid
//! are literal: they are a Redis Cluster hash tag, so every key about one session (this one
//! and any added later) hashes to the same slot. `revoke_session` is `SET key 1 PX ttl_ms`
//! (idempotent; a second call sets the expiry to the new ttl), `is_session_revoked` is
//! `EXISTS key`. Redis expires the keys itself, so nothing here ever deletes one.
//!
//! A rate limit's keys, e.g. `portcullis:lim:{login:ip:203.0.113.7}` and
//! `portcullis:lim:{login:ip:203.0.113.7}:b`, wrap the caller's limit key (which holds no brace)
//! in a hash tag the same way, so the window and the block of one limit are in one slot and a
//! script may touch both. Each window event is a sorted-set member named by the caller (unique
//! per hit) and scored with the time of the hit in Unix milliseconds, as read by Redis (`TIME`),
//! so every replica shares one clock whatever its own. `limit_hit`, `limit_refund` and
//! `limit_peek` are each one Lua script (`HIT_SCRIPT`, `REFUND_SCRIPT`, `PEEK_SCRIPT` below),
//! hence atomic; `limit_clear` is one `DEL` of both keys. A hit that counts refreshes the
//! window key's expiry to the window (plus a second of slack), so a window key outlives its
//! newest event and then goes; a block key lives exactly as long as the block. Denied hits
//! and peeks refresh no expiry, so a limit never keeps its keys alive longer than it needs.
//!
//! # Failure
//!
//! [`RedisHotState::connect`] fails fast (PING at connect, short connection and response
//! timeouts, few reconnection retries) so a dead Redis gives [`HotError::Unavailable`],
//! never a hang. Once connected, the [`ConnectionManager`] reconnects by itself; a command
//! sent while Redis is down fails with [`HotError::Unavailable`].
//!
//! # TLS
//!
//! A `rediss://` URL connects over TLS (rustls, on the process's aws-lc-rs provider). By
//! default Redis's certificate must chain to a public root (`webpki-roots`) and carry the URL's
//! host; [`RedisTls`] trusts given CAs instead and presents a client certificate (Redis's
//! `tls-auth-clients`). Every connection of an instance uses them: commands, reconnections and
//! the revocation feed's pub/sub, which share one [`Client`].

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use async_trait::async_trait;
use redis::{
    Client, ClientTlsConfig, Cmd, ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind,
    TlsCertificates,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use uuid::Uuid;

use super::{
    HotError, HotState, Limit, LimitDecision, debug_assert_limit_key,
    mirror::{self, Mirror},
};

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
/// Bound on a revocation check sent to Redis while the mirror is not trusted.
const FALLBACK_CHECK_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest ttl sent to Redis (a larger one is capped; Redis rejects expiries that overflow).
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// How much longer than its window a window key lives after a hit (so rounding and the
/// script's own run time never expire it while its newest event is still in the window).
const WINDOW_KEY_SLACK_MS: u64 = 1000;

// The scripts below read the clock with `TIME`. Redis 7 replicates a script's effects (the
// ZADD, SET, ... it ran), never the script itself, so a non-deterministic command in a script
// is allowed and replicas and the AOF see the same scores as the primary. Using the Redis
// clock rather than each Portcullis replica's means replicas with skewed clocks still share
// one consistent window. Each script reads it once, at the start, as `now` (Unix ms).
//
// Numbers are passed back to Redis through `int()` (`%d`): Lua would otherwise format large
// ones in exponent notation, which `PX` and `PEXPIRE` reject.
//
// Each runs as `EVALSHA`, falling back to `EVAL` when Redis does not know it (see
// `LimitScript::invoke`): one short round trip in the usual case.

/// `limit_hit`. KEYS: window, block. ARGV: limit (> 0), window ms (> 0), block ms (0 = none),
/// member, window key slack ms. Returns `{1, count}` when counted, `{0, retry_after_ms}` when
/// denied (nothing changed then, beyond dropping events that had already left the window).
static HIT_SCRIPT: LazyLock<LimitScript> = LazyLock::new(|| {
    LimitScript::new(
        r"
local function int(x) return string.format('%d', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local block = tonumber(ARGV[3])
local blocked = redis.call('PTTL', KEYS[2])
if blocked > 0 then
  return {0, blocked}
end
-- An event at t is in the window while t > now - window.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now - window))
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  -- Room again once the event that makes the window full leaves it: the oldest, unless the
  -- limit was lowered and the window holds more events than it allows.
  local filler = redis.call('ZRANGE', KEYS[1], int(count - limit), int(count - limit), 'WITHSCORES')
  return {0, tonumber(filler[2]) + window - now}
end
redis.call('ZADD', KEYS[1], int(now), ARGV[4])
redis.call('PEXPIRE', KEYS[1], int(window + tonumber(ARGV[5])))
count = count + 1
if count == limit and block > 0 then
  redis.call('SET', KEYS[2], ARGV[4], 'PX', int(block))
end
return {1, count}
",
    )
});

/// `limit_peek`: what [`HIT_SCRIPT`] would answer, changing nothing. KEYS: window, block.
/// ARGV: limit (> 0), window ms (> 0). Returns `{1, count}` or `{0, retry_after_ms}`.
static PEEK_SCRIPT: LazyLock<LimitScript> = LazyLock::new(|| {
    LimitScript::new(
        r"
local function int(x) return string.format('%d', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local blocked = redis.call('PTTL', KEYS[2])
if blocked > 0 then
  return {0, blocked}
end
local oldest = '(' .. int(now - window)
local count = redis.call('ZCOUNT', KEYS[1], oldest, '+inf')
if count >= limit then
  local filler = redis.call('ZRANGE', KEYS[1], oldest, '+inf', 'BYSCORE',
    'LIMIT', int(count - limit), 1, 'WITHSCORES')
  return {0, tonumber(filler[2]) + window - now}
end
return {1, count}
",
    )
});

/// `limit_refund`. KEYS: window, block. ARGV: member. Removes the event, and the block when
/// that event set it (compare and delete, hence a script).
static REFUND_SCRIPT: LazyLock<LimitScript> = LazyLock::new(|| {
    LimitScript::new(
        r"
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return 0
",
    )
});

/// A Lua script over the two keys of one limit (window, block).
struct LimitScript {
    code: &'static str,
    /// `redis::Script` is used for its SHA1 (what `EVALSHA` names the script by).
    script: Script,
}

impl LimitScript {
    fn new(code: &'static str) -> Self {
        Self { code, script: Script::new(code) }
    }

    /// Runs the script over `keys`, with the arguments `args` adds: `EVALSHA`, or `EVAL` when
    /// Redis does not know the script (first call, restart, `SCRIPT FLUSH`, failover); `EVAL`
    /// caches it for the next `EVALSHA`. (`redis::Script::invoke_async` instead loads the
    /// script and sends `EVALSHA` again, which fails if the cache is flushed in between.)
    async fn invoke<T: FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
        keys: &[String; 2],
        args: impl Fn(&mut Cmd),
    ) -> Result<T, RedisError> {
        let command = |name: &str, script: &str| {
            let mut cmd = redis::cmd(name);
            cmd.arg(script).arg(keys.len()).arg(keys);
            args(&mut cmd);
            cmd
        };
        match command("EVALSHA", self.script.get_hash()).query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                command("EVAL", self.code).query_async(conn).await
            }
            answer => answer,
        }
    }
}

#[derive(Clone)]
pub struct RedisHotState {
    conn: ConnectionManager,
    key_prefix: String,
    client: Client,
    /// This replica's copy of the revocations, when the feed runs (see [`super::mirror`]).
    mirror: Option<Arc<Mirror>>,
}

/// TLS material of a `rediss://` connection beyond the defaults, as PEM. Nothing set: the
/// public roots, no client certificate.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// CA certificates Redis's certificate must chain to, instead of the public roots.
    pub root_ca_pem: Option<Vec<u8>>,
    /// A client certificate chain (leaf first) and its private key, for a Redis that asks
    /// for one (`tls-auth-clients`).
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl RedisTls {
    fn is_default(&self) -> bool {
        self.root_ca_pem.is_none() && self.client_pem.is_none()
    }
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key (nor, for brevity, the certificates): only what is set.
        f.debug_struct("RedisTls")
            .field("root_ca", &self.root_ca_pem.is_some())
            .field("client_certificate", &self.client_pem.is_some())
            .finish()
    }
}

impl std::fmt::Debug for RedisHotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection (and its URL, which may hold a password) is left out on purpose.
        f.debug_struct("RedisHotState").field("key_prefix", &self.key_prefix).finish_non_exhaustive()
    }
}

impl RedisHotState {
    /// Connects to `url` (`redis://[:password@]host[:port][/db]`, or `rediss://` for TLS
    /// with the public roots) and checks it answers PING. Fails within a few seconds if Redis
    /// is unreachable, or refuses the TLS handshake.
    pub async fn connect(url: &str, key_prefix: impl Into<String>) -> Result<Self, HotError> {
        Self::connect_with_tls(url, key_prefix, &RedisTls::default()).await
    }

    /// [`connect`](Self::connect) with `tls` for a `rediss://` `url`: trusted CAs and a client
    /// certificate. Anything set in `tls` with a `redis://` `url` is an error.
    pub async fn connect_with_tls(
        url: &str,
        key_prefix: impl Into<String>,
        tls: &RedisTls,
    ) -> Result<Self, HotError> {
        let key_prefix = key_prefix.into();
        let client = if tls.is_default() {
            Client::open(url)
        } else {
            // Refuses a URL that is not rediss:// (InvalidClientConfig), and unreadable PEM.
            let certificates = TlsCertificates {
                client_tls: tls.client_pem.as_ref().map(|(cert, key)| ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
                root_cert: tls.root_ca_pem.clone(),
            };
            Client::build_with_tls(url, certificates)
        }
        .map_err(HotError::unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(CONNECT_RETRIES)
            .set_min_delay(RETRY_MIN_DELAY)
            .set_max_delay(RETRY_MAX_DELAY);
        let connect = async {
            let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
            let this = Self { conn, key_prefix, client, mirror: None };
            this.ping_raw().await?;
            Ok::<_, RedisError>(this)
        };
        match tokio::time::timeout(CONNECT_DEADLINE, connect).await {
            Ok(result) => result.map_err(HotError::unavailable),
            Err(_elapsed) => Err(HotError::unavailable(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out connecting to redis",
            )))),
        }
    }

    /// The prefix every key of this instance starts with.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// Keeps a copy of every revocation in this process, fed by pub/sub, so checks need no
    /// round trip while the feed is up (see [`super::mirror`]). With Redis unreachable the
    /// copy answers for at most `max_staleness` after it was last known complete.
    pub fn with_revocation_feed(mut self, max_staleness: Duration) -> Self {
        let mirror = Arc::new(Mirror::new(max_staleness));
        tokio::spawn(mirror::run_feed(
            self.client.clone(),
            self.conn.clone(),
            self.key_prefix.clone(),
            Arc::downgrade(&mirror),
        ));
        self.mirror = Some(mirror);
        self
    }

    /// Whether revocation checks are answered in process right now (feed up and resynced).
    pub fn revocations_mirrored(&self) -> bool {
        self.mirror.as_ref().is_some_and(|m| m.is_synced())
    }

    /// Revocation checks that went to Redis (none while the mirror is trusted).
    pub fn revocation_checks_sent(&self) -> u64 {
        self.mirror.as_ref().map_or(0, |m| m.checks_sent.load(std::sync::atomic::Ordering::Relaxed))
    }

    async fn exists_in_redis(&self, session_id: Uuid) -> Result<bool, RedisError> {
        let mut conn = self.conn.clone();
        let count: u64 = redis::cmd("EXISTS")
            .arg(revoked_key(&self.key_prefix, session_id))
            .query_async(&mut conn)
            .await?;
        Ok(count > 0)
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

/// `{prefix}lim:{<key>}` (a sorted set of events) and `{prefix}lim:{<key>}:b` (the block), in
/// one Cluster slot through the hash tag around the caller's key.
fn limit_keys(prefix: &str, key: &str) -> [String; 2] {
    debug_assert_limit_key(key);
    let window = format!("{prefix}lim:{{{key}}}");
    let block = format!("{window}:b");
    [window, block]
}

/// Reads the `{flag, value}` a limit script returns: `{1, count}` or `{0, retry_after_ms}`.
fn limit_decision((allowed, value): (i64, i64)) -> LimitDecision {
    if allowed == 1 {
        LimitDecision::Allowed { count: u32::try_from(value).unwrap_or(u32::MAX) }
    } else {
        // The scripts only answer positive delays; at least 1 ms whatever happens.
        LimitDecision::Denied { retry_after: Duration::from_millis(value.max(1).unsigned_abs()) }
    }
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
        self.ping_raw().await.map_err(HotError::unavailable)
    }

    async fn revoke_session(&self, session_id: Uuid, ttl: Duration) -> Result<(), HotError> {
        let mut conn = self.conn.clone();
        let ttl_ms = ttl_millis(ttl);
        // The key (for replicas that resync, and for checks while a feed is down) and the
        // message (for every replica's mirror), in one round trip.
        redis::pipe()
            .cmd("SET")
            .arg(revoked_key(&self.key_prefix, session_id))
            .arg(1)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("PUBLISH")
            .arg(format!("{}revocations", self.key_prefix))
            .arg(mirror::message(session_id, ttl_ms))
            .ignore()
            .exec_async(&mut conn)
            .await
            .map_err(HotError::unavailable)?;
        if let Some(mirror) = &self.mirror {
            mirror.note(session_id, ttl).await;
        }
        Ok(())
    }

    async fn revocations_complete(&self) -> Result<bool, HotError> {
        let mut conn = self.conn.clone();
        let count: u64 = redis::cmd("EXISTS")
            .arg(format!("{}rev-complete", self.key_prefix))
            .query_async(&mut conn)
            .await
            .map_err(HotError::unavailable)?;
        Ok(count > 0)
    }

    async fn mark_revocations_complete(&self) -> Result<(), HotError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}rev-complete", self.key_prefix))
            .arg(1)
            .exec_async(&mut conn)
            .await
            .map_err(HotError::unavailable)
    }

    async fn is_session_revoked(&self, session_id: Uuid) -> Result<bool, HotError> {
        let Some(mirror) = &self.mirror else {
            return self.exists_in_redis(session_id).await.map_err(HotError::unavailable);
        };
        if mirror.is_synced() {
            return mirror.revoked.is_session_revoked(session_id).await;
        }
        // The feed is down: ask Redis until it is back and resynced; with Redis down too,
        // the copy answers within its staleness bound, then the check fails closed.
        mirror.checks_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A short bound: within the staleness window a dead Redis must cost milliseconds
        // per check, not the connection's response timeout.
        let asked = tokio::time::timeout(FALLBACK_CHECK_TIMEOUT, self.exists_in_redis(session_id)).await;
        let error = match asked {
            Ok(Ok(revoked)) => return Ok(revoked || mirror.revoked.is_session_revoked(session_id).await?),
            Ok(Err(error)) => error,
            Err(_elapsed) => RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "revocation check timed out",
            )),
        };
        // Counted (`portcullis_hot_state_errors_total`) even when the copy answers instead.
        let error = HotError::unavailable(error);
        if mirror.within_staleness() {
            return mirror.revoked.is_session_revoked(session_id).await;
        }
        Err(error)
    }

    async fn limit_hit(&self, key: &str, limit: Limit, member: &str) -> Result<LimitDecision, HotError> {
        if let Some(denied) = limit.zero_limit_denial() {
            return Ok(denied);
        }
        let block_ms = if limit.block.is_zero() { 0 } else { ttl_millis(limit.block) };
        let window_ms = ttl_millis(limit.effective_window());
        let mut conn = self.conn.clone();
        let answer = HIT_SCRIPT
            .invoke(&mut conn, &limit_keys(&self.key_prefix, key), |cmd| {
                cmd.arg(limit.limit).arg(window_ms).arg(block_ms).arg(member).arg(WINDOW_KEY_SLACK_MS);
            })
            .await
            .map_err(HotError::unavailable)?;
        Ok(limit_decision(answer))
    }

    async fn limit_refund(&self, key: &str, member: &str) -> Result<(), HotError> {
        let mut conn = self.conn.clone();
        REFUND_SCRIPT
            .invoke(&mut conn, &limit_keys(&self.key_prefix, key), |cmd| {
                cmd.arg(member);
            })
            .await
            .map_err(HotError::unavailable)
    }

    async fn limit_peek(&self, key: &str, limit: Limit) -> Result<LimitDecision, HotError> {
        if let Some(denied) = limit.zero_limit_denial() {
            return Ok(denied);
        }
        let window_ms = ttl_millis(limit.effective_window());
        let mut conn = self.conn.clone();
        let answer = PEEK_SCRIPT
            .invoke(&mut conn, &limit_keys(&self.key_prefix, key), |cmd| {
                cmd.arg(limit.limit).arg(window_ms);
            })
            .await
            .map_err(HotError::unavailable)?;
        Ok(limit_decision(answer))
    }

    async fn limit_clear(&self, key: &str) -> Result<(), HotError> {
        let mut conn = self.conn.clone();
        // One command over both keys: atomic without a script.
        redis::cmd("DEL")
            .arg(&limit_keys(&self.key_prefix, key))
            .exec_async(&mut conn)
            .await
            .map_err(HotError::unavailable)
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

    #[test]
    fn limit_keys_use_prefix_and_hash_tag() {
        assert_eq!(
            limit_keys("portcullis:", "register:ip:2001:db8::1"),
            ["portcullis:lim:{register:ip:2001:db8::1}", "portcullis:lim:{register:ip:2001:db8::1}:b"]
        );
    }

    #[test]
    fn limit_script_answers_are_read() {
        assert_eq!(limit_decision((1, 3)), LimitDecision::Allowed { count: 3 });
        assert_eq!(
            limit_decision((0, 250)),
            LimitDecision::Denied { retry_after: Duration::from_millis(250) }
        );
        assert_eq!(limit_decision((0, 0)), LimitDecision::Denied { retry_after: Duration::from_millis(1) });
    }
}
