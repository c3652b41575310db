//! How values from the services are written on pages.

use prost_types::Timestamp;
use sightline_runtime::time::{from_proto, minute_text};

/// "YYYY-MM-DD HH:MM UTC", or "—" when absent.
pub(crate) fn when(ts: Option<&Timestamp>) -> String {
    ts.map_or_else(|| "—".to_owned(), |t| minute_text(from_proto(t)))
}

/// An enum value's name without its type prefix: `USAGE_LEVEL_BASIC` → "BASIC".
pub(crate) fn name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_owned()
}

/// A number with at most `decimals` decimals, trailing zeros dropped.
pub(crate) fn number(value: f64, decimals: usize) -> String {
    if !value.is_finite() {
        return "—".to_owned();
    }
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// The change from `before` to `now` as a signed percentage, or "new" when there was nothing.
pub(crate) fn change(now: u64, before: u64) -> String {
    if before == 0 {
        return if now == 0 {
            "no change".to_owned()
        } else {
            "new".to_owned()
        };
    }
    #[allow(clippy::cast_precision_loss)]
    let pct = (now as f64 - before as f64) / before as f64 * 100.0;
    let sign = if pct > 0.0 { "+" } else { "" };
    format!("{sign}{}%", number(pct, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_changes_read_plainly() {
        assert_eq!(number(12.5, 2), "12.5");
        assert_eq!(number(3.0, 2), "3");
        assert_eq!(number(f64::NAN, 2), "—");
        assert_eq!(change(150, 100), "+50%");
        assert_eq!(change(50, 100), "-50%");
        assert_eq!(change(5, 0), "new");
        assert_eq!(change(0, 0), "no change");
        assert_eq!(name("USAGE_LEVEL_BASIC", "USAGE_LEVEL_"), "BASIC");
        assert_eq!(when(None), "—");
    }
}
