//! `envoy.service.auth.v3.Authorization/Check`: Envoy's (and Istio's) external authorization,
//! a thin adapter over [`Auth::validate_token`](crate::auth::Auth::validate_token), so the
//! decision is exactly `ValidateToken`'s.
//!
//! * The token is the `authorization: Bearer <jwt>` header of the checked HTTP request
//!   (scheme case-insensitive, spaces around the token ignored).
//! * Roles a route requires come from the route's ext_authz `context_extensions`, key
//!   [`REQUIRED_ROLES_KEY`] (`portcullis.required_roles`), comma separated.
//! * Allowed: the upstream request gets [`USER_ID_HEADER`], [`SESSION_ID_HEADER`],
//!   [`ROLES_HEADER`] and [`AMR_HEADER`], each set with `OVERWRITE_IF_EXISTS_OR_ADD` (so a
//!   client-sent copy is replaced); one with nothing to say (no roles) is listed in
//!   `headers_to_remove` instead, so a client-sent copy never reaches the upstream either.
//!   (Only those: Envoy removes after it sets, so a name in both would not arrive at all.)
//! * Denied: `401` with `www-authenticate: Bearer realm="portcullis"` (no token), or with
//!   `error="invalid_token"` (bad, expired or revoked token); `403` with
//!   `error="insufficient_scope"` for a missing role (RFC 6750 §3). The `CheckResponse`
//!   status is `OK`, `UNAUTHENTICATED` or `PERMISSION_DENIED` to match.
//! * When the answer cannot be known (hot state down) the RPC fails with `UNAVAILABLE`, and
//!   Envoy applies its `failure_mode_allow` (which must be `false`: fail closed).
//!
//! `envoy-types` ships no file descriptor set, so this service is not listed by server
//! reflection.

use std::sync::Arc;

use envoy_types::{
    ext_authz::v3::pb::{
        Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue,
        HeaderValueOption, HttpResponse, HttpStatus, HttpStatusCode, OkHttpResponse,
    },
    pb::google::rpc,
};
use tonic::{Code, Request, Response, Status};

use super::status::to_status;
use crate::auth::{InvalidReason, TokenCheck, ValidToken, ValidatesTokens};

/// The `context_extensions` key naming the roles a route requires, comma separated.
pub const REQUIRED_ROLES_KEY: &str = "portcullis.required_roles";
/// The user id (UUID) of an allowed request's token.
pub const USER_ID_HEADER: &str = "x-portcullis-user-id";
/// The session id (UUID) of an allowed request's token.
pub const SESSION_ID_HEADER: &str = "x-portcullis-session-id";
/// The token's roles, comma separated.
pub const ROLES_HEADER: &str = "x-portcullis-roles";
/// How the session was authenticated (RFC 8176 `amr`: `pwd`, `otp`), comma separated.
pub const AMR_HEADER: &str = "x-portcullis-amr";
/// The name this service's health is reported under.
pub const SERVICE_NAME: &str = "envoy.service.auth.v3.Authorization";

const REALM: &str = "portcullis";

pub struct ExtAuthzApi {
    /// The full server, or the validator (sidecar) mode.
    validator: Arc<dyn ValidatesTokens>,
}

