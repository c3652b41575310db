//! Page views: the per-page day counters and viewers written with each batch, the day totals made
//! from them, and the reports read from both.

use super::*;

impl SqlStore {
    /// Counts one stored page view, unless the viewer saw the page inside the blocking time.
    /// Counts a page view that was just stored. With a viewer and a blocking time, the view
    /// counts when no counted view of the same viewer and page lies within the blocking time
    /// before it *in time order* (views at the same time ordered by event id), whatever order
    /// they arrive in: a view that arrives earlier than views already counted is placed in
    /// the chain, and the views after it are counted again — a view that turns out to lie
    /// inside the new view's window stops counting, one that no longer does starts — with
    /// the counters and the days' totals corrected. A view not counted keeps no event row;
    /// its time stays in `view_times` (the counter's memory) so later corrections can count
    /// it. The result is the same counts as the views sent in time order.
    pub(super) async fn count_view(
        tx: &mut Tx,
        batch: &Batch,
        row: &crate::store::Row,
        view: &crate::store::View,
    ) -> StoreResult<RowOutcome> {
        let (Some(viewer), true) = (&view.viewer, batch.blocking_time_ms > 0) else {
            Self::add_count(tx, &Counted::of(batch, row, view), 1).await?;
            return Ok(RowOutcome::Stored);
        };
        let block = batch.blocking_time_ms;
        let (t, event) = (row.occurred_at, row.event_id.as_str());
        sql::query(
            "INSERT INTO view_times (instance_id, page_id, viewer, at, event_id, org_id,
                stored_at, counted, channel, space_id, consent_version, policy_revision)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
        )
        .bind(&batch.instance_id)
        .bind(&view.page_id)
        .bind(viewer)
        .bind(t)
        .bind(event)
        .bind(&batch.org_id)
        .bind(batch.stored_at)
        .bind(view.channel)
        .bind(&view.space_id)
        .bind(batch.consent_version)
        .bind(batch.policy_revision)
        .execute(&mut *tx)
        .await?;
        // The counted view just before this one, in time order.
        let before: Option<(i64,)> = sql::query(
            "SELECT at FROM view_times WHERE instance_id = $1 AND page_id = $2 AND viewer = $3 AND
                counted = 1
               AND (at < $4 OR (at = $4 AND event_id < $5)) ORDER BY at DESC, event_id DESC LIMIT
               1",
        )
        .bind(&batch.instance_id)
        .bind(&view.page_id)
        .bind(viewer)
        .bind(t)
        .bind(event)
        .fetch_optional(&mut *tx)
        .await?;
        if before.is_some_and(|(at,)| t < at.saturating_add(block)) {
            // Inside that view's window: not counted, and nothing after it changes.
            sql::query(
                "DELETE FROM events WHERE instance_id = $1 AND event_id = $2 AND occurred_at = $3",
            )
            .bind(&batch.instance_id)
            .bind(event)
            .bind(t)
            .execute(&mut *tx)
            .await?;
            return Ok(RowOutcome::Blocked);
        }
        // This view counts; the views after it are counted again from it, until the chain
        // meets a view it counted before (from there on it is what it was).
        let later: Vec<(i64, String, i64, i64, String, i64, i64)> = sql::query(
            "SELECT at, event_id, counted, channel, space_id, consent_version, policy_revision
                FROM view_times
             WHERE instance_id = $1 AND page_id = $2 AND viewer = $3 AND (at > $4 OR (at = $4 AND
             event_id >= $5))
             ORDER BY at, event_id",
        )
        .bind(&batch.instance_id)
        .bind(&view.page_id)
        .bind(viewer)
        .bind(t)
        .bind(event)
        .fetch_all(&mut *tx)
        .await?;
        let mut last: Option<i64> = None;
        for (at, event_id, counted, channel, space_id, consent_version, policy_revision) in later {
            let this = event_id == event && at == t;
            let counts = last.is_none_or(|l| at >= l.saturating_add(block));
            if counts {
                last = Some(at);
            }
            if !this && counts && counted == 1 {
                break;
            }
            if this || counts != (counted == 1) {
                sql::query(
                    "UPDATE view_times SET counted = $6 WHERE instance_id = $1 AND page_id = $2
                        AND viewer = $3 AND at = $4 AND event_id = $5",
                )
                .bind(&batch.instance_id)
                .bind(&view.page_id)
                .bind(viewer)
                .bind(at)
                .bind(&event_id)
                .bind(i64::from(counts))
                .execute(&mut *tx)
                .await?;
                let count = Counted {
                    org_id: &batch.org_id,
                    instance_id: &batch.instance_id,
                    page_id: &view.page_id,
                    space_id: &space_id,
                    viewer: Some(viewer),
                    at,
                    channel,
                    consent_version,
                    policy_revision,
                    stored_at: batch.stored_at,
                };
                Self::add_count(tx, &count, if counts { 1 } else { -1 }).await?;
                if !this {
                    Self::mark_view_day(
                        tx,
                        &batch.org_id,
                        &batch.instance_id,
                        at.div_euclid(DAY_MS),
                    )
                    .await?;
                }
            }
        }
        Ok(RowOutcome::Stored)
    }

    /// Adds one view to (`delta` 1) or takes one from (-1) the page's day counter and the
    /// day's viewers (a viewer leaves a day when none of their views of the page that day
    /// counts any more).
    pub(super) async fn add_count(tx: &mut Tx, c: &Counted<'_>, delta: i64) -> StoreResult<()> {
        let day = c.at.div_euclid(DAY_MS);
        if delta > 0 {
            sql::query(
                "INSERT INTO page_view_days (instance_id, page_id, day, channel, consent_version,
                    policy_revision, org_id, space_id, views)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1)
                 ON CONFLICT (instance_id, page_id, day, channel, consent_version,
                 policy_revision) DO UPDATE SET views = page_view_days.views + 1",
            )
            .bind(c.instance_id)
            .bind(c.page_id)
            .bind(day)
            .bind(c.channel)
            .bind(c.consent_version)
            .bind(c.policy_revision)
            .bind(c.org_id)
            .bind(c.space_id)
            .execute(&mut *tx)
            .await?;
            if let Some(viewer) = c.viewer {
                sql::query(
                    "INSERT INTO page_viewers (instance_id, page_id, day, viewer, org_id,
                        space_id, consent_version, policy_revision, stored_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (instance_id,
                     page_id, day, viewer) DO NOTHING",
                )
                .bind(c.instance_id)
                .bind(c.page_id)
                .bind(day)
                .bind(viewer)
                .bind(c.org_id)
                .bind(c.space_id)
                .bind(c.consent_version)
                .bind(c.policy_revision)
                .bind(c.stored_at)
                .execute(&mut *tx)
                .await?;
            }
            return Ok(());
        }
        // One view less; a counter that reaches nothing goes.
        for sql in [
            "UPDATE page_view_days SET views = views - 1 WHERE instance_id = $1 AND page_id = $2
                AND day = $3 AND channel = $4
               AND consent_version = $5 AND policy_revision = $6 AND views > 0",
            "DELETE FROM page_view_days WHERE instance_id = $1 AND page_id = $2 AND day = $3 AND
                channel = $4
               AND consent_version = $5 AND policy_revision = $6 AND views = 0",
        ] {
            sql::query(sql)
                .bind(c.instance_id)
                .bind(c.page_id)
                .bind(day)
                .bind(c.channel)
                .bind(c.consent_version)
                .bind(c.policy_revision)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(viewer) = c.viewer {
            let (still,): (i64,) = sql::query(
                "SELECT COUNT(*) FROM view_times WHERE instance_id = $1 AND page_id = $2 AND
                    viewer = $3 AND counted = 1
                   AND at >= $4 AND at < $5",
            )
            .bind(c.instance_id)
            .bind(c.page_id)
            .bind(viewer)
            .bind(day * DAY_MS)
            .bind((day + 1) * DAY_MS)
            .fetch_one(&mut *tx)
            .await?;
            if still == 0 {
                sql::query(
                    "DELETE FROM page_viewers WHERE instance_id = $1 AND page_id = $2 AND
                    day = $3 AND viewer = $4",
                )
                .bind(c.instance_id)
                .bind(c.page_id)
                .bind(day)
                .bind(viewer)
                .execute(&mut *tx)
                .await?;
            }
        }
        Ok(())
    }

    /// Marks an instance's day as changed: its totals are remade, and read from the page-view
    /// tables until then.
    pub(super) async fn mark_view_day(
        tx: &mut Tx,
        org_id: &str,
        instance_id: &str,
        day: i64,
    ) -> StoreResult<()> {
        sql::query(
            "INSERT INTO view_days_dirty (instance_id, day, org_id, generation) VALUES ($1, $2,
                $3, 0)
             ON CONFLICT (instance_id, day) DO UPDATE SET generation = view_days_dirty.generation
             + 1",
        )
        .bind(instance_id)
        .bind(day)
        .bind(org_id)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Deletes the totals of (org, instance, day)s and marks those days changed: derived data
    /// goes with what it derives from, and is remade from what is left.
    pub(super) async fn unmake_view_days(
        tx: &mut Tx,
        days: &[(String, String, i64)],
    ) -> StoreResult<()> {
        for (org_id, instance_id, day) in days {
            sql::query("DELETE FROM view_day_totals WHERE instance_id = $1 AND day = $2")
                .bind(instance_id)
                .bind(day)
                .execute(&mut *tx)
                .await?;
            Self::mark_view_day(tx, org_id, instance_id, *day).await?;
        }
        Ok(())
    }

    /// Totals counted from the page-view tables (a page's are small).
    pub(super) async fn exact_totals(
        &self,
        scope: &ViewScope,
        from_day: i64,
        to_day: i64,
    ) -> StoreResult<ViewTotals> {
        let (filter, binds) = scope_filter(scope);
        let n = binds.len();
        let days = format!("day >= ${} AND day < ${}", n + 1, n + 2);
        let mut query = sql::query_as::<(i64, i64, i64)>(sqlx::AssertSqlSafe(format!(
            "SELECT day, channel, CAST(SUM(views) AS BIGINT) FROM page_view_days WHERE {filter}
                AND {days} GROUP BY day, channel ORDER BY day, channel"
        )));
        for b in &binds {
            query = query.bind(b);
        }
        // Views and viewers from one snapshot, so they agree under concurrent ingest.
        let mut tx = self.db.snapshot().await?;
        let cells = query.bind(from_day).bind(to_day).fetch_all(&mut tx).await?;
        let mut query = sql::query_as::<(i64, i64)>(sqlx::AssertSqlSafe(format!(
            "SELECT day, COUNT(DISTINCT instance_id || '/' || viewer) FROM page_viewers WHERE
                {filter} AND {days} GROUP BY day ORDER BY day"
        )));
        for b in &binds {
            query = query.bind(b);
        }
        let uniques = query.bind(from_day).bind(to_day).fetch_all(&mut tx).await?;
        let unique_viewers = Self::count_where(
            &mut tx,
            format!(
                "SELECT COUNT(DISTINCT instance_id || '/' || viewer) FROM page_viewers
                    WHERE {filter} AND {days}"
            ),
            &binds,
            &[from_day, to_day],
        )
        .await?;
        tx.rollback().await?;
        let mut totals = ViewTotals {
            unique_viewers,
            ..ViewTotals::default()
        };
        for (day, channel, views) in cells {
            totals.views += views;
            match totals.by_channel.iter_mut().find(|(c, _)| *c == channel) {
                Some((_, v)) => *v += views,
                None => totals.by_channel.push((channel, views)),
            }
            match totals.by_day.last_mut() {
                Some((d, v, _)) if *d == day => *v += views,
                _ => totals.by_day.push((day, views, 0)),
            }
        }
        totals.by_channel.sort_unstable();
        for (day, unique) in uniques {
            if let Some(entry) = totals.by_day.iter_mut().find(|(d, _, _)| *d == day) {
                entry.2 = unique;
            }
        }
        Ok(totals)
    }

    /// One instance's day from the page-view tables (for a day whose totals are not made
    /// yet), in one space or in all.
    pub(super) async fn exact_day(
        tx: &mut Tx,
        instance_id: &str,
        space_id: Option<&str>,
        day: i64,
    ) -> StoreResult<DayPart> {
        let space = if space_id.is_some() {
            " AND space_id = $3"
        } else {
            ""
        };
        let mut cells = sql::query_as::<(i64, i64)>(sqlx::AssertSqlSafe(format!(
            "SELECT channel, CAST(SUM(views) AS BIGINT) FROM page_view_days WHERE instance_id = $1
                AND day = $2{space} GROUP BY channel"
        )))
        .bind(instance_id)
        .bind(day);
        let mut viewers = sql::query_as::<(String,)>(sqlx::AssertSqlSafe(format!(
            "SELECT DISTINCT viewer FROM page_viewers WHERE instance_id = $1 AND day = $2{space}"
        )))
        .bind(instance_id)
        .bind(day);
        if let Some(space_id) = space_id {
            cells = cells.bind(space_id);
            viewers = viewers.bind(space_id);
        }
        let cells = cells.fetch_all(&mut *tx).await?;
        let viewers: Vec<String> = viewers
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|(v,)| v)
            .collect();
        Ok(DayPart::exact(instance_id, day, &cells, &viewers))
    }

    /// Totals of a space or an org from the day totals, and from the page-view tables for
    /// days changed since their totals were made.
    pub(super) async fn summed_totals(
        &self,
        scope: &ViewScope,
        from_day: i64,
        to_day: i64,
    ) -> StoreResult<ViewTotals> {
        let (totals_filter, dirty_filter, binds, space) = match scope {
            ViewScope::Space {
                instance_id,
                space_id,
            } => (
                "t.instance_id = $1 AND t.space_id = $2",
                "instance_id = $1",
                vec![instance_id.clone(), space_id.clone()],
                Some(space_id.as_str()),
            ),
            ViewScope::Org {
                org_id,
                instance_id: Some(instance),
            } => (
                "t.org_id = $1 AND t.instance_id = $2 AND t.space_id = ''",
                "org_id = $1 AND instance_id = $2",
                vec![org_id.clone(), instance.clone()],
                None,
            ),
            ViewScope::Org {
                org_id,
                instance_id: None,
            } => (
                "t.org_id = $1 AND t.space_id = ''",
                "org_id = $1",
                vec![org_id.clone()],
                None,
            ),
            ViewScope::Page { .. } => return self.exact_totals(scope, from_day, to_day).await,
        };
        let n = binds.len();
        let mut query = sql::query_as::<(String, i64, i64, String, i64, Vec<u8>)>(
            sqlx::AssertSqlSafe(format!(
                "SELECT t.instance_id, t.day, t.views, t.channels, t.unique_viewers, t.sketch FROM
                view_day_totals t
             WHERE {totals_filter} AND t.day >= ${} AND t.day < ${}
               AND NOT EXISTS (SELECT 1 FROM view_days_dirty d WHERE d.instance_id = t.instance_id
               AND d.day = t.day)",
                n + 1,
                n + 2
            )),
        );
        for b in &binds {
            query = query.bind(b);
        }
        // The totals, the dirty days and their exact counts from one snapshot: a day remade in
        // between would otherwise be in neither (or in both).
        let mut tx = self.db.snapshot().await?;
        let rows = query.bind(from_day).bind(to_day).fetch_all(&mut tx).await?;
        let mut parts: Vec<DayPart> = rows
            .into_iter()
            .map(|(instance, day, views, channels, unique, sketch)| {
                DayPart::stored(instance, day, views, &channels, unique, &sketch)
            })
            .collect();
        // A space's dirty days are its instance's.
        let dirty_binds = if space.is_some() {
            &binds[..1]
        } else {
            &binds[..]
        };
        let m = dirty_binds.len();
        let mut query = sql::query_as::<(String, i64)>(sqlx::AssertSqlSafe(format!(
            "SELECT instance_id, day FROM view_days_dirty WHERE {dirty_filter} AND day >= ${} AND
                day < ${}",
            m + 1,
            m + 2
        )));
        for b in dirty_binds {
            query = query.bind(b);
        }
        for (instance, day) in query.bind(from_day).bind(to_day).fetch_all(&mut tx).await? {
            let part = Self::exact_day(&mut tx, &instance, space, day).await?;
            if part.views > 0 || part.unique_viewers > 0 {
                parts.push(part);
            }
        }
        tx.rollback().await?;
        Ok(days::combine(&parts))
    }
}

