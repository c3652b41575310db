//! One store per data-residency location (SPEC E10): an org's records go to its location's store,
//! and a store refuses records of another location. Stores open on first use (a location no org
//! uses costs nothing) and at start when their database already exists.

use std::sync::Arc;

use dashmap::DashMap;
use sightline_proto::common::v1::Location;
use sightline_runtime::storage::StorageError;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::policy::Policies;
use crate::store::{self, CollectorStore};
use crate::writer::Writer;

pub use sightline_runtime::location::{StoreUrls, all_locations, location_name};

#[derive(Debug, Clone)]
pub struct Opened {
    pub store: Arc<dyn CollectorStore>,
    pub writer: Writer,
}

#[derive(Debug, Clone)]
pub struct Stores {
    urls: StoreUrls,
    opened: Arc<DashMap<String, Arc<OnceCell<Opened>>>>,
    policies: Arc<Policies>,
    writers: usize,
    shutdown: CancellationToken,
}

impl Stores {
    pub fn new(
        urls: StoreUrls,
        policies: Arc<Policies>,
        writers: usize,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            urls,
            opened: Arc::new(DashMap::new()),
            policies,
            writers,
            shutdown,
        }
    }

    /// Opens the stores that hold data already (named in settings, or an existing SQLite file), so
    /// rollups, purges and retention reach them after a restart.
    pub async fn open_existing(&self) -> Result<(), StorageError> {
        for location in all_locations() {
            if StoreUrls::exists(&self.urls.url(&location)) {
                self.open(&location).await?;
            }
        }
        Ok(())
    }

    async fn open(&self, location: &str) -> Result<Opened, StorageError> {
        let cell = self
            .opened
            .entry(location.to_owned())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        cell.get_or_try_init(|| async {
            let url = self.urls.url(location);
            let store = store::open(&url, location).await?;
            let writers = if url.starts_with("sqlite:") {
                1
            } else {
                self.writers
            };
            let writer = Writer::start(
                store.clone(),
                self.policies.clone(),
                writers,
                1_024,
                self.shutdown.clone(),
            );
            tracing::info!(location, "collector store open");
            Ok(Opened { store, writer })
        })
        .await
        .cloned()
    }

    /// The store of `location`, opened if need be.
    pub async fn get(&self, location: Location) -> Result<Opened, Status> {
        self.open(&location_name(location)).await.map_err(|error| {
            tracing::error!(%error, "collector store cannot open");
            Status::unavailable("the store of the org's data location is unavailable")
        })
    }

    /// Every store open now.
    pub fn open_now(&self) -> Vec<Opened> {
        self.opened
            .iter()
            .filter_map(|entry| entry.value().get().cloned())
            .collect()
    }
}
