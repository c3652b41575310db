//! The companion with the whole suite, every part a real process: the four services (`sightline
//! linker`, `consent`, `collector`, `insights`) and `sightline-companion`. Link → collect → health
//! and trends → collector away, spool grows, collector back, every event once → opt out, no further
//! upload, purge done; on SQLite and on PostgreSQL. Also: the vault (tampering, copying, an open key
//! file, re-linking), kill -9 of the companion during uploads, a DISABLED org, and an offline
//! companion past its spool bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use sightline_proto::collector::v1::collector_service_client::CollectorServiceClient;
use sightline_proto::collector::v1::{QueryMetricsRequest, Resolution};
use sightline_proto::common::v1::{SharingLevel, TimeRange, UsageLevel};
use sightline_proto::insights::v1::insights_service_client::InsightsServiceClient;
use sightline_proto::insights::v1::{GetHealthRequest, GetTrendsRequest};
use sightline_proto::linker::v1::RegenerateLinkKeyRequest;
use sightline_proto::linker::v1::linker_service_client::LinkerServiceClient;
use sightline_tests::{admin, authed, companion_binary, sightline_binary};
use tonic::transport::Channel;

const HOUR_MS: i64 = 3_600_000;
const SERVICES: [&str; 4] = ["linker", "consent", "collector", "insights"];

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn private_dir() -> tempfile::TempDir {
    sightline_runtime::testing::private_tempdir().unwrap()
}

