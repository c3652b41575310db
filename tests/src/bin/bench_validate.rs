//! Load generator for ValidateCredential: starts linker-svc in-process (SQLite in a temp dir, or
//! PostgreSQL with `--postgres`), links an instance, then calls ValidateCredential from many concurrent
//! clients for a fixed time and prints throughput and latency percentiles.
//!
//! cargo run --release -p sightline-tests --bin bench_validate -- [--seconds 10] [--concurrency 64]
//!     [--connections 4] [--postgres]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use sightline_proto::common::v1::InstanceMetadata;
use sightline_proto::linker::v1 as pb;
use sightline_runtime::settings::Limits;
use sightline_tests::bench::{arg, flag, percentile};
use sightline_tests::{LinkerOptions, TestLinker, authed};

const USAGE: &str =
    "usage: bench_validate [--seconds N] [--concurrency N] [--connections N] [--postgres]
  ValidateCredential from --concurrency callers (default 64) over --connections channels
  (default 4) for --seconds (default 10), on SQLite or --postgres; throughput and latency.";

#[tokio::main]
async fn main() {
    sightline_tests::bench::command_line(
        USAGE,
        &[
            ("--seconds", true),
            ("--concurrency", true),
            ("--connections", true),
            ("--postgres", false),
        ],
    );
    let seconds = arg("--seconds", 10);
    let concurrency = arg("--concurrency", 64) as usize;
    let connections = arg("--connections", 4) as usize;
    let postgres = flag("--postgres");
    let database_url = sightline_runtime::testing::postgres_url_if(postgres).await;
    let mut linker = TestLinker::start(LinkerOptions {
        database_url,
        limits: Limits {
            rate_per_second: 10_000_000,
            rate_burst: 10_000_000,
            ..Limits::default()
        },
        tls: None,
        quiet: true,
        locations: Default::default(),
    })
    .await;
    let mut client = linker.linker().await;
    let op = linker.operator.expose();
    let org_id = client
        .create_org(authed(
            op,
            pb::CreateOrgRequest {
                name: "Bench".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .org
        .unwrap()
        .org_id;
    let key = client
        .create_link_key(authed(
            op,
            pb::CreateLinkKeyRequest {
                org_id,
                label: String::new(),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let credential = client
        .link_instance(authed(
            &key,
            pb::LinkInstanceRequest {
                metadata: Some(InstanceMetadata {
                    server_id: "BENCH-1".into(),
                    base_url: "https://bench.example".into(),
                    ..Default::default()
                }),
                app_links: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .credential;

    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(linker.channel().await);
    }
    let service = linker.service.expose().to_owned();
    // Warm up: prepared statements, connection pool.
    for _ in 0..200 {
        client
            .validate_credential(authed(
                &service,
                pb::ValidateCredentialRequest {
                    credential: credential.clone(),
                },
            ))
            .await
            .unwrap();
    }

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let mut client = pb::linker_service_client::LinkerServiceClient::new(
            channels[worker % connections].clone(),
        );
        let service = service.clone();
        let credential = credential.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies_us = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let reply = client
                    .validate_credential(authed(
                        &service,
                        pb::ValidateCredentialRequest {
                            credential: credential.clone(),
                        },
                    ))
                    .await;
                match reply {
                    Ok(_) => latencies_us.push(sent.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (latencies_us, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (latencies, e) = worker.await.unwrap();
        all.extend(latencies.into_iter().map(|us| us as f64 / 1_000.0));
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| percentile(&all, p);
    println!(
        "ValidateCredential ({}): {} calls in {:.1} s = {:.0} calls/s; errors {}; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} (concurrency {}, connections {})",
        if postgres { "PostgreSQL" } else { "SQLite" },
        all.len(),
        elapsed,
        all.len() as f64 / elapsed,
        errors,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
        concurrency,
        connections
    );
    linker.stop().await;
    sightline_tests::bench::drop_stores().await;
}
