//! collector-svc's storage: the [`CollectorStore`] trait with one SQL text for SQLite and
//! PostgreSQL. Events arrive already de-identified; the store de-duplicates them on (instance,
//! event_id), keeps page-view counters, unique-viewer entries and blocking-time memory, rolls
//! metrics up by hour, and applies purges and erasures through the audited-change protocol
//! (`runtime::audited`).

mod days;
mod moved;
mod sql;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sightline_runtime::audited::{ChangeLog, ChangeLogError};
use sightline_runtime::sql::Unsynced;
use sightline_runtime::storage::{self, DbFailure, Migrations, StorageError};

pub use moved::{MOVED_TABLES, MoveSpec, Table, Value};
pub use sql::{PURGE_TAKEN, SqlStore};

pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE_MIGRATIONS,
    postgres: &POSTGRES_MIGRATIONS,
};

/// Opens the store of one location at `url`.
pub async fn open(url: &str, location: &str) -> Result<Arc<dyn CollectorStore>, StorageError> {
    Ok(Arc::new(SqlStore::new(
        storage::connect(url, MIGRATIONS).await?,
        location,
    )))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// A batch for another location than the store's.
    #[error("this store holds {store} data; the batch is for {batch}")]
    WrongLocation { store: String, batch: String },
    #[error("stored data does not decode: {0}")]
    Corrupt(String),
    /// A write did not do what it must have (the transaction is rolled back).
    #[error("a write went wrong: {0}")]
    Inconsistent(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match storage::classify(&error) {
            DbFailure::Unavailable => StoreError::Unavailable(error),
            _ => StoreError::Database(error),
        }
    }
}

impl From<StoreError> for ChangeLogError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(e) => ChangeLogError::Unavailable(e.to_string()),
            other => ChangeLogError::Refused(other.to_string()),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One event to store, already enforced.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub event_id: String,
    pub kind: i64,
    pub occurred_at: i64,
    pub name: String,
    pub value: Option<f64>,
    pub subject: Option<String>,
    /// The stored event, protobuf-encoded.
    pub body: Vec<u8>,
    pub view: Option<View>,
}

/// What a page view adds to counters and unique-viewer entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub page_id: String,
    pub space_id: String,
    pub channel: i64,
    pub viewer: Option<String>,
}

/// A batch of one instance, enforced under one policy revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub org_id: String,
    pub instance_id: String,
    pub location: String,
    pub consent_version: i64,
    pub policy_revision: i64,
    pub stored_at: i64,
    pub blocking_time_ms: i64,
    pub rows: Vec<Row>,
}

/// What happened to one row of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOutcome {
    Stored,
    /// Already stored under this event id (or remembered after a purge).
    Duplicate,
    /// A repeated view inside the blocking time.
    Blocked,
}

/// What happened to one batch of a group commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Committed; one outcome per row, in order.
    Committed(Vec<RowOutcome>),
    /// The policy changed after the batch was enforced: nothing stored; enforce it again.
    Stale,
}

/// Which page views a report covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewScope {
    Page {
        instance_id: String,
        page_id: String,
    },
    Space {
        instance_id: String,
        space_id: String,
    },
    Org {
        org_id: String,
        instance_id: Option<String>,
    },
}

/// Views and unique viewers over whole UTC days [from_day, to_day).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ViewTotals {
    pub views: i64,
    pub unique_viewers: i64,
    /// The relative standard error of `unique_viewers` when it is estimated (several days merged
    /// from sketches); 0 when exact.
    pub unique_error: f64,
    /// (channel, views)
    pub by_channel: Vec<(i64, i64)>,
    /// (day, views, unique viewers)
    pub by_day: Vec<(i64, i64, i64)>,
}

/// A page or space in a ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub instance_id: String,
    pub id: String,
    pub views: i64,
    pub unique_viewers: i64,
    /// As [`ViewTotals::unique_error`].
    pub unique_error: f64,
}

/// A raw metric sample as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub occurred_at: i64,
    pub event_id: String,
    pub consent_version: i64,
    pub body: Vec<u8>,
}

/// An hourly rollup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Rollup {
    pub instance_id: String,
    pub name: String,
    /// The series' tags, canonical JSON (sorted keys).
    pub tags: String,
    pub hour: i64,
    pub org_id: String,
    pub unit: String,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub p50: f64,
    pub p95: f64,
    pub consent_version: i64,
    pub policy_revision: i64,
}

/// Which stored records a purge covers (consent.proto `PurgeInstruction`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeSpec {
    pub purge_id: String,
    pub org_id: String,
    /// Set for an instance-scoped purge.
    pub instance_id: Option<String>,
    pub delete_kinds: Vec<i64>,
    pub strip_classes: Vec<i32>,
    pub before_consent_version: i64,
    pub before_revision: i64,
}

