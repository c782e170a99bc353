//! Prometheus metrics, served as `GET /metrics` on the ops port (OpenMetrics text).
//!
//! One registry per process, built on first use. The rest of the code records through the
//! functions below — one line each, no Prometheus type outside this module — and every
//! label value is a `&'static str` from a small fixed set, so nothing a caller sends can
//! create a series. The names, labels and their meaning are listed in `docs/design.md`
//! ("Metrics and logs").
//!
//! Per-RPC metrics are recorded by `startup::observe` (the tower layer around the gRPC
//! server), which resolves each (method, code) pair's [`RpcSeries`] once and then only
//! increments a counter and observes a histogram per call: atomic additions, no lock (the
//! histogram is our own [`RpcHistogram`], not prometheus-client's mutex-guarded one).

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, text::encode},
    metrics::{MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

/// What `GET /metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets' upper bounds, in microseconds (exposed in seconds: 0.0001 … 30):
/// ValidateToken answers in tens of microseconds, a login spends hundreds of milliseconds in
/// bcrypt, and `server.request_timeout` is 30 s.
const RPC_BUCKETS_MICROS: [u64; 17] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabel {
    budget: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type HistogramFamily<L> = Family<L, RpcHistogram, fn() -> RpcHistogram>;

/// The per-RPC latency histogram, recorded without a lock.
///
/// prometheus-client's `Histogram` is an `Arc<Mutex<..>>`: every successful ValidateToken
/// on every core would take the same lock. Here each bucket is an `AtomicU64` (one
/// `fetch_add` per observation, in the first bucket whose bound is not exceeded; the
/// cumulative counts are summed when scraped, as prometheus-client's text encoder does for
/// its own histogram) and the sum is an `AtomicU64` of nanoseconds (one more `fetch_add`;
/// it would wrap after 584 years of summed latency per series). The count is the sum of the
/// buckets, so a scrape never shows a `_count` different from the `+Inf` bucket. Exposed
/// through `MetricEncoder::encode_histogram`: the same `_sum`, `_count` and `_bucket{le}`
/// lines, `+Inf` included, as the lock-based histogram had.
#[derive(Clone, Debug, Default)]
struct RpcHistogram {
    inner: Arc<HistogramCells>,
}

#[derive(Debug, Default)]
struct HistogramCells {
    /// Observations per bucket (not cumulative): one per bound of [`RPC_BUCKETS_MICROS`],
    /// then the overflow (`+Inf`).
    buckets: [AtomicU64; RPC_BUCKETS_MICROS.len() + 1],
    /// Sum of every observation, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl RpcHistogram {
    fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // `le` is inclusive: a value equal to a bound belongs to that bucket.
        let bucket = RPC_BUCKETS_MICROS
            .iter()
            .position(|&bound| nanos <= bound * 1_000)
            .unwrap_or(RPC_BUCKETS_MICROS.len());
        self.inner.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for RpcHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for RpcHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(f64::INFINITY, 0u64); RPC_BUCKETS_MICROS.len() + 1];
        let mut count = 0u64;
        for (i, (bucket, cell)) in buckets.iter_mut().zip(&self.inner.buckets).enumerate() {
            let observed = cell.load(Ordering::Relaxed);
            count += observed;
            // Whole microseconds over 10^6: exactly the f64 the decimal literal would be.
            let bound = RPC_BUCKETS_MICROS.get(i).map_or(f64::INFINITY, |&micros| micros as f64 / 1e6);
            *bucket = (bound, observed);
        }
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

struct Metrics {
    registry: Registry,
    grpc_requests: Family<RpcLabels, Counter>,
    grpc_duration: HistogramFamily<RpcLabels>,
    logins: Family<OutcomeLabel, Counter>,
    lockouts: Family<BudgetLabel, Counter>,
    rate_limited: Family<LimitLabel, Counter>,
    revocations: Family<CauseLabel, Counter>,
    outbox_backlog: Gauge,
    mail_delivered: Counter,
    mail_failures: Family<KindLabel, Counter>,
    store_errors: Family<KindLabel, Counter>,
    hot_state_errors: Counter,
}

fn rpc_histogram() -> RpcHistogram {
    RpcHistogram::default()
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("portcullis");
    let grpc_requests = Family::<RpcLabels, Counter>::default();
    let grpc_duration = HistogramFamily::<RpcLabels>::new_with_constructor(rpc_histogram);
    let logins = Family::<OutcomeLabel, Counter>::default();
    let lockouts = Family::<BudgetLabel, Counter>::default();
    let rate_limited = Family::<LimitLabel, Counter>::default();
    let revocations = Family::<CauseLabel, Counter>::default();
    let outbox_backlog = Gauge::default();
    let mail_delivered = Counter::default();
    let mail_failures = Family::<KindLabel, Counter>::default();
    let store_errors = Family::<KindLabel, Counter>::default();
    let hot_state_errors = Counter::default();
    let build_info = Family::<VersionLabel, Gauge>::default();
    build_info.get_or_create(&VersionLabel { version: env!("CARGO_PKG_VERSION") }).set(1);

    // Counters get their `_total` suffix, and the histogram its `_seconds`, from the encoder.
    registry.register("build_info", "The running version (value 1)", build_info);
    registry.register(
        "grpc_requests",
        "gRPC calls finished, by method and status code",
        grpc_requests.clone(),
    );
    registry.register_with_unit(
        "grpc_request_duration",
        "Time from a gRPC call's arrival to its status (trailers), by method and status code",
        Unit::Seconds,
        grpc_duration.clone(),
    );
    registry.register(
        "logins",
        "Login tries (password or second-factor code) by outcome: the login history's reasons, \
         plus `throttled` for tries refused per address before any check",
        logins.clone(),
    );
    registry.register("lockouts", "Failure budgets that ran out and locked, by budget", lockouts.clone());
    registry.register("rate_limited", "Requests refused by a rate limit, by limit", rate_limited.clone());
    registry.register("revocations", "Sessions revoked, by cause", revocations.clone());
    registry.register(
        "outbox_backlog",
        "Mails queued and not yet sent or given up (as of the outbox worker's last poll)",
        outbox_backlog.clone(),
    );
    registry.register("mail_delivered", "Mails handed over to the transport", mail_delivered.clone());
    registry.register(
        "mail_delivery_failures",
        "Failed delivery attempts: `retry` (tried again later) or `give_up` (the last one)",
        mail_failures.clone(),
    );
    registry.register(
        "store_errors",
        "Database errors: `unavailable` (connection, timeout, failover) or `database` (any other)",
        store_errors.clone(),
    );
    registry.register("hot_state_errors", "Failed Redis calls (timeouts included)", hot_state_errors.clone());
    Metrics {
        registry,
        grpc_requests,
        grpc_duration,
        logins,
        lockouts,
        rate_limited,
        revocations,
        outbox_backlog,
        mail_delivered,
        mail_failures,
        store_errors,
        hot_state_errors,
    }
});

/// Every metric, in the OpenMetrics text format.
pub fn render() -> String {
    let mut text = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail.
    _ = encode(&mut text, &METRICS.registry);
    text
}

/// The two series of one (gRPC method, status code) pair, resolved once and then recorded
/// into without any lookup.
#[derive(Clone, Debug)]
pub struct RpcSeries {
    requests: Counter,
    duration: RpcHistogram,
}

impl RpcSeries {
    pub fn new(method: &'static str, code: &'static str) -> RpcSeries {
        let labels = RpcLabels { method, code };
        RpcSeries {
            requests: METRICS.grpc_requests.get_or_create_owned(&labels),
            duration: METRICS.grpc_duration.get_or_create_owned(&labels),
        }
    }

    pub fn record(&self, elapsed: Duration) {
        self.requests.inc();
        self.duration.observe(elapsed);
    }
}

/// How a login try ended. The login history's reason codes (`LoginAttempt.reason`), so the
/// metric and the history speak the same language, plus [`LoginOutcome::Throttled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    /// `ok`: a session was opened (after the password, or after the second factor).
    Ok,
    InvalidCredentials,
    EmailNotVerified,
    /// The failure budget was locked: refused before the password counted.
    Locked,
    /// Right password; a second factor is asked for.
    MfaRequired,
    InvalidMfaCode,
    MfaLocked,
    /// Refused by the IP block or the client throttle before anything was checked (not in
    /// the history).
    Throttled,
    /// A reason this list does not know yet.
    Other,
}

