//! Password hashing: bcrypt over an HMAC-SHA-256 pre-hash keyed with a server pepper.
//!
//! bcrypt ignores everything past 72 bytes, so it is never handed the raw password: it gets
//! base64(HMAC-SHA-256(pepper, password)), 44 bytes, and the stored hash says so with the
//! prefix `hmac-sha256:`. Plain `$2a$`/`$2b$`/`$2y$` hashes imported from older systems
//! still verify (the way they were made) and are flagged for upgrade.
//!
//! bcrypt is CPU-bound for hundreds of milliseconds: it always runs on the blocking pool,
//! at most `concurrency` at once, never on the async workers; a call that cannot get a slot
//! within `queue_timeout` is refused rather than queued without bound.
//!
//! A failed verification never answers faster than a verification at the live cost, so
//! accounts whose hash has a lower cost (imported, or older than a cost increase) cannot be
//! told apart from unknown ones by timing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aws_lc_rs::hmac;
use base64::{Engine, engine::general_purpose::STANDARD};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const PEPPERED_PREFIX: &str = "hmac-sha256:";

pub struct PasswordHasher {
    pepper: hmac::Key,
    cost: u32,
    permits: Arc<Semaphore>,
    /// The bcrypt threads' queue (see [`BcryptPool`]).
    pool: BcryptPool,
    /// A hash with the live cost, verified against when the user does not exist, so an
    /// unknown user costs what a wrong password costs.
    dummy_hash: String,
    queue_timeout: Duration,
    /// How long one bcrypt at the live cost took at start-up: failed verifications take at
    /// least this long.
    failure_floor: Duration,
}

/// The outcome of checking a password against a stored hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub matches: bool,
    /// The hash is legacy or of another cost: store a fresh one now that we know the password.
    pub needs_rehash: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("bcrypt failed")]
    Bcrypt(#[from] bcrypt::BcryptError),
    #[error("pepper must be at least 32 bytes")]
    WeakPepper,
    /// The bcrypt threads are gone (could not start, or panicked).
    #[error("password hashing threads unavailable")]
    PoolGone,
    /// Every bcrypt slot stayed busy for the whole queue timeout.
    #[error("password hashing is saturated")]
    Busy,
}

