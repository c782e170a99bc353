//! Keys and JWKS: `GetJwks` and `/.well-known/jwks.json` on the ops port publish every
//! loaded key (public members only), rotation keeps the previous key's tokens valid until
//! the key is removed, and an independent JWT implementation (PyJWT, run by
//! `tests/support/verify_jwt.py`) verifies our tokens from the published JWKS alone.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use portcullis::{
    api::pb::{self, TokenInvalidReason},
    token::{KeySet, SigningAlgorithm, keys::generate_key_file},
};
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    harness::{Backend, TestApp, reason, spawn_app, spawn_app_with, spawn_with_settings},
    on_both_backends,
};

on_both_backends!(
    jwks_publishes_every_key_and_nothing_private,
    rotation_keeps_old_tokens_until_their_key_is_removed,
    pyjwt_verifies_our_tokens_from_the_published_jwks,
);

const VERIFY_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/verify_jwt.py");

/// The members a published key may have, per `kty`.
fn allowed_members(kty: &str) -> BTreeSet<&'static str> {
    let specific: &[&str] = match kty {
        "RSA" => &["n", "e"],
        "EC" => &["crv", "x", "y"],
        "OKP" => &["crv", "x"],
        other => panic!("unexpected kty {other}"),
    };
    ["kty", "kid", "use", "alg"].into_iter().chain(specific.iter().copied()).collect()
}

/// The `kid` in a JWT's header.
fn kid_of(token: &str) -> String {
    let header: Value =
        serde_json::from_slice(&B64.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    header["kid"].as_str().expect("kid header").to_owned()
}

async fn get_jwks(app: &TestApp) -> pb::GetJwksResponse {
    app.auth.clone().get_jwks(pb::GetJwksRequest {}).await.expect("GetJwks").into_inner()
}

/// The kids of a JWKS document, in order.
fn kids(jwks_json: &str) -> Vec<String> {
    let document: Value = serde_json::from_str(jwks_json).expect("jwks_json is JSON");
    document["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
}

/// A plain HTTP/1.1 GET; (status, headers with lowercase names, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the ops port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    assert!(
        !headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")),
        "expected a sized body"
    );
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The private scalar of an EC P-256 or Ed25519 PKCS#8 key file (what must never be
/// published); `None` for RSA (its private members are ruled out by name).
fn private_scalar(path: &Path) -> Option<Vec<u8>> {
    let der = pem::parse(std::fs::read(path).unwrap()).unwrap().into_contents();
    if path.to_string_lossy().ends_with("-eddsa.pem") {
        // PKCS#8 v1 Ed25519: a 16-byte prefix, then the 32-byte seed.
        assert_eq!(der.len(), 48);
        return Some(der[16..].to_vec());
    }
    if path.to_string_lossy().ends_with("-es256.pem") {
        // ECPrivateKey inside: version 1 (02 01 01), then the OCTET STRING (04 20) key.
        let at = der.windows(5).position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20]).expect("ECPrivateKey");
        return Some(der[at + 5..at + 5 + 32].to_vec());
    }
    None
}

/// Loads `dir`, so tests know each file's kid.
fn kid_of_file(dir: &Path, path: &Path) -> String {
    let keys = KeySet::load_dir(dir, None).unwrap();
    keys.keys().iter().find(|k| k.path == path).expect("key file loaded").kid.clone()
}

