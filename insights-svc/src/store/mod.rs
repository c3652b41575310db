//! insights-svc's store: assessments, readiness reports, score history, support-bundle records,
//! applied purges and staged audited changes; one implementation per backend
//! ([`sql::SqlStore`]) behind [`InsightsStore`], with one conformance suite.

pub mod sql;

#[cfg(test)]
mod conformance;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sightline_runtime::audited::{ChangeLog, ChangeLogError};
use sightline_runtime::storage::{self, DbFailure, Migrations, StorageError};

pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE_MIGRATIONS,
    postgres: &POSTGRES_MIGRATIONS,
};

/// Opens the store at `url` (migrated).
pub async fn open(url: &str) -> Result<Arc<dyn InsightsStore>, StorageError> {
    Ok(Arc::new(sql::SqlStore::new(
        storage::connect(url, MIGRATIONS).await?,
    )))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("stored data does not decode: {0}")]
    Corrupt(String),
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

/// Whose data a row is: a linked instance, or an unlinked one known by its server id.
pub fn subject_of(instance_id: &str, server_id: &str) -> String {
    if instance_id.is_empty() {
        format!("server:{server_id}")
    } else {
        instance_id.to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAssessment {
    pub upload_id: String,
    pub org_id: String,
    pub subject: String,
    pub stored_at: i64,
    pub consent_version: i64,
    pub size_bytes: i64,
    /// The treated Assessment, protobuf-encoded.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    pub upload_id: String,
    pub org_id: String,
    pub subject: String,
    pub location: String,
    /// The file's name in its location's directory.
    pub file_name: String,
    pub stored_at: i64,
    pub size_bytes: i64,
    pub sha256: String,
    pub files_read: i64,
    /// What was scrubbed, as JSON ({"email": 3, …}).
    pub scrubbed: String,
}

/// A readiness report as kept: the latest per subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReadiness {
    pub org_id: String,
    pub subject: String,
    pub assessed_at: i64,
    pub score: i64,
    /// The ReadinessReport, protobuf-encoded.
    pub report: Vec<u8>,
}

/// A score as kept (score history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredScore {
    pub org_id: String,
    pub subject: String,
    pub at: i64,
    pub score: i64,
    pub rules_version: String,
    pub source: i64,
}

/// Which of an org's records a residency move carries: its data (assessments, readiness reports,
/// score history: `ResidencyScope.DATA`), or its support bundles at one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "part", rename_all = "snake_case")]
pub enum Part {
    Data,
    Bundles { location: String },
}

/// An org's records of one [`Part`], as a move copies them from one store to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrgRecords {
    pub assessments: Vec<StoredAssessment>,
    pub readiness: Vec<StoredReadiness>,
    pub scores: Vec<StoredScore>,
    pub bundles: Vec<StoredBundle>,
}

impl OrgRecords {
    /// How many of each kind (what a move checks on both sides, and audits).
    pub fn counts(&self) -> Removed {
        let n = |len: usize| i64::try_from(len).unwrap_or(i64::MAX);
        Removed {
            assessments: n(self.assessments.len()),
            readiness: n(self.readiness.len()),
            scores: n(self.scores.len()),
            bundles: n(self.bundles.len()),
            stripped: 0,
        }
    }
}

/// Where each kind of an org's data ends (records stored before these are past retention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cutoffs {
    pub assessments: i64,
    pub scores: i64,
    pub bundles: i64,
}

/// What a change removes, with how many records of each kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub assessments: i64,
    pub readiness: i64,
    pub scores: i64,
    pub bundles: i64,
    /// Stored records whose values of stripped classes were removed.
    pub stripped: i64,
}

/// A purge as insights-svc carries it out (from the policy's purge instruction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeSpec {
    pub purge_id: String,
    pub org_id: String,
    /// One subject (instance scope) or the whole org.
    pub subject: Option<String>,
    /// Metrics are no longer allowed: the health data made from them goes.
    pub delete_scores: bool,
    /// Nothing is allowed any more: assessments, readiness and bundles go too.
    pub delete_uploads: bool,
    /// Classes whose values are removed from stored assessments and readiness reports.
    pub strip_classes: Vec<i32>,
}

