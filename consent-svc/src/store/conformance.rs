//! The consent store suite: written once, run against SQLite and PostgreSQL.

use sightline_runtime::audited::{AuditEntry, StagedChange};
use sightline_runtime::storage;

use super::*;

fn staged(change: Change, purge: Option<PurgeRecord>) -> StagedChange {
    let org_id = change.org_id().to_owned();
    StagedChange {
        change_id: uuid::Uuid::now_v7().to_string(),
        org_id: org_id.clone(),
        entry: AuditEntry {
            org_id,
            actor: "operator".into(),
            action: "test.changed".into(),
            target: "t".into(),
            attributes: Default::default(),
        },
        payload: StagedPayload {
            change,
            purge,
            base_revision: None,
        }
        .encode(),
        staged_at_ms: 1,
    }
}

/// Stages and applies a change, as the protocol does once its audit entry is in the log; returns
/// the org's policy revision after it.
async fn commit(
    store: &Arc<dyn ConsentStore>,
    change: Change,
    purge: Option<PurgeRecord>,
) -> Result<i64, ChangeLogError> {
    let change = staged(change, purge);
    store.stage(&change).await?;
    let applied = store.apply(&change).await;
    if applied.is_err() {
        store.discard(&change.change_id).await?;
    }
    applied?;
    Ok(store
        .policy_state(&change.org_id)
        .await
        .unwrap()
        .map_or(0, |s| s.revision))
}

async fn sqlite() -> (Arc<dyn ConsentStore>, tempfile::TempDir) {
    let dir = sightline_runtime::testing::private_tempdir().unwrap();
    (
        open(&storage::default_sqlite_url(dir.path(), "consent"))
            .await
            .unwrap(),
        dir,
    )
}

async fn postgres() -> (Arc<dyn ConsentStore>, ()) {
    let url = sightline_runtime::testing::fresh_postgres_url()
        .await
        .unwrap();
    let db = storage::connect(&url, MIGRATIONS).await.unwrap();
    let store: Arc<dyn ConsentStore> = Arc::new(SqlStore::new(db).await.unwrap());
    (store, ())
}

const ORG: &str = "0190a000-0000-7000-8000-000000000001";
const OTHER: &str = "0190a000-0000-7000-8000-000000000002";

fn version(org: &str, v: i64, usage: &str) -> ConsentRecord {
    ConsentRecord {
        org_id: org.into(),
        version: v,
        usage_level: usage.into(),
        sharing_level: "BASIC".into(),
        contribute_metadata: false,
        contribute_in_app_data: false,
        compliance_restricted: false,
        actor: "admin:t".into(),
        reason: "test".into(),
        created_at: 1_000 + v,
        receipt_payload: format!("payload {v}").into_bytes(),
        receipt_signature: vec![7; 64],
        key_id: "k".into(),
        request_key: None,
    }
}

async fn versions_append_list_newest_first_and_never_collide(store: Arc<dyn ConsentStore>) {
    for (v, usage) in [(1, "BASIC"), (2, "ADVANCED"), (3, "DISABLED")] {
        let revision = commit(&store, Change::Consent(version(ORG, v, usage)), None)
            .await
            .unwrap();
        assert_eq!(revision, v);
    }
    commit(&store, Change::Consent(version(OTHER, 1, "BASIC")), None)
        .await
        .unwrap();
    let again = commit(&store, Change::Consent(version(ORG, 3, "BASIC")), None)
        .await
        .unwrap_err();
    assert!(matches!(again, ChangeLogError::Refused(_)), "{again:?}");
    assert_eq!(
        store
            .latest_consent(ORG)
            .await
            .unwrap()
            .unwrap()
            .usage_level,
        "DISABLED"
    );
    let page = store.list_consent(ORG, None, 2).await.unwrap();
    assert_eq!(page.iter().map(|v| v.version).collect::<Vec<_>>(), [3, 2]);
    let rest = store.list_consent(ORG, Some(2), 2).await.unwrap();
    assert_eq!(rest.iter().map(|v| v.version).collect::<Vec<_>>(), [1]);
    assert_eq!(
        store.consent_version(ORG, 2).await.unwrap().unwrap(),
        version(ORG, 2, "ADVANCED")
    );
}

