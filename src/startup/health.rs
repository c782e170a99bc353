//! gRPC health: SERVING while the database and the hot state answer, NOT_SERVING when
//! either does not, and from the moment shutdown begins. The same pings feed `/readyz`
//! ([`Readiness`]). A dependency counts as down after [`FAILURES_BEFORE_DOWN`] failed pings
//! in a row (one lost ping does not take every replica out of rotation), and as up again at
//! its first answer.

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
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Failed pings in a row before a dependency is reported down (health and readiness). With
/// the default `server.health_check_interval` of 5 s, an outage shows within 5–12 s.
pub(super) const FAILURES_BEFORE_DOWN: u32 = 2;

/// Whether one dependency counts as up, from its pings: down after
/// [`FAILURES_BEFORE_DOWN`] failures in a row, up at the first success.
#[derive(Debug, Default)]
pub(super) struct Debounce {
    failures: u32,
}

impl Debounce {
    /// Notes one ping; returns whether the dependency counts as up.
    pub(super) fn note(&mut self, answered: bool) -> bool {
        self.failures = if answered { 0 } else { self.failures.saturating_add(1) };
        self.failures < FAILURES_BEFORE_DOWN
    }
}

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
    let (mut db_pings, mut redis_pings) = (Debounce::default(), Debounce::default());
    loop {
        let (db, redis) = tokio::join!(
            tokio::time::timeout(PING_TIMEOUT, store.ping()),
            tokio::time::timeout(PING_TIMEOUT, hot.ping()),
        );
        // A ping that returned an error was counted where the error was made; one cut short
        // here is counted here.
        let db = db
            .map_err(|_| {
                crate::metrics::store_error(true);
                "timed out".to_string()
            })
            .and_then(|r| r.map_err(|e| format!("{e:#}")));
        let redis = redis
            .map_err(|_| {
                crate::metrics::hot_state_error();
                "timed out".to_string()
            })
            .and_then(|r| r.map_err(|e| format!("{e:#}")));
        if *stopping.borrow() {
            return;
        }
        let (db_up, redis_up) = (db_pings.note(db.is_ok()), redis_pings.note(redis.is_ok()));
        readiness.set_database(db_up);
        readiness.set_hot_state(redis_up);
        if redis.is_err() {
            auth.hot_state_failed();
        }
        let status = if db_up && redis_up { ServingStatus::Serving } else { ServingStatus::NotServing };
        if last != Some(status) {
            if let Err(e) = &db
                && !db_up
            {
                tracing::warn!(error = %e, "database unreachable: reporting NOT_SERVING");
            }
            if let Err(e) = &redis
                && !redis_up
            {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failed_ping_is_not_an_outage() {
        let mut pings = Debounce::default();
        assert!(pings.note(false), "one failure: still up");
        assert!(pings.note(true));
        assert!(pings.note(false), "the count started over");
        assert!(!pings.note(false), "two in a row: down");
        assert!(!pings.note(false));
        assert!(pings.note(true), "up at the first answer");
    }
}
