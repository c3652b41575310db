//! The collector store suite: written once, run against SQLite and PostgreSQL.

use std::collections::BTreeMap;

use prost::Message;
use sightline_proto::collector::v1 as pb;
use sightline_runtime::audited::{AuditEntry, StagedChange};

use super::*;

const ORG: &str = "0190a000-0000-7000-8000-000000000001";
const OTHER: &str = "0190a000-0000-7000-8000-000000000002";
const INSTANCE: &str = "0190a000-0000-7000-8000-0000000000a1";
const OTHER_INSTANCE: &str = "0190a000-0000-7000-8000-0000000000b1";
const DAY: i64 = 86_400_000;
const T0: i64 = 20_000 * DAY;

/// The backend a test of the suite runs on, and the stores it opens there.
use sightline_runtime::testing::{Backend, Guard};

trait Stores {
    /// A fresh store holding GLOBAL's data.
    async fn open(self) -> (Arc<dyn CollectorStore>, Guard);
    /// A second store in a database of its own, holding `location`.
    async fn elsewhere(self, location: &str) -> (Arc<dyn CollectorStore>, Guard);
    /// Two locations' stores (GLOBAL, EU) on one database.
    async fn shared(self) -> (Arc<dyn CollectorStore>, Arc<dyn CollectorStore>, Guard);
}

impl Stores for Backend {
    async fn open(self) -> (Arc<dyn CollectorStore>, Guard) {
        self.elsewhere("global").await
    }

    async fn elsewhere(self, location: &str) -> (Arc<dyn CollectorStore>, Guard) {
        let (url, guard) = self.fresh_url("collector").await.unwrap();
        (open(&url, location).await.unwrap(), guard)
    }

    async fn shared(self) -> (Arc<dyn CollectorStore>, Arc<dyn CollectorStore>, Guard) {
        let (url, guard) = self.fresh_url("collector").await.unwrap();
        let global = open(&url, "global").await.unwrap();
        (global, open(&url, "eu").await.unwrap(), guard)
    }
}

