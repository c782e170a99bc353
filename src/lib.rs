//! Portcullis: a gRPC authentication service.
//!
//! Layers (see `docs/design.md`): [`api`] adapts gRPC to the [`auth`] flows, which use
//! durable state through [`store`] and shared ephemeral state through [`hot`]. Beside them:
//! [`token`] (signing keys, JWTs), [`password`] (hashing, policy), [`config`],
//! [`telemetry`] (logs) and [`metrics`] (Prometheus). [`startup`] wires them into a running
//! server.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod geo;
pub mod hot;
pub mod mail;
pub mod metrics;
pub mod mfa;
#[cfg(feature = "client")]
pub mod middleware;
pub mod password;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod token;
pub mod validator;
