//! The gRPC face of collector-svc: who may call what, ids and ranges checked, and the reads of page
//! views and metrics. Ingest goes through [`crate::ingest::process`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use prost::Message;
use sightline_proto::collector::v1 as pb;
use sightline_proto::collector::v1::collector_service_server::CollectorService;
use sightline_proto::common::v1 as common;
use sightline_runtime::SharedClock;
use sightline_runtime::auth::{CredentialClient, Principal};
use sightline_runtime::directory::Directory;
use sightline_runtime::ids;
use sightline_runtime::ratelimit::RateLimiter;
use sightline_runtime::text::required;
use sightline_runtime::time::{required_range, to_proto};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::aggregates;
use crate::enforce::{DAY_MS, Plan};
use crate::fields::Field;
use crate::ingest::{self, Discard, Processed};
use crate::maintenance::Maintenance;
use crate::policy::Policies;
use crate::store::{EraseSpec, Ranked, ViewScope, ViewTotals};
use crate::stores::{Stores, location_name};

type GrpcResult<T> = Result<Response<T>, Status>;

/// Longest range a report or a metrics query covers.
const MAX_RANGE_DAYS: i64 = 800;

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct CollectorApi {
    pub(crate) policies: Arc<Policies>,
    pub(crate) stores: Stores,
    pub(crate) clock: SharedClock,
    pub(crate) credentials: CredentialClient,
    pub(crate) directory: Directory,
    pub(crate) limiter: Arc<RateLimiter>,
    pub(crate) maintenance: Maintenance,
    pub(crate) shutdown: CancellationToken,
    pub(crate) call_limit: Duration,
    /// Benchmarks only: enforce, then discard instead of storing.
    pub(crate) discard: bool,
    /// k, the epsilon budget and the clipping bound of contributed aggregates.
    pub(crate) aggregates: AggregateSettings,
}

/// How contributed aggregates are protected.
#[derive(Debug, Clone, Copy)]
pub struct AggregateSettings {
    pub min_orgs: u32,
    pub epsilon_budget: f64,
    pub bound: f64,
    /// The epsilon of a call that names none.
    pub default_epsilon: f64,
    /// `collection.exact_aggregates_reveal_orgs`: a call may ask for exact figures.
    pub exact_allowed: bool,
}

/// Whose data a call is about.
#[derive(Debug, Clone)]
struct Scope {
    caller: Principal,
    org_id: String,
    instance_id: Option<String>,
}

