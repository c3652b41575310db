//! InsightsService's portfolio: the org's instances with their latest scores, paged.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty))]
pub(super) async fn get_portfolio(
    api: &InsightsApi,
    request: Request<pb::GetPortfolioRequest>,
) -> GrpcResult<pb::GetPortfolioResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.get_ref();
    let org_id = ids::parse("org_id", &r.org_id)?;
    caller.require_admin_of(&org_id)?;
    sightline_runtime::telemetry::note_ids(&org_id, None);
    // At most MAX_PORTFOLIO_PAGE: the conversion cannot fail.
    let page_size = u32::try_from(sightline_runtime::paging::page_size(
        r.page_size,
        100,
        MAX_PORTFOLIO_PAGE,
    ))
    .unwrap_or(MAX_PORTFOLIO_PAGE);
    let mut list = Request::new(linker_pb::ListInstancesRequest {
        org_id: org_id.clone(),
        page_size,
        page_token: r.page_token.clone(),
        instance_id: String::new(),
    });
    authorize(&mut list, &api.service_token)?;
    let listed = LinkerServiceClient::new(api.linker.clone())
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
    let store = api.data_store(&org_id).await?;
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
