//! A real SMTP server for the mail tests: aiosmtpd, run by `tests/support/smtp_sink.py` in
//! the venv that `scripts/install-test-tools.sh` makes. It writes each message it receives
//! to a JSON file, which [`SmtpSink::messages`] reads back.
//!
//! Without the venv, [`SmtpSink::start`] says the test was skipped and returns `None`,
//! except under CI (`CI` set), where a missing tool is a failure.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SINK_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/smtp_sink.py");
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A message as the sink received it (parsed by Python's `email` package).
#[allow(dead_code)]
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ReceivedMail {
    /// Envelope sender (`MAIL FROM`); for a parsed file, the `From:` header.
    pub from: String,
    /// Envelope recipients (`RCPT TO`); for a parsed file, the `To:` header.
    pub to: Vec<String>,
    pub subject: String,
    /// The decoded text/plain part, line ends as `\n`; empty when there is none.
    pub text: String,
    /// The decoded text/html part, line ends as `\n`; empty when there is none.
    pub html: String,
    /// The top-level content type, e.g. `multipart/alternative`.
    pub content_type: String,
    /// The message as received.
    pub raw: String,
}

/// An aiosmtpd process on 127.0.0.1. Dropping it kills the process.
#[allow(dead_code)]
pub struct SmtpSink {
    child: Option<Child>,
    port: u16,
    /// Holds `mail/` (one JSON file per message) and `sink.log` (the server's stderr).
    dir: tempfile::TempDir,
}

#[allow(dead_code)]
impl SmtpSink {
    /// Starts a sink on a free port; `None` (after saying SKIPPED) without aiosmtpd.
    pub fn start() -> Option<SmtpSink> {
        let python = python_or_skip()?;
        let mut last_error = String::new();
        // The free port found may be taken by someone else before the sink binds it.
        for _ in 0..5 {
            match SmtpSink::spawn(&python, free_port()) {
                Ok(sink) => return Some(sink),
                Err(error) => last_error = error,
            }
        }
        panic!("cannot start the SMTP sink: {last_error}");
    }

    /// Starts a sink on `port` (e.g. the port of a sink stopped earlier, to bring "the SMTP
    /// server" back); `None` (after saying SKIPPED) without aiosmtpd.
    pub fn start_on(port: u16) -> Option<SmtpSink> {
        let python = python_or_skip()?;
        Some(
            SmtpSink::spawn(&python, port)
                .unwrap_or_else(|error| panic!("cannot start the SMTP sink: {error}")),
        )
    }

    fn spawn(python: &Path, port: u16) -> Result<SmtpSink, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let log_path = dir.path().join("sink.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut child = Command::new(python)
            .arg(SINK_SCRIPT)
            .arg(port.to_string())
            .arg(dir.path().join("mail"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", python.display()))?;

        // Wait for "READY" on stdout, on a thread so that the wait can time out.
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let ready =
                BufReader::new(stdout).lines().map_while(Result::ok).any(|line| line.trim() == "READY");
            let _ = ready_tx.send(ready);
        });
        let mut sink = SmtpSink { child: Some(child), port, dir };
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(true) => Ok(sink),
            outcome => {
                sink.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let why = if outcome.is_err() { "did not get ready in time" } else { "exited" };
                Err(format!("the sink on port {port} {why}; its stderr:\n{log}"))
            }
        }
    }

    /// `smtp://127.0.0.1:<port>`: plain SMTP, no authentication.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every message received so far, in the order received.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        let dir = self.dir.path().join("mail");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        // Files are `<n>.json`, written atomically; temporaries start with a dot.
        let mut numbered: Vec<(u64, PathBuf)> = entries
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let n = path.file_name()?.to_str()?.strip_suffix(".json")?.parse().ok()?;
                Some((n, path))
            })
            .collect();
        numbered.sort();
        numbered.into_iter().map(|(_, path)| read_mail(&path)).collect()
    }

    /// Waits (without blocking the runtime) until at least `count` messages arrived or
    /// `timeout` passed, and returns the messages received by then.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if messages.len() >= count || Instant::now() >= deadline {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s) and waits until it has exited, so
    /// its port refuses connections when this returns. Received messages stay readable.
    pub fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses an RFC 5322 file (e.g. an `.eml` written by the file transport) with the sink's
/// parser; `None` (after saying SKIPPED) without aiosmtpd.
#[allow(dead_code)]
pub fn parse_eml(path: &Path) -> Option<ReceivedMail> {
    let python = python_or_skip()?;
    let output = Command::new(python)
        .arg(SINK_SCRIPT)
        .arg("--parse")
        .arg(path)
        .output()
        .expect("run smtp_sink.py --parse");
    assert!(
        output.status.success(),
        "smtp_sink.py --parse {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Some(serde_json::from_slice(&output.stdout).expect("smtp_sink.py --parse prints JSON"))
}

/// The venv's Python when aiosmtpd is installed. Otherwise panics under CI, else reports
/// the current test as skipped and returns `None`.
fn python_or_skip() -> Option<PathBuf> {
    super::installed_tool("aiosmtpd", super::venv_python_with("aiosmtpd"))
}

fn read_mail(path: &Path) -> ReceivedMail {
    let json = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&json).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}
