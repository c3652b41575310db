//! CollectorService's contributed aggregates: what the org shares with the vendor under its
//! sharing level, noised and charged against its privacy budget.

use super::*;
use sightline_runtime::policy_stream::PolicyFollower as _;

#[tracing::instrument(skip_all)]
pub(super) async fn get_contributed_aggregates(
    api: &CollectorApi,
    request: Request<pb::GetContributedAggregatesRequest>,
) -> GrpcResult<pb::GetContributedAggregatesResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    match caller {
        Principal::Operator | Principal::Service { .. } => {}
        _ => {
            return Err(Status::permission_denied(
                "contributed aggregates are for the operator and services",
            ));
        }
    }
    let r = request.get_ref();
    let name = required("metric_name", &r.metric_name)?.to_owned();
    let (start, end) = required_range(r.range.as_ref(), MAX_RANGE_DAYS)?;
    let group_by = pb::AggregateGroupBy::try_from(r.group_by)
        .map_err(|_| Status::invalid_argument("group_by: is not a known grouping"))?;
    let interval = pb::AggregateInterval::try_from(r.interval)
        .map_err(|_| Status::invalid_argument("interval: is not a known interval"))?;
    let settings = api.aggregates;
    let release = if !r.add_noise && settings.exact_allowed {
        crate::aggregates::Release::Exact
    } else {
        let epsilon = if r.epsilon == 0.0 {
            settings.default_epsilon
        } else {
            r.epsilon
        };
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(Status::invalid_argument(
                "epsilon: must be a positive number (or 0 for the default)",
            ));
        }
        if epsilon > settings.epsilon_budget {
            return Err(Status::resource_exhausted(format!(
                "epsilon: {epsilon} exceeds the per-org budget of {}",
                settings.epsilon_budget
            )));
        }
        crate::aggregates::Release::Private {
            epsilon,
            bound: settings.bound,
        }
    };
    if !api.policies.is_ready() {
        return Err(Status::unavailable("no current policy from consent-svc"));
    }
    let hour = 3_600_000;
    let from = start.div_euclid(hour) * hour;
    let mut per_org = std::collections::BTreeMap::new();
    for policy in api.policies.policies() {
        // Only orgs whose policy lets metrics feed cross-org statistics (compliance-restricted
        // orgs never do); a moving org's data is not read.
        if !crate::aggregates::contributes(&policy, common::EventKind::Metric) || policy.moving {
            continue;
        }
        let opened = api.stores.get(policy.location()).await?;
        let rollups = opened
            .store
            .org_rollups(&policy.org_id, &name, from, end)
            .await?;
        if rollups.is_empty() {
            continue;
        }
        let products = match group_by {
            pb::AggregateGroupBy::None | pb::AggregateGroupBy::Unspecified => HashMap::new(),
            _ => {
                crate::aggregates::products(&opened.store.instance_metadata(&policy.org_id).await?)
            }
        };
        let values = crate::aggregates::org_values(&rollups, &products, group_by, interval, start);
        per_org.insert(policy.org_id.clone(), values);
    }
    let cells = crate::aggregates::cells_per_org(group_by, interval, start, end);
    let computed = crate::aggregates::combine(&name, &per_org, settings.min_orgs, release, cells);
    let mut spent = 0.0;
    if let crate::aggregates::Release::Private { epsilon, .. } = release
        && !computed.contributors.is_empty()
    {
        let ledger = api.stores.get(common::Location::Global).await?;
        let orgs: Vec<String> = computed.contributors.iter().cloned().collect();
        let short = ledger
            .store
            .charge_epsilon(&orgs, epsilon, settings.epsilon_budget, api.clock.now_ms())
            .await?;
        if !short.is_empty() {
            // Which orgs is not said: that would tell who contributes.
            return Err(Status::resource_exhausted(
                "epsilon: a contributing org's budget is spent; nothing was released",
            ));
        }
        spent = epsilon;
    }
    Ok(Response::new(pb::GetContributedAggregatesResponse {
        buckets: computed.buckets,
        min_orgs: settings.min_orgs.max(1),
        withheld_buckets: computed.withheld,
        epsilon_spent: spent,
        epsilon_per_bucket: computed.epsilon_per_cell,
    }))
}
