//! The SQL of [`CollectorStore`], written once for SQLite and PostgreSQL (both take `$n` placeholders,
//! `ON CONFLICT`, `RETURNING` and row values). SQLite write transactions take the lock up front; on
//! PostgreSQL a commit holds a shared advisory lock per org and a purge an exclusive one, so a batch
//! enforced under an old policy can never commit after the purge that covers it.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use async_trait::async_trait;
use sightline_runtime::sql::{self, Backend, Database, Tx};

use sightline_runtime::audited::{ChangeLog, ChangeLogError, StagedChange, staged_rows};

use super::days::{self, DayPart};
use super::moved::Type;
use super::{
    Batch, BatchOutcome, Change, CollectorStore, EraseSpec, Fence, Held, MOVED_TABLES, MoveSpec,
    PurgeSpec, Ranked, Removed, Revisions, Rollup, RowOutcome, Sample, StoreError, StoreResult,
    Table, Value, ViewScope, ViewTotals,
};
use crate::enforce::{self, DAY_MS};

use sightline_runtime::time::HOUR_MS;
/// Rows per INSERT statement: a fixed size keeps the statement text (and its prepared form) reused.
const INSERT_CHUNK: usize = 200;
/// Rows per DELETE of a sweep, so no write transaction runs long.
const SWEEP_CHUNK: i64 = 5_000;
/// On PostgreSQL a commit holds the org's lock shared and a purge exclusively (SQLite has one
/// writer at a time).
const SHARED_LOCK: &str = "SELECT pg_advisory_xact_lock_shared(hashtext($1))";
const EXCLUSIVE_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext($1))";
const KIND_TOMBSTONE: i64 = 0;
/// `applied_purges.applied_at` of a purge staged but not applied yet (its claim).
const PURGE_CLAIMED: i64 = -1;
/// What staging a purge that another purger holds answers.
pub const PURGE_TAKEN: &str = "the purge is already staged or applied";
const KIND_METRIC: i64 = 2;
const KIND_FEATURE_USAGE: i64 = 3;
const KIND_PAGE_VIEW: i64 = 4;

fn db(error: sqlx::Error) -> ChangeLogError {
    StoreError::from(error).into()
}

/// `kind IN (…)` for kind numbers (integers we parsed: safe to write into the SQL).
fn kinds_in(kinds: &[i64]) -> String {
    let list: Vec<String> = kinds.iter().map(i64::to_string).collect();
    format!("kind IN ({})", list.join(", "))
}

/// The filter of a purge's covered records, with its binds: org, then instance when scoped.
fn covered(spec: &PurgeSpec) -> (String, Vec<String>) {
    match &spec.instance_id {
        Some(instance) => (
            "org_id = $1 AND instance_id = $2 AND consent_version < $3 AND policy_revision < $4"
                .to_owned(),
            vec![spec.org_id.clone(), instance.clone()],
        ),
        None => (
            "org_id = $1 AND consent_version < $2 AND policy_revision < $3".to_owned(),
            vec![spec.org_id.clone()],
        ),
    }
}

/// A report scope's filter over page_view_days / page_viewers, with its binds.
fn scope_filter(scope: &ViewScope) -> (&'static str, Vec<String>) {
    match scope {
        ViewScope::Page {
            instance_id,
            page_id,
        } => (
            "instance_id = $1 AND page_id = $2",
            vec![instance_id.clone(), page_id.clone()],
        ),
        ViewScope::Space {
            instance_id,
            space_id,
        } => (
            "instance_id = $1 AND space_id = $2",
            vec![instance_id.clone(), space_id.clone()],
        ),
        ViewScope::Org {
            org_id,
            instance_id: Some(instance),
        } => (
            "org_id = $1 AND instance_id = $2",
            vec![org_id.clone(), instance.clone()],
        ),
        ViewScope::Org {
            org_id,
            instance_id: None,
        } => ("org_id = $1", vec![org_id.clone()]),
    }
}

/// `($first, …)` placeholders for `count` values starting at `$first`.
fn placeholders(first: usize, count: usize) -> String {
    let list: Vec<String> = (first..first + count).map(|n| format!("${n}")).collect();
    format!("({})", list.join(", "))
}

/// Kinds of the rows of a purge whose bodies may carry a stripped class.
fn strip_kinds(spec: &PurgeSpec) -> Vec<i64> {
    enforce::kinds_with_classes(&spec.strip_classes)
        .into_iter()
        .filter(|k| !spec.delete_kinds.contains(k))
        .collect()
}

/// How one try at a group commit ended.
enum Attempt {
    Done(Vec<BatchOutcome>, Held),
    /// SQLite's fast path met an id stored before: roll back and commit carefully.
    Careful,
    /// A policy change was applied while the rows went in: roll back and try again.
    Again,
}

/// Where one view's count goes: the page's day counter and the day's viewers.
struct Counted<'a> {
    org_id: &'a str,
    instance_id: &'a str,
    page_id: &'a str,
    space_id: &'a str,
    viewer: Option<&'a str>,
    at: i64,
    channel: i64,
    consent_version: i64,
    policy_revision: i64,
    stored_at: i64,
}

impl<'a> Counted<'a> {
    fn of(batch: &'a Batch, row: &crate::store::Row, view: &'a crate::store::View) -> Self {
        Self {
            org_id: &batch.org_id,
            instance_id: &batch.instance_id,
            page_id: &view.page_id,
            space_id: &view.space_id,
            viewer: view.viewer.as_deref(),
            at: row.occurred_at,
            channel: view.channel,
            consent_version: batch.consent_version,
            policy_revision: batch.policy_revision,
            stored_at: batch.stored_at,
        }
    }
}

/// collector-svc's store on either backend, holding one location's data.
#[derive(Debug, Clone)]
pub struct SqlStore {
    db: Database,
    location: String,
}

impl SqlStore {
    pub fn new(db: Database, location: &str) -> Self {
        Self {
            db,
            location: location.to_owned(),
        }
    }

    /// Locks the org against purges (shared: commits; exclusive: purges), PostgreSQL only.
    async fn lock_org(tx: &mut Tx, org_id: &str, exclusive: bool) -> StoreResult<()> {
        if tx.backend() == Backend::Postgres {
            let sql = if exclusive {
                EXCLUSIVE_LOCK
            } else {
                SHARED_LOCK
            };
            sql::query(sql).bind(org_id).execute(&mut *tx).await?;
        }
        Ok(())
    }

