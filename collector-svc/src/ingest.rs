//! One path for every batch: Ingest, each batch of IngestStream and PreviewSample run [`process`];
//! only the sink differs (the location's durable store, or one that discards), so a preview cannot
//! drift from what an ingest stores.

use std::collections::HashSet;
use std::sync::Arc;

use crate::error::CollectorError;
use async_trait::async_trait;
use prost::Message;
use sightline_proto::collector::v1::{self as pb, DropReason};
use sightline_runtime::policy_stream::Held;

use crate::enforce::{self, Enforced, Plan, Verdict};
use crate::store::{Batch, BatchOutcome, Row, RowOutcome, View};
use crate::writer::{Writer, Written};

/// Events a batch may hold.
pub const MAX_BATCH: usize = 1_000;
/// Rejected events a reply lists.
const MAX_REJECTED_LISTED: usize = 100;

/// Where enforced batches go.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Whether the sink keeps rows' stored bodies (the encoded event); a sink that keeps nothing
    /// is spared encoding them.
    fn keeps_bodies(&self) -> bool {
        true
    }

    /// Commits a batch; the outcome comes with the commit's hold on the policy fence, which the
    /// caller keeps until its answer is on its way.
    async fn write(&self, batch: Batch) -> Result<Written, CollectorError>;
}

#[async_trait]
impl Sink for Writer {
    async fn write(&self, batch: Batch) -> Result<Written, CollectorError> {
        Writer::write(self, batch).await
    }
}

/// The sink of PreviewSample: stores nothing, and says every row would be stored.
#[derive(Debug, Clone, Copy)]
pub struct Discard;

#[async_trait]
impl Sink for Discard {
    fn keeps_bodies(&self) -> bool {
        false
    }

    async fn write(&self, batch: Batch) -> Result<Written, CollectorError> {
        Ok((
            BatchOutcome::Committed(vec![RowOutcome::Stored; batch.rows.len()]),
            None,
        ))
    }
}

/// The refusal of a whole batch (nothing of it is stored).
pub fn check_batch(events: &[pb::Event]) -> Result<(), CollectorError> {
    if events.is_empty() {
        return Err(CollectorError::InvalidArgument(
            "events: a batch holds 1 to 1000 events".to_owned(),
        ));
    }
    if events.len() > MAX_BATCH {
        return Err(CollectorError::InvalidArgument(format!(
            "events: {} events; a batch holds at most {MAX_BATCH}",
            events.len()
        )));
    }
    let mut seen = HashSet::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        if !event.event_id.is_empty() && !seen.insert(event.event_id.as_str()) {
            return Err(CollectorError::InvalidArgument(format!(
                "events[{i}].event_id: repeats an earlier event id of the batch"
            )));
        }
    }
    Ok(())
}

/// UNAVAILABLE with the policy's retry hint, for an org whose data is moving.
pub fn moving(plan: &Plan) -> CollectorError {
    CollectorError::unavailable(
        "the org's data is moving to another location; retry later",
        u64::from(plan.retry_after_ms.max(1)),
    )
}

/// What one batch came to.
#[derive(Debug, Clone, Default)]
pub struct Processed {
    pub result: pb::IngestResult,
    /// Per event, for PreviewSample (empty otherwise).
    pub previews: Vec<pb::PreviewedEvent>,
    /// The commit's hold on the policy fence: dropped once the answer is handed on.
    pub held: Option<Held>,
}

#[derive(Debug, Default)]
struct Counts([u32; 9]);

impl Counts {
    fn add(&mut self, reason: DropReason) {
        if let Some(slot) = self.0.get_mut(reason as usize) {
            *slot += 1;
        }
    }

