//! Figures of a run: one row per scenario, ratios to the Health baseline, the login storm,
//! in-process verification; printed as a table and written as JSON.

use std::{fmt::Write as _, time::Duration};

use serde::Serialize;

use crate::{
    envoy::{self, EnvoySummary},
    halt_poll::{self, HaltPolling},
    load::Phase,
    replicas::{self, ReplicaSummary},
    server::{Probe, Sample},
    sidecar::{self, ValidatorSummary},
    verify::{self, AlgorithmCost, CachedCost, LookupCost, RawVerify},
};

#[derive(Serialize, Clone, Copy)]
pub struct Latency {
    pub p50_us: u32,
    pub p90_us: u32,
    pub p99_us: u32,
    pub p999_us: u32,
    pub max_us: u32,
    pub mean_us: f64,
}

impl Latency {
    /// Nearest-rank percentiles of the durations (sorted here).
    pub fn of(durations: &mut [u32]) -> Option<Latency> {
        if durations.is_empty() {
            return None;
        }
        durations.sort_unstable();
        let at = |p: f64| {
            let rank = (p * durations.len() as f64).ceil() as usize;
            durations[rank.clamp(1, durations.len()) - 1]
        };
        let sum: u64 = durations.iter().map(|&d| u64::from(d)).sum();
        Some(Latency {
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: durations[durations.len() - 1],
            mean_us: sum as f64 / durations.len() as f64,
        })
    }
}

/// A scenario's figures relative to Health/Check's.
#[derive(Serialize, Clone, Copy)]
pub struct Ratios {
    pub cpu_per_request: Option<f64>,
    pub p50: f64,
    pub p99: f64,
}

#[derive(Serialize)]
pub struct Row {
    pub key: &'static str,
    pub name: &'static str,
    /// Successful calls in the measured window.
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub latency: Option<Latency>,
    /// Server utime + stime over the window.
    pub server_cpu_ms: Option<f64>,
    pub server_cpu_us_per_request: Option<f64>,
    /// The server's page faults and context switches per request: diagnostics for a CPU
    /// figure that moves (allocator churn shows as faults, idle wake-ups as switches).
    pub server_page_faults_per_request: Option<f64>,
    pub server_context_switches_per_request: Option<f64>,
    /// Server CPU time / wall time (1.0 = one core busy).
    pub server_cores_busy: Option<f64>,
    /// This process's CPU time / wall time.
    pub generator_cores_busy: Option<f64>,
    /// CPU time of everything else on the bench's CPUs (other processes, steal) / wall
    /// time: when it is not near 0, the figures are not clean (throughput and latency suffer
    /// most; CPU/request least).
    pub other_cores_busy: Option<f64>,
    pub concurrency: usize,
    pub first_error: Option<String>,
    pub note: Option<String>,
    pub vs_health: Option<Ratios>,
}

impl Row {
    pub fn new(
        key: &'static str,
        name: &'static str,
        concurrency: usize,
        mut phase: Phase,
        (before, after): (Sample, Sample),
        probe: &Probe,
    ) -> Row {
        let wall = after.at.duration_since(before.at);
        let seconds = wall.as_secs_f64().max(1e-9);
        let cpu =
            |a: Option<u64>, b: Option<u64>| Some(probe.ticks_to_duration(b?.checked_sub(a?)?).as_secs_f64());
        let server_cpu = cpu(before.server_ticks, after.server_ticks);
        let own_cpu = cpu(before.own_ticks, after.own_ticks);
        let busy = cpu(before.busy_ticks, after.busy_ticks);
        let other = busy.zip(own_cpu).map(|(b, o)| (b - o - server_cpu.unwrap_or(0.0)).max(0.0));
        // Saturating: the switch count sums the threads alive at each reading, so a thread
        // that exits in the window takes its switches with it (an undercount, not an error).
        let per_request = |a: Option<u64>, b: Option<u64>| {
            let n = b?.saturating_sub(a?);
            (phase.ok > 0).then(|| n as f64 / phase.ok as f64)
        };
        Row {
            key,
            name,
            requests: phase.ok,
            errors: phase.errors,
            seconds,
            requests_per_second: phase.ok as f64 / seconds,
            latency: Latency::of(&mut phase.latencies_us),
            server_cpu_ms: server_cpu.map(|s| s * 1e3),
            server_cpu_us_per_request: server_cpu.filter(|_| phase.ok > 0).map(|s| s * 1e6 / phase.ok as f64),
            server_page_faults_per_request: per_request(before.server_faults, after.server_faults),
            server_context_switches_per_request: per_request(before.server_switches, after.server_switches),
            server_cores_busy: server_cpu.map(|s| s / seconds),
            generator_cores_busy: own_cpu.map(|s| s / seconds),
            other_cores_busy: other.map(|s| s / seconds),
            concurrency,
            first_error: phase.first_error,
            note: None,
            vs_health: None,
        }
    }
}

