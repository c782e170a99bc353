//! `envoy`: the same tiny upstream behind Envoy twice — Envoy asking Portcullis through
//! ext_authz (`examples/envoy/envoy.yaml`), and Envoy checking the token itself with its
//! `jwt_authn` filter and the server's JWKS inline (`examples/envoy/jwt_authn.yaml`) — driven
//! by the same closed-loop HTTP/1.1 keep-alive GETs carrying the bearer token.
//!
//! The upstream and the HTTP client are here, on tokio: a handful of lines of HTTP/1.1 each
//! (requests without a body; answers with `content-length` or chunked).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

use crate::{load::Phase, server};

const EXT_AUTHZ_TEMPLATE: &str = include_str!("../../../examples/envoy/envoy.yaml");
const JWT_AUTHN_TEMPLATE: &str = include_str!("../../../examples/envoy/jwt_authn.yaml");

/// The goal: Envoy + ext_authz within this factor of Envoy + jwt_authn (p50 and p99).
pub const TARGET_RATIO: f64 = 1.5;

/// The envoy binary: `--envoy`, else `$PORTCULLIS_TOOLS_DIR/bin/envoy`, else
/// `~/.cache/portcullis/tools/bin/envoy` (where scripts/install-test-tools.sh puts it).
pub fn default_binary() -> PathBuf {
    let tools = std::env::var("PORTCULLIS_TOOLS_DIR")
        .ok()
        .filter(|dir| !dir.trim().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/portcullis/tools")
        });
    tools.join("bin/envoy")
}

/// The version in `envoy --version` (`… version: <commit>/1.40.0/Clean/RELEASE/BoringSSL`).
pub fn version(binary: &Path) -> String {
    let out = std::process::Command::new(binary).arg("--version").output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let version = text.rsplit_once("version:").and_then(|(_, v)| v.trim().split('/').nth(1));
    version.map_or(text.clone(), str::to_string)
}

/// examples/envoy/envoy.yaml for a Portcullis at `portcullis_port`.
pub fn render_ext_authz(portcullis_port: u16, upstream_port: u16) -> anyhow::Result<String> {
    render(
        EXT_AUTHZ_TEMPLATE,
        &[
            ("LISTEN_PORT", "0".into()),
            ("ADMIN_PORT", "0".into()),
            ("PORTCULLIS_PORT", portcullis_port.to_string()),
            ("UPSTREAM_PORT", upstream_port.to_string()),
        ],
    )
}

/// examples/envoy/jwt_authn.yaml with the keys of `jwks_json`.
pub fn render_jwt_authn(
    upstream_port: u16,
    jwks_json: &str,
    issuer: &str,
    audience: &str,
) -> anyhow::Result<String> {
    // The template quotes it with single quotes; JSON on one line holds none normally.
    let jwks: serde_json::Value = serde_json::from_str(jwks_json).context("the server's JWKS is not JSON")?;
    let jwks = serde_json::to_string(&jwks)?.replace('\'', "''");
    render(
        JWT_AUTHN_TEMPLATE,
        &[
            ("LISTEN_PORT", "0".into()),
            ("ADMIN_PORT", "0".into()),
            ("UPSTREAM_PORT", upstream_port.to_string()),
            ("ISSUER", issuer.into()),
            ("AUDIENCE", audience.into()),
            ("JWKS_JSON", jwks),
        ],
    )
}

fn render(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut text = template.to_string();
    for (name, value) in values {
        let placeholder = format!("{{{{{name}}}}}");
        if !text.contains(&placeholder) {
            bail!("the Envoy template has no {placeholder}");
        }
        text = text.replace(&placeholder, value);
    }
    if let Some(at) = text.find("{{") {
        bail!("a placeholder is left in the rendered Envoy config: {}", &text[at..(at + 40).min(text.len())]);
    }
    Ok(text)
}

/// An HTTP/1.1 server answering every request `200 ok`, keep-alive; stops on drop.
pub struct Upstream {
    pub port: u16,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const UPSTREAM_ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";

pub async fn upstream() -> anyhow::Result<Upstream> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.spawn(serve_upstream(stream));
        }
    });
    Ok(Upstream { port, task })
}

