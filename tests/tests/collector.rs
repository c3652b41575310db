//! collector-svc end to end, wired to a real linker-svc and consent-svc: enforcement from the policy,
//! de-identification, idempotent ingest, streams, preview, page-view reports, rollups, purges and
//! erasure with their audit entries, and isolation between orgs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use prost::Message;
use sightline_proto::audit::v1 as audit_pb;
use sightline_proto::collector::v1::{self as pb, DropReason};
use sightline_proto::common::v1::{self as common, Channel, SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::settings::Limits;
use sightline_tests::collector::{dropped, ingest, metric, page_view};
use sightline_tests::consent::{opt_in, policy, track};
use sightline_tests::{
    CollectorOptions, LinkerOptions, T0_MS, TestCollector, TestConsent, TestInstance, TestLinker,
    TestOrg, authed,
};
use tonic::Code;

const DAY: i64 = 86_400_000;

struct Stack {
    linker: TestLinker,
    consent: TestConsent,
    collector: TestCollector,
    org: TestOrg,
    instance: TestInstance,
}

impl Stack {
    async fn start(usage: UsageLevel, sharing: SharingLevel) -> Self {
        Self::start_with(usage, sharing, CollectorOptions::default()).await
    }

    async fn start_with(
        usage: UsageLevel,
        sharing: SharingLevel,
        options: CollectorOptions,
    ) -> Self {
        let linker = TestLinker::start(LinkerOptions::default()).await;
        let consent = TestConsent::start(&linker, None, Limits::default()).await;
        let collector = TestCollector::start(&linker, &consent, options).await;
        let org = linker.org("Acme").await;
        let instance = linker.link_instance(&org, "SRV-A").await;
        let stack = Self {
            linker,
            consent,
            collector,
            org,
            instance,
        };
        if usage != UsageLevel::Disabled {
            opt_in(&stack.consent, &stack.org, usage, sharing).await;
            stack.settle().await;
        }
        stack
    }

    /// Waits until the collector enforces the org's current policy.
    async fn settle(&self) {
        let current = policy(&self.consent, &self.org, &self.instance.id).await;
        self.collector
            .wait_revision(&self.org.id, &self.instance.id, current.revision)
            .await;
    }

    async fn track_views(&self, global_group: &str) {
        track(
            &self.consent,
            &self.org,
            consent_pb::TrackingSettings {
                enabled_channels: vec![Channel::Desktop as i32],
                exclude_anonymous: true,
                excluded_groups: vec!["bots".into()],
                blocking_time_ms: 30 * 60_000,
                view_counter_enabled: true,
                global_report_group: global_group.into(),
            },
        )
        .await;
        self.settle().await;
    }

    fn range(&self, from: i64, to: i64) -> Option<common::TimeRange> {
        Some(common::TimeRange {
            start: sightline_tests::collector::at(from),
            end: sightline_tests::collector::at(to),
        })
    }

    async fn audit_actions(&self) -> Vec<audit_pb::AuditEvent> {
        self.linker.audit_events(&self.org).await
    }

    async fn raw_metrics(&self, name: &str) -> Vec<pb::MetricPoint> {
        self.collector
            .client()
            .await
            .query_metrics(authed(
                &self.org.admin,
                pb::QueryMetricsRequest {
                    org_id: self.org.id.clone(),
                    instance_id: self.instance.id.clone(),
                    metric_name: name.into(),
                    range: self.range(T0_MS - 30 * DAY, T0_MS + DAY),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .points
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_collector_walkthrough_runs_with_real_grpcurl() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let collector = TestCollector::start(&linker, &consent, CollectorOptions::default()).await;
    let grpcurl = sightline_tests::grpcurl();
    let script = format!(
        "set -euo pipefail\ngrpcurl() {{ command \"{grpcurl}\" \"$@\"; }}\n{}\n",
        sightline_tests::readme_block("collector-walkthrough")
    );
    // The services run on the test's clock: "now" is its time.
    let now = sightline_tests::rfc3339(T0_MS);
    let output = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("ADDR", linker.addr.to_string())
        .env("CONSENT", consent.addr.to_string())
        .env("COLLECTOR", collector.addr.to_string())
        .env("DATA", linker.data_dir())
        .env("NOW", &now)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "walkthrough failed\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{stdout}");
    assert!(
        lines[0].contains("\"accepted\":1")
            && lines[0].contains("DROP_REASON_CONSENT")
            && lines[0].contains("DROP_REASON_INVALID"),
        "{stdout}"
    );
    assert!(lines[0].contains("events[2].event_id"), "{stdout}");
    assert!(
        lines[1].contains("\"kept\":true")
            && lines[1].contains("page_view.viewer_email")
            && lines[1].contains("page_view.page_title"),
        "{stdout}"
    );
    assert!(
        lines[1].contains("\"hashedFields\":[\"page_view.viewer_id\"]")
            && lines[1].contains("\"url\":\"https://wiki.initech.example/[redacted]/98311\""),
        "{stdout}"
    );
    assert!(lines[2].contains("\"accepted\":1"), "{stdout}");
    assert!(lines[3].contains("DROP_REASON_DUPLICATE"), "{stdout}");
    assert!(
        lines[4].contains("\"views\":\"1\"") && lines[4].contains("\"uniqueViewers\":\"1\""),
        "{stdout}"
    );
    assert!(lines[5].contains("\"pageViewsDeleted\":\"1\""), "{stdout}");
    assert!(
        lines[6].contains("collector.viewer_erased")
            && lines[6].contains("\"target\":\"erasure:")
            && !lines[6].contains("psn1_"),
        "{stdout}"
    );
    for secret in [
        "milton@initech.example",
        "203.0.113.9",
        "Milton Waddams",
        "u-1001",
    ] {
        assert!(
            !lines[1].contains(secret) && !lines[6].contains(secret),
            "{secret}: {stdout}"
        );
    }
}

/// RFC 3339 (UTC, whole seconds) of Unix milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_collected_before_the_org_opts_in() {
    let s = Stack::start(UsageLevel::Disabled, SharingLevel::Basic).await;
    let result = ingest(
        &s.collector,
        &s.instance,
        vec![metric("m1", T0_MS, "jvm.cpu.load", 0.5)],
    )
    .await
    .unwrap();
    assert_eq!(result.accepted, 0);
    assert_eq!(dropped(&result, DropReason::Consent), 1);
    assert!(s.raw_metrics("jvm.cpu.load").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_stores_metrics_and_refuses_what_it_does_not_allow() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let result = ingest(
        &s.collector,
        &s.instance,
        vec![
            metric("m1", T0_MS - 1_000, "jvm.cpu.load", 0.5),
            page_view("v1", T0_MS - 1_000, "p1", "s1", "u1"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(result.accepted, 1);
    assert_eq!(dropped(&result, DropReason::Consent), 1);
    assert_eq!(result.consent_version, 1);
    assert!(result.policy_revision > 0);
    let points = s.raw_metrics("jvm.cpu.load").await;
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].max, 0.5);
    assert_eq!(points[0].consent_version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_stores_nothing_twice() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let batch: Vec<_> = (0..50)
        .map(|i| metric(&format!("m{i}"), T0_MS - i, "latency", i as f64))
        .collect();
    let first = ingest(&s.collector, &s.instance, batch.clone())
        .await
        .unwrap();
    assert_eq!(first.accepted, 50);
    let again = ingest(&s.collector, &s.instance, batch).await.unwrap();
    assert_eq!(again.accepted, 0);
    assert_eq!(dropped(&again, DropReason::Duplicate), 50);
    assert_eq!(s.raw_metrics("latency").await.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_whole_and_bad_events_one_by_one() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let refused = |events: Vec<pb::Event>| {
        let s = &s;
        async move { ingest(&s.collector, &s.instance, events).await.unwrap_err() }
    };
    let empty = refused(vec![]).await;
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(
        empty.message().starts_with("events:"),
        "{}",
        empty.message()
    );
    let many: Vec<_> = (0..1001)
        .map(|i| metric(&format!("m{i}"), T0_MS, "x", 1.0))
        .collect();
    assert_eq!(refused(many).await.code(), Code::InvalidArgument);
    let repeated = refused(vec![
        metric("same", T0_MS, "x", 1.0),
        metric("ok", T0_MS, "x", 1.0),
        metric("same", T0_MS, "x", 2.0),
    ])
    .await;
    assert_eq!(repeated.code(), Code::InvalidArgument);
    assert!(
        repeated.message().contains("events[2].event_id"),
        "{}",
        repeated.message()
    );
    assert!(
        s.raw_metrics("x").await.is_empty(),
        "nothing of a refused batch is stored"
    );

    let mut unknown_kind = metric("k", T0_MS, "x", 1.0);
    unknown_kind.payload = None;
    let mut no_time = metric("t", T0_MS, "x", 1.0);
    no_time.occurred_at = None;
    let result = ingest(
        &s.collector,
        &s.instance,
        vec![
            unknown_kind,
            no_time,
            metric("", T0_MS, "x", 1.0),
            metric("future", T0_MS + 3_600_000, "x", 1.0),
            metric("ancient", T0_MS - 400 * DAY, "x", 1.0),
            metric("good", T0_MS, "x", 1.0),
        ],
    )
    .await
    .unwrap();
    assert_eq!(result.accepted, 1);
    assert_eq!(dropped(&result, DropReason::Invalid), 3);
    assert_eq!(dropped(&result, DropReason::OutOfWindow), 2);
    let messages: Vec<&str> = result.rejected.iter().map(|r| r.message.as_str()).collect();
    assert!(
        messages.contains(&"events[0].payload: is required (one event kind)"),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("events[1].occurred_at")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("events[2].event_id")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("events[3].occurred_at: more than 5 minutes")),
        "{messages:?}"
    );
    assert_eq!(s.raw_metrics("x").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_instance_credential_sends_events() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let mut client = s.collector.client().await;
    let admin = client
        .ingest(authed(
            &s.org.admin,
            pb::IngestRequest {
                events: vec![metric("m", T0_MS, "x", 1.0)],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(admin.code(), Code::PermissionDenied);
    let stranger = client
        .ingest(authed(
            &sightline_tests::stranger(sightline_runtime::token::TokenKind::Instance),
            pb::IngestRequest {
                events: vec![metric("m", T0_MS, "x", 1.0)],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), Code::Unauthenticated);
    let none = client
        .ingest(tonic::Request::new(pb::IngestRequest {
            events: vec![metric("m", T0_MS, "x", 1.0)],
        }))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_stream_the_collector_refuses_instead_of_allowing() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let mut consent = TestConsent::start(&linker, None, Limits::default()).await;
    let org = linker.org("Acme").await;
    let instance = linker.link_instance(&org, "SRV-A").await;
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    consent.stop().await;
    let collector = TestCollector::launch(&linker, &consent, CollectorOptions::default()).await;
    let refused = ingest(&collector, &instance, vec![metric("m", T0_MS, "x", 1.0)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused.message().contains("no current policy"),
        "{}",
        refused.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_acks_every_batch_in_order_and_goes_on_after_a_bad_one() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let batches = vec![
        pb::IngestStreamRequest {
            batch_id: "b1".into(),
            events: vec![metric("m1", T0_MS, "x", 1.0)],
        },
        pb::IngestStreamRequest {
            batch_id: "b2".into(),
            events: vec![],
        },
        pb::IngestStreamRequest {
            batch_id: "b3".into(),
            events: vec![metric("m3", T0_MS, "x", 3.0), metric("m1", T0_MS, "x", 1.0)],
        },
    ];
    let mut acks = s
        .collector
        .client()
        .await
        .ingest_stream(authed(
            &s.instance.credential,
            futures::stream::iter(batches),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(ack) = acks.message().await.unwrap() {
        got.push(ack);
    }
    assert_eq!(
        got.iter().map(|a| a.batch_id.as_str()).collect::<Vec<_>>(),
        vec!["b1", "b2", "b3"]
    );
    assert_eq!(got[0].result.as_ref().unwrap().accepted, 1);
    let error = got[1].error.as_ref().unwrap();
    assert_eq!(error.code, Code::InvalidArgument as u32);
    assert_eq!(error.retry_after_ms, 0);
    let third = got[2].result.as_ref().unwrap();
    assert_eq!(
        (third.accepted, dropped(third, DropReason::Duplicate)),
        (1, 1)
    );
    assert_eq!(s.raw_metrics("x").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_credential_ends_the_stream() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut acks = s
        .collector
        .client()
        .await
        .ingest_stream(authed(
            &s.instance.credential,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::IngestStreamRequest {
        batch_id: "b1".into(),
        events: vec![metric("m1", T0_MS, "x", 1.0)],
    })
    .await
    .unwrap();
    assert!(acks.message().await.unwrap().unwrap().error.is_none());
    s.linker
        .linker()
        .await
        .unlink_instance(authed(
            &s.org.admin,
            sightline_proto::linker::v1::UnlinkInstanceRequest {
                org_id: s.org.id.clone(),
                instance_id: s.instance.id.clone(),
            },
        ))
        .await
        .unwrap();
    // The credential cache lives at most 5 s.
    let mut ended = None;
    for i in 0..80 {
        if tx
            .send(pb::IngestStreamRequest {
                batch_id: format!("r{i}"),
                events: vec![metric(&format!("r{i}"), T0_MS, "x", 1.0)],
            })
            .await
            .is_err()
        {
            break;
        }
        match acks.message().await {
            Ok(Some(_)) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            Ok(None) => break,
            Err(status) => {
                ended = Some(status);
                break;
            }
        }
    }
    assert_eq!(
        ended.expect("the stream ends").code(),
        Code::Unauthenticated
    );
}

fn canary_view(id: &str, at: i64) -> pb::Event {
    pb::Event {
        event_id: id.into(),
        occurred_at: sightline_tests::collector::at(at),
        payload: Some(pb::event::Payload::PageView(pb::PageViewEvent {
            page_id: "p-7".into(),
            space_id: "s-7".into(),
            page_title: "Launch plan by Dana Scully".into(),
            space_key: "XFILES".into(),
            space_name: "X Files".into(),
            viewer_id: "u-1013".into(),
            channel: Channel::Desktop as i32,
            viewer_display_name: "Dana Scully".into(),
            viewer_email: "dana.scully@fbi.example".into(),
            client_ip: "192.0.2.44".into(),
            page_url: "https://wiki.example/p-7?who=dana.scully%40fbi.example&from=192.0.2.44"
                .into(),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_shows_exactly_what_ingest_stores() {
    let s = Stack::start(UsageLevel::Advanced, SharingLevel::Basic).await;
    s.track_views("").await;
    let events = vec![
        canary_view("v1", T0_MS - 5_000),
        metric("m1", T0_MS, "x", 1.0),
        page_view("v2", T0_MS, "p", "s", ""),
    ];
    let preview = s
        .collector
        .client()
        .await
        .preview_sample(authed(
            &s.instance.credential,
            pb::PreviewSampleRequest {
                events: events.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preview.events.len(), 3);
    let view = &preview.events[0];
    assert!(view.kept);
    assert!(
        view.removed_fields
            .contains(&"page_view.page_title".to_owned()),
        "{view:?}"
    );
    assert!(
        view.removed_fields
            .contains(&"page_view.viewer_email".to_owned())
    );
    assert_eq!(view.hashed_fields, vec!["page_view.viewer_id".to_owned()]);
    assert_eq!(view.scrubbed_fields, vec!["page_view.page_url".to_owned()]);
    assert_eq!(preview.events[2].drop_reason, DropReason::Anonymous as i32);
    // Preview stores nothing.
    assert!(s.raw_metrics("x").await.is_empty());

    let result = ingest(&s.collector, &s.instance, events).await.unwrap();
    assert_eq!(result.accepted, 2);
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        s.linker.data_dir().join("collector-global.db").display()
    ))
    .await
    .unwrap();
    let (body,): (Vec<u8>,) = sqlx::query_as("SELECT body FROM events WHERE event_id = 'v1'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        body,
        view.stored.as_ref().unwrap().encode_to_vec(),
        "preview and store agree byte for byte"
    );
    let (metric_body,): (Vec<u8>,) =
        sqlx::query_as("SELECT body FROM events WHERE event_id = 'm1'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        metric_body,
        preview.events[1].stored.as_ref().unwrap().encode_to_vec()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_views_feed_the_counter_and_the_reports() {
    let s = Stack::start(UsageLevel::Advanced, SharingLevel::Extended).await;
    s.track_views("analysts").await;
    let t = T0_MS - 2 * DAY;
    let mut events = vec![
        page_view("a1", t, "p1", "s1", "alice"),
        page_view("a2", t + 60_000, "p1", "s1", "alice"),
        page_view("a3", t + 31 * 60_000, "p1", "s1", "alice"),
        page_view("b1", t, "p1", "s1", "bob"),
        page_view("b2", t + DAY, "p2", "s1", "bob"),
        page_view("c1", t + DAY, "p9", "s2", "carol"),
    ];
    let mut bot = page_view("x1", t, "p1", "s1", "robot");
    if let Some(pb::event::Payload::PageView(v)) = bot.payload.as_mut() {
        v.viewer_groups = vec!["bots".into()];
    }
    events.push(bot);
    let result = ingest(&s.collector, &s.instance, events).await.unwrap();
    assert_eq!(result.accepted, 5);
    assert_eq!(dropped(&result, DropReason::BlockingTime), 1);
    assert_eq!(dropped(&result, DropReason::ExcludedGroup), 1);

    let mut client = s.collector.client().await;
    let count = client
        .get_view_count(authed(
            &s.instance.credential,
            pb::GetViewCountRequest {
                page_id: "p1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (count.views, count.unique_viewers, count.enabled),
        (3, 2, true)
    );

    let range = s.range(T0_MS - 10 * DAY, T0_MS);
    let page = client
        .get_page_report(authed(
            &s.org.admin,
            pb::GetPageReportRequest {
                org_id: s.org.id.clone(),
                page_id: "p1".into(),
                range,
                instance_id: s.instance.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let stats = page.stats.unwrap();
    assert_eq!((stats.views, stats.unique_viewers), (3, 2));
    assert_eq!(
        stats.by_channel,
        vec![pb::ChannelCount {
            channel: Channel::Desktop as i32,
            views: 3
        }]
    );
    assert_eq!(stats.by_day.len(), 1);
    assert_eq!(stats.unique_viewers_error, 0.0);

    let space = client
        .get_space_report(authed(
            &s.org.admin,
            pb::GetSpaceReportRequest {
                org_id: s.org.id.clone(),
                space_id: "s1".into(),
                range,
                instance_id: s.instance.id.clone(),
                page_size: 1,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let stats = space.stats.unwrap();
    assert_eq!(
        (stats.views, stats.unique_viewers, stats.by_day.len()),
        (4, 2, 2)
    );
    assert_eq!(space.top_pages.len(), 1);
    assert_eq!(space.top_pages[0].page_id, "p1");
    let next = client
        .get_space_report(authed(
            &s.org.admin,
            pb::GetSpaceReportRequest {
                org_id: s.org.id.clone(),
                space_id: "s1".into(),
                range,
                instance_id: s.instance.id.clone(),
                page_size: 1,
                page_token: space.next_page_token,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.top_pages[0].page_id, "p2");

    let global = |token: &str, groups: Vec<String>| {
        let mut client = client.clone();
        let request = authed(
            token,
            pb::GetGlobalReportRequest {
                org_id: String::new(),
                range,
                reader_groups: groups,
                ..Default::default()
            },
        );
        async move { client.get_global_report(request).await }
    };
    let outsider = global(&s.instance.credential, vec!["staff".into()])
        .await
        .unwrap_err();
    assert_eq!(outsider.code(), Code::PermissionDenied);
    let analyst = global(&s.instance.credential, vec!["analysts".into()])
        .await
        .unwrap()
        .into_inner();
    assert_eq!(analyst.stats.unwrap().views, 5);
    let mut admin_request = pb::GetGlobalReportRequest {
        org_id: s.org.id.clone(),
        range,
        ..Default::default()
    };
    admin_request.reader_groups = vec![];
    let admin = client
        .get_global_report(authed(&s.org.admin, admin_request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(admin.stats.as_ref().unwrap().unique_viewers, 3);
    assert_eq!(admin.top_spaces.len(), 2);
    assert_eq!(admin.top_spaces[0].instance_id, s.instance.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_the_level_is_enforced_at_once_and_purges_what_it_no_longer_allows() {
    let s = Stack::start(UsageLevel::Advanced, SharingLevel::Extended).await;
    s.track_views("").await;
    let stored = ingest(
        &s.collector,
        &s.instance,
        vec![
            page_view("v1", T0_MS, "p1", "s1", "alice"),
            metric("m1", T0_MS, "x", 1.0),
        ],
    )
    .await
    .unwrap();
    assert_eq!(stored.accepted, 2);
    opt_in(&s.consent, &s.org, UsageLevel::Basic, SharingLevel::Basic).await;
    s.settle().await;
    let after = ingest(
        &s.collector,
        &s.instance,
        vec![page_view("v2", T0_MS, "p1", "s1", "bob")],
    )
    .await
    .unwrap();
    assert_eq!(dropped(&after, DropReason::Consent), 1);
    // The purge is applied once, with its counts in the org's audit log.
    // Several passes at once (the background one included), as replicas would: applied and audited once.
    let m = &s.collector.maintenance;
    tokio::join!(
        m.apply_purges(),
        m.apply_purges(),
        m.apply_purges(),
        m.apply_purges()
    );
    assert_eq!(
        s.collector.maintenance.apply_purges().await,
        0,
        "a purge is applied once"
    );
    let mut client = s.collector.client().await;
    let count = client
        .get_page_report(authed(
            &s.org.admin,
            pb::GetPageReportRequest {
                org_id: s.org.id.clone(),
                page_id: "p1".into(),
                range: s.range(T0_MS - DAY, T0_MS + DAY),
                instance_id: s.instance.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count.stats.unwrap().views, 0);
    assert_eq!(
        s.raw_metrics("x").await.len(),
        1,
        "metrics are still allowed"
    );
    let purges: Vec<_> = s
        .audit_actions()
        .await
        .into_iter()
        .filter(|e| e.action == "collector.purge_applied")
        .collect();
    assert_eq!(purges.len(), 1);
    assert_eq!(
        purges[0].attributes.get("page_views").map(String::as_str),
        Some("1")
    );
    assert!(s.linker.verify_chain(&s.org).await.intact);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_a_viewer_is_audited_and_removes_everything_about_them() {
    let s = Stack::start(UsageLevel::Advanced, SharingLevel::Basic).await;
    s.track_views("").await;
    let mut usage = metric("f1", T0_MS, "x", 1.0);
    usage.payload = Some(pb::event::Payload::FeatureUsage(pb::FeatureUsageEvent {
        feature: "issue.create".into(),
        user_id: "alice".into(),
        count: 2,
        ..Default::default()
    }));
    ingest(
        &s.collector,
        &s.instance,
        vec![
            page_view("v1", T0_MS, "p1", "s1", "alice"),
            page_view("v2", T0_MS, "p1", "s1", "bob"),
            usage,
        ],
    )
    .await
    .unwrap();
    let client = s.collector.client().await;
    let erase = |token: &str, org: &str, instance: &str| {
        let mut client = client.clone();
        let request = authed(
            token,
            pb::EraseViewerRequest {
                org_id: org.into(),
                viewer_id: "alice".into(),
                instance_id: instance.into(),
            },
        );
        async move { client.erase_viewer(request).await }
    };
    // Two erasures at once: one deletes and counts, the other finds nothing (the log agrees).
    let (first, second) = tokio::join!(
        erase(&s.org.admin, &s.org.id, &s.instance.id),
        erase(&s.org.admin, &s.org.id, &s.instance.id)
    );
    let (first, second) = (first.unwrap().into_inner(), second.unwrap().into_inner());
    let (erased, again) = if first.page_views_deleted > 0 {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(erased.page_views_deleted, 1);
    assert_eq!(erased.feature_usage_deleted, 1);
    assert_eq!(erased.unique_viewer_entries_deleted, 1);
    assert_eq!(erased.dedupe_entries_deleted, 1);
    assert_eq!(
        (
            again.page_views_deleted,
            again.feature_usage_deleted,
            again.unique_viewer_entries_deleted,
            again.dedupe_entries_deleted
        ),
        (0, 0, 0, 0)
    );
    assert!(again.stores.iter().all(|s| s.deleted == 0));
    let count = s
        .collector
        .client()
        .await
        .get_view_count(authed(
            &s.instance.credential,
            pb::GetViewCountRequest {
                page_id: "p1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((count.views, count.unique_viewers), (1, 1));
    let entries: Vec<_> = s
        .audit_actions()
        .await
        .into_iter()
        .filter(|e| e.action == "collector.viewer_erased")
        .collect();
    assert_eq!(entries.len(), 2);
    assert!(
        entries.iter().all(|e| !e.target.contains("alice")),
        "the audit log names the pseudonym only"
    );
    // Another org's admin, and another org's instance id, are refused.
    let other = s.linker.org("Other").await;
    let denied = erase(&other.admin, &s.org.id, &s.instance.id)
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let foreign = s.linker.link_instance(&other, "SRV-O").await;
    let missing = erase(&s.org.admin, &s.org.id, &foreign.id)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hourly_rollups_answer_metric_queries_by_tag_and_page() {
    let s = Stack::start(UsageLevel::Basic, SharingLevel::Basic).await;
    let hour = (T0_MS - 3 * 3_600_000) / 3_600_000 * 3_600_000;
    let mut events = Vec::new();
    for i in 0..40 {
        let mut e = metric(
            &format!("m{i}"),
            hour + i * 60_000,
            "db.latency",
            f64::from(i as u32),
        );
        if let Some(pb::event::Payload::Metric(m)) = e.payload.as_mut() {
            m.tags.insert(
                "pluginKey".into(),
                if i % 2 == 0 {
                    "even".into()
                } else {
                    "odd".into()
                },
            );
        }
        events.push(e);
    }
    ingest(&s.collector, &s.instance, events).await.unwrap();
    s.collector.maintenance.roll_up().await;
    let mut client = s.collector.client().await;
    let query = |tags: HashMap<String, String>,
                 resolution: pb::Resolution,
                 page_size: u32,
                 token: String| pb::QueryMetricsRequest {
        org_id: s.org.id.clone(),
        instance_id: s.instance.id.clone(),
        metric_name: "db.latency".into(),
        range: s.range(hour - 3_600_000, hour + 2 * 3_600_000),
        resolution: resolution as i32,
        page_size,
        page_token: token,
        tags,
    };
    let hourly = client
        .query_metrics(authed(
            s.linker.service.expose(),
            query(HashMap::new(), pb::Resolution::Hourly, 0, String::new()),
        ))
        .await
        .unwrap()
        .into_inner();
    // Two tag sets in the first hour, two in the second (minutes 0-39 span one hour: only one).
    assert_eq!(hourly.points.len(), 2);
    let even = &hourly.points[0];
    assert_eq!(even.tags.get("pluginKey").map(String::as_str), Some("even"));
    assert_eq!((even.count, even.min, even.max), (20, 0.0, 38.0));
    let odd_only = client
        .query_metrics(authed(
            &s.org.admin,
            query(
                [("pluginKey".to_owned(), "odd".to_owned())].into(),
                pb::Resolution::Raw,
                7,
                String::new(),
            ),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(odd_only.points.len(), 7);
    assert!(!odd_only.next_page_token.is_empty());
    let mut all = odd_only.points.len();
    let mut token = odd_only.next_page_token;
    while !token.is_empty() {
        let page = client
            .query_metrics(authed(
                &s.org.admin,
                query(
                    [("pluginKey".to_owned(), "odd".to_owned())].into(),
                    pb::Resolution::Raw,
                    7,
                    token,
                ),
            ))
            .await
            .unwrap()
            .into_inner();
        all += page.points.len();
        token = page.next_page_token;
    }
    assert_eq!(all, 20);
    let denied = client
        .query_metrics(authed(
            &s.instance.credential,
            query(HashMap::new(), pb::Resolution::Raw, 0, String::new()),
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_orgs_tokens_and_ids_reveal_nothing_in_any_method() {
    let s = Stack::start(UsageLevel::Advanced, SharingLevel::Basic).await;
    s.track_views("").await;
    ingest(
        &s.collector,
        &s.instance,
        vec![page_view("v1", T0_MS, "p1", "s1", "alice")],
    )
    .await
    .unwrap();
    let other = s.linker.org("Other").await;
    let foreign = s.linker.link_instance(&other, "SRV-O").await;
    let mut c = s.collector.client().await;
    let range = s.range(T0_MS - DAY, T0_MS + DAY);
    let (a, org, inst) = (&other.admin, s.org.id.clone(), s.instance.id.clone());
    let denied = [
        c.preview_sample(authed(
            a,
            pb::PreviewSampleRequest {
                org_id: org.clone(),
                instance_id: inst.clone(),
                events: vec![metric("m", T0_MS, "x", 1.0)],
            },
        ))
        .await
        .map(|_| ()),
        c.get_view_count(authed(
            a,
            pb::GetViewCountRequest {
                org_id: org.clone(),
                page_id: "p1".into(),
                instance_id: inst.clone(),
            },
        ))
        .await
        .map(|_| ()),
        c.get_page_report(authed(
            a,
            pb::GetPageReportRequest {
                org_id: org.clone(),
                page_id: "p1".into(),
                range,
                instance_id: inst.clone(),
            },
        ))
        .await
        .map(|_| ()),
        c.get_space_report(authed(
            a,
            pb::GetSpaceReportRequest {
                org_id: org.clone(),
                space_id: "s1".into(),
                range,
                instance_id: inst.clone(),
                ..Default::default()
            },
        ))
        .await
        .map(|_| ()),
        c.get_global_report(authed(
            a,
            pb::GetGlobalReportRequest {
                org_id: org.clone(),
                range,
                ..Default::default()
            },
        ))
        .await
        .map(|_| ()),
        c.query_metrics(authed(
            a,
            pb::QueryMetricsRequest {
                org_id: org.clone(),
                instance_id: inst.clone(),
                metric_name: "x".into(),
                range,
                ..Default::default()
            },
        ))
        .await
        .map(|_| ()),
        c.erase_viewer(authed(
            a,
            pb::EraseViewerRequest {
                org_id: org.clone(),
                viewer_id: "alice".into(),
                instance_id: inst.clone(),
            },
        ))
        .await
        .map(|_| ()),
        // Another org's instance credential naming this org or instance.
        c.get_view_count(authed(
            &foreign.credential,
            pb::GetViewCountRequest {
                org_id: org.clone(),
                page_id: "p1".into(),
                instance_id: String::new(),
            },
        ))
        .await
        .map(|_| ()),
        c.get_global_report(authed(
            &foreign.credential,
            pb::GetGlobalReportRequest {
                instance_id: inst.clone(),
                range,
                ..Default::default()
            },
        ))
        .await
        .map(|_| ()),
        c.preview_sample(authed(
            &foreign.credential,
            pb::PreviewSampleRequest {
                instance_id: inst.clone(),
                events: vec![metric("m", T0_MS, "x", 1.0)],
                ..Default::default()
            },
        ))
        .await
        .map(|_| ()),
        c.get_contributed_aggregates(authed(a, pb::GetContributedAggregatesRequest::default()))
            .await
            .map(|_| ()),
        c.list_stored_events(authed(
            a,
            pb::ListStoredEventsRequest {
                org_id: org.clone(),
                ..Default::default()
            },
        ))
        .await
        .map(|_| ()),
        c.list_stored_events(authed(
            &foreign.credential,
            pb::ListStoredEventsRequest::default(),
        ))
        .await
        .map(|_| ()),
    ];
    for (i, outcome) in denied.into_iter().enumerate() {
        assert_eq!(
            outcome.unwrap_err().code(),
            Code::PermissionDenied,
            "call {i}"
        );
    }
    // This org's admin naming the other org's instance: not found, nothing about it revealed.
    let (admin, foreign_id) = (&s.org.admin, foreign.id.clone());
    let missing = [
        c.get_page_report(authed(
            admin,
            pb::GetPageReportRequest {
                org_id: org.clone(),
                page_id: "p1".into(),
                range,
                instance_id: foreign_id.clone(),
            },
        ))
        .await
        .map(|_| ()),
        c.get_space_report(authed(
            admin,
            pb::GetSpaceReportRequest {
                org_id: org.clone(),
                space_id: "s1".into(),
                range,
                instance_id: foreign_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .map(|_| ()),
        c.get_global_report(authed(
            admin,
            pb::GetGlobalReportRequest {
                org_id: org.clone(),
                range,
                instance_id: foreign_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .map(|_| ()),
        c.query_metrics(authed(
            admin,
            pb::QueryMetricsRequest {
                org_id: org.clone(),
                instance_id: foreign_id.clone(),
                metric_name: "x".into(),
                range,
                ..Default::default()
            },
        ))
        .await
        .map(|_| ()),
        c.get_view_count(authed(
            admin,
            pb::GetViewCountRequest {
                org_id: org.clone(),
                page_id: "p1".into(),
                instance_id: foreign_id.clone(),
            },
        ))
        .await
        .map(|_| ()),
        c.preview_sample(authed(
            admin,
            pb::PreviewSampleRequest {
                org_id: org.clone(),
                instance_id: foreign_id.clone(),
                events: vec![metric("m", T0_MS, "x", 1.0)],
            },
        ))
        .await
        .map(|_| ()),
        c.list_stored_events(authed(
            admin,
            pb::ListStoredEventsRequest {
                org_id: org.clone(),
                instance_id: foreign_id.clone(),
                page_size: 0,
            },
        ))
        .await
        .map(|_| ()),
    ];
    for (i, outcome) in missing.into_iter().enumerate() {
        assert_eq!(outcome.unwrap_err().code(), Code::NotFound, "call {i}");
    }
    // The org's own stored events, as stored: the viewer's id is its pseudonym, never "alice".
    let stored = c
        .list_stored_events(authed(
            admin,
            pb::ListStoredEventsRequest {
                org_id: org.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.events.len(), 1);
    assert_eq!(stored.events[0].instance_id, s.instance.id);
    let shown = format!("{stored:?}");
    assert!(shown.contains("p1") && !shown.contains("alice"), "{shown}");
    // The other org's own reports are empty: its ingest went nowhere near this org's data.
    let theirs = c
        .get_global_report(authed(
            &other.admin,
            pb::GetGlobalReportRequest {
                org_id: other.id.clone(),
                range,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(theirs.stats.unwrap().views, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contributed_aggregates_need_k_orgs_and_charge_a_ledger_that_survives_restarts() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let mut options = CollectorOptions::default();
    options.collection.epsilon_budget = 2.0;
    // Exact figures only where the operator allowed them (the default is private).
    options.collection.exact_aggregates_reveal_orgs = true;
    let collector = TestCollector::start(&linker, &consent, options.clone()).await;
    let hour = (T0_MS - 2 * 3_600_000) / 3_600_000 * 3_600_000;
    // Six orgs send the same metric; one is compliance-restricted, one contributes nothing.
    let mut orgs = Vec::new();
    for (i, (contribute, restricted)) in [
        (true, false),
        (true, false),
        (true, false),
        (true, false),
        (true, true),
        (false, false),
    ]
    .into_iter()
    .enumerate()
    {
        let org = linker.org(&format!("Org {i}")).await;
        let instance = linker.link_instance(&org, &format!("SRV-{i}")).await;
        sightline_tests::consent::update(
            &consent,
            &org,
            consent_pb::ConsentSettings {
                usage_level: UsageLevel::Basic as i32,
                sharing_level: SharingLevel::Basic as i32,
                contribute_in_app_data: contribute,
                compliance_restricted: restricted,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let revision = policy(&consent, &org, &instance.id).await.revision;
        collector
            .wait_revision(&org.id, &instance.id, revision)
            .await;
        let mut meta = metric("meta", hour, "x", 0.0);
        meta.payload = Some(pb::event::Payload::InstanceMetadata(
            pb::InstanceMetadataEvent {
                metadata: Some(common::InstanceMetadata {
                    server_id: format!("SRV-{i}"),
                    product: "jira".into(),
                    version: "9.12.4".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ));
        let value = 100.0 * (i as f64 + 1.0);
        ingest(
            &collector,
            &instance,
            vec![
                meta,
                metric("a", hour + 1, "db.latency", value),
                metric("b", hour + 2, "db.latency", value),
            ],
        )
        .await
        .unwrap();
        orgs.push((org, instance));
    }
    collector.maintenance.roll_up().await;
    let query = |noise: bool, group_by: pb::AggregateGroupBy| pb::GetContributedAggregatesRequest {
        metric_name: "db.latency".into(),
        range: Some(common::TimeRange {
            start: sightline_tests::collector::at(hour),
            end: sightline_tests::collector::at(hour + 3_600_000),
        }),
        add_noise: noise,
        epsilon: if noise { 1.0 } else { 0.0 },
        group_by: group_by as i32,
        interval: pb::AggregateInterval::Total as i32,
    };
    let operator = linker.operator.expose().to_owned();
    let mut client = collector.client().await;
    // Four contributing orgs: the cell is withheld.
    let four = client
        .get_contributed_aggregates(authed(&operator, query(false, pb::AggregateGroupBy::None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (four.buckets.len(), four.withheld_buckets, four.min_orgs),
        (0, 1, 5)
    );
    // A fifth contributor: shown, from exactly the five contributing orgs' values.
    let fifth = linker.org("Org 6").await;
    let instance = linker.link_instance(&fifth, "SRV-6").await;
    sightline_tests::consent::update(
        &consent,
        &fifth,
        consent_pb::ConsentSettings {
            usage_level: UsageLevel::Basic as i32,
            sharing_level: SharingLevel::Basic as i32,
            contribute_in_app_data: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let revision = policy(&consent, &fifth, &instance.id).await.revision;
    collector
        .wait_revision(&fifth.id, &instance.id, revision)
        .await;
    let mut meta = metric("meta", hour, "x", 0.0);
    meta.payload = Some(pb::event::Payload::InstanceMetadata(
        pb::InstanceMetadataEvent {
            metadata: Some(common::InstanceMetadata {
                server_id: "SRV-6".into(),
                product: "jira".into(),
                version: "9.12.4".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    ));
    ingest(
        &collector,
        &instance,
        vec![meta, metric("a", hour + 1, "db.latency", 500.0)],
    )
    .await
    .unwrap();
    collector.maintenance.roll_up().await;
    let five = client
        .get_contributed_aggregates(authed(&operator, query(false, pb::AggregateGroupBy::None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(five.buckets.len(), 1, "{five:?}");
    let cell = &five.buckets[0];
    assert_eq!((cell.org_count, cell.noised), (5, false));
    // Orgs 0-3 (100..400) and the fifth (500): the restricted and the non-contributing org are out.
    assert_eq!((cell.mean, cell.p50, cell.p95), (300.0, 300.0, 500.0));
    assert_eq!(five.epsilon_spent, 0.0);
    let by_product = client
        .get_contributed_aggregates(authed(
            &operator,
            query(false, pb::AggregateGroupBy::ProductVersion),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_product.buckets[0].bucket, "jira 9.12.4");
    // Noise spends epsilon from every contributor's ledger: two calls fit a budget of 2, a third does not.
    for _ in 0..2 {
        let noised = client
            .get_contributed_aggregates(authed(&operator, query(true, pb::AggregateGroupBy::None)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(noised.epsilon_spent, 1.0);
        // The cell shows only when its noised count reaches k: it may be withheld either way.
        assert_eq!(noised.buckets.len() + noised.withheld_buckets as usize, 1);
        assert!(noised.buckets.iter().all(|b| b.noised));
    }
    let refused = client
        .get_contributed_aggregates(authed(&operator, query(true, pb::AggregateGroupBy::None)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // The ledger is durable: a restarted collector still refuses.
    let mut collector = collector;
    collector.stop().await;
    let restarted = TestCollector::start(&linker, &consent, options).await;
    let again = restarted
        .client()
        .await
        .get_contributed_aggregates(authed(&operator, query(true, pb::AggregateGroupBy::None)))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted);
    // Without noise nothing is charged, and org admins may not ask at all.
    let admin = restarted
        .client()
        .await
        .get_contributed_aggregates(authed(
            &orgs[0].0.admin,
            query(false, pb::AggregateGroupBy::None),
        ))
        .await
        .unwrap_err();
    assert_eq!(admin.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_postgres_store_each_event_once_and_follow_the_policy() {
    let url = sightline_runtime::testing::fresh_postgres_url()
        .await
        .unwrap();
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let options = CollectorOptions {
        database_url: Some(url),
        ..CollectorOptions::default()
    };
    let a = TestCollector::start(&linker, &consent, options.clone()).await;
    let b = TestCollector::start(&linker, &consent, options).await;
    let org = linker.org("Acme").await;
    let instance = linker.link_instance(&org, "SRV-A").await;
    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Basic).await;
    track(
        &consent,
        &org,
        consent_pb::TrackingSettings {
            enabled_channels: vec![Channel::Desktop as i32],
            blocking_time_ms: 60_000,
            view_counter_enabled: true,
            ..Default::default()
        },
    )
    .await;
    let revision = policy(&consent, &org, &instance.id).await.revision;
    a.wait_revision(&org.id, &instance.id, revision).await;
    b.wait_revision(&org.id, &instance.id, revision).await;
    // The same 20 batches sent to both replicas at once, as retries landing on either would be.
    let mut accepted = 0;
    let mut duplicates = 0;
    for n in 0..20 {
        let events: Vec<_> = (0..50)
            .map(|i| {
                if i % 2 == 0 {
                    page_view(
                        &format!("v{n}-{i}"),
                        T0_MS - i * 1_000,
                        "p1",
                        "s1",
                        &format!("u{i}"),
                    )
                } else {
                    metric(&format!("m{n}-{i}"), T0_MS, "load", 1.0)
                }
            })
            .collect();
        let (ra, rb) = tokio::join!(
            ingest(&a, &instance, events.clone()),
            ingest(&b, &instance, events)
        );
        for r in [ra.unwrap(), rb.unwrap()] {
            accepted += r.accepted;
            duplicates += dropped(&r, DropReason::Duplicate);
        }
    }
    // Every event of a batch is stored by one replica and a duplicate at the other, or blocked.
    assert_eq!(
        duplicates,
        20 * 25 + 25,
        "the other replica saw each stored event as a duplicate"
    );
    let count = |c: &TestCollector| {
        let credential = instance.credential.clone();
        let addr = c.addr;
        async move {
            sightline_proto::collector::v1::collector_service_client::CollectorServiceClient::new(
                tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            )
            .get_view_count(authed(
                &credential,
                pb::GetViewCountRequest {
                    page_id: "p1".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
        }
    };
    let (ca, cb) = (count(&a).await, count(&b).await);
    assert_eq!(
        (ca.views, ca.unique_viewers),
        (cb.views, cb.unique_viewers),
        "both replicas read the same store"
    );
    assert_eq!(ca.unique_viewers, 25);
    assert_eq!(
        ca.views, 25,
        "a viewer's repeated views inside the blocking time count once, whichever replica took them"
    );
    assert_eq!(
        accepted,
        20 * 25 + 25,
        "each metric stored once, each viewer's first view once"
    );
    // Both follow the policy: after an opt-out, neither stores page views.
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    let revision = policy(&consent, &org, &instance.id).await.revision;
    a.wait_revision(&org.id, &instance.id, revision).await;
    b.wait_revision(&org.id, &instance.id, revision).await;
    for c in [&a, &b] {
        let r = ingest(
            c,
            &instance,
            vec![page_view("late", T0_MS, "p1", "s1", "u99")],
        )
        .await
        .unwrap();
        assert_eq!(dropped(&r, DropReason::Consent), 1);
    }
}

/// Rows of `org_id` in each table of org data, in one location's SQLite file.
async fn rows_in(data_dir: &std::path::Path, location: &str, org_id: &str) -> Vec<(String, i64)> {
    let tables = [
        "events",
        "page_view_days",
        "page_viewers",
        "view_times",
        "rollups",
        "applied_purges",
    ];
    sightline_tests::collector::rows_of(data_dir, &format!("collector-{location}"), org_id, &tables)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_residency_move_carries_the_orgs_data_to_the_new_store_and_leaves_none_behind() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    // Two data owners: the move stays MOVING after the collector's part until the other reports.
    let consent = TestConsent::start_with(
        &linker,
        None,
        Limits::default(),
        consent_svc::grpc::ApiOptions {
            residency: sightline_runtime::settings::ResidencySettings {
                data_owners: vec!["collector".into(), "insights".into()],
                support_bundle_owners: vec!["insights".into()],
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let collector = TestCollector::start(
        &linker,
        &consent,
        CollectorOptions {
            collection: sightline_runtime::settings::CollectionSettings {
                rollup_every_ms: 200,
                // Moves run when this test says, so each step can be looked at.
                purge_check_every_ms: 3_600_000,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let org = linker.org("Acme").await;
    let instance = linker.link_instance(&org, "SRV-A").await;
    let other = linker.org("Other").await;
    let other_instance = linker.link_instance(&other, "SRV-B").await;
    let s = Stack {
        linker,
        consent,
        collector,
        org,
        instance,
    };
    opt_in(
        &s.consent,
        &s.org,
        UsageLevel::Advanced,
        SharingLevel::Extended,
    )
    .await;
    opt_in(
        &s.consent,
        &other,
        UsageLevel::Advanced,
        SharingLevel::Extended,
    )
    .await;
    s.track_views("").await;
    let t = T0_MS - DAY;
    let result = ingest(
        &s.collector,
        &s.instance,
        vec![
            metric("m1", t, "latency", 10.0),
            metric("m2", t + 60_000, "latency", 30.0),
            page_view("v1", t, "p1", "s1", "alice"),
            page_view("v2", t + 1, "p1", "s1", "bob"),
            page_view("v3", t + DAY / 2, "p2", "s1", "alice"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(result.accepted, 5);
    ingest(
        &s.collector,
        &other_instance,
        vec![metric("o1", t, "latency", 1.0)],
    )
    .await
    .unwrap();
    s.collector.maintenance.roll_up().await;
    let mut client = s.collector.client().await;
    let report = |client: &mut pb::collector_service_client::CollectorServiceClient<_>| {
        let request = authed(
            &s.org.admin,
            pb::GetSpaceReportRequest {
                org_id: s.org.id.clone(),
                space_id: "s1".into(),
                range: s.range(T0_MS - 10 * DAY, T0_MS + DAY),
                instance_id: s.instance.id.clone(),
                ..Default::default()
            },
        );
        let mut client: pb::collector_service_client::CollectorServiceClient<
            tonic::transport::Channel,
        > = client.clone();
        async move { client.get_space_report(request).await }
    };
    let before = report(&mut client).await.unwrap().into_inner();
    assert_eq!(before.stats.as_ref().unwrap().views, 3);
    let metrics_before = s.raw_metrics("latency").await;
    assert_eq!(metrics_before.len(), 2);
    let data_dir = s.linker.data_dir().to_owned();
    let global_before = rows_in(&data_dir, "global", &s.org.id).await;
    assert!(
        global_before
            .iter()
            .filter(|(t, _)| t != "applied_purges")
            .all(|(_, n)| *n > 0),
        "{global_before:?}"
    );

    // The admin asks, the operator starts.
    let mut consent_client = s.consent.client().await;
    let step = |transition: consent_pb::MoveTransition, owner: &str| {
        consent_pb::RequestResidencyMoveRequest {
            org_id: s.org.id.clone(),
            transition: transition as i32,
            scope: consent_pb::ResidencyScope::Data as i32,
            to_location: common::Location::Eu as i32,
            owner: owner.into(),
        }
    };
    consent_client
        .request_residency_move(authed(
            &s.org.admin,
            step(consent_pb::MoveTransition::Request, ""),
        ))
        .await
        .unwrap();
    consent_client
        .request_residency_move(authed(
            s.linker.operator.expose(),
            step(consent_pb::MoveTransition::Start, ""),
        ))
        .await
        .unwrap();
    s.settle().await;

    // Meanwhile the org's data calls answer UNAVAILABLE with the retry hint; another org's do not.
    let refused = ingest(
        &s.collector,
        &s.instance,
        vec![metric("m3", t, "latency", 5.0)],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(
        refused
            .metadata()
            .get("retry-after-ms")
            .unwrap()
            .to_str()
            .unwrap(),
        "60000"
    );
    assert_eq!(
        report(&mut client).await.unwrap_err().code(),
        Code::Unavailable
    );
    ingest(
        &s.collector,
        &other_instance,
        vec![metric("o2", t, "latency", 2.0)],
    )
    .await
    .unwrap();

    // The collector's part: copied, counted, taken out of the old store, reported (by this call,
    // or by the background pass that the policy change woke, whichever comes first).
    assert!(s.collector.maintenance.move_data().await <= 1);
    s.settle().await;
    let global_after = rows_in(&data_dir, "global", &s.org.id).await;
    assert!(
        global_after.iter().all(|(_, n)| *n == 0),
        "left behind: {global_after:?}"
    );
    let eu = rows_in(&data_dir, "eu", &s.org.id).await;
    assert_eq!(eu, global_before, "all of it in the new store");
    assert!(
        rows_in(&data_dir, "global", &other.id).await[0].1 == 2,
        "another org's data stays where it is"
    );
    assert!(
        rows_in(&data_dir, "eu", &other.id)
            .await
            .iter()
            .all(|(_, n)| *n == 0)
    );
    let residency = consent_client
        .get_residency(authed(
            &s.org.admin,
            consent_pb::GetResidencyRequest {
                org_id: s.org.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .residency
        .unwrap();
    let under_way = &residency.moves[0];
    assert_eq!(under_way.state(), consent_pb::MoveState::Moving);
    assert_eq!(under_way.reported_by, ["collector"]);
    assert_eq!(under_way.waiting_for, ["insights"]);
    // Still moving: still refused; and a second pass has nothing to do.
    s.settle().await;
    assert_eq!(
        ingest(
            &s.collector,
            &s.instance,
            vec![metric("m3", t, "latency", 5.0)]
        )
        .await
        .unwrap_err()
        .code(),
        Code::Unavailable
    );
    assert_eq!(s.collector.maintenance.move_data().await, 0);

    // The last owner reports: DONE, and the org's data is served from the new location.
    let done = consent_client
        .request_residency_move(authed(
            s.linker.service.expose(),
            step(consent_pb::MoveTransition::Complete, "insights"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.r#move.unwrap().state(), consent_pb::MoveState::Done);
    s.settle().await;
    let after = report(&mut client).await.unwrap().into_inner();
    assert_eq!(after.stats, before.stats);
    assert_eq!(s.raw_metrics("latency").await, metrics_before);
    let retried = ingest(
        &s.collector,
        &s.instance,
        vec![metric("m1", t, "latency", 10.0)],
    )
    .await
    .unwrap();
    assert_eq!(
        dropped(&retried, DropReason::Duplicate),
        1,
        "the remembered ids moved too"
    );
    ingest(
        &s.collector,
        &s.instance,
        vec![metric("m3", t, "latency", 5.0)],
    )
    .await
    .unwrap();
    assert_eq!(
        rows_in(&data_dir, "eu", &s.org.id).await[0].1,
        global_before[0].1 + 1
    );
    assert_eq!(rows_in(&data_dir, "global", &s.org.id).await[0].1, 0);

    let actions: Vec<_> = s.audit_actions().await;
    let moved: Vec<_> = actions
        .iter()
        .filter(|e| e.action == "collector.residency_moved")
        .collect();
    assert_eq!(moved.len(), 1, "audited once");
    assert_eq!(
        moved[0].attributes.get("events").map(String::as_str),
        Some(global_before[0].1.to_string().as_str())
    );
    assert_eq!(
        moved[0].attributes.get("to").map(String::as_str),
        Some("eu")
    );
    for action in ["residency.move_part_done", "residency.move_completed"] {
        assert_eq!(
            actions.iter().filter(|e| e.action == action).count(),
            1,
            "{action}"
        );
    }
}

/// What the page-view reports of one instance say: per page and per space, the views, the unique
/// viewers and the views and unique viewers of each day.
async fn view_reports(
    s: &Stack,
    instance: &TestInstance,
    pages: &[(&str, &str)],
) -> Vec<(String, u64, u64, Vec<(String, u64, u64)>)> {
    let mut client = s.collector.client().await;
    let range = s.range(T0_MS - 10 * DAY, T0_MS + DAY);
    let stats = |name: String, stats: Option<pb::ViewStats>| {
        let stats = stats.unwrap_or_default();
        (
            name,
            stats.views,
            stats.unique_viewers,
            stats
                .by_day
                .into_iter()
                .map(|d| (d.day, d.views, d.unique_viewers))
                .collect(),
        )
    };
    let mut out = Vec::new();
    for (page, _) in pages {
        let report = client
            .get_page_report(authed(
                &s.org.admin,
                pb::GetPageReportRequest {
                    org_id: s.org.id.clone(),
                    page_id: (*page).to_owned(),
                    range,
                    instance_id: instance.id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        out.push(stats(format!("page {page}"), report.stats));
    }
    let mut spaces: Vec<&str> = pages.iter().map(|(_, space)| *space).collect();
    spaces.dedup();
    for space in spaces {
        let report = client
            .get_space_report(authed(
                &s.org.admin,
                pb::GetSpaceReportRequest {
                    org_id: s.org.id.clone(),
                    space_id: space.to_owned(),
                    range,
                    instance_id: instance.id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        out.push(stats(format!("space {space}"), report.stats));
    }
    out
}

/// Blocking time in both directions (issue 18): the same 240 views — four viewers, three pages in
/// two spaces, three days, bunched so that many fall inside one another's 30-minute windows — sent
/// to one instance in time order and to another shuffled over four concurrent IngestStreams give
/// the same page, space and day counts, before and after the day totals are remade.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn page_views_that_arrive_out_of_order_count_as_they_would_in_time_order() {
    let s = Stack::start(UsageLevel::Advanced, SharingLevel::Extended).await;
    s.track_views("").await;
    let shuffled = s.linker.link_instance(&s.org, "SRV-SHUFFLED").await;
    let pages = [("p1", "s1"), ("p2", "s1"), ("p3", "s2")];
    let mut seed: u64 = 0x5eed_1234_abcd_0042;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let mut views: Vec<(String, i64, &str, &str, String)> = Vec::new();
    for i in 0..240u64 {
        // Clusters an hour apart, views within 0–50 minutes of their cluster's start.
        let cluster = next(72) as i64;
        let at = T0_MS - 3 * DAY + cluster * 3_600_000 + next(50 * 60) as i64 * 1_000;
        let (page, space) = pages[next(3) as usize];
        views.push((format!("v{i:04}"), at, page, space, format!("u{}", next(4))));
    }
    let event = |v: &(String, i64, &str, &str, String)| page_view(&v.0, v.1, v.2, v.3, &v.4);
    // In time order, one batch after another.
    let mut in_order = views.clone();
    in_order.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    for chunk in in_order.chunks(10) {
        let result = ingest(&s.collector, &s.instance, chunk.iter().map(event).collect())
            .await
            .unwrap();
        assert_eq!(
            result.accepted + dropped(&result, DropReason::BlockingTime),
            10
        );
    }
    // Shuffled, over four streams at once.
    let mut order: Vec<usize> = (0..views.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, next(i as u64 + 1) as usize);
    }
    let mut streams = Vec::new();
    for k in 0..4 {
        let batches: Vec<pb::IngestStreamRequest> = order
            .iter()
            .skip(k)
            .step_by(4)
            .map(|i| event(&views[*i]))
            .collect::<Vec<_>>()
            .chunks(5)
            .enumerate()
            .map(|(n, events)| pb::IngestStreamRequest {
                batch_id: format!("s{k}-{n}"),
                events: events.to_vec(),
            })
            .collect();
        let mut client = s.collector.client().await;
        let credential = shuffled.credential.clone();
        streams.push(tokio::spawn(async move {
            let mut acks = client
                .ingest_stream(authed(&credential, futures::stream::iter(batches)))
                .await
                .unwrap()
                .into_inner();
            while let Some(ack) = acks.message().await.unwrap() {
                assert!(ack.error.is_none(), "{ack:?}");
            }
        }));
    }
    for stream in streams {
        stream.await.unwrap();
    }
    let expected = view_reports(&s, &s.instance, &pages).await;
    assert!(expected.iter().any(|(_, views, ..)| *views > 0));
    assert!(
        expected.iter().map(|(_, views, ..)| views).sum::<u64>() < 240 * 2,
        "the blocking time counted nothing out: {expected:?}"
    );
    assert_eq!(view_reports(&s, &shuffled, &pages).await, expected);
    s.collector.maintenance.roll_up().await;
    assert_eq!(view_reports(&s, &shuffled, &pages).await, expected);
    assert_eq!(view_reports(&s, &s.instance, &pages).await, expected);
}
