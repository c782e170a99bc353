//! One conformance suite for every [`HotState`] implementation.
//!
//! Each case is written once, as a function over `&dyn HotState`, and run as its own test
//! against [`MemoryHotState`] (`memory_<case>`) and [`RedisHotState`] (`redis_<case>`).
//!
//! The Redis cases need `PORTCULLIS_TEST_REDIS_URL` (e.g. `redis://127.0.0.1:6379`); when it is
//! unset they print `SKIPPED <case>: ...` to stderr and pass. Each Redis test uses its own random
//! key prefix, so tests never see each other's keys, and every key written has a short ttl, so
//! nothing is left behind.
//!
//! The rate-limit cases time windows and blocks of a few hundred milliseconds, with margins of
//! about 100 ms either side of every instant they depend on.

use std::{
    future::Future,
    io::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use portcullis::hot::{HotState, Limit, LimitDecision, MemoryHotState, RedisHotState};
use uuid::Uuid;

const REDIS_URL_VAR: &str = "PORTCULLIS_TEST_REDIS_URL";

/// Long enough not to expire during a test, short enough that Redis drops the keys soon after.
const LONG_TTL: Duration = Duration::from_secs(60);
/// Short ttl for the expiry cases, and how long to wait for it to pass.
const SHORT_TTL: Duration = Duration::from_millis(300);
const PAST_SHORT_TTL: Duration = Duration::from_millis(600);
/// Slack added to a sleep meant to outlast a window, block or `retry_after`.
const MARGIN: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// Implementations under test.

/// Makes fresh instances of one implementation; instances made by one factory share state
/// when the implementation shares state across instances (Redis with one prefix).
#[async_trait::async_trait]
trait Factory: Send + Sync {
    async fn make(&self) -> Arc<dyn HotState>;

    /// `n` handles on one state, as separate as the implementation allows: for Redis `n`
    /// instances (so `n` connections), for memory one instance `n` times.
    async fn make_sharing(&self, n: usize) -> Vec<Arc<dyn HotState>>;
}

struct MemoryFactory;

#[async_trait::async_trait]
impl Factory for MemoryFactory {
    async fn make(&self) -> Arc<dyn HotState> {
        Arc::new(MemoryHotState::new())
    }

    async fn make_sharing(&self, n: usize) -> Vec<Arc<dyn HotState>> {
        vec![self.make().await; n]
    }
}

struct RedisFactory {
    url: String,
    prefix: String,
}

#[async_trait::async_trait]
impl Factory for RedisFactory {
    async fn make(&self) -> Arc<dyn HotState> {
        let hot = RedisHotState::connect(&self.url, self.prefix.clone())
            .await
            .unwrap_or_else(|e| panic!("connecting to {REDIS_URL_VAR}: {e:?}"));
        Arc::new(hot)
    }

    async fn make_sharing(&self, n: usize) -> Vec<Arc<dyn HotState>> {
        let mut all = Vec::with_capacity(n);
        for _ in 0..n {
            all.push(self.make().await);
        }
        all
    }
}

fn unique_prefix() -> String {
    format!("portcullis-test:{}:", Uuid::new_v4().simple())
}

/// A factory for Redis with a fresh prefix, or `None` (after saying so) when no Redis is set.
fn redis_factory(case: &str) -> Option<RedisFactory> {
    match std::env::var(REDIS_URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(RedisFactory { url, prefix: unique_prefix() }),
        _ => {
            // Written to stderr directly, not with eprintln!, so the test harness's output
            // capture doesn't hide it when the test passes.
            let _ = writeln!(std::io::stderr(), "SKIPPED {case}: {REDIS_URL_VAR} is not set");
            None
        }
    }
}

async fn run_memory<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn Factory>) -> Fut,
    Fut: Future<Output = ()>,
{
    case(Arc::new(MemoryFactory)).await;
}

async fn run_redis<F, Fut>(name: &str, case: F)
where
    F: FnOnce(Arc<dyn Factory>) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Some(factory) = redis_factory(name) {
        case(Arc::new(factory)).await;
    }
}

