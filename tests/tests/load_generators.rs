//! Every load generator answers `--help` with its usage and does nothing else, and refuses an
//! argument it does not know (exit 2, naming it) before it starts any work.

use std::process::Command;

const GENERATORS: [(&str, &str); 7] = [
    ("bench_collect", env!("CARGO_BIN_EXE_bench_collect")),
    ("bench_companion", env!("CARGO_BIN_EXE_bench_companion")),
    ("bench_flood", env!("CARGO_BIN_EXE_bench_flood")),
    ("bench_insights", env!("CARGO_BIN_EXE_bench_insights")),
    ("bench_reports", env!("CARGO_BIN_EXE_bench_reports")),
    ("bench_validate", env!("CARGO_BIN_EXE_bench_validate")),
    ("bench_watch", env!("CARGO_BIN_EXE_bench_watch")),
];

#[test]
fn every_load_generator_answers_help_with_its_usage() {
    for (name, path) in GENERATORS {
        for help in ["--help", "-h"] {
            let out = Command::new(path).arg(help).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{name} {help}: {:?}", out.status);
            assert!(
                stdout.starts_with(&format!("usage: {name}")),
                "{name} {help} printed: {stdout}"
            );
            // The usage and nothing else: no benchmark ran.
            assert!(!stdout.contains("events/s") && !stdout.contains("rows/s"));
            assert!(out.stderr.is_empty(), "{name} {help} wrote to stderr");
        }
    }
}

#[test]
fn every_load_generator_refuses_an_unknown_argument_before_working() {
    for (name, path) in GENERATORS {
        let out = Command::new(path)
            .arg("--secnds")
            .arg("5")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains("unknown argument \"--secnds\"") && stderr.contains("usage:"),
            "{name}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{name} started working");
    }
    // A value left out is named too.
    let out = Command::new(env!("CARGO_BIN_EXE_bench_collect"))
        .args(["--target", "sqlite", "--seconds"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seconds needs a value"));
}

/// A run of the ingest generator leaves nothing behind in the temporary directory: its server
/// child's stores (hundreds of megabytes after a real run) go with the child, which is stopped by
/// closing its stdin and killed only if it does not stop (the leak filled a machine's disk).
#[test]
fn the_ingest_generator_leaves_no_store_behind() {
    let tmp = sightline_runtime::testing::private_tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bench_collect"))
        .args([
            "--target",
            "discard",
            "--seconds",
            "1",
            "--clients",
            "2",
            "--batch",
            "10",
        ])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("events/s"));
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
