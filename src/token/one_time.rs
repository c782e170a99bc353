//! Single-use tokens sent by mail (verification, password reset, email change): opaque,
//! prefixed by purpose, stored as SHA-256 only, spent atomically by the store.

use super::opaque;
use crate::store::TokenPurpose;

fn prefix(purpose: TokenPurpose) -> &'static str {
    match purpose {
        TokenPurpose::VerifyEmail => "pcve_",
        TokenPurpose::ResetPassword => "pcpr_",
        TokenPurpose::ChangeEmail => "pcec_",
        TokenPurpose::DisownLogin => "pcdl_",
    }
}

/// A new token for `purpose` and the hash to store for it.
pub fn generate(purpose: TokenPurpose) -> (String, Vec<u8>) {
    opaque::generate(prefix(purpose))
}

/// The stored hash of a presented token, or `None` when it cannot be a token of that
/// purpose (no storage round trip for garbage or a token of another kind).
pub fn parse(token: &str, purpose: TokenPurpose) -> Option<Vec<u8>> {
    let token = token.trim();
    opaque::looks_valid(token, prefix(purpose)).then(|| opaque::hash(token))
}
