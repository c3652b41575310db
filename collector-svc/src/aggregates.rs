//! Contributed aggregates (SPEC E7): cross-org statistics of a metric from the hourly rollups of orgs
//! whose current policy lets the metric kind feed them (contribution after compliance restriction,
//! and only what the org collects: a DISABLED org contributes nothing, whatever its flags), never a
//! cell from fewer than k orgs, and differentially private by default.
//!
//! Each org contributes one value per cell — the mean of its samples in the cell (its rollups' sum
//! over their count) — so a large org weighs as much as a small one and k counts orgs. An org is in
//! at most one cell per time bucket and group, and in at most [`MAX_GROUPS_PER_ORG`] groups, so a
//! query of `L` time buckets touches each org in at most `L · G` cells; the call's ε is split
//! evenly over those cells, and each cell's ε four ways:
//!
//! - the org count gets Laplace noise of scale 1/ε₄ (one org changes it by 1), and a cell is shown
//!   only when the *noised* count reaches k, so whether a cell appears does not say whether one
//!   more org is in it;
//! - each org's value is clipped to [0, B] (`collection.aggregate_bound`), and the sum of the
//!   values gets Laplace noise of scale B/ε₄; the mean is the noised sum over the noised count;
//! - p50 and p95 are drawn by the exponential mechanism over [0, B] (utility: minus the distance of
//!   a point's rank from the quantile's rank), ε₄ each.
//!
//! Every org with a value in any cell of the query is charged the call's ε in its ledger, shown
//! cells or not. Two overlapping groupings (a 6-org cell and a 5-org cell) therefore cannot be
//! subtracted to recover one org's value beyond what the noise allows. Without noise
//! (`collection.exact_aggregates_reveal_orgs`, off by default) the figures are exact, and such a
//! subtraction gives one org's exact value: the setting's name says what it gives up.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;
use sightline_proto::collector::v1 as pb;
use sightline_proto::common::v1::EventKind;
use sightline_runtime::time::to_proto;

use crate::enforce::DAY_MS;

/// A cell: (group value, bucket start).
type Cell = (String, i64);

/// The most groups one org's values feed in one query (PRODUCT or PRODUCT_VERSION).
pub const MAX_GROUPS_PER_ORG: usize = 4;

/// How a release is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Release {
    /// Exact figures (`collection.exact_aggregates_reveal_orgs`): overlapping cells can be
    /// subtracted to recover one org's value.
    Exact,
    /// Differentially private: `epsilon` for the whole call, values clipped to [0, `bound`].
    Private { epsilon: f64, bound: f64 },
}

/// How many cells one org can be in for a query: time buckets in the range times the groups an
/// org may feed (public: it depends on the query only).
pub fn cells_per_org(
    group_by: pb::AggregateGroupBy,
    interval: pb::AggregateInterval,
    start: i64,
    end: i64,
) -> u32 {
    let hour = 3_600_000;
    let mut buckets = BTreeSet::new();
    let mut at = start.div_euclid(hour) * hour;
    while at < end {
        buckets.insert(bucket(interval, start, at));
        at += hour;
    }
    let groups = match group_by {
        pb::AggregateGroupBy::None | pb::AggregateGroupBy::Unspecified => 1,
        _ => MAX_GROUPS_PER_ORG,
    };
    u32::try_from(buckets.len().max(1) * groups).unwrap_or(u32::MAX)
}

/// The bucket of `hour` for `interval`, given the range start.
pub fn bucket(interval: pb::AggregateInterval, range_start: i64, hour: i64) -> i64 {
    match interval {
        pb::AggregateInterval::Day => hour.div_euclid(DAY_MS) * DAY_MS,
        pb::AggregateInterval::Week => {
            let day = hour.div_euclid(DAY_MS);
            // 1970-01-01 was a Thursday: Monday is 3 days before it.
            (day - (day + 3).rem_euclid(7)) * DAY_MS
        }
        pb::AggregateInterval::Total | pb::AggregateInterval::Unspecified => range_start,
    }
}

/// The group value of an instance: "" (NONE), its product, or product and version.
pub fn group_of(group_by: pb::AggregateGroupBy, product: &str, version: &str) -> String {
    match group_by {
        pb::AggregateGroupBy::Product => product.to_owned(),
        pb::AggregateGroupBy::ProductVersion => format!("{product} {version}"),
        pb::AggregateGroupBy::None | pb::AggregateGroupBy::Unspecified => String::new(),
    }
}

