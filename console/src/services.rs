//! The console's clients of the four services. Every call carries the signed-in person's token; the
//! service token is used for one thing only: asking linker-svc whose a pasted token is.

use std::time::Duration;

use sightline_proto::audit::v1::audit_service_client::AuditServiceClient;
use sightline_proto::collector::v1::collector_service_client::CollectorServiceClient;
use sightline_proto::consent::v1::consent_service_client::ConsentServiceClient;
use sightline_proto::insights::v1::insights_service_client::InsightsServiceClient;
use sightline_proto::linker::v1 as linker_pb;
use sightline_proto::linker::v1::linker_service_client::LinkerServiceClient;
use sightline_runtime::Secret;
use sightline_runtime::client::{ChannelError, service_channel};
use tonic::transport::Channel;

use crate::ConsoleConfig;

/// How long the console waits for a service before it shows the service as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub(crate) struct Services {
    pub linker: Channel,
    pub consent: Channel,
    pub collector: Channel,
    pub insights: Channel,
    service_token: Secret,
    max_message_bytes: usize,
}

/// A request carrying `token` as its bearer token, bounded in time.
pub(crate) fn authed<T>(token: &Secret, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    if let Ok(value) = format!("Bearer {}", token.expose()).parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

impl Services {
    pub(crate) fn connect(config: &ConsoleConfig) -> Result<Self, ChannelError> {
        let channel = |url: &str| service_channel(url, config.tls.as_ref(), &config.limits);
        Ok(Self {
            linker: channel(&config.linker_url)?,
            consent: channel(&config.consent_url)?,
            collector: channel(&config.collector_url)?,
            insights: channel(&config.insights_url)?,
            service_token: config.service_token.clone(),
            max_message_bytes: config.limits.max_message_bytes,
        })
    }

    /// Clients of nothing (lazy channels to a closed port), for unit tests of what needs none.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        let channel = || Channel::from_static("http://127.0.0.1:9").connect_lazy();
        Self {
            linker: channel(),
            consent: channel(),
            collector: channel(),
            insights: channel(),
            service_token: Secret::new("sls_test"),
            max_message_bytes: 1 << 20,
        }
    }

    pub(crate) fn linker(&self) -> LinkerServiceClient<Channel> {
        LinkerServiceClient::new(self.linker.clone())
            .max_decoding_message_size(self.max_message_bytes)
    }

    pub(crate) fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.linker.clone())
            .max_decoding_message_size(self.max_message_bytes)
    }

    pub(crate) fn consent(&self) -> ConsentServiceClient<Channel> {
        ConsentServiceClient::new(self.consent.clone())
            .max_decoding_message_size(self.max_message_bytes)
    }

    pub(crate) fn collector(&self) -> CollectorServiceClient<Channel> {
        CollectorServiceClient::new(self.collector.clone())
            .max_decoding_message_size(self.max_message_bytes)
    }

    pub(crate) fn insights(&self) -> InsightsServiceClient<Channel> {
        InsightsServiceClient::new(self.insights.clone())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// Whose `token` is, by linker-svc's answer.
    pub(crate) async fn whose(
        &self,
        token: &Secret,
    ) -> Result<linker_pb::ValidateCredentialResponse, tonic::Status> {
        Ok(self
            .linker()
            .validate_credential(authed(
                &self.service_token,
                linker_pb::ValidateCredentialRequest {
                    credential: token.expose().to_owned(),
                },
            ))
            .await?
            .into_inner())
    }

    /// Each service's gRPC health: (name, "SERVING" or what it answered instead).
    pub(crate) async fn health(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (name, channel) in [
            ("linker-svc", &self.linker),
            ("consent-svc", &self.consent),
            ("collector-svc", &self.collector),
            ("insights-svc", &self.insights),
        ] {
            let answer =
                sightline_runtime::server::serving(channel.clone(), "", Duration::from_secs(3))
                    .await;
            let state = match answer {
                Ok(true) => "SERVING".to_owned(),
                Ok(false) => "NOT_SERVING".to_owned(),
                Err(status) => format!("{:?}", status.code()),
            };
            out.push((name, state));
        }
        out
    }
}
