//! [`Store`] on PostgreSQL.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, SqlStr};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    DeviceInfo, NewSession, NewUser, RefreshRotation, RevokeReason, RotateOutcome, SessionRecord, Store,
    StoreError, UserRecord,
};

/// The columns [`user_from_row`] reads, as a literal so queries can `concat!` it.
macro_rules! user_columns {
    () => {
        "id, username, email, password_hash, first_name, last_name, roles, email_verified_at, created_at"
    };
}

/// The columns [`session_from_row`] reads.
macro_rules! session_columns {
    () => {
        "id, user_id, device_type, browser, os, user_agent, ip_address, device_fingerprint, \
         created_at, last_active_at, refreshed_at, expires_at, revoked_at"
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
        Migrator::with_migrations(vec![Migration::new(
            1,
            "users and sessions".into(),
            MigrationType::Simple,
            SqlStr::from_static(include_str!("../../migrations/postgres/0001_users_and_sessions.sql")),
            false,
        )])
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
        .fetch_one(&self.pool)
        .await
        .map_err(conflict_or_error)?;
        user_from_row(&row)
    }

    async fn find_user_by_login(&self, login_key: &str) -> Result<Option<UserRecord>, StoreError> {
        // A username match wins should one user's username equal another's email.
        let row = sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE username_key = $1 OR email_key = $1 \
             ORDER BY username_key = $1 DESC LIMIT 1"
        ))
        .bind(login_key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(user_from_row).transpose()
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
        let row = sqlx::query(concat!(
            "INSERT INTO sessions (id, user_id, refresh_hash, device_type, browser, os, user_agent, \
             ip_address, device_fingerprint, created_at, last_active_at, refreshed_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $10, $11) RETURNING ",
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
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE sessions SET revoked_at = $3, revoke_reason = $4 \
             WHERE user_id = $1 AND revoked_at IS NULL AND id IS DISTINCT FROM $2 RETURNING id",
        )
        .bind(user_id)
        .bind(keep)
        .bind(now)
        .bind(reason.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
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
        let rows =
            sqlx::query("SELECT id, revoked_at FROM sessions WHERE revoked_at >= $1 ORDER BY revoked_at, id")
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|row| Ok((get(row, "id")?, get(row, "revoked_at")?))).collect()
    }
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
        roles: get(row, "roles")?,
        email_verified_at: get(row, "email_verified_at")?,
        created_at: get(row, "created_at")?,
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
    })
}
