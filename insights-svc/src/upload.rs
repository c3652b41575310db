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

use prost_reflect::DynamicMessage;
use sha2::{Digest, Sha256};
use sightline_proto::classes;
use sightline_proto::common::v1::DataClass;
use sightline_proto::insights::v1 as pb;
use sightline_runtime::pseudonym::OrgPseudonymizer;
use sightline_runtime::scrub::{self, Finding, Secrets};
use tonic::Status;

use crate::archive::{self, Kind};
pub use crate::archive::{BundleLimits, MAX_METRICS_FILE};
use crate::health::{HOUR_MS, Hour, Series};
use crate::treat::{self, FieldRules, Treated};

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
pub fn check_header(header: &pb::UploadHeader, format: &str, limit: u64) -> Result<(), Status> {
    if header.format != format {
        return Err(Status::invalid_argument(format!(
            "header.format: {:?} is not {format:?}",
            header.format
        )));
    }
    if header.format_version != 1 {
        return Err(Status::invalid_argument(format!(
            "header.format_version: {} is not a known version (1)",
            header.format_version
        )));
    }
    if header.size_bytes == 0 {
        return Err(Status::invalid_argument(
            "header.size_bytes: the file's size is required",
        ));
    }
    if header.size_bytes > limit {
        return Err(Status::resource_exhausted(format!(
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
        return Err(Status::invalid_argument(
            "header.sha256: must be 64 lower-case hex digits",
        ));
    }
    if header.file_name.len() > 255 || header.file_name.contains(['/', '\\', '\0']) {
        return Err(Status::invalid_argument(
            "header.file_name: a plain file name of at most 255 bytes",
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

    pub fn add(&mut self, chunk: &[u8]) -> Result<(), Status> {
        self.received = self.received.saturating_add(chunk.len() as u64);
        if self.received > self.declared {
            return Err(Status::resource_exhausted(format!(
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
    pub fn finish(self, header: &pb::UploadHeader) -> Result<String, Status> {
        if self.received != self.declared {
            return Err(Status::invalid_argument(format!(
                "header.size_bytes: {} bytes declared, {} received (truncated upload)",
                self.declared, self.received
            )));
        }
        let digest = hex::encode(self.hash.finalize());
        if !header.sha256.is_empty() && header.sha256 != digest {
            return Err(Status::invalid_argument(
                "header.sha256: does not match the file received",
            ));
        }
        Ok(digest)
    }
}

/// Parses an assessment file (the JSON form of the contract's Assessment); errors name the JSON
/// path.
pub fn parse_assessment(bytes: &[u8], origin: &str) -> Result<DynamicMessage, Status> {
    let descriptor = assessment_descriptor()?;
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Status::invalid_argument(format!("{origin}: is not UTF-8 text")))?;
    let mut json = serde_json::Deserializer::from_str(text);
    let mut track = serde_path_to_error::Track::new();
    let parsed = DynamicMessage::deserialize(
        descriptor,
        serde_path_to_error::Deserializer::new(&mut json, &mut track),
    )
    .map_err(|e| {
        Status::invalid_argument(format!(
            "{origin}: does not parse at {}: {e}",
            json_path(&track.path())
        ))
    })?;
    json.end()
        .map_err(|e| Status::invalid_argument(format!("{origin}: trailing data: {e}")))?;
    let format = parsed
        .get_field_by_name("format")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    if format != ASSESSMENT_FORMAT {
        return Err(Status::invalid_argument(format!(
            "{origin}: $.format is {format:?}, not {ASSESSMENT_FORMAT:?}"
        )));
    }
    let version = parsed
        .get_field_by_name("format_version")
        .and_then(|v| v.as_u32())
        .unwrap_or(0);
    if version != 1 {
        return Err(Status::invalid_argument(format!(
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

fn bad(message: String) -> Status {
    Status::invalid_argument(message)
}

fn too_slow(limits: &BundleLimits) -> Status {
    Status::resource_exhausted(format!(
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
) -> Result<Bundle, Status> {
    let archive::Survey {
        mut archive,
        entries: kinds,
    } = archive::survey(input, &limits).map_err(|refusal| match refusal {
        archive::Refusal::Invalid(message) => bad(message),
        archive::Refusal::TooLarge(message) => Status::resource_exhausted(message),
        archive::Refusal::Io(message) => Status::internal(format!("reading the bundle: {message}")),
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
            .map_err(|e| Status::internal(format!("writing the bundle: {e}")))?;
        let written = match kind {
            Kind::Metrics => {
                let mut text = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                limited
                    .read_to_end(&mut text)
                    .map_err(|e| bad(format!("entry {name:?}: truncated or corrupt: {e}")))?;
                let read = text.len() as u64;
                if read > size {
                    return Err(Status::resource_exhausted(format!(
                        "entry {name:?}: expands to more than its header says (zip bomb)"
                    )));
                }
                let parsed = parse_assessment(&text, &format!("entry {name:?}"))?;
                let (assessment, treated) =
                    treat::assessment(parsed, rules, pseudonyms).map_err(Status::internal)?;
                merge(&mut bundle.treated, &treated);
                let json = assessment_json(&assessment)?;
                writer
                    .write_all(json.as_bytes())
                    .map_err(|e| Status::internal(format!("writing the bundle: {e}")))?;
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
                    return Err(Status::resource_exhausted(format!(
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
        .map_err(|e| Status::internal(format!("writing the bundle: {e}")))?;
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
pub fn assessment_json(assessment: &pb::Assessment) -> Result<String, Status> {
    let mut message = DynamicMessage::new(assessment_descriptor()?);
    message
        .transcode_from(assessment)
        .map_err(|e| Status::internal(e.to_string()))?;
    serde_json::to_string_pretty(&message).map_err(|e| Status::internal(e.to_string()))
}

/// The contract's Assessment message, which parsing and field treatment walk.
pub fn assessment_descriptor() -> Result<prost_reflect::MessageDescriptor, Status> {
    classes::pool()
        .map_err(|e| Status::internal(e.to_string()))?
        .get_message_by_name(classes::ASSESSMENT_MESSAGE)
        .ok_or_else(|| Status::internal("the contract has no Assessment"))
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
mod tests {
    use super::*;
    use std::io::Cursor;

    fn limits() -> BundleLimits {
        BundleLimits {
            max_expanded: 64 * 1024 * 1024,
            max_ratio: 200,
            max_files: 100,
            max_check: std::time::Duration::from_secs(60),
        }
    }

    fn all_keep() -> FieldRules {
        FieldRules::from_rules(
            &classes::all_classes()
                .into_iter()
                .map(|c| sightline_proto::consent::v1::FieldRule {
                    data_class: c as i32,
                    action: sightline_proto::common::v1::FieldAction::Keep as i32,
                })
                .collect::<Vec<_>>(),
        )
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        let mut writer = zip::ZipWriter::new(&mut out);
        for (name, body) in entries {
            writer
                .start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            writer.write_all(body).unwrap();
        }
        writer.finish().unwrap();
        out.into_inner()
    }

    /// Two entries named alike (a writer refuses to make one: the second name is patched).
    fn duplicated() -> Vec<u8> {
        let mut bytes = zip_of(&[("logs/a.log", b"x"), ("logs/b.log", b"y")]);
        let from = b"logs/b.log";
        let mut at = 0;
        while let Some(i) = bytes[at..].windows(from.len()).position(|w| w == from) {
            bytes[at + i..at + i + from.len()].copy_from_slice(b"logs/a.log");
            at += i + from.len();
        }
        bytes
    }

    /// Where a central-directory record points: an entry's local header, or the first byte of
    /// its data (inside it).
    #[derive(Clone, Copy)]
    enum At {
        Entry(usize),
        DataOf(usize),
    }

    /// An archive built byte by byte: `locals` are (name, method, data) written as local entries;
    /// `records` are central-directory records (name, method, where they point, sizes) — several
    /// may point at one entry, inside one, or disagree with it.
    struct Raw<'a> {
        locals: Vec<(&'a str, u16, Vec<u8>)>,
        records: Vec<(&'a str, u16, At, u32, u32)>,
    }

    /// A stored entry's local header followed by its data.
    fn local_entry(name: &str, method: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"PK\x03\x04");
        out.extend_from_slice(&20u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // flags
        out.extend_from_slice(&method.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // time, date
        out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        out
    }

    impl Raw<'_> {
        fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            let mut offsets = Vec::new();
            for (name, method, data) in &self.locals {
                offsets.push(out.len() as u32);
                out.extend_from_slice(&local_entry(name, *method, data));
            }
            let directory = out.len() as u32;
            for (name, method, at, packed, size) in &self.records {
                let offset = match *at {
                    At::Entry(i) => offsets[i],
                    At::DataOf(i) => offsets[i] + 30 + self.locals[i].0.len() as u32,
                };
                out.extend_from_slice(b"PK\x01\x02");
                out.extend_from_slice(&20u16.to_le_bytes());
                out.extend_from_slice(&20u16.to_le_bytes());
                out.extend_from_slice(&0u16.to_le_bytes());
                out.extend_from_slice(&method.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
                // Nothing is expanded before the checks refuse: the CRC is not looked at.
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&packed.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&(name.len() as u16).to_le_bytes());
                out.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
                out.extend_from_slice(&0o100_644u32.wrapping_shl(16).to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(name.as_bytes());
            }
            let size = out.len() as u32 - directory;
            let count = self.records.len() as u16;
            out.extend_from_slice(b"PK\x05\x06");
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&directory.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out
        }
    }

    fn refused(bytes: Vec<u8>) -> String {
        let mut out = Cursor::new(Vec::new());
        let status =
            process_bundle(Cursor::new(bytes), &mut out, limits(), &all_keep(), None).unwrap_err();
        assert!(
            out.into_inner().is_empty(),
            "nothing is written for a refused bundle"
        );
        status.message().to_owned()
    }

    #[test]
    fn a_bundle_costs_no_more_time_than_its_budget() {
        let log = "a line\n".repeat(1_000);
        let mut out = Cursor::new(Vec::new());
        let limits = BundleLimits {
            max_check: std::time::Duration::ZERO,
            ..limits()
        };
        let refused = process_bundle(
            Cursor::new(zip_of(&[("logs/a.log", log.as_bytes())])),
            &mut out,
            limits,
            &all_keep(),
            None,
        )
        .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("analysis.max_bundle_check_ms"));
    }

    #[test]
    fn many_records_pointing_at_one_entry_are_refused_before_anything_expands() {
        // The better zip bomb: 90 records (under the test's 100 files), one stored 64 KiB entry:
        // each record alone passes the per-entry ratio, and their declared total stays under the
        // bundle's limit.
        let data = vec![b'a'; 64 * 1024];
        let names: Vec<String> = (0..90).map(|i| format!("logs/{i}.log")).collect();
        let raw = Raw {
            locals: vec![(names[0].as_str(), 0, data.clone())],
            records: names
                .iter()
                .map(|n| {
                    (
                        n.as_str(),
                        0,
                        At::Entry(0),
                        data.len() as u32,
                        data.len() as u32,
                    )
                })
                .collect(),
        };
        let message = refused(raw.bytes());
        assert!(
            message.contains("local header names another file") || message.contains("overlap"),
            "{message}"
        );
        // The same with every record naming the one entry's own name is caught as a repeat; and
        // records that agree with distinct local entries but overlap are caught as overlap.
        let overlapping = Raw {
            locals: vec![
                ("logs/a.log", 0, data.clone()),
                ("logs/b.log", 0, b"b".to_vec()),
            ],
            records: vec![
                (
                    "logs/a.log",
                    0,
                    At::Entry(0),
                    data.len() as u32,
                    data.len() as u32,
                ),
                (
                    "logs/a.log",
                    0,
                    At::Entry(0),
                    data.len() as u32,
                    data.len() as u32,
                ),
            ],
        };
        assert!(refused(overlapping.bytes()).contains("twice"));
    }

    #[test]
    fn entries_whose_bytes_overlap_are_refused() {
        // logs/a.log's stored data *is* logs/b.log's local entry: both records agree with the
        // headers they point at, and their bytes overlap.
        let inner = local_entry("logs/b.log", 0, b"hello");
        let outer = inner.len() as u32;
        let message = refused(
            Raw {
                locals: vec![("logs/a.log", 0, inner)],
                records: vec![
                    ("logs/a.log", 0, At::Entry(0), outer, outer),
                    ("logs/b.log", 0, At::DataOf(0), 5, 5),
                ],
            }
            .bytes(),
        );
        assert!(message.contains("overlap"), "{message}");
    }

    #[test]
    fn a_local_header_that_disagrees_with_its_record_is_refused() {
        let data = b"line\n".to_vec();
        let len = data.len() as u32;
        let renamed = Raw {
            locals: vec![("logs/x.log", 0, data.clone())],
            records: vec![("logs/a.log", 0, At::Entry(0), len, len)],
        };
        assert!(refused(renamed.bytes()).contains("names another file"));
        let resized = Raw {
            locals: vec![("logs/a.log", 0, data.clone())],
            records: vec![("logs/a.log", 0, At::Entry(0), len, len + 1)],
        };
        let message = refused(resized.bytes());
        assert!(
            message.contains("sizes") || message.contains("expands"),
            "{message}"
        );
        let remethod = Raw {
            locals: vec![("logs/a.log", 0, data.clone())],
            records: vec![("logs/a.log", 8, At::Entry(0), len, len)],
        };
        assert!(refused(remethod.bytes()).contains("compression method"));
    }

    #[test]
    fn names_that_twin_or_cannot_be_extracted_are_refused_naming_the_entry() {
        let long = format!("logs/{}.log", "n".repeat(300));
        let deep = format!("logs/{}x.log", "abcdefghij/".repeat(400));
        for (names, expect) in [
            (
                vec!["logs/caf\u{e9}.log", "logs/cafe\u{301}.log"],
                "Unicode-normalized",
            ),
            (vec!["logs/App.log", "logs/app.log"], "case-folded"),
            (
                vec!["logs/app.log", "logs/app.log/inner.log"],
                "both a file and a directory",
            ),
            (vec![long.as_str()], "name component"),
            (vec![deep.as_str()], "at most 1024"),
        ] {
            let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (*n, &b"x\n"[..])).collect();
            let message = refused(zip_of(&entries));
            assert!(message.contains(expect), "{names:?}: {message}");
            assert!(message.contains("entry"), "{message}");
        }
    }

    fn process(bytes: Vec<u8>) -> Result<(Bundle, Vec<u8>), Status> {
        let mut out = Cursor::new(Vec::new());
        let bundle = process_bundle(Cursor::new(bytes), &mut out, limits(), &all_keep(), None)?;
        Ok((bundle, out.into_inner()))
    }

    const METRICS: &str = r#"{"format": "sightline.assessment", "formatVersion": 1,
      "metrics": [{"name": "jvm.cpu.load", "at": "2026-11-20T09:00:00Z", "value": 91.5, "unit": "percent"}]}"#;

    #[test]
    fn a_good_bundle_is_scrubbed_and_counted() {
        let log = b"2026-11-20 INFO login ok user=alice from 10.0.0.7\n\
                    2026-11-20 WARN {\"displayName\": \"Alice Liddell\", \"mail\": \"alice@acme.example\"}\n";
        let (bundle, out) = process(zip_of(&[
            ("metrics/jira.json", METRICS.as_bytes()),
            ("logs/atlassian-jira.log", log),
        ]))
        .unwrap();
        assert_eq!(bundle.files_read, 2);
        assert_eq!(bundle.metrics.len(), 1);
        let mut kept = zip::ZipArchive::new(Cursor::new(out)).unwrap();
        let mut text = String::new();
        kept.by_name("logs/atlassian-jira.log")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        for planted in [
            "alice@acme.example",
            "10.0.0.7",
            "Alice Liddell",
            "user=alice",
        ] {
            assert!(!text.contains(planted), "{planted} survived: {text}");
        }
        let scrubbed = &bundle.treated.scrubbed;
        assert_eq!(scrubbed.get(&(DataClass::Email as i32)), Some(&1));
        assert_eq!(scrubbed.get(&(DataClass::IpAddress as i32)), Some(&1));
        assert_eq!(scrubbed.get(&(DataClass::Username as i32)), Some(&1));
        assert_eq!(scrubbed.get(&(DataClass::DisplayName as i32)), Some(&1));
    }

    #[test]
    fn unsafe_bundles_are_refused_with_the_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (zip_of(&[("../evil.log", b"x")]), "not a safe relative path"),
            (
                zip_of(&[("logs/../../evil", b"x")]),
                "not a safe relative path",
            ),
            (zip_of(&[("/etc/passwd", b"x")]), "not a safe relative path"),
            (
                zip_of(&[("bin/tool.sh", b"x")]),
                "metrics/*.json and logs/ only",
            ),
            (duplicated(), "appears twice"),
            (
                b"PK\x03\x04 not really a zip".to_vec(),
                "not a complete zip",
            ),
            (
                zip_of(&[("metrics/m.json", b"{\"format\": 7}")]),
                "does not parse at $.format",
            ),
        ];
        for (bytes, reason) in cases {
            let refused = process(bytes).map(|_| ()).expect_err(reason);
            assert!(
                refused.message().contains(reason),
                "{:?} does not say {reason:?}",
                refused.message()
            );
        }
    }

    #[test]
    fn file_names_are_scrubbed_too() {
        let (bundle, out) = process(zip_of(&[
            ("logs/alice@acme.example.log", b"ok\n"),
            ("logs/node-10.1.2.3.log", b"ok\n"),
        ]))
        .unwrap();
        let kept = zip::ZipArchive::new(Cursor::new(out)).unwrap();
        let names: Vec<String> = kept.file_names().map(|n| n.unwrap().into_owned()).collect();
        assert!(
            names
                .iter()
                .all(|n| !n.contains("alice@") && !n.contains("10.1.2.3")),
            "{names:?}"
        );
        assert_eq!(
            bundle.treated.scrubbed.get(&(DataClass::Email as i32)),
            Some(&1)
        );
        assert_eq!(
            bundle.treated.scrubbed.get(&(DataClass::IpAddress as i32)),
            Some(&1)
        );
        // Two names that become one are refused rather than merged.
        let refused = process(zip_of(&[
            ("logs/a@acme.example.log", b"1\n"),
            ("logs/b@acme.example.log", b"2\n"),
        ]))
        .map(|_| ())
        .unwrap_err();
        assert!(refused.message().contains("once personal data is removed"));
    }

    #[test]
    fn a_truncated_zip_is_refused() {
        let whole = zip_of(&[("logs/a.log", &[b'a'; 10_000][..])]);
        let cut = whole[..whole.len() - 30].to_vec();
        assert!(
            process(cut)
                .unwrap_err()
                .message()
                .contains("not a complete zip")
        );
    }

    #[test]
    fn a_zip_bomb_is_refused_before_it_expands() {
        let mut out = Cursor::new(Vec::new());
        let mut writer = zip::ZipWriter::new(&mut out);
        writer
            .start_file(
                "logs/bomb.log",
                zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Deflated),
            )
            .unwrap();
        let zeros = vec![0u8; 1024 * 1024];
        for _ in 0..20 {
            writer.write_all(&zeros).unwrap();
        }
        writer.finish().unwrap();
        let refused = process(out.into_inner()).map(|_| ()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("zip bomb"),
            "{}",
            refused.message()
        );
    }

    #[test]
    fn a_symlink_entry_is_refused() {
        let mut out = Cursor::new(Vec::new());
        let mut writer = zip::ZipWriter::new(&mut out);
        writer
            .add_symlink(
                "logs/link",
                "/etc/shadow",
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
        writer.finish().unwrap();
        assert!(
            process(out.into_inner())
                .unwrap_err()
                .message()
                .contains("links are not accepted")
        );
    }

    #[test]
    fn person_keys_are_found_in_their_usual_spellings() {
        let (line, users, names) = scrub_people(
            "user=bob; username: \"carol\" Reporter='dave' fullName=\"Eve Adams\" userCount=3",
        );
        assert_eq!((users, names), (3, 1), "{line}");
        for gone in ["bob", "carol", "dave", "Eve Adams"] {
            assert!(!line.contains(gone), "{line}");
        }
        assert!(line.contains("userCount=3"));
    }

    #[test]
    fn an_assessment_error_names_the_json_path() {
        let refused = parse_assessment(
            br#"{"format": "sightline.assessment", "formatVersion": 1, "counts": {"projects": "many"}}"#,
            "file",
        )
        .unwrap_err();
        assert!(
            refused.message().contains("$.counts.projects"),
            "{}",
            refused.message()
        );
    }

    #[test]
    fn sizes_and_digests_are_held_to_the_header() {
        let header = pb::UploadHeader {
            size_bytes: 4,
            format: ASSESSMENT_FORMAT.into(),
            format_version: 1,
            sha256: hex::encode(Sha256::digest(b"abcd")),
            ..Default::default()
        };
        check_header(&header, ASSESSMENT_FORMAT, 10).unwrap();
        assert_eq!(
            check_header(&header, ASSESSMENT_FORMAT, 3)
                .unwrap_err()
                .code(),
            tonic::Code::ResourceExhausted
        );
        assert!(check_header(&header, BUNDLE_FORMAT, 10).is_err());
        let mut tally = Tally::new(&header);
        tally.add(b"ab").unwrap();
        assert!(Tally::new(&header).add(b"abcde").is_err());
        tally.add(b"cd").unwrap();
        tally.finish(&header).unwrap();
        let mut short = Tally::new(&header);
        short.add(b"abc").unwrap();
        assert!(
            short
                .finish(&header)
                .unwrap_err()
                .message()
                .contains("truncated")
        );
        let mut wrong = Tally::new(&header);
        wrong.add(b"abce").unwrap();
        assert!(
            wrong
                .finish(&header)
                .unwrap_err()
                .message()
                .contains("sha256")
        );
    }
}
