//! Page analytics, as Viewtracker's Global Report: views and unique viewers with their change
//! against the previous period, views by day, by channel, top spaces → top pages → one page, over a
//! date range; the unique-viewer error stated where a sketch estimated it.

use askama::Template;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::get;
use serde::Deserialize;
use sightline_proto::collector::v1 as collector_pb;
use sightline_runtime::time::DAY_MS;

use crate::chart::{self, Point};
use crate::format::{change, name, number};
use crate::pages::Days;
use crate::web::{AppRef, Chrome, PageError, Signed, render};

pub(crate) fn routes() -> Router<AppRef> {
    Router::new()
        .route("/orgs/{org}/pages", get(global))
        .route("/orgs/{org}/pages/space", get(space))
        .route("/orgs/{org}/pages/page", get(page))
}

/// Rows of a top list per page ("Next page" for more): each row of the global report merges its
/// space's day sketches, so a long first page costs every reader (BENCHMARKS.md).
const TOP: u32 = 10;

#[derive(Debug, Deserialize)]
pub(crate) struct ReportQuery {
    from: Option<String>,
    to: Option<String>,
    instance: Option<String>,
    space: Option<String>,
    page: Option<String>,
    after: Option<String>,
}

/// A row of a top list: what, where it links, views, unique viewers.
pub(crate) struct TopRow {
    pub label: String,
    pub href: String,
    pub views: u64,
    pub unique: u64,
}

