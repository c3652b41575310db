//! Contributed aggregates (SPEC E7): cross-org statistics of a metric from the hourly rollups of orgs
//! whose policy lets the metric kind feed them (contribution after compliance restriction), never a
//! cell from fewer than k orgs, and optional Laplace noise charged to each contributing org's
//! persistent epsilon ledger.
//!
//! Each org contributes one value per cell — the mean of its samples in the cell (its rollups' sum
//! over their count) — so a large org weighs as much as a small one and k counts orgs. A cell's
//! figures are the mean, p50 and p95 of those org values. With noise, each org value is clipped to
//! [0, B] (`collection.aggregate_bound`), and each of the three figures gets Laplace noise of scale
//! 3·B / (n·ε): one org changes a figure by at most B/n, and the call spends ε in all (ε/3 per figure).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;
use sightline_proto::collector::v1 as pb;
use sightline_proto::common::v1::EventKind;
use sightline_runtime::time::to_proto;

use crate::enforce::DAY_MS;

/// A cell: (group value, bucket start).
type Cell = (String, i64);

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

/// Whether an org's policy lets `kind` feed cross-org statistics.
pub fn contributes(policy: &sightline_proto::consent::v1::Policy, kind: EventKind) -> bool {
    policy
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
    sums.into_iter()
        .filter(|(_, (count, _))| *count > 0)
        .map(|(cell, (count, sum))| {
            #[allow(clippy::cast_precision_loss)]
            let mean = sum / count as f64;
            (cell, mean)
        })
        .collect()
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Laplace noise of scale `b`.
fn laplace(b: f64) -> f64 {
    let u: f64 = rand::random::<f64>() - 0.5;
    -b * u.signum() * (1.0 - 2.0 * u.abs()).max(f64::MIN_POSITIVE).ln()
}

/// The cells shown and how many were withheld, from every contributing org's values.
#[derive(Debug)]
pub struct Computed {
    pub buckets: Vec<pb::AggregateBucket>,
    pub withheld: u32,
    /// Orgs with a value in a shown cell (charged when noised).
    pub contributors: BTreeSet<String>,
}

/// Combines org values into cells; `noise` is (epsilon, bound) when noised.
pub fn combine(
    metric: &str,
    per_org: &BTreeMap<String, BTreeMap<Cell, f64>>,
    min_orgs: u32,
    noise: Option<(f64, f64)>,
) -> Computed {
    let mut cells: BTreeMap<Cell, Vec<(String, f64)>> = BTreeMap::new();
    for (org, values) in per_org {
        for (cell, value) in values {
            cells
                .entry(cell.clone())
                .or_default()
                .push((org.clone(), *value));
        }
    }
    let mut computed = Computed {
        buckets: Vec::new(),
        withheld: 0,
        contributors: BTreeSet::new(),
    };
    for ((group, start), entries) in cells {
        let n = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        if n < min_orgs.max(1) {
            computed.withheld += 1;
            continue;
        }
        let mut values: Vec<f64> = entries
            .iter()
            .map(|(_, v)| match noise {
                Some((_, bound)) => v.clamp(0.0, bound),
                None => *v,
            })
            .collect();
        values.sort_by(f64::total_cmp);
        #[allow(clippy::cast_precision_loss)]
        let mut mean = values.iter().sum::<f64>() / values.len() as f64;
        let mut p50 = quantile(&values, 0.5);
        let mut p95 = quantile(&values, 0.95);
        if let Some((epsilon, bound)) = noise {
            let scale = 3.0 * bound / (f64::from(n) * epsilon);
            mean += laplace(scale);
            p50 += laplace(scale);
            p95 += laplace(scale);
        }
        computed
            .contributors
            .extend(entries.into_iter().map(|(org, _)| org));
        computed.buckets.push(pb::AggregateBucket {
            metric_name: metric.to_owned(),
            bucket: group,
            org_count: n,
            mean,
            p50,
            p95,
            noised: noise.is_some(),
            bucket_start: Some(to_proto(start)),
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
        let four = combine("m", &per_org, 5, None);
        assert_eq!((four.buckets.len(), four.withheld), (0, 1));
        per_org.insert("org4".into(), BTreeMap::from([((String::new(), 0), 50.0)]));
        let five = combine("m", &per_org, 5, None);
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
}
