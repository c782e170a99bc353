//! gRPC over TLS and mutual TLS (`server.tls`): who is served and who is refused, the peer
//! address over TLS, certificates rotated on disk the way cert-manager and the kubelet do it
//! (a `..data` symlink swapped to a new directory), files that do not load, start-up errors,
//! and the validator mode, serving TLS and fetching its keys from a central instance over
//! mutual TLS. Certificates are made with rcgen (tests/support/test_ca.rs).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use portcullis::{
    api::pb::{self, auth_service_client::AuthServiceClient, session_service_client::SessionServiceClient},
    config::{CentralTlsSettings, Settings, TlsSettings},
    startup::{Application, ValidatorApp},
    validator::KeySource,
};
use tokio::{net::TcpStream, sync::oneshot, task::JoinHandle};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, RootCertStore,
        crypto::aws_lc_rs,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    },
};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    harness::{self, Backend, PASSWORD, bearer, eventually, test_settings},
    on_both_backends,
    test_ca::{Ca, Identity},
};

on_both_backends!(tls_serves_clients_that_trust_its_certificate);

/// A Secret volume as the kubelet lays it out: the files live in a versioned directory,
/// `..data` points at it, and each name is a symlink through `..data`. Publishing writes a
/// new directory and swaps `..data` atomically (a rename over the old link).
struct Mount {
    root: PathBuf,
    version: usize,
}

