//! Tests of `enforce`.

use prost::Message;
use sightline_proto::common::v1::{SharingLevel as Sharing, UsageLevel as Usage};
use sightline_proto::rules as domain;
use sightline_runtime::pseudonym::PseudonymSecret;

use super::*;

const ORG: &str = "0190a000-0000-7000-8000-000000000001";
const NOW: i64 = 1_800_000_000_000;

fn policy(usage: Usage, sharing: Sharing) -> consent_pb::Policy {
    consent_pb::Policy {
        org_id: ORG.into(),
        consent_version: 3,
        revision: 7,
        sharing_level: sharing as i32,
        allowed_kinds: domain::allowed_kinds(usage, true)
            .into_iter()
            .map(|k| k as i32)
            .collect(),
        field_rules: domain::field_rules(sharing),
        pseudonym_key_version: 1,
        tracking: Some(consent_pb::TrackingSettings {
            enabled_channels: vec![common::Channel::Desktop as i32],
            exclude_anonymous: true,
            excluded_groups: vec!["bots".into()],
            blocking_time_ms: 60_000,
            view_counter_enabled: true,
            global_report_group: String::new(),
        }),
        retention: Some(consent_pb::RetentionSettings {
            raw_days: 730,
            event_id_days: 35,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn plan(usage: Usage, sharing: Sharing) -> Plan {
    let classes = Arc::new(ClassTable::from_contract().unwrap());
    let key = PseudonymSecret::new(1, [9; 32]).org_key(ORG);
    Plan::compile(
        &policy(usage, sharing),
        classes,
        Some(key),
        Arc::from(Vec::new()),
    )
}

fn at(ms: i64) -> Option<prost_types::Timestamp> {
    Some(sightline_runtime::time::to_proto(ms))
}

fn event(id: &str, payload: Payload) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        occurred_at: at(NOW - 1_000),
        payload: Some(payload),
    }
}

fn page_view() -> pb::PageViewEvent {
    pb::PageViewEvent {
        page_id: "p-1".into(),
        space_id: "s-1".into(),
        page_title: "Roadmap for Carol Danvers".into(),
        space_key: "ROAD".into(),
        space_name: "Roadmaps".into(),
        viewer_id: "u-42".into(),
        viewer_groups: vec!["staff".into()],
        channel: common::Channel::Desktop as i32,
        viewer_display_name: "Carol Danvers".into(),
        viewer_email: "carol@example.com".into(),
        client_ip: "10.1.2.3".into(),
        page_url: "https://wiki.example.com/p/1?from=carol%40example.com&ip=10.1.2.3".into(),
        ..Default::default()
    }
}

fn kept(e: Enforced) -> StoredEvent {
    match e.verdict {
        Verdict::Keep(stored) => *stored,
        other => panic!("not kept: {other:?}"),
    }
}

fn stored_text(stored: &StoredEvent) -> String {
    format!("{:?}", stored.event)
}

#[test]
fn personal_data_never_survives_a_page_view_under_extended() {
    let plan = plan(Usage::Advanced, Sharing::Extended);
    let e = enforce(
        &plan,
        event("e1", Payload::PageView(page_view())),
        0,
        NOW,
        true,
    );
    let report = e.report.clone().unwrap();
    let stored = kept(e);
    let text = stored_text(&stored);
    for secret in [
        "carol@example.com",
        "carol%40example.com",
        "10.1.2.3",
        "Carol Danvers",
        "u-42",
        "staff",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let Some(Payload::PageView(v)) = &stored.event.payload else {
        panic!()
    };
    assert_eq!(v.page_title, "Roadmap for [redacted]");
    assert_eq!(v.space_key, "ROAD");
    assert!(v.viewer_id.starts_with("psn1_"));
    assert_eq!(stored.subject.as_deref(), Some(v.viewer_id.as_str()));
    assert!(v.page_url.contains("from=[email]") && v.page_url.contains("ip=[ip]"));
    assert!(
        report
            .removed
            .contains(&"page_view.viewer_email".to_owned())
    );
    assert!(report.hashed.contains(&"page_view.viewer_id".to_owned()));
    assert!(report.scrubbed.contains(&"page_view.page_url".to_owned()));
}

#[test]
fn basic_drops_keys_and_names_also_from_free_text() {
    let plan = plan(Usage::Advanced, Sharing::Basic);
    let usage = pb::FeatureUsageEvent {
        feature: "issue.create".into(),
        username: "cdanvers".into(),
        project_id: "10001".into(),
        project_key: "APOLLO".into(),
        project_name: "Apollo Launch".into(),
        count: 3,
        user_id: "u-42".into(),
        custom_app: true,
        custom_app_key: "com.acme.secret-tool".into(),
        custom_app_name: "Acme Secret Tool".into(),
        attributes: [
            (
                "note".to_owned(),
                "APOLLO-12 by cdanvers in Apollo Launch".to_owned(),
            ),
            (
                "json".to_owned(),
                r#"{"mail":"cdanvers\u0040acme.test"}"#.to_owned(),
            ),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let stored = kept(enforce(
        &plan,
        event("e2", Payload::FeatureUsage(usage)),
        0,
        NOW,
        false,
    ));
    let text = stored_text(&stored);
    for secret in [
        "APOLLO",
        "Apollo Launch",
        "cdanvers",
        "Acme Secret Tool",
        "com.acme.secret-tool",
        "acme.test",
    ] {
        assert!(
            !text.to_lowercase().contains(&secret.to_lowercase()),
            "{secret} in {text}"
        );
    }
    let Some(Payload::FeatureUsage(f)) = &stored.event.payload else {
        panic!()
    };
    assert_eq!(f.project_id, "10001");
    assert_eq!(f.count, 3);
    assert!(f.custom_app_name.starts_with("psn1_"));
    assert!(f.username.starts_with("psn1_"));
}

#[test]
fn a_metric_passes_untouched() {
    let plan = plan(Usage::Basic, Sharing::Basic);
    let metric = pb::MetricEvent {
        name: "jvm.cpu.load".into(),
        r#type: common::MetricType::JmxMetric as i32,
        value: 0.42,
        unit: "ratio".into(),
        periodic_sample: true,
        tags: [("pluginKey".to_owned(), "com.atlassian.jira".to_owned())]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let original = event("m1", Payload::Metric(metric));
    let stored = kept(enforce(&plan, original.clone(), 0, NOW, false));
    assert_eq!(stored.event, original);
    assert_eq!(stored.event.encode_to_vec(), original.encode_to_vec());
    assert_eq!(stored.value, Some(0.42));
    assert_eq!(stored.name, "jvm.cpu.load");
}

#[test]
fn the_policy_decides_which_kinds_are_stored() {
    let view = || event("v", Payload::PageView(page_view()));
    let basic = plan(Usage::Basic, Sharing::Basic);
    assert!(matches!(
        enforce(&basic, view(), 0, NOW, false).verdict,
        Verdict::Drop(DropReason::Consent)
    ));
    let disabled = plan(Usage::Disabled, Sharing::Basic);
    let metric = event(
        "m",
        Payload::Metric(pb::MetricEvent {
            name: "x".into(),
            ..Default::default()
        }),
    );
    assert!(matches!(
        enforce(&disabled, metric, 0, NOW, false).verdict,
        Verdict::Drop(DropReason::Consent)
    ));
}

#[test]
fn view_tracking_filters_by_channel_anonymity_and_group() {
    let plan = plan(Usage::Advanced, Sharing::Basic);
    let with = |f: fn(&mut pb::PageViewEvent)| {
        let mut v = page_view();
        f(&mut v);
        enforce(&plan, event("v", Payload::PageView(v)), 0, NOW, false).verdict
    };
    assert!(matches!(
        with(|v| v.channel = common::Channel::MobileApp as i32),
        Verdict::Drop(DropReason::Channel)
    ));
    assert!(matches!(
        with(|v| v.viewer_id.clear()),
        Verdict::Drop(DropReason::Anonymous)
    ));
    assert!(matches!(
        with(|v| v.anonymous = true),
        Verdict::Drop(DropReason::Anonymous)
    ));
    assert!(matches!(
        with(|v| v.viewer_groups.push("bots".into())),
        Verdict::Drop(DropReason::ExcludedGroup)
    ));
}

#[test]
fn malformed_events_are_invalid_and_name_the_field() {
    let plan = plan(Usage::Advanced, Sharing::Extended);
    let reject = |e: pb::Event| match enforce(&plan, e, 4, NOW, false).verdict {
        Verdict::Reject(reason, message) => (reason, message),
        other => panic!("not rejected: {other:?}"),
    };
    let (reason, message) = reject(pb::Event {
        event_id: "x".into(),
        occurred_at: at(NOW),
        payload: None,
    });
    assert_eq!(reason, DropReason::Invalid);
    assert_eq!(message, "events[4].payload: is required (one event kind)");
    let (_, message) = reject(event("bad id!", Payload::PageView(page_view())));
    assert!(message.starts_with("events[4].event_id"), "{message}");
    let (_, message) = reject(event("10.0.0.1", Payload::PageView(page_view())));
    assert!(
        message.contains("event_id: holds an IP address"),
        "{message}"
    );
    let mut v = page_view();
    v.page_id.clear();
    assert_eq!(
        reject(event("a", Payload::PageView(v))).1,
        "events[4].page_view.page_id: is required"
    );
    let mut v = page_view();
    v.channel = 99;
    assert!(
        reject(event("a", Payload::PageView(v)))
            .1
            .contains("page_view.channel")
    );
    let nan = pb::MetricEvent {
        name: "x".into(),
        value: f64::NAN,
        ..Default::default()
    };
    assert!(
        reject(event("a", Payload::Metric(nan)))
            .1
            .contains("metric.value")
    );
    let mut v = page_view();
    v.space_id = "10.0.0.1".into();
    let (reason, message) = reject(event("a", Payload::PageView(v)));
    assert_eq!(reason, DropReason::Invalid);
    assert!(
        message.contains("page_view.space_id") && message.contains("IP address"),
        "{message}"
    );
    let mut e = event("a", Payload::PageView(page_view()));
    e.occurred_at = None;
    assert!(reject(e).1.contains("occurred_at: is required"));
}

#[test]
fn events_outside_the_window_are_refused() {
    let plan = plan(Usage::Advanced, Sharing::Extended);
    let mut future = event("f", Payload::PageView(page_view()));
    future.occurred_at = at(NOW + MAX_FUTURE_MS + 1);
    assert!(matches!(
        enforce(&plan, future, 0, NOW, false).verdict,
        Verdict::Reject(DropReason::OutOfWindow, _)
    ));
    let mut old = event("o", Payload::PageView(page_view()));
    old.occurred_at = at(NOW - 36 * DAY_MS);
    assert!(matches!(
        enforce(&plan, old, 0, NOW, false).verdict,
        Verdict::Reject(DropReason::OutOfWindow, _)
    ));
    let mut skewed = event("s", Payload::PageView(page_view()));
    skewed.occurred_at = at(NOW + MAX_FUTURE_MS - 1);
    assert!(matches!(
        enforce(&plan, skewed, 0, NOW, false).verdict,
        Verdict::Keep(_)
    ));
}

#[test]
fn a_purge_strips_classes_from_stored_bodies() {
    let plan = plan(Usage::Advanced, Sharing::Extended);
    let stored = kept(enforce(
        &plan,
        event("e", Payload::PageView(page_view())),
        0,
        NOW,
        false,
    ));
    let body = stored.event.encode_to_vec();
    let stripped = strip_body(&body, &[DataClass::Name as i32, DataClass::Key as i32]).unwrap();
    let event = pb::Event::decode(stripped.as_slice()).unwrap();
    let Some(Payload::PageView(v)) = event.payload else {
        panic!()
    };
    assert!(v.page_title.is_empty() && v.space_key.is_empty() && v.space_name.is_empty());
    assert_eq!(v.page_id, "p-1");
    assert!(v.viewer_id.starts_with("psn1_"));
    assert_eq!(kinds_with_classes(&[DataClass::Name as i32]), vec![3, 4]);
    assert!(strip_body(&stripped, &[DataClass::Name as i32]).is_none());
}

#[test]
fn an_app_named_both_ways_is_refused_naming_the_field() {
    let usage = |custom: bool, key: &str, custom_key: &str| {
        Payload::FeatureUsage(pb::FeatureUsageEvent {
            feature: "issue.create".into(),
            count: 1,
            custom_app: custom,
            app_key: key.into(),
            custom_app_key: custom_key.into(),
            ..Default::default()
        })
    };
    let inventory = |custom: bool, key: &str, custom_key: &str| {
        Payload::AppInventory(pb::AppInventoryEvent {
            apps: vec![common::AppInfo {
                custom,
                key: key.into(),
                custom_key: custom_key.into(),
                ..Default::default()
            }],
        })
    };
    for (payload, refusal) in [
        (
            usage(true, "com.acme.public", "com.acme.own"),
            "feature_usage.app_key: a custom app fills custom_app_key and custom_app_name",
        ),
        (
            usage(false, "", "com.acme.own"),
            "feature_usage.custom_app_key: set custom_app for a custom app",
        ),
        (
            inventory(true, "com.acme.public", ""),
            "app_inventory.apps.key: a custom app fills custom_key and custom_name",
        ),
        (
            inventory(false, "", "com.acme.own"),
            "app_inventory.apps.custom_key: set custom for a custom app",
        ),
    ] {
        assert_eq!(validate::validate(&payload), Err(refusal.to_owned()));
    }
    for fine in [
        usage(true, "", "com.acme.own"),
        usage(false, "com.acme.public", ""),
        inventory(true, "", "com.acme.own"),
        inventory(false, "com.acme.public", ""),
    ] {
        assert_eq!(validate::validate(&fine), Ok(()));
    }
}
