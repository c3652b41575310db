//! Work that runs beside the API: hourly rollups (SPEC E6), purges from the policies (E9), retention
//! sweeps, and erasures. Purges and erasures are audited changes: counted, staged, recorded in the
//! org's audit log, then applied (`runtime::audited`).

use sightline_runtime::policy_stream::{PolicyFollower as _, TableFollower as _};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use sightline_proto::collector::v1 as pb;
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::audited::{AuditEntry, Auditor, ChangeLogError, CommitError, StagedChange};
use sightline_runtime::{Secret, SharedClock};
use tokio_util::sync::CancellationToken;

use crate::enforce::DAY_MS;
use crate::locations::{Stores, location_name};
use crate::policy_cache::Policies;
use crate::store::{
    Change, CollectorStore, EraseSpec, MOVED_TABLES, MoveSpec, PURGE_TAKEN, PurgeSpec, Removed,
    Rollup,
};

use sightline_runtime::time::HOUR_MS;

/// The value at quantile `q` of sorted `values` (nearest rank).
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A series' tags as canonical JSON (sorted keys), the key rollups are kept under.
pub fn tags_key(tags: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<&String, &String> = tags.iter().collect();
    serde_json::to_string(&sorted).unwrap_or_else(|_| "{}".to_owned())
}

/// The rollups of one instance's hour from its samples: per metric and tag set, count, min, max,
/// sum, p50, p95 of the periodic samples. A rollup carries the lowest consent version and policy
/// revision of its samples, so a purge that covers any of them covers it.
pub fn roll_up(
    org_id: &str,
    instance_id: &str,
    hour: i64,
    samples: &[(Vec<u8>, i64, i64)],
) -> Vec<Rollup> {
    struct Series {
        unit: String,
        values: Vec<f64>,
        consent_version: i64,
        policy_revision: i64,
    }
    let mut series: BTreeMap<(String, String), Series> = BTreeMap::new();
    for (body, version, revision) in samples {
        let Ok(event) = pb::Event::decode(body.as_slice()) else {
            continue;
        };
        let Some(pb::event::Payload::Metric(metric)) = event.payload else {
            continue;
        };
        if !metric.periodic_sample || !metric.value.is_finite() {
            continue;
        }
        let entry = series
            .entry((metric.name.clone(), tags_key(&metric.tags)))
            .or_insert_with(|| Series {
                unit: metric.unit.clone(),
                values: Vec::new(),
                consent_version: *version,
                policy_revision: *revision,
            });
        entry.values.push(metric.value);
        entry.consent_version = entry.consent_version.min(*version);
        entry.policy_revision = entry.policy_revision.min(*revision);
    }
    series
        .into_iter()
        .map(|((name, tags), mut s)| {
            s.values.sort_by(f64::total_cmp);
            Rollup {
                instance_id: instance_id.to_owned(),
                name,
                tags,
                hour,
                org_id: org_id.to_owned(),
                unit: s.unit,
                count: i64::try_from(s.values.len()).unwrap_or(i64::MAX),
                min: s.values.first().copied().unwrap_or_default(),
                max: s.values.last().copied().unwrap_or_default(),
                sum: s.values.iter().sum(),
                p50: quantile(&s.values, 0.5),
                p95: quantile(&s.values, 0.95),
                consent_version: s.consent_version,
                policy_revision: s.policy_revision,
            }
        })
        .collect()
}

/// How long after an hour ends its rollup is made: samples may arrive a little late (the ingest
/// window allows 5 minutes of clock skew). A sample arriving later still marks its hour again.
pub const ROLLUP_GRACE_MS: i64 = 5 * 60 * 1000;

