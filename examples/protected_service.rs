//! A gRPC service protected by Portcullis with `portcullis::middleware` (feature `client`).
//!
//! Every call must carry `authorization: Bearer <access token>`; the layer checks it with
//! Portcullis' ValidateToken and hands the verified identity to the service (here a stand-in:
//! gRPC Health, plus a small layer that echoes the identity in response headers, as your
//! own handlers would read it from `request.extensions()`).
//!
//! ```text
//! cargo run --features client --example protected_service -- http://127.0.0.1:50051 127.0.0.1:50061
//! grpcurl -plaintext -H "authorization: Bearer $ACCESS" 127.0.0.1:50061 grpc.health.v1.Health/Check
//! ```

use std::{
    net::SocketAddr,
    task::{Context, Poll},
};

use portcullis::middleware::{Identity, PortcullisAuthLayer};
use tonic::transport::{Channel, Server};
use tower_layer::layer_fn;
use tower_service::Service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let portcullis = args.next().unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let listen: SocketAddr = args.next().unwrap_or_else(|| "127.0.0.1:50061".into()).parse()?;
    let channel = Channel::from_shared(portcullis)?.connect_lazy();
    let (_reporter, health) = tonic_health::server::health_reporter();
    println!("protected service on {listen}");
    Server::builder()
        .layer(PortcullisAuthLayer::new(channel))
        .layer(layer_fn(|inner| EchoIdentity { inner }))
        .add_service(health)
        .serve(listen)
        .await?;
    Ok(())
}

/// Reads the [`Identity`] the auth layer put in the request, as a handler would, and
/// returns it in `x-user-id` / `x-roles` response headers.
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
        let identity = request.extensions().get::<Identity>().cloned();
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            if let Some(identity) = identity {
                let headers = response.headers_mut();
                if let Ok(value) = identity.user_id.parse() {
                    headers.insert("x-user-id", value);
                }
                if let Ok(value) = identity.roles.join(",").parse() {
                    headers.insert("x-roles", value);
                }
            }
            Ok(response)
        })
    }
}
