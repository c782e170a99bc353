//! Observability: `/metrics` after real calls, `/readyz` (and `/readyz?exclude=database`) as
//! dependencies come and go and during shutdown, `x-request-id` (timed-out calls included),
//! Redis errors counted when the revocation copy answers, the validator's ops port, and logs
//! that never hold a secret (captured with a subscriber of the test's own).
//!
//! Metrics are process-wide and `cargo test` runs every test of this binary in one process,
//! so assertions compare a scrape before and after the calls (at least so much more)
//! rather than absolute values.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use portcullis::{
    api::pb::{self, account_service_client::AccountServiceClient, auth_service_client::AuthServiceClient},
    config::RateLimit,
    hot::{HotState, RedisHotState},
    startup::ValidatorApp,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, transport::Channel};

use crate::{
    email::{forgot, reset},
    harness::{
        Backend, FIREFOX, PASSWORD, TestApp, bearer, eventually, spawn_app, spawn_app_with,
        spawn_with_settings, test_settings,
    },
    on_both_backends, support,
};

on_both_backends!(
    metrics_count_calls_logins_lockouts_limits_and_revocations,
    request_ids_are_echoed_or_made,
    the_validator_serves_the_ops_routes,
);

/// A plain HTTP/1.1 GET on the ops port: (status, content type, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the ops port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, content_type, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    body
}

/// The sum of the samples of `name` whose labels include `labels` (0 when there is none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let wanted = labels
                .iter()
                .all(|(key, value)| label_text.split(',').any(|pair| pair == format!("{key}=\"{value}\"")));
            (metric == name && wanted).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// How much a sample grew between two scrapes.
fn grew(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(after, name, labels) - sample(before, name, labels)
}

const VALIDATE: &str = "portcullis.v1.AuthService/ValidateToken";
const LOGIN: &str = "portcullis.v1.AuthService/Login";

