//! This replica's copy of every revocation in Redis, so `is_session_revoked` costs a map
//! lookup instead of a Redis round trip.
//!
//! Kept current by pub/sub: `revoke_session` SETs the key and PUBLISHes `<uuid> <ttl ms>` on
//! `{prefix}revocations` (one fixed channel per deployment); every replica's feed task is
//! subscribed and copies each message into its mirror. The mirror is only trusted
//! (`synced`) between a subscription that is up AND a full resync done after subscribing
//! (SCAN of `{prefix}rev:*` with their PTTLs — subscribing first, so nothing published
//! during the scan is missed). When the subscription drops (connection lost, `CLIENT KILL`,
//! a ping unanswered within [`PING_TIMEOUT`]) the mirror is untrusted at once: every check
//! asks Redis again until the feed has resubscribed and resynced. Never a stale answer,
//! except as the documented fallback: when Redis itself cannot be asked, the mirror answers
//! for at most `max_staleness` after it was last trusted, then checks fail closed.

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{Client, aio::ConnectionManager};
use tokio_stream::StreamExt;
use uuid::Uuid;

use super::{HotState, MemoryHotState};

/// How often the feed pings its subscription, and how long an answer may take: a
/// subscription that died silently is noticed within about this much.
const PING_EVERY: Duration = Duration::from_millis(500);
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// Wait between attempts to resubscribe: doubling from the first to the last, with jitter,
/// so replicas that lost their feeds together do not rescan Redis in lockstep.
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);
/// Bound on connecting and subscribing (a blackholed socket must not hang the feed).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Keys per SCAN round during a resync.
const SCAN_COUNT: usize = 1000;

#[derive(Debug)]
pub(super) struct Mirror {
    pub(super) revoked: MemoryHotState,
    synced: AtomicBool,
    /// When the mirror was last known complete (for the staleness bound).
    trusted_at: Mutex<Option<Instant>>,
    pub(super) max_staleness: Duration,
    /// Round trips to Redis made by revocation checks (for tests and metrics).
    pub(super) checks_sent: AtomicU64,
}

impl Mirror {
    pub(super) fn new(max_staleness: Duration) -> Mirror {
        Mirror {
            revoked: MemoryHotState::new(),
            synced: AtomicBool::new(false),
            trusted_at: Mutex::new(None),
            max_staleness,
            checks_sent: AtomicU64::new(0),
        }
    }

    pub(super) fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn set_synced(&self, synced: bool) {
        let mut trusted_at = self.trusted_at.lock().unwrap_or_else(|p| p.into_inner());
        if synced || self.synced.load(Ordering::Acquire) {
            // Going out of sync: the mirror was complete until now.
            *trusted_at = Some(Instant::now());
        }
        self.synced.store(synced, Ordering::Release);
    }

    /// Whether the mirror may still answer although Redis cannot be asked.
    pub(super) fn within_staleness(&self) -> bool {
        let trusted_at = *self.trusted_at.lock().unwrap_or_else(|p| p.into_inner());
        trusted_at.is_some_and(|at| at.elapsed() <= self.max_staleness)
    }

    /// Notes one revocation (from this replica or from the channel).
    pub(super) async fn note(&self, session_id: Uuid, ttl: Duration) {
        let _ = self.revoked.revoke_session(session_id, ttl).await;
    }
}

/// `<uuid> <ttl ms>`, the message every replica applies.
pub(super) fn message(session_id: Uuid, ttl_ms: u64) -> String {
    format!("{} {ttl_ms}", session_id.as_hyphenated())
}

fn parse_message(payload: &str) -> Option<(Uuid, Duration)> {
    let (id, ttl) = payload.split_once(' ')?;
    Some((Uuid::parse_str(id).ok()?, Duration::from_millis(ttl.parse().ok()?)))
}