    /// The reply's counts; the metrics are counted once per batch, not per event.
    fn into_pb(self, accepted: u32) -> Vec<pb::DropCount> {
        if accepted > 0 {
            metrics::counter!("sightline_collector_events_total", "outcome" => "accepted")
                .increment(u64::from(accepted));
        }
        self.0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .filter_map(|(reason, count)| {
                let reason = DropReason::try_from(i32::try_from(reason).ok()?).ok()?;
                metrics::counter!("sightline_collector_events_total", "outcome" => reason_name(reason))
                    .increment(u64::from(*count));
                Some(pb::DropCount {
                    reason: reason as i32,
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

/// The row of a kept event, its body encoded when `encode`; for a preview the event itself is kept
/// too (it is what the reply shows).
fn row_of(
    stored: enforce::StoredEvent,
    preview: bool,
    encode: bool,
) -> (Row, Option<Box<pb::Event>>) {
    let view = stored.view.map(|v| View {
        page_id: v.page_id,
        space_id: v.space_id,
        channel: i64::from(v.channel),
        viewer: v.viewer,
    });
    let body = if encode {
        stored.event.encode_to_vec()
    } else {
        Vec::new()
    };
    let row = Row {
        event_id: stored.event_id,
        kind: stored.kind as i64,
        occurred_at: stored.occurred_at_ms,
        name: stored.name,
        // A page view keeps its channel here, so an erasure can take it off its counter.
        value: match &view {
            Some(v) => Some(f64::from(u8::try_from(v.channel).unwrap_or(0))),
            None => stored.value,
        },
        subject: stored.subject,
        body,
        view,
    };
    (row, preview.then(|| Box::new(stored.event)))
}

/// One event's fate before the store has answered.
enum Fate {
    Kept(Option<Box<pb::Event>>),
    Dropped(DropReason),
    Rejected(DropReason, String),
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
) -> Result<Processed, CollectorError> {
    check_batch(&events)?;
    if plan.moving {
        return Err(moving(plan));
    }
    let mut counts = Counts::default();
    let mut rejected = Vec::new();
    let mut rows = Vec::with_capacity(events.len());
    let mut fates = Vec::with_capacity(events.len());
    for (index, event) in events.into_iter().enumerate() {
        let item: Enforced = enforce::enforce(plan, event, index, now_ms, preview);
        let fate = match item.verdict {
            Verdict::Keep(stored) => {
                let (row, shown) = row_of(*stored, preview, sink.keeps_bodies());
                rows.push(row);
                Fate::Kept(shown)
            }
            Verdict::Drop(reason) => {
                counts.add(reason);
                Fate::Dropped(reason)
            }
            Verdict::Reject(reason, message) => {
                counts.add(reason);
                if rejected.len() < MAX_REJECTED_LISTED {
                    rejected.push(pb::RejectedEvent {
                        event_id: item.event_id.clone(),
                        reason: reason as i32,
                        message: message.clone(),
                    });
                }
                Fate::Rejected(reason, message)
            }
        };
        fates.push((item.event_id, fate, item.report));
    }
    let mut outcomes = Vec::new();
    let mut held = None;
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
        let (outcome, hold) = sink.write(batch).await?;
        held = hold;
        outcomes = match outcome {
            BatchOutcome::Committed(outcomes) => outcomes,
            BatchOutcome::Stale => {
                return Err(CollectorError::unavailable(
                    "the org's policy changed while the batch was checked; nothing of it was stored: resend it",
                    10,
                ));
            }
        };
    }
    let mut accepted = 0;
    let mut outcome = outcomes.into_iter();
    let mut previews = Vec::new();
    for (event_id, fate, report) in fates {
        let (kept, reason, stored, message) = match fate {
            Fate::Kept(shown) => match outcome.next().unwrap_or(RowOutcome::Stored) {
                RowOutcome::Stored => {
                    accepted += 1;
                    (
                        true,
                        DropReason::Unspecified,
                        shown.map(|e| *e),
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
            Fate::Dropped(reason) => (false, reason, None, String::new()),
            Fate::Rejected(reason, message) => (false, reason, None, message),
        };
        if preview {
            let report = report.unwrap_or_default();
            previews.push(pb::PreviewedEvent {
                event_id,
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
    let dropped = counts.into_pb(accepted);
    Ok(Processed {
        result: pb::IngestResult {
            accepted,
            dropped,
            consent_version: plan.consent_version,
            rejected,
            policy_revision: plan.revision,
        },
        previews,
        held,
    })
}
