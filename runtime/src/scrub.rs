//! The door's text treatment (`sightline-scrub`), and the rules a policy's sharing level gives it.

use std::sync::Arc;

use sightline_proto::common::v1::{DataClass, SharingLevel};
pub use sightline_scrub::*;

/// The text rules of a policy's sharing level: EXTENDED only when the policy says so, BASIC for
/// anything else (fail closed).
pub fn rules_for(sharing: SharingLevel, query_keys: Arc<[String]>) -> TextRules {
    let level = match sharing {
        SharingLevel::Extended => Level::Extended,
        SharingLevel::Basic | SharingLevel::Unspecified => Level::Basic,
    };
    TextRules::new(level, query_keys)
}

/// What a text value of `class` is to the scrubber: the whole value a URL, or text that may hold
/// URLs.
pub fn shape_of(class: DataClass) -> Shape {
    if class == DataClass::Url {
        Shape::Url
    } else {
        Shape::Text
    }
}
