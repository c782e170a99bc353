//! The floor of the `envoy` scenario: an ext_authz server that decides nothing. It allows
//! any request carrying an `authorization` header (with fixed identity headers, as many as
//! Portcullis sets) and refuses the others with 401, without reading the token.
//!
//! Envoy + ext_authz(this) against Envoy + jwt_authn is what Envoy's ext_authz filter and
//! the extra gRPC round trip cost by themselves; Envoy + ext_authz(Portcullis) against
//! Envoy + ext_authz(this) is what Portcullis adds. The bench runs it as a process of its
//! own (`portcullis-bench --serve-noop-authz ADDR`), pinned like the server, on the same
//! tokio runtime and tonic server settings Portcullis uses.

use std::net::SocketAddr;

use envoy_types::{
    ext_authz::v3::pb::{
        Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
        HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, HttpStatusCode,
        OkHttpResponse,
    },
    pb::google::rpc,
};
use tonic::{Code, Request, Response, Status, transport::Server};

struct NoopAuthz;

#[tonic::async_trait]
impl Authorization for NoopAuthz {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let has_token = request
            .get_ref()
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .is_some_and(|http| http.headers.contains_key("authorization"));
        Ok(Response::new(if has_token { allowed() } else { denied() }))
    }
}

fn allowed() -> CheckResponse {
    let header = |key: &str, value: &str| HeaderValueOption {
        header: Some(HeaderValue { key: key.into(), value: value.into(), ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    };
    let ok = OkHttpResponse {
        headers: vec![
            header("x-portcullis-user-id", "0190f5a2-0000-7000-8000-000000000001"),
            header("x-portcullis-session-id", "0190f5a2-0000-7000-8000-000000000002"),
            header("x-portcullis-amr", "pwd"),
        ],
        headers_to_remove: vec!["x-portcullis-roles".into()],
        ..Default::default()
    };
    CheckResponse {
        status: Some(rpc::Status { code: Code::Ok as i32, ..Default::default() }),
        http_response: Some(HttpResponse::OkResponse(ok)),
        ..Default::default()
    }
}

fn denied() -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status { code: Code::Unauthenticated as i32, ..Default::default() }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: HttpStatusCode::Unauthorized as i32 }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Serves until killed (the bench kills it on drop).
pub fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        Server::builder().tcp_nodelay(true).add_service(AuthorizationServer::new(NoopAuthz)).serve(addr).await
    })?;
    Ok(())
}
