//! CollectorService's ingest: one batch (Ingest) or a stream of them (IngestStream), each
//! enforced against the org's policy and acknowledged once durably committed; and the preview of
//! what a sample would send.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn ingest(
    api: &CollectorApi,
    request: Request<pb::IngestRequest>,
) -> GrpcResult<pb::IngestResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let (org_id, instance_id) = CollectorApi::instance_of(&caller)?;
    let processed = api
        .ingest_batch(&org_id, &instance_id, request.into_inner().events)
        .await?;
    if processed.held.is_some() {
        api.policies
            .hand_over(&org_id, &instance_id, &processed.result);
    }
    Ok(Response::new(pb::IngestResponse {
        result: Some(processed.result),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn ingest_stream(
    api: &CollectorApi,
    request: Request<Streaming<pb::IngestStreamRequest>>,
) -> GrpcResult<<CollectorApi as CollectorService>::IngestStreamStream> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let (org_id, instance_id) = CollectorApi::instance_of(&caller)?;
    // The credential is checked again for every batch (from the cache), so a revoked one stops
    // the stream within the cache's lifetime.
    let mut probe = Request::new(());
    *probe.metadata_mut() = request.metadata().clone();
    let mut inbound = request.into_inner();
    let (tx, rx) = mpsc::channel(16);
    let api = api.clone();
    let (policies, org_id, instance_id) =
        (api.policies.clone(), org_id.clone(), instance_id.clone());
    let (org, instance) = (org_id.clone(), instance_id.clone());
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                () = api.shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("the collector is shutting down"))).await;
                    break;
                }
                next = inbound.message() => next,
            };
            let message = match next {
                Ok(Some(message)) => message,
                Ok(None) | Err(_) => break,
            };
            if let Err(status) = api.credentials.authenticate(&probe).await {
                if status.code() == Code::Unauthenticated {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
                let ack = pb::IngestStreamResponse {
                    batch_id: message.batch_id,
                    result: None,
                    error: Some(batch_error(&status)),
                };
                if tx.send(Ok((ack, None))).await.is_err() {
                    break;
                }
                continue;
            }
            let answer = match api.limiter.check_caller(&caller) {
                Ok(()) => {
                    api.ingest_batch(&org_id, &instance_id, message.events)
                        .await
                }
                Err(status) => Err(status),
            };
            let (ack, held) = match answer {
                Ok(processed) => (
                    pb::IngestStreamResponse {
                        batch_id: message.batch_id,
                        result: Some(processed.result),
                        error: None,
                    },
                    processed.held,
                ),
                Err(status) => (
                    pb::IngestStreamResponse {
                        batch_id: message.batch_id,
                        result: None,
                        error: Some(batch_error(&status)),
                    },
                    None,
                ),
            };
            // The commit's hold on the policy fence goes with the ack, and is let go only when
            // the transport takes the ack (below): an ack of a commit checked under the old
            // revision is on the wire before a new revision can be applied.
            if tx.send(Ok((ack, held))).await.is_err() {
                break;
            }
        }
    });
    let acks = ReceiverStream::new(rx).map(move |item| {
        item.map(|(ack, held)| {
            if held.is_some()
                && let Some(result) = &ack.result
            {
                policies.hand_over(&org, &instance, result);
            }
            ack
        })
    });
    Ok(Response::new(Box::pin(acks)))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn preview_sample(
    api: &CollectorApi,
    request: Request<pb::PreviewSampleRequest>,
) -> GrpcResult<pb::PreviewSampleResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.into_inner();
    let scope = api
        .scope(caller, &r.org_id, &r.instance_id, true, false)
        .await?;
    let instance_id = scope.instance_id.clone().unwrap_or_default();
    let plan = api.policies.plan(&scope.org_id, &instance_id)?;
    let processed = crate::ingest::process(
        &plan,
        &instance_id,
        &location_name(plan.location),
        r.events,
        api.clock.now_ms(),
        &Discard,
        true,
    )
    .await?;
    Ok(Response::new(pb::PreviewSampleResponse {
        events: processed.previews,
        consent_version: plan.consent_version,
        policy_revision: plan.revision,
    }))
}