pub(super) async fn view_count(
    store: &SqlStore,
    instance_id: &str,
    page_id: &str,
) -> StoreResult<(i64, i64)> {
    let (views,): (i64,) = sql::query(
        "SELECT CAST(COALESCE(SUM(views), 0) AS BIGINT) FROM page_view_days WHERE instance_id
                = $1 AND page_id = $2",
    )
    .bind(instance_id)
    .bind(page_id)
    .fetch_one(&store.db)
    .await?;
    let (unique,): (i64,) = sql::query(
        "SELECT COUNT(DISTINCT viewer) FROM page_viewers WHERE instance_id = $1 AND page_id = $2",
    )
    .bind(instance_id)
    .bind(page_id)
    .fetch_one(&store.db)
    .await?;
    Ok((views, unique))
}

pub(super) async fn view_totals(
    store: &SqlStore,
    scope: &ViewScope,
    from_day: i64,
    to_day: i64,
) -> StoreResult<ViewTotals> {
    match scope {
        ViewScope::Page { .. } => store.exact_totals(scope, from_day, to_day).await,
        _ => store.summed_totals(scope, from_day, to_day).await,
    }
}

pub(super) async fn top_pages(
    store: &SqlStore,
    instance_id: &str,
    space_id: &str,
    from_day: i64,
    to_day: i64,
    offset: i64,
    limit: i64,
) -> StoreResult<Vec<Ranked>> {
    let pages: Vec<(String, i64)> = sql::query(
        "SELECT page_id, CAST(SUM(views) AS BIGINT) AS v FROM page_view_days
             WHERE instance_id = $1 AND space_id = $2 AND day >= $3 AND day < $4
             GROUP BY page_id ORDER BY v DESC, page_id LIMIT $5 OFFSET $6",
    )
    .bind(instance_id)
    .bind(space_id)
    .bind(from_day)
    .bind(to_day)
    .bind(limit)
    .bind(offset)
    .fetch_all(&store.db)
    .await?;
    let mut ranked = Vec::with_capacity(pages.len());
    for (page_id, views) in pages {
        let (unique,): (i64,) = sql::query(
            "SELECT COUNT(DISTINCT viewer) FROM page_viewers WHERE instance_id = $1 AND
                    page_id = $2 AND day >= $3 AND day < $4",
        )
        .bind(instance_id)
        .bind(&page_id)
        .bind(from_day)
        .bind(to_day)
        .fetch_one(&store.db)
        .await?;
        ranked.push(Ranked {
            instance_id: instance_id.to_owned(),
            id: page_id,
            views,
            unique_viewers: unique,
            unique_error: 0.0,
        });
    }
    Ok(ranked)
}

