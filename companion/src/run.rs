//! `run`: follow the policy, sample, spool, upload.
//!
//! - The policy comes first: GetPolicy with the instance's own credential, then WatchPolicy, so an
//!   opt-out reaches the companion as it happens. Until a policy was read (now, or by an earlier run
//!   and kept in `status.json`), nothing is collected; nothing is uploaded without a live one.
//! - Each sample interval: host and process metrics from /proc and the inbox's complete JSON-lines
//!   files; each guardrail interval: the guardrail counts. Only kinds the policy allows.
//! - Each upload interval (and at start when a backlog waits): the spool's files go to the collector
//!   over one IngestStream, a file per batch, four in flight; a file is deleted when its ack says
//!   committed. Failures back off with jitter and honour `retry-after-ms`.
//! - DISABLED deletes the spool; a purge deletes spooled events of the kinds it names that were
//!   collected before it was issued; kinds the policy does not allow are never kept.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sightline_proto::collector::v1::collector_service_client::CollectorServiceClient;
use sightline_proto::collector::v1::{
    Event, IngestStreamRequest, InstanceMetadataEvent, event::Payload,
};
use sightline_proto::common::v1::{EventKind, InstanceMetadata, NodeInfo};
use sightline_proto::consent::v1::consent_service_client::ConsentServiceClient;
use sightline_proto::consent::v1::{GetPolicyRequest, Policy, PurgeScope, WatchPolicyRequest};
use sightline_runtime::Secret;
use sightline_runtime::time::from_proto;
use tokio::sync::{mpsc, watch};
use tonic::Code;
use tonic::transport::Channel;

use crate::client::{Backoff, authed, retry_hint, unary};
use crate::progress::Progress;
use crate::sampler::{self, HostSampler, now_ms};
use crate::spool::{self, Spool};
use crate::status::{PolicyView, RunStatus};
use crate::vault::{Home, LinkState};

/// How long the policy stream may bring nothing (consent-svc heartbeats every
/// `limits.policy_heartbeat_ms`, 2 s by default) before it is treated as lost and opened again.
mod upload;

const POLICY_SILENCE: Duration = Duration::from_secs(30);

/// How `run` paces itself.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub sample_every: Duration,
    pub upload_every: Duration,
    pub guardrails_every: Duration,
    pub spool_max_bytes: u64,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long an upload waits for the collector's next ack before it gives the round up (and
    /// retries after the backoff).
    pub ack_timeout: Duration,
    /// The product's process to sample (default: the companion's own).
    pub pid: Option<u32>,
    pub inbox: PathBuf,
}

/// The kind of an event, by its payload.
pub fn kind_of(event: &Event) -> EventKind {
    match &event.payload {
        Some(Payload::InstanceMetadata(_)) => EventKind::InstanceMetadata,
        Some(Payload::Metric(_)) => EventKind::Metric,
        Some(Payload::FeatureUsage(_)) => EventKind::FeatureUsage,
        Some(Payload::PageView(_)) => EventKind::PageView,
        Some(Payload::ClientMetric(_)) => EventKind::ClientMetric,
        Some(Payload::AppInventory(_)) => EventKind::AppInventory,
        None => EventKind::Unspecified,
    }
}

/// What the spool may keep under `policy` for `instance_id`: the policy's view is made once, not
/// per event.
pub fn keeps<'a>(policy: &'a Policy, instance_id: &'a str) -> impl Fn(&Event) -> bool + 'a {
    let view = PolicyView::of(policy, 0);
    move |event| {
        let kind = kind_of(event);
        if !view.allows(kind) {
            return false;
        }
        let occurred = event.occurred_at.as_ref().map_or(0, from_proto);
        !policy.purges.iter().any(|purge| {
            let ours = purge.scope == PurgeScope::Org as i32
                || (purge.scope == PurgeScope::Instance as i32 && purge.instance_id == instance_id);
            let issued = purge.issued_at.as_ref().map_or(i64::MAX, from_proto);
            ours && purge.delete_kinds.contains(&(kind as i32)) && occurred <= issued
        })
    }
}

