//! The fields of an event and their data classes, read from the contract.
//!
//! The collector's code names each field it handles ([`Field`]), but never its class: the class of
//! every field comes from the `sightline.common.v1.data_class` option in the descriptor set, and the
//! policy's rule for that class decides what happens to it. At start the collector checks that the
//! fields it handles are exactly the fields the contract has, so a field added to the contract
//! without handling here stops the service from starting (and fails a test) instead of slipping
//! through.

use std::collections::BTreeSet;

use sightline_proto::classes::{self, ClassError, EVENT_MESSAGE};
use sightline_proto::common::v1::DataClass;

macro_rules! fields {
    ($($variant:ident => $path:literal,)*) => {
        /// Every leaf field of `sightline.collector.v1.Event`, by its path.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(usize)]
        pub enum Field {
            $($variant,)*
        }

        impl Field {
            pub const ALL: &'static [Field] = &[$(Field::$variant,)*];

            /// The field's path from the event, as the contract and the preview name it.
            pub const fn path(self) -> &'static str {
                match self {
                    $(Field::$variant => $path,)*
                }
            }
        }
    };
}

fields! {
    EventId => "event_id",
    OccurredAt => "occurred_at",
    MetaServerId => "instance_metadata.metadata.server_id",
    MetaBaseUrl => "instance_metadata.metadata.base_url",
    MetaProduct => "instance_metadata.metadata.product",
    MetaVersion => "instance_metadata.metadata.version",
    MetaLicenseSen => "instance_metadata.metadata.license_sen",
    MetaNodeCount => "instance_metadata.metadata.node_count",
    NodeId => "instance_metadata.metadata.nodes.node_id",
    NodeCpuCount => "instance_metadata.metadata.nodes.cpu_count",
    NodeMemoryBytes => "instance_metadata.metadata.nodes.memory_bytes",
    NodeJavaVersion => "instance_metadata.metadata.nodes.java_version",
    NodeState => "instance_metadata.metadata.nodes.state",
    MetaFeatureFlags => "instance_metadata.metadata.feature_flags",
    AppLinkUrl => "instance_metadata.app_links.url",
    AppLinkProductFamily => "instance_metadata.app_links.product_family",
    AppLinkServerId => "instance_metadata.app_links.server_id",
    AppLinkVersion => "instance_metadata.app_links.version",
    MetaAttributes => "instance_metadata.attributes",
    MetricName => "metric.name",
    MetricType => "metric.type",
    MetricValue => "metric.value",
    MetricAttributes => "metric.attributes",
    MetricTags => "metric.tags",
    MetricUnit => "metric.unit",
    MetricPeriodic => "metric.periodic_sample",
    MetricValues => "metric.values",
    FeatureName => "feature_usage.feature",
    FeatureUsername => "feature_usage.username",
    FeatureProjectId => "feature_usage.project_id",
    FeatureProjectKey => "feature_usage.project_key",
    FeatureProjectName => "feature_usage.project_name",
    FeatureAppKey => "feature_usage.app_key",
    FeatureAppName => "feature_usage.app_name",
    FeatureCustomApp => "feature_usage.custom_app",
    FeatureCount => "feature_usage.count",
    FeatureAttributes => "feature_usage.attributes",
    FeatureUserId => "feature_usage.user_id",
    FeatureCustomAppKey => "feature_usage.custom_app_key",
    FeatureCustomAppName => "feature_usage.custom_app_name",
    PageId => "page_view.page_id",
    PageSpaceId => "page_view.space_id",
    PageTitle => "page_view.page_title",
    PageSpaceKey => "page_view.space_key",
    PageSpaceName => "page_view.space_name",
    PageViewerId => "page_view.viewer_id",
    PageAnonymous => "page_view.anonymous",
    PageViewerGroups => "page_view.viewer_groups",
    PageChannel => "page_view.channel",
    PageViewerDisplayName => "page_view.viewer_display_name",
    PageViewerEmail => "page_view.viewer_email",
    PageClientIp => "page_view.client_ip",
    PageUrl => "page_view.page_url",
    ClientName => "client_metric.name",
    ClientP50 => "client_metric.p50_ms",
    ClientP95 => "client_metric.p95_ms",
    ClientErrorRate => "client_metric.error_rate",
    ClientSampleCount => "client_metric.sample_count",
    ClientAttributes => "client_metric.attributes",
    ClientWindowStart => "client_metric.window.start",
    ClientWindowEnd => "client_metric.window.end",
    AppKey => "app_inventory.apps.key",
    AppName => "app_inventory.apps.name",
    AppVersion => "app_inventory.apps.version",
    AppEnabled => "app_inventory.apps.enabled",
    AppCustom => "app_inventory.apps.custom",
    AppCustomKey => "app_inventory.apps.custom_key",
    AppCustomName => "app_inventory.apps.custom_name",
}

/// The data class of every [`Field`], from the contract.
#[derive(Debug, Clone)]
pub struct ClassTable {
    classes: Vec<DataClass>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldsError {
    #[error(transparent)]
    Contract(#[from] ClassError),
    #[error(
        "the contract's event fields and the collector's differ: not handled here: [{}]; not in the contract: [{}]",
        .unhandled.join(", "),
        .unknown.join(", ")
    )]
    Mismatch {
        unhandled: Vec<String>,
        unknown: Vec<String>,
    },
}

impl ClassTable {
    /// Reads the classes from the contract; fails when a field of the contract is not handled here,
    /// or the other way round.
    pub fn from_contract() -> Result<Self, FieldsError> {
        let classified = classes::classify(EVENT_MESSAGE)?;
        let contract: BTreeSet<&str> = classified.iter().map(|f| f.path.as_str()).collect();
        let handled: BTreeSet<&str> = Field::ALL.iter().map(|f| f.path()).collect();
        let unhandled: Vec<String> = contract
            .difference(&handled)
            .map(|p| (*p).to_owned())
            .collect();
        let unknown: Vec<String> = handled
            .difference(&contract)
            .map(|p| (*p).to_owned())
            .collect();
        if !unhandled.is_empty() || !unknown.is_empty() {
            return Err(FieldsError::Mismatch { unhandled, unknown });
        }
        let classes = Field::ALL
            .iter()
            .map(|field| {
                classified
                    .iter()
                    .find(|c| c.path == field.path())
                    .map_or(DataClass::Unspecified, |c| c.class)
            })
            .collect();
        Ok(Self { classes })
    }

    pub fn class(&self, field: Field) -> DataClass {
        self.classes
            .get(field as usize)
            .copied()
            .unwrap_or(DataClass::Unspecified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collector_handles_exactly_the_contracts_fields() {
        let table = ClassTable::from_contract().unwrap();
        // Spot checks that the classes come from the contract.
        assert_eq!(table.class(Field::PageViewerEmail), DataClass::Email);
        assert_eq!(table.class(Field::PageTitle), DataClass::Name);
        assert_eq!(table.class(Field::MetricTags), DataClass::FreeText);
        assert_eq!(table.class(Field::NodeId), DataClass::NodeId);
        for field in Field::ALL {
            assert_ne!(table.class(*field), DataClass::Unspecified, "{field:?}");
        }
    }
}
