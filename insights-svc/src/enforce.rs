//! Field treatment of uploaded and stored messages by the policy's rules (SPEC I3, I4): every field
//! of the assessment format carries its data class in the contract, and the policy's rule for the
//! class decides — KEEP, DROP, KEYED_HASH (the documented per-org pseudonym) or SCRUB. Kept and
//! scrubbed text is cleared of e-mail addresses, IP addresses and the message's own dropped values
//! whatever the rule, the same scrubber as collector-svc's. No list of field names lives here: the
//! walk reads the classes from the contract's descriptors.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost::Message;
use prost_reflect::{DynamicMessage, MapKey, Value};
use sightline_proto::classes;
use sightline_proto::common::v1::{DataClass, FieldAction};
use sightline_proto::consent::v1 as consent_pb;
use sightline_proto::insights::v1 as pb;
use sightline_runtime::pseudonym::OrgPseudonymizer;
use sightline_runtime::scrub::{self, Finding, Level, Secrets, TextRules};

use crate::store::StoreError;

/// The rule per class of a policy (a class without a rule is dropped: fail closed).
#[derive(Debug, Clone, Default)]
pub struct FieldRules {
    actions: HashMap<i32, FieldAction>,
    /// How kept text is treated (BASIC unless the policy shares EXTENDED).
    text: TextRules,
}

impl FieldRules {
    pub fn of(policy: &consent_pb::Policy) -> Self {
        Self {
            text: scrub::rules_for(policy.sharing_level(), Arc::from(Vec::new())),
            ..Self::from_rules(&policy.field_rules)
        }
    }

    pub fn from_rules(rules: &[consent_pb::FieldRule]) -> Self {
        Self {
            actions: rules
                .iter()
                .map(|r| {
                    (
                        r.data_class,
                        FieldAction::try_from(r.action).unwrap_or(FieldAction::Drop),
                    )
                })
                .collect(),
            text: TextRules::default(),
        }
    }

    /// The stricter rule of the two for every class (an unlinked upload is treated as BASIC, and
    /// never more openly than the org's own rules).
    pub fn stricter(&self, other: &FieldRules) -> Self {
        let mut actions = HashMap::new();
        for class in classes::all_classes() {
            let key = class as i32;
            let (a, b) = (self.action(class), other.action(class));
            actions.insert(key, if rank(a) <= rank(b) { a } else { b });
        }
        let text = if self.text.level == Level::Extended && other.text.level == Level::Extended {
            self.text.clone()
        } else {
            TextRules::default()
        };
        Self { actions, text }
    }

    /// Removes `strip`'s classes and keeps everything else as it is (purges of stored records).
    fn strip(strip: &[i32]) -> Self {
        Self {
            actions: classes::all_classes()
                .into_iter()
                .map(|c| {
                    let action = if strip.contains(&(c as i32)) {
                        FieldAction::Drop
                    } else {
                        FieldAction::Keep
                    };
                    (c as i32, action)
                })
                .collect(),
            // Stored text was treated when it came in: a purge only removes classes.
            text: TextRules::extended(),
        }
    }

    pub fn action(&self, class: DataClass) -> FieldAction {
        match self.actions.get(&(class as i32)) {
            Some(FieldAction::Unspecified) | None => FieldAction::Drop,
            Some(action) => *action,
        }
    }
}

/// How much of a value an action keeps.
fn rank(action: FieldAction) -> u8 {
    match action {
        FieldAction::Keep => 3,
        FieldAction::Scrub => 2,
        FieldAction::KeyedHash => 1,
        FieldAction::Drop | FieldAction::Unspecified => 0,
    }
}

/// What treatment removed or replaced, by data class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Treated {
    /// Values dropped or pseudonymized, by the class of their field.
    pub removed: BTreeMap<i32, u32>,
    /// Personal data found in text and replaced, by kind (EMAIL, IP_ADDRESS, and the class of
    /// the message's own value that appeared in text).
    pub scrubbed: BTreeMap<i32, u32>,
}

impl Treated {
    pub fn removed_counts(&self) -> Vec<pb::ScrubCount> {
        counts(&self.removed)
    }

    pub fn scrubbed_counts(&self) -> Vec<pb::ScrubCount> {
        counts(&self.scrubbed)
    }

    pub fn add_scrubbed(&mut self, class: DataClass, n: u32) {
        *self.scrubbed.entry(class as i32).or_default() += n;
    }

    pub fn scrubbed_total(&self) -> u32 {
        self.scrubbed.values().sum()
    }
}

fn counts(map: &BTreeMap<i32, u32>) -> Vec<pb::ScrubCount> {
    map.iter()
        .map(|(class, count)| pb::ScrubCount {
            data_class: *class,
            count: *count,
        })
        .collect()
}

