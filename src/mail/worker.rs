//! The outbox worker: delivers the mail the flows queued, retrying with backoff.
//!
//! Mail is queued in the same transaction as the change it reports (see
//! [`crate::store::StoreTx::enqueue_mail`]); this worker picks it up afterwards, on its own
//! schedule, so a slow or dead SMTP server never slows down or fails a request.
//!
//! Delivery is at least once. A mail is claimed with a lease (no other replica takes it
//! meanwhile), sent, then marked sent; a crash between the send and the mark re-sends it
//! once the lease is over. Receivers can tell the copies apart by their identical
//! `Message-ID`. A failed attempt is retried after `initial_backoff * 2^(failures so far)`,
//! capped at `max_backoff`, plus up to 10 % jitter (so replicas and mails do not retry in
//! lockstep); after `max_attempts` attempts the mail is given up and its row kept with its
//! last error.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::{sync::Notify, time::Instant};

use super::transport::{MailError, MailTransport};
use crate::{
    config::MailSettings,
    store::{DynStore, OutboxMail},
};

/// Mails claimed at once.
const BATCH: u32 = 10;
/// How long a claimed mail is reserved for this worker: far longer than one delivery takes.
const LEASE: Duration = Duration::from_secs(120);
/// A safety net over the transport's own timeouts: one delivery never holds up the queue
/// longer than this. Deliveries of a batch stop once the lease could run out before the
/// next one ends, so a mail is never sent while another replica may have reclaimed it.
const SEND_TIMEOUT: Duration = Duration::from_secs(40);
/// A stored error is cut to this many characters.
const MAX_ERROR_CHARS: usize = 1000;

pub struct OutboxWorker {
    store: DynStore,
    transport: Arc<dyn MailTransport>,
    settings: MailSettings,
    wake: Arc<Notify>,
}

impl OutboxWorker {
    pub fn new(store: DynStore, transport: Arc<dyn MailTransport>, settings: MailSettings) -> OutboxWorker {
        OutboxWorker { store, transport, settings, wake: Arc::new(Notify::new()) }
    }

