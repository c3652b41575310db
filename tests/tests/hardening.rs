//! Hardening under hostile conditions, against real servers: concurrent writers while the chain is
//! verified, and (with consent-svc) the audit log and the stores agreeing whatever happens to a call.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use sightline_proto::audit::v1 as audit_pb;
use sightline_tests::{LinkerOptions, TestLinker, authed};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_chain_never_reports_tampering_on_an_intact_chain_under_concurrent_writers() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let org = linker.org("Acme").await;
    let service = linker.service.expose().to_owned();
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut audit = linker.audit().await;
        let (org_id, token) = (org.id.clone(), service.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..80 {
                audit
                    .append_event(authed(
                        &token,
                        audit_pb::AppendEventRequest {
                            org_id: org_id.clone(),
                            actor: "service:test".into(),
                            action: "test.written".into(),
                            target: format!("w{w}-{i}"),
                            attributes: HashMap::new(),
                            service: "test".into(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap();
            }
        }));
    }
    let mut audit = linker.audit().await;
    let mut checks = 0;
    let mut false_reports = Vec::new();
    while writers.iter().any(|w| !w.is_finished()) || checks < 40 {
        let verdict = audit
            .verify_chain(authed(
                &org.admin,
                audit_pb::VerifyChainRequest {
                    org_id: org.id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        checks += 1;
        if !verdict.intact {
            false_reports.push(verdict);
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(checks >= 40);
    assert!(
        false_reports.is_empty(),
        "{} of {checks} checks called an intact chain broken: {:?}",
        false_reports.len(),
        false_reports.first()
    );
}
