//! Tokens: signing keys and JWKS ([`keys`]), access JWTs ([`access`]) and opaque refresh
//! tokens ([`refresh`]).

pub mod access;
pub mod keys;
pub mod refresh;

pub use access::{AccessClaims, AccessTokens, TokenRejection};
pub use keys::{KeySet, SigningAlgorithm};
