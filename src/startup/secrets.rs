//! Key material on first start. The embedded default (SQLite) generates a signing key and a
//! password pepper into the data directory, with a warning, and reuses them afterwards. A
//! production configuration (PostgreSQL) never generates them: every replica must share
//! the same ones, so they must be provided.

use std::{fs, path::PathBuf};

use anyhow::{Context, bail};
use base64::{Engine, engine::general_purpose::STANDARD};

use crate::{
    config::Settings,
    token::keys::{generate_key_file, write_private},
};

pub fn is_embedded(settings: &Settings) -> bool {
    settings.database_url().starts_with("sqlite:")
}

/// The keys directory, with a key generated into it first if the embedded default has none.
pub fn ensure_signing_key(settings: &Settings) -> anyhow::Result<PathBuf> {
    let dir = settings.keys_dir();
    let has_keys = fs::read_dir(&dir)
        .map(|entries| {
            entries.filter_map(Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "pem"))
        })
        .unwrap_or(false);
    if !has_keys {
        if !is_embedded(settings) {
            bail!(
                "no signing keys in {}: run `portcullis keys generate --dir {0}` and share the keys with every replica",
                dir.display()
            );
        }
        let path = generate_key_file(&dir, settings.tokens.generate_algorithm)?;
        tracing::warn!(path = %path.display(), "generated a new signing key (embedded default); provide keys in production");
    }
    Ok(dir)
}

/// The password pepper: `password.pepper`, else `password.pepper_file`, else (embedded
/// default only) `<data_dir>/pepper`, generated on first start.
pub fn load_pepper(settings: &Settings) -> anyhow::Result<Vec<u8>> {
    if let Some(pepper) = &settings.password.pepper {
        return decode_pepper(pepper).context("password.pepper");
    }
    let (path, generate) = match &settings.password.pepper_file {
        Some(path) => (path.clone(), false),
        None => (settings.data_dir.join("pepper"), is_embedded(settings)),
    };
    if !path.exists() {
        if !generate {
            bail!(
                "no password pepper: set password.pepper (PORTCULLIS_PASSWORD__PEPPER) or password.pepper_file \
                 to at least 32 random bytes in base64, the same on every replica"
            );
        }
        let mut pepper = [0u8; 32];
        aws_lc_rs::rand::fill(&mut pepper).map_err(|_| anyhow::anyhow!("system random source failed"))?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        write_private(&path, STANDARD.encode(pepper).as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        tracing::warn!(path = %path.display(), "generated a new password pepper (embedded default); losing it invalidates every password");
    }
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    decode_pepper(&text).with_context(|| format!("pepper file {}", path.display()))
}

fn decode_pepper(text: &str) -> anyhow::Result<Vec<u8>> {
    let pepper = STANDARD.decode(text.trim()).context("must be base64")?;
    if pepper.len() < 32 {
        bail!("must be at least 32 bytes");
    }
    Ok(pepper)
}
