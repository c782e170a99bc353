//! Helpers shared by the integration tests; each test file declares `mod support;`.
//!
//! External services are opt-in through environment variables, so `cargo test` passes on a
//! bare machine and CI runs everything:
//! * `PORTCULLIS_TEST_DATABASE_URL`, e.g. `postgres://postgres@127.0.0.1:5432/test`: a
//!   PostgreSQL server on which the tests may create databases;
//! * `PORTCULLIS_TEST_REDIS_URL`, e.g. `redis://127.0.0.1:6379`.

// Each test file compiles its own copy of this module and uses only some of it.
#![allow(dead_code)]

use std::io::Write;

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};

pub const DATABASE_URL_VAR: &str = "PORTCULLIS_TEST_DATABASE_URL";
pub const REDIS_URL_VAR: &str = "PORTCULLIS_TEST_REDIS_URL";

/// Creates a brand-new, empty database on the server of `PORTCULLIS_TEST_DATABASE_URL` and
/// returns its URL, or `None` when the variable is unset. Each test gets its own database,
/// so tests run in parallel without seeing each other's rows. Panics (failing the test) if
/// the variable is set but the server cannot be used.
pub async fn fresh_postgres_url() -> Option<String> {
    let admin_url = env(DATABASE_URL_VAR)?;
    let name = format!("portcullis_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|error| panic!("{DATABASE_URL_VAR}: cannot connect to {admin_url}: {error}"));
    // The name is generated above (letters, digits, underscores): safe to splice in.
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|error| panic!("{DATABASE_URL_VAR}: cannot create database {name}: {error}"));
    let _ = admin.close().await;
    Some(with_database(&admin_url, &name))
}

/// `PORTCULLIS_TEST_REDIS_URL`, or `None` when unset.
pub fn redis_url() -> Option<String> {
    env(REDIS_URL_VAR)
}

/// Reports, on stderr, a test skipped for want of an external service: names
/// `PORTCULLIS_TEST_DATABASE_URL` if unset, else `PORTCULLIS_TEST_REDIS_URL` if unset.
pub fn skip(what: &str) {
    let why = [DATABASE_URL_VAR, REDIS_URL_VAR]
        .into_iter()
        .find(|var| env(var).is_none())
        .map(|var| format!(": {var} is not set"))
        .unwrap_or_default();
    // Straight to the process's stderr: `eprintln!` would be captured by the test harness
    // and the skip would go unnoticed.
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}{why}");
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|value| !value.trim().is_empty())
}

/// `url` with its database (the path) replaced by `database`, keeping any query string.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |at| at + 3);
    let server = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}
