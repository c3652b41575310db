//! Purges and erasures: what a consent purge or a subject erasure removes or strips, counted before
//! it is staged and applied inside the change's transaction, and the retention sweep.

use super::*;

impl SqlStore {
    pub(super) async fn count_where(
        on: impl sql::Executor,
        sql: String,
        binds: &[String],
        tail: &[i64],
    ) -> StoreResult<i64> {
        let mut query = sql::query_as::<(i64,)>(sqlx::AssertSqlSafe(sql));
        for b in binds {
            query = query.bind(b);
        }
        for t in tail {
            query = query.bind(*t);
        }
        Ok(query.fetch_one(on).await?.0)
    }

    pub(super) async fn apply_purge(tx: &mut Tx, spec: &PurgeSpec, now: i64) -> StoreResult<()> {
        Self::lock_org(tx, &spec.org_id, true).await?;
        let (filter, binds) = covered(spec);
        let tail = [spec.before_consent_version, spec.before_revision];
        macro_rules! run {
            ($sql:expr) => {{
                let sql: String = $sql;
                let mut query = sql::query(sqlx::AssertSqlSafe(sql));
                for b in &binds {
                    query = query.bind(b);
                }
                for t in tail {
                    query = query.bind(t);
                }
                query.execute(&mut *tx).await?;
            }};
        }
        if !spec.delete_kinds.is_empty() {
            run!(format!(
                "UPDATE events SET kind = {KIND_TOMBSTONE}, body = NULL, name = '', value = NULL,
                    subject = NULL WHERE {filter} AND {}",
                kinds_in(&spec.delete_kinds)
            ));
        }
        if spec.delete_kinds.contains(&KIND_PAGE_VIEW) {
            let mut query = sql::query_as::<(String, String, i64)>(sqlx::AssertSqlSafe(format!(
                "SELECT DISTINCT org_id, instance_id, day FROM page_view_days WHERE {filter}"
            )));
            for b in &binds {
                query = query.bind(b);
            }
            for t in tail {
                query = query.bind(t);
            }
            let days = query.fetch_all(&mut *tx).await?;
            Self::unmake_view_days(tx, &days).await?;
            run!(format!("DELETE FROM page_view_days WHERE {filter}"));
            run!(format!("DELETE FROM page_viewers WHERE {filter}"));
            let scope = match &spec.instance_id {
                Some(_) => "org_id = $1 AND instance_id = $2",
                None => "org_id = $1",
            };
            let mut query = sql::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM view_times WHERE {scope}"
            )));
            for b in &binds {
                query = query.bind(b);
            }
            query.execute(&mut *tx).await?;
        }
        if spec.delete_kinds.contains(&KIND_METRIC) {
            run!(format!("DELETE FROM rollups WHERE {filter}"));
        }
        let kinds = strip_kinds(spec);
        if !spec.strip_classes.is_empty() && !kinds.is_empty() {
            let sql = format!(
                "SELECT instance_id, event_id, occurred_at, body FROM events WHERE {filter} AND {}
                    AND body IS NOT NULL",
                kinds_in(&kinds)
            );
            let mut query =
                sql::query_as::<(String, String, i64, Vec<u8>)>(sqlx::AssertSqlSafe(sql));
            for b in &binds {
                query = query.bind(b);
            }
            for t in tail {
                query = query.bind(t);
            }
            let rows = query.fetch_all(&mut *tx).await?;
            for (instance_id, event_id, occurred_at, body) in rows {
                if let Some(stripped) = enforce::strip_body(&body, &spec.strip_classes) {
                    sql::query(
                        "UPDATE events SET body = $4 WHERE instance_id = $1 AND event_id = $2
                            AND occurred_at = $3",
                    )
                    .bind(&instance_id)
                    .bind(&event_id)
                    .bind(occurred_at)
                    .bind(stripped)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        sql::query(
            "INSERT INTO applied_purges (purge_id, org_id, applied_at, counts) VALUES ($1, $2, $3,
                '{}')
             ON CONFLICT (purge_id) DO UPDATE SET applied_at = excluded.applied_at",
        )
        .bind(&spec.purge_id)
        .bind(&spec.org_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    pub(super) async fn apply_erase(tx: &mut Tx, spec: &EraseSpec) -> StoreResult<()> {
        for subject in &spec.subjects {
            // The days the viewer was seen on lose their totals (and sketches) until remade.
            let days: Vec<(String, String, i64)> = sql::query(
                "SELECT DISTINCT org_id, instance_id, day FROM page_viewers WHERE instance_id = $1
                    AND viewer = $2 AND stored_at <= $3",
            )
            .bind(&spec.instance_id)
            .bind(subject)
            .bind(spec.until)
            .fetch_all(&mut *tx)
            .await?;
            Self::unmake_view_days(tx, &days).await?;
            // Each erased page view was one counted view: take it off its counter.
            let views: Vec<(String, i64, Option<f64>, i64, i64)> = sql::query(
                "SELECT name, occurred_at, value, consent_version, policy_revision FROM events
                 WHERE instance_id = $1 AND subject = $2 AND stored_at <= $3 AND kind = 4",
            )
            .bind(&spec.instance_id)
            .bind(subject)
            .bind(spec.until)
            .fetch_all(&mut *tx)
            .await?;
            for (page_id, occurred_at, channel, version, revision) in views {
                #[allow(clippy::cast_possible_truncation)]
                let channel = channel.unwrap_or_default() as i64;
                sql::query(
                    "UPDATE page_view_days SET views = views - 1 WHERE instance_id = $1 AND
                        page_id = $2 AND day = $3
                     AND channel = $4 AND consent_version = $5 AND policy_revision = $6",
                )
                .bind(&spec.instance_id)
                .bind(&page_id)
                .bind(occurred_at.div_euclid(DAY_MS))
                .bind(channel)
                .bind(version)
                .bind(revision)
                .execute(&mut *tx)
                .await?;
            }
            sql::query("DELETE FROM page_view_days WHERE instance_id = $1 AND views <= 0")
                .bind(&spec.instance_id)
                .execute(&mut *tx)
                .await?;
            sql::query(sqlx::AssertSqlSafe(format!(
                "UPDATE events SET kind = {KIND_TOMBSTONE}, body = NULL, name = '', value = NULL,
                    subject = NULL
                 WHERE instance_id = $1 AND subject = $2 AND stored_at <= $3"
            )))
            .bind(&spec.instance_id)
            .bind(subject)
            .bind(spec.until)
            .execute(&mut *tx)
            .await?;
            sql::query(
                "DELETE FROM page_viewers WHERE instance_id = $1 AND viewer = $2 AND
                stored_at <= $3",
            )
            .bind(&spec.instance_id)
            .bind(subject)
            .bind(spec.until)
            .execute(&mut *tx)
            .await?;
            sql::query(
                "DELETE FROM view_times WHERE instance_id = $1 AND viewer = $2 AND stored_at <= $3",
            )
            .bind(&spec.instance_id)
            .bind(subject)
            .bind(spec.until)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    pub(super) async fn delete_chunked(
        &self,
        sql: String,
        org_id: &str,
        before: i64,
    ) -> StoreResult<i64> {
        let mut total = 0;
        loop {
            let done = sql::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(org_id)
                .bind(before)
                .bind(SWEEP_CHUNK)
                .execute(&self.db)
                .await?
                .rows_affected();
            total += i64::try_from(done).unwrap_or(i64::MAX);
            if done < u64::try_from(SWEEP_CHUNK).unwrap_or(u64::MAX) {
                return Ok(total);
            }
        }
    }
}

pub(super) async fn purge_applied(store: &SqlStore, purge_id: &str) -> StoreResult<bool> {
    let row: Option<(String,)> =
        sql::query("SELECT purge_id FROM applied_purges WHERE purge_id = $1")
            .bind(purge_id)
            .fetch_optional(&store.db)
            .await?;
    Ok(row.is_some())
}

pub(super) async fn purge_counts(store: &SqlStore, spec: &PurgeSpec) -> StoreResult<Removed> {
    let (filter, binds) = covered(spec);
    let tail = [spec.before_consent_version, spec.before_revision];
    let mut removed = Removed::default();
    if !spec.delete_kinds.is_empty() {
        let kinds = kinds_in(&spec.delete_kinds);
        removed.events = SqlStore::count_where(
            &store.db,
            format!("SELECT COUNT(*) FROM events WHERE {filter} AND {kinds}"),
            &binds,
            &tail,
        )
        .await?;
        removed.page_views = SqlStore::count_where(
            &store.db,
            format!("SELECT COUNT(*) FROM events WHERE {filter} AND kind = {KIND_PAGE_VIEW}"),
            &binds,
            &tail,
        )
        .await?;
        removed.feature_usage = SqlStore::count_where(
            &store.db,
            format!("SELECT COUNT(*) FROM events WHERE {filter} AND kind = {KIND_FEATURE_USAGE}"),
            &binds,
            &tail,
        )
        .await?;
        removed.page_views = if spec.delete_kinds.contains(&KIND_PAGE_VIEW) {
            removed.page_views
        } else {
            0
        };
        removed.feature_usage = if spec.delete_kinds.contains(&KIND_FEATURE_USAGE) {
            removed.feature_usage
        } else {
            0
        };
    }
    if spec.delete_kinds.contains(&KIND_PAGE_VIEW) {
        removed.view_counters = SqlStore::count_where(
            &store.db,
            format!("SELECT COUNT(*) FROM page_view_days WHERE {filter}"),
            &binds,
            &tail,
        )
        .await?;
        removed.unique_viewer_entries = SqlStore::count_where(
            &store.db,
            format!("SELECT COUNT(*) FROM page_viewers WHERE {filter}"),
            &binds,
            &tail,
        )
        .await?;
        let scope = match &spec.instance_id {
            Some(_) => "org_id = $1 AND instance_id = $2",
            None => "org_id = $1",
        };
        removed.dedupe_entries = SqlStore::count_where(
            &store.db,
            format!("SELECT COUNT(*) FROM view_times WHERE {scope}"),
            &binds,
            &[],
        )
        .await?;
    }
    if spec.delete_kinds.contains(&KIND_METRIC) {
        removed.rollups = SqlStore::count_where(
            &store.db,
            format!("SELECT COUNT(*) FROM rollups WHERE {filter}"),
            &binds,
            &tail,
        )
        .await?;
    }
    let kinds = strip_kinds(spec);
    if !spec.strip_classes.is_empty() && !kinds.is_empty() {
        removed.stripped = SqlStore::count_where(
            &store.db,
            format!(
                "SELECT COUNT(*) FROM events WHERE {filter} AND {} AND body IS NOT NULL",
                kinds_in(&kinds)
            ),
            &binds,
            &tail,
        )
        .await?;
    }
    Ok(removed)
}

pub(super) async fn erase_counts(store: &SqlStore, spec: &EraseSpec) -> StoreResult<Removed> {
    let mut removed = Removed::default();
    for subject in &spec.subjects {
        let binds = [spec.instance_id.clone(), subject.clone()];
        removed.page_views += SqlStore::count_where(
            &store.db,
            format!(
                "SELECT COUNT(*) FROM events WHERE instance_id = $1 AND subject = $2 AND
                    stored_at <= $3 AND kind = {KIND_PAGE_VIEW}"
            ),
            &binds,
            &[spec.until],
        )
        .await?;
        removed.feature_usage += SqlStore::count_where(
            &store.db,
            format!(
                "SELECT COUNT(*) FROM events WHERE instance_id = $1 AND subject = $2 AND
                    stored_at <= $3 AND kind = {KIND_FEATURE_USAGE}"
            ),
            &binds,
            &[spec.until],
        )
        .await?;
        removed.unique_viewer_entries += SqlStore::count_where(
            &store.db,
            "SELECT COUNT(*) FROM page_viewers WHERE instance_id = $1 AND viewer = $2 AND
                    stored_at <= $3"
                .to_owned(),
            &binds,
            &[spec.until],
        )
        .await?;
        removed.dedupe_entries += SqlStore::count_where(
            &store.db,
            "SELECT COUNT(*) FROM view_times WHERE instance_id = $1 AND viewer = $2 AND
                    stored_at <= $3"
                .to_owned(),
            &binds,
            &[spec.until],
        )
        .await?;
    }
    removed.events = removed.page_views + removed.feature_usage;
    Ok(removed)
}

pub(super) async fn sweep(
    store: &SqlStore,
    org_id: &str,
    raw_before: i64,
    aggregate_before: i64,
    ids_before: i64,
) -> StoreResult<Removed> {
    let mut removed = Removed {
        events: store
            .delete_chunked(
                "DELETE FROM events WHERE (instance_id, event_id, occurred_at) IN (SELECT
                instance_id, event_id, occurred_at FROM events WHERE org_id = $1 AND occurred_at <
                $2 LIMIT $3)"
                    .to_owned(),
                org_id,
                raw_before,
            )
            .await?,
        ..Removed::default()
    };
    removed.events += store
        .delete_chunked(
            format!(
                "DELETE FROM events WHERE (instance_id, event_id, occurred_at) IN (SELECT
                instance_id, event_id, occurred_at FROM events WHERE org_id = $1 AND kind =
                {KIND_TOMBSTONE} AND occurred_at < $2 LIMIT $3)"
            ),
            org_id,
            ids_before,
        )
        .await?;
    let raw_day = raw_before.div_euclid(DAY_MS);
    removed.view_counters = store
        .delete_chunked(
            "DELETE FROM page_view_days WHERE (instance_id, page_id, day, channel,
                consent_version, policy_revision) IN (SELECT instance_id, page_id, day, channel,
                consent_version, policy_revision FROM page_view_days WHERE org_id = $1 AND day <
                $2 LIMIT $3)"
                .to_owned(),
            org_id,
            raw_day,
        )
        .await?;
    removed.unique_viewer_entries = store
        .delete_chunked(
            "DELETE FROM page_viewers WHERE (instance_id, page_id, day, viewer) IN (SELECT
                instance_id, page_id, day, viewer FROM page_viewers WHERE org_id = $1 AND day < $2
                LIMIT $3)"
                .to_owned(),
            org_id,
            raw_day,
        )
        .await?;
    // Day totals and their sketches go with the days they sum up.
    removed.view_counters += store
        .delete_chunked(
            "DELETE FROM view_day_totals WHERE (instance_id, space_id, day) IN (SELECT
                instance_id, space_id, day FROM view_day_totals WHERE org_id = $1 AND day < $2
                LIMIT $3)"
                .to_owned(),
            org_id,
            raw_day,
        )
        .await?;
    store
        .delete_chunked(
            "DELETE FROM view_days_dirty WHERE (instance_id, day) IN (SELECT instance_id, day FROM
                view_days_dirty WHERE org_id = $1 AND day < $2 LIMIT $3)"
                .to_owned(),
            org_id,
            raw_day,
        )
        .await?;
    removed.dedupe_entries = store
        .delete_chunked(
            "DELETE FROM view_times WHERE (instance_id, page_id, viewer, at, event_id) IN (SELECT
                instance_id, page_id, viewer, at, event_id FROM view_times WHERE org_id = $1 AND
                at < $2 LIMIT $3)"
                .to_owned(),
            org_id,
            raw_before,
        )
        .await?;
    removed.rollups = store
        .delete_chunked(
            "DELETE FROM rollups WHERE (instance_id, name, tags, hour) IN (SELECT instance_id,
                name, tags, hour FROM rollups WHERE org_id = $1 AND hour < $2 LIMIT $3)"
                .to_owned(),
            org_id,
            aggregate_before,
        )
        .await?;
    Ok(removed)
}
