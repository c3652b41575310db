//! Settings: view tracking, retention and data residency (request a move, its state live while it
//! is under way, the support-bundle location).

use askama::Template;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use sightline_proto::common::v1 as common_pb;
use sightline_proto::consent::v1 as consent_pb;

use crate::format::name;
use crate::pages::operator::{MoveRow, location, move_rows};
use crate::web::{AppRef, Chrome, PageError, Signed, after_change, render};

pub(crate) fn routes() -> Router<AppRef> {
    Router::new()
        .route("/orgs/{org}/settings", get(page))
        .route("/orgs/{org}/settings/tracking", post(update_tracking))
        .route("/orgs/{org}/settings/retention", post(update_retention))
        .route("/orgs/{org}/settings/residency", post(request_move))
}

const CHANNELS: [common_pb::Channel; 5] = [
    common_pb::Channel::Desktop,
    common_pb::Channel::MobileWeb,
    common_pb::Channel::MobileApp,
    common_pb::Channel::ServicePortal,
    common_pb::Channel::PartnerApp,
];

const LOCATIONS: [common_pb::Location; 9] = [
    common_pb::Location::Global,
    common_pb::Location::Australia,
    common_pb::Location::Canada,
    common_pb::Location::Eu,
    common_pb::Location::Germany,
    common_pb::Location::India,
    common_pb::Location::Japan,
    common_pb::Location::Switzerland,
    common_pb::Location::Singapore,
];

#[derive(Template)]
#[template(path = "settings.html")]
struct SettingsPage {
    chrome: Chrome,
    /// (value, label, enabled)
    channels: Vec<(i32, String, bool)>,
    tracking: consent_pb::TrackingSettings,
    excluded_groups: String,
    blocking_s: u64,
    retention: consent_pb::RetentionSettings,
    location: String,
    bundle_location: String,
    /// (value, label)
    locations: Vec<(i32, String)>,
    moves: Vec<MoveRow>,
}

async fn page(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
) -> Result<Response, PageError> {
    let mut consent = state.services.consent();
    let tracking = consent
        .get_tracking_settings(signed.ask(consent_pb::GetTrackingSettingsRequest {
            org_id: org_id.clone(),
        }))
        .await?
        .into_inner()
        .settings
        .unwrap_or_default();
    let retention = consent
        .get_retention(signed.ask(consent_pb::GetRetentionRequest {
            org_id: org_id.clone(),
        }))
        .await?
        .into_inner()
        .retention
        .unwrap_or_default();
    let residency = consent
        .get_residency(signed.ask(consent_pb::GetResidencyRequest {
            org_id: org_id.clone(),
        }))
        .await?
        .into_inner()
        .residency
        .unwrap_or_default();
    let moves = move_rows(&residency);
    let mut chrome = Chrome::new(&state, &signed, &org_id, "settings", "Settings");
    if moves.iter().any(|m| m.requested || m.moving) {
        // The move's state, live: the page reloads itself while one is under way.
        chrome.refresh_s = 2;
    }
    Ok(render(&SettingsPage {
        chrome,
        channels: CHANNELS
            .iter()
            .map(|c| {
                let value = i32::from(*c);
                (
                    value,
                    name(c.as_str_name(), "CHANNEL_")
                        .replace('_', " ")
                        .to_lowercase(),
                    tracking.enabled_channels.contains(&value),
                )
            })
            .collect(),
        excluded_groups: tracking.excluded_groups.join(", "),
        blocking_s: tracking.blocking_time_ms / 1_000,
        tracking,
        retention,
        location: location(residency.location),
        bundle_location: location(residency.support_bundle_location),
        locations: LOCATIONS
            .iter()
            .map(|l| (i32::from(*l), name(l.as_str_name(), "LOCATION_")))
            .collect(),
        moves,
    }))
}

/// A form's fields in order, repeated names kept (a checkbox group sends one per box).
type Fields = Vec<(String, String)>;

fn fields(body: &axum::body::Bytes) -> Fields {
    form_urlencoded::parse(body).into_owned().collect()
}

