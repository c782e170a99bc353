//! Access tokens: short-lived JWTs signed with the active key and verified against every
//! loaded key. Verification pins the algorithm to the key named by `kid` (so an HS256 token
//! "signed" with a public key, or `alg: none`, never verifies) and lists the required
//! claims explicitly (jsonwebtoken < 10.3 skipped `exp`/`nbf` checks on mistyped claims,
//! CVE-2026-25537).

use std::{collections::HashMap, time::Duration};

use jsonwebtoken::{DecodingKey, Header, Validation, decode, decode_header, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::keys::{KeySet, SigningAlgorithm};
use crate::config::TokenSettings;

/// The claims of a Portcullis access token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    /// The user id.
    pub sub: String,
    /// The session id: revoking the session revokes the token.
    pub sid: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Authentication methods used: `pwd`, later `otp`.
    #[serde(default)]
    pub amr: Vec<String>,
    #[serde(default)]
    pub email_verified: bool,
}

/// Why a token was rejected; mirrors `TokenInvalidReason` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRejection {
    Malformed,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
}

/// What a new access token says about whom.
pub struct Subject<'a> {
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub roles: &'a [String],
    pub amr: &'a [&'a str],
    pub email_verified: bool,
}

/// Issues and verifies access tokens.
pub struct AccessTokens {
    keys: KeySet,
    issuer: String,
    audience: String,
    ttl: Duration,
    /// One prepared validation per allowed algorithm.
    validations: HashMap<SigningAlgorithm, Validation>,
    /// Claims of tokens verified before (see [`super::verified`]).
    verified: super::verified::VerifiedCache,
}

const REQUIRED_CLAIMS: &[&str] = &["exp", "nbf", "iat", "iss", "aud", "sub"];

impl AccessTokens {
    pub fn new(keys: KeySet, settings: &TokenSettings) -> Result<AccessTokens, super::keys::KeyError> {
        if !settings.allowed_algorithms.contains(&keys.signer().algorithm) {
            return Err(super::keys::KeyError::SignerNotAllowed(keys.signer().algorithm));
        }
        let validations = validations(settings);
        Ok(AccessTokens {
            keys,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            ttl: settings.access_ttl,
            validations,
            verified: super::verified::VerifiedCache::new(settings.verified_cache_capacity),
        })
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Signs a token for `subject`, valid from `now` for the configured lifetime.
    pub fn issue(
        &self,
        subject: &Subject<'_>,
        now: time::OffsetDateTime,
    ) -> Result<(String, AccessClaims), jsonwebtoken::errors::Error> {
        let iat = now.unix_timestamp();
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: subject.user_id.to_string(),
            sid: subject.session_id.to_string(),
            iat,
            nbf: iat,
            exp: iat + self.ttl.as_secs() as i64,
            jti: Uuid::new_v4().to_string(),
            roles: subject.roles.to_vec(),
            amr: subject.amr.iter().map(|s| s.to_string()).collect(),
            email_verified: subject.email_verified,
        };
        let signer = self.keys.signer();
        let mut header = Header::new(signer.algorithm.jwt());
        header.kid = Some(signer.kid.clone());
        let token = sign_jwt(&header, &claims, &signer.signer)?;
        Ok((token, claims))
    }

