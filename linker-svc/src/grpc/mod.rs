//! The gRPC face of linker-svc: converts proto to domain and back, checks who is calling, and maps
//! errors. The rules live in `domain`, `audit` and the store.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use rand::Rng;
use rand::distr::Alphanumeric;
use sightline_proto::audit::v1 as audit_pb;
use sightline_proto::audit::v1::audit_service_server::AuditService;
use sightline_proto::common::v1 as common_pb;
use sightline_proto::linker::v1 as pb;
use sightline_proto::linker::v1::linker_service_server::LinkerService;
use sightline_runtime::SharedClock;
use sightline_runtime::auth::{self, Principal};
use sightline_runtime::idempotency;
use sightline_runtime::ratelimit::{FailureLimiter, PeerKey, RateLimiter};
use sightline_runtime::settings::Limits;
use sightline_runtime::time::{to_proto, to_proto_opt};
use sightline_runtime::token::{self, TokenKind};
use tonic::{Request, Response, Status};

use crate::audit::{ChainCheck, ChainVerifier, GENESIS};
use crate::dns_claims::{self, TxtResolver};
use crate::domain::{self, LINK_KEY_VALIDITY_MS};
use crate::error::LinkerError;
use crate::residency::Residency;
use crate::store::{
    AdminTokenRecord, AppLinkRecord, AuditDraft, AuditRecord, CredentialRecord, DomainRecord,
    IdempotentReply, InstanceFacts, InstanceRecord, KeyedAppend, LinkKeyRecord, LinkerStore,
    NewLink, NewSecret, OrgRecord,
};

mod audit_log;
mod callers;
mod claims;
mod instances;
mod orgs;
mod replay;

pub use callers::Authority;
use callers::VALIDATION_CACHE_TTL_MS;

type GrpcResult<T> = Result<Response<T>, Status>;

/// Both services linker-svc serves share this state.
#[derive(Debug, Clone)]
pub struct LinkerApi {
    store: Arc<dyn LinkerStore>,
    residency: Arc<Residency>,
    clock: SharedClock,
    authority: Arc<Authority>,
    txt: Arc<dyn TxtResolver>,
}

impl LinkerApi {
    pub fn new(
        store: Arc<dyn LinkerStore>,
        residency: Arc<Residency>,
        clock: SharedClock,
        authority: Arc<Authority>,
        txt: Arc<dyn TxtResolver>,
    ) -> Self {
        Self {
            store,
            residency,
            clock,
            authority,
            txt,
        }
    }

    /// Fills the instances' metadata from the store of the org's location and returns their app
    /// links, sorted by instance.
    async fn with_facts(
        &self,
        org_id: &str,
        instances: &mut [InstanceRecord],
    ) -> Result<Vec<AppLinkRecord>, Status> {
        let read = self.residency.for_read(org_id).await?;
        let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
        let facts: std::collections::HashMap<String, InstanceFacts> = read
            .facts_of(&ids)
            .await?
            .into_iter()
            .map(|f| (f.instance_id.clone(), f))
            .collect();
        for instance in instances.iter_mut() {
            if let Some(found) = facts.get(&instance.id) {
                found.fill(instance);
            }
        }
        Ok(read.app_links_of(&ids).await?)
    }

    /// The caller, who must administer `org_id`; and the org must exist.
    async fn admin_of(&self, caller: &Principal, org_id: &str) -> Result<String, Status> {
        let org_id = domain::id("org_id", org_id)?;
        caller.require_admin_of(&org_id)?;
        if self
            .store
            .get_org(&org_id)
            .await
            .map_err(LinkerError::from)?
            .is_none()
        {
            return Err(LinkerError::NotFound("org").into());
        }
        sightline_runtime::telemetry::note_ids(&org_id, None);
        Ok(org_id)
    }

    /// When a call must be done by: the client's deadline or the server's limit, the earlier. A
    /// change whose audit entry would be written with less than a margin left is refused instead.
    fn deadline<T>(&self, request: &Request<T>) -> std::time::Instant {
        sightline_runtime::deadline::call_deadline(request.metadata(), self.authority.call_limit)
    }

