//! Free text is treated by what it may hold, not by what it looks like (SPEC E4). Before anything
//! is looked for, every reversible encoding is undone ([`decode`]: percent and `%u`, JSON and other
//! backslash escapes at every level of nesting, HTML numeric and named references, Unicode
//! compatibility forms). Then, by the sharing level:
//!
//! - **BASIC** keeps only what BASIC allows: a URL (a URL-class field, or one inside free text)
//!   keeps scheme, host and id path segments (see `url.rs`); every opaque run (base64, base64url,
//!   hex, long tokens) is replaced by `[opaque]`.
//! - **EXTENDED** keeps URLs whole, and decodes opaque runs (at most [`MAX_OPAQUE_DEPTH`] deep) to
//!   scrub what they hold like any text; a run that does not decode to text is replaced.
//!
//! At both levels, e-mail addresses, IP addresses and the event's own values that the policy does
//! not let through are replaced by markers (`[email]`, `[ip]`, `[redacted]`).
//!
//! [`treat`] returns the treated text and what was found, or None when nothing was (the text is
//! then kept byte for byte). When the text had to be decoded to be read, the treated result is the
//! decoded text: an encoded form could otherwise carry what was removed.
//!
//! It is on the ingest hot path: text with none of `@ % \ &`, no non-ASCII character, no run that
//! could be encoded, no IP-like shape and no secret is passed over after one scan.

mod decode;
mod find;
mod opaque;
mod url;

use std::borrow::Cow;
use std::sync::Arc;

pub use decode::{MAX_LAYERS, decode};
pub use find::{MIN_SECRET_LEN, Secrets};
use opaque::Opaque;
use opaque::{MIN_RUN, MIN_TOKEN};

/// How deep opaque runs are decoded inside each other (base64 of JSON holding base64 …).
pub const MAX_OPAQUE_DEPTH: usize = 3;

/// What was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Finding {
    Email,
    Ip,
    /// One of the event's own values that may not be stored as text.
    Secret,
    /// An opaque run replaced (BASIC), or one that could not be read (EXTENDED).
    Opaque,
    /// Parts of a URL that BASIC does not keep (query, fragment, user information, non-id path
    /// segments).
    Reduced,
}

impl Finding {
    pub const fn marker(self) -> &'static str {
        match self {
            Finding::Email => "[email]",
            Finding::Ip => "[ip]",
            Finding::Secret | Finding::Reduced => "[redacted]",
            Finding::Opaque => "[opaque]",
        }
    }

    /// What was found, with its article (`an e-mail address`).
    pub const fn name(self) -> &'static str {
        match self {
            Finding::Email => "an e-mail address",
            Finding::Ip => "an IP address",
            Finding::Secret => "a personal value of the same event",
            Finding::Opaque => "text encoded deeper than is read",
            Finding::Reduced => "a part of a URL that BASIC sharing does not keep",
        }
    }
}

/// The sharing level text is treated under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Level {
    /// The default: URLs reduced, opaque runs replaced.
    #[default]
    Basic,
    Extended,
}

/// What a text value is, by its field's data class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Free text, names: URLs inside it are found and treated as URLs.
    Text,
    /// A URL-class field: the whole value is a URL.
    Url,
}

/// How text is treated: the sharing level and, under BASIC, the query keys a URL keeps.
#[derive(Debug, Clone, Default)]
pub struct TextRules {
    pub level: Level,
    /// Query keys kept under BASIC (`collection.url_query_keys`), their values scrubbed.
    pub query_keys: Arc<[String]>,
}

impl TextRules {
    pub fn new(level: Level, query_keys: Arc<[String]>) -> Self {
        Self { level, query_keys }
    }

    pub fn extended() -> Self {
        Self::new(Level::Extended, Arc::from(Vec::new()))
    }
}

/// `text` treated as free text under EXTENDED: decoded, opaque runs read, personal data removed.
pub fn scrub(text: &str, secrets: &Secrets) -> Option<(String, Vec<Finding>)> {
    static EXTENDED: std::sync::OnceLock<TextRules> = std::sync::OnceLock::new();
    treat(
        text,
        secrets,
        EXTENDED.get_or_init(TextRules::extended),
        Shape::Text,
    )
}

