//! The store on SQLite and on PostgreSQL: one body of SQL, run on either through the runtime's
//! SQL shim (`sightline_runtime::sql`).

use std::collections::HashMap;

use async_trait::async_trait;
use sightline_runtime::audited::{ChangeLog, ChangeLogError, StagedChange, staged_rows};
use sightline_runtime::sql::{self, Database, Tx};

use super::{
    Change, Cutoffs, InsightsStore, OrgRecords, Part, PurgeSpec, Removed, StoreError, StoreResult,
    StoredAssessment, StoredBundle, StoredReadiness, StoredScore,
};
use crate::enforce;

mod change_log;
mod moves;
mod purges;

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

/// insights-svc's store on either backend.
#[derive(Debug, Clone)]
pub struct SqlStore {
    db: Database,
}

impl SqlStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Inserts an assessment; `conflict` says what a repeated upload id does.
    async fn insert_assessment(
        executor: impl sql::Executor,
        a: &StoredAssessment,
        conflict: &str,
    ) -> StoreResult<()> {
        sql::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO assessments (upload_id, org_id, subject, stored_at, consent_version,
                size_bytes, body)
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
    async fn insert_readiness(
        executor: impl sql::Executor,
        r: &StoredReadiness,
        conflict: &str,
    ) -> StoreResult<()> {
        sql::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO readiness (org_id, subject, assessed_at, score, report) VALUES ($1, $2,
                $3, $4, $5) {conflict}"
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
    async fn insert_score(
        executor: impl sql::Executor,
        s: &StoredScore,
        conflict: &str,
    ) -> StoreResult<()> {
        sql::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO scores (org_id, subject, at, score, rules_version, source) VALUES ($1,
                $2, $3, $4, $5, $6) {conflict}"
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
    async fn insert_bundle(
        executor: impl sql::Executor,
        b: &StoredBundle,
        conflict: &str,
    ) -> StoreResult<()> {
        sql::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO bundles (upload_id, org_id, subject, location, file_name, stored_at,
                size_bytes, sha256, files_read, scrubbed)
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
}

#[async_trait]
impl InsightsStore for SqlStore {
    async fn forget_deleted(&self) -> StoreResult<()> {
        sightline_runtime::storage::Forget::forget_deleted(&self.db).await?;
        Ok(())
    }

    async fn put_assessment(&self, a: &StoredAssessment) -> StoreResult<()> {
        Self::insert_assessment(&self.db, a, "").await
    }

    async fn latest_assessment(
        &self,
        org_id: &str,
        subject: &str,
    ) -> StoreResult<Option<StoredAssessment>> {
        let row: Option<(String, i64, i64, i64, Vec<u8>)> = sql::query(
            "SELECT upload_id, stored_at, consent_version, size_bytes, body FROM assessments
             WHERE org_id = $1 AND subject = $2 ORDER BY stored_at DESC, upload_id DESC LIMIT 1",
        )
        .bind(org_id)
        .bind(subject)
        .fetch_optional(&self.db)
        .await?;
        Ok(row.map(
            |(upload_id, stored_at, consent_version, size_bytes, body)| StoredAssessment {
                upload_id,
                org_id: org_id.to_owned(),
                subject: subject.to_owned(),
                stored_at,
                consent_version,
                size_bytes,
                body,
            },
        ))
    }

    async fn put_readiness(&self, r: &StoredReadiness) -> StoreResult<()> {
        Self::insert_readiness(
            &self.db,
            r,
            "ON CONFLICT (org_id, subject) DO UPDATE SET assessed_at = excluded.assessed_at, score
                = excluded.score, report = excluded.report",
        )
        .await
    }

    async fn readiness(&self, org_id: &str, subject: &str) -> StoreResult<Option<StoredReadiness>> {
        let row: Option<(i64, i64, Vec<u8>)> = sql::query(
            "SELECT assessed_at, score, report FROM readiness WHERE org_id = $1 AND subject = $2",
        )
        .bind(org_id)
        .bind(subject)
        .fetch_optional(&self.db)
        .await?;
        Ok(row.map(|(assessed_at, score, report)| StoredReadiness {
            org_id: org_id.to_owned(),
            subject: subject.to_owned(),
            assessed_at,
            score,
            report,
        }))
    }

    async fn readiness_scores(
        &self,
        org_id: &str,
        subjects: &[String],
    ) -> StoreResult<HashMap<String, i64>> {
        let mut out = HashMap::new();
        for chunk in subjects.chunks(500) {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT subject, score FROM readiness WHERE org_id = $1 AND subject IN ({})",
                placeholders(2, chunk.len())
            ));
            let mut query = sql::query_as::<(String, i64)>(sql).bind(org_id);
            for subject in chunk {
                query = query.bind(subject);
            }
            out.extend(query.fetch_all(&self.db).await?);
        }
        Ok(out)
    }

    async fn put_score(
        &self,
        org_id: &str,
        subject: &str,
        at: i64,
        score: i64,
        rules_version: &str,
        source: i64,
    ) -> StoreResult<()> {
        let kept = StoredScore {
            org_id: org_id.to_owned(),
            subject: subject.to_owned(),
            at,
            score,
            rules_version: rules_version.to_owned(),
            source,
        };
        Self::insert_score(
            &self.db,
            &kept,
            "ON CONFLICT (org_id, subject, at) DO UPDATE SET score = excluded.score, rules_version
                = excluded.rules_version, source = excluded.source",
        )
        .await
    }

    async fn scores(
        &self,
        org_id: &str,
        subject: &str,
        from: i64,
        to: i64,
    ) -> StoreResult<Vec<(i64, i64)>> {
        Ok(sql::query(
            "SELECT at, score FROM scores WHERE org_id = $1 AND subject = $2 AND at >= $3 AND at <
                $4
             ORDER BY at LIMIT 20000",
        )
        .bind(org_id)
        .bind(subject)
        .bind(from)
        .bind(to)
        .fetch_all(&self.db)
        .await?)
    }

    async fn latest_scores(
        &self,
        org_id: &str,
        subjects: &[String],
    ) -> StoreResult<HashMap<String, (i64, i64)>> {
        let mut out = HashMap::new();
        for chunk in subjects.chunks(500) {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT s.subject, s.at, s.score FROM scores s
                 JOIN (SELECT subject, MAX(at) AS at FROM scores WHERE org_id = $1 AND subject IN
                 ({}) GROUP BY subject) m
                   ON s.subject = m.subject AND s.at = m.at
                 WHERE s.org_id = $1",
                placeholders(2, chunk.len())
            ));
            let mut query = sql::query_as::<(String, i64, i64)>(sql).bind(org_id);
            for subject in chunk {
                query = query.bind(subject);
            }
            for (subject, at, score) in query.fetch_all(&self.db).await? {
                out.insert(subject, (at, score));
            }
        }
        Ok(out)
    }

    async fn put_bundle(&self, b: &StoredBundle) -> StoreResult<()> {
        Self::insert_bundle(&self.db, b, "").await
    }

    async fn bundles(&self, org_id: &str) -> StoreResult<Vec<StoredBundle>> {
        let rows: Vec<(
            String,
            String,
            String,
            String,
            i64,
            i64,
            String,
            i64,
            String,
        )> = sql::query(
            "SELECT upload_id, subject, location, file_name, stored_at, size_bytes, sha256,
                files_read, scrubbed
             FROM bundles WHERE org_id = $1 ORDER BY stored_at, upload_id",
        )
        .bind(org_id)
        .fetch_all(&self.db)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(
                    upload_id,
                    subject,
                    location,
                    file_name,
                    stored_at,
                    size_bytes,
                    sha256,
                    files_read,
                    scrubbed,
                )| StoredBundle {
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
                },
            )
            .collect())
    }

    async fn bundle_files(&self) -> StoreResult<Vec<(String, String)>> {
        Ok(sql::query("SELECT location, file_name FROM bundles")
            .fetch_all(&self.db)
            .await?)
    }

    async fn sweep_counts(
        &self,
        org_id: &str,
        c: &Cutoffs,
    ) -> StoreResult<(Removed, Vec<(String, String)>)> {
        purges::sweep_counts(self, org_id, c).await
    }

    async fn purge_counts(
        &self,
        spec: &PurgeSpec,
    ) -> StoreResult<(Removed, Vec<(String, String)>)> {
        purges::purge_counts(self, spec).await
    }

    async fn purge_applied(&self, purge_id: &str) -> StoreResult<bool> {
        let row: Option<(i64,)> =
            sql::query("SELECT applied_at FROM applied_purges WHERE purge_id = $1")
                .bind(purge_id)
                .fetch_optional(&self.db)
                .await?;
        Ok(row.is_some())
    }

    async fn move_applied(&self, move_id: &str) -> StoreResult<bool> {
        let row: Option<(i64,)> =
            sql::query("SELECT claimed_at FROM applied_moves WHERE move_id = $1")
                .bind(move_id)
                .fetch_optional(&self.db)
                .await?;
        Ok(row.is_some())
    }

    async fn org_records(&self, org_id: &str, part: &Part) -> StoreResult<OrgRecords> {
        moves::org_records(self, org_id, part).await
    }

    async fn import(&self, records: &OrgRecords) -> StoreResult<()> {
        moves::import(self, records).await
    }

    async fn orgs(&self) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> = sql::query(
            "SELECT org_id FROM assessments UNION SELECT org_id FROM readiness
             UNION SELECT org_id FROM scores UNION SELECT org_id FROM bundles",
        )
        .fetch_all(&self.db)
        .await?;
        Ok(rows.into_iter().map(|(o,)| o).collect())
    }
}
