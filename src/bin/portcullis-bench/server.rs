//! The server under test: the machine it runs on, CPU pinning (`taskset`), the `portcullis`
//! child process with its temporary data directory, and what `/proc` says about a process
//! (CPU time, peak RSS).

use std::{
    fs,
    io::Read,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use portcullis::token::SigningAlgorithm;

/// Cores and model of this machine, and the CPUs this process may run on.
pub struct Machine {
    pub cpu_model: String,
    /// CPU ids from `Cpus_allowed_list` (all of them when it cannot be read).
    pub allowed: Vec<usize>,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, model)| model.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let allowed = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .map(|l| parse_cpu_list(l.trim()))
            })
            .filter(|cpus| !cpus.is_empty())
            .unwrap_or_else(|| (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect());
        Machine { cpu_model, allowed }
    }

    pub fn cores(&self) -> usize {
        self.allowed.len()
    }
}

/// `0-3,6` → `[0, 1, 2, 3, 6]`.
fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.parse::<usize>().ok()),
        }
    }
    cpus
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// Which CPUs the server and the load generator get, or why they share them.
pub enum Pinning {
    Pinned { server: Vec<usize>, generator: Vec<usize> },
    NotPinned { reason: String },
}

impl Pinning {
    /// The server gets the first allowed CPU, the generator the others.
    pub fn plan(machine: &Machine, no_pin: bool, external_server: bool) -> Pinning {
        let reason = if external_server {
            Some("the server was not started by the bench (--addr)".to_string())
        } else if no_pin {
            Some("--no-pin".to_string())
        } else if machine.cores() < 2 {
            Some(format!("only {} CPU available", machine.cores()))
        } else if !taskset_available() {
            Some("taskset not found (util-linux)".to_string())
        } else {
            None
        };
        match reason {
            Some(reason) => Pinning::NotPinned { reason },
            None => Pinning::Pinned {
                server: machine.allowed[..1].to_vec(),
                generator: machine.allowed[1..].to_vec(),
            },
        }
    }

    pub fn server_cpus(&self) -> Option<String> {
        match self {
            Pinning::Pinned { server, .. } => Some(cpu_list(server)),
            Pinning::NotPinned { .. } => None,
        }
    }

    pub fn generator_cpus(&self) -> Option<String> {
        match self {
            Pinning::Pinned { generator, .. } => Some(cpu_list(generator)),
            Pinning::NotPinned { .. } => None,
        }
    }

    /// Pins every thread of this process (`taskset -a -p`); threads started later inherit
    /// it. On failure the plan falls back to "not pinned" with the reason.
    pub fn pin_self(&mut self) {
        let Pinning::Pinned { generator, .. } = self else { return };
        let cpus = cpu_list(generator);
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", &cpus, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match status {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                *self = Pinning::NotPinned {
                    reason: format!("taskset -a -p failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
                }
            }
            Err(e) => *self = Pinning::NotPinned { reason: format!("taskset -a -p failed: {e}") },
        }
    }
}