impl LoginOutcome {
    /// The outcome of a login-history reason.
    pub fn from_reason(reason: &str) -> LoginOutcome {
        match reason {
            "ok" => LoginOutcome::Ok,
            "invalid_credentials" => LoginOutcome::InvalidCredentials,
            "email_not_verified" => LoginOutcome::EmailNotVerified,
            "locked" => LoginOutcome::Locked,
            "mfa_required" => LoginOutcome::MfaRequired,
            "invalid_mfa_code" => LoginOutcome::InvalidMfaCode,
            "mfa_locked" => LoginOutcome::MfaLocked,
            _ => LoginOutcome::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LoginOutcome::Ok => "ok",
            LoginOutcome::InvalidCredentials => "invalid_credentials",
            LoginOutcome::EmailNotVerified => "email_not_verified",
            LoginOutcome::Locked => "locked",
            LoginOutcome::MfaRequired => "mfa_required",
            LoginOutcome::InvalidMfaCode => "invalid_mfa_code",
            LoginOutcome::MfaLocked => "mfa_locked",
            LoginOutcome::Throttled => "throttled",
            LoginOutcome::Other => "other",
        }
    }
}

pub fn login(outcome: LoginOutcome) {
    METRICS.logins.get_or_create(&OutcomeLabel { outcome: outcome.as_str() }).inc();
}

