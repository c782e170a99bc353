//! The Helm chart (`helm/portcullis`) and its example values (`examples/helm/`): `helm lint`,
//! `helm template` validated against the Kubernetes 1.33 schemas (kubernetes-validate,
//! strict), what a user would notice (hardening, probes, hooks, the native sidecar, the
//! messages of refused values), and — so the chart cannot drift from the code — the
//! rendered configuration and environment run through the real binary's `config check`
//! (and `keys list` for chart-made key Secrets), with every key the chart sets required to
//! appear in the effective configuration (unknown keys are otherwise silently ignored).
//!
//! helm and kubernetes-validate come from `scripts/install-test-tools.sh`. Without them each
//! test says it was skipped, except under CI, where a missing tool is a failure.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::{Value, json};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/portcullis");
const SIDECAR_VALUES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/helm/sidecar-values.yaml");
const ALL_OPTIONS_VALUES: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/examples/helm/all-options-values.yaml");
const KUBERNETES_VERSION: &str = "1.33.0";
const PORTCULLIS: &str = env!("CARGO_BIN_EXE_portcullis");
/// Base64 of 32 bytes.
const PEPPER: &str = "c2l4dGVlbi1ieXRlcy1vZi1wZXBwZXItZm9yLXRlc3Q=";

struct Tools {
    helm: PathBuf,
    python: PathBuf,
    validate: PathBuf,
}

fn tools() -> Option<Tools> {
    let helm = support::tools_dir().join("bin/helm");
    let helm = support::installed_tool("helm", helm.exists().then_some(helm))?;
    let python = support::installed_tool(
        "kubernetes-validate",
        support::venv_python_with("kubernetes_validate, yaml"),
    )?;
    let validate = python.with_file_name("kubernetes-validate");
    Some(Tools { helm, python, validate })
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A chart in a temporary directory: the real key of a fresh `portcullis keys generate`.
struct Key {
    _dir: tempfile::TempDir,
    kid: String,
    file_name: String,
    path: PathBuf,
}

fn generate_key() -> Key {
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(PORTCULLIS).args(["keys", "generate", "--dir"]).arg(dir.path()));
    assert!(out.status.success(), "keys generate: {}", text(&out.stderr));
    // "<kid> <alg> <path>"
    let stdout = text(&out.stdout);
    let mut words = stdout.split_whitespace();
    let kid = words.next().unwrap().to_string();
    let path = PathBuf::from(words.nth(1).unwrap());
    let file_name = path.file_name().unwrap().to_str().unwrap().to_string();
    Key { _dir: dir, kid, file_name, path }
}

/// `--set` arguments giving every required secret as a value (the chart creates Secrets).
fn dev_secrets(key: &Key) -> Vec<String> {
    vec![
        "--set".into(),
        "secrets.databaseUrl.value=postgres://portcullis:db-secret@db:5432/portcullis".into(),
        "--set".into(),
        "secrets.redisUrl.value=redis://:redis-secret@redis:6379".into(),
        "--set".into(),
        "secrets.smtpUrl.value=smtps://mailer:smtp-secret@smtp.example.com:465".into(),
        "--set".into(),
        format!("secrets.pepper.value={PEPPER}"),
        "--set-file".into(),
        format!("secrets.signingKeys.files.{}={}", key.file_name.replace('.', "\\."), key.path.display()),
        "--set".into(),
        "config.mail.frontend_base_url=https://app.example.com".into(),
    ]
}

impl Tools {
    fn helm(&self, args: &[String]) -> Output {
        run(Command::new(&self.helm).args(args))
    }

    fn lint(&self, extra: &[String]) {
        let mut args: Vec<String> = vec!["lint".into(), "--strict".into(), CHART.into()];
        args.extend_from_slice(extra);
        let out = self.helm(&args);
        assert!(
            out.status.success(),
            "helm lint {extra:?} failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains("0 chart(s) failed"), "{}", text(&out.stdout));
    }

    /// `helm template` of the chart (release `portcullis`, namespace `auth`): the YAML.
    fn template_yaml(&self, chart: &str, extra: &[String]) -> Result<String, String> {
        let mut args: Vec<String> =
            vec!["template".into(), "portcullis".into(), chart.into(), "--namespace".into(), "auth".into()];
        args.extend_from_slice(extra);
        let out = self.helm(&args);
        if out.status.success() { Ok(text(&out.stdout)) } else { Err(text(&out.stderr)) }
    }

    /// Renders, validates every document against the Kubernetes schemas (strict), and
    /// returns the documents as JSON.
    fn render(&self, extra: &[String]) -> Vec<Value> {
        self.render_chart(CHART, extra)
    }

    fn render_chart(&self, chart: &str, extra: &[String]) -> Vec<Value> {
        let yaml = self.template_yaml(chart, extra).unwrap_or_else(|e| panic!("helm template failed: {e}"));
        self.validate(&yaml);
        self.documents(&yaml)
    }

    fn documents(&self, yaml: &str) -> Vec<Value> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = run(Command::new(&self.python)
            .arg("-c")
            .arg(
                "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
             json.dump(docs, sys.stdout)",
            )
            .arg(&file));
        assert!(out.status.success(), "YAML does not parse: {}", text(&out.stderr));
        match serde_json::from_slice(&out.stdout).unwrap() {
            Value::Array(docs) => docs,
            other => panic!("not a list of documents: {other}"),
        }
    }

    /// kubernetes-validate --strict against Kubernetes 1.33. Its schemas know no CRDs: the
    /// ServiceMonitor is reported without a schema (and checked field by field by the test
    /// that renders it); any other kind without a schema fails.
    fn validate(&self, yaml: &str) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = run(Command::new(&self.validate).args(["-k", KUBERNETES_VERSION, "--strict"]).arg(&file));
        let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "kubernetes-validate {KUBERNETES_VERSION} --strict failed:\n{report}");
        for line in report.lines() {
            assert!(!line.starts_with("ERROR"), "{report}");
            if line.starts_with("WARN") {
                assert!(
                    line.contains("kind ServiceMonitor with api version monitoring.coreos.com/v1"),
                    "unexpected warning: {line}"
                );
                eprintln!(
                    "note: ServiceMonitor (a CRD) is not in the Kubernetes schemas; its fields are asserted instead"
                );
            }
        }
        assert!(report.contains("passed"), "{report}");
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {:?}", names(docs)))
}

