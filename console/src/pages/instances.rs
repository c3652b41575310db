//! Instances: the portfolio (score, version, last seen, readiness), link keys (create with the
//! secret shown once, regenerate, list with expiry), unlink and revoke, and the instances detected
//! by license/domain and by app links, linked or not.

use askama::Template;
use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use sightline_proto::insights::v1 as insights_pb;
use sightline_proto::linker::v1 as linker_pb;
use sightline_runtime::Secret;

use crate::format::{name, when};
use crate::session::Flash;
use crate::web::{AppRef, Chrome, PageError, Signed, after_change, render};

pub(crate) fn routes() -> Router<AppRef> {
    Router::new()
        .route("/orgs/{org}/instances", get(page))
        .route("/orgs/{org}/keys", post(create_key))
        .route("/orgs/{org}/keys/{key}/regenerate", post(regenerate_key))
        .route("/orgs/{org}/instances/{instance}/unlink", post(unlink))
        .route(
            "/orgs/{org}/credentials/{credential}/revoke",
            post(revoke_credential),
        )
}

pub(crate) struct InstanceRow {
    pub id: String,
    pub server_id: String,
    pub product: String,
    pub version: String,
    pub score: String,
    pub readiness: String,
    pub last_seen: String,
    pub linked: bool,
    /// Active credentials: (id, prefix).
    pub credentials: Vec<(String, String)>,
}

pub(crate) struct KeyRow {
    pub id: String,
    pub label: String,
    pub prefix: String,
    pub created: String,
    pub expires: String,
    pub last_used: String,
    pub state: String,
    pub active: bool,
}

pub(crate) struct DetectedRow {
    pub method: String,
    pub linked: String,
    pub what: String,
}

#[derive(Template)]
#[template(path = "instances.html")]
struct InstancesPage {
    chrome: Chrome,
    instances: Vec<InstanceRow>,
    keys: Vec<KeyRow>,
    detected: Vec<DetectedRow>,
}

async fn page(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
) -> Result<Response, PageError> {
    let portfolio = state
        .services
        .insights()
        .get_portfolio(signed.ask(insights_pb::GetPortfolioRequest {
            org_id: org_id.clone(),
            page_size: 500,
            page_token: String::new(),
        }))
        .await?
        .into_inner();
    let mut linker = state.services.linker();
    let linked = linker
        .list_instances(signed.ask(linker_pb::ListInstancesRequest {
            org_id: org_id.clone(),
            page_size: 1000,
            ..Default::default()
        }))
        .await?
        .into_inner();
    let keys = linker
        .list_link_keys(signed.ask(linker_pb::ListLinkKeysRequest {
            org_id: org_id.clone(),
            page_size: 1000,
            page_token: String::new(),
        }))
        .await?
        .into_inner();
    let detected = linker
        .detect_instances(signed.ask(linker_pb::DetectInstancesRequest {
            org_id: org_id.clone(),
        }))
        .await?
        .into_inner();
    let instances = portfolio
        .instances
        .into_iter()
        .map(|p| {
            let metadata = p.metadata.unwrap_or_default();
            let credentials = linked
                .instances
                .iter()
                .filter(|i| i.instance_id == p.instance_id)
                .flat_map(|i| i.credentials.iter())
                .filter(|c| c.state() == linker_pb::SecretState::Active)
                .map(|c| (c.credential_id.clone(), c.prefix.clone()))
                .collect();
            InstanceRow {
                server_id: metadata.server_id,
                product: metadata.product,
                version: metadata.version,
                score: if p.has_score {
                    p.score.to_string()
                } else {
                    "no score yet".to_owned()
                },
                readiness: if p.has_readiness {
                    p.readiness_score.to_string()
                } else {
                    "not assessed".to_owned()
                },
                last_seen: when(p.last_seen_at.as_ref()),
                linked: p.linked,
                id: p.instance_id,
                credentials,
            }
        })
        .collect();
    let keys = keys
        .keys
        .into_iter()
        .map(|k| KeyRow {
            active: k.state() == linker_pb::SecretState::Active,
            state: name(k.state().as_str_name(), "SECRET_STATE_"),
            created: when(k.created_at.as_ref()),
            expires: when(k.expires_at.as_ref()),
            last_used: when(k.last_used_at.as_ref()),
            id: k.key_id,
            label: k.label,
            prefix: k.prefix,
        })
        .collect();
    let detected = detected
        .instances
        .into_iter()
        .map(|d| {
            let what = match d.method() {
                linker_pb::DetectionMethod::LicenseDomain => {
                    format!("{} license {} on {}", d.product, d.sen, d.domain)
                }
                _ => d
                    .app_link
                    .as_ref()
                    .map(|l| format!("{} {} at {}", l.product_family, l.server_id, l.url))
                    .unwrap_or_default(),
            };
            DetectedRow {
                method: name(d.method().as_str_name(), "DETECTION_METHOD_"),
                linked: if d.linked {
                    format!("linked ({})", d.instance_id)
                } else {
                    "not linked".to_owned()
                },
                what,
            }
        })
        .collect();
    Ok(render(&InstancesPage {
        chrome: Chrome::new(&state, &signed, &org_id, "instances", "Instances"),
        instances,
        keys,
        detected,
    }))
}

