//! One path for every batch: Ingest, each batch of IngestStream and PreviewSample run [`process`];
//! only the sink differs (the location's durable store, or one that discards), so a preview cannot
//! drift from what an ingest stores.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use prost::Message;
use sightline_proto::collector::v1::{self as pb, DropReason};
use tonic::Status;

use crate::enforce::{self, Enforced, Plan, Verdict};
use crate::store::{Batch, BatchOutcome, Row, RowOutcome, View};
use crate::writer::Writer;

/// Events a batch may hold.
pub const MAX_BATCH: usize = 1_000;
/// Rejected events a reply lists.
const MAX_REJECTED_LISTED: usize = 100;

/// Where enforced batches go.
#[async_trait]
pub trait Sink: Send + Sync {
    async fn write(&self, batch: Batch) -> Result<BatchOutcome, Status>;
}

#[async_trait]
impl Sink for Writer {
    async fn write(&self, batch: Batch) -> Result<BatchOutcome, Status> {
        Writer::write(self, batch).await
    }
}

/// The sink of PreviewSample: stores nothing, and says every row would be stored.
#[derive(Debug, Clone, Copy)]
pub struct Discard;

#[async_trait]
impl Sink for Discard {
    async fn write(&self, batch: Batch) -> Result<BatchOutcome, Status> {
        Ok(BatchOutcome::Committed(vec![
            RowOutcome::Stored;
            batch.rows.len()
        ]))
    }
}

/// The refusal of a whole batch (nothing of it is stored).
pub fn check_batch(events: &[pb::Event]) -> Result<(), Status> {
    if events.is_empty() {
        return Err(Status::invalid_argument(
            "events: a batch holds 1 to 1000 events",
        ));
    }
    if events.len() > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "events: {} events; a batch holds at most {MAX_BATCH}",
            events.len()
        )));
    }
    let mut seen = HashSet::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        if !event.event_id.is_empty() && !seen.insert(event.event_id.as_str()) {
            return Err(Status::invalid_argument(format!(
                "events[{i}].event_id: repeats an earlier event id of the batch"
            )));
        }
    }
    Ok(())
}

/// UNAVAILABLE with the policy's retry hint, for an org whose data is moving.
pub fn moving(plan: &Plan) -> Status {
    let mut status =
        Status::unavailable("the org's data is moving to another location; retry later");
    if let Ok(value) = plan.retry_after_ms.max(1).to_string().parse() {
        status.metadata_mut().insert("retry-after-ms", value);
    }
    status
}

/// What one batch came to.
#[derive(Debug, Clone, Default)]
pub struct Processed {
    pub result: pb::IngestResult,
    /// Per event, for PreviewSample (empty otherwise).
    pub previews: Vec<pb::PreviewedEvent>,
}

#[derive(Debug, Default)]
struct Counts([u32; 9]);

impl Counts {
    fn add(&mut self, reason: DropReason) {
        if let Some(slot) = self.0.get_mut(reason as usize) {
            *slot += 1;
        }
        metrics::counter!("sightline_collector_events_total", "outcome" => reason_name(reason))
            .increment(1);
    }

    fn into_pb(self) -> Vec<pb::DropCount> {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .filter_map(|(reason, count)| {
                Some(pb::DropCount {
                    reason: i32::try_from(reason).ok()?,
                    count: *count,
                })
            })
            .collect()
    }
}

fn reason_name(reason: DropReason) -> &'static str {
    match reason {
        DropReason::Unspecified => "unspecified",
        DropReason::Consent => "consent",
        DropReason::Channel => "channel",
        DropReason::Anonymous => "anonymous",
        DropReason::ExcludedGroup => "excluded_group",
        DropReason::BlockingTime => "blocking_time",
        DropReason::Duplicate => "duplicate",
        DropReason::Invalid => "invalid",
        DropReason::OutOfWindow => "out_of_window",
    }
}

fn row_of(stored: &enforce::StoredEvent) -> Row {
    let view = stored.view.as_ref().map(|v| View {
        page_id: v.page_id.clone(),
        space_id: v.space_id.clone(),
        channel: i64::from(v.channel),
        viewer: v.viewer.clone(),
    });
    Row {
        event_id: stored.event_id.clone(),
        kind: stored.kind as i64,
        occurred_at: stored.occurred_at_ms,
        name: stored.name.clone(),
        // A page view keeps its channel here, so an erasure can take it off its counter.
        value: match &view {
            Some(v) => Some(f64::from(u8::try_from(v.channel).unwrap_or(0))),
            None => stored.value,
        },
        subject: stored.subject.clone(),
        body: stored.event.encode_to_vec(),
        view,
    }
}

