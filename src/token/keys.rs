//! Signing keys: generated with aws-lc-rs, stored as PKCS#8 PEM files (one key per file),
//! identified by their RFC 7638 thumbprint (`kid`). Several keys may be loaded: one signs,
//! all verify, so rotating the signer leaves tokens of the previous key valid until they
//! expire.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use aws_lc_rs::{
    encoding::AsDer,
    rand::SystemRandom,
    rsa::KeySize,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair},
};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey,
    jwk::{Jwk, JwkSet, ThumbprintHash},
};
use serde::{Deserialize, Serialize};

/// The asymmetric algorithms Portcullis signs with. HMAC and `none` are deliberately absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
pub enum SigningAlgorithm {
    #[serde(alias = "rs256")]
    #[value(name = "RS256", alias = "rs256")]
    RS256,
    #[serde(alias = "es256")]
    #[value(name = "ES256", alias = "es256")]
    ES256,
    #[serde(alias = "eddsa", alias = "Ed25519", alias = "ed25519")]
    #[value(name = "EdDSA", alias = "eddsa", alias = "ed25519")]
    EdDSA,
}

impl SigningAlgorithm {
    pub fn jwt(self) -> Algorithm {
        match self {
            SigningAlgorithm::RS256 => Algorithm::RS256,
            SigningAlgorithm::ES256 => Algorithm::ES256,
            SigningAlgorithm::EdDSA => Algorithm::EdDSA,
        }
    }

    fn file_tag(self) -> &'static str {
        match self {
            SigningAlgorithm::RS256 => "rs256",
            SigningAlgorithm::ES256 => "es256",
            SigningAlgorithm::EdDSA => "eddsa",
        }
    }
}

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.jwt())
    }
}

/// One loaded key.
pub struct Key {
    pub kid: String,
    pub algorithm: SigningAlgorithm,
    pub(crate) encoding: EncodingKey,
    pub(crate) decoding: DecodingKey,
    /// The public half, as published in the JWKS.
    pub jwk: Jwk,
    pub path: PathBuf,
}

/// The loaded keys: one signer, all verifiers.
pub struct KeySet {
    keys: Vec<Key>,
    signer: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key material at {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a PKCS#8 PEM RSA, P-256 or Ed25519 private key")]
    Unsupported { path: PathBuf },
    #[error("key generation failed")]
    Generate,
    #[error("no key files (*.pem) in {0}")]
    Empty(PathBuf),
    #[error("signing key {0:?} is not among the loaded keys")]
    UnknownSigner(String),
    #[error("the signing key's algorithm {0} is not in tokens.allowed_algorithms")]
    SignerNotAllowed(SigningAlgorithm),
    #[error("jwk: {0}")]
    Jwk(#[from] jsonwebtoken::errors::Error),
}

impl KeySet {
    /// Loads every `*.pem` in `dir`. The signer is `signing_kid`, or else the newest file by
    /// name (generated files are named `<UTC timestamp>-<alg>.pem`).
    pub fn load_dir(dir: &Path, signing_kid: Option<&str>) -> Result<KeySet, KeyError> {
        let io = |source| KeyError::Io { path: dir.to_path_buf(), source };
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "pem"))
            .collect();
        paths.sort();
        let keys = paths.iter().map(|p| load_key(p)).collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(KeyError::Empty(dir.to_path_buf()));
        }
        let signer = match signing_kid {
            Some(kid) => keys
                .iter()
                .position(|k| k.kid == kid)
                .ok_or_else(|| KeyError::UnknownSigner(kid.to_string()))?,
            None => keys.len() - 1,
        };
        Ok(KeySet { keys, signer })
    }

    pub fn signer(&self) -> &Key {
        &self.keys[self.signer]
    }

    pub fn find(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The public keys, for callers that verify offline.
    pub fn jwks(&self) -> JwkSet {
        JwkSet { keys: self.keys.iter().map(|k| k.jwk.clone()).collect() }
    }
}

