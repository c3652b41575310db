//! URLs under BASIC sharing: a URL keeps its scheme, host (and port) and path, with every path
//! segment that is not an id replaced (keys, titles and names are not BASIC data); its user
//! information and fragment are dropped, and its query too, but for the keys an operator named in
//! `collection.url_query_keys` (empty by default), whose values are then scrubbed like any text.
//! An id is a number or a UUID.

use super::Finding;

/// What a path segment that is not an id becomes.
pub(crate) const SEGMENT_MARKER: &str = "[redacted]";

fn is_id_segment(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    (!bytes.is_empty() && bytes.len() <= 32 && bytes.iter().all(u8::is_ascii_digit))
        || super::opaque::is_uuid(segment)
}

/// The length of a `scheme://` at the start of `text`, if it has one.
fn scheme_len(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    if !bytes.first().is_some_and(u8::is_ascii_alphabetic) {
        return None;
    }
    let end = bytes
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'-')))?;
    text[end..].starts_with("://").then_some(end + 3)
}

/// `url` reduced to what BASIC keeps; `found` gets [`Finding::Reduced`] when anything was removed.
pub(crate) fn reduce(url: &str, query_keys: &[String], found: &mut Vec<Finding>) -> String {
    let mut out = String::with_capacity(url.len());
    let mut reduced = false;
    let mut rest = url;
    if let Some(len) = scheme_len(url) {
        out.push_str(&url[..len]);
        rest = &url[len..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str(&authority[at + 1..]);
                reduced = true;
            }
            None => out.push_str(authority),
        }
        rest = &rest[authority_end..];
    } else if !rest.starts_with(['/', '?', '#']) {
        // No scheme: a host when the first segment looks like one (`wiki.example/x`), else a path.
        let first_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let first = &rest[..first_end];
        if first.contains('.') && !first.contains(' ') {
            match first.rfind('@') {
                Some(at) => {
                    out.push_str(&first[at + 1..]);
                    reduced = true;
                }
                None => out.push_str(first),
            }
            rest = &rest[first_end..];
        }
    }
    let path_end = rest.find(['?', '#']).unwrap_or(rest.len());
    for (i, segment) in rest[..path_end].split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if segment.is_empty() || is_id_segment(segment) {
            out.push_str(segment);
        } else {
            out.push_str(SEGMENT_MARKER);
            reduced = true;
        }
    }
    rest = &rest[path_end..];
    let (query, fragment) = match rest.find('#') {
        Some(hash) => (&rest[..hash], &rest[hash + 1..]),
        None => (rest, ""),
    };
    if !fragment.is_empty() {
        reduced = true;
    }
    if let Some(query) = query.strip_prefix('?') {
        let mut kept = 0;
        for pair in query.split(['&', ';']).filter(|p| !p.is_empty()) {
            let key = pair.split('=').next().unwrap_or_default();
            if query_keys.iter().any(|k| k == key) {
                out.push(if kept == 0 { '?' } else { '&' });
                out.push_str(pair);
                kept += 1;
            } else {
                reduced = true;
            }
        }
    }
    if reduced {
        found.push(Finding::Reduced);
    }
    out
}

/// Where the URLs in free text are: `scheme://` up to a space, a quote or a bracket.
pub(crate) fn embedded(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let colon = from + found;
        let mut start = colon;
        while start > 0
            && (bytes[start - 1].is_ascii_alphanumeric()
                || matches!(bytes[start - 1], b'+' | b'.' | b'-'))
        {
            start -= 1;
        }
        let mut end = colon + 3;
        while end < bytes.len()
            && !bytes[end].is_ascii_whitespace()
            && !matches!(
                bytes[end],
                b'"' | b'\'' | b'<' | b'>' | b'`' | b')' | b']' | b'}'
            )
        {
            end += 1;
        }
        if start < colon {
            spans.push((start, end));
        }
        from = end.max(colon + 3);
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(url: &str, keys: &[&str]) -> String {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        reduce(url, &keys, &mut Vec::new())
    }

    #[test]
    fn basic_keeps_scheme_host_and_id_segments() {
        assert_eq!(
            basic("https://wiki.example/x/98311?from=mara&utm=1#top", &[]),
            "https://wiki.example/[redacted]/98311"
        );
        assert_eq!(
            basic("https://wiki.example:8443/display/OPS/Q3+plan", &[]),
            "https://wiki.example:8443/[redacted]/[redacted]/[redacted]"
        );
        assert_eq!(
            basic("https://mara:secret@wiki.example/", &[]),
            "https://wiki.example/"
        );
        assert_eq!(
            basic("https://jira.acme.example", &[]),
            "https://jira.acme.example"
        );
        assert_eq!(
            basic("/rest/api/2/issue/10042?expand=names", &[]),
            "/[redacted]/[redacted]/2/[redacted]/10042"
        );
        assert_eq!(
            basic(
                "wiki.example/pages/123e4567-e89b-12d3-a456-426614174000",
                &[]
            ),
            "wiki.example/[redacted]/123e4567-e89b-12d3-a456-426614174000"
        );
    }

    #[test]
    fn allow_listed_query_keys_are_kept() {
        assert_eq!(
            basic(
                "https://w.example/1?utm_source=mail&who=mara&page=2",
                &["utm_source", "page"]
            ),
            "https://w.example/1?utm_source=mail&page=2"
        );
    }

    #[test]
    fn urls_are_found_in_free_text() {
        let text = "see https://w.example/a?b=c, and (ftp://h.example/x) end";
        let found: Vec<&str> = embedded(text).iter().map(|(s, e)| &text[*s..*e]).collect();
        assert_eq!(found, vec!["https://w.example/a?b=c,", "ftp://h.example/x"]);
    }
}
