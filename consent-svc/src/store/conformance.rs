//! The consent store suite: written once, run against SQLite and PostgreSQL.

use std::sync::Mutex;

use sightline_runtime::storage::{self, Database};

use super::*;

/// Records entries, or refuses them all when `fail` is set.
#[derive(Debug, Default)]
struct Sink {
    fail: bool,
    entries: Mutex<Vec<AuditEntry>>,
}

#[async_trait]
impl AuditSink for Sink {
    async fn append(&self, entry: &AuditEntry) -> Result<(), AuditFailure> {
        if self.fail {
            return Err(AuditFailure::Unavailable("linker down".into()));
        }
        self.entries.lock().unwrap().push(entry.clone());
        Ok(())
    }
}

async fn sqlite() -> (Arc<dyn ConsentStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
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
    let store: Arc<dyn ConsentStore> = match db {
        Database::Postgres(pool) => Arc::new(PgStore::new(pool)),
        Database::Sqlite(pool) => Arc::new(SqliteStore::new(pool)),
    };
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
    }
}

fn entry(org: &str) -> AuditEntry {
    AuditEntry {
        org_id: org.into(),
        actor: "admin:t".into(),
        action: "consent.updated",
        target: "x".into(),
        attributes: BTreeMap::new(),
    }
}

async fn versions_append_list_newest_first_and_never_collide(store: Arc<dyn ConsentStore>) {
    let sink = Sink::default();
    for (v, usage) in [(1, "BASIC"), (2, "ADVANCED"), (3, "DISABLED")] {
        let revision = store
            .apply(
                Change::Consent(version(ORG, v, usage)),
                None,
                &sink,
                &entry(ORG),
            )
            .await
            .unwrap();
        assert_eq!(revision, v);
    }
    store
        .apply(
            Change::Consent(version(OTHER, 1, "BASIC")),
            None,
            &sink,
            &entry(OTHER),
        )
        .await
        .unwrap();
    let again = store
        .apply(
            Change::Consent(version(ORG, 3, "BASIC")),
            None,
            &sink,
            &entry(ORG),
        )
        .await
        .unwrap_err();
    assert!(matches!(again, StoreError::Conflict(_)), "{again:?}");
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
    assert_eq!(sink.entries.lock().unwrap().len(), 4);
}

async fn a_change_whose_audit_entry_fails_changes_nothing(store: Arc<dyn ConsentStore>) {
    let ok = Sink::default();
    store
        .apply(
            Change::Consent(version(ORG, 1, "BASIC")),
            None,
            &ok,
            &entry(ORG),
        )
        .await
        .unwrap();
    let down = Sink {
        fail: true,
        ..Sink::default()
    };
    let failed = store
        .apply(
            Change::Consent(version(ORG, 2, "ADVANCED")),
            None,
            &down,
            &entry(ORG),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        failed,
        StoreError::Audit(AuditFailure::Unavailable(_))
    ));
    assert_eq!(store.latest_consent(ORG).await.unwrap().unwrap().version, 1);
    assert_eq!(store.policy_state(ORG).await.unwrap().unwrap().revision, 1);
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
    let sink = Sink::default();
    store
        .apply(
            Change::Consent(version(ORG, 1, "ADVANCED")),
            None,
            &sink,
            &entry(ORG),
        )
        .await
        .unwrap();
    let revision = store
        .apply(
            Change::Consent(version(ORG, 2, "BASIC")),
            Some(purge("p-org", "ORG", "", 2)),
            &sink,
            &entry(ORG),
        )
        .await
        .unwrap();
    assert_eq!(revision, 2);
    // A failed change stores no purge.
    let down = Sink {
        fail: true,
        ..Sink::default()
    };
    store
        .apply(
            Change::Consent(version(ORG, 3, "DISABLED")),
            Some(purge("p-lost", "ORG", "", 3)),
            &down,
            &entry(ORG),
        )
        .await
        .unwrap_err();
    store
        .apply(
            Change::Override {
                org_id: ORG.into(),
                instance_id: "i1".into(),
                record: None,
            },
            Some(purge("p-inst", "INSTANCE", "i1", 3)),
            &sink,
            &entry(ORG),
        )
        .await
        .unwrap();
    // Raising again issues nothing; the purges stay, newest first.
    store
        .apply(
            Change::Consent(version(ORG, 3, "ADVANCED")),
            None,
            &sink,
            &entry(ORG),
        )
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
    let sink = Sink::default();
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
    store
        .apply(set(Some(o.clone())), None, &sink, &entry(ORG))
        .await
        .unwrap();
    let lowered = OverrideRecord {
        usage_level: "DISABLED".into(),
        ..o.clone()
    };
    store
        .apply(set(Some(lowered.clone())), None, &sink, &entry(ORG))
        .await
        .unwrap();
    assert_eq!(store.override_of(ORG, "i1").await.unwrap(), Some(lowered));
    assert_eq!(store.override_of(OTHER, "i1").await.unwrap(), None);
    store
        .apply(set(None), None, &sink, &entry(ORG))
        .await
        .unwrap();
    assert_eq!(store.override_of(ORG, "i1").await.unwrap(), None);

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
    store
        .apply(Change::Tracking(tracking.clone()), None, &sink, &entry(ORG))
        .await
        .unwrap();
    let changed = TrackingRecord {
        blocking_time_ms: 0,
        ..tracking
    };
    store
        .apply(Change::Tracking(changed.clone()), None, &sink, &entry(ORG))
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
    store
        .apply(
            Change::Retention(retention.clone()),
            None,
            &sink,
            &entry(ORG),
        )
        .await
        .unwrap();
    assert_eq!(store.retention(ORG).await.unwrap(), Some(retention));
}