struct Walk<'a> {
    rules: &'a FieldRules,
    pseudonyms: Option<&'a OrgPseudonymizer>,
    secrets: Secrets,
    treated: Treated,
    /// Stripping stored records: kept values are left exactly as they are.
    strip_only: bool,
}

impl Walk<'_> {
    /// Every value whose rule does not keep it: it must not survive in any text of the message.
    fn collect(&mut self, message: &DynamicMessage) {
        for (field, value) in message.fields() {
            match classes::data_class(&field) {
                Some(class) => {
                    if matches!(
                        self.rules.action(class),
                        FieldAction::Drop | FieldAction::KeyedHash | FieldAction::Unspecified
                    ) {
                        each_text(value, &mut |text| self.secrets.add(text));
                    }
                }
                None => each_message(value, &mut |m| self.collect(m)),
            }
        }
    }

    fn message(&mut self, message: &mut DynamicMessage) {
        let mut cleared = Vec::new();
        for (field, value) in message.fields_mut() {
            match classes::data_class(&field) {
                Some(class) => {
                    if self.value(class, value) {
                        cleared.push(field);
                    }
                }
                None => match value {
                    Value::Message(inner) => self.message(inner),
                    Value::List(items) => {
                        for item in items {
                            if let Value::Message(inner) = item {
                                self.message(inner);
                            }
                        }
                    }
                    _ => {}
                },
            }
        }
        for field in cleared {
            message.clear_field(&field);
        }
    }

    fn removed(&mut self, class: DataClass, n: usize) {
        if n > 0 {
            *self.treated.removed.entry(class as i32).or_default() +=
                u32::try_from(n).unwrap_or(u32::MAX);
        }
    }

    /// Treats one classed field; true when the field is to be cleared.
    fn value(&mut self, class: DataClass, value: &mut Value) -> bool {
        let action = self.rules.action(class);
        match action {
            FieldAction::Drop | FieldAction::Unspecified => {
                self.removed(class, count_values(value));
                true
            }
            FieldAction::KeyedHash => {
                let Some(keys) = self.pseudonyms else {
                    self.removed(class, count_values(value));
                    return true;
                };
                let mut hashed = 0;
                let all_text = map_text(value, &mut |text| {
                    if !text.is_empty() {
                        *text = keys.pseudonym(class, text);
                        hashed += 1;
                    }
                });
                self.removed(class, hashed);
                if !all_text {
                    // Numbers have no pseudonym.
                    self.removed(class, count_values(value));
                    return true;
                }
                false
            }
            FieldAction::Keep | FieldAction::Scrub => {
                if self.strip_only {
                    return false;
                }
                let secrets = &self.secrets;
                let rules = &self.rules.text;
                let shape = scrub::shape_of(class);
                let mut found: Vec<Finding> = Vec::new();
                let identifier = classes::is_identifier(class);
                map_text(value, &mut |text| {
                    // An id is kept as it is unless it holds personal data (then it is scrubbed
                    // as text: an upload cannot be refused field by field).
                    if identifier && scrub::first_finding(text, secrets).is_none() {
                        return;
                    }
                    if let Some((clean, findings)) = scrub::treat(text, secrets, rules, shape) {
                        *text = clean;
                        found.extend(findings);
                    }
                });
                for finding in found {
                    let kind = match finding {
                        Finding::Email => DataClass::Email,
                        Finding::Ip => DataClass::IpAddress,
                        Finding::Secret | Finding::Opaque | Finding::Reduced => class,
                    };
                    self.treated.add_scrubbed(kind, 1);
                }
                false
            }
        }
    }
}

/// Calls `f` on every string of a value (strings, lists of strings, map keys and string values).
fn each_text(value: &Value, f: &mut dyn FnMut(&str)) {
    match value {
        Value::String(s) => f(s),
        Value::List(items) => items.iter().for_each(|v| each_text(v, f)),
        Value::Map(map) => {
            for (key, value) in map {
                if let MapKey::String(k) = key {
                    f(k);
                }
                each_text(value, f);
            }
        }
        _ => {}
    }
}

fn each_message(value: &Value, f: &mut dyn FnMut(&DynamicMessage)) {
    match value {
        Value::Message(m) => f(m),
        Value::List(items) => items.iter().for_each(|v| each_message(v, f)),
        _ => {}
    }
}

