//! Mail end to end: the SMTP transport against a real SMTP server (aiosmtpd, see
//! `tests/support/smtp.rs`), the file transport, and the outbox worker over real stores.
//!
//! The worker cases run against SQLite (a temp file) and PostgreSQL (a fresh database;
//! skipped when `PORTCULLIS_TEST_DATABASE_URL` is unset), as `sqlite::<case>` and
//! `postgres::<case>`. Cases that need the SMTP server say SKIPPED without aiosmtpd
//! (`scripts/install-test-tools.sh`), except under CI, where they fail.

mod support;

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use portcullis::{
    config::{MailSettings, Settings},
    mail::{FileTransport, MailError, MailTransport, OutboxWorker, SmtpTransport, Templates},
    store::{DynStore, NewMail, OutboxMail, PostgresStore, SqliteStore, Store},
};
use support::SmtpSink;
use time::OffsetDateTime;
use tokio::{sync::Notify, task::JoinHandle};
use uuid::Uuid;

const FROM: &str = "Portcullis Tests <no-reply@portcullis.test>";
const TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Transports on their own.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_transport_delivers_both_parts() {
    let Some(sink) = SmtpSink::start() else { return };
    let transport = SmtpTransport::new(&sink.url(), FROM).unwrap();
    // Non-ASCII and a long line: the parts must survive their transfer encoding.
    let mail = outbox_mail(
        "alice@example.com",
        "Vérifiez votre adresse — Grüße",
        &format!("Hi Zoë,\n\n{}\nhttps://app.test/verify-email?token=a%2Bb\n", "long line ".repeat(20)),
        "<p>Hi Zoë,</p><p><a href=\"https://app.test/verify-email?token=a%2Bb\">Verify</a></p>",
    );
    transport.send(&mail).await.unwrap();

    let received = sink.wait_for(1, TIMEOUT).await;
    assert_eq!(received.len(), 1, "{received:#?}");
    let got = &received[0];
    assert_eq!(got.from, "no-reply@portcullis.test");
    assert_eq!(got.to, ["alice@example.com"]);
    assert_eq!(got.subject, mail.subject);
    assert_eq!(got.content_type, "multipart/alternative");
    assert_eq!(got.text.trim_end(), mail.text.trim_end());
    assert_eq!(got.html.trim_end(), mail.html.trim_end());
    assert!(got.raw.contains(&format!("Message-ID: <{}@portcullis.test>", mail.id)), "{}", got.raw);

    // The pooled connection is reused for the next mail.
    transport.send(&outbox_mail("bob@example.com", "Second", "Two", "<p>Two</p>")).await.unwrap();
    let received = sink.wait_for(2, TIMEOUT).await;
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].to, ["bob@example.com"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_templates_arrive_intact() {
    let Some(sink) = SmtpSink::start() else { return };
    let settings = MailSettings {
        frontend_base_url: "https://app.example.com".into(),
        product_name: "Acme".into(),
        ..MailSettings::default()
    };
    let rendered = Templates::new(&settings).verify_email(
        "<script>alert(1)</script>",
        "tok+/=",
        Duration::from_secs(24 * 3600),
    );
    let mail = outbox_mail("alice@example.com", &rendered.subject, &rendered.text, &rendered.html);
    SmtpTransport::new(&sink.url(), FROM).unwrap().send(&mail).await.unwrap();

    let received = sink.wait_for(1, TIMEOUT).await;
    let got = received.first().expect("the mail arrives");
    let link = "https://app.example.com/verify-email?token=tok%2B%2F%3D";
    assert_eq!(got.subject, "Verify your email address for Acme");
    assert!(got.text.contains(link) && got.text.contains("24 hours"), "{}", got.text);
    assert!(got.html.contains(&format!("href=\"{link}\"")), "{}", got.html);
    assert!(got.html.contains("&lt;script&gt;") && !got.html.contains("<script>"), "{}", got.html);
}

#[tokio::test]
async fn smtp_transport_reports_a_server_that_is_down() {
    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let transport = SmtpTransport::new(&format!("smtp://127.0.0.1:{port}"), FROM).unwrap();
    let error = transport.send(&outbox_mail("alice@example.com", "S", "T", "<p>H</p>")).await.unwrap_err();
    assert!(matches!(error, MailError::Smtp(_)), "{error:?}");
    assert!(!error.is_permanent());
}

#[tokio::test]
async fn file_transport_writes_a_parseable_eml() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings { data_dir: dir.path().to_path_buf(), ..Settings::default() };
    // No smtp_url: files under <data_dir>/mail.
    let transport = portcullis::mail::transport_from_settings(&settings).unwrap();
    let mail = outbox_mail(
        "alice@example.com",
        "Réinitialisez votre mot de passe",
        "Hi Zoë,\n\nhttps://app.test/reset-password?token=abc\n",
        "<p>Hi Zoë,</p><p><a href=\"https://app.test/reset-password?token=abc\">Reset</a></p>",
    );
    transport.send(&mail).await.unwrap();

    let path = dir.path().join("mail").join(format!("{}.eml", mail.id));
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for header in ["From: ", "<no-reply@localhost>\r\n", "To: alice@example.com\r\n", "Subject: "] {
        assert!(raw.contains(header), "no {header:?} in\n{raw}");
    }
    assert!(raw.contains("Content-Type: multipart/alternative;"), "{raw}");
    assert!(raw.contains("Content-Type: text/plain; charset=utf-8"), "{raw}");
    assert!(raw.contains("Content-Type: text/html; charset=utf-8"), "{raw}");

    // A real parser reads it back (the sink's, so needs the same venv).
    let Some(parsed) = support::parse_eml(&path) else { return };
    assert_eq!(parsed.subject, mail.subject);
    assert_eq!(parsed.content_type, "multipart/alternative");
    assert_eq!(parsed.to, ["alice@example.com"]);
    assert_eq!(parsed.text.trim_end(), mail.text.trim_end());
    assert_eq!(parsed.html.trim_end(), mail.html.trim_end());
}

