//! One instance: its optimization score with findings (evidence against thresholds and
//! recommendations), trend charts of the metrics the findings name (GetTrends), the score history,
//! and its cloud readiness (counts, blockers, score; run an assessment or upload an assessment file).

use askama::Template;
use axum::Router;
use axum::extract::{Multipart, Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Deserialize;
use sightline_proto::insights::v1 as insights_pb;
use sightline_runtime::time::{DAY_MS, HOUR_MS, from_proto};

use crate::chart::{self, Point};
use crate::format::{name, number, when};
use crate::pages::Days;
use crate::web::{AppRef, Chrome, PageError, Signed, after_change, render};

pub(crate) fn routes() -> Router<AppRef> {
    Router::new()
        .route("/orgs/{org}/instances/{instance}", get(page))
        .route(
            "/orgs/{org}/instances/{instance}/readiness",
            post(run_readiness),
        )
        .route(
            "/orgs/{org}/instances/{instance}/assessment",
            // The file is read up to MAX_UPLOAD_BYTES (axum's default body limit is 2 MB).
            post(upload_assessment).layer(axum::extract::DefaultBodyLimit::max(
                MAX_UPLOAD_BYTES + 64 * 1024,
            )),
        )
}

/// The largest assessment file the console forwards (insights-svc applies its own limit too).
const MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;
const CHUNK_BYTES: usize = 64 * 1024;

pub(crate) struct FindingView {
    pub severity: String,
    pub title: String,
    pub recommendation: String,
    /// (metric, observed, comparison, threshold, unit, aggregation)
    pub evidence: Vec<(String, String, String, String, String, String)>,
}

pub(crate) struct TrendView {
    pub metric: String,
    pub svg: String,
    pub direction: String,
    pub slope: String,
    /// (time, value, samples)
    pub points: Vec<(String, String, u64)>,
}

pub(crate) struct ReadinessView {
    pub score: u32,
    pub assessed: String,
    pub source: String,
    pub counts: Vec<(&'static str, u64)>,
    /// (severity, description, entities)
    pub blockers: Vec<(String, String, String)>,
}

#[derive(Template)]
#[template(path = "health.html")]
struct HealthPage {
    chrome: Chrome,
    instance_id: String,
    score: u32,
    has_data: bool,
    computed: String,
    rules_version: String,
    findings: Vec<FindingView>,
    days: Days,
    start_ms: i64,
    end_ms: i64,
    trends: Vec<TrendView>,
    scores_svg: String,
    scores: Vec<(String, u32)>,
    readiness: Option<ReadinessView>,
    metric: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct HealthQuery {
    from: Option<String>,
    to: Option<String>,
    metric: Option<String>,
}

async fn page(
    State(state): State<AppRef>,
    signed: Signed,
    Path((org_id, instance_id)): Path<(String, String)>,
    Query(query): Query<HealthQuery>,
) -> Result<Response, PageError> {
    let today = state.clock.now_ms().div_euclid(DAY_MS);
    let days = Days::from_query(query.from.as_deref(), query.to.as_deref(), today, 7)
        .map_err(PageError::BadRequest)?;
    let mut insights = state.services.insights();
    let health = insights
        .get_health(signed.ask(insights_pb::GetHealthRequest {
            org_id: org_id.clone(),
            instance_id: instance_id.clone(),
        }))
        .await?
        .into_inner()
        .health
        .unwrap_or_default();
    // The metrics the findings name, then the one asked for.
    let mut metrics: Vec<String> = Vec::new();
    for finding in &health.findings {
        for e in &finding.evidence {
            if !e.metric_name.is_empty() && !metrics.contains(&e.metric_name) {
                metrics.push(e.metric_name.clone());
            }
        }
    }
    let asked = query.metric.unwrap_or_default().trim().to_owned();
    if !asked.is_empty() && !metrics.contains(&asked) {
        metrics.push(asked.clone());
    }
    let mut trends = Vec::new();
    for metric in metrics {
        let answer = insights
            .get_trends(signed.ask(insights_pb::GetTrendsRequest {
                org_id: org_id.clone(),
                instance_id: instance_id.clone(),
                metric_name: metric.clone(),
                range: Some(days.range()),
                bucket: Some(prost_types::Duration {
                    seconds: HOUR_MS / 1_000,
                    nanos: 0,
                }),
            }))
            .await?
            .into_inner();
        let points: Vec<Point> = answer
            .points
            .iter()
            .map(|p| Point {
                label: when(p.at.as_ref()),
                value: p.value,
            })
            .collect();
        let unit = health
            .findings
            .iter()
            .flat_map(|f| f.evidence.iter())
            .find(|e| e.metric_name == metric)
            .map(|e| e.unit.clone())
            .unwrap_or_default();
        trends.push(TrendView {
            svg: chart::line(&format!("{metric}, hourly"), &unit, &points),
            direction: name(answer.direction().as_str_name(), "TREND_DIRECTION_"),
            slope: format!("{} {unit} per day", number(answer.slope_per_day, 3)),
            points: answer
                .points
                .iter()
                .map(|p| (when(p.at.as_ref()), number(p.value, 6), p.samples))
                .collect(),
            metric,
        });
    }
    let history = insights
        .get_score_history(signed.ask(insights_pb::GetScoreHistoryRequest {
            org_id: org_id.clone(),
            instance_id: instance_id.clone(),
            range: Some(days.range()),
        }))
        .await?
        .into_inner();
    let scores: Vec<(String, u32)> = history
        .points
        .iter()
        .map(|p| (when(p.at.as_ref()), p.score))
        .collect();
    let score_points: Vec<Point> = scores
        .iter()
        .map(|(label, score)| Point {
            label: label.clone(),
            value: f64::from(*score),
        })
        .collect();
    let readiness = match insights
        .get_readiness(signed.ask(insights_pb::GetReadinessRequest {
            org_id: org_id.clone(),
            instance_id: instance_id.clone(),
        }))
        .await
    {
        Ok(answer) => answer.into_inner().report.map(readiness_view),
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => return Err(status.into()),
    };
    let findings = health
        .findings
        .iter()
        .map(|f| FindingView {
            severity: name(f.severity().as_str_name(), "SEVERITY_"),
            title: f.title.clone(),
            recommendation: f.recommendation.clone(),
            evidence: f
                .evidence
                .iter()
                .map(|e| {
                    (
                        e.metric_name.clone(),
                        number(e.observed, 3),
                        e.comparison.clone(),
                        number(e.threshold, 3),
                        e.unit.clone(),
                        e.aggregation.clone(),
                    )
                })
                .collect(),
        })
        .collect();
    let range = days.range();
    Ok(render(&HealthPage {
        chrome: Chrome::new(
            &state,
            &signed,
            &org_id,
            "instances",
            format!("Instance {instance_id}"),
        ),
        score: health.score,
        has_data: health.has_data,
        computed: when(health.computed_at.as_ref()),
        rules_version: health.rules_version,
        findings,
        start_ms: range.start.as_ref().map_or(0, from_proto),
        end_ms: range.end.as_ref().map_or(0, from_proto),
        days,
        trends,
        scores_svg: chart::line("Score history", "", &score_points),
        scores,
        readiness,
        metric: asked,
        instance_id,
    }))
}

fn readiness_view(r: insights_pb::ReadinessReport) -> ReadinessView {
    let c = r.counts.unwrap_or_default();
    ReadinessView {
        score: r.readiness_score,
        assessed: when(r.assessed_at.as_ref()),
        source: name(r.source().as_str_name(), "DATA_SOURCE_"),
        counts: vec![
            ("Projects", c.projects),
            ("Issues", c.issues),
            ("Custom fields", c.custom_fields),
            ("Workflows", c.workflows),
            ("Users", c.users),
            ("Spaces", c.spaces),
            ("Apps", c.apps),
            ("Groups", c.groups),
        ],
        blockers: r
            .blockers
            .iter()
            .map(|b| {
                let entities = b
                    .entities
                    .iter()
                    .map(|e| {
                        let label = [e.key.as_str(), e.name.as_str()]
                            .into_iter()
                            .filter(|s| !s.is_empty())
                            .collect::<Vec<_>>()
                            .join(" ");
                        if label.is_empty() {
                            format!("{} {}", e.entity_type, e.id)
                        } else {
                            format!("{} {} ({label})", e.entity_type, e.id)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                (
                    name(b.severity().as_str_name(), "SEVERITY_"),
                    b.description.clone(),
                    entities,
                )
            })
            .collect(),
    }
}

async fn run_readiness(
    State(state): State<AppRef>,
    signed: Signed,
    Path((org_id, instance_id)): Path<(String, String)>,
) -> Result<Response, PageError> {
    let done = state
        .services
        .insights()
        .run_readiness_assessment(signed.ask(insights_pb::RunReadinessAssessmentRequest {
            org_id: org_id.clone(),
            instance_id: instance_id.clone(),
        }))
        .await
        .map(tonic::Response::into_inner);
    let back = format!("/orgs/{org_id}/instances/{instance_id}");
    Ok(after_change(
        &state,
        &signed,
        "readiness",
        &back,
        done,
        |r| {
            format!(
                "Assessed: readiness score {}.",
                r.report.map(|r| r.readiness_score).unwrap_or_default()
            )
        },
    ))
}

/// An assessment file from the browser, sent to UploadAssessment as a header and 64 KiB chunks.
async fn upload_assessment(
    State(state): State<AppRef>,
    signed: Signed,
    Path((org_id, instance_id)): Path<(String, String)>,
    mut multipart: Multipart,
) -> Result<Response, PageError> {
    let back = format!("/orgs/{org_id}/instances/{instance_id}");
    let mut file: Option<(String, Vec<u8>)> = None;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| PageError::BadRequest(format!("file: {e}")))?
    {
        if field.name() != Some("file") {
            continue;
        }
        let file_name = field.file_name().unwrap_or("assessment.json").to_owned();
        let mut bytes = Vec::new();
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| PageError::BadRequest(format!("file: {e}")))?
        {
            if bytes.len() + chunk.len() > MAX_UPLOAD_BYTES {
                return Err(PageError::BadRequest(format!(
                    "file: larger than {} MiB",
                    MAX_UPLOAD_BYTES >> 20
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        file = Some((file_name, bytes));
    }
    let Some((file_name, bytes)) = file.filter(|(_, b)| !b.is_empty()) else {
        let outcome: Result<(), tonic::Status> = Err(tonic::Status::invalid_argument(
            "file: choose an assessment file",
        ));
        return Ok(after_change(
            &state,
            &signed,
            "upload",
            &back,
            outcome,
            |()| String::new(),
        ));
    };
    let mut parts = vec![insights_pb::UploadAssessmentRequest {
        part: Some(insights_pb::upload_assessment_request::Part::Header(
            insights_pb::UploadHeader {
                org_id: org_id.clone(),
                instance_id: instance_id.clone(),
                file_name,
                size_bytes: bytes.len() as u64,
                format: "sightline.assessment".into(),
                format_version: 1,
                ..Default::default()
            },
        )),
    }];
    parts.extend(
        bytes
            .chunks(CHUNK_BYTES)
            .map(|c| insights_pb::UploadAssessmentRequest {
                part: Some(insights_pb::upload_assessment_request::Part::Chunk(
                    c.to_vec(),
                )),
            }),
    );
    let done = state
        .services
        .insights()
        .upload_assessment(signed.ask(tokio_stream::iter(parts)))
        .await
        .map(tonic::Response::into_inner);
    Ok(after_change(&state, &signed, "upload", &back, done, |r| {
        format!(
            "Uploaded {} bytes: readiness score {}.",
            r.bytes_received,
            r.report.map(|r| r.readiness_score).unwrap_or_default()
        )
    }))
}
