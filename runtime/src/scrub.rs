//! Finding personal data inside text: e-mail addresses, IP addresses (v4 and v6) and the event's
//! own values that the policy does not let through (display names, usernames, and — under BASIC —
//! keys and names), also when they hide behind percent-encoding (URLs, query strings), JSON string
//! escapes or HTML character references.
//!
//! [`scrub`] returns the text with every finding replaced by a marker (`[email]`, `[ip]`,
//! `[redacted]`), or None when nothing was found (the text is then kept byte for byte). When the text
//! had to be decoded to be read, the scrubbed result is the decoded text: an encoded form could
//! otherwise carry what was removed.
//!
//! It is on the ingest hot path: text with none of `@ : . % \ &` and no secret is passed over after
//! one scan.

use std::borrow::Cow;
use std::net::Ipv6Addr;

use memchr::memmem;

/// What was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Finding {
    Email,
    Ip,
    /// One of the event's own values that may not be stored as text.
    Secret,
}

impl Finding {
    pub const fn marker(self) -> &'static str {
        match self {
            Finding::Email => "[email]",
            Finding::Ip => "[ip]",
            Finding::Secret => "[redacted]",
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Finding::Email => "e-mail address",
            Finding::Ip => "IP address",
            Finding::Secret => "personal value of the same event",
        }
    }
}

/// Values of the event that must not appear in stored text, lower-cased (ASCII). Values shorter
/// than three characters are not searched for: they would match everywhere.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    values: Vec<String>,
}

/// Values shorter than this are not searched for in text.
pub const MIN_SECRET_LEN: usize = 3;

