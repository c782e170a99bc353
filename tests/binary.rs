//! The real `portcullis` binary: its commands, and a smoke test with no configuration at all,
//! in an empty directory, driven by grpcurl alone through server reflection — what a
//! newcomer does first.
//!
//! grpcurl comes from `scripts/install-test-tools.sh`. Without it the smoke test says it
//! was skipped, except under CI, where a missing tool is a failure.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

fn grpcurl() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PORTCULLIS_GRPCURL") {
        return Some(path.into());
    }
    let tools = std::env::var("PORTCULLIS_TOOLS_DIR").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/portcullis/tools")
    });
    let path = tools.join("bin/grpcurl");
    path.exists().then_some(path)
}

/// The verification token in the one `.eml` file under `mail_dir` (waiting for the outbox
/// worker to write it). Quoted-printable soft line breaks are undone first.
fn verification_token(mail_dir: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let eml = std::fs::read_dir(mail_dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .find(|e| e.path().extension().is_some_and(|x| x == "eml"));
        if let Some(eml) = eml {
            let text = std::fs::read_to_string(eml.path()).unwrap().replace("=\r\n", "").replace("=\n", "");
            let start = text.find("pcve_").expect("a verification token in the mail");
            return text[start..start + 5 + 43].to_string();
        }
        assert!(Instant::now() < deadline, "no mail written to {}", mail_dir.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        _ = self.0.kill();
        _ = self.0.wait();
    }
}

struct Grpcurl {
    bin: PathBuf,
    addr: String,
}

impl Grpcurl {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.bin).arg("-plaintext").args(args).output().expect("grpcurl runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.insert(all.len() - 1, &self.addr);
        let out = self.run(&all);
        assert!(out.status.success(), "grpcurl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn describe(&self, symbol: &str) -> String {
        let out = self.run(&[&self.addr, "describe", symbol]);
        assert!(out.status.success(), "describe {symbol} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn call(&self, method: &str, data: &str, headers: &[&str]) -> Value {
        let mut args = vec!["-d", data];
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(method);
        serde_json::from_str(&self.ok(&args)).expect("grpcurl prints JSON")
    }
}

#[test]
fn a_fresh_directory_serves_register_login_validate_through_grpcurl() {
    let Some(bin) = grpcurl() else {
        assert!(
            std::env::var("CI").is_err(),
            "grpcurl is missing under CI: run scripts/install-test-tools.sh"
        );
        eprintln!("SKIPPED grpcurl smoke test: grpcurl not installed (run scripts/install-test-tools.sh)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    command.arg("serve").current_dir(dir.path()).stdout(Stdio::null()).stderr(Stdio::piped());
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PORTCULLIS_")) {
        command.env_remove(key);
    }
    // The only settings: free ports instead of 50051 and 9090, so tests never collide.
    command.env("PORTCULLIS_SERVER__LISTEN", &addr);
    let ops_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ops_addr = format!("127.0.0.1:{ops_port}");
    command.env("PORTCULLIS_SERVER__OPS_LISTEN", &ops_addr);
    let mut server = Server(command.spawn().expect("portcullis starts"));
    let grpcurl = Grpcurl { bin, addr: addr.clone() };

    let started = Instant::now();
    let services = loop {
        let out = grpcurl.run(&[&addr, "list"]);
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(server.0.try_wait().unwrap().is_none(), "portcullis exited during start-up");
        assert!(started.elapsed() < Duration::from_secs(60), "portcullis did not come up");
        std::thread::sleep(Duration::from_millis(200));
    };
    for service in [
        "portcullis.v1.AuthService",
        "portcullis.v1.SessionService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.lines().any(|l| l == service), "{service} not listed:\n{services}");
    }
    let described = grpcurl.describe("portcullis.v1.AuthService");
    assert!(described.contains("rpc Login ( .portcullis.v1.LoginRequest )"), "{described}");
    let message = grpcurl.describe("portcullis.v1.ValidateTokenResponse");
    assert!(message.contains("session_id"), "{message}");

    let health = grpcurl.call("grpc.health.v1.Health/Check", "{}", &[]);
    assert_eq!(health["status"], "SERVING");

    let registered = grpcurl.call(
        "portcullis.v1.AuthService/Register",
        r#"{"username":"smoke","email":"smoke@example.com","password":"correct horse battery staple"}"#,
        &[],
    );
    assert_eq!(registered["user"]["username"], "smoke");
    // Without SMTP the verification mail is an .eml file under ./data/mail: follow its link.
    let token = verification_token(&dir.path().join("data/mail"));
    grpcurl.call(
        "portcullis.v1.AuthService/VerifyEmail",
        &serde_json::json!({"token": token}).to_string(),
        &[],
    );
    let login = grpcurl.call(
        "portcullis.v1.AuthService/Login",
        r#"{"identifier":"smoke@example.com","password":"correct horse battery staple","client":{"ipAddress":"192.0.2.1","userAgent":"curl/8.0"}}"#,
        &[],
    );
    let access = login["authenticated"]["tokens"]["accessToken"].as_str().expect("access token").to_string();
    let validated = grpcurl.call(
        "portcullis.v1.AuthService/ValidateToken",
        &serde_json::json!({"token": access}).to_string(),
        &[],
    );
    assert_eq!(validated["valid"], true);
    assert_eq!(validated["userId"], registered["user"]["id"]);

    // The README's GetJwks and curl examples: one key, the same document both ways.
    let jwks = grpcurl.call("portcullis.v1.AuthService/GetJwks", "{}", &[]);
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1, "{jwks}");
    let response = http_get(&ops_addr, "/.well-known/jwks.json");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(&format!("\r\n\r\n{}", jwks["jwksJson"].as_str().unwrap())), "{response}");

    let auth_header = format!("authorization: Bearer {access}");
    let sessions = grpcurl.call("portcullis.v1.SessionService/ListSessions", "{}", &[&auth_header]);
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(sessions["sessions"][0]["current"], true);
    grpcurl.call("portcullis.v1.AuthService/Logout", "{}", &[&auth_header]);
    let revoked = grpcurl.call(
        "portcullis.v1.AuthService/ValidateToken",
        &serde_json::json!({"token": access}).to_string(),
        &[],
    );
    assert_eq!(revoked["reason"], "TOKEN_INVALID_REASON_SESSION_REVOKED");

    // The embedded default made its own key, pepper and database under ./data.
    let data = dir.path().join("data");
    assert!(data.join("portcullis.db").exists());
    assert!(data.join("pepper").exists());
    assert_eq!(std::fs::read_dir(data.join("keys")).unwrap().count(), 1);

    // SIGTERM: a clean exit.
    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// `portcullis <args>` in `dir` with only the given `PORTCULLIS_*` variables.
fn portcullis(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    command.args(args).current_dir(dir);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PORTCULLIS_")) {
        command.env_remove(key);
    }
    command.envs(env.iter().copied());
    command.output().expect("portcullis runs")
}

#[test]
fn config_check_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("portcullis.toml"),
        "[tokens]\naccess_ttl = \"5m\"\n[server]\nlisten = \"127.0.0.1:6000\"\n",
    )
    .unwrap();
    let out = portcullis(
        dir.path(),
        &["config", "check", "--config", "portcullis.toml"],
        &[
            ("PORTCULLIS_DATABASE_URL", "postgres://app:hunter2-db@db.internal:5432/auth"),
            ("PORTCULLIS_REDIS_URL", "redis://:hunter2-redis@cache:6379"),
            ("PORTCULLIS_PASSWORD__PEPPER", "aHVudGVyMi1wZXBwZXItaHVudGVyMi1wZXBwZXItaHVudGVyMg=="),
            ("PORTCULLIS_SERVER__LISTEN", "0.0.0.0:7000"),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("access_ttl = \"5m\""), "the file is read:\n{text}");
    assert!(text.contains("listen = \"0.0.0.0:7000\""), "the environment wins over the file:\n{text}");
    assert!(text.contains("postgres://app:<redacted>@db.internal:5432/auth"), "{text}");
    for secret in ["hunter2", "aHVudGVy"] {
        assert!(!text.contains(secret), "secret {secret} printed:\n{text}");
    }
}