    /// Checks signature, algorithm, `exp`/`nbf` (with leeway), `iss` and `aud`. Revocation is
    /// the caller's business.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenRejection> {
        verify_with(token, &self.validations, |kid| self.keys.find(kid).map(|k| (k.algorithm, &k.decoding)))
    }

    /// [`Self::verify`], answered from the verified-claims cache when this exact token was
    /// verified before and has not expired: the hot path of ValidateToken.
    pub fn verify_cached(&self, token: &str) -> Result<std::sync::Arc<AccessClaims>, TokenRejection> {
        let key = super::verified::VerifiedCache::key(token);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some(claims) = self.verified.get(&key, now) {
            return Ok(claims);
        }
        let claims = std::sync::Arc::new(self.verify(token)?);
        self.verified.insert(key, claims.clone(), now);
        Ok(claims)
    }

    /// Signs a token once and verifies it: proves at start-up that the configured keys,
    /// algorithms and claim checks work together (and that an expired token is refused).
    pub fn self_test(&self) -> anyhow::Result<()> {
        let now = time::OffsetDateTime::now_utc();
        let subject = Subject {
            user_id: Uuid::nil(),
            session_id: Uuid::nil(),
            roles: &[],
            amr: &["pwd"],
            email_verified: false,
        };
        let (token, claims) = self.issue(&subject, now)?;
        let verified = self.verify(&token).map_err(|r| anyhow::anyhow!("fresh token rejected: {r:?}"))?;
        anyhow::ensure!(verified == claims, "verified claims differ from issued ones");
        let long_ago = now - time::Duration::days(1);
        let (old, _) = self.issue(&subject, long_ago)?;
        anyhow::ensure!(self.verify(&old) == Err(TokenRejection::Expired), "expired token accepted");
        Ok(())
    }
}

/// What `jsonwebtoken::encode` makes (base64url of the header's and the claims' JSON, then
/// of the signature of the two), signed with a key parsed once instead of at every call.
fn sign_jwt(
    header: &Header,
    claims: &AccessClaims,
    signer: &super::keys::ParsedSigner,
) -> Result<String, jsonwebtoken::errors::Error> {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(header)?),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
    );
    let signature = signer.sign(message.as_bytes()).ok_or(ErrorKind::InvalidKeyFormat)?;
    Ok(format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// Why a header did not parse: a well-formed header naming an algorithm we do not know
/// (`none`, `HS512`…) is a signature problem; anything else is malformed.
/// The prepared validations of `settings`, one per allowed algorithm.
pub(super) fn validations(settings: &TokenSettings) -> HashMap<SigningAlgorithm, Validation> {
    settings
        .allowed_algorithms
        .iter()
        .map(|&alg| {
            let mut v = Validation::new(alg.jwt());
            v.set_required_spec_claims(REQUIRED_CLAIMS);
            v.set_issuer(&[&settings.issuer]);
            v.set_audience(&[&settings.audience]);
            v.validate_exp = true;
            v.validate_nbf = true;
            v.leeway = settings.leeway.as_secs();
            (alg, v)
        })
        .collect()
}

/// Verification against whichever keys `find` knows (by `kid`): the key decides the
/// algorithm, never the token.
pub(super) fn verify_with<'k>(
    token: &str,
    validations: &HashMap<SigningAlgorithm, Validation>,
    find: impl Fn(&str) -> Option<(SigningAlgorithm, &'k DecodingKey)>,
) -> Result<AccessClaims, TokenRejection> {
    let header = decode_header(token).map_err(|_| header_problem(token))?;
    let kid = header.kid.as_deref().ok_or(TokenRejection::BadSignature)?;
    let (algorithm, key) = find(kid).ok_or(TokenRejection::BadSignature)?;
    // The key decides the algorithm, not the token: a header naming another one fails.
    if header.alg != algorithm.jwt() {
        return Err(TokenRejection::BadSignature);
    }
    let validation = validations.get(&algorithm).ok_or(TokenRejection::BadSignature)?;
    let data = decode::<AccessClaims>(token, key, validation).map_err(|e| match e.kind() {
        ErrorKind::ExpiredSignature => TokenRejection::Expired,
        ErrorKind::ImmatureSignature => TokenRejection::NotYetValid,
        ErrorKind::InvalidIssuer => TokenRejection::WrongIssuer,
        ErrorKind::InvalidAudience => TokenRejection::WrongAudience,
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
            TokenRejection::BadSignature
        }
        _ => TokenRejection::Malformed,
    })?;
    Ok(data.claims)
}

