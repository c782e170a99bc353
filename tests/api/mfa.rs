//! Second factors over gRPC: the emailed login code (read from a real SMTP server) and
//! TOTP (codes computed by an independent implementation, `tests/support/totp.py`), with
//! recovery codes, per-account budgets and replay protection.

use std::{process::Command, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use portcullis::{
    api::pb::{self, account_service_client::AccountServiceClient},
    config::{Lockout, RateLimit},
};
use tonic::Code;

use crate::{
    email::{forgot, link_token, mails_to, reset, verified_user},
    harness::{
        Backend, FIREFOX, PASSWORD, TestApp, bearer, error_reason, reason, spawn_app_with_mail,
        spawn_with_settings, test_settings,
    },
    on_both_backends, support,
};

on_both_backends!(
    the_emailed_code_completes_a_login_once,
    wrong_codes_spend_the_accounts_budget_not_the_challenges,
    an_expired_code_is_refused,
    a_password_reset_keeps_the_second_factor,
    totp_enrolment_login_replay_and_recovery_codes,
    each_challenge_is_rate_limited,
    a_password_change_or_new_factor_closes_open_challenges,
    a_pending_enrolment_cannot_be_guessed,
);

const TOTP_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/totp.py");

fn client() -> Option<pb::ClientContext> {
    Some(pb::ClientContext {
        ip_address: "203.0.113.7".into(),
        user_agent: FIREFOX.into(),
        device_fingerprint: "fp-test".into(),
    })
}

async fn login(
    app: &TestApp,
    who: &str,
    password: &str,
) -> Result<pb::login_response::Outcome, tonic::Status> {
    let mut auth = app.auth.clone();
    let response = auth
        .login(pb::LoginRequest { identifier: who.into(), password: password.into(), client: client() })
        .await?;
    Ok(response.into_inner().outcome.expect("an outcome"))
}

/// Logs in with the password and expects a challenge.
async fn challenge(app: &TestApp, who: &str) -> pb::MfaChallenge {
    match login(app, who, PASSWORD).await.expect("password accepted") {
        pb::login_response::Outcome::MfaRequired(challenge) => challenge,
        other => panic!("expected an MFA challenge, got {other:?}"),
    }
}

async fn verify(
    app: &TestApp,
    challenge: &pb::MfaChallenge,
    code: &str,
) -> Result<pb::AuthenticatedSession, tonic::Status> {
    let mut auth = app.auth.clone();
    let response = auth
        .verify_mfa(pb::VerifyMfaRequest {
            challenge_token: challenge.challenge_token.clone(),
            code: code.into(),
            client: client(),
        })
        .await?;
    Ok(response.into_inner().authenticated.expect("a session"))
}

fn account(app: &TestApp) -> AccountServiceClient<tonic::transport::Channel> {
    AccountServiceClient::new(app.channel())
}

async fn access_token(app: &TestApp, who: &str) -> String {
    match login(app, who, PASSWORD).await.expect("login") {
        pb::login_response::Outcome::Authenticated(session) => session.tokens.unwrap().access_token,
        other => panic!("expected tokens, got {other:?}"),
    }
}

async fn enable_email_otp(app: &TestApp, who: &str) {
    let access = access_token(app, who).await;
    let status = account(app)
        .set_email_otp(bearer(
            pb::SetEmailOtpRequest { enabled: true, current_password: PASSWORD.into() },
            &access,
        ))
        .await
        .expect("SetEmailOtp")
        .into_inner()
        .mfa
        .unwrap();
    assert!(status.email_otp_enabled);
}

/// The 6-digit code of the `n`th login-code mail to `email` (waiting for it).
async fn mailed_code(sink: &support::SmtpSink, email: &str, n: usize) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let codes = loop {
        let codes: Vec<support::ReceivedMail> = sink
            .messages()
            .into_iter()
            .filter(|m| m.to.iter().any(|t| t == email) && m.text.contains("sign-in code is "))
            .collect();
        if codes.len() >= n || tokio::time::Instant::now() > deadline {
            break codes;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(codes.len(), n, "login-code mails to {email}");
    let mail = codes.last().unwrap();
    assert_eq!(mail.subject, "Your Portcullis sign-in code", "the code is not in the subject");
    let start = mail.text.find("sign-in code is ").unwrap() + "sign-in code is ".len();
    let code: String = mail.text[start..].chars().take(6).collect();
    assert!(code.chars().all(|c| c.is_ascii_digit()), "{code}");
    assert!(mail.html.contains(&code), "the HTML part has the code too");
    code
}

fn amr(access_token: &str) -> serde_json::Value {
    let payload = access_token.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["amr"].clone()
}

async fn the_emailed_code_completes_a_login_once(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let email = verified_user(&app, &sink, "ada").await;
    enable_email_otp(&app, "ada").await;

    let challenge = challenge(&app, "ada").await;
    assert_eq!(challenge.method, pb::MfaMethod::EmailOtp as i32);
    assert!(challenge.challenge_token.starts_with("pcmc_"));
    // verification mail, then the code (no new-device alert: the first device).
    let code = mailed_code(&sink, &email, 1).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let status = verify(&app, &challenge, wrong).await.unwrap_err();
    assert_eq!((status.code(), error_reason(&status).as_str()), (Code::Unauthenticated, "INVALID_MFA_CODE"));

    let session = verify(&app, &challenge, &code).await.expect("the right code");
    let tokens = session.tokens.unwrap();
    assert_eq!(amr(&tokens.access_token), serde_json::json!(["pwd", "otp"]));
    assert!(app.validate(&tokens.access_token).await.valid);
    // A refreshed token keeps the factors the session was opened with.
    let refreshed = app.refresh(&tokens.refresh_token).await.expect("refresh");
    assert_eq!(amr(&refreshed.access_token), serde_json::json!(["pwd", "otp"]));

    // Single use.
    let again = verify(&app, &challenge, &code).await.unwrap_err();
    assert_eq!(error_reason(&again), "MFA_CHALLENGE_INVALID");
    // A bare password no longer gets tokens.
    assert!(matches!(challenge_or_tokens(&app, "ada").await, pb::login_response::Outcome::MfaRequired(_)));
}

async fn challenge_or_tokens(app: &TestApp, who: &str) -> pb::login_response::Outcome {
    login(app, who, PASSWORD).await.expect("login")
}

async fn wrong_codes_spend_the_accounts_budget_not_the_challenges(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |s| {
        s.mfa.code_lockout = Lockout {
            max_failures: 5,
            window: Duration::from_secs(600),
            lockout: Duration::from_secs(600),
            max_lockout: Duration::from_secs(600),
        };
    })
    .await
    else {
        return;
    };
    let email = verified_user(&app, &sink, "bea").await;
    enable_email_otp(&app, "bea").await;

    let first = challenge(&app, "bea").await;
    let first_code = mailed_code(&sink, &email, 1).await;
    let wrong = |code: &str| if code == "999999" { "999998".to_string() } else { "999999".to_string() };
    for _ in 0..3 {
        assert_eq!(
            error_reason(&verify(&app, &first, &wrong(&first_code)).await.unwrap_err()),
            "INVALID_MFA_CODE"
        );
    }
    // A new code does not give new tries, and kills the old challenge.
    let second = challenge(&app, "bea").await;
    let second_code = mailed_code(&sink, &email, 2).await;
    assert_eq!(error_reason(&verify(&app, &first, &first_code).await.unwrap_err()), "MFA_CHALLENGE_INVALID");
    for _ in 0..2 {
        assert_eq!(
            error_reason(&verify(&app, &second, &wrong(&second_code)).await.unwrap_err()),
            "INVALID_MFA_CODE"
        );
    }
    // Five wrong codes in all: the right one no longer works, and neither does a new one.
    let refused = verify(&app, &second, &second_code).await.unwrap_err();
    assert!(
        ["MFA_CHALLENGE_INVALID", "TOO_MANY_ATTEMPTS"].contains(&error_reason(&refused).as_str()),
        "{refused:?}"
    );
    // Logging in again gets no new code (and mails none) until the lockout ends.
    let refused = login(&app, "bea", PASSWORD).await.unwrap_err();
    assert_eq!(
        (refused.code(), error_reason(&refused).as_str()),
        (Code::ResourceExhausted, "TOO_MANY_ATTEMPTS")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    mailed_code(&sink, &email, 2).await;
}

async fn an_expired_code_is_refused(backend: Backend) {
    let Some((app, sink)) =
        spawn_app_with_mail(backend, |s| s.mfa.email_code_ttl = Duration::from_secs(1)).await
    else {
        return;
    };
    let email = verified_user(&app, &sink, "cleo").await;
    enable_email_otp(&app, "cleo").await;
    let challenge = challenge(&app, "cleo").await;
    let code = mailed_code(&sink, &email, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(error_reason(&verify(&app, &challenge, &code).await.unwrap_err()), "MFA_CHALLENGE_INVALID");
}

async fn a_password_reset_keeps_the_second_factor(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let email = verified_user(&app, &sink, "dora").await;
    enable_email_otp(&app, "dora").await;
    forgot(&app, "dora").await;
    // verification, welcome, reset link
    let mail = mails_to(&sink, &email, 3).await.pop().unwrap();
    reset(&app, &link_token(&mail, "/reset-password"), "a brand new passphrase").await.expect("reset");
    let outcome = login(&app, "dora", "a brand new passphrase").await.expect("new password");
    assert!(
        matches!(outcome, pb::login_response::Outcome::MfaRequired(_)),
        "the reset did not switch the second factor off"
    );
}

/// The current TOTP time step.
fn step_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 30
}

/// The TOTP code of `step`, as an authenticator app computes it.
fn totp_at(secret: &str, step: u64) -> String {
    let output = Command::new("python3")
        .arg(TOTP_SCRIPT)
        .arg("--step")
        .arg(step.to_string())
        .arg(secret)
        .output()
        .expect("python3");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

async fn totp_enrolment_login_replay_and_recovery_codes(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    verified_user(&app, &sink, "edie").await;
    let access = access_token(&app, "edie").await;
    let mut accounts = account(&app);

    let wrong = accounts
        .begin_totp_enrollment(bearer(
            pb::BeginTotpEnrollmentRequest { current_password: "nope nope nope".into() },
            &access,
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument, "the password is required");
    let not_begun = accounts
        .confirm_totp_enrollment(bearer(pb::ConfirmTotpEnrollmentRequest { code: "123456".into() }, &access))
        .await;
    assert_eq!(not_begun.unwrap_err().code(), Code::FailedPrecondition);

    let enrollment = accounts
        .begin_totp_enrollment(bearer(
            pb::BeginTotpEnrollmentRequest { current_password: PASSWORD.into() },
            &access,
        ))
        .await
        .expect("begin")
        .into_inner();
    assert!(
        enrollment.otpauth_uri.starts_with("otpauth://totp/Portcullis:edie?"),
        "{}",
        enrollment.otpauth_uri
    );
    assert!(enrollment.otpauth_uri.contains(&format!("secret={}", enrollment.secret)));
    // Not on until confirmed: a bare password still opens (another) session.
    let pb::login_response::Outcome::Authenticated(other) = challenge_or_tokens(&app, "edie").await else {
        panic!("no second factor yet")
    };
    let other_access = other.tokens.unwrap().access_token;

    // Steps are fixed now, so a step boundary during the test cannot change the codes
    // (each stays within the ±1 step the server accepts while the test runs).
    let step = step_now();
    let bad = accounts
        .confirm_totp_enrollment(bearer(pb::ConfirmTotpEnrollmentRequest { code: "000000".into() }, &access))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let confirmed = accounts
        .confirm_totp_enrollment(bearer(
            pb::ConfirmTotpEnrollmentRequest { code: totp_at(&enrollment.secret, step) },
            &access,
        ))
        .await
        .expect("confirm")
        .into_inner();
    assert_eq!(confirmed.recovery_codes.len(), 10);
    assert_eq!(confirmed.mfa.unwrap().recovery_codes_remaining, 10);
    // Turning it on ended the sessions opened without it, except the caller's own.
    assert_eq!(reason(&app.validate(&other_access).await), pb::TokenInvalidReason::SessionRevoked);
    assert!(app.validate(&access).await.valid);

    // The code used to confirm cannot log in (same step): the next step's code does.
    let challenge = challenge(&app, "edie").await;
    assert_eq!(challenge.method, pb::MfaMethod::Totp as i32);
    let replayed = verify(&app, &challenge, &totp_at(&enrollment.secret, step)).await.unwrap_err();
    assert_eq!(error_reason(&replayed), "INVALID_MFA_CODE", "a code works once");
    let next = totp_at(&enrollment.secret, step + 1);
    let session = verify(&app, &challenge, &next).await.expect("the next step's code (skew 1)");
    let mfa_access = session.tokens.unwrap().access_token;
    assert_eq!(amr(&mfa_access), serde_json::json!(["pwd", "otp"]));
    assert_eq!(app.validate(&mfa_access).await.amr, ["pwd", "otp"], "ValidateToken tells callers");
    let challenge = self::challenge(&app, "edie").await;
    assert_eq!(error_reason(&verify(&app, &challenge, &next).await.unwrap_err()), "INVALID_MFA_CODE");

    // A recovery code works once, in place of a code, whatever its case.
    let recovery = confirmed.recovery_codes[0].to_uppercase();
    verify(&app, &challenge, &recovery).await.expect("recovery code");
    let challenge = self::challenge(&app, "edie").await;
    assert_eq!(error_reason(&verify(&app, &challenge, &recovery).await.unwrap_err()), "INVALID_MFA_CODE");
    let status = accounts.get_account(bearer(pb::GetAccountRequest {}, &access)).await.unwrap().into_inner();
    assert_eq!(status.mfa.unwrap().recovery_codes_remaining, 9);

    // Removing the factor takes a session opened with it, not only the password.
    let refused = accounts
        .disable_totp(bearer(pb::DisableTotpRequest { current_password: PASSWORD.into() }, &access))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), error_reason(&refused).as_str()),
        (Code::FailedPrecondition, "SECOND_FACTOR_REQUIRED")
    );
    // Off again with the password: a bare password logs in.
    let off = accounts
        .disable_totp(bearer(pb::DisableTotpRequest { current_password: PASSWORD.into() }, &mfa_access))
        .await
        .expect("disable")
        .into_inner();
    assert!(!off.mfa.unwrap().totp_enabled);
    assert!(matches!(challenge_or_tokens(&app, "edie").await, pb::login_response::Outcome::Authenticated(_)));
}

async fn each_challenge_is_rate_limited(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |s| {
        s.limits.verify_mfa_per_challenge = RateLimit::new(2, Duration::from_secs(60), Duration::ZERO);
    })
    .await
    else {
        return;
    };
    let email = verified_user(&app, &sink, "fay").await;
    enable_email_otp(&app, "fay").await;
    let challenge = challenge(&app, "fay").await;
    let code = mailed_code(&sink, &email, 1).await;
    let wrong = if code == "123456" { "654321" } else { "123456" };
    for _ in 0..2 {
        assert_eq!(error_reason(&verify(&app, &challenge, wrong).await.unwrap_err()), "INVALID_MFA_CODE");
    }
    let limited = verify(&app, &challenge, &code).await.unwrap_err();
    assert_eq!((limited.code(), error_reason(&limited).as_str()), (Code::ResourceExhausted, "RATE_LIMITED"));
}

