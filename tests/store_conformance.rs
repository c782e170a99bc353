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
}

mod cases {
    use portcullis::store::{
        DeviceInfo, DynStore, NewSession, NewUser, RefreshRotation, RevokeReason, RotateOutcome,
        SessionRecord, StoreError, UserRecord,
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
            created_at,
            expires_at: created_at + Duration::days(30),
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
            roles: vec!["user".to_owned()],
            email_verified_at: None,
            created_at: new.created_at,
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
            created_at: t,
            last_active_at: t,
            refreshed_at: t,
            expires_at: new.expires_at,
            revoked_at: None,
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
                created_at,
                expires_at: created_at + time::Duration::days(1),
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
