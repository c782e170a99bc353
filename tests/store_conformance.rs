//! One suite for every [`Store`]: each case in `cases` runs against SQLite (a temp file) and
//! PostgreSQL (a fresh database; skipped when `PORTCULLIS_TEST_DATABASE_URL` is unset), as
//! `sqlite::<case>` and `postgres::<case>`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use portcullis::store::{DynStore, PostgresStore, SqliteStore, Store};

const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

async fn sqlite_store() -> (DynStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("portcullis.db").display());
    let store = SqliteStore::connect(&url, 8, ACQUIRE_TIMEOUT, STATEMENT_TIMEOUT).await.expect("open SQLite");
    store.migrate().await.expect("migrate SQLite");
    (Arc::new(store), dir)
}

async fn postgres_store() -> Option<DynStore> {
    let url = support::fresh_postgres_url().await?;
    Some(postgres_store_at(&url, STATEMENT_TIMEOUT).await)
}

/// A migrated store on the database at `url`.
async fn postgres_store_at(url: &str, statement_timeout: Duration) -> DynStore {
    let store =
        PostgresStore::connect(url, 8, ACQUIRE_TIMEOUT, statement_timeout).await.expect("open PostgreSQL");
    store.migrate().await.expect("migrate PostgreSQL");
    Arc::new(store)
}

/// Declares, for each case, `sqlite::<case>` and `postgres::<case>`. Multi-threaded
/// runtimes so that concurrency cases really run in parallel.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _dir) = super::sqlite_store().await;
                    super::cases::$case(store).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(store) = super::postgres_store().await else {
                        super::support::skip(concat!("postgres::", stringify!($case)));
                        return;
                    };
                    super::cases::$case(store).await;
                }
            )*
        }
    };
}

conformance!(
    ping_and_migrate_again,
    create_and_find_user,
    username_conflict,
    email_conflict,
    roles_round_trip,
    timestamps_keep_microseconds,
    replace_password_hash_is_compare_and_swap,
    create_and_find_session,
    rotate_then_replay,
    rotate_revoked_is_dead,
    rotate_idle_expired_is_dead,
    rotate_absolutely_expired_is_dead,
    concurrent_rotations_rotate_once,
    revoke_session_is_scoped_and_idempotent,
    revoke_user_sessions_with_and_without_keep,
    list_active_sessions_filters_and_orders,
    record_activity_only_raises,
    concurrent_overlapping_activity_batches,
    revoked_sessions_of,
    revoked_since,
    tx_commit_persists_and_drop_rolls_back,
    tx_conflict_leaves_the_transaction_usable,
    lock_user_returns_the_row,
    token_issue_peek_consume,
    token_wrong_purpose_expired_or_unknown,
    newer_token_invalidates_older,
    invalidate_tokens_by_purpose,
    concurrent_consumes_spend_once,
    outbox_rolled_back_leaves_nothing,
    claim_lease_and_sent,
    released_mail_is_due_at_once_without_an_attempt,
    devices_are_new_once_and_the_first_is_marked,
    purge_outbox_deletes_only_old_finished_mail,
    count_pending_outbox_counts_unsent_and_unabandoned_mail,
    claim_limit_oldest_first,
    mail_failed_retries_then_gives_up,
    concurrent_claimers_never_share_a_mail,
    delete_user_cascades_and_leaves_tombstones,
    update_profile_changes_only_some_fields,
    set_email_conflict_and_success,
    mark_email_verified_once_and_set_password_hash,
    tx_revoke_user_sessions,
    session_location_round_trips,
    login_attempts_record_and_list,
    login_attempts_paginate_without_gaps_or_duplicates,
    purge_login_attempts_deletes_only_older,
    delete_user_deletes_its_login_attempts,
    guard_reserves_the_budget_then_is_exhausted,
    guard_window_restarts,
    guard_locks_once_and_answers_locked,
    guard_lock_expiry_gives_a_fresh_budget_keeping_lockouts,
    guard_forgets_lockouts_after_a_quiet_spell,
    clear_guard_forgets_everything,
    concurrent_reservations_never_exceed_the_budget,
    purge_login_guards_keeps_recent_and_locked,
    delete_user_deletes_guards_and_second_factors,
    mfa_challenge_create_find_expire_consume,
    expired_mfa_challenges_are_purged,
    concurrent_challenge_consumers_spend_once,
    newer_challenge_kills_the_users_older_ones,
    activate_totp_is_compare_and_swap,
    advance_totp_step_is_monotonic_and_once,
    recovery_codes_are_single_use,
    disable_totp_clears_everything,
    is_known_device_reflects_sightings,
    user_record_flags_reflect_mfa_state,
    session_amr_round_trips,
);

/// Behaviour of SQLite alone: opening, in-memory databases, corrupt rows.
mod sqlite_specific {
    use super::*;

    #[tokio::test]
    async fn creates_missing_parent_directories() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nested/deeper/portcullis.db");
        let url = format!("sqlite://{}", path.display());
        let store =
            SqliteStore::connect(&url, 2, ACQUIRE_TIMEOUT, STATEMENT_TIMEOUT).await.expect("open SQLite");
        store.migrate().await.expect("migrate");
        assert!(path.exists());
    }

    #[tokio::test]
    async fn in_memory_database_is_one_database() {
        let store = SqliteStore::connect("sqlite::memory:", 8, ACQUIRE_TIMEOUT, STATEMENT_TIMEOUT)
            .await
            .expect("open");
        store.migrate().await.expect("migrate");
        // Every call must see the same database, whichever pooled connection it gets.
        let store: DynStore = Arc::new(store);
        cases::create_and_find_user(store.clone()).await;
        cases::concurrent_rotations_rotate_once(store).await;
    }

    #[tokio::test]
    async fn malformed_roles_are_corrupt_not_a_panic() {
        let (store, dir) = sqlite_store().await;
        let user = cases::new_user("mallory");
        store.create_user(&user).await.unwrap();

        let url = format!("sqlite://{}", dir.path().join("portcullis.db").display());
        let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query("UPDATE users SET roles = '{not json'").execute(&raw).await.unwrap();
        let result = store.find_user(user.id).await;
        assert!(matches!(result, Err(portcullis::store::StoreError::Corrupt(_))), "{result:?}");
    }

    #[tokio::test]
    async fn given_up_mail_keeps_its_row() {
        let (store, dir) = sqlite_store().await;
        let id = cases::give_up_on_a_mail(&store).await;
        let url = format!("sqlite://{}", dir.path().join("portcullis.db").display());
        let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
        let (attempts, last_error, gave_up): (i64, Option<String>, bool) =
            sqlx::query_as("SELECT attempts, last_error, gave_up_at IS NOT NULL FROM outbox WHERE id = $1")
                .bind(id)
                .fetch_one(&raw)
                .await
                .unwrap();
        assert_eq!((attempts, last_error.as_deref(), gave_up), (2, Some("550 no such user"), true));
    }
}

mod cases {
    use portcullis::store::{
        AttemptOutcome, DeviceInfo, DeviceSighting, DynStore, GuardBudget, GuardKey, GuardState, Location,
        LoginAttempt, MfaChallenge, MfaMethod, NewLoginAttempt, NewMail, NewMfaChallenge, NewOneTimeToken,
        NewSession, NewUser, OutboxMail, ProfileChanges, RefreshRotation, RevokeReason, RotateOutcome,
        SessionRecord, SpentToken, StoreError, TokenPurpose, TotpState, TryReservation, UserRecord,
    };
    use time::{Duration, OffsetDateTime};
    use uuid::Uuid;

