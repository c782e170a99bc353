//! Configuration: environment variables `PORTCULLIS_*` over an optional TOML file over
//! defaults. Nested keys use `__` in the environment: `PORTCULLIS_TOKENS__ACCESS_TTL=5m`
//! sets `[tokens] access_ttl`. With nothing set, the embedded default runs: SQLite and keys
//! under `./data/`, in-memory hot state, gRPC on 127.0.0.1:50051.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::token::SigningAlgorithm;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Where generated keys, the generated pepper and the SQLite database live by default.
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`. Unset: `sqlite://<data_dir>/portcullis.db`.
    pub database_url: Option<String>,
    /// `redis://…`. Unset: hot state in process memory (one replica only).
    pub redis_url: Option<String>,
    /// Lets PostgreSQL run without Redis. Unsafe with several replicas (each would keep its
    /// own revocations), so it must be asked for explicitly.
    pub allow_memory_hot_state: bool,
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub tokens: TokenSettings,
    pub sessions: SessionSettings,
    pub password: PasswordSettings,
    pub login: LoginSettings,
    pub limits: LimitSettings,
    pub mfa: MfaSettings,
    pub validator: ValidatorSettings,
    pub mail: MailSettings,
    pub tracking: TrackingSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TrackingSettings {
    /// Login attempts older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub attempts_retention: Duration,
    /// How often the retention purge runs.
    #[serde(with = "humantime_serde")]
    pub purge_interval: Duration,
    /// A MaxMind GeoIP2/GeoLite2 City database (`.mmdb`): when set, login attempts and
    /// sessions record country, city and coordinates.
    pub geoip_database: Option<PathBuf>,
}

impl Default for TrackingSettings {
    fn default() -> Self {
        TrackingSettings {
            attempts_retention: Duration::from_secs(90 * 24 * 3600),
            purge_interval: Duration::from_secs(3600),
            geoip_database: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LoginSettings {
    /// Refuse to log in accounts whose email address is not verified yet.
    pub require_verified_email: bool,
    /// Failed passwords an account (or an identifier that names none) may take before it
    /// locks; durable, in the database.
    pub account_lockout: Lockout,
    /// The separate, smaller budget of each device the account already logged in from, so
    /// that an attacker hammering the account from elsewhere cannot lock its owner out.
    pub known_device_lockout: Lockout,
    /// Failed logins from one IP address across all accounts before it is blocked.
    pub ip_block: RateLimit,
    /// Short-window throttle of failed logins per (IP address, device fingerprint).
    pub client_throttle: RateLimit,
}

/// A durable failure budget: `max_failures` within `window` lock for `lockout`, doubled at
/// each consecutive lockout up to `max_lockout`; a successful login resets both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lockout {
    pub max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde")]
    pub lockout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_lockout: Duration,
}

impl Lockout {
    /// How long the lockout after `previous` consecutive ones lasts.
    pub fn duration_after(&self, previous: u32) -> Duration {
        let factor = 1u32.checked_shl(previous.min(31)).unwrap_or(u32::MAX);
        self.lockout.saturating_mul(factor).min(self.max_lockout)
    }
}

/// A sliding-window limit in the hot state: `limit` events within `window`; when `block` is
/// non-zero, reaching the limit blocks for that long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub limit: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde", default)]
    pub block: Duration,
}

impl RateLimit {
    pub const fn new(limit: u32, window: Duration, block: Duration) -> RateLimit {
        RateLimit { limit, window, block }
    }
}

/// `portcullis serve --mode validator` (the sidecar): ValidateToken, ext_authz Check, JWKS
/// and health only, no database; public keys from `jwks_file` or from the central instance
/// at `central_url`, revocations followed through Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ValidatorSettings {
    /// A JWK Set file with the public keys (e.g. saved from GetJwks).
    pub jwks_file: Option<PathBuf>,
    /// The central Portcullis (gRPC, `http://host:50051`) whose GetJwks gives the keys;
    /// `https://` for a central instance serving TLS (`central_tls`).
    pub central_url: Option<String>,
    /// The TLS client of an `https://` `central_url`: trust anchors and, for mutual TLS,
    /// the client certificate. Files are read again at every key fetch.
    pub central_tls: CentralTlsSettings,
    /// How often the key set is fetched again (also at once, at most every
    /// `jwks_min_refresh`, when a token names an unknown `kid`).
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    #[serde(with = "humantime_serde")]
    pub jwks_min_refresh: Duration,
}

impl Default for ValidatorSettings {
    fn default() -> Self {
        ValidatorSettings {
            jwks_file: None,
            central_url: None,
            central_tls: CentralTlsSettings::default(),
            jwks_refresh: Duration::from_secs(300),
            jwks_min_refresh: Duration::from_secs(10),
        }
    }
}

/// `[validator.central_tls]`: how a validator connects to an `https://` `central_url`.
/// Without `ca_file` the central's certificate must chain to a public root (the Mozilla set
/// compiled in, `webpki-roots`); with it, only to the CAs in that file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CentralTlsSettings {
    /// CA certificates (PEM) the central instance's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM, leaf first), for a central instance with mutual TLS
    /// (`server.tls.client_ca_file`). With `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key_file: Option<PathBuf>,
    /// The name the central's certificate must carry, when it is not the host of
    /// `central_url` (e.g. connecting by IP address or through another Service name).
    pub server_name: Option<String>,
}