fn names(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| format!("{}/{}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()))
        .collect()
}

fn container<'a>(pod_spec: &'a Value, list: &str, name: &str) -> &'a Value {
    pod_spec[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} entry {name} in {pod_spec}"))
}

fn annotation<'a>(doc: &'a Value, key: &str) -> &'a str {
    doc["metadata"]["annotations"][key].as_str().unwrap_or_else(|| panic!("no annotation {key} on {doc}"))
}

/// Readiness is `GET /readyz?exclude=database` on the ops port: an outage of the shared
/// database must not take every replica out of the Service (ValidateToken and ext_authz need
/// only the keys and Redis).
fn assert_readiness_excludes_the_database(server: &Value) {
    let probe = &server["readinessProbe"];
    assert_eq!(probe["httpGet"]["path"], "/readyz?exclude=database", "{probe}");
    assert_eq!(probe["httpGet"]["port"], "ops", "{probe}");
    assert!(probe.get("grpc").is_none(), "gRPC health includes the database: {probe}");
}

/// Seconds `Application::run` (src/startup/mod.rs) may still take after the drain: the sum of
/// the `Duration::from_secs(N)` timeouts between `drained_tx.send(true)` and
/// `health_task.abort()` (activity flush, mail outbox, ops server, background tasks). Read from
/// the source, so the chart's terminationGracePeriodSeconds check cannot drift from it.
fn shutdown_seconds_after_drain() -> u64 {
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/startup/mod.rs")).unwrap();
    let start = source.find("drained_tx.send(true)").expect("Application::run signals `drained`");
    let end = start + source[start..].find("health_task.abort()").expect("then aborts the health task");
    let seconds: Vec<u64> = source[start..end]
        .split("Duration::from_secs(")
        .skip(1)
        .map(|rest| rest[..rest.find(')').unwrap()].trim().parse().unwrap())
        .collect();
    assert!(seconds.len() >= 4, "the post-drain timeouts were not found: {seconds:?}");
    seconds.iter().sum()
}

fn assert_hardened(pod_spec: &Value, container: &Value) {
    let pod = &pod_spec["securityContext"];
    let c = &container["securityContext"];
    for sc in [pod, c] {
        assert_eq!(sc["runAsNonRoot"], true, "{sc}");
        assert_eq!(sc["runAsUser"], 65532, "{sc}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{sc}");
    }
    assert_eq!(c["readOnlyRootFilesystem"], true, "{c}");
    assert_eq!(c["allowPrivilegeEscalation"], false, "{c}");
    assert_eq!(c["capabilities"]["drop"], json!(["ALL"]), "{c}");
}

// ---- a miniature kubelet: a container's environment and mounts, resolved locally ----------

/// The environment of `container` with Secret references resolved from the rendered Secrets
/// (or, for Secrets that exist outside the chart, from placeholders), and mount paths
/// mapped to a temporary directory holding what the kubelet would mount there.
struct LocalPod {
    root: tempfile::TempDir,
    env: Vec<(String, String)>,
    mounts: BTreeMap<String, PathBuf>,
}

fn placeholder(env: &str) -> &'static str {
    match env {
        "PORTCULLIS_DATABASE_URL" => "postgres://portcullis:existing-secret@db:5432/portcullis",
        "PORTCULLIS_REDIS_URL" => "redis://:existing-secret@redis:6379",
        "PORTCULLIS_MAIL__SMTP_URL" => "smtps://mailer:existing-secret@smtp.example.com:465",
        other => panic!("no placeholder for the secret variable {other}"),
    }
}

fn secret_data(docs: &[Value], name: &str) -> Option<BTreeMap<String, String>> {
    let secret = docs.iter().find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name)?;
    let data = secret["stringData"].as_object().expect("chart Secrets use stringData");
    Some(data.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect())
}

impl LocalPod {
    fn new(docs: &[Value], pod_spec: &Value, container: &Value) -> LocalPod {
        let root = tempfile::tempdir().unwrap();
        let volumes: BTreeMap<&str, &Value> = pod_spec["volumes"]
            .as_array()
            .map(|vs| vs.iter().map(|v| (v["name"].as_str().unwrap(), v)).collect())
            .unwrap_or_default();
        let mut mounts = BTreeMap::new();
        for (i, mount) in container["volumeMounts"].as_array().into_iter().flatten().enumerate() {
            let local = root.path().join(format!("mount{i}"));
            std::fs::create_dir_all(&local).unwrap();
            let volume = volumes[mount["name"].as_str().unwrap()];
            let files: BTreeMap<String, String> = if let Some(cm) = volume["configMap"]["name"].as_str() {
                let cm = find(docs, "ConfigMap", cm);
                cm["data"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect()
            } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
                let data = secret_data(docs, secret).unwrap_or_default();
                match volume["secret"]["items"].as_array() {
                    Some(items) => items
                        .iter()
                        .filter_map(|item| {
                            let value = data.get(item["key"].as_str().unwrap())?;
                            Some((item["path"].as_str().unwrap().to_string(), value.clone()))
                        })
                        .collect(),
                    None => data,
                }
            } else {
                BTreeMap::new()
            };
            for (file, content) in files {
                std::fs::write(local.join(file), content).unwrap();
            }
            mounts.insert(mount["mountPath"].as_str().unwrap().to_string(), local);
        }
        let mut env = Vec::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap().to_string();
            let value = if let Some(value) = var["value"].as_str() {
                value.to_string()
            } else {
                let secret_ref = &var["valueFrom"]["secretKeyRef"];
                let secret = secret_ref["name"].as_str().unwrap();
                match secret_data(docs, secret) {
                    Some(data) => data
                        .get(secret_ref["key"].as_str().unwrap())
                        .unwrap_or_else(|| panic!("Secret {secret} has no key {}", secret_ref["key"]))
                        .clone(),
                    None => placeholder(&name).to_string(),
                }
            };
            env.push((name, value));
        }
        LocalPod { root, env, mounts }
    }

    /// A path inside the pod, as a local path.
    fn local(&self, path: &str) -> String {
        for (mount, local) in self.mounts.iter().rev() {
            if let Some(rest) = path.strip_prefix(mount.as_str()) {
                return format!("{}{rest}", local.display());
            }
        }
        path.to_string()
    }

    fn portcullis(&self, args: &[&str]) -> Output {
        let mut command = Command::new(PORTCULLIS);
        command.args(args).current_dir(self.root.path()).env_clear();
        for (name, value) in &self.env {
            command.env(name, self.local(value));
        }
        run(&mut command)
    }

    /// `config check` must pass; returns the effective configuration.
    fn config_check(&self) -> toml::Table {
        let out = self.portcullis(&["config", "check"]);
        assert!(
            out.status.success(),
            "portcullis config check refused the pod's configuration: {}\nenv: {:?}",
            text(&out.stderr),
            self.env
        );
        text(&out.stdout).parse().expect("config check prints TOML")
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Dotted paths of every value (not table) in `table`.
fn leaf_keys(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            toml::Value::Table(inner) => leaf_keys(inner, &path, out),
            _ => {
                out.insert(path);
            }
        }
    }
}