/// Each instance's latest product and version, from its stored metadata events (newest first).
pub fn products(metadata: &[(String, Vec<u8>)]) -> HashMap<String, (String, String)> {
    let mut products = HashMap::new();
    for (instance, body) in metadata {
        if products.contains_key(instance) {
            continue;
        }
        if let Ok(event) = pb::Event::decode(body.as_slice())
            && let Some(pb::event::Payload::InstanceMetadata(m)) = event.payload
            && let Some(meta) = m.metadata
        {
            products.insert(instance.clone(), (meta.product, meta.version));
        }
    }
    products
}

/// Whether an org's current policy lets `kind` feed cross-org statistics: the org collects the
/// kind and contributes it.
pub fn contributes(policy: &sightline_proto::consent::v1::Policy, kind: EventKind) -> bool {
    policy.allowed_kinds().any(|k| k == kind)
        && policy
            .contribute_metadata_kinds()
            .chain(policy.contribute_in_app_data_kinds())
            .any(|k| k == kind)
}

/// One org's values per cell from its rollups: Σsum / Σcount.
pub fn org_values(
    rollups: &[(String, i64, i64, f64)],
    products: &HashMap<String, (String, String)>,
    group_by: pb::AggregateGroupBy,
    interval: pb::AggregateInterval,
    range_start: i64,
) -> BTreeMap<Cell, f64> {
    let mut sums: BTreeMap<Cell, (i64, f64)> = BTreeMap::new();
    for (instance, hour, count, sum) in rollups {
        let group = match group_by {
            pb::AggregateGroupBy::None | pb::AggregateGroupBy::Unspecified => String::new(),
            _ => match products.get(instance) {
                Some((product, version)) if !product.is_empty() => {
                    group_of(group_by, product, version)
                }
                // An instance that never said what it is cannot be grouped.
                _ => continue,
            },
        };
        let entry = sums
            .entry((group, bucket(interval, range_start, *hour)))
            .or_default();
        entry.0 += count;
        entry.1 += sum;
    }
    // At most MAX_GROUPS_PER_ORG groups per org (the first by name): each org's cells per time
    // bucket are bounded, which bounds what one org can change in a release.
    let groups: BTreeSet<&String> = sums.keys().map(|(group, _)| group).collect();
    let kept: BTreeSet<String> = groups
        .into_iter()
        .take(MAX_GROUPS_PER_ORG)
        .cloned()
        .collect();
    sums.into_iter()
        .filter(|((group, _), (count, _))| *count > 0 && kept.contains(group))
        .map(|(cell, (count, sum))| {
            #[allow(clippy::cast_precision_loss)]
            let mean = sum / count as f64;
            (cell, mean)
        })
        .collect()
}

/// Laplace noise of scale `b`.
fn laplace(b: f64) -> f64 {
    let u: f64 = rand::random::<f64>() - 0.5;
    -b * u.signum() * (1.0 - 2.0 * u.abs()).max(f64::MIN_POSITIVE).ln()
}

/// The `q` quantile of `sorted` (clipped to [0, `bound`]) by the exponential mechanism: the gap
/// between two neighbouring values (and the ends, 0 and `bound`) holding rank `i` is chosen with
/// weight `length · exp(−ε·|i − q·n| / 2)`, then a point in it uniformly.
fn private_quantile(sorted: &[f64], q: f64, epsilon: f64, bound: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let target = q * sorted.len() as f64;
    let mut edges = Vec::with_capacity(sorted.len() + 2);
    edges.push(0.0);
    edges.extend(sorted.iter().map(|v| v.clamp(0.0, bound)));
    edges.push(bound);
    let logs: Vec<(f64, f64, f64)> = edges
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] > w[0])
        .map(|(i, w)| {
            #[allow(clippy::cast_precision_loss)]
            let utility = -(i as f64 - target).abs();
            ((w[1] - w[0]).ln() + epsilon * utility / 2.0, w[0], w[1])
        })
        .collect();
    let Some(max) = logs.iter().map(|(l, _, _)| *l).reduce(f64::max) else {
        return 0.0;
    };
    let total: f64 = logs.iter().map(|(l, _, _)| (l - max).exp()).sum();
    let mut pick = rand::random::<f64>() * total;
    for (log, low, high) in &logs {
        let weight = (log - max).exp();
        if pick <= weight {
            return low + rand::random::<f64>() * (high - low);
        }
        pick -= weight;
    }
    logs.last().map_or(0.0, |(_, low, high)| (low + high) / 2.0)
}

