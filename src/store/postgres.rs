//! [`Store`] on PostgreSQL.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Postgres, Row, SqlStr, Transaction};
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

pub struct PostgresStore {
    pool: PgPool,
    /// The connect options without the statement timeout, for [`Store::migrate`].
    options: PgConnectOptions,
    acquire_timeout: Duration,
}

impl PostgresStore {
    /// Opens a pool and one connection right away, so a wrong or unreachable database fails
    /// start-up instead of the first request.
    ///
    /// Every connection is opened with the server-side `statement_timeout` set to
    /// `statement_timeout` (rounded up to whole milliseconds; zero disables it, as in
    /// PostgreSQL): a statement stuck on a lock or running away is cancelled by the server
    /// and fails with SQLSTATE 57014, i.e. [`StoreError::Unavailable`], instead of holding a
    /// connection and its caller forever. It overrides a `statement_timeout` set through the
    /// URL's `options` parameter. (It cannot help when the server itself stops answering:
    /// that is the callers' request deadline's job.)
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
        statement_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?;
        let with_timeout = options
            .clone()
            .options([("statement_timeout", format!("{}ms", timeout_millis(statement_timeout)))]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(acquire_timeout)
            .connect_with(with_timeout)
            .await?;
        Ok(Self { pool, options, acquire_timeout })
    }

    /// Migrations are embedded so `migrate` works from any working directory (and without
    /// sqlx's `migrate!` macro).
    fn migrator() -> Migrator {
        Migrator::with_migrations(vec![
            Migration::new(
                1,
                "users and sessions".into(),
                MigrationType::Simple,
                SqlStr::from_static(include_str!("../../migrations/postgres/0001_users_and_sessions.sql")),
                false,
            ),
            Migration::new(
                2,
                "mail tokens profile".into(),
                MigrationType::Simple,
                SqlStr::from_static(include_str!("../../migrations/postgres/0002_mail_tokens_profile.sql")),
                false,
            ),
            Migration::new(
                3,
                "login attempts and locations".into(),
                MigrationType::Simple,
                SqlStr::from_static(include_str!(
                    "../../migrations/postgres/0003_login_attempts_and_locations.sql"
                )),
                false,
            ),
            Migration::new(
                4,
                "known devices".into(),
                MigrationType::Simple,
                SqlStr::from_static(include_str!("../../migrations/postgres/0004_known_devices.sql")),
                false,
            ),
            Migration::new(
                5,
                "login guards and mfa".into(),
                MigrationType::Simple,
                SqlStr::from_static(include_str!("../../migrations/postgres/0005_login_guards_and_mfa.sql")),
                false,
            ),
        ])
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        // Migrations are exempt from the statement timeout: building an index on a large
        // table may take minutes, and a replica starting while another migrates waits on
        // the migrator's advisory lock for as long as that takes. So they run on a
        // connection of their own, opened without the timeout and closed afterwards.
        // (A one-connection pool rather than a bare connection: `Migrator::run` on a
        // `&mut PgConnection` does not compile inside an `async_trait` method.)
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(self.options.clone().options([("statement_timeout", "0")]))
            .await?;
        let result = Self::migrator().run(&pool).await.map_err(StoreError::Migration);
        pool.close().await;
        result
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
        // One conditional UPDATE: a concurrent change queues on the row lock, and the WHERE
        // clause is re-checked against the row it committed.
        let replaced = sqlx::query(
            "UPDATE users SET password_hash = $3, updated_at = $4 WHERE id = $1 AND password_hash = $2",
        )
        .bind(user_id)
        .bind(expected)
        .bind(new_hash)
        .bind(OffsetDateTime::now_utc())
        .execute(&self.pool)
        .await?;
        Ok(replaced.rows_affected() > 0)
    }

