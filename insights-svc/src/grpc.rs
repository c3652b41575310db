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

use crate::health::{self, HOUR_MS};
use crate::policy::Policies;
use crate::readiness;
use crate::rollups::Rollups;
use crate::rules::Rules;
use crate::store::{InsightsStore, StoredAssessment, StoredBundle, StoredReadiness, subject_of};
use crate::stores::Stores;
use crate::treat::{self, FieldRules};
use crate::trends;
use crate::upload::{self, BundleLimits, Part, Tally, UploadMessage};

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
    async fn caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let principal = self.credentials.authenticate(request).await?;
        self.limiter.check_caller(&principal)?;
        Ok(principal)
    }

    /// An admin's (or the operator's) read of one of the org's instances.
    async fn instance_read<T>(
        &self,
        request: &Request<T>,
        org_id: &str,
        instance_id: &str,
    ) -> Result<(String, String), Status> {
        let caller = self.caller(request).await?;
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
        let assessed = health::evaluate(&self.rules, &series, now);
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

    /// Who uploads, under which policy and rules; refuses what consent does not allow.
    async fn uploader(
        &self,
        caller: &Principal,
        header: &pb::UploadHeader,
    ) -> Result<Uploader, Status> {
        let (org_id, instance_id) = match caller {
            Principal::Instance {
                org_id,
                instance_id,
                ..
            } => {
                if ids::optional("header.org_id", &header.org_id)?.is_some_and(|o| &o != org_id) {
                    return Err(Status::permission_denied(
                        "header.org_id: an instance credential uploads for its own org only",
                    ));
                }
                if ids::optional("header.instance_id", &header.instance_id)?
                    .is_some_and(|i| &i != instance_id)
                {
                    return Err(Status::permission_denied(
                        "header.instance_id: an instance credential uploads for its own instance only",
                    ));
                }
                (org_id.clone(), instance_id.clone())
            }
            _ => {
                let org_id = ids::parse("header.org_id", &header.org_id)?;
                caller.require_admin_of(&org_id)?;
                match ids::optional("header.instance_id", &header.instance_id)? {
                    Some(instance_id) => {
                        self.directory
                            .require_instance(&org_id, &instance_id)
                            .await?;
                        (org_id, instance_id)
                    }
                    None => {
                        self.directory.require_org(&org_id).await?;
                        let server_id = header.server_id.trim();
                        if server_id.is_empty()
                            || server_id.len() > 64
                            || !server_id
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        {
                            return Err(Status::invalid_argument(
                                "header.server_id: an upload for an instance that is not linked names its server id (letters, digits, '-', '_'; at most 64)",
                            ));
                        }
                        (org_id, String::new())
                    }
                }
            }
        };
        sightline_runtime::telemetry::note_ids(&org_id, Some(&instance_id));
        let linked = !instance_id.is_empty();
        let policy = self
            .policies
            .policy(&org_id, linked.then_some(instance_id.as_str()))?
            .ok_or_else(|| {
                Status::failed_precondition(
                    "the org has not opted in to collection: uploads are refused while it is DISABLED",
                )
            })?;
        if policy.usage_level() == UsageLevel::Disabled {
            return Err(Status::failed_precondition(
                "the org's (or instance's) consent is DISABLED: nothing is stored",
            ));
        }
        let mut rules = FieldRules::of(&policy);
        if !linked {
            // An instance that is not linked is treated as BASIC, never more openly than the org.
            rules = rules.stricter(&FieldRules::from_rules(
                &sightline_proto::rules::field_rules(
                    sightline_proto::common::v1::SharingLevel::Basic,
                ),
            ));
        }
        let subject = subject_of(&instance_id, header.server_id.trim());
        Ok(Uploader {
            org_id,
            instance_id,
            subject,
            policy,
            rules,
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

    /// The policy fence, held while an upload's records are written (see [`Policies::hold`]).
    async fn hold(&self, uploader: &Uploader) -> Result<Held, Status> {
        let linked = !uploader.instance_id.is_empty();
        self.policies
            .hold(
                &uploader.policy,
                linked.then_some(uploader.instance_id.as_str()),
            )
            .await
    }

    fn sharing_of(&self, uploader: &Uploader) -> SharingLevel {
        if uploader.instance_id.is_empty() {
            SharingLevel::Basic
        } else {
            uploader.policy.sharing_level()
        }
    }

    /// Makes, keeps and returns the readiness report of an (already treated) assessment.
    async fn keep_readiness(
        &self,
        of: ReportOf<'_>,
        assessment: &pb::Assessment,
    ) -> Result<pb::ReadinessReport, Status> {
        let ReportOf {
            store,
            org_id,
            instance_id,
            subject,
            sharing,
            source,
            consent_version,
        } = of;
        let (blockers, score) = readiness::assess(assessment);
        let now = self.clock.now_ms();
        let report = pb::ReadinessReport {
            org_id: org_id.to_owned(),
            instance_id: instance_id.to_owned(),
            counts: assessment.counts,
            blockers,
            readiness_score: score,
            sharing_level: sharing as i32,
            assessed_at: Some(to_proto(now)),
            source: source as i32,
            consent_version,
        };
        store
            .put_readiness(&StoredReadiness {
                org_id: org_id.to_owned(),
                subject: subject.to_owned(),
                assessed_at: now,
                score: i64::from(score),
                report: report.encode_to_vec(),
            })
            .await?;
        Ok(report)
    }

    /// Reads the header, then the chunks into `sink`, with the size and digest checks; returns the
    /// uploader, the file's SHA-256 and its size.
    async fn receive<M: UploadMessage>(
        &self,
        stream: &mut Streaming<M>,
        format: &str,
        limit: u64,
        sink: &mut (dyn FnMut(&[u8]) -> Result<(), Status> + Send),
        caller: &Principal,
    ) -> Result<(Uploader, String, u64), Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("header: the stream is empty"))?;
        let header = match first.part() {
            Some(Part::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "header: the first message must be the header",
                ));
            }
        };
        upload::check_header(&header, format, limit)?;
        let uploader = self.uploader(caller, &header).await?;
        let mut tally = Tally::new(&header);
        while let Some(message) = stream.message().await? {
            match message.part() {
                Some(Part::Chunk(chunk)) => {
                    tally.add(&chunk)?;
                    sink(&chunk)?;
                }
                Some(Part::Header(_)) => {
                    return Err(Status::invalid_argument(
                        "header: repeated; a stream has one header, first",
                    ));
                }
                None => return Err(Status::invalid_argument("part: is required")),
            }
        }
        let received = tally.received();
        let digest = tally.finish(&header)?;
        Ok((uploader, digest, received))
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
    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_health(
        &self,
        request: Request<pb::GetHealthRequest>,
    ) -> GrpcResult<pb::GetHealthResponse> {
        let r = request.get_ref();
        let (org_id, instance_id) = self
            .instance_read(&request, &r.org_id, &r.instance_id)
            .await?;
        let health = self.health_of(&org_id, &instance_id).await?;
        Ok(Response::new(pb::GetHealthResponse {
            health: Some(health),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_trends(
        &self,
        request: Request<pb::GetTrendsRequest>,
    ) -> GrpcResult<pb::GetTrendsResponse> {
        let r = request.get_ref();
        let metric = required("metric_name", &r.metric_name)?.to_owned();
        let (from, to) = required_range(r.range.as_ref(), MAX_RANGE_DAYS)?;
        let bucket = r
            .bucket
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("bucket: is required"))?;
        let bucket_ms = bucket.seconds.saturating_mul(1000);
        if bucket_ms < HOUR_MS || bucket.nanos != 0 || bucket_ms % HOUR_MS != 0 {
            return Err(Status::invalid_argument(
                "bucket: whole hours, at least one hour",
            ));
        }
        let (org_id, instance_id) = self
            .instance_read(&request, &r.org_id, &r.instance_id)
            .await?;
        let hours = self
            .rollups
            .hours(&org_id, &instance_id, &metric, from, to)
            .await?;
        let points = trends::bucket(&hours, from, to, bucket_ms);
        let (slope, direction) = trends::fit(&points);
        Ok(Response::new(pb::GetTrendsResponse {
            points: points
                .iter()
                .map(|p| pb::TrendPoint {
                    at: Some(to_proto(p.at_ms)),
                    value: p.value,
                    samples: p.samples,
                })
                .collect(),
            slope_per_day: slope,
            direction: direction as i32,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_score_history(
        &self,
        request: Request<pb::GetScoreHistoryRequest>,
    ) -> GrpcResult<pb::GetScoreHistoryResponse> {
        let r = request.get_ref();
        let (from, to) = required_range(r.range.as_ref(), MAX_RANGE_DAYS)?;
        let (org_id, instance_id) = self
            .instance_read(&request, &r.org_id, &r.instance_id)
            .await?;
        let points = self
            .data_store(&org_id)
            .await?
            .scores(&org_id, &instance_id, from, to)
            .await?;
        Ok(Response::new(pb::GetScoreHistoryResponse {
            points: points
                .into_iter()
                .map(|(at, score)| pb::ScorePoint {
                    at: Some(to_proto(at)),
                    score: u32::try_from(score).unwrap_or(0),
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn run_readiness_assessment(
        &self,
        request: Request<pb::RunReadinessAssessmentRequest>,
    ) -> GrpcResult<pb::RunReadinessAssessmentResponse> {
        let r = request.get_ref();
        let (org_id, instance_id) = self
            .instance_read(&request, &r.org_id, &r.instance_id)
            .await?;
        let policy = self
            .policies
            .policy(&org_id, Some(&instance_id))?
            .filter(|p| p.usage_level() != UsageLevel::Disabled)
            .ok_or_else(|| {
                Status::failed_precondition("the instance's consent is DISABLED: nothing to assess")
            })?;
        let rules = FieldRules::of(&policy);
        let keys = self.pseudonyms(&policy);
        let store = self.data_store_for_write(&policy).await?;
        let (assessment, source) = match store.latest_assessment(&org_id, &instance_id).await? {
            Some(stored) => {
                // Treated again under today's policy: a lowered level shows less at once.
                let dynamic = prost_reflect::DynamicMessage::decode(
                    upload::assessment_descriptor()?,
                    stored.body.as_slice(),
                )
                .map_err(|e| {
                    Status::internal(format!("a stored assessment does not decode: {e}"))
                })?;
                let (assessment, _) =
                    treat::assessment(dynamic, &rules, keys.as_ref()).map_err(Status::internal)?;
                (assessment, pb::DataSource::Upload)
            }
            None => {
                let now = self.clock.now_ms();
                let mut latest = BTreeMap::new();
                for name in [
                    "projects",
                    "issues",
                    "custom_fields",
                    "workflows",
                    "users",
                    "groups",
                    "spaces",
                    "apps",
                ] {
                    let metric = format!("guardrail.{name}");
                    let hours = self
                        .rollups
                        .hours(
                            &org_id,
                            &instance_id,
                            &metric,
                            now - 48 * HOUR_MS,
                            now + HOUR_MS,
                        )
                        .await?;
                    if let Some(value) = health::observe(
                        crate::rules::Aggregation::Last,
                        &hours,
                        now - 48 * HOUR_MS,
                        now + HOUR_MS,
                    ) {
                        latest.insert(metric, value);
                    }
                }
                let counts = readiness::counts_from_guardrails(&latest).ok_or_else(|| {
                    Status::failed_precondition(
                        "the instance has sent no counts (guardrail metrics) and no assessment was uploaded",
                    )
                })?;
                (
                    pb::Assessment {
                        counts: Some(counts),
                        ..Default::default()
                    },
                    pb::DataSource::Connected,
                )
            }
        };
        let report = self
            .keep_readiness(
                ReportOf {
                    store: store.as_ref(),
                    org_id: &org_id,
                    instance_id: &instance_id,
                    subject: &instance_id,
                    sharing: policy.sharing_level(),
                    source,
                    consent_version: policy.consent_version,
                },
                &assessment,
            )
            .await?;
        Ok(Response::new(pb::RunReadinessAssessmentResponse {
            report: Some(report),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_readiness(
        &self,
        request: Request<pb::GetReadinessRequest>,
    ) -> GrpcResult<pb::GetReadinessResponse> {
        let r = request.get_ref();
        let (org_id, instance_id) = self
            .instance_read(&request, &r.org_id, &r.instance_id)
            .await?;
        let stored = self
            .data_store(&org_id)
            .await?
            .readiness(&org_id, &instance_id)
            .await?
            .ok_or_else(|| {
                Status::not_found("no readiness report was made for this instance yet")
            })?;
        let report = pb::ReadinessReport::decode(stored.report.as_slice())
            .map_err(|e| Status::internal(format!("a stored report does not decode: {e}")))?;
        Ok(Response::new(pb::GetReadinessResponse {
            report: Some(report),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn upload_assessment(
        &self,
        request: Request<Streaming<pb::UploadAssessmentRequest>>,
    ) -> GrpcResult<pb::UploadAssessmentResponse> {
        let caller = self.caller(&request).await?;
        let mut stream = request.into_inner();
        let mut bytes = Vec::new();
        let (uploader, _, received) = self
            .receive(
                &mut stream,
                upload::ASSESSMENT_FORMAT,
                self.limits.max_assessment_bytes,
                &mut |chunk| {
                    bytes.extend_from_slice(chunk);
                    Ok(())
                },
                &caller,
            )
            .await?;
        let parsed = upload::parse_assessment(&bytes, "file")?;
        let keys = self.pseudonyms(&uploader.policy);
        let (assessment, treated) =
            treat::assessment(parsed, &uploader.rules, keys.as_ref()).map_err(Status::internal)?;
        let upload_id = uuid::Uuid::now_v7().to_string();
        let store = self.data_store_for_write(&uploader.policy).await?;
        let _held = self.hold(&uploader).await?;
        store
            .put_assessment(&StoredAssessment {
                upload_id: upload_id.clone(),
                org_id: uploader.org_id.clone(),
                subject: uploader.subject.clone(),
                stored_at: self.clock.now_ms(),
                consent_version: i64::try_from(uploader.policy.consent_version).unwrap_or(0),
                size_bytes: i64::try_from(received).unwrap_or(i64::MAX),
                body: assessment.encode_to_vec(),
            })
            .await?;
        let report = self
            .keep_readiness(
                ReportOf {
                    store: store.as_ref(),
                    org_id: &uploader.org_id,
                    instance_id: &uploader.instance_id,
                    subject: &uploader.subject,
                    sharing: self.sharing_of(&uploader),
                    source: pb::DataSource::Upload,
                    consent_version: uploader.policy.consent_version,
                },
                &assessment,
            )
            .await?;
        metrics::counter!("sightline_insights_uploads_total", "kind" => "assessment").increment(1);
        Ok(Response::new(pb::UploadAssessmentResponse {
            upload_id,
            bytes_received: received,
            report: Some(report),
            removed: treated.removed_counts(),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn upload_support_bundle(
        &self,
        request: Request<Streaming<pb::UploadSupportBundleRequest>>,
    ) -> GrpcResult<pb::UploadSupportBundleResponse> {
        use std::io::Write;
        let caller = self.caller(&request).await?;
        let mut stream = request.into_inner();
        // The zip goes to a private temporary file next to where bundles are kept (0600).
        let incoming_dir = self.bundle_dirs.data_dir.join("bundles").join(".incoming");
        sightline_runtime::secret_file::private_dir(&incoming_dir)
            .map_err(io_error("making the upload directory private"))?;
        let mut incoming = tempfile::NamedTempFile::new_in(&incoming_dir)
            .map_err(io_error("opening a temporary file"))?;
        let mut writer = std::io::BufWriter::with_capacity(256 * 1024, incoming.as_file_mut());
        let received = self
            .receive(
                &mut stream,
                upload::BUNDLE_FORMAT,
                self.limits.max_bundle_bytes,
                &mut |chunk| {
                    writer
                        .write_all(chunk)
                        .map_err(|e| Status::internal(format!("writing the upload: {e}")))
                },
                &caller,
            )
            .await;
        let flushed = writer.flush();
        drop(writer);
        let (uploader, digest, bytes_received) = received?;
        flushed.map_err(io_error("writing the upload"))?;
        if uploader.policy.support_bundles_moving {
            return Err(sightline_runtime::ratelimit::retry_after(
                Status::unavailable(
                    "the org's support bundles are moving to another location; retry later",
                ),
                u64::from(uploader.policy.retry_after_ms.max(1)),
            ));
        }
        let location = uploader.policy.support_bundle_location();
        // The record goes to the bundles' location's store, the score made from it to the data's.
        let bundle_store = self.stores.get(location).await?;
        let data_store = self.data_store_for_write(&uploader.policy).await?;
        let location_name = location_name(location);
        let dir = self.bundle_dirs.dir(&location_name);
        sightline_runtime::secret_file::private_dir(&dir)
            .map_err(io_error("making the bundle directory private"))?;
        let output =
            tempfile::NamedTempFile::new_in(&dir).map_err(io_error("opening a temporary file"))?;
        let limits = self.limits.bundle;
        let rules = uploader.rules.clone();
        let keys = self.pseudonyms(&uploader.policy);
        let (bundle, output) = tokio::task::spawn_blocking(move || {
            let input = incoming.reopen()?;
            let mut output = output;
            let result = upload::process_bundle(
                std::io::BufReader::new(input),
                std::io::BufWriter::new(output.as_file_mut()),
                limits,
                &rules,
                keys.as_ref(),
            );
            drop(incoming);
            Ok::<_, std::io::Error>(result.map(|b| (b, output)))
        })
        .await
        .map_err(|e| Status::internal(format!("checking the bundle: {e}")))?
        .map_err(io_error("reading the upload"))??;
        let upload_id = uuid::Uuid::now_v7().to_string();
        let file_name = format!("{upload_id}.zip");
        let path = dir.join(&file_name);
        let kept_at = path.clone();
        let _keeping = self.keeping.read().await;
        tokio::task::spawn_blocking(move || upload::keep_file(output, &kept_at))
            .await
            .map_err(|e| Status::internal(format!("keeping the bundle: {e}")))?
            .map_err(io_error("keeping the bundle"))?;
        let scrubbed: BTreeMap<String, u32> = bundle
            .treated
            .scrubbed
            .iter()
            .map(|(class, n)| {
                let name = DataClass::try_from(*class)
                    .map(|c| {
                        c.as_str_name()
                            .trim_start_matches("DATA_CLASS_")
                            .to_ascii_lowercase()
                    })
                    .unwrap_or_default();
                (name, *n)
            })
            .collect();
        let now = self.clock.now_ms();
        let held = self.hold(&uploader).await;
        let stored = match &held {
            Ok(_) => bundle_store
                .put_bundle(&StoredBundle {
                    upload_id: upload_id.clone(),
                    org_id: uploader.org_id.clone(),
                    subject: uploader.subject.clone(),
                    location: location_name,
                    file_name,
                    stored_at: now,
                    size_bytes: i64::try_from(bytes_received).unwrap_or(i64::MAX),
                    sha256: digest,
                    files_read: i64::from(bundle.files_read),
                    scrubbed: serde_json::to_string(&scrubbed).unwrap_or_default(),
                })
                .await
                .map_err(Status::from),
            Err(status) => Err(status.clone()),
        };
        if let Err(status) = stored {
            // Whole or not at all: the file goes when its record could not be written.
            let _ = std::fs::remove_file(&path);
            return Err(status);
        }
        let (series, latest) = upload::series_of(&bundle.metrics);
        let at = latest.unwrap_or(now);
        let assessed = health::evaluate(&self.rules, &series, at);
        if assessed.has_data {
            data_store
                .put_score(
                    &uploader.org_id,
                    &uploader.subject,
                    at.div_euclid(HOUR_MS) * HOUR_MS,
                    i64::from(assessed.score),
                    &self.rules.version,
                    pb::DataSource::Upload as i64,
                )
                .await?;
        }
        metrics::counter!("sightline_insights_uploads_total", "kind" => "support_bundle")
            .increment(1);
        Ok(Response::new(pb::UploadSupportBundleResponse {
            upload_id,
            bytes_received,
            files_read: bundle.files_read,
            items_scrubbed: bundle.treated.scrubbed_total(),
            health: Some(pb::InstanceHealth {
                org_id: uploader.org_id.clone(),
                instance_id: uploader.instance_id.clone(),
                score: assessed.score,
                findings: assessed.findings,
                rules_version: self.rules.version.clone(),
                computed_at: Some(to_proto(at)),
                consent_version: uploader.policy.consent_version,
                source: pb::DataSource::Upload as i32,
                has_data: assessed.has_data,
            }),
            scrubbed: bundle.treated.scrubbed_counts(),
            stored_in: location as i32,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty))]
    async fn get_portfolio(
        &self,
        request: Request<pb::GetPortfolioRequest>,
    ) -> GrpcResult<pb::GetPortfolioResponse> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let org_id = ids::parse("org_id", &r.org_id)?;
        caller.require_admin_of(&org_id)?;
        sightline_runtime::telemetry::note_ids(&org_id, None);
        let page_size = if r.page_size == 0 {
            100
        } else {
            r.page_size.min(MAX_PORTFOLIO_PAGE)
        };
        let mut list = Request::new(linker_pb::ListInstancesRequest {
            org_id: org_id.clone(),
            page_size,
            page_token: r.page_token.clone(),
            instance_id: String::new(),
        });
        authorize(&mut list, &self.service_token)?;
        let listed = LinkerServiceClient::new(self.linker.clone())
            .list_instances(list)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    Status::unavailable(format!("linker-svc: {}", s.message()))
                }
                _ => s,
            })?
            .into_inner();
        let subjects: Vec<String> = listed
            .instances
            .iter()
            .map(|i| i.instance_id.clone())
            .collect();
        let store = self.data_store(&org_id).await?;
        let scores = store.latest_scores(&org_id, &subjects).await?;
        let readiness = store.readiness_scores(&org_id, &subjects).await?;
        let instances = listed
            .instances
            .into_iter()
            .map(|instance| {
                let score = scores.get(&instance.instance_id);
                let ready = readiness.get(&instance.instance_id);
                let last_seen = instance
                    .credentials
                    .iter()
                    .filter_map(|c| c.last_used_at.as_ref().map(from_proto))
                    .max();
                pb::PortfolioEntry {
                    linked: instance.state() == linker_pb::InstanceState::Linked,
                    metadata: instance.metadata,
                    score: score.map_or(0, |(_, s)| u32::try_from(*s).unwrap_or(0)),
                    has_score: score.is_some(),
                    last_seen_at: last_seen.map(to_proto),
                    readiness_score: ready.map_or(0, |s| u32::try_from(*s).unwrap_or(0)),
                    has_readiness: ready.is_some(),
                    instance_id: instance.instance_id,
                }
            })
            .collect();
        Ok(Response::new(pb::GetPortfolioResponse {
            instances,
            next_page_token: listed.next_page_token,
        }))
    }
}

/// Whether a policy allows metrics (health is made from them).
pub fn allows_metrics(policy: &consent_pb::Policy) -> bool {
    policy.allowed_kinds.contains(&(EventKind::Metric as i32))
}
