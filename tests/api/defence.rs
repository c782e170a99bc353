//! Brute-force defence over gRPC: account lockout (durable, growing, not a weapon against
//! the owner), IP blocks, the per-client throttle, request limits, one limit across two
//! servers, and what happens when Redis goes away or loses its data.

use std::{sync::Arc, time::Duration};

use futures_util::future::join_all;
use portcullis::{api::pb, config::Lockout, config::RateLimit};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    harness::{
        Backend, FIREFOX, PASSWORD, TestApp, error_reason, spawn_app_with, spawn_with_settings, test_settings,
    },
    on_both_backends, support,
};

on_both_backends!(
    an_account_locks_after_its_budget_and_unlocks_by_itself,
    a_success_resets_the_count,
    a_locked_answer_does_not_reveal_whether_the_account_exists,
    usernames_and_emails_share_one_case_insensitive_counter,
    the_owners_known_device_keeps_its_own_budget,
    parallel_wrong_passwords_evaluate_at_most_the_budget,
    failures_while_locked_change_nothing,
    an_ip_is_blocked_after_failures_across_accounts,
    a_client_failing_fast_is_throttled,
    registrations_are_limited_per_ip,
    reset_and_verification_mails_are_limited_per_account_and_ip,
    a_stolen_access_token_is_not_a_password_oracle,
    one_ipv6_network_is_one_address,
);

const ATTACKER_IP: &str = "198.51.100.66";
const OWNER_IP: &str = "203.0.113.7";

fn ctx(ip: &str, fingerprint: &str) -> pb::ClientContext {
    pb::ClientContext {
        ip_address: ip.into(),
        user_agent: FIREFOX.into(),
        device_fingerprint: fingerprint.into(),
    }
}

/// One login from `client`; `Ok` when it opened a session.
async fn login_as(
    app: &TestApp,
    identifier: &str,
    password: &str,
    client: pb::ClientContext,
) -> Result<pb::AuthenticatedSession, tonic::Status> {
    let mut auth = app.auth.clone();
    let response = auth
        .login(pb::LoginRequest {
            identifier: identifier.into(),
            password: password.into(),
            client: Some(client),
        })
        .await?
        .into_inner();
    match response.outcome {
        Some(pb::login_response::Outcome::Authenticated(session)) => Ok(session),
        other => panic!("unexpected outcome {other:?}"),
    }
}

async fn attack(app: &TestApp, identifier: &str) -> tonic::Status {
    login_as(app, identifier, "not the password at all", ctx(ATTACKER_IP, "attacker")).await.unwrap_err()
}

/// The `RetryInfo` of a `RESOURCE_EXHAUSTED` answer with the given reason.
fn retry_after(status: &tonic::Status, expected_reason: &str) -> Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(error_reason(status), expected_reason);
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_else(|| panic!("no RetryInfo in {status:?}"))
}

fn lockout(max_failures: u32, lockout_ms: u64) -> Lockout {
    Lockout {
        max_failures,
        window: Duration::from_secs(60),
        lockout: Duration::from_millis(lockout_ms),
        max_lockout: Duration::from_millis(4 * lockout_ms),
    }
}

async fn an_account_locks_after_its_budget_and_unlocks_by_itself(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| s.login.account_lockout = lockout(3, 1000)).await else {
        return;
    };
    app.register("alma").await;
    for _ in 0..3 {
        let status = attack(&app, "alma").await;
        assert_eq!(status.code(), Code::Unauthenticated, "wrong passwords within the budget: {status:?}");
    }
    // Locked: even the right password is refused, with the time to wait.
    let locked = login_as(&app, "alma", PASSWORD, ctx(OWNER_IP, "owner")).await.unwrap_err();
    let wait = retry_after(&locked, "TOO_MANY_ATTEMPTS");
    assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "first lockout ≈ 1 s: {wait:?}");
    tokio::time::sleep(wait + Duration::from_millis(300)).await;
    // (From the owner's device, which thereby becomes known: the attacker's stays unknown.)
    login_as(&app, "alma", PASSWORD, ctx(OWNER_IP, "owner")).await.expect("unlocked by itself");

    // The success reset the growth; lock twice in a row and the second lock is longer.
    for _ in 0..3 {
        attack(&app, "alma").await;
    }
    let first = retry_after(&attack(&app, "alma").await, "TOO_MANY_ATTEMPTS");
    tokio::time::sleep(first + Duration::from_millis(300)).await;
    for _ in 0..3 {
        assert_eq!(attack(&app, "alma").await.code(), Code::Unauthenticated);
    }
    let second = retry_after(&attack(&app, "alma").await, "TOO_MANY_ATTEMPTS");
    assert!(second > Duration::from_millis(1500), "a consecutive lockout doubles: {first:?} then {second:?}");

    // The lock is in the store, with the time it ends.
    let store = app.store().await;
    let user = store.find_user_by_login("alma").await.unwrap().unwrap();
    let key = portcullis::store::GuardKey {
        subject: format!("u:{}", user.id),
        scope: "account".into(),
        user_id: Some(user.id),
    };
    let state = store.guard_state(&key).await.unwrap().expect("a guard row");
    assert_eq!(state.lockouts, 2);
    assert!(state.locked_until.is_some());
}