/// `conformance!(case => memory_test, redis_test)` runs `case` against both implementations.
/// On several worker threads, so the concurrency cases really run in parallel.
macro_rules! conformance {
    ($($case:ident => $memory:ident, $redis:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $memory() {
            run_memory($case).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $redis() {
            run_redis(stringify!($redis), $case).await;
        }
    )*};
}

/// `redis_only!(case => redis_test)`: cases that hold only for state shared across instances.
macro_rules! redis_only {
    ($($case:ident => $redis:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $redis() {
            run_redis(stringify!($redis), $case).await;
        }
    )*};
}

conformance! {
    unknown_session_not_revoked => memory_unknown_session_not_revoked, redis_unknown_session_not_revoked;
    revoke_then_revoked => memory_revoke_then_revoked, redis_revoke_then_revoked;
    other_sessions_unaffected => memory_other_sessions_unaffected, redis_other_sessions_unaffected;
    expires_after_ttl => memory_expires_after_ttl, redis_expires_after_ttl;
    re_revoking_is_idempotent => memory_re_revoking_is_idempotent, redis_re_revoking_is_idempotent;
    re_revoking_sets_the_new_ttl => memory_re_revoking_sets_the_new_ttl, redis_re_revoking_sets_the_new_ttl;
    ping_ok => memory_ping_ok, redis_ping_ok;
    concurrent_revocations => memory_concurrent_revocations, redis_concurrent_revocations;

    limit_allows_up_to_the_limit => memory_limit_allows_up_to_the_limit, redis_limit_allows_up_to_the_limit;
    limit_of_zero_denies_everything => memory_limit_of_zero_denies_everything, redis_limit_of_zero_denies_everything;
    limit_window_slides => memory_limit_window_slides, redis_limit_window_slides;
    limit_block_outlasts_the_window => memory_limit_block_outlasts_the_window, redis_limit_block_outlasts_the_window;
    limit_denied_hits_do_not_extend_a_block =>
        memory_limit_denied_hits_do_not_extend_a_block, redis_limit_denied_hits_do_not_extend_a_block;
    limit_denied_hits_do_not_extend_a_full_window =>
        memory_limit_denied_hits_do_not_extend_a_full_window, redis_limit_denied_hits_do_not_extend_a_full_window;
    limit_refund_frees_a_slot => memory_limit_refund_frees_a_slot, redis_limit_refund_frees_a_slot;
    limit_refund_of_the_blocking_event_lifts_the_block =>
        memory_limit_refund_of_the_blocking_event_lifts_the_block,
        redis_limit_refund_of_the_blocking_event_lifts_the_block;
    limit_refund_of_another_event_keeps_the_block =>
        memory_limit_refund_of_another_event_keeps_the_block, redis_limit_refund_of_another_event_keeps_the_block;
    limit_refund_of_unknown_is_a_no_op => memory_limit_refund_of_unknown_is_a_no_op, redis_limit_refund_of_unknown_is_a_no_op;
    limit_peek_does_not_count => memory_limit_peek_does_not_count, redis_limit_peek_does_not_count;
    limit_clear_resets => memory_limit_clear_resets, redis_limit_clear_resets;
    limit_keys_are_independent => memory_limit_keys_are_independent, redis_limit_keys_are_independent;
    limit_concurrent_hits_allow_exactly_the_limit =>
        memory_limit_concurrent_hits_allow_exactly_the_limit, redis_limit_concurrent_hits_allow_exactly_the_limit;
}

redis_only! {
    instances_sharing_a_prefix_see_each_other => redis_instances_sharing_a_prefix_see_each_other;
    instances_with_other_prefixes_are_isolated => redis_instances_with_other_prefixes_are_isolated;
    limit_is_shared_by_instances_with_one_prefix => redis_limit_is_shared_by_instances_with_one_prefix;
    limit_is_not_shared_across_prefixes => redis_limit_is_not_shared_across_prefixes;
}

// ---------------------------------------------------------------------------------------------
// The cases, written once.

async fn unknown_session_not_revoked(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    assert!(!hot.is_session_revoked(Uuid::new_v4()).await.unwrap());
    assert!(!hot.is_session_revoked(Uuid::nil()).await.unwrap());
}

async fn revoke_then_revoked(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let session = Uuid::now_v7();
    assert!(!hot.is_session_revoked(session).await.unwrap());
    hot.revoke_session(session, LONG_TTL).await.unwrap();
    assert!(hot.is_session_revoked(session).await.unwrap());
}

async fn other_sessions_unaffected(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let revoked = Uuid::now_v7();
    let others = [Uuid::now_v7(), Uuid::new_v4(), Uuid::nil()];
    hot.revoke_session(revoked, LONG_TTL).await.unwrap();
    assert!(hot.is_session_revoked(revoked).await.unwrap());
    for other in others {
        assert!(
            !hot.is_session_revoked(other).await.unwrap(),
            "{other} reported revoked after revoking {revoked}"
        );
    }
}

async fn expires_after_ttl(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let session = Uuid::now_v7();
    hot.revoke_session(session, SHORT_TTL).await.unwrap();
    assert!(hot.is_session_revoked(session).await.unwrap());
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert!(!hot.is_session_revoked(session).await.unwrap());
}

async fn re_revoking_is_idempotent(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let session = Uuid::now_v7();
    let other = Uuid::now_v7();
    for _ in 0..3 {
        hot.revoke_session(session, LONG_TTL).await.unwrap();
        assert!(hot.is_session_revoked(session).await.unwrap());
    }
    assert!(!hot.is_session_revoked(other).await.unwrap());
}

/// The trait promises a second call extends nothing beyond its own ttl.
async fn re_revoking_sets_the_new_ttl(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let session = Uuid::now_v7();
    hot.revoke_session(session, LONG_TTL).await.unwrap();
    hot.revoke_session(session, SHORT_TTL).await.unwrap();
    assert!(hot.is_session_revoked(session).await.unwrap());
    tokio::time::sleep(PAST_SHORT_TTL).await;
    assert!(!hot.is_session_revoked(session).await.unwrap());
}

async fn ping_ok(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    hot.ping().await.unwrap();
    hot.ping().await.unwrap();
}

async fn concurrent_revocations(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let sessions: Vec<Uuid> = (0..64).map(|_| Uuid::new_v4()).collect();
    let tasks: Vec<_> = sessions
        .iter()
        .step_by(2)
        .map(|&session| {
            let hot = Arc::clone(&hot);
            tokio::spawn(async move { hot.revoke_session(session, LONG_TTL).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    for (i, session) in sessions.iter().enumerate() {
        assert_eq!(hot.is_session_revoked(*session).await.unwrap(), i % 2 == 0, "session #{i}");
    }
}

async fn instances_sharing_a_prefix_see_each_other(factory: Arc<dyn Factory>) {
    let a = factory.make().await;
    let b = factory.make().await;
    let by_a = Uuid::now_v7();
    let by_b = Uuid::now_v7();
    a.revoke_session(by_a, LONG_TTL).await.unwrap();
    assert!(b.is_session_revoked(by_a).await.unwrap());
    assert!(!b.is_session_revoked(by_b).await.unwrap());
    b.revoke_session(by_b, LONG_TTL).await.unwrap();
    assert!(a.is_session_revoked(by_b).await.unwrap());
}

async fn instances_with_other_prefixes_are_isolated(factory: Arc<dyn Factory>) {
    let a = factory.make().await;
    let session = Uuid::now_v7();
    a.revoke_session(session, LONG_TTL).await.unwrap();
    // Same Redis, another prefix: another deployment (or test) that must not see it.
    let url = std::env::var(REDIS_URL_VAR).unwrap();
    let other = RedisHotState::connect(&url, unique_prefix()).await.unwrap();
    assert!(!other.is_session_revoked(session).await.unwrap());
    assert!(a.is_session_revoked(session).await.unwrap());
}

// ---------------------------------------------------------------------------------------------
// Rate limits.

/// A limit key unique to one test, shaped like the callers' (`<flow>:ip:<address>`).
fn limit_key(flow: &str) -> String {
    format!("{flow}:ip:{}", Uuid::new_v4().simple())
}

/// A fresh event name, as callers make them.
fn member() -> String {
    Uuid::new_v4().simple().to_string()
}

fn limit(limit: u32, window: Duration, block: Duration) -> Limit {
    Limit { limit, window, block }
}

/// Hits `key` with a fresh member.
async fn hit(hot: &dyn HotState, key: &str, limit: Limit) -> LimitDecision {
    hot.limit_hit(key, limit, &member()).await.unwrap()
}

/// The `retry_after` of a decision that must be a denial (positive, as the trait promises).
#[track_caller]
fn denied(decision: LimitDecision) -> Duration {
    match decision {
        LimitDecision::Denied { retry_after } => {
            assert!(retry_after > Duration::ZERO, "denied with a zero retry_after");
            retry_after
        }
        LimitDecision::Allowed { count } => panic!("allowed (count {count}) where a denial was expected"),
    }
}

async fn limit_allows_up_to_the_limit(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("login");
    let window = Duration::from_millis(400);
    let five = limit(5, window, Duration::ZERO);
    for count in 1..=5 {
        assert_eq!(hit(&*hot, &key, five).await, LimitDecision::Allowed { count }, "hit #{count}");
    }
    for _ in 0..3 {
        let retry_after = denied(hit(&*hot, &key, five).await);
        assert!(retry_after <= window, "retry_after {retry_after:?} beyond the window");
    }
}

async fn limit_of_zero_denies_everything(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("register");
    let window = Duration::from_millis(300);
    let zero = limit(0, window, Duration::from_secs(5));
    for _ in 0..3 {
        assert_eq!(hit(&*hot, &key, zero).await, LimitDecision::Denied { retry_after: window });
    }
    assert_eq!(hot.limit_peek(&key, zero).await.unwrap(), LimitDecision::Denied { retry_after: window });
    let zero_window = limit(0, Duration::ZERO, Duration::ZERO);
    let one_second = LimitDecision::Denied { retry_after: Duration::from_secs(1) };
    assert_eq!(hit(&*hot, &key, zero_window).await, one_second);
    // Nothing was counted: a real limit on the same key starts from zero.
    let two = limit(2, window, Duration::ZERO);
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 1 });
}

async fn limit_window_slides(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("login");
    let window = Duration::from_millis(400);
    let two = limit(2, window, Duration::ZERO);
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 1 });
    tokio::time::sleep(window / 2).await;
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 2 });
    let retry_after = denied(hit(&*hot, &key, two).await);
    assert!(retry_after <= window / 2 + MARGIN, "retry_after {retry_after:?}: not the oldest event's");
    // The first event has left the window; the second (half a window younger) is still in it.
    tokio::time::sleep(retry_after + MARGIN / 2).await;
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 2 });
    // And once a whole window has passed, every event has left it.
    tokio::time::sleep(window + MARGIN).await;
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 1 });
}

