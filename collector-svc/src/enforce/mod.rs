//! Enforcement at the door (SPEC E2–E4): every event is validated, checked against what the policy
//! allows, and then every one of its fields is treated by the policy's rule for the field's data
//! class — kept, dropped, replaced by its keyed pseudonym, or scrubbed of personal data — before
//! anything is stored. The same code serves Ingest and PreviewSample, so a preview shows exactly what
//! an ingest stores.
//!
//! Beyond the rules, two guards apply whatever the policy says, because no e-mail address, IP address
//! or display name is ever stored: a kept identifier-like value (ids, categories, keys) that holds
//! one makes the event INVALID, and kept text (names, free text, URLs) is scrubbed of them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sightline_proto::classes::is_identifier;
use sightline_proto::collector::v1::{self as pb, DropReason, event::Payload};
use sightline_proto::common::v1::{self as common, DataClass, EventKind, FieldAction};
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::pseudonym::OrgPseudonymizer;

use crate::fields::{ClassTable, Field};

mod treatment;
mod validate;

use sightline_runtime::scrub::{self, Finding, Secrets, TextRules};
use treatment::Treat;
use validate::validate;

/// How far in the future an event may be dated (clock skew).
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;
pub use sightline_runtime::time::DAY_MS;

const MAX_ID: usize = 128;
const MAX_TEXT: usize = 1_024;
const MAX_LONG_TEXT: usize = 4_096;
const MAX_MAP_ENTRIES: usize = 64;
const MAX_LIST: usize = 256;
const MAX_APPS: usize = 5_000;

/// An org's (or instance's) policy compiled for enforcement.
#[derive(Debug, Clone)]
pub struct Plan {
    pub org_id: String,
    pub consent_version: u64,
    pub revision: u64,
    allowed: [bool; 8],
    actions: Vec<FieldAction>,
    classes: Arc<ClassTable>,
    pub tracking: Tracking,
    pub pseudonyms: Option<OrgPseudonymizer>,
    pub event_id_days: i64,
    pub moving: bool,
    pub retry_after_ms: u32,
    pub location: common::Location,
    /// How kept text is treated: the sharing level, and the query keys URLs keep under BASIC.
    text: TextRules,
    /// A plan that only strips classes from stored records (purges): kept values stay as stored.
    strip_only: bool,
}

/// View-tracking settings (SPEC C5) as enforcement reads them.
#[derive(Debug, Clone, Default)]
pub struct Tracking {
    pub enabled_channels: Vec<common::Channel>,
    pub exclude_anonymous: bool,
    pub excluded_groups: HashSet<String>,
    pub blocking_time_ms: i64,
    pub view_counter_enabled: bool,
    pub global_report_group: String,
}

impl Plan {
    /// Compiles `policy`. `pseudonyms` is the org's key for the policy's key version, or None when
    /// this service does not hold that version (KEYED_HASH fields are then dropped).
    pub fn compile(
        policy: &consent_pb::Policy,
        classes: Arc<ClassTable>,
        pseudonyms: Option<OrgPseudonymizer>,
        query_keys: Arc<[String]>,
    ) -> Self {
        let mut allowed = [false; 8];
        for kind in &policy.allowed_kinds {
            if let Some(slot) = usize::try_from(*kind).ok().and_then(|k| allowed.get_mut(k)) {
                *slot = true;
            }
        }
        let rules: HashMap<i32, FieldAction> = policy
            .field_rules
            .iter()
            .map(|r| {
                (
                    r.data_class,
                    FieldAction::try_from(r.action).unwrap_or(FieldAction::Drop),
                )
            })
            .collect();
        let actions = Field::ALL
            .iter()
            .map(|field| {
                // A class without a rule, or a field without a class, is dropped: fail closed.
                let class = classes.class(*field);
                match rules.get(&(class as i32)) {
                    Some(FieldAction::Unspecified) | None => FieldAction::Drop,
                    Some(action) => *action,
                }
            })
            .collect();
        let tracking = policy.tracking.clone().unwrap_or_default();
        let retention = policy.retention.unwrap_or_default();
        Self {
            org_id: policy.org_id.clone(),
            consent_version: policy.consent_version,
            revision: policy.revision,
            allowed,
            actions,
            classes,
            tracking: Tracking {
                enabled_channels: tracking.enabled_channels().collect(),
                exclude_anonymous: tracking.exclude_anonymous,
                excluded_groups: tracking.excluded_groups.iter().cloned().collect(),
                blocking_time_ms: i64::try_from(tracking.blocking_time_ms).unwrap_or(i64::MAX),
                view_counter_enabled: tracking.view_counter_enabled,
                global_report_group: tracking.global_report_group,
            },
            pseudonyms,
            event_id_days: i64::from(retention.event_id_days.max(1)),
            moving: policy.moving,
            retry_after_ms: policy.retry_after_ms,
            location: policy.location(),
            text: scrub::rules_for(policy.sharing_level(), query_keys),
            strip_only: false,
        }
    }

