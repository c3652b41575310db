//! The SQL of [`ConsentStore`], written once for SQLite and PostgreSQL (both take `$n`
//! placeholders, `ON CONFLICT … DO UPDATE` and `RETURNING`). SQLite write transactions take the
//! lock up front.

use async_trait::async_trait;

use sightline_runtime::audited::{ChangeLog, ChangeLogError, StagedChange, staged_rows};
use sightline_runtime::sql::{self, Database, Tx};

use super::{
    Change, ConsentRecord, ConsentStore, MoveRecord, OverrideRecord, PolicyStateRecord,
    PurgeRecord, ResidencyRecord, RetentionRecord, StagedPayload, StoreError, StoreResult,
    TrackingRecord,
};

fn db(error: sqlx::Error) -> ChangeLogError {
    StoreError::from(error).into()
}

const PURGE_COLUMNS: &str = "purge_id, org_id, scope, instance_id, delete_kinds, strip_classes,
    withdraw_metadata, withdraw_in_app_data, before_consent_version, before_revision, issued_at";
const RETENTION_COLUMNS: &str = "org_id, raw_days, assessment_days, aggregate_days, updated_at,
    score_history_days, support_bundle_days, event_id_days";

const CONSENT_COLUMNS: &str = "org_id, version, usage_level, sharing_level, contribute_metadata,
    contribute_in_app_data, compliance_restricted, actor, reason, created_at, receipt_payload,
    receipt_signature, key_id, request_key";

/// consent-svc's store on either backend.
#[derive(Debug, Clone)]
pub struct SqlStore {
    db: Database,
    /// This store's name among the replicas sharing its database.
    origin: String,
    /// Where applied changes are announced to the other replicas (PostgreSQL): one channel per
    /// database and schema, so stores in other schemas of the same server do not hear them.
    channel: Option<String>,
}

impl SqlStore {
    pub async fn new(db: Database) -> Result<Self, sqlx::Error> {
        let channel = match &db {
            Database::Sqlite(_) => None,
            Database::Postgres(_) => {
                let (place,): (String,) =
                    sql::query_as("SELECT current_database() || '.' || current_schema()")
                        .fetch_one(&db)
                        .await?;
                let digest = <sha2::Sha256 as sha2::Digest>::digest(place.as_bytes());
                Some(format!("sightline_policy_{}", hex::encode(&digest[..8])))
            }
        };
        Ok(Self {
            db,
            origin: uuid::Uuid::new_v4().simple().to_string(),
            channel,
        })
    }
}

/// What an applied change announces to the other replicas: its org, the instances whose policy it
/// changed, and which store applied it (that replica has told its own watchers).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Notice {
    pub origin: String,
    pub org_id: String,
    pub instance_ids: Vec<String>,
}

