//! Signing in with a token the services know, and signing out.

use askama::Template;
use axum::Form;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use sightline_proto::linker::v1::CredentialKind;
use sightline_runtime::Secret;
use sightline_runtime::ratelimit::PeerKey;
use tonic::Code;

use crate::session::Who;
use crate::web::{AppRef, PageError, Signed, cookie_session, render, session_cookie};

#[derive(Template)]
#[template(path = "signin.html")]
struct SignInPage {
    message: Option<String>,
    ended: bool,
}

/// Where a signed-in person starts: the operator at the orgs, an admin at their org.
fn start_page(who: &Who) -> String {
    match who {
        Who::Operator => "/operator".to_owned(),
        Who::Admin { org_id, .. } => format!("/orgs/{org_id}/consent"),
    }
}

pub(crate) async fn home(signed: Result<Signed, PageError>) -> Response {
    match signed {
        Ok(signed) => Redirect::to(&start_page(&signed.session.who)).into_response(),
        Err(_) => Redirect::to("/signin").into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct Ended {
    ended: Option<String>,
}

pub(crate) async fn form(
    signed: Result<Signed, PageError>,
    Query(query): Query<Ended>,
) -> Response {
    if let Ok(signed) = signed {
        return Redirect::to(&start_page(&signed.session.who)).into_response();
    }
    render(&SignInPage {
        message: None,
        ended: query.ended.is_some(),
    })
}

#[derive(Deserialize)]
pub(crate) struct Token {
    token: String,
}

pub(crate) async fn submit(
    State(state): State<AppRef>,
    peer: Option<axum::Extension<PeerKey>>,
    Form(form): Form<Token>,
) -> Response {
    let peer = peer.map(|axum::Extension(p)| p);
    // An address that keeps pasting tokens nobody knows is stopped before linker-svc is asked.
    if let Err(status) = state.failed_sign_ins.check(peer) {
        return PageError::Status(status).into_response();
    }
    let token = Secret::new(form.token.trim());
    let refuse = |message: &str| {
        let mut page = render(&SignInPage {
            message: Some(message.to_owned()),
            ended: false,
        });
        *page.status_mut() = axum::http::StatusCode::UNAUTHORIZED;
        page
    };
    if token.expose().is_empty() {
        return refuse("token: paste an admin or operator token");
    }
    if sightline_runtime::token::parse(token.expose()).is_err() {
        // Not even a token's shape: refused here, and counted like an unknown one.
        state.failed_sign_ins.charge(peer);
        return refuse("token: not a valid token (unknown, revoked or expired)");
    }
    let whose = match state.services.whose(&token).await {
        Ok(whose) => whose,
        Err(status)
            if matches!(
                status.code(),
                Code::Unauthenticated | Code::InvalidArgument | Code::NotFound
            ) =>
        {
            state.failed_sign_ins.charge(peer);
            return refuse("token: not a valid token (unknown, revoked or expired)");
        }
        Err(status) => return PageError::Status(status).into_response(),
    };
    let who = match whose.kind() {
        CredentialKind::Operator => Who::Operator,
        CredentialKind::Admin => Who::Admin {
            org_id: whose.org_id,
            token_id: whose.credential_id,
        },
        _ => return refuse("token: only an org admin token or the operator token signs in here"),
    };
    let to = start_page(&who);
    let id = state.sessions.start(token, who);
    tracing::info!("signed in");
    (
        [(header::SET_COOKIE, session_cookie(&state, Some(&id)))],
        Redirect::to(&to),
    )
        .into_response()
}

pub(crate) async fn signout(
    State(state): State<AppRef>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(id) = cookie_session(&headers) {
        state.sessions.end(&id);
    }
    (
        [(header::SET_COOKIE, session_cookie(&state, None))],
        Redirect::to("/signin"),
    )
        .into_response()
}
