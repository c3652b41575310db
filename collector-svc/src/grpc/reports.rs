//! CollectorService's page-view reports: a page's view count, and the page, space and global
//! reports over a day range.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn get_view_count(
    api: &CollectorApi,
    request: Request<pb::GetViewCountRequest>,
) -> GrpcResult<pb::GetViewCountResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.get_ref();
    let page_id = required("page_id", &r.page_id)?;
    let scope = api
        .scope(caller, &r.org_id, &r.instance_id, true, false)
        .await?;
    let instance_id = scope
        .instance_id
        .clone()
        .ok_or_else(|| Status::invalid_argument("instance_id: is required"))?;
    let plan = api.readable_plan(&scope)?;
    if !plan.tracking.view_counter_enabled {
        return Ok(Response::new(pb::GetViewCountResponse {
            views: 0,
            unique_viewers: 0,
            enabled: false,
        }));
    }
    let opened = api.stores.get(plan.location).await?;
    let (views, unique) = opened.store.view_count(&instance_id, page_id).await?;
    Ok(Response::new(pb::GetViewCountResponse {
        views: count(views),
        unique_viewers: count(unique),
        enabled: true,
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn get_page_report(
    api: &CollectorApi,
    request: Request<pb::GetPageReportRequest>,
) -> GrpcResult<pb::GetPageReportResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.get_ref();
    let page_id = required("page_id", &r.page_id)?.to_owned();
    let (from, to) = day_range(r.range.as_ref())?;
    let instance = ids::parse("instance_id", &r.instance_id)?;
    let scope = api
        .scope(caller, &r.org_id, &instance, false, false)
        .await?;
    let plan = api.readable_plan(&scope)?;
    let opened = api.stores.get(plan.location).await?;
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
pub(super) async fn get_space_report(
    api: &CollectorApi,
    request: Request<pb::GetSpaceReportRequest>,
) -> GrpcResult<pb::GetSpaceReportResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.get_ref();
    let space_id = required("space_id", &r.space_id)?.to_owned();
    let (from, to) = day_range(r.range.as_ref())?;
    let instance = ids::parse("instance_id", &r.instance_id)?;
    let offset = offset_token(&r.page_token)?;
    let limit = page_size(r.page_size, 50, 1_000);
    let scope = api
        .scope(caller, &r.org_id, &instance, false, false)
        .await?;
    let plan = api.readable_plan(&scope)?;
    let opened = api.stores.get(plan.location).await?;
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
pub(super) async fn get_global_report(
    api: &CollectorApi,
    request: Request<pb::GetGlobalReportRequest>,
) -> GrpcResult<pb::GetGlobalReportResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.get_ref();
    let (from, to) = day_range(r.range.as_ref())?;
    let offset = offset_token(&r.page_token)?;
    let limit = page_size(r.page_size, 50, 1_000);
    let scope = api
        .scope(caller, &r.org_id, &r.instance_id, true, false)
        .await?;
    let plan = api.readable_plan(&scope)?;
    if let Principal::Instance { .. } = scope.caller {
        // Groups are trusted only from an instance credential, which vouches for its reader.
        let group = &plan.tracking.global_report_group;
        if group.is_empty() || !r.reader_groups.iter().any(|g| g == group) {
            return Err(Status::permission_denied(
                "reader_groups: the global report is for org admins and the configured group",
            ));
        }
    }
    let opened = api.stores.get(plan.location).await?;
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