fn metric_body(name: &str, value: f64, tag: &str) -> Vec<u8> {
    pb::Event {
        event_id: String::new(),
        occurred_at: None,
        payload: Some(pb::event::Payload::Metric(pb::MetricEvent {
            name: name.into(),
            value,
            unit: "ms".into(),
            periodic_sample: true,
            tags: [("pluginKey".to_owned(), tag.to_owned())]
                .into_iter()
                .collect(),
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

fn metric(id: &str, at: i64, value: f64) -> Row {
    Row {
        event_id: id.into(),
        kind: 2,
        occurred_at: at,
        name: "latency".into(),
        value: Some(value),
        subject: None,
        body: metric_body("latency", value, "a"),
        view: None,
    }
}

fn view(id: &str, at: i64, page: &str, space: &str, viewer: Option<&str>) -> Row {
    let body = pb::Event {
        event_id: id.into(),
        occurred_at: None,
        payload: Some(pb::event::Payload::PageView(pb::PageViewEvent {
            page_id: page.into(),
            space_id: space.into(),
            page_title: "Quarterly plan".into(),
            channel: 1,
            ..Default::default()
        })),
    }
    .encode_to_vec();
    Row {
        event_id: id.into(),
        kind: 4,
        occurred_at: at,
        name: page.into(),
        value: Some(1.0),
        subject: viewer.map(str::to_owned),
        body,
        view: Some(View {
            page_id: page.into(),
            space_id: space.into(),
            channel: 1,
            viewer: viewer.map(str::to_owned),
        }),
    }
}

fn batch(org: &str, instance: &str, revision: i64, rows: Vec<Row>) -> Batch {
    Batch {
        org_id: org.into(),
        instance_id: instance.into(),
        location: "global".into(),
        consent_version: revision,
        policy_revision: revision,
        stored_at: T0,
        blocking_time_ms: 30 * 60_000,
        rows,
    }
}

fn revision_is(revision: u64) -> impl Fn(&str, &str) -> Option<u64> + Send + Sync {
    move |_: &str, _: &str| Some(revision)
}

async fn commit_one(store: &Arc<dyn CollectorStore>, b: Batch) -> Vec<RowOutcome> {
    let revision = u64::try_from(b.policy_revision).unwrap();
    match store
        .commit(&[b], &revision_is(revision))
        .await
        .unwrap()
        .remove(0)
    {
        BatchOutcome::Committed(rows) => rows,
        BatchOutcome::Stale => panic!("stale"),
    }
}

fn staged(org: &str, change: Change) -> StagedChange {
    StagedChange {
        change_id: uuid::Uuid::now_v7().to_string(),
        org_id: org.into(),
        entry: AuditEntry {
            org_id: org.into(),
            actor: "service:collector".into(),
            action: "test".into(),
            target: "t".into(),
            attributes: Default::default(),
        },
        payload: change.encode(),
        staged_at_ms: T0,
    }
}

async fn apply(store: &Arc<dyn CollectorStore>, org: &str, change: Change) {
    let change = staged(org, change);
    store.stage(&change).await.unwrap();
    store.apply(&change).await.unwrap();
    assert!(store.staged(Some(org)).await.unwrap().is_empty());
}

/// A purge of ORG's page views stored before consent version and policy revision 2.
fn page_views_purge(purge_id: &str) -> Change {
    Change::Purge {
        spec: PurgeSpec {
            purge_id: purge_id.into(),
            org_id: ORG.into(),
            instance_id: None,
            delete_kinds: vec![4],
            strip_classes: vec![],
            before_consent_version: 2,
            before_revision: 2,
        },
    }
}

/// An org with data in every moved table: samples with a rollup left to make and one made, page
/// views with viewers and blocking memory, a tombstone and an applied purge; and another org's.
async fn fill_for_move(store: &Arc<dyn CollectorStore>) {
    commit_one(
        store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![view("gone", T0, "p3", "s2", Some("carol"))],
        ),
    )
    .await;
    apply(store, ORG, page_views_purge("purge-before-move")).await;
    commit_one(
        store,
        batch(
            ORG,
            INSTANCE,
            2,
            vec![
                metric("m1", T0 + 1, 10.0),
                metric("m2", T0 + 3_600_000, 20.0),
                view("v1", T0, "p1", "s1", Some("alice")),
                view("v2", T0 + DAY, "p1", "s1", Some("bob")),
                view("v3", T0 + DAY, "p2", "s1", None),
            ],
        ),
    )
    .await;
    for (org, instance, hour) in store.take_dirty_hours(T0 + 1, 10, &[]).await.unwrap() {
        let samples = store.hour_samples(&instance, hour).await.unwrap();
        let rollups = crate::maintenance::roll_up(&org, &instance, hour, &samples);
        store
            .replace_rollups(&org, &instance, hour, &rollups)
            .await
            .unwrap();
    }
    crate::maintenance::remake_view_days(store.as_ref(), &[])
        .await
        .unwrap();
    commit_one(
        store,
        batch(
            OTHER,
            OTHER_INSTANCE,
            1,
            vec![view("o1", T0, "p9", "s9", Some("zed"))],
        ),
    )
    .await;
}

/// What an org's reports and reads show, to compare before and after a move.
async fn org_picture(store: &Arc<dyn CollectorStore>) -> (ViewTotals, (i64, i64), usize, usize) {
    let org = ViewScope::Org {
        org_id: ORG.into(),
        instance_id: None,
    };
    (
        store.view_totals(&org, 0, i64::MAX / DAY).await.unwrap(),
        store.view_count(INSTANCE, "p1").await.unwrap(),
        store
            .samples(INSTANCE, "latency", 0, i64::MAX, None, 100)
            .await
            .unwrap()
            .len(),
        store
            .rollups(INSTANCE, "latency", 0, i64::MAX, None, 100)
            .await
            .unwrap()
            .len(),
    )
}

fn move_spec(in_place: bool) -> MoveSpec {
    MoveSpec {
        move_id: "move-1".into(),
        org_id: ORG.into(),
        from_location: "global".into(),
        to_location: "eu".into(),
        in_place,
    }
}

async fn events_are_stored_once_per_instance_and_event_id(backend: Backend) {
    let (store, _guard) = backend.open().await;
    let first = commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![metric("a", T0, 1.0), metric("b", T0, 2.0)],
        ),
    )
    .await;
    assert_eq!(first, vec![RowOutcome::Stored, RowOutcome::Stored]);
    let again = commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![metric("b", T0, 2.0), metric("c", T0, 3.0)],
        ),
    )
    .await;
    assert_eq!(again, vec![RowOutcome::Duplicate, RowOutcome::Stored]);
    // Another instance has its own ids.
    let other = commit_one(
        &store,
        batch(ORG, OTHER_INSTANCE, 1, vec![metric("a", T0, 1.0)]),
    )
    .await;
    assert_eq!(other, vec![RowOutcome::Stored]);
    // An event is keyed by its id and its time (a retry resends both; PostgreSQL partitions
    // events by day, and a partition key is part of the table's key): the same id at another
    // time is another event, on both backends, beside a true repeat in the same batch.
    let later = commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![metric("a", T0 + DAY, 1.0), metric("b", T0, 2.0)],
        ),
    )
    .await;
    assert_eq!(later, vec![RowOutcome::Stored, RowOutcome::Duplicate]);
    // Two batches of one group commit with the same id: the second is the duplicate.
    let group = store
        .commit(
            &[
                batch(ORG, INSTANCE, 1, vec![metric("d", T0, 1.0)]),
                batch(ORG, INSTANCE, 1, vec![metric("d", T0, 1.0)]),
            ],
            &revision_is(1),
        )
        .await
        .unwrap();
    assert_eq!(
        group,
        vec![
            BatchOutcome::Committed(vec![RowOutcome::Stored]),
            BatchOutcome::Committed(vec![RowOutcome::Duplicate])
        ]
    );
    let samples = store
        .samples(INSTANCE, "latency", 0, i64::MAX, None, 100)
        .await
        .unwrap();
    assert_eq!(samples.len(), 5);
}

/// A repeated id deep in a group of large batches: SQLite's fast path gives the whole
/// commit up and makes it again carefully; what the first try did (a page view counted,
/// rows stored) must not count twice.
async fn a_repeated_id_in_a_large_group_is_found_and_nothing_counts_twice(backend: Backend) {
    let (store, _guard) = backend.open().await;
    let earlier = commit_one(
        &store,
        batch(ORG, INSTANCE, 1, vec![metric("old-7", T0, 1.0)]),
    )
    .await;
    assert_eq!(earlier, vec![RowOutcome::Stored]);
    let mut first = vec![view("v-1", T0, "p1", "s1", Some("psn_a"))];
    first.extend((0..450).map(|i| metric(&format!("a-{i}"), T0, 1.0)));
    // New ids, then (past the first insert statement) one stored earlier and one of
    // the first batch of this same group.
    let mut second: Vec<Row> = (0..420)
        .map(|i| metric(&format!("b-{i}"), T0, 2.0))
        .collect();
    second.push(metric("old-7", T0, 1.0));
    second.push(metric("a-300", T0, 1.0));
    second.push(view("v-2", T0 + 1, "p1", "s1", Some("psn_b")));
    let group = store
        .commit(
            &[
                batch(ORG, INSTANCE, 1, first),
                batch(ORG, INSTANCE, 1, second),
            ],
            &revision_is(1),
        )
        .await
        .unwrap();
    let BatchOutcome::Committed(first) = &group[0] else {
        panic!("stale")
    };
    assert!(first.iter().all(|o| *o == RowOutcome::Stored));
    let BatchOutcome::Committed(second) = &group[1] else {
        panic!("stale")
    };
    assert!(second[..420].iter().all(|o| *o == RowOutcome::Stored));
    assert_eq!(
        second[420..],
        [
            RowOutcome::Duplicate,
            RowOutcome::Duplicate,
            RowOutcome::Stored
        ]
    );
    assert_eq!(store.view_count(INSTANCE, "p1").await.unwrap(), (2, 2));
    let samples = store
        .samples(INSTANCE, "latency", 0, i64::MAX, None, 2_000)
        .await
        .unwrap();
    assert_eq!(samples.len(), 1 + 450 + 420);
}

