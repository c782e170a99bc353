//! One conformance suite for every [`HotState`] implementation.
//!
//! Each case is written once, as a function over `&dyn HotState`, and run as its own test
//! against [`MemoryHotState`] (`memory_<case>`) and [`RedisHotState`] (`redis_<case>`).
//!
//! The Redis cases need `PORTCULLIS_TEST_REDIS_URL` (e.g. `redis://127.0.0.1:6379`); when it is
//! unset they print `SKIPPED <case>: ...` to stderr and pass. Each Redis test uses its own random
//! key prefix, so tests never see each other's keys, and every key written has a short ttl, so
//! nothing is left behind.

use std::{
    future::Future,
    io::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use portcullis::hot::{HotState, MemoryHotState, RedisHotState};
use uuid::Uuid;

const REDIS_URL_VAR: &str = "PORTCULLIS_TEST_REDIS_URL";

/// Long enough not to expire during a test, short enough that Redis drops the keys soon after.
const LONG_TTL: Duration = Duration::from_secs(60);
/// Short ttl for the expiry cases, and how long to wait for it to pass.
const SHORT_TTL: Duration = Duration::from_millis(300);
const PAST_SHORT_TTL: Duration = Duration::from_millis(600);

// ---------------------------------------------------------------------------------------------
// Implementations under test.

/// Makes fresh instances of one implementation; instances made by one factory share state
/// when the implementation shares state across instances (Redis with one prefix).
#[async_trait::async_trait]
trait Factory: Send + Sync {
    async fn make(&self) -> Arc<dyn HotState>;
}

struct MemoryFactory;

#[async_trait::async_trait]
impl Factory for MemoryFactory {
    async fn make(&self) -> Arc<dyn HotState> {
        Arc::new(MemoryHotState::new())
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
macro_rules! conformance {
    ($($case:ident => $memory:ident, $redis:ident;)*) => {$(
        #[tokio::test]
        async fn $memory() {
            run_memory($case).await;
        }

        #[tokio::test]
        async fn $redis() {
            run_redis(stringify!($redis), $case).await;
        }
    )*};
}

/// `redis_only!(case => redis_test)`: cases that hold only for state shared across instances.
macro_rules! redis_only {
    ($($case:ident => $redis:ident;)*) => {$(
        #[tokio::test]
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
}

redis_only! {
    instances_sharing_a_prefix_see_each_other => redis_instances_sharing_a_prefix_see_each_other;
    instances_with_other_prefixes_are_isolated => redis_instances_with_other_prefixes_are_isolated;
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
