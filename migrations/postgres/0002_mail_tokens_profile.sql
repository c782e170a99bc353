-- Email verification, password reset, profiles, the mail outbox, and revocation tombstones
-- (PostgreSQL).

ALTER TABLE users
    ADD COLUMN phone text NOT NULL DEFAULT '',
    ADD COLUMN bio   text NOT NULL DEFAULT '';

-- Single-use tokens mailed as links. Only their SHA-256 is stored.
CREATE TABLE one_time_tokens (
    hash       bytea       PRIMARY KEY,
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- verify_email, reset_password or change_email: a token never works for another.
    purpose    text        NOT NULL,
    -- For change_email: the address to switch to once confirmed.
    new_email  text,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    -- Spent, or killed by a newer token of the same purpose.
    used_at    timestamptz
);

-- Issuing a token kills the user's older ones of the purpose; also serves the cascade.
CREATE INDEX one_time_tokens_user_purpose_idx ON one_time_tokens (user_id, purpose);

-- Mail queued in the same transaction as the change it reports, delivered by a worker.
CREATE TABLE outbox (
    id              uuid        PRIMARY KEY,
    -- The account it concerns, if any: its queued mail goes when the account is deleted.
    user_id         uuid        REFERENCES users (id) ON DELETE CASCADE,
    recipient       text        NOT NULL,
    subject         text        NOT NULL,
    body_text       text        NOT NULL,
    body_html       text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL,
    -- Due from this instant; a claim moves it to the end of the claimer's lease.
    next_attempt_at timestamptz NOT NULL,
    sent_at         timestamptz,
    gave_up_at      timestamptz,
    last_error      text
);

-- Claiming reads "due, not sent, not given up, oldest first": only pending rows are indexed.
CREATE INDEX outbox_due_idx ON outbox (next_attempt_at)
    WHERE sent_at IS NULL AND gave_up_at IS NULL;
-- For the cascade when an account is deleted.
CREATE INDEX outbox_user_id_idx ON outbox (user_id);

-- The live sessions of deleted accounts: their access tokens may outlive the account, so
-- their revocation must still be re-published. No personal data.
CREATE TABLE revocation_tombstones (
    session_id uuid        PRIMARY KEY,
    revoked_at timestamptz NOT NULL
);

CREATE INDEX revocation_tombstones_revoked_at_idx ON revocation_tombstones (revoked_at);
