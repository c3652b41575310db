//! What `run` records as it goes (`status.json`), and what `status` shows from it.

use serde::{Deserialize, Serialize};
use sightline_proto::common::v1::{EventKind, SharingLevel, UsageLevel};
use sightline_proto::consent::v1::Policy;

use crate::vault::{Home, LinkState, write_atomic};

/// The link key's expiry is warned about this long before.
pub const EXPIRY_WARNING_MS: i64 = 7 * 86_400_000;

/// The parts of a policy the companion acts on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    pub usage_level: String,
    pub sharing_level: String,
    pub consent_version: u64,
    pub revision: u64,
    pub allowed_kinds: Vec<String>,
    pub received_at_ms: i64,
}

impl PolicyView {
    pub fn of(policy: &Policy, at_ms: i64) -> Self {
        let usage = UsageLevel::try_from(policy.usage_level).unwrap_or(UsageLevel::Unspecified);
        let sharing =
            SharingLevel::try_from(policy.sharing_level).unwrap_or(SharingLevel::Unspecified);
        Self {
            usage_level: short(usage.as_str_name(), "USAGE_LEVEL_"),
            sharing_level: short(sharing.as_str_name(), "SHARING_LEVEL_"),
            consent_version: policy.consent_version,
            revision: policy.revision,
            allowed_kinds: policy
                .allowed_kinds
                .iter()
                .filter_map(|k| EventKind::try_from(*k).ok())
                .map(|k| short(k.as_str_name(), "EVENT_KIND_"))
                .collect(),
            received_at_ms: at_ms,
        }
    }

    /// Whether nothing may be collected (DISABLED, or a level this companion does not know).
    pub fn disabled(&self) -> bool {
        self.usage_level != "BASIC" && self.usage_level != "ADVANCED"
    }

    pub fn allows(&self, kind: EventKind) -> bool {
        !self.disabled()
            && self
                .allowed_kinds
                .iter()
                .any(|k| kind.as_str_name().strip_prefix("EVENT_KIND_") == Some(k.as_str()))
    }
}

fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

/// `status.json`: written by `run` after every change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunStatus {
    /// The last policy read from consent-svc.
    pub policy: Option<PolicyView>,
    pub last_upload_at_ms: Option<i64>,
    /// Events the last upload round sent and had acknowledged.
    pub last_upload_events: u64,
    pub uploaded_events_total: u64,
    /// Events the collector stored (accepted) over all uploads.
    pub accepted_events_total: u64,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
    /// Events dropped because the spool reached its bound while offline.
    pub dropped_events_total: u64,
    /// Spooled events deleted because the policy no longer allows them.
    pub purged_events_total: u64,
    /// Batches the collector refused as invalid, kept aside under `analytics-logs/rejected/`.
    pub rejected_batches_total: u64,
    /// Inbox lines that could not be read.
    pub inbox_errors_total: u64,
    pub updated_at_ms: i64,
}

