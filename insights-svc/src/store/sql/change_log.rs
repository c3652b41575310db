//! The staged-change protocol for insights-svc: staging claims the purge or move (so two settlers
//! never both apply it), applying runs it and removes the staged row in one transaction.

use super::*;

#[async_trait]
impl ChangeLog for SqlStore {
    async fn stage(&self, change: &StagedChange) -> Result<(), ChangeLogError> {
        let mut tx = self.db.begin().await.map_err(db)?;
        // A purge is claimed with its staging, so it is applied and audited once however
        // many passes (or replicas) try; a discarded change releases the claim.
        let claimed = match Change::decode(&change.payload)? {
            Change::Purge(spec) => {
                Some(staged_rows::claim_purge(&mut tx, &spec.purge_id, &spec.org_id).await?)
            }
            Change::MoveInPlace {
                move_id, org_id, ..
            }
            | Change::MoveOut {
                move_id, org_id, ..
            } => Some(
                sql::query(
                    "INSERT INTO applied_moves (move_id, org_id, claimed_at) VALUES ($1, $2, $3)
                     ON CONFLICT (move_id) DO NOTHING",
                )
                .bind(&move_id)
                .bind(&org_id)
                .bind(change.staged_at_ms)
                .execute(&mut tx)
                .await
                .map_err(db)?
                .rows_affected()
                    > 0,
            ),
            Change::Sweep { .. } => None,
        };
        if claimed == Some(false) {
            return Err(ChangeLogError::Refused(TAKEN.to_owned()));
        }
        staged_rows::insert(&mut tx, change).await?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn apply(&self, change: &StagedChange) -> Result<(), ChangeLogError> {
        let staged = Change::decode(&change.payload)?;
        let mut tx = self.db.begin().await.map_err(db)?;
        if !staged_rows::delete(&mut tx, &change.change_id).await? {
            // Settled already: applying twice would apply it twice.
            return Ok(());
        }
        match &staged {
            Change::Sweep { org_id, cutoffs } => {
                Self::apply_sweep(&mut tx, org_id, cutoffs).await?
            }
            Change::Purge(spec) => Self::apply_purge(&mut tx, spec, change.staged_at_ms).await?,
            Change::MoveInPlace {
                org_id, from, to, ..
            } => {
                sql::query("UPDATE bundles SET location = $1 WHERE org_id = $2 AND location = $3")
                    .bind(to)
                    .bind(org_id)
                    .bind(from)
                    .execute(&mut tx)
                    .await
                    .map_err(db)?;
            }
            Change::MoveOut {
                org_id,
                part: Part::Data,
                ..
            } => {
                for table in ["assessments", "readiness", "scores"] {
                    sql::query(sqlx::AssertSqlSafe(format!(
                        "DELETE FROM {table} WHERE org_id = $1"
                    )))
                    .bind(org_id)
                    .execute(&mut tx)
                    .await
                    .map_err(db)?;
                }
            }
            Change::MoveOut {
                org_id,
                part: Part::Bundles { location },
                ..
            } => {
                sql::query("DELETE FROM bundles WHERE org_id = $1 AND location = $2")
                    .bind(org_id)
                    .bind(location)
                    .execute(&mut tx)
                    .await
                    .map_err(db)?;
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn discard(&self, change_id: &str) -> Result<(), ChangeLogError> {
        let mut tx = self.db.begin().await.map_err(db)?;
        let payload: Option<(String,)> =
            sql::query("SELECT payload FROM staged_changes WHERE change_id = $1")
                .bind(change_id)
                .fetch_optional(&mut tx)
                .await
                .map_err(db)?;
        // Not applied: the purge or move may be claimed again.
        match payload.map(|(p,)| Change::decode(&p)) {
            Some(Ok(Change::Purge(spec))) => {
                staged_rows::release_purge(&mut tx, &spec.purge_id).await?;
            }
            Some(Ok(Change::MoveInPlace { move_id, .. } | Change::MoveOut { move_id, .. })) => {
                sql::query("DELETE FROM applied_moves WHERE move_id = $1")
                    .bind(&move_id)
                    .execute(&mut tx)
                    .await
                    .map_err(db)?;
            }
            _ => {}
        }
        staged_rows::delete(&mut tx, change_id).await?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn staged(&self, org_id: Option<&str>) -> Result<Vec<StagedChange>, ChangeLogError> {
        staged_rows::list(&self.db, org_id).await
    }
}
