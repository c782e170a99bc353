use portcullis::api::pb;
use tonic::Code;

use crate::{
    harness::{Backend, PASSWORD, error_reason, spawn_app, violated_fields},
    on_both_backends,
};

on_both_backends!(
    register_returns_the_account_without_secrets,
    duplicates_are_already_exists,
    bad_input_names_every_field
);

fn request(username: &str, email: &str, password: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        username: username.into(),
        email: email.into(),
        password: password.into(),
        first_name: "Ada".into(),
        last_name: "Lovelace".into(),
        client: None,
    }
}

async fn register_returns_the_account_without_secrets(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let mut client = app.auth.clone();
    let user = client
        .register(request("Ada.L", "Ada@Example.COM", PASSWORD))
        .await
        .expect("register")
        .into_inner()
        .user
        .unwrap();
    assert_eq!(user.username, "Ada.L");
    assert_eq!(user.email, "Ada@example.com", "the domain is lowercased, the local part kept");
    assert_eq!((user.first_name.as_str(), user.last_name.as_str()), ("Ada", "Lovelace"));
    assert!(!user.email_verified);
    assert!(user.roles.is_empty(), "no roles are granted at sign-up");
    assert!(uuid::Uuid::parse_str(&user.id).is_ok());

    let stored = app.store().await.find_user(user.id.parse().unwrap()).await.unwrap().unwrap();
    assert!(stored.password_hash.starts_with("hmac-sha256:$2b$"), "peppered bcrypt at rest");
    assert!(!stored.password_hash.contains(PASSWORD));
}

async fn duplicates_are_already_exists(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let mut client = app.auth.clone();
    client.register(request("alice", "alice@example.com", PASSWORD)).await.expect("first");

    let same_name = client.register(request("ALICE", "other@example.com", PASSWORD)).await.unwrap_err();
    assert_eq!(same_name.code(), Code::AlreadyExists);
    assert_eq!(error_reason(&same_name), "USERNAME_TAKEN");
    assert_eq!(violated_fields(&same_name), ["username"]);

    let same_email = client.register(request("alice2", "Alice@EXAMPLE.com", PASSWORD)).await.unwrap_err();
    assert_eq!(same_email.code(), Code::AlreadyExists);
    assert_eq!(error_reason(&same_email), "EMAIL_TAKEN");
    assert_eq!(violated_fields(&same_email), ["email"]);
}

async fn bad_input_names_every_field(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let mut client = app.auth.clone();

    let empty = client.register(pb::RegisterRequest::default()).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&empty), ["username", "email", "password"]);

    let cases: &[(pb::RegisterRequest, &str)] = &[
        (request("bob", "not-an-email", PASSWORD), "email"),
        (request("bob", "bob@example", PASSWORD), "email"),
        (request("b", "bob@example.com", PASSWORD), "username"),
        (request("bob smith", "bob@example.com", PASSWORD), "username"),
        (request(&"b".repeat(33), "bob@example.com", PASSWORD), "username"),
        (request("bob", "bob@example.com", "short-pw"), "password"),
        (request("bob", "bob@example.com", "password1234"), "password"),
        (request("bob", "bob@example.com", &"x".repeat(10_000)), "password"),
        (request("bob", &format!("{}@example.com", "b".repeat(300)), PASSWORD), "email"),
        (
            pb::RegisterRequest {
                first_name: "n".repeat(101),
                ..request("bob", "bob@example.com", PASSWORD)
            },
            "first_name",
        ),
    ];
    for (req, field) in cases {
        let status = client.register(req.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(violated_fields(&status), [*field], "{status:?}");
        assert!(status.message().contains(field), "the message names the field: {}", status.message());
    }

    // 128 characters are accepted (ASVS 2.1.2).
    client
        .register(request("longpw", "longpw@example.com", &"Lp9-".repeat(32)))
        .await
        .expect("128-character password");
}
