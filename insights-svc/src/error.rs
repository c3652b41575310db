//! insights-svc's error below the gRPC layer, and its one mapping to a gRPC status: every variant
//! matched, the log level chosen per variant, retry hints added, internals kept out of the message.

use sightline_runtime::ratelimit::retry_after;
use tonic::{Code, Status};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum InsightsError {
    /// The request or the upload is malformed; the message names the field or the file.
    #[error("{0}")]
    InvalidArgument(String),
    /// The upload is larger, longer or slower than the limits allow; the message names the limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Our own failure (writing the bundle, a contract that does not load); logged, not shown.
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl InsightsError {
    /// The code a client gets for this error.
    pub fn code(&self) -> Code {
        Status::from(self).code()
    }

    /// The message a client reads for this error.
    pub fn message(&self) -> String {
        Status::from(self).message().to_owned()
    }
}

impl From<InsightsError> for Status {
    fn from(error: InsightsError) -> Self {
        Status::from(&error)
    }
}

impl From<&InsightsError> for Status {
    fn from(error: &InsightsError) -> Self {
        match error {
            InsightsError::InvalidArgument(message) => Status::invalid_argument(message.clone()),
            InsightsError::ResourceExhausted(message) => {
                tracing::debug!(%message, "upload over a limit");
                Status::resource_exhausted(message.clone())
            }
            InsightsError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error; nothing was stored")
            }
            InsightsError::Store(error) => Status::from(error),
        }
    }
}

impl From<&StoreError> for Status {
    fn from(error: &StoreError) -> Self {
        match error {
            StoreError::Unavailable(error) => {
                tracing::warn!(%error, "store unavailable");
                retry_after(
                    Status::unavailable("the insights store is unavailable; retry later"),
                    1_000,
                )
            }
            StoreError::Database(_) | StoreError::Corrupt(_) => {
                tracing::error!(%error, "store failed");
                Status::internal("the insights store failed")
            }
        }
    }
}

/// A store error reaches a client only through [`InsightsError`]'s mapping.
impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        Status::from(&error)
    }
}
