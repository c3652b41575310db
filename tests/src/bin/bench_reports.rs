//! Page-view report latency over a large store (SPEC E5's speed goal): fills one org's SQLite store
//! with `--views` page views (default 10 million) spread over 90 days — written straight into the
//! tables, each in key order, exactly as the store's commit would write them (`--check` proves
//! that on a small run: commit and bulk load give the same store) — then starts the real
//! collector-svc on that store and measures page, space and global reports over real gRPC, one call
//! at a time.
//!
//! The org: one instance, `--spaces` spaces of `--pages-per-space` pages, `--viewers` viewers
//! (pseudonyms as the collector stores them); page popularity is skewed (u², so the first pages
//! take the most views), viewers uniform, 85 % desktop and 15 % mobile web.
//!
//! Then the web console on the same stack: every page an admin or the operator opens, over HTTP,
//! one request at a time (server time per page: loopback, a new connection each).
//!
//! cargo run --release -p sightline-tests --bin bench_reports -- [--views 10000000] [--calls 200]

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use collector_svc::store::{Batch, BatchOutcome, CollectorStore, MOVED_TABLES, Row, Value, View};
use prost::Message;
use sightline_proto::collector::v1 as pb;
use sightline_proto::common::v1::{self as common, Channel, SharingLevel, UsageLevel};
use sightline_proto::consent::v1 as consent_pb;
use sightline_runtime::settings::Limits;
use sightline_tests::bench::{arg, flag, percentile};
use sightline_tests::consent::{opt_in, policy, track};
use sightline_tests::{
    CollectorOptions, LinkerOptions, T0_MS, TestCollector, TestConsent, TestLinker, authed,
};

const DAY: i64 = 86_400_000;
const DAYS: i64 = 90;

/// A small, fast, seeded generator (xorshift64*), so every run stores the same views.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Who the views are of.
struct Shape {
    org_id: String,
    instance_id: String,
    consent_version: i64,
    revision: i64,
    pages: u64,
    spaces: u64,
    viewers: u64,
}

/// One page view: (time, page, viewer, channel), with ids in time order.
type PageView = (i64, u32, u32, u8);

const BLOCKING_MS: i64 = 30 * 60_000;

fn page_id(page: u32) -> String {
    format!("page-{page:05}")
}

fn space_id(shape: &Shape, page: u32) -> String {
    format!("space-{:03}", u64::from(page) % shape.spaces)
}

fn viewer_id(viewer: u32) -> String {
    format!("psn1_{viewer:016x}")
}

fn event_id(n: usize) -> String {
    format!("v{n:09}")
}

fn channel_of(c: u8) -> Channel {
    if c == 0 {
        Channel::Desktop
    } else {
        Channel::MobileWeb
    }
}

/// `count` views over the 90 days before T0, in time order. Skewed popularity (u² puts more views
/// on the first pages), uniform viewers, 85 % desktop.
fn make_views(count: u64, shape: &Shape, rng: &mut Rng) -> Vec<PageView> {
    let start = T0_MS - DAYS * DAY;
    let mut views: Vec<PageView> = (0..count)
        .map(|_| {
            let at = start + rng.below((DAYS * DAY) as u64) as i64;
            let page = (rng.unit().powi(2) * shape.pages as f64) as u32;
            let viewer = rng.below(shape.viewers) as u32;
            let channel = u8::from(rng.below(100) >= 85);
            (at, page, viewer, channel)
        })
        .collect();
    views.sort_unstable();
    views
}

