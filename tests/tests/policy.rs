//! The policy as enforcement points read it, end to end against real linker-svc and consent-svc:
//! purges that can be acted on literally, field rules for every class, WatchPolicy's snapshot and
//! instance policies, slow watchers, instance credentials reading their own policy, and instance ids
//! checked against linker-svc.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::StreamExt;
use sightline_proto::common::v1::{DataClass, EventKind, FieldAction, SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as pb;
use sightline_proto::consent::v1::consent_service_client::ConsentServiceClient;
use sightline_runtime::settings::Limits;
use sightline_tests::consent::{opt_in, policy, settings, stack, track, update, watch_org};
use sightline_tests::{LinkerOptions, TestConsent, TestLinker, authed};
use tonic::Code;

/// Whether a record stored under `policy` (its consent version and revision) is covered by `purge`
/// read literally.
fn covers(purge: &pb::PurgeInstruction, policy: &pb::Policy) -> bool {
    policy.consent_version < purge.before_consent_version && policy.revision < purge.before_revision
}

async fn set_override(
    consent: &TestConsent,
    token: &str,
    org_id: &str,
    instance_id: &str,
    levels: Option<(UsageLevel, SharingLevel)>,
) -> Result<pb::SetInstanceOverrideResponse, tonic::Status> {
    let (usage, sharing) = levels.unwrap_or((UsageLevel::Unspecified, SharingLevel::Unspecified));
    consent
        .client()
        .await
        .set_instance_override(authed(
            token,
            pb::SetInstanceOverrideRequest {
                org_id: org_id.into(),
                instance_id: instance_id.into(),
                usage_level: usage as i32,
                sharing_level: sharing as i32,
                reason: "test".into(),
                clear: levels.is_none(),
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

fn rule(policy: &pb::Policy, class: DataClass) -> FieldAction {
    policy
        .field_rules
        .iter()
        .find(|r| r.data_class() == class)
        .unwrap_or_else(|| panic!("no rule for {class:?}"))
        .action()
}

#[tokio::test]
async fn the_policy_has_a_rule_for_every_data_class_of_the_contract() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    for (sharing, key_action) in [
        (SharingLevel::Basic, FieldAction::Drop),
        (SharingLevel::Extended, FieldAction::Keep),
    ] {
        update(&consent, &org, settings(UsageLevel::Advanced, sharing))
            .await
            .unwrap();
        let p = policy(&consent, &org, "").await;
        let classes = sightline_proto::classes::all_classes();
        assert_eq!(p.field_rules.len(), classes.len());
        for class in classes {
            assert_ne!(rule(&p, class), FieldAction::Unspecified, "{class:?}");
        }
        // The matrix of SPEC E4.
        assert_eq!(rule(&p, DataClass::Key), key_action);
        assert_eq!(rule(&p, DataClass::Name), key_action);
        assert_eq!(rule(&p, DataClass::TechnicalId), FieldAction::Keep);
        assert_eq!(rule(&p, DataClass::Count), FieldAction::Keep);
        assert_eq!(rule(&p, DataClass::Username), FieldAction::KeyedHash);
        assert_eq!(rule(&p, DataClass::Email), FieldAction::Drop);
        assert_eq!(rule(&p, DataClass::IpAddress), FieldAction::Drop);
        assert_eq!(rule(&p, DataClass::DisplayName), FieldAction::Drop);
        assert_eq!(rule(&p, DataClass::FreeText), FieldAction::Scrub);
        assert_eq!(p.pseudonym_key_version, 1);
    }
    let p = policy(&consent, &org, "").await;
    assert_eq!(rule(&p, DataClass::CustomAppName), FieldAction::Keep);
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    let p = policy(&consent, &org, "").await;
    assert_eq!(rule(&p, DataClass::CustomAppName), FieldAction::KeyedHash);
}

#[tokio::test]
async fn raising_again_after_a_lowering_carries_no_purge_of_what_the_raised_level_collects() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Extended).await;
    let advanced = policy(&consent, &org, "").await;
    assert!(advanced.purges.is_empty(), "raising issues nothing");

    let lowered = opt_in(&consent, &org, UsageLevel::Basic, SharingLevel::Basic).await;
    let basic = policy(&consent, &org, "").await;
    let purge = basic.purge.clone().unwrap();
    assert_eq!(purge.scope(), pb::PurgeScope::Org);
    assert_eq!(
        purge.delete_kinds().collect::<Vec<_>>(),
        [EventKind::FeatureUsage, EventKind::PageView]
    );
    assert_eq!(
        purge.strip_classes().collect::<Vec<_>>(),
        [
            DataClass::Key,
            DataClass::Name,
            DataClass::CustomAppId,
            DataClass::CustomAppName
        ]
    );
    assert_eq!(purge.before_consent_version, lowered.version);
    assert_eq!(purge.before_revision, basic.revision);
    assert!(
        covers(&purge, &advanced),
        "what ADVANCED collected is covered"
    );
    assert!(!covers(&purge, &basic), "what BASIC then collects is not");
    #[allow(deprecated)]
    let old_reading = (purge.max_usage_level, purge.from_consent_version);
    assert_eq!(old_reading, (0, 0), "the misleading fields are never set");

    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Extended).await;
    let again = policy(&consent, &org, "").await;
    assert_eq!(
        again.purges,
        std::slice::from_ref(&purge),
        "kept until replaced, no new one"
    );
    assert!(
        !covers(&purge, &again),
        "read literally, the purge never deletes what ADVANCED collects now"
    );

    // Replayed: an unrelated change carries the same purge with the same id, so an enforcement
    // point that applied it does nothing; the audit log names the id once.
    track(
        &consent,
        &org,
        pb::TrackingSettings {
            enabled_channels: vec![1],
            blocking_time_ms: 1000,
            ..Default::default()
        },
    )
    .await;
    let later = policy(&consent, &org, "").await;
    assert_eq!(later.purge.unwrap().purge_id, purge.purge_id);
    let naming: Vec<_> = linker
        .audit_events(&org)
        .await
        .into_iter()
        .filter(|e| e.attributes.get("purge_id") == Some(&purge.purge_id))
        .collect();
    assert_eq!(naming.len(), 1);
    assert_eq!(naming[0].action, "consent.updated");
}

#[tokio::test]
async fn lowering_an_instance_override_issues_an_instance_scoped_purge() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let low = linker.link_instance(&org, "LOW").await;
    let other = linker.link_instance(&org, "OTHER").await;
    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Extended).await;
    let before = policy(&consent, &org, &low.id).await;
    let reply = set_override(
        &consent,
        &org.admin,
        &org.id,
        &low.id,
        Some((UsageLevel::Basic, SharingLevel::Basic)),
    )
    .await
    .unwrap();
    let effective = reply.policy.unwrap();
    let purge = effective.purge.clone().unwrap();
    assert_eq!(purge.scope(), pb::PurgeScope::Instance);
    assert_eq!(purge.instance_id, low.id);
    assert_eq!(
        purge.delete_kinds().collect::<Vec<_>>(),
        [EventKind::FeatureUsage, EventKind::PageView]
    );
    assert!(purge.strip_classes().any(|c| c == DataClass::Key));
    assert_eq!(purge.before_consent_version, before.consent_version + 1);
    assert!(covers(&purge, &before));
    assert!(!covers(&purge, &effective));
    // The org's policy lists it; another instance's does not.
    assert!(policy(&consent, &org, "").await.purges.contains(&purge));
    assert!(policy(&consent, &org, &other.id).await.purges.is_empty());

    // Clearing the override issues nothing and keeps the purge; what the instance collects after
    // it is not covered.
    let cleared = set_override(&consent, &org.admin, &org.id, &low.id, None)
        .await
        .unwrap()
        .policy
        .unwrap();
    assert_eq!(cleared.usage_level(), UsageLevel::Advanced);
    assert_eq!(cleared.purges, std::slice::from_ref(&purge));
    assert!(!covers(&purge, &cleared));
}