async fn a_batch_enforced_under_an_old_revision_stores_nothing(backend: Backend) {
    let (store, _guard) = backend.open().await;
    let outcome = store
        .commit(
            &[batch(ORG, INSTANCE, 1, vec![metric("a", T0, 1.0)])],
            &revision_is(2),
        )
        .await
        .unwrap();
    assert_eq!(outcome, vec![BatchOutcome::Stale]);
    assert!(
        store
            .samples(INSTANCE, "latency", 0, i64::MAX, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_store_refuses_another_locations_records(backend: Backend) {
    let (store, _guard) = backend.open().await;
    let mut b = batch(ORG, INSTANCE, 1, vec![metric("a", T0, 1.0)]);
    b.location = "eu".into();
    let refused = store.commit(&[b], &revision_is(1)).await.unwrap_err();
    assert!(matches!(refused, StoreError::WrongLocation { .. }));
    assert!(
        store
            .samples(INSTANCE, "latency", 0, i64::MAX, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn views_count_once_per_viewer_inside_the_blocking_time(backend: Backend) {
    let (store, _guard) = backend.open().await;
    let rows = vec![
        view("v1", T0, "p1", "s1", Some("alice")),
        view("v2", T0 + 60_000, "p1", "s1", Some("alice")),
        view("v3", T0 + 31 * 60_000, "p1", "s1", Some("alice")),
        view("v4", T0, "p1", "s1", Some("bob")),
        view("v5", T0, "p2", "s1", Some("alice")),
        view("v6", T0, "p1", "s1", None),
    ];
    let outcomes = commit_one(&store, batch(ORG, INSTANCE, 1, rows)).await;
    assert_eq!(
        outcomes,
        vec![
            RowOutcome::Stored,
            RowOutcome::Blocked,
            RowOutcome::Stored,
            RowOutcome::Stored,
            RowOutcome::Stored,
            RowOutcome::Stored
        ]
    );
    assert_eq!(store.view_count(INSTANCE, "p1").await.unwrap(), (4, 2));
    assert_eq!(store.view_count(INSTANCE, "p2").await.unwrap(), (1, 1));
    // Unique viewers across days are distinct viewers, not a sum of days.
    commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![view("v7", T0 + DAY, "p1", "s1", Some("alice"))],
        ),
    )
    .await;
    let day = T0 / DAY;
    let totals = store
        .view_totals(
            &ViewScope::Page {
                instance_id: INSTANCE.into(),
                page_id: "p1".into(),
            },
            day,
            day + 2,
        )
        .await
        .unwrap();
    assert_eq!(totals.views, 5);
    assert_eq!(totals.unique_viewers, 2);
    assert_eq!(totals.by_day, vec![(day, 4, 2), (day + 1, 1, 1)]);
    assert_eq!(totals.by_channel, vec![(1, 5)]);
    let pages = store
        .top_pages(INSTANCE, "s1", day, day + 2, 0, 10)
        .await
        .unwrap();
    assert_eq!(
        pages
            .iter()
            .map(|p| (p.id.as_str(), p.views, p.unique_viewers))
            .collect::<Vec<_>>(),
        vec![("p1", 5, 2), ("p2", 1, 1)]
    );
    let second = store
        .top_pages(INSTANCE, "s1", day, day + 2, 1, 10)
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
}

async fn reports_of_one_org_never_include_another(backend: Backend) {
    let (store, _guard) = backend.open().await;
    commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![view("v1", T0, "p1", "s1", Some("alice"))],
        ),
    )
    .await;
    commit_one(
        &store,
        batch(
            OTHER,
            OTHER_INSTANCE,
            1,
            vec![
                view("v1", T0, "p1", "s1", Some("alice")),
                view("v2", T0, "p9", "s9", Some("eve")),
            ],
        ),
    )
    .await;
    let day = T0 / DAY;
    let mine = store
        .view_totals(
            &ViewScope::Org {
                org_id: ORG.into(),
                instance_id: None,
            },
            day,
            day + 1,
        )
        .await
        .unwrap();
    assert_eq!((mine.views, mine.unique_viewers), (1, 1));
    let spaces = store
        .top_spaces(ORG, None, day, day + 1, 0, 10)
        .await
        .unwrap();
    assert_eq!(spaces.len(), 1);
    assert_eq!(spaces[0].instance_id, INSTANCE);
    let theirs = store
        .top_spaces(OTHER, Some(OTHER_INSTANCE), day, day + 1, 0, 10)
        .await
        .unwrap();
    assert_eq!(theirs.len(), 2);
}

async fn recent_events_are_an_orgs_own_newest_first(backend: Backend) {
    let (store, _guard) = backend.open().await;
    commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![
                metric("m1", T0, 1.0),
                view("v1", T0 + 2_000, "p1", "s1", Some("alice")),
                metric("m2", T0 + 1_000, 2.0),
            ],
        ),
    )
    .await;
    commit_one(
        &store,
        batch(
            OTHER,
            OTHER_INSTANCE,
            1,
            vec![metric("m9", T0 + 5_000, 9.0)],
        ),
    )
    .await;
    let recent = store.recent_events(ORG, None, 10).await.unwrap();
    let order: Vec<String> = recent
        .iter()
        .map(
            |r| match pb::Event::decode(r.body.as_slice()).unwrap().payload {
                Some(pb::event::Payload::PageView(v)) => v.page_id,
                Some(pb::event::Payload::Metric(m)) => m.value.to_string(),
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert_eq!(order, ["p1", "2", "1"], "newest by occurrence first");
    assert_eq!(recent.len(), 3, "the other org's event is not among them");
    assert!(
        recent
            .iter()
            .all(|r| r.instance_id == INSTANCE && r.stored_at == T0)
    );
    assert_eq!(store.recent_events(ORG, None, 2).await.unwrap().len(), 2);
    assert!(
        store
            .recent_events(ORG, Some(OTHER_INSTANCE), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .recent_events(ORG, Some(INSTANCE), 10)
            .await
            .unwrap()
            .len(),
        3
    );
}

async fn passes_taking_dirty_hours_at_once_each_take_an_hour_once(backend: Backend) {
    let (store, _guard) = backend.open().await;
    const HOURS: i64 = 60;
    let rows = (0..HOURS)
        .map(|h| metric(&format!("m{h}"), T0 + h * 3_600_000 + 1, 1.0))
        .collect();
    commit_one(&store, batch(ORG, INSTANCE, 1, rows)).await;
    // Six passes (as on six replicas) take at once, a few hours at a time, until none is left.
    let passes = (0..6).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut taken = Vec::new();
            loop {
                let some = store.take_dirty_hours(i64::MAX, 3, &[]).await.unwrap();
                if some.is_empty() {
                    return taken;
                }
                taken.extend(some.into_iter().map(|(_, _, hour)| hour));
            }
        })
    });
    let mut taken: Vec<i64> = Vec::new();
    for pass in passes.collect::<Vec<_>>() {
        taken.extend(pass.await.unwrap());
    }
    taken.sort_unstable();
    let every: Vec<i64> = (0..HOURS).map(|h| T0 + h * 3_600_000).collect();
    assert_eq!(taken, every, "each hour taken once, none left out");
}

