//! One store per data-residency location (SPEC E10): an org's records go to its location's store,
//! and a store refuses records of another location. Stores open on first use (a location no org
//! uses costs nothing) and at start when their database already exists; each has its own group
//! committer ([`Writer`]).

use std::sync::Arc;

use sightline_runtime::SharedClock;
use sightline_runtime::location::Located;
use tokio_util::sync::CancellationToken;

use crate::maintenance::prepare_days_around;
use crate::policy_cache::Policies;
use crate::store::{self, CollectorStore};
use crate::writer::{Committers, Writer};

pub use sightline_runtime::location::{StoreUrls, all_locations, location_name};

/// A location's store with its writer.
#[derive(Debug, Clone)]
pub struct Opened {
    pub store: Arc<dyn CollectorStore>,
    pub writer: Writer,
}

/// collector-svc's stores, by location.
pub type Stores = Located<Opened>;

/// The stores `urls` name; each opens with collector-svc's migrations and starts its writer
/// (`writers` committers on a server database, one on SQLite).
pub fn stores(
    urls: StoreUrls,
    policies: Arc<Policies>,
    writers: usize,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Stores {
    Located::new(
        urls,
        Arc::new(move |location, url| {
            let (policies, shutdown) = (policies.clone(), shutdown.clone());
            let now = clock.now_ms();
            Box::pin(async move {
                let store = store::open(&url, &location).await?;
                // Ready for today's events before the first one comes (each sweep keeps the
                // days ahead made from here on).
                prepare_days_around(store.as_ref(), now).await;
                let committers = if url.starts_with("sqlite:") {
                    Committers::OwnThread
                } else {
                    Committers::Tasks(writers)
                };
                let writer = Writer::start(store.clone(), policies, committers, 1_024, shutdown);
                Ok(Opened { store, writer })
            })
        }),
    )
}