    fn issue<R>(&self, kind: TokenKind, make: impl FnOnce(String) -> R) -> (String, NewSecret<R>) {
        let secret = token::generate(kind);
        let record = make(token::display_prefix(&secret));
        let digest = token::digest(&secret);
        (secret, NewSecret { record, digest })
    }
}

fn request_id(value: &str) -> Result<Option<&str>, LinkerError> {
    idempotency::parse(value).map_err(|reason| LinkerError::InvalidArgument {
        field: "request_id",
        reason: reason.to_owned(),
    })
}

fn reply_context(method: &str, org_id: &str) -> Vec<u8> {
    format!("{method}/{org_id}").into_bytes()
}

/// Seals `answer` into `audit` for retries, when the request has an id.
fn keep_reply<M: sightline_proto::prost::Message>(
    mut audit: AuditDraft,
    method: &'static str,
    org_id: &str,
    request_id: Option<&str>,
    answer: &M,
) -> AuditDraft {
    audit.reply = request_id.and_then(|id| {
        let sealed =
            idempotency::seal(id, &reply_context(method, org_id), &answer.encode_to_vec())?;
        Some(IdempotentReply {
            method,
            request_key: idempotency::request_key(id),
            sealed,
        })
    });
    audit
}

fn append_response(org_id: &str, outcome: KeyedAppend) -> audit_pb::AppendEventResponse {
    let (event, outcome) = match outcome {
        KeyedAppend::Appended(record) => {
            tracing::info!(%org_id, seq = record.seq, action = %record.action, "audit event appended");
            (Some(audit_pb(&record)), audit_pb::AppendOutcome::Appended)
        }
        KeyedAppend::AlreadyAppended(record) => (
            Some(audit_pb(&record)),
            audit_pb::AppendOutcome::AlreadyAppended,
        ),
        KeyedAppend::Fenced => {
            tracing::info!(%org_id, "audit key fenced");
            (None, audit_pb::AppendOutcome::Fenced)
        }
    };
    audit_pb::AppendEventResponse {
        event,
        outcome: outcome as i32,
    }
}

fn secret_state(revoked_at: Option<i64>, expires_at: Option<i64>, now: i64) -> i32 {
    let state = if revoked_at.is_some() {
        pb::SecretState::Revoked
    } else if expires_at.is_some_and(|e| now >= e) {
        pb::SecretState::Expired
    } else {
        pb::SecretState::Active
    };
    state as i32
}

fn org_pb(org: &OrgRecord) -> pb::Org {
    pb::Org {
        org_id: org.id.clone(),
        name: org.name.clone(),
        created_at: Some(to_proto(org.created_at)),
    }
}

fn admin_token_pb(t: &AdminTokenRecord, now: i64) -> pb::AdminTokenInfo {
    pb::AdminTokenInfo {
        token_id: t.id.clone(),
        org_id: t.org_id.clone(),
        label: t.label.clone(),
        prefix: t.prefix.clone(),
        created_at: Some(to_proto(t.created_at)),
        last_used_at: to_proto_opt(t.last_used_at),
        revoked_at: to_proto_opt(t.revoked_at),
        state: secret_state(t.revoked_at, None, now),
    }
}

fn link_key_pb(k: &LinkKeyRecord, now: i64) -> pb::LinkKeyInfo {
    pb::LinkKeyInfo {
        key_id: k.id.clone(),
        org_id: k.org_id.clone(),
        label: k.label.clone(),
        prefix: k.prefix.clone(),
        created_at: Some(to_proto(k.created_at)),
        expires_at: Some(to_proto(k.expires_at)),
        last_used_at: to_proto_opt(k.last_used_at),
        revoked_at: to_proto_opt(k.revoked_at),
        state: secret_state(k.revoked_at, Some(k.expires_at), now),
        replaces_key_id: k.replaces_key_id.clone().unwrap_or_default(),
    }
}