async fn a_success_resets_the_count(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| s.login.account_lockout = lockout(3, 60_000)).await else {
        return;
    };
    app.register("bert").await;
    for _ in 0..2 {
        attack(&app, "bert").await;
    }
    login_as(&app, "bert", PASSWORD, ctx(ATTACKER_IP, "attacker")).await.expect("within budget");
    for _ in 0..2 {
        assert_eq!(attack(&app, "bert").await.code(), Code::Unauthenticated);
    }
    login_as(&app, "bert", PASSWORD, ctx(ATTACKER_IP, "attacker"))
        .await
        .expect("the success reset the count");
}

async fn a_locked_answer_does_not_reveal_whether_the_account_exists(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| s.login.account_lockout = lockout(3, 60_000)).await else {
        return;
    };
    app.register("cora").await;
    let mut answers = Vec::new();
    for who in ["cora", "nobody-by-this-name"] {
        let mut codes = Vec::new();
        for _ in 0..3 {
            let status = attack(&app, who).await;
            codes.push((status.code(), error_reason(&status), status.message().to_string()));
        }
        let locked = attack(&app, who).await;
        let wait = retry_after(&locked, "TOO_MANY_ATTEMPTS");
        codes.push((locked.code(), error_reason(&locked), locked.message().to_string()));
        answers.push((codes, wait.as_secs().div_ceil(10)));
    }
    assert_eq!(answers[0], answers[1], "an existing and an unknown account answer alike");
    assert_eq!(answers[0].0[0].0, Code::Unauthenticated);
}

async fn usernames_and_emails_share_one_case_insensitive_counter(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| s.login.account_lockout = lockout(3, 60_000)).await else {
        return;
    };
    app.register("dina").await;
    for identifier in ["Dina", "DINA", "dina@EXAMPLE.com"] {
        assert_eq!(attack(&app, identifier).await.code(), Code::Unauthenticated);
    }
    let status = login_as(&app, "dina", PASSWORD, ctx(ATTACKER_IP, "attacker")).await.unwrap_err();
    retry_after(&status, "TOO_MANY_ATTEMPTS");
}