impl CollectorApi {
    async fn caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let principal = self.credentials.authenticate(request).await?;
        self.limiter.check_caller(&principal)?;
        Ok(principal)
    }

    /// The caller's org and instance for an instance-credential call.
    fn instance_of(caller: &Principal) -> Result<(String, String), Status> {
        match caller {
            Principal::Instance {
                org_id,
                instance_id,
                ..
            } => {
                sightline_runtime::telemetry::note_ids(org_id, Some(instance_id));
                Ok((org_id.clone(), instance_id.clone()))
            }
            _ => Err(Status::permission_denied(
                "only an instance credential may send events",
            )),
        }
    }

    /// Resolves (org, instance) for a read. An instance credential may read its own only (ids it sends
    /// must be its own) when `instance_ok`; admins their own org; the operator any; services when
    /// `service_ok`. A named instance must be one of the org's (NOT_FOUND otherwise).
    async fn scope(
        &self,
        caller: Principal,
        org_id: &str,
        instance_id: &str,
        instance_ok: bool,
        service_ok: bool,
    ) -> Result<Scope, Status> {
        if let Principal::Instance {
            org_id: own_org,
            instance_id: own_instance,
            ..
        } = &caller
        {
            if !instance_ok {
                return Err(Status::permission_denied(
                    "an instance credential may not call this method",
                ));
            }
            if ids::optional("org_id", org_id)?.is_some_and(|o| &o != own_org) {
                return Err(Status::permission_denied(
                    "org_id: an instance credential acts for its own org only",
                ));
            }
            if ids::optional("instance_id", instance_id)?.is_some_and(|i| &i != own_instance) {
                return Err(Status::permission_denied(
                    "instance_id: an instance credential acts for its own instance only",
                ));
            }
            sightline_runtime::telemetry::note_ids(own_org, Some(own_instance));
            return Ok(Scope {
                org_id: own_org.clone(),
                instance_id: Some(own_instance.clone()),
                caller,
            });
        }
        let org_id = ids::parse("org_id", org_id)?;
        match &caller {
            Principal::Service { .. } if service_ok => {}
            _ => caller.require_admin_of(&org_id)?,
        }
        self.directory.require_org(&org_id).await?;
        let instance_id = ids::optional("instance_id", instance_id)?;
        if let Some(instance) = &instance_id {
            self.directory.require_instance(&org_id, instance).await?;
        }
        sightline_runtime::telemetry::note_ids(&org_id, instance_id.as_deref());
        Ok(Scope {
            caller,
            org_id,
            instance_id,
        })
    }

    /// The plan for reading the scope's data: UNAVAILABLE (with the retry hint) while it moves.
    fn readable_plan(&self, scope: &Scope) -> Result<Arc<Plan>, Status> {
        let plan = self.policies.plan(
            &scope.org_id,
            scope.instance_id.as_deref().unwrap_or_default(),
        )?;
        if plan.moving {
            return Err(ingest::moving(&plan));
        }
        Ok(plan)
    }

    /// Enforces and stores one batch of one instance.
    async fn ingest_batch(
        &self,
        org_id: &str,
        instance_id: &str,
        events: Vec<pb::Event>,
    ) -> Result<Processed, Status> {
        let plan = match self.policies.plan(org_id, instance_id) {
            Ok(plan) => plan,
            Err(status) => {
                // A bad batch is refused as such whatever the policy; `process` checks it otherwise.
                ingest::check_batch(&events)?;
                return Err(status);
            }
        };
        if plan.moving {
            ingest::check_batch(&events)?;
            return Err(ingest::moving(&plan));
        }
        let opened = self.stores.get(plan.location).await?;
        let sink: &dyn ingest::Sink = if self.discard {
            &Discard
        } else {
            &opened.writer
        };
        ingest::process(
            &plan,
            instance_id,
            &location_name(plan.location),
            events,
            self.clock.now_ms(),
            sink,
            false,
        )
        .await
    }

    fn deadline<T>(&self, request: &Request<T>) -> std::time::Instant {
        sightline_runtime::deadline::call_deadline(request.metadata(), self.call_limit)
    }
}

/// A required range as whole UTC days [from, to), at most [`MAX_RANGE_DAYS`] long.
fn day_range(range: Option<&common::TimeRange>) -> Result<(i64, i64), Status> {
    let (start, end) = required_range(range, MAX_RANGE_DAYS)?;
    let from = start.div_euclid(DAY_MS);
    let to = (end + DAY_MS - 1).div_euclid(DAY_MS);
    Ok((from, to))
}

fn page_size(requested: u32, default: u32, max: u32) -> i64 {
    i64::from(if requested == 0 {
        default
    } else {
        requested.min(max)
    })
}

/// An offset page token (reports).
fn offset_token(token: &str) -> Result<i64, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    let text = hex::decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| Status::invalid_argument("page_token: is not valid"))?;
    text.strip_prefix("o:")
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| Status::invalid_argument("page_token: is not valid"))
}

fn next_offset_token(offset: i64, returned: usize, limit: i64) -> String {
    if i64::try_from(returned).unwrap_or(0) < limit {
        String::new()
    } else {
        hex::encode(format!("o:{}", offset + limit))
    }
}

/// A (position, id) cursor token (metrics).
fn cursor_token(token: &str) -> Result<Option<(i64, String)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let text = hex::decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| Status::invalid_argument("page_token: is not valid"))?;
    let (at, id) = text
        .strip_prefix("c:")
        .and_then(|t| t.split_once('|'))
        .ok_or_else(|| Status::invalid_argument("page_token: is not valid"))?;
    let at = at
        .parse()
        .map_err(|_| Status::invalid_argument("page_token: is not valid"))?;
    Ok(Some((at, id.to_owned())))
}

fn cursor(at: i64, id: &str) -> String {
    hex::encode(format!("c:{at}|{id}"))
}

