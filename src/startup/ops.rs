//! The ops HTTP server (`server.ops_listen`, 127.0.0.1:9090 by default; off with
//! `server.ops_enabled = false`): what operators, probes and relying parties fetch over plain
//! HTTP rather than gRPC. It starts with the gRPC server and stops on the same signal.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /healthz` | `200 ok`: the process is up (liveness; dependencies are gRPC health's business) |
//! | `GET /.well-known/jwks.json` | the public signing keys (RFC 7517), cacheable for 5 minutes |
//!
//! More routes (metrics, readiness) go in [`router`], and what they need in [`OpsState`].

use std::{future::Future, net::SocketAddr};

use anyhow::Context;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderValue, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

/// How long relying parties may cache the JWKS. A rotation publishes the new key before it
/// signs (add it, restart, then make it the signer), so a cached set is never short of it
/// for longer than this.
const JWKS_CACHE_CONTROL: &str = "public, max-age=300";

/// What the handlers need; built once when the server starts.
#[derive(Clone)]
pub struct OpsState {
    /// The JWK Set document, rendered once: keys change only with a restart.
    pub jwks_json: Bytes,
}

/// Every ops route.
pub fn router(state: OpsState) -> Router {
    Router::new().route("/healthz", get(healthz)).route("/.well-known/jwks.json", get(jwks)).with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn jwks(State(state): State<OpsState>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::CACHE_CONTROL, HeaderValue::from_static(JWKS_CACHE_CONTROL)),
        ],
        state.jwks_json,
    )
}

/// The ops listener, bound at build time so a taken port stops the server before it serves
/// and tests can read the port the system chose.
pub struct OpsServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl OpsServer {
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<OpsServer> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (server.ops_listen)"))?;
        let addr = listener.local_addr()?;
        Ok(OpsServer { listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `router` until `shutdown` resolves, then stops accepting and lets requests in
    /// flight finish (idle keep-alive connections are closed).
    pub async fn serve(
        self,
        router: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(addr = %self.addr, "portcullis serving ops HTTP");
        axum::serve(self.listener, router).with_graceful_shutdown(shutdown).await
    }
}