fn header_problem(token: &str) -> TokenRejection {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let names_an_algorithm = token
        .split('.')
        .next()
        .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .is_some_and(|h| h.get("alg").is_some_and(serde_json::Value::is_string));
    if names_an_algorithm { TokenRejection::BadSignature } else { TokenRejection::Malformed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::keys::generate_key_file;
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
    use jsonwebtoken::encode;

    fn tokens(alg: SigningAlgorithm) -> AccessTokens {
        let dir = tempfile::tempdir().unwrap();
        generate_key_file(dir.path(), alg).unwrap();
        let keys = KeySet::load_dir(dir.path(), None).unwrap();
        AccessTokens::new(keys, &TokenSettings::default()).unwrap()
    }

    fn subject() -> Subject<'static> {
        Subject {
            user_id: Uuid::new_v4(),
            session_id: Uuid::new_v4(),
            roles: &[],
            amr: &["pwd"],
            email_verified: true,
        }
    }

    #[test]
    fn self_test_passes_for_every_algorithm() {
        for alg in [SigningAlgorithm::RS256, SigningAlgorithm::ES256, SigningAlgorithm::EdDSA] {
            tokens(alg).self_test().unwrap();
        }
    }

    #[test]
    fn tokens_are_signed_with_the_key_parsed_once_as_jsonwebtoken_would_sign_them() {
        for alg in [SigningAlgorithm::RS256, SigningAlgorithm::ES256, SigningAlgorithm::EdDSA] {
            // The key file stays: jsonwebtoken's key is read from it below.
            let dir = tempfile::tempdir().unwrap();
            generate_key_file(dir.path(), alg).unwrap();
            let t = AccessTokens::new(KeySet::load_dir(dir.path(), None).unwrap(), &TokenSettings::default())
                .unwrap();
            let signer = t.keys().signer();
            let (token, claims) = t.issue(&subject(), time::OffsetDateTime::now_utc()).unwrap();
            assert_eq!(t.verify(&token).unwrap(), claims);
            let mut header = Header::new(alg.jwt());
            header.kid = Some(signer.kid.clone());
            let theirs =
                encode(&header, &claims, &crate::token::keys::tests::jsonwebtoken_key(signer)).unwrap();
            if alg == SigningAlgorithm::ES256 {
                // ECDSA signatures are randomised: the signed parts must match.
                assert_eq!(token.rsplit_once('.').unwrap().0, theirs.rsplit_once('.').unwrap().0);
            } else {
                // PKCS#1 v1.5 and Ed25519 are deterministic: the very same token.
                assert_eq!(token, theirs, "{alg}");
            }
        }
    }

    #[test]
    fn tampered_claims_fail_the_signature() {
        let t = tokens(SigningAlgorithm::ES256);
        let (token, _) = t.issue(&subject(), time::OffsetDateTime::now_utc()).unwrap();
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let mut claims: serde_json::Value = serde_json::from_slice(&B64.decode(&parts[1]).unwrap()).unwrap();
        claims["roles"] = serde_json::json!(["admin"]);
        parts[1] = B64.encode(claims.to_string());
        assert_eq!(t.verify(&parts.join(".")), Err(TokenRejection::BadSignature));
    }

    #[test]
    fn a_token_of_another_key_set_is_refused() {
        let a = tokens(SigningAlgorithm::EdDSA);
        let b = tokens(SigningAlgorithm::EdDSA);
        let (token, _) = a.issue(&subject(), time::OffsetDateTime::now_utc()).unwrap();
        assert_eq!(b.verify(&token), Err(TokenRejection::BadSignature));
    }

    #[test]
    fn garbage_is_malformed() {
        let t = tokens(SigningAlgorithm::EdDSA);
        for garbage in ["", "abc", "a.b.c", "....", "eyJ0eXAiOiJKV1QifQ.e30.x"] {
            assert_eq!(t.verify(garbage), Err(TokenRejection::Malformed), "{garbage:?}");
        }
    }
}
