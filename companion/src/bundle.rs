//! `support-bundle` (SPEC K4): a support.zip that insights-svc's UploadSupportBundle accepts —
//! `metrics/assessment.json` in the assessment format (the instance, its guardrail counts and a
//! fresh host sample with the inbox's pending metrics) and the product's logs under `logs/`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use prost_reflect::DynamicMessage;
use sightline_proto::classes;
use sightline_proto::collector::v1::event::Payload;
use sightline_proto::common::v1::InstanceMetadata;
use sightline_proto::insights::v1::{Assessment, AssessmentMetric, EntityCounts};

use crate::sampler::{self, HostSampler, now_ms};
use crate::vault::LinkState;

/// The canonical proto3 JSON of `message`, whose full name is `name`.
pub fn canonical_json(message: &impl prost::Message, name: &str) -> anyhow::Result<String> {
    let descriptor = classes::pool()?
        .get_message_by_name(name)
        .ok_or_else(|| anyhow::anyhow!("the contract has no {name}"))?;
    let mut dynamic = DynamicMessage::new(descriptor);
    dynamic.transcode_from(message)?;
    Ok(serde_json::to_string_pretty(&dynamic)?)
}

/// The assessment a bundle carries.
pub fn assessment(state: Option<&LinkState>, inbox: &Path, home: &Path) -> Assessment {
    let at = now_ms();
    let mut counts = EntityCounts::default();
    if let Ok(events) = sampler::guardrails(inbox, at) {
        for event in events {
            if let Some(Payload::Metric(m)) = event.payload {
                let value = m.value.max(0.0) as u64;
                match m.name.trim_start_matches("guardrail.") {
                    "projects" => counts.projects = value,
                    "issues" => counts.issues = value,
                    "custom_fields" => counts.custom_fields = value,
                    "workflows" => counts.workflows = value,
                    "users" => counts.users = value,
                    "spaces" => counts.spaces = value,
                    "apps" => counts.apps = value,
                    "groups" => counts.groups = value,
                    _ => {}
                }
            }
        }
    }
    let mut events = HostSampler::new(None, home).sample(at);
    for path in sampler::inbox_files(inbox) {
        events.extend(sampler::peek_inbox(&path, 10_000));
    }
    let metrics = events
        .into_iter()
        .filter_map(|e| match e.payload {
            Some(Payload::Metric(m)) => Some(AssessmentMetric {
                name: m.name,
                r#type: m.r#type,
                at: e.occurred_at,
                value: m.value,
                unit: m.unit,
                attributes: m.attributes,
                tags: m.tags,
                values: m.values,
            }),
            _ => None,
        })
        .collect();
    Assessment {
        format: "sightline.assessment".into(),
        format_version: 1,
        generated_at: Some(sampler::timestamp(at)),
        instance: state.map(|s| InstanceMetadata {
            server_id: s.server_id.clone(),
            base_url: s.base_url.clone(),
            product: s.product.clone(),
            version: s.version.clone(),
            ..Default::default()
        }),
        counts: Some(counts),
        metrics,
        ..Default::default()
    }
}

/// Log files to include: regular files directly under `logs_dir`, by name.
fn log_files(logs_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(logs_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !p.is_symlink())
        .collect();
    files.sort();
    files
}

/// Writes the bundle to `out` whole (a temporary file renamed over); returns its size.
pub fn write(
    out: &Path,
    assessment: &Assessment,
    logs_dir: &Path,
    progress: &mut crate::progress::Progress,
) -> anyhow::Result<u64> {
    let tmp = out.with_extension("zip.tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("metrics/assessment.json", options)?;
    zip.write_all(canonical_json(assessment, classes::ASSESSMENT_MESSAGE)?.as_bytes())?;
    let logs = log_files(logs_dir);
    zip.add_directory("logs/", options)?;
    let total = logs.len() as u64;
    for (i, path) in logs.iter().enumerate() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        zip.start_file(format!("logs/{name}"), options)?;
        let mut input = std::fs::File::open(path)?;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = input.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            zip.write_all(&buffer[..n])?;
        }
        progress.update(i as u64 + 1, total, "log files", &name);
    }
    let file = zip.finish()?;
    file.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(std::fs::metadata(out)?.len())
}