    /// Now, at the microsecond precision both engines store.
    fn now() -> OffsetDateTime {
        let now = OffsetDateTime::now_utc();
        now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000).expect("valid nanosecond")
    }

    pub fn new_user(name: &str) -> NewUser {
        NewUser {
            id: Uuid::new_v4(),
            username: name.to_owned(),
            username_key: name.to_lowercase(),
            email: format!("{name}@Example.com"),
            email_key: format!("{}@example.com", name.to_lowercase()),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".to_owned(),
            first_name: "Ada".to_owned(),
            last_name: "Lovelace".to_owned(),
            roles: vec!["user".to_owned()],
            created_at: now(),
        }
    }

    /// A fresh random 32-byte "SHA-256".
    fn random_hash() -> Vec<u8> {
        [Uuid::new_v4().into_bytes(), Uuid::new_v4().into_bytes()].concat()
    }

    fn new_session(user_id: Uuid, created_at: OffsetDateTime) -> NewSession {
        NewSession {
            id: Uuid::new_v4(),
            user_id,
            refresh_hash: random_hash(),
            device: DeviceInfo {
                device_type: "desktop".to_owned(),
                browser: "Firefox".to_owned(),
                os: "Linux".to_owned(),
                user_agent: "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
                    .to_owned(),
                ip_address: "2001:db8::1".to_owned(),
                fingerprint: "fp-1".to_owned(),
            },
            location: None,
            created_at,
            expires_at: created_at + Duration::days(30),
            amr: vec!["pwd".to_owned()],
        }
    }

    async fn user(store: &DynStore, name: &str) -> UserRecord {
        store.create_user(&new_user(name)).await.expect("create user")
    }

    async fn session(
        store: &DynStore,
        user_id: Uuid,
        created_at: OffsetDateTime,
    ) -> (NewSession, SessionRecord) {
        let new = new_session(user_id, created_at);
        let record = store.create_session(&new).await.expect("create session");
        (new, record)
    }

    fn rotation(presented: &[u8], now: OffsetDateTime) -> RefreshRotation {
        RefreshRotation {
            presented_hash: presented.to_vec(),
            new_hash: random_hash(),
            now,
            idle_cutoff: now - Duration::days(7),
        }
    }

    pub async fn ping_and_migrate_again(store: DynStore) {
        store.ping().await.expect("ping");
        store.migrate().await.expect("migrations are idempotent");
        store.ping().await.expect("ping after migrating again");
    }

    pub async fn create_and_find_user(store: DynStore) {
        let new = new_user("Ada");
        let created = store.create_user(&new).await.expect("create user");
        let expected = UserRecord {
            id: new.id,
            username: "Ada".to_owned(),
            email: "Ada@Example.com".to_owned(),
            password_hash: new.password_hash.clone(),
            first_name: "Ada".to_owned(),
            last_name: "Lovelace".to_owned(),
            phone: String::new(),
            bio: String::new(),
            roles: vec!["user".to_owned()],
            email_verified_at: None,
            created_at: new.created_at,
            email_otp_enabled: false,
            totp_enabled: false,
        };
        assert_eq!(created, expected);

        assert_eq!(store.find_user(new.id).await.unwrap(), Some(expected.clone()));
        assert_eq!(store.find_user_by_login("ada").await.unwrap(), Some(expected.clone()));
        assert_eq!(store.find_user_by_login("ada@example.com").await.unwrap(), Some(expected));

        // Lookups are by the stored keys only: the caller case-folds.
        assert_eq!(store.find_user_by_login("Ada").await.unwrap(), None);
        assert_eq!(store.find_user_by_login("nobody").await.unwrap(), None);
        assert_eq!(store.find_user(Uuid::new_v4()).await.unwrap(), None);
    }

    pub async fn username_conflict(store: DynStore) {
        user(&store, "grace").await;
        let mut clash = new_user("grace");
        clash.username = "GRACE".to_owned();
        clash.email_key = "someone-else@example.com".to_owned();
        let error = store.create_user(&clash).await.expect_err("username key is taken");
        assert!(matches!(error, StoreError::Conflict("username")), "{error:?}");
        assert_eq!(store.find_user(clash.id).await.unwrap(), None);
    }

    pub async fn email_conflict(store: DynStore) {
        user(&store, "alan").await;
        let mut clash = new_user("turing");
        clash.email_key = "alan@example.com".to_owned();
        let error = store.create_user(&clash).await.expect_err("email key is taken");
        assert!(matches!(error, StoreError::Conflict("email")), "{error:?}");
        assert_eq!(store.find_user(clash.id).await.unwrap(), None);
    }

    pub async fn roles_round_trip(store: DynStore) {
        for roles in [
            vec![],
            vec!["admin".to_owned(), "user".to_owned()],
            vec!["with \"quotes\", commas {braces} and ünïcode".to_owned(), String::new()],
        ] {
            let mut new = new_user(&format!("u{}", Uuid::new_v4().simple()));
            new.roles = roles.clone();
            assert_eq!(store.create_user(&new).await.unwrap().roles, roles);
            assert_eq!(store.find_user(new.id).await.unwrap().unwrap().roles, roles);
        }
    }

    pub async fn timestamps_keep_microseconds(store: DynStore) {
        let instant = OffsetDateTime::from_unix_timestamp_nanos(1_767_225_600_123_456_789).unwrap();
        let micros = OffsetDateTime::from_unix_timestamp_nanos(1_767_225_600_123_456_000).unwrap();

        let mut new = new_user("hopper");
        new.created_at = instant;
        store.create_user(&new).await.unwrap();
        assert_eq!(store.find_user(new.id).await.unwrap().unwrap().created_at, micros);

        let mut new_session = new_session(new.id, instant);
        new_session.expires_at = instant + Duration::days(1);
        store.create_session(&new_session).await.unwrap();
        let found = store.find_session(new_session.id).await.unwrap().unwrap();
        assert_eq!(found.created_at, micros);
        assert_eq!(found.last_active_at, micros);
        assert_eq!(found.expires_at, micros + Duration::days(1));
        // One microsecond later is later.
        let later = micros + Duration::microseconds(1);
        store.record_activity(&[(new_session.id, later)]).await.unwrap();
        assert_eq!(store.find_session(new_session.id).await.unwrap().unwrap().last_active_at, later);
    }

    pub async fn replace_password_hash_is_compare_and_swap(store: DynStore) {
        let created = user(&store, "linus").await;
        // Same stored hash as `created`: the swap must be scoped to the user, not the value.
        let bystander = user(&store, "richard").await;
        assert_eq!(bystander.password_hash, created.password_hash);
        let original = created.password_hash.clone();

        // The right expected hash: replaced, and nothing else changes.
        assert!(store.replace_password_hash(created.id, &original, "$argon2id$new").await.unwrap());
        let found = store.find_user(created.id).await.unwrap().unwrap();
        assert_eq!(found, UserRecord { password_hash: "$argon2id$new".to_owned(), ..created.clone() });
        assert_eq!(store.find_user(bystander.id).await.unwrap(), Some(bystander.clone()));

        // A stale expected hash (a change committed in between): false, and nothing changes.
        assert!(!store.replace_password_hash(created.id, &original, "$argon2id$upgraded").await.unwrap());
        assert_eq!(store.find_user(created.id).await.unwrap(), Some(found.clone()));

        // An unknown user: false.
        assert!(!store.replace_password_hash(Uuid::new_v4(), &original, "$argon2id$x").await.unwrap());
        assert_eq!(store.find_user(bystander.id).await.unwrap(), Some(bystander));

        // The current hash swaps again.
        assert!(store.replace_password_hash(created.id, "$argon2id$new", "$argon2id$newer").await.unwrap());
        assert_eq!(store.find_user(created.id).await.unwrap().unwrap().password_hash, "$argon2id$newer");
    }

    pub async fn create_and_find_session(store: DynStore) {
        let owner = user(&store, "barbara").await;
        let t = now();
        let (new, created) = session(&store, owner.id, t).await;
        let expected = SessionRecord {
            id: new.id,
            user_id: owner.id,
            device: new.device.clone(),
            location: None,
            created_at: t,
            last_active_at: t,
            refreshed_at: t,
            expires_at: new.expires_at,
            revoked_at: None,
            amr: vec!["pwd".to_owned()],
        };
        assert_eq!(created, expected);
        assert_eq!(store.find_session(new.id).await.unwrap(), Some(expected));
        assert_eq!(store.find_session(Uuid::new_v4()).await.unwrap(), None);
    }

    pub async fn rotate_then_replay(store: DynStore) {
        let owner = user(&store, "ken").await;
        let t0 = now() - Duration::hours(1);
        let (new, _) = session(&store, owner.id, t0).await;

        let t1 = now();
        let first = rotation(&new.refresh_hash, t1);
        let RotateOutcome::Rotated(rotated) = store.rotate_refresh_token(&first).await.unwrap() else {
            panic!("a current token rotates");
        };
        assert_eq!(rotated.id, new.id);
        assert_eq!(rotated.refreshed_at, t1);
        assert_eq!(rotated.last_active_at, t1);
        assert_eq!(rotated.created_at, t0);
        assert_eq!(store.find_session(new.id).await.unwrap(), Some(rotated.clone()));

        // The token rotated away: a replay (or a lost race).
        let replay = rotation(&new.refresh_hash, t1 + Duration::seconds(1));
        assert_eq!(
            store.rotate_refresh_token(&replay).await.unwrap(),
            RotateOutcome::Superseded(rotated.clone())
        );

        // The new token is current and rotates in turn; then the first is no longer known.
        let t2 = t1 + Duration::seconds(2);
        let second = rotation(&first.new_hash, t2);
        assert!(matches!(
            store.rotate_refresh_token(&second).await.unwrap(),
            RotateOutcome::Rotated(ref s) if s.id == new.id && s.refreshed_at == t2
        ));
        assert!(matches!(
            store.rotate_refresh_token(&rotation(&first.new_hash, t2)).await.unwrap(),
            RotateOutcome::Superseded(ref s) if s.id == new.id
        ));
        assert_eq!(
            store.rotate_refresh_token(&rotation(&new.refresh_hash, t2)).await.unwrap(),
            RotateOutcome::Unknown
        );

        assert_eq!(
            store.rotate_refresh_token(&rotation(&random_hash(), t2)).await.unwrap(),
            RotateOutcome::Unknown
        );
    }

    pub async fn rotate_revoked_is_dead(store: DynStore) {
        let owner = user(&store, "dennis").await;
        let t0 = now() - Duration::hours(1);
        let (new, _) = session(&store, owner.id, t0).await;
        let first = rotation(&new.refresh_hash, t0 + Duration::minutes(1));
        assert!(matches!(store.rotate_refresh_token(&first).await.unwrap(), RotateOutcome::Rotated(_)));

        let t1 = now();
        assert!(store.revoke_session(owner.id, new.id, RevokeReason::Logout, t1).await.unwrap());
        let revoked = store.find_session(new.id).await.unwrap().unwrap();
        assert_eq!(revoked.revoked_at, Some(t1));

        // The current token of a revoked session is dead, and so is its previous one.
        let current = rotation(&first.new_hash, t1);
        assert_eq!(store.rotate_refresh_token(&current).await.unwrap(), RotateOutcome::Dead(revoked.clone()));
        let previous = rotation(&new.refresh_hash, t1);
        assert_eq!(
            store.rotate_refresh_token(&previous).await.unwrap(),
            RotateOutcome::Dead(revoked.clone())
        );
        // Nothing changed.
        assert_eq!(store.find_session(new.id).await.unwrap(), Some(revoked));
    }

    pub async fn rotate_idle_expired_is_dead(store: DynStore) {
        let owner = user(&store, "margaret").await;
        let t0 = now() - Duration::days(10);
        let (new, created) = session(&store, owner.id, t0).await;

        // Refreshed at or before the cutoff: idle-expired.
        let mut idle = rotation(&new.refresh_hash, now());
        idle.idle_cutoff = t0;
        assert_eq!(store.rotate_refresh_token(&idle).await.unwrap(), RotateOutcome::Dead(created));

        // One microsecond after the cutoff: still live.
        idle.idle_cutoff = t0 - Duration::microseconds(1);
        assert!(matches!(store.rotate_refresh_token(&idle).await.unwrap(), RotateOutcome::Rotated(_)));
    }

    pub async fn rotate_absolutely_expired_is_dead(store: DynStore) {
        let owner = user(&store, "frances").await;
        let t0 = now() - Duration::days(1);
        let mut new = new_session(owner.id, t0);
        new.expires_at = t0 + Duration::hours(1);
        let created = store.create_session(&new).await.unwrap();

        // At expires_at the session is over, even though it was never idle.
        let mut late = rotation(&new.refresh_hash, new.expires_at);
        late.idle_cutoff = t0 - Duration::days(1);
        assert_eq!(store.rotate_refresh_token(&late).await.unwrap(), RotateOutcome::Dead(created));

        late.now = new.expires_at - Duration::microseconds(1);
        assert!(matches!(store.rotate_refresh_token(&late).await.unwrap(), RotateOutcome::Rotated(_)));
    }

    pub async fn concurrent_rotations_rotate_once(store: DynStore) {
        let owner = user(&store, &format!("racer{}", Uuid::new_v4().simple())).await;
        let (new, _) = session(&store, owner.id, now() - Duration::minutes(5)).await;
        let (bystander, _) = session(&store, owner.id, now() - Duration::minutes(5)).await;

        let t = now();
        let rotations: Vec<_> = (0..50)
            .map(|_| {
                let store = store.clone();
                let rotation = rotation(&new.refresh_hash, t);
                tokio::spawn(async move { store.rotate_refresh_token(&rotation).await })
            })
            .collect();
        // Other writers at the same time (multi-statement transactions among them) must not
        // make anything fail either.
        let others: Vec<_> = (0..10)
            .map(|i| {
                let store = store.clone();
                let activity = [(new.id, t - Duration::seconds(i)), (bystander.id, t - Duration::seconds(i))];
                tokio::spawn(async move { store.record_activity(&activity).await })
            })
            .collect();

        let (mut rotated, mut superseded) = (0, 0);
        for task in rotations {
            match task.await.expect("task").expect("no rotation may fail") {
                RotateOutcome::Rotated(_) => rotated += 1,
                RotateOutcome::Superseded(_) => superseded += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        for task in others {
            task.await.expect("task").expect("no activity update may fail");
        }
        assert_eq!((rotated, superseded), (1, 49));
        let found = store.find_session(new.id).await.unwrap().unwrap();
        assert_eq!((found.refreshed_at, found.last_active_at), (t, t));
        // Activity touches are best effort under contention: PostgreSQL skips a row another
        // batch holds at that moment, so an older batch may have the last word.
        let touched = store.find_session(bystander.id).await.unwrap().unwrap().last_active_at;
        assert!(touched >= t - Duration::seconds(9) && touched <= t, "{touched} vs {t}");
    }

    pub async fn revoke_session_is_scoped_and_idempotent(store: DynStore) {
        let owner = user(&store, "edsger").await;
        let stranger = user(&store, "tony").await;
        let (new, _) = session(&store, owner.id, now()).await;

        let t1 = now();
        // Someone else's session, or none at all: false, and nothing revoked.
        assert!(!store.revoke_session(stranger.id, new.id, RevokeReason::RevokedByUser, t1).await.unwrap());
        assert!(
            !store.revoke_session(owner.id, Uuid::new_v4(), RevokeReason::RevokedByUser, t1).await.unwrap()
        );
        assert_eq!(store.find_session(new.id).await.unwrap().unwrap().revoked_at, None);

        assert!(store.revoke_session(owner.id, new.id, RevokeReason::RevokedByUser, t1).await.unwrap());
        // Again: still true, and the first revocation's instant is kept.
        let t2 = t1 + Duration::minutes(1);
        assert!(store.revoke_session(owner.id, new.id, RevokeReason::Logout, t2).await.unwrap());
        assert_eq!(store.find_session(new.id).await.unwrap().unwrap().revoked_at, Some(t1));
        assert_eq!(store.revoked_since(t1).await.unwrap(), vec![(new.id, t1)]);
    }

    pub async fn revoke_user_sessions_with_and_without_keep(store: DynStore) {
        let owner = user(&store, "niklaus").await;
        let other = user(&store, "bjarne").await;
        let t0 = now();
        let (a, _) = session(&store, owner.id, t0).await;
        let (b, _) = session(&store, owner.id, t0).await;
        let (c, _) = session(&store, owner.id, t0).await;
        let (elsewhere, _) = session(&store, other.id, t0).await;
        let t_early = t0 + Duration::seconds(1);
        assert!(store.revoke_session(owner.id, c.id, RevokeReason::Logout, t_early).await.unwrap());

        // Everything but `a`; the already revoked `c` is not revoked again.
        let t1 = t0 + Duration::seconds(2);
        let revoked =
            store.revoke_user_sessions(owner.id, Some(a.id), RevokeReason::RevokedByUser, t1).await.unwrap();
        assert_eq!(revoked, vec![b.id]);
        assert_eq!(store.find_session(a.id).await.unwrap().unwrap().revoked_at, None);
        assert_eq!(store.find_session(b.id).await.unwrap().unwrap().revoked_at, Some(t1));
        assert_eq!(store.find_session(c.id).await.unwrap().unwrap().revoked_at, Some(t_early));

        // Then all of them: only `a` was left.
        let t2 = t0 + Duration::seconds(3);
        let revoked =
            store.revoke_user_sessions(owner.id, None, RevokeReason::RefreshTokenReuse, t2).await.unwrap();
        assert_eq!(revoked, vec![a.id]);
        assert_eq!(store.find_session(a.id).await.unwrap().unwrap().revoked_at, Some(t2));
        assert_eq!(store.find_session(b.id).await.unwrap().unwrap().revoked_at, Some(t1));
        assert!(
            store.revoke_user_sessions(owner.id, None, RevokeReason::Logout, t2).await.unwrap().is_empty()
        );

        // Other users are untouched.
        assert_eq!(store.find_session(elsewhere.id).await.unwrap().unwrap().revoked_at, None);
    }

    pub async fn list_active_sessions_filters_and_orders(store: DynStore) {
        let owner = user(&store, "barbara").await;
        let other = user(&store, "liskov").await;
        let t0 = now() - Duration::hours(2);
        let (oldest, _) = session(&store, owner.id, t0).await;
        let (newest, _) = session(&store, owner.id, t0).await;
        let (middle, _) = session(&store, owner.id, t0).await;
        let (revoked, _) = session(&store, owner.id, t0).await;
        let mut expired = new_session(owner.id, t0);
        expired.expires_at = t0 + Duration::hours(1);
        store.create_session(&expired).await.unwrap();
        session(&store, other.id, t0).await;

        store
            .record_activity(&[
                (newest.id, t0 + Duration::minutes(30)),
                (middle.id, t0 + Duration::minutes(20)),
                (revoked.id, t0 + Duration::minutes(40)),
                (expired.id, t0 + Duration::minutes(50)),
            ])
            .await
            .unwrap();
        store.revoke_session(owner.id, revoked.id, RevokeReason::Logout, t0).await.unwrap();

        let listed = store.list_active_sessions(owner.id, now()).await.unwrap();
        let ids: Vec<Uuid> = listed.iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![newest.id, middle.id, oldest.id]);
        assert_eq!(listed[0].last_active_at, t0 + Duration::minutes(30));

        // Before `expired` ends it is listed too, in its place.
        let listed = store.list_active_sessions(owner.id, t0 + Duration::minutes(59)).await.unwrap();
        let ids: Vec<Uuid> = listed.iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![expired.id, newest.id, middle.id, oldest.id]);

        assert!(store.list_active_sessions(Uuid::new_v4(), now()).await.unwrap().is_empty());
    }

    pub async fn record_activity_only_raises(store: DynStore) {
        let owner = user(&store, "john").await;
        let t0 = now() - Duration::hours(1);
        let (a, _) = session(&store, owner.id, t0).await;
        let (b, _) = session(&store, owner.id, t0).await;

        store.record_activity(&[]).await.unwrap();
        let later = t0 + Duration::minutes(10);
        let latest = t0 + Duration::minutes(20);
        store
            .record_activity(&[
                (a.id, later),
                (b.id, t0 - Duration::minutes(10)),
                // Several instants for one session: the latest wins, whatever the order.
                (a.id, latest),
                (a.id, later),
                // Unknown sessions are ignored.
                (Uuid::new_v4(), latest),
            ])
            .await
            .unwrap();
        assert_eq!(store.find_session(a.id).await.unwrap().unwrap().last_active_at, latest);
        assert_eq!(store.find_session(b.id).await.unwrap().unwrap().last_active_at, t0);

        // Older news never lowers it.
        store.record_activity(&[(a.id, later)]).await.unwrap();
        let found = store.find_session(a.id).await.unwrap().unwrap();
        assert_eq!(found.last_active_at, latest);
        // Only last_active_at moves.
        assert_eq!(found.refreshed_at, t0);
    }

    /// Activity batches from several replicas overlap and arrive in any order, while "revoke
    /// all" runs on some of the same rows: none of it may fail (e.g. on a deadlock), and a
    /// row skipped by one batch because another holds it is still written by that other.
    pub async fn concurrent_overlapping_activity_batches(store: DynStore) {
        let owner = user(&store, "leslie").await;
        let revoked_owner = user(&store, "butler").await;
        let t0 = now() - Duration::hours(1);
        let mut ids = Vec::new();
        for _ in 0..20 {
            ids.push(session(&store, owner.id, t0).await.0.id);
        }

        for round in 0..20 {
            // Fresh sessions of the other user, in both batches and revoked meanwhile.
            let mut doomed = Vec::new();
            for _ in 0..3 {
                doomed.push(session(&store, revoked_owner.id, t0).await.0.id);
            }
            let at = t0 + Duration::seconds(round + 1);
            let forward: Vec<_> = ids.iter().chain(&doomed).map(|id| (*id, at)).collect();
            let backward: Vec<_> = forward.iter().rev().copied().collect();
            let tasks = [forward, backward].map(|batch| {
                let store = store.clone();
                tokio::spawn(async move { store.record_activity(&batch).await })
            });
            let revoke = {
                let store = store.clone();
                tokio::spawn(async move {
                    store.revoke_user_sessions(revoked_owner.id, None, RevokeReason::Logout, at).await
                })
            };
            for task in tasks {
                task.await.expect("task").expect("no activity batch may fail");
            }
            let revoked = revoke.await.expect("task").expect("revoking may not fail");
            assert_eq!(revoked.len(), 3, "round {round}");
            for id in &ids {
                let found = store.find_session(*id).await.unwrap().unwrap();
                assert_eq!(found.last_active_at, at, "round {round}");
            }
        }
    }

    pub async fn purge_outbox_deletes_only_old_finished_mail(store: DynStore) {
        let t = now() - Duration::days(10);
        let (sent, gave_up, pending) = (new_mail(None, t), new_mail(None, t), new_mail(None, t));
        for mail in [&sent, &gave_up, &pending] {
            enqueue(&store, mail).await;
        }
        store.claim_due_mail(t, 10, LEASE).await.unwrap();
        store.mail_sent(sent.id, t).await.unwrap();
        store.mail_failed(gave_up.id, "550 no such user", None).await.unwrap();
        // gave_up_at is stamped with the wall clock: a cutoff before now keeps it.
        assert_eq!(store.purge_outbox(t + Duration::days(1)).await.unwrap(), 1, "only the old sent one");
        assert_eq!(
            store.purge_outbox(now() + Duration::seconds(1)).await.unwrap(),
            1,
            "then the given-up one"
        );
        store.release_mail(&[pending.id], now()).await.unwrap();
        assert_eq!(
            ids(&store.claim_due_mail(now(), 10, LEASE).await.unwrap()),
            vec![pending.id],
            "pending mail stays"
        );
    }

    pub async fn count_pending_outbox_counts_unsent_and_unabandoned_mail(store: DynStore) {
        assert_eq!(store.count_pending_outbox().await.unwrap(), 0);
        let t = now();
        let mails: Vec<_> = (0..5).map(|_| new_mail(None, t)).collect();
        for mail in &mails {
            enqueue(&store, mail).await;
        }
        // A rolled-back mail does not count.
        let mut tx = store.begin().await.unwrap();
        tx.enqueue_mail(&new_mail(None, t)).await.unwrap();
        drop(tx);
        assert_eq!(store.count_pending_outbox().await.unwrap(), 5);
        // Claimed (leased) and retrying mail is still pending; sent and given-up is not.
        assert_eq!(store.claim_due_mail(t, 3, LEASE).await.unwrap().len(), 3);
        store.mail_sent(mails[0].id, t).await.unwrap();
        store.mail_failed(mails[1].id, "550 no such user", None).await.unwrap();
        store.mail_failed(mails[2].id, "421 later", Some(t + Duration::minutes(5))).await.unwrap();
        assert_eq!(store.count_pending_outbox().await.unwrap(), 3);
    }

    /// One sighting, as the flow makes it: user row locked, then the device noted.
    async fn sight(
        store: &DynStore,
        user: Uuid,
        key: [u8; 32],
        t: OffsetDateTime,
    ) -> portcullis::store::DeviceSighting {
        let mut tx = store.begin().await.unwrap();
        tx.lock_user(user).await.unwrap().unwrap();
        let sighting = tx.remember_device(user, &key, t).await.unwrap();
        tx.commit().await.unwrap();
        sighting
    }

    pub async fn devices_are_new_once_and_the_first_is_marked(store: DynStore) {
        use portcullis::store::DeviceSighting;
        let owner = user(&store, "hopper").await;
        let other = user(&store, "lovelace").await;
        let t = now();
        let laptop = [1u8; 32];
        assert_eq!(sight(&store, owner.id, laptop, t).await, DeviceSighting::New { first_device: true });
        assert_eq!(sight(&store, owner.id, laptop, t).await, DeviceSighting::Known);
        assert_eq!(
            sight(&store, other.id, laptop, t).await,
            DeviceSighting::New { first_device: true },
            "per user"
        );
        // 10 concurrent first sightings of one new device: exactly one is new.
        let phone = [2u8; 32];
        let sightings = futures_util::future::join_all((0..10).map(|_| {
            let store = store.clone();
            async move { sight(&store, owner.id, phone, t).await }
        }))
        .await;
        let new: Vec<_> = sightings.iter().filter(|s| **s != DeviceSighting::Known).collect();
        assert_eq!(new, vec![&DeviceSighting::New { first_device: false }]);
        // Concurrent first sightings of two DIFFERENT devices on a fresh account: one first.
        let fresh = user(&store, "turing").await;
        let (a, b) =
            tokio::join!(sight(&store, fresh.id, [3u8; 32], t), sight(&store, fresh.id, [4u8; 32], t));
        let firsts = [a, b].iter().filter(|s| **s == DeviceSighting::New { first_device: true }).count();
        assert_eq!(firsts, 1, "{a:?} {b:?}");
    }

    pub async fn revoked_sessions_of(store: DynStore) {
        let owner = user(&store, "haskell").await;
        let other = user(&store, "curry").await;
        let t0 = now() - Duration::hours(1);
        let (before, _) = session(&store, owner.id, t0).await;
        let (at, _) = session(&store, owner.id, t0).await;
        let (after, _) = session(&store, owner.id, t0).await;
        session(&store, owner.id, t0).await; // never revoked
        let (elsewhere, _) = session(&store, other.id, t0).await;

        let since = t0 + Duration::minutes(10);
        for (user_id, s, t) in [
            (owner.id, &before, since - Duration::microseconds(1)),
            (owner.id, &at, since),
            (owner.id, &after, since + Duration::minutes(5)),
            (other.id, &elsewhere, since + Duration::minutes(1)),
        ] {
            assert!(store.revoke_session(user_id, s.id, RevokeReason::Logout, t).await.unwrap());
        }

        let mut found = store.revoked_sessions_of(owner.id, since).await.unwrap();
        found.sort();
        let mut expected = vec![at.id, after.id];
        expected.sort();
        assert_eq!(found, expected);
        assert_eq!(store.revoked_sessions_of(other.id, since).await.unwrap(), vec![elsewhere.id]);
        assert!(store.revoked_sessions_of(owner.id, now() + Duration::hours(1)).await.unwrap().is_empty());
        assert!(store.revoked_sessions_of(Uuid::new_v4(), t0).await.unwrap().is_empty());
    }

    pub async fn revoked_since(store: DynStore) {
        let owner = user(&store, "alonzo").await;
        let t0 = now() - Duration::hours(1);
        let (before, _) = session(&store, owner.id, t0).await;
        let (at, _) = session(&store, owner.id, t0).await;
        let (after, _) = session(&store, owner.id, t0).await;
        session(&store, owner.id, t0).await; // never revoked

        let since = t0 + Duration::minutes(10);
        for (s, t) in [
            (&before, since - Duration::microseconds(1)),
            (&at, since),
            (&after, since + Duration::minutes(5)),
        ] {
            assert!(store.revoke_session(owner.id, s.id, RevokeReason::Logout, t).await.unwrap());
        }

        let mut found = store.revoked_since(since).await.unwrap();
        found.sort_by_key(|(_, t)| *t);
        assert_eq!(found, vec![(at.id, since), (after.id, since + Duration::minutes(5))]);
        assert!(store.revoked_since(now() + Duration::hours(1)).await.unwrap().is_empty());
    }

    // Transactions, tokens, outbox, account changes.

    const LEASE: std::time::Duration = std::time::Duration::from_secs(60);

    pub fn new_token(user_id: Uuid, purpose: TokenPurpose, created_at: OffsetDateTime) -> NewOneTimeToken {
        NewOneTimeToken {
            hash: random_hash(),
            user_id,
            purpose,
            created_at,
            expires_at: created_at + Duration::hours(1),
            new_email: None,
        }
    }

    async fn issue(store: &DynStore, token: &NewOneTimeToken) {
        let mut tx = store.begin().await.expect("begin");
        tx.issue_token(token).await.expect("issue token");
        tx.commit().await.expect("commit");
    }

    async fn consume(
        store: &DynStore,
        hash: &[u8],
        purpose: TokenPurpose,
        now: OffsetDateTime,
    ) -> Option<SpentToken> {
        let mut tx = store.begin().await.expect("begin");
        let spent = tx.consume_token(hash, purpose, now).await.expect("consume token");
        tx.commit().await.expect("commit");
        spent
    }

    pub fn new_mail(user_id: Option<Uuid>, created_at: OffsetDateTime) -> NewMail {
        NewMail {
            id: Uuid::new_v4(),
            user_id,
            to: "Ada@Example.com".to_owned(),
            subject: "Confirm your address".to_owned(),
            text: "Open https://example.com/verify?t=x".to_owned(),
            html: "<p>Open <a href=\"https://example.com/verify?t=x\">this link</a></p>".to_owned(),
            created_at,
        }
    }

    pub async fn enqueue(store: &DynStore, mail: &NewMail) {
        let mut tx = store.begin().await.expect("begin");
        tx.enqueue_mail(mail).await.expect("enqueue mail");
        tx.commit().await.expect("commit");
    }

    fn ids(mails: &[OutboxMail]) -> Vec<Uuid> {
        mails.iter().map(|mail| mail.id).collect()
    }

    pub async fn tx_commit_persists_and_drop_rolls_back(store: DynStore) {
        let committed = new_user("commit");
        let mut tx = store.begin().await.unwrap();
        let created = tx.create_user(&committed).await.unwrap();
        // The transaction sees its own writes.
        assert_eq!(tx.find_user_by_login("commit").await.unwrap(), Some(created.clone()));
        tx.commit().await.unwrap();
        assert_eq!(store.find_user(committed.id).await.unwrap(), Some(created.clone()));

        let dropped = new_user("dropped");
        let mut tx = store.begin().await.unwrap();
        tx.create_user(&dropped).await.unwrap();
        tx.set_password_hash(committed.id, "$argon2id$rolled-back", now()).await.unwrap();
        assert!(tx.find_user_by_login("dropped").await.unwrap().is_some());
        drop(tx);
        assert_eq!(store.find_user(dropped.id).await.unwrap(), None);
        assert_eq!(store.find_user_by_login("dropped").await.unwrap(), None);
        assert_eq!(store.find_user(committed.id).await.unwrap(), Some(created));
        // The connection went back to the pool usable, and nothing holds a lock.
        user(&store, "after").await;
    }

    pub async fn tx_conflict_leaves_the_transaction_usable(store: DynStore) {
        user(&store, "taken").await;
        let mut tx = store.begin().await.unwrap();
        let mut clash = new_user("taken");
        clash.email_key = "someone-else@example.com".to_owned();
        let error = tx.create_user(&clash).await.expect_err("username key is taken");
        assert!(matches!(error, StoreError::Conflict("username")), "{error:?}");
        let fresh = new_user("fresh");
        tx.create_user(&fresh).await.expect("the transaction goes on after a conflict");
        tx.commit().await.unwrap();
        assert!(store.find_user(fresh.id).await.unwrap().is_some());
    }

    pub async fn lock_user_returns_the_row(store: DynStore) {
        let created = user(&store, "locked").await;
        let mut tx = store.begin().await.unwrap();
        assert_eq!(tx.lock_user(created.id).await.unwrap(), Some(created.clone()));
        assert_eq!(tx.lock_user(Uuid::new_v4()).await.unwrap(), None);
        tx.commit().await.unwrap();
    }

    pub async fn token_issue_peek_consume(store: DynStore) {
        let owner = user(&store, "tokens").await;
        let t = now();
        let mut token = new_token(owner.id, TokenPurpose::ChangeEmail, t);
        token.new_email = Some("New@Example.com".to_owned());
        issue(&store, &token).await;

        // Peeking does not spend it.
        for _ in 0..2 {
            assert_eq!(
                store.peek_token(&token.hash, TokenPurpose::ChangeEmail, t).await.unwrap(),
                Some(owner.id)
            );
        }
        let spent = consume(&store, &token.hash, TokenPurpose::ChangeEmail, t + Duration::seconds(1)).await;
        assert_eq!(
            spent,
            Some(SpentToken { user_id: owner.id, new_email: Some("New@Example.com".to_owned()) })
        );
        // Once only.
        assert_eq!(
            consume(&store, &token.hash, TokenPurpose::ChangeEmail, t + Duration::seconds(2)).await,
            None
        );
        assert_eq!(store.peek_token(&token.hash, TokenPurpose::ChangeEmail, t).await.unwrap(), None);

        // A consume in a rolled-back transaction spends nothing.
        let other = new_token(owner.id, TokenPurpose::VerifyEmail, t);
        issue(&store, &other).await;
        let mut tx = store.begin().await.unwrap();
        let spent = tx.consume_token(&other.hash, TokenPurpose::VerifyEmail, t).await.unwrap();
        assert_eq!(spent, Some(SpentToken { user_id: owner.id, new_email: None }));
        drop(tx);
        assert_eq!(
            store.peek_token(&other.hash, TokenPurpose::VerifyEmail, t).await.unwrap(),
            Some(owner.id)
        );
    }

    pub async fn token_wrong_purpose_expired_or_unknown(store: DynStore) {
        let owner = user(&store, "purposes").await;
        let t = now();
        let token = new_token(owner.id, TokenPurpose::VerifyEmail, t);
        issue(&store, &token).await;

        // Another purpose: nothing, and the token is not spent by trying.
        for purpose in [TokenPurpose::ResetPassword, TokenPurpose::ChangeEmail] {
            assert_eq!(store.peek_token(&token.hash, purpose, t).await.unwrap(), None);
            assert_eq!(consume(&store, &token.hash, purpose, t).await, None);
        }
        // Expired: at expires_at it is dead, one microsecond before it is alive.
        let at_expiry = token.expires_at;
        assert_eq!(store.peek_token(&token.hash, TokenPurpose::VerifyEmail, at_expiry).await.unwrap(), None);
        assert_eq!(consume(&store, &token.hash, TokenPurpose::VerifyEmail, at_expiry).await, None);
        let just_before = at_expiry - Duration::microseconds(1);
        assert_eq!(
            store.peek_token(&token.hash, TokenPurpose::VerifyEmail, just_before).await.unwrap(),
            Some(owner.id)
        );
        assert!(consume(&store, &token.hash, TokenPurpose::VerifyEmail, just_before).await.is_some());

        // Unknown.
        assert_eq!(store.peek_token(&random_hash(), TokenPurpose::VerifyEmail, t).await.unwrap(), None);
        assert_eq!(consume(&store, &random_hash(), TokenPurpose::VerifyEmail, t).await, None);
    }

    pub async fn newer_token_invalidates_older(store: DynStore) {
        let owner = user(&store, "newer").await;
        let bystander = user(&store, "bystander").await;
        let t = now();
        let older = new_token(owner.id, TokenPurpose::ResetPassword, t);
        let other_purpose = new_token(owner.id, TokenPurpose::VerifyEmail, t);
        let other_user = new_token(bystander.id, TokenPurpose::ResetPassword, t);
        for token in [&older, &other_purpose, &other_user] {
            issue(&store, token).await;
        }
        let newer = new_token(owner.id, TokenPurpose::ResetPassword, t + Duration::seconds(1));
        issue(&store, &newer).await;

        let later = t + Duration::seconds(2);
        assert_eq!(store.peek_token(&older.hash, TokenPurpose::ResetPassword, later).await.unwrap(), None);
        assert_eq!(consume(&store, &older.hash, TokenPurpose::ResetPassword, later).await, None);
        assert!(consume(&store, &newer.hash, TokenPurpose::ResetPassword, later).await.is_some());
        // Other purposes and other users are untouched.
        assert!(consume(&store, &other_purpose.hash, TokenPurpose::VerifyEmail, later).await.is_some());
        assert!(consume(&store, &other_user.hash, TokenPurpose::ResetPassword, later).await.is_some());
    }

    pub async fn invalidate_tokens_by_purpose(store: DynStore) {
        let owner = user(&store, "invalidate").await;
        let t = now();
        let reset = new_token(owner.id, TokenPurpose::ResetPassword, t);
        let verify = new_token(owner.id, TokenPurpose::VerifyEmail, t);
        issue(&store, &reset).await;
        issue(&store, &verify).await;

        // Rolled back: nothing happens.
        let mut tx = store.begin().await.unwrap();
        tx.invalidate_tokens(owner.id, TokenPurpose::ResetPassword, t).await.unwrap();
        drop(tx);
        assert_eq!(
            store.peek_token(&reset.hash, TokenPurpose::ResetPassword, t).await.unwrap(),
            Some(owner.id)
        );

        let mut tx = store.begin().await.unwrap();
        tx.invalidate_tokens(owner.id, TokenPurpose::ResetPassword, t).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.peek_token(&reset.hash, TokenPurpose::ResetPassword, t).await.unwrap(), None);
        assert_eq!(consume(&store, &reset.hash, TokenPurpose::ResetPassword, t).await, None);
        assert_eq!(
            store.peek_token(&verify.hash, TokenPurpose::VerifyEmail, t).await.unwrap(),
            Some(owner.id)
        );
    }

    pub async fn concurrent_consumes_spend_once(store: DynStore) {
        let owner = user(&store, "racer").await;
        let t = now();
        let token = new_token(owner.id, TokenPurpose::ResetPassword, t);
        issue(&store, &token).await;

        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                let hash = token.hash.clone();
                tokio::spawn(async move {
                    let mut tx = store.begin().await?;
                    let spent = tx.consume_token(&hash, TokenPurpose::ResetPassword, t).await?;
                    tx.commit().await?;
                    Ok::<_, StoreError>(spent)
                })
            })
            .collect();
        let mut spent = Vec::new();
        for task in tasks {
            if let Some(s) = task.await.expect("task").expect("no consume may fail") {
                spent.push(s);
            }
        }
        assert_eq!(spent, vec![SpentToken { user_id: owner.id, new_email: None }]);
    }

    pub async fn outbox_rolled_back_leaves_nothing(store: DynStore) {
        let owner = user(&store, "outbox").await;
        let t = now();
        let mut tx = store.begin().await.unwrap();
        tx.enqueue_mail(&new_mail(Some(owner.id), t)).await.unwrap();
        drop(tx);
        let far = t + Duration::days(1);
        assert!(store.claim_due_mail(far, 10, LEASE).await.unwrap().is_empty());

        let mail = new_mail(Some(owner.id), t);
        enqueue(&store, &mail).await;
        assert_eq!(ids(&store.claim_due_mail(far, 10, LEASE).await.unwrap()), vec![mail.id]);
    }

    pub async fn claim_lease_and_sent(store: DynStore) {
        let t = now();
        let mail = new_mail(None, t);
        enqueue(&store, &mail).await;

        // Not yet due before its creation instant; due from it on.
        assert!(store.claim_due_mail(t - Duration::microseconds(1), 10, LEASE).await.unwrap().is_empty());
        let claimed = store.claim_due_mail(t, 10, LEASE).await.unwrap();
        let expected = OutboxMail {
            id: mail.id,
            to: mail.to.clone(),
            subject: mail.subject.clone(),
            text: mail.text.clone(),
            html: mail.html.clone(),
            attempts: 0,
            created_at: t,
            last_error: None,
        };
        assert_eq!(claimed, vec![expected.clone()]);

        // Leased: not claimable within the lease, claimable from its end.
        let lease_end = t + Duration::seconds(60);
        assert!(store.claim_due_mail(t, 10, LEASE).await.unwrap().is_empty());
        assert!(
            store.claim_due_mail(lease_end - Duration::microseconds(1), 10, LEASE).await.unwrap().is_empty()
        );
        assert_eq!(store.claim_due_mail(lease_end, 10, LEASE).await.unwrap(), vec![expected]);

        // Sent: never again.
        store.mail_sent(mail.id, lease_end).await.unwrap();
        assert!(store.claim_due_mail(t + Duration::days(365), 10, LEASE).await.unwrap().is_empty());
    }

    pub async fn released_mail_is_due_at_once_without_an_attempt(store: DynStore) {
        let t = now();
        let (a, b) = (new_mail(None, t), new_mail(None, t));
        enqueue(&store, &a).await;
        enqueue(&store, &b).await;
        assert_eq!(store.claim_due_mail(t, 10, LEASE).await.unwrap().len(), 2);
        store.mail_sent(b.id, t).await.unwrap();
        let later = t + Duration::seconds(1);
        store.release_mail(&[a.id, b.id], later).await.unwrap();
        let again = store.claim_due_mail(later, 10, LEASE).await.unwrap();
        assert_eq!(ids(&again), vec![a.id], "released at once; the sent one stays sent");
        assert_eq!(again[0].attempts, 0, "releasing is not an attempt");
    }

    pub async fn claim_limit_oldest_first(store: DynStore) {
        let t = now() - Duration::minutes(10);
        let mails: Vec<_> = (0..3).map(|i| new_mail(None, t + Duration::seconds(i))).collect();
        // Enqueued newest first: the order of creation instants counts, not of insertion.
        for mail in mails.iter().rev() {
            enqueue(&store, mail).await;
        }
        let now = now();
        assert_eq!(ids(&store.claim_due_mail(now, 2, LEASE).await.unwrap()), vec![mails[0].id, mails[1].id]);
        assert_eq!(ids(&store.claim_due_mail(now, 2, LEASE).await.unwrap()), vec![mails[2].id]);
        assert!(store.claim_due_mail(now, 2, LEASE).await.unwrap().is_empty());
    }

    pub async fn mail_failed_retries_then_gives_up(store: DynStore) {
        let t = now();
        let mail = new_mail(None, t);
        enqueue(&store, &mail).await;
        assert_eq!(ids(&store.claim_due_mail(t, 10, LEASE).await.unwrap()), vec![mail.id]);

        // Retry later than the lease's end.
        let retry_at = t + Duration::minutes(10);
        store.mail_failed(mail.id, "421 try again later", Some(retry_at)).await.unwrap();
        assert!(store.claim_due_mail(t + Duration::minutes(5), 10, LEASE).await.unwrap().is_empty());
        let retried = store.claim_due_mail(retry_at, 10, LEASE).await.unwrap();
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].attempts, 1);
        assert_eq!(retried[0].last_error.as_deref(), Some("421 try again later"));

        // Retry sooner than the lease's end: the failure's time wins.
        let soon = retry_at + Duration::seconds(1);
        store.mail_failed(mail.id, "451 again", Some(soon)).await.unwrap();
        let retried = store.claim_due_mail(soon, 10, LEASE).await.unwrap();
        assert_eq!((retried[0].attempts, retried[0].last_error.as_deref()), (2, Some("451 again")));

        // Given up: never again (the row and its last error stay; see the engine-specific
        // tests).
        store.mail_failed(mail.id, "550 no such user", None).await.unwrap();
        assert!(store.claim_due_mail(t + Duration::days(365), 10, LEASE).await.unwrap().is_empty());
    }

    /// Enqueues a mail, fails it once with a retry then once for good; returns its id.
    pub async fn give_up_on_a_mail(store: &DynStore) -> Uuid {
        let t = now();
        let mail = new_mail(None, t);
        enqueue(store, &mail).await;
        store.mail_failed(mail.id, "421 try again later", Some(t)).await.unwrap();
        store.mail_failed(mail.id, "550 no such user", None).await.unwrap();
        assert!(store.claim_due_mail(t + Duration::days(1), 10, LEASE).await.unwrap().is_empty());
        mail.id
    }

    pub async fn concurrent_claimers_never_share_a_mail(store: DynStore) {
        let t = now() - Duration::minutes(1);
        let mut expected = Vec::new();
        for i in 0..60 {
            let mail = new_mail(None, t + Duration::milliseconds(i));
            expected.push(mail.id);
            enqueue(&store, &mail).await;
        }
        let claimers: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let claimed = store.claim_due_mail(now(), 3, LEASE).await?;
                        if claimed.is_empty() {
                            return Ok::<_, StoreError>(mine);
                        }
                        mine.extend(claimed.into_iter().map(|mail| mail.id));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for claimer in claimers {
            all.extend(claimer.await.expect("task").expect("no claim may fail"));
        }
        all.sort();
        expected.sort();
        assert_eq!(all, expected, "every mail claimed exactly once");
    }

    pub async fn delete_user_cascades_and_leaves_tombstones(store: DynStore) {
        let doomed = user(&store, "doomed").await;
        let kept = user(&store, "kept").await;
        let t0 = now() - Duration::hours(1);
        let (live_a, _) = session(&store, doomed.id, t0).await;
        let (live_b, _) = session(&store, doomed.id, t0).await;
        let (revoked, _) = session(&store, doomed.id, t0).await;
        let revoked_at = t0 + Duration::minutes(30);
        assert!(store.revoke_session(doomed.id, revoked.id, RevokeReason::Logout, revoked_at).await.unwrap());
        let mut expired = new_session(doomed.id, t0 - Duration::days(2));
        expired.expires_at = t0 - Duration::days(1);
        store.create_session(&expired).await.unwrap();
        let doomed_token = new_token(doomed.id, TokenPurpose::VerifyEmail, now());
        issue(&store, &doomed_token).await;
        let doomed_mail = new_mail(Some(doomed.id), t0);
        enqueue(&store, &doomed_mail).await;

        let (kept_session, _) = session(&store, kept.id, t0).await;
        let kept_token = new_token(kept.id, TokenPurpose::VerifyEmail, now());
        issue(&store, &kept_token).await;
        let kept_mail = new_mail(Some(kept.id), t0);
        enqueue(&store, &kept_mail).await;
        let anonymous_mail = new_mail(None, t0);
        enqueue(&store, &anonymous_mail).await;

        // Rolled back: nothing happens.
        let t1 = now();
        let mut tx = store.begin().await.unwrap();
        assert_eq!(tx.delete_user(doomed.id, t1).await.unwrap().len(), 2);
        drop(tx);
        assert!(store.find_user(doomed.id).await.unwrap().is_some());
        assert!(store.revoked_since(t1).await.unwrap().is_empty());

        let mut tx = store.begin().await.unwrap();
        let mut live = tx.delete_user(doomed.id, t1).await.unwrap();
        tx.commit().await.unwrap();
        live.sort();
        let mut expected = vec![live_a.id, live_b.id];
        expected.sort();
        assert_eq!(live, expected);

        assert_eq!(store.find_user(doomed.id).await.unwrap(), None);
        assert_eq!(store.find_user_by_login("doomed").await.unwrap(), None);
        for s in [&live_a, &live_b, &revoked, &expired] {
            assert_eq!(store.find_session(s.id).await.unwrap(), None);
        }
        assert!(store.list_active_sessions(doomed.id, t1).await.unwrap().is_empty());
        assert_eq!(store.peek_token(&doomed_token.hash, TokenPurpose::VerifyEmail, t1).await.unwrap(), None);

        // The other account is untouched.
        assert_eq!(store.find_user(kept.id).await.unwrap(), Some(kept.clone()));
        assert!(store.find_session(kept_session.id).await.unwrap().is_some());
        assert_eq!(
            store.peek_token(&kept_token.hash, TokenPurpose::VerifyEmail, t1).await.unwrap(),
            Some(kept.id)
        );
        let mut claimed = ids(&store.claim_due_mail(t1, 10, LEASE).await.unwrap());
        claimed.sort();
        let mut expected = vec![kept_mail.id, anonymous_mail.id];
        expected.sort();
        assert_eq!(claimed, expected, "the deleted account's mail went with it");

        // Revocations still re-published: the live sessions at the deletion instant, the
        // revoked-but-unexpired one at its own; not the expired one.
        let mut found = store.revoked_since(t0).await.unwrap();
        found.sort();
        let mut expected = vec![(live_a.id, t1), (live_b.id, t1), (revoked.id, revoked_at)];
        expected.sort();
        assert_eq!(found, expected);
        assert_eq!(store.revoked_since(t1).await.unwrap().len(), 2);
        assert!(store.revoked_since(t1 + Duration::microseconds(1)).await.unwrap().is_empty());

        // Deleting an unknown (or already deleted) user is a no-op.
        let mut tx = store.begin().await.unwrap();
        assert!(tx.delete_user(doomed.id, now()).await.unwrap().is_empty());
        tx.commit().await.unwrap();
    }

    pub async fn update_profile_changes_only_some_fields(store: DynStore) {
        let created = user(&store, "profile").await;
        let bystander = user(&store, "unchanged").await;
        let t = now();
        let mut tx = store.begin().await.unwrap();
        let updated = tx
            .update_profile(
                created.id,
                &ProfileChanges {
                    first_name: Some("Augusta".to_owned()),
                    bio: Some("Wrote the first program.".to_owned()),
                    ..ProfileChanges::default()
                },
                t,
            )
            .await
            .unwrap();
        let expected = UserRecord {
            first_name: "Augusta".to_owned(),
            bio: "Wrote the first program.".to_owned(),
            ..created.clone()
        };
        assert_eq!(updated, expected);
        let updated = tx
            .update_profile(
                created.id,
                &ProfileChanges {
                    last_name: Some("King".to_owned()),
                    phone: Some("+44 20 7946 0000".to_owned()),
                    // Empty is a value, not "unchanged".
                    bio: Some(String::new()),
                    ..ProfileChanges::default()
                },
                t,
            )
            .await
            .unwrap();
        let expected = UserRecord {
            last_name: "King".to_owned(),
            phone: "+44 20 7946 0000".to_owned(),
            bio: String::new(),
            ..expected
        };
        assert_eq!(updated, expected);
        // No changes: the record as it is.
        assert_eq!(tx.update_profile(created.id, &ProfileChanges::default(), t).await.unwrap(), expected);
        tx.commit().await.unwrap();
        assert_eq!(store.find_user(created.id).await.unwrap(), Some(expected));
        assert_eq!(store.find_user(bystander.id).await.unwrap(), Some(bystander));
    }

    pub async fn set_email_conflict_and_success(store: DynStore) {
        let mover = user(&store, "mover").await;
        let holder = user(&store, "holder").await;
        let t = now();

        let mut tx = store.begin().await.unwrap();
        let error = tx
            .set_email(mover.id, "Holder@Example.com", "holder@example.com", t)
            .await
            .expect_err("the key is another account's");
        assert!(matches!(error, StoreError::Conflict("email")), "{error:?}");
        // The transaction goes on.
        tx.set_email(mover.id, "Moved@Example.com", "moved@example.com", t).await.unwrap();
        tx.commit().await.unwrap();

        let found = store.find_user(mover.id).await.unwrap().unwrap();
        assert_eq!(found.email, "Moved@Example.com");
        assert_eq!(found.email_verified_at, Some(t), "the flow verified the new address");
        assert_eq!(
            store.find_user_by_login("moved@example.com").await.unwrap().map(|u| u.id),
            Some(mover.id)
        );
        assert_eq!(store.find_user_by_login("mover@example.com").await.unwrap(), None);
        assert_eq!(store.find_user(holder.id).await.unwrap(), Some(holder));
        // The old key is free again.
        let mut reuse = new_user("newcomer");
        reuse.email_key = "mover@example.com".to_owned();
        store.create_user(&reuse).await.expect("the old email key is free");
    }

    pub async fn mark_email_verified_once_and_set_password_hash(store: DynStore) {
        let created = user(&store, "verify").await;
        let t = now();
        let mut tx = store.begin().await.unwrap();
        assert!(tx.mark_email_verified(created.id, t).await.unwrap());
        assert!(!tx.mark_email_verified(created.id, t + Duration::seconds(1)).await.unwrap());
        tx.set_password_hash(created.id, "$argon2id$reset", t).await.unwrap();
        tx.commit().await.unwrap();
        let found = store.find_user(created.id).await.unwrap().unwrap();
        assert_eq!(
            found,
            UserRecord { email_verified_at: Some(t), password_hash: "$argon2id$reset".to_owned(), ..created }
        );
        let mut tx = store.begin().await.unwrap();
        assert!(!tx.mark_email_verified(created.id, now()).await.unwrap());
        assert!(!tx.mark_email_verified(Uuid::new_v4(), now()).await.unwrap());
        tx.commit().await.unwrap();
        assert_eq!(store.find_user(created.id).await.unwrap(), Some(found));
    }

    pub async fn tx_revoke_user_sessions(store: DynStore) {
        let owner = user(&store, "txrevoke").await;
        let t0 = now() - Duration::hours(1);
        let (keep, _) = session(&store, owner.id, t0).await;
        let (other, _) = session(&store, owner.id, t0).await;
        let t1 = now();

        let mut tx = store.begin().await.unwrap();
        let revoked =
            tx.revoke_user_sessions(owner.id, Some(keep.id), RevokeReason::PasswordChanged, t1).await;
        assert_eq!(revoked.unwrap(), vec![other.id]);
        drop(tx);
        assert_eq!(store.find_session(other.id).await.unwrap().unwrap().revoked_at, None);

        let mut tx = store.begin().await.unwrap();
        let mut revoked =
            tx.revoke_user_sessions(owner.id, None, RevokeReason::PasswordReset, t1).await.unwrap();
        tx.commit().await.unwrap();
        revoked.sort();
        let mut expected = vec![keep.id, other.id];
        expected.sort();
        assert_eq!(revoked, expected);
        assert!(store.list_active_sessions(owner.id, t1).await.unwrap().is_empty());
    }

    fn london() -> Location {
        Location {
            country: "GB".to_owned(),
            city: "London".to_owned(),
            latitude: Some(51.5072),
            longitude: Some(-0.1276),
        }
    }

    pub async fn session_location_round_trips(store: DynStore) {
        let owner = user(&store, "ida").await;
        let t = now();
        let partial = Location { country: "FR".to_owned(), ..Location::default() };
        // `Some` with every field empty is still `Some`: empty strings are stored as given.
        for location in [Some(london()), Some(partial), Some(Location::default()), None] {
            let mut new = new_session(owner.id, t);
            new.location = location.clone();
            let created = store.create_session(&new).await.unwrap();
            assert_eq!(created.location, location);
            assert_eq!(store.find_session(new.id).await.unwrap().unwrap().location, location);
            let listed = store.list_active_sessions(owner.id, t).await.unwrap();
            assert_eq!(listed.iter().find(|s| s.id == new.id).unwrap().location, location);
            let RotateOutcome::Rotated(rotated) =
                store.rotate_refresh_token(&rotation(&new.refresh_hash, t)).await.unwrap()
            else {
                panic!("rotates");
            };
            assert_eq!(rotated.location, location);
        }
    }

    fn new_attempt(user_id: Option<Uuid>, identifier: &str, at: OffsetDateTime) -> NewLoginAttempt {
        NewLoginAttempt {
            id: Uuid::new_v4(),
            at,
            identifier: identifier.to_owned(),
            user_id,
            outcome: AttemptOutcome::Failure,
            reason: "invalid_credentials".to_owned(),
            device: DeviceInfo {
                device_type: "mobile".to_owned(),
                browser: "Safari".to_owned(),
                os: "iOS".to_owned(),
                user_agent: "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X)".to_owned(),
                ip_address: "203.0.113.7".to_owned(),
                fingerprint: "fp-attempt".to_owned(),
            },
            location: None,
        }
    }

    fn recorded(new: &NewLoginAttempt) -> LoginAttempt {
        LoginAttempt {
            id: new.id,
            at: new.at,
            identifier: new.identifier.clone(),
            user_id: new.user_id,
            outcome: new.outcome,
            reason: new.reason.clone(),
            device: new.device.clone(),
            location: new.location.clone(),
        }
    }

    async fn record(store: &DynStore, attempt: &NewLoginAttempt) {
        store.record_login_attempt(attempt).await.expect("record login attempt");
    }

    pub async fn login_attempts_record_and_list(store: DynStore) {
        let owner = user(&store, "Katherine").await;
        let other = user(&store, "dorothy").await;
        let t = now();

        let mut success = new_attempt(Some(owner.id), "Katherine", t);
        success.outcome = AttemptOutcome::Success;
        success.reason = "ok".to_owned();
        success.location = Some(london());
        let mut failure = new_attempt(Some(owner.id), "katherine@EXAMPLE.com", t - Duration::minutes(5));
        failure.device = DeviceInfo::default();
        let mut unverified = new_attempt(Some(owner.id), "katherine", t - Duration::hours(1));
        unverified.reason = "email_not_verified".to_owned();
        unverified.location = Some(Location { country: "US".to_owned(), ..Location::default() });
        let mut empty_location = new_attempt(Some(owner.id), "Katherine", t - Duration::days(1));
        empty_location.location = Some(Location::default());
        // Attempts of another account, and one that matched none, even naming this one.
        let others = [
            new_attempt(Some(other.id), "dorothy", t + Duration::seconds(1)),
            new_attempt(None, "katherine", t + Duration::seconds(2)),
        ];
        for attempt in [&unverified, &success, &others[0], &empty_location, &failure, &others[1]] {
            record(&store, attempt).await;
        }

        let expected: Vec<LoginAttempt> =
            [&success, &failure, &unverified, &empty_location].into_iter().map(recorded).collect();
        assert_eq!(store.list_login_attempts(owner.id, None, 10).await.unwrap(), expected);
        assert_eq!(store.list_login_attempts(owner.id, None, 2).await.unwrap(), expected[..2]);
        assert_eq!(
            store.list_login_attempts(owner.id, Some((failure.at, failure.id)), 10).await.unwrap(),
            expected[2..]
        );
        assert!(store.list_login_attempts(owner.id, None, 0).await.unwrap().is_empty());
        assert_eq!(store.list_login_attempts(other.id, None, 10).await.unwrap(), vec![recorded(&others[0])]);
        assert!(store.list_login_attempts(Uuid::new_v4(), None, 10).await.unwrap().is_empty());
    }

    pub async fn login_attempts_paginate_without_gaps_or_duplicates(store: DynStore) {
        let owner = user(&store, "mary").await;
        let other = user(&store, "jackson").await;
        let base = now() - Duration::hours(1);
        // 25 attempts in groups of three sharing one instant: ties are broken by id.
        let mut attempts = Vec::new();
        for i in 0..25 {
            let at = base + Duration::seconds(i / 3);
            let attempt = new_attempt(Some(owner.id), "mary", at);
            record(&store, &attempt).await;
            // Interleaved noise that must not show.
            record(&store, &new_attempt(Some(other.id), "jackson", at)).await;
            attempts.push(attempt);
        }
        let mut expected: Vec<LoginAttempt> = attempts.iter().map(recorded).collect();
        expected.sort_by_key(|a| std::cmp::Reverse((a.at, a.id)));

        let mut pages = Vec::new();
        let mut before = None;
        loop {
            let page = store.list_login_attempts(owner.id, before, 10).await.unwrap();
            if page.is_empty() {
                break;
            }
            assert!(pages.len() < 3, "at most three pages of 25");
            before = page.last().map(|a| (a.at, a.id));
            pages.push(page);
        }
        assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
        assert_eq!(pages.concat(), expected, "newest first by (at, id), no gaps, no duplicates");
        // The same query again gives the same pages.
        assert_eq!(
            store.list_login_attempts(owner.id, Some((expected[9].at, expected[9].id)), 10).await.unwrap(),
            pages[1]
        );
    }

    pub async fn purge_login_attempts_deletes_only_older(store: DynStore) {
        let owner = user(&store, "annie").await;
        let t = now();
        let cutoff = t - Duration::days(3);
        let old = new_attempt(Some(owner.id), "annie", t - Duration::days(10));
        let old_unmatched = new_attempt(None, "nobody", cutoff - Duration::microseconds(1));
        let at_cutoff = new_attempt(Some(owner.id), "annie", cutoff);
        let recent = new_attempt(Some(owner.id), "annie", t);
        let recent_unmatched = new_attempt(None, "nobody", t);
        for attempt in [&old, &old_unmatched, &at_cutoff, &recent, &recent_unmatched] {
            record(&store, attempt).await;
        }

        assert_eq!(store.purge_login_attempts(cutoff).await.unwrap(), 2);
        assert_eq!(
            store.list_login_attempts(owner.id, None, 10).await.unwrap(),
            vec![recorded(&recent), recorded(&at_cutoff)]
        );
        assert_eq!(store.purge_login_attempts(cutoff).await.unwrap(), 0);
        // Everything left: the three at or after the cutoff.
        assert_eq!(store.purge_login_attempts(t + Duration::days(1)).await.unwrap(), 3);
        assert!(store.list_login_attempts(owner.id, None, 10).await.unwrap().is_empty());
    }

    pub async fn delete_user_deletes_its_login_attempts(store: DynStore) {
        let doomed = user(&store, "Doomed").await;
        let kept = user(&store, "kept").await;
        let t0 = now() - Duration::hours(1);

        // (attempt, survives the deletion), each at its own instant.
        let specs: [(Option<Uuid>, &str, bool); 9] = [
            (Some(doomed.id), "Doomed", false),
            (Some(doomed.id), "doomed@example.com", false),
            // Matched no account but named the doomed one, in any case.
            (None, "DOOMED", false),
            (None, "doomed", false),
            (None, "Doomed@EXAMPLE.COM", false),
            // Matched another account: not the doomed one's, whatever it says.
            (Some(kept.id), "kept", true),
            (Some(kept.id), "doomed", true),
            // Named someone else, or nearly the doomed one.
            (None, "doomed2", true),
            (None, "doomed@example.org", true),
        ];
        let attempts: Vec<(NewLoginAttempt, bool)> = specs
            .iter()
            .enumerate()
            .map(|(i, &(user_id, identifier, survives))| {
                (new_attempt(user_id, identifier, t0 + Duration::seconds(i as i64)), survives)
            })
            .collect();
        for (attempt, _) in &attempts {
            record(&store, attempt).await;
        }

        // Rolled back: nothing happens.
        let mut tx = store.begin().await.unwrap();
        tx.delete_user(doomed.id, now()).await.unwrap();
        drop(tx);
        assert_eq!(store.list_login_attempts(doomed.id, None, 10).await.unwrap().len(), 2);

        let mut tx = store.begin().await.unwrap();
        tx.delete_user(doomed.id, now()).await.unwrap();
        tx.commit().await.unwrap();

        assert!(store.list_login_attempts(doomed.id, None, 10).await.unwrap().is_empty());
        let kept_attempts: Vec<LoginAttempt> =
            attempts[5..7].iter().rev().map(|(attempt, _)| recorded(attempt)).collect();
        assert_eq!(store.list_login_attempts(kept.id, None, 10).await.unwrap(), kept_attempts);
        // Which rows are left, one instant at a time (purging is the only way to see
        // unmatched attempts).
        for (attempt, survives) in &attempts {
            let purged = store.purge_login_attempts(attempt.at + Duration::microseconds(1)).await.unwrap();
            assert_eq!(purged, u64::from(*survives), "{:?} survives: {survives}", attempt.identifier);
        }
    }

    // Login guards: durable failure budgets.

    fn account_guard(user_id: Uuid) -> GuardKey {
        GuardKey { subject: format!("u:{user_id}"), scope: "account".to_owned(), user_id: Some(user_id) }
    }

    /// A guard of an identifier that named no account.
    fn unknown_guard() -> GuardKey {
        GuardKey {
            subject: format!("i:{}", Uuid::new_v4().simple()),
            scope: "account".to_owned(),
            user_id: None,
        }
    }

    /// `max_failures` per `window_minutes`; lockouts forgotten after a day without a lock.
    fn budget(max_failures: u32, window_minutes: u64) -> GuardBudget {
        GuardBudget {
            max_failures,
            window: std::time::Duration::from_secs(window_minutes * 60),
            forget_lockouts_after: std::time::Duration::from_secs(24 * 3600),
        }
    }

    fn reserved(failures: u32, lockouts: u32) -> TryReservation {
        TryReservation::Reserved { failures, lockouts }
    }

    async fn reserve(
        store: &DynStore,
        key: &GuardKey,
        budget: &GuardBudget,
        t: OffsetDateTime,
    ) -> TryReservation {
        store.reserve_try(key, budget, t).await.expect("reserve a try")
    }

    /// Uses up `key`'s budget at `t` and locks it until `until`.
    async fn lock_out(
        store: &DynStore,
        key: &GuardKey,
        budget: &GuardBudget,
        t: OffsetDateTime,
        until: OffsetDateTime,
    ) {
        let lockouts = store.guard_state(key).await.unwrap().map_or(0, |state| state.lockouts);
        for failures in 1..=budget.max_failures {
            assert_eq!(reserve(store, key, budget, t).await, reserved(failures, lockouts));
        }
        assert!(store.lock_guard(key, until, t).await.unwrap());
    }

    pub async fn guard_reserves_the_budget_then_is_exhausted(store: DynStore) {
        let owner = user(&store, "guarded").await;
        let key = account_guard(owner.id);
        let budget = budget(3, 15);
        let t0 = now() - Duration::minutes(5);
        assert_eq!(store.guard_state(&key).await.unwrap(), None);

        for failures in 1..=3 {
            let t = t0 + Duration::seconds(i64::from(failures));
            assert_eq!(reserve(&store, &key, &budget, t).await, reserved(failures, 0));
        }
        let state = GuardState {
            failures: 3,
            first_failure_at: t0 + Duration::seconds(1),
            locked_until: None,
            lockouts: 0,
        };
        assert_eq!(store.guard_state(&key).await.unwrap(), Some(state));

        // Used up by tries still in flight: refused, and nothing changes.
        for _ in 0..2 {
            assert_eq!(
                reserve(&store, &key, &budget, t0 + Duration::minutes(1)).await,
                TryReservation::Exhausted { lockouts: 0 }
            );
        }
        assert_eq!(store.guard_state(&key).await.unwrap(), Some(state));

        // Other scopes and subjects have budgets of their own.
        let device = GuardKey { scope: "device:0a0b".to_owned(), ..key.clone() };
        let otp = GuardKey { scope: "otp".to_owned(), ..key.clone() };
        let stranger = unknown_guard();
        for other in [&device, &otp, &stranger] {
            assert_eq!(reserve(&store, other, &budget, t0).await, reserved(1, 0), "{other:?}");
        }
        assert_eq!(store.guard_state(&key).await.unwrap(), Some(state));
    }

    pub async fn guard_window_restarts(store: DynStore) {
        let key = unknown_guard();
        let budget = budget(3, 10);
        let t0 = now() - Duration::hours(1);
        assert_eq!(reserve(&store, &key, &budget, t0).await, reserved(1, 0));
        assert_eq!(reserve(&store, &key, &budget, t0 + Duration::minutes(5)).await, reserved(2, 0));
        // Within the window (which counts from its first failure) the count goes on.
        let window_end = t0 + Duration::minutes(10);
        let just_before = window_end - Duration::microseconds(1);
        assert_eq!(reserve(&store, &key, &budget, just_before).await, reserved(3, 0));
        assert_eq!(
            reserve(&store, &key, &budget, just_before).await,
            TryReservation::Exhausted { lockouts: 0 }
        );

        // From the window's end, the try starts a new one.
        assert_eq!(reserve(&store, &key, &budget, window_end).await, reserved(1, 0));
        let state = store.guard_state(&key).await.unwrap().unwrap();
        assert_eq!((state.failures, state.first_failure_at), (1, window_end));
        assert_eq!(reserve(&store, &key, &budget, window_end + Duration::minutes(9)).await, reserved(2, 0));
    }

    pub async fn guard_locks_once_and_answers_locked(store: DynStore) {
        let owner = user(&store, "lockme").await;
        let key = account_guard(owner.id);
        let budget = budget(2, 15);
        let t = now() - Duration::minutes(1);
        let until = t + Duration::minutes(5);
        lock_out(&store, &key, &budget, t, until).await;
        // Only one of two callers locks (and alerts).
        assert!(!store.lock_guard(&key, until + Duration::minutes(5), t).await.unwrap());
        let locked = GuardState { failures: 0, first_failure_at: t, locked_until: Some(until), lockouts: 1 };
        assert_eq!(store.guard_state(&key).await.unwrap(), Some(locked));

        // Locked: refused with the lock's end, and nothing changes; even after the window.
        for at in [t, until - Duration::microseconds(1), t + Duration::minutes(4)] {
            assert_eq!(reserve(&store, &key, &budget, at).await, TryReservation::Locked { until });
        }
        assert_eq!(
            reserve(&store, &key, &budget, until - Duration::microseconds(1)).await,
            TryReservation::Locked { until }
        );
        let short_window = GuardBudget { window: std::time::Duration::from_secs(1), ..budget };
        assert_eq!(
            reserve(&store, &key, &short_window, until - Duration::seconds(1)).await,
            TryReservation::Locked { until }
        );
        assert_eq!(store.guard_state(&key).await.unwrap(), Some(locked));

        // An unknown guard cannot be locked.
        assert!(!store.lock_guard(&unknown_guard(), until, t).await.unwrap());
    }

    pub async fn guard_lock_expiry_gives_a_fresh_budget_keeping_lockouts(store: DynStore) {
        let key = unknown_guard();
        let budget = budget(2, 60);
        let t0 = now() - Duration::hours(2);
        let first_end = t0 + Duration::minutes(1);
        lock_out(&store, &key, &budget, t0, first_end).await;

        // From the lock's end: a fresh budget, within the same window, lockouts kept.
        assert_eq!(reserve(&store, &key, &budget, first_end).await, reserved(1, 1));
        assert_eq!(reserve(&store, &key, &budget, first_end).await, reserved(2, 1));
        assert_eq!(
            reserve(&store, &key, &budget, first_end).await,
            TryReservation::Exhausted { lockouts: 1 }
        );
        let second_end = first_end + Duration::minutes(2);
        assert!(store.lock_guard(&key, second_end, first_end).await.unwrap());
        let state = store.guard_state(&key).await.unwrap().unwrap();
        assert_eq!((state.failures, state.locked_until, state.lockouts), (0, Some(second_end), 2));

        // A lock that has ended can be set again (its end is not a lock).
        assert_eq!(reserve(&store, &key, &budget, second_end).await, reserved(1, 2));
        assert!(store.lock_guard(&key, second_end + Duration::minutes(4), second_end).await.unwrap());
        assert_eq!(store.guard_state(&key).await.unwrap().unwrap().lockouts, 3);
    }

    pub async fn guard_forgets_lockouts_after_a_quiet_spell(store: DynStore) {
        let key = unknown_guard();
        // Windows of 10 minutes; lockouts forgotten one hour after the last lock ended.
        let budget =
            GuardBudget { forget_lockouts_after: std::time::Duration::from_secs(3600), ..budget(2, 10) };
        let t0 = now() - Duration::hours(3);
        let lock_end = t0 + Duration::minutes(1);
        lock_out(&store, &key, &budget, t0, lock_end).await;

        // A new window, but the lock ended less than an hour ago: lockouts kept.
        let t1 = lock_end + Duration::hours(1) - Duration::microseconds(1);
        assert_eq!(reserve(&store, &key, &budget, t1).await, reserved(1, 1));
        // Within a window they are never forgotten, however long the lock is past.
        let t2 = t1 + Duration::minutes(9);
        assert_eq!(reserve(&store, &key, &budget, t2).await, reserved(2, 1));
        // The next window, an hour or more after the lock ended: forgotten.
        let t3 = t1 + Duration::minutes(10);
        assert_eq!(reserve(&store, &key, &budget, t3).await, reserved(1, 0));
        assert_eq!(store.guard_state(&key).await.unwrap().unwrap().lockouts, 0);
    }

    pub async fn clear_guard_forgets_everything(store: DynStore) {
        let owner = user(&store, "cleared").await;
        let key = account_guard(owner.id);
        let other = GuardKey { scope: "otp".to_owned(), ..key.clone() };
        let budget = budget(2, 15);
        let t = now() - Duration::minutes(1);
        lock_out(&store, &key, &budget, t, t + Duration::seconds(10)).await;
        let t1 = t + Duration::seconds(10);
        assert_eq!(reserve(&store, &key, &budget, t1).await, reserved(1, 1));
        assert_eq!(reserve(&store, &other, &budget, t1).await, reserved(1, 0));

        store.clear_guard(&key).await.unwrap();
        assert_eq!(store.guard_state(&key).await.unwrap(), None);
        assert_eq!(reserve(&store, &key, &budget, t1).await, reserved(1, 0));
        // Only that guard.
        assert_eq!(store.guard_state(&other).await.unwrap().map(|s| s.failures), Some(1));

        // A locked guard too; and clearing an unknown guard is a no-op.
        assert_eq!(reserve(&store, &key, &budget, t1).await, reserved(2, 0));
        assert!(store.lock_guard(&key, t1 + Duration::hours(1), t1).await.unwrap());
        assert!(matches!(reserve(&store, &key, &budget, t1).await, TryReservation::Locked { .. }));
        store.clear_guard(&key).await.unwrap();
        assert_eq!(reserve(&store, &key, &budget, t1).await, reserved(1, 0));
        store.clear_guard(&unknown_guard()).await.unwrap();
    }

    /// Of any number of concurrent tries on one key, exactly the budget is counted; of
    /// concurrent lockers, exactly one locks.
    pub async fn concurrent_reservations_never_exceed_the_budget(store: DynStore) {
        let owner = user(&store, "hammered").await;
        let key = account_guard(owner.id);
        let budget = budget(5, 15);
        let t = now();
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move { store.reserve_try(&key, &budget, t).await })
            })
            .collect();
        let mut counted = Vec::new();
        for task in tasks {
            match task.await.expect("task").expect("no reservation may fail") {
                TryReservation::Reserved { failures, lockouts: 0 } => counted.push(failures),
                TryReservation::Exhausted { lockouts: 0 } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        counted.sort();
        assert_eq!(counted, vec![1, 2, 3, 4, 5], "each failure number once");
        assert_eq!(store.guard_state(&key).await.unwrap().unwrap().failures, 5);

        let until = t + Duration::minutes(1);
        let lockers: Vec<_> = (0..20)
            .map(|_| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move { store.lock_guard(&key, until, t).await })
            })
            .collect();
        let mut locked = 0;
        for task in lockers {
            locked += usize::from(task.await.expect("task").expect("no lock may fail"));
        }
        assert_eq!(locked, 1);
        assert_eq!(store.guard_state(&key).await.unwrap().unwrap().lockouts, 1);
    }

    pub async fn purge_login_guards_keeps_recent_and_locked(store: DynStore) {
        let budget = budget(1, 60);
        let t = now();
        let cutoff = t - Duration::days(1);
        let old = unknown_guard();
        let old_lock_ended = unknown_guard();
        let old_still_locked = unknown_guard();
        let old_locked_to_cutoff = unknown_guard();
        let at_cutoff = unknown_guard();
        let recent = unknown_guard();
        let long_ago = cutoff - Duration::days(1);
        for key in [&old, &old_lock_ended, &old_still_locked, &old_locked_to_cutoff] {
            reserve(&store, key, &budget, long_ago).await;
        }
        reserve(&store, &at_cutoff, &budget, cutoff).await;
        reserve(&store, &recent, &budget, t).await;
        store.lock_guard(&old_lock_ended, cutoff - Duration::microseconds(1), long_ago).await.unwrap();
        store.lock_guard(&old_still_locked, t + Duration::days(1), long_ago).await.unwrap();
        store.lock_guard(&old_locked_to_cutoff, cutoff, long_ago).await.unwrap();

        assert_eq!(store.purge_login_guards(cutoff).await.unwrap(), 2);
        for (key, kept) in [
            (&old, false),
            (&old_lock_ended, false),
            (&old_still_locked, true),
            (&old_locked_to_cutoff, true),
            (&at_cutoff, true),
            (&recent, true),
        ] {
            assert_eq!(store.guard_state(key).await.unwrap().is_some(), kept, "{key:?}");
        }
        assert_eq!(store.purge_login_guards(cutoff).await.unwrap(), 0);
    }

    /// Deleting an account deletes its guards, challenges, recovery codes and devices.
    pub async fn delete_user_deletes_guards_and_second_factors(store: DynStore) {
        let doomed = user(&store, "doomed").await;
        let kept = user(&store, "kept").await;
        let budget = budget(3, 15);
        let t = now();
        let keys = |id: Uuid| {
            let account = account_guard(id);
            let device = GuardKey { scope: "device:ff".to_owned(), ..account.clone() };
            let otp = GuardKey { scope: "otp".to_owned(), ..account.clone() };
            [account, device, otp]
        };
        let unknown = unknown_guard();
        for key in keys(doomed.id).iter().chain(&keys(kept.id)).chain([&unknown]) {
            reserve(&store, key, &budget, t).await;
        }
        let doomed_challenge = new_challenge(doomed.id, MfaMethod::EmailOtp, t);
        let kept_challenge = new_challenge(kept.id, MfaMethod::EmailOtp, t);
        let codes = [random_hash(), random_hash()];
        for (user_id, challenge) in [(doomed.id, &doomed_challenge), (kept.id, &kept_challenge)] {
            enable_totp(&store, user_id, &codes, t).await;
            create_challenge(&store, challenge).await;
            sight(&store, user_id, [9u8; 32], t).await;
        }

        let mut tx = store.begin().await.unwrap();
        tx.delete_user(doomed.id, t).await.unwrap();
        tx.commit().await.unwrap();

        for key in keys(doomed.id) {
            assert_eq!(store.guard_state(&key).await.unwrap(), None, "{key:?}");
        }
        assert_eq!(store.find_mfa_challenge(&doomed_challenge.token_hash, t).await.unwrap(), None);
        assert_eq!(store.remaining_recovery_codes(doomed.id).await.unwrap(), 0);
        assert_eq!(store.totp_state(doomed.id).await.unwrap(), None);
        assert!(!store.is_known_device(doomed.id, &[9u8; 32]).await.unwrap());

        // The other account's, and the unknown identifier's, are untouched.
        for key in keys(kept.id).iter().chain([&unknown]) {
            assert_eq!(store.guard_state(key).await.unwrap().map(|s| s.failures), Some(1), "{key:?}");
        }
        assert!(store.find_mfa_challenge(&kept_challenge.token_hash, t).await.unwrap().is_some());
        assert_eq!(store.remaining_recovery_codes(kept.id).await.unwrap(), 2);
        assert!(store.is_known_device(kept.id, &[9u8; 32]).await.unwrap());
    }

    // Second factors.

    fn new_challenge(user_id: Uuid, method: MfaMethod, created_at: OffsetDateTime) -> NewMfaChallenge {
        NewMfaChallenge {
            id: Uuid::new_v4(),
            token_hash: random_hash(),
            user_id,
            method,
            code_hash: (method == MfaMethod::EmailOtp).then(random_hash),
            created_at,
            expires_at: created_at + Duration::minutes(3),
        }
    }

    fn found(challenge: &NewMfaChallenge) -> MfaChallenge {
        MfaChallenge {
            id: challenge.id,
            user_id: challenge.user_id,
            method: challenge.method,
            code_hash: challenge.code_hash.clone(),
            expires_at: challenge.expires_at,
        }
    }

    async fn create_challenge(store: &DynStore, challenge: &NewMfaChallenge) {
        let mut tx = store.begin().await.expect("begin");
        tx.create_mfa_challenge(challenge).await.expect("create challenge");
        tx.commit().await.expect("commit");
    }

    async fn find_challenge(
        store: &DynStore,
        challenge: &NewMfaChallenge,
        t: OffsetDateTime,
    ) -> Option<MfaChallenge> {
        store.find_mfa_challenge(&challenge.token_hash, t).await.expect("find challenge")
    }

    /// A fresh random sealed secret.
    fn sealed_secret() -> Vec<u8> {
        random_hash()
    }

    /// Enables TOTP, as enrolment does: a pending secret, then its activation at step 1000.
    /// Returns the secret.
    async fn enable_totp(store: &DynStore, user_id: Uuid, codes: &[Vec<u8>], t: OffsetDateTime) -> Vec<u8> {
        let secret = sealed_secret();
        let mut tx = store.begin().await.unwrap();
        tx.set_totp_pending(user_id, Some(&secret), t).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = store.begin().await.unwrap();
        assert!(tx.activate_totp(user_id, &secret, 1000, codes, t).await.unwrap());
        tx.commit().await.unwrap();
        secret
    }

    pub async fn mfa_challenge_create_find_expire_consume(store: DynStore) {
        let owner = user(&store, "challenged").await;
        let t = now();
        let challenge = new_challenge(owner.id, MfaMethod::EmailOtp, t);

        // Rolled back: nothing.
        let mut tx = store.begin().await.unwrap();
        tx.create_mfa_challenge(&challenge).await.unwrap();
        drop(tx);
        assert_eq!(find_challenge(&store, &challenge, t).await, None);

        create_challenge(&store, &challenge).await;
        assert_eq!(find_challenge(&store, &challenge, t).await, Some(found(&challenge)));
        // Another user's challenge, to see it untouched.
        let bystander = user(&store, "bystanding").await;
        let totp = new_challenge(bystander.id, MfaMethod::Totp, t);
        create_challenge(&store, &totp).await;
        assert_eq!(find_challenge(&store, &totp, t).await, Some(found(&totp)));
        assert_eq!(found(&totp).code_hash, None);

        // Expired at expires_at, alive one microsecond before.
        let expiry = challenge.expires_at;
        assert_eq!(find_challenge(&store, &challenge, expiry).await, None);
        assert!(!store.consume_mfa_challenge(challenge.id, expiry).await.unwrap());
        let just_before = expiry - Duration::microseconds(1);
        assert!(find_challenge(&store, &challenge, just_before).await.is_some());

        // Consumed once only.
        assert!(store.consume_mfa_challenge(challenge.id, just_before).await.unwrap());
        assert!(!store.consume_mfa_challenge(challenge.id, just_before).await.unwrap());
        assert_eq!(find_challenge(&store, &challenge, t).await, None);
        // The other one is untouched.
        assert!(find_challenge(&store, &totp, t).await.is_some());

        // Unknown.
        assert_eq!(store.find_mfa_challenge(&random_hash(), t).await.unwrap(), None);
        assert!(!store.consume_mfa_challenge(Uuid::new_v4(), t).await.unwrap());
    }

    pub async fn expired_mfa_challenges_are_purged(store: DynStore) {
        let t = now();
        let early = new_challenge(user(&store, "early").await.id, MfaMethod::EmailOtp, t);
        let late = new_challenge(user(&store, "late").await.id, MfaMethod::Totp, t + Duration::minutes(10));
        for challenge in [&early, &late] {
            create_challenge(&store, challenge).await;
        }
        // Nothing has expired before `early` does.
        assert_eq!(store.purge_mfa_challenges(early.expires_at).await.unwrap(), 0);
        assert!(find_challenge(&store, &early, t).await.is_some());
        // Past it, only `early` goes.
        assert_eq!(store.purge_mfa_challenges(early.expires_at + Duration::seconds(1)).await.unwrap(), 1);
        assert_eq!(find_challenge(&store, &early, t).await, None);
        assert!(find_challenge(&store, &late, t + Duration::minutes(10)).await.is_some());
    }

    pub async fn concurrent_challenge_consumers_spend_once(store: DynStore) {
        let owner = user(&store, "racer").await;
        let t = now();
        let challenge = new_challenge(owner.id, MfaMethod::Totp, t);
        create_challenge(&store, &challenge).await;
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.consume_mfa_challenge(challenge.id, t).await })
            })
            .collect();
        let mut consumed = 0;
        for task in tasks {
            consumed += usize::from(task.await.expect("task").expect("no consume may fail"));
        }
        assert_eq!(consumed, 1);
    }

    pub async fn newer_challenge_kills_the_users_older_ones(store: DynStore) {
        let owner = user(&store, "newest").await;
        let other = user(&store, "bystander").await;
        let t = now();
        let older_email = new_challenge(owner.id, MfaMethod::EmailOtp, t);
        let others = new_challenge(other.id, MfaMethod::EmailOtp, t);
        for challenge in [&older_email, &others] {
            create_challenge(&store, challenge).await;
        }
        // A newer challenge, of any method, leaves only itself.
        let totp = new_challenge(owner.id, MfaMethod::Totp, t + Duration::seconds(1));
        create_challenge(&store, &totp).await;
        let later = t + Duration::seconds(2);
        assert_eq!(find_challenge(&store, &older_email, later).await, None);
        assert!(!store.consume_mfa_challenge(older_email.id, later).await.unwrap());
        for live in [&totp, &others] {
            assert!(find_challenge(&store, live, later).await.is_some());
        }

        // A used-up budget kills all of the user's live challenges.
        assert_eq!(store.consume_mfa_challenges_of(owner.id, later).await.unwrap(), 1);
        assert_eq!(find_challenge(&store, &totp, later).await, None);
        assert!(find_challenge(&store, &others, later).await.is_some());
        assert_eq!(store.consume_mfa_challenges_of(owner.id, later).await.unwrap(), 0);

        // So do a password change (close_mfa_challenges) and switching the email code.
        for close in 0..2 {
            let live = new_challenge(owner.id, MfaMethod::EmailOtp, later);
            create_challenge(&store, &live).await;
            let mut tx = store.begin().await.unwrap();
            if close == 0 {
                tx.close_mfa_challenges(owner.id, later).await.unwrap();
            } else {
                tx.set_email_otp(owner.id, false, later).await.unwrap();
            }
            tx.commit().await.unwrap();
            assert_eq!(find_challenge(&store, &live, later).await, None, "closed by way {close}");
        }
        assert!(find_challenge(&store, &others, later).await.is_some());
    }

    pub async fn activate_totp_is_compare_and_swap(store: DynStore) {
        let owner = user(&store, "enrolling").await;
        let t = now();
        let empty = TotpState { secret: None, pending_secret: None, last_step: None };
        assert_eq!(store.totp_state(owner.id).await.unwrap(), Some(empty.clone()));
        assert_eq!(store.totp_state(Uuid::new_v4()).await.unwrap(), None);

        // Nothing pending: nothing to activate.
        let stale = sealed_secret();
        let mut tx = store.begin().await.unwrap();
        assert!(!tx.activate_totp(owner.id, &stale, 10, &[random_hash()], t).await.unwrap());
        tx.commit().await.unwrap();
        assert_eq!(store.totp_state(owner.id).await.unwrap(), Some(empty));

        // Begun twice: only the latest secret activates.
        let pending = sealed_secret();
        for secret in [&stale, &pending] {
            let mut tx = store.begin().await.unwrap();
            tx.set_totp_pending(owner.id, Some(secret), t).await.unwrap();
            tx.commit().await.unwrap();
        }
        let pending_state =
            TotpState { secret: None, pending_secret: Some(pending.clone()), last_step: None };
        assert_eq!(store.totp_state(owner.id).await.unwrap(), Some(pending_state.clone()));
        let mut tx = store.begin().await.unwrap();
        assert!(!tx.activate_totp(owner.id, &stale, 10, &[random_hash()], t).await.unwrap());
        tx.commit().await.unwrap();
        assert_eq!(store.totp_state(owner.id).await.unwrap(), Some(pending_state.clone()));

        // Rolled back: still pending.
        let codes = vec![random_hash(), random_hash(), random_hash()];
        let mut tx = store.begin().await.unwrap();
        assert!(tx.activate_totp(owner.id, &pending, 10, &codes, t).await.unwrap());
        drop(tx);
        assert_eq!(store.totp_state(owner.id).await.unwrap(), Some(pending_state));
        assert_eq!(store.remaining_recovery_codes(owner.id).await.unwrap(), 0);

        let mut tx = store.begin().await.unwrap();
        assert!(tx.activate_totp(owner.id, &pending, 10, &codes, t).await.unwrap());
        tx.commit().await.unwrap();
        let enabled = TotpState { secret: Some(pending.clone()), pending_secret: None, last_step: Some(10) };
        assert_eq!(store.totp_state(owner.id).await.unwrap(), Some(enabled.clone()));
        assert_eq!(store.remaining_recovery_codes(owner.id).await.unwrap(), 3);
        // Once: the pending secret is gone.
        let mut tx = store.begin().await.unwrap();
        assert!(!tx.activate_totp(owner.id, &pending, 11, &[random_hash()], t).await.unwrap());
        tx.commit().await.unwrap();
        assert_eq!(store.totp_state(owner.id).await.unwrap(), Some(enabled));

        // Enrolling again leaves the enabled secret until the new one activates; then its
        // recovery codes replace the old ones.
        let replacement = sealed_secret();
        let mut tx = store.begin().await.unwrap();
        tx.set_totp_pending(owner.id, Some(&replacement), t).await.unwrap();
        tx.commit().await.unwrap();
        let state = store.totp_state(owner.id).await.unwrap().unwrap();
        assert_eq!(
            (state.secret.as_ref(), state.pending_secret.as_ref()),
            (Some(&pending), Some(&replacement))
        );
        assert!(store.find_user(owner.id).await.unwrap().unwrap().totp_enabled);
        let new_codes = vec![random_hash()];
        let mut tx = store.begin().await.unwrap();
        assert!(tx.activate_totp(owner.id, &replacement, 20, &new_codes, t).await.unwrap());
        tx.commit().await.unwrap();
        let replaced = TotpState { secret: Some(replacement), pending_secret: None, last_step: Some(20) };
        assert_eq!(store.totp_state(owner.id).await.unwrap(), Some(replaced));
        assert_eq!(store.remaining_recovery_codes(owner.id).await.unwrap(), 1);
        assert!(!store.consume_recovery_code(owner.id, &codes[0], t).await.unwrap());
        assert!(store.consume_recovery_code(owner.id, &new_codes[0], t).await.unwrap());

        // Dropping a pending secret.
        let mut tx = store.begin().await.unwrap();
        tx.set_totp_pending(owner.id, Some(&sealed_secret()), t).await.unwrap();
        tx.set_totp_pending(owner.id, None, t).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.totp_state(owner.id).await.unwrap().unwrap().pending_secret, None);
    }

    pub async fn advance_totp_step_is_monotonic_and_once(store: DynStore) {
        let owner = user(&store, "stepper").await;
        let t = now();
        // Without TOTP, no step is accepted.
        assert!(!store.advance_totp_step(owner.id, 1).await.unwrap());
        assert!(!store.advance_totp_step(Uuid::new_v4(), 1).await.unwrap());

        // Enabled at step 1000 (the confirming code's step is used).
        enable_totp(&store, owner.id, &[], t).await;
        for replay in [999, 1000] {
            assert!(!store.advance_totp_step(owner.id, replay).await.unwrap(), "{replay}");
        }
        assert!(store.advance_totp_step(owner.id, 1001).await.unwrap());
        assert!(!store.advance_totp_step(owner.id, 1001).await.unwrap());
        // Steps may be skipped, never gone back to.
        assert!(store.advance_totp_step(owner.id, 1003).await.unwrap());
        assert!(!store.advance_totp_step(owner.id, 1002).await.unwrap());
        assert_eq!(store.totp_state(owner.id).await.unwrap().unwrap().last_step, Some(1003));

        // Concurrent uses of one step: exactly one.
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.advance_totp_step(owner.id, 1010).await })
            })
            .collect();
        let mut advanced = 0;
        for task in tasks {
            advanced += usize::from(task.await.expect("task").expect("no step may fail"));
        }
        assert_eq!(advanced, 1);
        assert_eq!(store.totp_state(owner.id).await.unwrap().unwrap().last_step, Some(1010));
    }

    pub async fn recovery_codes_are_single_use(store: DynStore) {
        let owner = user(&store, "recovering").await;
        let other = user(&store, "neighbour").await;
        let t = now();
        let codes = vec![random_hash(), random_hash(), random_hash()];
        enable_totp(&store, owner.id, &codes, t).await;
        enable_totp(&store, other.id, &[random_hash()], t).await;
        assert_eq!(store.remaining_recovery_codes(owner.id).await.unwrap(), 3);

        assert!(store.consume_recovery_code(owner.id, &codes[0], t).await.unwrap());
        assert!(!store.consume_recovery_code(owner.id, &codes[0], t).await.unwrap());
        assert_eq!(store.remaining_recovery_codes(owner.id).await.unwrap(), 2);
        // Another user's code, or an unknown one: no.
        assert!(!store.consume_recovery_code(other.id, &codes[1], t).await.unwrap());
        assert!(!store.consume_recovery_code(owner.id, &random_hash(), t).await.unwrap());
        assert_eq!(store.remaining_recovery_codes(other.id).await.unwrap(), 1);

        // Concurrent uses of one code: exactly one.
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (store, code) = (store.clone(), codes[1].clone());
                tokio::spawn(async move { store.consume_recovery_code(owner.id, &code, t).await })
            })
            .collect();
        let mut used = 0;
        for task in tasks {
            used += usize::from(task.await.expect("task").expect("no use may fail"));
        }
        assert_eq!(used, 1);
        assert_eq!(store.remaining_recovery_codes(owner.id).await.unwrap(), 1);
        assert_eq!(store.remaining_recovery_codes(Uuid::new_v4()).await.unwrap(), 0);
    }

    pub async fn disable_totp_clears_everything(store: DynStore) {
        let owner = user(&store, "disabling").await;
        let other = user(&store, "unaffected").await;
        let t = now();
        let codes = vec![random_hash(), random_hash()];
        enable_totp(&store, owner.id, &codes, t).await;
        enable_totp(&store, other.id, &codes, t).await;
        let totp = new_challenge(owner.id, MfaMethod::Totp, t);
        let others = new_challenge(other.id, MfaMethod::Totp, t);
        for challenge in [&totp, &others] {
            create_challenge(&store, challenge).await;
        }
        let mut tx = store.begin().await.unwrap();
        tx.set_totp_pending(owner.id, Some(&sealed_secret()), t).await.unwrap();
        tx.commit().await.unwrap();

        // Rolled back: nothing happens.
        let mut tx = store.begin().await.unwrap();
        tx.disable_totp(owner.id, t).await.unwrap();
        drop(tx);
        assert!(store.find_user(owner.id).await.unwrap().unwrap().totp_enabled);
        assert!(find_challenge(&store, &totp, t).await.is_some());

        let mut tx = store.begin().await.unwrap();
        tx.disable_totp(owner.id, t).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            store.totp_state(owner.id).await.unwrap(),
            Some(TotpState { secret: None, pending_secret: None, last_step: None })
        );
        assert!(!store.find_user(owner.id).await.unwrap().unwrap().totp_enabled);
        assert_eq!(store.remaining_recovery_codes(owner.id).await.unwrap(), 0);
        assert!(!store.consume_recovery_code(owner.id, &codes[0], t).await.unwrap());
        assert!(!store.advance_totp_step(owner.id, 5000).await.unwrap());
        assert_eq!(find_challenge(&store, &totp, t).await, None);

        // The other account keeps everything.
        assert!(store.find_user(other.id).await.unwrap().unwrap().totp_enabled);
        assert_eq!(store.remaining_recovery_codes(other.id).await.unwrap(), 2);
        assert!(find_challenge(&store, &others, t).await.is_some());

        // Enabling again starts afresh: no step is a replay of the old secret's.
        enable_totp(&store, owner.id, &[], t).await;
        assert!(store.advance_totp_step(owner.id, 1001).await.unwrap());
    }

    pub async fn is_known_device_reflects_sightings(store: DynStore) {
        let owner = user(&store, "devices").await;
        let other = user(&store, "elsewhere").await;
        let t = now();
        let laptop = [7u8; 32];
        assert!(!store.is_known_device(owner.id, &laptop).await.unwrap());
        // Asking notes nothing: the first sighting is still new.
        assert_eq!(sight(&store, owner.id, laptop, t).await, DeviceSighting::New { first_device: true });
        assert!(store.is_known_device(owner.id, &laptop).await.unwrap());
        assert!(!store.is_known_device(other.id, &laptop).await.unwrap());
        assert!(!store.is_known_device(owner.id, &[8u8; 32]).await.unwrap());
        assert!(!store.is_known_device(Uuid::new_v4(), &laptop).await.unwrap());
    }

    pub async fn user_record_flags_reflect_mfa_state(store: DynStore) {
        let owner = user(&store, "Flagged").await;
        assert!(!owner.email_otp_enabled && !owner.totp_enabled);
        let t = now();
        let flags = |user: UserRecord| (user.email_otp_enabled, user.totp_enabled);

        let mut tx = store.begin().await.unwrap();
        tx.set_email_otp(owner.id, true, t).await.unwrap();
        // The transaction sees its own writes, through every read of a user.
        assert_eq!(tx.lock_user(owner.id).await.unwrap().map(flags), Some((true, false)));
        tx.commit().await.unwrap();
        assert_eq!(store.find_user(owner.id).await.unwrap().map(flags), Some((true, false)));
        assert_eq!(store.find_user_by_login("flagged").await.unwrap().map(flags), Some((true, false)));

        // Pending is not enabled.
        let secret = sealed_secret();
        let mut tx = store.begin().await.unwrap();
        tx.set_totp_pending(owner.id, Some(&secret), t).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.find_user(owner.id).await.unwrap().map(flags), Some((true, false)));

        let mut tx = store.begin().await.unwrap();
        assert!(tx.activate_totp(owner.id, &secret, 1, &[], t).await.unwrap());
        assert_eq!(
            tx.find_user_by_login("flagged@example.com").await.unwrap().map(flags),
            Some((true, true))
        );
        let updated = tx.update_profile(owner.id, &ProfileChanges::default(), t).await.unwrap();
        assert_eq!(flags(updated), (true, true));
        tx.set_email_otp(owner.id, false, t).await.unwrap();
        tx.commit().await.unwrap();
        let found = store.find_user(owner.id).await.unwrap().unwrap();
        assert_eq!(found, UserRecord { email_otp_enabled: false, totp_enabled: true, ..owner.clone() });

        let mut tx = store.begin().await.unwrap();
        tx.disable_totp(owner.id, t).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.find_user(owner.id).await.unwrap(), Some(owner));
    }

    pub async fn session_amr_round_trips(store: DynStore) {
        let owner = user(&store, "amr").await;
        let t = now();
        for amr in [vec!["pwd".to_owned(), "otp".to_owned()], vec!["pwd".to_owned()], vec![]] {
            let mut new = new_session(owner.id, t);
            new.amr = amr.clone();
            assert_eq!(store.create_session(&new).await.unwrap().amr, amr);
            assert_eq!(store.find_session(new.id).await.unwrap().unwrap().amr, amr);
            let RotateOutcome::Rotated(rotated) =
                store.rotate_refresh_token(&rotation(&new.refresh_hash, t)).await.unwrap()
            else {
                panic!("rotates");
            };
            assert_eq!(rotated.amr, amr, "kept across refreshes");
        }
    }
}