#[test]
fn unsafe_or_broken_configuration_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let no_redis =
        portcullis(dir.path(), &["config", "check"], &[("PORTCULLIS_DATABASE_URL", "postgres://h/db")]);
    assert!(!no_redis.status.success());
    assert!(String::from_utf8_lossy(&no_redis.stderr).contains("redis_url"), "says what to set");
    let bad_cost = portcullis(dir.path(), &["config", "check"], &[("PORTCULLIS_PASSWORD__BCRYPT_COST", "3")]);
    assert!(!bad_cost.status.success());
    assert!(String::from_utf8_lossy(&bad_cost.stderr).contains("bcrypt_cost"));
    let missing_file = portcullis(dir.path(), &["--config", "nope.toml", "config", "check"], &[]);
    assert!(!missing_file.status.success());
}

#[test]
fn keys_generate_and_list_and_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let mut kids = Vec::new();
    for alg in ["EdDSA", "ES256", "RS256"] {
        let out = portcullis(dir.path(), &["keys", "generate", "--algorithm", alg, "--dir", "k"], &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8(out.stdout).unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[1], alg, "{line}");
        kids.push(fields[0].to_string());
        std::thread::sleep(Duration::from_millis(1100)); // file names carry the second
    }
    let out = portcullis(dir.path(), &["keys", "list"], &[("PORTCULLIS_TOKENS__KEYS_DIR", "k")]);
    let listing = String::from_utf8(out.stdout).unwrap();
    assert_eq!(listing.lines().count(), 3, "{listing}");
    let signer: Vec<&str> = listing.lines().filter(|l| l.contains("signs+verifies")).collect();
    assert_eq!(signer.len(), 1);
    assert!(signer[0].starts_with(&kids[2]), "the newest key signs: {listing}");

    let out =
        portcullis(dir.path(), &["migrate"], &[("PORTCULLIS_DATABASE_URL", "sqlite://m/portcullis.db")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.path().join("m/portcullis.db").exists());
}