/// Brings the rollups of every ended hour with new samples up to date; returns the hours done.
/// An hour is rolled up once it has ended (and again only when late samples arrive), never
/// re-read while it fills.
pub async fn roll_up_dirty(
    store: &dyn CollectorStore,
    now_ms: i64,
    skip: &[String],
) -> Result<usize, crate::store::StoreError> {
    let mut done = 0;
    // Hours that started before this ended more than the grace ago.
    let before = now_ms - HOUR_MS - ROLLUP_GRACE_MS + 1;
    loop {
        let hours = store.take_dirty_hours(before, 500, skip).await?;
        if hours.is_empty() {
            return Ok(done);
        }
        for (org_id, instance_id, hour) in hours {
            let samples = store.hour_samples(&instance_id, hour).await?;
            let rollups = roll_up(&org_id, &instance_id, hour, &samples);
            store
                .replace_rollups(&org_id, &instance_id, hour, &rollups)
                .await?;
            done += 1;
        }
    }
}

/// Copies every row of an org's data from one store to another, table by table in key order,
/// after clearing what an interrupted copy left there.
pub async fn copy_org(
    from: &dyn CollectorStore,
    to: &dyn CollectorStore,
    org_id: &str,
) -> Result<(), crate::store::StoreError> {
    to.clear_org(org_id).await?;
    for table in MOVED_TABLES {
        let mut after: Option<Vec<crate::store::Value>> = None;
        loop {
            let rows = from
                .export_rows(table, org_id, after.as_deref(), MOVE_PAGE)
                .await?;
            let Some(last) = rows.last() else { break };
            after = Some(last[..table.key].to_vec());
            to.import_rows(table, &rows).await?;
            if rows.len() < usize::try_from(MOVE_PAGE).unwrap_or(usize::MAX) {
                break;
            }
        }
    }
    Ok(())
}

/// Remakes the day totals of page views (and their unique-viewer sketches) of every day changed
/// since they were made, but the days of orgs in `skip`; returns the days remade.
pub async fn remake_view_days(
    store: &dyn CollectorStore,
    skip: &[String],
) -> Result<usize, crate::store::StoreError> {
    let mut done = 0;
    // Bounded: days marked again while being remade wait for the next pass.
    for _ in 0..50 {
        let days = store.dirty_view_days(200, skip).await?;
        let count = days.len();
        for (org_id, instance_id, day, generation) in days {
            store
                .remake_view_day(&org_id, &instance_id, day, generation)
                .await?;
            done += 1;
        }
        if count < 200 {
            break;
        }
    }
    Ok(done)
}

/// The purges of a policy, as the store reads them.
pub fn purge_specs(policy: &consent_pb::Policy) -> Vec<PurgeSpec> {
    policy
        .purges
        .iter()
        .filter(|p| !p.purge_id.is_empty())
        .map(|p| PurgeSpec {
            purge_id: p.purge_id.clone(),
            org_id: policy.org_id.clone(),
            instance_id: (p.scope() == consent_pb::PurgeScope::Instance)
                .then(|| p.instance_id.clone()),
            delete_kinds: p.delete_kinds.iter().map(|k| i64::from(*k)).collect(),
            strip_classes: p.strip_classes.clone(),
            before_consent_version: i64::try_from(p.before_consent_version).unwrap_or(i64::MAX),
            before_revision: i64::try_from(p.before_revision).unwrap_or(i64::MAX),
        })
        .collect()
}

fn counts(removed: &Removed) -> BTreeMap<String, String> {
    [
        ("events", removed.events),
        ("page_views", removed.page_views),
        ("feature_usage", removed.feature_usage),
        ("records_stripped", removed.stripped),
        ("view_counters", removed.view_counters),
        ("unique_viewer_entries", removed.unique_viewer_entries),
        ("dedupe_entries", removed.dedupe_entries),
        ("rollups", removed.rollups),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_string()))
    .collect()
}

/// How an erasure names the store it touched.
pub fn erased_store_name(store: &dyn CollectorStore) -> String {
    format!("collector/{}", store.location())
}