impl CentralTlsSettings {
    /// Whether anything is set (so `central_url` must be `https://`).
    pub fn is_set(&self) -> bool {
        *self != CentralTlsSettings::default()
    }

    /// The client certificate and key files, for mutual TLS.
    pub fn client_files(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        Some((self.cert_file.as_deref()?, self.key_file.as_deref()?))
    }
}

impl ValidatorSettings {
    /// Whether the key fetch from `central_url` runs over TLS.
    pub fn central_is_https(&self) -> bool {
        self.central_url.as_deref().is_some_and(|url| url.starts_with("https://"))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if let Some(url) = &self.central_url {
            let uri = url.parse::<http::Uri>();
            let scheme = uri.as_ref().ok().and_then(|u| u.scheme_str());
            if !matches!(scheme, Some("http" | "https"))
                || uri.as_ref().ok().and_then(http::Uri::host).is_none()
            {
                return invalid(format!(
                    "validator.central_url must be an http:// or https:// URL with a host (got {url:?})"
                ));
            }
        }
        let tls = &self.central_tls;
        if tls.is_set() && !self.central_is_https() {
            return invalid(
                "validator.central_tls is set but validator.central_url is not an https:// URL".into(),
            );
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return invalid(
                    "validator.central_tls needs both cert_file and key_file (or neither: no client certificate)"
                        .into(),
                );
            }
            _ => {}
        }
        if let Some(name) = &tls.server_name
            && tokio_rustls::rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return invalid(format!(
                "validator.central_tls.server_name {name:?} is not a DNS name or IP address"
            ));
        }
        if self.jwks_refresh < Duration::from_millis(10) || self.jwks_min_refresh < Duration::from_millis(10)
        {
            return invalid(
                "validator.jwks_refresh and validator.jwks_min_refresh must be at least 10ms".into(),
            );
        }
        Ok(())
    }
}

/// Request rate limits of the flows that send mail or create accounts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitSettings {
    pub register_per_ip: RateLimit,
    pub forgot_password_per_account: RateLimit,
    pub forgot_password_per_ip: RateLimit,
    pub resend_verification_per_account: RateLimit,
    pub resend_verification_per_ip: RateLimit,
    /// Tries of one MFA challenge; checked in the hot state and refused while it is down.
    pub verify_mfa_per_challenge: RateLimit,
    /// New-device alert mails per account (a flood of logins must not flood the mailbox).
    pub new_device_alerts_per_account: RateLimit,
    /// Emailed login codes per account (each right-password login with the email code on
    /// sends one).
    pub login_codes_per_account: RateLimit,
}

/// Second factors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MfaSettings {
    /// The issuer shown by authenticator apps (`otpauth://totp/<issuer>:<account>`).
    pub issuer: String,
    /// Life of an emailed login code.
    #[serde(with = "humantime_serde")]
    pub email_code_ttl: Duration,
    /// Life of a TOTP challenge (the time to open the app and type the code).
    #[serde(with = "humantime_serde")]
    pub totp_challenge_ttl: Duration,
    /// Wrong second-factor codes per account (not per challenge: a new code does not reset
    /// it) before the account's challenges die and further tries are refused.
    pub code_lockout: Lockout,
    /// TOTP steps accepted either side of now (clock drift between phone and server).
    pub totp_skew_steps: u64,
    /// Recovery codes handed out when TOTP is enabled.
    pub recovery_codes: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MailSettings {
    /// `smtp://`, `smtps://` (implicit TLS) or `smtp://…?tls=required` (STARTTLS), with
    /// credentials in the URL. Unset: mail is written as `.eml` files to `mail.dir` and their
    /// paths are logged (embedded default; links are never logged: they carry tokens).
    pub smtp_url: Option<String>,
    /// Where `.eml` files go without SMTP. Unset: `<data_dir>/mail`.
    pub dir: Option<PathBuf>,
    /// The `From:` of every mail.
    pub from: String,
    /// The product name mails speak of.
    pub product_name: String,
    /// The front end that serves the pages mail links point to; never taken from a request.
    pub frontend_base_url: String,
    /// How long a verification link works.
    #[serde(with = "humantime_serde")]
    pub verification_ttl: Duration,
    /// How long a password-reset link works.
    #[serde(with = "humantime_serde")]
    pub reset_ttl: Duration,
    /// How long the "this wasn't me" link of a new-device alert works.
    #[serde(with = "humantime_serde")]
    pub unrecognized_login_ttl: Duration,
    /// How often the outbox worker looks for mail to send when it was not woken.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Attempts before a mail is given up (the row stays, with its last error).
    pub max_attempts: u32,
    /// Wait after the first failure; doubles with each further one, up to `max_backoff`.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// How long in-flight calls may run after SIGTERM before the server stops anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Serve gRPC server reflection (v1 and v1alpha), so grpcurl needs no proto files.
    pub reflection: bool,
    /// Peers whose `x-forwarded-for` is believed (addresses or CIDR ranges).
    pub trusted_proxies: Vec<IpNet>,
    /// How often health reflects database and Redis reachability.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// A call still running after this is cancelled: nothing waits forever on a dependency.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A gRPC connection older than this is asked to close (HTTP/2 GOAWAY; calls in flight
    /// finish first), so long-lived client connections spread over new replicas. Unset (the
    /// default): connections live as long as their clients keep them.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Option<Duration>,
    /// The ops HTTP server (`/healthz`, `/.well-known/jwks.json`): on by default.
    pub ops_enabled: bool,
    /// Its address (port 0: any free port).
    pub ops_listen: SocketAddr,
    /// gRPC over TLS (and mutual TLS): off (plaintext) unless `cert_file` and `key_file` are set.
    pub tls: TlsSettings,
}

