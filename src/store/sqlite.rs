//! [`Store`] on SQLite: the default engine, for single-node deployments.
//!
//! Instants are stored as INTEGER Unix microseconds (see the migration); ids as 16-byte
//! BLOBs; roles and session `amr` as JSON arrays in TEXT.
//!
//! Concurrency: SQLite has one writer at a time. Single-statement writes (autocommit) wait
//! for the write lock through `busy_timeout`. A deferred transaction that reads and then
//! writes cannot wait (SQLite fails it at once with "database is locked"), so every
//! multi-statement write transaction starts with `BEGIN IMMEDIATE`.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqlStr, Sqlite, Transaction};
use time::{OffsetDateTime, PrimitiveDateTime};
use uuid::Uuid;

use super::{
    AttemptOutcome, DeviceInfo, DeviceSighting, GuardBudget, GuardKey, GuardState, Location, LoginAttempt,
    MfaChallenge, MfaMethod, NewLoginAttempt, NewMail, NewMfaChallenge, NewOneTimeToken, NewSession, NewUser,
    OutboxMail, ProfileChanges, RefreshRotation, RevokeReason, RotateOutcome, SessionRecord, SpentToken,
    Store, StoreError, StoreTx, TokenPurpose, TotpState, TryReservation, UserRecord,
};

/// The columns [`user_from_row`] reads, as a literal so queries can `concat!` it.
macro_rules! user_columns {
    () => {
        "id, username, email, password_hash, first_name, last_name, phone, bio, roles, email_verified_at, \
         created_at, email_otp_enabled, totp_secret IS NOT NULL AS totp_enabled"
    };
}

/// The columns [`guard_from_row`] reads.
macro_rules! guard_columns {
    () => {
        "failures, first_failure_at, locked_until, lockouts"
    };
}

/// The columns [`challenge_from_row`] reads.
macro_rules! challenge_columns {
    () => {
        "id, user_id, method, code_hash, expires_at"
    };
}

/// The columns [`mail_from_row`] reads.
macro_rules! mail_columns {
    () => {
        "id, recipient, subject, body_text, body_html, attempts, created_at, last_error"
    };
}

/// The columns [`session_from_row`] reads.
macro_rules! session_columns {
    () => {
        "id, user_id, device_type, browser, os, user_agent, ip_address, device_fingerprint, \
         created_at, last_active_at, refreshed_at, expires_at, revoked_at, country, city, latitude, longitude, \
         amr"
    };
}

/// The columns [`attempt_from_row`] reads.
macro_rules! attempt_columns {
    () => {
        "id, at, identifier, user_id, outcome, reason, ip_address, user_agent, device_fingerprint, \
         device_type, browser, os, country, city, latitude, longitude"
    };
}