#[tokio::test]
async fn file_transport_from_an_explicit_dir() {
    let dir = tempfile::tempdir().unwrap();
    let transport = FileTransport::new(dir.path().join("out"), FROM).unwrap();
    let mail = outbox_mail("alice@example.com", "S", "T", "<p>H</p>");
    transport.send(&mail).await.unwrap();
    assert!(dir.path().join("out").join(format!("{}.eml", mail.id)).is_file());
}

// ---------------------------------------------------------------------------------------
// The outbox worker over each store.

async fn sqlite_store() -> (DynStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("portcullis.db").display());
    let store = SqliteStore::connect(&url, 5, Duration::from_secs(5), Duration::from_secs(5))
        .await
        .expect("open SQLite");
    store.migrate().await.expect("migrate SQLite");
    (Arc::new(store), dir)
}

async fn postgres_store() -> Option<DynStore> {
    let url = support::fresh_postgres_url().await?;
    let store = PostgresStore::connect(&url, 5, Duration::from_secs(5), Duration::from_secs(5))
        .await
        .expect("open PostgreSQL");
    store.migrate().await.expect("migrate PostgreSQL");
    Some(Arc::new(store))
}

/// Declares, for each case, `sqlite::<case>` and `postgres::<case>`.
macro_rules! with_stores {
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

with_stores!(
    worker_delivers_queued_mail,
    smtp_outage_loses_nothing,
    gives_up_after_max_attempts,
    bad_addresses_are_given_up_at_once,
);

mod cases {
    use super::*;

    /// Mail queued before the worker starts goes at once; mail queued later goes as soon as
    /// the worker is woken, long before its next poll.
    pub async fn worker_delivers_queued_mail(store: DynStore) {
        let Some(sink) = SmtpSink::start() else { return };
        let first = new_mail("alice@example.com", "First");
        enqueue(&store, &first).await;

        let settings = MailSettings { poll_interval: Duration::from_secs(3600), ..fast_settings() };
        let transport = Arc::new(SmtpTransport::new(&sink.url(), FROM).unwrap());
        let worker = Worker::start(store.clone(), transport, settings);

        let received = sink.wait_for(1, TIMEOUT).await;
        assert_eq!(subjects(&received), ["First"]);
        let got = &received[0];
        assert_eq!(got.to, ["alice@example.com"]);
        assert_eq!(got.from, "no-reply@portcullis.test");
        assert_eq!(got.text.trim_end(), first.text.trim_end());
        assert_eq!(got.html.trim_end(), first.html.trim_end());

        // The worker now sleeps for an hour unless woken.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = new_mail("bob@example.com", "Second");
        enqueue(&store, &second).await;
        worker.wake.notify_one();
        let received = sink.wait_for(2, TIMEOUT).await;
        assert_eq!(subjects(&received), ["First", "Second"]);

        worker.stop().await;
        assert_nothing_claimable(&store).await;
        assert_eq!(sink.messages().len(), 2, "sent exactly once each");
    }

    /// The SMTP server is down while mail is queued: the worker keeps retrying, and when the
    /// server is back every mail arrives, exactly once.
    pub async fn smtp_outage_loses_nothing(store: DynStore) {
        let Some(mut down) = SmtpSink::start() else { return };
        let port = down.port();
        down.stop();

        let transport = Arc::new(Counting::new(SmtpTransport::new(&down.url(), FROM).unwrap()));
        let worker = Worker::start(store.clone(), transport.clone(), fast_settings());
        let queued = ["One", "Two", "Three"];
        for subject in queued {
            enqueue(&store, &new_mail("alice@example.com", subject)).await;
        }
        worker.wake.notify_one();

        // Each mail fails a few times against the dead port.
        wait_until("9 failed attempts", || transport.failures.load(Ordering::SeqCst) >= 9).await;
        assert_eq!(transport.successes.load(Ordering::SeqCst), 0);

        let up = SmtpSink::start_on(port).expect("aiosmtpd was there a moment ago");
        let received = up.wait_for(3, TIMEOUT).await;
        assert_eq!(received.len(), 3, "{:?}", subjects(&received));
        // Several more poll rounds: nothing is sent twice.
        tokio::time::sleep(Duration::from_millis(500)).await;
        worker.stop().await;

        let received = up.messages();
        let got: BTreeSet<_> = received.iter().map(|m| m.subject.as_str()).collect();
        assert_eq!(received.len(), 3, "{:?}", subjects(&received));
        assert_eq!(got, queued.into_iter().collect());
        assert_eq!(transport.successes.load(Ordering::SeqCst), 3);
        assert_nothing_claimable(&store).await;
    }

    /// A mail that always fails is tried `max_attempts` times, each attempt seeing the
    /// previous error, then given up: never claimed again, however late.
    pub async fn gives_up_after_max_attempts(store: DynStore) {
        let transport = Arc::new(AlwaysFailing::default());
        let settings = MailSettings { max_attempts: 3, ..fast_settings() };
        let worker = Worker::start(store.clone(), transport.clone(), settings);
        let mail = new_mail("alice@example.com", "Doomed");
        enqueue(&store, &mail).await;
        worker.wake.notify_one();

        wait_until("3 attempts", || transport.seen().len() >= 3).await;
        // Many poll intervals and backoffs later, still 3.
        tokio::time::sleep(Duration::from_millis(800)).await;
        worker.stop().await;

        let seen = transport.seen();
        assert_eq!(seen.len(), 3, "{seen:#?}");
        for (n, attempt) in seen.iter().enumerate() {
            assert_eq!(attempt.id, mail.id);
            assert_eq!(attempt.attempts as usize, n, "attempts before this one");
            match n {
                0 => assert_eq!(attempt.last_error, None),
                _ => {
                    let error = attempt.last_error.as_deref().unwrap_or_default();
                    assert!(error.contains(&format!("attempt {n} failed")), "{error:?}");
                }
            }
        }
        // The store offers no way to read a given-up row (claims skip it): that it is never
        // claimed again is what can be checked through the trait.
        assert_nothing_claimable(&store).await;
    }

    /// A mail whose address cannot even be parsed is given up on the first attempt, and
    /// does not hold up the mail queued with it.
    pub async fn bad_addresses_are_given_up_at_once(store: DynStore) {
        let Some(sink) = SmtpSink::start() else { return };
        let transport = Arc::new(Counting::new(SmtpTransport::new(&sink.url(), FROM).unwrap()));
        enqueue(&store, &new_mail("not an address", "Broken")).await;
        enqueue(&store, &new_mail("bob@example.com", "Fine")).await;
        let worker = Worker::start(store.clone(), transport.clone(), fast_settings());

        let received = sink.wait_for(1, TIMEOUT).await;
        assert_eq!(subjects(&received), ["Fine"]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        worker.stop().await;
        assert_eq!(transport.failures.load(Ordering::SeqCst), 1, "one attempt only");
        assert_eq!(sink.messages().len(), 1);
        assert_nothing_claimable(&store).await;
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// Quick retries, so outages play out in milliseconds.
fn fast_settings() -> MailSettings {
    MailSettings {
        from: FROM.into(),
        poll_interval: Duration::from_millis(50),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        max_attempts: 1000,
        ..MailSettings::default()
    }
}

/// A worker running on the test's runtime until [`Worker::stop`].
struct Worker {
    wake: Arc<Notify>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Worker {
    fn start(store: DynStore, transport: Arc<dyn MailTransport>, settings: MailSettings) -> Worker {
        let worker = OutboxWorker::new(store, transport, settings);
        let wake = worker.waker();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(async move {
            let _ = stopped.await;
        }));
        Worker { wake, stop, task }
    }

    /// Stops the worker and waits until it has finished (its last delivery recorded).
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("the worker stops promptly")
            .expect("the worker does not panic");
    }
}

fn new_mail(to: &str, subject: &str) -> NewMail {
    NewMail {
        id: Uuid::now_v7(),
        user_id: None,
        to: to.into(),
        subject: subject.into(),
        text: format!("{subject}\n\nhttps://app.test/verify-email?token={subject}\n"),
        html: format!(
            "<p>{subject}</p><p><a href=\"https://app.test/verify-email?token={subject}\">Go</a></p>"
        ),
        created_at: OffsetDateTime::now_utc(),
    }
}

fn outbox_mail(to: &str, subject: &str, text: &str, html: &str) -> OutboxMail {
    OutboxMail {
        id: Uuid::now_v7(),
        to: to.into(),
        subject: subject.into(),
        text: text.into(),
        html: html.into(),
        attempts: 0,
        created_at: OffsetDateTime::now_utc(),
        last_error: None,
    }
}

/// Queues `mail` the way the flows do: in a transaction.
async fn enqueue(store: &DynStore, mail: &NewMail) {
    let mut tx = store.begin().await.expect("begin");
    tx.enqueue_mail(mail).await.expect("enqueue_mail");
    tx.commit().await.expect("commit");
}

/// Nothing is due even a day from now, however long leases were: every mail was sent or
/// given up.
async fn assert_nothing_claimable(store: &DynStore) {
    let tomorrow = OffsetDateTime::now_utc() + time::Duration::days(1);
    let left = store.claim_due_mail(tomorrow, 100, Duration::from_secs(60)).await.expect("claim");
    let left: Vec<_> = left.iter().map(|mail| (&mail.subject, mail.attempts, &mail.last_error)).collect();
    assert!(left.is_empty(), "still queued: {left:?}");
}

fn subjects(mails: &[support::ReceivedMail]) -> Vec<&str> {
    mails.iter().map(|mail| mail.subject.as_str()).collect()
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Counts the outcomes of the transport it wraps.
struct Counting<T> {
    inner: T,
    successes: AtomicUsize,
    failures: AtomicUsize,
}

impl<T> Counting<T> {
    fn new(inner: T) -> Counting<T> {
        Counting { inner, successes: AtomicUsize::new(0), failures: AtomicUsize::new(0) }
    }
}

#[async_trait]
impl<T: MailTransport> MailTransport for Counting<T> {
    async fn send(&self, mail: &OutboxMail) -> Result<(), MailError> {
        let result = self.inner.send(mail).await;
        let counter = if result.is_ok() { &self.successes } else { &self.failures };
        counter.fetch_add(1, Ordering::SeqCst);
        result
    }
}

/// Fails every attempt ("attempt <n> failed"), remembering what the outbox handed it.
#[derive(Default)]
struct AlwaysFailing {
    seen: Mutex<Vec<OutboxMail>>,
}

impl AlwaysFailing {
    fn seen(&self) -> Vec<OutboxMail> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait]
impl MailTransport for AlwaysFailing {
    async fn send(&self, mail: &OutboxMail) -> Result<(), MailError> {
        let n = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(mail.clone());
            seen.len()
        };
        Err(MailError::File {
            path: "/nonexistent/relay".into(),
            source: std::io::Error::other(format!("attempt {n} failed")),
        })
    }
}
