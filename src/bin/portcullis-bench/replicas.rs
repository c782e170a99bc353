//! `revocation-replicas`: how long a Logout on one replica takes to be refused by another.
//!
//! Two `portcullis serve` processes share one PostgreSQL database and one Redis (same key
//! prefix, keys directory and pepper). Sessions are logged in on A; for each, its token is
//! validated once on B (a verified-claims cache hit from then on, as in production), Logout
//! is called on A, and B is asked `ValidateToken` every `poll` until it answers
//! SESSION_REVOKED. The latency is from A's Logout answer to B's refusing answer: the
//! revocation travels as a Redis PUBLISH that B's feed copies into its in-process mirror.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use portcullis::{api::pb, token::SigningAlgorithm};
use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, postgres::PgConnection};

use crate::{
    progress,
    server::{Prepared, ServerOptions},
    setup::{self, Account},
};

/// Where the replicas' shared state lives, and what to measure.
pub struct ReplicaOptions {
    pub binary: PathBuf,
    pub algorithm: SigningAlgorithm,
    /// A PostgreSQL database to use as it is; `None`: a temporary one on `admin_url`.
    pub database_url: Option<String>,
    pub admin_url: String,
    pub redis_url: String,
    pub cpus: Option<String>,
    pub revocations: usize,
    pub poll: Duration,
    /// A revocation not seen by then counts as not refused.
    pub give_up: Duration,
}

/// bcrypt cost of the two replicas: their logins only set the scenario up.
const BCRYPT_COST: u32 = 4;

#[derive(Serialize)]
pub struct ReplicaSummary {
    pub backend: String,
    pub revocations: usize,
    pub poll_interval_us: u64,
    /// Revocations refused by B within `give_up`.
    pub refused: usize,
    /// Of those, refused by the first ValidateToken sent after the Logout answer.
    pub refused_at_first_poll: usize,
    pub not_refused: usize,
    pub give_up_ms: u128,
    /// Over the refused revocations: from A's Logout answer to B's first refusal, µs.
    pub p50_us: Option<u32>,
    pub p90_us: Option<u32>,
    pub p99_us: Option<u32>,
    pub max_us: Option<u32>,
    pub mean_us: Option<f64>,
    /// Revocations (not refused ones included) that took longer than 50 ms.
    pub over_50ms: usize,
}

pub const TARGET_P99: Duration = Duration::from_millis(50);

pub async fn run(options: ReplicaOptions) -> anyhow::Result<ReplicaSummary> {
    let temporary = match &options.database_url {
        Some(_) => None,
        None => Some(TempDatabase::create(&options.admin_url).await?),
    };
    let database_url = match (&options.database_url, &temporary) {
        (Some(url), _) => url.clone(),
        (None, Some(db)) => db.url.clone(),
        (None, None) => unreachable!("a database either way"),
    };
    let outcome = measure(&options, database_url).await;
    if let Some(db) = temporary {
        db.drop_now().await;
    }
    outcome
}