impl ExtAuthzApi {
    pub fn new(validator: Arc<dyn ValidatesTokens>) -> ExtAuthzApi {
        ExtAuthzApi { validator }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzApi {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        let token = match bearer(&request) {
            Bearer::Token(token) => token,
            Bearer::Absent => return Ok(Response::new(denied(Denial::NoToken))),
            Bearer::Malformed => return Ok(Response::new(denied(Denial::InvalidToken))),
        };
        let required = required_roles(&request);
        // Err: the hot state is down and the answer unknown. An RPC error (UNAVAILABLE), not a
        // denial, so that Envoy applies its failure_mode_allow policy.
        let check = self.validator.validate_token(token, &required).await.map_err(to_status)?;
        Ok(Response::new(match check {
            TokenCheck::Valid(valid) => allowed(&valid),
            TokenCheck::Invalid(InvalidReason::MissingRole) => denied(Denial::MissingRole(&required)),
            TokenCheck::Invalid(_) => denied(Denial::InvalidToken),
        }))
    }
}

/// What the `authorization` header of the checked request holds.
#[derive(Debug, PartialEq, Eq)]
enum Bearer<'a> {
    /// No header, an empty one, or another scheme (`Basic …`): no bearer credentials at all.
    Absent,
    /// `Bearer` without a token, or with something that cannot be one (inner spaces, several
    /// `authorization` headers).
    Malformed,
    Token(&'a str),
}

fn bearer(request: &CheckRequest) -> Bearer<'_> {
    let Some(http) =
        request.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref())
    else {
        return Bearer::Absent;
    };
    // Envoy sends lower-cased names in `headers`, or, with `encode_raw_headers: true`, every
    // header line in `header_map` (repeated names not merged).
    if let Some(value) = http.headers.get("authorization") {
        return parse_bearer(value);
    }
    let mut raw = http
        .header_map
        .iter()
        .flat_map(|map| &map.headers)
        .filter(|h| h.key.eq_ignore_ascii_case("authorization"));
    match (raw.next(), raw.next()) {
        (None, _) => Bearer::Absent,
        (Some(_), Some(_)) => Bearer::Malformed,
        (Some(header), None) if header.raw_value.is_empty() => parse_bearer(&header.value),
        (Some(header), None) => match std::str::from_utf8(&header.raw_value) {
            Ok(value) => parse_bearer(value),
            Err(_) => Bearer::Malformed,
        },
    }
}

/// Parses `Bearer <token>` (RFC 6750 §2.1): the scheme in any case, any spaces or tabs
/// around the token.
fn parse_bearer(value: &str) -> Bearer<'_> {
    const SPACE: [char; 2] = [' ', '\t'];
    let value = value.trim_matches(SPACE);
    if value.is_empty() {
        return Bearer::Absent;
    }
    let (scheme, rest) = value.split_once(SPACE).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Bearer::Absent;
    }
    let token = rest.trim_matches(SPACE);
    // Several headers arrive merged with commas; no JWT holds a space or a comma.
    if token.is_empty() || token.contains([' ', '\t', ',']) {
        return Bearer::Malformed;
    }
    Bearer::Token(token)
}

/// The roles the route requires: `context_extensions["portcullis.required_roles"]`, comma
/// separated, blanks ignored.
fn required_roles(request: &CheckRequest) -> Vec<String> {
    let Some(roles) = request.attributes.as_ref().and_then(|a| a.context_extensions.get(REQUIRED_ROLES_KEY))
    else {
        return Vec::new();
    };
    let mut required: Vec<String> =
        roles.split(',').map(str::trim).filter(|r| !r.is_empty()).map(str::to_owned).collect();
    required.dedup();
    required
}

fn allowed(valid: &ValidToken) -> CheckResponse {
    let mut ok = OkHttpResponse::default();
    let values = [
        (USER_ID_HEADER, valid.user_id.to_string()),
        (SESSION_ID_HEADER, valid.session_id.to_string()),
        (ROLES_HEADER, header_list(&valid.roles)),
        (AMR_HEADER, header_list(&valid.amr)),
    ];
    for (name, value) in values {
        if value.is_empty() {
            // Nothing to say (no roles): the upstream gets no header rather than an empty
            // one, and a client-sent copy (`x-portcullis-roles: admin`) is removed. Never list
            // a name that is also set: Envoy applies `headers_to_remove` AFTER `headers`, so
            // it would strip ours too (checked against Envoy 1.40 by tests/api/envoy.rs).
            ok.headers_to_remove.push(name.to_owned());
        } else {
            ok.headers.push(overwrite(name, value));
        }
    }
    CheckResponse {
        status: Some(rpc::Status { code: Code::Ok as i32, ..Default::default() }),
        http_response: Some(HttpResponse::OkResponse(ok)),
        ..Default::default()
    }
}

