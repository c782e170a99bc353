//! Access tokens made in process with `portcullis::token`: minting with the server's own
//! key (ValidateToken never touches SQL, so any session id validates unless revoked), and
//! the raw cost of signing and verifying one token per algorithm.

use std::{
    hint::black_box,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use portcullis::{
    config::TokenSettings,
    hot::{HotState, MemoryHotState},
    token::{AccessTokens, KeySet, SigningAlgorithm, access::Subject, keys::generate_key_file},
};
use serde::Serialize;
use uuid::Uuid;

/// Token settings of the bench: the defaults (issuer, audience, leeway, allowed algorithms),
/// with the long lifetime the bench gives its server too.
fn settings() -> TokenSettings {
    let ttl = humantime_serde::re::humantime::parse_duration(crate::server::TOKEN_TTL).expect("a duration");
    TokenSettings { access_ttl: ttl, ..TokenSettings::default() }
}

/// Sessions the minted tokens of one call are spread over.
const MINTED_SESSIONS: usize = 1000;

fn subject() -> Subject<'static> {
    Subject {
        user_id: Uuid::now_v7(),
        session_id: Uuid::now_v7(),
        roles: &[],
        amr: &["pwd"],
        email_verified: true,
    }
}

/// Signs tokens with the signing key of a keys directory.
pub struct Minter {
    tokens: AccessTokens,
}

impl Minter {
    pub fn load(keys_dir: &Path) -> anyhow::Result<Minter> {
        let keys = KeySet::load_dir(keys_dir, None)
            .with_context(|| format!("cannot load the keys in {}", keys_dir.display()))?;
        Ok(Minter { tokens: AccessTokens::new(keys, &settings())? })
    }

    pub fn algorithm(&self) -> SigningAlgorithm {
        self.tokens.keys().signer().algorithm
    }

