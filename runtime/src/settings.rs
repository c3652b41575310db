//! Typed settings, layered: built-in defaults, then an optional TOML file, then `SIGHTLINE_*`
//! environment variables (`__` separates sections: `SIGHTLINE_LINKER__LISTEN=0.0.0.0:50051`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

/// A secret from settings: usable, never printed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct SettingsError(#[from] pub Box<figment::Error>);

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where SQLite files, the operator token and keys live.
    pub data_dir: PathBuf,
    pub log: LogSettings,
    /// TLS for every listener; plaintext when absent (local development only).
    pub tls: Option<TlsSettings>,
    pub limits: Limits,
    /// The token services present to each other. `sightline up` makes one when it is not set.
    pub service_token: Option<Secret>,
    /// A file holding the service token, read at start when `service_token` is not set (e.g. the
    /// one `sightline init` writes to a volume the services share).
    pub service_token_file: Option<PathBuf>,
    pub linker: ServiceSettings,
    pub consent: ServiceSettings,
    pub collector: ServiceSettings,
    pub insights: ServiceSettings,
    /// The web console (the `[console]` section).
    pub console: ConsoleSettings,
    /// How collector-svc stores, rolls up and shares what it collects.
    pub collection: CollectionSettings,
    /// Who owns data that a residency move must carry (the `[residency]` section).
    pub residency: ResidencySettings,
    /// How insights-svc scores, keeps and accepts uploads (the `[analysis]` section).
    pub analysis: AnalysisSettings,
    /// How the kernel schedules the server's threads: `batch` (the default: a thread that wakes
    /// does not preempt the one running, so a store's writer is not cut off mid-statement) or
    /// `normal`. See [`crate::sched`].
    pub scheduling: crate::sched::Scheduling,
}

/// The web console's settings (the `[console]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Where the console serves HTTP (HTTPS when `tls` is set); port 0 picks a free one.
    pub listen: SocketAddr,
    /// A signed-in session ends after this long without a request.
    pub session_idle_ms: u64,
    /// At most this many sessions are held; beyond it the least recently used one ends.
    pub max_sessions: usize,
    /// A connection that has not sent a request's headers this long after opening (or after its
    /// last answer) is closed: a stalled client holds nothing for long.
    pub header_timeout_ms: u64,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            session_idle_ms: 30 * 60 * 1_000,
            max_sessions: 10_000,
            header_timeout_ms: 10_000,
        }
    }
}

/// insights-svc's own settings (the `[analysis]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisSettings {
    /// A rules file (TOML) that extends or replaces the built-in health rules; checked at start.
    pub rules_file: Option<PathBuf>,
    /// Where support bundles of each residency location are kept; a location not named here is
    /// kept under `<data_dir>/bundles/<location>`.
    pub bundle_dirs: std::collections::BTreeMap<String, PathBuf>,
    /// The database of each residency location's insights store (assessments, readiness, score
    /// history, bundle records), by location name; a location not named uses
    /// `insights.database_url`, else its own SQLite file (`insights-<location>.db`; the global
    /// location keeps `insights.db`).
    pub locations: std::collections::BTreeMap<String, Secret>,
    /// How often every linked instance's score is computed and kept (score history).
    pub score_every_ms: u64,
    /// How often retention is enforced.
    pub sweep_every_ms: u64,
    /// How often purges from the policies are checked for.
    pub purge_check_every_ms: u64,
    /// The largest assessment file accepted.
    pub max_assessment_bytes: u64,
    /// The largest support bundle accepted (the zip as sent).
    pub max_bundle_bytes: u64,
    /// The most a bundle may expand to (all its files, uncompressed).
    pub max_bundle_expanded_bytes: u64,
    /// The most one file of a bundle may expand relative to its compressed size.
    pub max_bundle_ratio: u64,
    /// The most files a bundle may hold.
    pub max_bundle_files: usize,
    /// The time checking and scrubbing one support bundle may take; past it, RESOURCE_EXHAUSTED.
    pub max_bundle_check_ms: u64,
    /// A bundle file without a record, or an upload's temporary, is removed once it is this old
    /// (checked at start and with every sweep). Replicas sharing the bundle directories need it
    /// longer than any upload takes (another replica's upload under way is not an orphan); one
    /// replica alone may set 0.
    pub orphan_grace_ms: u64,
}

