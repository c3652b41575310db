//! PostgreSQL keeps events in one partition per day (UTC) of `occurred_at` (migration 0006):
//! each day's partition is made ahead of time, and retention drops a day whose every row has
//! expired instead of deleting the rows one by one. SQLite has no partitions: both calls do
//! nothing there, and its retention deletes rows.
//!
//! An event for a day without a partition lands in `events_default`; making the day's partition
//! moves those rows into it in the same transaction. Replicas serialise their partition changes on
//! one advisory lock, and each waits at most [`LOCK_WAIT`] for the table locks (a drop or an
//! attach takes the parent's exclusively for a moment), so it never stalls ingest: it tries again
//! on the next pass.

use std::collections::BTreeMap;

use sightline_runtime::sql::{self, Backend, Tx};
use sightline_runtime::time::{self, DAY_MS};

use super::SqlStore;
use crate::store::StoreResult;

const PARTITION_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtext('sightline-collector: events partitions'))";
const LOCK_WAIT: &str = "SET LOCAL lock_timeout = '5s'";

/// A day partition's name: `events_YYYY_MM_DD` (digits and underscores: safe to write into SQL).
fn partition_name(day: i64) -> String {
    format!("events_{}", time::day_text(day).replace('-', "_"))
}

/// The day of a partition's name; None for the default partition or any other table.
fn partition_day(name: &str) -> Option<i64> {
    let day = time::day_of_text(&name.strip_prefix("events_")?.replace('_', "-"))?;
    (partition_name(day) == name).then_some(day)
}

/// The day partitions of `events`, by day.
async fn partitions(tx: &mut Tx) -> StoreResult<BTreeMap<i64, String>> {
    let names: Vec<(String,)> = sql::query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'events'::regclass",
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(names
        .into_iter()
        .filter_map(|(name,)| Some((partition_day(&name)?, name)))
        .collect())
}

/// The orgs with rows in one partition: a loose scan of its `(org_id, occurred_at)` index, one
/// probe per org rather than a read of every row.
async fn orgs_in(tx: &mut Tx, name: &str) -> StoreResult<Vec<String>> {
    let orgs: Vec<(String,)> = sql::query(sqlx::AssertSqlSafe(format!(
        "WITH RECURSIVE o(org) AS (
            SELECT min(org_id) FROM {name}
            UNION ALL
            SELECT (SELECT min(org_id) FROM {name} WHERE org_id > o.org) FROM o
            WHERE o.org IS NOT NULL)
         SELECT org FROM o WHERE org IS NOT NULL"
    )))
    .fetch_all(&mut *tx)
    .await?;
    Ok(orgs.into_iter().map(|(org,)| org).collect())
}

/// Whether every org with rows in the partition ending at `end` may lose them.
fn all_expired(orgs: &[String], raw_before: &BTreeMap<String, i64>, end: i64) -> bool {
    orgs.iter()
        .all(|org| raw_before.get(org).is_some_and(|&before| before >= end))
}