    /// One try at committing `batches`: done, or rolled back for the fast path's repeated
    /// id or for a policy change applied while the rows went in.
    async fn commit_once(
        &self,
        batches: &[Batch],
        current: Revisions<'_>,
        careful: bool,
        fence: &Fence,
    ) -> StoreResult<Attempt> {
        let mut tx = self.db.begin().await?;
        let orgs: BTreeSet<&str> = batches.iter().map(|b| b.org_id.as_str()).collect();
        for org in orgs {
            Self::lock_org(&mut tx, org, false).await?;
        }
        let mut outcomes = Vec::with_capacity(batches.len());
        for batch in batches {
            let revision = u64::try_from(batch.policy_revision).ok();
            if current(&batch.org_id, &batch.instance_id) != revision {
                outcomes.push(BatchOutcome::Stale);
                continue;
            }
            let Some(inserted) = Self::insert_rows(&mut tx, batch, &self.location, careful).await?
            else {
                tx.rollback().await?;
                return Ok(Attempt::Careful);
            };
            let mut rows = Vec::with_capacity(batch.rows.len());
            let mut hours = BTreeSet::new();
            let mut days = BTreeSet::new();
            for (row, inserted) in batch.rows.iter().zip(inserted) {
                if !inserted {
                    rows.push(RowOutcome::Duplicate);
                    continue;
                }
                if let Some(view) = &row.view {
                    let outcome = Self::count_view(&mut tx, batch, row, view).await?;
                    if outcome == RowOutcome::Stored {
                        days.insert(row.occurred_at.div_euclid(DAY_MS));
                    }
                    rows.push(outcome);
                    continue;
                }
                if row.kind == KIND_METRIC {
                    hours.insert(row.occurred_at.div_euclid(HOUR_MS) * HOUR_MS);
                }
                rows.push(RowOutcome::Stored);
            }
            for hour in hours {
                sql::query("INSERT INTO rollup_dirty (instance_id, hour, org_id) VALUES ($1, $2, $3) ON CONFLICT (instance_id, hour) DO NOTHING")
                    .bind(&batch.instance_id)
                    .bind(hour)
                    .bind(&batch.org_id)
                    .execute(&mut tx)
                    .await?;
            }
            for day in days {
                Self::mark_view_day(&mut tx, &batch.org_id, &batch.instance_id, day).await?;
            }
            outcomes.push(BatchOutcome::Committed(rows));
        }
        // The fence, then the revisions again: a change applied since the start is seen
        // here (and sends this try back), one not applied yet waits for this commit.
        let held = fence.enter().await;
        let changed = batches.iter().zip(&outcomes).any(|(batch, outcome)| {
            matches!(outcome, BatchOutcome::Committed(_))
                && current(&batch.org_id, &batch.instance_id)
                    != u64::try_from(batch.policy_revision).ok()
        });
        if changed {
            tx.rollback().await?;
            return Ok(Attempt::Again);
        }
        tx.commit().await?;
        Ok(Attempt::Done(outcomes, held))
    }

    /// Inserts a batch's rows; per row, whether this insert stored it (false: its id was
    /// stored before). None when `careful` is off and a repeated id was met: SQLite's
    /// fast path cannot tell which row it was, so the caller rolls back and commits again
    /// carefully.
    async fn insert_rows(
        tx: &mut Tx,
        batch: &Batch,
        location: &str,
        careful: bool,
    ) -> StoreResult<Option<Vec<bool>>> {
        // PostgreSQL's concurrent writers learn which rows were theirs from RETURNING.
        let returning = tx.backend() == Backend::Postgres;
        let mut inserted = Vec::with_capacity(batch.rows.len());
        for chunk in batch.rows.chunks(INSERT_CHUNK) {
            // SQLite has one writer at a time: what is not stored before this statement is
            // stored by it. Reading that first (careful) is far cheaper there than
            // RETURNING, whose rows cross from SQLite's thread one by one; and a batch of
            // ids never seen (the usual case) needs neither: the count says so.
            // PostgreSQL's concurrent writers need RETURNING to know which rows were theirs.
            let existing: HashSet<String> = if returning || !careful {
                HashSet::new()
            } else {
                let mut query = sql::Builder::new(
                    tx.backend(),
                    "SELECT event_id FROM events WHERE instance_id = ",
                );
                query
                    .push_bind(&batch.instance_id)
                    .push(" AND event_id IN (");
                let mut ids = query.separated();
                for row in chunk {
                    ids.push_bind(&row.event_id);
                }
                query.push(")");
                let found: Vec<(String,)> = query.build().fetch_all(&mut *tx).await?;
                found.into_iter().map(|(id,)| id).collect()
            };
            // On SQLite, OR IGNORE: no constraint can then abort the statement halfway, so
            // SQLite keeps no statement journal for it (a copy of every page it changes).
            // Only the key can conflict; the count below proves it.
            let mut query = sql::Builder::new(
                tx.backend(),
                if returning {
                    "INSERT INTO events (instance_id, event_id, org_id, location, kind, occurred_at, stored_at, name, value, subject, consent_version, policy_revision, body) "
                } else {
                    "INSERT OR IGNORE INTO events (instance_id, event_id, org_id, location, kind, occurred_at, stored_at, name, value, subject, consent_version, policy_revision, body) "
                },
            );
            query.push_values(chunk, |b, row| {
                b.push_bind(&batch.instance_id)
                    .push_bind(&row.event_id)
                    .push_bind(&batch.org_id)
                    .push_bind(location)
                    .push_bind(row.kind)
                    .push_bind(row.occurred_at)
                    .push_bind(batch.stored_at)
                    .push_bind(&row.name)
                    .push_bind(row.value)
                    .push_bind(row.subject.as_deref())
                    .push_bind(batch.consent_version)
                    .push_bind(batch.policy_revision)
                    .push_bind(row.body.as_slice());
            });
            if returning {
                query.push(" ON CONFLICT (instance_id, event_id) DO NOTHING RETURNING event_id");
                let ids: Vec<(String,)> = query.build().fetch_all(&mut *tx).await?;
                let ids: HashSet<String> = ids.into_iter().map(|(id,)| id).collect();
                inserted.extend(chunk.iter().map(|row| ids.contains(&row.event_id)));
            } else {
                let stored = query.build().execute(&mut *tx).await?.rows_affected();
                let expected = chunk
                    .iter()
                    .filter(|row| !existing.contains(&row.event_id))
                    .count();
                if usize::try_from(stored).ok() == Some(expected) {
                    inserted.extend(chunk.iter().map(|row| !existing.contains(&row.event_id)));
                } else if careful {
                    // Something other than a repeated id was ignored: nothing of the
                    // transaction may stand, or an ack would cover a row not stored.
                    return Err(StoreError::Inconsistent(format!(
                        "an insert of {} events stored {stored}, {expected} expected",
                        chunk.len()
                    )));
                } else {
                    return Ok(None);
                }
            }
        }
        Ok(Some(inserted))
    }

