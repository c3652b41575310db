//! insights-svc's support-bundle checker on arbitrary bytes: the survey of the central directory,
//! the local headers, the layout and the names, then every accepted entry expanded as upload.rs
//! does (never past its declared size). No input may panic, and what is expanded is bounded by
//! what the upload's size allows.
#![no_main]

use std::io::{Cursor, Read};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

#[path = "../../insights-svc/src/archive.rs"]
#[allow(dead_code, unreachable_pub)]
mod archive;

use archive::{BundleLimits, Kind, Survey};

fuzz_target!(|data: &[u8]| {
    let limits = BundleLimits {
        max_expanded: 16 * 1024 * 1024,
        max_ratio: 200,
        max_files: 1_000,
        max_check: Duration::from_secs(1),
    };
    let Ok(Survey {
        mut archive,
        entries,
    }) = archive::survey(Cursor::new(data), &limits)
    else {
        return;
    };
    let declared: u64 = entries.iter().map(|(_, _, size)| size).sum();
    assert!(declared <= (data.len() as u64).max(1) * limits.max_ratio);
    let mut expanded = 0u64;
    for (index, (_, kind, size)) in entries.iter().enumerate() {
        if *kind == Kind::Directory {
            continue;
        }
        if let Ok(entry) = archive.by_index(index) {
            let mut limited = entry.take(size.saturating_add(1));
            expanded += std::io::copy(&mut limited, &mut std::io::sink()).unwrap_or(0);
        }
    }
    assert!(expanded <= declared + entries.len() as u64);
});