async fn the_owners_known_device_keeps_its_own_budget(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.login.account_lockout = lockout(3, 60_000);
        s.login.known_device_lockout = lockout(2, 60_000);
    })
    .await
    else {
        return;
    };
    app.register("edda").await;
    login_as(&app, "edda", PASSWORD, ctx(OWNER_IP, "owner-laptop")).await.expect("first login");
    // The device is remembered after the answer (as the SHA-256 of its fingerprint).
    let store = app.store().await;
    let user = store.find_user_by_login("edda").await.unwrap().unwrap();
    let device = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"fp:owner-laptop").as_ref().to_vec();
    let known = crate::harness::eventually(Duration::from_secs(5), || {
        let (store, device) = (store.clone(), device.clone());
        async move { store.is_known_device(user.id, &device).await.unwrap() }
    })
    .await;
    assert!(known, "the owner's device is remembered");

    // An attacker elsewhere spends the account's budget and locks it...
    for _ in 0..3 {
        attack(&app, "edda").await;
    }
    retry_after(&attack(&app, "edda").await, "TOO_MANY_ATTEMPTS");
    // ...while the owner, on the device they used before, still gets in.
    login_as(&app, "edda", PASSWORD, ctx(OWNER_IP, "owner-laptop"))
        .await
        .expect("known device is not locked out");
    // The owner's success does not lift the lock the attacker ran up.
    retry_after(&attack(&app, "edda").await, "TOO_MANY_ATTEMPTS");

    // That device's own budget is smaller, and spent only by failures from it.
    for _ in 0..2 {
        let status =
            login_as(&app, "edda", "fat-fingered password", ctx(OWNER_IP, "owner-laptop")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let status = login_as(&app, "edda", PASSWORD, ctx(OWNER_IP, "owner-laptop")).await.unwrap_err();
    retry_after(&status, "TOO_MANY_ATTEMPTS");
}

async fn parallel_wrong_passwords_evaluate_at_most_the_budget(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.login.account_lockout = lockout(5, 60_000);
        s.password.hashing_queue_timeout = Duration::from_secs(60);
    })
    .await
    else {
        return;
    };
    app.register("fern").await;
    let answers = join_all((0..200).map(|_| attack(&app, "fern"))).await;
    let evaluated = answers.iter().filter(|s| s.code() == Code::Unauthenticated).count();
    let refused = answers.iter().filter(|s| s.code() == Code::ResourceExhausted).count();
    assert_eq!(evaluated + refused, 200, "only wrong-password or locked answers: {answers:?}");
    assert!(evaluated <= 5, "{evaluated} passwords evaluated with a budget of 5");
    assert_eq!(evaluated, 5, "the budget is used, not more and not less");
    // The history agrees: five wrong passwords, the rest refused while locked.
    let store = app.store().await;
    let user = store.find_user_by_login("fern").await.unwrap().unwrap();
    let attempts = store.list_login_attempts(user.id, None, 500).await.unwrap();
    let wrong = attempts.iter().filter(|a| a.reason == "invalid_credentials").count();
    let locked = attempts.iter().filter(|a| a.reason == "locked").count();
    assert_eq!((wrong, locked), (5, 195), "every attempt recorded, with its reason");
}

async fn failures_while_locked_change_nothing(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| s.login.account_lockout = lockout(2, 1500)).await else {
        return;
    };
    app.register("gwen").await;
    for _ in 0..2 {
        attack(&app, "gwen").await;
    }
    let mut last = retry_after(&attack(&app, "gwen").await, "TOO_MANY_ATTEMPTS");
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let wait = retry_after(&attack(&app, "gwen").await, "TOO_MANY_ATTEMPTS");
        assert!(wait <= last, "hammering a locked account does not extend the lock: {last:?} then {wait:?}");
        last = wait;
    }
    tokio::time::sleep(last + Duration::from_millis(300)).await;
    // Unlocked on time, with a fresh budget (the tries while locked were not counted).
    assert_eq!(attack(&app, "gwen").await.code(), Code::Unauthenticated);
    login_as(&app, "gwen", PASSWORD, ctx(ATTACKER_IP, "attacker"))
        .await
        .expect("one failure left in the budget");
}

async fn an_ip_is_blocked_after_failures_across_accounts(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.login.ip_block = RateLimit::new(4, Duration::from_secs(60), Duration::from_secs(60));
    })
    .await
    else {
        return;
    };
    app.register("hana").await;
    for who in ["acct-1", "acct-2", "acct-3", "acct-4"] {
        let status = login_as(&app, who, "wrong", ctx(ATTACKER_IP, &format!("fp-{who}"))).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    // Blocked for every account from that address, even with a right password.
    let blocked = login_as(&app, "hana", PASSWORD, ctx(ATTACKER_IP, "fresh")).await.unwrap_err();
    let wait = retry_after(&blocked, "TOO_MANY_ATTEMPTS");
    assert!(wait > Duration::from_secs(50), "blocked for the configured time: {wait:?}");
    // Other addresses are not.
    login_as(&app, "hana", PASSWORD, ctx(OWNER_IP, "owner")).await.expect("another address logs in");
}

async fn a_client_failing_fast_is_throttled(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.login.client_throttle = RateLimit::new(3, Duration::from_millis(800), Duration::from_millis(1500));
    })
    .await
    else {
        return;
    };
    app.register("ines").await;
    for _ in 0..3 {
        assert_eq!(attack(&app, "nobody").await.code(), Code::Unauthenticated);
    }
    let throttled = attack(&app, "ines").await;
    let wait = retry_after(&throttled, "TOO_MANY_ATTEMPTS");
    assert!(wait <= Duration::from_millis(1500));
    // Another device on the same address is not throttled; successes never count.
    for _ in 0..4 {
        login_as(&app, "ines", PASSWORD, ctx(ATTACKER_IP, "another-device")).await.expect("not throttled");
    }
    tokio::time::sleep(wait + Duration::from_millis(200)).await;
    assert_eq!(attack(&app, "nobody").await.code(), Code::Unauthenticated, "the block ended");
}