/// After a delete: no file keeps a readable copy (a failure is logged; the rows are gone, and the
/// WAL's next automatic checkpoint overwrites them).
async fn forget(store: &dyn CollectorStore) {
    if let Err(error) = store.forget_deleted().await {
        tracing::warn!(%error, location = store.location(), "deleted rows may stay readable in the WAL until its next checkpoint");
    }
}

/// Runs the audited changes of collector-svc.
#[derive(Debug, Clone)]
pub struct Maintenance {
    pub stores: Stores,
    pub policies: Arc<Policies>,
    pub auditor: Auditor,
    pub clock: SharedClock,
    /// One audited change of an org at a time in this process: an erasure counts what it deletes,
    /// and two at once would both count the same rows.
    pub locks: Arc<dashmap::DashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held by a rollup pass; a move waits for the pass under way (which may have taken an hour of
    /// the moving org before the policy said so) before it copies.
    pub rollup_pass: Arc<tokio::sync::Mutex<()>>,
    /// Where moves are reported done (consent-svc), with the service token.
    pub consent: tonic::transport::Channel,
    pub service_token: Secret,
}

/// The name collector-svc reports its part of a residency move under.
pub const MOVE_OWNER: &str = "collector";
/// How many days ahead each day's partition of events is made (PostgreSQL).
pub const DAYS_AHEAD: i64 = 3;

/// Makes `store` ready for the days around `now_ms` (PostgreSQL: the day partitions of events
/// from yesterday to [`DAYS_AHEAD`] days ahead). A failure is logged: until the days are made,
/// their events wait in the default partition.
pub async fn prepare_days_around(store: &dyn CollectorStore, now_ms: i64) {
    let today = now_ms.div_euclid(DAY_MS);
    if let Err(error) = store.prepare_days(today - 1, today + DAYS_AHEAD).await {
        tracing::warn!(%error, "cannot prepare the days ahead");
    }
}
/// Rows per page of a move's copy.
const MOVE_PAGE: i64 = 2_000;

/// Why a move did not finish this time (it is tried again on the next pass).
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Commit(#[from] CommitError),
    #[error("a store is unavailable: {0}")]
    Unavailable(String),
    #[error("the copy does not match the original: {table} has {from} rows there and {to} here")]
    Mismatch {
        table: &'static str,
        from: i64,
        to: i64,
    },
    #[error("consent-svc did not take the report: {0}")]
    Report(String),
}

impl Maintenance {
    async fn lock(&self, org_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .entry(org_id.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        lock.lock_owned().await
    }

    /// Applies every purge of the current policies not applied yet, each once; returns how many.
    /// An org's purges wait while its data moves (the move applies them first). The org's lock is
    /// held throughout, so a pass that returns has seen through what a concurrent pass (the
    /// background one starts the moment a change is applied) was carrying out.
    pub async fn apply_purges(&self) -> usize {
        if !self.policies.is_ready() {
            return 0;
        }
        let mut applied = 0;
        for policy in self.policies.policies() {
            if policy.moving {
                continue;
            }
            let specs = purge_specs(&policy);
            if specs.is_empty() {
                continue;
            }
            let Ok(opened) = self.stores.get(policy.location()).await else {
                continue;
            };
            let _org = self.lock(&policy.org_id).await;
            for spec in specs {
                match opened.store.purge_applied(&spec.purge_id).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(%error, "cannot read applied purges");
                        continue;
                    }
                }
                match self.purge(opened.store.as_ref(), &spec).await {
                    Ok(removed) => {
                        applied += 1;
                        tracing::info!(org_id = %spec.org_id, purge_id = %spec.purge_id, events = removed.events, "purge applied");
                    }
                    Err(error) => {
                        tracing::warn!(org_id = %spec.org_id, purge_id = %spec.purge_id, %error, "purge not applied yet");
                    }
                }
            }
        }
        applied
    }

