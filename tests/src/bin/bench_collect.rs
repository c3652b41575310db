//! Load generator for collector-svc's ingest, and the references its speed goals are measured
//! against, all in one run on one machine (`--help` lists the targets):
//!
//! - `sqlite` / `postgres`: the real collector, durable, against the fastest known way to put the
//!   same rows into the same `events` table (the collector's own migrations, indexes and pragmas),
//!   in alternated pairs. The reference's rows are the collector's run's: every caller's events
//!   (ids of each caller, as they arrived), prepared before the clock, in that order and sorted by
//!   the table's key. For SQLite they are inserted by multi-row INSERTs in large transactions (the
//!   best of both orders, three sizes and `INSERT` / `INSERT OR IGNORE`); for PostgreSQL encoded
//!   before the clock and loaded by one COPY in one transaction, and by 4 parallel COPY sessions
//!   (the best of both orders). Each timed PostgreSQL run starts on a settled database (the
//!   schemas of earlier runs dropped, then a CHECKPOINT). It prints each, each pair's ratio against
//!   the best reference, and the median ratio;
//! - `noop`: a tonic server that decodes IngestRequest and answers at once (the ceiling);
//! - `discard`: the real collector, enforcing and de-identifying, with a sink that discards;
//! - `reference-sqlite` / `reference-postgres`: the references alone;
//! - `latency`: p50/p99 of one-event and of 1000-event unary Ingest at half the maximum load;
//! - `optout`: the opt-out fence under load (`--store sqlite|postgres`, 8 IngestStreams of `--batch`
//!   events): from UpdateConsent's reply to the last ack that said accepted, and to the first refusal.
//!
//! The server (no-op or collector, with the linker-svc and consent-svc it needs) runs in a child
//! process of its own, so its CPU time and peak RSS are read apart from the load generator's
//! (`/proc/<pid>/stat`, `/proc/<pid>/status`): throughput on this shared machine, and the server's
//! CPU per event, which is what it would sustain with the cores to itself.
//!
//! cargo run --release -p sightline-tests --bin bench_collect -- --target sqlite [--seconds 10]
//!     [--clients 8] [--batch 1000] [--pairs 3]

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sightline_runtime::sched::Scheduling;
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

/// Event `i` of a batch: its id (unique to client, round and `i`) and time (as instances send
/// them: samples of the current hour, in time order).
fn event_id(client: usize, round: u64, i: usize) -> String {
    format!("c{client}-r{round}-{i}")
}

fn occurred_at(round: u64, i: usize) -> Option<prost_types::Timestamp> {
    Some(sightline_runtime::time::to_proto(
        T0_MS - 30 * 60_000 + (round as i64 * 1_000 + i as i64) / 100,
    ))
}

