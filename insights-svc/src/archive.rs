//! What a support bundle's zip must be before one byte of it is expanded (SPEC I4): [`survey`]
//! reads the central directory and checks every entry's name, kind, flags, method and sizes
//! against the limits (per entry, in total, and against the upload's own size); then every entry's
//! data lies inside the archive, before the
//! central directory, and no two entries share or overlap their bytes (the "better zip bomb" has
//! hundreds of directory records pointing at one compressed entry); each entry's local header says
//! what its central-directory record says (name, method, sizes); and the names can be extracted on
//! any system: a component of at most 255 bytes, a path of at most 1,024, no two names equal once
//! Unicode-normalized (NFC) and case-folded, no name that is both a file and a directory.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};

use unicode_normalization::UnicodeNormalization;

/// The largest metrics file of a bundle (it is parsed in memory).
pub const MAX_METRICS_FILE: u64 = 8 * 1024 * 1024;

/// Limits of a bundle.
#[derive(Debug, Clone, Copy)]
pub struct BundleLimits {
    pub max_expanded: u64,
    pub max_ratio: u64,
    pub max_files: usize,
    /// The time checking and scrubbing one bundle may take (`analysis.max_bundle_check_ms`):
    /// whatever an archive holds, it costs at most this.
    pub max_check: std::time::Duration,
}

/// What an entry is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Directory,
    Metrics,
    Log,
}

/// Whether an entry's name is safe and in the bundle's layout; the reason when not.
pub fn check_name(name: &str) -> Result<Kind, String> {
    if name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.split('/').any(|part| part == ".." || part == ".")
        || name.as_bytes().get(1) == Some(&b':')
    {
        return Err(format!(
            "entry {name:?}: the name is not a safe relative path"
        ));
    }
    if name == "metrics/" || name == "logs/" || (name.starts_with("logs/") && name.ends_with('/')) {
        return Ok(Kind::Directory);
    }
    if let Some(file) = name.strip_prefix("metrics/")
        && !file.contains('/')
        && file.ends_with(".json")
        && file.len() > ".json".len()
    {
        return Ok(Kind::Metrics);
    }
    if name.starts_with("logs/") && !name.ends_with('/') {
        return Ok(Kind::Log);
    }
    Err(format!(
        "entry {name:?}: a support bundle holds metrics/*.json and logs/ only"
    ))
}

/// What a bundle's central directory lists, checked before one byte is expanded.
#[derive(Debug)]
pub struct Survey<R> {
    pub archive: zip::ZipArchive<R>,
    /// Each entry's name, kind and declared size, in the archive's order.
    pub entries: Vec<(String, Kind, u64)>,
}

/// Why a bundle is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a safe, well-formed bundle (INVALID_ARGUMENT).
    Invalid(String),
    /// It would expand past a limit: a bomb (RESOURCE_EXHAUSTED).
    TooLarge(String),
    /// The upload's own file could not be read.
    Io(String),
}