    /// Counts one stored page view, unless the viewer saw the page inside the blocking time.
    /// Counts a page view that was just stored. With a viewer and a blocking time, the view
    /// counts when no counted view of the same viewer and page lies within the blocking time
    /// before it *in time order* (views at the same time ordered by event id), whatever order
    /// they arrive in: a view that arrives earlier than views already counted is placed in
    /// the chain, and the views after it are counted again — a view that turns out to lie
    /// inside the new view's window stops counting, one that no longer does starts — with
    /// the counters and the days' totals corrected. A view not counted keeps no event row;
    /// its time stays in `view_times` (the counter's memory) so later corrections can count
    /// it. The result is the same counts as the views sent in time order.
    async fn count_view(
        tx: &mut Tx,
        batch: &Batch,
        row: &crate::store::Row,
        view: &crate::store::View,
    ) -> StoreResult<RowOutcome> {
        let (Some(viewer), true) = (&view.viewer, batch.blocking_time_ms > 0) else {
            Self::add_count(tx, &Counted::of(batch, row, view), 1).await?;
            return Ok(RowOutcome::Stored);
        };
        let block = batch.blocking_time_ms;
        let (t, event) = (row.occurred_at, row.event_id.as_str());
        sql::query(
            "INSERT INTO view_times (instance_id, page_id, viewer, at, event_id, org_id, stored_at, counted, channel, space_id, consent_version, policy_revision)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
        )
        .bind(&batch.instance_id)
        .bind(&view.page_id)
        .bind(viewer)
        .bind(t)
        .bind(event)
        .bind(&batch.org_id)
        .bind(batch.stored_at)
        .bind(view.channel)
        .bind(&view.space_id)
        .bind(batch.consent_version)
        .bind(batch.policy_revision)
        .execute(&mut *tx)
        .await?;
        // The counted view just before this one, in time order.
        let before: Option<(i64,)> = sql::query(
            "SELECT at FROM view_times WHERE instance_id = $1 AND page_id = $2 AND viewer = $3 AND counted = 1
               AND (at < $4 OR (at = $4 AND event_id < $5)) ORDER BY at DESC, event_id DESC LIMIT 1",
        )
        .bind(&batch.instance_id)
        .bind(&view.page_id)
        .bind(viewer)
        .bind(t)
        .bind(event)
        .fetch_optional(&mut *tx)
        .await?;
        if before.is_some_and(|(at,)| t < at.saturating_add(block)) {
            // Inside that view's window: not counted, and nothing after it changes.
            sql::query("DELETE FROM events WHERE instance_id = $1 AND event_id = $2")
                .bind(&batch.instance_id)
                .bind(event)
                .execute(&mut *tx)
                .await?;
            return Ok(RowOutcome::Blocked);
        }
        // This view counts; the views after it are counted again from it, until the chain
        // meets a view it counted before (from there on it is what it was).
        let later: Vec<(i64, String, i64, i64, String, i64, i64)> = sql::query(
            "SELECT at, event_id, counted, channel, space_id, consent_version, policy_revision FROM view_times
             WHERE instance_id = $1 AND page_id = $2 AND viewer = $3 AND (at > $4 OR (at = $4 AND event_id >= $5))
             ORDER BY at, event_id",
        )
        .bind(&batch.instance_id)
        .bind(&view.page_id)
        .bind(viewer)
        .bind(t)
        .bind(event)
        .fetch_all(&mut *tx)
        .await?;
        let mut last: Option<i64> = None;
        for (at, event_id, counted, channel, space_id, consent_version, policy_revision) in later {
            let this = event_id == event && at == t;
            let counts = last.is_none_or(|l| at >= l.saturating_add(block));
            if counts {
                last = Some(at);
            }
            if !this && counts && counted == 1 {
                break;
            }
            if this || counts != (counted == 1) {
                sql::query(
                    "UPDATE view_times SET counted = $6 WHERE instance_id = $1 AND page_id = $2 AND viewer = $3 AND at = $4 AND event_id = $5",
                )
                .bind(&batch.instance_id)
                .bind(&view.page_id)
                .bind(viewer)
                .bind(at)
                .bind(&event_id)
                .bind(i64::from(counts))
                .execute(&mut *tx)
                .await?;
                let count = Counted {
                    org_id: &batch.org_id,
                    instance_id: &batch.instance_id,
                    page_id: &view.page_id,
                    space_id: &space_id,
                    viewer: Some(viewer),
                    at,
                    channel,
                    consent_version,
                    policy_revision,
                    stored_at: batch.stored_at,
                };
                Self::add_count(tx, &count, if counts { 1 } else { -1 }).await?;
                if !this {
                    Self::mark_view_day(
                        tx,
                        &batch.org_id,
                        &batch.instance_id,
                        at.div_euclid(DAY_MS),
                    )
                    .await?;
                }
            }
        }
        Ok(RowOutcome::Stored)
    }

