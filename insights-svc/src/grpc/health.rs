//! InsightsService's health: the current score, its trends over a range, and the score history.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn get_health(
    api: &InsightsApi,
    request: Request<pb::GetHealthRequest>,
) -> GrpcResult<pb::GetHealthResponse> {
    let r = request.get_ref();
    let (org_id, instance_id) = api
        .instance_read(&request, &r.org_id, &r.instance_id)
        .await?;
    let health = api.health_of(&org_id, &instance_id).await?;
    Ok(Response::new(pb::GetHealthResponse {
        health: Some(health),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn get_trends(
    api: &InsightsApi,
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
    let (org_id, instance_id) = api
        .instance_read(&request, &r.org_id, &r.instance_id)
        .await?;
    let hours = api
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
pub(super) async fn get_score_history(
    api: &InsightsApi,
    request: Request<pb::GetScoreHistoryRequest>,
) -> GrpcResult<pb::GetScoreHistoryResponse> {
    let r = request.get_ref();
    let (from, to) = required_range(r.range.as_ref(), MAX_RANGE_DAYS)?;
    let (org_id, instance_id) = api
        .instance_read(&request, &r.org_id, &r.instance_id)
        .await?;
    let points = api
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
