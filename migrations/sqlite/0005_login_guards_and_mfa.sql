-- Durable failure budgets (account lockout), second factors, and the authentication
-- methods of sessions (SQLite). Types as in 0001: ids and hashes BLOB, instants INTEGER
-- Unix microseconds, booleans INTEGER 0 or 1.

-- One failure budget per (subject, scope). Kept here rather than in the hot state so that
-- a Redis outage or flush never unlocks an account. Tries are counted before their secret
-- is checked, by one conditional upsert on the primary key.
CREATE TABLE login_guards (
    -- u:<user id> for an account, i:<hex hash> for an identifier that named no account.
    subject          TEXT    NOT NULL,
    -- account, device:<hex key> (a known device's own budget) or otp (second factors).
    scope            TEXT    NOT NULL,
    -- The account of a u: subject: its guards go with it.
    user_id          BLOB    REFERENCES users (id) ON DELETE CASCADE,
    failures         INTEGER NOT NULL,
    -- Start of the current counting window.
    first_failure_at INTEGER NOT NULL,
    locked_until     INTEGER,
    -- Consecutive lockouts: each lock lasts longer than the one before.
    lockouts         INTEGER NOT NULL,
    PRIMARY KEY (subject, scope)
) STRICT;

-- For the cascade when an account is deleted.
CREATE INDEX login_guards_user_id_idx ON login_guards (user_id);
-- Retention purges by age.
CREATE INDEX login_guards_first_failure_at_idx ON login_guards (first_failure_at);

-- Second factors. The TOTP secrets are sealed by the application (opaque here); the
-- pending one awaits confirmation with a code. The last used time step makes each code
-- work once.
ALTER TABLE users ADD COLUMN email_otp_enabled   INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN totp_secret         BLOB;
ALTER TABLE users ADD COLUMN totp_pending_secret BLOB;
ALTER TABLE users ADD COLUMN totp_last_step      INTEGER;

-- Challenges handed out by a login whose password was right, answered with a code.
CREATE TABLE mfa_challenges (
    id          BLOB    NOT NULL PRIMARY KEY,
    -- SHA-256 of the challenge token; the token itself is only in the login answer.
    token_hash  BLOB    NOT NULL UNIQUE,
    user_id     BLOB    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- email_otp or totp.
    method      TEXT    NOT NULL,
    -- For email_otp: the keyed hash of the mailed code.
    code_hash   BLOB,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    -- Answered, or killed by a newer challenge or a used-up budget.
    consumed_at INTEGER
) STRICT;

-- A new challenge kills the user's older ones; also serves the cascade.
CREATE INDEX mfa_challenges_user_id_idx ON mfa_challenges (user_id);

-- Single-use codes that stand in for TOTP; only their hashes are stored.
CREATE TABLE recovery_codes (
    user_id    BLOB    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash  BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    used_at    INTEGER,
    PRIMARY KEY (user_id, code_hash)
) STRICT;

-- Authentication methods (RFC 8176) each session's login proved, as a JSON array of
-- strings: access tokens issued on refresh carry them on. Sessions opened before were all
-- password logins.
ALTER TABLE sessions ADD COLUMN amr TEXT NOT NULL DEFAULT '["pwd"]';
