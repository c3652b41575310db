//! The companion's commands. Output never holds a secret: keys and credentials are named by their
//! prefix at most.

use std::fmt::Write as _;

use futures::StreamExt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sightline_proto::collector::v1::collector_service_client::CollectorServiceClient;
use sightline_proto::collector::v1::{DropReason, Event, PreviewSampleRequest, event::Payload};
use sightline_proto::common::v1::InstanceMetadata;
use sightline_proto::consent::v1::GetPolicyRequest;
use sightline_proto::consent::v1::consent_service_client::ConsentServiceClient;
use sightline_proto::insights::v1::insights_service_client::InsightsServiceClient;
use sightline_proto::insights::v1::{
    UploadHeader, UploadSupportBundleRequest, upload_support_bundle_request::Part,
};
use sightline_proto::linker::v1::LinkInstanceRequest;
use sightline_proto::linker::v1::linker_service_client::LinkerServiceClient;
use sightline_runtime::Secret;
use sightline_runtime::token::{self, TokenKind};

use crate::client::{authed, channel, unary};
use crate::progress::Progress;
use crate::run::{Agent, RunOptions};
use crate::sampler::{self, HostSampler, now_ms};
use crate::spool;
use crate::status::{self, PolicyView, RunStatus, StatusReport};
use crate::vault::{self, Endpoints, Home, LinkState, Secrets};

/// Where `link` reads the link key from.
#[derive(Debug)]
pub enum KeySource {
    Arg(String),
    File(PathBuf),
    Stdin,
}

/// What `link` tells linker-svc about the instance.
#[derive(Debug)]
pub struct LinkArgs {
    pub server_id: String,
    pub base_url: String,
    pub product: String,
    pub version: String,
    pub license_sen: String,
}

fn read_key(source: KeySource) -> anyhow::Result<Secret> {
    let raw = match source {
        KeySource::Arg(key) => key,
        KeySource::File(path) => std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("link key file {}: {e}", path.display()))?,
        KeySource::Stdin => {
            let mut key = String::new();
            std::io::stdin().read_to_string(&mut key)?;
            key
        }
    };
    let key = raw.trim().to_owned();
    // A typo fails here, without a call: the key's checksum does not match.
    match token::parse(&key) {
        Ok(parsed) if parsed.kind == TokenKind::LinkKey => Ok(Secret::new(key)),
        Ok(parsed) => anyhow::bail!(
            "that is a {}, not a link key (link keys start with {})",
            parsed.kind.noun(),
            TokenKind::LinkKey.prefix()
        ),
        Err(e) => anyhow::bail!("that is not a link key: {e}"),
    }
}

/// How long a command waits out refusals that say when to come back (UNAVAILABLE: a service
/// without its policies yet, an org's data moving).
const PATIENCE: Duration = Duration::from_secs(60);

/// Links the instance and keeps its secrets in the vault; returns what to print.
pub async fn link(
    home: &Home,
    key: KeySource,
    args: LinkArgs,
    endpoints: Endpoints,
) -> anyhow::Result<String> {
    let key = read_key(key)?;
    // Refuse a key file others may read before the key is spent.
    if home.key_file().exists() {
        vault::load_key(home, false)?;
    }
    let mut linker = LinkerServiceClient::new(channel(&endpoints.linker, endpoints.ca.as_deref())?);
    // A refusal that says when to come back (linker-svc has no policy yet, or the org's data
    // moves) is retried for a while: nothing was linked, or linking again finishes it.
    let request = LinkInstanceRequest {
        metadata: Some(InstanceMetadata {
            server_id: args.server_id.clone(),
            base_url: args.base_url.clone(),
            product: args.product.clone(),
            version: args.version.clone(),
            license_sen: args.license_sen.clone(),
            ..Default::default()
        }),
        app_links: Vec::new(),
    };
    let linked = crate::client::patiently(PATIENCE, async || {
        linker.link_instance(unary(&key, request.clone())).await
    })
    .await
    .map_err(|status| {
        anyhow::anyhow!(
            "linker-svc refused the link: {:?}: {}",
            status.code(),
            status.message()
        )
    })?
    .into_inner();
    let instance = linked
        .instance
        .ok_or_else(|| anyhow::anyhow!("linker-svc returned no instance"))?;
    let expires = linked
        .link_key_expires_at
        .as_ref()
        .map_or(0, sightline_runtime::time::from_proto);
    let state = LinkState {
        org_id: instance.org_id.clone(),
        instance_id: instance.instance_id.clone(),
        server_id: args.server_id,
        base_url: args.base_url,
        product: args.product,
        version: args.version,
        link_key_id: instance.link_key_id.clone(),
        link_key_prefix: token::display_prefix(key.expose()),
        link_key_expires_at_ms: expires,
        linked_at_ms: now_ms(),
        endpoints,
    };
    let relinked = vault::load_state(home).is_ok();
    vault::store_link(
        home,
        &state,
        &Secrets {
            link_key: key.expose().to_owned(),
            credential: linked.credential,
        },
    )?;
    tracing::info!(org_id = %state.org_id, instance_id = %state.instance_id, relinked, "linked");
    Ok(format!(
        "{} instance {} of org {}\nlink key {}… expires {}\nthe link key and the instance credential are in {} (encrypted; key file {})\nnext: sightline-companion run",
        if relinked { "re-linked" } else { "linked" },
        state.instance_id,
        state.org_id,
        state.link_key_prefix,
        status::rfc3339(expires),
        home.vault_file().display(),
        home.key_file().display(),
    ))
}

