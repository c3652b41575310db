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
use crate::domain::{self, LINK_KEY_VALIDITY_MS};
use crate::domains::{self, TxtResolver};
use crate::error::LinkerError;
use crate::residency::Residency;
use crate::store::{
    AdminTokenRecord, AppLinkRecord, AuditDraft, AuditRecord, CredentialRecord, DomainRecord,
    IdempotentReply, InstanceFacts, InstanceRecord, KeyedAppend, LinkKeyRecord, LinkerStore,
    NewLink, NewSecret, OrgRecord,
};

/// How long other services may cache a ValidateCredential answer.
const VALIDATION_CACHE_TTL_MS: u32 = 2_000;
/// last_used_at is written at most this often per secret, so validation stays a read.
const TOUCH_INTERVAL_MS: i64 = 60_000;

type GrpcResult<T> = Result<Response<T>, Status>;

/// Resolves tokens to principals against the store and the configured secrets.
#[derive(Debug)]
pub struct Authority {
    store: Arc<dyn LinkerStore>,
    clock: SharedClock,
    operator_digest: [u8; 32],
    service_digests: Vec<[u8; 32]>,
    limiter: RateLimiter,
    failures: FailureLimiter,
    /// The server's longest call (`limits.request_timeout_ms`).
    call_limit: std::time::Duration,
}

impl Authority {
    pub fn new(
        store: Arc<dyn LinkerStore>,
        clock: SharedClock,
        operator_token: &str,
        service_tokens: &[&str],
        limits: &Limits,
    ) -> Self {
        Self {
            store,
            clock,
            operator_digest: token::digest(operator_token),
            service_digests: service_tokens.iter().map(|t| token::digest(t)).collect(),
            limiter: RateLimiter::new("linker", limits),
            failures: FailureLimiter::new("linker", limits),
            call_limit: std::time::Duration::from_millis(limits.request_timeout_ms),
        }
    }

    /// The caller of a request, rate-limited per tenant (services are not:
    /// [`RateLimiter::check_caller`]). A peer that keeps presenting bad
    /// tokens is refused before its next one costs a store lookup; configured tokens (operator,
    /// services) cost none and are never refused for their address's failures, so a flood from
    /// the host a service runs on cannot cut that service off, and a token found valid lately is
    /// looked up whatever its address did (see [`FailureLimiter`]).
    async fn caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let peer = PeerKey::of_request(request);
        let presented =
            auth::bearer(request.metadata()).inspect_err(|_| self.failures.charge(peer))?;
        let parsed = match token::parse(presented) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.failures.check(peer)?;
                self.failures.charge(peer);
                return Err(malformed(error).into());
            }
        };
        let digest = parsed.digest();
        let configured = matches!(parsed.kind, TokenKind::Operator | TokenKind::Service);
        if !configured {
            self.failures.check_token(peer, &digest)?;
        }
        let principal = match self.resolve_parsed(parsed.kind, &digest).await {
            Ok(principal) => principal,
            Err(error) => {
                if matches!(error, LinkerError::Unauthenticated(_)) {
                    self.failures.charge(peer);
                    self.failures.vouch(digest, false);
                }
                return Err(error.into());
            }
        };
        if !configured {
            self.failures.vouch(digest, true);
        }
        self.limiter.check_caller(&principal)?;
        Ok(principal)
    }

    /// Whose `presented` is. Link keys are not bearer tokens outside LinkInstance.
    pub async fn resolve(&self, presented: &str) -> Result<Principal, LinkerError> {
        let parsed = token::parse(presented).map_err(malformed)?;
        self.resolve_parsed(parsed.kind, &parsed.digest()).await
    }

    /// Whose the token of `kind` with `digest` is (the token parsed and digested once per call).
    async fn resolve_parsed(
        &self,
        kind: TokenKind,
        digest: &[u8; 32],
    ) -> Result<Principal, LinkerError> {
        let digest = *digest;
        let now = self.clock.now_ms();
        match kind {
            TokenKind::Operator if token::digests_equal(&digest, &self.operator_digest) => {
                Ok(Principal::Operator)
            }
            TokenKind::Service
                if self
                    .service_digests
                    .iter()
                    .any(|d| token::digests_equal(&digest, d)) =>
            {
                Ok(Principal::Service {
                    name: "sightline".to_owned(),
                })
            }
            TokenKind::Admin => {
                let found = self.store.find_admin_token(&digest).await?;
                let found = found
                    .filter(|f| token::digests_equal(&f.digest, &digest))
                    .ok_or_else(|| LinkerError::Unauthenticated("unknown admin token".into()))?;
                if found.record.revoked_at.is_some() {
                    return Err(LinkerError::Unauthenticated(
                        "admin token has been revoked".into(),
                    ));
                }
                if stale(found.record.last_used_at, now) {
                    self.store.touch_admin_token(&found.record.id, now).await?;
                }
                Ok(Principal::Admin {
                    org_id: found.record.org_id,
                    token_id: found.record.id,
                })
            }
            TokenKind::Instance => {
                let found = self.store.find_credential(&digest).await?;
                let found = found
                    .filter(|f| token::digests_equal(&f.digest, &digest))
                    .ok_or_else(|| {
                        LinkerError::Unauthenticated("unknown instance credential".into())
                    })?;
                if found.record.revoked_at.is_some() || found.instance_unlinked {
                    return Err(LinkerError::Unauthenticated(
                        "instance credential has been revoked".into(),
                    ));
                }
                if stale(found.record.last_used_at, now) {
                    self.store.touch_credential(&found.record.id, now).await?;
                }
                Ok(Principal::Instance {
                    org_id: found.record.org_id,
                    instance_id: found.record.instance_id,
                    credential_id: found.record.id,
                })
            }
            TokenKind::LinkKey => Err(LinkerError::Unauthenticated(
                "a link key only authorises LinkInstance".into(),
            )),
            TokenKind::Operator | TokenKind::Service => Err(LinkerError::Unauthenticated(format!(
                "unknown {}",
                kind.noun()
            ))),
        }
    }
}