async fn limit_block_outlasts_the_window(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("login");
    let window = Duration::from_millis(300);
    let block = Duration::from_millis(1500);
    let blocking = limit(2, window, block);
    assert_eq!(hit(&*hot, &key, blocking).await, LimitDecision::Allowed { count: 1 });
    assert_eq!(hit(&*hot, &key, blocking).await, LimitDecision::Allowed { count: 2 });
    let first = denied(hit(&*hot, &key, blocking).await);
    assert!(first > window && first <= block, "retry_after {first:?}: not the block's");
    tokio::time::sleep(window + 2 * MARGIN).await;
    // Both events have left the window, but the block stands.
    let second = denied(hit(&*hot, &key, blocking).await);
    assert!(second <= block - window, "retry_after {second:?} after {window:?} of a {block:?} block");
    assert!(second < first, "retry_after grew from {first:?} to {second:?}");
    tokio::time::sleep(second + MARGIN).await;
    assert_eq!(hit(&*hot, &key, blocking).await, LimitDecision::Allowed { count: 1 });
}

/// Hammers `key` with `hits` denied hits, 40 ms apart: each answers a shorter `retry_after`
/// than the one before (nothing was extended). Returns the last.
async fn hammer_denied(hot: &dyn HotState, key: &str, limit: Limit, hits: usize) -> Duration {
    let mut last = denied(hit(hot, key, limit).await);
    for i in 0..hits {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let retry_after = denied(hit(hot, key, limit).await);
        assert!(retry_after < last, "denied hit #{i}: retry_after grew from {last:?} to {retry_after:?}");
        last = retry_after;
    }
    last
}

