//! The layer every call passes: its deadline, the size refusal rewritten to RESOURCE_EXHAUSTED,
//! and its measurement (span, count by final code, latency).

use super::*;

/// Every call passes here, in this order: the handler runs until the call's deadline (the client's
/// `grpc-timeout` or the server's limit; then DEADLINE_EXCEEDED, since tonic's own timeout answers
/// CANCELLED — the handler's future is dropped, so work that must not be cut short, an audited
/// commit, runs in its own task); tonic's OUT_OF_RANGE for a message too large becomes
/// RESOURCE_EXHAUSTED naming it (gRPC's convention, and ours); and the call is measured (see
/// [`crate::metrics`]) in a span of its own, counted by the code the client finally gets — found in
/// the response headers for an error, in the trailers otherwise.
#[derive(Debug, Clone)]
pub(super) struct CallLayer<S> {
    pub(super) inner: S,
    pub(super) component: &'static str,
    pub(super) limit: Duration,
}

const REQUEST_TOO_LARGE: &str = "request: message exceeds the server's max_message_bytes limit";
const REPLY_TOO_LARGE: &str =
    "reply: message exceeds the server's max_message_bytes limit; ask for a smaller page";

impl<S, B> Service<http::Request<B>> for CallLayer<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = CallRecord::start(self.component, request.uri().path());
        // One span per call (exported over OTLP when configured); handlers' spans, which record the
        // org and instance ids, nest in it.
        let span = tracing::info_span!(
            "grpc",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = call.grpc_service,
            rpc.method = call.method,
            service = self.component,
        );
        let header = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok());
        let timeout = crate::deadline::call_timeout(header, self.limit);
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let mut call = call;
                let mut response = match tokio::time::timeout(timeout, future).await {
                    Ok(response) => response?,
                    Err(_) => tonic::Status::deadline_exceeded(
                        "the deadline passed before the call completed",
                    )
                    .into_http(),
                };
                // A request too large fails before any reply: trailers-only, in the headers.
                rewrite_oversize(response.headers_mut(), REQUEST_TOO_LARGE);
                if let Some(code) = response.headers().get("grpc-status") {
                    call.finish(code);
                    return Ok(response);
                }
                Ok(response.map(|body| Body::new(CallBody { inner: body, call })))
            }
            .instrument(span),
        )
    }
}

/// One call being measured; recorded once, as CANCELLED if dropped unfinished.
struct CallRecord {
    component: &'static str,
    grpc_service: &'static str,
    method: &'static str,
    started: std::time::Instant,
    done: bool,
}

impl CallRecord {
    fn start(component: &'static str, path: &str) -> Self {
        let (grpc_service, method) = known_method(path);
        metrics::gauge!(crate::metrics::IN_FLIGHT, "service" => component).increment(1.0);
        Self {
            component,
            grpc_service,
            method,
            started: std::time::Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, status: &http::HeaderValue) {
        let code = status
            .to_str()
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
            .map_or("UNKNOWN", |n| code_name(tonic::Code::from(n)));
        self.record(code);
    }

    fn record(&mut self, code: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let labels = [
            ("service", self.component),
            ("grpc_service", self.grpc_service),
            ("grpc_method", self.method),
        ];
        metrics::gauge!(crate::metrics::IN_FLIGHT, "service" => self.component).decrement(1.0);
        metrics::histogram!(crate::metrics::LATENCY, &labels)
            .record(self.started.elapsed().as_secs_f64());
        metrics::counter!(
            crate::metrics::CALLS,
            "service" => self.component,
            "grpc_service" => self.grpc_service,
            "grpc_method" => self.method,
            "grpc_code" => code
        )
        .increment(1);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.record("CANCELLED");
    }
}

/// A response body whose trailers carry the call's status: a reply too large (it fails while it is
/// encoded) gets the same rewrite, then the call is recorded.
struct CallBody {
    inner: Body,
    call: CallRecord,
}

impl http_body::Body for CallBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    rewrite_oversize(trailers, REPLY_TOO_LARGE);
                    if let Some(code) = trailers.get("grpc-status") {
                        this.call.finish(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.record("INTERNAL"),
            Poll::Ready(None) => this.call.record("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The (service, method) labels of a request path, for the methods the contracts define (plus
/// health and reflection); anything else is "unknown", so a client cannot mint new series.
fn known_method(path: &str) -> (&'static str, &'static str) {
    static KNOWN: std::sync::OnceLock<
        std::collections::HashMap<String, (&'static str, &'static str)>,
    > = std::sync::OnceLock::new();
    let known = KNOWN.get_or_init(|| {
        let mut known = std::collections::HashMap::new();
        let mut add = |service: &str, method: &str| {
            let labels: (&'static str, &'static str) = (
                Box::leak(service.to_owned().into_boxed_str()),
                Box::leak(method.to_owned().into_boxed_str()),
            );
            known.insert(format!("/{service}/{method}"), labels);
        };
        if let Ok(pool) = sightline_proto::classes::pool() {
            for service in pool.services() {
                for method in service.methods() {
                    add(service.full_name(), method.name());
                }
            }
        }
        add("grpc.health.v1.Health", "Check");
        add("grpc.health.v1.Health", "Watch");
        add(
            "grpc.reflection.v1.ServerReflection",
            "ServerReflectionInfo",
        );
        add(
            "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        );
        known
    });
    known.get(path).copied().unwrap_or(("unknown", "unknown"))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

const OUT_OF_RANGE: &str = "11";
const RESOURCE_EXHAUSTED: &str = "8";

/// Turns tonic's OUT_OF_RANGE "message length too large" in `headers` into RESOURCE_EXHAUSTED with
/// `message`.
fn rewrite_oversize(headers: &mut http::HeaderMap, message: &'static str) {
    let oversize = headers
        .get("grpc-status")
        .is_some_and(|s| s == OUT_OF_RANGE)
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            });
    if oversize {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_static(RESOURCE_EXHAUSTED),
        );
        headers.insert("grpc-message", http::HeaderValue::from_static(message));
    }
}
