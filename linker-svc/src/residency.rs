//! Where an org's instance metadata lives (SPEC E10). linker-svc keeps the rows that identify and
//! route in its own database — orgs, token, link-key and credential digests, instances' ids and
//! server ids, domain claims, imported licenses and the audit chain — because they are needed to
//! find an org before its location is known. An instance's detection and connection metadata (base
//! URL, product, version, license SEN, node count, app links) follows the org's data location: it
//! lives in that location's store, as collector-svc and insights-svc keep theirs, and moves with the
//! org (linker-svc is a data owner of every move).
//!
//! The locations come from consent-svc's WatchPolicy stream, followed with the service token. Until
//! a complete snapshot is held, metadata is not written (UNAVAILABLE with a retry hint): nothing is
//! put in a store the org's location does not name. Reads meanwhile look in every store open, so
//! the services that check an instance's org through ListInstances (consent-svc among them) never
//! wait on consent-svc. A linker-svc started without
//! consent-svc's address (a linker alone, as some tests run it) keeps all metadata in its own
//! database.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sightline_proto::common::v1::Location;
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::location::{
    Located, StoreUrls, location_name, read_location, report_move_part,
};
use sightline_runtime::policy_stream::{
    Held, PolicyFollower, PolicyTable, Revisioned, TableFollower,
};
use sightline_runtime::ratelimit::retry_after;
use sightline_runtime::{Secret, SharedClock};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::Channel;

use crate::error::LinkerError;
use crate::store::{self, AuditDraft, InstanceFacts, LinkerStore, OrgFacts};

/// The name linker-svc reports its part of a move under (`residency.data_owners`).
pub const MOVE_OWNER: &str = "linker";

/// An org's policy as linker-svc holds it: only where its data lives and whether it moves.
#[derive(Debug, Clone)]
pub struct OrgPolicy(Arc<consent_pb::Policy>);

impl Revisioned for OrgPolicy {
    fn revision(&self) -> u64 {
        self.0.revision
    }
}

/// The org-level policies followed from consent-svc.
#[derive(Debug, Default)]
pub struct LocationPolicies {
    table: PolicyTable<OrgPolicy>,
}

impl TableFollower for LocationPolicies {
    type Entry = OrgPolicy;

    fn table(&self) -> &PolicyTable<OrgPolicy> {
        &self.table
    }

    fn entry(&self, message: &consent_pb::WatchPolicyResponse) -> Option<(String, OrgPolicy)> {
        message
            .policy
            .as_ref()
            .map(|p| (p.org_id.clone(), OrgPolicy(Arc::new(p.clone()))))
    }
}

/// The stores an org's instance metadata is read from, first to last: its location's, and while
/// linker-svc's part of a move is not reported, the old location's first.
#[derive(Debug)]
pub struct ReadStores(Vec<Arc<dyn LinkerStore>>);

impl ReadStores {
    /// The metadata of `instance_ids`, from the first store that holds each.
    pub async fn facts_of(
        &self,
        instance_ids: &[String],
    ) -> Result<Vec<InstanceFacts>, LinkerError> {
        let mut found: Vec<InstanceFacts> = Vec::new();
        for store in &self.0 {
            let missing = still_missing(instance_ids, found.iter().map(|f| &f.instance_id));
            if missing.is_empty() {
                break;
            }
            found.extend(store.instance_facts_of(&missing).await?);
        }
        Ok(found)
    }

    /// The app links of `instance_ids`, from the first store that holds any of each instance's.
    pub async fn app_links_of(
        &self,
        instance_ids: &[String],
    ) -> Result<Vec<store::AppLinkRecord>, LinkerError> {
        let mut found: Vec<store::AppLinkRecord> = Vec::new();
        for store in &self.0 {
            let missing = still_missing(instance_ids, found.iter().map(|a| &a.instance_id));
            if missing.is_empty() {
                break;
            }
            found.extend(store.app_links_of(&missing).await?);
        }
        found.sort_by(|a, b| (&a.instance_id, &a.url).cmp(&(&b.instance_id, &b.url)));
        Ok(found)
    }
}

/// The ids of `wanted` that are not among `found`.
fn still_missing<'a>(wanted: &[String], found: impl Iterator<Item = &'a String>) -> Vec<String> {
    let found: std::collections::HashSet<&String> = found.collect();
    wanted
        .iter()
        .filter(|id| !found.contains(id))
        .cloned()
        .collect()
}

/// What the located stores need to follow consent-svc and report moves.
#[derive(Debug, Clone)]
struct Followed {
    consent: Channel,
    service_token: Secret,
}

