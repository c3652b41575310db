//! The policies collector-svc enforces, kept current through consent-svc's WatchPolicy stream (all
//! orgs, with the service token): a snapshot first, then every change in commit order. Until the
//! snapshot is complete, and whenever the stream is lost, nothing is allowed: calls answer
//! UNAVAILABLE, never "allow" (SPEC E3).

use std::collections::HashMap;

use std::sync::Arc;

use crate::error::CollectorError;
use sightline_proto::collector::v1 as pb;
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::policy_stream::{
    PolicyFollower as _, PolicyTable, Revisioned, TableFollower,
};
pub use sightline_runtime::pseudonym::PseudonymKeys;

use crate::enforce::Plan;
use crate::fields::ClassTable;

#[derive(Debug, Clone)]
pub struct OrgEntry {
    plan: Arc<Plan>,
    policy: Arc<consent_pb::Policy>,
    instances: HashMap<String, Arc<Plan>>,
}

impl Revisioned for OrgEntry {
    fn revision(&self) -> u64 {
        self.plan.revision
    }
}

/// The current policy of every org, compiled.
#[derive(Debug)]
pub struct Policies {
    table: PolicyTable<OrgEntry>,
    classes: Arc<ClassTable>,
    keys: PseudonymKeys,
    /// Query keys URLs keep under BASIC (`collection.url_query_keys`).
    query_keys: Arc<[String]>,
    /// Accepted acks handed on after a newer revision was applied (the fence makes this 0).
    breaches: std::sync::atomic::AtomicU64,
}

impl Policies {
    pub fn new(classes: Arc<ClassTable>, keys: PseudonymKeys, query_keys: Arc<[String]>) -> Self {
        Self {
            table: PolicyTable::default(),
            classes,
            keys,
            query_keys,
            breaches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Checks an ack as it is handed to the transport, while its commit still holds the fence: an
    /// ack that says *accepted* must carry the revision the instance is enforced under now. One
    /// that does not (a breach of the opt-out fence) is counted and logged; the fence makes that
    /// impossible, and the tests hold it to zero.
    pub fn hand_over(&self, org_id: &str, instance_id: &str, result: &pb::IngestResult) {
        if result.accepted == 0 {
            return;
        }
        let current = self.revision(org_id, instance_id);
        if current != Some(result.policy_revision) {
            self.breaches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("sightline_collector_fence_breaches_total").increment(1);
            tracing::error!(
                org_id,
                acked = result.policy_revision,
                applied = ?current,
                "an accepted ack was handed on after a newer policy revision was applied"
            );
        }
    }

    /// Accepted acks handed on under an outdated revision since the start (always 0).
    pub fn fence_breaches(&self) -> u64 {
        self.breaches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The plan for one instance of an org: its override's policy, else the org's; an org consent-svc
    /// never mentioned has the default policy (nothing is collected).
    pub fn plan(&self, org_id: &str, instance_id: &str) -> Result<Arc<Plan>, CollectorError> {
        if !self.is_ready() {
            return Err(CollectorError::unavailable(
                "no current policy from consent-svc: nothing can be collected until it answers",
                self.table.retry_ms(),
            ));
        }
        let held = self
            .table
            .read(|orgs| {
                orgs.get(org_id).map(|entry| {
                    entry
                        .instances
                        .get(instance_id)
                        .unwrap_or(&entry.plan)
                        .clone()
                })
            })
            .ok_or(CollectorError::Unavailable {
                message: "policy cache unavailable".into(),
                retry_after_ms: None,
            })?;
        Ok(held.unwrap_or_else(|| Arc::new(self.compile(&default_policy(org_id)))))
    }

    /// The current revision an instance's records are enforced under.
    pub fn revision(&self, org_id: &str, instance_id: &str) -> Option<u64> {
        self.plan(org_id, instance_id).ok().map(|p| p.revision)
    }

    /// The org-level policies held now (for purges).
    pub fn policies(&self) -> Vec<Arc<consent_pb::Policy>> {
        self.table
            .read(|orgs| orgs.values().map(|e| e.policy.clone()).collect())
            .unwrap_or_default()
    }

    fn compile(&self, policy: &consent_pb::Policy) -> Plan {
        let key = self
            .keys
            .org_key(policy.pseudonym_key_version, &policy.org_id);
        Plan::compile(policy, self.classes.clone(), key, self.query_keys.clone())
    }

    fn entry_of(&self, message: &consent_pb::WatchPolicyResponse) -> Option<(String, OrgEntry)> {
        let policy = message.policy.as_ref()?;
        let instances = message
            .instance_policies
            .iter()
            .map(|p| (p.instance_id.clone(), Arc::new(self.compile(p))))
            .collect();
        Some((
            policy.org_id.clone(),
            OrgEntry {
                plan: Arc::new(self.compile(policy)),
                policy: Arc::new(policy.clone()),
                instances,
            },
        ))
    }
}

impl TableFollower for Policies {
    type Entry = OrgEntry;

    fn table(&self) -> &PolicyTable<OrgEntry> {
        &self.table
    }

    fn entry(&self, message: &consent_pb::WatchPolicyResponse) -> Option<(String, OrgEntry)> {
        self.entry_of(message)
    }
}

/// The policy of an org that never set anything: DISABLED, nothing collected.
fn default_policy(org_id: &str) -> consent_pb::Policy {
    consent_pb::Policy {
        org_id: org_id.to_owned(),
        retention: Some(consent_pb::RetentionSettings {
            raw_days: 730,
            assessment_days: 730,
            aggregate_days: 730,
            score_history_days: 730,
            support_bundle_days: 730,
            event_id_days: 35,
        }),
        ..Default::default()
    }
}
