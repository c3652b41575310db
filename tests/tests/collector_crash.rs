//! collector-svc under the two things that must not lose or leak data: kill -9 of a real collector
//! process in the middle of streams (every acknowledged event is stored exactly once), and an opt-out
//! while eight streams are sending (nothing the new level forbids survives).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sightline_proto::collector::v1::collector_service_client::CollectorServiceClient;
use sightline_proto::collector::v1::{self as pb, DropReason};
use sightline_proto::common::v1::{Channel, SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::settings::Limits;
use sightline_tests::collector::{dropped, metric, page_view};
use sightline_tests::consent::{opt_in, policy, track};
use sightline_tests::{
    CollectorOptions, LinkerOptions, T0_MS, TestCollector, TestConsent, TestInstance, TestLinker,
    authed, service_process,
};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel as GrpcChannel;

/// A collector-svc process (the `sightline collector` binary) wired to in-process linker and consent.
struct CollectorProcess {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl CollectorProcess {
    /// Starts it on `addr` (port 0 the first time: the system picks, and the process says which).
    async fn start(
        linker: &TestLinker,
        consent: &TestConsent,
        addr: SocketAddr,
        database_url: Option<&str>,
    ) -> Self {
        let mut env = vec![
            ("SIGHTLINE_COLLECTOR__LISTEN".to_owned(), addr.to_string()),
            (
                "SIGHTLINE_COLLECTOR__METRICS_LISTEN".to_owned(),
                "off".to_owned(),
            ),
            (
                "SIGHTLINE_LINKER__URL".to_owned(),
                format!("http://{}", linker.addr),
            ),
            (
                "SIGHTLINE_CONSENT__URL".to_owned(),
                format!("http://{}", consent.addr),
            ),
        ];
        if let Some(url) = database_url {
            env.push((
                "SIGHTLINE_COLLECTOR__DATABASE_URL".to_owned(),
                url.to_owned(),
            ));
        }
        let (child, addr, _) = service_process("collector", linker.data_dir(), &env).await;
        Self { child, addr }
    }

    async fn kill9(&mut self) {
        self.child.kill().await.unwrap();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Sends batches over IngestStream until stopped, resending a batch (same ids) until it is acked,
/// across broken streams, as a spooling client does. Returns the ids acknowledged.
async fn sender(
    channel: GrpcChannel,
    instance: TestInstance,
    stream: usize,
    stop: CancellationToken,
    counted: Arc<AtomicUsize>,
) -> Vec<String> {
    let mut acked = Vec::new();
    let mut n = 0;
    'batches: while !stop.is_cancelled() {
        let ids: Vec<String> = (0..50).map(|j| format!("s{stream}-b{n}-{j}")).collect();
        let at = now_ms();
        loop {
            let events = ids.iter().map(|id| metric(id, at, "load", 1.0)).collect();
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(pb::IngestStreamRequest {
                batch_id: format!("b{n}"),
                events,
            })
            .await
            .unwrap();
            let call = CollectorServiceClient::new(channel.clone())
                .ingest_stream(authed(
                    &instance.credential,
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                ))
                .await;
            let ack = match call {
                Ok(response) => response.into_inner().message().await,
                Err(status) => Err(status),
            };
            drop(tx);
            match ack {
                Ok(Some(pb::IngestStreamResponse {
                    error: None,
                    result: Some(result),
                    ..
                })) => {
                    assert_eq!(
                        result.accepted + dropped(&result, DropReason::Duplicate),
                        50
                    );
                    counted.fetch_add(ids.len(), Ordering::Relaxed);
                    acked.extend(ids);
                    n += 1;
                    continue 'batches;
                }
                _ => {
                    if stop.is_cancelled() {
                        break 'batches;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    acked
}

/// Kills collector-svc with SIGKILL over and over while four streams send (restarting it on the
/// same address). With `replicas` 2 (PostgreSQL), a second replica on the same store keeps serving
/// and the clients balance over both (tonic's client-side balancing): only the first is killed, so
/// a batch a killed replica committed without answering may be retried on the other.
async fn kill_loop(database_url: Option<String>, replicas: usize) {
    let linker = TestLinker::start(LinkerOptions {
        quiet: true,
        ..LinkerOptions::default()
    })
    .await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let org = linker.org("Acme").await;
    let instance = linker.link_instance(&org, "SRV-A").await;
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    let unbound: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut processes = Vec::new();
    for _ in 0..replicas {
        processes.push(
            CollectorProcess::start(&linker, &consent, unbound, database_url.as_deref()).await,
        );
    }
    let addrs: Vec<SocketAddr> = processes.iter().map(|p| p.addr).collect();
    let channel = GrpcChannel::balance_list(
        addrs
            .iter()
            .map(|addr| GrpcChannel::from_shared(format!("http://{addr}")).unwrap()),
    );
    let stop = CancellationToken::new();
    let counted = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..4)
        .map(|k| {
            let sent = sender(
                channel.clone(),
                instance.clone(),
                k,
                stop.clone(),
                counted.clone(),
            );
            tokio::spawn(sent)
        })
        .collect();
    // Twenty kills at least, and on until 1,000 events were acknowledged: how many go through
    // between kills depends on the machine's pace, so it is a condition to reach, not a verdict
    // (bounded, so a collector that never acknowledges still ends the test).
    let mut kills = 0;
    while kills < 20 || (counted.load(Ordering::Relaxed) < 1_000 && kills < 200) {
        tokio::time::sleep(Duration::from_millis(rand::random_range(150..400))).await;
        processes[0].kill9().await;
        processes[0] =
            CollectorProcess::start(&linker, &consent, addrs[0], database_url.as_deref()).await;
        kills += 1;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let mut acked = Vec::new();
    for s in senders {
        acked.extend(s.await.unwrap());
    }
    drop(processes);
    assert!(acked.len() >= 1_000, "{} acknowledged", acked.len());
    let url = database_url.unwrap_or_else(|| {
        format!(
            "sqlite://{}",
            linker.data_dir().join("collector-global.db").display()
        )
    });
    let rows: Vec<(String,)> = if url.starts_with("sqlite") {
        let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query_as("SELECT event_id FROM events WHERE instance_id = $1")
            .bind(&instance.id)
            .fetch_all(&mut db)
            .await
            .unwrap()
    } else {
        let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query_as("SELECT event_id FROM events WHERE instance_id = $1")
            .bind(&instance.id)
            .fetch_all(&mut db)
            .await
            .unwrap()
    };
    let stored: HashSet<String> = rows.iter().map(|(id,)| id.clone()).collect();
    assert_eq!(stored.len(), rows.len(), "no event is stored twice");
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_in_the_middle_of_streams_loses_and_doubles_nothing_acknowledged_on_sqlite() {
    kill_loop(None, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_in_the_middle_of_streams_loses_and_doubles_nothing_acknowledged_on_postgres() {
    kill_loop(sightline_runtime::testing::postgres_url_if(true).await, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_one_killed_9_over_and_over_lose_and_double_nothing_acknowledged() {
    kill_loop(sightline_runtime::testing::postgres_url_if(true).await, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_opt_out_while_eight_streams_send_leaves_nothing_the_new_level_forbids() {
    let linker = TestLinker::start(LinkerOptions {
        quiet: true,
        ..LinkerOptions::default()
    })
    .await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let collector = TestCollector::start(&linker, &consent, CollectorOptions::default()).await;
    let org = linker.org("Acme").await;
    let instance = linker.link_instance(&org, "SRV-A").await;
    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Extended).await;
    track(
        &consent,
        &org,
        consent_pb::TrackingSettings {
            enabled_channels: vec![Channel::Desktop as i32],
            ..Default::default()
        },
    )
    .await;
    let before = policy(&consent, &org, &instance.id).await.revision;
    collector.wait_revision(&org.id, &instance.id, before).await;

    let stop = CancellationToken::new();
    // (policy revision, page views accepted) of every acknowledged batch.
    let acks = Arc::new(Mutex::new(Vec::<(u64, u32)>::new()));
    let mut streams = Vec::new();
    for k in 0..8 {
        let (client, credential, stop, acks) = (
            collector.client().await,
            instance.credential.clone(),
            stop.clone(),
            acks.clone(),
        );
        streams.push(tokio::spawn(async move {
            let mut client = client;
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let mut replies = client
                .ingest_stream(authed(
                    &credential,
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                ))
                .await
                .unwrap()
                .into_inner();
            let mut n = 0;
            while !stop.is_cancelled() {
                let events = (0..20)
                    .map(|j| {
                        if j % 2 == 0 {
                            page_view(
                                &format!("v{k}-{n}-{j}"),
                                T0_MS,
                                "p1",
                                "s1",
                                &format!("u{j}"),
                            )
                        } else {
                            metric(&format!("m{k}-{n}-{j}"), T0_MS, "load", 1.0)
                        }
                    })
                    .collect();
                tx.send(pb::IngestStreamRequest {
                    batch_id: n.to_string(),
                    events,
                })
                .await
                .unwrap();
                let ack = replies.message().await.unwrap().unwrap();
                if let Some(result) = ack.result {
                    let views = result.accepted - 10.min(result.accepted);
                    acks.lock().unwrap().push((result.policy_revision, views));
                }
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    let after = policy(&consent, &org, &instance.id).await.revision;
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.cancel();
    for s in streams {
        s.await.unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    assert!(
        acks.iter().any(|(r, _)| *r < after) && acks.iter().any(|(r, _)| *r >= after),
        "batches on both sides of the change"
    );
    for (revision, views) in &acks {
        if *revision >= after {
            assert_eq!(
                *views, 0,
                "a batch enforced under the new policy stored page views"
            );
        }
    }
    // The purge the opt-out issued removes every page view stored under the old level.
    collector.maintenance.apply_purges().await;
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        linker.data_dir().join("collector-global.db").display()
    ))
    .await
    .unwrap();
    let (views,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events WHERE kind = 4")
        .fetch_one(&db)
        .await
        .unwrap();
    let (counters,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM page_view_days")
        .fetch_one(&db)
        .await
        .unwrap();
    let (viewers,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM page_viewers")
        .fetch_one(&db)
        .await
        .unwrap();
    let (metrics,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events WHERE kind = 2")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!((views, counters, viewers), (0, 0, 0));
    assert!(metrics > 0, "metrics are still allowed and kept");
}
