-- Users and their sessions (SQLite).
--
-- Same shape as the PostgreSQL schema, in SQLite's types:
-- * ids are 16-byte BLOBs (how sqlx encodes a Uuid for SQLite);
-- * instants are INTEGER Unix time in MICROseconds (converted in Rust): they compare and
--   index correctly as numbers and keep the precision of PostgreSQL's timestamptz, where
--   text timestamps would compare wrongly across formats and offsets;
-- * roles is a TEXT holding a JSON array of strings.
-- STRICT makes SQLite reject values of the wrong type instead of silently storing them.
--
-- Uniqueness is enforced on the case-folded keys (computed by the application), never on
-- the display forms.

CREATE TABLE users (
    id                BLOB    NOT NULL PRIMARY KEY,
    username          TEXT    NOT NULL,
    username_key      TEXT    NOT NULL UNIQUE,
    email             TEXT    NOT NULL,
    email_key         TEXT    NOT NULL UNIQUE,
    password_hash     TEXT    NOT NULL,
    first_name        TEXT    NOT NULL DEFAULT '',
    last_name         TEXT    NOT NULL DEFAULT '',
    roles             TEXT    NOT NULL DEFAULT '[]',
    email_verified_at INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
) STRICT;

CREATE TABLE sessions (
    id                 BLOB    NOT NULL PRIMARY KEY,
    user_id            BLOB    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- SHA-256 of the current refresh token; rotation looks sessions up by it.
    refresh_hash       BLOB    NOT NULL UNIQUE,
    -- The hash rotated away most recently: presenting it again is a replay.
    prev_refresh_hash  BLOB,
    device_type        TEXT    NOT NULL DEFAULT '',
    browser            TEXT    NOT NULL DEFAULT '',
    os                 TEXT    NOT NULL DEFAULT '',
    user_agent         TEXT    NOT NULL DEFAULT '',
    ip_address         TEXT    NOT NULL DEFAULT '',
    device_fingerprint TEXT    NOT NULL DEFAULT '',
    created_at         INTEGER NOT NULL,
    last_active_at     INTEGER NOT NULL,
    -- Last login or refresh: the idle timeout counts from here.
    refreshed_at       INTEGER NOT NULL,
    -- Absolute end of the session.
    expires_at         INTEGER NOT NULL,
    revoked_at         INTEGER,
    revoke_reason      TEXT
) STRICT;

CREATE INDEX sessions_user_id_idx ON sessions (user_id);
-- Partial indexes: most sessions have no previous hash / are not revoked, and the
-- queries using these columns (`= ?`, `>= ?`) imply IS NOT NULL.
CREATE INDEX sessions_prev_refresh_hash_idx ON sessions (prev_refresh_hash)
    WHERE prev_refresh_hash IS NOT NULL;
CREATE INDEX sessions_revoked_at_idx ON sessions (revoked_at)
    WHERE revoked_at IS NOT NULL;
