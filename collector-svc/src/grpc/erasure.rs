//! CollectorService's EraseViewer: a subject's page views and viewer entries removed, audited.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn erase_viewer(
    api: &CollectorApi,
    request: Request<pb::EraseViewerRequest>,
) -> GrpcResult<pb::EraseViewerResponse> {
    let deadline = Some(api.deadline(&request));
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.get_ref();
    let viewer_id = required("viewer_id", &r.viewer_id)?.to_owned();
    let instance = ids::parse("instance_id", &r.instance_id)?;
    let scope = api
        .scope(caller, &r.org_id, &instance, false, false)
        .await?;
    let plan = api.readable_plan(&scope)?;
    let mut subjects = Vec::new();
    if let Some(pseudonym) = plan.subject_of(&viewer_id) {
        subjects.push(pseudonym);
    }
    if plan.action(Field::PageViewerId) == common::FieldAction::Keep {
        subjects.push(viewer_id);
    }
    let opened = api.stores.get(plan.location).await?;
    let store = crate::maintenance::erased_store_name(opened.store.as_ref());
    let (removed, erasure_ref) = api
        .maintenance
        .erase(
            opened.store.as_ref(),
            EraseSpec {
                org_id: scope.org_id.clone(),
                instance_id: instance,
                subjects,
                until: api.clock.now_ms(),
            },
            scope.caller.actor(),
            deadline,
        )
        .await?;
    Ok(Response::new(pb::EraseViewerResponse {
        page_views_deleted: count(removed.page_views),
        feature_usage_deleted: count(removed.feature_usage),
        dedupe_entries_deleted: count(removed.dedupe_entries),
        unique_viewer_entries_deleted: count(removed.unique_viewer_entries),
        stores: [
            ("page_views", removed.page_views),
            ("feature_usage", removed.feature_usage),
            ("dedupe_entries", removed.dedupe_entries),
            ("unique_viewer_entries", removed.unique_viewer_entries),
        ]
        .into_iter()
        .map(|(kind, n)| pb::ErasedCount {
            store: store.clone(),
            kind: kind.to_owned(),
            deleted: count(n),
        })
        .collect(),
        erasure_ref,
    }))
}