/// Start-up must fail fast, as "unavailable", when the server cannot be reached.
mod postgres_connect {
    use super::*;
    use portcullis::store::StoreError;

    #[tokio::test]
    async fn unreachable_server_is_unavailable() {
        // Nothing listens on port 1.
        let started = std::time::Instant::now();
        let result = PostgresStore::connect(
            "postgres://postgres@127.0.0.1:1/none",
            2,
            Duration::from_secs(2),
            STATEMENT_TIMEOUT,
        )
        .await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))), "{:?}", result.err());
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

/// Behaviour of PostgreSQL alone: row locks held by other transactions, the statement
/// timeout, and losing the connection (through a [`support::TcpProxy`]).
mod postgres_specific {
    use super::*;
    use portcullis::store::{DeviceInfo, NewSession, RevokeReason, StoreError};
    use sqlx::Connection;
    use sqlx::postgres::PgConnection;
    use time::OffsetDateTime;
    use uuid::Uuid;

    /// A fresh database's URL, or `None` (and a skip notice) when none is configured.
    async fn database(test: &str) -> Option<String> {
        let url = support::fresh_postgres_url().await;
        if url.is_none() {
            support::skip(&format!("postgres_specific::{test}"));
        }
        url
    }

    async fn owner_and_sessions(store: &DynStore, count: usize) -> (Uuid, Vec<Uuid>) {
        let user = cases::new_user(&format!("u{}", Uuid::new_v4().simple()));
        store.create_user(&user).await.expect("create user");
        let created_at = OffsetDateTime::now_utc() - time::Duration::hours(1);
        let mut ids = Vec::new();
        for _ in 0..count {
            let session = NewSession {
                id: Uuid::new_v4(),
                user_id: user.id,
                refresh_hash: Uuid::new_v4().as_bytes().repeat(2),
                device: DeviceInfo::default(),
                location: None,
                created_at,
                expires_at: created_at + time::Duration::days(1),
                amr: vec!["pwd".to_owned()],
            };
            ids.push(store.create_session(&session).await.expect("create session").id);
        }
        (user.id, ids)
    }