/// A batch of metric events as an instance sends them, with ids unique to (`round`, client).
fn batch(client: usize, round: u64, size: usize) -> Vec<pb::Event> {
    (0..size)
        .map(|i| pb::Event {
            event_id: event_id(client, round, i),
            occurred_at: occurred_at(round, i),
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

/// The calls of [`batch`] as the wire carries them, built from each event's payload encoded once,
/// before any clock starts: per call only each event's id and time are encoded. The generator shares
/// this machine's two cores with the server; building and encoding a thousand events per call was
/// a fifth of a core taken from it. A call decodes to the same `batch(…)` (its maps' entries may
/// come in another order: prost encodes a map in its hash order).
struct Encoded {
    /// Per event of a batch, its payload (field 4 of Event) encoded.
    payloads: Vec<Vec<u8>>,
}

impl Encoded {
    fn new(size: usize) -> Self {
        let payloads = batch(0, 0, size)
            .into_iter()
            .map(|event| {
                pb::Event {
                    payload: event.payload,
                    ..Default::default()
                }
                .encode_to_vec()
            })
            .collect();
        Self { payloads }
    }

    /// IngestRequest { events: batch(client, round, size) }, encoded.
    fn call(&self, client: usize, round: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payloads.len() * (self.payloads[0].len() + 40));
        for (i, payload) in self.payloads.iter().enumerate() {
            let head = pb::Event {
                event_id: event_id(client, round, i),
                occurred_at: occurred_at(round, i),
                payload: None,
            };
            // events = 1, length-delimited: the id and time, then the payload (fields in order).
            out.push(0x0a);
            prost::encoding::encode_varint((head.encoded_len() + payload.len()) as u64, &mut out);
            head.encode(&mut out).unwrap();
            out.extend_from_slice(payload);
        }
        out
    }
}

/// Ingest with a request already encoded ([`Encoded`]), the reply decoded by prost.
#[derive(Debug, Clone, Copy, Default)]
struct RawIngest;

impl tonic::codec::Codec for RawIngest {
    type Encode = Vec<u8>;
    type Decode = pb::IngestResponse;
    type Encoder = RawIngest;
    type Decoder = tonic_prost::ProstDecoder<pb::IngestResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        RawIngest
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

impl tonic::codec::Encoder for RawIngest {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

/// One Ingest call of pre-encoded events.
async fn ingest_encoded(
    grpc: &mut tonic::client::Grpc<Channel>,
    credential: &str,
    request: Vec<u8>,
) -> Result<pb::IngestResponse, Status> {
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/sightline.collector.v1.CollectorService/Ingest",
    );
    Ok(grpc
        .unary(authed(credential, request), path, RawIngest)
        .await?
        .into_inner())
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
    async fn list_stored_events(
        &self,
        _: Request<pb::ListStoredEventsRequest>,
    ) -> Result<Response<pb::ListStoredEventsResponse>, Status> {
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
    // `postgres@URL`: a replica on a store another replica shares.
    let database_url = match target.split_once('@') {
        Some((_, url)) => Some(url.to_owned()),
        None => sightline_runtime::testing::postgres_url_if(target == "postgres").await,
    };
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
    sightline_tests::bench::drop_stores().await;
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// What one closed loop measured.
struct Load {
    /// Accepted events per second.
    rate: f64,
    /// Each call's latency in ms, sorted.
    latencies: Vec<f64>,
}

/// Closed loop: `clients` callers send batches for `seconds`. Each caller's rounds start at
/// `next_round`, which is advanced past every round this loop used: loads against one server (a
/// warm-up, then the measured run) never send an id twice. A repeated id is a duplicate, which the
/// collector refuses after trying to store it, so a measured run that repeated the warm-up's ids
/// counted a fraction of the work it did. Every event sent must be accepted, or the run is not
/// measuring what it says and stops.
async fn closed_loop(
    target: &Target,
    clients: usize,
    size: usize,
    seconds: u64,
    next_round: &mut u64,
) -> Load {
    closed_loop_over(
        std::slice::from_ref(target),
        clients,
        size,
        seconds,
        next_round,
    )
    .await
}

/// [`closed_loop`] with the callers spread over `targets` in turn (one store behind them all).
async fn closed_loop_over(
    targets: &[Target],
    clients: usize,
    size: usize,
    seconds: u64,
    next_round: &mut u64,
) -> Load {
    let accepted = Arc::new(AtomicU64::new(0));
    let encoded = Arc::new(Encoded::new(size));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let first_round = *next_round;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let target = &targets[c % targets.len()];
        let mut grpc = tonic::client::Grpc::new(channel(target.addr).await);
        let (credential, accepted) = (target.credential.clone(), accepted.clone());
        let encoded = encoded.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut round = first_round;
            while Instant::now() < deadline {
                let request = encoded.call(c, round);
                let started = Instant::now();
                let reply = ingest_encoded(&mut grpc, &credential, request).await;
                latencies.push(started.elapsed().as_secs_f64() * 1e3);
                match reply {
                    Ok(r) => {
                        accepted.fetch_add(
                            u64::from(r.result.unwrap_or_default().accepted),
                            Ordering::Relaxed,
                        );
                    }
                    Err(status) => eprintln!("error: {status}"),
                }
                round += 1;
            }
            (latencies, round)
        }));
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    for t in tasks {
        let (done, round) = t.await.unwrap();
        latencies.extend(done);
        *next_round = (*next_round).max(round);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let accepted = accepted.load(Ordering::Relaxed);
    assert_all_accepted(accepted, latencies.len(), size);
    Load {
        rate: accepted as f64 / elapsed,
        latencies,
    }
}

/// Open loop at `rate` calls/s of `size` events, spread over `clients`; sorted latencies in ms.
async fn open_loop(
    target: &Target,
    clients: usize,
    size: usize,
    rate: f64,
    seconds: u64,
    next_round: &mut u64,
) -> Vec<f64> {
    let first_round = *next_round;
    let per_client = Duration::from_secs_f64(clients as f64 / rate);
    // Every caller connected before the schedule starts, so no caller begins behind it (and
    // catches up in a burst).
    let mut callers = Vec::with_capacity(clients);
    for _ in 0..clients {
        callers.push(
            CollectorServiceClient::new(channel(target.addr).await)
                .max_encoding_message_size(16 * 1024 * 1024),
        );
    }
    let begin = tokio::time::Instant::now();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (c, client) in callers.into_iter().enumerate() {
        let credential = target.credential.clone();
        tasks.push(tokio::spawn(async move {
            // The callers take turns: caller c's calls go out c/clients of an interval after
            // caller 0's, so the calls arrive evenly spread at `rate`, not in bursts of `clients`.
            let mut ticks = tokio::time::interval_at(
                begin + per_client * c as u32 / clients as u32,
                per_client,
            );
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = tokio::task::JoinSet::new();
            let mut round = first_round;
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
                    let accepted = match reply {
                        Ok(r) => r.into_inner().result.unwrap_or_default().accepted,
                        Err(status) => {
                            eprintln!("error: {status}");
                            0
                        }
                    };
                    (started.elapsed().as_secs_f64() * 1e3, u64::from(accepted))
                });
            }
            let mut calls = Vec::new();
            while let Some(done) = inflight.join_next().await {
                calls.push(done.unwrap());
            }
            (calls, round)
        }));
    }
    let (mut latencies, mut accepted) = (Vec::new(), 0);
    for t in tasks {
        let (calls, round) = t.await.unwrap();
        for (latency, n) in calls {
            latencies.push(latency);
            accepted += n;
        }
        *next_round = (*next_round).max(round);
    }
    assert_all_accepted(accepted, latencies.len(), size);
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// Stops a load of `calls` calls of `size` events unless every event was accepted: a refused or
/// repeated event is work the server did that the load's figures would not count.
fn assert_all_accepted(accepted: u64, calls: usize, size: usize) {
    let sent = (calls * size) as u64;
    assert_eq!(
        accepted, sent,
        "{accepted} of {sent} events sent were accepted: the load measured work it did not count"
    );
}

/// One row as the collector stores it for an event of `batch(…)` under BASIC (metrics pass
/// enforcement unchanged).
#[derive(Clone)]
struct StoredRow {
    event_id: String,
    occurred_at: i64,
    name: String,
    value: f64,
    body: Vec<u8>,
}

/// The first `count` rows the collector stores under a closed loop of `clients` callers × `size`
/// events: each round, every caller's batch in turn (as they arrive; callers keep pace with each
/// other, each waiting for its answers), built before any clock starts. The same rows as the
/// collector's run, ids of every caller, not one caller's: eight ranges of keys cost the same SQLite
/// loop more than one does.
fn rows(count: usize, clients: usize, size: usize) -> Vec<StoredRow> {
    let mut rows = Vec::with_capacity(count);
    let mut round = 0;
    while rows.len() < count {
        for client in 0..clients.max(1) {
            for event in batch(client, round, size.max(1)) {
                let Some(pb::event::Payload::Metric(m)) = &event.payload else {
                    unreachable!()
                };
                rows.push(StoredRow {
                    event_id: event.event_id.clone(),
                    occurred_at: sightline_runtime::time::from_proto(
                        event.occurred_at.as_ref().unwrap(),
                    ),
                    name: m.name.clone(),
                    value: m.value,
                    body: event.encode_to_vec(),
                });
            }
        }
        round += 1;
    }
    rows.truncate(count);
    rows
}

/// The orders a loader that holds every row before it starts may put them in.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// As the callers sent them.
    Arrival,
    /// By the table's key (instance, event id, time): its B-tree filled from one end.
    Key,
}

