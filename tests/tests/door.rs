//! The door, tried as a hostile tester would: a generator composes personal data (e-mails with
//! plus-addressing and IDN, IPv4, IPv6 in its textual forms, display names, usernames) with every
//! encoding a browser, a JSON or HTML writer or a form produces, up to three deep, and places it in
//! every free-text field of every event kind. Nothing stored, previewed or returned by a read API
//! may hold it in any form — first at the enforcement code (thousands of cases), then through a
//! real collector on SQLite and on PostgreSQL, scanning the bytes of every database file.
//! The same property is held over insights-svc's support-bundle scrubbing and the companion's
//! inbox.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use collector_svc::enforce::{Plan, Verdict, enforce};
use collector_svc::fields::ClassTable;
use consent_svc::domain::{Sharing, Usage};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRng, TestRunner};
use prost::Message;
use sightline_proto::collector::v1::{self as pb, event::Payload};
use sightline_proto::common::v1::{self as common, Channel, SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::pseudonym::PseudonymSecret;
use sightline_tests::collector::{TrackedStack, at, files_under, ingest, tracked_stack};
use sightline_tests::pii::{self, Encoding, Pii};
use sightline_tests::{CollectorOptions, T0_MS, authed};

const NOW: i64 = T0_MS;

fn plan(sharing: Sharing) -> Plan {
    let policy = consent_pb::Policy {
        org_id: "11111111-1111-4111-8111-111111111111".into(),
        consent_version: 3,
        revision: 7,
        usage_level: UsageLevel::Advanced as i32,
        sharing_level: if sharing == Sharing::Extended {
            SharingLevel::Extended
        } else {
            SharingLevel::Basic
        } as i32,
        allowed_kinds: consent_svc::domain::allowed_kinds(Usage::Advanced, true)
            .into_iter()
            .map(|k| k as i32)
            .collect(),
        field_rules: consent_svc::domain::field_rules(sharing),
        pseudonym_key_version: 1,
        tracking: Some(consent_pb::TrackingSettings {
            enabled_channels: vec![Channel::Desktop as i32],
            ..Default::default()
        }),
        retention: Some(consent_pb::RetentionSettings {
            raw_days: 730,
            event_id_days: 35,
            ..Default::default()
        }),
        ..Default::default()
    };
    let classes = Arc::new(ClassTable::from_contract().unwrap());
    let key = PseudonymSecret::new(1, [9; 32]).org_key(&policy.org_id);
    Plan::compile(&policy, classes, Some(key), Arc::from(Vec::new()))
}

fn map(text: &str) -> HashMap<String, String> {
    [
        ("note".to_owned(), format!("seen {text} today")),
        ("raw".to_owned(), text.to_owned()),
        (format!("k {text}"), "v".to_owned()),
    ]
    .into_iter()
    .collect()
}

/// Events of every kind with `text` (the planted form) in every free-text field, and the value
/// itself in its own field where the event has one (only then can it be known for what it is).
fn events(i: usize, pii: &Pii, text: &str) -> Vec<pb::Event> {
    let event = |kind: &str, payload| pb::Event {
        event_id: format!("{kind}-{i}"),
        occurred_at: at(NOW - 1_000),
        payload: Some(payload),
    };
    let (display, email, ip, username) = match pii {
        Pii::DisplayName(v) => (v.clone(), String::new(), String::new(), String::new()),
        Pii::Email(v) => (String::new(), v.clone(), String::new(), String::new()),
        Pii::Ip(v) => (String::new(), String::new(), v.clone(), String::new()),
        Pii::Username(v) => (String::new(), String::new(), String::new(), v.clone()),
    };
    let mut all = vec![event(
        "view",
        Payload::PageView(pb::PageViewEvent {
            page_id: format!("{i}"),
            space_id: "4501".into(),
            page_title: format!("Notes of {text}"),
            space_name: format!("Space {text}"),
            viewer_id: if username.is_empty() {
                format!("u-{i}")
            } else {
                username.clone()
            },
            channel: Channel::Desktop as i32,
            viewer_display_name: display,
            viewer_email: email,
            client_ip: ip,
            page_url: format!("https://wiki.example/display/{text}/x?q={text}&d={text}#{text}"),
            ..Default::default()
        }),
    )];
    // A display name is known for what it is only in a page view (its own field).
    if !matches!(pii, Pii::DisplayName(_)) {
        all.push(event(
            "usage",
            Payload::FeatureUsage(pb::FeatureUsageEvent {
                feature: "issue.create".into(),
                username: if username.is_empty() {
                    "zzbuilder".into()
                } else {
                    username.clone()
                },
                project_id: "10042".into(),
                project_name: format!("Project {text}"),
                count: 1,
                attributes: map(text),
                user_id: format!("u-{i}"),
                ..Default::default()
            }),
        ));
    }
    if pii.is_self_evident() {
        all.extend([
            event(
                "metric",
                Payload::Metric(pb::MetricEvent {
                    name: "http.latency".into(),
                    r#type: common::MetricType::JmxMetric as i32,
                    value: 12.5,
                    attributes: map(text),
                    tags: map(text),
                    unit: "ms".into(),
                    periodic_sample: true,
                    ..Default::default()
                }),
            ),
            event(
                "meta",
                Payload::InstanceMetadata(pb::InstanceMetadataEvent {
                    metadata: Some(common::InstanceMetadata {
                        server_id: format!("SRV-{i}"),
                        base_url: format!("https://jira.example/{text}?admin={text}"),
                        product: "jira".into(),
                        version: "9.12.4".into(),
                        ..Default::default()
                    }),
                    app_links: vec![common::AppLink {
                        url: format!("https://wiki.example/?from={text}"),
                        ..Default::default()
                    }],
                    attributes: map(text),
                }),
            ),
            event(
                "client",
                Payload::ClientMetric(pb::ClientMetricEvent {
                    name: "page.load".into(),
                    p50_ms: 120.0,
                    p95_ms: 900.0,
                    sample_count: 10,
                    attributes: map(text),
                    ..Default::default()
                }),
            ),
            event(
                "apps",
                Payload::AppInventory(pb::AppInventoryEvent {
                    apps: vec![common::AppInfo {
                        custom: true,
                        custom_key: format!("com.acme.app{i}"),
                        custom_name: format!("Tool of {text}"),
                        version: "1.0".into(),
                        ..Default::default()
                    }],
                }),
            ),
        ]);
    }
    all
}

/// Enforces every event of one planted value under `plan`; the stored forms that leak it.
fn leaks_at_the_door(plan: &Plan, pii: &Pii, encodings: &[Encoding]) -> Vec<String> {
    let (text, forms) = pii::plant(pii.value(), encodings);
    let mut leaks = Vec::new();
    let mut kept = 0;
    for event in events(0, pii, &text) {
        let enforced = enforce(plan, event, 0, NOW, true);
        if let Verdict::Keep(stored) = enforced.verdict {
            kept += 1;
            let bytes = stored.event.encode_to_vec();
            let stored_text = String::from_utf8_lossy(&bytes);
            if pii.leaks(&pii::Haystack::new(&stored_text), &forms) {
                leaks.push(format!("{:?}: {stored_text:?}", stored.kind));
            }
        }
    }
    assert!(
        kept >= 1,
        "the events were stored (the property is not void)"
    );
    leaks
}

proptest! {
    #![proptest_config(Config { cases: 2_000, ..Config::default() })]

    #[test]
    fn no_encoding_carries_personal_data_past_the_door(
        pii in pii::pii(),
        encodings in pii::encodings(),
        extended in any::<bool>(),
    ) {
        let plan = plan(if extended { Sharing::Extended } else { Sharing::Basic });
        let leaks = leaks_at_the_door(&plan, &pii, &encodings);
        prop_assert!(leaks.is_empty(), "{pii:?} through {encodings:?} (extended: {extended}) kept in {leaks:#?}");
    }

    #[test]
    fn support_bundle_lines_keep_no_personal_data(
        pii in pii::pii(),
        encodings in pii::encodings(),
        shape in 0..4usize,
    ) {
        let (text, forms) = pii::plant(pii.value(), &encodings);
        // A person's name or username is known in a log by the key it stands after.
        let line = match (&pii, shape) {
            (Pii::DisplayName(_), 0) => format!("{{\"displayName\": \"{text}\", \"at\": 1}}"),
            (Pii::DisplayName(_), _) => format!("INFO login displayName={} ok", text.replace(' ', "+")),
            (Pii::Username(_), 0) => format!("{{\"user\":\"{text}\"}}"),
            (Pii::Username(_), _) => format!("GET /rest?username={text} 200"),
            (_, 0) => format!("2026-11-02 INFO request from {text} served"),
            (_, 1) => format!("{{\"client\":\"{text}\",\"ms\":3}}"),
            (_, 2) => format!("GET /login?next={text}&x=1 200"),
            (_, _) => format!("<td>{text}</td>"),
        };
        let mut treated = insights_svc::enforce::Treated::default();
        let clean = insights_svc::upload::scrub_text(&line, &mut treated);
        prop_assert!(!pii.leaks(&pii::Haystack::new(&clean), &forms), "{pii:?} through {encodings:?}: {line:?} became {clean:?}");
    }
}

proptest! {
    #![proptest_config(Config { cases: 300, ..Config::default() })]

    /// What a product drops in the companion's inbox goes through the same door: the inbox's
    /// attributes, tags and value names, read by the companion and enforced as the collector does.
    #[test]
    fn the_companion_inbox_carries_no_personal_data_past_the_door(
        pii in pii::pii().prop_filter("known without its own field", Pii::is_self_evident),
        encodings in pii::encodings(),
        extended in any::<bool>(),
    ) {
        let (text, forms) = pii::plant(pii.value(), &encodings);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("product.jsonl");
        let line = serde_json::json!({
            "name": "jvm.heap.used",
            "value": 812.5,
            "unit": "MiB",
            "at": sightline_tests::rfc3339(NOW - 1_000),
            "attributes": {"note": format!("seen {text}"), text.clone(): "v"},
            "tags": {"node": text.clone()},
            "values": {text.clone(): 1.0},
        });
        std::fs::write(&path, format!("{line}\n")).unwrap();
        let mut events = Vec::new();
        sightline_companion::sampler::read_inbox(&path, 100, &mut |chunk| {
            events.extend(chunk);
            Ok(())
        })
        .unwrap();
        prop_assert_eq!(events.len(), 1);
        let plan = plan(if extended { Sharing::Extended } else { Sharing::Basic });
        for event in events {
            if let Verdict::Keep(stored) = enforce(&plan, event, 0, NOW, true).verdict {
                let bytes = stored.event.encode_to_vec();
                let stored_text = String::from_utf8_lossy(&bytes);
                prop_assert!(
                    !pii.leaks(&pii::Haystack::new(&stored_text), &forms),
                    "{pii:?} through {encodings:?}: {stored_text:?}"
                );
            }
        }
    }
}

/// The four encodings the hostile tester found, each alone, at the enforcement code: each failed
/// before the scrubber decoded by what text may hold.
#[test]
fn named_references_nested_escapes_base64_json_and_form_encoding_are_caught() {
    let email = Pii::Email("mara.voss@host.example".into());
    let display = Pii::DisplayName("Mara Voss".into());
    for sharing in [Sharing::Basic, Sharing::Extended] {
        let plan = plan(sharing);
        for (pii, encodings) in [
            (&email, vec![Encoding::HtmlNamed]),
            (&email, vec![Encoding::JsonInJson]),
            (&email, vec![Encoding::JsonEscape, Encoding::JsonInJson]),
            (&email, vec![Encoding::Base64Json]),
            (&email, vec![Encoding::Base64Url]),
            (&email, vec![Encoding::Form]),
            (&display, vec![Encoding::Form]),
            (&display, vec![Encoding::HtmlNamed]),
        ] {
            let leaks = leaks_at_the_door(&plan, pii, &encodings);
            assert!(
                leaks.is_empty(),
                "{sharing:?} {pii:?} {encodings:?}: {leaks:#?}"
            );
        }
    }
}

/// Generated cases from a fixed seed, so a real stack gets the same ones every run.
fn generated(n: usize) -> Vec<(Pii, Vec<Encoding>)> {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &[7; 32]),
    );
    let strategy = (pii::pii(), pii::encodings());
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// Every generated case through a real collector: what Ingest stores (every file, or every row
/// on PostgreSQL), what PreviewSample shows and what QueryMetrics returns hold none of it.
async fn through_a_real_collector(database_url: Option<String>, sharing: SharingLevel) {
    // The services stop when dropped: consent-svc too is held to the end.
    let TrackedStack {
        linker,
        consent: _consent,
        collector,
        org,
        instance,
        ..
    } = tracked_stack(
        CollectorOptions {
            database_url: database_url.clone(),
            ..CollectorOptions::default()
        },
        sharing,
        consent_pb::TrackingSettings {
            enabled_channels: vec![Channel::Desktop as i32],
            ..Default::default()
        },
    )
    .await;

    let cases = generated(300);
    let mut planted = Vec::new();
    let mut previews = Vec::new();
    let mut accepted = 0;
    for (i, (pii, encodings)) in cases.iter().enumerate() {
        let (text, forms) = pii::plant(pii.value(), encodings);
        let batch = events(i, pii, &text);
        let preview = collector
            .client()
            .await
            .preview_sample(authed(
                &instance.credential,
                pb::PreviewSampleRequest {
                    events: batch.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        previews.push(format!("{preview:?}"));
        accepted += ingest(&collector, &instance, batch).await.unwrap().accepted;
        planted.push((pii.clone(), encodings.clone(), forms));
    }
    assert!(accepted > 600, "the events were stored ({accepted})");

    let metrics = collector
        .client()
        .await
        .query_metrics(authed(
            &org.admin,
            pb::QueryMetricsRequest {
                org_id: org.id.clone(),
                instance_id: instance.id.clone(),
                metric_name: "http.latency".into(),
                range: Some(common::TimeRange {
                    start: at(NOW - 3_600_000),
                    end: at(NOW + 60_000),
                }),
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let replies = format!("{metrics:?}");

    let stored: Vec<(String, Vec<u8>)> = match &database_url {
        None => files_under(linker.data_dir())
            .into_iter()
            .map(|f| (f.display().to_string(), std::fs::read(&f).unwrap()))
            .collect(),
        Some(url) => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let rows: Vec<(Option<Vec<u8>>,)> = sqlx::query_as("SELECT body FROM events")
                .fetch_all(&pool)
                .await
                .unwrap();
            vec![(
                "events.body".to_owned(),
                rows.into_iter()
                    .flat_map(|(b,)| b.unwrap_or_default())
                    .collect(),
            )]
        }
    };
    let stored: Vec<(String, pii::Haystack)> = stored
        .iter()
        .map(|(name, bytes)| {
            (
                name.clone(),
                pii::Haystack::new(&String::from_utf8_lossy(bytes)),
            )
        })
        .collect();
    let replies = pii::Haystack::new(&format!("{replies}{}", previews.join("\n")));
    let mut leaked = Vec::new();
    for (pii, encodings, forms) in &planted {
        for (name, haystack) in &stored {
            if pii.leaks(haystack, forms) {
                leaked.push(format!("{pii:?} through {encodings:?} in {name}"));
            }
        }
        if pii.leaks(&replies, forms) {
            leaked.push(format!("{pii:?} through {encodings:?} in a reply"));
        }
    }
    assert!(
        leaked.is_empty(),
        "{} of {} planted values kept: {leaked:#?}",
        leaked.len(),
        planted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_collector_on_sqlite_keeps_no_generated_canary_under_basic() {
    through_a_real_collector(None, SharingLevel::Basic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_collector_on_sqlite_keeps_no_generated_canary_under_extended() {
    through_a_real_collector(None, SharingLevel::Extended).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_collector_on_postgres_keeps_no_generated_canary() {
    let url = sightline_runtime::testing::fresh_postgres_url()
        .await
        .unwrap();
    through_a_real_collector(Some(url.clone()), SharingLevel::Basic).await;
    let url = sightline_runtime::testing::fresh_postgres_url()
        .await
        .unwrap();
    through_a_real_collector(Some(url), SharingLevel::Extended).await;
}