impl Default for AnalysisSettings {
    fn default() -> Self {
        Self {
            rules_file: None,
            bundle_dirs: std::collections::BTreeMap::new(),
            locations: std::collections::BTreeMap::new(),
            score_every_ms: 3_600_000,
            sweep_every_ms: 3_600_000,
            purge_check_every_ms: 5_000,
            max_assessment_bytes: 16 * 1024 * 1024,
            max_bundle_bytes: 512 * 1024 * 1024,
            max_bundle_expanded_bytes: 2 * 1024 * 1024 * 1024,
            max_bundle_ratio: 200,
            max_bundle_files: 10_000,
            max_bundle_check_ms: 120_000,
            orphan_grace_ms: 3_600_000,
        }
    }
}

/// Which services hold an org's data of each residency scope: a move is DONE once each has copied
/// its part to the new location and reported it (consent-svc waits for all of them).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResidencySettings {
    /// Owners of an org's data: collected data (events, metrics, page views, rollups), insights
    /// (assessments, readiness reports, score history) and linker-svc's instance metadata.
    pub data_owners: Vec<String>,
    /// Owners of support bundles.
    pub support_bundle_owners: Vec<String>,
    /// The database of each location's store of linker-svc's instance metadata (base URL,
    /// product, version, license SEN, node count, app links), by location name; a location not
    /// named uses its own SQLite file (`linker-<location>.db`; GLOBAL's is linker-svc's database).
    pub linker_locations: std::collections::BTreeMap<String, Secret>,
}

impl Default for ResidencySettings {
    fn default() -> Self {
        Self {
            data_owners: vec![
                "collector".to_owned(),
                "insights".to_owned(),
                "linker".to_owned(),
            ],
            support_bundle_owners: vec!["insights".to_owned()],
            linker_locations: std::collections::BTreeMap::new(),
        }
    }
}

/// collector-svc's own settings (the `[collection]` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectionSettings {
    /// Storage URL per data-residency location (`global`, `eu`, `germany`, …). A location not named
    /// here is stored at `collector.database_url` when that is set (every location in one database,
    /// told apart by a column), else in its own SQLite file `collector-<location>.db`.
    pub locations: std::collections::BTreeMap<String, Secret>,
    /// Contributed aggregates: no cell from fewer orgs than this (k-anonymity).
    pub min_orgs: u32,
    /// Contributed aggregates: the epsilon each org's ledger may spend in all.
    pub epsilon_budget: f64,
    /// Contributed aggregates: each org's value is clipped to [0, this] (in the metric's unit),
    /// which bounds what one org can change and so sets the noise's scale.
    pub aggregate_bound: f64,
    /// Contributed aggregates: the epsilon a call spends when it does not name one.
    pub aggregate_epsilon: f64,
    /// Contributed aggregates without noise when a call asks for none. Off by default: exact
    /// figures of overlapping cells can be subtracted to recover one org's exact value.
    pub exact_aggregates_reveal_orgs: bool,
    /// How often hourly rollups are brought up to date.
    pub rollup_every_ms: u64,
    /// How often retention is enforced.
    pub sweep_every_ms: u64,
    /// How often purges from the policies are checked for (they are also applied on every change).
    pub purge_check_every_ms: u64,
    /// Writer tasks per PostgreSQL store (SQLite has one writer).
    pub writers: usize,
    /// Query keys a URL keeps under BASIC sharing (their values scrubbed); every other key, the
    /// fragment and the non-id path segments are removed. Empty by default.
    pub url_query_keys: Vec<String>,
}