    /// Adds one view to (`delta` 1) or takes one from (-1) the page's day counter and the
    /// day's viewers (a viewer leaves a day when none of their views of the page that day
    /// counts any more).
    async fn add_count(tx: &mut Tx, c: &Counted<'_>, delta: i64) -> StoreResult<()> {
        let day = c.at.div_euclid(DAY_MS);
        if delta > 0 {
            sql::query(
                "INSERT INTO page_view_days (instance_id, page_id, day, channel, consent_version, policy_revision, org_id, space_id, views)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1)
                 ON CONFLICT (instance_id, page_id, day, channel, consent_version, policy_revision) DO UPDATE SET views = page_view_days.views + 1",
            )
            .bind(c.instance_id)
            .bind(c.page_id)
            .bind(day)
            .bind(c.channel)
            .bind(c.consent_version)
            .bind(c.policy_revision)
            .bind(c.org_id)
            .bind(c.space_id)
            .execute(&mut *tx)
            .await?;
            if let Some(viewer) = c.viewer {
                sql::query(
                    "INSERT INTO page_viewers (instance_id, page_id, day, viewer, org_id, space_id, consent_version, policy_revision, stored_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (instance_id, page_id, day, viewer) DO NOTHING",
                )
                .bind(c.instance_id)
                .bind(c.page_id)
                .bind(day)
                .bind(viewer)
                .bind(c.org_id)
                .bind(c.space_id)
                .bind(c.consent_version)
                .bind(c.policy_revision)
                .bind(c.stored_at)
                .execute(&mut *tx)
                .await?;
            }
            return Ok(());
        }
        // One view less; a counter that reaches nothing goes.
        for sql in [
            "UPDATE page_view_days SET views = views - 1 WHERE instance_id = $1 AND page_id = $2 AND day = $3 AND channel = $4
               AND consent_version = $5 AND policy_revision = $6 AND views > 0",
            "DELETE FROM page_view_days WHERE instance_id = $1 AND page_id = $2 AND day = $3 AND channel = $4
               AND consent_version = $5 AND policy_revision = $6 AND views = 0",
        ] {
            sql::query(sql)
                .bind(c.instance_id)
                .bind(c.page_id)
                .bind(day)
                .bind(c.channel)
                .bind(c.consent_version)
                .bind(c.policy_revision)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(viewer) = c.viewer {
            let (still,): (i64,) = sql::query(
                "SELECT COUNT(*) FROM view_times WHERE instance_id = $1 AND page_id = $2 AND viewer = $3 AND counted = 1
                   AND at >= $4 AND at < $5",
            )
            .bind(c.instance_id)
            .bind(c.page_id)
            .bind(viewer)
            .bind(day * DAY_MS)
            .bind((day + 1) * DAY_MS)
            .fetch_one(&mut *tx)
            .await?;
            if still == 0 {
                sql::query("DELETE FROM page_viewers WHERE instance_id = $1 AND page_id = $2 AND day = $3 AND viewer = $4")
                    .bind(c.instance_id)
                    .bind(c.page_id)
                    .bind(day)
                    .bind(viewer)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        Ok(())
    }

    async fn count_where(&self, sql: String, binds: &[String], tail: &[i64]) -> StoreResult<i64> {
        let mut query = sql::query_as::<(i64,)>(sqlx::AssertSqlSafe(sql));
        for b in binds {
            query = query.bind(b);
        }
        for t in tail {
            query = query.bind(*t);
        }
        Ok(query.fetch_one(&self.db).await?.0)
    }

    async fn apply_purge(tx: &mut Tx, spec: &PurgeSpec, now: i64) -> StoreResult<()> {
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
                "UPDATE events SET kind = {KIND_TOMBSTONE}, body = NULL, name = '', value = NULL, subject = NULL WHERE {filter} AND {}",
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
                "SELECT instance_id, event_id, body FROM events WHERE {filter} AND {} AND body IS NOT NULL",
                kinds_in(&kinds)
            );
            let mut query = sql::query_as::<(String, String, Vec<u8>)>(sqlx::AssertSqlSafe(sql));
            for b in &binds {
                query = query.bind(b);
            }
            for t in tail {
                query = query.bind(t);
            }
            let rows = query.fetch_all(&mut *tx).await?;
            for (instance_id, event_id, body) in rows {
                if let Some(stripped) = enforce::strip_body(&body, &spec.strip_classes) {
                    sql::query(
                        "UPDATE events SET body = $3 WHERE instance_id = $1 AND event_id = $2",
                    )
                    .bind(&instance_id)
                    .bind(&event_id)
                    .bind(stripped)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        sql::query(
            "INSERT INTO applied_purges (purge_id, org_id, applied_at, counts) VALUES ($1, $2, $3, '{}')
             ON CONFLICT (purge_id) DO UPDATE SET applied_at = excluded.applied_at",
        )
        .bind(&spec.purge_id)
        .bind(&spec.org_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn apply_erase(tx: &mut Tx, spec: &EraseSpec) -> StoreResult<()> {
        for subject in &spec.subjects {
            // The days the viewer was seen on lose their totals (and sketches) until remade.
            let days: Vec<(String, String, i64)> = sql::query(
                "SELECT DISTINCT org_id, instance_id, day FROM page_viewers WHERE instance_id = $1 AND viewer = $2 AND stored_at <= $3",
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
                    "UPDATE page_view_days SET views = views - 1 WHERE instance_id = $1 AND page_id = $2 AND day = $3
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
                "UPDATE events SET kind = {KIND_TOMBSTONE}, body = NULL, name = '', value = NULL, subject = NULL
                 WHERE instance_id = $1 AND subject = $2 AND stored_at <= $3"
            )))
            .bind(&spec.instance_id)
            .bind(subject)
            .bind(spec.until)
            .execute(&mut *tx)
            .await?;
            sql::query("DELETE FROM page_viewers WHERE instance_id = $1 AND viewer = $2 AND stored_at <= $3")
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

    /// Marks an instance's day as changed: its totals are remade, and read from the page-view
    /// tables until then.
    async fn mark_view_day(
        tx: &mut Tx,
        org_id: &str,
        instance_id: &str,
        day: i64,
    ) -> StoreResult<()> {
        sql::query(
            "INSERT INTO view_days_dirty (instance_id, day, org_id, generation) VALUES ($1, $2, $3, 0)
             ON CONFLICT (instance_id, day) DO UPDATE SET generation = view_days_dirty.generation + 1",
        )
        .bind(instance_id)
        .bind(day)
        .bind(org_id)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Deletes the totals of (org, instance, day)s and marks those days changed: derived data
    /// goes with what it derives from, and is remade from what is left.
    async fn unmake_view_days(tx: &mut Tx, days: &[(String, String, i64)]) -> StoreResult<()> {
        for (org_id, instance_id, day) in days {
            sql::query("DELETE FROM view_day_totals WHERE instance_id = $1 AND day = $2")
                .bind(instance_id)
                .bind(day)
                .execute(&mut *tx)
                .await?;
            Self::mark_view_day(tx, org_id, instance_id, *day).await?;
        }
        Ok(())
    }

    /// Takes the org's data out: deleted, or relabelled when the new location shares this
    /// database; remembers the move so a resumed move does not copy again.
    async fn apply_move_out(tx: &mut Tx, spec: &MoveSpec, now: i64) -> StoreResult<()> {
        Self::lock_org(tx, &spec.org_id, true).await?;
        if spec.in_place {
            for table in MOVED_TABLES
                .iter()
                .filter(|t| t.location_column().is_some())
            {
                sql::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {} SET location = $2 WHERE org_id = $1",
                    table.name
                )))
                .bind(&spec.org_id)
                .bind(&spec.to_location)
                .execute(&mut *tx)
                .await?;
            }
        } else {
            Self::delete_org(tx, &spec.org_id).await?;
        }
        sql::query(
            "INSERT INTO moved_out (move_id, org_id, to_location, moved_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (move_id) DO NOTHING",
        )
        .bind(&spec.move_id)
        .bind(&spec.org_id)
        .bind(&spec.to_location)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Deletes every row of the org's data, in every moved table.
    async fn delete_org(tx: &mut Tx, org_id: &str) -> StoreResult<()> {
        for table in MOVED_TABLES {
            sql::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {} WHERE org_id = $1",
                table.name
            )))
            .bind(org_id)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    /// One exported row's values, read by the table's column types.
    fn values_of(table: &Table, row: &sql::Row) -> StoreResult<Vec<Value>> {
        table
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| {
                Ok(match ty {
                    Type::Int => Value::Int(row.try_get(i)?),
                    Type::Real => Value::Real(row.try_get(i)?),
                    Type::Text => Value::Text(row.try_get(i)?),
                    Type::Blob => Value::Blob(row.try_get(i)?),
                })
            })
            .collect()
    }

    /// Totals counted from the page-view tables (a page's are small).
    async fn exact_totals(
        &self,
        scope: &ViewScope,
        from_day: i64,
        to_day: i64,
    ) -> StoreResult<ViewTotals> {
        let (filter, binds) = scope_filter(scope);
        let n = binds.len();
        let days = format!("day >= ${} AND day < ${}", n + 1, n + 2);
        let mut query = sql::query_as::<(i64, i64, i64)>(sqlx::AssertSqlSafe(format!(
            "SELECT day, channel, CAST(SUM(views) AS BIGINT) FROM page_view_days WHERE {filter} AND {days} GROUP BY day, channel ORDER BY day, channel"
        )));
        for b in &binds {
            query = query.bind(b);
        }
        let cells = query
            .bind(from_day)
            .bind(to_day)
            .fetch_all(&self.db)
            .await?;
        let mut query = sql::query_as::<(i64, i64)>(sqlx::AssertSqlSafe(format!(
            "SELECT day, COUNT(DISTINCT instance_id || '/' || viewer) FROM page_viewers WHERE {filter} AND {days} GROUP BY day ORDER BY day"
        )));
        for b in &binds {
            query = query.bind(b);
        }
        let uniques = query
            .bind(from_day)
            .bind(to_day)
            .fetch_all(&self.db)
            .await?;
        let unique_viewers = self
            .count_where(
                format!("SELECT COUNT(DISTINCT instance_id || '/' || viewer) FROM page_viewers WHERE {filter} AND {days}"),
                &binds,
                &[from_day, to_day],
            )
            .await?;
        let mut totals = ViewTotals {
            unique_viewers,
            ..ViewTotals::default()
        };
        for (day, channel, views) in cells {
            totals.views += views;
            match totals.by_channel.iter_mut().find(|(c, _)| *c == channel) {
                Some((_, v)) => *v += views,
                None => totals.by_channel.push((channel, views)),
            }
            match totals.by_day.last_mut() {
                Some((d, v, _)) if *d == day => *v += views,
                _ => totals.by_day.push((day, views, 0)),
            }
        }
        totals.by_channel.sort_unstable();
        for (day, unique) in uniques {
            if let Some(entry) = totals.by_day.iter_mut().find(|(d, _, _)| *d == day) {
                entry.2 = unique;
            }
        }
        Ok(totals)
    }

    /// One instance's day from the page-view tables (for a day whose totals are not made
    /// yet), in one space or in all.
    async fn exact_day(
        &self,
        instance_id: &str,
        space_id: Option<&str>,
        day: i64,
    ) -> StoreResult<DayPart> {
        let space = if space_id.is_some() {
            " AND space_id = $3"
        } else {
            ""
        };
        let mut cells = sql::query_as::<(i64, i64)>(sqlx::AssertSqlSafe(format!(
            "SELECT channel, CAST(SUM(views) AS BIGINT) FROM page_view_days WHERE instance_id = $1 AND day = $2{space} GROUP BY channel"
        )))
        .bind(instance_id)
        .bind(day);
        let mut viewers = sql::query_as::<(String,)>(sqlx::AssertSqlSafe(format!(
            "SELECT DISTINCT viewer FROM page_viewers WHERE instance_id = $1 AND day = $2{space}"
        )))
        .bind(instance_id)
        .bind(day);
        if let Some(space_id) = space_id {
            cells = cells.bind(space_id);
            viewers = viewers.bind(space_id);
        }
        let cells = cells.fetch_all(&self.db).await?;
        let viewers: Vec<String> = viewers
            .fetch_all(&self.db)
            .await?
            .into_iter()
            .map(|(v,)| v)
            .collect();
        Ok(DayPart::exact(instance_id, day, &cells, &viewers))
    }

    /// Totals of a space or an org from the day totals, and from the page-view tables for
    /// days changed since their totals were made.
    async fn summed_totals(
        &self,
        scope: &ViewScope,
        from_day: i64,
        to_day: i64,
    ) -> StoreResult<ViewTotals> {
        let (totals_filter, dirty_filter, binds, space) = match scope {
            ViewScope::Space {
                instance_id,
                space_id,
            } => (
                "t.instance_id = $1 AND t.space_id = $2",
                "instance_id = $1",
                vec![instance_id.clone(), space_id.clone()],
                Some(space_id.as_str()),
            ),
            ViewScope::Org {
                org_id,
                instance_id: Some(instance),
            } => (
                "t.org_id = $1 AND t.instance_id = $2 AND t.space_id = ''",
                "org_id = $1 AND instance_id = $2",
                vec![org_id.clone(), instance.clone()],
                None,
            ),
            ViewScope::Org {
                org_id,
                instance_id: None,
            } => (
                "t.org_id = $1 AND t.space_id = ''",
                "org_id = $1",
                vec![org_id.clone()],
                None,
            ),
            ViewScope::Page { .. } => return self.exact_totals(scope, from_day, to_day).await,
        };
        let n = binds.len();
        let mut query = sql::query_as::<(String, i64, i64, String, i64, Vec<u8>)>(sqlx::AssertSqlSafe(format!(
            "SELECT t.instance_id, t.day, t.views, t.channels, t.unique_viewers, t.sketch FROM view_day_totals t
             WHERE {totals_filter} AND t.day >= ${} AND t.day < ${}
               AND NOT EXISTS (SELECT 1 FROM view_days_dirty d WHERE d.instance_id = t.instance_id AND d.day = t.day)",
            n + 1,
            n + 2
        )));
        for b in &binds {
            query = query.bind(b);
        }
        let rows = query
            .bind(from_day)
            .bind(to_day)
            .fetch_all(&self.db)
            .await?;
        let mut parts: Vec<DayPart> = rows
            .into_iter()
            .map(|(instance, day, views, channels, unique, sketch)| {
                DayPart::stored(instance, day, views, &channels, unique, &sketch)
            })
            .collect();
        // A space's dirty days are its instance's.
        let dirty_binds = if space.is_some() {
            &binds[..1]
        } else {
            &binds[..]
        };
        let m = dirty_binds.len();
        let mut query = sql::query_as::<(String, i64)>(sqlx::AssertSqlSafe(format!(
            "SELECT instance_id, day FROM view_days_dirty WHERE {dirty_filter} AND day >= ${} AND day < ${}",
            m + 1,
            m + 2
        )));
        for b in dirty_binds {
            query = query.bind(b);
        }
        for (instance, day) in query
            .bind(from_day)
            .bind(to_day)
            .fetch_all(&self.db)
            .await?
        {
            let part = self.exact_day(&instance, space, day).await?;
            if part.views > 0 || part.unique_viewers > 0 {
                parts.push(part);
            }
        }
        Ok(days::combine(&parts))
    }

    async fn delete_chunked(&self, sql: String, org_id: &str, before: i64) -> StoreResult<i64> {
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

#[async_trait]
impl CollectorStore for SqlStore {
    fn location(&self) -> &str {
        &self.location
    }

    async fn commit_fenced(
        &self,
        batches: &[Batch],
        current: Revisions<'_>,
        fence: &Fence,
    ) -> StoreResult<(Vec<BatchOutcome>, Held)> {
        if let Some(wrong) = batches.iter().find(|b| b.location != self.location) {
            return Err(StoreError::WrongLocation {
                store: self.location.clone(),
                batch: wrong.location.clone(),
            });
        }
        let mut careful = false;
        // Each policy change applied mid-commit costs one more try; a few in a row are
        // as many changes, each of which marks its batches stale at the next start.
        for _ in 0..8 {
            match self.commit_once(batches, current, careful, fence).await? {
                Attempt::Done(outcomes, held) => return Ok((outcomes, held)),
                Attempt::Careful if careful => break,
                Attempt::Careful => careful = true,
                Attempt::Again => {}
            }
        }
        Err(StoreError::Inconsistent(
            "a commit gave up after repeated retries".into(),
        ))
    }

    async fn view_count(&self, instance_id: &str, page_id: &str) -> StoreResult<(i64, i64)> {
        let (views,): (i64,) = sql::query(
            "SELECT CAST(COALESCE(SUM(views), 0) AS BIGINT) FROM page_view_days WHERE instance_id = $1 AND page_id = $2",
        )
        .bind(instance_id)
        .bind(page_id)
        .fetch_one(&self.db)
        .await?;
        let (unique,): (i64,) = sql::query(
            "SELECT COUNT(DISTINCT viewer) FROM page_viewers WHERE instance_id = $1 AND page_id = $2",
        )
        .bind(instance_id)
        .bind(page_id)
        .fetch_one(&self.db)
        .await?;
        Ok((views, unique))
    }

    async fn view_totals(
        &self,
        scope: &ViewScope,
        from_day: i64,
        to_day: i64,
    ) -> StoreResult<ViewTotals> {
        match scope {
            ViewScope::Page { .. } => self.exact_totals(scope, from_day, to_day).await,
            _ => self.summed_totals(scope, from_day, to_day).await,
        }
    }

    async fn top_pages(
        &self,
        instance_id: &str,
        space_id: &str,
        from_day: i64,
        to_day: i64,
        offset: i64,
        limit: i64,
    ) -> StoreResult<Vec<Ranked>> {
        let pages: Vec<(String, i64)> = sql::query(
            "SELECT page_id, CAST(SUM(views) AS BIGINT) AS v FROM page_view_days
             WHERE instance_id = $1 AND space_id = $2 AND day >= $3 AND day < $4
             GROUP BY page_id ORDER BY v DESC, page_id LIMIT $5 OFFSET $6",
        )
        .bind(instance_id)
        .bind(space_id)
        .bind(from_day)
        .bind(to_day)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.db)
        .await?;
        let mut ranked = Vec::with_capacity(pages.len());
        for (page_id, views) in pages {
            let (unique,): (i64,) = sql::query(
                "SELECT COUNT(DISTINCT viewer) FROM page_viewers WHERE instance_id = $1 AND page_id = $2 AND day >= $3 AND day < $4",
            )
            .bind(instance_id)
            .bind(&page_id)
            .bind(from_day)
            .bind(to_day)
            .fetch_one(&self.db)
            .await?;
            ranked.push(Ranked {
                instance_id: instance_id.to_owned(),
                id: page_id,
                views,
                unique_viewers: unique,
                unique_error: 0.0,
            });
        }
        Ok(ranked)
    }

    async fn top_spaces(
        &self,
        org_id: &str,
        instance_id: Option<&str>,
        from_day: i64,
        to_day: i64,
        offset: i64,
        limit: i64,
    ) -> StoreResult<Vec<Ranked>> {
        let mut views: BTreeMap<(String, String), i64> = BTreeMap::new();
        let spaces: Vec<(String, String, i64)> = sql::query(
            "SELECT t.instance_id, t.space_id, CAST(SUM(t.views) AS BIGINT) FROM view_day_totals t
             WHERE t.org_id = $1 AND ($2 = '' OR t.instance_id = $2) AND t.space_id <> '' AND t.day >= $3 AND t.day < $4
               AND NOT EXISTS (SELECT 1 FROM view_days_dirty d WHERE d.instance_id = t.instance_id AND d.day = t.day)
             GROUP BY t.instance_id, t.space_id",
        )
        .bind(org_id)
        .bind(instance_id.unwrap_or_default())
        .bind(from_day)
        .bind(to_day)
        .fetch_all(&self.db)
        .await?;
        for (instance, space, v) in spaces {
            *views.entry((instance, space)).or_default() += v;
        }
        let dirty: Vec<(String, i64)> = sql::query(
            "SELECT instance_id, day FROM view_days_dirty WHERE org_id = $1 AND ($2 = '' OR instance_id = $2) AND day >= $3 AND day < $4",
        )
        .bind(org_id)
        .bind(instance_id.unwrap_or_default())
        .bind(from_day)
        .bind(to_day)
        .fetch_all(&self.db)
        .await?;
        for (instance, day) in dirty {
            let cells: Vec<(String, i64)> = sql::query(
                "SELECT space_id, CAST(SUM(views) AS BIGINT) FROM page_view_days WHERE instance_id = $1 AND day = $2 GROUP BY space_id",
            )
            .bind(&instance)
            .bind(day)
            .fetch_all(&self.db)
            .await?;
            for (space, v) in cells {
                *views.entry((instance.clone(), space)).or_default() += v;
            }
        }
        let mut ranked: Vec<((String, String), i64)> =
            views.into_iter().filter(|(_, v)| *v > 0).collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let page = ranked
            .into_iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(0));
        let mut out = Vec::new();
        for ((instance_id, space_id), views) in page {
            let totals = self
                .summed_totals(
                    &ViewScope::Space {
                        instance_id: instance_id.clone(),
                        space_id: space_id.clone(),
                    },
                    from_day,
                    to_day,
                )
                .await?;
            out.push(Ranked {
                instance_id,
                id: space_id,
                views,
                unique_viewers: totals.unique_viewers,
                unique_error: totals.unique_error,
            });
        }
        Ok(out)
    }

    async fn dirty_view_days(
        &self,
        limit: i64,
        skip: &[String],
    ) -> StoreResult<Vec<(String, String, i64, i64)>> {
        let skipped = if skip.is_empty() {
            String::new()
        } else {
            format!(" WHERE org_id NOT IN {}", placeholders(2, skip.len()))
        };
        let mut query = sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT org_id, instance_id, day, generation FROM view_days_dirty{skipped} ORDER BY day, instance_id LIMIT $1"
        )))
        .bind(limit);
        for org_id in skip {
            query = query.bind(org_id);
        }
        Ok(query.fetch_all(&self.db).await?)
    }

