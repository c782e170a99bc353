//! Helpers shared by the integration tests; each test file declares `mod support;`.
//!
//! External services are opt-in through environment variables, so `cargo test` passes on a
//! bare machine and CI runs everything:
//! * `PORTCULLIS_TEST_DATABASE_URL`, e.g. `postgres://postgres@127.0.0.1:5432/test`: a
//!   PostgreSQL server on which the tests may create databases;
//! * `PORTCULLIS_TEST_REDIS_URL`, e.g. `redis://127.0.0.1:6379`.

// Each test file compiles its own copy of this module and uses only some of it.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

pub const DATABASE_URL_VAR: &str = "PORTCULLIS_TEST_DATABASE_URL";
pub const REDIS_URL_VAR: &str = "PORTCULLIS_TEST_REDIS_URL";

/// Creates a brand-new, empty database on the server of `PORTCULLIS_TEST_DATABASE_URL` and
/// returns its URL, or `None` when the variable is unset. Each test gets its own database,
/// so tests run in parallel without seeing each other's rows. Panics (failing the test) if
/// the variable is set but the server cannot be used.
pub async fn fresh_postgres_url() -> Option<String> {
    let admin_url = env(DATABASE_URL_VAR)?;
    let name = format!("portcullis_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|error| panic!("{DATABASE_URL_VAR}: cannot connect to {admin_url}: {error}"));
    // The name is generated above (letters, digits, underscores): safe to splice in.
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|error| panic!("{DATABASE_URL_VAR}: cannot create database {name}: {error}"));
    let _ = admin.close().await;
    Some(with_database(&admin_url, &name))
}

/// `PORTCULLIS_TEST_REDIS_URL`, or `None` when unset.
pub fn redis_url() -> Option<String> {
    env(REDIS_URL_VAR)
}

/// Reports, on stderr, a test skipped for want of an external service: names
/// `PORTCULLIS_TEST_DATABASE_URL` if unset, else `PORTCULLIS_TEST_REDIS_URL` if unset.
pub fn skip(what: &str) {
    let why = [DATABASE_URL_VAR, REDIS_URL_VAR]
        .into_iter()
        .find(|var| env(var).is_none())
        .map(|var| format!(": {var} is not set"))
        .unwrap_or_default();
    // Straight to the process's stderr: `eprintln!` would be captured by the test harness
    // and the skip would go unnoticed.
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}{why}");
}

/// Where scripts/install-test-tools.sh installs (`PORTCULLIS_TOOLS_DIR`, else
/// `~/.cache/portcullis/tools`).
#[allow(dead_code)]
pub fn tools_dir() -> std::path::PathBuf {
    env("PORTCULLIS_TOOLS_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/portcullis/tools")
    })
}

