//! linker-svc: Sightline's identity and record keeper. It owns orgs, admin tokens, link keys, instance
//! credentials, domain claims, license records and instance detection (SPEC L1–L5), and each org's
//! append-only, hash-chained audit log that every service writes to (L6).
//!
//! [`Linker::build`] binds the listener; [`Linker::run_until_stopped`] serves until shut down. The
//! `sightline` binary, the stack launcher and the tests all go through these two calls.

pub mod audit;
pub mod detect;
pub mod dns_claims;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod residency;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use sightline_proto::audit::v1::audit_service_server::AuditServiceServer;
use sightline_proto::linker::v1::linker_service_server::LinkerServiceServer;
use sightline_runtime::location::StoreUrls;
use sightline_runtime::secret_file;
use sightline_runtime::server::GrpcServer;
use sightline_runtime::settings::{Limits, TlsSettings};
use sightline_runtime::storage;
use sightline_runtime::token::TokenKind;
use sightline_runtime::{Secret, Settings, SharedClock};
use tokio_util::sync::CancellationToken;

use crate::dns_claims::TxtResolver;
use crate::grpc::{Authority, LinkerApi};

/// Everything linker-svc needs to start.
#[derive(Debug, Clone)]
pub struct LinkerConfig {
    pub listen: SocketAddr,
    pub database_url: Secret,
    pub operator_token: Secret,
    /// Tokens other Sightline services present (ValidateCredential, AppendEvent).
    pub service_tokens: Vec<Secret>,
    pub limits: Limits,
    pub tls: Option<TlsSettings>,
    pub clock: SharedClock,
    pub txt_resolver: Arc<dyn TxtResolver>,
    /// Where Prometheus scrapes `/metrics`; None for no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// consent-svc, whose policies place each org's instance metadata (SPEC E10). None: all of it
    /// stays in this database (a linker-svc alone, as some tests run it; see [`Linker::residency`]).
    pub consent_url: Option<String>,
    /// Where each location's store of instance metadata lives (`residency.linker_locations`; GLOBAL's is
    /// this database unless named).
    pub locations: std::collections::BTreeMap<String, Secret>,
    /// The data directory (SQLite files of the other locations, by default).
    pub data_dir: std::path::PathBuf,
}

pub use sightline_runtime::server::StartError;

impl LinkerConfig {
    /// The configuration `settings` describe, with the operator token from the data directory.
    pub fn from_settings(settings: &Settings) -> Result<Self, StartError> {
        let (operator_token, _) = ensure_operator_token(&settings.data_dir)?;
        let database_url = settings.linker.database_url.clone().unwrap_or_else(|| {
            Secret::new(storage::default_sqlite_url(&settings.data_dir, "linker"))
        });
        let txt_resolver: Arc<dyn TxtResolver> =
            Arc::new(dns_claims::DnsTxt::from_system().map_err(StartError::Config)?);
        Ok(Self {
            listen: settings.linker.listen,
            database_url,
            operator_token,
            service_tokens: settings.service_token.iter().cloned().collect(),
            limits: settings.limits,
            tls: settings.tls.clone(),
            clock: sightline_runtime::clock::system(),
            txt_resolver,
            metrics_listen: settings.linker.metrics_addr().map_err(StartError::Config)?,
            consent_url: Some(settings.consent.url.clone()),
            locations: settings.residency.linker_locations.clone(),
            data_dir: settings.data_dir.clone(),
        })
    }
}

/// Reads `DIR/operator.token`, or writes a new one (mode 0600) when there is none. Returns the token
/// and whether it was created. The token itself is never printed or logged.
pub fn ensure_operator_token(data_dir: &Path) -> Result<(Secret, bool), StartError> {
    let path = data_dir.join("operator.token");
    secret_file::read_or_create_token(&path, TokenKind::Operator).map_err(|source| {
        StartError::config(
            format_args!("operator token file {}", path.display()),
            source,
        )
    })
}

/// A bound linker-svc, ready to run.
#[derive(Debug)]
pub struct Linker {
    server: GrpcServer,
    residency: Arc<residency::Residency>,
    /// Stops following consent-svc once the server has stopped.
    background: CancellationToken,
    service_token: Option<Secret>,
    tls: Option<TlsSettings>,
    limits: Limits,
}

fn consent_channel(
    url: &str,
    tls: Option<&TlsSettings>,
    limits: &Limits,
) -> Result<tonic::transport::Channel, StartError> {
    sightline_runtime::client::service_channel(url, tls, limits)
        .map_err(|e| StartError::Config(format!("consent: {e}")))
}

impl Linker {
    pub async fn build(config: LinkerConfig) -> Result<Self, StartError> {
        let store = store::open(config.database_url.expose()).await?;
        let service_tokens: Vec<&str> = config.service_tokens.iter().map(Secret::expose).collect();
        let authority = Arc::new(Authority::new(
            store.clone(),
            config.clock.clone(),
            config.operator_token.expose(),
            &service_tokens,
            &config.limits,
        ));
        let residency = Arc::new(residency::Residency::new(
            store.clone(),
            config.database_url.expose().to_owned(),
            StoreUrls {
                service: "linker",
                locations: config.locations.clone(),
                // A server database holds every location not named; SQLite, a file each.
                shared: (!config.database_url.expose().starts_with("sqlite:"))
                    .then(|| config.database_url.clone()),
                data_dir: config.data_dir.clone(),
                global_keeps_service_file: true,
            },
            config.clock.clone(),
        ));
        residency.open_existing().await?;

        let api = LinkerApi::new(
            store,
            residency.clone(),
            config.clock,
            authority,
            config.txt_resolver,
        );
        let mut server = GrpcServer::bind(
            "linker",
            config.listen,
            config.tls.as_ref(),
            config.limits,
            config.metrics_listen,
        )
        .await?;
        server
            .add_service(LinkerServiceServer::new(api.clone()))
            .await;
        server.add_service(AuditServiceServer::new(api)).await;
        let mut linker = Self {
            server,
            residency,
            background: CancellationToken::new(),
            service_token: config.service_tokens.first().cloned(),
            tls: config.tls,
            limits: config.limits,
        };
        if let Some(url) = &config.consent_url {
            linker.follow_consent(url)?;
        }
        Ok(linker)
    }

    /// Follows consent-svc at `url` from now on (the launcher learns its address after building
    /// linker-svc); without a service token there is nothing to follow with.
    pub fn follow_consent(&mut self, url: &str) -> Result<(), StartError> {
        let channel = consent_channel(url, self.tls.as_ref(), &self.limits)?;
        if let Some(token) = &self.service_token {
            self.residency.follow(
                channel,
                token.clone(),
                std::time::Duration::from_millis(self.limits.policy_lease_ms),
                self.background.clone(),
            );
        }
        Ok(())
    }

    /// Where the org's instance metadata is placed; [`residency::Residency::follow`] starts
    /// following consent-svc later for a linker-svc built without its address (tests do).
    pub fn residency(&self) -> Arc<residency::Residency> {
        self.residency.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.metrics_addr()
    }

    /// Serves until `shutdown`; then stops following consent-svc.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let served = self.server.run_until_stopped(shutdown).await;
        self.background.cancel();
        Ok(served?)
    }
}
