//! The load generator: closed-loop workers (each waits for its answer before sending the
//! next call), spread over a few tonic Channels (one HTTP/2 connection each), recording the
//! duration of every successful call in microseconds.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context, authorization_client::AuthorizationClient,
};
use portcullis::api::pb::{self, auth_service_client::AuthServiceClient};
use tokio::task::{JoinHandle, JoinSet};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// `n` connections to `addr`.
pub async fn connect(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60));
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        channels.push(endpoint.connect().await?);
    }
    Ok(channels)
}

/// Access tokens handed to workers: round-robin forever, or each once.
#[derive(Clone)]
pub struct TokenFeed {
    tokens: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    once: bool,
}

impl TokenFeed {
    pub fn cycle(tokens: Arc<Vec<String>>) -> TokenFeed {
        assert!(!tokens.is_empty(), "a token feed needs tokens");
        TokenFeed { tokens, next: Arc::default(), once: false }
    }

    pub fn once(tokens: Arc<Vec<String>>) -> TokenFeed {
        assert!(!tokens.is_empty(), "a token feed needs tokens");
        TokenFeed { tokens, next: Arc::default(), once: true }
    }

    fn take(&self) -> Option<String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if self.once && i >= self.tokens.len() {
            return None;
        }
        Some(self.tokens[i % self.tokens.len()].clone())
    }
}

/// What a ValidateToken answer must say for the call to count as a success.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    Valid,
    Revoked,
}

/// Each worker's refresh token chain (a refresh token works once: worker `i` owns chain `i`
/// and carries it from the warm-up into the measured window).
#[derive(Clone, Default)]
pub struct RefreshChains(Arc<Mutex<Vec<Option<String>>>>);

impl RefreshChains {
    pub fn new(tokens: Vec<String>) -> RefreshChains {
        RefreshChains(Arc::new(Mutex::new(tokens.into_iter().map(Some).collect())))
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn take(&self, i: usize) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i).and_then(Option::take)
    }

    fn put(&self, i: usize, token: Option<String>) {
        if let Some(slot) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
            *slot = token;
        }
    }
}

pub enum Workload {
    Health,
    Validate(TokenFeed, Expect),
    /// Envoy's ext_authz `Authorization/Check` of one prepared request; success is an OK
    /// answer (the request would be let through).
    Check(Box<CheckRequest>),
    Login(pb::LoginRequest),
    Refresh(RefreshChains, pb::ClientContext),
}

/// What some workers did in one phase.
#[derive(Default)]
pub struct Phase {
    pub ok: u64,
    pub errors: u64,
    /// Durations of the successful calls, µs (unsorted).
    pub latencies_us: Vec<u32>,
    pub first_error: Option<String>,
}

impl Phase {
    pub fn merge(&mut self, other: Phase) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Runs `concurrency` workers over `channels` until `duration` is over (a worker checks
/// the deadline before each call, so the phase ends when the last call started in time
/// has answered) or, for a feed of tokens used once, until the feed runs dry.
pub async fn run_phase(
    channels: &[Channel],
    workload: &Arc<Workload>,
    concurrency: usize,
    duration: Duration,
) -> Phase {
    let deadline = Instant::now() + duration;
    let mut workers = JoinSet::new();
    for i in 0..concurrency.max(1) {
        let channel = channels[i % channels.len()].clone();
        workers.spawn(worker(i, channel, workload.clone(), deadline));
    }
    let mut phase = Phase::default();
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(worker) => phase.merge(worker),
            Err(e) => {
                phase.errors += 1;
                phase.first_error.get_or_insert_with(|| format!("worker failed: {e}"));
            }
        }
    }
    phase
}

