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
