//! Text in and out. In: what text a person may give a name, a label, a reason or a group —
//! bounded, and free of control characters and of the invisible format characters that make text
//! read differently from what it is (bidirectional overrides and isolates, zero-width characters,
//! the byte-order mark, tags). Out: printing to standard output ([`print`], [`print_line`]).

/// A required identifier-like field of a request (a page id, a metric name): present and at most
/// 128 bytes; errors name the field.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, tonic::Status> {
    if value.is_empty() {
        return Err(tonic::Status::invalid_argument(format!(
            "{field}: is required"
        )));
    }
    if value.len() > 128 {
        return Err(tonic::Status::invalid_argument(format!(
            "{field}: longer than 128 bytes"
        )));
    }
    Ok(value)
}

/// Why `value` is not acceptable, or None. `max` counts characters; `newlines` allows `\n`.
pub fn problem(value: &str, max: usize, newlines: bool) -> Option<String> {
    if value.chars().count() > max {
        return Some(format!("is longer than {max} characters"));
    }
    if value
        .chars()
        .any(|c| c.is_control() && !(newlines && c == '\n'))
    {
        return Some("contains control characters".to_owned());
    }
    if value.chars().any(invisible) {
        return Some(
            "contains invisible formatting characters (bidirectional overrides, zero-width characters)"
                .to_owned(),
        );
    }
    None
}

/// Unicode format characters (category Cf) that change how text displays without showing.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

/// Writes to standard output. A reader that went away (`| head -1`) is not an error for a command
/// line tool: what it did not read it did not want (`println!` would panic instead).
pub fn print(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// [`print`] with a newline.
pub fn print_line(text: &str) -> std::io::Result<()> {
    print(&format!("{text}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_passes_and_tricks_do_not() {
        assert_eq!(problem("Acme Corp — Zürich 東京", 100, false), None);
        assert_eq!(problem("two\nlines", 100, true), None);
        assert!(problem("two\nlines", 100, false).is_some());
        for trick in [
            "invoice\u{202E}fdp.exe",
            "ad\u{200B}min",
            "\u{2066}isolate",
            "\u{FEFF}bom",
            "bell\u{7}",
        ] {
            assert!(problem(trick, 100, true).is_some(), "{trick:?}");
        }
        assert!(problem(&"x".repeat(101), 100, false).is_some());
    }
}