async fn worker(index: usize, channel: Channel, workload: Arc<Workload>, deadline: Instant) -> Phase {
    let mut auth = AuthServiceClient::new(channel.clone());
    let mut ext_authz = AuthorizationClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let mut chain = match &*workload {
        Workload::Refresh(chains, _) => chains.take(index),
        _ => None,
    };
    let mut out = Phase { latencies_us: Vec::with_capacity(16 * 1024), ..Phase::default() };
    loop {
        let started = Instant::now();
        if started >= deadline {
            break;
        }
        let result = match &*workload {
            Workload::Health => check_health(&mut health).await,
            Workload::Validate(feed, expect) => {
                let Some(token) = feed.take() else { break };
                validate(&mut auth, token, *expect).await
            }
            Workload::Check(request) => check(&mut ext_authz, (**request).clone()).await,
            Workload::Login(request) => login(&mut auth, request.clone()).await,
            Workload::Refresh(_, client) => {
                let Some(token) = chain.take() else { break };
                let request = pb::RefreshRequest { refresh_token: token, client: Some(client.clone()) };
                match auth.refresh(request).await {
                    Ok(answer) => {
                        chain = answer.into_inner().tokens.map(|t| t.refresh_token);
                        Ok(())
                    }
                    Err(status) => Err(status_text(&status)),
                }
            }
        };
        let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        match result {
            Ok(()) => {
                out.ok += 1;
                out.latencies_us.push(micros);
            }
            Err(error) => {
                out.errors += 1;
                out.first_error.get_or_insert(error);
            }
        }
    }
    if let Workload::Refresh(chains, _) = &*workload {
        chains.put(index, chain);
    }
    out
}

async fn check_health(health: &mut HealthClient<Channel>) -> Result<(), String> {
    let answer = health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    if answer.status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!("health answered {:?}", answer.status()))
    }
}

async fn validate(
    auth: &mut AuthServiceClient<Channel>,
    token: String,
    expect: Expect,
) -> Result<(), String> {
    let request = pb::ValidateTokenRequest { token, required_roles: Vec::new() };
    let answer = auth.validate_token(request).await.map_err(|s| status_text(&s))?.into_inner();
    let revoked = !answer.valid && answer.reason() == pb::TokenInvalidReason::SessionRevoked;
    match expect {
        Expect::Valid if answer.valid => Ok(()),
        Expect::Revoked if revoked => Ok(()),
        _ => Err(format!(
            "ValidateToken answered valid={} reason={:?}, expected {expect:?}",
            answer.valid,
            answer.reason()
        )),
    }
}

/// What Envoy sends for an HTTP request carrying `authorization: Bearer <token>` (the
/// example's `allowed_headers` keeps that header only).
pub fn check_request(token: &str) -> CheckRequest {
    let headers = [("authorization".to_string(), format!("Bearer {token}"))].into_iter().collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    host: "portcullis.test".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn check(client: &mut AuthorizationClient<Channel>, request: CheckRequest) -> Result<(), String> {
    let answer = client.check(request).await.map_err(|s| status_text(&s))?.into_inner();
    let code = answer.status.as_ref().map_or(0, |s| s.code);
    if code == tonic::Code::Ok as i32 {
        Ok(())
    } else {
        Err(format!("Check answered code {code} instead of OK"))
    }
}

async fn login(auth: &mut AuthServiceClient<Channel>, request: pb::LoginRequest) -> Result<(), String> {
    let answer = auth.login(request).await.map_err(|s| status_text(&s))?.into_inner();
    match answer.outcome {
        Some(pb::login_response::Outcome::Authenticated(_)) => Ok(()),
        other => Err(format!("Login answered {other:?}")),
    }
}

pub fn status_text(status: &tonic::Status) -> String {
    let mut message = status.message().to_string();
    message.truncate(200);
    format!("{:?}: {message}", status.code())
}

/// Login calls hammering the server in the background until stopped.
pub struct Storm {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    first_error: Arc<Mutex<Option<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Storm {
    /// `n` concurrent Login loops over `channel` (connections of their own, as other
    /// clients would have).
    pub fn start(channel: &Channel, request: pb::LoginRequest, n: usize) -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let first_error = Arc::new(Mutex::new(None));
        let tasks = (0..n)
            .map(|_| {
                let mut auth = AuthServiceClient::new(channel.clone());
                let (stop, ok, failed, first_error, request) =
                    (stop.clone(), ok.clone(), failed.clone(), first_error.clone(), request.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match login(&mut auth, request.clone()).await {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Storm { stop, ok, failed, first_error, tasks }
    }

    /// Logins answered so far: (succeeded, failed).
    pub fn counts(&self) -> (u64, u64) {
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }

    /// Stops the loops, cancelling calls in flight; returns the first error seen.
    pub fn stop(self) -> Option<String> {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
        self.first_error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}
