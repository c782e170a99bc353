//! gRPC health: SERVING while the database and the hot state answer, NOT_SERVING when
//! either does not, and from the moment shutdown begins.

use std::time::Duration;

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{hot::DynHotState, store::DynStore};

/// The services health is reported for: the server as a whole ("") and each service.
const SERVICES: &[&str] = &["", "portcullis.v1.AuthService", "portcullis.v1.SessionService"];

pub async fn report_all(reporter: &HealthReporter, status: ServingStatus) {
    for service in SERVICES {
        reporter.set_service_status(*service, status).await;
    }
}

pub async fn watch_dependencies(
    reporter: HealthReporter,
    store: DynStore,
    hot: DynHotState,
    interval: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let mut last = Some(ServingStatus::Serving);
    loop {
        let (db, redis) = tokio::join!(store.ping(), hot.ping());
        if *stopping.borrow() {
            return;
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
