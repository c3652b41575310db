//! CollectorService's QueryMetrics: samples or hourly rollups of one metric, paged by cursor.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn query_metrics(
    api: &CollectorApi,
    request: Request<pb::QueryMetricsRequest>,
) -> GrpcResult<pb::QueryMetricsResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
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
    let scope = api.scope(caller, &r.org_id, &instance, false, true).await?;
    let plan = api.readable_plan(&scope)?;
    let opened = api.stores.get(plan.location).await?;
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