/// `[server.tls]`: certificate files as mounted from a Kubernetes Secret (cert-manager),
/// read again whenever their content changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsSettings {
    /// The server's certificate chain (PEM, leaf first). With `key_file`, turns TLS on.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM). When set, mutual TLS: a client must present a certificate
    /// issued by one of them, or the handshake fails.
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are read again; a changed content is loaded for new connections.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl TlsSettings {
    /// The certificate and key files, when TLS is on.
    pub fn files(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        Some((self.cert_file.as_deref()?, self.key_file.as_deref()?))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Run migrations when the server starts (otherwise: `portcullis migrate`).
    pub migrate_on_start: bool,
    /// A statement running longer is cancelled by the database (PostgreSQL).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisSettings {
    /// Prefix of every key, so deployments (and test runs) can share one Redis.
    pub key_prefix: String,
    /// With Redis unreachable, how long this replica's copy of the revocations may still
    /// answer ValidateToken after it was last known complete; after that, checks fail
    /// closed (UNAVAILABLE).
    #[serde(with = "humantime_serde")]
    pub revocation_max_staleness: Duration,
    /// TLS beyond the defaults of a `rediss://` `redis_url` (public roots, no client
    /// certificate).
    pub tls: RedisTlsSettings,
}

/// `[redis.tls]`: trust anchors and client certificate of a `rediss://` `redis_url`. With
/// none set, `rediss://` trusts the public roots (the Mozilla set compiled in, `webpki-roots`)
/// and sends no client certificate. Files are read once, at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisTlsSettings {
    /// CA certificates (PEM) Redis's certificate must chain to, instead of the public roots
    /// (Memorystore's server CA, a self-managed Redis's own CA).
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM, leaf first), for a Redis that asks for one
    /// (`tls-auth-clients yes`, its default in TLS mode). With `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key_file: Option<PathBuf>,
}

impl RedisTlsSettings {
    /// Whether anything is set (so `redis_url` must be `rediss://`).
    pub fn is_set(&self) -> bool {
        *self != RedisTlsSettings::default()
    }

    /// The client certificate and key files, when Redis asks for a client certificate.
    pub fn client_files(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        Some((self.cert_file.as_deref()?, self.key_file.as_deref()?))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    #[serde(with = "humantime_serde")]
    pub access_ttl: Duration,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Signing keys (PKCS#8 PEM, one per file). Unset: `<data_dir>/keys`.
    pub keys_dir: Option<PathBuf>,
    /// The `kid` that signs; unset: the newest key file.
    pub signing_kid: Option<String>,
    /// Algorithm of the key generated on first start when `keys_dir` is empty.
    pub generate_algorithm: SigningAlgorithm,
    /// Algorithms accepted on verification; `none` and HMAC never are.
    pub allowed_algorithms: Vec<SigningAlgorithm>,
    /// Verified tokens whose claims are kept in memory (keyed by the whole token's
    /// SHA-256, dropped at expiry): a repeated token skips signature verification. 0: off;
    /// at most 4 000 000.
    pub verified_cache_capacity: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionSettings {
    /// A session not refreshed for this long is over.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A session is over this long after login, whatever its activity.
    #[serde(with = "humantime_serde")]
    pub absolute_lifetime: Duration,
    /// A refresh token presented again within this time of its rotation is refused without
    /// revoking the session (two tabs refreshing at once); later, it is a replay and
    /// revokes the session.
    #[serde(with = "humantime_serde")]
    pub refresh_reuse_grace: Duration,
    /// How often "last active" seen by ValidateToken is written to the database.
    #[serde(with = "humantime_serde")]
    pub activity_flush_interval: Duration,
    /// How often recent revocations are re-published from the database to the hot state,
    /// so a Redis that lost data (restart, failover, eviction) cannot revive a session for
    /// longer than this. After a hot-state error it happens at once.
    #[serde(with = "humantime_serde")]
    pub revocation_resync_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PasswordSettings {
    pub bcrypt_cost: u32,
    pub min_length: usize,
    pub max_length: usize,
    /// Server-side secret mixed into every hash (base64, at least 32 bytes). Unset:
    /// `pepper_file`, else generated into `<data_dir>/pepper` on first start.
    pub pepper: Option<String>,
    pub pepper_file: Option<PathBuf>,
    /// bcrypt jobs running at once; unset: the number of CPUs.
    pub hashing_concurrency: Option<usize>,
    /// A call waiting longer than this for a bcrypt slot is answered UNAVAILABLE (retry
    /// later) instead of queueing without bound under a login storm.
    #[serde(with = "humantime_serde")]
    pub hashing_queue_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    /// `RUST_LOG`-style filter.
    pub filter: String,
    /// `auto` (JSON lines unless stdout is a terminal), `text` or `json`.
    pub format: LogFormat,
    /// OTLP/gRPC collector for trace export, e.g. `http://otel-collector:4317` (builds with
    /// the `otlp` cargo feature only; the SDK's `OTEL_*` variables work too).
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal (a container, a service manager), text when it is.
    Auto,
    Text,
    Json,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("./data"),
            database_url: None,
            redis_url: None,
            allow_memory_hot_state: false,
            server: ServerSettings::default(),
            database: DatabaseSettings::default(),
            redis: RedisSettings::default(),
            tokens: TokenSettings::default(),
            sessions: SessionSettings::default(),
            password: PasswordSettings::default(),
            login: LoginSettings::default(),
            limits: LimitSettings::default(),
            mfa: MfaSettings::default(),
            validator: ValidatorSettings::default(),
            mail: MailSettings::default(),
            tracking: TrackingSettings::default(),
            log: LogSettings::default(),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            shutdown_grace: Duration::from_secs(20),
            reflection: true,
            trusted_proxies: Vec::new(),
            health_check_interval: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_connection_age: None,
            ops_enabled: true,
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            tls: TlsSettings::default(),
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            migrate_on_start: true,
            statement_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            key_prefix: "portcullis:".into(),
            revocation_max_staleness: Duration::from_secs(5),
            tls: RedisTlsSettings::default(),
        }
    }
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            issuer: "portcullis".into(),
            audience: "portcullis".into(),
            access_ttl: Duration::from_secs(10 * 60),
            leeway: Duration::from_secs(30),
            keys_dir: None,
            signing_kid: None,
            generate_algorithm: SigningAlgorithm::RS256,
            allowed_algorithms: vec![
                SigningAlgorithm::RS256,
                SigningAlgorithm::ES256,
                SigningAlgorithm::EdDSA,
            ],
            verified_cache_capacity: 16_384,
        }
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            idle_timeout: Duration::from_secs(7 * 24 * 3600),
            absolute_lifetime: Duration::from_secs(30 * 24 * 3600),
            refresh_reuse_grace: Duration::from_secs(5),
            activity_flush_interval: Duration::from_secs(5),
            revocation_resync_interval: Duration::from_secs(30),
        }
    }
}