    /// A plan that removes the values of `classes` from stored records and keeps the rest as it is.
    fn strip(classes: Arc<ClassTable>, strip: &[i32]) -> Self {
        let actions = Field::ALL
            .iter()
            .map(|field| {
                if strip.contains(&(classes.class(*field) as i32)) {
                    FieldAction::Drop
                } else {
                    FieldAction::Keep
                }
            })
            .collect();
        Self {
            org_id: String::new(),
            consent_version: 0,
            revision: 0,
            allowed: [true; 8],
            actions,
            classes,
            tracking: Tracking::default(),
            pseudonyms: None,
            event_id_days: 1,
            moving: false,
            retry_after_ms: 0,
            location: common::Location::Unspecified,
            // Stored text was treated when it came in: a purge only removes classes.
            text: TextRules::extended(),
            strip_only: true,
        }
    }

    pub fn allows(&self, kind: EventKind) -> bool {
        self.allowed.get(kind as usize).copied().unwrap_or(false)
    }

    pub fn action(&self, field: Field) -> FieldAction {
        self.actions
            .get(field as usize)
            .copied()
            .unwrap_or(FieldAction::Drop)
    }

    pub fn class(&self, field: Field) -> DataClass {
        self.classes.class(field)
    }

    /// The pseudonym a viewer's or user's technical id is stored as (what EraseViewer looks for).
    pub fn subject_of(&self, user_id: &str) -> Option<String> {
        self.pseudonyms
            .as_ref()
            .map(|p| p.pseudonym(DataClass::UserId, user_id))
    }
}

/// What enforcement decided about one event.
#[derive(Debug, Clone)]
pub enum Verdict {
    Keep(Box<StoredEvent>),
    /// Not stored, for a policy reason.
    Drop(DropReason),
    /// INVALID or OUT_OF_WINDOW, with the message naming the field.
    Reject(DropReason, String),
}

/// An event as it will be stored, with the facts the store indexes.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub event_id: String,
    pub kind: EventKind,
    pub occurred_at_ms: i64,
    /// What the event is about, for indexes: the metric's, client metric's or feature's name, the
    /// page id; empty for metadata and inventories.
    pub name: String,
    pub value: Option<f64>,
    /// The stored form (pseudonym) of the user or viewer the event is about.
    pub subject: Option<String>,
    pub event: pb::Event,
    pub view: Option<ViewFacts>,
}

/// A page view's facts for counters and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewFacts {
    pub page_id: String,
    pub space_id: String,
    pub channel: i32,
    /// The stored form of the viewer; None when anonymous.
    pub viewer: Option<String>,
}

/// Which fields of an event were changed, for PreviewSample.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldReport {
    pub removed: Vec<String>,
    pub hashed: Vec<String>,
    pub scrubbed: Vec<String>,
}