    async fn purge(
        &self,
        store: &dyn CollectorStore,
        spec: &PurgeSpec,
    ) -> Result<Removed, CommitError> {
        self.auditor.settle_org(store, &spec.org_id).await?;
        // Settling may have applied it.
        if store.purge_applied(&spec.purge_id).await.unwrap_or(false) {
            return Ok(Removed::default());
        }
        let removed = store
            .purge_counts(spec)
            .await
            .map_err(|e| CommitError::Store(e.into()))?;
        let mut attributes = counts(&removed);
        attributes.insert("purge_id".into(), spec.purge_id.clone());
        attributes.insert(
            "scope".into(),
            spec.instance_id.clone().unwrap_or_else(|| "org".into()),
        );
        let change = StagedChange::new(
            AuditEntry {
                org_id: spec.org_id.clone(),
                actor: "service:collector".into(),
                action: "collector.purge_applied".into(),
                target: spec.purge_id.clone(),
                attributes,
            },
            Change::Purge { spec: spec.clone() }.encode(),
            self.clock.now_ms(),
        );
        match self.auditor.commit(store, change, None).await {
            // Another pass or replica holds it: it is applied and audited once, by that one.
            Err(CommitError::Store(ChangeLogError::Refused(why))) if why == PURGE_TAKEN => {
                Ok(Removed::default())
            }
            // Another replica, staging the purge of its own, took this one for abandoned.
            Err(CommitError::Superseded) => Ok(Removed::default()),
            other => {
                other?;
                forget(store).await;
                Ok(removed)
            }
        }
    }

    /// Erases one viewer of one instance: counted, audited, then deleted, and no file keeps a
    /// readable copy. `subjects` are the viewer's stored forms. The audit entry names the erasure
    /// by a random reference (returned), never by the viewer's id or pseudonym, and every store it
    /// touched with counts.
    pub async fn erase(
        &self,
        store: &dyn CollectorStore,
        spec: EraseSpec,
        actor: String,
        deadline: Option<std::time::Instant>,
    ) -> Result<(Removed, String), CommitError> {
        let _guard = self.lock(&spec.org_id).await;
        self.auditor.settle_org(store, &spec.org_id).await?;
        let removed = store
            .erase_counts(&spec)
            .await
            .map_err(|e| CommitError::Store(e.into()))?;
        let reference = format!("erasure:{}", uuid::Uuid::new_v4());
        let mut attributes = counts(&removed);
        attributes.insert("instance_id".into(), spec.instance_id.clone());
        attributes.insert("stores".into(), erased_store_name(store));
        let change = StagedChange::new(
            AuditEntry {
                org_id: spec.org_id.clone(),
                actor,
                action: "collector.viewer_erased".into(),
                target: reference.clone(),
                attributes,
            },
            Change::Erase(spec).encode(),
            self.clock.now_ms(),
        );
        self.auditor.commit(store, change, deadline).await?;
        forget(store).await;
        Ok((removed, reference))
    }

