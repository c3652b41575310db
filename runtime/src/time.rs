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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_including_before_the_epoch() {
        for ms in [0, 1, 999, 1_000, 1_700_000_000_123, -1, -1_001] {
            assert_eq!(from_proto(&to_proto(ms)), ms);
        }
    }
}
