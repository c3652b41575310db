//! Residency moves: an org's rows read table by table from the old location's store, written to the
//! new one, counted, and cleared.

use super::*;

impl SqlStore {
    /// Takes the org's data out: deleted, or relabelled when the new location shares this
    /// database; remembers the move so a resumed move does not copy again.
    pub(super) async fn apply_move_out(tx: &mut Tx, spec: &MoveSpec, now: i64) -> StoreResult<()> {
        Self::lock_org(tx, &spec.org_id, true).await?;
        if spec.in_place {
            for table in MOVED_TABLES
                .iter()
                .filter(|t| t.location_column().is_some())
            {
                sql::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {} SET location = $2 WHERE org_id = $1",
                    table.name
                )))
                .bind(&spec.org_id)
                .bind(&spec.to_location)
                .execute(&mut *tx)
                .await?;
            }
        } else {
            Self::delete_org(tx, &spec.org_id).await?;
        }
        sql::query(
            "INSERT INTO moved_out (move_id, org_id, to_location, moved_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (move_id) DO NOTHING",
        )
        .bind(&spec.move_id)
        .bind(&spec.org_id)
        .bind(&spec.to_location)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Deletes every row of the org's data, in every moved table.
    pub(super) async fn delete_org(tx: &mut Tx, org_id: &str) -> StoreResult<()> {
        for table in MOVED_TABLES {
            sql::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {} WHERE org_id = $1",
                table.name
            )))
            .bind(org_id)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    /// One exported row's values, read by the table's column types.
    pub(super) fn values_of(table: &Table, row: &sql::Row) -> StoreResult<Vec<Value>> {
        table
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| {
                Ok(match ty {
                    Type::Int => Value::Int(row.try_get(i)?),
                    Type::Real => Value::Real(row.try_get(i)?),
                    Type::Text => Value::Text(row.try_get(i)?),
                    Type::Blob => Value::Blob(row.try_get(i)?),
                })
            })
            .collect()
    }
}

pub(super) async fn export_rows(
    store: &SqlStore,
    table: &'static Table,
    org_id: &str,
    after: Option<&[Value]>,
    limit: i64,
) -> StoreResult<Vec<Vec<Value>>> {
    let key = table.key_list();
    let after_key = match after {
        Some(values) => format!(" AND ({key}) > {}", placeholders(2, values.len())),
        None => String::new(),
    };
    let sql = format!(
        "SELECT {} FROM {} WHERE org_id = $1{after_key} ORDER BY {key} LIMIT {limit}",
        table.column_list(),
        table.name,
    );
    let mut query = sql::query(sqlx::AssertSqlSafe(sql)).bind(org_id);
    for value in after.unwrap_or_default() {
        query = match value {
            Value::Int(v) => query.bind(*v),
            Value::Real(v) => query.bind(*v),
            Value::Text(v) => query.bind(v.clone()),
            Value::Blob(v) => query.bind(v.clone()),
        };
    }
    let rows = query.fetch_rows(&store.db).await?;
    rows.iter()
        .map(|row| SqlStore::values_of(table, row))
        .collect()
}

pub(super) async fn import_rows(
    store: &SqlStore,
    table: &'static Table,
    rows: &[Vec<Value>],
) -> StoreResult<()> {
    let width = table.columns.len();
    let location = table.location_column();
    let mut tx = store.db.begin().await?;
    if let Some(row) = rows.iter().find(|row| row.len() != width) {
        return Err(StoreError::Corrupt(format!(
            "a row of {} has {} values",
            table.name,
            row.len()
        )));
    }
    for chunk in rows.chunks(INSERT_CHUNK) {
        // The builder's placeholders (`?` on SQLite) bind in constant time each.
        let mut query = sql::Builder::new(
            tx.backend(),
            format!("INSERT INTO {} ({}) ", table.name, table.column_list()),
        );
        query.push_values(chunk, |b, row| {
            for (i, value) in row.iter().enumerate() {
                match value {
                    // Rows take the location of the store that holds them.
                    _ if Some(i) == location => b.push_bind(store.location.clone()),
                    Value::Int(v) => b.push_bind(*v),
                    Value::Real(v) => b.push_bind(*v),
                    Value::Text(v) => b.push_bind(v.clone()),
                    Value::Blob(v) => b.push_bind(v.clone()),
                };
            }
        });
        query.push(" ON CONFLICT DO NOTHING");
        query.build().execute(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn org_counts(store: &SqlStore, org_id: &str) -> StoreResult<Vec<i64>> {
    let mut counts = Vec::with_capacity(MOVED_TABLES.len());
    for table in MOVED_TABLES {
        let (n,): (i64,) = sql::query(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {} WHERE org_id = $1",
            table.name
        )))
        .bind(org_id)
        .fetch_one(&store.db)
        .await?;
        counts.push(n);
    }
    Ok(counts)
}

pub(super) async fn clear_org(store: &SqlStore, org_id: &str) -> StoreResult<()> {
    let mut tx = store.db.begin().await?;
    SqlStore::lock_org(&mut tx, org_id, true).await?;
    SqlStore::delete_org(&mut tx, org_id).await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn moved_out(store: &SqlStore, move_id: &str) -> StoreResult<bool> {
    let row: Option<(String,)> = sql::query("SELECT move_id FROM moved_out WHERE move_id = $1")
        .bind(move_id)
        .fetch_optional(&store.db)
        .await?;
    Ok(row.is_some())
}