/// linker-svc's located stores and the policies that place an org in them.
#[derive(Debug)]
pub struct Residency {
    main: Arc<dyn LinkerStore>,
    stores: Located<Arc<dyn LinkerStore>>,
    policies: Arc<LocationPolicies>,
    followed: OnceLock<Followed>,
    clock: SharedClock,
    passes: tokio::sync::Mutex<()>,
}

impl Residency {
    /// The stores `urls` name; GLOBAL's (unless named) and any whose URL is `main_url` is `main`.
    pub fn new(
        main: Arc<dyn LinkerStore>,
        main_url: String,
        urls: StoreUrls,
        clock: SharedClock,
    ) -> Self {
        let opener_main = main.clone();
        let global_named = urls.locations.contains_key("global");
        let stores = Located::new(
            urls,
            Arc::new(move |location, url| {
                let (main, main_url) = (opener_main.clone(), main_url.clone());
                Box::pin(async move {
                    if url == main_url || (location == "global" && !global_named) {
                        Ok(main)
                    } else {
                        store::open(&url).await
                    }
                })
            }),
        );
        Self {
            main,
            stores,
            policies: Arc::new(LocationPolicies::default()),
            followed: OnceLock::new(),
            clock,
            passes: tokio::sync::Mutex::new(()),
        }
    }

    /// Opens the location stores that hold data already, so moves reach them after a restart.
    pub async fn open_existing(&self) -> Result<(), sightline_runtime::storage::StorageError> {
        self.stores.open_existing().await
    }