pub(super) async fn top_spaces(
    store: &SqlStore,
    org_id: &str,
    instance_id: Option<&str>,
    from_day: i64,
    to_day: i64,
    offset: i64,
    limit: i64,
) -> StoreResult<Vec<Ranked>> {
    let mut views: BTreeMap<(String, String), i64> = BTreeMap::new();
    let spaces: Vec<(String, String, i64)> = sql::query(
        "SELECT t.instance_id, t.space_id, CAST(SUM(t.views) AS BIGINT) FROM view_day_totals t
             WHERE t.org_id = $1 AND ($2 = '' OR t.instance_id = $2) AND t.space_id <> '' AND
             t.day >= $3 AND t.day < $4
               AND NOT EXISTS (SELECT 1 FROM view_days_dirty d WHERE d.instance_id = t.instance_id
               AND d.day = t.day)
             GROUP BY t.instance_id, t.space_id",
    )
    .bind(org_id)
    .bind(instance_id.unwrap_or_default())
    .bind(from_day)
    .bind(to_day)
    .fetch_all(&store.db)
    .await?;
    for (instance, space, v) in spaces {
        *views.entry((instance, space)).or_default() += v;
    }
    let dirty: Vec<(String, i64)> = sql::query(
        "SELECT instance_id, day FROM view_days_dirty WHERE org_id = $1 AND ($2 = '' OR
                instance_id = $2) AND day >= $3 AND day < $4",
    )
    .bind(org_id)
    .bind(instance_id.unwrap_or_default())
    .bind(from_day)
    .bind(to_day)
    .fetch_all(&store.db)
    .await?;
    for (instance, day) in dirty {
        let cells: Vec<(String, i64)> = sql::query(
            "SELECT space_id, CAST(SUM(views) AS BIGINT) FROM page_view_days WHERE instance_id
                    = $1 AND day = $2 GROUP BY space_id",
        )
        .bind(&instance)
        .bind(day)
        .fetch_all(&store.db)
        .await?;
        for (space, v) in cells {
            *views.entry((instance.clone(), space)).or_default() += v;
        }
    }
    let mut ranked: Vec<((String, String), i64)> =
        views.into_iter().filter(|(_, v)| *v > 0).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let page = ranked
        .into_iter()
        .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        .take(usize::try_from(limit).unwrap_or(0));
    let mut out = Vec::new();
    for ((instance_id, space_id), views) in page {
        let totals = store
            .summed_totals(
                &ViewScope::Space {
                    instance_id: instance_id.clone(),
                    space_id: space_id.clone(),
                },
                from_day,
                to_day,
            )
            .await?;
        out.push(Ranked {
            instance_id,
            id: space_id,
            views,
            unique_viewers: totals.unique_viewers,
            unique_error: totals.unique_error,
        });
    }
    Ok(out)
}

