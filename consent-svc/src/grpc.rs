//! The gRPC face of consent-svc: authentication, proto ↔ domain conversion, and the flow of every
//! change (serialise per org, decide, store with its audit entry, publish the new policy).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use dashmap::DashMap;
use futures::Stream;
use sightline_proto::common::v1 as common_pb;
use sightline_proto::consent::v1 as pb;
use sightline_proto::consent::v1::consent_service_server::ConsentService;
use sightline_runtime::SharedClock;
use sightline_runtime::auth::{CredentialClient, Principal};
use sightline_runtime::ratelimit::RateLimiter;
use sightline_runtime::time::{to_proto, to_proto_opt};
use tokio::sync::{Mutex, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::domain::{self, Consent, Retention, Sharing, Tracking, Usage};
use crate::error::ConsentError;
use crate::receipt::{self, ReceiptSigner, Statement};
use crate::store::{
    AuditEntry, AuditSink, Change, ConsentRecord, ConsentStore, MoveRecord, OverrideRecord, Purge,
    ResidencyRecord, RetentionRecord, TrackingRecord,
};

type GrpcResult<T> = Result<Response<T>, Status>;

/// While an org's data moves, enforcement points tell clients to retry after this long.
const MOVING_RETRY_AFTER_MS: u32 = 60_000;
const HUB_CAPACITY: usize = 4_096;

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct ConsentApi {
    store: Arc<dyn ConsentStore>,
    clock: SharedClock,
    credentials: CredentialClient,
    limiter: Arc<RateLimiter>,
    audit: Arc<dyn AuditSink>,
    signer: Arc<ReceiptSigner>,
    hub: broadcast::Sender<Arc<pb::WatchPolicyResponse>>,
    locks: Arc<DashMap<String, Arc<Mutex<()>>>>,
    shutdown: CancellationToken,
}

impl ConsentApi {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn ConsentStore>,
        clock: SharedClock,
        credentials: CredentialClient,
        limiter: RateLimiter,
        audit: Arc<dyn AuditSink>,
        signer: Arc<ReceiptSigner>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            clock,
            credentials,
            limiter: Arc::new(limiter),
            audit,
            signer,
            hub: broadcast::channel(HUB_CAPACITY).0,
            locks: Arc::new(DashMap::new()),
            shutdown,
        }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let principal = self.credentials.authenticate(request.metadata()).await?;
        self.limiter.check(&principal.tenant())?;
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
        Ok((caller, org_id))
    }

    fn lock(&self, org_id: &str) -> Arc<Mutex<()>> {
        self.locks
            .entry(org_id.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(())))
            .clone()
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
            Some(r) => Retention {
                raw_days: u32::try_from(r.raw_days).unwrap_or(domain::TWO_YEARS_DAYS),
                assessment_days: u32::try_from(r.assessment_days).unwrap_or(domain::TWO_YEARS_DAYS),
                aggregate_days: u32::try_from(r.aggregate_days).unwrap_or(domain::TWO_YEARS_DAYS),
            },
            None => Retention::default(),
        })
    }

    async fn residency(
        &self,
        org_id: &str,
    ) -> Result<(pb::Residency, Vec<MoveRecord>), ConsentError> {
        let record = self.store.residency(org_id).await?;
        let moves = self.store.moves(org_id).await?;
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
            let m = move_pb(m);
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

    /// The effective policy of an org, or of one of its instances.
    pub async fn policy(
        &self,
        org_id: &str,
        instance_id: Option<&str>,
    ) -> Result<pb::Policy, ConsentError> {
        let (consent, record) = self.consent(org_id).await?;
        let tracking = self.tracking(org_id).await?;
        let (residency, moves) = self.residency(org_id).await?;
        let retention = self.retention(org_id).await?;
        let state = self.store.policy_state(org_id).await?;
        let (mut usage, mut sharing) = (consent.usage, consent.sharing);
        if let Some(instance_id) = instance_id
            && let Some(o) = self.store.override_of(org_id, instance_id).await?
        {
            usage = usage.min(Usage::from_name(&o.usage_level).unwrap_or(Usage::Disabled));
            sharing = sharing.min(Sharing::from_name(&o.sharing_level).unwrap_or(Sharing::Basic));
        }
        let (contribute_metadata, contribute_in_app_data) = consent.contributes();
        let moving = moves
            .iter()
            .any(|m| m.scope == scope_name(pb::ResidencyScope::Data) && m.state == "MOVING");
        let purge = state.as_ref().and_then(|s| {
            Some(pb::PurgeInstruction {
                max_usage_level: Usage::from_name(s.purge_usage.as_deref()?)?.to_pb() as i32,
                max_sharing_level: Sharing::from_name(s.purge_sharing.as_deref()?)?.to_pb() as i32,
                from_consent_version: u64::try_from(s.purge_from_version?).ok()?,
                issued_at: Some(to_proto(s.purge_issued_at?)),
            })
        });
        Ok(pb::Policy {
            org_id: org_id.to_owned(),
            instance_id: instance_id.unwrap_or_default().to_owned(),
            consent_version: record.map_or(0, |r| u64::try_from(r.version).unwrap_or(0)),
            revision: state.map_or(0, |s| u64::try_from(s.revision).unwrap_or(0)),
            usage_level: usage.to_pb() as i32,
            sharing_level: sharing.to_pb() as i32,
            allowed_kinds: domain::allowed_kinds(usage, !tracking.channels.is_empty())
                .into_iter()
                .map(|k| k as i32)
                .collect(),
            field_treatment: domain::treatment(sharing) as i32,
            contribute_metadata,
            contribute_in_app_data,
            tracking: Some(tracking.to_pb()),
            location: residency.location,
            support_bundle_location: residency.support_bundle_location,
            moving,
            retry_after_ms: if moving { MOVING_RETRY_AFTER_MS } else { 0 },
            retention: Some(retention.to_pb()),
            purge,
        })
    }

    /// Sends the org's new policy to every watcher.
    async fn publish(&self, org_id: &str, instance_ids: Vec<String>) {
        match self.policy(org_id, None).await {
            Ok(policy) => {
                // No receiver is fine: nobody is watching.
                let _ = self.hub.send(Arc::new(pb::WatchPolicyResponse {
                    policy: Some(policy),
                    instance_ids,
                }));
            }
            Err(error) => tracing::error!(%org_id, %error, "cannot publish policy"),
        }
    }

    /// Stores a change with its audit entry, then publishes the org's new policy: every change goes
    /// through here, so none is made without its audit entry or hidden from watchers.
    async fn commit(
        &self,
        change: Change,
        purge: Option<Purge>,
        entry: &AuditEntry,
        instance_ids: Vec<String>,
    ) -> Result<(), ConsentError> {
        self.store
            .apply(change, purge, self.audit.as_ref(), entry)
            .await?;
        self.publish(&entry.org_id, instance_ids).await;
        Ok(())
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
            action,
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

fn scope_name(scope: pb::ResidencyScope) -> &'static str {
    match scope {
        pb::ResidencyScope::SupportBundles => "SUPPORT_BUNDLES",
        pb::ResidencyScope::Data | pb::ResidencyScope::Unspecified => "DATA",
    }
}

fn move_pb(m: &MoveRecord) -> pb::ResidencyMove {
    let scope = if m.scope == "SUPPORT_BUNDLES" {
        pb::ResidencyScope::SupportBundles
    } else {
        pb::ResidencyScope::Data
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
    #[tracing::instrument(skip_all)]
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

    #[tracing::instrument(skip_all)]
    async fn update_consent(
        &self,
        request: Request<pb::UpdateConsentRequest>,
    ) -> GrpcResult<pb::UpdateConsentResponse> {
        let (caller, org_id) = self.admin(&request, &request.get_ref().org_id).await?;
        let r = request.get_ref();
        let consent = Consent::parse(r.settings.as_ref())?;
        let reason = domain::text("reason", &r.reason, 500)?;
        let lock = self.lock(&org_id);
        let _guard = lock.lock().await;
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
        };
        let purge = domain::purge_needed(&before, &consent).then(|| Purge {
            usage: consent.usage.name().to_owned(),
            sharing: consent.sharing.name().to_owned(),
            from_version: version,
            issued_at: now,
        });
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
        if purge.is_some() {
            entry
                .attributes
                .insert("purge".to_owned(), "true".to_owned());
        }
        self.commit(Change::Consent(record.clone()), purge, &entry, Vec::new())
            .await?;
        tracing::info!(%org_id, version, usage = consent.usage.name(), sharing = consent.sharing.name(), "consent updated");

        Ok(Response::new(pb::UpdateConsentResponse {
            consent: Some(self.version_pb(&record)?),
        }))
    }

    #[tracing::instrument(skip_all)]
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

    #[tracing::instrument(skip_all)]
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

    #[tracing::instrument(skip_all)]
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

    #[tracing::instrument(skip_all)]
    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> GrpcResult<pb::GetPolicyResponse> {
        let (_, org_id) = self.reader(&request, &request.get_ref().org_id).await?;
        let instance_id = match request.get_ref().instance_id.as_str() {
            "" => None,
            id => Some(domain::id("instance_id", id)?),
        };
        let policy = self.policy(&org_id, instance_id.as_deref()).await?;
        Ok(Response::new(pb::GetPolicyResponse {
            policy: Some(policy),
        }))
    }

    type WatchPolicyStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchPolicyResponse, Status>> + Send>>;

    #[tracing::instrument(skip_all)]
    async fn watch_policy(
        &self,
        request: Request<pb::WatchPolicyRequest>,
    ) -> GrpcResult<Self::WatchPolicyStream> {
        let caller = self.caller(&request).await?;
        let org = match request.get_ref().org_id.as_str() {
            "" => {
                caller.require_service()?;
                None
            }
            id => {
                let id = domain::id("org_id", id)?;
                caller.require_reader_of(&id)?;
                Some(id)
            }
        };
        // Subscribe before reading the current policy, so no change falls between the two.
        let mut changes = self.hub.subscribe();
        let (tx, rx) = mpsc::channel(64);
        if let Some(org) = &org {
            let current = self.policy(org, None).await?;
            let _ = tx
                .send(Ok(pb::WatchPolicyResponse {
                    policy: Some(current),
                    instance_ids: Vec::new(),
                }))
                .await;
        }
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    () = api.shutdown.cancelled() => break,
                    () = tx.closed() => break,
                    change = changes.recv() => change,
                };
                let update = match change {
                    Ok(update) => update,
                    Err(broadcast::error::RecvError::Lagged(missed)) => match &org {
                        // One org: catch up by sending its current policy.
                        Some(org) => match api.policy(org, None).await {
                            Ok(policy) => Arc::new(pb::WatchPolicyResponse {
                                policy: Some(policy),
                                instance_ids: Vec::new(),
                            }),
                            Err(error) => {
                                let _ = tx.send(Err(error.into())).await;
                                break;
                            }
                        },
                        None => {
                            let _ = tx
                                .send(Err(Status::aborted(format!(
                                    "watcher fell {missed} changes behind; resubscribe"
                                ))))
                                .await;
                            break;
                        }
                    },
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                let for_us = match (&org, &update.policy) {
                    (Some(org), Some(policy)) => &policy.org_id == org,
                    (None, _) => true,
                    (Some(_), None) => false,
                };
                if for_us && tx.send(Ok(update.as_ref().clone())).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all)]
    async fn set_instance_override(
        &self,
        request: Request<pb::SetInstanceOverrideRequest>,
    ) -> GrpcResult<pb::SetInstanceOverrideResponse> {
        let (caller, org_id) = self.admin(&request, &request.get_ref().org_id).await?;
        let r = request.get_ref();
        let instance_id = domain::id("instance_id", &r.instance_id)?;
        let reason = domain::text("reason", &r.reason, 500)?;
        let lock = self.lock(&org_id);
        let _guard = lock.lock().await;
        let now = self.clock.now_ms();
        let record = if r.clear {
            None
        } else {
            let usage = Usage::parse("usage_level", r.usage_level)?;
            let sharing = Sharing::parse("sharing_level", r.sharing_level)?;
            let (org_consent, _) = self.consent(&org_id).await?;
            domain::check_override(&org_consent, usage, sharing)?;
            Some(OverrideRecord {
                org_id: org_id.clone(),
                instance_id: instance_id.clone(),
                usage_level: usage.name().to_owned(),
                sharing_level: sharing.name().to_owned(),
                reason,
                updated_at: now,
            })
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
        self.commit(
            Change::Override {
                org_id: org_id.clone(),
                instance_id: instance_id.clone(),
                record: record.clone(),
            },
            None,
            &entry,
            vec![instance_id.clone()],
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

    #[tracing::instrument(skip_all)]
    async fn get_tracking_settings(
        &self,
        request: Request<pb::GetTrackingSettingsRequest>,
    ) -> GrpcResult<pb::GetTrackingSettingsResponse> {
        let (_, org_id) = self.reader(&request, &request.get_ref().org_id).await?;
        Ok(Response::new(pb::GetTrackingSettingsResponse {
            settings: Some(self.tracking(&org_id).await?.to_pb()),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_tracking_settings(
        &self,
        request: Request<pb::UpdateTrackingSettingsRequest>,
    ) -> GrpcResult<pb::UpdateTrackingSettingsResponse> {
        let (caller, org_id) = self.admin(&request, &request.get_ref().org_id).await?;
        let tracking = Tracking::parse(request.get_ref().settings.as_ref())?;
        let lock = self.lock(&org_id);
        let _guard = lock.lock().await;
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
        self.commit(Change::Tracking(record), None, &entry, Vec::new())
            .await?;
        tracing::info!(%org_id, "tracking settings updated");

        Ok(Response::new(pb::UpdateTrackingSettingsResponse {
            settings: Some(tracking.to_pb()),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_residency(
        &self,
        request: Request<pb::GetResidencyRequest>,
    ) -> GrpcResult<pb::GetResidencyResponse> {
        let (_, org_id) = self.reader(&request, &request.get_ref().org_id).await?;
        Ok(Response::new(pb::GetResidencyResponse {
            residency: Some(self.residency(&org_id).await?.0),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn request_residency_move(
        &self,
        request: Request<pb::RequestResidencyMoveRequest>,
    ) -> GrpcResult<pb::RequestResidencyMoveResponse> {
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
        let lock = self.lock(&org_id);
        let _guard = lock.lock().await;
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
                (
                    record,
                    Some("REQUESTED".to_owned()),
                    None,
                    "residency.move_started",
                )
            }
            pb::MoveTransition::Complete | pb::MoveTransition::Unspecified => {
                let Some(m) = open.filter(|m| m.state == "MOVING") else {
                    return Err(ConsentError::FailedPrecondition(
                        "no move of this scope is under way".into(),
                    )
                    .into());
                };
                let record = MoveRecord {
                    state: "DONE".to_owned(),
                    completed_at: Some(now),
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
                    Some("MOVING".to_owned()),
                    Some(new_residency),
                    "residency.move_completed",
                )
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
        self.commit(
            Change::Move {
                record: record.clone(),
                expected_state: expected,
                residency: new_residency,
            },
            None,
            &entry,
            Vec::new(),
        )
        .await?;
        tracing::info!(%org_id, move_id = %record.move_id, state = %record.state, "residency move changed");

        Ok(Response::new(pb::RequestResidencyMoveResponse {
            residency: Some(self.residency(&org_id).await?.0),
            r#move: Some(move_pb(&record)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_retention(
        &self,
        request: Request<pb::GetRetentionRequest>,
    ) -> GrpcResult<pb::GetRetentionResponse> {
        let (_, org_id) = self.reader(&request, &request.get_ref().org_id).await?;
        Ok(Response::new(pb::GetRetentionResponse {
            retention: Some(self.retention(&org_id).await?.to_pb()),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_retention(
        &self,
        request: Request<pb::UpdateRetentionRequest>,
    ) -> GrpcResult<pb::UpdateRetentionResponse> {
        let (caller, org_id) = self.admin(&request, &request.get_ref().org_id).await?;
        let retention = Retention::parse(request.get_ref().retention.as_ref())?;
        let lock = self.lock(&org_id);
        let _guard = lock.lock().await;
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
            Change::Retention(RetentionRecord {
                org_id: org_id.clone(),
                raw_days: i64::from(retention.raw_days),
                assessment_days: i64::from(retention.assessment_days),
                aggregate_days: i64::from(retention.aggregate_days),
                updated_at: self.clock.now_ms(),
            }),
            None,
            &entry,
            Vec::new(),
        )
        .await?;
        tracing::info!(%org_id, "retention updated");

        Ok(Response::new(pb::UpdateRetentionResponse {
            retention: Some(retention.to_pb()),
        }))
    }
}
