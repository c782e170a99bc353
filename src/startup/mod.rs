//! Wiring: builds every part from [`Settings`], then serves gRPC until told to stop.
//! Used by `portcullis serve` and by the integration tests (`Application::build` on a
//! random port).

mod health;
mod observe;
pub mod ops;
mod secrets;
pub(crate) mod tls;
mod validator;

pub use validator::ValidatorApp;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::sync::watch;
use tonic::transport::Server;

use crate::{
    api::{AccountApi, ApiContext, AuthApi, ExtAuthzApi, PasswordApi, SessionApi, pb},
    auth::{ActivityRecorder, Auth, AuthParts},
    config::{RedisTlsSettings, Settings},
    hot::{DynHotState, MemoryHotState, RedisHotState, RedisTls},
    mail::{OutboxWorker, transport_from_settings},
    password::{PasswordHasher, PasswordPolicy},
    store::{DynStore, PostgresStore, SqliteStore},
    token::{AccessTokens, KeySet},
};

pub use secrets::is_embedded;

/// A server ready to serve: dependencies connected, keys loaded, port bound.
pub struct Application {
    settings: Settings,
    /// The gRPC listener: plaintext or TLS (`server.tls`).
    incoming: tls::Incoming,
    addr: SocketAddr,
    auth: Arc<Auth>,
    store: DynStore,
    hot: DynHotState,
    activity: Arc<ActivityRecorder>,
    outbox: OutboxWorker,
    /// The ops HTTP listener; `None` with `server.ops_enabled = false`.
    ops: Option<ops::OpsServer>,
}

/// Connects to the configured database (no migrations).
pub async fn connect_store(settings: &Settings) -> anyhow::Result<DynStore> {
    let url = settings.database_url();
    let db = &settings.database;
    let (max, acquire, statement) = (db.max_connections, db.acquire_timeout, db.statement_timeout);
    let store: DynStore = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Arc::new(
            PostgresStore::connect(&url, max, acquire, statement)
                .await
                .context("cannot connect to PostgreSQL")?,
        )
    } else if url.starts_with("sqlite:") {
        Arc::new(
            SqliteStore::connect(&url, max, acquire, statement)
                .await
                .context("cannot open the SQLite database")?,
        )
    } else {
        anyhow::bail!("database_url must start with postgres:// or sqlite://");
    };
    Ok(store)
}

async fn connect_hot(settings: &Settings) -> anyhow::Result<DynHotState> {
    Ok(match &settings.redis_url {
        Some(url) => Arc::new(
            RedisHotState::connect_with_tls(
                url,
                settings.redis.key_prefix.clone(),
                &redis_tls(&settings.redis.tls)?,
            )
            .await
            .context("cannot connect to Redis")?
            .with_revocation_feed(settings.redis.revocation_max_staleness),
        ),
        None => Arc::new(MemoryHotState::new()),
    })
}

