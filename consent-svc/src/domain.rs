//! consent-svc's rules: the levels and their order, the effective policy (SPEC C1, C4, E3, E4),
//! override and purge decisions, the residency state machine (C6), and validation of every input,
//! naming the field.

use sightline_proto::common::v1 as common_pb;
use sightline_proto::common::v1::{DataClass, FieldAction};
use sightline_proto::consent::v1 as pb;

use crate::error::ConsentError;

fn invalid(field: &'static str, reason: impl Into<String>) -> ConsentError {
    ConsentError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// What may be collected at all. Ordered: DISABLED < BASIC < ADVANCED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Usage {
    Disabled,
    Basic,
    Advanced,
}

/// How much of a record is kept. Ordered: BASIC < EXTENDED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Sharing {
    Basic,
    Extended,
}

impl Usage {
    pub fn name(self) -> &'static str {
        match self {
            Usage::Disabled => "DISABLED",
            Usage::Basic => "BASIC",
            Usage::Advanced => "ADVANCED",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Usage::Disabled, Usage::Basic, Usage::Advanced]
            .into_iter()
            .find(|u| u.name() == name)
    }

    pub fn to_pb(self) -> common_pb::UsageLevel {
        match self {
            Usage::Disabled => common_pb::UsageLevel::Disabled,
            Usage::Basic => common_pb::UsageLevel::Basic,
            Usage::Advanced => common_pb::UsageLevel::Advanced,
        }
    }

    pub fn parse(field: &'static str, value: i32) -> Result<Self, ConsentError> {
        match common_pb::UsageLevel::try_from(value) {
            Ok(common_pb::UsageLevel::Disabled) => Ok(Usage::Disabled),
            Ok(common_pb::UsageLevel::Basic) => Ok(Usage::Basic),
            Ok(common_pb::UsageLevel::Advanced) => Ok(Usage::Advanced),
            Ok(common_pb::UsageLevel::Unspecified) => Err(invalid(field, "is required")),
            Err(_) => Err(invalid(field, format!("unknown value {value}"))),
        }
    }
}

impl Sharing {
    pub fn name(self) -> &'static str {
        match self {
            Sharing::Basic => "BASIC",
            Sharing::Extended => "EXTENDED",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Sharing::Basic, Sharing::Extended]
            .into_iter()
            .find(|s| s.name() == name)
    }

    pub fn to_pb(self) -> common_pb::SharingLevel {
        match self {
            Sharing::Basic => common_pb::SharingLevel::Basic,
            Sharing::Extended => common_pb::SharingLevel::Extended,
        }
    }

    pub fn parse(field: &'static str, value: i32) -> Result<Self, ConsentError> {
        match common_pb::SharingLevel::try_from(value) {
            Ok(common_pb::SharingLevel::Basic) => Ok(Sharing::Basic),
            Ok(common_pb::SharingLevel::Extended) => Ok(Sharing::Extended),
            Ok(common_pb::SharingLevel::Unspecified) => Err(invalid(field, "is required")),
            Err(_) => Err(invalid(field, format!("unknown value {value}"))),
        }
    }
}

/// An org's consent (SPEC C1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consent {
    pub usage: Usage,
    pub sharing: Sharing,
    pub contribute_metadata: bool,
    pub contribute_in_app_data: bool,
    pub compliance_restricted: bool,
}

impl Consent {
    /// A new org: nothing is collected until an admin opts in.
    pub const DEFAULT: Consent = Consent {
        usage: Usage::Disabled,
        sharing: Sharing::Basic,
        contribute_metadata: false,
        contribute_in_app_data: false,
        compliance_restricted: false,
    };

    pub fn parse(settings: Option<&pb::ConsentSettings>) -> Result<Self, ConsentError> {
        let s = settings.ok_or_else(|| invalid("settings", "is required"))?;
        Ok(Consent {
            usage: Usage::parse("settings.usage_level", s.usage_level)?,
            sharing: Sharing::parse("settings.sharing_level", s.sharing_level)?,
            contribute_metadata: s.contribute_metadata,
            contribute_in_app_data: s.contribute_in_app_data,
            compliance_restricted: s.compliance_restricted,
        })
    }

    /// Contribution after compliance_restricted is applied: restricted orgs never contribute.
    pub fn contributes(&self) -> (bool, bool) {
        if self.compliance_restricted {
            (false, false)
        } else {
            (self.contribute_metadata, self.contribute_in_app_data)
        }
    }

