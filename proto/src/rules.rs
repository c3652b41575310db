//! What the levels of the contract allow, for every service that enforces them (consent-svc
//! publishes them in each policy; collector-svc and insights-svc apply them): the event kinds a
//! usage level allows (SPEC E3) and what happens to a field of each data class under each sharing
//! level (E4, the seed's Basic/Extended table). Beside [`crate::classes`], which reads each field's
//! class from the contract, so no service needs another's crate for them.

use crate::common::v1::{DataClass, EventKind, FieldAction, SharingLevel, UsageLevel};
use crate::consent::v1::FieldRule;

/// Event kinds a usage level allows. Page views also need view tracking to allow them.
pub fn allowed_kinds(usage: UsageLevel, any_channel_tracked: bool) -> Vec<EventKind> {
    use EventKind as K;
    match usage {
        UsageLevel::Unspecified | UsageLevel::Disabled => vec![],
        UsageLevel::Basic => vec![
            K::InstanceMetadata,
            K::Metric,
            K::ClientMetric,
            K::AppInventory,
        ],
        UsageLevel::Advanced => {
            let mut kinds = vec![
                K::InstanceMetadata,
                K::Metric,
                K::ClientMetric,
                K::AppInventory,
                K::FeatureUsage,
            ];
            if any_channel_tracked {
                kinds.push(K::PageView);
            }
            kinds
        }
    }
}

/// What an enforcement point does with a field of `class` under `sharing`. Exhaustive: a new class
/// does not compile without its rule. An unspecified level is BASIC, the stricter one.
pub fn field_action(class: DataClass, sharing: SharingLevel) -> FieldAction {
    use DataClass as C;
    use FieldAction as A;
    let extended = sharing == SharingLevel::Extended;
    match class {
        C::TechnicalId | C::Count | C::MetricValue | C::Category | C::Timestamp | C::PublicApp => {
            A::Keep
        }
        // User-generated content: kept only under EXTENDED.
        C::Key | C::Name => {
            if extended {
                A::Keep
            } else {
                A::Drop
            }
        }
        // Custom apps are recognisable by a keyed hash under BASIC, readable under EXTENDED.
        C::CustomAppId | C::CustomAppName => {
            if extended {
                A::Keep
            } else {
                A::KeyedHash
            }
        }
        // People are only ever technical pseudonyms; machines too.
        C::Username | C::UserId | C::NodeId => A::KeyedHash,
        // Never stored.
        C::DisplayName | C::Email | C::IpAddress | C::GroupName | C::Unspecified => A::Drop,
        C::FreeText | C::Url => A::Scrub,
    }
}

/// A policy's rules under `sharing`: one per class the contract defines.
pub fn field_rules(sharing: SharingLevel) -> Vec<FieldRule> {
    crate::classes::all_classes()
        .into_iter()
        .map(|class| FieldRule {
            data_class: class as i32,
            action: field_action(class, sharing) as i32,
        })
        .collect()
}

/// Kinds that may feed cross-org statistics under each contribution flag (metadata, in-app data).
pub fn contribution_kinds() -> (Vec<EventKind>, Vec<EventKind>) {
    use EventKind as K;
    (
        vec![K::InstanceMetadata, K::AppInventory],
        vec![K::Metric, K::ClientMetric, K::FeatureUsage],
    )
}
