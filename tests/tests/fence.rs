//! Consent at every moment (SPEC E3): an opt-out is a fence — once collector-svc has applied the new
//! policy revision, no batch enforced under an older one is acknowledged as accepted, on SQLite and
//! on PostgreSQL, however many streams are committing — and a policy is a lease: a collector that
//! cannot hear consent-svc (a relay that goes silent but keeps the connections open) fails closed
//! within the lease, and a silent linker-svc stops credentials and audited changes with UNAVAILABLE
//! until it answers again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sightline_runtime::policy_stream::PolicyFollower as _;
use std::time::{Duration, Instant};

use sightline_proto::collector::v1::{self as pb, DropReason};
use sightline_proto::common::v1::{SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::settings::Limits;
use sightline_tests::collector::{Streams, dropped, ingest, metric, opt_in_enforced};
use sightline_tests::consent::{policy, settings, update};
use sightline_tests::{
    CollectorOptions, LinkerOptions, Relay, T0_MS, TestCollector, TestConsent, TestLinker, TestOrg,
    authed,
};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Limits no test load reaches (the fence, not the rate limit, is under test).
fn roomy() -> Limits {
    Limits {
        rate_per_second: 1_000_000,
        rate_burst: 1_000_000,
        ..Limits::default()
    }
}

/// A short lease, so the silent-partition tests take seconds: heartbeats every 200 ms, the lease 1 s
/// (five heartbeats), keepalive pings every 300 ms answered within 500 ms.
fn short_lease() -> Limits {
    Limits {
        policy_heartbeat_ms: 200,
        policy_lease_ms: 1_000,
        keepalive_interval_ms: 300,
        keepalive_timeout_ms: 500,
        ..roomy()
    }
}

/// Eight IngestStreams send 100-event batches back to back; the org opts out; every stream goes on
/// until it is refused. No ack that says accepted may be handed on once the new revision is
/// applied: every commit checked under the old one answers before it is (the fence).
async fn opt_out_is_a_fence(postgres: bool) {
    let url = async || sightline_runtime::testing::postgres_url_if(postgres).await;
    let linker = TestLinker::start(LinkerOptions {
        quiet: true,
        limits: roomy(),
        ..LinkerOptions::default()
    })
    .await;
    let consent = TestConsent::start(&linker, url().await, roomy()).await;
    let collector = TestCollector::start(
        &linker,
        &consent,
        CollectorOptions {
            database_url: url().await,
            limits: roomy(),
            ..CollectorOptions::default()
        },
    )
    .await;
    let org = linker.org("Fence").await;
    let instance = linker.link_instance(&org, "FENCE-1").await;
    opt_in_enforced(&consent, &collector, &org, &instance).await;

    let streams = Streams::start(&collector, &instance, 8, 100, "fence").await;
    // Every stream is committing before the opt-out.
    streams.until_accepting(3).await;
    update(
        &consent,
        &org,
        settings(UsageLevel::Disabled, SharingLevel::Basic),
    )
    .await
    .unwrap();
    let acks = streams.until_refused().await;
    assert!(
        acks.iter().any(|(_, accepted)| !accepted),
        "no stream was refused after the opt-out"
    );
    // The verdict is the collector's own order, not the client's clock: every ack that said
    // accepted was handed to the transport while its commit held the fence, under the revision
    // still applied then. (Arrival times at the client add the scheduling of eight reading tasks,
    // so they are reported, and measured in `bench_collect --target optout`.)
    assert_eq!(
        collector.policies.fence_breaches(),
        0,
        "an accepted ack was handed on after the opt-out was applied"
    );
    let first_refusal = acks
        .iter()
        .filter(|(_, accepted)| !accepted)
        .map(|(at, _)| *at)
        .min()
        .unwrap();
    let late = acks
        .iter()
        .filter(|(at, accepted)| *accepted && *at > first_refusal)
        .map(|(at, _)| at.duration_since(first_refusal))
        .max();
    eprintln!("accepted acks read after the first refusal was read: latest {late:?}");
    // And from now on, nothing of the org is accepted.
    let result = ingest(
        &collector,
        &instance,
        vec![metric("after", T0_MS, "fence.load", 1.0)],
    )
    .await
    .unwrap();
    assert_eq!(
        (result.accepted, dropped(&result, DropReason::Consent)),
        (0, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_opt_out_is_a_fence_for_eight_streams_on_sqlite() {
    opt_out_is_a_fence(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_opt_out_is_a_fence_for_eight_streams_on_postgres() {
    opt_out_is_a_fence(true).await;
}

async fn health(addr: std::net::SocketAddr) -> ServingStatus {
    let mut client = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let status = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

/// Polls `check` until it holds (the verdict is the state reached, not how soon).
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..3_000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_collector_is_not_serving_until_it_holds_a_policy_and_says_when_to_retry() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let consent = TestConsent::start(&linker, None, short_lease()).await;
    let relay = Relay::start(consent.addr).await;
    relay.go_silent();
    let collector = TestCollector::launch(
        &linker,
        &consent,
        CollectorOptions {
            consent_url: Some(relay.url()),
            limits: short_lease(),
            ..CollectorOptions::default()
        },
    )
    .await;
    let org = linker.org("Early").await;
    let instance = linker.link_instance(&org, "EARLY-1").await;
    // No snapshot can arrive: NOT_SERVING from the first health check, and ingest says when to retry.
    assert_eq!(health(collector.addr).await, ServingStatus::NotServing);
    let refused = ingest(
        &collector,
        &instance,
        vec![metric("m1", T0_MS, "early", 1.0)],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let hint: u64 = refused
        .metadata()
        .get("retry-after-ms")
        .expect("a retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2_050).contains(&hint), "retry-after-ms {hint}");
    relay.resume();
    eventually(
        "the collector serves once it has its snapshot",
        async || health(collector.addr).await == ServingStatus::Serving,
    )
    .await;
    assert!(collector.policies.is_ready());
}

/// What an instance got for one metric sent at a moment.
struct Sent {
    at: Instant,
    accepted: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_that_cannot_hear_consent_stops_collecting_within_the_lease() {
    let linker = TestLinker::start(LinkerOptions {
        limits: short_lease(),
        ..LinkerOptions::default()
    })
    .await;
    let consent = TestConsent::start(&linker, None, short_lease()).await;
    let relay = Relay::start(consent.addr).await;
    let collector = TestCollector::start(
        &linker,
        &consent,
        CollectorOptions {
            consent_url: Some(relay.url()),
            limits: short_lease(),
            ..CollectorOptions::default()
        },
    )
    .await;
    let org = linker.org("Partitioned").await;
    let instance = linker.link_instance(&org, "PART-1").await;
    opt_in_enforced(&consent, &collector, &org, &instance).await;
    let send = async |n: u64| Sent {
        accepted: ingest(
            &collector,
            &instance,
            vec![metric(&format!("p{n}"), T0_MS, "partition", 1.0)],
        )
        .await
        .is_ok_and(|r| r.accepted == 1),
        at: Instant::now(),
    };
    assert!(send(0).await.accepted);

    // The path to consent-svc goes silent; the admin opts out, and consent-svc answers OK.
    relay.go_silent();
    update(
        &consent,
        &org,
        settings(UsageLevel::Disabled, SharingLevel::Basic),
    )
    .await
    .unwrap();
    let opted_out = Instant::now();
    let lease = Duration::from_millis(short_lease().policy_lease_ms);
    let mut sent = Vec::new();
    let mut n = 1;
    while opted_out.elapsed() < lease * 3 {
        sent.push(send(n).await);
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last_accepted = sent
        .iter()
        .filter(|s| s.accepted)
        .map(|s| s.at.duration_since(opted_out))
        .max();
    assert!(
        last_accepted.is_none_or(|at| at <= lease + Duration::from_secs(1)),
        "a metric was accepted {last_accepted:?} after the opt-out, past the lease ({lease:?}) plus one second"
    );
    assert!(
        !sent.last().unwrap().accepted,
        "still collecting after the lease"
    );
    assert_eq!(health(collector.addr).await, ServingStatus::NotServing);
    let refused = ingest(
        &collector,
        &instance,
        vec![metric("during", T0_MS, "partition", 1.0)],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.metadata().get("retry-after-ms").is_some());

    // The path comes back: the opt-out is enforced, and its purge takes what came in before it.
    relay.resume();
    let disabled = policy(&consent, &org, &instance.id).await.revision;
    collector
        .wait_revision(&org.id, &instance.id, disabled)
        .await;
    let result = ingest(
        &collector,
        &instance,
        vec![metric("after", T0_MS, "partition", 1.0)],
    )
    .await
    .unwrap();
    assert_eq!(dropped(&result, DropReason::Consent), 1);
    collector.maintenance.apply_purges().await;
    let stored = collector
        .client()
        .await
        .query_metrics(authed(
            &org.admin,
            pb::QueryMetricsRequest {
                org_id: org.id.clone(),
                instance_id: instance.id.clone(),
                metric_name: "partition".into(),
                range: Some(sightline_proto::common::v1::TimeRange {
                    start: sightline_tests::collector::at(T0_MS - 86_400_000),
                    end: sightline_tests::collector::at(T0_MS + 86_400_000),
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .points;
    assert!(
        stored.is_empty(),
        "the purge left {} points collected before the opt-out",
        stored.len()
    );
}

async fn consent_update(consent: &TestConsent, org: &TestOrg, usage: UsageLevel) -> Code {
    let mut request = authed(
        &org.admin,
        consent_pb::UpdateConsentRequest {
            org_id: org.id.clone(),
            settings: Some(settings(usage, SharingLevel::Basic)),
            reason: "test".into(),
            expected_version: 0,
            request_id: String::new(),
        },
    );
    request.set_timeout(Duration::from_secs(20));
    match consent.client().await.update_consent(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_linker_stops_new_credentials_and_audited_changes_until_it_answers() {
    let linker = TestLinker::start(LinkerOptions {
        limits: short_lease(),
        ..LinkerOptions::default()
    })
    .await;
    let relay = Relay::start(linker.addr).await;
    let consent = TestConsent::start_via(&linker, relay.url(), short_lease()).await;
    let (a, b) = (linker.org("Known").await, linker.org("New").await);
    assert_eq!(
        consent_update(&consent, &a, UsageLevel::Basic).await,
        Code::Ok
    );

    relay.go_silent();
    // A change must be audited to be made: it is refused, and so is a token consent-svc has not
    // checked yet (its validation cannot be had), each with UNAVAILABLE and within the keepalive
    // and call bounds — never by hanging on the silent connection.
    let started = Instant::now();
    assert_eq!(
        consent_update(&consent, &a, UsageLevel::Advanced).await,
        Code::Unavailable
    );
    assert_eq!(
        consent_update(&consent, &b, UsageLevel::Basic).await,
        Code::Unavailable
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    relay.resume();
    // Once it answers, changes go through again (a's first change, whose entry's fate was unknown,
    // is settled first: applied if its entry was written, dropped if not).
    eventually("audited changes go through again", async || {
        consent_update(&consent, &b, UsageLevel::Basic).await == Code::Ok
    })
    .await;
    eventually("a's changes go through again", async || {
        consent_update(&consent, &a, UsageLevel::Advanced).await == Code::Ok
    })
    .await;
    // The store and the audit log agree: one consent.updated entry per version, v1 to the last.
    let current = consent
        .client()
        .await
        .get_consent(authed(
            &a.admin,
            consent_pb::GetConsentRequest {
                org_id: a.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .consent
        .unwrap();
    assert_eq!(
        current.settings.unwrap().usage_level,
        UsageLevel::Advanced as i32
    );
    let audited = linker.audited(&a, "consent.updated").await;
    let versions: Vec<String> = (1..=current.version).map(|v| format!("v{v}")).collect();
    assert_eq!(audited, versions);
    // The audit chain is whole.
    let chain = linker.verify_chain(&a).await;
    assert!(chain.intact, "{chain:?}");
}
