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
        Ok(Response::new(pb::GetAccountResponse {
            user: Some(convert::user(account.user)),
            active_sessions: account.active_sessions as u32,
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
}
