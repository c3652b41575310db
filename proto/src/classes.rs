//! The data class of every event field, read from the contract itself: each field of an event
//! message (collector.proto) and of the assessment format (insights.proto) carries the
//! `sightline.common.v1.data_class` option, and enforcement points compile their plans from what
//! this module reads, never from a hand-kept list of field names.

use std::collections::HashSet;
use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, ExtensionDescriptor, FieldDescriptor, Kind, Value};

use crate::common::v1::DataClass;

/// The full name of the field option that marks a field's class.
pub const DATA_CLASS_OPTION: &str = "sightline.common.v1.data_class";
/// The message every ingested event is (`sightline.collector.v1.Event`).
pub const EVENT_MESSAGE: &str = "sightline.collector.v1.Event";
/// The assessment file format (`sightline.insights.v1.Assessment`).
pub const ASSESSMENT_MESSAGE: &str = "sightline.insights.v1.Assessment";

/// A leaf field reachable from a message, with its class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassifiedField {
    /// Field names from the walked message down, e.g. `page_view.viewer_email`.
    pub path: String,
    /// Field numbers along the same path.
    pub numbers: Vec<u32>,
    pub class: DataClass,
    /// Repeated or map: the class covers every element (and a map's keys).
    pub repeated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    #[error("the descriptor set does not decode: {0}")]
    Descriptor(String),
    #[error("no message {0} in the contracts")]
    UnknownMessage(String),
    #[error("fields without a data class: {}", .0.join(", "))]
    Unclassified(Vec<String>),
}

/// The contracts' descriptor pool, decoded once, custom options included.
pub fn pool() -> Result<&'static DescriptorPool, ClassError> {
    static POOL: OnceLock<Result<DescriptorPool, ClassError>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET)
            .map_err(|e| ClassError::Descriptor(e.to_string()))
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn option() -> Result<ExtensionDescriptor, ClassError> {
    pool()?
        .get_extension_by_name(DATA_CLASS_OPTION)
        .ok_or_else(|| ClassError::Descriptor(format!("no extension {DATA_CLASS_OPTION}")))
}

/// The class a field is marked with, if any.
pub fn data_class(field: &FieldDescriptor) -> Option<DataClass> {
    let option = option().ok()?;
    let options = field.options();
    if !options.has_extension(&option) {
        return None;
    }
    match options.get_extension(&option).as_ref() {
        Value::EnumNumber(n) => match DataClass::try_from(*n) {
            Ok(DataClass::Unspecified) | Err(_) => None,
            Ok(class) => Some(class),
        },
        _ => None,
    }
}

/// Every leaf field reachable from `message`, with its class. A field is a leaf when it carries a
/// class (scalars, enums, maps, and well-known types such as Timestamp must); a message field of a
/// Sightline message without a class is walked into. Fails naming every field that has no class.
pub fn classify(message: &str) -> Result<Vec<ClassifiedField>, ClassError> {
    let descriptor = pool()?
        .get_message_by_name(message)
        .ok_or_else(|| ClassError::UnknownMessage(message.to_owned()))?;
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut on_path = HashSet::new();
    walk(
        &descriptor,
        "",
        &[],
        false,
        &mut on_path,
        &mut found,
        &mut missing,
    );
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(ClassError::Unclassified(missing))
    }
}

fn walk(
    message: &prost_reflect::MessageDescriptor,
    prefix: &str,
    numbers: &[u32],
    repeated: bool,
    on_path: &mut HashSet<String>,
    found: &mut Vec<ClassifiedField>,
    missing: &mut Vec<String>,
) {
    if !on_path.insert(message.full_name().to_owned()) {
        missing.push(format!(
            "{prefix} (recursive message {})",
            message.full_name()
        ));
        return;
    }
    for field in message.fields() {
        let path = if prefix.is_empty() {
            field.name().to_owned()
        } else {
            format!("{prefix}.{}", field.name())
        };
        let mut here = numbers.to_vec();
        here.push(field.number());
        let many = repeated || field.is_list() || field.is_map();
        if let Some(class) = data_class(&field) {
            found.push(ClassifiedField {
                path,
                numbers: here,
                class,
                repeated: many,
            });
            continue;
        }
        match field.kind() {
            Kind::Message(inner)
                if !field.is_map() && inner.package_name().starts_with("sightline.") =>
            {
                walk(&inner, &path, &here, many, on_path, found, missing);
            }
            _ => missing.push(format!("{}.{}", message.full_name(), field.name())),
        }
    }
    on_path.remove(message.full_name());
}

/// Whether values of `class` are identifiers or vocabulary (ids, keys, categories, counts): a
/// value holding personal data is refused or replaced whole, never rewritten as text. The others
/// (names, free text, URLs, group and display names) are text, treated by what they may hold.
pub fn is_identifier(class: DataClass) -> bool {
    !matches!(
        class,
        DataClass::Name
            | DataClass::CustomAppName
            | DataClass::FreeText
            | DataClass::Url
            | DataClass::GroupName
            | DataClass::DisplayName
    )
}

/// Every class the contract defines, UNSPECIFIED excepted.
pub fn all_classes() -> Vec<DataClass> {
    (1..).map_while(|n| DataClass::try_from(n).ok()).collect()
}
