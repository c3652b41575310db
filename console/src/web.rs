//! The router, the security headers every response carries, the session cookie, the CSRF check on
//! every change, and how a service's status becomes a page.

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use sightline_runtime::SharedClock;
use subtle::ConstantTimeEq;

use crate::pages;
use crate::services::Services;
use crate::session::{Flash, Session, Sessions, Who};

pub(crate) const COOKIE: &str = "sightline_session";
/// Under TLS the cookie takes the `__Host-` prefix: Secure, no Domain, Path=/ (browsers enforce it).
pub(crate) const SECURE_COOKIE: &str = "__Host-sightline_session";
/// The largest form body the console reads (an assessment upload is multipart and streamed).
const MAX_FORM_BYTES: usize = 64 * 1024;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'; connect-src 'self'";

#[derive(Debug)]
pub(crate) struct AppState {
    pub services: Services,
    pub sessions: Sessions,
    pub secure_cookies: bool,
    pub clock: SharedClock,
    /// Each address's budget of sign-ins with a token linker-svc does not know.
    pub failed_sign_ins: sightline_runtime::ratelimit::FailureLimiter,
}

pub(crate) type AppRef = Arc<AppState>;

pub(crate) fn router(state: AppRef) -> Router {
    Router::new()
        .route("/", get(pages::signin::home))
        .route(
            "/signin",
            get(pages::signin::form).post(pages::signin::submit),
        )
        .route("/signout", post(pages::signin::signout))
        .route("/assets/console.css", get(asset_css))
        .route("/assets/console.js", get(asset_js))
        .merge(pages::operator::routes())
        .merge(pages::consent::routes())
        .merge(pages::instances::routes())
        .merge(pages::health::routes())
        .merge(pages::reports::routes())
        .merge(pages::settings::routes())
        .merge(pages::audit::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), csrf_check))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn asset_css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("../assets/console.css"),
    )
}

async fn asset_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../assets/console.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

async fn not_found() -> Response {
    PageError::NotFound.into_response()
}

/// Every response: a CSP without inline script, no framing, no sniffing, no referrer, and (for
/// pages, which hold an org's data) no caching.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let set = |headers: &mut HeaderMap, name: header::HeaderName, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(headers, header::CONTENT_SECURITY_POLICY, CSP);
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(
        headers,
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    set(
        headers,
        header::HeaderName::from_static("permissions-policy"),
        "camera=(), microphone=(), geolocation=()",
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        set(headers, header::CACHE_CONTROL, "no-store");
    }
    response
}

/// The session id the request's cookie names, if any.
pub(crate) fn cookie_session(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE || *name == SECURE_COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The Set-Cookie value that starts (or, with `None`, ends) a session.
pub(crate) fn session_cookie(state: &AppState, id: Option<&str>) -> HeaderValue {
    let (name, secure) = if state.secure_cookies {
        (SECURE_COOKIE, "; Secure")
    } else {
        (COOKIE, "")
    };
    let value = match id {
        Some(id) => format!("{name}={id}; Path=/; HttpOnly; SameSite=Strict{secure}"),
        None => format!("{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Every request that changes something carries the session's CSRF token: as the `csrf` field of
/// a form, or (for a multipart upload, whose body is streamed) as the `csrf` query parameter. A
/// cross-site request is refused before that (SameSite=Strict keeps the cookie off it too).
async fn csrf_check(State(state): State<AppRef>, request: Request, next: Next) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return next.run(request).await;
    }
    let cross_site = request
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site");
    if cross_site {
        return PageError::Csrf.into_response();
    }
    if request.uri().path() == "/signin" {
        return next.run(request).await;
    }
    let Some(session) = cookie_session(request.headers()).and_then(|id| state.sessions.touch(&id))
    else {
        return PageError::SignIn.into_response();
    };
    let from_query = request.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.into_owned())
    });
    let is_form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let (request, presented) = if is_form {
        let (parts, body) = request.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
            return PageError::BadRequest("the form is too large".into()).into_response();
        };
        let presented = form_urlencoded::parse(&bytes)
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.into_owned())
            .or(from_query);
        (Request::from_parts(parts, Body::from(bytes)), presented)
    } else {
        (request, from_query)
    };
    let matches = presented.is_some_and(|p| {
        p.len() == session.csrf.len() && bool::from(p.as_bytes().ct_eq(session.csrf.as_bytes()))
    });
    if !matches {
        return PageError::Csrf.into_response();
    }
    next.run(request).await
}

/// A signed-in request: the session and its id. Anything else is sent to sign in.
#[derive(Debug, Clone)]
pub(crate) struct Signed {
    pub id: String,
    pub session: Session,
}

