//! The store on SQLite and on PostgreSQL: one body of SQL (numbered placeholders work on both),
//! instantiated per backend by `sql_store!`.

use std::collections::HashMap;

use async_trait::async_trait;
use sightline_runtime::audited::{ChangeLog, ChangeLogError, StagedChange};
use sqlx::{PgPool, SqlitePool};

use super::{
    Change, Cutoffs, InsightsStore, OrgRecords, Part, PurgeSpec, Removed, StoreError, StoreResult,
    StoredAssessment, StoredBundle, StoredReadiness, StoredScore,
};
use crate::treat;

/// `applied_at` of a purge claimed by a staged change that is not applied yet.
const PURGE_CLAIMED: i64 = -1;
const TAKEN: &str = "this purge or move is staged or applied already";

fn db(error: sqlx::Error) -> ChangeLogError {
    StoreError::from(error).into()
}

/// `$first, $first+1, …` for `count` values.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The purge's subject filter: (SQL, its binds after the org id).
fn subject_filter(spec: &PurgeSpec) -> (&'static str, Vec<String>) {
    match &spec.subject {
        Some(subject) => (" AND subject = $2", vec![subject.clone()]),
        None => ("", Vec::new()),
    }
}

macro_rules! sql_store {
    ($store:ident, $pool:ty, $db:ty, $begin:literal) => {
        #[derive(Debug, Clone)]
        pub struct $store {
            pool: $pool,
        }

        impl $store {
            pub fn new(pool: $pool) -> Self {
                Self { pool }
            }

            sightline_runtime::staged_change_rows!($db, db);

            /// Inserts an assessment; `conflict` says what a repeated upload id does.
            async fn insert_assessment<'e, E: sqlx::Executor<'e, Database = $db>>(
                executor: E,
                a: &StoredAssessment,
                conflict: &str,
            ) -> StoreResult<()> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO assessments (upload_id, org_id, subject, stored_at, consent_version, size_bytes, body)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) {conflict}"
                )))
                .bind(&a.upload_id)
                .bind(&a.org_id)
                .bind(&a.subject)
                .bind(a.stored_at)
                .bind(a.consent_version)
                .bind(a.size_bytes)
                .bind(&a.body)
                .execute(executor)
                .await?;
                Ok(())
            }

            /// Inserts a readiness report; `conflict` says what a subject's earlier report does.
            async fn insert_readiness<'e, E: sqlx::Executor<'e, Database = $db>>(
                executor: E,
                r: &StoredReadiness,
                conflict: &str,
            ) -> StoreResult<()> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO readiness (org_id, subject, assessed_at, score, report) VALUES ($1, $2, $3, $4, $5) {conflict}"
                )))
                .bind(&r.org_id)
                .bind(&r.subject)
                .bind(r.assessed_at)
                .bind(r.score)
                .bind(&r.report)
                .execute(executor)
                .await?;
                Ok(())
            }

            /// Inserts a score; `conflict` says what a score at the same time does.
            async fn insert_score<'e, E: sqlx::Executor<'e, Database = $db>>(
                executor: E,
                s: &StoredScore,
                conflict: &str,
            ) -> StoreResult<()> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO scores (org_id, subject, at, score, rules_version, source) VALUES ($1, $2, $3, $4, $5, $6) {conflict}"
                )))
                .bind(&s.org_id)
                .bind(&s.subject)
                .bind(s.at)
                .bind(s.score)
                .bind(&s.rules_version)
                .bind(s.source)
                .execute(executor)
                .await?;
                Ok(())
            }

            /// Inserts a bundle record; `conflict` says what a repeated upload id does.
            async fn insert_bundle<'e, E: sqlx::Executor<'e, Database = $db>>(
                executor: E,
                b: &StoredBundle,
                conflict: &str,
            ) -> StoreResult<()> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO bundles (upload_id, org_id, subject, location, file_name, stored_at, size_bytes, sha256, files_read, scrubbed)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) {conflict}"
                )))
                .bind(&b.upload_id)
                .bind(&b.org_id)
                .bind(&b.subject)
                .bind(&b.location)
                .bind(&b.file_name)
                .bind(b.stored_at)
                .bind(b.size_bytes)
                .bind(&b.sha256)
                .bind(b.files_read)
                .bind(&b.scrubbed)
                .execute(executor)
                .await?;
                Ok(())
            }

            async fn count(&self, sql: String, org_id: &str, binds: &[String], tail: &[i64]) -> StoreResult<i64> {
                let sql = sqlx::AssertSqlSafe(sql);
                let mut query = sqlx::query_as::<_, (i64,)>(sql).bind(org_id);
                for bind in binds {
                    query = query.bind(bind);
                }
                for bind in tail {
                    query = query.bind(*bind);
                }
                Ok(query.fetch_one(&self.pool).await?.0)
            }

            async fn files(&self, sql: String, org_id: &str, binds: &[String], tail: &[i64]) -> StoreResult<Vec<(String, String)>> {
                let sql = sqlx::AssertSqlSafe(sql);
                let mut query = sqlx::query_as::<_, (String, String)>(sql).bind(org_id);
                for bind in binds {
                    query = query.bind(bind);
                }
                for bind in tail {
                    query = query.bind(*bind);
                }
                Ok(query.fetch_all(&self.pool).await?)
            }

            async fn exec(
                tx: &mut sqlx::Transaction<'static, $db>,
                sql: String,
                org_id: &str,
                binds: &[String],
                tail: &[i64],
            ) -> StoreResult<i64> {
                let sql = sqlx::AssertSqlSafe(sql);
                let mut query = sqlx::query(sql).bind(org_id);
                for bind in binds {
                    query = query.bind(bind);
                }
                for bind in tail {
                    query = query.bind(*bind);
                }
                let done = query.execute(&mut **tx).await?;
                Ok(i64::try_from(done.rows_affected()).unwrap_or(i64::MAX))
            }

            async fn apply_sweep(
                tx: &mut sqlx::Transaction<'static, $db>,
                org_id: &str,
                cutoffs: &Cutoffs,
            ) -> StoreResult<()> {
                Self::exec(tx, "DELETE FROM assessments WHERE org_id = $1 AND stored_at < $2".into(), org_id, &[], &[cutoffs.assessments]).await?;
                Self::exec(tx, "DELETE FROM readiness WHERE org_id = $1 AND assessed_at < $2".into(), org_id, &[], &[cutoffs.assessments]).await?;
                Self::exec(tx, "DELETE FROM scores WHERE org_id = $1 AND at < $2".into(), org_id, &[], &[cutoffs.scores]).await?;
                Self::exec(tx, "DELETE FROM bundles WHERE org_id = $1 AND stored_at < $2".into(), org_id, &[], &[cutoffs.bundles]).await?;
                Ok(())
            }

            async fn apply_purge(
                tx: &mut sqlx::Transaction<'static, $db>,
                spec: &PurgeSpec,
                applied_at: i64,
            ) -> StoreResult<()> {
                let (filter, binds) = subject_filter(spec);
                let mut removed = Removed::default();
                if spec.delete_scores || spec.delete_uploads {
                    removed.scores = Self::exec(tx, format!("DELETE FROM scores WHERE org_id = $1{filter}"), &spec.org_id, &binds, &[]).await?;
                }
                if spec.delete_uploads {
                    removed.assessments = Self::exec(tx, format!("DELETE FROM assessments WHERE org_id = $1{filter}"), &spec.org_id, &binds, &[]).await?;
                    removed.readiness = Self::exec(tx, format!("DELETE FROM readiness WHERE org_id = $1{filter}"), &spec.org_id, &binds, &[]).await?;
                    removed.bundles = Self::exec(tx, format!("DELETE FROM bundles WHERE org_id = $1{filter}"), &spec.org_id, &binds, &[]).await?;
                } else if !spec.strip_classes.is_empty() {
                    removed.stripped = Self::strip(tx, spec, filter, &binds).await?;
                }
                let counts = serde_json::to_string(&removed).unwrap_or_default();
                sqlx::query("UPDATE applied_purges SET applied_at = $1, counts = $2 WHERE purge_id = $3")
                    .bind(applied_at)
                    .bind(counts)
                    .bind(&spec.purge_id)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            /// Removes the stripped classes' values from stored assessments and readiness reports.
            async fn strip(
                tx: &mut sqlx::Transaction<'static, $db>,
                spec: &PurgeSpec,
                filter: &str,
                binds: &[String],
            ) -> StoreResult<i64> {
                let mut stripped = 0;
                let sql = sqlx::AssertSqlSafe(format!("SELECT upload_id, body FROM assessments WHERE org_id = $1{filter}"));
                let mut query = sqlx::query_as::<_, (String, Vec<u8>)>(sql).bind(&spec.org_id);
                for bind in binds {
                    query = query.bind(bind);
                }
                for (upload_id, body) in query.fetch_all(&mut **tx).await? {
                    if let Some(body) = treat::strip_assessment(&body, &spec.strip_classes)? {
                        sqlx::query("UPDATE assessments SET body = $1 WHERE upload_id = $2")
                            .bind(body)
                            .bind(upload_id)
                            .execute(&mut **tx)
                            .await?;
                        stripped += 1;
                    }
                }
                let sql = sqlx::AssertSqlSafe(format!("SELECT subject, report FROM readiness WHERE org_id = $1{filter}"));
                let mut query = sqlx::query_as::<_, (String, Vec<u8>)>(sql).bind(&spec.org_id);
                for bind in binds {
                    query = query.bind(bind);
                }
                for (subject, report) in query.fetch_all(&mut **tx).await? {
                    if let Some(report) = treat::strip_readiness(&report, &spec.strip_classes)? {
                        sqlx::query("UPDATE readiness SET report = $1 WHERE org_id = $2 AND subject = $3")
                            .bind(report)
                            .bind(&spec.org_id)
                            .bind(subject)
                            .execute(&mut **tx)
                            .await?;
                        stripped += 1;
                    }
                }
                Ok(stripped)
            }
        }

        #[async_trait]
        impl InsightsStore for $store {
            async fn forget_deleted(&self) -> StoreResult<()> {
                sightline_runtime::storage::Forget::forget_deleted(&self.pool).await?;
                Ok(())
            }

            async fn put_assessment(&self, a: &StoredAssessment) -> StoreResult<()> {
                Self::insert_assessment(&self.pool, a, "").await
            }

            async fn latest_assessment(&self, org_id: &str, subject: &str) -> StoreResult<Option<StoredAssessment>> {
                let row: Option<(String, i64, i64, i64, Vec<u8>)> = sqlx::query_as(
                    "SELECT upload_id, stored_at, consent_version, size_bytes, body FROM assessments
                     WHERE org_id = $1 AND subject = $2 ORDER BY stored_at DESC, upload_id DESC LIMIT 1",
                )
                .bind(org_id)
                .bind(subject)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|(upload_id, stored_at, consent_version, size_bytes, body)| StoredAssessment {
                    upload_id,
                    org_id: org_id.to_owned(),
                    subject: subject.to_owned(),
                    stored_at,
                    consent_version,
                    size_bytes,
                    body,
                }))
            }

            async fn put_readiness(&self, r: &StoredReadiness) -> StoreResult<()> {
                Self::insert_readiness(
                    &self.pool,
                    r,
                    "ON CONFLICT (org_id, subject) DO UPDATE SET assessed_at = excluded.assessed_at, score = excluded.score, report = excluded.report",
                )
                .await
            }

            async fn readiness(&self, org_id: &str, subject: &str) -> StoreResult<Option<StoredReadiness>> {
                let row: Option<(i64, i64, Vec<u8>)> = sqlx::query_as(
                    "SELECT assessed_at, score, report FROM readiness WHERE org_id = $1 AND subject = $2",
                )
                .bind(org_id)
                .bind(subject)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|(assessed_at, score, report)| StoredReadiness {
                    org_id: org_id.to_owned(),
                    subject: subject.to_owned(),
                    assessed_at,
                    score,
                    report,
                }))
            }

            async fn readiness_scores(&self, org_id: &str, subjects: &[String]) -> StoreResult<HashMap<String, i64>> {
                let mut out = HashMap::new();
                for chunk in subjects.chunks(500) {
                    let sql = sqlx::AssertSqlSafe(format!(
                        "SELECT subject, score FROM readiness WHERE org_id = $1 AND subject IN ({})",
                        placeholders(2, chunk.len())
                    ));
                    let mut query = sqlx::query_as::<_, (String, i64)>(sql).bind(org_id);
                    for subject in chunk {
                        query = query.bind(subject);
                    }
                    out.extend(query.fetch_all(&self.pool).await?);
                }
                Ok(out)
            }

            async fn put_score(&self, org_id: &str, subject: &str, at: i64, score: i64, rules_version: &str, source: i64) -> StoreResult<()> {
                let kept = StoredScore {
                    org_id: org_id.to_owned(),
                    subject: subject.to_owned(),
                    at,
                    score,
                    rules_version: rules_version.to_owned(),
                    source,
                };
                Self::insert_score(
                    &self.pool,
                    &kept,
                    "ON CONFLICT (org_id, subject, at) DO UPDATE SET score = excluded.score, rules_version = excluded.rules_version, source = excluded.source",
                )
                .await
            }

            async fn scores(&self, org_id: &str, subject: &str, from: i64, to: i64) -> StoreResult<Vec<(i64, i64)>> {
                Ok(sqlx::query_as(
                    "SELECT at, score FROM scores WHERE org_id = $1 AND subject = $2 AND at >= $3 AND at < $4
                     ORDER BY at LIMIT 20000",
                )
                .bind(org_id)
                .bind(subject)
                .bind(from)
                .bind(to)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn latest_scores(&self, org_id: &str, subjects: &[String]) -> StoreResult<HashMap<String, (i64, i64)>> {
                let mut out = HashMap::new();
                for chunk in subjects.chunks(500) {
                    let sql = sqlx::AssertSqlSafe(format!(
                        "SELECT s.subject, s.at, s.score FROM scores s
                         JOIN (SELECT subject, MAX(at) AS at FROM scores WHERE org_id = $1 AND subject IN ({}) GROUP BY subject) m
                           ON s.subject = m.subject AND s.at = m.at
                         WHERE s.org_id = $1",
                        placeholders(2, chunk.len())
                    ));
                    let mut query = sqlx::query_as::<_, (String, i64, i64)>(sql).bind(org_id);
                    for subject in chunk {
                        query = query.bind(subject);
                    }
                    for (subject, at, score) in query.fetch_all(&self.pool).await? {
                        out.insert(subject, (at, score));
                    }
                }
                Ok(out)
            }

            async fn put_bundle(&self, b: &StoredBundle) -> StoreResult<()> {
                Self::insert_bundle(&self.pool, b, "").await
            }

            async fn bundles(&self, org_id: &str) -> StoreResult<Vec<StoredBundle>> {
                let rows: Vec<(String, String, String, String, i64, i64, String, i64, String)> = sqlx::query_as(
                    "SELECT upload_id, subject, location, file_name, stored_at, size_bytes, sha256, files_read, scrubbed
                     FROM bundles WHERE org_id = $1 ORDER BY stored_at, upload_id",
                )
                .bind(org_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(upload_id, subject, location, file_name, stored_at, size_bytes, sha256, files_read, scrubbed)| StoredBundle {
                        upload_id,
                        org_id: org_id.to_owned(),
                        subject,
                        location,
                        file_name,
                        stored_at,
                        size_bytes,
                        sha256,
                        files_read,
                        scrubbed,
                    })
                    .collect())
            }

            async fn bundle_files(&self) -> StoreResult<Vec<(String, String)>> {
                Ok(sqlx::query_as("SELECT location, file_name FROM bundles")
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn sweep_counts(&self, org_id: &str, c: &Cutoffs) -> StoreResult<(Removed, Vec<(String, String)>)> {
                let removed = Removed {
                    assessments: self.count("SELECT COUNT(*) FROM assessments WHERE org_id = $1 AND stored_at < $2".into(), org_id, &[], &[c.assessments]).await?,
                    readiness: self.count("SELECT COUNT(*) FROM readiness WHERE org_id = $1 AND assessed_at < $2".into(), org_id, &[], &[c.assessments]).await?,
                    scores: self.count("SELECT COUNT(*) FROM scores WHERE org_id = $1 AND at < $2".into(), org_id, &[], &[c.scores]).await?,
                    bundles: self.count("SELECT COUNT(*) FROM bundles WHERE org_id = $1 AND stored_at < $2".into(), org_id, &[], &[c.bundles]).await?,
                    stripped: 0,
                };
                let files = self.files("SELECT location, file_name FROM bundles WHERE org_id = $1 AND stored_at < $2".into(), org_id, &[], &[c.bundles]).await?;
                Ok((removed, files))
            }

            async fn purge_counts(&self, spec: &PurgeSpec) -> StoreResult<(Removed, Vec<(String, String)>)> {
                let (filter, binds) = subject_filter(spec);
                let org = spec.org_id.as_str();
                let mut removed = Removed::default();
                let mut files = Vec::new();
                if spec.delete_scores || spec.delete_uploads {
                    removed.scores = self.count(format!("SELECT COUNT(*) FROM scores WHERE org_id = $1{filter}"), org, &binds, &[]).await?;
                }
                if spec.delete_uploads {
                    removed.assessments = self.count(format!("SELECT COUNT(*) FROM assessments WHERE org_id = $1{filter}"), org, &binds, &[]).await?;
                    removed.readiness = self.count(format!("SELECT COUNT(*) FROM readiness WHERE org_id = $1{filter}"), org, &binds, &[]).await?;
                    removed.bundles = self.count(format!("SELECT COUNT(*) FROM bundles WHERE org_id = $1{filter}"), org, &binds, &[]).await?;
                    files = self.files(format!("SELECT location, file_name FROM bundles WHERE org_id = $1{filter}"), org, &binds, &[]).await?;
                } else if !spec.strip_classes.is_empty() {
                    removed.stripped = self.count(format!("SELECT COUNT(*) FROM assessments WHERE org_id = $1{filter}"), org, &binds, &[]).await?
                        + self.count(format!("SELECT COUNT(*) FROM readiness WHERE org_id = $1{filter}"), org, &binds, &[]).await?;
                }
                Ok((removed, files))
            }

            async fn purge_applied(&self, purge_id: &str) -> StoreResult<bool> {
                let row: Option<(i64,)> = sqlx::query_as("SELECT applied_at FROM applied_purges WHERE purge_id = $1")
                    .bind(purge_id)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.is_some())
            }

            async fn move_applied(&self, move_id: &str) -> StoreResult<bool> {
                let row: Option<(i64,)> = sqlx::query_as("SELECT claimed_at FROM applied_moves WHERE move_id = $1")
                    .bind(move_id)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.is_some())
            }

            async fn org_records(&self, org_id: &str, part: &Part) -> StoreResult<OrgRecords> {
                let mut records = OrgRecords::default();
                match part {
                    Part::Data => {
                        let rows: Vec<(String, String, i64, i64, i64, Vec<u8>)> = sqlx::query_as(
                            "SELECT upload_id, subject, stored_at, consent_version, size_bytes, body FROM assessments WHERE org_id = $1",
                        )
                        .bind(org_id)
                        .fetch_all(&self.pool)
                        .await?;
                        records.assessments = rows
                            .into_iter()
                            .map(|(upload_id, subject, stored_at, consent_version, size_bytes, body)| StoredAssessment {
                                upload_id,
                                org_id: org_id.to_owned(),
                                subject,
                                stored_at,
                                consent_version,
                                size_bytes,
                                body,
                            })
                            .collect();
                        let rows: Vec<(String, i64, i64, Vec<u8>)> = sqlx::query_as(
                            "SELECT subject, assessed_at, score, report FROM readiness WHERE org_id = $1",
                        )
                        .bind(org_id)
                        .fetch_all(&self.pool)
                        .await?;
                        records.readiness = rows
                            .into_iter()
                            .map(|(subject, assessed_at, score, report)| StoredReadiness {
                                org_id: org_id.to_owned(),
                                subject,
                                assessed_at,
                                score,
                                report,
                            })
                            .collect();
                        let rows: Vec<(String, i64, i64, String, i64)> = sqlx::query_as(
                            "SELECT subject, at, score, rules_version, source FROM scores WHERE org_id = $1",
                        )
                        .bind(org_id)
                        .fetch_all(&self.pool)
                        .await?;
                        records.scores = rows
                            .into_iter()
                            .map(|(subject, at, score, rules_version, source)| StoredScore {
                                org_id: org_id.to_owned(),
                                subject,
                                at,
                                score,
                                rules_version,
                                source,
                            })
                            .collect();
                    }
                    Part::Bundles { location } => {
                        records.bundles = self
                            .bundles(org_id)
                            .await?
                            .into_iter()
                            .filter(|b| &b.location == location)
                            .collect();
                    }
                }
                Ok(records)
            }

            async fn import(&self, records: &OrgRecords) -> StoreResult<()> {
                let mut tx = self.pool.begin_with($begin).await?;
                for a in &records.assessments {
                    Self::insert_assessment(&mut *tx, a, "ON CONFLICT (upload_id) DO NOTHING").await?;
                }
                for r in &records.readiness {
                    Self::insert_readiness(&mut *tx, r, "ON CONFLICT (org_id, subject) DO NOTHING").await?;
                }
                for s in &records.scores {
                    Self::insert_score(&mut *tx, s, "ON CONFLICT (org_id, subject, at) DO NOTHING").await?;
                }
                for b in &records.bundles {
                    Self::insert_bundle(&mut *tx, b, "ON CONFLICT (upload_id) DO NOTHING").await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn orgs(&self) -> StoreResult<Vec<String>> {
                let rows: Vec<(String,)> = sqlx::query_as(
                    "SELECT org_id FROM assessments UNION SELECT org_id FROM readiness
                     UNION SELECT org_id FROM scores UNION SELECT org_id FROM bundles",
                )
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(|(o,)| o).collect())
            }
        }

        #[async_trait]
        impl ChangeLog for $store {
            async fn stage(&self, change: &StagedChange) -> Result<(), ChangeLogError> {
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                // A purge is claimed with its staging, so it is applied and audited once however
                // many passes (or replicas) try; a discarded change releases the claim.
                let claimed = match Change::decode(&change.payload)? {
                    Change::Purge(spec) => Some(
                        sqlx::query(
                            "INSERT INTO applied_purges (purge_id, org_id, applied_at, counts) VALUES ($1, $2, $3, '{}')
                             ON CONFLICT (purge_id) DO NOTHING",
                        )
                        .bind(&spec.purge_id)
                        .bind(&spec.org_id)
                        .bind(PURGE_CLAIMED)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?,
                    ),
                    Change::Relocate { move_id, org_id, .. } | Change::MoveOut { move_id, org_id, .. } => Some(
                        sqlx::query(
                            "INSERT INTO applied_moves (move_id, org_id, claimed_at) VALUES ($1, $2, $3)
                             ON CONFLICT (move_id) DO NOTHING",
                        )
                        .bind(&move_id)
                        .bind(&org_id)
                        .bind(change.staged_at_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?,
                    ),
                    Change::Sweep { .. } => None,
                };
                if claimed.is_some_and(|c| c.rows_affected() == 0) {
                    return Err(ChangeLogError::Refused(TAKEN.to_owned()));
                }
                Self::insert_staged_row(&mut *tx, change).await?;
                tx.commit().await.map_err(db)?;
                Ok(())
            }

            async fn apply(&self, change: &StagedChange) -> Result<(), ChangeLogError> {
                let staged = Change::decode(&change.payload)?;
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                if !Self::delete_staged_row(&mut *tx, &change.change_id).await? {
                    // Settled already: applying twice would apply it twice.
                    return Ok(());
                }
                match &staged {
                    Change::Sweep { org_id, cutoffs } => Self::apply_sweep(&mut tx, org_id, cutoffs).await?,
                    Change::Purge(spec) => Self::apply_purge(&mut tx, spec, change.staged_at_ms).await?,
                    Change::Relocate { org_id, from, to, .. } => {
                        sqlx::query("UPDATE bundles SET location = $1 WHERE org_id = $2 AND location = $3")
                            .bind(to)
                            .bind(org_id)
                            .bind(from)
                            .execute(&mut *tx)
                            .await
                            .map_err(db)?;
                    }
                    Change::MoveOut { org_id, part: Part::Data, .. } => {
                        for table in ["assessments", "readiness", "scores"] {
                            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE org_id = $1")))
                                .bind(org_id)
                                .execute(&mut *tx)
                                .await
                                .map_err(db)?;
                        }
                    }
                    Change::MoveOut { org_id, part: Part::Bundles { location }, .. } => {
                        sqlx::query("DELETE FROM bundles WHERE org_id = $1 AND location = $2")
                            .bind(org_id)
                            .bind(location)
                            .execute(&mut *tx)
                            .await
                            .map_err(db)?;
                    }
                }
                tx.commit().await.map_err(db)?;
                Ok(())
            }

            async fn discard(&self, change_id: &str) -> Result<(), ChangeLogError> {
                let mut tx = self.pool.begin_with($begin).await.map_err(db)?;
                let payload: Option<(String,)> = sqlx::query_as("SELECT payload FROM staged_changes WHERE change_id = $1")
                    .bind(change_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
                // Not applied: the purge or move may be claimed again.
                match payload.map(|(p,)| Change::decode(&p)) {
                    Some(Ok(Change::Purge(spec))) => {
                        sqlx::query("DELETE FROM applied_purges WHERE purge_id = $1 AND applied_at = $2")
                            .bind(&spec.purge_id)
                            .bind(PURGE_CLAIMED)
                            .execute(&mut *tx)
                            .await
                            .map_err(db)?;
                    }
                    Some(Ok(Change::Relocate { move_id, .. } | Change::MoveOut { move_id, .. })) => {
                        sqlx::query("DELETE FROM applied_moves WHERE move_id = $1")
                            .bind(&move_id)
                            .execute(&mut *tx)
                            .await
                            .map_err(db)?;
                    }
                    _ => {}
                }
                Self::delete_staged_row(&mut *tx, change_id).await?;
                tx.commit().await.map_err(db)?;
                Ok(())
            }

            async fn staged(&self, org_id: Option<&str>) -> Result<Vec<StagedChange>, ChangeLogError> {
                Self::staged_rows(&self.pool, org_id).await
            }
        }
    };
}

mod sqlite {
    use super::*;
    sql_store!(SqliteStore, SqlitePool, sqlx::Sqlite, "BEGIN IMMEDIATE");
}

mod postgres {
    use super::*;
    sql_store!(PgStore, PgPool, sqlx::Postgres, "BEGIN");
}

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