impl SqlStore {
    /// Makes the day partitions of events for days `from_day..=to_day` that do not exist yet;
    /// returns how many it made. SQLite: none.
    pub(super) async fn prepare_days(&self, from_day: i64, to_day: i64) -> StoreResult<usize> {
        if self.db.backend() != Backend::Postgres {
            return Ok(0);
        }
        let mut tx = self.db.begin().await?;
        let missing: Vec<i64> = {
            let existing = partitions(&mut tx).await?;
            (from_day..=to_day)
                .filter(|d| !existing.contains_key(d))
                .collect()
        };
        if missing.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        sql::query(LOCK_WAIT).execute(&mut tx).await?;
        sql::query(PARTITION_LOCK).execute(&mut tx).await?;
        // Another replica may have made them while this one waited for the lock.
        let existing = partitions(&mut tx).await?;
        let mut made = 0;
        for day in missing.into_iter().filter(|d| !existing.contains_key(d)) {
            let name = partition_name(day);
            let (from, to) = (day * DAY_MS, (day + 1) * DAY_MS);
            for statement in [
                format!("CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS)"),
                format!(
                    "WITH moved AS (DELETE FROM events_default WHERE occurred_at >= {from} AND
                        occurred_at < {to} RETURNING *)
                     INSERT INTO {name} SELECT * FROM moved"
                ),
                format!(
                    "ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ({from}) TO ({to})"
                ),
            ] {
                sql::query(sqlx::AssertSqlSafe(statement))
                    .execute(&mut tx)
                    .await?;
            }
            made += 1;
        }
        tx.commit().await?;
        Ok(made)
    }

    /// Drops each day partition of events whose every row belongs to an org of `raw_before` and
    /// is older than that org's time in it (its raw events before it have expired). A day that
    /// holds a row of any other org (one whose data is moving, or with a longer retention) is
    /// kept: row deletes take its expired rows. Returns the rows removed per org. SQLite: none.
    pub(super) async fn drop_expired_days(
        &self,
        raw_before: &BTreeMap<String, i64>,
    ) -> StoreResult<BTreeMap<String, i64>> {
        let mut removed: BTreeMap<String, i64> = BTreeMap::new();
        let Some(&latest) = raw_before.values().max() else {
            return Ok(removed);
        };
        if self.db.backend() != Backend::Postgres {
            return Ok(removed);
        }
        let candidates = {
            let mut tx = self.db.begin().await?;
            let days = partitions(&mut tx).await?;
            tx.rollback().await?;
            days.into_iter()
                .filter(|(day, _)| (day + 1) * DAY_MS <= latest)
        };
        for (day, name) in candidates {
            let end = (day + 1) * DAY_MS;
            let mut tx = self.db.begin().await?;
            if !all_expired(&orgs_in(&mut tx, &name).await?, raw_before, end) {
                tx.rollback().await?;
                continue;
            }
            // Counted before the lock: no new row of these orgs can come (an event older
            // than an org's retention is refused at the door), and a row of any other org
            // that did is seen below, under the lock, and keeps the day.
            let counts: Vec<(String, i64)> = sql::query(sqlx::AssertSqlSafe(format!(
                "SELECT org_id, COUNT(*) FROM {name} GROUP BY org_id"
            )))
            .fetch_all(&mut tx)
            .await?;
            sql::query(LOCK_WAIT).execute(&mut tx).await?;
            sql::query(PARTITION_LOCK).execute(&mut tx).await?;
            sql::query(sqlx::AssertSqlSafe(format!(
                "LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE"
            )))
            .execute(&mut tx)
            .await?;
            if !all_expired(&orgs_in(&mut tx, &name).await?, raw_before, end) {
                tx.rollback().await?;
                continue;
            }
            sql::query(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
                .execute(&mut tx)
                .await?;
            tx.commit().await?;
            tracing::info!(partition = %name, "retention dropped an expired day of events");
            for (org, n) in counts {
                *removed.entry(org).or_default() += n;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip_and_nothing_else_parses() {
        let day = time::day_of_text("2026-12-03").unwrap();
        assert_eq!(partition_name(day), "events_2026_12_03");
        assert_eq!(partition_day("events_2026_12_03"), Some(day));
        for other in [
            "events_default",
            "events",
            "events_2026_02_30",
            "events_2026-12-03",
            "page_viewers_2026_12_03",
            "events_2026_12_03_x",
        ] {
            assert_eq!(partition_day(other), None, "{other}");
        }
    }

    #[test]
    fn a_day_goes_only_when_every_org_in_it_has_expired_there() {
        let end = 10 * DAY_MS;
        let raw_before: BTreeMap<String, i64> = [("a".to_owned(), end), ("b".to_owned(), end - 1)]
            .into_iter()
            .collect();
        assert!(all_expired(&["a".to_owned()], &raw_before, end));
        assert!(!all_expired(
            &["a".to_owned(), "b".to_owned()],
            &raw_before,
            end
        ));
        assert!(!all_expired(&["unknown".to_owned()], &raw_before, end));
        assert!(all_expired(&[], &raw_before, end));
    }
}