impl PasswordHasher {
    pub async fn new(
        pepper: &[u8],
        cost: u32,
        concurrency: usize,
        queue_timeout: Duration,
    ) -> Result<PasswordHasher, HashError> {
        if pepper.len() < 32 {
            return Err(HashError::WeakPepper);
        }
        let mut hasher = PasswordHasher {
            pepper: hmac::Key::new(hmac::HMAC_SHA256, pepper),
            cost,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            pool: BcryptPool::start(concurrency.max(1)),
            dummy_hash: String::new(),
            queue_timeout,
            failure_floor: Duration::ZERO,
        };
        let mut random = [0u8; 32];
        aws_lc_rs::rand::fill(&mut random).map_err(|_| HashError::WeakPepper)?;
        // At normal priority, not on the (SCHED_IDLE) bcrypt threads: a busy CPU at start-up
        // must not stretch the floor every failed login is padded to. Timed around the hash
        // alone. Hashing and verifying cost the same: the salt setup dominates both.
        let prehash = hasher.prehash(&STANDARD.encode(random));
        let (dummy, took) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            (bcrypt::non_truncating_hash(prehash, cost), started.elapsed())
        })
        .await
        .map_err(|_| HashError::PoolGone)?;
        hasher.dummy_hash = format!("{PEPPERED_PREFIX}{}", dummy?);
        hasher.failure_floor = took;
        Ok(hasher)
    }

    pub fn cost(&self) -> u32 {
        self.cost
    }

    /// Hashes a (policy-checked) password for storage.
    pub async fn hash(&self, password: &str) -> Result<String, HashError> {
        let prehash = self.prehash(password);
        let cost = self.cost;
        let hash = self.blocking(move || bcrypt::non_truncating_hash(prehash, cost)).await??;
        Ok(format!("{PEPPERED_PREFIX}{hash}"))
    }

    /// Checks `password` against `stored`, or against the dummy hash when there is no user,
    /// so both cases cost one bcrypt verification.
    pub async fn verify(&self, password: &str, stored: Option<&str>) -> Result<Verified, HashError> {
        let started = Instant::now();
        let verified = self.verify_unpadded(password, stored).await?;
        if !verified.matches {
            tokio::time::sleep(self.failure_floor.saturating_sub(started.elapsed())).await;
        }
        Ok(verified)
    }

    async fn verify_unpadded(&self, password: &str, stored: Option<&str>) -> Result<Verified, HashError> {
        let Some(stored) = stored else {
            let prehash = self.prehash(password);
            let dummy = self.dummy_hash[PEPPERED_PREFIX.len()..].to_string();
            self.blocking(move || bcrypt::verify(prehash, &dummy)).await??;
            return Ok(Verified { matches: false, needs_rehash: false });
        };
        let (input, bcrypt_hash, legacy) = match stored.strip_prefix(PEPPERED_PREFIX) {
            Some(hash) => (self.prehash(password).into_bytes(), hash.to_string(), false),
            // Imported hash: made from the raw password, truncated at 72 bytes as its
            // system did.
            None => (password.as_bytes().to_vec(), stored.to_string(), true),
        };
        let needs_rehash = legacy || bcrypt_cost(&bcrypt_hash) != Some(self.cost);
        let matches = match self.blocking(move || bcrypt::verify(input, &bcrypt_hash)).await? {
            Ok(matches) => matches,
            // A corrupt stored hash never matches; it is not the caller's fault.
            Err(bcrypt::BcryptError::InvalidHash(_) | bcrypt::BcryptError::CostNotAllowed(_)) => false,
            Err(e) => return Err(e.into()),
        };
        Ok(Verified { matches, needs_rehash: matches && needs_rehash })
    }

    fn prehash(&self, password: &str) -> String {
        STANDARD.encode(hmac::sign(&self.pepper, password.as_bytes()))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let permit = tokio::time::timeout(self.queue_timeout, self.permits.clone().acquire_owned()).await;
        let permit = permit.map_err(|_| HashError::Busy)?.expect("the hashing semaphore is never closed");
        self.pool.run(job, permit).await
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads of their own for bcrypt, at the lowest CPU priority Linux has (`SCHED_IDLE`): a
/// login storm gets only the CPU the hot path (ValidateToken) leaves. Under `SCHED_IDLE` the
/// scheduler preempts a hashing thread as soon as an async worker wakes; at nice 19 alone
/// (the fallback) a worker could wait up to a scheduler slice behind it, which showed in
/// ValidateToken's p99 during storms. As many threads as hashing permits, so a job never
/// waits here (the semaphore in front is the queue, with its timeout).
struct BcryptPool {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl BcryptPool {
    fn start(threads: usize) -> BcryptPool {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for n in 0..threads {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new().name(format!("bcrypt-{n}")).spawn(move || {
                lower_priority();
                loop {
                    // The lock is held only to take a job, not while it runs.
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // the hasher is gone
                    }
                }
            });
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start a bcrypt thread");
            }
        }
        BcryptPool { jobs }
    }

    /// Runs `job` on a bcrypt thread. The hashing slot (`permit`) travels with the job and is
    /// freed when the job is done or skipped, not when the caller gives up: a cancelled call
    /// (client deadline, disconnect) must not let another job into a queue its own job still
    /// occupies, and a job whose caller is gone is skipped rather than hashed for nobody.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
        permit: OwnedSemaphorePermit,
    ) -> Result<T, HashError> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                if done.is_closed() {
                    return; // the permit goes with the closure
                }
                let out = job();
                // Free before answering, so the caller sees its slot free once answered.
                drop(permit);
                let _ = done.send(out);
            }))
            .map_err(|_| HashError::PoolGone)?;
        result.await.map_err(|_| HashError::PoolGone)
    }
}

