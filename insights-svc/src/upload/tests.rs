//! Tests of `upload`.

use super::*;
use crate::error::InsightsError;
use sightline_runtime::testing::zip_of;
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

fn process(bytes: Vec<u8>) -> Result<(Bundle, Vec<u8>), InsightsError> {
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
