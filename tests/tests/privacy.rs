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
use sightline_tests::collector::{TrackedStack, at, dropped, files_under, ingest, tracked_stack};
use sightline_tests::consent::policy;
use sightline_tests::{
    CollectorOptions, LinkerOptions, T0_MS, TestCollector, TestConsent, TestLinker, authed, logs,
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

async fn canary(sharing: SharingLevel) {
    let log = logs();
    // The services stop when dropped: consent-svc too is held to the end.
    let TrackedStack {
        linker,
        consent: _consent,
        collector,
        instance,
        ..
    } = tracked_stack(
        CollectorOptions::default(),
        sharing,
        consent_pb::TrackingSettings {
            enabled_channels: vec![Channel::Desktop as i32],
            view_counter_enabled: true,
            ..Default::default()
        },
    )
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

fn contains(haystack: &[u8], needle: &str) -> bool {
    memchr::memmem::find(haystack, needle.as_bytes()).is_some()
}

/// After EraseViewer no byte of the viewer's pseudonym is left in any file of the data directory
/// (the collector's SQLite file, its WAL and shared memory, a journal, the linker's audit store):
/// deleted rows are zeroed (`secure_delete`) and the WAL is checkpointed and truncated. The audit
/// entry names the erasure by a random reference and every store it touched, with counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_viewer_leaves_no_byte_in_any_file_and_the_log_does_not_name_them() {
    let s = tracked_stack(
        CollectorOptions::default(),
        SharingLevel::Basic,
        consent_pb::TrackingSettings {
            enabled_channels: vec![Channel::Desktop as i32],
            blocking_time_ms: 60_000,
            view_counter_enabled: true,
            ..Default::default()
        },
    )
    .await;
    let view = |i: usize, viewer: &str| pb::Event {
        event_id: format!(
            "v-{}-{i}",
            viewer.len() + usize::from(viewer.starts_with('a'))
        ),
        // In time order (views blocked by the blocking time are not what this is about).
        occurred_at: at(T0_MS - (200 - i as i64) * 120_000),
        payload: Some(pb::event::Payload::PageView(pb::PageViewEvent {
            page_id: format!("{}", i % 7),
            space_id: "4501".into(),
            viewer_id: viewer.into(),
            channel: Channel::Desktop as i32,
            ..Default::default()
        })),
    };
    let usage = |i: usize, user: &str| pb::Event {
        event_id: format!("f-{}-{i}", user.len()),
        occurred_at: at(T0_MS - (i as i64) * 1_000),
        payload: Some(pb::event::Payload::FeatureUsage(pb::FeatureUsageEvent {
            feature: "issue.create".into(),
            user_id: user.into(),
            count: 1,
            ..Default::default()
        })),
    };
    for chunk in 0..4 {
        let mut batch = Vec::new();
        for i in chunk * 50..(chunk + 1) * 50 {
            batch.extend([view(i, "alice-w"), view(i, "bob-w"), usage(i, "alice-w")]);
        }
        ingest(&s.collector, &s.instance, batch).await.unwrap();
    }
    // The pseudonym alice-w is stored as (PreviewSample runs the same code).
    let preview = s
        .collector
        .client()
        .await
        .preview_sample(authed(
            &s.instance.credential,
            pb::PreviewSampleRequest {
                events: vec![view(0, "alice-w")],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::event::Payload::PageView(stored)) = preview.events[0]
        .stored
        .as_ref()
        .and_then(|e| e.payload.clone())
    else {
        panic!("the preview keeps the view: {preview:?}");
    };
    let pseudonym = stored.viewer_id;
    assert!(pseudonym.starts_with("psn1_"), "{pseudonym}");
    let everything = || {
        files_under(s.linker.data_dir())
            .into_iter()
            .map(|f| (f.clone(), std::fs::read(&f).unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    assert!(
        everything().iter().any(|(_, b)| contains(b, &pseudonym)),
        "the pseudonym was in the files before the erasure (the test is not void)"
    );

    let erased = s
        .collector
        .client()
        .await
        .erase_viewer(authed(
            &s.org.admin,
            pb::EraseViewerRequest {
                org_id: s.org.id.clone(),
                instance_id: s.instance.id.clone(),
                viewer_id: "alice-w".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.page_views_deleted, 200);
    assert_eq!(erased.feature_usage_deleted, 200);
    let stores: Vec<(&str, &str, u64)> = erased
        .stores
        .iter()
        .map(|c| (c.store.as_str(), c.kind.as_str(), c.deleted))
        .collect();
    assert!(
        stores.contains(&("collector/global", "page_views", 200)),
        "{stores:?}"
    );
    assert!(
        stores.contains(&("collector/global", "feature_usage", 200)),
        "{stores:?}"
    );
    assert!(erased.erasure_ref.starts_with("erasure:"));

    for (file, bytes) in everything() {
        if let Some(at) = memchr::memmem::find(&bytes, pseudonym.as_bytes()) {
            let from = at.saturating_sub(200);
            panic!(
                "the erased pseudonym is still in {} at {at} (page {}): {:?}",
                file.display(),
                at / 4096,
                String::from_utf8_lossy(&bytes[from..(at + 100).min(bytes.len())])
            );
        }
        assert!(
            !contains(&bytes, "alice-w"),
            "the viewer id is in {}",
            file.display()
        );
    }
    // bob's views are untouched.
    let reply = s
        .collector
        .client()
        .await
        .get_view_count(authed(
            &s.instance.credential,
            pb::GetViewCountRequest {
                page_id: "0".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.views > 0);

    let entries: Vec<_> = s
        .linker
        .audit_events(&s.org)
        .await
        .into_iter()
        .filter(|e| e.action == "collector.viewer_erased")
        .collect();
    assert_eq!(entries.len(), 1);
    let entry = format!("{:?}", entries[0]);
    assert!(
        !entry.contains(&pseudonym),
        "the audit entry names the pseudonym: {entry}"
    );
    assert!(!entry.contains("alice-w"), "{entry}");
    assert_eq!(entries[0].target, erased.erasure_ref);
    assert_eq!(
        entries[0].attributes.get("page_views").map(String::as_str),
        Some("200")
    );
    assert_eq!(
        entries[0].attributes.get("stores").map(String::as_str),
        Some("collector/global")
    );
}

/// Orgs that send `db.latency` (one value each) with their product, contributing in-app data.
async fn contributing_orgs(
    linker: &TestLinker,
    consent: &TestConsent,
    collector: &TestCollector,
    hour: i64,
    orgs: &[(&str, f64)],
) -> Vec<(sightline_tests::TestOrg, sightline_tests::TestInstance)> {
    let mut made = Vec::new();
    for (i, (product, value)) in orgs.iter().enumerate() {
        let org = linker.org(&format!("Org {i}")).await;
        let instance = linker.link_instance(&org, &format!("SRV-{i}")).await;
        sightline_tests::consent::update(
            consent,
            &org,
            consent_pb::ConsentSettings {
                usage_level: UsageLevel::Basic as i32,
                sharing_level: SharingLevel::Basic as i32,
                contribute_in_app_data: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let revision = policy(consent, &org, &instance.id).await.revision;
        collector
            .wait_revision(&org.id, &instance.id, revision)
            .await;
        let meta = pb::Event {
            event_id: "meta".into(),
            occurred_at: at(hour),
            payload: Some(pb::event::Payload::InstanceMetadata(
                pb::InstanceMetadataEvent {
                    metadata: Some(common::InstanceMetadata {
                        server_id: format!("SRV-{i}"),
                        product: (*product).into(),
                        version: "1.0".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )),
        };
        ingest(
            collector,
            &instance,
            vec![
                meta,
                sightline_tests::collector::metric("a", hour + 1, "db.latency", *value),
            ],
        )
        .await
        .unwrap();
        made.push((org, instance));
    }
    collector.maintenance.roll_up().await;
    made
}

fn aggregate_query(
    hour: i64,
    group_by: pb::AggregateGroupBy,
    add_noise: bool,
) -> pb::GetContributedAggregatesRequest {
    pb::GetContributedAggregatesRequest {
        metric_name: "db.latency".into(),
        range: Some(common::TimeRange {
            start: at(hour),
            end: at(hour + 3_600_000),
        }),
        add_noise,
        group_by: group_by as i32,
        interval: pb::AggregateInterval::Total as i32,
        ..Default::default()
    }
}

/// A stack whose orgs contribute `values` to `db.latency` in one hour, and the operator's question.
struct Contributed {
    linker: TestLinker,
    consent: TestConsent,
    collector: TestCollector,
    orgs: Vec<(sightline_tests::TestOrg, sightline_tests::TestInstance)>,
    hour: i64,
}

impl Contributed {
    async fn start(options: CollectorOptions, values: &[(&str, f64)]) -> Self {
        let hour = (T0_MS - 2 * 3_600_000) / 3_600_000 * 3_600_000;
        let linker = TestLinker::start(LinkerOptions::default()).await;
        let consent = TestConsent::start(&linker, None, Limits::default()).await;
        let collector = TestCollector::start(&linker, &consent, options).await;
        let orgs = contributing_orgs(&linker, &consent, &collector, hour, values).await;
        Self {
            linker,
            consent,
            collector,
            orgs,
            hour,
        }
    }

    async fn ask(
        &self,
        group_by: pb::AggregateGroupBy,
        add_noise: bool,
    ) -> Result<pb::GetContributedAggregatesResponse, tonic::Status> {
        self.collector
            .client()
            .await
            .get_contributed_aggregates(authed(
                self.linker.operator.expose(),
                aggregate_query(self.hour, group_by, add_noise),
            ))
            .await
            .map(tonic::Response::into_inner)
    }
}

/// The differencing attack: a 6-org cell (no grouping) and a 5-org cell (jira only) give the one
/// confluence org's value as 6 × mean₆ − 5 × mean₅. With exact figures (only when the operator
/// turns privacy off) it works to the last digit; with the defaults every release is noised and
/// the subtraction misses by far more than the value's own size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_cells_cannot_be_subtracted_to_recover_one_org_under_defaults() {
    let values = [
        ("jira", 120.0),
        ("jira", 180.0),
        ("jira", 240.0),
        ("jira", 300.0),
        ("jira", 360.0),
        ("confluence", 555.0),
    ];
    let recover = |six: &pb::GetContributedAggregatesResponse,
                   five: &pb::GetContributedAggregatesResponse| {
        let mean = |r: &pb::GetContributedAggregatesResponse, group: &str| {
            r.buckets.iter().find(|b| b.bucket == group).map(|b| b.mean)
        };
        Some(6.0 * mean(six, "")? - 5.0 * mean(five, "jira")?)
    };

    // Privacy turned off by the operator: the attack recovers the org's exact value.
    let mut exact = CollectorOptions::default();
    exact.collection.exact_aggregates_reveal_orgs = true;
    let stack = Contributed::start(exact, &values).await;
    let six = stack.ask(pb::AggregateGroupBy::None, false).await.unwrap();
    let five = stack
        .ask(pb::AggregateGroupBy::Product, false)
        .await
        .unwrap();
    let recovered = recover(&six, &five).expect("both cells are shown");
    assert!((recovered - 555.0).abs() < 1e-6, "{recovered}");
    drop(stack);

    // The defaults (only the budget raised, to ask many times): private, and the subtraction
    // misses every time. add_noise = false: exact figures are not the caller's to choose.
    let mut defaults = CollectorOptions::default();
    defaults.collection.epsilon_budget = 1_000.0;
    let stack = Contributed::start(defaults, &values).await;
    let mut pairs = 0;
    for _ in 0..60 {
        let six = stack.ask(pb::AggregateGroupBy::None, false).await.unwrap();
        let five = stack
            .ask(pb::AggregateGroupBy::Product, false)
            .await
            .unwrap();
        for reply in [&six, &five] {
            assert_eq!(reply.epsilon_spent, 1.0, "the default epsilon is charged");
            assert!(reply.epsilon_per_bucket > 0.0 && reply.epsilon_per_bucket <= 1.0);
            for bucket in &reply.buckets {
                assert!(bucket.noised && bucket.noise_scale > 0.0, "{bucket:?}");
            }
        }
        if let Some(recovered) = recover(&six, &five) {
            pairs += 1;
            assert!(
                (recovered - 555.0).abs() > 1.0,
                "one org's value recovered by subtraction: {recovered}"
            );
        }
    }
    assert!(
        pairs > 0,
        "some pairs of cells were shown (the test is not void)"
    );
}

/// The same query asked again is charged again: noise cannot be averaged away for free, and the
/// budget (10 by default, 1 per call by default) ends the series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeating_a_query_spends_the_budget_until_nothing_is_released() {
    let values: Vec<(&str, f64)> = (0..6).map(|i| ("jira", 100.0 + f64::from(i))).collect();
    let stack = Contributed::start(CollectorOptions::default(), &values).await;
    for call in 0..10 {
        let reply = stack
            .ask(pb::AggregateGroupBy::None, true)
            .await
            .unwrap_or_else(|e| panic!("call {call}: {e}"));
        assert_eq!(reply.epsilon_spent, 1.0);
    }
    let refused = stack
        .ask(pb::AggregateGroupBy::None, true)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
}

/// An org that sets usage DISABLED (its contribution flags left on) is not counted in any
/// aggregate answered once the change has reached the collector, whether or not its purge has
/// run: the policy says it contributes nothing, and the collector checks what the org collects
/// when it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_org_is_not_counted_even_before_its_purge() {
    let mut exact = CollectorOptions::default();
    exact.collection.exact_aggregates_reveal_orgs = true;
    exact.collection.min_orgs = 2;
    let values = [("jira", 100.0), ("jira", 200.0), ("jira", 900.0)];
    let stack = Contributed::start(exact, &values).await;
    let mean =
        |r: pb::GetContributedAggregatesResponse| r.buckets.first().map(|b| (b.org_count, b.mean));
    let before = stack.ask(pb::AggregateGroupBy::None, false).await.unwrap();
    assert_eq!(mean(before), Some((3, 400.0)));

    let (org, instance) = &stack.orgs[2];
    sightline_tests::consent::update(
        &stack.consent,
        org,
        consent_pb::ConsentSettings {
            usage_level: UsageLevel::Disabled as i32,
            sharing_level: SharingLevel::Basic as i32,
            contribute_in_app_data: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let disabled = policy(&stack.consent, org, &instance.id).await;
    assert!(
        disabled.contribute_in_app_data_kinds.is_empty() && !disabled.contribute_in_app_data,
        "the policy of a DISABLED org says it contributes nothing: {disabled:?}"
    );
    stack
        .collector
        .wait_revision(&org.id, &instance.id, disabled.revision)
        .await;
    let after = stack.ask(pb::AggregateGroupBy::None, false).await.unwrap();
    assert_eq!(mean(after), Some((2, 150.0)));
}