/// Every setting the pod gives (TOML file and PORTCULLIS_* variables) is one the server
/// knows: it appears in the effective configuration `config check` prints.
fn assert_all_keys_known(pod: &LocalPod, effective: &toml::Table) {
    let mut known = BTreeSet::new();
    leaf_keys(effective, "", &mut known);
    let mut given = BTreeSet::new();
    if let Some(file) = pod.var("PORTCULLIS_CONFIG") {
        let rendered: toml::Table = std::fs::read_to_string(pod.local(file)).unwrap().parse().unwrap();
        leaf_keys(&rendered, "", &mut given);
    }
    for (name, _) in &pod.env {
        if let Some(key) = name.strip_prefix("PORTCULLIS_").filter(|_| name != "PORTCULLIS_CONFIG") {
            given.insert(key.to_lowercase().replace("__", "."));
        }
    }
    assert!(!given.is_empty());
    let unknown: Vec<&String> = given.difference(&known).collect();
    assert!(unknown.is_empty(), "settings the server does not know (ignored): {unknown:?}");
}

fn str_of<'a>(table: &'a toml::Table, path: &str) -> &'a str {
    let mut value = None;
    let mut current = table;
    for part in path.split('.') {
        value = current.get(part);
        if let Some(toml::Value::Table(t)) = value {
            current = t;
        }
    }
    value
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("no string {path} in the effective configuration"))
}

// ---- the tests ---------------------------------------------------------------------------

#[test]
fn helm_lint_passes_for_the_default_values_with_the_required_secrets() {
    let Some(tools) = tools() else { return };
    let key = generate_key();
    tools.lint(&dev_secrets(&key));
}

#[test]
fn helm_lint_passes_for_the_sidecar_example() {
    let Some(tools) = tools() else { return };
    tools.lint(&["-f".into(), SIDECAR_VALUES.into()]);
}

#[test]
fn helm_lint_passes_for_the_all_options_example() {
    let Some(tools) = tools() else { return };
    tools.lint(&["-f".into(), ALL_OPTIONS_VALUES.into()]);
}

