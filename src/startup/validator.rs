//! `portcullis serve --mode validator`: the sidecar. ValidateToken, ext_authz Check, GetJwks
//! and health, no database: public keys from a JWKS (file or central instance), revocations
//! from Redis. Health is SERVING while the hot state answers. The ops HTTP server runs here
//! too: `/healthz`, `/readyz` (Redis), `/metrics` and `/.well-known/jwks.json` (the key set
//! as last fetched).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::sync::watch;
use tonic_health::ServingStatus;

use super::{connect_hot, grpc_server, health, observe, ops, tls, until};
use crate::{
    api::{ExtAuthzApi, ValidatorAuthApi, pb},
    config::Settings,
    hot::DynHotState,
    validator::{KeySource, Validator},
};

/// The services a validator reports health for.
const SERVICES: &[&str] = &["", "portcullis.v1.AuthService", crate::api::ext_authz::SERVICE_NAME];

pub struct ValidatorApp {
    settings: Settings,
    /// The gRPC listener: plaintext or TLS (`server.tls`), as the full server's.
    incoming: tls::Incoming,
    addr: SocketAddr,
    validator: Arc<Validator>,
    hot: DynHotState,
    /// The ops HTTP listener; `None` with `server.ops_enabled = false`.
    ops: Option<ops::OpsServer>,
}

impl ValidatorApp {
    pub async fn build(settings: Settings) -> anyhow::Result<ValidatorApp> {
        let source = KeySource::from_settings(&settings.validator)?;
        // Without the shared Redis a validator would never see a revocation.
        if settings.redis_url.is_none() && !settings.allow_memory_hot_state {
            anyhow::bail!(
                "validator mode needs redis_url (the central instance's Redis) to follow revocations; \
                 allow_memory_hot_state = true only for a local trial"
            );
        }
        let hot = connect_hot(&settings).await?;
        let validator = Validator::build(source, &settings.tokens, &settings.validator, hot.clone())
            .await
            .context("cannot load the public keys")?;
        let incoming = tls::Incoming::bind(&settings.server)?;
        let addr = incoming.local_addr()?;
        let ops = match settings.server.ops_enabled {
            true => Some(ops::OpsServer::bind(settings.server.ops_listen).await?),
            false => None,
        };
        Ok(ValidatorApp { settings, incoming, addr, validator: Arc::new(validator), hot, ops })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of the ops HTTP server, unless it is switched off.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops.as_ref().map(ops::OpsServer::local_addr)
    }

    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let ValidatorApp { settings, incoming, addr, validator, hot, ops } = self;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let (stopping_tx, stopping) = watch::channel(false);
        report(&reporter, ServingStatus::Serving).await;
        let readiness = ops::Readiness::new(settings.redis_url.is_some());
        let health_task = tokio::spawn(watch_hot_state(
            reporter.clone(),
            hot,
            readiness.clone(),
            settings.server.health_check_interval,
            stopping.clone(),
        ));
        // The ops server answers through the drain and stops after gRPC (`drained`).
        let (drained_tx, drained) = watch::channel(false);
        let ops_task = ops.map(|ops| {
            let keys = validator.clone();
            let state = ops::OpsState {
                jwks: Arc::new(move || axum::body::Bytes::from(keys.jwks())),
                readiness: readiness.clone(),
            };
            tokio::spawn(ops.serve(ops::router(state), until(drained)))
        });
        let refresh_task = tokio::spawn(
            validator.clone().refresh_every(settings.validator.jwks_refresh, until(stopping.clone())),
        );
        let reflection = if settings.server.reflection {
            Some(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1()?,
            )
        } else {
            None
        };
        let (stop_accepting_tx, stop_accepting) = tokio::sync::oneshot::channel::<()>();
        let server = grpc_server(&settings.server)
            // The `rpc` span, `x-request-id`, `server.request_timeout` and the per-RPC metrics.
            .layer(observe::RpcLayer::new(settings.server.request_timeout, &settings.server.trusted_proxies))
            .add_service(health_service)
            .add_optional_service(reflection)
            .add_service(pb::auth_service_server::AuthServiceServer::new(ValidatorAuthApi::new(
                validator.clone(),
            )))
            .add_service(envoy_types::ext_authz::v3::pb::AuthorizationServer::new(ExtAuthzApi::new(
                validator,
            )));
        let stop = async {
            _ = stop_accepting.await;
        };
        let server = incoming.serve(server, stop);
        tracing::info!(%addr, tls = settings.server.tls.files().is_some(), "portcullis validator serving gRPC");
        tokio::pin!(server);
        tokio::pin!(shutdown);
        let result = tokio::select! {
            result = &mut server => result.context("gRPC server failed"),
            () = &mut shutdown => {
                _ = stopping_tx.send(true);
                readiness.set_stopping();
                report(&reporter, ServingStatus::NotServing).await;
                _ = stop_accepting_tx.send(());
                match tokio::time::timeout(settings.server.shutdown_grace, &mut server).await {
                    Ok(result) => result.context("gRPC server failed"),
                    Err(_) => Ok(()),
                }
            }
        };
        _ = stopping_tx.send(true);
        _ = drained_tx.send(true);
        if let Some(ops_task) = ops_task {
            ops::finish(ops_task, Duration::from_secs(5)).await;
        }
        health_task.abort();
        refresh_task.abort();
        result
    }
}

async fn report(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for service in SERVICES {
        reporter.set_service_status(*service, status).await;
    }
}

/// SERVING (and ready) while the hot state answers (revocations cannot be known otherwise);
/// down after `health::FAILURES_BEFORE_DOWN` failed pings in a row, as in the full server.
async fn watch_hot_state(
    reporter: tonic_health::server::HealthReporter,
    hot: DynHotState,
    readiness: ops::Readiness,
    interval: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let mut last = ServingStatus::Serving;
    let mut pings = health::Debounce::default();
    loop {
        let answered = match tokio::time::timeout(health::PING_TIMEOUT, hot.ping()).await {
            Ok(answer) => answer.is_ok(),
            // An error answer was counted where it was made; a timeout is counted here.
            Err(_) => {
                crate::metrics::hot_state_error();
                false
            }
        };
        if *stopping.borrow() {
            return;
        }
        let up = pings.note(answered);
        let status = if up { ServingStatus::Serving } else { ServingStatus::NotServing };
        readiness.set_hot_state(up);
        if status != last {
            report(&reporter, status).await;
            last = status;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopping.changed() => return,
        }
    }
}
