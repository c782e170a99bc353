-- Login history and where sessions were opened from (SQLite). Types as in 0001: ids BLOB,
-- instants INTEGER Unix microseconds.

-- Every login attempt, successful or not, for the user's history and for audit.
CREATE TABLE login_attempts (
    id                 BLOB    NOT NULL PRIMARY KEY,
    at                 INTEGER NOT NULL,
    -- The username or email as typed (bounded by the caller), kept even when it matched
    -- no account.
    identifier         TEXT    NOT NULL,
    -- Its case-folded form (computed by the application): deleting an account deletes the
    -- unmatched attempts that named its username or email.
    identifier_key     TEXT    NOT NULL,
    -- The account it matched, if any; its attempts go with it.
    user_id            BLOB    REFERENCES users (id) ON DELETE CASCADE,
    -- success or failure.
    outcome            TEXT    NOT NULL,
    -- A stable code: ok, invalid_credentials, email_not_verified, ...
    reason             TEXT    NOT NULL,
    ip_address         TEXT    NOT NULL DEFAULT '',
    user_agent         TEXT    NOT NULL DEFAULT '',
    device_fingerprint TEXT    NOT NULL DEFAULT '',
    device_type        TEXT    NOT NULL DEFAULT '',
    browser            TEXT    NOT NULL DEFAULT '',
    os                 TEXT    NOT NULL DEFAULT '',
    -- Location per GeoIP: all NULL when unknown.
    country            TEXT,
    city               TEXT,
    latitude           REAL,
    longitude          REAL
) STRICT;

-- A user's history, newest first, paginated by (at, id); also serves the cascade.
CREATE INDEX login_attempts_user_at_idx ON login_attempts (user_id, at DESC, id DESC);
-- Retention purges by age.
CREATE INDEX login_attempts_at_idx ON login_attempts (at);
-- Deleting an account finds the unmatched attempts naming it (the query repeats this
-- WHERE clause so SQLite uses the index); matched ones go by user_id.
CREATE INDEX login_attempts_identifier_key_idx ON login_attempts (identifier_key)
    WHERE user_id IS NULL;

-- Where a session was opened from, per GeoIP: all NULL when unknown.
ALTER TABLE sessions ADD COLUMN country   TEXT;
ALTER TABLE sessions ADD COLUMN city      TEXT;
ALTER TABLE sessions ADD COLUMN latitude  REAL;
ALTER TABLE sessions ADD COLUMN longitude REAL;
