//! Manual uploads (SPEC I4): assessment files and support bundles arrive as client streams — a
//! header, then chunks — and are checked before anything is kept: the declared size against the
//! limit before the first chunk, every chunk against it, the total and the optional SHA-256 at the
//! end. An assessment (at most a few MiB) is parsed from memory; a bundle goes to a private
//! temporary file and is read from there as a zip, entry by entry, never whole in memory:
//!
//! - refused: a truncated or non-zip file, encrypted entries, compression other than stored or
//!   deflate, names that are absolute, climb out (`..`), hold a backslash or a NUL, symlinks,
//!   repeated names, entries outside `metrics/*.json` and `logs/`, more files than allowed, a file
//!   that expands more than the ratio allows or to more than its header says, and a total
//!   expansion over the limit (zip bombs);
//! - metrics files (the assessment format) are treated by the policy's field rules like an
//!   assessment; logs are scrubbed line by line of e-mail addresses, IP addresses, usernames and
//!   display names (`user=…`, `"displayName": "…"` and the like) and the event's own values;
//! - the scrubbed bundle is written as a new zip, then kept whole (renamed into place and synced)
//!   or not at all.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::Path;

use crate::error::InsightsError;
use prost_reflect::DynamicMessage;
use sha2::{Digest, Sha256};
use sightline_proto::classes;
use sightline_proto::common::v1::DataClass;
use sightline_proto::insights::v1 as pb;
use sightline_runtime::pseudonym::OrgPseudonymizer;
use sightline_runtime::scrub::{self, Finding, Secrets};

use crate::archive::{self, Kind};
pub use crate::archive::{BundleLimits, MAX_METRICS_FILE};
use crate::enforce::{self, FieldRules, Treated};
use crate::health::{HOUR_MS, Hour, Series};

pub const ASSESSMENT_FORMAT: &str = "sightline.assessment";
pub const BUNDLE_FORMAT: &str = "sightline.support-bundle";
/// Longer log lines are scrubbed in pieces of this size.
const MAX_LINE: usize = 64 * 1024;

/// One message of an upload stream.
#[derive(Debug)]
pub enum Part {
    Header(pb::UploadHeader),
    Chunk(Vec<u8>),
}

pub trait UploadMessage {
    fn part(self) -> Option<Part>;
}

impl UploadMessage for pb::UploadAssessmentRequest {
    fn part(self) -> Option<Part> {
        match self.part? {
            pb::upload_assessment_request::Part::Header(h) => Some(Part::Header(h)),
            pb::upload_assessment_request::Part::Chunk(c) => Some(Part::Chunk(c)),
        }
    }
}

impl UploadMessage for pb::UploadSupportBundleRequest {
    fn part(self) -> Option<Part> {
        match self.part? {
            pb::upload_support_bundle_request::Part::Header(h) => Some(Part::Header(h)),
            pb::upload_support_bundle_request::Part::Chunk(c) => Some(Part::Chunk(c)),
        }
    }
}

/// Checks a header against the expected format and the size limit.
pub fn check_header(
    header: &pb::UploadHeader,
    format: &str,
    limit: u64,
) -> Result<(), InsightsError> {
    if header.format != format {
        return Err(InsightsError::InvalidArgument(format!(
            "header.format: {:?} is not {format:?}",
            header.format
        )));
    }
    if header.format_version != 1 {
        return Err(InsightsError::InvalidArgument(format!(
            "header.format_version: {} is not a known version (1)",
            header.format_version
        )));
    }
    if header.size_bytes == 0 {
        return Err(InsightsError::InvalidArgument(
            "header.size_bytes: the file's size is required".to_owned(),
        ));
    }
    if header.size_bytes > limit {
        return Err(InsightsError::ResourceExhausted(format!(
            "header.size_bytes: {} bytes is over the limit of {limit}",
            header.size_bytes
        )));
    }
    if !header.sha256.is_empty()
        && (header.sha256.len() != 64
            || !header
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        return Err(InsightsError::InvalidArgument(
            "header.sha256: must be 64 lower-case hex digits".to_owned(),
        ));
    }
    if header.file_name.len() > 255 || header.file_name.contains(['/', '\\', '\0']) {
        return Err(InsightsError::InvalidArgument(
            "header.file_name: a plain file name of at most 255 bytes".to_owned(),
        ));
    }
    Ok(())
}