/// `text` treated by `rules` as a value of `shape`; None when nothing was found or removed.
pub fn treat(
    text: &str,
    secrets: &Secrets,
    rules: &TextRules,
    shape: Shape,
) -> Option<(String, Vec<Finding>)> {
    if !worth_scanning(text, secrets, rules.level, shape) {
        return None;
    }
    let mut found = Vec::new();
    let out = treat_at(text, secrets, rules, shape, 0, &mut found);
    (!found.is_empty()).then(|| (out.into_owned(), found))
}

fn treat_at<'a>(
    text: &'a str,
    secrets: &Secrets,
    rules: &TextRules,
    shape: Shape,
    depth: usize,
    found: &mut Vec<Finding>,
) -> Cow<'a, str> {
    // Each step allocates only when it changes something (the common case on the hot path is
    // text that needs nothing).
    let mut work = decode(text);
    if rules.level == Level::Basic {
        match shape {
            Shape::Url => work = Cow::Owned(url::reduce(&work, &rules.query_keys, found)),
            Shape::Text => {
                let urls = url::embedded(&work);
                if !urls.is_empty() {
                    work = Cow::Owned(replace_each(&work, &urls, |u| {
                        url::reduce(u, &rules.query_keys, found)
                    }));
                }
            }
        }
    }
    // What is plainly there goes first: an opaque run inside it (a host label that reads as
    // base64) must not hide the rest of it from the search.
    if let Some(marked) = mark_found(&work, secrets, found) {
        work = Cow::Owned(marked);
    }
    let runs = opaque_spans(&work);
    if runs.is_empty() {
        return work;
    }
    work = Cow::Owned(opaque_runs(&work, runs, secrets, rules, depth, found));
    // What the runs' replacements put side by side is looked at once more.
    if let Some(marked) = mark_found(&work, secrets, found) {
        work = Cow::Owned(marked);
    }
    work
}

/// `text` with the personal data it holds replaced by markers (None when it holds none).
fn mark_found(text: &str, secrets: &Secrets, found: &mut Vec<Finding>) -> Option<String> {
    let spans = find::find(text, secrets);
    if spans.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for span in spans {
        out.push_str(&text[at..span.start]);
        out.push_str(span.finding.marker());
        found.push(span.finding);
        at = span.end;
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// `text` with each of `spans` (sorted, apart) replaced by what `with` makes of it.
fn replace_each(
    text: &str,
    spans: &[(usize, usize)],
    mut with: impl FnMut(&str) -> String,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in spans {
        out.push_str(&text[at..*start]);
        out.push_str(&with(&text[*start..*end]));
        at = *end;
    }
    out.push_str(&text[at..]);
    out
}

/// The opaque runs of `text` and what each holds; a run with `/` that is not base64 is looked at
/// piece by piece (a path).
fn opaque_spans(text: &str) -> Vec<(usize, usize, Opaque)> {
    let mut spans = Vec::new();
    for (start, end) in opaque::runs(text) {
        match opaque::classify(&text[start..end]) {
            Some(Opaque::Text(decoded)) => spans.push((start, end, Opaque::Text(decoded))),
            held if text[start..end].contains('/') => {
                let mut piece_start = start;
                let mut pieces = Vec::new();
                for piece in text[start..end].split('/') {
                    let piece_end = piece_start + piece.len();
                    if let Some(opaque) = opaque::classify(piece) {
                        pieces.push((piece_start, piece_end, opaque));
                    }
                    piece_start = piece_end + 1;
                }
                if pieces.is_empty()
                    && let Some(opaque) = held
                {
                    spans.push((start, end, opaque));
                }
                spans.extend(pieces);
            }
            Some(opaque) => spans.push((start, end, opaque)),
            None => {}
        }
    }
    spans
}

/// Replaces or reads the opaque runs of `text` by `rules` (see the module's doc).
fn opaque_runs(
    text: &str,
    spans: Vec<(usize, usize, Opaque)>,
    secrets: &Secrets,
    rules: &TextRules,
    depth: usize,
    found: &mut Vec<Finding>,
) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end, held) in spans {
        out.push_str(&text[at..start]);
        at = end;
        let run = &text[start..end];
        let read = match held {
            Opaque::Text(decoded) if depth + 1 < MAX_OPAQUE_DEPTH => {
                let mut inner = Vec::new();
                let treated =
                    treat_at(&decoded, secrets, rules, Shape::Text, depth + 1, &mut inner);
                Some((treated.into_owned(), inner))
            }
            // A token, bytes that are not text, or text nested deeper than is read.
            Opaque::Text(_) | Opaque::Binary => None,
        };
        match read {
            None => {
                out.push_str(Finding::Opaque.marker());
                found.push(Finding::Opaque);
            }
            Some((treated, inner)) => {
                let holds_data = inner
                    .iter()
                    .any(|f| matches!(f, Finding::Email | Finding::Ip | Finding::Secret));
                match rules.level {
                    Level::Basic if run.len() >= MIN_TOKEN || holds_data => {
                        out.push_str(Finding::Opaque.marker());
                        found.extend(inner);
                        found.push(Finding::Opaque);
                    }
                    Level::Extended if !inner.is_empty() => {
                        out.push_str(&treated);
                        found.extend(inner);
                    }
                    // Read, and nothing in it: kept as written.
                    Level::Basic | Level::Extended => out.push_str(run),
                }
            }
        }
    }
    out.push_str(&text[at..]);
    out
}

