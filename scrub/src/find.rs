//! Finding personal data in decoded text: e-mail addresses (any local part, any host, IDN
//! included), IPv4 addresses (dotted, with leading zeros or hexadecimal parts), IPv6 addresses in
//! every textual form (full, compressed, upper case, with an embedded IPv4, a zone, in brackets with
//! a port, and the `ipv6-literal.net` form), and the event's own values that the policy does not let
//! through (display names, usernames, and — under BASIC — keys and names), compared case-folded with
//! every separator (`+ _ . -`, spaces) alike, so `Mara+Voss`, `mara_voss` and `MARA VOSS` are one.

use std::net::Ipv6Addr;

use memchr::memmem;

use super::Finding;
use super::decode::decode;

/// Values of the event that must not appear in stored text, decoded and folded (see [`fold`]).
/// Values shorter than [`MIN_SECRET_LEN`] are not searched for: they would match everywhere.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    values: Vec<String>,
}

/// Values shorter than this are not searched for in text.
pub const MIN_SECRET_LEN: usize = 3;

impl Secrets {
    pub fn add(&mut self, value: &str) {
        let decoded = decode(value.trim());
        let folded = fold(decoded.trim()).text;
        let folded = folded.trim();
        if folded.len() >= MIN_SECRET_LEN && !self.values.iter().any(|v| v == folded) {
            self.values.push(folded.to_owned());
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
pub(crate) struct Span {
    pub start: usize,
    pub end: usize,
    pub finding: Finding,
}

/// Text folded for comparison: lower case, every separator a space; with, for each byte of the
/// folded text, where the character it came from starts and ends in the original.
#[derive(Debug)]
pub(crate) struct Folded {
    pub text: String,
    starts: Vec<usize>,
    ends: Vec<usize>,
}

fn is_separator(c: char) -> bool {
    c.is_whitespace() || matches!(c, '+' | '_' | '.' | '-')
}

pub(crate) fn fold(text: &str) -> Folded {
    let mut folded = Folded {
        text: String::with_capacity(text.len()),
        starts: Vec::with_capacity(text.len()),
        ends: Vec::with_capacity(text.len()),
    };
    for (at, c) in text.char_indices() {
        let end = at + c.len_utf8();
        let before = folded.text.len();
        if is_separator(c) {
            folded.text.push(' ');
        } else {
            folded.text.extend(c.to_lowercase());
        }
        for _ in before..folded.text.len() {
            folded.starts.push(at);
            folded.ends.push(end);
        }
    }
    folded
}

/// Every finding in `text`, sorted, overlapping ones joined.
pub(crate) fn find(text: &str, secrets: &Secrets) -> Vec<Span> {
    let mut spans = Vec::new();
    let bytes = text.as_bytes();
    for at in memchr::memchr_iter(b'@', bytes) {
        if let Some(span) = email_at(bytes, at) {
            spans.push(span);
        }
    }
    if memchr::memchr(b'.', bytes).is_some() {
        ipv4(bytes, &mut spans);
        ipv6_literal_net(text, &mut spans);
    }
    if memchr::memchr(b':', bytes).is_some() {
        ipv6(text, &mut spans);
    }
    if !secrets.is_empty() {
        let folded = fold(text);
        for secret in &secrets.values {
            for start in memmem::find_iter(folded.text.as_bytes(), secret.as_bytes()) {
                let end = start + secret.len() - 1;
                spans.push(Span {
                    start: folded.starts[start],
                    end: folded.ends[end],
                    finding: Finding::Secret,
                });
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
/// such as `/ = ?`, would swallow the URL around an address); any non-ASCII character counts
/// (internationalized addresses), and keeps a span on character boundaries.
fn is_local_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || !b.is_ascii()
        || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-' | b'\'')
}

fn is_domain_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || !b.is_ascii() || matches!(b, b'.' | b'-' | b'_')
}

fn is_word(b: &u8) -> bool {
    b.is_ascii_alphanumeric() || !b.is_ascii()
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
    let local_has_word = bytes[start..at].iter().any(is_word);
    let domain_has_word = bytes[at + 1..end].iter().any(is_word);
    (local_has_word && domain_has_word).then_some(Span {
        start,
        end,
        finding: Finding::Email,
    })
}

/// Dotted quads whose parts are 0 to 255 (decimal, or `0x` hexadecimal), not inside a longer run
/// of digits and dots.
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

/// One part of a dotted quad at `at`: its value and where it ends.
fn quad_part(bytes: &[u8], at: usize) -> Option<(u32, usize)> {
    if bytes.get(at) == Some(&b'0') && matches!(bytes.get(at + 1), Some(b'x' | b'X')) {
        let digits_start = at + 2;
        let mut end = digits_start;
        let mut value = 0u32;
        while end < bytes.len() && end - digits_start < 2 && bytes[end].is_ascii_hexdigit() {
            value = value * 16 + char::from(bytes[end]).to_digit(16).unwrap_or(0);
            end += 1;
        }
        if end == digits_start || bytes.get(end).is_some_and(u8::is_ascii_hexdigit) {
            return None;
        }
        return Some((value, end));
    }
    let mut end = at;
    let mut value = 0u32;
    while end < bytes.len() && bytes[end].is_ascii_digit() && end - at < 3 {
        value = value * 10 + u32::from(bytes[end] - b'0');
        end += 1;
    }
    if end == at || value > 255 || bytes.get(end).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    Some((value, end))
}

fn dotted_quad(bytes: &[u8], start: usize) -> Option<usize> {
    let mut at = start;
    for part in 0..4 {
        let (_, end) = quad_part(bytes, at)?;
        at = end;
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
/// stand alone (no letter or digit right before or after; a zone `%eth0` may follow).
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
        let bounded_after = end == bytes.len()
            || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_')
            || bytes[end] == b'%';
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
        let found_end = if candidate.parse::<Ipv6Addr>().is_ok() {
            Some(end)
        } else {
            candidate
                .rfind(':')
                .filter(|cut| *cut > 0 && candidate[..*cut].parse::<Ipv6Addr>().is_ok())
                .map(|cut| start + cut)
        };
        if let Some(mut found_end) = found_end {
            // A zone names the interface of a link-local address: part of it.
            if bytes.get(found_end) == Some(&b'%') {
                found_end += 1;
                while found_end < bytes.len()
                    && (bytes[found_end].is_ascii_alphanumeric()
                        || matches!(bytes[found_end], b'_' | b'-' | b'.'))
                {
                    found_end += 1;
                }
            }
            spans.push(Span {
                start,
                end: found_end,
                finding: Finding::Ip,
            });
        }
    }
}

/// Windows' UNC form of an IPv6 address: `2001-db8--1.ipv6-literal.net` (`-` for `:`, `s` for the
/// zone's `%`).
fn ipv6_literal_net(text: &str, spans: &mut Vec<Span>) {
    const SUFFIX: &[u8] = b".ipv6-literal.net";
    let bytes = text.as_bytes();
    for at in memchr::memchr_iter(b'.', bytes) {
        if !bytes
            .get(at..at + SUFFIX.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(SUFFIX))
        {
            continue;
        }
        let mut start = at;
        while start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'-') {
            start -= 1;
        }
        let address: String = text[start..at]
            .split('s')
            .next()
            .unwrap_or_default()
            .replace('-', ":");
        if address.parse::<Ipv6Addr>().is_ok() {
            spans.push(Span {
                start,
                end: at + SUFFIX.len(),
                finding: Finding::Ip,
            });
        }
    }
}
