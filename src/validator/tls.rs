//! The validator's TLS client for an `https://` `validator.central_url`
//! (`validator.central_tls`): tokio-rustls on aws-lc-rs under a tonic channel, as the server
//! side (`startup::tls`) is, not tonic's own TLS. The files are read at every key fetch
//! (each fetch makes a new connection), so a rotated client certificate or CA is used from
//! the next refresh on without a restart.

use std::{
    future::Future,
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        ClientConfig, RootCertStore,
        crypto::aws_lc_rs,
        pki_types::{PrivateKeyDer, ServerName, pem::PemObject},
    },
};
use tonic::transport::Uri;

use crate::{config::CentralTlsSettings, startup::tls::pem_certificates};

/// Reads the configured files and builds the client configuration: trust in `ca_file`'s CAs
/// (or the compiled-in public roots without it), the client certificate when set, ALPN h2.
pub async fn client_config(settings: &CentralTlsSettings) -> anyhow::Result<Arc<ClientConfig>> {
    let roots = match &settings.ca_file {
        Some(path) => {
            let pem = read(path, "CA file (validator.central_tls.ca_file)").await?;
            let mut roots = RootCertStore::empty();
            for cert in pem_certificates(&pem, path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
            }
            roots
        }
        None => webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect(),
    };
    let builder = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let mut config = match settings.client_files() {
        Some((cert_path, key_path)) => {
            let cert = read(cert_path, "client certificate (validator.central_tls.cert_file)").await?;
            let key = read(key_path, "client key (validator.central_tls.key_file)").await?;
            let key = PrivateKeyDer::from_pem_slice(&key).map_err(|error| {
                anyhow::anyhow!(
                    "{}: no usable PEM private key (PKCS#8, RSA or EC): {error}",
                    key_path.display()
                )
            })?;
            builder.with_client_auth_cert(pem_certificates(&cert, cert_path)?, key).with_context(|| {
                format!(
                    "{} and {} do not make a usable client certificate and key",
                    cert_path.display(),
                    key_path.display()
                )
            })?
        }
        None => builder.with_no_client_auth(),
    };
    // gRPC is HTTP/2 only (and the server refuses ALPN without h2).
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

async fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    tokio::fs::read(path).await.with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// The host of `uri` without the brackets of an IPv6 literal.
fn host(uri: &Uri) -> Option<&str> {
    uri.host().map(|host| host.trim_start_matches('[').trim_end_matches(']'))
}

/// tonic's connector (`Endpoint::connect_with_connector`): TCP to the URI's host and port
/// (443 by default), then the TLS handshake, checking the certificate against
/// `server_name` or else the URI's host.
#[derive(Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
    server_name: Option<String>,
}

impl Connector {
    pub fn new(config: Arc<ClientConfig>, server_name: Option<String>) -> Connector {
        Connector { config, server_name }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (config, server_name) = (self.config.clone(), self.server_name.clone());
        Box::pin(async move {
            let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
            let host = host(&uri).ok_or_else(|| invalid(format!("{uri}: no host")))?.to_string();
            let name = server_name.unwrap_or_else(|| host.clone());
            let name = ServerName::try_from(name.clone())
                .map_err(|_| invalid(format!("{name:?} is not a DNS name or IP address")))?;
            let tcp = TcpStream::connect((host.as_str(), uri.port_u16().unwrap_or(443))).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_the_brackets_of_ipv6_literals() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(host(&uri("https://central:50051")), Some("central"));
        assert_eq!(host(&uri("https://[::1]:50051")), Some("::1"));
        assert_eq!(host(&uri("https://127.0.0.1")), Some("127.0.0.1"));
    }

    #[tokio::test]
    async fn public_roots_without_a_ca_file_and_files_named_in_errors() {
        client_config(&CentralTlsSettings::default()).await.expect("the public roots need no file");
        let settings = CentralTlsSettings {
            ca_file: Some("/nonexistent/ca.crt".into()),
            ..CentralTlsSettings::default()
        };
        let error = format!("{:#}", client_config(&settings).await.unwrap_err());
        assert!(error.contains("/nonexistent/ca.crt") && error.contains("ca_file"), "{error}");
    }
}
