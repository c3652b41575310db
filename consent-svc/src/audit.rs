//! The audit sink consent-svc writes to: linker-svc's AuditService, called with the service token.

use std::time::Duration;

use async_trait::async_trait;
use sightline_proto::audit::v1::AppendEventRequest;
use sightline_proto::audit::v1::audit_service_client::AuditServiceClient;
use sightline_runtime::Secret;
use sightline_runtime::auth::authorize;
use tonic::Code;
use tonic::transport::Channel;

use crate::store::{AuditEntry, AuditFailure, AuditSink};

#[derive(Debug, Clone)]
pub struct LinkerAudit {
    client: AuditServiceClient<Channel>,
    service_token: Secret,
}

impl LinkerAudit {
    pub fn new(linker: Channel, service_token: Secret) -> Self {
        Self {
            client: AuditServiceClient::new(linker),
            service_token,
        }
    }
}

#[async_trait]
impl AuditSink for LinkerAudit {
    async fn append(&self, entry: &AuditEntry) -> Result<(), AuditFailure> {
        let mut request = tonic::Request::new(AppendEventRequest {
            org_id: entry.org_id.clone(),
            actor: entry.actor.clone(),
            action: entry.action.to_owned(),
            target: entry.target.clone(),
            attributes: entry.attributes.clone().into_iter().collect(),
            service: "consent".to_owned(),
        });
        authorize(&mut request, &self.service_token)
            .map_err(|e| AuditFailure::Unavailable(e.message().to_owned()))?;
        request.set_timeout(Duration::from_secs(5));
        match self.client.clone().append_event(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Err(AuditFailure::OrgNotFound),
            Err(status) => Err(AuditFailure::Unavailable(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
        }
    }
}
