//! Load generator for collector-svc's ingest, and the baselines its speed goals are measured
//! against, all in one run on one machine:
//!
//! - `noop`: a tonic server that decodes IngestRequest and answers at once (the ceiling);
//! - `discard`: the real collector, enforcing and de-identifying, with a sink that discards;
//! - `sqlite` / `postgres`: the real collector, durable;
//! - `baseline-sqlite`: plain sqlx multi-row INSERTs of the same prebuilt rows, one transaction per
//!   1000 rows, into the same table (`--or-ignore`: `INSERT OR IGNORE`, as the collector's);
//! - `baseline-postgres`: COPY of the same rows, 1000 per COPY;
//! - `latency`: p50/p99 of one-event and of 1000-event unary Ingest at half the maximum load;
//! - `optout`: the opt-out fence under load (`--store sqlite|postgres`, 8 IngestStreams of `--batch`
//!   events): from UpdateConsent's reply to the last ack that said accepted, and to the first refusal.
//!
//! The server (no-op or collector, with the linker-svc and consent-svc it needs) runs in a child
//! process of its own, so its CPU time and peak RSS are read apart from the load generator's
//! (`/proc/<pid>/stat`, `/proc/<pid>/status`): throughput on this shared machine, and the server's
//! CPU per event, which is what it would sustain with the cores to itself.
//!
//! cargo run --release -p sightline-tests --bin bench_collect -- --target discard [--seconds 10]
//!     [--clients 8] [--batch 1000]

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use sightline_proto::collector::v1::collector_service_client::CollectorServiceClient;
use sightline_proto::collector::v1::collector_service_server::{
    CollectorService, CollectorServiceServer,
};
use sightline_proto::collector::v1::{self as pb};
use sightline_proto::common::v1::{MetricType, SharingLevel, UsageLevel};
use sightline_tests::bench::{arg, percentile};
use sightline_tests::collector::{Streams, opt_in_enforced};
use sightline_tests::consent::opt_in;
use sightline_tests::{CollectorOptions, T0_MS, TestCollector, authed};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const NAMES: [&str; 8] = [
    "jvm.cpu.load",
    "jvm.heap.used",
    "jvm.gc.time",
    "db.connection.latency",
    "http.request.latency",
    "index.size",
    "mail.queue.size",
    "cache.hit.ratio",
];

/// A batch of metric events as an instance sends them, with ids unique to (`round`, client).
fn batch(client: usize, round: u64, size: usize) -> Vec<pb::Event> {
    (0..size)
        .map(|i| pb::Event {
            event_id: format!("c{client}-r{round}-{i}"),
            // As instances send them: samples of the current hour, in time order.
            occurred_at: Some(sightline_runtime::time::to_proto(
                T0_MS - 30 * 60_000 + (round as i64 * 1_000 + i as i64) / 100,
            )),
            payload: Some(pb::event::Payload::Metric(pb::MetricEvent {
                name: NAMES[i % NAMES.len()].into(),
                r#type: MetricType::JmxMetric as i32,
                value: (i % 97) as f64 * 1.5,
                attributes: [("source".to_owned(), "jmx".to_owned())].into(),
                tags: [
                    ("pluginKey".to_owned(), "com.atlassian.jira".to_owned()),
                    ("node".to_owned(), format!("node-{}", i % 4)),
                ]
                .into(),
                unit: "ms".into(),
                periodic_sample: true,
                values: Default::default(),
            })),
        })
        .collect()
}

/// The ceiling: decodes the request and answers at once.
#[derive(Debug, Clone, Copy)]
struct Noop;

