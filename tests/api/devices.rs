//! New-device alerts, "this wasn't me", and the refresh-reuse notice, over real SMTP.

use std::time::Duration;

use portcullis::api::pb::{self, TokenInvalidReason};
use tonic::Code;

use crate::{
    email::{link_token, mails_to, no_more_mail, reset, verified_user},
    harness::{Backend, PASSWORD, TestApp, error_reason, reason, spawn_app_with_mail},
    on_both_backends,
};

on_both_backends!(
    a_new_device_is_announced_and_known_ones_are_not,
    this_wasnt_me_ends_every_session_and_starts_a_reset,
    a_replayed_refresh_token_is_reported_to_the_owner,
    a_flood_of_new_devices_does_not_flood_the_mailbox,
    a_lockout_is_announced_to_the_owner_once,
);

async fn login_from(app: &TestApp, who: &str, fingerprint: &str) -> pb::AuthenticatedSession {
    let mut client = app.auth.clone();
    let response = client
        .login(pb::LoginRequest {
            identifier: who.into(),
            password: PASSWORD.into(),
            client: Some(pb::ClientContext {
                ip_address: "203.0.113.50".into(),
                user_agent: "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1".into(),
                device_fingerprint: fingerprint.into(),
            }),
        })
        .await
        .expect("login")
        .into_inner();
    match response.outcome {
        Some(pb::login_response::Outcome::Authenticated(session)) => session,
        _ => panic!("no session"),
    }
}

async fn a_new_device_is_announced_and_known_ones_are_not(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let email = verified_user(&app, &sink, "olaf").await; // verification + welcome
    app.login("olaf").await; // the first device ever: no alert
    app.login("olaf").await; // known
    no_more_mail(&sink, &email, 2).await;

    login_from(&app, "olaf", "fp-phone").await;
    let alert = mails_to(&sink, &email, 3).await.remove(2);
    assert!(alert.subject.contains("New sign-in"), "{}", alert.subject);
    for shown in ["203.0.113.50", "Safari", "iPhone", "UTC"] {
        assert!(alert.text.contains(shown), "{shown} in:\n{}", alert.text);
    }
    link_token(&alert, "/unrecognized-login");

    login_from(&app, "olaf", "fp-phone").await;
    no_more_mail(&sink, &email, 3).await;
}

async fn this_wasnt_me_ends_every_session_and_starts_a_reset(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let email = verified_user(&app, &sink, "pia").await;
    let own = app.login("pia").await.tokens.unwrap();
    let thief = login_from(&app, "pia", "fp-thief").await.tokens.unwrap();
    let token = link_token(&mails_to(&sink, &email, 3).await[2], "/unrecognized-login");
    // The thief keeps logging in from new devices: every alert's link stays good.
    login_from(&app, "pia", "fp-thief-2").await;
    mails_to(&sink, &email, 4).await;
    // A reset link that was pending dies with the report.
    crate::email::forgot(&app, "pia").await;
    let pending_reset = link_token(&mails_to(&sink, &email, 5).await[4], "/reset-password");

    let mut client = app.auth.clone();
    let report = |token: String| pb::ReportUnrecognizedLoginRequest { token, client: None };
    client.report_unrecognized_login(report(token.clone())).await.expect("report");
    for access in [&own.access_token, &thief.access_token] {
        assert_eq!(reason(&app.validate(access).await), TokenInvalidReason::SessionRevoked);
    }
    assert_eq!(app.refresh(&thief.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    let again = client.report_unrecognized_login(report(token)).await.unwrap_err();
    assert_eq!(error_reason(&again), "INVALID_TOKEN");

    assert_eq!(
        error_reason(&reset(&app, &pending_reset, "any new passphrase").await.unwrap_err()),
        "INVALID_TOKEN"
    );
    let reset_mail = mails_to(&sink, &email, 6).await.remove(5);
    let reset_token = link_token(&reset_mail, "/reset-password");
    reset(&app, &reset_token, "a fresh start passphrase").await.expect("the reset link works");
    app.try_login("pia", "a fresh start passphrase").await.expect("new password");
}

async fn a_replayed_refresh_token_is_reported_to_the_owner(backend: Backend) {
    let Some((app, sink)) =
        spawn_app_with_mail(backend, |s| s.sessions.refresh_reuse_grace = Duration::ZERO).await
    else {
        return;
    };
    let email = verified_user(&app, &sink, "quentin").await;
    app.login("quentin").await; // the first device: no alert
    let stolen = login_from(&app, "quentin", "fp-phone").await.tokens.unwrap().refresh_token;
    mails_to(&sink, &email, 3).await; // the new-device alert
    app.refresh(&stolen).await.expect("first use");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(app.refresh(&stolen).await.unwrap_err().code(), Code::Unauthenticated);
    let notice = mails_to(&sink, &email, 4).await.remove(3);
    assert!(notice.subject.contains("signed out"), "{}", notice.subject);
    assert!(
        notice.text.contains("Safari") && notice.text.contains("on iPhone"),
        "names the session's device: {}",
        notice.text
    );
}

async fn a_flood_of_new_devices_does_not_flood_the_mailbox(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |s| {
        s.limits.new_device_alerts_per_account =
            portcullis::config::RateLimit::new(2, Duration::from_secs(3600), Duration::ZERO);
    })
    .await
    else {
        return;
    };
    let email = verified_user(&app, &sink, "quin").await; // verification + welcome
    app.login("quin").await; // the first device: no alert
    for i in 0..5 {
        login_from(&app, "quin", &format!("fp-new-{i}")).await;
    }
    // Two alerts, then silence: the devices are still remembered, only not announced.
    let mails = mails_to(&sink, &email, 4).await;
    assert!(mails[2..].iter().all(|m| m.subject.contains("New sign-in")));
    no_more_mail(&sink, &email, 4).await;
}

async fn a_lockout_is_announced_to_the_owner_once(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |s| {
        s.login.account_lockout = portcullis::config::Lockout {
            max_failures: 3,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(600),
            max_lockout: Duration::from_secs(600),
        };
    })
    .await
    else {
        return;
    };
    let email = verified_user(&app, &sink, "rhea").await; // verification + welcome
    for _ in 0..6 {
        app.try_login("rhea", "not my password at all").await.unwrap_err();
    }
    let alert = mails_to(&sink, &email, 3).await.remove(2);
    assert!(alert.subject.contains("paused"), "{}", alert.subject);
    for shown in ["203.0.113.7", "Firefox", "10 minutes"] {
        assert!(alert.text.contains(shown), "{shown} in:\n{}", alert.text);
    }
    assert!(!alert.text.contains("not my password"), "the tried password is never mailed");
    // Tries while locked send nothing more.
    no_more_mail(&sink, &email, 3).await;
}
