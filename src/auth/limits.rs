//! Rate limits and blocks in the hot state, with this process's own windows as the fallback
//! while the hot state is unreachable.
//!
//! Request limits and IP blocks are a defence against floods, not a source of truth: with
//! Redis down each replica keeps counting on its own (so N replicas allow up to N times the
//! limit until Redis is back) rather than refusing every caller or letting every caller
//! through. Where failing open would hand an attacker unlimited guesses — MFA codes — use
//! [`Limiter::hit_strict`], which refuses instead. Account lockout is not here at all: it is
//! durable, in the store (see `auth::guard`).

use std::time::Duration;

use uuid::Uuid;

use crate::{
    config::RateLimit,
    hot::{DynHotState, HotError, HotState, Limit, LimitDecision, MemoryHotState},
};

pub(crate) struct Limiter {
    hot: DynHotState,
    local: MemoryHotState,
}

/// Which state counted an event, so a refund goes back to the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counter {
    Shared,
    Local,
}

/// One counted event, to take back if the attempt turns out good.
#[derive(Debug, Clone)]
pub(crate) struct Counted {
    key: String,
    member: String,
    counter: Counter,
}

/// What a limit answered.
#[derive(Debug)]
pub(crate) enum Verdict {
    Allowed(Counted),
    Denied { retry_after: Duration },
}

fn limit(rate: &RateLimit) -> Limit {
    Limit { limit: rate.limit, window: rate.window, block: rate.block }
}

impl Limiter {
    pub(crate) fn new(hot: DynHotState) -> Limiter {
        Limiter { hot, local: MemoryHotState::new() }
    }

    /// Counts one event against `key`; falls back to this process's windows when the hot
    /// state fails (`fell_back` is called then, so the caller can note the outage).
    pub(crate) async fn hit(&self, key: String, rate: &RateLimit, fell_back: impl FnOnce()) -> Verdict {
        let member = Uuid::new_v4().simple().to_string();
        let (decision, counter) = match self.hot.limit_hit(&key, limit(rate), &member).await {
            Ok(decision) => (decision, Counter::Shared),
            Err(error) => {
                tracing::warn!(error = ?error, "hot state unavailable: rate limit counted in this process");
                fell_back();
                let decision = self.local.limit_hit(&key, limit(rate), &member).await;
                (decision.unwrap_or(LimitDecision::Allowed { count: 1 }), Counter::Local)
            }
        };
        verdict(decision, Counted { key, member, counter })
    }

    /// Counts one event against `key` in the hot state only: an error is returned, never
    /// a guess, so a caller can fail closed.
    pub(crate) async fn hit_strict(&self, key: String, rate: &RateLimit) -> Result<Verdict, HotError> {
        let member = Uuid::new_v4().simple().to_string();
        let decision = self.hot.limit_hit(&key, limit(rate), &member).await?;
        Ok(verdict(decision, Counted { key, member, counter: Counter::Shared }))
    }

    /// Takes an event back (the attempt was good). Best effort: an event that cannot be
    /// taken back only ages out of its window.
    pub(crate) async fn refund(&self, counted: &Counted) {
        let result = match counted.counter {
            Counter::Shared => self.hot.limit_refund(&counted.key, &counted.member).await,
            Counter::Local => self.local.limit_refund(&counted.key, &counted.member).await,
        };
        if let Err(error) = result {
            tracing::warn!(error = ?error, "cannot take back a rate-limit event");
        }
    }
}

/// Counts a refusal in `portcullis_rate_limited_total`.
fn verdict(decision: LimitDecision, counted: Counted) -> Verdict {
    match decision {
        LimitDecision::Allowed { .. } => Verdict::Allowed(counted),
        LimitDecision::Denied { retry_after } => {
            crate::metrics::rate_limited(limit_name(&counted.key));
            Verdict::Denied { retry_after }
        }
    }
}