    async fn remake_view_day(
        &self,
        org_id: &str,
        instance_id: &str,
        day: i64,
        generation: i64,
    ) -> StoreResult<()> {
        let cells: Vec<(String, i64, i64)> = sql::query(
            "SELECT space_id, channel, CAST(SUM(views) AS BIGINT) FROM page_view_days WHERE instance_id = $1 AND day = $2 GROUP BY space_id, channel",
        )
        .bind(instance_id)
        .bind(day)
        .fetch_all(&self.db)
        .await?;
        let viewers: Vec<(String, String)> = sql::query(
            "SELECT space_id, viewer FROM page_viewers WHERE instance_id = $1 AND day = $2",
        )
        .bind(instance_id)
        .bind(day)
        .fetch_all(&self.db)
        .await?;
        let parts = days::day_parts(instance_id, day, &cells, &viewers);
        let mut tx = self.db.begin().await?;
        Self::lock_org(&mut tx, org_id, false).await?;
        sql::query("DELETE FROM view_day_totals WHERE instance_id = $1 AND day = $2")
            .bind(instance_id)
            .bind(day)
            .execute(&mut tx)
            .await?;
        for (space_id, part) in parts
            .iter()
            .filter(|(_, p)| p.views > 0 || p.unique_viewers > 0)
        {
            sql::query(
                "INSERT INTO view_day_totals (instance_id, space_id, day, org_id, views, channels, unique_viewers, sketch)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(instance_id)
            .bind(space_id)
            .bind(day)
            .bind(org_id)
            .bind(part.views)
            .bind(part.channels_text())
            .bind(part.unique_viewers)
            .bind(part.sketch.to_bytes())
            .execute(&mut tx)
            .await?;
        }
        sql::query(
            "DELETE FROM view_days_dirty WHERE instance_id = $1 AND day = $2 AND generation = $3",
        )
        .bind(instance_id)
        .bind(day)
        .bind(generation)
        .execute(&mut tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn samples(
        &self,
        instance_id: &str,
        name: &str,
        from: i64,
        to: i64,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> StoreResult<Vec<Sample>> {
        let (at, id) = after.unwrap_or((i64::MIN, String::new()));
        let rows: Vec<(i64, String, i64, Vec<u8>)> = sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT occurred_at, event_id, consent_version, body FROM events
             WHERE instance_id = $1 AND kind = {KIND_METRIC} AND name = $2 AND occurred_at >= $3 AND occurred_at < $4
               AND (occurred_at > $5 OR (occurred_at = $5 AND event_id > $6)) AND body IS NOT NULL
             ORDER BY occurred_at, event_id LIMIT $7"
        )))
        .bind(instance_id)
        .bind(name)
        .bind(from)
        .bind(to)
        .bind(at)
        .bind(id)
        .bind(limit)
        .fetch_all(&self.db)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(occurred_at, event_id, consent_version, body)| Sample {
                occurred_at,
                event_id,
                consent_version,
                body,
            })
            .collect())
    }

    async fn rollups(
        &self,
        instance_id: &str,
        name: &str,
        from: i64,
        to: i64,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> StoreResult<Vec<Rollup>> {
        let (at, tags) = after.unwrap_or((i64::MIN, String::new()));
        type R = (
            String,
            String,
            String,
            i64,
            String,
            String,
            i64,
            f64,
            f64,
            f64,
            f64,
            f64,
            i64,
            i64,
        );
        let rows: Vec<R> = sql::query(
            "SELECT instance_id, name, tags, hour, org_id, unit, count, min, max, sum, p50, p95, consent_version, policy_revision
             FROM rollups WHERE instance_id = $1 AND name = $2 AND hour >= $3 AND hour < $4
               AND (hour > $5 OR (hour = $5 AND tags > $6))
             ORDER BY hour, tags LIMIT $7",
        )
        .bind(instance_id)
        .bind(name)
        .bind(from)
        .bind(to)
        .bind(at)
        .bind(tags)
        .bind(limit)
        .fetch_all(&self.db)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(
                    instance_id,
                    name,
                    tags,
                    hour,
                    org_id,
                    unit,
                    count,
                    min,
                    max,
                    sum,
                    p50,
                    p95,
                    consent_version,
                    policy_revision,
                )| Rollup {
                    instance_id,
                    name,
                    tags,
                    hour,
                    org_id,
                    unit,
                    count,
                    min,
                    max,
                    sum,
                    p50,
                    p95,
                    consent_version,
                    policy_revision,
                },
            )
            .collect())
    }

    async fn take_dirty_hours(
        &self,
        before: i64,
        limit: i64,
        skip: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>> {
        let skipped = if skip.is_empty() {
            String::new()
        } else {
            format!(" AND org_id NOT IN {}", placeholders(3, skip.len()))
        };
        let mut query = sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT org_id, instance_id, hour FROM rollup_dirty WHERE hour < $1{skipped} ORDER BY hour LIMIT $2"
        )))
        .bind(before)
        .bind(limit);
        for org_id in skip {
            query = query.bind(org_id);
        }
        let rows: Vec<(String, String, i64)> = query.fetch_all(&self.db).await?;
        for (_, instance_id, hour) in &rows {
            // Taken before the samples are read: a sample stored meanwhile marks it again.
            sql::query("DELETE FROM rollup_dirty WHERE instance_id = $1 AND hour = $2")
                .bind(instance_id)
                .bind(hour)
                .execute(&self.db)
                .await?;
        }
        Ok(rows)
    }

    async fn hour_samples(
        &self,
        instance_id: &str,
        hour: i64,
    ) -> StoreResult<Vec<(Vec<u8>, i64, i64)>> {
        Ok(sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT body, consent_version, policy_revision FROM events
             WHERE instance_id = $1 AND kind = {KIND_METRIC} AND occurred_at >= $2 AND occurred_at < $3 AND body IS NOT NULL"
        )))
        .bind(instance_id)
        .bind(hour)
        .bind(hour + HOUR_MS)
        .fetch_all(&self.db)
        .await?)
    }

    async fn replace_rollups(
        &self,
        org_id: &str,
        instance_id: &str,
        hour: i64,
        rollups: &[Rollup],
    ) -> StoreResult<()> {
        let mut tx = self.db.begin().await?;
        // Under the org's lock, so a move or purge that took the samples away meanwhile is
        // seen: then the hour has nothing to roll up here.
        Self::lock_org(&mut tx, org_id, false).await?;
        let samples: Option<(String,)> = sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT event_id FROM events WHERE instance_id = $1 AND kind = {KIND_METRIC} AND occurred_at >= $2 AND occurred_at < $3 LIMIT 1"
        )))
        .bind(instance_id)
        .bind(hour)
        .bind(hour + HOUR_MS)
        .fetch_optional(&mut tx)
        .await?;
        if samples.is_none() && !rollups.is_empty() {
            return Ok(());
        }
        sql::query("DELETE FROM rollups WHERE instance_id = $1 AND hour = $2")
            .bind(instance_id)
            .bind(hour)
            .execute(&mut tx)
            .await?;
        for r in rollups {
            sql::query(
                "INSERT INTO rollups (instance_id, name, tags, hour, org_id, location, unit, count, min, max, sum, p50, p95, consent_version, policy_revision)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(&r.instance_id)
            .bind(&r.name)
            .bind(&r.tags)
            .bind(r.hour)
            .bind(&r.org_id)
            .bind(&self.location)
            .bind(&r.unit)
            .bind(r.count)
            .bind(r.min)
            .bind(r.max)
            .bind(r.sum)
            .bind(r.p50)
            .bind(r.p95)
            .bind(r.consent_version)
            .bind(r.policy_revision)
            .execute(&mut tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn purge_applied(&self, purge_id: &str) -> StoreResult<bool> {
        let row: Option<(String,)> =
            sql::query("SELECT purge_id FROM applied_purges WHERE purge_id = $1")
                .bind(purge_id)
                .fetch_optional(&self.db)
                .await?;
        Ok(row.is_some())
    }

    async fn purge_counts(&self, spec: &PurgeSpec) -> StoreResult<Removed> {
        let (filter, binds) = covered(spec);
        let tail = [spec.before_consent_version, spec.before_revision];
        let mut removed = Removed::default();
        if !spec.delete_kinds.is_empty() {
            let kinds = kinds_in(&spec.delete_kinds);
            removed.events = self
                .count_where(
                    format!("SELECT COUNT(*) FROM events WHERE {filter} AND {kinds}"),
                    &binds,
                    &tail,
                )
                .await?;
            removed.page_views = self
                .count_where(
                    format!(
                        "SELECT COUNT(*) FROM events WHERE {filter} AND kind = {KIND_PAGE_VIEW}"
                    ),
                    &binds,
                    &tail,
                )
                .await?;
            removed.feature_usage = self
                .count_where(
                    format!(
                        "SELECT COUNT(*) FROM events WHERE {filter} AND kind = {KIND_FEATURE_USAGE}"
                    ),
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
            removed.view_counters = self
                .count_where(
                    format!("SELECT COUNT(*) FROM page_view_days WHERE {filter}"),
                    &binds,
                    &tail,
                )
                .await?;
            removed.unique_viewer_entries = self
                .count_where(
                    format!("SELECT COUNT(*) FROM page_viewers WHERE {filter}"),
                    &binds,
                    &tail,
                )
                .await?;
            let scope = match &spec.instance_id {
                Some(_) => "org_id = $1 AND instance_id = $2",
                None => "org_id = $1",
            };
            removed.dedupe_entries = self
                .count_where(
                    format!("SELECT COUNT(*) FROM view_times WHERE {scope}"),
                    &binds,
                    &[],
                )
                .await?;
        }
        if spec.delete_kinds.contains(&KIND_METRIC) {
            removed.rollups = self
                .count_where(
                    format!("SELECT COUNT(*) FROM rollups WHERE {filter}"),
                    &binds,
                    &tail,
                )
                .await?;
        }
        let kinds = strip_kinds(spec);
        if !spec.strip_classes.is_empty() && !kinds.is_empty() {
            removed.stripped = self
                .count_where(
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

    async fn erase_counts(&self, spec: &EraseSpec) -> StoreResult<Removed> {
        let mut removed = Removed::default();
        for subject in &spec.subjects {
            let binds = [spec.instance_id.clone(), subject.clone()];
            removed.page_views += self.count_where(
                format!("SELECT COUNT(*) FROM events WHERE instance_id = $1 AND subject = $2 AND stored_at <= $3 AND kind = {KIND_PAGE_VIEW}"),
                &binds, &[spec.until]).await?;
            removed.feature_usage += self.count_where(
                format!("SELECT COUNT(*) FROM events WHERE instance_id = $1 AND subject = $2 AND stored_at <= $3 AND kind = {KIND_FEATURE_USAGE}"),
                &binds, &[spec.until]).await?;
            removed.unique_viewer_entries += self.count_where(
                "SELECT COUNT(*) FROM page_viewers WHERE instance_id = $1 AND viewer = $2 AND stored_at <= $3".to_owned(),
                &binds, &[spec.until]).await?;
            removed.dedupe_entries += self.count_where(
                "SELECT COUNT(*) FROM view_times WHERE instance_id = $1 AND viewer = $2 AND stored_at <= $3".to_owned(),
                &binds, &[spec.until]).await?;
        }
        removed.events = removed.page_views + removed.feature_usage;
        Ok(removed)
    }

    async fn forget_deleted(&self) -> StoreResult<()> {
        sightline_runtime::storage::Forget::forget_deleted(&self.db).await?;
        Ok(())
    }

    async fn org_rollups(
        &self,
        org_id: &str,
        name: &str,
        from: i64,
        to: i64,
    ) -> StoreResult<Vec<(String, i64, i64, f64)>> {
        Ok(sql::query(
            "SELECT instance_id, hour, count, sum FROM rollups WHERE org_id = $1 AND name = $2 AND hour >= $3 AND hour < $4",
        )
        .bind(org_id)
        .bind(name)
        .bind(from)
        .bind(to)
        .fetch_all(&self.db)
        .await?)
    }

    async fn instance_metadata(&self, org_id: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        Ok(sql::query(
            "SELECT instance_id, body FROM events WHERE org_id = $1 AND kind = 1 AND body IS NOT NULL ORDER BY occurred_at DESC",
        )
        .bind(org_id)
        .fetch_all(&self.db)
        .await?)
    }

    async fn charge_epsilon(
        &self,
        org_ids: &[String],
        epsilon: f64,
        budget: f64,
        now: i64,
    ) -> StoreResult<Vec<String>> {
        let mut tx = self.db.begin().await?;
        // One charger at a time (SQLite's write lock does it there).
        Self::lock_org(&mut tx, "epsilon-ledger", true).await?;
        let mut short = Vec::new();
        for org in org_ids {
            let spent: Option<(f64,)> =
                sql::query("SELECT spent FROM epsilon_ledger WHERE org_id = $1")
                    .bind(org)
                    .fetch_optional(&mut tx)
                    .await?;
            if spent.map_or(0.0, |(s,)| s) + epsilon > budget + 1e-9 {
                short.push(org.clone());
            }
        }
        if !short.is_empty() {
            return Ok(short);
        }
        for org in org_ids {
            sql::query(
                "INSERT INTO epsilon_ledger (org_id, spent, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (org_id) DO UPDATE SET spent = epsilon_ledger.spent + excluded.spent, updated_at = excluded.updated_at",
            )
            .bind(org)
            .bind(epsilon)
            .bind(now)
            .execute(&mut tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Vec::new())
    }

    async fn identity(&self) -> StoreResult<String> {
        let (id,): (String,) = sql::query("SELECT id FROM store_identity")
            .fetch_one(&self.db)
            .await?;
        Ok(id)
    }

    async fn export_rows(
        &self,
        table: &'static Table,
        org_id: &str,
        after: Option<&[Value]>,
        limit: i64,
    ) -> StoreResult<Vec<Vec<Value>>> {
        let key = table.key_list();
        let after_key = match after {
            Some(values) => format!(" AND ({key}) > {}", placeholders(2, values.len())),
            None => String::new(),
        };
        let sql = format!(
            "SELECT {} FROM {} WHERE org_id = $1{after_key} ORDER BY {key} LIMIT {limit}",
            table.column_list(),
            table.name,
        );
        let mut query = sql::query(sqlx::AssertSqlSafe(sql)).bind(org_id);
        for value in after.unwrap_or_default() {
            query = match value {
                Value::Int(v) => query.bind(*v),
                Value::Real(v) => query.bind(*v),
                Value::Text(v) => query.bind(v.clone()),
                Value::Blob(v) => query.bind(v.clone()),
            };
        }
        let rows = query.fetch_rows(&self.db).await?;
        rows.iter().map(|row| Self::values_of(table, row)).collect()
    }

    async fn import_rows(&self, table: &'static Table, rows: &[Vec<Value>]) -> StoreResult<()> {
        let width = table.columns.len();
        let location = table.location_column();
        let mut tx = self.db.begin().await?;
        if let Some(row) = rows.iter().find(|row| row.len() != width) {
            return Err(StoreError::Corrupt(format!(
                "a row of {} has {} values",
                table.name,
                row.len()
            )));
        }
        for chunk in rows.chunks(INSERT_CHUNK) {
            // The builder's placeholders (`?` on SQLite) bind in constant time each.
            let mut query = sql::Builder::new(
                tx.backend(),
                format!("INSERT INTO {} ({}) ", table.name, table.column_list()),
            );
            query.push_values(chunk, |b, row| {
                for (i, value) in row.iter().enumerate() {
                    match value {
                        // Rows take the location of the store that holds them.
                        _ if Some(i) == location => b.push_bind(self.location.clone()),
                        Value::Int(v) => b.push_bind(*v),
                        Value::Real(v) => b.push_bind(*v),
                        Value::Text(v) => b.push_bind(v.clone()),
                        Value::Blob(v) => b.push_bind(v.clone()),
                    };
                }
            });
            query.push(" ON CONFLICT DO NOTHING");
            query.build().execute(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn org_counts(&self, org_id: &str) -> StoreResult<Vec<i64>> {
        let mut counts = Vec::with_capacity(MOVED_TABLES.len());
        for table in MOVED_TABLES {
            let (n,): (i64,) = sql::query(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {} WHERE org_id = $1",
                table.name
            )))
            .bind(org_id)
            .fetch_one(&self.db)
            .await?;
            counts.push(n);
        }
        Ok(counts)
    }

    async fn clear_org(&self, org_id: &str) -> StoreResult<()> {
        let mut tx = self.db.begin().await?;
        Self::lock_org(&mut tx, org_id, true).await?;
        Self::delete_org(&mut tx, org_id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn moved_out(&self, move_id: &str) -> StoreResult<bool> {
        let row: Option<(String,)> = sql::query("SELECT move_id FROM moved_out WHERE move_id = $1")
            .bind(move_id)
            .fetch_optional(&self.db)
            .await?;
        Ok(row.is_some())
    }

    async fn sweep(
        &self,
        org_id: &str,
        raw_before: i64,
        aggregate_before: i64,
        ids_before: i64,
    ) -> StoreResult<Removed> {
        let mut removed = Removed::default();
        removed.events = self.delete_chunked(
            "DELETE FROM events WHERE (instance_id, event_id) IN (SELECT instance_id, event_id FROM events WHERE org_id = $1 AND occurred_at < $2 LIMIT $3)".to_owned(),
            org_id, raw_before).await?;
        removed.events += self.delete_chunked(
            format!("DELETE FROM events WHERE (instance_id, event_id) IN (SELECT instance_id, event_id FROM events WHERE org_id = $1 AND kind = {KIND_TOMBSTONE} AND occurred_at < $2 LIMIT $3)"),
            org_id, ids_before).await?;
        let raw_day = raw_before.div_euclid(DAY_MS);
        removed.view_counters = self.delete_chunked(
            "DELETE FROM page_view_days WHERE (instance_id, page_id, day, channel, consent_version, policy_revision) IN (SELECT instance_id, page_id, day, channel, consent_version, policy_revision FROM page_view_days WHERE org_id = $1 AND day < $2 LIMIT $3)".to_owned(),
            org_id, raw_day).await?;
        removed.unique_viewer_entries = self.delete_chunked(
            "DELETE FROM page_viewers WHERE (instance_id, page_id, day, viewer) IN (SELECT instance_id, page_id, day, viewer FROM page_viewers WHERE org_id = $1 AND day < $2 LIMIT $3)".to_owned(),
            org_id, raw_day).await?;
        // Day totals and their sketches go with the days they sum up.
        removed.view_counters += self.delete_chunked(
            "DELETE FROM view_day_totals WHERE (instance_id, space_id, day) IN (SELECT instance_id, space_id, day FROM view_day_totals WHERE org_id = $1 AND day < $2 LIMIT $3)".to_owned(),
            org_id, raw_day).await?;
        self.delete_chunked(
            "DELETE FROM view_days_dirty WHERE (instance_id, day) IN (SELECT instance_id, day FROM view_days_dirty WHERE org_id = $1 AND day < $2 LIMIT $3)".to_owned(),
            org_id, raw_day).await?;
        removed.dedupe_entries = self.delete_chunked(
            "DELETE FROM view_times WHERE (instance_id, page_id, viewer, at, event_id) IN (SELECT instance_id, page_id, viewer, at, event_id FROM view_times WHERE org_id = $1 AND at < $2 LIMIT $3)".to_owned(),
            org_id, raw_before).await?;
        removed.rollups = self.delete_chunked(
            "DELETE FROM rollups WHERE (instance_id, name, tags, hour) IN (SELECT instance_id, name, tags, hour FROM rollups WHERE org_id = $1 AND hour < $2 LIMIT $3)".to_owned(),
            org_id, aggregate_before).await?;
        Ok(removed)
    }
}

#[async_trait]
impl ChangeLog for SqlStore {
    async fn stage(&self, change: &StagedChange) -> Result<(), ChangeLogError> {
        let mut tx = self.db.begin().await.map_err(db)?;
        // A purge is claimed with its staging: a second purger (another pass, another
        // replica) cannot stage it, so it is applied and audited once. The claim goes with
        // a discarded change and becomes the applied mark when the change is applied.
        if let Change::Purge { spec } = Change::decode(&change.payload)? {
            let claimed = sql::query(
                "INSERT INTO applied_purges (purge_id, org_id, applied_at, counts) VALUES ($1, $2, $3, '{}')
                 ON CONFLICT (purge_id) DO NOTHING",
            )
            .bind(&spec.purge_id)
            .bind(&spec.org_id)
            .bind(PURGE_CLAIMED)
            .execute(&mut tx)
            .await
            .map_err(db)?;
            if claimed.rows_affected() == 0 {
                return Err(ChangeLogError::Refused(PURGE_TAKEN.to_owned()));
            }
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
            sql::query("DELETE FROM applied_purges WHERE purge_id = $1 AND applied_at = $2")
                .bind(&spec.purge_id)
                .bind(PURGE_CLAIMED)
                .execute(&mut tx)
                .await
                .map_err(db)?;
        }
        staged_rows::delete(&mut tx, change_id).await?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn staged(&self, org_id: Option<&str>) -> Result<Vec<StagedChange>, ChangeLogError> {
        staged_rows::list(&self.db, org_id).await
    }
}