fn body(n: usize, shape: &Shape, view: &PageView) -> Vec<u8> {
    let (at, page, viewer, channel) = *view;
    pb::Event {
        event_id: event_id(n),
        occurred_at: Some(sightline_runtime::time::to_proto(at)),
        payload: Some(pb::event::Payload::PageView(pb::PageViewEvent {
            page_id: page_id(page),
            space_id: space_id(shape, page),
            channel: channel_of(channel) as i32,
            viewer_id: viewer_id(viewer),
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

/// Stores the views through the store's own commit, 1000 per batch (the path Ingest takes).
async fn commit_all(
    store: &dyn collector_svc::store::CollectorStore,
    shape: &Shape,
    views: &[PageView],
) {
    let revision = shape.revision as u64;
    let current = move |_: &str, _: &str| Some(revision);
    for (c, chunk) in views.chunks(1000).enumerate() {
        let rows = chunk
            .iter()
            .enumerate()
            .map(|(i, view)| {
                let n = c * 1000 + i;
                let (at, page, viewer, channel) = *view;
                Row {
                    event_id: event_id(n),
                    kind: common::EventKind::PageView as i64,
                    occurred_at: at,
                    name: page_id(page),
                    value: Some(1.0),
                    subject: Some(viewer_id(viewer)),
                    body: body(n, shape, view),
                    view: Some(View {
                        page_id: page_id(page),
                        space_id: space_id(shape, page),
                        channel: channel_of(channel) as i64,
                        viewer: Some(viewer_id(viewer)),
                    }),
                }
            })
            .collect();
        let batch = Batch {
            org_id: shape.org_id.clone(),
            instance_id: shape.instance_id.clone(),
            location: "global".into(),
            consent_version: shape.consent_version,
            policy_revision: shape.revision,
            stored_at: T0_MS,
            blocking_time_ms: BLOCKING_MS,
            rows,
        };
        match store.commit(&[batch], &current).await.unwrap().remove(0) {
            BatchOutcome::Committed(_) => {}
            BatchOutcome::Stale => panic!("stale"),
        }
    }
}

/// Writes what commit would write for `views` straight into the tables, each in key order, with
/// the secondary indexes dropped during the load and built after it (a load of 10 million views
/// through commit takes hours on this machine: every view touches a dozen B-trees at random).
/// Returns the views counted (those outside the blocking time).
async fn bulk_load(
    store: &dyn CollectorStore,
    url: &str,
    shape: &Shape,
    views: &[PageView],
) -> u64 {
    use sqlx::Connection;
    let mut db = sqlx::SqliteConnection::connect(url).await.unwrap();
    sqlx::query("PRAGMA synchronous = OFF")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("PRAGMA cache_size = -262144")
        .execute(&mut db)
        .await
        .unwrap();
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL
           AND tbl_name IN ('events', 'page_view_days', 'page_viewers', 'view_times')",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    for (name, _) in &indexes {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX {name}")))
            .execute(&mut db)
            .await
            .unwrap();
    }

    // Blocking time per (page, viewer), in time order: a view counts when the last counted one is
    // at least the blocking time before it.
    let mut order: Vec<usize> = (0..views.len()).collect();
    order.sort_unstable_by_key(|&i| (views[i].1, views[i].2, views[i].0));
    let mut counted = vec![false; views.len()];
    let mut memory: Vec<(u32, u32, i64)> = Vec::new();
    let mut last: Option<(u32, u32, i64)> = None;
    for &i in &order {
        let (at, page, viewer, _) = views[i];
        let counts = match last {
            Some((p, v, t)) if p == page && v == viewer => t <= at - BLOCKING_MS,
            _ => true,
        };
        if counts {
            counted[i] = true;
            last = Some((page, viewer, at));
            match memory.last_mut() {
                Some(m) if m.0 == page && m.1 == viewer => m.2 = at,
                _ => memory.push((page, viewer, at)),
            }
        }
    }
    drop(order);
    let stored = counted.iter().filter(|c| **c).count() as u64;

    let (org, instance) = (shape.org_id.as_str(), shape.instance_id.as_str());
    let (cv, rev) = (shape.consent_version, shape.revision);
    // events, in (instance, event_id) order = time order.
    let mut rows = Vec::new();
    for (n, view) in views.iter().enumerate() {
        if !counted[n] {
            continue;
        }
        let (at, page, viewer, _) = *view;
        rows.push(vec![
            Value::Text(Some(instance.into())),
            Value::Text(Some(event_id(n))),
            Value::Text(Some(org.into())),
            Value::Text(Some("global".into())),
            Value::Int(Some(common::EventKind::PageView as i64)),
            Value::Int(Some(at)),
            Value::Int(Some(T0_MS)),
            Value::Text(Some(page_id(page))),
            Value::Real(Some(1.0)),
            Value::Text(Some(viewer_id(viewer))),
            Value::Int(Some(cv)),
            Value::Int(Some(rev)),
            Value::Blob(Some(body(n, shape, view))),
        ]);
        if rows.len() == 100_000 {
            insert(store, "events", &rows).await;
            rows.clear();
        }
    }
    insert(store, "events", &rows).await;

    // page_view_days: (page, day, channel) counts.
    let mut cells: Vec<(u32, i64, u8)> = views
        .iter()
        .zip(&counted)
        .filter(|(_, c)| **c)
        .map(|(v, _)| (v.1, v.0.div_euclid(DAY), v.3))
        .collect();
    cells.sort_unstable();
    let mut rows = Vec::new();
    for group in cells.chunk_by(|a, b| a == b) {
        let (page, day, channel) = group[0];
        rows.push(vec![
            Value::Text(Some(instance.into())),
            Value::Text(Some(page_id(page))),
            Value::Int(Some(day)),
            Value::Int(Some(channel_of(channel) as i64)),
            Value::Int(Some(cv)),
            Value::Int(Some(rev)),
            Value::Text(Some(org.into())),
            Value::Text(Some(space_id(shape, page))),
            Value::Int(Some(group.len() as i64)),
        ]);
    }
    insert(store, "page_view_days", &rows).await;
    drop(cells);

    // page_viewers: distinct (page, day, viewer), stored_at as commit writes it.
    let mut seen: Vec<(u32, i64, u32)> = views
        .iter()
        .zip(&counted)
        .filter(|(_, c)| **c)
        .map(|(v, _)| (v.1, v.0.div_euclid(DAY), v.2))
        .collect();
    seen.sort_unstable();
    seen.dedup();
    let mut rows = Vec::new();
    for (page, day, viewer) in seen {
        rows.push(vec![
            Value::Text(Some(instance.into())),
            Value::Text(Some(page_id(page))),
            Value::Int(Some(day)),
            Value::Text(Some(viewer_id(viewer))),
            Value::Text(Some(org.into())),
            Value::Text(Some(space_id(shape, page))),
            Value::Int(Some(cv)),
            Value::Int(Some(rev)),
            Value::Int(Some(T0_MS)),
        ]);
        if rows.len() == 100_000 {
            insert(store, "page_viewers", &rows).await;
            rows.clear();
        }
    }
    insert(store, "page_viewers", &rows).await;

    // view_times: the counter's memory, here the last counted view per (page, viewer).
    let mut rows = Vec::new();
    for (page, viewer, at) in memory {
        rows.push(vec![
            Value::Text(Some(instance.into())),
            Value::Text(Some(page_id(page))),
            Value::Text(Some(viewer_id(viewer))),
            Value::Int(Some(at)),
            Value::Text(Some(String::new())),
            Value::Text(Some(org.into())),
            Value::Int(Some(T0_MS)),
            Value::Int(Some(1)),
            Value::Int(Some(0)),
            Value::Text(Some(space_id(shape, page))),
            Value::Int(Some(cv)),
            Value::Int(Some(rev)),
        ]);
        if rows.len() == 100_000 {
            insert(store, "view_times", &rows).await;
            rows.clear();
        }
    }
    insert(store, "view_times", &rows).await;

    // Every day changed: the collector's maintenance makes the day totals (as it does after ingest).
    let days: std::collections::BTreeSet<i64> = views.iter().map(|v| v.0.div_euclid(DAY)).collect();
    let rows: Vec<Vec<Value>> = days
        .into_iter()
        .map(|day| {
            vec![
                Value::Text(Some(instance.into())),
                Value::Int(Some(day)),
                Value::Text(Some(org.into())),
                Value::Int(Some(0)),
            ]
        })
        .collect();
    insert(store, "view_days_dirty", &rows).await;

    for (_, sql) in &indexes {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut db)
            .await
            .unwrap();
    }
    sqlx::query("ANALYZE").execute(&mut db).await.unwrap();
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    stored
}