#[tokio::test]
async fn withdrawing_contribution_issues_a_contribution_purge() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let contributing = pb::ConsentSettings {
        contribute_metadata: true,
        contribute_in_app_data: true,
        ..settings(UsageLevel::Advanced, SharingLevel::Basic)
    };
    update(&consent, &org, contributing).await.unwrap();
    let p = policy(&consent, &org, "").await;
    assert_eq!(
        p.contribute_metadata_kinds().collect::<Vec<_>>(),
        [EventKind::InstanceMetadata, EventKind::AppInventory]
    );
    assert_eq!(
        p.contribute_in_app_data_kinds().collect::<Vec<_>>(),
        [
            EventKind::Metric,
            EventKind::ClientMetric,
            EventKind::FeatureUsage
        ]
    );
    update(
        &consent,
        &org,
        pb::ConsentSettings {
            compliance_restricted: true,
            ..contributing
        },
    )
    .await
    .unwrap();
    let p = policy(&consent, &org, "").await;
    assert!(p.contribute_metadata_kinds.is_empty() && p.contribute_in_app_data_kinds.is_empty());
    let purge = p.purge.unwrap();
    assert!(purge.withdraw_contribute_metadata && purge.withdraw_contribute_in_app_data);
    assert!(purge.delete_kinds.is_empty() && purge.strip_classes.is_empty());
}