    pub fn to_pb(self) -> pb::ConsentSettings {
        pb::ConsentSettings {
            usage_level: self.usage.to_pb() as i32,
            sharing_level: self.sharing.to_pb() as i32,
            contribute_metadata: self.contribute_metadata,
            contribute_in_app_data: self.contribute_in_app_data,
            compliance_restricted: self.compliance_restricted,
        }
    }
}

/// Event kinds a usage level allows (SPEC E3; the rule lives with the contract).
pub fn allowed_kinds(usage: Usage, any_channel_tracked: bool) -> Vec<common_pb::EventKind> {
    sightline_proto::rules::allowed_kinds(usage.to_pb(), any_channel_tracked)
}

/// What an enforcement point does with a field of `class` under `sharing` (SPEC E4).
pub fn field_action(class: DataClass, sharing: Sharing) -> FieldAction {
    sightline_proto::rules::field_action(class, sharing.to_pb())
}

/// The policy's rules: one per class the contract defines.
pub fn field_rules(sharing: Sharing) -> Vec<pb::FieldRule> {
    sightline_proto::rules::field_rules(sharing.to_pb())
}

/// How much of a value an action keeps: a change to a higher rank must strip stored values.
fn retained(action: FieldAction) -> u8 {
    match action {
        FieldAction::Keep => 3,
        FieldAction::Scrub | FieldAction::KeyedHash => 2,
        FieldAction::Drop | FieldAction::Unspecified => 0,
    }
}

pub use sightline_proto::rules::contribution_kinds;

/// What an org (or one instance) allows, as far as purges are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub usage: Usage,
    pub sharing: Sharing,
    /// Contribution after compliance restriction: (metadata, in-app data).
    pub contributes: (bool, bool),
}

impl Allowance {
    pub fn of(consent: &Consent) -> Self {
        Self {
            usage: consent.usage,
            sharing: consent.sharing,
            contributes: consent.contributes(),
        }
    }

    /// Lowered to an instance override's levels.
    pub fn lowered_to(self, usage: Usage, sharing: Sharing) -> Self {
        Self {
            usage: self.usage.min(usage),
            sharing: self.sharing.min(sharing),
            ..self
        }
    }
}

/// What must be deleted when `before` becomes `after` (SPEC C7, E9): the kinds no longer allowed,
/// the classes whose rule keeps less, and withdrawn contribution. None when nothing is lowered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeSpec {
    pub delete_kinds: Vec<common_pb::EventKind>,
    pub strip_classes: Vec<DataClass>,
    pub withdraw_metadata: bool,
    pub withdraw_in_app_data: bool,
}

pub fn purge_between(before: Allowance, after: Allowance) -> Option<PurgeSpec> {
    // Tracking settings only stop future collection; levels decide what is deleted.
    let still = allowed_kinds(after.usage, true);
    let delete_kinds: Vec<_> = allowed_kinds(before.usage, true)
        .into_iter()
        .filter(|k| !still.contains(k))
        .collect();
    let strip_classes: Vec<_> = if after.usage == Usage::Disabled {
        Vec::new()
    } else {
        sightline_proto::classes::all_classes()
            .into_iter()
            .filter(|c| {
                retained(field_action(*c, after.sharing))
                    < retained(field_action(*c, before.sharing))
            })
            .collect()
    };
    let spec = PurgeSpec {
        delete_kinds,
        strip_classes,
        withdraw_metadata: before.contributes.0 && !after.contributes.0,
        withdraw_in_app_data: before.contributes.1 && !after.contributes.1,
    };
    let nothing = spec.delete_kinds.is_empty()
        && spec.strip_classes.is_empty()
        && !spec.withdraw_metadata
        && !spec.withdraw_in_app_data;
    (!nothing).then_some(spec)
}

pub fn treatment(sharing: Sharing) -> pb::FieldTreatment {
    match sharing {
        Sharing::Basic => pb::FieldTreatment::Basic,
        Sharing::Extended => pb::FieldTreatment::Extended,
    }
}

/// An instance override may only lower what the org allows (SPEC C4).
pub fn check_override(org: &Consent, usage: Usage, sharing: Sharing) -> Result<(), ConsentError> {
    if usage > org.usage {
        return Err(invalid(
            "usage_level",
            format!("cannot raise above the org's {}", org.usage.name()),
        ));
    }
    if sharing > org.sharing {
        return Err(invalid(
            "sharing_level",
            format!("cannot raise above the org's {}", org.sharing.name()),
        ));
    }
    Ok(())
}