/// Reads the zip in `input` and checks everything its directory and local headers say against
/// `limits`, before one byte is expanded: names, kinds, links, encryption, methods, repeats and
/// twins, per-entry and whole-archive ratios, the declared total, and the entries' layout.
pub fn survey<R: Read + Seek>(mut input: R, limits: &BundleLimits) -> Result<Survey<R>, Refusal> {
    let archive_len = input
        .seek(std::io::SeekFrom::End(0))
        .map_err(|e| Refusal::Io(e.to_string()))?;
    let listed_count = listed_entries(&mut input)
        .map_err(|e| Refusal::Invalid(format!("the file is not a complete zip archive: {e}")))?;
    let mut archive = zip::ZipArchive::new(input).map_err(|e| {
        if e.to_string().contains("Duplicate filename") {
            Refusal::Invalid("an entry name appears twice in the bundle".to_owned())
        } else {
            Refusal::Invalid(format!(
                "the file is not a complete zip archive (truncated or another format): {e}"
            ))
        }
    })?;
    // A zip reader keeps one entry per name: fewer entries than the directory lists means a name
    // appears twice (and the other entry would be silently lost).
    if listed_count != Some(archive.len() as u64) {
        return Err(Refusal::Invalid(
            "an entry name appears twice in the bundle (or its directory is inconsistent)".into(),
        ));
    }
    if archive.len() > limits.max_files {
        return Err(Refusal::Invalid(format!(
            "the bundle holds {} files; at most {} are accepted",
            archive.len(),
            limits.max_files
        )));
    }
    if archive.offset() != 0 {
        return Err(Refusal::Invalid(
            "the bundle has data before its first entry (a self-extracting or appended archive)"
                .into(),
        ));
    }
    // Everything the central directory says is checked before one byte is expanded.
    let mut listed = Vec::with_capacity(archive.len());
    let mut seen = HashSet::new();
    let mut declared_total: u64 = 0;
    let mut kinds = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        let entry = archive
            .by_index_raw(index)
            .map_err(|e| Refusal::Invalid(format!("entry #{index}: unreadable: {e}")))?;
        let name = entry
            .name()
            .map_err(|e| {
                Refusal::Invalid(format!("entry #{index}: the name is not readable: {e}"))
            })?
            .into_owned();
        let kind = check_name(&name).map_err(Refusal::Invalid)?;
        if entry.enclosed_name().is_none() {
            return Err(Refusal::Invalid(format!(
                "entry {name:?}: the name is not a safe relative path"
            )));
        }
        if entry.is_symlink() {
            return Err(Refusal::Invalid(format!(
                "entry {name:?}: links are not accepted"
            )));
        }
        if entry.encrypted() {
            return Err(Refusal::Invalid(format!(
                "entry {name:?}: encrypted entries are not accepted"
            )));
        }
        match entry.compression() {
            zip::CompressionMethod::Stored | zip::CompressionMethod::Deflated => {}
            other => {
                return Err(Refusal::Invalid(format!(
                    "entry {name:?}: compression {other:?} is not accepted (stored or deflate)"
                )));
            }
        }
        if !seen.insert(name.trim_end_matches('/').to_owned()) {
            return Err(Refusal::Invalid(format!(
                "entry {name:?}: the name appears twice"
            )));
        }
        let (size, packed) = (entry.size(), entry.compressed_size());
        if size > packed.max(1).saturating_mul(limits.max_ratio) {
            return Err(Refusal::TooLarge(format!(
                "entry {name:?}: expands {size} bytes from {packed}, over the ratio of {} (zip bomb)",
                limits.max_ratio
            )));
        }
        if kind == Kind::Metrics && size > MAX_METRICS_FILE {
            return Err(Refusal::TooLarge(format!(
                "entry {name:?}: a metrics file of over {MAX_METRICS_FILE} bytes"
            )));
        }
        declared_total = declared_total.saturating_add(size);
        if declared_total > limits.max_expanded {
            return Err(Refusal::TooLarge(format!(
                "the bundle expands to over {} bytes (zip bomb)",
                limits.max_expanded
            )));
        }
        // The whole archive may expand no more than any one entry may: what is read while
        // checking is bounded by the upload's size.
        if declared_total > archive_len.max(1).saturating_mul(limits.max_ratio) {
            return Err(Refusal::TooLarge(format!(
                "the bundle expands to {declared_total} bytes from {archive_len}, over the ratio of {} (zip bomb)",
                limits.max_ratio
            )));
        }
        listed.push(Listed {
            name: name.clone(),
            name_raw: entry.name_raw().to_vec(),
            header_start: entry.header_start(),
            compressed_size: packed,
            size,
            method: if entry.compression() == zip::CompressionMethod::Stored {
                0
            } else {
                8
            },
        });
        kinds.push((name, kind, size));
    }
    check_names(kinds.iter().map(|(name, _, _)| name.as_str())).map_err(Refusal::Invalid)?;
    let directory_start = archive.central_directory_start();
    let mut input = archive.into_inner();
    check_layout(&mut input, &listed, directory_start).map_err(Refusal::Invalid)?;
    input
        .seek(std::io::SeekFrom::Start(0))
        .map_err(|e| Refusal::Io(e.to_string()))?;
    let archive = zip::ZipArchive::new(input)
        .map_err(|e| Refusal::Invalid(format!("the file is not a complete zip archive: {e}")))?;
    Ok(Survey {
        archive,
        entries: kinds,
    })
}

