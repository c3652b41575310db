//! Per-tenant rate limits: a token bucket per tenant key, refilled continuously.

use std::time::Instant;

use dashmap::DashMap;
use tonic::Status;

use crate::settings::Limits;

#[derive(Debug)]
pub struct RateLimiter {
    rate_per_second: f64,
    burst: f64,
    buckets: DashMap<String, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    pub fn new(limits: &Limits) -> Self {
        Self {
            rate_per_second: f64::from(limits.rate_per_second.max(1)),
            burst: f64::from(limits.rate_burst.max(1)),
            buckets: DashMap::new(),
        }
    }

    /// Takes one call from `tenant`'s bucket, or says when to retry.
    pub fn check(&self, tenant: &str) -> Result<(), Status> {
        self.check_at(tenant, Instant::now())
    }

    fn check_at(&self, tenant: &str, now: Instant) -> Result<(), Status> {
        let mut bucket = self.buckets.entry(tenant.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            refilled_at: now,
        });
        let elapsed = now
            .saturating_duration_since(bucket.refilled_at)
            .as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_second).min(self.burst);
        bucket.refilled_at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait_ms = ((1.0 - bucket.tokens) / self.rate_per_second * 1_000.0).ceil();
            let mut status = Status::resource_exhausted(format!(
                "rate limit of {} calls per second exceeded; retry in {wait_ms} ms",
                self.rate_per_second
            ));
            if let Ok(value) = wait_ms.to_string().parse() {
                status.metadata_mut().insert("retry-after-ms", value);
            }
            Err(status)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_tenant_past_its_burst_is_refused_and_others_are_not() {
        let limiter = RateLimiter::new(&Limits {
            rate_per_second: 10,
            rate_burst: 3,
            ..Limits::default()
        });
        let now = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("org-a", now).is_ok());
        }
        let refused = limiter.check_at("org-a", now).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.metadata().get("retry-after-ms").is_some());
        assert!(limiter.check_at("org-b", now).is_ok());
        // 100 ms refills one call at 10 per second.
        assert!(
            limiter
                .check_at("org-a", now + Duration::from_millis(100))
                .is_ok()
        );
    }
}
