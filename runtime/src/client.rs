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
///
/// `url` may name several replicas of the service, separated by commas
/// (`http://linker-1:50051,http://linker-2:50051`): calls are then balanced over the replicas
/// that answer their health check ([`balanced`]). Needs a tokio runtime then.
pub fn service_channel(
    url: &str,
    tls: Option<&TlsSettings>,
    limits: &Limits,
) -> Result<Channel, ChannelError> {
    match replica_urls(url).as_slice() {
        [] => Err(ChannelError::Url {
            url: url.to_owned(),
            reason: "no address".into(),
        }),
        [one] => Ok(endpoint(one, tls, limits)?.connect_lazy()),
        many => {
            let endpoints = many
                .iter()
                .map(|u| endpoint(u, tls, limits))
                .collect::<Result<Vec<_>, _>>()?;
            balanced(endpoints, limits.keepalive_interval()).ok_or_else(|| ChannelError::Url {
                url: url.to_owned(),
                reason: "a list of replicas needs a tokio runtime".into(),
            })
        }
    }
}

/// The addresses a service URL setting names: one, or several replicas separated by commas.
pub fn replica_urls(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// One replica's endpoint, with keepalive and (when on) TLS.
fn endpoint(
    url: &str,
    tls: Option<&TlsSettings>,
    limits: &Limits,
) -> Result<Endpoint, ChannelError> {
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
    Ok(endpoint)
}

/// A channel balancing calls over `replicas` (tonic's power-of-two-choices balancer), with a task
/// that asks each replica's gRPC health service every `every` (waiting at most that long for an
/// answer) and keeps only those that answer SERVING in the balancer: a replica that stops (killed,
/// partitioned, failing closed) leaves it within about two rounds and comes back when it answers
/// again. When none answers, all are kept, so calls fail at once as with one address rather than
/// wait. The first round starts at once; calls made before it ends wait for it. The task ends
/// when the channel and its clones are dropped. None outside a tokio runtime.
pub fn balanced(replicas: Vec<Endpoint>, every: std::time::Duration) -> Option<Channel> {
    use tonic::transport::channel::Change;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (channel, changes) = Channel::balance_channel::<usize>(replicas.len().max(1) * 2);
    let probes: Vec<HealthClient<Channel>> = replicas
        .iter()
        .map(|e| HealthClient::new(e.connect_lazy()))
        .collect();
    // None is listed before the first round (which starts at once): a call made meanwhile waits
    // for it rather than going to a replica that is not there.
    let mut listed = vec![false; replicas.len()];
    runtime.spawn(async move {
        let every = every.max(std::time::Duration::from_millis(100));
        loop {
            use futures::StreamExt as _;
            let mut checks: futures::stream::FuturesUnordered<_> = probes
                .iter()
                .enumerate()
                .map(|(key, probe)| {
                    let mut probe = probe.clone();
                    async move {
                        let check = probe.check(HealthCheckRequest::default());
                        let serving = matches!(
                            tokio::time::timeout(every, check).await,
                            Ok(Ok(answer)) if answer.get_ref().status == ServingStatus::Serving as i32
                        );
                        (key, serving)
                    }
                })
                .collect();
            // A replica that answers joins at once, not after the slowest probe of the round.
            let mut serving = vec![false; replicas.len()];
            while let Some((key, up)) = checks.next().await {
                serving[key] = up;
                if up && !listed[key] {
                    if changes.send(Change::Insert(key, replicas[key].clone())).await.is_err() {
                        return;
                    }
                    listed[key] = true;
                }
            }
            let any = serving.iter().any(|&s| s);
            for (key, replica) in replicas.iter().enumerate() {
                let keep = serving[key] || !any;
                let change = match (keep, listed[key]) {
                    (true, false) => Change::Insert(key, replica.clone()),
                    (false, true) => Change::Remove(key),
                    _ => continue,
                };
                if changes.send(change).await.is_err() {
                    return;
                }
                listed[key] = keep;
            }
            tokio::select! {
                () = changes.closed() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
    Some(channel)
}

fn read(path: &Path) -> Result<Vec<u8>, ChannelError> {
    std::fs::read(path).map_err(|source| ChannelError::Read {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use tonic::transport::Server;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::server::HealthReporter;

    use super::*;

    /// A replica: gRPC health on `addr`, counting the calls marked `x-count`, until `stop`.
    async fn replica(
        addr: std::net::SocketAddr,
        calls: Arc<AtomicUsize>,
        stop: CancellationToken,
    ) -> HealthReporter {
        let (reporter, health) = tonic_health::server::health_reporter();
        let counted = tonic::service::interceptor::InterceptedService::new(
            health,
            move |request: tonic::Request<()>| {
                if request.metadata().contains_key("x-count") {
                    calls.fetch_add(1, Ordering::SeqCst);
                }
                Ok(request)
            },
        );
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(
            Server::builder()
                .add_service(counted)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                ),
        );
        reporter
    }

    async fn call(client: &mut HealthClient<Channel>) -> bool {
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        request
            .metadata_mut()
            .insert("x-count", "1".parse().unwrap());
        request.set_timeout(Duration::from_secs(5));
        client.check(request).await.is_ok()
    }

    /// Calls until `n` in a row succeed (a replica's change is seen within a few probe rounds);
    /// the bound is generous, so the verdict does not hang on the machine's pace.
    async fn settle(client: &mut HealthClient<Channel>, n: usize) {
        let mut in_a_row = 0;
        for _ in 0..20_000 {
            if call(client).await {
                in_a_row += 1;
                if in_a_row == n {
                    return;
                }
            } else {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("calls did not settle on the replicas left");
    }

    fn free_addr() -> std::net::SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[tokio::test]
    async fn a_list_of_replicas_spreads_calls_and_leaves_out_one_that_stops_answering() {
        let (a, b) = (free_addr(), free_addr());
        let (calls_a, calls_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let stop_a = CancellationToken::new();
        let reporter_a = replica(a, calls_a.clone(), stop_a.clone()).await;
        let _reporter_b = replica(b, calls_b.clone(), CancellationToken::new()).await;
        let limits = Limits {
            keepalive_interval_ms: 200,
            keepalive_timeout_ms: 1_000,
            ..Limits::default()
        };
        let channel = service_channel(&format!("http://{a}, http://{b}"), None, &limits).unwrap();
        let mut client = HealthClient::new(channel);

        // Both replicas take calls.
        settle(&mut client, 200).await;
        assert!(calls_a.load(Ordering::SeqCst) > 0 && calls_b.load(Ordering::SeqCst) > 0);

        // A replica that says it is not serving is left out: every call goes to the other.
        reporter_a
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let mut rounds = 0;
        loop {
            let before = calls_a.load(Ordering::SeqCst);
            settle(&mut client, 200).await;
            if calls_a.load(Ordering::SeqCst) == before {
                break;
            }
            rounds += 1;
            assert!(rounds < 1_000, "the replica not serving still takes calls");
        }

        // One that is gone (stopped, its port closed) too; and it takes calls again once back.
        stop_a.cancel();
        settle(&mut client, 200).await;
        let gone = calls_a.load(Ordering::SeqCst);
        let back = CancellationToken::new();
        let _reporter = replica(a, calls_a.clone(), back.clone()).await;
        for _ in 0..20_000 {
            if calls_a.load(Ordering::SeqCst) > gone {
                break;
            }
            call(&mut client).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            calls_a.load(Ordering::SeqCst) > gone,
            "the replica came back"
        );
        back.cancel();
    }

    #[test]
    fn a_list_of_replicas_needs_a_runtime_and_an_address() {
        let limits = Limits::default();
        let outside = service_channel("http://127.0.0.1:1,http://127.0.0.1:2", None, &limits);
        assert!(matches!(outside, Err(ChannelError::Url { .. })));
        assert!(service_channel(" , ", None, &limits).is_err());
    }
}
