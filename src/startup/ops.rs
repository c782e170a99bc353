//! The ops HTTP server (`server.ops_listen`, 127.0.0.1:9090 by default; off with
//! `server.ops_enabled = false`): what operators, probes, Prometheus and relying parties
//! fetch over plain HTTP rather than gRPC. Both modes (server and validator) run it. It starts
//! with the gRPC server and keeps answering while gRPC drains at shutdown (readiness says so),
//! then stops.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /healthz` | `200 ok`: the process is up (liveness) |
//! | `GET /readyz` | `200 ready` while the database and Redis answer and no shutdown has begun; else `503` naming what is wrong |
//! | `GET /readyz?exclude=database` | the same without the database (`exclude` may repeat; `database`, `redis`; another name is `400`) |
//! | `GET /metrics` | Prometheus metrics, OpenMetrics text (see [`crate::metrics`]) |
//! | `GET /.well-known/jwks.json` | the public signing keys (RFC 7517), cacheable for 5 minutes |
//!
//! More routes go in [`router`], and what they need in [`OpsState`].

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context;
use axum::{
    Router,
    body::Bytes,
    extract::{RawQuery, State},
    http::{HeaderValue, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

/// How long relying parties may cache the JWKS. A rotation publishes the new key before it
/// signs (add it, restart, then make it the signer), so a cached set is never short of it
/// for longer than this.
const JWKS_CACHE_CONTROL: &str = "public, max-age=300";

/// The JWK Set document as it is now (the validator's keys refresh; the server's are
/// rendered once).
pub type JwksSource = Arc<dyn Fn() -> Bytes + Send + Sync>;

/// What the handlers need; built once when the server starts.
#[derive(Clone)]
pub struct OpsState {
    pub jwks: JwksSource,
    pub readiness: Readiness,
}

/// Whether this instance should get traffic, as the health watcher last saw its
/// dependencies (every `server.health_check_interval`, each ping bounded to 2 s) and
/// whether shutdown has begun. `/readyz` reads it: a probe never waits on a dependency, and
/// probes from every kubelet cost the database nothing.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<ReadinessState>,
}

struct ReadinessState {
    /// What the hot state is, for the message (`redis`, or `hot state` in process).
    hot_state_name: &'static str,
    database_down: AtomicBool,
    hot_state_down: AtomicBool,
    stopping: AtomicBool,
}

impl Readiness {
    /// Ready: `build` has just reached every dependency.
    pub fn new(redis: bool) -> Readiness {
        Readiness {
            inner: Arc::new(ReadinessState {
                hot_state_name: if redis { "redis" } else { "hot state" },
                database_down: AtomicBool::new(false),
                hot_state_down: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
            }),
        }
    }

    pub fn set_database(&self, up: bool) {
        self.inner.database_down.store(!up, Ordering::Relaxed);
    }

    pub fn set_hot_state(&self, up: bool) {
        self.inner.hot_state_down.store(!up, Ordering::Relaxed);
    }

    /// Shutdown has begun: never ready again.
    pub fn set_stopping(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    /// `Ok` when ready, else what is wrong (`database unreachable, shutting down`); the
    /// checks in `exclude` are left out (shutdown never is).
    pub fn check(&self, exclude: Exclusions) -> Result<(), String> {
        let state = &self.inner;
        let mut problems = Vec::new();
        if !exclude.database && state.database_down.load(Ordering::Relaxed) {
            problems.push("database unreachable".to_string());
        }
        if !exclude.redis && state.hot_state_down.load(Ordering::Relaxed) {
            problems.push(format!("{} unreachable", state.hot_state_name));
        }
        if state.stopping.load(Ordering::Relaxed) {
            problems.push("shutting down".to_string());
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join(", ")) }
    }
}

/// The readiness checks a probe leaves out: `/readyz?exclude=database` (repeatable, as the
/// Kubernetes API server's `/readyz?exclude=etcd`).
///
/// `exclude=database` is what a replica needs to keep answering ValidateToken and ext_authz
/// `Check`, which use only the keys and the hot state: a failover of the shared database
/// must not take every replica out of the Service. `redis` can be named too (it then leaves
/// only shutdown). A name we do not know answers `400` rather than being ignored: a typo
/// (`exclude=databse`) would otherwise quietly keep the database in the check and show only
/// in the outage it was meant for. Other query parameters are ignored. The validator knows
/// the same names (it has no database: `exclude=database` changes nothing there), so one
/// probe path suits both modes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Exclusions {
    pub database: bool,
    pub redis: bool,
}

