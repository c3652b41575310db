//! The gRPC face of consent-svc: authentication, proto ↔ domain conversion, and the flow of every
//! change (serialise per org, decide, store with its audit entry, publish the new policy).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::Stream;
use sightline_proto::common::v1 as common_pb;
use sightline_proto::consent::v1 as pb;
use sightline_proto::consent::v1::consent_service_server::ConsentService;
use sightline_runtime::SharedClock;
use sightline_runtime::audited::{AuditEntry, Auditor, StagedChange};
use sightline_runtime::auth::{CredentialClient, Principal};
use sightline_runtime::directory::Directory;
use sightline_runtime::ratelimit::RateLimiter;
use sightline_runtime::settings::ResidencySettings;
use sightline_runtime::time::{to_proto, to_proto_opt};
use tokio::sync::{Mutex, OwnedMutexGuard, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::domain::{self, Allowance, Consent, PurgeSpec, Retention, Sharing, Tracking, Usage};
use crate::error::ConsentError;
use crate::policy::{self, OrgState, Override, SCOPE_INSTANCE, SCOPE_ORG};
use crate::receipt::{self, ReceiptSigner, Statement};
use crate::store::{
    Change, ConsentRecord, ConsentStore, MoveFrom, MoveRecord, OverrideRecord, PurgeRecord,
    ResidencyRecord, RetentionRecord, StagedPayload, TrackingRecord,
};

type GrpcResult<T> = Result<Response<T>, Status>;

const HUB_CAPACITY: usize = 4_096;

/// What a WatchPolicy stream follows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Watched {
    AllOrgs,
    Org(String),
    Instance { org_id: String, instance_id: String },
}

/// How the API behaves, beyond its collaborators.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Messages a watcher may leave unread before its stream ends with ABORTED.
    pub watch_buffer: usize,
    /// The server's longest call (`limits.request_timeout_ms`): a change must be recorded within it
    /// as within the client's own deadline.
    pub call_limit: Duration,
    /// The pseudonymization key version policies name.
    pub pseudonym_key_version: u32,
    /// The data owners that report their part of a move, per scope.
    pub residency: sightline_runtime::settings::ResidencySettings,
    /// How often a WatchPolicy stream carries a heartbeat (`limits.policy_heartbeat_ms`).
    pub heartbeat: Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        Self {
            watch_buffer: 256,
            call_limit: Duration::from_secs(30),
            pseudonym_key_version: 1,
            residency: sightline_runtime::settings::ResidencySettings::default(),
            heartbeat: Duration::from_secs(2),
        }
    }
}

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct ConsentApi {
    store: Arc<dyn ConsentStore>,
    clock: SharedClock,
    credentials: CredentialClient,
    directory: Directory,
    limiter: Arc<RateLimiter>,
    auditor: Auditor,
    signer: Arc<ReceiptSigner>,
    hub: broadcast::Sender<Arc<pb::WatchPolicyResponse>>,
    locks: Arc<DashMap<String, Arc<Mutex<()>>>>,
    shutdown: CancellationToken,
    options: ApiOptions,
}

