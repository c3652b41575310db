//! Call deadlines: the client's `grpc-timeout`, capped by the server's own limit
//! (`limits.request_timeout_ms`). The server ends a call there (DEADLINE_EXCEEDED), and services
//! refuse a change that could not be recorded before it.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// A `grpc-timeout` header value (e.g. `150m`), as the gRPC wire spec defines it.
pub fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// How long a call may run: the client's `grpc-timeout` header (when it sent a valid one) or the
/// server's `limit`, whichever is shorter.
pub fn call_timeout(grpc_timeout_header: Option<&str>, limit: Duration) -> Duration {
    grpc_timeout_header
        .and_then(grpc_timeout)
        .map_or(limit, |t| t.min(limit))
}

/// When the call carrying `metadata` must be done by, measured from now.
pub fn call_deadline(metadata: &MetadataMap, limit: Duration) -> Instant {
    let header = metadata.get("grpc-timeout").and_then(|v| v.to_str().ok());
    Instant::now() + call_timeout(header, limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_the_server_limit_caps_them() {
        let limit = Duration::from_secs(3600);
        let mut metadata = MetadataMap::new();
        let left = |metadata: &MetadataMap| {
            call_deadline(metadata, limit)
                .duration_since(Instant::now())
                .as_millis()
        };
        assert!(
            (3_599_000..=3_600_000).contains(&left(&metadata)),
            "no header: the limit"
        );
        for (value, at_least_ms, at_most_ms) in [
            ("2S", 1_900, 2_000),
            ("150m", 100, 150),
            ("3000000u", 2_900, 3_000),
            ("1M", 59_000, 60_000),
        ] {
            metadata.insert("grpc-timeout", value.parse().unwrap());
            let left = left(&metadata);
            assert!(
                (at_least_ms..=at_most_ms).contains(&left),
                "{value}: {left}"
            );
        }
        assert_eq!(grpc_timeout("5x"), None);
        assert_eq!(call_timeout(Some("5x"), limit), limit);
        assert_eq!(
            call_timeout(Some("2H"), limit),
            limit,
            "capped by the limit"
        );
    }
}
