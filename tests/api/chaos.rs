//! Dependencies going away mid-test: Redis cut behind a TCP proxy, Redis losing its data.

use std::{sync::Arc, time::Duration};

use portcullis::api::pb::{self, TokenInvalidReason};
use redis::AsyncCommands;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    harness::{Backend, TestApp, error_reason, eventually, reason, spawn_with_settings, test_settings},
    support,
};

async fn serving(app: &TestApp) -> Option<i32> {
    let mut health = HealthClient::new(app.channel());
    health.check(HealthCheckRequest { service: String::new() }).await.ok().map(|r| r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_and_recovery_keeps_revocations() {
    let Some((mut settings, data)) = test_settings(Backend::Postgres).await else { return };
    let redis_url = settings.redis_url.clone().unwrap();
    let proxy = support::TcpProxy::start(&support::redis_host_port(&redis_url)).await;
    settings.redis_url = Some(format!("redis://{}", proxy.addr()));
    settings.sessions.revocation_resync_interval = Duration::from_millis(300);
    settings.redis.revocation_max_staleness = Duration::from_millis(400);
    let prefix = settings.redis.key_prefix.clone();
    let app = spawn_with_settings(settings, Arc::new(data)).await;

    let (kept, _, _) = app.user_session("ann").await;
    let (gone, _, _) = app.user_session("ben").await;
    app.logout(&gone).await.unwrap();
    assert_eq!(reason(&app.validate(&gone).await), TokenInvalidReason::SessionRevoked);

    // Redis unreachable: for `revocation_max_staleness` this replica answers from its copy
    // of the revocations (the revoked session stays revoked), then ValidateToken cannot know
    // about revocations any more and fails closed; health says NOT_SERVING.
    proxy.cut();
    let cut_at = std::time::Instant::now();
    let during = app.validate(&gone).await;
    if cut_at.elapsed() < Duration::from_millis(400) {
        assert_eq!(reason(&during), TokenInvalidReason::SessionRevoked, "the copy still knows");
    }
    let mut client = app.auth.clone();
    let mut failed_closed = None;
    for _ in 0..100 {
        match client
            .validate_token(pb::ValidateTokenRequest { token: kept.clone(), required_roles: vec![] })
            .await
        {
            Err(status) => {
                failed_closed = Some(status);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let status = failed_closed.expect("fails closed once the staleness bound has passed");
    assert!(cut_at.elapsed() >= Duration::from_millis(400), "not before the bound: {:?}", cut_at.elapsed());
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(error_reason(&status), "UNAVAILABLE");
    assert!(
        eventually(Duration::from_secs(5), || async {
            serving(&app).await == Some(ServingStatus::NotServing as i32)
        })
        .await,
        "health reports the outage"
    );

    // Back: serving again, without a restart.
    proxy.restore();
    assert!(
        eventually(Duration::from_secs(10), || async {
            serving(&app).await == Some(ServingStatus::Serving as i32)
        })
        .await,
        "health recovers"
    );
    assert!(eventually(Duration::from_secs(10), || async { app.validate_ok(&kept).await }).await);

    // Redis loses our keys (a restart without persistence, a failover, a FLUSHALL): the
    // revoked session must not come back for longer than the resync interval.
    let mut redis = redis::Client::open(redis_url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis.keys(format!("{prefix}*")).await.unwrap();
    assert!(!keys.is_empty());
    let _: () = redis.del(keys).await.unwrap();
    // Within the resync interval (300 ms here), with slack for a loaded test machine.
    assert!(
        eventually(Duration::from_secs(3), || async {
            reason(&app.validate(&gone).await) == TokenInvalidReason::SessionRevoked
        })
        .await,
        "re-published from the database"
    );
    assert!(app.validate(&kept).await.valid);
}

impl TestApp {
    /// ValidateToken answered and said valid (an RPC error counts as "no").
    async fn validate_ok(&self, token: &str) -> bool {
        let mut client = self.auth.clone();
        client
            .validate_token(pb::ValidateTokenRequest { token: token.into(), required_roles: vec![] })
            .await
            .is_ok_and(|r| r.into_inner().valid)
    }
}

/// Two replicas sharing PostgreSQL and Redis: a logout on one is refused by the other, which
/// learns it through pub/sub (no Redis round trip per check); with its subscription killed
/// (`CLIENT KILL TYPE pubsub`), the other asks Redis on each check until it has resubscribed
/// and resynced, so the logout is refused all the same. (Runs alone: see .config/nextest.toml.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_cross_replicas_and_survive_a_client_kill() {
    let Some((settings, data)) = test_settings(Backend::Postgres).await else { return };
    let redis_url = settings.redis_url.clone().unwrap();
    let data = Arc::new(data);
    let one = spawn_with_settings(settings.clone(), data.clone()).await;
    let two = spawn_with_settings(settings, data).await;

    // Steady state: every logout on one is refused by two within the hard bound.
    one.register("cara").await;
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let access = one.login("cara").await.tokens.unwrap().access_token;
        assert!(two.validate(&access).await.valid);
        one.logout(&access).await.unwrap();
        let start = std::time::Instant::now();
        assert!(
            eventually(Duration::from_secs(1), || async {
                reason(&two.validate(&access).await) == TokenInvalidReason::SessionRevoked
            })
            .await,
            "the other replica refuses the logged-out token within a second"
        );
        slowest = slowest.max(start.elapsed());
    }
    eprintln!("slowest cross-replica revocation seen after {slowest:?}");

    // The subscription killed: the next logout is still refused by the other replica.
    let access = one.login("cara").await.tokens.unwrap().access_token;
    assert!(two.validate(&access).await.valid);
    let mut admin = redis::Client::open(redis_url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let killed: i64 =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut admin).await.unwrap();
    assert!(killed >= 2, "both replicas' subscriptions were cut ({killed})");
    one.logout(&access).await.unwrap();
    assert!(
        eventually(Duration::from_secs(1), || async {
            reason(&two.validate(&access).await) == TokenInvalidReason::SessionRevoked
        })
        .await,
        "refused while the feed is down or once it has resynced"
    );
}

/// Redis loses every key (FLUSHALL, a restart without persistence): the revocations are
/// back in Redis within about a second (the completeness marker went with them), whatever
/// the resync interval, so a replica that starts just after the flush is not fooled for
/// longer than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_is_repaired_within_a_second() {
    let Some((settings, data)) = test_settings(Backend::Postgres).await else { return };
    assert!(
        settings.sessions.revocation_resync_interval >= Duration::from_secs(30),
        "the slow path is not what repairs it"
    );
    let redis_url = settings.redis_url.clone().unwrap();
    let prefix = settings.redis.key_prefix.clone();
    let app = spawn_with_settings(settings, Arc::new(data)).await;
    let (gone, _, session) = app.user_session("fifi").await;
    app.logout(&gone).await.unwrap();
    let key = format!("{prefix}rev:{{{}}}", session.session.unwrap().id);

    let mut redis = redis::Client::open(redis_url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let exists = |mut redis: redis::aio::MultiplexedConnection, key: String| async move {
        redis.exists::<_, bool>(key).await.unwrap()
    };
    assert!(exists(redis.clone(), key.clone()).await);
    let keys: Vec<String> = redis.keys(format!("{prefix}*")).await.unwrap();
    let _: () = redis.del(keys).await.unwrap();
    let flushed = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(3), || exists(redis.clone(), key.clone())).await,
        "re-published after the flush"
    );
    eprintln!("revocations back in Redis {:?} after the flush", flushed.elapsed());
    assert!(flushed.elapsed() < Duration::from_millis(2500));
    assert_eq!(reason(&app.validate(&gone).await), TokenInvalidReason::SessionRevoked);
}
