//! Usage data sharing (the consent levels, changed with a reason; the history with each receipt's
//! verification) and Sample data (a typical event of each kind through PreviewSample under the
//! org's current policy, every field marked kept, dropped, hashed or scrubbed).

use std::collections::BTreeMap;

use askama::Template;
use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::get;
use serde::Deserialize;
use sightline_proto::collector::v1 as collector_pb;
use sightline_proto::common::v1 as common_pb;
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::time::to_proto;

use crate::format::{name, when};
use crate::web::{AppRef, Chrome, PageError, Signed, after_change, render};

pub(crate) fn routes() -> Router<AppRef> {
    Router::new()
        .route("/orgs/{org}/consent", get(page).post(update))
        .route("/orgs/{org}/sample", get(sample))
}

pub(crate) struct Version {
    pub version: u64,
    pub usage: String,
    pub sharing: String,
    pub contribute: String,
    pub actor: String,
    pub reason: String,
    pub at: String,
    pub receipt: String,
    pub receipt_valid: bool,
}

#[derive(Template)]
#[template(path = "consent.html")]
struct ConsentPage {
    chrome: Chrome,
    current: Version,
    settings: consent_pb::ConsentSettings,
    allowed: String,
    treatment: String,
    history: Vec<Version>,
}

fn contribution(s: &consent_pb::ConsentSettings) -> String {
    if s.compliance_restricted {
        return "never (compliance requirements)".to_owned();
    }
    match (s.contribute_metadata, s.contribute_in_app_data) {
        (false, false) => "nothing".to_owned(),
        (true, false) => "instance metadata".to_owned(),
        (false, true) => "in-app data".to_owned(),
        (true, true) => "instance metadata and in-app data".to_owned(),
    }
}

fn version_row(v: consent_pb::ConsentVersion, verified: Option<(bool, String)>) -> Version {
    let s = v.settings.unwrap_or_default();
    let (receipt_valid, receipt) = match verified {
        Some((true, _)) => (true, "valid".to_owned()),
        Some((false, reason)) => (false, format!("invalid: {reason}")),
        None => (false, "none".to_owned()),
    };
    Version {
        version: v.version,
        usage: name(s.usage_level().as_str_name(), "USAGE_LEVEL_"),
        sharing: name(s.sharing_level().as_str_name(), "SHARING_LEVEL_"),
        contribute: contribution(&s),
        actor: v.actor,
        reason: v.reason,
        at: when(v.created_at.as_ref()),
        receipt,
        receipt_valid,
    }
}

async fn page(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
) -> Result<Response, PageError> {
    let mut consent = state.services.consent();
    let current = consent
        .get_consent(signed.ask(consent_pb::GetConsentRequest {
            org_id: org_id.clone(),
        }))
        .await?
        .into_inner()
        .consent
        .unwrap_or_default();
    let policy = consent
        .get_policy(signed.ask(consent_pb::GetPolicyRequest {
            org_id: org_id.clone(),
            instance_id: String::new(),
        }))
        .await?
        .into_inner()
        .policy
        .unwrap_or_default();
    let versions = consent
        .list_consent_history(signed.ask(consent_pb::ListConsentHistoryRequest {
            org_id: org_id.clone(),
            page_size: 20,
            page_token: String::new(),
        }))
        .await?
        .into_inner()
        .versions;
    let mut history = Vec::with_capacity(versions.len());
    for v in versions {
        let verified = match v.receipt.clone() {
            Some(receipt) => {
                let answer = consent
                    .verify_receipt(signed.ask(consent_pb::VerifyReceiptRequest {
                        receipt: Some(receipt),
                    }))
                    .await?
                    .into_inner();
                Some((answer.valid, answer.reason))
            }
            None => None,
        };
        history.push(version_row(v, verified));
    }
    let allowed = policy
        .allowed_kinds()
        .map(|k| name(k.as_str_name(), "EVENT_KIND_"))
        .collect::<Vec<_>>();
    Ok(render(&ConsentPage {
        chrome: Chrome::new(&state, &signed, &org_id, "consent", "Usage data sharing"),
        settings: current.settings.unwrap_or_default(),
        current: version_row(current, None),
        allowed: if allowed.is_empty() {
            "nothing".to_owned()
        } else {
            allowed.join(", ")
        },
        treatment: name(policy.field_treatment().as_str_name(), "FIELD_TREATMENT_"),
        history,
    }))
}

