//! New-device detection: a successful login from a device the user has not used before
//! mails an alert (time, IP, location, device) with a single-use "this wasn't me" link,
//! which ends every session and starts a password reset. The very first device of an
//! account raises no alert, and known devices none.
//!
//! A device is its fingerprint when the front end sends one, else its user agent plus the
//! network it comes from (/24 for IPv4, /48 for IPv6); only a hash of that is stored.

use std::{net::IpAddr, sync::Arc};

use aws_lc_rs::digest::{SHA256, digest};

use super::{
    Auth, AuthError, ClientInfo,
    limits::Verdict,
    mail::{describe_device, greeting_name},
    register::now_micros,
};
use uuid::Uuid;

use crate::{
    store::{DeviceSighting, RevokeReason, SessionRecord, TokenPurpose, UserRecord},
    token::one_time,
};

impl Auth {
    /// Remembers the device of a successful login and alerts when it is new — after the
    /// answer, so a caller cannot cut it short with a deadline, and in ONE transaction, so a
    /// device is never remembered without its alert. Never fails the login.
    pub(crate) fn note_device(self: &Arc<Self>, user: &UserRecord, client: &ClientInfo) {
        let (user_id, client) = (user.id, client.clone());
        self.in_background("new-device check", move |auth| async move {
            auth.check_device(user_id, &client).await
        });
    }

    async fn check_device(&self, user_id: Uuid, client: &ClientInfo) -> Result<(), AuthError> {
        let key = device_key(client);
        // A flood of logins from new devices must not flood the owner's mailbox: past the
        // limit the devices are remembered without an alert each. Counted before the
        // transaction (no Redis round trip while it holds locks, all of SQLite's), and
        // given back when the device turns out not to need an alert (the first one).
        let alert_budget = if self.store.is_known_device(user_id, &key).await? {
            None
        } else {
            let key = format!("alerts:user:{}", user_id.simple());
            Some(
                self.limiter
                    .hit(key, &self.limits.new_device_alerts_per_account, || self.resync.notify_one())
                    .await,
            )
        };
        let mut tx = self.store.begin().await?;
        // Locking the user serialises sightings on one account (one "first device").
        let Some(user) = tx.lock_user(user_id).await? else { return Ok(()) };
        let sighting = tx.remember_device(user.id, &key, now_micros()).await?;
        let alerting = sighting == (DeviceSighting::New { first_device: false });
        match (&alert_budget, alerting) {
            (Some(Verdict::Allowed(_)), true) => {
                let ttl = self.mail.unrecognized_login_ttl;
                // The token remembers where the alert went: the reset it may start goes there.
                let recipient = Some(user.email.clone());
                let token =
                    self.issue_link(&mut tx, user.id, TokenPurpose::DisownLogin, ttl, recipient).await?;
                let mail = self.templates.new_device_login(
                    greeting_name(&user),
                    &token,
                    ttl,
                    &self.activity(client),
                );
                self.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
                tracing::info!(user_id = %user.id, "login from a new device: alert sent");
            }
            (Some(Verdict::Denied { .. }), true) => {
                tracing::info!(user_id = %user.id, "login from a new device: alert skipped (over the limit)");
            }
            (Some(Verdict::Allowed(counted)), false) => self.limiter.refund(counted).await,
            _ => {}
        }
        self.commit_with_mail(tx).await
    }

    /// "This wasn't me": every session ends, pending account links die, and a password
    /// reset link goes to the address on file.
    pub async fn disown_login(&self, token: &str, client: &ClientInfo) -> Result<(), AuthError> {
        let hash =
            one_time::parse(token, TokenPurpose::DisownLogin).ok_or(AuthError::InvalidToken("token"))?;
        let now = now_micros();
        let (mut tx, user, spent) = self.spend_token(&hash, TokenPurpose::DisownLogin, now).await?;
        self.kill_account_links(&mut tx, user.id, now).await?;
        tx.invalidate_tokens(user.id, TokenPurpose::DisownLogin, now).await?;
        let revoked = tx.revoke_user_sessions(user.id, None, RevokeReason::LoginDisowned, now).await?;
        // To the address the alert went to: if the account's address was changed since
        // (perhaps by whoever this wasn't), the owner's mailbox still gets the reset.
        let to = spent.new_email.unwrap_or_else(|| user.email.clone());
        self.queue_reset_link(&mut tx, &user, &to, client).await?;
        self.commit_with_mail(tx).await?;
        crate::metrics::revoked(RevokeReason::LoginDisowned.as_str(), revoked.len());
        tracing::warn!(user_id = %user.id, sessions = revoked.len(), "login disowned by the account owner");
        self.publish_committed(&revoked).await;
        Ok(())
    }

    /// Tells the owner that a refresh token came back after use (a sign of theft) and its
    /// session was ended. Best effort.
    pub(crate) async fn mail_refresh_reuse(&self, session: &SessionRecord) {
        let result = async {
            let Some(user) = self.store.find_user(session.user_id).await? else { return Ok(()) };
            let device = describe_device(&session.device);
            let mail = self.templates.refresh_token_reused(greeting_name(&user), &device);
            let mut tx = self.store.begin().await?;
            self.queue_mail(&mut tx, Some(user.id), &user.email, mail).await?;
            self.commit_with_mail(tx).await
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(session_id = %session.id, error = ?error, "cannot mail the refresh-reuse notice");
        }
    }
}

/// What identifies a device, hashed.
pub(crate) fn device_key(client: &ClientInfo) -> Vec<u8> {
    let fingerprint = client.fingerprint.trim();
    let material = if fingerprint.is_empty() {
        format!("ua:{}|net:{}", client.user_agent.trim(), network(client.ip))
    } else {
        format!("fp:{fingerprint}")
    };
    digest(&SHA256, material.as_bytes()).as_ref().to_vec()
}

/// The network an address belongs to, coarsely: a device moving within it stays known.
fn network(ip: Option<IpAddr>) -> String {
    match ip.map(|ip| ip.to_canonical()) {
        Some(IpAddr::V4(v4)) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(ip: &str, ua: &str, fp: &str) -> ClientInfo {
        ClientInfo { ip: ip.parse().ok(), user_agent: ua.into(), fingerprint: fp.into() }
    }

    #[test]
    fn devices_are_their_fingerprint_or_agent_and_network() {
        let key = |ip, ua, fp| device_key(&client(ip, ua, fp));
        assert_eq!(key("203.0.113.7", "A", "fp1"), key("198.51.100.1", "B", "fp1"), "fingerprint wins");
        assert_ne!(key("203.0.113.7", "A", "fp1"), key("203.0.113.7", "A", "fp2"));
        assert_eq!(key("203.0.113.7", "A", ""), key("203.0.113.99", "A", ""), "same /24");
        assert_ne!(key("203.0.113.7", "A", ""), key("203.0.114.7", "A", ""), "another network");
        assert_ne!(key("203.0.113.7", "A", ""), key("203.0.113.7", "B", ""), "another agent");
        assert_eq!(key("2001:db8:1:2::1", "A", ""), key("2001:db8:1:ffff::9", "A", ""), "same /48");
    }
}
