//! linker-svc's error, and its one mapping to a gRPC status. Internals stay out of the message.

use tonic::Status;

use crate::store::{LinkKeyRejection, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum LinkerError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("the deadline left no time to record the change; nothing was changed")]
    DeadlineExceeded,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for LinkerError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(what) => LinkerError::NotFound(what),
            StoreError::AlreadyExists(what) => LinkerError::AlreadyExists(what),
            StoreError::Precondition(why) => LinkerError::FailedPrecondition(why.to_owned()),
            StoreError::LinkKeyRejected(why) => LinkerError::Unauthenticated(match why {
                LinkKeyRejection::Unknown => "unknown link key".to_owned(),
                LinkKeyRejection::Revoked => "link key has been revoked".to_owned(),
                LinkKeyRejection::Expired => "link key has expired; regenerate it".to_owned(),
            }),
            StoreError::DeadlineExceeded => LinkerError::DeadlineExceeded,
            StoreError::Unavailable(e) => LinkerError::Unavailable(e.to_string()),
            StoreError::Database(e) => LinkerError::Internal(e.to_string()),
        }
    }
}

impl From<LinkerError> for Status {
    fn from(error: LinkerError) -> Self {
        match error {
            LinkerError::InvalidArgument { field, reason } => {
                Status::invalid_argument(format!("{field}: {reason}"))
            }
            LinkerError::Unauthenticated(why) => {
                tracing::debug!(reason = %why, "unauthenticated");
                Status::unauthenticated(why)
            }
            LinkerError::PermissionDenied(why) => Status::permission_denied(why),
            LinkerError::NotFound(what) => Status::not_found(format!("{what} not found")),
            LinkerError::AlreadyExists(what) => {
                Status::already_exists(format!("{what} already exists"))
            }
            LinkerError::FailedPrecondition(why) => Status::failed_precondition(why),
            LinkerError::Unavailable(detail) => {
                tracing::warn!(%detail, "storage unavailable");
                Status::unavailable("storage unavailable; nothing was changed, retry later")
            }
            LinkerError::DeadlineExceeded => Status::deadline_exceeded(
                "the deadline left no time to record the change; nothing was changed",
            ),
            LinkerError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error; nothing was changed")
            }
        }
    }
}
