//! Durable failure budgets (account lockout), kept in the store so that a Redis outage or
//! flush never unlocks an account.
//!
//! A try is counted BEFORE its secret is checked (`reserve_try`, one conditional upsert):
//! of any number of concurrent tries at most `max_failures` are ever evaluated, and a good
//! one gives its count back. The try that used the last unit of the budget and failed locks
//! the guard, for a time that doubles with each consecutive lockout.
//!
//! Budgets, per subject (an account by id, so its username and email share one; or the
//! case-folded identifier when it names no account, so that a locked answer cannot tell the
//! two apart):
//! - `account`: password tries from anywhere;
//! - `device:<key>`: password tries from a device that already logged in to the account —
//!   its own, smaller budget, so someone hammering the account from elsewhere cannot lock
//!   its owner out;
//! - `otp`: second-factor codes, per account (a new challenge does not reset it).

use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use super::{Auth, AuthError, limits::key_part};
use crate::{
    config::Lockout,
    store::{GuardBudget, GuardKey, TryReservation},
};

/// A budget: which row, and its policy.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    pub(crate) key: GuardKey,
    pub(crate) policy: Lockout,
}

/// A try that may go ahead.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reserved {
    failures: u32,
    lockouts: u32,
}

impl Guard {
    pub(crate) fn account(user_id: Uuid, policy: Lockout) -> Guard {
        Guard { key: key(format!("u:{user_id}"), "account".into(), Some(user_id)), policy }
    }

    /// A login identifier that matched no account (already case-folded).
    pub(crate) fn unknown_identifier(identifier_key: &str, policy: Lockout) -> Guard {
        Guard { key: key(format!("i:{}", key_part(identifier_key)), "account".into(), None), policy }
    }

    pub(crate) fn known_device(user_id: Uuid, device_key: &[u8], policy: Lockout) -> Guard {
        let hex: String = device_key.iter().map(|b| format!("{b:02x}")).collect();
        Guard { key: key(format!("u:{user_id}"), format!("device:{hex}"), Some(user_id)), policy }
    }

    pub(crate) fn second_factor(user_id: Uuid, policy: Lockout) -> Guard {
        Guard { key: key(format!("u:{user_id}"), "otp".into(), Some(user_id)), policy }
    }

    fn budget(&self) -> GuardBudget {
        GuardBudget {
            max_failures: self.policy.max_failures,
            window: self.policy.window,
            // A quiet spell as long as the longest lockout forgets the growth.
            forget_lockouts_after: self.policy.max_lockout,
        }
    }
}

fn key(subject: String, scope: String, user_id: Option<Uuid>) -> GuardKey {
    GuardKey { subject, scope, user_id }
}

/// The `budget` label of `portcullis_lockouts_total`: the scope without its device key.
fn budget_name(scope: &str) -> &'static str {
    match scope {
        "account" => "account",
        "otp" => "second_factor",
        scope if scope.starts_with("device:") => "known_device",
        _ => "other",
    }
}

impl Auth {
    /// Counts a try against `guard` before its secret is checked, or says how long to wait.
    pub(crate) async fn reserve_try(&self, guard: &Guard) -> Result<Result<Reserved, Duration>, AuthError> {
        let now = OffsetDateTime::now_utc();
        Ok(match self.store.reserve_try(&guard.key, &guard.budget(), now).await? {
            TryReservation::Reserved { failures, lockouts } => Ok(Reserved { failures, lockouts }),
            TryReservation::Locked { until } => {
                Err(Duration::try_from(until - now).unwrap_or(Duration::ZERO).max(Duration::from_secs(1)))
            }
            // The last tries of the budget are still being checked: if they fail, this is how
            // long the lock will be.
            TryReservation::Exhausted { lockouts } => Err(guard.policy.duration_after(lockouts)),
        })
    }

    /// The reserved try failed. Returns how long the guard is now locked for when this
    /// failure used up the budget (exactly one failure per lockout does).
    pub(crate) async fn try_failed(&self, guard: &Guard, reserved: Reserved) -> Option<Duration> {
        if reserved.failures < guard.policy.max_failures {
            return None;
        }
        let lock_for = guard.policy.duration_after(reserved.lockouts);
        let now = OffsetDateTime::now_utc();
        match self.store.lock_guard(&guard.key, now + lock_for, now).await {
            Ok(true) => {
                crate::metrics::lockout(budget_name(&guard.key.scope));
                Some(lock_for)
            }
            Ok(false) => None,
            Err(error) => {
                // The budget stays used up (Exhausted) until its window ends: still closed.
                tracing::warn!(error = ?error, scope = guard.key.scope, "cannot lock a login guard");
                None
            }
        }
    }

    /// A try proved good: its budget starts afresh.
    pub(crate) async fn try_succeeded(&self, guard: &Guard) {
        if let Err(error) = self.store.clear_guard(&guard.key).await {
            tracing::warn!(error = ?error, scope = guard.key.scope, "cannot reset a login guard");
        }
    }

    /// Checks the password of a signed-in caller (changing the password or the email,
    /// deleting the account, MFA changes) against the account's budget: a stolen access
    /// token must not be an unlimited password oracle. Locked: the same bcrypt is paid.
    pub(crate) async fn check_own_password(
        &self,
        user: &crate::store::UserRecord,
        password: &str,
        field: &'static str,
    ) -> Result<(), AuthError> {
        let guard = Guard::account(user.id, self.login.account_lockout);
        let reserved = match self.reserve_try(&guard).await? {
            Ok(reserved) => reserved,
            Err(retry_after) => {
                let _ = self.hasher.verify(password, None).await?;
                return Err(AuthError::TooManyAttempts { retry_after });
            }
        };
        if !self.hasher.verify(password, Some(&user.password_hash)).await?.matches {
            if let Some(locked_for) = self.try_failed(&guard, reserved).await {
                tracing::warn!(user_id = %user.id, ?locked_for, "account locked by wrong current passwords");
            }
            return Err(AuthError::invalid(field, format!("{field} is incorrect")));
        }
        self.try_succeeded(&guard).await;
        Ok(())
    }
}
