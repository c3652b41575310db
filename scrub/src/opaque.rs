//! Opaque runs: base64, base64url, hex and long tokens inside text. What they hold cannot be read
//! without decoding them, so under BASIC they are replaced by a marker, and under EXTENDED they are
//! decoded (bounded in depth and size) and scrubbed like any text, or replaced when what they hold
//! is not text (a token, or bytes that could be anything).

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// Runs shorter than this are read only when they decode to text (`YUBiLmM=` is `a@b.c`).
pub(crate) const MIN_RUN: usize = 8;
/// Runs at least this long that look like a token are opaque whatever they decode to.
pub(crate) const MIN_TOKEN: usize = 16;
/// Longer runs are not decoded (they are opaque).
pub(crate) const MAX_RUN: usize = 16 * 1024;

/// What an opaque run holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Opaque {
    /// It decodes to this text.
    Text(String),
    /// A token, or bytes that are not text.
    Binary,
}

fn is_run_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'_' | b'-')
}

/// The byte ranges of the runs of `text` at least [`MIN_RUN`] long (with their `=` padding).
pub(crate) fn runs(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !is_run_char(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_run_char(bytes[i]) {
            i += 1;
        }
        let mut end = i;
        while end < bytes.len() && end - i < 2 && bytes[end] == b'=' {
            end += 1;
        }
        if end - start >= MIN_RUN {
            found.push((start, end));
        }
        i = end.max(i);
    }
    found
}

const fn engine(alphabet: &base64::alphabet::Alphabet) -> GeneralPurpose {
    GeneralPurpose::new(
        alphabet,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    )
}

const STANDARD: GeneralPurpose = engine(&base64::alphabet::STANDARD);
const URL_SAFE: GeneralPurpose = engine(&base64::alphabet::URL_SAFE);

/// Bytes that are readable text: UTF-8 without control characters other than tab and line ends.
fn as_text(bytes: Vec<u8>) -> Option<String> {
    let text = String::from_utf8(bytes).ok()?;
    (!text.is_empty()
        && text
            .chars()
            .all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r')))
    .then_some(text)
}

fn is_uuid(run: &str) -> bool {
    let bytes = run.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// What `run` (one of [`runs`]) holds, or None when it is an ordinary word, number or id.
pub(crate) fn classify(run: &str) -> Option<Opaque> {
    let bytes = run.as_bytes();
    if bytes.len() < MIN_RUN || is_uuid(run) {
        return None;
    }
    if bytes.iter().all(u8::is_ascii_digit) {
        // A number (up to u64's 20 digits) is data; a longer run of digits is hex of text (the
        // hex of digits, `.`, `%` and capitals has no letter) or a token.
        if bytes.len() <= 20 {
            return None;
        }
        if bytes.len() % 2 == 0
            && let Ok(decoded) = hex::decode(bytes)
            && let Some(text) = as_text(decoded)
        {
            return Some(Opaque::Text(text));
        }
        return (bytes.len() >= 32).then_some(Opaque::Binary);
    }
    if bytes.len() > MAX_RUN {
        return Some(Opaque::Binary);
    }
    let has_digit = bytes.iter().any(u8::is_ascii_digit);
    let has_letter = bytes.iter().any(u8::is_ascii_alphabetic);
    let long = bytes.len() >= MIN_TOKEN;
    if bytes.iter().all(u8::is_ascii_hexdigit) && has_letter {
        if bytes.len() % 2 == 0
            && let Ok(decoded) = hex::decode(bytes)
            && let Some(text) = as_text(decoded)
        {
            return Some(Opaque::Text(text));
        }
        return (long && has_digit).then_some(Opaque::Binary);
    }
    let body = run.trim_end_matches('=');
    let url_safe = body.contains(['-', '_']);
    let standard = body.contains(['+', '/']);
    let decoded = match (standard, url_safe) {
        (true, true) => None,
        (false, true) => URL_SAFE.decode(body).ok(),
        (true, false) | (false, false) => STANDARD.decode(body).ok(),
    };
    if let Some(text) = decoded.and_then(as_text) {
        return Some(Opaque::Text(text));
    }
    let has_upper = bytes.iter().any(u8::is_ascii_uppercase);
    let has_lower = bytes.iter().any(u8::is_ascii_lowercase);
    let symbols = run.contains(['+', '=']);
    let token = long && has_letter && (has_digit || (has_upper && has_lower && symbols));
    token.then_some(Opaque::Binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn encoded_text_is_read_and_tokens_are_named() {
        let json = r#"{"u":"mara.voss@host.example"}"#;
        assert_eq!(classify(&b64(json)), Some(Opaque::Text(json.into())));
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        assert_eq!(classify(&url_safe), Some(Opaque::Text(json.into())));
        assert_eq!(
            classify(&hex::encode("mara@host.example")),
            Some(Opaque::Text("mara@host.example".into()))
        );
        assert_eq!(classify(&b64("a@b.c")), Some(Opaque::Text("a@b.c".into())));
        assert_eq!(
            classify("3f9a0c2e77b14d6a9e0f1c2b3a4d5e6f"),
            Some(Opaque::Binary)
        );
        assert_eq!(
            classify("sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
            Some(Opaque::Binary)
        );
        // The hex of digits and dots has no letter.
        assert_eq!(
            classify(&hex::encode("141.114.51.88")),
            Some(Opaque::Text("141.114.51.88".into()))
        );
    }

    #[test]
    fn words_numbers_and_ids_are_not_opaque() {
        for run in [
            "NullPointerException",
            "internationalization",
            "this-is-a-page-slug",
            "1700000000000000",
            "18446744073709551615",
            "123e4567-e89b-12d3-a456-426614174000",
            "jvm-cpu-load",
            "abcdefg",
        ] {
            assert_eq!(classify(run), None, "{run}");
        }
    }

    #[test]
    fn runs_end_at_other_characters_and_keep_their_padding() {
        let text = "d=YUBiLmM=&x=short&y=eyJ1IjoiYSJ9";
        let found: Vec<&str> = runs(text).iter().map(|(s, e)| &text[*s..*e]).collect();
        assert_eq!(found, vec!["YUBiLmM=", "eyJ1IjoiYSJ9"]);
    }
}