async fn register(app: &TestApp, name: &str, ip: &str) -> Result<(), tonic::Status> {
    let mut auth = app.auth.clone();
    auth.register(pb::RegisterRequest {
        username: name.into(),
        email: format!("{name}@example.com"),
        password: PASSWORD.into(),
        first_name: "Test".into(),
        last_name: "User".into(),
        client: Some(ctx(ip, "")),
    })
    .await
    .map(|_| ())
}

async fn registrations_are_limited_per_ip(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.limits.register_per_ip = RateLimit::new(3, Duration::from_secs(3600), Duration::ZERO);
    })
    .await
    else {
        return;
    };
    for i in 0..3 {
        register(&app, &format!("jan{i}"), ATTACKER_IP).await.expect("within the limit");
    }
    let limited = register(&app, "jan3", ATTACKER_IP).await.unwrap_err();
    let wait = retry_after(&limited, "RATE_LIMITED");
    assert!(wait > Duration::from_secs(3500) && wait <= Duration::from_secs(3600), "{wait:?}");
    register(&app, "jan3", OWNER_IP).await.expect("another address registers");
    // Invalid requests are refused as such and not counted.
    let mut auth = app.auth.clone();
    let bad = auth
        .register(pb::RegisterRequest {
            username: "x".into(),
            client: Some(ctx(OWNER_IP, "")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

async fn reset_and_verification_mails_are_limited_per_account_and_ip(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.limits.forgot_password_per_account = RateLimit::new(2, Duration::from_secs(3600), Duration::ZERO);
        s.limits.forgot_password_per_ip = RateLimit::new(3, Duration::from_secs(3600), Duration::ZERO);
        s.limits.resend_verification_per_account =
            RateLimit::new(2, Duration::from_secs(3600), Duration::ZERO);
    })
    .await
    else {
        return;
    };
    let mut passwords = pb::password_service_client::PasswordServiceClient::new(app.channel());
    let forgot = |identifier: &str, ip: &str| pb::ForgotPasswordRequest {
        identifier: identifier.into(),
        client: Some(ctx(ip, "")),
    };
    // Per account (as typed, case-folded), whether or not it exists: the same answers.
    for who in ["kai@example.com", "KAI@example.com"] {
        passwords.forgot_password(forgot(who, "192.0.2.1")).await.expect("within the limit");
    }
    let limited = passwords.forgot_password(forgot("kai@example.com", "192.0.2.2")).await.unwrap_err();
    retry_after(&limited, "RATE_LIMITED");
    // Per address: a third identifier from one address is fine, a fourth request is not.
    passwords.forgot_password(forgot("lea@example.com", "192.0.2.1")).await.expect("third from this address");
    let limited = passwords.forgot_password(forgot("mia@example.com", "192.0.2.1")).await.unwrap_err();
    retry_after(&limited, "RATE_LIMITED");

    let mut auth = app.auth.clone();
    let resend =
        |email: &str| pb::ResendVerificationRequest { email: email.into(), client: Some(ctx(OWNER_IP, "")) };
    auth.resend_verification(resend("nia@example.com")).await.expect("first");
    auth.resend_verification(resend("Nia@Example.com")).await.expect("second");
    let limited = auth.resend_verification(resend("nia@example.com")).await.unwrap_err();
    retry_after(&limited, "RATE_LIMITED");
}

/// Two server processes sharing PostgreSQL and Redis enforce one limit between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_sharing_redis_enforce_one_limit() {
    let Some((mut settings, data)) = test_settings(Backend::Postgres).await else { return };
    settings.limits.register_per_ip = RateLimit::new(4, Duration::from_secs(3600), Duration::ZERO);
    settings.login.client_throttle = RateLimit::new(3, Duration::from_secs(60), Duration::from_secs(60));
    let data = Arc::new(data);
    let one = spawn_with_settings(settings.clone(), data.clone()).await;
    let two = spawn_with_settings(settings, data).await;

    let mut allowed = 0;
    for i in 0..8 {
        let app = if i % 2 == 0 { &one } else { &two };
        if register(app, &format!("pair{i}"), ATTACKER_IP).await.is_ok() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 4, "one limit across both servers");

    for i in 0..3 {
        let app = if i % 2 == 0 { &one } else { &two };
        assert_eq!(attack(app, "pair0").await.code(), Code::Unauthenticated);
    }
    retry_after(&attack(&two, "pair0").await, "TOO_MANY_ATTEMPTS");
    retry_after(&attack(&one, "pair0").await, "TOO_MANY_ATTEMPTS");
}

