//! Verification, password reset, password change, profile and deletion, with mail
//! delivered over SMTP to a real SMTP server (aiosmtpd) and its links followed over gRPC.

use std::time::Duration;

use futures_util::future::join_all;
use portcullis::api::pb::{self, TokenInvalidReason};
use tonic::Code;

use crate::{
    harness::{
        Backend, PASSWORD, TestApp, bearer, error_reason, reason, spawn_app, spawn_app_with_mail,
        violated_fields,
    },
    on_both_backends,
    support::{ReceivedMail, SmtpSink},
};

on_both_backends!(
    registration_mails_a_link_that_verifies_once,
    resend_verification_answers_the_same_and_replaces_the_link,
    verification_links_expire,
    forgot_password_mails_a_link_that_resets_once_and_ends_sessions,
    reset_tokens_work_for_one_purpose_and_one_user,
    reset_links_expire_and_newer_ones_replace_older,
    concurrent_resets_with_one_token_have_one_winner,
    change_password_needs_the_current_one_and_ends_other_sessions,
    profile_updates_only_the_masked_fields_and_email_switches_after_confirmation,
    delete_account_needs_the_password_and_removes_the_account,
    a_password_reset_kills_a_pending_email_change,
    mail_queued_while_smtp_is_down_arrives_when_it_is_back,
    mail_queued_before_a_restart_is_sent_after_it,
);

const BASE: &str = "https://app.example.test";
const NEW_PASSWORD: &str = "a brand new passphrase";

/// The token of the `{BASE}{path}?token=` link, checked to be in both parts.
pub(crate) fn link_token(mail: &ReceivedMail, path: &str) -> String {
    let prefix = format!("{BASE}{path}?token=");
    let start = mail.text.find(&prefix).unwrap_or_else(|| panic!("no {prefix} link in:\n{}", mail.text))
        + prefix.len();
    let token: String = mail.text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    assert!(
        mail.html.contains(&format!("{prefix}{token}")),
        "the HTML part has the same link:\n{}",
        mail.html
    );
    token
}

