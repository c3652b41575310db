//! The companion's command line without any service: what it refuses, and what it says when it is
//! not linked yet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn companion(home: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sightline-companion"));
    command.arg("--home").arg(home);
    command
}

fn private_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap()
}

#[test]
fn a_mistyped_link_key_fails_before_any_call_and_is_not_echoed() {
    let home = private_dir();
    // A real key's shape with one character changed: the checksum catches it. The linker URL
    // points nowhere: it is never called.
    let good = sightline_runtime::token::generate(sightline_runtime::token::TokenKind::LinkKey);
    let last = if good.ends_with('a') { 'b' } else { 'a' };
    let key = format!("{}{last}", &good[..good.len() - 1]);
    let out = companion(home.path())
        .args([
            "link",
            "--key-stdin",
            "--server-id",
            "S1",
            "--base-url",
            "https://x.example",
        ])
        .args(["--linker", "http://127.0.0.1:1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(key.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("that is not a link key: token checksum does not match"),
        "{stderr}"
    );
    assert!(!stderr.contains(&key), "{stderr}");
    assert!(!home.path().join("companion.vault").exists());
}

#[test]
fn an_unlinked_companion_says_so_and_will_not_run() {
    let home = private_dir();
    let status = companion(home.path()).arg("status").output().unwrap();
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("linked:       no"));
    let run = companion(home.path()).arg("run").output().unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("not linked yet"));
}

#[test]
fn a_home_others_can_read_is_refused() {
    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        home.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = companion(home.path()).arg("status").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("open to other users"));
}

#[test]
fn a_reader_that_goes_away_is_not_a_crash() {
    let home = private_dir();
    for _ in 0..20 {
        // The pipe's reading end is closed before the command writes (as `| head -1` does once it
        // has its line): the command still ends well, without a panic.
        let mut child = companion(home.path())
            .arg("status")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