impl FromRequestParts<AppRef> for Signed {
    type Rejection = PageError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppRef,
    ) -> Result<Self, Self::Rejection> {
        let id = cookie_session(&parts.headers).ok_or(PageError::SignIn)?;
        let session = state.sessions.touch(&id).ok_or(PageError::SignIn)?;
        Ok(Self { id, session })
    }
}

impl Signed {
    pub(crate) fn is_operator(&self) -> bool {
        self.session.who == Who::Operator
    }

    /// A request to a service, made with this session's token.
    pub(crate) fn ask<T>(&self, message: T) -> tonic::Request<T> {
        crate::services::authed(&self.session.token, message)
    }

    pub(crate) fn require_operator(&self) -> Result<(), PageError> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(PageError::Status(tonic::Status::permission_denied(
                "this page is the operator's",
            )))
        }
    }
}

/// The frame of every signed-in page: who is signed in, where they are, the CSRF token for its
/// forms, and what is to be shown once.
#[derive(Debug, Clone)]
pub(crate) struct Chrome {
    pub title: String,
    pub csrf: String,
    pub who: String,
    pub operator: bool,
    /// The org whose pages the navigation links to.
    pub org_id: String,
    pub section: &'static str,
    pub flashes: Vec<Flash>,
    /// Seconds after which the page reloads itself (a move under way); 0 for never.
    pub refresh_s: u32,
}

impl Chrome {
    pub(crate) fn new(
        state: &AppState,
        signed: &Signed,
        org_id: &str,
        section: &'static str,
        title: impl Into<String>,
    ) -> Self {
        let who = match &signed.session.who {
            Who::Operator => "operator".to_owned(),
            Who::Admin { token_id, .. } => format!("org admin (token {token_id})"),
        };
        Self {
            title: title.into(),
            csrf: signed.session.csrf.clone(),
            who,
            operator: signed.is_operator(),
            org_id: org_id.to_owned(),
            section,
            flashes: state.sessions.take_flashes(&signed.id),
            refresh_s: 0,
        }
    }

    /// The outcome of `form`, when one is to be shown: (is it an error, the text).
    pub(crate) fn message(&self, form: &str) -> Option<(bool, String)> {
        self.flashes.iter().find_map(|f| match f {
            Flash::Message {
                form: f,
                error,
                text,
            } if *f == form => Some((*error, text.clone())),
            _ => None,
        })
    }

    /// The secret issued just before this page, shown this once.
    pub(crate) fn secret(&self) -> Option<(&'static str, String, String)> {
        self.flashes.iter().find_map(|f| match f {
            Flash::Secret { what, id, secret } => {
                Some((*what, id.clone(), secret.expose().to_owned()))
            }
            Flash::Message { .. } => None,
        })
    }

    pub(crate) fn nav(&self) -> Vec<(&'static str, String, &'static str, bool)> {
        let mut items = Vec::new();
        if self.operator {
            items.push(("operator", "/operator".to_owned(), "Orgs", false));
            items.push((
                "services",
                "/operator/services".to_owned(),
                "Services",
                false,
            ));
        }
        if !self.org_id.is_empty() {
            let o = &self.org_id;
            for (key, path, label) in [
                ("consent", "consent", "Usage data sharing"),
                ("sample", "sample", "Sample data"),
                ("instances", "instances", "Instances"),
                ("pages", "pages", "Page analytics"),
                ("settings", "settings", "Settings"),
                ("audit", "audit", "Audit log"),
            ] {
                items.push((key, format!("/orgs/{o}/{path}"), label, false));
            }
        }
        for item in &mut items {
            item.3 = item.0 == self.section;
        }
        items
    }
}

/// Renders a template as a page.
pub(crate) fn render(page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "a page did not render");
            PageError::Internal.into_response()
        }
    }
}

/// After a change: back to `to`, with the outcome of `form` shown there once. A service's refusal
/// (bad input, a precondition) is shown next to the form; signing out and a service that is down
/// are pages of their own.
pub(crate) fn after_change<T>(
    state: &AppState,
    signed: &Signed,
    form: &'static str,
    to: &str,
    outcome: Result<T, tonic::Status>,
    done: impl FnOnce(T) -> String,
) -> Response {
    use tonic::Code;
    let flash = match outcome {
        Ok(value) => Flash::Message {
            form,
            error: false,
            text: done(value),
        },
        Err(status)
            if matches!(
                status.code(),
                Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::Aborted
                    | Code::AlreadyExists
                    | Code::OutOfRange
                    | Code::ResourceExhausted
            ) =>
        {
            Flash::Message {
                form,
                error: true,
                text: status.message().to_owned(),
            }
        }
        Err(status) => return PageError::Status(status).into_response(),
    };
    state.sessions.flash(&signed.id, flash);
    Redirect::to(to).into_response()
}

