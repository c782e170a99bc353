//! `portcullis-bench`: what each call costs the server, in one run.
//!
//! Starts `portcullis serve` (the binary next to this one) on a temporary data directory
//! and a free port — pinned to one CPU, the bench itself to the others — or targets
//! `--addr`; sets up accounts, sessions and tokens; then, per scenario, warms up and
//! measures a closed-loop load for `--duration`: requests/s, latency percentiles, and the
//! server's CPU time per request (utime + stime from `/proc/<pid>/stat` over the window,
//! divided by the requests answered). On a 2-core machine the load generator saturates
//! before the server, so CPU per request, and its ratio to Health/Check on the same
//! server, is the figure to compare. Last, the raw in-process cost of verifying one token
//! per algorithm. See README.md, "Benchmarks".

mod envoy;
mod halt_poll;
mod load;
mod noop_authz;
mod replicas;
mod report;
mod server;
mod setup;
mod sidecar;
mod verify;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use portcullis::token::SigningAlgorithm;
use tonic::transport::Channel;

use crate::{
    envoy::{Envoy, EnvoyRun, EnvoySummary},
    load::{Expect, RefreshChains, Storm, TokenFeed, Workload, run_phase},
    replicas::ReplicaOptions,
    report::{MachineInfo, Report, Row, RunInfo, StormSummary},
    server::{LocalServer, Machine, Pinning, Prepared, Probe, ScratchDir, ServerOptions},
    setup::Account,
    sidecar::ValidatorSummary,
    verify::Minter,
};

/// Scenario keys, in the order they run (`--only` takes these, or a prefix before a `-`:
/// `validate` selects every `validate-*`).
const SCENARIOS: &[&str] = &[
    "health",
    "validate-hot",
    "ext-authz",
    "validate-rotating",
    "validate-revoked",
    "validate-cold",
    "refresh",
    "login",
    "storm",
    "validator",
    "envoy",
    "revocation-replicas",
    "verify",
    "revocation-lookup",
];

/// Scenarios that need no server of the bench's (in process, or servers of their own).
const WITHOUT_MAIN_SERVER: &[&str] = &["revocation-replicas", "verify", "revocation-lookup"];

#[derive(Debug, Parser)]
#[command(
    name = "portcullis-bench",
    version,
    about = "Benchmarks a Portcullis server: requests/s, latency percentiles and server CPU per request, \
             per scenario, against the gRPC Health/Check baseline"
)]
struct Args {
    /// Measured window of each scenario (e.g. 5s, 300ms).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    duration: Duration,
    /// Warm-up before each measured window [default: duration / 5, at most 1s].
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// Concurrent calls (closed loop: each worker waits for its answer).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// gRPC connections (tonic Channels) the workers are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Concurrent calls of the Login scenario (bcrypt-bound: more only queue).
    #[arg(long, default_value_t = 4)]
    login_concurrency: usize,
    /// Concurrent refresh-token chains of the Refresh scenario (one session each).
    #[arg(long, default_value_t = 8)]
    refresh_concurrency: usize,
    /// Login calls looping in the background of the login-storm scenario.
    #[arg(long, default_value_t = 64)]
    storm_logins: usize,
    /// Distinct live tokens of the rotating scenario.
    #[arg(long, default_value_t = 10_000)]
    rotation_tokens: usize,
    /// Never-seen tokens minted for the cold scenario; its window ends early when they
    /// run out.
    #[arg(long, default_value_t = 20_000)]
    cold_tokens: usize,
    /// Sessions logged in, refreshed and logged out for the revoked scenario.
    #[arg(long, default_value_t = 8)]
    revoked_sessions: usize,
    /// Access tokens per revoked session (one from Login, the rest from Refresh).
    #[arg(long, default_value_t = 32)]
    tokens_per_revoked_session: usize,
    /// bcrypt cost of the server started by the bench (12 is the production default).
    #[arg(long, default_value_t = 12)]
    bcrypt_cost: u32,
    /// Algorithm of the signing key generated for the server.
    #[arg(long, value_enum, default_value_t = SigningAlgorithm::RS256)]
    algorithm: SigningAlgorithm,
    /// PostgreSQL for the server started by the bench (PORTCULLIS_DATABASE_URL) instead of
    /// the embedded SQLite.
    #[arg(long)]
    database_url: Option<String>,
    /// Redis for the server started by the bench (PORTCULLIS_REDIS_URL); a random key prefix
    /// is used.
    #[arg(long)]
    redis_url: Option<String>,
    /// The server binary [default: portcullis next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Benchmark a running server instead (it needs login.require_verified_email = false
    /// and relaxed brute-force limits).
    #[arg(long, conflicts_with_all = ["database_url", "redis_url", "server_bin"])]
    addr: Option<SocketAddr>,
    /// With --addr: the server's process id, for CPU per request and peak RSS.
    #[arg(long, requires = "addr")]
    server_pid: Option<u32>,
    /// With --addr: the server's keys directory, to mint tokens for the rotating and cold
    /// scenarios (skipped without it).
    #[arg(long, requires = "addr")]
    keys_dir: Option<PathBuf>,
    /// Only these scenarios, comma-separated: health, validate (all of validate-hot,
    /// validate-rotating, validate-cold, validate-revoked), ext-authz, refresh, login, storm,
    /// validator, envoy, revocation-replicas, verify, revocation-lookup (revocation: both).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run revocation-replicas (two servers sharing PostgreSQL and Redis) even without
    /// --database-url and --redis-url: on a temporary database created on --pg-admin-url and
    /// dropped after, with the Redis of --redis-url or --replica-redis-url.
    #[arg(long)]
    replicas: bool,
    /// PostgreSQL server on which --replicas creates (and drops) its temporary database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg_admin_url: String,
    /// Redis of the replicas when --redis-url is not given (a random key prefix, deleted after).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    replica_redis_url: String,
    /// Sessions revoked one by one in revocation-replicas (Logout on A, refusal seen on B).
    #[arg(long, default_value_t = 200)]
    revocations: usize,
    /// How often replica B is asked, after each Logout on A, until it refuses the token.
    #[arg(long, value_parser = parse_duration, default_value = "500us")]
    revocation_poll: Duration,
    /// The envoy binary of the envoy scenario [default: $PORTCULLIS_TOOLS_DIR/bin/envoy, or
    /// ~/.cache/portcullis/tools/bin/envoy; the scenario is skipped when it is not there].
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// Skip the envoy scenario even when the envoy binary is there.
    #[arg(long, conflicts_with = "envoy")]
    no_envoy: bool,
    /// Keep-alive HTTP/1.1 connections of the envoy scenario (one request in flight each).
    #[arg(long, default_value_t = 4)]
    envoy_connections: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Do not pin the server and the bench to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// On a KVM guest whose idle vCPUs halt at once (cpuidle-haltpoll with
    /// guest_halt_poll_ns = 0), let them poll this long first (e.g. 200us, the kernel's
    /// default), for the run only (root; restored after): otherwise the server pays a VM exit
    /// per answer to an idle load generator (README, "Benchmarks").
    #[arg(long, value_parser = parse_duration)]
    guest_halt_poll: Option<Duration>,
    /// Internal: serve the envoy scenario's do-nothing ext_authz server on ADDR and nothing else.
    #[arg(long, hide = true)]
    serve_noop_authz: Option<SocketAddr>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn matches(filter: &str, key: &str) -> bool {
    key == filter || key.strip_prefix(filter).is_some_and(|rest| rest.starts_with('-'))
}

impl Args {
    fn selected(&self, key: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| matches(f, key))
    }