async fn limit_denied_hits_do_not_extend_a_block(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("login");
    let block = Duration::from_millis(800);
    let blocking = limit(1, Duration::from_millis(100), block);
    assert_eq!(hit(&*hot, &key, blocking).await, LimitDecision::Allowed { count: 1 });
    let last = hammer_denied(&*hot, &key, blocking, 10).await;
    assert!(
        last < block - Duration::from_millis(300),
        "retry_after {last:?} after 400 ms of a {block:?} block"
    );
    tokio::time::sleep(last + MARGIN).await;
    assert_eq!(hit(&*hot, &key, blocking).await, LimitDecision::Allowed { count: 1 });
}

async fn limit_denied_hits_do_not_extend_a_full_window(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("login");
    let window = Duration::from_millis(800);
    let two = limit(2, window, Duration::ZERO);
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 1 });
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 2 });
    let last = hammer_denied(&*hot, &key, two, 10).await;
    assert!(
        last < window - Duration::from_millis(300),
        "retry_after {last:?} after 400 ms of a {window:?} window"
    );
    // Both counted events have left; none of the denied ones was counted.
    tokio::time::sleep(last + MARGIN).await;
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 1 });
}

async fn limit_refund_frees_a_slot(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("login");
    let two = limit(2, LONG_TTL, Duration::ZERO);
    let (first, second) = (member(), member());
    assert_eq!(hot.limit_hit(&key, two, &first).await.unwrap(), LimitDecision::Allowed { count: 1 });
    assert_eq!(hot.limit_hit(&key, two, &second).await.unwrap(), LimitDecision::Allowed { count: 2 });
    denied(hit(&*hot, &key, two).await);
    hot.limit_refund(&key, &first).await.unwrap();
    assert_eq!(hot.limit_peek(&key, two).await.unwrap(), LimitDecision::Allowed { count: 1 });
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 2 });
    denied(hit(&*hot, &key, two).await);
    // A second refund of the same event takes nothing more back.
    hot.limit_refund(&key, &first).await.unwrap();
    denied(hit(&*hot, &key, two).await);
}

async fn limit_refund_of_the_blocking_event_lifts_the_block(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("login");
    let blocking = limit(2, LONG_TTL, LONG_TTL);
    let (first, second) = (member(), member());
    assert_eq!(hot.limit_hit(&key, blocking, &first).await.unwrap(), LimitDecision::Allowed { count: 1 });
    assert_eq!(hot.limit_hit(&key, blocking, &second).await.unwrap(), LimitDecision::Allowed { count: 2 });
    let retry_after = denied(hit(&*hot, &key, blocking).await);
    assert!(retry_after > LONG_TTL / 2, "retry_after {retry_after:?}: not the block's");
    hot.limit_refund(&key, &second).await.unwrap();
    assert_eq!(hot.limit_peek(&key, blocking).await.unwrap(), LimitDecision::Allowed { count: 1 });
    // The event taking the refunded one's place fills the window again, and blocks again.
    let third = member();
    assert_eq!(hot.limit_hit(&key, blocking, &third).await.unwrap(), LimitDecision::Allowed { count: 2 });
    denied(hit(&*hot, &key, blocking).await);
    hot.limit_refund(&key, &third).await.unwrap();
    assert_eq!(hot.limit_peek(&key, blocking).await.unwrap(), LimitDecision::Allowed { count: 1 });
}

