//! Audited changes: the protocol that keeps a service's store and the org's audit log (in linker-svc)
//! in agreement whatever happens to a call — a crash at any point, a timeout, a cancelled client,
//! linker-svc down. Every service that audits its changes (consent-svc now; collector-svc's purges and
//! erasures, insights-svc's retention) goes through [`Auditor`].
//!
//! The audit entry is the commit point:
//! 1. **stage** — the change is written durably to the service's own store as a staged change (its
//!    own short transaction: no database lock is held across the remote call). A staged change has
//!    no effect on what the service serves.
//! 2. **append** — its audit entry is appended with the change's id as idempotency key.
//! 3. **apply** — the change is applied and its staged row removed, in one transaction.
//!
//! When the append's outcome is unknown (a timeout, a reset connection, a crash before step 3), the
//! key is **resolved**: linker-svc either finds the entry (then the change is applied) or fences the
//! key so the entry can never be appended later (then the change is discarded). So a change is
//! applied exactly when its entry is in the log, and its entry appears once. Whatever a crash leaves
//! staged is settled by [`Auditor::recover`], at start and on a schedule; a service settles an org's
//! earlier staged changes before making a new one, so changes apply in order.
//!
//! A call whose deadline leaves too little time for the append is refused before anything is
//! appended (DEADLINE_EXCEEDED, nothing stored). A client that gives up while an append it started is
//! in flight may still see its change applied: no protocol can undo a commit the client stopped
//! waiting for, but the log and the store still agree.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sightline_proto::audit::v1::audit_service_client::AuditServiceClient;
use sightline_proto::audit::v1::{AppendEventRequest, AppendOutcome};
use tonic::Code;
use tonic::transport::Channel;

use crate::auth::authorize;
use crate::settings::Secret;

/// An entry for an org's audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub org_id: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub attributes: BTreeMap<String, String>,
}

/// A change written to a service's store but not applied yet (step 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedChange {
    /// Unique (UUIDv7); the audit entry's idempotency key.
    pub change_id: String,
    pub org_id: String,
    pub entry: AuditEntry,
    /// What the service needs to apply the change, in its own encoding (JSON).
    pub payload: String,
    pub staged_at_ms: i64,
}

impl StagedChange {
    /// A change to stage now (`staged_at_ms`), with a fresh id; its org is its entry's.
    pub fn new(entry: AuditEntry, payload: String, staged_at_ms: i64) -> Self {
        Self {
            change_id: uuid::Uuid::now_v7().to_string(),
            org_id: entry.org_id.clone(),
            entry,
            payload,
            staged_at_ms,
        }
    }
}

/// A staged change as a store's `staged_changes` table holds it:
/// (change_id, org_id, entry as JSON, payload, staged_at_ms).
pub type StagedRow = (String, String, String, String, i64);