fn load_key(path: &Path) -> Result<Key, KeyError> {
    let pem = fs::read(path).map_err(|source| KeyError::Io { path: path.to_path_buf(), source })?;
    let unsupported = || KeyError::Unsupported { path: path.to_path_buf() };
    let (algorithm, encoding) = if let Ok(k) = EncodingKey::from_ed_pem(&pem) {
        (SigningAlgorithm::EdDSA, k)
    } else if let Ok(k) = EncodingKey::from_ec_pem(&pem) {
        (SigningAlgorithm::ES256, k)
    } else if let Ok(k) = EncodingKey::from_rsa_pem(&pem) {
        (SigningAlgorithm::RS256, k)
    } else {
        return Err(unsupported());
    };
    // Deriving the public key also proves the private key is well-formed.
    let mut jwk = Jwk::from_encoding_key(&encoding, algorithm.jwt()).map_err(|_| unsupported())?;
    let kid = jwk.thumbprint(ThumbprintHash::SHA256)?;
    jwk.common.key_id = Some(kid.clone());
    jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
    let decoding = DecodingKey::from_jwk(&jwk)?;
    Ok(Key { kid, algorithm, encoding, decoding, jwk, path: path.to_path_buf() })
}

/// Generates a key into `dir` (created if missing, file mode 0600) and returns its path.
pub fn generate_key_file(dir: &Path, algorithm: SigningAlgorithm) -> Result<PathBuf, KeyError> {
    let der = generate_pkcs8(algorithm)?;
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!("[year][month][day]T[hour][minute][second]"))
        .map_err(|_| KeyError::Generate)?;
    let path = dir.join(format!("{stamp}-{}.pem", algorithm.file_tag()));
    write_private(&path, pem.as_bytes()).map_err(io(&path))?;
    Ok(path)
}

fn generate_pkcs8(algorithm: SigningAlgorithm) -> Result<Vec<u8>, KeyError> {
    let rng = SystemRandom::new();
    let der = match algorithm {
        SigningAlgorithm::RS256 => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
            AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair)
                .map_err(|_| KeyError::Generate)?
                .as_ref()
                .to_vec()
        }
        SigningAlgorithm::ES256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::Generate)?
            .as_ref()
            .to_vec(),
        // PKCS#8 v1: what jsonwebtoken expects of an Ed25519 key.
        SigningAlgorithm::EdDSA => {
            Ed25519KeyPair::generate_pkcs8v1(&rng).map_err(|_| KeyError::Generate)?.as_ref().to_vec()
        }
    };
    Ok(der)
}

/// Writes a secret file readable by its owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_load_with_stable_kids_and_the_newest_signs() {
        let dir = tempfile::tempdir().unwrap();
        for alg in [SigningAlgorithm::EdDSA, SigningAlgorithm::ES256, SigningAlgorithm::RS256] {
            let path = generate_key_file(dir.path(), alg).unwrap();
            let key = load_key(&path).unwrap();
            assert_eq!(key.algorithm, alg);
            assert_eq!(load_key(&path).unwrap().kid, key.kid, "kid is derived, not random");
            fs::rename(&path, dir.path().join(format!("{}-{}.pem", alg.file_tag(), key.kid))).unwrap();
        }
        let set = KeySet::load_dir(dir.path(), None).unwrap();
        assert_eq!(set.keys().len(), 3);
        // Sorted by name: eddsa-, es256-, rs256-: the last one signs.
        assert_eq!(set.signer().algorithm, SigningAlgorithm::RS256);
        let ed = set.keys()[0].kid.clone();
        assert_eq!(KeySet::load_dir(dir.path(), Some(&ed)).unwrap().signer().kid, ed);
        assert!(matches!(KeySet::load_dir(dir.path(), Some("nope")), Err(KeyError::UnknownSigner(_))));
        assert_eq!(set.jwks().keys.len(), 3);
    }

    #[test]
    fn garbage_is_not_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pem");
        fs::write(&path, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        assert!(matches!(load_key(&path), Err(KeyError::Unsupported { .. })));
    }
}
