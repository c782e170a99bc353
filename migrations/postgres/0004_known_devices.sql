-- Devices each user has logged in from, to tell a new device (and alert) from a known one.
-- The key is a SHA-256 of the device fingerprint, or of user agent + network without one:
-- nothing readable about the device is kept here.
CREATE TABLE known_devices (
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_key bytea       NOT NULL,
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    PRIMARY KEY (user_id, device_key)
);