/// The tools venv's Python when `import <modules>` works in it.
#[allow(dead_code)]
pub fn venv_python_with(modules: &str) -> Option<std::path::PathBuf> {
    let python = tools_dir().join("venv/bin/python");
    let installed = python.exists()
        && std::process::Command::new(&python)
            .args(["-c", &format!("import {modules}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
    installed.then_some(python)
}

/// `found`, a tool the project's script installs (`what` names it). Missing: under CI the
/// test fails (CI installs it), elsewhere the current test is reported SKIPPED.
#[allow(dead_code)]
pub fn installed_tool<T>(what: &str, found: Option<T>) -> Option<T> {
    if found.is_some() {
        return found;
    }
    if std::env::var("CI").is_ok_and(|ci| !ci.trim().is_empty()) {
        panic!(
            "{what} is missing: CI must run the tests through scripts/test, which installs the tools \
             in {} (scripts/install-test-tools.sh) and builds the example",
            tools_dir().display()
        );
    }
    // The test harness names each test's thread after the test; straight to stderr, like
    // `skip`, so it is seen.
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {what} not installed (run scripts/install-test-tools.sh)"
    );
    None
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|value| !value.trim().is_empty())
}

/// `url` with its database (the path) replaced by `database`, keeping any query string.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |at| at + 3);
    let server = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// `host:port` of a `redis://` / `rediss://` URL, e.g. `127.0.0.1:6379` for
/// `redis://:secret@127.0.0.1:6379/0`; port 6379 when the URL names none.
pub fn redis_host_port(url: &str) -> String {
    host_port(url, 6379)
}

/// `host:port` of a `postgres://` URL; port 5432 when the URL names none.
pub fn postgres_host_port(url: &str) -> String {
    host_port(url, 5432)
}

/// `url` with its `host:port` replaced by `host_port` (user, password, path and query kept),
/// e.g. to send a client through a [`TcpProxy`].
pub fn with_host_port(url: &str, host_port: &str) -> String {
    let (start, end) = authority(url);
    let userinfo_end = url[start..end].rfind('@').map_or(start, |at| start + at + 1);
    format!("{}{host_port}{}", &url[..userinfo_end], &url[end..])
}

/// Byte range of the authority (`user:password@host:port`) of `url`.
fn authority(url: &str) -> (usize, usize) {
    let start = url.find("://").map_or(0, |at| at + 3);
    let end = url[start..].find(['/', '?', '#']).map_or(url.len(), |at| start + at);
    (start, end)
}

fn host_port(url: &str, default_port: u16) -> String {
    let (start, end) = authority(url);
    let authority = &url[start..end];
    let host_port = authority.rfind('@').map_or(authority, |at| &authority[at + 1..]);
    // A port follows the last colon, unless that colon is inside an IPv6 literal.
    let has_port = host_port.rfind(':').is_some_and(|colon| !host_port[colon..].contains(']'));
    if has_port { host_port.to_owned() } else { format!("{host_port}:{default_port}") }
}

/// A TCP proxy on 127.0.0.1 for chaos tests: clients connect to [`addr`](Self::addr) and are
/// piped to `upstream`. [`cut`](Self::cut) closes every live connection and drops new ones
/// on accept, as a dependency going away would; [`restore`](Self::restore) lets new ones
/// through again. Dropping the proxy stops it and closes every connection.
#[allow(dead_code)]
pub struct TcpProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    accept: JoinHandle<()>,
}

struct ProxyState {
    upstream: String,
    cut: AtomicBool,
    /// The piping task of every connection accepted while not cut (finished ones are pruned
    /// as new ones arrive). Checked and updated under this lock, so a connection accepted as
    /// `cut` runs is either refused or closed by it, never left open.
    connections: Mutex<Vec<AbortHandle>>,
}

#[allow(dead_code)]
impl TcpProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy: local address");
        let state = Arc::new(ProxyState {
            upstream: upstream.to_owned(),
            cut: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        TcpProxy { addr, state, accept }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every live connection; until [`restore`](Self::restore), new connections are
    /// accepted and closed at once (clients see the connection reset or closed, not a hang).
    pub fn cut(&self) {
        let mut connections = self.state.connections.lock().unwrap_or_else(|e| e.into_inner());
        self.state.cut.store(true, Ordering::SeqCst);
        for connection in connections.drain(..) {
            // Aborting the piping task drops both sockets, closing them.
            connection.abort();
        }
    }

    /// Lets new connections through again (connections closed by `cut` stay closed).
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<ProxyState>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // E.g. too many open files: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let mut connections = state.connections.lock().unwrap_or_else(|e| e.into_inner());
        if state.cut.load(Ordering::SeqCst) {
            // Reset rather than a polite close, like a host that is gone.
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        connections.retain(|connection| !connection.is_finished());
        let upstream = state.upstream.clone();
        let task = tokio::spawn(async move {
            let mut client = client;
            let Ok(mut server) = TcpStream::connect(&upstream).await else {
                return; // Dropping the client closes it.
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        connections.push(task.abort_handle());
    }
}

mod smtp;
// Not every test file uses the SMTP sink.
#[allow(unused_imports)]
pub use smtp::*;