    async fn create_session(&self, session: &NewSession) -> Result<SessionRecord, StoreError> {
        let device = &session.device;
        let location = session.location.as_ref();
        let row = sqlx::query(concat!(
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
        .bind(session.created_at)
        .bind(session.expires_at)
        .bind(location.map(|l| l.country.as_str()))
        .bind(location.map(|l| l.city.as_str()))
        .bind(location.and_then(|l| l.latitude))
        .bind(location.and_then(|l| l.longitude))
        .bind(&session.amr)
        .fetch_one(&self.pool)
        .await?;
        session_from_row(&row)
    }

    async fn rotate_refresh_token(&self, rotation: &RefreshRotation) -> Result<RotateOutcome, StoreError> {
        // One conditional UPDATE: concurrent callers queue on the row lock, and each re-checks
        // the WHERE clause against the committed row, so only the first still matches.
        // GREATEST keeps last_active_at from going backwards should a write-behind have
        // recorded a later instant.
        let rotated = sqlx::query(concat!(
            "UPDATE sessions SET prev_refresh_hash = refresh_hash, refresh_hash = $2, \
             refreshed_at = $3, last_active_at = GREATEST(last_active_at, $3) \
             WHERE refresh_hash = $1 AND revoked_at IS NULL AND expires_at > $3 AND refreshed_at > $4 \
             RETURNING ",
            session_columns!()
        ))
        .bind(&rotation.presented_hash)
        .bind(&rotation.new_hash)
        .bind(rotation.now)
        .bind(rotation.idle_cutoff)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = rotated {
            return Ok(RotateOutcome::Rotated(session_from_row(&row)?));
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
        .bind(now)
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
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_from_row).collect()
    }

    async fn record_activity(&self, activity: &[(Uuid, OffsetDateTime)]) -> Result<(), StoreError> {
        if activity.is_empty() {
            return Ok(());
        }
        let (ids, instants): (Vec<Uuid>, Vec<OffsetDateTime>) = activity.iter().copied().unzip();
        // One statement for the whole batch; duplicates of a session collapse to their latest
        // instant, and the comparison only ever raises the stored value.
        //
        // Row locks: a plain UPDATE ... FROM locks rows in whatever order its join yields
        // them, so two replicas flushing overlapping batches (or a batch and a "revoke all")
        // could each hold a row the other waits for: a deadlock, and one of them fails.
        // `locked` takes the locks first, in id order, and SKIP LOCKED never waits on a row
        // another transaction holds: that row's touch is dropped, which is harmless since
        // "last active" is approximate and the holder is another batch (writing it), a
        // rotation (setting it to now) or a revocation (after which it no longer matters).
        // At worst an older instant stands until the session's next touch. The UPDATE then
        // only touches rows this statement already holds, so it never waits either.
        sqlx::query(
            "WITH a AS (SELECT id, max(at) AS at \
                        FROM UNNEST($1::uuid[], $2::timestamptz[]) AS t (id, at) GROUP BY id), \
                  locked AS (SELECT s.id, a.at FROM sessions AS s JOIN a ON a.id = s.id \
                             WHERE s.last_active_at < a.at \
                             ORDER BY s.id FOR UPDATE OF s SKIP LOCKED) \
             UPDATE sessions AS s SET last_active_at = locked.at FROM locked \
             WHERE s.id = locked.id AND s.last_active_at < locked.at",
        )
        .bind(ids)
        .bind(instants)
        .execute(&self.pool)
        .await?;
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
        .bind(since)
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
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok((get(row, "id")?, get(row, "revoked_at")?))).collect()
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
        .bind(attempt.at)
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
        // Keyset pagination on (at, id), read backwards along login_attempts_user_at_idx.
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
            .bind(at)
            .bind(id)
            .bind(i64::from(limit)),
        };
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(attempt_from_row).collect()
    }

