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
use sightline_runtime::scrub::{self, Finding, Secrets, TextRules};

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
    let mut treat = Treat {
        plan: &plan,
        secrets: Secrets::default(),
        report: Some(FieldReport::default()),
        invalid: None,
        index: 0,
    };
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
    let mut treat = Treat {
        plan,
        secrets: Secrets::default(),
        report: report.then(FieldReport::default),
        invalid: None,
        index,
    };
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

struct Treat<'a> {
    plan: &'a Plan,
    secrets: Secrets,
    report: Option<FieldReport>,
    invalid: Option<Invalid>,
    index: usize,
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

impl Treat<'_> {
    fn reject(&self, field: &str, reason: &str) -> Verdict {
        Verdict::Reject(
            DropReason::Invalid,
            format!("events[{}].{field}: {reason}", self.index),
        )
    }

    fn event(&mut self, event: &mut pb::Event, now_ms: i64) -> Verdict {
        if !valid_event_id(&event.event_id) {
            return self.reject("event_id", "must be 1 to 64 characters of [A-Za-z0-9._:-]");
        }
        if let Some(found) = scrub::first_finding(&event.event_id, &Secrets::default()) {
            return self.reject("event_id", &format!("holds {}", found.name()));
        }
        let Some(occurred_at) = event.occurred_at.as_ref() else {
            return self.reject("occurred_at", "is required");
        };
        if occurred_at.nanos < 0 || occurred_at.nanos >= 1_000_000_000 {
            return self.reject("occurred_at", "is not a valid timestamp");
        }
        let occurred_at_ms = occurred_at
            .seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(occurred_at.nanos / 1_000_000));
        let Some(payload) = event.payload.take() else {
            return self.reject("payload", "is required (one event kind)");
        };
        let kind = kind_of(&payload);
        if let Err(message) = validate(&payload) {
            return Verdict::Reject(
                DropReason::Invalid,
                format!("events[{}].{message}", self.index),
            );
        }
        if occurred_at_ms > now_ms.saturating_add(MAX_FUTURE_MS) {
            return Verdict::Reject(
                DropReason::OutOfWindow,
                format!(
                    "events[{}].occurred_at: more than 5 minutes in the future",
                    self.index
                ),
            );
        }
        if occurred_at_ms < now_ms.saturating_sub(self.plan.event_id_days.saturating_mul(DAY_MS)) {
            return Verdict::Reject(
                DropReason::OutOfWindow,
                format!(
                    "events[{}].occurred_at: older than the org's event-id memory ({} days)",
                    self.index, self.plan.event_id_days
                ),
            );
        }
        if !self.plan.allows(kind) {
            return Verdict::Drop(DropReason::Consent);
        }
        if let Payload::PageView(view) = &payload
            && let Some(reason) = self.view_filter(view)
        {
            return Verdict::Drop(reason);
        }
        self.collect_secrets(&payload);
        let mut payload = payload;
        let facts = self.payload(&mut payload);
        self.text(Field::EventId, &mut event.event_id);
        if self.drops(Field::OccurredAt) {
            event.occurred_at = None;
        }
        if let Some(Invalid(field, reason)) = self.invalid.take() {
            return self.reject(field.path(), &reason);
        }
        let (name, value, subject, view) = facts;
        event.payload = Some(payload);
        Verdict::Keep(Box::new(StoredEvent {
            event_id: event.event_id.clone(),
            kind,
            occurred_at_ms,
            name,
            value,
            subject,
            event: std::mem::take(event),
            view,
        }))
    }

    /// Channel, anonymous and excluded-group filters of view tracking.
    fn view_filter(&self, view: &pb::PageViewEvent) -> Option<DropReason> {
        let tracking = &self.plan.tracking;
        if !tracking.enabled_channels.contains(&view.channel()) {
            return Some(DropReason::Channel);
        }
        if tracking.exclude_anonymous && (view.anonymous || view.viewer_id.is_empty()) {
            return Some(DropReason::Anonymous);
        }
        if view
            .viewer_groups
            .iter()
            .any(|g| tracking.excluded_groups.contains(g))
        {
            return Some(DropReason::ExcludedGroup);
        }
        None
    }

    fn drops(&self, field: Field) -> bool {
        matches!(
            self.plan.action(field),
            FieldAction::Drop | FieldAction::KeyedHash | FieldAction::Unspecified
        )
    }

    fn secret(&mut self, field: Field, value: &str) {
        if self.drops(field) {
            self.secrets.add(value);
        }
    }

    /// The event's values that may not be stored as they are: they must not survive in its text.
    fn collect_secrets(&mut self, payload: &Payload) {
        match payload {
            Payload::InstanceMetadata(m) => {
                if let Some(meta) = &m.metadata {
                    self.secret(Field::MetaServerId, &meta.server_id);
                    self.secret(Field::MetaLicenseSen, &meta.license_sen);
                    for node in &meta.nodes {
                        self.secret(Field::NodeId, &node.node_id);
                    }
                }
            }
            Payload::Metric(_) | Payload::ClientMetric(_) => {}
            Payload::FeatureUsage(f) => {
                self.secret(Field::FeatureUsername, &f.username);
                self.secret(Field::FeatureUserId, &f.user_id);
                self.secret(Field::FeatureProjectKey, &f.project_key);
                self.secret(Field::FeatureProjectName, &f.project_name);
                self.secret(Field::FeatureCustomAppKey, &f.custom_app_key);
                self.secret(Field::FeatureCustomAppName, &f.custom_app_name);
            }
            Payload::PageView(v) => {
                self.secret(Field::PageTitle, &v.page_title);
                self.secret(Field::PageSpaceKey, &v.space_key);
                self.secret(Field::PageSpaceName, &v.space_name);
                self.secret(Field::PageViewerId, &v.viewer_id);
                self.secret(Field::PageViewerDisplayName, &v.viewer_display_name);
                self.secret(Field::PageViewerEmail, &v.viewer_email);
                self.secret(Field::PageClientIp, &v.client_ip);
                for group in &v.viewer_groups {
                    self.secret(Field::PageViewerGroups, group);
                }
            }
            Payload::AppInventory(inventory) => {
                for app in &inventory.apps {
                    self.secret(Field::AppCustomKey, &app.custom_key);
                    self.secret(Field::AppCustomName, &app.custom_name);
                }
            }
        }
    }

    fn note(&mut self, field: Field, change: Change) {
        if let Some(report) = self.report.as_mut() {
            let list = match change {
                Change::Removed => &mut report.removed,
                Change::Hashed => &mut report.hashed,
                Change::Scrubbed => &mut report.scrubbed,
            };
            FieldReport::note(list, field);
        }
    }

    fn refuse(&mut self, field: Field, found: Finding) {
        if self.invalid.is_none() && !self.plan.strip_only {
            self.invalid = Some(Invalid(field, format!("holds {}", found.name())));
        }
    }

    /// Treats one text value by its field's rule.
    fn text(&mut self, field: Field, value: &mut String) {
        if let Some(new) = self.changed_text(field, value) {
            *value = new;
        }
    }

    fn texts(&mut self, field: Field, values: &mut Vec<String>) {
        if values.is_empty() {
            return;
        }
        if self.drops(field) && self.plan.action(field) != FieldAction::KeyedHash {
            values.clear();
            self.note(field, Change::Removed);
            return;
        }
        for value in values.iter_mut() {
            self.text(field, value);
        }
    }

    /// A map of text to text: keys and values both have the field's class.
    fn text_map(&mut self, field: Field, map: &mut HashMap<String, String>) {
        if map.is_empty() {
            return;
        }
        if matches!(
            self.plan.action(field),
            FieldAction::Drop | FieldAction::Unspecified
        ) {
            map.clear();
            self.note(field, Change::Removed);
            return;
        }
        for value in map.values_mut() {
            self.text(field, value);
        }
        self.keys(field, map);
    }

    /// Treats a map's keys; keys are replaced only when they change (rarely).
    fn keys<V>(&mut self, field: Field, map: &mut HashMap<String, V>) {
        let mut renamed = Vec::new();
        for key in map.keys() {
            if let Some(new) = self.changed_text(field, key) {
                renamed.push((key.clone(), new));
            }
        }
        for (old, new) in renamed {
            if let Some(value) = map.remove(&old) {
                map.insert(new, value);
            }
        }
    }

    /// What a text value becomes by its field's rule, when it changes (refusals are noted).
    fn changed_text(&mut self, field: Field, value: &str) -> Option<String> {
        if value.is_empty() {
            return None;
        }
        match self.plan.action(field) {
            FieldAction::Keep if is_identifier(self.plan.class(field)) => {
                if let Some(found) = scrub::first_finding(value, &self.secrets) {
                    self.refuse(field, found);
                }
                None
            }
            FieldAction::Keep | FieldAction::Scrub => {
                let shape = scrub::shape_of(self.plan.class(field));
                let (clean, _) = scrub::treat(value, &self.secrets, &self.plan.text, shape)?;
                self.note(field, Change::Scrubbed);
                Some(clean)
            }
            FieldAction::KeyedHash => match &self.plan.pseudonyms {
                Some(keys) => {
                    self.note(field, Change::Hashed);
                    Some(keys.pseudonym(self.plan.class(field), value))
                }
                None => {
                    self.note(field, Change::Removed);
                    Some(String::new())
                }
            },
            FieldAction::Drop | FieldAction::Unspecified => {
                self.note(field, Change::Removed);
                Some(String::new())
            }
        }
    }

    /// A map whose values are not text: its keys are treated as text of the field's class.
    fn keyed_map<V>(&mut self, field: Field, map: &mut HashMap<String, V>) {
        if map.is_empty() {
            return;
        }
        if matches!(
            self.plan.action(field),
            FieldAction::Drop | FieldAction::Unspecified
        ) {
            map.clear();
            self.note(field, Change::Removed);
            return;
        }
        self.keys(field, map);
    }

    /// A number, flag or enum: kept, or reset when its rule does not keep it (a number has no
    /// pseudonym).
    fn scalar<T: Default + PartialEq>(&mut self, field: Field, value: &mut T) {
        if self.drops(field) && *value != T::default() {
            *value = T::default();
            self.note(field, Change::Removed);
        }
    }

    fn timestamp(&mut self, field: Field, value: &mut Option<prost_types::Timestamp>) {
        if self.drops(field) && value.is_some() {
            *value = None;
            self.note(field, Change::Removed);
        }
    }

    /// Treats every field of the payload; returns the indexed facts.
    fn payload(&mut self, payload: &mut Payload) -> Facts {
        match payload {
            Payload::InstanceMetadata(m) => {
                if let Some(meta) = m.metadata.as_mut() {
                    self.text(Field::MetaServerId, &mut meta.server_id);
                    self.text(Field::MetaBaseUrl, &mut meta.base_url);
                    self.text(Field::MetaProduct, &mut meta.product);
                    self.text(Field::MetaVersion, &mut meta.version);
                    self.text(Field::MetaLicenseSen, &mut meta.license_sen);
                    self.scalar(Field::MetaNodeCount, &mut meta.node_count);
                    for node in &mut meta.nodes {
                        self.text(Field::NodeId, &mut node.node_id);
                        self.scalar(Field::NodeCpuCount, &mut node.cpu_count);
                        self.scalar(Field::NodeMemoryBytes, &mut node.memory_bytes);
                        self.text(Field::NodeJavaVersion, &mut node.java_version);
                        self.text(Field::NodeState, &mut node.state);
                    }
                    self.keyed_map(Field::MetaFeatureFlags, &mut meta.feature_flags);
                }
                for link in &mut m.app_links {
                    self.text(Field::AppLinkUrl, &mut link.url);
                    self.text(Field::AppLinkProductFamily, &mut link.product_family);
                    self.text(Field::AppLinkServerId, &mut link.server_id);
                    self.text(Field::AppLinkVersion, &mut link.version);
                }
                self.text_map(Field::MetaAttributes, &mut m.attributes);
                (String::new(), None, None, None)
            }
            Payload::Metric(metric) => {
                self.text(Field::MetricName, &mut metric.name);
                self.scalar(Field::MetricType, &mut metric.r#type);
                self.scalar(Field::MetricValue, &mut metric.value);
                self.text_map(Field::MetricAttributes, &mut metric.attributes);
                self.text_map(Field::MetricTags, &mut metric.tags);
                self.text(Field::MetricUnit, &mut metric.unit);
                self.scalar(Field::MetricPeriodic, &mut metric.periodic_sample);
                self.keyed_map(Field::MetricValues, &mut metric.values);
                let value = (!self.drops(Field::MetricValue)).then_some(metric.value);
                (metric.name.clone(), value, None, None)
            }
            Payload::FeatureUsage(f) => {
                self.text(Field::FeatureName, &mut f.feature);
                self.text(Field::FeatureUsername, &mut f.username);
                self.text(Field::FeatureProjectId, &mut f.project_id);
                self.text(Field::FeatureProjectKey, &mut f.project_key);
                self.text(Field::FeatureProjectName, &mut f.project_name);
                self.text(Field::FeatureAppKey, &mut f.app_key);
                self.text(Field::FeatureAppName, &mut f.app_name);
                self.scalar(Field::FeatureCustomApp, &mut f.custom_app);
                self.scalar(Field::FeatureCount, &mut f.count);
                self.text_map(Field::FeatureAttributes, &mut f.attributes);
                self.text(Field::FeatureUserId, &mut f.user_id);
                self.text(Field::FeatureCustomAppKey, &mut f.custom_app_key);
                self.text(Field::FeatureCustomAppName, &mut f.custom_app_name);
                let subject = (!f.user_id.is_empty()).then(|| f.user_id.clone());
                #[allow(clippy::cast_precision_loss)]
                let count = f.count as f64;
                (f.feature.clone(), Some(count), subject, None)
            }
            Payload::PageView(v) => {
                self.text(Field::PageId, &mut v.page_id);
                self.text(Field::PageSpaceId, &mut v.space_id);
                self.text(Field::PageTitle, &mut v.page_title);
                self.text(Field::PageSpaceKey, &mut v.space_key);
                self.text(Field::PageSpaceName, &mut v.space_name);
                self.text(Field::PageViewerId, &mut v.viewer_id);
                self.scalar(Field::PageAnonymous, &mut v.anonymous);
                self.texts(Field::PageViewerGroups, &mut v.viewer_groups);
                self.scalar(Field::PageChannel, &mut v.channel);
                self.text(Field::PageViewerDisplayName, &mut v.viewer_display_name);
                self.text(Field::PageViewerEmail, &mut v.viewer_email);
                self.text(Field::PageClientIp, &mut v.client_ip);
                self.text(Field::PageUrl, &mut v.page_url);
                let viewer = (!v.anonymous && !v.viewer_id.is_empty()).then(|| v.viewer_id.clone());
                let facts = ViewFacts {
                    page_id: v.page_id.clone(),
                    space_id: v.space_id.clone(),
                    channel: v.channel,
                    viewer: viewer.clone(),
                };
                (v.page_id.clone(), None, viewer, Some(facts))
            }
            Payload::ClientMetric(c) => {
                self.text(Field::ClientName, &mut c.name);
                self.scalar(Field::ClientP50, &mut c.p50_ms);
                self.scalar(Field::ClientP95, &mut c.p95_ms);
                self.scalar(Field::ClientErrorRate, &mut c.error_rate);
                self.scalar(Field::ClientSampleCount, &mut c.sample_count);
                self.text_map(Field::ClientAttributes, &mut c.attributes);
                if let Some(window) = c.window.as_mut() {
                    self.timestamp(Field::ClientWindowStart, &mut window.start);
                    self.timestamp(Field::ClientWindowEnd, &mut window.end);
                }
                let value = (!self.drops(Field::ClientP50)).then_some(c.p50_ms);
                (c.name.clone(), value, None, None)
            }
            Payload::AppInventory(inventory) => {
                for app in &mut inventory.apps {
                    self.text(Field::AppKey, &mut app.key);
                    self.text(Field::AppName, &mut app.name);
                    self.text(Field::AppVersion, &mut app.version);
                    self.scalar(Field::AppEnabled, &mut app.enabled);
                    self.scalar(Field::AppCustom, &mut app.custom);
                    self.text(Field::AppCustomKey, &mut app.custom_key);
                    self.text(Field::AppCustomName, &mut app.custom_name);
                }
                #[allow(clippy::cast_precision_loss)]
                let count = inventory.apps.len() as f64;
                (String::new(), Some(count), None, None)
            }
        }
    }
}

