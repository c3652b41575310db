//! insights-svc end to end, wired to a real linker-svc, consent-svc and collector-svc: health with
//! explained findings from real rollups, trends, score history, readiness, uploads (treated by the
//! policy, unsafe ones refused with nothing kept), the portfolio, purges and retention with their
//! audit entries, and isolation between orgs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sightline_runtime::policy_stream::PolicyFollower as _;
use std::io::{Read, Write};

use sightline_proto::common::v1::{DataClass, SharingLevel, UsageLevel};
use sightline_proto::insights::v1::{self as pb, TrendDirection};
use sightline_runtime::settings::Limits;
use sightline_tests::collector::{ingest, metric};
use sightline_tests::consent::opt_in;
use sightline_tests::{
    CollectorOptions, InsightsOptions, LinkerOptions, Relay, T0_MS, TestCollector, TestConsent,
    TestInsights, TestInstance, TestLinker, TestOrg, authed, zip_of,
};
use tonic::Code;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

struct Stack {
    linker: TestLinker,
    consent: TestConsent,
    collector: TestCollector,
    insights: TestInsights,
    org: TestOrg,
    instance: TestInstance,
}

impl Stack {
    async fn start(usage: UsageLevel, sharing: SharingLevel) -> Self {
        Self::start_with(usage, sharing, InsightsOptions::default()).await
    }

    async fn start_with(
        usage: UsageLevel,
        sharing: SharingLevel,
        options: InsightsOptions,
    ) -> Self {
        Self::start_relayed(usage, sharing, options, false).await.0
    }

    /// With insights-svc reaching consent-svc through a [`Relay`] when `relayed`.
    async fn start_relayed(
        usage: UsageLevel,
        sharing: SharingLevel,
        mut options: InsightsOptions,
        relayed: bool,
    ) -> (Self, Option<Relay>) {
        let linker = TestLinker::start(LinkerOptions {
            limits: options.limits,
            ..LinkerOptions::default()
        })
        .await;
        let consent = TestConsent::start(&linker, None, options.limits).await;
        let collector = TestCollector::start(
            &linker,
            &consent,
            CollectorOptions {
                limits: options.limits,
                ..CollectorOptions::default()
            },
        )
        .await;
        let relay = if relayed {
            Some(Relay::start(consent.addr).await)
        } else {
            None
        };
        if let Some(relay) = &relay {
            options.consent_url = Some(relay.url());
        }
        let insights = TestInsights::start(&linker, &consent, &collector, options).await;
        let org = linker.org("Acme").await;
        let instance = linker.link_instance(&org, "SRV-A").await;
        let stack = Self {
            linker,
            consent,
            collector,
            insights,
            org,
            instance,
        };
        if usage != UsageLevel::Disabled {
            stack.levels(usage, sharing).await;
        }
        (stack, relay)
    }

    async fn levels(&self, usage: UsageLevel, sharing: SharingLevel) {
        opt_in(&self.consent, &self.org, usage, sharing).await;
        let policy =
            sightline_tests::consent::policy(&self.consent, &self.org, &self.instance.id).await;
        self.collector
            .wait_revision(&self.org.id, &self.instance.id, policy.revision)
            .await;
        self.insights
            .wait_revision(&self.org.id, policy.revision)
            .await;
    }