async fn limit_refund_of_another_event_keeps_the_block(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("login");
    let blocking = limit(2, LONG_TTL, LONG_TTL);
    let (first, second) = (member(), member());
    hot.limit_hit(&key, blocking, &first).await.unwrap();
    hot.limit_hit(&key, blocking, &second).await.unwrap();
    // `second` set the block: refunding `first` frees its slot in the window, not the block.
    hot.limit_refund(&key, &first).await.unwrap();
    denied(hot.limit_peek(&key, blocking).await.unwrap());
    denied(hit(&*hot, &key, blocking).await);
    hot.limit_refund(&key, &first).await.unwrap();
    denied(hit(&*hot, &key, blocking).await);
    // Only `second` is left in the window; refunding it lifts the block and empties the window.
    hot.limit_refund(&key, &second).await.unwrap();
    assert_eq!(hit(&*hot, &key, blocking).await, LimitDecision::Allowed { count: 1 });
}

async fn limit_refund_of_unknown_is_a_no_op(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("login");
    let three = limit(3, LONG_TTL, LONG_TTL);
    hit(&*hot, &key, three).await;
    hit(&*hot, &key, three).await;
    hot.limit_refund(&key, &member()).await.unwrap();
    assert_eq!(hot.limit_peek(&key, three).await.unwrap(), LimitDecision::Allowed { count: 2 });
    hit(&*hot, &key, three).await;
    hot.limit_refund(&key, &member()).await.unwrap();
    denied(hot.limit_peek(&key, three).await.unwrap());
    // A key never hit.
    let unknown = limit_key("login");
    hot.limit_refund(&unknown, &member()).await.unwrap();
    assert_eq!(hot.limit_peek(&unknown, three).await.unwrap(), LimitDecision::Allowed { count: 0 });
}

async fn limit_peek_does_not_count(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("register");
    let window = Duration::from_millis(400);
    let two = limit(2, window, Duration::ZERO);
    for _ in 0..3 {
        assert_eq!(hot.limit_peek(&key, two).await.unwrap(), LimitDecision::Allowed { count: 0 });
    }
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 1 });
    for _ in 0..3 {
        assert_eq!(hot.limit_peek(&key, two).await.unwrap(), LimitDecision::Allowed { count: 1 });
    }
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 2 });
    let peeked = denied(hot.limit_peek(&key, two).await.unwrap());
    assert!(peeked <= window, "peek's retry_after {peeked:?} beyond the window");
    let hit_retry = denied(hit(&*hot, &key, two).await);
    assert!(hit_retry <= peeked, "hit's retry_after {hit_retry:?} beyond peek's {peeked:?}");
}

async fn limit_clear_resets(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let key = limit_key("login");
    let blocking = limit(2, LONG_TTL, LONG_TTL);
    hit(&*hot, &key, blocking).await;
    hit(&*hot, &key, blocking).await;
    denied(hit(&*hot, &key, blocking).await);
    hot.limit_clear(&key).await.unwrap();
    assert_eq!(hot.limit_peek(&key, blocking).await.unwrap(), LimitDecision::Allowed { count: 0 });
    assert_eq!(hit(&*hot, &key, blocking).await, LimitDecision::Allowed { count: 1 });
    // Clearing twice, or a key never hit, is fine.
    hot.limit_clear(&key).await.unwrap();
    hot.limit_clear(&key).await.unwrap();
    hot.limit_clear(&limit_key("login")).await.unwrap();
    assert_eq!(hot.limit_peek(&key, blocking).await.unwrap(), LimitDecision::Allowed { count: 0 });
}

async fn limit_keys_are_independent(factory: Arc<dyn Factory>) {
    let hot = factory.make().await;
    let one = limit(1, LONG_TTL, LONG_TTL);
    let key = limit_key("login");
    let blocker = member();
    assert_eq!(hot.limit_hit(&key, one, &blocker).await.unwrap(), LimitDecision::Allowed { count: 1 });
    denied(hit(&*hot, &key, one).await);
    // Keys that extend the blocked one, or that its Redis keys could be confused with.
    let others = [
        format!("{key}0"),
        format!("{key}:b"),
        key[..key.len() - 1].to_owned(),
        key.replacen("login", "register", 1),
        "register:ip:2001:db8::1".to_owned(),
    ];
    for other in &others {
        assert_eq!(hot.limit_peek(other, one).await.unwrap(), LimitDecision::Allowed { count: 0 }, "{other}");
        assert_eq!(hit(&*hot, other, one).await, LimitDecision::Allowed { count: 1 }, "{other}");
        // Refunding or clearing another key leaves the blocked one blocked.
        hot.limit_refund(other, &blocker).await.unwrap();
        hot.limit_clear(other).await.unwrap();
        denied(hot.limit_peek(&key, one).await.unwrap());
    }
}

