//! Client middleware for services that use Portcullis (cargo feature `client`): a tower
//! layer for tonic (or any `http`) servers that checks each request's bearer token with
//! `ValidateToken` and hands the verified [`Identity`] to the handler in the request
//! extensions.
//!
//! ```ignore
//! let channel = Channel::from_static("http://portcullis:50051").connect_lazy();
//! let auth = PortcullisAuthLayer::new(channel).require_roles(["orders:read"]);
//! Server::builder().layer(auth).add_service(my_service).serve(addr).await?;
//! // in a handler:
//! let who = request.extensions().get::<Identity>().expect("set by PortcullisAuthLayer");
//! ```
//!
//! - No token, an invalid one or a missing role: `UNAUTHENTICATED` (or `PERMISSION_DENIED`
//!   for a role) without calling the inner service. Portcullis unreachable: `UNAVAILABLE`
//!   (fail closed).
//! - A small positive cache (keyed by the token's SHA-256, at most `cache_ttl` — 1 s by
//!   default — and never past the token's expiry, bounded in size) saves a round trip for a
//!   client's burst of calls; it is the only staleness the layer adds: a token revoked in
//!   Portcullis may still pass here for up to `cache_ttl`. Set it to zero to ask every time.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use aws_lc_rs::digest::{SHA256, digest};
use tonic::{Status, transport::Channel};
use tower_layer::Layer;
use tower_service::Service;

use crate::api::pb::{self, auth_service_client::AuthServiceClient};

/// Who is calling, as Portcullis verified it. Put in the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub session_id: String,
    pub roles: Vec<String>,
    /// How the session was authenticated (RFC 8176): `pwd`, and `otp` after a second factor.
    pub amr: Vec<String>,
    pub email_verified: bool,
}

const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(1);
/// Deadline of one ValidateToken call.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_CACHE_CAPACITY: usize = 4096;

/// Checks every request's bearer token with Portcullis. Cheap to clone.
#[derive(Clone)]
pub struct PortcullisAuthLayer {
    shared: Arc<Shared>,
}

struct Shared {
    client: AuthServiceClient<Channel>,
    required_roles: Vec<String>,
    cache_ttl: Duration,
    cache_capacity: usize,
    cache: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
}

impl PortcullisAuthLayer {
    /// Validates against the Portcullis at the other end of `channel`.
    pub fn new(channel: Channel) -> PortcullisAuthLayer {
        PortcullisAuthLayer {
            shared: Arc::new(Shared {
                client: AuthServiceClient::new(channel),
                required_roles: Vec::new(),
                cache_ttl: DEFAULT_CACHE_TTL,
                cache_capacity: DEFAULT_CACHE_CAPACITY,
                cache: Mutex::default(),
            }),
        }
    }

    /// Roles every request's token must carry.
    pub fn require_roles<I, R>(self, roles: I) -> PortcullisAuthLayer
    where
        I: IntoIterator<Item = R>,
        R: Into<String>,
    {
        self.with(|s| s.required_roles = roles.into_iter().map(Into::into).collect())
    }

    /// How long a positive answer is reused (zero: ask every time).
    pub fn cache_ttl(self, ttl: Duration) -> PortcullisAuthLayer {
        self.with(|s| s.cache_ttl = ttl)
    }

    fn with(self, change: impl FnOnce(&mut Shared)) -> PortcullisAuthLayer {
        let mut shared = Arc::try_unwrap(self.shared).unwrap_or_else(|shared| Shared {
            client: shared.client.clone(),
            required_roles: shared.required_roles.clone(),
            cache_ttl: shared.cache_ttl,
            cache_capacity: shared.cache_capacity,
            cache: Mutex::default(),
        });
        change(&mut shared);
        PortcullisAuthLayer { shared: Arc::new(shared) }
    }
}

impl<S> Layer<S> for PortcullisAuthLayer {
    type Service = PortcullisAuth<S>;

    fn layer(&self, inner: S) -> PortcullisAuth<S> {
        PortcullisAuth { inner, shared: self.shared.clone() }
    }
}

/// The service [`PortcullisAuthLayer`] wraps around yours.
#[derive(Clone)]
pub struct PortcullisAuth<S> {
    inner: S,
    shared: Arc<Shared>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for PortcullisAuth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            match shared.identify(request.headers()).await {
                Ok(identity) => {
                    request.extensions_mut().insert(identity);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

impl Shared {
    async fn identify(&self, headers: &http::HeaderMap) -> Result<Identity, Status> {
        let token = bearer_token(headers).ok_or_else(|| {
            Status::unauthenticated("missing bearer token: send `authorization: Bearer <access token>`")
        })?;
        let key: [u8; 32] =
            digest(&SHA256, token.as_bytes()).as_ref().try_into().expect("SHA-256 is 32 bytes");
        if let Some(identity) = self.cached(&key) {
            return Ok(identity);
        }
        let mut request = tonic::Request::new(pb::ValidateTokenRequest {
            token: token.to_string(),
            required_roles: self.required_roles.clone(),
        });
        // A hung Portcullis must not hang every request behind this layer.
        request.set_timeout(VALIDATE_TIMEOUT);
        let answer = self
            .client
            .clone()
            .validate_token(request)
            .await
            .map_err(|status| {
                tracing::warn!(error = %status, "Portcullis ValidateToken failed: refusing the request");
                Status::unavailable("authorization service unavailable")
            })?
            .into_inner();
        if !answer.valid {
            return Err(if answer.reason == pb::TokenInvalidReason::MissingRole as i32 {
                Status::permission_denied("missing a required role")
            } else {
                Status::unauthenticated("access token is not valid")
            });
        }
        let identity = Identity {
            user_id: answer.user_id,
            session_id: answer.session_id,
            roles: answer.roles,
            amr: answer.amr,
            email_verified: answer.email_verified,
        };
        let expires = answer.expires_at.map(|t| t.seconds).unwrap_or(0);
        self.remember(key, &identity, expires);
        Ok(identity)
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Identity> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(key) {
            Some((identity, until)) if Instant::now() < *until => Some(identity.clone()),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: [u8; 32], identity: &Identity, expires_unix: i64) {
        if self.cache_ttl.is_zero() {
            return;
        }
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let left = Duration::from_secs(u64::try_from(expires_unix - now_unix).unwrap_or(0));
        let until = Instant::now() + self.cache_ttl.min(left);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.cache_capacity {
            let now = Instant::now();
            cache.retain(|_, (_, until)| now < *until);
            if cache.len() >= self.cache_capacity
                && let Some(victim) = cache.keys().next().copied()
            {
                cache.remove(&victim);
            }
        }
        cache.insert(key, (identity.clone(), until));
    }
}

/// The token of `authorization: Bearer <token>` (scheme case-insensitive).
fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_leniently_but_not_guessed() {
        let header = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            headers
        };
        assert_eq!(bearer_token(&header("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&header("bearer   abc ")), Some("abc"));
        assert_eq!(bearer_token(&header("Basic abc")), None);
        assert_eq!(bearer_token(&header("Bearer")), None);
        assert_eq!(bearer_token(&header("abc")), None);
        assert_eq!(bearer_token(&http::HeaderMap::new()), None);
    }
}
