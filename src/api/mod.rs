//! The gRPC edge: tonic services that convert protobuf to domain input, make one call into
//! [`crate::auth`], and convert back. Domain errors become `tonic::Status` in
//! [`status`], and only there.

mod account_service;
mod auth_service;
mod client;
mod convert;
pub mod ext_authz;
mod password_service;
mod session_service;
pub mod status;
mod validator_service;

use std::sync::Arc;

use ipnet::IpNet;

pub use account_service::AccountApi;
pub use auth_service::AuthApi;
pub use ext_authz::ExtAuthzApi;
pub use password_service::PasswordApi;
pub use session_service::SessionApi;
pub use validator_service::ValidatorAuthApi;

use crate::auth::Auth;

/// Generated protobuf and gRPC code for `portcullis.v1`.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("portcullis.v1");

    /// Descriptors of every `portcullis.v1` message and service, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("portcullis_descriptor");
}

/// What every service needs: the flows, and whom to believe about client addresses.
pub struct ApiContext {
    pub auth: Arc<Auth>,
    pub trusted_proxies: Vec<IpNet>,
}