async fn write_change(tx: &mut Tx, change: &Change) -> StoreResult<()> {
    match change {
        Change::Consent(c) => {
            sql::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO consent_versions ({CONSENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6,
                    $7, $8, $9, $10, $11, $12, $13, $14)"
            )))
            .bind(&c.org_id)
            .bind(c.version)
            .bind(&c.usage_level)
            .bind(&c.sharing_level)
            .bind(c.contribute_metadata)
            .bind(c.contribute_in_app_data)
            .bind(c.compliance_restricted)
            .bind(&c.actor)
            .bind(&c.reason)
            .bind(c.created_at)
            .bind(&c.receipt_payload)
            .bind(&c.receipt_signature)
            .bind(&c.key_id)
            .bind(&c.request_key)
            .execute(&mut *tx)
            .await?;
        }
        Change::Override {
            org_id,
            instance_id,
            record: None,
        } => {
            sql::query("DELETE FROM instance_overrides WHERE org_id = $1 AND instance_id = $2")
                .bind(org_id)
                .bind(instance_id)
                .execute(&mut *tx)
                .await?;
        }
        Change::Override {
            record: Some(o), ..
        } => {
            sql::query(
                "INSERT INTO instance_overrides (org_id, instance_id, usage_level, sharing_level,
                    reason, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (org_id, instance_id) DO UPDATE SET usage_level = excluded.usage_level,
                   sharing_level = excluded.sharing_level, reason = excluded.reason, updated_at =
                   excluded.updated_at",
            )
            .bind(&o.org_id)
            .bind(&o.instance_id)
            .bind(&o.usage_level)
            .bind(&o.sharing_level)
            .bind(&o.reason)
            .bind(o.updated_at)
            .execute(&mut *tx)
            .await?;
        }
        Change::Tracking(t) => {
            sql::query(
                "INSERT INTO tracking_settings (org_id, enabled_channels, exclude_anonymous,
                    excluded_groups, blocking_time_ms,
                   view_counter_enabled, global_report_group, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (org_id) DO UPDATE SET enabled_channels = excluded.enabled_channels,
                   exclude_anonymous = excluded.exclude_anonymous, excluded_groups =
                   excluded.excluded_groups,
                   blocking_time_ms = excluded.blocking_time_ms, view_counter_enabled =
                   excluded.view_counter_enabled,
                   global_report_group = excluded.global_report_group, updated_at =
                   excluded.updated_at",
            )
            .bind(&t.org_id)
            .bind(&t.enabled_channels)
            .bind(t.exclude_anonymous)
            .bind(&t.excluded_groups)
            .bind(t.blocking_time_ms)
            .bind(t.view_counter_enabled)
            .bind(&t.global_report_group)
            .bind(t.updated_at)
            .execute(&mut *tx)
            .await?;
        }
        Change::Retention(r) => {
            sql::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO retention ({RETENTION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (org_id) DO UPDATE SET raw_days = excluded.raw_days, assessment_days
                 = excluded.assessment_days,
                   aggregate_days = excluded.aggregate_days, updated_at = excluded.updated_at,
                   score_history_days = excluded.score_history_days, support_bundle_days =
                   excluded.support_bundle_days,
                   event_id_days = excluded.event_id_days"
            )))
            .bind(&r.org_id)
            .bind(r.raw_days)
            .bind(r.assessment_days)
            .bind(r.aggregate_days)
            .bind(r.updated_at)
            .bind(r.score_history_days)
            .bind(r.support_bundle_days)
            .bind(r.event_id_days)
            .execute(&mut *tx)
            .await?;
        }
        Change::Move {
            record: m,
            expected,
            residency,
        } => {
            match expected {
                None => {
                    let open: Option<(String,)> = sql::query(
                        "SELECT move_id FROM residency_moves WHERE org_id = $1 AND scope = $2 AND
                            state IN ('REQUESTED', 'MOVING')",
                    )
                    .bind(&m.org_id)
                    .bind(&m.scope)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if open.is_some() {
                        return Err(StoreError::Conflict(
                            "a move of this scope is already under way",
                        ));
                    }
                    sql::query(
                        "INSERT INTO residency_moves (move_id, org_id, scope, from_location,
                            to_location, state, requested_at, started_at, completed_at,
                            reported_by)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    )
                    .bind(&m.move_id)
                    .bind(&m.org_id)
                    .bind(&m.scope)
                    .bind(&m.from_location)
                    .bind(&m.to_location)
                    .bind(&m.state)
                    .bind(m.requested_at)
                    .bind(m.started_at)
                    .bind(m.completed_at)
                    .bind(&m.reported_by)
                    .execute(&mut *tx)
                    .await?;
                }
                Some(expected) => {
                    let updated = sql::query(
                        "UPDATE residency_moves SET state = $3, started_at = $4, completed_at =
                            $5, reported_by = $6
                         WHERE move_id = $1 AND state = $2 AND reported_by = $7",
                    )
                    .bind(&m.move_id)
                    .bind(&expected.state)
                    .bind(&m.state)
                    .bind(m.started_at)
                    .bind(m.completed_at)
                    .bind(&m.reported_by)
                    .bind(&expected.reported_by)
                    .execute(&mut *tx)
                    .await?;
                    if updated.rows_affected() != 1 {
                        return Err(StoreError::Conflict("the move changed concurrently"));
                    }
                }
            }
            if let Some(r) = residency {
                sql::query(
                    "INSERT INTO residency (org_id, location, support_bundle_location, updated_at)
                        VALUES ($1, $2, $3, $4)
                     ON CONFLICT (org_id) DO UPDATE SET location = excluded.location,
                       support_bundle_location = excluded.support_bundle_location, updated_at =
                       excluded.updated_at",
                )
                .bind(&r.org_id)
                .bind(&r.location)
                .bind(&r.support_bundle_location)
                .bind(r.updated_at)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    Ok(())
}

#[async_trait]
impl ConsentStore for SqlStore {
    fn origin(&self) -> &str {
        &self.origin
    }

    fn channel(&self) -> Option<&str> {
        self.channel.as_deref()
    }

