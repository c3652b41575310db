//! consent-svc: Sightline's policy decision point. It owns each org's consent levels and their
//! immutable, signed history (SPEC C1–C3), the effective policy and its live stream (C4), view-tracking
//! settings (C5), data residency and its moves (C6), and retention (C7). collector-svc and
//! insights-svc enforce what it decides. Every change is recorded in the org's audit log in
//! linker-svc before it commits.

pub mod domain;
pub mod error;
pub mod grpc;
pub mod policy;
pub mod receipt;
pub mod replicas;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use sightline_proto::consent::v1::consent_service_server::ConsentServiceServer;
use sightline_runtime::audited::{Auditor, LinkerAuditLog};
use sightline_runtime::auth::CredentialClient;
use sightline_runtime::client;
use sightline_runtime::directory::Directory;
use sightline_runtime::ratelimit::RateLimiter;
use sightline_runtime::server::GrpcServer;
use sightline_runtime::settings::{Limits, TlsSettings};
use sightline_runtime::storage::{self, StorageError};
use sightline_runtime::{Secret, Settings, SharedClock};
use tokio_util::sync::CancellationToken;

use crate::grpc::{ApiOptions, ConsentApi};
use crate::receipt::ReceiptSigner;

/// Everything consent-svc needs to start.
#[derive(Debug, Clone)]
pub struct ConsentConfig {
    pub listen: SocketAddr,
    pub database_url: Secret,
    /// The Ed25519 receipt key (PKCS#8, mode 0600), made on first start.
    pub receipt_key_path: PathBuf,
    /// Where linker-svc answers: credentials are validated and audit entries written there.
    pub linker_url: String,
    pub service_token: Secret,
    pub limits: Limits,
    pub tls: Option<TlsSettings>,
    pub clock: SharedClock,
    pub options: ApiOptions,
    /// Where Prometheus scrapes `/metrics`; None for no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
}

pub use sightline_runtime::server::StartError;

impl ConsentConfig {
    pub fn from_settings(settings: &Settings) -> Result<Self, StartError> {
        let service_token = settings
            .required_service_token("consent-svc")
            .map_err(StartError::Config)?;
        Ok(Self {
            listen: settings.consent.listen,
            database_url: settings.consent.database_url.clone().unwrap_or_else(|| {
                Secret::new(storage::default_sqlite_url(&settings.data_dir, "consent"))
            }),
            receipt_key_path: settings.data_dir.join("consent-receipt.key"),
            linker_url: settings.linker.url.clone(),
            service_token,
            limits: settings.limits,
            tls: settings.tls.clone(),
            clock: sightline_runtime::clock::system(),
            options: ApiOptions {
                call_limit: std::time::Duration::from_millis(settings.limits.request_timeout_ms),
                residency: settings.residency.clone(),
                ..ApiOptions::default()
            },
            metrics_listen: settings
                .consent
                .metrics_addr()
                .map_err(StartError::Config)?,
        })
    }
}

/// A bound consent-svc, ready to run.
#[derive(Debug)]
pub struct ConsentService {
    server: GrpcServer,
    stop_watchers: CancellationToken,
    api: ConsentApi,
    linker: tonic::transport::Channel,
}

/// How often consent-svc checks that linker-svc answers (its health follows).
const DEPENDENCY_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How often staged changes left by a crash or a lost answer are settled.
const SETTLE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl ConsentService {
    pub async fn build(config: ConsentConfig) -> Result<Self, StartError> {
        config.limits.check().map_err(StartError::Config)?;
        let store = store::open(config.database_url.expose()).await?;
        // Listening before serving: no change another replica applies from now on goes unheard.
        let notices = match store.channel() {
            Some(channel) => Some((
                replicas::listen(config.database_url.expose(), channel)
                    .await
                    .map_err(StorageError::Connect)?,
                channel.to_owned(),
            )),
            None => None,
        };
        let signer = Arc::new(
            ReceiptSigner::load_or_create(&config.receipt_key_path)
                .map_err(|e| StartError::Config(e.to_string()))?,
        );
        // Lazy: consent-svc starts before linker-svc answers, and reconnects when it comes back.
        let linker =
            client::service_channel(&config.linker_url, config.tls.as_ref(), &config.limits)
                .map_err(|e| StartError::Config(format!("linker: {e}")))?;
        let stop_watchers = CancellationToken::new();
        let api = ConsentApi::new(
            store,
            config.clock,
            CredentialClient::new(
                linker.clone(),
                config.service_token.clone(),
                "consent",
                &config.limits,
            ),
            Directory::new(linker.clone(), config.service_token.clone()),
            RateLimiter::new("consent", &config.limits),
            Auditor::new(Arc::new(LinkerAuditLog::new(
                linker.clone(),
                config.service_token,
                "consent",
            ))),
            signer,
            stop_watchers.clone(),
            ApiOptions {
                heartbeat: config.limits.policy_heartbeat(),
                ..config.options
            },
        );
        let mut server = GrpcServer::bind(
            "consent",
            config.listen,
            config.tls.as_ref(),
            config.limits,
            config.metrics_listen,
        )
        .await?;
        server
            .add_service(ConsentServiceServer::new(api.clone()))
            .await;
        if let Some((listener, channel)) = notices {
            tokio::spawn(replicas::follow(
                listener,
                config.database_url.expose().to_owned(),
                channel,
                api.clone(),
                stop_watchers.clone(),
            ));
        }
        Ok(Self {
            server,
            stop_watchers,
            api,
            linker,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.metrics_addr()
    }

    /// Serves until `shutdown`; policy streams end then, so draining does not wait on watchers.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        sightline_runtime::server::stop_with(&shutdown, self.stop_watchers.clone());
        self.server
            .follow_dependency(
                self.linker.clone(),
                None,
                DEPENDENCY_CHECK_EVERY,
                shutdown.clone(),
            )
            .await;
        // Settle whatever a crash left staged, at start and then on a schedule.
        let api = self.api.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                api.recover().await;
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(SETTLE_EVERY) => {}
                }
            }
        });
        Ok(self.server.run_until_stopped(shutdown).await?)
    }
}
