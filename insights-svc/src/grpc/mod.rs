//! The gRPC face of insights-svc: who may call what (org admins for their own org, the operator
//! for any, an instance credential for its own uploads), ids checked with linker-svc, and the
//! health, trends, readiness, upload and portfolio methods.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use prost::Message;
use sightline_proto::common::v1::{DataClass, EventKind, Location, SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as consent_pb;
use sightline_proto::insights::v1 as pb;
use sightline_proto::insights::v1::insights_service_server::InsightsService;
use sightline_proto::linker::v1 as linker_pb;
use sightline_proto::linker::v1::linker_service_client::LinkerServiceClient;
use sightline_runtime::SharedClock;
use sightline_runtime::auth::{CredentialClient, Principal, authorize};
use sightline_runtime::directory::Directory;
use sightline_runtime::ids;
use sightline_runtime::location::location_name;
use sightline_runtime::policy_stream::Held;
use sightline_runtime::pseudonym::{OrgPseudonymizer, PseudonymKeys};
use sightline_runtime::ratelimit::RateLimiter;
use sightline_runtime::settings::Secret;
use sightline_runtime::text::required;
use sightline_runtime::time::{from_proto, required_range, to_proto};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::enforce::{self, FieldRules};
use crate::health::HOUR_MS;
use crate::locations::Stores;
use crate::policy_cache::Policies;
use crate::rollups::Rollups;
use crate::rules::Rules;
use crate::store::{InsightsStore, StoredAssessment, StoredBundle, StoredReadiness, subject_of};
use crate::trends;
use crate::upload::{self, BundleLimits, Part, Tally, UploadMessage};

mod health;
mod portfolio;
mod readiness;
mod uploads;

type GrpcResult<T> = Result<Response<T>, Status>;

/// Longest range of a trend or a score history, in days.
const MAX_RANGE_DAYS: i64 = 731;
/// A portfolio page holds at most this many instances.
const MAX_PORTFOLIO_PAGE: u32 = 500;

/// Where support bundles of each location are kept.
#[derive(Debug, Clone)]
pub struct BundleDirs {
    pub data_dir: PathBuf,
    pub configured: BTreeMap<String, PathBuf>,
    /// How old a file without a record must be before it is taken for an orphan.
    pub orphan_grace: std::time::Duration,
}

impl BundleDirs {
    pub fn dir(&self, location: &str) -> PathBuf {
        self.configured
            .get(location)
            .cloned()
            .unwrap_or_else(|| self.data_dir.join("bundles").join(location))
    }
}

/// Upload limits.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_assessment_bytes: u64,
    pub max_bundle_bytes: u64,
    pub bundle: BundleLimits,
}

#[derive(Debug, Clone)]
pub struct InsightsApi {
    /// A store per residency location.
    pub(crate) stores: Stores,
    pub(crate) policies: Arc<Policies>,
    pub(crate) keys: Arc<PseudonymKeys>,
    pub(crate) rules: Arc<Rules>,
    pub(crate) rollups: Rollups,
    pub(crate) credentials: CredentialClient,
    pub(crate) directory: Directory,
    pub(crate) linker: Channel,
    pub(crate) service_token: Secret,
    pub(crate) limiter: Arc<RateLimiter>,
    pub(crate) clock: SharedClock,
    pub(crate) limits: UploadLimits,
    pub(crate) bundle_dirs: BundleDirs,
    /// Held (shared) while a bundle file and its record are written, and (exclusive) while files
    /// with no record are removed, so that removal never takes a file whose record is on its way.
    pub(crate) keeping: Arc<tokio::sync::RwLock<()>>,
}

/// Whose readiness report it is and how it was made.
struct ReportOf<'a> {
    /// The store of the org's data location.
    store: &'a dyn InsightsStore,
    org_id: &'a str,
    instance_id: &'a str,
    subject: &'a str,
    sharing: SharingLevel,
    source: pb::DataSource,
    consent_version: u64,
}

/// Whose upload it is.
struct Uploader {
    org_id: String,
    /// Empty for an instance that is not linked.
    instance_id: String,
    subject: String,
    policy: Arc<consent_pb::Policy>,
    rules: FieldRules,
}

impl InsightsApi {
    /// An admin's (or the operator's) read of one of the org's instances.
    async fn instance_read<T>(
        &self,
        request: &Request<T>,
        org_id: &str,
        instance_id: &str,
    ) -> Result<(String, String), Status> {
        let caller = self.credentials.caller(request, &self.limiter).await?;
        let org_id = ids::parse("org_id", org_id)?;
        let instance_id = ids::parse("instance_id", instance_id)?;
        caller.require_admin_of(&org_id)?;
        self.directory
            .require_instance(&org_id, &instance_id)
            .await?;
        sightline_runtime::telemetry::note_ids(&org_id, Some(&instance_id));
        Ok((org_id, instance_id))
    }

