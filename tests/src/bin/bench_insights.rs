//! Load generator for insights-svc's speed goals, over real gRPC:
//!
//! - `health`: GetHealth for an instance with 30 days of hourly rollups of 200 metrics (SQLite),
//!   the rollups made by collector-svc from ingested samples;
//! - `portfolio`: GetPortfolio of an org with 500 linked instances, each with a score and a
//!   readiness report, one page of 500;
//! - `bundle`: UploadSupportBundle of a 100 MiB zip (logs with personal data planted every few
//!   lines, and a metrics file), streamed in 1 MiB chunks; the server runs in a child process so
//!   its peak resident memory is read apart from the generator's.
//!
//! cargo run --release -p sightline-tests --bin bench_insights -- --target health [--calls 500]

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::time::Instant;

use sightline_proto::collector::v1 as collector_pb;
use sightline_proto::common::v1::{MetricType, SharingLevel, UsageLevel};
use sightline_proto::insights::v1 as pb;
use sightline_tests::bench::{Child, arg, percentile};
use sightline_tests::consent::{opt_in, policy};
use sightline_tests::{
    CollectorOptions, InsightsOptions, T0_MS, TestCollector, TestConsent, TestInsights,
    TestInstance, TestLinker, TestOrg, authed,
};

const HOUR: i64 = 3_600_000;

struct Stack {
    linker: TestLinker,
    consent: TestConsent,
    collector: TestCollector,
    insights: TestInsights,
    org: TestOrg,
}

async fn stack() -> Stack {
    let (limits, linker, consent) = sightline_tests::bench::unlimited_stack().await;
    let collector = TestCollector::start(
        &linker,
        &consent,
        CollectorOptions {
            limits,
            ..CollectorOptions::default()
        },
    )
    .await;
    let insights = TestInsights::start(
        &linker,
        &consent,
        &collector,
        InsightsOptions {
            limits,
            ..InsightsOptions::default()
        },
    )
    .await;
    let org = linker.org("Bench").await;
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    Stack {
        linker,
        consent,
        collector,
        insights,
        org,
    }
}

impl Stack {
    async fn settle(&self, instance: &TestInstance) {
        let revision = policy(&self.consent, &self.org, &instance.id)
            .await
            .revision;
        self.collector
            .wait_revision(&self.org.id, &instance.id, revision)
            .await;
        self.insights.wait_revision(&self.org.id, revision).await;
    }

    /// `hours` hourly samples of each metric, ending an hour before T0, then rolled up.
    async fn feed(&self, instance: &TestInstance, metrics: &[String], hours: i64) {
        let mut client = self.collector.client().await;
        let mut batch = Vec::with_capacity(1000);
        for h in 2..hours + 2 {
            for (m, name) in metrics.iter().enumerate() {
                batch.push(collector_pb::Event {
                    event_id: format!("{m}-{h}"),
                    occurred_at: Some(sightline_runtime::time::to_proto(T0_MS - h * HOUR + 60_000)),
                    payload: Some(collector_pb::event::Payload::Metric(
                        collector_pb::MetricEvent {
                            name: name.clone(),
                            r#type: MetricType::JmxMetric as i32,
                            value: 40.0 + ((m as i64 * 31 + h * 17) % 50) as f64,
                            unit: "percent".into(),
                            periodic_sample: true,
                            tags: [("node".to_owned(), "node-1".to_owned())].into(),
                            ..Default::default()
                        },
                    )),
                });
                if batch.len() == 1000 {
                    let events = std::mem::take(&mut batch);
                    let accepted = client
                        .ingest(authed(
                            &instance.credential,
                            collector_pb::IngestRequest { events },
                        ))
                        .await
                        .unwrap()
                        .into_inner()
                        .result
                        .unwrap()
                        .accepted;
                    assert_eq!(accepted, 1000);
                }
            }
        }
        if !batch.is_empty() {
            client
                .ingest(authed(
                    &instance.credential,
                    collector_pb::IngestRequest { events: batch },
                ))
                .await
                .unwrap();
        }
        self.collector.maintenance.roll_up().await;
    }
}

