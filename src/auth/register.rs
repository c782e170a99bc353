//! Register: parse everything, report every bad field at once, hash, insert.

use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Auth, AuthError, ClientInfo, FieldViolation,
    domain::{Email, PersonName, Username},
};
use crate::store::{NewUser, UserRecord};

/// A registration request as received.
#[derive(Clone, Default)]
pub struct Registration {
    pub username: String,
    pub email: String,
    pub password: String,
    pub first_name: String,
    pub last_name: String,
}

/// Never prints the password, whatever logs it.
impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("username", &self.username)
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Auth {
    pub async fn register(
        &self,
        request: Registration,
        client: &ClientInfo,
    ) -> Result<UserRecord, AuthError> {
        let mut violations = Vec::new();
        let username = field(&mut violations, "username", Username::parse(&request.username));
        let email = field(&mut violations, "email", Email::parse(&request.email));
        let first_name = field(&mut violations, "first_name", PersonName::parse(&request.first_name));
        let last_name = field(&mut violations, "last_name", PersonName::parse(&request.last_name));
        let identity = [request.username.trim(), request.email.trim()];
        let password = self
            .policy
            .parse(request.password, &identity)
            .map_err(|e| violations.push(FieldViolation::new("password", format!("password {e}"))))
            .ok();
        let (Some(username), Some(email), Some(first_name), Some(last_name), Some(password)) =
            (username, email, first_name, last_name, password)
        else {
            return Err(AuthError::InvalidArgument(violations));
        };

        // After validation (a typo costs no registration), before any hashing or writing.
        let ip = super::limits::ip_part(client.ip);
        self.enforce_limits(vec![(format!("register:ip:{ip}"), &self.limits.register_per_ip)]).await?;
        let password_hash = self.hasher.hash(password.expose()).await?;
        let user = NewUser {
            id: Uuid::now_v7(),
            username_key: username.key(),
            username: username.as_str().to_string(),
            email_key: email.key(),
            email: email.as_str().to_string(),
            password_hash,
            first_name: first_name.into_inner(),
            last_name: last_name.into_inner(),
            // Roles are granted by operators, never chosen at sign-up.
            roles: Vec::new(),
            created_at: now_micros(),
        };
        // The account and its verification mail commit together.
        let mut tx = self.store.begin().await?;
        let created = tx.create_user(&user).await?;
        self.queue_verification(&mut tx, &created).await?;
        self.commit_with_mail(tx).await?;
        crate::telemetry::record_user_id(created.id);
        tracing::info!(user_id = %created.id, "user registered");
        Ok(created)
    }
}

/// The parsed value, or `None` with the problem noted against `name`.
fn field<T>(
    violations: &mut Vec<FieldViolation>,
    name: &'static str,
    parsed: Result<T, String>,
) -> Option<T> {
    parsed.map_err(|e| violations.push(FieldViolation::new(name, format!("{name} {e}")))).ok()
}

/// Now, at the microsecond precision both databases store.
pub(crate) fn now_micros() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000).unwrap_or(now)
}