async fn client_with_small_window(
    consent: &TestConsent,
) -> ConsentServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", consent.addr))
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    ConsentServiceClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_first_gets_the_current_policy_then_instance_policies_with_each_change() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let instance = linker.link_instance(&org, "ACME-1").await;
    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Extended).await;
    let current = policy(&consent, &org, "").await;
    let mut client = consent.client().await;
    let mut org_watch = watch_org(&mut client, &org.admin, &org.id).await.unwrap();
    let first = org_watch.next().await.unwrap().unwrap();
    assert!(first.snapshot_complete);
    assert_eq!(first.policy.unwrap(), current);

    // The instance watches its own policy with its own credential.
    let mut own_watch = client
        .watch_policy(authed(
            &instance.credential,
            pb::WatchPolicyRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner();
    let own_first = own_watch.next().await.unwrap().unwrap();
    assert!(own_first.snapshot_complete);
    assert_eq!(own_first.policy.unwrap().instance_id, instance.id);

    set_override(
        &consent,
        &org.admin,
        &org.id,
        &instance.id,
        Some((UsageLevel::Basic, SharingLevel::Basic)),
    )
    .await
    .unwrap();
    let change = tokio::time::timeout(Duration::from_secs(5), org_watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!change.snapshot_complete);
    assert_eq!(change.instance_ids, std::slice::from_ref(&instance.id));
    assert_eq!(
        change.policy.as_ref().unwrap().usage_level(),
        UsageLevel::Advanced
    );
    let effective = change
        .instance_policies
        .iter()
        .find(|p| p.instance_id == instance.id)
        .expect("the instance's effective policy travels with the change");
    assert_eq!(effective.usage_level(), UsageLevel::Basic);
    assert_eq!(effective, &policy(&consent, &org, &instance.id).await);

    let own = tokio::time::timeout(Duration::from_secs(5), own_watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(own.policy.as_ref().unwrap(), effective);

    // Every org's snapshot for a service watching all orgs, the last one marked.
    let other = linker.org("Other").await;
    opt_in(&consent, &other, UsageLevel::Basic, SharingLevel::Basic).await;
    let mut all = client
        .watch_policy(authed(
            linker.service.expose(),
            pb::WatchPolicyRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut orgs = Vec::new();
    loop {
        let m = all.next().await.unwrap().unwrap();
        let p = m.policy.unwrap();
        if p.org_id == org.id {
            assert_eq!(m.instance_policies.len(), 1, "the override's instance");
        }
        orgs.push(p.org_id);
        if m.snapshot_complete {
            break;
        }
    }
    orgs.sort();
    let mut want = vec![org.id.clone(), other.id.clone()];
    want.sort();
    assert_eq!(orgs, want);
}

#[tokio::test]
async fn an_all_orgs_watch_of_no_orgs_says_its_snapshot_is_complete() {
    let (linker, consent) = stack().await;
    let mut all = consent
        .client()
        .await
        .watch_policy(authed(
            linker.service.expose(),
            pb::WatchPolicyRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner();
    let m = all.next().await.unwrap().unwrap();
    assert!(m.snapshot_complete && m.policy.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_gets_aborted() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let consent = TestConsent::start_with(
        &linker,
        None,
        Limits::default(),
        consent_svc::grpc::ApiOptions {
            watch_buffer: 4,
            ..Default::default()
        },
    )
    .await;
    let org = linker.org("Acme").await;
    let mut slow = watch_org(
        &mut client_with_small_window(&consent).await,
        &org.admin,
        &org.id,
    )
    .await
    .unwrap();
    assert!(slow.next().await.unwrap().unwrap().snapshot_complete);
    // The slow watcher reads nothing while 400 changes are made.
    let mut admin = consent.client().await;
    for i in 0..400u64 {
        // UNAVAILABLE ("nothing was changed") is an honest answer under load: retry it, as a client
        // does; anything else fails the test with the service's warnings.
        let mut attempts = 0;
        loop {
            let outcome = admin
                .update_tracking_settings(authed(
                    &org.admin,
                    pb::UpdateTrackingSettingsRequest {
                        org_id: org.id.clone(),
                        settings: Some(pb::TrackingSettings {
                            enabled_channels: vec![1],
                            blocking_time_ms: i,
                            ..Default::default()
                        }),
                    },
                ))
                .await;
            match outcome {
                Ok(_) => break,
                Err(status) if status.code() == Code::Unavailable && attempts < 5 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => {
                    let logs = sightline_tests::logs().text();
                    let why: Vec<&str> = logs
                        .lines()
                        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                        .collect();
                    panic!(
                        "change {i}: {status:?}\n{}",
                        why[why.len().saturating_sub(15)..].join("\n")
                    )
                }
            }
        }
    }
    let mut delivered = 0;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .expect("the stream neither ended nor sent anything")
        {
            Some(Ok(_)) => delivered += 1,
            Some(Err(status)) => break status,
            None => panic!("the stream ended without ABORTED after {delivered} messages"),
        }
    };
    assert_eq!(end.code(), Code::Aborted, "{end:?}");
    assert!(end.message().contains("resubscribe"), "{}", end.message());
    assert!(delivered < 400, "it fell behind: {delivered}");
    // A fresh subscription starts again from the current policy.
    let mut again = watch_org(&mut consent.client().await, &org.admin, &org.id)
        .await
        .unwrap();
    let snapshot = again.next().await.unwrap().unwrap();
    assert_eq!(
        snapshot.policy.unwrap().tracking.unwrap().blocking_time_ms,
        399
    );
}

#[tokio::test]
async fn an_instance_credential_reads_its_own_policy_and_nothing_else() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let mine = linker.link_instance(&org, "MINE").await;
    let sibling = linker.link_instance(&org, "SIBLING").await;
    let stranger_org = linker.org("Other").await;
    let stranger = linker.link_instance(&stranger_org, "THEIRS").await;
    let mut client = consent.client().await;
    let get = |org_id: &str, instance_id: &str| {
        authed(
            &mine.credential,
            pb::GetPolicyRequest {
                org_id: org_id.into(),
                instance_id: instance_id.into(),
            },
        )
    };
    // Before any opt-in it learns it is DISABLED, so it uploads nothing.
    let own = client
        .get_policy(get("", ""))
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(
        (own.org_id.as_str(), own.instance_id.as_str()),
        (org.id.as_str(), mine.id.as_str())
    );
    assert_eq!(own.usage_level(), UsageLevel::Disabled);
    assert!(own.allowed_kinds.is_empty());
    let named = client
        .get_policy(get(&org.id, &mine.id))
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(named, own);
    for (org_id, instance_id) in [
        (org.id.as_str(), sibling.id.as_str()),
        (stranger_org.id.as_str(), stranger.id.as_str()),
        (stranger_org.id.as_str(), ""),
    ] {
        let refused = client
            .get_policy(get(org_id, instance_id))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{org_id} {instance_id}"
        );
    }
    let watch_other = client
        .watch_policy(authed(
            &mine.credential,
            pb::WatchPolicyRequest {
                org_id: org.id.clone(),
                instance_id: sibling.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(watch_other.code(), Code::PermissionDenied);
    // Nothing else of the org's governance is an instance's to read.
    let consent_read = client
        .get_consent(authed(
            &mine.credential,
            pb::GetConsentRequest {
                org_id: org.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(consent_read.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn instance_ids_of_another_org_or_of_none_are_not_found_and_nothing_is_stored_or_audited() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let theirs_org = linker.org("Other").await;
    let theirs = linker.link_instance(&theirs_org, "THEIRS").await;
    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Extended).await;
    let before = policy(&consent, &org, "").await;
    let audited = linker.audit_events(&org).await.len();
    let nobody = "0190a000-0000-7000-8000-0000000000ee";
    let operator = linker.operator.expose().to_owned();
    let mut client = consent.client().await;
    for token in [org.admin.as_str(), operator.as_str()] {
        for instance_id in [theirs.id.as_str(), nobody] {
            let set = set_override(
                &consent,
                token,
                &org.id,
                instance_id,
                Some((UsageLevel::Basic, SharingLevel::Basic)),
            )
            .await
            .unwrap_err();
            assert_eq!(
                set.code(),
                Code::NotFound,
                "SetInstanceOverride {instance_id}"
            );
            assert!(
                set.message().starts_with("instance_id:"),
                "{}",
                set.message()
            );
            let cleared = set_override(&consent, token, &org.id, instance_id, None)
                .await
                .unwrap_err();
            assert_eq!(cleared.code(), Code::NotFound);
            let get = client
                .get_policy(authed(
                    token,
                    pb::GetPolicyRequest {
                        org_id: org.id.clone(),
                        instance_id: instance_id.into(),
                    },
                ))
                .await
                .unwrap_err();
            assert_eq!(get.code(), Code::NotFound, "GetPolicy {instance_id}");
            let watch = client
                .watch_policy(authed(
                    token,
                    pb::WatchPolicyRequest {
                        org_id: org.id.clone(),
                        instance_id: instance_id.into(),
                    },
                ))
                .await
                .unwrap_err();
            assert_eq!(watch.code(), Code::NotFound, "WatchPolicy {instance_id}");
        }
    }
    let after = policy(&consent, &org, "").await;
    assert_eq!(after, before, "nothing stored");
    assert_eq!(
        linker.audit_events(&org).await.len(),
        audited,
        "nothing audited"
    );

    // An org that does not exist is NOT_FOUND, not a default.
    let get = client
        .get_consent(authed(
            &operator,
            pb::GetConsentRequest {
                org_id: nobody.into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(get.code(), Code::NotFound);
    let get = client
        .get_policy(authed(
            linker.service.expose(),
            pb::GetPolicyRequest {
                org_id: nobody.into(),
                instance_id: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(get.code(), Code::NotFound);
}

#[tokio::test]
async fn moving_is_said_per_scope_so_bundles_are_not_written_to_the_old_location() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let mut client = consent.client().await;
    let step = |token: &str, transition: pb::MoveTransition| {
        authed(
            token,
            pb::RequestResidencyMoveRequest {
                org_id: org.id.clone(),
                transition: transition as i32,
                scope: pb::ResidencyScope::SupportBundles as i32,
                to_location: sightline_proto::common::v1::Location::Eu as i32,
                owner: "insights".into(),
            },
        )
    };
    client
        .request_residency_move(step(&org.admin, pb::MoveTransition::Request))
        .await
        .unwrap();
    client
        .request_residency_move(step(linker.operator.expose(), pb::MoveTransition::Start))
        .await
        .unwrap();
    let p = policy(&consent, &org, "").await;
    assert!(p.support_bundles_moving, "bundle uploads must wait");
    assert!(!p.moving, "the org's collected data is not moving");
    assert_eq!(p.retry_after_ms, 60_000);
    client
        .request_residency_move(step(linker.service.expose(), pb::MoveTransition::Complete))
        .await
        .unwrap();
    let p = policy(&consent, &org, "").await;
    assert!(!p.support_bundles_moving && p.retry_after_ms == 0);
    assert_eq!(
        p.support_bundle_location(),
        sightline_proto::common::v1::Location::Eu
    );
}
