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
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, ThumbprintHash},
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
    /// The private key parsed once, for signing.
    pub(crate) signer: ParsedSigner,
    pub(crate) decoding: DecodingKey,
    /// The public half, as jsonwebtoken derived it (its thumbprint is the `kid`).
    pub jwk: Jwk,
    /// The public half exactly as published in the JWKS.
    pub public: PublicJwk,
    pub path: PathBuf,
}

/// A public key as published (RFC 7517, members per RFC 7518 §6 and RFC 8037 for OKP):
/// `kty`, `use` = `sig`, `kid`, `alg`, then `n`/`e` (RSA), `crv`/`x`/`y` (EC P-256) or
/// `crv`/`x` (OKP Ed25519). Built member by member from the public key, so no private
/// member (`d`, `p`, `q`, …) can ever appear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicJwk {
    pub kty: String,
    #[serde(rename = "use")]
    pub key_use: String,
    pub kid: String,
    pub alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

/// A JWK Set (RFC 7517 §5): what `GetJwks` and `/.well-known/jwks.json` serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<PublicJwk>,
}

impl Jwks {
    /// The JSON document, compact.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a JWK Set of strings always serialises")
    }
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

    /// The public keys of every loaded key (the signer and those that only verify), in
    /// file-name order, for callers that verify offline.
    pub fn jwks(&self) -> Jwks {
        Jwks { keys: self.keys.iter().map(|k| k.public.clone()).collect() }
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
    let public = public_jwk(&kid, algorithm, &jwk).ok_or_else(unsupported)?;
    // jsonwebtoken's aws-lc backend signs with these same parsers: a key they refuse could
    // not sign either, so it is refused here, at load.
    let signer = ParsedSigner::parse(algorithm, &pem).ok_or_else(unsupported)?;
    Ok(Key { kid, algorithm, decoding, signer, jwk, public, path: path.to_path_buf() })
}

/// A private key parsed once. jsonwebtoken parses the key again at every signature, which
/// for RSA (aws-lc checks the key as it parses it) cost more than the signature itself.
pub(crate) enum ParsedSigner {
    Rsa(aws_lc_rs::rsa::KeyPair),
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl ParsedSigner {
    /// The key of a PEM file, in the forms aws-lc-rs reads (PKCS#8, which `keys generate`
    /// writes; PKCS#1 `RSA PRIVATE KEY`; SEC1 `EC PRIVATE KEY`).
    fn parse(algorithm: SigningAlgorithm, pem_file: &[u8]) -> Option<ParsedSigner> {
        let pem = pem::parse(pem_file).ok()?;
        let der = pem.contents();
        match (algorithm, pem.tag()) {
            (SigningAlgorithm::RS256, "PRIVATE KEY") => {
                aws_lc_rs::rsa::KeyPair::from_pkcs8(der).ok().map(Self::Rsa)
            }
            (SigningAlgorithm::RS256, "RSA PRIVATE KEY") => {
                aws_lc_rs::rsa::KeyPair::from_der(der).ok().map(Self::Rsa)
            }
            (SigningAlgorithm::ES256, "PRIVATE KEY") => {
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).ok().map(Self::Ecdsa)
            }
            (SigningAlgorithm::ES256, "EC PRIVATE KEY") => {
                EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .ok()
                    .map(Self::Ecdsa)
            }
            (SigningAlgorithm::EdDSA, "PRIVATE KEY") => {
                Ed25519KeyPair::from_pkcs8(der).ok().map(Self::Ed25519)
            }
            _ => None,
        }
    }

    /// The JWS signature of `message` (RS256: PKCS#1 v1.5 with SHA-256; ES256: `r ‖ s`,
    /// 64 bytes; EdDSA: Ed25519).
    pub(crate) fn sign(&self, message: &[u8]) -> Option<Vec<u8>> {
        let rng = SystemRandom::new();
        match self {
            Self::Rsa(pair) => {
                let mut signature = vec![0; pair.public_modulus_len()];
                pair.sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &rng, message, &mut signature).ok()?;
                Some(signature)
            }
            Self::Ecdsa(pair) => pair.sign(&rng, message).ok().map(|s| s.as_ref().to_vec()),
            Self::Ed25519(pair) => Some(pair.sign(message).as_ref().to_vec()),
        }
    }
}