impl ConsentApi {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn ConsentStore>,
        clock: SharedClock,
        credentials: CredentialClient,
        directory: Directory,
        limiter: RateLimiter,
        auditor: Auditor,
        signer: Arc<ReceiptSigner>,
        shutdown: CancellationToken,
        options: ApiOptions,
    ) -> Self {
        Self {
            store,
            clock,
            credentials,
            directory,
            limiter: Arc::new(limiter),
            auditor,
            signer,
            hub: broadcast::channel(HUB_CAPACITY).0,
            locks: Arc::new(DashMap::new()),
            shutdown,
            options,
        }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let principal = self.credentials.authenticate(request).await?;
        self.limiter.check_caller(&principal)?;
        Ok(principal)
    }

    /// The caller, allowed to change `org_id`.
    async fn admin<T>(
        &self,
        request: &Request<T>,
        org_id: &str,
    ) -> Result<(Principal, String), Status> {
        let caller = self.caller(request).await?;
        let org_id = domain::id("org_id", org_id)?;
        caller.require_admin_of(&org_id)?;
        self.directory.require_org(&org_id).await?;
        sightline_runtime::telemetry::note_ids(&org_id, None);
        Ok((caller, org_id))
    }

    /// The caller, allowed to read `org_id` (its admins, the operator, enforcement points).
    async fn reader<T>(
        &self,
        request: &Request<T>,
        org_id: &str,
    ) -> Result<(Principal, String), Status> {
        let caller = self.caller(request).await?;
        let org_id = domain::id("org_id", org_id)?;
        caller.require_reader_of(&org_id)?;
        self.directory.require_org(&org_id).await?;
        sightline_runtime::telemetry::note_ids(&org_id, None);
        Ok((caller, org_id))
    }

    /// Whose policy a GetPolicy or WatchPolicy asks for. An instance credential reads its own
    /// instance's only (ids it sends must be its own); other readers name an existing org and,
    /// optionally, one of its instances.
    async fn policy_scope(
        &self,
        caller: &Principal,
        org_id: &str,
        instance_id: &str,
    ) -> Result<(String, Option<String>), Status> {
        if let Principal::Instance {
            org_id: own_org,
            instance_id: own_instance,
            ..
        } = caller
        {
            if !org_id.is_empty() && &domain::id("org_id", org_id)? != own_org {
                return Err(Status::permission_denied(
                    "org_id: an instance credential reads its own org's policy only",
                ));
            }
            if !instance_id.is_empty() && &domain::id("instance_id", instance_id)? != own_instance {
                return Err(Status::permission_denied(
                    "instance_id: an instance credential reads its own instance's policy only",
                ));
            }
            sightline_runtime::telemetry::note_ids(own_org, Some(own_instance));
            return Ok((own_org.clone(), Some(own_instance.clone())));
        }
        let org_id = domain::id("org_id", org_id)?;
        caller.require_reader_of(&org_id)?;
        self.directory.require_org(&org_id).await?;
        let instance_id = match instance_id {
            "" => None,
            id => {
                let id = domain::id("instance_id", id)?;
                self.directory.require_instance(&org_id, &id).await?;
                Some(id)
            }
        };
        sightline_runtime::telemetry::note_ids(&org_id, instance_id.as_deref());
        Ok((org_id, instance_id))
    }

    /// Serialises the org's changes, with the org's earlier staged changes settled first, so a new
    /// change is computed from the state every earlier one left.
    async fn lock(&self, org_id: &str) -> Result<OwnedMutexGuard<()>, ConsentError> {
        let lock = self
            .locks
            .entry(org_id.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(())))
            .clone();
        let guard = lock.lock_owned().await;
        let settled = self.auditor.settle_org(self.store.as_ref(), org_id).await?;
        if settled.applied > 0 {
            self.publish(org_id, Vec::new()).await;
        }
        Ok(guard)
    }

    /// When a call must be done by: the client's deadline or the server's limit, the earlier.
    fn deadline<T>(&self, request: &Request<T>) -> std::time::Instant {
        sightline_runtime::deadline::call_deadline(request.metadata(), self.options.call_limit)
    }

    /// Settles what a crash or a lost answer left staged, and publishes the orgs that changed.
    pub async fn recover(&self) {
        match self.auditor.recover(self.store.as_ref()).await {
            Ok(settled) => {
                for org_id in settled.changed_orgs {
                    self.publish(&org_id, Vec::new()).await;
                }
            }
            Err(error) => tracing::warn!(%error, "cannot settle staged changes"),
        }
    }

    async fn consent(
        &self,
        org_id: &str,
    ) -> Result<(Consent, Option<ConsentRecord>), ConsentError> {
        let record = self.store.latest_consent(org_id).await?;
        let consent = match &record {
            Some(r) => consent_of(r)?,
            None => Consent::DEFAULT,
        };
        Ok((consent, record))
    }

    async fn tracking(&self, org_id: &str) -> Result<Tracking, ConsentError> {
        Ok(match self.store.tracking(org_id).await? {
            Some(r) => tracking_of(&r),
            None => Tracking::default(),
        })
    }

    async fn retention(&self, org_id: &str) -> Result<Retention, ConsentError> {
        Ok(match self.store.retention(org_id).await? {
            Some(r) => retention_of(&r),
            None => Retention::default(),
        })
    }

    async fn residency(
        &self,
        org_id: &str,
    ) -> Result<(pb::Residency, Vec<MoveRecord>), ConsentError> {
        let (record, moves) = self.store.residency(org_id).await?;
        let (location, support) = match &record {
            Some(r) => (
                domain::location_from_name(&r.location),
                domain::location_from_name(&r.support_bundle_location),
            ),
            None => (common_pb::Location::Global, common_pb::Location::Global),
        };
        // The latest move per scope.
        let mut latest: Vec<pb::ResidencyMove> = Vec::new();
        for m in &moves {
            let m = move_pb(m, &self.options.residency);
            if !latest.iter().any(|l| l.scope == m.scope) {
                latest.push(m);
            }
        }
        Ok((
            pb::Residency {
                org_id: org_id.to_owned(),
                location: location as i32,
                support_bundle_location: support as i32,
                moves: latest,
            },
            moves,
        ))
    }

    /// Everything the org's policies derive from.
    async fn state(&self, org_id: &str) -> Result<OrgState, ConsentError> {
        let (consent, record) = self.consent(org_id).await?;
        let (residency, moves) = self.residency(org_id).await?;
        let moving = |scope: pb::ResidencyScope| {
            moves
                .iter()
                .find(|m| m.scope == scope_name(scope) && m.state == "MOVING")
                .map(|m| move_pb(m, &self.options.residency))
        };
        let overrides = self
            .store
            .overrides(org_id)
            .await?
            .iter()
            .map(override_of)
            .collect::<Result<_, _>>()?;
        Ok(OrgState {
            org_id: org_id.to_owned(),
            consent,
            consent_version: record.map_or(0, |r| u64::try_from(r.version).unwrap_or(0)),
            revision: self
                .store
                .policy_state(org_id)
                .await?
                .map_or(0, |s| u64::try_from(s.revision).unwrap_or(0)),
            tracking: self.tracking(org_id).await?,
            retention: self.retention(org_id).await?,
            location: residency.location(),
            support_bundle_location: residency.support_bundle_location(),
            data_move: moving(pb::ResidencyScope::Data),
            support_bundles_move: moving(pb::ResidencyScope::SupportBundles),
            overrides,
            purges: self.store.purges(org_id).await?,
            pseudonym_key_version: self.options.pseudonym_key_version,
        })
    }

    /// The effective policy of an org, or of one of its instances.
    pub async fn policy(
        &self,
        org_id: &str,
        instance_id: Option<&str>,
    ) -> Result<pb::Policy, ConsentError> {
        Ok(self.state(org_id).await?.policy(instance_id))
    }

    /// Sends the org's new policies to every watcher.
    async fn publish(&self, org_id: &str, instance_ids: Vec<String>) {
        match self.state(org_id).await {
            Ok(state) => {
                // No receiver is fine: nobody is watching.
                let _ = self.hub.send(Arc::new(state.watch_message(instance_ids)));
            }
            Err(error) => tracing::error!(%org_id, %error, "cannot publish policy"),
        }
    }

    /// A purge to store with a change that lowers what `org_id` (or one instance) allows.
    fn purge_record(
        &self,
        org_id: &str,
        instance_id: Option<&str>,
        spec: PurgeSpec,
        before_consent_version: i64,
    ) -> PurgeRecord {
        let join = |values: Vec<i32>| {
            values
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        PurgeRecord {
            purge_id: uuid::Uuid::now_v7().to_string(),
            org_id: org_id.to_owned(),
            scope: if instance_id.is_some() {
                SCOPE_INSTANCE
            } else {
                SCOPE_ORG
            }
            .to_owned(),
            instance_id: instance_id.unwrap_or_default().to_owned(),
            delete_kinds: join(spec.delete_kinds.iter().map(|k| *k as i32).collect()),
            strip_classes: join(spec.strip_classes.iter().map(|c| *c as i32).collect()),
            withdraw_metadata: spec.withdraw_metadata,
            withdraw_in_app_data: spec.withdraw_in_app_data,
            before_consent_version,
            // Set by the store to the change's revision.
            before_revision: 0,
            issued_at: self.clock.now_ms(),
        }
    }

    /// Makes a change through the audited-change protocol (`runtime::audited`), then publishes the
    /// org's new policy: every change goes through here, so none is made without its audit entry or
    /// hidden from watchers. The commit runs to its end even when the caller goes, holding the org's
    /// lock until the change is settled.
    async fn commit(
        &self,
        guard: OwnedMutexGuard<()>,
        change: Change,
        purge: Option<PurgeRecord>,
        entry: AuditEntry,
        instance_ids: Vec<String>,
        deadline: Option<std::time::Instant>,
    ) -> Result<(), ConsentError> {
        let org_id = entry.org_id.clone();
        let staged = StagedChange {
            change_id: uuid::Uuid::now_v7().to_string(),
            org_id: org_id.clone(),
            entry,
            payload: StagedPayload { change, purge }.encode(),
            staged_at_ms: self.clock.now_ms(),
        };
        let api = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            api.auditor
                .commit(api.store.as_ref(), staged, deadline)
                .await?;
            api.publish(&org_id, instance_ids).await;
            Ok(())
        })
        .await
        .map_err(|e| ConsentError::Internal(format!("commit task: {e}")))?
    }

    /// Sends a watcher its snapshot, then every change it watches, until it goes or falls behind.
    async fn follow(
        &self,
        watched: Watched,
        mut changes: broadcast::Receiver<Arc<pb::WatchPolicyResponse>>,
        tx: mpsc::Sender<Result<pb::WatchPolicyResponse, Status>>,
    ) {
        let snapshot = match self.snapshot(&watched).await {
            Ok(snapshot) => snapshot,
            Err(error) => {
                let _ = tx.send(Err(error.into())).await;
                return;
            }
        };
        for message in snapshot {
            // A snapshot is bounded: wait for a slow reader rather than drop any of it.
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
        // The lease of every watcher: a heartbeat whenever the stream would otherwise be quiet for
        // `heartbeat`, so silence means the stream (or the path to it) is gone.
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + self.options.heartbeat,
            self.options.heartbeat,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let update = tokio::select! {
                () = tx.closed() => return,
                _ = heartbeat.tick() => {
                    let beat = pb::WatchPolicyResponse {
                        heartbeat: true,
                        ..Default::default()
                    };
                    match tx.try_send(Ok(beat)) {
                        // A full buffer: the watcher is not reading; the changes decide its fate.
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => continue,
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
                change = changes.recv() => match change {
                    Ok(update) => update,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        abort(&tx, &format!("watcher fell {missed} changes behind")).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            let Some(org_id) = update.policy.as_ref().map(|p| p.org_id.as_str()) else {
                continue;
            };
            let message = match &watched {
                Watched::AllOrgs => update.as_ref().clone(),
                Watched::Org(org) if org == org_id => update.as_ref().clone(),
                Watched::Instance {
                    org_id: org,
                    instance_id,
                } if org == org_id => pb::WatchPolicyResponse {
                    policy: policy::for_instance(&update, instance_id),
                    instance_ids: Vec::new(),
                    instance_policies: Vec::new(),
                    snapshot_complete: false,
                    heartbeat: false,
                },
                Watched::Org(_) | Watched::Instance { .. } => continue,
            };
            if tx.capacity() <= 1 {
                abort(&tx, "watcher fell behind").await;
                return;
            }
            if tx.try_send(Ok(message)).is_err() {
                return;
            }
        }
    }

    /// The first messages of a watch: the current policies, the last marked `snapshot_complete`.
    async fn snapshot(
        &self,
        watched: &Watched,
    ) -> Result<Vec<pb::WatchPolicyResponse>, ConsentError> {
        let mut messages = match watched {
            Watched::AllOrgs => {
                let mut all = Vec::new();
                for org_id in self.store.orgs().await? {
                    all.push(self.state(&org_id).await?.watch_message(Vec::new()));
                }
                all
            }
            Watched::Org(org_id) => vec![self.state(org_id).await?.watch_message(Vec::new())],
            Watched::Instance {
                org_id,
                instance_id,
            } => vec![pb::WatchPolicyResponse {
                policy: Some(self.policy(org_id, Some(instance_id)).await?),
                instance_ids: Vec::new(),
                instance_policies: Vec::new(),
                snapshot_complete: false,
                heartbeat: false,
            }],
        };
        match messages.last_mut() {
            Some(last) => last.snapshot_complete = true,
            None => messages.push(pb::WatchPolicyResponse {
                policy: None,
                instance_ids: Vec::new(),
                instance_policies: Vec::new(),
                snapshot_complete: true,
                heartbeat: false,
            }),
        }
        Ok(messages)
    }

    fn entry(
        &self,
        org_id: &str,
        caller: &Principal,
        action: &'static str,
        target: String,
    ) -> AuditEntry {
        AuditEntry {
            org_id: org_id.to_owned(),
            actor: caller.actor(),
            action: action.to_owned(),
            target,
            attributes: BTreeMap::new(),
        }
    }

    fn version_pb(&self, record: &ConsentRecord) -> Result<pb::ConsentVersion, ConsentError> {
        Ok(pb::ConsentVersion {
            org_id: record.org_id.clone(),
            version: u64::try_from(record.version).unwrap_or(0),
            settings: Some(consent_of(record)?.to_pb()),
            actor: record.actor.clone(),
            reason: record.reason.clone(),
            created_at: Some(to_proto(record.created_at)),
            receipt: Some(pb::ConsentReceipt {
                payload: record.receipt_payload.clone(),
                signature: record.receipt_signature.clone(),
                key_id: record.key_id.clone(),
            }),
        })
    }
}

fn consent_of(r: &ConsentRecord) -> Result<Consent, ConsentError> {
    Ok(Consent {
        usage: Usage::from_name(&r.usage_level).ok_or_else(|| {
            ConsentError::Internal(format!("stored usage level {}", r.usage_level))
        })?,
        sharing: Sharing::from_name(&r.sharing_level).ok_or_else(|| {
            ConsentError::Internal(format!("stored sharing level {}", r.sharing_level))
        })?,
        contribute_metadata: r.contribute_metadata,
        contribute_in_app_data: r.contribute_in_app_data,
        compliance_restricted: r.compliance_restricted,
    })
}

fn override_of(r: &OverrideRecord) -> Result<Override, ConsentError> {
    Ok(Override {
        instance_id: r.instance_id.clone(),
        usage: Usage::from_name(&r.usage_level).ok_or_else(|| {
            ConsentError::Internal(format!("stored override level {}", r.usage_level))
        })?,
        sharing: Sharing::from_name(&r.sharing_level).ok_or_else(|| {
            ConsentError::Internal(format!("stored override level {}", r.sharing_level))
        })?,
    })
}

fn retention_of(r: &RetentionRecord) -> Retention {
    let days = |value: i64, default: u32| u32::try_from(value).unwrap_or(default);
    let d = Retention::default();
    Retention {
        raw_days: days(r.raw_days, d.raw_days),
        assessment_days: days(r.assessment_days, d.assessment_days),
        aggregate_days: days(r.aggregate_days, d.aggregate_days),
        score_history_days: days(r.score_history_days, d.score_history_days),
        support_bundle_days: days(r.support_bundle_days, d.support_bundle_days),
        event_id_days: days(r.event_id_days, d.event_id_days),
    }
}

/// Records what a purge says in its change's audit entry.
fn note_purge(entry: &mut AuditEntry, purge: &PurgeRecord) {
    entry.attributes.extend([
        ("purge_id".to_owned(), purge.purge_id.clone()),
        ("purge_scope".to_owned(), purge.scope.clone()),
        ("purge_delete_kinds".to_owned(), purge.delete_kinds.clone()),
        (
            "purge_strip_classes".to_owned(),
            purge.strip_classes.clone(),
        ),
    ]);
}

fn tracking_of(r: &TrackingRecord) -> Tracking {
    Tracking {
        channels: r
            .enabled_channels
            .split(',')
            .filter_map(|c| c.parse::<i32>().ok())
            .filter_map(|c| common_pb::Channel::try_from(c).ok())
            .collect(),
        exclude_anonymous: r.exclude_anonymous,
        excluded_groups: serde_json::from_str(&r.excluded_groups).unwrap_or_default(),
        blocking_time_ms: u64::try_from(r.blocking_time_ms)
            .unwrap_or(domain::DEFAULT_BLOCKING_TIME_MS),
        view_counter_enabled: r.view_counter_enabled,
        global_report_group: r.global_report_group.clone(),
    }
}

/// Ends a watcher's stream with ABORTED: it must resubscribe and drop its cached policy.
async fn abort(tx: &mpsc::Sender<Result<pb::WatchPolicyResponse, Status>>, why: &str) {
    let status = Status::aborted(format!(
        "{why}; resubscribe and drop the cached policy (fail closed meanwhile)"
    ));
    // The reserved slot normally takes it at once; a reader that never reads is not waited for long.
    let _ = tokio::time::timeout(Duration::from_secs(5), tx.send(Err(status))).await;
}

fn scope_name(scope: pb::ResidencyScope) -> &'static str {
    match scope {
        pb::ResidencyScope::SupportBundles => "SUPPORT_BUNDLES",
        pb::ResidencyScope::Data | pb::ResidencyScope::Unspecified => "DATA",
    }
}

/// The owners that have reported their part of a move.
fn reported_by(m: &MoveRecord) -> Vec<String> {
    m.reported_by
        .split(',')
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .collect()
}

fn move_pb(m: &MoveRecord, residency: &ResidencySettings) -> pb::ResidencyMove {
    let scope = if m.scope == "SUPPORT_BUNDLES" {
        pb::ResidencyScope::SupportBundles
    } else {
        pb::ResidencyScope::Data
    };
    let reported = reported_by(m);
    let waiting_for = if m.state == "DONE" {
        Vec::new()
    } else {
        owners(residency, scope)
            .iter()
            .filter(|o| !reported.contains(o))
            .cloned()
            .collect()
    };
    let state = match m.state.as_str() {
        "REQUESTED" => pb::MoveState::Requested,
        "MOVING" => pb::MoveState::Moving,
        _ => pb::MoveState::Done,
    };
    pb::ResidencyMove {
        move_id: m.move_id.clone(),
        scope: scope as i32,
        from_location: domain::location_from_name(&m.from_location) as i32,
        to_location: domain::location_from_name(&m.to_location) as i32,
        state: state as i32,
        requested_at: Some(to_proto(m.requested_at)),
        started_at: to_proto_opt(m.started_at),
        completed_at: to_proto_opt(m.completed_at),
        reported_by: reported,
        waiting_for,
    }
}

/// The services that hold data of a scope and report their part of its moves.
fn owners(residency: &ResidencySettings, scope: pb::ResidencyScope) -> &[String] {
    match scope {
        pb::ResidencyScope::SupportBundles => &residency.support_bundle_owners,
        pb::ResidencyScope::Data | pb::ResidencyScope::Unspecified => &residency.data_owners,
    }
}

fn page_size(size: u32) -> Result<i64, ConsentError> {
    match size {
        0 => Ok(100),
        1..=1_000 => Ok(i64::from(size)),
        _ => Err(ConsentError::InvalidArgument {
            field: "page_size",
            reason: "must be at most 1000".into(),
        }),
    }
}

#[tonic::async_trait]
impl ConsentService for ConsentApi {
    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_consent(
        &self,
        request: Request<pb::GetConsentRequest>,
    ) -> GrpcResult<pb::GetConsentResponse> {
        let (_, org_id) = self.reader(&request, &request.get_ref().org_id).await?;
        let (consent, record) = self.consent(&org_id).await?;
        let version = match record {
            Some(record) => self.version_pb(&record)?,
            None => pb::ConsentVersion {
                org_id,
                version: 0,
                settings: Some(consent.to_pb()),
                actor: String::new(),
                reason: "default: nothing is collected until an admin opts in".to_owned(),
                created_at: None,
                receipt: None,
            },
        };
        Ok(Response::new(pb::GetConsentResponse {
            consent: Some(version),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn update_consent(
        &self,
        request: Request<pb::UpdateConsentRequest>,
    ) -> GrpcResult<pb::UpdateConsentResponse> {
        let deadline = Some(self.deadline(&request));
        let (caller, org_id) = self.admin(&request, &request.get_ref().org_id).await?;
        let r = request.get_ref();
        let consent = Consent::parse(r.settings.as_ref())?;
        let reason = domain::text("reason", &r.reason, 500)?;
        let request_key = sightline_runtime::idempotency::parse(&r.request_id)
            .map_err(|reason| ConsentError::InvalidArgument {
                field: "request_id",
                reason: reason.to_owned(),
            })?
            .map(sightline_runtime::idempotency::request_key);
        // Locking settles the org's earlier changes, so a first attempt still in flight is found.
        let guard = self.lock(&org_id).await?;
        if let Some(key) = &request_key
            && let Some(first) = self
                .store
                .consent_by_request(&org_id, key)
                .await
                .map_err(ConsentError::from)?
        {
            if consent_of(&first)? != consent {
                return Err(ConsentError::InvalidArgument {
                    field: "request_id",
                    reason: "was used for a different change".into(),
                }
                .into());
            }
            return Ok(Response::new(pb::UpdateConsentResponse {
                consent: Some(self.version_pb(&first)?),
            }));
        }
        let (before, latest) = self.consent(&org_id).await?;
        let current = latest.as_ref().map_or(0, |l| l.version);
        if r.expected_version != 0 && i64::try_from(r.expected_version).ok() != Some(current) {
            return Err(ConsentError::Aborted(format!(
                "expected_version {} is not the current version {current}",
                r.expected_version
            ))
            .into());
        }
        let version = current + 1;
        let now = self.clock.now_ms();
        let actor = caller.actor();
        let payload = receipt::payload(&Statement {
            org_id: &org_id,
            version,
            consent,
            actor: &actor,
            reason: &reason,
            created_at_ms: now,
            key_id: self.signer.key_id(),
        });
        let record = ConsentRecord {
            org_id: org_id.clone(),
            version,
            usage_level: consent.usage.name().to_owned(),
            sharing_level: consent.sharing.name().to_owned(),
            contribute_metadata: consent.contribute_metadata,
            contribute_in_app_data: consent.contribute_in_app_data,
            compliance_restricted: consent.compliance_restricted,
            actor,
            reason,
            created_at: now,
            receipt_signature: self.signer.sign(&payload),
            receipt_payload: payload,
            key_id: self.signer.key_id().to_owned(),
            request_key,
        };
        let purge = domain::purge_between(Allowance::of(&before), Allowance::of(&consent))
            .map(|spec| self.purge_record(&org_id, None, spec, version));
        let mut entry = self.entry(&org_id, &caller, "consent.updated", format!("v{version}"));
        entry.attributes.extend([
            ("version".to_owned(), version.to_string()),
            ("usage_level".to_owned(), consent.usage.name().to_owned()),
            (
                "sharing_level".to_owned(),
                consent.sharing.name().to_owned(),
            ),
            (
                "contribute_metadata".to_owned(),
                consent.contributes().0.to_string(),
            ),
            (
                "contribute_in_app_data".to_owned(),
                consent.contributes().1.to_string(),
            ),
            (
                "compliance_restricted".to_owned(),
                consent.compliance_restricted.to_string(),
            ),
        ]);
        if let Some(purge) = &purge {
            note_purge(&mut entry, purge);
        }
        self.commit(
            guard,
            Change::Consent(record.clone()),
            purge,
            entry,
            Vec::new(),
            deadline,
        )
        .await?;
        tracing::info!(%org_id, version, usage = consent.usage.name(), sharing = consent.sharing.name(), "consent updated");

        Ok(Response::new(pb::UpdateConsentResponse {
            consent: Some(self.version_pb(&record)?),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn list_consent_history(
        &self,
        request: Request<pb::ListConsentHistoryRequest>,
    ) -> GrpcResult<pb::ListConsentHistoryResponse> {
        let (_, org_id) = self.reader(&request, &request.get_ref().org_id).await?;
        let r = request.get_ref();
        let size = page_size(r.page_size)?;
        let before = if r.page_token.is_empty() {
            None
        } else {
            Some(r.page_token.parse::<i64>().ok().filter(|v| *v > 0).ok_or(
                ConsentError::InvalidArgument {
                    field: "page_token",
                    reason: "is not a valid page token".into(),
                },
            )?)
        };
        let versions = self
            .store
            .list_consent(&org_id, before, size)
            .await
            .map_err(ConsentError::from)?;
        let next_page_token = match versions.last() {
            Some(last)
                if i64::try_from(versions.len()).unwrap_or(0) == size && last.version > 1 =>
            {
                last.version.to_string()
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListConsentHistoryResponse {
            versions: versions
                .iter()
                .map(|v| self.version_pb(v))
                .collect::<Result<_, _>>()?,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_receipt_key(
        &self,
        request: Request<pb::GetReceiptKeyRequest>,
    ) -> GrpcResult<pb::GetReceiptKeyResponse> {
        self.caller(&request).await?;
        Ok(Response::new(pb::GetReceiptKeyResponse {
            public_key: self.signer.public_key().to_vec(),
            key_id: self.signer.key_id().to_owned(),
            algorithm: "Ed25519".to_owned(),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn verify_receipt(
        &self,
        request: Request<pb::VerifyReceiptRequest>,
    ) -> GrpcResult<pb::VerifyReceiptResponse> {
        let caller = self.caller(&request).await?;
        let receipt = request
            .get_ref()
            .receipt
            .as_ref()
            .ok_or(ConsentError::InvalidArgument {
                field: "receipt",
                reason: "is required".into(),
            })?;
        let invalid = |reason: &str, consent: Option<pb::ConsentVersion>| {
            Ok(Response::new(pb::VerifyReceiptResponse {
                valid: false,
                reason: reason.to_owned(),
                consent,
            }))
        };
        let Some(parsed) = receipt::Parsed::read(&receipt.payload) else {
            return invalid("payload is not a Sightline consent receipt", None);
        };
        if let Some(own) = caller.org_id()
            && own != parsed.org_id
        {
            return Err(
                ConsentError::PermissionDenied("the receipt is another org's".into()).into(),
            );
        }
        let Some(stated) = parsed.consent() else {
            return invalid("payload states unknown levels", None);
        };
        let stated_pb = pb::ConsentVersion {
            org_id: parsed.org_id.clone(),
            version: u64::try_from(parsed.version).unwrap_or(0),
            settings: Some(stated.to_pb()),
            actor: parsed.actor.clone(),
            reason: parsed.reason.clone(),
            created_at: Some(to_proto(parsed.created_at_ms)),
            receipt: Some(receipt.clone()),
        };
        if parsed.key_id != self.signer.key_id() || receipt.key_id != self.signer.key_id() {
            return invalid("signed by an unknown key", Some(stated_pb));
        }
        if !self.signer.verifies(&receipt.payload, &receipt.signature) {
            return invalid("signature does not verify", Some(stated_pb));
        }
        match self
            .store
            .consent_version(&parsed.org_id, parsed.version)
            .await
            .map_err(ConsentError::from)?
        {
            None => invalid("no such consent version is stored", Some(stated_pb)),
            Some(stored) if stored.receipt_payload != receipt.payload => {
                invalid("does not match the stored version", Some(stated_pb))
            }
            Some(_) => Ok(Response::new(pb::VerifyReceiptResponse {
                valid: true,
                reason: String::new(),
                consent: Some(stated_pb),
            })),
        }
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> GrpcResult<pb::GetPolicyResponse> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let (org_id, instance_id) = self
            .policy_scope(&caller, &r.org_id, &r.instance_id)
            .await?;
        let policy = self.policy(&org_id, instance_id.as_deref()).await?;
        Ok(Response::new(pb::GetPolicyResponse {
            policy: Some(policy),
        }))
    }

    type WatchPolicyStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchPolicyResponse, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn watch_policy(
        &self,
        request: Request<pb::WatchPolicyRequest>,
    ) -> GrpcResult<Self::WatchPolicyStream> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let every_org = r.org_id.is_empty()
            && r.instance_id.is_empty()
            && !matches!(caller, Principal::Instance { .. });
        let watched = if every_org {
            caller.require_service()?;
            Watched::AllOrgs
        } else {
            match self
                .policy_scope(&caller, &r.org_id, &r.instance_id)
                .await?
            {
                (org_id, None) => Watched::Org(org_id),
                (org_id, Some(instance_id)) => Watched::Instance {
                    org_id,
                    instance_id,
                },
            }
        };
        // Subscribe before reading the snapshot, so no change falls between the two.
        let changes = self.hub.subscribe();
        // One slot stays free for the ABORTED that ends a watcher who fell behind.
        let (tx, rx) = mpsc::channel(self.options.watch_buffer + 1);
        let api = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = api.shutdown.cancelled() => {}
                () = api.follow(watched, changes, tx) => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn set_instance_override(
        &self,
        request: Request<pb::SetInstanceOverrideRequest>,
    ) -> GrpcResult<pb::SetInstanceOverrideResponse> {
        let deadline = Some(self.deadline(&request));
        let (caller, org_id) = self.admin(&request, &request.get_ref().org_id).await?;
        let r = request.get_ref();
        let instance_id = domain::id("instance_id", &r.instance_id)?;
        let reason = domain::text("reason", &r.reason, 500)?;
        let levels = if r.clear {
            None
        } else {
            Some((
                Usage::parse("usage_level", r.usage_level)?,
                Sharing::parse("sharing_level", r.sharing_level)?,
            ))
        };
        // Only the org's own instances: nothing is stored or audited for another id.
        self.directory
            .require_instance(&org_id, &instance_id)
            .await?;
        let guard = self.lock(&org_id).await?;
        let now = self.clock.now_ms();
        let state = self.state(&org_id).await?;
        let org_allows = Allowance::of(&state.consent);
        let record = if let Some((usage, sharing)) = levels {
            domain::check_override(&state.consent, usage, sharing)?;
            Some(OverrideRecord {
                org_id: org_id.clone(),
                instance_id: instance_id.clone(),
                usage_level: usage.name().to_owned(),
                sharing_level: sharing.name().to_owned(),
                reason,
                updated_at: now,
            })
        } else {
            None
        };
        let mut entry = self.entry(
            &org_id,
            &caller,
            if record.is_some() {
                "consent.override_set"
            } else {
                "consent.override_cleared"
            },
            instance_id.clone(),
        );
        if let Some(o) = &record {
            entry
                .attributes
                .insert("usage_level".into(), o.usage_level.clone());
            entry
                .attributes
                .insert("sharing_level".into(), o.sharing_level.clone());
        }
        let after = match &record {
            Some(o) => override_of(o).map(|o| org_allows.lowered_to(o.usage, o.sharing))?,
            None => org_allows,
        };
        // The consent version does not change: every record of the instance so far is covered.
        let purge = domain::purge_between(state.allowance(Some(&instance_id)), after).map(|spec| {
            let next = i64::try_from(state.consent_version).unwrap_or(i64::MAX - 1) + 1;
            self.purge_record(&org_id, Some(&instance_id), spec, next)
        });
        if let Some(purge) = &purge {
            note_purge(&mut entry, purge);
        }
        self.commit(
            guard,
            Change::Override {
                org_id: org_id.clone(),
                instance_id: instance_id.clone(),
                record: record.clone(),
            },
            purge,
            entry,
            vec![instance_id.clone()],
            deadline,
        )
        .await?;
        tracing::info!(%org_id, %instance_id, cleared = record.is_none(), "instance override changed");

        let policy = self.policy(&org_id, Some(&instance_id)).await?;
        Ok(Response::new(pb::SetInstanceOverrideResponse {
            r#override: record.map(|o| pb::InstanceOverride {
                org_id: o.org_id,
                instance_id: o.instance_id,
                usage_level: Usage::from_name(&o.usage_level).map_or(0, |u| u.to_pb() as i32),
                sharing_level: Sharing::from_name(&o.sharing_level).map_or(0, |s| s.to_pb() as i32),
                reason: o.reason,
                updated_at: Some(to_proto(o.updated_at)),
            }),
            policy: Some(policy),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_tracking_settings(
        &self,
        request: Request<pb::GetTrackingSettingsRequest>,
    ) -> GrpcResult<pb::GetTrackingSettingsResponse> {
        let (_, org_id) = self.reader(&request, &request.get_ref().org_id).await?;
        Ok(Response::new(pb::GetTrackingSettingsResponse {
            settings: Some(self.tracking(&org_id).await?.to_pb()),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn update_tracking_settings(
        &self,
        request: Request<pb::UpdateTrackingSettingsRequest>,
    ) -> GrpcResult<pb::UpdateTrackingSettingsResponse> {
        let deadline = Some(self.deadline(&request));
        let (caller, org_id) = self.admin(&request, &request.get_ref().org_id).await?;
        let tracking = Tracking::parse(request.get_ref().settings.as_ref())?;
        let guard = self.lock(&org_id).await?;
        let record = TrackingRecord {
            org_id: org_id.clone(),
            enabled_channels: tracking
                .channels
                .iter()
                .map(|c| (*c as i32).to_string())
                .collect::<Vec<_>>()
                .join(","),
            exclude_anonymous: tracking.exclude_anonymous,
            excluded_groups: serde_json::to_string(&tracking.excluded_groups)
                .unwrap_or_else(|_| "[]".into()),
            blocking_time_ms: i64::try_from(tracking.blocking_time_ms).unwrap_or(0),
            view_counter_enabled: tracking.view_counter_enabled,
            global_report_group: tracking.global_report_group.clone(),
            updated_at: self.clock.now_ms(),
        };
        let mut entry = self.entry(&org_id, &caller, "tracking.updated", org_id.clone());
        entry
            .attributes
            .insert("channels".into(), record.enabled_channels.clone());
        entry.attributes.insert(
            "blocking_time_ms".into(),
            tracking.blocking_time_ms.to_string(),
        );
        self.commit(
            guard,
            Change::Tracking(record),
            None,
            entry,
            Vec::new(),
            deadline,
        )
        .await?;
        tracing::info!(%org_id, "tracking settings updated");

        Ok(Response::new(pb::UpdateTrackingSettingsResponse {
            settings: Some(tracking.to_pb()),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_residency(
        &self,
        request: Request<pb::GetResidencyRequest>,
    ) -> GrpcResult<pb::GetResidencyResponse> {
        let (_, org_id) = self.reader(&request, &request.get_ref().org_id).await?;
        Ok(Response::new(pb::GetResidencyResponse {
            residency: Some(self.residency(&org_id).await?.0),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn request_residency_move(
        &self,
        request: Request<pb::RequestResidencyMoveRequest>,
    ) -> GrpcResult<pb::RequestResidencyMoveResponse> {
        let deadline = Some(self.deadline(&request));
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let org_id = domain::id("org_id", &r.org_id)?;
        let transition = domain::transition(r.transition)?;
        let scope = domain::scope(r.scope)?;
        match transition {
            pb::MoveTransition::Request => caller.require_admin_of(&org_id)?,
            pb::MoveTransition::Start => caller.require_operator()?,
            pb::MoveTransition::Complete | pb::MoveTransition::Unspecified => {
                if !matches!(caller, Principal::Operator | Principal::Service { .. }) {
                    return Err(Status::permission_denied(
                        "only the operator or a service may complete a move",
                    ));
                }
            }
        }
        let guard = self.lock(&org_id).await?;
        let (residency, moves) = self.residency(&org_id).await?;
        let current_location = match scope {
            pb::ResidencyScope::SupportBundles => residency.support_bundle_location(),
            _ => residency.location(),
        };
        let open = moves.iter().find(|m| {
            m.scope == scope_name(scope) && (m.state == "REQUESTED" || m.state == "MOVING")
        });
        let now = self.clock.now_ms();
        let (record, expected, new_residency, action) = match transition {
            pb::MoveTransition::Request => {
                let to = domain::location("to_location", r.to_location)?;
                if to == current_location {
                    return Err(ConsentError::InvalidArgument {
                        field: "to_location",
                        reason: format!("the data is already in {}", domain::location_name(to)),
                    }
                    .into());
                }
                if open.is_some() {
                    return Err(ConsentError::FailedPrecondition(
                        "a move of this scope is already under way".into(),
                    )
                    .into());
                }
                let record = MoveRecord {
                    move_id: uuid::Uuid::now_v7().to_string(),
                    org_id: org_id.clone(),
                    scope: scope_name(scope).to_owned(),
                    from_location: domain::location_name(current_location).to_owned(),
                    to_location: domain::location_name(to).to_owned(),
                    state: "REQUESTED".to_owned(),
                    requested_at: now,
                    started_at: None,
                    completed_at: None,
                    reported_by: String::new(),
                };
                (record, None, None, "residency.move_requested")
            }
            pb::MoveTransition::Start => {
                let Some(m) = open.filter(|m| m.state == "REQUESTED") else {
                    return Err(ConsentError::FailedPrecondition(
                        "no requested move of this scope to start".into(),
                    )
                    .into());
                };
                let record = MoveRecord {
                    state: "MOVING".to_owned(),
                    started_at: Some(now),
                    ..m.clone()
                };
                let from = MoveFrom {
                    state: m.state.clone(),
                    reported_by: m.reported_by.clone(),
                };
                (record, Some(from), None, "residency.move_started")
            }
            pb::MoveTransition::Complete | pb::MoveTransition::Unspecified => {
                let Some(m) = open.filter(|m| m.state == "MOVING") else {
                    return Err(ConsentError::FailedPrecondition(
                        "no move of this scope is under way".into(),
                    )
                    .into());
                };
                let from = MoveFrom {
                    state: m.state.clone(),
                    reported_by: m.reported_by.clone(),
                };
                // A service reports its part as a data owner; the operator finishes the move.
                let mut reported = reported_by(m);
                let waiting = if let Principal::Service { .. } = caller {
                    let owner = r.owner.trim();
                    let expected = owners(&self.options.residency, scope);
                    if owner.is_empty() {
                        return Err(ConsentError::InvalidArgument {
                            field: "owner",
                            reason: "a service names the data owner it reports for".into(),
                        }
                        .into());
                    }
                    if !expected.iter().any(|o| o == owner) {
                        return Err(ConsentError::InvalidArgument {
                            field: "owner",
                            reason: format!(
                                "{owner} owns no data of this scope (owners: {})",
                                expected.join(", ")
                            ),
                        }
                        .into());
                    }
                    if !reported.iter().any(|o| o == owner) {
                        reported.push(owner.to_owned());
                        reported.sort();
                    }
                    expected.iter().any(|o| !reported.contains(o))
                } else {
                    false
                };
                if waiting {
                    let record = MoveRecord {
                        reported_by: reported.join(","),
                        ..m.clone()
                    };
                    if record.reported_by == m.reported_by {
                        // Reported before: nothing changes.
                        drop(guard);
                        return Ok(Response::new(pb::RequestResidencyMoveResponse {
                            residency: Some(residency),
                            r#move: Some(move_pb(&record, &self.options.residency)),
                        }));
                    }
                    (record, Some(from), None, "residency.move_part_done")
                } else {
                    let record = MoveRecord {
                        state: "DONE".to_owned(),
                        completed_at: Some(now),
                        reported_by: reported.join(","),
                        ..m.clone()
                    };
                    let mut location = domain::location_name(residency.location()).to_owned();
                    let mut support =
                        domain::location_name(residency.support_bundle_location()).to_owned();
                    match scope {
                        pb::ResidencyScope::SupportBundles => support.clone_from(&m.to_location),
                        _ => location.clone_from(&m.to_location),
                    }
                    let new_residency = ResidencyRecord {
                        org_id: org_id.clone(),
                        location,
                        support_bundle_location: support,
                        updated_at: now,
                    };
                    (
                        record,
                        Some(from),
                        Some(new_residency),
                        "residency.move_completed",
                    )
                }
            }
        };
        let mut entry = self.entry(&org_id, &caller, action, record.move_id.clone());
        entry
            .attributes
            .insert("scope".into(), record.scope.clone());
        entry
            .attributes
            .insert("from".into(), record.from_location.clone());
        entry
            .attributes
            .insert("to".into(), record.to_location.clone());
        if !record.reported_by.is_empty() {
            entry
                .attributes
                .insert("reported_by".into(), record.reported_by.clone());
        }
        self.commit(
            guard,
            Change::Move {
                record: record.clone(),
                expected,
                residency: new_residency,
            },
            None,
            entry,
            Vec::new(),
            deadline,
        )
        .await?;
        tracing::info!(%org_id, move_id = %record.move_id, state = %record.state, "residency move changed");

        Ok(Response::new(pb::RequestResidencyMoveResponse {
            residency: Some(self.residency(&org_id).await?.0),
            r#move: Some(move_pb(&record, &self.options.residency)),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_retention(
        &self,
        request: Request<pb::GetRetentionRequest>,
    ) -> GrpcResult<pb::GetRetentionResponse> {
        let (_, org_id) = self.reader(&request, &request.get_ref().org_id).await?;
        Ok(Response::new(pb::GetRetentionResponse {
            retention: Some(self.retention(&org_id).await?.to_pb()),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn update_retention(
        &self,
        request: Request<pb::UpdateRetentionRequest>,
    ) -> GrpcResult<pb::UpdateRetentionResponse> {
        let deadline = Some(self.deadline(&request));
        let (caller, org_id) = self.admin(&request, &request.get_ref().org_id).await?;
        let retention = Retention::parse(request.get_ref().retention.as_ref())?;
        let guard = self.lock(&org_id).await?;
        let mut entry = self.entry(&org_id, &caller, "retention.updated", org_id.clone());
        entry
            .attributes
            .insert("raw_days".into(), retention.raw_days.to_string());
        entry.attributes.insert(
            "assessment_days".into(),
            retention.assessment_days.to_string(),
        );
        entry.attributes.insert(
            "aggregate_days".into(),
            retention.aggregate_days.to_string(),
        );
        self.commit(
            guard,
            Change::Retention(RetentionRecord {
                org_id: org_id.clone(),
                raw_days: i64::from(retention.raw_days),
                assessment_days: i64::from(retention.assessment_days),
                aggregate_days: i64::from(retention.aggregate_days),
                updated_at: self.clock.now_ms(),
                score_history_days: i64::from(retention.score_history_days),
                support_bundle_days: i64::from(retention.support_bundle_days),
                event_id_days: i64::from(retention.event_id_days),
            }),
            None,
            entry,
            Vec::new(),
            deadline,
        )
        .await?;
        tracing::info!(%org_id, "retention updated");

        Ok(Response::new(pb::UpdateRetentionResponse {
            retention: Some(retention.to_pb()),
        }))
    }
}