    fn pseudonyms(&self, policy: &consent_pb::Policy) -> Option<OrgPseudonymizer> {
        self.keys
            .org_key(policy.pseudonym_key_version, &policy.org_id)
    }

    /// The health of a linked instance now, from its rollups.
    pub async fn health_of(
        &self,
        org_id: &str,
        instance_id: &str,
    ) -> Result<pb::InstanceHealth, Status> {
        let now = self.clock.now_ms();
        let series = self
            .rollups
            .for_rules(org_id, instance_id, &self.rules, now)
            .await?;
        let assessed = crate::health::evaluate(&self.rules, &series, now);
        let consent_version = self
            .policies
            .policy(org_id, Some(instance_id))
            .ok()
            .flatten()
            .map_or(0, |p| p.consent_version);
        Ok(pb::InstanceHealth {
            org_id: org_id.to_owned(),
            instance_id: instance_id.to_owned(),
            score: assessed.score,
            findings: assessed.findings,
            rules_version: self.rules.version.clone(),
            computed_at: Some(to_proto(now)),
            consent_version,
            source: pb::DataSource::Connected as i32,
            has_data: assessed.has_data,
        })
    }

    /// The store of an org's data (assessments, readiness reports, score history): its data
    /// location's, as the org's policy says (an org consent-svc never mentioned is GLOBAL), or
    /// the new location's once insights-svc's part of a move under way is reported.
    pub(crate) async fn data_store(&self, org_id: &str) -> Result<Arc<dyn InsightsStore>, Status> {
        let location = self
            .policies
            .policy(org_id, None)?
            .map_or(Location::Global, |p| {
                sightline_runtime::location::read_location(&p, crate::maintenance::MOVE_OWNER)
            });
        self.stores.get(location).await
    }

    /// The store a write of the org's data goes to; refused (UNAVAILABLE, with the policy's retry
    /// hint) while that data moves to another location.
    pub(crate) async fn data_store_for_write(
        &self,
        policy: &consent_pb::Policy,
    ) -> Result<Arc<dyn InsightsStore>, Status> {
        if policy.data_move.is_some() && policy.moving {
            return Err(sightline_runtime::ratelimit::retry_after(
                Status::unavailable("the org's data is moving to another location; retry later"),
                u64::from(policy.retry_after_ms.max(1)),
            ));
        }
        self.stores.get(policy.location()).await
    }

    fn sharing_of(&self, uploader: &Uploader) -> SharingLevel {
        if uploader.instance_id.is_empty() {
            SharingLevel::Basic
        } else {
            uploader.policy.sharing_level()
        }
    }
}

fn io_error(what: &str) -> impl Fn(std::io::Error) -> Status + '_ {
    move |e| {
        tracing::error!(error = %e, "{what}");
        Status::internal(format!("{what} failed"))
    }
}

#[tonic::async_trait]
impl InsightsService for InsightsApi {
    async fn get_health(
        &self,
        request: Request<pb::GetHealthRequest>,
    ) -> GrpcResult<pb::GetHealthResponse> {
        health::get_health(self, request).await
    }

    async fn get_trends(
        &self,
        request: Request<pb::GetTrendsRequest>,
    ) -> GrpcResult<pb::GetTrendsResponse> {
        health::get_trends(self, request).await
    }

    async fn get_score_history(
        &self,
        request: Request<pb::GetScoreHistoryRequest>,
    ) -> GrpcResult<pb::GetScoreHistoryResponse> {
        health::get_score_history(self, request).await
    }

    async fn run_readiness_assessment(
        &self,
        request: Request<pb::RunReadinessAssessmentRequest>,
    ) -> GrpcResult<pb::RunReadinessAssessmentResponse> {
        readiness::run_readiness_assessment(self, request).await
    }

    async fn get_readiness(
        &self,
        request: Request<pb::GetReadinessRequest>,
    ) -> GrpcResult<pb::GetReadinessResponse> {
        readiness::get_readiness(self, request).await
    }

    async fn upload_assessment(
        &self,
        request: Request<Streaming<pb::UploadAssessmentRequest>>,
    ) -> GrpcResult<pb::UploadAssessmentResponse> {
        uploads::upload_assessment(self, request).await
    }

    async fn upload_support_bundle(
        &self,
        request: Request<Streaming<pb::UploadSupportBundleRequest>>,
    ) -> GrpcResult<pb::UploadSupportBundleResponse> {
        uploads::upload_support_bundle(self, request).await
    }

    async fn get_portfolio(
        &self,
        request: Request<pb::GetPortfolioRequest>,
    ) -> GrpcResult<pb::GetPortfolioResponse> {
        portfolio::get_portfolio(self, request).await
    }
}

/// Whether a policy allows metrics (health is made from them).
pub fn allows_metrics(policy: &consent_pb::Policy) -> bool {
    policy.allowed_kinds.contains(&(EventKind::Metric as i32))
}
