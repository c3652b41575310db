//! collector-svc: Sightline's enforcement point and the heart of the product. Instances send their
//! events here; every event is checked against the org's current policy from consent-svc and
//! de-identified field by field, by the data class the contract gives the field, before anything is
//! stored (SPEC E1–E4, E8). It keeps page-view reports (E5), hourly rollups (E6), applies purges and
//! erasures with their audit entries (E9), and stores each org's data in its residency location
//! (E10).

pub mod aggregates;
pub mod enforce;
pub mod error;
pub mod fields;
pub mod grpc;
pub mod ingest;
pub mod locations;
pub mod maintenance;
pub mod policy_cache;
pub mod sketch;
pub mod store;
pub mod writer;

use sightline_runtime::policy_stream::TableFollower as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sightline_proto::collector::v1::collector_service_server::CollectorServiceServer;
use sightline_runtime::audited::{Auditor, LinkerAuditLog};
use sightline_runtime::auth::CredentialClient;
use sightline_runtime::client;
use sightline_runtime::directory::Directory;
use sightline_runtime::ratelimit::RateLimiter;
use sightline_runtime::server::GrpcServer;
use sightline_runtime::settings::{CollectionSettings, Limits, TlsSettings};
use sightline_runtime::{Secret, Settings, SharedClock};
use tokio_util::sync::CancellationToken;

use crate::fields::ClassTable;
use crate::grpc::CollectorApi;
use crate::locations::StoreUrls;
use crate::maintenance::{Maintenance, Schedules};
use crate::policy_cache::{Policies, PseudonymKeys};

/// Everything collector-svc needs to start.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    pub listen: SocketAddr,
    /// One database for every location, when set.
    pub database_url: Option<Secret>,
    pub data_dir: PathBuf,
    pub collection: CollectionSettings,
    pub linker_url: String,
    pub consent_url: String,
    pub service_token: Secret,
    pub limits: Limits,
    pub tls: Option<TlsSettings>,
    pub clock: SharedClock,
    pub metrics_listen: Option<SocketAddr>,
    /// Enforce and answer, but store nothing: for the enforcement benchmark only. Settings cannot
    /// turn it on.
    pub discard: bool,
}

pub use sightline_runtime::server::StartError;

impl CollectorConfig {
    pub fn from_settings(settings: &Settings) -> Result<Self, StartError> {
        let service_token = settings
            .required_service_token("collector-svc")
            .map_err(StartError::Config)?;
        sightline_runtime::location::check_known(
            "collection.locations",
            settings.collection.locations.keys(),
        )
        .map_err(StartError::Config)?;
        Ok(Self {
            listen: settings.collector.listen,
            database_url: settings.collector.database_url.clone(),
            data_dir: settings.data_dir.clone(),
            collection: settings.collection.clone(),
            linker_url: settings.linker.url.clone(),
            consent_url: settings.consent.url.clone(),
            service_token,
            limits: settings.limits,
            tls: settings.tls.clone(),
            clock: sightline_runtime::clock::system(),
            metrics_listen: settings
                .collector
                .metrics_addr()
                .map_err(StartError::Config)?,
            discard: false,
        })
    }
}

/// A bound collector-svc, ready to run.
#[derive(Debug)]
pub struct CollectorService {
    server: GrpcServer,
    api: CollectorApi,
    consent: tonic::transport::Channel,
    linker: tonic::transport::Channel,
    service_token: Secret,
    /// The policy lease (`limits.policy_lease_ms`).
    lease: std::time::Duration,
    schedules: Schedules,
    background: CancellationToken,
}

const DEPENDENCY_CHECK_EVERY: Duration = Duration::from_secs(1);

