//! Instances and their credentials: linking (with the link key's checks and the audit entry in one
//! transaction), listing, unlinking, and the credential an instance authenticates with.

use super::*;

/// A link key as presented: found by its digest.
#[derive(sqlx::FromRow)]
struct PresentedKey {
    id: String,
    org_id: String,
    expires_at: i64,
    revoked_at: Option<i64>,
    digest: Vec<u8>,
}

/// A credential found by its digest, with its instance's unlink time.
#[derive(sqlx::FromRow)]
struct CredentialRow {
    id: String,
    org_id: String,
    instance_id: String,
    prefix: String,
    created_at: i64,
    last_used_at: Option<i64>,
    revoked_at: Option<i64>,
    digest: Vec<u8>,
    unlinked_at: Option<i64>,
}

pub(super) async fn link_instance(
    store: &SqlStore,
    key_digest: &[u8; 32],
    link: NewLink,
) -> StoreResult<LinkOutcome> {
    let now = link.instance.linked_at;
    let key: Option<PresentedKey> = sql::query(
        "SELECT id, org_id, expires_at, revoked_at, digest FROM link_keys WHERE digest = $1",
    )
    .bind(key_digest.as_slice())
    .fetch_optional(&store.db)
    .await?;
    let PresentedKey {
        id: key_id,
        org_id,
        expires_at,
        revoked_at,
        digest: stored,
    } = key.ok_or(StoreError::LinkKeyRejected(LinkKeyRejection::Unknown))?;
    if !sightline_runtime::token::digests_equal(&stored, key_digest) {
        return Err(StoreError::LinkKeyRejected(LinkKeyRejection::Unknown));
    }
    if revoked_at.is_some() {
        return Err(StoreError::LinkKeyRejected(LinkKeyRejection::Revoked));
    }
    if now >= expires_at {
        return Err(StoreError::LinkKeyRejected(LinkKeyRejection::Expired));
    }

    let mut tx = store.begin().await?;
    let reserved = reserve_audit(&mut tx, &org_id).await?;
    // Re-check under the lock: the key may have been revoked meanwhile.
    let still_valid: Option<(String,)> =
        sql::query("SELECT id FROM link_keys WHERE id = $1 AND revoked_at IS NULL")
            .bind(&key_id)
            .fetch_optional(&mut tx)
            .await?;
    if still_valid.is_none() {
        return Err(StoreError::LinkKeyRejected(LinkKeyRejection::Revoked));
    }
    sql::query("UPDATE link_keys SET last_used_at = $2 WHERE id = $1")
        .bind(&key_id)
        .bind(now)
        .execute(&mut tx)
        .await?;

    let existing: Option<InstanceRecord> = sql::query(
        "SELECT id, org_id, server_id, base_url, product, version, license_sen, node_count,
                link_key_id, linked_at, unlinked_at
             FROM instances WHERE org_id = $1 AND server_id = $2 AND unlinked_at IS NULL",
    )
    .bind(&org_id)
    .bind(&link.instance.server_id)
    .fetch_optional(&mut tx)
    .await?;
    let relinked = existing.is_some();
    let mut instance = link.instance;
    instance.org_id.clone_from(&org_id);
    instance.link_key_id.clone_from(&key_id);
    if let Some(existing) = existing {
        // The same server linking again (e.g. it lost its credential): keep its id, take the
        // new metadata, and revoke what it was issued before.
        instance.id = existing.id;
        instance.linked_at = existing.linked_at;
        sql::query("UPDATE instances SET link_key_id = $2 WHERE id = $1")
            .bind(&instance.id)
            .bind(&instance.link_key_id)
            .execute(&mut tx)
            .await?;
        sql::query(
            "UPDATE credentials SET revoked_at = $2 WHERE instance_id = $1 AND revoked_at IS NULL",
        )
        .bind(&instance.id)
        .bind(now)
        .execute(&mut tx)
        .await?;
    } else {
        sql::query(
            "INSERT INTO instances (id, org_id, server_id, base_url, product, version,
                    license_sen, node_count, link_key_id, linked_at)
                 VALUES ($1, $2, $3, '', '', '', '', 0, $4, $5)",
        )
        .bind(&instance.id)
        .bind(&instance.org_id)
        .bind(&instance.server_id)
        .bind(&instance.link_key_id)
        .bind(instance.linked_at)
        .execute(&mut tx)
        .await?;
    }
    let mut credential = link.credential.record;
    credential.org_id.clone_from(&org_id);
    credential.instance_id.clone_from(&instance.id);
    sql::query(
        "INSERT INTO credentials (id, org_id, instance_id, prefix, digest, created_at) VALUES
                ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&credential.id)
    .bind(&credential.org_id)
    .bind(&credential.instance_id)
    .bind(&credential.prefix)
    .bind(link.credential.digest.as_slice())
    .bind(credential.created_at)
    .execute(&mut tx)
    .await?;
    let draft = AuditDraft::new(
        now,
        format!("link_key:{key_id}"),
        "instance.linked",
        instance.id.clone(),
    )
    .with("link_key_id", key_id.clone())
    .with("credential_id", credential.id.clone())
    .with("server_id", instance.server_id.clone())
    .with("relinked", relinked.to_string());
    write_audit(&mut tx, &org_id, reserved, &draft).await?;
    tx.commit().await?;
    Ok(LinkOutcome {
        instance,
        credential,
        relinked,
        link_key_expires_at: expires_at,
    })
}

