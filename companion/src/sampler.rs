//! What the companion collects: host and process metrics read from /proc every sample interval, the
//! product's own metrics dropped as JSON lines into the inbox folder, and its guardrail counts.
//!
//! Inbox protocol: the product writes `NAME.jsonl.tmp` and renames it to `NAME.jsonl` when complete
//! (only `*.jsonl` files are read). Each line is one metric:
//! `{"name": "jvm.cpu.load", "value": 63.5, "unit": "percent", "type": "JMX_METRIC",
//!   "at": "2026-11-27T10:00:00Z", "attributes": {}, "tags": {}, "values": {}, "periodic": true}`
//! (`name` and `value` required; `at` defaults to the file's modification time; `periodic` to true).
//! A file is deleted once its lines are in the spool. Event ids are derived from the file's name,
//! modification time, line number and text, so a file read twice (a crash between spooling and
//! deleting it) gives the same ids and the collector stores it once; they start with the time and
//! line, so they grow in order.
//! `guardrails.json` in the inbox holds counts by name (`{"projects": 412}`); it is read each
//! guardrail interval and sent as `guardrail.<name>` GUARDRAILS metrics (periodic: the hourly
//! series is rolled up like the 2-minute samples, and insights-svc's guardrail rules read it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sightline_proto::collector::v1::{Event, MetricEvent, event::Payload};
use sightline_proto::common::v1::MetricType;

pub const GUARDRAILS_FILE: &str = "guardrails.json";

/// Milliseconds as a protobuf timestamp (the runtime's conversion).
pub use sightline_runtime::time::to_proto as timestamp;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn metric_event(id: String, at_ms: i64, metric: MetricEvent) -> Event {
    Event {
        event_id: id,
        occurred_at: Some(timestamp(at_ms)),
        payload: Some(Payload::Metric(metric)),
    }
}

fn system_metric(name: &str, value: f64, unit: &str) -> MetricEvent {
    MetricEvent {
        name: name.to_owned(),
        r#type: MetricType::SystemMetric as i32,
        value,
        unit: unit.to_owned(),
        periodic_sample: true,
        ..Default::default()
    }
}

/// CPU time counters from the first line of /proc/stat.
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

fn cpu_times() -> Option<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

fn meminfo() -> HashMap<String, u64> {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((key.to_owned(), kb * 1024))
        })
        .collect()
}

fn process_status(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    Some((utime + stime) / ticks)
}

/// Samples the host and one process (the product's, or the companion's own).
#[derive(Debug)]
pub struct HostSampler {
    pid: u32,
    disk_path: PathBuf,
    last_cpu: Option<CpuTimes>,
}

impl HostSampler {
    pub fn new(pid: Option<u32>, disk_path: &Path) -> Self {
        Self {
            pid: pid.unwrap_or_else(std::process::id),
            disk_path: disk_path.to_path_buf(),
            last_cpu: cpu_times(),
        }
    }

