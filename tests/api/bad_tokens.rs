//! Hostile and broken tokens: each gets its precise answer, nothing panics.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis::{
    api::pb::TokenInvalidReason as R,
    token::{KeySet, SigningAlgorithm, keys::generate_key_file},
};
use serde_json::{Value, json};

use crate::{
    harness::{Backend, TestApp, reason, spawn_app},
    on_both_backends,
};

on_both_backends!(hostile_tokens_get_precise_answers, roles_are_checked);

/// Signs `claims` with the server's own key (as a test with access to the key file can).
fn sign_with_server_key(app: &TestApp, claims: &Value) -> String {
    let keys = KeySet::load_dir(&app.settings.keys_dir(), None).unwrap();
    let key = keys.signer();
    let pem = std::fs::read(&key.path).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

fn claims(overrides: Value) -> Value {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = json!({
        "iss": "portcullis", "aud": "portcullis",
        "sub": uuid::Uuid::new_v4().to_string(), "sid": uuid::Uuid::new_v4().to_string(),
        "iat": now, "nbf": now, "exp": now + 600, "jti": "t", "roles": [], "amr": ["pwd"],
    });
    for (k, v) in overrides.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

fn unsigned(header: Value, claims: &Value, signature: &str) -> String {
    format!("{}.{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()), signature)
}

async fn hostile_tokens_get_precise_answers(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let keys = KeySet::load_dir(&app.settings.keys_dir(), None).unwrap();
    let kid = keys.signer().kid.clone();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();

    // Our own key with good claims is valid: the cases below differ in one thing each.
    assert!(app.validate(&sign_with_server_key(&app, &claims(json!({})))).await.valid);

    let alg_none = unsigned(json!({"alg": "none", "typ": "JWT", "kid": kid}), &claims(json!({})), "");
    let other_dir = tempfile::tempdir().unwrap();
    let other_path = generate_key_file(other_dir.path(), SigningAlgorithm::RS256).unwrap();
    let mut other_header = Header::new(Algorithm::RS256);
    other_header.kid = Some(kid.clone()); // claims to be our key
    let other_key = EncodingKey::from_rsa_pem(&std::fs::read(&other_path).unwrap()).unwrap();
    let other_signed = jsonwebtoken::encode(&other_header, &claims(json!({})), &other_key).unwrap();
    // The classic confusion attack: HS256 "signed" with our public key as the HMAC secret.
    let public_pem = {
        let der = pem::parse(std::fs::read(&keys.signer().path).unwrap()).unwrap().into_contents();
        let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(&der).unwrap();
        let spki = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(
            aws_lc_rs::signature::KeyPair::public_key(&pair),
        )
        .unwrap();
        pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec()))
    };
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(kid.clone());
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &claims(json!({})),
        &EncodingKey::from_secret(public_pem.as_bytes()),
    )
    .unwrap();
    let unknown_kid = {
        let mut t = sign_with_server_key(&app, &claims(json!({})));
        let header = B64.encode(json!({"alg": "RS256", "kid": "not-a-key"}).to_string());
        t.replace_range(..t.find('.').unwrap(), &header);
        t
    };

    let cases: Vec<(&str, String, R)> = vec![
        ("empty", String::new(), R::Malformed),
        ("garbage", "not a token".into(), R::Malformed),
        ("three garbage parts", "a.b.c".into(), R::Malformed),
        ("huge", "x".repeat(100_000), R::Malformed),
        ("alg none", alg_none, R::BadSignature),
        ("signed by another key", other_signed, R::BadSignature),
        ("HS256 with the public key", hs256, R::BadSignature),
        ("unknown kid", unknown_kid, R::BadSignature),
        (
            "expired",
            sign_with_server_key(
                &app,
                &claims(json!({"iat": now - 1000, "nbf": now - 1000, "exp": now - 400})),
            ),
            R::Expired,
        ),
        (
            "not yet valid",
            sign_with_server_key(&app, &claims(json!({"nbf": now + 3600, "exp": now + 7200}))),
            R::NotYetValid,
        ),
        (
            "wrong audience",
            sign_with_server_key(&app, &claims(json!({"aud": "another-service"}))),
            R::WrongAudience,
        ),
        (
            "wrong issuer",
            sign_with_server_key(&app, &claims(json!({"iss": "https://evil.example"}))),
            R::WrongIssuer,
        ),
        ("no exp", sign_with_server_key(&app, &claims(json!({"exp": null}))), R::Malformed),
        // CVE-2026-25537: a mistyped exp must not skip the expiry check.
        ("exp as a string", sign_with_server_key(&app, &claims(json!({"exp": "99999999999"}))), R::Malformed),
        ("sub not a user id", sign_with_server_key(&app, &claims(json!({"sub": "admin"}))), R::Malformed),
    ];
    for (name, token, expected) in cases {
        let v = app.validate(&token).await;
        assert!(!v.valid, "{name} was accepted");
        assert_eq!(reason(&v), expected, "{name}");
        assert!(v.user_id.is_empty() && v.session_id.is_empty(), "{name}: no identity on invalid tokens");
    }
}

async fn roles_are_checked(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (plain, _, _) = app.user_session("tina").await;
    let v = app.validate_roles(&plain, &["admin"]).await;
    assert_eq!(reason(&v), R::MissingRole);

    let operator = sign_with_server_key(&app, &claims(json!({"roles": ["admin", "ops"]})));
    let v = app.validate_roles(&operator, &["admin"]).await;
    assert!(v.valid);
    assert_eq!(v.roles, ["admin", "ops"]);
    assert!(v.expires_at.is_some());
    assert_eq!(reason(&app.validate_roles(&operator, &["admin", "billing"]).await), R::MissingRole);
}