impl Default for PasswordSettings {
    fn default() -> Self {
        PasswordSettings {
            bcrypt_cost: 12,
            min_length: 12,
            max_length: 256,
            pepper: None,
            pepper_file: None,
            hashing_concurrency: None,
            hashing_queue_timeout: Duration::from_secs(5),
        }
    }
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// Defaults from OWASP (Authentication and Credential Stuffing cheat sheets) and NIST SP
/// 800-63B §5.2.2 (at most 100 consecutive failures): see the README's configuration table.
impl Default for LoginSettings {
    fn default() -> Self {
        LoginSettings {
            require_verified_email: true,
            account_lockout: Lockout {
                max_failures: 10,
                window: 15 * MINUTE,
                lockout: 15 * MINUTE,
                max_lockout: 24 * HOUR,
            },
            known_device_lockout: Lockout {
                max_failures: 5,
                window: 15 * MINUTE,
                lockout: 5 * MINUTE,
                max_lockout: HOUR,
            },
            ip_block: RateLimit::new(50, 15 * MINUTE, 15 * MINUTE),
            client_throttle: RateLimit::new(5, Duration::from_secs(10), MINUTE),
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            register_per_ip: RateLimit::new(10, HOUR, Duration::ZERO),
            forgot_password_per_account: RateLimit::new(3, HOUR, Duration::ZERO),
            forgot_password_per_ip: RateLimit::new(20, HOUR, Duration::ZERO),
            resend_verification_per_account: RateLimit::new(3, HOUR, Duration::ZERO),
            resend_verification_per_ip: RateLimit::new(20, HOUR, Duration::ZERO),
            verify_mfa_per_challenge: RateLimit::new(5, MINUTE, Duration::ZERO),
            new_device_alerts_per_account: RateLimit::new(5, HOUR, Duration::ZERO),
            login_codes_per_account: RateLimit::new(10, HOUR, Duration::ZERO),
        }
    }
}

impl Default for MfaSettings {
    fn default() -> Self {
        MfaSettings {
            issuer: "Portcullis".into(),
            email_code_ttl: 3 * MINUTE,
            totp_challenge_ttl: 5 * MINUTE,
            code_lockout: Lockout {
                max_failures: 5,
                window: 15 * MINUTE,
                lockout: 15 * MINUTE,
                max_lockout: HOUR,
            },
            totp_skew_steps: 1,
            recovery_codes: 10,
        }
    }
}

impl Default for MailSettings {
    fn default() -> Self {
        MailSettings {
            smtp_url: None,
            dir: None,
            from: "Portcullis <no-reply@localhost>".into(),
            product_name: "Portcullis".into(),
            frontend_base_url: "http://localhost:3000".into(),
            verification_ttl: Duration::from_secs(24 * 3600),
            reset_ttl: Duration::from_secs(15 * 60),
            unrecognized_login_ttl: Duration::from_secs(7 * 24 * 3600),
            poll_interval: Duration::from_secs(2),
            max_attempts: 12,
            initial_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(3600),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { filter: "info".into(), format: LogFormat::Auto, otlp_endpoint: None }
    }
}

/// Environment variables that are not settings (tests and the config-file path).
const NOT_SETTINGS: &[&str] = &["config", "test_database_url", "test_redis_url", "tools_dir"];

impl Settings {
    /// Defaults, then the TOML file (if any), then `PORTCULLIS_*` variables.
    pub fn load(file: Option<&std::path::Path>) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "configuration file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed("PORTCULLIS_").split("__").ignore(NOT_SETTINGS));
        let settings: Settings = figment.extract().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if !(4..=31).contains(&self.password.bcrypt_cost) {
            return invalid("password.bcrypt_cost must be between 4 and 31");
        }
        if self.password.min_length < 8 {
            return invalid("password.min_length must be at least 8 (NIST SP 800-63B)");
        }
        if self.password.max_length < 64.max(self.password.min_length) {
            return invalid("password.max_length must be at least 64 and at least min_length");
        }
        if !(self.mail.frontend_base_url.starts_with("https://")
            || self.mail.frontend_base_url.starts_with("http://"))
        {
            return invalid("mail.frontend_base_url must be an http(s) URL");
        }
        if self.mail.max_backoff < self.mail.initial_backoff {
            return invalid("mail.max_backoff must be at least mail.initial_backoff");
        }
        if self.mail.max_attempts == 0 {
            return invalid("mail.max_attempts must be at least 1");
        }
        if self.tokens.allowed_algorithms.is_empty() {
            return invalid("tokens.allowed_algorithms must not be empty");
        }
        if self.tokens.access_ttl < Duration::from_secs(1) {
            return invalid("tokens.access_ttl must be at least 1s");
        }
        // ~200 bytes an entry plus 16 bytes of admission table, the table allocated at start.
        if self.tokens.verified_cache_capacity > 4_000_000 {
            return invalid("tokens.verified_cache_capacity must be at most 4000000 (about 1 GiB)");
        }
        if self.sessions.absolute_lifetime < self.tokens.access_ttl {
            return invalid("sessions.absolute_lifetime must be at least tokens.access_ttl");
        }
        let ten_years = Duration::from_secs(10 * 365 * 24 * 3600);
        for (name, value) in [
            ("tokens.access_ttl", self.tokens.access_ttl),
            ("sessions.idle_timeout", self.sessions.idle_timeout),
            ("sessions.absolute_lifetime", self.sessions.absolute_lifetime),
        ] {
            if value > ten_years {
                return Err(ConfigError::Invalid(format!("{name} must be at most 10 years")));
            }
        }
        for (name, value) in [
            ("server.health_check_interval", self.server.health_check_interval),
            ("server.request_timeout", self.server.request_timeout),
            ("server.shutdown_grace", self.server.shutdown_grace),
            ("database.acquire_timeout", self.database.acquire_timeout),
            ("database.statement_timeout", self.database.statement_timeout),
            ("sessions.idle_timeout", self.sessions.idle_timeout),
            ("sessions.activity_flush_interval", self.sessions.activity_flush_interval),
            ("sessions.revocation_resync_interval", self.sessions.revocation_resync_interval),
            ("password.hashing_queue_timeout", self.password.hashing_queue_timeout),
            ("tracking.attempts_retention", self.tracking.attempts_retention),
            ("tracking.purge_interval", self.tracking.purge_interval),
            ("mail.verification_ttl", self.mail.verification_ttl),
            ("mail.reset_ttl", self.mail.reset_ttl),
            ("mail.unrecognized_login_ttl", self.mail.unrecognized_login_ttl),
            ("mail.poll_interval", self.mail.poll_interval),
            ("mail.initial_backoff", self.mail.initial_backoff),
        ] {
            if value < Duration::from_millis(10) {
                return Err(ConfigError::Invalid(format!("{name} must be at least 10ms")));
            }
        }
        if self.server.max_connection_age.is_some_and(|age| age < Duration::from_secs(1)) {
            return Err(ConfigError::Invalid("server.max_connection_age must be at least 1s".into()));
        }
        for (name, lockout) in [
            ("login.account_lockout", &self.login.account_lockout),
            ("login.known_device_lockout", &self.login.known_device_lockout),
            ("mfa.code_lockout", &self.mfa.code_lockout),
        ] {
            if lockout.max_failures == 0 || lockout.max_failures > 100 {
                return Err(ConfigError::Invalid(format!(
                    "{name}.max_failures must be between 1 and 100 (NIST SP 800-63B)"
                )));
            }
            if lockout.window < Duration::from_millis(10) || lockout.lockout < Duration::from_millis(10) {
                return Err(ConfigError::Invalid(format!(
                    "{name}: window and lockout must be at least 10ms"
                )));
            }
            let year = Duration::from_secs(365 * 24 * 3600);
            if lockout.window > year || lockout.max_lockout > year {
                return Err(ConfigError::Invalid(format!(
                    "{name}: window and max_lockout must be at most a year"
                )));
            }
            if lockout.max_lockout < lockout.lockout {
                return Err(ConfigError::Invalid(format!("{name}.max_lockout must be at least its lockout")));
            }
        }
        for (name, limit) in [
            ("login.ip_block", &self.login.ip_block),
            ("login.client_throttle", &self.login.client_throttle),
            ("limits.register_per_ip", &self.limits.register_per_ip),
            ("limits.forgot_password_per_account", &self.limits.forgot_password_per_account),
            ("limits.forgot_password_per_ip", &self.limits.forgot_password_per_ip),
            ("limits.resend_verification_per_account", &self.limits.resend_verification_per_account),
            ("limits.resend_verification_per_ip", &self.limits.resend_verification_per_ip),
            ("limits.verify_mfa_per_challenge", &self.limits.verify_mfa_per_challenge),
            ("limits.new_device_alerts_per_account", &self.limits.new_device_alerts_per_account),
            ("limits.login_codes_per_account", &self.limits.login_codes_per_account),
        ] {
            if limit.window > Duration::from_secs(365 * 24 * 3600)
                || limit.block > Duration::from_secs(365 * 24 * 3600)
            {
                return Err(ConfigError::Invalid(format!("{name}: window and block must be at most a year")));
            }
            if limit.limit == 0 || limit.window < Duration::from_millis(10) {
                return Err(ConfigError::Invalid(format!(
                    "{name}: limit must be at least 1 and window at least 10ms"
                )));
            }
        }
        if self.mfa.email_code_ttl < Duration::from_secs(1)
            || self.mfa.totp_challenge_ttl < Duration::from_secs(1)
        {
            return invalid("mfa.email_code_ttl and mfa.totp_challenge_ttl must be at least 1s");
        }
        if self.mfa.totp_skew_steps > 2 {
            return invalid("mfa.totp_skew_steps must be at most 2");
        }
        if !(5..=20).contains(&self.mfa.recovery_codes) {
            return invalid("mfa.recovery_codes must be between 5 and 20");
        }
        let tls = &self.server.tls;
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return invalid("server.tls needs both cert_file and key_file (or neither: plaintext)");
            }
            (None, None) if tls.client_ca_file.is_some() => {
                return invalid("server.tls.client_ca_file (mutual TLS) needs cert_file and key_file too");
            }
            _ => {}
        }
        if tls.reload_interval < Duration::from_millis(10) {
            return invalid("server.tls.reload_interval must be at least 10ms");
        }
        self.validator.validate()?;
        let redis_tls = &self.redis.tls;
        if redis_tls.is_set() && !self.redis_url.as_deref().is_some_and(|url| url.starts_with("rediss://")) {
            return invalid("redis.tls is set but redis_url is not a rediss:// URL");
        }
        if redis_tls.cert_file.is_some() != redis_tls.key_file.is_some() {
            return invalid(
                "redis.tls needs both cert_file and key_file (or neither: no client certificate)",
            );
        }
        if self.database_url().starts_with("postgres")
            && self.redis_url.is_none()
            && !self.allow_memory_hot_state
        {
            return invalid(
                "PostgreSQL without Redis would keep revocations per replica; set redis_url \
                 (PORTCULLIS_REDIS_URL), or allow_memory_hot_state = true for a single replica",
            );
        }
        Ok(())
    }

    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("portcullis.db").display()),
        }
    }

    pub fn mail_dir(&self) -> PathBuf {
        self.mail.dir.clone().unwrap_or_else(|| self.data_dir.join("mail"))
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.tokens.keys_dir.clone().unwrap_or_else(|| self.data_dir.join("keys"))
    }

    /// The effective configuration as TOML, secrets redacted: what `config check` prints.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = Some(redact_url(&self.database_url()));
        shown.redis_url = self.redis_url.as_deref().map(redact_url);
        shown.mail.smtp_url = self.mail.smtp_url.as_deref().map(redact_url);
        shown.log.otlp_endpoint = self.log.otlp_endpoint.as_deref().map(redact_url);
        if shown.password.pepper.is_some() {
            shown.password.pepper = Some("<redacted>".into());
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// Hides the password of a URL such as `postgres://user:secret@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:<redacted>@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    // Query strings may carry passwords too (`?password=`): drop their values.
    let path = path.map(|p| match p.split_once('?') {
        Some((p, _)) => format!("/{p}?<redacted>"),
        None => format!("/{p}"),
    });
    format!("{scheme}://{authority}{}", path.unwrap_or_default())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/auth"),
            "postgres://app:<redacted>@db:5432/auth"
        );
        assert_eq!(redact_url("redis://:pw@cache:6379"), "redis://:<redacted>@cache:6379");
        assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
        assert_eq!(redact_url("postgres://h/db?password=x"), "postgres://h/db?<redacted>");
    }

    #[test]
    fn defaults_are_the_embedded_configuration() {
        let settings = Settings::default();
        settings.validate().unwrap();
        assert!(settings.database_url().starts_with("sqlite://"));
        assert!(settings.redis_url.is_none());
    }

    #[test]
    fn zero_intervals_and_absurd_lifetimes_are_refused() {
        let zero = Settings {
            sessions: SessionSettings {
                activity_flush_interval: Duration::ZERO,
                ..SessionSettings::default()
            },
            ..Settings::default()
        };
        assert!(zero.validate().unwrap_err().to_string().contains("activity_flush_interval"));
        let huge = Settings {
            sessions: SessionSettings {
                absolute_lifetime: Duration::from_secs(u64::MAX / 2),
                ..SessionSettings::default()
            },
            ..Settings::default()
        };
        assert!(huge.validate().unwrap_err().to_string().contains("absolute_lifetime"));
        let cache = |capacity| Settings {
            tokens: TokenSettings { verified_cache_capacity: capacity, ..TokenSettings::default() },
            ..Settings::default()
        };
        assert!(cache(4_000_001).validate().unwrap_err().to_string().contains("verified_cache_capacity"));
        cache(4_000_000).validate().unwrap();
        cache(0).validate().unwrap();
    }

    #[test]
    fn lockouts_double_up_to_their_cap() {
        let lockout = Lockout {
            max_failures: 3,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(60),
            max_lockout: Duration::from_secs(600),
        };
        assert_eq!(lockout.duration_after(0), Duration::from_secs(60));
        assert_eq!(lockout.duration_after(1), Duration::from_secs(120));
        assert_eq!(lockout.duration_after(3), Duration::from_secs(480));
        assert_eq!(lockout.duration_after(4), Duration::from_secs(600));
        assert_eq!(lockout.duration_after(u32::MAX), Duration::from_secs(600));
    }

    #[test]
    fn lockout_budgets_beyond_nist_are_refused() {
        let mut settings = Settings::default();
        settings.login.account_lockout.max_failures = 101;
        assert!(settings.validate().unwrap_err().to_string().contains("account_lockout"));
    }

    #[test]
    fn tls_needs_both_certificate_and_key() {
        let mut settings = Settings::default();
        assert_eq!(settings.server.tls.files(), None, "plaintext by default");
        settings.server.tls.cert_file = Some("/tls/tls.crt".into());
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("cert_file and key_file"), "{error}");
        settings.server.tls.cert_file = None;
        settings.server.tls.key_file = Some("/tls/tls.key".into());
        assert!(settings.validate().is_err());
        settings.server.tls.key_file = None;
        settings.server.tls.client_ca_file = Some("/tls/ca.crt".into());
        assert!(settings.validate().unwrap_err().to_string().contains("client_ca_file"));
        settings.server.tls.cert_file = Some("/tls/tls.crt".into());
        settings.server.tls.key_file = Some("/tls/tls.key".into());
        settings.validate().unwrap();
        settings.server.tls.reload_interval = Duration::ZERO;
        assert!(settings.validate().unwrap_err().to_string().contains("reload_interval"));
    }

    #[test]
    fn tls_is_a_table_of_the_server_section() {
        let toml = r#"
            [server.tls]
            cert_file = "/tls/tls.crt"
            key_file = "/tls/tls.key"
            client_ca_file = "/tls/ca.crt"
            reload_interval = "30s"
        "#;
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(toml))
            .extract()
            .unwrap();
        settings.validate().unwrap();
        let tls = &settings.server.tls;
        assert_eq!(tls.files(), Some(("/tls/tls.crt".as_ref(), "/tls/tls.key".as_ref())));
        assert_eq!(tls.client_ca_file.as_deref(), Some("/tls/ca.crt".as_ref()));
        assert_eq!(tls.reload_interval, Duration::from_secs(30));
        // `config check` prints it back in the same shape.
        assert!(settings.redacted_toml().contains("[server.tls]"));
    }

    #[test]
    fn max_connection_age_is_off_by_default_and_at_least_a_second() {
        assert_eq!(Settings::default().server.max_connection_age, None);
        let load = |toml: &str| -> Settings {
            Figment::from(Serialized::defaults(Settings::default()))
                .merge(Toml::string(toml))
                .extract()
                .unwrap()
        };
        let settings = load("[server]\nmax_connection_age = \"10m\"");
        settings.validate().unwrap();
        assert_eq!(settings.server.max_connection_age, Some(Duration::from_secs(600)));
        assert!(
            settings.redacted_toml().contains("max_connection_age = \"10m\""),
            "{}",
            settings.redacted_toml()
        );
        for short in ["0s", "500ms"] {
            let error = load(&format!("[server]\nmax_connection_age = \"{short}\"")).validate().unwrap_err();
            assert!(error.to_string().contains("server.max_connection_age"), "{error}");
        }
    }

    #[test]
    fn validator_central_tls_is_checked_when_the_configuration_loads() {
        let mut settings = Settings::default();
        settings.validator.central_url = Some("http://central:50051".into());
        settings.validate().unwrap();
        assert!(!settings.validator.central_is_https());
        // TLS settings with a plaintext URL would be silently ignored: refused.
        settings.validator.central_tls.ca_file = Some("/tls/ca.crt".into());
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("central_tls") && error.contains("https://"), "{error}");
        settings.validator.central_url = Some("https://central:50051".into());
        settings.validate().unwrap();
        assert!(settings.validator.central_is_https());
        // An https URL needs no ca_file: the public roots are the trust anchors then.
        settings.validator.central_tls = CentralTlsSettings::default();
        settings.validate().unwrap();
        // A client certificate needs its key, and the other way round.
        settings.validator.central_tls.cert_file = Some("/tls/tls.crt".into());
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("cert_file and key_file"), "{error}");
        settings.validator.central_tls.cert_file = None;
        settings.validator.central_tls.key_file = Some("/tls/tls.key".into());
        assert!(settings.validate().unwrap_err().to_string().contains("cert_file and key_file"));
        settings.validator.central_tls.cert_file = Some("/tls/tls.crt".into());
        settings.validate().unwrap();
        let tls = &settings.validator.central_tls;
        assert_eq!(tls.client_files(), Some(("/tls/tls.crt".as_ref(), "/tls/tls.key".as_ref())));
        // The server name must be one a certificate can carry.
        settings.validator.central_tls.server_name = Some("portcullis.auth.svc".into());
        settings.validate().unwrap();
        settings.validator.central_tls.server_name = Some("10.0.0.1".into());
        settings.validate().unwrap();
        settings.validator.central_tls.server_name = Some("not a name".into());
        assert!(settings.validate().unwrap_err().to_string().contains("server_name"));
    }

    #[test]
    fn validator_central_url_must_be_http_or_https() {
        let mut settings = Settings::default();
        for bad in ["central:50051", "grpc://central:50051", "https://", "not a url"] {
            settings.validator.central_url = Some(bad.into());
            let error = settings.validate().unwrap_err().to_string();
            assert!(error.contains("validator.central_url"), "{bad}: {error}");
        }
        for good in ["http://127.0.0.1:50051", "https://[::1]:50051", "https://portcullis.auth.svc"] {
            settings.validator.central_url = Some(good.into());
            settings.validate().unwrap();
        }
        settings.validator.jwks_refresh = Duration::ZERO;
        assert!(settings.validate().unwrap_err().to_string().contains("jwks_refresh"));
    }

    #[test]
    fn central_tls_is_a_table_of_the_validator_section() {
        let toml = r#"
            [validator]
            central_url = "https://portcullis.auth.svc:50051"
            [validator.central_tls]
            ca_file = "/etc/portcullis/central-tls/ca.crt"
            cert_file = "/etc/portcullis/central-tls/tls.crt"
            key_file = "/etc/portcullis/central-tls/tls.key"
            server_name = "portcullis.auth"
        "#;
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(toml))
            .extract()
            .unwrap();
        settings.validate().unwrap();
        let tls = &settings.validator.central_tls;
        assert_eq!(tls.ca_file.as_deref(), Some("/etc/portcullis/central-tls/ca.crt".as_ref()));
        assert!(tls.client_files().is_some());
        assert_eq!(tls.server_name.as_deref(), Some("portcullis.auth"));
        assert!(settings.redacted_toml().contains("[validator.central_tls]"));
    }

    #[test]
    fn redis_tls_needs_a_rediss_url_and_both_client_files() {
        let mut settings = Settings::default();
        assert!(!settings.redis.tls.is_set());
        // TLS settings without Redis, or with a plaintext URL, would be silently ignored.
        settings.redis.tls.ca_file = Some("/tls/redis-ca.crt".into());
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("redis.tls") && error.contains("rediss://"), "{error}");
        settings.redis_url = Some("redis://redis:6379".into());
        assert!(settings.validate().unwrap_err().to_string().contains("rediss://"));
        settings.redis_url = Some("rediss://:secret@redis:6380/0".into());
        settings.validate().unwrap();
        // rediss:// needs nothing more: the public roots, no client certificate.
        settings.redis.tls = RedisTlsSettings::default();
        settings.validate().unwrap();
        // A client certificate needs its key, and the other way round.
        settings.redis.tls.cert_file = Some("/tls/tls.crt".into());
        let error = settings.validate().unwrap_err().to_string();
        assert!(error.contains("redis.tls") && error.contains("cert_file and key_file"), "{error}");
        settings.redis.tls.cert_file = None;
        settings.redis.tls.key_file = Some("/tls/tls.key".into());
        assert!(settings.validate().unwrap_err().to_string().contains("cert_file and key_file"));
        settings.redis.tls.cert_file = Some("/tls/tls.crt".into());
        settings.validate().unwrap();
        assert_eq!(
            settings.redis.tls.client_files(),
            Some(("/tls/tls.crt".as_ref(), "/tls/tls.key".as_ref()))
        );
        settings.redis_url = Some("redis://redis:6379".into());
        assert!(settings.validate().unwrap_err().to_string().contains("rediss://"));
    }

    #[test]
    fn redis_tls_is_a_table_of_the_redis_section() {
        let toml = r#"
            redis_url = "rediss://:secret@redis.example:6380"
            [redis.tls]
            ca_file = "/etc/portcullis/redis-tls/ca.crt"
            cert_file = "/etc/portcullis/redis-tls/tls.crt"
            key_file = "/etc/portcullis/redis-tls/tls.key"
        "#;
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(toml))
            .extract()
            .unwrap();
        settings.validate().unwrap();
        let tls = &settings.redis.tls;
        assert_eq!(tls.ca_file.as_deref(), Some("/etc/portcullis/redis-tls/ca.crt".as_ref()));
        assert!(tls.client_files().is_some());
        // `config check` shows the file paths (never their contents) and hides the password.
        let shown = settings.redacted_toml();
        assert!(
            shown.contains("[redis.tls]") && shown.contains("/etc/portcullis/redis-tls/tls.key"),
            "{shown}"
        );
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn postgres_without_redis_is_refused_unless_allowed() {
        let mut settings = Settings { database_url: Some("postgres://x/y".into()), ..Settings::default() };
        assert!(settings.validate().is_err());
        settings.allow_memory_hot_state = true;
        assert!(settings.validate().is_ok());
    }
}
