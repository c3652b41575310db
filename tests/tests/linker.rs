//! linker-svc end to end: real servers on ephemeral ports, real SQLite and PostgreSQL, real clients
//! (tonic and the grpcurl binary).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use sightline_proto::audit::v1 as audit_pb;
use sightline_proto::common::v1::{AppLink, InstanceMetadata};
use sightline_proto::linker::v1 as pb;
use sightline_runtime::settings::Limits;
use sightline_runtime::time::DAY_MS;
use sightline_runtime::token::TokenKind;
use sightline_tests::{
    LinkerOptions, TestLinker, TestOrg as Org, authed, grpcurl, logs, readme_block, stranger,
};
use sqlx::Connection;
use tonic::Code;

fn metadata(server_id: &str) -> InstanceMetadata {
    InstanceMetadata {
        server_id: server_id.into(),
        base_url: format!("https://{}.acme.example", server_id.to_lowercase()),
        product: "jira".into(),
        version: "9.12.4".into(),
        license_sen: format!("SEN-{server_id}"),
        node_count: 2,
        ..Default::default()
    }
}

async fn org(linker: &TestLinker, name: &str) -> Org {
    linker.org(name).await
}

async fn link_key(linker: &TestLinker, org: &Org) -> pb::CreateLinkKeyResponse {
    linker.create_link_key(org).await
}