/// The `limit` label of `portcullis_rate_limited_total`: the setting a key's prefix belongs
/// to (never the key itself, which names an address or an account).
fn limit_name(key: &str) -> &'static str {
    const PREFIXES: &[(&str, &str)] = &[
        ("login:ip:", "ip_block"),
        ("login:client:", "client_throttle"),
        ("register:ip:", "register_per_ip"),
        ("forgot:ip:", "forgot_password_per_ip"),
        ("forgot:id:", "forgot_password_per_account"),
        ("forgot:user:", "forgot_password_per_account"),
        ("resend:ip:", "resend_verification_per_ip"),
        ("resend:email:", "resend_verification_per_account"),
        ("mfa:challenge:", "verify_mfa_per_challenge"),
        ("mfa:mail:user:", "login_codes_per_account"),
        ("alerts:user:", "new_device_alerts_per_account"),
    ];
    PREFIXES.iter().find(|(prefix, _)| key.starts_with(prefix)).map_or("other", |(_, name)| name)
}

/// A key part naming an identifier or address without writing it into Redis: hex of the
/// first 16 bytes of its SHA-256 (ample to keep distinct keys apart).
pub(crate) fn key_part(value: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value.as_bytes());
    digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

impl super::Auth {
    /// Counts one request against every limit in `checks`; the first that is full refuses
    /// it (the counts already taken for this request are given back).
    pub(crate) async fn enforce_limits(
        &self,
        checks: Vec<(String, &RateLimit)>,
    ) -> Result<(), super::AuthError> {
        let mut taken = Vec::with_capacity(checks.len());
        for (key, rate) in checks {
            match self.limiter.hit(key, rate, || self.resync.notify_one()).await {
                Verdict::Allowed(counted) => taken.push(counted),
                Verdict::Denied { retry_after } => {
                    for counted in &taken {
                        self.limiter.refund(counted).await;
                    }
                    tracing::info!(?retry_after, "request rate limited");
                    return Err(super::AuthError::RateLimited { retry_after });
                }
            }
        }
        Ok(())
    }

    /// Whether a mail to this account is within its limit; when not, the mail is skipped
    /// silently (the caller's answer never depends on it).
    pub(crate) async fn mail_allowed(&self, key: String, rate: &RateLimit) -> bool {
        match self.limiter.hit(key, rate, || self.resync.notify_one()).await {
            Verdict::Allowed(_) => true,
            Verdict::Denied { .. } => {
                tracing::info!("mail to an account skipped: over its limit");
                false
            }
        }
    }
}

/// The limit key of a client address: an IPv4 address (also when written IPv4-mapped), an
/// IPv6 /64 (the smallest block one client is given, so rotating addresses within it does
/// not escape a limit), or one shared bucket for calls that carry none.
pub(crate) fn ip_part(ip: Option<std::net::IpAddr>) -> String {
    match ip.map(|ip| ip.to_canonical()) {
        Some(std::net::IpAddr::V4(v4)) => v4.to_string(),
        Some(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        None => "none".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::ip_part;

    #[test]
    fn limit_keys_are_named_by_their_setting() {
        use super::limit_name;
        assert_eq!(limit_name("login:ip:203.0.113.7"), "ip_block");
        assert_eq!(limit_name("login:client:none:abcd"), "client_throttle");
        assert_eq!(limit_name("forgot:user:0190"), "forgot_password_per_account");
        assert_eq!(limit_name("mfa:mail:user:0190"), "login_codes_per_account");
        assert_eq!(limit_name("mfa:challenge:0190"), "verify_mfa_per_challenge");
        assert_eq!(limit_name("something:new"), "other");
    }

    #[test]
    fn addresses_are_keyed_by_what_one_client_holds() {
        let key = |ip: &str| ip_part(Some(ip.parse().unwrap()));
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_eq!(key("::ffff:203.0.113.7"), "203.0.113.7", "IPv4-mapped is the IPv4 address");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff:1:2:3"), "one /64");
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(ip_part(None), "none");
    }
}
