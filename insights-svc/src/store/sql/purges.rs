//! Sweeps and purges: what a retention sweep or a consent purge removes or strips, counted before
//! it is staged and applied inside the change's transaction.

use super::*;

impl SqlStore {
    pub(super) async fn count(
        &self,
        sql: String,
        org_id: &str,
        binds: &[String],
        tail: &[i64],
    ) -> StoreResult<i64> {
        let sql = sqlx::AssertSqlSafe(sql);
        let mut query = sql::query_as::<(i64,)>(sql).bind(org_id);
        for bind in binds {
            query = query.bind(bind);
        }
        for bind in tail {
            query = query.bind(*bind);
        }
        Ok(query.fetch_one(&self.db).await?.0)
    }

    pub(super) async fn files(
        &self,
        sql: String,
        org_id: &str,
        binds: &[String],
        tail: &[i64],
    ) -> StoreResult<Vec<(String, String)>> {
        let sql = sqlx::AssertSqlSafe(sql);
        let mut query = sql::query_as::<(String, String)>(sql).bind(org_id);
        for bind in binds {
            query = query.bind(bind);
        }
        for bind in tail {
            query = query.bind(*bind);
        }
        Ok(query.fetch_all(&self.db).await?)
    }

    pub(super) async fn exec(
        tx: &mut Tx,
        sql: String,
        org_id: &str,
        binds: &[String],
        tail: &[i64],
    ) -> StoreResult<i64> {
        let sql = sqlx::AssertSqlSafe(sql);
        let mut query = sql::query(sql).bind(org_id);
        for bind in binds {
            query = query.bind(bind);
        }
        for bind in tail {
            query = query.bind(*bind);
        }
        let done = query.execute(&mut *tx).await?;
        Ok(i64::try_from(done.rows_affected()).unwrap_or(i64::MAX))
    }

    pub(super) async fn apply_sweep(
        tx: &mut Tx,
        org_id: &str,
        cutoffs: &Cutoffs,
    ) -> StoreResult<()> {
        Self::exec(
            tx,
            "DELETE FROM assessments WHERE org_id = $1 AND stored_at < $2".into(),
            org_id,
            &[],
            &[cutoffs.assessments],
        )
        .await?;
        Self::exec(
            tx,
            "DELETE FROM readiness WHERE org_id = $1 AND assessed_at < $2".into(),
            org_id,
            &[],
            &[cutoffs.assessments],
        )
        .await?;
        Self::exec(
            tx,
            "DELETE FROM scores WHERE org_id = $1 AND at < $2".into(),
            org_id,
            &[],
            &[cutoffs.scores],
        )
        .await?;
        Self::exec(
            tx,
            "DELETE FROM bundles WHERE org_id = $1 AND stored_at < $2".into(),
            org_id,
            &[],
            &[cutoffs.bundles],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn apply_purge(
        tx: &mut Tx,
        spec: &PurgeSpec,
        applied_at: i64,
    ) -> StoreResult<()> {
        let (filter, binds) = subject_filter(spec);
        let mut removed = Removed::default();
        if spec.delete_scores || spec.delete_uploads {
            removed.scores = Self::exec(
                tx,
                format!("DELETE FROM scores WHERE org_id = $1{filter}"),
                &spec.org_id,
                &binds,
                &[],
            )
            .await?;
        }
        if spec.delete_uploads {
            removed.assessments = Self::exec(
                tx,
                format!("DELETE FROM assessments WHERE org_id = $1{filter}"),
                &spec.org_id,
                &binds,
                &[],
            )
            .await?;
            removed.readiness = Self::exec(
                tx,
                format!("DELETE FROM readiness WHERE org_id = $1{filter}"),
                &spec.org_id,
                &binds,
                &[],
            )
            .await?;
            removed.bundles = Self::exec(
                tx,
                format!("DELETE FROM bundles WHERE org_id = $1{filter}"),
                &spec.org_id,
                &binds,
                &[],
            )
            .await?;
        } else if !spec.strip_classes.is_empty() {
            removed.stripped = Self::strip(tx, spec, filter, &binds).await?;
        }
        let counts = serde_json::to_string(&removed).unwrap_or_default();
        sql::query("UPDATE applied_purges SET applied_at = $1, counts = $2 WHERE purge_id = $3")
            .bind(applied_at)
            .bind(counts)
            .bind(&spec.purge_id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Removes the stripped classes' values from stored assessments and readiness reports.
    pub(super) async fn strip(
        tx: &mut Tx,
        spec: &PurgeSpec,
        filter: &str,
        binds: &[String],
    ) -> StoreResult<i64> {
        let mut stripped = 0;
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT upload_id, body FROM assessments WHERE org_id = $1{filter}"
        ));
        let mut query = sql::query_as::<(String, Vec<u8>)>(sql).bind(&spec.org_id);
        for bind in binds {
            query = query.bind(bind);
        }
        for (upload_id, body) in query.fetch_all(&mut *tx).await? {
            if let Some(body) = enforce::strip_assessment(&body, &spec.strip_classes)? {
                sql::query("UPDATE assessments SET body = $1 WHERE upload_id = $2")
                    .bind(body)
                    .bind(upload_id)
                    .execute(&mut *tx)
                    .await?;
                stripped += 1;
            }
        }
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT subject, report FROM readiness WHERE org_id = $1{filter}"
        ));
        let mut query = sql::query_as::<(String, Vec<u8>)>(sql).bind(&spec.org_id);
        for bind in binds {
            query = query.bind(bind);
        }
        for (subject, report) in query.fetch_all(&mut *tx).await? {
            if let Some(report) = enforce::strip_readiness(&report, &spec.strip_classes)? {
                sql::query("UPDATE readiness SET report = $1 WHERE org_id = $2 AND subject = $3")
                    .bind(report)
                    .bind(&spec.org_id)
                    .bind(subject)
                    .execute(&mut *tx)
                    .await?;
                stripped += 1;
            }
        }
        Ok(stripped)
    }
}
pub(super) async fn sweep_counts(
    store: &SqlStore,
    org_id: &str,
    c: &Cutoffs,
) -> StoreResult<(Removed, Vec<(String, String)>)> {
    let removed = Removed {
        assessments: store
            .count(
                "SELECT COUNT(*) FROM assessments WHERE org_id = $1 AND stored_at < $2".into(),
                org_id,
                &[],
                &[c.assessments],
            )
            .await?,
        readiness: store
            .count(
                "SELECT COUNT(*) FROM readiness WHERE org_id = $1 AND assessed_at < $2".into(),
                org_id,
                &[],
                &[c.assessments],
            )
            .await?,
        scores: store
            .count(
                "SELECT COUNT(*) FROM scores WHERE org_id = $1 AND at < $2".into(),
                org_id,
                &[],
                &[c.scores],
            )
            .await?,
        bundles: store
            .count(
                "SELECT COUNT(*) FROM bundles WHERE org_id = $1 AND stored_at < $2".into(),
                org_id,
                &[],
                &[c.bundles],
            )
            .await?,
        stripped: 0,
    };
    let files = store
        .files(
            "SELECT location, file_name FROM bundles WHERE org_id = $1 AND stored_at < $2".into(),
            org_id,
            &[],
            &[c.bundles],
        )
        .await?;
    Ok((removed, files))
}