async fn link(
    linker: &TestLinker,
    key: &str,
    server_id: &str,
) -> Result<pb::LinkInstanceResponse, tonic::Status> {
    linker
        .linker()
        .await
        .link_instance(authed(
            key,
            pb::LinkInstanceRequest {
                metadata: Some(metadata(server_id)),
                app_links: vec![AppLink {
                    url: "https://wiki.acme.example".into(),
                    product_family: "confluence".into(),
                    server_id: "WIKI-1".into(),
                    version: "8.5.1".into(),
                }],
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn audit_count(linker: &TestLinker, org: &Org) -> u64 {
    linker
        .audit()
        .await
        .verify_chain(authed(
            linker.operator.expose(),
            audit_pb::VerifyChainRequest {
                org_id: org.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .entries_checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_runs_with_real_grpcurl() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let grpcurl = grpcurl();
    let script = format!(
        "set -euo pipefail\ngrpcurl() {{ command \"{grpcurl}\" \"$@\"; }}\n{}\nprintf '\\n__SECRETS__ %s %s\\n' \"$KEY\" \"$CRED\"\n",
        readme_block("linker-walkthrough")
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("ADDR", linker.addr.to_string())
        .env("DATA", linker.data_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "walkthrough failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let (shown, secrets) = stdout.rsplit_once("__SECRETS__ ").unwrap();
    let mut secrets = secrets.split_whitespace();
    let (key, credential) = (secrets.next().unwrap(), secrets.next().unwrap());
    assert!(key.starts_with("slk_") && credential.starts_with("slc_"));
    // Nothing the walkthrough printed — link key metadata, validation, the key listing, the audit
    // log — contains a secret.
    for secret in [key, credential] {
        assert!(!shown.contains(secret), "a secret was printed:\n{shown}");
        assert!(!shown.contains(&secret[4..20]));
    }
    assert!(
        shown.contains("\"kind\": \"CREDENTIAL_KIND_INSTANCE\""),
        "{shown}"
    );
    assert!(shown.contains("\"scopes\": ["), "{shown}");
    assert!(
        shown.contains(&format!("\"prefix\": \"{}\"", &key[..8])),
        "{shown}"
    );
    assert!(
        shown.contains("\"oldKeyState\": \"SECRET_STATE_REVOKED\""),
        "{shown}"
    );
    assert!(shown.contains("Code: Unauthenticated"), "{shown}");
    assert!(shown.contains("link key has been revoked"), "{shown}");
    for action in [
        "org.created",
        "admin_token.created",
        "link_key.created",
        "instance.linked",
        "link_key.regenerated",
    ] {
        assert!(shown.contains(action), "audit log lacks {action}:\n{shown}");
    }
    assert!(shown.contains("\"intact\": true"), "{shown}");
    assert!(shown.contains("\"entriesChecked\": \"5\""), "{shown}");
}

#[tokio::test]
async fn a_link_key_works_at_thirty_days_less_a_second_and_not_a_second_after() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let acme = org(&linker, "Acme").await;
    let key = link_key(&linker, &acme).await;
    let created =
        sightline_runtime::time::from_proto(key.key.as_ref().unwrap().created_at.as_ref().unwrap());
    assert_eq!(
        sightline_runtime::time::from_proto(key.key.as_ref().unwrap().expires_at.as_ref().unwrap()),
        created + 30 * DAY_MS
    );

    linker.clock.set_ms(created + 30 * DAY_MS - 1_000);
    let linked = link(&linker, &key.secret, "BX7Q").await.unwrap();
    assert!(linked.credential.starts_with("slc_"));

    linker.clock.set_ms(created + 30 * DAY_MS + 1_000);
    let expired = link(&linker, &key.secret, "C9ZZ").await.unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(
        expired.message().contains("expired"),
        "{}",
        expired.message()
    );

    let keys = linker
        .linker()
        .await
        .list_link_keys(authed(
            &acme.admin,
            pb::ListLinkKeysRequest {
                org_id: acme.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys[0].state(), pb::SecretState::Expired);
}

#[tokio::test]
async fn credentials_validate_until_revoked_or_unlinked() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let acme = org(&linker, "Acme").await;
    let key = link_key(&linker, &acme).await;
    let first = link(&linker, &key.secret, "S1").await.unwrap();
    let second = link(&linker, &key.secret, "S2").await.unwrap();
    let mut client = linker.linker().await;
    let service = linker.service.expose().to_owned();
    let validator = client.clone();
    let validate = |credential: String| {
        let mut client = validator.clone();
        let service = service.clone();
        async move {
            client
                .validate_credential(authed(
                    &service,
                    pb::ValidateCredentialRequest { credential },
                ))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let valid = validate(first.credential.clone()).await.unwrap();
    assert_eq!(valid.kind(), pb::CredentialKind::Instance);
    assert_eq!(valid.org_id, acme.id);
    assert_eq!(
        valid.instance_id,
        first.instance.as_ref().unwrap().instance_id
    );
    assert!(valid.cache_ttl_ms > 0);
    let admin = validate(acme.admin.clone()).await.unwrap();
    assert_eq!(
        (admin.kind(), admin.credential_id.as_str()),
        (pb::CredentialKind::Admin, acme.admin_id.as_str())
    );
    assert_eq!(
        validate(linker.operator.expose().into())
            .await
            .unwrap()
            .kind(),
        pb::CredentialKind::Operator
    );
    assert_eq!(
        validate(key.secret.clone()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        validate(stranger(TokenKind::Instance))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // Only services may ask.
    let denied = client
        .validate_credential(authed(
            &acme.admin,
            pb::ValidateCredentialRequest {
                credential: first.credential.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    client
        .revoke_credential(authed(
            &acme.admin,
            pb::RevokeCredentialRequest {
                org_id: acme.id.clone(),
                credential_id: first.credential_info.unwrap().credential_id,
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        validate(first.credential).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let unlinked = client
        .unlink_instance(authed(
            &acme.admin,
            pb::UnlinkInstanceRequest {
                org_id: acme.id.clone(),
                instance_id: second.instance.unwrap().instance_id,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .instance
        .unwrap();
    assert_eq!(unlinked.state(), pb::InstanceState::Unlinked);
    assert!(
        unlinked
            .credentials
            .iter()
            .all(|c| c.state() == pb::SecretState::Revoked)
    );
    assert_eq!(
        validate(second.credential).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Revoking an admin token locks it out at once.
    client
        .revoke_admin_token(authed(
            linker.operator.expose(),
            pb::RevokeAdminTokenRequest {
                org_id: acme.id.clone(),
                token_id: acme.admin_id.clone(),
            },
        ))
        .await
        .unwrap();
    let locked_out = client
        .list_instances(authed(
            &acme.admin,
            pb::ListInstancesRequest {
                org_id: acme.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(locked_out.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn detection_finds_instances_by_license_domain_and_by_app_links() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let acme = org(&linker, "Acme").await;
    let mut client = linker.linker().await;
    let claim = client
        .claim_domain(authed(
            &acme.admin,
            pb::ClaimDomainRequest {
                org_id: acme.id.clone(),
                domain: "Acme.Example".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(
        (claim.domain.as_str(), claim.state()),
        ("acme.example", pb::DomainState::Pending)
    );
    let unverified = client
        .verify_domain(authed(
            &acme.admin,
            pb::VerifyDomainRequest {
                org_id: acme.id.clone(),
                domain: "acme.example".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(unverified.code(), Code::FailedPrecondition);
    linker
        .txt
        .publish(&claim.txt_record_name, &claim.txt_record_value);
    let verified = client
        .verify_domain(authed(
            &acme.admin,
            pb::VerifyDomainRequest {
                org_id: acme.id.clone(),
                domain: "acme.example".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(verified.state(), pb::DomainState::Verified);

    let license = |sen: &str, domain: &str| pb::LicenseRecord {
        sen: sen.into(),
        product: "jira".into(),
        domain: domain.into(),
    };
    let imported = client
        .import_licenses(authed(
            linker.operator.expose(),
            pb::ImportLicensesRequest {
                licenses: vec![
                    license("SEN-S1", "acme.example"),
                    license("SEN-9", "jira.acme.example"),
                    license("SEN-X", "other.example"),
                ],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imported.inserted, 3);
    let denied = client
        .import_licenses(authed(
            &acme.admin,
            pb::ImportLicensesRequest { licenses: vec![] },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let key = link_key(&linker, &acme).await;
    let linked = link(&linker, &key.secret, "S1").await.unwrap();
    let found = client
        .detect_instances(authed(
            &acme.admin,
            pb::DetectInstancesRequest {
                org_id: acme.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .instances;
    let by_license: Vec<_> = found
        .iter()
        .filter(|d| d.method() == pb::DetectionMethod::LicenseDomain)
        .collect();
    assert_eq!(by_license.len(), 2, "{found:?}");
    assert!(by_license.iter().any(|d| d.sen == "SEN-S1"
        && d.linked
        && d.instance_id == linked.instance.as_ref().unwrap().instance_id));
    assert!(by_license.iter().any(|d| d.sen == "SEN-9" && !d.linked));
    let by_link: Vec<_> = found
        .iter()
        .filter(|d| d.method() == pb::DetectionMethod::AppLink)
        .collect();
    assert_eq!(by_link.len(), 1);
    assert_eq!(by_link[0].app_link.as_ref().unwrap().server_id, "WIKI-1");
    assert!(!by_link[0].linked);
}

/// Every linker and audit method, called with org A's admin token on org B's ids, answers NOT_FOUND
/// or PERMISSION_DENIED, says nothing of B, and changes nothing.
#[tokio::test]
async fn an_org_admin_can_neither_read_nor_change_another_org() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let a = org(&linker, "Alpha").await;
    let b = org(&linker, "Bravo Secret Name").await;
    let b_key = link_key(&linker, &b).await;
    let b_key_id = b_key.key.as_ref().unwrap().key_id.clone();
    let b_linked = link(&linker, &b_key.secret, "BRAVO-1").await.unwrap();
    let b_instance = b_linked.instance.as_ref().unwrap().instance_id.clone();
    let b_credential = b_linked
        .credential_info
        .as_ref()
        .unwrap()
        .credential_id
        .clone();
    let mut linker_client = linker.linker().await;
    let mut audit_client = linker.audit().await;
    linker_client
        .claim_domain(authed(
            &b.admin,
            pb::ClaimDomainRequest {
                org_id: b.id.clone(),
                domain: "bravo.example".into(),
            },
        ))
        .await
        .unwrap();
    let b_audit_before = audit_count(&linker, &b).await;

    let t = a.admin.clone();
    let mut outcomes: Vec<(&str, Result<(), tonic::Status>)> = Vec::new();
    macro_rules! call {
        ($name:literal, $client:ident . $method:ident ($msg:expr)) => {
            outcomes.push(($name, $client.$method(authed(&t, $msg)).await.map(drop)));
        };
    }
    // B's org id.
    call!(
        "CreateAdminToken",
        linker_client.create_admin_token(pb::CreateAdminTokenRequest {
            org_id: b.id.clone(),
            label: "x".into(),
            request_id: String::new(),
        })
    );
    call!(
        "RevokeAdminToken",
        linker_client.revoke_admin_token(pb::RevokeAdminTokenRequest {
            org_id: b.id.clone(),
            token_id: b.admin_id.clone()
        })
    );
    call!(
        "CreateLinkKey",
        linker_client.create_link_key(pb::CreateLinkKeyRequest {
            org_id: b.id.clone(),
            label: String::new(),
            request_id: String::new(),
        })
    );
    call!(
        "RegenerateLinkKey",
        linker_client.regenerate_link_key(pb::RegenerateLinkKeyRequest {
            org_id: b.id.clone(),
            key_id: b_key_id.clone()
        })
    );
    call!(
        "ListLinkKeys",
        linker_client.list_link_keys(pb::ListLinkKeysRequest {
            org_id: b.id.clone(),
            ..Default::default()
        })
    );
    call!(
        "ListAdminTokens",
        linker_client.list_admin_tokens(pb::ListAdminTokensRequest {
            org_id: b.id.clone(),
            ..Default::default()
        })
    );
    call!(
        "ListInstances",
        linker_client.list_instances(pb::ListInstancesRequest {
            org_id: b.id.clone(),
            ..Default::default()
        })
    );
    call!(
        "UnlinkInstance",
        linker_client.unlink_instance(pb::UnlinkInstanceRequest {
            org_id: b.id.clone(),
            instance_id: b_instance.clone()
        })
    );
    call!(
        "RevokeCredential",
        linker_client.revoke_credential(pb::RevokeCredentialRequest {
            org_id: b.id.clone(),
            credential_id: b_credential.clone()
        })
    );
    call!(
        "ClaimDomain",
        linker_client.claim_domain(pb::ClaimDomainRequest {
            org_id: b.id.clone(),
            domain: "alpha.example".into()
        })
    );
    call!(
        "VerifyDomain",
        linker_client.verify_domain(pb::VerifyDomainRequest {
            org_id: b.id.clone(),
            domain: "bravo.example".into()
        })
    );
    call!(
        "DetectInstances",
        linker_client.detect_instances(pb::DetectInstancesRequest {
            org_id: b.id.clone()
        })
    );
    call!(
        "ListEvents",
        audit_client.list_events(audit_pb::ListEventsRequest {
            org_id: b.id.clone(),
            ..Default::default()
        })
    );
    call!(
        "VerifyChain",
        audit_client.verify_chain(audit_pb::VerifyChainRequest {
            org_id: b.id.clone()
        })
    );
    // A's org id with B's object ids.
    call!(
        "RevokeAdminToken/own org",
        linker_client.revoke_admin_token(pb::RevokeAdminTokenRequest {
            org_id: a.id.clone(),
            token_id: b.admin_id.clone()
        })
    );
    call!(
        "RegenerateLinkKey/own org",
        linker_client.regenerate_link_key(pb::RegenerateLinkKeyRequest {
            org_id: a.id.clone(),
            key_id: b_key_id.clone()
        })
    );
    call!(
        "UnlinkInstance/own org",
        linker_client.unlink_instance(pb::UnlinkInstanceRequest {
            org_id: a.id.clone(),
            instance_id: b_instance.clone()
        })
    );
    call!(
        "RevokeCredential/own org",
        linker_client.revoke_credential(pb::RevokeCredentialRequest {
            org_id: a.id.clone(),
            credential_id: b_credential.clone()
        })
    );
    call!(
        "VerifyDomain/own org",
        linker_client.verify_domain(pb::VerifyDomainRequest {
            org_id: a.id.clone(),
            domain: "bravo.example".into()
        })
    );
    // Operator- and service-only methods.
    call!(
        "CreateOrg",
        linker_client.create_org(pb::CreateOrgRequest {
            name: "Mallory".into()
        })
    );
    call!(
        "ListOrgs",
        linker_client.list_orgs(pb::ListOrgsRequest::default())
    );
    call!(
        "ImportLicenses",
        linker_client.import_licenses(pb::ImportLicensesRequest { licenses: vec![] })
    );
    call!(
        "ValidateCredential",
        linker_client.validate_credential(pb::ValidateCredentialRequest {
            credential: b_linked.credential.clone()
        })
    );
    call!(
        "AppendEvent",
        audit_client.append_event(audit_pb::AppendEventRequest {
            org_id: b.id.clone(),
            actor: "x".into(),
            action: "forged.entry".into(),
            ..Default::default()
        })
    );
    // LinkInstance takes a link key, not an admin token.
    call!(
        "LinkInstance",
        linker_client.link_instance(pb::LinkInstanceRequest {
            metadata: Some(metadata("MALLORY")),
            app_links: vec![]
        })
    );

    assert_eq!(outcomes.len(), 25);
    for (name, outcome) in &outcomes {
        let status = outcome.as_ref().expect_err(name);
        assert!(
            matches!(
                status.code(),
                Code::NotFound | Code::PermissionDenied | Code::Unauthenticated
            ),
            "{name}: {status:?}"
        );
        if *name != "LinkInstance" {
            assert_ne!(status.code(), Code::Unauthenticated, "{name}");
        }
        for revealing in [
            b.id.as_str(),
            &b_instance,
            &b_key_id,
            &b_credential,
            "Bravo Secret Name",
            "BRAVO-1",
        ] {
            assert!(
                !status.message().contains(revealing),
                "{name} revealed {revealing}: {}",
                status.message()
            );
        }
    }
    // B is untouched: its log has no new entry, its key still links, its credential still validates.
    assert_eq!(audit_count(&linker, &b).await, b_audit_before);
    assert!(link(&linker, &b_key.secret, "BRAVO-2").await.is_ok());
    let validated = linker_client
        .validate_credential(authed(
            linker.service.expose(),
            pb::ValidateCredentialRequest {
                credential: b_linked.credential,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(validated.org_id, b.id);
}

#[tokio::test]
async fn bad_input_names_the_field_and_writes_nothing() {
    let linker = TestLinker::start(LinkerOptions {
        limits: Limits {
            max_message_bytes: 64 * 1024,
            ..Limits::default()
        },
        ..LinkerOptions::default()
    })
    .await;
    let acme = org(&linker, "Acme").await;
    let key = link_key(&linker, &acme).await;
    let before = audit_count(&linker, &acme).await;
    let mut client = linker.linker().await;
    let op = linker.operator.expose();

    let expect = |result: Result<(), tonic::Status>, code: Code, field: &str| {
        let status = result.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(field),
            "{field} not named in {:?}",
            status.message()
        );
    };
    expect(
        client
            .create_link_key(authed(&acme.admin, pb::CreateLinkKeyRequest::default()))
            .await
            .map(drop),
        Code::InvalidArgument,
        "org_id",
    );
    expect(
        client
            .regenerate_link_key(authed(
                &acme.admin,
                pb::RegenerateLinkKeyRequest {
                    org_id: acme.id.clone(),
                    key_id: "not-a-key-id".into(),
                },
            ))
            .await
            .map(drop),
        Code::InvalidArgument,
        "key_id",
    );
    expect(
        client
            .create_org(authed(op, pb::CreateOrgRequest { name: "   ".into() }))
            .await
            .map(drop),
        Code::InvalidArgument,
        "name",
    );
    // An oversized page is read as the maximum (one paging behaviour in every service).
    let keys = client
        .list_link_keys(authed(
            &acme.admin,
            pb::ListLinkKeysRequest {
                org_id: acme.id.clone(),
                page_size: 5_000,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!keys.keys.is_empty() && keys.keys.len() <= 1_000);
    expect(
        client
            .claim_domain(authed(
                &acme.admin,
                pb::ClaimDomainRequest {
                    org_id: acme.id.clone(),
                    domain: "not a domain".into(),
                },
            ))
            .await
            .map(drop),
        Code::InvalidArgument,
        "domain",
    );
    let mut no_url = metadata("S1");
    no_url.base_url = "jira.acme.example".into();
    expect(
        client
            .link_instance(authed(
                &key.secret,
                pb::LinkInstanceRequest {
                    metadata: Some(no_url),
                    app_links: vec![],
                },
            ))
            .await
            .map(drop),
        Code::InvalidArgument,
        "metadata.base_url",
    );
    expect(
        client
            .link_instance(authed(
                &key.secret,
                pb::LinkInstanceRequest {
                    metadata: None,
                    app_links: vec![],
                },
            ))
            .await
            .map(drop),
        Code::InvalidArgument,
        "metadata",
    );
    // A mistyped key fails its checksum before any lookup.
    let mut typo = key.secret.clone();
    let last = typo.pop().unwrap();
    typo.push(if last == 'a' { 'b' } else { 'a' });
    expect(
        client
            .link_instance(authed(
                &typo,
                pb::LinkInstanceRequest {
                    metadata: Some(metadata("S1")),
                    app_links: vec![],
                },
            ))
            .await
            .map(drop),
        Code::Unauthenticated,
        "checksum",
    );
    expect(
        client
            .create_link_key(authed(
                "not-a-token",
                pb::CreateLinkKeyRequest {
                    org_id: acme.id.clone(),
                    label: String::new(),
                    request_id: String::new(),
                },
            ))
            .await
            .map(drop),
        Code::Unauthenticated,
        "token",
    );
    let no_header = client
        .list_link_keys(tonic::Request::new(pb::ListLinkKeysRequest {
            org_id: acme.id.clone(),
            ..Default::default()
        }))
        .await;
    expect(no_header.map(drop), Code::Unauthenticated, "authorization");
    // An oversized message is refused before it is decoded.
    expect(
        client
            .create_link_key(authed(
                &acme.admin,
                pb::CreateLinkKeyRequest {
                    org_id: acme.id.clone(),
                    label: "x".repeat(100_000),
                    request_id: String::new(),
                },
            ))
            .await
            .map(drop),
        Code::ResourceExhausted,
        "max_message_bytes",
    );
    expect(
        client
            .create_link_key(authed(
                &acme.admin,
                pb::CreateLinkKeyRequest {
                    org_id: acme.id.clone(),
                    label: "x".repeat(300),
                    request_id: String::new(),
                },
            ))
            .await
            .map(drop),
        Code::InvalidArgument,
        "label",
    );

    assert_eq!(
        audit_count(&linker, &acme).await,
        before,
        "nothing was written"
    );
    let keys = client
        .list_link_keys(authed(
            &acme.admin,
            pb::ListLinkKeysRequest {
                org_id: acme.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    let instances = client
        .list_instances(authed(
            &acme.admin,
            pb::ListInstancesRequest {
                org_id: acme.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert!(instances.is_empty());
}

#[tokio::test]
async fn editing_or_removing_an_audit_row_makes_verify_chain_name_it() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let acme = org(&linker, "Acme").await;
    let key = link_key(&linker, &acme).await;
    link(&linker, &key.secret, "S1").await.unwrap();
    let verify = || async {
        linker
            .audit()
            .await
            .verify_chain(authed(
                &acme.admin,
                audit_pb::VerifyChainRequest {
                    org_id: acme.id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    };
    let intact = verify().await;
    assert!(intact.intact);
    assert_eq!(intact.entries_checked, 4);

    let mut db = sqlx::SqliteConnection::connect(&linker.database_url)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_events SET actor = 'operator' WHERE seq = 3")
        .execute(&mut db)
        .await
        .unwrap();
    let edited = verify().await;
    assert!(!edited.intact);
    assert_eq!(
        (edited.first_bad_seq, edited.problem.as_str()),
        (3, "hash mismatch: entry was edited")
    );

    sqlx::query("DELETE FROM audit_events WHERE seq = 3")
        .execute(&mut db)
        .await
        .unwrap();
    let removed = verify().await;
    assert_eq!(
        (removed.first_bad_seq, removed.problem.as_str()),
        (3, "entry missing")
    );

    sqlx::query("DELETE FROM audit_events WHERE seq >= 3")
        .execute(&mut db)
        .await
        .unwrap();
    let truncated = verify().await;
    assert_eq!(
        (truncated.first_bad_seq, truncated.problem.as_str()),
        (3, "entry missing")
    );
}

#[tokio::test]
async fn a_linker_action_whose_audit_entry_cannot_be_written_fails_and_changes_nothing() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let acme = org(&linker, "Acme").await;
    let mut db = sqlx::SqliteConnection::connect(&linker.database_url)
        .await
        .unwrap();
    sqlx::query("CREATE TRIGGER audit_down BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'audit log unavailable'); END")
        .execute(&mut db)
        .await
        .unwrap();
    let mut client = linker.linker().await;
    let failed = client
        .create_link_key(authed(
            &acme.admin,
            pb::CreateLinkKeyRequest {
                org_id: acme.id.clone(),
                label: String::new(),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Internal);
    assert!(failed.message().contains("nothing was changed"));
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM link_keys")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(count, 0);
    sqlx::query("DROP TRIGGER audit_down")
        .execute(&mut db)
        .await
        .unwrap();
    assert!(
        client
            .create_link_key(authed(
                &acme.admin,
                pb::CreateLinkKeyRequest {
                    org_id: acme.id.clone(),
                    label: String::new(),
                    request_id: String::new(),
                }
            ))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn rate_limits_apply_per_tenant() {
    let linker = TestLinker::start(LinkerOptions {
        limits: Limits {
            rate_per_second: 1,
            rate_burst: 6,
            ..Limits::default()
        },
        ..LinkerOptions::default()
    })
    .await;
    // Four operator calls: two orgs, an admin token each.
    let a = org(&linker, "A").await;
    let b = org(&linker, "B").await;
    let mut client = linker.linker().await;
    let list = |o: &Org| {
        authed(
            &o.admin,
            pb::ListLinkKeysRequest {
                org_id: o.id.clone(),
                ..Default::default()
            },
        )
    };
    for _ in 0..6 {
        client.list_link_keys(list(&a)).await.unwrap();
    }
    let limited = client.list_link_keys(list(&a)).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted);
    assert!(limited.metadata().get("retry-after-ms").is_some());
    // Org B has its own bucket, and so has the operator (two calls left of six).
    client.list_link_keys(list(&b)).await.unwrap();
    client
        .list_link_keys(authed(
            linker.operator.expose(),
            pb::ListLinkKeysRequest {
                org_id: a.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
}

async fn issue_every_kind_of_secret(linker: &TestLinker) -> Vec<String> {
    let acme = org(linker, "Acme").await;
    let key = link_key(linker, &acme).await;
    let linked = link(linker, &key.secret, "S1").await.unwrap();
    let mut client = linker.linker().await;
    let regenerated = client
        .regenerate_link_key(authed(
            &acme.admin,
            pb::RegenerateLinkKeyRequest {
                org_id: acme.id.clone(),
                key_id: key.key.unwrap().key_id,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    client
        .validate_credential(authed(
            linker.service.expose(),
            pb::ValidateCredentialRequest {
                credential: linked.credential.clone(),
            },
        ))
        .await
        .unwrap();
    // A wrong secret presented, too: rejected ones must not be logged either.
    let _ = link(linker, &key.secret, "S2").await;
    vec![
        linker.operator.expose().to_owned(),
        linker.service.expose().to_owned(),
        acme.admin,
        key.secret,
        regenerated.secret,
        linked.credential,
    ]
}

fn assert_secrets_absent(haystack: &str, secrets: &[String], what: &str) {
    for secret in secrets {
        assert!(
            !haystack.contains(secret.as_str()),
            "a secret appears in {what}"
        );
        // Nor its random part without the prefix.
        assert!(
            !haystack.contains(&secret[4..36]),
            "a secret's body appears in {what}"
        );
    }
}

#[tokio::test]
async fn no_issued_secret_appears_in_logs_or_stored_rows_on_sqlite() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let secrets = issue_every_kind_of_secret(&linker).await;
    let logs = logs().text();
    assert!(logs.contains("instance linked"), "the log capture is live");
    assert_secrets_absent(&logs, &secrets, "the logs");
    // Every byte SQLite wrote: the database, its WAL and shared memory.
    let mut stored = Vec::new();
    for file in ["linker.db", "linker.db-wal", "linker.db-shm"] {
        if let Ok(bytes) = std::fs::read(linker.data_dir().join(file)) {
            stored.extend_from_slice(&bytes);
        }
    }
    assert!(stored.len() > 10_000);
    let stored = String::from_utf8_lossy(&stored);
    assert!(
        stored.contains("instance.linked"),
        "the scan reads the rows"
    );
    assert_secrets_absent(&stored, &secrets, "the SQLite files");
}

#[tokio::test]
async fn no_issued_secret_appears_in_logs_or_stored_rows_on_postgres() {
    let url = sightline_runtime::testing::fresh_postgres_url()
        .await
        .unwrap();
    let linker = TestLinker::start(LinkerOptions {
        database_url: Some(url.clone()),
        ..LinkerOptions::default()
    })
    .await;
    let secrets = issue_every_kind_of_secret(&linker).await;
    assert_secrets_absent(&logs().text(), &secrets, "the logs");
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar("SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema()")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert!(tables.len() >= 9, "{tables:?}");
    let mut rows = String::new();
    for table in tables {
        let dump: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT row_to_json(t)::text FROM \"{table}\" t"
        )))
        .fetch_all(&mut db)
        .await
        .unwrap();
        rows.push_str(&dump.join("\n"));
    }
    assert!(rows.contains("instance.linked"));
    assert_secrets_absent(&rows, &secrets, "the PostgreSQL rows");
}

#[tokio::test]
async fn a_stopped_server_closes_its_listener() {
    let mut linker = TestLinker::start(LinkerOptions::default()).await;
    let acme = org(&linker, "Acme").await;
    let addr = linker.addr;
    let mut client = linker.linker().await;
    linker.stop().await;
    let after = client
        .list_link_keys(authed(
            &acme.admin,
            pb::ListLinkKeysRequest {
                org_id: acme.id.clone(),
                ..Default::default()
            },
        ))
        .await;
    assert!(after.is_err(), "stopped server still answered");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still open"
    );
}

/// The operator lists every org, page by page; an admin lists its own org's admin tokens, metadata
/// only: the secrets appear nowhere in the answer.
#[tokio::test]
async fn the_operator_lists_orgs_and_an_admin_lists_its_tokens_without_secrets() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let mut made = Vec::new();
    for name in ["Alpha", "Bravo", "Charlie"] {
        made.push(org(&linker, name).await);
    }
    let mut client = linker.linker().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_orgs(authed(
                linker.operator.expose(),
                pb::ListOrgsRequest {
                    page_size: 2,
                    page_token: token.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.orgs.len() <= 2);
        seen.extend(page.orgs.into_iter().map(|o| (o.org_id, o.name)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut want: Vec<(String, String)> = made
        .iter()
        .zip(["Alpha", "Bravo", "Charlie"])
        .map(|(o, n)| (o.id.clone(), n.to_owned()))
        .collect();
    want.sort();
    assert_eq!(seen, want);

    let alpha = &made[0];
    let second = client
        .create_admin_token(authed(
            alpha.admin.as_str(),
            pb::CreateAdminTokenRequest {
                org_id: alpha.id.clone(),
                label: "second".into(),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let listed = client
        .list_admin_tokens(authed(
            alpha.admin.as_str(),
            pb::ListAdminTokensRequest {
                org_id: alpha.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed.tokens.iter().map(|t| t.token_id.as_str()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&alpha.admin_id.as_str()));
    assert!(ids.contains(&second.token.as_ref().unwrap().token_id.as_str()));
    let shown = format!("{listed:?}");
    assert!(!shown.contains(alpha.admin.as_str()));
    assert!(!shown.contains(&second.secret));
    // An admin is not the operator.
    let refused = client
        .list_orgs(authed(alpha.admin.as_str(), pb::ListOrgsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}