async fn rollups_are_made_from_dirty_hours_and_read_by_range(backend: Backend) {
    let (store, _guard) = backend.open().await;
    let hour = T0;
    commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![
                metric("a", hour + 1, 10.0),
                metric("b", hour + 2, 30.0),
                metric("c", hour + 3_600_000, 5.0),
            ],
        ),
    )
    .await;
    assert!(
        store
            .take_dirty_hours(hour, 10, &[])
            .await
            .unwrap()
            .is_empty(),
        "hours from the cut-off on wait"
    );
    let dirty = store.take_dirty_hours(i64::MAX, 10, &[]).await.unwrap();
    assert_eq!(dirty.len(), 2);
    assert!(
        store
            .take_dirty_hours(i64::MAX, 10, &[])
            .await
            .unwrap()
            .is_empty()
    );
    for (org, instance, h) in dirty {
        let samples = store.hour_samples(&instance, h).await.unwrap();
        let rollups = crate::maintenance::roll_up(&org, &instance, h, &samples);
        store
            .replace_rollups(&org, &instance, h, &rollups)
            .await
            .unwrap();
    }
    let all = store
        .rollups(INSTANCE, "latency", hour, hour + 7_200_000, None, 10)
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        (all[0].count, all[0].min, all[0].max, all[0].sum),
        (2, 10.0, 30.0, 40.0)
    );
    let after = store
        .rollups(
            INSTANCE,
            "latency",
            hour,
            hour + 7_200_000,
            Some((all[0].hour, all[0].tags.clone())),
            10,
        )
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
    let page = store
        .samples(INSTANCE, "latency", hour, hour + 7_200_000, None, 2)
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    let rest = store
        .samples(
            INSTANCE,
            "latency",
            hour,
            hour + 7_200_000,
            Some((page[1].occurred_at, page[1].event_id.clone())),
            2,
        )
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
}