#[derive(Serialize)]
pub struct StormSummary {
    pub background_logins: usize,
    /// Background logins answered within the measured window.
    pub logins_ok: u64,
    pub logins_failed: u64,
    pub login_first_error: Option<String>,
    pub unloaded_p99_us: Option<u32>,
    pub loaded_p99_us: Option<u32>,
    pub unloaded_requests_per_second: Option<f64>,
    pub loaded_requests_per_second: f64,
    /// Loaded p99 / unloaded p99.
    pub p99_ratio: Option<f64>,
    /// Loaded throughput / unloaded throughput.
    pub throughput_ratio: Option<f64>,
}

#[derive(Serialize)]
pub struct MachineInfo {
    pub cores: usize,
    pub cpu_model: String,
    pub pinned: bool,
    pub server_cpus: Option<String>,
    pub generator_cpus: Option<String>,
    pub pinning_note: String,
    pub clock_ticks_per_second: u64,
    /// vCPU halt polling during the run, on a KVM guest idling through cpuidle-haltpoll.
    pub halt_polling: Option<HaltPolling>,
}

#[derive(Serialize)]
pub struct RunInfo {
    pub server: String,
    pub algorithm: String,
    pub bcrypt_cost: Option<u32>,
    pub duration_ms: u128,
    pub warmup_ms: u128,
    pub concurrency: usize,
    pub connections: usize,
    pub login_concurrency: usize,
    pub refresh_concurrency: usize,
    pub rotation_tokens: usize,
    pub cold_tokens: usize,
    pub revoked_tokens: usize,
}

/// ext_authz `Check` against `ValidateToken` on the same server.
#[derive(Serialize)]
pub struct ExtAuthzSummary {
    pub cpu_us_per_request: Option<f64>,
    pub validate_hot_cpu_us_per_request: Option<f64>,
    pub cpu_ratio_to_validate_hot: Option<f64>,
    pub p99_us: Option<u32>,
    pub p999_us: Option<u32>,
}

/// One goal of the benchmark and whether this run met it (`None`: not measured).
#[derive(Serialize)]
pub struct TargetCheck {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: MachineInfo,
    pub run: RunInfo,
    pub scenarios: Vec<Row>,
    pub login_storm: Option<StormSummary>,
    pub ext_authz: Option<ExtAuthzSummary>,
    pub validator: Option<ValidatorSummary>,
    pub envoy: Option<EnvoySummary>,
    pub revocation_replicas: Option<ReplicaSummary>,
    pub in_process: Vec<AlgorithmCost>,
    pub in_process_cached_hit: Option<CachedCost>,
    /// The raw verify of the server's algorithm measured right after the cold window.
    pub cold_verify: Option<RawVerify>,
    pub revocation_lookup: Option<LookupCost>,
    pub server_peak_rss_kib: Option<u64>,
    pub targets: Vec<TargetCheck>,
    /// Scenarios that could not run (the bench exits with an error after the report).
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

pub const HEALTH: &str = "health";
pub const HOT: &str = "validate-hot";
pub const STORM: &str = "storm";
pub const COLD: &str = "validate-cold";
pub const EXT_AUTHZ: &str = "ext-authz";
/// Health/Check again right after the cold window: the cold target's baseline.
pub const HEALTH_AFTER_COLD: &str = "health-after-cold";
pub const VALIDATOR: &str = "validator";

/// Rows that are not gRPC calls to the server (HTTP through Envoy): no Health ratio.
fn is_http(key: &str) -> bool {
    key.starts_with("envoy-")
}

/// `1.08x`, or `n/a`.
fn ratio_text(ratio: Option<f64>) -> String {
    ratio.map_or("n/a".into(), |r| format!("{r:.2}x"))
}

fn met_text(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    }
}

