//! gRPC over TLS and mutual TLS (`server.tls`), with certificates that change on disk.
//!
//! tonic's own `ServerTlsConfig` fixes the certificate at start-up, so TLS is done here: the
//! accept loop takes TCP connections from tonic's [`TcpIncoming`] and hands each to a task
//! of its own for the handshake (bounded by [`HANDSHAKE_TIMEOUT`], so a slow or silent
//! client never holds up the next accept), with the `rustls::ServerConfig` current at that
//! moment; finished connections reach tonic through a channel. A second task reads the
//! files again every `reload_interval` and swaps in a new configuration when their content
//! changed (cert-manager replaces a Secret volume's files by swapping a symlinked directory,
//! so we compare contents, not inotify events). A change that does not load (half-written,
//! mismatched key) is logged and the current configuration stays. Plaintext, the default,
//! serves tonic's `TcpIncoming` as it is: nothing here runs on that path.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::Context;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::mpsc,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        crypto::{CryptoProvider, aws_lc_rs},
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use crate::config::{ServerSettings, TlsSettings};

/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC server, as `Application::run` and `ValidatorApp::run` hold it.
pub type Serving<'a> = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send + 'a>>;

/// The bound gRPC listener: plaintext, or TLS with its (reloadable) configuration.
pub enum Incoming {
    Plain(TcpIncoming),
    Tls(TlsIncoming),
}

impl Incoming {
    /// `router` serving these connections until `stop` resolves.
    pub fn serve<'a>(
        self,
        router: super::GrpcRouter,
        stop: impl Future<Output = ()> + Send + 'a,
    ) -> Serving<'a> {
        match self {
            Incoming::Plain(tcp) => Box::pin(router.serve_with_incoming_shutdown(tcp, stop)),
            Incoming::Tls(tls) => Box::pin(router.serve_with_incoming_shutdown(tls.into_stream(), stop)),
        }
    }

    /// Binds `server.listen` and, when `server.tls` names certificate files, loads them: an
    /// unreadable or invalid file fails start-up here.
    pub fn bind(server: &ServerSettings) -> anyhow::Result<Incoming> {
        let tls = match server.tls.files() {
            Some(_) => Some(ReloadingConfig::load(&server.tls)?),
            None => None,
        };
        let tcp = TcpIncoming::bind(server.listen)
            .with_context(|| format!("cannot listen on {}", server.listen))?
            .with_nodelay(Some(true))
            // Dead peers are noticed by the kernel too (TLS connections included).
            .with_keepalive(Some(super::TCP_KEEPALIVE));
        Ok(match tls {
            None => Incoming::Plain(tcp),
            Some((config, state)) => Incoming::Tls(TlsIncoming { tcp, config: Arc::new(config), state }),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Incoming::Plain(tcp) => tcp.local_addr(),
            Incoming::Tls(tls) => tls.tcp.local_addr(),
        }
    }
}

/// TCP connections to be wrapped in TLS; [`TlsIncoming::into_stream`] starts the work.
pub struct TlsIncoming {
    tcp: TcpIncoming,
    config: Arc<ReloadingConfig>,
    state: ReloadState,
}

impl TlsIncoming {
    /// Spawns the accept loop and the reload task; the stream yields connections whose
    /// handshake is done. Both tasks end when tonic drops the stream (it stops accepting),
    /// which closes the listening socket.
    pub fn into_stream(self) -> ReceiverStream<Result<TlsConnection, Infallible>> {
        let (sender, receiver) = mpsc::channel(64);
        tokio::spawn(reload_loop(self.config.clone(), self.state, sender.clone()));
        tokio::spawn(accept_loop(self.tcp, self.config, sender));
        ReceiverStream::new(receiver)
    }
}

async fn accept_loop(
    mut tcp: TcpIncoming,
    config: Arc<ReloadingConfig>,
    sender: mpsc::Sender<Result<TlsConnection, Infallible>>,
) {
    loop {
        let accepted = tokio::select! {
            () = sender.closed() => return,
            accepted = tcp.next() => accepted,
        };
        let stream = match accepted {
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                tracing::debug!(%error, "accept failed");
                // E.g. out of file descriptors: do not spin on it.
                if !matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                ) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
            None => return,
        };
        let acceptor = TlsAcceptor::from(config.current());
        let sender = sender.clone();
        tokio::spawn(async move {
            let info = stream.connect_info();
            let peer = info.remote_addr;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    // Fails only once tonic stopped accepting: the connection is dropped.
                    _ = sender.send(Ok(TlsConnection { stream, info })).await;
                }
                // Scanners, plaintext clients and refused client certificates end here.
                Ok(Err(error)) => tracing::debug!(?peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
            }
        });
    }
}

