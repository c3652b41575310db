//! The operator's pages: orgs (list, create), an org's admin tokens (create, shown once; revoke)
//! and residency moves waiting to start, and each service's health.

use askama::Template;
use axum::Form;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use sightline_proto::consent::v1 as consent_pb;
use sightline_proto::linker::v1 as linker_pb;
use sightline_runtime::Secret;

use crate::format::{name, when};
use crate::session::Flash;
use crate::web::{AppRef, Chrome, PageError, Signed, after_change, render};

pub(crate) fn routes() -> Router<AppRef> {
    Router::new()
        .route("/operator", get(orgs))
        .route("/operator/orgs", post(create_org))
        .route("/operator/orgs/{org}", get(org))
        .route("/operator/orgs/{org}/tokens", post(create_token))
        .route(
            "/operator/orgs/{org}/tokens/{token}/revoke",
            post(revoke_token),
        )
        .route("/operator/orgs/{org}/moves", post(move_step))
        .route("/operator/services", get(services))
}

pub(crate) struct OrgRow {
    pub id: String,
    pub name: String,
    pub created: String,
}

#[derive(Template)]
#[template(path = "operator_orgs.html")]
struct OrgsPage {
    chrome: Chrome,
    orgs: Vec<OrgRow>,
    next: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct After {
    after: Option<String>,
}

async fn orgs(
    State(state): State<AppRef>,
    signed: Signed,
    Query(query): Query<After>,
) -> Result<Response, PageError> {
    signed.require_operator()?;
    let listed = state
        .services
        .linker()
        .list_orgs(signed.ask(linker_pb::ListOrgsRequest {
            page_size: 100,
            page_token: query.after.unwrap_or_default(),
        }))
        .await?
        .into_inner();
    let orgs = listed
        .orgs
        .into_iter()
        .map(|o| OrgRow {
            created: when(o.created_at.as_ref()),
            id: o.org_id,
            name: o.name,
        })
        .collect();
    Ok(render(&OrgsPage {
        chrome: Chrome::new(&state, &signed, "", "operator", "Orgs"),
        orgs,
        next: listed.next_page_token,
    }))
}

#[derive(Deserialize)]
struct NewOrg {
    name: String,
}

async fn create_org(
    State(state): State<AppRef>,
    signed: Signed,
    Form(form): Form<NewOrg>,
) -> Result<Response, PageError> {
    signed.require_operator()?;
    let created = state
        .services
        .linker()
        .create_org(signed.ask(linker_pb::CreateOrgRequest { name: form.name }))
        .await
        .map(|r| r.into_inner().org.unwrap_or_default());
    Ok(match created {
        Ok(org) => {
            state.sessions.flash(
                &signed.id,
                Flash::Message {
                    form: "tokens",
                    error: false,
                    text: format!(
                        "Org {} created. Create its first admin token below.",
                        org.name
                    ),
                },
            );
            axum::response::Redirect::to(&format!("/operator/orgs/{}", org.org_id)).into_response()
        }
        Err(status) => after_change(
            &state,
            &signed,
            "create-org",
            "/operator",
            Err::<(), _>(status),
            |()| String::new(),
        ),
    })
}

pub(crate) struct TokenRow {
    pub id: String,
    pub label: String,
    pub prefix: String,
    pub created: String,
    pub last_used: String,
    pub state: String,
    pub active: bool,
}

pub(crate) struct MoveRow {
    pub scope: String,
    pub scope_value: i32,
    pub from: String,
    pub to: String,
    pub state: String,
    pub requested: bool,
    pub moving: bool,
    pub waiting_for: String,
}

#[derive(Template)]
#[template(path = "operator_org.html")]
struct OrgPage {
    chrome: Chrome,
    tokens: Vec<TokenRow>,
    moves: Vec<MoveRow>,
}

pub(crate) fn move_rows(residency: &consent_pb::Residency) -> Vec<MoveRow> {
    residency
        .moves
        .iter()
        .map(|m| MoveRow {
            scope: name(m.scope().as_str_name(), "RESIDENCY_SCOPE_"),
            scope_value: m.scope,
            from: location(m.from_location),
            to: location(m.to_location),
            state: name(m.state().as_str_name(), "MOVE_STATE_"),
            requested: m.state() == consent_pb::MoveState::Requested,
            moving: m.state() == consent_pb::MoveState::Moving,
            waiting_for: m.waiting_for.join(", "),
        })
        .collect()
}

pub(crate) fn location(value: i32) -> String {
    sightline_proto::common::v1::Location::try_from(value).map_or_else(
        |_| value.to_string(),
        |l| name(l.as_str_name(), "LOCATION_"),
    )
}

async fn org(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
) -> Result<Response, PageError> {
    signed.require_operator()?;
    let listed = state
        .services
        .linker()
        .list_admin_tokens(signed.ask(linker_pb::ListAdminTokensRequest {
            org_id: org_id.clone(),
            page_size: 1000,
            page_token: String::new(),
        }))
        .await?
        .into_inner();
    let residency = state
        .services
        .consent()
        .get_residency(signed.ask(consent_pb::GetResidencyRequest {
            org_id: org_id.clone(),
        }))
        .await?
        .into_inner()
        .residency
        .unwrap_or_default();
    let tokens = listed
        .tokens
        .into_iter()
        .map(|t| TokenRow {
            active: t.state() == linker_pb::SecretState::Active,
            state: name(t.state().as_str_name(), "SECRET_STATE_"),
            created: when(t.created_at.as_ref()),
            last_used: when(t.last_used_at.as_ref()),
            id: t.token_id,
            label: t.label,
            prefix: t.prefix,
        })
        .collect();
    Ok(render(&OrgPage {
        chrome: Chrome::new(&state, &signed, &org_id, "operator", "Org administration"),
        tokens,
        moves: move_rows(&residency),
    }))
}

#[derive(Deserialize)]
struct NewToken {
    label: String,
}

async fn create_token(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    Form(form): Form<NewToken>,
) -> Result<Response, PageError> {
    signed.require_operator()?;
    let created = state
        .services
        .linker()
        .create_admin_token(signed.ask(linker_pb::CreateAdminTokenRequest {
            org_id: org_id.clone(),
            label: form.label,
            request_id: String::new(),
        }))
        .await
        .map(tonic::Response::into_inner);
    let back = format!("/operator/orgs/{org_id}");
    Ok(after_change(
        &state,
        &signed,
        "tokens",
        &back,
        created,
        |reply| {
            let id = reply.token.map(|t| t.token_id).unwrap_or_default();
            state.sessions.flash(
                &signed.id,
                Flash::Secret {
                    what: "admin token",
                    id: id.clone(),
                    secret: Secret::new(reply.secret),
                },
            );
            format!("Admin token {id} created.")
        },
    ))
}

async fn revoke_token(
    State(state): State<AppRef>,
    signed: Signed,
    Path((org_id, token_id)): Path<(String, String)>,
) -> Result<Response, PageError> {
    signed.require_operator()?;
    let revoked = state
        .services
        .linker()
        .revoke_admin_token(signed.ask(linker_pb::RevokeAdminTokenRequest {
            org_id: org_id.clone(),
            token_id: token_id.clone(),
        }))
        .await;
    let back = format!("/operator/orgs/{org_id}");
    Ok(after_change(
        &state,
        &signed,
        "tokens",
        &back,
        revoked,
        |_| format!("Admin token {token_id} revoked."),
    ))
}

#[derive(Deserialize)]
struct MoveStep {
    scope: i32,
    transition: String,
}

async fn move_step(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    Form(form): Form<MoveStep>,
) -> Result<Response, PageError> {
    signed.require_operator()?;
    let transition = match form.transition.as_str() {
        "start" => consent_pb::MoveTransition::Start,
        "complete" => consent_pb::MoveTransition::Complete,
        other => {
            return Err(PageError::BadRequest(format!(
                "transition: {other:?} is not start or complete"
            )));
        }
    };
    let moved = state
        .services
        .consent()
        .request_residency_move(signed.ask(consent_pb::RequestResidencyMoveRequest {
            org_id: org_id.clone(),
            transition: transition.into(),
            scope: form.scope,
            ..Default::default()
        }))
        .await;
    let back = format!("/operator/orgs/{org_id}");
    Ok(after_change(&state, &signed, "moves", &back, moved, |_| {
        format!(
            "Move {}.",
            if form.transition == "start" {
                "started"
            } else {
                "completed"
            }
        )
    }))
}

#[derive(Template)]
#[template(path = "operator_services.html")]
struct ServicesPage {
    chrome: Chrome,
    services: Vec<(&'static str, String)>,
}

async fn services(State(state): State<AppRef>, signed: Signed) -> Result<Response, PageError> {
    signed.require_operator()?;
    Ok(render(&ServicesPage {
        chrome: Chrome::new(&state, &signed, "", "services", "Services"),
        services: state.services.health().await,
    }))
}
