//! Refresh tokens: opaque, prefixed `pcrt_`, stored as SHA-256 only.

use super::opaque;

pub const PREFIX: &str = "pcrt_";

/// A new refresh token and the hash to store for it.
pub fn generate() -> (String, Vec<u8>) {
    opaque::generate(PREFIX)
}

pub use opaque::hash;

pub fn looks_valid(token: &str) -> bool {
    opaque::looks_valid(token, PREFIX)
}