async fn a_purge_removes_exactly_what_it_counted_and_remembers_the_ids(backend: Backend) {
    let (store, _guard) = backend.open().await;
    commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![
                view("v1", T0, "p1", "s1", Some("alice")),
                metric("m1", T0, 1.0),
            ],
        ),
    )
    .await;
    commit_one(
        &store,
        batch(
            ORG,
            OTHER_INSTANCE,
            1,
            vec![view("v1", T0, "p1", "s1", Some("bob"))],
        ),
    )
    .await;
    // Stored under the newer revision: not covered.
    commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            5,
            vec![view("v2", T0 + DAY, "p1", "s1", Some("carol"))],
        ),
    )
    .await;
    let spec = PurgeSpec {
        purge_id: "purge-1".into(),
        org_id: ORG.into(),
        instance_id: None,
        delete_kinds: vec![4],
        strip_classes: vec![],
        before_consent_version: 5,
        before_revision: 5,
    };
    let counted = store.purge_counts(&spec).await.unwrap();
    assert_eq!(
        (
            counted.events,
            counted.page_views,
            counted.unique_viewer_entries
        ),
        (2, 2, 2)
    );
    assert!(!store.purge_applied("purge-1").await.unwrap());
    apply(&store, ORG, Change::Purge { spec: spec.clone() }).await;
    assert!(store.purge_applied("purge-1").await.unwrap());
    assert_eq!(store.purge_counts(&spec).await.unwrap().events, 0);
    assert_eq!(store.view_count(INSTANCE, "p1").await.unwrap(), (1, 1));
    assert_eq!(
        store.view_count(OTHER_INSTANCE, "p1").await.unwrap(),
        (0, 0)
    );
    // The purged id is remembered: a retry of it is a duplicate, not stored again.
    let retry = commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            5,
            vec![view("v1", T0, "p1", "s1", Some("alice"))],
        ),
    )
    .await;
    assert_eq!(retry, vec![RowOutcome::Duplicate]);
    // Metrics were not in the purge.
    assert_eq!(
        store
            .samples(INSTANCE, "latency", 0, i64::MAX, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn a_purge_is_staged_by_one_purger_only_until_discarded(backend: Backend) {
    let (store, _guard) = backend.open().await;
    let spec = PurgeSpec {
        purge_id: "purge-3".into(),
        org_id: ORG.into(),
        instance_id: None,
        delete_kinds: vec![4],
        strip_classes: vec![],
        before_consent_version: 5,
        before_revision: 5,
    };
    let first = staged(ORG, Change::Purge { spec: spec.clone() });
    store.stage(&first).await.unwrap();
    assert!(
        store.purge_applied("purge-3").await.unwrap(),
        "claimed once staged"
    );
    let second = staged(ORG, Change::Purge { spec: spec.clone() });
    assert_eq!(
        store.stage(&second).await.unwrap_err(),
        ChangeLogError::Refused(PURGE_TAKEN.into())
    );
    // A discarded (fenced) purge is released and may be staged again.
    store.discard(&first.change_id).await.unwrap();
    assert!(!store.purge_applied("purge-3").await.unwrap());
    store.stage(&second).await.unwrap();
    store.apply(&second).await.unwrap();
    assert!(store.purge_applied("purge-3").await.unwrap());
    let third = staged(ORG, Change::Purge { spec });
    assert!(
        store.stage(&third).await.is_err(),
        "an applied purge is never staged again"
    );
}

async fn a_purge_strips_classes_from_covered_records(backend: Backend) {
    let (store, _guard) = backend.open().await;
    commit_one(&store, batch(ORG, INSTANCE, 1, vec![metric("m1", T0, 1.0)])).await;
    commit_one(
        &store,
        batch(ORG, INSTANCE, 6, vec![metric("m2", T0 + 1, 2.0)]),
    )
    .await;
    let spec = PurgeSpec {
        purge_id: "purge-2".into(),
        org_id: ORG.into(),
        instance_id: Some(INSTANCE.into()),
        delete_kinds: vec![],
        strip_classes: vec![sightline_proto::common::v1::DataClass::FreeText as i32],
        before_consent_version: 5,
        before_revision: 5,
    };
    assert_eq!(store.purge_counts(&spec).await.unwrap().stripped, 1);
    apply(&store, ORG, Change::Purge { spec }).await;
    let samples = store
        .samples(INSTANCE, "latency", 0, i64::MAX, None, 10)
        .await
        .unwrap();
    let tags: Vec<usize> = samples
        .iter()
        .map(
            |s| match pb::Event::decode(s.body.as_slice()).unwrap().payload {
                Some(pb::event::Payload::Metric(m)) => m.tags.len(),
                _ => 99,
            },
        )
        .collect();
    // The covered sample lost its free text; the newer one kept it.
    assert_eq!(tags, vec![0, 1]);
}

async fn erasing_a_viewer_removes_their_views_entries_and_counts(backend: Backend) {
    let (store, _guard) = backend.open().await;
    commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![
                view("v1", T0, "p1", "s1", Some("alice")),
                view("v2", T0 + DAY, "p1", "s1", Some("alice")),
                view("v3", T0, "p1", "s1", Some("bob")),
            ],
        ),
    )
    .await;
    let spec = EraseSpec {
        org_id: ORG.into(),
        instance_id: INSTANCE.into(),
        subjects: vec!["alice".into()],
        until: T0,
    };
    let counted = store.erase_counts(&spec).await.unwrap();
    assert_eq!(
        (
            counted.page_views,
            counted.unique_viewer_entries,
            counted.dedupe_entries
        ),
        (2, 2, 2)
    );
    apply(&store, ORG, Change::Erase(spec.clone())).await;
    assert_eq!(store.erase_counts(&spec).await.unwrap(), Removed::default());
    assert_eq!(store.view_count(INSTANCE, "p1").await.unwrap(), (1, 1));
    // Another instance's viewer of the same id is untouched.
    let other = EraseSpec {
        instance_id: OTHER_INSTANCE.into(),
        ..spec
    };
    assert_eq!(
        store.erase_counts(&other).await.unwrap(),
        Removed::default()
    );
}