async fn limit_concurrent_hits_allow_exactly_the_limit(factory: Arc<dyn Factory>) {
    let hots = factory.make_sharing(4).await;
    let key = limit_key("login");
    let five = limit(5, LONG_TTL, Duration::ZERO);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let hot = Arc::clone(&hots[i % hots.len()]);
            let key = key.clone();
            tokio::spawn(async move { hot.limit_hit(&key, five, &member()).await })
        })
        .collect();
    let mut counts = Vec::new();
    for task in tasks {
        match task.await.unwrap().unwrap() {
            LimitDecision::Allowed { count } => counts.push(count),
            LimitDecision::Denied { retry_after } => {
                assert!(
                    retry_after > Duration::ZERO && retry_after <= LONG_TTL,
                    "retry_after {retry_after:?}"
                );
            }
        }
    }
    counts.sort_unstable();
    assert_eq!(counts, [1, 2, 3, 4, 5], "allowed counts");
    for hot in &hots {
        denied(hot.limit_peek(&key, five).await.unwrap());
    }
}

/// Two instances made by one factory are two server processes sharing one Redis and prefix:
/// they enforce one limit between them (counts, blocks, refunds and clears alike).
async fn limit_is_shared_by_instances_with_one_prefix(factory: Arc<dyn Factory>) {
    let a = factory.make().await;
    let b = factory.make().await;
    let key = limit_key("login");
    let blocking = limit(3, LONG_TTL, LONG_TTL);
    assert_eq!(hit(&*a, &key, blocking).await, LimitDecision::Allowed { count: 1 });
    assert_eq!(hit(&*b, &key, blocking).await, LimitDecision::Allowed { count: 2 });
    let blocker = member();
    assert_eq!(a.limit_hit(&key, blocking, &blocker).await.unwrap(), LimitDecision::Allowed { count: 3 });
    denied(hit(&*b, &key, blocking).await);
    denied(b.limit_peek(&key, blocking).await.unwrap());
    // An event counted by `a` taken back through `b`.
    b.limit_refund(&key, &blocker).await.unwrap();
    assert_eq!(a.limit_peek(&key, blocking).await.unwrap(), LimitDecision::Allowed { count: 2 });
    assert_eq!(hit(&*a, &key, blocking).await, LimitDecision::Allowed { count: 3 });
    denied(hit(&*b, &key, blocking).await);
    b.limit_clear(&key).await.unwrap();
    assert_eq!(a.limit_peek(&key, blocking).await.unwrap(), LimitDecision::Allowed { count: 0 });
}

async fn limit_is_not_shared_across_prefixes(factory: Arc<dyn Factory>) {
    let a = factory.make().await;
    let key = limit_key("login");
    let one = limit(1, LONG_TTL, LONG_TTL);
    assert_eq!(hit(&*a, &key, one).await, LimitDecision::Allowed { count: 1 });
    denied(hit(&*a, &key, one).await);
    // Same Redis, another prefix: another deployment (or test) with limits of its own.
    let url = std::env::var(REDIS_URL_VAR).unwrap();
    let other = RedisHotState::connect(&url, unique_prefix()).await.unwrap();
    assert_eq!(other.limit_peek(&key, one).await.unwrap(), LimitDecision::Allowed { count: 0 });
    assert_eq!(hit(&other, &key, one).await, LimitDecision::Allowed { count: 1 });
    other.limit_clear(&key).await.unwrap();
    denied(hit(&*a, &key, one).await);
}

/// The keys a limit writes are the ones the key-scheme table in `hot::redis` documents (an
/// operator reading Redis, or a later change, relies on it), and all expire.
#[tokio::test]
async fn redis_limit_keys_follow_the_key_scheme() {
    let Some(factory) = redis_factory("redis_limit_keys_follow_the_key_scheme") else {
        return;
    };
    let hot = factory.make().await;
    let key = limit_key("login");
    let window = Duration::from_secs(20);
    let block = Duration::from_secs(40);
    let (first, second) = (member(), member());
    hot.limit_hit(&key, limit(2, window, block), &first).await.unwrap();
    hot.limit_hit(&key, limit(2, window, block), &second).await.unwrap();

    let client = redis::Client::open(factory.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let window_key = format!("{}lim:{{{key}}}", factory.prefix);
    let block_key = format!("{window_key}:b");
    let events: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&window_key)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .unwrap();
    let members: Vec<&str> = events.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(members.len(), 2, "{events:?}");
    assert!(members.contains(&first.as_str()) && members.contains(&second.as_str()), "{events:?}");
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as f64;
    for (_, at) in &events {
        assert!((now_ms - at).abs() < 60_000.0, "event scored {at}, not a time in ms near {now_ms}");
    }
    let window_ttl: i64 = redis::cmd("PTTL").arg(&window_key).query_async(&mut conn).await.unwrap();
    assert!(window_ttl > 0 && window_ttl <= 21_000, "window key PTTL {window_ttl}");
    let blocker: String = redis::cmd("GET").arg(&block_key).query_async(&mut conn).await.unwrap();
    assert_eq!(blocker, second);
    let block_ttl: i64 = redis::cmd("PTTL").arg(&block_key).query_async(&mut conn).await.unwrap();
    assert!(block_ttl > 20_000 && block_ttl <= 40_000, "block key PTTL {block_ttl}");

    hot.limit_clear(&key).await.unwrap();
    let left: u64 =
        redis::cmd("EXISTS").arg(&window_key).arg(&block_key).query_async(&mut conn).await.unwrap();
    assert_eq!(left, 0);
}

