//! The policies insights-svc follows (consent-svc's WatchPolicy, every org): what an upload or a
//! readiness report may keep (field rules, sharing level), where bundles go, retention, and the
//! purge instructions to carry out. Until a complete snapshot is held, calls that need a policy
//! answer UNAVAILABLE — never "allow".

use std::collections::HashMap;
use std::sync::Arc;

use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::policy_stream::{PolicyFollower, PolicyTable, Revisioned};
use tokio::sync::Notify;
use tonic::Status;

#[derive(Debug, Clone)]
struct OrgEntry {
    policy: Arc<consent_pb::Policy>,
    instances: HashMap<String, Arc<consent_pb::Policy>>,
}

impl Revisioned for OrgEntry {
    fn revision(&self) -> u64 {
        self.policy.revision
    }
}

#[derive(Debug, Default)]
pub struct Policies {
    table: PolicyTable<OrgEntry>,
}

impl Policies {
    pub fn is_ready(&self) -> bool {
        self.table.is_ready()
    }

    /// Woken on every change (the purge applier waits on it).
    pub fn changed(&self) -> &Notify {
        &self.table.changed
    }

    /// The effective policy of an instance (its override's, else its org's); for an org consent-svc
    /// never mentioned, None (nothing is allowed).
    pub fn policy(
        &self,
        org_id: &str,
        instance_id: Option<&str>,
    ) -> Result<Option<Arc<consent_pb::Policy>>, Status> {
        if !self.is_ready() {
            return Err(Status::unavailable(
                "no current policy from consent-svc: retry when it answers",
            ));
        }
        self.table
            .read(|orgs| {
                orgs.get(org_id).map(|entry| {
                    instance_id
                        .and_then(|i| entry.instances.get(i))
                        .unwrap_or(&entry.policy)
                        .clone()
                })
            })
            .ok_or_else(|| Status::internal("policy state poisoned"))
    }

    /// Every org-level policy held, with its instances' own.
    pub fn all(&self) -> Vec<(Arc<consent_pb::Policy>, Vec<Arc<consent_pb::Policy>>)> {
        self.table
            .read(|orgs| {
                orgs.values()
                    .map(|e| (e.policy.clone(), e.instances.values().cloned().collect()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn entry(message: &consent_pb::WatchPolicyResponse) -> Option<(String, OrgEntry)> {
        let policy = message.policy.as_ref()?;
        Some((
            policy.org_id.clone(),
            OrgEntry {
                policy: Arc::new(policy.clone()),
                instances: message
                    .instance_policies
                    .iter()
                    .map(|p| (p.instance_id.clone(), Arc::new(p.clone())))
                    .collect(),
            },
        ))
    }
}

impl PolicyFollower for Policies {
    fn begin_snapshot(&self) {
        self.table.begin_snapshot();
    }

    fn apply(&self, message: &consent_pb::WatchPolicyResponse) {
        self.table.apply(message, Self::entry(message));
    }

    fn lose(&self) {
        self.table.lose();
    }

    fn is_ready(&self) -> bool {
        self.table.is_ready()
    }
}