/// `values` comma separated, leaving out any that could not travel intact in a header
/// value (outside visible ASCII, or holding the separator).
fn header_list(values: &[String]) -> String {
    values
        .iter()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() && b != b','))
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

enum Denial<'a> {
    NoToken,
    InvalidToken,
    MissingRole(&'a [String]),
}

fn denied(denial: Denial<'_>) -> CheckResponse {
    let (http, code, message, challenge) = match denial {
        Denial::NoToken => (
            HttpStatusCode::Unauthorized,
            Code::Unauthenticated,
            "missing bearer token",
            format!("Bearer realm=\"{REALM}\""),
        ),
        Denial::InvalidToken => (
            HttpStatusCode::Unauthorized,
            Code::Unauthenticated,
            "invalid, expired or revoked token",
            format!("Bearer realm=\"{REALM}\", error=\"invalid_token\""),
        ),
        Denial::MissingRole(required) => {
            let mut challenge = format!("Bearer realm=\"{REALM}\", error=\"insufficient_scope\"");
            // RFC 6750 §3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
            let scope_token = |r: &String| r.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
            if !required.is_empty() && required.iter().all(scope_token) {
                challenge.push_str(&format!(", scope=\"{}\"", required.join(" ")));
            }
            (HttpStatusCode::Forbidden, Code::PermissionDenied, "missing a required role", challenge)
        }
    };
    CheckResponse {
        status: Some(rpc::Status { code: code as i32, message: message.into(), details: Vec::new() }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: http as i32 }),
            headers: vec![overwrite("www-authenticate", challenge)],
            body: String::new(),
        })),
        ..Default::default()
    }
}