fn report(label: &str, mut latencies: Vec<f64>) {
    latencies.sort_by(f64::total_cmp);
    println!(
        "{label}: {} calls  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
}

async fn health(calls: usize) {
    let s = stack().await;
    let instance = s.linker.link_instance(&s.org, "BENCH-1").await;
    s.settle(&instance).await;
    // The rules' metrics among 200: 13 the default rules read, 187 others.
    let rules = insights_svc::rules::Rules::defaults().unwrap();
    let mut metrics: Vec<String> = rules.metrics().into_iter().map(|(m, _)| m).collect();
    let mut i = 0;
    while metrics.len() < 200 {
        metrics.push(format!("app.metric.{i}"));
        i += 1;
    }
    let started = Instant::now();
    s.feed(&instance, &metrics, 30 * 24).await;
    println!(
        "health: {} metrics × {} hours ingested and rolled up in {:.1} s",
        metrics.len(),
        30 * 24,
        started.elapsed().as_secs_f64()
    );
    let mut client = s.insights.client().await;
    let request = || {
        authed(
            &s.org.admin,
            pb::GetHealthRequest {
                org_id: s.org.id.clone(),
                instance_id: instance.id.clone(),
            },
        )
    };
    let warm = client
        .get_health(request())
        .await
        .unwrap()
        .into_inner()
        .health
        .unwrap();
    println!(
        "health: score {}, {} findings, has_data {}",
        warm.score,
        warm.findings.len(),
        warm.has_data
    );
    let mut latencies = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        client.get_health(request()).await.unwrap();
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    report("GetHealth (one caller)", latencies);
    // Eight callers at once.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = client.clone();
        let (admin, org, id) = (s.org.admin.clone(), s.org.id.clone(), instance.id.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for _ in 0..calls / 8 {
                let t = Instant::now();
                client
                    .get_health(authed(
                        &admin,
                        pb::GetHealthRequest {
                            org_id: org.clone(),
                            instance_id: id.clone(),
                        },
                    ))
                    .await
                    .unwrap();
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    report("GetHealth (8 callers)", latencies);
}

async fn portfolio(calls: usize, instances: usize) {
    let s = stack().await;
    let assessment = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/assessment.json"
    ))
    .unwrap();
    let started = Instant::now();
    let mut linked = Vec::with_capacity(instances);
    for i in 0..instances {
        linked.push(s.linker.link_instance(&s.org, &format!("SRV-{i:04}")).await);
    }
    s.settle(&linked[0]).await;
    let mut client = s.insights.client().await;
    for instance in &linked {
        s.feed(instance, &["jvm.cpu.load".to_owned()], 2).await;
        let header = pb::UploadHeader {
            org_id: s.org.id.clone(),
            instance_id: instance.id.clone(),
            file_name: "assessment.json".into(),
            size_bytes: assessment.len() as u64,
            format: "sightline.assessment".into(),
            format_version: 1,
            ..Default::default()
        };
        let messages = vec![
            pb::UploadAssessmentRequest {
                part: Some(pb::upload_assessment_request::Part::Header(header)),
            },
            pb::UploadAssessmentRequest {
                part: Some(pb::upload_assessment_request::Part::Chunk(
                    assessment.clone(),
                )),
            },
        ];
        client
            .upload_assessment(authed(&s.org.admin, tokio_stream::iter(messages)))
            .await
            .unwrap();
    }
    let scored = s.insights.maintenance.score_pass().await.unwrap();
    println!(
        "portfolio: {instances} instances linked, fed, assessed and {scored} scored in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let request = || {
        authed(
            &s.org.admin,
            pb::GetPortfolioRequest {
                org_id: s.org.id.clone(),
                page_size: 500,
                page_token: String::new(),
            },
        )
    };
    let page = client.get_portfolio(request()).await.unwrap().into_inner();
    assert_eq!(page.instances.len(), instances.min(500));
    assert!(
        page.instances
            .iter()
            .all(|e| e.has_score && e.has_readiness)
    );
    let mut latencies = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        client.get_portfolio(request()).await.unwrap();
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    report(
        &format!("GetPortfolio ({instances} instances, one page)"),
        latencies,
    );
    // What linker-svc's ListInstances (the page the portfolio is built on) takes alone.
    let mut linker = s.linker.linker().await;
    let mut latencies = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        linker
            .list_instances(authed(
                s.linker.service.expose(),
                sightline_proto::linker::v1::ListInstancesRequest {
                    org_id: s.org.id.clone(),
                    page_size: 500,
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    report(
        &format!("ListInstances alone ({instances} instances, one page)"),
        latencies,
    );
}

/// A zip of about `target` bytes: logs with personal data planted, and a metrics file.
fn write_bundle(path: &std::path::Path, target: u64) -> (u64, u64) {
    let file = std::fs::File::create(path).unwrap();
    let mut writer = zip::ZipWriter::new(std::io::BufWriter::new(file));
    writer
        .start_file(
            "metrics/jira.json",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
    writer
        .write_all(br#"{"format": "sightline.assessment", "formatVersion": 1, "metrics": [{"name": "jvm.cpu.load", "at": "2027-01-15T07:00:00Z", "value": 91, "unit": "percent"}]}"#)
        .unwrap();
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut expanded = 0u64;
    let mut part = 0;
    let mut line = String::with_capacity(256);
    // Compressed size is checked on the file as it grows (the writer's output is buffered, so
    // the figure is approximate; the loop stops a little past the target).
    'files: loop {
        writer
            .start_file(format!("logs/atlassian-jira.log.{part}"), options)
            .unwrap();
        for n in 0..200_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            line.clear();
            use std::fmt::Write as _;
            let _ = match n % 40 {
                0 => writeln!(
                    line,
                    "2027-01-15 07:{:02}:{:02},{:03} INFO [http-nio-8080-exec-{}] login user=user{} from 10.{}.{}.{} session {:016x}",
                    n % 60,
                    state % 60,
                    state % 1000,
                    state % 50,
                    state % 9973,
                    state % 250,
                    (state >> 8) % 250,
                    (state >> 16) % 250,
                    state
                ),
                1 => writeln!(
                    line,
                    "2027-01-15 07:{:02}:{:02} WARN [mail] could not deliver to person{}@customer{}.example: {:016x}",
                    n % 60,
                    state % 60,
                    state % 9973,
                    state % 97,
                    state
                ),
                2 => writeln!(
                    line,
                    "2027-01-15 07:{:02}:{:02} INFO {{\"displayName\": \"Person {}\", \"key\": \"{:08x}\"}}",
                    n % 60,
                    state % 60,
                    state % 9973,
                    state
                ),
                _ => writeln!(
                    line,
                    "2027-01-15 07:{:02}:{:02},{:03} DEBUG [c.a.j.issue.IssueManager] reindexed issue {} in {} ms (cache {:016x}, node {})",
                    n % 60,
                    state % 60,
                    state % 1000,
                    state % 1_000_000,
                    state % 300,
                    state.rotate_left(7),
                    state % 4
                ),
            };
            writer.write_all(line.as_bytes()).unwrap();
            expanded += line.len() as u64;
        }
        part += 1;
        let written = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if written >= target {
            break 'files;
        }
    }
    writer.finish().unwrap();
    (std::fs::metadata(path).unwrap().len(), expanded)
}

async fn bundle(megabytes: u64) {
    let server = Child::spawn("bundle");
    let (admin, org, instance) = (&server.words[0], &server.words[1], &server.words[2]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("support.zip");
    let (size, expanded) = write_bundle(&path, megabytes * 1024 * 1024);
    println!(
        "bundle: {:.1} MiB zip, {:.1} MiB of logs expanded",
        size as f64 / 1048576.0,
        expanded as f64 / 1048576.0
    );
    // Idle: the server has started and answered a call.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::insights_service_client::InsightsServiceClient::new(channel);
    client
        .get_portfolio(authed(
            admin,
            pb::GetPortfolioRequest {
                org_id: org.clone(),
                page_size: 1,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let idle = server.rss_mib();
    let idle_peak = server.peak_rss_mib();
    let header = pb::UploadHeader {
        org_id: org.clone(),
        instance_id: instance.clone(),
        file_name: "support.zip".into(),
        size_bytes: size,
        format: "sightline.support-bundle".into(),
        format_version: 1,
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reader_path = path.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        tx.send(pb::UploadSupportBundleRequest {
            part: Some(pb::upload_support_bundle_request::Part::Header(header)),
        })
        .await
        .unwrap();
        let mut file = tokio::fs::File::open(reader_path).await.unwrap();
        loop {
            let mut chunk = vec![0u8; 1024 * 1024];
            let n = file.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            if tx
                .send(pb::UploadSupportBundleRequest {
                    part: Some(pb::upload_support_bundle_request::Part::Chunk(chunk)),
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let cpu = server.cpu_seconds();
    let started = Instant::now();
    let reply = client
        .upload_support_bundle(authed(
            admin,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .unwrap()
        .into_inner();
    let seconds = started.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds() - cpu;
    let peak = server.peak_rss_mib();
    println!(
        "bundle: {} files read, {} items scrubbed, stored in {:?}",
        reply.files_read,
        reply.items_scrubbed,
        sightline_proto::common::v1::Location::try_from(reply.stored_in).unwrap()
    );
    println!(
        "bundle: {:.1} s, {:.1} MiB/s of zip, {:.1} MiB/s expanded; server CPU {:.1} s",
        seconds,
        size as f64 / 1048576.0 / seconds,
        expanded as f64 / 1048576.0 / seconds,
        cpu
    );
    println!(
        "bundle: server RSS idle {idle:.1} MiB (peak before the upload {idle_peak:.1} MiB); peak during the upload {peak:.1} MiB: {:.1} MiB above idle",
        peak - idle
    );
}

/// The child's side of `bundle`: the stack with one org opted in and one instance.
async fn serve_bundle() {
    let s = stack().await;
    let instance = s.linker.link_instance(&s.org, "BENCH-1").await;
    s.settle(&instance).await;
    sightline_tests::bench::serve_until_stdin_closes(format!(
        "{} {} {} {}",
        s.insights.addr, s.org.admin, s.org.id, instance.id
    ))
    .await;
    drop(s);
}

const USAGE: &str =
    "usage: bench_insights --target health|portfolio|bundle [--calls N] [--instances N] [--mib N]
  health     GetHealth over 30 days of hourly rollups of 200 metrics (--calls, default 500)
  portfolio  GetPortfolio of an org with --instances linked instances (default 500)
  bundle     UploadSupportBundle of a --mib MiB zip (default 100), the server's peak memory";

#[tokio::main]
async fn main() {
    sightline_tests::bench::command_line(
        USAGE,
        &[
            ("--target", true),
            ("--calls", true),
            ("--instances", true),
            ("--mib", true),
        ],
    );
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve") {
        serve_bundle().await;
        return;
    }
    let target = args
        .iter()
        .position(|a| a == "--target")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "health".into());
    let calls = arg("--calls", 500) as usize;
    match target.as_str() {
        "health" => health(calls).await,
        "portfolio" => portfolio(calls, arg("--instances", 500) as usize).await,
        "bundle" => bundle(arg("--mib", 100)).await,
        other => panic!("unknown target {other}"),
    }
}