#[tonic::async_trait]
impl CollectorService for Noop {
    async fn ingest(
        &self,
        request: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let accepted = request.into_inner().events.len() as u32;
        Ok(Response::new(pb::IngestResponse {
            result: Some(pb::IngestResult {
                accepted,
                ..Default::default()
            }),
        }))
    }
    type IngestStreamStream = futures::stream::Empty<Result<pb::IngestStreamResponse, Status>>;
    async fn ingest_stream(
        &self,
        _: Request<tonic::Streaming<pb::IngestStreamRequest>>,
    ) -> Result<Response<Self::IngestStreamStream>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn preview_sample(
        &self,
        _: Request<pb::PreviewSampleRequest>,
    ) -> Result<Response<pb::PreviewSampleResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn get_view_count(
        &self,
        _: Request<pb::GetViewCountRequest>,
    ) -> Result<Response<pb::GetViewCountResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn get_page_report(
        &self,
        _: Request<pb::GetPageReportRequest>,
    ) -> Result<Response<pb::GetPageReportResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn get_space_report(
        &self,
        _: Request<pb::GetSpaceReportRequest>,
    ) -> Result<Response<pb::GetSpaceReportResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn get_global_report(
        &self,
        _: Request<pb::GetGlobalReportRequest>,
    ) -> Result<Response<pb::GetGlobalReportResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn query_metrics(
        &self,
        _: Request<pb::QueryMetricsRequest>,
    ) -> Result<Response<pb::QueryMetricsResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn erase_viewer(
        &self,
        _: Request<pb::EraseViewerRequest>,
    ) -> Result<Response<pb::EraseViewerResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn get_contributed_aggregates(
        &self,
        _: Request<pb::GetContributedAggregatesRequest>,
    ) -> Result<Response<pb::GetContributedAggregatesResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }
}

struct Target {
    addr: std::net::SocketAddr,
    credential: String,
    _keep: Vec<Box<dyn std::any::Any>>,
}

async fn collector(target: &str) -> Target {
    let database_url = sightline_runtime::testing::postgres_url_if(target == "postgres").await;
    let (limits, linker, consent) = sightline_tests::bench::unlimited_stack().await;
    let collector = TestCollector::start(
        &linker,
        &consent,
        CollectorOptions {
            database_url,
            limits,
            discard: target == "discard",
            // The service's own schedules, not the tests' fast ones.
            collection: sightline_runtime::settings::CollectionSettings::default(),
            consent_url: None,
        },
    )
    .await;
    let org = linker.org("Bench").await;
    let instance = linker.link_instance(&org, "BENCH-1").await;
    opt_in_enforced(&consent, &collector, &org, &instance).await;
    Target {
        addr: collector.addr,
        credential: instance.credential,
        _keep: vec![Box::new(collector), Box::new(consent), Box::new(linker)],
    }
}

async fn noop() -> Target {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                CollectorServiceServer::new(Noop).max_decoding_message_size(16 * 1024 * 1024),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Target {
        addr,
        credential: "none".into(),
        _keep: Vec::new(),
    }
}

/// The server in a child process, with the target it serves.
struct Child {
    process: sightline_tests::bench::Child,
    target: Target,
}

impl Child {
    fn spawn(target: &str) -> Self {
        let process = sightline_tests::bench::Child::spawn(target);
        let target = Target {
            addr: process.addr,
            credential: process.words.first().cloned().unwrap_or_default(),
            _keep: Vec::new(),
        };
        Self { process, target }
    }

    fn cpu_seconds(&self) -> f64 {
        self.process.cpu_seconds()
    }

    fn peak_rss_mib(&self) -> f64 {
        self.process.peak_rss_mib()
    }
}

