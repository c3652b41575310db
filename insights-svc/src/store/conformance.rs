//! The insights store suite: written once, run against SQLite and PostgreSQL.

use prost::Message;
use sightline_proto::common::v1::DataClass;
use sightline_proto::insights::v1 as pb;
use sightline_runtime::audited::{AuditEntry, StagedChange};

use super::*;

const ORG: &str = "0190a000-0000-7000-8000-000000000001";
const OTHER: &str = "0190a000-0000-7000-8000-000000000002";
const INSTANCE: &str = "0190a000-0000-7000-8000-0000000000a1";
const OTHER_INSTANCE: &str = "0190a000-0000-7000-8000-0000000000b1";
const DAY: i64 = 86_400_000;
const T0: i64 = 20_000 * DAY;

use sightline_runtime::testing::{Backend, Guard};

/// A fresh store on the backend a test of the suite runs on.
trait Stores {
    async fn open(self) -> (Arc<dyn InsightsStore>, Guard);
}

impl Stores for Backend {
    async fn open(self) -> (Arc<dyn InsightsStore>, Guard) {
        let (url, guard) = self.fresh_url("insights").await.unwrap();
        (open(&url).await.unwrap(), guard)
    }
}

fn assessment_body(key: &str, name: &str) -> Vec<u8> {
    pb::Assessment {
        format: "sightline.assessment".into(),
        format_version: 1,
        entities: vec![pb::EntityRef {
            entity_type: "project".into(),
            id: "10001".into(),
            key: key.into(),
            name: name.into(),
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

fn assessment(upload_id: &str, org: &str, subject: &str, at: i64) -> StoredAssessment {
    StoredAssessment {
        upload_id: upload_id.into(),
        org_id: org.into(),
        subject: subject.into(),
        stored_at: at,
        consent_version: 1,
        size_bytes: 100,
        body: assessment_body("OPS", "Operations"),
    }
}

fn readiness(org: &str, subject: &str, at: i64, score: i64) -> StoredReadiness {
    StoredReadiness {
        org_id: org.into(),
        subject: subject.into(),
        assessed_at: at,
        score,
        report: pb::ReadinessReport {
            org_id: org.into(),
            blockers: vec![pb::Blocker {
                blocker_id: "limit.projects".into(),
                entities: vec![pb::EntityRef {
                    entity_type: "project".into(),
                    id: "10001".into(),
                    key: "OPS".into(),
                    name: "Operations".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec(),
    }
}

fn bundle(upload_id: &str, org: &str, at: i64) -> StoredBundle {
    StoredBundle {
        upload_id: upload_id.into(),
        org_id: org.into(),
        subject: INSTANCE.into(),
        location: "eu".into(),
        file_name: format!("{upload_id}.zip"),
        stored_at: at,
        size_bytes: 10,
        sha256: "00".repeat(32),
        files_read: 2,
        scrubbed: "{\"email\":1}".into(),
    }
}

fn staged(org: &str, change: Change) -> StagedChange {
    StagedChange {
        change_id: uuid::Uuid::now_v7().to_string(),
        org_id: org.into(),
        entry: AuditEntry {
            org_id: org.into(),
            actor: "service:insights".into(),
            action: "test".into(),
            target: "t".into(),
            attributes: Default::default(),
        },
        payload: change.encode(),
        staged_at_ms: T0,
    }
}

async fn apply(store: &Arc<dyn InsightsStore>, org: &str, change: Change) {
    let change = staged(org, change);
    store.stage(&change).await.unwrap();
    store.apply(&change).await.unwrap();
}

/// Two orgs with an instance each, with data old and new.
async fn fill(store: &Arc<dyn InsightsStore>) {
    for (org, subject) in [(ORG, INSTANCE), (OTHER, OTHER_INSTANCE)] {
        store
            .put_assessment(&assessment(
                &format!("old-{org}"),
                org,
                subject,
                T0 - 100 * DAY,
            ))
            .await
            .unwrap();
        store
            .put_assessment(&assessment(&format!("new-{org}"), org, subject, T0))
            .await
            .unwrap();
        store
            .put_readiness(&readiness(org, subject, T0, 70))
            .await
            .unwrap();
        for day in [200, 10, 1] {
            store
                .put_score(org, subject, T0 - day * DAY, 80, "v1", 1)
                .await
                .unwrap();
        }
        store
            .put_bundle(&bundle(&format!("b-old-{org}"), org, T0 - 400 * DAY))
            .await
            .unwrap();
        store
            .put_bundle(&bundle(&format!("b-new-{org}"), org, T0))
            .await
            .unwrap();
    }
}

async fn records_are_read_back_per_org_and_subject(backend: Backend) {
    let (store, _guard) = backend.open().await;
    fill(&store).await;
    let latest = store
        .latest_assessment(ORG, INSTANCE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.upload_id, format!("new-{ORG}"));
    // Another org's subject is not ours.
    assert!(
        store
            .latest_assessment(ORG, OTHER_INSTANCE)
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.readiness(OTHER, INSTANCE).await.unwrap().is_none());
    assert_eq!(
        store.readiness(ORG, INSTANCE).await.unwrap().unwrap().score,
        70
    );
    // A new report replaces the old.
    store
        .put_readiness(&readiness(ORG, INSTANCE, T0 + 1, 90))
        .await
        .unwrap();
    assert_eq!(
        store.readiness(ORG, INSTANCE).await.unwrap().unwrap().score,
        90
    );
    let subjects = vec![INSTANCE.to_owned(), OTHER_INSTANCE.to_owned()];
    let scores = store.readiness_scores(ORG, &subjects).await.unwrap();
    assert_eq!(scores.len(), 1);
    let history = store
        .scores(ORG, INSTANCE, T0 - 30 * DAY, T0)
        .await
        .unwrap();
    assert_eq!(history, vec![(T0 - 10 * DAY, 80), (T0 - DAY, 80)]);
    store
        .put_score(ORG, INSTANCE, T0 - DAY, 55, "v2", 1)
        .await
        .unwrap();
    let latest = store.latest_scores(ORG, &subjects).await.unwrap();
    assert_eq!(latest.get(INSTANCE), Some(&(T0 - DAY, 55)));
    assert!(!latest.contains_key(OTHER_INSTANCE));
    assert!(
        store
            .scores(OTHER, INSTANCE, 0, i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.bundles(ORG).await.unwrap().len(), 2);
    assert_eq!(store.bundle_files().await.unwrap().len(), 4);
    let mut orgs = store.orgs().await.unwrap();
    orgs.sort();
    assert_eq!(orgs, vec![ORG.to_owned(), OTHER.to_owned()]);
}

async fn a_sweep_removes_exactly_what_it_counted_of_one_org(backend: Backend) {
    let (store, _guard) = backend.open().await;
    fill(&store).await;
    let cutoffs = Cutoffs {
        assessments: T0 - 30 * DAY,
        scores: T0 - 100 * DAY,
        bundles: T0 - 365 * DAY,
    };
    let (counted, files) = store.sweep_counts(ORG, &cutoffs).await.unwrap();
    assert_eq!(
        counted,
        Removed {
            assessments: 1,
            readiness: 0,
            scores: 1,
            bundles: 1,
            stripped: 0
        }
    );
    assert_eq!(files, vec![("eu".to_owned(), format!("b-old-{ORG}.zip"))]);
    apply(
        &store,
        ORG,
        Change::Sweep {
            org_id: ORG.into(),
            cutoffs,
        },
    )
    .await;
    let (after, _) = store.sweep_counts(ORG, &cutoffs).await.unwrap();
    assert_eq!(after, Removed::default());
    // The other org keeps everything.
    let (other, _) = store.sweep_counts(OTHER, &cutoffs).await.unwrap();
    assert_eq!(other, counted);
    assert_eq!(
        store
            .latest_assessment(ORG, INSTANCE)
            .await
            .unwrap()
            .unwrap()
            .upload_id,
        format!("new-{ORG}")
    );
}

async fn a_purge_is_applied_once_and_strips_or_deletes_what_it_names(backend: Backend) {
    let (store, _guard) = backend.open().await;
    fill(&store).await;
    let strip = PurgeSpec {
        purge_id: "p-1".into(),
        org_id: ORG.into(),
        subject: None,
        delete_scores: false,
        delete_uploads: false,
        strip_classes: vec![DataClass::Key as i32, DataClass::Name as i32],
    };
    let (counted, _) = store.purge_counts(&strip).await.unwrap();
    assert_eq!(counted.stripped, 3);
    apply(&store, ORG, Change::Purge(strip.clone())).await;
    assert!(store.purge_applied("p-1").await.unwrap());
    let body = store
        .latest_assessment(ORG, INSTANCE)
        .await
        .unwrap()
        .unwrap()
        .body;
    let entity = &pb::Assessment::decode(body.as_slice()).unwrap().entities[0];
    assert_eq!(
        (
            entity.id.as_str(),
            entity.key.as_str(),
            entity.name.as_str()
        ),
        ("10001", "", "")
    );
    let report = store
        .readiness(ORG, INSTANCE)
        .await
        .unwrap()
        .unwrap()
        .report;
    let report = pb::ReadinessReport::decode(report.as_slice()).unwrap();
    assert_eq!(report.blockers[0].entities[0].name, "");
    // The other org's records keep their names.
    let other = store
        .latest_assessment(OTHER, OTHER_INSTANCE)
        .await
        .unwrap()
        .unwrap()
        .body;
    assert_eq!(
        pb::Assessment::decode(other.as_slice()).unwrap().entities[0].name,
        "Operations"
    );
    // A purge is staged once: a second stager is refused.
    let again = staged(ORG, Change::Purge(strip));
    assert!(store.stage(&again).await.is_err());
    // Opt-out of one instance: everything of it goes, nothing of another subject.
    let out = PurgeSpec {
        purge_id: "p-2".into(),
        org_id: ORG.into(),
        subject: Some(INSTANCE.into()),
        delete_scores: true,
        delete_uploads: true,
        strip_classes: Vec::new(),
    };
    store
        .put_score(ORG, "server:ABC", T0, 40, "v1", 2)
        .await
        .unwrap();
    let (counted, files) = store.purge_counts(&out).await.unwrap();
    assert_eq!(
        (
            counted.assessments,
            counted.readiness,
            counted.scores,
            counted.bundles
        ),
        (2, 1, 3, 2)
    );
    assert_eq!(files.len(), 2);
    apply(&store, ORG, Change::Purge(out.clone())).await;
    assert_eq!(
        store.purge_counts(&out).await.unwrap().0,
        Removed::default()
    );
    assert_eq!(
        store
            .scores(ORG, "server:ABC", 0, i64::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.bundles(OTHER).await.unwrap().len(), 2);
}

async fn a_discarded_purge_can_be_staged_again_and_settled_changes_apply_once(backend: Backend) {
    let (store, _guard) = backend.open().await;
    fill(&store).await;
    let spec = PurgeSpec {
        purge_id: "p-9".into(),
        org_id: ORG.into(),
        subject: None,
        delete_scores: true,
        delete_uploads: false,
        strip_classes: Vec::new(),
    };
    let first = staged(ORG, Change::Purge(spec.clone()));
    store.stage(&first).await.unwrap();
    assert_eq!(store.staged(Some(ORG)).await.unwrap().len(), 1);
    assert!(store.staged(Some(OTHER)).await.unwrap().is_empty());
    store.discard(&first.change_id).await.unwrap();
    assert!(!store.purge_applied("p-9").await.unwrap());
    let second = staged(ORG, Change::Purge(spec));
    store.stage(&second).await.unwrap();
    store.apply(&second).await.unwrap();
    store.apply(&second).await.unwrap();
    assert!(store.staged(None).await.unwrap().is_empty());
    assert!(
        store
            .scores(ORG, INSTANCE, 0, i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .scores(OTHER, OTHER_INSTANCE, 0, i64::MAX)
            .await
            .unwrap()
            .len(),
        3
    );
}

async fn a_bundle_move_relabels_one_orgs_records_once(backend: Backend) {
    let (store, _guard) = backend.open().await;
    fill(&store).await;
    let relocate = || Change::MoveInPlace {
        move_id: "m-1".into(),
        org_id: ORG.into(),
        from: "eu".into(),
        to: "germany".into(),
    };
    let first = staged(ORG, relocate());
    store.stage(&first).await.unwrap();
    assert!(store.move_applied("m-1").await.unwrap());
    // A second pass cannot stage the same move while it is claimed ...
    assert!(store.stage(&staged(ORG, relocate())).await.is_err());
    // ... and may once the first was discarded.
    store.discard(&first.change_id).await.unwrap();
    assert!(!store.move_applied("m-1").await.unwrap());
    apply(&store, ORG, relocate()).await;
    assert!(store.move_applied("m-1").await.unwrap());
    assert!(
        store
            .bundles(ORG)
            .await
            .unwrap()
            .iter()
            .all(|b| b.location == "germany")
    );
    assert!(
        store
            .bundles(OTHER)
            .await
            .unwrap()
            .iter()
            .all(|b| b.location == "eu")
    );
}

async fn a_move_out_copies_one_orgs_part_to_another_store_and_deletes_it_here_once(
    backend: Backend,
) {
    let (from, _a) = backend.open().await;
    let (to, _b) = backend.open().await;
    fill(&from).await;
    let data = from.org_records(ORG, &Part::Data).await.unwrap();
    assert_eq!(
        (
            data.assessments.len(),
            data.readiness.len(),
            data.scores.len(),
            data.bundles.len()
        ),
        (2, 1, 3, 0)
    );
    assert!(data.assessments.iter().all(|a| a.org_id == ORG));
    // A copy started over takes nothing twice.
    to.import(&data).await.unwrap();
    to.import(&data).await.unwrap();
    assert_eq!(to.org_records(ORG, &Part::Data).await.unwrap(), data);
    let out = || Change::MoveOut {
        move_id: "m-data".into(),
        org_id: ORG.into(),
        part: Part::Data,
    };
    let first = staged(ORG, out());
    from.stage(&first).await.unwrap();
    assert!(from.move_applied("m-data").await.unwrap());
    assert!(from.stage(&staged(ORG, out())).await.is_err());
    from.apply(&first).await.unwrap();
    assert_eq!(
        from.org_records(ORG, &Part::Data).await.unwrap(),
        OrgRecords::default()
    );
    // The other org's data and the org's bundles stay.
    assert_eq!(
        from.org_records(OTHER, &Part::Data)
            .await
            .unwrap()
            .scores
            .len(),
        3
    );
    let bundles = Part::Bundles {
        location: "eu".into(),
    };
    assert_eq!(
        from.org_records(ORG, &bundles).await.unwrap().bundles.len(),
        2
    );
    apply(
        &from,
        ORG,
        Change::MoveOut {
            move_id: "m-bundles".into(),
            org_id: ORG.into(),
            part: bundles.clone(),
        },
    )
    .await;
    assert!(from.bundles(ORG).await.unwrap().is_empty());
    assert_eq!(from.bundles(OTHER).await.unwrap().len(), 2);
    assert_eq!(from.orgs().await.unwrap(), vec![OTHER.to_owned()]);
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

suite!(
    records_are_read_back_per_org_and_subject,
    a_sweep_removes_exactly_what_it_counted_of_one_org,
    a_purge_is_applied_once_and_strips_or_deletes_what_it_names,
    a_discarded_purge_can_be_staged_again_and_settled_changes_apply_once,
    a_bundle_move_relabels_one_orgs_records_once,
    a_move_out_copies_one_orgs_part_to_another_store_and_deletes_it_here_once,
);
