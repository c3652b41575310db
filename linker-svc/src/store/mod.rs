//! linker-svc's storage: the [`LinkerStore`] trait, implemented once ([`SqlStore`]) for SQLite and
//! PostgreSQL through the runtime's SQL shim (`sightline_runtime::sql`). Every mutating method
//! writes its audit entry in the same transaction, so an action whose audit entry cannot be written
//! does not happen.
//!
//! The store maps database errors to [`StoreError`]; handlers never see `sqlx::Error`.

mod sql;

use std::collections::BTreeMap;

use async_trait::async_trait;
use sightline_runtime::storage::{self, DbFailure, Migrations, StorageError};

pub use sql::SqlStore;

pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE_MIGRATIONS,
    postgres: &POSTGRES_MIGRATIONS,
};

/// Opens the store at `url` (SQLite or PostgreSQL) and runs migrations.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn LinkerStore>, StorageError> {
    Ok(std::sync::Arc::new(SqlStore::new(
        storage::connect(url, MIGRATIONS).await?,
    )))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    #[error("{0}")]
    Precondition(&'static str),
    #[error("link key rejected: {0}")]
    LinkKeyRejected(LinkKeyRejection),
    #[error("the deadline leaves no time to commit the change")]
    DeadlineExceeded,
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

/// Why a link key could not link an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKeyRejection {
    Unknown,
    Revoked,
    Expired,
}