/// The PEM files of `redis.tls`, read once; each must hold what it is for (an error names
/// the setting and the file, never what is in it).
fn redis_tls(settings: &RedisTlsSettings) -> anyhow::Result<RedisTls> {
    fn read(setting: &str, path: &std::path::Path, tags: &[&str], what: &str) -> anyhow::Result<Vec<u8>> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("redis.tls.{setting}: cannot read {}", path.display()))?;
        let found =
            pem::parse_many(&bytes).is_ok_and(|blocks| blocks.iter().any(|b| tags.contains(&b.tag())));
        anyhow::ensure!(found, "redis.tls.{setting}: {} holds no PEM {what}", path.display());
        Ok(bytes)
    }
    let root_ca_pem = settings
        .ca_file
        .as_deref()
        .map(|path| read("ca_file", path, &["CERTIFICATE"], "certificate"))
        .transpose()?;
    let client_pem = match settings.client_files() {
        Some((cert, key)) => Some((
            read("cert_file", cert, &["CERTIFICATE"], "certificate")?,
            read("key_file", key, &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"], "private key")?,
        )),
        None => None,
    };
    Ok(RedisTls { root_ca_pem, client_pem })
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let store = connect_store(&settings).await?;
        if settings.database.migrate_on_start {
            store.migrate().await.context("database migration failed")?;
        }
        let hot = connect_hot(&settings).await?;

        let keys_dir = secrets::ensure_signing_key(&settings)?;
        let keys = KeySet::load_dir(&keys_dir, settings.tokens.signing_kid.as_deref())
            .context("cannot load signing keys")?;
        let tokens = AccessTokens::new(keys, &settings.tokens)?;
        tokens.self_test().context("token self-test failed: check the keys and tokens.* settings")?;
        tracing::info!(kid = %tokens.keys().signer().kid, algorithm = %tokens.keys().signer().algorithm, "signing key loaded");

        let pepper = secrets::load_pepper(&settings)?;
        let concurrency = settings
            .password
            .hashing_concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let hasher = PasswordHasher::new(
            &pepper,
            settings.password.bcrypt_cost,
            concurrency,
            settings.password.hashing_queue_timeout,
        )
        .await?;

        let geo = match &settings.tracking.geoip_database {
            Some(path) => Some(crate::geo::GeoIp::open(path)?),
            None => None,
        };
        let activity = Arc::new(ActivityRecorder::default());
        let transport = transport_from_settings(&settings).context("cannot set up mail delivery")?;
        let outbox = OutboxWorker::new(store.clone(), transport, settings.mail.clone());
        let auth = Arc::new(Auth::new(AuthParts {
            store: store.clone(),
            hot: hot.clone(),
            hasher,
            policy: PasswordPolicy::new(settings.password.min_length, settings.password.max_length),
            tokens,
            activity: activity.clone(),
            sessions: settings.sessions.clone(),
            leeway: settings.tokens.leeway,
            mail: settings.mail.clone(),
            outbox: outbox.waker(),
            login: settings.login.clone(),
            limits: settings.limits.clone(),
            mfa: settings.mfa.clone(),
            server_secret: pepper.clone(),
            geo,
        }));
        let republished = auth.republish_recent_revocations().await.context("cannot publish revocations")?;
        tracing::debug!(republished, "recent revocations published to the hot state");

        let incoming = tls::Incoming::bind(&settings.server)?;
        let addr = incoming.local_addr()?;
        let ops = match settings.server.ops_enabled {
            true => Some(ops::OpsServer::bind(settings.server.ops_listen).await?),
            false => None,
        };
        Ok(Application { settings, incoming, addr, auth, store, hot, activity, outbox, ops })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of the ops HTTP server (`/healthz`, `/readyz`, `/metrics`,
    /// `/.well-known/jwks.json`), unless it is switched off.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops.as_ref().map(ops::OpsServer::local_addr)
    }

    /// Serves until `shutdown` resolves; then reports NOT_SERVING, stops accepting, and lets
    /// in-flight calls finish within `server.shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let Application { settings, incoming, addr, auth, store, hot, activity, outbox, ops } = self;
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let (stopping_tx, stopping) = watch::channel(false);
        // `build` just reached both dependencies; the watcher takes over from here.
        health::report_all(&health_reporter, tonic_health::ServingStatus::Serving).await;
        let readiness = ops::Readiness::new(settings.redis_url.is_some());

        let health_task = tokio::spawn(health::watch_dependencies(
            health_reporter.clone(),
            store.clone(),
            hot,
            auth.clone(),
            readiness.clone(),
            settings.server.health_check_interval,
            stopping.clone(),
        ));
        // Background work that must outlive the drain stops on `drained`, after the server.
        let (drained_tx, drained) = watch::channel(false);
        let activity_task = {
            let (activity, store, drained) = (activity.clone(), store.clone(), drained.clone());
            let interval = settings.sessions.activity_flush_interval;
            tokio::spawn(async move { activity.run(store, interval, until(drained)).await })
        };
        let outbox_task = {
            let drained = drained.clone();
            tokio::spawn(async move { outbox.run(until(drained)).await })
        };
        let purge_task = {
            let (auth, drained) = (auth.clone(), drained.clone());
            let (retention, interval) =
                (settings.tracking.attempts_retention, settings.tracking.purge_interval);
            tokio::spawn(async move { auth.purge_history(retention, interval, until(drained)).await })
        };
        let reconciler_task = {
            let (auth, drained) = (auth.clone(), drained.clone());
            let interval = settings.sessions.revocation_resync_interval;
            tokio::spawn(async move { auth.reconcile_revocations(interval, until(drained)).await })
        };

        // The ops HTTP server answers through the drain (`/readyz`: shutting down; metrics
        // still scraped) and stops once gRPC has (`drained`).
        let ops_task = ops.map(|ops| {
            let jwks = axum::body::Bytes::from(auth.tokens().keys().jwks().to_json());
            let state = ops::OpsState { jwks: Arc::new(move || jwks.clone()), readiness: readiness.clone() };
            tokio::spawn(ops.serve(ops::router(state), until(drained.clone())))
        });

        let ctx = Arc::new(ApiContext { auth, trusted_proxies: settings.server.trusted_proxies.clone() });
        let mut reflection = None;
        let mut reflection_alpha = None;
        if settings.server.reflection {
            // Both reflection versions list both, so any client finds either.
            let builder = || {
                tonic_reflection::server::Builder::configure()
                    .include_reflection_service(false)
                    .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
            };
            reflection = Some(builder().build_v1()?);
            reflection_alpha = Some(builder().build_v1alpha()?);
        }

        let (stop_accepting_tx, stop_accepting) = tokio::sync::oneshot::channel::<()>();
        let server = grpc_server(&settings.server)
            // The `rpc` span, `x-request-id`, `server.request_timeout` and the per-RPC metrics.
            .layer(observe::RpcLayer::new(settings.server.request_timeout, &settings.server.trusted_proxies))
            .add_service(health_service)
            .add_optional_service(reflection)
            .add_optional_service(reflection_alpha)
            .add_service(pb::auth_service_server::AuthServiceServer::new(AuthApi::new(ctx.clone())))
            .add_service(pb::session_service_server::SessionServiceServer::new(SessionApi::new(ctx.clone())))
            .add_service(pb::password_service_server::PasswordServiceServer::new(PasswordApi::new(
                ctx.clone(),
            )))
            .add_service(pb::account_service_server::AccountServiceServer::new(AccountApi::new(ctx.clone())))
            // Envoy/Istio ext_authz. Not in reflection: envoy-types ships no descriptor set.
            .add_service(envoy_types::ext_authz::v3::pb::AuthorizationServer::new(ExtAuthzApi::new(
                ctx.auth.clone(),
            )));
        let stop = async {
            _ = stop_accepting.await;
        };
        // The router becomes the serving future, over plaintext TCP or TLS connections.
        let server = incoming.serve(server, stop);
        tracing::info!(%addr, tls = settings.server.tls.files().is_some(), "portcullis serving gRPC");

        tokio::pin!(server);
        tokio::pin!(shutdown);
        let result = tokio::select! {
            result = &mut server => result.context("gRPC server failed"),
            () = &mut shutdown => {
                tracing::info!(grace = ?settings.server.shutdown_grace, "shutting down: draining in-flight calls");
                _ = stopping_tx.send(true);
                readiness.set_stopping();
                health::report_all(&health_reporter, tonic_health::ServingStatus::NotServing).await;
                // Open Health/Watch streams would hold their connections (and the drain) open.
                health::end_watches(health_reporter.clone()).await;
                _ = stop_accepting_tx.send(());
                match tokio::time::timeout(settings.server.shutdown_grace, &mut server).await {
                    Ok(result) => result.context("gRPC server failed"),
                    Err(_) => {
                        tracing::warn!("shutdown grace period over: dropping calls still in flight");
                        Ok(())
                    }
                }
            }
        };
        _ = stopping_tx.send(true);
        // Activity noted during the drain is written now, once no call can add more.
        _ = drained_tx.send(true);
        _ = tokio::time::timeout(Duration::from_secs(5), activity_task).await;
        _ = tokio::time::timeout(Duration::from_secs(1), reconciler_task).await;
        _ = tokio::time::timeout(Duration::from_secs(1), purge_task).await;
        _ = tokio::time::timeout(Duration::from_secs(5), outbox_task).await;
        if let Some(ops_task) = ops_task {
            ops::finish(ops_task, Duration::from_secs(5)).await;
        }
        health_task.abort();
        tracing::info!("portcullis stopped");
        result
    }
}

