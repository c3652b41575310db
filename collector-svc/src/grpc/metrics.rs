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
        // Each row read: where the cursor moves to, and its point if its tags match.
        let read: Vec<((i64, String), Option<pb::MetricPoint>)> = match resolution {
            pb::Resolution::Hourly => opened
                .store
                .rollups(&instance, &name, from, to, after.clone(), limit)
                .await?
                .into_iter()
                .map(|row| {
                    let tags: HashMap<String, String> =
                        serde_json::from_str(&row.tags).unwrap_or_default();
                    let point = matches(&tags).then(|| pb::MetricPoint {
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
                    ((row.hour, row.tags), point)
                })
                .collect(),
            _ => opened
                .store
                .samples(&instance, &name, from, to, after.clone(), limit)
                .await?
                .into_iter()
                .map(|row| {
                    let metric = match pb::Event::decode(row.body.as_slice()) {
                        Ok(pb::Event {
                            payload: Some(pb::event::Payload::Metric(metric)),
                            ..
                        }) => Some(metric).filter(|m| matches(&m.tags)),
                        _ => None,
                    };
                    let point = metric.map(|metric| pb::MetricPoint {
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
                    ((row.occurred_at, row.event_id), point)
                })
                .collect(),
        };
        let exhausted = i64::try_from(read.len()).unwrap_or(0) < limit;
        let full = |points: &Vec<pb::MetricPoint>| {
            i64::try_from(points.len()).unwrap_or(i64::MAX) >= limit
        };
        for (position, point) in read {
            after = Some(position);
            points.extend(point);
            if full(&points) {
                break;
            }
        }
        if exhausted || full(&points) {
            if !exhausted && let Some((at, id)) = &after {
                next = cursor(*at, id);
            }
            break;
        }
    }
    Ok(Response::new(pb::QueryMetricsResponse {
        points,
        next_page_token: next,
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn list_stored_events(
    api: &CollectorApi,
    request: Request<pb::ListStoredEventsRequest>,
) -> GrpcResult<pb::ListStoredEventsResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.get_ref();
    let limit = page_size(r.page_size, 20, 100);
    let scope = api
        .scope(caller, &r.org_id, &r.instance_id, false, false)
        .await?;
    let plan = api.readable_plan(&scope)?;
    let opened = api.stores.get(plan.location).await?;
    let rows = opened
        .store
        .recent_events(&scope.org_id, scope.instance_id.as_deref(), limit)
        .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let event = pb::Event::decode(row.body.as_slice())
            .map_err(|_| Status::internal("a stored event does not decode"))?;
        events.push(pb::StoredEvent {
            instance_id: row.instance_id,
            event: Some(event),
            stored_at: Some(to_proto(row.stored_at)),
            consent_version: count(row.consent_version),
        });
    }
    Ok(Response::new(pb::ListStoredEventsResponse { events }))
}