/// "YYYY-MM-DD" of a day number (days since 1970-01-01).
pub fn day_text(day: i64) -> String {
    // Howard Hinnant's civil-from-days.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn stats(totals: ViewTotals) -> pb::ViewStats {
    pb::ViewStats {
        views: count(totals.views),
        unique_viewers: count(totals.unique_viewers),
        by_channel: totals
            .by_channel
            .into_iter()
            .map(|(channel, views)| pb::ChannelCount {
                channel: i32::try_from(channel).unwrap_or(0),
                views: count(views),
            })
            .collect(),
        by_day: totals
            .by_day
            .into_iter()
            .map(|(day, views, unique)| pb::DayCount {
                day: day_text(day),
                views: count(views),
                unique_viewers: count(unique),
            })
            .collect(),
        // Exact for one day and for a page; estimated from sketches over several days.
        unique_viewers_error: totals.unique_error,
    }
}

fn status_code_number(code: Code) -> u32 {
    u32::try_from(code as i32).unwrap_or(2)
}

/// The ack error of a batch that was not stored.
fn batch_error(status: &Status) -> pb::BatchError {
    let hinted = status
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    let retry_after_ms = match status.code() {
        Code::InvalidArgument | Code::PermissionDenied | Code::NotFound => 0,
        _ => hinted.unwrap_or(1_000),
    };
    pb::BatchError {
        code: status_code_number(status.code()),
        message: status.message().to_owned(),
        retry_after_ms,
    }
}

#[tonic::async_trait]
impl CollectorService for CollectorApi {
    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn ingest(&self, request: Request<pb::IngestRequest>) -> GrpcResult<pb::IngestResponse> {
        let caller = self.caller(&request).await?;
        let (org_id, instance_id) = Self::instance_of(&caller)?;
        let processed = self
            .ingest_batch(&org_id, &instance_id, request.into_inner().events)
            .await?;
        if processed.held.is_some() {
            self.policies
                .hand_over(&org_id, &instance_id, &processed.result);
        }
        Ok(Response::new(pb::IngestResponse {
            result: Some(processed.result),
        }))
    }