    async fn latest_consent(&self, org_id: &str) -> StoreResult<Option<ConsentRecord>> {
        Ok(sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONSENT_COLUMNS} FROM consent_versions WHERE org_id = $1 ORDER BY version
                DESC LIMIT 1"
        )))
        .bind(org_id)
        .fetch_optional(&self.db)
        .await?)
    }

    async fn consent_version(
        &self,
        org_id: &str,
        version: i64,
    ) -> StoreResult<Option<ConsentRecord>> {
        Ok(sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONSENT_COLUMNS} FROM consent_versions WHERE org_id = $1 AND version = $2"
        )))
        .bind(org_id)
        .bind(version)
        .fetch_optional(&self.db)
        .await?)
    }

    async fn consent_by_request(
        &self,
        org_id: &str,
        request_key: &str,
    ) -> StoreResult<Option<ConsentRecord>> {
        Ok(sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONSENT_COLUMNS} FROM consent_versions WHERE org_id = $1 AND request_key = $2"
        )))
        .bind(org_id)
        .bind(request_key)
        .fetch_optional(&self.db)
        .await?)
    }

    async fn list_consent(
        &self,
        org_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<ConsentRecord>> {
        Ok(sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONSENT_COLUMNS} FROM consent_versions WHERE org_id = $1 AND version < $2
                ORDER BY version DESC LIMIT $3"
        )))
        .bind(org_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.db)
        .await?)
    }

    async fn tracking(&self, org_id: &str) -> StoreResult<Option<TrackingRecord>> {
        Ok(sql::query(
            "SELECT org_id, enabled_channels, exclude_anonymous, excluded_groups,
                blocking_time_ms, view_counter_enabled,
               global_report_group, updated_at FROM tracking_settings WHERE org_id = $1",
        )
        .bind(org_id)
        .fetch_optional(&self.db)
        .await?)
    }

    async fn residency(
        &self,
        org_id: &str,
    ) -> StoreResult<(Option<ResidencyRecord>, Vec<MoveRecord>)> {
        // One statement: both backends read it from one snapshot.
        let rows = sql::query(
            "SELECT r.location, r.support_bundle_location, r.updated_at,
                    m.move_id, m.scope, m.from_location, m.to_location, m.state, m.requested_at,
                    m.started_at, m.completed_at, m.reported_by
             FROM (SELECT CAST($1 AS TEXT) AS org_id) o
             LEFT JOIN residency r ON r.org_id = o.org_id
             LEFT JOIN residency_moves m ON m.org_id = o.org_id
             ORDER BY m.requested_at DESC, m.move_id DESC",
        )
        .bind(org_id)
        .fetch_rows(&self.db)
        .await?;
        let mut residency = None;
        let mut moves = Vec::new();
        for row in rows {
            if residency.is_none()
                && let Some(location) = row.try_get::<Option<String>>(0)?
            {
                residency = Some(ResidencyRecord {
                    org_id: org_id.to_owned(),
                    location,
                    support_bundle_location: row.try_get(1)?,
                    updated_at: row.try_get(2)?,
                });
            }
            if let Some(move_id) = row.try_get::<Option<String>>(3)? {
                moves.push(MoveRecord {
                    move_id,
                    org_id: org_id.to_owned(),
                    scope: row.try_get(4)?,
                    from_location: row.try_get(5)?,
                    to_location: row.try_get(6)?,
                    state: row.try_get(7)?,
                    requested_at: row.try_get(8)?,
                    started_at: row.try_get(9)?,
                    completed_at: row.try_get(10)?,
                    reported_by: row.try_get(11)?,
                });
            }
        }
        Ok((residency, moves))
    }

    async fn retention(&self, org_id: &str) -> StoreResult<Option<RetentionRecord>> {
        Ok(sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RETENTION_COLUMNS} FROM retention WHERE org_id = $1"
        )))
        .bind(org_id)
        .fetch_optional(&self.db)
        .await?)
    }

    async fn policy_state(&self, org_id: &str) -> StoreResult<Option<PolicyStateRecord>> {
        Ok(
            sql::query("SELECT org_id, revision FROM policy_state WHERE org_id = $1")
                .bind(org_id)
                .fetch_optional(&self.db)
                .await?,
        )
    }

    async fn overrides(&self, org_id: &str) -> StoreResult<Vec<OverrideRecord>> {
        Ok(sql::query(
            "SELECT org_id, instance_id, usage_level, sharing_level, reason, updated_at FROM
                instance_overrides
             WHERE org_id = $1 ORDER BY instance_id",
        )
        .bind(org_id)
        .fetch_all(&self.db)
        .await?)
    }

    async fn purges(&self, org_id: &str) -> StoreResult<Vec<PurgeRecord>> {
        Ok(sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT {PURGE_COLUMNS} FROM purges WHERE org_id = $1 ORDER BY before_revision DESC"
        )))
        .bind(org_id)
        .fetch_all(&self.db)
        .await?)
    }

    async fn orgs(&self) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> = sql::query("SELECT org_id FROM policy_state ORDER BY org_id")
            .fetch_all(&self.db)
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }
}