/// The instance's metadata event, from the link and the host.
pub fn metadata_event(state: &LinkState, at_ms: i64) -> Event {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get() as u32);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at: Some(sampler::timestamp(at_ms)),
        payload: Some(Payload::InstanceMetadata(InstanceMetadataEvent {
            metadata: Some(InstanceMetadata {
                server_id: state.server_id.clone(),
                base_url: state.base_url.clone(),
                product: state.product.clone(),
                version: state.version.clone(),
                node_count: 1,
                nodes: vec![NodeInfo {
                    node_id: host,
                    cpu_count: cpus,
                    memory_bytes: memory,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

/// How an upload round ended.
#[derive(Debug)]
pub enum UploadEnd {
    /// Everything sealed was acknowledged (or there was nothing).
    Done { batches: u64, events: u64 },
    /// Try again after the backoff (at least `hint`).
    Retry {
        hint: Option<Duration>,
        reason: String,
    },
    /// The credential is no longer accepted: link again.
    Rejected(String),
}

#[derive(Debug)]
pub struct Agent {
    pub home: Home,
    pub state: LinkState,
    credential: Secret,
    pub spool: Arc<Mutex<Spool>>,
    pub status: Arc<Mutex<RunStatus>>,
    collector: CollectorServiceClient<Channel>,
    consent: ConsentServiceClient<Channel>,
    options: RunOptions,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Agent {
    pub fn new(
        home: Home,
        state: LinkState,
        credential: Secret,
        options: RunOptions,
    ) -> anyhow::Result<Self> {
        let ca = state.endpoints.ca.as_deref();
        let collector = crate::client::channel(&state.endpoints.collector, ca)?;
        let consent = crate::client::channel(&state.endpoints.consent, ca)?;
        let spool = Spool::open(&home.spool_dir(), options.spool_max_bytes)?;
        let status = RunStatus::load(&home);
        Ok(Self {
            home,
            state,
            credential,
            spool: Arc::new(Mutex::new(spool)),
            status: Arc::new(Mutex::new(status)),
            collector: CollectorServiceClient::new(collector)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
            consent: ConsentServiceClient::new(consent),
            options,
        })
    }

    fn record<R>(&self, change: impl FnOnce(&mut RunStatus) -> R) -> R {
        let mut status = lock(&self.status);
        let out = change(&mut status);
        status.save(&self.home, now_ms());
        out
    }

    /// Like `record`, but writes `status.json` at most every half second: an upload's counters
    /// change with every ack, and the file is what `status` shows, not what anything relies on.
    /// The round's end writes it whatever.
    fn record_soon(&self, change: impl FnOnce(&mut RunStatus)) {
        let mut status = lock(&self.status);
        change(&mut status);
        let now = now_ms();
        if now - status.updated_at_ms >= 500 {
            status.save(&self.home, now);
        }
    }

    /// Follows the instance's policy: GetPolicy, then WatchPolicy, again after any break (a stream
    /// that brings nothing, not even a heartbeat, for [`POLICY_SILENCE`] is one).
    async fn follow_policy(&self, tx: mpsc::Sender<Policy>) {
        let mut backoff = Backoff::new(self.options.initial_backoff, self.options.max_backoff);
        loop {
            let mut consent = self.consent.clone();
            let outcome: Result<(), tonic::Status> = async {
                let policy = consent
                    .get_policy(unary(&self.credential, GetPolicyRequest::default()))
                    .await?
                    .into_inner()
                    .policy
                    .ok_or_else(|| tonic::Status::internal("GetPolicy returned no policy"))?;
                let _ = tx.send(policy).await;
                let mut stream = consent
                    .watch_policy(authed(&self.credential, WatchPolicyRequest::default()))
                    .await?
                    .into_inner();
                backoff.reset();
                // consent-svc sends a heartbeat every few seconds: a stream silent for longer
                // than POLICY_SILENCE has lost its path, and is opened again.
                loop {
                    let next = tokio::time::timeout(POLICY_SILENCE, stream.message())
                        .await
                        .map_err(|_| {
                            tonic::Status::unavailable("the policy stream went silent")
                        })??;
                    let Some(message) = next else { break };
                    if let Some(policy) = message.policy {
                        let _ = tx.send(policy).await;
                    }
                }
                Err(tonic::Status::unavailable("the policy stream ended"))
            }
            .await;
            if let Err(status) = outcome {
                let rejected = matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied
                );
                self.record(|s| {
                    s.error(
                        if rejected {
                            format!(
                                "consent-svc refused the credential ({}): link again",
                                status.message()
                            )
                        } else {
                            format!("policy from consent-svc: {}", status.message())
                        },
                        now_ms(),
                    )
                });
                tokio::time::sleep(backoff.next(retry_hint(&status))).await;
            }
        }
    }

    /// Acts on a policy: keeps it, and deletes spooled events it no longer allows.
    fn apply_policy(&self, policy: &Policy) -> anyhow::Result<PolicyView> {
        let view = PolicyView::of(policy, now_ms());
        let instance_id = self.state.instance_id.clone();
        let removed = lock(&self.spool).retain(keeps(policy, &instance_id))?;
        if removed > 0 {
            tracing::info!(removed, usage = %view.usage_level, "spooled events the policy no longer allows deleted");
        }
        let changed = self.record(|s| {
            let changed = s
                .policy
                .as_ref()
                .is_none_or(|p| p.revision != view.revision);
            s.purged_events_total += removed;
            s.policy = Some(view.clone());
            changed
        });
        if changed {
            tracing::info!(
                usage = %view.usage_level,
                sharing = %view.sharing_level,
                consent_version = view.consent_version,
                "policy"
            );
        }
        Ok(view)
    }

    /// Appends allowed events to the spool, counting what the bound dropped.
    fn spool_events(&self, events: Vec<Event>, policy: &PolicyView) -> anyhow::Result<()> {
        let events: Vec<Event> = events
            .into_iter()
            .filter(|e| policy.allows(kind_of(e)))
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        let dropped = lock(&self.spool).append(&events)?;
        if dropped > 0 {
            self.record(|s| {
                s.dropped_events_total += dropped;
                s.error(
                    format!(
                        "the spool reached its bound of {} bytes: {dropped} oldest event(s) dropped ({} in all)",
                        self.options.spool_max_bytes, s.dropped_events_total
                    ),
                    now_ms(),
                );
            });
        }
        Ok(())
    }

    /// One sample tick: host metrics and complete inbox files, spooled; inbox files then deleted.
    fn sample(&self, host: &mut HostSampler, policy: &PolicyView) -> anyhow::Result<()> {
        if !policy.allows(EventKind::Metric) {
            // Nothing may be collected: the product's files are not read (and not kept).
            return Ok(());
        }
        self.spool_events(host.sample(now_ms()), policy)?;
        let mut errors = sampler::InboxErrors::default();
        for path in sampler::inbox_files(&self.options.inbox) {
            // Spooled in batches as read; the file goes only when all of it is in the spool (read
            // again after a crash, its lines have the same ids and are stored once).
            let read = sampler::read_inbox(&path, spool::FILE_EVENTS, &mut |events| {
                self.spool_events(events, policy)
                    .map_err(|e| std::io::Error::other(format!("{e:#}")))
            })?;
            std::fs::remove_file(&path)?;
            errors.count += read.count;
            errors.first.extend(read.first);
        }
        if errors.count > 0 {
            self.record(|s| {
                s.inbox_errors_total += errors.count;
                s.error(
                    format!(
                        "{} inbox line(s) skipped; first: {}",
                        errors.count,
                        errors.first.first().map_or("", String::as_str)
                    ),
                    now_ms(),
                );
            });
        }
        Ok(())
    }

    /// Runs until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let (policy_tx, mut policy_rx) = mpsc::channel::<Policy>(16);
        let follower = {
            let this = this.clone();
            tokio::spawn(async move { this.follow_policy(policy_tx).await })
        };
        // The last policy an earlier run read: enough to go on spooling while consent-svc is away,
        // never to upload.
        let remembered = lock(&this.status).policy.clone();
        let (live_tx, live_rx) = watch::channel(remembered.map(|view| Live { view, live: false }));
        let uploader = tokio::spawn(this.clone().upload_loop(live_rx));
        let mut host = HostSampler::new(this.options.pid, &this.home.dir);
        let mut sample = tokio::time::interval(this.options.sample_every);
        let mut guardrails = tokio::time::interval(this.options.guardrails_every);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        guardrails.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut metadata_sent = false;
        let current =
            |rx: &watch::Sender<Option<Live>>| rx.borrow().as_ref().map(|l| l.view.clone());
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some(p) = policy_rx.recv() => {
                    let view = match this.apply_policy(&p) {
                        Ok(view) => view,
                        Err(e) => {
                            // The spool could not be cleaned: nothing is collected or sent until
                            // it can be (the next policy message, or a restart, tries again).
                            this.record(|s| s.error(format!("applying the policy to the spool: {e:#}"), now_ms()));
                            live_tx.send_replace(None);
                            continue;
                        }
                    };
                    if !metadata_sent && view.allows(EventKind::InstanceMetadata) {
                        match this.spool_events(vec![metadata_event(&this.state, now_ms())], &view) {
                            Ok(()) => metadata_sent = true,
                            Err(e) => this.record(|s| s.error(format!("spooling: {e:#}"), now_ms())),
                        }
                    }
                    let first = live_tx.send_replace(Some(Live { view, live: true })).is_none();
                    if first {
                        // Nothing could be sampled before a policy was known: sample now.
                        sample.reset_immediately();
                        guardrails.reset_immediately();
                    }
                }
                _ = sample.tick() => {
                    if let Some(p) = current(&live_tx)
                        && let Err(e) = this.sample(&mut host, &p)
                    {
                        // A full disk, say: recorded, and tried again at the next tick.
                        this.record(|s| s.error(format!("sampling: {e:#}"), now_ms()));
                    }
                }
                _ = guardrails.tick() => {
                    if let Some(p) = current(&live_tx) && p.allows(EventKind::Metric) {
                        let spooled = sampler::guardrails(&this.options.inbox, now_ms())
                            .map_err(anyhow::Error::msg)
                            .and_then(|events| this.spool_events(events, &p));
                        if let Err(e) = spooled {
                            this.record(|s| s.error(format!("guardrails: {e:#}"), now_ms()));
                        }
                    }
                }
            }
        }
        follower.abort();
        uploader.abort();
        lock(&this.spool).seal();
        Ok(())
    }
}

/// IngestStreams an upload round uses at once, and batches each may have unacknowledged.
const STREAMS: usize = 4;
const WINDOW: usize = 2;

/// What the streams of one upload round share.
struct Round {
    queue: Mutex<VecDeque<PathBuf>>,
    progress: Mutex<Option<Progress>>,
    total: u64,
    /// Batches and events acknowledged.
    done: Mutex<(u64, u64)>,
}

/// The policy the companion acts on, and whether consent-svc gave it in this run (only a live
/// policy allows uploads).
#[derive(Debug, Clone)]
pub struct Live {
    pub view: PolicyView,
    pub live: bool,
}

fn uploads_allowed(policy: &Option<Live>) -> bool {
    policy
        .as_ref()
        .is_some_and(|l| l.live && !l.view.disabled())
}

fn ack_accepted(result: &Option<sightline_proto::collector::v1::IngestResult>) -> u64 {
    result.as_ref().map_or(0, |r| u64::from(r.accepted))
}

fn status_end(status: tonic::Status) -> UploadEnd {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => UploadEnd::Rejected(format!(
            "the collector refused the credential ({}): link again",
            status.message()
        )),
        _ => UploadEnd::Retry {
            hint: retry_hint(&status),
            reason: format!("{:?}: {}", status.code(), status.message()),
        },
    }
}

#[cfg(test)]
mod tests;
