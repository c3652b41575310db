//! consent-svc's storage: the [`ConsentStore`] trait with a SQLite and a PostgreSQL implementation
//! sharing one SQL text. Changes go through the audited-change protocol (`runtime::audited`):
//! staged first, applied — in one transaction that also bumps the org's policy revision and records
//! its purge — only once the org's audit log holds the change's entry.

mod sql;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sightline_runtime::audited::{ChangeLog, ChangeLogError};
use sightline_runtime::storage::{self, DbFailure, Migrations, StorageError};

pub use sql::{Notice, SqlStore};

pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE_MIGRATIONS,
    postgres: &POSTGRES_MIGRATIONS,
};

pub async fn open(url: &str) -> Result<Arc<dyn ConsentStore>, StorageError> {
    let db = storage::connect(url, MIGRATIONS).await?;
    Ok(Arc::new(
        SqlStore::new(db).await.map_err(StorageError::Connect)?,
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Conflict(&'static str),
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match storage::classify(&error) {
            // Versions and moves are keyed so that a concurrent writer collides.
            DbFailure::UniqueViolation => {
                StoreError::Conflict("changed concurrently; read it again and retry")
            }
            DbFailure::Unavailable => StoreError::Unavailable(error),
            DbFailure::ForeignKeyViolation | DbFailure::Other => StoreError::Database(error),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize, Deserialize)]
pub struct ConsentRecord {
    pub org_id: String,
    pub version: i64,
    pub usage_level: String,
    pub sharing_level: String,
    pub contribute_metadata: bool,
    pub contribute_in_app_data: bool,
    pub compliance_restricted: bool,
    pub actor: String,
    pub reason: String,
    pub created_at: i64,
    pub receipt_payload: Vec<u8>,
    pub receipt_signature: Vec<u8>,
    pub key_id: String,
    /// The digest of the client's request id the version was made for, if it gave one.
    #[serde(default)]
    pub request_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize, Deserialize)]
pub struct OverrideRecord {
    pub org_id: String,
    pub instance_id: String,
    pub usage_level: String,
    pub sharing_level: String,
    pub reason: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize, Deserialize)]
pub struct TrackingRecord {
    pub org_id: String,
    /// Channel numbers, comma-separated.
    pub enabled_channels: String,
    pub exclude_anonymous: bool,
    /// JSON array of group names.
    pub excluded_groups: String,
    pub blocking_time_ms: i64,
    pub view_counter_enabled: bool,
    pub global_report_group: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize, Deserialize)]
pub struct ResidencyRecord {
    pub org_id: String,
    pub location: String,
    pub support_bundle_location: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize, Deserialize)]
pub struct MoveRecord {
    pub move_id: String,
    pub org_id: String,
    pub scope: String,
    pub from_location: String,
    pub to_location: String,
    pub state: String,
    pub requested_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    /// The data owners that have reported their part, comma-separated and sorted.
    pub reported_by: String,
}

/// The state a move must still be in for a change of it to apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveFrom {
    pub state: String,
    pub reported_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize, Deserialize)]
pub struct RetentionRecord {
    pub org_id: String,
    pub raw_days: i64,
    pub assessment_days: i64,
    pub aggregate_days: i64,
    pub updated_at: i64,
    pub score_history_days: i64,
    pub support_bundle_days: i64,
    pub event_id_days: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize, Deserialize)]
pub struct PolicyStateRecord {
    pub org_id: String,
    pub revision: i64,
}

/// A purge instruction, as enforcement points read it (consent.proto `PurgeInstruction`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize, Deserialize)]
pub struct PurgeRecord {
    pub purge_id: String,
    pub org_id: String,
    /// "ORG" or "INSTANCE".
    pub scope: String,
    /// Empty for the org scope.
    pub instance_id: String,
    /// Event kind numbers, comma-separated.
    pub delete_kinds: String,
    /// Data class numbers, comma-separated.
    pub strip_classes: String,
    pub withdraw_metadata: bool,
    pub withdraw_in_app_data: bool,
    pub before_consent_version: i64,
    /// Set by [`ConsentStore::apply`] to the revision of the change that issues the purge.
    pub before_revision: i64,
    pub issued_at: i64,
}

