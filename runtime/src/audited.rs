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
//! Resolving fences a key whose entry is not in the log, so a recovery pass must never resolve a
//! change whose append may still land: that would fail a call that was about to succeed. A pass
//! leaves alone what this process is committing right now, and a scheduled pass also what is
//! younger than [`COMMIT_LEASE`] (another replica on the same store may be committing it: its
//! append ends within the lease, or is refused by linker-svc at its deadline).
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
    /// Another replica, settling the org before a change of its own, took this change for
    /// abandoned while its audit entry was on its way: nothing changed. A pass that races other
    /// replicas for the same work leaves it to the one that goes on; a call may try again.
    #[error(
        "the change was settled as not made while its audit entry was on its way; nothing changed, try again"
    )]
    Superseded,
}

impl From<CommitError> for tonic::Status {
    fn from(error: CommitError) -> Self {
        match &error {
            CommitError::DeadlineExceeded => tonic::Status::deadline_exceeded(error.to_string()),
            CommitError::OrgNotFound => tonic::Status::not_found("org_id: no such org"),
            CommitError::Unavailable { .. } | CommitError::Superseded => {
                tonic::Status::unavailable(error.to_string())
            }
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
    /// Left to their committer: in flight in this process, or (on a scheduled pass) younger than
    /// the lease.
    pub in_flight: u32,
    /// Orgs whose state changed (a change was applied): their services publish anew.
    pub changed_orgs: Vec<String>,
}

/// The longest an append may take, counted from the start of its commit (staging included).
pub const APPEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long after it was staged (by its `staged_at_ms`) a change may still be in flight on some
/// replica: the append's limit, and a margin for the request in transit and for the replicas' clocks.
/// A scheduled recovery pass settles only older changes.
pub const COMMIT_LEASE: Duration = APPEND_TIMEOUT.saturating_add(Duration::from_secs(5));

/// The changes this process is committing (staged, their append not answered yet).
#[derive(Debug, Clone, Default)]
struct InFlight(Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl InFlight {
    fn ids(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks `change_id` in flight until the returned guard drops (the commit ended or was cancelled).
    fn enter(&self, change_id: &str) -> InFlightGuard {
        self.ids().insert(change_id.to_owned());
        InFlightGuard {
            set: self.clone(),
            change_id: change_id.to_owned(),
        }
    }

    fn contains(&self, change_id: &str) -> bool {
        self.ids().contains(change_id)
    }
}

struct InFlightGuard {
    set: InFlight,
    change_id: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.set.ids().remove(&self.change_id);
    }
}

/// Which staged changes a settling pass may resolve (besides never those in flight here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Every one: an org's earlier changes, before its next one is made.
    All,
    /// Those staged at this time (ms) or before: the rest may be in flight on another replica.
    StagedBefore(i64),
}

/// Runs the protocol.
#[derive(Debug, Clone)]
pub struct Auditor {
    log: Arc<dyn AuditLog>,
    /// Time kept back from a call's deadline for applying the change after the append.
    margin: Duration,
    /// The longest an append may take, from the start of its commit.
    append_timeout: Duration,
    resolve_timeout: Duration,
    in_flight: InFlight,
}

impl Auditor {
    pub fn new(log: Arc<dyn AuditLog>) -> Self {
        Self {
            log,
            margin: Duration::from_millis(20),
            append_timeout: APPEND_TIMEOUT,
            resolve_timeout: Duration::from_secs(2),
            in_flight: InFlight::default(),
        }
    }

    /// Stages, appends and applies one change; see the module docs. Call with the org's earlier
    /// staged changes settled ([`Auditor::settle_org`]), and with the change made now (its
    /// `staged_at_ms` starts its lease).
    pub async fn commit(
        &self,
        changes: &dyn ChangeLog,
        change: StagedChange,
        deadline: Option<Instant>,
    ) -> Result<(), CommitError> {
        let started = Instant::now();
        let Some(budget) = self.budget(deadline) else {
            return Err(CommitError::DeadlineExceeded);
        };
        let _in_flight = self.in_flight.enter(&change.change_id);
        changes.stage(&change).await.map_err(CommitError::Store)?;
        // The append ends within the budget counted from the start, not from now: staging took part
        // of it, and the deadline and the lease do not move.
        let budget = match budget.checked_sub(started.elapsed()) {
            Some(left) if left > self.margin => left,
            _ => {
                self.discard(changes, &change).await?;
                return Err(if deadline.is_some_and(|d| Instant::now() >= d) {
                    CommitError::DeadlineExceeded
                } else {
                    CommitError::Unavailable {
                        message: "the store took the time the audit log needed".into(),
                        settling: false,
                    }
                });
            }
        };
        let appended = self
            .log
            .append(&change.entry, &change.change_id, budget)
            .await;
        let logged = match appended {
            // Fenced before the append arrived: a recovery pass (of another replica, at its start or
            // settling the org) took the change for abandoned.
            Ok(Logged::Fenced) => {
                self.discard(changes, &change).await?;
                return Err(CommitError::Superseded);
            }
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
        let settled = self.settle(changes, Some(org_id), Reach::All).await?;
        if settled.unresolved > 0 || settled.in_flight > 0 {
            return Err(CommitError::Unavailable {
                message: "an earlier change of this org is not settled yet".into(),
                settling: true,
            });
        }
        Ok(settled)
    }

    /// Settles every staged change it can whose commit has ended: at start, and on a schedule.
    /// `now_ms` is the service clock's time; changes staged within [`COMMIT_LEASE`] of it are left
    /// to their committer, here or on another replica.
    pub async fn recover(
        &self,
        changes: &dyn ChangeLog,
        now_ms: i64,
    ) -> Result<Settled, CommitError> {
        let lease = i64::try_from(COMMIT_LEASE.as_millis()).unwrap_or(i64::MAX);
        self.settle(
            changes,
            None,
            Reach::StagedBefore(now_ms.saturating_sub(lease)),
        )
        .await
    }

    async fn settle(
        &self,
        changes: &dyn ChangeLog,
        org_id: Option<&str>,
        reach: Reach,
    ) -> Result<Settled, CommitError> {
        let mut settled = Settled::default();
        for change in changes.staged(org_id).await.map_err(CommitError::Store)? {
            let young =
                matches!(reach, Reach::StagedBefore(before) if change.staged_at_ms > before);
            if young || self.in_flight.contains(&change.change_id) {
                settled.in_flight += 1;
                continue;
            }
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
        if settled.applied + settled.discarded + settled.unresolved > 0 {
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

    /// A store's staged changes and applied changes, in memory.
    #[derive(Debug, Default)]
    struct Changes {
        staged: std::sync::Mutex<Vec<StagedChange>>,
        applied: std::sync::Mutex<Vec<String>>,
        /// How long staging takes.
        stage_takes: Duration,
    }

    #[async_trait]
    impl ChangeLog for Changes {
        async fn stage(&self, change: &StagedChange) -> Result<(), ChangeLogError> {
            tokio::time::sleep(self.stage_takes).await;
            self.staged.lock().unwrap().push(change.clone());
            Ok(())
        }
        async fn apply(&self, change: &StagedChange) -> Result<(), ChangeLogError> {
            let mut staged = self.staged.lock().unwrap();
            if let Some(at) = staged.iter().position(|c| c.change_id == change.change_id) {
                staged.remove(at);
                self.applied.lock().unwrap().push(change.change_id.clone());
            }
            Ok(())
        }
        async fn discard(&self, change_id: &str) -> Result<(), ChangeLogError> {
            self.staged
                .lock()
                .unwrap()
                .retain(|c| c.change_id != change_id);
            Ok(())
        }
        async fn staged(&self, _: Option<&str>) -> Result<Vec<StagedChange>, ChangeLogError> {
            Ok(self.staged.lock().unwrap().clone())
        }
    }

    /// An audit log whose appends wait for `open` once they have arrived (`arrived`).
    #[derive(Debug)]
    struct HeldLog {
        /// Key → whether it is in the log (true) or fenced (false).
        keys: std::sync::Mutex<std::collections::HashMap<String, bool>>,
        arrived: tokio::sync::Notify,
        open: tokio::sync::Semaphore,
        appends: std::sync::atomic::AtomicU32,
    }

    impl Default for HeldLog {
        fn default() -> Self {
            Self {
                keys: Default::default(),
                arrived: tokio::sync::Notify::new(),
                open: tokio::sync::Semaphore::new(0),
                appends: Default::default(),
            }
        }
    }

    #[async_trait]
    impl AuditLog for HeldLog {
        async fn append(
            &self,
            _: &AuditEntry,
            key: &str,
            _: Duration,
        ) -> Result<Logged, AuditLogError> {
            self.appends
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.arrived.notify_one();
            drop(self.open.acquire().await.unwrap());
            let mut keys = self.keys.lock().unwrap();
            Ok(match *keys.entry(key.to_owned()).or_insert(true) {
                true => Logged::Appended,
                false => Logged::Fenced,
            })
        }
        async fn resolve(&self, _: &str, key: &str, _: Duration) -> Result<Logged, AuditLogError> {
            let mut keys = self.keys.lock().unwrap();
            Ok(match *keys.entry(key.to_owned()).or_insert(false) {
                true => Logged::Appended,
                false => Logged::Fenced,
            })
        }
    }

    fn change(staged_at_ms: i64) -> StagedChange {
        StagedChange::new(
            AuditEntry {
                org_id: "org".into(),
                actor: "admin".into(),
                action: "test.changed".into(),
                target: "t".into(),
                attributes: BTreeMap::new(),
            },
            "{}".into(),
            staged_at_ms,
        )
    }

    const LEASE_MS: i64 = COMMIT_LEASE.as_millis() as i64;

    /// A change being committed, its append arrived at the log and held there.
    async fn commit_held() -> (
        Arc<HeldLog>,
        Auditor,
        Arc<Changes>,
        StagedChange,
        tokio::task::JoinHandle<Result<(), CommitError>>,
    ) {
        let log = Arc::new(HeldLog::default());
        let auditor = Auditor::new(log.clone());
        let changes = Arc::new(Changes::default());
        let made = change(1_000);
        let committing = tokio::spawn({
            let (auditor, changes, made) = (auditor.clone(), changes.clone(), made.clone());
            async move { auditor.commit(changes.as_ref(), made, None).await }
        });
        log.arrived.notified().await;
        (log, auditor, changes, made, committing)
    }

    #[tokio::test]
    async fn no_recovery_pass_fences_a_change_this_process_is_committing() {
        let (log, auditor, changes, made, committing) = commit_held().await;
        // Its append is on its way: a scheduled pass long past its lease, and the org's settling
        // before another change, both leave it to its committer.
        let settled = auditor
            .recover(changes.as_ref(), 1_000 + 10 * LEASE_MS)
            .await
            .unwrap();
        assert_eq!(
            (settled.in_flight, settled.discarded),
            (1, 0),
            "{settled:?}"
        );
        assert!(matches!(
            auditor.settle_org(changes.as_ref(), "org").await,
            Err(CommitError::Unavailable { settling: true, .. })
        ));
        log.open.add_permits(1);
        committing.await.unwrap().unwrap();
        assert_eq!(*changes.applied.lock().unwrap(), vec![made.change_id]);
        assert!(changes.staged.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_change_another_replica_fenced_first_is_discarded_and_the_call_says_so() {
        let (log, _auditor, changes, made, committing) = commit_held().await;
        let fenced = log
            .resolve("org", &made.change_id, Duration::from_secs(1))
            .await;
        assert_eq!(fenced, Ok(Logged::Fenced));
        log.open.add_permits(1);
        let Err(CommitError::Superseded) = committing.await.unwrap() else {
            panic!("a fenced change is not applied");
        };
        assert!(changes.staged.lock().unwrap().is_empty());
        assert!(changes.applied.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_scheduled_pass_settles_a_change_only_once_its_lease_has_run_out() {
        let log = Arc::new(HeldLog::default());
        let auditor = Auditor::new(log.clone());
        let changes = Changes::default();
        // Left staged by a crash (or in flight on another replica): one whose entry made it, one
        // whose entry did not.
        let logged = change(1_000);
        let lost = change(1_000);
        log.keys
            .lock()
            .unwrap()
            .insert(logged.change_id.clone(), true);
        changes.stage(&logged).await.unwrap();
        changes.stage(&lost).await.unwrap();
        let young = auditor
            .recover(&changes, 1_000 + LEASE_MS - 1)
            .await
            .unwrap();
        assert_eq!((young.in_flight, young.applied, young.discarded), (2, 0, 0));
        assert!(
            !log.keys.lock().unwrap().contains_key(&lost.change_id),
            "nothing fenced within the lease"
        );
        let old = auditor.recover(&changes, 1_000 + LEASE_MS).await.unwrap();
        assert_eq!(
            (old.in_flight, old.applied, old.discarded),
            (0, 1, 1),
            "{old:?}"
        );
        assert_eq!(*changes.applied.lock().unwrap(), vec![logged.change_id]);
        assert_eq!(log.keys.lock().unwrap().get(&lost.change_id), Some(&false));
    }

    #[tokio::test]
    async fn an_org_settles_its_earlier_changes_whatever_their_age() {
        let log = Arc::new(HeldLog::default());
        let auditor = Auditor::new(log.clone());
        let changes = Changes::default();
        let lost = change(1_000);
        changes.stage(&lost).await.unwrap();
        let settled = auditor.settle_org(&changes, "org").await.unwrap();
        assert_eq!((settled.discarded, settled.in_flight), (1, 0));
    }

    #[tokio::test]
    async fn staging_spends_the_appends_budget() {
        let log = Arc::new(HeldLog::default());
        log.open.add_permits(1);
        let auditor = Auditor::new(log.clone());
        let changes = Changes {
            stage_takes: Duration::from_millis(300),
            ..Changes::default()
        };
        let deadline = Instant::now() + Duration::from_millis(200);
        let outcome = auditor
            .commit(&changes, change(1_000), Some(deadline))
            .await;
        assert_eq!(outcome, Err(CommitError::DeadlineExceeded));
        assert_eq!(log.appends.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(changes.staged.lock().unwrap().is_empty(), "discarded");
        assert!(changes.applied.lock().unwrap().is_empty());
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