    fn check(&self) -> anyhow::Result<()> {
        if let Some(unknown) = self.only.iter().find(|f| !SCENARIOS.iter().any(|k| matches(f, k))) {
            bail!("--only {unknown}: no such scenario (scenarios: {})", SCENARIOS.join(", "));
        }
        for (name, value) in [
            ("--concurrency", self.concurrency),
            ("--connections", self.connections),
            ("--login-concurrency", self.login_concurrency),
            ("--refresh-concurrency", self.refresh_concurrency),
            ("--storm-logins", self.storm_logins),
            ("--rotation-tokens", self.rotation_tokens),
            ("--cold-tokens", self.cold_tokens),
            ("--revoked-sessions", self.revoked_sessions),
            ("--tokens-per-revoked-session", self.tokens_per_revoked_session),
            ("--revocations", self.revocations),
            ("--envoy-connections", self.envoy_connections),
        ] {
            if value == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.duration.is_zero() {
            bail!("--duration must not be zero");
        }
        Ok(())
    }

    fn warmup(&self) -> Duration {
        self.warmup.unwrap_or_else(|| (self.duration / 5).min(Duration::from_secs(1)))
    }

    fn grpc_selected(&self) -> bool {
        SCENARIOS.iter().filter(|k| !WITHOUT_MAIN_SERVER.contains(k)).any(|k| self.selected(k))
    }

    /// Named in --only (not merely selected by default).
    fn asked_for(&self, key: &str) -> bool {
        self.only.iter().any(|f| matches(f, key))
    }

    /// revocation-replicas runs with --replicas, when named in --only, or by default when the
    /// server runs on PostgreSQL and Redis anyway.
    fn replicas_enabled(&self) -> bool {
        let backed = self.database_url.as_deref().is_some_and(|u| u.starts_with("postgres"))
            && self.redis_url.is_some();
        self.selected("revocation-replicas")
            && (self.replicas || self.asked_for("revocation-replicas") || backed)
    }

    /// The envoy binary, when the envoy scenario runs.
    fn envoy_binary(&self) -> anyhow::Result<Option<PathBuf>> {
        if !self.selected("envoy") || self.no_envoy {
            return Ok(None);
        }
        match &self.envoy {
            Some(path) if path.exists() => Ok(Some(path.clone())),
            Some(path) => bail!("--envoy {}: no such file", path.display()),
            None => {
                let path = envoy::default_binary();
                if path.exists() {
                    Ok(Some(path))
                } else if self.asked_for("envoy") {
                    bail!("envoy not found at {} (scripts/install-test-tools.sh, or --envoy)", path.display())
                } else {
                    Ok(None)
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(addr) = args.serve_noop_authz {
        return match noop_authz::serve(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("portcullis-bench --serve-noop-authz: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("portcullis-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn progress(what: &str) {
    eprintln!("portcullis-bench: {what}");
}

fn run(args: &Args) -> anyhow::Result<()> {
    args.check()?;
    let machine = Machine::detect();
    let mut pinning = Pinning::plan(&machine, args.no_pin, args.addr.is_some());
    let mut notes = Vec::new();

    // The key first, then the tokens minted with it, on every core while nothing else runs.
    let mut prepared = None;
    let mut keys_dir = args.keys_dir.clone();
    if args.grpc_selected() && args.addr.is_none() {
        let binary = match &args.server_bin {
            Some(bin) => bin.clone(),
            None => server::default_binary()?,
        };
        let p = Prepared::new(ServerOptions {
            binary,
            bcrypt_cost: args.bcrypt_cost,
            algorithm: args.algorithm,
            database_url: args.database_url.clone(),
            redis_url: args.redis_url.clone(),
            cpus: pinning.server_cpus(),
        })?;
        keys_dir = Some(p.keys_dir.clone());
        prepared = Some(p);
    }
    let minter = keys_dir.as_deref().map(Minter::load).transpose()?;
    let mut mint = |key: &str, n: usize| -> anyhow::Result<Option<Arc<Vec<String>>>> {
        if !args.selected(key) {
            return Ok(None);
        }
        let Some(minter) = &minter else {
            notes.push(format!("{key} skipped: it needs --keys-dir with --addr, to mint tokens"));
            return Ok(None);
        };
        let started = Instant::now();
        let tokens = minter.mint(n, machine.cores())?;
        progress(&format!("minted {n} {} tokens for {key} in {:.1?}", minter.algorithm(), started.elapsed()));
        Ok(Some(Arc::new(tokens)))
    };
    let rotation = mint("validate-rotating", args.rotation_tokens)?;
    // One more than asked: the last one checks the key with the server, unmeasured.
    let cold = mint("validate-cold", args.cold_tokens + 1)?;

    let envoy_binary = args.envoy_binary()?;
    if args.selected("envoy") && envoy_binary.is_none() && !args.no_envoy {
        notes.push(format!(
            "envoy skipped: no envoy at {} (scripts/install-test-tools.sh installs it; or --envoy)",
            envoy::default_binary().display()
        ));
    }
    if args.selected("revocation-replicas") && !args.replicas_enabled() {
        notes.push(
            "revocation-replicas skipped: it needs PostgreSQL and Redis (--database-url and --redis-url, \
             or --replicas for a temporary database)"
                .into(),
        );
    }

    let backend = prepared.as_ref().map(Prepared::backend);
    let mut local: Option<LocalServer> = prepared.map(Prepared::start).transpose()?;
    let server_pid = local.as_ref().map(|s| s.pid).or(args.server_pid);
    if args.database_url.is_some() || args.redis_url.is_some() {
        notes.push(
            "server CPU/request counts the portcullis process only: PostgreSQL's and Redis' work is \
             not in it (on this machine, it shows under \"other\")"
                .into(),
        );
    }
    if args.addr.is_some() && args.server_pid.is_none() {
        notes.push("no --server-pid: server CPU and RSS not measured".into());
    }
    pinning.pin_self();
    let threads = match &pinning {
        Pinning::Pinned { generator, .. } => generator.len(),
        Pinning::NotPinned { .. } => machine.cores(),
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
    let handled = {
        let _guard = runtime.enter();
        server::clean_up_on_signal()
    };
    if !handled {
        notes.push("cannot handle SIGINT/SIGTERM: an interrupted run leaves its processes behind".into());
    }
    // Changed only now that SIGINT/SIGTERM put it back (and the end of this function).
    let _restore_halt_poll = halt_poll::RestoreOnDrop;
    let halt_polling = match args.guest_halt_poll {
        Some(_) if !handled => bail!("--guest-halt-poll: no signal handler to put the setting back"),
        Some(poll) => {
            let set = halt_poll::set(poll)?;
            if set.is_none() {
                notes.push(
                    "--guest-halt-poll ignored: this machine does not idle through cpuidle-haltpoll".into(),
                );
            }
            set
        }
        None => halt_poll::current().map(|ns| halt_poll::HaltPolling { poll_ns: ns, original_ns: None }),
    };
    let probe = Probe {
        server_pid,
        extra_pids: Vec::new(),
        ticks_per_second: server::clock_ticks(),
        cpus: machine.allowed.clone(),
    };
    // What the validator and Envoy scenarios start next to the server.
    let helper_binary = match (&local, &args.server_bin) {
        (Some(server), _) => Some(server.prepared.binary().to_path_buf()),
        (None, Some(bin)) => Some(bin.clone()),
        (None, None) => server::default_binary().ok(),
    };
    let extras = Extras {
        binary: helper_binary.clone(),
        cpus: pinning.server_cpus(),
        redis: local
            .as_ref()
            .and_then(|s| Some((s.prepared.redis_url()?.to_string(), s.prepared.redis_prefix.clone()?))),
        envoy: envoy_binary,
    };

    let mut rows = Vec::new();
    let mut storm = None;
    let mut revoked_count = 0;
    let mut validator = None;
    let mut envoy_summary = None;
    let mut cold_verify = None;
    let mut failures = Vec::new();
    if args.grpc_selected() {
        let addr = local.as_ref().map(|s| s.addr).or(args.addr).context("no server address")?;
        let mut bench = Bench {
            args,
            probe: probe.clone(),
            channels: Vec::new(),
            rows: Vec::new(),
            extras,
            validator: None,
            envoy: None,
            failures: Vec::new(),
            notes: Vec::new(),
            cold_verify: None,
        };
        let outcome = runtime.block_on(bench.run_all(addr, local.as_mut(), rotation, cold, minter.as_ref()));
        let (storm_summary, revoked) = outcome?;
        rows = bench.rows;
        storm = storm_summary;
        revoked_count = revoked;
        validator = bench.validator;
        envoy_summary = bench.envoy;
        failures = bench.failures;
        notes.extend(bench.notes);
        cold_verify = bench.cold_verify;
    }
    let peak_rss = server_pid.and_then(server::peak_rss_kib);
    drop(local);

    // Servers of its own, once the main one is gone.
    let mut replicas = None;
    if args.replicas_enabled() {
        let options = ReplicaOptions {
            binary: helper_binary.context("no portcullis binary for the replicas (--server-bin)")?,
            algorithm: args.algorithm,
            database_url: args.database_url.clone().filter(|u| u.starts_with("postgres")),
            admin_url: args.pg_admin_url.clone(),
            redis_url: args.redis_url.clone().unwrap_or_else(|| args.replica_redis_url.clone()),
            cpus: pinning.server_cpus(),
            revocations: args.revocations,
            poll: args.revocation_poll,
            give_up: Duration::from_secs(5),
        };
        progress("revocation across two replicas");
        match runtime.block_on(replicas::run(options)) {
            Ok(summary) => replicas = Some(summary),
            Err(error) => failures.push(format!("revocation-replicas: {error:#}")),
        }
    }
    // The rest runs in this thread alone, and without the signal handler of the runtime.
    halt_poll::restore();
    drop(runtime);

    let mut in_process = Vec::new();
    let mut cached = None;
    if args.selected("verify") {
        progress("in-process verification");
        let alg = minter.as_ref().map_or(args.algorithm, Minter::algorithm);
        let (costs, hit) = verify::measure(args.duration / 2, alg)?;
        in_process = costs;
        cached = Some(hit);
    }
    let mut lookup = None;
    if args.selected("revocation-lookup") {
        progress("in-process revocation lookup");
        lookup = Some(verify::revocation_lookup(args.duration / 2)?);
    }

    notes.extend(legend(args, &rows, revoked_count, probe.ticks_per_second));
    let mut report = Report {
        machine: MachineInfo {
            cores: machine.cores(),
            cpu_model: machine.cpu_model.clone(),
            pinned: matches!(pinning, Pinning::Pinned { .. }),
            server_cpus: pinning.server_cpus(),
            generator_cpus: pinning.generator_cpus(),
            pinning_note: match &pinning {
                Pinning::Pinned { .. } => "server: taskset -c; bench: taskset -a -p".into(),
                Pinning::NotPinned { reason } => reason.clone(),
            },
            clock_ticks_per_second: probe.ticks_per_second,
            halt_polling,
        },
        run: RunInfo {
            server: backend.map_or_else(
                || args.addr.map_or("none".into(), |a| format!("external server at {a}")),
                |b| format!("portcullis serve, {b}"),
            ),
            algorithm: minter.as_ref().map_or("unknown".into(), |m| m.algorithm().to_string()),
            bcrypt_cost: args.addr.is_none().then_some(args.bcrypt_cost),
            duration_ms: args.duration.as_millis(),
            warmup_ms: args.warmup().as_millis(),
            concurrency: args.concurrency,
            connections: args.connections,
            login_concurrency: args.login_concurrency,
            refresh_concurrency: args.refresh_concurrency,
            rotation_tokens: args.rotation_tokens,
            cold_tokens: args.cold_tokens,
            revoked_tokens: revoked_count,
        },
        scenarios: rows,
        login_storm: storm,
        ext_authz: None,
        validator,
        envoy: envoy_summary,
        revocation_replicas: replicas,
        in_process,
        in_process_cached_hit: cached,
        cold_verify,
        revocation_lookup: lookup,
        server_peak_rss_kib: peak_rss,
        targets: Vec::new(),
        failures: failures.clone(),
        notes,
    };
    report.compare();
    print!("{}", report.render());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !failures.is_empty() {
        bail!("{} scenario(s) failed: {}", failures.len(), failures.join("; "));
    }
    Ok(())
}

/// What the validator and Envoy scenarios need besides the server.
struct Extras {
    /// The portcullis binary (for `serve --mode validator`).
    binary: Option<PathBuf>,
    /// The server's CPUs, to pin the validator and Envoy with it.
    cpus: Option<String>,
    /// The server's Redis URL and key prefix.
    redis: Option<(String, String)>,
    envoy: Option<PathBuf>,
}

/// What each scenario that ran did, and how the figures are made.
fn legend(args: &Args, rows: &[Row], revoked: usize, ticks: u64) -> Vec<String> {
    let ran = |key: &str| rows.iter().any(|r| r.key == key);
    let mut lines = vec!["scenarios:".to_string()];
    let mut say = |key: &str, text: String| {
        if ran(key) {
            lines.push(format!("  {text}"));
        }
    };
    say(
        "health",
        "Health/Check: grpc.health.v1.Health/Check on the same server: the framework baseline".into(),
    );
    say(
        "validate-hot",
        "ValidateToken hot: one real token (from Login) on every call: verified-claims cache hit + \
         revocation lookup"
            .into(),
    );
    say(
        "ext-authz",
        "ext_authz Check hot: envoy.service.auth.v3.Authorization/Check of a request carrying the hot \
         token (authorization: Bearer), on the server: the same decision as ValidateToken"
            .into(),
    );
    say(
        "validate-rotating",
        format!(
            "ValidateToken rotating: {} distinct live tokens round-robin (minted in process with the \
             server's key; a priming pass verified each once)",
            args.rotation_tokens
        ),
    );
    say(
        "validate-revoked",
        format!(
            "ValidateToken revoked: {revoked} real tokens of {} logged-out sessions, round-robin \
             (answer: SESSION_REVOKED)",
            args.revoked_sessions
        ),
    );
    say(
        "validate-cold",
        format!(
            "ValidateToken cold: a token never seen on every call ({} minted over 1000 sessions, as \
             refreshes make them): full signature verification each time",
            args.cold_tokens
        ),
    );
    say(
        "refresh",
        format!("Refresh: {} sessions, each rotating its own refresh token", args.refresh_concurrency),
    );
    say(
        "login",
        format!(
            "Login: bcrypt cost {}, {} concurrent (the server hashes one password per core at a time)",
            args.bcrypt_cost, args.login_concurrency
        ),
    );
    say(
        "storm",
        format!(
            "ValidateToken storm: ValidateToken hot while {} Login calls of another account loop in \
             the background on a connection of their own",
            args.storm_logins
        ),
    );
    say(
        "validator",
        "ValidateToken validator: ValidateToken hot on `portcullis serve --mode validator` (the \
         sidecar, pinned with the server); its CPU/request is the validator process's"
            .into(),
    );
    say(
        "envoy-ext-authz",
        format!(
            "Envoy+ext_authz GET / Envoy+jwt_authn GET: HTTP/1.1 keep-alive GETs with the hot token, \
             {} connections closed loop, then one (the \"(1 connection)\" rows: no queueing), through Envoy \
             (examples/envoy/envoy.yaml asking this server or a do-nothing authorizer; \
             examples/envoy/jwt_authn.yaml checking the token itself) to an upstream in the bench; \
             srv CPU is Envoy's (plus the authorizer's for ext_authz)",
            args.envoy_connections
        ),
    );
    lines.push(format!(
        "server CPU/request: utime+stime of the server process (all threads) from /proc/<pid>/stat \
         ({ticks} ticks/s) over the measured window, divided by the successful calls"
    ));
    lines.push(format!(
        "latency: per successful call, send to answer, closed loop ({} workers on {} connections, each \
         waiting for its answer; Login {}, Refresh {}): nearest-rank percentiles of every call",
        args.concurrency, args.connections, args.login_concurrency, args.refresh_concurrency
    ));
    lines
}

/// Through Envoy: no token is refused (401), the token is let through (200).
async fn expect_statuses(proxy: &Envoy, token: &str, what: &str) -> anyhow::Result<()> {
    let without = envoy::status_of(proxy.listener, None).await?;
    let with = envoy::status_of(proxy.listener, Some(token)).await?;
    if without != 401 || with != 200 {
        bail!(
            "Envoy with {what} answered {without} without a token (expected 401) and {with} with one \
             (expected 200); its log:\n{}",
            proxy.log_tail()
        );
    }
    Ok(())
}

/// Waits until `addr` accepts TCP connections (10 s at most), or the process exits.
async fn wait_for_port(addr: SocketAddr, process: &mut server::ServerProcess) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = process.exited() {
            bail!("the no-op authorizer exited with {status}: {}", process.log_tail());
        }
        if std::time::Instant::now() > deadline {
            bail!("the no-op authorizer did not listen on {addr} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The gRPC scenarios against one server.
struct Bench<'a> {
    args: &'a Args,
    probe: Probe,
    channels: Vec<Channel>,
    rows: Vec<Row>,
    extras: Extras,
    validator: Option<ValidatorSummary>,
    envoy: Option<EnvoySummary>,
    /// Scenarios that could not run: printed with the report, then the bench fails.
    failures: Vec<String>,
    notes: Vec<String>,
    /// The raw verify measured right after the cold window (the cold target's divisor).
    cold_verify: Option<verify::RawVerify>,
}

impl Bench<'_> {
    /// Returns the storm summary and the number of revoked tokens used.
    async fn run_all(
        &mut self,
        addr: SocketAddr,
        local: Option<&mut LocalServer>,
        rotation: Option<Arc<Vec<String>>>,
        cold: Option<Arc<Vec<String>>>,
        minter: Option<&Minter>,
    ) -> anyhow::Result<(Option<StormSummary>, usize)> {
        let args = self.args;
        progress(&format!("waiting for the server at {addr} to be SERVING"));
        setup::wait_serving(addr, local.map(|l| &mut l.process), Duration::from_secs(60)).await?;
        self.channels = load::connect(addr, args.connections).await?;
        let ch = self.channels[0].clone();

        progress("setting up accounts, sessions and tokens");
        let account = Account::register(&ch, "main").await?;
        let (hot_token, _) = account.login(&ch).await?;
        setup::expect_valid(&ch, &hot_token, "the token of a fresh Login").await?;
        let hot = Arc::new(vec![hot_token]);
        if let Some(rotation) = &rotation {
            setup::expect_valid(&ch, &rotation[0], "a token minted with its key").await?;
        }
        let cold = match cold {
            Some(cold) => {
                let mut cold = Arc::try_unwrap(cold).unwrap_or_else(|shared| (*shared).clone());
                let probe_token = cold.pop().context("no cold tokens")?;
                setup::expect_valid(&ch, &probe_token, "a token minted with its key").await?;
                Some(Arc::new(cold))
            }
            None => None,
        };
        let mut revoked = None;
        if args.selected("validate-revoked") {
            let tokens =
                setup::revoked_tokens(&ch, &account, args.revoked_sessions, args.tokens_per_revoked_session)
                    .await?;
            setup::expect_revoked(&ch, &tokens[tokens.len() - 1]).await?;
            revoked = Some(Arc::new(tokens));
        }
        let mut chains = None;
        if args.selected("refresh") {
            let sessions = account.sessions(&ch, args.refresh_concurrency).await?;
            chains = Some(RefreshChains::new(sessions.into_iter().map(|(_, refresh)| refresh).collect()));
        }
        let mut storm_setup = None;
        if args.selected("storm") {
            let storm_account = Account::register(&ch, "storm").await?;
            // Its first login makes the device known: the storm sends no alert mail.
            storm_account.login(&ch).await?;
            let storm_channel = load::connect(addr, 1).await?.remove(0);
            storm_setup = Some((storm_account, storm_channel));
        }

        let validate = |feed: TokenFeed, expect| Arc::new(Workload::Validate(feed, expect));
        let n = args.concurrency;
        if args.selected("health") {
            let health = Arc::new(Workload::Health);
            self.scenario("health", "Health/Check", n, None, &health, &health).await;
        }
        if args.selected("validate-hot") {
            let w = validate(TokenFeed::cycle(hot.clone()), Expect::Valid);
            self.scenario("validate-hot", "ValidateToken hot", n, None, &w, &w).await;
        }
        if args.selected("ext-authz") {
            let w = Arc::new(Workload::Check(Box::new(load::check_request(&hot[0]))));
            self.scenario("ext-authz", "ext_authz Check hot", n, None, &w, &w).await;
        }
        if let Some(tokens) = rotation {
            let prime = validate(TokenFeed::once(tokens.clone()), Expect::Valid);
            let w = validate(TokenFeed::cycle(tokens), Expect::Valid);
            self.scenario("validate-rotating", "ValidateToken rotating", n, Some(prime), &w, &w).await;
        }
        let revoked_count = revoked.as_ref().map_or(0, |r| r.len());
        if let Some(tokens) = revoked {
            let prime = validate(TokenFeed::once(tokens.clone()), Expect::Revoked);
            let w = validate(TokenFeed::cycle(tokens), Expect::Revoked);
            self.scenario("validate-revoked", "ValidateToken revoked", n, Some(prime), &w, &w).await;
        }
        // Cold runs after the other ValidateToken scenarios: it fills the verified-claims
        // cache with tokens never seen again, which changes what comes after it.
        if let Some(tokens) = cold {
            let warm = validate(TokenFeed::cycle(hot.clone()), Expect::Valid);
            let measured = validate(TokenFeed::once(tokens.clone()), Expect::Valid);
            self.scenario("validate-cold", "ValidateToken cold", n, None, &warm, &measured).await;
            let row = self.rows.last_mut().expect("just measured");
            if row.seconds < args.duration.as_secs_f64() * 0.95 {
                row.note = Some(format!(
                    "window = its {} never-seen tokens, each used once: {:.2}s (--cold-tokens for longer)",
                    tokens.len(),
                    row.seconds
                ));
            }
            // The cold target's baseline, measured right after the cold window: the machine's
            // speed drifts over a run (Health at the start and the raw verify at the end
            // moved the ratio by ±0.05 in otherwise quiet runs).
            if args.selected("health")
                && let Some(minter) = minter
            {
                let health = Arc::new(Workload::Health);
                let (key, name) = (report::HEALTH_AFTER_COLD, "Health/Check (after cold)");
                self.scenario(key, name, n, None, &health, &health).await;
                progress("raw verify, right after the cold window");
                let budget = (args.duration / 5).max(Duration::from_millis(100));
                self.cold_verify = Some(tokio::task::block_in_place(|| minter.raw_verify(budget))?);
            }
        }
        if let Some(chains) = chains {
            let k = chains.len();
            let w = Arc::new(Workload::Refresh(chains, setup::client_context()));
            self.scenario("refresh", "Refresh", k, None, &w, &w).await;
        }
        if args.selected("login") {
            let w = Arc::new(Workload::Login(account.login_request()));
            self.scenario("login", "Login", args.login_concurrency, None, &w, &w).await;
        }
        let mut storm_summary = None;
        if let Some((storm_account, storm_channel)) = storm_setup {
            let w = validate(TokenFeed::cycle(hot.clone()), Expect::Valid);
            storm_summary = Some(self.storm(&storm_account, &storm_channel, &w).await);
        }
        if args.selected("validator") {
            match self.validator(addr, &ch, &hot).await {
                Ok(summary) => self.validator = Some(summary),
                Err(error) => self.failures.push(format!("validator: {error:#}")),
            }
        }
        if let Some(binary) = self.extras.envoy.clone() {
            match self.envoy(&binary, addr, &ch, &hot[0]).await {
                Ok(summary) => self.envoy = Some(summary),
                Err(error) => self.failures.push(format!("envoy: {error:#}")),
            }
        }
        Ok((storm_summary, revoked_count))
    }

    /// `portcullis serve --mode validator` next to the server: start-up time, idle RSS, and
    /// ValidateToken hot on it (a row of its own, CPU of the validator process).
    async fn validator(
        &mut self,
        server: SocketAddr,
        channel: &Channel,
        hot: &Arc<Vec<String>>,
    ) -> anyhow::Result<ValidatorSummary> {
        let binary = self.extras.binary.clone().context("no portcullis binary for the validator")?;
        let dir = ScratchDir::new("validator")?;
        let jwks = setup::jwks(channel).await?;
        let source = match &self.extras.redis {
            Some((url, prefix)) => sidecar::Source::Central {
                url: format!("http://{server}"),
                redis_url: url,
                redis_prefix: prefix,
            },
            None => sidecar::Source::File { jwks_json: &jwks },
        };
        self.probe.wait_idle().await;
        progress("validator: start-up, idle RSS");
        let sidecar = sidecar::start(&binary, self.extras.cpus.as_deref(), source, &dir.0).await?;
        let channels = load::connect(sidecar.process.addr, self.args.connections).await?;
        setup::expect_valid(&channels[0], &hot[0], "the server's token on the validator").await?;
        let probe = self.probe.of(sidecar.process.pid, Vec::new());
        let w = Arc::new(Workload::Validate(TokenFeed::cycle(hot.clone()), Expect::Valid));
        let n = self.args.concurrency;
        self.measure("validator", "ValidateToken validator", n, None, &w, &w, &channels, &probe).await;
        let peak_rss_kib = server::peak_rss_kib(sidecar.process.pid);
        drop(channels);
        drop(sidecar.process);
        Ok(ValidatorSummary {
            setup: sidecar.setup,
            startup_ms: sidecar.startup.as_secs_f64() * 1e3,
            idle_rss_kib: sidecar.idle_rss_kib,
            peak_rss_kib,
            ..ValidatorSummary::default()
        })
    }

    /// The same upstream behind Envoy + ext_authz (this server) and behind Envoy + jwt_authn.
    async fn envoy(
        &mut self,
        binary: &std::path::Path,
        server: SocketAddr,
        channel: &Channel,
        token: &str,
    ) -> anyhow::Result<EnvoySummary> {
        let dir = ScratchDir::new("envoy")?;
        let cpus = self.extras.cpus.clone();
        let upstream = envoy::upstream().await?;
        let portcullis_pid = self.probe.server_pid;

        let k = self.args.envoy_connections;
        // Each set-up under the configured load, then (unless that is 1 already) one
        // connection: latency with no queueing.
        let single = k > 1;
        let config = envoy::render_ext_authz(server.port(), upstream.port)?;
        let proxy = Envoy::start(binary, cpus.as_deref(), &config, &dir.0, "ext_authz").await?;
        expect_statuses(&proxy, token, "ext_authz").await?;
        let ext_authz = self
            .envoy_phase("envoy-ext-authz", "Envoy+ext_authz GET", &proxy, portcullis_pid, token, k)
            .await;
        let ext_authz_1 = match single {
            true => Some(
                self.envoy_phase("envoy-ext-authz-1", "  (1 connection)", &proxy, portcullis_pid, token, 1)
                    .await,
            ),
            false => None,
        };
        drop(proxy);

        // The floor: the same Envoy config asking an authorizer that decides nothing.
        let noop_addr = server::free_addr()?;
        let mut noop = server::ServerProcess::spawn(
            &std::env::current_exe()?,
            cpus.as_deref(),
            &["--serve-noop-authz", &noop_addr.to_string()],
            Vec::new(),
            noop_addr,
            dir.0.join("noop-authz.log"),
        )?;
        wait_for_port(noop_addr, &mut noop).await?;
        let config = envoy::render_ext_authz(noop_addr.port(), upstream.port)?;
        let proxy = Envoy::start(binary, cpus.as_deref(), &config, &dir.0, "ext_authz_noop").await?;
        expect_statuses(&proxy, token, "ext_authz (no-op authorizer)").await?;
        let (name, pid) = ("Envoy+ext_authz(no-op) GET", Some(noop.pid));
        let noop_run = self.envoy_phase("envoy-ext-authz-noop", name, &proxy, pid, token, k).await;
        let noop_1 = match single {
            true => Some(
                self.envoy_phase("envoy-ext-authz-noop-1", "  (1 connection)", &proxy, pid, token, 1).await,
            ),
            false => None,
        };
        drop(proxy);
        drop(noop);

        let jwks = setup::jwks(channel).await?;
        let tokens = portcullis::config::TokenSettings::default();
        let config = envoy::render_jwt_authn(upstream.port, &jwks, &tokens.issuer, &tokens.audience)?;
        let proxy = Envoy::start(binary, cpus.as_deref(), &config, &dir.0, "jwt_authn").await?;
        expect_statuses(&proxy, token, "jwt_authn").await?;
        let jwt_authn =
            self.envoy_phase("envoy-jwt-authn", "Envoy+jwt_authn GET", &proxy, None, token, k).await;
        let jwt_authn_1 = match single {
            true => {
                Some(self.envoy_phase("envoy-jwt-authn-1", "  (1 connection)", &proxy, None, token, 1).await)
            }
            false => None,
        };
        drop(proxy);

        let pinning = match &cpus {
            Some(cpus) => {
                format!("Envoy (--concurrency 1) pinned with the server on CPU {cpus} (taskset -c)")
            }
            None => "Envoy not pinned (shares the CPUs)".into(),
        };
        let one_connection = match (ext_authz_1, noop_1, jwt_authn_1) {
            (Some(a), Some(n), Some(j)) => Some(envoy::EnvoyComparison::new(1, a, n, j)),
            _ => None,
        };
        Ok(EnvoySummary {
            envoy_version: envoy::version(binary),
            pinning,
            loaded: envoy::EnvoyComparison::new(k, ext_authz, noop_run, jwt_authn),
            one_connection,
        })
    }

    /// Warms up, then measures GETs through `proxy`; CPU is Envoy's plus Portcullis's.
    async fn envoy_phase(
        &mut self,
        key: &'static str,
        name: &'static str,
        proxy: &Envoy,
        portcullis_pid: Option<u32>,
        token: &str,
        k: usize,
    ) -> EnvoyRun {
        let args = self.args;
        let probe = self.probe.of(proxy.pid, portcullis_pid.into_iter().collect());
        probe.wait_idle().await;
        progress(&format!("{} ({k} connection{})", name.trim(), if k == 1 { "" } else { "s" }));
        let request = envoy::get_request("/", Some(token));
        if !args.warmup().is_zero() {
            envoy::run_phase(proxy.listener, &request, k, args.warmup()).await;
        }
        let envoy_before = server::cpu_ticks(proxy.pid);
        let portcullis_before = portcullis_pid.and_then(server::cpu_ticks);
        let before = probe.sample();
        let phase = envoy::run_phase(proxy.listener, &request, k, args.duration).await;
        let after = probe.sample();
        let envoy_after = server::cpu_ticks(proxy.pid);
        let portcullis_after = portcullis_pid.and_then(server::cpu_ticks);
        let row = Row::new(key, name, k, phase, (before, after), &probe);
        let per_request = |a: Option<u64>, b: Option<u64>| {
            let ticks = b?.checked_sub(a?)?;
            (row.requests > 0)
                .then(|| probe.ticks_to_duration(ticks).as_secs_f64() * 1e6 / row.requests as f64)
        };
        let run = EnvoyRun {
            requests: row.requests,
            errors: row.errors,
            requests_per_second: row.requests_per_second,
            p50_us: row.latency.map(|l| l.p50_us),
            p99_us: row.latency.map(|l| l.p99_us),
            p999_us: row.latency.map(|l| l.p999_us),
            envoy_cpu_us_per_request: per_request(envoy_before, envoy_after),
            portcullis_cpu_us_per_request: per_request(portcullis_before, portcullis_after),
        };
        self.rows.push(row);
        run
    }

    /// Waits for an idle server, primes (a pass over every token), warms up, then measures.
    async fn scenario(
        &mut self,
        key: &'static str,
        name: &'static str,
        concurrency: usize,
        prime: Option<Arc<Workload>>,
        warm: &Arc<Workload>,
        measured: &Arc<Workload>,
    ) {
        let (channels, probe) = (self.channels.clone(), self.probe.clone());
        self.measure(key, name, concurrency, prime, warm, measured, &channels, &probe).await;
    }

    /// [`Self::scenario`] against any process: `channels` to it, `probe` reading its CPU.
    #[allow(clippy::too_many_arguments)]
    async fn measure(
        &mut self,
        key: &'static str,
        name: &'static str,
        concurrency: usize,
        prime: Option<Arc<Workload>>,
        warm: &Arc<Workload>,
        measured: &Arc<Workload>,
        channels: &[Channel],
        probe: &Probe,
    ) {
        probe.wait_idle().await;
        progress(name);
        if let Some(prime) = prime {
            run_phase(channels, &prime, concurrency, Duration::from_secs(3600)).await;
        }
        if !self.args.warmup().is_zero() {
            run_phase(channels, warm, concurrency, self.args.warmup()).await;
        }
        let before = probe.sample();
        let phase = run_phase(channels, measured, concurrency, self.args.duration).await;
        let after = probe.sample();
        self.rows.push(Row::new(key, name, concurrency, phase, (before, after), probe));
    }

    /// ValidateToken hot, measured while Login calls loop in the background.
    async fn storm(
        &mut self,
        account: &Account,
        channel: &Channel,
        validate: &Arc<Workload>,
    ) -> StormSummary {
        let args = self.args;
        self.probe.wait_idle().await;
        progress("ValidateToken during a login storm");
        let storm = Storm::start(channel, account.login_request(), args.storm_logins);
        run_phase(&self.channels, validate, args.concurrency, args.warmup()).await;
        let (ok_before, failed_before) = storm.counts();
        let before = self.probe.sample();
        let phase = run_phase(&self.channels, validate, args.concurrency, args.duration).await;
        let after = self.probe.sample();
        let (ok_after, failed_after) = storm.counts();
        let first_error = storm.stop();
        self.rows.push(Row::new(
            report::STORM,
            "ValidateToken storm",
            args.concurrency,
            phase,
            (before, after),
            &self.probe,
        ));
        StormSummary {
            background_logins: args.storm_logins,
            logins_ok: ok_after - ok_before,
            logins_failed: failed_after - failed_before,
            login_first_error: first_error,
            unloaded_p99_us: None,
            loaded_p99_us: None,
            unloaded_requests_per_second: None,
            loaded_requests_per_second: 0.0,
            p99_ratio: None,
            throughput_ratio: None,
        }
    }
}