async fn metrics_count_calls_logins_lockouts_limits_and_revocations(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.login.account_lockout.max_failures = 2;
        s.limits.register_per_ip = RateLimit::new(2, Duration::from_secs(3600), Duration::ZERO);
    })
    .await
    else {
        return;
    };
    let ops = app.ops_addr.expect("ops server on by default");
    let before = scrape(ops).await;

    let (access, _, _) = app.user_session("ada").await;
    for _ in 0..3 {
        assert!(app.validate(&access).await.valid);
    }
    // An invalid token is an answer (OK), not an error.
    assert!(!app.validate("not.a.token").await.valid);
    // Two wrong passwords use up the budget of 2 and lock; the right one is then refused.
    app.register("bob").await;
    for _ in 0..2 {
        let status = app.try_login("bob", "wrong password, sorry").await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let locked = app.try_login("bob", PASSWORD).await.unwrap_err();
    assert_eq!(locked.code(), Code::ResourceExhausted);
    // Registrations per address: ada and bob took the 2 allowed.
    let mut auth = app.auth.clone();
    let refused = auth
        .register(pb::RegisterRequest {
            username: "cid".into(),
            email: "cid@example.com".into(),
            password: PASSWORD.into(),
            first_name: "C".into(),
            last_name: "D".into(),
            client: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    app.logout(&access).await.unwrap();

    let after = scrape(ops).await;
    let requests = "portcullis_grpc_requests_total";
    assert!(grew(&before, &after, requests, &[("method", VALIDATE), ("code", "OK")]) >= 4.0, "{after}");
    assert!(
        grew(
            &before,
            &after,
            "portcullis_grpc_request_duration_seconds_count",
            &[("method", VALIDATE), ("code", "OK")]
        ) >= 4.0,
        "{after}"
    );
    // Errors are trailers-only answers (the status in the headers); successes end with
    // trailers: both are counted by their code.
    assert!(grew(&before, &after, requests, &[("method", LOGIN), ("code", "OK")]) >= 1.0);
    assert!(grew(&before, &after, requests, &[("method", LOGIN), ("code", "UNAUTHENTICATED")]) >= 2.0);
    assert!(grew(&before, &after, requests, &[("method", LOGIN), ("code", "RESOURCE_EXHAUSTED")]) >= 1.0);
    let logins = "portcullis_logins_total";
    assert!(grew(&before, &after, logins, &[("outcome", "ok")]) >= 1.0);
    assert!(grew(&before, &after, logins, &[("outcome", "invalid_credentials")]) >= 2.0);
    assert!(grew(&before, &after, logins, &[("outcome", "locked")]) >= 1.0);
    assert!(grew(&before, &after, "portcullis_lockouts_total", &[("budget", "account")]) >= 1.0);
    assert!(grew(&before, &after, "portcullis_rate_limited_total", &[("limit", "register_per_ip")]) >= 1.0);
    assert!(grew(&before, &after, "portcullis_revocations_total", &[("cause", "logout")]) >= 1.0);
    // Metrics without labels are there from the start (labelled ones from their first
    // series).
    for (name, kind) in [
        ("portcullis_outbox_backlog", "gauge"),
        ("portcullis_mail_delivered", "counter"),
        ("portcullis_hot_state_errors", "counter"),
        ("portcullis_build_info", "gauge"),
    ] {
        assert!(after.contains(&format!("# TYPE {name} {kind}\n")), "{name} missing:\n{after}");
    }
    // Nothing a caller sends makes a series: an unknown method is `unknown`.
    let mut unknown = tonic::client::Grpc::new(app.channel());
    unknown.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/evil.Service/Made-Up-1234");
    let answer: Result<tonic::Response<pb::GetJwksResponse>, _> =
        unknown.unary(Request::new(pb::GetJwksRequest {}), path, tonic_prost::ProstCodec::default()).await;
    assert_eq!(answer.unwrap_err().code(), Code::Unimplemented);
    let last = scrape(ops).await;
    assert!(!last.contains("Made-Up-1234"));
    assert!(grew(&after, &last, requests, &[("method", "unknown"), ("code", "UNIMPLEMENTED")]) >= 1.0);
}

async fn request_ids_are_echoed_or_made(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let mut auth = app.auth.clone();
    let validate = || pb::ValidateTokenRequest { token: "whatever".into(), required_roles: vec![] };

    let mut request = Request::new(validate());
    request.metadata_mut().insert("x-request-id", "trace-me-42".parse().unwrap());
    let answer = auth.validate_token(request).await.unwrap();
    assert_eq!(answer.metadata().get("x-request-id").unwrap(), "trace-me-42");

    // None sent (or one we will not log as it is): a UUIDv4 of ours, new for each call.
    let made = |response: &tonic::metadata::MetadataMap| {
        let id = response.get("x-request-id").expect("x-request-id").to_str().unwrap().to_owned();
        assert_eq!(uuid::Uuid::parse_str(&id).expect("a UUID").get_version_num(), 4, "{id}");
        id
    };
    let first = made(auth.validate_token(validate()).await.unwrap().metadata());
    let second = made(auth.validate_token(validate()).await.unwrap().metadata());
    assert_ne!(first, second);
    let mut request = Request::new(validate());
    request.metadata_mut().insert("x-request-id", "x".repeat(200).parse().unwrap());
    made(auth.validate_token(request).await.unwrap().metadata());

    // Errors (trailers-only answers) carry it too.
    let mut request = Request::new(pb::LogoutRequest {});
    request.metadata_mut().insert("x-request-id", "err-7".parse().unwrap());
    let status = auth.logout(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "err-7");
}

async fn the_validator_serves_the_ops_routes(backend: Backend) {
    let Some(central) = spawn_app(backend).await else { return };
    let (access, _, _) = central.user_session("val").await;
    let mut settings = central.settings.clone();
    settings.database_url = Some("postgres://unused.invalid/none".into()); // never touched
    settings.validator.central_url = Some(format!("http://{}", central.addr));
    // The embedded variant has no Redis to share: a local trial.
    settings.allow_memory_hot_state = true;
    let validator = ValidatorApp::build(settings).await.expect("validator builds");
    let (addr, ops) = (validator.local_addr(), validator.ops_addr().expect("ops server on by default"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(validator.run(async move {
        _ = stopped.await;
    }));

    let before = scrape(ops).await;
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let answer = AuthServiceClient::new(channel)
        .validate_token(pb::ValidateTokenRequest { token: access, required_roles: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.valid);
    let after = scrape(ops).await;
    assert!(
        grew(&before, &after, "portcullis_grpc_requests_total", &[("method", VALIDATE), ("code", "OK")])
            >= 1.0
    );
    assert_eq!(http_get(ops, "/healthz").await.0, 200);
    let (status, _, body) = http_get(ops, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    // The probe path the chart uses for the server suits the validator too.
    assert_eq!(http_get(ops, "/readyz?exclude=database").await.0, 200);
    // The key set the validator fetched: the central's.
    let (status, content_type, jwks) = http_get(ops, "/.well-known/jwks.json").await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    let (_, _, central_jwks) = http_get(central.ops_addr.unwrap(), "/.well-known/jwks.json").await;
    let kids = |json: &str| -> Vec<String> {
        let document: serde_json::Value = serde_json::from_str(json).unwrap();
        document["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(kids(&jwks), kids(&central_jwks));

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_database_and_redis() {
    let Some((mut settings, data)) = test_settings(Backend::Postgres).await else { return };
    let (redis_url, database_url) =
        (settings.redis_url.clone().unwrap(), settings.database_url.clone().unwrap());
    let redis = support::TcpProxy::start(&support::redis_host_port(&redis_url)).await;
    let database = support::TcpProxy::start(&support::postgres_host_port(&database_url)).await;
    settings.redis_url = Some(support::with_host_port(&redis_url, &redis.addr().to_string()));
    settings.database_url = Some(support::with_host_port(&database_url, &database.addr().to_string()));
    let app = spawn_with_settings(settings, Arc::new(data)).await;
    let ops = app.ops_addr.unwrap();
    let answers = |status: u16, text: &'static str| {
        move || async move {
            let (got, _, body) = http_get(ops, "/readyz").await;
            got == status && body.contains(text)
        }
    };
    const WITHOUT_DATABASE: &str = "/readyz?exclude=database";
    assert_eq!(http_get(ops, "/readyz").await, (200, "text/plain; charset=utf-8".into(), "ready\n".into()));
    assert_eq!(http_get(ops, WITHOUT_DATABASE).await.0, 200);
    let (status, _, body) = http_get(ops, "/readyz?exclude=databse").await;
    assert_eq!(status, 400, "an unknown check is refused, not ignored: {body}");
    assert!(body.contains("unknown readiness check \"databse\""), "{body}");
    let (access, _, _) = app.user_session("ada").await;

    let before = scrape(ops).await;
    redis.cut();
    assert!(eventually(Duration::from_secs(10), answers(503, "not ready: redis unreachable")).await);
    // Without Redis no replica can know revocations: unready whatever is excluded.
    let (status, _, body) = http_get(ops, WITHOUT_DATABASE).await;
    assert_eq!((status, body.as_str()), (503, "not ready: redis unreachable\n"));
    redis.restore();
    assert!(eventually(Duration::from_secs(15), answers(200, "ready")).await, "ready again");
    let after = scrape(ops).await;
    assert!(grew(&before, &after, "portcullis_hot_state_errors_total", &[]) >= 1.0);

    database.cut();
    assert!(eventually(Duration::from_secs(10), answers(503, "not ready: database unreachable")).await);
    // ValidateToken needs only the keys and Redis: the replica stays ready for a probe that
    // excludes the database, and still answers.
    let (status, _, body) = http_get(ops, WITHOUT_DATABASE).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert!(app.validate(&access).await.valid, "ValidateToken works without the database");
    database.restore();
    assert!(eventually(Duration::from_secs(15), answers(200, "ready")).await, "ready again");
    let last = scrape(ops).await;
    assert!(
        grew(&after, &last, "portcullis_store_errors_total", &[("kind", "unavailable")]) >= 1.0,
        "{last}"
    );
}

/// With the revocation feed down and Redis unreachable, checks are answered from this
/// replica's copy (within `redis.revocation_max_staleness`); each failed Redis call is still
/// counted in `portcullis_hot_state_errors_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_errors_are_counted_when_the_revocation_copy_answers() {
    let Some(redis_url) = support::redis_url() else {
        support::skip("Redis error counting");
        return;
    };
    let proxy = support::TcpProxy::start(&support::redis_host_port(&redis_url)).await;
    let url = support::with_host_port(&redis_url, &proxy.addr().to_string());
    let prefix = format!("test:{}:", uuid::Uuid::new_v4().simple());
    let hot = RedisHotState::connect(&url, prefix)
        .await
        .expect("Redis through the proxy")
        .with_revocation_feed(Duration::from_secs(60));
    assert!(eventually(Duration::from_secs(10), || async { hot.revocations_mirrored() }).await, "synced");

    proxy.cut();
    assert!(eventually(Duration::from_secs(10), || async { !hot.revocations_mirrored() }).await, "feed lost");
    let before = portcullis::metrics::render();
    let checks = 5;
    for _ in 0..checks {
        let revoked = hot.is_session_revoked(uuid::Uuid::new_v4()).await;
        assert!(!revoked.expect("answered from the copy, within the staleness bound"));
    }
    let after = portcullis::metrics::render();
    let sent = hot.revocation_checks_sent();
    assert!(sent >= checks, "the checks went to Redis first: {sent}");
    assert!(
        grew(&before, &after, "portcullis_hot_state_errors_total", &[]) >= checks as f64,
        "every failed Redis call counted:\n{before}\n{after}"
    );
}

/// `server.request_timeout` is enforced inside our layer: the timed-out answer carries the
/// request id and is counted, as `CANCELLED` (what tonic's own timeout answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_calls_carry_the_request_id() {
    // bcrypt cost 13 keeps a login (of an unknown user: the same work) far past 200 ms.
    let Some(app) = spawn_app_with(Backend::Embedded, |s| {
        s.password.bcrypt_cost = 13;
        s.password.hashing_concurrency = Some(1);
        s.server.request_timeout = Duration::from_millis(200);
    })
    .await
    else {
        return;
    };
    let ops = app.ops_addr.unwrap();
    let before = scrape(ops).await;
    let mut request = Request::new(pb::LoginRequest {
        identifier: "nobody".into(),
        password: PASSWORD.into(),
        client: None,
    });
    request.metadata_mut().insert("x-request-id", "slow-1".parse().unwrap());
    let started = std::time::Instant::now();
    let status = app.auth.clone().login(request).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Cancelled, "Timeout expired"), "{status:?}");
    assert_eq!(status.metadata().get("x-request-id").expect("x-request-id on the timeout"), "slow-1");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(3), "{elapsed:?}");
    let after = scrape(ops).await;
    assert!(
        grew(&before, &after, "portcullis_grpc_requests_total", &[("method", LOGIN), ("code", "CANCELLED")])
            >= 1.0,
        "{after}"
    );
    // Quick calls are untouched.
    assert!(!app.validate("not.a.token").await.valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_shutting_down_during_the_drain() {
    // bcrypt cost 13 keeps a login in flight while shutdown begins.
    let Some(mut app) = spawn_app_with(Backend::Embedded, |s| {
        s.password.bcrypt_cost = 13;
        s.password.hashing_concurrency = Some(1);
    })
    .await
    else {
        return;
    };
    let ops = app.ops_addr.unwrap();
    assert_eq!(http_get(ops, "/readyz").await.0, 200);
    let in_flight = {
        let mut client = app.auth.clone();
        tokio::spawn(async move {
            client
                .login(pb::LoginRequest {
                    identifier: "nobody".into(),
                    password: PASSWORD.into(),
                    client: None,
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let server = app.take_server();
    app.trigger_shutdown();

    let draining = eventually(Duration::from_secs(5), || async move {
        let (status, _, body) = http_get(ops, "/readyz").await;
        status == 503 && body == "not ready: shutting down\n"
    })
    .await;
    assert!(draining, "not ready as soon as shutdown begins");
    // Still scraped while gRPC drains.
    assert_eq!(http_get(ops, "/metrics").await.0, 200);
    assert_eq!(in_flight.await.unwrap().unwrap_err().code(), Code::Unauthenticated, "the call finished");
    tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(ops).await.is_err(), "the ops port closes after the drain");
}

// ---------------------------------------------------------------------------------------
// Logs never hold a secret.

/// Everything logged, as JSON lines.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

impl Capture {
    /// Each line parsed, its timestamp removed (its digits could look like a code).
    fn lines(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).expect("UTF-8 logs");
        text.lines()
            .map(|line| {
                let mut value: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                value.as_object_mut().unwrap().remove("timestamp");
                value
            })
            .collect()
    }
}

/// The test's own subscriber, on every thread of its own runtime (thread defaults, not the
/// global one: under `cargo test` another test may have installed that already).
fn with_captured_logs(test: impl std::future::Future<Output = ()>) -> Capture {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,portcullis=trace"))
        .with_writer(capture.clone())
        .finish();
    let dispatch = tracing::Dispatch::new(subscriber);
    let on_threads = dispatch.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || std::mem::forget(tracing::dispatcher::set_default(&on_threads)))
        .build()
        .unwrap();
    let _default = tracing::dispatcher::set_default(&dispatch);
    runtime.block_on(test);
    runtime.shutdown_timeout(Duration::from_secs(5));
    capture
}

#[test]
fn logs_never_hold_secrets_embedded() {
    logs_never_hold_secrets(Backend::Embedded);
}

#[test]
fn logs_never_hold_secrets_postgres() {
    logs_never_hold_secrets(Backend::Postgres);
}

/// The text of every `.eml` under `dir`, transfer encodings undone (quoted-printable soft
/// breaks and `=3D`; base64 blocks decoded), enough to find links and codes.
fn mail_texts(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut texts = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        if entry.path().extension().is_none_or(|x| x != "eml") {
            continue;
        }
        let Ok(raw) = std::fs::read_to_string(entry.path()) else { continue };
        let raw = raw.replace("\r\n", "\n");
        let mut text = raw.replace("=\n", "").replace("=3D", "=");
        let mut block = String::new();
        for line in raw.lines().chain(std::iter::once("")) {
            let base64_line = line.len() >= 16
                && line.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
            if base64_line {
                block.push_str(line);
            } else if !block.is_empty() {
                if let Ok(decoded) = STANDARD.decode(&block) {
                    text.push('\n');
                    text.push_str(&String::from_utf8_lossy(&decoded));
                }
                block.clear();
            }
        }
        texts.push(text);
    }
    texts
}

/// What follows `marker` in a mail (`len` characters of `alphabet`), waiting for the mail.
async fn from_mail(dir: &Path, marker: &str, len: usize, alphabet: fn(char) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        for text in mail_texts(dir) {
            if let Some(at) = text.find(marker) {
                let found: String = text[at + marker.len()..].chars().take_while(|c| alphabet(*c)).collect();
                if found.len() >= len {
                    return found[..len].to_owned();
                }
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no mail with {marker:?} in {}", dir.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn client() -> Option<pb::ClientContext> {
    Some(pb::ClientContext {
        ip_address: "203.0.113.7".into(),
        user_agent: FIREFOX.into(),
        device_fingerprint: "fp-test".into(),
    })
}

async fn login(
    app: &TestApp,
    password: &str,
    request_id: &str,
) -> Result<pb::login_response::Outcome, tonic::Status> {
    let mut request = Request::new(pb::LoginRequest {
        identifier: "sam".into(),
        password: password.into(),
        client: client(),
    });
    request.metadata_mut().insert("x-request-id", request_id.parse().unwrap());
    Ok(app.auth.clone().login(request).await?.into_inner().outcome.expect("an outcome"))
}

fn tokens(outcome: pb::login_response::Outcome) -> pb::TokenPair {
    match outcome {
        pb::login_response::Outcome::Authenticated(session) => session.tokens.unwrap(),
        other => panic!("expected tokens, got {other:?}"),
    }
}

const WRONG_PASSWORD: &str = "Tr0ub4dor&3 but wrong";
const NEW_PASSWORD: &str = "a brand new passphrase for sam";

fn logs_never_hold_secrets(backend: Backend) {
    let secrets = Arc::new(Mutex::new(Vec::<(&'static str, String)>::new()));
    let (found, user_id) = (secrets.clone(), Arc::new(Mutex::new(String::new())));
    let found_user = user_id.clone();
    let capture = with_captured_logs(async move {
        let Some(app) = spawn_app_with(backend, |s| {
            s.login.require_verified_email = true;
            s.mail.frontend_base_url = "https://app.example.test".into();
        })
        .await
        else {
            return;
        };
        let mail = app.settings.mail_dir();
        let keep = |what: &'static str, value: &str| found.lock().unwrap().push((what, value.to_owned()));
        keep("password", PASSWORD);
        keep("wrong password", WRONG_PASSWORD);
        keep("new password", NEW_PASSWORD);

        let user = app.register("sam").await;
        *found_user.lock().unwrap() = user.id.clone();
        let verification = from_mail(&mail, "pcve_", 43, token_char).await;
        keep("verification token", &format!("pcve_{verification}"));
        keep("verification token body", &verification);
        let mut auth = app.auth.clone();
        auth.verify_email(pb::VerifyEmailRequest { token: format!("pcve_{verification}") }).await.unwrap();

        let wrong = login(&app, WRONG_PASSWORD, "req-wrong").await.unwrap_err();
        assert_eq!(wrong.code(), Code::Unauthenticated);
        let first = tokens(login(&app, PASSWORD, "req-login-1").await.unwrap());
        let second = auth
            .refresh(pb::RefreshRequest { refresh_token: first.refresh_token.clone(), client: None })
            .await;
        let second = second.unwrap().into_inner().tokens.unwrap();
        assert!(app.validate(&second.access_token).await.valid);
        app.list_sessions(&second.access_token).await.unwrap();

        forgot(&app, "sam").await;
        let reset_token = from_mail(&mail, "pcpr_", 43, token_char).await;
        keep("reset token", &format!("pcpr_{reset_token}"));
        keep("reset token body", &reset_token);
        reset(&app, &format!("pcpr_{reset_token}"), NEW_PASSWORD).await.unwrap();

        let third = tokens(login(&app, NEW_PASSWORD, "req-login-2").await.unwrap());
        AccountServiceClient::new(app.channel())
            .set_email_otp(bearer(
                pb::SetEmailOtpRequest { enabled: true, current_password: NEW_PASSWORD.into() },
                &third.access_token,
            ))
            .await
            .unwrap();
        let challenge = match login(&app, NEW_PASSWORD, "req-login-3").await.unwrap() {
            pb::login_response::Outcome::MfaRequired(challenge) => challenge,
            other => panic!("expected a challenge, got {other:?}"),
        };
        let code = from_mail(&mail, "sign-in code is ", 6, |c| c.is_ascii_digit()).await;
        keep("challenge token", &challenge.challenge_token);
        keep("OTP code", &code);
        let fourth = auth
            .verify_mfa(pb::VerifyMfaRequest {
                challenge_token: challenge.challenge_token.clone(),
                code: code.clone(),
                client: client(),
            })
            .await
            .unwrap()
            .into_inner()
            .authenticated
            .unwrap()
            .tokens
            .unwrap();
        for pair in [&first, &second, &third, &fourth] {
            keep("access token", &pair.access_token);
            keep("access token signature", pair.access_token.rsplit('.').next().unwrap());
            keep("refresh token", &pair.refresh_token);
            keep("refresh token body", pair.refresh_token.trim_start_matches("pcrt_"));
        }
        // Let the background work (mail worker, device notes) log what it logs.
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.shutdown().await.unwrap();
    });

    let secrets = secrets.lock().unwrap().clone();
    if secrets.is_empty() {
        return; // skipped: the backend is not configured here
    }
    let lines = capture.lines();
    let text: Vec<String> = lines.iter().map(|line| line.to_string()).collect();
    assert!(text.len() > 20, "the flows logged something: {text:#?}");
    for (what, secret) in &secrets {
        assert!(secret.len() >= 6, "{what} is too short to search for");
        if let Some(line) = text.iter().find(|line| line.contains(secret.as_str())) {
            panic!("the {what} was logged: {line}");
        }
    }
    // The mail file transport names the file, not the links inside it.
    assert!(
        text.iter().any(|line| line.contains("mail written to a file") && line.contains(".eml")),
        "the mail transport logs its files"
    );
    // The span of a call carries its method, request id and, once known, its user.
    let user_id = user_id.lock().unwrap().clone();
    let in_login_span = lines.iter().any(|line| {
        let span = &line["span"];
        span["name"] == "rpc"
            && span["method"] == LOGIN
            && span["request_id"] == "req-login-1"
            && span["user_id"] == user_id.as_str()
            && span["peer"].as_str().is_some_and(|peer| peer.starts_with("127.0.0.1:"))
    });
    assert!(in_login_span, "no line in the Login span with its fields: {text:#?}");
}