impl RunStatus {
    pub fn load(home: &Home) -> Self {
        std::fs::read(home.status_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&mut self, home: &Home, now_ms: i64) {
        self.updated_at_ms = now_ms;
        match serde_json::to_vec_pretty(self) {
            Ok(json) => {
                if let Err(error) = write_atomic(&home.status_file(), &json) {
                    tracing::warn!(%error, "status not saved");
                }
            }
            Err(error) => tracing::warn!(%error, "status not saved"),
        }
    }

    pub fn error(&mut self, message: impl Into<String>, now_ms: i64) {
        let message = message.into();
        tracing::warn!(error = %message, "companion error");
        self.last_error = Some(message);
        self.last_error_at_ms = Some(now_ms);
    }
}

/// Milliseconds as an RFC 3339 UTC time.
pub fn rfc3339(ms: i64) -> String {
    crate::sampler::timestamp(ms).to_string()
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The facts `status` shows, also as JSON.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub linked: bool,
    pub org_id: Option<String>,
    pub instance_id: Option<String>,
    pub server_id: Option<String>,
    pub link_key_prefix: Option<String>,
    pub link_key_expires_at: Option<String>,
    pub link_key_expires_in_days: Option<i64>,
    pub link_key_warning: Option<String>,
    pub vault: String,
    pub policy: Option<PolicyView>,
    pub spool_bytes: u64,
    pub spool_files: usize,
    pub dropped_events_total: u64,
    pub purged_events_total: u64,
    pub last_upload_at: Option<String>,
    pub last_upload_events: u64,
    pub uploaded_events_total: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

pub fn report(
    state: Option<&LinkState>,
    vault: Result<(), String>,
    run: &RunStatus,
    spool: (u64, usize),
    now_ms: i64,
) -> StatusReport {
    let expires = state.map(|s| s.link_key_expires_at_ms);
    let warning = expires.and_then(|at| {
        let left = at - now_ms;
        if left <= 0 {
            Some("the link key has expired: to link again, ask the org admin for a new key".to_owned())
        } else if left <= EXPIRY_WARNING_MS {
            Some(format!(
                "the link key expires in {} day(s): to link again after that, ask the org admin for a new key",
                (left + 86_399_999) / 86_400_000
            ))
        } else {
            None
        }
    });
    StatusReport {
        linked: state.is_some(),
        org_id: state.map(|s| s.org_id.clone()),
        instance_id: state.map(|s| s.instance_id.clone()),
        server_id: state.map(|s| s.server_id.clone()),
        link_key_prefix: state.map(|s| s.link_key_prefix.clone()),
        link_key_expires_at: expires.map(rfc3339),
        link_key_expires_in_days: expires.map(|at| (at - now_ms).div_euclid(86_400_000)),
        link_key_warning: warning,
        vault: match vault {
            Ok(()) => "ok".into(),
            Err(e) => e,
        },
        policy: run.policy.clone(),
        spool_bytes: spool.0,
        spool_files: spool.1,
        dropped_events_total: run.dropped_events_total,
        purged_events_total: run.purged_events_total,
        last_upload_at: run.last_upload_at_ms.map(rfc3339),
        last_upload_events: run.last_upload_events,
        uploaded_events_total: run.uploaded_events_total,
        last_error: run.last_error.clone(),
        last_error_at: run.last_error_at_ms.map(rfc3339),
    }
}

impl std::fmt::Display for StatusReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let none = || "-".to_owned();
        if !self.linked {
            writeln!(
                f,
                "linked:       no (run: sightline-companion link --key-file FILE …)"
            )?;
        } else {
            writeln!(
                f,
                "org:          {}",
                self.org_id.clone().unwrap_or_else(none)
            )?;
            writeln!(
                f,
                "instance:     {} (server id {})",
                self.instance_id.clone().unwrap_or_else(none),
                self.server_id.clone().unwrap_or_else(none)
            )?;
            writeln!(
                f,
                "link key:     {}… expires {}",
                self.link_key_prefix.clone().unwrap_or_else(none),
                self.link_key_expires_at.clone().unwrap_or_else(none)
            )?;
            if let Some(warning) = &self.link_key_warning {
                writeln!(f, "WARNING:      {warning}")?;
            }
            writeln!(f, "vault:        {}", self.vault)?;
        }
        match &self.policy {
            Some(p) => writeln!(
                f,
                "policy:       usage {}, sharing {} (consent version {}, read {})",
                p.usage_level,
                p.sharing_level,
                p.consent_version,
                rfc3339(p.received_at_ms)
            )?,
            None => writeln!(
                f,
                "policy:       not read yet (run reads it from consent-svc)"
            )?,
        }
        writeln!(
            f,
            "spool:        {} in {} file(s); {} event(s) dropped at the spool bound, {} deleted by policy",
            human_bytes(self.spool_bytes),
            self.spool_files,
            self.dropped_events_total,
            self.purged_events_total
        )?;
        match &self.last_upload_at {
            Some(at) => writeln!(
                f,
                "last upload:  {at} ({} event(s); {} in all)",
                self.last_upload_events, self.uploaded_events_total
            )?,
            None => writeln!(f, "last upload:  never")?,
        }
        match (&self.last_error, &self.last_error_at) {
            (Some(e), Some(at)) => writeln!(f, "last error:   {at}: {e}"),
            (Some(e), None) => writeln!(f, "last error:   {e}"),
            _ => writeln!(f, "last error:   none"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::vault::Endpoints;

    fn state(expires_at_ms: i64) -> LinkState {
        LinkState {
            org_id: "org-1".into(),
            instance_id: "inst-1".into(),
            server_id: "SRV".into(),
            base_url: "https://jira.example".into(),
            product: "jira".into(),
            version: "9".into(),
            link_key_id: "key-1".into(),
            link_key_prefix: "slk_abcd".into(),
            link_key_expires_at_ms: expires_at_ms,
            linked_at_ms: 0,
            endpoints: Endpoints {
                linker: String::new(),
                consent: String::new(),
                collector: String::new(),
                insights: String::new(),
                ca: None,
            },
        }
    }

    #[test]
    fn key_expiry_is_warned_within_seven_days_only() {
        let day = 86_400_000;
        let now = 1_800_000_000_000;
        let run = RunStatus::default();
        let far = report(Some(&state(now + 8 * day)), Ok(()), &run, (0, 0), now);
        assert!(far.link_key_warning.is_none());
        assert!(!far.to_string().contains("WARNING"));
        let near = report(Some(&state(now + 6 * day + 1)), Ok(()), &run, (0, 0), now);
        assert!(
            near.to_string()
                .contains("WARNING:      the link key expires in 7 day(s)")
        );
        let gone = report(Some(&state(now - 1)), Ok(()), &run, (0, 0), now);
        assert!(gone.link_key_warning.unwrap().contains("has expired"));
    }

    #[test]
    fn status_never_holds_a_secret() {
        let run = RunStatus::default();
        let text = report(Some(&state(0)), Ok(()), &run, (2048, 1), 0).to_string();
        assert!(text.contains("slk_abcd…"));
        assert!(text.contains("2.0 KiB in 1 file(s)"));
        assert!(!text.contains("slc_"));
    }
}
