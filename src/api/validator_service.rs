//! `portcullis.v1.AuthService` in validator (sidecar) mode: ValidateToken and GetJwks are
//! answered here; every other call belongs to the central instance (`UNIMPLEMENTED`, with
//! a message saying so).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    auth_service::{jwks_response, validation_response},
    pb::{self, auth_service_server::AuthService},
    status::to_status,
};
use crate::{auth::ValidatesTokens, token::keys::Jwks, validator::Validator};

pub struct ValidatorAuthApi {
    validator: Arc<Validator>,
}

impl ValidatorAuthApi {
    pub fn new(validator: Arc<Validator>) -> ValidatorAuthApi {
        ValidatorAuthApi { validator }
    }
}

fn central_only() -> Status {
    Status::unimplemented("this is a Portcullis validator (sidecar): call the central instance for this")
}

#[tonic::async_trait]
impl AuthService for ValidatorAuthApi {
    async fn validate_token(
        &self,
        request: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        let r = request.into_inner();
        let check = self.validator.validate_token(&r.token, &r.required_roles).await.map_err(to_status)?;
        Ok(Response::new(validation_response(check)))
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        // The set as loaded, structured as the server does it; a set with members of other
        // shapes (another issuer's keys in a shared file) is still served as a document.
        let jwks_json = self.validator.jwks();
        let keys = serde_json::from_str::<Jwks>(&jwks_json)
            .map(|jwks| jwks_response(&jwks).keys)
            .unwrap_or_default();
        Ok(Response::new(pb::GetJwksResponse { jwks_json, keys }))
    }

    async fn register(
        &self,
        _: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        Err(central_only())
    }
    async fn verify_email(
        &self,
        _: Request<pb::VerifyEmailRequest>,
    ) -> Result<Response<pb::VerifyEmailResponse>, Status> {
        Err(central_only())
    }
    async fn resend_verification(
        &self,
        _: Request<pb::ResendVerificationRequest>,
    ) -> Result<Response<pb::ResendVerificationResponse>, Status> {
        Err(central_only())
    }
    async fn login(&self, _: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        Err(central_only())
    }
    async fn verify_mfa(
        &self,
        _: Request<pb::VerifyMfaRequest>,
    ) -> Result<Response<pb::VerifyMfaResponse>, Status> {
        Err(central_only())
    }
    async fn refresh(&self, _: Request<pb::RefreshRequest>) -> Result<Response<pb::RefreshResponse>, Status> {
        Err(central_only())
    }
    async fn logout(&self, _: Request<pb::LogoutRequest>) -> Result<Response<pb::LogoutResponse>, Status> {
        Err(central_only())
    }
    async fn report_unrecognized_login(
        &self,
        _: Request<pb::ReportUnrecognizedLoginRequest>,
    ) -> Result<Response<pb::ReportUnrecognizedLoginResponse>, Status> {
        Err(central_only())
    }
}
