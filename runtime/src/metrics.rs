//! Prometheus metrics through the `metrics` facade and `metrics-exporter-prometheus`: one recorder per
//! process (every metric carries a `service` label, so services sharing a process stay apart), served
//! by each service on its own HTTP listener at `GET /metrics`, off the gRPC port.
//!
//! What is measured: calls by service, method and status code, their latency, calls in flight
//! ([`crate::server`]); rate-limit and failed-authentication refusals ([`crate::ratelimit`]); audit
//! appends by outcome ([`crate::audited`]). No label carries a tenant, a token or an address, and
//! method labels come only from the services a server registered, so the series are bounded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const CALLS: &str = "sightline_grpc_server_handled_total";
pub const LATENCY: &str = "sightline_grpc_server_handling_seconds";
pub const IN_FLIGHT: &str = "sightline_grpc_server_in_flight";
pub const REFUSED: &str = "sightline_rate_limited_total";
pub const AUDIT_APPENDS: &str = "sightline_audit_appends_total";
pub const POLICY_LOST: &str = "sightline_policy_stream_lost_total";
pub const POLICY_HELD: &str = "sightline_policy_held";

const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// The process's recorder, installed on first use. None when another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(LATENCY.to_owned()), LATENCY_BUCKETS)
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            // Histograms and summaries are compacted on upkeep; without it they only grow.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok()?;
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    metrics::describe_counter!(
        CALLS,
        "gRPC calls completed, by service, method and status code"
    );
    metrics::describe_histogram!(
        LATENCY,
        metrics::Unit::Seconds,
        "time from a call's arrival to its last byte, by service and method"
    );
    metrics::describe_gauge!(IN_FLIGHT, "gRPC calls being handled, by service");
    metrics::describe_counter!(
        REFUSED,
        "calls refused by a limit, by service and limit (tenant rate, failed authentications)"
    );
    metrics::describe_counter!(
        POLICY_LOST,
        "times an enforcement point lost its policy stream and failed closed, by reason (ended, error, lease)"
    );
    metrics::describe_gauge!(
        POLICY_HELD,
        "1 while an enforcement point holds a current policy snapshot, 0 while it fails closed"
    );
    metrics::describe_counter!(
        AUDIT_APPENDS,
        "audit entries appended to linker-svc by a service, by outcome"
    );
}

/// Serves `GET /metrics` on `addr` until `shutdown`; returns the address it listens on.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let Some(handle) = handle() else {
        return Err(std::io::Error::other(
            "a metrics recorder is installed already",
        ));
    };
    tracing::info!(addr = %local, "metrics listening");
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: http::Request<_>| {
                    let response = if request.uri().path() == "/metrics" {
                        http::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(handle.render())))
                    } else {
                        http::Response::builder()
                            .status(http::StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")))
                    };
                    async move {
                        Ok::<_, Infallible>(
                            response
                                .unwrap_or_else(|_| http::Response::new(Full::new(Bytes::new()))),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}
