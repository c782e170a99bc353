//! `validator`: `portcullis serve --mode validator` (the sidecar) next to the bench's server:
//! how fast it starts, how much memory it holds idle, and (measured by the caller) what
//! ValidateToken costs it.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;
use serde::Serialize;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::server::{self, ServerProcess};

pub const TARGET_STARTUP: Duration = Duration::from_millis(200);
pub const TARGET_IDLE_RSS_KIB: u64 = 20 * 1024;

/// Where the validator's keys and revocations come from.
pub enum Source<'a> {
    /// The central server's GetJwks and its Redis (same URL and key prefix).
    Central { url: String, redis_url: &'a str, redis_prefix: &'a str },
    /// A JWKS file and in-process hot state (the server has no Redis: a local trial, blind to
    /// the server's revocations).
    File { jwks_json: &'a str },
}

#[derive(Serialize, Default)]
pub struct ValidatorSummary {
    /// How the validator got its keys and revocations.
    pub setup: String,
    /// From spawning the process (`taskset` included when pinned) to the first SERVING
    /// answer of Health/Check, ms (the poll is every ~1 ms).
    pub startup_ms: f64,
    /// VmRSS after 1 s idle, KiB.
    pub idle_rss_kib: Option<u64>,
    /// VmHWM after the ValidateToken load, KiB.
    pub peak_rss_kib: Option<u64>,
    pub validate_hot_cpu_us_per_request: Option<f64>,
    /// Against the SERVER's Health/Check CPU per request (same load).
    pub cpu_ratio_to_server_health: Option<f64>,
    /// And against the server's own ValidateToken hot.
    pub cpu_ratio_to_server_validate_hot: Option<f64>,
}

pub struct Sidecar {
    pub process: ServerProcess,
    pub startup: Duration,
    pub idle_rss_kib: Option<u64>,
    pub setup: String,
}

/// Starts the validator in `dir` (pinned to `cpus`), waits for SERVING, idles 1 s.
pub async fn start(
    binary: &Path,
    cpus: Option<&str>,
    source: Source<'_>,
    dir: &Path,
) -> anyhow::Result<Sidecar> {
    let addr = server::free_addr()?;
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| env.push((format!("PORTCULLIS_{k}"), v));
    set("DATA_DIR", dir.display().to_string());
    set("SERVER__LISTEN", addr.to_string());
    set("SERVER__OPS_LISTEN", "127.0.0.1:0".into());
    set("LOG__FILTER", "warn".into());
    let setup = match source {
        Source::Central { url, redis_url, redis_prefix } => {
            set("VALIDATOR__CENTRAL_URL", url.clone());
            set("REDIS_URL", redis_url.into());
            set("REDIS__KEY_PREFIX", redis_prefix.into());
            format!("keys from the server's GetJwks ({url}), revocations from its Redis")
        }
        Source::File { jwks_json } => {
            let path = dir.join("jwks.json");
            std::fs::write(&path, jwks_json)?;
            set("VALIDATOR__JWKS_FILE", path.display().to_string());
            set("ALLOW_MEMORY_HOT_STATE", "true".into());
            "keys from a JWKS file (the server's GetJwks), in-memory hot state (the server has no Redis: \
             this validator cannot see its revocations)"
                .into()
        }
    };
    let started = Instant::now();
    let mut process = ServerProcess::spawn(
        binary,
        cpus,
        &["serve", "--mode", "validator"],
        env,
        addr,
        dir.join("validator.log"),
    )?;
    wait_serving_fast(&mut process, addr, Duration::from_secs(30)).await?;
    let startup = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss_kib = server::rss_kib(process.pid);
    Ok(Sidecar { process, startup, idle_rss_kib, setup })
}

/// Polls about every millisecond: TCP connect until the port accepts, then Health/Check
/// until SERVING.
async fn wait_serving_fast(
    process: &mut ServerProcess,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = String::from("not listening");
    while started.elapsed() < timeout {
        if let Some(status) = process.exited() {
            bail!("the validator exited during start-up ({status}):\n{}", process.log_tail());
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            match crate::load::connect(addr, 1).await {
                Ok(channels) => {
                    let answer = HealthClient::new(channels[0].clone())
                        .check(HealthCheckRequest { service: String::new() })
                        .await;
                    match answer {
                        Ok(a) if a.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                        Ok(a) => last = format!("health {:?}", a.get_ref().status()),
                        Err(s) => last = crate::load::status_text(&s),
                    }
                }
                Err(e) => last = format!("{e:#}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    bail!("the validator at {addr} is not SERVING after {timeout:?} ({last})\n{}", process.log_tail())
}
