//! insights-svc: what vendors' and customers' admins look at (SPEC I1–I6) — the optimization score
//! with explained findings from rules over collector-svc's hourly rollups, trends and score
//! history, cloud readiness, safe manual uploads (assessment files and support bundles, scrubbed
//! and treated by the policy's field rules before anything is kept), retention and purges as
//! audited changes, and the portfolio of an org's instances.

pub mod archive;
pub mod enforce;
pub mod error;
pub mod grpc;
pub mod health;
pub mod locations;
pub mod maintenance;
pub mod policy_cache;
pub mod readiness;
pub mod rollups;
pub mod rules;
pub mod store;
pub mod trends;
pub mod upload;

use sightline_runtime::policy_stream::TableFollower as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sightline_proto::insights::v1::insights_service_server::InsightsServiceServer;
use sightline_runtime::audited::{Auditor, LinkerAuditLog};
use sightline_runtime::auth::CredentialClient;
use sightline_runtime::client;
use sightline_runtime::directory::Directory;
use sightline_runtime::location::StoreUrls;
use sightline_runtime::pseudonym::PseudonymKeys;
use sightline_runtime::ratelimit::RateLimiter;
use sightline_runtime::server::GrpcServer;
use sightline_runtime::settings::{AnalysisSettings, Limits, TlsSettings};
use sightline_runtime::{Secret, Settings, SharedClock};
use tokio_util::sync::CancellationToken;

use crate::grpc::{BundleDirs, InsightsApi, UploadLimits};
use crate::maintenance::{Maintenance, Schedules};
use crate::policy_cache::Policies;
use crate::rollups::Rollups;
use crate::rules::Rules;
use crate::upload::BundleLimits;

/// Everything insights-svc needs to start.
#[derive(Debug, Clone)]
pub struct InsightsConfig {
    pub listen: SocketAddr,
    pub database_url: Option<Secret>,
    pub data_dir: PathBuf,
    pub analysis: AnalysisSettings,
    pub linker_url: String,
    pub consent_url: String,
    pub collector_url: String,
    pub service_token: Secret,
    pub limits: Limits,
    pub tls: Option<TlsSettings>,
    pub clock: SharedClock,
    pub metrics_listen: Option<SocketAddr>,
}

pub use sightline_runtime::server::StartError;

impl InsightsConfig {
    pub fn from_settings(settings: &Settings) -> Result<Self, StartError> {
        let service_token = settings
            .required_service_token("insights-svc")
            .map_err(StartError::Config)?;
        sightline_runtime::location::check_known(
            "analysis.bundle_dirs",
            settings.analysis.bundle_dirs.keys(),
        )
        .map_err(StartError::Config)?;
        Ok(Self {
            listen: settings.insights.listen,
            database_url: settings.insights.database_url.clone(),
            data_dir: settings.data_dir.clone(),
            analysis: settings.analysis.clone(),
            linker_url: settings.linker.url.clone(),
            consent_url: settings.consent.url.clone(),
            collector_url: settings.collector.url.clone(),
            service_token,
            limits: settings.limits,
            tls: settings.tls.clone(),
            clock: sightline_runtime::clock::system(),
            metrics_listen: settings
                .insights
                .metrics_addr()
                .map_err(StartError::Config)?,
        })
    }
}

/// A bound insights-svc, ready to run.
#[derive(Debug)]
pub struct InsightsService {
    server: GrpcServer,
    maintenance: Maintenance,
    consent: tonic::transport::Channel,
    linker: tonic::transport::Channel,
    service_token: Secret,
    /// The policy lease (`limits.policy_lease_ms`).
    lease: std::time::Duration,
    schedules: Schedules,
}

const DEPENDENCY_CHECK_EVERY: Duration = Duration::from_secs(1);

