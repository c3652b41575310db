//! Every field of every event and of the assessment format carries a data class, read from the
//! descriptor set that reflection serves: a new field without one fails here before it can slip
//! past enforcement.

use sightline_proto::classes::{self, ASSESSMENT_MESSAGE, ClassError, EVENT_MESSAGE};
use sightline_proto::common::v1::DataClass;

fn class_of(message: &str, path: &str) -> DataClass {
    classes::classify(message)
        .unwrap()
        .into_iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("{path} is not a classified field of {message}"))
        .class
}

#[test]
fn every_event_field_has_a_data_class() {
    let fields = classes::classify(EVENT_MESSAGE).unwrap_or_else(|e| panic!("{e}"));
    // Every kind of event is walked into, down to nested common messages.
    for path in [
        "event_id",
        "occurred_at",
        "instance_metadata.metadata.base_url",
        "instance_metadata.metadata.nodes.node_id",
        "instance_metadata.app_links.url",
        "metric.values",
        "feature_usage.user_id",
        "page_view.client_ip",
        "client_metric.window.start",
        "app_inventory.apps.custom_name",
    ] {
        assert!(
            fields.iter().any(|f| f.path == path),
            "{path} missing from {fields:?}"
        );
    }
    assert!(fields.len() > 60, "only {} fields", fields.len());
}

#[test]
fn every_assessment_field_has_a_data_class() {
    let fields = classes::classify(ASSESSMENT_MESSAGE).unwrap_or_else(|e| panic!("{e}"));
    assert!(fields.iter().any(|f| f.path == "entities.name"));
    assert!(
        fields
            .iter()
            .any(|f| f.path == "metrics.tags" && f.repeated)
    );
}

#[test]
fn the_classes_say_what_the_spec_says() {
    use DataClass as C;
    for (path, class) in [
        ("page_view.viewer_display_name", C::DisplayName),
        ("page_view.viewer_email", C::Email),
        ("page_view.client_ip", C::IpAddress),
        ("page_view.page_title", C::Name),
        ("page_view.space_key", C::Key),
        ("page_view.space_name", C::Name),
        ("page_view.viewer_id", C::UserId),
        ("page_view.page_url", C::Url),
        ("feature_usage.project_key", C::Key),
        ("feature_usage.project_name", C::Name),
        ("feature_usage.username", C::Username),
        ("feature_usage.custom_app_name", C::CustomAppName),
        ("feature_usage.project_id", C::TechnicalId),
        ("metric.attributes", C::FreeText),
        ("metric.tags", C::FreeText),
        ("metric.value", C::MetricValue),
    ] {
        assert_eq!(class_of(EVENT_MESSAGE, path), class, "{path}");
    }
    assert_eq!(class_of(ASSESSMENT_MESSAGE, "entities.key"), C::Key);
    assert_eq!(class_of(ASSESSMENT_MESSAGE, "counts.issues"), C::Count);
}

#[test]
fn a_message_with_an_unclassified_field_is_refused_and_named() {
    // Replies carry no classes: walking one names each of its unclassified fields.
    let err = classes::classify("sightline.collector.v1.IngestResponse").unwrap_err();
    match err {
        ClassError::Unclassified(fields) => {
            assert!(
                fields.contains(&"sightline.collector.v1.DropCount.reason".to_owned()),
                "{fields:?}"
            );
            assert!(
                fields.contains(&"sightline.collector.v1.IngestResult.accepted".to_owned()),
                "{fields:?}"
            );
        }
        other => panic!("{other}"),
    }
    assert!(matches!(
        classes::classify("sightline.collector.v1.Nope"),
        Err(ClassError::UnknownMessage(_))
    ));
}

#[test]
fn all_classes_lists_every_value_of_the_enum() {
    let all = classes::all_classes();
    assert_eq!(all.first(), Some(&DataClass::TechnicalId));
    assert!(all.contains(&DataClass::NodeId));
    assert!(!all.contains(&DataClass::Unspecified));
}

#[test]
fn the_example_assessment_file_is_the_json_form_of_the_contract_message() {
    let pool = classes::pool().unwrap();
    let message = pool.get_message_by_name(ASSESSMENT_MESSAGE).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/assessment.json");
    let text = std::fs::read_to_string(path).unwrap();
    let mut json = serde_json::Deserializer::from_str(&text);
    let parsed = prost_reflect::DynamicMessage::deserialize(message, &mut json)
        .unwrap_or_else(|e| panic!("examples/assessment.json does not parse: {e}"));
    json.end().unwrap();
    assert_eq!(
        parsed.get_field_by_name("format").unwrap().as_str(),
        Some("sightline.assessment")
    );
    assert_eq!(
        parsed.get_field_by_name("format_version").unwrap().as_u32(),
        Some(1)
    );
    // A field the contract does not have is refused, not ignored.
    let wrong = text.replacen("\"format\"", "\"formatt\"", 1);
    let mut json = serde_json::Deserializer::from_str(&wrong);
    let message = pool.get_message_by_name(ASSESSMENT_MESSAGE).unwrap();
    assert!(prost_reflect::DynamicMessage::deserialize(message, &mut json).is_err());
}