    type IngestStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::IngestStreamResponse, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn ingest_stream(
        &self,
        request: Request<Streaming<pb::IngestStreamRequest>>,
    ) -> GrpcResult<Self::IngestStreamStream> {
        let caller = self.caller(&request).await?;
        let (org_id, instance_id) = Self::instance_of(&caller)?;
        // The credential is checked again for every batch (from the cache), so a revoked one stops
        // the stream within the cache's lifetime.
        let mut probe = Request::new(());
        *probe.metadata_mut() = request.metadata().clone();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let api = self.clone();
        let (policies, org_id, instance_id) =
            (self.policies.clone(), org_id.clone(), instance_id.clone());
        let (org, instance) = (org_id.clone(), instance_id.clone());
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = api.shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the collector is shutting down"))).await;
                        break;
                    }
                    next = inbound.message() => next,
                };
                let message = match next {
                    Ok(Some(message)) => message,
                    Ok(None) | Err(_) => break,
                };
                if let Err(status) = api.credentials.authenticate(&probe).await {
                    if status.code() == Code::Unauthenticated {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    let ack = pb::IngestStreamResponse {
                        batch_id: message.batch_id,
                        result: None,
                        error: Some(batch_error(&status)),
                    };
                    if tx.send(Ok((ack, None))).await.is_err() {
                        break;
                    }
                    continue;
                }
                let answer = match api.limiter.check_caller(&caller) {
                    Ok(()) => {
                        api.ingest_batch(&org_id, &instance_id, message.events)
                            .await
                    }
                    Err(status) => Err(status),
                };
                let (ack, held) = match answer {
                    Ok(processed) => (
                        pb::IngestStreamResponse {
                            batch_id: message.batch_id,
                            result: Some(processed.result),
                            error: None,
                        },
                        processed.held,
                    ),
                    Err(status) => (
                        pb::IngestStreamResponse {
                            batch_id: message.batch_id,
                            result: None,
                            error: Some(batch_error(&status)),
                        },
                        None,
                    ),
                };
                // The commit's hold on the policy fence goes with the ack, and is let go only when
                // the transport takes the ack (below): an ack of a commit checked under the old
                // revision is on the wire before a new revision can be applied.
                if tx.send(Ok((ack, held))).await.is_err() {
                    break;
                }
            }
        });
        let acks = ReceiverStream::new(rx).map(move |item| {
            item.map(|(ack, held)| {
                if held.is_some()
                    && let Some(result) = &ack.result
                {
                    policies.hand_over(&org, &instance, result);
                }
                ack
            })
        });
        Ok(Response::new(Box::pin(acks)))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn preview_sample(
        &self,
        request: Request<pb::PreviewSampleRequest>,
    ) -> GrpcResult<pb::PreviewSampleResponse> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let scope = self
            .scope(caller, &r.org_id, &r.instance_id, true, false)
            .await?;
        let instance_id = scope.instance_id.clone().unwrap_or_default();
        let plan = self.policies.plan(&scope.org_id, &instance_id)?;
        let processed = ingest::process(
            &plan,
            &instance_id,
            &location_name(plan.location),
            r.events,
            self.clock.now_ms(),
            &Discard,
            true,
        )
        .await?;
        Ok(Response::new(pb::PreviewSampleResponse {
            events: processed.previews,
            consent_version: plan.consent_version,
            policy_revision: plan.revision,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_view_count(
        &self,
        request: Request<pb::GetViewCountRequest>,
    ) -> GrpcResult<pb::GetViewCountResponse> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let page_id = required("page_id", &r.page_id)?;
        let scope = self
            .scope(caller, &r.org_id, &r.instance_id, true, false)
            .await?;
        let instance_id = scope
            .instance_id
            .clone()
            .ok_or_else(|| Status::invalid_argument("instance_id: is required"))?;
        let plan = self.readable_plan(&scope)?;
        if !plan.tracking.view_counter_enabled {
            return Ok(Response::new(pb::GetViewCountResponse {
                views: 0,
                unique_viewers: 0,
                enabled: false,
            }));
        }
        let opened = self.stores.get(plan.location).await?;
        let (views, unique) = opened.store.view_count(&instance_id, page_id).await?;
        Ok(Response::new(pb::GetViewCountResponse {
            views: count(views),
            unique_viewers: count(unique),
            enabled: true,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_page_report(
        &self,
        request: Request<pb::GetPageReportRequest>,
    ) -> GrpcResult<pb::GetPageReportResponse> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let page_id = required("page_id", &r.page_id)?.to_owned();
        let (from, to) = day_range(r.range.as_ref())?;
        let instance = ids::parse("instance_id", &r.instance_id)?;
        let scope = self
            .scope(caller, &r.org_id, &instance, false, false)
            .await?;
        let plan = self.readable_plan(&scope)?;
        let opened = self.stores.get(plan.location).await?;
        let totals = opened
            .store
            .view_totals(
                &ViewScope::Page {
                    instance_id: instance,
                    page_id: page_id.clone(),
                },
                from,
                to,
            )
            .await?;
        Ok(Response::new(pb::GetPageReportResponse {
            page_id,
            stats: Some(stats(totals)),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_space_report(
        &self,
        request: Request<pb::GetSpaceReportRequest>,
    ) -> GrpcResult<pb::GetSpaceReportResponse> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let space_id = required("space_id", &r.space_id)?.to_owned();
        let (from, to) = day_range(r.range.as_ref())?;
        let instance = ids::parse("instance_id", &r.instance_id)?;
        let offset = offset_token(&r.page_token)?;
        let limit = page_size(r.page_size, 50, 1_000);
        let scope = self
            .scope(caller, &r.org_id, &instance, false, false)
            .await?;
        let plan = self.readable_plan(&scope)?;
        let opened = self.stores.get(plan.location).await?;
        let totals = opened
            .store
            .view_totals(
                &ViewScope::Space {
                    instance_id: instance.clone(),
                    space_id: space_id.clone(),
                },
                from,
                to,
            )
            .await?;
        let pages = opened
            .store
            .top_pages(&instance, &space_id, from, to, offset, limit)
            .await?;
        let next_page_token = next_offset_token(offset, pages.len(), limit);
        Ok(Response::new(pb::GetSpaceReportResponse {
            space_id,
            stats: Some(stats(totals)),
            top_pages: pages
                .into_iter()
                .map(|p: Ranked| pb::PageViews {
                    page_id: p.id,
                    views: count(p.views),
                    unique_viewers: count(p.unique_viewers),
                })
                .collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn get_global_report(
        &self,
        request: Request<pb::GetGlobalReportRequest>,
    ) -> GrpcResult<pb::GetGlobalReportResponse> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let (from, to) = day_range(r.range.as_ref())?;
        let offset = offset_token(&r.page_token)?;
        let limit = page_size(r.page_size, 50, 1_000);
        let scope = self
            .scope(caller, &r.org_id, &r.instance_id, true, false)
            .await?;
        let plan = self.readable_plan(&scope)?;
        if let Principal::Instance { .. } = scope.caller {
            // Groups are trusted only from an instance credential, which vouches for its reader.
            let group = &plan.tracking.global_report_group;
            if group.is_empty() || !r.reader_groups.iter().any(|g| g == group) {
                return Err(Status::permission_denied(
                    "reader_groups: the global report is for org admins and the configured group",
                ));
            }
        }
        let opened = self.stores.get(plan.location).await?;
        let totals = opened
            .store
            .view_totals(
                &ViewScope::Org {
                    org_id: scope.org_id.clone(),
                    instance_id: scope.instance_id.clone(),
                },
                from,
                to,
            )
            .await?;
        let spaces = opened
            .store
            .top_spaces(
                &scope.org_id,
                scope.instance_id.as_deref(),
                from,
                to,
                offset,
                limit,
            )
            .await?;
        let next_page_token = next_offset_token(offset, spaces.len(), limit);
        Ok(Response::new(pb::GetGlobalReportResponse {
            stats: Some(stats(totals)),
            top_spaces: spaces
                .into_iter()
                .map(|s| pb::SpaceViews {
                    space_id: s.id,
                    views: count(s.views),
                    unique_viewers: count(s.unique_viewers),
                    instance_id: s.instance_id,
                    unique_viewers_error: s.unique_error,
                })
                .collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn query_metrics(
        &self,
        request: Request<pb::QueryMetricsRequest>,
    ) -> GrpcResult<pb::QueryMetricsResponse> {
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let name = required("metric_name", &r.metric_name)?.to_owned();
        let (from, to) = required_range(r.range.as_ref(), MAX_RANGE_DAYS)?;
        let instance = ids::parse("instance_id", &r.instance_id)?;
        let mut after = cursor_token(&r.page_token)?;
        let limit = page_size(r.page_size, 500, 5_000);
        let resolution = match pb::Resolution::try_from(r.resolution) {
            Ok(pb::Resolution::Unspecified | pb::Resolution::Raw) => pb::Resolution::Raw,
            Ok(pb::Resolution::Hourly) => pb::Resolution::Hourly,
            Err(_) => {
                return Err(Status::invalid_argument(
                    "resolution: is not a known resolution",
                ));
            }
        };
        let scope = self
            .scope(caller, &r.org_id, &instance, false, true)
            .await?;
        let plan = self.readable_plan(&scope)?;
        let opened = self.stores.get(plan.location).await?;
        let wanted = &r.tags;
        let matches =
            |tags: &HashMap<String, String>| wanted.iter().all(|(k, v)| tags.get(k) == Some(v));
        let mut points = Vec::new();
        let mut next = String::new();
        // Tags are filtered after reading: read on until the page is full or the range is done.
        loop {
            match resolution {
                pb::Resolution::Hourly => {
                    let rows = opened
                        .store
                        .rollups(&instance, &name, from, to, after.clone(), limit)
                        .await?;
                    let exhausted = i64::try_from(rows.len()).unwrap_or(0) < limit;
                    for row in rows {
                        after = Some((row.hour, row.tags.clone()));
                        let tags: HashMap<String, String> =
                            serde_json::from_str(&row.tags).unwrap_or_default();
                        if !matches(&tags) {
                            continue;
                        }
                        points.push(pb::MetricPoint {
                            at: Some(to_proto(row.hour)),
                            count: count(row.count),
                            min: row.min,
                            max: row.max,
                            sum: row.sum,
                            p50: row.p50,
                            p95: row.p95,
                            consent_version: count(row.consent_version),
                            tags,
                            unit: row.unit,
                        });
                        if i64::try_from(points.len()).unwrap_or(i64::MAX) >= limit {
                            break;
                        }
                    }
                    if exhausted || i64::try_from(points.len()).unwrap_or(i64::MAX) >= limit {
                        if !exhausted && let Some((at, id)) = &after {
                            next = cursor(*at, id);
                        }
                        break;
                    }
                }
                _ => {
                    let rows = opened
                        .store
                        .samples(&instance, &name, from, to, after.clone(), limit)
                        .await?;
                    let exhausted = i64::try_from(rows.len()).unwrap_or(0) < limit;
                    for row in rows {
                        after = Some((row.occurred_at, row.event_id.clone()));
                        let Ok(event) = pb::Event::decode(row.body.as_slice()) else {
                            continue;
                        };
                        let Some(pb::event::Payload::Metric(metric)) = event.payload else {
                            continue;
                        };
                        if !matches(&metric.tags) {
                            continue;
                        }
                        points.push(pb::MetricPoint {
                            at: Some(to_proto(row.occurred_at)),
                            count: 1,
                            min: metric.value,
                            max: metric.value,
                            sum: metric.value,
                            p50: metric.value,
                            p95: metric.value,
                            consent_version: count(row.consent_version),
                            tags: metric.tags,
                            unit: metric.unit,
                        });
                        if i64::try_from(points.len()).unwrap_or(i64::MAX) >= limit {
                            break;
                        }
                    }
                    if exhausted || i64::try_from(points.len()).unwrap_or(i64::MAX) >= limit {
                        if !exhausted && let Some((at, id)) = &after {
                            next = cursor(*at, id);
                        }
                        break;
                    }
                }
            }
        }
        Ok(Response::new(pb::QueryMetricsResponse {
            points,
            next_page_token: next,
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn erase_viewer(
        &self,
        request: Request<pb::EraseViewerRequest>,
    ) -> GrpcResult<pb::EraseViewerResponse> {
        let deadline = Some(self.deadline(&request));
        let caller = self.caller(&request).await?;
        let r = request.get_ref();
        let viewer_id = required("viewer_id", &r.viewer_id)?.to_owned();
        let instance = ids::parse("instance_id", &r.instance_id)?;
        let scope = self
            .scope(caller, &r.org_id, &instance, false, false)
            .await?;
        let plan = self.readable_plan(&scope)?;
        let mut subjects = Vec::new();
        if let Some(pseudonym) = plan.subject_of(&viewer_id) {
            subjects.push(pseudonym);
        }
        if plan.action(Field::PageViewerId) == common::FieldAction::Keep {
            subjects.push(viewer_id);
        }
        let opened = self.stores.get(plan.location).await?;
        let store = crate::maintenance::erased_store_name(opened.store.as_ref());
        let (removed, erasure_ref) = self
            .maintenance
            .erase(
                opened.store.as_ref(),
                EraseSpec {
                    org_id: scope.org_id.clone(),
                    instance_id: instance,
                    subjects,
                    until: self.clock.now_ms(),
                },
                scope.caller.actor(),
                deadline,
            )
            .await?;
        Ok(Response::new(pb::EraseViewerResponse {
            page_views_deleted: count(removed.page_views),
            feature_usage_deleted: count(removed.feature_usage),
            dedupe_entries_deleted: count(removed.dedupe_entries),
            unique_viewer_entries_deleted: count(removed.unique_viewer_entries),
            stores: [
                ("page_views", removed.page_views),
                ("feature_usage", removed.feature_usage),
                ("dedupe_entries", removed.dedupe_entries),
                ("unique_viewer_entries", removed.unique_viewer_entries),
            ]
            .into_iter()
            .map(|(kind, n)| pb::ErasedCount {
                store: store.clone(),
                kind: kind.to_owned(),
                deleted: count(n),
            })
            .collect(),
            erasure_ref,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_contributed_aggregates(
        &self,
        request: Request<pb::GetContributedAggregatesRequest>,
    ) -> GrpcResult<pb::GetContributedAggregatesResponse> {
        let caller = self.caller(&request).await?;
        match caller {
            Principal::Operator | Principal::Service { .. } => {}
            _ => {
                return Err(Status::permission_denied(
                    "contributed aggregates are for the operator and services",
                ));
            }
        }
        let r = request.get_ref();
        let name = required("metric_name", &r.metric_name)?.to_owned();
        let (start, end) = required_range(r.range.as_ref(), MAX_RANGE_DAYS)?;
        let group_by = pb::AggregateGroupBy::try_from(r.group_by)
            .map_err(|_| Status::invalid_argument("group_by: is not a known grouping"))?;
        let interval = pb::AggregateInterval::try_from(r.interval)
            .map_err(|_| Status::invalid_argument("interval: is not a known interval"))?;
        let settings = self.aggregates;
        let release = if !r.add_noise && settings.exact_allowed {
            aggregates::Release::Exact
        } else {
            let epsilon = if r.epsilon == 0.0 {
                settings.default_epsilon
            } else {
                r.epsilon
            };
            if !(epsilon.is_finite() && epsilon > 0.0) {
                return Err(Status::invalid_argument(
                    "epsilon: must be a positive number (or 0 for the default)",
                ));
            }
            if epsilon > settings.epsilon_budget {
                return Err(Status::resource_exhausted(format!(
                    "epsilon: {epsilon} exceeds the per-org budget of {}",
                    settings.epsilon_budget
                )));
            }
            aggregates::Release::Private {
                epsilon,
                bound: settings.bound,
            }
        };
        if !self.policies.is_ready() {
            return Err(Status::unavailable("no current policy from consent-svc"));
        }
        let hour = 3_600_000;
        let from = start.div_euclid(hour) * hour;
        let mut per_org = std::collections::BTreeMap::new();
        for policy in self.policies.policies() {
            // Only orgs whose policy lets metrics feed cross-org statistics (compliance-restricted
            // orgs never do); a moving org's data is not read.
            if !aggregates::contributes(&policy, common::EventKind::Metric) || policy.moving {
                continue;
            }
            let opened = self.stores.get(policy.location()).await?;
            let rollups = opened
                .store
                .org_rollups(&policy.org_id, &name, from, end)
                .await?;
            if rollups.is_empty() {
                continue;
            }
            let products = match group_by {
                pb::AggregateGroupBy::None | pb::AggregateGroupBy::Unspecified => HashMap::new(),
                _ => aggregates::products(&opened.store.instance_metadata(&policy.org_id).await?),
            };
            let values = aggregates::org_values(&rollups, &products, group_by, interval, start);
            per_org.insert(policy.org_id.clone(), values);
        }
        let cells = aggregates::cells_per_org(group_by, interval, start, end);
        let computed = aggregates::combine(&name, &per_org, settings.min_orgs, release, cells);
        let mut spent = 0.0;
        if let aggregates::Release::Private { epsilon, .. } = release
            && !computed.contributors.is_empty()
        {
            let ledger = self.stores.get(common::Location::Global).await?;
            let orgs: Vec<String> = computed.contributors.iter().cloned().collect();
            let short = ledger
                .store
                .charge_epsilon(&orgs, epsilon, settings.epsilon_budget, self.clock.now_ms())
                .await?;
            if !short.is_empty() {
                // Which orgs is not said: that would tell who contributes.
                return Err(Status::resource_exhausted(
                    "epsilon: a contributing org's budget is spent; nothing was released",
                ));
            }
            spent = epsilon;
        }
        Ok(Response::new(pb::GetContributedAggregatesResponse {
            buckets: computed.buckets,
            min_orgs: settings.min_orgs.max(1),
            withheld_buckets: computed.withheld,
            epsilon_spent: spent,
            epsilon_per_bucket: computed.epsilon_per_cell,
        }))
    }
}

#[cfg(test)]
mod tests;
