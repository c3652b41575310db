//! Two consent-svc replicas on one PostgreSQL behave as one: changes of one org taken by both at
//! once leave contiguous versions, each with a valid receipt and exactly one audit entry (a change
//! refused as concurrent is neither stored nor audited); and a WatchPolicy stream on either
//! replica receives every change, whichever replica made it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sightline_proto::common::v1::{SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as pb;
use sightline_runtime::settings::Limits;
use sightline_tests::consent::{settings, update, watch_org};
use sightline_tests::{LinkerOptions, TestConsent, TestLinker, authed};
use tokio_stream::StreamExt;
use tonic::Code;

/// Two replicas sharing one fresh PostgreSQL schema.
async fn replicas() -> (TestLinker, TestConsent, TestConsent) {
    let url = sightline_runtime::testing::postgres_url_if(true)
        .await
        .unwrap();
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let a = TestConsent::start(&linker, Some(url.clone()), Limits::default()).await;
    let b = TestConsent::start(&linker, Some(url), Limits::default()).await;
    (linker, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_taken_by_two_replicas_at_once_stay_contiguous_receipted_and_audited_once() {
    let (linker, a, b) = replicas().await;
    let org = linker.org("Acme").await;
    const ROUNDS: usize = 12;
    let levels = [
        (UsageLevel::Basic, SharingLevel::Basic),
        (UsageLevel::Advanced, SharingLevel::Extended),
    ];
    for round in 0..ROUNDS {
        // Both replicas take a change of the same org at the same moment; each caller retries
        // what is refused as concurrent (ABORTED) or not yet settled (UNAVAILABLE).
        let calls = [&a, &b].map(|replica| {
            let (usage, sharing) = levels[round % 2];
            let org = &org;
            async move {
                loop {
                    match update(replica, org, settings(usage, sharing)).await {
                        Ok(version) => return version,
                        Err(s) if matches!(s.code(), Code::Aborted | Code::Unavailable) => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(s) => panic!("round {round}: {s:?}"),
                    }
                }
            }
        });
        let [first, second] = calls;
        let (x, y) = tokio::join!(first, second);
        assert_ne!(
            x.version, y.version,
            "round {round}: one version for two changes"
        );
    }

    // Versions 1..=2·ROUNDS, each once, whichever replica is asked.
    for replica in [&a, &b] {
        let history = replica
            .client()
            .await
            .list_consent_history(authed(
                &org.admin,
                pb::ListConsentHistoryRequest {
                    org_id: org.id.clone(),
                    page_size: 1_000,
                    page_token: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .versions;
        let mut versions: Vec<u64> = history.iter().map(|v| v.version).collect();
        versions.sort_unstable();
        assert_eq!(versions, (1..=(2 * ROUNDS) as u64).collect::<Vec<_>>());
        // Every receipt verifies (both replicas sign with the deployment's one key).
        for v in history {
            let answer = replica
                .client()
                .await
                .verify_receipt(authed(
                    &org.admin,
                    pb::VerifyReceiptRequest { receipt: v.receipt },
                ))
                .await
                .unwrap()
                .into_inner();
            assert!(answer.valid, "v{}: {}", v.version, answer.reason);
        }
    }
    // The audit log names each stored version once, and nothing else of consent.
    let audited = linker.audited(&org, "consent.updated").await;
    let mut expected: Vec<String> = (1..=2 * ROUNDS).map(|v| format!("v{v}")).collect();
    expected.sort();
    assert_eq!(audited, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_on_either_replica_receives_every_change_made_on_the_other() {
    let (linker, a, b) = replicas().await;
    let org = linker.org("Acme").await;
    update(&a, &org, settings(UsageLevel::Basic, SharingLevel::Basic))
        .await
        .unwrap();
    let mut on_a = watch_org(&mut a.client().await, &org.admin, &org.id)
        .await
        .unwrap();
    let mut on_b = watch_org(&mut b.client().await, &org.admin, &org.id)
        .await
        .unwrap();
    for watch in [&mut on_a, &mut on_b] {
        assert!(watch.next().await.unwrap().unwrap().snapshot_complete);
    }
    // Alternate the replica that takes the change; both watchers see each one, in order.
    for change in 0..6u64 {
        let (taker, usage) = if change % 2 == 0 {
            (&a, UsageLevel::Advanced)
        } else {
            (&b, UsageLevel::Basic)
        };
        let version = update(taker, &org, settings(usage, SharingLevel::Basic))
            .await
            .unwrap()
            .version;
        for (name, watch) in [("a", &mut on_a), ("b", &mut on_b)] {
            // A bound on waiting, not a pace: without the notice the change never comes.
            let policy = loop {
                let message = tokio::time::timeout(Duration::from_secs(30), watch.next())
                    .await
                    .unwrap_or_else(|_| panic!("watcher on {name} never saw v{version}"))
                    .unwrap()
                    .unwrap();
                if !message.heartbeat {
                    break message.policy.unwrap();
                }
            };
            assert_eq!(policy.consent_version, version, "watcher on {name}");
            assert_eq!(policy.usage_level, usage as i32, "watcher on {name}");
        }
    }
}

/// A replica that hears of a change its watcher's snapshot already holds (the notice came after the
/// snapshot read it, or it sends every org anew after its notices were interrupted) does not send
/// it again: each change reaches a watcher once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_announced_again_after_a_watchers_snapshot_is_not_sent_twice() {
    let (linker, a, b) = replicas().await;
    let org = linker.org("Acme").await;
    let first = update(&a, &org, settings(UsageLevel::Basic, SharingLevel::Basic))
        .await
        .unwrap()
        .version;
    let mut on_b = watch_org(&mut b.client().await, &org.admin, &org.id)
        .await
        .unwrap();
    let snapshot = on_b.next().await.unwrap().unwrap();
    assert!(snapshot.snapshot_complete);
    assert_eq!(snapshot.policy.unwrap().consent_version, first);
    // Announce the org again on the replicas' channel, as a late notice of that change would.
    let store = consent_svc::store::open(&a.database_url).await.unwrap();
    let channel = store.channel().unwrap().to_owned();
    let pool = sqlx::PgPool::connect(&a.database_url).await.unwrap();
    let notice = serde_json::json!({"origin": "elsewhere", "org_id": org.id, "instance_ids": []});
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(&channel)
        .bind(notice.to_string())
        .execute(&pool)
        .await
        .unwrap();
    let next = update(
        &a,
        &org,
        settings(UsageLevel::Advanced, SharingLevel::Basic),
    )
    .await
    .unwrap()
    .version;
    let policy = loop {
        let message = tokio::time::timeout(Duration::from_secs(30), on_b.next())
            .await
            .expect("the change never came")
            .unwrap()
            .unwrap();
        if !message.heartbeat {
            break message.policy.unwrap();
        }
    };
    assert_eq!(
        policy.consent_version, next,
        "the first message after the snapshot is the next change"
    );
}