impl CollectorService {
    pub async fn build(config: CollectorConfig) -> Result<Self, StartError> {
        config.limits.check().map_err(StartError::Config)?;
        let classes =
            Arc::new(ClassTable::from_contract().map_err(|e| StartError::Config(e.to_string()))?);
        let linker =
            client::service_channel(&config.linker_url, config.tls.as_ref(), &config.limits)
                .map_err(|e| StartError::Config(format!("linker: {e}")))?;
        let consent =
            client::service_channel(&config.consent_url, config.tls.as_ref(), &config.limits)
                .map_err(|e| StartError::Config(format!("consent: {e}")))?;
        let policies = Arc::new(Policies::new(
            classes,
            PseudonymKeys::new(config.data_dir.clone()),
            Arc::from(config.collection.url_query_keys.clone()),
        ));
        let background = CancellationToken::new();
        let stores = locations::stores(
            StoreUrls {
                service: "collector",
                locations: config.collection.locations.clone(),
                shared: config.database_url.clone(),
                data_dir: config.data_dir.clone(),
                global_keeps_service_file: false,
            },
            policies.clone(),
            config.collection.writers,
            config.clock.clone(),
            background.clone(),
        );
        stores.open_existing().await?;
        // The default location opens at start, so a bad database URL stops the start, not a call.
        stores
            .get(sightline_proto::common::v1::Location::Global)
            .await
            .map_err(|s| StartError::Config(s.message().to_owned()))?;
        let auditor = Auditor::new(Arc::new(LinkerAuditLog::new(
            linker.clone(),
            config.service_token.clone(),
            "collector",
        )));
        let maintenance = Maintenance {
            stores: stores.clone(),
            policies: policies.clone(),
            auditor,
            clock: config.clock.clone(),
            locks: Arc::default(),
            rollup_pass: Arc::default(),
            consent: consent.clone(),
            service_token: config.service_token.clone(),
        };
        let api = CollectorApi {
            policies,
            stores,
            clock: config.clock,
            credentials: CredentialClient::new(
                linker.clone(),
                config.service_token.clone(),
                "collector",
                &config.limits,
            ),
            directory: Directory::new(linker.clone(), config.service_token.clone()),
            limiter: Arc::new(RateLimiter::new("collector", &config.limits)),
            maintenance,
            shutdown: background.clone(),
            call_limit: Duration::from_millis(config.limits.request_timeout_ms),
            discard: config.discard,
            aggregates: grpc::AggregateSettings {
                min_orgs: config.collection.min_orgs,
                epsilon_budget: config.collection.epsilon_budget,
                bound: config.collection.aggregate_bound,
                default_epsilon: config.collection.aggregate_epsilon,
                exact_allowed: config.collection.exact_aggregates_reveal_orgs,
            },
        };
        let mut server = GrpcServer::bind(
            "collector",
            config.listen,
            config.tls.as_ref(),
            config.limits,
            config.metrics_listen,
        )
        .await?;
        server
            .add_service(CollectorServiceServer::new(api.clone()))
            .await;
        let millis = Duration::from_millis;
        Ok(Self {
            server,
            api,
            consent,
            linker,
            service_token: config.service_token,
            lease: config.limits.policy_lease(),
            schedules: Schedules {
                rollups: millis(config.collection.rollup_every_ms.max(100)),
                sweeps: millis(config.collection.sweep_every_ms.max(1_000)),
                purges: millis(config.collection.purge_check_every_ms.max(100)),
            },
            background,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.metrics_addr()
    }

    /// The policies it enforces (tests wait on them).
    pub fn policies(&self) -> Arc<Policies> {
        self.api.policies.clone()
    }

    /// Its background work (tests run purges and rollups at once instead of waiting).
    pub fn maintenance(&self) -> Maintenance {
        self.api.maintenance.clone()
    }

    /// Serves until `shutdown`: follows the policy stream, runs rollups, purges and retention.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        sightline_runtime::server::stop_with(&shutdown, self.background.clone());
        tokio::spawn(sightline_runtime::policy_stream::follow(
            self.api.policies.clone(),
            self.consent.clone(),
            self.service_token.clone(),
            self.lease,
            self.background.clone(),
        ));
        self.server
            .follow_dependency(
                self.linker.clone(),
                Some(self.api.policies.readiness()),
                DEPENDENCY_CHECK_EVERY,
                shutdown.clone(),
            )
            .await;
        self.api
            .maintenance
            .clone()
            .spawn(self.schedules, self.background.clone());
        Ok(self.server.run_until_stopped(shutdown).await?)
    }
}
