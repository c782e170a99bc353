//! `spawn_app`: a server on a random port over a fresh database, and typed clients for it.

use std::{future::Future, net::SocketAddr, time::Duration};

use portcullis::{
    api::pb::{
        self, auth_service_client::AuthServiceClient, login_response::Outcome,
        session_service_client::SessionServiceClient,
    },
    config::Settings,
    startup::Application,
    token::{SigningAlgorithm, keys::generate_key_file},
};
use tokio::sync::oneshot;
use tonic::{Request, transport::Channel};

use crate::support;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file + in-memory hot state: what `cargo run` serves.
    Embedded,
    /// PostgreSQL (a fresh database) + Redis (a fresh key prefix).
    Postgres,
}

/// Generates `mod <name> { embedded(); postgres(); }` running `<name>(Backend)` on each.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name($crate::harness::Backend::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::harness::Backend::Postgres).await
            }
        }
    )*};
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The ops HTTP server's address (`None` when `server.ops_enabled` is off).
    pub ops_addr: Option<SocketAddr>,
    pub auth: AuthServiceClient<Channel>,
    pub sessions: SessionServiceClient<Channel>,
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _data: std::sync::Arc<tempfile::TempDir>,
}

pub const PASSWORD: &str = "correct horse battery staple";

/// Settings for a test server; `None` (after printing why) when the backend is not
/// configured in this environment.
pub async fn test_settings(backend: Backend) -> Option<(Settings, tempfile::TempDir)> {
    let data = tempfile::tempdir().expect("tempdir");
    let mut settings = Settings { data_dir: data.path().to_path_buf(), ..Settings::default() };
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.server.ops_listen = "127.0.0.1:0".parse().unwrap();
    settings.server.health_check_interval = Duration::from_millis(200);
    settings.server.shutdown_grace = Duration::from_secs(5);
    settings.password.bcrypt_cost = 4;
    settings.sessions.activity_flush_interval = Duration::from_millis(100);
    settings.log.filter = "warn".into();
    // Most tests log in right after registering; the verification tests switch it on.
    settings.login.require_verified_email = false;
    settings.mail.poll_interval = Duration::from_millis(100);
    // Every test logs in from one address: the brute-force defences get budgets no test
    // reaches by accident; the tests of those defences set their own.
    relax_defences(&mut settings);
    if backend == Backend::Postgres {
        let Some(database_url) = support::fresh_postgres_url().await else {
            support::skip("PostgreSQL + Redis variant");
            return None;
        };
        let Some(redis_url) = support::redis_url() else {
            support::skip("PostgreSQL + Redis variant");
            return None;
        };
        settings.database_url = Some(database_url);
        settings.redis_url = Some(redis_url);
        settings.redis.key_prefix = format!("test:{}:", uuid::Uuid::new_v4().simple());
        // Production never generates secrets: provide them as an operator would.
        settings.password.pepper = Some("c2VjcmV0LXBlcHBlci1mb3ItdGVzdHMtMzItYnl0ZXMtbG9uZw==".into());
        generate_key_file(&settings.keys_dir(), SigningAlgorithm::RS256).expect("generate key");
    }
    Some((settings, data))
}

/// Limits and lockouts out of the way of tests that are not about them.
pub fn relax_defences(settings: &mut Settings) {
    use portcullis::config::RateLimit;
    let generous = RateLimit::new(10_000, Duration::from_secs(60), Duration::ZERO);
    settings.login.account_lockout.max_failures = 100;
    settings.login.known_device_lockout.max_failures = 100;
    settings.login.ip_block = generous;
    settings.login.client_throttle = generous;
    let limits = &mut settings.limits;
    for limit in [
        &mut limits.register_per_ip,
        &mut limits.forgot_password_per_account,
        &mut limits.forgot_password_per_ip,
        &mut limits.resend_verification_per_account,
        &mut limits.resend_verification_per_ip,
        &mut limits.verify_mfa_per_challenge,
        &mut limits.new_device_alerts_per_account,
        &mut limits.login_codes_per_account,
    ] {
        *limit = generous;
    }
}

/// Spawns a server with test settings adjusted by `tweak`.
pub async fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> Option<TestApp> {
    let (mut settings, data) = test_settings(backend).await?;
    tweak(&mut settings);
    Some(spawn_with_settings(settings, std::sync::Arc::new(data)).await)
}

/// A server whose mail goes over SMTP to a real SMTP server (aiosmtpd), and that requires
/// verified email addresses to log in.
pub async fn spawn_app_with_mail(
    backend: Backend,
    tweak: impl FnOnce(&mut Settings),
) -> Option<(TestApp, support::SmtpSink)> {
    let sink = support::SmtpSink::start()?;
    let url = sink.url();
    let app = spawn_app_with(backend, |s| {
        s.mail.smtp_url = Some(url);
        s.mail.frontend_base_url = "https://app.example.test".into();
        s.mail.initial_backoff = Duration::from_millis(100);
        s.mail.max_backoff = Duration::from_millis(400);
        s.login.require_verified_email = true;
        tweak(s);
    })
    .await?;
    Some((app, sink))
}

pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |_| {}).await
}

pub async fn spawn_with_settings(settings: Settings, data: std::sync::Arc<tempfile::TempDir>) -> TestApp {
    portcullis::telemetry::init(&settings.log);
    let app = Application::build(settings.clone()).await.expect("server builds");
    let addr = app.local_addr();
    let ops_addr = app.ops_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run(async move {
        _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect");
    TestApp {
        addr,
        ops_addr,
        auth: AuthServiceClient::new(channel.clone()),
        sessions: SessionServiceClient::new(channel),
        settings,
        stop: Some(stop),
        server: Some(server),
        _data: data,
    }
}

impl TestApp {
    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect_lazy()
    }

    pub fn data_handle(&self) -> std::sync::Arc<tempfile::TempDir> {
        self._data.clone()
    }

    /// Triggers graceful shutdown and waits for the server to stop.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.trigger_shutdown();
        self.server.take().unwrap().await.expect("server task")
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            _ = stop.send(());
        }
    }

    pub fn take_server(&mut self) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        self.server.take().unwrap()
    }

    /// Registers `username` with [`PASSWORD`] and `<username>@example.com`.
    pub async fn register(&self, username: &str) -> pb::User {
        let mut client = self.auth.clone();
        client
            .register(pb::RegisterRequest {
                username: username.into(),
                email: format!("{username}@example.com"),
                password: PASSWORD.into(),
                first_name: "Test".into(),
                last_name: "User".into(),
                client: None,
            })
            .await
            .expect("register")
            .into_inner()
            .user
            .expect("user")
    }

    pub async fn try_login(
        &self,
        identifier: &str,
        password: &str,
    ) -> Result<pb::AuthenticatedSession, tonic::Status> {
        let mut client = self.auth.clone();
        let response = client
            .login(pb::LoginRequest {
                identifier: identifier.into(),
                password: password.into(),
                client: Some(pb::ClientContext {
                    ip_address: "203.0.113.7".into(),
                    user_agent: FIREFOX.into(),
                    device_fingerprint: "fp-test".into(),
                }),
            })
            .await?
            .into_inner();
        match response.outcome {
            Some(Outcome::Authenticated(session)) => Ok(session),
            Some(Outcome::MfaRequired(_)) => panic!("login asked for a second factor"),
            None => panic!("login answered without an outcome"),
        }
    }

    pub async fn login(&self, identifier: &str) -> pb::AuthenticatedSession {
        self.try_login(identifier, PASSWORD).await.expect("login")
    }

    /// Registers and logs in a fresh user; returns (access token, refresh token, session).
    pub async fn user_session(&self, username: &str) -> (String, String, pb::AuthenticatedSession) {
        self.register(username).await;
        let session = self.login(username).await;
        let tokens = session.tokens.clone().unwrap();
        (tokens.access_token, tokens.refresh_token, session)
    }

    pub async fn validate(&self, token: &str) -> pb::ValidateTokenResponse {
        self.validate_roles(token, &[]).await
    }

    pub async fn validate_roles(&self, token: &str, roles: &[&str]) -> pb::ValidateTokenResponse {
        let mut client = self.auth.clone();
        client
            .validate_token(pb::ValidateTokenRequest {
                token: token.into(),
                required_roles: roles.iter().map(|r| r.to_string()).collect(),
            })
            .await
            .expect("ValidateToken answers")
            .into_inner()
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<pb::TokenPair, tonic::Status> {
        let mut client = self.auth.clone();
        let response =
            client.refresh(pb::RefreshRequest { refresh_token: refresh_token.into(), client: None }).await?;
        Ok(response.into_inner().tokens.expect("tokens"))
    }

    pub async fn list_sessions(&self, access: &str) -> Result<Vec<pb::Session>, tonic::Status> {
        let mut client = self.sessions.clone();
        Ok(client.list_sessions(bearer(pb::ListSessionsRequest {}, access)).await?.into_inner().sessions)
    }

    pub async fn logout(&self, access: &str) -> Result<(), tonic::Status> {
        let mut client = self.auth.clone();
        client.logout(bearer(pb::LogoutRequest {}, access)).await.map(|_| ())
    }

    /// Opens the same kind of store the server uses, for assertions on stored state.
    pub async fn store(&self) -> portcullis::store::DynStore {
        portcullis::startup::connect_store(&self.settings).await.expect("store")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.trigger_shutdown();
    }
}

pub const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0";

/// A request carrying `authorization: Bearer <token>`.
pub fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

pub fn reason(response: &pb::ValidateTokenResponse) -> pb::TokenInvalidReason {
    pb::TokenInvalidReason::try_from(response.reason).expect("known reason")
}

/// The `ErrorInfo.reason` of a status.
pub fn error_reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

/// The fields named by a status's `BadRequest` details.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