/// Inserts rows of one table (in its key order) with the store's own import, one transaction.
async fn insert(store: &dyn CollectorStore, table: &str, rows: &[Vec<Value>]) {
    if rows.is_empty() {
        return;
    }
    let table = MOVED_TABLES.iter().find(|t| t.name == table).unwrap();
    store.import_rows(table, rows).await.unwrap();
}

fn range(days: i64) -> Option<common::TimeRange> {
    Some(common::TimeRange {
        start: Some(sightline_runtime::time::to_proto(T0_MS - days * DAY)),
        end: Some(sightline_runtime::time::to_proto(T0_MS)),
    })
}

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{name:<28} calls {:>4}  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or_default()
    );
}

const USAGE: &str = "usage: bench_reports [--views N] [--calls N] [--spaces N] [--pages-per-space N] [--viewers N] [--check] [--no-console]
  Fills one org's store with --views page views (default 10000000) and times page, space and
  global reports over gRPC (--calls each, default 200), then every console page over HTTP
  (--no-console skips it). --check: prove on a small run that the bulk load and the store's own
  commit give the same store.";

/// One HTTP/1.1 request on a new connection: (status, the whole answer).
async fn http(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let answer = sightline_tests::http(addr, request).await;
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    (status, answer)
}

/// Signs in with `token`; the session cookie.
async fn sign_in(addr: std::net::SocketAddr, token: &str) -> String {
    let (status, answer) = http(
        addr,
        &sightline_tests::form_post("/signin", &format!("token={token}")),
    )
    .await;
    assert_eq!(status, 303, "{answer}");
    let cookie = answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

/// Times every console page, `calls` times each, one request at a time.
async fn console_pages(
    linker: &TestLinker,
    consent: &TestConsent,
    collector: &TestCollector,
    org: &sightline_tests::TestOrg,
    instance_id: &str,
    calls: usize,
) {
    let insights = sightline_tests::TestInsights::start(
        linker,
        consent,
        collector,
        sightline_tests::InsightsOptions::default(),
    )
    .await;
    let console = sightline_console::Console::build(sightline_console::ConsoleConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        linker_url: format!("http://{}", linker.addr),
        consent_url: format!("http://{}", consent.addr),
        collector_url: format!("http://{}", collector.addr),
        insights_url: format!("http://{}", insights.addr),
        tls: None,
        limits: Limits::default(),
        service_token: linker.service.clone(),
        session_idle_ms: 3_600_000,
        max_sessions: 100,
        header_timeout_ms: 10_000,
        clock: linker.clock.clone(),
    })
    .await
    .unwrap();
    let addr = console.local_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(console.run_until_stopped(stop.clone()));
    let admin = sign_in(addr, &org.admin).await;
    let operator = sign_in(addr, linker.operator.expose()).await;
    let o = &org.id;
    let day = |ms: i64| sightline_runtime::time::day_text(ms.div_euclid(DAY));
    let (from90, to) = (day(T0_MS - DAYS * DAY), day(T0_MS - 1));
    let pages: Vec<(&str, String, &String)> = vec![
        ("usage data sharing", format!("/orgs/{o}/consent"), &admin),
        ("sample data", format!("/orgs/{o}/sample"), &admin),
        ("instances", format!("/orgs/{o}/instances"), &admin),
        (
            "instance health",
            format!("/orgs/{o}/instances/{instance_id}?metric=jvm.cpu.load"),
            &admin,
        ),
        (
            "page analytics, 30 days",
            format!("/orgs/{o}/pages"),
            &admin,
        ),
        (
            "page analytics, 90 days",
            format!("/orgs/{o}/pages?from={from90}&to={to}"),
            &admin,
        ),
        (
            "space, 90 days",
            format!(
                "/orgs/{o}/pages/space?instance={instance_id}&space=space-000&from={from90}&to={to}"
            ),
            &admin,
        ),
        (
            "page, 90 days",
            format!(
                "/orgs/{o}/pages/page?instance={instance_id}&page=page-00000&from={from90}&to={to}"
            ),
            &admin,
        ),
        ("settings", format!("/orgs/{o}/settings"), &admin),
        ("audit log", format!("/orgs/{o}/audit"), &admin),
        ("operator: orgs", "/operator".to_owned(), &operator),
        ("operator: org", format!("/operator/orgs/{o}"), &operator),
        (
            "operator: services",
            "/operator/services".to_owned(),
            &operator,
        ),
    ];
    println!("console pages (server time per page, {calls} requests each):");
    for (name, path, cookie) in pages {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: {cookie}\r\n\r\n"
        );
        // One request first, unmeasured: the page must render.
        let (status, answer) = http(addr, &request).await;
        assert_eq!(status, 200, "{name}: {}", &answer[..answer.len().min(600)]);
        let mut ms = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            let (status, _) = http(addr, &request).await;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(status, 200, "{name}");
        }
        summary(&format!("  {name}"), ms);
    }
    stop.cancel();
}

