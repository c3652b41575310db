//! Replicas on one PostgreSQL: every change a replica applies is announced on the store's channel
//! (`pg_notify` in the applying transaction, so only a committed change is announced), and every
//! replica listens there and tells its own WatchPolicy streams. A watcher on any replica so sees
//! every change, whichever replica made it.
//!
//! Notifications sent while a listener's connection is down are lost: after it reconnects, the
//! replica sends every org's current policies to its watchers again, so none is left behind.

use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::grpc::ConsentApi;
use crate::store::Notice;

/// A listener on `channel`, connected and listening.
pub async fn listen(url: &str, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

/// Tells `api`'s watchers of the changes other replicas apply, until `stop`.
pub async fn follow(
    mut listener: PgListener,
    url: String,
    channel: String,
    api: ConsentApi,
    stop: CancellationToken,
) {
    let origin = api.origin().to_owned();
    loop {
        let notice = tokio::select! {
            () = stop.cancelled() => return,
            notice = listener.try_recv() => notice,
        };
        match notice {
            Ok(Some(notification)) => {
                match serde_json::from_str::<Notice>(notification.payload()) {
                    Ok(notice) if notice.origin != origin => {
                        api.publish(&notice.org_id, notice.instance_ids).await;
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "unreadable policy notice"),
                }
            }
            // The connection was lost (the next call reconnects), or failed: listen again, then
            // send every org anew, for what was announced meanwhile went unheard.
            Ok(None) | Err(_) => {
                tracing::warn!("policy notices from other replicas interrupted; listening again");
                listener = loop {
                    match listen(&url, &channel).await {
                        Ok(listener) => break listener,
                        Err(error) => {
                            tracing::warn!(%error, "cannot listen for policy notices; retrying");
                            tokio::select! {
                                () = stop.cancelled() => return,
                                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                };
                api.publish_all().await;
            }
        }
    }
}
