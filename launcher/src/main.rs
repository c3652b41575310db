//! `sightline`: run the whole stack (`up`) or one service (`linker`).

use std::path::PathBuf;
use std::time::Duration;

/// mimalloc: the services allocate and free many small strings per event; glibc's allocator spends
/// a fifth of the ingest path in its own bookkeeping (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use collector_svc::{CollectorConfig, CollectorService};
use consent_svc::{ConsentConfig, ConsentService};
use insights_svc::{InsightsConfig, InsightsService};
use linker_svc::{Linker, LinkerConfig};
use sightline::{banner, load_settings, start_stack, stop_signal};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "sightline",
    version,
    about = "Consent-first telemetry and instance insights"
)]
struct Cli {
    /// A TOML settings file; SIGHTLINE_* environment variables override it.
    #[arg(long, global = true, env = "SIGHTLINE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start every service on 127.0.0.1 over SQLite under the data directory.
    Up {
        /// Where databases, keys and the operator token live (default ./data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Run linker-svc alone.
    Linker {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Run consent-svc alone (it reaches linker-svc at `linker.url`).
    Consent {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Run collector-svc alone (it reaches linker-svc at `linker.url`, consent-svc at `consent.url`).
    Collector {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Run insights-svc alone (it reaches linker-svc, consent-svc and collector-svc at their `url`).
    Insights {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Make what the stack's services share before any of them starts: the service token, in
    /// DIR/service.token (mode 0600). Run again, it keeps what is there. docker-compose runs it as
    /// its one-shot `init` service; the others read the token with `service_token_file`.
    Init {
        #[arg(long)]
        shared_dir: PathBuf,
    },
    /// Run the web console alone (it reaches every service at its `url`; `console.listen`).
    Console {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Exit 0 when the server at ADDR answers its gRPC health check with SERVING (a container's
    /// health check). Uses TLS, with the settings' CA and certificate, when TLS is configured.
    Health {
        /// host:port of the server.
        addr: String,
        /// One service's status instead of the server's, e.g. sightline.linker.v1.LinkerService.
        #[arg(long, default_value = "")]
        service: String,
    },
}

/// How the serving process's threads are scheduled, and whether that took: set on the main thread
/// before the async runtime starts its threads (they inherit it), reported once telemetry is up.
static SCHEDULED: std::sync::OnceLock<(sightline_runtime::sched::Scheduling, Result<(), String>)> =
    std::sync::OnceLock::new();

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Health { .. } | Command::Init { .. }) {
        // Settings that do not load fail the command below, with their own message.
        let scheduling = sightline_runtime::sched::Scheduling::configured(cli.config.as_deref());
        let _ = SCHEDULED.set((scheduling, sightline_runtime::sched::apply(scheduling)));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("the async runtime")?
        .block_on(run(cli))
}

/// Logs how the threads are scheduled (a policy that could not be set is a warning: the services
/// run under the kernel's default).
fn report_scheduling() {
    match SCHEDULED.get() {
        Some((scheduling, Ok(()))) => tracing::info!(?scheduling, "threads scheduled"),
        Some((scheduling, Err(error))) => {
            tracing::warn!(?scheduling, %error, "the scheduling setting could not be applied");
        }
        None => {}
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    // What a service run alone stops on.
    let stop = shutdown.clone();
    match cli.command {
        Command::Health { addr, service } => {
            let settings = sightline_runtime::Settings::load(cli.config.as_deref())?;
            let url = match settings.tls {
                Some(_) => format!("https://{addr}"),
                None => format!("http://{addr}"),
            };
            let channel = sightline_runtime::client::service_channel(
                &url,
                settings.tls.as_ref(),
                &settings.limits,
            )?;
            let serving =
                sightline_runtime::server::serving(channel, &service, Duration::from_secs(3))
                    .await
                    .map_err(|s| anyhow::anyhow!("{addr}: {:?}: {}", s.code(), s.message()))?;
            anyhow::ensure!(serving, "{addr}: NOT_SERVING");
            sightline_runtime::text::print_line(&format!("{addr}: SERVING"))?;
        }
        Command::Up { data_dir } => {
            let settings = load_settings(cli.config.as_deref(), data_dir)?;
            let _telemetry = sightline_runtime::telemetry::init(&settings.log, "sightline");
            report_scheduling();
            let data_dir = settings.data_dir.clone();
            let plaintext = settings.tls.is_none();
            let (endpoints, mut tasks) = start_stack(settings, shutdown.clone()).await?;
            sightline_runtime::text::print_line(&banner(&data_dir, &endpoints, plaintext))?;
            tokio::select! {
                () = stop_signal() => {}
                Some(done) = tasks.join_next() => {
                    done.context("service task panicked")??;
                }
            }
            shutdown.cancel();
            while let Some(done) = tasks.join_next().await {
                done.context("service task panicked")??;
            }
        }
        Command::Linker { data_dir } => {
            let (settings, _telemetry) =
                alone(cli.config.as_deref(), data_dir, "sightline-linker")?;
            let linker = Linker::build(LinkerConfig::from_settings(&settings)?).await?;
            tracing::info!(addr = %linker.local_addr(), "linker-svc listening");
            serve_until_signal("linker", shutdown, linker.run_until_stopped(stop)).await?;
        }
        Command::Consent { data_dir } => {
            let (settings, _telemetry) =
                alone(cli.config.as_deref(), data_dir, "sightline-consent")?;
            let consent = ConsentService::build(ConsentConfig::from_settings(&settings)?).await?;
            tracing::info!(addr = %consent.local_addr(), "consent-svc listening");
            serve_until_signal("consent", shutdown, consent.run_until_stopped(stop)).await?;
        }
        Command::Collector { data_dir } => {
            let (settings, _telemetry) =
                alone(cli.config.as_deref(), data_dir, "sightline-collector")?;
            let collector =
                CollectorService::build(CollectorConfig::from_settings(&settings)?).await?;
            tracing::info!(addr = %collector.local_addr(), "collector-svc listening");
            serve_until_signal("collector", shutdown, collector.run_until_stopped(stop)).await?;
        }
        Command::Insights { data_dir } => {
            let (settings, _telemetry) =
                alone(cli.config.as_deref(), data_dir, "sightline-insights")?;
            let insights =
                InsightsService::build(InsightsConfig::from_settings(&settings)?).await?;
            tracing::info!(addr = %insights.local_addr(), "insights-svc listening");
            serve_until_signal("insights", shutdown, insights.run_until_stopped(stop)).await?;
        }
        Command::Console { data_dir } => {
            let (settings, _telemetry) =
                alone(cli.config.as_deref(), data_dir, "sightline-console")?;
            let console = sightline_console::Console::build(
                sightline_console::ConsoleConfig::from_settings(&settings)?,
            )
            .await?;
            tracing::info!(url = %console.url(), "console listening");
            serve_until_signal("console", shutdown, console.run_until_stopped(stop)).await?;
        }
        Command::Init { shared_dir } => {
            sightline_runtime::secret_file::private_dir(&shared_dir)
                .with_context(|| format!("shared directory {}", shared_dir.display()))?;
            sightline::ensure_service_token(&shared_dir)?;
            sightline_runtime::text::print_line(&format!(
                "service token ready in {} (it is never printed)",
                shared_dir.join("service.token").display()
            ))?;
        }
    }
    Ok(())
}

/// The settings of one part run alone (`sightline linker` …), its telemetry (kept alive by the
/// caller), and the service token, made in the data directory when the settings name none.
fn alone(
    config: Option<&std::path::Path>,
    data_dir: Option<PathBuf>,
    component: &'static str,
) -> anyhow::Result<(
    sightline_runtime::Settings,
    sightline_runtime::telemetry::Telemetry,
)> {
    let mut settings = load_settings(config, data_dir)?;
    let telemetry = sightline_runtime::telemetry::init(&settings.log, component);
    report_scheduling();
    if settings.service_token.is_none() {
        settings.service_token = Some(sightline::ensure_service_token(&settings.data_dir)?);
    }
    Ok((settings, telemetry))
}

/// Serves `run` until Ctrl-C or SIGTERM, then stops it and waits for it to finish.
async fn serve_until_signal<E>(
    name: &str,
    shutdown: CancellationToken,
    run: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) -> anyhow::Result<()>
where
    E: Into<anyhow::Error> + Send + 'static,
{
    let serve = tokio::spawn(run);
    stop_signal().await;
    shutdown.cancel();
    serve
        .await
        .with_context(|| format!("{name} task panicked"))?
        .map_err(Into::into)
}
