//! linker-svc: Sightline's identity and record keeper. It owns orgs, admin tokens, link keys, instance
//! credentials, domain claims, license records and instance detection (SPEC L1–L5), and each org's
//! append-only, hash-chained audit log that every service writes to (L6).
//!
//! [`Linker::build`] binds the listener; [`Linker::run_until_stopped`] serves until shut down. The
//! `sightline` binary, the stack launcher and the tests all go through these two calls.

pub mod audit;
pub mod detect;
pub mod domain;
pub mod domains;
pub mod error;
pub mod grpc;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use sightline_proto::audit::v1::audit_service_server::AuditServiceServer;
use sightline_proto::linker::v1::linker_service_server::LinkerServiceServer;
use sightline_runtime::secret_file;
use sightline_runtime::server::{GrpcServer, ServerError};
use sightline_runtime::settings::{Limits, TlsSettings};
use sightline_runtime::storage::{self, StorageError};
use sightline_runtime::token::TokenKind;
use sightline_runtime::{Secret, Settings, SharedClock};
use tokio_util::sync::CancellationToken;

use crate::domains::TxtResolver;
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
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("operator token file {path}: {source}")]
    OperatorToken {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

impl LinkerConfig {
    /// The configuration `settings` describe, with the operator token from the data directory.
    pub fn from_settings(settings: &Settings) -> Result<Self, StartError> {
        let (operator_token, _) = ensure_operator_token(&settings.data_dir)?;
        let database_url = settings.linker.database_url.clone().unwrap_or_else(|| {
            Secret::new(storage::default_sqlite_url(&settings.data_dir, "linker"))
        });
        let txt_resolver: Arc<dyn TxtResolver> =
            Arc::new(domains::DnsTxt::from_system().map_err(StartError::Config)?);
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
        })
    }
}

/// Reads `DIR/operator.token`, or writes a new one (mode 0600) when there is none. Returns the token
/// and whether it was created. The token itself is never printed or logged.
pub fn ensure_operator_token(data_dir: &Path) -> Result<(Secret, bool), StartError> {
    let path = data_dir.join("operator.token");
    secret_file::read_or_create_token(&path, TokenKind::Operator).map_err(|source| {
        StartError::OperatorToken {
            path: path.display().to_string(),
            source,
        }
    })
}

/// A bound linker-svc, ready to run.
#[derive(Debug)]
pub struct Linker {
    server: GrpcServer,
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
        let api = LinkerApi::new(store, config.clock, authority, config.txt_resolver);
        let max = config.limits.max_message_bytes;
        let mut server = GrpcServer::bind(
            "linker",
            config.listen,
            config.tls.as_ref(),
            config.limits,
            config.metrics_listen,
        )
        .await?;
        server
            .add_service(
                LinkerServiceServer::new(api.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .await;
        server
            .add_service(
                AuditServiceServer::new(api)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .await;
        Ok(Self { server })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.metrics_addr()
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        Ok(self.server.run_until_stopped(shutdown).await?)
    }
}
