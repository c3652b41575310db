//! Load generator for WatchPolicy: starts linker-svc and consent-svc in-process (SQLite, or
//! PostgreSQL with `--postgres`), opens W watchers on one org, then makes N consent changes one after
//! another and measures, for every watcher and change, the time from the start of the UpdateConsent
//! call to the watcher receiving the new policy.
//!
//! cargo run --release -p sightline-tests --bin bench_watch -- [--watchers 100] [--changes 200] [--postgres]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use sightline_proto::common::v1::{SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as pb;
use sightline_runtime::settings::Limits;
use sightline_tests::bench::{arg, flag, percentile};
use sightline_tests::{LinkerOptions, TestConsent, TestLinker, authed};
use tokio::sync::mpsc;

const USAGE: &str = "usage: bench_watch [--watchers N] [--changes N] [--postgres]
  --watchers WatchPolicy streams on one org (default 100), --changes consent changes one after
  another (default 200): the time from each UpdateConsent to each watcher seeing the policy.";

#[tokio::main]
async fn main() {
    sightline_tests::bench::command_line(
        USAGE,
        &[
            ("--watchers", true),
            ("--changes", true),
            ("--postgres", false),
        ],
    );
    let watchers = arg("--watchers", 100) as usize;
    let changes = arg("--changes", 200) as usize;
    let postgres = flag("--postgres");
    let url = |_: &str| async { sightline_runtime::testing::postgres_url_if(postgres).await };
    let limits = Limits {
        rate_per_second: 1_000_000,
        rate_burst: 1_000_000,
        ..Limits::default()
    };
    let linker = TestLinker::start(LinkerOptions {
        database_url: url("linker").await,
        limits,
        tls: None,
        quiet: true,
        locations: Default::default(),
    })
    .await;
    let consent = TestConsent::start(&linker, url("consent").await, limits).await;
    let org = linker.org("Bench").await;

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", consent.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (delivered_tx, mut delivered) = mpsc::unbounded_channel::<(u64, Instant)>();
    for _ in 0..watchers {
        let mut client = pb::consent_service_client::ConsentServiceClient::new(channel.clone());
        let mut stream = sightline_tests::consent::watch_org(&mut client, &org.admin, &org.id)
            .await
            .unwrap();
        stream.next().await.unwrap().unwrap();
        let tx = delivered_tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(update)) = stream.next().await {
                let version = update.policy.map_or(0, |p| p.consent_version);
                if tx.send((version, Instant::now())).is_err() {
                    break;
                }
            }
        });
    }

    let mut client = consent.client().await;
    let mut delivery_ms = Vec::with_capacity(watchers * changes);
    let mut call_ms = Vec::with_capacity(changes);
    for i in 0..changes {
        let usage = if i % 2 == 0 {
            UsageLevel::Disabled
        } else {
            UsageLevel::Advanced
        };
        let started = Instant::now();
        let version = client
            .update_consent(authed(
                &org.admin,
                pb::UpdateConsentRequest {
                    org_id: org.id.clone(),
                    settings: Some(pb::ConsentSettings {
                        usage_level: usage as i32,
                        sharing_level: SharingLevel::Basic as i32,
                        ..Default::default()
                    }),
                    reason: "bench".into(),
                    expected_version: 0,
                    request_id: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .consent
            .unwrap()
            .version;
        call_ms.push(started.elapsed().as_secs_f64() * 1_000.0);
        let mut seen = 0;
        while seen < watchers {
            let (v, at) = tokio::time::timeout(Duration::from_secs(10), delivered.recv())
                .await
                .expect("a watcher missed a change")
                .unwrap();
            assert_eq!(v, version, "changes arrive in order");
            delivery_ms.push(at.duration_since(started).as_secs_f64() * 1_000.0);
            seen += 1;
        }
    }
    delivery_ms.sort_by(f64::total_cmp);
    call_ms.sort_by(f64::total_cmp);
    println!(
        "WatchPolicy ({}): {} watchers x {} changes = {} deliveries, all received; change-to-delivery ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}; UpdateConsent call ms p50 {:.2} p99 {:.2}",
        if postgres { "PostgreSQL" } else { "SQLite" },
        watchers,
        changes,
        delivery_ms.len(),
        percentile(&delivery_ms, 0.50),
        percentile(&delivery_ms, 0.90),
        percentile(&delivery_ms, 0.99),
        percentile(&delivery_ms, 1.0),
        percentile(&call_ms, 0.50),
        percentile(&call_ms, 0.99),
    );
    sightline_tests::bench::drop_stores().await;
}
