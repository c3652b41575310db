//! Residency locations by name, as settings, stored rows and directories name them.

use sightline_proto::common::v1::Location;

/// The name a location has in settings and in stored rows: `global`, `eu`, `south_korea`, …
pub fn location_name(location: Location) -> String {
    match location {
        Location::Unspecified => "global".to_owned(),
        other => other
            .as_str_name()
            .trim_start_matches("LOCATION_")
            .to_ascii_lowercase(),
    }
}

/// Every location's name.
pub fn all_locations() -> Vec<String> {
    (1..)
        .map_while(|n| Location::try_from(n).ok())
        .map(location_name)
        .collect()
}
