//! `portcullis.v1.AuthService`: each RPC converts, makes one call into `auth`, converts back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    ApiContext,
    client::{bearer, client_info},
    convert,
    pb::{self, auth_service_server::AuthService},
    status::to_status,
};
use crate::{
    auth::{InvalidReason, LoginResult, Registration, TokenCheck},
    token::TokenRejection,
};

pub struct AuthApi {
    ctx: Arc<ApiContext>,
}

impl AuthApi {
    pub fn new(ctx: Arc<ApiContext>) -> AuthApi {
        AuthApi { ctx }
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let client = client_info(&request, request.get_ref().client.as_ref(), &self.ctx.trusted_proxies)
            .map_err(to_status)?;
        let r = request.into_inner();
        let registration = Registration {
            username: r.username,
            email: r.email,
            password: r.password,
            first_name: r.first_name,
            last_name: r.last_name,
        };
        let user = self.ctx.auth.register(registration, &client).await.map_err(to_status)?;
        Ok(Response::new(pb::RegisterResponse { user: Some(convert::user(user)) }))
    }

    async fn verify_email(
        &self,
        request: Request<pb::VerifyEmailRequest>,
    ) -> Result<Response<pb::VerifyEmailResponse>, Status> {
        self.ctx.auth.verify_email(&request.into_inner().token).await.map_err(to_status)?;
        Ok(Response::new(pb::VerifyEmailResponse {}))
    }

    async fn resend_verification(
        &self,
        request: Request<pb::ResendVerificationRequest>,
    ) -> Result<Response<pb::ResendVerificationResponse>, Status> {
        let client = client_info(&request, request.get_ref().client.as_ref(), &self.ctx.trusted_proxies)
            .map_err(to_status)?;
        self.ctx.auth.resend_verification(&request.into_inner().email, &client).await.map_err(to_status)?;
        Ok(Response::new(pb::ResendVerificationResponse {}))
    }

    async fn login(&self, request: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        let client = client_info(&request, request.get_ref().client.as_ref(), &self.ctx.trusted_proxies)
            .map_err(to_status)?;
        let r = request.into_inner();
        let outcome =
            match self.ctx.auth.login(&r.identifier, &r.password, &client).await.map_err(to_status)? {
                LoginResult::Authenticated(outcome) => {
                    pb::login_response::Outcome::Authenticated(convert::authenticated(*outcome))
                }
                LoginResult::MfaRequired(challenge) => {
                    pb::login_response::Outcome::MfaRequired(convert::mfa_challenge(challenge))
                }
            };
        Ok(Response::new(pb::LoginResponse { outcome: Some(outcome) }))
    }

    async fn verify_mfa(
        &self,
        request: Request<pb::VerifyMfaRequest>,
    ) -> Result<Response<pb::VerifyMfaResponse>, Status> {
        let client = client_info(&request, request.get_ref().client.as_ref(), &self.ctx.trusted_proxies)
            .map_err(to_status)?;
        let r = request.into_inner();
        let outcome =
            self.ctx.auth.verify_mfa(&r.challenge_token, &r.code, &client).await.map_err(to_status)?;
        Ok(Response::new(pb::VerifyMfaResponse { authenticated: Some(convert::authenticated(outcome)) }))
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let tokens = self.ctx.auth.refresh(&request.into_inner().refresh_token).await.map_err(to_status)?;
        Ok(Response::new(pb::RefreshResponse { tokens: Some(convert::tokens(tokens)) }))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let principal = self.ctx.auth.authenticate(bearer(request.metadata())).await.map_err(to_status)?;
        self.ctx.auth.logout(&principal).await.map_err(to_status)?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn report_unrecognized_login(
        &self,
        request: Request<pb::ReportUnrecognizedLoginRequest>,
    ) -> Result<Response<pb::ReportUnrecognizedLoginResponse>, Status> {
        let client = client_info(&request, request.get_ref().client.as_ref(), &self.ctx.trusted_proxies)
            .map_err(to_status)?;
        self.ctx.auth.disown_login(&request.into_inner().token, &client).await.map_err(to_status)?;
        Ok(Response::new(pb::ReportUnrecognizedLoginResponse {}))
    }

    async fn validate_token(
        &self,
        request: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        let r = request.into_inner();
        let check = self.ctx.auth.validate_token(&r.token, &r.required_roles).await.map_err(to_status)?;
        Ok(Response::new(validation_response(check)))
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        Ok(Response::new(jwks_response(&self.ctx.auth.tokens().keys().jwks())))
    }
}

pub(super) fn jwks_response(jwks: &crate::token::keys::Jwks) -> pb::GetJwksResponse {
    let keys = jwks
        .keys
        .iter()
        .map(|k| pb::Jwk {
            kty: k.kty.clone(),
            kid: k.kid.clone(),
            r#use: k.key_use.clone(),
            alg: k.alg.clone(),
            n: k.n.clone().unwrap_or_default(),
            e: k.e.clone().unwrap_or_default(),
            crv: k.crv.clone().unwrap_or_default(),
            x: k.x.clone().unwrap_or_default(),
            y: k.y.clone().unwrap_or_default(),
        })
        .collect();
    pb::GetJwksResponse { jwks_json: jwks.to_json(), keys }
}

pub(super) fn validation_response(check: TokenCheck) -> pb::ValidateTokenResponse {
    use pb::TokenInvalidReason as R;
    match check {
        TokenCheck::Valid(valid) => pb::ValidateTokenResponse {
            valid: true,
            reason: R::Unspecified as i32,
            user_id: valid.user_id.to_string(),
            session_id: valid.session_id.to_string(),
            roles: valid.roles,
            expires_at: Some(convert::timestamp(valid.expires_at)),
            email_verified: valid.email_verified,
            amr: valid.amr,
        },
        TokenCheck::Invalid(reason) => {
            let reason = match reason {
                InvalidReason::Token(TokenRejection::Malformed) => R::Malformed,
                InvalidReason::Token(TokenRejection::BadSignature) => R::BadSignature,
                InvalidReason::Token(TokenRejection::Expired) => R::Expired,
                InvalidReason::Token(TokenRejection::NotYetValid) => R::NotYetValid,
                InvalidReason::Token(TokenRejection::WrongIssuer) => R::WrongIssuer,
                InvalidReason::Token(TokenRejection::WrongAudience) => R::WrongAudience,
                InvalidReason::SessionRevoked => R::SessionRevoked,
                InvalidReason::MissingRole => R::MissingRole,
            };
            pb::ValidateTokenResponse { valid: false, reason: reason as i32, ..Default::default() }
        }
    }
}
