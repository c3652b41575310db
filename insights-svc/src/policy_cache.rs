//! The policies insights-svc follows (consent-svc's WatchPolicy, every org): what an upload or a
//! readiness report may keep (field rules, sharing level), where bundles go, retention, and the
//! purge instructions to carry out. Until a complete snapshot is held, calls that need a policy
//! answer UNAVAILABLE — never "allow".

use std::collections::HashMap;
use std::sync::Arc;

use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::policy_stream::{
    Held, PolicyFollower as _, PolicyTable, Revisioned, TableFollower,
};
use sightline_runtime::ratelimit::retry_after;
use tonic::Status;

#[derive(Debug, Clone)]
pub struct OrgEntry {
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
    /// The effective policy of an instance (its override's, else its org's); for an org consent-svc
    /// never mentioned, None (nothing is allowed).
    pub fn policy(
        &self,
        org_id: &str,
        instance_id: Option<&str>,
    ) -> Result<Option<Arc<consent_pb::Policy>>, Status> {
        if !self.is_ready() {
            return Err(self
                .table
                .unavailable("no current policy from consent-svc: retry when it answers"));
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

    /// Holds the policy fence for a write made under `policy`: once held, no change is applied
    /// until the hold is dropped (after the write has answered), and a policy that changed since it
    /// was read is refused — UNAVAILABLE with a retry hint, nothing stored — so no upload checked
    /// under an older revision is acknowledged after a new one is applied (an opt-out is a fence).
    pub async fn hold(
        &self,
        policy: &consent_pb::Policy,
        instance_id: Option<&str>,
    ) -> Result<Held, Status> {
        let held = self.table.fence.enter().await;
        let current = self.policy(&policy.org_id, instance_id)?;
        if current.map(|p| p.revision) != Some(policy.revision) {
            return Err(retry_after(
                Status::unavailable(
                    "the org's policy changed while the upload was checked; nothing of it was stored: send it again",
                ),
                10,
            ));
        }
        Ok(held)
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

    fn entry_of(message: &consent_pb::WatchPolicyResponse) -> Option<(String, OrgEntry)> {
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

impl TableFollower for Policies {
    type Entry = OrgEntry;

    fn table(&self) -> &PolicyTable<OrgEntry> {
        &self.table
    }

    fn entry(&self, message: &consent_pb::WatchPolicyResponse) -> Option<(String, OrgEntry)> {
        Self::entry_of(message)
    }
}