fn one<'a>(fields: &'a Fields, key: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map_or("", |(_, v)| v.as_str())
}

/// A whole number from the form; an empty field is 0 (for retention: keep the default).
fn number<T: std::str::FromStr + Default>(
    fields: &Fields,
    key: &'static str,
) -> Result<T, tonic::Status> {
    let text = one(fields, key).trim();
    if text.is_empty() {
        return Ok(T::default());
    }
    text.parse().map_err(|_| {
        tonic::Status::invalid_argument(format!("{key}: {text:?} is not a whole number"))
    })
}

async fn update_tracking(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, PageError> {
    let f = fields(&body);
    let back = format!("/orgs/{org_id}/settings");
    let blocking_s: Result<u64, _> = number(&f, "blocking_time_s");
    let blocking_s = match blocking_s {
        Ok(s) => s,
        Err(status) => {
            return Ok(after_change(
                &state,
                &signed,
                "tracking",
                &back,
                Err::<(), _>(status),
                |()| String::new(),
            ));
        }
    };
    let settings = consent_pb::TrackingSettings {
        enabled_channels: f
            .iter()
            .filter(|(k, _)| k == "channel")
            .filter_map(|(_, v)| v.parse().ok())
            .collect(),
        exclude_anonymous: !one(&f, "exclude_anonymous").is_empty(),
        excluded_groups: one(&f, "excluded_groups")
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect(),
        blocking_time_ms: blocking_s.saturating_mul(1_000),
        view_counter_enabled: !one(&f, "view_counter_enabled").is_empty(),
        global_report_group: one(&f, "global_report_group").trim().to_owned(),
    };
    let done = state
        .services
        .consent()
        .update_tracking_settings(signed.ask(consent_pb::UpdateTrackingSettingsRequest {
            org_id: org_id.clone(),
            settings: Some(settings),
        }))
        .await;
    Ok(after_change(
        &state,
        &signed,
        "tracking",
        &back,
        done,
        |_| "View tracking saved.".to_owned(),
    ))
}

async fn update_retention(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, PageError> {
    let f = fields(&body);
    let back = format!("/orgs/{org_id}/settings");
    let read = || -> Result<consent_pb::RetentionSettings, tonic::Status> {
        Ok(consent_pb::RetentionSettings {
            raw_days: number(&f, "raw_days")?,
            assessment_days: number(&f, "assessment_days")?,
            aggregate_days: number(&f, "aggregate_days")?,
            score_history_days: number(&f, "score_history_days")?,
            support_bundle_days: number(&f, "support_bundle_days")?,
            event_id_days: number(&f, "event_id_days")?,
        })
    };
    let retention = match read() {
        Ok(r) => r,
        Err(status) => {
            return Ok(after_change(
                &state,
                &signed,
                "retention",
                &back,
                Err::<(), _>(status),
                |()| String::new(),
            ));
        }
    };
    let done = state
        .services
        .consent()
        .update_retention(signed.ask(consent_pb::UpdateRetentionRequest {
            org_id: org_id.clone(),
            retention: Some(retention),
        }))
        .await;
    Ok(after_change(
        &state,
        &signed,
        "retention",
        &back,
        done,
        |_| "Retention saved.".to_owned(),
    ))
}

async fn request_move(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, PageError> {
    let f = fields(&body);
    let back = format!("/orgs/{org_id}/settings");
    let scope: i32 = one(&f, "scope").parse().unwrap_or(0);
    let to: i32 = one(&f, "to_location").parse().unwrap_or(0);
    let done = state
        .services
        .consent()
        .request_residency_move(signed.ask(consent_pb::RequestResidencyMoveRequest {
            org_id: org_id.clone(),
            transition: consent_pb::MoveTransition::Request.into(),
            scope,
            to_location: to,
            owner: String::new(),
        }))
        .await;
    Ok(after_change(
        &state,
        &signed,
        "residency",
        &back,
        done,
        |_| {
            format!(
                "Move to {} requested; the operator starts it.",
                location(to)
            )
        },
    ))
}