pub(crate) async fn mails_to(sink: &SmtpSink, to: &str, count: usize) -> Vec<ReceivedMail> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mails: Vec<ReceivedMail> =
            sink.messages().into_iter().filter(|m| m.to.iter().any(|t| t == to)).collect();
        if mails.len() >= count || tokio::time::Instant::now() > deadline {
            assert_eq!(
                mails.len(),
                count,
                "mails to {to}: {:?}",
                mails.iter().map(|m| &m.subject).collect::<Vec<_>>()
            );
            return mails;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// No further mail to `to` arrives within a while.
pub(crate) async fn no_more_mail(sink: &SmtpSink, to: &str, expected: usize) {
    tokio::time::sleep(Duration::from_millis(700)).await;
    let count = sink.messages().iter().filter(|m| m.to.iter().any(|t| t == to)).count();
    assert_eq!(count, expected, "unexpected mail to {to}");
}

async fn verify(app: &TestApp, token: &str) -> Result<(), tonic::Status> {
    let mut client = app.auth.clone();
    client.verify_email(pb::VerifyEmailRequest { token: token.into() }).await.map(|_| ())
}

/// Registers `name` and follows the verification link.
pub(crate) async fn verified_user(app: &TestApp, sink: &SmtpSink, name: &str) -> String {
    app.register(name).await;
    let email = format!("{name}@example.com");
    let mail = mails_to(sink, &email, 1).await.remove(0);
    verify(app, &link_token(&mail, "/verify-email")).await.expect("verify");
    email
}

pub(crate) async fn forgot(app: &TestApp, identifier: &str) {
    let mut client = portcullis::api::pb::password_service_client::PasswordServiceClient::new(app.channel());
    client
        .forgot_password(pb::ForgotPasswordRequest { identifier: identifier.into(), client: None })
        .await
        .expect("ForgotPassword always answers OK");
}

pub(crate) async fn reset(app: &TestApp, token: &str, password: &str) -> Result<(), tonic::Status> {
    let mut client = portcullis::api::pb::password_service_client::PasswordServiceClient::new(app.channel());
    client
        .reset_password(pb::ResetPasswordRequest {
            token: token.into(),
            new_password: password.into(),
            client: None,
        })
        .await
        .map(|_| ())
}

async fn check_reset(app: &TestApp, token: &str) -> bool {
    let mut client = portcullis::api::pb::password_service_client::PasswordServiceClient::new(app.channel());
    client
        .check_reset_token(pb::CheckResetTokenRequest { token: token.into() })
        .await
        .unwrap()
        .into_inner()
        .valid
}

async fn registration_mails_a_link_that_verifies_once(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    app.register("vera").await;
    let mail = mails_to(&sink, "vera@example.com", 1).await.remove(0);
    assert!(mail.subject.to_lowercase().contains("verify"), "{}", mail.subject);
    assert!(!mail.text.is_empty() && !mail.html.is_empty(), "text and HTML parts");
    let token = link_token(&mail, "/verify-email");

    let early = app.try_login("vera", PASSWORD).await.unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition);
    assert_eq!(error_reason(&early), "EMAIL_NOT_VERIFIED");
    let wrong = app.try_login("vera", "not the password at all").await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "the password is checked first");

    verify(&app, &token).await.expect("verify");
    let again = verify(&app, &token).await.unwrap_err();
    assert_eq!(again.code(), Code::InvalidArgument);
    assert_eq!(error_reason(&again), "INVALID_TOKEN");
    assert_eq!(violated_fields(&again), ["token"]);

    let session = app.login("vera").await;
    let claims = app.validate(&session.tokens.unwrap().access_token).await;
    assert!(claims.valid && claims.email_verified);
    let welcome = mails_to(&sink, "vera@example.com", 2).await;
    assert!(welcome[1].subject.to_lowercase().contains("welcome"), "{}", welcome[1].subject);

    for garbage in ["", "nope", "pcve_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"] {
        assert_eq!(error_reason(&verify(&app, garbage).await.unwrap_err()), "INVALID_TOKEN");
    }
}

async fn resend_verification_answers_the_same_and_replaces_the_link(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    app.register("rob").await;
    let first = link_token(&mails_to(&sink, "rob@example.com", 1).await[0], "/verify-email");
    let mut client = app.auth.clone();
    for email in ["rob@example.com", "ROB@Example.com", "nobody@example.com"] {
        client
            .resend_verification(pb::ResendVerificationRequest { email: email.into(), client: None })
            .await
            .expect("same answer for every address");
    }
    no_more_mail(&sink, "nobody@example.com", 0).await;
    let mails = mails_to(&sink, "rob@example.com", 3).await;
    let latest = link_token(&mails[2], "/verify-email");
    assert_eq!(error_reason(&verify(&app, &first).await.unwrap_err()), "INVALID_TOKEN", "older links die");
    verify(&app, &latest).await.expect("the newest link works");
    // Verified accounts get nothing more.
    client
        .resend_verification(pb::ResendVerificationRequest { email: "rob@example.com".into(), client: None })
        .await
        .unwrap();
    no_more_mail(&sink, "rob@example.com", 4).await; // 3 links + the welcome mail
    let bad =
        client.resend_verification(pb::ResendVerificationRequest { email: "x".into(), client: None }).await;
    assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);
}

async fn verification_links_expire(backend: Backend) {
    let Some((app, sink)) =
        spawn_app_with_mail(backend, |s| s.mail.verification_ttl = Duration::from_millis(800)).await
    else {
        return;
    };
    app.register("eve").await;
    let token = link_token(&mails_to(&sink, "eve@example.com", 1).await[0], "/verify-email");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(error_reason(&verify(&app, &token).await.unwrap_err()), "INVALID_TOKEN");
}

