//! The scrubber on arbitrary input: every treatment (BASIC and EXTENDED, free text and URL), the
//! identifier check and the decoder. No input may panic, and what comes out is bounded by what
//! went in (libFuzzer's `-timeout` and `-rss_limit_mb` bound time and memory per input).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use sightline_scrub::{self as scrub, Level, Secrets, Shape, TextRules};

fuzz_target!(|data: &[u8]| {
    // The first bytes pick secrets (a display name the event carries), the rest is the text.
    let split = data.first().map_or(0, |n| usize::from(*n) % 16).min(data.len());
    let (secret, text) = data.split_at(split);
    let text = String::from_utf8_lossy(text);
    let mut secrets = Secrets::default();
    secrets.add(&String::from_utf8_lossy(secret));
    let keys: Arc<[String]> = Arc::from(vec!["page".to_owned()]);
    for level in [Level::Basic, Level::Extended] {
        let rules = TextRules::new(level, keys.clone());
        for shape in [Shape::Text, Shape::Url] {
            if let Some((out, _)) = scrub::treat(&text, &secrets, &rules, shape) {
                // Markers and decoding never grow text beyond a small factor of what came in.
                assert!(out.len() <= text.len() * 12 + 64, "{} → {}", text.len(), out.len());
            }
        }
    }
    let _ = scrub::first_finding(&text, &secrets);
    let _ = scrub::decode(&text);
});