/// Runs the feed until the mirror is dropped: subscribe, resync, apply messages; on any
/// failure mark the mirror untrusted and start over.
pub(super) async fn run_feed(
    client: Client,
    conn: ConnectionManager,
    key_prefix: String,
    mirror: Weak<Mirror>,
) {
    let channel = format!("{key_prefix}revocations");
    let mut delay = RESUBSCRIBE_FIRST;
    loop {
        let Some(strong) = mirror.upgrade() else { return };
        let started = std::time::Instant::now();
        if let Err(error) = follow(&client, &conn, &key_prefix, &channel, &strong).await
            && strong.is_synced()
        {
            tracing::warn!(error = %error, "revocation feed lost: checking Redis on every call until resynced");
        }
        strong.set_synced(false);
        drop(strong);
        // A subscription that lived a while starts the backoff over.
        if started.elapsed() > RESUBSCRIBE_MAX {
            delay = RESUBSCRIBE_FIRST;
        }
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).min(RESUBSCRIBE_MAX);
    }
}

/// One subscription's life. Returns when it ends (with why).
async fn follow(
    client: &Client,
    conn: &ConnectionManager,
    key_prefix: &str,
    channel: &str,
    mirror: &Arc<Mirror>,
) -> anyhow::Result<()> {
    let mut pubsub = tokio::time::timeout(SUBSCRIBE_TIMEOUT, client.get_async_pubsub()).await??;
    tokio::time::timeout(SUBSCRIBE_TIMEOUT, pubsub.subscribe(channel)).await??;
    let (mut sink, mut stream) = pubsub.split();
    // Subscribed first, so a revocation published during the scan is not missed.
    resync(conn, key_prefix, mirror).await?;
    mirror.set_synced(true);
    tracing::debug!("revocation feed subscribed and resynced");
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else { anyhow::bail!("subscription closed") };
                let payload: String = message.get_payload()?;
                match parse_message(&payload) {
                    Some((session_id, ttl)) => mirror.note(session_id, ttl).await,
                    None => tracing::warn!("malformed revocation message ignored"),
                }
            }
            _ = ping.tick() => {
                tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await??;
                // Nobody holds the mirror any more: stop.
                if Arc::strong_count(mirror) <= 1 {
                    return Ok(());
                }
            }
        }
    }
}

/// Copies every live revocation key into the mirror.
async fn resync(conn: &ConnectionManager, key_prefix: &str, mirror: &Mirror) -> anyhow::Result<()> {
    let mut conn = conn.clone();
    let pattern = format!("{}rev:*", escape_glob(key_prefix));
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("PTTL").arg(key);
            }
            let ttls: Vec<i64> = pipe.query_async(&mut conn).await?;
            for (key, ttl) in keys.iter().zip(ttls) {
                let id = key.rsplit_once('{').and_then(|(_, rest)| rest.strip_suffix('}'));
                if let (Some(id), true) = (id.and_then(|id| Uuid::parse_str(id).ok()), ttl > 0) {
                    mirror.note(id, Duration::from_millis(ttl.unsigned_abs())).await;
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
    }
}

/// `delay` give or take a quarter, from the clock's low bits (no RNG needed for this).
fn jitter(delay: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let quarter = delay / 4;
    delay - quarter + quarter * 2 * (nanos % 1000) / 1000
}

/// A key prefix as a literal in a SCAN `MATCH` pattern.
fn escape_glob(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_literal_in_patterns_and_delays_jitter_within_bounds() {
        assert_eq!(escape_glob("app:*[1]?"), "app:\\*\\[1\\]\\?");
        let d = jitter(Duration::from_millis(400));
        assert!(d >= Duration::from_millis(300) && d <= Duration::from_millis(500), "{d:?}");
    }

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let id = Uuid::new_v4();
        assert_eq!(parse_message(&message(id, 1500)), Some((id, Duration::from_millis(1500))));
        for garbage in ["", "x 1", "not-a-uuid", &format!("{id}"), &format!("{id} -1"), &format!("{id} 1.5")]
        {
            assert_eq!(parse_message(garbage), None, "{garbage:?}");
        }
    }
}