    async fn purge_login_attempts(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError> {
        let purged =
            sqlx::query("DELETE FROM login_attempts WHERE at < $1").bind(cutoff).execute(&self.pool).await?;
        Ok(purged.rows_affected())
    }

    async fn reserve_try(
        &self,
        key: &GuardKey,
        budget: &GuardBudget,
        now: OffsetDateTime,
    ) -> Result<TryReservation, StoreError> {
        // One upsert: concurrent callers on one key queue on the row lock (or on the first
        // one's insertion), and each re-checks the WHERE clause against the row the one
        // before committed, so no more than max_failures of them are counted per window.
        // When the WHERE clause is false no row is returned. The SET expressions all read the
        // row as it was.
        let max_failures = i32::try_from(budget.max_failures).unwrap_or(i32::MAX);
        let reserved = sqlx::query(
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
        .bind(now)
        .bind(budget.window_start(now))
        .bind(budget.forget_cutoff(now))
        .bind(max_failures)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = reserved {
            return Ok(TryReservation::Reserved {
                failures: count(&row, "failures")?,
                lockouts: count(&row, "lockouts")?,
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
        // Conditional on being unlocked: of two callers the second re-checks the committed
        // row, finds it locked, and does not lock (nor alert) again.
        let locked = sqlx::query(
            "UPDATE login_guards SET locked_until = $3, lockouts = lockouts + 1, failures = 0 \
             WHERE subject = $1 AND scope = $2 AND (locked_until IS NULL OR locked_until <= $4)",
        )
        .bind(&key.subject)
        .bind(&key.scope)
        .bind(until)
        .bind(now)
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
        .bind(cutoff)
        .execute(&self.pool)
        .await?;
        Ok(purged.rows_affected())
    }

    async fn purge_mfa_challenges(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError> {
        let purged = sqlx::query("DELETE FROM mfa_challenges WHERE expires_at < $1")
            .bind(cutoff)
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
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(challenge_from_row).transpose()
    }

    async fn consume_mfa_challenge(&self, id: Uuid, now: OffsetDateTime) -> Result<bool, StoreError> {
        // One conditional UPDATE: concurrent consumers queue on the row lock and re-check the
        // WHERE clause against the committed row, so only the first still finds it live.
        let consumed = sqlx::query(
            "UPDATE mfa_challenges SET consumed_at = $2 \
             WHERE id = $1 AND consumed_at IS NULL AND expires_at > $2",
        )
        .bind(id)
        .bind(now)
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
        // One conditional UPDATE: of concurrent calls with one step, the first raises the
        // last step and the others, re-checking the committed row, find it no longer lower.
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
        .bind(now)
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
        Ok(Box::new(PostgresTx { tx: self.pool.begin().await? }))
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
        .bind(now)
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
        // The CTE runs once and locks the rows it picks; SKIP LOCKED passes over rows another
        // claimer holds instead of waiting for them. A row another claimer took and committed
        // meanwhile is re-checked against its new next_attempt_at (now in the future) and
        // dropped, so no two claimers get the same mail.
        let rows = sqlx::query(
            "WITH due AS (SELECT id FROM outbox \
                          WHERE sent_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= $1 \
                          ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE outbox AS o SET next_attempt_at = $3 FROM due WHERE o.id = due.id \
             RETURNING o.id, o.recipient, o.subject, o.body_text, o.body_html, o.attempts, o.created_at, o.last_error",
        )
        .bind(now)
        .bind(i64::from(limit))
        .bind(lease_end(now, lease))
        .fetch_all(&self.pool)
        .await?;
        let mut mails = rows.iter().map(mail_from_row).collect::<Result<Vec<_>, _>>()?;
        mails.sort_by_key(|mail| (mail.created_at, mail.id));
        Ok(mails)
    }

    async fn purge_outbox(&self, cutoff: OffsetDateTime) -> Result<u64, StoreError> {
        let purged = sqlx::query("DELETE FROM outbox WHERE sent_at < $1 OR gave_up_at < $1")
            .bind(cutoff)
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
        sqlx::query(
            "UPDATE outbox SET next_attempt_at = $2 \
             WHERE id = ANY($1) AND sent_at IS NULL AND gave_up_at IS NULL",
        )
        .bind(ids)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mail_sent(&self, id: Uuid, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query("UPDATE outbox SET sent_at = $2, body_text = '', body_html = '' WHERE id = $1")
            .bind(id)
            .bind(now)
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
            .bind(at),
            None => sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $2, gave_up_at = $3, body_text = '', body_html = '' \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(error)
            .bind(OffsetDateTime::now_utc()),
        };
        query.execute(&self.pool).await?;
        Ok(())
    }
}

/// A [`StoreTx`]: one PostgreSQL transaction (READ COMMITTED), rolled back when dropped
/// uncommitted.
struct PostgresTx {
    tx: Transaction<'static, Postgres>,
}

#[async_trait]
impl StoreTx for PostgresTx {
    async fn create_user(&mut self, user: &NewUser) -> Result<UserRecord, StoreError> {
        // In a savepoint: a unique violation would otherwise abort the whole transaction
        // (SQLite only undoes the failed statement), and a Conflict must leave it usable.
        let mut savepoint = self.tx.begin().await?;
        let result = create_user(&mut savepoint, user).await;
        end_savepoint(savepoint, result).await
    }

    async fn lock_user(&mut self, user_id: Uuid) -> Result<Option<UserRecord>, StoreError> {
        let row = sqlx::query(concat!("SELECT ", user_columns!(), " FROM users WHERE id = $1 FOR UPDATE"))
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
            .bind(token.created_at)
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
        .bind(token.created_at)
        .bind(token.expires_at)
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
        // One conditional UPDATE: concurrent consumers queue on the row lock and re-check the
        // WHERE clause against the committed row, so only the first still finds it unused.
        let row = sqlx::query(
            "UPDATE one_time_tokens SET used_at = $3 \
             WHERE hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3 \
             RETURNING user_id, new_email",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(now)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|row| Ok(SpentToken { user_id: get(&row, "user_id")?, new_email: get(&row, "new_email")? }))
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
        .bind(now)
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
        .bind(mail.created_at)
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
            .bind(now)
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
        .bind(now)
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
        // In a savepoint, as in `create_user`.
        let mut savepoint = self.tx.begin().await?;
        let result = sqlx::query(
            "UPDATE users SET email = $2, email_key = $3, email_verified_at = $4, updated_at = $4 \
             WHERE id = $1",
        )
        .bind(user_id)
        .bind(email)
        .bind(email_key)
        .bind(now)
        .execute(&mut *savepoint)
        .await
        .map(drop)
        .map_err(conflict_or_error);
        end_savepoint(savepoint, result).await
    }

    async fn update_profile(
        &mut self,
        user_id: Uuid,
        changes: &ProfileChanges,
        now: OffsetDateTime,
    ) -> Result<UserRecord, StoreError> {
        let row = sqlx::query(concat!(
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
        .bind(now)
        .fetch_one(&mut *self.tx)
        .await?;
        user_from_row(&row)
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
        // Lock the user first: a login creating a session meanwhile (its INSERT takes a key
        // share lock on the user row) then either committed before, and the statements below
        // (each with a fresh snapshot) see its session, or waits and fails on the deleted key.
        let keys: Option<(String, String)> =
            sqlx::query_as("SELECT username_key, email_key FROM users WHERE id = $1 FOR UPDATE")
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
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        let live: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO revocation_tombstones (session_id, revoked_at) \
             SELECT id, $2 FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 \
             ON CONFLICT (session_id) DO NOTHING RETURNING session_id",
        )
        .bind(user_id)
        .bind(now)
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
             ON CONFLICT (user_id, device_key) DO UPDATE SET last_seen = EXCLUDED.last_seen \
             RETURNING (xmax = 0) AS inserted",
        )
        .bind(user_id)
        .bind(device_key)
        .bind(now)
        .fetch_one(&mut *self.tx)
        .await?;
        if !get::<bool>(&inserted, "inserted")? {
            return Ok(DeviceSighting::Known);
        }
        let others = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM known_devices WHERE user_id = $1 AND device_key <> $2) AS others",
        )
        .bind(user_id)
        .bind(device_key)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(DeviceSighting::New { first_device: !get::<bool>(&others, "others")? })
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
        .bind(challenge.created_at)
        .bind(challenge.expires_at)
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
            .bind(now)
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
            .bind(now)
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
        // Conditional on the pending secret: a concurrent `begin` that replaced it either
        // committed before (no match) or waits for this transaction's row lock.
        let activated = sqlx::query(
            "UPDATE users SET totp_secret = totp_pending_secret, totp_pending_secret = NULL, \
             totp_last_step = $3, updated_at = $4 \
             WHERE id = $1 AND totp_pending_secret = $2",
        )
        .bind(user_id)
        .bind(secret)
        .bind(step)
        .bind(now)
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
        // Duplicates among the hashes (never, with random codes) would be one code.
        sqlx::query(
            "INSERT INTO recovery_codes (user_id, code_hash, created_at) \
             SELECT $1, code_hash, $3 FROM UNNEST($2::bytea[]) AS t (code_hash) \
             ON CONFLICT (user_id, code_hash) DO NOTHING",
        )
        .bind(user_id)
        .bind(recovery_hashes)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(true)
    }

    async fn disable_totp(&mut self, user_id: Uuid, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE users SET totp_secret = NULL, totp_pending_secret = NULL, totp_last_step = NULL, \
             updated_at = $2 WHERE id = $1",
        )
        .bind(user_id)
        .bind(now)
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

/// Releases `savepoint` if `result` is a success, else rolls back to it, leaving the
/// enclosing transaction usable.
async fn end_savepoint<T>(
    savepoint: Transaction<'_, Postgres>,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    match result {
        Ok(value) => {
            savepoint.commit().await?;
            Ok(value)
        }
        Err(error) => {
            savepoint.rollback().await?;
            Err(error)
        }
    }
}

// Statements shared by `PostgresStore` (on a pooled connection) and `PostgresTx`.

async fn create_user(conn: &mut PgConnection, user: &NewUser) -> Result<UserRecord, StoreError> {
    let row = sqlx::query(concat!(
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
    .bind(&user.roles)
    .bind(user.created_at)
    .fetch_one(conn)
    .await
    .map_err(conflict_or_error)?;
    user_from_row(&row)
}

async fn find_user_by_login(
    conn: &mut PgConnection,
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
    conn: &mut PgConnection,
    user_id: Uuid,
    keep: Option<Uuid>,
    reason: RevokeReason,
    now: OffsetDateTime,
) -> Result<Vec<Uuid>, StoreError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE sessions SET revoked_at = $3, revoke_reason = $4 \
         WHERE user_id = $1 AND revoked_at IS NULL AND id IS DISTINCT FROM $2 RETURNING id",
    )
    .bind(user_id)
    .bind(keep)
    .bind(now)
    .bind(reason.as_str())
    .fetch_all(conn)
    .await?;
    Ok(ids)
}

/// Consumes the user's live challenges, of one method or of all; returns how many.
async fn consume_mfa_challenges(
    conn: &mut PgConnection,
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
    .bind(now)
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

/// `timeout` in whole milliseconds for PostgreSQL's `statement_timeout`: rounded up, so a
/// sub-millisecond timeout does not become 0 ("no timeout"), and capped at the largest
/// value the server accepts (`INT_MAX` ms, about 24.8 days).
fn timeout_millis(timeout: Duration) -> u128 {
    let millis = timeout.as_nanos().div_ceil(1_000_000);
    millis.min(i32::MAX as u128)
}

/// Unique violations on the user keys become [`StoreError::Conflict`], named by the
/// constraints of the migration (`users_username_key_unique`, `users_email_key_unique`).
fn conflict_or_error(error: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &error
        && db.is_unique_violation()
    {
        match db.constraint() {
            Some(name) if name.contains("username") => return StoreError::Conflict("username"),
            Some(name) if name.contains("email") => return StoreError::Conflict("email"),
            _ => {}
        }
    }
    error.into()
}

/// Reads one column; a value that does not decode is a corrupt row, not a panic.
fn get<'r, T>(row: &'r PgRow, column: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(column).map_err(|error| StoreError::Corrupt(format!("column {column}: {error}")))
}

fn user_from_row(row: &PgRow) -> Result<UserRecord, StoreError> {
    Ok(UserRecord {
        id: get(row, "id")?,
        username: get(row, "username")?,
        email: get(row, "email")?,
        password_hash: get(row, "password_hash")?,
        first_name: get(row, "first_name")?,
        last_name: get(row, "last_name")?,
        phone: get(row, "phone")?,
        bio: get(row, "bio")?,
        roles: get(row, "roles")?,
        email_verified_at: get(row, "email_verified_at")?,
        created_at: get(row, "created_at")?,
        email_otp_enabled: get(row, "email_otp_enabled")?,
        totp_enabled: get(row, "totp_enabled")?,
    })
}

fn session_from_row(row: &PgRow) -> Result<SessionRecord, StoreError> {
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
        created_at: get(row, "created_at")?,
        last_active_at: get(row, "last_active_at")?,
        refreshed_at: get(row, "refreshed_at")?,
        expires_at: get(row, "expires_at")?,
        revoked_at: get(row, "revoked_at")?,
        location: location_from_row(row)?,
        amr: get(row, "amr")?,
    })
}

/// The case-folded form of a login identifier, as stored in `identifier_key`: the same
/// folding as the login lookup (trimmed, lower case), applied also to the users' keys when
/// an account's attempts are deleted, so they match case-insensitively.
fn identifier_key(identifier: &str) -> String {
    identifier.trim().to_lowercase()
}

/// `None` when every location column is NULL; otherwise the values as stored.
fn location_from_row(row: &PgRow) -> Result<Option<Location>, StoreError> {
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

fn attempt_from_row(row: &PgRow) -> Result<LoginAttempt, StoreError> {
    let outcome: String = get(row, "outcome")?;
    Ok(LoginAttempt {
        id: get(row, "id")?,
        at: get(row, "at")?,
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
fn count(row: &PgRow, column: &str) -> Result<u32, StoreError> {
    let value: i32 = get(row, column)?;
    u32::try_from(value).map_err(|error| StoreError::Corrupt(format!("column {column}: {error}")))
}

fn guard_from_row(row: &PgRow) -> Result<GuardState, StoreError> {
    Ok(GuardState {
        failures: count(row, "failures")?,
        first_failure_at: get(row, "first_failure_at")?,
        locked_until: get(row, "locked_until")?,
        lockouts: count(row, "lockouts")?,
    })
}

fn challenge_from_row(row: &PgRow) -> Result<MfaChallenge, StoreError> {
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
        expires_at: get(row, "expires_at")?,
    })
}

fn mail_from_row(row: &PgRow) -> Result<OutboxMail, StoreError> {
    let attempts: i32 = get(row, "attempts")?;
    Ok(OutboxMail {
        id: get(row, "id")?,
        to: get(row, "recipient")?,
        subject: get(row, "subject")?,
        text: get(row, "body_text")?,
        html: get(row, "body_html")?,
        attempts: u32::try_from(attempts)
            .map_err(|error| StoreError::Corrupt(format!("column attempts: {error}")))?,
        created_at: get(row, "created_at")?,
        last_error: get(row, "last_error")?,
    })
}