#[derive(Template)]
#[template(path = "reports.html")]
struct ReportPage {
    chrome: Chrome,
    /// What the report covers, e.g. "all pages" or "page 98304".
    scope: String,
    /// Hidden fields the range filter keeps (name, value).
    keep: Vec<(&'static str, String)>,
    days: Days,
    views: u64,
    unique: u64,
    views_change: String,
    unique_change: String,
    error_note: String,
    day_svg: String,
    any_views: bool,
    by_day: Vec<(String, u64, u64)>,
    by_channel: Vec<(String, u64)>,
    top_title: &'static str,
    top: Vec<TopRow>,
    next: String,
}

struct Stats {
    views: u64,
    unique: u64,
    error: f64,
    by_day: Vec<(String, u64, u64)>,
    by_channel: Vec<(String, u64)>,
}

fn stats(s: Option<collector_pb::ViewStats>) -> Stats {
    let s = s.unwrap_or_default();
    Stats {
        views: s.views,
        unique: s.unique_viewers,
        error: s.unique_viewers_error,
        by_day: s
            .by_day
            .iter()
            .map(|d| (d.day.clone(), d.views, d.unique_viewers))
            .collect(),
        by_channel: s
            .by_channel
            .iter()
            .map(|c| (name(c.channel().as_str_name(), "CHANNEL_"), c.views))
            .collect(),
    }
}

fn days_of(state: &AppRef, q: &ReportQuery) -> Result<Days, PageError> {
    let today = state.clock.now_ms().div_euclid(DAY_MS);
    Days::from_query(q.from.as_deref(), q.to.as_deref(), today, 30).map_err(PageError::BadRequest)
}

/// The query string that keeps the range when following a link.
fn range_query(days: Days) -> String {
    format!("from={}&to={}", days.first_text(), days.last_text())
}

/// A query value as a link carries it (percent-encoded).
fn enc(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[allow(clippy::too_many_arguments)]
fn report(
    chrome: Chrome,
    scope: String,
    keep: Vec<(&'static str, String)>,
    days: Days,
    now: Stats,
    before: &Stats,
    top_title: &'static str,
    top: Vec<TopRow>,
    next: String,
) -> Response {
    let error_note = if now.error > 0.0 {
        format!(
            "Unique viewers over several days are estimated with a sketch: relative standard error {}%.",
            number(now.error * 100.0, 2)
        )
    } else {
        String::new()
    };
    // Every day of the range, a day without views as zero.
    let by_day: Vec<(String, u64, u64)> = (days.from..=days.to)
        .map(sightline_runtime::time::day_text)
        .map(|day| {
            let found = now.by_day.iter().find(|(d, _, _)| *d == day);
            let (views, unique) = found.map_or((0, 0), |(_, v, u)| (*v, *u));
            (day, views, unique)
        })
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let points: Vec<Point> = by_day
        .iter()
        .map(|(day, views, _)| Point {
            label: day.clone(),
            value: *views as f64,
        })
        .collect();
    render(&ReportPage {
        chrome,
        scope,
        keep,
        days,
        views: now.views,
        unique: now.unique,
        views_change: change(now.views, before.views),
        unique_change: change(now.unique, before.unique),
        error_note,
        day_svg: chart::bars("Views by day", "views", &points),
        any_views: now.views > 0,
        by_day,
        by_channel: now.by_channel,
        top_title,
        top,
        next,
    })
}

async fn global(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, PageError> {
    let days = days_of(&state, &q)?;
    let instance_id = q.instance.clone().unwrap_or_default();
    let mut collector = state.services.collector();
    let ask = |days: Days, page_token: String| {
        signed.ask(collector_pb::GetGlobalReportRequest {
            org_id: org_id.clone(),
            range: Some(days.range()),
            reader_groups: vec![],
            instance_id: instance_id.clone(),
            page_size: TOP,
            page_token,
        })
    };
    // The period and the one before, asked at once.
    let mut earlier = collector.clone();
    let (now, before) = futures::join!(
        collector.get_global_report(ask(days, q.after.clone().unwrap_or_default())),
        earlier.get_global_report(ask(days.previous(), String::new())),
    );
    let (now, before) = (now?.into_inner(), before?.into_inner());
    let range = range_query(days);
    let top = now
        .top_spaces
        .iter()
        .map(|s| TopRow {
            label: format!("space {} on {}", s.space_id, s.instance_id),
            href: format!(
                "/orgs/{org_id}/pages/space?instance={}&space={}&{range}",
                enc(&s.instance_id),
                enc(&s.space_id)
            ),
            views: s.views,
            unique: s.unique_viewers,
        })
        .collect();
    let mut keep = Vec::new();
    if !instance_id.is_empty() {
        keep.push(("instance", instance_id.clone()));
    }
    Ok(report(
        Chrome::new(&state, &signed, &org_id, "pages", "Page analytics"),
        if instance_id.is_empty() {
            "every instance".to_owned()
        } else {
            format!("instance {instance_id}")
        },
        keep,
        days,
        stats(now.stats),
        &stats(before.stats),
        "Top spaces",
        top,
        now.next_page_token,
    ))
}

fn required<'a>(field: &'static str, value: Option<&'a String>) -> Result<&'a str, PageError> {
    value
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| PageError::BadRequest(format!("{field}: is required")))
}

async fn space(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, PageError> {
    let days = days_of(&state, &q)?;
    let instance_id = required("instance", q.instance.as_ref())?.to_owned();
    let space_id = required("space", q.space.as_ref())?.to_owned();
    let mut collector = state.services.collector();
    let ask = |days: Days, page_token: String| {
        signed.ask(collector_pb::GetSpaceReportRequest {
            org_id: org_id.clone(),
            space_id: space_id.clone(),
            range: Some(days.range()),
            instance_id: instance_id.clone(),
            page_size: TOP,
            page_token,
        })
    };
    let mut earlier = collector.clone();
    let (now, before) = futures::join!(
        collector.get_space_report(ask(days, q.after.clone().unwrap_or_default())),
        earlier.get_space_report(ask(days.previous(), String::new())),
    );
    let (now, before) = (now?.into_inner(), before?.into_inner());
    let range = range_query(days);
    let top = now
        .top_pages
        .iter()
        .map(|p| TopRow {
            label: format!("page {}", p.page_id),
            href: format!(
                "/orgs/{org_id}/pages/page?instance={}&page={}&{range}",
                enc(&instance_id),
                enc(&p.page_id)
            ),
            views: p.views,
            unique: p.unique_viewers,
        })
        .collect();
    Ok(report(
        Chrome::new(&state, &signed, &org_id, "pages", "Page analytics: space"),
        format!("space {space_id} on instance {instance_id}"),
        vec![
            ("instance", instance_id.clone()),
            ("space", space_id.clone()),
        ],
        days,
        stats(now.stats),
        &stats(before.stats),
        "Top pages",
        top,
        now.next_page_token,
    ))
}

async fn page(
    State(state): State<AppRef>,
    signed: Signed,
    Path(org_id): Path<String>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, PageError> {
    let days = days_of(&state, &q)?;
    let instance_id = required("instance", q.instance.as_ref())?.to_owned();
    let page_id = required("page", q.page.as_ref())?.to_owned();
    let mut collector = state.services.collector();
    let ask = |days: Days| {
        signed.ask(collector_pb::GetPageReportRequest {
            org_id: org_id.clone(),
            page_id: page_id.clone(),
            range: Some(days.range()),
            instance_id: instance_id.clone(),
        })
    };
    let mut earlier = collector.clone();
    let (now, before) = futures::join!(
        collector.get_page_report(ask(days)),
        earlier.get_page_report(ask(days.previous())),
    );
    let (now, before) = (now?.into_inner(), before?.into_inner());
    Ok(report(
        Chrome::new(&state, &signed, &org_id, "pages", "Page analytics: page"),
        format!("page {page_id} on instance {instance_id}"),
        vec![("instance", instance_id.clone()), ("page", page_id.clone())],
        days,
        stats(now.stats),
        &stats(before.stats),
        "",
        Vec::new(),
        String::new(),
    ))
}