impl std::fmt::Display for LinkKeyRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkKeyRejection::Unknown => "unknown link key",
            LinkKeyRejection::Revoked => "link key has been revoked",
            LinkKeyRejection::Expired => "link key has expired",
        })
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match storage::classify(&error) {
            DbFailure::UniqueViolation => StoreError::AlreadyExists("record"),
            DbFailure::ForeignKeyViolation => StoreError::NotFound("referenced record"),
            DbFailure::Unavailable => StoreError::Unavailable(error),
            DbFailure::Other => StoreError::Database(error),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OrgRecord {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AdminTokenRecord {
    pub id: String,
    pub org_id: String,
    pub label: String,
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LinkKeyRecord {
    pub id: String,
    pub org_id: String,
    pub label: String,
    pub prefix: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub replaces_key_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InstanceRecord {
    pub id: String,
    pub org_id: String,
    pub server_id: String,
    pub base_url: String,
    pub product: String,
    pub version: String,
    pub license_sen: String,
    pub node_count: i64,
    pub link_key_id: String,
    pub linked_at: i64,
    pub unlinked_at: Option<i64>,
}

/// An instance's detection and connection metadata: it lives in the store of the org's data
/// location (SPEC E10), apart from the instance's identity row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InstanceFacts {
    pub instance_id: String,
    pub org_id: String,
    pub base_url: String,
    pub product: String,
    pub version: String,
    pub license_sen: String,
    pub node_count: i64,
}

impl InstanceFacts {
    /// The metadata `instance` carries.
    pub fn of(instance: &InstanceRecord) -> Self {
        Self {
            instance_id: instance.id.clone(),
            org_id: instance.org_id.clone(),
            base_url: instance.base_url.clone(),
            product: instance.product.clone(),
            version: instance.version.clone(),
            license_sen: instance.license_sen.clone(),
            node_count: instance.node_count,
        }
    }

    /// Fills `instance`'s metadata from these facts.
    pub fn fill(&self, instance: &mut InstanceRecord) {
        instance.base_url.clone_from(&self.base_url);
        instance.product.clone_from(&self.product);
        instance.version.clone_from(&self.version);
        instance.license_sen.clone_from(&self.license_sen);
        instance.node_count = self.node_count;
    }
}

/// An org's instance metadata in one store: what a residency move carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrgFacts {
    pub facts: Vec<InstanceFacts>,
    pub app_links: Vec<AppLinkRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CredentialRecord {
    pub id: String,
    pub org_id: String,
    pub instance_id: String,
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AppLinkRecord {
    pub instance_id: String,
    pub url: String,
    pub product_family: String,
    pub server_id: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DomainRecord {
    pub org_id: String,
    pub domain: String,
    pub token: String,
    pub claimed_at: i64,
    pub verified_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LicenseRecord {
    pub sen: String,
    pub product: String,
    pub domain: String,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRecord {
    pub org_id: String,
    pub seq: i64,
    pub occurred_at: i64,
    pub actor: String,
    pub service: String,
    pub action: String,
    pub target: String,
    /// Compact JSON with sorted keys, exactly as hashed.
    pub attributes: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// An audit entry before it has a place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditDraft {
    /// When the action happened, Unix milliseconds.
    pub at: i64,
    pub actor: String,
    pub service: String,
    pub action: String,
    pub target: String,
    pub attributes: BTreeMap<String, String>,
    /// When the call recording it must be done by: the change is refused, rather than committed
    /// after its caller stopped waiting, when less than [`COMMIT_MARGIN`] is left.
    pub deadline: Option<std::time::Instant>,
    /// The sealed first answer to keep for retries of the same request, written with the entry.
    pub reply: Option<IdempotentReply>,
}

/// A first answer kept for retries (`runtime::idempotency`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentReply {
    pub method: &'static str,
    /// The digest of the request id.
    pub request_key: String,
    pub sealed: Vec<u8>,
}

/// Time kept back from a call's deadline for writing and committing its change.
pub const COMMIT_MARGIN: std::time::Duration = std::time::Duration::from_millis(20);

impl AuditDraft {
    pub fn new(at: i64, actor: impl Into<String>, action: &str, target: impl Into<String>) -> Self {
        Self {
            at,
            actor: actor.into(),
            service: "linker".to_owned(),
            action: action.to_owned(),
            target: target.into(),
            attributes: BTreeMap::new(),
            deadline: None,
            reply: None,
        }
    }

    pub fn until(mut self, deadline: std::time::Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.attributes.insert(key.to_owned(), value.into());
        self
    }
}

/// A secret about to be stored: its record and its digest.
#[derive(Debug, Clone)]
pub struct NewSecret<R> {
    pub record: R,
    pub digest: [u8; 32],
}

/// What LinkInstance stores in the identity store. The instance's metadata is not kept there (it
/// goes to the store of the org's location, [`LinkerStore::put_instance_facts`]); the outcome
/// carries it back as given.
#[derive(Debug, Clone)]
pub struct NewLink {
    /// Used when the server id is not linked in the org yet.
    pub instance: InstanceRecord,
    pub credential: NewSecret<CredentialRecord>,
}

#[derive(Debug, Clone)]
pub struct LinkOutcome {
    pub instance: InstanceRecord,
    pub credential: CredentialRecord,
    /// Whether an instance with this server id was linked already (and its credentials revoked).
    pub relinked: bool,
    /// When the link key used expires (ms): the companion warns before it must link again.
    pub link_key_expires_at: i64,
}

/// A token found by its digest, with what decides whether it may still be used.
#[derive(Debug, Clone)]
pub struct FoundCredential {
    pub record: CredentialRecord,
    pub digest: Vec<u8>,
    pub instance_unlinked: bool,
}

#[derive(Debug, Clone)]
pub struct FoundAdminToken {
    pub record: AdminTokenRecord,
    pub digest: Vec<u8>,
}

/// The chain head kept on the org row, to detect a removed last entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    pub seq: i64,
    pub hash: Vec<u8>,
}

/// What an append with an idempotency key did (audit.proto `AppendOutcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyedAppend {
    Appended(AuditRecord),
    AlreadyAppended(AuditRecord),
    Fenced,
}

/// What detection works from.
#[derive(Debug, Clone, Default)]
pub struct DetectionInputs {
    pub verified_domains: Vec<String>,
    /// Licenses whose domain is a verified domain or under one.
    pub licenses: Vec<LicenseRecord>,
    /// The org's linked instances (identity rows; their metadata is filled from the org's
    /// location before detection runs).
    pub linked_instances: Vec<InstanceRecord>,
    pub app_links: Vec<AppLinkRecord>,
}

#[async_trait]
pub trait LinkerStore: Send + Sync + std::fmt::Debug + 'static {
    async fn create_org(
        &self,
        org: &OrgRecord,
        audit: AuditDraft,
        genesis: [u8; 32],
    ) -> StoreResult<()>;
    async fn get_org(&self, org_id: &str) -> StoreResult<Option<OrgRecord>>;
    /// Orgs by id, after `after_id`, at most `limit`.
    async fn list_orgs(&self, after_id: Option<&str>, limit: i64) -> StoreResult<Vec<OrgRecord>>;

    async fn insert_admin_token(
        &self,
        token: &NewSecret<AdminTokenRecord>,
        audit: AuditDraft,
    ) -> StoreResult<()>;
    async fn revoke_admin_token(
        &self,
        org_id: &str,
        token_id: &str,
        audit: AuditDraft,
    ) -> StoreResult<AdminTokenRecord>;
    async fn list_admin_tokens(
        &self,
        org_id: &str,
        after_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<AdminTokenRecord>>;
    async fn find_admin_token(&self, digest: &[u8; 32]) -> StoreResult<Option<FoundAdminToken>>;
    async fn touch_admin_token(&self, token_id: &str, at: i64) -> StoreResult<()>;

    async fn insert_link_key(
        &self,
        key: &NewSecret<LinkKeyRecord>,
        audit: AuditDraft,
    ) -> StoreResult<()>;
    /// Revokes `old_key_id` and stores its replacement; returns the revoked key.
    async fn regenerate_link_key(
        &self,
        org_id: &str,
        old_key_id: &str,
        new_key: &NewSecret<LinkKeyRecord>,
        audit: AuditDraft,
    ) -> StoreResult<LinkKeyRecord>;
    async fn list_link_keys(
        &self,
        org_id: &str,
        after_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<LinkKeyRecord>>;

    /// Checks the key (digest, revocation, expiry at `link.instance.linked_at`) and links.
    async fn link_instance(&self, key_digest: &[u8; 32], link: NewLink)
    -> StoreResult<LinkOutcome>;
    async fn list_instances(
        &self,
        org_id: &str,
        after_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<InstanceRecord>>;
    async fn get_instance(
        &self,
        org_id: &str,
        instance_id: &str,
    ) -> StoreResult<Option<InstanceRecord>>;
    async fn credentials_of(&self, instance_ids: &[String]) -> StoreResult<Vec<CredentialRecord>>;
    /// Stores an instance's metadata and app links (replacing what it had) in this location's
    /// store.
    async fn put_instance_facts(
        &self,
        facts: &InstanceFacts,
        app_links: &[AppLinkRecord],
    ) -> StoreResult<()>;
    async fn instance_facts_of(&self, instance_ids: &[String]) -> StoreResult<Vec<InstanceFacts>>;
    async fn app_links_of(&self, instance_ids: &[String]) -> StoreResult<Vec<AppLinkRecord>>;
    /// All of the org's instance metadata held here.
    async fn org_facts(&self, org_id: &str) -> StoreResult<OrgFacts>;
    /// Adds an org's instance metadata copied from another location (what is there already stays).
    async fn import_facts(&self, facts: &OrgFacts) -> StoreResult<()>;
    /// Deletes all of the org's instance metadata held here; returns how many rows went.
    async fn delete_org_facts(&self, org_id: &str) -> StoreResult<u64>;
    /// Makes deleted rows unreadable in the file (SQLite: VACUUM and a truncating checkpoint).
    async fn forget_deleted(&self) -> StoreResult<()>;
    async fn unlink_instance(
        &self,
        org_id: &str,
        instance_id: &str,
        audit: AuditDraft,
    ) -> StoreResult<InstanceRecord>;

    async fn find_credential(&self, digest: &[u8; 32]) -> StoreResult<Option<FoundCredential>>;
    async fn touch_credential(&self, credential_id: &str, at: i64) -> StoreResult<()>;
    async fn revoke_credential(
        &self,
        org_id: &str,
        credential_id: &str,
        audit: AuditDraft,
    ) -> StoreResult<CredentialRecord>;

    /// Records a claim, or returns the org's existing claim of the domain unchanged.
    async fn claim_domain(
        &self,
        claim: &DomainRecord,
        audit: AuditDraft,
    ) -> StoreResult<DomainRecord>;
    async fn get_domain(&self, org_id: &str, domain: &str) -> StoreResult<Option<DomainRecord>>;
    async fn mark_domain_verified(
        &self,
        org_id: &str,
        domain: &str,
        audit: AuditDraft,
    ) -> StoreResult<DomainRecord>;

    /// Inserts or replaces licenses by SEN; returns (inserted, updated).
    async fn import_licenses(&self, licenses: &[LicenseRecord], at: i64)
    -> StoreResult<(u32, u32)>;
    async fn detection_inputs(&self, org_id: &str) -> StoreResult<DetectionInputs>;

    async fn append_audit(&self, org_id: &str, audit: AuditDraft) -> StoreResult<AuditRecord>;
    /// Appends `audit` as the entry of `key` unless the key is in the log already (then returns
    /// that entry) or fenced.
    async fn append_audit_keyed(
        &self,
        org_id: &str,
        audit: AuditDraft,
        key: &str,
    ) -> StoreResult<KeyedAppend>;
    /// The key's entry if it is in the log; otherwise fences the key (at `now`) and says so.
    async fn resolve_audit_key(
        &self,
        org_id: &str,
        key: &str,
        now: i64,
    ) -> StoreResult<KeyedAppend>;
    async fn list_audit(
        &self,
        org_id: &str,
        after_seq: i64,
        limit: i64,
        action_prefix: &str,
    ) -> StoreResult<Vec<AuditRecord>>;
    async fn audit_head(&self, org_id: &str) -> StoreResult<Option<AuditHead>>;
    /// The sealed first answer of a request, when one was kept since `since` (Unix ms).
    async fn replay(
        &self,
        org_id: &str,
        method: &str,
        request_key: &str,
        since: i64,
    ) -> StoreResult<Option<Vec<u8>>>;
}

#[cfg(test)]
mod conformance;
