//! Samples and hourly rollups: the aggregates the reports and the contribution read, and the
//! privacy budget they charge.

use super::*;

pub(super) async fn samples(
    store: &SqlStore,
    instance_id: &str,
    name: &str,
    from: i64,
    to: i64,
    after: Option<(i64, String)>,
    limit: i64,
) -> StoreResult<Vec<Sample>> {
    let (at, id) = after.unwrap_or((i64::MIN, String::new()));
    let rows: Vec<(i64, String, i64, Vec<u8>)> = sql::query(sqlx::AssertSqlSafe(format!(
        "SELECT occurred_at, event_id, consent_version, body FROM events
             WHERE instance_id = $1 AND kind = {KIND_METRIC} AND name = $2 AND occurred_at >= $3
             AND occurred_at < $4
               AND (occurred_at > $5 OR (occurred_at = $5 AND event_id > $6)) AND body IS NOT NULL
             ORDER BY occurred_at, event_id LIMIT $7"
    )))
    .bind(instance_id)
    .bind(name)
    .bind(from)
    .bind(to)
    .bind(at)
    .bind(id)
    .bind(limit)
    .fetch_all(&store.db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(occurred_at, event_id, consent_version, body)| Sample {
            occurred_at,
            event_id,
            consent_version,
            body,
        })
        .collect())
}

pub(super) async fn rollups(
    store: &SqlStore,
    instance_id: &str,
    name: &str,
    from: i64,
    to: i64,
    after: Option<(i64, String)>,
    limit: i64,
) -> StoreResult<Vec<Rollup>> {
    let (at, tags) = after.unwrap_or((i64::MIN, String::new()));
    Ok(sql::query(
        "SELECT instance_id, name, tags, hour, org_id, unit, count, min, max, sum, p50, p95,
                consent_version, policy_revision
             FROM rollups WHERE instance_id = $1 AND name = $2 AND hour >= $3 AND hour < $4
               AND (hour > $5 OR (hour = $5 AND tags > $6))
             ORDER BY hour, tags LIMIT $7",
    )
    .bind(instance_id)
    .bind(name)
    .bind(from)
    .bind(to)
    .bind(at)
    .bind(tags)
    .bind(limit)
    .fetch_all(&store.db)
    .await?)
}

pub(super) async fn take_dirty_hours(
    store: &SqlStore,
    before: i64,
    limit: i64,
    skip: &[String],
) -> StoreResult<Vec<(String, String, i64)>> {
    let skipped = if skip.is_empty() {
        String::new()
    } else {
        format!(" AND org_id NOT IN {}", placeholders(3, skip.len()))
    };
    // Taken before the samples are read (a sample stored meanwhile marks the hour again), and
    // taken in one statement: of passes on several replicas, each hour goes to the one whose
    // DELETE removed it, so it is rolled up once.
    let mut query = sql::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM rollup_dirty WHERE (instance_id, hour) IN (SELECT instance_id, hour FROM
                rollup_dirty WHERE hour < $1{skipped} ORDER BY hour LIMIT $2)
             RETURNING org_id, instance_id, hour"
    )))
    .bind(before)
    .bind(limit);
    for org_id in skip {
        query = query.bind(org_id);
    }
    let mut rows: Vec<(String, String, i64)> = query.fetch_all(&store.db).await?;
    rows.sort_by_key(|(_, _, hour)| *hour);
    Ok(rows)
}

pub(super) async fn hour_samples(
    store: &SqlStore,
    instance_id: &str,
    hour: i64,
) -> StoreResult<Vec<(Vec<u8>, i64, i64)>> {
    Ok(sql::query(sqlx::AssertSqlSafe(format!(
        "SELECT body, consent_version, policy_revision FROM events
             WHERE instance_id = $1 AND kind = {KIND_METRIC} AND occurred_at >= $2 AND occurred_at
             < $3 AND body IS NOT NULL"
    )))
    .bind(instance_id)
    .bind(hour)
    .bind(hour + HOUR_MS)
    .fetch_all(&store.db)
    .await?)
}

pub(super) async fn replace_rollups(
    store: &SqlStore,
    org_id: &str,
    instance_id: &str,
    hour: i64,
    rollups: &[Rollup],
) -> StoreResult<()> {
    let mut tx = store.db.begin().await?;
    // Under the org's lock, so a move or purge that took the samples away meanwhile is
    // seen: then the hour has nothing to roll up here.
    SqlStore::lock_org(&mut tx, org_id, false).await?;
    let samples: Option<(String,)> = sql::query(sqlx::AssertSqlSafe(format!(
        "SELECT event_id FROM events WHERE instance_id = $1 AND kind = {KIND_METRIC} AND
                occurred_at >= $2 AND occurred_at < $3 LIMIT 1"
    )))
    .bind(instance_id)
    .bind(hour)
    .bind(hour + HOUR_MS)
    .fetch_optional(&mut tx)
    .await?;
    if samples.is_none() && !rollups.is_empty() {
        return Ok(());
    }
    sql::query("DELETE FROM rollups WHERE instance_id = $1 AND hour = $2")
        .bind(instance_id)
        .bind(hour)
        .execute(&mut tx)
        .await?;
    for r in rollups {
        sql::query(
            "INSERT INTO rollups (instance_id, name, tags, hour, org_id, location, unit,
                    count, min, max, sum, p50, p95, consent_version, policy_revision)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&r.instance_id)
        .bind(&r.name)
        .bind(&r.tags)
        .bind(r.hour)
        .bind(&r.org_id)
        .bind(&store.location)
        .bind(&r.unit)
        .bind(r.count)
        .bind(r.min)
        .bind(r.max)
        .bind(r.sum)
        .bind(r.p50)
        .bind(r.p95)
        .bind(r.consent_version)
        .bind(r.policy_revision)
        .execute(&mut tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn org_rollups(
    store: &SqlStore,
    org_id: &str,
    name: &str,
    from: i64,
    to: i64,
) -> StoreResult<Vec<(String, i64, i64, f64)>> {
    Ok(sql::query(
        "SELECT instance_id, hour, count, sum FROM rollups WHERE org_id = $1 AND name = $2 AND
                hour >= $3 AND hour < $4",
    )
    .bind(org_id)
    .bind(name)
    .bind(from)
    .bind(to)
    .fetch_all(&store.db)
    .await?)
}

pub(super) async fn charge_epsilon(
    store: &SqlStore,
    org_ids: &[String],
    epsilon: f64,
    budget: f64,
    now: i64,
) -> StoreResult<Vec<String>> {
    let mut tx = store.db.begin().await?;
    // One charger at a time (SQLite's write lock does it there).
    SqlStore::lock_org(&mut tx, "epsilon-ledger", true).await?;
    let mut short = Vec::new();
    for org in org_ids {
        let spent: Option<(f64,)> =
            sql::query("SELECT spent FROM epsilon_ledger WHERE org_id = $1")
                .bind(org)
                .fetch_optional(&mut tx)
                .await?;
        if spent.map_or(0.0, |(s,)| s) + epsilon > budget + 1e-9 {
            short.push(org.clone());
        }
    }
    if !short.is_empty() {
        return Ok(short);
    }
    for org in org_ids {
        sql::query(
            "INSERT INTO epsilon_ledger (org_id, spent, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (org_id) DO UPDATE SET spent = epsilon_ledger.spent + excluded.spent,
                 updated_at = excluded.updated_at",
        )
        .bind(org)
        .bind(epsilon)
        .bind(now)
        .execute(&mut tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Vec::new())
}
