//! The policies insights-svc follows (consent-svc's WatchPolicy, every org): what an upload or a
//! readiness report may keep (field rules, sharing level), where bundles go, retention, and the
//! purge instructions to carry out. Until a complete snapshot is held, calls that need a policy
//! answer UNAVAILABLE — never "allow".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::policy_stream::PolicyFollower;
use tokio::sync::Notify;
use tonic::Status;

#[derive(Debug, Clone)]
struct OrgEntry {
    policy: Arc<consent_pb::Policy>,
    instances: HashMap<String, Arc<consent_pb::Policy>>,
}

#[derive(Debug, Default)]
pub struct Policies {
    orgs: RwLock<HashMap<String, OrgEntry>>,
    ready: AtomicBool,
    snapshot: Mutex<Option<HashMap<String, OrgEntry>>>,
    /// Woken on every change (the purge applier waits on it).
    pub changed: Notify,
}

impl Policies {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
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
        let orgs = self
            .orgs
            .read()
            .map_err(|_| Status::internal("policy state poisoned"))?;
        Ok(orgs.get(org_id).map(|entry| {
            instance_id
                .and_then(|i| entry.instances.get(i))
                .unwrap_or(&entry.policy)
                .clone()
        }))
    }

    /// Every org-level policy held, with its instances' own.
    pub fn all(&self) -> Vec<(Arc<consent_pb::Policy>, Vec<Arc<consent_pb::Policy>>)> {
        self.orgs
            .read()
            .map(|orgs| {
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
        if let Ok(mut snapshot) = self.snapshot.lock() {
            *snapshot = Some(HashMap::new());
        }
    }

    fn apply(&self, message: &consent_pb::WatchPolicyResponse) {
        let entry = Self::entry(message);
        let Ok(mut snapshot) = self.snapshot.lock() else {
            return;
        };
        if let Some(pending) = snapshot.as_mut() {
            if let Some((org, entry)) = entry {
                pending.insert(org, entry);
            }
            if message.snapshot_complete {
                let complete = snapshot.take().unwrap_or_default();
                if let Ok(mut orgs) = self.orgs.write() {
                    *orgs = complete;
                    self.ready.store(true, Ordering::SeqCst);
                }
            }
        } else if let Some((org, entry)) = entry
            && let Ok(mut orgs) = self.orgs.write()
        {
            let newer = orgs
                .get(&org)
                .is_none_or(|old| old.policy.revision <= entry.policy.revision);
            if newer {
                orgs.insert(org, entry);
            }
        }
        self.changed.notify_waiters();
    }

    fn lose(&self) {
        self.ready.store(false, Ordering::SeqCst);
        if let Ok(mut orgs) = self.orgs.write() {
            orgs.clear();
        }
    }

    fn is_ready(&self) -> bool {
        Policies::is_ready(self)
    }
}
