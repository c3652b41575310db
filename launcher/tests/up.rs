//! `sightline up` as a user runs it: a real process that serves linker, audit, health and reflection,
//! writes the operator token with mode 0600 and never prints it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Up, grpcurl, start_up};

#[test]
fn up_serves_linker_audit_health_and_reflection_without_printing_the_token() {
    let data = sightline_runtime::testing::private_tempdir().unwrap();
    let Up {
        mut child,
        mut stdout,
        banner,
        linker: addr,
        consent,
    } = start_up(data.path(), &[]);
    let consent_listed = grpcurl(&["-plaintext", &consent, "list"]);
    assert!(
        consent_listed.contains("sightline.consent.v1.ConsentService"),
        "{consent_listed}"
    );

    let listed = grpcurl(&["-plaintext", &addr, "list"]);
    for service in [
        "sightline.linker.v1.LinkerService",
        "sightline.audit.v1.AuditService",
        "grpc.health.v1.Health",
    ] {
        assert!(listed.contains(service), "{listed}");
    }
    assert!(
        !listed.contains("sightline.consent.v1"),
        "only served services are advertised: {listed}"
    );
    let described = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "sightline.linker.v1.LinkerService.LinkInstance",
    ]);
    assert!(described.contains("LinkInstanceRequest"), "{described}");
    let message = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "sightline.linker.v1.LinkKeyInfo",
    ]);
    assert!(message.contains("expires_at"), "{message}");
    let health = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service":"sightline.linker.v1.LinkerService"}"#,
        &addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert!(health.contains("SERVING"), "{health}");

    let token_path = data.path().join("operator.token");
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_owned();
    assert!(token.starts_with("slo_"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(
        banner.contains(&token_path.display().to_string()),
        "{banner}"
    );
    assert!(banner.contains("grpcurl"), "{banner}");
    for name in ["linker", "consent", "collector", "insights"] {
        assert!(
            banner.contains(&format!("--{name} http://127.0.0.1:")),
            "the companion's first command names every endpoint: {banner}"
        );
    }
    assert!(
        banner.contains("sightline-companion --home ./companion link --key-file link.key"),
        "{banner}"
    );

    // The operator token works as printed in the first command.
    let org = grpcurl(&[
        "-plaintext",
        "-H",
        &format!("authorization: Bearer {token}"),
        "-d",
        r#"{"name":"Acme"}"#,
        &addr,
        "sightline.linker.v1.LinkerService/CreateOrg",
    ]);
    assert!(org.contains("orgId"), "{org}");

    // SIGTERM drains and exits cleanly; the token never reached stdout or stderr.
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    for output in [&banner, &rest, &stderr] {
        assert!(!output.contains(&token), "the operator token was printed");
    }
    assert!(stderr.contains("stopped"), "{stderr}");
}

#[test]
fn sigterm_with_stalled_connections_exits_within_the_drain_limit() {
    let data = sightline_runtime::testing::private_tempdir().unwrap();
    let mut up = start_up(
        data.path(),
        &[("SIGHTLINE_LIMITS__DRAIN_TIMEOUT_MS", "1000")],
    );
    // One connection that never sends the HTTP/2 preface, and one whose request body never comes.
    let _silent = std::net::TcpStream::connect(&up.linker).unwrap();
    let mut half = std::net::TcpStream::connect(&up.consent).unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    half.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    Command::new("kill")
        .arg(up.child.id().to_string())
        .status()
        .unwrap();
    loop {
        if let Some(status) = up.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        // The verdict is the log line below; this bound only catches a drain that never ends,
        // with room for a machine too busy to schedule the exit.
        assert!(
            asked.elapsed() < Duration::from_secs(60),
            "still running {:?} after SIGTERM with a 1 s drain limit",
            asked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut up.child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("drain limit reached"), "{stderr}");
    drop(up.stdout);
    assert!(!up.banner.is_empty());
}

#[cfg(unix)]
#[test]
fn under_umask_022_the_data_directory_is_0700_and_every_file_in_it_0600() {
    use std::os::unix::fs::PermissionsExt;
    let parent = sightline_runtime::testing::private_tempdir().unwrap();
    let data = parent.path().join("data");
    // `up` run from a shell with the common umask 022.
    let script = format!(
        "umask 022; exec {} up --data-dir {}",
        env!("CARGO_BIN_EXE_sightline"),
        data.display()
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .env("SIGHTLINE_LINKER__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_CONSENT__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_COLLECTOR__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_INSIGHTS__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_CONSOLE__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(sightline_runtime::testing::Reaped)
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("grpcurl ") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "up exited early");
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data directory");
    let files: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for expected in [
        "linker.db",
        "linker.db-wal",
        "consent.db",
        "operator.token",
        "service.token",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(expected)),
            "{expected} missing from {files:?}"
        );
    }
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    child.wait().unwrap();

    // A data directory others can read is refused, naming the fix.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_sightline"))
        .args(["up", "--data-dir"])
        .arg(&data)
        .env("SIGHTLINE_LINKER__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_CONSENT__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_COLLECTOR__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_INSIGHTS__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_CONSOLE__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("chmod 700"), "{stderr}");
}

/// A CA, a certificate for the services (localhost and 127.0.0.1) and one for a client, as PEM files.
fn pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL takes a leaf named like its issuer for a self-signed one.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Sightline test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    for (name, sans) in [
        (
            "server",
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        ),
        ("client", vec!["admin.acme.example".to_owned()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("sightline {name}"));
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
}

/// The TLS version a handshake with `addr` settles on when the client allows only `version`.
fn handshake(addr: &str, dir: &Path, version: &str) -> String {
    let probe = r#"
import socket, ssl, sys
addr, d, v = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(d + "/ca.pem")
ctx.load_cert_chain(d + "/client.pem", d + "/client.key")
ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, v)
ctx.set_alpn_protocols(["h2"])
host, port = addr.rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=5) as s:
    with ctx.wrap_socket(s, server_hostname="localhost") as t:
        print(t.version())
"#;
    let out = Command::new("python3")
        .args(["-c", probe, addr])
        .arg(dir)
        .arg(version)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn up_with_tls_on_works_end_to_end_over_tls_1_2_and_1_3_with_client_certificates() {
    let data = tempfile::tempdir().unwrap();
    let pki_dir = data.path().join("pki");
    std::fs::create_dir(&pki_dir).unwrap();
    pki(&pki_dir);
    let path = |f: &str| pki_dir.join(f).display().to_string();
    let env = [
        ("SIGHTLINE_TLS__CERT", path("server.pem")),
        ("SIGHTLINE_TLS__KEY", path("server.key")),
        ("SIGHTLINE_TLS__CLIENT_CA", path("ca.pem")),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let state = data.path().join("state");
    let mut up = start_up(&state, &env);
    assert!(!up.banner.contains("-plaintext"), "{}", up.banner);

    // Both services speak TLS 1.2 and 1.3 (and nothing older: see tests/tls.rs).
    for addr in [&up.linker, &up.consent] {
        assert_eq!(handshake(addr, &pki_dir, "TLSv1_2"), "TLSv1.2");
        assert_eq!(handshake(addr, &pki_dir, "TLSv1_3"), "TLSv1.3");
    }
    // An admin flow over TLS with a client certificate: the consent change needs consent-svc to
    // reach linker-svc over mTLS for the credential check and the audit entry.
    let token = std::fs::read_to_string(state.join("operator.token")).unwrap();
    let tls = |addr: &str, bearer: &str, method: &str, body: &str| {
        grpcurl(&[
            "-cacert",
            &path("ca.pem"),
            "-cert",
            &path("client.pem"),
            "-key",
            &path("client.key"),
            "-servername",
            "localhost",
            "-H",
            &format!("authorization: Bearer {}", bearer.trim()),
            "-d",
            body,
            addr,
            method,
        ])
    };
    let org: serde_json::Value = serde_json::from_str(&tls(
        &up.linker,
        &token,
        "sightline.linker.v1.LinkerService/CreateOrg",
        r#"{"name":"Acme"}"#,
    ))
    .unwrap();
    let org_id = org["org"]["orgId"].as_str().unwrap().to_owned();
    let admin: serde_json::Value = serde_json::from_str(&tls(
        &up.linker,
        &token,
        "sightline.linker.v1.LinkerService/CreateAdminToken",
        &format!(r#"{{"org_id":"{org_id}"}}"#),
    ))
    .unwrap();
    let admin = admin["secret"].as_str().unwrap().to_owned();
    let changed = tls(
        &up.consent,
        &admin,
        "sightline.consent.v1.ConsentService/UpdateConsent",
        &format!(
            r#"{{"org_id":"{org_id}","reason":"tls","settings":{{"usage_level":"USAGE_LEVEL_BASIC","sharing_level":"SHARING_LEVEL_BASIC"}}}}"#
        ),
    );
    assert!(changed.contains("\"version\": \"1\""), "{changed}");
    Command::new("kill")
        .arg(up.child.id().to_string())
        .status()
        .unwrap();
    assert!(up.child.wait().unwrap().success());
}

/// Every thread of a running stack (the async runtime's, SQLite's, the committers') is under the
/// `scheduling` setting: SCHED_BATCH (3) by default, SCHED_OTHER (0) when set to normal.
#[cfg(target_os = "linux")]
#[test]
fn every_thread_of_the_stack_runs_under_the_scheduling_setting() {
    for (env, expected) in [(None, 3), (Some("normal"), 0)] {
        let data = sightline_runtime::testing::private_tempdir().unwrap();
        let env: Vec<(&str, &str)> = env
            .map(|v| ("SIGHTLINE_SCHEDULING", v))
            .into_iter()
            .collect();
        let mut up = start_up(data.path(), &env);
        let threads = sightline_runtime::sched::thread_policies(up.child.id()).unwrap();
        up.child.kill().unwrap();
        up.child.wait().unwrap();
        assert!(
            threads
                .iter()
                .any(|(name, _)| name == sightline_runtime::storage::WRITER_THREAD),
            "SQLite's threads are running: {threads:?}"
        );
        let other: Vec<_> = threads.iter().filter(|(_, p)| *p != expected).collect();
        assert!(
            other.is_empty(),
            "{env:?}: not under policy {expected}: {other:?}"
        );
    }
}
