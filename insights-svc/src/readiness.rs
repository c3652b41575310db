//! Cloud readiness (SPEC I3): the instance's counts, the blockers that stand between it and the
//! cloud, and a readiness score.
//!
//! Blockers come from `data/cloud.toml` (shipped with the service): an app with no cloud equivalent
//! (HIGH), a custom app (MEDIUM: it must be rebuilt), an app of unknown availability (LOW), and a
//! count over its cloud limit (HIGH). readiness = max(0, 100 − Σ penalty), with penalties
//! CRITICAL 30, HIGH 15, MEDIUM 8, LOW 3, INFO 0.
//!
//! What a report names follows the policy: it is made from an assessment that was treated by the
//! field rules already (ids only under BASIC), and its entities are copied from there.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;
use sightline_proto::insights::v1 as pb;

pub const CLOUD_DATA: &str = include_str!("../data/cloud.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudData {
    pub version: String,
    pub limits: BTreeMap<String, u64>,
    pub apps: BTreeMap<String, CloudApp>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudApp {
    pub name: String,
    pub cloud: bool,
}

/// The shipped data, parsed once (a unit test proves it parses).
pub fn cloud_data() -> Option<&'static CloudData> {
    static DATA: OnceLock<Option<CloudData>> = OnceLock::new();
    DATA.get_or_init(|| toml::from_str(CLOUD_DATA).ok())
        .as_ref()
}

fn penalty(severity: pb::Severity) -> u32 {
    match severity {
        pb::Severity::Critical => 30,
        pb::Severity::High => 15,
        pb::Severity::Medium => 8,
        pb::Severity::Low => 3,
        pb::Severity::Info | pb::Severity::Unspecified => 0,
    }
}

fn counts_by_name(counts: &pb::EntityCounts) -> [(&'static str, u64); 8] {
    [
        ("projects", counts.projects),
        ("issues", counts.issues),
        ("custom_fields", counts.custom_fields),
        ("workflows", counts.workflows),
        ("users", counts.users),
        ("groups", counts.groups),
        ("spaces", counts.spaces),
        ("apps", counts.apps),
    ]
}

/// The blockers and the score of an (already treated) assessment.
pub fn assess(assessment: &pb::Assessment) -> (Vec<pb::Blocker>, u32) {
    let mut blockers = Vec::new();
    let data = cloud_data();
    let counts = assessment.counts.unwrap_or_default();
    if let Some(data) = data {
        for (name, count) in counts_by_name(&counts) {
            if let Some(limit) = data.limits.get(name)
                && count > *limit
            {
                blockers.push(pb::Blocker {
                    blocker_id: format!("limit.{name}"),
                    severity: pb::Severity::High as i32,
                    description: format!(
                        "{count} {} is over the cloud limit of {limit}",
                        name.replace('_', " ")
                    ),
                    entities: entities_of(assessment, name),
                });
            }
        }
    }
    for app in &assessment.apps {
        if app.custom {
            // Under BASIC the custom app's key is a pseudonym: still one id per app.
            let id = if app.custom_key.is_empty() {
                "(custom app)".to_owned()
            } else {
                app.custom_key.clone()
            };
            blockers.push(pb::Blocker {
                blocker_id: format!("app.custom.{id}"),
                severity: pb::Severity::Medium as i32,
                description: "a custom app has no cloud version: it must be rebuilt for the cloud"
                    .into(),
                entities: vec![pb::EntityRef {
                    entity_type: "custom_app".into(),
                    id,
                    key: String::new(),
                    name: app.custom_name.clone(),
                }],
            });
            continue;
        }
        if app.key.is_empty() {
            continue;
        }
        let known = data.and_then(|d| d.apps.get(&app.key));
        let (severity, description) = match known {
            Some(entry) if entry.cloud => continue,
            Some(entry) => (
                pb::Severity::High,
                format!("{} has no cloud equivalent", entry.name),
            ),
            None => (
                pb::Severity::Low,
                "whether this app exists in the cloud is not known".to_owned(),
            ),
        };
        blockers.push(pb::Blocker {
            blocker_id: format!("app.{}", app.key),
            severity: severity as i32,
            description,
            entities: vec![pb::EntityRef {
                entity_type: "app".into(),
                id: app.key.clone(),
                key: app.key.clone(),
                name: app.name.clone(),
            }],
        });
    }
    blockers.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| a.blocker_id.cmp(&b.blocker_id))
    });
    let lost: u32 = blockers
        .iter()
        .map(|b| penalty(pb::Severity::try_from(b.severity).unwrap_or_default()))
        .sum();
    (blockers, 100u32.saturating_sub(lost))
}