    /// `n` tokens of `n` distinct random sessions, signed on `threads` threads.
    pub fn mint(&self, n: usize, threads: usize) -> anyhow::Result<Vec<String>> {
        let threads = threads.clamp(1, n.max(1));
        let per_thread = n.div_ceil(threads);
        let now = time::OffsetDateTime::now_utc();
        // Distinct tokens (each its own jti) over a fixed set of sessions, as refreshes make
        // them: a token per session would bill the "last active" write-behind of thousands
        // of sessions (one row each per flush) to the signature check being measured.
        let sessions: Vec<Subject<'static>> = (0..MINTED_SESSIONS.min(n.max(1))).map(|_| subject()).collect();
        let sessions = &sessions;
        let chunks: Vec<anyhow::Result<Vec<String>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let count = per_thread.min(n.saturating_sub(t * per_thread));
                    scope.spawn(move || {
                        (0..count)
                            .map(|i| {
                                let session = &sessions[(t * per_thread + i) % sessions.len()];
                                Ok(self.tokens.issue(session, now).context("cannot sign")?.0)
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("minting thread panicked")).collect()
        });
        let mut tokens = Vec::with_capacity(n);
        for chunk in chunks {
            tokens.extend(chunk?);
        }
        Ok(tokens)
    }
}

/// One algorithm's raw verification cost, measured on its own.
#[derive(Serialize, Clone, Copy)]
pub struct RawVerify {
    pub iterations: u64,
    /// One `AccessTokens::verify` (uncached), nanoseconds.
    pub verify_ns: f64,
}

impl Minter {
    /// The raw cost of verifying a token of this key, looping for `budget` (one thread).
    pub fn raw_verify(&self, budget: Duration) -> anyhow::Result<RawVerify> {
        let (token, _) = self.tokens.issue(&subject(), time::OffsetDateTime::now_utc())?;
        self.tokens.verify(&token).map_err(|r| anyhow::anyhow!("a minted token is rejected: {r:?}"))?;
        let (iterations, spent) = time_loop(budget, || {
            black_box(self.tokens.verify(black_box(&token)).is_ok());
        });
        Ok(RawVerify { iterations, verify_ns: spent.as_nanos() as f64 / iterations as f64 })
    }
}

/// Calls `f` repeatedly for about `budget`; returns (calls, elapsed).
fn time_loop(budget: Duration, mut f: impl FnMut()) -> (u64, Duration) {
    let started = Instant::now();
    let mut calls = 0u64;
    loop {
        for _ in 0..8 {
            f();
        }
        calls += 8;
        let elapsed = started.elapsed();
        if elapsed >= budget {
            return (calls, elapsed);
        }
    }
}

#[derive(Serialize)]
pub struct AlgorithmCost {
    pub algorithm: String,
    pub verify_iterations: u64,
    /// One full verification (`AccessTokens::verify`: header, key lookup, signature,
    /// claims), nanoseconds.
    pub verify_ns: f64,
    pub issue_iterations: u64,
    /// One `AccessTokens::issue` (claims, signature), nanoseconds.
    pub issue_ns: f64,
}

#[derive(Serialize)]
pub struct CachedCost {
    pub algorithm: String,
    pub iterations: u64,
    /// `AccessTokens::verify_cached` of a token verified before: SHA-256 and a map lookup.
    pub ns: f64,
}

/// For each algorithm: a fresh key in a temporary directory, loaded as the server loads
/// keys; one token issued, then verified (uncached) in a loop for `budget`, and issued in a
/// loop for `budget / 2`. Plus the verified-claims cache hit, for `cached_alg`.
pub fn measure(
    budget: Duration,
    cached_alg: SigningAlgorithm,
) -> anyhow::Result<(Vec<AlgorithmCost>, CachedCost)> {
    let dir = std::env::temp_dir().join(format!("portcullis-bench-keys-{}", Uuid::new_v4().simple()));
    let result = measure_in(&dir, budget, cached_alg);
    _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure_in(
    dir: &Path,
    budget: Duration,
    cached_alg: SigningAlgorithm,
) -> anyhow::Result<(Vec<AlgorithmCost>, CachedCost)> {
    let mut costs = Vec::new();
    let mut cached = None;
    for alg in [SigningAlgorithm::EdDSA, SigningAlgorithm::ES256, SigningAlgorithm::RS256] {
        let alg_dir = dir.join(alg.to_string());
        generate_key_file(&alg_dir, alg)?;
        let minter = Minter::load(&alg_dir)?;
        let tokens = &minter.tokens;
        let now = time::OffsetDateTime::now_utc();
        let (token, _) = tokens.issue(&subject(), now)?;
        tokens.verify(&token).map_err(|r| anyhow::anyhow!("{alg} token rejected in process: {r:?}"))?;

        let (verify_iterations, spent) = time_loop(budget, || {
            black_box(tokens.verify(black_box(&token)).is_ok());
        });
        let verify_ns = spent.as_nanos() as f64 / verify_iterations as f64;
        let (issue_iterations, spent) = time_loop(budget / 2, || {
            black_box(tokens.issue(&subject(), now).is_ok());
        });
        let issue_ns = spent.as_nanos() as f64 / issue_iterations as f64;
        costs.push(AlgorithmCost {
            algorithm: alg.to_string(),
            verify_iterations,
            verify_ns,
            issue_iterations,
            issue_ns,
        });

        if alg == cached_alg {
            tokens.verify_cached(&token).map_err(|r| anyhow::anyhow!("cached verify: {r:?}"))?;
            let (iterations, spent) = time_loop(budget / 2, || {
                black_box(tokens.verify_cached(black_box(&token)).is_ok());
            });
            cached = Some(CachedCost {
                algorithm: alg.to_string(),
                iterations,
                ns: spent.as_nanos() as f64 / iterations as f64,
            });
        }
    }
    Ok((costs, cached.expect("the cached algorithm is one of the three")))
}

/// Revoked sessions in the mirror of the revocation-lookup line.
pub const REVOKED_IDS: usize = 10_000;

/// The in-process revocation check, as every ValidateToken makes it.
#[derive(Serialize)]
pub struct LookupCost {
    pub revoked_ids: usize,
    pub iterations: u64,
    /// `is_session_revoked` of a session that is not revoked (a valid token's check), ns.
    pub miss_ns: f64,
    /// The same for a revoked one, ns.
    pub hit_ns: f64,
    /// The dearer of the two against ValidateToken hot's server CPU per request.
    pub percent_of_validate_hot: Option<f64>,
}

/// The target: the revocation lookup at most this share of ValidateToken hot's CPU.
pub const LOOKUP_TARGET_PERCENT: f64 = 5.0;

/// `MemoryHotState::is_session_revoked` (what the Redis revocation mirror answers from) over
/// a set of [`REVOKED_IDS`] revoked sessions: 1024 other ids in turn (misses), and the
/// revoked ones in turn (hits), each for `budget / 2`. The future is polled once by hand:
/// it never waits.
pub fn revocation_lookup(budget: Duration) -> anyhow::Result<LookupCost> {
    let mirror = MemoryHotState::new();
    let revoked: Vec<Uuid> = (0..REVOKED_IDS).map(|_| Uuid::new_v4()).collect();
    for id in &revoked {
        ready(mirror.revoke_session(*id, Duration::from_secs(3600)))?;
    }
    let others: Vec<Uuid> = (0..1024).map(|_| Uuid::new_v4()).collect();
    anyhow::ensure!(ready(mirror.is_session_revoked(revoked[0]))?, "a revoked id is not found");
    anyhow::ensure!(!ready(mirror.is_session_revoked(others[0]))?, "an id never revoked is found");

    let mut i = 0usize;
    let (misses, spent_miss) = time_loop(budget / 2, || {
        i = i.wrapping_add(1);
        black_box(ready(mirror.is_session_revoked(black_box(others[i % others.len()]))).ok());
    });
    let mut j = 0usize;
    let (hits, spent_hit) = time_loop(budget / 2, || {
        j = j.wrapping_add(1);
        black_box(ready(mirror.is_session_revoked(black_box(revoked[j % revoked.len()]))).ok());
    });
    Ok(LookupCost {
        revoked_ids: REVOKED_IDS,
        iterations: misses + hits,
        miss_ns: spent_miss.as_nanos() as f64 / misses as f64,
        hit_ns: spent_hit.as_nanos() as f64 / hits as f64,
        percent_of_validate_hot: None,
    })
}

/// The output of a future that is ready at its first poll (the in-memory hot state's).
fn ready<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut cx) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => panic!("the in-memory hot state never waits"),
    }
}
