//! `portcullis.v1.PasswordService`: forgotten and changed passwords.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    ApiContext,
    client::{bearer, client_info},
    pb::{self, password_service_server::PasswordService},
    status::to_status,
};

pub struct PasswordApi {
    ctx: Arc<ApiContext>,
}

impl PasswordApi {
    pub fn new(ctx: Arc<ApiContext>) -> PasswordApi {
        PasswordApi { ctx }
    }
}

#[tonic::async_trait]
impl PasswordService for PasswordApi {
    async fn forgot_password(
        &self,
        request: Request<pb::ForgotPasswordRequest>,
    ) -> Result<Response<pb::ForgotPasswordResponse>, Status> {
        let client = client_info(&request, request.get_ref().client.as_ref(), &self.ctx.trusted_proxies)
            .map_err(to_status)?;
        self.ctx.auth.forgot_password(&request.into_inner().identifier, &client).await.map_err(to_status)?;
        Ok(Response::new(pb::ForgotPasswordResponse {}))
    }

    async fn check_reset_token(
        &self,
        request: Request<pb::CheckResetTokenRequest>,
    ) -> Result<Response<pb::CheckResetTokenResponse>, Status> {
        let valid = self.ctx.auth.check_reset_token(&request.into_inner().token).await.map_err(to_status)?;
        Ok(Response::new(pb::CheckResetTokenResponse { valid }))
    }

    async fn reset_password(
        &self,
        request: Request<pb::ResetPasswordRequest>,
    ) -> Result<Response<pb::ResetPasswordResponse>, Status> {
        let client = client_info(&request, request.get_ref().client.as_ref(), &self.ctx.trusted_proxies)
            .map_err(to_status)?;
        let r = request.into_inner();
        self.ctx.auth.reset_password(&r.token, r.new_password, &client).await.map_err(to_status)?;
        Ok(Response::new(pb::ResetPasswordResponse {}))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let principal = self.ctx.auth.authenticate(bearer(request.metadata())).await.map_err(to_status)?;
        let client = client_info(&request, request.get_ref().client.as_ref(), &self.ctx.trusted_proxies)
            .map_err(to_status)?;
        let r = request.into_inner();
        let revoked = self
            .ctx
            .auth
            .change_password(&principal, &r.current_password, r.new_password, &client)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ChangePasswordResponse { revoked_sessions: revoked as u32 }))
    }
}