/// The first kind of personal data in `text`, also inside what its opaque runs decode to (for
/// values that must not be altered, such as ids: they are refused instead).
pub fn first_finding(text: &str, secrets: &Secrets) -> Option<Finding> {
    if !worth_scanning(text, secrets, Level::Extended, Shape::Text) {
        return None;
    }
    first_finding_at(text, secrets, 0)
}

fn first_finding_at(text: &str, secrets: &Secrets, depth: usize) -> Option<Finding> {
    let decoded = decode(text);
    if let Some(span) = find::find(&decoded, secrets).first() {
        return Some(span.finding);
    }
    opaque_spans(&decoded)
        .into_iter()
        .find_map(|(_, _, held)| match held {
            // Text encoded deeper than is read: what it holds cannot be known.
            Opaque::Text(_) if depth + 1 >= MAX_OPAQUE_DEPTH => Some(Finding::Opaque),
            Opaque::Text(inner) => first_finding_at(&inner, secrets, depth + 1),
            Opaque::Binary => None,
        })
}

/// Whether `text` could hold anything [`treat`] acts on: an `@`, an encoding (`%`, `\`, `&`, any
/// non-ASCII character), two colons (IPv6), a digit, a dot and a digit (IPv4), a run that could be
/// encoded, or (BASIC) a URL. One pass over the bytes.
fn worth_scanning(text: &str, secrets: &Secrets, level: Level, shape: Shape) -> bool {
    if !secrets.is_empty() || (level == Level::Basic && shape == Shape::Url) {
        return true;
    }
    let bytes = text.as_bytes();
    let mut colons = 0;
    let mut run = 0;
    // A run ends where it may hold something: 4n + 1 characters are neither base64 nor hex, so a
    // word such as `pluginKey` is passed over; a token-long run is always looked at.
    let run_matters = |run: usize| run >= MIN_TOKEN || (run >= MIN_RUN && run % 4 != 1);
    for (i, b) in bytes.iter().enumerate() {
        // A run with its `=` padding.
        if opaque::is_run_char(*b) || *b == b'=' {
            run += 1;
            if run >= MIN_TOKEN {
                return true;
            }
            continue;
        }
        if run_matters(run) {
            return true;
        }
        run = 0;
        match b {
            b'@' | b'%' | b'\\' | b'&' => return true,
            b if !b.is_ascii() => return true,
            b':' if level == Level::Basic && bytes[i + 1..].starts_with(b"//") => {
                return true;
            }
            b':' => {
                colons += 1;
                if colons >= 2 {
                    return true;
                }
            }
            b'.' if i > 0
                && bytes[i - 1].is_ascii_digit()
                && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) =>
            {
                return true;
            }
            _ => {}
        }
    }
    run_matters(run)
}

#[cfg(test)]
mod tests;