async fn forgot_password_mails_a_link_that_resets_once_and_ends_sessions(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let email = verified_user(&app, &sink, "frida").await;
    let session = app.login("frida").await.tokens.unwrap();
    let other = app.login("frida@example.com").await.tokens.unwrap();

    forgot(&app, "FRIDA").await;
    forgot(&app, "nobody-at-all").await;
    let mails = mails_to(&sink, &email, 3).await; // verification, welcome, reset
    let mail = &mails[2];
    assert!(mail.subject.to_lowercase().contains("reset"), "{}", mail.subject);
    let token = link_token(mail, "/reset-password");
    assert!(check_reset(&app, &token).await);

    let weak = reset(&app, &token, "short").await.unwrap_err();
    assert_eq!(violated_fields(&weak), ["new_password"]);
    assert!(check_reset(&app, &token).await, "a refused password does not spend the token");

    reset(&app, &token, NEW_PASSWORD).await.expect("reset");
    for access in [&session.access_token, &other.access_token] {
        assert_eq!(
            reason(&app.validate(access).await),
            TokenInvalidReason::SessionRevoked,
            "every session ended"
        );
    }
    assert_eq!(app.refresh(&session.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    assert!(!check_reset(&app, &token).await);
    assert_eq!(
        error_reason(&reset(&app, &token, "another new passphrase").await.unwrap_err()),
        "INVALID_TOKEN"
    );
    assert_eq!(app.try_login("frida", PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
    app.try_login("frida", NEW_PASSWORD).await.expect("the new password works");

    let notice = mails_to(&sink, &email, 4).await.remove(3);
    assert!(notice.subject.to_lowercase().contains("password"), "{}", notice.subject);
    assert!(notice.text.contains("changed"), "{}", notice.text);
}

async fn reset_tokens_work_for_one_purpose_and_one_user(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    app.register("gus").await;
    let verification = link_token(&mails_to(&sink, "gus@example.com", 1).await[0], "/verify-email");
    assert_eq!(error_reason(&reset(&app, &verification, NEW_PASSWORD).await.unwrap_err()), "INVALID_TOKEN");
    assert!(!check_reset(&app, &verification).await);
    verify(&app, &verification).await.expect("still good for its own purpose");

    let email = verified_user(&app, &sink, "hal").await;
    forgot(&app, &email).await;
    let token = link_token(&mails_to(&sink, &email, 3).await[2], "/reset-password");
    assert_eq!(
        error_reason(&verify(&app, &token).await.unwrap_err()),
        "INVALID_TOKEN",
        "not a verification token"
    );
    reset(&app, &token, NEW_PASSWORD).await.unwrap();
    app.try_login("gus", PASSWORD).await.expect("another user's password is untouched");
    app.try_login("hal", NEW_PASSWORD).await.expect("the token's own user was reset");
}

async fn reset_links_expire_and_newer_ones_replace_older(backend: Backend) {
    let Some((app, sink)) =
        spawn_app_with_mail(backend, |s| s.mail.reset_ttl = Duration::from_millis(800)).await
    else {
        return;
    };
    let email = verified_user(&app, &sink, "ida").await;
    forgot(&app, "ida").await;
    let first = link_token(&mails_to(&sink, &email, 3).await[2], "/reset-password");
    forgot(&app, "ida").await;
    let second = link_token(&mails_to(&sink, &email, 4).await[3], "/reset-password");
    assert!(!check_reset(&app, &first).await, "a newer link replaces the older");
    assert!(check_reset(&app, &second).await);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!check_reset(&app, &second).await);
    assert_eq!(error_reason(&reset(&app, &second, NEW_PASSWORD).await.unwrap_err()), "INVALID_TOKEN");
}

async fn concurrent_resets_with_one_token_have_one_winner(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let email = verified_user(&app, &sink, "jon").await;
    forgot(&app, "jon").await;
    let token = link_token(&mails_to(&sink, &email, 3).await[2], "/reset-password");
    let passwords: Vec<String> = (0..10).map(|i| format!("concurrent passphrase {i}")).collect();
    let results = join_all(passwords.iter().map(|p| reset(&app, &token, p))).await;
    let winners: Vec<&String> =
        passwords.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|(p, _)| p).collect();
    assert_eq!(winners.len(), 1, "exactly one reset");
    for loser in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(error_reason(loser), "INVALID_TOKEN", "{loser:?}");
    }
    app.try_login("jon", winners[0]).await.expect("the winner's password is the one set");
}

async fn change_password_needs_the_current_one_and_ends_other_sessions(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let email = verified_user(&app, &sink, "kim").await;
    let current = app.login("kim").await.tokens.unwrap().access_token;
    let other = app.login("kim").await.tokens.unwrap().access_token;
    let mut client = portcullis::api::pb::password_service_client::PasswordServiceClient::new(app.channel());
    let change = |current_password: &str, new_password: &str| pb::ChangePasswordRequest {
        current_password: current_password.into(),
        new_password: new_password.into(),
        client: None,
    };

    let wrong =
        client.change_password(bearer(change("wrong password!", NEW_PASSWORD), &current)).await.unwrap_err();
    assert_eq!(violated_fields(&wrong), ["current_password"]);
    let weak = client.change_password(bearer(change(PASSWORD, "password1234"), &current)).await.unwrap_err();
    assert_eq!(violated_fields(&weak), ["new_password"]);
    let anonymous = client.change_password(change(PASSWORD, NEW_PASSWORD)).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    let done =
        client.change_password(bearer(change(PASSWORD, NEW_PASSWORD), &current)).await.unwrap().into_inner();
    assert_eq!(done.revoked_sessions, 1);
    assert!(app.validate(&current).await.valid, "the session that changed it stays");
    assert_eq!(reason(&app.validate(&other).await), TokenInvalidReason::SessionRevoked);
    app.try_login("kim", NEW_PASSWORD).await.expect("new password");
    assert_eq!(app.try_login("kim", PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
    let notice = mails_to(&sink, &email, 3).await.remove(2);
    assert!(notice.text.contains("changed"), "{}", notice.text);
}

async fn profile_updates_only_the_masked_fields_and_email_switches_after_confirmation(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let email = verified_user(&app, &sink, "lena").await;
    let access = app.login("lena").await.tokens.unwrap().access_token;
    let mut client = portcullis::api::pb::account_service_client::AccountServiceClient::new(app.channel());
    let update = |profile: pb::Profile, paths: &[&str]| pb::UpdateProfileRequest {
        profile: Some(profile),
        update_mask: Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() }),
        client: None,
        current_password: String::new(),
    };
    let email_change = |to: &str, password: &str| pb::UpdateProfileRequest {
        current_password: password.into(),
        ..update(pb::Profile { email: to.into(), ..Default::default() }, &["email"])
    };

    let account = client.get_account(bearer(pb::GetAccountRequest {}, &access)).await.unwrap().into_inner();
    assert_eq!(account.active_sessions, 1);
    let before = account.user.unwrap();
    assert_eq!((before.first_name.as_str(), before.last_name.as_str()), ("Test", "User"));

    let profile = pb::Profile {
        first_name: "Lena".into(),
        phone: "+44 20 7946 0958".into(),
        bio: "ignored".into(),
        ..Default::default()
    };
    let updated =
        client.update_profile(bearer(update(profile, &["first_name", "phone"]), &access)).await.unwrap();
    let user = updated.into_inner().user.unwrap();
    assert_eq!(user.first_name, "Lena");
    assert_eq!(user.phone, "+44 20 7946 0958");
    assert_eq!(user.last_name, "User", "not in the mask: unchanged");
    assert_eq!(user.bio, "", "not in the mask: unchanged");

    let empty =
        client.update_profile(bearer(update(pb::Profile::default(), &[]), &access)).await.unwrap_err();
    assert_eq!(violated_fields(&empty), ["update_mask"]);
    let unknown =
        client.update_profile(bearer(update(pb::Profile::default(), &["roles"]), &access)).await.unwrap_err();
    assert_eq!(violated_fields(&unknown), ["update_mask"]);
    let bad = pb::Profile { phone: "call me maybe".into(), ..Default::default() };
    let bad = client.update_profile(bearer(update(bad, &["phone"]), &access)).await.unwrap_err();
    assert_eq!(violated_fields(&bad), ["phone"]);

    // A new email needs the current password: an access token alone is not enough.
    let none =
        client.update_profile(bearer(email_change("lena.new@example.com", ""), &access)).await.unwrap_err();
    assert_eq!(violated_fields(&none), ["current_password"]);
    let wrong = client
        .update_profile(bearer(email_change("lena.new@example.com", "wrong!"), &access))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&wrong), ["current_password"]);

    // An address another account holds gets the same answer (no oracle); confirming fails.
    app.register("taken").await;
    let taken =
        client.update_profile(bearer(email_change("taken@example.com", PASSWORD), &access)).await.unwrap();
    assert!(taken.into_inner().email_change_pending);
    let taken_link = link_token(&mails_to(&sink, "taken@example.com", 2).await[1], "/confirm-email");
    let conflict = client.confirm_email_change(pb::ConfirmEmailChangeRequest { token: taken_link }).await;
    assert_eq!(conflict.unwrap_err().code(), Code::AlreadyExists);

    let pending = client
        .update_profile(bearer(email_change("lena.new@example.com", PASSWORD), &access))
        .await
        .unwrap()
        .into_inner();
    assert!(pending.email_change_pending);
    assert_eq!(pending.user.unwrap().email, email, "still the old address until confirmed");
    let confirm = mails_to(&sink, "lena.new@example.com", 1).await.remove(0);
    assert!(!confirm.text.contains("Lena"), "no requester-chosen text to an unproven address");
    let token = link_token(&confirm, "/confirm-email");
    let notice = mails_to(&sink, &email, 4).await.remove(3);
    assert!(notice.text.contains("l***@example.com"), "old address told, masked: {}", notice.text);
    assert!(!notice.text.contains("lena.new@example.com"), "{}", notice.text);
    assert!(!notice.text.contains(&token), "the confirmation token goes only to the new address");

    client
        .confirm_email_change(pb::ConfirmEmailChangeRequest { token: token.clone() })
        .await
        .expect("confirm");
    let again = client.confirm_email_change(pb::ConfirmEmailChangeRequest { token }).await.unwrap_err();
    assert_eq!(error_reason(&again), "INVALID_TOKEN");
    let user = client
        .get_account(bearer(pb::GetAccountRequest {}, &access))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.email, "lena.new@example.com");
    assert!(user.email_verified);
    let changed = mails_to(&sink, &email, 5).await.remove(4);
    assert!(
        changed.subject.to_lowercase().contains("changed"),
        "the old address hears of it: {}",
        changed.subject
    );
    app.try_login("lena.new@example.com", PASSWORD).await.expect("log in with the new address");
    assert_eq!(app.try_login(&email, PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
}

/// A stolen session starts a change of email; the owner resets the password as the notice
/// says: the pending change must die with the reset.
async fn a_password_reset_kills_a_pending_email_change(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let email = verified_user(&app, &sink, "nora").await;
    let stolen = app.login("nora").await.tokens.unwrap().access_token;
    let mut client = portcullis::api::pb::account_service_client::AccountServiceClient::new(app.channel());
    let hijack = pb::UpdateProfileRequest {
        profile: Some(pb::Profile { email: "thief@evil.test".into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["email".into()] }),
        client: None,
        current_password: PASSWORD.into(),
    };
    client.update_profile(bearer(hijack, &stolen)).await.unwrap();
    let thief_link = link_token(&mails_to(&sink, "thief@evil.test", 1).await[0], "/confirm-email");

    forgot(&app, "nora").await;
    let reset_link = link_token(&mails_to(&sink, &email, 4).await[3], "/reset-password");
    reset(&app, &reset_link, NEW_PASSWORD).await.unwrap();

    let late = client.confirm_email_change(pb::ConfirmEmailChangeRequest { token: thief_link }).await;
    assert_eq!(error_reason(&late.unwrap_err()), "INVALID_TOKEN");
    assert_eq!(reason(&app.validate(&stolen).await), TokenInvalidReason::SessionRevoked);
}

async fn delete_account_needs_the_password_and_removes_the_account(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (access, refresh, _) = app.user_session("mona").await;
    let second = app.login("mona").await.tokens.unwrap().access_token;
    let mut client = portcullis::api::pb::account_service_client::AccountServiceClient::new(app.channel());
    let wrong = client
        .delete_account(bearer(pb::DeleteAccountRequest { password: "not my password".into() }, &access))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&wrong), ["password"]);
    assert!(app.validate(&access).await.valid);

    client
        .delete_account(bearer(pb::DeleteAccountRequest { password: PASSWORD.into() }, &access))
        .await
        .expect("delete");
    for token in [&access, &second] {
        assert_eq!(
            reason(&app.validate(token).await),
            TokenInvalidReason::SessionRevoked,
            "sessions end at once"
        );
    }
    assert_eq!(app.refresh(&refresh).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(app.try_login("mona", PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
    let store = app.store().await;
    assert!(store.find_user_by_login("mona").await.unwrap().is_none(), "the account is gone");
    app.register("mona").await; // the name and address are free again
}

async fn mail_queued_while_smtp_is_down_arrives_when_it_is_back(backend: Backend) {
    let Some((app, mut sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let port = sink.port();
    sink.stop();
    app.register("nils").await;
    app.register("olga").await;
    tokio::time::sleep(Duration::from_millis(600)).await; // a few failed attempts
    let sink = SmtpSink::start_on(port).expect("restart the SMTP server");
    for to in ["nils@example.com", "olga@example.com"] {
        let mails = mails_to(&sink, to, 1).await;
        link_token(&mails[0], "/verify-email");
    }
    no_more_mail(&sink, "nils@example.com", 1).await;
}

async fn mail_queued_before_a_restart_is_sent_after_it(backend: Backend) {
    let Some((app, mut sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let port = sink.port();
    sink.stop();
    app.register("quin").await;
    let (settings, data) = (app.settings.clone(), app.data_handle());
    app.shutdown().await.unwrap();

    // A new process on the same database, with the SMTP server back.
    let sink = SmtpSink::start_on(port).expect("restart the SMTP server");
    let app = crate::harness::spawn_with_settings(settings, data).await;
    let mail = mails_to(&sink, "quin@example.com", 1).await.remove(0);
    verify(&app, &link_token(&mail, "/verify-email")).await.expect("the link from before the restart works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_smtp_mail_is_written_to_files() {
    let Some(app) = spawn_app(Backend::Embedded).await else { return };
    app.register("pia").await;
    let dir = app.data_handle().path().join("mail");
    let found = crate::harness::eventually(Duration::from_secs(5), || {
        let dir = dir.clone();
        async move {
            std::fs::read_dir(&dir)
                .map(|d| d.filter_map(Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "eml")))
                .unwrap_or(false)
        }
    })
    .await;
    assert!(found, "an .eml file under data/mail");
    let eml = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .unwrap();
    let text = std::fs::read_to_string(eml.path()).unwrap();
    assert!(text.contains("pia@example.com"));
    assert!(text.contains("multipart/alternative"));
}