/// The published form of a key's public half; `None` for anything but the three shapes we
/// sign with (a symmetric key is never published).
fn public_jwk(kid: &str, algorithm: SigningAlgorithm, jwk: &Jwk) -> Option<PublicJwk> {
    let mut public = PublicJwk {
        kty: String::new(),
        key_use: "sig".into(),
        kid: kid.into(),
        alg: algorithm.to_string(),
        n: None,
        e: None,
        crv: None,
        x: None,
        y: None,
    };
    match (algorithm, &jwk.algorithm) {
        (SigningAlgorithm::RS256, AlgorithmParameters::RSA(rsa)) => {
            public.kty = "RSA".into();
            public.n = Some(rsa.n.clone());
            public.e = Some(rsa.e.clone());
        }
        (SigningAlgorithm::ES256, AlgorithmParameters::EllipticCurve(ec))
            if ec.curve == EllipticCurve::P256 =>
        {
            public.kty = "EC".into();
            public.crv = Some("P-256".into());
            public.x = Some(ec.x.clone());
            public.y = Some(ec.y.clone());
        }
        (SigningAlgorithm::EdDSA, AlgorithmParameters::OctetKeyPair(okp))
            if okp.curve == EllipticCurve::Ed25519 =>
        {
            public.kty = "OKP".into();
            public.crv = Some("Ed25519".into());
            public.x = Some(okp.x.clone());
        }
        _ => return None,
    }
    Some(public)
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
pub(crate) mod tests {
    use super::*;

    /// jsonwebtoken's own signing key for `key`'s file (to compare with ours).
    pub(crate) fn jsonwebtoken_key(key: &Key) -> EncodingKey {
        let pem = fs::read(&key.path).unwrap();
        match key.algorithm {
            SigningAlgorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            SigningAlgorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            SigningAlgorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        }
        .unwrap()
    }

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
        let jwks = set.jwks();
        let kids: Vec<&str> = jwks.keys.iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(
            kids,
            set.keys().iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
            "every key, in order"
        );
    }

    /// RFC 7638 §3: SHA-256 over the required members, in lexicographic order, without
    /// whitespace, base64url. Computed here from the published JSON, independently of
    /// jsonwebtoken's thumbprint (which made the `kid`).
    fn rfc7638_thumbprint(published: &serde_json::Value) -> String {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
        let members: &[&str] = match published["kty"].as_str().unwrap() {
            "RSA" => &["e", "kty", "n"],
            "EC" => &["crv", "kty", "x", "y"],
            "OKP" => &["crv", "kty", "x"],
            other => panic!("unexpected kty {other}"),
        };
        let canonical = members
            .iter()
            .map(|m| format!("\"{m}\":\"{}\"", published[m].as_str().unwrap()))
            .collect::<Vec<_>>()
            .join(",");
        let digest =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, format!("{{{canonical}}}").as_bytes());
        URL_SAFE_NO_PAD.encode(digest.as_ref())
    }

    fn b64_len(published: &serde_json::Value, member: &str) -> usize {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
        URL_SAFE_NO_PAD.decode(published[member].as_str().unwrap()).unwrap().len()
    }

    /// Members of the published JWK, as JSON, for a freshly generated key of `alg`.
    fn published(alg: SigningAlgorithm) -> (Key, serde_json::Map<String, serde_json::Value>) {
        let dir = tempfile::tempdir().unwrap();
        let key = load_key(&generate_key_file(dir.path(), alg).unwrap()).unwrap();
        let set = Jwks { keys: vec![key.public.clone()] };
        let document: serde_json::Value = serde_json::from_str(&set.to_json()).unwrap();
        let jwk = document["keys"][0].as_object().unwrap().clone();
        (key, jwk)
    }

    fn names(jwk: &serde_json::Map<String, serde_json::Value>) -> Vec<&str> {
        let mut names: Vec<&str> = jwk.keys().map(String::as_str).collect();
        names.sort();
        names
    }

    #[test]
    fn rsa_jwk_is_public_and_its_thumbprint_is_the_kid() {
        let (key, jwk) = published(SigningAlgorithm::RS256);
        // Exactly these members: no `d`, `p`, `q`, `dp`, `dq`, `qi`, `oth`.
        assert_eq!(names(&jwk), ["alg", "e", "kid", "kty", "n", "use"]);
        let value = serde_json::Value::Object(jwk);
        assert_eq!(value["kty"], "RSA");
        assert_eq!(value["alg"], "RS256");
        assert_eq!(value["use"], "sig");
        assert_eq!(value["e"], "AQAB");
        // 2048-bit modulus, unsigned big-endian without a leading zero (RFC 7518 §6.3.1.1).
        assert_eq!(b64_len(&value, "n"), 256);
        assert_eq!(value["kid"], key.kid.as_str());
        assert_eq!(rfc7638_thumbprint(&value), key.kid);
    }

    #[test]
    fn ec_jwk_is_public_and_its_thumbprint_is_the_kid() {
        let (key, jwk) = published(SigningAlgorithm::ES256);
        assert_eq!(names(&jwk), ["alg", "crv", "kid", "kty", "use", "x", "y"], "no `d`");
        let value = serde_json::Value::Object(jwk);
        assert_eq!(value["kty"], "EC");
        assert_eq!(value["crv"], "P-256");
        assert_eq!(value["alg"], "ES256");
        assert_eq!(value["use"], "sig");
        // Full-length coordinates (RFC 7518 §6.2.1.2).
        assert_eq!((b64_len(&value, "x"), b64_len(&value, "y")), (32, 32));
        assert_eq!(rfc7638_thumbprint(&value), key.kid);
    }

    #[test]
    fn okp_jwk_is_public_and_its_thumbprint_is_the_kid() {
        let (key, jwk) = published(SigningAlgorithm::EdDSA);
        assert_eq!(names(&jwk), ["alg", "crv", "kid", "kty", "use", "x"], "no `d`");
        let value = serde_json::Value::Object(jwk);
        assert_eq!(value["kty"], "OKP");
        assert_eq!(value["crv"], "Ed25519");
        assert_eq!(value["alg"], "EdDSA");
        assert_eq!(value["use"], "sig");
        assert_eq!(b64_len(&value, "x"), 32);
        assert_eq!(rfc7638_thumbprint(&value), key.kid);
    }

    #[test]
    fn published_keys_verify_tokens_of_their_private_halves() {
        // The published members alone (through a DecodingKey built from them) verify what
        // the private key signed: the JWKS describes the key that signs, not another one.
        for alg in [SigningAlgorithm::RS256, SigningAlgorithm::ES256, SigningAlgorithm::EdDSA] {
            let (key, jwk) = published(alg);
            let reparsed: Jwk = serde_json::from_value(serde_json::Value::Object(jwk)).unwrap();
            let decoding = DecodingKey::from_jwk(&reparsed).unwrap();
            let mut header = jsonwebtoken::Header::new(alg.jwt());
            header.kid = Some(key.kid.clone());
            let claims = serde_json::json!({"sub": "s", "exp": 4_000_000_000u64});
            // Signed by the key's private half as the server signs (parsed once).
            let b64 = |bytes: &[u8]| {
                base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
            };
            let message = format!(
                "{}.{}",
                b64(&serde_json::to_vec(&header).unwrap()),
                b64(&serde_json::to_vec(&claims).unwrap())
            );
            let token = format!("{message}.{}", b64(&key.signer.sign(message.as_bytes()).unwrap()));
            let mut validation = jsonwebtoken::Validation::new(alg.jwt());
            validation.validate_aud = false;
            jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).unwrap();
        }
    }

    #[test]
    fn garbage_is_not_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pem");
        fs::write(&path, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        assert!(matches!(load_key(&path), Err(KeyError::Unsupported { .. })));
    }
}