type Facts = (String, Option<f64>, Option<String>, Option<ViewFacts>);

#[derive(Debug, Clone, Copy)]
enum Change {
    Removed,
    Hashed,
    Scrubbed,
}

struct Invalid(Field, String);

fn check_text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{field}: longer than {max} bytes"));
    }
    if value.contains('\0') {
        return Err(format!("{field}: holds a NUL character"));
    }
    Ok(())
}

fn check_required(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{field}: is required"));
    }
    check_text(field, value, max)
}

fn check_map<V>(
    field: &str,
    map: &HashMap<String, V>,
    mut value: impl FnMut(&V) -> Result<(), String>,
) -> Result<(), String> {
    if map.len() > MAX_MAP_ENTRIES {
        return Err(format!("{field}: more than {MAX_MAP_ENTRIES} entries"));
    }
    for (key, v) in map {
        if key.trim().is_empty() || key.len() > MAX_TEXT || key.contains('\0') {
            // Formatted only when refused: this runs for every key of every event.
            return Err(format!(
                "{field}: a key is empty, longer than {MAX_TEXT} bytes or holds a NUL character"
            ));
        }
        value(v)?;
    }
    Ok(())
}

fn check_texts(field: &str, map: &HashMap<String, String>) -> Result<(), String> {
    check_map(field, map, |v| check_text(field, v, MAX_LONG_TEXT))
}

