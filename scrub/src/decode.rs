//! Undoing every reversible encoding a browser, a JSON or HTML writer or a form produces, so that
//! personal data is looked for in what the text *says*, not in how it was written: percent-encoding
//! (`%40`, and the `%u0040` of JavaScript's `escape`), backslash escapes (JSON's `\u0040` and `\"`,
//! and `\x40`), HTML character references (numeric `&#64;` / `&#x40;` and every HTML5 named
//! reference, `&commat;`, also without its `;` where browsers accept that), and Unicode
//! compatibility forms (NFKC: a fullwidth `＠` is an `@`, a no-break space a space). Each layer is
//! undone in turn until nothing changes, at most [`MAX_LAYERS`] times, so an encoding nested in
//! another (`%2540`, `\\u0040` in a JSON string held in a JSON string, `&amp;commat;`) is read too.
//!
//! Form encoding's `+` for a space is not undone here (it would break `mara+tag@example.com`): the
//! search for an event's own values treats `+` as a space instead (see `find.rs`).
//!
//! Every step is linear in its input and never grows it by more than a small factor, so decoding
//! is bounded in time and memory whatever the input.

use std::borrow::Cow;

use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfkc_quick};

/// How many layers of encoding are undone at most.
pub const MAX_LAYERS: usize = 8;

