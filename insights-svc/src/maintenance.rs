//! insights-svc's background work: the hourly score of every linked instance (score history,
//! SPEC I2), retention sweeps and purges from the policies (SPEC I5), each deletion an audited
//! change (its entry in the org's audit log with the counts, applied exactly when the entry is
//! there), and support-bundle files with no record removed.

use sightline_runtime::policy_stream::{PolicyFollower as _, TableFollower as _};
use std::collections::HashSet;
use std::time::Duration;

use sightline_proto::common::v1::{EventKind, UsageLevel};
use sightline_proto::consent::v1 as consent_pb;
use sightline_proto::insights::v1 as pb;
use sightline_proto::linker::v1 as linker_pb;
use sightline_proto::linker::v1::linker_service_client::LinkerServiceClient;
use sightline_runtime::audited::{AuditEntry, Auditor, CommitError, StagedChange};
use sightline_runtime::auth::authorize;
use sightline_runtime::location::location_name;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::grpc::{InsightsApi, allows_metrics};
use crate::health::HOUR_MS;
use crate::store::{
    Change, Cutoffs, InsightsStore, OrgRecords, Part, PurgeSpec, Removed, StoredBundle,
};

use sightline_runtime::time::DAY_MS;

/// How often each kind of work runs.
#[derive(Debug, Clone, Copy)]
pub struct Schedules {
    pub scores: Duration,
    pub sweeps: Duration,
    pub purges: Duration,
}

/// The owner name insights-svc reports its part of a residency move under.
pub(crate) const MOVE_OWNER: &str = "insights";

#[derive(Debug, Clone)]
pub struct Maintenance {
    pub(crate) api: InsightsApi,
    pub(crate) auditor: Auditor,
    pub(crate) consent: tonic::transport::Channel,
    /// Sweeps, purges and moves of this process run one at a time (so a pass that returns has
    /// finished what a concurrent one started, files included); across replicas the claims in the
    /// store keep each purge and move to one.
    pub(crate) passes: std::sync::Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("{0}")]
    Call(#[from] Status),
}

/// Whether a pass's commit failed because another pass or replica holds the same work (a store
/// conflict, or that one's settling took this change for abandoned): that one carries it out and
/// reports it.
fn held_elsewhere(error: &MaintenanceError) -> bool {
    matches!(
        error,
        MaintenanceError::Commit(CommitError::Store(_) | CommitError::Superseded)
    )
}

