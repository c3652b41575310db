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

mod consent;
mod policies;
mod residency;
mod retention;
mod tracking;

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

/// One change's turn at an org: this process's lock of the org, and the org's policy revision
/// the change is computed from.
#[derive(Debug)]
pub(crate) struct Turn {
    _guard: OwnedMutexGuard<()>,
    revision: i64,
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

    /// The caller, allowed to change `org_id`.
    async fn admin<T>(
        &self,
        request: &Request<T>,
        org_id: &str,
    ) -> Result<(Principal, String), Status> {
        self.caller_of(request, org_id, Principal::require_admin_of)
            .await
    }

    /// The caller, allowed to read `org_id` (its admins, the operator, enforcement points).
    async fn reader<T>(
        &self,
        request: &Request<T>,
        org_id: &str,
    ) -> Result<(Principal, String), Status> {
        self.caller_of(request, org_id, Principal::require_reader_of)
            .await
    }

    /// The caller, once `allowed` lets it at `org_id` and the org exists.
    async fn caller_of<T>(
        &self,
        request: &Request<T>,
        org_id: &str,
        allowed: fn(&Principal, &str) -> Result<(), Status>,
    ) -> Result<(Principal, String), Status> {
        let caller = self.credentials.caller(request, &self.limiter).await?;
        let org_id = domain::id("org_id", org_id)?;
        allowed(&caller, &org_id)?;
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
    /// change is computed from the state every earlier one left. The turn carries the org's policy
    /// revision as read then: staging refuses the change if another replica changed the org since.
    async fn lock(&self, org_id: &str) -> Result<Turn, ConsentError> {
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
        let revision = self
            .store
            .policy_state(org_id)
            .await?
            .map_or(0, |state| state.revision);
        Ok(Turn {
            _guard: guard,
            revision,
        })
    }

    /// When a call must be done by: the client's deadline or the server's limit, the earlier.
    fn deadline<T>(&self, request: &Request<T>) -> std::time::Instant {
        sightline_runtime::deadline::call_deadline(request.metadata(), self.options.call_limit)
    }

    /// Settles what a crash or a lost answer left staged, and publishes the orgs that changed.
    pub async fn recover(&self) {
        match self
            .auditor
            .recover(self.store.as_ref(), self.clock.now_ms())
            .await
        {
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
        turn: Turn,
        change: Change,
        purge: Option<PurgeRecord>,
        entry: AuditEntry,
        instance_ids: Vec<String>,
        deadline: Option<std::time::Instant>,
    ) -> Result<(), ConsentError> {
        let org_id = entry.org_id.clone();
        let staged = StagedChange::new(
            entry,
            StagedPayload {
                change,
                purge,
                base_revision: Some(turn.revision),
            }
            .encode(),
            self.clock.now_ms(),
        );
        let api = self.clone();
        tokio::spawn(async move {
            let _turn = turn;
            api.auditor
                .commit(api.store.as_ref(), staged, deadline)
                .await?;
            api.publish(&org_id, instance_ids).await;
            Ok(())
        })
        .await
        .map_err(|e| ConsentError::Internal(format!("commit task: {e}")))?
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

fn page_size(size: u32) -> i64 {
    sightline_runtime::paging::page_size(size, 100, 1_000)
}

#[tonic::async_trait]
impl ConsentService for ConsentApi {
    async fn get_consent(
        &self,
        request: Request<pb::GetConsentRequest>,
    ) -> GrpcResult<pb::GetConsentResponse> {
        consent::get_consent(self, request).await
    }

    async fn update_consent(
        &self,
        request: Request<pb::UpdateConsentRequest>,
    ) -> GrpcResult<pb::UpdateConsentResponse> {
        consent::update_consent(self, request).await
    }

    async fn list_consent_history(
        &self,
        request: Request<pb::ListConsentHistoryRequest>,
    ) -> GrpcResult<pb::ListConsentHistoryResponse> {
        consent::list_consent_history(self, request).await
    }

    async fn get_receipt_key(
        &self,
        request: Request<pb::GetReceiptKeyRequest>,
    ) -> GrpcResult<pb::GetReceiptKeyResponse> {
        consent::get_receipt_key(self, request).await
    }

    async fn verify_receipt(
        &self,
        request: Request<pb::VerifyReceiptRequest>,
    ) -> GrpcResult<pb::VerifyReceiptResponse> {
        consent::verify_receipt(self, request).await
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> GrpcResult<pb::GetPolicyResponse> {
        policies::get_policy(self, request).await
    }

    type WatchPolicyStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchPolicyResponse, Status>> + Send>>;

    async fn watch_policy(
        &self,
        request: Request<pb::WatchPolicyRequest>,
    ) -> GrpcResult<Self::WatchPolicyStream> {
        policies::watch_policy(self, request).await
    }

    async fn set_instance_override(
        &self,
        request: Request<pb::SetInstanceOverrideRequest>,
    ) -> GrpcResult<pb::SetInstanceOverrideResponse> {
        policies::set_instance_override(self, request).await
    }

    async fn get_tracking_settings(
        &self,
        request: Request<pb::GetTrackingSettingsRequest>,
    ) -> GrpcResult<pb::GetTrackingSettingsResponse> {
        tracking::get_tracking_settings(self, request).await
    }

    async fn update_tracking_settings(
        &self,
        request: Request<pb::UpdateTrackingSettingsRequest>,
    ) -> GrpcResult<pb::UpdateTrackingSettingsResponse> {
        tracking::update_tracking_settings(self, request).await
    }

    async fn get_residency(
        &self,
        request: Request<pb::GetResidencyRequest>,
    ) -> GrpcResult<pb::GetResidencyResponse> {
        residency::get_residency(self, request).await
    }

    async fn request_residency_move(
        &self,
        request: Request<pb::RequestResidencyMoveRequest>,
    ) -> GrpcResult<pb::RequestResidencyMoveResponse> {
        residency::request_residency_move(self, request).await
    }

    async fn get_retention(
        &self,
        request: Request<pb::GetRetentionRequest>,
    ) -> GrpcResult<pb::GetRetentionResponse> {
        retention::get_retention(self, request).await
    }

    async fn update_retention(
        &self,
        request: Request<pb::UpdateRetentionRequest>,
    ) -> GrpcResult<pb::UpdateRetentionResponse> {
        retention::update_retention(self, request).await
    }
}