/// The text with every layer of encoding undone (borrowed when there was none).
pub fn decode(text: &str) -> Cow<'_, str> {
    let mut current = Cow::Borrowed(text);
    for _ in 0..MAX_LAYERS {
        let mut changed = false;
        for step in [percent, backslash, html, nfkc] {
            if let Some(next) = step(&current) {
                current = Cow::Owned(next);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    current
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn hex_u32(digits: &[u8]) -> Option<u32> {
    digits
        .iter()
        .try_fold(0u32, |acc, b| Some(acc * 16 + u32::from(hex_value(*b)?)))
}

fn push_char(out: &mut Vec<u8>, c: char) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// `%XX` and `%uXXXX`; None when there is none.
fn percent(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let first = memchr::memchr(b'%', bytes)?;
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    let mut changed = false;
    let mut i = first;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) {
                out.push(hi * 16 + lo);
                i += 3;
                changed = true;
                continue;
            }
            if matches!(bytes.get(i + 1), Some(b'u' | b'U'))
                && let Some(code) = bytes.get(i + 2..i + 6).and_then(hex_u32)
            {
                push_char(
                    &mut out,
                    char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER),
                );
                i += 6;
                changed = true;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    changed.then(|| String::from_utf8_lossy(&out).into_owned())
}

/// JSON's escapes (`\" \\ \/ \b \f \n \r \t \uXXXX`, surrogate pairs included) and `\xHH`, `\'`;
/// an unknown escape is left as it is. None when nothing was unescaped.
fn backslash(text: &str) -> Option<String> {
    let first = text.find('\\')?;
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..first]);
    let mut changed = false;
    let mut rest = &text[first..];
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let bytes = tail.as_bytes();
        let simple = match bytes.get(1) {
            Some(b'"') => Some('"'),
            Some(b'\\') => Some('\\'),
            Some(b'/') => Some('/'),
            Some(b'\'') => Some('\''),
            Some(b'b') => Some('\u{8}'),
            Some(b'f') => Some('\u{c}'),
            Some(b'n') => Some('\n'),
            Some(b'r') => Some('\r'),
            Some(b't') => Some('\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            rest = &tail[2..];
            changed = true;
        } else if bytes.get(1) == Some(&b'x')
            && let Some(code) = bytes.get(2..4).and_then(hex_u32)
        {
            out.push(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
            rest = &tail[4..];
            changed = true;
        } else if bytes.get(1) == Some(&b'u')
            && let Some(unit) = bytes.get(2..6).and_then(hex_u32)
        {
            let mut consumed = 6;
            let decoded = if (0xD800..0xDC00).contains(&unit) {
                let low = (bytes.get(6..8) == Some(b"\\u"))
                    .then(|| bytes.get(8..12).and_then(hex_u32))
                    .flatten()
                    .filter(|low| (0xDC00..0xE000).contains(low));
                low.and_then(|low| {
                    consumed = 12;
                    char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                })
            } else {
                char::from_u32(unit)
            };
            out.push(decoded.unwrap_or(char::REPLACEMENT_CHARACTER));
            rest = &tail[consumed..];
            changed = true;
        } else {
            out.push('\\');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// The longest HTML5 reference name (`&CounterClockwiseContourIntegral;`).
const MAX_ENTITY_NAME: usize = 32;

/// HTML character references, numeric and named. None when there is none.
fn html(text: &str) -> Option<String> {
    let first = text.find('&')?;
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..first]);
    let mut changed = false;
    let mut rest = &text[first..];
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        match reference(tail) {
            Some((decoded, consumed)) => {
                out.push_str(&decoded);
                rest = &tail[consumed..];
                changed = true;
            }
            None => {
                out.push('&');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// The reference at the start of `tail` (what follows an `&`): its text and how many bytes it took.
fn reference(tail: &str) -> Option<(Cow<'static, str>, usize)> {
    let bytes = tail.as_bytes();
    if bytes.first() == Some(&b'#') {
        let (digits_at, radix) = match bytes.get(1) {
            Some(b'x' | b'X') => (2, 16),
            _ => (1, 10),
        };
        let digits = &tail[digits_at..];
        let end = digits
            .find(|c: char| !c.is_digit(radix))
            .unwrap_or(digits.len());
        if end == 0 || end > 8 {
            return None;
        }
        let code = u32::from_str_radix(&digits[..end], radix).ok()?;
        let c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
        let semicolon = usize::from(digits[end..].starts_with(';'));
        return Some((Cow::Owned(c.to_string()), digits_at + end + semicolon));
    }
    let end = bytes
        .iter()
        .take(MAX_ENTITY_NAME + 1)
        .position(|b| !b.is_ascii_alphanumeric())
        .unwrap_or(bytes.len().min(MAX_ENTITY_NAME + 1));
    if end == 0 || end > MAX_ENTITY_NAME {
        return None;
    }
    let name = &tail[..end];
    if bytes.get(end) == Some(&b';') {
        let decoded = quick_xml::escape::resolve_html5_entity(name)?;
        return Some((Cow::Borrowed(decoded), end + 1));
    }
    // Without its `;`, the longest name a browser would read as a reference (`&commat` and the
    // legacy `&amp`, `&lt` …): the longest prefix that names one.
    (1..=end).rev().find_map(|len| {
        quick_xml::escape::resolve_html5_entity(&name[..len]).map(|d| (Cow::Borrowed(d), len))
    })
}

/// Unicode compatibility normalization (NFKC). None when the text is already normalized.
fn nfkc(text: &str) -> Option<String> {
    if text.is_ascii() || is_nfkc_quick(text.chars()) == IsNormalized::Yes {
        return None;
    }
    let normalized: String = text.nfkc().collect();
    (normalized != text).then_some(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_and_their_nesting_are_undone() {
        for (encoded, plain) in [
            ("mara%40host", "mara@host"),
            ("mara%2540host", "mara@host"),
            ("mara%u0040host", "mara@host"),
            (r"mara\u0040host", "mara@host"),
            (r"mara\\u0040host", "mara@host"),
            (r"mara\\\\u0040host", "mara@host"),
            (r#"{\"u\":\"mara\\u0040host\"}"#, r#"{"u":"mara@host"}"#),
            (r"mara\x40host", "mara@host"),
            ("mara&#64;host", "mara@host"),
            ("mara&#x40;host", "mara@host"),
            ("mara&commat;host&period;example", "mara@host.example"),
            ("mara&amp;commat;host", "mara@host"),
            ("mara&commatx", "mara@x"),
            ("mara＠host", "mara@host"),
            ("Mara\u{a0}Voss", "Mara Voss"),
            ("&#x25;34&#x30;", "40"),
            ("%26%2364%3B", "@"),
        ] {
            assert_eq!(decode(encoded), plain, "{encoded}");
        }
    }

    #[test]
    fn text_without_encodings_is_borrowed() {
        for text in [
            "plain text",
            "100 % sure",
            "a & b",
            r"C:\path",
            "&unknownname;",
        ] {
            assert!(matches!(decode(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let mut text = "@".to_owned();
        for _ in 0..20 {
            text = text.replace('%', "%25").replace('@', "%40");
        }
        // Deeper than MAX_LAYERS: decoding stops, it does not loop.
        assert!(decode(&text).contains('%'));
    }
}
