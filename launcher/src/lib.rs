//! The Sightline launcher. `sightline up` starts every service on 127.0.0.1 over SQLite files under
//! the data directory; `sightline linker` (and each other service by name) runs one service alone
//! with its own settings, as docker-compose does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use collector_svc::{CollectorConfig, CollectorService};
use consent_svc::{ConsentConfig, ConsentService};
use insights_svc::{InsightsConfig, InsightsService};
use linker_svc::{Linker, LinkerConfig};
use sightline_console::{Console, ConsoleConfig};
use sightline_runtime::secret_file;
use sightline_runtime::token::TokenKind;
use sightline_runtime::{Secret, Settings};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Reads `DIR/service.token`, or writes a new one (mode 0600): the token the stack's services present
/// to each other when settings do not name one.
pub fn ensure_service_token(data_dir: &Path) -> anyhow::Result<Secret> {
    let path = data_dir.join("service.token");
    let (token, _) = secret_file::read_or_create_token(&path, TokenKind::Service)
        .with_context(|| format!("service token file {}", path.display()))?;
    Ok(token)
}

/// A service of the stack, started.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub services: &'static [&'static str],
    /// Where Prometheus scrapes its `/metrics`, when it serves them.
    pub metrics: Option<SocketAddr>,
}

/// Starts every service of the stack; returns their endpoints and the tasks serving them.
pub async fn start_stack(
    mut settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<(Vec<Endpoint>, JoinSet<anyhow::Result<()>>)> {
    if settings.service_token.is_none() {
        settings.service_token = Some(ensure_service_token(&settings.data_dir)?);
    }
    let mut tasks = JoinSet::new();
    // consent-svc's address is known once it is built (port 0 picks one): followed from then on.
    let linker_config = LinkerConfig {
        consent_url: None,
        ..LinkerConfig::from_settings(&settings)?
    };
    let mut linker = Linker::build(linker_config)
        .await
        .context("starting linker-svc")?;
    // The other services reach linker-svc where it actually listens (port 0 picks one).
    settings.linker.url =
        sightline_runtime::client::service_url(linker.local_addr(), settings.tls.as_ref());
    let consent = ConsentService::build(ConsentConfig::from_settings(&settings)?)
        .await
        .context("starting consent-svc")?;
    settings.consent.url =
        sightline_runtime::client::service_url(consent.local_addr(), settings.tls.as_ref());
    // linker-svc places instance metadata by the policies of consent-svc where it actually listens.
    linker.follow_consent(&settings.consent.url)?;
    let residency = linker.residency();
    let collector = CollectorService::build(CollectorConfig::from_settings(&settings)?)
        .await
        .context("starting collector-svc")?;
    settings.collector.url =
        sightline_runtime::client::service_url(collector.local_addr(), settings.tls.as_ref());
    let insights = InsightsService::build(InsightsConfig::from_settings(&settings)?)
        .await
        .context("starting insights-svc")?;
    settings.insights.url =
        sightline_runtime::client::service_url(insights.local_addr(), settings.tls.as_ref());
    let console = Console::build(ConsoleConfig::from_settings(&settings)?)
        .await
        .context("starting the console")?;
    let endpoints = vec![
        Endpoint {
            name: "linker",
            addr: linker.local_addr(),
            metrics: linker.metrics_addr(),
            services: &[
                "sightline.linker.v1.LinkerService",
                "sightline.audit.v1.AuditService",
            ],
        },
        Endpoint {
            name: "consent",
            addr: consent.local_addr(),
            metrics: consent.metrics_addr(),
            services: &["sightline.consent.v1.ConsentService"],
        },
        Endpoint {
            name: "collector",
            addr: collector.local_addr(),
            metrics: collector.metrics_addr(),
            services: &["sightline.collector.v1.CollectorService"],
        },
        Endpoint {
            name: "insights",
            addr: insights.local_addr(),
            metrics: insights.metrics_addr(),
            services: &["sightline.insights.v1.InsightsService"],
        },
        Endpoint {
            name: "console",
            addr: console.local_addr(),
            metrics: None,
            services: &[],
        },
    ];
    // Stop in dependency order: the console first (it only calls the others), then insights-svc (it
    // reads from the collector), then collector-svc (its batches need their policy and its erasures
    // the audit log), then consent-svc (its in-flight changes still need the audit log), then
    // linker-svc.
    let linker_stop = CancellationToken::new();
    let consent_stop = CancellationToken::new();
    let collector_stop = CancellationToken::new();
    let stop = linker_stop.clone();
    tasks.spawn(async move { Ok(linker.run_until_stopped(stop).await?) });
    let stop = consent_stop.clone();
    tasks.spawn(async move {
        let served = consent.run_until_stopped(stop).await;
        linker_stop.cancel();
        Ok(served?)
    });
    let stop = collector_stop.clone();
    tasks.spawn(async move {
        let served = collector.run_until_stopped(stop).await;
        consent_stop.cancel();
        Ok(served?)
    });
    let insights_stop = CancellationToken::new();
    let stop = insights_stop.clone();
    tasks.spawn(async move {
        let served = insights.run_until_stopped(stop).await;
        collector_stop.cancel();
        Ok(served?)
    });
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let served = console.run_until_stopped(stop).await;
        insights_stop.cancel();
        Ok(served?)
    });
    // The stack is up once linker-svc holds consent-svc's policies (until then a link is refused
    // with a retry hint); a bound, after which it goes on and says so.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !residency.is_ready() {
        if tokio::time::Instant::now() > deadline {
            tracing::warn!(
                "linker-svc holds no policy from consent-svc yet; links are refused until it does"
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok((endpoints, tasks))
}

/// What `up` prints: endpoints, where the operator token is (never the token), a first command.
pub fn banner(data_dir: &Path, endpoints: &[Endpoint], plaintext: bool) -> String {
    let token_path = data_dir.join("operator.token");
    let mut out = format!(
        "sightline is up — data in {} (SQLite)\n\n",
        data_dir.display()
    );
    for e in endpoints {
        if e.services.is_empty() {
            let scheme = if plaintext { "http" } else { "https" };
            out.push_str(&format!("  {:<10} {scheme}://{}/\n", e.name, e.addr));
        } else {
            out.push_str(&format!(
                "  {:<10} {}   {}\n",
                e.name,
                e.addr,
                e.services.join(", ")
            ));
        }
    }
    for e in endpoints {
        if let Some(metrics) = e.metrics {
            out.push_str(&format!(
                "  {:<10} metrics http://{metrics}/metrics\n",
                e.name
            ));
        }
    }
    out.push_str(&format!(
        "\noperator token: {} (mode 0600; it is never printed)\n",
        token_path.display()
    ));
    if let Some(console) = endpoints.iter().find(|e| e.name == "console") {
        let scheme = if plaintext { "http" } else { "https" };
        out.push_str(&format!(
            "web console: {scheme}://{}/ (sign in with the operator token)\n",
            console.addr
        ));
    }
    if let Some(linker) = endpoints.iter().find(|e| e.name == "linker") {
        let tls = if plaintext { "-plaintext " } else { "" };
        out.push_str(&format!(
            "\nfirst command:\n  grpcurl {tls}-H \"authorization: Bearer $(cat {})\" -d '{{\"name\":\"Acme\"}}' {} sightline.linker.v1.LinkerService/CreateOrg\n",
            token_path.display(),
            linker.addr
        ));
    }
    let url = |name: &str| {
        endpoints.iter().find(|e| e.name == name).map(|e| {
            let scheme = if plaintext { "http" } else { "https" };
            format!("{scheme}://{}", e.addr)
        })
    };
    if let (Some(linker), Some(consent), Some(collector), Some(insights)) = (
        url("linker"),
        url("consent"),
        url("collector"),
        url("insights"),
    ) {
        let ca = if plaintext { "" } else { " --ca CA.pem" };
        out.push_str(&format!(
            "
then, beside an instance, with a link key from CreateLinkKey saved in link.key:
  sightline-companion --home ./companion link --key-file link.key --server-id SERVER-ID --base-url https://jira.example.com --linker {linker} --consent {consent} --collector {collector} --insights {insights}{ca}
  sightline-companion --home ./companion run
"
        ));
    }
    out
}

pub use sightline_runtime::server::stop_signal;

/// Loads settings, with `--data-dir` overriding the file and environment.
pub fn load_settings(config: Option<&Path>, data_dir: Option<PathBuf>) -> anyhow::Result<Settings> {
    let mut settings = Settings::load(config)?;
    if let Some(dir) = data_dir {
        settings.data_dir = dir;
    }
    // Made 0700, or refused when others can read it, before anything is written there.
    sightline_runtime::secret_file::private_dir(&settings.data_dir)
        .with_context(|| format!("data directory {}", settings.data_dir.display()))?;
    Ok(settings)
}
