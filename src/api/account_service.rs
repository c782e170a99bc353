//! `portcullis.v1.AccountService`: the caller's own account.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    ApiContext,
    client::{bearer, client_info},
    convert,
    pb::{self, account_service_server::AccountService},
    status::to_status,
};
use crate::auth::{AuthError, Principal, ProfileUpdate};

pub struct AccountApi {
    ctx: Arc<ApiContext>,
}

impl AccountApi {
    pub fn new(ctx: Arc<ApiContext>) -> AccountApi {
        AccountApi { ctx }
    }

    async fn principal<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        self.ctx.auth.authenticate(bearer(request.metadata())).await.map_err(to_status)
    }
}

/// The profile fields named by the mask; an empty mask or an unknown path is refused, so a
/// client never changes more (or less) than it meant to.
fn profile_update(
    profile: pb::Profile,
    mask: Option<prost_types::FieldMask>,
    current_password: String,
) -> Result<ProfileUpdate, AuthError> {
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(AuthError::invalid("update_mask", "update_mask must name the fields to change"));
    }
    let mut update = ProfileUpdate { current_password, ..ProfileUpdate::default() };
    for path in paths {
        match path.as_str() {
            "first_name" => update.first_name = Some(profile.first_name.clone()),
            "last_name" => update.last_name = Some(profile.last_name.clone()),
            "phone" => update.phone = Some(profile.phone.clone()),
            "bio" => update.bio = Some(profile.bio.clone()),
            "email" => update.email = Some(profile.email.clone()),
            other => {
                return Err(AuthError::invalid(
                    "update_mask",
                    format!(
                        "update_mask: unknown field {other:?} (first_name, last_name, phone, bio, email)"
                    ),
                ));
            }
        }
    }
    Ok(update)
}

#[tonic::async_trait]
impl AccountService for AccountApi {
    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        let principal = self.principal(&request).await?;
        let account = self.ctx.auth.get_account(&principal).await.map_err(to_status)?;
        let mfa = self.ctx.auth.mfa_status(principal.user_id).await.map_err(to_status)?;
        Ok(Response::new(pb::GetAccountResponse {
            user: Some(convert::user(account.user)),
            active_sessions: account.active_sessions as u32,
            mfa: Some(convert::mfa_status(mfa)),
        }))
    }

    async fn update_profile(
        &self,
        request: Request<pb::UpdateProfileRequest>,
    ) -> Result<Response<pb::UpdateProfileResponse>, Status> {
        let principal = self.principal(&request).await?;
        let client = client_info(&request, request.get_ref().client.as_ref(), &self.ctx.trusted_proxies)
            .map_err(to_status)?;
        let r = request.into_inner();
        let update = profile_update(r.profile.unwrap_or_default(), r.update_mask, r.current_password)
            .map_err(to_status)?;
        let updated = self.ctx.auth.update_profile(&principal, update, &client).await.map_err(to_status)?;
        Ok(Response::new(pb::UpdateProfileResponse {
            user: Some(convert::user(updated.user)),
            email_change_pending: updated.email_change_pending,
        }))
    }

    async fn confirm_email_change(
        &self,
        request: Request<pb::ConfirmEmailChangeRequest>,
    ) -> Result<Response<pb::ConfirmEmailChangeResponse>, Status> {
        self.ctx.auth.confirm_email_change(&request.into_inner().token).await.map_err(to_status)?;
        Ok(Response::new(pb::ConfirmEmailChangeResponse {}))
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeleteAccountResponse>, Status> {
        let principal = self.principal(&request).await?;
        self.ctx.auth.delete_account(&principal, &request.into_inner().password).await.map_err(to_status)?;
        Ok(Response::new(pb::DeleteAccountResponse {}))
    }

    async fn set_email_otp(
        &self,
        request: Request<pb::SetEmailOtpRequest>,
    ) -> Result<Response<pb::SetEmailOtpResponse>, Status> {
        let principal = self.principal(&request).await?;
        let r = request.into_inner();
        let mfa = self
            .ctx
            .auth
            .set_email_otp(&principal, r.enabled, &r.current_password)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SetEmailOtpResponse { mfa: Some(convert::mfa_status(mfa)) }))
    }

    async fn begin_totp_enrollment(
        &self,
        request: Request<pb::BeginTotpEnrollmentRequest>,
    ) -> Result<Response<pb::BeginTotpEnrollmentResponse>, Status> {
        let principal = self.principal(&request).await?;
        let r = request.into_inner();
        let enrollment =
            self.ctx.auth.begin_totp(&principal, &r.current_password).await.map_err(to_status)?;
        Ok(Response::new(pb::BeginTotpEnrollmentResponse {
            secret: enrollment.secret_base32,
            otpauth_uri: enrollment.otpauth_uri,
        }))
    }

    async fn confirm_totp_enrollment(
        &self,
        request: Request<pb::ConfirmTotpEnrollmentRequest>,
    ) -> Result<Response<pb::ConfirmTotpEnrollmentResponse>, Status> {
        let principal = self.principal(&request).await?;
        let (recovery_codes, mfa) =
            self.ctx.auth.confirm_totp(&principal, &request.into_inner().code).await.map_err(to_status)?;
        Ok(Response::new(pb::ConfirmTotpEnrollmentResponse {
            recovery_codes,
            mfa: Some(convert::mfa_status(mfa)),
        }))
    }

    async fn disable_totp(
        &self,
        request: Request<pb::DisableTotpRequest>,
    ) -> Result<Response<pb::DisableTotpResponse>, Status> {
        let principal = self.principal(&request).await?;
        let mfa = self
            .ctx
            .auth
            .disable_totp(&principal, &request.into_inner().current_password)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DisableTotpResponse { mfa: Some(convert::mfa_status(mfa)) }))
    }
}