/// Counts and hashes what arrives, against the header's size.
#[derive(Debug)]
pub struct Tally {
    declared: u64,
    received: u64,
    hash: Sha256,
}

impl Tally {
    pub fn new(header: &pb::UploadHeader) -> Self {
        Self {
            declared: header.size_bytes,
            received: 0,
            hash: Sha256::new(),
        }
    }

    pub fn add(&mut self, chunk: &[u8]) -> Result<(), InsightsError> {
        self.received = self.received.saturating_add(chunk.len() as u64);
        if self.received > self.declared {
            return Err(InsightsError::ResourceExhausted(format!(
                "chunk: more than the {} bytes the header declared",
                self.declared
            )));
        }
        self.hash.update(chunk);
        Ok(())
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// Checks the total and the SHA-256; returns the file's hex SHA-256.
    pub fn finish(self, header: &pb::UploadHeader) -> Result<String, InsightsError> {
        if self.received != self.declared {
            return Err(InsightsError::InvalidArgument(format!(
                "header.size_bytes: {} bytes declared, {} received (truncated upload)",
                self.declared, self.received
            )));
        }
        let digest = hex::encode(self.hash.finalize());
        if !header.sha256.is_empty() && header.sha256 != digest {
            return Err(InsightsError::InvalidArgument(
                "header.sha256: does not match the file received".to_owned(),
            ));
        }
        Ok(digest)
    }
}

/// Parses an assessment file (the JSON form of the contract's Assessment); errors name the JSON
/// path.
pub fn parse_assessment(bytes: &[u8], origin: &str) -> Result<DynamicMessage, InsightsError> {
    let descriptor = assessment_descriptor()?;
    let text = std::str::from_utf8(bytes)
        .map_err(|_| InsightsError::InvalidArgument(format!("{origin}: is not UTF-8 text")))?;
    let mut json = serde_json::Deserializer::from_str(text);
    let mut track = serde_path_to_error::Track::new();
    let parsed = DynamicMessage::deserialize(
        descriptor,
        serde_path_to_error::Deserializer::new(&mut json, &mut track),
    )
    .map_err(|e| {
        InsightsError::InvalidArgument(format!(
            "{origin}: does not parse at {}: {e}",
            json_path(&track.path())
        ))
    })?;
    json.end()
        .map_err(|e| InsightsError::InvalidArgument(format!("{origin}: trailing data: {e}")))?;
    let format = parsed
        .get_field_by_name("format")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    if format != ASSESSMENT_FORMAT {
        return Err(InsightsError::InvalidArgument(format!(
            "{origin}: $.format is {format:?}, not {ASSESSMENT_FORMAT:?}"
        )));
    }
    let version = parsed
        .get_field_by_name("format_version")
        .and_then(|v| v.as_u32())
        .unwrap_or(0);
    if version != 1 {
        return Err(InsightsError::InvalidArgument(format!(
            "{origin}: $.formatVersion is {version}, not 1"
        )));
    }
    Ok(parsed)
}

fn json_path(path: &serde_path_to_error::Path) -> String {
    let text = path.to_string();
    if text.is_empty() || text == "." {
        "$".to_owned()
    } else {
        format!("$.{text}")
    }
}

/// The hourly rollups of an assessment's metric readings (each reading one sample).
pub fn series_of(metrics: &[pb::AssessmentMetric]) -> (Series, Option<i64>) {
    let mut samples: BTreeMap<(String, i64), Vec<f64>> = BTreeMap::new();
    let mut latest = None;
    for metric in metrics {
        let Some(at) = metric.at.as_ref() else {
            continue;
        };
        let at = sightline_runtime::time::from_proto(at);
        if metric.name.is_empty() || !metric.value.is_finite() {
            continue;
        }
        latest = Some(latest.map_or(at, |l: i64| l.max(at)));
        samples
            .entry((metric.name.clone(), at.div_euclid(HOUR_MS) * HOUR_MS))
            .or_default()
            .push(metric.value);
    }
    let mut series = Series::new();
    for ((name, hour_ms), mut values) in samples {
        values.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let r = (p * values.len() as f64).ceil() as usize;
            values[r.clamp(1, values.len()) - 1]
        };
        let hour = Hour {
            hour_ms,
            count: values.len() as u64,
            min: values[0],
            max: values[values.len() - 1],
            sum: values.iter().sum(),
            p50: rank(0.5),
            p95: rank(0.95),
        };
        series.entry(name).or_default().push(hour);
    }
    (series, latest)
}

