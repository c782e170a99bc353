//! Login history: every attempt (success or failure) is recorded with when, what was typed,
//! the account it matched, the outcome, and where it came from; users page through their
//! own; a background job deletes attempts past the retention period.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Auth, AuthError, ClientInfo, Principal, register::now_micros};
use crate::store::{AttemptOutcome, LoginAttempt, NewLoginAttempt};

/// Page size when the caller asks for none, and the most a page may hold.
const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;

/// One page of history and the token of the next (None on the last page).
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub attempts: Vec<LoginAttempt>,
    pub next_page_token: Option<String>,
}

impl Auth {
    /// Records an attempt (and counts it in `portcullis_logins_total`, by its reason).
    /// Recording must not decide the login: a failure is logged.
    pub(crate) async fn record_attempt(
        &self,
        identifier: &str,
        user_id: Option<Uuid>,
        outcome: AttemptOutcome,
        reason: &str,
        client: &ClientInfo,
    ) {
        crate::metrics::login(crate::metrics::LoginOutcome::from_reason(reason));
        let attempt = NewLoginAttempt {
            id: Uuid::now_v7(),
            at: now_micros(),
            identifier: identifier.chars().take(254).collect(),
            user_id,
            outcome,
            reason: reason.to_string(),
            device: client.device(),
            location: self.locate(client),
        };
        if let Err(error) = self.store.record_login_attempt(&attempt).await {
            tracing::warn!(error = ?error, "cannot record a login attempt");
        }
    }

    /// Where the client is, when a GeoIP database is configured and knows its address.
    pub(crate) fn locate(&self, client: &ClientInfo) -> Option<crate::store::Location> {
        self.geo.as_ref().zip(client.ip).and_then(|(geo, ip)| geo.locate(ip))
    }

    /// The caller's attempts, newest first, `page_size` at a time (0: the default).
    pub async fn login_history(
        &self,
        principal: &Principal,
        page_size: u32,
        page_token: &str,
    ) -> Result<HistoryPage, AuthError> {
        let limit = match page_size {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                return Err(AuthError::invalid("page_size", format!("page_size must be at most {MAX_PAGE}")));
            }
            n => n,
        };
        let before = match page_token {
            "" => None,
            token => Some(
                decode_cursor(token)
                    .ok_or_else(|| AuthError::invalid("page_token", "page_token is not valid"))?,
            ),
        };
        // One more than asked tells whether there is a next page.
        let mut attempts = self.store.list_login_attempts(principal.user_id, before, limit + 1).await?;
        let next_page_token = if attempts.len() > limit as usize {
            attempts.truncate(limit as usize);
            attempts.last().map(|last| encode_cursor(last.at, last.id))
        } else {
            None
        };
        Ok(HistoryPage { attempts, next_page_token })
    }

    /// Deletes attempts older than `retention`, mail sent or given up that long ago, and
    /// failure budgets that can no longer matter, every `interval`, until `stop` resolves.
    pub async fn purge_history(
        &self,
        retention: Duration,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            let cutoff = OffsetDateTime::now_utc() - retention;
            match self.store.purge_login_attempts(cutoff).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "old login attempts deleted"),
                Err(error) => tracing::warn!(error = ?error, "cannot purge old login attempts"),
            }
            match self.store.purge_outbox(cutoff).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "old outbox rows deleted"),
                Err(error) => tracing::warn!(error = ?error, "cannot purge old outbox rows"),
            }
            // Failure budgets matter while their window, lock or lockout growth can: past
            // the longest of those a row says nothing.
            let horizon =
                [self.login.account_lockout, self.login.known_device_lockout, self.mfa.code_lockout]
                    .iter()
                    .map(|l| l.window.max(l.max_lockout))
                    .max()
                    .unwrap_or_default();
            match self.store.purge_mfa_challenges(OffsetDateTime::now_utc()).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "expired MFA challenges deleted"),
                Err(error) => tracing::warn!(error = ?error, "cannot purge MFA challenges"),
            }
            match self.store.purge_login_guards(OffsetDateTime::now_utc() - horizon).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "stale login guards deleted"),
                Err(error) => tracing::warn!(error = ?error, "cannot purge login guards"),
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = &mut stop => return,
            }
        }
    }
}

/// Page tokens are opaque to callers: `<at in µs>.<attempt id>`, base64url.
fn encode_cursor(at: OffsetDateTime, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{id}", at.unix_timestamp_nanos() / 1_000))
}

fn decode_cursor(token: &str) -> Option<(OffsetDateTime, Uuid)> {
    let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
    let (micros, id) = std::str::from_utf8(&raw).ok()?.split_once('.')?;
    let at =
        OffsetDateTime::from_unix_timestamp_nanos(micros.parse::<i128>().ok()?.checked_mul(1_000)?).ok()?;
    // Only instants an attempt can have: both databases store these, nothing else.
    let plausible = OffsetDateTime::UNIX_EPOCH..=OffsetDateTime::now_utc() + time::Duration::days(1);
    plausible.contains(&at).then_some(())?;
    Some((at, Uuid::parse_str(id).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
            + time::Duration::microseconds(123_456);
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)), Some((at, id)));
        for garbage in
            ["", "x", "!!!", &URL_SAFE_NO_PAD.encode("12.notauuid"), &URL_SAFE_NO_PAD.encode("abc.def")]
        {
            assert_eq!(decode_cursor(garbage), None, "{garbage}");
        }
    }
}