/// Runs the server side until stdin closes.
async fn serve(target: &str) {
    let t = if target == "noop" {
        noop().await
    } else {
        collector(target).await
    };
    sightline_tests::bench::serve_until_stdin_closes(format!("{} {}", t.addr, t.credential)).await;
    drop(t);
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Closed loop: `clients` callers send batches for `seconds`; returns (events/s, sorted latencies ms).
async fn closed_loop(
    target: &Target,
    clients: usize,
    size: usize,
    seconds: u64,
) -> (f64, Vec<f64>) {
    let accepted = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = CollectorServiceClient::new(channel(target.addr).await)
            .max_encoding_message_size(16 * 1024 * 1024);
        let (credential, accepted) = (target.credential.clone(), accepted.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            let mut latencies = Vec::new();
            let mut round = 0;
            while Instant::now() < deadline {
                let events = batch(c, round, size);
                let started = Instant::now();
                let reply = client
                    .ingest(authed(&credential, pb::IngestRequest { events }))
                    .await;
                latencies.push(started.elapsed().as_secs_f64() * 1e3);
                match reply {
                    Ok(r) => {
                        accepted.fetch_add(
                            u64::from(r.into_inner().result.unwrap_or_default().accepted),
                            Ordering::Relaxed,
                        );
                    }
                    Err(status) => eprintln!("error: {status}"),
                }
                round += 1;
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    (accepted.load(Ordering::Relaxed) as f64 / elapsed, latencies)
}

/// Open loop at `rate` calls/s of `size` events, spread over `clients`; sorted latencies in ms.
async fn open_loop(
    target: &Target,
    clients: usize,
    size: usize,
    rate: f64,
    seconds: u64,
) -> Vec<f64> {
    let per_client = Duration::from_secs_f64(clients as f64 / rate);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = CollectorServiceClient::new(channel(target.addr).await)
            .max_encoding_message_size(16 * 1024 * 1024);
        let credential = target.credential.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(per_client);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = tokio::task::JoinSet::new();
            let mut round = 1_000_000;
            while Instant::now() < deadline {
                ticks.tick().await;
                let mut client = client.clone();
                let credential = credential.clone();
                let events = batch(c, round, size);
                round += 1;
                inflight.spawn(async move {
                    let started = Instant::now();
                    let reply = client
                        .ingest(authed(&credential, pb::IngestRequest { events }))
                        .await;
                    if let Err(status) = reply {
                        eprintln!("error: {status}");
                    }
                    started.elapsed().as_secs_f64() * 1e3
                });
            }
            let mut latencies = Vec::new();
            while let Some(done) = inflight.join_next().await {
                latencies.push(done.unwrap());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// The rows the collector stores for `batch(…)` under BASIC (metrics pass enforcement unchanged).
fn rows(count: usize) -> Vec<(String, i64, String, f64, Vec<u8>)> {
    let mut rows = Vec::with_capacity(count);
    let mut round = 0;
    while rows.len() < count {
        for event in batch(0, round, 1_000) {
            let occurred = sightline_runtime::time::from_proto(event.occurred_at.as_ref().unwrap());
            let Some(pb::event::Payload::Metric(m)) = &event.payload else {
                unreachable!()
            };
            let (name, value) = (m.name.clone(), m.value);
            rows.push((
                event.event_id.clone(),
                occurred,
                name,
                value,
                event.encode_to_vec(),
            ));
        }
        round += 1;
    }
    rows.truncate(count);
    rows
}

const ORG: &str = "0190a000-0000-7000-8000-000000000001";
const INSTANCE: &str = "0190a000-0000-7000-8000-0000000000a1";

/// `or_ignore`: `INSERT OR IGNORE`, as the collector inserts (SQLite then keeps no statement journal).
async fn baseline_sqlite(count: usize, or_ignore: bool) -> f64 {
    let dir = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let url = sightline_runtime::storage::default_sqlite_url(dir.path(), "baseline");
    let sightline_runtime::storage::Database::Sqlite(pool) =
        sightline_runtime::storage::connect(&url, collector_svc::store::MIGRATIONS)
            .await
            .unwrap()
    else {
        unreachable!()
    };
    let rows = rows(count);
    let started = Instant::now();
    for chunk in rows.chunks(1_000) {
        let mut tx = pool.begin().await.unwrap();
        for part in chunk.chunks(200) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(if or_ignore {
                "INSERT OR IGNORE INTO events (instance_id, event_id, org_id, location, kind, occurred_at, stored_at, name, value, subject, consent_version, policy_revision, body) "
            } else {
                "INSERT INTO events (instance_id, event_id, org_id, location, kind, occurred_at, stored_at, name, value, subject, consent_version, policy_revision, body) "
            });
            q.push_values(part, |mut b, (id, at, name, value, body)| {
                b.push_bind(INSTANCE)
                    .push_bind(id)
                    .push_bind(ORG)
                    .push_bind("global")
                    .push_bind(2i64)
                    .push_bind(*at)
                    .push_bind(T0_MS)
                    .push_bind(name)
                    .push_bind(*value)
                    .push_bind(None::<String>)
                    .push_bind(1i64)
                    .push_bind(1i64)
                    .push_bind(body.as_slice());
            });
            q.build().execute(&mut *tx).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

async fn baseline_postgres(count: usize) -> f64 {
    let url = sightline_runtime::testing::fresh_postgres_url()
        .await
        .unwrap();
    let sightline_runtime::storage::Database::Postgres(pool) =
        sightline_runtime::storage::connect(&url, collector_svc::store::MIGRATIONS)
            .await
            .unwrap()
    else {
        unreachable!()
    };
    let rows = rows(count);
    let started = Instant::now();
    for chunk in rows.chunks(1_000) {
        let mut text = String::with_capacity(chunk.len() * 400);
        for (id, at, name, value, body) in chunk {
            text.push_str(&format!(
                "{INSTANCE}\t{id}\t{ORG}\tglobal\t2\t{at}\t{T0_MS}\t{name}\t{value}\t\\N\t1\t1\t\\\\x{}\n",
                hex::encode(body)
            ));
        }
        let mut conn = pool.acquire().await.unwrap();
        let mut copy = conn
            .copy_in_raw("COPY events (instance_id, event_id, org_id, location, kind, occurred_at, stored_at, name, value, subject, consent_version, policy_revision, body) FROM STDIN")
            .await
            .unwrap();
        copy.send(text.as_bytes()).await.unwrap();
        copy.finish().await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// Throughput with the server's CPU per event and what that makes per server core.
fn measured(label: &str, child: &Child, rate: f64, latencies: &[f64], cpu: f64, events: f64) {
    report(label, rate, latencies);
    println!(
        "{label}: server CPU {:.2} µs/event → {:.0} events per server CPU-second; server peak RSS {:.0} MiB",
        cpu / events * 1e6,
        events / cpu,
        child.peak_rss_mib()
    );
}

fn report(label: &str, rate: f64, latencies: &[f64]) {
    if latencies.is_empty() {
        println!("{label}: {rate:.0} events/s");
    } else {
        println!(
            "{label}: {rate:.0} events/s  calls {}  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            latencies.len(),
            percentile(latencies, 0.5),
            percentile(latencies, 0.99),
            latencies[latencies.len() - 1]
        );
    }
}

/// The opt-out fence under load: eight IngestStreams of `batch`-event batches commit back to back on
/// `store` (sqlite or postgres); the org opts out; each stream goes on until it is refused. Per
/// change, two gaps from UpdateConsent's reply: to the last ack that still said *accepted* (0 when
/// every accepted ack came before the reply) and to the first refusal.
async fn optout(store: &str, changes: usize, batch: usize) {
    let url = async || sightline_runtime::testing::postgres_url_if(store == "postgres").await;
    let (limits, linker, consent) = sightline_tests::bench::unlimited_stack_on(url().await).await;
    let database_url = url().await;
    let collector = TestCollector::start(
        &linker,
        &consent,
        CollectorOptions {
            database_url,
            limits,
            collection: sightline_runtime::settings::CollectionSettings::default(),
            ..CollectorOptions::default()
        },
    )
    .await;
    let org = linker.org("Bench").await;
    let instance = linker.link_instance(&org, "BENCH-1").await;
    let (mut last_accepted, mut first_refused) = (Vec::new(), Vec::new());
    for change in 0..changes {
        opt_in_enforced(&consent, &collector, &org, &instance).await;
        let streams = Streams::start(&collector, &instance, 8, batch, &format!("c{change}")).await;
        streams.until_accepting(2).await;
        opt_in(&consent, &org, UsageLevel::Disabled, SharingLevel::Basic).await;
        let replied = Instant::now();
        let acks = streams.until_refused().await;
        // The opt-out's purge (and, on SQLite, the VACUUM that makes it final) runs now, so the
        // next sample measures the fence, not this purge holding the store.
        collector.maintenance.apply_purges().await;
        let ms = |at: Instant| at.saturating_duration_since(replied).as_secs_f64() * 1e3;
        last_accepted.push(
            acks.iter()
                .filter(|(_, accepted)| *accepted)
                .map(|(at, _)| ms(*at))
                .fold(0.0, f64::max),
        );
        first_refused.push(
            acks.iter()
                .filter(|(_, accepted)| !accepted)
                .map(|(at, _)| ms(*at))
                .fold(f64::INFINITY, f64::min),
        );
    }
    for (what, gaps) in [
        ("last accepted ack", &mut last_accepted),
        ("first refusal", &mut first_refused),
    ] {
        gaps.sort_by(f64::total_cmp);
        println!(
            "optout {store}, 8 streams x {batch} events, {changes} changes: reply to {what}: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  over 100 ms: {}",
            percentile(gaps, 0.5),
            percentile(gaps, 0.9),
            percentile(gaps, 0.99),
            gaps[gaps.len() - 1],
            gaps.iter().filter(|g| **g > 100.0).count()
        );
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target = args
        .iter()
        .position(|a| a == "--target")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "discard".into());
    let seconds = arg("--seconds", 10);
    let clients = arg("--clients", 8) as usize;
    let size = arg("--batch", 1_000) as usize;
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        serve(&args[i + 1]).await;
        return;
    }
    match target.as_str() {
        "noop" | "discard" | "sqlite" | "postgres" => {
            let child = Child::spawn(&target);
            closed_loop(&child.target, clients, size, 2).await;
            let cpu = child.cpu_seconds();
            let started = Instant::now();
            let (rate, latencies) = closed_loop(&child.target, clients, size, seconds).await;
            let events = rate * started.elapsed().as_secs_f64();
            let cpu = child.cpu_seconds() - cpu;
            measured(&target, &child, rate, &latencies, cpu, events);
        }
        "baseline-sqlite" => println!(
            "baseline-sqlite: {:.0} rows/s",
            baseline_sqlite(
                arg("--rows", 500_000) as usize,
                args.iter().any(|a| a == "--or-ignore")
            )
            .await
        ),
        "baseline-postgres" => println!(
            "baseline-postgres: {:.0} rows/s",
            baseline_postgres(arg("--rows", 500_000) as usize).await
        ),
        "latency" => {
            let child = Child::spawn("sqlite");
            for size in [1usize, 1_000] {
                let clients = if size == 1 { 32 } else { clients };
                let (max, _) = closed_loop(&child.target, clients, size, seconds).await;
                let calls_per_second = max / size as f64 / 2.0;
                let latencies =
                    open_loop(&child.target, clients, size, calls_per_second, seconds).await;
                report(
                    &format!(
                        "batch {size}: max {max:.0} events/s; at half ({calls_per_second:.0} calls/s)"
                    ),
                    calls_per_second * size as f64,
                    &latencies,
                );
            }
            println!("server peak RSS: {:.0} MiB", child.peak_rss_mib());
        }
        "optout" => {
            let store = args
                .iter()
                .position(|a| a == "--store")
                .and_then(|i| args.get(i + 1))
                .map_or("sqlite", String::as_str);
            optout(
                store,
                arg("--changes", 50) as usize,
                arg("--batch", 100) as usize,
            )
            .await;
        }
        other => panic!("unknown target {other}"),
    }
}
