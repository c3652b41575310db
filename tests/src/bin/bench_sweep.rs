//! Retention's sweep of expired events on PostgreSQL, before and after events were partitioned by
//! day: `--rows` expired metric events (spread over `--days` days and `--orgs` orgs, loaded by
//! parallel COPY before any clock starts) swept by the collector's store.
//!
//! - `rows`: every row in one table (the default partition, no day partitions: the table as it was
//!   before), so the sweep deletes rows, 5,000 per statement;
//! - `partitions`: each day in its own partition, made ahead as the collector makes them, so the
//!   sweep drops each expired day whole.
//!
//! Each run is on a fresh schema with the collector's migrations; the time is the whole sweep
//! (`drop_expired_days`, then `sweep` for each org, as the collector's retention pass runs them),
//! and the rows it reports removed must equal the rows loaded.
//!
//! cargo run --release -p sightline-tests --bin bench_sweep -- [--rows 10000000] [--days 10]
//!     [--orgs 4] [--sessions 4] [--mode rows|partitions|both]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Instant;

use sightline_runtime::testing::Backend;
use sightline_runtime::time::DAY_MS;
use sightline_tests::T0_MS;

const USAGE: &str = "usage: bench_sweep [--rows N] [--days D] [--orgs O] [--sessions S] \
[--mode rows|partitions|both]

Loads N expired metric events (D days, O orgs) into a fresh PostgreSQL store with the collector's
migrations, then times the collector's retention sweep of all of them: by row deletes from one
table (rows) and by dropping day partitions (partitions). Each run uses a fresh schema of the
database at SIGHTLINE_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test).";

const COLUMNS: &str = "instance_id, event_id, occurred_at, org_id, location, kind, stored_at, \
name, value, subject, consent_version, policy_revision, body";

struct Args {
    rows: u64,
    days: i64,
    orgs: u64,
    sessions: u64,
    modes: Vec<&'static str>,
}

fn args() -> Args {
    use sightline_tests::bench::{arg, command_line};
    command_line(
        USAGE,
        &[
            ("--rows", true),
            ("--days", true),
            ("--orgs", true),
            ("--sessions", true),
            ("--mode", true),
        ],
    );
    let mode = std::env::args().skip_while(|a| a != "--mode").nth(1);
    let modes = match mode.as_deref() {
        None | Some("both") => vec!["rows", "partitions"],
        Some("rows") => vec!["rows"],
        Some("partitions") => vec!["partitions"],
        Some(other) => {
            eprintln!("unknown mode {other:?}\n{USAGE}");
            std::process::exit(2);
        }
    };
    Args {
        rows: arg("--rows", 10_000_000),
        days: i64::try_from(arg("--days", 10).max(1)).unwrap_or(i64::MAX),
        orgs: arg("--orgs", 4).max(1),
        sessions: arg("--sessions", 4).max(1),
        modes,
    }
}

/// The first expired day: the rows' days end 40 days before T0, well past a 30-day retention.
fn first_day(args: &Args) -> i64 {
    T0_MS / DAY_MS - 40 - args.days
}

fn org(o: u64) -> String {
    format!("0190a000-0000-7000-8000-{o:012}")
}

/// One COPY session of the rows `i` with `i % sessions == session`, encoded as it goes (the load
/// is not what is measured).
async fn load_share(pool: sqlx::PgPool, args: &Args, session: u64, body: &str) {
    let mut conn = pool.acquire().await.unwrap();
    let mut copy = conn
        .copy_in_raw(&format!("COPY events ({COLUMNS}) FROM STDIN"))
        .await
        .unwrap();
    let first = first_day(args) * DAY_MS;
    let span = args.days * DAY_MS;
    let mut piece = Vec::with_capacity(1 << 20);
    let mut i = session;
    while i < args.rows {
        let o = i % args.orgs;
        // Spread evenly over the days, each row at its own millisecond.
        let at = first + i64::try_from(i).unwrap() * span / i64::try_from(args.rows).unwrap();
        let org = org(o);
        writeln!(
            piece,
            "{org}-i\te{i}\t{at}\t{org}\tglobal\t2\t{at}\tlatency\t{}\t\\N\t1\t1\t\\\\x{body}",
            i % 1000
        )
        .unwrap();
        if piece.len() >= 1 << 20 {
            copy.send(piece.as_slice()).await.unwrap();
            piece.clear();
        }
        i += args.sessions;
    }
    copy.send(piece.as_slice()).await.unwrap();
    copy.finish().await.unwrap();
}

/// A stored metric event's body, as the collector keeps it.
fn metric_body() -> Vec<u8> {
    use prost::Message as _;
    use sightline_proto::collector::v1 as pb;
    pb::Event {
        event_id: String::new(),
        occurred_at: None,
        payload: Some(pb::event::Payload::Metric(pb::MetricEvent {
            name: "latency".into(),
            value: 12.5,
            unit: "ms".into(),
            periodic_sample: true,
            tags: [("pluginKey".to_owned(), "com.example.search".to_owned())]
                .into_iter()
                .collect(),
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

async fn run(args: &Args, mode: &str) {
    let (url, _guard) = Backend::Postgres.fresh_url("bench_sweep").await.unwrap();
    let store = collector_svc::store::open(&url, "global").await.unwrap();
    let first = first_day(args);
    if mode == "partitions" {
        let made = store
            .prepare_days(first, first + args.days - 1)
            .await
            .unwrap();
        assert_eq!(i64::try_from(made).unwrap(), args.days);
    }
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let body = hex::encode(metric_body());
    let started = Instant::now();
    let loads: Vec<_> = (0..args.sessions)
        .map(|s| load_share(pool.clone(), args, s, &body))
        .collect();
    futures::future::join_all(loads).await;
    sqlx::query("ANALYZE events").execute(&pool).await.unwrap();
    let (bytes,): (i64,) = sqlx::query_as(
        "SELECT COALESCE(SUM(pg_total_relation_size(inhrelid)), 0)::bigint FROM pg_inherits
         WHERE inhparent = 'events'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    eprintln!(
        "{mode}: loaded {} rows ({} MiB with indexes) in {:.1} s",
        args.rows,
        bytes >> 20,
        started.elapsed().as_secs_f64()
    );

    // Every org's raw retention ends after the last loaded day: everything has expired.
    let raw_before = (first + args.days) * DAY_MS;
    let expiring: BTreeMap<String, i64> = (0..args.orgs).map(|o| (org(o), raw_before)).collect();
    let started = Instant::now();
    let dropped = store.drop_expired_days(&expiring).await.unwrap();
    let mut removed: i64 = dropped.values().sum();
    for org in expiring.keys() {
        removed += store
            .sweep(org, raw_before, raw_before, raw_before)
            .await
            .unwrap()
            .events;
    }
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(removed, i64::try_from(args.rows).unwrap(), "rows removed");
    let (left,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    println!(
        "{mode:<10} {removed:>11} rows removed in {seconds:>8.2} s ({:>12.0} rows/s; {} dropped whole)",
        removed as f64 / seconds,
        dropped.values().sum::<i64>()
    );
    pool.close().await;
}

#[tokio::main]
async fn main() {
    let args = args();
    println!(
        "sweep of {} expired events ({} days, {} orgs) on PostgreSQL",
        args.rows, args.days, args.orgs
    );
    for mode in args.modes.clone() {
        run(&args, mode).await;
    }
    sightline_tests::bench::drop_stores().await;
}
