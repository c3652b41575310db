//! The optimization score (SPEC I1): every rule reduces its metric's hourly rollups over its
//! window to one number and compares it with its threshold. A failing rule is a finding, with the
//! evidence (what was observed, against what, how and over which window) and the recommendation.
//!
//! score = max(0, 100 − Σ weight of the failing rules). A rule whose metric has no rollup in its
//! window neither fails nor passes: it is not counted, and `has_data` is false when no rule had data.

use std::collections::HashMap;

use sightline_proto::insights::v1 as pb;

use crate::rules::{Aggregation, Rule, Rules};

pub use sightline_runtime::time::HOUR_MS;

/// One hourly rollup of one metric (one tag set), as collector-svc's QueryMetrics gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hour {
    pub hour_ms: i64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub p50: f64,
    pub p95: f64,
}

#[cfg(test)]
impl Hour {
    /// An hour of 30 samples all at `value` (the tests' fixtures).
    pub fn steady(hour_ms: i64, value: f64) -> Self {
        Hour {
            hour_ms,
            count: 30,
            min: value,
            max: value,
            sum: value * 30.0,
            p50: value,
            p95: value,
        }
    }
}

/// The rollups of the rules' metrics, by metric name (every tag set together).
pub type Series = HashMap<String, Vec<Hour>>;

/// A rule's aggregation of the hours within `[from, to)`; None when there are none.
pub fn observe(aggregation: Aggregation, hours: &[Hour], from: i64, to: i64) -> Option<f64> {
    let inside: Vec<&Hour> = hours
        .iter()
        .filter(|h| h.hour_ms >= from && h.hour_ms < to && h.count > 0)
        .collect();
    if inside.is_empty() {
        return None;
    }
    Some(match aggregation {
        Aggregation::Max => inside.iter().map(|h| h.max).fold(f64::MIN, f64::max),
        Aggregation::P95 => {
            let mut values: Vec<f64> = inside.iter().map(|h| h.p95).collect();
            values.sort_by(f64::total_cmp);
            nearest_rank(&values, 0.95)
        }
        Aggregation::Avg => {
            let sum: f64 = inside.iter().map(|h| h.sum).sum();
            let count: u64 = inside.iter().map(|h| h.count).sum();
            sum / count as f64
        }
        Aggregation::Last => {
            let latest = inside.iter().map(|h| h.hour_ms).max().unwrap_or(from);
            let (sum, count) = inside
                .iter()
                .filter(|h| h.hour_ms == latest)
                .fold((0.0, 0u64), |(s, c), h| (s + h.sum, c + h.count));
            sum / count as f64
        }
    })
}

