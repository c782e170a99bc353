-- Devices each user has logged in from, to tell a new device (and alert) from a known one.
-- The key is a SHA-256 of the device fingerprint, or of user agent + network without one:
-- nothing readable about the device is kept here. Instants are Unix microseconds.
CREATE TABLE known_devices (
    user_id    BLOB    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_key BLOB    NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_key)
);