#[test]
fn server_mode_renders_valid_hardened_resources_with_grpc_probes_and_a_migration_hook() {
    let Some(tools) = tools() else { return };
    let key = generate_key();
    let docs = tools.render(&dev_secrets(&key));
    let kinds: BTreeSet<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Job",
        "Pod",
    ] {
        assert!(kinds.contains(kind), "no {kind} in {:?}", names(&docs));
    }
    for off in ["NetworkPolicy", "ServiceMonitor"] {
        assert!(!kinds.contains(off), "{off} is opt-in");
    }

    let deployment = find(&docs, "Deployment", "portcullis");
    let spec = &deployment["spec"]["template"]["spec"];
    let server = container(spec, "containers", "portcullis");
    assert_hardened(spec, server);
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["enableServiceLinks"], false, "Service variables would share the PORTCULLIS_ prefix");
    assert!(deployment["spec"].get("replicas").is_none(), "the HPA owns the replica count");
    assert_eq!(server["args"], json!(["serve"]));
    // Startup: native gRPC probe. Readiness: the ops port's /readyz without the shared
    // database (its outage must not empty the Service). Liveness: the process answers.
    assert_eq!(server["startupProbe"]["grpc"]["port"], 50051);
    assert_readiness_excludes_the_database(server);
    assert_eq!(server["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(
        server["resources"]["requests"]["cpu"].is_string()
            && server["resources"]["limits"]["memory"].is_string()
    );
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > 5 + 20 + shutdown_seconds_after_drain(),
        "terminationGracePeriodSeconds {grace} must exceed preStop + shutdown_grace + the post-drain shutdown"
    );
    assert_eq!(server["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
    let mounts: BTreeMap<&str, &Value> = server["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap(), m))
        .collect();
    assert_eq!(mounts["/etc/portcullis/keys"]["readOnly"], true);
    assert_eq!(mounts["/etc/portcullis/config"]["readOnly"], true);
    assert!(mounts.contains_key("/tmp"));
    assert_eq!(annotation(&deployment["spec"]["template"], "checksum/config").len(), 64);
    let spread = spec["topologySpreadConstraints"].as_array().unwrap();
    let keys: Vec<&str> = spread.iter().map(|c| c["topologyKey"].as_str().unwrap()).collect();
    assert_eq!(keys, ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]);
    assert_eq!(spread[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"], "server");
    // Secrets arrive as Secret references, never as plain values.
    for var in ["PORTCULLIS_DATABASE_URL", "PORTCULLIS_REDIS_URL", "PORTCULLIS_MAIL__SMTP_URL"] {
        let entry = server["env"].as_array().unwrap().iter().find(|e| e["name"] == var).unwrap();
        assert!(entry["valueFrom"]["secretKeyRef"]["name"].is_string(), "{var}: {entry}");
    }

    let service = find(&docs, "Service", "portcullis");
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports[0]["port"], 50051);
    assert_eq!(ports[0]["appProtocol"], "grpc");
    assert_eq!(ports[1]["port"], 9090);
    assert_eq!(ports[1]["appProtocol"], "http");
    assert_eq!(find(&docs, "ServiceAccount", "portcullis")["automountServiceAccountToken"], false);
    let hpa = find(&docs, "HorizontalPodAutoscaler", "portcullis");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
    assert_eq!(find(&docs, "PodDisruptionBudget", "portcullis")["apiVersion"], "policy/v1");

    // The migration Job: a pre-install/pre-upgrade hook, after the database Secret hook.
    let job = find(&docs, "Job", "portcullis-migrate");
    assert_eq!(annotation(job, "helm.sh/hook"), "pre-install,pre-upgrade");
    assert_eq!(annotation(job, "helm.sh/hook-delete-policy"), "before-hook-creation,hook-succeeded");
    let job_spec = &job["spec"]["template"]["spec"];
    let migrate = container(job_spec, "containers", "migrate");
    assert_eq!(migrate["args"], json!(["migrate"]));
    assert_eq!(migrate["image"], server["image"]);
    assert_hardened(job_spec, migrate);
    assert!(job_spec.get("serviceAccountName").is_none(), "the release's ServiceAccount does not exist yet");
    let db_ref = &migrate["env"][0]["valueFrom"]["secretKeyRef"];
    let db_secret = find(&docs, "Secret", db_ref["name"].as_str().unwrap());
    assert_eq!(annotation(db_secret, "helm.sh/hook"), "pre-install,pre-upgrade");
    let weight = |doc: &Value| annotation(doc, "helm.sh/hook-weight").parse::<i32>().unwrap();
    assert!(weight(db_secret) < weight(job), "the database Secret must exist before the Job runs");
    for volume in job_spec["volumes"].as_array().unwrap() {
        assert!(volume.get("configMap").is_none(), "the ConfigMap does not exist yet when the hook runs");
    }

    // `helm test`: grpcurl asks grpc.health.v1 on the Service.
    let test = find(&docs, "Pod", "portcullis-test-health");
    assert_eq!(annotation(test, "helm.sh/hook"), "test");
    let args = &container(&test["spec"], "containers", "grpc-health")["args"];
    assert_eq!(
        args.as_array().unwrap().iter().rev().take(2).collect::<Vec<_>>(),
        [&json!("grpc.health.v1.Health/Check"), &json!("portcullis.auth.svc:50051")]
    );
    assert_eq!(args[0], "-plaintext");
}

#[test]
fn the_server_pod_configuration_passes_the_real_config_check_and_its_keys_load() {
    let Some(tools) = tools() else { return };
    let key = generate_key();
    let docs = tools.render(&dev_secrets(&key));
    let spec = &find(&docs, "Deployment", "portcullis")["spec"]["template"]["spec"];
    let pod = LocalPod::new(&docs, spec, container(spec, "containers", "portcullis"));
    let effective = pod.config_check();
    assert_all_keys_known(&pod, &effective);
    assert_eq!(str_of(&effective, "server.listen"), "0.0.0.0:50051");
    assert_eq!(str_of(&effective, "server.ops_listen"), "0.0.0.0:9090");
    assert_eq!(str_of(&effective, "log.format"), "json");
    assert_eq!(str_of(&effective, "database_url"), "postgres://portcullis:<redacted>@db:5432/portcullis");
    assert_eq!(str_of(&effective, "mail.smtp_url"), "smtps://mailer:<redacted>@smtp.example.com:465");
    assert_eq!(effective["database"]["migrate_on_start"].as_bool(), Some(false), "the Job migrates");
    assert_eq!(effective["password"]["hashing_concurrency"].as_integer(), Some(2));
    // The pepper file holds the value; the key Secret's PEM loads and signs.
    let pepper =
        std::fs::read_to_string(pod.local(pod.var("PORTCULLIS_PASSWORD__PEPPER_FILE").unwrap())).unwrap();
    assert_eq!(pepper, PEPPER);
    let out = pod.portcullis(&["keys", "list"]);
    assert!(out.status.success(), "keys list: {}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert!(listed.starts_with(&format!("{} RS256 signs+verifies", key.kid)), "{listed}");
}

#[test]
fn the_migration_job_environment_passes_the_real_config_check() {
    let Some(tools) = tools() else { return };
    let key = generate_key();
    let docs = tools.render(&dev_secrets(&key));
    let spec = &find(&docs, "Job", "portcullis-migrate")["spec"]["template"]["spec"];
    let pod = LocalPod::new(&docs, spec, container(spec, "containers", "migrate"));
    let effective = pod.config_check();
    assert_all_keys_known(&pod, &effective);
    assert_eq!(str_of(&effective, "database_url"), "postgres://portcullis:<redacted>@db:5432/portcullis");
    assert!(effective.get("redis_url").is_none(), "migrating needs no Redis");
}

#[test]
fn sidecar_mode_renders_the_validator_as_a_native_sidecar_next_to_the_app() {
    let Some(tools) = tools() else { return };
    let docs = tools.render(&["-f".into(), SIDECAR_VALUES.into()]);
    for kind in ["Job", "ConfigMap", "Service", "HorizontalPodAutoscaler", "Secret"] {
        assert!(docs.iter().all(|d| d["kind"] != kind), "sidecar mode renders no {kind}: {:?}", names(&docs));
    }
    let spec = &find(&docs, "Deployment", "portcullis")["spec"]["template"]["spec"];
    let validator = container(spec, "initContainers", "portcullis-validator");
    assert_eq!(validator["restartPolicy"], "Always");
    assert_eq!(validator["args"], json!(["serve", "--mode", "validator"]));
    assert_eq!(validator["startupProbe"]["grpc"]["port"], 50051);
    assert!(
        validator.get("readinessProbe").is_none(),
        "readiness is opt-in: a Redis blip must not make every app pod unready: {validator}"
    );
    assert_hardened(spec, validator);
    assert_eq!(
        validator["securityContext"]["runAsUser"], 65532,
        "hardened on its own, whatever the pod says"
    );
    assert!(validator["resources"]["limits"]["memory"].is_string());
    let app = container(spec, "containers", "orders-api");
    let app_env = app["env"].as_array().unwrap();
    assert!(app_env.iter().any(|e| e["value"] == "http://127.0.0.1:50051"), "{app_env:?}");

    let pod = LocalPod::new(&docs, spec, validator);
    let effective = pod.config_check();
    assert_all_keys_known(&pod, &effective);
    assert_eq!(str_of(&effective, "validator.central_url"), "http://portcullis.auth.svc.cluster.local:50051");
    assert_eq!(str_of(&effective, "server.listen"), "0.0.0.0:50051");
    assert_eq!(str_of(&effective, "redis.key_prefix"), "portcullis:");
    assert_eq!(str_of(&effective, "server.ops_listen"), "0.0.0.0:9901", "not the app's 9090");
}

#[test]
fn the_sidecar_mounts_a_secret_for_tls_to_the_central_instance() {
    let Some(tools) = tools() else { return };
    let mut args: Vec<String> = vec!["-f".into(), SIDECAR_VALUES.into()];
    for set in [
        "sidecar.validator.centralUrl=https://portcullis.auth.svc.cluster.local:50051",
        "sidecar.validator.centralTls.secretName=orders-portcullis-client",
        "sidecar.validator.centralTls.serverName=portcullis.auth.svc",
    ] {
        args.extend(["--set".into(), set.into()]);
    }
    let docs = tools.render(&args);
    let spec = &find(&docs, "Deployment", "portcullis")["spec"]["template"]["spec"];
    let validator = container(spec, "initContainers", "portcullis-validator");
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "portcullis-validator-central-tls")
        .expect("the pod declares the Secret volume");
    assert_eq!(volume["secret"]["secretName"], "orders-portcullis-client");
    assert!(volume["secret"].get("items").is_none(), "the whole Secret: renewals reach the files");
    let mount = validator["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "portcullis-validator-central-tls")
        .expect("the validator mounts it");
    assert_eq!(mount["mountPath"], "/etc/portcullis/central-tls");
    assert!(mount.get("subPath").is_none());
    let app = container(spec, "containers", "orders-api");
    assert!(app["volumeMounts"].is_null(), "the application does not see the client key");

    let pod = LocalPod::new(&docs, spec, validator);
    let effective = pod.config_check();
    assert_all_keys_known(&pod, &effective);
    assert_eq!(
        str_of(&effective, "validator.central_url"),
        "https://portcullis.auth.svc.cluster.local:50051"
    );
    for (key, file) in [("ca_file", "ca.crt"), ("cert_file", "tls.crt"), ("key_file", "tls.key")] {
        assert_eq!(
            pod.var(&format!("PORTCULLIS_VALIDATOR__CENTRAL_TLS__{}", key.to_uppercase())),
            Some(format!("/etc/portcullis/central-tls/{file}").as_str())
        );
    }
    assert_eq!(str_of(&effective, "validator.central_tls.server_name"), "portcullis.auth.svc");

    // Only the CA (a central without mutual TLS).
    args.extend(["--set".into(), "sidecar.validator.centralTls.clientCertificate=false".into()]);
    let docs = tools.render(&args);
    let spec = &find(&docs, "Deployment", "portcullis")["spec"]["template"]["spec"];
    let pod = LocalPod::new(&docs, spec, container(spec, "initContainers", "portcullis-validator"));
    pod.config_check();
    assert!(pod.var("PORTCULLIS_VALIDATOR__CENTRAL_TLS__CA_FILE").is_some());
    assert!(pod.var("PORTCULLIS_VALIDATOR__CENTRAL_TLS__CERT_FILE").is_none());
    assert!(pod.var("PORTCULLIS_VALIDATOR__CENTRAL_TLS__KEY_FILE").is_none());

    // TLS settings with a plaintext central URL are refused at template time.
    let mut args: Vec<String> = vec!["-f".into(), SIDECAR_VALUES.into()];
    args.extend(["--set".into(), "sidecar.validator.centralTls.secretName=orders-portcullis-client".into()]);
    let err = tools.template_yaml(CHART, &args).expect_err("centralTls with http://");
    assert!(err.contains("validator.centralTls needs an https:// validator.centralUrl"), "{err}");
}

#[test]
fn another_chart_includes_the_validator_sidecar_template() {
    let Some(tools) = tools() else { return };
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path();
    std::fs::create_dir_all(root.join("templates")).unwrap();
    std::fs::create_dir_all(root.join("charts")).unwrap();
    copy_dir(Path::new(CHART), &root.join("charts/portcullis"));
    std::fs::write(
        root.join("Chart.yaml"),
        "apiVersion: v2\nname: orders\nversion: 1.0.0\ndependencies:\n  - name: portcullis\n    version: 0.1.0\n",
    )
    .unwrap();
    std::fs::write(
        root.join("values.yaml"),
        "portcullis:\n  mode: none\n\
         portcullisValidator:\n  image: {repository: registry.example.com/portcullis, tag: \"0.1.0\"}\n  \
         centralUrl: http://portcullis.auth.svc.cluster.local:50051\n  \
         redis: {existingSecret: portcullis-redis, key: redis-url}\n  port: 50061\n",
    )
    .unwrap();
    std::fs::write(
        root.join("templates/deployment.yaml"),
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: orders
spec:
  selector:
    matchLabels: {app: orders}
  template:
    metadata:
      labels: {app: orders}
    spec:
      initContainers:
        {{- include "portcullis.validatorSidecar" (dict "validator" .Values.portcullisValidator) | nindent 8 }}
      containers:
        - name: orders
          image: registry.example.com/orders:1.0.0
      {{- with include "portcullis.validatorSidecarVolumes" (dict "validator" .Values.portcullisValidator) | trim }}
      volumes:
        {{- . | nindent 8 }}
      {{- end }}
"#,
    )
    .unwrap();
    let chart = root.to_str().unwrap();
    let docs = tools.render_chart(chart, &[]);
    assert_eq!(names(&docs), ["Deployment/orders"], "mode none renders nothing of its own");
    let spec = &docs[0]["spec"]["template"]["spec"];
    let validator = container(spec, "initContainers", "portcullis-validator");
    assert_eq!(validator["restartPolicy"], "Always");
    assert_eq!(validator["startupProbe"]["grpc"]["port"], 50061);
    assert!(validator.get("readinessProbe").is_none(), "readiness is opt-in: {validator}");
    assert_eq!(validator["securityContext"]["readOnlyRootFilesystem"], true);
    let ops_off =
        validator["env"].as_array().unwrap().iter().find(|e| e["name"] == "PORTCULLIS_SERVER__OPS_ENABLED");
    assert_eq!(ops_off.map(|e| &e["value"]), Some(&json!("false")), "no ops port unless asked for");
    assert!(spec["volumes"].is_null() && validator["volumeMounts"].is_null(), "no TLS, no volume");

    // With TLS to the central instance, the volumes helper declares what the container mounts.
    let docs = tools.render_chart(
        chart,
        &[
            "--set".into(),
            "portcullisValidator.centralUrl=https://portcullis.auth.svc.cluster.local:50051".into(),
            "--set".into(),
            "portcullisValidator.centralTls.secretName=orders-portcullis-client".into(),
        ],
    );
    let spec = &docs[0]["spec"]["template"]["spec"];
    let validator = container(spec, "initContainers", "portcullis-validator");
    let mount = &validator["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/etc/portcullis/central-tls");
    assert_eq!(spec["volumes"][0]["name"], mount["name"]);
    assert_eq!(spec["volumes"][0]["secret"]["secretName"], "orders-portcullis-client");
    let env = validator["env"].as_array().unwrap();
    for name in [
        "PORTCULLIS_VALIDATOR__CENTRAL_TLS__CA_FILE",
        "PORTCULLIS_VALIDATOR__CENTRAL_TLS__CERT_FILE",
        "PORTCULLIS_VALIDATOR__CENTRAL_TLS__KEY_FILE",
    ] {
        assert!(env.iter().any(|e| e["name"] == name), "{name} in {env:?}");
    }

    // A missing required value names itself.
    let err = tools
        .template_yaml(chart, &["--set".into(), "portcullisValidator.centralUrl=".into()])
        .expect_err("no key source must be refused");
    assert!(err.contains("exactly one of validator.centralUrl"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn all_options_render_valid_resources_with_tls_probes_network_policy_and_service_monitor() {
    let Some(tools) = tools() else { return };
    let docs = tools.render(&["-f".into(), ALL_OPTIONS_VALUES.into()]);
    assert!(docs.iter().all(|d| d["kind"] != "Secret"), "existing Secrets only: {:?}", names(&docs));
    let deployment = find(&docs, "Deployment", "portcullis");
    let spec = &deployment["spec"]["template"]["spec"];
    let server = container(spec, "containers", "portcullis");
    assert_hardened(spec, server);
    // kubelet gRPC probes cannot do TLS: startup over the ops port too.
    assert_readiness_excludes_the_database(server);
    assert_eq!(server["startupProbe"]["httpGet"]["path"], "/readyz?exclude=database");
    assert_eq!(server["startupProbe"]["httpGet"]["port"], "ops");
    assert_eq!(server["livenessProbe"]["httpGet"]["path"], "/healthz");
    let volumes = spec["volumes"].as_array().unwrap();
    let tls = volumes.iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(tls["secret"]["secretName"], "portcullis-tls");
    let keys = volumes.iter().find(|v| v["name"] == "keys").unwrap();
    assert_eq!(keys["secret"]["secretName"], "portcullis-keys");
    for mount in server["volumeMounts"].as_array().unwrap() {
        assert!(mount.get("subPath").is_none(), "subPath mounts never see renewed certificates: {mount}");
    }

    let pod = LocalPod::new(&docs, spec, server);
    let effective = pod.config_check();
    assert_all_keys_known(&pod, &effective);
    assert!(str_of(&effective, "server.tls.cert_file").ends_with("/tls.crt"));
    assert!(str_of(&effective, "server.tls.client_ca_file").ends_with("/ca.crt"));
    assert_eq!(str_of(&effective, "tokens.issuer"), "https://auth.example.com");

    let policy = find(&docs, "NetworkPolicy", "portcullis");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    let egress_ports: BTreeSet<i64> = policy["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_array().unwrap().iter().map(|p| p["port"].as_i64().unwrap()))
        .collect();
    for port in [53, 5432, 6379, 465, 587] {
        assert!(egress_ports.contains(&port), "egress to port {port}: {egress_ports:?}");
    }
    // DNS to kube-dns pods and to NodeLocal DNSCache's address (not a pod).
    let dns = policy["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|rule| rule["ports"][0]["port"] == 53)
        .expect("a DNS rule");
    let peers = dns["to"].as_array().unwrap();
    assert!(peers.iter().any(|p| p["podSelector"]["matchLabels"]["k8s-app"] == "kube-dns"), "{dns}");
    assert!(peers.iter().any(|p| p["ipBlock"]["cidr"] == "169.254.20.10/32"), "{dns}");

    // ServiceMonitor: not in the Kubernetes schemas (a CRD), so its fields here.
    let monitor = find(&docs, "ServiceMonitor", "portcullis");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let service = find(&docs, "Service", "portcullis");
    // Exactly one Service matches (the headless one reaches the same pods: a second match
    // would scrape every pod twice).
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let selected: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "Service")
        .filter(|d| selector.iter().all(|(label, value)| &d["metadata"]["labels"][label] == value))
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(selected, ["portcullis"], "the ServiceMonitor selects the main Service only");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "ops");
    assert_eq!(endpoint["path"], "/metrics");
    assert!(service["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == "ops"));
    assert_eq!(find(&docs, "Service", "portcullis-headless")["spec"]["clusterIP"], "None");

    let test = find(&docs, "Pod", "portcullis-test-health");
    let args: Vec<&str> = container(&test["spec"], "containers", "grpc-health")["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        !args.contains(&"-plaintext") && args.contains(&"-cacert") && args.contains(&"-cert"),
        "{args:?}"
    );
    assert_eq!(test["spec"]["imagePullSecrets"], json!([{"name": "registry-credentials"}]));
    let ca = test["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(ca["secret"]["secretName"], "portcullis-tls", "cert-manager's ca.crt by default");

    // A certificate from a public/ACME issuer has no ca.crt: the CA comes from elsewhere.
    let docs = tools.render(&[
        "-f".into(),
        ALL_OPTIONS_VALUES.into(),
        "--set".into(),
        "tls.caSecret=corporate-ca".into(),
        "--set".into(),
        "tls.caKey=bundle.pem".into(),
    ]);
    let test = find(&docs, "Pod", "portcullis-test-health");
    let ca = test["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(ca["secret"]["secretName"], "corporate-ca");
    assert_eq!(ca["secret"]["items"], json!([{"key": "bundle.pem", "path": "ca.crt"}]));
}

#[test]
fn missing_required_secrets_fail_at_template_time_naming_each_one() {
    let Some(tools) = tools() else { return };
    let err = tools.template_yaml(CHART, &[]).expect_err("the default values alone must be refused");
    for named in ["secrets.databaseUrl", "secrets.redisUrl", "secrets.pepper", "secrets.signingKeys"] {
        assert!(err.contains(named), "the message names {named}: {err}");
    }
    assert!(err.contains("existingSecret"), "{err}");
    assert!(!err.contains("secrets.smtpUrl"), "SMTP is optional: {err}");

    // One missing among the others: only that one is named.
    let key = generate_key();
    let mut args = dev_secrets(&key);
    args.extend(["--set".into(), "secrets.pepper.value=".into()]);
    let err = tools.template_yaml(CHART, &args).expect_err("no pepper must be refused");
    assert!(err.contains("secrets.pepper") && !err.contains("secrets.redisUrl"), "{err}");
}

#[test]
fn inconsistent_values_fail_with_a_clear_message() {
    let Some(tools) = tools() else { return };
    let key = generate_key();
    let refused = |extra: &[&str], expected: &str| {
        let mut args = dev_secrets(&key);
        args.extend(extra.iter().map(|a| a.to_string()));
        let err = tools.template_yaml(CHART, &args).expect_err(expected);
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
    };
    refused(&["--set", "terminationGracePeriodSeconds=20"], "terminationGracePeriodSeconds (20) must exceed");
    refused(&["--set", "secrets.pepper.value=c2hvcnQ="], "at least 32 random bytes");
    refused(&["--set", "secrets.databaseUrl.existingSecret=db"], "set existingSecret or value, not both");
    refused(&["--set", "tls.enabled=true"], "tls.enabled needs tls.secretName");
    refused(&["--set", "mode=validator"], "mode must be server, sidecar or none");
    let mut args: Vec<String> = vec!["-f".into(), SIDECAR_VALUES.into()];
    args.extend(["--set".into(), "sidecar.validator.jwksFile=/jwks/jwks.json".into()]);
    let err = tools.template_yaml(CHART, &args).expect_err("two key sources");
    assert!(err.contains("exactly one of validator.centralUrl"), "{err}");
}

#[test]
fn the_sidecar_readiness_probe_is_opt_in() {
    let Some(tools) = tools() else { return };
    let docs = tools.render(&[
        "-f".into(),
        SIDECAR_VALUES.into(),
        "--set".into(),
        "sidecar.validator.readinessProbe=true".into(),
    ]);
    let spec = &find(&docs, "Deployment", "portcullis")["spec"]["template"]["spec"];
    let validator = container(spec, "initContainers", "portcullis-validator");
    assert_eq!(validator["readinessProbe"]["grpc"]["port"], 50051, "{validator}");
}

#[test]
fn whole_numbers_of_a_million_or_more_stay_integers_in_the_sidecar_environment() {
    let Some(tools) = tools() else { return };
    // From a values file, as users write it: Helm reads its numbers as floats (`--set` would
    // give an int64 and hide the problem), and toString writes 1000000.0 as "1e+06".
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "sidecar:\n  validator:\n    config:\n      tokens:\n        verified_cache_capacity: 1000000\n\
         config:\n  tokens:\n    verified_cache_capacity: 1000000\n",
    )
    .unwrap();
    let values = values.to_str().unwrap().to_string();
    let docs = tools.render(&["-f".into(), SIDECAR_VALUES.into(), "-f".into(), values.clone()]);
    let spec = &find(&docs, "Deployment", "portcullis")["spec"]["template"]["spec"];
    let validator = container(spec, "initContainers", "portcullis-validator");
    let pod = LocalPod::new(&docs, spec, validator);
    assert_eq!(pod.var("PORTCULLIS_TOKENS__VERIFIED_CACHE_CAPACITY"), Some("1000000"));
    let effective = pod.config_check();
    assert_all_keys_known(&pod, &effective);
    assert_eq!(effective["tokens"]["verified_cache_capacity"].as_integer(), Some(1_000_000));

    // The ConfigMap path, the same logic: a TOML integer.
    let key = generate_key();
    let mut args = dev_secrets(&key);
    args.extend(["-f".into(), values]);
    let docs = tools.render(&args);
    let toml = find(&docs, "ConfigMap", "portcullis")["data"]["portcullis.toml"].as_str().unwrap();
    assert!(toml.contains("verified_cache_capacity = 1000000\n"), "{toml}");
}

#[test]
fn secrets_in_config_are_refused_naming_the_secrets_value_to_use() {
    let Some(tools) = tools() else { return };
    let key = generate_key();
    for (set, named) in [
        ("config.database_url=postgres://u:p@db/x", "config.database_url: use secrets.databaseUrl"),
        ("config.redis_url=redis://:p@redis:6379", "config.redis_url: use secrets.redisUrl"),
        ("config.password.pepper=c2VjcmV0", "config.password.pepper: use secrets.pepper"),
        ("config.mail.smtp_url=smtps://u:p@smtp:465", "config.mail.smtp_url: use secrets.smtpUrl"),
    ] {
        let mut args = dev_secrets(&key);
        args.extend(["--set".into(), set.into()]);
        let err = tools.template_yaml(CHART, &args).expect_err(set);
        assert!(err.contains(named), "{set}: expected {named:?} in: {err}");
        assert!(err.contains("ConfigMap"), "{err}");
    }
    // Not a secret: rendered as it is.
    let mut args = dev_secrets(&key);
    args.extend(["--set".into(), "config.log.otlp_endpoint=http://otel-collector:4317".into()]);
    let docs = tools.render(&args);
    let toml = find(&docs, "ConfigMap", "portcullis")["data"]["portcullis.toml"].as_str().unwrap();
    assert!(toml.contains("http://otel-collector:4317"), "{toml}");

    // The sidecar: the Redis URL comes from a Secret, never from validator.config.
    let err = tools
        .template_yaml(
            CHART,
            &[
                "-f".into(),
                SIDECAR_VALUES.into(),
                "--set".into(),
                "sidecar.validator.config.redis_url=redis://:p@redis:6379".into(),
            ],
        )
        .expect_err("redis_url in validator.config");
    assert!(err.contains("validator.config.redis_url is refused"), "{err}");
}

#[test]
fn mail_needs_smtp_and_a_real_front_end_unless_file_delivery_is_allowed() {
    let Some(tools) = tools() else { return };
    let key = generate_key();
    let with = |extra: &[&str]| {
        let mut args = dev_secrets(&key);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let err = tools.template_yaml(CHART, &with(&["--set", "secrets.smtpUrl.value="])).expect_err("no SMTP");
    assert!(err.contains("no SMTP: set secrets.smtpUrl") && err.contains("mail.allowFileDelivery"), "{err}");
    let err = tools
        .template_yaml(CHART, &with(&["--set", "config.mail.frontend_base_url="]))
        .expect_err("no front end");
    assert!(err.contains("config.mail.frontend_base_url is required"), "{err}");
    for loopback in ["http://localhost:3000", "http://127.0.0.1:8080/app", "http://[::1]:3000"] {
        let set = format!("config.mail.frontend_base_url={loopback}");
        let err = tools.template_yaml(CHART, &with(&["--set", &set])).expect_err(loopback);
        assert!(err.contains("is a loopback address"), "{loopback}: {err}");
    }

    // Development: file delivery, asked for by name, and then a local front end is fine.
    let args = with(&[
        "--set",
        "secrets.smtpUrl.value=",
        "--set",
        "mail.allowFileDelivery=true",
        "--set",
        "config.mail.frontend_base_url=http://localhost:3000",
    ]);
    let docs = tools.render(&args);
    let spec = &find(&docs, "Deployment", "portcullis")["spec"]["template"]["spec"];
    let pod = LocalPod::new(&docs, spec, container(spec, "containers", "portcullis"));
    assert!(pod.var("PORTCULLIS_MAIL__SMTP_URL").is_none());
    let effective = pod.config_check();
    assert!(effective["mail"].get("smtp_url").is_none(), "mail goes to files");
    assert_eq!(str_of(&effective, "mail.frontend_base_url"), "http://localhost:3000");
}

#[test]
fn the_termination_grace_period_covers_pre_stop_drain_and_the_shutdown_after_it() {
    let Some(tools) = tools() else { return };
    let key = generate_key();
    let after_drain = shutdown_seconds_after_drain();
    // preStop 5 s; shutdown_grace in any humantime/Go form; the grace period must exceed the sum.
    for (grace, seconds) in [("20s", 20), ("1m30s", 90), ("90000ms", 90), ("1m 5s", 65), ("1500ms", 2)] {
        let needed = 5 + seconds + after_drain;
        let render = |period: u64| {
            let mut args = dev_secrets(&key);
            args.extend([
                "--set-string".into(),
                format!("config.server.shutdown_grace={grace}"),
                "--set".into(),
                format!("terminationGracePeriodSeconds={period}"),
            ]);
            tools.template_yaml(CHART, &args)
        };
        let err = render(needed).expect_err(grace);
        assert!(
            err.contains(&format!("terminationGracePeriodSeconds ({needed}) must exceed"))
                && err.contains(&format!("= {needed}")),
            "{grace}: {err}"
        );
        render(needed + 1).unwrap_or_else(|e| panic!("{grace} with {}: {e}", needed + 1));
    }
    let mut args = dev_secrets(&key);
    args.extend(["--set-string".into(), "config.server.shutdown_grace=twenty seconds".into()]);
    let err = tools.template_yaml(CHART, &args).expect_err("not a duration");
    assert!(err.contains("config.server.shutdown_grace (twenty seconds) is not a duration"), "{err}");
}

#[test]
fn the_migration_job_takes_its_own_pod_settings() {
    let Some(tools) = tools() else { return };
    let key = generate_key();
    let mut args = dev_secrets(&key);
    for set in [
        "nodeSelector.kubernetes\\.io/os=linux",
        "tolerations[0].key=dedicated",
        "tolerations[0].operator=Exists",
        "imagePullSecrets[0].name=registry-credentials",
        "migration.podAnnotations.sidecar\\.istio\\.io/inject=false",
        "migration.podLabels.example\\.com/team=identity",
        "migration.extraEnv[0].name=RUST_LOG",
        "migration.extraEnv[0].value=info",
        "migration.extraVolumes[0].name=db-ca",
        "migration.extraVolumes[0].secret.secretName=db-ca",
        "migration.extraVolumeMounts[0].name=db-ca",
        "migration.extraVolumeMounts[0].mountPath=/etc/db-ca",
        "migration.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool",
        "migration.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=In",
        "migration.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values[0]=batch",
    ] {
        args.extend(["--set".into(), set.into()]);
    }
    let docs = tools.render(&args);
    let job = find(&docs, "Job", "portcullis-migrate");
    assert!(
        job["spec"]["activeDeadlineSeconds"].as_u64().unwrap() < 300,
        "the Job must give up before Helm's default 5m --timeout"
    );
    let template = &job["spec"]["template"];
    assert_eq!(template["metadata"]["annotations"]["sidecar.istio.io/inject"], "false");
    assert_eq!(template["metadata"]["labels"]["example.com/team"], "identity");
    assert_eq!(template["metadata"]["labels"]["app.kubernetes.io/component"], "migration");
    let spec = &template["spec"];
    // Inherited from the server while migration.* is null.
    assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(spec["tolerations"][0]["key"], "dedicated");
    assert_eq!(spec["imagePullSecrets"], json!([{"name": "registry-credentials"}]));
    assert_eq!(
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0]["values"],
        json!(["batch"])
    );
    let migrate = container(spec, "containers", "migrate");
    assert!(
        migrate["env"].as_array().unwrap().iter().any(|e| e["name"] == "RUST_LOG" && e["value"] == "info")
    );
    assert!(spec["volumes"].as_array().unwrap().iter().any(|v| v["secret"]["secretName"] == "db-ca"));
    assert!(migrate["volumeMounts"].as_array().unwrap().iter().any(|m| m["mountPath"] == "/etc/db-ca"));
    // The server's own extra volumes are not the Job's.
    let server_spec = &find(&docs, "Deployment", "portcullis")["spec"]["template"]["spec"];
    assert!(server_spec["volumes"].as_array().unwrap().iter().all(|v| v["name"] != "db-ca"));
    assert!(server_spec.get("affinity").is_none(), "migration.affinity is the Job's only");

    // {} / [] mean none, not the server's.
    args.extend([
        "--set-json".into(),
        "migration.nodeSelector={}".into(),
        "--set-json".into(),
        "migration.tolerations=[]".into(),
        "--set-json".into(),
        "migration.imagePullSecrets=[]".into(),
    ]);
    let docs = tools.render(&args);
    let spec = &find(&docs, "Job", "portcullis-migrate")["spec"]["template"]["spec"];
    for field in ["nodeSelector", "tolerations", "imagePullSecrets"] {
        assert!(spec.get(field).is_none(), "{field}: {spec}");
    }
}
