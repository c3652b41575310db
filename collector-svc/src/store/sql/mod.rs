//! The SQL of [`CollectorStore`], written once for SQLite and PostgreSQL (both take `$n`
//! placeholders, `ON CONFLICT`, `RETURNING` and row values). SQLite write transactions take the
//! lock up front; on PostgreSQL a commit holds a shared advisory lock per org and a purge an
//! exclusive one, so a batch enforced under an old policy can never commit after the purge that
//! covers it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use sightline_runtime::sql::{self, Backend, Database, Tx, Unsynced};

use sightline_runtime::audited::{ChangeLog, ChangeLogError, StagedChange, staged_rows};

use super::days::{self, DayPart};
use super::moved::Type;
use super::{
    Batch, BatchOutcome, Change, CollectorStore, EraseSpec, Fence, Held, MOVED_TABLES, MoveSpec,
    PurgeSpec, Ranked, RecentEvent, Removed, Revisions, Rollup, RowOutcome, Sample, StoreError,
    StoreResult, Table, Value, ViewScope, ViewTotals,
};
use crate::enforce::{self, DAY_MS};

mod change_log;
mod moves;
mod partitions;
mod purges;
mod rollups;
mod views;

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

/// A batch's rows in PostgreSQL's binary COPY format, in the column order of
/// [`SqlStore::copy_rows_postgres`]'s statement: per row the field count, then each field's length
/// (-1 for NULL) and its bytes (text as UTF-8, bigint and double precision big-endian, bytea raw).
fn binary_copy(batch: &Batch, location: &str) -> Vec<u8> {
    fn text(out: &mut Vec<u8>, value: &[u8]) {
        // Every field is far below 2 GiB: ids, names and bodies are bounded at the door.
        out.extend_from_slice(&i32::try_from(value.len()).unwrap_or(i32::MAX).to_be_bytes());
        out.extend_from_slice(value);
    }
    fn int(out: &mut Vec<u8>, value: i64) {
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
    const NULL: [u8; 4] = (-1i32).to_be_bytes();
    let per_row: usize = 160 + batch.instance_id.len() + batch.org_id.len() + location.len();
    let mut out = Vec::with_capacity(
        32 + batch
            .rows
            .iter()
            .map(|r| per_row + r.event_id.len() + r.name.len() + r.body.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for row in &batch.rows {
        out.extend_from_slice(&13i16.to_be_bytes());
        text(&mut out, batch.instance_id.as_bytes());
        text(&mut out, row.event_id.as_bytes());
        int(&mut out, row.occurred_at);
        text(&mut out, batch.org_id.as_bytes());
        text(&mut out, location.as_bytes());
        int(&mut out, row.kind);
        int(&mut out, batch.stored_at);
        text(&mut out, row.name.as_bytes());
        match row.value {
            Some(value) => {
                out.extend_from_slice(&8i32.to_be_bytes());
                out.extend_from_slice(&value.to_bits().to_be_bytes());
            }
            None => out.extend_from_slice(&NULL),
        }
        match &row.subject {
            Some(subject) => text(&mut out, subject.as_bytes()),
            None => out.extend_from_slice(&NULL),
        }
        int(&mut out, batch.consent_version);
        int(&mut out, batch.policy_revision);
        text(&mut out, &row.body);
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// Event keys (id, time) already stored, looked up by a row's borrowed id: no key is copied for
/// the lookup (the SQLite fast path asks for every row of every batch).
#[derive(Default)]
struct StoredKeys(HashMap<String, Vec<i64>>);

impl StoredKeys {
    fn contains(&self, event_id: &str, occurred_at: i64) -> bool {
        self.0
            .get(event_id)
            .is_some_and(|times| times.contains(&occurred_at))
    }
}

impl FromIterator<(String, i64)> for StoredKeys {
    fn from_iter<I: IntoIterator<Item = (String, i64)>>(keys: I) -> Self {
        let mut map: HashMap<String, Vec<i64>> = HashMap::new();
        for (id, at) in keys {
            map.entry(id).or_default().push(at);
        }
        Self(map)
    }
}

/// How one try at a group commit ended.
enum Attempt {
    Done(Unsynced<(Vec<BatchOutcome>, Held)>),
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
        let live = |batch: &Batch| {
            current(&batch.org_id, &batch.instance_id) == u64::try_from(batch.policy_revision).ok()
        };
        let mut outcomes = Vec::with_capacity(batches.len());
        // Hours with new samples, marked for the rollups in one statement at the end.
        let mut dirty_hours = BTreeSet::new();
        for batch in batches {
            if !live(batch) {
                outcomes.push(BatchOutcome::Stale);
                continue;
            }
            let Some(inserted) = Self::insert_rows(&mut tx, batch, &self.location, careful).await?
            else {
                tx.rollback().await?;
                return Ok(Attempt::Careful);
            };
            let mut rows = Vec::with_capacity(batch.rows.len());
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
                    dirty_hours.insert((
                        batch.instance_id.as_str(),
                        row.occurred_at.div_euclid(HOUR_MS) * HOUR_MS,
                        batch.org_id.as_str(),
                    ));
                }
                rows.push(RowOutcome::Stored);
            }
            for day in days {
                Self::mark_view_day(&mut tx, &batch.org_id, &batch.instance_id, day).await?;
            }
            outcomes.push(BatchOutcome::Committed(rows));
        }
        if !dirty_hours.is_empty() {
            let mut query = sql::Builder::new(
                tx.backend(),
                "INSERT INTO rollup_dirty (instance_id, hour, org_id) ",
            );
            query.push_values(&dirty_hours, |b, (instance, hour, org)| {
                b.push_bind(*instance).push_bind(*hour).push_bind(*org);
            });
            query.push(" ON CONFLICT (instance_id, hour) DO NOTHING");
            query.build().execute(&mut tx).await?;
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
        let committed = tx.commit_unsynced().await?;
        Ok(Attempt::Done(committed.map(|()| (outcomes, held))))
    }

    /// PostgreSQL: the whole batch in one statement, each column bound once as an array
    /// (`UNNEST`), so the statement is parsed and planned once whatever the batch's size; the
    /// values every row shares are bound once. Per row, whether this insert stored it (RETURNING:
    /// concurrent writers learn which rows were theirs).
    async fn insert_rows_postgres(
        pg: &mut sqlx::PgConnection,
        batch: &Batch,
        location: &str,
    ) -> StoreResult<Vec<bool>> {
        let rows = &batch.rows;
        let ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
        let kinds: Vec<i64> = rows.iter().map(|r| r.kind).collect();
        let times: Vec<i64> = rows.iter().map(|r| r.occurred_at).collect();
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        let values: Vec<Option<f64>> = rows.iter().map(|r| r.value).collect();
        let subjects: Vec<Option<&str>> = rows.iter().map(|r| r.subject.as_deref()).collect();
        let bodies: Vec<&[u8]> = rows.iter().map(|r| r.body.as_slice()).collect();
        let stored: Vec<(String, i64)> = sqlx::query_as(
            "INSERT INTO events (instance_id, event_id, org_id, location, kind, occurred_at,
                stored_at, name, value, subject, consent_version, policy_revision, body)
             SELECT $1, e, $2, $3, k, o, $4, n, v, s, $5, $6, b
             FROM UNNEST($7::text[], $8::bigint[], $9::bigint[], $10::text[],
                $11::float8[], $12::text[], $13::bytea[]) AS u(e, k, o, n, v, s, b)
             ON CONFLICT (instance_id, event_id, occurred_at) DO NOTHING
             RETURNING event_id, occurred_at",
        )
        .bind(&batch.instance_id)
        .bind(&batch.org_id)
        .bind(location)
        .bind(batch.stored_at)
        .bind(batch.consent_version)
        .bind(batch.policy_revision)
        .bind(ids)
        .bind(kinds)
        .bind(times)
        .bind(names)
        .bind(values)
        .bind(subjects)
        .bind(bodies)
        .fetch_all(&mut *pg)
        .await?;
        let stored: StoredKeys = stored.into_iter().collect();
        Ok(rows
            .iter()
            .map(|r| stored.contains(&r.event_id, r.occurred_at))
            .collect())
    }

    /// PostgreSQL's fast path: the batch in one binary COPY (the bulk load's own path: rows go
    /// into the heap in groups, with no per-row executor or conflict check). None when an id was
    /// stored before: the COPY fails on the key, the transaction is aborted, and the caller rolls
    /// back and commits again carefully ([`Self::insert_rows_postgres`]).
    async fn copy_rows_postgres(
        pg: &mut sqlx::PgConnection,
        batch: &Batch,
        location: &str,
    ) -> StoreResult<Option<Vec<bool>>> {
        let data = binary_copy(batch, location);
        let mut copy = pg
            .copy_in_raw(
                "COPY events (instance_id, event_id, occurred_at, org_id, location, kind,
                    stored_at, name, value, subject, consent_version, policy_revision, body)
                 FROM STDIN (FORMAT binary)",
            )
            .await?;
        let sent = match copy.send(data).await {
            Ok(_) => copy.finish().await,
            Err(error) => {
                let _ = copy.abort("the batch could not be sent").await;
                Err(error)
            }
        };
        match sent {
            Ok(stored) if usize::try_from(stored).ok() == Some(batch.rows.len()) => {
                Ok(Some(vec![true; batch.rows.len()]))
            }
            Ok(stored) => Err(StoreError::Inconsistent(format!(
                "a copy of {} events stored {stored}",
                batch.rows.len()
            ))),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// SQLite's INSERT of some of a batch's rows. OR IGNORE: no constraint can then abort the
    /// statement halfway, so SQLite keeps no statement journal for it (a copy of every page it
    /// changes). Only the key can conflict; the callers count what it stored.
    fn insert_statement<'q>(
        batch: &'q Batch,
        rows: &'q [crate::store::Row],
        location: &'q str,
    ) -> sql::Query<'q> {
        let mut query = sql::Builder::new(
            Backend::Sqlite,
            "INSERT OR IGNORE INTO events (instance_id, event_id, org_id, location, kind,
                occurred_at, stored_at, name, value, subject, consent_version,
                policy_revision, body) ",
        );
        // What every row shares is bound shared, not copied once per row.
        let instance: Arc<str> = batch.instance_id.as_str().into();
        let org: Arc<str> = batch.org_id.as_str().into();
        let location: Arc<str> = location.into();
        query.push_values(rows, |b, row| {
            b.push_bind(instance.clone())
                .push_bind(&row.event_id)
                .push_bind(org.clone())
                .push_bind(location.clone())
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
        query.build()
    }

    /// SQLite's fast path: the batch's INSERTs, each next one turned into SQLite's arguments on
    /// this thread while SQLite's own thread runs the one before (the one writer then never waits
    /// for a statement to be built). All rows when the count says every row was new; None when
    /// one was stored before (see [`Self::insert_rows`]).
    async fn insert_new_sqlite(
        conn: &mut sqlx::SqliteConnection,
        batch: &Batch,
        location: &str,
    ) -> StoreResult<Option<Vec<bool>>> {
        use sqlx::Executor as _;
        let prepare = |chunk| Self::insert_statement(batch, chunk, location).into_sqlite();
        let mut chunks = batch.rows.chunks(INSERT_CHUNK);
        let mut next = chunks.next().map(prepare);
        let mut stored = 0;
        while let Some(statement) = next.take() {
            // join! polls the INSERT first: its command is on its way to SQLite's thread before
            // the next statement is built.
            let (done, following) = tokio::join!(conn.execute(statement), async {
                chunks.next().map(prepare)
            });
            stored += done?.rows_affected();
            next = following;
        }
        Ok((usize::try_from(stored).ok() == Some(batch.rows.len()))
            .then(|| vec![true; batch.rows.len()]))
    }

    /// Inserts a batch's rows; per row, whether this insert stored it (false: its id was
    /// stored before). None when `careful` is off and a repeated id was met: the fast path
    /// (PostgreSQL: [`Self::copy_rows_postgres`]; SQLite: `INSERT OR IGNORE` and its count) cannot
    /// tell which row it was, so the caller rolls back and commits again carefully
    /// (PostgreSQL: [`Self::insert_rows_postgres`]).
    async fn insert_rows(
        tx: &mut Tx,
        batch: &Batch,
        location: &str,
        careful: bool,
    ) -> StoreResult<Option<Vec<bool>>> {
        if let Tx::Postgres(pg) = tx {
            if careful {
                return Ok(Some(Self::insert_rows_postgres(pg, batch, location).await?));
            }
            return Self::copy_rows_postgres(pg, batch, location).await;
        }
        if !careful && let Tx::Sqlite(conn, _) = tx {
            return Self::insert_new_sqlite(conn, batch, location).await;
        }
        let mut inserted = Vec::with_capacity(batch.rows.len());
        for chunk in batch.rows.chunks(INSERT_CHUNK) {
            // SQLite has one writer at a time: what is not stored before this statement is
            // stored by it. Reading that first (careful) is far cheaper there than
            // RETURNING, whose rows cross from SQLite's thread one by one; and a batch of
            // ids never seen (the usual case) needs neither ([`Self::insert_new_sqlite`]).
            let mut query = sql::Builder::new(
                tx.backend(),
                "SELECT event_id, occurred_at FROM events WHERE instance_id = ",
            );
            query
                .push_bind(&batch.instance_id)
                .push(" AND event_id IN (");
            let mut ids = query.separated();
            for row in chunk {
                ids.push_bind(&row.event_id);
            }
            query.push(")");
            let found: Vec<(String, i64)> = query.build().fetch_all(&mut *tx).await?;
            let existing: StoredKeys = found.into_iter().collect();
            let stored = Self::insert_statement(batch, chunk, location)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let new: Vec<bool> = chunk
                .iter()
                .map(|row| !existing.contains(&row.event_id, row.occurred_at))
                .collect();
            let expected = new.iter().filter(|&&new| new).count();
            if usize::try_from(stored).ok() != Some(expected) {
                // Something other than a repeated id was ignored: nothing of the
                // transaction may stand, or an ack would cover a row not stored.
                return Err(StoreError::Inconsistent(format!(
                    "an insert of {} events stored {stored}, {expected} expected",
                    chunk.len()
                )));
            }
            inserted.extend(new);
        }
        Ok(Some(inserted))
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
    ) -> StoreResult<Unsynced<(Vec<BatchOutcome>, Held)>> {
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
                Attempt::Done(committed) => return Ok(committed),
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
        views::view_count(self, instance_id, page_id).await
    }

    async fn view_totals(
        &self,
        scope: &ViewScope,
        from_day: i64,
        to_day: i64,
    ) -> StoreResult<ViewTotals> {
        views::view_totals(self, scope, from_day, to_day).await
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
        views::top_pages(self, instance_id, space_id, from_day, to_day, offset, limit).await
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
        views::top_spaces(self, org_id, instance_id, from_day, to_day, offset, limit).await
    }

    async fn dirty_view_days(
        &self,
        limit: i64,
        skip: &[String],
    ) -> StoreResult<Vec<(String, String, i64, i64)>> {
        views::dirty_view_days(self, limit, skip).await
    }

    async fn remake_view_day(
        &self,
        org_id: &str,
        instance_id: &str,
        day: i64,
        generation: i64,
    ) -> StoreResult<()> {
        views::remake_view_day(self, org_id, instance_id, day, generation).await
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
        rollups::samples(self, instance_id, name, from, to, after, limit).await
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
        rollups::rollups(self, instance_id, name, from, to, after, limit).await
    }

    async fn take_dirty_hours(
        &self,
        before: i64,
        limit: i64,
        skip: &[String],
    ) -> StoreResult<Vec<(String, String, i64)>> {
        rollups::take_dirty_hours(self, before, limit, skip).await
    }

    async fn hour_samples(
        &self,
        instance_id: &str,
        hour: i64,
    ) -> StoreResult<Vec<(Vec<u8>, i64, i64)>> {
        rollups::hour_samples(self, instance_id, hour).await
    }

    async fn replace_rollups(
        &self,
        org_id: &str,
        instance_id: &str,
        hour: i64,
        rollups: &[Rollup],
    ) -> StoreResult<()> {
        rollups::replace_rollups(self, org_id, instance_id, hour, rollups).await
    }

    async fn purge_applied(&self, purge_id: &str) -> StoreResult<bool> {
        purges::purge_applied(self, purge_id).await
    }

    async fn purge_counts(&self, spec: &PurgeSpec) -> StoreResult<Removed> {
        purges::purge_counts(self, spec).await
    }

    async fn erase_counts(&self, spec: &EraseSpec) -> StoreResult<Removed> {
        purges::erase_counts(self, spec).await
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
        rollups::org_rollups(self, org_id, name, from, to).await
    }

    async fn instance_metadata(&self, org_id: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        Ok(sql::query(
            "SELECT instance_id, body FROM events WHERE org_id = $1 AND kind = 1 AND body IS NOT
                NULL ORDER BY occurred_at DESC",
        )
        .bind(org_id)
        .fetch_all(&self.db)
        .await?)
    }

    async fn recent_events(
        &self,
        org_id: &str,
        instance_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<RecentEvent>> {
        // The org index orders by occurrence; one instance's events are a filter over it.
        Ok(sql::query(
            "SELECT instance_id, stored_at, consent_version, body FROM events
             WHERE org_id = $1 AND body IS NOT NULL AND ($2 = '' OR instance_id = $2)
             ORDER BY occurred_at DESC LIMIT $3",
        )
        .bind(org_id)
        .bind(instance_id.unwrap_or(""))
        .bind(limit)
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
        rollups::charge_epsilon(self, org_ids, epsilon, budget, now).await
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
        moves::export_rows(self, table, org_id, after, limit).await
    }

    async fn import_rows(&self, table: &'static Table, rows: &[Vec<Value>]) -> StoreResult<()> {
        moves::import_rows(self, table, rows).await
    }

    async fn org_counts(&self, org_id: &str) -> StoreResult<Vec<i64>> {
        moves::org_counts(self, org_id).await
    }

    async fn clear_org(&self, org_id: &str) -> StoreResult<()> {
        moves::clear_org(self, org_id).await
    }

    async fn moved_out(&self, move_id: &str) -> StoreResult<bool> {
        moves::moved_out(self, move_id).await
    }

    async fn prepare_days(&self, from_day: i64, to_day: i64) -> StoreResult<usize> {
        SqlStore::prepare_days(self, from_day, to_day).await
    }

    async fn drop_expired_days(
        &self,
        raw_before: &BTreeMap<String, i64>,
    ) -> StoreResult<BTreeMap<String, i64>> {
        SqlStore::drop_expired_days(self, raw_before).await
    }

    async fn sweep(
        &self,
        org_id: &str,
        raw_before: i64,
        aggregate_before: i64,
        ids_before: i64,
    ) -> StoreResult<Removed> {
        purges::sweep(self, org_id, raw_before, aggregate_before, ids_before).await
    }
}
