//! "Last active" write-behind: ValidateToken notes sessions in memory; a background task
//! writes them to the store in one batch per interval, so the hot path never writes SQL and
//! a session costs at most one write per interval however often it is validated.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use time::OffsetDateTime;
use uuid::Uuid;

use crate::store::DynStore;

#[derive(Default)]
pub struct ActivityRecorder {
    pending: Mutex<HashMap<Uuid, OffsetDateTime>>,
}

impl ActivityRecorder {
    pub fn record(&self, session: Uuid, at: OffsetDateTime) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let entry = pending.entry(session).or_insert(at);
        *entry = (*entry).max(at);
    }

    /// Activity noted for `session` and not flushed yet.
    pub fn pending(&self, session: Uuid) -> Option<OffsetDateTime> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).get(&session).copied()
    }

    /// Writes out what was noted. On failure the batch is put back (merged with newer
    /// activity) for the next attempt.
    pub async fn flush(&self, store: &DynStore) {
        let batch: Vec<(Uuid, OffsetDateTime)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.drain().collect()
        };
        if batch.is_empty() {
            return;
        }
        if let Err(error) = store.record_activity(&batch).await {
            tracing::warn!(error = ?error, sessions = batch.len(), "cannot record session activity; will retry");
            for (session, at) in batch {
                self.record(session, at);
            }
        }
    }

    /// Flushes every `interval` until `stop` resolves, then once more.
    pub async fn run(
        &self,
        store: DynStore,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.flush(&store).await,
                _ = &mut stop => break,
            }
        }
        self.flush(&store).await;
    }
}
