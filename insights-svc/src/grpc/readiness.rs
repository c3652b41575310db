//! InsightsService's cloud readiness: running an assessment against the rules and reading the
//! latest result.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn run_readiness_assessment(
    api: &InsightsApi,
    request: Request<pb::RunReadinessAssessmentRequest>,
) -> GrpcResult<pb::RunReadinessAssessmentResponse> {
    let r = request.get_ref();
    let (org_id, instance_id) = api
        .instance_read(&request, &r.org_id, &r.instance_id)
        .await?;
    let policy = api
        .policies
        .policy(&org_id, Some(&instance_id))?
        .filter(|p| p.usage_level() != UsageLevel::Disabled)
        .ok_or_else(|| {
            Status::failed_precondition("the instance's consent is DISABLED: nothing to assess")
        })?;
    let rules = FieldRules::of(&policy);
    let keys = api.pseudonyms(&policy);
    let store = api.data_store_for_write(&policy).await?;
    let (assessment, source) = match store.latest_assessment(&org_id, &instance_id).await? {
        Some(stored) => {
            // Treated again under today's policy: a lowered level shows less at once.
            let dynamic = prost_reflect::DynamicMessage::decode(
                upload::assessment_descriptor()?,
                stored.body.as_slice(),
            )
            .map_err(|e| Status::internal(format!("a stored assessment does not decode: {e}")))?;
            let (assessment, _) =
                enforce::assessment(dynamic, &rules, keys.as_ref()).map_err(Status::internal)?;
            (assessment, pb::DataSource::Upload)
        }
        None => {
            let now = api.clock.now_ms();
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
                let hours = api
                    .rollups
                    .hours(
                        &org_id,
                        &instance_id,
                        &metric,
                        now - 48 * HOUR_MS,
                        now + HOUR_MS,
                    )
                    .await?;
                if let Some(value) = crate::health::observe(
                    crate::rules::Aggregation::Last,
                    &hours,
                    now - 48 * HOUR_MS,
                    now + HOUR_MS,
                ) {
                    latest.insert(metric, value);
                }
            }
            let counts = crate::readiness::counts_from_guardrails(&latest).ok_or_else(|| {
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
    let report = api
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
pub(super) async fn get_readiness(
    api: &InsightsApi,
    request: Request<pb::GetReadinessRequest>,
) -> GrpcResult<pb::GetReadinessResponse> {
    let r = request.get_ref();
    let (org_id, instance_id) = api
        .instance_read(&request, &r.org_id, &r.instance_id)
        .await?;
    let stored = api
        .data_store(&org_id)
        .await?
        .readiness(&org_id, &instance_id)
        .await?
        .ok_or_else(|| Status::not_found("no readiness report was made for this instance yet"))?;
    let report = pb::ReadinessReport::decode(stored.report.as_slice())
        .map_err(|e| Status::internal(format!("a stored report does not decode: {e}")))?;
    Ok(Response::new(pb::GetReadinessResponse {
        report: Some(report),
    }))
}
