use std::time::Duration;

use portcullis::api::pb::{self, TokenInvalidReason};
use tonic::Code;

use crate::{
    harness::{Backend, bearer, error_reason, eventually, reason, spawn_app, violated_fields},
    on_both_backends,
};

on_both_backends!(
    logout_revokes_at_once,
    list_sessions_marks_current_and_tracks_activity,
    revoke_session_is_scoped_to_its_owner,
    revoke_other_and_all_sessions,
    user_calls_need_a_valid_bearer,
);

async fn logout_revokes_at_once(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (access, refresh, _) = app.user_session("nina").await;
    assert!(app.validate(&access).await.valid);
    app.logout(&access).await.expect("logout");
    let v = app.validate(&access).await;
    assert!(!v.valid);
    assert_eq!(reason(&v), TokenInvalidReason::SessionRevoked);
    assert_eq!(app.refresh(&refresh).await.unwrap_err().code(), Code::Unauthenticated);
    let again = app.logout(&access).await.unwrap_err();
    assert_eq!(again.code(), Code::Unauthenticated);
    assert_eq!(error_reason(&again), "SESSION_REVOKED");
}

async fn list_sessions_marks_current_and_tracks_activity(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (first, _, s1) = app.user_session("omar").await;
    let s1 = s1.session.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = app.login("omar").await;
    let s2 = second.session.clone().unwrap();
    let second_access = second.tokens.unwrap().access_token;

    let listed = app.list_sessions(&second_access).await.expect("list");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].id, s2.id, "most recently active first");
    let current: Vec<_> = listed.iter().filter(|s| s.current).map(|s| s.id.clone()).collect();
    assert_eq!(current, std::slice::from_ref(&s2.id));
    assert!(listed.iter().all(|s| s.device_type == "desktop" && s.ip_address == "203.0.113.7"));
    let before = listed[1].last_active_at.unwrap();
    let before = time::OffsetDateTime::from_unix_timestamp_nanos(
        before.seconds as i128 * 1_000_000_000 + before.nanos as i128,
    )
    .unwrap();

    // Validating the first session's token is activity: it reaches the database through
    // the write-behind (flushed every 100 ms in tests), not one write per call.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(app.validate(&first).await.valid);
    let store = app.store().await;
    let s1_id = s1.id.parse().unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            store.find_session(s1_id).await.unwrap().unwrap().last_active_at > before
        })
        .await,
        "last active reached the database"
    );
    // Listing with the first session's token makes it the current, most recent one.
    let listed = app.list_sessions(&first).await.expect("list");
    assert_eq!(listed[0].id, s1.id);
    assert!(listed[0].current && !listed[1].current);
}

async fn revoke_session_is_scoped_to_its_owner(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (alice, _, _) = app.user_session("paula").await;
    let (mallory, _, mallory_session) = app.user_session("quinn").await;
    let victim = mallory_session.session.unwrap().id;
    let mut client = app.sessions.clone();

    let foreign = client
        .revoke_session(bearer(pb::RevokeSessionRequest { session_id: victim.clone() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound, "another user's session is not found");
    assert!(app.validate(&mallory).await.valid, "and stays alive");

    let unknown = client
        .revoke_session(bearer(
            pb::RevokeSessionRequest { session_id: uuid::Uuid::new_v4().to_string() },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let malformed = client
        .revoke_session(bearer(pb::RevokeSessionRequest { session_id: "x".into() }, &alice))
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&malformed), ["session_id"]);

    let other = app.login("paula").await;
    let other_id = other.session.unwrap().id;
    client
        .revoke_session(bearer(pb::RevokeSessionRequest { session_id: other_id }, &alice))
        .await
        .expect("own");
    let v = app.validate(&other.tokens.unwrap().access_token).await;
    assert_eq!(reason(&v), TokenInvalidReason::SessionRevoked);
    assert!(app.validate(&alice).await.valid);
}

async fn revoke_other_and_all_sessions(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (main, _, _) = app.user_session("rita").await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(app.login("rita").await.tokens.unwrap().access_token);
    }
    let (bystander, _, _) = app.user_session("sam").await;
    let mut client = app.sessions.clone();

    let n = client
        .revoke_other_sessions(bearer(pb::RevokeOtherSessionsRequest {}, &main))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.revoked_count, 3);
    for token in &others {
        assert_eq!(reason(&app.validate(token).await), TokenInvalidReason::SessionRevoked);
    }
    assert!(app.validate(&main).await.valid, "the current session stays");
    assert_eq!(app.list_sessions(&main).await.unwrap().len(), 1);

    let fresh = app.login("rita").await.tokens.unwrap().access_token;
    let n = client
        .revoke_all_sessions(bearer(pb::RevokeAllSessionsRequest {}, &main))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.revoked_count, 2);
    assert_eq!(reason(&app.validate(&main).await), TokenInvalidReason::SessionRevoked);
    assert_eq!(reason(&app.validate(&fresh).await), TokenInvalidReason::SessionRevoked);
    assert!(app.validate(&bystander).await.valid, "other users are untouched");
}

async fn user_calls_need_a_valid_bearer(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let mut client = app.sessions.clone();
    let none = client.list_sessions(pb::ListSessionsRequest {}).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    assert_eq!(error_reason(&none), "MISSING_TOKEN");
    let garbage = client.list_sessions(bearer(pb::ListSessionsRequest {}, "garbage")).await.unwrap_err();
    assert_eq!(garbage.code(), Code::Unauthenticated);
    assert_eq!(error_reason(&garbage), "TOKEN_MALFORMED");
    let mut auth = app.auth.clone();
    assert_eq!(auth.logout(pb::LogoutRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
}
