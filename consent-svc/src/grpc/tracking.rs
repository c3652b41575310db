//! ConsentService's page-view tracking settings (channels, exclusions, blocking time).

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn get_tracking_settings(
    api: &ConsentApi,
    request: Request<pb::GetTrackingSettingsRequest>,
) -> GrpcResult<pb::GetTrackingSettingsResponse> {
    let (_, org_id) = api.reader(&request, &request.get_ref().org_id).await?;
    Ok(Response::new(pb::GetTrackingSettingsResponse {
        settings: Some(api.tracking(&org_id).await?.to_pb()),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn update_tracking_settings(
    api: &ConsentApi,
    request: Request<pb::UpdateTrackingSettingsRequest>,
) -> GrpcResult<pb::UpdateTrackingSettingsResponse> {
    let deadline = Some(api.deadline(&request));
    let (caller, org_id) = api.admin(&request, &request.get_ref().org_id).await?;
    let tracking = Tracking::parse(request.get_ref().settings.as_ref())?;
    let turn = api.lock(&org_id).await?;
    let record = TrackingRecord {
        org_id: org_id.clone(),
        enabled_channels: tracking
            .channels
            .iter()
            .map(|c| (*c as i32).to_string())
            .collect::<Vec<_>>()
            .join(","),
        exclude_anonymous: tracking.exclude_anonymous,
        excluded_groups: serde_json::to_string(&tracking.excluded_groups)
            .unwrap_or_else(|_| "[]".into()),
        blocking_time_ms: i64::try_from(tracking.blocking_time_ms).unwrap_or(0),
        view_counter_enabled: tracking.view_counter_enabled,
        global_report_group: tracking.global_report_group.clone(),
        updated_at: api.clock.now_ms(),
    };
    let mut entry = api.entry(&org_id, &caller, "tracking.updated", org_id.clone());
    entry
        .attributes
        .insert("channels".into(), record.enabled_channels.clone());
    entry.attributes.insert(
        "blocking_time_ms".into(),
        tracking.blocking_time_ms.to_string(),
    );
    api.commit(
        turn,
        Change::Tracking(record),
        None,
        entry,
        Vec::new(),
        deadline,
    )
    .await?;
    tracing::info!(%org_id, "tracking settings updated");

    Ok(Response::new(pb::UpdateTrackingSettingsResponse {
        settings: Some(tracking.to_pb()),
    }))
}