    /// Deletes what each org's retention no longer allows; returns rows removed.
    pub async fn sweep(&self) -> i64 {
        if !self.policies.is_ready() {
            return 0;
        }
        let now = self.clock.now_ms();
        let days = |d: u32| i64::from(d.max(1)) * DAY_MS;
        let policies = self.policies.policies();
        // First the days every org in them has expired (PostgreSQL drops them whole): per
        // location, each org whose data may go, with the time its raw events expire before.
        let mut expiring: BTreeMap<_, BTreeMap<String, i64>> = BTreeMap::new();
        for policy in policies.iter().filter(|p| !p.moving) {
            let retention = policy.retention.unwrap_or_default();
            expiring
                .entry(policy.location())
                .or_default()
                .insert(policy.org_id.clone(), now - days(retention.raw_days));
        }
        let mut dropped: BTreeMap<String, i64> = BTreeMap::new();
        for (location, raw_before) in &expiring {
            let Ok(opened) = self.stores.get(*location).await else {
                continue;
            };
            match opened.store.drop_expired_days(raw_before).await {
                Ok(removed) => dropped.extend(removed),
                Err(error) => tracing::warn!(%error, "retention could not drop expired days"),
            }
        }
        let mut total = 0;
        for policy in policies {
            if policy.moving {
                continue;
            }
            let Ok(opened) = self.stores.get(policy.location()).await else {
                continue;
            };
            let retention = policy.retention.unwrap_or_default();
            let raw_before = now - days(retention.raw_days);
            let aggregate_before =
                (now - days(retention.aggregate_days)).div_euclid(HOUR_MS) * HOUR_MS;
            let ids_before = now - days(retention.event_id_days);
            match opened
                .store
                .sweep(&policy.org_id, raw_before, aggregate_before, ids_before)
                .await
            {
                Ok(removed) => {
                    let n = dropped.get(&policy.org_id).copied().unwrap_or_default()
                        + removed.events
                        + removed.view_counters
                        + removed.unique_viewer_entries
                        + removed.dedupe_entries
                        + removed.rollups;
                    if n > 0 {
                        tracing::info!(org_id = %policy.org_id, location = %location_name(policy.location()), removed = n, "retention sweep");
                    }
                    total += n;
                }
                Err(error) => tracing::warn!(%error, "retention sweep failed"),
            }
        }
        total
    }

    /// Rolls up every open store (but the hours of orgs whose data is moving).
    pub async fn roll_up(&self) {
        let _pass = self.rollup_pass.lock().await;
        let moving: Vec<String> = self
            .policies
            .policies()
            .into_iter()
            .filter(|p| p.moving)
            .map(|p| p.org_id.clone())
            .collect();
        for (_, opened) in self.stores.open_now() {
            if let Err(error) = remake_view_days(opened.store.as_ref(), &moving).await {
                tracing::warn!(%error, "day totals of page views not remade");
            }
            if let Err(error) =
                roll_up_dirty(opened.store.as_ref(), self.clock.now_ms(), &moving).await
            {
                tracing::warn!(%error, "rollup failed");
            }
        }
    }

    /// Carries out this collector's part of every residency move under way; returns how many it
    /// reported done. A move that fails is tried again on the next pass.
    pub async fn move_data(&self) -> usize {
        if !self.policies.is_ready() {
            return 0;
        }
        let mut done = 0;
        for policy in self.policies.policies() {
            let Some(data_move) = policy.data_move.as_ref().filter(|_| policy.moving) else {
                continue;
            };
            if data_move.reported_by.iter().any(|o| o == MOVE_OWNER) {
                continue;
            }
            match self.move_org(&policy, data_move).await {
                Ok(()) => done += 1,
                Err(error) => {
                    tracing::warn!(org_id = %policy.org_id, move_id = %data_move.move_id, %error, "residency move not done yet");
                }
            }
        }
        done
    }

