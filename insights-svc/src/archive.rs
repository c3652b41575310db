//! What a support bundle's zip must be before one byte of it is expanded (SPEC I4), beyond what
//! `upload.rs` checks entry by entry: every entry's data lies inside the archive, before the
//! central directory, and no two entries share or overlap their bytes (the "better zip bomb" has
//! hundreds of directory records pointing at one compressed entry); each entry's local header says
//! what its central-directory record says (name, method, sizes); and the names can be extracted on
//! any system: a component of at most 255 bytes, a path of at most 1,024, no two names equal once
//! Unicode-normalized (NFC) and case-folded, no name that is both a file and a directory.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};

use unicode_normalization::UnicodeNormalization;

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
pub fn check_names(names: &[String]) -> Result<(), String> {
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
        check_names(&list.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
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
