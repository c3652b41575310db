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
}

/// Follows the stream until `shutdown`, resubscribing whenever it is lost.
pub async fn follow(
    follower: Arc<dyn PolicyFollower>,
    consent: Channel,
    token: Secret,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = watch_once(follower.as_ref(), consent.clone(), &token) => outcome,
        };
        follower.lose();
        match outcome {
            Ok(()) => tracing::warn!("policy stream ended; resubscribing"),
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "policy stream lost; resubscribing")
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
    }
}

async fn watch_once(
    follower: &dyn PolicyFollower,
    consent: Channel,
    token: &Secret,
) -> Result<(), Status> {
    let mut request = tonic::Request::new(consent_pb::WatchPolicyRequest::default());
    authorize(&mut request, token)?;
    let mut stream = ConsentServiceClient::new(consent)
        .max_decoding_message_size(64 * 1024 * 1024)
        .watch_policy(request)
        .await?
        .into_inner();
    follower.begin_snapshot();
    while let Some(message) = stream.message().await? {
        follower.apply(&message);
    }
    Ok(())
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
    ready: std::sync::atomic::AtomicBool,
    /// Woken on every message (purge appliers wait on it).
    pub changed: tokio::sync::Notify,
}

impl<E> Default for PolicyTable<E> {
    fn default() -> Self {
        Self {
            orgs: std::sync::RwLock::new(std::collections::HashMap::new()),
            pending: std::sync::Mutex::new(None),
            ready: std::sync::atomic::AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }
}

impl<E: Revisioned> PolicyTable<E> {
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::SeqCst)
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
                        self.ready.store(true, std::sync::atomic::Ordering::SeqCst);
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
        self.ready.store(false, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut orgs) = self.orgs.write() {
            orgs.clear();
        }
    }

    /// Reads the held entries (None when the table is poisoned).
    pub fn read<R>(&self, f: impl FnOnce(&std::collections::HashMap<String, E>) -> R) -> Option<R> {
        self.orgs.read().ok().map(|orgs| f(&orgs))
    }
}