/// Redis may forget the scripts (restart, `SCRIPT FLUSH`, failover to a replica that never
/// loaded them): the next call loads them again instead of failing.
#[tokio::test]
async fn redis_limits_survive_a_script_flush() {
    let Some(factory) = redis_factory("redis_limits_survive_a_script_flush") else {
        return;
    };
    let hot = factory.make().await;
    let key = limit_key("login");
    let two = limit(2, LONG_TTL, Duration::ZERO);
    let counted = member();
    assert_eq!(hot.limit_hit(&key, two, &counted).await.unwrap(), LimitDecision::Allowed { count: 1 });

    let client = redis::Client::open(factory.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Only drops the script cache: other tests sharing this Redis reload theirs the same way.
    redis::cmd("SCRIPT").arg("FLUSH").exec_async(&mut conn).await.unwrap();
    assert_eq!(hot.limit_peek(&key, two).await.unwrap(), LimitDecision::Allowed { count: 1 });
    redis::cmd("SCRIPT").arg("FLUSH").exec_async(&mut conn).await.unwrap();
    hot.limit_refund(&key, &counted).await.unwrap();
    redis::cmd("SCRIPT").arg("FLUSH").exec_async(&mut conn).await.unwrap();
    assert_eq!(hit(&*hot, &key, two).await, LimitDecision::Allowed { count: 1 });

    // Flushed over and over while calls run: none fails (a fallback that loads the script and
    // retries `EVALSHA` would, whenever a flush lands between the two).
    let flusher = tokio::spawn(async move {
        loop {
            redis::cmd("SCRIPT").arg("FLUSH").exec_async(&mut conn).await.unwrap();
            tokio::task::yield_now().await;
        }
    });
    for _ in 0..200 {
        hot.limit_peek(&key, two).await.unwrap();
    }
    flusher.abort();
}

// ---------------------------------------------------------------------------------------------
// Redis connection failures: need no running Redis, so they always run.

#[tokio::test]
async fn redis_connect_to_closed_port_fails_fast() {
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        RedisHotState::connect("redis://127.0.0.1:1", unique_prefix()),
    )
    .await
    .expect("connect hung for 10 s");
    let elapsed = started.elapsed();
    assert!(result.is_err(), "connect to a closed port succeeded");
    assert!(elapsed < Duration::from_secs(5), "connect took {elapsed:?}");
    let _ = writeln!(std::io::stderr(), "connect to a closed port failed in {elapsed:?}");
}

#[tokio::test]
async fn redis_connect_with_invalid_url_fails() {
    let result = RedisHotState::connect("not a redis url", unique_prefix()).await;
    assert!(result.is_err());
}

#[tokio::test]
async fn redis_connect_to_silent_server_fails_fast() {
    // Accepts TCP connections (the kernel does, from the backlog) but never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), RedisHotState::connect(&url, unique_prefix()))
        .await
        .expect("connect hung for 10 s");
    let elapsed = started.elapsed();
    assert!(result.is_err(), "connect to a silent server succeeded");
    assert!(elapsed < Duration::from_secs(5), "connect took {elapsed:?}");
    drop(listener);
}

