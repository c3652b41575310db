//! With `log.otlp_endpoint` set, `sightline up` exports a span per call over OTLP/gRPC: a real
//! collector (opentelemetry-proto's TraceService) receives them, with the method, the org id, and
//! nothing secret.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

use common::{grpcurl, start_up};

#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_exports_a_span_per_call_with_method_and_org_over_otlp_and_nothing_secret() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let serving = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(serving))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });

    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("data");
    let up = tokio::task::spawn_blocking({
        let (data, endpoint) = (data.clone(), endpoint.clone());
        move || {
            start_up(
                &data,
                &[
                    ("SIGHTLINE_LINKER__METRICS_LISTEN", "off"),
                    ("SIGHTLINE_CONSENT__METRICS_LISTEN", "off"),
                    ("SIGHTLINE_COLLECTOR__METRICS_LISTEN", "off"),
                    ("SIGHTLINE_INSIGHTS__METRICS_LISTEN", "off"),
                    ("SIGHTLINE_LOG__OTLP_ENDPOINT", &endpoint),
                ],
            )
        }
    })
    .await
    .unwrap();
    let (linker, consent) = (up.linker.clone(), up.consent.clone());

    let operator = std::fs::read_to_string(data.join("operator.token")).unwrap();
    let operator = operator.trim().to_owned();
    let call = |addr: &str, token: &str, method: &str, body: &str| {
        grpcurl(&[
            "-plaintext",
            "-H",
            &format!("authorization: Bearer {token}"),
            "-d",
            body,
            addr,
            method,
        ])
    };
    let org: serde_json::Value = serde_json::from_str(&call(
        &linker,
        &operator,
        "sightline.linker.v1.LinkerService/CreateOrg",
        r#"{"name":"Acme"}"#,
    ))
    .unwrap();
    let org_id = org["org"]["orgId"].as_str().unwrap().to_owned();
    let admin: serde_json::Value = serde_json::from_str(&call(
        &linker,
        &operator,
        "sightline.linker.v1.LinkerService/CreateAdminToken",
        &format!(r#"{{"org_id":"{org_id}"}}"#),
    ))
    .unwrap();
    let admin = admin["secret"].as_str().unwrap().to_owned();
    call(
        &consent,
        &admin,
        "sightline.consent.v1.ConsentService/UpdateConsent",
        &format!(
            r#"{{"org_id":"{org_id}","settings":{{"usage_level":"USAGE_LEVEL_BASIC","sharing_level":"SHARING_LEVEL_BASIC"}}}}"#
        ),
    );
    // SIGTERM: the exporter flushes what it holds before the process exits.
    Command::new("kill")
        .arg(up.child.id().to_string())
        .status()
        .unwrap();
    let mut child = up.child;
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let spans = collector.0.lock().unwrap().clone();
    let call_span = spans
        .iter()
        .find(|s| attribute(s, "rpc.method").as_deref() == Some("UpdateConsent"))
        .expect("a span for the UpdateConsent call");
    assert_eq!(
        attribute(call_span, "rpc.service").as_deref(),
        Some("sightline.consent.v1.ConsentService")
    );
    let handler = spans
        .iter()
        .find(|s| s.name == "update_consent")
        .expect("the handler's span");
    assert_eq!(
        handler.parent_span_id, call_span.span_id,
        "nested in the call's span"
    );
    assert_eq!(
        attribute(handler, "org_id").as_deref(),
        Some(org_id.as_str())
    );
    // The consent change's own calls to linker-svc are traced too.
    assert!(
        spans
            .iter()
            .any(|s| attribute(s, "rpc.method").as_deref() == Some("AppendEvent"))
    );
    // No secret anywhere in what was exported.
    let exported = format!("{spans:?}");
    for secret in [&operator, &admin] {
        assert!(!exported.contains(secret.as_str()), "a secret was exported");
    }
}
