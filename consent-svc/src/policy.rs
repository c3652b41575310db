//! The effective policy (SPEC C4, E3, E4): one snapshot of an org's governance ([`OrgState`]) turned
//! into the org's policy and each instance's, by pure functions, so GetPolicy, WatchPolicy snapshots
//! and published changes cannot disagree.

use sightline_proto::common::v1 as common_pb;
use sightline_proto::consent::v1 as pb;
use sightline_runtime::time::to_proto;

use crate::domain::{self, Allowance, Consent, Retention, Sharing, Tracking, Usage};
use crate::store::PurgeRecord;

/// While an org's data moves, enforcement points tell clients to retry after this long.
pub const MOVING_RETRY_AFTER_MS: u32 = 60_000;

/// An instance's override, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub instance_id: String,
    pub usage: Usage,
    pub sharing: Sharing,
}

/// Everything an org's policies derive from, read at one time.
#[derive(Debug, Clone)]
pub struct OrgState {
    pub org_id: String,
    pub consent: Consent,
    pub consent_version: u64,
    pub revision: u64,
    pub tracking: Tracking,
    pub retention: Retention,
    pub location: common_pb::Location,
    pub support_bundle_location: common_pb::Location,
    /// The data move under way (state MOVING), if any.
    pub data_move: Option<pb::ResidencyMove>,
    /// The support-bundle move under way, if any.
    pub support_bundles_move: Option<pb::ResidencyMove>,
    pub overrides: Vec<Override>,
    /// Newest first.
    pub purges: Vec<PurgeRecord>,
    pub pseudonym_key_version: u32,
}

pub const SCOPE_ORG: &str = "ORG";
pub const SCOPE_INSTANCE: &str = "INSTANCE";

impl OrgState {
    fn override_of(&self, instance_id: &str) -> Option<&Override> {
        self.overrides.iter().find(|o| o.instance_id == instance_id)
    }

    /// What the org, or one of its instances, allows.
    pub fn allowance(&self, instance_id: Option<&str>) -> Allowance {
        let org = Allowance::of(&self.consent);
        match instance_id.and_then(|i| self.override_of(i)) {
            Some(o) => org.lowered_to(o.usage, o.sharing),
            None => org,
        }
    }

    /// The purges in force: the latest org-scoped one, and the latest of each instance (all of them
    /// for the org's policy, its own for an instance's), oldest first.
    fn purges_for(&self, instance_id: Option<&str>) -> Vec<&PurgeRecord> {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        let mut chosen: Vec<&PurgeRecord> = Vec::new();
        for p in &self.purges {
            let applies = match instance_id {
                None => true,
                Some(i) => p.scope == SCOPE_ORG || p.instance_id == i,
            };
            let scope = (p.scope.as_str(), p.instance_id.as_str());
            if applies && !seen.contains(&scope) {
                seen.push(scope);
                chosen.push(p);
            }
        }
        chosen.reverse();
        chosen
    }

    /// The org's policy (`instance_id` None) or one instance's effective policy.
    pub fn policy(&self, instance_id: Option<&str>) -> pb::Policy {
        let allowed = self.allowance(instance_id);
        let (metadata_kinds, in_app_kinds) = domain::contribution_kinds();
        let purges: Vec<pb::PurgeInstruction> = self
            .purges_for(instance_id)
            .into_iter()
            .map(purge_pb)
            .collect();
        // An org contributes only what it collects: nothing while DISABLED, and of each flag's
        // kinds only those its usage level allows (SPEC E7: the policy never says an org
        // contributes when it collects nothing).
        let collected = domain::allowed_kinds(allowed.usage, true);
        let (contribute_metadata, contribute_in_app_data) = if allowed.usage == Usage::Disabled {
            (false, false)
        } else {
            allowed.contributes
        };
        let contributed = |kinds: Vec<common_pb::EventKind>| -> Vec<i32> {
            kinds
                .into_iter()
                .filter(|k| collected.contains(k))
                .map(|k| k as i32)
                .collect()
        };
        pb::Policy {
            org_id: self.org_id.clone(),
            instance_id: instance_id.unwrap_or_default().to_owned(),
            consent_version: self.consent_version,
            revision: self.revision,
            usage_level: allowed.usage.to_pb() as i32,
            sharing_level: allowed.sharing.to_pb() as i32,
            allowed_kinds: domain::allowed_kinds(allowed.usage, !self.tracking.channels.is_empty())
                .into_iter()
                .map(|k| k as i32)
                .collect(),
            field_treatment: domain::treatment(allowed.sharing) as i32,
            contribute_metadata,
            contribute_in_app_data,
            tracking: Some(self.tracking.to_pb()),
            location: self.location as i32,
            support_bundle_location: self.support_bundle_location as i32,
            moving: self.data_move.is_some(),
            retry_after_ms: if self.data_move.is_some() || self.support_bundles_move.is_some() {
                MOVING_RETRY_AFTER_MS
            } else {
                0
            },
            retention: Some(self.retention.to_pb()),
            purge: purges.last().cloned(),
            field_rules: domain::field_rules(allowed.sharing),
            pseudonym_key_version: self.pseudonym_key_version,
            contribute_metadata_kinds: if contribute_metadata {
                contributed(metadata_kinds)
            } else {
                Vec::new()
            },
            contribute_in_app_data_kinds: if contribute_in_app_data {
                contributed(in_app_kinds)
            } else {
                Vec::new()
            },
            purges,
            support_bundles_moving: self.support_bundles_move.is_some(),
            data_move: self.data_move.clone(),
            support_bundles_move: self.support_bundles_move.clone(),
        }
    }

