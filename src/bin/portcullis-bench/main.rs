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

mod load;
mod report;
mod server;
mod setup;
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
    load::{Expect, RefreshChains, Storm, TokenFeed, Workload, run_phase},
    report::{MachineInfo, Report, Row, RunInfo, StormSummary},
    server::{LocalServer, Machine, Pinning, Prepared, Probe, ServerOptions},
    setup::Account,
    verify::Minter,
};

/// Scenario keys, in the order they run (`--only` takes these, or a prefix before a `-`:
/// `validate` selects every `validate-*`).
const SCENARIOS: &[&str] = &[
    "health",
    "validate-hot",
    "validate-rotating",
    "validate-cold",
    "validate-revoked",
    "refresh",
    "login",
    "storm",
    "verify",
];

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
    /// validate-rotating, validate-cold, validate-revoked), refresh, login, storm, verify.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Do not pin the server and the bench to separate CPUs.
    #[arg(long)]
    no_pin: bool,
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
        SCENARIOS.iter().filter(|k| **k != "verify").any(|k| self.selected(k))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("portcullis-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn progress(what: &str) {
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

    let backend = prepared.as_ref().map(Prepared::backend);
    let mut local: Option<LocalServer> = prepared.map(Prepared::start).transpose()?;
    let server_pid = local.as_ref().map(|s| s.pid).or(args.server_pid);
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
    let probe = Probe { server_pid, ticks_per_second: server::clock_ticks(), cpus: machine.allowed.clone() };

    let mut rows = Vec::new();
    let mut storm = None;
    let mut revoked_count = 0;
    if args.grpc_selected() {
        let addr = local.as_ref().map(|s| s.addr).or(args.addr).context("no server address")?;
        let mut bench = Bench { args, probe: probe.clone(), channels: Vec::new(), rows: Vec::new() };
        let outcome = runtime.block_on(bench.run_all(addr, local.as_mut(), rotation, cold));
        let (storm_summary, revoked) = outcome?;
        rows = bench.rows;
        storm = storm_summary;
        revoked_count = revoked;
    }
    let peak_rss = server_pid.and_then(server::peak_rss_kib);
    drop(local);
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
        in_process,
        in_process_cached_hit: cached,
        server_peak_rss_kib: peak_rss,
        notes,
    };
    report.compare();
    print!("{}", report.render());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
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
        "validate-rotating",
        format!(
            "ValidateToken rotating: {} distinct live tokens round-robin (minted in process with the \
             server's key; a priming pass verified each once)",
            args.rotation_tokens
        ),
    );
    say(
        "validate-cold",
        format!(
            "ValidateToken cold: a token never seen on every call ({} minted): full signature \
             verification each time",
            args.cold_tokens
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

/// The gRPC scenarios against one server.
struct Bench<'a> {
    args: &'a Args,
    probe: Probe,
    channels: Vec<Channel>,
    rows: Vec<Row>,
}

impl Bench<'_> {
    /// Returns the storm summary and the number of revoked tokens used.
    async fn run_all(
        &mut self,
        addr: SocketAddr,
        local: Option<&mut LocalServer>,
        rotation: Option<Arc<Vec<String>>>,
        cold: Option<Arc<Vec<String>>>,
    ) -> anyhow::Result<(Option<StormSummary>, usize)> {
        let args = self.args;
        progress(&format!("waiting for the server at {addr} to be SERVING"));
        setup::wait_serving(addr, local, Duration::from_secs(60)).await?;
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
        if let Some(tokens) = rotation {
            let prime = validate(TokenFeed::once(tokens.clone()), Expect::Valid);
            let w = validate(TokenFeed::cycle(tokens), Expect::Valid);
            self.scenario("validate-rotating", "ValidateToken rotating", n, Some(prime), &w, &w).await;
        }
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
        }
        let revoked_count = revoked.as_ref().map_or(0, |r| r.len());
        if let Some(tokens) = revoked {
            let prime = validate(TokenFeed::once(tokens.clone()), Expect::Revoked);
            let w = validate(TokenFeed::cycle(tokens), Expect::Revoked);
            self.scenario("validate-revoked", "ValidateToken revoked", n, Some(prime), &w, &w).await;
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
        Ok((storm_summary, revoked_count))
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
        self.probe.wait_idle().await;
        progress(name);
        if let Some(prime) = prime {
            run_phase(&self.channels, &prime, concurrency, Duration::from_secs(3600)).await;
        }
        if !self.args.warmup().is_zero() {
            run_phase(&self.channels, warm, concurrency, self.args.warmup()).await;
        }
        let before = self.probe.sample();
        let phase = run_phase(&self.channels, measured, concurrency, self.args.duration).await;
        let after = self.probe.sample();
        self.rows.push(Row::new(key, name, concurrency, phase, (before, after), &self.probe));
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
