use std::time::Duration;

use portcullis::api::pb::TokenInvalidReason;
use tonic::Code;

use crate::{
    harness::{Backend, error_reason, reason, spawn_app, spawn_app_with},
    on_both_backends,
};

on_both_backends!(
    refresh_rotates_the_refresh_token,
    a_replayed_refresh_token_revokes_the_session,
    a_concurrent_duplicate_within_grace_keeps_the_session,
    idle_sessions_expire,
    sessions_end_at_their_absolute_lifetime,
    garbage_refresh_tokens_are_refused,
);

async fn refresh_rotates_the_refresh_token(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (access, refresh, session) = app.user_session("ivan").await;
    let next = app.refresh(&refresh).await.expect("refresh");
    assert_ne!(next.refresh_token, refresh, "rotated");
    assert_ne!(next.access_token, access);
    let v = app.validate(&next.access_token).await;
    assert!(v.valid);
    assert_eq!(v.session_id, session.session.unwrap().id, "same session");
    let after = app.refresh(&next.refresh_token).await.expect("the successor works");
    assert!(app.validate(&after.access_token).await.valid);
}

async fn a_replayed_refresh_token_revokes_the_session(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| s.sessions.refresh_reuse_grace = Duration::ZERO).await else {
        return;
    };
    let (_, stolen, _) = app.user_session("judy").await;
    let legit = app.refresh(&stolen).await.expect("first use");
    tokio::time::sleep(Duration::from_millis(20)).await;

    let replay = app.refresh(&stolen).await.unwrap_err();
    assert_eq!(replay.code(), Code::Unauthenticated);
    assert_eq!(error_reason(&replay), "INVALID_REFRESH_TOKEN");
    // The whole session is over: its newest tokens too.
    assert_eq!(app.refresh(&legit.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    let v = app.validate(&legit.access_token).await;
    assert!(!v.valid);
    assert_eq!(reason(&v), TokenInvalidReason::SessionRevoked);
}

async fn a_concurrent_duplicate_within_grace_keeps_the_session(backend: Backend) {
    let Some(app) =
        spawn_app_with(backend, |s| s.sessions.refresh_reuse_grace = Duration::from_secs(30)).await
    else {
        return;
    };
    let (_, refresh, _) = app.user_session("kate").await;
    let winner = app.refresh(&refresh).await.expect("first");
    let loser = app.refresh(&refresh).await.unwrap_err();
    assert_eq!(loser.code(), Code::Unauthenticated, "a spent token never yields a second successor");
    assert!(app.validate(&winner.access_token).await.valid, "the session survives");
    app.refresh(&winner.refresh_token).await.expect("the winner's token still works");
}

async fn idle_sessions_expire(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| s.sessions.idle_timeout = Duration::from_millis(1500)).await
    else {
        return;
    };
    let (access, refresh, _) = app.user_session("leo").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let next = app.refresh(&refresh).await.expect("refreshed within the idle timeout");
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(app.refresh(&next.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    let sessions_seen_by = access; // still a valid JWT until it expires: the session list is empty
    assert!(
        app.list_sessions(&sessions_seen_by).await.expect("list").is_empty(),
        "idle sessions are not listed"
    );
}

async fn sessions_end_at_their_absolute_lifetime(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.tokens.access_ttl = Duration::from_secs(1);
        s.sessions.absolute_lifetime = Duration::from_secs(2);
    })
    .await
    else {
        return;
    };
    let (_, refresh, session) = app.user_session("mia").await;
    let expires_at = session.tokens.unwrap().refresh_token_expires_at.unwrap().seconds;
    let created = session.session.unwrap().created_at.unwrap().seconds;
    assert!(expires_at - created <= 2);
    let mut token = refresh;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token = app.refresh(&token).await.expect("refresh while the session lives").refresh_token;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        app.refresh(&token).await.unwrap_err().code(),
        Code::Unauthenticated,
        "past the absolute lifetime"
    );
}

async fn garbage_refresh_tokens_are_refused(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let empty = app.refresh("").await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    for garbage in
        ["nope", "pcrt_", &"pcrt_".repeat(1000), "pcrt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]
    {
        let status = app.refresh(garbage).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{garbage}");
    }
}
