//! The staged-change protocol for collector-svc: staging claims the purge, erasure or move (so two
//! settlers never both apply it), applying runs it and removes the staged row in one transaction.

use super::*;

#[async_trait]
impl ChangeLog for SqlStore {
    async fn stage(&self, change: &StagedChange) -> Result<(), ChangeLogError> {
        let mut tx = self.db.begin().await.map_err(db)?;
        // A purge is claimed with its staging: a second purger (another pass, another
        // replica) cannot stage it, so it is applied and audited once. The claim goes with
        // a discarded change and becomes the applied mark when the change is applied.
        if let Change::Purge { spec } = Change::decode(&change.payload)?
            && !staged_rows::claim_purge(&mut tx, &spec.purge_id, &spec.org_id).await?
        {
            return Err(ChangeLogError::Refused(PURGE_TAKEN.to_owned()));
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
            Change::Purge { spec } => Self::apply_purge(&mut tx, spec, change.staged_at_ms).await?,
            Change::Erase(spec) => Self::apply_erase(&mut tx, spec).await?,
            Change::MoveOut(spec) => {
                Self::apply_move_out(&mut tx, spec, change.staged_at_ms).await?
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
        if let Some((payload,)) = payload
            && let Ok(Change::Purge { spec }) = Change::decode(&payload)
        {
            // Not applied: the purge may be claimed again.
            staged_rows::release_purge(&mut tx, &spec.purge_id).await?;
        }
        staged_rows::delete(&mut tx, change_id).await?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn staged(&self, org_id: Option<&str>) -> Result<Vec<StagedChange>, ChangeLogError> {
        staged_rows::list(&self.db, org_id).await
    }
}
