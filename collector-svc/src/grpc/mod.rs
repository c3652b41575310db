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

use crate::enforce::{DAY_MS, Plan};
use crate::fields::Field;
use crate::ingest::{Discard, Processed};
use crate::locations::{Stores, location_name};
use crate::maintenance::Maintenance;
use crate::policy_cache::Policies;
use crate::store::{EraseSpec, Ranked, ViewScope, ViewTotals};

mod aggregates;
mod erasure;
mod ingest;
mod metrics;
mod reports;

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
            return Err(crate::ingest::moving(&plan).into());
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
                crate::ingest::check_batch(&events)?;
                return Err(status.into());
            }
        };
        if plan.moving {
            crate::ingest::check_batch(&events)?;
            return Err(crate::ingest::moving(&plan).into());
        }
        let opened = self.stores.get(plan.location).await?;
        let sink: &dyn crate::ingest::Sink = if self.discard {
            &Discard
        } else {
            &opened.writer
        };
        crate::ingest::process(
            &plan,
            instance_id,
            &location_name(plan.location),
            events,
            self.clock.now_ms(),
            sink,
            false,
        )
        .await
        .map_err(Status::from)
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

use sightline_runtime::paging::page_size;

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

pub use sightline_runtime::time::day_text;

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
    async fn ingest(&self, request: Request<pb::IngestRequest>) -> GrpcResult<pb::IngestResponse> {
        ingest::ingest(self, request).await
    }

    type IngestStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::IngestStreamResponse, Status>> + Send>>;

    async fn ingest_stream(
        &self,
        request: Request<Streaming<pb::IngestStreamRequest>>,
    ) -> GrpcResult<Self::IngestStreamStream> {
        ingest::ingest_stream(self, request).await
    }

    async fn preview_sample(
        &self,
        request: Request<pb::PreviewSampleRequest>,
    ) -> GrpcResult<pb::PreviewSampleResponse> {
        ingest::preview_sample(self, request).await
    }

    async fn get_view_count(
        &self,
        request: Request<pb::GetViewCountRequest>,
    ) -> GrpcResult<pb::GetViewCountResponse> {
        reports::get_view_count(self, request).await
    }

    async fn get_page_report(
        &self,
        request: Request<pb::GetPageReportRequest>,
    ) -> GrpcResult<pb::GetPageReportResponse> {
        reports::get_page_report(self, request).await
    }

    async fn get_space_report(
        &self,
        request: Request<pb::GetSpaceReportRequest>,
    ) -> GrpcResult<pb::GetSpaceReportResponse> {
        reports::get_space_report(self, request).await
    }

    async fn get_global_report(
        &self,
        request: Request<pb::GetGlobalReportRequest>,
    ) -> GrpcResult<pb::GetGlobalReportResponse> {
        reports::get_global_report(self, request).await
    }

    async fn query_metrics(
        &self,
        request: Request<pb::QueryMetricsRequest>,
    ) -> GrpcResult<pb::QueryMetricsResponse> {
        metrics::query_metrics(self, request).await
    }

    async fn list_stored_events(
        &self,
        request: Request<pb::ListStoredEventsRequest>,
    ) -> GrpcResult<pb::ListStoredEventsResponse> {
        metrics::list_stored_events(self, request).await
    }

    async fn erase_viewer(
        &self,
        request: Request<pb::EraseViewerRequest>,
    ) -> GrpcResult<pb::EraseViewerResponse> {
        erasure::erase_viewer(self, request).await
    }

    async fn get_contributed_aggregates(
        &self,
        request: Request<pb::GetContributedAggregatesRequest>,
    ) -> GrpcResult<pb::GetContributedAggregatesResponse> {
        aggregates::get_contributed_aggregates(self, request).await
    }
}

#[cfg(test)]
mod tests;