/// Rewrites every string of a value with `f` (map keys too); false when the value holds anything
/// but text (numbers, flags, timestamps).
fn map_text(value: &mut Value, f: &mut dyn FnMut(&mut String)) -> bool {
    match value {
        Value::String(s) => {
            f(s);
            true
        }
        Value::List(items) => {
            let mut all = true;
            for item in items.iter_mut() {
                all &= map_text(item, f);
            }
            all
        }
        Value::Map(map) => {
            let entries: Vec<(MapKey, Value)> = map.drain().collect();
            let mut all = true;
            for (key, mut value) in entries {
                let key = match key {
                    MapKey::String(mut k) => {
                        f(&mut k);
                        MapKey::String(k)
                    }
                    other => other,
                };
                all &= map_text(&mut value, f);
                map.insert(key, value);
            }
            all
        }
        _ => false,
    }
}

fn count_values(value: &Value) -> usize {
    match value {
        Value::List(items) => items.len(),
        Value::Map(map) => map.len(),
        _ => 1,
    }
}

fn walk(
    message: &mut DynamicMessage,
    rules: &FieldRules,
    pseudonyms: Option<&OrgPseudonymizer>,
    strip_only: bool,
) -> Treated {
    let mut walk = Walk {
        rules,
        pseudonyms,
        secrets: Secrets::default(),
        treated: Treated::default(),
        strip_only,
    };
    if !strip_only {
        walk.collect(message);
    }
    walk.message(message);
    walk.treated
}

/// Treats a parsed assessment by `rules`.
pub fn assessment(
    mut message: DynamicMessage,
    rules: &FieldRules,
    pseudonyms: Option<&OrgPseudonymizer>,
) -> Result<(pb::Assessment, Treated), String> {
    let treated = walk(&mut message, rules, pseudonyms, false);
    let assessment = message
        .transcode_to::<pb::Assessment>()
        .map_err(|e| format!("the treated assessment does not encode: {e}"))?;
    Ok((assessment, treated))
}

fn strip_encoded(name: &str, body: &[u8], strip: &[i32]) -> Result<Option<Vec<u8>>, StoreError> {
    let pool = classes::pool().map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let descriptor = pool
        .get_message_by_name(name)
        .ok_or_else(|| StoreError::Corrupt(format!("no message {name}")))?;
    let mut message = DynamicMessage::decode(descriptor, body)
        .map_err(|e| StoreError::Corrupt(format!("a stored {name} does not decode: {e}")))?;
    let treated = walk(&mut message, &FieldRules::strip(strip), None, true);
    if treated.removed.is_empty() {
        return Ok(None);
    }
    Ok(Some(message.encode_to_vec()))
}

/// A stored assessment with `strip`'s classes removed; None when it had none.
pub fn strip_assessment(body: &[u8], strip: &[i32]) -> Result<Option<Vec<u8>>, StoreError> {
    strip_encoded(classes::ASSESSMENT_MESSAGE, body, strip)
}

