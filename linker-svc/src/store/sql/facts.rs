//! Instance metadata (base URL, product, version, license SEN, node count, app links): kept in the
//! store of the org's data location and carried whole when the org moves.

use super::*;

pub(super) async fn put_instance_facts(
    store: &SqlStore,
    facts: &InstanceFacts,
    app_links: &[AppLinkRecord],
) -> StoreResult<()> {
    let mut tx = store.begin().await?;
    upsert_facts(&mut tx, facts).await?;
    sql::query("DELETE FROM instance_app_links WHERE instance_id = $1")
        .bind(&facts.instance_id)
        .execute(&mut tx)
        .await?;
    for link in app_links {
        insert_app_link(&mut tx, &facts.org_id, link).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn instance_facts_of(
    store: &SqlStore,
    instance_ids: &[String],
) -> StoreResult<Vec<InstanceFacts>> {
    // One query per page of instances, not one per instance.
    Ok(sql::fetch_in(
        &store.db,
        "SELECT instance_id, org_id, base_url, product, version, license_sen, node_count
                 FROM instance_facts WHERE instance_id",
        instance_ids,
        "ORDER BY instance_id",
    )
    .await?)
}

pub(super) async fn org_facts(store: &SqlStore, org_id: &str) -> StoreResult<OrgFacts> {
    let facts = sql::query(
        "SELECT instance_id, org_id, base_url, product, version, license_sen, node_count
             FROM instance_facts WHERE org_id = $1 ORDER BY instance_id",
    )
    .bind(org_id)
    .fetch_all(&store.db)
    .await?;
    let app_links = sql::query(
        "SELECT instance_id, url, product_family, server_id, version
             FROM instance_app_links WHERE org_id = $1 ORDER BY instance_id, url",
    )
    .bind(org_id)
    .fetch_all(&store.db)
    .await?;
    Ok(OrgFacts { facts, app_links })
}

pub(super) async fn import_facts(store: &SqlStore, org: &OrgFacts) -> StoreResult<()> {
    let mut tx = store.begin().await?;
    for facts in &org.facts {
        upsert_facts(&mut tx, facts).await?;
    }
    for link in &org.app_links {
        let Some(owner) = org.facts.iter().find(|f| f.instance_id == link.instance_id) else {
            continue;
        };
        sql::query("DELETE FROM instance_app_links WHERE instance_id = $1 AND url = $2")
            .bind(&link.instance_id)
            .bind(&link.url)
            .execute(&mut tx)
            .await?;
        insert_app_link(&mut tx, &owner.org_id, link).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn delete_org_facts(store: &SqlStore, org_id: &str) -> StoreResult<u64> {
    let mut tx = store.begin().await?;
    let links = sql::query("DELETE FROM instance_app_links WHERE org_id = $1")
        .bind(org_id)
        .execute(&mut tx)
        .await?
        .rows_affected();
    let facts = sql::query("DELETE FROM instance_facts WHERE org_id = $1")
        .bind(org_id)
        .execute(&mut tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(links + facts)
}

pub(super) async fn app_links_of(
    store: &SqlStore,
    instance_ids: &[String],
) -> StoreResult<Vec<AppLinkRecord>> {
    // One query per page of instances, not one per instance.
    Ok(sql::fetch_in(
        &store.db,
        "SELECT instance_id, url, product_family, server_id, version FROM instance_app_links WHERE
            instance_id",
        instance_ids,
        "ORDER BY instance_id, url",
    )
    .await?)
}

pub(super) async fn credentials_of(
    store: &SqlStore,
    instance_ids: &[String],
) -> StoreResult<Vec<CredentialRecord>> {
    // One query per page of instances, not one per instance.
    Ok(sql::fetch_in(
        &store.db,
        "SELECT id, org_id, instance_id, prefix, created_at, last_used_at, revoked_at
                 FROM credentials WHERE instance_id",
        instance_ids,
        "ORDER BY instance_id, id",
    )
    .await?)
}