/// What a checked and scrubbed bundle came to.
#[derive(Debug, Default)]
pub struct Bundle {
    pub files_read: u32,
    pub treated: Treated,
    /// The metric readings of its metrics files (treated), for its health.
    pub metrics: Vec<pb::AssessmentMetric>,
}

fn bad(message: String) -> InsightsError {
    InsightsError::InvalidArgument(message)
}

fn too_slow(limits: &BundleLimits) -> InsightsError {
    InsightsError::ResourceExhausted(format!(
        "checking and scrubbing the bundle took over {} s (analysis.max_bundle_check_ms)",
        limits.max_check.as_secs_f64()
    ))
}

/// Checks the zip in `input`, writes its scrubbed form to `output`. Blocking: run it off the
/// async threads.
pub fn process_bundle<R: Read + Seek, W: Write + Seek>(
    input: R,
    output: W,
    limits: BundleLimits,
    rules: &FieldRules,
    pseudonyms: Option<&OrgPseudonymizer>,
) -> Result<Bundle, InsightsError> {
    let archive::Survey {
        mut archive,
        entries: kinds,
    } = archive::survey(input, &limits).map_err(|refusal| match refusal {
        archive::Refusal::Invalid(message) => bad(message),
        archive::Refusal::TooLarge(message) => InsightsError::ResourceExhausted(message),
        archive::Refusal::Io(message) => {
            InsightsError::Internal(format!("reading the bundle: {message}"))
        }
    })?;
    let mut writer = zip::ZipWriter::new(output);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    let mut bundle = Bundle::default();
    let mut kept_names = HashSet::new();
    let deadline = std::time::Instant::now() + limits.max_check;
    for (index, (name, kind, size)) in kinds.into_iter().enumerate() {
        if kind == Kind::Directory {
            continue;
        }
        if std::time::Instant::now() >= deadline {
            return Err(too_slow(&limits));
        }
        let entry = archive
            .by_index(index)
            .map_err(|e| bad(format!("entry {name:?}: unreadable: {e}")))?;
        // Never more than the header said: a lying header is a bomb too.
        let mut limited = entry.take(size.saturating_add(1));
        // A file's name is kept only once scrubbed too (`logs/alice@acme.example.log`).
        let kept_name = scrub_text(&name, &mut bundle.treated);
        if !kept_names.insert(kept_name.clone()) {
            return Err(bad(format!(
                "entry {kept_name:?}: two entries have this name once personal data is removed"
            )));
        }
        writer
            .start_file(kept_name.as_str(), options)
            .map_err(|e| InsightsError::Internal(format!("writing the bundle: {e}")))?;
        let written = match kind {
            Kind::Metrics => {
                let mut text = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                limited
                    .read_to_end(&mut text)
                    .map_err(|e| bad(format!("entry {name:?}: truncated or corrupt: {e}")))?;
                let read = text.len() as u64;
                if read > size {
                    return Err(InsightsError::ResourceExhausted(format!(
                        "entry {name:?}: expands to more than its header says (zip bomb)"
                    )));
                }
                let parsed = parse_assessment(&text, &format!("entry {name:?}"))?;
                let (assessment, treated) = enforce::assessment(parsed, rules, pseudonyms)
                    .map_err(InsightsError::Internal)?;
                merge(&mut bundle.treated, &treated);
                let json = assessment_json(&assessment)?;
                writer
                    .write_all(json.as_bytes())
                    .map_err(|e| InsightsError::Internal(format!("writing the bundle: {e}")))?;
                bundle.metrics.extend(assessment.metrics);
                read
            }
            Kind::Log => {
                let read = match scrub_log(&mut limited, &mut writer, &mut bundle.treated, deadline)
                {
                    Ok(read) => read,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        return Err(too_slow(&limits));
                    }
                    Err(e) => {
                        return Err(bad(format!("entry {name:?}: truncated or corrupt: {e}")));
                    }
                };
                if read > size {
                    return Err(InsightsError::ResourceExhausted(format!(
                        "entry {name:?}: expands to more than its header says (zip bomb)"
                    )));
                }
                read
            }
            Kind::Directory => 0,
        };
        if written != size {
            return Err(bad(format!(
                "entry {name:?}: {written} bytes where the header says {size} (truncated)"
            )));
        }
        bundle.files_read += 1;
    }
    writer
        .finish()
        .map_err(|e| InsightsError::Internal(format!("writing the bundle: {e}")))?;
    Ok(bundle)
}

