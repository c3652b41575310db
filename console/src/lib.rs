//! Sightline's web console: an HTTP server that renders pages for an org admin and for the operator
//! over the four services' gRPC APIs. It is a client of the services and holds no data of its own:
//! a signed-in person's token stays server-side in a session (the cookie carries only a random id)
//! and goes with every call, so each authorization decision stays in the services.

mod chart;
mod format;
mod pages;
mod services;
mod session;
mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use sightline_runtime::ratelimit::PeerKey;
use sightline_runtime::server::StartError;
use sightline_runtime::settings::{Limits, TlsSettings};
use sightline_runtime::{Secret, Settings, SharedClock};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the console needs: where it listens, where the services are, and the service token it asks
/// linker-svc with whose a pasted token is.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    pub listen: SocketAddr,
    pub linker_url: String,
    pub consent_url: String,
    pub collector_url: String,
    pub insights_url: String,
    pub tls: Option<TlsSettings>,
    pub limits: Limits,
    pub service_token: Secret,
    pub session_idle_ms: u64,
    pub max_sessions: usize,
    pub header_timeout_ms: u64,
    pub clock: SharedClock,
}

impl ConsoleConfig {
    pub fn from_settings(settings: &Settings) -> Result<Self, StartError> {
        let service_token = settings
            .required_service_token("the console")
            .map_err(|e| StartError::config("service_token", e))?;
        if settings.console.max_sessions == 0 {
            return Err(StartError::config(
                "console.max_sessions",
                "must be at least 1",
            ));
        }
        Ok(Self {
            listen: settings.console.listen,
            linker_url: settings.linker.url.clone(),
            consent_url: settings.consent.url.clone(),
            collector_url: settings.collector.url.clone(),
            insights_url: settings.insights.url.clone(),
            tls: settings.tls.clone(),
            limits: settings.limits,
            service_token,
            session_idle_ms: settings.console.session_idle_ms,
            max_sessions: settings.console.max_sessions,
            header_timeout_ms: settings.console.header_timeout_ms,
            clock: sightline_runtime::clock::system(),
        })
    }
}

/// The console, bound and ready to serve.
pub struct Console {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: axum::Router,
    drain: Duration,
    header_timeout: Duration,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("addr", &self.local_addr())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Console {
    pub async fn build(config: ConsoleConfig) -> Result<Self, StartError> {
        let tls = config
            .tls
            .as_ref()
            .map(sightline_runtime::tls::browser_server_config)
            .transpose()
            .map_err(|e| StartError::config("tls", e))?
            .map(TlsAcceptor::from);
        let services = services::Services::connect(&config)
            .map_err(|e| StartError::config("service url", e))?;
        let state = Arc::new(web::AppState {
            services,
            sessions: session::Sessions::new(
                config.clock.clone(),
                config.session_idle_ms,
                config.max_sessions,
            ),
            secure_cookies: tls.is_some(),
            clock: config.clock.clone(),
            failed_sign_ins: sightline_runtime::ratelimit::FailureLimiter::new(
                "console",
                &config.limits,
            ),
        });
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| StartError::config(format!("console.listen {}", config.listen), e))?;
        Ok(Self {
            listener,
            tls,
            router: web::router(state),
            drain: Duration::from_millis(config.limits.drain_timeout_ms),
            header_timeout: Duration::from_millis(config.header_timeout_ms.max(1)),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The URL a browser opens.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}/", self.local_addr())
    }

    /// Serves until `shutdown` fires, then lets requests in flight finish (bounded by the drain
    /// limit).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let addr = self.local_addr();
        tracing::info!(%addr, tls = self.tls.is_some(), "serving");
        let connections = TaskTracker::new();
        // One builder for every connection: HTTP/1 closes a connection that sends no request
        // headers in time; HTTP/2 pings and closes a peer that stops answering.
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(self.header_timeout)
            .keep_alive_timeout(self.header_timeout);
        loop {
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            // Handlers see a keyed hash of the peer's address (for the sign-in failure budget),
            // never the address, which is personal data.
            let service = TowerToHyperService::new(WithPeer {
                router: self.router.clone(),
                peer: PeerKey::of(peer.ip()),
            });
            let tls = self.tls.clone();
            let stop = shutdown.clone();
            let header_timeout = self.header_timeout;
            let builder = builder.clone();
            connections.spawn(async move {
                // A client that sends nothing is let go: hyper's header timeout starts only once
                // it knows the protocol, which needs a first byte.
                let mut first = [0u8; 1];
                match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
                match tls {
                    None => serve(&builder, TokioIo::new(stream), service, stop).await,
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(header_timeout, acceptor.accept(stream));
                        if let Ok(Ok(stream)) = handshake.await {
                            serve(&builder, TokioIo::new(stream), service, stop).await;
                        }
                    }
                }
            });
        }
        connections.close();
        if tokio::time::timeout(self.drain, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(%addr, "drain limit reached; dropping open connections");
        }
        tracing::info!(%addr, "stopped");
        Ok(())
    }
}

/// The router, putting the connection's peer key on each request it serves.
#[derive(Clone)]
struct WithPeer {
    router: axum::Router,
    peer: PeerKey,
}

impl tower::Service<http::Request<hyper::body::Incoming>> for WithPeer {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = <axum::Router as tower::Service<http::Request<hyper::body::Incoming>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<hyper::body::Incoming>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut request: http::Request<hyper::body::Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.peer);
        self.router.call(request)
    }
}

async fn serve<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: TowerToHyperService<WithPeer>,
    stop: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => {
            if let Err(error) = served {
                tracing::debug!(%error, "connection ended");
            }
        }
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