/// An audited change of insights-svc, staged as JSON until its audit entry is in the org's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Retention: removes the org's records older than the cut-offs.
    Sweep {
        org_id: String,
        cutoffs: Cutoffs,
    },
    Purge(PurgeSpec),
    /// A residency move of support bundles within one database: the org's bundle records at
    /// `from` now say `to` (their files were copied there before this is staged). Staged as
    /// `relocate` by earlier versions.
    #[serde(alias = "relocate")]
    MoveInPlace {
        move_id: String,
        org_id: String,
        from: String,
        to: String,
    },
    /// A residency move out of this store: the org's records of `part` were copied to the new
    /// location's store (and checked there) before this is staged; applying it deletes them here.
    MoveOut {
        move_id: String,
        org_id: String,
        #[serde(flatten)]
        part: Part,
    },
}

impl Change {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(payload: &str) -> Result<Self, ChangeLogError> {
        serde_json::from_str(payload)
            .map_err(|e| ChangeLogError::Refused(format!("staged change does not decode: {e}")))
    }
}

#[async_trait]
pub trait InsightsStore: ChangeLog + Send + Sync + std::fmt::Debug {
    /// After a purge: no file keeps a readable copy of what was deleted (SQLite: VACUUM, the WAL
    /// truncated).
    async fn forget_deleted(&self) -> StoreResult<()>;
    async fn put_assessment(&self, assessment: &StoredAssessment) -> StoreResult<()>;
    /// The newest assessment of a subject.
    async fn latest_assessment(
        &self,
        org_id: &str,
        subject: &str,
    ) -> StoreResult<Option<StoredAssessment>>;

    async fn put_readiness(&self, readiness: &StoredReadiness) -> StoreResult<()>;
    async fn readiness(&self, org_id: &str, subject: &str) -> StoreResult<Option<StoredReadiness>>;
    /// Readiness scores of the org's subjects among `subjects`.
    async fn readiness_scores(
        &self,
        org_id: &str,
        subjects: &[String],
    ) -> StoreResult<HashMap<String, i64>>;

    /// Keeps a score (replacing one at the same time).
    async fn put_score(
        &self,
        org_id: &str,
        subject: &str,
        at: i64,
        score: i64,
        rules_version: &str,
        source: i64,
    ) -> StoreResult<()>;
    /// Scores of a subject within [from, to), oldest first.
    async fn scores(
        &self,
        org_id: &str,
        subject: &str,
        from: i64,
        to: i64,
    ) -> StoreResult<Vec<(i64, i64)>>;
    /// The newest score (at, score) of each of the org's subjects among `subjects`.
    async fn latest_scores(
        &self,
        org_id: &str,
        subjects: &[String],
    ) -> StoreResult<HashMap<String, (i64, i64)>>;

    async fn put_bundle(&self, bundle: &StoredBundle) -> StoreResult<()>;
    async fn bundles(&self, org_id: &str) -> StoreResult<Vec<StoredBundle>>;
    /// Every bundle's (location, file name), to find files with no record.
    async fn bundle_files(&self) -> StoreResult<Vec<(String, String)>>;

    /// What a sweep would remove, and the bundles (location, file name) it would remove.
    async fn sweep_counts(
        &self,
        org_id: &str,
        cutoffs: &Cutoffs,
    ) -> StoreResult<(Removed, Vec<(String, String)>)>;
    /// What a purge would remove or strip, and the bundles it would remove.
    async fn purge_counts(&self, spec: &PurgeSpec)
    -> StoreResult<(Removed, Vec<(String, String)>)>;
    async fn purge_applied(&self, purge_id: &str) -> StoreResult<bool>;
    /// Whether a move was carried out (or is staged) here.
    async fn move_applied(&self, move_id: &str) -> StoreResult<bool>;
    /// The org's records of `part` held here.
    async fn org_records(&self, org_id: &str, part: &Part) -> StoreResult<OrgRecords>;
    /// Takes records copied from another location's store, in one transaction; a record held
    /// already is kept as it is (a move started over copies again).
    async fn import(&self, records: &OrgRecords) -> StoreResult<()>;
    /// Orgs with any record (for the retention sweep).
    async fn orgs(&self) -> StoreResult<Vec<String>>;
}

#[cfg(test)]
mod change_tests {
    use super::Change;

    #[test]
    fn a_move_staged_under_its_earlier_name_still_decodes() {
        let staged =
            r#"{"kind":"relocate","move_id":"m1","org_id":"o1","from":"global","to":"eu"}"#;
        assert_eq!(
            Change::decode(staged).unwrap(),
            Change::MoveInPlace {
                move_id: "m1".into(),
                org_id: "o1".into(),
                from: "global".into(),
                to: "eu".into(),
            }
        );
    }
}
