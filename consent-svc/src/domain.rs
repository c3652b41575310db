//! consent-svc's rules: the levels and their order, the effective policy (SPEC C1, C4, E3, E4),
//! override and purge decisions, the residency state machine (C6), and validation of every input,
//! naming the field.

use sightline_proto::common::v1 as common_pb;
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

/// What a change from `before` to `after` requires deleting (SPEC C7): when a level is lowered,
/// everything collected above the new levels.
pub fn purge_needed(before: &Consent, after: &Consent) -> bool {
    after.usage < before.usage
        || after.sharing < before.sharing
        || (before.contributes().0 && !after.contributes().0)
        || (before.contributes().1 && !after.contributes().1)
}

/// Event kinds a usage level allows (SPEC E3). Page views also need view tracking to allow them.
pub fn allowed_kinds(usage: Usage, any_channel_tracked: bool) -> Vec<common_pb::EventKind> {
    use common_pb::EventKind as K;
    match usage {
        Usage::Disabled => vec![],
        Usage::Basic => vec![K::InstanceMetadata, K::Metric, K::ClientMetric],
        Usage::Advanced => {
            let mut kinds = vec![
                K::InstanceMetadata,
                K::Metric,
                K::ClientMetric,
                K::FeatureUsage,
            ];
            if any_channel_tracked {
                kinds.push(K::PageView);
            }
            kinds
        }
    }
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
    let value = value.trim();
    if value.chars().count() > 200 || value.chars().any(char::is_control) {
        return Err(invalid(field, "must be at most 200 printable characters"));
    }
    Ok(value.to_owned())
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

/// Retention in days (SPEC C7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw_days: u32,
    pub assessment_days: u32,
    pub aggregate_days: u32,
}

pub const TWO_YEARS_DAYS: u32 = 730;
pub const SEVEN_YEARS_DAYS: u32 = 2_555;

impl Default for Retention {
    fn default() -> Self {
        Self {
            raw_days: TWO_YEARS_DAYS,
            assessment_days: TWO_YEARS_DAYS,
            aggregate_days: TWO_YEARS_DAYS,
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
        Ok(Self {
            raw_days: bounded("retention.raw_days", r.raw_days, TWO_YEARS_DAYS)?,
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
        })
    }

    pub fn to_pb(self) -> pb::RetentionSettings {
        pb::RetentionSettings {
            raw_days: self.raw_days,
            assessment_days: self.assessment_days,
            aggregate_days: self.aggregate_days,
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
    if value.chars().count() > max {
        return Err(invalid(field, format!("is longer than {max} characters")));
    }
    if value.chars().any(|c| c.is_control() && c != '\n') {
        return Err(invalid(field, "contains control characters"));
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
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered() {
        assert!(Usage::Disabled < Usage::Basic && Usage::Basic < Usage::Advanced);
        assert!(Sharing::Basic < Sharing::Extended);
        assert_eq!(Usage::from_name("ADVANCED"), Some(Usage::Advanced));
    }

    #[test]
    fn the_default_collects_nothing() {
        assert!(allowed_kinds(Consent::DEFAULT.usage, true).is_empty());
        assert_eq!(Consent::DEFAULT.contributes(), (false, false));
    }

    #[test]
    fn page_views_need_advanced_and_a_tracked_channel() {
        use common_pb::EventKind as K;
        assert!(!allowed_kinds(Usage::Basic, true).contains(&K::PageView));
        assert!(allowed_kinds(Usage::Advanced, true).contains(&K::PageView));
        assert!(!allowed_kinds(Usage::Advanced, false).contains(&K::PageView));
        assert!(allowed_kinds(Usage::Advanced, false).contains(&K::FeatureUsage));
    }

    #[test]
    fn compliance_restriction_forces_contribution_off() {
        let consent = Consent {
            contribute_metadata: true,
            contribute_in_app_data: true,
            compliance_restricted: true,
            ..Consent::DEFAULT
        };
        assert_eq!(consent.contributes(), (false, false));
    }

    #[test]
    fn lowering_anything_needs_a_purge_and_raising_does_not() {
        let advanced = Consent {
            usage: Usage::Advanced,
            sharing: Sharing::Extended,
            ..Consent::DEFAULT
        };
        let basic = Consent {
            usage: Usage::Basic,
            ..advanced
        };
        assert!(purge_needed(&advanced, &basic));
        assert!(!purge_needed(&basic, &advanced));
        assert!(purge_needed(
            &advanced,
            &Consent {
                sharing: Sharing::Basic,
                ..advanced
            }
        ));
    }

    #[test]
    fn overrides_may_only_lower() {
        let org = Consent {
            usage: Usage::Basic,
            ..Consent::DEFAULT
        };
        assert!(check_override(&org, Usage::Disabled, Sharing::Basic).is_ok());
        let raised = check_override(&org, Usage::Advanced, Sharing::Basic).unwrap_err();
        assert!(matches!(
            raised,
            ConsentError::InvalidArgument {
                field: "usage_level",
                ..
            }
        ));
        let raised = check_override(&org, Usage::Basic, Sharing::Extended).unwrap_err();
        assert!(matches!(
            raised,
            ConsentError::InvalidArgument {
                field: "sharing_level",
                ..
            }
        ));
    }

    #[test]
    fn unknown_enum_values_name_their_field() {
        assert!(matches!(
            Usage::parse("settings.usage_level", 9),
            Err(ConsentError::InvalidArgument {
                field: "settings.usage_level",
                ..
            })
        ));
        assert!(matches!(
            location("to_location", 99),
            Err(ConsentError::InvalidArgument {
                field: "to_location",
                ..
            })
        ));
        assert_eq!(
            location_name(common_pb::Location::SouthKorea),
            "SOUTH_KOREA"
        );
        assert_eq!(
            location_from_name("SOUTH_KOREA"),
            common_pb::Location::SouthKorea
        );
    }

    #[test]
    fn tracking_settings_are_bounded() {
        let mut s = Tracking::default().to_pb();
        assert_eq!(Tracking::parse(Some(&s)).unwrap(), Tracking::default());
        s.blocking_time_ms = MAX_BLOCKING_TIME_MS + 1;
        assert!(matches!(
            Tracking::parse(Some(&s)),
            Err(ConsentError::InvalidArgument {
                field: "settings.blocking_time_ms",
                ..
            })
        ));
        let mut s = Tracking::default().to_pb();
        s.enabled_channels.push(42);
        assert!(matches!(
            Tracking::parse(Some(&s)),
            Err(ConsentError::InvalidArgument {
                field: "settings.enabled_channels",
                ..
            })
        ));
    }

    #[test]
    fn retention_is_bounded_by_two_and_seven_years() {
        let ok = pb::RetentionSettings {
            raw_days: 730,
            assessment_days: 30,
            aggregate_days: 2_555,
        };
        assert!(Retention::parse(Some(&ok)).is_ok());
        let long = pb::RetentionSettings {
            aggregate_days: 2_556,
            ..ok
        };
        assert!(matches!(
            Retention::parse(Some(&long)),
            Err(ConsentError::InvalidArgument {
                field: "retention.aggregate_days",
                ..
            })
        ));
    }
}