/// Opens the vault and runs until `stop`.
pub async fn run(
    home: &Home,
    options: RunOptions,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (state, secrets) = vault::open(home)?;
    tracing::info!(org_id = %state.org_id, instance_id = %state.instance_id, "companion running");
    Agent::new(home.clone(), state, secrets.credential(), options)?
        .run(stop)
        .await
}

/// What `status` reports.
pub fn status(home: &Home) -> StatusReport {
    // The vault is opened once; when it does not open, the public facts still say what they can.
    let (state, opened) = match vault::open(home) {
        Ok((state, _)) => (Some(state), Ok(())),
        Err(e) => (vault::load_state(home).ok(), Err(e.to_string())),
    };
    let opened = match &state {
        Some(_) => opened,
        None => Err("not linked".into()),
    };
    let run = RunStatus::load(home);
    status::report(
        state.as_ref(),
        opened,
        &run,
        spool::usage(&home.spool_dir()),
        now_ms(),
    )
}

/// The events the next upload would send (oldest spooled first), the inbox's pending lines, and a
/// fresh host sample: at most 1000.
fn next_events(home: &Home, inbox: &Path) -> Vec<Event> {
    let mut events = Vec::new();
    for path in spool::files_in(&home.spool_dir()).unwrap_or_default() {
        if let Ok(batch) = spool::read(&path) {
            events.extend(batch.events);
        }
        if events.len() >= 1000 {
            break;
        }
    }
    for path in sampler::inbox_files(inbox) {
        let room = 1000usize.saturating_sub(events.len());
        events.extend(sampler::peek_inbox(&path, room));
    }
    events.extend(HostSampler::new(None, &home.dir).sample(now_ms()));
    events.truncate(1000);
    events
}

fn describe(event: &Event) -> String {
    match &event.payload {
        Some(Payload::Metric(m)) => format!("metric {} = {} {}", m.name, m.value, m.unit),
        Some(Payload::InstanceMetadata(_)) => "instance metadata".into(),
        Some(Payload::FeatureUsage(f)) => format!("feature usage {}", f.feature),
        Some(Payload::PageView(_)) => "page view".into(),
        Some(Payload::ClientMetric(c)) => format!("client metric {}", c.name),
        Some(Payload::AppInventory(a)) => format!("app inventory ({} apps)", a.apps.len()),
        None => "empty event".into(),
    }
}

