-- Login history and where sessions were opened from (PostgreSQL).

-- Every login attempt, successful or not, for the user's history and for audit.
CREATE TABLE login_attempts (
    id                 uuid             PRIMARY KEY,
    at                 timestamptz      NOT NULL,
    -- The username or email as typed (bounded by the caller), kept even when it matched
    -- no account.
    identifier         text             NOT NULL,
    -- Its case-folded form (computed by the application): deleting an account deletes the
    -- unmatched attempts that named its username or email.
    identifier_key     text             NOT NULL,
    -- The account it matched, if any; its attempts go with it.
    user_id            uuid             REFERENCES users (id) ON DELETE CASCADE,
    -- success or failure.
    outcome            text             NOT NULL,
    -- A stable code: ok, invalid_credentials, email_not_verified, ...
    reason             text             NOT NULL,
    ip_address         text             NOT NULL DEFAULT '',
    user_agent         text             NOT NULL DEFAULT '',
    device_fingerprint text             NOT NULL DEFAULT '',
    device_type        text             NOT NULL DEFAULT '',
    browser            text             NOT NULL DEFAULT '',
    os                 text             NOT NULL DEFAULT '',
    -- Location per GeoIP: all NULL when unknown.
    country            text,
    city               text,
    latitude           double precision,
    longitude          double precision
);

-- A user's history, newest first, paginated by (at, id); also serves the cascade.
CREATE INDEX login_attempts_user_at_idx ON login_attempts (user_id, at DESC, id DESC);
-- Retention purges by age.
CREATE INDEX login_attempts_at_idx ON login_attempts (at);
-- Deleting an account finds the unmatched attempts naming it; matched ones go by user_id.
CREATE INDEX login_attempts_identifier_key_idx ON login_attempts (identifier_key)
    WHERE user_id IS NULL;

-- Where a session was opened from, per GeoIP: all NULL when unknown.
ALTER TABLE sessions
    ADD COLUMN country   text,
    ADD COLUMN city      text,
    ADD COLUMN latitude  double precision,
    ADD COLUMN longitude double precision;