/// `SCHED_IDLE` for the calling thread, and nice 19 in case that is refused (both apply to
/// the thread on Linux when given id 0). Lowering one's own priority needs no privilege;
/// failure only costs latency.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: neither call has memory-safety preconditions: they read their arguments only
    // (`param` lives across the call).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}

/// The cost of a `$2?$NN$…` hash.
fn bcrypt_cost(hash: &str) -> Option<u32> {
    hash.get(4..6)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PEPPER: [u8; 32] = [7; 32];
    const QUEUE: Duration = Duration::from_secs(30);

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[tokio::test]
    async fn hashes_verify_and_wrong_passwords_do_not() {
        let hasher = PasswordHasher::new(&PEPPER, 4, 2, QUEUE).await.unwrap();
        let hash = hasher.hash("correct horse battery staple").await.unwrap();
        assert!(hash.starts_with("hmac-sha256:$2b$04$"));
        let ok = hasher.verify("correct horse battery staple", Some(&hash)).await.unwrap();
        assert_eq!(ok, Verified { matches: true, needs_rehash: false });
        assert!(!hasher.verify("correct horse battery stapl", Some(&hash)).await.unwrap().matches);
        assert!(!hasher.verify("anything", None).await.unwrap().matches);
    }

    #[tokio::test]
    async fn another_pepper_does_not_verify() {
        let a = PasswordHasher::new(&PEPPER, 4, 1, QUEUE).await.unwrap();
        let b = PasswordHasher::new(&[8; 32], 4, 1, QUEUE).await.unwrap();
        let hash = a.hash("a long enough password").await.unwrap();
        assert!(!b.verify("a long enough password", Some(&hash)).await.unwrap().matches);
    }

    #[tokio::test]
    async fn legacy_hashes_verify_and_ask_for_an_upgrade() {
        let hasher = PasswordHasher::new(&PEPPER, 5, 1, QUEUE).await.unwrap();
        for legacy in [
            bcrypt::hash("seed-password-1", 4).unwrap(),
            bcrypt::hash("seed-password-1", 4).unwrap().replacen("$2b$", "$2a$", 1),
            bcrypt::hash("seed-password-1", 4).unwrap().replacen("$2b$", "$2y$", 1),
        ] {
            let v = hasher.verify("seed-password-1", Some(&legacy)).await.unwrap();
            assert_eq!(v, Verified { matches: true, needs_rehash: true }, "{legacy}");
            assert!(!hasher.verify("seed-password-2", Some(&legacy)).await.unwrap().matches);
        }
        let outdated =
            PasswordHasher::new(&PEPPER, 4, 1, QUEUE).await.unwrap().hash("pw-of-cost-four").await.unwrap();
        assert!(hasher.verify("pw-of-cost-four", Some(&outdated)).await.unwrap().needs_rehash);
    }

    #[tokio::test]
    async fn corrupt_stored_hashes_never_match() {
        let hasher = PasswordHasher::new(&PEPPER, 4, 1, QUEUE).await.unwrap();
        for stored in ["", "plaintext", "hmac-sha256:", "$2b$04$short"] {
            assert!(!hasher.verify("x", Some(stored)).await.unwrap().matches, "{stored:?}");
        }
    }

    #[tokio::test]
    async fn a_cheaper_stored_hash_fails_no_faster_than_the_live_cost() {
        let hasher = PasswordHasher::new(&PEPPER, 10, 1, QUEUE).await.unwrap();
        let cheap = bcrypt::hash("legacy-password", 4).unwrap();
        let started = Instant::now();
        assert!(!hasher.verify("wrong", Some(&cheap)).await.unwrap().matches);
        assert!(started.elapsed() >= hasher.failure_floor);
        let started = Instant::now();
        assert!(hasher.verify("legacy-password", Some(&cheap)).await.unwrap().matches);
        assert!(started.elapsed() < hasher.failure_floor, "successes are not padded");
    }

    #[tokio::test]
    async fn a_saturated_hasher_refuses_instead_of_queueing_forever() {
        let hasher = Arc::new(PasswordHasher::new(&PEPPER, 12, 1, Duration::from_millis(50)).await.unwrap());
        let busy = {
            let hasher = hasher.clone();
            tokio::spawn(async move { hasher.hash("occupies the only slot").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(hasher.hash("waits too long").await, Err(HashError::Busy)));
        busy.await.unwrap().unwrap();
    }

    /// A call given up on (deadline, disconnect) keeps its hashing slot until the bcrypt
    /// thread reaches its job, and the job is skipped: abandoned logins can neither pile up
    /// behind the semaphore nor burn CPU for nobody.
    #[tokio::test]
    async fn a_cancelled_call_holds_its_slot_until_its_job_is_skipped() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let pool = Arc::new(BcryptPool::start(1));
        let permits = Arc::new(Semaphore::new(2));
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let first = {
            let (pool, permit) = (pool.clone(), permits.clone().acquire_owned().await.unwrap());
            tokio::spawn(async move { pool.run(move || gate.recv().is_ok(), permit).await })
        };
        let ran = Arc::new(AtomicBool::new(false));
        let second = {
            let (pool, ran, permit) =
                (pool.clone(), ran.clone(), permits.clone().acquire_owned().await.unwrap());
            tokio::spawn(async move { pool.run(move || ran.store(true, SeqCst), permit).await })
        };
        // Both jobs are queued (this runtime runs the tasks as soon as the test waits).
        tokio::time::sleep(Duration::from_millis(20)).await;
        second.abort();
        assert!(second.await.unwrap_err().is_cancelled());
        assert_eq!(permits.available_permits(), 0, "the cancelled call's job still holds its slot");

        release.send(()).unwrap();
        assert!(first.await.unwrap().unwrap());
        let permit = permits.clone().acquire_owned().await.unwrap();
        assert_eq!(pool.run(|| 7, permit).await.unwrap(), 7);
        assert!(!ran.load(SeqCst), "the cancelled call's job was run");
        assert_eq!(permits.available_permits(), 2, "every slot is free again");
    }

    /// A login storm must not hold up the async workers: bcrypt runs on threads the
    /// scheduler preempts as soon as anything else wants the CPU.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn bcrypt_threads_only_use_spare_cpu() {
        let hasher = PasswordHasher::new(&PEPPER, 4, 2, QUEUE).await.unwrap();
        // SAFETY: sched_getscheduler(0) reads the calling thread's policy; no preconditions.
        let policy = hasher.blocking(|| unsafe { libc::sched_getscheduler(0) }).await.unwrap();
        assert_eq!(policy, libc::SCHED_IDLE);
        // SAFETY: as above, for this (test) thread: the lowering is the bcrypt threads' own.
        assert_ne!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// bcrypt alone would ignore everything past byte 72; the pre-hash must not.
        #[test]
        fn every_character_past_byte_72_matters(
            prefix in "[a-zA-Z0-9]{72,80}",
            tail in "[a-zA-Z0-9 !?]{1,40}",
            position in any::<prop::sample::Index>(),
        ) {
            let rt = runtime();
            let hasher = rt.block_on(PasswordHasher::new(&PEPPER, 4, 1, QUEUE)).unwrap();
            let password = format!("{prefix}{tail}");
            let hash = rt.block_on(hasher.hash(&password)).unwrap();
            let mut altered: Vec<char> = password.chars().collect();
            let i = 72 + position.index(altered.len() - 72);
            altered[i] = if altered[i] == 'x' { 'y' } else { 'x' };
            let altered: String = altered.into_iter().collect();
            prop_assert!(rt.block_on(hasher.verify(&password, Some(&hash))).unwrap().matches);
            prop_assert!(!rt.block_on(hasher.verify(&altered, Some(&hash))).unwrap().matches);
        }
    }
}