/// What a purge or an erasure removes, per store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub events: i64,
    pub stripped: i64,
    pub page_views: i64,
    pub feature_usage: i64,
    pub view_counters: i64,
    pub unique_viewer_entries: i64,
    pub dedupe_entries: i64,
    pub rollups: i64,
}

/// Whom an erasure covers: one viewer's stored forms on one instance, stored up to `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EraseSpec {
    pub org_id: String,
    pub instance_id: String,
    /// The stored forms of the viewer's id (its pseudonym, and the id itself if a policy kept it).
    pub subjects: Vec<String>,
    pub until: i64,
}

/// The changes collector-svc records in the org's audit log before they take effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Change {
    /// Apply a purge (records covered are deleted or stripped) and remember its id.
    Purge {
        spec: PurgeSpec,
    },
    Erase(EraseSpec),
    /// The org's data has been copied to another location's store (and counted there): delete it
    /// here, or, when both locations share this database, relabel it.
    MoveOut(MoveSpec),
}

impl Change {
    pub fn encode(&self) -> String {
        // Plain data: serialising it cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(text: &str) -> Result<Self, ChangeLogError> {
        serde_json::from_str(text)
            .map_err(|e| ChangeLogError::Refused(format!("staged change does not decode: {e}")))
    }
}

pub use sightline_runtime::policy_stream::{Fence, Held};

/// The current policy revision of (org, instance), as the writer checks it before a commit.
pub type Revisions<'a> = &'a (dyn Fn(&str, &str) -> Option<u64> + Send + Sync);

/// A stored event as `recent_events` reads it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RecentEvent {
    pub instance_id: String,
    pub stored_at: i64,
    pub consent_version: i64,
    pub body: Vec<u8>,
}