async fn measure(options: &ReplicaOptions, database_url: String) -> anyhow::Result<ReplicaSummary> {
    let prepared = Prepared::new(ServerOptions {
        binary: options.binary.clone(),
        bcrypt_cost: BCRYPT_COST,
        algorithm: options.algorithm,
        database_url: Some(database_url),
        redis_url: Some(options.redis_url.clone()),
        cpus: options.cpus.clone(),
    })?;
    // One after the other: the first migrates the fresh database.
    let mut a = prepared.spawn("replica-a")?;
    setup::wait_serving(a.addr, Some(&mut a), Duration::from_secs(60)).await?;
    let mut b = prepared.spawn("replica-b")?;
    setup::wait_serving(b.addr, Some(&mut b), Duration::from_secs(60)).await?;
    let on_a = crate::load::connect(a.addr, 1).await?.remove(0);
    let on_b = crate::load::connect(b.addr, 1).await?.remove(0);

    progress(&format!("revocation-replicas: {} sessions on replica A", options.revocations));
    let account = Account::register(&on_a, "replicas").await?;
    // The first login makes the device known; then the rest in batches (the bcrypt queue).
    account.login(&on_a).await?;
    let mut sessions = Vec::with_capacity(options.revocations);
    while sessions.len() < options.revocations {
        let batch = (options.revocations - sessions.len()).min(32);
        sessions.extend(account.sessions(&on_a, batch).await?);
    }
    // Let B's revocation feed settle (subscribed and resynced) before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;

    progress(&format!(
        "revocation-replicas: Logout on A, ValidateToken on B every {:?} until refused",
        options.poll
    ));
    let mut latencies = Vec::with_capacity(sessions.len());
    let mut at_first_poll = 0;
    let mut not_refused = 0;
    for (access, _) in &sessions {
        setup::expect_valid(&on_b, access, "a live session's token on replica B").await?;
        setup::logout(&on_a, access).await?;
        let answered = Instant::now();
        let mut polls = 0u32;
        let refused_at = loop {
            let sent = Instant::now();
            let answer = setup::check_token(&on_b, access).await?;
            polls += 1;
            if !answer.valid {
                if answer.reason() != pb::TokenInvalidReason::SessionRevoked {
                    bail!("replica B refused a logged-out session's token for {:?}", answer.reason());
                }
                break Some(Instant::now());
            }
            if answered.elapsed() > options.give_up {
                break None;
            }
            // Every `poll` from one send to the next; a short spin on the bench's own CPU
            // (tokio's timer has 1 ms granularity).
            while sent.elapsed() < options.poll {
                tokio::task::yield_now().await;
            }
        };
        match refused_at {
            Some(at) => {
                latencies.push(u32::try_from(at.duration_since(answered).as_micros()).unwrap_or(u32::MAX));
                if polls == 1 {
                    at_first_poll += 1;
                }
            }
            None => not_refused += 1,
        }
    }
    let over_50ms =
        latencies.iter().filter(|&&us| u128::from(us) > TARGET_P99.as_micros()).count() + not_refused;
    let refused = latencies.len();
    let latency = crate::report::Latency::of(&mut latencies);
    drop((a, b));
    Ok(ReplicaSummary {
        backend: "2 × portcullis serve, one PostgreSQL database, one Redis (same key prefix)".into(),
        revocations: sessions.len(),
        poll_interval_us: u64::try_from(options.poll.as_micros()).unwrap_or(u64::MAX),
        refused,
        refused_at_first_poll: at_first_poll,
        not_refused,
        give_up_ms: options.give_up.as_millis(),
        p50_us: latency.map(|l| l.p50_us),
        p90_us: latency.map(|l| l.p90_us),
        p99_us: latency.map(|l| l.p99_us),
        max_us: latency.map(|l| l.max_us),
        mean_us: latency.map(|l| l.mean_us),
        over_50ms,
    })
}

/// A database created for this run on the server of `admin_url`, dropped at the end.
struct TempDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TempDatabase {
    async fn create(admin_url: &str) -> anyhow::Result<TempDatabase> {
        let name = format!("portcullis_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {admin_url} (--pg-admin-url)"))?;
        // The name is generated above (letters, digits, underscores): safe to splice in.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        _ = admin.close().await;
        progress(&format!("revocation-replicas: created database {name}"));
        Ok(TempDatabase { url: with_database(admin_url, &name), admin_url: admin_url.into(), name })
    }

    /// Drops the database (its servers stopped already: FORCE ends what is left).
    async fn drop_now(self) {
        let dropped = async {
            let mut admin = PgConnection::connect(&self.admin_url).await?;
            sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
                .execute(&mut admin)
                .await?;
            admin.close().await
        };
        if let Err(error) = dropped.await {
            eprintln!("portcullis-bench: could not drop database {}: {error}", self.name);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_keep_server_and_query() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(with_database("postgres://h:1?sslmode=disable", "x"), "postgres://h:1/x?sslmode=disable");
    }
}