impl Default for CollectionSettings {
    fn default() -> Self {
        Self {
            locations: std::collections::BTreeMap::new(),
            min_orgs: 5,
            epsilon_budget: 10.0,
            aggregate_bound: 10_000.0,
            aggregate_epsilon: 1.0,
            exact_aggregates_reveal_orgs: false,
            rollup_every_ms: 30_000,
            sweep_every_ms: 3_600_000,
            purge_check_every_ms: 5_000,
            writers: 4,
            url_query_keys: Vec::new(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            log: LogSettings::default(),
            tls: None,
            limits: Limits::default(),
            service_token: None,
            service_token_file: None,
            linker: ServiceSettings::local(50051),
            consent: ServiceSettings::local(50052),
            collector: ServiceSettings::local(50053),
            insights: ServiceSettings::local(50054),
            console: ConsoleSettings::default(),
            collection: CollectionSettings::default(),
            residency: ResidencySettings::default(),
            analysis: AnalysisSettings::default(),
            scheduling: crate::sched::Scheduling::default(),
        }
    }
}

impl Settings {
    /// The service token `service` (e.g. "collector-svc") needs to call the others; the message
    /// says how to set it when it is missing.
    pub fn required_service_token(&self, service: &str) -> Result<Secret, String> {
        self.service_token
            .clone()
            .ok_or_else(|| format!("{service} needs service_token (SIGHTLINE_SERVICE_TOKEN)"))
    }

    /// Defaults, then `file` if given, then the environment; then the service token from
    /// `service_token_file` when it is not set itself.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let mut settings: Self = figment
            .merge(Env::prefixed("SIGHTLINE_").split("__"))
            .extract()
            .map_err(|e| SettingsError(Box::new(e)))?;
        if settings.service_token.is_none()
            && let Some(path) = &settings.service_token_file
        {
            let token = crate::secret_file::read_token(path, crate::token::TokenKind::Service)
                .map_err(|e| {
                    SettingsError(Box::new(figment::Error::from(format!(
                        "service_token_file {}: {e}",
                        path.display()
                    ))))
                })?;
            settings.service_token = Some(token);
        }
        Ok(settings)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceSettings {
    /// The address this service listens on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// `sqlite://…` or `postgres://…`; a SQLite file under the data directory when absent.
    pub database_url: Option<Secret>,
    /// How other services reach this one, e.g. `http://127.0.0.1:50051`.
    pub url: String,
    /// Where Prometheus scrapes `GET /metrics`, off the gRPC port; "off" for none.
    pub metrics_listen: String,
}

impl ServiceSettings {
    fn local(port: u16) -> Self {
        // 50051 → 9151, 50052 → 9152 …; port 0 (tests) → an ephemeral one.
        let metrics_port = if port == 0 { 0 } else { port - 50_051 + 9_151 };
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            database_url: None,
            url: format!("http://127.0.0.1:{port}"),
            metrics_listen: format!("127.0.0.1:{metrics_port}"),
        }
    }

    /// The metrics listener's address, or None when it is "off".
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.metrics_listen.trim() {
            "" | "off" => Ok(None),
            addr => addr
                .parse()
                .map(Some)
                .map_err(|e| format!("metrics_listen {addr:?}: {e}")),
        }
    }
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self::local(0)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info` or `info,linker_svc=debug`.
    pub level: String,
    /// Where to export trace spans over OTLP/gRPC, e.g. `http://otel-collector:4317`; off when unset.
    pub otlp_endpoint: Option<String>,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
            otlp_endpoint: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate they signed (mTLS).
    pub client_ca: Option<PathBuf>,
    /// PEM CA certificates a service trusts when it calls another service (the CA that signed the
    /// services' `cert`); defaults to `client_ca`. Calls between services then use TLS, and present
    /// `cert` as the client certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest message a service decodes or encodes.
    pub max_message_bytes: usize,
    /// Longest a call may run, whatever deadline the client asks for.
    pub request_timeout_ms: u64,
    /// Sustained calls per second per tenant (org, or credential when there is no org).
    pub rate_per_second: u32,
    /// Calls a tenant may make in a burst above the sustained rate.
    pub rate_burst: u32,
    /// On shutdown, how long in-flight calls may run on; connections still open then (a stalled
    /// client, a body that never arrives) are dropped and the service exits.
    pub drain_timeout_ms: u64,
    /// Failed authentications (unknown, revoked, expired tokens) one peer address may cause per
    /// second; past its burst, its calls with tokens not already known are refused before a lookup.
    pub auth_failures_per_second: u32,
    pub auth_failure_burst: u32,
    /// HTTP/2 keepalive on every channel between services and on every server: a ping after this
    /// long without traffic...
    pub keepalive_interval_ms: u64,
    /// ...unanswered for this long closes the connection, so a peer that went silent (a NAT, a load
    /// balancer's idle timeout, a firewall dropping packets) is detected within a bound and a
    /// stream over it is treated as lost.
    pub keepalive_timeout_ms: u64,
    /// How often consent-svc sends a heartbeat on every WatchPolicy stream.
    pub policy_heartbeat_ms: u64,
    /// The policy lease: an enforcement point (collector-svc, insights-svc) that has heard nothing
    /// on its WatchPolicy stream for this long fails closed (UNAVAILABLE, NOT_SERVING) until a new
    /// snapshot arrives. At least three heartbeat intervals.
    pub policy_lease_ms: u64,
}