#[derive(Deserialize)]
struct Update {
    usage_level: i32,
    sharing_level: i32,
    contribute_metadata: Option<String>,
    contribute_in_app_data: Option<String>,
    compliance_restricted: Option<String>,
    reason: String,
    expected_version: u64,
}

async fn update(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    Form(form): Form<Update>,
) -> Result<Response, PageError> {
    let updated = state
        .services
        .consent()
        .update_consent(signed.ask(consent_pb::UpdateConsentRequest {
            org_id: org_id.clone(),
            settings: Some(consent_pb::ConsentSettings {
                usage_level: form.usage_level,
                sharing_level: form.sharing_level,
                contribute_metadata: form.contribute_metadata.is_some(),
                contribute_in_app_data: form.contribute_in_app_data.is_some(),
                compliance_restricted: form.compliance_restricted.is_some(),
            }),
            reason: form.reason,
            expected_version: form.expected_version,
            request_id: String::new(),
        }))
        .await
        .map(tonic::Response::into_inner);
    let back = format!("/orgs/{org_id}/consent");
    Ok(after_change(
        &state,
        &signed,
        "consent",
        &back,
        updated,
        |r| {
            format!(
                "Saved as version {}.",
                r.consent.map(|c| c.version).unwrap_or_default()
            )
        },
    ))
}

/// One field of a previewed event: its path, its data class, and what the policy does with it.
pub(crate) struct FieldMark {
    pub path: String,
    pub class: String,
    pub mark: &'static str,
    /// `mark` as a class name.
    pub css: &'static str,
}

pub(crate) struct Sampled {
    pub kind: String,
    pub kept: bool,
    pub reason: String,
    pub fields: Vec<FieldMark>,
}

/// A record as Sightline stores it: when, which instance, its kind, and every field it holds.
pub(crate) struct Record {
    pub stored: String,
    pub instance_id: String,
    pub consent_version: u64,
    pub kind: String,
    /// (field path, value)
    pub fields: Vec<(String, String)>,
}

#[derive(Template)]
#[template(path = "sample.html")]
struct SamplePage {
    chrome: Chrome,
    consent_version: u64,
    events: Vec<Sampled>,
    records: Vec<Record>,
}

/// Every field a stored event holds, as (path, value), read through the contract's descriptors.
fn fields_of(event: &collector_pb::Event) -> Vec<(String, String)> {
    use prost::Message;
    use prost_reflect::{DynamicMessage, ReflectMessage, Value};
    let Ok(pool) = sightline_proto::classes::pool() else {
        return Vec::new();
    };
    let Some(descriptor) = pool.get_message_by_name(sightline_proto::classes::EVENT_MESSAGE) else {
        return Vec::new();
    };
    let Ok(message) = DynamicMessage::decode(descriptor, event.encode_to_vec().as_slice()) else {
        return Vec::new();
    };
    fn text(value: &Value) -> String {
        match value {
            Value::String(s) => s.clone(),
            Value::Bytes(b) => hex::encode(b),
            Value::List(items) => items.iter().map(text).collect::<Vec<_>>().join(", "),
            Value::Map(map) => {
                let mut pairs: Vec<String> = map
                    .iter()
                    .map(|(k, v)| format!("{k:?}={}", text(v)))
                    .collect();
                pairs.sort();
                pairs.join(", ")
            }
            Value::Message(m) if m.descriptor().full_name() == "google.protobuf.Timestamp" => {
                let ts = m.transcode_to::<prost_types::Timestamp>().ok();
                when(ts.as_ref())
            }
            Value::Message(m) => format!("{m}"),
            other => format!("{other}"),
        }
    }
    fn walk(message: &DynamicMessage, prefix: &str, out: &mut Vec<(String, String)>) {
        for (field, value) in message.fields() {
            let path = if prefix.is_empty() {
                field.name().to_owned()
            } else {
                format!("{prefix}.{}", field.name())
            };
            match value {
                Value::Message(inner)
                    if inner.descriptor().package_name().starts_with("sightline.") =>
                {
                    walk(inner, &path, out);
                }
                Value::List(items) if items.iter().any(|i| matches!(i, Value::Message(_))) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Value::Message(inner) = item {
                            walk(inner, &format!("{path}[{i}]"), out);
                        }
                    }
                }
                value => out.push((path, text(value))),
            }
        }
    }
    let mut out = Vec::new();
    walk(&message, "", &mut out);
    out
}