pub(super) async fn dirty_view_days(
    store: &SqlStore,
    limit: i64,
    skip: &[String],
) -> StoreResult<Vec<(String, String, i64, i64)>> {
    let skipped = if skip.is_empty() {
        String::new()
    } else {
        format!(" WHERE org_id NOT IN {}", placeholders(2, skip.len()))
    };
    let mut query = sql::query(sqlx::AssertSqlSafe(format!(
        "SELECT org_id, instance_id, day, generation FROM view_days_dirty{skipped} ORDER BY
                day, instance_id LIMIT $1"
    )))
    .bind(limit);
    for org_id in skip {
        query = query.bind(org_id);
    }
    Ok(query.fetch_all(&store.db).await?)
}

pub(super) async fn remake_view_day(
    store: &SqlStore,
    org_id: &str,
    instance_id: &str,
    day: i64,
    generation: i64,
) -> StoreResult<()> {
    let cells: Vec<(String, i64, i64)> = sql::query(
        "SELECT space_id, channel, CAST(SUM(views) AS BIGINT) FROM page_view_days WHERE
                instance_id = $1 AND day = $2 GROUP BY space_id, channel",
    )
    .bind(instance_id)
    .bind(day)
    .fetch_all(&store.db)
    .await?;
    let viewers: Vec<(String, String)> =
        sql::query("SELECT space_id, viewer FROM page_viewers WHERE instance_id = $1 AND day = $2")
            .bind(instance_id)
            .bind(day)
            .fetch_all(&store.db)
            .await?;
    let parts = days::day_parts(instance_id, day, &cells, &viewers);
    let mut tx = store.db.begin().await?;
    SqlStore::lock_org(&mut tx, org_id, false).await?;
    sql::query("DELETE FROM view_day_totals WHERE instance_id = $1 AND day = $2")
        .bind(instance_id)
        .bind(day)
        .execute(&mut tx)
        .await?;
    for (space_id, part) in parts
        .iter()
        .filter(|(_, p)| p.views > 0 || p.unique_viewers > 0)
    {
        sql::query(
            "INSERT INTO view_day_totals (instance_id, space_id, day, org_id, views, channels,
                    unique_viewers, sketch)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(instance_id)
        .bind(space_id)
        .bind(day)
        .bind(org_id)
        .bind(part.views)
        .bind(part.channels_text())
        .bind(part.unique_viewers)
        .bind(part.sketch.to_bytes())
        .execute(&mut tx)
        .await?;
    }
    sql::query(
        "DELETE FROM view_days_dirty WHERE instance_id = $1 AND day = $2 AND generation = $3",
    )
    .bind(instance_id)
    .bind(day)
    .bind(generation)
    .execute(&mut tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
