//! Residency locations by name, as settings, stored rows and directories name them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use sightline_proto::common::v1::Location;

use crate::settings::Secret;
use crate::storage;

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

/// Where each location's store of a service lives (SPEC E10): a named URL, else the one shared
/// database, else a SQLite file per location in the data directory (`<service>-<location>`).
#[derive(Debug, Clone)]
pub struct StoreUrls {
    /// The service the stores belong to (`collector`, `insights`): the SQLite files' prefix.
    pub service: &'static str,
    /// Named locations.
    pub locations: BTreeMap<String, Secret>,
    /// Every other location, when set (one database for all).
    pub shared: Option<Secret>,
    /// Else a SQLite file per location here.
    pub data_dir: PathBuf,
    /// The global location keeps the file a service had before its stores were per location
    /// (`<service>`), so its data stays where it was.
    pub global_keeps_service_file: bool,
}

impl StoreUrls {
    pub fn url(&self, location: &str) -> String {
        match (self.locations.get(location), &self.shared) {
            (Some(url), _) | (None, Some(url)) => url.expose().to_owned(),
            (None, None) if self.global_keeps_service_file && location == "global" => {
                storage::default_sqlite_url(&self.data_dir, self.service)
            }
            (None, None) => {
                storage::default_sqlite_url(&self.data_dir, &format!("{}-{location}", self.service))
            }
        }
    }

    /// Whether a store at `url` holds data already (a SQLite file that exists; any server).
    pub fn exists(url: &str) -> bool {
        match url.strip_prefix("sqlite://") {
            Some(path) => std::path::Path::new(path.split('?').next().unwrap_or(path)).exists(),
            None => true,
        }
    }
}

/// Tells consent-svc that `owner`'s part of the org's move of `scope` is done (with the service
/// token). `Ok(false)`: the move was finished meanwhile (by the operator, or a report whose reply
/// was lost), which is no failure.
pub async fn report_move_part(
    consent: tonic::transport::Channel,
    service_token: &Secret,
    org_id: &str,
    scope: sightline_proto::consent::v1::ResidencyScope,
    owner: &str,
) -> Result<bool, tonic::Status> {
    use sightline_proto::consent::v1 as consent_pb;
    let mut request = tonic::Request::new(consent_pb::RequestResidencyMoveRequest {
        org_id: org_id.to_owned(),
        transition: consent_pb::MoveTransition::Complete as i32,
        scope: scope as i32,
        to_location: 0,
        owner: owner.to_owned(),
    });
    request.set_timeout(std::time::Duration::from_secs(10));
    crate::auth::authorize(&mut request, service_token)?;
    match consent_pb::consent_service_client::ConsentServiceClient::new(consent)
        .request_residency_move(request)
        .await
    {
        Ok(_) => Ok(true),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => Ok(false),
        Err(status) => Err(status),
    }
}
