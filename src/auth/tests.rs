//! Flow-level tests for what the gRPC tests cannot provoke on demand: the hot state failing
//! between the store's commit and the publication of a revocation.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use uuid::Uuid;

use super::*;
use crate::{
    config::{SessionSettings, TokenSettings},
    hot::{HotError, HotState, Limit, LimitDecision, MemoryHotState},
    password::{PasswordHasher, PasswordPolicy},
    store::{SqliteStore, Store},
    token::{AccessTokens, KeySet, SigningAlgorithm, keys::generate_key_file},
};

/// The in-memory hot state, with a switch that makes every call fail like a dead Redis.
#[derive(Default)]
struct FlakyHot {
    inner: MemoryHotState,
    down: AtomicBool,
}

impl FlakyHot {
    fn check(&self) -> Result<(), HotError> {
        if self.down.load(Ordering::SeqCst) {
            let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "hot state down");
            return Err(HotError::Unavailable(io.into()));
        }
        Ok(())
    }
}

#[async_trait]
impl HotState for FlakyHot {
    async fn ping(&self) -> Result<(), HotError> {
        self.check()
    }
    async fn revoke_session(&self, session_id: Uuid, ttl: Duration) -> Result<(), HotError> {
        self.check()?;
        self.inner.revoke_session(session_id, ttl).await
    }
    async fn is_session_revoked(&self, session_id: Uuid) -> Result<bool, HotError> {
        self.check()?;
        self.inner.is_session_revoked(session_id).await
    }
    async fn limit_hit(&self, key: &str, limit: Limit, member: &str) -> Result<LimitDecision, HotError> {
        self.check()?;
        self.inner.limit_hit(key, limit, member).await
    }
    async fn limit_refund(&self, key: &str, member: &str) -> Result<(), HotError> {
        self.check()?;
        self.inner.limit_refund(key, member).await
    }
    async fn limit_peek(&self, key: &str, limit: Limit) -> Result<LimitDecision, HotError> {
        self.check()?;
        self.inner.limit_peek(key, limit).await
    }
    async fn limit_clear(&self, key: &str) -> Result<(), HotError> {
        self.check()?;
        self.inner.limit_clear(key).await
    }
}

struct Harness {
    auth: Arc<Auth>,
    hot: Arc<FlakyHot>,
    _keys: tempfile::TempDir,
}

async fn harness(sessions: SessionSettings) -> Harness {
    let store = SqliteStore::connect("sqlite::memory:", 1, Duration::from_secs(5), Duration::from_secs(5))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    generate_key_file(keys.path(), SigningAlgorithm::EdDSA).unwrap();
    let tokens =
        AccessTokens::new(KeySet::load_dir(keys.path(), None).unwrap(), &TokenSettings::default()).unwrap();
    let hot = Arc::new(FlakyHot::default());
    let auth = Auth::new(AuthParts {
        store: Arc::new(store),
        hot: hot.clone(),
        hasher: PasswordHasher::new(&[9; 32], 4, 2, Duration::from_secs(5)).await.unwrap(),
        policy: PasswordPolicy::new(12, 256),
        tokens,
        activity: Arc::new(ActivityRecorder::default()),
        sessions,
        leeway: Duration::from_secs(30),
        mail: crate::config::MailSettings::default(),
        outbox: Arc::new(tokio::sync::Notify::new()),
        login: crate::config::LoginSettings { require_verified_email: false, ..Default::default() },
        limits: crate::config::LimitSettings::default(),
        mfa: crate::config::MfaSettings::default(),
        server_secret: vec![7; 32],
        geo: None,
    });
    Harness { auth: Arc::new(auth), hot, _keys: keys }
}

const PASSWORD: &str = "a perfectly fine password";

impl Harness {
    async fn user(&self, name: &str) {
        let registration = Registration {
            username: name.into(),
            email: format!("{name}@example.com"),
            password: PASSWORD.into(),
            ..Registration::default()
        };
        self.auth.register(registration, &ClientInfo::default()).await.unwrap();
    }

