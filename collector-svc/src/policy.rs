//! The policies collector-svc enforces, kept current through consent-svc's WatchPolicy stream (all
//! orgs, with the service token): a snapshot first, then every change in commit order. Until the
//! snapshot is complete, and whenever the stream is lost, nothing is allowed: calls answer
//! UNAVAILABLE, never "allow" (SPEC E3).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::policy_stream::PolicyFollower;
pub use sightline_runtime::pseudonym::PseudonymKeys;
use tokio::sync::Notify;
use tonic::Status;

use crate::enforce::Plan;
use crate::fields::ClassTable;

#[derive(Debug, Clone)]
struct OrgEntry {
    plan: Arc<Plan>,
    policy: Arc<consent_pb::Policy>,
    instances: HashMap<String, Arc<Plan>>,
}

/// The current policy of every org, compiled.
#[derive(Debug)]
pub struct Policies {
    orgs: RwLock<HashMap<String, OrgEntry>>,
    ready: AtomicBool,
    classes: Arc<ClassTable>,
    keys: PseudonymKeys,
    /// Woken on every change, for the purge applier.
    pub changed: Notify,
    /// The snapshot being received (None once complete).
    snapshot: Mutex<Option<HashMap<String, OrgEntry>>>,
}

impl Policies {
    pub fn new(classes: Arc<ClassTable>, keys: PseudonymKeys) -> Self {
        Self {
            orgs: RwLock::new(HashMap::new()),
            ready: AtomicBool::new(false),
            classes,
            keys,
            changed: Notify::new(),
            snapshot: Mutex::new(None),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The plan for one instance of an org: its override's policy, else the org's; an org consent-svc
    /// never mentioned has the default policy (nothing is collected).
    pub fn plan(&self, org_id: &str, instance_id: &str) -> Result<Arc<Plan>, Status> {
        if !self.is_ready() {
            return Err(Status::unavailable(
                "no current policy from consent-svc: nothing can be collected until it answers",
            ));
        }
        let orgs = self
            .orgs
            .read()
            .map_err(|_| Status::unavailable("policy cache unavailable"))?;
        Ok(match orgs.get(org_id) {
            Some(entry) => entry
                .instances
                .get(instance_id)
                .unwrap_or(&entry.plan)
                .clone(),
            None => Arc::new(self.compile(&default_policy(org_id))),
        })
    }

    /// The current revision an instance's records are enforced under.
    pub fn revision(&self, org_id: &str, instance_id: &str) -> Option<u64> {
        self.plan(org_id, instance_id).ok().map(|p| p.revision)
    }

    /// The org-level policies held now (for purges).
    pub fn policies(&self) -> Vec<Arc<consent_pb::Policy>> {
        self.orgs
            .read()
            .map(|orgs| orgs.values().map(|e| e.policy.clone()).collect())
            .unwrap_or_default()
    }

    fn compile(&self, policy: &consent_pb::Policy) -> Plan {
        let key = self
            .keys
            .org_key(policy.pseudonym_key_version, &policy.org_id);
        Plan::compile(policy, self.classes.clone(), key)
    }

    fn entry(&self, message: &consent_pb::WatchPolicyResponse) -> Option<(String, OrgEntry)> {
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

    /// Applies one message of the stream; a snapshot replaces everything once complete.
    fn apply_message(
        &self,
        message: &consent_pb::WatchPolicyResponse,
        snapshot: &mut Option<HashMap<String, OrgEntry>>,
    ) {
        let entry = self.entry(message);
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
                tracing::info!("policy snapshot received; enforcing");
            }
        } else if let Some((org, entry)) = entry
            && let Ok(mut orgs) = self.orgs.write()
        {
            let newer = orgs
                .get(&org)
                .is_none_or(|old| old.plan.revision <= entry.plan.revision);
            if newer {
                orgs.insert(org, entry);
            }
        }
        self.changed.notify_waiters();
    }

    /// Fails closed: nothing is allowed until the next complete snapshot.
    fn clear(&self) {
        self.ready.store(false, Ordering::SeqCst);
        if let Ok(mut orgs) = self.orgs.write() {
            orgs.clear();
        }
    }
}

impl PolicyFollower for Policies {
    fn begin_snapshot(&self) {
        if let Ok(mut snapshot) = self.snapshot.lock() {
            *snapshot = Some(HashMap::new());
        }
    }

    fn apply(&self, message: &consent_pb::WatchPolicyResponse) {
        if let Ok(mut snapshot) = self.snapshot.lock() {
            self.apply_message(message, &mut snapshot);
        }
    }

    fn lose(&self) {
        self.clear();
    }

    fn is_ready(&self) -> bool {
        Policies::is_ready(self)
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