/// `sample`: the collector's preview of what would be sent now, readable or as JSON.
pub async fn sample(home: &Home, inbox: &Path, json: bool) -> anyhow::Result<String> {
    let (state, secrets) = vault::open(home)?;
    let credential = secrets.credential();
    let ca = state.endpoints.ca.as_deref();
    let events = next_events(home, inbox);
    let mut collector = CollectorServiceClient::new(channel(&state.endpoints.collector, ca)?)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    // The collector refuses until it holds the org's policy (just after linking, say): wait.
    let preview = crate::client::patiently(PATIENCE, async || {
        collector
            .preview_sample(unary(
                &credential,
                PreviewSampleRequest {
                    events: events.clone(),
                    ..Default::default()
                },
            ))
            .await
    })
    .await
    .map_err(|s| anyhow::anyhow!("collector-svc: {:?}: {}", s.code(), s.message()))?
    .into_inner();
    if json {
        return Ok(crate::bundle::canonical_json(
            &preview,
            "sightline.collector.v1.PreviewSampleResponse",
        )? + "\n");
    }
    let mut consent = ConsentServiceClient::new(channel(&state.endpoints.consent, ca)?);
    let policy = consent
        .get_policy(unary(&credential, GetPolicyRequest::default()))
        .await
        .ok()
        .and_then(|r| r.into_inner().policy)
        .map(|p| PolicyView::of(&p, now_ms()));
    let mut out = String::new();
    match &policy {
        Some(p) => writeln!(
            out,
            "policy: usage {}, sharing {} (consent version {})",
            p.usage_level, p.sharing_level, p.consent_version
        )?,
        None => writeln!(out, "policy: could not be read")?,
    }
    if policy.as_ref().is_some_and(PolicyView::disabled) {
        writeln!(out, "collection is DISABLED: nothing would be sent")?;
    }
    let kept = preview.events.iter().filter(|e| e.kept).count();
    writeln!(
        out,
        "{} event(s) would be sent: {kept} stored, {} dropped\n",
        preview.events.len(),
        preview.events.len() - kept
    )?;
    for (event, previewed) in events.iter().zip(&preview.events) {
        let shown = previewed.stored.as_ref().unwrap_or(event);
        let at = shown.occurred_at.map(|t| t.to_string()).unwrap_or_default();
        if previewed.kept {
            writeln!(out, "stored   {}  at {at}", describe(shown))?;
            if let Some(Payload::Metric(m)) = &shown.payload {
                for (k, v) in &m.attributes {
                    writeln!(out, "           attribute {k} = {v}")?;
                }
                for (k, v) in &m.tags {
                    writeln!(out, "           tag {k} = {v}")?;
                }
            }
        } else {
            let reason = DropReason::try_from(previewed.drop_reason)
                .map(|r| {
                    r.as_str_name()
                        .trim_start_matches("DROP_REASON_")
                        .to_owned()
                })
                .unwrap_or_default();
            writeln!(
                out,
                "dropped  {} ({reason}) {}",
                describe(event),
                previewed.message
            )?;
        }
        for (label, fields) in [
            ("removed", &previewed.removed_fields),
            ("pseudonymized", &previewed.hashed_fields),
            ("scrubbed", &previewed.scrubbed_fields),
        ] {
            if !fields.is_empty() {
                writeln!(out, "           {label}: {}", fields.join(", "))?;
            }
        }
    }
    Ok(out)
}

/// `support-bundle`: writes the zip, and uploads it when asked.
pub async fn support_bundle(
    home: &Home,
    out: &Path,
    logs_dir: &Path,
    inbox: &Path,
    upload: bool,
) -> anyhow::Result<String> {
    let linked = vault::open(home);
    let state = linked.as_ref().ok().map(|(s, _)| s.clone());
    let assessment = crate::bundle::assessment(state.as_ref(), inbox, &home.dir);
    let mut progress = Progress::new("writing support bundle");
    let size = crate::bundle::write(out, &assessment, logs_dir, &mut progress)?;
    let mut text = format!("wrote {} ({size} bytes)", out.display());
    if !upload {
        return Ok(text);
    }
    let (state, secrets) = linked?;
    // Streamed from the file, never held whole: a bundle of logs may be large.
    let mut digest = Sha256::new();
    let mut file = std::fs::File::open(out)?;
    let size = std::io::copy(&mut file, &mut digest)?;
    let digest = hex::encode(digest.finalize());
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "support.zip".into());
    let header = UploadSupportBundleRequest {
        part: Some(Part::Header(UploadHeader {
            file_name,
            size_bytes: size,
            sha256: digest,
            format: "sightline.support-bundle".into(),
            format_version: 1,
            ..Default::default()
        })),
    };
    const CHUNK: usize = 256 * 1024;
    let total = size.div_ceil(CHUNK as u64);
    let file = tokio::fs::File::open(out).await?;
    let progress = Progress::new("uploading support bundle");
    let chunks = futures::stream::unfold(
        (file, progress, 0u64),
        move |(mut file, mut progress, sent)| async move {
            use tokio::io::AsyncReadExt;
            let mut buffer = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match file.read(&mut buffer[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    // The stream ends short; the service refuses a bundle shorter than its header.
                    Err(_) => break,
                }
            }
            if filled == 0 {
                return None;
            }
            buffer.truncate(filled);
            let sent = sent + 1;
            progress.update(sent, total, "chunks", "");
            Some((
                UploadSupportBundleRequest {
                    part: Some(Part::Chunk(buffer)),
                },
                (file, progress, sent),
            ))
        },
    );
    let parts = futures::stream::iter([header]).chain(chunks);
    let mut insights = InsightsServiceClient::new(channel(
        &state.endpoints.insights,
        state.endpoints.ca.as_deref(),
    )?);
    let reply = insights
        .upload_support_bundle(authed(&secrets.credential(), parts))
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "insights-svc refused the bundle: {:?}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    write!(
        text,
        "\nuploaded as {} ({} files read, {} personal data item(s) scrubbed)",
        reply.upload_id, reply.files_read, reply.items_scrubbed
    )?;
    Ok(text)
}