/// The nearest-rank percentile of sorted values (not empty).
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What the rules make of `series` at `now_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessed {
    pub score: u32,
    pub findings: Vec<pb::Finding>,
    pub has_data: bool,
}

pub fn evaluate(rules: &Rules, series: &Series, now_ms: i64) -> Assessed {
    let mut lost = 0u32;
    let mut findings = Vec::new();
    let mut has_data = false;
    // Rollups exist for hours that have begun; the current hour counts once it has data.
    let to = now_ms.div_euclid(HOUR_MS) * HOUR_MS + HOUR_MS;
    for rule in &rules.rules {
        let from = to - i64::from(rule.window_hours) * HOUR_MS;
        let Some(hours) = series.get(&rule.metric) else {
            continue;
        };
        let Some(observed) = observe(rule.aggregation, hours, from, to) else {
            continue;
        };
        has_data = true;
        if rule.comparison.fires(observed, rule.threshold) {
            lost = lost.saturating_add(rule.weight);
            findings.push(finding(rule, observed));
        }
    }
    // Most severe first, then the heaviest, then by id: a stable, readable order.
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| weight_of(rules, &b.rule_id).cmp(&weight_of(rules, &a.rule_id)))
            .then_with(|| a.rule_id.cmp(&b.rule_id))
    });
    Assessed {
        score: 100u32.saturating_sub(lost),
        findings,
        has_data,
    }
}

fn weight_of(rules: &Rules, id: &str) -> u32 {
    rules
        .rules
        .iter()
        .find(|r| r.id == id)
        .map_or(0, |r| r.weight)
}

fn finding(rule: &Rule, observed: f64) -> pb::Finding {
    pb::Finding {
        rule_id: rule.id.clone(),
        severity: rule.severity as i32,
        title: rule.title.clone(),
        evidence: vec![pb::Evidence {
            metric_name: rule.metric.clone(),
            observed,
            threshold: rule.threshold,
            comparison: rule.comparison.symbol().to_owned(),
            unit: rule.unit.clone(),
            aggregation: rule.aggregation.describe(rule.window_hours),
            window: Some(prost_types::Duration {
                seconds: i64::from(rule.window_hours) * 3_600,
                nanos: 0,
            }),
        }],
        recommendation: rule.recommendation.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const NOW: i64 = 1_795_000_000_000;

    /// `hours` hourly rollups ending with the current hour, every sample at `value`.
    pub(crate) fn flat(value: f64, hours: i64) -> Vec<Hour> {
        let current = NOW.div_euclid(HOUR_MS) * HOUR_MS;
        (0..hours)
            .map(|i| Hour::steady(current - i * HOUR_MS, value))
            .collect()
    }

    /// A default rule's fixtures: a series that makes it fire (the score is 100 less its weight,
    /// with one finding that explains it) and one that does not (100, no finding).
    fn fires_and_stays_quiet(id: &str) {
        let rules = Rules::defaults().unwrap();
        let rule = rules.rules.iter().find(|r| r.id == id).unwrap();
        {
            let (bad, good) = match rule.comparison {
                crate::rules::Comparison::Above | crate::rules::Comparison::AtLeast => {
                    (rule.threshold * 1.5 + 1.0, rule.threshold * 0.5)
                }
                _ => (rule.threshold * 0.5, rule.threshold * 1.5 + 1.0),
            };
            let firing: Series = [(rule.metric.clone(), flat(bad, 24))].into();
            let assessed = evaluate(&rules, &firing, NOW);
            assert!(assessed.has_data);
            assert_eq!(assessed.score, 100 - rule.weight, "rule {}", rule.id);
            assert_eq!(assessed.findings.len(), 1, "rule {}", rule.id);
            let found = &assessed.findings[0];
            assert_eq!(found.rule_id, rule.id);
            assert!(!found.recommendation.is_empty());
            let evidence = &found.evidence[0];
            assert_eq!(evidence.observed, bad);
            assert_eq!(evidence.threshold, rule.threshold);
            assert_eq!(evidence.unit, rule.unit);
            assert_eq!(
                evidence.window.unwrap().seconds,
                i64::from(rule.window_hours) * 3_600
            );
            let quiet: Series = [(rule.metric.clone(), flat(good, 24))].into();
            let assessed = evaluate(&rules, &quiet, NOW);
            assert_eq!(assessed.score, 100, "rule {}", rule.id);
            assert!(assessed.findings.is_empty(), "rule {}", rule.id);
        }
    }

    macro_rules! rule_fixtures {
        ($($test:ident => $id:literal),* $(,)?) => {
            $(
                #[test]
                fn $test() {
                    fires_and_stays_quiet($id);
                }
            )*

            /// Every default rule has its test above.
            #[test]
            fn every_default_rule_has_a_fixture_test() {
                let tested = [$($id),*];
                for rule in Rules::defaults().unwrap().rules {
                    assert!(tested.contains(&rule.id.as_str()), "no fixture test for {}", rule.id);
                }
            }
        };
    }

    rule_fixtures! {
        cpu_load_high_fires_and_stays_quiet => "cpu-load-high",
        heap_pressure_fires_and_stays_quiet => "heap-pressure",
        gc_time_share_fires_and_stays_quiet => "gc-time-share",
        db_latency_fires_and_stays_quiet => "db-latency",
        request_latency_fires_and_stays_quiet => "request-latency",
        index_size_fires_and_stays_quiet => "index-size",
        guardrail_projects_fires_and_stays_quiet => "guardrail-projects",
        guardrail_issues_fires_and_stays_quiet => "guardrail-issues",
        guardrail_custom_fields_fires_and_stays_quiet => "guardrail-custom-fields",
        guardrail_users_fires_and_stays_quiet => "guardrail-users",
        guardrail_groups_fires_and_stays_quiet => "guardrail-groups",
        guardrail_spaces_fires_and_stays_quiet => "guardrail-spaces",
        guardrail_apps_fires_and_stays_quiet => "guardrail-apps",
    }

    #[test]
    fn a_sick_instance_loses_the_weight_of_every_failing_rule() {
        let rules = Rules::defaults().unwrap();
        let series: Series = [
            ("jvm.cpu.load".to_owned(), flat(95.0, 24)),
            ("jvm.heap.used_percent".to_owned(), flat(92.0, 24)),
            ("db.connection.latency".to_owned(), flat(10.0, 24)),
            ("guardrail.custom_fields".to_owned(), flat(2_400.0, 2)),
        ]
        .into();
        let assessed = evaluate(&rules, &series, NOW);
        assert_eq!(assessed.score, 100 - 15 - 15 - 5);
        let ids: Vec<&str> = assessed
            .findings
            .iter()
            .map(|f| f.rule_id.as_str())
            .collect();
        assert_eq!(
            ids,
            ["cpu-load-high", "heap-pressure", "guardrail-custom-fields"]
        );
    }

    #[test]
    fn no_rollups_means_no_data_and_a_score_that_means_nothing_yet() {
        let rules = Rules::defaults().unwrap();
        let assessed = evaluate(&rules, &Series::new(), NOW);
        assert_eq!((assessed.score, assessed.has_data), (100, false));
        // Data older than every window counts as none.
        let mut old = flat(99.0, 2);
        for hour in &mut old {
            hour.hour_ms -= 40 * 24 * HOUR_MS;
        }
        let series: Series = [("jvm.cpu.load".to_owned(), old)].into();
        assert!(!evaluate(&rules, &series, NOW).has_data);
    }

    #[test]
    fn aggregations_read_the_rollups_as_documented() {
        let hour = |at: i64, count: u64, max: f64, sum: f64, p95: f64| Hour {
            hour_ms: at * HOUR_MS,
            count,
            min: 0.0,
            max,
            sum,
            p50: 0.0,
            p95,
        };
        let hours: Vec<Hour> = (0..20)
            .map(|i| hour(i, 10, i as f64 * 2.0, i as f64 * 10.0, i as f64))
            .collect();
        let end = 20 * HOUR_MS;
        assert_eq!(observe(Aggregation::Max, &hours, 0, end), Some(38.0));
        // Nearest rank: the 19th of 20 sorted p95s.
        assert_eq!(observe(Aggregation::P95, &hours, 0, end), Some(18.0));
        assert_eq!(observe(Aggregation::Avg, &hours, 0, end), Some(9.5));
        assert_eq!(observe(Aggregation::Last, &hours, 0, end), Some(19.0));
        assert_eq!(
            observe(Aggregation::Max, &hours, 5 * HOUR_MS, 6 * HOUR_MS),
            Some(10.0)
        );
        assert_eq!(observe(Aggregation::Max, &hours, end, 2 * end), None);
    }
}
