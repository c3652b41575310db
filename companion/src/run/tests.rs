//! Tests of `run`.

#![allow(clippy::unwrap_used)]
use super::*;
use sightline_proto::collector::v1::MetricEvent;
use sightline_proto::consent::v1::PurgeInstruction;

fn metric_at(ms: i64) -> Event {
    Event {
        event_id: format!("m{ms}"),
        occurred_at: Some(sampler::timestamp(ms)),
        payload: Some(Payload::Metric(MetricEvent::default())),
    }
}

fn policy(usage: sightline_proto::common::v1::UsageLevel, purges: Vec<PurgeInstruction>) -> Policy {
    Policy {
        usage_level: usage as i32,
        allowed_kinds: vec![EventKind::Metric as i32, EventKind::InstanceMetadata as i32],
        purges,
        ..Default::default()
    }
}

#[test]
fn the_spool_keeps_what_the_policy_allows_and_no_purge_covers() {
    use sightline_proto::common::v1::UsageLevel;
    let basic = policy(UsageLevel::Basic, vec![]);
    assert!(keeps(&basic, "i1")(&metric_at(10)));
    let disabled = policy(UsageLevel::Disabled, vec![]);
    assert!(!keeps(&disabled, "i1")(&metric_at(10)));
    let mut only_metadata = basic.clone();
    only_metadata.allowed_kinds = vec![EventKind::InstanceMetadata as i32];
    assert!(!keeps(&only_metadata, "i1")(&metric_at(10)));
    // A purge of this instance's metrics covers what was collected before it was issued.
    let purge = |scope: PurgeScope, instance: &str| PurgeInstruction {
        scope: scope as i32,
        instance_id: instance.into(),
        issued_at: Some(sampler::timestamp(1_000)),
        delete_kinds: vec![EventKind::Metric as i32],
        ..Default::default()
    };
    let purged = policy(UsageLevel::Basic, vec![purge(PurgeScope::Instance, "i1")]);
    assert!(!keeps(&purged, "i1")(&metric_at(999)));
    assert!(keeps(&purged, "i1")(&metric_at(1_001)));
    assert!(
        keeps(&purged, "i2")(&metric_at(999)),
        "another instance's purge"
    );
    let org_wide = policy(UsageLevel::Basic, vec![purge(PurgeScope::Org, "")]);
    assert!(!keeps(&org_wide, "i2")(&metric_at(999)));
}