async fn a_staged_change_has_no_effect_until_applied_and_applies_once(
    store: Arc<dyn ConsentStore>,
) {
    commit(&store, Change::Consent(version(ORG, 1, "BASIC")), None)
        .await
        .unwrap();
    // Staged, not applied: nothing a reader sees changes.
    let pending = staged(Change::Consent(version(ORG, 2, "ADVANCED")), None);
    store.stage(&pending).await.unwrap();
    assert_eq!(store.latest_consent(ORG).await.unwrap().unwrap().version, 1);
    assert_eq!(store.policy_state(ORG).await.unwrap().unwrap().revision, 1);
    assert_eq!(
        store.staged(Some(ORG)).await.unwrap(),
        std::slice::from_ref(&pending)
    );
    assert!(store.staged(Some(OTHER)).await.unwrap().is_empty());
    // Discarded: gone, and a late apply of it does nothing.
    store.discard(&pending.change_id).await.unwrap();
    store.apply(&pending).await.unwrap();
    assert!(store.staged(None).await.unwrap().is_empty());
    assert_eq!(store.latest_consent(ORG).await.unwrap().unwrap().version, 1);
    // Applied twice (two settlers): applied once.
    let next = staged(Change::Consent(version(ORG, 2, "ADVANCED")), None);
    store.stage(&next).await.unwrap();
    store.apply(&next).await.unwrap();
    store.apply(&next).await.unwrap();
    assert_eq!(store.latest_consent(ORG).await.unwrap().unwrap().version, 2);
    assert_eq!(store.policy_state(ORG).await.unwrap().unwrap().revision, 2);
    assert!(store.staged(None).await.unwrap().is_empty());
}

fn purge(id: &str, scope: &str, instance_id: &str, before_version: i64) -> PurgeRecord {
    PurgeRecord {
        purge_id: id.into(),
        org_id: ORG.into(),
        scope: scope.into(),
        instance_id: instance_id.into(),
        delete_kinds: "3,4".into(),
        strip_classes: "6,7".into(),
        withdraw_metadata: false,
        withdraw_in_app_data: true,
        before_consent_version: before_version,
        before_revision: 0,
        issued_at: 9,
    }
}

async fn purges_carry_the_revision_of_their_change_and_roll_back_with_it(
    store: Arc<dyn ConsentStore>,
) {
    commit(&store, Change::Consent(version(ORG, 1, "ADVANCED")), None)
        .await
        .unwrap();
    let revision = commit(
        &store,
        Change::Consent(version(ORG, 2, "BASIC")),
        Some(purge("p-org", "ORG", "", 2)),
    )
    .await
    .unwrap();
    assert_eq!(revision, 2);
    // A change that is discarded stores no purge.
    let lost = staged(
        Change::Consent(version(ORG, 3, "DISABLED")),
        Some(purge("p-lost", "ORG", "", 3)),
    );
    store.stage(&lost).await.unwrap();
    store.discard(&lost.change_id).await.unwrap();
    commit(
        &store,
        Change::Override {
            org_id: ORG.into(),
            instance_id: "i1".into(),
            record: None,
        },
        Some(purge("p-inst", "INSTANCE", "i1", 3)),
    )
    .await
    .unwrap();
    // Raising again issues nothing; the purges stay, newest first.
    commit(&store, Change::Consent(version(ORG, 3, "ADVANCED")), None)
        .await
        .unwrap();
    let purges = store.purges(ORG).await.unwrap();
    let ids: Vec<&str> = purges.iter().map(|p| p.purge_id.as_str()).collect();
    assert_eq!(ids, ["p-inst", "p-org"]);
    assert_eq!(
        (purges[1].before_revision, purges[0].before_revision),
        (2, 3)
    );
    assert_eq!(purges[0].instance_id, "i1");
    assert_eq!(purges[1].delete_kinds, "3,4");
    assert!(purges[1].withdraw_in_app_data && !purges[1].withdraw_metadata);
    assert_eq!(store.policy_state(ORG).await.unwrap().unwrap().revision, 4);
    assert!(store.purges(OTHER).await.unwrap().is_empty());
    assert_eq!(store.orgs().await.unwrap(), [ORG]);
}

async fn overrides_tracking_and_retention_upsert_per_org(store: Arc<dyn ConsentStore>) {
    let o = OverrideRecord {
        org_id: ORG.into(),
        instance_id: "i1".into(),
        usage_level: "BASIC".into(),
        sharing_level: "BASIC".into(),
        reason: "r".into(),
        updated_at: 1,
    };
    let set = |record: Option<OverrideRecord>| Change::Override {
        org_id: ORG.into(),
        instance_id: "i1".into(),
        record,
    };
    commit(&store, set(Some(o.clone())), None).await.unwrap();
    let lowered = OverrideRecord {
        usage_level: "DISABLED".into(),
        ..o.clone()
    };
    commit(&store, set(Some(lowered.clone())), None)
        .await
        .unwrap();
    assert_eq!(store.overrides(ORG).await.unwrap(), [lowered]);
    assert!(store.overrides(OTHER).await.unwrap().is_empty());
    commit(&store, set(None), None).await.unwrap();
    assert!(store.overrides(ORG).await.unwrap().is_empty());

    let tracking = TrackingRecord {
        org_id: ORG.into(),
        enabled_channels: "1,2".into(),
        exclude_anonymous: true,
        excluded_groups: "[\"bots\"]".into(),
        blocking_time_ms: 60_000,
        view_counter_enabled: false,
        global_report_group: "analysts".into(),
        updated_at: 5,
    };
    commit(&store, Change::Tracking(tracking.clone()), None)
        .await
        .unwrap();
    let changed = TrackingRecord {
        blocking_time_ms: 0,
        ..tracking
    };
    commit(&store, Change::Tracking(changed.clone()), None)
        .await
        .unwrap();
    assert_eq!(store.tracking(ORG).await.unwrap(), Some(changed));
    assert_eq!(store.tracking(OTHER).await.unwrap(), None);

    let retention = RetentionRecord {
        org_id: ORG.into(),
        raw_days: 30,
        assessment_days: 60,
        aggregate_days: 2_555,
        updated_at: 6,
        score_history_days: 400,
        support_bundle_days: 90,
        event_id_days: 14,
    };
    commit(&store, Change::Retention(retention.clone()), None)
        .await
        .unwrap();
    assert_eq!(store.retention(ORG).await.unwrap(), Some(retention));
}