fn credential_pb(c: &CredentialRecord, now: i64) -> pb::CredentialInfo {
    pb::CredentialInfo {
        credential_id: c.id.clone(),
        org_id: c.org_id.clone(),
        instance_id: c.instance_id.clone(),
        prefix: c.prefix.clone(),
        created_at: Some(to_proto(c.created_at)),
        last_used_at: to_proto_opt(c.last_used_at),
        revoked_at: to_proto_opt(c.revoked_at),
        state: secret_state(c.revoked_at, None, now),
    }
}

fn app_link_pb(a: &AppLinkRecord) -> common_pb::AppLink {
    common_pb::AppLink {
        url: a.url.clone(),
        product_family: a.product_family.clone(),
        server_id: a.server_id.clone(),
        version: a.version.clone(),
    }
}

/// The run of `sorted` (grouped by instance) that `order` says is the instance's.
fn of_instance<T>(sorted: &[T], order: impl Fn(&T) -> std::cmp::Ordering) -> &[T] {
    let start = sorted.partition_point(|r| order(r) == std::cmp::Ordering::Less);
    let end = sorted.partition_point(|r| order(r) != std::cmp::Ordering::Greater);
    &sorted[start..end]
}

fn instance_pb(
    i: &InstanceRecord,
    credentials: &[CredentialRecord],
    app_links: &[AppLinkRecord],
    now: i64,
) -> pb::Instance {
    pb::Instance {
        instance_id: i.id.clone(),
        org_id: i.org_id.clone(),
        metadata: Some(common_pb::InstanceMetadata {
            server_id: i.server_id.clone(),
            base_url: i.base_url.clone(),
            product: i.product.clone(),
            version: i.version.clone(),
            license_sen: i.license_sen.clone(),
            node_count: u32::try_from(i.node_count).unwrap_or(0),
            // Linker keeps what linking needs; nodes and flags travel as collector events.
            ..Default::default()
        }),
        state: if i.unlinked_at.is_some() {
            pb::InstanceState::Unlinked
        } else {
            pb::InstanceState::Linked
        } as i32,
        linked_at: Some(to_proto(i.linked_at)),
        unlinked_at: to_proto_opt(i.unlinked_at),
        link_key_id: i.link_key_id.clone(),
        credentials: credentials
            .iter()
            .filter(|c| c.instance_id == i.id)
            .map(|c| credential_pb(c, now))
            .collect(),
        app_links: app_links
            .iter()
            .filter(|a| a.instance_id == i.id)
            .map(app_link_pb)
            .collect(),
    }
}

fn domain_pb(d: &DomainRecord) -> pb::DomainClaim {
    pb::DomainClaim {
        org_id: d.org_id.clone(),
        domain: d.domain.clone(),
        state: if d.verified_at.is_some() {
            pb::DomainState::Verified
        } else {
            pb::DomainState::Pending
        } as i32,
        txt_record_name: dns_claims::record_name(&d.domain),
        txt_record_value: dns_claims::record_value(&d.token),
        claimed_at: Some(to_proto(d.claimed_at)),
        verified_at: to_proto_opt(d.verified_at),
    }
}

pub(crate) fn audit_pb(a: &AuditRecord) -> audit_pb::AuditEvent {
    let attributes: BTreeMap<String, String> =
        serde_json::from_str(&a.attributes).unwrap_or_default();
    audit_pb::AuditEvent {
        org_id: a.org_id.clone(),
        seq: u64::try_from(a.seq).unwrap_or(0),
        occurred_at: Some(to_proto(a.occurred_at)),
        actor: a.actor.clone(),
        service: a.service.clone(),
        action: a.action.clone(),
        target: a.target.clone(),
        attributes: attributes.into_iter().collect(),
        prev_hash: a.prev_hash.clone(),
        hash: a.hash.clone(),
    }
}

