//! Residency locations by name, as settings, stored rows and directories name them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use dashmap::DashMap;
use futures::future::BoxFuture;
use sightline_proto::common::v1::Location;
use tokio::sync::OnceCell;

use crate::settings::Secret;
use crate::storage::{self, StorageError};

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

/// The first of `named` that is not a known location, told as the setting `field`'s error.
pub fn check_known<'a>(
    field: &str,
    named: impl IntoIterator<Item = &'a String>,
) -> Result<(), String> {
    let known = all_locations();
    match named.into_iter().find(|l| !known.contains(l)) {
        Some(unknown) => Err(format!(
            "{field}: unknown location {unknown:?} (known: {})",
            known.join(", ")
        )),
        None => Ok(()),
    }
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

/// Where `owner` finds an org's data: the policy names the old location until a data move is done,
/// but once `owner` has reported its part of the move under way, its copy is in the new one.
pub fn read_location(policy: &sightline_proto::consent::v1::Policy, owner: &str) -> Location {
    match policy.data_move.as_ref().filter(|_| policy.moving) {
        Some(data_move) if data_move.reported_by.iter().any(|o| o == owner) => {
            data_move.to_location()
        }
        _ => policy.location(),
    }
}

/// Opens the store of a location (its name, its URL); what [`Located`] calls once per location.
pub type Opener<T> =
    Arc<dyn Fn(String, String) -> BoxFuture<'static, Result<T, StorageError>> + Send + Sync>;

/// A service's stores, one per residency location (SPEC E10), as collector-svc, insights-svc and
/// linker-svc keep them. A store opens on first use (a location no org uses costs nothing) and at
/// start when its database already exists, so maintenance reaches it after a restart.
#[derive(Clone)]
pub struct Located<T: Clone + Send + Sync + 'static> {
    urls: StoreUrls,
    opened: Arc<DashMap<String, Arc<OnceCell<T>>>>,
    opener: Opener<T>,
}

impl<T: Clone + Send + Sync + 'static> std::fmt::Debug for Located<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Located")
            .field("service", &self.urls.service)
            .field("open", &self.opened.len())
            .finish_non_exhaustive()
    }
}

impl<T: Clone + Send + Sync + 'static> Located<T> {
    pub fn new(urls: StoreUrls, opener: Opener<T>) -> Self {
        Self {
            urls,
            opened: Arc::new(DashMap::new()),
            opener,
        }
    }

    /// Opens the stores that hold data already (named in settings, or an existing SQLite file).
    pub async fn open_existing(&self) -> Result<(), StorageError> {
        for location in all_locations() {
            if StoreUrls::exists(&self.urls.url(&location)) {
                self.open(&location).await?;
            }
        }
        Ok(())
    }

    async fn open(&self, location: &str) -> Result<T, StorageError> {
        let cell = self
            .opened
            .entry(location.to_owned())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        cell.get_or_try_init(|| async {
            let opened = (self.opener)(location.to_owned(), self.urls.url(location)).await?;
            tracing::info!(service = self.urls.service, location, "store open");
            Ok(opened)
        })
        .await
        .cloned()
    }

    /// The store of `location`, opened if need be; UNAVAILABLE when it cannot be opened.
    pub async fn get(&self, location: Location) -> Result<T, tonic::Status> {
        self.open(&location_name(location)).await.map_err(|error| {
            tracing::error!(%error, service = self.urls.service, "store cannot open");
            tonic::Status::unavailable("the store of the org's data location is unavailable")
        })
    }

    /// Every store open now, with its location's name.
    pub fn open_now(&self) -> Vec<(String, T)> {
        self.opened
            .iter()
            .filter_map(|entry| {
                entry
                    .value()
                    .get()
                    .map(|store| (entry.key().clone(), store.clone()))
            })
            .collect()
    }

    /// Whether two locations' stores are one database (a move between them carries nothing).
    pub fn same_database(&self, a: Location, b: Location) -> bool {
        self.urls.url(&location_name(a)) == self.urls.url(&location_name(b))
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