/// With Redis unreachable, no second-factor code is checked at all (fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_are_not_checked_while_redis_is_down() {
    let Some(sink) = support::SmtpSink::start() else { return };
    let Some((mut settings, data)) = test_settings(Backend::Postgres).await else { return };
    let redis_url = settings.redis_url.clone().unwrap();
    let proxy = support::TcpProxy::start(&support::redis_host_port(&redis_url)).await;
    settings.redis_url = Some(format!("redis://{}", proxy.addr()));
    settings.mail.smtp_url = Some(sink.url());
    settings.mail.frontend_base_url = "https://app.example.test".into();
    settings.login.require_verified_email = true;
    let app = spawn_with_settings(settings, Arc::new(data)).await;
    let email = verified_user(&app, &sink, "gia").await;
    enable_email_otp(&app, "gia").await;
    let challenge = challenge(&app, "gia").await;
    let code = mailed_code(&sink, &email, 1).await;

    proxy.cut();
    let refused = verify(&app, &challenge, &code).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "fails closed: {refused:?}");
    proxy.restore();
    let mut done = None;
    for _ in 0..50 {
        match verify(&app, &challenge, &code).await {
            Ok(session) => {
                done = Some(session);
                break;
            }
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    assert!(done.is_some(), "the same code works once Redis is back (it was never checked)");
}

async fn a_password_change_or_new_factor_closes_open_challenges(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |_| {}).await else { return };
    let email = verified_user(&app, &sink, "hedy").await;
    let pwd_only = access_token(&app, "hedy").await;
    enable_email_otp(&app, "hedy").await;

    // A login begun with the old password does not complete after a password reset.
    let pending = challenge(&app, "hedy").await;
    let code = mailed_code(&sink, &email, 1).await;
    forgot(&app, "hedy").await;
    let reset_mail = mails_to(&sink, &email, 4).await.pop().unwrap(); // verify, welcome, code, reset
    reset(&app, &link_token(&reset_mail, "/reset-password"), "a brand new passphrase").await.expect("reset");
    assert_eq!(error_reason(&verify(&app, &pending, &code).await.unwrap_err()), "MFA_CHALLENGE_INVALID");

    // Switching to TOTP closes an open email challenge.
    let pending = match login(&app, "hedy", "a brand new passphrase").await.unwrap() {
        pb::login_response::Outcome::MfaRequired(c) => c,
        other => panic!("{other:?}"),
    };
    let code = mailed_code(&sink, &email, 2).await;
    let session = verify(&app, &pending, &code).await.expect("right code");
    let mfa_access = session.tokens.unwrap().access_token;
    let pending = match login(&app, "hedy", "a brand new passphrase").await.unwrap() {
        pb::login_response::Outcome::MfaRequired(c) => c,
        other => panic!("{other:?}"),
    };
    let code = mailed_code(&sink, &email, 3).await;
    let mut accounts = account(&app);
    let begin = |access: &str| {
        bearer(pb::BeginTotpEnrollmentRequest { current_password: "a brand new passphrase".into() }, access)
    };
    // (The password-only session from before ended with the reset; a fresh password-only
    // session is refused anyway: see the TOTP test.)
    assert_eq!(
        accounts.begin_totp_enrollment(begin(&pwd_only)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let enrollment = accounts.begin_totp_enrollment(begin(&mfa_access)).await.expect("begin").into_inner();
    let confirm = pb::ConfirmTotpEnrollmentRequest { code: totp_at(&enrollment.secret, step_now()) };
    accounts.confirm_totp_enrollment(bearer(confirm, &mfa_access)).await.expect("confirm");
    assert_eq!(error_reason(&verify(&app, &pending, &code).await.unwrap_err()), "MFA_CHALLENGE_INVALID");
}

async fn a_pending_enrolment_cannot_be_guessed(backend: Backend) {
    let Some((app, sink)) = spawn_app_with_mail(backend, |s| {
        s.mfa.code_lockout = Lockout {
            max_failures: 3,
            window: Duration::from_secs(600),
            lockout: Duration::from_secs(600),
            max_lockout: Duration::from_secs(600),
        };
    })
    .await
    else {
        return;
    };
    verified_user(&app, &sink, "ivy").await;
    let access = access_token(&app, "ivy").await;
    let mut accounts = account(&app);
    let enrollment = accounts
        .begin_totp_enrollment(bearer(
            pb::BeginTotpEnrollmentRequest { current_password: PASSWORD.into() },
            &access,
        ))
        .await
        .expect("begin")
        .into_inner();
    let right = totp_at(&enrollment.secret, step_now());
    let wrong = if right == "000000" { "000001" } else { "000000" };
    for _ in 0..3 {
        let status = accounts
            .confirm_totp_enrollment(bearer(pb::ConfirmTotpEnrollmentRequest { code: wrong.into() }, &access))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let refused = accounts
        .confirm_totp_enrollment(bearer(pb::ConfirmTotpEnrollmentRequest { code: right }, &access))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), error_reason(&refused).as_str()),
        (Code::ResourceExhausted, "TOO_MANY_ATTEMPTS")
    );
}
