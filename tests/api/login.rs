use std::time::{Duration, Instant};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use portcullis::api::pb;
use tonic::Code;

use crate::{
    harness::{Backend, FIREFOX, PASSWORD, error_reason, spawn_app, spawn_app_with},
    on_both_backends,
};

on_both_backends!(
    login_by_username_or_email_returns_tokens_and_session,
    wrong_password_and_unknown_user_get_one_answer,
    unknown_user_costs_a_bcrypt_like_a_wrong_password,
    legacy_bcrypt_hashes_log_in_and_are_upgraded,
    client_context_falls_back_to_metadata,
);

fn claims(jwt: &str) -> (serde_json::Value, serde_json::Value) {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWS compact token");
    let decode = |s: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
    (decode(parts[0]), decode(parts[1]))
}

async fn login_by_username_or_email_returns_tokens_and_session(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let user = app.register("Carol").await;

    for identifier in ["carol", "CAROL", "carol@example.com", "Carol@Example.com"] {
        let session = app.login(identifier).await;
        assert_eq!(session.user.as_ref().unwrap().id, user.id, "{identifier}");
    }

    let authenticated = app.login("carol").await;
    let tokens = authenticated.tokens.unwrap();
    let session = authenticated.session.unwrap();
    assert_eq!(tokens.token_type, "Bearer");
    assert!(tokens.refresh_token.starts_with("pcrt_"));

    let (header, body) = claims(&tokens.access_token);
    assert_eq!(header["alg"], "RS256");
    assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));
    assert_eq!(body["sub"], user.id);
    assert_eq!(body["sid"], session.id);
    assert_eq!(body["iss"], "portcullis");
    assert_eq!(body["aud"], "portcullis");
    assert_eq!(body["amr"], serde_json::json!(["pwd"]));
    assert_eq!(body["email_verified"], false);
    let (iat, exp) = (body["iat"].as_i64().unwrap(), body["exp"].as_i64().unwrap());
    assert_eq!(exp - iat, 600, "10-minute access tokens by default");
    assert_eq!(body["nbf"].as_i64(), Some(iat));
    assert!(body["jti"].as_str().is_some());
    assert_eq!(tokens.access_token_expires_at.unwrap().seconds, exp);

    assert_eq!(session.device_type, "desktop");
    assert!(session.browser.starts_with("Firefox"), "{}", session.browser);
    assert_eq!(session.os, "Linux");
    assert_eq!(session.ip_address, "203.0.113.7");
    assert!(session.current);

    let valid = app.validate(&tokens.access_token).await;
    assert!(valid.valid);
    assert_eq!((valid.user_id.as_str(), valid.session_id.as_str()), (user.id.as_str(), session.id.as_str()));
}

async fn wrong_password_and_unknown_user_get_one_answer(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    app.register("dave").await;
    let wrong = app.try_login("dave", "not the password at all").await.unwrap_err();
    let unknown = app.try_login("nobody", PASSWORD).await.unwrap_err();
    let unknown_email = app.try_login("nobody@example.com", PASSWORD).await.unwrap_err();
    for status in [&wrong, &unknown, &unknown_email] {
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), wrong.message());
        assert_eq!(error_reason(status), "INVALID_CREDENTIALS");
    }

    let missing = app.try_login("", "").await.unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    let huge = app.try_login("dave", &"x".repeat(5000)).await.unwrap_err();
    assert_eq!(huge.code(), Code::InvalidArgument);
}

