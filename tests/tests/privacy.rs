//! The PII canary: thousands of events carrying e-mail addresses, IP addresses, display names, keys
//! and names in every field, and hidden in attributes, tags, query strings (percent-encoded) and
//! JSON held in strings, under BASIC and under EXTENDED. Afterwards every byte of every database
//! file (WAL included) and every log line is scanned: none of the e-mails, IPs or display names is
//! there, and under BASIC no key or name either.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use sightline_proto::collector::v1::{self as pb, DropReason};
use sightline_proto::common::v1::{self as common, Channel, SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::settings::Limits;
use sightline_tests::collector::{at, dropped, ingest};
use sightline_tests::consent::{opt_in, policy, track};
use sightline_tests::{
    CollectorOptions, LinkerOptions, T0_MS, TestCollector, TestConsent, TestLinker, logs,
};

/// Every canary value carries one of these markers, so one search finds any remnant of any of them.
const EMAIL_MARK: &str = "leakmail";
const IP_MARK: &str = "198.51.100.";
const DISPLAY_MARK: &str = "Zelda";
const KEY_MARK: &str = "CANKEY";
const NAME_MARK: &str = "Projectcanary";

struct Canary {
    email: String,
    ip: String,
    display: String,
    key: String,
    name: String,
}

impl Canary {
    fn new(i: usize) -> Self {
        Self {
            email: format!("user.{i}@{EMAIL_MARK}{i}.example"),
            ip: format!("{IP_MARK}{}", i % 250 + 1),
            display: format!("{DISPLAY_MARK} Quux{i}"),
            key: format!("{KEY_MARK}{i}"),
            name: format!("{NAME_MARK} {i}"),
        }
    }

    fn pct_email(&self) -> String {
        self.email.replace('@', "%40")
    }

    /// Text hiding the e-mail and IP (any event), and the display name, key and name when the event
    /// itself carries them in their own fields (only then can a collector know them for what they are).
    fn text(&self, own: &[&str]) -> String {
        format!(
            "seen {} at {} {} url=https://x.example/?m={}&json={{\"u\":\"{}\"}}",
            self.email,
            self.ip,
            own.join(" and "),
            self.pct_email(),
            self.email.replace('@', "\\u0040"),
        )
    }

    fn map(&self, own: &[&str]) -> HashMap<String, String> {
        [
            ("note".to_owned(), self.text(own)),
            ("host".to_owned(), self.ip.clone()),
            ("contact".to_owned(), self.email.clone()),
            (format!("k-{}", self.email), "v".to_owned()),
        ]
        .into_iter()
        .collect()
    }
}

fn events(i: usize, now: i64) -> Vec<pb::Event> {
    let c = Canary::new(i);
    let id = |k: &str| format!("{k}-{i}");
    let when = at(now - (i as i64 % 1_000) * 1_000);
    let event = |k: &str, payload| pb::Event {
        event_id: id(k),
        occurred_at: when,
        payload: Some(payload),
    };
    let url = format!(
        "https://wiki.example/p/{i}?who={}&ip={}&n={}",
        c.pct_email(),
        c.ip,
        c.display.replace(' ', "%20")
    );
    vec![
        event(
            "view",
            pb::event::Payload::PageView(pb::PageViewEvent {
                page_id: format!("p-{i}"),
                space_id: "s-1".into(),
                page_title: format!(
                    "Notes of {} with {}",
                    c.display,
                    c.text(&[&c.display, &c.key, &c.name])
                ),
                space_key: c.key.clone(),
                space_name: c.name.clone(),
                viewer_id: format!("u-{i}"),
                viewer_groups: vec![format!("grp {}", c.key)],
                channel: Channel::Desktop as i32,
                viewer_display_name: c.display.clone(),
                viewer_email: c.email.clone(),
                client_ip: c.ip.clone(),
                page_url: url.clone(),
                ..Default::default()
            }),
        ),
        event(
            "usage",
            pb::event::Payload::FeatureUsage(pb::FeatureUsageEvent {
                feature: "issue.create".into(),
                username: format!("zquux{i}"),
                project_id: format!("{i}"),
                project_key: c.key.clone(),
                project_name: c.name.clone(),
                count: 1,
                attributes: c.map(&[
                    &c.key,
                    &c.name,
                    &format!("zquux{i}"),
                    &format!("{} tool", c.name),
                ]),
                user_id: format!("u-{i}"),
                custom_app: true,
                custom_app_key: format!("com.acme.{}", c.key.to_lowercase()),
                custom_app_name: format!("{} tool", c.name),
                ..Default::default()
            }),
        ),
        event(
            "metric",
            pb::event::Payload::Metric(pb::MetricEvent {
                name: "http.latency".into(),
                r#type: common::MetricType::JmxMetric as i32,
                value: 12.5,
                attributes: c.map(&[]),
                tags: [
                    ("pluginKey".to_owned(), "com.acme".to_owned()),
                    ("remote".to_owned(), c.text(&[])),
                ]
                .into_iter()
                .collect(),
                unit: "ms".into(),
                periodic_sample: true,
                ..Default::default()
            }),
        ),
        event(
            "meta",
            pb::event::Payload::InstanceMetadata(pb::InstanceMetadataEvent {
                metadata: Some(common::InstanceMetadata {
                    server_id: format!("SRV-{i}"),
                    base_url: format!("https://{}/jira?admin={}", c.ip, c.pct_email()),
                    product: "jira".into(),
                    version: "9.12.4".into(),
                    nodes: vec![common::NodeInfo {
                        node_id: format!("node-{}", c.ip),
                        cpu_count: 4,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                app_links: vec![common::AppLink {
                    url: format!("https://{}/confluence", c.ip),
                    ..Default::default()
                }],
                attributes: c.map(&[]),
            }),
        ),
        event(
            "client",
            pb::event::Payload::ClientMetric(pb::ClientMetricEvent {
                name: "page.load".into(),
                p50_ms: 120.0,
                p95_ms: 900.0,
                error_rate: 0.01,
                sample_count: 10,
                attributes: c.map(&[]),
                window: None,
            }),
        ),
        event(
            "apps",
            pb::event::Payload::AppInventory(pb::AppInventoryEvent {
                apps: vec![common::AppInfo {
                    custom: true,
                    custom_key: format!("com.acme.{}", c.key),
                    custom_name: format!("{} by {}", c.name, c.email),
                    version: "1.0".into(),
                    ..Default::default()
                }],
            }),
        ),
        // Personal data in identifier fields: refused whole, never stored.
        event(
            "badid",
            pb::event::Payload::PageView(pb::PageViewEvent {
                page_id: c.email.clone(),
                channel: Channel::Desktop as i32,
                viewer_id: "u".into(),
                ..Default::default()
            }),
        ),
        event(
            "badname",
            pb::event::Payload::Metric(pb::MetricEvent {
                name: format!("latency.{}", c.ip),
                ..Default::default()
            }),
        ),
        pb::Event {
            event_id: c.ip.clone(),
            occurred_at: when,
            payload: Some(pb::event::Payload::Metric(pb::MetricEvent {
                name: "x".into(),
                ..Default::default()
            })),
        },
    ]
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

async fn canary(sharing: SharingLevel) {
    let log = logs();
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let collector = TestCollector::start(&linker, &consent, CollectorOptions::default()).await;
    let org = linker.org("Acme").await;
    let instance = linker.link_instance(&org, "SRV-A").await;
    opt_in(&consent, &org, UsageLevel::Advanced, sharing).await;
    track(
        &consent,
        &org,
        consent_pb::TrackingSettings {
            enabled_channels: vec![Channel::Desktop as i32],
            view_counter_enabled: true,
            ..Default::default()
        },
    )
    .await;
    let revision = policy(&consent, &org, &instance.id).await.revision;
    collector
        .wait_revision(&org.id, &instance.id, revision)
        .await;

    let mut accepted = 0;
    let mut invalid = 0;
    for chunk in 0..10 {
        let mut batch = Vec::new();
        for i in chunk * 40..(chunk + 1) * 40 {
            batch.extend(events(i, T0_MS));
        }
        let result = ingest(&collector, &instance, batch).await.unwrap();
        accepted += result.accepted;
        invalid += dropped(&result, DropReason::Invalid);
        for rejected in &result.rejected {
            assert!(
                !rejected.message.contains(EMAIL_MARK) && !rejected.message.contains(IP_MARK),
                "{}",
                rejected.message
            );
        }
    }
    assert_eq!(
        accepted,
        400 * 6,
        "every well-formed event is stored, de-identified"
    );
    assert_eq!(
        invalid,
        400 * 3,
        "personal data in an identifier refuses the event"
    );
    collector.maintenance.roll_up().await;

    let mut needles = vec![EMAIL_MARK, IP_MARK, DISPLAY_MARK];
    if sharing == SharingLevel::Basic {
        needles.extend([KEY_MARK, NAME_MARK]);
    }
    let mut scanned = 0;
    for file in files_under(linker.data_dir()) {
        let bytes = std::fs::read(&file).unwrap();
        scanned += bytes.len();
        let lower = bytes.to_ascii_lowercase();
        for needle in &needles {
            let needle = needle.to_ascii_lowercase();
            assert!(
                memchr::memmem::find(&lower, needle.as_bytes()).is_none(),
                "{needle} found in {}",
                file.display()
            );
        }
    }
    assert!(
        scanned > 100_000,
        "the database files were scanned ({scanned} bytes)"
    );
    let text = log.text().to_ascii_lowercase();
    for needle in &needles {
        assert!(
            !text.contains(&needle.to_ascii_lowercase()),
            "{needle} found in the logs"
        );
    }
    if sharing == SharingLevel::Extended {
        // What EXTENDED allows is kept: the canary would be void if keys never reached the store.
        let db = std::fs::read(linker.data_dir().join("collector-global.db")).unwrap();
        let wal =
            std::fs::read(linker.data_dir().join("collector-global.db-wal")).unwrap_or_default();
        let all = [db, wal].concat();
        assert!(memchr::memmem::find(&all, KEY_MARK.as_bytes()).is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_personal_data_survives_under_basic() {
    canary(SharingLevel::Basic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_personal_data_survives_under_extended() {
    canary(SharingLevel::Extended).await;
}