/// Why a change computed from an org's older state is refused.
const CONCURRENT: &str = "the org was changed at the same time (by another replica); nothing \
                          was changed: read it again and retry";

#[async_trait]
impl ChangeLog for SqlStore {
    /// Stages the change unless the org moved on: one staged change per org at a time (a unique
    /// index: a second replica's change waits for the first's transaction and is then refused),
    /// and the org still at the revision the change was computed from, both checked in the
    /// transaction that stages it. So two replicas changing one org at once leave one change
    /// staged, audited and applied, and the other refused with nothing staged or audited.
    async fn stage(&self, change: &StagedChange) -> Result<(), ChangeLogError> {
        let base = StagedPayload::decode(&change.payload)?.base_revision;
        let mut tx = self.db.begin().await.map_err(db)?;
        match staged_rows::insert(&mut tx, change).await {
            Err(ChangeLogError::Concurrent(_)) => {
                return Err(ChangeLogError::Concurrent(CONCURRENT.to_owned()));
            }
            other => other?,
        }
        if let Some(base) = base {
            let current =
                sql::query_as::<(i64,)>("SELECT revision FROM policy_state WHERE org_id = $1")
                    .bind(&change.org_id)
                    .fetch_optional(&mut tx)
                    .await
                    .map_err(db)?
                    .map_or(0, |(revision,)| revision);
            if current != base {
                return Err(ChangeLogError::Concurrent(CONCURRENT.to_owned()));
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn apply(&self, change: &StagedChange) -> Result<(), ChangeLogError> {
        let StagedPayload {
            change: staged,
            purge,
            ..
        } = StagedPayload::decode(&change.payload)?;
        let mut tx = self.db.begin().await.map_err(db)?;
        if !staged_rows::delete(&mut tx, &change.change_id).await? {
            // Settled already (by another settler): applying twice would apply it twice.
            return Ok(());
        }
        write_change(&mut tx, &staged).await?;
        let (revision,): (i64,) = sql::query(
            "INSERT INTO policy_state (org_id, revision) VALUES ($1, 1)
             ON CONFLICT (org_id) DO UPDATE SET revision = policy_state.revision + 1
             RETURNING revision",
        )
        .bind(staged.org_id())
        .fetch_one(&mut tx)
        .await
        .map_err(db)?;
        if let Some(channel) = &self.channel {
            // Delivered to every listening replica when (and only if) this transaction commits.
            let notice = Notice {
                origin: self.origin.clone(),
                org_id: staged.org_id().to_owned(),
                instance_ids: match &staged {
                    Change::Override { instance_id, .. } => vec![instance_id.clone()],
                    _ => Vec::new(),
                },
            };
            sql::query("SELECT pg_notify($1, $2)")
                .bind(channel.as_str())
                .bind(serde_json::to_string(&notice).unwrap_or_default())
                .execute(&mut tx)
                .await
                .map_err(db)?;
        }
        if let Some(p) = purge {
            sql::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO purges ({PURGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                    $10, $11)"
            )))
            .bind(&p.purge_id)
            .bind(&p.org_id)
            .bind(&p.scope)
            .bind(&p.instance_id)
            .bind(&p.delete_kinds)
            .bind(&p.strip_classes)
            .bind(p.withdraw_metadata)
            .bind(p.withdraw_in_app_data)
            .bind(p.before_consent_version)
            .bind(revision)
            .bind(p.issued_at)
            .execute(&mut tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn discard(&self, change_id: &str) -> Result<(), ChangeLogError> {
        staged_rows::delete(&self.db, change_id).await?;
        Ok(())
    }

    async fn staged(&self, org_id: Option<&str>) -> Result<Vec<StagedChange>, ChangeLogError> {
        staged_rows::list(&self.db, org_id).await
    }
}
