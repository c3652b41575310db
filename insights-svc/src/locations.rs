//! One store per data-residency location (SPEC E10), as collector-svc keeps them: an org's
//! assessments, readiness reports and score history live in the store of its data location, its
//! support-bundle records in the store of its support-bundle location. Stores open on first use and
//! at start when their database already exists; the global one keeps the file insights-svc had
//! before its stores were per location (`insights.db`).

use std::sync::Arc;

use sightline_runtime::location::{Located, StoreUrls};

use crate::store::{self, InsightsStore};

/// insights-svc's stores, by location.
pub type Stores = Located<Arc<dyn InsightsStore>>;

/// The stores `urls` name, each opened with insights-svc's migrations on first use.
pub fn stores(urls: StoreUrls) -> Stores {
    Located::new(
        urls,
        Arc::new(|_location, url| Box::pin(async move { store::open(&url).await })),
    )
}
