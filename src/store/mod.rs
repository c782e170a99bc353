//! Durable state: users and sessions. PostgreSQL in production, SQLite by default.
//!
//! Both engines implement [`Store`]; `tests/store_conformance.rs` runs one suite against
//! both so they cannot drift apart. SQL lives in the module of the engine that runs it.

mod postgres;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Everything the flows need from durable storage.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip, for health checks.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Runs this engine's migrations (idempotent).
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Inserts a user. [`StoreError::Conflict`] names the field when the username or
    /// email key is taken.
    async fn create_user(&self, user: &NewUser) -> Result<UserRecord, StoreError>;

    /// Finds a user whose `username_key` or `email_key` equals `login_key`.
    async fn find_user_by_login(&self, login_key: &str) -> Result<Option<UserRecord>, StoreError>;

    async fn find_user(&self, user_id: Uuid) -> Result<Option<UserRecord>, StoreError>;

    /// Replaces the stored password hash only if it is still `expected` (compare-and-swap),
    /// so upgrading a hash at login can never undo a password change that committed in
    /// between. Returns whether it replaced it.
    async fn replace_password_hash(
        &self,
        user_id: Uuid,
        expected: &str,
        new_hash: &str,
    ) -> Result<bool, StoreError>;

    async fn create_session(&self, session: &NewSession) -> Result<SessionRecord, StoreError>;

    /// Atomically replaces the refresh token of the live session whose current refresh
    /// hash is `rotation.presented_hash`, in ONE conditional statement: of any number of
    /// concurrent calls with the same presented hash, at most one returns `Rotated`.
    ///
    /// A session is live when it is not revoked, `expires_at > now` and
    /// `refreshed_at > idle_cutoff`. On success `prev_refresh_hash` becomes the presented
    /// hash and `refreshed_at`/`last_active_at` become `now`.
    async fn rotate_refresh_token(&self, rotation: &RefreshRotation) -> Result<RotateOutcome, StoreError>;

    async fn find_session(&self, session_id: Uuid) -> Result<Option<SessionRecord>, StoreError>;

    /// Revokes one session of `user_id` (idempotent). Returns `false` when no session with
    /// that id belongs to that user; `true` when it exists, whether or not it was already
    /// revoked (so callers can re-publish a revocation).
    async fn revoke_session(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        reason: RevokeReason,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Revokes every unrevoked session of `user_id`, except `keep` if given. Returns the
    /// ids it revoked.
    async fn revoke_user_sessions(
        &self,
        user_id: Uuid,
        keep: Option<Uuid>,
        reason: RevokeReason,
        now: OffsetDateTime,
    ) -> Result<Vec<Uuid>, StoreError>;

    /// Sessions of `user_id` that are neither revoked nor past `expires_at`, most recently
    /// active first.
    async fn list_active_sessions(
        &self,
        user_id: Uuid,
        now: OffsetDateTime,
    ) -> Result<Vec<SessionRecord>, StoreError>;

    /// Write-behind of "last active": raises `last_active_at` to the given instant (never
    /// lowers it) for each session. Best effort: PostgreSQL skips rows another transaction
    /// holds locked at that moment rather than wait (no deadlocks between replicas).
    async fn record_activity(&self, activity: &[(Uuid, OffsetDateTime)]) -> Result<(), StoreError>;

    /// Sessions of `user_id` revoked at or after `since`: what a retried "revoke all" must
    /// publish again, even though the store already holds them revoked.
    async fn revoked_sessions_of(
        &self,
        user_id: Uuid,
        since: OffsetDateTime,
    ) -> Result<Vec<Uuid>, StoreError>;

    /// Sessions revoked at or after `since`, with their revocation instant: the
    /// revocations whose access tokens may still be alive, re-published to the hot state.
    /// Includes the sessions of deleted accounts (kept as tombstones without personal data).
    async fn revoked_since(&self, since: OffsetDateTime) -> Result<Vec<(Uuid, OffsetDateTime)>, StoreError>;

    /// Records one login attempt (success or failure) for the user's history and for audit.
    async fn record_login_attempt(&self, attempt: &NewLoginAttempt) -> Result<(), StoreError>;

    /// The user's attempts, newest first (by `at`, then id), strictly older than `before`
    /// when given (keyset pagination), at most `limit`.
    async fn list_login_attempts(
        &self,
        user_id: Uuid,
        before: Option<(OffsetDateTime, Uuid)>,
        limit: u32,
    ) -> Result<Vec<LoginAttempt>, StoreError>;

    /// Deletes attempts older than `cutoff` (retention). Returns how many.
    async fn purge_login_attempts(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError>;

    /// Starts a transaction, for flows that change several things at once: a state change
    /// and the mail that reports it commit together or not at all.
    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError>;

    /// The user a live (unused, unexpired) token of that purpose belongs to, without
    /// spending it: lets a front end tell whether a link is still good.
    async fn peek_token(
        &self,
        hash: &[u8],
        purpose: TokenPurpose,
        now: OffsetDateTime,
    ) -> Result<Option<Uuid>, StoreError>;

    /// Claims up to `limit` mails due for delivery (`next_attempt_at <= now`, not sent, not
    /// given up) by moving their `next_attempt_at` to `now + lease`, so that no other
    /// worker (replica) takes them meanwhile (PostgreSQL: `FOR UPDATE SKIP LOCKED`). A
    /// worker that dies mid-delivery leaves them to be retried after the lease.
    async fn claim_due_mail(
        &self,
        now: OffsetDateTime,
        limit: u32,
        lease: std::time::Duration,
    ) -> Result<Vec<OutboxMail>, StoreError>;

    /// Gives claimed, not-yet-attempted mail back (a worker stopping mid-batch): due at
    /// once, without counting an attempt. Sent or given-up mail is left alone.
    async fn release_mail(&self, ids: &[Uuid], now: OffsetDateTime) -> Result<(), StoreError>;

    /// Deletes mail sent or given up before `cutoff` (retention). Returns how many.
    async fn purge_outbox(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError>;

    /// Records a delivery, and blanks the body: it holds live links, which must not stay
    /// readable at rest once they have been handed over.
    async fn mail_sent(&self, id: Uuid, now: OffsetDateTime) -> Result<(), StoreError>;

    /// Records a failed attempt: `attempts + 1`, `last_error`, and the next attempt's time,
    /// or `None` to give up (the row stays, with its last error; its body is blanked, as on
    /// delivery).
    async fn mail_failed(
        &self,
        id: Uuid,
        error: &str,
        next_attempt_at: Option<OffsetDateTime>,
    ) -> Result<(), StoreError>;
}

/// One transaction (see [`Store::begin`]). Dropping it without `commit` rolls it back.
/// Operations mirror the `Store` ones of the same name. A [`StoreError::Conflict`] leaves the
/// transaction usable (PostgreSQL runs those statements in a savepoint); after any other
/// error, drop it.
///
/// On SQLite a transaction holds the database's write lock from `begin` to its end: do not
/// write through the [`Store`] while holding one (that write waits for the lock, then fails
/// as `Unavailable`; with an in-memory database, whose pool has one connection, any `Store`
/// call waits for the acquire timeout).
#[async_trait]
pub trait StoreTx: Send {
    async fn create_user(&mut self, user: &NewUser) -> Result<UserRecord, StoreError>;

    /// Reads the user and locks the row until the end of the transaction (PostgreSQL
    /// `FOR UPDATE`; SQLite transactions hold the write lock from `BEGIN IMMEDIATE`).
    async fn lock_user(&mut self, user_id: Uuid) -> Result<Option<UserRecord>, StoreError>;

    async fn find_user_by_login(&mut self, login_key: &str) -> Result<Option<UserRecord>, StoreError>;

    /// Stores a single-use token, first invalidating (marking used) the user's unused
    /// tokens of the same purpose when [`TokenPurpose::replaces_older`]: requesting a new
    /// link kills the older ones.
    async fn issue_token(&mut self, token: &NewOneTimeToken) -> Result<(), StoreError>;

    /// Spends a live token of that purpose in ONE conditional statement (`UPDATE … SET
    /// used_at = now WHERE hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at >
    /// now RETURNING …`): of concurrent calls, at most one gets `Some`. `None` when the
    /// token is unknown, used, expired or of another purpose.
    async fn consume_token(
        &mut self,
        hash: &[u8],
        purpose: TokenPurpose,
        now: OffsetDateTime,
    ) -> Result<Option<SpentToken>, StoreError>;

    /// Kills every unused token of the user of that purpose (e.g. when the password
    /// changes, pending reset links die with it).
    async fn invalidate_tokens(
        &mut self,
        user_id: Uuid,
        purpose: TokenPurpose,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    async fn enqueue_mail(&mut self, mail: &NewMail) -> Result<(), StoreError>;

    async fn set_password_hash(
        &mut self,
        user_id: Uuid,
        password_hash: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Sets `email_verified_at` if unset. Returns whether it changed.
    async fn mark_email_verified(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<bool, StoreError>;

    /// Replaces the email (already verified by the caller's flow, so `email_verified_at`
    /// becomes `now`). `Conflict("email")` when another account holds the key.
    async fn set_email(
        &mut self,
        user_id: Uuid,
        email: &str,
        email_key: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Changes only the fields that are `Some` (and `updated_at`). An unknown user is
    /// `Database(RowNotFound)`.
    async fn update_profile(
        &mut self,
        user_id: Uuid,
        changes: &ProfileChanges,
        now: OffsetDateTime,
    ) -> Result<UserRecord, StoreError>;

    async fn revoke_user_sessions(
        &mut self,
        user_id: Uuid,
        keep: Option<Uuid>,
        reason: RevokeReason,
        now: OffsetDateTime,
    ) -> Result<Vec<Uuid>, StoreError>;

    /// Deletes the account and everything personal about it (sessions, tokens, queued
    /// mail to it, its login attempts — also those that matched no account but named its
    /// username or email), first recording its live sessions as revocation tombstones (session id
    /// and instant only) so `revoked_since` still re-publishes them. Returns the ids of the
    /// sessions that were live. (Sessions already revoked but unexpired are kept as
    /// tombstones too, at their own revocation instant, but not returned.)
    async fn delete_user(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<Vec<Uuid>, StoreError>;

    /// Notes that `user_id` logged in from the device with this key (a hash) and says
    /// whether it was new. Callers lock the user first, so concurrent sightings on one
    /// account are serialised: of concurrent first sightings exactly one is `New`.
    async fn remember_device(
        &mut self,
        user_id: Uuid,
        device_key: &[u8],
        now: OffsetDateTime,
    ) -> Result<DeviceSighting, StoreError>;

    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// What a single-use token is for; a token never works for another purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPurpose {
    VerifyEmail,
    ResetPassword,
    /// Confirms a new address; the token carries it.
    ChangeEmail,
    /// "This wasn't me", from a new-device alert: ends every session, starts a reset.
    DisownLogin,
}

impl TokenPurpose {
    /// Whether issuing a token kills the user's older unused ones of the purpose. Not for
    /// "this wasn't me": a burst of new-device alerts must not kill the link the owner is
    /// about to click (spending any of them kills them all).
    pub fn replaces_older(self) -> bool {
        !matches!(self, TokenPurpose::DisownLogin)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TokenPurpose::VerifyEmail => "verify_email",
            TokenPurpose::ResetPassword => "reset_password",
            TokenPurpose::ChangeEmail => "change_email",
            TokenPurpose::DisownLogin => "disown_login",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewOneTimeToken {
    /// SHA-256 of the token; the token itself is only ever in the mail.
    pub hash: Vec<u8>,
    pub user_id: Uuid,
    pub purpose: TokenPurpose,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    /// For `ChangeEmail`: the address to switch to once confirmed.
    pub new_email: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpentToken {
    pub user_id: Uuid,
    pub new_email: Option<String>,
}

/// A mail queued in the outbox, in the same transaction as the change it reports.
#[derive(Debug, Clone)]
pub struct NewMail {
    pub id: Uuid,
    /// The account it concerns, if any: its queued mail goes when the account is deleted.
    pub user_id: Option<Uuid>,
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMail {
    pub id: Uuid,
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub attempts: u32,
    pub created_at: OffsetDateTime,
    pub last_error: Option<String>,
}

/// Whether a login came from a device the user had used before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSighting {
    Known,
    /// First time from this device; `first_device` when the user had no device at all yet
    /// (their very first login, which warrants no alert).
    New {
        first_device: bool,
    },
}

/// Where an IP address is, per the configured GeoIP database.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Location {
    /// ISO 3166-1 alpha-2, e.g. `GB`.
    pub country: String,
    pub city: String,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
}

/// How a login attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Success,
    Failure,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Success => "success",
            AttemptOutcome::Failure => "failure",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewLoginAttempt {
    pub id: Uuid,
    pub at: OffsetDateTime,
    /// What was typed as username or email (bounded), kept for audit even when it matched
    /// no account.
    pub identifier: String,
    /// The account it matched, if any.
    pub user_id: Option<Uuid>,
    pub outcome: AttemptOutcome,
    /// A stable code: `ok`, `invalid_credentials`, `email_not_verified`, …
    pub reason: String,
    pub device: DeviceInfo,
    pub location: Option<Location>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoginAttempt {
    pub id: Uuid,
    pub at: OffsetDateTime,
    pub identifier: String,
    pub user_id: Option<Uuid>,
    pub outcome: AttemptOutcome,
    pub reason: String,
    pub device: DeviceInfo,
    pub location: Option<Location>,
}

/// Profile fields to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileChanges {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub bio: Option<String>,
}

pub type DynStore = Arc<dyn Store>;

/// Storage failures, as the flows need to tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique key is taken; the field is `"username"` or `"email"`.
    #[error("{0} already exists")]
    Conflict(&'static str),
    /// The database cannot be reached or timed out: retrying later may work.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error")]
    Database(#[source] sqlx::Error),
    #[error("migration failed")]
    Migration(#[source] sqlx::migrate::MigrateError),
    /// A stored value could not be decoded (e.g. a malformed roles column).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        let transient = match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_code(&code)),
            _ => false,
        };
        if transient { StoreError::Unavailable(error) } else { StoreError::Database(error) }
    }
}

/// Database error codes after which retrying later may well work: PostgreSQL connection
/// exceptions (08xxx), shutdown/failover (57P01-57P03), serialization failures and deadlocks
/// (40001, 40P01), too many connections (53300), statement timeout (57014); SQLite
/// BUSY/LOCKED (primary codes 5 and 6, whatever their extended code).
fn is_transient_code(code: &str) -> bool {
    // PostgreSQL SQLSTATEs are always five characters; SQLite codes are shorter integers.
    if code.len() < 5
        && let Ok(sqlite) = code.parse::<u32>()
    {
        return matches!(sqlite & 0xff, 5 | 6);
    }
    code.starts_with("08")
        || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "53300" | "57014")
}

#[cfg(test)]
mod tests {
    #[test]
    fn transient_codes() {
        for code in ["08006", "57P01", "40P01", "40001", "53300", "57014", "5", "517", "6", "262"] {
            assert!(super::is_transient_code(code), "{code}");
        }
        for code in ["23505", "42P01", "1", "19", "2067"] {
            assert!(!super::is_transient_code(code), "{code}");
        }
    }
}

/// A user to insert. Keys are the case-folded username and email, unique across users.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub id: Uuid,
    pub username: String,
    pub username_key: String,
    pub email: String,
    pub email_key: String,
    pub password_hash: String,
    pub first_name: String,
    pub last_name: String,
    pub roles: Vec<String>,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub id: Uuid,
    pub username: String,
    pub email: String,
    pub password_hash: String,
    pub first_name: String,
    pub last_name: String,
    pub phone: String,
    pub bio: String,
    pub roles: Vec<String>,
    pub email_verified_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
}

/// Where a session was opened from, as parsed at login.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceInfo {
    pub device_type: String,
    pub browser: String,
    pub os: String,
    pub user_agent: String,
    pub ip_address: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: Uuid,
    pub user_id: Uuid,
    /// SHA-256 of the refresh token; the token itself is never stored.
    pub refresh_hash: Vec<u8>,
    pub device: DeviceInfo,
    pub location: Option<Location>,
    pub created_at: OffsetDateTime,
    /// The absolute end of the session.
    pub expires_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub id: Uuid,
    pub user_id: Uuid,
    pub device: DeviceInfo,
    pub location: Option<Location>,
    pub created_at: OffsetDateTime,
    pub last_active_at: OffsetDateTime,
    /// Last login or refresh: the idle timeout counts from here.
    pub refreshed_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone)]
pub struct RefreshRotation {
    pub presented_hash: Vec<u8>,
    pub new_hash: Vec<u8>,
    pub now: OffsetDateTime,
    /// Sessions last refreshed at or before this instant are idle-expired.
    pub idle_cutoff: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RotateOutcome {
    /// The presented token was current; the session now holds the new hash.
    Rotated(SessionRecord),
    /// The presented token is the one rotated away most recently (`prev_refresh_hash`) of
    /// a session that is not revoked: a replay, or a lost race with a concurrent refresh.
    Superseded(SessionRecord),
    /// The presented token is current, but its session is revoked or expired.
    Dead(SessionRecord),
    /// No session knows this token.
    Unknown,
}

impl RotateOutcome {
    /// Why a presented hash that the rotation did not take failed, given the session that
    /// holds it as current (`is_current`) or as its previous hash.
    pub fn not_rotated(is_current: bool, session: SessionRecord) -> RotateOutcome {
        if is_current || session.revoked_at.is_some() {
            RotateOutcome::Dead(session)
        } else {
            RotateOutcome::Superseded(session)
        }
    }
}

/// Why a session ended; stored with it for support and audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    Logout,
    RevokedByUser,
    RefreshTokenReuse,
    PasswordReset,
    PasswordChanged,
    AccountDeleted,
    /// The owner followed "this wasn't me" from a new-device alert.
    LoginDisowned,
}

impl RevokeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::Logout => "logout",
            RevokeReason::RevokedByUser => "revoked_by_user",
            RevokeReason::RefreshTokenReuse => "refresh_token_reuse",
            RevokeReason::PasswordReset => "password_reset",
            RevokeReason::PasswordChanged => "password_changed",
            RevokeReason::AccountDeleted => "account_deleted",
            RevokeReason::LoginDisowned => "login_disowned",
        }
    }
}