pub(super) async fn purge_counts(
    store: &SqlStore,
    spec: &PurgeSpec,
) -> StoreResult<(Removed, Vec<(String, String)>)> {
    let (filter, binds) = subject_filter(spec);
    let org = spec.org_id.as_str();
    let mut removed = Removed::default();
    let mut files = Vec::new();
    if spec.delete_scores || spec.delete_uploads {
        removed.scores = store
            .count(
                format!("SELECT COUNT(*) FROM scores WHERE org_id = $1{filter}"),
                org,
                &binds,
                &[],
            )
            .await?;
    }
    if spec.delete_uploads {
        removed.assessments = store
            .count(
                format!("SELECT COUNT(*) FROM assessments WHERE org_id = $1{filter}"),
                org,
                &binds,
                &[],
            )
            .await?;
        removed.readiness = store
            .count(
                format!("SELECT COUNT(*) FROM readiness WHERE org_id = $1{filter}"),
                org,
                &binds,
                &[],
            )
            .await?;
        removed.bundles = store
            .count(
                format!("SELECT COUNT(*) FROM bundles WHERE org_id = $1{filter}"),
                org,
                &binds,
                &[],
            )
            .await?;
        files = store
            .files(
                format!("SELECT location, file_name FROM bundles WHERE org_id = $1{filter}"),
                org,
                &binds,
                &[],
            )
            .await?;
    } else if !spec.strip_classes.is_empty() {
        removed.stripped = store
            .count(
                format!("SELECT COUNT(*) FROM assessments WHERE org_id = $1{filter}"),
                org,
                &binds,
                &[],
            )
            .await?
            + store
                .count(
                    format!("SELECT COUNT(*) FROM readiness WHERE org_id = $1{filter}"),
                    org,
                    &binds,
                    &[],
                )
                .await?;
    }
    Ok((removed, files))
}