impl Exclusions {
    /// From the raw query string (`exclude=database&exclude=redis`); `Err` names an unknown
    /// check.
    pub fn from_query(query: Option<&str>) -> Result<Exclusions, String> {
        let mut exclusions = Exclusions::default();
        let pairs = query.unwrap_or_default().split('&').filter(|pair| !pair.is_empty());
        for (key, value) in pairs.map(|pair| pair.split_once('=').unwrap_or((pair, ""))) {
            if key != "exclude" {
                continue;
            }
            match value {
                "database" => exclusions.database = true,
                "redis" => exclusions.redis = true,
                other => {
                    let shown: String = other.chars().take(64).collect();
                    return Err(format!(
                        "unknown readiness check {shown:?} in exclude (known: database, redis)"
                    ));
                }
            }
        }
        Ok(exclusions)
    }
}

/// Every ops route.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<OpsState>, RawQuery(query): RawQuery) -> impl IntoResponse {
    let exclude = match Exclusions::from_query(query.as_deref()) {
        Ok(exclude) => exclude,
        Err(error) => return (StatusCode::BAD_REQUEST, format!("{error}\n")),
    };
    match state.readiness.check(exclude) {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(problems) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {problems}\n")),
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE))],
        crate::metrics::render(),
    )
}

async fn jwks(State(state): State<OpsState>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::CACHE_CONTROL, HeaderValue::from_static(JWKS_CACHE_CONTROL)),
        ],
        (state.jwks)(),
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

/// Waits (at most `limit`) for the ops server's task after the gRPC drain, logging how it
/// ended.
pub async fn finish(task: tokio::task::JoinHandle<std::io::Result<()>>, limit: std::time::Duration) {
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => tracing::error!(%error, "ops HTTP server failed"),
        Ok(Err(error)) => tracing::error!(%error, "ops HTTP server task failed"),
        Err(_) => tracing::warn!(?limit, "ops HTTP connections still open: dropped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_every_problem() {
        let all = Exclusions::default();
        let readiness = Readiness::new(true);
        assert_eq!(readiness.check(all), Ok(()));
        readiness.set_hot_state(false);
        assert_eq!(readiness.check(all), Err("redis unreachable".into()));
        readiness.set_database(false);
        readiness.set_stopping();
        assert_eq!(
            readiness.check(all),
            Err("database unreachable, redis unreachable, shutting down".into())
        );
        readiness.set_database(true);
        readiness.set_hot_state(true);
        assert_eq!(readiness.check(all), Err("shutting down".into()), "never ready again after shutdown");
    }

    #[test]
    fn excluded_checks_are_left_out_but_never_shutdown() {
        let readiness = Readiness::new(true);
        readiness.set_database(false);
        let no_database = Exclusions { database: true, redis: false };
        assert_eq!(readiness.check(no_database), Ok(()));
        readiness.set_hot_state(false);
        assert_eq!(readiness.check(no_database), Err("redis unreachable".into()));
        let neither = Exclusions { database: true, redis: true };
        assert_eq!(readiness.check(neither), Ok(()));
        readiness.set_stopping();
        assert_eq!(readiness.check(neither), Err("shutting down".into()));
    }

    #[test]
    fn exclusions_are_read_from_the_query() {
        let parse = Exclusions::from_query;
        assert_eq!(parse(None), Ok(Exclusions::default()));
        assert_eq!(parse(Some("")), Ok(Exclusions::default()));
        assert_eq!(parse(Some("exclude=database")), Ok(Exclusions { database: true, redis: false }));
        assert_eq!(
            parse(Some("exclude=database&verbose&exclude=redis")),
            Ok(Exclusions { database: true, redis: true })
        );
        assert_eq!(parse(Some("exclude=database&exclude=database")).map(|e| e.database), Ok(true));
        for bad in ["exclude=databse", "exclude=", "exclude", "exclude=Database", "exclude=database,redis"] {
            let error = parse(Some(bad)).unwrap_err();
            assert!(error.starts_with("unknown readiness check"), "{bad}: {error}");
        }
    }
}
