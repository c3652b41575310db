//! Following consent-svc's WatchPolicy stream for every org (with the service token): a snapshot
//! first, then each change in commit order. Enforcement points (collector-svc, insights-svc) hand
//! each message to their own [`PolicyFollower`]; whenever the stream is lost they are told to fail
//! closed, and it is opened again with backoff until `shutdown`.

use std::sync::Arc;
use std::time::Duration;

use sightline_proto::consent::v1 as consent_pb;
use sightline_proto::consent::v1::consent_service_client::ConsentServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::Channel;

use crate::auth::authorize;
use crate::settings::Secret;

/// What a service does with the stream.
pub trait PolicyFollower: Send + Sync {
    /// A new stream opened: its messages up to `snapshot_complete` are the whole snapshot.
    fn begin_snapshot(&self);
    /// One message of the stream.
    fn apply(&self, message: &consent_pb::WatchPolicyResponse);
    /// The stream is lost: allow nothing until the next complete snapshot.
    fn lose(&self);
    /// Whether a complete snapshot is held (a follower that has one retries sooner).
    fn is_ready(&self) -> bool;
    /// The fence between this follower's commits and its policy changes: each message (and the
    /// loss of the stream) is applied only once every commit holding the fence has answered.
    fn fence(&self) -> &Fence;
    /// How long until the next subscription is tried (for the retry hint of refused calls).
    fn next_try_in(&self, wait: Duration);
}

/// A follower that keeps the policies in a [`PolicyTable`]: it says where its table is and what
/// entry a message makes; the rest of [`PolicyFollower`] is the table's.
pub trait TableFollower: Send + Sync {
    type Entry: Revisioned + Send + Sync;
    fn table(&self) -> &PolicyTable<Self::Entry>;
    /// The org and its entry a message carries (None for a message that carries no policy).
    fn entry(&self, message: &consent_pb::WatchPolicyResponse) -> Option<(String, Self::Entry)>;

    /// Whether a complete snapshot is held, as it changes (health follows it).
    fn readiness(&self) -> tokio::sync::watch::Receiver<bool> {
        self.table().readiness()
    }

    /// Woken on every change (the purge appliers wait on it).
    fn changed(&self) -> &tokio::sync::Notify {
        &self.table().changed
    }
}

impl<T: TableFollower> PolicyFollower for T {
    fn begin_snapshot(&self) {
        self.table().begin_snapshot();
    }

    fn apply(&self, message: &consent_pb::WatchPolicyResponse) {
        self.table().apply(message, self.entry(message));
    }

    fn lose(&self) {
        self.table().lose();
    }

    fn is_ready(&self) -> bool {
        self.table().is_ready()
    }

    fn fence(&self) -> &Fence {
        &self.table().fence
    }

    fn next_try_in(&self, wait: Duration) {
        self.table().next_try_in(wait);
    }
}

/// Orders an enforcement point's commits against the policy changes it applies. A commit holds the
/// fence ([`Fence::enter`]) from the moment it checks the policy revision its rows were enforced
/// under until its caller has the answer; a change is applied under [`Fence::close`], which waits
/// for those commits and keeps new ones out until the change is in place. So once a new revision is
/// applied, no commit checked under an older one is still to be acknowledged, and a commit that
/// starts after it sees the new revision: an opt-out is a fence, with no sleep. (Tokio's lock is
/// fair: a waiting change is not starved by a stream of commits.)
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<tokio::sync::RwLock<()>>);

/// A commit's hold on the fence; shared by the batches of one group commit, and kept until each
/// has handed its answer on.
pub type Held = Arc<tokio::sync::OwnedRwLockReadGuard<()>>;

impl Fence {
    pub async fn enter(&self) -> Held {
        Arc::new(self.0.clone().read_owned().await)
    }

    pub async fn close(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.0.clone().write_owned().await
    }
}

/// Follows the stream until `shutdown`, resubscribing whenever it is lost. The policy is a lease:
/// a stream that brings nothing — no change, no heartbeat — for `lease` is treated as lost, so an
/// enforcement point that cannot hear consent-svc (a silent partition) fails closed within `lease`.
pub async fn follow(
    follower: Arc<dyn PolicyFollower>,
    consent: Channel,
    token: Secret,
    lease: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = watch_once(follower.as_ref(), consent.clone(), &token, lease) => outcome,
        };
        {
            let _closed = follower.fence().close().await;
            follower.lose();
        }
        metrics::gauge!(crate::metrics::POLICY_HELD).set(0.0);
        let reason = match &outcome {
            Ok(()) => "ended",
            Err(Lost::Lease) => "lease",
            Err(Lost::Status(_)) => "error",
        };
        metrics::counter!(crate::metrics::POLICY_LOST, "reason" => reason).increment(1);
        match outcome {
            Ok(()) => tracing::warn!("policy stream ended; failing closed and resubscribing"),
            Err(Lost::Lease) => tracing::warn!(
                lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
                "nothing heard from consent-svc within the policy lease; failing closed and resubscribing"
            ),
            Err(Lost::Status(status)) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "policy stream lost; failing closed and resubscribing")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
        if follower.is_ready() {
            backoff = Duration::from_millis(50);
        }
        follower.next_try_in(backoff);
    }
}

/// Why a stream was given up.
enum Lost {
    Status(Status),
    /// Nothing arrived within the lease.
    Lease,
}

