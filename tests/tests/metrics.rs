//! Every service exports Prometheus metrics on its own listener: a real scrape, parsed by an
//! independent parser (Python `prometheus_client`), shows calls by method and status code, latency
//! histograms, calls in flight, refusals and audit appends — and no tenant, token or address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use serde_json::Value;
use sightline_proto::common::v1::{SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as pb;
use sightline_runtime::settings::Limits;
use sightline_tests::consent::{opt_in, stack};
use sightline_tests::{LinkerOptions, TestConsent, TestLinker, authed, workspace_root};

fn scrape(addr: SocketAddr) -> Vec<Value> {
    let out = std::process::Command::new("python3")
        .arg(workspace_root().join("tests/python/scrape_metrics.py"))
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the exposition did not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn value(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .find(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_parses_and_counts_calls_codes_latency_refusals_and_audit_appends() {
    // A small budget of failed authentications, so the flood below surely runs past it.
    let limits = Limits {
        auth_failures_per_second: 1,
        auth_failure_burst: 100,
        ..Limits::default()
    };
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let consent = TestConsent::start(&linker, None, limits).await;
    let org = linker.org("Acme").await;
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    let mut client = consent.client().await;
    let bad = client
        .get_consent(authed(
            &org.admin,
            pb::GetConsentRequest {
                org_id: "not-an-id".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // Unknown tokens, past this address's budget of failed authentications (100 by default).
    for _ in 0..110 {
        let _ = client
            .get_consent(authed(
                &sightline_tests::stranger(sightline_runtime::token::TokenKind::Admin),
                pb::GetConsentRequest {
                    org_id: org.id.clone(),
                },
            ))
            .await
            .unwrap_err();
    }

    let consent_metrics = scrape(consent.metrics.unwrap());
    let calls = "sightline_grpc_server_handled_total";
    let of = |method: &'static str, code: &'static str| {
        [
            ("service", "consent"),
            ("grpc_service", "sightline.consent.v1.ConsentService"),
            ("grpc_method", method),
            ("grpc_code", code),
        ]
    };
    assert_eq!(
        value(&consent_metrics, calls, &of("UpdateConsent", "OK")),
        Some(1.0)
    );
    assert_eq!(
        value(
            &consent_metrics,
            calls,
            &of("GetConsent", "INVALID_ARGUMENT")
        ),
        Some(1.0)
    );
    // Each of the 110 was refused: looked up and unknown, or past the budget without a lookup
    // (the budget refills while they run, so the split varies); every refusal is counted.
    let unknown = value(
        &consent_metrics,
        calls,
        &of("GetConsent", "UNAUTHENTICATED"),
    )
    .unwrap();
    let exhausted = value(
        &consent_metrics,
        calls,
        &of("GetConsent", "RESOURCE_EXHAUSTED"),
    )
    .unwrap();
    assert_eq!(unknown + exhausted, 110.0);
    assert!(
        unknown >= 100.0 && exhausted >= 1.0,
        "{unknown} {exhausted}"
    );
    assert_eq!(
        value(
            &consent_metrics,
            "sightline_rate_limited_total",
            &[("service", "consent"), ("limit", "failed_authentications")]
        ),
        Some(exhausted)
    );
    // A latency histogram with buckets, count and sum.
    let latency = [("service", "consent"), ("grpc_method", "UpdateConsent")];
    assert_eq!(
        value(
            &consent_metrics,
            "sightline_grpc_server_handling_seconds_count",
            &latency
        ),
        Some(1.0)
    );
    assert!(consent_metrics.iter().any(|s| s["name"]
        == "sightline_grpc_server_handling_seconds_bucket"
        && s["labels"]["le"] == "0.005"));
    assert!(
        value(
            &consent_metrics,
            "sightline_grpc_server_in_flight",
            &[("service", "consent")]
        )
        .is_some()
    );
    assert_eq!(
        value(
            &consent_metrics,
            "sightline_audit_appends_total",
            &[("service", "consent"), ("outcome", "appended")]
        ),
        Some(1.0)
    );
    // linker-svc's own listener: the credential checks consent-svc made.
    let linker_metrics = scrape(linker.metrics.unwrap());
    assert!(
        value(
            &linker_metrics,
            calls,
            &[
                ("service", "linker"),
                ("grpc_method", "ValidateCredential"),
                ("grpc_code", "OK")
            ]
        )
        .is_some_and(|n| n >= 1.0)
    );
    // No label names a tenant, a token or an address.
    for sample in consent_metrics.iter().chain(&linker_metrics) {
        let labels = sample["labels"].as_object().unwrap();
        for (key, v) in labels {
            assert!(
                [
                    "service",
                    "grpc_service",
                    "grpc_method",
                    "grpc_code",
                    "le",
                    "limit",
                    "outcome"
                ]
                .contains(&key.as_str()),
                "unexpected label {key}={v} on {}",
                sample["name"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_do_not_mint_new_series() {
    let (_linker, consent) = stack().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", consent.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    for n in 0..20 {
        grpc.ready().await.unwrap();
        let path =
            http::uri::PathAndQuery::try_from(format!("/evil.Service{n}/Method{n}")).unwrap();
        let _ = grpc
            .unary::<_, (), _>(
                tonic::Request::new(()),
                path,
                tonic_prost::ProstCodec::<(), ()>::default(),
            )
            .await;
    }
    let samples = scrape(consent.metrics.unwrap());
    assert!(samples.iter().all(|s| !s.to_string().contains("evil")));
    assert_eq!(
        value(
            &samples,
            "sightline_grpc_server_handled_total",
            &[("grpc_service", "unknown"), ("grpc_code", "UNIMPLEMENTED")]
        ),
        Some(20.0)
    );
}
