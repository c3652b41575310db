//! Two linker-svc replicas on one PostgreSQL behave as one: an org made on one is served by the
//! other, and actions taken through both at once each write one audit entry into one intact chain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sightline_tests::{LinkerOptions, TestLinker};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_through_two_replicas_at_once_keep_one_intact_chain() {
    let url = sightline_runtime::testing::postgres_url_if(true).await;
    let a = TestLinker::start(LinkerOptions {
        database_url: url.clone(),
        ..LinkerOptions::default()
    })
    .await;
    let b = TestLinker::start(LinkerOptions {
        database_url: url,
        ..LinkerOptions::default()
    })
    .await;
    let org = a.org("Acme").await;
    const EACH: usize = 15;
    // Link keys made through both replicas at once: each an audited action of the same org.
    let made = futures::future::join_all((0..2 * EACH).map(|i| {
        let replica = if i % 2 == 0 { &a } else { &b };
        replica.create_link_key(&org)
    }))
    .await;
    assert_eq!(made.len(), 2 * EACH);
    // Each replica sees every key, and the log holds one entry per key.
    for replica in [&a, &b] {
        assert_eq!(replica.link_keys(&org).await.len(), 2 * EACH);
        assert_eq!(
            replica.audited(&org, "link_key.created").await.len(),
            2 * EACH
        );
        let verdict = replica.verify_chain(&org).await;
        assert!(verdict.intact, "{}", verdict.problem);
        let events = replica.audit_events(&org).await;
        assert_eq!(verdict.entries_checked, events.len() as u64);
        let mut seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    }
}
