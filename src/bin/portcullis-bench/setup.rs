//! What the scenarios need from the server: accounts, real sessions (Login), more real
//! tokens (Refresh), revoked sessions (Logout), and a server that answers SERVING.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use portcullis::api::pb::{self, auth_service_client::AuthServiceClient};
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{load::status_text, server::ServerProcess};

const PASSWORD: &str = "a benchmark passphrase, not a common one";

/// The end user every call claims to come from: one device, so that after the first login
/// it is a known device (no new-device alert mail per login).
pub fn client_context() -> pb::ClientContext {
    pb::ClientContext {
        ip_address: "192.0.2.10".into(),
        user_agent: "portcullis-bench/0.1".into(),
        device_fingerprint: "portcullis-bench".into(),
    }
}

/// Polls Health/Check until the server answers SERVING (or its process exits).
pub async fn wait_serving(
    addr: std::net::SocketAddr,
    mut server: Option<&mut ServerProcess>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Some(server) = server.as_deref_mut()
            && let Some(status) = server.exited()
        {
            bail!("the server at {addr} exited during start-up ({status}):\n{}", server.log_tail());
        }
        let last = match crate::load::connect(addr, 1).await {
            Ok(channels) => {
                let answer = HealthClient::new(channels[0].clone())
                    .check(HealthCheckRequest { service: String::new() })
                    .await;
                match answer {
                    Ok(a) if a.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                    Ok(a) => format!("health {:?}", a.get_ref().status()),
                    Err(s) => status_text(&s),
                }
            }
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() > timeout {
            let log = server.map(|s| s.log_tail()).unwrap_or_default();
            bail!("the server at {addr} is not SERVING after {timeout:?} ({last})\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A registered account.
#[derive(Clone)]
pub struct Account {
    identifier: String,
}

impl Account {
    /// Registers `bench-<random>-<tag>`.
    pub async fn register(channel: &Channel, tag: &str) -> anyhow::Result<Account> {
        let name = format!("bench-{}-{tag}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let request = pb::RegisterRequest {
            username: name.clone(),
            email: format!("{name}@example.com"),
            password: PASSWORD.into(),
            first_name: "Bench".into(),
            last_name: "Mark".into(),
            client: Some(client_context()),
        };
        AuthServiceClient::new(channel.clone())
            .register(request)
            .await
            .map_err(|s| anyhow::anyhow!("Register failed: {}", status_text(&s)))?;
        Ok(Account { identifier: name })
    }

    pub fn login_request(&self) -> pb::LoginRequest {
        pb::LoginRequest {
            identifier: self.identifier.clone(),
            password: PASSWORD.into(),
            client: Some(client_context()),
        }
    }

    /// A new session: (access token, refresh token).
    pub async fn login(&self, channel: &Channel) -> anyhow::Result<(String, String)> {
        let answer = AuthServiceClient::new(channel.clone())
            .login(self.login_request())
            .await
            .map_err(|s| {
                anyhow::anyhow!(
                    "Login failed: {} (a server not started by the bench needs \
                     login.require_verified_email = false and relaxed brute-force limits)",
                    status_text(&s)
                )
            })?
            .into_inner();
        match answer.outcome {
            Some(pb::login_response::Outcome::Authenticated(session)) => {
                let tokens = session.tokens.context("Login answered no tokens")?;
                Ok((tokens.access_token, tokens.refresh_token))
            }
            other => bail!("Login answered {other:?} instead of tokens"),
        }
    }

    /// `n` sessions, logged in concurrently (the server's bcrypt queue orders them).
    pub async fn sessions(&self, channel: &Channel, n: usize) -> anyhow::Result<Vec<(String, String)>> {
        let mut logins = JoinSet::new();
        for _ in 0..n {
            let (account, channel) = (self.clone(), channel.clone());
            logins.spawn(async move { account.login(&channel).await });
        }
        let mut sessions = Vec::with_capacity(n);
        while let Some(done) = logins.join_next().await {
            sessions.push(done??);
        }
        Ok(sessions)
    }
}

/// Rotates a refresh token: (access token, refresh token).
pub async fn refresh(channel: &Channel, refresh_token: String) -> anyhow::Result<(String, String)> {
    let answer = AuthServiceClient::new(channel.clone())
        .refresh(pb::RefreshRequest { refresh_token, client: Some(client_context()) })
        .await
        .map_err(|s| anyhow::anyhow!("Refresh failed: {}", status_text(&s)))?
        .into_inner();
    let tokens = answer.tokens.context("Refresh answered no tokens")?;
    Ok((tokens.access_token, tokens.refresh_token))
}

/// Ends the session of `access_token`.
pub async fn logout(channel: &Channel, access_token: &str) -> anyhow::Result<()> {
    let mut request = tonic::Request::new(pb::LogoutRequest {});
    request.metadata_mut().insert("authorization", format!("Bearer {access_token}").parse()?);
    AuthServiceClient::new(channel.clone())
        .logout(request)
        .await
        .map_err(|s| anyhow::anyhow!("Logout failed: {}", status_text(&s)))?;
    Ok(())
}

/// `sessions` real sessions, each refreshed until it has `per_session` access tokens, then
/// logged out: every one of those tokens is genuine and unexpired, and its session revoked.
pub async fn revoked_tokens(
    channel: &Channel,
    account: &Account,
    sessions: usize,
    per_session: usize,
) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::with_capacity(sessions * per_session);
    for (mut access, mut refresh_token) in account.sessions(channel, sessions).await? {
        tokens.push(access.clone());
        for _ in 1..per_session {
            (access, refresh_token) = refresh(channel, refresh_token).await?;
            tokens.push(access.clone());
        }
        logout(channel, &access).await?;
    }
    Ok(tokens)
}

/// What the server says of `token`.
pub async fn check_token(channel: &Channel, token: &str) -> anyhow::Result<pb::ValidateTokenResponse> {
    Ok(AuthServiceClient::new(channel.clone())
        .validate_token(pb::ValidateTokenRequest { token: token.into(), required_roles: Vec::new() })
        .await
        .map_err(|s| anyhow::anyhow!("ValidateToken failed: {}", status_text(&s)))?
        .into_inner())
}

/// Fails unless the server finds `token` valid (`what` names it in the error).
pub async fn expect_valid(channel: &Channel, token: &str, what: &str) -> anyhow::Result<()> {
    let answer = check_token(channel, token).await?;
    if !answer.valid {
        bail!(
            "the server rejects {what} ({:?}): minted tokens need the server's own key, issuer and \
             audience",
            answer.reason()
        );
    }
    Ok(())
}

/// Fails unless the server answers SESSION_REVOKED for `token`.
pub async fn expect_revoked(channel: &Channel, token: &str) -> anyhow::Result<()> {
    let answer = check_token(channel, token).await?;
    if answer.valid || answer.reason() != pb::TokenInvalidReason::SessionRevoked {
        bail!("a logged-out session's token answered valid={} reason={:?}", answer.valid, answer.reason());
    }
    Ok(())
}

/// The server's JWK Set document (GetJwks), as `/.well-known/jwks.json` serves it.
pub async fn jwks(channel: &Channel) -> anyhow::Result<String> {
    Ok(AuthServiceClient::new(channel.clone())
        .get_jwks(pb::GetJwksRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("GetJwks failed: {}", status_text(&s)))?
        .into_inner()
        .jwks_json)
}