async fn residency_moves_advance_only_from_their_expected_state(store: Arc<dyn ConsentStore>) {
    let sink = Sink::default();
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
    };
    let new = |record: MoveRecord| Change::Move {
        record,
        expected_state: None,
        residency: None,
    };
    store
        .apply(new(requested.clone()), None, &sink, &entry(ORG))
        .await
        .unwrap();
    let second = store
        .apply(
            new(MoveRecord {
                move_id: "m2".into(),
                ..requested.clone()
            }),
            None,
            &sink,
            &entry(ORG),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(second, StoreError::Conflict(_)),
        "one open move per scope"
    );
    let bundles = MoveRecord {
        move_id: "m3".into(),
        scope: "SUPPORT_BUNDLES".into(),
        ..requested.clone()
    };
    store
        .apply(new(bundles), None, &sink, &entry(ORG))
        .await
        .unwrap();

    let moving = MoveRecord {
        state: "MOVING".into(),
        started_at: Some(2),
        ..requested.clone()
    };
    let advance = |record: MoveRecord, from: &str, residency| Change::Move {
        record,
        expected_state: Some(from.into()),
        residency,
    };
    let wrong = store
        .apply(
            advance(moving.clone(), "MOVING", None),
            None,
            &sink,
            &entry(ORG),
        )
        .await
        .unwrap_err();
    assert!(matches!(wrong, StoreError::Conflict(_)));
    store
        .apply(
            advance(moving.clone(), "REQUESTED", None),
            None,
            &sink,
            &entry(ORG),
        )
        .await
        .unwrap();
    let done = MoveRecord {
        state: "DONE".into(),
        completed_at: Some(3),
        ..moving
    };
    let residency = ResidencyRecord {
        org_id: ORG.into(),
        location: "EU".into(),
        support_bundle_location: "GLOBAL".into(),
        updated_at: 3,
    };
    store
        .apply(
            advance(done.clone(), "MOVING", Some(residency.clone())),
            None,
            &sink,
            &entry(ORG),
        )
        .await
        .unwrap();
    assert_eq!(store.residency(ORG).await.unwrap(), Some(residency));
    let moves = store.moves(ORG).await.unwrap();
    assert_eq!(moves.len(), 2);
    assert!(moves.contains(&done));
    assert!(store.moves(OTHER).await.unwrap().is_empty());
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
    a_change_whose_audit_entry_fails_changes_nothing,
    purges_carry_the_revision_of_their_change_and_roll_back_with_it,
    overrides_tracking_and_retention_upsert_per_org,
    residency_moves_advance_only_from_their_expected_state,
);
