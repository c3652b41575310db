//! Tests of `domain`.

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
    use common_pb::EventKind as K;
    let advanced = Consent {
        usage: Usage::Advanced,
        sharing: Sharing::Extended,
        contribute_in_app_data: true,
        ..Consent::DEFAULT
    };
    let basic = Consent {
        usage: Usage::Basic,
        ..advanced
    };
    let spec = purge_between(Allowance::of(&advanced), Allowance::of(&basic)).unwrap();
    assert_eq!(spec.delete_kinds, [K::FeatureUsage, K::PageView]);
    assert!(spec.strip_classes.is_empty() && !spec.withdraw_in_app_data);
    assert_eq!(
        purge_between(Allowance::of(&basic), Allowance::of(&advanced)),
        None
    );
    let shared_less = Consent {
        sharing: Sharing::Basic,
        ..advanced
    };
    let spec = purge_between(Allowance::of(&advanced), Allowance::of(&shared_less)).unwrap();
    assert!(spec.delete_kinds.is_empty());
    assert_eq!(
        spec.strip_classes,
        [
            DataClass::Key,
            DataClass::Name,
            DataClass::CustomAppId,
            DataClass::CustomAppName
        ]
    );
    let withdrawn = Consent {
        compliance_restricted: true,
        ..advanced
    };
    let spec = purge_between(Allowance::of(&advanced), Allowance::of(&withdrawn)).unwrap();
    assert!(spec.withdraw_in_app_data && !spec.withdraw_metadata);
    let off = Consent {
        usage: Usage::Disabled,
        ..advanced
    };
    let spec = purge_between(Allowance::of(&advanced), Allowance::of(&off)).unwrap();
    assert_eq!(spec.delete_kinds.len(), 6, "everything goes");
    assert!(spec.strip_classes.is_empty(), "nothing is left to strip");
}

#[test]
fn every_class_has_a_rule_and_personal_data_is_never_kept() {
    use sightline_proto::classes::all_classes;
    for sharing in [Sharing::Basic, Sharing::Extended] {
        let rules = field_rules(sharing);
        assert_eq!(rules.len(), all_classes().len());
        for never in [
            DataClass::DisplayName,
            DataClass::Email,
            DataClass::IpAddress,
        ] {
            assert_eq!(field_action(never, sharing), FieldAction::Drop);
        }
        assert_eq!(
            field_action(DataClass::Username, sharing),
            FieldAction::KeyedHash
        );
        assert_eq!(
            field_action(DataClass::FreeText, sharing),
            FieldAction::Scrub
        );
    }
    assert_eq!(
        field_action(DataClass::Key, Sharing::Basic),
        FieldAction::Drop
    );
    assert_eq!(
        field_action(DataClass::Key, Sharing::Extended),
        FieldAction::Keep
    );
    assert_eq!(
        field_action(DataClass::CustomAppName, Sharing::Basic),
        FieldAction::KeyedHash
    );
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
        ..Default::default()
    };
    let parsed = Retention::parse(Some(&ok)).unwrap();
    assert_eq!(parsed.event_id_days, DEFAULT_EVENT_ID_DAYS);
    assert_eq!(parsed.score_history_days, TWO_YEARS_DAYS);
    let short = pb::RetentionSettings {
        raw_days: 10,
        event_id_days: 11,
        ..ok
    };
    assert!(matches!(
        Retention::parse(Some(&short)),
        Err(ConsentError::InvalidArgument {
            field: "retention.event_id_days",
            ..
        })
    ));
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