async fn wait_for<T>(what: &str, secs: u64, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The four services as `sightline <service>` processes on fixed local ports.
struct Stack {
    dir: tempfile::TempDir,
    /// Where each service listens: picked by the system at its first start (and said in its
    /// log), kept for a restart.
    addrs: HashMap<&'static str, SocketAddr>,
    collector_metrics: Option<SocketAddr>,
    databases: HashMap<&'static str, String>,
    children: HashMap<&'static str, tokio::process::Child>,
}

impl Stack {
    async fn start(postgres: bool) -> Self {
        let mut databases = HashMap::new();
        if postgres {
            for name in SERVICES {
                databases.insert(
                    name,
                    sightline_runtime::testing::fresh_postgres_url()
                        .await
                        .unwrap(),
                );
            }
        }
        let mut stack = Self {
            dir: private_dir(),
            addrs: HashMap::new(),
            collector_metrics: None,
            databases,
            children: HashMap::new(),
        };
        // In dependency order: each is given the addresses of those before it.
        for name in SERVICES {
            stack.spawn(name).await;
        }
        // linker-svc follows consent-svc, whose address is known only now: it starts again, on
        // its own address, with it.
        stack.kill("linker").await;
        stack.spawn("linker").await;
        stack
    }

    fn url(&self, name: &str) -> String {
        format!("http://{}", self.addrs[name])
    }

    async fn spawn(&mut self, name: &'static str) {
        let mut env = vec![(
            "SIGHTLINE_COLLECTION__ROLLUP_EVERY_MS".to_owned(),
            "300".to_owned(),
        )];
        for svc in SERVICES {
            let upper = svc.to_uppercase();
            if let Some(addr) = self.addrs.get(svc) {
                env.push((format!("SIGHTLINE_{upper}__LISTEN"), addr.to_string()));
                env.push((format!("SIGHTLINE_{upper}__URL"), format!("http://{addr}")));
            }
            if let Some(url) = self.databases.get(svc) {
                env.push((format!("SIGHTLINE_{upper}__DATABASE_URL"), url.clone()));
            }
        }
        let upper = name.to_uppercase();
        let listen = self
            .addrs
            .get(name)
            .map_or("127.0.0.1:0".to_owned(), SocketAddr::to_string);
        let metrics = match (name, self.collector_metrics) {
            ("collector", Some(addr)) => addr.to_string(),
            ("collector", None) => "127.0.0.1:0".to_owned(),
            _ => "off".to_owned(),
        };
        env.push((format!("SIGHTLINE_{upper}__LISTEN"), listen));
        env.push((format!("SIGHTLINE_{upper}__METRICS_LISTEN"), metrics));
        let (child, addr, metrics) =
            sightline_tests::service_process(name, self.dir.path(), &env).await;
        self.addrs.insert(name, addr);
        if name == "collector" {
            self.collector_metrics = metrics;
        }
        self.children.insert(name, child);
    }

    async fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.children.remove(name) {
            child.kill().await.unwrap();
        }
    }

    fn operator(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    async fn channel(&self, name: &str) -> Channel {
        admin::channel(&self.url(name), None).await
    }

    /// A new org with an admin token and a link key.
    async fn org(&self, name: &str) -> Org {
        admin::org_with_link_key(self.channel("linker").await, &self.operator(), name).await
    }

    async fn levels(&self, org: &Org, usage: UsageLevel, sharing: SharingLevel) {
        admin::set_levels(self.channel("consent").await, org, usage, sharing).await;
    }

    /// A stack with one org at BASIC and a companion linked to it: (stack, org, companion,
    /// instance id).
    async fn linked(postgres: bool, server_id: &str) -> (Self, Org, Companion, String) {
        let stack = Self::start(postgres).await;
        let org = stack.org("Acme").await;
        stack
            .levels(&org, UsageLevel::Basic, SharingLevel::Basic)
            .await;
        let companion = Companion::new();
        let instance = companion.link(&stack, &org.key, server_id);
        (stack, org, companion, instance)
    }

    /// Raw samples of one metric, every page.
    async fn raw(
        &self,
        org: &Org,
        instance_id: &str,
        name: &str,
    ) -> Vec<(i64, f64, BTreeMap<String, String>)> {
        let mut client = CollectorServiceClient::new(self.channel("collector").await);
        let mut points = Vec::new();
        let mut token = String::new();
        loop {
            let request = QueryMetricsRequest {
                org_id: org.id.clone(),
                instance_id: instance_id.into(),
                metric_name: name.into(),
                range: Some(range(now_ms() - 30 * HOUR_MS, now_ms() + HOUR_MS)),
                resolution: Resolution::Raw as i32,
                page_size: 5000,
                page_token: token.clone(),
                tags: HashMap::new(),
            };
            // A collector just (re)started answers UNAVAILABLE until it holds the policies.
            let page = wait_for("QueryMetrics", 30, async || {
                client
                    .query_metrics(authed(&org.admin, request.clone()))
                    .await
                    .ok()
            })
            .await
            .into_inner();
            for p in page.points {
                let at = p.at.unwrap();
                points.push((
                    at.seconds * 1000 + i64::from(at.nanos) / 1_000_000,
                    p.sum,
                    p.tags.into_iter().collect(),
                ));
            }
            if page.next_page_token.is_empty() {
                return points;
            }
            token = page.next_page_token;
        }
    }

    /// The collector's `sightline_collector_events_total`, summed over outcomes.
    async fn collector_events_total(&self) -> f64 {
        let body = sightline_tests::scrape(self.collector_metrics.unwrap()).await;
        body.lines()
            .filter(|l| l.starts_with("sightline_collector_events_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn range(start_ms: i64, end_ms: i64) -> TimeRange {
    TimeRange {
        start: Some(ts(start_ms)),
        end: Some(ts(end_ms)),
    }
}

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn rfc3339(ms: i64) -> String {
    ts(ms).to_string()
}

type Org = admin::NewOrg;

/// One companion: its home, and the commands run on it.
struct Companion {
    home: tempfile::TempDir,
    run: Option<tokio::process::Child>,
}

impl Companion {
    fn new() -> Self {
        Self {
            home: private_dir(),
            run: None,
        }
    }

    fn path(&self) -> &Path {
        self.home.path()
    }

    fn inbox(&self) -> PathBuf {
        let inbox = self.path().join("inbox");
        std::fs::create_dir_all(&inbox).unwrap();
        inbox
    }

    fn command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(companion_binary());
        command
            .arg("--home")
            .arg(self.path())
            .env("SIGHTLINE_COMPANION_LOG", "warn");
        command
    }

    /// Runs a command to its end; (success, stdout, stderr).
    fn cmd(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.command().args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Links with the org's key (from a 0600 file), against the stack's endpoints.
    fn link_to(&self, urls: [String; 4], key: &str, server_id: &str) -> (bool, String, String) {
        let key_file = self.path().join("link.key");
        let _ = std::fs::remove_file(&key_file);
        sightline_runtime::secret_file::create_private(&key_file, key.as_bytes()).unwrap();
        let key_path = key_file.to_str().unwrap().to_owned();
        let out = self.cmd(&[
            "link",
            "--key-file",
            &key_path,
            "--server-id",
            server_id,
            "--base-url",
            "https://jira.acme.example",
            "--product",
            "jira",
            "--product-version",
            "9.12.4",
            "--linker",
            &urls[0],
            "--consent",
            &urls[1],
            "--collector",
            &urls[2],
            "--insights",
            &urls[3],
        ]);
        std::fs::remove_file(&key_file).unwrap();
        out
    }

    fn link(&self, stack: &Stack, key: &str, server_id: &str) -> String {
        let urls = SERVICES.map(|s| stack.url(s));
        let (ok, stdout, stderr) = self.link_to(urls, key, server_id);
        assert!(ok, "link failed: {stdout}\n{stderr}");
        assert!(
            !stdout.contains(key) && !stderr.contains(key),
            "the key is never printed"
        );
        assert!(
            !stdout.contains("slc_") && !stderr.contains("slc_"),
            "nor the credential"
        );
        self.state()["instance_id"].as_str().unwrap().to_owned()
    }

    fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.path().join("companion.json")).unwrap()).unwrap()
    }

    fn status(&self) -> Value {
        let (ok, stdout, stderr) = self.cmd(&["status", "--json"]);
        assert!(ok, "{stderr}");
        serde_json::from_str(&stdout).unwrap()
    }

    /// Starts `run` with short intervals; `overrides` replace the defaults by flag.
    fn start(&mut self, overrides: &[(&str, &str)]) {
        let mut flags: BTreeMap<&str, &str> = [
            ("--sample-every-ms", "200"),
            ("--upload-every-ms", "300"),
            ("--guardrails-every-ms", "1000"),
            ("--max-backoff-ms", "500"),
        ]
        .into_iter()
        .collect();
        flags.extend(overrides.iter().copied());
        let mut command = tokio::process::Command::from(self.command());
        command.arg("run");
        for (flag, value) in flags {
            command.arg(flag).arg(value);
        }
        // Its standard error (warnings and progress) is kept in the home's run.log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("run.log"))
            .unwrap();
        command.stdout(Stdio::null()).stderr(log).kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        // A bad flag ends the process at once: catch it here, not as a timeout later.
        std::thread::sleep(Duration::from_millis(30));
        assert!(child.try_wait().unwrap().is_none(), "run exited at start");
        self.run = Some(child);
    }

    async fn kill9(&mut self) {
        if let Some(mut child) = self.run.take() {
            child.kill().await.unwrap();
        }
    }

    fn spool_files(&self) -> usize {
        sightline_companion::spool::usage(&self.path().join("analytics-logs")).1
    }

    /// Drops a JSON-lines file of `name` samples into the inbox (written aside, then renamed).
    fn drop_metrics(&self, file: &str, lines: impl IntoIterator<Item = Value>) {
        let inbox = self.inbox();
        let tmp = inbox.join(format!("{file}.tmp"));
        let text: String = lines.into_iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, inbox.join(file)).unwrap();
    }
}