#[derive(Deserialize)]
struct NewKey {
    label: String,
}

/// Back to the instances page, a new key's secret shown there once.
fn key_made(
    state: &AppRef,
    signed: &Signed,
    org_id: &str,
    made: Result<(Option<linker_pb::LinkKeyInfo>, String), tonic::Status>,
) -> Response {
    let back = format!("/orgs/{org_id}/instances");
    after_change(state, signed, "keys", &back, made, |(key, secret)| {
        let id = key.map(|k| k.key_id).unwrap_or_default();
        state.sessions.flash(
            &signed.id,
            Flash::Secret {
                what: "link key",
                id: id.clone(),
                secret: Secret::new(secret),
            },
        );
        format!("Link key {id} created; it is valid for 30 days.")
    })
}

async fn create_key(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    Form(form): Form<NewKey>,
) -> Result<Response, PageError> {
    let created = state
        .services
        .linker()
        .create_link_key(signed.ask(linker_pb::CreateLinkKeyRequest {
            org_id: org_id.clone(),
            label: form.label,
            request_id: String::new(),
        }))
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.key, r.secret)
        });
    Ok(key_made(&state, &signed, &org_id, created))
}

async fn regenerate_key(
    State(state): State<AppRef>,
    signed: Signed,
    Path((org_id, key_id)): Path<(String, String)>,
) -> Result<Response, PageError> {
    let made = state
        .services
        .linker()
        .regenerate_link_key(signed.ask(linker_pb::RegenerateLinkKeyRequest {
            org_id: org_id.clone(),
            key_id,
        }))
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.key, r.secret)
        });
    Ok(key_made(&state, &signed, &org_id, made))
}

async fn unlink(
    State(state): State<AppRef>,
    signed: Signed,
    Path((org_id, instance_id)): Path<(String, String)>,
) -> Result<Response, PageError> {
    let done = state
        .services
        .linker()
        .unlink_instance(signed.ask(linker_pb::UnlinkInstanceRequest {
            org_id: org_id.clone(),
            instance_id: instance_id.clone(),
        }))
        .await;
    let back = format!("/orgs/{org_id}/instances");
    Ok(after_change(
        &state,
        &signed,
        "instances",
        &back,
        done,
        |_| format!("Instance {instance_id} unlinked; its credentials are revoked."),
    ))
}

async fn revoke_credential(
    State(state): State<AppRef>,
    signed: Signed,
    Path((org_id, credential_id)): Path<(String, String)>,
) -> Result<Response, PageError> {
    let done = state
        .services
        .linker()
        .revoke_credential(signed.ask(linker_pb::RevokeCredentialRequest {
            org_id: org_id.clone(),
            credential_id: credential_id.clone(),
        }))
        .await;
    let back = format!("/orgs/{org_id}/instances");
    Ok(after_change(
        &state,
        &signed,
        "instances",
        &back,
        done,
        |_| format!("Credential {credential_id} revoked."),
    ))
}