/// How long a statement waits for another connection's write lock before failing, when
/// no statement timeout is given.
const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating it and its directory if missing) the database at `url`, e.g.
    /// `sqlite://data/portcullis.db` or `sqlite::memory:`, with one connection opened right
    /// away so a bad path fails start-up.
    ///
    /// `statement_timeout` (the setting PostgreSQL enforces server-side) becomes SQLite's
    /// busy timeout: how long a statement waits for another connection's write lock before
    /// failing as [`StoreError::Unavailable`], the one wait on other connections an SQLite
    /// statement has. Zero means the default of 10 s (an unbounded wait is not offered).
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
        statement_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let busy_timeout = if statement_timeout.is_zero() { DEFAULT_BUSY_TIMEOUT } else { statement_timeout };
        // synchronous=FULL: with WAL, NORMAL may lose the last commits on power loss or an OS
        // crash (they are durable only at the next checkpoint). An auth store must not
        // resurrect a revoked session or roll a rotation back to a refresh token already
        // handed out and replaced, so every commit is synced; its writes are few and small.
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(busy_timeout)
            .synchronous(SqliteSynchronous::Full);
        let pool_options = SqlitePoolOptions::new().acquire_timeout(acquire_timeout);

        let pool = if url.contains(":memory:") || url.contains("mode=memory") {
            // An in-memory database lives as long as one connection to it: keep exactly one,
            // forever. (WAL does not apply to memory databases.)
            pool_options
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await?
        } else {
            if let Some(parent) = options.get_filename().parent()
                && !parent.as_os_str().is_empty()
            {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|error| StoreError::Unavailable(sqlx::Error::Io(error)))?;
            }
            // WAL: readers never block the writer nor the writer readers.
            pool_options
                .max_connections(max_connections.max(1))
                .connect_with(options.journal_mode(SqliteJournalMode::Wal))
                .await?
        };
        Ok(Self { pool })
    }

    /// Migrations are embedded so `migrate` works from any working directory (and without
    /// sqlx's `migrate!` macro).
    fn migrator() -> Migrator {
        Migrator::with_migrations(vec![
            Migration::new(
                1,
                "users and sessions".into(),
                MigrationType::Simple,
                SqlStr::from_static(include_str!("../../migrations/sqlite/0001_users_and_sessions.sql")),
                false,
            ),
            Migration::new(
                2,
                "mail tokens profile".into(),
                MigrationType::Simple,
                SqlStr::from_static(include_str!("../../migrations/sqlite/0002_mail_tokens_profile.sql")),
                false,
            ),
            Migration::new(
                3,
                "login attempts and locations".into(),
                MigrationType::Simple,
                SqlStr::from_static(include_str!(
                    "../../migrations/sqlite/0003_login_attempts_and_locations.sql"
                )),
                false,
            ),
            Migration::new(
                4,
                "known devices".into(),
                MigrationType::Simple,
                SqlStr::from_static(include_str!("../../migrations/sqlite/0004_known_devices.sql")),
                false,
            ),
            Migration::new(
                5,
                "login guards and mfa".into(),
                MigrationType::Simple,
                SqlStr::from_static(include_str!("../../migrations/sqlite/0005_login_guards_and_mfa.sql")),
                false,
            ),
        ])
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        Self::migrator().run(&self.pool).await.map_err(StoreError::Migration)
    }

    async fn create_user(&self, user: &NewUser) -> Result<UserRecord, StoreError> {
        create_user(&mut *self.pool.acquire().await?, user).await
    }

    async fn find_user_by_login(&self, login_key: &str) -> Result<Option<UserRecord>, StoreError> {
        find_user_by_login(&mut *self.pool.acquire().await?, login_key).await
    }

    async fn find_user(&self, user_id: Uuid) -> Result<Option<UserRecord>, StoreError> {
        let row = sqlx::query(concat!("SELECT ", user_columns!(), " FROM users WHERE id = $1"))
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn replace_password_hash(
        &self,
        user_id: Uuid,
        expected: &str,
        new_hash: &str,
    ) -> Result<bool, StoreError> {
        // One conditional UPDATE in autocommit: it takes the write lock before reading, so
        // the comparison sees the latest committed hash.
        let replaced = sqlx::query(
            "UPDATE users SET password_hash = $3, updated_at = $4 WHERE id = $1 AND password_hash = $2",
        )
        .bind(user_id)
        .bind(expected)
        .bind(new_hash)
        .bind(micros(OffsetDateTime::now_utc()))
        .execute(&self.pool)
        .await?;
        Ok(replaced.rows_affected() > 0)
    }

    async fn create_session(&self, session: &NewSession) -> Result<SessionRecord, StoreError> {
        let device = &session.device;
        let location = session.location.as_ref();
        let amr = serde_json::to_string(&session.amr)
            .map_err(|error| StoreError::Corrupt(format!("amr does not encode: {error}")))?;
        let rows = sqlx::query(concat!(
            "INSERT INTO sessions (id, user_id, refresh_hash, device_type, browser, os, user_agent, \
             ip_address, device_fingerprint, created_at, last_active_at, refreshed_at, expires_at, \
             country, city, latitude, longitude, amr) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $10, $11, $12, $13, $14, $15, $16) \
             RETURNING ",
            session_columns!()
        ))
        .bind(session.id)
        .bind(session.user_id)
        .bind(&session.refresh_hash)
        .bind(&device.device_type)
        .bind(&device.browser)
        .bind(&device.os)
        .bind(&device.user_agent)
        .bind(&device.ip_address)
        .bind(&device.fingerprint)
        .bind(micros(session.created_at))
        .bind(micros(session.expires_at))
        .bind(location.map(|l| l.country.as_str()))
        .bind(location.map(|l| l.city.as_str()))
        .bind(location.and_then(|l| l.latitude))
        .bind(location.and_then(|l| l.longitude))
        .bind(amr)
        .fetch_all(&self.pool)
        .await?;
        let row = rows.first().ok_or_else(|| StoreError::Corrupt("INSERT returned no row".into()))?;
        session_from_row(row)
    }

    async fn rotate_refresh_token(&self, rotation: &RefreshRotation) -> Result<RotateOutcome, StoreError> {
        // One conditional UPDATE in autocommit: it takes the write lock before reading
        // (waiting through busy_timeout), so concurrent callers run one after another and
        // only the first still finds the presented hash current. `max` keeps last_active_at
        // from going backwards should a write-behind have recorded a later instant.
        let now = micros(rotation.now);
        let rotated = sqlx::query(concat!(
            "UPDATE sessions SET prev_refresh_hash = refresh_hash, refresh_hash = $2, \
             refreshed_at = $3, last_active_at = max(last_active_at, $3) \
             WHERE refresh_hash = $1 AND revoked_at IS NULL AND expires_at > $3 AND refreshed_at > $4 \
             RETURNING ",
            session_columns!()
        ))
        .bind(&rotation.presented_hash)
        .bind(&rotation.new_hash)
        .bind(now)
        .bind(micros(rotation.idle_cutoff))
        .fetch_all(&self.pool)
        .await?;
        if let Some(row) = rotated.first() {
            return Ok(RotateOutcome::Rotated(session_from_row(row)?));
        }

        // Not rotated: say why. A current-hash match is preferred over a previous-hash one.
        let found = sqlx::query(concat!(
            "SELECT refresh_hash = $1 AS is_current, ",
            session_columns!(),
            " FROM sessions WHERE refresh_hash = $1 OR prev_refresh_hash = $1 \
             ORDER BY is_current DESC LIMIT 1"
        ))
        .bind(&rotation.presented_hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = found else {
            return Ok(RotateOutcome::Unknown);
        };
        let is_current: bool = get(&row, "is_current")?;
        let session = session_from_row(&row)?;
        Ok(RotateOutcome::not_rotated(is_current, session))
    }

    async fn find_session(&self, session_id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(concat!("SELECT ", session_columns!(), " FROM sessions WHERE id = $1"))
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn revoke_session(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        reason: RevokeReason,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let revoked = sqlx::query(
            "UPDATE sessions SET revoked_at = $3, revoke_reason = $4 \
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(session_id)
        .bind(user_id)
        .bind(micros(now))
        .bind(reason.as_str())
        .execute(&self.pool)
        .await?;
        if revoked.rows_affected() > 0 {
            return Ok(true);
        }
        // Already revoked (keep the first revocation) or not this user's session.
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1 AND user_id = $2)")
                .bind(session_id)
                .bind(user_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(exists)
    }

    async fn revoke_user_sessions(
        &self,
        user_id: Uuid,
        keep: Option<Uuid>,
        reason: RevokeReason,
        now: OffsetDateTime,
    ) -> Result<Vec<Uuid>, StoreError> {
        revoke_user_sessions(&mut *self.pool.acquire().await?, user_id, keep, reason, now).await
    }

    async fn list_active_sessions(
        &self,
        user_id: Uuid,
        now: OffsetDateTime,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 \
             ORDER BY last_active_at DESC, created_at DESC, id"
        ))
        .bind(user_id)
        .bind(micros(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn record_activity(&self, activity: &[(Uuid, OffsetDateTime)]) -> Result<(), StoreError> {
        if activity.is_empty() {
            return Ok(());
        }
        // Several writes: take the write lock up front (see the module comment).
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for (session_id, at) in activity {
            // The comparison only ever raises the stored value.
            sqlx::query("UPDATE sessions SET last_active_at = $2 WHERE id = $1 AND last_active_at < $2")
                .bind(session_id)
                .bind(micros(*at))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn revoked_sessions_of(
        &self,
        user_id: Uuid,
        since: OffsetDateTime,
    ) -> Result<Vec<Uuid>, StoreError> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM sessions WHERE user_id = $1 AND revoked_at >= $2 ORDER BY revoked_at, id",
        )
        .bind(user_id)
        .bind(micros(since))
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    async fn revoked_since(&self, since: OffsetDateTime) -> Result<Vec<(Uuid, OffsetDateTime)>, StoreError> {
        // Deleted accounts' sessions live on as tombstones.
        let rows = sqlx::query(
            "SELECT id, revoked_at FROM sessions WHERE revoked_at >= $1 \
             UNION ALL \
             SELECT session_id AS id, revoked_at FROM revocation_tombstones WHERE revoked_at >= $1 \
             ORDER BY revoked_at, id",
        )
        .bind(micros(since))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok((get(row, "id")?, instant(row, "revoked_at")?))).collect()
    }

    async fn record_login_attempt(&self, attempt: &NewLoginAttempt) -> Result<(), StoreError> {
        let device = &attempt.device;
        let location = attempt.location.as_ref();
        sqlx::query(
            "INSERT INTO login_attempts (id, at, identifier, identifier_key, user_id, outcome, reason, \
             ip_address, user_agent, device_fingerprint, device_type, browser, os, \
             country, city, latitude, longitude) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(attempt.id)
        .bind(micros(attempt.at))
        .bind(&attempt.identifier)
        .bind(identifier_key(&attempt.identifier))
        .bind(attempt.user_id)
        .bind(attempt.outcome.as_str())
        .bind(&attempt.reason)
        .bind(&device.ip_address)
        .bind(&device.user_agent)
        .bind(&device.fingerprint)
        .bind(&device.device_type)
        .bind(&device.browser)
        .bind(&device.os)
        .bind(location.map(|l| l.country.as_str()))
        .bind(location.map(|l| l.city.as_str()))
        .bind(location.and_then(|l| l.latitude))
        .bind(location.and_then(|l| l.longitude))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_login_attempts(
        &self,
        user_id: Uuid,
        before: Option<(OffsetDateTime, Uuid)>,
        limit: u32,
    ) -> Result<Vec<LoginAttempt>, StoreError> {
        // Keyset pagination on (at, id), along login_attempts_user_at_idx. Ids compare as
        // BLOBs (memcmp), the same order as PostgreSQL's uuid.
        let query = match before {
            None => sqlx::query(concat!(
                "SELECT ",
                attempt_columns!(),
                " FROM login_attempts WHERE user_id = $1 ORDER BY at DESC, id DESC LIMIT $2"
            ))
            .bind(user_id)
            .bind(i64::from(limit)),
            Some((at, id)) => sqlx::query(concat!(
                "SELECT ",
                attempt_columns!(),
                " FROM login_attempts WHERE user_id = $1 AND (at, id) < ($2, $3) \
                 ORDER BY at DESC, id DESC LIMIT $4"
            ))
            .bind(user_id)
            .bind(micros(at))
            .bind(id)
            .bind(i64::from(limit)),
        };
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(attempt_from_row).collect()
    }

    async fn purge_login_attempts(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError> {
        let purged = sqlx::query("DELETE FROM login_attempts WHERE at < $1")
            .bind(micros(cutoff))
            .execute(&self.pool)
            .await?;
        Ok(purged.rows_affected())
    }

    async fn reserve_try(
        &self,
        key: &GuardKey,
        budget: &GuardBudget,
        now: OffsetDateTime,
    ) -> Result<TryReservation, StoreError> {
        // One upsert in autocommit: it takes the write lock before reading (waiting through
        // busy_timeout), so concurrent callers run one after another, each seeing the counts
        // of the ones before, and no more than max_failures of them are counted per window.
        // When the WHERE clause is false no row is returned. The SET expressions all read the
        // row as it was.
        let now_micros = micros(now);
        let rows = sqlx::query(
            "INSERT INTO login_guards AS g (subject, scope, user_id, failures, first_failure_at, lockouts) \
             VALUES ($1, $2, $3, 1, $4, 0) \
             ON CONFLICT (subject, scope) DO UPDATE SET \
                 failures = CASE WHEN g.first_failure_at <= $5 THEN 1 ELSE g.failures + 1 END, \
                 first_failure_at = CASE WHEN g.first_failure_at <= $5 THEN $4 ELSE g.first_failure_at END, \
                 lockouts = CASE WHEN g.first_failure_at <= $5 \
                                      AND (g.locked_until IS NULL OR g.locked_until <= $6) \
                                 THEN 0 ELSE g.lockouts END \
             WHERE (g.locked_until IS NULL OR g.locked_until <= $4) \
               AND (g.first_failure_at <= $5 OR g.failures < $7) \
             RETURNING failures, lockouts",
        )
        .bind(&key.subject)
        .bind(&key.scope)
        .bind(key.user_id)
        .bind(now_micros)
        .bind(micros(budget.window_start(now)))
        .bind(micros(budget.forget_cutoff(now)))
        .bind(i64::from(budget.max_failures))
        .fetch_all(&self.pool)
        .await?;
        if let Some(row) = rows.first() {
            return Ok(TryReservation::Reserved {
                failures: count(row, "failures")?,
                lockouts: count(row, "lockouts")?,
            });
        }
        // Not counted: say why, from the row as it is now. Should it have been cleared or
        // purged meanwhile, "exhausted" still refuses this one try, which errs on the safe side.
        let state = self.guard_state(key).await?;
        Ok(match state {
            Some(GuardState { locked_until: Some(until), .. }) if until > now => {
                TryReservation::Locked { until }
            }
            Some(state) => TryReservation::Exhausted { lockouts: state.lockouts },
            None => TryReservation::Exhausted { lockouts: 0 },
        })
    }

    async fn lock_guard(
        &self,
        key: &GuardKey,
        until: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // Conditional on being unlocked, in autocommit (write lock first): of two callers the
        // second finds it locked, and does not lock (nor alert) again.
        let locked = sqlx::query(
            "UPDATE login_guards SET locked_until = $3, lockouts = lockouts + 1, failures = 0 \
             WHERE subject = $1 AND scope = $2 AND (locked_until IS NULL OR locked_until <= $4)",
        )
        .bind(&key.subject)
        .bind(&key.scope)
        .bind(micros(until))
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(locked.rows_affected() > 0)
    }

    async fn clear_guard(&self, key: &GuardKey) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM login_guards WHERE subject = $1 AND scope = $2")
            .bind(&key.subject)
            .bind(&key.scope)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn guard_state(&self, key: &GuardKey) -> Result<Option<GuardState>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            guard_columns!(),
            " FROM login_guards WHERE subject = $1 AND scope = $2"
        ))
        .bind(&key.subject)
        .bind(&key.scope)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(guard_from_row).transpose()
    }

    async fn purge_login_guards(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError> {
        let purged = sqlx::query(
            "DELETE FROM login_guards \
             WHERE first_failure_at < $1 AND (locked_until IS NULL OR locked_until < $1)",
        )
        .bind(micros(cutoff))
        .execute(&self.pool)
        .await?;
        Ok(purged.rows_affected())
    }

    async fn purge_mfa_challenges(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError> {
        let purged = sqlx::query("DELETE FROM mfa_challenges WHERE expires_at < $1")
            .bind(micros(cutoff))
            .execute(&self.pool)
            .await?;
        Ok(purged.rows_affected())
    }

    async fn find_mfa_challenge(
        &self,
        token_hash: &[u8],
        now: OffsetDateTime,
    ) -> Result<Option<MfaChallenge>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            challenge_columns!(),
            " FROM mfa_challenges WHERE token_hash = $1 AND consumed_at IS NULL AND expires_at > $2"
        ))
        .bind(token_hash)
        .bind(micros(now))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(challenge_from_row).transpose()
    }

    async fn consume_mfa_challenge(&self, id: Uuid, now: OffsetDateTime) -> Result<bool, StoreError> {
        // One conditional UPDATE in autocommit: concurrent consumers run one after another,
        // and only the first still finds it live.
        let consumed = sqlx::query(
            "UPDATE mfa_challenges SET consumed_at = $2 \
             WHERE id = $1 AND consumed_at IS NULL AND expires_at > $2",
        )
        .bind(id)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(consumed.rows_affected() > 0)
    }

    async fn consume_mfa_challenges_of(&self, user_id: Uuid, now: OffsetDateTime) -> Result<u64, StoreError> {
        consume_mfa_challenges(&mut *self.pool.acquire().await?, user_id, None, now).await
    }

    async fn totp_state(&self, user_id: Uuid) -> Result<Option<TotpState>, StoreError> {
        let row =
            sqlx::query("SELECT totp_secret, totp_pending_secret, totp_last_step FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|row| {
            Ok(TotpState {
                secret: get(&row, "totp_secret")?,
                pending_secret: get(&row, "totp_pending_secret")?,
                last_step: get(&row, "totp_last_step")?,
            })
        })
        .transpose()
    }

    async fn advance_totp_step(&self, user_id: Uuid, step: i64) -> Result<bool, StoreError> {
        // One conditional UPDATE in autocommit: of concurrent calls with one step, the first
        // raises the last step and the others no longer find it lower.
        let advanced = sqlx::query(
            "UPDATE users SET totp_last_step = $2 \
             WHERE id = $1 AND totp_secret IS NOT NULL AND (totp_last_step IS NULL OR totp_last_step < $2)",
        )
        .bind(user_id)
        .bind(step)
        .execute(&self.pool)
        .await?;
        Ok(advanced.rows_affected() > 0)
    }

    async fn consume_recovery_code(
        &self,
        user_id: Uuid,
        code_hash: &[u8],
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let used = sqlx::query(
            "UPDATE recovery_codes SET used_at = $3 \
             WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL",
        )
        .bind(user_id)
        .bind(code_hash)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(used.rows_affected() > 0)
    }

    async fn remaining_recovery_codes(&self, user_id: Uuid) -> Result<u32, StoreError> {
        let remaining: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_at IS NULL")
                .bind(user_id)
                .fetch_one(&self.pool)
                .await?;
        u32::try_from(remaining).map_err(|error| StoreError::Corrupt(format!("recovery code count: {error}")))
    }

    async fn is_known_device(&self, user_id: Uuid, device_key: &[u8]) -> Result<bool, StoreError> {
        let known: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM known_devices WHERE user_id = $1 AND device_key = $2)",
        )
        .bind(user_id)
        .bind(device_key)
        .fetch_one(&self.pool)
        .await?;
        Ok(known)
    }

    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        // Takes the write lock up front (see the module comment).
        Ok(Box::new(SqliteTx { tx: self.pool.begin_with("BEGIN IMMEDIATE").await? }))
    }

    async fn peek_token(
        &self,
        hash: &[u8],
        purpose: TokenPurpose,
        now: OffsetDateTime,
    ) -> Result<Option<Uuid>, StoreError> {
        let user_id: Option<Uuid> = sqlx::query_scalar(
            "SELECT user_id FROM one_time_tokens \
             WHERE hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(micros(now))
        .fetch_optional(&self.pool)
        .await?;
        Ok(user_id)
    }

    async fn claim_due_mail(
        &self,
        now: OffsetDateTime,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxMail>, StoreError> {
        // One statement in autocommit: it takes the write lock before reading, so concurrent
        // claimers run one after another and the second no longer finds the first's rows due.
        // The WHERE clause repeats the partial index's verbatim.
        let rows = sqlx::query(concat!(
            "UPDATE outbox SET next_attempt_at = $3 \
             WHERE id IN (SELECT id FROM outbox \
                          WHERE sent_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= $1 \
                          ORDER BY next_attempt_at LIMIT $2) \
             RETURNING ",
            mail_columns!()
        ))
        .bind(micros(now))
        .bind(i64::from(limit))
        .bind(micros(lease_end(now, lease)))
        .fetch_all(&self.pool)
        .await?;
        let mut mails = rows.iter().map(mail_from_row).collect::<Result<Vec<_>, _>>()?;
        mails.sort_by_key(|mail| (mail.created_at, mail.id));
        Ok(mails)
    }

    async fn purge_outbox(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError> {
        let purged = sqlx::query("DELETE FROM outbox WHERE sent_at < $1 OR gave_up_at < $1")
            .bind(micros(cutoff))
            .execute(&self.pool)
            .await?;
        Ok(purged.rows_affected())
    }

    async fn count_pending_outbox(&self) -> Result<u64, StoreError> {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL AND gave_up_at IS NULL")
                .fetch_one(&self.pool)
                .await?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    async fn release_mail(&self, ids: &[Uuid], now: OffsetDateTime) -> Result<(), StoreError> {
        // A handful of ids (one batch): one short statement each.
        for id in ids {
            sqlx::query(
                "UPDATE outbox SET next_attempt_at = $2 \
                 WHERE id = $1 AND sent_at IS NULL AND gave_up_at IS NULL",
            )
            .bind(id)
            .bind(micros(now))
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    async fn mail_sent(&self, id: Uuid, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query("UPDATE outbox SET sent_at = $2, body_text = '', body_html = '' WHERE id = $1")
            .bind(id)
            .bind(micros(now))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn mail_failed(
        &self,
        id: Uuid,
        error: &str,
        next_attempt_at: Option<OffsetDateTime>,
    ) -> Result<(), StoreError> {
        let query = match next_attempt_at {
            Some(at) => sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3 \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(error)
            .bind(micros(at)),
            None => sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $2, gave_up_at = $3, body_text = '', body_html = '' \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(error)
            .bind(micros(OffsetDateTime::now_utc())),
        };
        query.execute(&self.pool).await?;
        Ok(())
    }
}

/// A [`StoreTx`]: one `BEGIN IMMEDIATE` transaction, holding the database's write lock
/// until it commits or is dropped (rolled back). Its statements are serialized against
/// every other writer, so none needs row locks or re-checks.
struct SqliteTx {
    tx: Transaction<'static, Sqlite>,
}

#[async_trait]
impl StoreTx for SqliteTx {
    async fn create_user(&mut self, user: &NewUser) -> Result<UserRecord, StoreError> {
        // A failed statement only undoes itself: a Conflict leaves the transaction usable.
        create_user(&mut self.tx, user).await
    }

    async fn lock_user(&mut self, user_id: Uuid) -> Result<Option<UserRecord>, StoreError> {
        // The transaction already holds the write lock.
        let row = sqlx::query(concat!("SELECT ", user_columns!(), " FROM users WHERE id = $1"))
            .bind(user_id)
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn find_user_by_login(&mut self, login_key: &str) -> Result<Option<UserRecord>, StoreError> {
        find_user_by_login(&mut self.tx, login_key).await
    }

    async fn issue_token(&mut self, token: &NewOneTimeToken) -> Result<(), StoreError> {
        if token.purpose.replaces_older() {
            sqlx::query(
                "UPDATE one_time_tokens SET used_at = $3 \
                 WHERE user_id = $1 AND purpose = $2 AND used_at IS NULL",
            )
            .bind(token.user_id)
            .bind(token.purpose.as_str())
            .bind(micros(token.created_at))
            .execute(&mut *self.tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO one_time_tokens (hash, user_id, purpose, new_email, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&token.hash)
        .bind(token.user_id)
        .bind(token.purpose.as_str())
        .bind(&token.new_email)
        .bind(micros(token.created_at))
        .bind(micros(token.expires_at))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn consume_token(
        &mut self,
        hash: &[u8],
        purpose: TokenPurpose,
        now: OffsetDateTime,
    ) -> Result<Option<SpentToken>, StoreError> {
        let rows = sqlx::query(
            "UPDATE one_time_tokens SET used_at = $3 \
             WHERE hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3 \
             RETURNING user_id, new_email",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(micros(now))
        .fetch_all(&mut *self.tx)
        .await?;
        rows.first()
            .map(|row| Ok(SpentToken { user_id: get(row, "user_id")?, new_email: get(row, "new_email")? }))
            .transpose()
    }

    async fn invalidate_tokens(
        &mut self,
        user_id: Uuid,
        purpose: TokenPurpose,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE one_time_tokens SET used_at = $3 \
             WHERE user_id = $1 AND purpose = $2 AND used_at IS NULL",
        )
        .bind(user_id)
        .bind(purpose.as_str())
        .bind(micros(now))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn enqueue_mail(&mut self, mail: &NewMail) -> Result<(), StoreError> {
        // Due at once.
        sqlx::query(
            "INSERT INTO outbox (id, user_id, recipient, subject, body_text, body_html, created_at, \
             next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        )
        .bind(mail.id)
        .bind(mail.user_id)
        .bind(&mail.to)
        .bind(&mail.subject)
        .bind(&mail.text)
        .bind(&mail.html)
        .bind(micros(mail.created_at))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn set_password_hash(
        &mut self,
        user_id: Uuid,
        password_hash: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE users SET password_hash = $2, updated_at = $3 WHERE id = $1")
            .bind(user_id)
            .bind(password_hash)
            .bind(micros(now))
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn mark_email_verified(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<bool, StoreError> {
        let marked = sqlx::query(
            "UPDATE users SET email_verified_at = $2, updated_at = $2 \
             WHERE id = $1 AND email_verified_at IS NULL",
        )
        .bind(user_id)
        .bind(micros(now))
        .execute(&mut *self.tx)
        .await?;
        Ok(marked.rows_affected() > 0)
    }

    async fn set_email(
        &mut self,
        user_id: Uuid,
        email: &str,
        email_key: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE users SET email = $2, email_key = $3, email_verified_at = $4, updated_at = $4 \
             WHERE id = $1",
        )
        .bind(user_id)
        .bind(email)
        .bind(email_key)
        .bind(micros(now))
        .execute(&mut *self.tx)
        .await
        .map_err(conflict_or_error)?;
        Ok(())
    }

    async fn update_profile(
        &mut self,
        user_id: Uuid,
        changes: &ProfileChanges,
        now: OffsetDateTime,
    ) -> Result<UserRecord, StoreError> {
        let rows = sqlx::query(concat!(
            "UPDATE users SET first_name = COALESCE($2, first_name), last_name = COALESCE($3, last_name), \
             phone = COALESCE($4, phone), bio = COALESCE($5, bio), updated_at = $6 \
             WHERE id = $1 RETURNING ",
            user_columns!()
        ))
        .bind(user_id)
        .bind(&changes.first_name)
        .bind(&changes.last_name)
        .bind(&changes.phone)
        .bind(&changes.bio)
        .bind(micros(now))
        .fetch_all(&mut *self.tx)
        .await?;
        // An unknown user: the same error as PostgreSQL's `fetch_one`.
        let row = rows.first().ok_or(StoreError::Database(sqlx::Error::RowNotFound))?;
        user_from_row(row)
    }

    async fn revoke_user_sessions(
        &mut self,
        user_id: Uuid,
        keep: Option<Uuid>,
        reason: RevokeReason,
        now: OffsetDateTime,
    ) -> Result<Vec<Uuid>, StoreError> {
        revoke_user_sessions(&mut self.tx, user_id, keep, reason, now).await
    }

    async fn delete_user(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<Vec<Uuid>, StoreError> {
        // The transaction already holds the write lock.
        let keys: Option<(String, String)> =
            sqlx::query_as("SELECT username_key, email_key FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_optional(&mut *self.tx)
                .await?;
        // Sessions revoked but not yet expired keep their revocation instant: their access
        // tokens may be alive too, and must still be re-published.
        sqlx::query(
            "INSERT INTO revocation_tombstones (session_id, revoked_at) \
             SELECT id, revoked_at FROM sessions \
             WHERE user_id = $1 AND revoked_at IS NOT NULL AND expires_at > $2 \
             ON CONFLICT (session_id) DO NOTHING",
        )
        .bind(user_id)
        .bind(micros(now))
        .execute(&mut *self.tx)
        .await?;
        let live: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO revocation_tombstones (session_id, revoked_at) \
             SELECT id, $2 FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 \
             ON CONFLICT (session_id) DO NOTHING RETURNING session_id",
        )
        .bind(user_id)
        .bind(micros(now))
        .fetch_all(&mut *self.tx)
        .await?;
        // The attempts that matched no account but named this one's username or email.
        if let Some((username_key, email_key)) = keys {
            sqlx::query("DELETE FROM login_attempts WHERE user_id IS NULL AND identifier_key IN ($1, $2)")
                .bind(identifier_key(&username_key))
                .bind(identifier_key(&email_key))
                .execute(&mut *self.tx)
                .await?;
        }
        // And those naming any identifier the account was ever matched by (an email it no
        // longer has, say).
        sqlx::query(
            "DELETE FROM login_attempts WHERE user_id IS NULL AND identifier_key IN \
             (SELECT identifier_key FROM login_attempts WHERE user_id = $1)",
        )
        .bind(user_id)
        .execute(&mut *self.tx)
        .await?;
        // Sessions, tokens, queued mail and login attempts go with the user (ON DELETE
        // CASCADE).
        sqlx::query("DELETE FROM users WHERE id = $1").bind(user_id).execute(&mut *self.tx).await?;
        Ok(live)
    }

    async fn remember_device(
        &mut self,
        user_id: Uuid,
        device_key: &[u8],
        now: OffsetDateTime,
    ) -> Result<DeviceSighting, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO known_devices (user_id, device_key, first_seen, last_seen) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (user_id, device_key) DO NOTHING",
        )
        .bind(user_id)
        .bind(device_key)
        .bind(micros(now))
        .execute(&mut *self.tx)
        .await?
        .rows_affected()
            == 1;
        if !inserted {
            sqlx::query("UPDATE known_devices SET last_seen = $3 WHERE user_id = $1 AND device_key = $2")
                .bind(user_id)
                .bind(device_key)
                .bind(micros(now))
                .execute(&mut *self.tx)
                .await?;
            return Ok(DeviceSighting::Known);
        }
        let others: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM known_devices WHERE user_id = $1 AND device_key <> $2")
                .bind(user_id)
                .bind(device_key)
                .fetch_one(&mut *self.tx)
                .await?;
        Ok(DeviceSighting::New { first_device: others == 0 })
    }

    async fn create_mfa_challenge(&mut self, challenge: &NewMfaChallenge) -> Result<(), StoreError> {
        consume_mfa_challenges(&mut self.tx, challenge.user_id, None, challenge.created_at).await?;
        sqlx::query(
            "INSERT INTO mfa_challenges (id, token_hash, user_id, method, code_hash, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(challenge.id)
        .bind(&challenge.token_hash)
        .bind(challenge.user_id)
        .bind(challenge.method.as_str())
        .bind(&challenge.code_hash)
        .bind(micros(challenge.created_at))
        .bind(micros(challenge.expires_at))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn set_email_otp(
        &mut self,
        user_id: Uuid,
        enabled: bool,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE users SET email_otp_enabled = $2, updated_at = $3 WHERE id = $1")
            .bind(user_id)
            .bind(enabled)
            .bind(micros(now))
            .execute(&mut *self.tx)
            .await?;
        consume_mfa_challenges(&mut self.tx, user_id, None, now).await?;
        Ok(())
    }

    async fn set_totp_pending(
        &mut self,
        user_id: Uuid,
        sealed: Option<&[u8]>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE users SET totp_pending_secret = $2, updated_at = $3 WHERE id = $1")
            .bind(user_id)
            .bind(sealed)
            .bind(micros(now))
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn activate_totp(
        &mut self,
        user_id: Uuid,
        secret: &[u8],
        step: i64,
        recovery_hashes: &[Vec<u8>],
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // The transaction holds the write lock: the pending secret cannot change meanwhile.
        let activated = sqlx::query(
            "UPDATE users SET totp_secret = totp_pending_secret, totp_pending_secret = NULL, \
             totp_last_step = $3, updated_at = $4 \
             WHERE id = $1 AND totp_pending_secret = $2",
        )
        .bind(user_id)
        .bind(secret)
        .bind(step)
        .bind(micros(now))
        .execute(&mut *self.tx)
        .await?;
        if activated.rows_affected() == 0 {
            return Ok(false);
        }
        consume_mfa_challenges(&mut self.tx, user_id, None, now).await?;
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *self.tx)
            .await?;
        // A handful of codes: one short statement each. Duplicates (never, with random codes)
        // would be one code.
        for code_hash in recovery_hashes {
            sqlx::query(
                "INSERT INTO recovery_codes (user_id, code_hash, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (user_id, code_hash) DO NOTHING",
            )
            .bind(user_id)
            .bind(code_hash)
            .bind(micros(now))
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(true)
    }

    async fn disable_totp(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE users SET totp_secret = NULL, totp_pending_secret = NULL, totp_last_step = NULL, \
             updated_at = $2 WHERE id = $1",
        )
        .bind(user_id)
        .bind(micros(now))
        .execute(&mut *self.tx)
        .await?;
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *self.tx)
            .await?;
        consume_mfa_challenges(&mut self.tx, user_id, None, now).await?;
        Ok(())
    }

    async fn close_mfa_challenges(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<(), StoreError> {
        consume_mfa_challenges(&mut self.tx, user_id, None, now).await?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

// Statements shared by `SqliteStore` (on a pooled connection) and `SqliteTx`.

async fn create_user(conn: &mut SqliteConnection, user: &NewUser) -> Result<UserRecord, StoreError> {
    let roles = serde_json::to_string(&user.roles)
        .map_err(|error| StoreError::Corrupt(format!("roles do not encode: {error}")))?;
    // RETURNING rows are read with fetch_all: the statement must run to completion for
    // its autocommit transaction to end.
    let rows = sqlx::query(concat!(
        "INSERT INTO users (id, username, username_key, email, email_key, password_hash, \
         first_name, last_name, roles, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) RETURNING ",
        user_columns!()
    ))
    .bind(user.id)
    .bind(&user.username)
    .bind(&user.username_key)
    .bind(&user.email)
    .bind(&user.email_key)
    .bind(&user.password_hash)
    .bind(&user.first_name)
    .bind(&user.last_name)
    .bind(roles)
    .bind(micros(user.created_at))
    .fetch_all(conn)
    .await
    .map_err(conflict_or_error)?;
    let row = rows.first().ok_or_else(|| StoreError::Corrupt("INSERT returned no row".into()))?;
    user_from_row(row)
}

async fn find_user_by_login(
    conn: &mut SqliteConnection,
    login_key: &str,
) -> Result<Option<UserRecord>, StoreError> {
    // A username match wins should one user's username equal another's email.
    let row = sqlx::query(concat!(
        "SELECT ",
        user_columns!(),
        " FROM users WHERE username_key = $1 OR email_key = $1 \
         ORDER BY username_key = $1 DESC LIMIT 1"
    ))
    .bind(login_key)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(user_from_row).transpose()
}

async fn revoke_user_sessions(
    conn: &mut SqliteConnection,
    user_id: Uuid,
    keep: Option<Uuid>,
    reason: RevokeReason,
    now: OffsetDateTime,
) -> Result<Vec<Uuid>, StoreError> {
    // `IS NOT` is SQLite's null-safe inequality: with no `keep`, every session qualifies.
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE sessions SET revoked_at = $3, revoke_reason = $4 \
         WHERE user_id = $1 AND revoked_at IS NULL AND id IS NOT $2 RETURNING id",
    )
    .bind(user_id)
    .bind(keep)
    .bind(micros(now))
    .bind(reason.as_str())
    .fetch_all(conn)
    .await?;
    Ok(ids)
}

/// Consumes the user's live challenges, of one method or of all; returns how many.
async fn consume_mfa_challenges(
    conn: &mut SqliteConnection,
    user_id: Uuid,
    method: Option<MfaMethod>,
    now: OffsetDateTime,
) -> Result<u64, StoreError> {
    let consumed = sqlx::query(
        "UPDATE mfa_challenges SET consumed_at = $3 \
         WHERE user_id = $1 AND method = COALESCE($2, method) AND consumed_at IS NULL AND expires_at > $3",
    )
    .bind(user_id)
    .bind(method.map(MfaMethod::as_str))
    .bind(micros(now))
    .execute(conn)
    .await?;
    Ok(consumed.rows_affected())
}

/// The end of a claim's lease (saturating: an absurd lease claims "forever").
fn lease_end(now: OffsetDateTime, lease: Duration) -> OffsetDateTime {
    time::Duration::try_from(lease)
        .ok()
        .and_then(|lease| now.checked_add(lease))
        .unwrap_or(PrimitiveDateTime::MAX.assume_utc())
}

/// Unique violations on the user keys become [`StoreError::Conflict`]. SQLite names the
/// column, not the constraint: "UNIQUE constraint failed: users.username_key".
fn conflict_or_error(error: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &error
        && db.is_unique_violation()
    {
        if db.message().contains("users.username_key") {
            return StoreError::Conflict("username");
        }
        if db.message().contains("users.email_key") {
            return StoreError::Conflict("email");
        }
    }
    error.into()
}

/// An instant as stored: Unix time in microseconds (sub-microsecond digits are dropped,
/// as PostgreSQL does).
fn micros(instant: OffsetDateTime) -> i64 {
    // Every OffsetDateTime (years ±9999) fits in i64 microseconds.
    instant.unix_timestamp_nanos().div_euclid(1_000) as i64
}

fn from_micros(column: &str, micros: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .map_err(|error| StoreError::Corrupt(format!("column {column}: {error}")))
}

/// Reads one column; a value that does not decode is a corrupt row, not a panic.
fn get<'r, T>(row: &'r SqliteRow, column: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(column).map_err(|error| StoreError::Corrupt(format!("column {column}: {error}")))
}

fn instant(row: &SqliteRow, column: &str) -> Result<OffsetDateTime, StoreError> {
    from_micros(column, get(row, column)?)
}

fn optional_instant(row: &SqliteRow, column: &str) -> Result<Option<OffsetDateTime>, StoreError> {
    get::<Option<i64>>(row, column)?.map(|micros| from_micros(column, micros)).transpose()
}

fn user_from_row(row: &SqliteRow) -> Result<UserRecord, StoreError> {
    let roles: String = get(row, "roles")?;
    Ok(UserRecord {
        id: get(row, "id")?,
        username: get(row, "username")?,
        email: get(row, "email")?,
        password_hash: get(row, "password_hash")?,
        first_name: get(row, "first_name")?,
        last_name: get(row, "last_name")?,
        phone: get(row, "phone")?,
        bio: get(row, "bio")?,
        roles: serde_json::from_str(&roles)
            .map_err(|error| StoreError::Corrupt(format!("column roles: {error}")))?,
        email_verified_at: optional_instant(row, "email_verified_at")?,
        created_at: instant(row, "created_at")?,
        email_otp_enabled: get(row, "email_otp_enabled")?,
        totp_enabled: get(row, "totp_enabled")?,
    })
}

fn session_from_row(row: &SqliteRow) -> Result<SessionRecord, StoreError> {
    let amr: String = get(row, "amr")?;
    Ok(SessionRecord {
        id: get(row, "id")?,
        user_id: get(row, "user_id")?,
        device: DeviceInfo {
            device_type: get(row, "device_type")?,
            browser: get(row, "browser")?,
            os: get(row, "os")?,
            user_agent: get(row, "user_agent")?,
            ip_address: get(row, "ip_address")?,
            fingerprint: get(row, "device_fingerprint")?,
        },
        created_at: instant(row, "created_at")?,
        last_active_at: instant(row, "last_active_at")?,
        refreshed_at: instant(row, "refreshed_at")?,
        expires_at: instant(row, "expires_at")?,
        revoked_at: optional_instant(row, "revoked_at")?,
        location: location_from_row(row)?,
        amr: serde_json::from_str(&amr)
            .map_err(|error| StoreError::Corrupt(format!("column amr: {error}")))?,
    })
}

/// The case-folded form of a login identifier, as stored in `identifier_key`: the same
/// folding as the login lookup (trimmed, lower case), applied also to the users' keys when
/// an account's attempts are deleted, so they match case-insensitively.
fn identifier_key(identifier: &str) -> String {
    identifier.trim().to_lowercase()
}

/// `None` when every location column is NULL; otherwise the values as stored.
fn location_from_row(row: &SqliteRow) -> Result<Option<Location>, StoreError> {
    let country: Option<String> = get(row, "country")?;
    let city: Option<String> = get(row, "city")?;
    let latitude: Option<f64> = get(row, "latitude")?;
    let longitude: Option<f64> = get(row, "longitude")?;
    if country.is_none() && city.is_none() && latitude.is_none() && longitude.is_none() {
        return Ok(None);
    }
    Ok(Some(Location {
        country: country.unwrap_or_default(),
        city: city.unwrap_or_default(),
        latitude,
        longitude,
    }))
}

fn attempt_from_row(row: &SqliteRow) -> Result<LoginAttempt, StoreError> {
    let outcome: String = get(row, "outcome")?;
    Ok(LoginAttempt {
        id: get(row, "id")?,
        at: instant(row, "at")?,
        identifier: get(row, "identifier")?,
        user_id: get(row, "user_id")?,
        outcome: match outcome.as_str() {
            "success" => AttemptOutcome::Success,
            "failure" => AttemptOutcome::Failure,
            other => return Err(StoreError::Corrupt(format!("column outcome: unknown outcome {other:?}"))),
        },
        reason: get(row, "reason")?,
        device: DeviceInfo {
            device_type: get(row, "device_type")?,
            browser: get(row, "browser")?,
            os: get(row, "os")?,
            user_agent: get(row, "user_agent")?,
            ip_address: get(row, "ip_address")?,
            fingerprint: get(row, "device_fingerprint")?,
        },
        location: location_from_row(row)?,
    })
}

/// A non-negative count column.
fn count(row: &SqliteRow, column: &str) -> Result<u32, StoreError> {
    let value: i64 = get(row, column)?;
    u32::try_from(value).map_err(|error| StoreError::Corrupt(format!("column {column}: {error}")))
}

fn guard_from_row(row: &SqliteRow) -> Result<GuardState, StoreError> {
    Ok(GuardState {
        failures: count(row, "failures")?,
        first_failure_at: instant(row, "first_failure_at")?,
        locked_until: optional_instant(row, "locked_until")?,
        lockouts: count(row, "lockouts")?,
    })
}

fn challenge_from_row(row: &SqliteRow) -> Result<MfaChallenge, StoreError> {
    let method: String = get(row, "method")?;
    Ok(MfaChallenge {
        id: get(row, "id")?,
        user_id: get(row, "user_id")?,
        method: match method.as_str() {
            "email_otp" => MfaMethod::EmailOtp,
            "totp" => MfaMethod::Totp,
            other => return Err(StoreError::Corrupt(format!("column method: unknown method {other:?}"))),
        },
        code_hash: get(row, "code_hash")?,
        expires_at: instant(row, "expires_at")?,
    })
}

fn mail_from_row(row: &SqliteRow) -> Result<OutboxMail, StoreError> {
    let attempts: i64 = get(row, "attempts")?;
    Ok(OutboxMail {
        id: get(row, "id")?,
        to: get(row, "recipient")?,
        subject: get(row, "subject")?,
        text: get(row, "body_text")?,
        html: get(row, "body_html")?,
        attempts: u32::try_from(attempts)
            .map_err(|error| StoreError::Corrupt(format!("column attempts: {error}")))?,
        created_at: instant(row, "created_at")?,
        last_error: get(row, "last_error")?,
    })
}
