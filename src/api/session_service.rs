//! `portcullis.v1.SessionService`: the caller's own sessions, behind their bearer token.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    ApiContext,
    client::bearer,
    convert,
    pb::{self, session_service_server::SessionService},
    status::to_status,
};
use crate::{
    auth::{AuthError, Principal},
    store::RevokeReason,
};

pub struct SessionApi {
    ctx: Arc<ApiContext>,
}

impl SessionApi {
    pub fn new(ctx: Arc<ApiContext>) -> SessionApi {
        SessionApi { ctx }
    }

    async fn principal<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        self.ctx.auth.authenticate(bearer(request.metadata())).await.map_err(to_status)
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let principal = self.principal(&request).await?;
        let sessions = self.ctx.auth.list_sessions(&principal).await.map_err(to_status)?;
        let sessions = sessions.into_iter().map(|s| {
            let current = s.id == principal.session_id;
            convert::session(s, current)
        });
        Ok(Response::new(pb::ListSessionsResponse { sessions: sessions.collect() }))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let principal = self.principal(&request).await?;
        let raw = request.into_inner().session_id;
        let session_id = Uuid::parse_str(raw.trim()).map_err(|_| {
            to_status(AuthError::invalid("session_id", "session_id must be a session id (a UUID)"))
        })?;
        self.ctx
            .auth
            .revoke_session(&principal, session_id, RevokeReason::RevokedByUser)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RevokeSessionResponse {}))
    }

    async fn revoke_other_sessions(
        &self,
        request: Request<pb::RevokeOtherSessionsRequest>,
    ) -> Result<Response<pb::RevokeSessionsResponse>, Status> {
        let principal = self.principal(&request).await?;
        let count = self.ctx.auth.revoke_sessions(&principal, true).await.map_err(to_status)?;
        Ok(Response::new(pb::RevokeSessionsResponse { revoked_count: count as u32 }))
    }

    async fn list_login_history(
        &self,
        request: Request<pb::ListLoginHistoryRequest>,
    ) -> Result<Response<pb::ListLoginHistoryResponse>, Status> {
        let principal = self.principal(&request).await?;
        let r = request.into_inner();
        let page =
            self.ctx.auth.login_history(&principal, r.page_size, &r.page_token).await.map_err(to_status)?;
        Ok(Response::new(pb::ListLoginHistoryResponse {
            attempts: page.attempts.into_iter().map(convert::login_attempt).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn revoke_all_sessions(
        &self,
        request: Request<pb::RevokeAllSessionsRequest>,
    ) -> Result<Response<pb::RevokeSessionsResponse>, Status> {
        let principal = self.principal(&request).await?;
        let count = self.ctx.auth.revoke_sessions(&principal, false).await.map_err(to_status)?;
        Ok(Response::new(pb::RevokeSessionsResponse { revoked_count: count as u32 }))
    }
}
