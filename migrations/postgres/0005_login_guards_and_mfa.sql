-- Durable failure budgets (account lockout), second factors, and the authentication
-- methods of sessions (PostgreSQL).

-- One failure budget per (subject, scope). Kept here rather than in the hot state so that
-- a Redis outage or flush never unlocks an account. Tries are counted before their secret
-- is checked, by one conditional upsert on the primary key.
CREATE TABLE login_guards (
    -- u:<user id> for an account, i:<hex hash> for an identifier that named no account.
    subject          text        NOT NULL,
    -- account, device:<hex key> (a known device's own budget) or otp (second factors).
    scope            text        NOT NULL,
    -- The account of a u: subject: its guards go with it.
    user_id          uuid        REFERENCES users (id) ON DELETE CASCADE,
    failures         integer     NOT NULL,
    -- Start of the current counting window.
    first_failure_at timestamptz NOT NULL,
    locked_until     timestamptz,
    -- Consecutive lockouts: each lock lasts longer than the one before.
    lockouts         integer     NOT NULL,
    PRIMARY KEY (subject, scope)
);

-- For the cascade when an account is deleted.
CREATE INDEX login_guards_user_id_idx ON login_guards (user_id);
-- Retention purges by age.
CREATE INDEX login_guards_first_failure_at_idx ON login_guards (first_failure_at);

-- Second factors. The TOTP secrets are sealed by the application (opaque here); the
-- pending one awaits confirmation with a code. The last used time step makes each code
-- work once.
ALTER TABLE users
    ADD COLUMN email_otp_enabled   boolean NOT NULL DEFAULT false,
    ADD COLUMN totp_secret         bytea,
    ADD COLUMN totp_pending_secret bytea,
    ADD COLUMN totp_last_step      bigint;

-- Challenges handed out by a login whose password was right, answered with a code.
CREATE TABLE mfa_challenges (
    id          uuid        PRIMARY KEY,
    -- SHA-256 of the challenge token; the token itself is only in the login answer.
    token_hash  bytea       NOT NULL CONSTRAINT mfa_challenges_token_hash_unique UNIQUE,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- email_otp or totp.
    method      text        NOT NULL,
    -- For email_otp: the keyed hash of the mailed code.
    code_hash   bytea,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    -- Answered, or killed by a newer challenge or a used-up budget.
    consumed_at timestamptz
);

-- A new challenge kills the user's older ones; also serves the cascade.
CREATE INDEX mfa_challenges_user_id_idx ON mfa_challenges (user_id);

-- Single-use codes that stand in for TOTP; only their hashes are stored.
CREATE TABLE recovery_codes (
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash  bytea       NOT NULL,
    created_at timestamptz NOT NULL,
    used_at    timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

-- Authentication methods (RFC 8176) each session's login proved: access tokens issued on
-- refresh carry them on. Sessions opened before were all password logins.
ALTER TABLE sessions ADD COLUMN amr text[] NOT NULL DEFAULT '{pwd}';
