//! The validator (sidecar) mode beside a full server: same answers for ValidateToken and
//! ext_authz, keys from the central instance's JWKS (or a file), revocations through Redis,
//! no database.

use std::{sync::Arc, time::Duration};

use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context, authorization_client::AuthorizationClient,
};
use portcullis::{
    api::pb::{self, TokenInvalidReason, auth_service_client::AuthServiceClient},
    startup::ValidatorApp,
};
use tonic::{Code, transport::Channel};

use crate::harness::{Backend, TestApp, eventually, reason, spawn_with_settings, test_settings};

struct Sidecar {
    auth: AuthServiceClient<Channel>,
    channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A validator next to `central`, sharing its Redis (and prefix), keys from its GetJwks.
async fn sidecar(central: &TestApp, tweak: impl FnOnce(&mut portcullis::config::Settings)) -> Sidecar {
    let mut settings = central.settings.clone();
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.database_url = Some("postgres://unused.invalid/none".into()); // never touched
    settings.validator.central_url = Some(format!("http://{}", central.addr));
    tweak(&mut settings);
    let app = ValidatorApp::build(settings).await.expect("validator builds");
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run(async move {
        _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    Sidecar { auth: AuthServiceClient::new(channel.clone()), channel, stop: Some(stop) }
}

impl Sidecar {
    async fn validate(&self, token: &str) -> pb::ValidateTokenResponse {
        let mut auth = self.auth.clone();
        auth.validate_token(pb::ValidateTokenRequest { token: token.into(), required_roles: vec![] })
            .await
            .expect("the validator answers")
            .into_inner()
    }

    async fn check(&self, token: &str) -> i32 {
        let mut client = AuthorizationClient::new(self.channel.clone());
        let mut headers = std::collections::HashMap::new();
        headers.insert("authorization".to_string(), format!("Bearer {token}"));
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest { headers, ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        client.check(request).await.expect("Check answers").into_inner().status.map_or(0, |s| s.code)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_follows_the_central_instance() {
    let Some((settings, data)) = test_settings(Backend::Postgres).await else { return };
    let central = spawn_with_settings(settings, Arc::new(data)).await;
    let validator = sidecar(&central, |_| {}).await;

    let (access, _, _) = central.user_session("vera").await;
    let answer = validator.validate(&access).await;
    assert!(answer.valid, "a login on the server validates on the validator: {answer:?}");
    assert_eq!(answer, central.validate(&access).await, "the same answer as the server's");
    assert_eq!(validator.check(&access).await, Code::Ok as i32, "ext_authz allows it");

    // The same public keys, and nothing else served.
    let mut sidecar_auth = validator.auth.clone();
    let jwks = sidecar_auth.get_jwks(pb::GetJwksRequest {}).await.unwrap().into_inner();
    let mut central_auth = central.auth.clone();
    let central_jwks = central_auth.get_jwks(pb::GetJwksRequest {}).await.unwrap().into_inner();
    assert_eq!(jwks.keys, central_jwks.keys);
    assert!(!jwks.jwks_json.contains("\"d\""), "no private member");
    let refused = sidecar_auth.register(pb::RegisterRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented);

    // A logout on the server: refused by the validator within the bound.
    central.logout(&access).await.unwrap();
    assert!(
        eventually(Duration::from_secs(1), || async {
            reason(&validator.validate(&access).await) == TokenInvalidReason::SessionRevoked
        })
        .await,
        "the validator refuses the logged-out token"
    );
    assert_eq!(validator.check(&access).await, Code::Unauthenticated as i32);
    // A forged token is refused by both.
    let forged = format!("{access}x");
    assert!(!validator.validate(&forged).await.valid);
}

/// Keys from a JWKS file (as `portcullis keys jwks` prints it); a token of a key the file
/// does not hold is refused until the file has it (an unknown `kid` makes the validator
/// read its key source again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_takes_its_keys_from_a_file_and_follows_a_rotation() {
    let Some((settings, data)) = test_settings(Backend::Postgres).await else { return };
    let central = spawn_with_settings(settings, Arc::new(data)).await;
    let mut central_auth = central.auth.clone();
    let jwks = central_auth.get_jwks(pb::GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, &jwks).unwrap();
    let validator = sidecar(&central, |s| {
        s.validator.central_url = None;
        s.validator.jwks_file = Some(file.clone());
        s.validator.jwks_min_refresh = Duration::ZERO;
    })
    .await;
    let (access, _, session) = central.user_session("wren").await;
    assert!(validator.validate(&access).await.valid);

    // A new key (ES256 here) signs a token for that session; the file does not list it yet.
    let new_keys = tempfile::tempdir().unwrap();
    portcullis::token::keys::generate_key_file(new_keys.path(), portcullis::token::SigningAlgorithm::ES256)
        .unwrap();
    let signer = portcullis::token::AccessTokens::new(
        portcullis::token::KeySet::load_dir(new_keys.path(), None).unwrap(),
        &central.settings.tokens,
    )
    .unwrap();
    let session = session.session.unwrap();
    let subject = portcullis::token::access::Subject {
        user_id: session_user(&central, "wren").await,
        session_id: session.id.parse().unwrap(),
        roles: &[],
        amr: &["pwd"],
        email_verified: false,
    };
    let (rotated, _) = signer.issue(&subject, time::OffsetDateTime::now_utc()).unwrap();
    assert_eq!(reason(&validator.validate(&rotated).await), TokenInvalidReason::BadSignature);

    // The file now lists both keys: the unknown kid makes the validator read it again.
    let mut both: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let new: serde_json::Value = serde_json::from_str(&signer.keys().jwks().to_json()).unwrap();
    both["keys"].as_array_mut().unwrap().extend(new["keys"].as_array().unwrap().iter().cloned());
    std::fs::write(&file, both.to_string()).unwrap();
    assert!(validator.validate(&rotated).await.valid, "the rotated key is picked up");
    assert!(validator.validate(&access).await.valid, "the previous key still verifies");
}

async fn session_user(app: &TestApp, username: &str) -> uuid::Uuid {
    app.store().await.find_user_by_login(username).await.unwrap().unwrap().id
}