impl Maintenance {
    pub fn spawn(self, schedules: Schedules, shutdown: CancellationToken) {
        let scores = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = scores.score_pass().await {
                    tracing::warn!(%error, "score pass failed");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(schedules.scores) => {}
                }
            }
        });
        let sweeps = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(schedules.sweeps) => {}
                }
                if let Err(error) = sweeps.sweep_pass().await {
                    tracing::warn!(%error, "retention sweep failed");
                }
                match sweeps.remove_orphan_files().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "bundle files without a record removed"),
                    Err(error) => {
                        tracing::warn!(%error, "bundle files without a record not removed")
                    }
                }
            }
        });
        let purges = self;
        tokio::spawn(async move {
            loop {
                if let Err(error) = purges.purge_pass().await {
                    tracing::warn!(%error, "purge pass failed");
                }
                if let Err(error) = purges.move_data().await {
                    tracing::warn!(%error, "the org's data not moved yet");
                }
                if let Err(error) = purges.move_bundles().await {
                    tracing::warn!(%error, "support bundles not moved yet");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = purges.api.policies.changed().notified() => {}
                    () = tokio::time::sleep(schedules.purges) => {}
                }
            }
        });
    }

    /// Every linked instance of every org that allows metrics: its score now, kept for the hour.
    pub async fn score_pass(&self) -> Result<u32, MaintenanceError> {
        let mut kept = 0;
        for (policy, _) in self.api.policies.all() {
            if !allows_metrics(&policy) {
                continue;
            }
            // An org whose data moves is scored again once it is in its new location.
            let Ok(store) = self.api.data_store_for_write(&policy).await else {
                continue;
            };
            for instance in self.linked_instances(&policy.org_id).await? {
                let health = match self.api.health_of(&policy.org_id, &instance).await {
                    Ok(health) => health,
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), "no score for an instance");
                        continue;
                    }
                };
                if !health.has_data {
                    continue;
                }
                let hour = self.api.clock.now_ms().div_euclid(HOUR_MS) * HOUR_MS;
                store
                    .put_score(
                        &policy.org_id,
                        &instance,
                        hour,
                        i64::from(health.score),
                        &health.rules_version,
                        pb::DataSource::Connected as i64,
                    )
                    .await?;
                kept += 1;
            }
        }
        Ok(kept)
    }

    async fn linked_instances(&self, org_id: &str) -> Result<Vec<String>, Status> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let mut request = tonic::Request::new(linker_pb::ListInstancesRequest {
                org_id: org_id.to_owned(),
                page_size: 500,
                page_token: page_token.clone(),
                instance_id: String::new(),
            });
            authorize(&mut request, &self.api.service_token)?;
            let reply = LinkerServiceClient::new(self.api.linker.clone())
                .list_instances(request)
                .await?
                .into_inner();
            out.extend(
                reply
                    .instances
                    .into_iter()
                    .filter(|i| i.state() == linker_pb::InstanceState::Linked)
                    .map(|i| i.instance_id),
            );
            if reply.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = reply.next_page_token;
        }
    }

    /// Removes every org's records past its retention (as its policy says), in every location's
    /// store, audited with counts.
    pub async fn sweep_pass(&self) -> Result<Removed, MaintenanceError> {
        let _pass = self.passes.lock().await;
        let now = self.api.clock.now_ms();
        let mut total = Removed::default();
        for (_, store) in self.api.stores.open_now() {
            self.auditor
                .recover(store.as_ref(), self.api.clock.now_ms())
                .await?;
            for org_id in store.orgs().await? {
                let Some(policy) = self.api.policies.policy(&org_id, None)? else {
                    continue;
                };
                let retention = policy.retention.unwrap_or_default();
                let days = |d: u32| i64::from(d.max(1)) * DAY_MS;
                let cutoffs = Cutoffs {
                    assessments: now - days(retention.assessment_days),
                    scores: now - days(retention.score_history_days),
                    bundles: now - days(retention.support_bundle_days),
                };
                let (removed, files) = store.sweep_counts(&org_id, &cutoffs).await?;
                if removed == Removed::default() {
                    continue;
                }
                let change = Change::Sweep {
                    org_id: org_id.clone(),
                    cutoffs,
                };
                self.commit(
                    store.as_ref(),
                    &org_id,
                    "insights.retention_swept",
                    "retention",
                    &removed,
                    change,
                )
                .await?;
                self.remove_files(&files);
                add(&mut total, &removed);
            }
        }
        Ok(total)
    }

    /// Carries out every purge instruction of the policies not applied yet, once each, in every
    /// location's store that holds what it covers (and, to record it, in the org's own locations').
    pub async fn purge_pass(&self) -> Result<u32, MaintenanceError> {
        if !self.api.policies.is_ready() {
            return Ok(0);
        }
        let _pass = self.passes.lock().await;
        let stores = self.api.stores.open_now();
        for (_, store) in &stores {
            self.auditor
                .recover(store.as_ref(), self.api.clock.now_ms())
                .await?;
        }
        let mut applied = 0;
        for (policy, instances) in self.api.policies.all() {
            let own = [
                location_name(policy.location()),
                location_name(policy.support_bundle_location()),
            ];
            let mut seen = HashSet::new();
            for holder in std::iter::once(&policy).chain(instances.iter()) {
                for purge in &holder.purges {
                    if purge.purge_id.is_empty() || !seen.insert(purge.purge_id.clone()) {
                        continue;
                    }
                    let spec = spec_of(&policy, holder, purge);
                    for (location, store) in &stores {
                        if store.purge_applied(&purge.purge_id).await? {
                            continue;
                        }
                        let (removed, files) = store.purge_counts(&spec).await?;
                        if removed == Removed::default() && !own.contains(location) {
                            continue;
                        }
                        let change = Change::Purge(spec.clone());
                        match self
                            .commit(
                                store.as_ref(),
                                &spec.org_id,
                                "insights.purge_applied",
                                &spec.purge_id,
                                &removed,
                                change,
                            )
                            .await
                        {
                            Ok(()) => {
                                self.remove_files(&files);
                                applied += 1;
                                // No file keeps a readable copy of what the purge took.
                                if let Err(error) = store.forget_deleted().await {
                                    tracing::warn!(%error, "purged rows may stay readable until the next checkpoint");
                                }
                            }
                            // Another pass or replica holds it.
                            Err(error) if held_elsewhere(&error) => {}
                            Err(other) => return Err(other),
                        }
                    }
                }
            }
        }
        Ok(applied)
    }

    /// Carries out insights-svc's part of every data residency move under way (SPEC E10): copies
    /// the org's assessments, readiness reports and score history to the new location's store,
    /// checks the copy there, deletes them from the old store (an audited change, claimed once)
    /// and reports the part done to consent-svc. Between stores of one database there is nothing
    /// to carry. Each step may be repeated after a crash; returns how many moves it reported.
    pub async fn move_data(&self) -> Result<u32, MaintenanceError> {
        if !self.api.policies.is_ready() {
            return Ok(0);
        }
        let _pass = self.passes.lock().await;
        let mut reported = 0;
        for (policy, _) in self.api.policies.all() {
            let Some(data_move) = policy.data_move.as_ref().filter(|_| policy.moving) else {
                continue;
            };
            if data_move.reported_by.iter().any(|o| o == MOVE_OWNER) {
                continue;
            }
            let org_id = policy.org_id.as_str();
            let (from, to) = (data_move.from_location(), data_move.to_location());
            if !self.api.stores.same_database(from, to) {
                let source = self.api.stores.get(from).await?;
                let target = self.api.stores.get(to).await?;
                if !source.move_applied(&data_move.move_id).await? {
                    self.auditor.settle_org(source.as_ref(), org_id).await?;
                    let records = source.org_records(org_id, &Part::Data).await?;
                    target.import(&records).await?;
                    let (sent, arrived) = (
                        records.counts(),
                        target.org_records(org_id, &Part::Data).await?.counts(),
                    );
                    if arrived.assessments < sent.assessments
                        || arrived.readiness < sent.readiness
                        || arrived.scores < sent.scores
                    {
                        return Err(Status::internal(format!(
                            "the copy of the org's data to {} is short ({arrived:?} of {sent:?})",
                            location_name(to)
                        ))
                        .into());
                    }
                    let change = Change::MoveOut {
                        move_id: data_move.move_id.clone(),
                        org_id: org_id.to_owned(),
                        part: Part::Data,
                    };
                    match self
                        .commit(
                            source.as_ref(),
                            org_id,
                            "insights.residency_moved",
                            &data_move.move_id,
                            &sent,
                            change,
                        )
                        .await
                    {
                        Ok(()) => {}
                        // Another pass or replica carries it out and reports it.
                        Err(error) if held_elsewhere(&error) => continue,
                        Err(other) => return Err(other),
                    }
                    if let Err(error) = source.forget_deleted().await {
                        tracing::warn!(%error, "moved rows may stay readable in the old store until the next checkpoint");
                    }
                    tracing::info!(%org_id, move_id = %data_move.move_id, "org insights data moved");
                }
            }
            if self
                .report_part(org_id, consent_pb::ResidencyScope::Data)
                .await?
            {
                reported += 1;
            }
        }
        Ok(reported)
    }

    /// Reports insights-svc's part of the org's move of `scope` done (false: finished meanwhile).
    async fn report_part(
        &self,
        org_id: &str,
        scope: consent_pb::ResidencyScope,
    ) -> Result<bool, MaintenanceError> {
        Ok(sightline_runtime::location::report_move_part(
            self.consent.clone(),
            &self.api.service_token,
            org_id,
            scope,
            MOVE_OWNER,
        )
        .await?)
    }

    /// Carries out insights-svc's part of every support-bundle residency move under way: copies
    /// the org's bundle files to the new location's directory and their records to the new
    /// location's store (between stores of one database the records are relabelled instead), takes
    /// them out of the old store (an audited change), removes the old files and reports the part
    /// done to consent-svc. Each step may be repeated after a crash; returns how many moves it
    /// reported.
    pub async fn move_bundles(&self) -> Result<u32, MaintenanceError> {
        if !self.api.policies.is_ready() {
            return Ok(0);
        }
        let _pass = self.passes.lock().await;
        let mut reported = 0;
        for (policy, _) in self.api.policies.all() {
            let Some(bundle_move) = policy
                .support_bundles_move
                .as_ref()
                .filter(|_| policy.support_bundles_moving)
            else {
                continue;
            };
            if bundle_move.reported_by.iter().any(|o| o == MOVE_OWNER) {
                continue;
            }
            let org_id = policy.org_id.as_str();
            let (from_location, to_location) =
                (bundle_move.from_location(), bundle_move.to_location());
            let (from, to) = (location_name(from_location), location_name(to_location));
            let in_place = self.api.stores.same_database(from_location, to_location);
            let source = self.api.stores.get(from_location).await?;
            let target = self.api.stores.get(to_location).await?;
            let (from_dir, to_dir) = (
                self.api.bundle_dirs.dir(&from),
                self.api.bundle_dirs.dir(&to),
            );
            let moving: Vec<StoredBundle> = if source.move_applied(&bundle_move.move_id).await? {
                // Carried out before (a report lost, or a crash before it): report only.
                Vec::new()
            } else {
                let part = Part::Bundles {
                    location: from.clone(),
                };
                source.org_records(org_id, &part).await?.bundles
            };
            if !moving.is_empty() {
                // Copies with the old records must not look like files without one.
                let _keeping = self.api.keeping.read().await;
                let names: Vec<String> = moving.iter().map(|b| b.file_name.clone()).collect();
                let (source_dir, target_dir) = (from_dir.clone(), to_dir.clone());
                if source_dir != target_dir {
                    tokio::task::spawn_blocking(move || {
                        copy_files(&source_dir, &target_dir, &names)
                    })
                    .await
                    .map_err(|e| Status::internal(format!("copying bundles: {e}")))?
                    .map_err(|e| Status::unavailable(format!("copying bundles: {e}")))?;
                }
                let removed = OrgRecords {
                    bundles: moving.clone(),
                    ..OrgRecords::default()
                }
                .counts();
                let change = if in_place {
                    Change::MoveInPlace {
                        move_id: bundle_move.move_id.clone(),
                        org_id: org_id.to_owned(),
                        from: from.clone(),
                        to: to.clone(),
                    }
                } else {
                    let copies = OrgRecords {
                        bundles: moving
                            .iter()
                            .map(|b| StoredBundle {
                                location: to.clone(),
                                ..b.clone()
                            })
                            .collect(),
                        ..OrgRecords::default()
                    };
                    target.import(&copies).await?;
                    Change::MoveOut {
                        move_id: bundle_move.move_id.clone(),
                        org_id: org_id.to_owned(),
                        part: Part::Bundles {
                            location: from.clone(),
                        },
                    }
                };
                match self
                    .commit(
                        source.as_ref(),
                        org_id,
                        "insights.support_bundles_moved",
                        &bundle_move.move_id,
                        &removed,
                        change,
                    )
                    .await
                {
                    Ok(()) => {}
                    // Another pass or replica carries it out and reports it.
                    Err(error) if held_elsewhere(&error) => continue,
                    Err(other) => return Err(other),
                }
                if from_dir != to_dir {
                    for bundle in &moving {
                        let _ = std::fs::remove_file(from_dir.join(&bundle.file_name));
                    }
                }
                tracing::info!(%org_id, move_id = %bundle_move.move_id, bundles = moving.len(), "support bundles moved");
            }
            if self
                .report_part(org_id, consent_pb::ResidencyScope::SupportBundles)
                .await?
            {
                reported += 1;
            }
        }
        Ok(reported)
    }

    async fn commit(
        &self,
        store: &dyn InsightsStore,
        org_id: &str,
        action: &str,
        target: &str,
        removed: &Removed,
        change: Change,
    ) -> Result<(), MaintenanceError> {
        self.auditor.settle_org(store, org_id).await?;
        let attributes = [
            ("assessments", removed.assessments),
            ("readiness_reports", removed.readiness),
            ("scores", removed.scores),
            ("support_bundles", removed.bundles),
            ("records_stripped", removed.stripped),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_string()))
        .collect();
        let staged = StagedChange::new(
            AuditEntry {
                org_id: org_id.to_owned(),
                actor: "service:insights".into(),
                action: action.into(),
                target: target.into(),
                attributes,
            },
            change.encode(),
            self.api.clock.now_ms(),
        );
        self.auditor.commit(store, staged, None).await?;
        Ok(())
    }

    fn remove_files(&self, files: &[(String, String)]) {
        for (location, name) in files {
            let path = self.api.bundle_dirs.dir(location).join(name);
            if let Err(error) = std::fs::remove_file(&path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(%error, "a removed bundle's file stays");
            }
        }
    }

    /// Bundle files no record names (a crash between writing one and recording it, or between
    /// a deletion and its file's removal) and temporaries a crash left, once they are older than
    /// `analysis.orphan_grace_ms`: a younger one may be an upload under way, this replica's or
    /// another's sharing the directories. Run at start and with every sweep.
    pub async fn remove_orphan_files(&self) -> Result<u32, MaintenanceError> {
        let grace = self.api.bundle_dirs.orphan_grace;
        // File ages are the file system's: modification times against its clock, not the
        // service's (which tests move).
        let old_enough = |entry: &std::fs::DirEntry| {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|at| std::time::SystemTime::now().duration_since(at).ok())
                .is_some_and(|age| age >= grace)
                || grace.is_zero()
        };
        let _no_bundle_is_being_kept = self.api.keeping.write().await;
        let mut known: HashSet<(String, String)> = HashSet::new();
        for (_, store) in self.api.stores.open_now() {
            known.extend(store.bundle_files().await?);
        }
        let mut removed = 0;
        let root = self.api.bundle_dirs.data_dir.join("bundles");
        let mut dirs: Vec<(String, std::path::PathBuf)> = self
            .api
            .bundle_dirs
            .configured
            .iter()
            .map(|(l, d)| (l.clone(), d.clone()))
            .collect();
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') && !dirs.iter().any(|(l, _)| *l == name) {
                    dirs.push((name, entry.path()));
                }
            }
        }
        for (location, dir) in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // A kept bundle with no record, or a scrubbed copy a crash left half-written.
                let orphan = (name.ends_with(".zip")
                    && !known.contains(&(location.clone(), name.clone())))
                    || name.starts_with(".tmp");
                if orphan && old_enough(&entry) && std::fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        // Uploads cut off mid-stream (a crash) leave temporary files behind until they are old.
        if let Ok(entries) = std::fs::read_dir(root.join(".incoming")) {
            for entry in entries.flatten() {
                if old_enough(&entry) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(removed)
    }
}