/// One line of a log (or a name) treated: every encoding undone first, so a person key written
/// as `&quot;displayName&quot;` or `user%3Dalice` is read as such; the values of person keys
/// replaced, and also removed wherever else they appear in the line; then e-mail addresses, IP
/// addresses and opaque runs as in EXTENDED free text (decoded and scrubbed, or replaced).
pub fn scrub_text(text: &str, treated: &mut Treated) -> String {
    // Person keys as written (a value may be JSON held in a string), then once decoded.
    let (raw_people, raw_users, raw_names, raw_values) = scrub_people_values(text);
    let (people, users, names, values) = match scrub::decode(&raw_people) {
        std::borrow::Cow::Borrowed(_) => (raw_people, 0, 0, Vec::new()),
        std::borrow::Cow::Owned(decoded) => scrub_people_values(&decoded),
    };
    let (users, names) = (users + raw_users, names + raw_names);
    treated.add_scrubbed(DataClass::Username, users);
    treated.add_scrubbed(DataClass::DisplayName, names);
    let mut secrets = Secrets::default();
    for value in raw_values.iter().chain(&values) {
        secrets.add(value);
    }
    let Some((clean, found)) = scrub::scrub(&people, &secrets) else {
        return if users + names > 0 {
            people
        } else {
            text.to_owned()
        };
    };
    for finding in found {
        let class = match finding {
            Finding::Email => DataClass::Email,
            Finding::Ip => DataClass::IpAddress,
            Finding::Secret | Finding::Opaque | Finding::Reduced => DataClass::FreeText,
        };
        treated.add_scrubbed(class, 1);
    }
    clean
}

fn merge(into: &mut Treated, from: &Treated) {
    for (class, n) in &from.removed {
        *into.removed.entry(*class).or_default() += n;
    }
    for (class, n) in &from.scrubbed {
        *into.scrubbed.entry(*class).or_default() += n;
    }
}

/// The canonical JSON form of a (treated) assessment.
pub fn assessment_json(assessment: &pb::Assessment) -> Result<String, InsightsError> {
    let mut message = DynamicMessage::new(assessment_descriptor()?);
    message
        .transcode_from(assessment)
        .map_err(|e| InsightsError::Internal(e.to_string()))?;
    serde_json::to_string_pretty(&message).map_err(|e| InsightsError::Internal(e.to_string()))
}

/// The contract's Assessment message, which parsing and field treatment walk.
pub fn assessment_descriptor() -> Result<prost_reflect::MessageDescriptor, InsightsError> {
    classes::pool()
        .map_err(|e| InsightsError::Internal(e.to_string()))?
        .get_message_by_name(classes::ASSESSMENT_MESSAGE)
        .ok_or_else(|| InsightsError::Internal("the contract has no Assessment".to_owned()))
}