fn taskset_available() -> bool {
    Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What the bench asks of the server it starts.
pub struct ServerOptions {
    pub binary: PathBuf,
    pub bcrypt_cost: u32,
    pub algorithm: SigningAlgorithm,
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    /// `taskset -c <cpus>` for the child.
    pub cpus: Option<String>,
}

/// How long the tokens of a run live (server and minted ones alike), so that a long run
/// does not see its tokens expire.
pub const TOKEN_TTL: &str = "1h";

/// A temporary data directory with a signing key in it; the server is started later, once
/// tokens have been minted with that key (using every core while the server is not running).
pub struct Prepared {
    pub data_dir: PathBuf,
    pub keys_dir: PathBuf,
    options: ServerOptions,
    /// One pepper and one Redis key prefix for every replica started from this directory:
    /// they share the database and the hot state.
    pepper: String,
    pub redis_prefix: Option<String>,
}

impl Prepared {
    pub fn new(options: ServerOptions) -> anyhow::Result<Prepared> {
        let data_dir =
            std::env::temp_dir().join(format!("portcullis-bench-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
        track_dir(&data_dir);
        let redis_prefix =
            options.redis_url.as_ref().map(|_| format!("bench:{}:", uuid::Uuid::new_v4().simple()));
        let prepared = Prepared {
            keys_dir: data_dir.join("keys"),
            data_dir,
            options,
            pepper: random_pepper()?,
            redis_prefix,
        };
        // Operators generate keys with the binary; so does the bench (any backend).
        let out = cleared(&mut Command::new(&prepared.options.binary))
            .args(["keys", "generate", "--algorithm", &prepared.options.algorithm.to_string(), "--dir"])
            .arg(&prepared.keys_dir)
            .output()
            .with_context(|| format!("cannot run {}", prepared.options.binary.display()))?;
        if !out.status.success() {
            bail!("portcullis keys generate failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(prepared)
    }

    pub fn backend(&self) -> String {
        let db = match &self.options.database_url {
            Some(url) if url.starts_with("postgres") => "PostgreSQL",
            Some(_) => "SQLite (--database-url)",
            None => "embedded SQLite",
        };
        let hot = if self.options.redis_url.is_some() { "Redis" } else { "in-memory" };
        format!("{db} + {hot} hot state")
    }

    pub fn redis_url(&self) -> Option<&str> {
        self.options.redis_url.as_deref()
    }

    pub fn binary(&self) -> &Path {
        &self.options.binary
    }

    /// Starts `portcullis serve` on a free port (pinned when asked).
    pub fn start(self) -> anyhow::Result<LocalServer> {
        let process = self.spawn("server")?;
        Ok(LocalServer { pid: process.pid, addr: process.addr, process, prepared: self })
    }

    /// Starts one more `portcullis serve` with these very settings (database, Redis and key
    /// prefix, keys, pepper) on a port of its own, logging to `<name>.log`: a replica.
    pub fn spawn(&self, name: &str) -> anyhow::Result<ServerProcess> {
        let addr = free_addr()?;
        ServerProcess::spawn(
            &self.options.binary,
            self.options.cpus.as_deref(),
            &["serve"],
            self.env(addr)?,
            addr,
            self.data_dir.join(format!("{name}.log")),
        )
    }

    fn env(&self, addr: SocketAddr) -> anyhow::Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| env.push((format!("PORTCULLIS_{k}"), v));
        set("DATA_DIR", self.data_dir.display().to_string());
        set("SERVER__LISTEN", addr.to_string());
        // Any free port for the ops HTTP server: its default 9090 may be taken.
        set("SERVER__OPS_LISTEN", "127.0.0.1:0".into());
        set("LOG__FILTER", "warn".into());
        set("LOGIN__REQUIRE_VERIFIED_EMAIL", "false".into());
        set("PASSWORD__BCRYPT_COST", self.options.bcrypt_cost.to_string());
        set("PASSWORD__PEPPER", self.pepper.clone());
        set("TOKENS__ACCESS_TTL", TOKEN_TTL.into());
        // The brute-force defences out of the way (as tests/api/harness.rs relax_defences):
        // the bench logs in as fast as it can, and a login storm times out in the bcrypt
        // queue, which counts as failures.
        set("LOGIN__ACCOUNT_LOCKOUT__MAX_FAILURES", "100".into());
        set("LOGIN__KNOWN_DEVICE_LOCKOUT__MAX_FAILURES", "100".into());
        for limit in [
            "LOGIN__IP_BLOCK",
            "LOGIN__CLIENT_THROTTLE",
            "LIMITS__REGISTER_PER_IP",
            "LIMITS__FORGOT_PASSWORD_PER_ACCOUNT",
            "LIMITS__FORGOT_PASSWORD_PER_IP",
            "LIMITS__RESEND_VERIFICATION_PER_ACCOUNT",
            "LIMITS__RESEND_VERIFICATION_PER_IP",
            "LIMITS__VERIFY_MFA_PER_CHALLENGE",
            "LIMITS__NEW_DEVICE_ALERTS_PER_ACCOUNT",
            "LIMITS__LOGIN_CODES_PER_ACCOUNT",
        ] {
            set(&format!("{limit}__LIMIT"), "10000".into());
            set(&format!("{limit}__WINDOW"), "60s".into());
            set(&format!("{limit}__BLOCK"), "0s".into());
        }
        if let Some(url) = &self.options.database_url {
            set("DATABASE_URL", url.clone());
            if self.options.redis_url.is_none() && url.starts_with("postgres") {
                set("ALLOW_MEMORY_HOT_STATE", "true".into());
            }
        }
        if let (Some(url), Some(prefix)) = (&self.options.redis_url, &self.redis_prefix) {
            set("REDIS_URL", url.clone());
            set("REDIS__KEY_PREFIX", prefix.clone());
        }
        Ok(env)
    }
}

/// The command without any inherited `PORTCULLIS_*` variable (nor the config file they name).
pub fn cleared(command: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PORTCULLIS_")) {
        command.env_remove(key);
    }
    command
}

/// 32 random bytes, base64: what production requires with PostgreSQL.
fn random_pepper() -> anyhow::Result<String> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// A free port on the loopback (bound, then released: the child binds it right after).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A `portcullis` child process (a server, a replica, a validator); killed on drop, and on
/// SIGINT/SIGTERM (see [`clean_up_on_signal`]).
pub struct ServerProcess {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    /// Runs `binary args…` with `env` (and no inherited `PORTCULLIS_*`), under `taskset -c
    /// cpus` when given, stderr to `log`.
    pub fn spawn(
        binary: &Path,
        cpus: Option<&str>,
        args: &[&str],
        env: Vec<(String, String)>,
        addr: SocketAddr,
        log: PathBuf,
    ) -> anyhow::Result<ServerProcess> {
        let mut command = pinned_command(binary, cpus);
        cleared(&mut command)
            .args(args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?);
        let child = command.spawn().with_context(|| format!("cannot start {}", binary.display()))?;
        // taskset execs the program: the pid is the program's.
        let pid = child.id();
        track_pid(pid);
        Ok(ServerProcess { child, pid, addr, log })
    }

    /// `Some` once the child has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines the process logged (warnings and errors only).
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        _ = self.child.kill();
        _ = self.child.wait();
        untrack_pid(self.pid);
    }
}

/// `program`, or `taskset -c cpus program` (taskset execs it: same pid).
pub fn pinned_command(program: &Path, cpus: Option<&str>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// The main server; killed, and its data directory removed, on drop (fields drop in
/// order: the process, then the directory).
pub struct LocalServer {
    pub process: ServerProcess,
    pub pid: u32,
    pub addr: SocketAddr,
    pub prepared: Prepared,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // Also when the server never started.
        _ = fs::remove_dir_all(&self.data_dir);
        untrack_dir(&self.data_dir);
        if let (Some(url), Some(prefix)) = (&self.options.redis_url, &self.redis_prefix)
            && let Err(error) = delete_redis_keys(url, prefix)
        {
            eprintln!("portcullis-bench: could not delete the Redis keys {prefix}*: {error:#}");
        }
    }
}

/// Deletes every Redis key under `prefix` (the bench's own random one: no glob character).
pub fn delete_redis_keys(url: &str, prefix: &str) -> anyhow::Result<usize> {
    let mut conn = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(2))?;
    let keys: Vec<String> = {
        let scan = redis::Commands::scan_match::<_, String>(&mut conn, format!("{prefix}*"))?;
        scan.collect::<Result<_, _>>()?
    };
    for chunk in keys.chunks(500) {
        let _: i64 = redis::cmd("DEL").arg(chunk).query(&mut conn)?;
    }
    Ok(keys.len())
}

/// A temporary directory of the bench (configs, logs), removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(what: &str) -> anyhow::Result<ScratchDir> {
        let dir =
            std::env::temp_dir().join(format!("portcullis-bench-{what}-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        track_dir(&dir);
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        _ = fs::remove_dir_all(&self.0);
        untrack_dir(&self.0);
    }
}

/// Child processes and directories of the bench, for [`clean_up_on_signal`].
static CLEANUP: Mutex<(Vec<u32>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

fn cleanup() -> std::sync::MutexGuard<'static, (Vec<u32>, Vec<PathBuf>)> {
    CLEANUP.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn track_pid(pid: u32) {
    cleanup().0.push(pid);
}

pub fn untrack_pid(pid: u32) {
    cleanup().0.retain(|p| *p != pid);
}

pub fn track_dir(dir: &Path) {
    cleanup().1.push(dir.to_path_buf());
}

pub fn untrack_dir(dir: &Path) {
    cleanup().1.retain(|d| d != dir);
}

/// On SIGINT or SIGTERM (which skip destructors), kills every child still running (servers,
/// replicas, validator, Envoy), removes the temporary directories and puts back vCPU halt
/// polling before this process exits: nothing is left behind (but a temporary database: see
/// `--replicas`). The handlers are installed before this returns (on the current tokio
/// runtime); `false` when they could not be.
pub fn clean_up_on_signal() -> bool {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut term)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return false;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
        let (pids, dirs) = cleanup().clone();
        for pid in &pids {
            if let Ok(pid) = libc::pid_t::try_from(*pid) {
                // SAFETY: kill(2) with a pid of our own child; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for dir in &dirs {
            _ = fs::remove_dir_all(dir);
        }
        crate::halt_poll::restore();
        eprintln!("portcullis-bench: interrupted; {} child process(es) stopped", pids.len());
        std::process::exit(130);
    });
    true
}

