//! The spool under `analytics-logs/`: append-only files of events waiting for the collector.
//!
//! A file is a run of records, each `length (u32 LE) | CRC-32 (u32 LE) | an encoded Event`. Appends
//! are synced before they count; a record torn by a crash fails its length or CRC and ends the file
//! there (it was never acknowledged to anyone). New events go to the newest file until it holds a
//! batch (1000 events) or its byte share; then a new file starts. A file is one upload batch and is
//! deleted only when the collector acknowledged all of it. The spool is bounded in bytes: to make
//! room, the oldest files not being uploaded are dropped and their events counted.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use sightline_proto::collector::v1::Event;

/// Events per file: one IngestStream batch.
pub const FILE_EVENTS: usize = 1000;
const RECORD_HEADER: usize = 8;
const EXTENSION: &str = "spool";

#[derive(Debug)]
struct Current {
    seq: u64,
    file: std::fs::File,
    events: usize,
    bytes: u64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    file_bytes: u64,
    current: Option<Current>,
    next_seq: u64,
    in_flight: HashSet<PathBuf>,
}

/// A spool file read back.
#[derive(Debug)]
pub struct Batch {
    pub path: PathBuf,
    pub events: Vec<Event>,
    /// A record was torn or damaged: the file was read up to it.
    pub damaged: bool,
}

fn seq_of(path: &Path) -> Option<u64> {
    if path.extension()? != EXTENSION {
        return None;
    }
    path.file_stem()?.to_str()?.parse().ok()
}

impl Spool {
    /// Opens the spool in `dir` (made 0700). New events start a new file: an existing one may end in
    /// a torn record.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        sightline_runtime::secret_file::private_dir(dir)?;
        let max_bytes = max_bytes.max(64 * 1024);
        let mut spool = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            file_bytes: (max_bytes / 4).clamp(16 * 1024, 1024 * 1024),
            current: None,
            next_seq: 0,
            in_flight: HashSet::new(),
        };
        spool.next_seq = spool
            .files()?
            .last()
            .and_then(|p| seq_of(p))
            .map_or(1, |s| s + 1);
        // Temporaries of a rewrite a crash interrupted.
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every spool file, oldest first.
    pub fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        files_in(&self.dir)
    }

    /// Spool files no longer written to, oldest first.
    pub fn sealed(&self) -> std::io::Result<Vec<PathBuf>> {
        let current = self.current.as_ref().map(|c| c.seq);
        Ok(self
            .files()?
            .into_iter()
            .filter(|p| seq_of(p) != current)
            .collect())
    }

    /// Stops writing to the current file, so it can be uploaded.
    pub fn seal(&mut self) {
        self.current = None;
    }

    /// Bytes held.
    pub fn bytes(&self) -> std::io::Result<u64> {
        let mut total = 0;
        for path in self.files()? {
            total += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        }
        Ok(total)
    }

    pub fn mark_in_flight(&mut self, path: &Path, on: bool) {
        if on {
            self.in_flight.insert(path.to_path_buf());
        } else {
            self.in_flight.remove(path);
        }
    }

    /// Appends events durably; returns how many older events were dropped to stay in bounds.
    pub fn append(&mut self, events: &[Event]) -> std::io::Result<u64> {
        let mut dropped = 0;
        for chunk in events.chunks(FILE_EVENTS) {
            let mut bytes = Vec::new();
            for event in chunk {
                encode_record(event, &mut bytes);
            }
            dropped += self.make_room(bytes.len() as u64)?;
            let full = self.current.as_ref().is_some_and(|c| {
                c.events + chunk.len() > FILE_EVENTS
                    || c.bytes + bytes.len() as u64 > self.file_bytes
            });
            if full {
                self.current = None;
            }
            let current = match &mut self.current {
                Some(current) => current,
                None => {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let mut options = std::fs::OpenOptions::new();
                    options.append(true).create_new(true);
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::OpenOptionsExt;
                        options.mode(0o600);
                    }
                    let file = options.open(self.path_of(seq))?;
                    std::fs::File::open(&self.dir)?.sync_all()?;
                    self.current.insert(Current {
                        seq,
                        file,
                        events: 0,
                        bytes: 0,
                    })
                }
            };
            current.file.write_all(&bytes)?;
            current.file.sync_data()?;
            current.events += chunk.len();
            current.bytes += bytes.len() as u64;
        }
        Ok(dropped)
    }

    fn path_of(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.{EXTENSION}"))
    }

    /// Drops the oldest files not in flight until `incoming` more bytes fit.
    fn make_room(&mut self, incoming: u64) -> std::io::Result<u64> {
        let mut dropped = 0;
        let mut total = self.bytes()?;
        while total + incoming > self.max_bytes {
            let oldest = self
                .files()?
                .into_iter()
                .find(|p| !self.in_flight.contains(p));
            let Some(oldest) = oldest else { break };
            if self.current.as_ref().map(|c| c.seq) == seq_of(&oldest) {
                self.current = None;
            }
            let batch = read(&oldest)?;
            let size = std::fs::metadata(&oldest).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&oldest)?;
            dropped += batch.events.len() as u64;
            total = total.saturating_sub(size);
        }
        Ok(dropped)
    }

    /// Deletes an acknowledged file.
    pub fn remove(&mut self, path: &Path) -> std::io::Result<()> {
        self.in_flight.remove(path);
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Keeps only the events `keep` accepts, rewriting files whole; returns how many were removed.
    pub fn retain(&mut self, keep: impl Fn(&Event) -> bool) -> std::io::Result<u64> {
        self.current = None;
        let mut removed = 0;
        for path in self.files()? {
            let batch = read(&path)?;
            let before = batch.events.len();
            let kept: Vec<Event> = batch.events.into_iter().filter(|e| keep(e)).collect();
            removed += (before - kept.len()) as u64;
            if kept.is_empty() {
                std::fs::remove_file(&path)?;
                continue;
            }
            if kept.len() == before && !batch.damaged {
                continue;
            }
            let mut bytes = Vec::new();
            for event in &kept {
                encode_record(event, &mut bytes);
            }
            let tmp = path.with_extension("tmp");
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
        }
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(removed)
    }
}

