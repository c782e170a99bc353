//! Login history: every attempt recorded with its outcome, device and address; paged;
//! purged after the retention period.

use std::{collections::HashSet, time::Duration};

use portcullis::api::pb;
use tonic::Code;

use crate::{
    harness::{Backend, FIREFOX, PASSWORD, TestApp, bearer, spawn_app, spawn_app_with, violated_fields},
    on_both_backends,
};

on_both_backends!(
    every_attempt_is_recorded_with_its_device_and_outcome,
    history_pages_newest_first_without_gaps,
    old_attempts_are_purged,
    unverified_logins_are_recorded_as_such,
);

async fn history(
    app: &TestApp,
    access: &str,
    page_size: u32,
    page_token: &str,
) -> Result<pb::ListLoginHistoryResponse, tonic::Status> {
    let mut client = app.sessions.clone();
    let request = pb::ListLoginHistoryRequest { page_size, page_token: page_token.into() };
    Ok(client.list_login_history(bearer(request, access)).await?.into_inner())
}

async fn every_attempt_is_recorded_with_its_device_and_outcome(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    app.register("hugo").await;
    app.register("other").await;
    app.try_login("Hugo", "wrong password here").await.unwrap_err();
    app.try_login("nobody", "wrong password here").await.unwrap_err();
    app.try_login("other", "wrong password here").await.unwrap_err();
    let access = app.login("hugo@example.com").await.tokens.unwrap().access_token;

    let page = history(&app, &access, 0, "").await.expect("history");
    assert_eq!(page.attempts.len(), 2, "only this user's attempts: {:?}", page.attempts);
    assert!(page.next_page_token.is_empty());
    let (latest, earlier) = (&page.attempts[0], &page.attempts[1]);
    assert!(latest.success);
    assert_eq!(latest.reason, "ok");
    assert_eq!(latest.identifier, "hugo@example.com");
    assert!(!earlier.success);
    assert_eq!(earlier.reason, "invalid_credentials");
    assert_eq!(earlier.identifier, "Hugo", "as typed");
    for attempt in &page.attempts {
        assert_eq!(attempt.ip_address, "203.0.113.7");
        assert_eq!(attempt.user_agent, FIREFOX);
        assert_eq!(attempt.device_type, "desktop");
        assert!(attempt.browser.starts_with("Firefox"));
        assert_eq!(attempt.os, "Linux");
        assert!(attempt.location.is_none(), "no GeoIP database configured");
    }
    assert!(latest.at.unwrap().seconds >= earlier.at.unwrap().seconds);

    let mut client = app.sessions.clone();
    let anonymous = client.list_login_history(pb::ListLoginHistoryRequest::default()).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
}

async fn history_pages_newest_first_without_gaps(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    app.register("ivy").await;
    for _ in 0..24 {
        app.try_login("ivy", "not the right one").await.unwrap_err();
    }
    let access = app.login("ivy").await.tokens.unwrap().access_token;

    let mut seen = HashSet::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    let mut last_at = i64::MAX;
    loop {
        let page = history(&app, &access, 10, &token).await.expect("page");
        sizes.push(page.attempts.len());
        for attempt in &page.attempts {
            assert!(seen.insert(attempt.id.clone()), "no attempt twice");
            let at = attempt.at.unwrap();
            let micros = at.seconds * 1_000_000 + i64::from(at.nanos) / 1_000;
            assert!(micros <= last_at, "newest first");
            last_at = micros;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(seen.len(), 25);

    let too_big = history(&app, &access, 101, "").await.unwrap_err();
    assert_eq!(violated_fields(&too_big), ["page_size"]);
    let forged = history(&app, &access, 10, "not-a-token").await.unwrap_err();
    assert_eq!(violated_fields(&forged), ["page_token"]);
}

async fn old_attempts_are_purged(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.tracking.attempts_retention = Duration::from_millis(1500);
        s.tracking.purge_interval = Duration::from_millis(200);
    })
    .await
    else {
        return;
    };
    app.register("jay").await;
    app.try_login("jay", "wrong password here").await.unwrap_err();
    let access = app.login("jay").await.tokens.unwrap().access_token;
    assert_eq!(history(&app, &access, 0, "").await.unwrap().attempts.len(), 2);
    let purged = crate::harness::eventually(Duration::from_secs(6), || async {
        history(&app, &access, 0, "").await.unwrap().attempts.is_empty()
    })
    .await;
    assert!(purged, "attempts past the retention period are deleted");
}

async fn unverified_logins_are_recorded_as_such(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| s.login.require_verified_email = true).await else { return };
    app.register("kai").await;
    let refused = app.try_login("kai", PASSWORD).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let store = app.store().await;
    let user = store.find_user_by_login("kai").await.unwrap().unwrap();
    let attempts = store.list_login_attempts(user.id, None, 10).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].reason, "email_not_verified");
    assert_eq!(attempts[0].outcome, portcullis::store::AttemptOutcome::Failure);
}
