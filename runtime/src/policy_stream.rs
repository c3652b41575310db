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
