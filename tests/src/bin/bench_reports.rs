//! Page-view report latency over a large store (SPEC E5's speed goal): fills one org's SQLite store
//! with `--views` page views (default 10 million) spread over 90 days, through the store's own
//! commit (the path Ingest takes after enforcement: counters, unique-viewer entries, blocking-time
//! memory and the stored events), then starts the real collector-svc on that store and measures
//! page, space and global reports over real gRPC, one call at a time.
//!
//! The org: one instance, `--spaces` spaces of `--pages-per-space` pages, `--viewers` viewers
//! (pseudonyms as the collector stores them); page popularity is skewed (a few pages take most
//! views), viewers uniform, 85 % desktop and 15 % mobile web.
//!
//! cargo run --release -p sightline-tests --bin bench_reports -- [--views 10000000] [--calls 200]

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use collector_svc::store::{Batch, BatchOutcome, Row, View};
use prost::Message;
use sightline_proto::collector::v1 as pb;
use sightline_proto::common::v1::{self as common, Channel, SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::settings::Limits;
use sightline_tests::bench::{arg, percentile};
use sightline_tests::consent::{opt_in, policy};
use sightline_tests::{
    CollectorOptions, LinkerOptions, T0_MS, TestCollector, TestConsent, TestLinker, authed,
};

const DAY: i64 = 86_400_000;
const DAYS: i64 = 90;

/// A small, fast, seeded generator (xorshift64*), so every run stores the same views.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn page_view_row(id: u64, at: i64, space: u64, page: u64, viewer: u64, channel: Channel) -> Row {
    let page_id = format!("page-{page}");
    let space_id = format!("space-{space}");
    let viewer = format!("psn1_{viewer:016x}");
    let body = pb::Event {
        event_id: format!("v{id}"),
        occurred_at: Some(sightline_runtime::time::to_proto(at)),
        payload: Some(pb::event::Payload::PageView(pb::PageViewEvent {
            page_id: page_id.clone(),
            space_id: space_id.clone(),
            channel: channel as i32,
            viewer_id: viewer.clone(),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    Row {
        event_id: format!("v{id}"),
        kind: common::EventKind::PageView as i64,
        occurred_at: at,
        name: page_id.clone(),
        value: Some(1.0),
        subject: Some(viewer.clone()),
        body,
        view: Some(View {
            page_id,
            space_id,
            channel: channel as i64,
            viewer: Some(viewer),
        }),
    }
}

fn range(days: i64) -> Option<common::TimeRange> {
    Some(common::TimeRange {
        start: Some(sightline_runtime::time::to_proto(T0_MS - days * DAY)),
        end: Some(sightline_runtime::time::to_proto(T0_MS)),
    })
}

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{name:<28} calls {:>4}  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or_default()
    );
}

#[tokio::main]
async fn main() {
    let views = arg("--views", 10_000_000);
    let calls = arg("--calls", 200) as usize;
    let spaces = arg("--spaces", 200);
    let pages_per_space = arg("--pages-per-space", 100);
    let viewers = arg("--viewers", 10_000);
    let pages = spaces * pages_per_space;

    let linker = TestLinker::start(LinkerOptions {
        quiet: true,
        ..Default::default()
    })
    .await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let org = linker.org("Acme").await;
    let instance = linker.link_instance(&org, "SRV-A").await;
    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Extended).await;
    consent
        .client()
        .await
        .update_tracking_settings(authed(
            &org.admin,
            consent_pb::UpdateTrackingSettingsRequest {
                org_id: org.id.clone(),
                settings: Some(consent_pb::TrackingSettings {
                    enabled_channels: vec![Channel::Desktop as i32, Channel::MobileWeb as i32],
                    blocking_time_ms: 30 * 60_000,
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap();
    let current = policy(&consent, &org, &instance.id).await;

    // Fill the org's store (the global location's SQLite file in the data directory).
    let url = sightline_runtime::storage::default_sqlite_url(linker.data_dir(), "collector-global");
    let store = collector_svc::store::open(&url, "global").await.unwrap();
    let revision = current.revision;
    let current_revision = move |_: &str, _: &str| Some(revision);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let started = Instant::now();
    let (mut stored, mut blocked) = (0u64, 0u64);
    let per_day = views / DAYS as u64;
    let mut id = 0u64;
    for day in 0..DAYS {
        let day_start = T0_MS - (DAYS - day) * DAY;
        // The day's views in time order, in batches as instances send them.
        let mut times: Vec<i64> = (0..per_day)
            .map(|_| day_start + rng.below(DAY as u64) as i64)
            .collect();
        times.sort_unstable();
        for chunk in times.chunks(1000) {
            let rows: Vec<Row> = chunk
                .iter()
                .map(|at| {
                    id += 1;
                    // Skewed popularity: u^3 puts most views on the first pages.
                    let page = ((rng.unit().powi(3)) * pages as f64) as u64;
                    let viewer = rng.below(viewers);
                    let channel = if rng.below(100) < 85 {
                        Channel::Desktop
                    } else {
                        Channel::MobileWeb
                    };
                    page_view_row(id, *at, page % spaces, page, viewer, channel)
                })
                .collect();
            let batch = Batch {
                org_id: org.id.clone(),
                instance_id: instance.id.clone(),
                location: "global".into(),
                consent_version: current.consent_version as i64,
                policy_revision: revision as i64,
                stored_at: T0_MS,
                blocking_time_ms: 30 * 60_000,
                rows,
            };
            match store.commit(&[batch], &current_revision).await.unwrap().remove(0) {
                BatchOutcome::Committed(outcomes) => {
                    for o in outcomes {
                        match o {
                            collector_svc::store::RowOutcome::Stored => stored += 1,
                            _ => blocked += 1,
                        }
                    }
                }
                BatchOutcome::Stale => panic!("stale"),
            }
        }
        if day % 10 == 9 {
            eprintln!(
                "filled {} days: {stored} views stored, {:.0} views/s",
                day + 1,
                stored as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let fill_s = started.elapsed().as_secs_f64();
    drop(store);
    let file_mb = std::fs::metadata(linker.data_dir().join("collector-global.db"))
        .map(|m| m.len() as f64 / 1e6)
        .unwrap_or_default();
    println!(
        "stored {stored} page views ({blocked} inside the blocking time) over {DAYS} days in {fill_s:.0} s; \
         {pages} pages in {spaces} spaces, {viewers} viewers; store file {file_mb:.0} MB"
    );

    let collector = TestCollector::start(&linker, &consent, CollectorOptions::default()).await;
    let mut client = collector.client().await;

    for days in [DAYS, 7] {
        let mut page_ms = Vec::with_capacity(calls);
        let mut space_ms = Vec::with_capacity(calls);
        let mut global_ms = Vec::with_capacity(calls);
        let mut checked = 0u64;
        for i in 0..calls {
            // Pages and spaces drawn as readers open them: popular ones more often.
            let page = ((rng.unit().powi(3)) * pages as f64) as u64;
            let t = Instant::now();
            let reply = client
                .get_page_report(authed(
                    &org.admin,
                    pb::GetPageReportRequest {
                        org_id: org.id.clone(),
                        page_id: format!("page-{page}"),
                        range: range(days),
                        instance_id: instance.id.clone(),
                    },
                ))
                .await
                .unwrap();
            page_ms.push(t.elapsed().as_secs_f64() * 1e3);
            checked += reply.into_inner().stats.map_or(0, |s| s.views);

            let t = Instant::now();
            client
                .get_space_report(authed(
                    &org.admin,
                    pb::GetSpaceReportRequest {
                        org_id: org.id.clone(),
                        space_id: format!("space-{}", page % spaces),
                        range: range(days),
                        instance_id: instance.id.clone(),
                        page_size: 10,
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
            space_ms.push(t.elapsed().as_secs_f64() * 1e3);

            if i < calls.min(50) {
                let t = Instant::now();
                let reply = client
                    .get_global_report(authed(
                        &org.admin,
                        pb::GetGlobalReportRequest {
                            org_id: org.id.clone(),
                            range: range(days),
                            page_size: 10,
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                global_ms.push(t.elapsed().as_secs_f64() * 1e3);
                if i == 0 {
                    let stats = reply.stats.unwrap_or_default();
                    println!(
                        "global report, {days} days: {} views, {} unique viewers (error {})",
                        stats.views, stats.unique_viewers, stats.unique_viewers_error
                    );
                }
            }
        }
        println!("{days}-day range (page views read back: {checked})");
        summary("  page report", page_ms);
        summary("  space report (top 10 pages)", space_ms);
        summary("  global report (top 10)", global_ms);
    }
}