#[tokio::main]
async fn main() {
    sightline_tests::bench::command_line(
        USAGE,
        &[
            ("--views", true),
            ("--calls", true),
            ("--spaces", true),
            ("--pages-per-space", true),
            ("--viewers", true),
            ("--check", false),
            ("--no-console", false),
        ],
    );
    let views = arg("--views", 10_000_000);
    let calls = arg("--calls", 200) as usize;
    let spaces = arg("--spaces", 200);
    let pages_per_space = arg("--pages-per-space", 100);
    let viewers = arg("--viewers", 10_000);
    let pages = spaces * pages_per_space;

    let linker = TestLinker::start(LinkerOptions {
        quiet: true,
        ..Default::default()
    })
    .await;
    let consent = TestConsent::start(&linker, None, Limits::default()).await;
    let org = linker.org("Acme").await;
    let instance = linker.link_instance(&org, "SRV-A").await;
    opt_in(&consent, &org, UsageLevel::Advanced, SharingLevel::Extended).await;
    track(
        &consent,
        &org,
        consent_pb::TrackingSettings {
            enabled_channels: vec![Channel::Desktop as i32, Channel::MobileWeb as i32],
            blocking_time_ms: 30 * 60_000,
            ..Default::default()
        },
    )
    .await;
    let current = policy(&consent, &org, &instance.id).await;

    // Fill the org's store (the global location's SQLite file in the data directory).
    let url = sightline_runtime::storage::default_sqlite_url(linker.data_dir(), "collector-global");
    let store = collector_svc::store::open(&url, "global").await.unwrap();
    let shape = Shape {
        org_id: org.id.clone(),
        instance_id: instance.id.clone(),
        consent_version: current.consent_version as i64,
        revision: current.revision as i64,
        pages,
        spaces,
        viewers,
    };
    let views_made = make_views(views, &shape, &mut Rng(0x5eed_1234_abcd_0001));
    if flag("--check") {
        // The bulk load writes what the store's own commit writes: compare on a second store.
        let check_url =
            sightline_runtime::storage::default_sqlite_url(linker.data_dir(), "collector-check");
        let check = collector_svc::store::open(&check_url, "global")
            .await
            .unwrap();
        commit_all(check.as_ref(), &shape, &views_made).await;
        bulk_load(store.as_ref(), &url, &shape, &views_made).await;
        let org_scope = collector_svc::store::ViewScope::Org {
            org_id: org.id.clone(),
            instance_id: None,
        };
        let (a, b) = (
            store
                .view_totals(&org_scope, 0, i64::MAX / DAY)
                .await
                .unwrap(),
            check
                .view_totals(&org_scope, 0, i64::MAX / DAY)
                .await
                .unwrap(),
        );
        assert_eq!(a, b, "bulk load and commit disagree");
        assert_eq!(
            store.org_counts(&org.id).await.unwrap(),
            check.org_counts(&org.id).await.unwrap()
        );
        println!(
            "check: the bulk load stores what commit stores ({} views)",
            a.views
        );
        return;
    }
    let started = Instant::now();
    let stored = bulk_load(store.as_ref(), &url, &shape, &views_made).await;
    let fill_s = started.elapsed().as_secs_f64();
    drop(views_made);
    drop(store);
    let file_mb = std::fs::metadata(linker.data_dir().join("collector-global.db"))
        .map(|m| m.len() as f64 / 1e6)
        .unwrap_or_default();
    println!(
        "stored {stored} page views over {DAYS} days (bulk load, {fill_s:.0} s); \
         {pages} pages in {spaces} spaces, {viewers} viewers; store file {file_mb:.0} MB"
    );

    let collector = TestCollector::start(&linker, &consent, CollectorOptions::default()).await;
    let started = Instant::now();
    collector.maintenance.roll_up().await;
    println!(
        "day totals and sketches made for {DAYS} days in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut client = collector.client().await;
    let mut rng = Rng(0x0dd5_eed5_0000_0002);

    for days in [DAYS, 7] {
        let mut page_ms = Vec::with_capacity(calls);
        let mut space_ms = Vec::with_capacity(calls);
        let mut global_ms = Vec::with_capacity(calls);
        let mut checked = 0u64;
        for i in 0..calls {
            // Pages and spaces drawn as readers open them: popular ones more often.
            let page = ((rng.unit().powi(2)) * pages as f64) as u64;
            let t = Instant::now();
            let reply = client
                .get_page_report(authed(
                    &org.admin,
                    pb::GetPageReportRequest {
                        org_id: org.id.clone(),
                        page_id: format!("page-{page:05}"),
                        range: range(days),
                        instance_id: instance.id.clone(),
                    },
                ))
                .await
                .unwrap();
            page_ms.push(t.elapsed().as_secs_f64() * 1e3);
            checked += reply.into_inner().stats.map_or(0, |s| s.views);

            let t = Instant::now();
            client
                .get_space_report(authed(
                    &org.admin,
                    pb::GetSpaceReportRequest {
                        org_id: org.id.clone(),
                        space_id: format!("space-{:03}", page % spaces),
                        range: range(days),
                        instance_id: instance.id.clone(),
                        page_size: 10,
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
            space_ms.push(t.elapsed().as_secs_f64() * 1e3);

            if i < calls.min(50) {
                let t = Instant::now();
                let reply = client
                    .get_global_report(authed(
                        &org.admin,
                        pb::GetGlobalReportRequest {
                            org_id: org.id.clone(),
                            range: range(days),
                            page_size: 10,
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                global_ms.push(t.elapsed().as_secs_f64() * 1e3);
                if i == 0 {
                    let stats = reply.stats.unwrap_or_default();
                    println!(
                        "global report, {days} days: {} views, {} unique viewers (error {})",
                        stats.views, stats.unique_viewers, stats.unique_viewers_error
                    );
                }
            }
        }
        println!("{days}-day range (page views read back: {checked})");
        summary("  page report", page_ms);
        summary("  space report (top 10 pages)", space_ms);
        summary("  global report (top 10)", global_ms);
    }
    if !flag("--no-console") {
        console_pages(&linker, &consent, &collector, &org, &instance.id, calls).await;
    }
}