async fn serve_upstream(mut stream: TcpStream) {
    _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Every complete request in the buffer (GETs: no body).
        while let Some(end) = header_end(&buf) {
            let length = content_length(&buf[..end]).unwrap_or(0);
            if buf.len() < end + length {
                break;
            }
            buf.drain(..end + length);
            if stream.write_all(UPSTREAM_ANSWER).await.is_err() {
                return;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Index just past the `\r\n\r\n` ending the head.
fn header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn content_length(head: &[u8]) -> Option<usize> {
    header(std::str::from_utf8(head).ok()?, "content-length")?.parse().ok()
}

/// One keep-alive HTTP/1.1 client connection.
pub struct HttpConnection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConnection {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<HttpConnection> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection { stream, buf: Vec::with_capacity(4096) })
    }

    /// Sends `request` (a whole GET) and reads the answer: (status, body).
    pub async fn exchange(&mut self, request: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        self.stream.write_all(request).await?;
        let end = loop {
            if let Some(end) = header_end(&self.buf) {
                break end;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line in {head:?}"))?;
        self.buf.drain(..end);
        let body = if header(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            self.chunked_body().await?
        } else {
            let length: usize = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            while self.buf.len() < length {
                self.fill().await?;
            }
            self.buf.drain(..length).collect()
        };
        Ok((status, body))
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-answer");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn chunked_body(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                self.fill().await?;
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or_default().trim(), 16)
                .with_context(|| format!("bad chunk size {size_text:?}"))?;
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // The empty trailer.
                while self.buf.len() < 2 {
                    self.fill().await?;
                }
                self.buf.drain(..2);
                return Ok(body);
            }
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }
}

/// `GET path` with the bearer token, keep-alive.
pub fn get_request(path: &str, token: Option<&str>) -> Vec<u8> {
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: portcullis.test\r\n");
    if let Some(token) = token {
        request.push_str(&format!("authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// Closed loop: `connections` connections, each sending the next GET when the last one
/// answered, for `duration`; a 200 is a success.
pub async fn run_phase(addr: SocketAddr, request: &[u8], connections: usize, duration: Duration) -> Phase {
    let deadline = Instant::now() + duration;
    let mut workers = JoinSet::new();
    for _ in 0..connections.max(1) {
        let request = request.to_vec();
        workers.spawn(async move {
            let mut out = Phase { latencies_us: Vec::with_capacity(64 * 1024), ..Phase::default() };
            let mut connection = match HttpConnection::open(addr).await {
                Ok(c) => c,
                Err(e) => {
                    out.errors += 1;
                    out.first_error = Some(format!("{e:#}"));
                    return out;
                }
            };
            while Instant::now() < deadline {
                let started = Instant::now();
                match connection.exchange(&request).await {
                    Ok((200, _)) => {
                        out.ok += 1;
                        out.latencies_us
                            .push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    Ok((status, body)) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| {
                            format!(
                                "HTTP {status}: {}",
                                String::from_utf8_lossy(&body).chars().take(200).collect::<String>()
                            )
                        });
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                        // The connection is in an unknown state: a new one.
                        match HttpConnection::open(addr).await {
                            Ok(c) => connection = c,
                            Err(_) => break,
                        }
                    }
                }
            }
            out
        });
    }
    let mut phase = Phase::default();
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(worker) => phase.merge(worker),
            Err(e) => {
                phase.errors += 1;
                phase.first_error.get_or_insert_with(|| format!("worker failed: {e}"));
            }
        }
    }
    phase
}

/// One request on a connection of its own: the status.
pub async fn status_of(addr: SocketAddr, token: Option<&str>) -> anyhow::Result<u16> {
    let mut connection = HttpConnection::open(addr).await?;
    let request = get_request("/", token);
    let exchange = connection.exchange(&request);
    Ok(tokio::time::timeout(Duration::from_secs(10), exchange).await.context("timed out")??.0)
}

/// A running Envoy (killed on drop) and its ingress listener.
pub struct Envoy {
    child: Child,
    pub pid: u32,
    pub listener: SocketAddr,
    log: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        _ = self.child.kill();
        _ = self.child.wait();
        server::untrack_pid(self.pid);
    }
}

impl Envoy {
    /// Runs `config` (listener and admin on port 0) from `dir`, one worker thread, pinned to
    /// `cpus`; waits until its admin says LIVE and reads the listener's port.
    pub async fn start(
        binary: &Path,
        cpus: Option<&str>,
        config: &str,
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<Envoy> {
        let config_path = dir.join(format!("{name}.yaml"));
        std::fs::write(&config_path, config)?;
        let admin_path = dir.join(format!("{name}.admin"));
        let log = dir.join(format!("{name}.log"));
        let child = server::pinned_command(binary, cpus)
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            // No shared memory between Envoys; one worker thread, as a sidecar would run.
            .args(["--disable-hot-restart", "--concurrency", "1", "--log-level", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        let pid = child.id();
        server::track_pid(pid);
        let mut envoy = Envoy { child, pid, listener: SocketAddr::from(([127, 0, 0, 1], 0)), log };
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin = loop {
            if Instant::now() > deadline {
                bail!("envoy ({name}) did not get ready in 30 s; its log:\n{}", envoy.log_tail());
            }
            if let Ok(Some(status)) = envoy.child.try_wait() {
                bail!("envoy ({name}) exited with {status}; its log:\n{}", envoy.log_tail());
            }
            let admin =
                std::fs::read_to_string(&admin_path).ok().and_then(|a| a.trim().parse::<SocketAddr>().ok());
            if let Some(admin) = admin
                && let Ok((200, body)) = admin_get(admin, "/ready").await
                && String::from_utf8_lossy(&body).trim() == "LIVE"
            {
                break admin;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (_, body) = admin_get(admin, "/listeners?format=json").await?;
        let listeners: serde_json::Value = serde_json::from_slice(&body)?;
        let port = listeners["listener_statuses"]
            .as_array()
            .and_then(|all| all.iter().find(|l| l["name"] == "ingress"))
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .with_context(|| format!("no ingress listener port in {listeners}"))?;
        envoy.listener = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port)?));
        Ok(envoy)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut connection = HttpConnection::open(admin).await?;
    let request = get_request(path, None);
    let exchange = connection.exchange(&request);
    tokio::time::timeout(Duration::from_secs(5), exchange).await.context("timed out")?
}

/// One of the two set-ups, measured.
#[derive(Serialize, Clone)]
pub struct EnvoyRun {
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    pub p50_us: Option<u32>,
    pub p99_us: Option<u32>,
    pub p999_us: Option<u32>,
    /// Envoy's CPU time per request.
    pub envoy_cpu_us_per_request: Option<f64>,
    /// The authorizer's CPU time per request (Portcullis, or the no-op one; ext_authz only).
    pub portcullis_cpu_us_per_request: Option<f64>,
}

/// The three set-ups under one load, and their ratios.
#[derive(Serialize)]
pub struct EnvoyComparison {
    /// Keep-alive connections, closed loop (one request in flight each).
    pub connections: usize,
    pub ext_authz: EnvoyRun,
    /// The same ext_authz config asking an authorizer that decides nothing (the floor).
    pub ext_authz_noop: EnvoyRun,
    pub jwt_authn: EnvoyRun,
    /// ext_authz / jwt_authn.
    pub p50_ratio: Option<f64>,
    pub p99_ratio: Option<f64>,
    /// ext_authz(no-op) / jwt_authn: what the filter and the round trip cost by themselves.
    pub floor_p50_ratio: Option<f64>,
    pub floor_p99_ratio: Option<f64>,
    /// ext_authz(Portcullis) / ext_authz(no-op): what Portcullis adds to it.
    pub portcullis_p50_ratio: Option<f64>,
    pub portcullis_p99_ratio: Option<f64>,
}

impl EnvoyComparison {
    pub fn new(
        connections: usize,
        ext_authz: EnvoyRun,
        ext_authz_noop: EnvoyRun,
        jwt_authn: EnvoyRun,
    ) -> EnvoyComparison {
        let ratio =
            |a: Option<u32>, b: Option<u32>| a.zip(b).map(|(a, b)| f64::from(a) / f64::from(b.max(1)));
        EnvoyComparison {
            connections,
            p50_ratio: ratio(ext_authz.p50_us, jwt_authn.p50_us),
            p99_ratio: ratio(ext_authz.p99_us, jwt_authn.p99_us),
            floor_p50_ratio: ratio(ext_authz_noop.p50_us, jwt_authn.p50_us),
            floor_p99_ratio: ratio(ext_authz_noop.p99_us, jwt_authn.p99_us),
            portcullis_p50_ratio: ratio(ext_authz.p50_us, ext_authz_noop.p50_us),
            portcullis_p99_ratio: ratio(ext_authz.p99_us, ext_authz_noop.p99_us),
            ext_authz_noop,
            ext_authz,
            jwt_authn,
        }
    }
}

#[derive(Serialize)]
pub struct EnvoySummary {
    pub envoy_version: String,
    pub pinning: String,
    /// Under `--envoy-connections` (the figures the goal is checked on).
    #[serde(flatten)]
    pub loaded: EnvoyComparison,
    /// The same, one connection: each request alone, latency without queueing (absent
    /// when `--envoy-connections` is 1 already).
    pub one_connection: Option<EnvoyComparison>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_examples_render_with_every_placeholder_filled() {
        let config = render_ext_authz(50051, 3000).unwrap();
        assert!(config.contains("port_value: 50051") && config.contains("port_value: 3000"));
        let jwks = r#"{"keys": [{"kty": "RSA", "kid": "k1", "n": "AQAB", "e": "AQAB"}]}"#;
        let config = render_jwt_authn(3000, jwks, "portcullis", "portcullis").unwrap();
        assert!(config.contains(r#"inline_string: '{"keys":[{"#), "{config}");
        assert!(config.contains("issuer: portcullis") && config.contains("audiences: [portcullis]"));
        assert!(render_jwt_authn(3000, "not json", "i", "a").is_err());
    }

    #[test]
    fn heads_are_read() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nx: y\r\n\r\nok\n";
        let end = header_end(head).unwrap();
        assert_eq!(&head[end..], b"ok\n");
        assert_eq!(content_length(&head[..end]), Some(3));
        assert_eq!(header(std::str::from_utf8(&head[..end]).unwrap(), "X"), Some("y"));
    }
}
