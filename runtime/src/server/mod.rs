//! The gRPC server bootstrap every service uses: bind first (port 0 allowed, so tests know the
//! address before anything runs), add services — each marked healthy as it is added — and run until
//! the shutdown token fires, then drain in-flight calls.
//!
//! Every server also serves `grpc.health.v1.Health` and reflection (v1 and v1alpha, with the health
//! descriptors too, so `grpcurl` needs no proto files), applies a maximum call time (client
//! deadlines are honoured below it), and answers oversized requests with RESOURCE_EXHAUSTED rather
//! than tonic's OUT_OF_RANGE. Every service added is limited to `limits.max_message_bytes` each way
//! ([`SizeLimited`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::server::Connected;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::Service;
use tracing::Instrument;

mod calls;

use crate::ratelimit::PeerKey;
use crate::settings::{Limits, TlsSettings};
use crate::tls::{self, TlsError};
use calls::CallLayer;

/// Why a service did not start: its store, its listener, or its settings.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A setting is missing or wrong, or something it names (a key file, a rules file, the
    /// contract's field table) cannot be read; the message names it.
    #[error("{0}")]
    Config(String),
}

impl StartError {
    /// A setting's failure, told with what it names.
    pub fn config(what: impl std::fmt::Display, error: impl std::fmt::Display) -> Self {
        StartError::Config(format!("{what}: {error}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

const MAX_HEADER_LIST_BYTES: u32 = 256 * 1024;

/// A generated gRPC server whose message size can be limited: tonic gives each generated server
/// its own `max_decoding_message_size` / `max_encoding_message_size`, with no trait in common.
pub trait SizeLimited {
    fn with_max_message_bytes(self, max: usize) -> Self;
}

macro_rules! size_limited {
    ($($server:path => $api:path),* $(,)?) => {
        $(impl<T: $api> SizeLimited for $server {
            fn with_max_message_bytes(self, max: usize) -> Self {
                self.max_decoding_message_size(max).max_encoding_message_size(max)
            }
        })*
    };
}

size_limited! {
    sightline_proto::consent::v1::consent_service_server::ConsentServiceServer<T>
        => sightline_proto::consent::v1::consent_service_server::ConsentService,
    sightline_proto::linker::v1::linker_service_server::LinkerServiceServer<T>
        => sightline_proto::linker::v1::linker_service_server::LinkerService,
    sightline_proto::audit::v1::audit_service_server::AuditServiceServer<T>
        => sightline_proto::audit::v1::audit_service_server::AuditService,
    sightline_proto::collector::v1::collector_service_server::CollectorServiceServer<T>
        => sightline_proto::collector::v1::collector_service_server::CollectorService,
    sightline_proto::insights::v1::insights_service_server::InsightsServiceServer<T>
        => sightline_proto::insights::v1::insights_service_server::InsightsService,
}

/// A bound, not yet running, gRPC server.
pub struct GrpcServer {
    /// The component it serves, e.g. "consent": the `service` label of its metrics.
    component: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    routes: RoutesBuilder,
    health: HealthReporter,
    services: Vec<&'static str>,
    metrics_addr: Option<SocketAddr>,
    stop_metrics: CancellationToken,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .field("services", &self.services)
            .finish()
    }
}

impl GrpcServer {
    /// Binds `addr` (and `metrics`, where Prometheus scrapes `/metrics`) and sets up health and
    /// reflection; `component` names the service in metrics.
    pub async fn bind(
        component: &'static str,
        addr: SocketAddr,
        tls: Option<&TlsSettings>,
        limits: Limits,
        metrics: Option<SocketAddr>,
    ) -> Result<Self, ServerError> {
        let tls = tls
            .map(tls::server_config)
            .transpose()?
            .map(TlsAcceptor::from);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        let stop_metrics = CancellationToken::new();
        let metrics_addr = match metrics {
            Some(addr) => Some(
                crate::metrics::serve(addr, stop_metrics.clone())
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?,
            ),
            None => None,
        };
        Ok(Self {
            component,
            metrics_addr,
            stop_metrics,
            listener,
            tls,
            limits,
            routes,
            health,
            services: Vec::new(),
        })
    }

    /// Follows a service this one cannot work without: while `dependency` does not answer its
    /// health check, every service of this server (and the server as a whole) reports NOT_SERVING,
    /// so load balancers and operators see what callers would meet. An enforcement point passes
    /// its policy readiness too (`policy`): it is NOT_SERVING from the start until it holds a
    /// complete policy snapshot, and again whenever it does not (stream lost, lease run out).
    pub async fn follow_dependency(
        &self,
        dependency: tonic::transport::Channel,
        mut policy: Option<tokio::sync::watch::Receiver<bool>>,
        every: Duration,
        stop: CancellationToken,
    ) {
        let health = self.health.clone();
        let services = self.services.clone();
        let set = move |status: ServingStatus| {
            let (health, services) = (health.clone(), services.clone());
            async move {
                health.set_service_status("", status).await;
                for name in &services {
                    health.set_service_status(*name, status).await;
                }
            }
        };
        let policy_ready = |policy: &Option<tokio::sync::watch::Receiver<bool>>| {
            policy.as_ref().is_none_or(|p| *p.borrow())
        };
        if !policy_ready(&policy) {
            // Before the first call is served: no SERVING without a policy.
            set(ServingStatus::NotServing).await;
        }
        tokio::spawn(async move {
            let mut last = (!policy_ready(&policy)).then_some(false);
            let mut next_check = tokio::time::Instant::now();
            let mut answers = true;
            loop {
                if tokio::time::Instant::now() >= next_check {
                    answers = serving(dependency.clone(), "", Duration::from_secs(2))
                        .await
                        .unwrap_or(false);
                    next_check = tokio::time::Instant::now() + every;
                }
                let ready = policy_ready(&policy);
                let now = answers && ready;
                if last != Some(now) {
                    let status = if now {
                        ServingStatus::Serving
                    } else {
                        if !answers {
                            tracing::warn!(
                                "a service this one depends on does not answer; reporting NOT_SERVING"
                            );
                        } else {
                            tracing::warn!(
                                "no current policy from consent-svc; reporting NOT_SERVING"
                            );
                        }
                        ServingStatus::NotServing
                    };
                    set(status).await;
                    last = Some(now);
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep_until(next_check) => {}
                    () = changed(&mut policy) => {}
                }
            }
        });
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Adds a service, limited to the server's `max_message_bytes` each way, and marks it SERVING
    /// in the health service, in one step.
    pub async fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + SizeLimited
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let service = service.with_max_message_bytes(self.limits.max_message_bytes);
        self.health.set_serving::<S>().await;
        self.services.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Serves until `shutdown` fires, then marks every service NOT_SERVING, stops accepting and
    /// waits for in-flight calls to finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let addr = self.local_addr();
        let mut routes = self.routes;
        // Reflection advertises what this port serves (and health), not every Sightline service.
        let reflection = || {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(sightline_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health")
                .with_service_name("grpc.reflection.v1.ServerReflection")
                .with_service_name("grpc.reflection.v1alpha.ServerReflection");
            for name in &self.services {
                builder = builder.with_service_name(*name);
            }
            builder
        };
        routes
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?);
        tracing::info!(%addr, services = ?self.services, tls = self.tls.is_some(), "serving");
        let incoming = accept_loop(self.listener, self.tls, shutdown.clone());
        let health = self.health.clone();
        let services = self.services.clone();
        let drained = shutdown.clone();
        let signal = async move {
            drained.cancelled().await;
            for name in services {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!(%addr, "shutting down; draining in-flight calls");
        };
        let limit = Duration::from_millis(self.limits.request_timeout_ms);
        let component = self.component;
        let serve = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // A client that stops answering is found out and its calls ended (streams included).
            .http2_keepalive_interval(Some(self.limits.keepalive_interval()))
            .http2_keepalive_timeout(Some(self.limits.keepalive_timeout()))
            .layer(tower::layer::layer_fn(move |inner| CallLayer {
                inner,
                component,
                limit,
            }))
            // Oversized metadata (a 64 KiB token) reaches the call and gets a status there, instead
            // of the connection being torn down; beyond this the connection is refused.
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, signal);
        // Graceful shutdown waits for every connection to close; a client that never sends a
        // request (or never finishes one) would hold it forever, so the drain is bounded.
        let drain_ms = self.limits.drain_timeout_ms;
        let bounded = async {
            shutdown.cancelled().await;
            tokio::time::sleep(Duration::from_millis(drain_ms)).await;
        };
        let outcome = tokio::select! {
            served = serve => served,
            () = bounded => {
                tracing::warn!(%addr, drain_ms, "drain limit reached; dropping open connections");
                Ok(())
            }
        };
        self.stop_metrics.cancel();
        outcome?;
        tracing::info!(%addr, "stopped");
        Ok(())
    }
}

/// Waits for the next change of a readiness watch (forever when there is none, or it is closed).
async fn changed(watch: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match watch {
        Some(w) => {
            if w.changed().await.is_err() {
                *watch = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Accepts connections (and completes TLS handshakes off the accept path) until `shutdown`.
fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<Conn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok((stream, addr)) => (stream, PeerKey::of(addr.ip())),
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match tls.clone() {
                None => {
                    if tx.send(Ok(Conn::Plain(stream, peer))).await.is_err() {
                        break;
                    }
                }
                Some(acceptor) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let handshake =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                        match handshake.await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(Ok(Conn::Tls(Box::new(tls), peer))).await;
                            }
                            // A failed handshake (old protocol, bad client certificate) is the
                            // client's problem; the peer address is not logged.
                            Ok(Err(error)) => tracing::debug!(%error, "tls handshake failed"),
                            Err(_) => tracing::debug!("tls handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// An accepted connection, plain or TLS, with its peer's key.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream, PeerKey),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerKey),
}

impl Connected for Conn {
    // Handlers get a keyed hash of the peer's address, for per-peer limits; never the address,
    // which is personal data.
    type ConnectInfo = PeerKey;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Plain(_, peer) | Conn::Tls(_, peer) => *peer,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// The one shutdown pattern: `background` (what a service runs beside its server, made before
/// the shutdown token is known) is cancelled when `shutdown` is.
pub fn stop_with(shutdown: &CancellationToken, background: CancellationToken) {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        background.cancel();
    });
}

/// Asks a server's `grpc.health.v1.Health/Check` whether `service` ("" for the server as a whole)
/// is SERVING; an error when it cannot be asked (not listening, TLS refused, timed out).
pub async fn serving(
    channel: tonic::transport::Channel,
    service: &str,
    timeout: Duration,
) -> Result<bool, tonic::Status> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    });
    request.set_timeout(timeout);
    let reply = client.check(request).await?;
    Ok(reply.into_inner().status()
        == tonic_health::pb::health_check_response::ServingStatus::Serving)
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
