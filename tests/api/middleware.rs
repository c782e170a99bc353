//! `portcullis::middleware` (feature `client`) in front of a real tonic service: the layer
//! asks this Portcullis (spawned per test) for every call's token and hands the identity on.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use portcullis::middleware::{Identity, PortcullisAuthLayer};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower_layer::layer_fn;
use tower_service::Service;

use crate::{
    harness::{Backend, TestApp, bearer, spawn_app},
    on_both_backends,
};

on_both_backends!(the_layer_admits_valid_tokens_and_hands_on_the_identity);

/// Starts the protected service (gRPC Health behind the layer) on a random port.
async fn protected(app: &TestApp, layer: impl FnOnce(Channel) -> PortcullisAuthLayer) -> Channel {
    let portcullis = Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = tonic::transport::Server::builder()
        .layer(layer(portcullis))
        .layer(layer_fn(|inner| EchoIdentity { inner }))
        .add_service(health);
    tokio::spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

async fn check(
    channel: &Channel,
    token: Option<&str>,
) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
    let mut client = HealthClient::new(channel.clone());
    let request = HealthCheckRequest { service: String::new() };
    match token {
        Some(token) => client.check(bearer(request, token)).await,
        None => client.check(request).await,
    }
}

async fn the_layer_admits_valid_tokens_and_hands_on_the_identity(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (access, _, session) = app.user_session("mira").await;
    let user_id = session.user.unwrap().id;
    let service = protected(&app, |c| PortcullisAuthLayer::new(c).cache_ttl(Duration::ZERO)).await;

    let missing = check(&service, None).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    let forged = check(&service, Some(&format!("{access}x"))).await.unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated);

    let ok = check(&service, Some(&access)).await.expect("a valid token is let through");
    assert_eq!(ok.metadata().get("x-user-id").unwrap().to_str().unwrap(), user_id, "identity handed on");

    // A role the token lacks.
    let admins = protected(&app, |c| PortcullisAuthLayer::new(c).require_roles(["admin"])).await;
    assert_eq!(check(&admins, Some(&access)).await.unwrap_err().code(), Code::PermissionDenied);

    // Revoked in Portcullis: refused (no cache here).
    app.logout(&access).await.unwrap();
    assert_eq!(check(&service, Some(&access)).await.unwrap_err().code(), Code::Unauthenticated);

    // Portcullis gone: fail closed.
    let (fresh, _, _) = app.user_session("nell").await;
    app.shutdown().await.unwrap();
    let down = check(&service, Some(&fresh)).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable);
}

/// A positive answer is reused for the cache ttl, and not after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positive_answers_are_cached_briefly() {
    let Some(app) = spawn_app(Backend::Embedded).await else { return };
    let (access, _, _) = app.user_session("olly").await;
    let service =
        protected(&app, |c| PortcullisAuthLayer::new(c).cache_ttl(Duration::from_millis(500))).await;
    check(&service, Some(&access)).await.expect("valid");
    app.logout(&access).await.unwrap();
    // Within the ttl the cached answer stands (the documented staleness)...
    check(&service, Some(&access)).await.expect("cached for up to the ttl");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // ...and not after it.
    assert_eq!(check(&service, Some(&access)).await.unwrap_err().code(), Code::Unauthenticated);
}

#[derive(Clone)]
struct EchoIdentity<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for EchoIdentity<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let user = request.extensions().get::<Identity>().map(|i| i.user_id.clone());
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            if let Some(value) = user.and_then(|u| u.parse().ok()) {
                response.headers_mut().insert("x-user-id", value);
            }
            Ok(response)
        })
    }
}