/// The default server binary: `portcullis` next to this executable.
pub fn default_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this executable")?;
    let bin = me.with_file_name(format!("portcullis{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        bail!(
            "{} not found: build it (cargo build --release --bin portcullis) or pass --server-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, else 100).
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// utime + stime of a whole process (every thread), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    sum_of_stat_fields(pid, &[14, 15])
}

/// Page faults (minor + major) of a whole process.
pub fn page_faults(pid: u32) -> Option<u64> {
    sum_of_stat_fields(pid, &[10, 12])
}

/// The sum of numeric fields of `/proc/<pid>/stat`, numbered as in proc(5) (1 = pid).
fn sum_of_stat_fields(pid: u32, numbers: &[usize]) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it,
    // where field 3 comes first.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    numbers.iter().map(|n| fields.get(n.checked_sub(3)?)?.parse::<u64>().ok()).sum()
}

/// Context switches (voluntary + involuntary) summed over the threads of a process alive
/// now (the process's own `/proc/<pid>/status` counts its first thread only; a thread that
/// has exited is no longer counted).
pub fn context_switches(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else { continue };
        total += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

/// Peak resident set size (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// Resident set size now (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(field))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Busy time (everything but idle and iowait, steal included) of these CPUs, in clock
/// ticks, from `/proc/stat`.
pub fn busy_ticks(cpus: &[usize]) -> Option<u64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let mut busy = 0;
    for line in stat.lines() {
        let Some((name, values)) = line.split_once(' ') else { continue };
        let Some(cpu) = name.strip_prefix("cpu").and_then(|n| n.parse::<usize>().ok()) else { continue };
        if !cpus.contains(&cpu) {
            continue;
        }
        let v: Vec<u64> = values.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        busy += v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum::<u64>();
    }
    Some(busy)
}