/// Copies bundle files into `target` durably (each synced, renamed into place, the directory
/// synced); a file copied before (a resumed move) is copied again.
fn copy_files(
    source: &std::path::Path,
    target: &std::path::Path,
    names: &[String],
) -> std::io::Result<()> {
    sightline_runtime::secret_file::private_dir(target)?;
    for name in names {
        let mut from = std::fs::File::open(source.join(name))?;
        let mut copy = tempfile::NamedTempFile::new_in(target)?;
        std::io::copy(&mut from, copy.as_file_mut())?;
        crate::upload::keep_file(copy, &target.join(name))?;
    }
    Ok(())
}

fn add(total: &mut Removed, more: &Removed) {
    total.assessments += more.assessments;
    total.readiness += more.readiness;
    total.scores += more.scores;
    total.bundles += more.bundles;
    total.stripped += more.stripped;
}

/// What a purge instruction means for insights-svc's data.
fn spec_of(
    org: &consent_pb::Policy,
    holder: &consent_pb::Policy,
    purge: &consent_pb::PurgeInstruction,
) -> PurgeSpec {
    let instance_scope = purge.scope() == consent_pb::PurgeScope::Instance;
    // The policy the purge leaves in force for what it covers.
    let after = if instance_scope { holder } else { org };
    PurgeSpec {
        purge_id: purge.purge_id.clone(),
        org_id: org.org_id.clone(),
        subject: instance_scope.then(|| purge.instance_id.clone()),
        delete_scores: purge.delete_kinds.contains(&(EventKind::Metric as i32)),
        delete_uploads: after.usage_level() == UsageLevel::Disabled,
        strip_classes: purge.strip_classes.clone(),
    }
}