/// Copies a log to `out` line by line, scrubbed; returns the bytes read.
fn scrub_log(
    input: &mut dyn Read,
    out: &mut dyn Write,
    treated: &mut Treated,
    deadline: std::time::Instant,
) -> std::io::Result<u64> {
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut line = Vec::with_capacity(1024);
    let mut read: u64 = 0;
    let mut lines: u32 = 0;
    loop {
        lines = lines.wrapping_add(1);
        if lines.is_multiple_of(256) && std::time::Instant::now() >= deadline {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        read += n as u64;
        let text = String::from_utf8_lossy(&line);
        let clean = scrub_text(&text, treated);
        out.write_all(clean.as_bytes())?;
    }
    // A trailing partial read of a lying entry is caught by the caller's size check.
    let _ = reader.fill_buf()?;
    Ok(read)
}

/// Keys whose values name a person in logs: (key, replacement, is a display name).
const PEOPLE_KEYS: [(&str, bool); 12] = [
    ("username", false),
    ("user_name", false),
    ("userkey", false),
    ("user_key", false),
    ("login", false),
    ("user", false),
    ("author", false),
    ("assignee", false),
    ("reporter", false),
    ("displayname", true),
    ("display_name", true),
    ("fullname", true),
];

/// Replaces the values of person keys (`user=alice`, `"displayName": "Alice Liddell"`,
/// `username: bob`) with markers; returns the line and the counts (usernames, display names).
pub fn scrub_people(line: &str) -> (String, u32, u32) {
    let (out, users, names, _) = scrub_people_values(line);
    (out, users, names)
}

/// [`scrub_people`], with the values it replaced.
fn scrub_people_values(line: &str) -> (String, u32, u32, Vec<String>) {
    let lower = line.to_ascii_lowercase();
    let bytes = line.as_bytes();
    let mut spans: Vec<(usize, usize, bool)> = Vec::new();
    for (key, display) in PEOPLE_KEYS {
        let mut from = 0;
        while let Some(found) = lower[from..].find(key) {
            let start = from + found;
            from = start + key.len();
            // A whole key: not the tail of a longer word.
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            let mut at = start + key.len();
            if bytes
                .get(at)
                .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
            {
                continue;
            }
            if bytes.get(at) == Some(&b'"') {
                at += 1;
            }
            while bytes.get(at) == Some(&b' ') {
                at += 1;
            }
            if !matches!(bytes.get(at), Some(b'=' | b':')) {
                continue;
            }
            at += 1;
            while bytes.get(at) == Some(&b' ') {
                at += 1;
            }
            let (value_start, value_end) = match bytes.get(at) {
                Some(q @ (b'"' | b'\'')) => {
                    // The closing quote: one not escaped by a backslash.
                    let mut close = at + 1;
                    while close < bytes.len() && (bytes[close] != *q || bytes[close - 1] == b'\\') {
                        close += 1;
                    }
                    (at + 1, close)
                }
                // A structure (`{…}`, `[…]`) held as the value: all of it, up to a space.
                Some(b'{' | b'[') => {
                    let end = line[at..]
                        .find(char::is_whitespace)
                        .map_or(line.len(), |i| at + i);
                    (at, end)
                }
                _ => {
                    let end = line[at..]
                        .find(|c: char| {
                            c.is_whitespace()
                                || matches!(c, ',' | '&' | ';' | ']' | ')' | '}' | '"')
                        })
                        .map_or(line.len(), |i| at + i);
                    (at, end)
                }
            };
            let value = &line[value_start..value_end];
            if value_end > value_start
                && value != "[username]"
                && value != "[display-name]"
                && !spans
                    .iter()
                    .any(|(s, e, _)| value_start < *e && *s < value_end)
            {
                spans.push((value_start, value_end, display));
            }
        }
    }
    if spans.is_empty() {
        return (line.to_owned(), 0, 0, Vec::new());
    }
    spans.sort_unstable();
    let values = spans
        .iter()
        .map(|(start, end, _)| line[*start..*end].to_owned())
        .collect();
    let (mut users, mut names) = (0, 0);
    let mut out = String::with_capacity(line.len());
    let mut at = 0;
    for (start, end, display) in spans {
        out.push_str(&line[at..start]);
        if display {
            names += 1;
            out.push_str("[display-name]");
        } else {
            users += 1;
            out.push_str("[username]");
        }
        at = end;
    }
    out.push_str(&line[at..]);
    (out, users, names, values)
}

/// Moves a finished file into place durably: synced, renamed, its directory synced.
pub fn keep_file(file: tempfile::NamedTempFile, path: &Path) -> std::io::Result<()> {
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
