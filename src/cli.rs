//! The `portcullis` command line. Each command wires and delegates; none decides anything.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{
    config::Settings,
    startup::{self, Application, ValidatorApp},
    telemetry,
    token::{KeySet, SigningAlgorithm, keys::generate_key_file},
};

#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about = "gRPC authentication service")]
pub struct Cli {
    /// TOML configuration file (environment variables PORTCULLIS_* override it).
    #[arg(long, short, global = true, env = "PORTCULLIS_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve gRPC (the default).
    Serve {
        /// `server`: everything (the default). `validator`: the sidecar — ValidateToken,
        /// ext_authz Check, GetJwks and health, no database (see `[validator]`).
        #[arg(long, value_enum, default_value_t = Mode::Server)]
        mode: Mode,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Server,
    Validator,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new private key (PKCS#8 PEM); it signs once it is the newest file in the
    /// keys directory, or when named by tokens.signing_kid.
    Generate {
        #[arg(long, short, value_enum, default_value_t = SigningAlgorithm::RS256)]
        algorithm: SigningAlgorithm,
        /// Directory to write into (default: tokens.keys_dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// List the keys in the keys directory and which one signs.
    List,
    /// Print the public keys as a JWK Set (for validators with `validator.jwks_file`).
    Jwks,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration, secrets redacted.
    Check,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log);
    match cli.command.unwrap_or(Command::Serve { mode: Mode::Server }) {
        Command::Serve { mode: Mode::Server } => {
            let app = Application::build(settings).await?;
            let result = app.run(startup::shutdown_signal()).await;
            // Flushing may wait on the collector: off the async workers.
            _ = tokio::task::spawn_blocking(telemetry::shutdown).await;
            result
        }
        Command::Serve { mode: Mode::Validator } => {
            let app = ValidatorApp::build(settings).await?;
            let result = app.run(startup::shutdown_signal()).await;
            // Flushing may wait on the collector: off the async workers.
            _ = tokio::task::spawn_blocking(telemetry::shutdown).await;
            result
        }
        Command::Migrate => {
            let store = startup::connect_store(&settings).await?;
            store.migrate().await.context("migration failed")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Keys(KeysCommand::Generate { algorithm, dir }) => {
            let dir = dir.unwrap_or_else(|| settings.keys_dir());
            let path = generate_key_file(&dir, algorithm)?;
            let keys = KeySet::load_dir(&dir, None)?;
            let key = keys.keys().iter().find(|k| k.path == path).context("generated key did not load")?;
            println!("{} {} {}", key.kid, key.algorithm, path.display());
            Ok(())
        }
        Command::Keys(KeysCommand::List) => {
            let keys = KeySet::load_dir(&settings.keys_dir(), settings.tokens.signing_kid.as_deref())?;
            for key in keys.keys() {
                let role = if key.kid == keys.signer().kid { "signs+verifies" } else { "verifies" };
                println!("{} {} {} {}", key.kid, key.algorithm, role, key.path.display());
            }
            Ok(())
        }
        Command::Keys(KeysCommand::Jwks) => {
            let keys = KeySet::load_dir(&settings.keys_dir(), settings.tokens.signing_kid.as_deref())?;
            println!("{}", keys.jwks().to_json());
            Ok(())
        }
        Command::Config(ConfigCommand::Check) => {
            print!("{}", settings.redacted_toml());
            Ok(())
        }
    }
}
