//! Health, graceful shutdown, restarts and key rotation.

use std::time::Duration;

use portcullis::{
    api::pb::TokenInvalidReason,
    token::{SigningAlgorithm, keys::generate_key_file},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    harness::{Backend, PASSWORD, reason, spawn_app, spawn_app_with, spawn_with_settings},
    on_both_backends,
};

on_both_backends!(
    health_reports_every_service,
    restart_keeps_keys_pepper_and_revocations,
    rotated_keys_keep_old_tokens_valid
);

async fn health_reports_every_service(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let mut health = HealthClient::new(app.channel());
    for service in [
        "",
        "portcullis.v1.AuthService",
        "portcullis.v1.SessionService",
        "envoy.service.auth.v3.Authorization",
    ] {
        let status =
            health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "nope.Service".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_not_serving_and_drains_in_flight_calls() {
    // bcrypt cost 13 makes a login take long enough to be in flight when shutdown starts.
    let Some(mut app) = spawn_app_with(Backend::Embedded, |s| {
        s.password.bcrypt_cost = 13;
        s.password.hashing_concurrency = Some(1);
    })
    .await
    else {
        return;
    };
    let mut health = HealthClient::new(app.channel());
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, ServingStatus::Serving as i32);

    let in_flight = {
        let mut client = app.auth.clone();
        tokio::spawn(async move {
            client
                .login(portcullis::api::pb::LoginRequest {
                    identifier: "nobody".into(),
                    password: PASSWORD.into(),
                    client: None,
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let server = app.take_server();
    app.trigger_shutdown();

    let status =
        tokio::time::timeout(Duration::from_secs(5), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(status.status, ServingStatus::NotServing as i32, "NOT_SERVING as soon as shutdown starts");
    let answer = in_flight.await.unwrap();
    assert_eq!(
        answer.unwrap_err().code(),
        tonic::Code::Unauthenticated,
        "the in-flight call got its real answer"
    );
    // Drained, not timed out: the grace is 5 s, the server stops as soon as the call is done
    // (an open Health/Watch stream must not hold it).
    let drained = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("stops within the grace")
        .unwrap()
        .unwrap();
    assert!(drained.elapsed() < Duration::from_secs(2), "waited {:?} after the last call", drained.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_waiting_after_the_grace_period() {
    let Some(mut app) = spawn_app_with(Backend::Embedded, |s| {
        s.password.bcrypt_cost = 16;
        s.password.hashing_concurrency = Some(1);
        s.server.shutdown_grace = Duration::from_millis(200);
    })
    .await
    else {
        return;
    };
    let mut client = app.auth.clone();
    let _in_flight = tokio::spawn(async move {
        client
            .login(portcullis::api::pb::LoginRequest {
                identifier: "x".into(),
                password: "y".into(),
                client: None,
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let server = app.take_server();
    let started = std::time::Instant::now();
    app.trigger_shutdown();
    tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .expect("bounded by the grace")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
}

async fn restart_keeps_keys_pepper_and_revocations(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (kept, _, _) = app.user_session("xena").await;
    let (revoked, _, _) = app.user_session("yuri").await;
    app.logout(&revoked).await.unwrap();
    let (settings, data) = (app.settings.clone(), app.data_handle());
    app.shutdown().await.unwrap();

    // A fresh process: new in-memory state (or a Redis that lost its data).
    let mut settings = settings;
    if backend == Backend::Postgres {
        settings.redis.key_prefix = format!("test:{}:", uuid::Uuid::new_v4().simple());
    }
    let app = spawn_with_settings(settings, data).await;
    app.try_login("xena", PASSWORD).await.expect("same pepper: passwords still verify");
    assert!(app.validate(&kept).await.valid, "same key: tokens still verify");
    assert_eq!(
        reason(&app.validate(&revoked).await),
        TokenInvalidReason::SessionRevoked,
        "revocations republished"
    );
}

async fn rotated_keys_keep_old_tokens_valid(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (old, _, _) = app.user_session("zoe").await;
    let (settings, data) = (app.settings.clone(), app.data_handle());
    app.shutdown().await.unwrap();
    // A newer file name: it becomes the signer.
    std::thread::sleep(Duration::from_millis(1100));
    generate_key_file(&settings.keys_dir(), SigningAlgorithm::ES256).unwrap();

    let app = spawn_with_settings(settings, data).await;
    assert!(app.validate(&old).await.valid, "signed by the previous key, still verifies");
    let new = app.login("zoe").await.tokens.unwrap().access_token;
    let header: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            new.split('.').next().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "ES256", "the new key signs");
    assert!(app.validate(&new).await.valid);
}
