//! End-to-end tests: gRPC calls to a server spawned on a random port, on the embedded
//! default (SQLite + memory) and on PostgreSQL + Redis. One test binary, several modules.

#[path = "../support/mod.rs"]
mod support;
#[path = "../support/test_ca.rs"]
mod test_ca;

mod harness;

mod bad_tokens;
mod chaos;
mod concurrency;
mod defence;
mod devices;
mod email;
mod envoy;
mod geo;
mod history;
mod keys;
mod login;
mod mfa;
#[cfg(feature = "client")]
mod middleware;
mod operations;
mod ops;
mod refresh;
mod register;
mod sessions;
mod sidecar;
mod tls;
mod validator;
