-- Email verification, password reset, profiles, the mail outbox, and revocation tombstones
-- (SQLite). Types as in 0001: ids and hashes BLOB, instants INTEGER Unix microseconds.

ALTER TABLE users ADD COLUMN phone TEXT NOT NULL DEFAULT '';
ALTER TABLE users ADD COLUMN bio   TEXT NOT NULL DEFAULT '';

-- Single-use tokens mailed as links. Only their SHA-256 is stored.
CREATE TABLE one_time_tokens (
    hash       BLOB    NOT NULL PRIMARY KEY,
    user_id    BLOB    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- verify_email, reset_password or change_email: a token never works for another.
    purpose    TEXT    NOT NULL,
    -- For change_email: the address to switch to once confirmed.
    new_email  TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    -- Spent, or killed by a newer token of the same purpose.
    used_at    INTEGER
) STRICT;

-- Issuing a token kills the user's older ones of the purpose; also serves the cascade.
CREATE INDEX one_time_tokens_user_purpose_idx ON one_time_tokens (user_id, purpose);

-- Mail queued in the same transaction as the change it reports, delivered by a worker.
CREATE TABLE outbox (
    id              BLOB    NOT NULL PRIMARY KEY,
    -- The account it concerns, if any: its queued mail goes when the account is deleted.
    user_id         BLOB    REFERENCES users (id) ON DELETE CASCADE,
    recipient       TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    body_text       TEXT    NOT NULL,
    body_html       TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    -- Due from this instant; a claim moves it to the end of the claimer's lease.
    next_attempt_at INTEGER NOT NULL,
    sent_at         INTEGER,
    gave_up_at      INTEGER,
    last_error      TEXT
) STRICT;

-- Claiming reads "due, not sent, not given up, oldest first": only pending rows are
-- indexed (the query repeats this WHERE clause verbatim so SQLite uses the index).
CREATE INDEX outbox_due_idx ON outbox (next_attempt_at)
    WHERE sent_at IS NULL AND gave_up_at IS NULL;
-- For the cascade when an account is deleted.
CREATE INDEX outbox_user_id_idx ON outbox (user_id);

-- The live sessions of deleted accounts: their access tokens may outlive the account, so
-- their revocation must still be re-published. No personal data.
CREATE TABLE revocation_tombstones (
    session_id BLOB    NOT NULL PRIMARY KEY,
    revoked_at INTEGER NOT NULL
) STRICT;

CREATE INDEX revocation_tombstones_revoked_at_idx ON revocation_tombstones (revoked_at);