    /// Wakes the worker at once instead of at its next poll. Flows call `notify_one()` on it
    /// right after committing a transaction that queued mail; a wake-up sent while the
    /// worker is busy is kept, not lost.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Delivers mail until `stop` completes: everything due, then again every
    /// `poll_interval` or when woken. Never fails: store and transport errors are logged
    /// and retried later. `stop` is checked between deliveries, never during one; a caller
    /// in a hurry may drop this future instead (a mail it was sending goes again after its
    /// lease).
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut backlog_counted = None;
        loop {
            if self.deliver_due(stop.as_mut()).await == Run::Stopped {
                return;
            }
            // Not after every wake-up: a burst of mail would run `count(*)` per mail.
            let now = Instant::now();
            if backlog_due(backlog_counted, now, self.settings.poll_interval) {
                self.note_backlog().await;
                backlog_counted = Some(now);
            }
            tokio::select! {
                biased;
                () = stop.as_mut() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
    }

    /// Sets `portcullis_outbox_backlog` to the mail still pending (of every replica). At most
    /// once per `poll_interval` ([`backlog_due`]).
    async fn note_backlog(&self) {
        match self.store.count_pending_outbox().await {
            Ok(pending) => crate::metrics::outbox_backlog(pending),
            // The claim just before has said so already, at WARN.
            Err(error) => tracing::debug!(error = %error, "outbox: cannot count pending mail"),
        }
    }

    /// Claims and delivers batches until none is full (nothing more is due), the store
    /// fails, or `stop` completes.
    async fn deliver_due<F: Future<Output = ()>>(&self, mut stop: Pin<&mut F>) -> Run {
        loop {
            // Before the claim: the lease runs from here, however long the claim itself takes.
            let claimed_at = Instant::now();
            let batch = match self.store.claim_due_mail(OffsetDateTime::now_utc(), BATCH, LEASE).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(error = %error, "outbox: cannot claim mail; trying again later");
                    return Run::Continue;
                }
            };
            let full = batch.len() == BATCH as usize;
            let mut batch = batch.into_iter();
            while let Some(mail) = batch.next() {
                let stopped = tokio::select! {
                    biased;
                    () = stop.as_mut() => true,
                    () = std::future::ready(()) => false,
                };
                if stopped {
                    // Hand the rest back now rather than leave it leased: the next worker
                    // (perhaps this process restarted) sends it at once. Only while the
                    // lease is ours: after it, another worker may be sending these.
                    if claimed_at.elapsed() < LEASE {
                        let rest: Vec<_> = std::iter::once(mail).chain(batch).map(|m| m.id).collect();
                        if let Err(error) = self.store.release_mail(&rest, OffsetDateTime::now_utc()).await {
                            tracing::warn!(error = %error, "outbox: cannot release claimed mail; it goes after its lease");
                        }
                    }
                    return Run::Stopped;
                }
                if claimed_at.elapsed() + SEND_TIMEOUT >= LEASE {
                    // Also back after the lease; claim afresh meanwhile.
                    break;
                }
                self.deliver(mail).await;
            }
            if !full {
                return Run::Continue;
            }
        }
    }

    async fn deliver(&self, mail: OutboxMail) {
        let attempt = mail.attempts + 1;
        let result = tokio::time::timeout(SEND_TIMEOUT, self.transport.send(&mail))
            .await
            .unwrap_or(Err(MailError::Timeout(SEND_TIMEOUT)));
        if result.is_ok() {
            crate::metrics::mail_delivered();
        }
        match result {
            Ok(()) => match self.store.mail_sent(mail.id, OffsetDateTime::now_utc()).await {
                Ok(()) => tracing::info!(mail_id = %mail.id, attempt, "outbox: mail delivered"),
                Err(error) => tracing::error!(
                    mail_id = %mail.id,
                    error = %error,
                    "outbox: mail delivered but not recorded as sent; it will be sent again after its lease"
                ),
            },
            Err(error) => {
                let reason: String = error_chain(&error).chars().take(MAX_ERROR_CHARS).collect();
                let next = if error.is_permanent() || attempt >= self.settings.max_attempts {
                    tracing::error!(mail_id = %mail.id, attempt, error = %reason, "outbox: giving up on mail");
                    None
                } else {
                    let delay = backoff(&self.settings, mail.attempts, jitter());
                    tracing::warn!(
                        mail_id = %mail.id,
                        attempt,
                        retry_in = ?delay,
                        error = %reason,
                        "outbox: delivery failed; will retry"
                    );
                    Some(later(OffsetDateTime::now_utc(), delay))
                };
                crate::metrics::mail_delivery_failed(next.is_none());
                if let Err(error) = self.store.mail_failed(mail.id, &reason, next).await {
                    tracing::warn!(
                        mail_id = %mail.id,
                        error = %error,
                        "outbox: cannot record the failed attempt; it is retried after its lease"
                    );
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Run {
    Continue,
    Stopped,
}

/// Whether the backlog gauge is to be counted again: at most once per `every`
/// (`mail.poll_interval`), so the gauge is at most about that old.
fn backlog_due(last: Option<Instant>, now: Instant, every: Duration) -> bool {
    last.is_none_or(|last| now.saturating_duration_since(last) >= every)
}

/// The wait after a failed attempt, given the failures before it and `jitter` in [0, 1):
/// `initial_backoff * 2^failures_before`, capped at `max_backoff`, plus up to 10 %.
fn backoff(settings: &MailSettings, failures_before: u32, jitter: f64) -> Duration {
    let factor = 2u32.checked_pow(failures_before).unwrap_or(u32::MAX);
    let base = settings.initial_backoff.saturating_mul(factor).min(settings.max_backoff);
    base + base.mul_f64(0.1 * jitter.clamp(0.0, 1.0))
}

/// A uniform fraction in [0, 1) from the system random source (0 if it fails: jitter is a
/// nicety).
fn jitter() -> f64 {
    let mut bytes = [0u8; 4];
    match aws_lc_rs::rand::fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.0,
    }
}

fn later(now: OffsetDateTime, delay: Duration) -> OffsetDateTime {
    now.saturating_add(time::Duration::try_from(delay).unwrap_or(time::Duration::MAX))
}

/// The error with its causes, as one line for the outbox row and the log.
fn error_chain(error: &MailError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let shown = cause.to_string();
        // lettre's errors already include their cause in their message.
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(initial_ms: u64, max_ms: u64) -> MailSettings {
        MailSettings {
            initial_backoff: Duration::from_millis(initial_ms),
            max_backoff: Duration::from_millis(max_ms),
            ..MailSettings::default()
        }
    }

    #[test]
    fn the_backlog_is_counted_at_most_once_per_poll_interval() {
        let every = Duration::from_secs(2);
        let start = Instant::now();
        assert!(backlog_due(None, start, every), "counted on the first pass");
        assert!(!backlog_due(Some(start), start, every));
        assert!(!backlog_due(Some(start), start + Duration::from_millis(1999), every));
        assert!(backlog_due(Some(start), start + every, every));
        assert!(backlog_due(Some(start), start + Duration::from_secs(60), every));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = settings(5_000, 3_600_000);
        let secs = |failures| backoff(&s, failures, 0.0).as_secs();
        assert_eq!([secs(0), secs(1), secs(2), secs(3)], [5, 10, 20, 40]);
        assert_eq!(secs(10), 3600);
        assert_eq!(secs(40), 3600); // 2^40 overflows u32: still the cap
        assert_eq!(secs(u32::MAX), 3600);
    }

    #[test]
    fn jitter_adds_at_most_ten_percent() {
        let s = settings(1_000, 60_000);
        assert_eq!(backoff(&s, 1, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(&s, 1, 0.5), Duration::from_millis(2_100));
        assert!(backoff(&s, 1, 0.999_999) < Duration::from_millis(2_200));
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn far_retries_saturate_instead_of_panicking() {
        let now = OffsetDateTime::now_utc();
        assert!(later(now, Duration::MAX) > now);
        assert_eq!(later(now, Duration::from_secs(60)), now + time::Duration::seconds(60));
    }

    #[test]
    fn error_chain_includes_causes_once() {
        let error = MailError::File {
            path: "/x/y.eml".into(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(error_chain(&error), "cannot write mail file /x/y.eml: denied");
    }
}
