//! `sightline-companion`: link, run, status, sample, support-bundle.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sightline_companion::commands::{self, KeySource, LinkArgs};
use sightline_companion::run::RunOptions;
use sightline_companion::vault::{Endpoints, Home};

#[derive(Debug, Parser)]
#[command(
    name = "sightline-companion",
    version,
    about = "The Sightline companion: links an instance, samples and uploads its metrics under its org's consent"
)]
struct Cli {
    /// The companion's directory in the product's shared home: key file, vault, spool.
    #[arg(
        long,
        global = true,
        env = "SIGHTLINE_COMPANION_HOME",
        default_value = "sightline-companion"
    )]
    home: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Services {
    #[arg(
        long,
        env = "SIGHTLINE_COMPANION_LINKER",
        default_value = "http://127.0.0.1:50051"
    )]
    linker: String,
    #[arg(
        long,
        env = "SIGHTLINE_COMPANION_CONSENT",
        default_value = "http://127.0.0.1:50052"
    )]
    consent: String,
    #[arg(
        long,
        env = "SIGHTLINE_COMPANION_COLLECTOR",
        default_value = "http://127.0.0.1:50053"
    )]
    collector: String,
    #[arg(
        long,
        env = "SIGHTLINE_COMPANION_INSIGHTS",
        default_value = "http://127.0.0.1:50054"
    )]
    insights: String,
    /// PEM CA certificates that signed the services' certificates (for https:// URLs).
    #[arg(long, env = "SIGHTLINE_COMPANION_CA")]
    ca: Option<PathBuf>,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Link this instance with a link key from the org admin; keeps the key and the instance
    /// credential in the encrypted vault. Linking again (e.g. with a new key) replaces the vault.
    Link {
        /// The link key itself (prefer --key-file or --key-stdin: keep it out of shell history).
        #[arg(long, conflicts_with_all = ["key_file", "key_stdin"])]
        key: Option<String>,
        /// A file holding the link key.
        #[arg(long, conflicts_with = "key_stdin")]
        key_file: Option<PathBuf>,
        /// Read the link key from standard input.
        #[arg(long)]
        key_stdin: bool,
        /// The product's own server id.
        #[arg(long, env = "SIGHTLINE_COMPANION_SERVER_ID")]
        server_id: String,
        /// The instance's base URL, e.g. https://jira.example.com.
        #[arg(long, env = "SIGHTLINE_COMPANION_BASE_URL")]
        base_url: String,
        #[arg(long, env = "SIGHTLINE_COMPANION_PRODUCT", default_value = "")]
        product: String,
        #[arg(
            long = "product-version",
            env = "SIGHTLINE_COMPANION_PRODUCT_VERSION",
            default_value = ""
        )]
        product_version: String,
        #[arg(long, env = "SIGHTLINE_COMPANION_LICENSE_SEN", default_value = "")]
        license_sen: String,
        #[command(flatten)]
        services: Services,
    },
    /// Follow the policy, sample, spool and upload until stopped (SIGTERM or Ctrl-C).
    Run {
        /// How often host and inbox metrics are sampled.
        #[arg(
            long,
            env = "SIGHTLINE_COMPANION_SAMPLE_EVERY_MS",
            default_value_t = 120_000
        )]
        sample_every_ms: u64,
        /// How often the spool is uploaded.
        #[arg(
            long,
            env = "SIGHTLINE_COMPANION_UPLOAD_EVERY_MS",
            default_value_t = 3_600_000
        )]
        upload_every_ms: u64,
        /// How often guardrail counts are read.
        #[arg(
            long,
            env = "SIGHTLINE_COMPANION_GUARDRAILS_EVERY_MS",
            default_value_t = 3_600_000
        )]
        guardrails_every_ms: u64,
        /// The spool's bound; past it the oldest events are dropped and counted.
        #[arg(long, env = "SIGHTLINE_COMPANION_SPOOL_MAX_BYTES", default_value_t = 64 << 20)]
        spool_max_bytes: u64,
        /// The longest wait between upload attempts.
        #[arg(
            long,
            env = "SIGHTLINE_COMPANION_MAX_BACKOFF_MS",
            default_value_t = 300_000
        )]
        max_backoff_ms: u64,
        /// How long an upload waits for the collector's next ack before it retries later.
        #[arg(
            long,
            env = "SIGHTLINE_COMPANION_ACK_TIMEOUT_MS",
            default_value_t = 120_000
        )]
        ack_timeout_ms: u64,
        /// The product's process to sample (default: the companion's own).
        #[arg(long, env = "SIGHTLINE_COMPANION_PID")]
        pid: Option<u32>,
        /// Where the product drops metrics as JSON lines (default HOME/inbox).
        #[arg(long, env = "SIGHTLINE_COMPANION_INBOX")]
        inbox: Option<PathBuf>,
    },
    /// The link, key expiry, policy, spool, last upload and last error.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Print exactly what would be sent under the current policy (the collector's PreviewSample).
    Sample {
        #[arg(long)]
        json: bool,
        #[arg(long, env = "SIGHTLINE_COMPANION_INBOX")]
        inbox: Option<PathBuf>,
    },
    /// Write support.zip (metrics in the assessment format, and the product's logs).
    SupportBundle {
        #[arg(long, default_value = "support.zip")]
        out: PathBuf,
        /// The product's log directory.
        #[arg(long, env = "SIGHTLINE_COMPANION_LOGS_DIR")]
        logs_dir: Option<PathBuf>,
        #[arg(long, env = "SIGHTLINE_COMPANION_INBOX")]
        inbox: Option<PathBuf>,
        /// Also upload it to insights-svc with the instance's credential.
        #[arg(long)]
        upload: bool,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIGHTLINE_COMPANION_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match main_inner().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn main_inner() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let home = Home::open(&cli.home)?;
    let inbox_of = |inbox: Option<PathBuf>| inbox.unwrap_or_else(|| home.dir.join("inbox"));
    match cli.command {
        Command::Link {
            key,
            key_file,
            key_stdin,
            server_id,
            base_url,
            product,
            product_version,
            license_sen,
            services,
        } => {
            let key = match (key, key_file, key_stdin) {
                (Some(key), _, _) => KeySource::Arg(key),
                (None, Some(file), _) => KeySource::File(file),
                (None, None, true) => KeySource::Stdin,
                (None, None, false) => {
                    anyhow::bail!("give the link key: --key-file FILE, --key-stdin or --key KEY")
                }
            };
            let endpoints = Endpoints {
                linker: services.linker,
                consent: services.consent,
                collector: services.collector,
                insights: services.insights,
                ca: services.ca,
            };
            let args = LinkArgs {
                server_id,
                base_url,
                product,
                version: product_version,
                license_sen,
            };
            let out = commands::link(&home, key, args, endpoints).await?;
            sightline_runtime::text::print_line(&out)?;
        }
        Command::Run {
            sample_every_ms,
            upload_every_ms,
            guardrails_every_ms,
            spool_max_bytes,
            max_backoff_ms,
            ack_timeout_ms,
            pid,
            inbox,
        } => {
            let options = RunOptions {
                sample_every: Duration::from_millis(sample_every_ms.max(10)),
                upload_every: Duration::from_millis(upload_every_ms.max(10)),
                guardrails_every: Duration::from_millis(guardrails_every_ms.max(10)),
                spool_max_bytes,
                initial_backoff: Duration::from_millis(max_backoff_ms.clamp(10, 1000)),
                max_backoff: Duration::from_millis(max_backoff_ms.max(10)),
                ack_timeout: Duration::from_millis(ack_timeout_ms.max(10)),
                pid,
                inbox: inbox_of(inbox),
            };
            commands::run(&home, options, sightline_runtime::server::stop_signal()).await?;
        }
        Command::Status { json } => {
            let report = commands::status(&home);
            if json {
                sightline_runtime::text::print_line(&serde_json::to_string_pretty(&report)?)?;
            } else {
                sightline_runtime::text::print(&report.to_string())?;
            }
        }
        Command::Sample { json, inbox } => {
            sightline_runtime::text::print(
                &commands::sample(&home, &inbox_of(inbox), json).await?,
            )?;
        }
        Command::SupportBundle {
            out,
            logs_dir,
            inbox,
            upload,
        } => {
            let logs_dir = logs_dir.unwrap_or_else(|| home.dir.join("logs"));
            let text =
                commands::support_bundle(&home, &out, &logs_dir, &inbox_of(inbox), upload).await?;
            sightline_runtime::text::print_line(&text)?;
        }
    }
    Ok(())
}