impl Limits {
    /// The settings that must agree with each other.
    pub fn check(&self) -> Result<(), String> {
        if self.policy_lease_ms < 3 * self.policy_heartbeat_ms {
            return Err(format!(
                "limits.policy_lease_ms ({}) must be at least three heartbeat intervals (limits.policy_heartbeat_ms = {})",
                self.policy_lease_ms, self.policy_heartbeat_ms
            ));
        }
        if self.policy_heartbeat_ms == 0
            || self.keepalive_interval_ms == 0
            || self.keepalive_timeout_ms == 0
        {
            return Err("limits: heartbeat and keepalive intervals must be above zero".into());
        }
        Ok(())
    }

    pub fn keepalive_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.keepalive_interval_ms)
    }

    pub fn keepalive_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.keepalive_timeout_ms)
    }

    pub fn policy_heartbeat(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.policy_heartbeat_ms)
    }

    pub fn policy_lease(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.policy_lease_ms)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            request_timeout_ms: 30_000,
            rate_per_second: 1_000,
            rate_burst: 2_000,
            drain_timeout_ms: 10_000,
            auth_failures_per_second: 20,
            auth_failure_burst: 100,
            keepalive_interval_ms: 2_000,
            keepalive_timeout_ms: 3_000,
            policy_heartbeat_ms: 2_000,
            policy_lease_ms: 10_000,
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_with_no_file_and_no_environment() {
        figment::Jail::expect_with(|_| {
            let settings = Settings::load(None).map_err(|e| *e.0)?;
            assert_eq!(settings.linker.listen.port(), 50051);
            assert_eq!(settings.consent.listen.port(), 50052);
            assert_eq!(settings.collector.listen.port(), 50053);
            assert_eq!(settings.insights.listen.port(), 50054);
            assert_eq!(settings.data_dir, PathBuf::from("./data"));
            assert_eq!(settings.limits.max_message_bytes, 4 * 1024 * 1024);
            assert!(settings.tls.is_none());
            Ok(())
        });
    }

    #[test]
    fn file_then_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "sightline.toml",
                "data_dir = \"/var/lib/sightline\"\n[linker]\nlisten = \"0.0.0.0:6000\"\n",
            )?;
            jail.set_env("SIGHTLINE_LINKER__LISTEN", "127.0.0.1:7000");
            jail.set_env("SIGHTLINE_LOG__FORMAT", "json");
            let settings = Settings::load(Some(Path::new("sightline.toml"))).map_err(|e| *e.0)?;
            assert_eq!(settings.data_dir, PathBuf::from("/var/lib/sightline"));
            assert_eq!(settings.linker.listen.port(), 7000);
            assert_eq!(settings.log.format, LogFormat::Json);
            Ok(())
        });
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("slo_very_secret");
        assert!(!format!("{secret:?}").contains("very_secret"));
    }
}
