//! Hourly rollups read from collector-svc's QueryMetrics (with the service token): what the health
//! rules and trends are computed from. insights-svc keeps no copy of metrics.

use sightline_proto::collector::v1 as collector_pb;
use sightline_proto::collector::v1::collector_service_client::CollectorServiceClient;
use sightline_proto::common::v1 as common;
use sightline_runtime::auth::authorize;
use sightline_runtime::settings::Secret;
use sightline_runtime::time::{from_proto, to_proto};
use tonic::Status;
use tonic::transport::Channel;

use crate::health::{HOUR_MS, Hour, Series};
use crate::rules::Rules;

const PAGE: u32 = 5_000;
/// Pages one read follows at most (5,000 hours each: years of one metric's tag sets).
const MAX_PAGES: usize = 20;

#[derive(Debug, Clone)]
pub struct Rollups {
    collector: CollectorServiceClient<Channel>,
    token: Secret,
}

impl Rollups {
    pub fn new(collector: Channel, token: Secret) -> Self {
        Self {
            collector: CollectorServiceClient::new(collector),
            token,
        }
    }

    /// The hourly rollups of one metric (every tag set) within [from, to).
    pub async fn hours(
        &self,
        org_id: &str,
        instance_id: &str,
        metric: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<Hour>, Status> {
        let mut hours = Vec::new();
        let mut page_token = String::new();
        for _ in 0..MAX_PAGES {
            let mut request = tonic::Request::new(collector_pb::QueryMetricsRequest {
                org_id: org_id.to_owned(),
                instance_id: instance_id.to_owned(),
                metric_name: metric.to_owned(),
                range: Some(common::TimeRange {
                    start: Some(to_proto(from)),
                    end: Some(to_proto(to)),
                }),
                resolution: collector_pb::Resolution::Hourly as i32,
                page_size: PAGE,
                page_token: page_token.clone(),
                tags: Default::default(),
            });
            authorize(&mut request, &self.token)?;
            let reply = self
                .collector
                .clone()
                .query_metrics(request)
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                        Status::unavailable(format!("collector-svc: {}", s.message()))
                    }
                    _ => s,
                })?
                .into_inner();
            hours.extend(reply.points.iter().map(|p| Hour {
                hour_ms: p.at.as_ref().map_or(0, from_proto),
                count: p.count,
                min: p.min,
                max: p.max,
                sum: p.sum,
                p50: p.p50,
                p95: p.p95,
            }));
            if reply.next_page_token.is_empty() {
                break;
            }
            page_token = reply.next_page_token;
        }
        Ok(hours)
    }

    /// Every metric the rules read, over the longest window each is read over, ending with the
    /// hour of `now_ms`; the reads run together.
    pub async fn for_rules(
        &self,
        org_id: &str,
        instance_id: &str,
        rules: &Rules,
        now_ms: i64,
    ) -> Result<Series, Status> {
        let to = now_ms.div_euclid(HOUR_MS) * HOUR_MS + HOUR_MS;
        let reads = rules
            .metrics()
            .into_iter()
            .map(|(metric, hours)| async move {
                let from = to - i64::from(hours) * HOUR_MS;
                let read = self.hours(org_id, instance_id, &metric, from, to).await;
                read.map(|h| (metric, h))
            });
        let mut series = Series::new();
        for read in futures::future::join_all(reads).await {
            let (metric, hours) = read?;
            if !hours.is_empty() {
                series.insert(metric, hours);
            }
        }
        Ok(series)
    }
}