impl FieldReport {
    fn note(list: &mut Vec<String>, field: Field) {
        if !list.iter().any(|p| p == field.path()) {
            list.push(field.path().to_owned());
        }
    }
}

/// One event's enforcement.
#[derive(Debug, Clone)]
pub struct Enforced {
    pub event_id: String,
    pub verdict: Verdict,
    pub report: Option<FieldReport>,
}

/// The contract's classes, read once (for purges, which strip stored records).
pub fn contract_classes() -> Option<Arc<ClassTable>> {
    static TABLE: std::sync::OnceLock<Option<Arc<ClassTable>>> = std::sync::OnceLock::new();
    TABLE
        .get_or_init(|| ClassTable::from_contract().ok().map(Arc::new))
        .clone()
}

/// The event kinds whose events have a field of one of `classes`.
pub fn kinds_with_classes(classes: &[i32]) -> Vec<i64> {
    let Some(table) = contract_classes() else {
        return Vec::new();
    };
    let mut kinds = Vec::new();
    for field in Field::ALL {
        if !classes.contains(&(table.class(*field) as i32)) {
            continue;
        }
        let prefix = field.path().split('.').next().unwrap_or_default();
        let of_field: &[i64] = match prefix {
            "instance_metadata" => &[1],
            "metric" => &[2],
            "feature_usage" => &[3],
            "page_view" => &[4],
            "client_metric" => &[5],
            "app_inventory" => &[6],
            _ => &[1, 2, 3, 4, 5, 6],
        };
        for kind in of_field {
            if !kinds.contains(kind) {
                kinds.push(*kind);
            }
        }
    }
    kinds.sort_unstable();
    kinds
}

/// A stored event's body with the values of `classes` removed (also from its text); None when the
/// body does not decode or nothing changed.
pub fn strip_body(body: &[u8], classes: &[i32]) -> Option<Vec<u8>> {
    use prost::Message;
    let table = contract_classes()?;
    let plan = Plan::strip(table, classes);
    let mut event = pb::Event::decode(body).ok()?;
    let mut payload = event.payload.take()?;
    let mut treat = Treat::new(&plan, true, 0);
    treat.collect_secrets(&payload);
    treat.payload(&mut payload);
    let report = treat.report.unwrap_or_default();
    if report.removed.is_empty() && report.scrubbed.is_empty() && report.hashed.is_empty() {
        return None;
    }
    event.payload = Some(payload);
    Some(event.encode_to_vec())
}

/// Enforces `plan` on one event, at `now_ms`. `index` is the event's place in its batch (for
/// messages); `report` asks for the field report PreviewSample shows.
pub fn enforce(plan: &Plan, event: pb::Event, index: usize, now_ms: i64, report: bool) -> Enforced {
    let mut event = event;
    let mut treat = Treat::new(plan, report, index);
    let verdict = treat.event(&mut event, now_ms);
    // A kept event carries its id; one that is not gives its id up here (no copy on the hot path).
    let event_id = match &verdict {
        Verdict::Keep(stored) if report => stored.event_id.clone(),
        Verdict::Keep(_) => String::new(),
        _ => std::mem::take(&mut event.event_id),
    };
    Enforced {
        event_id,
        verdict,
        report: treat.report,
    }
}

fn kind_of(payload: &Payload) -> EventKind {
    match payload {
        Payload::InstanceMetadata(_) => EventKind::InstanceMetadata,
        Payload::Metric(_) => EventKind::Metric,
        Payload::FeatureUsage(_) => EventKind::FeatureUsage,
        Payload::PageView(_) => EventKind::PageView,
        Payload::ClientMetric(_) => EventKind::ClientMetric,
        Payload::AppInventory(_) => EventKind::AppInventory,
    }
}

/// Whether an event id is 1 to 64 characters of `[A-Za-z0-9._:-]`.
pub fn valid_event_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests;
