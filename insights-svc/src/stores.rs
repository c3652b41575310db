//! One store per data-residency location (SPEC E10), as collector-svc keeps them: an org's
//! assessments, readiness reports and score history live in the store of its data location, its
//! support-bundle records in the store of its support-bundle location. Stores open on first use and
//! at start when their database already exists; the global one keeps the file insights-svc had
//! before its stores were per location (`insights.db`).

use std::sync::Arc;

use dashmap::DashMap;
use sightline_proto::common::v1::Location;
use sightline_runtime::location::{StoreUrls, all_locations, location_name};
use sightline_runtime::storage::StorageError;
use tokio::sync::OnceCell;
use tonic::Status;

use crate::store::{self, InsightsStore};

/// A location's store, opened once on first use.
type Slot = Arc<OnceCell<Arc<dyn InsightsStore>>>;

#[derive(Debug, Clone)]
pub struct Stores {
    urls: StoreUrls,
    opened: Arc<DashMap<String, Slot>>,
}

impl Stores {
    pub fn new(urls: StoreUrls) -> Self {
        Self {
            urls,
            opened: Arc::new(DashMap::new()),
        }
    }

    /// Opens the stores that hold data already, so sweeps, purges and moves reach them after a
    /// restart.
    pub async fn open_existing(&self) -> Result<(), StorageError> {
        for location in all_locations() {
            if StoreUrls::exists(&self.urls.url(&location)) {
                self.open(&location).await?;
            }
        }
        Ok(())
    }

    async fn open(&self, location: &str) -> Result<Arc<dyn InsightsStore>, StorageError> {
        let cell = self
            .opened
            .entry(location.to_owned())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        cell.get_or_try_init(|| async {
            let opened = store::open(&self.urls.url(location)).await?;
            tracing::info!(location, "insights store open");
            Ok(opened)
        })
        .await
        .cloned()
    }

    /// The store of `location`, opened if need be.
    pub async fn get(&self, location: Location) -> Result<Arc<dyn InsightsStore>, Status> {
        self.open(&location_name(location)).await.map_err(|error| {
            tracing::error!(%error, "insights store cannot open");
            Status::unavailable("the store of the org's data location is unavailable")
        })
    }

    /// Every store open now, with its location's name.
    pub fn open_now(&self) -> Vec<(String, Arc<dyn InsightsStore>)> {
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

    /// Whether two locations' stores are one database (a move between them relabels in place).
    pub fn same_database(&self, a: Location, b: Location) -> bool {
        self.urls.url(&location_name(a)) == self.urls.url(&location_name(b))
    }
}