/// View-tracking settings (SPEC C5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracking {
    pub channels: Vec<common_pb::Channel>,
    pub exclude_anonymous: bool,
    pub excluded_groups: Vec<String>,
    pub blocking_time_ms: u64,
    pub view_counter_enabled: bool,
    pub global_report_group: String,
}

pub const MAX_BLOCKING_TIME_MS: u64 = 86_400_000;
pub const DEFAULT_BLOCKING_TIME_MS: u64 = 1_800_000;
const ALL_CHANNELS: [common_pb::Channel; 5] = [
    common_pb::Channel::Desktop,
    common_pb::Channel::MobileWeb,
    common_pb::Channel::MobileApp,
    common_pb::Channel::ServicePortal,
    common_pb::Channel::PartnerApp,
];

impl Default for Tracking {
    fn default() -> Self {
        Self {
            channels: ALL_CHANNELS.to_vec(),
            exclude_anonymous: false,
            excluded_groups: Vec::new(),
            blocking_time_ms: DEFAULT_BLOCKING_TIME_MS,
            view_counter_enabled: true,
            global_report_group: String::new(),
        }
    }
}

fn group(field: &'static str, value: &str) -> Result<String, ConsentError> {
    text(field, value, 200).and_then(|v| {
        if v.contains('\n') {
            Err(invalid(field, "contains control characters"))
        } else {
            Ok(v)
        }
    })
}

impl Tracking {
    pub fn parse(settings: Option<&pb::TrackingSettings>) -> Result<Self, ConsentError> {
        let s = settings.ok_or_else(|| invalid("settings", "is required"))?;
        let mut channels = Vec::new();
        for &value in &s.enabled_channels {
            let channel = match common_pb::Channel::try_from(value) {
                Ok(common_pb::Channel::Unspecified) | Err(_) => {
                    return Err(invalid(
                        "settings.enabled_channels",
                        format!("unknown value {value}"),
                    ));
                }
                Ok(channel) => channel,
            };
            if channels.contains(&channel) {
                return Err(invalid(
                    "settings.enabled_channels",
                    "lists a channel twice",
                ));
            }
            channels.push(channel);
        }
        channels.sort_by_key(|c| *c as i32);
        if s.blocking_time_ms > MAX_BLOCKING_TIME_MS {
            return Err(invalid(
                "settings.blocking_time_ms",
                format!("must be between 0 and {MAX_BLOCKING_TIME_MS}"),
            ));
        }
        if s.excluded_groups.len() > 100 {
            return Err(invalid(
                "settings.excluded_groups",
                "has more than 100 groups",
            ));
        }
        let mut excluded_groups = Vec::new();
        for g in &s.excluded_groups {
            let g = group("settings.excluded_groups", g)?;
            if g.is_empty() {
                return Err(invalid(
                    "settings.excluded_groups",
                    "has an empty group name",
                ));
            }
            if !excluded_groups.contains(&g) {
                excluded_groups.push(g);
            }
        }
        Ok(Self {
            channels,
            exclude_anonymous: s.exclude_anonymous,
            excluded_groups,
            blocking_time_ms: s.blocking_time_ms,
            view_counter_enabled: s.view_counter_enabled,
            global_report_group: group("settings.global_report_group", &s.global_report_group)?,
        })
    }

    pub fn to_pb(&self) -> pb::TrackingSettings {
        pb::TrackingSettings {
            enabled_channels: self.channels.iter().map(|c| *c as i32).collect(),
            exclude_anonymous: self.exclude_anonymous,
            excluded_groups: self.excluded_groups.clone(),
            blocking_time_ms: self.blocking_time_ms,
            view_counter_enabled: self.view_counter_enabled,
            global_report_group: self.global_report_group.clone(),
        }
    }
}

/// Retention in days of every kind of stored data (SPEC C7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw_days: u32,
    pub assessment_days: u32,
    pub aggregate_days: u32,
    pub score_history_days: u32,
    pub support_bundle_days: u32,
    /// How long event ids are remembered for de-duplication (and the oldest event accepted).
    pub event_id_days: u32,
}

pub const TWO_YEARS_DAYS: u32 = 730;
pub const SEVEN_YEARS_DAYS: u32 = 2_555;
pub const DEFAULT_EVENT_ID_DAYS: u32 = 35;