fn malformed(error: token::TokenError) -> LinkerError {
    LinkerError::Unauthenticated(format!("malformed token: {error}"))
}

fn stale(last_used_at: Option<i64>, now: i64) -> bool {
    last_used_at.is_none_or(|at| now - at >= TOUCH_INTERVAL_MS)
}

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

    /// The first answer to an earlier request with this id, when there was one (within 24 hours).
    async fn replay<M: sightline_proto::prost::Message + Default>(
        &self,
        method: &'static str,
        org_id: &str,
        request_id: Option<&str>,
    ) -> Result<Option<M>, Status> {
        let Some(id) = request_id else {
            return Ok(None);
        };
        let since = self.clock.now_ms() - idempotency::WINDOW_MS;
        let Some(sealed) = self
            .store
            .replay(org_id, method, &idempotency::request_key(id), since)
            .await
            .map_err(LinkerError::from)?
        else {
            return Ok(None);
        };
        let answer = idempotency::open(id, &reply_context(method, org_id), &sealed)
            .and_then(|plain| M::decode(plain.as_slice()).ok())
            .ok_or(LinkerError::Internal("a kept answer does not open".into()))?;
        Ok(Some(answer))
    }

    /// After storing a change that keeps its answer: when a concurrent request with the same id won
    /// (the kept answer already exists), its answer; otherwise the store's outcome.
    async fn after_race<M: sightline_proto::prost::Message + Default>(
        &self,
        method: &'static str,
        org_id: &str,
        request_id: Option<&str>,
        stored: Result<(), crate::store::StoreError>,
    ) -> Result<Option<M>, Status> {
        match stored {
            Ok(()) => Ok(None),
            Err(crate::store::StoreError::AlreadyExists(_)) if request_id.is_some() => {
                match self.replay(method, org_id, request_id).await? {
                    Some(first) => Ok(Some(first)),
                    None => Err(LinkerError::AlreadyExists("record").into()),
                }
            }
            Err(error) => Err(LinkerError::from(error).into()),
        }
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
        txt_record_name: domains::record_name(&d.domain),
        txt_record_value: domains::record_value(&d.token),
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
    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn create_org(
        &self,
        request: Request<pb::CreateOrgRequest>,
    ) -> GrpcResult<pb::CreateOrgResponse> {
        let caller = self.authority.caller(&request).await?;
        caller.require_operator()?;
        let name = domain::org_name(&request.get_ref().name)?;
        let now = self.clock.now_ms();
        let org = OrgRecord {
            id: domain::new_id(),
            name,
            created_at: now,
        };
        let audit = AuditDraft::new(now, caller.actor(), "org.created", org.id.clone())
            .until(self.deadline(&request));
        self.store
            .create_org(&org, audit, GENESIS)
            .await
            .map_err(LinkerError::from)?;
        tracing::info!(org_id = %org.id, "org created");
        Ok(Response::new(pb::CreateOrgResponse {
            org: Some(org_pb(&org)),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn create_admin_token(
        &self,
        request: Request<pb::CreateAdminTokenRequest>,
    ) -> GrpcResult<pb::CreateAdminTokenResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let label = domain::label(&request.get_ref().label)?;
        let request_id = request_id(&request.get_ref().request_id)?;
        if let Some(first) = self.replay("CreateAdminToken", &org_id, request_id).await? {
            return Ok(Response::new(first));
        }
        let now = self.clock.now_ms();
        let (secret, token) = self.issue(TokenKind::Admin, |prefix| AdminTokenRecord {
            id: domain::new_id(),
            org_id: org_id.clone(),
            label,
            prefix,
            created_at: now,
            last_used_at: None,
            revoked_at: None,
        });
        let audit = AuditDraft::new(
            now,
            caller.actor(),
            "admin_token.created",
            token.record.id.clone(),
        )
        .until(self.deadline(&request));
        let answer = pb::CreateAdminTokenResponse {
            token: Some(admin_token_pb(&token.record, now)),
            secret,
        };
        let audit = keep_reply(audit, "CreateAdminToken", &org_id, request_id, &answer);
        let stored = self.store.insert_admin_token(&token, audit).await;
        if let Some(first) = self
            .after_race("CreateAdminToken", &org_id, request_id, stored)
            .await?
        {
            return Ok(Response::new(first));
        }
        tracing::info!(%org_id, token_id = %token.record.id, "admin token created");
        Ok(Response::new(answer))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn revoke_admin_token(
        &self,
        request: Request<pb::RevokeAdminTokenRequest>,
    ) -> GrpcResult<pb::RevokeAdminTokenResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let token_id = domain::id("token_id", &request.get_ref().token_id)?;
        let now = self.clock.now_ms();
        let audit = AuditDraft::new(now, caller.actor(), "admin_token.revoked", token_id.clone())
            .until(self.deadline(&request));
        let revoked = self
            .store
            .revoke_admin_token(&org_id, &token_id, audit)
            .await
            .map_err(LinkerError::from)?;
        tracing::info!(%org_id, %token_id, "admin token revoked");
        Ok(Response::new(pb::RevokeAdminTokenResponse {
            token: Some(admin_token_pb(&revoked, now)),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn create_link_key(
        &self,
        request: Request<pb::CreateLinkKeyRequest>,
    ) -> GrpcResult<pb::CreateLinkKeyResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let label = domain::label(&request.get_ref().label)?;
        let request_id = request_id(&request.get_ref().request_id)?;
        if let Some(first) = self.replay("CreateLinkKey", &org_id, request_id).await? {
            return Ok(Response::new(first));
        }
        let now = self.clock.now_ms();
        let (secret, key) = self.issue(TokenKind::LinkKey, |prefix| LinkKeyRecord {
            id: domain::new_id(),
            org_id: org_id.clone(),
            label,
            prefix,
            created_at: now,
            expires_at: now + LINK_KEY_VALIDITY_MS,
            last_used_at: None,
            revoked_at: None,
            replaces_key_id: None,
        });
        let audit = AuditDraft::new(
            now,
            caller.actor(),
            "link_key.created",
            key.record.id.clone(),
        )
        .until(self.deadline(&request))
        .with("expires_at_ms", key.record.expires_at.to_string());
        let answer = pb::CreateLinkKeyResponse {
            key: Some(link_key_pb(&key.record, now)),
            secret,
        };
        let audit = keep_reply(audit, "CreateLinkKey", &org_id, request_id, &answer);
        let stored = self.store.insert_link_key(&key, audit).await;
        if let Some(first) = self
            .after_race("CreateLinkKey", &org_id, request_id, stored)
            .await?
        {
            return Ok(Response::new(first));
        }
        tracing::info!(%org_id, key_id = %key.record.id, "link key created");
        Ok(Response::new(answer))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn regenerate_link_key(
        &self,
        request: Request<pb::RegenerateLinkKeyRequest>,
    ) -> GrpcResult<pb::RegenerateLinkKeyResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let old_id = domain::id("key_id", &request.get_ref().key_id)?;
        let now = self.clock.now_ms();
        let (secret, key) = self.issue(TokenKind::LinkKey, |prefix| LinkKeyRecord {
            id: domain::new_id(),
            org_id: org_id.clone(),
            label: String::new(),
            prefix,
            created_at: now,
            expires_at: now + LINK_KEY_VALIDITY_MS,
            last_used_at: None,
            revoked_at: None,
            replaces_key_id: Some(old_id.clone()),
        });
        let audit = AuditDraft::new(
            now,
            caller.actor(),
            "link_key.regenerated",
            key.record.id.clone(),
        )
        .until(self.deadline(&request))
        .with("revoked_key_id", old_id.clone());
        let revoked = self
            .store
            .regenerate_link_key(&org_id, &old_id, &key, audit)
            .await
            .map_err(LinkerError::from)?;
        tracing::info!(%org_id, old_key_id = %old_id, key_id = %key.record.id, "link key regenerated");
        Ok(Response::new(pb::RegenerateLinkKeyResponse {
            key: Some(link_key_pb(&key.record, now)),
            secret,
            revoked_key: Some(link_key_pb(&revoked, now)),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn list_link_keys(
        &self,
        request: Request<pb::ListLinkKeysRequest>,
    ) -> GrpcResult<pb::ListLinkKeysResponse> {
        let caller = self.authority.caller(&request).await?;
        let r = request.get_ref();
        let org_id = self.admin_of(&caller, &r.org_id).await?;
        let page = domain::page(r.page_size, &r.page_token)?;
        let keys = self
            .store
            .list_link_keys(&org_id, page.after.as_deref(), page.size)
            .await
            .map_err(LinkerError::from)?;
        let now = self.clock.now_ms();
        Ok(Response::new(pb::ListLinkKeysResponse {
            next_page_token: next_token(&keys, page.size, |k| k.id.clone()),
            keys: keys.iter().map(|k| link_key_pb(k, now)).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn link_instance(
        &self,
        request: Request<pb::LinkInstanceRequest>,
    ) -> GrpcResult<pb::LinkInstanceResponse> {
        let presented = auth::bearer(request.metadata())?;
        let parsed = token::parse(presented)
            .map_err(|e| LinkerError::Unauthenticated(format!("malformed link key: {e}")))?;
        if parsed.kind != TokenKind::LinkKey {
            return Err(LinkerError::Unauthenticated(
                "LinkInstance takes a link key as its bearer token".into(),
            )
            .into());
        }
        let key_digest = parsed.digest();
        let peer = PeerKey::of_request(&request);
        self.authority.failures.check(peer)?;
        self.authority
            .limiter
            .check(&format!("link:{}", hex::encode(&key_digest[..8])))?;
        let r = request.get_ref();
        let metadata = domain::metadata(r.metadata.as_ref())?;
        let links = domain::app_links(&r.app_links)?;
        self.residency.check_writable()?;
        let now = self.clock.now_ms();
        let instance_id = domain::new_id();
        let (credential, new_credential) =
            self.issue(TokenKind::Instance, |prefix| CredentialRecord {
                id: domain::new_id(),
                org_id: String::new(),
                instance_id: instance_id.clone(),
                prefix,
                created_at: now,
                last_used_at: None,
                revoked_at: None,
            });
        let link = NewLink {
            instance: InstanceRecord {
                id: instance_id.clone(),
                org_id: String::new(),
                server_id: metadata.server_id,
                base_url: metadata.base_url,
                product: metadata.product,
                version: metadata.version,
                license_sen: metadata.license_sen,
                node_count: i64::from(metadata.node_count),
                link_key_id: String::new(),
                linked_at: now,
                unlinked_at: None,
            },
            credential: new_credential,
        };
        let outcome = self
            .store
            .link_instance(&key_digest, link)
            .await
            .map_err(|e| {
                let error = LinkerError::from(e);
                if matches!(error, LinkerError::Unauthenticated(_)) {
                    self.authority.failures.charge(peer);
                }
                error
            })?;
        tracing::info!(
            org_id = %outcome.instance.org_id,
            instance_id = %outcome.instance.id,
            relinked = outcome.relinked,
            "instance linked"
        );
        let credentials = vec![outcome.credential.clone()];
        let app_links: Vec<AppLinkRecord> = links
            .into_iter()
            .map(|l| AppLinkRecord {
                instance_id: outcome.instance.id.clone(),
                url: l.url,
                product_family: l.product_family,
                server_id: l.server_id,
                version: l.version,
            })
            .collect();
        // The metadata goes to the store of the org's location, under the policy fence.
        let (located, _held) = self.residency.for_write(&outcome.instance.org_id).await?;
        located
            .put_instance_facts(&InstanceFacts::of(&outcome.instance), &app_links)
            .await
            .map_err(LinkerError::from)?;
        Ok(Response::new(pb::LinkInstanceResponse {
            instance: Some(instance_pb(
                &outcome.instance,
                &credentials,
                &app_links,
                now,
            )),
            credential_info: Some(credential_pb(&outcome.credential, now)),
            credential,
            link_key_expires_at: Some(sightline_runtime::time::to_proto(
                outcome.link_key_expires_at,
            )),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> GrpcResult<pb::ListInstancesResponse> {
        let caller = self.authority.caller(&request).await?;
        let r = request.get_ref();
        // Services (enforcement points) check that an instance is an org's.
        let org_id = match caller {
            Principal::Service { .. } => self.admin_of(&Principal::Operator, &r.org_id).await?,
            _ => self.admin_of(&caller, &r.org_id).await?,
        };
        let page = domain::page(r.page_size, &r.page_token)?;
        let mut instances = if r.instance_id.is_empty() {
            self.store
                .list_instances(&org_id, page.after.as_deref(), page.size)
                .await
                .map_err(LinkerError::from)?
        } else {
            let instance_id = domain::id("instance_id", &r.instance_id)?;
            let found = self
                .store
                .get_instance(&org_id, &instance_id)
                .await
                .map_err(LinkerError::from)?
                .ok_or(LinkerError::NotFound("instance"))?;
            vec![found]
        };
        let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
        let mut credentials = self
            .store
            .credentials_of(&ids)
            .await
            .map_err(LinkerError::from)?;
        let app_links = self.with_facts(&org_id, &mut instances).await?;
        // Grouped by instance (stable: each instance's own order stays), so a page of n instances
        // is built in n log n, not n².
        credentials.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        let now = self.clock.now_ms();
        Ok(Response::new(pb::ListInstancesResponse {
            next_page_token: next_token(&instances, page.size, |i| i.id.clone()),
            instances: instances
                .iter()
                .map(|i| {
                    let own = |id: &str| id.cmp(i.id.as_str());
                    instance_pb(
                        i,
                        of_instance(&credentials, |c| own(&c.instance_id)),
                        of_instance(&app_links, |a| own(&a.instance_id)),
                        now,
                    )
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn unlink_instance(
        &self,
        request: Request<pb::UnlinkInstanceRequest>,
    ) -> GrpcResult<pb::UnlinkInstanceResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let instance_id = domain::id("instance_id", &request.get_ref().instance_id)?;
        let now = self.clock.now_ms();
        let audit = AuditDraft::new(
            now,
            caller.actor(),
            "instance.unlinked",
            instance_id.clone(),
        )
        .until(self.deadline(&request));
        let mut instance = self
            .store
            .unlink_instance(&org_id, &instance_id, audit)
            .await
            .map_err(LinkerError::from)?;
        let ids = vec![instance.id.clone()];
        let credentials = self
            .store
            .credentials_of(&ids)
            .await
            .map_err(LinkerError::from)?;
        let app_links = self
            .with_facts(&org_id, std::slice::from_mut(&mut instance))
            .await?;
        tracing::info!(%org_id, %instance_id, "instance unlinked");
        Ok(Response::new(pb::UnlinkInstanceResponse {
            instance: Some(instance_pb(&instance, &credentials, &app_links, now)),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn validate_credential(
        &self,
        request: Request<pb::ValidateCredentialRequest>,
    ) -> GrpcResult<pb::ValidateCredentialResponse> {
        let caller = self.authority.caller(&request).await?;
        caller.require_service()?;
        let presented = request.get_ref().credential.trim();
        if presented.is_empty() {
            return Err(LinkerError::InvalidArgument {
                field: "credential",
                reason: "is required".into(),
            }
            .into());
        }
        let principal = self.authority.resolve(presented).await?;
        let (kind, org_id, instance_id, credential_id, scopes) = match principal {
            Principal::Operator => (
                pb::CredentialKind::Operator,
                String::new(),
                String::new(),
                "operator".to_owned(),
                vec!["operator"],
            ),
            Principal::Admin { org_id, token_id } => (
                pb::CredentialKind::Admin,
                org_id,
                String::new(),
                token_id,
                vec!["org:admin"],
            ),
            Principal::Instance {
                org_id,
                instance_id,
                credential_id,
            } => (
                pb::CredentialKind::Instance,
                org_id,
                instance_id,
                credential_id,
                vec!["ingest", "upload"],
            ),
            Principal::Service { name } => (
                pb::CredentialKind::Service,
                String::new(),
                String::new(),
                name,
                vec!["service"],
            ),
        };
        Ok(Response::new(pb::ValidateCredentialResponse {
            kind: kind as i32,
            org_id,
            instance_id,
            credential_id,
            scopes: scopes.into_iter().map(str::to_owned).collect(),
            cache_ttl_ms: VALIDATION_CACHE_TTL_MS,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn revoke_credential(
        &self,
        request: Request<pb::RevokeCredentialRequest>,
    ) -> GrpcResult<pb::RevokeCredentialResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let credential_id = domain::id("credential_id", &request.get_ref().credential_id)?;
        let now = self.clock.now_ms();
        let audit = AuditDraft::new(
            now,
            caller.actor(),
            "credential.revoked",
            credential_id.clone(),
        )
        .until(self.deadline(&request));
        let revoked = self
            .store
            .revoke_credential(&org_id, &credential_id, audit)
            .await
            .map_err(LinkerError::from)?;
        tracing::info!(%org_id, %credential_id, "credential revoked");
        Ok(Response::new(pb::RevokeCredentialResponse {
            credential: Some(credential_pb(&revoked, now)),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn claim_domain(
        &self,
        request: Request<pb::ClaimDomainRequest>,
    ) -> GrpcResult<pb::ClaimDomainResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let domain_name = domain::domain(&request.get_ref().domain)?;
        let now = self.clock.now_ms();
        let token: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        let claim = DomainRecord {
            org_id: org_id.clone(),
            domain: domain_name.clone(),
            token,
            claimed_at: now,
            verified_at: None,
        };
        let audit = AuditDraft::new(now, caller.actor(), "domain.claimed", domain_name.clone())
            .until(self.deadline(&request));
        let claim = self
            .store
            .claim_domain(&claim, audit)
            .await
            .map_err(LinkerError::from)?;
        tracing::info!(%org_id, domain = %domain_name, "domain claimed");
        Ok(Response::new(pb::ClaimDomainResponse {
            claim: Some(domain_pb(&claim)),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn verify_domain(
        &self,
        request: Request<pb::VerifyDomainRequest>,
    ) -> GrpcResult<pb::VerifyDomainResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let domain_name = domain::domain(&request.get_ref().domain)?;
        let claim = self
            .store
            .get_domain(&org_id, &domain_name)
            .await
            .map_err(LinkerError::from)?
            .ok_or(LinkerError::NotFound("domain claim"))?;
        if claim.verified_at.is_some() {
            return Ok(Response::new(pb::VerifyDomainResponse {
                claim: Some(domain_pb(&claim)),
            }));
        }
        let expected = domains::record_value(&claim.token);
        let records = self
            .txt
            .txt(&domains::record_name(&domain_name))
            .await
            .map_err(|e| LinkerError::FailedPrecondition(format!("TXT lookup failed: {e}")))?;
        if !records.iter().any(|r| r.trim() == expected) {
            return Err(LinkerError::FailedPrecondition(format!(
                "TXT record {} does not hold the claim's value yet",
                domains::record_name(&domain_name)
            ))
            .into());
        }
        let now = self.clock.now_ms();
        let audit = AuditDraft::new(now, caller.actor(), "domain.verified", domain_name.clone())
            .until(self.deadline(&request));
        let verified = self
            .store
            .mark_domain_verified(&org_id, &domain_name, audit)
            .await
            .map_err(LinkerError::from)?;
        tracing::info!(%org_id, domain = %domain_name, "domain verified");
        Ok(Response::new(pb::VerifyDomainResponse {
            claim: Some(domain_pb(&verified)),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn import_licenses(
        &self,
        request: Request<pb::ImportLicensesRequest>,
    ) -> GrpcResult<pb::ImportLicensesResponse> {
        let caller = self.authority.caller(&request).await?;
        caller.require_operator()?;
        let r = request.get_ref();
        if r.licenses.len() > domain::MAX_LICENSES_PER_IMPORT {
            return Err(LinkerError::InvalidArgument {
                field: "licenses",
                reason: format!("has more than {} records", domain::MAX_LICENSES_PER_IMPORT),
            }
            .into());
        }
        let licenses = r
            .licenses
            .iter()
            .map(domain::license)
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = HashSet::new();
        if let Some(dup) = licenses.iter().find(|l| !seen.insert(l.sen.as_str())) {
            return Err(LinkerError::InvalidArgument {
                field: "licenses.sen",
                reason: format!("{} appears twice", dup.sen),
            }
            .into());
        }
        let (inserted, updated) = self
            .store
            .import_licenses(&licenses, self.clock.now_ms())
            .await
            .map_err(LinkerError::from)?;
        tracing::info!(inserted, updated, "licenses imported");
        Ok(Response::new(pb::ImportLicensesResponse {
            inserted,
            updated,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn detect_instances(
        &self,
        request: Request<pb::DetectInstancesRequest>,
    ) -> GrpcResult<pb::DetectInstancesResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let mut inputs = self
            .store
            .detection_inputs(&org_id)
            .await
            .map_err(LinkerError::from)?;
        inputs.app_links = self
            .with_facts(&org_id, &mut inputs.linked_instances)
            .await?;
        Ok(Response::new(pb::DetectInstancesResponse {
            instances: crate::detect::detect(&inputs),
        }))
    }
}

#[tonic::async_trait]
impl AuditService for LinkerApi {
    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn append_event(
        &self,
        request: Request<audit_pb::AppendEventRequest>,
    ) -> GrpcResult<audit_pb::AppendEventResponse> {
        let caller = self.authority.caller(&request).await?;
        caller.require_service()?;
        let r = request.get_ref();
        let org_id = domain::id("org_id", &r.org_id)?;
        let key = domain::idempotency_key(&r.idempotency_key)?;
        if r.resolve_only {
            // Only the key matters: the entry it names was (or was not) written before.
            let key = key.ok_or(LinkerError::InvalidArgument {
                field: "idempotency_key",
                reason: "is required with resolve_only".into(),
            })?;
            let outcome = self
                .store
                .resolve_audit_key(&org_id, key, self.clock.now_ms())
                .await
                .map_err(LinkerError::from)?;
            return Ok(Response::new(append_response(&org_id, outcome)));
        }
        let mut draft = AuditDraft::new(
            self.clock.now_ms(),
            domain::audit_text("actor", &r.actor, true)?,
            &domain::audit_action("action", &r.action)?,
            domain::audit_text("target", &r.target, false)?,
        )
        .until(self.deadline(&request));
        draft.service = domain::audit_action("service", &r.service)?;
        if r.attributes.len() > 50 {
            return Err(LinkerError::InvalidArgument {
                field: "attributes",
                reason: "has more than 50 entries".into(),
            }
            .into());
        }
        for (key, value) in &r.attributes {
            draft.attributes.insert(
                domain::audit_text("attributes.key", key, true)?,
                domain::audit_text("attributes.value", value, false)?,
            );
        }
        let outcome = match key {
            None => KeyedAppend::Appended(
                self.store
                    .append_audit(&org_id, draft)
                    .await
                    .map_err(LinkerError::from)?,
            ),
            Some(key) => self
                .store
                .append_audit_keyed(&org_id, draft, key)
                .await
                .map_err(LinkerError::from)?,
        };
        Ok(Response::new(append_response(&org_id, outcome)))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn list_events(
        &self,
        request: Request<audit_pb::ListEventsRequest>,
    ) -> GrpcResult<audit_pb::ListEventsResponse> {
        let caller = self.authority.caller(&request).await?;
        let r = request.get_ref();
        let org_id = self.admin_of(&caller, &r.org_id).await?;
        let (size, after) = domain::seq_page(r.page_size, &r.page_token)?;
        let prefix = domain::action_prefix(&r.action_prefix)?;
        let events = self
            .store
            .list_audit(&org_id, after, size, prefix)
            .await
            .map_err(LinkerError::from)?;
        Ok(Response::new(audit_pb::ListEventsResponse {
            next_page_token: next_token(&events, size, |e| e.seq.to_string()),
            events: events.iter().map(audit_pb).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn verify_chain(
        &self,
        request: Request<audit_pb::VerifyChainRequest>,
    ) -> GrpcResult<audit_pb::VerifyChainResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let head = self
            .store
            .audit_head(&org_id)
            .await
            .map_err(LinkerError::from)?
            .ok_or(LinkerError::NotFound("org"))?;
        // The head and the entry it names are written in one transaction and entries are never
        // removed, so the entries up to the head read above are one consistent view; entries that
        // concurrent writers append after it are not part of this check.
        let mut verifier = ChainVerifier::default();
        let mut after = 0;
        'pages: while after < head.seq {
            let page = self
                .store
                .list_audit(&org_id, after, 1_000, "")
                .await
                .map_err(LinkerError::from)?;
            for entry in page.iter().take_while(|e| e.seq <= head.seq) {
                if !verifier.feed(entry) {
                    break 'pages;
                }
            }
            match page.last() {
                Some(last) if page.len() == 1_000 => after = last.seq,
                _ => break,
            }
        }
        let response = match verifier.finish(&head) {
            ChainCheck::Intact { entries, head } => audit_pb::VerifyChainResponse {
                intact: true,
                entries_checked: entries,
                first_bad_seq: 0,
                problem: String::new(),
                head_hash: head,
            },
            ChainCheck::Broken {
                entries,
                first_bad_seq,
                problem,
            } => {
                tracing::warn!(%org_id, first_bad_seq, problem, "audit chain broken");
                audit_pb::VerifyChainResponse {
                    intact: false,
                    entries_checked: entries,
                    first_bad_seq,
                    problem: problem.to_owned(),
                    head_hash: head.hash,
                }
            }
        };
        Ok(Response::new(response))
    }
}
