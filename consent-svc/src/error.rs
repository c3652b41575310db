//! consent-svc's error and its one mapping to a gRPC status.

use tonic::Status;

use sightline_runtime::audited::{ChangeLogError, CommitError};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ConsentError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ConsentError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(why) => ConsentError::Aborted(why.to_owned()),
            StoreError::Unavailable(e) => {
                tracing::warn!(error = %e, "storage unavailable");
                ConsentError::Unavailable(
                    "storage unavailable; nothing was changed, retry later".to_owned(),
                )
            }
            StoreError::Database(e) => ConsentError::Internal(e.to_string()),
        }
    }
}

impl From<CommitError> for ConsentError {
    fn from(error: CommitError) -> Self {
        match error {
            CommitError::DeadlineExceeded => ConsentError::DeadlineExceeded(
                "the deadline left no time to record the change; nothing was changed".to_owned(),
            ),
            CommitError::OrgNotFound => ConsentError::NotFound("org"),
            CommitError::Unavailable { message, settling } => {
                tracing::warn!(%message, settling, "audit log unavailable");
                ConsentError::Unavailable(if settling {
                    "the audit log cannot be reached; the change is applied only if its entry was \
                     written, which is settled when the log answers; read before retrying"
                        .to_owned()
                } else {
                    "the audit log cannot be written; nothing was changed, retry later".to_owned()
                })
            }
            CommitError::Superseded => ConsentError::Unavailable(
                "another replica settled the change as not made while its audit entry was on its \
                 way; nothing was changed, try again"
                    .to_owned(),
            ),
            CommitError::Store(ChangeLogError::Unavailable(detail)) => {
                tracing::warn!(%detail, "storage unavailable");
                ConsentError::Unavailable("storage unavailable; retry later".to_owned())
            }
            CommitError::Store(ChangeLogError::Refused(detail)) => ConsentError::Internal(detail),
            CommitError::Store(ChangeLogError::Concurrent(why)) => ConsentError::Aborted(why),
        }
    }
}

impl From<ConsentError> for Status {
    fn from(error: ConsentError) -> Self {
        match error {
            ConsentError::InvalidArgument { field, reason } => {
                Status::invalid_argument(format!("{field}: {reason}"))
            }
            ConsentError::PermissionDenied(why) => Status::permission_denied(why),
            ConsentError::NotFound(what) => Status::not_found(format!("{what} not found")),
            ConsentError::FailedPrecondition(why) => Status::failed_precondition(why),
            ConsentError::Aborted(why) => Status::aborted(why),
            ConsentError::Unavailable(why) => {
                sightline_runtime::ratelimit::retry_after(Status::unavailable(why), 1000)
            }
            ConsentError::DeadlineExceeded(why) => Status::deadline_exceeded(why),
            ConsentError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error; nothing was changed")
            }
        }
    }
}