    /// Opens a transaction on a separate connection that holds `session_id`'s row lock.
    async fn lock_session_row(url: &str, session_id: Uuid) -> PgConnection {
        let mut conn = PgConnection::connect(url).await.expect("raw connection");
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE")
            .bind(session_id)
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    #[tokio::test]
    async fn record_activity_skips_rows_locked_by_others() {
        let Some(url) = database("record_activity_skips_rows_locked_by_others").await else { return };
        let store = postgres_store_at(&url, STATEMENT_TIMEOUT).await;
        let (_, ids) = owner_and_sessions(&store, 2).await;
        let (locked, free) = (ids[0], ids[1]);
        let before = store.find_session(locked).await.unwrap().unwrap().last_active_at;

        let mut holder = lock_session_row(&url, locked).await;
        let at = OffsetDateTime::now_utc();
        // Does not wait for the lock (the statement timeout is 10 s): the locked row is
        // skipped, the other one written.
        tokio::time::timeout(Duration::from_secs(3), store.record_activity(&[(locked, at), (free, at)]))
            .await
            .expect("record_activity must not wait on a locked row")
            .expect("record_activity");
        sqlx::query("COMMIT").execute(&mut holder).await.unwrap();

        assert_eq!(store.find_session(locked).await.unwrap().unwrap().last_active_at, before);
        let written = store.find_session(free).await.unwrap().unwrap().last_active_at;
        assert!(written > before, "{written} > {before}");
    }

    #[tokio::test]
    async fn given_up_mail_keeps_its_row() {
        let Some(url) = database("given_up_mail_keeps_its_row").await else { return };
        let store = postgres_store_at(&url, STATEMENT_TIMEOUT).await;
        let id = cases::give_up_on_a_mail(&store).await;
        let mut raw = PgConnection::connect(&url).await.expect("raw connection");
        let (attempts, last_error, gave_up): (i32, Option<String>, bool) =
            sqlx::query_as("SELECT attempts, last_error, gave_up_at IS NOT NULL FROM outbox WHERE id = $1")
                .bind(id)
                .fetch_one(&mut raw)
                .await
                .unwrap();
        assert_eq!((attempts, last_error.as_deref(), gave_up), (2, Some("550 no such user"), true));
    }

    /// A claimer skips rows another transaction holds instead of waiting for them.
    #[tokio::test]
    async fn claim_skips_mail_locked_by_others() {
        let Some(url) = database("claim_skips_mail_locked_by_others").await else { return };
        let store = postgres_store_at(&url, STATEMENT_TIMEOUT).await;
        let t = OffsetDateTime::now_utc() - time::Duration::minutes(1);
        let locked = cases::new_mail(None, t);
        let free = cases::new_mail(None, t + time::Duration::seconds(1));
        cases::enqueue(&store, &locked).await;
        cases::enqueue(&store, &free).await;

        let mut holder = PgConnection::connect(&url).await.expect("raw connection");
        sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
        sqlx::query("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE")
            .bind(locked.id)
            .execute(&mut holder)
            .await
            .unwrap();
        let claimed = tokio::time::timeout(
            Duration::from_secs(3),
            store.claim_due_mail(OffsetDateTime::now_utc(), 10, Duration::from_secs(60)),
        )
        .await
        .expect("claim_due_mail must not wait on a locked row")
        .expect("claim");
        assert_eq!(claimed.iter().map(|mail| mail.id).collect::<Vec<_>>(), vec![free.id]);
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
        let claimed = store.claim_due_mail(OffsetDateTime::now_utc(), 10, Duration::from_secs(60)).await;
        assert_eq!(claimed.unwrap().iter().map(|mail| mail.id).collect::<Vec<_>>(), vec![locked.id]);
    }

    #[tokio::test]
    async fn statement_timeout_cancels_a_lock_wait() {
        let Some(url) = database("statement_timeout_cancels_a_lock_wait").await else { return };
        // `migrate` runs without the timeout, on a connection of its own: the store's own
        // connection must still have it afterwards.
        let store = PostgresStore::connect(&url, 1, ACQUIRE_TIMEOUT, Duration::from_millis(300))
            .await
            .expect("open PostgreSQL");
        store.migrate().await.expect("migrate");
        let store: DynStore = Arc::new(store);
        let (owner, ids) = owner_and_sessions(&store, 1).await;

        let mut holder = lock_session_row(&url, ids[0]).await;
        let started = std::time::Instant::now();
        let now = OffsetDateTime::now_utc();
        let result = store.revoke_session(owner, ids[0], RevokeReason::Logout, now).await;
        // SQLSTATE 57014 (query_canceled) is transient: see `is_transient_code`.
        assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();

        // Once the lock is gone the same call goes through.
        assert!(store.revoke_session(owner, ids[0], RevokeReason::Logout, now).await.unwrap());
    }

    #[tokio::test]
    async fn lost_connections_fail_fast_and_recover() {
        let Some(url) = database("lost_connections_fail_fast_and_recover").await else { return };
        postgres_store_at(&url, STATEMENT_TIMEOUT).await; // migrated directly
        let proxy = support::TcpProxy::start(&support::postgres_host_port(&url)).await;
        let proxied = support::with_host_port(&url, &proxy.addr().to_string());
        let store: DynStore = Arc::new(
            PostgresStore::connect(&proxied, 2, Duration::from_secs(2), STATEMENT_TIMEOUT)
                .await
                .expect("connect through the proxy"),
        );
        store.ping().await.expect("ping through the proxy");
        let (owner, ids) = owner_and_sessions(&store, 1).await;
        store.find_session(ids[0]).await.expect("query through the proxy");

        proxy.cut();
        let started = std::time::Instant::now();
        let result = store.find_session(ids[0]).await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

        proxy.restore();
        let found = store.find_session(ids[0]).await.expect("a new connection after restore");
        assert_eq!(found.map(|s| s.user_id), Some(owner));
    }
}

/// The chaos-test helpers themselves, without external services.
mod support_helpers {
    use super::support;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[test]
    fn host_ports() {
        assert_eq!(support::redis_host_port("redis://127.0.0.1:6379"), "127.0.0.1:6379");
        assert_eq!(support::redis_host_port("redis://:secret@cache.internal:6380/2"), "cache.internal:6380");
        assert_eq!(support::redis_host_port("rediss://user:pw@[::1]:7000?timeout=1"), "[::1]:7000");
        assert_eq!(support::redis_host_port("redis://localhost"), "localhost:6379");
        assert_eq!(support::redis_host_port("redis://[::1]/0"), "[::1]:6379");
        assert_eq!(support::postgres_host_port("postgres://postgres@127.0.0.1:5432/test"), "127.0.0.1:5432");
        assert_eq!(support::postgres_host_port("postgres://db/test"), "db:5432");
        assert_eq!(
            support::with_host_port("postgres://u:p@127.0.0.1:5432/test?sslmode=disable", "127.0.0.1:40000"),
            "postgres://u:p@127.0.0.1:40000/test?sslmode=disable"
        );
        assert_eq!(support::with_host_port("redis://127.0.0.1:6379", "127.0.0.1:1"), "redis://127.0.0.1:1");
    }

    /// An echo server on an ephemeral port.
    async fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn echoes(stream: &mut TcpStream) -> bool {
        if stream.write_all(b"ping").await.is_err() {
            return false;
        }
        let mut buffer = [0u8; 4];
        let read = tokio::time::timeout(std::time::Duration::from_secs(3), stream.read_exact(&mut buffer));
        matches!(read.await, Ok(Ok(_))) && &buffer == b"ping"
    }

    #[tokio::test]
    async fn tcp_proxy_cuts_and_restores() {
        let proxy = support::TcpProxy::start(&echo_server().await).await;
        let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(echoes(&mut live).await);

        proxy.cut();
        assert!(!echoes(&mut live).await, "a live connection is closed by cut");
        // New connections are accepted, then closed at once.
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(!echoes(&mut refused).await, "new connections are dropped while cut");

        proxy.restore();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(echoes(&mut fresh).await);
        assert!(!echoes(&mut live).await, "connections closed by cut stay closed");
    }
}