/// Without the dummy verification an unknown user would answer in microseconds, a wrong
/// password in tens of milliseconds; without the failure floor an account with a cheaper
/// (imported) hash would answer faster than both. The medians must be of the same order.
async fn unknown_user_costs_a_bcrypt_like_a_wrong_password(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.password.bcrypt_cost = 10;
        s.login.account_lockout.max_failures = 20;
    })
    .await
    else {
        return;
    };
    app.register("erin").await;
    app.register("locked").await;
    for _ in 0..20 {
        app.try_login("locked", "definitely wrong password").await.unwrap_err();
    }
    let locked = app.try_login("locked", "definitely wrong password").await.unwrap_err();
    assert_eq!(locked.code(), Code::ResourceExhausted, "locked after its budget");
    let legacy = app.register("imported").await;
    let store = app.store().await;
    let id = legacy.id.parse().unwrap();
    let current = store.find_user(id).await.unwrap().unwrap().password_hash;
    let cheap = bcrypt::hash("imported-password", 4).unwrap();
    assert!(store.replace_password_hash(id, &current, &cheap).await.unwrap());

    let mut samples = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..9 {
        for (i, who) in ["erin", "nobody-here", "imported", "locked"].iter().enumerate() {
            let t = Instant::now();
            app.try_login(who, "definitely wrong password").await.unwrap_err();
            samples[i].push(t.elapsed().as_secs_f64());
        }
    }
    let [wrong, unknown, cheap, locked] = samples.map(|mut s| {
        s.sort_by(f64::total_cmp);
        s[4]
    });
    eprintln!(
        "login medians (bcrypt cost 10): wrong password {wrong:.4}s, unknown user {unknown:.4}s, cheap imported hash {cheap:.4}s, locked account {locked:.4}s"
    );
    assert!(wrong > Duration::from_millis(10).as_secs_f64(), "cost 10 bcrypt takes milliseconds: {wrong}");
    for (what, median) in
        [("unknown user", unknown), ("cheap imported hash", cheap), ("locked account", locked)]
    {
        let ratio = median / wrong;
        assert!((0.6..1.7).contains(&ratio), "{what} median {median:.4}s vs wrong password {wrong:.4}s");
    }
}

async fn legacy_bcrypt_hashes_log_in_and_are_upgraded(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let user = app.register("frank").await;
    let store = app.store().await;
    let id = user.id.parse().unwrap();
    // As imported from one of the Node.js systems: bcryptjs, `$2a$`, cost 10.
    let legacy = bcrypt::hash("legacy-password-1", 4).unwrap().replacen("$2b$", "$2a$", 1);
    let current = store.find_user(id).await.unwrap().unwrap().password_hash;
    assert!(store.replace_password_hash(id, &current, &legacy).await.unwrap());

    assert_eq!(app.try_login("frank", PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
    app.try_login("frank", "legacy-password-1").await.expect("legacy hash verifies");
    let upgraded = store.find_user(id).await.unwrap().unwrap().password_hash;
    assert!(upgraded.starts_with("hmac-sha256:$2b$04$"), "upgraded: {upgraded}");
    app.try_login("frank", "legacy-password-1").await.expect("upgraded hash verifies");
}

async fn client_context_falls_back_to_metadata(backend: Backend) {
    let Some(app) =
        spawn_app_with(backend, |s| s.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()]).await
    else {
        return;
    };
    app.register("gina").await;
    let mut client = app.auth.clone();
    let mut request = tonic::Request::new(pb::LoginRequest {
        identifier: "gina".into(),
        password: PASSWORD.into(),
        client: None,
    });
    request.metadata_mut().insert("x-forwarded-for", "198.51.100.23, 127.0.0.1".parse().unwrap());
    request.metadata_mut().insert("user-agent", FIREFOX.parse().unwrap());
    let response = client.login(request).await.expect("login").into_inner();
    let Some(pb::login_response::Outcome::Authenticated(session)) = response.outcome else { panic!() };
    let session = session.session.unwrap();
    assert_eq!(session.ip_address, "198.51.100.23", "x-forwarded-for from a trusted proxy");

    // A ClientContext with a malformed address is refused, naming the field.
    let bad = client
        .login(pb::LoginRequest {
            identifier: "gina".into(),
            password: PASSWORD.into(),
            client: Some(pb::ClientContext { ip_address: "999.1.1.1".into(), ..Default::default() }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(crate::harness::violated_fields(&bad), ["client.ip_address"]);
}

#[tokio::test]
async fn untrusted_peers_cannot_spoof_their_address() {
    let Some(app) = spawn_app(Backend::Embedded).await else { return };
    app.register("hank").await;
    let mut client = app.auth.clone();
    let mut request = tonic::Request::new(pb::LoginRequest {
        identifier: "hank".into(),
        password: PASSWORD.into(),
        client: None,
    });
    request.metadata_mut().insert("x-forwarded-for", "198.51.100.23".parse().unwrap());
    let response = client.login(request).await.expect("login").into_inner();
    let Some(pb::login_response::Outcome::Authenticated(session)) = response.outcome else { panic!() };
    assert_eq!(session.session.unwrap().ip_address, "127.0.0.1", "the peer address, not the header");
}
