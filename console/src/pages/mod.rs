//! The console's pages, one module per section.

pub(crate) mod audit;
pub(crate) mod consent;
pub(crate) mod health;
pub(crate) mod instances;
pub(crate) mod operator;
pub(crate) mod reports;
pub(crate) mod settings;
pub(crate) mod signin;

use sightline_proto::common::v1 as common_pb;

/// A time range of whole UTC days, [from, to], as the range filter of a page reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Days {
    pub from: i64,
    pub to: i64,
}

/// The longest range a page asks for.
const MAX_DAYS: i64 = 366;

impl Days {
    /// The days the query names (`from`, `to` as YYYY-MM-DD), else the `default_days` up to today.
    pub(crate) fn from_query(
        from: Option<&str>,
        to: Option<&str>,
        today: i64,
        default_days: i64,
    ) -> Result<Self, String> {
        let parse = |field: &str, text: Option<&str>, default: i64| match text.map(str::trim) {
            None | Some("") => Ok(default),
            Some(text) => sightline_runtime::time::day_of_text(text)
                .ok_or_else(|| format!("{field}: {text:?} is not a date (YYYY-MM-DD)")),
        };
        let to = parse("to", to, today)?;
        let from = parse("from", from, to - default_days + 1)?;
        if from > to {
            return Err("from: must not be after to".into());
        }
        if to - from + 1 > MAX_DAYS {
            return Err(format!("from: the range covers more than {MAX_DAYS} days"));
        }
        Ok(Self { from, to })
    }

    pub(crate) fn len(self) -> i64 {
        self.to - self.from + 1
    }

    /// The same number of days just before.
    pub(crate) fn previous(self) -> Self {
        Self {
            from: self.from - self.len(),
            to: self.from - 1,
        }
    }

    pub(crate) fn range(self) -> common_pb::TimeRange {
        use sightline_runtime::time::{DAY_MS, to_proto};
        common_pb::TimeRange {
            start: Some(to_proto(self.from * DAY_MS)),
            end: Some(to_proto((self.to + 1) * DAY_MS)),
        }
    }

    pub(crate) fn first_text(self) -> String {
        sightline_runtime::time::day_text(self.from)
    }

    pub(crate) fn last_text(self) -> String {
        sightline_runtime::time::day_text(self.to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_filter_reads_days_and_refuses_nonsense_by_field() {
        let today = 20_500;
        let d = Days::from_query(None, None, today, 30).unwrap();
        assert_eq!((d.from, d.to, d.len()), (today - 29, today, 30));
        assert_eq!(d.previous().to, d.from - 1);
        assert_eq!(d.previous().len(), 30);
        let d = Days::from_query(Some("2026-03-01"), Some("2026-03-02"), today, 30).unwrap();
        assert_eq!(d.len(), 2);
        assert!(
            Days::from_query(Some("x"), None, today, 30)
                .unwrap_err()
                .starts_with("from:")
        );
        assert!(
            Days::from_query(None, Some("2026-02-30"), today, 30)
                .unwrap_err()
                .starts_with("to:")
        );
        assert!(Days::from_query(Some("2026-03-03"), Some("2026-03-02"), today, 30).is_err());
        assert!(Days::from_query(Some("2020-01-01"), Some("2026-03-02"), today, 30).is_err());
    }
}