pub(super) async fn list_instances(
    store: &SqlStore,
    org_id: &str,
    after_id: Option<&str>,
    limit: i64,
) -> StoreResult<Vec<InstanceRecord>> {
    Ok(sql::query(
        "SELECT id, org_id, server_id, base_url, product, version, license_sen, node_count,
                link_key_id, linked_at, unlinked_at
             FROM instances WHERE org_id = $1 AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(org_id)
    .bind(after_id.unwrap_or(""))
    .bind(limit)
    .fetch_all(&store.db)
    .await?)
}

pub(super) async fn get_instance(
    store: &SqlStore,
    org_id: &str,
    instance_id: &str,
) -> StoreResult<Option<InstanceRecord>> {
    Ok(sql::query(
        "SELECT id, org_id, server_id, base_url, product, version, license_sen, node_count,
                link_key_id, linked_at, unlinked_at
             FROM instances WHERE org_id = $1 AND id = $2",
    )
    .bind(org_id)
    .bind(instance_id)
    .fetch_optional(&store.db)
    .await?)
}

pub(super) async fn unlink_instance(
    store: &SqlStore,
    org_id: &str,
    instance_id: &str,
    audit: AuditDraft,
) -> StoreResult<InstanceRecord> {
    let mut tx = store.begin().await?;
    let reserved = reserve_audit(&mut tx, org_id).await?;
    let instance: Option<InstanceRecord> = sql::query(
        "UPDATE instances SET unlinked_at = COALESCE(unlinked_at, $3) WHERE org_id = $1 AND id
                = $2
             RETURNING id, org_id, server_id, base_url, product, version, license_sen, node_count,
             link_key_id, linked_at, unlinked_at",
    )
    .bind(org_id)
    .bind(instance_id)
    .bind(audit.at)
    .fetch_optional(&mut tx)
    .await?;
    let instance = instance.ok_or(StoreError::NotFound("instance"))?;
    sql::query(
        "UPDATE credentials SET revoked_at = $2 WHERE instance_id = $1 AND revoked_at IS NULL",
    )
    .bind(instance_id)
    .bind(audit.at)
    .execute(&mut tx)
    .await?;
    write_audit(&mut tx, org_id, reserved, &audit).await?;
    tx.commit().await?;
    Ok(instance)
}

pub(super) async fn find_credential(
    store: &SqlStore,
    digest: &[u8; 32],
) -> StoreResult<Option<FoundCredential>> {
    let row: Option<CredentialRow> = sql::query(
        "SELECT c.id, c.org_id, c.instance_id, c.prefix, c.created_at, c.last_used_at,
                c.revoked_at, c.digest, i.unlinked_at
             FROM credentials c JOIN instances i ON i.id = c.instance_id WHERE c.digest = $1",
    )
    .bind(digest.as_slice())
    .fetch_optional(&store.db)
    .await?;
    Ok(row.map(|row| FoundCredential {
        record: CredentialRecord {
            id: row.id,
            org_id: row.org_id,
            instance_id: row.instance_id,
            prefix: row.prefix,
            created_at: row.created_at,
            last_used_at: row.last_used_at,
            revoked_at: row.revoked_at,
        },
        digest: row.digest,
        instance_unlinked: row.unlinked_at.is_some(),
    }))
}

pub(super) async fn touch_credential(
    store: &SqlStore,
    credential_id: &str,
    at: i64,
) -> StoreResult<()> {
    sql::query("UPDATE credentials SET last_used_at = $2 WHERE id = $1")
        .bind(credential_id)
        .bind(at)
        .execute(&store.db)
        .await?;
    Ok(())
}

pub(super) async fn revoke_credential(
    store: &SqlStore,
    org_id: &str,
    credential_id: &str,
    audit: AuditDraft,
) -> StoreResult<CredentialRecord> {
    let mut tx = store.begin().await?;
    let reserved = reserve_audit(&mut tx, org_id).await?;
    let revoked: Option<CredentialRecord> = sql::query(
        "UPDATE credentials SET revoked_at = COALESCE(revoked_at, $3) WHERE org_id = $1 AND id = $2
             RETURNING id, org_id, instance_id, prefix, created_at, last_used_at, revoked_at",
    )
    .bind(org_id)
    .bind(credential_id)
    .bind(audit.at)
    .fetch_optional(&mut tx)
    .await?;
    let revoked = revoked.ok_or(StoreError::NotFound("credential"))?;
    write_audit(&mut tx, org_id, reserved, &audit).await?;
    tx.commit().await?;
    Ok(revoked)
}

pub(super) async fn detection_inputs(
    store: &SqlStore,
    org_id: &str,
) -> StoreResult<DetectionInputs> {
    let verified_domains: Vec<(String,)> = sql::query(
        "SELECT domain FROM domains WHERE org_id = $1 AND verified_at IS NOT NULL ORDER BY domain",
    )
    .bind(org_id)
    .fetch_all(&store.db)
    .await?;
    let verified_domains: Vec<String> = verified_domains.into_iter().map(|(d,)| d).collect();
    let mut licenses = Vec::new();
    for domain in &verified_domains {
        let mut some: Vec<LicenseRecord> = sql::query(
            "SELECT sen, product, domain FROM licenses WHERE domain = $1 OR domain LIKE $2
                    ORDER BY sen",
        )
        .bind(domain)
        .bind(format!("%.{domain}"))
        .fetch_all(&store.db)
        .await?;
        licenses.append(&mut some);
    }
    let linked_instances: Vec<InstanceRecord> = sql::query(
        "SELECT id, org_id, server_id, base_url, product, version, license_sen, node_count,
                link_key_id, linked_at, unlinked_at
             FROM instances WHERE org_id = $1 AND unlinked_at IS NULL ORDER BY id",
    )
    .bind(org_id)
    .fetch_all(&store.db)
    .await?;
    Ok(DetectionInputs {
        verified_domains,
        licenses,
        linked_instances,
        app_links: Vec::new(),
    })
}
