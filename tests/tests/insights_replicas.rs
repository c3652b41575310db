//! insights-svc as two replicas on one PostgreSQL, sharing the bundle directories: a replica that
//! starts (and removes what crashes left) while the other is receiving a support bundle does not
//! take that upload's files for orphans; the upload completes and is kept whole.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use sightline_proto::common::v1::{SharingLevel, UsageLevel};
use sightline_proto::insights::v1 as pb;
use sightline_proto::insights::v1::insights_service_client::InsightsServiceClient;
use sightline_runtime::settings::Limits;
use sightline_tests::consent::opt_in;
use sightline_tests::{
    CollectorOptions, LinkerOptions, TestCollector, TestConsent, TestLinker, authed,
    service_process,
};

/// An insights-svc replica: its own process, the shared data directory and database.
async fn replica(
    linker: &TestLinker,
    consent: &TestConsent,
    collector: &TestCollector,
    database_url: &str,
) -> (tokio::process::Child, SocketAddr) {
    let env = [
        ("SIGHTLINE_INSIGHTS__LISTEN", "127.0.0.1:0".to_owned()),
        ("SIGHTLINE_INSIGHTS__METRICS_LISTEN", "off".to_owned()),
        ("SIGHTLINE_INSIGHTS__DATABASE_URL", database_url.to_owned()),
        ("SIGHTLINE_LINKER__URL", format!("http://{}", linker.addr)),
        ("SIGHTLINE_CONSENT__URL", format!("http://{}", consent.addr)),
        (
            "SIGHTLINE_COLLECTOR__URL",
            format!("http://{}", collector.addr),
        ),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let (child, addr, _) = service_process("insights", linker.data_dir(), &env).await;
    (child, addr)
}

fn bundle() -> Vec<u8> {
    let log: String = (0..20_000)
        .map(|line| format!("line {line}: request served in {} ms\n", line % 97))
        .collect();
    sightline_tests::zip_of(&[("logs/app.log", log.as_bytes())])
}

fn incoming_files(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("bundles/.incoming"))
        .map(|entries| entries.flatten().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starting_leaves_the_others_upload_under_way_alone() {
    let database_url = sightline_runtime::testing::fresh_postgres_url()
        .await
        .expect("PostgreSQL is required (SIGHTLINE_TEST_POSTGRES_URL)");
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let collector = TestCollector::start(&linker, &consent, CollectorOptions::default()).await;
    let org = linker.org("Acme").await;
    let instance = linker.link_instance(&org, "SRV-A").await;
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    let (_first, first_addr) = replica(&linker, &consent, &collector, &database_url).await;

    // An upload to the first replica: the header and half the file, then a pause.
    let bytes = bundle();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadSupportBundleRequest>(1024);
    tx.send(pb::UploadSupportBundleRequest {
        part: Some(pb::upload_support_bundle_request::Part::Header(
            pb::UploadHeader {
                file_name: "support.zip".into(),
                size_bytes: bytes.len() as u64,
                format: "sightline.support-bundle".into(),
                format_version: 1,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let chunks: Vec<Vec<u8>> = bytes.chunks(16 * 1024).map(<[u8]>::to_vec).collect();
    let half = chunks.len() / 2;
    for chunk in &chunks[..half] {
        tx.send(pb::UploadSupportBundleRequest {
            part: Some(pb::upload_support_bundle_request::Part::Chunk(
                chunk.clone(),
            )),
        })
        .await
        .unwrap();
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{first_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let credential = instance.credential.clone();
    let upload = tokio::spawn(async move {
        InsightsServiceClient::new(channel)
            .upload_support_bundle(authed(
                &credential,
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .await
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while incoming_files(linker.data_dir()) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upload never began"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The second replica starts on the same directories: it looks for what crashes left.
    let (_second, _) = replica(&linker, &consent, &collector, &database_url).await;
    assert_eq!(
        incoming_files(linker.data_dir()),
        1,
        "the upload under way is not an orphan"
    );

    // The rest of the file: the upload completes and is kept.
    for chunk in &chunks[half..] {
        tx.send(pb::UploadSupportBundleRequest {
            part: Some(pb::upload_support_bundle_request::Part::Chunk(
                chunk.clone(),
            )),
        })
        .await
        .unwrap();
    }
    drop(tx);
    let reply = upload
        .await
        .unwrap()
        .expect("the upload is kept")
        .into_inner();
    assert_eq!(reply.bytes_received, bytes.len() as u64);
    assert_eq!(reply.files_read, 1);
    let kept = std::fs::read_dir(linker.data_dir().join("bundles/global"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".zip"))
        .count();
    assert_eq!(kept, 1);
}