/// Redis going away: lockout stays authoritative (it is in the database), limits fall
/// back to each process, and Redis losing every key never unlocks an account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_lockouts_and_falls_back_for_limits() {
    let Some((mut settings, data)) = test_settings(Backend::Postgres).await else { return };
    let redis_url = settings.redis_url.clone().unwrap();
    let proxy = support::TcpProxy::start(&support::redis_host_port(&redis_url)).await;
    settings.redis_url = Some(format!("redis://{}", proxy.addr()));
    settings.login.account_lockout = lockout(3, 60_000);
    settings.limits.register_per_ip = RateLimit::new(2, Duration::from_secs(3600), Duration::ZERO);
    let prefix = settings.redis.key_prefix.clone();
    let app = spawn_with_settings(settings, Arc::new(data)).await;
    app.register("olga").await;
    app.register("petra").await;
    for _ in 0..3 {
        attack(&app, "olga").await;
    }
    retry_after(&attack(&app, "olga").await, "TOO_MANY_ATTEMPTS");

    // Every key of this deployment gone (what FLUSHALL does to it): still locked.
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
    }
    let status = login_as(&app, "olga", PASSWORD, ctx(OWNER_IP, "owner")).await.unwrap_err();
    retry_after(&status, "TOO_MANY_ATTEMPTS");

    // Redis unreachable: the lock holds, the count of another account still moves, and
    // the registration limit is enforced by this process alone.
    proxy.cut();
    let status = login_as(&app, "olga", PASSWORD, ctx(OWNER_IP, "owner")).await.unwrap_err();
    retry_after(&status, "TOO_MANY_ATTEMPTS");
    for _ in 0..3 {
        assert_eq!(attack(&app, "petra").await.code(), Code::Unauthenticated);
    }
    retry_after(&attack(&app, "petra").await, "TOO_MANY_ATTEMPTS");
    register(&app, "quinn1", "192.0.2.9").await.expect("fallback limiter: first");
    register(&app, "quinn2", "192.0.2.9").await.expect("fallback limiter: second");
    retry_after(&register(&app, "quinn3", "192.0.2.9").await.unwrap_err(), "RATE_LIMITED");
    proxy.restore();
}

async fn a_stolen_access_token_is_not_a_password_oracle(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| s.login.account_lockout = lockout(3, 60_000)).await else {
        return;
    };
    let (access, _, _) = app.user_session("rosa").await;
    let mut passwords = pb::password_service_client::PasswordServiceClient::new(app.channel());
    let change = |current: &str| {
        crate::harness::bearer(
            pb::ChangePasswordRequest {
                current_password: current.into(),
                new_password: "another fine passphrase".into(),
                client: None,
            },
            &access,
        )
    };
    for _ in 0..3 {
        let status = passwords.change_password(change("guess guess guess")).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    // The account's budget is spent: no more guesses, not even the right one.
    let status = passwords.change_password(change(PASSWORD)).await.unwrap_err();
    retry_after(&status, "TOO_MANY_ATTEMPTS");
}

async fn one_ipv6_network_is_one_address(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.login.ip_block = RateLimit::new(3, Duration::from_secs(60), Duration::from_secs(60));
    })
    .await
    else {
        return;
    };
    // Rotating addresses within one /64 (what one client holds) is one address.
    for i in 1..=3 {
        let ip = format!("2001:db8:aa:bb::{i:x}");
        let status =
            login_as(&app, &format!("acct-{i}"), "wrong", ctx(&ip, &format!("fp{i}"))).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let blocked = login_as(&app, "acct-9", "wrong", ctx("2001:db8:aa:bb:ffff::9", "fp9")).await.unwrap_err();
    retry_after(&blocked, "TOO_MANY_ATTEMPTS");
    let elsewhere = login_as(&app, "acct-9", "wrong", ctx("2001:db8:aa:cc::1", "fp9")).await.unwrap_err();
    assert_eq!(elsewhere.code(), Code::Unauthenticated, "another /64 is another client");
}
