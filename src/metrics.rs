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
//! increments a counter and observes a histogram per call.

use std::{sync::LazyLock, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// What `GET /metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets, in seconds: ValidateToken answers in tens of microseconds, a login
/// spends hundreds of milliseconds in bcrypt, and `server.request_timeout` is 30 s.
const RPC_BUCKETS: [f64; 17] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
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

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

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

fn rpc_histogram() -> Histogram {
    Histogram::new(RPC_BUCKETS)
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
    duration: Histogram,
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
        self.duration.observe(elapsed.as_secs_f64());
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
