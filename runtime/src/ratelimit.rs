//! Per-tenant rate limits (a token bucket per tenant key, refilled continuously) and a per-peer
//! budget of failed authentications, both in bounded memory: a bucket idle long enough to be full
//! again is forgotten (it would be recreated full), and at most `MAX_KEYS` are held, so a flood of
//! random keys or tokens cannot grow a service.

use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use tonic::Status;

use crate::settings::Limits;

const MAX_KEYS: u64 = 100_000;

/// A keyed hash of a caller's IP address: enough to tell peers apart for limits, never the address
/// (peer addresses are personal data and are neither logged nor stored). Put in each request's
/// extensions by the server.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey(u64);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(..)")
    }
}

impl PeerKey {
    pub fn of(ip: std::net::IpAddr) -> Self {
        // Keyed with a per-process random key, so the value says nothing outside this process.
        static KEY: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
        Self(KEY.get_or_init(Default::default).hash_one(ip))
    }

    /// The peer of a request, when the server recorded one.
    pub fn of_request<T>(request: &tonic::Request<T>) -> Option<Self> {
        request.extensions().get::<PeerKey>().copied()
    }
}

/// Token buckets by key, in bounded memory.
#[derive(Debug)]
struct Buckets<K: Hash + Eq + Send + Sync + 'static> {
    rate_per_second: f64,
    burst: f64,
    buckets: Cache<K, Arc<Mutex<Bucket>>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Buckets<K> {
    fn new(rate_per_second: u32, burst: u32) -> Self {
        let rate_per_second = f64::from(rate_per_second.max(1));
        let burst = f64::from(burst.max(1));
        // After this long idle a bucket is full again: forgetting it changes nothing.
        let refill = Duration::from_secs_f64(burst / rate_per_second) + Duration::from_secs(1);
        Self {
            rate_per_second,
            burst,
            buckets: Cache::builder()
                .max_capacity(MAX_KEYS)
                .time_to_idle(refill)
                .build(),
        }
    }

    fn bucket(&self, key: &K, now: Instant) -> Arc<Mutex<Bucket>> {
        self.buckets.get_with(key.clone(), || {
            Arc::new(Mutex::new(Bucket {
                tokens: self.burst,
                refilled_at: now,
            }))
        })
    }

    /// Refills, then takes `take` tokens if there are that many; otherwise how long to wait.
    fn take(&self, key: &K, now: Instant, take: f64) -> Result<(), u64> {
        let bucket = self.bucket(key, now);
        let mut bucket = bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = now
            .saturating_duration_since(bucket.refilled_at)
            .as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_second).min(self.burst);
        bucket.refilled_at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= take;
            Ok(())
        } else {
            // Whole milliseconds, at least one.
            let wait = ((1.0 - bucket.tokens) / self.rate_per_second * 1_000.0).ceil();
            Err(if wait >= 1.0 { wait as u64 } else { 1 })
        }
    }

    fn len(&self) -> u64 {
        self.buckets.run_pending_tasks();
        self.buckets.entry_count()
    }
}

fn refused(component: &'static str, limit: &'static str) {
    metrics::counter!(crate::metrics::REFUSED, "service" => component, "limit" => limit)
        .increment(1);
}

fn exhausted(message: String, wait_ms: u64) -> Status {
    retry_after(Status::resource_exhausted(message), wait_ms)
}

/// `status` with the `retry-after-ms` hint clients wait on before trying again.
pub fn retry_after(mut status: Status, wait_ms: u64) -> Status {
    if let Ok(value) = wait_ms.to_string().parse() {
        status.metadata_mut().insert("retry-after-ms", value);
    }
    status
}

#[derive(Debug)]
pub struct RateLimiter {
    component: &'static str,
    calls: Buckets<String>,
}

impl RateLimiter {
    /// `component` names the service in the refusal metric.
    pub fn new(component: &'static str, limits: &Limits) -> Self {
        Self {
            component,
            calls: Buckets::new(limits.rate_per_second, limits.rate_burst),
        }
    }

    /// Takes one call from the bucket of `caller`'s tenant, or says when to retry. Services are not
    /// limited: they call on behalf of tenants limited where those called, and a bucket shared by
    /// every call one service makes for all its tenants would let one tenant use up another's
    /// (audit appends, rollup reads, credential checks).
    pub fn check_caller(&self, caller: &crate::auth::Principal) -> Result<(), Status> {
        if matches!(caller, crate::auth::Principal::Service { .. }) {
            return Ok(());
        }
        self.check(&caller.tenant())
    }

    /// Takes one call from `tenant`'s bucket, or says when to retry.
    pub fn check(&self, tenant: &str) -> Result<(), Status> {
        self.check_at(tenant, Instant::now())
    }

    fn check_at(&self, tenant: &str, now: Instant) -> Result<(), Status> {
        self.calls
            .take(&tenant.to_owned(), now, 1.0)
            .map_err(|wait_ms| {
                refused(self.component, "tenant_rate");
                exhausted(
                    format!(
                        "rate limit of {} calls per second exceeded; retry in {wait_ms} ms",
                        self.calls.rate_per_second
                    ),
                    wait_ms,
                )
            })
    }

    /// How many tenants are being tracked (bounded).
    pub fn tracked(&self) -> u64 {
        self.calls.len()
    }
}