/// A failure budget locked (`account`, `known_device`, `second_factor`).
pub fn lockout(budget: &'static str) {
    METRICS.lockouts.get_or_create(&BudgetLabel { budget }).inc();
}

/// A request refused by a rate limit (named as its setting: `register_per_ip`, ...).
pub fn rate_limited(limit: &'static str) {
    METRICS.rate_limited.get_or_create(&LimitLabel { limit }).inc();
}

/// `sessions` sessions revoked (committed to the store) for `cause`.
pub fn revoked(cause: &'static str, sessions: usize) {
    if sessions > 0 {
        METRICS.revocations.get_or_create(&CauseLabel { cause }).inc_by(sessions as u64);
    }
}

pub fn outbox_backlog(pending: u64) {
    METRICS.outbox_backlog.set(i64::try_from(pending).unwrap_or(i64::MAX));
}

pub fn mail_delivered() {
    METRICS.mail_delivered.inc();
}

/// A delivery attempt failed; `given_up` when it was the last.
pub fn mail_delivery_failed(given_up: bool) {
    let kind = if given_up { "give_up" } else { "retry" };
    METRICS.mail_failures.get_or_create(&KindLabel { kind }).inc();
}

/// A database error; `unavailable` for the transient kind (connection, timeout, failover).
pub fn store_error(unavailable: bool) {
    let kind = if unavailable { "unavailable" } else { "database" };
    METRICS.store_errors.get_or_create(&KindLabel { kind }).inc();
}

