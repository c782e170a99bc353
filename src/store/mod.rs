//! Durable state: users, sessions, login guards and second factors. PostgreSQL in
//! production, SQLite by default.
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

    /// Counts one try against a failure budget BEFORE its secret is checked, so that of any
    /// number of concurrent tries on one key at most `budget.max_failures` are ever checked
    /// per window (a good try gives its count back with [`Store::clear_guard`]). ONE
    /// conditional upsert (`INSERT … ON CONFLICT DO UPDATE … WHERE … RETURNING`): concurrent
    /// callers queue on the row, and each sees the counts the others committed.
    ///
    /// While `locked_until > now` nothing changes (`Locked`). Otherwise a window that began
    /// at or before `now - window` starts again at `now` with this try as its first failure
    /// (and `lockouts` goes back to 0 when the guard has had no lock for
    /// `forget_lockouts_after`); within the window the try is counted while `failures <
    /// max_failures`, else nothing changes (`Exhausted`: the last tries of the budget are
    /// still being checked, and the one that fails will lock). A `max_failures` of 0 counts
    /// as 1: the first try of a window is always counted.
    async fn reserve_try(
        &self,
        key: &GuardKey,
        budget: &GuardBudget,
        now: OffsetDateTime,
    ) -> Result<TryReservation, StoreError>;

    /// Locks the guard until `until` (the try that reserved the budget's last failure
    /// failed): `lockouts + 1`, and the failure count starts again from 0 for when the lock
    /// ends. Only an unlocked guard is locked, so that of two callers only one locks (and
    /// alerts); returns whether this one did.
    async fn lock_guard(
        &self,
        key: &GuardKey,
        until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// A try proved good: the guard forgets its failures and lockouts (its row goes).
    async fn clear_guard(&self, key: &GuardKey) -> Result<(), StoreError>;

    /// The guard as stored; `None` when it has no row (no failure since it was cleared).
    async fn guard_state(&self, key: &GuardKey) -> Result<Option<GuardState>, StoreError>;

    /// Deletes guards whose window began before `cutoff` and that are not locked at or after
    /// it (retention): what is left of them is forgotten anyway. Returns how many.
    async fn purge_login_guards(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError>;

    /// Deletes MFA challenges that expired before `cutoff` (used or not): once expired they
    /// can never be answered, and only their count would grow. Returns how many.
    async fn purge_mfa_challenges(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError>;

    /// The live (not consumed, `expires_at > now`) challenge with this token hash.
    async fn find_mfa_challenge(
        &self,
        token_hash: &[u8],
        now: OffsetDateTime,
    ) -> Result<Option<MfaChallenge>, StoreError>;

    /// Spends a live challenge in ONE conditional UPDATE: of concurrent calls (two right
    /// answers at once) exactly one gets `true`, so one challenge opens one session.
    async fn consume_mfa_challenge(&self, id: Uuid, now: OffsetDateTime) -> Result<bool, StoreError>;

    /// Kills every live challenge of the user (its second-factor budget ran out: a new
    /// login, with the password, must come first). Returns how many.
    async fn consume_mfa_challenges_of(&self, user_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError>;

    /// The user's sealed TOTP secrets and last used step; `None` for an unknown user.
    async fn totp_state(&self, user_id: Uuid) -> Result<Option<TotpState>, StoreError>;

    /// Replay protection: records `step` as the last used TOTP time step, only if TOTP is
    /// enabled and `step` is after the last one, in ONE conditional UPDATE. Of concurrent
    /// calls with one step exactly one gets `true`; a code of a step not after the last
    /// used one is a replay.
    async fn advance_totp_step(&self, user_id: Uuid, step: i64) -> Result<bool, StoreError>;

    /// Spends an unused recovery code of the user in ONE conditional UPDATE: of concurrent
    /// calls with one code exactly one gets `true`.
    async fn consume_recovery_code(
        &self,
        user_id: Uuid,
        code_hash: &[u8],
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// How many of the user's recovery codes are unused.
    async fn remaining_recovery_codes(&self, user_id: Uuid) -> Result<u32, StoreError>;

    /// Whether the user has logged in from the device with this key before (see
    /// [`StoreTx::remember_device`]), without noting a sighting: decides, before the
    /// password is checked, which failure budget a try spends.
    async fn is_known_device(&self, user_id: Uuid, device_key: &[u8]) -> Result<bool, StoreError>;

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

    /// Mail neither sent nor given up (due, claimed, or waiting for a retry): the outbox
    /// backlog. Counted on the partial index the worker claims from.
    async fn count_pending_outbox(&self) -> Result<u64, StoreError>;

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
    /// mail to it, second-factor challenges and recovery codes, known devices, its login
    /// guards, its login attempts — also those that matched no account but named its
    /// username or email), first recording its live sessions as revocation tombstones
    /// (session id and instant only) so `revoked_since` still re-publishes them. Returns the
    /// ids of the sessions that were live. (Sessions already revoked but unexpired are kept
    /// as tombstones too, at their own revocation instant, but not returned.)
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

    /// Stores a challenge, first consuming the user's other live challenges (of any
    /// method): only the newest works. In the transaction that queues its mail, so a
    /// challenge never exists without its code on the way (nor a code without its challenge).
    async fn create_mfa_challenge(&mut self, challenge: &NewMfaChallenge) -> Result<(), StoreError>;

    /// Switches the emailed login code; closes the user's live challenges.
    async fn set_email_otp(
        &mut self,
        user_id: Uuid,
        enabled: bool,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Sets (or with `None` drops) the sealed TOTP secret awaiting confirmation; an enabled
    /// secret stays as it is until [`StoreTx::activate_totp`].
    async fn set_totp_pending(
        &mut self,
        user_id: Uuid,
        sealed: Option<&[u8]>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Enables TOTP with the pending secret, only if it is still `secret` (compare-and-swap:
    /// a `begin` that replaced it meanwhile wins, and the app's code was for the old one).
    /// The pending secret becomes the secret, `step` (the confirming code's) the last used
    /// one, the recovery codes are replaced by `recovery_hashes`, and live challenges close.
    /// Returns whether it enabled.
    async fn activate_totp(
        &mut self,
        user_id: Uuid,
        secret: &[u8],
        step: i64,
        recovery_hashes: &[Vec<u8>],
        now: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Disables TOTP: drops the secret, any pending one, the last step and the recovery
    /// codes, and consumes the user's live challenges.
    async fn disable_totp(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<(), StoreError>;

    /// Ends every live MFA challenge of the user (the password, the address or the second
    /// factors changed: a challenge opened before must not complete after).
    async fn close_mfa_challenges(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<(), StoreError>;

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

/// Which failure budget a try spends: one row of `login_guards`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardKey {
    /// `u:<user id>` for an account, `i:<hex hash>` for an identifier that named no account
    /// (made by the caller; opaque here).
    pub subject: String,
    /// `account`, `device:<hex key>` (a known device's own budget) or `otp` (second-factor
    /// failures).
    pub scope: String,
    /// The account of a `u:` subject: deleting the account deletes its guards.
    pub user_id: Option<Uuid>,
}

/// How many failures a guard allows, and for how long it remembers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardBudget {
    pub max_failures: u32,
    /// The counting window: it starts at the first failure, and a try after its end starts
    /// a new one.
    pub window: std::time::Duration,
    /// A guard that has had no lock for this long forgets its lockouts when a new window
    /// starts (so locks stop growing for an owner who mistyped long ago).
    pub forget_lockouts_after: std::time::Duration,
}

impl GuardBudget {
    /// Windows that began at or before this instant are over.
    fn window_start(&self, now: OffsetDateTime) -> OffsetDateTime {
        instant_before(now, self.window)
    }

    /// Locks that ended at or before this instant are forgotten.
    fn forget_cutoff(&self, now: OffsetDateTime) -> OffsetDateTime {
        instant_before(now, self.forget_lockouts_after)
    }
}

/// `now - span`, saturating at the start of year 1: earlier than anything stored, yet within
/// both engines' range (PostgreSQL's timestamptz starts in 4713 BC), so that an absurd span
/// means "never" rather than an error.
fn instant_before(now: OffsetDateTime, span: std::time::Duration) -> OffsetDateTime {
    let floor = time::macros::datetime!(0001-01-01 0:00 UTC);
    time::Duration::try_from(span)
        .ok()
        .and_then(|span| now.checked_sub(span))
        .map_or(floor, |start| start.max(floor))
}

/// What [`Store::reserve_try`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryReservation {
    /// This try is counted as failure number `failures` until it proves good; `lockouts`
    /// so far.
    Reserved { failures: u32, lockouts: u32 },
    /// Locked until then (nothing changed).
    Locked { until: OffsetDateTime },
    /// The budget is used up by tries still in flight (no lock set yet); nothing changed.
    Exhausted { lockouts: u32 },
}

/// A guard's row, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardState {
    pub failures: u32,
    /// Start of the current counting window.
    pub first_failure_at: OffsetDateTime,
    pub locked_until: Option<OffsetDateTime>,
    /// Consecutive lockouts: each lock lasts longer than the one before.
    pub lockouts: u32,
}

/// A second factor a login challenge asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MfaMethod {
    /// A code mailed to the account's address.
    EmailOtp,
    /// A code from an authenticator app (or a recovery code in its place).
    Totp,
}

impl MfaMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            MfaMethod::EmailOtp => "email_otp",
            MfaMethod::Totp => "totp",
        }
    }
}

/// A second-factor challenge: handed out by a login whose password was right, answered
/// with a code to open the session.
#[derive(Debug, Clone)]
pub struct NewMfaChallenge {
    pub id: Uuid,
    /// SHA-256 of the challenge token; the token itself is only ever in the login answer.
    pub token_hash: Vec<u8>,
    pub user_id: Uuid,
    pub method: MfaMethod,
    /// For `EmailOtp`: the keyed hash of the mailed code.
    pub code_hash: Option<Vec<u8>>,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

/// A live challenge, as [`Store::find_mfa_challenge`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MfaChallenge {
    pub id: Uuid,
    pub user_id: Uuid,
    pub method: MfaMethod,
    pub code_hash: Option<Vec<u8>>,
    pub expires_at: OffsetDateTime,
}

/// A user's TOTP secrets, sealed by the caller (opaque here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotpState {
    /// The enabled secret.
    pub secret: Option<Vec<u8>>,
    /// A secret begun but not yet confirmed with a code.
    pub pending_secret: Option<Vec<u8>>,
    /// The last time step whose code was accepted: codes of that step or earlier are replays.
    pub last_step: Option<i64>,
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
        // Every database error passes here once: `portcullis_store_errors_total`.
        crate::metrics::store_error(transient);
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
    /// The emailed login code is on.
    pub email_otp_enabled: bool,
    /// TOTP is on (a confirmed secret is stored; a pending one does not count).
    pub totp_enabled: bool,
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
    /// Authentication methods (RFC 8176) the login proved, e.g. `pwd`, `otp`: kept with the
    /// session so that access tokens issued on refresh still carry them.
    pub amr: Vec<String>,
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
    /// As given at login (see [`NewSession::amr`]).
    pub amr: Vec<String>,
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
    /// A second factor was switched on: sessions opened without it end.
    SecondFactorEnabled,
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
            RevokeReason::SecondFactorEnabled => "second_factor_enabled",
        }
    }
}