impl Report {
    /// Fills in the ratios to Health/Check and the storm's comparison with unloaded figures.
    pub fn compare(&mut self) {
        let health = self.scenarios.iter().find(|r| r.key == HEALTH);
        let base = health.and_then(|h| Some((h.latency?, h.server_cpu_us_per_request)));
        if let Some((base_latency, base_cpu)) = base {
            for row in self.scenarios.iter_mut().filter(|r| r.key != HEALTH && !is_http(r.key)) {
                let Some(latency) = row.latency else { continue };
                row.vs_health = Some(Ratios {
                    // The storm's server CPU pays for the background logins too.
                    cpu_per_request: base_cpu
                        .zip(row.server_cpu_us_per_request)
                        .filter(|_| row.key != STORM)
                        .map(|(b, c)| c / b),
                    p50: f64::from(latency.p50_us) / f64::from(base_latency.p50_us.max(1)),
                    p99: f64::from(latency.p99_us) / f64::from(base_latency.p99_us.max(1)),
                });
            }
        }
        let hot = self.scenarios.iter().find(|r| r.key == HOT);
        let loaded = self.scenarios.iter().find(|r| r.key == STORM);
        if let (Some(storm), Some(loaded)) = (self.login_storm.as_mut(), loaded) {
            storm.loaded_p99_us = loaded.latency.map(|l| l.p99_us);
            storm.loaded_requests_per_second = loaded.requests_per_second;
            if let Some(hot) = hot {
                storm.unloaded_p99_us = hot.latency.map(|l| l.p99_us);
                storm.unloaded_requests_per_second = Some(hot.requests_per_second);
                storm.p99_ratio = storm
                    .loaded_p99_us
                    .zip(storm.unloaded_p99_us)
                    .map(|(l, u)| f64::from(l) / f64::from(u.max(1)));
                storm.throughput_ratio = Some(loaded.requests_per_second / hot.requests_per_second.max(1e-9));
            }
        }
        let row = |key: &str| self.scenarios.iter().find(|r| r.key == key);
        let cpu = |key: &str| row(key).and_then(|r| r.server_cpu_us_per_request);
        let (hot_cpu, health_cpu) = (cpu(HOT), cpu(HEALTH));
        if let Some(check) = row(EXT_AUTHZ) {
            self.ext_authz = Some(ExtAuthzSummary {
                cpu_us_per_request: check.server_cpu_us_per_request,
                validate_hot_cpu_us_per_request: hot_cpu,
                cpu_ratio_to_validate_hot: check.server_cpu_us_per_request.zip(hot_cpu).map(|(c, h)| c / h),
                p99_us: check.latency.map(|l| l.p99_us),
                p999_us: check.latency.map(|l| l.p999_us),
            });
        }
        if let Some(validator) = self.validator.as_mut() {
            let own = cpu(VALIDATOR);
            validator.validate_hot_cpu_us_per_request = own;
            validator.cpu_ratio_to_server_health = own.zip(health_cpu).map(|(c, h)| c / h);
            validator.cpu_ratio_to_server_validate_hot = own.zip(hot_cpu).map(|(c, h)| c / h);
        }
        if let Some(lookup) = self.revocation_lookup.as_mut() {
            lookup.percent_of_validate_hot =
                hot_cpu.map(|h| lookup.miss_ns.max(lookup.hit_ns) / (h * 1e3) * 100.0);
        }
        self.targets = self.check_targets();
    }