impl InsightsService {
    pub async fn build(config: InsightsConfig) -> Result<Self, StartError> {
        config.limits.check().map_err(StartError::Config)?;
        // A bad rules file stops the start, naming the rule and the field.
        let rules = Arc::new(
            Rules::load(config.analysis.rules_file.as_deref())
                .map_err(|e| StartError::Config(e.to_string()))?,
        );
        let linker =
            client::service_channel(&config.linker_url, config.tls.as_ref(), &config.limits)
                .map_err(|e| StartError::Config(format!("linker: {e}")))?;
        let consent =
            client::service_channel(&config.consent_url, config.tls.as_ref(), &config.limits)
                .map_err(|e| StartError::Config(format!("consent: {e}")))?;
        let collector =
            client::service_channel(&config.collector_url, config.tls.as_ref(), &config.limits)
                .map_err(|e| StartError::Config(format!("collector: {e}")))?;
        let stores = locations::stores(StoreUrls {
            service: "insights",
            locations: config.analysis.locations.clone(),
            shared: config.database_url.clone(),
            data_dir: config.data_dir.clone(),
            global_keeps_service_file: true,
        });
        stores.open_existing().await?;
        // The default location opens at start, so a bad database URL stops the start, not a call.
        stores
            .get(sightline_proto::common::v1::Location::Global)
            .await
            .map_err(|s| StartError::Config(s.message().to_owned()))?;
        let analysis = &config.analysis;
        let api = InsightsApi {
            stores,
            policies: Arc::new(Policies::default()),
            keys: Arc::new(PseudonymKeys::new(config.data_dir.clone())),
            rules,
            rollups: Rollups::new(collector, config.service_token.clone()),
            credentials: CredentialClient::new(
                linker.clone(),
                config.service_token.clone(),
                "insights",
                &config.limits,
            ),
            directory: Directory::new(linker.clone(), config.service_token.clone()),
            linker: linker.clone(),
            service_token: config.service_token.clone(),
            limiter: Arc::new(RateLimiter::new("insights", &config.limits)),
            clock: config.clock.clone(),
            limits: UploadLimits {
                max_assessment_bytes: analysis.max_assessment_bytes,
                max_bundle_bytes: analysis.max_bundle_bytes,
                bundle: BundleLimits {
                    max_expanded: analysis.max_bundle_expanded_bytes,
                    max_ratio: analysis.max_bundle_ratio.max(1),
                    max_files: analysis.max_bundle_files.max(1),
                    max_check: Duration::from_millis(analysis.max_bundle_check_ms.max(1)),
                },
            },
            bundle_dirs: BundleDirs {
                data_dir: config.data_dir.clone(),
                configured: analysis.bundle_dirs.clone(),
                orphan_grace: Duration::from_millis(analysis.orphan_grace_ms),
            },
            keeping: Arc::default(),
        };
        let auditor = Auditor::new(Arc::new(LinkerAuditLog::new(
            linker.clone(),
            config.service_token.clone(),
            "insights",
        )));
        let mut server = GrpcServer::bind(
            "insights",
            config.listen,
            config.tls.as_ref(),
            config.limits,
            config.metrics_listen,
        )
        .await?;
        server
            .add_service(InsightsServiceServer::new(api.clone()))
            .await;
        let millis = Duration::from_millis;
        Ok(Self {
            server,
            maintenance: Maintenance {
                api,
                auditor,
                consent: consent.clone(),
                passes: Arc::default(),
            },
            consent,
            linker,
            service_token: config.service_token,
            lease: config.limits.policy_lease(),
            schedules: Schedules {
                scores: millis(analysis.score_every_ms.max(100)),
                sweeps: millis(analysis.sweep_every_ms.max(100)),
                purges: millis(analysis.purge_check_every_ms.max(100)),
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.metrics_addr()
    }

    /// Its background work (tests run passes at once instead of waiting).
    pub fn maintenance(&self) -> Maintenance {
        self.maintenance.clone()
    }

    /// The policies it follows (tests wait on them).
    pub fn policies(&self) -> Arc<Policies> {
        self.maintenance.api.policies.clone()
    }

    /// Serves until `shutdown`: follows the policy stream, scores hourly, sweeps and purges.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        // What a crash left behind goes before any upload is taken.
        match self.maintenance.remove_orphan_files().await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "bundle files without a record removed"),
            Err(error) => tracing::warn!(%error, "bundle files without a record not removed"),
        }
        let background = shutdown.child_token();
        tokio::spawn(sightline_runtime::policy_stream::follow(
            self.maintenance.api.policies.clone(),
            self.consent.clone(),
            self.service_token.clone(),
            self.lease,
            background.clone(),
        ));
        self.server
            .follow_dependency(
                self.linker.clone(),
                Some(self.maintenance.api.policies.readiness()),
                DEPENDENCY_CHECK_EVERY,
                shutdown.clone(),
            )
            .await;
        self.maintenance
            .clone()
            .spawn(self.schedules, background.clone());
        let served = self.server.run_until_stopped(shutdown).await;
        background.cancel();
        Ok(served?)
    }
}