fn overwrite(name: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: name.into(), value, ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::{
        config::core::v3::HeaderMap,
        service::auth::v3::{
            AttributeContext,
            attribute_context::{HttpRequest, Request as AttrRequest},
        },
    };
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::*;

    fn check_request(headers: &[(&str, &str)], extensions: &[(&str, &str)]) -> CheckRequest {
        let http = HttpRequest {
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest { http: Some(http), ..Default::default() }),
                context_extensions: extensions.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            }),
        }
    }

    fn token_of(header: &str) -> Bearer<'_> {
        parse_bearer(header)
    }

    #[test]
    fn bearer_header_edge_cases() {
        assert_eq!(bearer(&check_request(&[], &[])), Bearer::Absent, "no header");
        assert_eq!(bearer(&CheckRequest::default()), Bearer::Absent, "no attributes at all");
        assert_eq!(token_of(""), Bearer::Absent, "empty header");
        assert_eq!(token_of("   "), Bearer::Absent, "blank header");
        assert_eq!(token_of("Basic YWRhOnNlY3JldA=="), Bearer::Absent, "another scheme");
        assert_eq!(token_of("Bearerabc"), Bearer::Absent, "no space after the scheme");
        assert_eq!(token_of("Bearer"), Bearer::Malformed, "scheme without a token");
        assert_eq!(token_of("Bearer   "), Bearer::Malformed, "scheme and spaces only");
        assert_eq!(token_of("Bearer a.b c.d"), Bearer::Malformed, "a space inside the token");
        assert_eq!(token_of("Bearer a.b.c,Bearer d.e.f"), Bearer::Malformed, "two headers merged");
        assert_eq!(token_of("Bearer a.b.c"), Bearer::Token("a.b.c"));
        assert_eq!(token_of("bearer a.b.c"), Bearer::Token("a.b.c"), "lowercase scheme");
        assert_eq!(token_of("BEARER a.b.c"), Bearer::Token("a.b.c"), "uppercase scheme");
        assert_eq!(token_of("  Bearer    a.b.c   "), Bearer::Token("a.b.c"), "extra spaces");
        assert_eq!(token_of("Bearer\ta.b.c"), Bearer::Token("a.b.c"), "a tab");
        let request = check_request(&[("authorization", "bearer  x.y.z ")], &[]);
        assert_eq!(bearer(&request), Bearer::Token("x.y.z"));
    }

    #[test]
    fn raw_header_map_is_read_too() {
        let raw = |values: &[&str]| {
            let headers = values
                .iter()
                .map(|v| HeaderValue {
                    key: "Authorization".into(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect();
            let mut request = check_request(&[], &[]);
            let http = request.attributes.as_mut().unwrap().request.as_mut().unwrap().http.as_mut().unwrap();
            http.header_map = Some(HeaderMap { headers });
            request
        };
        assert_eq!(bearer(&raw(&["Bearer a.b.c"])), Bearer::Token("a.b.c"));
        assert_eq!(bearer(&raw(&[])), Bearer::Absent);
        assert_eq!(bearer(&raw(&["Bearer a.b.c", "Bearer d.e.f"])), Bearer::Malformed, "two headers");
    }

    #[test]
    fn required_roles_come_from_the_context_extension() {
        assert!(required_roles(&check_request(&[], &[])).is_empty());
        let request = check_request(&[], &[(REQUIRED_ROLES_KEY, " admin, ops,,billing ")]);
        assert_eq!(required_roles(&request), ["admin", "ops", "billing"]);
        let request = check_request(&[], &[(REQUIRED_ROLES_KEY, " , ")]);
        assert!(required_roles(&request).is_empty());
        let request = check_request(&[], &[("other.key", "admin")]);
        assert!(required_roles(&request).is_empty());
    }

    fn header<'a>(options: &'a [HeaderValueOption], name: &str) -> Option<&'a str> {
        options.iter().find(|o| o.header.as_ref().unwrap().key == name).map(|o| {
            assert_eq!(o.append_action, HeaderAppendAction::OverwriteIfExistsOrAdd as i32);
            o.header.as_ref().unwrap().value.as_str()
        })
    }

    #[test]
    fn allowed_sets_identity_headers_and_strips_empty_ones() {
        let valid = ValidToken {
            user_id: Uuid::now_v7(),
            session_id: Uuid::now_v7(),
            roles: vec!["admin".into(), "ops".into(), "bad\nrole".into()],
            expires_at: OffsetDateTime::now_utc(),
            email_verified: true,
            amr: vec![],
        };
        let response = allowed(&valid);
        assert_eq!(response.status.unwrap().code, Code::Ok as i32);
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else { panic!("not an OK response") };
        assert_eq!(header(&ok.headers, USER_ID_HEADER), Some(valid.user_id.to_string().as_str()));
        assert_eq!(header(&ok.headers, SESSION_ID_HEADER), Some(valid.session_id.to_string().as_str()));
        assert_eq!(header(&ok.headers, ROLES_HEADER), Some("admin,ops"));
        assert_eq!(header(&ok.headers, AMR_HEADER), None);
        assert_eq!(ok.headers_to_remove, [AMR_HEADER]);
    }

    fn denial(response: CheckResponse) -> (i32, i32, String) {
        let code = response.status.unwrap().code;
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else { panic!("not denied") };
        let challenge = header(&denied.headers, "www-authenticate").unwrap().to_owned();
        (code, denied.status.unwrap().code, challenge)
    }

    #[test]
    fn denials_carry_rfc6750_challenges() {
        assert_eq!(
            denial(denied(Denial::NoToken)),
            (Code::Unauthenticated as i32, 401, r#"Bearer realm="portcullis""#.into())
        );
        assert_eq!(
            denial(denied(Denial::InvalidToken)),
            (Code::Unauthenticated as i32, 401, r#"Bearer realm="portcullis", error="invalid_token""#.into())
        );
        let roles = ["admin".to_string(), "ops".to_string()];
        assert_eq!(
            denial(denied(Denial::MissingRole(&roles))),
            (
                Code::PermissionDenied as i32,
                403,
                r#"Bearer realm="portcullis", error="insufficient_scope", scope="admin ops""#.into()
            )
        );
        let odd = ["a\"b".to_string()];
        assert_eq!(
            denial(denied(Denial::MissingRole(&odd))).2,
            r#"Bearer realm="portcullis", error="insufficient_scope""#
        );
    }
}