fn check_number(field: &str, value: f64) -> Result<(), String> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(format!("{field}: must be a finite number"))
    }
}

fn check_list(field: &str, len: usize, max: usize) -> Result<(), String> {
    if len > max {
        Err(format!("{field}: more than {max} elements"))
    } else {
        Ok(())
    }
}

/// The kind's required fields, enum values, lengths and numbers; the message names the field.
fn validate(payload: &Payload) -> Result<(), String> {
    match payload {
        Payload::InstanceMetadata(m) => {
            let meta = m
                .metadata
                .as_ref()
                .ok_or_else(|| "instance_metadata.metadata: is required".to_owned())?;
            check_text(
                "instance_metadata.metadata.server_id",
                &meta.server_id,
                MAX_ID,
            )?;
            check_text(
                "instance_metadata.metadata.base_url",
                &meta.base_url,
                MAX_LONG_TEXT,
            )?;
            check_text(
                "instance_metadata.metadata.product",
                &meta.product,
                MAX_TEXT,
            )?;
            check_text(
                "instance_metadata.metadata.version",
                &meta.version,
                MAX_TEXT,
            )?;
            check_text(
                "instance_metadata.metadata.license_sen",
                &meta.license_sen,
                MAX_ID,
            )?;
            check_list(
                "instance_metadata.metadata.nodes",
                meta.nodes.len(),
                MAX_LIST,
            )?;
            for node in &meta.nodes {
                check_text(
                    "instance_metadata.metadata.nodes.node_id",
                    &node.node_id,
                    MAX_TEXT,
                )?;
                check_text(
                    "instance_metadata.metadata.nodes.java_version",
                    &node.java_version,
                    MAX_TEXT,
                )?;
                check_text(
                    "instance_metadata.metadata.nodes.state",
                    &node.state,
                    MAX_TEXT,
                )?;
            }
            check_map(
                "instance_metadata.metadata.feature_flags",
                &meta.feature_flags,
                |_| Ok(()),
            )?;
            check_list("instance_metadata.app_links", m.app_links.len(), MAX_LIST)?;
            for link in &m.app_links {
                check_text("instance_metadata.app_links.url", &link.url, MAX_LONG_TEXT)?;
                check_text(
                    "instance_metadata.app_links.product_family",
                    &link.product_family,
                    MAX_TEXT,
                )?;
                check_text(
                    "instance_metadata.app_links.server_id",
                    &link.server_id,
                    MAX_ID,
                )?;
                check_text(
                    "instance_metadata.app_links.version",
                    &link.version,
                    MAX_TEXT,
                )?;
            }
            check_texts("instance_metadata.attributes", &m.attributes)
        }
        Payload::Metric(metric) => {
            check_required("metric.name", &metric.name, MAX_TEXT)?;
            if common::MetricType::try_from(metric.r#type).is_err() {
                return Err("metric.type: is not a known metric type".into());
            }
            check_number("metric.value", metric.value)?;
            check_texts("metric.attributes", &metric.attributes)?;
            check_texts("metric.tags", &metric.tags)?;
            check_text("metric.unit", &metric.unit, MAX_TEXT)?;
            check_map("metric.values", &metric.values, |v| {
                check_number("metric.values", *v)
            })
        }
        Payload::FeatureUsage(f) => {
            check_required("feature_usage.feature", &f.feature, MAX_TEXT)?;
            for (field, value, max) in [
                ("feature_usage.username", &f.username, MAX_TEXT),
                ("feature_usage.project_id", &f.project_id, MAX_ID),
                ("feature_usage.project_key", &f.project_key, MAX_TEXT),
                ("feature_usage.project_name", &f.project_name, MAX_TEXT),
                ("feature_usage.app_key", &f.app_key, MAX_TEXT),
                ("feature_usage.app_name", &f.app_name, MAX_TEXT),
                ("feature_usage.user_id", &f.user_id, MAX_ID),
                ("feature_usage.custom_app_key", &f.custom_app_key, MAX_TEXT),
                (
                    "feature_usage.custom_app_name",
                    &f.custom_app_name,
                    MAX_TEXT,
                ),
            ] {
                check_text(field, value, max)?;
            }
            if f.custom_app && !(f.app_key.is_empty() && f.app_name.is_empty()) {
                return Err(
                    "feature_usage.app_key: a custom app fills custom_app_key and custom_app_name"
                        .into(),
                );
            }
            if !f.custom_app && (!f.custom_app_key.is_empty() || !f.custom_app_name.is_empty()) {
                return Err("feature_usage.custom_app_key: set custom_app for a custom app".into());
            }
            check_texts("feature_usage.attributes", &f.attributes)
        }
        Payload::PageView(v) => {
            check_required("page_view.page_id", &v.page_id, MAX_ID)?;
            check_text("page_view.space_id", &v.space_id, MAX_ID)?;
            check_text("page_view.page_title", &v.page_title, MAX_TEXT)?;
            check_text("page_view.space_key", &v.space_key, MAX_TEXT)?;
            check_text("page_view.space_name", &v.space_name, MAX_TEXT)?;
            check_text("page_view.viewer_id", &v.viewer_id, MAX_ID)?;
            check_list("page_view.viewer_groups", v.viewer_groups.len(), MAX_LIST)?;
            for group in &v.viewer_groups {
                check_text("page_view.viewer_groups", group, MAX_TEXT)?;
            }
            match common::Channel::try_from(v.channel) {
                Ok(common::Channel::Unspecified) => {
                    return Err("page_view.channel: is required".into());
                }
                Err(_) => return Err("page_view.channel: is not a known channel".into()),
                Ok(_) => {}
            }
            check_text(
                "page_view.viewer_display_name",
                &v.viewer_display_name,
                MAX_TEXT,
            )?;
            check_text("page_view.viewer_email", &v.viewer_email, MAX_TEXT)?;
            check_text("page_view.client_ip", &v.client_ip, MAX_TEXT)?;
            check_text("page_view.page_url", &v.page_url, MAX_LONG_TEXT)
        }
        Payload::ClientMetric(c) => {
            check_required("client_metric.name", &c.name, MAX_TEXT)?;
            check_number("client_metric.p50_ms", c.p50_ms)?;
            check_number("client_metric.p95_ms", c.p95_ms)?;
            check_number("client_metric.error_rate", c.error_rate)?;
            if !(0.0..=1.0).contains(&c.error_rate) {
                return Err("client_metric.error_rate: must be between 0 and 1".into());
            }
            check_texts("client_metric.attributes", &c.attributes)
        }
        Payload::AppInventory(inventory) => {
            check_list("app_inventory.apps", inventory.apps.len(), MAX_APPS)?;
            for app in &inventory.apps {
                for (field, value) in [
                    ("app_inventory.apps.key", &app.key),
                    ("app_inventory.apps.name", &app.name),
                    ("app_inventory.apps.version", &app.version),
                    ("app_inventory.apps.custom_key", &app.custom_key),
                    ("app_inventory.apps.custom_name", &app.custom_name),
                ] {
                    check_text(field, value, MAX_TEXT)?;
                }
                if app.custom && !(app.key.is_empty() && app.name.is_empty()) {
                    return Err(
                        "app_inventory.apps.key: a custom app fills custom_key and custom_name"
                            .into(),
                    );
                }
                if !app.custom && (!app.custom_key.is_empty() || !app.custom_name.is_empty()) {
                    return Err("app_inventory.apps.custom_key: set custom for a custom app".into());
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