impl Order {
    fn apply(self, rows: &[StoredRow]) -> std::borrow::Cow<'_, [StoredRow]> {
        match self {
            Order::Arrival => rows.into(),
            Order::Key => {
                let mut sorted = rows.to_vec();
                sorted.sort_by(|a, b| {
                    (a.event_id.as_str(), a.occurred_at).cmp(&(b.event_id.as_str(), b.occurred_at))
                });
                sorted.into()
            }
        }
    }
}

const ORG: &str = "0190a000-0000-7000-8000-000000000001";
const INSTANCE: &str = "0190a000-0000-7000-8000-0000000000a1";

const COLUMNS: &str = "instance_id, event_id, org_id, location, kind, occurred_at, stored_at, \
                       name, value, subject, consent_version, policy_revision, body";

/// The database at `url` with the collector's own migrations run.
async fn collector_store(url: &str) -> sightline_runtime::storage::Database {
    sightline_runtime::storage::connect(url, collector_svc::store::MIGRATIONS)
        .await
        .unwrap()
}

/// A fresh SQLite store with the collector's own migrations (the same table, the same indexes, the
/// same pragmas: WAL, and the same background checkpointer, which lives as long as the returned
/// database), and the directory that holds it.
async fn fresh_sqlite() -> (sightline_runtime::storage::SqliteDb, tempfile::TempDir) {
    let dir = sightline_runtime::testing::private_tempdir().unwrap();
    let url = sightline_runtime::storage::default_sqlite_url(dir.path(), "reference");
    let sightline_runtime::storage::Database::Sqlite(db) = collector_store(&url).await else {
        unreachable!()
    };
    (db, dir)
}

