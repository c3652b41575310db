//! Conversions between Unix milliseconds, as stored, and protobuf timestamps, as sent.

use prost_types::Timestamp;

pub const SECOND_MS: i64 = 1_000;
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