impl Default for Retention {
    fn default() -> Self {
        Self {
            raw_days: TWO_YEARS_DAYS,
            assessment_days: TWO_YEARS_DAYS,
            aggregate_days: TWO_YEARS_DAYS,
            score_history_days: TWO_YEARS_DAYS,
            support_bundle_days: TWO_YEARS_DAYS,
            event_id_days: DEFAULT_EVENT_ID_DAYS,
        }
    }
}

impl Retention {
    pub fn parse(r: Option<&pb::RetentionSettings>) -> Result<Self, ConsentError> {
        let r = r.ok_or_else(|| invalid("retention", "is required"))?;
        let bounded = |field, value: u32, max: u32| {
            if (1..=max).contains(&value) {
                Ok(value)
            } else {
                Err(invalid(field, format!("must be between 1 and {max} days")))
            }
        };
        // The fields added later keep their default when left 0.
        let or_default = |field, value: u32, default: u32, max: u32| {
            if value == 0 {
                Ok(default.min(max))
            } else {
                bounded(field, value, max)
            }
        };
        let raw_days = bounded("retention.raw_days", r.raw_days, TWO_YEARS_DAYS)?;
        let defaults = Retention::default();
        Ok(Self {
            raw_days,
            assessment_days: bounded(
                "retention.assessment_days",
                r.assessment_days,
                TWO_YEARS_DAYS,
            )?,
            aggregate_days: bounded(
                "retention.aggregate_days",
                r.aggregate_days,
                SEVEN_YEARS_DAYS,
            )?,
            score_history_days: or_default(
                "retention.score_history_days",
                r.score_history_days,
                defaults.score_history_days,
                SEVEN_YEARS_DAYS,
            )?,
            support_bundle_days: or_default(
                "retention.support_bundle_days",
                r.support_bundle_days,
                defaults.support_bundle_days,
                TWO_YEARS_DAYS,
            )?,
            event_id_days: or_default(
                "retention.event_id_days",
                r.event_id_days,
                defaults.event_id_days,
                raw_days,
            )?,
        })
    }

    pub fn to_pb(self) -> pb::RetentionSettings {
        pb::RetentionSettings {
            raw_days: self.raw_days,
            assessment_days: self.assessment_days,
            aggregate_days: self.aggregate_days,
            score_history_days: self.score_history_days,
            support_bundle_days: self.support_bundle_days,
            event_id_days: self.event_id_days,
        }
    }
}

pub fn location(field: &'static str, value: i32) -> Result<common_pb::Location, ConsentError> {
    match common_pb::Location::try_from(value) {
        Ok(common_pb::Location::Unspecified) => Err(invalid(field, "is required")),
        Ok(location) => Ok(location),
        Err(_) => Err(invalid(field, format!("unknown location {value}"))),
    }
}

pub fn location_name(l: common_pb::Location) -> &'static str {
    l.as_str_name().trim_start_matches("LOCATION_")
}

pub fn location_from_name(name: &str) -> common_pb::Location {
    common_pb::Location::from_str_name(&format!("LOCATION_{name}"))
        .unwrap_or(common_pb::Location::Global)
}

pub fn scope(value: i32) -> Result<pb::ResidencyScope, ConsentError> {
    match pb::ResidencyScope::try_from(value) {
        Ok(pb::ResidencyScope::Unspecified) => Ok(pb::ResidencyScope::Data),
        Ok(scope) => Ok(scope),
        Err(_) => Err(invalid("scope", format!("unknown value {value}"))),
    }
}

pub fn transition(value: i32) -> Result<pb::MoveTransition, ConsentError> {
    match pb::MoveTransition::try_from(value) {
        Ok(pb::MoveTransition::Unspecified) => Err(invalid("transition", "is required")),
        Ok(t) => Ok(t),
        Err(_) => Err(invalid("transition", format!("unknown value {value}"))),
    }
}

pub fn text(field: &'static str, value: &str, max: usize) -> Result<String, ConsentError> {
    let value = value.trim();
    if let Some(problem) = sightline_runtime::text::problem(value, max, true) {
        return Err(invalid(field, problem));
    }
    Ok(value.to_owned())
}

pub fn id(field: &'static str, value: &str) -> Result<String, ConsentError> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    uuid::Uuid::parse_str(value)
        .map(|u| u.to_string())
        .map_err(|_| invalid(field, "is not a valid id"))
}

#[cfg(test)]
mod tests;