impl From<Status> for Lost {
    fn from(status: Status) -> Self {
        Self::Status(status)
    }
}

async fn watch_once(
    follower: &dyn PolicyFollower,
    consent: Channel,
    token: &Secret,
    lease: Duration,
) -> Result<(), Lost> {
    let mut request = tonic::Request::new(consent_pb::WatchPolicyRequest::default());
    authorize(&mut request, token)?;
    let mut client = ConsentServiceClient::new(consent).max_decoding_message_size(64 * 1024 * 1024);
    let mut stream = tokio::time::timeout(lease, client.watch_policy(request))
        .await
        .map_err(|_| Lost::Lease)??
        .into_inner();
    follower.begin_snapshot();
    loop {
        let next = tokio::time::timeout(lease, stream.message())
            .await
            .map_err(|_| Lost::Lease)??;
        let Some(message) = next else { return Ok(()) };
        // A heartbeat only renews the lease.
        if message.heartbeat {
            continue;
        }
        let _closed = follower.fence().close().await;
        follower.apply(&message);
        if message.snapshot_complete {
            metrics::gauge!(crate::metrics::POLICY_HELD).set(1.0);
        }
    }
}

/// What a follower holds per org, with the revision that orders replacements.
pub trait Revisioned {
    fn revision(&self) -> u64;
}

/// The policies of every org as a follower holds them: the messages of a new stream build a
/// snapshot that replaces everything once complete (until then, and after the stream is lost,
/// nothing is ready); later messages replace one org's entry unless it is older than the one held.
#[derive(Debug)]
pub struct PolicyTable<E> {
    orgs: std::sync::RwLock<std::collections::HashMap<String, E>>,
    pending: std::sync::Mutex<Option<std::collections::HashMap<String, E>>>,
    /// Woken on every message (purge appliers wait on it).
    pub changed: tokio::sync::Notify,
    /// Between the follower's commits and its changes.
    pub fence: Fence,
    /// Whether a complete snapshot is held (calls and health follow it: NOT_SERVING until it is).
    ready_watch: tokio::sync::watch::Sender<bool>,
    /// What a refused caller is told to wait: the time to the next subscription and its snapshot.
    retry_ms: std::sync::atomic::AtomicU64,
}

/// A snapshot's expected time after the stream opens, added to the retry hint.
const SNAPSHOT_MS: u64 = 50;

impl<E> Default for PolicyTable<E> {
    fn default() -> Self {
        Self {
            orgs: std::sync::RwLock::new(std::collections::HashMap::new()),
            pending: std::sync::Mutex::new(None),
            changed: tokio::sync::Notify::new(),
            fence: Fence::default(),
            ready_watch: tokio::sync::watch::Sender::new(false),
            retry_ms: std::sync::atomic::AtomicU64::new(SNAPSHOT_MS),
        }
    }
}

impl<E: Revisioned> PolicyTable<E> {
    pub fn is_ready(&self) -> bool {
        *self.ready_watch.borrow()
    }

    /// Follows readiness (for health: NOT_SERVING until a complete snapshot is held).
    pub fn readiness(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready_watch.subscribe()
    }

    /// UNAVAILABLE for a call that needs a policy while none is held, with the expected wait.
    pub fn unavailable(&self, message: &str) -> Status {
        crate::ratelimit::retry_after(Status::unavailable(message.to_owned()), self.retry_ms())
    }

    /// How long a call that needs a policy while none is held should wait, in milliseconds.
    pub fn retry_ms(&self) -> u64 {
        self.retry_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records when the next subscription is tried.
    pub fn next_try_in(&self, wait: Duration) {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.retry_ms.store(
            ms.saturating_add(SNAPSHOT_MS),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn begin_snapshot(&self) {
        if let Ok(mut pending) = self.pending.lock() {
            *pending = Some(std::collections::HashMap::new());
        }
    }

    /// Takes one message's entry (org id and what the follower made of it).
    pub fn apply(&self, message: &consent_pb::WatchPolicyResponse, entry: Option<(String, E)>) {
        if let Ok(mut pending) = self.pending.lock() {
            if let Some(snapshot) = pending.as_mut() {
                if let Some((org, entry)) = entry {
                    snapshot.insert(org, entry);
                }
                if message.snapshot_complete {
                    let complete = pending.take().unwrap_or_default();
                    if let Ok(mut orgs) = self.orgs.write() {
                        *orgs = complete;
                        self.retry_ms
                            .store(SNAPSHOT_MS, std::sync::atomic::Ordering::Relaxed);
                        self.ready_watch.send_replace(true);
                    }
                    tracing::info!("policy snapshot received");
                }
            } else if let Some((org, entry)) = entry
                && let Ok(mut orgs) = self.orgs.write()
                && orgs
                    .get(&org)
                    .is_none_or(|old| old.revision() <= entry.revision())
            {
                orgs.insert(org, entry);
            }
        }
        self.changed.notify_waiters();
    }

    /// Fails closed: nothing is ready until the next complete snapshot.
    pub fn lose(&self) {
        self.ready_watch.send_replace(false);
        if let Ok(mut orgs) = self.orgs.write() {
            orgs.clear();
        }
    }

    /// Reads the held entries (None when the table is poisoned).
    pub fn read<R>(&self, f: impl FnOnce(&std::collections::HashMap<String, E>) -> R) -> Option<R> {
        self.orgs.read().ok().map(|orgs| f(&orgs))
    }
}