/// How many entries the zip's end-of-central-directory record lists (zip64 too); None when there
/// is no such record.
fn listed_entries<R: Read + Seek>(input: &mut R) -> std::io::Result<Option<u64>> {
    let len = input.seek(std::io::SeekFrom::End(0))?;
    let tail_len = len.min(22 + 65_535);
    input.seek(std::io::SeekFrom::Start(len - tail_len))?;
    let mut tail = vec![0u8; usize::try_from(tail_len).unwrap_or(0)];
    input.read_exact(&mut tail)?;
    input.seek(std::io::SeekFrom::Start(0))?;
    let Some(at) = tail.windows(4).rposition(|w| w == b"PK\x05\x06") else {
        return Ok(None);
    };
    let Some(count) = tail.get(at + 10..at + 12) else {
        return Ok(None);
    };
    let count = u16::from_le_bytes([count[0], count[1]]);
    if count != u16::MAX {
        return Ok(Some(u64::from(count)));
    }
    // Zip64: the locator sits just before the record and points at the zip64 record.
    let Some(locator) = at.checked_sub(20).and_then(|l| tail.get(l..l + 20)) else {
        return Ok(None);
    };
    if &locator[..4] != b"PK\x06\x07" {
        return Ok(None);
    }
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&locator[8..16]);
    input.seek(std::io::SeekFrom::Start(u64::from_le_bytes(offset)))?;
    let mut record = [0u8; 40];
    input.read_exact(&mut record)?;
    input.seek(std::io::SeekFrom::Start(0))?;
    if &record[..4] != b"PK\x06\x06" {
        return Ok(None);
    }
    let mut total = [0u8; 8];
    total.copy_from_slice(&record[32..40]);
    Ok(Some(u64::from_le_bytes(total)))
}

/// The longest name component accepted (most file systems' limit).
pub const MAX_COMPONENT: usize = 255;
/// The longest name accepted.
pub const MAX_PATH: usize = 1_024;

/// One entry as its central-directory record describes it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub name_raw: Vec<u8>,
    /// Where its local header starts.
    pub header_start: u64,
    pub compressed_size: u64,
    pub size: u64,
    /// The compression method's number (0 stored, 8 deflate).
    pub method: u16,
}

/// The local header's fixed part: signature, version, flags, method, time, date, CRC, sizes,
/// name and extra lengths.
const LOCAL_HEADER: usize = 30;
const LOCAL_SIGNATURE: &[u8; 4] = b"PK\x03\x04";
/// Sizes are in a data descriptor after the data (the local header says 0).
const FLAG_DATA_DESCRIPTOR: u16 = 1 << 3;

/// Checks the names of every entry; the message names the entry and what is wrong.
pub fn check_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    let mut folded_names: HashMap<String, &str> = HashMap::new();
    let mut directories: HashSet<String> = HashSet::new();
    let mut files: Vec<(String, &str)> = Vec::new();
    for name in names {
        if let Some(long) = name.split('/').find(|c| c.len() > MAX_COMPONENT) {
            return Err(format!(
                "entry {:?}…: a name component of {} bytes, at most {MAX_COMPONENT} are accepted",
                name.chars().take(40).collect::<String>(),
                long.len()
            ));
        }
        if name.len() > MAX_PATH {
            return Err(format!(
                "entry name of {} bytes: at most {MAX_PATH} are accepted ({:?}…)",
                name.len(),
                name.chars().take(40).collect::<String>()
            ));
        }
        let is_directory = name.ends_with('/');
        let folded: String = name
            .trim_end_matches('/')
            .nfc()
            .collect::<String>()
            .to_lowercase();
        if let Some(other) = folded_names.insert(folded.clone(), name) {
            return Err(format!(
                "entry {name:?}: the same name as {other:?} once Unicode-normalized and case-folded \
                 (they would overwrite each other when extracted)"
            ));
        }
        // Every parent of an entry is a directory.
        let mut parent = folded.as_str();
        while let Some(cut) = parent.rfind('/') {
            parent = &parent[..cut];
            directories.insert(parent.to_owned());
        }
        if is_directory {
            directories.insert(folded);
        } else {
            files.push((folded, name));
        }
    }
    if let Some((_, name)) = files.iter().find(|(f, _)| directories.contains(f)) {
        return Err(format!(
            "entry {name:?}: the name is both a file and a directory"
        ));
    }
    Ok(())
}