    async fn login(&self, name: &str) -> LoginOutcome {
        match self.auth.login(name, PASSWORD, &ClientInfo::default()).await.unwrap() {
            LoginResult::Authenticated(outcome) => *outcome,
            LoginResult::MfaRequired(_) => panic!("no second factor was enabled"),
        }
    }

    async fn check(&self, access: &str) -> TokenCheck {
        self.auth.validate_token(access, &[]).await.unwrap()
    }

    fn set_down(&self, down: bool) {
        self.hot.down.store(down, Ordering::SeqCst);
    }
}

const REVOKED: TokenCheck = TokenCheck::Invalid(InvalidReason::SessionRevoked);

#[tokio::test]
async fn a_retried_revoke_all_publishes_what_the_failed_attempt_committed() {
    let h = harness(SessionSettings::default()).await;
    h.user("alice").await;
    let (a, b) = (h.login("alice").await, h.login("alice").await);
    let principal = h.auth.authenticate(Some(&a.tokens.access.token)).await.unwrap();

    h.set_down(true);
    assert!(matches!(h.auth.revoke_sessions(&principal, false).await, Err(AuthError::Unavailable(_))));
    h.set_down(false);
    // Committed in the store, not yet visible: the caller was told to retry.
    assert!(matches!(h.check(&b.tokens.access.token).await, TokenCheck::Valid(_)));

    assert_eq!(h.auth.revoke_sessions(&principal, false).await.unwrap(), 0, "nothing new to revoke");
    assert_eq!(h.check(&a.tokens.access.token).await, REVOKED);
    assert_eq!(h.check(&b.tokens.access.token).await, REVOKED, "the retry published it");
}

#[tokio::test]
async fn a_replay_detected_while_the_hot_state_was_down_is_published_on_the_next_attempt() {
    let h =
        harness(SessionSettings { refresh_reuse_grace: Duration::ZERO, ..SessionSettings::default() }).await;
    h.user("bob").await;
    let login = h.login("bob").await;
    let stolen = login.tokens.refresh_token.clone();
    let legit = h.auth.refresh(&stolen).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;

    h.set_down(true);
    // Detected and committed; only the publication waits (the answer is the same).
    assert!(matches!(h.auth.refresh(&stolen).await, Err(AuthError::InvalidRefreshToken)));
    h.set_down(false);
    assert!(matches!(h.auth.refresh(&stolen).await, Err(AuthError::InvalidRefreshToken)));
    assert_eq!(h.check(&legit.access.token).await, REVOKED);
}

#[tokio::test]
async fn the_reconciler_republishes_once_the_hot_state_answers_again() {
    let h = harness(SessionSettings::default()).await;
    h.user("carol").await;
    let login = h.login("carol").await;
    let principal = h.auth.authenticate(Some(&login.tokens.access.token)).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let reconciler = {
        let auth = h.auth.clone();
        tokio::spawn(async move {
            auth.reconcile_revocations(Duration::from_secs(3600), async move {
                _ = stopped.await;
            })
            .await
        })
    };

    h.set_down(true);
    assert!(h.auth.logout(&principal).await.is_err());
    assert!(h.auth.validate_token(&login.tokens.access.token, &[]).await.is_err(), "fails closed while down");
    h.set_down(false);

    // Nobody retries the logout: the reconciler alone must make it visible, long before
    // its hourly schedule.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.check(&login.tokens.access.token).await != REVOKED {
        assert!(tokio::time::Instant::now() < deadline, "revocation never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(()).unwrap();
    reconciler.await.unwrap();
}

#[tokio::test]
async fn registration_debug_output_hides_the_password() {
    let registration =
        Registration { username: "u".into(), password: "hunter2-secret".into(), ..Default::default() };
    assert!(!format!("{registration:?}").contains("hunter2"));
}
