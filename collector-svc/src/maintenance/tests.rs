//! Tests of `maintenance`.

use super::*;

#[test]
fn quantiles_use_the_nearest_rank() {
    let values: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(quantile(&values, 0.5), 50.0);
    assert_eq!(quantile(&values, 0.95), 95.0);
    assert_eq!(quantile(&[7.0], 0.95), 7.0);
    assert_eq!(quantile(&[], 0.5), 0.0);
}

#[test]
fn rollups_group_by_metric_and_tags_and_skip_one_off_readings() {
    let sample = |name: &str, value: f64, tag: &str, periodic: bool, version: i64| {
        let event = pb::Event {
            event_id: "e".into(),
            occurred_at: None,
            payload: Some(pb::event::Payload::Metric(pb::MetricEvent {
                name: name.into(),
                value,
                unit: "ms".into(),
                periodic_sample: periodic,
                tags: [("pluginKey".to_owned(), tag.to_owned())]
                    .into_iter()
                    .collect(),
                ..Default::default()
            })),
        };
        (event.encode_to_vec(), version, version)
    };
    let samples = vec![
        sample("latency", 10.0, "a", true, 3),
        sample("latency", 30.0, "a", true, 2),
        sample("latency", 20.0, "a", true, 3),
        sample("latency", 99.0, "b", true, 3),
        sample("latency", 1000.0, "a", false, 3),
    ];
    let rollups = roll_up("o", "i", 0, &samples);
    assert_eq!(rollups.len(), 2);
    let a = &rollups[0];
    assert_eq!(a.tags, r#"{"pluginKey":"a"}"#);
    assert_eq!(
        (a.count, a.min, a.max, a.sum, a.p50),
        (3, 10.0, 30.0, 60.0, 20.0)
    );
    assert_eq!(a.consent_version, 2);
    assert_eq!(rollups[1].count, 1);
}
