//! collector-svc's error below the gRPC layer, and its one mapping to a gRPC status: every variant
//! matched, the log level chosen per variant, retry hints added, internals kept out of the message.

use std::borrow::Cow;
use std::sync::Arc;

use sightline_runtime::ratelimit::retry_after;
use tonic::Status;

use crate::store::StoreError;

/// Cloned when one failed group commit answers every batch in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CollectorError {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// Nothing was stored; retrying after `retry_after_ms` (when known) may work.
    #[error("{message}")]
    Unavailable {
        message: Cow<'static, str>,
        retry_after_ms: Option<u64>,
    },
    /// The writer has stopped: the process is shutting down.
    #[error("the collector is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(Arc<StoreError>),
}

impl CollectorError {
    pub fn unavailable(message: impl Into<Cow<'static, str>>, retry_after_ms: u64) -> Self {
        CollectorError::Unavailable {
            message: message.into(),
            retry_after_ms: Some(retry_after_ms),
        }
    }
}

impl From<StoreError> for CollectorError {
    fn from(error: StoreError) -> Self {
        CollectorError::Store(Arc::new(error))
    }
}

impl From<CollectorError> for Status {
    fn from(error: CollectorError) -> Self {
        match error {
            CollectorError::InvalidArgument(message) => Status::invalid_argument(message),
            CollectorError::Unavailable {
                message,
                retry_after_ms,
            } => {
                tracing::debug!(%message, "unavailable");
                let status = Status::unavailable(message);
                match retry_after_ms {
                    Some(ms) => retry_after(status, ms),
                    None => status,
                }
            }
            CollectorError::ShuttingDown => {
                Status::unavailable("the collector is shutting down; retry against another replica")
            }
            CollectorError::Store(error) => Status::from(&*error),
        }
    }
}

impl From<&StoreError> for Status {
    fn from(error: &StoreError) -> Self {
        match error {
            StoreError::Unavailable(error) => {
                tracing::warn!(%error, "store unavailable");
                retry_after(
                    Status::unavailable("the collector's store is unavailable; retry later"),
                    1_000,
                )
            }
            StoreError::WrongLocation { store, batch } => {
                tracing::debug!(%store, %batch, "batch for another location");
                retry_after(
                    Status::unavailable("the org's data location is changing; retry shortly"),
                    1_000,
                )
            }
            StoreError::Database(_) | StoreError::Corrupt(_) | StoreError::Inconsistent(_) => {
                tracing::error!(%error, "store failed");
                Status::internal("the collector's store failed")
            }
        }
    }
}

/// A store error reaches a client only through [`CollectorError`]'s mapping.
impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        Status::from(&error)
    }
}