    /// The effective policy of every instance that differs from the org's: those with an override or
    /// an instance-scoped purge. Every other instance follows the org's policy ([`for_instance`]).
    pub fn instance_policies(&self) -> Vec<pb::Policy> {
        let mut ids: Vec<&str> = self
            .overrides
            .iter()
            .map(|o| o.instance_id.as_str())
            .chain(
                self.purges
                    .iter()
                    .filter(|p| p.scope == SCOPE_INSTANCE)
                    .map(|p| p.instance_id.as_str()),
            )
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter().map(|i| self.policy(Some(i))).collect()
    }

    /// One WatchPolicy message for the whole org.
    pub fn watch_message(&self, instance_ids: Vec<String>) -> pb::WatchPolicyResponse {
        pb::WatchPolicyResponse {
            policy: Some(self.policy(None)),
            instance_ids,
            instance_policies: self.instance_policies(),
            snapshot_complete: false,
            heartbeat: false,
        }
    }
}

/// An instance's effective policy from a WatchPolicy message of its org: its own entry in
/// `instance_policies`, or else the org's policy, which it follows (less other instances' purges).
pub fn for_instance(message: &pb::WatchPolicyResponse, instance_id: &str) -> Option<pb::Policy> {
    if let Some(own) = message
        .instance_policies
        .iter()
        .find(|p| p.instance_id == instance_id)
    {
        return Some(own.clone());
    }
    let mut policy = message.policy.clone()?;
    policy.instance_id = instance_id.to_owned();
    policy.purges.retain(|p| p.scope() == pb::PurgeScope::Org);
    policy.purge = policy.purges.last().cloned();
    Some(policy)
}

fn numbers(list: &str) -> Vec<i32> {
    list.split(',').filter_map(|n| n.parse().ok()).collect()
}

pub fn purge_pb(p: &PurgeRecord) -> pb::PurgeInstruction {
    #[allow(deprecated)]
    pb::PurgeInstruction {
        max_usage_level: 0,
        max_sharing_level: 0,
        from_consent_version: 0,
        issued_at: Some(to_proto(p.issued_at)),
        purge_id: p.purge_id.clone(),
        scope: if p.scope == SCOPE_INSTANCE {
            pb::PurgeScope::Instance
        } else {
            pb::PurgeScope::Org
        } as i32,
        instance_id: p.instance_id.clone(),
        delete_kinds: numbers(&p.delete_kinds),
        strip_classes: numbers(&p.strip_classes),
        withdraw_contribute_metadata: p.withdraw_metadata,
        withdraw_contribute_in_app_data: p.withdraw_in_app_data,
        before_consent_version: u64::try_from(p.before_consent_version).unwrap_or(0),
        before_revision: u64::try_from(p.before_revision).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> OrgState {
        OrgState {
            org_id: "o".into(),
            consent: Consent {
                usage: Usage::Advanced,
                sharing: Sharing::Extended,
                ..Consent::DEFAULT
            },
            consent_version: 3,
            revision: 7,
            tracking: Tracking::default(),
            retention: Retention::default(),
            location: common_pb::Location::Eu,
            support_bundle_location: common_pb::Location::Eu,
            data_move: None,
            support_bundles_move: None,
            overrides: vec![Override {
                instance_id: "i-low".into(),
                usage: Usage::Basic,
                sharing: Sharing::Basic,
            }],
            purges: vec![
                purge("p3", SCOPE_INSTANCE, "i-low", 6),
                purge("p2", SCOPE_ORG, "", 5),
                purge("p1", SCOPE_ORG, "", 2),
            ],
            pseudonym_key_version: 1,
        }
    }

    fn purge(id: &str, scope: &str, instance: &str, revision: i64) -> PurgeRecord {
        PurgeRecord {
            purge_id: id.into(),
            org_id: "o".into(),
            scope: scope.into(),
            instance_id: instance.into(),
            delete_kinds: "3,4".into(),
            strip_classes: String::new(),
            withdraw_metadata: false,
            withdraw_in_app_data: false,
            before_consent_version: 2,
            before_revision: revision,
            issued_at: 1,
        }
    }

    #[test]
    fn a_policy_carries_the_latest_purge_of_each_scope() {
        let s = state();
        let org = s.policy(None);
        let ids: Vec<&str> = org.purges.iter().map(|p| p.purge_id.as_str()).collect();
        assert_eq!(ids, ["p2", "p3"], "p1 was replaced by p2");
        assert_eq!(org.purge.as_ref().unwrap().purge_id, "p3");
        let other = s.policy(Some("i-other"));
        let ids: Vec<&str> = other.purges.iter().map(|p| p.purge_id.as_str()).collect();
        assert_eq!(ids, ["p2"]);
    }

    #[test]
    fn an_instance_without_its_own_entry_follows_the_org_policy_exactly() {
        let s = state();
        let message = s.watch_message(Vec::new());
        assert_eq!(message.instance_policies.len(), 1);
        assert_eq!(
            for_instance(&message, "i-other").unwrap(),
            s.policy(Some("i-other"))
        );
        let low = for_instance(&message, "i-low").unwrap();
        assert_eq!(low, s.policy(Some("i-low")));
        assert_eq!(low.usage_level(), common_pb::UsageLevel::Basic);
        assert!(
            !low.allowed_kinds()
                .any(|k| k == common_pb::EventKind::PageView)
        );
    }
}