async fn retention_sweeps_old_records_and_keeps_recent_ones(backend: Backend) {
    let (store, _guard) = backend.open().await;
    commit_one(
        &store,
        batch(
            ORG,
            INSTANCE,
            1,
            vec![
                metric("old", T0 - 40 * DAY, 1.0),
                metric("new", T0, 2.0),
                view("v", T0 - 40 * DAY, "p", "s", Some("a")),
            ],
        ),
    )
    .await;
    commit_one(
        &store,
        batch(
            OTHER,
            OTHER_INSTANCE,
            1,
            vec![metric("old", T0 - 40 * DAY, 1.0)],
        ),
    )
    .await;
    let removed = store
        .sweep(ORG, T0 - 30 * DAY, T0 - 30 * DAY, T0 - 30 * DAY)
        .await
        .unwrap();
    assert_eq!(removed.events, 2);
    assert_eq!(removed.view_counters, 1);
    assert_eq!(
        store
            .samples(INSTANCE, "latency", 0, i64::MAX, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store
            .samples(OTHER_INSTANCE, "latency", 0, i64::MAX, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn expired_days_are_dropped_whole_and_the_rest_deleted_by_rows(backend: Backend) {
    let (store, other_replica, _guard) = backend.shared().await;
    let pg = backend == Backend::Postgres;
    let today = T0 / DAY;
    // Two replicas preparing the same days at once make each day once.
    let (a, b) = tokio::join!(
        store.prepare_days(today - 45, today),
        other_replica.prepare_days(today - 45, today)
    );
    assert_eq!(a.unwrap() + b.unwrap(), if pg { 46 } else { 0 });
    assert_eq!(store.prepare_days(today - 45, today).await.unwrap(), 0);
    let rows = vec![
        metric("a1", T0 - 40 * DAY, 1.0),
        metric("a2", T0 - 40 * DAY + 1, 1.0),
        metric("b", T0 - 39 * DAY, 1.0),
        // No partition for this day: PostgreSQL keeps it in the default partition.
        metric("c", T0 - 60 * DAY, 1.0),
        metric("now", T0, 1.0),
    ];
    commit_one(&store, batch(ORG, INSTANCE, 1, rows)).await;
    commit_one(
        &store,
        batch(
            OTHER,
            OTHER_INSTANCE,
            1,
            vec![metric("o", T0 - 39 * DAY, 1.0)],
        ),
    )
    .await;
    // OTHER may not lose data (say it is moving): the day it shares with ORG is kept whole.
    let expiring: BTreeMap<String, i64> = [(ORG.to_owned(), T0 - 30 * DAY)].into_iter().collect();
    let dropped = store.drop_expired_days(&expiring).await.unwrap();
    let expected: BTreeMap<String, i64> = if pg {
        [(ORG.to_owned(), 2)].into_iter().collect()
    } else {
        BTreeMap::new()
    };
    assert_eq!(dropped, expected);
    let swept = store
        .sweep(ORG, T0 - 30 * DAY, T0 - 30 * DAY, T0 - 30 * DAY)
        .await
        .unwrap();
    assert_eq!(dropped.get(ORG).copied().unwrap_or(0) + swept.events, 4);
    let left = |instance: &'static str| {
        let store = store.clone();
        async move {
            let samples = store
                .samples(instance, "latency", 0, i64::MAX, None, 10)
                .await
                .unwrap();
            samples.into_iter().map(|s| s.event_id).collect::<Vec<_>>()
        }
    };
    assert_eq!(left(INSTANCE).await, vec!["now"]);
    assert_eq!(left(OTHER_INSTANCE).await, vec!["o"]);
    // An event for a day made later moves into that day's partition with it, and goes with it.
    commit_one(
        &store,
        batch(ORG, INSTANCE, 1, vec![metric("later", T0 + 10 * DAY, 1.0)]),
    )
    .await;
    assert_eq!(
        store.prepare_days(today + 10, today + 10).await.unwrap(),
        usize::from(pg)
    );
    assert_eq!(left(INSTANCE).await, vec!["now", "later"]);
    let expiring: BTreeMap<String, i64> = [(ORG.to_owned(), T0 + 11 * DAY)].into_iter().collect();
    let dropped = store.drop_expired_days(&expiring).await.unwrap();
    if pg {
        assert_eq!(dropped.get(ORG), Some(&2), "{dropped:?}");
        assert!(left(INSTANCE).await.is_empty());
    } else {
        assert!(dropped.is_empty());
        assert_eq!(left(INSTANCE).await, vec!["now", "later"]);
    }
    assert_eq!(left(OTHER_INSTANCE).await, vec!["o"]);
}

async fn an_orgs_data_moves_whole_to_another_store_and_leaves_nothing_behind(backend: Backend) {
    let (from, _guard) = backend.open().await;
    let (to, _guard_to) = backend.elsewhere("eu").await;
    fill_for_move(&from).await;
    assert_ne!(from.identity().await.unwrap(), to.identity().await.unwrap());
    let before = org_picture(&from).await;
    assert!(
        before.0.views == 3 && before.2 == 2 && before.3 == 1,
        "{before:?}"
    );
    let counts = from.org_counts(ORG).await.unwrap();
    assert!(
        counts
            .iter()
            .zip(MOVED_TABLES)
            .all(|(n, t)| *n > 0 || !t.counted),
        "every moved table holds some of the org: {counts:?}"
    );
    // A copy interrupted and started over leaves the same as one copy.
    to.import_rows(
        &MOVED_TABLES[0],
        &from
            .export_rows(&MOVED_TABLES[0], ORG, None, 1)
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    crate::maintenance::copy_org(from.as_ref(), to.as_ref(), ORG)
        .await
        .unwrap();
    crate::maintenance::copy_org(from.as_ref(), to.as_ref(), ORG)
        .await
        .unwrap();
    assert_eq!(to.org_counts(ORG).await.unwrap(), counts);
    assert_eq!(org_picture(&to).await, before);
    // Rows carry the location of the store that holds them.
    let events = to
        .export_rows(&MOVED_TABLES[0], ORG, None, 100)
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .all(|row| row[4] == Value::Text(Some("eu".into())))
    );
    // The remembered purge and event ids went along: a retry is still a duplicate.
    assert!(to.purge_applied("purge-before-move").await.unwrap());
    let mut retry = batch(
        ORG,
        INSTANCE,
        1,
        vec![view("gone", T0, "p3", "s2", Some("carol"))],
    );
    retry.location = "eu".into();
    assert_eq!(commit_one(&to, retry).await, vec![RowOutcome::Duplicate]);
    // The rollup still to make is to make there.
    assert_eq!(
        to.take_dirty_hours(i64::MAX, 10, &[]).await.unwrap().len(),
        1
    );

    assert!(!from.moved_out("move-1").await.unwrap());
    apply(&from, ORG, Change::MoveOut(move_spec(false))).await;
    assert!(from.moved_out("move-1").await.unwrap());
    assert!(from.org_counts(ORG).await.unwrap().iter().all(|n| *n == 0));
    assert_eq!(
        from.view_count(OTHER_INSTANCE, "p9").await.unwrap(),
        (1, 1),
        "another org's data stays"
    );
    assert!(to.org_counts(OTHER).await.unwrap().iter().all(|n| *n == 0));
}

async fn a_move_between_locations_of_one_database_relabels_the_rows(backend: Backend) {
    let (global, eu, _guard) = backend.shared().await;
    assert_eq!(
        global.identity().await.unwrap(),
        eu.identity().await.unwrap()
    );
    fill_for_move(&global).await;
    let before = org_picture(&global).await;
    let counts = global.org_counts(ORG).await.unwrap();
    apply(&global, ORG, Change::MoveOut(move_spec(true))).await;
    assert!(global.moved_out("move-1").await.unwrap());
    assert_eq!(eu.org_counts(ORG).await.unwrap(), counts, "nothing deleted");
    assert_eq!(org_picture(&eu).await, before);
    for table in MOVED_TABLES
        .iter()
        .filter(|t| t.location_column().is_some())
    {
        let column = table.location_column().unwrap();
        let rows = eu.export_rows(table, ORG, None, 100).await.unwrap();
        assert!(!rows.is_empty());
        assert!(
            rows.iter()
                .all(|r| r[column] == Value::Text(Some("eu".into()))),
            "{}",
            table.name
        );
        let other = eu.export_rows(table, OTHER, None, 100).await.unwrap();
        assert!(
            other
                .iter()
                .all(|r| r[column] == Value::Text(Some("global".into()))),
            "{}",
            table.name
        );
    }
}

async fn export_pages_follow_the_key_order_without_gaps(backend: Backend) {
    let (store, _guard) = backend.open().await;
    let rows: Vec<Row> = (0..25)
        .map(|i| metric(&format!("m{i:02}"), T0 + i, 1.0))
        .collect();
    commit_one(&store, batch(ORG, INSTANCE, 1, rows)).await;
    let table = &MOVED_TABLES[0];
    let mut seen = Vec::new();
    let mut after: Option<Vec<Value>> = None;
    loop {
        let page = store
            .export_rows(table, ORG, after.as_deref(), 7)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last[..table.key].to_vec());
        seen.extend(page.into_iter().map(|r| r[1].clone()));
    }
    let expected: Vec<Value> = (0..25)
        .map(|i| Value::Text(Some(format!("m{i:02}"))))
        .collect();
    assert_eq!(seen, expected);
}

async fn a_rollup_of_samples_gone_meanwhile_is_not_written(backend: Backend) {
    let (store, _guard) = backend.open().await;
    commit_one(
        &store,
        batch(ORG, INSTANCE, 1, vec![metric("m1", T0 + 1, 10.0)]),
    )
    .await;
    let samples = store.hour_samples(INSTANCE, T0).await.unwrap();
    let rollups = crate::maintenance::roll_up(ORG, INSTANCE, T0, &samples);
    assert_eq!(rollups.len(), 1);
    // The org moves away between the read and the write.
    apply(&store, ORG, Change::MoveOut(move_spec(false))).await;
    store
        .replace_rollups(ORG, INSTANCE, T0, &rollups)
        .await
        .unwrap();
    assert!(store.org_counts(ORG).await.unwrap().iter().all(|n| *n == 0));
}

async fn rollups_skip_the_hours_of_orgs_named(backend: Backend) {
    let (store, _guard) = backend.open().await;
    commit_one(
        &store,
        batch(ORG, INSTANCE, 1, vec![metric("m1", T0 + 1, 10.0)]),
    )
    .await;
    commit_one(
        &store,
        batch(OTHER, OTHER_INSTANCE, 1, vec![metric("m1", T0 + 1, 10.0)]),
    )
    .await;
    let taken = store
        .take_dirty_hours(i64::MAX, 10, &[ORG.to_owned()])
        .await
        .unwrap();
    assert_eq!(
        taken,
        vec![(OTHER.to_owned(), OTHER_INSTANCE.to_owned(), T0)]
    );
    assert_eq!(
        store
            .take_dirty_hours(i64::MAX, 10, &[])
            .await
            .unwrap()
            .len(),
        1,
        "ORG's hour waits"
    );
}

async fn day_totals_answer_reports_as_the_page_views_do_and_go_with_erasure_and_purge(
    backend: Backend,
) {
    let (store, _guard) = backend.open().await;
    let mut rows = Vec::new();
    for (i, (day, page, space, viewer)) in [
        (0, "p1", "s1", "alice"),
        (0, "p2", "s1", "bob"),
        (0, "p3", "s2", "carol"),
        (1, "p1", "s1", "alice"),
        (1, "p3", "s2", "dave"),
        (2, "p2", "s1", "erin"),
        (2, "p3", "s2", "alice"),
    ]
    .into_iter()
    .enumerate()
    {
        rows.push(view(
            &format!("v{i}"),
            T0 + day * DAY,
            page,
            space,
            Some(viewer),
        ));
    }
    commit_one(&store, batch(ORG, INSTANCE, 1, rows)).await;
    commit_one(
        &store,
        batch(
            OTHER,
            OTHER_INSTANCE,
            1,
            vec![view("o", T0, "p1", "s1", Some("zed"))],
        ),
    )
    .await;
    let org = ViewScope::Org {
        org_id: ORG.into(),
        instance_id: None,
    };
    let space = ViewScope::Space {
        instance_id: INSTANCE.into(),
        space_id: "s2".into(),
    };
    let (from, to) = (T0 / DAY, T0 / DAY + 3);
    // Before any totals are made the page-view tables answer.
    let before = store.view_totals(&org, from, to).await.unwrap();
    assert_eq!((before.views, before.unique_viewers), (7, 5));
    assert_eq!(
        before.by_day,
        vec![(from, 3, 3), (from + 1, 2, 2), (from + 2, 2, 2)]
    );
    let spaces_before = store.top_spaces(ORG, None, from, to, 0, 10).await.unwrap();

    assert_eq!(
        crate::maintenance::remake_view_days(store.as_ref(), &[])
            .await
            .unwrap(),
        4,
        "three days of one org, one of the other"
    );
    assert!(store.dirty_view_days(10, &[]).await.unwrap().is_empty());
    let after = store.view_totals(&org, from, to).await.unwrap();
    assert_eq!(
        (after.views, &after.by_day, &after.by_channel),
        (7, &before.by_day, &before.by_channel)
    );
    assert_eq!(after.unique_viewers, 5, "a small union is counted right");
    assert!(after.unique_error > 0.0, "several days are estimated");
    let one_day = store.view_totals(&org, from, from + 1).await.unwrap();
    assert_eq!((one_day.unique_viewers, one_day.unique_error), (3, 0.0));
    let s2 = store.view_totals(&space, from, to).await.unwrap();
    assert_eq!((s2.views, s2.unique_viewers), (3, 3));
    let spaces = store.top_spaces(ORG, None, from, to, 0, 10).await.unwrap();
    assert_eq!(
        spaces
            .iter()
            .map(|r| (&r.id, r.views, r.unique_viewers))
            .collect::<Vec<_>>(),
        spaces_before
            .iter()
            .map(|r| (&r.id, r.views, r.unique_viewers))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        store
            .top_spaces(ORG, None, from, to, 1, 1)
            .await
            .unwrap()
            .len(),
        1
    );

    // Erasing alice removes her days' totals at once; reports leave her out before the
    // totals are made again, and after.
    apply(
        &store,
        ORG,
        Change::Erase(EraseSpec {
            org_id: ORG.into(),
            instance_id: INSTANCE.into(),
            subjects: vec!["alice".into()],
            until: T0,
        }),
    )
    .await;
    let totals_rows = store
        .export_rows(
            MOVED_TABLES
                .iter()
                .find(|t| t.name == "view_day_totals")
                .unwrap(),
            ORG,
            None,
            100,
        )
        .await
        .unwrap();
    assert!(
        totals_rows.is_empty(),
        "alice was seen on every day: {totals_rows:?}"
    );
    let erased = store.view_totals(&org, from, to).await.unwrap();
    assert_eq!((erased.views, erased.unique_viewers), (4, 4));
    crate::maintenance::remake_view_days(store.as_ref(), &[])
        .await
        .unwrap();
    assert_eq!(
        store.view_totals(&org, from, to).await.unwrap().by_day,
        erased.by_day
    );

    // A purge of page views takes the totals with them.
    apply(&store, ORG, page_views_purge("purge-views")).await;
    assert!(
        store
            .export_rows(
                MOVED_TABLES
                    .iter()
                    .find(|t| t.name == "view_day_totals")
                    .unwrap(),
                ORG,
                None,
                100
            )
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.view_totals(&org, from, to).await.unwrap().views, 0);
    crate::maintenance::remake_view_days(store.as_ref(), &[])
        .await
        .unwrap();
    assert_eq!(
        store.view_totals(&org, from, to).await.unwrap(),
        ViewTotals::default()
    );
    assert!(
        store
            .top_spaces(ORG, None, from, to, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let other = ViewScope::Org {
        org_id: OTHER.into(),
        instance_id: None,
    };
    assert_eq!(
        store.view_totals(&other, from, to).await.unwrap().views,
        1,
        "another org's stay"
    );
}

async fn staged_changes_are_listed_until_applied_or_discarded(backend: Backend) {
    let (store, _guard) = backend.open().await;
    let spec = EraseSpec {
        org_id: ORG.into(),
        instance_id: INSTANCE.into(),
        subjects: vec!["x".into()],
        until: T0,
    };
    let a = staged(ORG, Change::Erase(spec.clone()));
    let b = staged(OTHER, Change::Erase(spec));
    store.stage(&a).await.unwrap();
    store.stage(&b).await.unwrap();
    assert_eq!(store.staged(Some(ORG)).await.unwrap(), vec![a.clone()]);
    assert_eq!(store.staged(None).await.unwrap().len(), 2);
    store.discard(&b.change_id).await.unwrap();
    store.apply(&a).await.unwrap();
    // Applying twice changes nothing.
    store.apply(&a).await.unwrap();
    assert!(store.staged(None).await.unwrap().is_empty());
}

/// A space's report read while views arrive and its days' totals are remade never goes back: its
/// statements read one snapshot, so a day remade between two of them is counted once, not lost.
async fn a_space_report_read_while_its_days_are_remade_never_loses_a_day(backend: Backend) {
    let (store, _guard) = backend.open().await;
    let space = ViewScope::Space {
        instance_id: INSTANCE.into(),
        space_id: "s1".into(),
    };
    let (from, to) = (T0 / DAY, T0 / DAY + 4);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..60i64 {
                let at = T0 + (i % 4) * DAY + i * 60_000;
                let row = view(&format!("v{i}"), at, "p1", "s1", Some(&format!("u{i}")));
                commit_one(&store, batch(ORG, INSTANCE, 1, vec![row])).await;
                crate::maintenance::remake_view_days(store.as_ref(), &[])
                    .await
                    .unwrap();
            }
        })
    };
    let mut last = 0;
    while !writer.is_finished() {
        let views = store.view_totals(&space, from, to).await.unwrap().views;
        assert!(
            views >= last,
            "the report went back from {last} to {views} views: a day was lost between its reads"
        );
        last = views;
    }
    writer.await.unwrap();
    assert_eq!(store.view_totals(&space, from, to).await.unwrap().views, 60);
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
    a_space_report_read_while_its_days_are_remade_never_loses_a_day,
    events_are_stored_once_per_instance_and_event_id,
    a_repeated_id_in_a_large_group_is_found_and_nothing_counts_twice,
    a_batch_enforced_under_an_old_revision_stores_nothing,
    a_store_refuses_another_locations_records,
    views_count_once_per_viewer_inside_the_blocking_time,
    reports_of_one_org_never_include_another,
    recent_events_are_an_orgs_own_newest_first,
    rollups_are_made_from_dirty_hours_and_read_by_range,
    passes_taking_dirty_hours_at_once_each_take_an_hour_once,
    a_purge_removes_exactly_what_it_counted_and_remembers_the_ids,
    a_purge_is_staged_by_one_purger_only_until_discarded,
    a_purge_strips_classes_from_covered_records,
    erasing_a_viewer_removes_their_views_entries_and_counts,
    retention_sweeps_old_records_and_keeps_recent_ones,
    expired_days_are_dropped_whole_and_the_rest_deleted_by_rows,
    an_orgs_data_moves_whole_to_another_store_and_leaves_nothing_behind,
    a_move_between_locations_of_one_database_relabels_the_rows,
    export_pages_follow_the_key_order_without_gaps,
    a_rollup_of_samples_gone_meanwhile_is_not_written,
    rollups_skip_the_hours_of_orgs_named,
    day_totals_answer_reports_as_the_page_views_do_and_go_with_erasure_and_purge,
    staged_changes_are_listed_until_applied_or_discarded,
);