/// The SQLite reference: the prebuilt rows inserted into a fresh store's `events` table by
/// multi-row INSERTs of 200 rows (one prepared statement), `per_commit` rows per transaction;
/// `or_ignore`: `INSERT OR IGNORE`, as the collector inserts (SQLite then keeps no statement
/// journal). Its threads (the loop's, SQLite's and the checkpointer's) run under `scheduling`, as
/// the collector's run under the launcher's setting. Rows per second.
fn sqlite_reference(
    rows: &[StoredRow],
    per_commit: usize,
    or_ignore: bool,
    scheduling: Scheduling,
) -> f64 {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                sightline_runtime::sched::apply(scheduling).unwrap();
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(sqlite_reference_load(rows, per_commit, or_ignore))
            })
            .join()
            .unwrap()
    })
}

async fn sqlite_reference_load(rows: &[StoredRow], per_commit: usize, or_ignore: bool) -> f64 {
    use sqlx::Connection as _;
    let (db, _dir) = fresh_sqlite().await;
    // One connection for the whole load (its page cache stays warm), at SQLite's own
    // synchronous=FULL: each commit syncs the WAL inside SQLite (the collector's commits go
    // through the store's writer connection, which syncs it after SQLite returns).
    let mut conn = db.pool.acquire().await.unwrap();
    let verb = if or_ignore {
        "INSERT OR IGNORE"
    } else {
        "INSERT"
    };
    let started = Instant::now();
    for chunk in rows.chunks(per_commit) {
        let mut tx = conn.begin().await.unwrap();
        for part in chunk.chunks(200) {
            let mut q =
                sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!("{verb} INTO events ({COLUMNS}) "));
            q.push_values(part, |mut b, r| {
                b.push_bind(INSTANCE)
                    .push_bind(&r.event_id)
                    .push_bind(ORG)
                    .push_bind("global")
                    .push_bind(2i64)
                    .push_bind(r.occurred_at)
                    .push_bind(T0_MS)
                    .push_bind(&r.name)
                    .push_bind(r.value)
                    .push_bind(None::<String>)
                    .push_bind(1i64)
                    .push_bind(1i64)
                    .push_bind(r.body.as_slice());
            });
            q.build().execute(&mut *tx).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    rows.len() as f64 / started.elapsed().as_secs_f64()
}

/// The best SQLite reference: both orders of the rows, every transaction size, both INSERT forms
/// and both schedulings, the fastest of them.
fn best_sqlite_reference(rows: &[StoredRow]) -> (f64, String) {
    let mut best = (0.0, String::new());
    for order in [Order::Arrival, Order::Key] {
        let ordered = order.apply(rows);
        for per_commit in [10_000, 100_000, rows.len()] {
            for or_ignore in [false, true] {
                for scheduling in [Scheduling::Normal, Scheduling::Batch] {
                    let rate = sqlite_reference(&ordered, per_commit, or_ignore, scheduling);
                    let how = format!(
                        "{} {per_commit} rows per transaction, {order:?} order, {scheduling:?} \
                         scheduling",
                        if or_ignore {
                            "INSERT OR IGNORE"
                        } else {
                            "INSERT"
                        }
                    );
                    println!("  reference sqlite, {how}: {rate:.0} rows/s");
                    if rate > best.0 {
                        best = (rate, how);
                    }
                }
            }
        }
    }
    best
}

/// The rows as COPY's text format reads them, encoded before any clock starts (the body as
/// `\\x` hex), in pieces of about 1 MiB.
fn copy_text(rows: &[StoredRow]) -> Vec<Vec<u8>> {
    let mut pieces = vec![Vec::with_capacity(1 << 20)];
    for r in rows {
        let piece = pieces.last_mut().unwrap();
        use std::io::Write;
        writeln!(
            piece,
            "{INSTANCE}\t{}\t{ORG}\tglobal\t2\t{}\t{T0_MS}\t{}\t{}\t\\N\t1\t1\t\\\\x{}",
            r.event_id,
            r.occurred_at,
            r.name,
            r.value,
            hex::encode(&r.body)
        )
        .unwrap();
        if piece.len() >= 1 << 20 {
            pieces.push(Vec::with_capacity(1 << 20));
        }
    }
    pieces
}

/// One COPY session, one transaction: every piece of `text`.
async fn copy_all(pool: &sqlx::PgPool, text: &[Vec<u8>]) {
    let mut conn = pool.acquire().await.unwrap();
    let mut copy = conn
        .copy_in_raw(&format!("COPY events ({COLUMNS}) FROM STDIN"))
        .await
        .unwrap();
    for piece in text {
        copy.send(piece.as_slice()).await.unwrap();
    }
    copy.finish().await.unwrap();
}

/// Before each timed PostgreSQL run, the collector's and each reference's: the schemas this process
/// made for earlier runs are dropped, and a CHECKPOINT writes every dirty buffer out, so no run pays
/// for the writes of the one before it. Without it each pair's collector ran in the wake of the
/// last pair's four reference loads (about four million rows), whose pages PostgreSQL's background
/// checkpoint was still writing, while each reference followed one collector run.
async fn settle_postgres() {
    use sqlx::Connection as _;
    sightline_runtime::testing::drop_schemas_made_here()
        .await
        .unwrap();
    let mut conn = sqlx::PgConnection::connect(&sightline_runtime::testing::postgres_base_url())
        .await
        .unwrap();
    sqlx::query("CHECKPOINT").execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

/// The PostgreSQL references on fresh schemas with the collector's migrations: the rows in one
/// COPY (one transaction), and in `sessions` parallel COPY sessions of a share each. Rows per
/// second of each.
async fn postgres_references(rows: &[StoredRow], sessions: usize) -> (f64, f64) {
    let fresh = async || {
        settle_postgres().await;
        let url = sightline_runtime::testing::fresh_postgres_url()
            .await
            .unwrap();
        let sightline_runtime::storage::Database::Postgres(pool) = collector_store(&url).await
        else {
            unreachable!()
        };
        // The day's partition of events, as the collector makes it when its store opens.
        let today = T0_MS / sightline_runtime::time::DAY_MS;
        collector_svc::store::open(&url, "global")
            .await
            .unwrap()
            .prepare_days(today - 1, today + 3)
            .await
            .unwrap();
        pool
    };
    let whole = copy_text(rows);
    let pool = fresh().await;
    let started = Instant::now();
    copy_all(&pool, &whole).await;
    let one = rows.len() as f64 / started.elapsed().as_secs_f64();
    pool.close().await;

    let shares: Vec<Vec<Vec<u8>>> = rows
        .chunks(rows.len().div_ceil(sessions))
        .map(copy_text)
        .collect();
    let pool = fresh().await;
    // Every session connected before the clock starts.
    let warm: Vec<_> = futures::future::join_all((0..sessions).map(|_| pool.acquire())).await;
    drop(warm);
    let started = Instant::now();
    futures::future::join_all(shares.iter().map(|share| copy_all(&pool, share))).await;
    let parallel = rows.len() as f64 / started.elapsed().as_secs_f64();
    pool.close().await;
    (one, parallel)
}

/// The best PostgreSQL reference: both orders of the rows, each by one COPY and by 4 parallel
/// COPY sessions, the fastest of them.
async fn best_postgres_reference(rows: &[StoredRow]) -> (f64, String) {
    let mut best = (0.0, String::new());
    for order in [Order::Arrival, Order::Key] {
        let (one, parallel) = postgres_references(&order.apply(rows), 4).await;
        for (rate, how) in [(one, "one COPY"), (parallel, "4 parallel COPY")] {
            let how = format!("{how}, {order:?} order");
            println!("  reference postgres, {how}: {rate:.0} rows/s");
            if rate > best.0 {
                best = (rate, how);
            }
        }
    }
    best
}

/// The server `target` (the collector on a store, the discarding collector, or the no-op server) as
/// a child process: events per second of a closed loop of `clients` × `size` for `seconds` (after
/// two seconds of warm-up), and its CPU per event.
async fn collector_run(target: &str, clients: usize, size: usize, seconds: u64) -> (f64, f64) {
    if target == "postgres" {
        settle_postgres().await;
    }
    let child = Child::spawn(target);
    let mut next_round = 0;
    closed_loop(&child.target, clients, size, 2, &mut next_round).await;
    let cpu = child.cpu_seconds();
    let started = Instant::now();
    let Load { rate, latencies } =
        closed_loop(&child.target, clients, size, seconds, &mut next_round).await;
    let events = rate * started.elapsed().as_secs_f64();
    let cpu = child.cpu_seconds() - cpu;
    measured(
        &format!("  collector {target}"),
        &child,
        rate,
        &latencies,
        cpu,
        events,
    );
    (rate, cpu / events * 1e6)
}

/// `replicas` collectors on one fresh PostgreSQL store, each a child process with the linker-svc and
/// consent-svc it needs, the callers spread over them: events per second in all, and each
/// replica's server CPU per event.
async fn replicas_run(replicas: usize, clients: usize, size: usize, seconds: u64) {
    settle_postgres().await;
    let url = sightline_runtime::testing::fresh_postgres_url()
        .await
        .unwrap();
    let children: Vec<Child> = (0..replicas)
        .map(|_| Child::spawn(&format!("postgres@{url}")))
        .collect();
    let targets: Vec<Target> = children
        .iter()
        .map(|c| Target {
            addr: c.target.addr,
            credential: c.target.credential.clone(),
            _keep: Vec::new(),
        })
        .collect();
    let mut next_round = 0;
    closed_loop_over(&targets, clients, size, 2, &mut next_round).await;
    let cpu: Vec<f64> = children.iter().map(Child::cpu_seconds).collect();
    let started = Instant::now();
    let Load { rate, latencies } =
        closed_loop_over(&targets, clients, size, seconds, &mut next_round).await;
    let events = rate * started.elapsed().as_secs_f64();
    report(
        &format!("{replicas} collector replicas, postgres"),
        rate,
        &latencies,
    );
    for (n, (child, before)) in children.iter().zip(cpu).enumerate() {
        let used = child.cpu_seconds() - before;
        println!(
            "  replica {n}: {:.2} CPU-seconds, {:.2} µs per event of all; peak RSS {:.0} MiB",
            used,
            used / events * 1e6,
            child.peak_rss_mib()
        );
    }
}

/// Durable ingest against the fastest known way to put the same rows into the same table, in
/// `pairs` alternated pairs (collector, then reference), each on a fresh store.
async fn against_reference(store: &str, pairs: usize, clients: usize, size: usize, seconds: u64) {
    let mut ratios = Vec::new();
    for pair in 1..=pairs {
        println!("pair {pair} of {pairs}");
        let (collector, _) = collector_run(store, clients, size, seconds).await;
        // As many rows as the collector stored in its run (warm-up included), prepared before the
        // clock.
        let rows = rows(
            ((collector * (seconds + 2) as f64) as usize).max(100_000),
            clients,
            size,
        );
        let (reference, how) = if store == "postgres" {
            best_postgres_reference(&rows).await
        } else {
            best_sqlite_reference(&rows)
        };
        let ratio = collector / reference;
        println!(
            "  pair {pair}: collector {collector:.0} events/s, reference {reference:.0} rows/s \
             ({how}, {} rows): {ratio:.2} x",
            rows.len()
        );
        ratios.push(ratio);
    }
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{store}: collector / reference, median of {pairs} pairs: {:.2} x  (pairs: {})",
        sorted[sorted.len() / 2],
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
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

const USAGE: &str = "usage: bench_collect --target TARGET [options]
targets:
  sqlite | postgres   the durable collector against the reference on the same store, in
                      alternated pairs: collector, then the same rows (every caller's, as they
                      arrived and sorted by the table's key) loaded the fastest known way (SQLite:
                      multi-row INSERTs in large transactions, the best of both orders, three sizes
                      and both INSERT forms; PostgreSQL: one COPY, and 4 parallel COPY sessions,
                      rows encoded before the clock, both orders); prints each, each pair's ratio,
                      and the median
  noop                a server that decodes and answers at once (the ceiling)
  discard             the collector, enforcing, with a sink that stores nothing
  reference-sqlite | reference-postgres
                      the references alone, over --rows rows of --clients callers × --batch
  latency             p50/p99 of 1-event and 1000-event Ingest at half the maximum load (SQLite)
  optout              the opt-out fence under load (--store sqlite|postgres, --changes, --batch)
options:
  --seconds N   each collector run (default 10, after 2 s of warm-up)
  --clients N   closed-loop callers (default 8)
  --batch N     events per call (default 1000; 100 for optout)
  --pairs N     alternated pairs for sqlite|postgres (default 3; 0: the collector alone)
  --replicas N  postgres only: N collector replicas on one store, the callers spread over them
  --rows N      rows for reference-* (default 500000)
  --store S     optout's store (sqlite or postgres)
  --changes N   optout's consent changes (default 50)";

fn main() {
    // The server child runs its threads as the launcher does (the `scheduling` setting, batch
    // unless SIGHTLINE_SCHEDULING says otherwise, set before the runtime starts them). The load
    // generator's threads run under it too: they stand for clients on other machines, and a
    // generator thread that wakes on the server's core would preempt its writer as no remote
    // client can (4 alternated runs: 102,187 · 99,422 · 95,105 · 104,095 events/s against
    // 91,353 · 97,151 · 98,226 · 98,197 under normal). The references run under each scheduling,
    // in threads of their own, and keep the faster.
    sightline_runtime::sched::apply(Scheduling::configured(None)).unwrap();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    sightline_tests::bench::command_line(
        USAGE,
        &[
            ("--target", true),
            ("--seconds", true),
            ("--clients", true),
            ("--batch", true),
            ("--pairs", true),
            ("--replicas", true),
            ("--rows", true),
            ("--store", true),
            ("--changes", true),
        ],
    );
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(target) = value("--serve") {
        serve(&target).await;
        return;
    }
    let Some(target) = value("--target") else {
        eprintln!("--target is required\n{USAGE}");
        std::process::exit(2);
    };
    let seconds = arg("--seconds", 10);
    let clients = arg("--clients", 8) as usize;
    let size = arg("--batch", 1_000) as usize;
    match target.as_str() {
        "postgres" if arg("--replicas", 1) > 1 => {
            replicas_run(arg("--replicas", 1) as usize, clients, size, seconds).await;
        }
        "sqlite" | "postgres" => match arg("--pairs", 3) as usize {
            0 => {
                collector_run(&target, clients, size, seconds).await;
            }
            pairs => against_reference(&target, pairs, clients, size, seconds).await,
        },
        "noop" | "discard" => {
            collector_run(&target, clients, size, seconds).await;
        }
        "reference-sqlite" | "baseline-sqlite" => {
            let (rate, how) =
                best_sqlite_reference(&rows(arg("--rows", 500_000) as usize, clients, size));
            println!("reference sqlite: {rate:.0} rows/s ({how})");
        }
        "reference-postgres" | "baseline-postgres" => {
            let (rate, how) =
                best_postgres_reference(&rows(arg("--rows", 500_000) as usize, clients, size))
                    .await;
            println!("reference postgres: {rate:.0} rows/s ({how})");
        }
        "latency" => {
            let child = Child::spawn("sqlite");
            // One server for both sizes: every load's ids are new to it.
            let mut next_round = 0;
            for size in [1usize, 1_000] {
                let clients = if size == 1 { 32 } else { clients };
                let max = closed_loop(&child.target, clients, size, seconds, &mut next_round)
                    .await
                    .rate;
                let calls_per_second = max / size as f64 / 2.0;
                let latencies = open_loop(
                    &child.target,
                    clients,
                    size,
                    calls_per_second,
                    seconds,
                    &mut next_round,
                )
                .await;
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
            let store = value("--store").unwrap_or_else(|| "sqlite".into());
            optout(
                &store,
                arg("--changes", 50) as usize,
                arg("--batch", 100) as usize,
            )
            .await;
        }
        other => {
            eprintln!("unknown target {other:?}\n{USAGE}");
            std::process::exit(2);
        }
    }
    sightline_tests::bench::drop_stores().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The references load the rows the collector's run stores: every caller's ids, each round's
    /// batches in turn, not one caller's (eight ranges of keys cost SQLite more than one).
    #[test]
    fn reference_rows_are_every_callers_rows() {
        let rows = rows(2 * 3 * 10 + 5, 3, 10);
        let sent: Vec<String> = (0..3)
            .flat_map(|round| (0..3).flat_map(move |client| batch(client, round, 10)))
            .map(|event| event.event_id)
            .take(65)
            .collect();
        let ids: Vec<String> = rows.iter().map(|r| r.event_id.clone()).collect();
        assert_eq!(ids, sent);
        let by_key = Order::Key.apply(&rows);
        assert_eq!(by_key.len(), rows.len());
        assert!(
            by_key
                .windows(2)
                .all(|w| (&w[0].event_id, w[0].occurred_at) <= (&w[1].event_id, w[1].occurred_at))
        );
    }

    /// A warm-up and the measured run against one collector send ids it has not seen: every event
    /// of both is accepted (the closed loop stops on one that is not). Before, each loop started at
    /// round 0, and the measured run's first rounds were the warm-up's ids again: duplicates the
    /// collector tried to store and refused, uncounted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn successive_loads_on_one_collector_send_new_ids() {
        let target = collector("sqlite").await;
        let mut next_round = 0;
        closed_loop(&target, 2, 20, 1, &mut next_round).await;
        let warmed = next_round;
        assert!(warmed > 0);
        let load = closed_loop(&target, 2, 20, 1, &mut next_round).await;
        assert!(load.rate > 0.0);
        assert!(next_round > warmed);
        let latencies = open_loop(&target, 2, 20, 20.0, 1, &mut next_round).await;
        assert!(!latencies.is_empty());
        // The open loop answered every call without an error, on rounds of its own: the closed
        // loop after it still finds every id new.
        closed_loop(&target, 2, 20, 1, &mut next_round).await;
    }

    /// The generator's pre-encoded calls are the batches it would otherwise build and encode.
    #[test]
    fn encoded_calls_are_the_batches() {
        let encoded = Encoded::new(1_000);
        for (client, round) in [(0, 0), (3, 7), (7, 123_456)] {
            let call = pb::IngestRequest::decode(encoded.call(client, round).as_slice()).unwrap();
            assert_eq!(
                call.events,
                batch(client, round, 1_000),
                "client {client}, round {round}"
            );
        }
    }
}
