//! Load generator for the companion: how fast it spools the product's metrics while the collector
//! is away, and how fast it delivers the backlog when the collector is back, with its peak memory.
//!
//! 1. The stack (linker, consent, collector) runs in this process; the companion is the real
//!    `sightline-companion` binary, linked with a link key, its collector URL first pointing at a
//!    port where nothing listens.
//! 2. `--events` metrics (default 200,000) are dropped into its inbox as files of 10,000 lines;
//!    the time until the inbox is empty is the spool rate (every append synced).
//! 3. Its collector URL is pointed at the real collector and it is started again: the time until
//!    the spool is empty (every batch acknowledged as committed) is the upload rate.
//!
//! cargo build --release --bin sightline-companion
//! cargo run --release -p sightline-tests --bin bench_companion -- [--events 200000]
//!     [--shuffled-times] [--no-tags]

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sightline_proto::common::v1::{SharingLevel, UsageLevel};
use sightline_tests::bench::arg;
use sightline_tests::consent::opt_in;
use sightline_tests::{CollectorOptions, TestCollector, companion_binary, free_addr};

fn vm(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn spool_files(home: &Path) -> usize {
    sightline_companion::spool::usage(&home.join("analytics-logs")).1
}

/// The companion running; killed if the benchmark stops early.
fn run(home: &Path, upload_every_ms: &str) -> sightline_runtime::testing::Reaped {
    Command::new(companion_binary())
        .args([
            "--home",
            home.to_str().unwrap(),
            "run",
            "--sample-every-ms",
            "100",
        ])
        .args([
            "--upload-every-ms",
            upload_every_ms,
            "--max-backoff-ms",
            "200",
        ])
        .args(["--spool-max-bytes", &(1u64 << 30).to_string()])
        .env("SIGHTLINE_COMPANION_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(sightline_runtime::testing::Reaped)
        .unwrap()
}

const USAGE: &str = "usage: bench_companion [--events N] [--shuffled-times] [--no-tags]
  Spools N metrics (default 200000) through the real sightline-companion with the collector away,
  then delivers the backlog; prints both rates and the companion's peak memory.
  --shuffled-times  sample times cycle over 50 minutes instead of running in order
  --no-tags         samples without tags
  (build the companion first: cargo build --release --bin sightline-companion)";

#[tokio::main]
async fn main() {
    sightline_tests::bench::command_line(
        USAGE,
        &[
            ("--events", true),
            ("--shuffled-times", false),
            ("--no-tags", false),
        ],
    );
    let events = arg("--events", 200_000);
    let no_tags = sightline_tests::bench::flag("--no-tags");
    // Samples as a product writes them (in time order, 100 a second) or with times cycling over
    // 50 minutes (inserts land all over the collector's time index).
    let shuffled = sightline_tests::bench::flag("--shuffled-times");
    let (limits, linker, consent) = sightline_tests::bench::unlimited_stack().await;
    let collector = TestCollector::start(
        &linker,
        &consent,
        CollectorOptions {
            limits,
            // The service's own schedules, not the tests' fast ones.
            collection: sightline_runtime::settings::CollectionSettings::default(),
            ..CollectorOptions::default()
        },
    )
    .await;
    let org = linker.org("Bench").await;
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    let key = linker.create_link_key(&org).await.secret;

    let home = sightline_runtime::testing::private_tempdir().unwrap();
    let key_file = home.path().join("link.key");
    sightline_runtime::secret_file::create_private(&key_file, key.as_bytes()).unwrap();
    let nowhere = format!("http://{}", free_addr());
    let linked = Command::new(companion_binary())
        .args(["--home", home.path().to_str().unwrap(), "link"])
        .args(["--key-file", key_file.to_str().unwrap()])
        .args([
            "--server-id",
            "BENCH-1",
            "--base-url",
            "https://bench.example",
        ])
        .args(["--linker", &format!("http://{}", linker.addr)])
        .args(["--consent", &format!("http://{}", consent.addr)])
        .args(["--collector", &nowhere])
        .status()
        .unwrap();
    assert!(linked.success());

    // Phase 1: the collector is away; the inbox fills the spool.
    let inbox = home.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    // The services run on the tests' clock (T0): an hour before it, inside the event-id window.
    let at = (sightline_tests::T0_MS / 1000 - 3600) as u64;
    let per_file = 10_000;
    let files = events.div_ceil(per_file);
    for f in 0..files {
        let mut text = String::new();
        for i in 0..per_file.min(events - f * per_file) {
            let n = f * per_file + i;
            let tags = if no_tags {
                String::new()
            } else {
                format!(",\"tags\":{{\"node\":\"n{}\"}}", n % 4)
            };
            text.push_str(&format!(
                "{{\"name\":\"bench.value\",\"value\":{n},\"unit\":\"count\",\"at\":\"{}\"{tags}}}\n",
                prost_types::Timestamp { seconds: (at + if shuffled { n % 3000 } else { n / 100 }) as i64, nanos: 0 },
            ));
        }
        std::fs::write(inbox.join(format!("f{f:05}.jsonl")), text).unwrap();
    }
    let mut child = run(home.path(), "3600000");
    let started = Instant::now();
    while std::fs::read_dir(&inbox).unwrap().count() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let spooled_in = started.elapsed();
    let spool_rss = vm(child.id(), "VmHWM:");
    let spool_bytes: u64 = std::fs::read_dir(home.path().join("analytics-logs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    child.kill().unwrap();
    child.wait().unwrap();

    // Phase 2: the collector is back; the backlog goes.
    let state_path = home.path().join("companion.json");
    let state = std::fs::read_to_string(&state_path)
        .unwrap()
        .replace(&nowhere, &format!("http://{}", collector.addr));
    std::fs::write(&state_path, state).unwrap();
    let backlog = spool_files(home.path());
    let mut child = run(home.path(), "3600000");
    let started = Instant::now();
    let status_path = home.path().join("status.json");
    let counted = |field: &str| -> u64 {
        std::fs::read(&status_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v[field].as_u64())
            .unwrap_or(0)
    };
    while counted("uploaded_events_total") < events {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let uploaded_in = started.elapsed();
    let upload_rss = vm(child.id(), "VmHWM:");
    let accepted = counted("accepted_events_total");
    child.kill().unwrap();
    child.wait().unwrap();

    let per_second = |d: Duration| events as f64 / d.as_secs_f64();
    println!("companion, {events} events of the product's metrics (one per inbox line)");
    println!(
        "  spool (collector away): {:.2} s, {:.0} events/s, {:.1} MiB on disk ({:.0} bytes/event), peak RSS {:.1} MiB",
        spooled_in.as_secs_f64(),
        per_second(spooled_in),
        spool_bytes as f64 / (1 << 20) as f64,
        spool_bytes as f64 / events as f64,
        spool_rss
    );
    println!(
        "  backlog upload ({backlog} files, IngestStream, each acknowledged as committed, then deleted): {:.2} s, {:.0} events/s, {accepted} stored, peak RSS {:.1} MiB",
        uploaded_in.as_secs_f64(),
        per_second(uploaded_in),
        upload_rss
    );
    assert!(accepted >= events, "every event stored: {accepted}");
}
