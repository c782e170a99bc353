//! gRPC health: SERVING while the database and the hot state answer, NOT_SERVING when
//! either does not, and from the moment shutdown begins. The same pings feed `/readyz`
//! ([`Readiness`]).

use std::time::Duration;

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use super::ops::Readiness;
use crate::{auth::Auth, hot::DynHotState, store::DynStore};

/// The services health is reported for: the server as a whole ("") and each service.
const SERVICES: &[&str] = &[
    "",
    "portcullis.v1.AuthService",
    "portcullis.v1.SessionService",
    "portcullis.v1.PasswordService",
    "portcullis.v1.AccountService",
    crate::api::ext_authz::SERVICE_NAME,
];

pub async fn report_all(reporter: &HealthReporter, status: ServingStatus) {
    for service in SERVICES {
        reporter.set_service_status(*service, status).await;
    }
}

/// Ends every open `Health/Watch` stream (after NOT_SERVING was sent to it), so they do
/// not hold their connections open through a graceful shutdown.
pub async fn end_watches(mut reporter: HealthReporter) {
    for service in SERVICES {
        reporter.clear_service_status(service).await;
    }
}

/// A dependency that does not answer within this is down, not slow.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Pings both dependencies every `interval`: gRPC health changes when they change, and
/// `readiness` (what `/readyz` answers) follows every ping.
pub async fn watch_dependencies(
    reporter: HealthReporter,
    store: DynStore,
    hot: DynHotState,
    auth: std::sync::Arc<Auth>,
    readiness: Readiness,
    interval: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let mut last = Some(ServingStatus::Serving);
    loop {
        let (db, redis) = tokio::join!(
            tokio::time::timeout(PING_TIMEOUT, store.ping()),
            tokio::time::timeout(PING_TIMEOUT, hot.ping()),
        );
        let db = db.map_err(|_| "timed out".to_string()).and_then(|r| r.map_err(|e| format!("{e:#}")));
        let redis = redis.map_err(|_| "timed out".to_string()).and_then(|r| r.map_err(|e| format!("{e:#}")));
        if *stopping.borrow() {
            return;
        }
        readiness.set_database(db.is_ok());
        readiness.set_hot_state(redis.is_ok());
        if redis.is_err() {
            auth.hot_state_failed();
        }
        let status =
            if db.is_ok() && redis.is_ok() { ServingStatus::Serving } else { ServingStatus::NotServing };
        if last != Some(status) {
            if let Err(e) = &db {
                tracing::warn!(error = %e, "database unreachable: reporting NOT_SERVING");
            }
            if let Err(e) = &redis {
                tracing::warn!(error = %e, "hot state unreachable: reporting NOT_SERVING");
            }
            report_all(&reporter, status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopping.changed() => return,
        }
    }
}