/// A stored readiness report with `strip`'s classes removed; None when it had none.
pub fn strip_readiness(body: &[u8], strip: &[i32]) -> Result<Option<Vec<u8>>, StoreError> {
    strip_encoded("sightline.insights.v1.ReadinessReport", body, strip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sightline_runtime::pseudonym::PseudonymSecret;

    fn rules(extended: bool) -> FieldRules {
        // The matrix consent-svc publishes, for the classes this test touches.
        use DataClass as C;
        use FieldAction as A;
        let pairs = [
            (C::TechnicalId, A::Keep),
            (C::Category, A::Keep),
            (C::Count, A::Keep),
            (C::Timestamp, A::Keep),
            (C::MetricValue, A::Keep),
            (C::Key, if extended { A::Keep } else { A::Drop }),
            (C::Name, if extended { A::Keep } else { A::Drop }),
            (
                C::CustomAppId,
                if extended { A::Keep } else { A::KeyedHash },
            ),
            (
                C::CustomAppName,
                if extended { A::Keep } else { A::KeyedHash },
            ),
            (C::FreeText, A::Scrub),
            (C::Url, A::Scrub),
        ];
        FieldRules {
            actions: pairs.iter().map(|(c, a)| (*c as i32, *a)).collect(),
            text: if extended {
                TextRules::extended()
            } else {
                TextRules::default()
            },
        }
    }

    pub(crate) fn parse(json: &str) -> DynamicMessage {
        let pool = classes::pool().unwrap();
        let descriptor = pool
            .get_message_by_name(classes::ASSESSMENT_MESSAGE)
            .unwrap();
        let mut de = serde_json::Deserializer::from_str(json);
        DynamicMessage::deserialize(descriptor, &mut de).unwrap()
    }

    const FILE: &str = r#"{
      "format": "sightline.assessment", "formatVersion": 1,
      "entities": [{"entityType": "project", "id": "10001", "key": "OPS", "name": "Operations"}],
      "apps": [{"custom": true, "customKey": "com.acme.payroll", "customName": "Acme payroll"}],
      "metrics": [{"name": "jvm.cpu.load", "value": 50, "attributes": {"note": "ask ops@acme.example or 10.1.2.3 about Operations"}}]
    }"#;

    #[test]
    fn basic_keeps_ids_only_and_pseudonymizes_custom_apps() {
        let key = PseudonymSecret::new(1, [7; 32]).org_key("org-1");
        let (assessment, treated) = assessment(parse(FILE), &rules(false), Some(&key)).unwrap();
        let entity = &assessment.entities[0];
        assert_eq!(
            (
                entity.id.as_str(),
                entity.key.as_str(),
                entity.name.as_str()
            ),
            ("10001", "", "")
        );
        let app = &assessment.apps[0];
        assert!(app.custom_key.starts_with("psn1_"));
        assert!(app.custom_name.starts_with("psn1_"));
        let note = &assessment.metrics[0].attributes["note"];
        assert!(!note.contains("ops@acme.example") && !note.contains("10.1.2.3"));
        // "Operations" was dropped as a name, so it may not survive in free text either.
        assert!(!note.contains("Operations"), "{note}");
        assert_eq!(treated.removed.get(&(DataClass::Key as i32)), Some(&1));
        assert_eq!(treated.removed.get(&(DataClass::Name as i32)), Some(&1));
        assert_eq!(treated.scrubbed.get(&(DataClass::Email as i32)), Some(&1));
        assert_eq!(
            treated.scrubbed.get(&(DataClass::IpAddress as i32)),
            Some(&1)
        );
    }

    #[test]
    fn extended_keeps_keys_and_names_but_never_contact_data() {
        let (assessment, treated) = assessment(parse(FILE), &rules(true), None).unwrap();
        assert_eq!(assessment.entities[0].key, "OPS");
        assert_eq!(assessment.entities[0].name, "Operations");
        assert_eq!(assessment.apps[0].custom_name, "Acme payroll");
        assert!(!assessment.metrics[0].attributes["note"].contains("ops@acme.example"));
        assert!(treated.removed.is_empty());
    }

    #[test]
    fn encoded_contact_data_in_an_assessment_is_read_before_it_is_kept() {
        // Named references, JSON held in JSON, base64 of a JSON blob, form encoding.
        let file = r#"{
          "format": "sightline.assessment", "formatVersion": 1,
          "metrics": [{"name": "jvm.cpu.load", "value": 50, "attributes": {
            "a": "mara.voss&commat;host&period;example",
            "b": "{\\\"u\\\":\\\"mara\\\\u0040host.example\\\"}",
            "c": "https://w.example/p?d=eyJ1IjoibWFyYUBob3N0LmV4YW1wbGUifQ",
            "d": "ip=10%2E1%2E2%2E3+port"}}]
        }"#;
        for extended in [false, true] {
            let (assessment, treated) = assessment(parse(file), &rules(extended), None).unwrap();
            let attributes = &assessment.metrics[0].attributes;
            for (key, value) in attributes {
                let decoded = scrub::decode(value).to_lowercase();
                assert!(
                    !decoded.contains("mara") && !decoded.contains("10.1.2.3"),
                    "{key}: {value} (extended: {extended})"
                );
            }
            assert!(!treated.scrubbed.is_empty());
        }
    }

    #[test]
    fn a_class_without_a_rule_is_dropped() {
        let (assessment, _) = assessment(parse(FILE), &FieldRules::default(), None).unwrap();
        assert_eq!(assessment.entities[0].id, "");
        assert!(assessment.metrics.is_empty() || assessment.metrics[0].name.is_empty());
    }

    #[test]
    fn stripping_removes_only_the_named_classes() {
        let (stored, _) = assessment(parse(FILE), &rules(true), None).unwrap();
        let body = stored.encode_to_vec();
        let stripped = strip_assessment(&body, &[DataClass::Name as i32])
            .unwrap()
            .unwrap();
        let after = pb::Assessment::decode(stripped.as_slice()).unwrap();
        assert_eq!(after.entities[0].key, "OPS");
        assert_eq!(after.entities[0].name, "");
        assert_eq!(
            strip_assessment(&stripped, &[DataClass::Name as i32]).unwrap(),
            None
        );
    }

    #[test]
    fn the_stricter_of_two_rule_sets_wins_per_class() {
        let both = rules(true).stricter(&rules(false));
        assert_eq!(both.action(DataClass::Key), FieldAction::Drop);
        assert_eq!(
            both.action(DataClass::CustomAppName),
            FieldAction::KeyedHash
        );
        assert_eq!(both.action(DataClass::TechnicalId), FieldAction::Keep);
    }
}