async fn residency_moves_advance_only_from_their_expected_state(store: Arc<dyn ConsentStore>) {
    let requested = MoveRecord {
        move_id: "m1".into(),
        org_id: ORG.into(),
        scope: "DATA".into(),
        from_location: "GLOBAL".into(),
        to_location: "EU".into(),
        state: "REQUESTED".into(),
        requested_at: 1,
        started_at: None,
        completed_at: None,
        reported_by: String::new(),
    };
    let new = |record: MoveRecord| Change::Move {
        record,
        expected: None,
        residency: None,
    };
    commit(&store, new(requested.clone()), None).await.unwrap();
    let second = commit(
        &store,
        new(MoveRecord {
            move_id: "m2".into(),
            ..requested.clone()
        }),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(second, ChangeLogError::Refused(_)),
        "one open move per scope"
    );
    let bundles = MoveRecord {
        move_id: "m3".into(),
        scope: "SUPPORT_BUNDLES".into(),
        ..requested.clone()
    };
    commit(&store, new(bundles), None).await.unwrap();

    let moving = MoveRecord {
        state: "MOVING".into(),
        started_at: Some(2),
        ..requested.clone()
    };
    let advance = |record: MoveRecord, from: &str, residency| Change::Move {
        record,
        expected: Some(MoveFrom {
            state: from.into(),
            reported_by: String::new(),
        }),
        residency,
    };
    let wrong = commit(&store, advance(moving.clone(), "MOVING", None), None)
        .await
        .unwrap_err();
    assert!(matches!(wrong, ChangeLogError::Refused(_)));
    commit(&store, advance(moving.clone(), "REQUESTED", None), None)
        .await
        .unwrap();
    // One owner reports its part: the move stays MOVING and remembers who reported; a report made
    // from a stale view of the reporters (a concurrent report) is refused.
    let reported = MoveRecord {
        reported_by: "collector".into(),
        ..moving.clone()
    };
    commit(&store, advance(reported.clone(), "MOVING", None), None)
        .await
        .unwrap();
    let stale = commit(&store, advance(reported.clone(), "MOVING", None), None)
        .await
        .unwrap_err();
    assert!(matches!(stale, ChangeLogError::Refused(_)));
    assert!(store.residency(ORG).await.unwrap().1.contains(&reported));
    let done = MoveRecord {
        state: "DONE".into(),
        completed_at: Some(3),
        reported_by: "collector,insights".into(),
        ..moving
    };

    let residency = ResidencyRecord {
        org_id: ORG.into(),
        location: "EU".into(),
        support_bundle_location: "GLOBAL".into(),
        updated_at: 3,
    };
    commit(
        &store,
        Change::Move {
            record: done.clone(),
            expected: Some(MoveFrom {
                state: "MOVING".into(),
                reported_by: "collector".into(),
            }),
            residency: Some(residency.clone()),
        },
        None,
    )
    .await
    .unwrap();
    let (stored, moves) = store.residency(ORG).await.unwrap();
    assert_eq!(stored, Some(residency));
    assert_eq!(moves.len(), 2);
    assert!(moves.contains(&done));
    assert!(store.residency(OTHER).await.unwrap().1.is_empty());
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let (store, _dir) = super::sqlite().await;
                    super::$test(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let (store, _guard) = super::postgres().await;
                    super::$test(store).await;
                }
            )*
        }
    };
}

conformance!(
    versions_append_list_newest_first_and_never_collide,
    a_staged_change_has_no_effect_until_applied_and_applies_once,
    purges_carry_the_revision_of_their_change_and_roll_back_with_it,
    overrides_tracking_and_retention_upsert_per_org,
    residency_moves_advance_only_from_their_expected_state,
);
