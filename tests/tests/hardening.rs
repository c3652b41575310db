//! Hardening under hostile conditions, against real servers: concurrent writers while the chain is
//! verified, and (with consent-svc) the audit log and the stores agreeing whatever happens to a call.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sightline_proto::audit::v1 as audit_pb;
use sightline_proto::common::v1::{SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as consent_pb;
use sightline_proto::consent::v1::consent_service_client::ConsentServiceClient;
use sightline_runtime::settings::Limits;
use sightline_tests::consent::{settings, stack};
use sightline_tests::{LinkerOptions, TestConsent, TestLinker, TestOrg, authed};
use tonic::Code;
use tonic::transport::Channel;

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
    let mut checks = 0;
    let mut false_reports = Vec::new();
    while writers.iter().any(|w| !w.is_finished()) || checks < 40 {
        let verdict = linker.verify_chain(&org).await;
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

/// What consent-svc stored and what the org's audit log says about it.
#[derive(Debug)]
struct Ledger {
    /// version → reason.
    stored: BTreeMap<u64, String>,
    /// version → how many `consent.updated` entries name it.
    entries: BTreeMap<u64, u32>,
    chain_intact: bool,
}

async fn ledger(linker: &TestLinker, consent: &mut ConsentClient, org: &TestOrg) -> Ledger {
    ledger_from(&mut linker.audit().await, consent, org).await
}

/// As [`ledger`], reading the audit log through `audit`.
async fn ledger_from(
    audit: &mut sightline_proto::audit::v1::audit_service_client::AuditServiceClient<Channel>,
    consent: &mut ConsentClient,
    org: &TestOrg,
) -> Ledger {
    let mut stored = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let page = consent
            .list_consent_history(authed(
                &org.admin,
                consent_pb::ListConsentHistoryRequest {
                    org_id: org.id.clone(),
                    page_size: 1000,
                    page_token: page_token.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        for v in page.versions {
            stored.insert(v.version, v.reason);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut entries = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let page = audit
            .list_events(authed(
                &org.admin,
                audit_pb::ListEventsRequest {
                    org_id: org.id.clone(),
                    page_size: 1000,
                    page_token: page_token.clone(),
                    action_prefix: "consent.updated".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        for e in page.events {
            let version: u64 = e.attributes["version"].parse().unwrap();
            *entries.entry(version).or_insert(0) += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let chain_intact = audit
        .verify_chain(authed(
            &org.admin,
            audit_pb::VerifyChainRequest {
                org_id: org.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .intact;
    Ledger {
        stored,
        entries,
        chain_intact,
    }
}

/// What writers saw: acknowledged (version, reason) and the reasons of calls answered
/// DEADLINE_EXCEEDED or CANCELLED.
#[derive(Debug, Default)]
struct Seen {
    acked: Vec<(u64, String)>,
    late: Vec<String>,
}

impl Seen {
    /// What writers wrote to org `i` of two: writer w writes to org w % 2 with reasons "w<w>-…".
    fn of_org(&self, i: usize) -> Seen {
        let mine = |reason: &str| {
            reason
                .strip_prefix('w')
                .and_then(|r| r.split('-').next())
                .and_then(|w| w.parse::<usize>().ok())
                .is_some_and(|w| w % 2 == i)
        };
        Seen {
            acked: self
                .acked
                .iter()
                .filter(|(_, r)| mine(r))
                .cloned()
                .collect(),
            late: self.late.clone(),
        }
    }
}

/// Every acknowledged change is stored; every stored change has exactly one entry and every entry a
/// stored change; nothing answered late is stored; the chain is intact.
fn assert_agreement(ledger: &Ledger, seen: &Seen) {
    for (version, reason) in &seen.acked {
        assert_eq!(
            ledger.stored.get(version),
            Some(reason),
            "acknowledged v{version} ({reason}) was lost"
        );
    }
    for version in ledger.stored.keys() {
        assert_eq!(
            ledger.entries.get(version),
            Some(&1),
            "stored v{version} has {:?} audit entries",
            ledger.entries.get(version)
        );
    }
    for version in ledger.entries.keys() {
        assert!(
            ledger.stored.contains_key(version),
            "an audit entry names v{version}, which is not stored"
        );
    }
    let stored_reasons: HashSet<&String> = ledger.stored.values().collect();
    for reason in &seen.late {
        assert!(
            !stored_reasons.contains(reason),
            "{reason} answered late but was stored"
        );
    }
    assert!(ledger.chain_intact, "the audit chain is not intact");
}

type ConsentClient = ConsentServiceClient<Channel>;

/// One UpdateConsent with a unique reason and an optional deadline.
async fn write(
    client: &mut ConsentClient,
    org: &TestOrg,
    reason: &str,
    n: u32,
    timeout: Option<Duration>,
) -> Result<u64, tonic::Status> {
    let (usage, sharing) = if n.is_multiple_of(2) {
        (UsageLevel::Basic, SharingLevel::Basic)
    } else {
        (UsageLevel::Advanced, SharingLevel::Extended)
    };
    let mut request = authed(
        &org.admin,
        consent_pb::UpdateConsentRequest {
            org_id: org.id.clone(),
            settings: Some(settings(usage, sharing)),
            reason: reason.into(),
            expected_version: 0,
            request_id: String::new(),
        },
    );
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    client
        .update_consent(request)
        .await
        .map(|r| r.into_inner().consent.unwrap().version)
}

fn record(seen: &Mutex<Seen>, reason: String, outcome: Result<u64, tonic::Status>) {
    let mut seen = seen.lock().unwrap();
    match outcome {
        Ok(version) => seen.acked.push((version, reason)),
        Err(status) if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) => {
            seen.late.push(reason);
        }
        Err(_) => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_past_the_servers_deadline_answers_deadline_exceeded_and_stores_nothing() {
    // The server's own limit is 2 ms and the client sets none, so every answer is the server's.
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let tight = Limits {
        request_timeout_ms: 2,
        ..Limits::default()
    };
    let consent = TestConsent::start(&linker, None, tight).await;
    let org = linker.org("Acme").await;
    let mut client = consent.client().await;
    let seen = Mutex::new(Seen::default());
    for n in 0..100 {
        let reason = format!("late-{n}");
        let outcome = write(&mut client, &org, &reason, n, None).await;
        let status = outcome.as_ref().unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        record(&seen, reason, outcome);
    }
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.late.len(), 100);
    // Read back through a consent-svc with room to answer, on the same database.
    let roomy = TestConsent::start(
        &linker,
        Some(consent.database_url.clone()),
        Limits::default(),
    )
    .await;
    let mut reader = roomy.client().await;
    let ledger = ledger(&linker, &mut reader, &org).await;
    assert!(
        ledger.stored.is_empty() && ledger.entries.is_empty(),
        "{ledger:?}"
    );
    assert_agreement(&ledger, &seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_with_1_to_2_ms_deadlines_store_nothing_and_a_roomy_one_goes_through() {
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let mut client = consent.client().await;
    let seen = Mutex::new(Seen::default());
    for n in 0..100 {
        let reason = format!("late-{n}");
        let timeout = Duration::from_millis(1 + u64::from(n % 2));
        let outcome = write(&mut client, &org, &reason, n, Some(timeout)).await;
        // tonic's client enforces the deadline itself (CANCELLED "Timeout expired") when it fires
        // before the server's DEADLINE_EXCEEDED arrives; either way the call is late.
        let status = outcome.as_ref().unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
        record(&seen, reason, outcome);
    }
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.late.len(), 100);
    let ledger = ledger(&linker, &mut client, &org).await;
    assert!(
        ledger.stored.is_empty() && ledger.entries.is_empty(),
        "{ledger:?}"
    );
    assert_agreement(&ledger, &seen);
    let version = write(
        &mut client,
        &org,
        "in time",
        0,
        Some(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    assert_eq!(version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_tight_deadlines_and_four_writers_the_log_and_the_store_agree() {
    let (linker, consent) = stack().await;
    let orgs = [linker.org("Alpha").await, linker.org("Bravo").await];
    let seen = Arc::new(Mutex::new(Seen::default()));
    // Rounds until both outcomes were seen (some changes acknowledged, some calls out of time):
    // how many of each one round gives depends on the machine's pace; the verdict does not.
    for round in 0..20u32 {
        let mut writers = Vec::new();
        for w in 0..4u32 {
            let org = orgs[(w % 2) as usize].clone();
            let mut client = consent.client().await;
            let seen = seen.clone();
            writers.push(tokio::spawn(async move {
                for n in 0..60u32 {
                    let reason = format!("w{w}-r{round}-{n}");
                    // Mostly 1–10 ms; every fifth call has time to spare, so changes do happen.
                    let ms = if n % 5 == 0 {
                        2_000
                    } else {
                        rand::random_range(1..=10)
                    };
                    let outcome = write(
                        &mut client,
                        &org,
                        &reason,
                        n,
                        Some(Duration::from_millis(ms)),
                    )
                    .await;
                    record(&seen, reason, outcome);
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        let so_far = seen.lock().unwrap();
        if so_far.acked.len() >= 40 && !so_far.late.is_empty() {
            break;
        }
    }
    let seen = Arc::try_unwrap(seen).unwrap().into_inner().unwrap();
    assert!(seen.acked.len() >= 40, "{} acknowledged", seen.acked.len());
    assert!(!seen.late.is_empty());
    let mut client = consent.client().await;
    for (i, org) in orgs.iter().enumerate() {
        let ledger = ledger(&linker, &mut client, org).await;
        assert_agreement(&ledger, &seen.of_org(i));
    }
}

/// A consent-svc process (the `sightline consent` binary) wired to an in-process linker.
struct ConsentProcess {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl ConsentProcess {
    /// Starts it on `addr` (port 0 the first time: the system picks, and the process says which).
    async fn start(linker: &TestLinker, addr: SocketAddr, database_url: Option<&str>) -> Self {
        let mut env = vec![
            ("SIGHTLINE_CONSENT__LISTEN".to_owned(), addr.to_string()),
            (
                "SIGHTLINE_LINKER__URL".to_owned(),
                format!("http://{}", linker.addr),
            ),
            (
                "SIGHTLINE_CONSENT__METRICS_LISTEN".to_owned(),
                "off".to_owned(),
            ),
        ];
        if let Some(url) = database_url {
            env.push(("SIGHTLINE_CONSENT__DATABASE_URL".to_owned(), url.to_owned()));
        }
        let (child, addr, _) =
            sightline_tests::service_process("consent", linker.data_dir(), &env).await;
        Self { child, addr }
    }

    async fn kill9(&mut self) {
        self.child.kill().await.unwrap();
    }
}

async fn kill_loop_keeps_every_acknowledged_change_and_the_log_in_agreement(
    database_url: Option<String>,
) {
    let linker = TestLinker::start(LinkerOptions {
        quiet: true,
        ..LinkerOptions::default()
    })
    .await;
    let orgs = [linker.org("Alpha").await, linker.org("Bravo").await];
    let unbound: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut process = ConsentProcess::start(&linker, unbound, database_url.as_deref()).await;
    let addr = process.addr;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let org = orgs[(w % 2) as usize].clone();
        let mut client = ConsentServiceClient::new(channel.clone());
        let (seen, stop) = (seen.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.is_cancelled() {
                let reason = format!("w{w}-{n}");
                let outcome =
                    write(&mut client, &org, &reason, n, Some(Duration::from_secs(2))).await;
                if outcome.is_err() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                record(&seen, reason, outcome);
                n += 1;
            }
        }));
    }
    // Twenty kills at least, and on until 20 changes were acknowledged: how many go through
    // between kills depends on the machine's pace, so it is a condition to reach, not a verdict
    // (bounded, so a service that never acknowledges still ends the test).
    let acked = || seen.lock().unwrap().acked.len();
    let mut kills = 0;
    while kills < 20 || (acked() < 20 && kills < 200) {
        tokio::time::sleep(Duration::from_millis(rand::random_range(60..240))).await;
        process.kill9().await;
        process = ConsentProcess::start(&linker, addr, database_url.as_deref()).await;
        kills += 1;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }
    // One more change per org settles whatever the last kill left staged before it is made.
    let mut client = ConsentServiceClient::new(channel.clone());
    for org in &orgs {
        write(&mut client, org, "final", 0, None).await.unwrap();
    }
    let seen = Arc::try_unwrap(seen).unwrap().into_inner().unwrap();
    // Enough changes went through for the check to mean something, even on a loaded machine.
    assert!(seen.acked.len() >= 20, "{} acknowledged", seen.acked.len());
    for (i, org) in orgs.iter().enumerate() {
        let ledger = ledger(&linker, &mut client, org).await;
        assert_agreement(&ledger, &seen.of_org(i));
    }
    drop(process);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loop_on_sqlite_loses_no_acknowledged_change_and_the_log_agrees() {
    kill_loop_keeps_every_acknowledged_change_and_the_log_in_agreement(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loop_on_postgres_loses_no_acknowledged_change_and_the_log_agrees() {
    let url = sightline_runtime::testing::fresh_postgres_url()
        .await
        .unwrap();
    kill_loop_keeps_every_acknowledged_change_and_the_log_in_agreement(Some(url)).await;
}

#[tokio::test]
async fn hostile_input_gets_a_status_naming_the_field_not_an_internal_error() {
    use sightline_proto::linker::v1 as linker_pb;
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let mut linker_client = linker.linker().await;

    // Names that read differently from what they are.
    for name in ["invoice\u{202E}fdp.exe", "ad\u{200B}min", "bell\u{7}"] {
        let refused = linker_client
            .create_org(authed(
                linker.operator.expose(),
                linker_pb::CreateOrgRequest { name: name.into() },
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{name:?}");
        assert!(
            refused.message().starts_with("name:"),
            "{}",
            refused.message()
        );
    }
    let mut consent_client = consent.client().await;
    let mut update = consent_pb::UpdateConsentRequest {
        org_id: org.id.clone(),
        settings: Some(settings(UsageLevel::Basic, SharingLevel::Basic)),
        reason: "looks fine\u{2066}".into(),
        expected_version: 0,
        request_id: String::new(),
    };
    let refused = consent_client
        .update_consent(authed(&org.admin, update.clone()))
        .await
        .unwrap_err();
    assert!(
        refused.message().starts_with("reason:"),
        "{}",
        refused.message()
    );
    update.reason = "fine".into();
    consent_client
        .update_consent(authed(&org.admin, update))
        .await
        .unwrap();

    // A 50,000-character LIKE prefix is refused before it reaches the database.
    let refused = linker
        .audit()
        .await
        .list_events(authed(
            &org.admin,
            audit_pb::ListEventsRequest {
                org_id: org.id.clone(),
                action_prefix: "a%_".repeat(17_000),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("action_prefix:"));

    // A 64 KiB authorization header gets a status on the call, and the connection lives on.
    let huge = "x".repeat(64 * 1024);
    let refused = linker_client
        .create_org(authed(
            &huge,
            linker_pb::CreateOrgRequest { name: "Big".into() },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = consent_client
        .get_consent(authed(
            &huge,
            consent_pb::GetConsentRequest {
                org_id: org.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    linker_client
        .create_org(authed(
            linker.operator.expose(),
            linker_pb::CreateOrgRequest {
                name: "Next".into(),
            },
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_reports_not_serving_while_linker_does_not_answer() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let (mut linker, consent) = stack().await;
    let channel = Channel::from_shared(format!("http://{}", consent.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = |health: &mut HealthClient<Channel>, service: &str| {
        let mut health = health.clone();
        let service = service.to_owned();
        async move {
            health
                .check(HealthCheckRequest { service })
                .await
                .unwrap()
                .into_inner()
                .status()
        }
    };
    let wait_for = |want: ServingStatus| {
        let mut health = health.clone();
        async move {
            for _ in 0..100 {
                if status(&mut health, "sightline.consent.v1.ConsentService").await == want
                    && status(&mut health, "").await == want
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("consent-svc never reported {want:?}");
        }
    };
    wait_for(ServingStatus::Serving).await;
    linker.stop().await;
    wait_for(ServingStatus::NotServing).await;
    assert_eq!(
        status(&mut health, "sightline.consent.v1.ConsentService").await,
        ServingStatus::NotServing
    );
}

/// A consent client whose connections come from `local` (loopback has all of 127.0.0.0/8).
async fn consent_from(consent: &TestConsent, local: &str) -> ConsentClient {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", consent.addr))
        .unwrap()
        .local_address(Some(local.parse().unwrap()))
        .connect()
        .await
        .unwrap();
    ConsentServiceClient::new(channel)
}

fn tracking_write(
    org: &TestOrg,
    n: u64,
) -> tonic::Request<consent_pb::UpdateTrackingSettingsRequest> {
    authed(
        &org.admin,
        consent_pb::UpdateTrackingSettingsRequest {
            org_id: org.id.clone(),
            settings: Some(consent_pb::TrackingSettings {
                enabled_channels: vec![1],
                blocking_time_ms: n,
                ..Default::default()
            }),
        },
    )
}

/// Three writers for `org` at 40 calls per second each: three times a 40-per-second limit.
async fn over_its_limit(
    consent: &TestConsent,
    org: &TestOrg,
    stop: &tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut writers = Vec::new();
    for _ in 0..3 {
        let (mut client, org, stop) = (consent.client().await, org.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            let mut n = 0;
            while !stop.is_cancelled() {
                tick.tick().await;
                let _ = client
                    .update_tracking_settings(tracking_write(&org, n))
                    .await;
                n += 1;
            }
        }));
    }
    writers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tenant_over_its_limit_and_a_flood_of_unknown_tokens_leave_another_tenant_whole() {
    use sightline_runtime::token::TokenKind;
    let limits = Limits {
        rate_per_second: 40,
        rate_burst: 40,
        ..Limits::default()
    };
    let linker = TestLinker::start(LinkerOptions {
        limits,
        ..LinkerOptions::default()
    })
    .await;
    let consent = TestConsent::start(&linker, None, limits).await;
    let (a, b) = (linker.org("Alpha").await, linker.org("Bravo").await);
    let stop = tokio_util::sync::CancellationToken::new();
    let mut noise = Vec::new();
    // Tenant A writes at three times its limit.
    noise.extend(over_its_limit(&consent, &a, &stop).await);
    // A flood of well-formed tokens nobody issued, from another address, as fast as it goes.
    for _ in 0..4 {
        let mut client = consent_from(&consent, "127.0.0.2").await;
        let mut audit = sightline_proto::audit::v1::audit_service_client::AuditServiceClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{}", linker.addr))
                .unwrap()
                .local_address(Some("127.0.0.2".parse().unwrap()))
                .connect()
                .await
                .unwrap(),
        );
        let (b_id, stop) = (b.id.clone(), stop.clone());
        noise.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let token = sightline_tests::stranger(TokenKind::Admin);
                let _ = client
                    .get_consent(authed(
                        &token,
                        consent_pb::GetConsentRequest {
                            org_id: b_id.clone(),
                        },
                    ))
                    .await;
                let _ = audit
                    .list_events(authed(
                        &token,
                        audit_pb::ListEventsRequest {
                            org_id: b_id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await;
            }
        }));
    }
    // Tenant B, within its limit: reads and writes, to consent-svc and linker-svc.
    let mut client = consent.client().await;
    let mut audit = linker.audit().await;
    let (mut ok, mut failed) = (0u32, Vec::new());
    let mut tick = tokio::time::interval(Duration::from_millis(40));
    for n in 0..150u64 {
        tick.tick().await;
        let outcome = match n % 3 {
            0 => client
                .update_tracking_settings(tracking_write(&b, n))
                .await
                .map(drop),
            1 => client
                .get_consent(authed(
                    &b.admin,
                    consent_pb::GetConsentRequest {
                        org_id: b.id.clone(),
                    },
                ))
                .await
                .map(drop),
            _ => audit
                .list_events(authed(
                    &b.admin,
                    audit_pb::ListEventsRequest {
                        org_id: b.id.clone(),
                        page_size: 1,
                        ..Default::default()
                    },
                ))
                .await
                .map(drop),
        };
        match outcome {
            Ok(()) => ok += 1,
            Err(status) => failed.push(status),
        }
    }
    stop.cancel();
    for task in noise {
        task.await.unwrap();
    }
    let rate = f64::from(ok) / 150.0;
    assert!(
        rate >= 0.99,
        "tenant B got {ok}/150 through; first failure: {:?}",
        failed.first()
    );
}

/// Fair under floods, whatever the address (issue 18): tenant A writes at three times its limit
/// while unknown tokens flood consent-svc, collector-svc and insights-svc from tenant B's own
/// address (a NAT, a proxy, one host). The failure budget is charged to the address that presented
/// the bad tokens, at the edge where they arrived — never to a service's own address at linker-svc —
/// and a token found valid is looked up whatever its address did, so B's reads, writes (audited
/// through linker-svc), ingests and insights reads all get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_tokens_from_a_tenants_own_address_leave_that_tenant_whole_at_every_service() {
    use sightline_proto::collector::v1 as collector_pb;
    use sightline_proto::insights::v1 as insights_pb;
    use sightline_runtime::token::TokenKind;
    use sightline_tests::collector::{ingest, metric};
    use sightline_tests::{CollectorOptions, InsightsOptions, T0_MS, TestInsights};
    let limits = Limits {
        rate_per_second: 40,
        rate_burst: 40,
        ..Limits::default()
    };
    let linker = TestLinker::start(LinkerOptions {
        limits,
        quiet: true,
        ..LinkerOptions::default()
    })
    .await;
    let consent = TestConsent::start(&linker, None, limits).await;
    let collector = sightline_tests::TestCollector::start(
        &linker,
        &consent,
        CollectorOptions {
            limits,
            ..CollectorOptions::default()
        },
    )
    .await;
    let insights = TestInsights::start(
        &linker,
        &consent,
        &collector,
        InsightsOptions {
            limits,
            ..InsightsOptions::default()
        },
    )
    .await;
    let (a, b) = (linker.org("Alpha").await, linker.org("Bravo").await);
    let instance = linker.link_instance(&b, "BRAVO-1").await;
    sightline_tests::collector::opt_in_enforced(&consent, &collector, &b, &instance).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut noise = Vec::new();
    // Tenant A writes at three times its limit.
    noise.extend(over_its_limit(&consent, &a, &stop).await);
    // Unknown tokens from B's own address (127.0.0.1), to the three services, as fast as they go.
    for _ in 0..3 {
        let mut to_consent = consent.client().await;
        let mut to_collector = collector.client().await;
        let mut to_insights = insights.client().await;
        let (b_id, stop) = (b.id.clone(), stop.clone());
        noise.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let token = sightline_tests::stranger(TokenKind::Admin);
                let _ = to_consent
                    .get_consent(authed(
                        &token,
                        consent_pb::GetConsentRequest {
                            org_id: b_id.clone(),
                        },
                    ))
                    .await;
                let instance_token = sightline_tests::stranger(TokenKind::Instance);
                let _ = to_collector
                    .ingest(authed(
                        &instance_token,
                        collector_pb::IngestRequest {
                            events: vec![metric("x", T0_MS, "x", 1.0)],
                        },
                    ))
                    .await;
                let _ = to_insights
                    .get_health(authed(
                        &token,
                        insights_pb::GetHealthRequest {
                            org_id: b_id.clone(),
                            instance_id: String::new(),
                        },
                    ))
                    .await;
            }
        }));
    }
    // Tenant B, within its limit: consent reads and writes, ingest, insights reads.
    let mut client = consent.client().await;
    let mut health = insights.client().await;
    let (mut ok, mut failed) = (0u32, Vec::new());
    let mut tick = tokio::time::interval(Duration::from_millis(40));
    for n in 0..200u64 {
        tick.tick().await;
        let outcome = match n % 4 {
            0 => client
                .update_tracking_settings(tracking_write(&b, n))
                .await
                .map(drop),
            1 => client
                .get_consent(authed(
                    &b.admin,
                    consent_pb::GetConsentRequest {
                        org_id: b.id.clone(),
                    },
                ))
                .await
                .map(drop),
            2 => ingest(
                &collector,
                &instance,
                vec![metric(&format!("b{n}"), T0_MS, "bravo", 1.0)],
            )
            .await
            .map(drop),
            _ => health
                .get_health(authed(
                    &b.admin,
                    insights_pb::GetHealthRequest {
                        org_id: b.id.clone(),
                        instance_id: instance.id.clone(),
                    },
                ))
                .await
                .map(drop),
        };
        match outcome {
            Ok(()) => ok += 1,
            Err(status) => failed.push((n % 4, status.code(), status.message().to_owned())),
        }
    }
    stop.cancel();
    for task in noise {
        task.await.unwrap();
    }
    let rate = f64::from(ok) / 200.0;
    assert!(
        rate >= 0.99,
        "tenant B got {ok}/200 through; failures (call, code, message): {failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linker_writes_past_their_deadline_answer_deadline_exceeded_and_store_nothing() {
    use sightline_proto::linker::v1 as linker_pb;
    let roomy = TestLinker::start(LinkerOptions::default()).await;
    let org = roomy.org("Acme").await;
    let count_keys = || async { roomy.link_keys(&org).await.len() };
    let audited = || async { roomy.verify_chain(&org).await.entries_checked };
    let (keys_before, entries_before) = (count_keys().await, audited().await);
    // 1–2 ms deadlines from the client (tonic answers CANCELLED locally when its own timer fires
    // first; the server answers DEADLINE_EXCEEDED): none of these may be stored.
    let mut client = roomy.linker().await;
    for n in 0..100u64 {
        let mut request = authed(
            &org.admin,
            linker_pb::CreateLinkKeyRequest {
                org_id: org.id.clone(),
                label: format!("late-{n}"),
                request_id: String::new(),
            },
        );
        request.set_timeout(Duration::from_millis(1 + n % 2));
        let status = client.create_link_key(request).await.unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
    }
    // Give any commit that was under way time to land, then count.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count_keys().await,
        keys_before,
        "a late CreateLinkKey was stored"
    );
    assert_eq!(audited().await, entries_before, "a late change was audited");
    // With time to spare it goes through.
    let mut request = authed(
        &org.admin,
        linker_pb::CreateLinkKeyRequest {
            org_id: org.id.clone(),
            label: "in time".into(),
            request_id: String::new(),
        },
    );
    request.set_timeout(Duration::from_secs(5));
    client.create_link_key(request).await.unwrap();
    assert_eq!(count_keys().await, keys_before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_write_with_its_request_id_returns_the_first_answer_and_stores_once() {
    use sightline_proto::linker::v1 as linker_pb;
    let (linker, consent) = stack().await;
    let org = linker.org("Acme").await;
    let id = "Jx8nQe2v_T0aPZk3LmR7wA-retry1";
    let create = |request_id: &str| {
        authed(
            &org.admin,
            linker_pb::CreateLinkKeyRequest {
                org_id: org.id.clone(),
                label: "companion".into(),
                request_id: request_id.into(),
            },
        )
    };
    // Concurrent retries of one request: one key, one answer.
    let mut answers = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = linker.linker().await;
        let request = create(id);
        tasks.push(tokio::spawn(async move {
            client.create_link_key(request).await.unwrap().into_inner()
        }));
    }
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let first = answers[0].clone();
    assert!(
        answers.iter().all(|a| a == &first),
        "one answer for every retry"
    );
    let again = linker
        .linker()
        .await
        .create_link_key(create(id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    let other = linker
        .linker()
        .await
        .create_link_key(create("Jx8nQe2v_T0aPZk3LmR7wA-retry2"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.secret, first.secret);
    let keys = linker.link_keys(&org).await;
    assert_eq!(keys.len(), 2, "nothing stored twice");
    let bad = linker
        .linker()
        .await
        .create_link_key(create("short"))
        .await
        .unwrap_err();
    assert!(
        bad.message().starts_with("request_id:"),
        "{}",
        bad.message()
    );
    // The kept answer reveals neither the secret nor the request id.
    drop(linker.linker().await);
    let stored = std::fs::read(linker.sqlite_path()).unwrap();
    let wal = std::fs::read(linker.sqlite_path().with_extension("db-wal")).unwrap_or_default();
    for bytes in [&stored, &wal] {
        for needle in [first.secret.as_bytes(), id.as_bytes()] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} found in the database",
                String::from_utf8_lossy(needle)
            );
        }
    }

    // UpdateConsent: a retry gets the first version; the same id with other settings is refused.
    let mut client = consent.client().await;
    let update = |usage: UsageLevel| {
        authed(
            &org.admin,
            consent_pb::UpdateConsentRequest {
                org_id: org.id.clone(),
                settings: Some(settings(usage, SharingLevel::Basic)),
                reason: "rollout".into(),
                expected_version: 0,
                request_id: "consent-Jx8nQe2v_T0aPZk3LmR7wA".into(),
            },
        )
    };
    let v1 = client
        .update_consent(update(UsageLevel::Basic))
        .await
        .unwrap()
        .into_inner()
        .consent
        .unwrap();
    let retried = client
        .update_consent(update(UsageLevel::Basic))
        .await
        .unwrap()
        .into_inner()
        .consent
        .unwrap();
    assert_eq!(retried, v1);
    let reused = client
        .update_consent(update(UsageLevel::Advanced))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);
    assert!(reused.message().starts_with("request_id:"));
    let ledger = ledger(&linker, &mut client, &org).await;
    assert_eq!(ledger.stored.len(), 1, "one version");
    assert_eq!(ledger.entries.get(&1), Some(&1), "one audit entry");
}

#[tokio::test]
async fn a_reply_over_the_size_limit_answers_resource_exhausted() {
    let linker = TestLinker::start(LinkerOptions::default()).await;
    let small = Limits {
        max_message_bytes: 4_096,
        ..Limits::default()
    };
    let consent = TestConsent::start(&linker, None, small).await;
    let org = linker.org("Acme").await;
    for n in 0..20u32 {
        let usage = if n.is_multiple_of(2) {
            UsageLevel::Basic
        } else {
            UsageLevel::Advanced
        };
        sightline_tests::consent::opt_in(&consent, &org, usage, SharingLevel::Basic).await;
    }
    let mut client = consent.client().await;
    let history = |page_size: u32| {
        authed(
            &org.admin,
            consent_pb::ListConsentHistoryRequest {
                org_id: org.id.clone(),
                page_size,
                page_token: String::new(),
            },
        )
    };
    // Twenty versions with their signed receipts do not fit in 4 KiB.
    let refused = client.list_consent_history(history(20)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().starts_with("reply:"),
        "{}",
        refused.message()
    );
    // A smaller page does.
    let page = client
        .list_consent_history(history(2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.versions.len(), 2);
}

/// A `sightline <service>` process on `addr` with `data` as its data directory.
fn signal(child: &tokio::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().unwrap().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_linker_frozen_writes_of_every_org_answer_unavailable_and_settle_when_it_thaws() {
    let parent = sightline_runtime::testing::private_tempdir().unwrap();
    let data = parent.path().join("data");
    let (linker, linker_addr, _) = sightline_tests::service_process(
        "linker",
        &data,
        &[
            (
                "SIGHTLINE_LINKER__LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            (
                "SIGHTLINE_LINKER__METRICS_LISTEN".to_owned(),
                "off".to_owned(),
            ),
        ],
    )
    .await;
    let (_consent, consent_addr, _) = sightline_tests::service_process(
        "consent",
        &data,
        &[
            (
                "SIGHTLINE_CONSENT__LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            (
                "SIGHTLINE_CONSENT__METRICS_LISTEN".to_owned(),
                "off".to_owned(),
            ),
            (
                "SIGHTLINE_LINKER__URL".to_owned(),
                format!("http://{linker_addr}"),
            ),
        ],
    )
    .await;
    let to_linker = Channel::from_shared(format!("http://{linker_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let operator = std::fs::read_to_string(data.join("operator.token")).unwrap();
    let mut orgs = Vec::new();
    for n in 0..5 {
        orgs.push(
            sightline_tests::admin::org(to_linker.clone(), operator.trim(), &format!("Org {n}"))
                .await,
        );
    }
    let consent_channel = Channel::from_shared(format!("http://{consent_addr}"))
        .unwrap()
        .connect_lazy();
    let mut consent = ConsentServiceClient::new(consent_channel.clone());
    for org in &orgs {
        write(&mut consent, org, "warm", 0, None).await.unwrap();
    }

    // Freeze linker-svc (as SIGSTOP does to a hung host): every org writes at once.
    signal(&linker, "STOP");
    let mut writers = Vec::new();
    for org in orgs.clone() {
        let mut client = ConsentServiceClient::new(consent_channel.clone());
        writers.push(tokio::spawn(async move {
            write(
                &mut client,
                &org,
                "frozen",
                1,
                Some(Duration::from_secs(30)),
            )
            .await
        }));
    }
    for writer in writers {
        let status = writer.await.unwrap().unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "a write while linker-svc is frozen: {status:?}"
        );
        assert!(!status.message().contains("locked"), "{status:?}");
    }

    // Thawed: staged changes settle (applied exactly when their entry made it), and writes go on.
    signal(&linker, "CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut audit =
        sightline_proto::audit::v1::audit_service_client::AuditServiceClient::new(to_linker);
    for org in &orgs {
        write(
            &mut consent,
            org,
            "thawed",
            0,
            Some(Duration::from_secs(10)),
        )
        .await
        .unwrap();
        let ledger = ledger_from(&mut audit, &mut consent, org).await;
        assert!(ledger.stored.values().any(|r| r == "thawed"));
        assert_agreement(
            &ledger,
            &Seen {
                acked: Vec::new(),
                late: Vec::new(),
            },
        );
    }
}