pub fn hot_state_error() {
    METRICS.hot_state_errors.inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_names_with_prefix_and_suffixes() {
        RpcSeries::new("portcullis.v1.AuthService/ValidateToken", "OK").record(Duration::from_micros(50));
        login(LoginOutcome::from_reason("invalid_credentials"));
        revoked("logout", 2);
        revoked("logout", 0);
        let text = render();
        assert!(
            text.contains(
                r#"portcullis_grpc_requests_total{method="portcullis.v1.AuthService/ValidateToken",code="OK"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE portcullis_grpc_request_duration_seconds histogram"), "{text}");
        assert!(text.contains(r#"portcullis_logins_total{outcome="invalid_credentials"} 1"#), "{text}");
        assert!(text.contains(r#"portcullis_revocations_total{cause="logout"} 2"#), "{text}");
        assert!(text.contains("portcullis_build_info{version="), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// The text of one metric as prometheus-client renders it.
    fn encoded(metric: impl EncodeMetric + Send + Sync + std::fmt::Debug + 'static) -> String {
        let mut registry = Registry::with_prefix("test");
        registry.register_with_unit("latency", "Latency", Unit::Seconds, metric);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn the_lock_free_histogram_renders_as_prometheus_clients_own() {
        let observations = [
            Duration::ZERO,
            Duration::from_micros(40),
            Duration::from_micros(100), // on a bound: `le` is inclusive
            Duration::from_nanos(100_001),
            Duration::from_micros(900),
            Duration::from_millis(120),
            Duration::from_secs(3),
            Duration::from_secs(30),
            Duration::from_secs(31), // past every bound: +Inf only
        ];
        let ours = RpcHistogram::default();
        let bounds = RPC_BUCKETS_MICROS.map(|micros| micros as f64 / 1e6);
        let theirs = prometheus_client::metrics::histogram::Histogram::new(bounds);
        for elapsed in observations {
            ours.observe(elapsed);
            theirs.observe(elapsed.as_secs_f64());
        }
        let (ours, theirs) = (encoded(ours.clone()), encoded(theirs));
        fn without_sum(text: &str) -> Vec<&str> {
            text.lines().filter(|l| !l.starts_with("test_latency_seconds_sum")).collect()
        }
        assert_eq!(without_sum(&ours), without_sum(&theirs), "{ours}\n{theirs}");
        // Cumulative buckets, bounds in seconds, then +Inf.
        for line in [
            "# TYPE test_latency_seconds histogram",
            "test_latency_seconds_count 9",
            r#"test_latency_seconds_bucket{le="0.0001"} 3"#,
            r#"test_latency_seconds_bucket{le="0.00025"} 4"#,
            r#"test_latency_seconds_bucket{le="0.001"} 5"#,
            r#"test_latency_seconds_bucket{le="0.25"} 6"#,
            r#"test_latency_seconds_bucket{le="2.5"} 6"#,
            r#"test_latency_seconds_bucket{le="5.0"} 7"#,
            r#"test_latency_seconds_bucket{le="30.0"} 8"#,
            r#"test_latency_seconds_bucket{le="+Inf"} 9"#,
        ] {
            assert!(ours.lines().any(|l| l == line), "no {line:?} in\n{ours}");
        }
        let sum: f64 = ours
            .lines()
            .find_map(|l| l.strip_prefix("test_latency_seconds_sum "))
            .expect("a sum")
            .parse()
            .unwrap();
        assert!((sum - 64.121_140_001).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn the_histogram_counts_from_every_thread() {
        let histogram = RpcHistogram::default();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..10_000 {
                        histogram.observe(Duration::from_micros(30));
                    }
                });
            }
        });
        let text = encoded(histogram);
        assert!(text.contains("test_latency_seconds_count 40000\n"), "{text}");
        assert!(text.contains("test_latency_seconds_sum 1.2\n"), "{text}");
    }

    #[test]
    fn unknown_history_reasons_are_other() {
        assert_eq!(LoginOutcome::from_reason("something new"), LoginOutcome::Other);
        for reason in [
            "ok",
            "invalid_credentials",
            "email_not_verified",
            "locked",
            "mfa_required",
            "invalid_mfa_code",
            "mfa_locked",
        ] {
            assert_eq!(LoginOutcome::from_reason(reason).as_str(), reason);
        }
    }
}