/// A gRPC status code as the contracts name it, e.g. `PERMISSION_DENIED`.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// What a page cannot show instead of itself.
#[derive(Debug)]
pub(crate) enum PageError {
    Status(tonic::Status),
    SignIn,
    Csrf,
    BadRequest(String),
    NotFound,
    Internal,
}

impl From<tonic::Status> for PageError {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    title: String,
    code: String,
    text: String,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        use tonic::Code;
        let (status, title, code, text) = match self {
            Self::SignIn => return Redirect::to("/signin").into_response(),
            Self::Status(s) if s.code() == Code::Unauthenticated => {
                // The token was revoked or expired: the session is of no use any more.
                return (
                    [
                        (header::SET_COOKIE, format!("{COOKIE}=; Path=/; Max-Age=0")),
                        (
                            header::SET_COOKIE,
                            format!("{SECURE_COOKIE}=; Path=/; Max-Age=0; Secure"),
                        ),
                    ],
                    Redirect::to("/signin?ended=1"),
                )
                    .into_response();
            }
            Self::Status(s) => {
                let (status, title) = match s.code() {
                    Code::PermissionDenied => (StatusCode::FORBIDDEN, "Not allowed"),
                    Code::NotFound => (StatusCode::NOT_FOUND, "Not found"),
                    Code::InvalidArgument | Code::OutOfRange => {
                        (StatusCode::BAD_REQUEST, "Not accepted")
                    }
                    Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => {
                        (StatusCode::CONFLICT, "Not possible now")
                    }
                    Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "Too many requests"),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                        (StatusCode::SERVICE_UNAVAILABLE, "A service is unavailable")
                    }
                    _ => (StatusCode::BAD_GATEWAY, "A service failed"),
                };
                let text = match s.code() {
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => format!(
                        "The service did not answer ({}). Try again in a moment.",
                        s.message()
                    ),
                    _ => s.message().to_owned(),
                };
                (status, title, code_name(s.code()), text)
            }
            Self::Csrf => (
                StatusCode::FORBIDDEN,
                "Form refused",
                "CSRF".to_owned(),
                "This form did not come from this console session. Reload the page and try again."
                    .to_owned(),
            ),
            Self::BadRequest(text) => (
                StatusCode::BAD_REQUEST,
                "Not accepted",
                "BAD_REQUEST".to_owned(),
                text,
            ),
            Self::NotFound => (
                StatusCode::NOT_FOUND,
                "Not found",
                "NOT_FOUND".to_owned(),
                "There is no such page.".to_owned(),
            ),
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "INTERNAL".to_owned(),
                "The console could not show this page.".to_owned(),
            ),
        };
        let page = ErrorPage {
            title: title.to_owned(),
            code,
            text,
        };
        let html = page
            .render()
            .unwrap_or_else(|_| "Something went wrong".to_owned());
        (status, Html(html)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_as_the_contracts_name_them() {
        assert_eq!(
            code_name(tonic::Code::PermissionDenied),
            "PERMISSION_DENIED"
        );
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[tokio::test]
    async fn the_cookie_is_http_only_strict_and_secure_with_the_host_prefix_under_tls() {
        let services = Services::for_tests();
        let state = |secure_cookies| AppState {
            services: services.clone(),
            sessions: Sessions::new(sightline_runtime::clock::system(), 1_000, 1),
            secure_cookies,
            clock: sightline_runtime::clock::system(),
            failed_sign_ins: sightline_runtime::ratelimit::FailureLimiter::new(
                "console",
                &sightline_runtime::settings::Limits::default(),
            ),
        };
        let plain = session_cookie(&state(false), Some("abc"));
        assert_eq!(
            plain.to_str().unwrap(),
            "sightline_session=abc; Path=/; HttpOnly; SameSite=Strict"
        );
        let tls = session_cookie(&state(true), Some("abc"));
        assert_eq!(
            tls.to_str().unwrap(),
            "__Host-sightline_session=abc; Path=/; HttpOnly; SameSite=Strict; Secure"
        );
        let ended = session_cookie(&state(true), None);
        assert!(ended.to_str().unwrap().contains("Max-Age=0"));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-sightline_session=xyz"),
        );
        assert_eq!(cookie_session(&headers).as_deref(), Some("xyz"));
    }
}
