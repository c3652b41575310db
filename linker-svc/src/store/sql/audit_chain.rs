//! The per-org audit chain: appends (plain and keyed by an idempotency key), key resolution,
//! listing, replay and the head.

use super::*;

pub(super) async fn append_audit(
    store: &SqlStore,
    org_id: &str,
    audit: AuditDraft,
) -> StoreResult<AuditRecord> {
    let mut tx = store.begin().await?;
    let reserved = reserve_audit(&mut tx, org_id).await?;
    let record = write_audit(&mut tx, org_id, reserved, &audit).await?;
    tx.commit().await?;
    Ok(record)
}

pub(super) async fn append_audit_keyed(
    store: &SqlStore,
    org_id: &str,
    audit: AuditDraft,
    key: &str,
) -> StoreResult<KeyedAppend> {
    let mut tx = store.begin().await?;
    // Reserving locks the org's chain, so the key is checked with no append racing it.
    let reserved = reserve_audit(&mut tx, org_id).await?;
    if let Some(known) = key_state(&mut tx, org_id, key).await? {
        // Dropping the transaction gives the reserved seq back.
        return Ok(known);
    }
    let record = write_audit(&mut tx, org_id, reserved, &audit).await?;
    sql::query(
        "INSERT INTO audit_keys (org_id, idempotency_key, seq, fenced_at) VALUES ($1, $2,
        $3, NULL)",
    )
    .bind(org_id)
    .bind(key)
    .bind(record.seq)
    .execute(&mut tx)
    .await?;
    tx.commit().await?;
    Ok(KeyedAppend::Appended(record))
}

pub(super) async fn resolve_audit_key(
    store: &SqlStore,
    org_id: &str,
    key: &str,
    now: i64,
) -> StoreResult<KeyedAppend> {
    let mut tx = store.begin().await?;
    let locked = sql::query("UPDATE orgs SET audit_seq = audit_seq WHERE id = $1")
        .bind(org_id)
        .execute(&mut tx)
        .await?;
    if locked.rows_affected() == 0 {
        return Err(StoreError::NotFound("org"));
    }
    if let Some(known) = key_state(&mut tx, org_id, key).await? {
        return Ok(known);
    }
    sql::query(
        "INSERT INTO audit_keys (org_id, idempotency_key, seq, fenced_at) VALUES ($1, $2,
        NULL, $3)",
    )
    .bind(org_id)
    .bind(key)
    .bind(now)
    .execute(&mut tx)
    .await?;
    tx.commit().await?;
    Ok(KeyedAppend::Fenced)
}

pub(super) async fn list_audit(
    store: &SqlStore,
    org_id: &str,
    after_seq: i64,
    limit: i64,
    action_prefix: &str,
) -> StoreResult<Vec<AuditRecord>> {
    Ok(sql::query(
        "SELECT org_id, seq, occurred_at, actor, service, action, target, attributes,
                prev_hash, hash
             FROM audit_events WHERE org_id = $1 AND seq > $2 AND action LIKE $4 ESCAPE '\\' ORDER
             BY seq LIMIT $3",
    )
    .bind(org_id)
    .bind(after_seq)
    .bind(limit)
    .bind(starts_with_pattern(action_prefix))
    .fetch_all(&store.db)
    .await?)
}

pub(super) async fn replay(
    store: &SqlStore,
    org_id: &str,
    method: &str,
    request_key: &str,
    since: i64,
) -> StoreResult<Option<Vec<u8>>> {
    let row: Option<(Vec<u8>,)> = sql::query(
        "SELECT sealed FROM idempotent_replies WHERE org_id = $1 AND method = $2 AND
                request_key = $3 AND created_at >= $4",
    )
    .bind(org_id)
    .bind(method)
    .bind(request_key)
    .bind(since)
    .fetch_optional(&store.db)
    .await?;
    Ok(row.map(|(sealed,)| sealed))
}

pub(super) async fn audit_head(store: &SqlStore, org_id: &str) -> StoreResult<Option<AuditHead>> {
    let row: Option<(i64, Vec<u8>)> =
        sql::query("SELECT audit_seq, audit_head FROM orgs WHERE id = $1")
            .bind(org_id)
            .fetch_optional(&store.db)
            .await?;
    Ok(row.map(|(seq, hash)| AuditHead { seq, hash }))
}