/// A budget of failed authentications per peer: a peer that keeps presenting unknown or revoked
/// tokens is refused before its next token costs a lookup, while callers whose tokens are known go
/// on as usual.
///
/// Many callers can share one address (a NAT, a proxy, every service of a host), so the budget
/// gates only tokens nobody has shown to be valid: a token that passed a lookup within
/// [`VOUCHED_FOR`] is looked up again whatever its address's budget says (the lookup still decides;
/// a revoked token fails it and loses its voucher). A flood of unknown tokens from an address then
/// costs that address's unknown tokens, never a tenant whose token is good.
#[derive(Debug)]
pub struct FailureLimiter {
    component: &'static str,
    failures: Buckets<PeerKey>,
    vouched: Cache<[u8; 32], ()>,
}

/// How long a token that passed a lookup is exempt from its address's failure budget.
pub const VOUCHED_FOR: Duration = Duration::from_secs(15 * 60);

impl FailureLimiter {
    pub fn new(component: &'static str, limits: &Limits) -> Self {
        Self {
            component,
            failures: Buckets::new(limits.auth_failures_per_second, limits.auth_failure_burst),
            vouched: Cache::builder()
                .max_capacity(MAX_KEYS)
                .time_to_live(VOUCHED_FOR)
                .build(),
        }
    }

    /// Whether the token with `digest`, presented by `peer`, may be looked up: always when a lookup
    /// found it valid lately, else while the peer's budget lasts.
    pub fn check_token(&self, peer: Option<PeerKey>, digest: &[u8; 32]) -> Result<(), Status> {
        if self.vouched.contains_key(digest) {
            return Ok(());
        }
        self.check(peer)
    }

    /// Records that a lookup found the token with `digest` valid (or, `valid` false, not).
    pub fn vouch(&self, digest: [u8; 32], valid: bool) {
        if valid {
            self.vouched.insert(digest, ());
        } else {
            self.vouched.invalidate(&digest);
        }
    }

    /// Whether `peer` may still have a token looked up.
    pub fn check(&self, peer: Option<PeerKey>) -> Result<(), Status> {
        let Some(peer) = peer else { return Ok(()) };
        // Taking nothing: only look whether the budget has a failure left.
        self.failures
            .take(&peer, Instant::now(), 0.0)
            .map_err(|wait_ms| {
                refused(self.component, "failed_authentications");
                exhausted(
                    format!(
                        "too many failed authentications from this address; retry in {wait_ms} ms"
                    ),
                    wait_ms,
                )
            })
    }

    /// Records a failed authentication of `peer`.
    pub fn charge(&self, peer: Option<PeerKey>) {
        if let Some(peer) = peer {
            let _ = self.failures.take(&peer, Instant::now(), 1.0);
        }
    }

    pub fn tracked(&self) -> u64 {
        self.failures.len()
    }

    /// How many tokens are vouched for (bounded).
    pub fn vouched(&self) -> u64 {
        self.vouched.run_pending_tasks();
        self.vouched.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_past_its_burst_is_refused_and_others_are_not() {
        let limiter = RateLimiter::new(
            "test",
            &Limits {
                rate_per_second: 10,
                rate_burst: 3,
                ..Limits::default()
            },
        );
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

    #[test]
    fn memory_stays_bounded_under_random_keys() {
        let limiter = RateLimiter::new("test", &Limits::default());
        for i in 0..(MAX_KEYS + 20_000) {
            let _ = limiter.check(&format!("key-{i}"));
        }
        assert!(limiter.tracked() <= MAX_KEYS, "{}", limiter.tracked());
    }

    #[test]
    fn a_peer_that_keeps_failing_is_refused_before_a_lookup_and_others_are_not() {
        let limits = Limits {
            auth_failures_per_second: 1,
            auth_failure_burst: 3,
            ..Limits::default()
        };
        let failures = FailureLimiter::new("test", &limits);
        let bad_peer = PeerKey::of("10.0.0.1".parse().unwrap());
        let bad = Some(bad_peer);
        let good = Some(PeerKey::of("10.0.0.2".parse().unwrap()));
        for _ in 0..3 {
            assert!(failures.check(bad).is_ok());
            failures.charge(bad);
        }
        let refused = failures.check(bad).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(failures.check(good).is_ok());
        assert!(failures.check(None).is_ok());
        assert_eq!(format!("{bad_peer:?}"), "PeerKey(..)");
        // A token a lookup found valid still gets its lookup from the exhausted address, until a
        // lookup finds it revoked.
        let (good_token, unknown) = ([7u8; 32], [8u8; 32]);
        failures.vouch(good_token, true);
        assert!(failures.check_token(bad, &good_token).is_ok());
        assert!(failures.check_token(bad, &unknown).is_err());
        failures.vouch(good_token, false);
        assert!(failures.check_token(bad, &good_token).is_err());
    }

    #[test]
    fn vouchers_stay_bounded_under_random_tokens() {
        let failures = FailureLimiter::new("test", &Limits::default());
        for i in 0..(MAX_KEYS + 20_000) {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&i.to_le_bytes());
            failures.vouch(digest, true);
        }
        assert!(failures.vouched() <= MAX_KEYS, "{}", failures.vouched());
    }
}
