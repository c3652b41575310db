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
/// Runs up to this long are decoded on the stack.
const SHORT_RUN: usize = 64;
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

pub(crate) fn is_run_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'_' | b'-')
}

/// The byte ranges of the runs of `text` at least [`MIN_RUN`] long (with their `=` padding).
pub(crate) fn runs(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    let bytes = text.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bytes.len() {
            if !is_run_char(bytes[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && is_run_char(bytes[i]) {
                i += 1;
            }
            let body_end = i;
            let mut end = i;
            while end < bytes.len() && end - body_end < 2 && bytes[end] == b'=' {
                end += 1;
            }
            i = end;
            if end - start >= MIN_RUN {
                return Some((start, end));
            }
        }
        None
    })
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
fn text_of(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    (!text.is_empty()
        && text
            .chars()
            .all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r')))
    .then_some(text)
}

fn as_text(bytes: Vec<u8>) -> Option<String> {
    text_of(&bytes)?;
    String::from_utf8(bytes).ok()
}

/// A UUID in its canonical text form: an id, not an opaque run.
pub(crate) fn is_uuid(run: &str) -> bool {
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
        if bytes.len().is_multiple_of(2)
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
    // One pass for what the rules below ask about the run's characters.
    let (mut has_digit, mut has_upper, mut has_lower, mut all_hex) = (false, false, false, true);
    for b in bytes {
        has_digit |= b.is_ascii_digit();
        has_upper |= b.is_ascii_uppercase();
        has_lower |= b.is_ascii_lowercase();
        all_hex &= b.is_ascii_hexdigit();
    }
    let has_letter = has_upper || has_lower;
    let long = bytes.len() >= MIN_TOKEN;
    if all_hex && has_letter {
        if bytes.len().is_multiple_of(2)
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
    let engine = match (standard, url_safe) {
        (true, true) => None,
        (false, true) => Some(&URL_SAFE),
        (true, false) | (false, false) => Some(&STANDARD),
    };
    // Most runs are words that do not decode at all (a length of 4n + 1) or decode to bytes that
    // are not text: that is found without allocating.
    if let Some(engine) = engine
        && body.len() % 4 != 1
    {
        if body.len() <= SHORT_RUN {
            let mut buffer = [0u8; SHORT_RUN * 3 / 4 + 3];
            if let Ok(n) = engine.decode_slice(body, &mut buffer)
                && let Some(text) = text_of(&buffer[..n])
            {
                return Some(Opaque::Text(text.to_owned()));
            }
        } else if let Some(text) = engine.decode(body).ok().and_then(as_text) {
            return Some(Opaque::Text(text));
        }
    }
    // A token: upper and lower case mixed with digits, or letters mixed with digits (or with
    // base64's symbols) in one piece at least MIN_TOKEN long. `customfield_10420` or
    // `eu-west-1-prod-cluster-02` are words and numbers joined, not a token.
    let symbols = run.contains(['+', '=']);
    let token = long
        && has_letter
        && (has_digit || (has_upper && has_lower && symbols))
        && ((has_upper && has_lower && has_digit)
            || run.split(['-', '_']).any(|piece| {
                piece.len() >= MIN_TOKEN
                    && piece.bytes().any(|b| b.is_ascii_alphabetic())
                    && (piece.bytes().any(|b| b.is_ascii_digit())
                        || piece.contains(['+', '/', '=']))
            }));
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
            "customfield_10420",
            "eu-west-1-prod-cluster-02",
        ] {
            assert_eq!(classify(run), None, "{run}");
        }
    }

    #[test]
    fn runs_end_at_other_characters_and_keep_their_padding() {
        let text = "d=YUBiLmM=&x=short&y=eyJ1IjoiYSJ9";
        let found: Vec<&str> = runs(text).map(|(s, e)| &text[s..e]).collect();
        assert_eq!(found, vec!["YUBiLmM=", "eyJ1IjoiYSJ9"]);
    }
}
