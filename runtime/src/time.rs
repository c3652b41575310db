//! Conversions between Unix milliseconds, as stored, and protobuf timestamps, as sent.

use prost_types::Timestamp;

pub const SECOND_MS: i64 = 1_000;
pub const HOUR_MS: i64 = 3_600 * SECOND_MS;
pub const DAY_MS: i64 = 86_400 * SECOND_MS;

pub fn to_proto(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1_000),
        nanos: i32::try_from(ms.rem_euclid(1_000) * 1_000_000).unwrap_or(0),
    }
}

pub fn to_proto_opt(ms: Option<i64>) -> Option<Timestamp> {
    ms.map(to_proto)
}

pub fn from_proto(ts: &Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000)
        .saturating_add(i64::from(ts.nanos) / 1_000_000)
}

/// A request's required time range as [start, end) in milliseconds: both ends given, end after
/// start, and at most `max_days` long; errors name the field.
pub fn required_range(
    range: Option<&sightline_proto::common::v1::TimeRange>,
    max_days: i64,
) -> Result<(i64, i64), tonic::Status> {
    use tonic::Status;
    let range = range.ok_or_else(|| Status::invalid_argument("range: is required"))?;
    let start = range
        .start
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("range.start: is required"))?;
    let end = range
        .end
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("range.end: is required"))?;
    let (start, end) = (from_proto(start), from_proto(end));
    if end <= start {
        return Err(Status::invalid_argument(
            "range.end: must be after range.start",
        ));
    }
    if end - start > max_days.saturating_mul(DAY_MS) {
        return Err(Status::invalid_argument(format!(
            "range: covers more than {max_days} days"
        )));
    }
    Ok((start, end))
}

/// "YYYY-MM-DD" of a day number (days since 1970-01-01, UTC).
pub fn day_text(day: i64) -> String {
    // Howard Hinnant's civil-from-days.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The day number of "YYYY-MM-DD" (the inverse of `day_text`); None for anything else, including a
/// day that does not exist (2026-02-30).
pub fn day_of_text(text: &str) -> Option<i64> {
    let mut parts = text.splitn(3, '-');
    let mut next = |len: usize| {
        parts
            .next()
            .filter(|p| p.len() == len && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<i64>().ok())
    };
    let (y, m, d) = (next(4)?, next(2)?, next(2)?);
    if !(1..=12).contains(&m) || d < 1 {
        return None;
    }
    // Howard Hinnant's days-from-civil.
    let y_march = if m <= 2 { y - 1 } else { y };
    let era = y_march.div_euclid(400);
    let yoe = y_march - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let day = era * 146_097 + doe - 719_468;
    (day_text(day) == text).then_some(day)
}

/// "YYYY-MM-DD HH:MM UTC" of Unix milliseconds.
pub fn minute_text(ms: i64) -> String {
    let day = ms.div_euclid(DAY_MS);
    let in_day = ms.rem_euclid(DAY_MS) / 60_000;
    format!(
        "{} {:02}:{:02} UTC",
        day_text(day),
        in_day / 60,
        in_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_their_text_round_trip() {
        for day in [-700_000, -1, 0, 1, 19_723, 20_514, 20_789, 2_000_000] {
            assert_eq!(day_of_text(&day_text(day)), Some(day), "{day}");
        }
        assert_eq!(day_text(20_514), "2026-03-02");
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "2026-1-01",
            "26-01-01",
            "2026-01-01x",
            "",
            "abcd-ef-gh",
        ] {
            assert_eq!(day_of_text(bad), None, "{bad}");
        }
        assert_eq!(
            minute_text(20_514 * DAY_MS + 3_723_000),
            "2026-03-02 01:02 UTC"
        );
    }

    #[test]
    fn round_trips_including_before_the_epoch() {
        for ms in [0, 1, 999, 1_000, 1_700_000_000_123, -1, -1_001] {
            assert_eq!(from_proto(&to_proto(ms)), ms);
        }
    }
}
