//! Channels from one service to another (consent → linker today; collector and insights next):
//! plaintext when the stack runs without TLS, otherwise TLS with the configured CA, presenting the
//! service's own certificate so a linker-svc that requires client certificates (mTLS) accepts it.

use std::path::Path;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::settings::{Limits, TlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("invalid service URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("TLS is on but no CA is configured to trust other services (set tls.ca)")]
    NoCa,
}

/// The URL of a service that listens on `addr`, with the scheme TLS settings call for.
pub fn service_url(addr: std::net::SocketAddr, tls: Option<&TlsSettings>) -> String {
    let scheme = if tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{addr}")
}

/// A lazily connecting channel to the service at `url` (it reconnects when the service returns),
/// with HTTP/2 keepalive (`limits.keepalive_*`, pings also while idle): a peer that stops answering
/// is detected within interval + timeout, the connection closed and its streams ended, instead of
/// looking open for as long as the TCP connection does.
pub fn service_channel(
    url: &str,
    tls: Option<&TlsSettings>,
    limits: &Limits,
) -> Result<Channel, ChannelError> {
    let invalid = |reason: String| ChannelError::Url {
        url: url.to_owned(),
        reason,
    };
    // With TLS on, an http:// URL (a default) is upgraded: services never talk in the clear then.
    let url = match (tls, url.strip_prefix("http://")) {
        (Some(_), Some(rest)) => format!("https://{rest}"),
        _ => url.to_owned(),
    };
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| invalid(e.to_string()))?
        .connect_timeout(limits.keepalive_timeout())
        .http2_keep_alive_interval(limits.keepalive_interval())
        .keep_alive_timeout(limits.keepalive_timeout())
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        let ca = tls
            .ca
            .as_ref()
            .or(tls.client_ca.as_ref())
            .ok_or(ChannelError::NoCa)?;
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca)?))
            .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| invalid(e.to_string()))?;
    }
    Ok(endpoint.connect_lazy())
}

fn read(path: &Path) -> Result<Vec<u8>, ChannelError> {
    std::fs::read(path).map_err(|source| ChannelError::Read {
        path: path.display().to_string(),
        source,
    })
}