    /// One sample of every host and process metric, as METRIC events stamped `at_ms`.
    pub fn sample(&mut self, at_ms: i64) -> Vec<Event> {
        let mut metrics = Vec::new();
        if let Ok(load) = std::fs::read_to_string("/proc/loadavg")
            && let Some(one) = load.split_whitespace().next().and_then(|v| v.parse().ok())
        {
            metrics.push(system_metric("host.cpu.load1", one, "load"));
        }
        if let (Some(before), Some(now)) = (self.last_cpu, cpu_times()) {
            let total = now.total.saturating_sub(before.total);
            if total > 0 {
                let busy = now.busy.saturating_sub(before.busy) as f64;
                metrics.push(system_metric(
                    "host.cpu.used_percent",
                    100.0 * busy / total as f64,
                    "percent",
                ));
            }
            self.last_cpu = Some(now);
        }
        let mem = meminfo();
        if let (Some(&total), Some(&available)) = (mem.get("MemTotal"), mem.get("MemAvailable"))
            && total > 0
        {
            let used = total.saturating_sub(available);
            metrics.push(system_metric(
                "host.memory.used_bytes",
                used as f64,
                "bytes",
            ));
            metrics.push(system_metric(
                "host.memory.used_percent",
                100.0 * used as f64 / total as f64,
                "percent",
            ));
        }
        if let Ok(fs) = rustix::fs::statvfs(&self.disk_path) {
            let total = fs.f_blocks.saturating_mul(fs.f_frsize);
            let free = fs.f_bavail.saturating_mul(fs.f_frsize);
            if total > 0 {
                metrics.push(system_metric("host.disk.free_bytes", free as f64, "bytes"));
                metrics.push(system_metric(
                    "host.disk.used_percent",
                    100.0 * (total.saturating_sub(free)) as f64 / total as f64,
                    "percent",
                ));
            }
        }
        if let Ok(nr) = std::fs::read_to_string("/proc/sys/fs/file-nr")
            && let Some(open) = nr.split_whitespace().next().and_then(|v| v.parse().ok())
        {
            metrics.push(system_metric("host.open_files", open, "count"));
        }
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", self.pid)) {
            metrics.push(system_metric(
                "process.open_files",
                fds.count() as f64,
                "count",
            ));
        }
        if let Some(rss) = process_status(self.pid, "VmRSS:") {
            metrics.push(system_metric(
                "process.memory.rss_bytes",
                rss as f64,
                "bytes",
            ));
        }
        if let Some(cpu) = process_cpu_seconds(self.pid) {
            metrics.push(system_metric("process.cpu.seconds", cpu, "seconds"));
        }
        metrics
            .into_iter()
            .map(|m| metric_event(uuid::Uuid::now_v7().to_string(), at_ms, m))
            .collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxLine {
    name: String,
    value: f64,
    #[serde(default)]
    unit: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    attributes: HashMap<String, String>,
    #[serde(default)]
    tags: HashMap<String, String>,
    #[serde(default)]
    values: HashMap<String, f64>,
    #[serde(default)]
    periodic: Option<bool>,
}

fn metric_type(name: Option<&str>) -> Result<MetricType, String> {
    let Some(name) = name else {
        return Ok(MetricType::JmxMetric);
    };
    let full = if name.starts_with("METRIC_TYPE_") {
        name.to_owned()
    } else {
        format!("METRIC_TYPE_{name}")
    };
    match MetricType::from_str_name(&full) {
        Some(MetricType::Unspecified) | None => Err(format!("unknown type {name:?}")),
        Some(t) => Ok(t),
    }
}

/// Lines the inbox could not read: the first few with why, and how many in all.
#[derive(Debug, Default)]
pub struct InboxErrors {
    pub first: Vec<String>,
    pub count: u64,
}

impl InboxErrors {
    fn push(&mut self, message: String) {
        self.count += 1;
        if self.first.len() < 10 {
            self.first.push(message);
        }
    }
}

/// The longest inbox line read; a longer one is skipped and named.
pub const MAX_LINE: usize = 64 * 1024;

/// The complete inbox files, oldest name first.
pub fn inbox_files(inbox: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(inbox)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl") && p.is_file())
        .collect();
    files.sort();
    files
}

/// Reads one inbox file line by line (never whole: a file may be large), handing its events to
/// `each` in chunks of at most `chunk` events. Ids are derived from where each line is.
pub fn read_inbox(
    path: &Path,
    chunk: usize,
    each: &mut dyn FnMut(Vec<Event>) -> std::io::Result<()>,
) -> std::io::Result<InboxErrors> {
    use std::io::BufRead;
    let file = std::fs::File::open(path)?;
    let modified_ns = file
        .metadata()?
        .modified()
        .ok()
        .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
    let mut events = Vec::new();
    let mut errors = InboxErrors::default();
    let mut raw = Vec::with_capacity(1024);
    let mut i = 0usize;
    loop {
        raw.clear();
        let n =
            std::io::Read::take(&mut reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut raw)?;
        if n == 0 {
            break;
        }
        i += 1;
        let where_ = format!("{name}:{i}");
        if raw.last() != Some(&b'\n') && raw.len() > MAX_LINE {
            errors.push(format!("{where_}: longer than {MAX_LINE} bytes"));
            // Skip the rest of the line.
            loop {
                raw.clear();
                let n = std::io::Read::take(&mut reader, MAX_LINE as u64)
                    .read_until(b'\n', &mut raw)?;
                if n == 0 || raw.last() == Some(&b'\n') {
                    break;
                }
            }
            continue;
        }
        let Ok(line) = std::str::from_utf8(&raw) else {
            errors.push(format!("{where_}: not UTF-8"));
            continue;
        };
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        match inbox_event(line, &name, modified_ns, i - 1) {
            Ok(event) => events.push(event),
            Err(e) => errors.push(format!("{where_}: {e}")),
        }
        if events.len() >= chunk {
            each(std::mem::take(&mut events))?;
        }
    }
    if !events.is_empty() {
        each(events)?;
    }
    Ok(errors)
}

/// Up to `limit` events of an inbox file, for a preview or a bundle.
pub fn peek_inbox(path: &Path, limit: usize) -> Vec<Event> {
    let mut out = Vec::new();
    let _ = read_inbox(path, 1000, &mut |events| {
        let room = limit.saturating_sub(out.len());
        out.extend(events.into_iter().take(room));
        Ok(())
    });
    out
}

fn inbox_event(line: &str, name: &str, modified_ns: u128, index: usize) -> Result<Event, String> {
    let parsed: InboxLine = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let kind = metric_type(parsed.kind.as_deref()).map_err(|e| format!("type: {e}"))?;
    let at_ms = match &parsed.at {
        Some(at) => {
            let ts = at
                .parse::<prost_types::Timestamp>()
                .map_err(|_| format!("at: not an RFC 3339 time: {at:?}"))?;
            sightline_runtime::time::from_proto(&ts)
        }
        None => (modified_ns / 1_000_000) as i64,
    };
    let mut digest = Sha256::new();
    digest.update(name.as_bytes());
    digest.update(modified_ns.to_le_bytes());
    digest.update((index as u64).to_le_bytes());
    digest.update(line.as_bytes());
    // Time-ordered (the file's modification time, then the line), so the collector's id index
    // grows at its end instead of at random places; the digest tells apart files written in the
    // same nanosecond. 3 + 16 + 1 + 8 + 1 + 24 = 53 characters.
    let id = format!(
        "in-{:016x}-{:08x}-{}",
        modified_ns as u64,
        index as u32,
        &hex::encode(digest.finalize())[..24]
    );
    Ok(metric_event(
        id,
        at_ms,
        MetricEvent {
            name: parsed.name,
            r#type: kind as i32,
            value: parsed.value,
            attributes: parsed.attributes,
            tags: parsed.tags,
            unit: parsed.unit,
            periodic_sample: parsed.periodic.unwrap_or(true),
            values: parsed.values,
        },
    ))
}

/// The guardrail counts in the inbox's `guardrails.json`, as GUARDRAILS metrics stamped `at_ms`.
pub fn guardrails(inbox: &Path, at_ms: i64) -> Result<Vec<Event>, String> {
    let path = inbox.join(GUARDRAILS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let counts: std::collections::BTreeMap<String, f64> = serde_json::from_str(&text)
        .map_err(|e| format!("{}: counts by name expected: {e}", path.display()))?;
    Ok(counts
        .into_iter()
        .map(|(name, count)| {
            metric_event(
                uuid::Uuid::now_v7().to_string(),
                at_ms,
                MetricEvent {
                    name: format!("guardrail.{name}"),
                    r#type: MetricType::Guardrails as i32,
                    value: count,
                    unit: "count".into(),
                    // An hourly series: rolled up, so the guardrail health rules see it.
                    periodic_sample: true,
                    ..Default::default()
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_host_sample_reads_proc() {
        let dir = tempfile::tempdir().unwrap();
        let mut sampler = HostSampler::new(None, dir.path());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let events = sampler.sample(now_ms());
        let names: Vec<String> = events
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::Metric(m)) => Some(m.name.clone()),
                _ => None,
            })
            .collect();
        for name in [
            "host.cpu.load1",
            "host.memory.used_percent",
            "host.disk.used_percent",
            "host.open_files",
            "process.open_files",
            "process.memory.rss_bytes",
        ] {
            assert!(names.contains(&name.to_owned()), "{name} in {names:?}");
        }
    }

    #[test]
    fn inbox_lines_get_stable_ids_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let long = format!("{{\"name\":\"{}\",\"value\":1}}", "x".repeat(MAX_LINE));
        std::fs::write(
            &path,
            format!(
                "{{\"name\":\"jvm.cpu.load\",\"value\":63.5,\"unit\":\"percent\",\"at\":\"2026-11-27T10:00:00Z\"}}\n\
                 {{\"name\":\"x\"}}\n\
                 {{\"name\":\"y\",\"value\":1,\"type\":\"NOPE\"}}\n\
                 {long}\n\
                 {{\"name\":\"z\",\"value\":2}}\n"
            ),
        )
        .unwrap();
        let mut chunks = Vec::new();
        let errors = read_inbox(&path, 1, &mut |events| {
            chunks.push(events);
            Ok(())
        })
        .unwrap();
        assert_eq!(chunks.len(), 2, "one event per chunk");
        assert_eq!(chunks[0][0].event_id, peek_inbox(&path, 10)[0].event_id);
        assert_eq!(chunks[0][0].occurred_at.unwrap().seconds, 1_795_773_600);
        assert_eq!(errors.count, 3);
        assert!(
            errors.first[0].starts_with("a.jsonl:2: missing field `value`"),
            "{:?}",
            errors.first
        );
        assert!(errors.first[1].contains("a.jsonl:3: type"));
        assert!(errors.first[2].contains("a.jsonl:4: longer than"));
        assert_eq!(peek_inbox(&path, 1).len(), 1);
    }
}
