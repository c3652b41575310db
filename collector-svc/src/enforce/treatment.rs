//! Field treatment: each field of an event gets its data class's action under the policy (kept,
//! dropped, replaced by its keyed pseudonym, or scrubbed), and kept text is scrubbed of what is
//! never stored; the report says what changed.

use super::*;

pub(super) struct Treat<'a> {
    plan: &'a Plan,
    secrets: Secrets,
    pub(super) report: Option<FieldReport>,
    invalid: Option<Invalid>,
    index: usize,
}

impl<'a> Treat<'a> {
    /// Treats events under `plan`; `report` asks for the field report, `index` is the event's
    /// place in its batch.
    pub(super) fn new(plan: &'a Plan, report: bool, index: usize) -> Self {
        Self {
            plan,
            secrets: Secrets::default(),
            report: report.then(FieldReport::default),
            invalid: None,
            index,
        }
    }

    fn reject(&self, field: &str, reason: &str) -> Verdict {
        Verdict::Reject(
            DropReason::Invalid,
            format!("events[{}].{field}: {reason}", self.index),
        )
    }

    pub(super) fn event(&mut self, event: &mut pb::Event, now_ms: i64) -> Verdict {
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
        let Facts {
            name,
            value,
            subject,
            view,
        } = facts;
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
    pub(super) fn collect_secrets(&mut self, payload: &Payload) {
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

    fn note(&mut self, field: Field, change: FieldChange) {
        if let Some(report) = self.report.as_mut() {
            let list = match change {
                FieldChange::Removed => &mut report.removed,
                FieldChange::Hashed => &mut report.hashed,
                FieldChange::Scrubbed => &mut report.scrubbed,
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
            self.note(field, FieldChange::Removed);
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
            self.note(field, FieldChange::Removed);
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
                self.note(field, FieldChange::Scrubbed);
                Some(clean)
            }
            FieldAction::KeyedHash => match &self.plan.pseudonyms {
                Some(keys) => {
                    self.note(field, FieldChange::Hashed);
                    Some(keys.pseudonym(self.plan.class(field), value))
                }
                None => {
                    self.note(field, FieldChange::Removed);
                    Some(String::new())
                }
            },
            FieldAction::Drop | FieldAction::Unspecified => {
                self.note(field, FieldChange::Removed);
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
            self.note(field, FieldChange::Removed);
            return;
        }
        self.keys(field, map);
    }

    /// A number, flag or enum: kept, or reset when its rule does not keep it (a number has no
    /// pseudonym).
    fn scalar<T: Default + PartialEq>(&mut self, field: Field, value: &mut T) {
        if self.drops(field) && *value != T::default() {
            *value = T::default();
            self.note(field, FieldChange::Removed);
        }
    }

    fn timestamp(&mut self, field: Field, value: &mut Option<prost_types::Timestamp>) {
        if self.drops(field) && value.is_some() {
            *value = None;
            self.note(field, FieldChange::Removed);
        }
    }

    /// Treats every field of the payload; returns the indexed facts.
    pub(super) fn payload(&mut self, payload: &mut Payload) -> Facts {
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
                Facts {
                    name: String::new(),
                    value: None,
                    subject: None,
                    view: None,
                }
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
                Facts {
                    name: metric.name.clone(),
                    value,
                    subject: None,
                    view: None,
                }
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
                Facts {
                    name: f.feature.clone(),
                    value: Some(count),
                    subject,
                    view: None,
                }
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
                Facts {
                    name: v.page_id.clone(),
                    value: None,
                    subject: viewer,
                    view: Some(facts),
                }
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
                Facts {
                    name: c.name.clone(),
                    value,
                    subject: None,
                    view: None,
                }
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
                Facts {
                    name: String::new(),
                    value: Some(count),
                    subject: None,
                    view: None,
                }
            }
        }
    }
}

/// What a payload says that the store indexes besides its body.
pub(super) struct Facts {
    /// The metric's, feature's or page's name (empty for metadata).
    name: String,
    value: Option<f64>,
    /// The pseudonymous subject (a feature's user, a page's viewer).
    subject: Option<String>,
    view: Option<ViewFacts>,
}

#[derive(Debug, Clone, Copy)]
enum FieldChange {
    Removed,
    Hashed,
    Scrubbed,
}

struct Invalid(Field, String);