impl Mount {
    fn new(root: &Path, files: &[(&str, &[u8])]) -> Mount {
        let mut mount = Mount { root: root.to_path_buf(), version: 0 };
        mount.publish(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(name), root.join(name)).unwrap();
        }
        mount
    }

    fn publish(&mut self, files: &[(&str, &[u8])]) {
        self.version += 1;
        let dir = format!("..v{}", self.version);
        std::fs::create_dir(self.root.join(&dir)).unwrap();
        for (name, content) in files {
            std::fs::write(self.root.join(&dir).join(name), content).unwrap();
        }
        let staged = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&dir, &staged).unwrap();
        std::fs::rename(&staged, self.root.join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// The three files of a server certificate, its key and (for mutual TLS) the client CA.
fn server_files(server: &Identity, client_ca: Option<&Ca>) -> Vec<(&'static str, Vec<u8>)> {
    let mut files =
        vec![("tls.crt", server.cert_pem().into_bytes()), ("tls.key", server.key_pem().into_bytes())];
    if let Some(ca) = client_ca {
        files.push(("ca.crt", ca.pem().into_bytes()));
    }
    files
}

fn as_refs<'a>(files: &'a [(&'static str, Vec<u8>)]) -> Vec<(&'static str, &'a [u8])> {
    files.iter().map(|(name, content)| (*name, content.as_slice())).collect()
}

fn tls_settings(mount: &Mount, mutual: bool) -> TlsSettings {
    TlsSettings {
        cert_file: Some(mount.path("tls.crt")),
        key_file: Some(mount.path("tls.key")),
        client_ca_file: mutual.then(|| mount.path("ca.crt")),
        reload_interval: Duration::from_millis(100),
    }
}

// ---------------------------------------------------------------------------------------
// Clients

/// A client configuration trusting `trust` (only), presenting `identity` if given, offering h2.
fn client_config(trust: &[&Ca], identity: Option<&Identity>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in trust {
        roots.add(ca.der()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(
                vec![identity.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key.clone())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A tonic channel whose connections are TLS (tokio-rustls) to `addr`, as `localhost`.
async fn tls_channel(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let tls =
                TlsConnector::from(config).connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
}

/// Health/Check over a new TLS connection: `Ok` when served. With TLS 1.3 a refused client
/// certificate shows only after the client's side of the handshake, hence the call.
async fn check(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<(), String> {
    let channel = tls_channel(addr, config).await.map_err(|e| format!("connect: {e:?}"))?;
    health(channel).await
}

async fn health(channel: Channel) -> Result<(), String> {
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|e| format!("Health/Check: {e:?}"))?
        .into_inner()
        .status;
    match status == ServingStatus::Serving as i32 {
        true => Ok(()),
        false => Err(format!("status {status}")),
    }
}

/// A bare TLS handshake: the negotiated ALPN protocol and the server's leaf certificate.
async fn handshake(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<(Option<Vec<u8>>, CertificateDer<'static>)> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(config).connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
    let (_, connection) = tls.get_ref();
    let leaf = connection.peer_certificates().expect("the server presents a certificate")[0].clone();
    Ok((connection.alpn_protocol().map(<[u8]>::to_vec), leaf))
}

// ---------------------------------------------------------------------------------------
// Servers

struct TlsApp {
    addr: SocketAddr,
    settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    _data: tempfile::TempDir,
}

impl TlsApp {
    async fn shutdown(mut self) -> anyhow::Result<()> {
        _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap().await.expect("server task")
    }
}

impl Drop for TlsApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            _ = stop.send(());
        }
    }
}

async fn spawn_tls(backend: Backend, tls: TlsSettings) -> Option<TlsApp> {
    let (mut settings, data) = test_settings(backend).await?;
    settings.server.tls = tls;
    portcullis::telemetry::init(&settings.log);
    let app = Application::build(settings.clone()).await.expect("server builds");
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run(async move {
        _ = stopped.await;
    }));
    Some(TlsApp { addr, settings, stop: Some(stop), server: Some(server), _data: data })
}

// ---------------------------------------------------------------------------------------
// Tests

async fn tls_serves_clients_that_trust_its_certificate(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other_ca) = (Ca::new("server CA"), Ca::new("another CA"));
    let files = server_files(&ca.server(), None);
    let mount = Mount::new(dir.path(), &as_refs(&files));
    let Some(app) = spawn_tls(backend, tls_settings(&mount, false)).await else { return };
    let trusted = client_config(&[&ca], None);

    check(app.addr, trusted.clone()).await.expect("a client trusting the CA is served");
    let (alpn, _) = handshake(app.addr, trusted.clone()).await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN negotiates h2");

    // The user-facing services over TLS; without a ClientContext the session records the
    // peer address, which must still reach the API layer through the TLS wrapper.
    let channel = tls_channel(app.addr, trusted.clone()).await.unwrap();
    let mut auth = AuthServiceClient::new(channel.clone());
    auth.register(pb::RegisterRequest {
        username: "tls-user".into(),
        email: "tls-user@example.com".into(),
        password: PASSWORD.into(),
        first_name: "Tls".into(),
        last_name: "User".into(),
        client: None,
    })
    .await
    .expect("Register over TLS");
    let login = auth
        .login(pb::LoginRequest { identifier: "tls-user".into(), password: PASSWORD.into(), client: None })
        .await
        .expect("Login over TLS")
        .into_inner();
    let Some(pb::login_response::Outcome::Authenticated(session)) = login.outcome else {
        panic!("login did not authenticate: {login:?}")
    };
    let access = session.tokens.unwrap().access_token;
    let validated = auth
        .validate_token(pb::ValidateTokenRequest { token: access.clone(), required_roles: vec![] })
        .await
        .expect("ValidateToken over TLS")
        .into_inner();
    assert!(validated.valid, "{validated:?}");
    let sessions = SessionServiceClient::new(channel)
        .list_sessions(bearer(pb::ListSessionsRequest {}, &access))
        .await
        .expect("ListSessions over TLS")
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].ip_address, "127.0.0.1", "the peer address is known over TLS");

    // A plaintext client and a client that does not trust the certificate are not served.
    let plaintext = async {
        let channel = Channel::from_shared(format!("http://{}", app.addr))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        health(channel).await
    };
    assert!(plaintext.await.is_err(), "a plaintext client is not served");
    assert!(check(app.addr, client_config(&[&other_ca], None)).await.is_err());

    // Graceful shutdown stops accepting.
    let addr = app.addr;
    tokio::time::timeout(Duration::from_secs(10), app.shutdown())
        .await
        .expect("shutdown within 10 s")
        .expect("clean shutdown");
    assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca, other_ca) = (Ca::new("server CA"), Ca::new("client CA"), Ca::new("other CA"));
    let files = server_files(&server_ca.server(), Some(&client_ca));
    let mount = Mount::new(dir.path(), &as_refs(&files));
    let Some(app) = spawn_tls(Backend::Embedded, tls_settings(&mount, true)).await else { return };

    let without = check(app.addr, client_config(&[&server_ca], None)).await;
    assert!(without.is_err(), "a client without a certificate is refused");
    let foreign = check(app.addr, client_config(&[&server_ca], Some(&other_ca.client()))).await;
    assert!(foreign.is_err(), "a certificate from another CA is refused");
    // A server certificate of the right CA is not a client certificate (extended key usage).
    let wrong_usage = check(app.addr, client_config(&[&server_ca], Some(&client_ca.server()))).await;
    assert!(wrong_usage.is_err(), "a certificate without clientAuth usage is refused");
    check(app.addr, client_config(&[&server_ca], Some(&client_ca.client())))
        .await
        .expect("a client certificate from the configured CA is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_reloaded_when_the_mounted_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, client_ca1) = (Ca::new("server CA 1"), Ca::new("client CA 1"));
    let server1 = ca1.server();
    let mut mount = Mount::new(dir.path(), &as_refs(&server_files(&server1, Some(&client_ca1))));
    let Some(app) = spawn_tls(Backend::Embedded, tls_settings(&mount, true)).await else { return };
    let old_client = client_config(&[&ca1], Some(&client_ca1.client()));
    check(app.addr, old_client.clone()).await.expect("served with the first certificate");
    let open_before = tls_channel(app.addr, old_client.clone()).await.unwrap();
    health(open_before.clone()).await.unwrap();

    // cert-manager renews with a new CA (for the test) and a new client CA: new directory,
    // `..data` swapped.
    let (ca2, client_ca2) = (Ca::new("server CA 2"), Ca::new("client CA 2"));
    let server2 = ca2.server();
    mount.publish(&as_refs(&server_files(&server2, Some(&client_ca2))));
    let new_client = client_config(&[&ca2], Some(&client_ca2.client()));
    let reloaded = eventually(Duration::from_secs(5), || {
        let (addr, config) = (app.addr, new_client.clone());
        async move { check(addr, config).await.is_ok() }
    })
    .await;
    assert!(reloaded, "new connections get the new certificate and client CA");
    let (_, leaf) = handshake(app.addr, new_client.clone()).await.unwrap();
    assert_eq!(leaf, server2.cert, "the server presents the new certificate");
    assert!(check(app.addr, old_client.clone()).await.is_err(), "a client trusting only the old CA fails");
    let old_identity = client_config(&[&ca2], Some(&client_ca1.client()));
    assert!(check(app.addr, old_identity).await.is_err(), "the old client CA no longer admits");
    health(open_before).await.expect("a connection made before the swap keeps working");

    // A bad update (a garbage certificate; then a certificate with another key) is refused
    // as a whole, and the current certificate and client CA stay.
    let (ca3, client_ca3) = (Ca::new("server CA 3"), Ca::new("client CA 3"));
    let server3 = ca3.server();
    let garbage = [
        ("tls.crt", b"not a certificate".to_vec()),
        ("tls.key", server2.key_pem().into_bytes()),
        ("ca.crt", client_ca2.pem().into_bytes()),
    ];
    let mismatched = [
        ("tls.crt", server3.cert_pem().into_bytes()),
        ("tls.key", server2.key_pem().into_bytes()),
        ("ca.crt", client_ca3.pem().into_bytes()),
    ];
    for bad in [&garbage, &mismatched] {
        mount.publish(&as_refs(bad));
        // Several reload intervals, and the second read (200 ms later) of content that fails.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        check(app.addr, new_client.clone()).await.expect("still served with the last good certificate");
        let (_, leaf) = handshake(app.addr, new_client.clone()).await.unwrap();
        assert_eq!(leaf, server2.cert);
    }

    // A good update after bad ones is still taken.
    mount.publish(&as_refs(&server_files(&server3, Some(&client_ca3))));
    let recovered = eventually(Duration::from_secs(5), || {
        let (addr, config) = (app.addr, client_config(&[&ca3], Some(&client_ca3.client())));
        async move { check(addr, config).await.is_ok() }
    })
    .await;
    assert!(recovered, "a valid certificate after invalid ones is loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_does_not_hold_up_other_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let mount = Mount::new(dir.path(), &as_refs(&server_files(&ca.server(), None)));
    let Some(app) = spawn_tls(Backend::Embedded, tls_settings(&mount, false)).await else { return };
    // Connections that never send a ClientHello (the handshake timeout is 10 s).
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(app.addr).await.unwrap());
    }
    tokio::time::timeout(Duration::from_secs(3), check(app.addr, client_config(&[&ca], None)))
        .await
        .expect("served while 20 handshakes are pending")
        .expect("served");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_certificate_files_stop_start_up_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let (server, other) = (ca.server(), ca.server());
    let write = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    let cert = write("tls.crt", &server.cert_pem());
    let key = write("tls.key", &server.key_pem());
    let other_key = write("other.key", &other.key_pem());
    let garbage = write("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64!\n");
    let missing = dir.path().join("missing.crt");
    let cases = [
        (Some(missing.clone()), Some(key.clone()), None, "missing.crt"),
        (Some(garbage.clone()), Some(key.clone()), None, "garbage.pem"),
        (Some(cert.clone()), Some(garbage.clone()), None, "garbage.pem"),
        (Some(cert.clone()), Some(other_key.clone()), None, "other.key"),
        (Some(cert.clone()), Some(key.clone()), Some(garbage.clone()), "garbage.pem"),
    ];
    for (cert_file, key_file, client_ca_file, named) in cases {
        let Some((mut settings, _data)) = test_settings(Backend::Embedded).await else { return };
        settings.server.tls =
            TlsSettings { cert_file, key_file, client_ca_file, reload_interval: Duration::from_secs(10) };
        let error = match Application::build(settings).await {
            Ok(_) => panic!("start-up succeeded with unusable TLS files ({named})"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains(named), "the error names {named}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_serves_over_mutual_tls() {
    let Some(central) = harness::spawn_app(Backend::Embedded).await else { return };
    let (access, _, _) = central.user_session("sidecar-user").await;
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let mount = Mount::new(dir.path(), &as_refs(&server_files(&server_ca.server(), Some(&client_ca))));
    let mut settings: Settings = central.settings.clone();
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.validator.central_url = Some(format!("http://{}", central.addr));
    settings.allow_memory_hot_state = true;
    settings.server.tls = tls_settings(&mount, true);
    let validator = ValidatorApp::build(settings).await.expect("validator builds");
    let addr = validator.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(validator.run(async move {
        _ = stopped.await;
    }));

    assert!(check(addr, client_config(&[&server_ca], None)).await.is_err(), "no client certificate");
    let channel = tls_channel(addr, client_config(&[&server_ca], Some(&client_ca.client()))).await.unwrap();
    let answer = AuthServiceClient::new(channel)
        .validate_token(pb::ValidateTokenRequest { token: access, required_roles: vec![] })
        .await
        .expect("ValidateToken over mutual TLS")
        .into_inner();
    assert!(answer.valid, "{answer:?}");
    _ = stop.send(());
    server.await.unwrap().expect("validator stops cleanly");
}

/// A validator whose `central_url` is `https://`: it fetches the keys over mutual TLS with
/// `validator.central_tls` (CA + client certificate) and validates the central's tokens;
/// without a client certificate, with a CA that does not issue the central's certificate, or
/// with a `server_name` the certificate does not carry, it does not start, and says why. The
/// files are read again at every fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_fetches_its_keys_from_a_central_instance_over_mutual_tls() {
    let central_dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca, other_ca) = (Ca::new("server CA"), Ca::new("client CA"), Ca::new("other CA"));
    let mount =
        Mount::new(central_dir.path(), &as_refs(&server_files(&server_ca.server(), Some(&client_ca))));
    let Some(central) = spawn_tls(Backend::Embedded, tls_settings(&mount, true)).await else { return };

    // A token issued by the central instance (over mutual TLS too).
    let channel =
        tls_channel(central.addr, client_config(&[&server_ca], Some(&client_ca.client()))).await.unwrap();
    let mut auth = AuthServiceClient::new(channel);
    auth.register(pb::RegisterRequest {
        username: "sidecar-tls".into(),
        email: "sidecar-tls@example.com".into(),
        password: PASSWORD.into(),
        first_name: "Sidecar".into(),
        last_name: "Tls".into(),
        client: None,
    })
    .await
    .expect("Register");
    let login = auth
        .login(pb::LoginRequest { identifier: "sidecar-tls".into(), password: PASSWORD.into(), client: None })
        .await
        .expect("Login")
        .into_inner();
    let Some(pb::login_response::Outcome::Authenticated(session)) = login.outcome else {
        panic!("login did not authenticate: {login:?}")
    };
    let access = session.tokens.unwrap().access_token;

    // The validator's files: the central's CA, and a client certificate of the client CA.
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, content: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    let identity = client_ca.client();
    let ca_file = write("ca.crt", &server_ca.pem());
    let other_ca_file = write("other-ca.crt", &other_ca.pem());
    let cert_file = write("tls.crt", &identity.cert_pem());
    let key_file = write("tls.key", &identity.key_pem());
    let mutual = CentralTlsSettings {
        ca_file: Some(ca_file.clone()),
        cert_file: Some(cert_file.clone()),
        key_file: Some(key_file.clone()),
        server_name: None,
    };
    let validator_settings = |tls: CentralTlsSettings| {
        let mut settings = central.settings.clone();
        settings.server.listen = "127.0.0.1:0".parse().unwrap();
        settings.server.tls = TlsSettings::default();
        settings.allow_memory_hot_state = true;
        settings.validator.central_url = Some(format!("https://localhost:{}", central.addr.port()));
        settings.validator.central_tls = tls;
        settings
    };

    let validator = ValidatorApp::build(validator_settings(mutual.clone())).await.expect("validator builds");
    let addr = validator.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(validator.run(async move {
        _ = stopped.await;
    }));
    let answer = AuthServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .validate_token(pb::ValidateTokenRequest { token: access.clone(), required_roles: vec![] })
        .await
        .expect("the validator answers")
        .into_inner();
    assert!(answer.valid, "the central's token is valid at the validator: {answer:?}");
    _ = stop.send(());
    server.await.unwrap().expect("validator stops cleanly");

    // Refused set-ups stop start-up with the reason.
    let cases = [
        (
            "no client certificate",
            CentralTlsSettings { cert_file: None, key_file: None, ..mutual.clone() },
            "without a client certificate: a central instance with mutual TLS needs validator.central_tls.cert_file",
        ),
        (
            "a CA that did not issue the central's certificate",
            CentralTlsSettings { ca_file: Some(other_ca_file), ..mutual.clone() },
            "UnknownIssuer",
        ),
        (
            "a server name the certificate does not carry",
            CentralTlsSettings { server_name: Some("central.example".into()), ..mutual.clone() },
            "certificate not valid for name \"central.example\"",
        ),
        (
            "the compiled-in public roots (no ca_file)",
            CentralTlsSettings { ca_file: None, ..mutual.clone() },
            "UnknownIssuer",
        ),
    ];
    for (case, tls, says) in cases {
        let error = match ValidatorApp::build(validator_settings(tls)).await {
            Ok(_) => panic!("the validator started with {case}"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains("cannot load the public keys"), "{case}: {error}");
        assert!(error.contains(says), "{case}: the error says {says:?}: {error}");
    }

    // Each fetch reads the files again: a client certificate of another CA is refused at
    // the next fetch, a new one of the right CA is taken.
    let source = KeySource::from_settings(&validator_settings(mutual.clone()).validator).unwrap();
    let jwks = source.fetch().await.expect("fetch over mutual TLS");
    assert!(jwks.contains("\"keys\""), "{jwks}");
    let foreign = other_ca.client();
    write("tls.crt", &foreign.cert_pem());
    write("tls.key", &foreign.key_pem());
    assert!(source.fetch().await.is_err(), "the rotated (foreign) client certificate is used");
    let renewed = client_ca.client();
    write("tls.crt", &renewed.cert_pem());
    write("tls.key", &renewed.key_pem());
    source.fetch().await.expect("the renewed client certificate is used");
}