/// A typical event of each kind, as an instance would send it, with the personal data an instance
/// may send by mistake filled in so the page shows what the policy does with it.
fn typical_events(now_ms: i64) -> Vec<collector_pb::Event> {
    use collector_pb::event::Payload;
    let mut attributes = BTreeMap::new();
    attributes.insert("note".to_owned(), "reported by ada@example.com".to_owned());
    let attributes: std::collections::HashMap<_, _> = attributes.into_iter().collect();
    let at = Some(to_proto(now_ms));
    let event = |id: &str, payload| collector_pb::Event {
        event_id: format!("sample-{id}"),
        occurred_at: at,
        payload: Some(payload),
    };
    vec![
        event(
            "instance-metadata",
            Payload::InstanceMetadata(collector_pb::InstanceMetadataEvent {
                metadata: Some(common_pb::InstanceMetadata {
                    server_id: "B7A1-C2D3-E4F5-0000".into(),
                    base_url: "https://jira.example.com".into(),
                    product: "jira".into(),
                    version: "9.12.4".into(),
                    license_sen: "SEN-1234567".into(),
                    node_count: 1,
                    nodes: vec![common_pb::NodeInfo {
                        node_id: "node-1.example.com".into(),
                        cpu_count: 8,
                        memory_bytes: 16 << 30,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                app_links: vec![],
                attributes: attributes.clone(),
            }),
        ),
        event(
            "metric",
            Payload::Metric(collector_pb::MetricEvent {
                name: "http.request.duration".into(),
                r#type: common_pb::MetricType::JmxMetric.into(),
                value: 412.0,
                unit: "ms".into(),
                periodic_sample: true,
                attributes: attributes.clone(),
                ..Default::default()
            }),
        ),
        event(
            "feature-usage",
            Payload::FeatureUsage(collector_pb::FeatureUsageEvent {
                feature: "issue.create".into(),
                username: "ada".into(),
                user_id: "user-4711".into(),
                project_id: "10001".into(),
                project_key: "OPS".into(),
                project_name: "Operations".into(),
                count: 3,
                attributes: attributes.clone(),
                ..Default::default()
            }),
        ),
        event(
            "page-view",
            Payload::PageView(collector_pb::PageViewEvent {
                page_id: "98304".into(),
                space_id: "65537".into(),
                page_title: "Release checklist".into(),
                space_key: "ENG".into(),
                space_name: "Engineering".into(),
                viewer_id: "user-4711".into(),
                anonymous: false,
                viewer_groups: vec!["engineering".into()],
                channel: common_pb::Channel::Desktop.into(),
                viewer_display_name: "Ada Lovelace".into(),
                viewer_email: "ada@example.com".into(),
                client_ip: "203.0.113.7".into(),
                page_url: "https://wiki.example.com/pages/98304?user=ada@example.com".into(),
            }),
        ),
        event(
            "client-metric",
            Payload::ClientMetric(collector_pb::ClientMetricEvent {
                name: "page.load".into(),
                p50_ms: 820.0,
                p95_ms: 2400.0,
                error_rate: 0.01,
                sample_count: 1200,
                attributes,
                window: Some(common_pb::TimeRange {
                    start: Some(to_proto(now_ms - 3_600_000)),
                    end: Some(to_proto(now_ms)),
                }),
            }),
        ),
        event(
            "app-inventory",
            Payload::AppInventory(collector_pb::AppInventoryEvent {
                apps: vec![
                    common_pb::AppInfo {
                        key: "com.example.timesheets".into(),
                        name: "Timesheets".into(),
                        version: "4.2.0".into(),
                        enabled: true,
                        ..Default::default()
                    },
                    common_pb::AppInfo {
                        version: "1.0.0".into(),
                        enabled: true,
                        custom: true,
                        custom_key: "com.acme.internal-approvals".into(),
                        custom_name: "Acme approvals".into(),
                        ..Default::default()
                    },
                ],
            }),
        ),
    ]
}

/// The payload's field name in `Event` (its kind as the contract spells it).
fn kind_of(event: &collector_pb::Event) -> &'static str {
    use collector_pb::event::Payload;
    match event.payload {
        Some(Payload::InstanceMetadata(_)) => "instance_metadata",
        Some(Payload::Metric(_)) => "metric",
        Some(Payload::FeatureUsage(_)) => "feature_usage",
        Some(Payload::PageView(_)) => "page_view",
        Some(Payload::ClientMetric(_)) => "client_metric",
        Some(Payload::AppInventory(_)) => "app_inventory",
        None => "",
    }
}

async fn sample(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
) -> Result<Response, PageError> {
    let stored = state
        .services
        .collector()
        .list_stored_events(signed.ask(collector_pb::ListStoredEventsRequest {
            org_id: org_id.clone(),
            instance_id: String::new(),
            page_size: 20,
        }))
        .await?
        .into_inner();
    let records = stored
        .events
        .iter()
        .map(|s| {
            let event = s.event.clone().unwrap_or_default();
            Record {
                stored: when(s.stored_at.as_ref()),
                instance_id: s.instance_id.clone(),
                consent_version: s.consent_version,
                kind: kind_of(&event).to_owned(),
                fields: fields_of(&event),
            }
        })
        .collect();
    let events = typical_events(state.clock.now_ms());
    let kinds: Vec<&'static str> = events.iter().map(kind_of).collect();
    let previewed = state
        .services
        .collector()
        .preview_sample(signed.ask(collector_pb::PreviewSampleRequest {
            org_id: org_id.clone(),
            instance_id: String::new(),
            events,
        }))
        .await?
        .into_inner();
    // Every field of every kind, with its class, from the contract itself.
    let classified = sightline_proto::classes::classify(sightline_proto::classes::EVENT_MESSAGE)
        .map_err(|e| PageError::BadRequest(e.to_string()))?;
    let events = previewed
        .events
        .iter()
        .zip(kinds)
        .map(|(p, kind)| {
            let prefix = format!("{kind}.");
            let fields = classified
                .iter()
                .filter(|f| f.path.starts_with(&prefix))
                .map(|f| {
                    let mark = if !p.kept {
                        "not collected"
                    } else if p.removed_fields.contains(&f.path) {
                        "dropped"
                    } else if p.hashed_fields.contains(&f.path) {
                        "hashed"
                    } else if p.scrubbed_fields.contains(&f.path) {
                        "scrubbed"
                    } else {
                        "kept"
                    };
                    FieldMark {
                        css: if mark == "not collected" {
                            "not-collected"
                        } else {
                            mark
                        },
                        path: f.path.clone(),
                        class: name(f.class.as_str_name(), "DATA_CLASS_"),
                        mark,
                    }
                })
                .collect();
            Sampled {
                kind: kind.to_owned(),
                kept: p.kept,
                reason: if p.kept {
                    String::new()
                } else if p.message.is_empty() {
                    name(p.drop_reason().as_str_name(), "DROP_REASON_")
                } else {
                    p.message.clone()
                },
                fields,
            }
        })
        .collect();
    Ok(render(&SamplePage {
        chrome: Chrome::new(&state, &signed, &org_id, "sample", "Sample data"),
        consent_version: previewed.consent_version,
        events,
        records,
    }))
}