    fn check_targets(&self) -> Vec<TargetCheck> {
        let mut targets = Vec::new();
        let mut add = |what: &str, target: String, measured: String, met: Option<bool>| {
            targets.push(TargetCheck { what: what.into(), target, measured, met });
        };
        let row = |key: &str| self.scenarios.iter().find(|r| r.key == key);
        let cpu = |key: &str| row(key).and_then(|r| r.server_cpu_us_per_request);
        let health_cpu = cpu(HEALTH);
        let hot_ratio = cpu(HOT).zip(health_cpu).map(|(h, b)| h / b);
        add(
            "ValidateToken hot CPU/request vs Health/Check",
            "<= 1.5x".into(),
            ratio_text(hot_ratio),
            hot_ratio.map(|r| r <= 1.5),
        );
        // Cold: Health's CPU plus one in-process verification with the server's algorithm,
        // both measured right after the cold window when they were (else Health's row and
        // the in-process table).
        let verify_us = self.cold_verify.map(|v| v.verify_ns / 1e3).or_else(|| {
            self.in_process
                .iter()
                .find(|c| c.algorithm.eq_ignore_ascii_case(&self.run.algorithm))
                .map(|c| c.verify_ns / 1e3)
        });
        let cold_health = cpu(HEALTH_AFTER_COLD).or(health_cpu);
        let cold_ratio = cpu(COLD).zip(cold_health.zip(verify_us)).map(|(c, (h, v))| c / (h + v));
        // On a VM whose idle vCPUs halt at once the cold figure includes VM exits the
        // server pays to wake the generator (see halt_poll): said next to the figure.
        let halts = self.machine.halt_polling.is_some_and(|h| h.halts_at_once());
        add(
            "ValidateToken cold CPU/request vs Health/Check + raw verify",
            "<= 1.2x".into(),
            format!(
                "{}{}{}",
                ratio_text(cold_ratio),
                match (cpu(HEALTH_AFTER_COLD), self.cold_verify) {
                    (Some(h), Some(v)) => format!(
                        " ({} / ({} + {}), Health and verify right after it)",
                        fmt_us(cpu(COLD).unwrap_or(0.0)),
                        fmt_us(h),
                        fmt_us(v.verify_ns / 1e3)
                    ),
                    _ => String::new(),
                },
                if halts { " (VM exits: see WARNING)" } else { "" }
            ),
            cold_ratio.map(|r| r <= 1.2),
        );
        let spread = |key: &str| {
            row(key).and_then(|r| r.latency).map(|l| f64::from(l.p99_us) / f64::from(l.p50_us.max(1)))
        };
        let spread_ratio = spread(HOT).zip(spread(HEALTH)).map(|(v, h)| v / h);
        add(
            "ValidateToken hot p99/p50 spread vs Health/Check's",
            "<= 1.2x".into(),
            ratio_text(spread_ratio),
            spread_ratio.map(|r| r <= 1.2),
        );
        if let Some(storm) = &self.login_storm {
            add(
                "login storm: ValidateToken p99 vs unloaded",
                "<= 2x".into(),
                ratio_text(storm.p99_ratio),
                storm.p99_ratio.map(|r| r <= 2.0),
            );
            add(
                "login storm: ValidateToken throughput vs unloaded",
                ">= 0.45x".into(),
                ratio_text(storm.throughput_ratio),
                storm.throughput_ratio.map(|r| r >= 0.45),
            );
        }
        if let Some(kib) = self.server_peak_rss_kib {
            add(
                "server peak RSS under the benchmark",
                "<= 64 MiB".into(),
                format!("{:.1} MiB", kib as f64 / 1024.0),
                Some(kib <= 64 * 1024),
            );
        }
        if let Some(e) = &self.ext_authz {
            add(
                "ext_authz Check CPU/request vs ValidateToken hot",
                "<= 1.25x".into(),
                ratio_text(e.cpu_ratio_to_validate_hot),
                e.cpu_ratio_to_validate_hot.map(|r| r <= 1.25),
            );
            add(
                "ext_authz Check p99.9",
                "< 10ms".into(),
                e.p999_us.map_or("n/a".into(), |us| fmt_us(f64::from(us))),
                e.p999_us.map(|us| us < 10_000),
            );
        }
        if let Some(v) = &self.validator {
            add(
                "validator spawn to Health SERVING",
                format!("< {}", fmt_duration(sidecar::TARGET_STARTUP)),
                format!("{:.1}ms", v.startup_ms),
                Some(v.startup_ms < sidecar::TARGET_STARTUP.as_secs_f64() * 1e3),
            );
            add(
                "validator idle RSS (VmRSS after 1 s)",
                format!("< {} MiB", sidecar::TARGET_IDLE_RSS_KIB / 1024),
                v.idle_rss_kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
                v.idle_rss_kib.map(|k| k < sidecar::TARGET_IDLE_RSS_KIB),
            );
        }
        if let Some(e) = &self.envoy {
            let l = &e.loaded;
            for (what, ratio) in [("p50", l.p50_ratio), ("p99", l.p99_ratio)] {
                add(
                    &format!("Envoy+ext_authz {what} vs Envoy+jwt_authn {what} ({} conn.)", l.connections),
                    format!("<= {:.1}x", envoy::TARGET_RATIO),
                    ratio_text(ratio),
                    ratio.map(|r| r <= envoy::TARGET_RATIO),
                );
            }
        }
        if let Some(r) = &self.revocation_replicas {
            add(
                "revocation across replicas p99 (Logout on A to refusal on B)",
                format!("<= {}", fmt_duration(replicas::TARGET_P99)),
                r.p99_us.map_or("n/a".into(), |us| fmt_us(f64::from(us))),
                r.p99_us.map(|us| u128::from(us) <= replicas::TARGET_P99.as_micros() && r.not_refused == 0),
            );
        }
        if let Some(l) = &self.revocation_lookup {
            add(
                "revocation lookup vs ValidateToken hot CPU/request",
                format!("<= {:.0}%", verify::LOOKUP_TARGET_PERCENT),
                l.percent_of_validate_hot.map_or("n/a (validate-hot not run)".into(), |p| format!("{p:.2}%")),
                l.percent_of_validate_hot.map(|p| p <= verify::LOOKUP_TARGET_PERCENT),
            );
        }
        targets
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let r = &self.run;
        _ = writeln!(out, "portcullis-bench on {} cores ({})", m.cores, m.cpu_model);
        if m.pinned {
            _ = writeln!(
                out,
                "pinning: server on CPU {} (taskset -c), load generator on CPU {} (taskset -a -p)",
                m.server_cpus.as_deref().unwrap_or("?"),
                m.generator_cpus.as_deref().unwrap_or("?")
            );
        } else {
            _ = writeln!(
                out,
                "WARNING: not pinned ({}): server and load generator share the CPUs, so \
                 throughput and latency mix both; server CPU per request is the figure to compare",
                m.pinning_note
            );
        }
        match m.halt_polling {
            Some(h) if h.halts_at_once() => _ = writeln!(out, "WARNING: {}", halt_poll::warning()),
            Some(h) => {
                _ = writeln!(
                    out,
                    "idle vCPUs poll {} before halting{}",
                    fmt_duration(Duration::from_nanos(h.poll_ns)),
                    h.original_ns
                        .map(|ns| format!(
                            " (--guest-halt-poll; guest_halt_poll_ns was {ns}, restored after the run)"
                        ))
                        .unwrap_or_default()
                )
            }
            None => {}
        }
        _ = writeln!(
            out,
            "server: {}, {} signing key{}",
            r.server,
            r.algorithm,
            r.bcrypt_cost.map(|c| format!(", bcrypt cost {c}")).unwrap_or_default()
        );
        _ = writeln!(
            out,
            "load: {} concurrent calls over {} connections (Login {}, Refresh {}), {} per scenario after a {} warm-up",
            r.concurrency,
            r.connections,
            r.login_concurrency,
            r.refresh_concurrency,
            fmt_duration(Duration::from_millis(r.duration_ms as u64)),
            fmt_duration(Duration::from_millis(r.warmup_ms as u64)),
        );
        _ = writeln!(out);
        _ = writeln!(
            out,
            "{:<24} {:>8} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>11} {:>7} {:>7} {:>6}",
            "scenario",
            "requests",
            "errors",
            "req/s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "srv CPU/req",
            "srv CPU",
            "gen CPU",
            "other"
        );
        for row in &self.scenarios {
            let l = row.latency;
            let lat =
                |f: fn(&Latency) -> u32| l.as_ref().map(|l| fmt_us(f64::from(f(l)))).unwrap_or("-".into());
            let cpu_req = row
                .server_cpu_us_per_request
                .map(|us| format!("{}{}", fmt_us(us), if row.key == STORM { "*" } else { "" }))
                .unwrap_or("-".into());
            let pct = |v: Option<f64>| v.map(|v| format!("{:.0}%", v * 100.0)).unwrap_or("-".into());
            _ = writeln!(
                out,
                "{:<24} {:>8} {:>6} {:>9.0} {:>8} {:>8} {:>8} {:>8} {:>8} {:>11} {:>7} {:>7} {:>6}",
                row.name,
                row.requests,
                row.errors,
                row.requests_per_second,
                lat(|l| l.p50_us),
                lat(|l| l.p90_us),
                lat(|l| l.p99_us),
                lat(|l| l.p999_us),
                lat(|l| l.max_us),
                cpu_req,
                pct(row.server_cores_busy),
                pct(row.generator_cores_busy),
                pct(row.other_cores_busy),
            );
        }
        _ = writeln!(
            out,
            "(srv CPU = server utime+stime / wall time, 100% = one core; gen CPU = the same for the bench; \
             other = every other process on these CPUs)"
        );
        let diagnostics: Vec<String> = self
            .scenarios
            .iter()
            .filter_map(|row| {
                let faults = row.server_page_faults_per_request?;
                let switches = row.server_context_switches_per_request?;
                Some(format!("{} {faults:.2}/{switches:.2}", row.key))
            })
            .collect();
        if !diagnostics.is_empty() {
            _ = writeln!(out, "server page faults/context switches per request: {}", diagnostics.join(", "));
        }
        let busiest = self.scenarios.iter().filter_map(|r| r.other_cores_busy).fold(0.0, f64::max);
        if busiest > 0.05 {
            _ = writeln!(
                out,
                "WARNING: other processes took up to {:.0}% of a core during the windows: throughput and \
                 latency suffer most, CPU/request least; rerun on a quiet machine",
                busiest * 100.0
            );
        }
        for row in self.scenarios.iter().filter(|r| r.first_error.is_some() || r.note.is_some()) {
            if let Some(note) = &row.note {
                _ = writeln!(out, "  {}: {note}", row.name);
            }
            if let Some(error) = &row.first_error {
                _ = writeln!(out, "  {}: {} errors, the first: {error}", row.name, row.errors);
            }
        }

        if self.scenarios.iter().any(|r| r.vs_health.is_some()) {
            _ = writeln!(out);
            _ = writeln!(out, "against the Health/Check baseline (same server, same load):");
            for row in &self.scenarios {
                let Some(ratios) = row.vs_health else { continue };
                let cpu = match ratios.cpu_per_request {
                    Some(c) => format!("{c:.2}x Health CPU/request"),
                    None if row.key == STORM => "CPU/request n/a (pays for the logins)".into(),
                    None => "CPU/request n/a".into(),
                };
                _ = writeln!(out, "{}: {cpu}, p50 {:.2}x, p99 {:.2}x", row.name, ratios.p50, ratios.p99);
            }
        }

        if let Some(storm) = &self.login_storm {
            _ = writeln!(out);
            let p99 = match (storm.p99_ratio, storm.loaded_p99_us, storm.unloaded_p99_us) {
                (Some(ratio), Some(l), Some(u)) => {
                    format!("p99 {ratio:.2}x unloaded ({} vs {})", fmt_us(f64::from(l)), fmt_us(f64::from(u)))
                }
                _ => "p99 ratio n/a (ValidateToken hot not run)".into(),
            };
            let throughput = match (storm.throughput_ratio, storm.unloaded_requests_per_second) {
                (Some(ratio), Some(u)) => format!(
                    "throughput {ratio:.2}x unloaded ({:.0} vs {u:.0} req/s)",
                    storm.loaded_requests_per_second
                ),
                _ => "throughput ratio n/a".into(),
            };
            _ = writeln!(
                out,
                "login storm: ValidateToken hot with {} concurrent Login calls in the background: {p99}, {throughput}",
                storm.background_logins
            );
            _ = writeln!(
                out,
                "  background logins in the window: {} succeeded, {} failed{}",
                storm.logins_ok,
                storm.logins_failed,
                storm.login_first_error.as_ref().map(|e| format!(" (first: {e})")).unwrap_or_default()
            );
            _ = writeln!(out, "  * its srv CPU/req includes the background logins' bcrypt");
        }

        if let Some(e) = &self.ext_authz {
            _ = writeln!(out);
            _ = writeln!(
                out,
                "ext_authz Check (hot token in `authorization: Bearer`, on the server): CPU/request {} = {} \
                 ValidateToken hot's {} (target <= 1.25x); p99 {}, p99.9 {} (target < 10ms)",
                opt_us(e.cpu_us_per_request),
                ratio_text(e.cpu_ratio_to_validate_hot),
                opt_us(e.validate_hot_cpu_us_per_request),
                opt_us(e.p99_us.map(f64::from)),
                opt_us(e.p999_us.map(f64::from)),
            );
        }

        if let Some(v) = &self.validator {
            _ = writeln!(out);
            _ = writeln!(out, "validator (portcullis serve --mode validator): {}", v.setup);
            _ = writeln!(
                out,
                "  spawn to Health SERVING: {:.1}ms (target < {}; taskset included when pinned, polled every ~1ms)",
                v.startup_ms,
                fmt_duration(sidecar::TARGET_STARTUP)
            );
            _ = writeln!(
                out,
                "  idle RSS (VmRSS after 1 s): {} (target < {} MiB); peak after the load (VmHWM): {}",
                opt_mib(v.idle_rss_kib),
                sidecar::TARGET_IDLE_RSS_KIB / 1024,
                opt_mib(v.peak_rss_kib)
            );
            _ = writeln!(
                out,
                "  ValidateToken hot on it: CPU/request {} = {} the server's Health/Check, {} the server's \
                 ValidateToken hot",
                opt_us(v.validate_hot_cpu_us_per_request),
                ratio_text(v.cpu_ratio_to_server_health),
                ratio_text(v.cpu_ratio_to_server_validate_hot),
            );
        }

        if let Some(e) = &self.envoy {
            _ = writeln!(out);
            _ = writeln!(
                out,
                "Envoy {}: the same upstream, keep-alive HTTP/1.1 connections closed loop; {}:",
                e.envoy_version, e.pinning
            );
            _ = writeln!(
                out,
                "  {:<22} {:>5} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>14} {:>14}",
                "",
                "conn.",
                "requests",
                "errors",
                "req/s",
                "p50",
                "p99",
                "p99.9",
                "Envoy CPU/req",
                "authz CPU/req"
            );
            let comparisons = std::iter::once(&e.loaded).chain(e.one_connection.as_ref());
            for c in comparisons.clone() {
                for (name, run) in [
                    ("ext_authz (Portcullis)", &c.ext_authz),
                    ("ext_authz (no-op)", &c.ext_authz_noop),
                    ("jwt_authn (offline)", &c.jwt_authn),
                ] {
                    _ = writeln!(
                        out,
                        "  {:<22} {:>5} {:>8} {:>6} {:>8.0} {:>8} {:>8} {:>8} {:>14} {:>14}",
                        name,
                        c.connections,
                        run.requests,
                        run.errors,
                        run.requests_per_second,
                        opt_us(run.p50_us.map(f64::from)),
                        opt_us(run.p99_us.map(f64::from)),
                        opt_us(run.p999_us.map(f64::from)),
                        opt_us(run.envoy_cpu_us_per_request),
                        opt_us(run.portcullis_cpu_us_per_request),
                    );
                }
            }
            for c in comparisons {
                _ = writeln!(
                    out,
                    "  {} connection{}: ext_authz / jwt_authn p50 {}, p99 {} (goal <= {:.1}x{}); floor, \
                     ext_authz(no-op) / jwt_authn (Envoy's filter and the round trip alone): p50 {}, p99 {}; \
                     ext_authz(Portcullis) / ext_authz(no-op) (what Portcullis adds): p50 {}, p99 {}",
                    c.connections,
                    if c.connections == 1 { "" } else { "s" },
                    ratio_text(c.p50_ratio),
                    ratio_text(c.p99_ratio),
                    envoy::TARGET_RATIO,
                    if std::ptr::eq(c, &e.loaded) { ", checked on this load" } else { "" },
                    ratio_text(c.floor_p50_ratio),
                    ratio_text(c.floor_p99_ratio),
                    ratio_text(c.portcullis_p50_ratio),
                    ratio_text(c.portcullis_p99_ratio),
                );
            }
            _ = writeln!(
                out,
                "  jwt_authn cannot revoke: a logged-out session's tokens pass until they expire"
            );
        }

        if let Some(r) = &self.revocation_replicas {
            _ = writeln!(out);
            _ = writeln!(
                out,
                "revocation across replicas ({}): {} sessions, each Logout on A then ValidateToken on B every {} \
                 until SESSION_REVOKED",
                r.backend,
                r.revocations,
                fmt_us(r.poll_interval_us as f64)
            );
            _ = writeln!(
                out,
                "  Logout answer on A to first refusal on B: p50 {}, p90 {}, p99 {}, max {}, mean {}",
                opt_us(r.p50_us.map(f64::from)),
                opt_us(r.p90_us.map(f64::from)),
                opt_us(r.p99_us.map(f64::from)),
                opt_us(r.max_us.map(f64::from)),
                opt_us(r.mean_us),
            );
            _ = writeln!(
                out,
                "  {} over 50ms, {} refused by the first ValidateToken after the Logout answer, {} not refused \
                 within {}ms; target p99 <= 50 ms",
                r.over_50ms, r.refused_at_first_poll, r.not_refused, r.give_up_ms
            );
            _ = writeln!(
                out,
                "  hard bound (docs/design.md, Revocation): a revocation missed while B's feed was down is \
                 repaired once the feed notices (TCP close, or <= ~1 s: a ping every 500ms, 500ms timeout) and \
                 resubscribes and resyncs (from 100ms); meanwhile B asks Redis on every check"
            );
        }

        if !self.in_process.is_empty() {
            _ = writeln!(out);
            _ = writeln!(
                out,
                "in-process token cost (portcullis::token::AccessTokens, one thread, no gRPC, no cache):"
            );
            _ = writeln!(
                out,
                "{:<24} {:>8} {:>10} {:>12} {:>10}",
                "", "verifies", "verify", "verifies/s", "issue"
            );
            for cost in &self.in_process {
                _ = writeln!(
                    out,
                    "{:<24} {:>8} {:>10} {:>12.0} {:>10}",
                    format!("verify {}", cost.algorithm),
                    cost.verify_iterations,
                    fmt_us(cost.verify_ns / 1e3),
                    1e9 / cost.verify_ns,
                    fmt_us(cost.issue_ns / 1e3),
                );
            }
            if let Some(cheapest) = self.in_process.iter().min_by(|a, b| a.verify_ns.total_cmp(&b.verify_ns))
            {
                let others: Vec<String> = self
                    .in_process
                    .iter()
                    .filter(|c| c.algorithm != cheapest.algorithm)
                    .map(|c| format!("{} {:.2}x", c.algorithm, c.verify_ns / cheapest.verify_ns))
                    .collect();
                _ = writeln!(
                    out,
                    "cheapest to verify here: {} ({}); {} its cost",
                    cheapest.algorithm,
                    fmt_us(cheapest.verify_ns / 1e3),
                    others.join(", ")
                );
            }
            if let Some(cached) = &self.in_process_cached_hit {
                _ = writeln!(
                    out,
                    "verified-claims cache hit ({}, verify_cached of a token seen before): {}",
                    cached.algorithm,
                    fmt_us(cached.ns / 1e3)
                );
            }
        }

        if let Some(l) = &self.revocation_lookup {
            _ = writeln!(
                out,
                "revocation lookup (hot::MemoryHotState::is_session_revoked, the mirror's, {} revoked ids): \
                 {:.0}ns not revoked, {:.0}ns revoked = {} of ValidateToken hot's server CPU/request (target \
                 <= {:.0}%)",
                l.revoked_ids,
                l.miss_ns,
                l.hit_ns,
                l.percent_of_validate_hot.map_or("n/a (validate-hot not run)".into(), |p| format!("{p:.2}%")),
                verify::LOOKUP_TARGET_PERCENT
            );
        }

        if let Some(kib) = self.server_peak_rss_kib {
            _ = writeln!(out);
            _ = writeln!(out, "server peak RSS (VmHWM): {:.1} MiB", kib as f64 / 1024.0);
        }
        if !self.targets.is_empty() {
            _ = writeln!(out);
            _ = writeln!(out, "targets:");
            for t in &self.targets {
                _ = writeln!(
                    out,
                    "  {:<13} {:<62} {:>12}  (target {})",
                    met_text(t.met),
                    t.what,
                    t.measured,
                    t.target
                );
            }
        }
        if !self.failures.is_empty() {
            _ = writeln!(out);
            for failure in &self.failures {
                _ = writeln!(out, "FAILED {failure}");
            }
        }
        if !self.notes.is_empty() {
            _ = writeln!(out);
            for note in &self.notes {
                _ = writeln!(out, "{note}");
            }
        }
        out
    }
}

/// `812us`, `3.41ms`, `245ms`, `1.52s`.
pub fn fmt_us(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2}us")
    } else if us < 1_000.0 {
        format!("{us:.0}us")
    } else if us < 100_000.0 {
        format!("{:.2}ms", us / 1e3)
    } else if us < 1_000_000.0 {
        format!("{:.0}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

fn opt_us(us: Option<f64>) -> String {
    us.map_or("-".into(), fmt_us)
}

fn opt_mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

pub fn fmt_duration(d: Duration) -> String {
    fmt_us(d.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut d: Vec<u32> = (1..=1000).rev().collect();
        let l = Latency::of(&mut d).unwrap();
        assert_eq!((l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us), (500, 900, 990, 999, 1000));
        assert_eq!(Latency::of(&mut [7]).unwrap().p999_us, 7);
        assert!(Latency::of(&mut []).is_none());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_us(0.456), "0.46us");
        assert_eq!(fmt_us(812.4), "812us");
        assert_eq!(fmt_us(3410.0), "3.41ms");
        assert_eq!(fmt_us(245_000.0), "245ms");
        assert_eq!(fmt_us(1_234_000.0), "1.23s");
        assert_eq!(fmt_us(15_000_000.0), "15.00s");
    }
}
