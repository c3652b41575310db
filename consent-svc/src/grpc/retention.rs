//! ConsentService's retention settings per org.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn get_retention(
    api: &ConsentApi,
    request: Request<pb::GetRetentionRequest>,
) -> GrpcResult<pb::GetRetentionResponse> {
    let (_, org_id) = api.reader(&request, &request.get_ref().org_id).await?;
    Ok(Response::new(pb::GetRetentionResponse {
        retention: Some(api.retention(&org_id).await?.to_pb()),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn update_retention(
    api: &ConsentApi,
    request: Request<pb::UpdateRetentionRequest>,
) -> GrpcResult<pb::UpdateRetentionResponse> {
    let deadline = Some(api.deadline(&request));
    let (caller, org_id) = api.admin(&request, &request.get_ref().org_id).await?;
    let retention = Retention::parse(request.get_ref().retention.as_ref())?;
    let turn = api.lock(&org_id).await?;
    let mut entry = api.entry(&org_id, &caller, "retention.updated", org_id.clone());
    entry
        .attributes
        .insert("raw_days".into(), retention.raw_days.to_string());
    entry.attributes.insert(
        "assessment_days".into(),
        retention.assessment_days.to_string(),
    );
    entry.attributes.insert(
        "aggregate_days".into(),
        retention.aggregate_days.to_string(),
    );
    api.commit(
        turn,
        Change::Retention(RetentionRecord {
            org_id: org_id.clone(),
            raw_days: i64::from(retention.raw_days),
            assessment_days: i64::from(retention.assessment_days),
            aggregate_days: i64::from(retention.aggregate_days),
            updated_at: api.clock.now_ms(),
            score_history_days: i64::from(retention.score_history_days),
            support_bundle_days: i64::from(retention.support_bundle_days),
            event_id_days: i64::from(retention.event_id_days),
        }),
        None,
        entry,
        Vec::new(),
        deadline,
    )
    .await?;
    tracing::info!(%org_id, "retention updated");

    Ok(Response::new(pb::UpdateRetentionResponse {
        retention: Some(retention.to_pb()),
    }))
}
