//! consent-svc end to end, wired to a real linker-svc: levels and history, receipts checked by an
//! independent verifier, live policy to many watchers, overrides, residency, isolation, bad input, and
//! what happens when the audit log cannot be written.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use sightline_proto::audit::v1 as audit_pb;
use sightline_proto::common::v1::{Channel, EventKind, Location, SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as pb;
use sightline_tests::consent::{opt_in, policy, settings, stack, update, watch_org};
use sightline_tests::{authed, grpcurl, readme_block, workspace_root};
use sqlx::Connection;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_consent_walkthrough_runs_with_real_grpcurl() {
    let (linker, consent) = stack().await;
    let grpcurl = grpcurl();
    let script = format!(
        "set -euo pipefail\ngrpcurl() {{ command \"{grpcurl}\" \"$@\"; }}\n{}\n",
        readme_block("consent-walkthrough")
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("ADDR", linker.addr.to_string())
        .env("CONSENT", consent.addr.to_string())
        .env("DATA", linker.data_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "walkthrough failed\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].contains("USAGE_LEVEL_DISABLED"),
        "defaults first: {stdout}"
    );
    let history: Vec<&&str> = lines.iter().filter(|l| l.starts_with('v')).collect();
    assert_eq!(history.len(), 3, "{stdout}");
    assert!(
        history[0].starts_with("v3 USAGE_LEVEL_ADVANCED SHARING_LEVEL_EXTENDED"),
        "{stdout}"
    );
    assert!(
        history[2].starts_with("v1 USAGE_LEVEL_BASIC SHARING_LEVEL_BASIC"),
        "{stdout}"
    );
    assert!(
        stdout.contains("{\"valid\":true,\"reason\":null}"),
        "{stdout}"
    );
    let opted_out = lines[lines.len() - 2];
    assert!(
        opted_out.contains("\"usageLevel\":\"USAGE_LEVEL_DISABLED\""),
        "{stdout}"
    );
    assert!(
        opted_out.contains("\"allowedKinds\":null"),
        "nothing may be collected: {stdout}"
    );
    assert!(
        opted_out.contains("\"scope\":\"PURGE_SCOPE_ORG\"")
            && opted_out.contains("\"beforeConsentVersion\":\"4\"")
            && opted_out.contains("EVENT_KIND_PAGE_VIEW"),
        "the opt-out carries a purge: {stdout}"
    );
    let back = lines.last().unwrap();
    assert!(
        back.contains("\"consentVersion\":\"5\"")
            && back.contains("\"purges\":[\"4\"]")
            && back.contains("{\"dataClass\":\"DATA_CLASS_KEY\",\"action\":\"FIELD_ACTION_DROP\"}")
            && back
                .contains("{\"dataClass\":\"DATA_CLASS_EMAIL\",\"action\":\"FIELD_ACTION_DROP\"}"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_new_org_collects_nothing_until_an_admin_opts_in() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let current = consent
        .client()
        .await
        .get_consent(authed(
            &org.admin,
            pb::GetConsentRequest {
                org_id: org.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .consent
        .unwrap();
    assert_eq!(current.version, 0);
    let s = current.settings.unwrap();
    assert_eq!(
        (s.usage_level(), s.sharing_level()),
        (UsageLevel::Disabled, SharingLevel::Basic)
    );
    assert!(!s.contribute_metadata && !s.contribute_in_app_data);
    let p = policy(&consent, &org, "").await;
    assert!(p.allowed_kinds.is_empty());
    assert_eq!(p.consent_version, 0);

    let v1 = opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    assert_eq!(v1.version, 1);
    let p = policy(&consent, &org, "").await;
    assert_eq!(p.consent_version, 1);
    assert_eq!(
        p.allowed_kinds().collect::<Vec<_>>(),
        [
            EventKind::InstanceMetadata,
            EventKind::Metric,
            EventKind::ClientMetric,
            EventKind::AppInventory
        ]
    );
    assert_eq!(p.field_treatment(), pb::FieldTreatment::Basic);

    // Compliance restriction forces contribution off in the policy.
    let restricted = pb::ConsentSettings {
        contribute_metadata: true,
        contribute_in_app_data: true,
        compliance_restricted: true,
        ..settings(UsageLevel::Advanced, SharingLevel::Extended)
    };
    update(&consent, &org, restricted).await.unwrap();
    let p = policy(&consent, &org, "").await;
    assert!(!p.contribute_metadata && !p.contribute_in_app_data);
    assert!(p.allowed_kinds().any(|k| k == EventKind::PageView));
    assert_eq!(p.field_treatment(), pb::FieldTreatment::Extended);

    // Every change is in the org's audit log in linker-svc.
    let events = linker
        .audit()
        .await
        .list_events(authed(
            &org.admin,
            audit_pb::ListEventsRequest {
                org_id: org.id.clone(),
                action_prefix: "consent.".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].service, "consent");
    assert_eq!(events[0].actor, format!("admin:{}", org.admin_id));
    assert_eq!(events[1].attributes["usage_level"], "ADVANCED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_python_verifier_accepts_a_receipt_and_rejects_a_flipped_byte() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let version = opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Basic).await;
    let receipt = version.receipt.unwrap();
    let key = consent
        .client()
        .await
        .get_receipt_key(authed(&org.admin, pb::GetReceiptKeyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (key.algorithm.as_str(), key.public_key.len()),
        ("Ed25519", 32)
    );
    let verifier = workspace_root().join("tests/python/verify_receipt.py");
    let run = |payload: &[u8], signature: &[u8]| {
        let out = Command::new("python3")
            .arg(&verifier)
            .args([
                hex::encode(&key.public_key),
                hex::encode(payload),
                hex::encode(signature),
            ])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, said, err) = run(&receipt.payload, &receipt.signature);
    assert_eq!(code, Some(0), "{said} {err}");
    assert!(
        said.starts_with("VALID") && said.contains("usage ADVANCED"),
        "{said}"
    );
    for i in [0, receipt.payload.len() / 2, receipt.payload.len() - 1] {
        let mut flipped = receipt.payload.clone();
        flipped[i] ^= 0x01;
        let (code, said, _) = run(&flipped, &receipt.signature);
        assert_eq!(code, Some(1), "{said}");
        assert!(said.starts_with("INVALID"), "{said}");
    }
    let mut bad_signature = receipt.signature.clone();
    bad_signature[10] ^= 0x80;
    assert_eq!(run(&receipt.payload, &bad_signature).0, Some(1));

    // The service agrees, and says why a bad one fails.
    let mut client = consent.client().await;
    let check = |r: pb::ConsentReceipt| {
        let mut client = client.clone();
        let token = org.admin.clone();
        async move {
            client
                .verify_receipt(authed(
                    &token,
                    pb::VerifyReceiptRequest { receipt: Some(r) },
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert!(check(receipt.clone()).await.valid);
    let mut flipped = receipt.clone();
    flipped.signature[0] ^= 1;
    let answer = check(flipped).await;
    assert!(!answer.valid);
    assert_eq!(answer.reason, "signature does not verify");
    let mut garbage = receipt.clone();
    garbage.payload = b"not json".to_vec();
    assert_eq!(
        check(garbage).await.reason,
        "payload is not a Sightline consent receipt"
    );
    let missing = client
        .verify_receipt(authed(
            &org.admin,
            pb::VerifyReceiptRequest { receipt: None },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_watchers_all_receive_an_opt_out() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Extended).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", consent.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..100 {
        let mut client = pb::consent_service_client::ConsentServiceClient::new(channel.clone());
        let mut stream = watch_org(&mut client, &org.admin, &org.id).await.unwrap();
        let first = stream.next().await.unwrap().unwrap().policy.unwrap();
        assert_eq!(
            first.usage_level(),
            UsageLevel::Advanced,
            "the current policy comes first"
        );
        streams.push(stream);
    }
    let opted_out = opt_in(&consent, &org, UsageLevel::Disabled, SharingLevel::Basic).await;
    let received = futures::future::join_all(streams.iter_mut().map(|s| async {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("a watcher got nothing")
            .unwrap()
            .unwrap()
    }))
    .await;
    assert_eq!(received.len(), 100);
    for update in received {
        let p = update.policy.unwrap();
        assert_eq!(p.usage_level(), UsageLevel::Disabled);
        assert!(p.allowed_kinds.is_empty());
        assert_eq!(p.consent_version, opted_out.version);
        let purge = p.purge.unwrap();
        assert_eq!(
            (purge.scope(), purge.before_consent_version),
            (pb::PurgeScope::Org, opted_out.version)
        );
        assert_eq!(purge.delete_kinds.len(), 6, "everything collected goes");
    }
}

#[tokio::test]
async fn overrides_only_lower_and_the_effective_policy_is_the_lower_of_both() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Extended).await;
    let linked = linker.link_instance(&org, "ACME-1").await;
    let instance = linked.id.as_str();
    let mut client = consent.client().await;
    let set =
        |usage: UsageLevel, sharing: SharingLevel, clear: bool| pb::SetInstanceOverrideRequest {
            org_id: org.id.clone(),
            instance_id: instance.into(),
            usage_level: usage as i32,
            sharing_level: sharing as i32,
            reason: "noisy node".into(),
            clear,
        };
    let raise = client
        .set_instance_override(authed(
            &org.admin,
            set(UsageLevel::Advanced, SharingLevel::Basic, false),
        ))
        .await
        .unwrap_err();
    assert_eq!(raise.code(), Code::InvalidArgument);
    assert!(
        raise.message().starts_with("usage_level:"),
        "{}",
        raise.message()
    );
    let set_reply = client
        .set_instance_override(authed(
            &org.admin,
            set(UsageLevel::Basic, SharingLevel::Basic, false),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        set_reply.policy.unwrap().sharing_level(),
        SharingLevel::Basic
    );
    assert_eq!(
        policy(&consent, &org, "").await.sharing_level(),
        SharingLevel::Extended,
        "the org keeps its own level"
    );
    // The org lowering below the override wins.
    opt_in(&consent, &org, UsageLevel::Disabled, SharingLevel::Basic).await;
    assert_eq!(
        policy(&consent, &org, instance).await.usage_level(),
        UsageLevel::Disabled
    );
    client
        .set_instance_override(authed(
            &org.admin,
            set(UsageLevel::Unspecified, SharingLevel::Unspecified, true),
        ))
        .await
        .unwrap();
    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Extended).await;
    assert_eq!(
        policy(&consent, &org, instance).await.usage_level(),
        UsageLevel::Advanced,
        "cleared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_is_done_when_every_data_owner_has_reported_its_part() {
    let linker =
        sightline_tests::TestLinker::start(sightline_tests::LinkerOptions::default()).await;
    let consent = sightline_tests::TestConsent::start_with(
        &linker,
        None,
        sightline_runtime::settings::Limits::default(),
        consent_svc::grpc::ApiOptions {
            residency: sightline_runtime::settings::ResidencySettings {
                data_owners: vec!["collector".into(), "insights".into()],
                support_bundle_owners: vec!["insights".into()],
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let org = linker.org("Acme").await;
    let mut client = consent.client().await;
    let service = linker.service.expose();
    let step = |transition: pb::MoveTransition, owner: &str| pb::RequestResidencyMoveRequest {
        org_id: org.id.clone(),
        transition: transition as i32,
        scope: pb::ResidencyScope::Data as i32,
        to_location: Location::Eu as i32,
        owner: owner.into(),
    };
    client
        .request_residency_move(authed(&org.admin, step(pb::MoveTransition::Request, "")))
        .await
        .unwrap();
    let early = client
        .request_residency_move(authed(
            service,
            step(pb::MoveTransition::Complete, "collector"),
        ))
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "not started yet");
    client
        .request_residency_move(authed(
            linker.operator.expose(),
            step(pb::MoveTransition::Start, ""),
        ))
        .await
        .unwrap();
    let moving = policy(&consent, &org, "").await;
    let data_move = moving.data_move.clone().expect("the policy names the move");
    assert_eq!(
        (data_move.from_location(), data_move.to_location()),
        (Location::Global, Location::Eu)
    );
    assert_eq!(data_move.waiting_for, ["collector", "insights"]);

    for (owner, field) in [("", "owner"), ("billing", "owner")] {
        let refused = client
            .request_residency_move(authed(service, step(pb::MoveTransition::Complete, owner)))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{owner:?}");
        assert!(refused.message().contains(field), "{}", refused.message());
    }
    let admin = client
        .request_residency_move(authed(
            &org.admin,
            step(pb::MoveTransition::Complete, "collector"),
        ))
        .await
        .unwrap_err();
    assert_eq!(admin.code(), Code::PermissionDenied);

    // The collector reports (twice: a retry changes nothing); the move waits for insights.
    for _ in 0..2 {
        let part = client
            .request_residency_move(authed(
                service,
                step(pb::MoveTransition::Complete, "collector"),
            ))
            .await
            .unwrap()
            .into_inner()
            .r#move
            .unwrap();
        assert_eq!(part.state(), pb::MoveState::Moving);
        assert_eq!(
            (part.reported_by.as_slice(), part.waiting_for.as_slice()),
            (&["collector".to_owned()][..], &["insights".to_owned()][..])
        );
    }
    let still = policy(&consent, &org, "").await;
    assert!(still.moving && still.retry_after_ms > 0);
    assert_eq!(still.location(), Location::Global);

    // Pollers read GetResidency while the last part is reported: a move is never DONE while the
    // location it changed still reads as the old one (one read, one snapshot).
    let stop = tokio_util::sync::CancellationToken::new();
    let mut pollers = Vec::new();
    for _ in 0..3 {
        let (mut reader, admin, org_id, stop) = (
            consent.client().await,
            org.admin.clone(),
            org.id.clone(),
            stop.clone(),
        );
        pollers.push(tokio::spawn(async move {
            let mut reads = 0u32;
            while !stop.is_cancelled() || reads < 50 {
                let residency = reader
                    .get_residency(authed(
                        &admin,
                        pb::GetResidencyRequest {
                            org_id: org_id.clone(),
                        },
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .residency
                    .unwrap();
                let done = residency.moves.iter().any(|m| {
                    m.scope() == pb::ResidencyScope::Data && m.state() == pb::MoveState::Done
                });
                assert!(
                    !done || residency.location() == Location::Eu,
                    "GetResidency said DONE with the old location: {residency:?}"
                );
                reads += 1;
            }
        }));
    }
    let done = client
        .request_residency_move(authed(
            service,
            step(pb::MoveTransition::Complete, "insights"),
        ))
        .await
        .unwrap()
        .into_inner();
    stop.cancel();
    for poller in pollers {
        poller.await.unwrap();
    }
    let finished = done.r#move.unwrap();
    assert_eq!(finished.state(), pb::MoveState::Done);
    assert_eq!(finished.reported_by, ["collector", "insights"]);
    assert!(finished.waiting_for.is_empty());
    let after = policy(&consent, &org, "").await;
    assert!(!after.moving && after.data_move.is_none());
    assert_eq!(after.location(), Location::Eu);

    let actions: Vec<String> = linker
        .audit_events(&org)
        .await
        .into_iter()
        .map(|e| e.action)
        .collect();
    for action in [
        "residency.move_requested",
        "residency.move_started",
        "residency.move_part_done",
        "residency.move_completed",
    ] {
        assert_eq!(
            actions.iter().filter(|a| *a == action).count(),
            1,
            "{action} in {actions:?}"
        );
    }
}

#[tokio::test]
async fn a_residency_move_runs_requested_moving_done_and_policy_says_unavailable_while_moving() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let mut client = consent.client().await;
    let op = linker.operator.expose();
    let step = |transition: pb::MoveTransition, to: Location| pb::RequestResidencyMoveRequest {
        org_id: org.id.clone(),
        transition: transition as i32,
        scope: pb::ResidencyScope::Data as i32,
        to_location: to as i32,
        owner: String::new(),
    };
    let requested = client
        .request_residency_move(authed(
            &org.admin,
            step(pb::MoveTransition::Request, Location::Eu),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(requested.r#move.unwrap().state(), pb::MoveState::Requested);
    let again = client
        .request_residency_move(authed(
            &org.admin,
            step(pb::MoveTransition::Request, Location::Japan),
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let admin_start = client
        .request_residency_move(authed(
            &org.admin,
            step(pb::MoveTransition::Start, Location::Unspecified),
        ))
        .await
        .unwrap_err();
    assert_eq!(admin_start.code(), Code::PermissionDenied);
    client
        .request_residency_move(authed(
            op,
            step(pb::MoveTransition::Start, Location::Unspecified),
        ))
        .await
        .unwrap();
    let moving = policy(&consent, &org, "").await;
    assert!(moving.moving);
    assert!(moving.retry_after_ms > 0);
    let done = client
        .request_residency_move(authed(
            op,
            step(pb::MoveTransition::Complete, Location::Unspecified),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.r#move.unwrap().state(), pb::MoveState::Done);
    let residency = done.residency.unwrap();
    assert_eq!(
        (residency.location(), residency.support_bundle_location()),
        (Location::Eu, Location::Global)
    );
    let after = policy(&consent, &org, "").await;
    assert!(!after.moving);
    assert_eq!(after.location(), Location::Eu);
    // Support bundles have their own location.
    let bundles = pb::RequestResidencyMoveRequest {
        scope: pb::ResidencyScope::SupportBundles as i32,
        ..step(pb::MoveTransition::Request, Location::Germany)
    };
    client
        .request_residency_move(authed(&org.admin, bundles))
        .await
        .unwrap();
    assert!(
        !policy(&consent, &org, "").await.moving,
        "a bundle move does not stop data calls"
    );
}

#[tokio::test]
async fn tracking_and_retention_have_sane_defaults_and_take_changes() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let mut client = consent.client().await;
    let defaults = client
        .get_tracking_settings(authed(
            &org.admin,
            pb::GetTrackingSettingsRequest {
                org_id: org.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(defaults.enabled_channels.len(), 5);
    assert_eq!(defaults.blocking_time_ms, 1_800_000);
    assert!(defaults.view_counter_enabled);
    let changed = pb::TrackingSettings {
        enabled_channels: vec![Channel::Desktop as i32],
        exclude_anonymous: true,
        excluded_groups: vec!["bots".into()],
        blocking_time_ms: 60_000,
        view_counter_enabled: false,
        global_report_group: "analysts".into(),
    };
    client
        .update_tracking_settings(authed(
            &org.admin,
            pb::UpdateTrackingSettingsRequest {
                org_id: org.id.clone(),
                settings: Some(changed.clone()),
            },
        ))
        .await
        .unwrap();
    assert_eq!(policy(&consent, &org, "").await.tracking.unwrap(), changed);
    let retention = client
        .get_retention(authed(
            &org.admin,
            pb::GetRetentionRequest {
                org_id: org.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .retention
        .unwrap();
    assert_eq!((retention.raw_days, retention.assessment_days), (730, 730));
    let shorter = pb::RetentionSettings {
        raw_days: 90,
        assessment_days: 365,
        aggregate_days: 2_555,
        ..Default::default()
    };
    client
        .update_retention(authed(
            &org.admin,
            pb::UpdateRetentionRequest {
                org_id: org.id.clone(),
                retention: Some(shorter),
            },
        ))
        .await
        .unwrap();
    // Fields left 0 keep their defaults.
    assert_eq!(
        policy(&consent, &org, "").await.retention.unwrap(),
        pb::RetentionSettings {
            score_history_days: 730,
            support_bundle_days: 730,
            event_id_days: 35,
            ..shorter
        }
    );
}

#[tokio::test]
async fn bad_input_names_the_field_and_changes_nothing() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let mut client = consent.client().await;
    let expect = |result: Result<(), tonic::Status>, field: &str| {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{field} not named: {}",
            status.message()
        );
    };
    let with = |s: pb::ConsentSettings| {
        authed(
            &org.admin,
            pb::UpdateConsentRequest {
                org_id: org.id.clone(),
                settings: Some(s),
                reason: String::new(),
                expected_version: 0,
                request_id: String::new(),
            },
        )
    };
    expect(
        client
            .update_consent(with(pb::ConsentSettings {
                usage_level: 7,
                sharing_level: 1,
                ..Default::default()
            }))
            .await
            .map(drop),
        "settings.usage_level",
    );
    expect(
        client
            .update_consent(with(pb::ConsentSettings {
                usage_level: 2,
                sharing_level: 0,
                ..Default::default()
            }))
            .await
            .map(drop),
        "settings.sharing_level",
    );
    expect(
        client
            .update_consent(authed(
                &org.admin,
                pb::UpdateConsentRequest {
                    org_id: org.id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "settings",
    );
    expect(
        client
            .get_consent(authed(
                &org.admin,
                pb::GetConsentRequest {
                    org_id: String::new(),
                },
            ))
            .await
            .map(drop),
        "org_id",
    );
    let raise = pb::SetInstanceOverrideRequest {
        org_id: org.id.clone(),
        instance_id: linker.link_instance(&org, "ACME-1").await.id,
        usage_level: UsageLevel::Basic as i32,
        sharing_level: SharingLevel::Basic as i32,
        ..Default::default()
    };
    expect(
        client
            .set_instance_override(authed(&org.admin, raise))
            .await
            .map(drop),
        "usage_level",
    );
    let tracking = |blocking_time_ms| pb::UpdateTrackingSettingsRequest {
        org_id: org.id.clone(),
        settings: Some(pb::TrackingSettings {
            blocking_time_ms,
            ..Default::default()
        }),
    };
    expect(
        client
            .update_tracking_settings(authed(&org.admin, tracking(86_400_001)))
            .await
            .map(drop),
        "settings.blocking_time_ms",
    );
    let mv = |to_location, transition| pb::RequestResidencyMoveRequest {
        org_id: org.id.clone(),
        transition,
        scope: 0,
        to_location,
        owner: String::new(),
    };
    expect(
        client
            .request_residency_move(authed(&org.admin, mv(99, 1)))
            .await
            .map(drop),
        "to_location",
    );
    expect(
        client
            .request_residency_move(authed(&org.admin, mv(Location::Eu as i32, 0)))
            .await
            .map(drop),
        "transition",
    );
    expect(
        client
            .request_residency_move(authed(&org.admin, mv(Location::Global as i32, 1)))
            .await
            .map(drop),
        "to_location",
    );
    let retention = pb::RetentionSettings {
        raw_days: 730,
        assessment_days: 730,
        aggregate_days: 3_000,
        ..Default::default()
    };
    expect(
        client
            .update_retention(authed(
                &org.admin,
                pb::UpdateRetentionRequest {
                    org_id: org.id.clone(),
                    retention: Some(retention),
                },
            ))
            .await
            .map(drop),
        "retention.aggregate_days",
    );
    expect(
        client
            .list_consent_history(authed(
                &org.admin,
                pb::ListConsentHistoryRequest {
                    org_id: org.id.clone(),
                    page_size: 0,
                    page_token: "x".into(),
                },
            ))
            .await
            .map(drop),
        "page_token",
    );

    let p = policy(&consent, &org, "").await;
    assert_eq!(
        (p.consent_version, p.revision),
        (0, 0),
        "nothing was written"
    );
}

/// Every consent method, called with org A's admin token on org B, answers PERMISSION_DENIED and
/// says nothing of B; B's policy is unchanged.
#[tokio::test]
async fn an_org_admin_can_neither_read_nor_change_another_orgs_governance() {
    let (linker, consent) = stack().await;
    let a = linker.org("Alpha").await;
    let b = linker.org("Bravo").await;
    let b_version = opt_in(&consent, &b, UsageLevel::Advanced, SharingLevel::Extended).await;
    let b_policy = policy(&consent, &b, "").await;
    let mut c = consent.client().await;
    let t = a.admin.clone();
    let b_id = b.id.clone();
    let instance = linker.link_instance(&b, "BRAVO-1").await.id;
    let mut outcomes: Vec<(&str, Result<(), tonic::Status>)> = Vec::new();
    macro_rules! call {
        ($name:literal, $method:ident ($msg:expr)) => {
            outcomes.push(($name, c.$method(authed(&t, $msg)).await.map(drop)));
        };
    }
    call!(
        "GetConsent",
        get_consent(pb::GetConsentRequest {
            org_id: b_id.clone()
        })
    );
    call!(
        "UpdateConsent",
        update_consent(pb::UpdateConsentRequest {
            org_id: b_id.clone(),
            settings: Some(settings(UsageLevel::Disabled, SharingLevel::Basic)),
            ..Default::default()
        })
    );
    call!(
        "ListConsentHistory",
        list_consent_history(pb::ListConsentHistoryRequest {
            org_id: b_id.clone(),
            ..Default::default()
        })
    );
    call!(
        "VerifyReceipt",
        verify_receipt(pb::VerifyReceiptRequest {
            receipt: b_version.receipt.clone()
        })
    );
    call!(
        "GetPolicy",
        get_policy(pb::GetPolicyRequest {
            org_id: b_id.clone(),
            instance_id: String::new()
        })
    );
    call!(
        "SetInstanceOverride",
        set_instance_override(pb::SetInstanceOverrideRequest {
            org_id: b_id.clone(),
            instance_id: instance.clone(),
            usage_level: 1,
            sharing_level: 1,
            ..Default::default()
        })
    );
    call!(
        "GetTrackingSettings",
        get_tracking_settings(pb::GetTrackingSettingsRequest {
            org_id: b_id.clone()
        })
    );
    call!(
        "UpdateTrackingSettings",
        update_tracking_settings(pb::UpdateTrackingSettingsRequest {
            org_id: b_id.clone(),
            settings: Some(pb::TrackingSettings::default())
        })
    );
    call!(
        "GetResidency",
        get_residency(pb::GetResidencyRequest {
            org_id: b_id.clone()
        })
    );
    call!(
        "RequestResidencyMove",
        request_residency_move(pb::RequestResidencyMoveRequest {
            org_id: b_id.clone(),
            transition: 1,
            scope: 1,
            to_location: Location::Eu as i32,
            owner: String::new()
        })
    );
    call!(
        "GetRetention",
        get_retention(pb::GetRetentionRequest {
            org_id: b_id.clone()
        })
    );
    call!(
        "UpdateRetention",
        update_retention(pb::UpdateRetentionRequest {
            org_id: b_id.clone(),
            retention: Some(pb::RetentionSettings {
                raw_days: 1,
                assessment_days: 1,
                aggregate_days: 1,
                ..Default::default()
            })
        })
    );
    let watch = c
        .watch_policy(authed(
            &t,
            pb::WatchPolicyRequest {
                org_id: b_id.clone(),
                instance_id: String::new(),
            },
        ))
        .await
        .map(drop);
    outcomes.push(("WatchPolicy", watch));
    let watch_all = c
        .watch_policy(authed(
            &t,
            pb::WatchPolicyRequest {
                org_id: String::new(),
                instance_id: String::new(),
            },
        ))
        .await
        .map(drop);
    outcomes.push(("WatchPolicy/all orgs", watch_all));
    for (name, outcome) in &outcomes {
        let status = outcome.as_ref().expect_err(name);
        assert_eq!(status.code(), Code::PermissionDenied, "{name}: {status:?}");
        assert!(!status.message().contains(&b.id), "{name} revealed B");
    }
    assert_eq!(outcomes.len(), 14);
    assert_eq!(policy(&consent, &b, "").await, b_policy, "B is unchanged");
    // GetReceiptKey is the one method that is not org-scoped: the key is public.
    assert!(
        c.get_receipt_key(authed(&t, pb::GetReceiptKeyRequest {}))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn with_linker_stopped_update_consent_is_unavailable_and_nothing_changes() {
    let (mut linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    linker.stop().await;
    let failed = update(
        &consent,
        &org,
        settings(UsageLevel::Advanced, SharingLevel::Basic),
    )
    .await
    .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    let mut db = sqlx::SqliteConnection::connect(&consent.database_url)
        .await
        .unwrap();
    let (latest, usage): (i64, String) = sqlx::query_as(
        "SELECT version, usage_level FROM consent_versions ORDER BY version DESC LIMIT 1",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(
        (latest, usage.as_str()),
        (1, "BASIC"),
        "the stored version is unchanged"
    );
}
