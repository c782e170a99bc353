//! The validator (sidecar) mode's decision: ValidateToken without a database. Public keys
//! only (a JWK Set from a file or from the central instance's GetJwks), refreshed on a
//! schedule and when a token names an unknown `kid`; revocations from the hot state (Redis,
//! mirrored in process by pub/sub), exactly as the full server checks them.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{
    api::pb::{self, auth_service_client::AuthServiceClient},
    auth::{AuthError, TokenCheck, ValidatesTokens, decide},
    config::{CentralTlsSettings, TokenSettings, ValidatorSettings},
    hot::DynHotState,
    token::{TokenRejection, TokenVerifier, verifier::token_kid},
};

mod tls;

/// Where the public keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    File(PathBuf),
    /// A central Portcullis, asked with GetJwks; over TLS (with these settings) when the
    /// URL is `https://`.
    Central {
        url: String,
        tls: Option<CentralTlsSettings>,
    },
}

impl KeySource {
    pub fn from_settings(settings: &ValidatorSettings) -> anyhow::Result<KeySource> {
        match (&settings.jwks_file, &settings.central_url) {
            (Some(path), None) => Ok(KeySource::File(path.clone())),
            (None, Some(url)) => Ok(KeySource::Central {
                url: url.clone(),
                tls: settings.central_is_https().then(|| settings.central_tls.clone()),
            }),
            _ => anyhow::bail!(
                "validator mode needs exactly one of validator.jwks_file and validator.central_url"
            ),
        }
    }

    /// The JWK Set document.
    pub async fn fetch(&self) -> anyhow::Result<String> {
        match self {
            KeySource::File(path) => tokio::fs::read_to_string(path)
                .await
                .with_context(|| format!("cannot read the JWKS file {}", path.display())),
            KeySource::Central { url, tls } => {
                let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
                    .context("validator.central_url")?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(5));
                let channel = match tls {
                    None => endpoint.connect().await,
                    Some(tls) => {
                        // Read again at every fetch: rotated files are used from the next one.
                        let config = tls::client_config(tls).await.context("validator.central_tls")?;
                        endpoint
                            .connect_with_connector(tls::Connector::new(config, tls.server_name.clone()))
                            .await
                    }
                }
                .with_context(|| format!("cannot reach the central Portcullis at {url}"))?;
                let response = AuthServiceClient::new(channel).get_jwks(pb::GetJwksRequest {}).await;
                let response = match (response, tls) {
                    (Ok(response), _) => response,
                    // With TLS 1.3 a refused client certificate shows only here, after the
                    // handshake: say whether we presented one.
                    (Err(status), Some(tls)) => {
                        let presented = match tls.client_files() {
                            Some((cert, _)) => format!("TLS with the client certificate {}", cert.display()),
                            None => "TLS without a client certificate: a central instance with mutual TLS \
                                     needs validator.central_tls.cert_file and key_file"
                                .into(),
                        };
                        return Err(anyhow::Error::new(status).context(format!(
                            "GetJwks from the central Portcullis at {url} failed ({presented})"
                        )));
                    }
                    (Err(status), None) => {
                        return Err(anyhow::Error::new(status)
                            .context(format!("GetJwks from the central Portcullis at {url} failed")));
                    }
                };
                Ok(response.into_inner().jwks_json)
            }
        }
    }
}

pub struct Validator {
    verifier: TokenVerifier,
    hot: DynHotState,
    source: KeySource,
    /// The JWKS as last loaded (served again by this instance's GetJwks).
    jwks: std::sync::RwLock<String>,
    /// When the keys were last fetched, to bound refreshes caused by unknown `kid`s.
    fetched_at: tokio::sync::Mutex<Instant>,
    min_refresh: Duration,
}

impl Validator {
    pub async fn build(
        source: KeySource,
        tokens: &TokenSettings,
        settings: &ValidatorSettings,
        hot: DynHotState,
    ) -> anyhow::Result<Validator> {
        let jwks = source.fetch().await?;
        let verifier = TokenVerifier::from_jwks(&jwks, tokens).context("the key set is unusable")?;
        Ok(Validator {
            verifier,
            hot,
            source,
            jwks: std::sync::RwLock::new(jwks),
            fetched_at: tokio::sync::Mutex::new(Instant::now()),
            min_refresh: settings.jwks_min_refresh,
        })
    }

    pub fn jwks(&self) -> String {
        self.jwks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fetches the key set again (a failure keeps the current one, logged).
    pub async fn refresh_keys(&self) {
        let mut fetched_at = self.fetched_at.lock().await;
        self.refresh_locked(&mut fetched_at).await;
    }

    async fn refresh_locked(&self, fetched_at: &mut Instant) {
        *fetched_at = Instant::now();
        let result = async {
            let jwks = self.source.fetch().await?;
            let count = self.verifier.replace(&jwks)?;
            *self.jwks.write().unwrap_or_else(|p| p.into_inner()) = jwks;
            Ok::<_, anyhow::Error>(count)
        }
        .await;
        match result {
            Ok(count) => tracing::debug!(keys = count, "key set refreshed"),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "cannot refresh the key set: keeping the current one"
            ),
        }
    }

    /// Refreshes every `every` until the validator is dropped.
    pub async fn refresh_every(
        self: Arc<Self>,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => self.refresh_keys().await,
                () = &mut stop => return,
            }
        }
    }

    /// A token signed by a key we do not know yet may come from a rotation the central
    /// instance made since our last fetch: fetch once (at most every `min_refresh`).
    async fn refresh_for(&self, token: &str) -> bool {
        let Some(kid) = token_kid(token) else { return false };
        if self.verifier.knows(&kid) {
            return false;
        }
        // Single flight: while a refresh runs, other unknown-kid tokens are refused at once
        // rather than parked behind it (garbage kids must not pin tasks).
        let Ok(mut fetched_at) = self.fetched_at.try_lock() else { return false };
        if self.verifier.knows(&kid) {
            return true; // a refresh that just finished brought it
        }
        if fetched_at.elapsed() < self.min_refresh {
            return false;
        }
        self.refresh_locked(&mut fetched_at).await;
        self.verifier.knows(&kid)
    }
}

#[async_trait::async_trait]
impl ValidatesTokens for Validator {
    async fn validate_token(&self, token: &str, required_roles: &[String]) -> Result<TokenCheck, AuthError> {
        let mut verified = self.verifier.verify_cached(token);
        if verified.as_ref().err() == Some(&TokenRejection::BadSignature) && self.refresh_for(token).await {
            verified = self.verifier.verify_cached(token);
        }
        Ok(decide(verified, &*self.hot, required_roles).await?)
    }
}