/// Enforces `plan` on a batch of one instance and writes what it keeps to `sink`.
pub async fn process(
    plan: &Arc<Plan>,
    instance_id: &str,
    location: &str,
    events: Vec<pb::Event>,
    now_ms: i64,
    sink: &dyn Sink,
    preview: bool,
) -> Result<Processed, Status> {
    check_batch(&events)?;
    if plan.moving {
        return Err(moving(plan));
    }
    let mut counts = Counts::default();
    let mut rejected = Vec::new();
    let mut enforced: Vec<Enforced> = Vec::with_capacity(events.len());
    for (index, event) in events.into_iter().enumerate() {
        enforced.push(enforce::enforce(plan, event, index, now_ms, preview));
    }
    let mut rows = Vec::with_capacity(enforced.len());
    for item in &enforced {
        match &item.verdict {
            Verdict::Keep(stored) => rows.push(row_of(stored)),
            Verdict::Drop(reason) => counts.add(*reason),
            Verdict::Reject(reason, message) => {
                counts.add(*reason);
                if rejected.len() < MAX_REJECTED_LISTED {
                    rejected.push(pb::RejectedEvent {
                        event_id: item.event_id.clone(),
                        reason: *reason as i32,
                        message: message.clone(),
                    });
                }
            }
        }
    }
    let mut outcomes = Vec::new();
    if !rows.is_empty() {
        let batch = Batch {
            org_id: plan.org_id.clone(),
            instance_id: instance_id.to_owned(),
            location: location.to_owned(),
            consent_version: i64::try_from(plan.consent_version).unwrap_or(i64::MAX),
            policy_revision: i64::try_from(plan.revision).unwrap_or(i64::MAX),
            stored_at: now_ms,
            blocking_time_ms: plan.tracking.blocking_time_ms,
            rows,
        };
        outcomes = match sink.write(batch).await? {
            BatchOutcome::Committed(outcomes) => outcomes,
            BatchOutcome::Stale => {
                let mut status = Status::unavailable(
                    "the org's policy changed while the batch was checked; nothing of it was stored: resend it",
                );
                status.metadata_mut().insert(
                    "retry-after-ms",
                    tonic::metadata::MetadataValue::from(10u32),
                );
                return Err(status);
            }
        };
    }
    let mut accepted = 0;
    let mut outcome = outcomes.into_iter();
    let mut previews = Vec::new();
    for item in enforced {
        let (kept, reason, stored, message) = match item.verdict {
            Verdict::Keep(stored) => match outcome.next().unwrap_or(RowOutcome::Stored) {
                RowOutcome::Stored => {
                    accepted += 1;
                    metrics::counter!("sightline_collector_events_total", "outcome" => "accepted")
                        .increment(1);
                    (
                        true,
                        DropReason::Unspecified,
                        Some(stored.event),
                        String::new(),
                    )
                }
                RowOutcome::Duplicate => {
                    counts.add(DropReason::Duplicate);
                    (false, DropReason::Duplicate, None, String::new())
                }
                RowOutcome::Blocked => {
                    counts.add(DropReason::BlockingTime);
                    (false, DropReason::BlockingTime, None, String::new())
                }
            },
            Verdict::Drop(reason) => (false, reason, None, String::new()),
            Verdict::Reject(reason, message) => (false, reason, None, message),
        };
        if preview {
            let report = item.report.unwrap_or_default();
            previews.push(pb::PreviewedEvent {
                event_id: item.event_id,
                kept,
                drop_reason: reason as i32,
                stored: if kept { stored } else { None },
                removed_fields: if kept { report.removed } else { Vec::new() },
                hashed_fields: if kept { report.hashed } else { Vec::new() },
                scrubbed_fields: if kept { report.scrubbed } else { Vec::new() },
                message,
            });
        }
    }
    Ok(Processed {
        result: pb::IngestResult {
            accepted,
            dropped: counts.into_pb(),
            consent_version: plan.consent_version,
            rejected,
            policy_revision: plan.revision,
        },
        previews,
    })
}