/// The assessment's entities of the counted kind (e.g. the custom fields), as the policy left them.
fn entities_of(assessment: &pb::Assessment, count: &str) -> Vec<pb::EntityRef> {
    let kind = count.trim_end_matches('s');
    assessment
        .entities
        .iter()
        .filter(|e| e.entity_type == kind)
        .take(100)
        .cloned()
        .collect()
}

/// Counts from guardrail metrics (`guardrail.<count>`) when no assessment was uploaded.
pub fn counts_from_guardrails(latest: &BTreeMap<String, f64>) -> Option<pb::EntityCounts> {
    let get = |name: &str| {
        latest
            .get(&format!("guardrail.{name}"))
            .map(|v| v.max(0.0).round() as u64)
    };
    let counts = pb::EntityCounts {
        projects: get("projects")?,
        issues: get("issues").unwrap_or(0),
        custom_fields: get("custom_fields").unwrap_or(0),
        workflows: get("workflows").unwrap_or(0),
        users: get("users").unwrap_or(0),
        spaces: get("spaces").unwrap_or(0),
        apps: get("apps").unwrap_or(0),
        groups: get("groups").unwrap_or(0),
    };
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assessment() -> pb::Assessment {
        pb::Assessment {
            counts: Some(pb::EntityCounts {
                projects: 40,
                custom_fields: 923,
                ..Default::default()
            }),
            entities: vec![pb::EntityRef {
                entity_type: "custom_field".into(),
                id: "customfield_10420".into(),
                ..Default::default()
            }],
            apps: vec![
                sightline_proto::common::v1::AppInfo {
                    key: "com.onresolve.jira.groovy.groovyrunner".into(),
                    ..Default::default()
                },
                sightline_proto::common::v1::AppInfo {
                    key: "com.atlassian.jira.plugin.ext.bamboo".into(),
                    ..Default::default()
                },
                sightline_proto::common::v1::AppInfo {
                    key: "org.example.unknown".into(),
                    ..Default::default()
                },
                sightline_proto::common::v1::AppInfo {
                    custom: true,
                    custom_key: "psn1_abc".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn the_shipped_data_parses() {
        let data = cloud_data().unwrap();
        assert!(data.limits.contains_key("custom_fields"));
        assert!(!data.apps.is_empty());
    }

    #[test]
    fn blockers_and_score_follow_the_data_file() {
        let (blockers, score) = assess(&assessment());
        let ids: Vec<&str> = blockers.iter().map(|b| b.blocker_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "app.com.atlassian.jira.plugin.ext.bamboo",
                "limit.custom_fields",
                "app.custom.psn1_abc",
                "app.org.example.unknown"
            ]
        );
        assert_eq!(score, 100 - 15 - 15 - 8 - 3);
        // The custom fields over the limit are named by id (as the policy left them).
        assert_eq!(blockers[1].entities[0].id, "customfield_10420");
    }

    #[test]
    fn an_instance_with_nothing_in_the_way_is_ready() {
        let ready = pb::Assessment {
            counts: Some(pb::EntityCounts {
                projects: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(assess(&ready), (Vec::new(), 100));
    }
}