/// Checks every entry's local header against its record, and that the entries' bytes are apart
/// and inside the archive before `directory_start`.
pub fn check_layout<R: Read + Seek>(
    input: &mut R,
    entries: &[Listed],
    directory_start: u64,
) -> Result<(), String> {
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in entries {
        let name = &entry.name;
        let mut header = [0u8; LOCAL_HEADER];
        input
            .seek(SeekFrom::Start(entry.header_start))
            .and_then(|_| input.read_exact(&mut header))
            .map_err(|_| format!("entry {name:?}: its local header is outside the archive"))?;
        let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        if &header[..4] != LOCAL_SIGNATURE {
            return Err(format!(
                "entry {name:?}: no local header where its record points"
            ));
        }
        let (flags, method) = (u16_at(6), u16_at(8));
        let (name_len, extra_len) = (usize::from(u16_at(26)), u64::from(u16_at(28)));
        let mut local_name = vec![0u8; name_len];
        input
            .read_exact(&mut local_name)
            .map_err(|_| format!("entry {name:?}: its local header is truncated"))?;
        if local_name != entry.name_raw {
            return Err(format!(
                "entry {name:?}: its local header names another file ({:?})",
                String::from_utf8_lossy(&local_name)
            ));
        }
        if method != entry.method {
            return Err(format!(
                "entry {name:?}: its local header says another compression method"
            ));
        }
        if flags & FLAG_DATA_DESCRIPTOR == 0 {
            let (packed, size) = (u32_at(18), u32_at(22));
            // 0xFFFFFFFF: the sizes are in the zip64 extra field, checked by the reader.
            let agrees =
                |local: u32, central: u64| local == u32::MAX || u64::from(local) == central;
            if !agrees(packed, entry.compressed_size) || !agrees(size, entry.size) {
                return Err(format!(
                    "entry {name:?}: its local header gives other sizes than its record"
                ));
            }
        }
        let data_start = entry.header_start + LOCAL_HEADER as u64 + name_len as u64 + extra_len;
        let end = data_start.saturating_add(entry.compressed_size);
        if end > directory_start {
            return Err(format!(
                "entry {name:?}: its data runs past the start of the central directory"
            ));
        }
        ranges.push((entry.header_start, end, name));
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((_, end, first), (start, _, second)) = (&pair[0], &pair[1]);
        if start < end {
            return Err(format!(
                "entries {first:?} and {second:?} share or overlap their bytes in the archive \
                 (an overlapping-entry zip bomb)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Result<(), String> {
        check_names(list.iter().copied())
    }

    #[test]
    fn names_that_collide_or_cannot_be_extracted_are_refused() {
        assert!(names(&["logs/", "logs/app.log", "metrics/jira.json"]).is_ok());
        let long = "a".repeat(256);
        assert!(
            names(&[&format!("logs/{long}.log")])
                .unwrap_err()
                .contains("component")
        );
        let deep = format!("logs/{}x.log", "abcdefghij/".repeat(110));
        assert!(names(&[&deep]).unwrap_err().contains("at most 1024"));
        let twins = names(&["logs/caf\u{e9}.log", "logs/cafe\u{301}.log"]).unwrap_err();
        assert!(twins.contains("Unicode-normalized"), "{twins}");
        assert!(names(&["logs/App.log", "logs/app.LOG"]).is_err());
        let both = names(&["logs/app.log", "logs/app.log/x.log"]).unwrap_err();
        assert!(both.contains("both a file and a directory"), "{both}");
        assert!(names(&["logs/app.log/", "logs/app.log"]).is_err());
    }
}