/// `portcullis-bench` with tiny windows against a server of its own: every scenario runs,
/// answers calls, and lands in the table and in the JSON.
#[test]
fn bench_runs_every_scenario_against_its_own_server() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis-bench"));
    command.current_dir(dir.path()).args([
        "--server-bin",
        env!("CARGO_BIN_EXE_portcullis"),
        "--duration",
        "300ms",
        "--warmup",
        "100ms",
        "--bcrypt-cost",
        "4",
        "--concurrency",
        "8",
        "--connections",
        "2",
        "--login-concurrency",
        "2",
        "--refresh-concurrency",
        "2",
        "--storm-logins",
        "8",
        "--rotation-tokens",
        "200",
        "--cold-tokens",
        "200",
        "--revoked-sessions",
        "2",
        "--tokens-per-revoked-session",
        "3",
        // Envoy and the replicas (PostgreSQL + Redis) are not for a smoke run.
        "--no-envoy",
        "--json",
    ]);
    command.arg(&json_path);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PORTCULLIS_")) {
        command.env_remove(key);
    }
    let started = Instant::now();
    let out = command.output().expect("portcullis-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(60), "the smoke run took {:?}", started.elapsed());

    let scenarios = [
        ("health", "Health/Check"),
        ("validate-hot", "ValidateToken hot"),
        ("ext-authz", "ext_authz Check hot"),
        ("validate-rotating", "ValidateToken rotating"),
        ("validate-cold", "ValidateToken cold"),
        ("validate-revoked", "ValidateToken revoked"),
        ("refresh", "Refresh"),
        ("login", "Login"),
        ("storm", "ValidateToken storm"),
        ("validator", "ValidateToken validator"),
        // The cold target's baseline, again right after the cold window.
        ("health-after-cold", "Health/Check (after cold)"),
    ];
    // A table line per scenario: its name, then the count of calls answered.
    let count_after = |name: &str| -> u64 {
        let line = stdout
            .lines()
            .find(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with("  ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{stdout}"));
        line[name.len()..].split_whitespace().next().unwrap().parse().unwrap()
    };
    for (_, name) in scenarios {
        assert!(count_after(name) > 0, "{name} answered nothing:\n{stdout}");
    }
    for alg in ["EdDSA", "ES256", "RS256"] {
        assert!(count_after(&format!("verify {alg}")) > 0, "no in-process figures for {alg}:\n{stdout}");
    }
    for line in [
        "cores",
        "Health CPU/request",
        "login storm:",
        "cheapest to verify here:",
        "peak RSS",
        "ext_authz Check (hot token",
        "spawn to Health SERVING:",
        "revocation lookup (",
        "server page faults/context switches per request:",
        "targets:",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }

    let json: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let rows = json["scenarios"].as_array().expect("scenarios");
    for (key, name) in scenarios {
        let row = rows.iter().find(|r| r["key"] == key).unwrap_or_else(|| panic!("{key} not in the JSON"));
        assert_eq!(row["name"], name);
        assert!(row["requests"].as_u64().unwrap() > 0, "{key}: {row}");
        assert_eq!(row["errors"], 0, "{key}: {row}");
        assert!(row["latency"]["p99_us"].as_u64().is_some(), "{key}: {row}");
        assert!(row["server_cpu_us_per_request"].as_f64().is_some(), "{key}: {row}");
        assert!(row["server_context_switches_per_request"].as_f64().is_some(), "{key}: {row}");
    }
    // On a KVM guest idling through cpuidle-haltpoll the run reports the poll time it ran
    // with, and warns when idle vCPUs halt at once (the server then pays VM exits).
    let driver =
        std::fs::read_to_string("/sys/devices/system/cpu/cpuidle/current_driver").unwrap_or_default();
    let poll = std::fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns").ok();
    match poll.filter(|_| driver.trim() == "haltpoll") {
        Some(poll) => {
            let poll: u64 = poll.trim().parse().unwrap();
            assert_eq!(json["machine"]["halt_polling"]["poll_ns"], poll, "{}", json["machine"]);
            assert_eq!(stdout.contains("WARNING: idle vCPUs of this VM halt at once"), poll == 0, "{stdout}");
        }
        None => assert!(json["machine"]["halt_polling"].is_null(), "{}", json["machine"]),
    }
    assert_eq!(json["in_process"].as_array().unwrap().len(), 3);
    assert!(json["cold_verify"]["verify_ns"].as_f64().unwrap() > 0.0, "{}", json["cold_verify"]);
    assert!(json["server_peak_rss_kib"].as_u64().unwrap() > 0);
    assert!(json["login_storm"]["p99_ratio"].as_f64().is_some());
    assert!(json["ext_authz"]["cpu_ratio_to_validate_hot"].as_f64().is_some(), "{}", json["ext_authz"]);
    assert!(json["validator"]["startup_ms"].as_f64().unwrap() > 0.0, "{}", json["validator"]);
    assert!(json["validator"]["idle_rss_kib"].as_u64().unwrap() > 0, "{}", json["validator"]);
    assert!(json["revocation_lookup"]["percent_of_validate_hot"].as_f64().is_some());
    assert!(json["envoy"].is_null() && json["revocation_replicas"].is_null(), "skipped in the smoke run");
    assert_eq!(json["failures"].as_array().unwrap().len(), 0);
}

/// A plain HTTP/1.1 GET on the ops port: the raw response.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the ops port");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}