#[async_trait]
pub trait CollectorStore: ChangeLog + Send + Sync + std::fmt::Debug + 'static {
    /// The location this store holds.
    fn location(&self) -> &str;

    /// Commits several batches in one transaction (group commit). A batch whose policy revision is
    /// no longer the current one is not stored (`Stale`). The revisions are checked when the
    /// transaction starts and again, holding `fence`, right before it commits; a change applied in
    /// between rolls the transaction back and it is tried again (its batches of that org then
    /// `Stale`). The hold on the fence is returned: the caller keeps it until its answers are out,
    /// so a policy change waits only for commits, never for their inserts.
    ///
    /// It returns once the transaction is committed, before it is durable: the outcomes come out
    /// of [`Unsynced::synced`] only, so no answer can precede the sync, while the caller may
    /// already commit its next group (SQLite's one writer then never waits for the disk).
    async fn commit_fenced(
        &self,
        batches: &[Batch],
        current: Revisions<'_>,
        fence: &Fence,
    ) -> StoreResult<Unsynced<(Vec<BatchOutcome>, Held)>>;

    /// [`CollectorStore::commit_fenced`] with a fence of its own (nothing else applies changes),
    /// durable when it returns.
    async fn commit(
        &self,
        batches: &[Batch],
        current: Revisions<'_>,
    ) -> StoreResult<Vec<BatchOutcome>> {
        Ok(self
            .commit_fenced(batches, current, &Fence::default())
            .await?
            .synced()
            .await?
            .0)
    }

    /// All-time views and unique viewers of one page.
    async fn view_count(&self, instance_id: &str, page_id: &str) -> StoreResult<(i64, i64)>;
    async fn view_totals(
        &self,
        scope: &ViewScope,
        from_day: i64,
        to_day: i64,
    ) -> StoreResult<ViewTotals>;
    /// Pages of a space, most viewed first.
    async fn top_pages(
        &self,
        instance_id: &str,
        space_id: &str,
        from_day: i64,
        to_day: i64,
        offset: i64,
        limit: i64,
    ) -> StoreResult<Vec<Ranked>>;
    /// Spaces of an org (or one instance), most viewed first.
    async fn top_spaces(
        &self,
        org_id: &str,
        instance_id: Option<&str>,
        from_day: i64,
        to_day: i64,
        offset: i64,
        limit: i64,
    ) -> StoreResult<Vec<Ranked>>;

    /// Raw samples of a metric in [from, to), after the (occurred_at, event_id) cursor.
    async fn samples(
        &self,
        instance_id: &str,
        name: &str,
        from: i64,
        to: i64,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> StoreResult<Vec<Sample>>;
    /// Hourly rollups of a metric with hours in [from, to), after the (hour, tags) cursor.
    async fn rollups(
        &self,
        instance_id: &str,
        name: &str,
        from: i64,
        to: i64,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> StoreResult<Vec<Rollup>>;

    /// Takes up to `limit` hours that started before `before` and wait to be rolled up, of orgs not
    /// in `skip` (orgs whose data is moving): (org, instance, hour).
    async fn take_dirty_hours(
        &self,
        before: i64,
        limit: i64,
        skip: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>>;
    /// Up to `limit` days whose page views changed since their totals were made, of orgs not in
    /// `skip`: (org, instance, day, generation).
    async fn dirty_view_days(
        &self,
        limit: i64,
        skip: &[String],
    ) -> StoreResult<Vec<(String, String, i64, i64)>>;
    /// Remakes one instance's day totals (per space and in all) and sketches from the page-view
    /// tables; the day stays marked when it changed again since `generation`.
    async fn remake_view_day(
        &self,
        org_id: &str,
        instance_id: &str,
        day: i64,
        generation: i64,
    ) -> StoreResult<()>;
    /// The samples of one instance's hour: (body, consent_version, policy_revision).
    async fn hour_samples(
        &self,
        instance_id: &str,
        hour: i64,
    ) -> StoreResult<Vec<(Vec<u8>, i64, i64)>>;
    /// Replaces the rollups of one instance's hour; nothing is written when the hour's samples are
    /// gone meanwhile (purged, or moved to another location).
    async fn replace_rollups(
        &self,
        org_id: &str,
        instance_id: &str,
        hour: i64,
        rollups: &[Rollup],
    ) -> StoreResult<()>;

    /// Whether a purge was applied already, or is staged (claimed) by a purger.
    async fn purge_applied(&self, purge_id: &str) -> StoreResult<bool>;
    /// What a purge would remove now (`stripped`: covered records of kinds that carry a stripped
    /// class).
    async fn purge_counts(&self, spec: &PurgeSpec) -> StoreResult<Removed>;
    /// What an erasure would remove now.
    async fn erase_counts(&self, spec: &EraseSpec) -> StoreResult<Removed>;
    /// After an erasure or a purge: no file keeps a readable copy of what was deleted (SQLite: the
    /// WAL checkpointed and truncated; deleted rows are zeroed by `secure_delete`).
    async fn forget_deleted(&self) -> StoreResult<()>;

    /// An org's hourly rollups of one metric with hours in [from, to): (instance, hour, count,
    /// sum).
    async fn org_rollups(
        &self,
        org_id: &str,
        name: &str,
        from: i64,
        to: i64,
    ) -> StoreResult<Vec<(String, i64, i64, f64)>>;
    /// The bodies of an org's instance-metadata events, newest first: (instance, body).
    async fn instance_metadata(&self, org_id: &str) -> StoreResult<Vec<(String, Vec<u8>)>>;
    /// An org's (or one instance's) stored events that keep a body, newest by occurrence first.
    async fn recent_events(
        &self,
        org_id: &str,
        instance_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<RecentEvent>>;
    /// Charges `epsilon` to every org of `org_ids` when each has that much left of `budget`, in one
    /// transaction; returns the orgs that have not (then nothing is charged).
    async fn charge_epsilon(
        &self,
        org_ids: &[String],
        epsilon: f64,
        budget: f64,
        now: i64,
    ) -> StoreResult<Vec<String>>;

    /// The identity of the database under this store, made when it was created: two locations
    /// whose stores answer the same share one database.
    async fn identity(&self) -> StoreResult<String>;
    /// Up to `limit` of the org's rows of `table`, in key order, after the row whose key is
    /// `after` (the key columns of the last row of the page before).
    async fn export_rows(
        &self,
        table: &'static Table,
        org_id: &str,
        after: Option<&[Value]>,
        limit: i64,
    ) -> StoreResult<Vec<Vec<Value>>>;
    /// Stores rows exported from another location's store, labelled with this store's location;
    /// a row stored already is kept.
    async fn import_rows(&self, table: &'static Table, rows: &[Vec<Value>]) -> StoreResult<()>;
    /// How many rows of each moved table hold the org's data, in `MOVED_TABLES` order.
    async fn org_counts(&self, org_id: &str) -> StoreResult<Vec<i64>>;
    /// Deletes every row of the org's data (what an interrupted copy into this store left).
    async fn clear_org(&self, org_id: &str) -> StoreResult<()>;
    /// Whether the org's data left this store in move `move_id`.
    async fn moved_out(&self, move_id: &str) -> StoreResult<bool>;

    /// Makes the events table ready for days `from_day..=to_day` (PostgreSQL: each day's
    /// partition, made ahead of time); returns how many partitions it made.
    async fn prepare_days(&self, from_day: i64, to_day: i64) -> StoreResult<usize>;
    /// Retention's fast path (PostgreSQL): drops each day of events whose every row belongs to an
    /// org of `raw_before` and is older than that org's time there. Returns rows removed per org;
    /// [`CollectorStore::sweep`] deletes the expired rows of the days kept.
    async fn drop_expired_days(
        &self,
        raw_before: &std::collections::BTreeMap<String, i64>,
    ) -> StoreResult<std::collections::BTreeMap<String, i64>>;
    /// Deletes what retention no longer allows: records older than `raw_before`, rollups older than
    /// `aggregate_before`, remembered event ids older than `ids_before`. Returns rows removed.
    async fn sweep(
        &self,
        org_id: &str,
        raw_before: i64,
        aggregate_before: i64,
        ids_before: i64,
    ) -> StoreResult<Removed>;
}

#[cfg(test)]
mod conformance;
