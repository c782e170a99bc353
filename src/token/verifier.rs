//! Verification without signing keys: the validator (sidecar) mode checks tokens against a
//! published key set (JWKS) only — from a file, or fetched from a central instance — and
//! swaps in a newer set when the keys rotate.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use jsonwebtoken::{
    DecodingKey, Validation,
    jwk::{JwkSet, KeyAlgorithm},
};

use super::{
    AccessClaims, SigningAlgorithm, TokenRejection,
    access::{validations, verify_with},
    verified::VerifiedCache,
};
use crate::config::TokenSettings;

/// The public keys of one JWKS, by `kid`.
struct PublicKeys {
    keys: HashMap<String, (SigningAlgorithm, DecodingKey)>,
    /// The keys' public members, sorted: two sets with equal fingerprints hold the same keys.
    fingerprint: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("not a JWKS document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("JWKS key {kid:?}: {reason}")]
    Key { kid: String, reason: String },
    #[error("the JWKS has no usable key")]
    Empty,
}

impl PublicKeys {
    fn parse(jwks_json: &str, allowed: &[SigningAlgorithm]) -> Result<PublicKeys, JwksError> {
        let set: JwkSet = serde_json::from_str(jwks_json)?;
        let mut keys = HashMap::new();
        let mut fingerprint = Vec::new();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            let bad = |reason: &str| JwksError::Key { kid: kid.clone(), reason: reason.into() };
            if kid.is_empty() {
                return Err(bad("no kid"));
            }
            let algorithm = match jwk.common.key_algorithm {
                Some(KeyAlgorithm::RS256) => SigningAlgorithm::RS256,
                Some(KeyAlgorithm::ES256) => SigningAlgorithm::ES256,
                Some(KeyAlgorithm::EdDSA) => SigningAlgorithm::EdDSA,
                // Another issuer's key in a shared set: not ours to use, not a reason to
                // refuse the set.
                _ => {
                    tracing::debug!(kid, "JWKS key with an algorithm we do not accept: skipped");
                    continue;
                }
            };
            if !allowed.contains(&algorithm) {
                continue;
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(&e.to_string()))?;
            fingerprint.push(serde_json::to_string(jwk)?);
            keys.insert(kid, (algorithm, key));
        }
        if keys.is_empty() {
            return Err(JwksError::Empty);
        }
        fingerprint.sort();
        Ok(PublicKeys { keys, fingerprint })
    }
}

/// Verifies access tokens against a replaceable public key set, with the verified-claims
/// cache of the full server.
pub struct TokenVerifier {
    /// The key set, and its generation (bumped at every replacement, so a verification that
    /// used an older set never fills the cache after the set changed).
    keys: RwLock<(Arc<PublicKeys>, u64)>,
    allowed: Vec<SigningAlgorithm>,
    validations: HashMap<SigningAlgorithm, Validation>,
    verified: VerifiedCache,
}

impl TokenVerifier {
    pub fn from_jwks(jwks_json: &str, settings: &TokenSettings) -> Result<TokenVerifier, JwksError> {
        let keys = PublicKeys::parse(jwks_json, &settings.allowed_algorithms)?;
        Ok(TokenVerifier {
            keys: RwLock::new((Arc::new(keys), 0)),
            allowed: settings.allowed_algorithms.clone(),
            validations: validations(settings),
            verified: VerifiedCache::new(settings.verified_cache_capacity),
        })
    }

    /// Replaces the key set (a rotation seen at the source). Tokens of keys no longer in the
    /// set (or whose material changed) stop verifying — cached ones too: the cache is cleared
    /// and no verification begun under the old set may fill it afterwards.
    pub fn replace(&self, jwks_json: &str) -> Result<usize, JwksError> {
        let keys = PublicKeys::parse(jwks_json, &self.allowed)?;
        let count = keys.keys.len();
        let mut current = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let unchanged = current.0.fingerprint == keys.fingerprint;
        if !unchanged {
            *current = (Arc::new(keys), current.1 + 1);
            self.verified.clear();
        }
        Ok(count)
    }

    /// Whether a key with this `kid` is loaded.
    pub fn knows(&self, kid: &str) -> bool {
        self.current().0.keys.contains_key(kid)
    }

    fn current(&self) -> (Arc<PublicKeys>, u64) {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Verifies `token` (from the cache when seen before).
    pub fn verify_cached(&self, token: &str) -> Result<Arc<AccessClaims>, TokenRejection> {
        let key = VerifiedCache::key(token);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some(claims) = self.verified.get(&key, now) {
            return Ok(claims);
        }
        let (keys, generation) = self.current();
        let claims = Arc::new(verify_with(token, &self.validations, |kid| {
            keys.keys.get(kid).map(|(alg, key)| (*alg, key))
        })?);
        // Held while inserting: a replacement waits, so it cannot clear in between.
        let current = self.keys.read().unwrap_or_else(|p| p.into_inner());
        if current.1 == generation {
            self.verified.insert(key, claims.clone(), now);
        }
        Ok(claims)
    }
}

/// The `kid` a token's header names, if it can be read (to decide whether to refresh keys).
pub fn token_kid(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).ok()?.kid
}