fn marker(name: &str, values: std::ops::Range<u32>, at_ms: i64) -> Vec<Value> {
    values
        .map(|i| serde_json::json!({"name": name, "value": i, "unit": "count", "at": rfc3339(at_ms + i64::from(i))}))
        .collect()
}

async fn the_whole_path(postgres: bool) {
    let (mut stack, org, mut companion, instance) = Stack::linked(postgres, "BQXJ-7Y2K").await;

    // The product reports CPU load at 95 % for the 24 hours before the last, and one tag carries
    // an e-mail address by mistake.
    let now = now_ms();
    let hour = now - now.rem_euclid(HOUR_MS);
    let cpu: Vec<Value> = (2..26)
        .map(|h| {
            serde_json::json!({"name": "jvm.cpu.load", "value": 95.0, "unit": "percent",
                "at": rfc3339(hour - h * HOUR_MS + 60_000),
                "tags": {"node": "n1", "owner": "ask ops@acme.example"}})
        })
        .collect();
    companion.drop_metrics("product-1.jsonl", cpu);
    std::fs::write(
        companion.inbox().join("guardrails.json"),
        r#"{"custom_fields": 2400, "projects": 412}"#,
    )
    .unwrap();

    // K3: what would be sent, as the collector would store it.
    let (ok, preview, stderr) = companion.cmd(&["sample", "--json"]);
    assert!(ok, "{stderr}");
    let preview: Value = serde_json::from_str(&preview).unwrap();
    let previewed: Vec<(i64, f64, BTreeMap<String, String>)> = preview["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["stored"]["metric"]["name"] == "jvm.cpu.load")
        .map(|e| {
            assert_eq!(e["kept"], true);
            let stored = &e["stored"];
            let at: prost_types::Timestamp =
                stored["occurredAt"].as_str().unwrap().parse().unwrap();
            let tags: BTreeMap<String, String> =
                serde_json::from_value(stored["metric"]["tags"].clone()).unwrap();
            (
                at.seconds * 1000,
                stored["metric"]["value"].as_f64().unwrap(),
                tags,
            )
        })
        .collect();
    assert_eq!(previewed.len(), 24);
    assert!(
        !previewed[0].2["owner"].contains("ops@acme.example"),
        "{:?}",
        previewed[0]
    );
    let (ok, readable, _) = companion.cmd(&["sample"]);
    assert!(ok);
    assert!(
        readable.contains("policy: usage BASIC, sharing BASIC"),
        "{readable}"
    );
    assert!(
        readable.contains("stored   metric jvm.cpu.load = 95 percent"),
        "{readable}"
    );

    // K2: run; the metrics arrive as the preview said.
    let mut insights = InsightsServiceClient::new(stack.channel("insights").await);
    companion.start(&[]);
    let stored = wait_for("the product's metrics to be stored", 60, async || {
        let points = stack.raw(&org, &instance, "jvm.cpu.load").await;
        (points.len() >= 24).then_some(points)
    })
    .await;
    let mut stored = stored;
    stored.sort_by_key(|p| p.0);
    let mut previewed = previewed;
    previewed.sort_by_key(|p| p.0);
    assert_eq!(stored, previewed, "sample shows what the collector stores");
    assert!(
        !stack
            .raw(&org, &instance, "host.memory.used_percent")
            .await
            .is_empty()
    );
    let guardrail = wait_for("the guardrail counts", 30, async || {
        let points = stack.raw(&org, &instance, "guardrail.custom_fields").await;
        points.first().cloned()
    })
    .await;
    assert_eq!(guardrail.1, 2400.0);

    // K4: a support bundle with the product's logs, accepted by insights-svc, scrubbed there.
    let logs = companion.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(
        logs.join("atlassian-jira.log"),
        "2026-11-27 10:00:01 INFO login ok for jane.doe@acme.example from 10.1.2.3\n",
    )
    .unwrap();
    let bundle = companion.path().join("support.zip");
    let (ok, stdout, stderr) = companion.cmd(&[
        "support-bundle",
        "--out",
        bundle.to_str().unwrap(),
        "--upload",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("uploaded as "), "{stdout}");
    assert!(
        stdout.contains("(2 files read, 2 personal data item(s) scrubbed)"),
        "{stdout}"
    );
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&bundle).unwrap()).unwrap();
    let names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
    assert!(
        names.contains(&"metrics/assessment.json".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"logs/atlassian-jira.log".to_owned()),
        "{names:?}"
    );
    let mut assessment = String::new();
    std::io::Read::read_to_string(
        &mut zip.by_name("metrics/assessment.json").unwrap(),
        &mut assessment,
    )
    .unwrap();
    let assessment: Value = serde_json::from_str(&assessment).unwrap();
    assert_eq!(assessment["format"], "sightline.assessment");
    assert_eq!(assessment["counts"]["customFields"], "2400");

    // Health and trends appear from the collector's rollups.
    let health = wait_for("a health finding", 60, async || {
        let health = insights
            .get_health(authed(
                &org.admin,
                GetHealthRequest {
                    org_id: org.id.clone(),
                    instance_id: instance.clone(),
                },
            ))
            .await
            .ok()?
            .into_inner()
            .health?;
        health
            .findings
            .iter()
            .any(|f| f.rule_id == "cpu-load-high")
            .then_some(health)
    })
    .await;
    assert!(health.score < 100);
    let trend = wait_for("every hour's rollup in the trend", 60, async || {
        let trend = insights
            .get_trends(authed(
                &org.admin,
                GetTrendsRequest {
                    org_id: org.id.clone(),
                    instance_id: instance.clone(),
                    metric_name: "jvm.cpu.load".into(),
                    range: Some(range(hour - 26 * HOUR_MS, hour)),
                    bucket: Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    }),
                },
            ))
            .await
            .ok()?
            .into_inner();
        (trend.points.len() >= 24).then_some(trend)
    })
    .await;
    assert!(trend.points.iter().all(|p| p.value == 95.0), "{trend:?}");

    // The collector goes away: the spool grows; it comes back: every event arrives once.
    stack.kill("collector").await;
    companion.drop_metrics(
        "product-2.jsonl",
        marker("app.offline.marker", 0..300, now - HOUR_MS),
    );
    wait_for("the spool to grow", 30, async || {
        (!companion.inbox().join("product-2.jsonl").exists() && companion.spool_files() >= 2)
            .then_some(())
    })
    .await;
    let waiting = companion.status();
    assert!(waiting["spool_bytes"].as_u64().unwrap() > 0);
    assert!(
        waiting["last_error"].as_str().unwrap().contains("upload"),
        "{waiting}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.spawn("collector").await;
    let back = wait_for("the offline events to arrive", 60, async || {
        let points = stack.raw(&org, &instance, "app.offline.marker").await;
        (points.len() >= 300).then_some(points)
    })
    .await;
    let mut values: Vec<u32> = back.iter().map(|p| p.1 as u32).collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (0..300).collect::<Vec<_>>(),
        "each event exactly once"
    );

    // Opt out: nothing more is uploaded, the spool is deleted, the collector purges.
    stack
        .levels(&org, UsageLevel::Disabled, SharingLevel::Basic)
        .await;
    wait_for(
        "the companion to see DISABLED and empty its spool",
        30,
        async || {
            let status = companion.status();
            (status["policy"]["usage_level"] == "DISABLED" && companion.spool_files() == 0)
                .then_some(())
        },
    )
    .await;
    wait_for("the collector's purge", 30, async || {
        stack
            .raw(&org, &instance, "jvm.cpu.load")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let sent = stack.collector_events_total().await;
    companion.drop_metrics("product-3.jsonl", marker("app.after.optout", 0..10, now));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stack.collector_events_total().await,
        sent,
        "nothing sent after the opt-out"
    );
    assert_eq!(companion.spool_files(), 0);
    assert!(
        companion.inbox().join("product-3.jsonl").exists(),
        "the product's files are not even read while DISABLED"
    );
    let (ok, status_text, _) = companion.cmd(&["status"]);
    assert!(ok);
    assert!(
        status_text.contains(&format!("org:          {}", org.id)),
        "{status_text}"
    );
    assert!(
        status_text.contains("policy:       usage DISABLED"),
        "{status_text}"
    );
    assert!(status_text.contains("last upload:  20"), "{status_text}");
    companion.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_collect_score_go_offline_come_back_opt_out_on_sqlite() {
    the_whole_path(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_collect_score_go_offline_come_back_opt_out_on_postgres() {
    the_whole_path(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_opens_only_unchanged_for_its_instance_with_a_private_key_file() {
    let stack = Stack::start(false).await;
    let org = stack.org("Acme").await;
    let a = Companion::new();
    let b = Companion::new();
    a.link(&stack, &org.key, "SRV-A");
    // B shares A's key file (as nodes sharing one home would), so only the instance id differs.
    std::fs::copy(
        a.path().join("companion.key"),
        b.path().join("companion.key"),
    )
    .unwrap();
    b.link(&stack, &org.key, "SRV-B");
    for file in ["companion.key", "companion.vault", "companion.json"] {
        let mode = std::fs::metadata(a.path().join(file))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{file}"
        );
    }
    let vault = std::fs::read(a.path().join("companion.vault")).unwrap();
    assert!(!String::from_utf8_lossy(&vault).contains("slc_"));
    assert_eq!(a.status()["vault"], "ok");

    // Any flipped byte: one clear error, from status and from run.
    let clear = "cannot be opened: it was altered, copied from another instance, or sealed with another key file";
    let positions: Vec<usize> = (0..vault.len())
        .step_by(9)
        .chain([vault.len() - 1])
        .collect();
    for i in positions {
        let mut bad = vault.clone();
        bad[i] ^= 0x20;
        std::fs::write(a.path().join("companion.vault"), &bad).unwrap();
        let status = a.status();
        assert!(
            status["vault"].as_str().unwrap().contains(clear),
            "byte {i}: {status}"
        );
    }
    let (ok, _, stderr) = a.cmd(&["run"]);
    assert!(!ok && stderr.contains(clear), "{stderr}");
    std::fs::write(a.path().join("companion.vault"), &vault).unwrap();
    assert_eq!(a.status()["vault"], "ok");

    // A's vault copied to B (same key file, another instance id) does not open.
    let b_vault = std::fs::read(b.path().join("companion.vault")).unwrap();
    std::fs::write(b.path().join("companion.vault"), &vault).unwrap();
    let (ok, _, stderr) = b.cmd(&["run"]);
    assert!(!ok && stderr.contains(clear), "{stderr}");
    std::fs::write(b.path().join("companion.vault"), &b_vault).unwrap();

    // A key file others may read: refused, before anything else.
    let key = a.path().join("companion.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (ok, _, stderr) = a.cmd(&["run"]);
    assert!(
        !ok && stderr.contains("may be read by others (mode 644)"),
        "{stderr}"
    );
    let urls = SERVICES.map(|s| stack.url(s));
    let (ok, _, stderr) = a.link_to(urls, &org.key, "SRV-A");
    assert!(!ok && stderr.contains("may be read by others"), "{stderr}");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // A new key (the old one regenerated away): re-linking replaces the vault whole.
    let mut linker = LinkerServiceClient::new(stack.channel("linker").await);
    let new_key = linker
        .regenerate_link_key(authed(
            &org.admin,
            RegenerateLinkKeyRequest {
                org_id: org.id.clone(),
                key_id: org.key_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let before = a.state();
    let (ok, stdout, _) = a.link_to(SERVICES.map(|s| stack.url(s)), &org.key, "SRV-A");
    assert!(!ok, "the revoked key no longer links: {stdout}");
    assert_eq!(
        std::fs::read(a.path().join("companion.vault")).unwrap(),
        vault,
        "a failed link changes nothing"
    );
    let instance = a.link(&stack, &new_key, "SRV-A");
    assert_eq!(instance, before["instance_id"].as_str().unwrap());
    assert_ne!(
        std::fs::read(a.path().join("companion.vault")).unwrap(),
        vault
    );
    assert_ne!(a.state()["link_key_prefix"], before["link_key_prefix"]);
    assert_eq!(a.status()["vault"], "ok");
    let leftovers: Vec<String> = std::fs::read_dir(a.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_uploads_loses_and_duplicates_nothing() {
    let (stack, org, mut companion, instance) = Stack::linked(false, "SRV-K").await;
    let base = now_ms() - HOUR_MS;
    let per_round = 2000;
    let (mut rounds, mut delivered, mut mid_upload) = (0, 0, 0);
    // Twelve kills at least, and on until three came in the middle of an upload: where a kill
    // lands depends on the machine's pace, so it is a condition to reach, not a verdict (bounded).
    while rounds < 12 || (mid_upload < 3 && rounds < 60) {
        let round = rounds;
        rounds += 1;
        let first = round * per_round;
        companion.drop_metrics(
            &format!("round-{round:02}.jsonl"),
            marker("kill.marker", first..first + per_round, base),
        );
        companion.start(&[("--upload-every-ms", "20"), ("--sample-every-ms", "20")]);
        // Somewhere in reading, spooling or uploading.
        let pause = 150 + (round as u64 * 37) % 400;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        companion.kill9().await;
        let stored = stack.raw(&org, &instance, "kill.marker").await.len();
        if stored > delivered && companion.spool_files() > 0 {
            mid_upload += 1;
        }
        delivered = stored;
    }
    eprintln!("{mid_upload} of {rounds} kills came in the middle of an upload");
    assert!(
        mid_upload >= 3,
        "only {mid_upload} kills came in the middle of an upload"
    );
    companion.start(&[]);
    let total = rounds * per_round;
    let points = wait_for("every round delivered", 120, async || {
        let points = stack.raw(&org, &instance, "kill.marker").await;
        (points.len() >= total as usize
            && companion.spool_files() == 0
            && companion.inbox().read_dir().unwrap().count() == 0)
            .then_some(points)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let points_after = stack.raw(&org, &instance, "kill.marker").await;
    assert_eq!(points.len(), points_after.len());
    let mut values: Vec<u32> = points_after.iter().map(|p| p.1 as u32).collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (0..total).collect::<Vec<_>>(),
        "every event exactly once"
    );
    companion.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_org_sends_nothing_and_keeps_no_spool() {
    let stack = Stack::start(false).await;
    let org = stack.org("Quiet").await; // a new org is DISABLED until an admin opts in
    let mut companion = Companion::new();
    companion.link(&stack, &org.key, "SRV-D");
    companion.drop_metrics("product.jsonl", marker("quiet.marker", 0..10, now_ms()));
    // An earlier spool (e.g. from before an opt-out) is deleted too.
    let mut spool =
        sightline_companion::spool::Spool::open(&companion.path().join("analytics-logs"), 1 << 20)
            .unwrap();
    let event = sightline_tests::collector::metric("left-over", now_ms(), "quiet.earlier", 1.0);
    spool.append(&[event]).unwrap();
    drop(spool);
    assert_eq!(companion.spool_files(), 1);
    companion.start(&[]);
    wait_for("the companion to read its policy", 30, async || {
        (companion.status()["policy"]["usage_level"] == "DISABLED").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stack.collector_events_total().await,
        0.0,
        "the collector received nothing"
    );
    assert_eq!(companion.spool_files(), 0);
    assert!(companion.inbox().join("product.jsonl").exists());
    let status = companion.status();
    assert_eq!(status["uploaded_events_total"], 0);
    assert_eq!(status["spool_bytes"], 0);
    companion.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_past_the_spool_bound_drops_the_oldest_counts_them_and_stays_small() {
    let (mut stack, org, mut companion, instance) = Stack::linked(false, "SRV-O").await;
    stack.kill("collector").await;
    let base = now_ms() - HOUR_MS;
    let (files, per_file) = (40u32, 500u32);
    companion.start(&[("--spool-max-bytes", "262144"), ("--sample-every-ms", "50")]);
    let pid = companion.run.as_ref().unwrap().id().unwrap();
    let mut peak_rss_kib = 0u64;
    for f in 0..files {
        companion.drop_metrics(
            &format!("burst-{f:03}.jsonl"),
            marker("offline.bound", f * per_file..(f + 1) * per_file, base),
        );
        for _ in 0..300 {
            if !companion
                .inbox()
                .join(format!("burst-{f:03}.jsonl"))
                .exists()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            !companion
                .inbox()
                .join(format!("burst-{f:03}.jsonl"))
                .exists(),
            "file {f} not spooled: {}",
            companion.status()
        );
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap();
        peak_rss_kib = peak_rss_kib.max(rss);
    }
    let status = companion.status();
    let dropped = status["dropped_events_total"].as_u64().unwrap();
    assert!(dropped > 0, "{status}");
    assert!(
        status["spool_bytes"].as_u64().unwrap() <= 262_144,
        "{status}"
    );
    assert!(
        status["last_error"].as_str().unwrap().contains("bound") || dropped > 0,
        "{status}"
    );
    assert!(peak_rss_kib < 64 * 1024, "companion RSS {peak_rss_kib} KiB");
    let (_, text, _) = companion.cmd(&["status"]);
    assert!(
        text.contains(&format!("{dropped} event(s) dropped at the spool bound")),
        "{text}"
    );

    stack.spawn("collector").await;
    let total = u64::from(files * per_file);
    let points = wait_for("the kept events to arrive", 60, async || {
        let points = stack.raw(&org, &instance, "offline.bound").await;
        (companion.spool_files() == 0 && points.len() as u64 + dropped >= total).then_some(points)
    })
    .await;
    let log = std::fs::read_to_string(companion.path().join("run.log")).unwrap();
    assert!(
        log.contains("uploading the spool: ") && log.contains("batches (100%)"),
        "a backlog upload shows its progress as plain lines: {log}"
    );
    // Host samples share the spool with the markers, so at least the markers' share was dropped.
    assert!(points.len() as u64 <= total);
    let mut values: Vec<u32> = points.iter().map(|p| p.1 as u32).collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values.len(), points.len(), "no event twice");
    assert!(values[0] > 0, "the oldest were dropped");
    // Files are dropped whole, and the oldest first of those not being uploaded (README): once
    // the collector is back, a file may be dropped while older ones are in flight, so what is
    // kept is whole files, the newest among them, not always one run.
    let mut per_kept_file = std::collections::BTreeMap::new();
    for v in &values {
        *per_kept_file.entry(v / per_file).or_insert(0u32) += 1;
    }
    assert!(
        per_kept_file.values().all(|n| *n == per_file),
        "what is kept is whole files: {per_kept_file:?}"
    );
    assert_eq!(
        per_kept_file.keys().next_back(),
        Some(&(files - 1)),
        "the newest file is kept"
    );
    companion.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_tour_runs_as_written() {
    let work = private_dir();
    let grpcurl = sightline_tests::grpcurl();
    let script = format!(
        "set -euo pipefail\ngrpcurl() {{ command \"{grpcurl}\" \"$@\"; }}\n{}\n",
        sightline_tests::readme_block("tour")
    );
    let mut command = std::process::Command::new("bash");
    command
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .env("SIGHTLINE", sightline_binary())
        .env("COMPANION", companion_binary())
        .env("SIGHTLINE_COLLECTION__ROLLUP_EVERY_MS", "500")
        .env("SIGHTLINE_CONSOLE__LISTEN", "127.0.0.1:0");
    // Ports chosen by the system, so parallel tests never collide; the tour reads the banner.
    for svc in SERVICES {
        let upper = svc.to_uppercase();
        command
            .env(format!("SIGHTLINE_{upper}__LISTEN"), "127.0.0.1:0")
            .env(format!("SIGHTLINE_{upper}__METRICS_LISTEN"), "off");
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let log = std::fs::read_to_string(work.path().join("sightline.log")).unwrap_or_default();
    assert!(
        output.status.success(),
        "tour failed\n{stdout}\n{}\n{log}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "USAGE_LEVEL_BASIC",
            "linked",
            "6",
            r#"{"score":85,"findings":["cpu-load-high"]}"#,
            r#"{"usage":"BASIC","uploaded":true}"#,
            "USAGE_LEVEL_DISABLED",
            r#"{"usage":"DISABLED","spool_bytes":0}"#,
        ],
        "{stdout}"
    );
    let readme =
        std::fs::read_to_string(sightline_tests::workspace_root().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("```\n{}\n```", lines.join("\n"))),
        "the README shows this output"
    );
    // Nothing secret reached the terminal or the logs.
    let companion_log =
        std::fs::read_to_string(work.path().join("companion.log")).unwrap_or_default();
    for text in [&*stdout, &log, &companion_log] {
        assert!(!text.contains("slc_") && !text.contains("sla_"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_accepts_and_never_answers_does_not_hold_the_companion() {
    let (stack, org, mut companion, instance) = Stack::linked(false, "SRV-S").await;
    // A listener that takes connections and never says a word: the companion must give the round
    // up, keep its spool, and deliver everything once the real collector is its target again.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let state_path = companion.path().join("companion.json");
    let state = std::fs::read_to_string(&state_path).unwrap();
    let real = stack.url("collector");
    std::fs::write(
        &state_path,
        state.replace(&real, &format!("http://{silent_addr}")),
    )
    .unwrap();
    companion.drop_metrics(
        "stalled.jsonl",
        marker("stalled.marker", 0..100, now_ms() - HOUR_MS),
    );
    companion.start(&[("--ack-timeout-ms", "300")]);
    let status = wait_for("the stalled round to be given up", 30, async || {
        let status = companion.status();
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no ack from the collector within 300 ms"))
            .then_some(status)
    })
    .await;
    assert!(companion.spool_files() > 0, "{status}");
    assert_eq!(status["uploaded_events_total"], 0);
    companion.kill9().await;
    held.abort();
    std::fs::write(&state_path, state).unwrap();
    companion.start(&[]);
    let points = wait_for("the spool to be delivered", 30, async || {
        let points = stack.raw(&org, &instance, "stalled.marker").await;
        (points.len() >= 100 && companion.spool_files() == 0).then_some(points)
    })
    .await;
    assert_eq!(points.len(), 100);
    companion.kill9().await;
}