async fn reload_loop(
    config: Arc<ReloadingConfig>,
    mut state: ReloadState,
    sender: mpsc::Sender<Result<TlsConnection, Infallible>>,
) {
    let mut ticks = tokio::time::interval(config.settings.reload_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is now: the files were just loaded
    loop {
        tokio::select! {
            () = sender.closed() => return,
            _ = ticks.tick() => {}
        }
        config.reload_if_changed(&mut state).await;
    }
}

/// A TLS connection, with the TCP addresses tonic puts in each request's extensions (so
/// `Request::remote_addr` answers as it does over plaintext).
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The configuration new connections get, and what it was built from.
struct ReloadingConfig {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
}

/// What the reload task remembers between two looks at the files.
struct ReloadState {
    /// SHA-256 of the files the current configuration was built from.
    loaded: Digest,
    /// Content that failed to load (already logged): not tried again until it changes.
    rejected: Option<Digest>,
    /// The last read error logged, so a missing file is reported once, not every tick.
    read_error: Option<String>,
}

type Digest = [u8; 32];

impl ReloadingConfig {
    fn load(settings: &TlsSettings) -> anyhow::Result<(ReloadingConfig, ReloadState)> {
        let files = TlsFiles::read(settings)?;
        let config = files.server_config()?;
        tracing::info!(
            cert_file = %files.cert_path.display(),
            mutual = settings.client_ca_file.is_some(),
            "gRPC TLS certificate loaded"
        );
        let state = ReloadState { loaded: files.digest(), rejected: None, read_error: None };
        Ok((ReloadingConfig { settings: settings.clone(), current: RwLock::new(Arc::new(config)) }, state))
    }

    /// For one new connection: a clone of the `Arc`, under a read lock held for no longer.
    fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Reads the files; when their content differs from what is loaded, builds and swaps in
    /// a new configuration, or logs why it cannot (once per content) and keeps the current.
    async fn reload_if_changed(&self, state: &mut ReloadState) {
        // A read that straddles an atomic swap of the mounted directory can pair the old
        // certificate with the new key: content that does not load counts as bad only when
        // a second read, a moment later, finds the same.
        let mut failed: Option<Digest> = None;
        for _ in 0..5 {
            let settings = self.settings.clone();
            let files = match tokio::task::spawn_blocking(move || TlsFiles::read(&settings)).await {
                Ok(Ok(files)) => files,
                Ok(Err(error)) => {
                    let error = format!("{error:#}");
                    if state.read_error.as_ref() != Some(&error) {
                        tracing::error!(%error, "cannot read the TLS files: keeping the current certificate");
                        state.read_error = Some(error);
                    }
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, "TLS file reading failed");
                    return;
                }
            };
            state.read_error = None;
            let digest = files.digest();
            if digest == state.loaded || state.rejected == Some(digest) {
                return;
            }
            match files.server_config() {
                Ok(config) => {
                    *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(config);
                    state.loaded = digest;
                    state.rejected = None;
                    tracing::info!(
                        cert_file = %files.cert_path.display(),
                        "gRPC TLS certificate reloaded: new connections use it"
                    );
                    return;
                }
                Err(error) if failed == Some(digest) => {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "the TLS files changed but do not load: keeping the current certificate"
                    );
                    state.rejected = Some(digest);
                    return;
                }
                Err(_) => {
                    failed = Some(digest);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// The files' contents, read together.
struct TlsFiles {
    cert_path: PathBuf,
    cert: Vec<u8>,
    key_path: PathBuf,
    key: Vec<u8>,
    client_ca: Option<(PathBuf, Vec<u8>)>,
}

impl TlsFiles {
    fn read(settings: &TlsSettings) -> anyhow::Result<TlsFiles> {
        let (cert_path, key_path) = settings.files().context("server.tls needs cert_file and key_file")?;
        let read = |path: &Path, what: &str| {
            std::fs::read(path).with_context(|| format!("cannot read the TLS {what} {}", path.display()))
        };
        Ok(TlsFiles {
            cert: read(cert_path, "certificate (server.tls.cert_file)")?,
            cert_path: cert_path.to_path_buf(),
            key: read(key_path, "private key (server.tls.key_file)")?,
            key_path: key_path.to_path_buf(),
            client_ca: match &settings.client_ca_file {
                Some(path) => Some((path.clone(), read(path, "client CA (server.tls.client_ca_file)")?)),
                None => None,
            },
        })
    }

    /// One digest over all three files, each length-prefixed.
    fn digest(&self) -> Digest {
        let mut context = ::aws_lc_rs::digest::Context::new(&::aws_lc_rs::digest::SHA256);
        let ca = self.client_ca.as_ref().map(|(_, pem)| pem.as_slice());
        for part in [Some(self.cert.as_slice()), Some(self.key.as_slice()), ca] {
            match part {
                Some(bytes) => {
                    context.update(&(bytes.len() as u64 + 1).to_be_bytes());
                    context.update(bytes);
                }
                None => context.update(&0u64.to_be_bytes()),
            }
        }
        let mut digest = [0; 32];
        digest.copy_from_slice(context.finish().as_ref());
        digest
    }

    fn server_config(&self) -> anyhow::Result<ServerConfig> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let certs = pem_certificates(&self.cert, &self.cert_path)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|error| {
            anyhow::anyhow!(
                "{}: no usable PEM private key (PKCS#8, RSA or EC): {error}",
                self.key_path.display()
            )
        })?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &self.client_ca {
            Some((path, pem)) => builder.with_client_cert_verifier(client_verifier(path, pem, provider)?),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).with_context(|| {
            format!(
                "{} and {} do not make a usable certificate and key",
                self.cert_path.display(),
                self.key_path.display()
            )
        })?;
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The certificates of a PEM file (at least one); errors name `path`.
pub(crate) fn pem_certificates(pem: &[u8], path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow::anyhow!("{}: invalid PEM: {error}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no PEM certificate in it", path.display());
    }
    Ok(certs)
}

/// Client certificates must chain to one of the CAs in `pem`; a client without one is
/// refused during the handshake.
fn client_verifier(
    path: &Path,
    pem: &[u8],
    provider: Arc<CryptoProvider>,
) -> anyhow::Result<Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier>> {
    let mut roots = RootCertStore::empty();
    for cert in pem_certificates(pem, path)? {
        roots.add(cert).with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .with_context(|| format!("{}: cannot verify client certificates with it", path.display()))
}