fn next_token<T>(items: &[T], page_size: i64, key: impl Fn(&T) -> String) -> String {
    if i64::try_from(items.len()).unwrap_or(i64::MAX) < page_size {
        String::new()
    } else {
        items.last().map(key).unwrap_or_default()
    }
}

#[tonic::async_trait]
impl LinkerService for LinkerApi {
    async fn create_org(
        &self,
        request: Request<pb::CreateOrgRequest>,
    ) -> GrpcResult<pb::CreateOrgResponse> {
        orgs::create_org(self, request).await
    }

    async fn create_admin_token(
        &self,
        request: Request<pb::CreateAdminTokenRequest>,
    ) -> GrpcResult<pb::CreateAdminTokenResponse> {
        orgs::create_admin_token(self, request).await
    }

    async fn revoke_admin_token(
        &self,
        request: Request<pb::RevokeAdminTokenRequest>,
    ) -> GrpcResult<pb::RevokeAdminTokenResponse> {
        orgs::revoke_admin_token(self, request).await
    }

    async fn create_link_key(
        &self,
        request: Request<pb::CreateLinkKeyRequest>,
    ) -> GrpcResult<pb::CreateLinkKeyResponse> {
        orgs::create_link_key(self, request).await
    }

    async fn regenerate_link_key(
        &self,
        request: Request<pb::RegenerateLinkKeyRequest>,
    ) -> GrpcResult<pb::RegenerateLinkKeyResponse> {
        orgs::regenerate_link_key(self, request).await
    }

    async fn list_orgs(
        &self,
        request: Request<pb::ListOrgsRequest>,
    ) -> GrpcResult<pb::ListOrgsResponse> {
        orgs::list_orgs(self, request).await
    }

    async fn list_admin_tokens(
        &self,
        request: Request<pb::ListAdminTokensRequest>,
    ) -> GrpcResult<pb::ListAdminTokensResponse> {
        orgs::list_admin_tokens(self, request).await
    }

    async fn list_link_keys(
        &self,
        request: Request<pb::ListLinkKeysRequest>,
    ) -> GrpcResult<pb::ListLinkKeysResponse> {
        orgs::list_link_keys(self, request).await
    }

    async fn link_instance(
        &self,
        request: Request<pb::LinkInstanceRequest>,
    ) -> GrpcResult<pb::LinkInstanceResponse> {
        instances::link_instance(self, request).await
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> GrpcResult<pb::ListInstancesResponse> {
        instances::list_instances(self, request).await
    }

    async fn unlink_instance(
        &self,
        request: Request<pb::UnlinkInstanceRequest>,
    ) -> GrpcResult<pb::UnlinkInstanceResponse> {
        instances::unlink_instance(self, request).await
    }

    async fn validate_credential(
        &self,
        request: Request<pb::ValidateCredentialRequest>,
    ) -> GrpcResult<pb::ValidateCredentialResponse> {
        instances::validate_credential(self, request).await
    }

    async fn revoke_credential(
        &self,
        request: Request<pb::RevokeCredentialRequest>,
    ) -> GrpcResult<pb::RevokeCredentialResponse> {
        instances::revoke_credential(self, request).await
    }

    async fn claim_domain(
        &self,
        request: Request<pb::ClaimDomainRequest>,
    ) -> GrpcResult<pb::ClaimDomainResponse> {
        claims::claim_domain(self, request).await
    }

    async fn verify_domain(
        &self,
        request: Request<pb::VerifyDomainRequest>,
    ) -> GrpcResult<pb::VerifyDomainResponse> {
        claims::verify_domain(self, request).await
    }

    async fn import_licenses(
        &self,
        request: Request<pb::ImportLicensesRequest>,
    ) -> GrpcResult<pb::ImportLicensesResponse> {
        claims::import_licenses(self, request).await
    }

    async fn detect_instances(
        &self,
        request: Request<pb::DetectInstancesRequest>,
    ) -> GrpcResult<pb::DetectInstancesResponse> {
        instances::detect_instances(self, request).await
    }
}