    /// The instance's score history from `days` days before T0 to a day after, as the admin reads it.
    async fn score_history(&self, days: i64) -> pb::GetScoreHistoryResponse {
        self.insights
            .client()
            .await
            .get_score_history(authed(
                &self.org.admin,
                pb::GetScoreHistoryRequest {
                    org_id: self.org.id.clone(),
                    instance_id: self.instance.id.clone(),
                    range: Some(sightline_proto::common::v1::TimeRange {
                        start: sightline_tests::collector::at(T0_MS - days * DAY),
                        end: sightline_tests::collector::at(T0_MS + DAY),
                    }),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// One sample an hour of `name` for the `hours` hours before T0, `value(hour index)`, rolled up.
    async fn feed(
        &self,
        instance: &TestInstance,
        name: &str,
        hours: i64,
        value: impl Fn(i64) -> f64,
    ) {
        let events: Vec<_> = (1..=hours)
            .map(|h| {
                metric(
                    &format!("{name}-{h}"),
                    T0_MS - h * HOUR + 60_000,
                    name,
                    value(h),
                )
            })
            .collect();
        for chunk in events.chunks(1000) {
            let result = ingest(&self.collector, instance, chunk.to_vec())
                .await
                .unwrap();
            assert_eq!(result.accepted as usize, chunk.len(), "{result:?}");
        }
        self.collector.maintenance.roll_up().await;
    }

    /// Asks (as the org's admin) and starts (as the operator) a move of `scope` to `to`; the
    /// operator's answer.
    async fn start_move(
        &self,
        scope: sightline_proto::consent::v1::ResidencyScope,
        to: sightline_proto::common::v1::Location,
    ) -> sightline_proto::consent::v1::RequestResidencyMoveResponse {
        use sightline_proto::consent::v1 as consent_pb;
        let mut consent = self.consent.client().await;
        let step =
            |transition: consent_pb::MoveTransition| consent_pb::RequestResidencyMoveRequest {
                org_id: self.org.id.clone(),
                transition: transition as i32,
                scope: scope as i32,
                to_location: to as i32,
                owner: String::new(),
            };
        consent
            .request_residency_move(authed(
                &self.org.admin,
                step(consent_pb::MoveTransition::Request),
            ))
            .await
            .unwrap();
        consent
            .request_residency_move(authed(
                self.linker.operator.expose(),
                step(consent_pb::MoveTransition::Start),
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// The header of an assessment upload by the org's admin for `instance_id`.
    fn assessment_header(&self, instance_id: &str, size: usize) -> pb::UploadHeader {
        let mut head = header("sightline.assessment", size);
        head.org_id = self.org.id.clone();
        head.instance_id = instance_id.to_owned();
        head
    }

    /// The example assessment, uploaded by the admin for the instance.
    async fn upload_example(&self) -> pb::UploadAssessmentResponse {
        let file = assessment_file();
        let head = self.assessment_header(&self.instance.id, file.len());
        upload_assessment(self, &self.org.admin, head, file.as_bytes())
            .await
            .unwrap()
    }

    /// The admin's GetReadiness of the instance.
    fn readiness_request(&self) -> tonic::Request<pb::GetReadinessRequest> {
        authed(
            &self.org.admin,
            pb::GetReadinessRequest {
                org_id: self.org.id.clone(),
                instance_id: self.instance.id.clone(),
            },
        )
    }

    /// A one-log bundle, uploaded with the instance's credential.
    async fn upload_small_bundle(&self) -> pb::UploadSupportBundleResponse {
        let bytes = zip_of(&[("logs/a.log", b"fine\n")]);
        let head = header("sightline.support-bundle", bytes.len());
        upload_bundle(self, &self.instance.credential, head, &bytes)
            .await
            .unwrap()
    }

    async fn health(&self) -> pb::InstanceHealth {
        self.insights
            .client()
            .await
            .get_health(authed(
                &self.org.admin,
                pb::GetHealthRequest {
                    org_id: self.org.id.clone(),
                    instance_id: self.instance.id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .health
            .unwrap()
    }
}

fn header(format: &str, size: usize) -> pb::UploadHeader {
    pb::UploadHeader {
        file_name: "file".into(),
        size_bytes: size as u64,
        format: format.into(),
        format_version: 1,
        ..Default::default()
    }
}

async fn upload_assessment(
    s: &Stack,
    token: &str,
    header: pb::UploadHeader,
    bytes: &[u8],
) -> Result<pb::UploadAssessmentResponse, tonic::Status> {
    let mut messages = vec![pb::UploadAssessmentRequest {
        part: Some(pb::upload_assessment_request::Part::Header(header)),
    }];
    for chunk in bytes.chunks(1000) {
        messages.push(pb::UploadAssessmentRequest {
            part: Some(pb::upload_assessment_request::Part::Chunk(chunk.to_vec())),
        });
    }
    s.insights
        .client()
        .await
        .upload_assessment(authed(token, tokio_stream::iter(messages)))
        .await
        .map(tonic::Response::into_inner)
}

async fn upload_bundle(
    s: &Stack,
    token: &str,
    header: pb::UploadHeader,
    bytes: &[u8],
) -> Result<pb::UploadSupportBundleResponse, tonic::Status> {
    let mut messages = vec![pb::UploadSupportBundleRequest {
        part: Some(pb::upload_support_bundle_request::Part::Header(header)),
    }];
    for chunk in bytes.chunks(64 * 1024) {
        messages.push(pb::UploadSupportBundleRequest {
            part: Some(pb::upload_support_bundle_request::Part::Chunk(
                chunk.to_vec(),
            )),
        });
    }
    s.insights
        .client()
        .await
        .upload_support_bundle(authed(token, tokio_stream::iter(messages)))
        .await
        .map(tonic::Response::into_inner)
}

fn assessment_file() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/assessment.json"
    ))
    .unwrap()
}

/// Every file under the data directory, bytes and (for zips) every entry expanded, as one text.
fn everything_stored(dir: &std::path::Path) -> String {
    let mut text = String::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap_or_default();
            text.push_str(&String::from_utf8_lossy(&bytes));
            if path.extension().is_some_and(|e| e == "zip")
                && let Ok(mut archive) = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            {
                for i in 0..archive.len() {
                    let mut body = String::new();
                    let _ = archive.by_index(i).unwrap().read_to_string(&mut body);
                    text.push_str(&body);
                }
            }
        }
    }
    text
}

fn bundle_files(dir: &std::path::Path) -> usize {
    let root = dir.join("bundles");
    let Ok(locations) = std::fs::read_dir(&root) else {
        return 0;
    };
    locations
        .flatten()
        .filter(|l| !l.file_name().to_string_lossy().starts_with('.'))
        .flat_map(|l| std::fs::read_dir(l.path()).into_iter().flatten().flatten())
        .filter(|f| f.file_name().to_string_lossy().ends_with(".zip"))
        .count()
}

#[tokio::test]
async fn health_explains_each_failing_rule_from_real_rollups() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let empty = s.health().await;
    assert_eq!((empty.score, empty.has_data), (100, false));
    s.feed(&s.instance, "jvm.cpu.load", 24, |_| 95.0).await;
    s.feed(&s.instance, "jvm.heap.used_percent", 24, |_| 40.0)
        .await;
    s.feed(&s.instance, "guardrail.custom_fields", 3, |_| 2_400.0)
        .await;
    let health = s.health().await;
    assert!(health.has_data);
    assert_eq!(health.score, 100 - 15 - 5, "{health:?}");
    assert_eq!(health.rules_version, "2026.11.1");
    let ids: Vec<&str> = health.findings.iter().map(|f| f.rule_id.as_str()).collect();
    assert_eq!(ids, ["cpu-load-high", "guardrail-custom-fields"]);
    let cpu = &health.findings[0];
    assert_eq!(cpu.severity, pb::Severity::High as i32);
    let evidence = &cpu.evidence[0];
    assert_eq!(
        (
            evidence.metric_name.as_str(),
            evidence.observed,
            evidence.threshold,
            evidence.comparison.as_str(),
            evidence.unit.as_str()
        ),
        ("jvm.cpu.load", 95.0, 80.0, ">", "percent")
    );
    assert_eq!(evidence.aggregation, "p95 of hourly p95 over 24 h");
    assert_eq!(evidence.window.unwrap().seconds, 24 * 3600);
    assert!(cpu.recommendation.contains("CPU"));
}

#[tokio::test]
async fn trends_and_score_history_come_from_the_collectors_rollups() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    // Five days: CPU climbs 1 point an hour with noise; heap stays flat with noise; latency falls.
    let noise = |h: i64| ((h * 7919) % 11) as f64 - 5.0;
    s.feed(&s.instance, "jvm.cpu.load", 120, move |h| {
        120.0 - h as f64 * 0.5 + noise(h)
    })
    .await;
    s.feed(&s.instance, "jvm.heap.used_percent", 120, move |h| {
        50.0 + noise(h) * 2.0
    })
    .await;
    s.feed(&s.instance, "http.request.latency", 120, |h| {
        400.0 + h as f64 * 5.0
    })
    .await;
    let mut client = s.insights.client().await;
    let trend = |metric: &str| pb::GetTrendsRequest {
        org_id: s.org.id.clone(),
        instance_id: s.instance.id.clone(),
        metric_name: metric.into(),
        range: Some(sightline_proto::common::v1::TimeRange {
            start: sightline_tests::collector::at(T0_MS - 5 * DAY),
            end: sightline_tests::collector::at(T0_MS),
        }),
        bucket: Some(prost_types::Duration {
            seconds: 6 * 3600,
            nanos: 0,
        }),
    };
    let direction = |r: pb::GetTrendsResponse| (TrendDirection::try_from(r.direction).unwrap(), r);
    let (cpu, series) = direction(
        client
            .get_trends(authed(&s.org.admin, trend("jvm.cpu.load")))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(cpu, TrendDirection::Rising);
    assert_eq!(series.points.len(), 20);
    assert!(
        (series.slope_per_day - 12.0).abs() < 2.0,
        "{}",
        series.slope_per_day
    );
    let (heap, _) = direction(
        client
            .get_trends(authed(&s.org.admin, trend("jvm.heap.used_percent")))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(heap, TrendDirection::Flat);
    let (latency, _) = direction(
        client
            .get_trends(authed(&s.org.admin, trend("http.request.latency")))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(latency, TrendDirection::Falling);
    // A bucket under an hour is refused, naming the field.
    let mut short = trend("jvm.cpu.load");
    short.bucket = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    let refused = client
        .get_trends(authed(&s.org.admin, short))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().starts_with("bucket"));
    // The hourly scorer keeps a point per hour.
    assert_eq!(s.insights.maintenance.score_pass().await.unwrap(), 1);
    let history = s.score_history(1).await;
    assert_eq!(history.points.len(), 1);
    assert_eq!(history.points[0].score, s.health().await.score);
}

#[tokio::test]
async fn an_assessment_keeps_ids_only_under_basic_and_names_under_extended() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let file = assessment_file();
    let head = s.assessment_header(&s.instance.id, file.len());
    let reply = upload_assessment(&s, &s.org.admin, head.clone(), file.as_bytes())
        .await
        .unwrap();
    assert_eq!(reply.bytes_received, file.len() as u64);
    let report = reply.report.unwrap();
    assert_eq!(report.sharing_level, SharingLevel::Basic as i32);
    assert_eq!(report.counts.unwrap().custom_fields, 923);
    let over = report
        .blockers
        .iter()
        .find(|b| b.blocker_id == "limit.custom_fields")
        .unwrap();
    assert_eq!(over.entities[0].id, "customfield_10420");
    assert_eq!(over.entities[0].name, "");
    let removed: Vec<i32> = reply.removed.iter().map(|r| r.data_class).collect();
    assert!(removed.contains(&(DataClass::Name as i32)), "{removed:?}");
    let stored = everything_stored(s.linker.data_dir());
    for kept_out in ["Release train", "Operations", "Acme payroll sync"] {
        assert!(
            !stored.contains(kept_out),
            "{kept_out} was stored under BASIC"
        );
    }
    // The report is there to read, and RunReadinessAssessment makes it again from the stored file.
    let mut client = s.insights.client().await;
    let read = client
        .get_readiness(s.readiness_request())
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(read.readiness_score, report.readiness_score);
    // Under EXTENDED keys and names are kept.
    s.levels(UsageLevel::Basic, SharingLevel::Extended).await;
    let reply = upload_assessment(&s, &s.org.admin, head, file.as_bytes())
        .await
        .unwrap();
    let report = reply.report.unwrap();
    let over = report
        .blockers
        .iter()
        .find(|b| b.blocker_id == "limit.custom_fields")
        .unwrap();
    assert_eq!(over.entities[0].name, "Release train");
    let again = client
        .run_readiness_assessment(authed(
            &s.org.admin,
            pb::RunReadinessAssessmentRequest {
                org_id: s.org.id.clone(),
                instance_id: s.instance.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(again.source, pb::DataSource::Upload as i32);
    assert_eq!(again.readiness_score, report.readiness_score);
}

#[tokio::test]
async fn an_unlinked_upload_is_treated_as_basic() {
    let s = Stack::start(UsageLevel::Advanced, SharingLevel::Extended).await;
    let file = assessment_file();
    let mut head = header("sightline.assessment", file.len());
    head.org_id = s.org.id.clone();
    head.server_id = "BQXJ-7Y2K-L9PA-X4RE".into();
    let reply = upload_assessment(&s, &s.org.admin, head, file.as_bytes())
        .await
        .unwrap();
    let report = reply.report.unwrap();
    assert_eq!(report.sharing_level, SharingLevel::Basic as i32);
    assert_eq!(report.instance_id, "");
    let stored = everything_stored(s.linker.data_dir());
    for kept_out in [
        "Release train",
        "Operations",
        "\"OPS\"",
        "Acme payroll sync",
    ] {
        assert!(
            !stored.contains(kept_out),
            "{kept_out} was stored for an unlinked instance"
        );
    }
    // An unlinked upload must say whose server it is.
    let mut head = header("sightline.assessment", file.len());
    head.org_id = s.org.id.clone();
    let refused = upload_assessment(&s, &s.org.admin, head, file.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().starts_with("header.server_id"));
}

#[tokio::test]
async fn a_bundle_is_stored_scrubbed_and_the_reply_counts_what_was_removed() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let metrics = br#"{"format": "sightline.assessment", "formatVersion": 1,
      "metrics": [
        {"name": "jvm.cpu.load", "at": "2027-01-15T06:00:00Z", "value": 97, "unit": "percent"},
        {"name": "jvm.cpu.load", "at": "2027-01-15T07:00:00Z", "value": 96, "unit": "percent",
         "attributes": {"note": "paged carol@acme.example"}}
      ]}"#;
    let log = b"2027-01-15 07:01 INFO login user=alice from 192.168.10.20\n\
                2027-01-15 07:02 WARN mail to bob@acme.example failed\n\
                2027-01-15 07:03 INFO {\"displayName\": \"Alice Liddell\", \"username\": \"aliddell\"}\n";
    let bytes = zip_of(&[
        ("metrics/jira.json", metrics),
        ("logs/atlassian-jira.log", log),
    ]);
    let mut head = header("sightline.support-bundle", bytes.len());
    head.file_name = "support.zip".into();
    // With the instance's own credential.
    let reply = upload_bundle(&s, &s.instance.credential, head, &bytes)
        .await
        .unwrap();
    assert_eq!(reply.files_read, 2);
    let count = |class: DataClass| {
        reply
            .scrubbed
            .iter()
            .find(|c| c.data_class == class as i32)
            .map_or(0, |c| c.count)
    };
    assert_eq!(count(DataClass::Email), 2);
    assert_eq!(count(DataClass::IpAddress), 1);
    assert_eq!(count(DataClass::Username), 2);
    assert_eq!(count(DataClass::DisplayName), 1);
    assert_eq!(reply.items_scrubbed, 6);
    assert_eq!(
        reply.stored_in,
        sightline_proto::common::v1::Location::Global as i32
    );
    let health = reply.health.unwrap();
    assert_eq!(health.source, pb::DataSource::Upload as i32);
    assert!(health.findings.iter().any(|f| f.rule_id == "cpu-load-high"));
    assert_eq!(bundle_files(s.linker.data_dir()), 1);
    let stored = everything_stored(s.linker.data_dir());
    assert!(
        stored.contains("login user=[username] from [ip]"),
        "the scrubbed log is stored"
    );
    for planted in [
        "alice",
        "aliddell",
        "Alice Liddell",
        "bob@acme.example",
        "carol@acme.example",
        "192.168.10.20",
    ] {
        assert!(!stored.contains(planted), "{planted} was stored");
    }
}

/// The "better zip bomb", byte by byte: one stored local entry of `size` bytes and `records`
/// central-directory records with their own names all pointing at it.
fn overlapping_bomb(records: usize, size: usize) -> Vec<u8> {
    let data = vec![b'a'; size];
    let crc = crc32fast::hash(&data);
    let local_name = "logs/0.log";
    let mut out = Vec::new();
    out.extend_from_slice(b"PK\x03\x04\x14\0\0\0\0\0\0\0\0\0");
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&(size as u32).to_le_bytes());
    out.extend_from_slice(&(size as u32).to_le_bytes());
    out.extend_from_slice(&(local_name.len() as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(local_name.as_bytes());
    out.extend_from_slice(&data);
    let directory = out.len() as u32;
    for i in 0..records {
        let name = format!("logs/{i}.log");
        out.extend_from_slice(b"PK\x01\x02\x14\0\x14\0\0\0\0\0\0\0\0\0");
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&(size as u32).to_le_bytes());
        out.extend_from_slice(&(size as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&(0o100_644u32 << 16).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
    }
    let length = out.len() as u32 - directory;
    out.extend_from_slice(b"PK\x05\x06\0\0\0\0");
    out.extend_from_slice(&(records as u16).to_le_bytes());
    out.extend_from_slice(&(records as u16).to_le_bytes());
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&directory.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

#[tokio::test]
async fn unsafe_uploads_are_refused_and_nothing_is_stored() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let good_log: &[u8] = b"ok\n";
    let mut bomb = std::io::Cursor::new(Vec::new());
    {
        let mut writer = zip::ZipWriter::new(&mut bomb);
        writer
            .start_file(
                "logs/bomb.log",
                zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Deflated),
            )
            .unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            writer.write_all(&zeros).unwrap();
        }
        writer.finish().unwrap();
    }
    let mut link = std::io::Cursor::new(Vec::new());
    {
        let mut writer = zip::ZipWriter::new(&mut link);
        writer
            .add_symlink(
                "logs/link",
                "/etc/shadow",
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
        writer.finish().unwrap();
    }
    let whole = zip_of(&[("logs/a.log", &[b'x'; 5000][..])]);
    let long_name = format!("logs/{}.log", "n".repeat(5_009));
    let cases: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        (
            "overlapping entries (500 records, one local entry)",
            overlapping_bomb(500, 64 * 1024),
            Code::ResourceExhausted,
            "zip bomb",
        ),
        (
            "overlapping entries under the ratio",
            overlapping_bomb(3, 64 * 1024),
            Code::InvalidArgument,
            "names another file",
        ),
        (
            "NFC twins",
            zip_of(&[
                ("logs/caf\u{e9}.log", good_log),
                ("logs/cafe\u{301}.log", good_log),
            ]),
            Code::InvalidArgument,
            "Unicode-normalized",
        ),
        (
            "case twins",
            zip_of(&[("logs/App.log", good_log), ("logs/app.log", good_log)]),
            Code::InvalidArgument,
            "case-folded",
        ),
        (
            "a file that is also a directory",
            zip_of(&[("logs/app.log", good_log), ("logs/app.log/x.log", good_log)]),
            Code::InvalidArgument,
            "both a file and a directory",
        ),
        (
            "a 5,009-byte name component",
            zip_of(&[(long_name.as_str(), good_log)]),
            Code::InvalidArgument,
            "name component",
        ),
        (
            "zip bomb",
            bomb.into_inner(),
            Code::ResourceExhausted,
            "zip bomb",
        ),
        (
            "path traversal",
            zip_of(&[("../../etc/cron.d/evil", good_log)]),
            Code::InvalidArgument,
            "not a safe relative path",
        ),
        (
            "symlink",
            link.into_inner(),
            Code::InvalidArgument,
            "links are not accepted",
        ),
        (
            "truncated zip",
            whole[..whole.len() - 40].to_vec(),
            Code::InvalidArgument,
            "not a complete zip",
        ),
        (
            "not a zip",
            b"%PDF-1.7 definitely not a zip".to_vec(),
            Code::InvalidArgument,
            "not a complete zip",
        ),
    ];
    for (what, bytes, code, says) in cases {
        let head = header("sightline.support-bundle", bytes.len());
        let refused = upload_bundle(&s, &s.instance.credential, head, &bytes)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), code, "{what}: {refused:?}");
        assert!(
            refused.message().contains(says),
            "{what}: {}",
            refused.message()
        );
    }
    // A stream longer than its header said, and a header over the limit.
    let bytes = zip_of(&[("logs/a.log", good_log)]);
    let refused = upload_bundle(
        &s,
        &s.instance.credential,
        header("sightline.support-bundle", 10),
        &bytes,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let refused = upload_bundle(
        &s,
        &s.instance.credential,
        header("sightline.support-bundle", 1 << 40),
        &bytes,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().starts_with("header.size_bytes"));
    // A wrong format: named in the header, or the wrong method for it.
    let refused = upload_bundle(
        &s,
        &s.instance.credential,
        header("sightline.assessment", bytes.len()),
        &bytes,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().starts_with("header.format"));
    let mut odd = header("sightline.support-bundle", bytes.len());
    odd.format_version = 7;
    assert!(
        upload_bundle(&s, &s.instance.credential, odd, &bytes)
            .await
            .unwrap_err()
            .message()
            .starts_with("header.format_version")
    );
    // An assessment that does not parse names the JSON path.
    let broken =
        br#"{"format": "sightline.assessment", "formatVersion": 1, "counts": {"issues": "lots"}}"#;
    let refused = upload_assessment(
        &s,
        &s.instance.credential,
        header("sightline.assessment", broken.len()),
        broken,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("$.counts.issues"),
        "{}",
        refused.message()
    );
    // Nothing of any of them was kept.
    assert_eq!(bundle_files(s.linker.data_dir()), 0);
    assert_eq!(
        s.insights.maintenance.remove_orphan_files().await.unwrap(),
        0
    );
    let mut client = s.insights.client().await;
    let none = client
        .get_readiness(s.readiness_request())
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound);
}

#[tokio::test]
async fn uploads_are_refused_while_the_org_collects_nothing() {
    let s = Stack::start(UsageLevel::Disabled, SharingLevel::Basic).await;
    let file = assessment_file();
    let refused = upload_assessment(
        &s,
        &s.instance.credential,
        header("sightline.assessment", file.len()),
        file.as_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        everything_stored(s.linker.data_dir())
            .find("Release train")
            .is_none()
    );
}

#[tokio::test]
async fn the_portfolio_lists_every_instance_with_its_score_or_none_yet() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let second = s.linker.link_instance(&s.org, "SRV-B").await;
    let _third = s.linker.link_instance(&s.org, "SRV-C").await;
    s.feed(&s.instance, "jvm.cpu.load", 24, |_| 95.0).await;
    s.feed(&second, "jvm.cpu.load", 24, |_| 20.0).await;
    assert_eq!(s.insights.maintenance.score_pass().await.unwrap(), 2);
    let file = assessment_file();
    let head = s.assessment_header(&second.id, file.len());
    upload_assessment(&s, &s.org.admin, head, file.as_bytes())
        .await
        .unwrap();
    let mut client = s.insights.client().await;
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .get_portfolio(authed(
                &s.org.admin,
                pb::GetPortfolioRequest {
                    org_id: s.org.id.clone(),
                    page_size: 2,
                    page_token: page_token.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.instances.len() <= 2);
        seen.extend(page.instances);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 3);
    let entry = |id: &str| seen.iter().find(|e| e.instance_id == id).unwrap();
    let first = entry(&s.instance.id);
    assert!(first.has_score && first.linked && !first.has_readiness);
    assert_eq!(first.score, 85);
    assert!(first.last_seen_at.is_some());
    let second = entry(&second.id);
    assert_eq!(
        (second.has_score, second.score, second.has_readiness),
        (true, 100, true)
    );
    assert!(
        seen.iter().filter(|e| !e.has_score).count() == 1,
        "one instance has no score yet"
    );
}

#[tokio::test]
async fn another_orgs_tokens_and_ids_reveal_nothing_in_any_method() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    s.feed(&s.instance, "jvm.cpu.load", 24, |_| 95.0).await;
    let other = s.linker.org("Other").await;
    let foreign = s.linker.link_instance(&other, "SRV-O").await;
    opt_in(&s.consent, &other, UsageLevel::Basic, SharingLevel::Basic).await;
    let mut c = s.insights.client().await;
    let (org, inst) = (s.org.id.clone(), s.instance.id.clone());
    let range = Some(sightline_proto::common::v1::TimeRange {
        start: sightline_tests::collector::at(T0_MS - DAY),
        end: sightline_tests::collector::at(T0_MS),
    });
    // (token, org id, instance id) → every read method, which must refuse.
    let calls = |token: String, org: String, inst: String| {
        let mut c = c.clone();
        async move {
            vec![
                c.get_health(authed(
                    &token,
                    pb::GetHealthRequest {
                        org_id: org.clone(),
                        instance_id: inst.clone(),
                    },
                ))
                .await
                .map(|_| ()),
                c.get_trends(authed(
                    &token,
                    pb::GetTrendsRequest {
                        org_id: org.clone(),
                        instance_id: inst.clone(),
                        metric_name: "jvm.cpu.load".into(),
                        range,
                        bucket: Some(prost_types::Duration {
                            seconds: 3600,
                            nanos: 0,
                        }),
                    },
                ))
                .await
                .map(|_| ()),
                c.get_score_history(authed(
                    &token,
                    pb::GetScoreHistoryRequest {
                        org_id: org.clone(),
                        instance_id: inst.clone(),
                        range,
                    },
                ))
                .await
                .map(|_| ()),
                c.run_readiness_assessment(authed(
                    &token,
                    pb::RunReadinessAssessmentRequest {
                        org_id: org.clone(),
                        instance_id: inst.clone(),
                    },
                ))
                .await
                .map(|_| ()),
                c.get_readiness(authed(
                    &token,
                    pb::GetReadinessRequest {
                        org_id: org.clone(),
                        instance_id: inst.clone(),
                    },
                ))
                .await
                .map(|_| ()),
                c.get_portfolio(authed(
                    &token,
                    pb::GetPortfolioRequest {
                        org_id: org.clone(),
                        page_size: 10,
                        page_token: String::new(),
                    },
                ))
                .await
                .map(|_| ()),
            ]
        }
    };
    for result in calls(other.admin.clone(), org.clone(), inst.clone()).await {
        assert_eq!(result.unwrap_err().code(), Code::PermissionDenied);
    }
    for result in calls(s.instance.credential.clone(), org.clone(), inst.clone()).await {
        assert_eq!(result.unwrap_err().code(), Code::PermissionDenied);
    }
    // Our admin naming another org's instance: NOT_FOUND (the portfolio names no instance).
    let results = calls(s.org.admin.clone(), org.clone(), foreign.id.clone()).await;
    for result in &results[..5] {
        assert_eq!(result.as_ref().unwrap_err().code(), Code::NotFound);
    }
    // Uploads: another org's admin for our org, an instance credential for another instance.
    let file = assessment_file();
    let mut head = header("sightline.assessment", file.len());
    head.org_id = org.clone();
    head.instance_id = inst.clone();
    let refused = upload_assessment(&s, &other.admin, head.clone(), file.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = upload_assessment(&s, &foreign.credential, head.clone(), file.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let bytes = zip_of(&[("logs/a.log", b"x\n")]);
    let mut bundle_head = header("sightline.support-bundle", bytes.len());
    bundle_head.org_id = org.clone();
    bundle_head.instance_id = inst.clone();
    let refused = upload_bundle(&s, &foreign.credential, bundle_head.clone(), &bytes)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = upload_bundle(&s, &other.admin, bundle_head, &bytes)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // And a stranger's token is not let in at all.
    let refused = c
        .get_health(authed(
            &sightline_tests::stranger(sightline_runtime::token::TokenKind::Admin),
            pb::GetHealthRequest {
                org_id: org,
                instance_id: inst,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(bundle_files(s.linker.data_dir()), 0);
}

#[tokio::test]
async fn opting_out_purges_the_orgs_insights_data_once_with_an_audit_entry() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Extended).await;
    s.feed(&s.instance, "jvm.cpu.load", 24, |_| 95.0).await;
    s.insights.maintenance.score_pass().await.unwrap();
    s.upload_example().await;
    s.upload_small_bundle().await;
    assert_eq!(bundle_files(s.linker.data_dir()), 1);
    assert!(everything_stored(s.linker.data_dir()).contains("Release train"));
    // Lowering to BASIC strips names from what is kept (the background pass may be first).
    s.levels(UsageLevel::Basic, SharingLevel::Basic).await;
    s.insights.maintenance.purge_pass().await.unwrap();
    let mut client = s.insights.client().await;
    let report = client
        .get_readiness(s.readiness_request())
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    for blocker in &report.blockers {
        for entity in &blocker.entities {
            assert_eq!(entity.name, "", "{blocker:?}");
        }
    }
    // Opting out removes everything, once.
    s.levels(UsageLevel::Disabled, SharingLevel::Basic).await;
    s.insights.maintenance.purge_pass().await.unwrap();
    assert_eq!(s.insights.maintenance.purge_pass().await.unwrap(), 0);
    assert_eq!(bundle_files(s.linker.data_dir()), 0);
    let gone = client
        .get_readiness(s.readiness_request())
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let events = s.linker.audit_events(&s.org).await;
    let purges: Vec<_> = events
        .iter()
        .filter(|e| e.action == "insights.purge_applied")
        .collect();
    assert_eq!(purges.len(), 2, "one entry per purge: {purges:?}");
    assert_ne!(purges[0].target, purges[1].target);
    assert_eq!(
        purges[0]
            .attributes
            .get("records_stripped")
            .map(String::as_str),
        Some("2")
    );
    let last = purges.last().unwrap();
    assert_eq!(
        last.attributes.get("support_bundles").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        last.attributes.get("assessments").map(String::as_str),
        Some("1")
    );
}

#[tokio::test]
async fn retention_sweeps_old_records_with_an_audit_entry() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    s.upload_example().await;
    s.upload_small_bundle().await;
    let swept = s.insights.maintenance.sweep_pass().await.unwrap();
    assert_eq!((swept.assessments, swept.bundles), (0, 0));
    // 731 days later everything is past the default retention (730 days).
    s.linker.clock.advance_ms(731 * DAY);
    let swept = s.insights.maintenance.sweep_pass().await.unwrap();
    assert_eq!(
        (swept.assessments, swept.readiness, swept.bundles),
        (1, 1, 1)
    );
    assert_eq!(bundle_files(s.linker.data_dir()), 0);
    let events = s.linker.audit_events(&s.org).await;
    let sweep = events
        .iter()
        .find(|e| e.action == "insights.retention_swept")
        .unwrap();
    assert_eq!(
        sweep.attributes.get("assessments").map(String::as_str),
        Some("1")
    );
}

#[tokio::test]
async fn a_bad_rules_file_stops_the_start_naming_the_rule_and_the_field() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let collector = TestCollector::start(&linker, &consent, CollectorOptions::default()).await;
    let rules = linker.data_dir().join("rules.toml");
    std::fs::write(
        &rules,
        "version = \"x\"\n[[rule]]\nid = \"slow\"\ntitle = \"t\"\nseverity = \"urgent\"\nweight = 5\nmetric = \"m\"\naggregation = \"max\"\nwindow_hours = 1\ncomparison = \">\"\nthreshold = 1\nunit = \"ms\"\nrecommendation = \"r\"\n",
    )
    .unwrap();
    let mut options = InsightsOptions::default();
    options.analysis.rules_file = Some(rules);
    let refused = insights_svc::InsightsService::build(TestInsights::config(
        &linker, &consent, &collector, options,
    ))
    .await
    .unwrap_err()
    .to_string();
    assert!(refused.contains("rule \"slow\": severity"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_insights_walkthrough_runs_with_real_grpcurl() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let collector = TestCollector::start(&linker, &consent, CollectorOptions::default()).await;
    let insights =
        TestInsights::start(&linker, &consent, &collector, InsightsOptions::default()).await;
    let grpcurl = sightline_tests::grpcurl();
    let script = format!(
        "set -euo pipefail\ngrpcurl() {{ command \"{grpcurl}\" \"$@\"; }}\n{}\n",
        sightline_tests::readme_block("insights-walkthrough")
    );
    let output = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(sightline_tests::workspace_root())
        .env("ADDR", linker.addr.to_string())
        .env("CONSENT", consent.addr.to_string())
        .env("COLLECTOR", collector.addr.to_string())
        .env("INSIGHTS", insights.addr.to_string())
        .env("DATA", linker.data_dir())
        .env("NOW", sightline_tests::rfc3339(T0_MS))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "walkthrough failed\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert_eq!(lines[0], r#"{"accepted":4}"#);
    assert!(
        lines[1].contains("DATA_CLASS_NAME") && lines[1].contains("DATA_CLASS_KEY"),
        "{stdout}"
    );
    assert!(
        lines[2].contains("limit.custom_fields") && lines[2].contains("customfield_10420"),
        "{stdout}"
    );
    assert!(
        !lines[2].contains("Release train"),
        "names are not kept under BASIC: {stdout}"
    );
    assert!(lines[3].starts_with(r#"{"score":80,"#), "{stdout}");
    assert!(
        lines[3].contains("cpu-load-high") && lines[3].contains("guardrail-custom-fields"),
        "{stdout}"
    );
    assert!(
        lines[4].contains("[85,91,97]") && lines[4].contains("TREND_DIRECTION_RISING"),
        "{stdout}"
    );
    assert!(
        lines[5].contains(r#""version":"9.12.4""#) && lines[5].contains(r#""linked":true"#),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_support_bundle_move_carries_the_files_to_the_new_location_and_reports_done() {
    use sightline_proto::common::v1::Location;
    use sightline_proto::consent::v1 as consent_pb;
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let kept = s.upload_small_bundle().await;
    assert_eq!(kept.stored_in, Location::Global as i32);
    let dir = |location: &str| s.linker.data_dir().join("bundles").join(location);
    let file = format!("{}.zip", kept.upload_id);
    assert!(dir("global").join(&file).exists());
    let mut consent = s.consent.client().await;
    let started = s
        .start_move(consent_pb::ResidencyScope::SupportBundles, Location::Eu)
        .await;
    let revision = sightline_tests::consent::policy(&s.consent, &s.org, &s.instance.id)
        .await
        .revision;
    s.insights.wait_revision(&s.org.id, revision).await;
    // Meanwhile bundle uploads answer UNAVAILABLE with the retry hint.
    let bytes = zip_of(&[("logs/a.log", b"x\n")]);
    let refused = upload_bundle(
        &s,
        &s.instance.credential,
        header("sightline.support-bundle", bytes.len()),
        &bytes,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.metadata().get("retry-after-ms").is_some());
    // The move (the background pass may be first): the file is in the new place only, DONE.
    s.insights.maintenance.move_bundles().await.unwrap();
    assert!(dir("eu").join(&file).exists());
    assert!(!dir("global").join(&file).exists());
    let move_id = started.r#move.unwrap().move_id;
    let mut state = consent_pb::MoveState::Unspecified;
    for _ in 0..200 {
        let residency = consent
            .get_residency(authed(
                &s.org.admin,
                consent_pb::GetResidencyRequest {
                    org_id: s.org.id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let found = residency
            .residency
            .unwrap()
            .moves
            .into_iter()
            .find(|m| m.move_id == move_id)
            .unwrap();
        state = found.state();
        if state == consent_pb::MoveState::Done {
            assert_eq!(found.reported_by, ["insights"]);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(state, consent_pb::MoveState::Done);
    let events = s.linker.audit_events(&s.org).await;
    let moved = events
        .iter()
        .filter(|e| e.action == "insights.support_bundles_moved")
        .collect::<Vec<_>>();
    assert_eq!(moved.len(), 1);
    assert_eq!(
        moved[0]
            .attributes
            .get("support_bundles")
            .map(String::as_str),
        Some("1")
    );
    // New bundles go to the new location.
    let revision = sightline_tests::consent::policy(&s.consent, &s.org, &s.instance.id)
        .await
        .revision;
    s.insights.wait_revision(&s.org.id, revision).await;
    assert_eq!(s.upload_small_bundle().await.stored_in, Location::Eu as i32);
    // A bundle's record follows it: the old location holds no file with or without a record.
    assert_eq!(
        s.insights.maintenance.remove_orphan_files().await.unwrap(),
        0
    );
}

/// Policy lease (issue 22): insights-svc reaches consent-svc through a relay that goes silent while
/// the org opts out. Uploads are refused from the lease on at the latest (not one is kept later than
/// the lease plus a second), health says NOT_SERVING, and when the path returns the opt-out is
/// enforced and its purge takes what was uploaded before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn insights_that_cannot_hear_consent_stops_taking_uploads_within_the_lease() {
    use std::time::{Duration, Instant};
    let limits = Limits {
        policy_heartbeat_ms: 200,
        policy_lease_ms: 1_000,
        keepalive_interval_ms: 300,
        keepalive_timeout_ms: 500,
        ..Limits::default()
    };
    let (s, relay) = Stack::start_relayed(
        UsageLevel::Basic,
        SharingLevel::Basic,
        InsightsOptions {
            limits,
            ..InsightsOptions::default()
        },
        true,
    )
    .await;
    let relay = relay.unwrap();
    s.upload_example().await;
    relay.go_silent();
    sightline_tests::consent::update(
        &s.consent,
        &s.org,
        sightline_tests::consent::settings(UsageLevel::Disabled, SharingLevel::Basic),
    )
    .await
    .unwrap();
    let opted_out = Instant::now();
    let lease = Duration::from_millis(limits.policy_lease_ms);
    let file = assessment_file();
    let mut kept = Vec::new();
    let mut last = None;
    while opted_out.elapsed() < lease * 3 {
        let head = s.assessment_header(&s.instance.id, file.len());
        let outcome = upload_assessment(&s, &s.org.admin, head, file.as_bytes()).await;
        if outcome.is_ok() {
            kept.push(opted_out.elapsed());
        }
        last = Some(outcome);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        kept.iter().all(|at| *at <= lease + Duration::from_secs(1)),
        "uploads kept {kept:?} after the opt-out, past the lease ({lease:?}) plus one second"
    );
    let refused = last.unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.metadata().get("retry-after-ms").is_some());
    assert!(!s.insights.policies.is_ready());

    relay.resume();
    let disabled = sightline_tests::consent::policy(&s.consent, &s.org, &s.instance.id)
        .await
        .revision;
    s.insights.wait_revision(&s.org.id, disabled).await;
    s.insights.maintenance.purge_pass().await.unwrap();
    let gone = s
        .insights
        .client()
        .await
        .get_readiness(s.readiness_request())
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let head = s.assessment_header(&s.instance.id, file.len());
    let refused = upload_assessment(&s, &s.org.admin, head, file.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
}

/// Rows of `org_id` in each table of insights-svc's store of `file` (`insights` for the global
/// location, `insights-<location>` for the others).
async fn insights_rows(data_dir: &std::path::Path, file: &str, org_id: &str) -> Vec<(String, i64)> {
    let tables = ["assessments", "readiness", "scores", "bundles"];
    sightline_tests::collector::rows_of(data_dir, file, org_id, &tables).await
}

/// Every store of org data has the org's location (SPEC E10): an org with an assessment, its
/// readiness report, score history and a support bundle moves from GLOBAL to EU (both scopes);
/// insights-svc copies its part to the EU store, checks it and takes it out of the global one
/// (audited), and reports; afterwards the global store holds nothing of the org and reads are
/// served from EU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_carries_assessments_health_data_and_bundles_to_the_new_location_and_leaves_none_behind()
 {
    use sightline_proto::common::v1::Location;
    use sightline_proto::consent::v1 as consent_pb;
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let other = s.linker.org("Other").await;
    opt_in(&s.consent, &other, UsageLevel::Basic, SharingLevel::Basic).await;
    s.feed(&s.instance, "jvm.cpu.load", 24, |_| 95.0).await;
    assert!(s.insights.maintenance.score_pass().await.unwrap() >= 1);
    s.upload_example().await;
    s.upload_small_bundle().await;
    let data_dir = s.linker.data_dir().to_owned();
    let before = insights_rows(&data_dir, "insights", &s.org.id).await;
    assert!(before.iter().all(|(_, n)| *n > 0), "{before:?}");

    for scope in [
        consent_pb::ResidencyScope::Data,
        consent_pb::ResidencyScope::SupportBundles,
    ] {
        s.start_move(scope, Location::Eu).await;
    }
    let moving = sightline_tests::consent::policy(&s.consent, &s.org, &s.instance.id).await;
    assert!(moving.moving && moving.support_bundles_moving);
    s.insights.wait_revision(&s.org.id, moving.revision).await;
    s.collector
        .wait_revision(&s.org.id, &s.instance.id, moving.revision)
        .await;
    // While the data moves, uploads of it are refused with the retry hint.
    let file = assessment_file();
    let refused = upload_assessment(
        &s,
        &s.org.admin,
        s.assessment_header(&s.instance.id, file.len()),
        file.as_bytes(),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.metadata().get("retry-after-ms").is_some());
    // Every owner does its part (the background passes may be first).
    s.collector.maintenance.move_data().await;
    s.insights.maintenance.move_data().await.unwrap();
    s.insights.maintenance.move_bundles().await.unwrap();
    let mut done = false;
    for _ in 0..300 {
        let policy = sightline_tests::consent::policy(&s.consent, &s.org, &s.instance.id).await;
        if !policy.moving && !policy.support_bundles_moving {
            assert_eq!(policy.location(), Location::Eu);
            assert_eq!(policy.support_bundle_location(), Location::Eu);
            s.insights.wait_revision(&s.org.id, policy.revision).await;
            done = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(done, "the moves never finished");

    let global = insights_rows(&data_dir, "insights", &s.org.id).await;
    assert!(
        global.iter().all(|(_, n)| *n == 0),
        "left behind: {global:?}"
    );
    let eu = insights_rows(&data_dir, "insights-eu", &s.org.id).await;
    assert_eq!(
        eu.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        before.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        "{eu:?} against {before:?}"
    );
    // The other org's data stays where it was.
    let others = insights_rows(&data_dir, "insights-eu", &other.id).await;
    assert!(others.iter().all(|(_, n)| *n == 0), "{others:?}");
    // Reads come from the new location.
    let report = s
        .insights
        .client()
        .await
        .get_readiness(s.readiness_request())
        .await
        .unwrap()
        .into_inner();
    assert!(report.report.is_some());
    let history = s.score_history(30).await;
    assert!(!history.points.is_empty());
    let moved: Vec<_> = s
        .linker
        .audit_events(&s.org)
        .await
        .into_iter()
        .filter(|e| e.action == "insights.residency_moved")
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(
        moved[0].attributes.get("assessments").map(String::as_str),
        Some("1")
    );
}

/// Two insights-svc replicas on one PostgreSQL (and the shared bundle directories): passes run on
/// both at once score each hour once, move the support bundles once and apply each purge once, with
/// one audit entry each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_postgres_score_each_hour_once_and_move_and_purge_once() {
    let url = sightline_runtime::testing::fresh_postgres_url()
        .await
        .expect("PostgreSQL is required (SIGHTLINE_TEST_POSTGRES_URL)");
    let options = || InsightsOptions {
        database_url: Some(url.clone()),
        ..InsightsOptions::default()
    };
    let s = Stack::start_with(UsageLevel::Basic, SharingLevel::Extended, options()).await;
    let other = TestInsights::start(&s.linker, &s.consent, &s.collector, options()).await;
    s.feed(&s.instance, "jvm.cpu.load", 24, |_| 95.0).await;
    // Both replicas score the same hour at once: one point.
    let (a, b) = tokio::join!(
        s.insights.maintenance.score_pass(),
        other.maintenance.score_pass()
    );
    assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
    let history = s.score_history(1).await;
    assert_eq!(history.points.len(), 1, "{history:?}");
    s.upload_example().await;
    let kept = s.upload_small_bundle().await;
    assert_eq!(bundle_files(s.linker.data_dir()), 1);

    // The support bundles move to the EU; both replicas carry them at once: the file once, in the
    // new place only, with one audit entry.
    {
        use sightline_proto::common::v1::Location;
        use sightline_proto::consent::v1 as consent_pb;
        s.start_move(consent_pb::ResidencyScope::SupportBundles, Location::Eu)
            .await;
        let revision = sightline_tests::consent::policy(&s.consent, &s.org, &s.instance.id)
            .await
            .revision;
        s.insights.wait_revision(&s.org.id, revision).await;
        other.wait_revision(&s.org.id, revision).await;
        let (a, b) = tokio::join!(
            s.insights.maintenance.move_bundles(),
            other.maintenance.move_bundles()
        );
        a.unwrap();
        b.unwrap();
        let dir = |location: &str| s.linker.data_dir().join("bundles").join(location);
        let file = format!("{}.zip", kept.upload_id);
        assert!(dir("eu").join(&file).exists());
        assert!(!dir("global").join(&file).exists());
        let moved = s
            .linker
            .audit_events(&s.org)
            .await
            .into_iter()
            .filter(|e| e.action == "insights.support_bundles_moved")
            .count();
        assert_eq!(moved, 1);
    }

    // The org opts out; both replicas follow and run their purge passes at once, twice over.
    opt_in(
        &s.consent,
        &s.org,
        UsageLevel::Disabled,
        SharingLevel::Basic,
    )
    .await;
    let policy = sightline_tests::consent::policy(&s.consent, &s.org, &s.instance.id).await;
    s.insights.wait_revision(&s.org.id, policy.revision).await;
    other.wait_revision(&s.org.id, policy.revision).await;
    for _ in 0..2 {
        let (a, b) = tokio::join!(
            s.insights.maintenance.purge_pass(),
            other.maintenance.purge_pass()
        );
        a.unwrap();
        b.unwrap();
    }
    assert_eq!(bundle_files(s.linker.data_dir()), 0);
    let purges: Vec<_> = s
        .linker
        .audit_events(&s.org)
        .await
        .into_iter()
        .filter(|e| e.action == "insights.purge_applied")
        .collect();
    assert_eq!(purges.len(), 1, "one entry for the one purge: {purges:?}");
    assert_eq!(
        purges[0]
            .attributes
            .get("support_bundles")
            .map(String::as_str),
        Some("1")
    );
    let gone = other
        .client()
        .await
        .get_readiness(s.readiness_request())
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}