/// Once connected, losing Redis makes calls fail within the response timeout, never hang;
/// and the instance recovers by itself when Redis is back.
#[tokio::test]
async fn redis_calls_fail_fast_when_redis_goes_away() {
    let name = "redis_calls_fail_fast_when_redis_goes_away";
    let Some(factory) = redis_factory(name) else {
        return;
    };
    let upstream = factory
        .url
        .strip_prefix("redis://")
        .and_then(|rest| rest.split(['/', '?']).next())
        .map(|authority| authority.rsplit('@').next().unwrap_or(authority).to_owned());
    let Some(upstream) = upstream else {
        let _ = writeln!(std::io::stderr(), "SKIPPED {name}: needs a redis:// URL");
        return;
    };

    // A TCP proxy to the real Redis, which the test can cut.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let proxy = tokio::spawn(run_proxy(listener, upstream.clone()));
    let url = factory.url.replacen(&upstream, &proxy_addr.to_string(), 1);
    let hot = RedisHotState::connect(&url, factory.prefix.clone()).await.unwrap();
    let session = Uuid::now_v7();
    hot.revoke_session(session, LONG_TTL).await.unwrap();
    assert!(hot.is_session_revoked(session).await.unwrap());

    // Cut it: the listener and every proxied connection go away.
    proxy.abort();
    let _ = proxy.await;
    for _ in 0..3 {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), hot.is_session_revoked(session))
            .await
            .expect("call hung for 10 s with Redis gone");
        let elapsed = started.elapsed();
        assert!(result.is_err(), "call succeeded with Redis gone: {result:?}");
        assert!(elapsed < Duration::from_secs(5), "call took {elapsed:?}");
        let _ = writeln!(std::io::stderr(), "call with Redis gone failed in {elapsed:?}");
    }
    let ping = tokio::time::timeout(Duration::from_secs(10), hot.ping()).await;
    assert!(matches!(ping, Ok(Err(_))), "ping with Redis gone: {ping:?}");

    // Redis back on the same address: the same instance reconnects by itself.
    let listener = tokio::net::TcpListener::bind(proxy_addr).await.unwrap();
    let proxy = tokio::spawn(run_proxy(listener, upstream));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match hot.is_session_revoked(session).await {
            Ok(revoked) => {
                assert!(revoked);
                break;
            }
            Err(e) if Instant::now() > deadline => panic!("no reconnection after 10 s: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    proxy.abort();
}

/// Forwards every connection accepted on `listener` to `upstream`; aborting the task drops
/// the listener and every forwarded connection.
async fn run_proxy(listener: tokio::net::TcpListener, upstream: String) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (mut inbound, _) = listener.accept().await.unwrap();
        let upstream = upstream.clone();
        connections.spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The revocation mirror (Redis with the pub/sub feed): checks answered in process.

async fn mirrored(factory: &RedisFactory) -> RedisHotState {
    let hot = RedisHotState::connect(&factory.url, factory.prefix.clone())
        .await
        .unwrap()
        .with_revocation_feed(Duration::from_secs(5));
    wait_until(Duration::from_secs(5), || hot.revocations_mirrored()).await;
    hot
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    start.elapsed()
}

/// Another replica's revocation reaches the mirror through the channel, and checks then
/// cost no Redis round trip at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mirror_follows_revocations_without_round_trips() {
    let Some(factory) = redis_factory("redis_mirror_follows_revocations_without_round_trips") else {
        return;
    };
    let replica = mirrored(&factory).await;
    let other = factory.make().await;
    let (revoked, live) = (Uuid::now_v7(), Uuid::now_v7());
    other.revoke_session(revoked, LONG_TTL).await.unwrap();
    let mut seen = false;
    for _ in 0..500 {
        if replica.is_session_revoked(revoked).await.unwrap() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(seen, "the revocation reached the other replica within a second");
    let before = replica.revocation_checks_sent();
    for _ in 0..1000 {
        assert!(replica.is_session_revoked(revoked).await.unwrap());
        assert!(!replica.is_session_revoked(live).await.unwrap());
    }
    if replica.revocations_mirrored() {
        assert_eq!(replica.revocation_checks_sent(), before, "no round trip while the mirror is up");
    }
    // Its own revocations are in the mirror at once.
    let own = Uuid::now_v7();
    replica.revoke_session(own, LONG_TTL).await.unwrap();
    assert!(replica.is_session_revoked(own).await.unwrap());
}

/// Revocations made before the replica started are copied in by the resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mirror_resyncs_earlier_revocations() {
    let Some(factory) = redis_factory("redis_mirror_resyncs_earlier_revocations") else {
        return;
    };
    let other = factory.make().await;
    let earlier: Vec<Uuid> = (0..1500).map(|_| Uuid::now_v7()).collect();
    for id in &earlier {
        other.revoke_session(*id, LONG_TTL).await.unwrap();
    }
    let replica = mirrored(&factory).await;
    for id in &earlier {
        assert!(replica.is_session_revoked(*id).await.unwrap());
    }
    assert!(!replica.is_session_revoked(Uuid::now_v7()).await.unwrap());
}

/// `CLIENT KILL TYPE pubsub` cuts the feed: the replica stops trusting its copy, asks Redis
/// on each check (so a revocation made meanwhile is seen), then resubscribes and resyncs.
/// (Kills every subscriber on that Redis: nextest runs it alone, see .config/nextest.toml.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mirror_client_kill_falls_back_then_resyncs() {
    let Some(factory) = redis_factory("redis_mirror_client_kill_falls_back_then_resyncs") else {
        return;
    };
    let replica = mirrored(&factory).await;
    let other = factory.make().await;
    let client = redis::Client::open(factory.url.as_str()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut admin).await.unwrap();
    assert!(killed >= 1, "the feed's subscription was killed");
    let noticed = wait_until(Duration::from_secs(2), || !replica.revocations_mirrored()).await;
    eprintln!("subscription loss noticed after {noticed:?}");

    // Revoked while the feed is down: the message is lost to this replica, the check is not.
    let during = Uuid::now_v7();
    other.revoke_session(during, LONG_TTL).await.unwrap();
    let sent = replica.revocation_checks_sent();
    if !replica.revocations_mirrored() {
        assert!(replica.is_session_revoked(during).await.unwrap(), "asked Redis while the feed was down");
        assert!(replica.revocation_checks_sent() > sent, "that check went to Redis");
    }
    // Back, resynced: answered in process again, including what was missed.
    wait_until(Duration::from_secs(5), || replica.revocations_mirrored()).await;
    let sent = replica.revocation_checks_sent();
    assert!(replica.is_session_revoked(during).await.unwrap());
    assert_eq!(replica.revocation_checks_sent(), sent);
}