async fn jwks_publishes_every_key_and_nothing_private(backend: Backend) {
    // One key of each algorithm (the PostgreSQL variant starts with an RS256 key already).
    let Some(app) = spawn_app_with(backend, |s| {
        let dir = s.keys_dir();
        let has_rsa = std::fs::read_dir(&dir)
            .map(|entries| entries.flatten().any(|e| e.path().to_string_lossy().ends_with("-rs256.pem")))
            .unwrap_or(false);
        if !has_rsa {
            generate_key_file(&dir, SigningAlgorithm::RS256).unwrap();
        }
        generate_key_file(&dir, SigningAlgorithm::ES256).unwrap();
        generate_key_file(&dir, SigningAlgorithm::EdDSA).unwrap();
    })
    .await
    else {
        return;
    };
    let loaded = KeySet::load_dir(&app.settings.keys_dir(), None).unwrap();
    assert_eq!(loaded.keys().len(), 3);

    let response = get_jwks(&app).await;
    let document: Value = serde_json::from_str(&response.jwks_json).unwrap();
    assert_eq!(document.as_object().unwrap().keys().collect::<Vec<_>>(), ["keys"]);
    let published = document["keys"].as_array().unwrap();
    assert_eq!(published.len(), 3, "every loaded key: {document}");
    assert_eq!(response.keys.len(), 3);
    let expected_kids: BTreeSet<String> = loaded.keys().iter().map(|k| k.kid.clone()).collect();
    assert_eq!(kids(&response.jwks_json).into_iter().collect::<BTreeSet<_>>(), expected_kids);

    for (json, structured) in published.iter().zip(&response.keys) {
        let kty = json["kty"].as_str().unwrap();
        // Public members only: no `d`, `p`, `q`, `dp`, `dq`, `qi`, `oth`, `k`.
        let members: BTreeSet<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(members, allowed_members(kty), "{json}");
        assert_eq!(json["use"], "sig");
        let (alg, crv) = match kty {
            "RSA" => ("RS256", ""),
            "EC" => ("ES256", "P-256"),
            "OKP" => ("EdDSA", "Ed25519"),
            _ => unreachable!(),
        };
        assert_eq!(json["alg"], alg);
        // The structured keys say the same as the document, member by member.
        let member = |name: &str| json.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
        assert_eq!(structured.kty, kty);
        assert_eq!(structured.kid, member("kid"));
        assert_eq!(structured.r#use, "sig");
        assert_eq!(structured.alg, alg);
        assert_eq!(structured.crv, crv);
        assert_eq!(
            (&structured.n, &structured.e, &structured.x, &structured.y),
            (&member("n"), &member("e"), &member("x"), &member("y"))
        );
        match kty {
            "RSA" => assert!(!structured.n.is_empty() && structured.e == "AQAB"),
            "EC" => assert!(!structured.x.is_empty() && !structured.y.is_empty()),
            _ => assert!(!structured.x.is_empty() && structured.y.is_empty()),
        }
    }
    // The private scalars appear nowhere, neither in the document nor anywhere on the wire.
    let wire = response.encode_to_vec();
    for key in loaded.keys() {
        if let Some(secret) = private_scalar(&key.path) {
            assert!(!response.jwks_json.contains(&B64.encode(&secret)), "{} leaked", key.path.display());
            assert!(
                !wire.windows(secret.len()).any(|w| w == secret.as_slice()),
                "{} leaked",
                key.path.display()
            );
        }
    }

    // A token's kid is among them.
    let (access, _, _) = app.user_session("jwks").await;
    assert!(expected_kids.contains(&kid_of(&access)));

    // The same document over HTTP, cacheable.
    let ops = app.ops_addr.expect("ops server on by default");
    let (status, headers, body) = http_get(ops, "/.well-known/jwks.json").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(header(&headers, "cache-control"), Some("public, max-age=300"));
    assert_eq!(body, response.jwks_json);
    let (status, _, body) = http_get(ops, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, _, _) = http_get(ops, "/.well-known/nothing-here").await;
    assert_eq!(status, 404);
}

async fn rotation_keeps_old_tokens_until_their_key_is_removed(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (token_a, refresh_a, session) = app.user_session("rota").await;
    let session_id = session.session.unwrap().id;
    let kid_a = kid_of(&token_a);
    assert_eq!(kids(&get_jwks(&app).await.jwks_json), vec![kid_a.clone()]);
    let (settings, data) = (app.settings.clone(), app.data_handle());
    app.shutdown().await.unwrap();

    // Key B (another algorithm, so its file name cannot clash with A's), made the signer by
    // tokens.signing_kid; A stays loaded.
    let dir = settings.keys_dir();
    let path_a = KeySet::load_dir(&dir, None).unwrap().signer().path.clone();
    let path_b = generate_key_file(&dir, SigningAlgorithm::ES256).unwrap();
    let kid_b = kid_of_file(&dir, &path_b);
    let mut settings = settings;
    settings.tokens.signing_kid = Some(kid_b.clone());
    let app = spawn_with_settings(settings.clone(), data.clone()).await;

    let old = app.validate(&token_a).await;
    assert!(old.valid, "signed by the previous key, valid until it expires: {old:?}");
    assert_eq!(old.session_id, session_id);
    let token_b = app.login("rota").await.tokens.unwrap().access_token;
    assert_eq!(kid_of(&token_b), kid_b, "the new key signs new logins");
    assert!(app.validate(&token_b).await.valid);
    let refreshed = app.refresh(&refresh_a).await.expect("the session outlives the rotation");
    assert_eq!(kid_of(&refreshed.access_token), kid_b, "and refreshed tokens");
    let jwks = get_jwks(&app).await;
    assert_eq!(
        kids(&jwks.jwks_json).into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([kid_a.clone(), kid_b.clone()]),
        "both keys published"
    );
    assert_eq!(jwks.keys.len(), 2);
    let (_, _, body) = http_get(app.ops_addr.unwrap(), "/.well-known/jwks.json").await;
    assert_eq!(body, jwks.jwks_json);
    app.shutdown().await.unwrap();

    // Key A removed: its tokens no longer verify, B's still do.
    std::fs::remove_file(&path_a).unwrap();
    let app = spawn_with_settings(settings, data).await;
    let gone = app.validate(&token_a).await;
    assert!(!gone.valid);
    assert_eq!(reason(&gone), TokenInvalidReason::BadSignature);
    assert!(app.validate(&token_b).await.valid);
    assert_eq!(kids(&get_jwks(&app).await.jwks_json), [kid_b]);
}

/// The venv's Python when PyJWT is installed in it. Otherwise panics under CI, else reports
/// the test as skipped and returns `None`.
fn pyjwt_python() -> Option<PathBuf> {
    crate::support::installed_tool("PyJWT", crate::support::venv_python_with("jwt, cryptography"))
}

/// Runs verify_jwt.py expecting `audience` (the issuer is the server's); Ok(its JSON) when
/// PyJWT accepted the token, Err(its stderr) otherwise.
async fn pyjwt_verify(
    python: &Path,
    jwks_url: &str,
    token: &str,
    app: &TestApp,
    audience: &str,
) -> Result<Value, String> {
    let mut command = Command::new(python);
    command.arg(VERIFY_SCRIPT).arg(jwks_url).arg(token);
    command.args(["--audience", audience, "--issuer", &app.settings.tokens.issuer]);
    let output =
        tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("run verify_jwt.py");
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).expect("verify_jwt.py prints JSON"))
    } else {
        assert_eq!(output.status.code(), Some(1), "{}", String::from_utf8_lossy(&output.stderr));
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

async fn pyjwt_verifies_our_tokens_from_the_published_jwks(backend: Backend) {
    let Some(python) = pyjwt_python() else { return };
    let mut earlier: Option<String> = None;
    // One server per algorithm, each with a single key of its own.
    for (alg, name) in [
        (SigningAlgorithm::RS256, "RS256"),
        (SigningAlgorithm::ES256, "ES256"),
        (SigningAlgorithm::EdDSA, "EdDSA"),
    ] {
        let Some(app) = spawn_app_with(backend, |s| {
            let dir = s.data_dir.join(format!("keys-{name}"));
            generate_key_file(&dir, alg).unwrap();
            s.tokens.keys_dir = Some(dir);
        })
        .await
        else {
            return;
        };
        let username = format!("py{}", name.to_lowercase());
        let (access, _, session) = app.user_session(&username).await;
        let user_id = session.user.unwrap().id;
        let session_id = session.session.unwrap().id;
        let url = format!("http://{}/.well-known/jwks.json", app.ops_addr.unwrap());

        let audience = app.settings.tokens.audience.clone();
        let verified = pyjwt_verify(&python, &url, &access, &app, &audience)
            .await
            .unwrap_or_else(|error| panic!("PyJWT refused our {name} token: {error}"));
        assert_eq!(verified["alg"], name);
        assert_eq!(verified["kid"], kid_of(&access));
        let claims = &verified["claims"];
        assert_eq!(claims["sub"], user_id.as_str());
        assert_eq!(claims["sid"], session_id.as_str());
        assert_eq!(claims["amr"], serde_json::json!(["pwd"]));
        assert_eq!(claims["iss"], app.settings.tokens.issuer.as_str());
        assert_eq!(claims["aud"], app.settings.tokens.audience.as_str());

        // Controls: the same verifier refuses a tampered token, a wrong audience, and a token
        // of another server's key (its kid is not in this JWKS).
        let mut parts: Vec<String> = access.split('.').map(str::to_owned).collect();
        let mut payload: Value = serde_json::from_slice(&B64.decode(&parts[1]).unwrap()).unwrap();
        payload["amr"] = serde_json::json!(["pwd", "otp"]);
        parts[1] = B64.encode(payload.to_string());
        let error = pyjwt_verify(&python, &url, &parts.join("."), &app, &audience).await.unwrap_err();
        assert!(error.contains("InvalidSignatureError"), "{error}");
        let error = pyjwt_verify(&python, &url, &access, &app, "someone-else").await.unwrap_err();
        assert!(error.contains("InvalidAudienceError"), "{error}");
        if let Some(earlier) = earlier.replace(access) {
            let error = pyjwt_verify(&python, &url, &earlier, &app, &audience).await.unwrap_err();
            assert!(error.contains("0 keys in the JWKS have kid"), "{error}");
        }
    }
}
