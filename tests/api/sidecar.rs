//! The sidecar deployment as processes on loopback: a central Portcullis (PostgreSQL +
//! Redis), a validator PROCESS (`portcullis serve --mode validator`, as the Helm chart's
//! native sidecar runs it) and an application PROCESS (`examples/protected_service.rs`, a
//! tonic service behind `portcullis::middleware`) that authorizes each of its requests
//! through the validator on 127.0.0.1.

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::harness::{Backend, eventually, spawn_with_settings, test_settings};

/// A child process, killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        _ = self.0.kill();
        _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// The example binary `cargo build --features client --example protected_service` puts
/// beside the test binaries (scripts/test builds it first).
fn example_binary() -> Option<PathBuf> {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_portcullis"));
    let path = exe.parent()?.join("examples").join("protected_service");
    crate::support::installed_tool(
        "the protected_service example (cargo build --features client --example protected_service)",
        path.exists().then_some(path),
    )
}

/// Waits until `addr` answers gRPC health with SERVING, or the process exits.
async fn wait_serving(addr: SocketAddr, process: &mut Process, what: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = process.0.try_wait() {
            panic!("{what} exited with {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not serve on {addr} within 30 s");
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Health/Check on the application, as an end user's request carrying `token`.
async fn call_app(app: &Channel, token: Option<&str>) -> Result<tonic::metadata::MetadataMap, tonic::Status> {
    let mut request = Request::new(HealthCheckRequest { service: String::new() });
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    HealthClient::new(app.clone()).check(request).await.map(|response| response.metadata().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_authorizes_every_request_through_its_validator_sidecar() {
    let Some((settings, data)) = test_settings(Backend::Postgres).await else { return };
    let Some(example) = example_binary() else { return };
    let central = spawn_with_settings(settings, Arc::new(data)).await;

    // The sidecar: keys from the central's GetJwks, revocations from the same Redis.
    let validator_addr = free_addr();
    let mut validator = Process(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["serve", "--mode", "validator"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORTCULLIS_SERVER__LISTEN", validator_addr.to_string())
            .env("PORTCULLIS_SERVER__OPS_ENABLED", "false")
            .env("PORTCULLIS_REDIS_URL", central.settings.redis_url.clone().unwrap())
            .env("PORTCULLIS_REDIS__KEY_PREFIX", &central.settings.redis.key_prefix)
            .env("PORTCULLIS_VALIDATOR__CENTRAL_URL", format!("http://{}", central.addr))
            .env("PORTCULLIS_LOG__FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the validator starts"),
    );
    wait_serving(validator_addr, &mut validator, "the validator").await;

    // The application, calling its sidecar on loopback.
    let app_addr = free_addr();
    let mut application = Process(
        Command::new(example)
            .arg(format!("http://{validator_addr}"))
            .arg(app_addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the application starts"),
    );
    let app = wait_serving(app_addr, &mut application, "the application").await;

    // No token, a forged one: refused by the application's layer.
    assert_eq!(call_app(&app, None).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(call_app(&app, Some("not.a.jwt")).await.unwrap_err().code(), Code::Unauthenticated);

    // A user's token from the central: served, and the handler sees who it is.
    let (access, _refresh, session) = central.user_session("sidecar_user").await;
    let headers = call_app(&app, Some(&access)).await.expect("a valid token is served");
    let user_id = session.user.as_ref().map(|u| u.id.clone()).unwrap();
    assert_eq!(headers.get("x-user-id").and_then(|v| v.to_str().ok()), Some(user_id.as_str()));

    // Logout on the central: the application refuses the token once the sidecar sees the
    // revocation (the middleware's positive cache holds an answer for at most 1 s).
    let logged_out = Instant::now();
    central.logout(&access).await.unwrap();
    let refused = eventually(Duration::from_secs(5), || async {
        call_app(&app, Some(&access)).await.is_err_and(|s| s.code() == Code::Unauthenticated)
    })
    .await;
    assert!(refused, "the application still serves a logged-out token");
    assert!(logged_out.elapsed() < Duration::from_secs(3), "refused only after {:?}", logged_out.elapsed());

    // The sidecar gone: the application fails closed (UNAVAILABLE), not open.
    let (other, _, _) = central.user_session("sidecar_other").await;
    drop(validator);
    let status = call_app(&app, Some(&other)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}