    /// Copies an org's data to the move's new location, checks the copy, takes it out of the old
    /// store (audited), and reports the part done to consent-svc. Each step may be repeated: a
    /// move resumed after a crash starts the copy over, or only reports when the old store says
    /// the data left already.
    async fn move_org(
        &self,
        policy: &consent_pb::Policy,
        data_move: &consent_pb::ResidencyMove,
    ) -> Result<(), MoveError> {
        let org_id = policy.org_id.as_str();
        let _guard = self.lock(org_id).await;
        // A rollup pass that began before the policy said "moving" ends first.
        drop(self.rollup_pass.lock().await);
        let unavailable = |s: tonic::Status| MoveError::Unavailable(s.message().to_owned());
        let from = self
            .stores
            .get(data_move.from_location())
            .await
            .map_err(unavailable)?;
        let to = self
            .stores
            .get(data_move.to_location())
            .await
            .map_err(unavailable)?;
        if !from.store.moved_out(&data_move.move_id).await? {
            self.auditor.settle_org(from.store.as_ref(), org_id).await?;
            // What is moved is final: the org's purges are applied first (`purge` passes over
            // those applied already).
            for spec in purge_specs(policy) {
                self.purge(from.store.as_ref(), &spec).await?;
            }
            let in_place = from.store.identity().await? == to.store.identity().await?;
            let mut attributes = BTreeMap::new();
            if !in_place {
                copy_org(from.store.as_ref(), to.store.as_ref(), org_id).await?;
                let (before, after) = (
                    from.store.org_counts(org_id).await?,
                    to.store.org_counts(org_id).await?,
                );
                for ((table, from), to) in MOVED_TABLES.iter().zip(before).zip(after) {
                    if table.counted && from != to {
                        return Err(MoveError::Mismatch {
                            table: table.name,
                            from,
                            to,
                        });
                    }
                    attributes.insert(table.name.to_owned(), to.to_string());
                }
            }
            let spec = MoveSpec {
                move_id: data_move.move_id.clone(),
                org_id: org_id.to_owned(),
                from_location: location_name(data_move.from_location()),
                to_location: location_name(data_move.to_location()),
                in_place,
            };
            attributes.insert("from".into(), spec.from_location.clone());
            attributes.insert("to".into(), spec.to_location.clone());
            attributes.insert("in_place".into(), in_place.to_string());
            let change = StagedChange::new(
                AuditEntry {
                    org_id: org_id.to_owned(),
                    actor: "service:collector".into(),
                    action: "collector.residency_moved".into(),
                    target: data_move.move_id.clone(),
                    attributes,
                },
                Change::MoveOut(spec).encode(),
                self.clock.now_ms(),
            );
            self.auditor
                .commit(from.store.as_ref(), change, None)
                .await?;
            tracing::info!(%org_id, move_id = %data_move.move_id, in_place, "org data moved");
        }
        sightline_runtime::location::report_move_part(
            self.consent.clone(),
            &self.service_token,
            org_id,
            consent_pb::ResidencyScope::Data,
            MOVE_OWNER,
        )
        .await
        .map(drop)
        .map_err(|status| MoveError::Report(status.message().to_owned()))
    }

    /// Makes every open store ready for the days around now ([`prepare_days_around`]).
    pub async fn prepare_days(&self) {
        let now = self.clock.now_ms();
        for (_, opened) in self.stores.open_now() {
            prepare_days_around(opened.store.as_ref(), now).await;
        }
    }

    /// Settles staged changes left by a crash, in every open store.
    pub async fn recover(&self) {
        for (_, opened) in self.stores.open_now() {
            if let Err(error) = self
                .auditor
                .recover(opened.store.as_ref(), self.clock.now_ms())
                .await
            {
                tracing::warn!(%error, "cannot settle staged changes");
            }
        }
    }

    /// Runs rollups, purges, sweeps and recovery on their schedules until `shutdown`.
    pub fn spawn(self, every: Schedules, shutdown: CancellationToken) {
        let m = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                m.recover().await;
                m.apply_purges().await;
                m.move_data().await;
                tokio::select! {
                    () = stop.cancelled() => break,
                    // A change is applied only after the commits in flight under the old policy
                    // have answered (the policy fence): what a purge must take is all stored.
                    () = m.policies.changed().notified() => {}
                    () = tokio::time::sleep(every.purges) => {}
                }
            }
        });
        let m = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(every.rollups) => m.roll_up().await,
                }
            }
        });
        let m = self;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(every.sweeps) => {
                        // Days are made ahead once per sweep (hours apart, days ahead), not with
                        // every policy change; a store makes them when it opens.
                        m.prepare_days().await;
                        m.sweep().await;
                    }
                }
            }
        });
    }
}

/// How often background work runs.
#[derive(Debug, Clone, Copy)]
pub struct Schedules {
    pub rollups: Duration,
    pub sweeps: Duration,
    pub purges: Duration,
}

#[cfg(test)]
mod tests;