/// The staged change of a `staged_changes` row.
pub fn staged_of(
    (change_id, org_id, entry, payload, staged_at_ms): StagedRow,
) -> Result<StagedChange, ChangeLogError> {
    Ok(StagedChange {
        change_id,
        org_id,
        entry: serde_json::from_str(&entry).map_err(|e| {
            ChangeLogError::Refused(format!("staged audit entry does not decode: {e}"))
        })?,
        payload,
        staged_at_ms,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeLogError {
    /// The database cannot be reached or did not answer.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The change cannot be applied as staged (a bug or a concurrent writer outside the protocol).
    #[error("store refused the change: {0}")]
    Refused(String),
    /// The org changed since this change was computed (on another replica, or another change of
    /// the org is being made): nothing was staged; read again and retry.
    #[error("{0}")]
    Concurrent(String),
}

/// What a service's store does for the protocol.
#[async_trait]
pub trait ChangeLog: Send + Sync + Debug {
    /// Writes a staged change durably.
    async fn stage(&self, change: &StagedChange) -> Result<(), ChangeLogError>;
    /// Applies a staged change and removes it, in one transaction. Applying a change that is no
    /// longer staged does nothing (so settling twice is harmless).
    async fn apply(&self, change: &StagedChange) -> Result<(), ChangeLogError>;
    /// Removes a staged change without applying it.
    async fn discard(&self, change_id: &str) -> Result<(), ChangeLogError>;
    /// Staged changes, oldest first: of one org, or of every org.
    async fn staged(&self, org_id: Option<&str>) -> Result<Vec<StagedChange>, ChangeLogError>;
}

/// What the audit log answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logged {
    /// The entry is in the log (now or before).
    Appended,
    /// The key is fenced: the entry is not in the log and never will be.
    Fenced,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditLogError {
    #[error("org not found")]
    OrgNotFound,
    /// Refused for good (e.g. invalid): the entry was not appended.
    #[error("refused: {0}")]
    Refused(String),
    /// No answer: the entry may or may not have been appended.
    #[error("no answer: {0}")]
    Unknown(String),
}

/// The org audit log, as the protocol uses it.
#[async_trait]
pub trait AuditLog: Send + Sync + Debug {
    async fn append(
        &self,
        entry: &AuditEntry,
        key: &str,
        timeout: Duration,
    ) -> Result<Logged, AuditLogError>;
    /// Finds the key's entry, or fences the key.
    async fn resolve(
        &self,
        org_id: &str,
        key: &str,
        timeout: Duration,
    ) -> Result<Logged, AuditLogError>;
}

/// Why a change was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("the deadline leaves no time to record the change")]
    DeadlineExceeded,
    #[error("org not found")]
    OrgNotFound,
    /// Nothing was applied; the message says why. When `settling` is set the change stays staged and
    /// is settled (applied or discarded, never both) once the audit log answers.
    #[error("the audit log cannot be written: {message}")]
    Unavailable { message: String, settling: bool },
    #[error("{0}")]
    Store(ChangeLogError),
}

impl From<CommitError> for tonic::Status {
    fn from(error: CommitError) -> Self {
        match &error {
            CommitError::DeadlineExceeded => tonic::Status::deadline_exceeded(error.to_string()),
            CommitError::OrgNotFound => tonic::Status::not_found("org_id: no such org"),
            CommitError::Unavailable { .. } => tonic::Status::unavailable(error.to_string()),
            CommitError::Store(ChangeLogError::Unavailable(_)) => {
                tonic::Status::unavailable(error.to_string())
            }
            CommitError::Store(ChangeLogError::Refused(_)) => {
                tonic::Status::internal("the change could not be stored")
            }
            CommitError::Store(ChangeLogError::Concurrent(why)) => tonic::Status::aborted(why),
        }
    }
}

/// What a recovery pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    pub applied: u32,
    pub discarded: u32,
    /// Left staged because the audit log or the store did not answer.
    pub unresolved: u32,
    /// Orgs whose state changed (a change was applied): their services publish anew.
    pub changed_orgs: Vec<String>,
}

/// Runs the protocol.
#[derive(Debug, Clone)]
pub struct Auditor {
    log: Arc<dyn AuditLog>,
    /// Time kept back from a call's deadline for applying the change after the append.
    margin: Duration,
    /// The longest an append may take.
    append_timeout: Duration,
    resolve_timeout: Duration,
}

impl Auditor {
    pub fn new(log: Arc<dyn AuditLog>) -> Self {
        Self {
            log,
            margin: Duration::from_millis(20),
            append_timeout: Duration::from_secs(10),
            resolve_timeout: Duration::from_secs(2),
        }
    }

    /// Stages, appends and applies one change; see the module docs. Call with the org's earlier
    /// staged changes settled ([`Auditor::settle_org`]).
    pub async fn commit(
        &self,
        changes: &dyn ChangeLog,
        change: StagedChange,
        deadline: Option<Instant>,
    ) -> Result<(), CommitError> {
        let Some(budget) = self.budget(deadline) else {
            return Err(CommitError::DeadlineExceeded);
        };
        changes.stage(&change).await.map_err(CommitError::Store)?;
        let appended = self
            .log
            .append(&change.entry, &change.change_id, budget)
            .await;
        let logged = match appended {
            Ok(logged) => Ok(logged),
            Err(AuditLogError::Unknown(why)) => {
                match self
                    .log
                    .resolve(&change.org_id, &change.change_id, self.resolve_timeout)
                    .await
                {
                    Ok(logged) => Ok(logged),
                    Err(AuditLogError::Unknown(_) | AuditLogError::Refused(_)) => {
                        return Err(CommitError::Unavailable {
                            message: why,
                            settling: true,
                        });
                    }
                    Err(AuditLogError::OrgNotFound) => Err(AuditLogError::OrgNotFound),
                }
            }
            Err(other) => Err(other),
        };
        match logged {
            Ok(Logged::Appended) => changes.apply(&change).await.map_err(CommitError::Store),
            Ok(Logged::Fenced) => {
                self.discard(changes, &change).await?;
                Err(if deadline.is_some_and(|d| Instant::now() >= d) {
                    CommitError::DeadlineExceeded
                } else {
                    CommitError::Unavailable {
                        message: "the audit log did not answer in time".into(),
                        settling: false,
                    }
                })
            }
            Err(AuditLogError::OrgNotFound) => {
                self.discard(changes, &change).await?;
                Err(CommitError::OrgNotFound)
            }
            Err(AuditLogError::Refused(why) | AuditLogError::Unknown(why)) => {
                self.discard(changes, &change).await?;
                Err(CommitError::Unavailable {
                    message: why,
                    settling: false,
                })
            }
        }
    }

    /// Settles the org's staged changes; fails when one cannot be settled yet (then no new change of
    /// the org may be made, or it could overtake an earlier one).
    pub async fn settle_org(
        &self,
        changes: &dyn ChangeLog,
        org_id: &str,
    ) -> Result<Settled, CommitError> {
        let settled = self.settle(changes, Some(org_id)).await?;
        if settled.unresolved > 0 {
            return Err(CommitError::Unavailable {
                message: "an earlier change of this org is not settled yet".into(),
                settling: true,
            });
        }
        Ok(settled)
    }

    /// Settles every staged change it can: at start, and on a schedule.
    pub async fn recover(&self, changes: &dyn ChangeLog) -> Result<Settled, CommitError> {
        self.settle(changes, None).await
    }

    async fn settle(
        &self,
        changes: &dyn ChangeLog,
        org_id: Option<&str>,
    ) -> Result<Settled, CommitError> {
        let mut settled = Settled::default();
        for change in changes.staged(org_id).await.map_err(CommitError::Store)? {
            match self
                .log
                .resolve(&change.org_id, &change.change_id, self.resolve_timeout)
                .await
            {
                Ok(Logged::Appended) => match changes.apply(&change).await {
                    Ok(()) => {
                        settled.applied += 1;
                        if !settled.changed_orgs.contains(&change.org_id) {
                            settled.changed_orgs.push(change.org_id.clone());
                        }
                    }
                    Err(_) => settled.unresolved += 1,
                },
                // An org that no longer exists has no log the change could be in.
                Ok(Logged::Fenced) | Err(AuditLogError::OrgNotFound) => {
                    changes
                        .discard(&change.change_id)
                        .await
                        .map_err(CommitError::Store)?;
                    settled.discarded += 1;
                }
                Err(AuditLogError::Unknown(_) | AuditLogError::Refused(_)) => {
                    settled.unresolved += 1;
                }
            }
        }
        if settled != Settled::default() {
            tracing::info!(
                applied = settled.applied,
                discarded = settled.discarded,
                unresolved = settled.unresolved,
                "staged changes settled"
            );
        }
        Ok(settled)
    }

    async fn discard(
        &self,
        changes: &dyn ChangeLog,
        change: &StagedChange,
    ) -> Result<(), CommitError> {
        changes
            .discard(&change.change_id)
            .await
            .map_err(CommitError::Store)
    }

    /// How long the append may take, or None when the deadline leaves too little.
    fn budget(&self, deadline: Option<Instant>) -> Option<Duration> {
        match deadline {
            None => Some(self.append_timeout),
            Some(deadline) => {
                let left = deadline.checked_duration_since(Instant::now())?;
                let budget = left.checked_sub(self.margin)?;
                (budget > self.margin).then(|| budget.min(self.append_timeout))
            }
        }
    }
}

/// The org audit log in linker-svc, called with a service token.
#[derive(Debug, Clone)]
pub struct LinkerAuditLog {
    client: AuditServiceClient<Channel>,
    service_token: Secret,
    /// The recording service's name, e.g. "consent".
    service: String,
}

impl LinkerAuditLog {
    pub fn new(linker: Channel, service_token: Secret, service: &str) -> Self {
        Self {
            client: AuditServiceClient::new(linker),
            service_token,
            service: service.to_owned(),
        }
    }

    async fn call(
        &self,
        request: AppendEventRequest,
        timeout: Duration,
    ) -> Result<Logged, AuditLogError> {
        let mut request = tonic::Request::new(request);
        authorize(&mut request, &self.service_token)
            .map_err(|e| AuditLogError::Refused(e.message().to_owned()))?;
        request.set_timeout(timeout);
        let answer = self.client.clone().append_event(request).await;
        let outcome = match &answer {
            Ok(reply) => match reply.get_ref().outcome() {
                AppendOutcome::Appended => "appended",
                AppendOutcome::AlreadyAppended => "already_appended",
                AppendOutcome::Fenced => "fenced",
                AppendOutcome::Unspecified => "unknown",
            },
            Err(_) => "failed",
        };
        metrics::counter!(
            crate::metrics::AUDIT_APPENDS,
            "service" => self.service.clone(),
            "outcome" => outcome
        )
        .increment(1);
        match answer {
            Ok(reply) => match reply.into_inner().outcome() {
                AppendOutcome::Appended | AppendOutcome::AlreadyAppended => Ok(Logged::Appended),
                AppendOutcome::Fenced => Ok(Logged::Fenced),
                AppendOutcome::Unspecified => Err(AuditLogError::Unknown(
                    "linker-svc answered without an outcome".into(),
                )),
            },
            Err(status) => Err(match status.code() {
                Code::NotFound => AuditLogError::OrgNotFound,
                // Refused before anything was appended.
                Code::InvalidArgument
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::ResourceExhausted => {
                    AuditLogError::Refused(format!("{:?}: {}", status.code(), status.message()))
                }
                _ => AuditLogError::Unknown(format!("{:?}: {}", status.code(), status.message())),
            }),
        }
    }
}

#[async_trait]
impl AuditLog for LinkerAuditLog {
    async fn append(
        &self,
        entry: &AuditEntry,
        key: &str,
        timeout: Duration,
    ) -> Result<Logged, AuditLogError> {
        self.call(
            AppendEventRequest {
                org_id: entry.org_id.clone(),
                actor: entry.actor.clone(),
                action: entry.action.clone(),
                target: entry.target.clone(),
                attributes: entry.attributes.clone().into_iter().collect(),
                service: self.service.clone(),
                idempotency_key: key.to_owned(),
                resolve_only: false,
            },
            timeout,
        )
        .await
    }

    async fn resolve(
        &self,
        org_id: &str,
        key: &str,
        timeout: Duration,
    ) -> Result<Logged, AuditLogError> {
        self.call(
            AppendEventRequest {
                org_id: org_id.to_owned(),
                idempotency_key: key.to_owned(),
                resolve_only: true,
                service: self.service.clone(),
                ..Default::default()
            },
            timeout,
        )
        .await
    }
}

/// The `staged_changes` table's rows, the same in every service that audits its changes. Each
/// service adds what is its own (claims, applying) around them.
pub mod staged_rows {
    use super::{ChangeLogError, StagedChange, StagedRow, staged_of};
    use crate::sql::{self, Database, Executor};

    fn db(error: sqlx::Error) -> ChangeLogError {
        match crate::storage::classify(&error) {
            crate::storage::DbFailure::Unavailable => {
                ChangeLogError::Unavailable(error.to_string())
            }
            _ => ChangeLogError::Refused(error.to_string()),
        }
    }

    /// Writes a staged change's row; a unique violation (a store that keeps one staged change per
    /// org) is [`ChangeLogError::Concurrent`].
    pub async fn insert(on: impl Executor, change: &StagedChange) -> Result<(), ChangeLogError> {
        let entry = serde_json::to_string(&change.entry)
            .map_err(|e| ChangeLogError::Refused(e.to_string()))?;
        sql::query(
            "INSERT INTO staged_changes (change_id, org_id, entry, payload, staged_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&change.change_id)
        .bind(&change.org_id)
        .bind(entry)
        .bind(&change.payload)
        .bind(change.staged_at_ms)
        .execute(on)
        .await
        .map_err(|error| match crate::storage::classify(&error) {
            // A store that keeps one staged change per org refuses a second one this way.
            crate::storage::DbFailure::UniqueViolation => ChangeLogError::Concurrent(
                "another change of the org is being made; retry".to_owned(),
            ),
            _ => db(error),
        })?;
        Ok(())
    }

    /// Removes a staged change's row; false when it was not there (settled already).
    pub async fn delete(on: impl Executor, change_id: &str) -> Result<bool, ChangeLogError> {
        let removed = sql::query("DELETE FROM staged_changes WHERE change_id = $1")
            .bind(change_id)
            .execute(on)
            .await
            .map_err(db)?;
        Ok(removed.rows_affected() > 0)
    }

    /// `applied_purges.applied_at` of a purge staged but not applied yet (its claim).
    pub const PURGE_CLAIMED: i64 = -1;

    /// Claims a purge as its change is staged (in the staging transaction): false when another
    /// purger (another pass, another replica) holds it or applied it, so a purge is applied and
    /// audited once. Applying the change turns the claim into the applied mark.
    pub async fn claim_purge(
        on: impl Executor,
        purge_id: &str,
        org_id: &str,
    ) -> Result<bool, ChangeLogError> {
        let claimed = sql::query(
            "INSERT INTO applied_purges (purge_id, org_id, applied_at, counts)
             VALUES ($1, $2, $3, '{}') ON CONFLICT (purge_id) DO NOTHING",
        )
        .bind(purge_id)
        .bind(org_id)
        .bind(PURGE_CLAIMED)
        .execute(on)
        .await
        .map_err(db)?;
        Ok(claimed.rows_affected() > 0)
    }

    /// Releases a purge's claim when its change is discarded (not applied): it may be claimed
    /// again.
    pub async fn release_purge(on: impl Executor, purge_id: &str) -> Result<(), ChangeLogError> {
        sql::query("DELETE FROM applied_purges WHERE purge_id = $1 AND applied_at = $2")
            .bind(purge_id)
            .bind(PURGE_CLAIMED)
            .execute(on)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Staged changes, oldest first: of one org, or of every org.
    pub async fn list(
        db_: &Database,
        org_id: Option<&str>,
    ) -> Result<Vec<StagedChange>, ChangeLogError> {
        const COLUMNS: &str = "change_id, org_id, entry, payload, staged_at";
        let rows: Vec<StagedRow> = match org_id {
            Some(org_id) => {
                sql::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM staged_changes WHERE org_id = $1 ORDER BY staged_at,
                        change_id"
                )))
                .bind(org_id)
                .fetch_all(db_)
                .await
            }
            None => {
                sql::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM staged_changes ORDER BY staged_at, change_id"
                )))
                .fetch_all(db_)
                .await
            }
        }
        .map_err(db)?;
        rows.into_iter().map(staged_of).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_too_close_leaves_no_budget() {
        let auditor = Auditor::new(Arc::new(NoLog));
        assert_eq!(auditor.budget(None), Some(Duration::from_secs(10)));
        assert!(
            auditor
                .budget(Some(Instant::now() + Duration::from_millis(2)))
                .is_none()
        );
        let roomy = auditor
            .budget(Some(Instant::now() + Duration::from_secs(1)))
            .unwrap();
        assert!(roomy < Duration::from_secs(1) && roomy > Duration::from_millis(900));
    }

    #[derive(Debug)]
    struct NoLog;

    #[async_trait]
    impl AuditLog for NoLog {
        async fn append(
            &self,
            _: &AuditEntry,
            _: &str,
            _: Duration,
        ) -> Result<Logged, AuditLogError> {
            Err(AuditLogError::Unknown("none".into()))
        }
        async fn resolve(&self, _: &str, _: &str, _: Duration) -> Result<Logged, AuditLogError> {
            Err(AuditLogError::Unknown("none".into()))
        }
    }
}
