-- Users and their sessions (PostgreSQL).
--
-- Uniqueness is enforced on the case-folded keys (computed by the application), never on
-- the display forms. Constraint names matter: the store maps a unique violation to
-- "username" or "email" by constraint name.

CREATE TABLE users (
    id                uuid        PRIMARY KEY,
    username          text        NOT NULL,
    username_key      text        NOT NULL CONSTRAINT users_username_key_unique UNIQUE,
    email             text        NOT NULL,
    email_key         text        NOT NULL CONSTRAINT users_email_key_unique UNIQUE,
    password_hash     text        NOT NULL,
    first_name        text        NOT NULL DEFAULT '',
    last_name         text        NOT NULL DEFAULT '',
    roles             text[]      NOT NULL DEFAULT '{}',
    email_verified_at timestamptz,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);

CREATE TABLE sessions (
    id                 uuid        PRIMARY KEY,
    user_id            uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- SHA-256 of the current refresh token; rotation looks sessions up by it.
    refresh_hash       bytea       NOT NULL CONSTRAINT sessions_refresh_hash_unique UNIQUE,
    -- The hash rotated away most recently: presenting it again is a replay.
    prev_refresh_hash  bytea,
    device_type        text        NOT NULL DEFAULT '',
    browser            text        NOT NULL DEFAULT '',
    os                 text        NOT NULL DEFAULT '',
    user_agent         text        NOT NULL DEFAULT '',
    ip_address         text        NOT NULL DEFAULT '',
    device_fingerprint text        NOT NULL DEFAULT '',
    created_at         timestamptz NOT NULL,
    last_active_at     timestamptz NOT NULL,
    -- Last login or refresh: the idle timeout counts from here.
    refreshed_at       timestamptz NOT NULL,
    -- Absolute end of the session.
    expires_at         timestamptz NOT NULL,
    revoked_at         timestamptz,
    revoke_reason      text
);

CREATE INDEX sessions_user_id_idx ON sessions (user_id);
-- Partial indexes: most sessions have no previous hash / are not revoked, and the
-- queries using these columns (`= $1`, `>= $1`) imply IS NOT NULL.
CREATE INDEX sessions_prev_refresh_hash_idx ON sessions (prev_refresh_hash)
    WHERE prev_refresh_hash IS NOT NULL;
CREATE INDEX sessions_revoked_at_idx ON sessions (revoked_at)
    WHERE revoked_at IS NOT NULL;
