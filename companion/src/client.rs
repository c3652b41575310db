//! Channels to the services, the bearer credential, retry hints and jittered backoff.

use std::path::Path;
use std::time::Duration;

use rand::Rng;
use sightline_runtime::Secret;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A lazily connecting channel; https:// URLs trust only the CA in `ca` (PEM). `url` may name
/// several replicas separated by commas: calls are balanced over those that answer their health
/// check ([`sightline_runtime::client::balanced`]).
pub fn channel(url: &str, ca: Option<&Path>) -> anyhow::Result<Channel> {
    let urls = sightline_runtime::client::replica_urls(url);
    if let [one] = urls.as_slice() {
        return Ok(endpoint(one, ca)?.connect_lazy());
    }
    anyhow::ensure!(!urls.is_empty(), "service URL {url:?} names no address");
    let replicas = urls
        .iter()
        .map(|u| endpoint(u, ca))
        .collect::<anyhow::Result<Vec<_>>>()?;
    sightline_runtime::client::balanced(replicas, Duration::from_secs(2))
        .ok_or_else(|| anyhow::anyhow!("a list of replicas needs a tokio runtime"))
}

fn endpoint(url: &str, ca: Option<&Path>) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| anyhow::anyhow!("invalid service URL {url}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        match ca {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| anyhow::anyhow!("CA file {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            None => anyhow::bail!("{url} is https: give the CA that signed it (--ca)"),
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS for {url}: {e}"))?;
    } else if !url.starts_with("http://") {
        anyhow::bail!("service URL {url} must start with http:// or https://");
    }
    Ok(endpoint)
}

/// A request carrying `authorization: Bearer <secret>` (streams: no deadline on the whole).
pub fn authed<T>(secret: &Secret, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {}", secret.expose()).parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// How long a unary call may take before it counts as failed (DEADLINE_EXCEEDED).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A unary request carrying the bearer secret and a deadline, so a service that accepts the
/// connection and never answers cannot hold the companion.
pub fn unary<T>(secret: &Secret, message: T) -> tonic::Request<T> {
    let mut request = authed(secret, message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// The `retry-after-ms` hint a status carries, if any.
pub fn retry_hint(status: &tonic::Status) -> Option<Duration> {
    status
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

/// Makes `call` until it is answered, retrying UNAVAILABLE (nothing was done) for up to
/// `patience`: after the `retry-after-ms` hint when there is one (within 50 ms to 5 s), else after
/// half a second. Any other answer, or UNAVAILABLE past `patience`, is returned as it is.
pub async fn patiently<T>(
    patience: Duration,
    mut call: impl AsyncFnMut() -> Result<T, tonic::Status>,
) -> Result<T, tonic::Status> {
    let until = std::time::Instant::now() + patience;
    loop {
        match call().await {
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && std::time::Instant::now() < until =>
            {
                let wait = retry_hint(&status).map_or(Duration::from_millis(500), |hint| {
                    hint.clamp(Duration::from_millis(50), Duration::from_secs(5))
                });
                tokio::time::sleep(wait).await;
            }
            answered => return answered,
        }
    }
}

/// Exponential backoff with full jitter, never shorter than a server's hint.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The wait before the next attempt.
    pub fn next(&mut self, hint: Option<Duration>) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jittered = Duration::from_millis(
            rand::rng().random_range(ceiling.as_millis() as u64 / 2..=ceiling.as_millis() as u64),
        );
        jittered.max(hint.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_caps_and_honours_hints() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let waits: Vec<Duration> = (0..8).map(|_| b.next(None)).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits[7] >= Duration::from_millis(500) && waits[7] <= Duration::from_millis(1000));
        assert_eq!(b.next(Some(Duration::from_secs(5))), Duration::from_secs(5));
        b.reset();
        assert!(b.next(None) <= Duration::from_millis(100));
    }
}
