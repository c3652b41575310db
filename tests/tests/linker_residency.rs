//! linker-svc's instance metadata follows the org's data location (SPEC E10), on SQLite and on
//! PostgreSQL, against real servers: it is written to the location's store, a move carries it to
//! the new one and leaves none of it behind (audited once), reads keep answering through the move,
//! and a link while the org's data moves is refused with a retry hint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sightline_proto::common::v1::{InstanceMetadata, Location};
use sightline_proto::consent::v1 as consent_pb;
use sightline_proto::linker::v1 as pb;
use sightline_runtime::Secret;
use sightline_runtime::settings::{Limits, ResidencySettings};
use sightline_tests::{LinkerOptions, TestConsent, TestLinker, TestOrg, authed};
use tonic::Code;

/// The org's instance metadata rows (instances, app links) in the store at `url`.
async fn facts_rows(url: &str, org_id: &str) -> (i64, i64) {
    const FACTS: &str = "SELECT COUNT(*) FROM instance_facts WHERE org_id = $1";
    const LINKS: &str = "SELECT COUNT(*) FROM instance_app_links WHERE org_id = $1";
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        let facts: (i64,) = sqlx::query_as(FACTS)
            .bind(org_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        let links: (i64,) = sqlx::query_as(LINKS)
            .bind(org_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        (facts.0, links.0)
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let facts: (i64,) = sqlx::query_as(FACTS)
            .bind(org_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        let links: (i64,) = sqlx::query_as(LINKS)
            .bind(org_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        (facts.0, links.0)
    }
}

/// Links `server_id` in `org` with an app link; the reply or its status.
async fn link(
    linker: &TestLinker,
    org: &TestOrg,
    server_id: &str,
) -> Result<pb::LinkInstanceResponse, tonic::Status> {
    let key = linker.create_link_key(org).await.secret;
    linker
        .linker()
        .await
        .link_instance(authed(
            &key,
            pb::LinkInstanceRequest {
                metadata: Some(InstanceMetadata {
                    server_id: server_id.into(),
                    base_url: format!("https://{server_id}.example.com"),
                    product: "jira".into(),
                    version: "9.12.4".into(),
                    license_sen: format!("SEN-{server_id}"),
                    node_count: 3,
                    ..Default::default()
                }),
                app_links: vec![sightline_proto::common::v1::AppLink {
                    url: format!("https://wiki-{server_id}.example.com"),
                    product_family: "confluence".into(),
                    server_id: format!("WIKI-{server_id}"),
                    version: "8.5.0".into(),
                }],
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn instances(linker: &TestLinker, org: &TestOrg) -> Vec<pb::Instance> {
    linker
        .linker()
        .await
        .list_instances(authed(
            &org.admin,
            pb::ListInstancesRequest {
                org_id: org.id.clone(),
                page_size: 100,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .instances
}

async fn move_step(
    consent: &TestConsent,
    token: &str,
    org: &TestOrg,
    transition: consent_pb::MoveTransition,
) {
    consent
        .client()
        .await
        .request_residency_move(authed(
            token,
            consent_pb::RequestResidencyMoveRequest {
                org_id: org.id.clone(),
                transition: transition as i32,
                scope: consent_pb::ResidencyScope::Data as i32,
                to_location: Location::Eu as i32,
                owner: String::new(),
            },
        ))
        .await
        .unwrap();
}

async fn policy(consent: &TestConsent, org: &TestOrg) -> consent_pb::Policy {
    sightline_tests::consent::policy(consent, org, "").await
}

/// Waits (bounded) until `done` holds of the org's policy.
async fn wait_policy(
    consent: &TestConsent,
    org: &TestOrg,
    what: &str,
    done: impl Fn(&consent_pb::Policy) -> bool,
) -> consent_pb::Policy {
    for _ in 0..1_500 {
        let policy = policy(consent, org).await;
        if done(&policy) {
            return policy;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{what} never happened");
}

async fn metadata_follows_the_org_to_its_new_location(postgres: bool) {
    let (database_url, eu_url) = if postgres {
        (
            Some(
                sightline_runtime::testing::fresh_postgres_url()
                    .await
                    .unwrap(),
            ),
            Some(
                sightline_runtime::testing::fresh_postgres_url()
                    .await
                    .unwrap(),
            ),
        )
    } else {
        (None, None)
    };
    let linker = TestLinker::start(LinkerOptions {
        database_url,
        locations: eu_url
            .iter()
            .map(|url| ("eu".to_owned(), Secret::new(url.clone())))
            .collect(),
        ..LinkerOptions::default()
    })
    .await;
    let global_url = linker.database_url.clone();
    let eu_url = eu_url.unwrap_or_else(|| {
        sightline_runtime::storage::default_sqlite_url(linker.data_dir(), "linker-eu")
    });
    // linker-svc and a second owner that reports by hand, so the move stays MOVING while the
    // test looks at it.
    let consent = TestConsent::start_with(
        &linker,
        None,
        Limits::default(),
        consent_svc::grpc::ApiOptions {
            residency: ResidencySettings {
                data_owners: vec!["linker".into(), "test".into()],
                ..ResidencySettings::default()
            },
            ..Default::default()
        },
    )
    .await;
    let org = linker.org("Acme").await;
    let other = linker.org("Other").await;
    let mine = link(&linker, &org, "SRV-A").await.unwrap();
    link(&linker, &other, "SRV-B").await.unwrap();
    assert_eq!(facts_rows(&global_url, &org.id).await, (1, 1));

    move_step(
        &consent,
        &org.admin,
        &org,
        consent_pb::MoveTransition::Request,
    )
    .await;
    move_step(
        &consent,
        linker.operator.expose(),
        &org,
        consent_pb::MoveTransition::Start,
    )
    .await;
    // linker-svc carries its part and reports it; the move waits for the other owner.
    wait_policy(&consent, &org, "linker-svc's report", |p| {
        p.moving
            && p.data_move
                .as_ref()
                .is_some_and(|m| m.reported_by.iter().any(|o| o == "linker"))
    })
    .await;
    assert_eq!(
        facts_rows(&global_url, &org.id).await,
        (0, 0),
        "left behind"
    );
    assert_eq!(facts_rows(&eu_url, &org.id).await, (1, 1));
    assert_eq!(facts_rows(&global_url, &other.id).await, (1, 1));
    assert_eq!(facts_rows(&eu_url, &other.id).await, (0, 0));
    // Reads keep answering mid-move, from the new store.
    let listed = instances(&linker, &org).await;
    let metadata = listed[0].metadata.clone().unwrap();
    assert_eq!(
        (
            metadata.version.as_str(),
            metadata.license_sen.as_str(),
            metadata.node_count
        ),
        ("9.12.4", "SEN-SRV-A", 3)
    );
    assert_eq!(listed[0].app_links.len(), 1);
    // A link while the org's data moves is refused with the retry hint; nothing is placed.
    let refused = link(&linker, &org, "SRV-C").await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.metadata().get("retry-after-ms").is_some());

    // The other owner reports; the move is done and the org's metadata is written to EU.
    let mut report = tonic::Request::new(consent_pb::RequestResidencyMoveRequest {
        org_id: org.id.clone(),
        transition: consent_pb::MoveTransition::Complete as i32,
        scope: consent_pb::ResidencyScope::Data as i32,
        to_location: 0,
        owner: "test".into(),
    });
    sightline_runtime::auth::authorize(&mut report, &linker.service).unwrap();
    consent
        .client()
        .await
        .request_residency_move(report)
        .await
        .unwrap();
    let done = wait_policy(&consent, &org, "the move's end", |p| !p.moving).await;
    assert_eq!(done.location(), Location::Eu);
    for _ in 0..1_500 {
        match link(&linker, &org, "SRV-C").await {
            Ok(_) => break,
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    assert_eq!(facts_rows(&eu_url, &org.id).await, (2, 2));
    assert_eq!(facts_rows(&global_url, &org.id).await, (0, 0));
    let listed = instances(&linker, &org).await;
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|i| i.metadata.as_ref().is_some_and(|m| m.version == "9.12.4")),
        "{listed:?}"
    );
    assert!(
        listed
            .iter()
            .any(|i| i.instance_id == mine.instance.as_ref().unwrap().instance_id)
    );
    // Recorded once in the org's audit log, with what was carried.
    let moved: Vec<_> = linker
        .audit_events(&org)
        .await
        .into_iter()
        .filter(|e| e.action == "linker.residency_moved")
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(
        moved[0].attributes.get("instances").map(String::as_str),
        Some("1")
    );
    // The identity rows stay in linker-svc's database, with no metadata.
    assert!(
        linker
            .audit_events(&other)
            .await
            .iter()
            .all(|e| e.action != "linker.residency_moved")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_metadata_follows_the_org_to_its_new_location_on_sqlite() {
    metadata_follows_the_org_to_its_new_location(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_metadata_follows_the_org_to_its_new_location_on_postgres() {
    metadata_follows_the_org_to_its_new_location(true).await;
}
