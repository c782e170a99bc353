//! Tokens: signing keys and JWKS ([`keys`]), access JWTs ([`access`]), and opaque secrets
//! ([`opaque`]): refresh tokens ([`refresh`]) and single-use mail tokens ([`one_time`]).

pub mod access;
pub mod keys;
pub mod one_time;
pub mod opaque;
pub mod refresh;
mod verified;
pub mod verifier;

pub use access::{AccessClaims, AccessTokens, TokenRejection};
pub use keys::{KeySet, SigningAlgorithm};
pub use verifier::TokenVerifier;
