//! docker-compose.yml without a Docker engine: `docker-compose config` (Debian's docker-compose)
//! validates the file and its TLS overlay, then every service's command runs as the image would run
//! it — the Dockerfile's entrypoint, the compose environment, its health check — against the local
//! PostgreSQL, only host names, ports and paths mapped to this machine. The companion service's own
//! command then links and runs against that stack (over TLS with the overlay).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sightline_proto::common::v1::{SharingLevel, UsageLevel};
use sightline_tests::{admin, binary, workspace_root};

const SERVICES: [&str; 4] = ["linker", "consent", "collector", "insights"];

fn private_dir() -> tempfile::TempDir {
    sightline_runtime::testing::private_tempdir().unwrap()
}

/// `docker-compose -f … config`, as JSON: with no .env and no SIGHTLINE_ variable set, as on a
/// machine where nothing was run before.
fn compose_config(files: &[&str]) -> Value {
    assert!(
        !workspace_root().join(".env").exists(),
        "the stack starts without a .env"
    );
    let mut command = Command::new("docker-compose");
    for file in files {
        command.arg("-f").arg(file);
    }
    let out = command
        .arg("config")
        .current_dir(workspace_root())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("docker-compose is required (Debian's docker-compose package; ./scripts/test installs it)");
    assert!(
        out.status.success(),
        "docker-compose config refused {files:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Debian's docker-compose runs on the system Python, which has PyYAML.
    let mut python = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    python.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let json = python.wait_with_output().unwrap();
    assert!(json.status.success());
    serde_json::from_slice(&json.stdout).unwrap()
}

fn env_of(service: &Value) -> BTreeMap<String, String> {
    let Some(environment) = service["environment"].as_object() else {
        return BTreeMap::new();
    };
    environment
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// Certificates for the TLS overlay: one CA, and per service a certificate naming 127.0.0.1.
fn tls_dir() -> tempfile::TempDir {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = private_dir();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
    for name in SERVICES.into_iter().chain(["console"]) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(
            dir.path().join(format!("{name}-key.pem")),
            key.serialize_pem(),
        )
        .unwrap();
    }
    dir
}

/// The compose stack mapped onto this machine.
struct Mapped {
    listen: HashMap<String, SocketAddr>,
    tls: Option<PathBuf>,
    /// The `shared` volume (the service token `init` makes).
    shared: PathBuf,
}

impl Mapped {
    /// A compose value with service host names, container paths and databases made local.
    fn value(&self, value: &str) -> String {
        let mut value = value.to_owned();
        for (name, addr) in &self.listen {
            value = value.replace(
                &format!("{name}:{}", container_port(name)),
                &addr.to_string(),
            );
        }
        if let Some(dir) = &self.tls {
            value = value.replace("/etc/sightline/tls", dir.to_str().unwrap());
        }
        value.replace("/var/lib/sightline-shared", self.shared.to_str().unwrap())
    }
}

/// A service's twin name in the replicas overlay (`linker-2`) maps to its own (`linker`).
fn base(service: &str) -> &str {
    service.strip_suffix("-2").unwrap_or(service)
}

fn container_port(service: &str) -> u16 {
    match base(service) {
        "linker" => 50051,
        "consent" => 50052,
        "collector" => 50053,
        _ => 50054,
    }
}

async fn compose_stack_runs_here(files: &[&str], tls: bool) {
    let replicas = files.contains(&"docker-compose.replicas.yml");
    let dockerfile = std::fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("ENTRYPOINT [\"sightline\"]"));
    assert!(
        dockerfile.contains("USER sightline"),
        "the image runs as a non-root user"
    );
    let config = compose_config(files);
    let services = &config["services"];
    assert_eq!(
        services["postgres"]["healthcheck"]["test"][1]
            .as_str()
            .unwrap(),
        "pg_isready -U sightline -d linker"
    );
    let tls_dir = tls.then(tls_dir);
    // Each service listens on a port the system picks (a port chosen here and released could be
    // taken by a parallel test first); it says which in its log, and the services started after it
    // are given that address.
    let shared = private_dir();
    let mut mapped = Mapped {
        listen: HashMap::new(),
        tls: tls_dir.as_ref().map(|d| d.path().to_path_buf()),
        shared: shared.path().to_path_buf(),
    };
    // First the one-shot `init`, on the empty shared volume: it makes the service token, once.
    let init = &services["init"];
    assert_eq!(
        strings(&init["volumes"]),
        ["shared:/var/lib/sightline-shared:rw"]
    );
    let init_command: Vec<String> = strings(&init["command"])
        .iter()
        .map(|a| mapped.value(a))
        .collect();
    assert_eq!(init_command[0], "init");
    let mut made = Vec::new();
    for _ in 0..2 {
        let out = Command::new(binary("sightline"))
            .args(&init_command)
            .env_clear()
            .envs(env_of(init))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token_file = shared.path().join("service.token");
        let text = std::fs::read_to_string(&token_file).unwrap();
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(text.trim()),
            "never printed"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        made.push(text);
    }
    assert_eq!(made[0], made[1], "run again, init keeps the token it made");
    // Volumes by name: collector and insights share one (the pseudonymization secret).
    let mut volumes: HashMap<String, tempfile::TempDir> = HashMap::new();
    let mut children = Vec::new();
    let mut databases: HashMap<&str, String> = HashMap::new();
    // linker-svc follows consent-svc (SIGHTLINE_CONSENT__URL), whose address is known only once it
    // listens: as compose's linker retries until `consent` resolves, it is started again here,
    // on its address, once the others are up. With the replicas overlay, each second replica
    // starts after its twin, on the same database and data volume; until a replica's address is
    // known here its host name does not resolve, and the callers' balancers leave it out.
    let twins: &[&str] = if replicas {
        &["consent-2", "collector-2", "insights-2", "linker-2"]
    } else {
        &[]
    };
    let order: Vec<&str> = SERVICES
        .into_iter()
        .chain(twins.iter().copied())
        .chain(["linker"])
        .collect();
    for (round, &name) in order.iter().enumerate() {
        let again = round + 1 == order.len();
        if again {
            let mut first: tokio::process::Child = children.remove(0);
            first.kill().await.unwrap();
        }
        let (entry, name) = (name, base(name));
        let twin = entry != name;
        let service = &services[entry];
        let command = strings(&service["command"]);
        assert_eq!(command, [name], "{name} runs `sightline {name}`");
        assert!(
            strings(&service["volumes"])
                .contains(&"shared:/var/lib/sightline-shared:ro".to_owned()),
            "{name} reads the shared volume"
        );
        if twin {
            // After its twin, which made the data volume's secrets.
            assert_eq!(service["depends_on"][name]["condition"], "service_healthy");
        } else if name == "linker" {
            assert_eq!(
                service["depends_on"]["init"]["condition"],
                "service_completed_successfully"
            );
        }
        let mut env = env_of(service);
        let port = container_port(name);
        let upper = name.to_uppercase();
        assert_eq!(
            env[&format!("SIGHTLINE_{upper}__LISTEN")],
            format!("0.0.0.0:{port}")
        );
        // Published ports are the ones the service listens on ("127.0.0.1:P:P/tcp"); the second
        // replicas publish none (the host's ports are their twins').
        let published = if twin {
            assert!(service["ports"].is_null(), "{entry} publishes no port");
            Vec::new()
        } else {
            strings(&service["ports"])
        };
        let metrics_port: u16 = env[&format!("SIGHTLINE_{upper}__METRICS_LISTEN")]
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        for target in [port, metrics_port].into_iter().filter(|_| !twin) {
            assert!(
                published.contains(&format!("127.0.0.1:{target}:{target}/tcp")),
                "{name} publishes {target}: {published:?}"
            );
        }
        let listen = if again {
            mapped.listen[entry].to_string()
        } else {
            "127.0.0.1:0".into()
        };
        env.insert(format!("SIGHTLINE_{upper}__LISTEN"), listen);
        env.insert(
            format!("SIGHTLINE_{upper}__METRICS_LISTEN"),
            "127.0.0.1:0".into(),
        );
        let database = format!("SIGHTLINE_{upper}__DATABASE_URL");
        assert!(env[&database].starts_with("postgres://sightline:sightline@postgres:5432/"));
        if !databases.contains_key(name) {
            databases.insert(
                name,
                sightline_runtime::testing::fresh_postgres_url()
                    .await
                    .unwrap(),
            );
        }
        env.insert(database, databases[name].clone());
        let env: BTreeMap<String, String> = env
            .into_iter()
            .map(|(k, v)| (k, mapped.value(&v)))
            .collect();
        let volume = strings(&service["volumes"])
            .into_iter()
            .find_map(|v| v.strip_suffix(":/var/lib/sightline:rw").map(str::to_owned))
            .unwrap();
        let data = volumes
            .entry(volume)
            .or_insert_with(private_dir)
            .path()
            .to_owned();
        let mut command = tokio::process::Command::new(binary("sightline"));
        command
            .arg(name)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SIGHTLINE_DATA_DIR", &data)
            .envs(&env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        // Its JSON log says where it serves gRPC and metrics (SIGHTLINE_LOG__FORMAT=json).
        let (addr, metrics) = sightline_tests::listening_addrs(name, &mut child, true).await;
        mapped.listen.insert(entry.to_owned(), addr);
        let response = sightline_tests::scrape(metrics.unwrap()).await;
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "{name} metrics: {response}"
        );
        // Its health check, as compose runs it (inside the container, so against 127.0.0.1).
        let check = strings(&service["healthcheck"]["test"]);
        assert_eq!(check[..3], ["CMD", "sightline", "health"]);
        assert_eq!(check[3], format!("127.0.0.1:{port}"));
        let mut serving = false;
        for _ in 0..100 {
            let out = Command::new(binary("sightline"))
                .args(&check[2..3])
                .arg(mapped.listen[entry].to_string())
                .env_clear()
                .env("SIGHTLINE_DATA_DIR", &data)
                .envs(&env)
                .output()
                .unwrap();
            if out.status.success() {
                assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
                serving = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(serving, "{name}'s health check never passed");
        children.push(child);
    }

    // The console, on the services as compose names them, with the shared token.
    let console = &services["console"];
    assert_eq!(strings(&console["command"]), ["console"]);
    assert!(strings(&console["ports"]).contains(&"127.0.0.1:8080:8080/tcp".to_owned()));
    let mut env: BTreeMap<String, String> = env_of(console)
        .into_iter()
        .map(|(k, v)| (k, mapped.value(&v)))
        .collect();
    assert_eq!(env["SIGHTLINE_CONSOLE__LISTEN"], "0.0.0.0:8080");
    env.insert("SIGHTLINE_CONSOLE__LISTEN".into(), "127.0.0.1:0".into());
    let console_data = private_dir();
    let mut console_child = tokio::process::Command::new(binary("sightline"))
        .arg("console")
        .env_clear()
        .env("SIGHTLINE_DATA_DIR", console_data.path())
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (console_addr, _) =
        sightline_tests::listening_addrs("console", &mut console_child, false).await;
    let operator =
        std::fs::read_to_string(volumes["linker-data"].path().join("operator.token")).unwrap();
    // Signing in asks linker-svc with the shared service token: the token file works. Under TLS
    // the console serves HTTPS (a browser's TLS: no client certificate) and the cookie is Secure.
    let request = sightline_tests::form_post("/signin", &format!("token={}", operator.trim()));
    let answer = match &tls_dir {
        None => sightline_tests::http(console_addr, &request).await,
        Some(dir) => https(console_addr, &dir.path().join("ca.pem"), &request).await,
    };
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    assert!(answer.contains("location: /operator"), "{answer}");
    if tls {
        assert!(
            answer.contains("set-cookie: __Host-sightline_session=")
                && answer.contains("; HttpOnly; SameSite=Strict; Secure"),
            "{answer}"
        );
    }

    // The companion service's command, with the operator's org, key and consent in place.
    let scheme = if tls { "https" } else { "http" };
    let ca = tls_dir.as_ref().map(|d| d.path().join("ca.pem"));
    let url = |name: &str| format!("{scheme}://{}", mapped.listen[name]);
    let org = admin::org_with_link_key(
        admin::channel(&url("linker"), ca.as_deref()).await,
        operator.trim(),
        "Compose",
    )
    .await;
    admin::set_levels(
        admin::channel(&url("consent"), ca.as_deref()).await,
        &org,
        UsageLevel::Basic,
        SharingLevel::Basic,
    )
    .await;
    let (org_id, key) = (org.id.clone(), org.key.clone());

    let companion = &services["companion"];
    assert_eq!(strings(&companion["profiles"]), ["companion"]);
    assert_eq!(companion["pid"], "host", "it samples the compose host");
    assert_eq!(strings(&companion["entrypoint"]), ["/bin/sh", "-c"]);
    let secrets = private_dir();
    let key_file = secrets.path().join("link_key");
    sightline_runtime::secret_file::create_private(&key_file, key.as_bytes()).unwrap();
    let script = mapped
        .value(&strings(&companion["command"])[0])
        .replace("/run/secrets/link_key", key_file.to_str().unwrap());
    let home = private_dir();
    let mut env = env_of(companion);
    assert_eq!(
        env["SIGHTLINE_COMPANION_HOME"],
        "/var/lib/sightline-companion"
    );
    env.insert(
        "SIGHTLINE_COMPANION_HOME".into(),
        home.path().to_str().unwrap().into(),
    );
    // The image's PATH has both binaries; here they are in the target directory.
    let bin_dir = binary("sightline-companion").parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let service_command = || {
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(&script)
            .env_clear()
            .env("PATH", &path)
            .envs(env.iter().map(|(k, v)| (k.clone(), mapped.value(v))))
            .env("SIGHTLINE_COMPANION_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    };
    let mut child = service_command().spawn().unwrap();
    let status_of = || -> Value {
        let out = Command::new(binary("sightline-companion"))
            .args(["--home", home.path().to_str().unwrap(), "status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = status_of();
        // Linked, its policy read, and its first upload (the instance's metadata) acknowledged.
        if status["policy"]["usage_level"] == "BASIC"
            && status["uploaded_events_total"].as_u64() > Some(0)
        {
            assert_eq!(status["org_id"], Value::String(org_id.clone()));
            break;
        }
        if let Ok(Some(exit)) = child.try_wait() {
            let mut stderr = String::new();
            use tokio::io::AsyncReadExt;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .await
                .unwrap();
            panic!("the companion service's command exited ({exit}): {stderr}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the companion never linked, read its policy and uploaded: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let linked = std::fs::read_to_string(home.path().join("companion.json")).unwrap();
    assert!(
        linked.contains(&format!("{scheme}://127.0.0.1")),
        "{linked}"
    );
    child.kill().await.unwrap();
    // Restarted, the command does not link again (the key may be spent or expired by then).
    std::fs::remove_file(&key_file).unwrap();
    let mut again = service_command().spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        again.try_wait().unwrap().is_none(),
        "a linked companion runs without the key file"
    );
    again.kill().await.unwrap();
    console_child.kill().await.unwrap();
    for mut child in children {
        child.kill().await.unwrap();
    }
}

/// One HTTP/1.1 request over TLS (trusting `ca`, no client certificate, as a browser).
async fn https(addr: SocketAddr, ca: &std::path::Path, request: &str) -> String {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // The server may close without a TLS close_notify; what arrived is the answer.
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_validates_and_each_service_runs_with_its_compose_environment() {
    compose_stack_runs_here(&["docker-compose.yml"], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_overlay_validates_and_the_stack_and_companion_run_over_tls() {
    compose_stack_runs_here(&["docker-compose.yml", "docker-compose.tls.yml"], true).await;
}

#[tokio::test]
async fn the_replicas_overlay_runs_two_of_each_service_on_one_database_behind_balanced_urls() {
    let config = compose_config(&["docker-compose.yml", "docker-compose.replicas.yml"]);
    let services = &config["services"];
    // Every caller names both replicas of every service it calls.
    let both = |service: &str| {
        format!(
            "http://{service}:{port},http://{service}-2:{port}",
            port = container_port(service)
        )
    };
    for caller in SERVICES
        .into_iter()
        .chain(["console"])
        .chain(SERVICES.map(|s| match s {
            "linker" => "linker-2",
            "consent" => "consent-2",
            "collector" => "collector-2",
            _ => "insights-2",
        }))
    {
        let env = env_of(&services[caller]);
        for (key, value) in &env {
            if let Some(callee) = key
                .strip_prefix("SIGHTLINE_")
                .and_then(|k| k.strip_suffix("__URL"))
            {
                assert_eq!(value, &both(&callee.to_lowercase()), "{caller}: {key}");
            }
        }
        assert!(
            env.keys().any(|k| k.ends_with("__URL")),
            "{caller} names the services it calls"
        );
    }
    let companion = env_of(&services["companion"]);
    for service in SERVICES {
        assert_eq!(
            companion[&format!("SIGHTLINE_COMPANION_{}", service.to_uppercase())],
            both(service)
        );
    }
    // The twins share their twin's database and data volume.
    for service in SERVICES {
        let (one, two) = (
            env_of(&services[service]),
            env_of(&services[&format!("{service}-2")]),
        );
        let database = format!("SIGHTLINE_{}__DATABASE_URL", service.to_uppercase());
        assert_eq!(one[&database], two[&database]);
        assert_eq!(
            strings(&services[service]["volumes"]),
            strings(&services[&format!("{service}-2")]["volumes"])
        );
    }
    compose_stack_runs_here(
        &["docker-compose.yml", "docker-compose.replicas.yml"],
        false,
    )
    .await;
}