    /// Starts following consent-svc's policies (once; later calls do nothing): from now on an org's
    /// metadata goes to its location's store, and linker-svc carries out its part of each move.
    pub fn follow(
        self: &Arc<Self>,
        consent: Channel,
        service_token: Secret,
        lease: Duration,
        shutdown: CancellationToken,
    ) {
        let followed = Followed {
            consent: consent.clone(),
            service_token: service_token.clone(),
        };
        if self.followed.set(followed).is_err() {
            return;
        }
        tokio::spawn(sightline_runtime::policy_stream::follow(
            self.policies.clone(),
            consent,
            service_token,
            lease,
            shutdown.clone(),
        ));
        let residency = self.clone();
        tokio::spawn(async move {
            loop {
                let changed = residency.policies.table.changed.notified();
                if let Err(error) = residency.move_pass().await {
                    tracing::warn!(%error, "linker-svc's part of a residency move failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = changed => {}
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }

    /// Whether a complete policy snapshot is held (tests wait on it).
    pub fn is_ready(&self) -> bool {
        self.followed.get().is_none() || self.policies.is_ready()
    }

    /// UNAVAILABLE while no policy snapshot is held, with the expected wait.
    fn no_policy(&self) -> Status {
        self.policies.table.unavailable(
            "no current policy from consent-svc, so the org's data location is unknown: retry when it answers",
        )
    }

    fn policy(&self, org_id: &str) -> Result<Option<Arc<consent_pb::Policy>>, Status> {
        if !self.policies.is_ready() {
            return Err(self.no_policy());
        }
        self.policies
            .table
            .read(|orgs| orgs.get(org_id).map(|p| p.0.clone()))
            .ok_or_else(|| Status::internal("policy state poisoned"))
    }

    /// The stores the org's instance metadata is read from.
    pub async fn for_read(&self, org_id: &str) -> Result<ReadStores, Status> {
        if self.followed.get().is_none() {
            return Ok(ReadStores(vec![self.main.clone()]));
        }
        if !self.policies.is_ready() {
            // Not knowing the location places nothing: a read looks in every store open.
            let mut stores = vec![self.main.clone()];
            stores.extend(
                self.stores
                    .open_now()
                    .into_iter()
                    .map(|(_, store)| store)
                    .filter(|store| !Arc::ptr_eq(store, &self.main)),
            );
            return Ok(ReadStores(stores));
        }
        let policy = self.policy(org_id)?;
        let mut stores = Vec::with_capacity(2);
        match policy.as_ref() {
            None => stores.push(self.stores.get(Location::Global).await?),
            // The policy names the old location until the move is done: until linker-svc's part is
            // reported the metadata is in the old store (or, mid-copy, both); after, in the new one.
            Some(policy) => match pending_move(policy) {
                Some(data_move) => {
                    stores.push(self.stores.get(data_move.from_location()).await?);
                    stores.push(self.stores.get(data_move.to_location()).await?);
                }
                None => stores.push(self.stores.get(read_location(policy, MOVE_OWNER)).await?),
            },
        }
        Ok(ReadStores(stores))
    }

    /// Refuses (UNAVAILABLE, with the expected wait) while no policy snapshot is held, so a link
    /// is turned away before anything of it is recorded.
    pub fn check_writable(&self) -> Result<(), Status> {
        if self.followed.get().is_some() && !self.policies.is_ready() {
            return Err(self.no_policy());
        }
        Ok(())
    }

    /// The store the org's instance metadata is written to, with the policy fence held until the
    /// write has answered (so a move that starts later finds it in the old store). Refused with
    /// the policy's retry hint while the org's data moves.
    pub async fn for_write(
        &self,
        org_id: &str,
    ) -> Result<(Arc<dyn LinkerStore>, Option<Held>), Status> {
        if self.followed.get().is_none() {
            return Ok((self.main.clone(), None));
        }
        let held = self.policies.table.fence.enter().await;
        let policy = self.policy(org_id)?;
        if let Some(policy) = policy.as_ref().filter(|p| p.moving) {
            return Err(retry_after(
                Status::unavailable(
                    "the org's data is moving to another location; its instance was linked, its metadata was not stored: link again later",
                ),
                u64::from(policy.retry_after_ms.max(1)),
            ));
        }
        let location = policy.as_ref().map_or(Location::Global, |p| p.location());
        Ok((self.stores.get(location).await?, Some(held)))
    }

    /// Carries out linker-svc's part of every data move under way: copies the org's instance
    /// metadata to the new location's store, checks it arrived, records the move in the org's
    /// audit log (`linker.residency_moved`, once per move), deletes the metadata from the old store
    /// and reports the part done to consent-svc. Each step may be repeated after a crash; between
    /// stores of one database there is nothing to carry. Returns how many parts it reported.
    pub async fn move_pass(&self) -> Result<u32, LinkerError> {
        let Some(followed) = self.followed.get() else {
            return Ok(0);
        };
        if !self.policies.is_ready() {
            return Ok(0);
        }
        let _pass = self.passes.lock().await;
        let moving: Vec<Arc<consent_pb::Policy>> = self
            .policies
            .table
            .read(|orgs| {
                orgs.values()
                    .filter(|p| pending_move(&p.0).is_some())
                    .map(|p| p.0.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut reported = 0;
        for policy in moving {
            let Some(data_move) = pending_move(&policy) else {
                continue;
            };
            let org_id = policy.org_id.as_str();
            let (from, to) = (data_move.from_location(), data_move.to_location());
            if !self.stores.same_database(from, to) {
                self.carry(org_id, &data_move.move_id, from, to).await?;
            }
            if report_move_part(
                followed.consent.clone(),
                &followed.service_token,
                org_id,
                consent_pb::ResidencyScope::Data,
                MOVE_OWNER,
            )
            .await
            .map_err(|s| LinkerError::Unavailable(s.message().to_owned()))?
            {
                reported += 1;
            }
        }
        Ok(reported)
    }

    async fn carry(
        &self,
        org_id: &str,
        move_id: &str,
        from: Location,
        to: Location,
    ) -> Result<(), LinkerError> {
        let unavailable = |s: Status| LinkerError::Unavailable(s.message().to_owned());
        let source = self.stores.get(from).await.map_err(unavailable)?;
        let target = self.stores.get(to).await.map_err(unavailable)?;
        let sent: OrgFacts = source.org_facts(org_id).await?;
        target.import_facts(&sent).await?;
        let arrived = target.org_facts(org_id).await?;
        let missing = sent
            .facts
            .iter()
            .filter(|f| !arrived.facts.contains(f))
            .count()
            + sent
                .app_links
                .iter()
                .filter(|a| !arrived.app_links.contains(a))
                .count();
        if missing > 0 {
            return Err(LinkerError::Internal(format!(
                "the copy of the org's instance metadata to {} is short by {missing} rows",
                location_name(to)
            )));
        }
        let draft = AuditDraft::new(
            self.clock.now_ms(),
            "service:linker",
            "linker.residency_moved",
            move_id.to_owned(),
        )
        .with("from", location_name(from))
        .with("to", location_name(to))
        .with("instances", sent.facts.len().to_string())
        .with("app_links", sent.app_links.len().to_string());
        self.main
            .append_audit_keyed(org_id, draft, &format!("linker.residency_moved:{move_id}"))
            .await?;
        source.delete_org_facts(org_id).await?;
        if let Err(error) = source.forget_deleted().await {
            tracing::warn!(%error, "moved rows may stay readable in the old store until the next checkpoint");
        }
        tracing::info!(%org_id, %move_id, instances = sent.facts.len(), "org instance metadata moved");
        Ok(())
    }
}

/// The org's data move whose linker-svc part is still to do.
fn pending_move(policy: &consent_pb::Policy) -> Option<&consent_pb::ResidencyMove> {
    policy
        .data_move
        .as_ref()
        .filter(|m| policy.moving && !m.reported_by.iter().any(|o| o == MOVE_OWNER))
}