impl Secrets {
    pub fn add(&mut self, value: &str) {
        let value = value.trim();
        if value.len() >= MIN_SECRET_LEN {
            let lower = value.to_ascii_lowercase();
            if !self.values.contains(&lower) {
                self.values.push(lower);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn clear(&mut self) {
        self.values.clear();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
    finding: Finding,
}

/// The text with its personal data replaced, and what was found; None when nothing was.
pub fn scrub(text: &str, secrets: &Secrets) -> Option<(String, Vec<Finding>)> {
    if !worth_scanning(text, secrets) {
        return None;
    }
    let decoded = decode(text);
    let spans = find(&decoded, secrets);
    if spans.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(decoded.len());
    let mut at = 0;
    let mut found = Vec::with_capacity(spans.len());
    for span in spans {
        out.push_str(&decoded[at..span.start]);
        out.push_str(span.finding.marker());
        found.push(span.finding);
        at = span.end;
    }
    out.push_str(&decoded[at..]);
    Some((out, found))
}

/// The first kind of personal data in `text`, if any (for values that must not be altered, such as
/// ids: they are refused instead).
pub fn first_finding(text: &str, secrets: &Secrets) -> Option<Finding> {
    if !worth_scanning(text, secrets) {
        return None;
    }
    let decoded = decode(text);
    find(&decoded, secrets).first().map(|s| s.finding)
}

/// Whether `text` could hold anything [`find`] looks for: an `@`, an encoding (`%`, `\`, `&`), two
/// colons (IPv6), or a digit, a dot and a digit (IPv4). One pass over the bytes.
fn worth_scanning(text: &str, secrets: &Secrets) -> bool {
    if !secrets.is_empty() {
        return true;
    }
    let bytes = text.as_bytes();
    let mut colons = 0;
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'@' | b'%' | b'\\' | b'&' => return true,
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
    false
}

/// Undoes percent-encoding, JSON `\uXXXX` escapes and numeric HTML character references, up to
/// three layers deep.
fn decode(text: &str) -> Cow<'_, str> {
    let mut current = Cow::Borrowed(text);
    for _ in 0..3 {
        let mut changed = false;
        if current.contains('%') {
            let decoded = percent_encoding::percent_decode_str(&current).decode_utf8_lossy();
            if decoded != current {
                let owned = decoded.into_owned();
                current = Cow::Owned(owned);
                changed = true;
            }
        }
        if current.contains('\\')
            && let Some(unescaped) = json_unescape(&current)
        {
            current = Cow::Owned(unescaped);
            changed = true;
        }
        if current.contains("&#")
            && let Some(unescaped) = html_unescape(&current)
        {
            current = Cow::Owned(unescaped);
            changed = true;
        }
        if !changed {
            break;
        }
    }
    current
}

fn json_unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut rest = text;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(hex) = tail.strip_prefix("\\u").and_then(|t| t.get(..4))
            && let Ok(unit) = u16::from_str_radix(hex, 16)
        {
            let mut consumed = 6;
            let decoded = if (0xD800..0xDC00).contains(&unit) {
                tail.get(6..12)
                    .and_then(|low| low.strip_prefix("\\u"))
                    .and_then(|low| u16::from_str_radix(low, 16).ok())
                    .and_then(|low| {
                        consumed = 12;
                        char::decode_utf16([unit, low]).next()?.ok()
                    })
            } else {
                char::from_u32(u32::from(unit))
            };
            out.push(decoded.unwrap_or(char::REPLACEMENT_CHARACTER));
            rest = &tail[consumed..];
            changed = true;
        } else if let Some(after) = tail.strip_prefix("\\/") {
            out.push('/');
            rest = after;
            changed = true;
        } else {
            out.push('\\');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

fn html_unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut rest = text;
    while let Some(i) = rest.find("&#") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 2..];
        let (digits, radix) = match tail.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16),
            None => (tail, 10),
        };
        let end = digits
            .find(|c: char| !c.is_digit(radix))
            .unwrap_or(digits.len());
        let code = (end > 0 && end <= 7)
            .then(|| u32::from_str_radix(&digits[..end], radix).ok())
            .flatten()
            .and_then(char::from_u32);
        match code {
            Some(c) => {
                out.push(c);
                let skip = usize::from(digits.get(end..).is_some_and(|d| d.starts_with(';')));
                rest = &digits[end + skip..];
                changed = true;
            }
            None => {
                out.push_str("&#");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

fn find(text: &str, secrets: &Secrets) -> Vec<Span> {
    let mut spans = Vec::new();
    let bytes = text.as_bytes();
    for at in memchr::memchr_iter(b'@', bytes) {
        if let Some(span) = email_at(bytes, at) {
            spans.push(span);
        }
    }
    ipv4(bytes, &mut spans);
    if memchr::memchr(b':', bytes).is_some() {
        ipv6(text, &mut spans);
    }
    if !secrets.is_empty() {
        let lower = text.to_ascii_lowercase();
        for secret in &secrets.values {
            for start in memmem::find_iter(lower.as_bytes(), secret.as_bytes()) {
                let end = start + secret.len();
                if text.is_char_boundary(start) && text.is_char_boundary(end) {
                    spans.push(Span {
                        start,
                        end,
                        finding: Finding::Secret,
                    });
                }
            }
        }
    }
    merge(spans)
}

/// Sorts spans and joins overlapping ones (the first finding names the joined span).
fn merge(mut spans: Vec<Span>) -> Vec<Span> {
    if spans.len() < 2 {
        return spans;
    }
    spans.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
    let mut merged: Vec<Span> = Vec::with_capacity(spans.len());
    for span in spans {
        match merged.last_mut() {
            Some(last) if span.start < last.end => last.end = last.end.max(span.end),
            _ => merged.push(span),
        }
    }
    merged
}

/// The characters of a local part as addresses are written in practice (the rarer RFC 5322 ones,
/// such as `/ = ?`, would swallow the URL around an address).
fn is_local_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-' | b'\'')
}

fn is_domain_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// An address around the `@` at `at`: any local part and any host, so `admin@localhost` counts.
fn email_at(bytes: &[u8], at: usize) -> Option<Span> {
    let mut start = at;
    while start > 0 && is_local_char(bytes[start - 1]) {
        start -= 1;
    }
    let mut end = at + 1;
    while end < bytes.len() && is_domain_char(bytes[end]) {
        end += 1;
    }
    // A trailing dot or hyphen ends a sentence, not the domain.
    while end > at + 1 && matches!(bytes[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let local_has_word = bytes[start..at].iter().any(u8::is_ascii_alphanumeric);
    let domain_has_word = bytes[at + 1..end].iter().any(u8::is_ascii_alphanumeric);
    (local_has_word && domain_has_word).then_some(Span {
        start,
        end,
        finding: Finding::Email,
    })
}

/// Dotted quads whose parts are 0 to 255, not inside a longer run of digits and dots.
fn ipv4(bytes: &[u8], spans: &mut Vec<Span>) {
    let mut i = 0;
    while i < bytes.len() {
        // Not inside a longer dotted number: a digit before, or a dot after a digit, rules it out
        // ("1.2.3.4.5"), while a dot after a letter does not ("latency.10.0.0.1").
        let inside_number = i > 0
            && (bytes[i - 1].is_ascii_digit()
                || (bytes[i - 1] == b'.' && i > 1 && bytes[i - 2].is_ascii_digit()));
        if bytes[i].is_ascii_digit()
            && !inside_number
            && let Some(end) = dotted_quad(bytes, i)
        {
            spans.push(Span {
                start: i,
                end,
                finding: Finding::Ip,
            });
            i = end;
            continue;
        }
        i += 1;
    }
}

fn dotted_quad(bytes: &[u8], start: usize) -> Option<usize> {
    let mut at = start;
    for part in 0..4 {
        let digits_start = at;
        let mut value: u32 = 0;
        while at < bytes.len() && bytes[at].is_ascii_digit() && at - digits_start < 3 {
            value = value * 10 + u32::from(bytes[at] - b'0');
            at += 1;
        }
        if at == digits_start || value > 255 {
            return None;
        }
        if at < bytes.len() && bytes[at].is_ascii_digit() {
            return None;
        }
        if part < 3 {
            if bytes.get(at) != Some(&b'.') {
                return None;
            }
            at += 1;
        }
    }
    // Not followed by more of a dotted number.
    let continues =
        bytes.get(at) == Some(&b'.') && bytes.get(at + 1).is_some_and(u8::is_ascii_digit);
    (!continues).then_some(at)
}

fn is_v6_char(b: u8) -> bool {
    b.is_ascii_hexdigit() || b == b':' || b == b'.'
}

/// Runs of hex digits, colons and dots with at least two colons that parse as an IPv6 address and
/// stand alone (no letter or digit right before or after).
fn ipv6(text: &str, spans: &mut Vec<Span>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !is_v6_char(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_v6_char(bytes[i]) {
            i += 1;
        }
        let mut end = i;
        let colons = bytes[start..end].iter().filter(|b| **b == b':').count();
        if colons < 2 {
            continue;
        }
        let bounded_before =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let bounded_after =
            end == bytes.len() || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
        if !bounded_before || !bounded_after {
            continue;
        }
        // A sentence's full stop, or a port after the address.
        while end > start + 2 && bytes[end - 1] == b'.' {
            end -= 1;
        }
        let candidate = &text[start..end];
        if !candidate.bytes().any(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        if candidate.parse::<Ipv6Addr>().is_ok() {
            spans.push(Span {
                start,
                end,
                finding: Finding::Ip,
            });
        } else if let Some(cut) = candidate.rfind(':')
            && cut > 0
            && candidate[..cut].parse::<Ipv6Addr>().is_ok()
        {
            spans.push(Span {
                start,
                end: start + cut,
                finding: Finding::Ip,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubbed(text: &str) -> String {
        scrub(text, &Secrets::default()).map_or_else(|| text.to_owned(), |(s, _)| s)
    }

    #[test]
    fn plain_text_is_untouched() {
        for text in [
            "jvm.cpu.load",
            "com.atlassian.jira.plugin",
            "version 9.12.4",
            "ratio 1.5",
            "12:30:45",
            "std::vector",
            "aa:bb:cc:dd:ee:ff",
            "1.2.3.4.5",
            "",
        ] {
            assert!(scrub(text, &Secrets::default()).is_none(), "{text}");
        }
    }

    #[test]
    fn emails_are_removed_also_when_encoded() {
        assert_eq!(
            scrubbed("mail bob.smith+x@example.com now"),
            "mail [email] now"
        );
        assert_eq!(scrubbed("admin@localhost"), "[email]");
        assert_eq!(
            scrubbed("https://x.test/p?user=bob%40example.com&a=1"),
            "https://x.test/p?user=[email]&a=1"
        );
        assert_eq!(scrubbed("bob%2540example.com"), "[email]");
        assert_eq!(
            scrubbed(r#"{"u":"bob\u0040example.com"}"#),
            r#"{"u":"[email]"}"#
        );
        assert_eq!(scrubbed("bob&#64;example.com"), "[email]");
        assert_eq!(scrubbed("Contact: bob@example.com."), "Contact: [email].");
    }

    #[test]
    fn ip_addresses_are_removed() {
        assert_eq!(scrubbed("from 10.0.0.12:8080"), "from [ip]:8080");
        assert_eq!(scrubbed("ip=192.168.1.1&x"), "ip=[ip]&x");
        assert_eq!(scrubbed("2001:db8::1"), "[ip]");
        assert_eq!(scrubbed("[fe80::1]:443"), "[[ip]]:443");
        assert_eq!(scrubbed("addr ::ffff:10.0.0.1 end"), "addr [ip] end");
        assert_eq!(scrubbed("x=2001%3Adb8%3A%3A7"), "x=[ip]");
        assert_eq!(scrubbed("999.1.1.1"), "999.1.1.1");
        assert_eq!(scrubbed("latency.10.0.0.1"), "latency.[ip]");
    }

    #[test]
    fn the_events_own_values_are_removed_case_insensitively() {
        let mut secrets = Secrets::default();
        secrets.add("Alice Smith");
        secrets.add("PROJ");
        secrets.add("ab");
        let (text, found) = scrub("viewed by alice smith in PROJ-12 (ab)", &secrets).unwrap();
        assert_eq!(text, "viewed by [redacted] in [redacted]-12 (ab)");
        assert_eq!(found, vec![Finding::Secret, Finding::Secret]);
    }

    #[test]
    fn ids_with_personal_data_are_recognised() {
        assert_eq!(
            first_finding("bob@example.com", &Secrets::default()),
            Some(Finding::Email)
        );
        assert_eq!(
            first_finding("10.1.2.3", &Secrets::default()),
            Some(Finding::Ip)
        );
        assert_eq!(first_finding("page-123", &Secrets::default()), None);
    }

    proptest::proptest! {
        #[test]
        fn scrubbing_never_panics_and_leaves_no_email(prefix in "\\PC{0,40}", suffix in "\\PC{0,40}") {
            let text = format!("{prefix} carol@example.org {suffix}");
            let (out, _) = scrub(&text, &Secrets::default()).unwrap();
            proptest::prop_assert!(!out.contains("carol@example.org"));
        }

        #[test]
        fn scrubbing_arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let mut secrets = Secrets::default();
            secrets.add("ÄÖÜ name");
            let _ = scrub(&text, &secrets);
        }
    }
}