/// An HTTP/2 PING goes to a connection that has sent nothing for this long...
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and the connection is closed when the PING is not answered within this: a client that
/// vanished (node gone, NAT entry dropped, no FIN or RST) stops holding a connection and its
/// calls' resources.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive probes after this much silence: the kernel notices dead peers too, and
/// middleboxes see traffic on idle connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The gRPC server of both modes, before its layers and services: connection keepalive
/// (HTTP/2 PING here; TCP keepalive on the accepted sockets in [`tls::Incoming::bind`], as
/// tonic's `Server::tcp_keepalive` is ignored with `serve_with_incoming`) and
/// `server.max_connection_age`. `server.request_timeout` is enforced by
/// [`observe::RpcLayer`], not by tonic's `timeout`, which would answer outside our layer
/// (without `x-request-id`).
/// The gRPC router of both modes: [`grpc_server`] with [`observe::RpcLayer`].
type GrpcRouter =
    tonic::transport::server::Router<tower_layer::Stack<observe::RpcLayer, tower_layer::Identity>>;

fn grpc_server(server: &crate::config::ServerSettings) -> Server {
    let builder = Server::builder()
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT));
    match server.max_connection_age {
        // A graceful close at that age (GOAWAY; calls in flight finish, unary ones within the
        // request timeout). Not `max_connection_age_grace`: in tonic 0.14 setting it skips
        // the graceful close and drops the connection at age + grace, calls and all.
        Some(age) => builder.max_connection_age(age),
        None => builder,
    }
}

/// Resolves once the flag turns true (or its sender is gone).
async fn until(mut flag: watch::Receiver<bool>) {
    _ = flag.wait_for(|set| *set).await;
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