/// The spool files in `dir`, oldest first.
pub fn files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(seq) = seq_of(&path) {
            files.push((seq, path));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// Bytes and files of a spool directory, for `status` (which does not open the spool for writing).
pub fn usage(dir: &Path) -> (u64, usize) {
    let files = files_in(dir).unwrap_or_default();
    let bytes = files
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    (bytes, files.len())
}

fn encode_record(event: &Event, out: &mut Vec<u8>) {
    let body = event.encode_to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Reads a spool file up to its end or its first torn or damaged record.
pub fn read(path: &Path) -> std::io::Result<Batch> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut bytes)?;
    let mut events = Vec::new();
    let mut at = 0;
    let mut damaged = false;
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + RECORD_HEADER) else {
            damaged = true;
            break;
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(body) = bytes.get(at + RECORD_HEADER..at + RECORD_HEADER + len) else {
            damaged = true;
            break;
        };
        if crc32fast::hash(body) != crc {
            damaged = true;
            break;
        }
        match Event::decode(body) {
            Ok(event) => events.push(event),
            Err(_) => {
                damaged = true;
                break;
            }
        }
        at += RECORD_HEADER + len;
    }
    Ok(Batch {
        path: path.to_path_buf(),
        events,
        damaged,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sightline_proto::collector::v1::{MetricEvent, event::Payload};

    fn event(i: usize) -> Event {
        Event {
            event_id: format!("e{i}"),
            occurred_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
            payload: Some(Payload::Metric(MetricEvent {
                name: "host.cpu.load1".into(),
                value: i as f64,
                ..Default::default()
            })),
        }
    }

    fn private_tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn files_hold_one_batch_and_read_back_in_order() {
        let dir = private_tempdir();
        let mut spool = Spool::open(&dir.path().join("s"), 64 << 20).unwrap();
        let events: Vec<Event> = (0..2500).map(event).collect();
        assert_eq!(spool.append(&events).unwrap(), 0);
        spool.seal();
        let files = spool.sealed().unwrap();
        assert_eq!(files.len(), 3);
        let back: Vec<Event> = files.iter().flat_map(|p| read(p).unwrap().events).collect();
        assert_eq!(back, events);
    }

    #[test]
    fn a_torn_tail_ends_the_file_and_a_reopened_spool_starts_a_new_one() {
        let dir = private_tempdir();
        let path = dir.path().join("s");
        let mut spool = Spool::open(&path, 64 << 20).unwrap();
        spool.append(&[event(1), event(2)]).unwrap();
        let file = spool.files().unwrap()[0].clone();
        drop(spool);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        let batch = read(&file).unwrap();
        assert_eq!((batch.events.len(), batch.damaged), (2, true));
        let mut spool = Spool::open(&path, 64 << 20).unwrap();
        spool.append(&[event(3)]).unwrap();
        assert_eq!(spool.files().unwrap().len(), 2);
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts_them_but_never_a_file_in_flight() {
        let dir = private_tempdir();
        let mut spool = Spool::open(&dir.path().join("s"), 64 * 1024).unwrap();
        let mut dropped = 0;
        let mut n = 0;
        spool.append(&[event(0)]).unwrap();
        let first = spool.files().unwrap()[0].clone();
        spool.mark_in_flight(&first, true);
        for round in 0..200 {
            let events: Vec<Event> = (0..50).map(|i| event(round * 50 + i)).collect();
            n += 50;
            dropped += spool.append(&events).unwrap();
        }
        assert!(spool.bytes().unwrap() <= 64 * 1024);
        assert!(first.exists());
        let held: u64 = spool
            .files()
            .unwrap()
            .iter()
            .map(|p| read(p).unwrap().events.len() as u64)
            .sum();
        assert_eq!(held + dropped, n + 1);
        assert!(dropped > 0);
    }

    #[test]
    fn retain_rewrites_whole_files() {
        let dir = private_tempdir();
        let mut spool = Spool::open(&dir.path().join("s"), 64 << 20).unwrap();
        spool
            .append(&(0..10).map(event).collect::<Vec<_>>())
            .unwrap();
        let removed = spool.retain(|e| e.event_id != "e3").unwrap();
        assert_eq!(removed, 1);
        let left: Vec<String> = spool
            .files()
            .unwrap()
            .iter()
            .flat_map(|p| read(p).unwrap().events)
            .map(|e| e.event_id)
            .collect();
        assert_eq!(left.len(), 9);
        assert_eq!(spool.retain(|_| false).unwrap(), 9);
        assert!(spool.files().unwrap().is_empty());
    }
}