/// One change to an org's governance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A new consent version; fails with Conflict when that version exists already.
    Consent(ConsentRecord),
    /// Sets (Some) or clears (None) an instance's override.
    Override {
        org_id: String,
        instance_id: String,
        record: Option<OverrideRecord>,
    },
    Tracking(TrackingRecord),
    Retention(RetentionRecord),
    /// A residency move, new (`expected` None) or advanced from `expected` (its state and the
    /// owners that had reported); with the org's residency when the move changes it.
    Move {
        record: MoveRecord,
        expected: Option<MoveFrom>,
        residency: Option<ResidencyRecord>,
    },
}

impl Change {
    pub fn org_id(&self) -> &str {
        match self {
            Change::Consent(r) => &r.org_id,
            Change::Override { org_id, .. } => org_id,
            Change::Tracking(r) => &r.org_id,
            Change::Retention(r) => &r.org_id,
            Change::Move { record, .. } => &record.org_id,
        }
    }
}

#[async_trait]
/// Reads of governance, and changes through the audited-change protocol ([`ChangeLog`]): a change
/// is staged, then applied once its audit entry is in the org's log.
pub trait ConsentStore: ChangeLog + Send + Sync + std::fmt::Debug + 'static {
    /// This store's name among the replicas sharing its database.
    fn origin(&self) -> &str;
    /// The channel applied changes are announced on to the other replicas (PostgreSQL only).
    fn channel(&self) -> Option<&str>;

    async fn latest_consent(&self, org_id: &str) -> StoreResult<Option<ConsentRecord>>;
    async fn consent_version(
        &self,
        org_id: &str,
        version: i64,
    ) -> StoreResult<Option<ConsentRecord>>;
    /// The version made for the request whose id digests to `request_key`.
    async fn consent_by_request(
        &self,
        org_id: &str,
        request_key: &str,
    ) -> StoreResult<Option<ConsentRecord>>;
    /// Newest first, versions below `before` (all when None).
    async fn list_consent(
        &self,
        org_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<ConsentRecord>>;
    async fn tracking(&self, org_id: &str) -> StoreResult<Option<TrackingRecord>>;
    /// The org's residency and its moves, newest first, read in one statement: one snapshot, so a
    /// move's completion and the location it changed are never seen apart.
    async fn residency(
        &self,
        org_id: &str,
    ) -> StoreResult<(Option<ResidencyRecord>, Vec<MoveRecord>)>;
    async fn retention(&self, org_id: &str) -> StoreResult<Option<RetentionRecord>>;
    async fn policy_state(&self, org_id: &str) -> StoreResult<Option<PolicyStateRecord>>;
    /// Every override of the org's instances.
    async fn overrides(&self, org_id: &str) -> StoreResult<Vec<OverrideRecord>>;
    /// Every purge issued for the org, newest first.
    async fn purges(&self, org_id: &str) -> StoreResult<Vec<PurgeRecord>>;
    /// Every org that has ever changed anything (has a policy revision), by id.
    async fn orgs(&self) -> StoreResult<Vec<String>>;
}

/// What a staged change holds: the change, and the purge it issues. Applying it bumps the org's
/// policy revision and records the purge with `before_revision` set to that revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedPayload {
    pub change: Change,
    pub purge: Option<PurgeRecord>,
    /// The org's policy revision the change was computed from: staging refuses it when the org
    /// is at another revision by then (changed on another replica). None: not checked (changes
    /// staged before this was kept).
    #[serde(default)]
    pub base_revision: Option<i64>,
}

impl StagedPayload {
    pub fn encode(&self) -> String {
        // Plain data: serialising it cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(text: &str) -> Result<Self, ChangeLogError> {
        serde_json::from_str(text)
            .map_err(|e| ChangeLogError::Refused(format!("staged payload does not decode: {e}")))
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

#[cfg(test)]
mod conformance;