/// The cells shown and how many were withheld, from every contributing org's values.
#[derive(Debug)]
pub struct Computed {
    pub buckets: Vec<pb::AggregateBucket>,
    pub withheld: u32,
    /// Orgs with a value in any cell, shown or not (each is charged the call's ε when private).
    pub contributors: BTreeSet<String>,
    /// The ε each cell was released with (0 when exact).
    pub epsilon_per_cell: f64,
}

/// Combines org values into cells by `release`; `cells_per_org` is [`cells_per_org`]'s bound.
pub fn combine(
    metric: &str,
    per_org: &BTreeMap<String, BTreeMap<Cell, f64>>,
    min_orgs: u32,
    release: Release,
    cells_per_org: u32,
) -> Computed {
    let mut cells: BTreeMap<Cell, Vec<f64>> = BTreeMap::new();
    let mut contributors = BTreeSet::new();
    for (org, values) in per_org {
        for (cell, value) in values {
            cells.entry(cell.clone()).or_default().push(*value);
            contributors.insert(org.clone());
        }
    }
    let epsilon_per_cell = match release {
        Release::Exact => 0.0,
        Release::Private { epsilon, .. } => epsilon / f64::from(cells_per_org.max(1)),
    };
    let mut computed = Computed {
        buckets: Vec::new(),
        withheld: 0,
        contributors,
        epsilon_per_cell,
    };
    let k = f64::from(min_orgs.max(1));
    for ((group, start), mut values) in cells {
        #[allow(clippy::cast_precision_loss)]
        let n = values.len() as f64;
        let figures = match release {
            Release::Exact => {
                if n < k {
                    None
                } else {
                    values.sort_by(f64::total_cmp);
                    let mean = values.iter().sum::<f64>() / n;
                    Some((
                        n,
                        mean,
                        crate::maintenance::quantile(&values, 0.5),
                        crate::maintenance::quantile(&values, 0.95),
                        0.0,
                    ))
                }
            }
            Release::Private { bound, .. } => {
                let each = epsilon_per_cell / 4.0;
                let count = n + laplace(1.0 / each);
                if count < k {
                    None
                } else {
                    for v in &mut values {
                        *v = v.clamp(0.0, bound);
                    }
                    values.sort_by(f64::total_cmp);
                    let sum = values.iter().sum::<f64>() + laplace(bound / each);
                    let mean = (sum / count).clamp(0.0, bound);
                    let p50 = private_quantile(&values, 0.5, each, bound);
                    let p95 = private_quantile(&values, 0.95, each, bound);
                    Some((count, mean, p50, p95, bound / (each * count)))
                }
            }
        };
        let Some((count, mean, p50, p95, noise_scale)) = figures else {
            computed.withheld += 1;
            continue;
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let org_count = count.round().max(0.0) as u32;
        computed.buckets.push(pb::AggregateBucket {
            metric_name: metric.to_owned(),
            bucket: group,
            org_count,
            mean,
            p50,
            p95,
            noised: release != Release::Exact,
            bucket_start: Some(to_proto(start)),
            noise_scale,
        });
    }
    computed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weeks_start_on_monday_and_days_at_midnight() {
        // 2026-11-22 is a Sunday; its week started Monday 2026-11-16.
        let sunday_noon = 20_779 * DAY_MS + 12 * 3_600_000;
        assert_eq!(
            bucket(pb::AggregateInterval::Week, 0, sunday_noon),
            20_773 * DAY_MS
        );
        assert_eq!(
            bucket(pb::AggregateInterval::Day, 0, sunday_noon),
            20_779 * DAY_MS
        );
        assert_eq!(bucket(pb::AggregateInterval::Total, 5, sunday_noon), 5);
    }

    #[test]
    fn a_cell_needs_k_orgs_and_each_org_counts_once() {
        let mut per_org = BTreeMap::new();
        for (i, value) in [10.0, 20.0, 30.0, 40.0].iter().enumerate() {
            per_org.insert(
                format!("org{i}"),
                BTreeMap::from([((String::new(), 0), *value)]),
            );
        }
        let four = combine("m", &per_org, 5, Release::Exact, 1);
        assert_eq!((four.buckets.len(), four.withheld), (0, 1));
        per_org.insert("org4".into(), BTreeMap::from([((String::new(), 0), 50.0)]));
        let five = combine("m", &per_org, 5, Release::Exact, 1);
        assert_eq!(five.buckets.len(), 1);
        let cell = &five.buckets[0];
        assert_eq!(
            (cell.org_count, cell.mean, cell.p50, cell.p95),
            (5, 30.0, 30.0, 50.0)
        );
        assert_eq!(five.contributors.len(), 5);
    }

    #[test]
    fn noise_has_the_documented_scale() {
        let draws: Vec<f64> = (0..20_000).map(|_| laplace(2.0)).collect();
        let mean_abs = draws.iter().map(|d| d.abs()).sum::<f64>() / draws.len() as f64;
        // E|Laplace(b)| = b.
        assert!((mean_abs - 2.0).abs() < 0.1, "{mean_abs}");
    }

    #[test]
    fn an_org_that_collects_nothing_contributes_nothing() {
        use sightline_proto::consent::v1 as consent_pb;
        let contributing = consent_pb::Policy {
            allowed_kinds: vec![EventKind::Metric as i32],
            contribute_in_app_data_kinds: vec![EventKind::Metric as i32],
            ..Default::default()
        };
        assert!(contributes(&contributing, EventKind::Metric));
        // DISABLED: nothing allowed, whatever the contribution kinds still say.
        let disabled = consent_pb::Policy {
            allowed_kinds: Vec::new(),
            ..contributing
        };
        assert!(!contributes(&disabled, EventKind::Metric));
    }

    fn cells(values: &[f64]) -> BTreeMap<String, BTreeMap<Cell, f64>> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    format!("org{i}"),
                    BTreeMap::from([((String::new(), 0), *v)]),
                )
            })
            .collect()
    }

    #[test]
    fn private_releases_cannot_be_subtracted_to_one_orgs_value() {
        let release = Release::Private {
            epsilon: 1.0,
            bound: 1_000.0,
        };
        let six = cells(&[100.0, 200.0, 300.0, 400.0, 500.0, 777.0]);
        let five = cells(&[100.0, 200.0, 300.0, 400.0, 500.0]);
        let mut errors = Vec::new();
        for _ in 0..2_000 {
            let a = combine("m", &six, 5, release, 1);
            let b = combine("m", &five, 5, release, 4);
            if let (Some(a), Some(b)) = (a.buckets.first(), b.buckets.first()) {
                errors.push((6.0 * a.mean - 5.0 * b.mean - 777.0).abs());
                assert!(a.noised && a.noise_scale > 0.0);
            }
        }
        assert!(errors.len() > 100, "cells were shown");
        errors.sort_by(f64::total_cmp);
        // The typical error is hundreds of units: far beyond the value's own precision.
        let median = errors[errors.len() / 2];
        assert!(median > 100.0, "median error {median}");
        // Exact releases give it away.
        let a = combine("m", &six, 5, Release::Exact, 1);
        let b = combine("m", &five, 5, Release::Exact, 1);
        let exact = 6.0 * a.buckets[0].mean - 5.0 * b.buckets[0].mean;
        assert!((exact - 777.0).abs() < 1e-9);
    }

    #[test]
    fn private_quantiles_stay_in_bounds_and_near_the_data_with_a_large_epsilon() {
        let sorted = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0];
        for _ in 0..200 {
            let p50 = private_quantile(&sorted, 0.5, 50.0, 1_000.0);
            assert!((0.0..=1_000.0).contains(&p50));
            assert!((40.0..=60.0).contains(&p50), "{p50}");
        }
        assert_eq!(private_quantile(&[], 0.5, 1.0, 0.0), 0.0);
    }

    #[test]
    fn an_org_feeds_a_bounded_number_of_cells() {
        let day = DAY_MS;
        assert_eq!(
            cells_per_org(
                pb::AggregateGroupBy::None,
                pb::AggregateInterval::Total,
                0,
                day
            ),
            1
        );
        assert_eq!(
            cells_per_org(
                pb::AggregateGroupBy::None,
                pb::AggregateInterval::Day,
                0,
                3 * day
            ),
            3
        );
        assert_eq!(
            cells_per_org(
                pb::AggregateGroupBy::Product,
                pb::AggregateInterval::Total,
                0,
                day
            ),
            MAX_GROUPS_PER_ORG as u32
        );
    }
}
