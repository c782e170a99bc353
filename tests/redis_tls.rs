//! Redis over TLS (`rediss://`, `redis.tls`) against a real `redis-server` in TLS mode.
//!
//! Each test starts its own `redis-server` (TLS port only, on a free port, no persistence)
//! with certificates made here with rcgen, and kills it when done. Redis's TLS mode asks
//! every client for a certificate by default (`tls-auth-clients yes`), as here.
//!
//! Needs `redis-server` built with TLS on the PATH; without it each test prints `SKIPPED
//! <test>: ...` and passes, except under CI (`CI` set), where that is a failure.

use std::{
    fs::File,
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use portcullis::{
    config::{RedisTlsSettings, Settings},
    hot::{HotState, RedisHotState, RedisTls},
    startup::Application,
};
use uuid::Uuid;

#[path = "support/test_ca.rs"]
mod test_ca;
use test_ca::Ca;

const LONG_TTL: Duration = Duration::from_secs(60);
/// Well above `RedisHotState::connect`'s own deadline (3 s): a refused handshake must fail
/// within that, never hang.
const CONNECT_FAILS_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// A redis-server in TLS mode

/// A `redis-server` listening for TLS only, on 127.0.0.1; killed when dropped.
struct RedisServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything a test needs: the server, its CA, a client certificate from that CA, and
/// another CA that signed nothing of the server's, all as files in `dir`.
struct Setup {
    server: RedisServer,
    dir: tempfile::TempDir,
}

impl Setup {
    /// `None` (after printing SKIPPED) when no `redis-server` with TLS is available here;
    /// under CI that is a failure instead.
    fn start() -> Option<Setup> {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("portcullis redis test ca");
        let server = ca.server();
        let client = ca.client();
        let other = Ca::new("some other ca");
        let other_client = other.client();
        for (name, contents) in [
            ("ca.crt", ca.pem()),
            ("server.crt", server.cert_pem()),
            ("server.key", server.key_pem()),
            ("client.crt", client.cert_pem()),
            ("client.key", client.key_pem()),
            ("other-ca.crt", other.pem()),
            ("other-client.crt", other_client.cert_pem()),
            ("other-client.key", other_client.key_pem()),
        ] {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        // A free port can be taken between the probe and redis-server's bind: try again then.
        let mut last_log = String::new();
        for _ in 0..5 {
            match start_redis(dir.path()) {
                Started::Up(server) => return Some(Setup { server, dir }),
                Started::NoRedis(why) => return unavailable(&why),
                Started::Failed(log) if log.contains("Address already in use") => last_log = log,
                // A build without TLS does not know the tls-* directives.
                Started::Failed(log) if log.contains("Bad directive") && log.contains("tls-") => {
                    return unavailable(&format!("redis-server is built without TLS:\n{log}"));
                }
                Started::Failed(log) => panic!("redis-server did not start:\n{log}"),
            }
        }
        panic!("redis-server found no free port:\n{last_log}");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    fn url(&self) -> String {
        format!("rediss://{}", self.server.addr)
    }

    /// The server's CA and a client certificate it accepts.
    fn good_tls(&self) -> RedisTls {
        RedisTls {
            root_ca_pem: Some(self.read("ca.crt")),
            client_pem: Some((self.read("client.crt"), self.read("client.key"))),
        }
    }
}

enum Started {
    Up(RedisServer),
    /// No redis-server binary.
    NoRedis(String),
    /// It exited, or never listened: its log.
    Failed(String),
}

fn start_redis(dir: &Path) -> Started {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log_path = dir.join(format!("redis-{port}.log"));
    let log = File::create(&log_path).unwrap();
    let file = |name: &str| dir.join(name).into_os_string();
    let spawned = Command::new("redis-server")
        .args(["--port", "0", "--bind", "127.0.0.1", "--tls-port"])
        .arg(port.to_string())
        .arg("--tls-cert-file")
        .arg(file("server.crt"))
        .arg("--tls-key-file")
        .arg(file("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(file("ca.crt"))
        .args(["--tls-auth-clients", "yes", "--save", "", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(error) => return Started::NoRedis(format!("cannot run redis-server: {error}")),
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut server = RedisServer { child, addr };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Started::Up(server);
        }
        let exited = server.child.try_wait().unwrap().is_some();
        if exited || Instant::now() > deadline {
            drop(server);
            return Started::Failed(std::fs::read_to_string(&log_path).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn unavailable<T>(why: &str) -> Option<T> {
    assert!(
        std::env::var("CI").map_or(true, |ci| ci.trim().is_empty()),
        "under CI the Redis TLS tests must run: {why}"
    );
    let test = std::thread::current().name().unwrap_or("a redis TLS test").to_string();
    // Straight to the process's stderr, so the skip is seen (the harness captures eprintln!).
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    None
}

fn prefix() -> String {
    format!("test:{}:", Uuid::new_v4().simple())
}

/// Connects with `tls`, expecting a refusal within [`CONNECT_FAILS_WITHIN`]; the error.
async fn refused(url: &str, tls: &RedisTls) -> String {
    let started = Instant::now();
    let result =
        tokio::time::timeout(Duration::from_secs(10), RedisHotState::connect_with_tls(url, prefix(), tls))
            .await
            .expect("connect hung for 10 s");
    let elapsed = started.elapsed();
    let error = match result {
        Ok(_) => panic!("connected to {url} with {tls:?}"),
        Err(error) => format!("{:#}", anyhow::Error::new(error)),
    };
    assert!(elapsed < CONNECT_FAILS_WITHIN, "refusal took {elapsed:?}: {error}");
    let _ = writeln!(std::io::stderr(), "refused in {elapsed:?}: {error}");
    error
}

// ---------------------------------------------------------------------------------------
// Tests

/// With the server's CA and a client certificate: revocations round-trip, and the pub/sub
/// mirror (which shares the connection's TLS settings) follows them with no round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_ca_and_client_certificate_revokes_and_mirrors() {
    let Some(setup) = Setup::start() else { return };
    let prefix = prefix();
    let tls = setup.good_tls();
    let replica = RedisHotState::connect_with_tls(&setup.url(), prefix.clone(), &tls)
        .await
        .expect("connect over TLS with a client certificate")
        .with_revocation_feed(Duration::from_secs(5));
    let other = RedisHotState::connect_with_tls(&setup.url(), prefix, &tls).await.unwrap();
    other.ping().await.unwrap();

    let session = Uuid::now_v7();
    other.revoke_session(session, LONG_TTL).await.unwrap();
    assert!(other.is_session_revoked(session).await.unwrap());
    assert!(!other.is_session_revoked(Uuid::now_v7()).await.unwrap());

    // The feed subscribes and resyncs over TLS too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !replica.revocations_mirrored() {
        assert!(Instant::now() < deadline, "the revocation feed did not sync over TLS within 5 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(replica.is_session_revoked(session).await.unwrap(), "the resync copied the revocation in");
    // One made now reaches it through the channel.
    let later = Uuid::now_v7();
    other.revoke_session(later, LONG_TTL).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !replica.is_session_revoked(later).await.unwrap() {
        assert!(Instant::now() < deadline, "the published revocation did not reach the mirror");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let before = replica.revocation_checks_sent();
    for _ in 0..100 {
        assert!(replica.is_session_revoked(later).await.unwrap());
        assert!(!replica.is_session_revoked(Uuid::now_v7()).await.unwrap());
    }
    if replica.revocations_mirrored() {
        assert_eq!(replica.revocation_checks_sent(), before, "answered from the mirror");
    }
}

/// Redis asks for a client certificate (`tls-auth-clients yes`): without one, or with one
/// from a CA it does not trust, connecting fails fast.
#[tokio::test]
async fn rediss_without_an_accepted_client_certificate_is_refused_fast() {
    let Some(setup) = Setup::start() else { return };
    let url = setup.url();
    let no_certificate = RedisTls { root_ca_pem: Some(setup.read("ca.crt")), client_pem: None };
    refused(&url, &no_certificate).await;
    let foreign_certificate = RedisTls {
        root_ca_pem: Some(setup.read("ca.crt")),
        client_pem: Some((setup.read("other-client.crt"), setup.read("other-client.key"))),
    };
    refused(&url, &foreign_certificate).await;
    // The same server takes the right one (so the refusals were about the certificate).
    RedisHotState::connect_with_tls(&url, prefix(), &setup.good_tls()).await.unwrap();
}

/// A server certificate that does not chain to the trusted CA is refused, whether the
/// trusted CAs are another one's or the public roots (no `ca_file`).
#[tokio::test]
async fn rediss_refuses_a_server_certificate_from_an_untrusted_ca() {
    let Some(setup) = Setup::start() else { return };
    let url = setup.url();
    let good = setup.good_tls();
    let other_ca = RedisTls { root_ca_pem: Some(setup.read("other-ca.crt")), ..good.clone() };
    let error = refused(&url, &other_ca).await;
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    // The public roots (webpki-roots; rustls finding the process's aws-lc-rs provider on its
    // own): a private CA's certificate is not among them.
    let public_roots = RedisTls { root_ca_pem: None, ..good };
    refused(&url, &public_roots).await;
    let error = refused(&url, &RedisTls::default()).await;
    assert!(error.to_lowercase().contains("certificate"), "{error}");
}

/// Certificates with a plaintext URL are refused, not silently ignored.
#[tokio::test]
async fn tls_certificates_with_a_redis_url_are_refused() {
    let ca = Ca::new("unused");
    let tls = RedisTls { root_ca_pem: Some(ca.pem().into_bytes()), client_pem: None };
    let result = RedisHotState::connect_with_tls("redis://127.0.0.1:1", prefix(), &tls).await;
    let error = format!("{:#}", anyhow::Error::new(result.unwrap_err()));
    assert!(error.contains("rediss://"), "{error}");
}

/// The server as configured: `redis_url = "rediss://…"` and `[redis.tls]` files, through
/// `Application::build` (SQLite for the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_connects_to_redis_over_tls_from_its_configuration() {
    let Some(setup) = Setup::start() else { return };
    let data = tempfile::tempdir().unwrap();
    let mut settings = Settings { data_dir: data.path().to_path_buf(), ..Settings::default() };
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.server.ops_listen = "127.0.0.1:0".parse().unwrap();
    settings.password.bcrypt_cost = 4;
    settings.log.filter = "warn".into();
    settings.redis_url = Some(setup.url());
    settings.redis.key_prefix = prefix();
    settings.redis.tls = RedisTlsSettings {
        ca_file: Some(setup.path("ca.crt")),
        cert_file: Some(setup.path("client.crt")),
        key_file: Some(setup.path("client.key")),
    };
    Application::build(settings.clone()).await.expect("start with Redis over mutual TLS");

    // Without the client certificate Redis refuses: start-up fails, and says so.
    let mut no_client = settings.clone();
    no_client.redis.tls.cert_file = None;
    no_client.redis.tls.key_file = None;
    let started = Instant::now();
    let error = format!(
        "{:#}",
        Application::build(no_client).await.err().expect("started without a client certificate")
    );
    assert!(started.elapsed() < CONNECT_FAILS_WITHIN, "took {:?}", started.elapsed());
    assert!(error.contains("cannot connect to Redis"), "{error}");

    // A file that is not what its setting says is named, its contents never shown.
    let mut swapped = settings.clone();
    swapped.redis.tls.ca_file = Some(setup.path("client.key"));
    let error = format!("{:#}", Application::build(swapped).await.err().expect("started with a key as CA"));
    assert!(error.contains("redis.tls.ca_file") && error.contains("client.key"), "{error}");
    assert!(!error.contains("PRIVATE KEY"), "{error}");
    let mut missing = settings;
    missing.redis.tls.key_file = Some(setup.path("nowhere.key"));
    let error =
        format!("{:#}", Application::build(missing).await.err().expect("started without the key file"));
    assert!(error.contains("redis.tls.key_file") && error.contains("nowhere.key"), "{error}");
}