/// One reading of both processes' CPU time, and of how busy the machine's CPUs were.
#[derive(Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub server_ticks: Option<u64>,
    pub own_ticks: Option<u64>,
    pub busy_ticks: Option<u64>,
    /// The server's page faults and context switches (diagnostics: allocator churn, wake-ups).
    pub server_faults: Option<u64>,
    pub server_switches: Option<u64>,
}

/// Reads CPU time of the server (when its pid is known), of this process, and of the CPUs
/// they run on.
#[derive(Clone)]
pub struct Probe {
    pub server_pid: Option<u32>,
    /// Processes whose CPU time counts with the server's (the Portcullis behind an Envoy).
    pub extra_pids: Vec<u32>,
    pub ticks_per_second: u64,
    pub cpus: Vec<usize>,
}

impl Probe {
    /// The same probe for another process (a validator, an Envoy) and its helpers.
    pub fn of(&self, pid: u32, extra_pids: Vec<u32>) -> Probe {
        Probe { server_pid: Some(pid), extra_pids, ..self.clone() }
    }

    pub fn sample(&self) -> Sample {
        let extra: u64 = self.extra_pids.iter().filter_map(|&pid| cpu_ticks(pid)).sum();
        Sample {
            at: Instant::now(),
            server_ticks: self.server_pid.and_then(cpu_ticks).map(|t| t + extra),
            own_ticks: cpu_ticks(std::process::id()),
            busy_ticks: busy_ticks(&self.cpus),
            server_faults: self.server_pid.and_then(page_faults),
            server_switches: self.server_pid.and_then(context_switches),
        }
    }

    pub fn ticks_to_duration(&self, ticks: u64) -> Duration {
        Duration::from_secs_f64(ticks as f64 / self.ticks_per_second as f64)
    }

    /// Waits (up to 15 s) until the server has been nearly idle (≤ 10 % of a core) for
    /// 200 ms, so that one scenario's leftovers (a bcrypt queue draining) do not land in the
    /// next one's CPU time.
    pub async fn wait_idle(&self) {
        let Some(pid) = self.server_pid else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        };
        let window = Duration::from_millis(200);
        let allowed = (self.ticks_per_second / 50).max(1); // 10 % of 200 ms
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let before = cpu_ticks(pid);
            tokio::time::sleep(window).await;
            match (before, cpu_ticks(pid)) {
                (Some(a), Some(b)) if b.saturating_sub(a) <= allowed => return,
                (None, _) | (_, None) => return,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-1"), vec![0, 1]);
        assert_eq!(parse_cpu_list("0,2-4, 7"), vec![0, 2, 3, 4, 7]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
    }

    #[test]
    fn own_cpu_time_and_rss_are_readable() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(page_faults(std::process::id()).is_some_and(|f| f > 0));
        assert!(context_switches(std::process::id()).is_some());
        assert!(peak_rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }
}
