//! The audit log: paged, filtered by action, with Verify chain and its answer.

use askama::Template;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use sightline_proto::audit::v1 as audit_pb;

use crate::format::when;
use crate::web::{AppRef, Chrome, PageError, Signed, after_change, render};

pub(crate) fn routes() -> Router<AppRef> {
    Router::new()
        .route("/orgs/{org}/audit", get(page))
        .route("/orgs/{org}/audit/verify", post(verify))
}

#[derive(Debug, Deserialize)]
pub(crate) struct AuditQuery {
    action: Option<String>,
    after: Option<String>,
}

pub(crate) struct Entry {
    pub seq: u64,
    pub at: String,
    pub actor: String,
    pub service: String,
    pub action: String,
    pub target: String,
    pub attributes: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    chrome: Chrome,
    action: String,
    entries: Vec<Entry>,
    next: String,
}

async fn page(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    Query(q): Query<AuditQuery>,
) -> Result<Response, PageError> {
    let action = q.action.unwrap_or_default().trim().to_owned();
    let listed = state
        .services
        .audit()
        .list_events(signed.ask(audit_pb::ListEventsRequest {
            org_id: org_id.clone(),
            page_size: 100,
            page_token: q.after.unwrap_or_default(),
            action_prefix: action.clone(),
        }))
        .await?
        .into_inner();
    let entries = listed
        .events
        .into_iter()
        .map(|e| {
            let mut attributes: Vec<String> = e
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            attributes.sort();
            Entry {
                seq: e.seq,
                at: when(e.occurred_at.as_ref()),
                actor: e.actor,
                service: e.service,
                action: e.action,
                target: e.target,
                attributes: attributes.join(", "),
            }
        })
        .collect();
    Ok(render(&AuditPage {
        chrome: Chrome::new(&state, &signed, &org_id, "audit", "Audit log"),
        action,
        entries,
        next: listed.next_page_token,
    }))
}

async fn verify(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
) -> Result<Response, PageError> {
    let answer = state
        .services
        .audit()
        .verify_chain(signed.ask(audit_pb::VerifyChainRequest {
            org_id: org_id.clone(),
        }))
        .await
        .map(tonic::Response::into_inner);
    let back = format!("/orgs/{org_id}/audit");
    Ok(after_change(
        &state,
        &signed,
        "verify",
        &back,
        answer,
        |v| {
            if v.intact {
                format!(
                    "The chain is intact: {} entries checked, head {}.",
                    v.entries_checked,
                    hex::encode(&v.head_hash)
                )
            } else {
                format!(
                    "The chain is broken at entry {}: {} ({} entries checked).",
                    v.first_bad_seq, v.problem, v.entries_checked
                )
            }
        },
    ))
}
