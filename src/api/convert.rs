//! Domain values to protobuf messages.

use time::OffsetDateTime;

use super::pb;
use crate::{
    auth::{IssuedTokens, LoginOutcome, MfaChallengeIssued, MfaStatus},
    store::{AttemptOutcome, Location, LoginAttempt, MfaMethod, SessionRecord, UserRecord},
};

pub fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.unix_timestamp(), nanos: t.nanosecond() as i32 }
}

pub fn user(user: UserRecord) -> pb::User {
    pb::User {
        id: user.id.to_string(),
        username: user.username,
        email: user.email,
        first_name: user.first_name,
        last_name: user.last_name,
        email_verified: user.email_verified_at.is_some(),
        roles: user.roles,
        created_at: Some(timestamp(user.created_at)),
        phone: user.phone,
        bio: user.bio,
    }
}

pub fn session(session: SessionRecord, current: bool) -> pb::Session {
    pb::Session {
        id: session.id.to_string(),
        device_type: session.device.device_type,
        browser: session.device.browser,
        os: session.device.os,
        ip_address: session.device.ip_address,
        created_at: Some(timestamp(session.created_at)),
        last_active_at: Some(timestamp(session.last_active_at)),
        expires_at: Some(timestamp(session.expires_at)),
        current,
        location: session.location.map(location),
    }
}

pub fn location(location: Location) -> pb::Location {
    pb::Location {
        country: location.country,
        city: location.city,
        latitude: location.latitude,
        longitude: location.longitude,
    }
}

pub fn login_attempt(attempt: LoginAttempt) -> pb::LoginAttempt {
    pb::LoginAttempt {
        id: attempt.id.to_string(),
        at: Some(timestamp(attempt.at)),
        success: attempt.outcome == AttemptOutcome::Success,
        reason: attempt.reason,
        identifier: attempt.identifier,
        ip_address: attempt.device.ip_address,
        user_agent: attempt.device.user_agent,
        device_type: attempt.device.device_type,
        browser: attempt.device.browser,
        os: attempt.device.os,
        location: attempt.location.map(location),
    }
}

pub fn tokens(tokens: IssuedTokens) -> pb::TokenPair {
    pb::TokenPair {
        access_token: tokens.access.token,
        access_token_expires_at: Some(timestamp(tokens.access.expires_at)),
        refresh_token: tokens.refresh_token,
        refresh_token_expires_at: Some(timestamp(tokens.refresh_expires_at)),
        token_type: "Bearer".into(),
    }
}

/// The answer to a completed login (password, or password and second factor).
pub fn authenticated(outcome: LoginOutcome) -> pb::AuthenticatedSession {
    pb::AuthenticatedSession {
        tokens: Some(tokens(outcome.tokens)),
        session: Some(session(outcome.session, true)),
        user: Some(user(outcome.user)),
    }
}

pub fn mfa_challenge(challenge: MfaChallengeIssued) -> pb::MfaChallenge {
    let method = match challenge.method {
        MfaMethod::EmailOtp => pb::MfaMethod::EmailOtp,
        MfaMethod::Totp => pb::MfaMethod::Totp,
    };
    pb::MfaChallenge {
        challenge_token: challenge.token,
        method: method as i32,
        expires_at: Some(timestamp(challenge.expires_at)),
    }
}

pub fn mfa_status(status: MfaStatus) -> pb::MfaStatus {
    pb::MfaStatus {
        email_otp_enabled: status.email_otp_enabled,
        totp_enabled: status.totp_enabled,
        recovery_codes_remaining: status.recovery_codes_remaining,
    }
}
