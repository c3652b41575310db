//! The SQL of [`LinkerStore`], written once and instantiated for SQLite and PostgreSQL. Both accept
//! `$n` placeholders and `RETURNING`; the backends differ in their migrations and in how a write
//! transaction starts (SQLite takes the write lock up front with `BEGIN IMMEDIATE`; PostgreSQL
//! serialises an org's writes on its row, which every write locks first to reserve an audit seq).

use async_trait::async_trait;
use sightline_runtime::sql::{self, Database, Tx};

use super::{
    AdminTokenRecord, AppLinkRecord, AuditDraft, AuditHead, AuditRecord, CredentialRecord,
    DetectionInputs, DomainRecord, FoundAdminToken, FoundCredential, InstanceFacts, InstanceRecord,
    KeyedAppend, LicenseRecord, LinkKeyRecord, LinkKeyRejection, LinkOutcome, LinkerStore, NewLink,
    NewSecret, OrgFacts, OrgRecord, StoreError, StoreResult,
};
use crate::audit::{self, Canonical};

mod audit_chain;
mod facts;
mod instances;

/// A LIKE pattern matching everything that starts with `prefix`, taken literally.
fn starts_with_pattern(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '\\' | '%' | '_') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Attributes as hashed: compact JSON, keys sorted (a BTreeMap serialises in key order).
fn attributes_json(draft: &AuditDraft) -> String {
    serde_json::to_string(&draft.attributes).unwrap_or_else(|_| "{}".to_owned())
}

/// linker-svc's store on either backend.
#[derive(Debug, Clone)]
pub struct SqlStore {
    db: Database,
}

impl SqlStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    async fn begin(&self) -> StoreResult<Tx> {
        Ok(self.db.begin().await?)
    }
}

/// Inserts or replaces an instance's metadata.
async fn upsert_facts(tx: &mut Tx, facts: &InstanceFacts) -> StoreResult<()> {
    sql::query(
        "INSERT INTO instance_facts (instance_id, org_id, base_url, product, version, license_sen,
            node_count)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (instance_id) DO UPDATE SET org_id = excluded.org_id, base_url =
         excluded.base_url,
         product = excluded.product, version = excluded.version, license_sen = excluded.license_sen,
         node_count = excluded.node_count",
    )
    .bind(&facts.instance_id)
    .bind(&facts.org_id)
    .bind(&facts.base_url)
    .bind(&facts.product)
    .bind(&facts.version)
    .bind(&facts.license_sen)
    .bind(facts.node_count)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn insert_app_link(tx: &mut Tx, org_id: &str, link: &AppLinkRecord) -> StoreResult<()> {
    sql::query(
        "INSERT INTO instance_app_links (instance_id, org_id, url, product_family, server_id,
            version)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&link.instance_id)
    .bind(org_id)
    .bind(&link.url)
    .bind(&link.product_family)
    .bind(&link.server_id)
    .bind(&link.version)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Locks the org's row and reserves the next audit seq; NotFound when the org does not exist.
async fn reserve_audit(tx: &mut Tx, org_id: &str) -> StoreResult<AuditHead> {
    let row: Option<(i64, Vec<u8>)> = sql::query(
        "UPDATE orgs SET audit_seq = audit_seq + 1 WHERE id = $1 RETURNING audit_seq, audit_head",
    )
    .bind(org_id)
    .fetch_optional(&mut *tx)
    .await?;
    let (seq, prev) = row.ok_or(StoreError::NotFound("org"))?;
    Ok(AuditHead { seq, hash: prev })
}

/// Whether `key` is in the org's log (with its entry) or fenced; None when it is neither.
async fn key_state(tx: &mut Tx, org_id: &str, key: &str) -> StoreResult<Option<KeyedAppend>> {
    let row: Option<(Option<i64>,)> =
        sql::query("SELECT seq FROM audit_keys WHERE org_id = $1 AND idempotency_key = $2")
            .bind(org_id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
    match row {
        None => Ok(None),
        Some((None,)) => Ok(Some(KeyedAppend::Fenced)),
        Some((Some(seq),)) => {
            let record: AuditRecord = sql::query(
                "SELECT org_id, seq, occurred_at, actor, service, action, target, attributes,
                    prev_hash, hash
                 FROM audit_events WHERE org_id = $1 AND seq = $2",
            )
            .bind(org_id)
            .bind(seq)
            .fetch_one(&mut *tx)
            .await?;
            Ok(Some(KeyedAppend::AlreadyAppended(record)))
        }
    }
}

/// Writes the reserved entry and moves the chain head to it.
async fn write_audit(
    tx: &mut Tx,
    org_id: &str,
    reserved: AuditHead,
    draft: &AuditDraft,
) -> StoreResult<AuditRecord> {
    // The entry is written last, just before the commit: refuse here, and nothing commits.
    if draft.deadline.is_some_and(|d| {
        d.saturating_duration_since(std::time::Instant::now()) < crate::store::COMMIT_MARGIN
    }) {
        return Err(StoreError::DeadlineExceeded);
    }
    let attributes = attributes_json(draft);
    let hash = audit::hash(Canonical {
        org_id,
        seq: reserved.seq,
        occurred_at: draft.at,
        actor: &draft.actor,
        service: &draft.service,
        action: &draft.action,
        target: &draft.target,
        attributes_json: &attributes,
        prev_hash: &reserved.hash,
    });
    sql::query(
        "INSERT INTO audit_events (org_id, seq, occurred_at, actor, service, action, target,
            attributes, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(org_id)
    .bind(reserved.seq)
    .bind(draft.at)
    .bind(&draft.actor)
    .bind(&draft.service)
    .bind(&draft.action)
    .bind(&draft.target)
    .bind(&attributes)
    .bind(&reserved.hash)
    .bind(hash.as_slice())
    .execute(&mut *tx)
    .await?;
    sql::query("UPDATE orgs SET audit_head = $1 WHERE id = $2")
        .bind(hash.as_slice())
        .bind(org_id)
        .execute(&mut *tx)
        .await?;
    if let Some(reply) = &draft.reply {
        // Answers past the retry window go as new ones are kept.
        sql::query("DELETE FROM idempotent_replies WHERE org_id = $1 AND created_at < $2")
            .bind(org_id)
            .bind(draft.at - sightline_runtime::idempotency::WINDOW_MS)
            .execute(&mut *tx)
            .await?;
        sql::query(
            "INSERT INTO idempotent_replies (org_id, method, request_key, sealed, created_at)
                VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(org_id)
        .bind(reply.method)
        .bind(&reply.request_key)
        .bind(&reply.sealed)
        .bind(draft.at)
        .execute(&mut *tx)
        .await?;
    }
    Ok(AuditRecord {
        org_id: org_id.to_owned(),
        seq: reserved.seq,
        occurred_at: draft.at,
        actor: draft.actor.clone(),
        service: draft.service.clone(),
        action: draft.action.clone(),
        target: draft.target.clone(),
        attributes,
        prev_hash: reserved.hash,
        hash: hash.to_vec(),
    })
}

#[async_trait]
impl LinkerStore for SqlStore {
    async fn create_org(
        &self,
        org: &OrgRecord,
        audit: AuditDraft,
        genesis: [u8; 32],
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sql::query(
            "INSERT INTO orgs (id, name, created_at, audit_seq, audit_head) VALUES ($1, $2,
            $3, 0, $4)",
        )
        .bind(&org.id)
        .bind(&org.name)
        .bind(org.created_at)
        .bind(genesis.as_slice())
        .execute(&mut tx)
        .await?;
        let reserved = reserve_audit(&mut tx, &org.id).await?;
        write_audit(&mut tx, &org.id, reserved, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_org(&self, org_id: &str) -> StoreResult<Option<OrgRecord>> {
        Ok(
            sql::query("SELECT id, name, created_at FROM orgs WHERE id = $1")
                .bind(org_id)
                .fetch_optional(&self.db)
                .await?,
        )
    }

    async fn list_orgs(&self, after_id: Option<&str>, limit: i64) -> StoreResult<Vec<OrgRecord>> {
        Ok(
            sql::query("SELECT id, name, created_at FROM orgs WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after_id.unwrap_or(""))
                .bind(limit)
                .fetch_all(&self.db)
                .await?,
        )
    }

    async fn insert_admin_token(
        &self,
        token: &NewSecret<AdminTokenRecord>,
        audit: AuditDraft,
    ) -> StoreResult<()> {
        let t = &token.record;
        let mut tx = self.begin().await?;
        let reserved = reserve_audit(&mut tx, &t.org_id).await?;
        sql::query(
            "INSERT INTO admin_tokens (id, org_id, label, prefix, digest, created_at) VALUES ($1,
                $2, $3, $4, $5, $6)",
        )
        .bind(&t.id)
        .bind(&t.org_id)
        .bind(&t.label)
        .bind(&t.prefix)
        .bind(token.digest.as_slice())
        .bind(t.created_at)
        .execute(&mut tx)
        .await?;
        write_audit(&mut tx, &t.org_id, reserved, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn revoke_admin_token(
        &self,
        org_id: &str,
        token_id: &str,
        audit: AuditDraft,
    ) -> StoreResult<AdminTokenRecord> {
        let mut tx = self.begin().await?;
        let reserved = reserve_audit(&mut tx, org_id).await?;
        let revoked: Option<AdminTokenRecord> = sql::query(
            "UPDATE admin_tokens SET revoked_at = COALESCE(revoked_at, $3) WHERE org_id = $1 AND
                id = $2
             RETURNING id, org_id, label, prefix, created_at, last_used_at, revoked_at",
        )
        .bind(org_id)
        .bind(token_id)
        .bind(audit.at)
        .fetch_optional(&mut tx)
        .await?;
        let revoked = revoked.ok_or(StoreError::NotFound("admin token"))?;
        write_audit(&mut tx, org_id, reserved, &audit).await?;
        tx.commit().await?;
        Ok(revoked)
    }

    async fn list_admin_tokens(
        &self,
        org_id: &str,
        after_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<AdminTokenRecord>> {
        Ok(sql::query(
            "SELECT id, org_id, label, prefix, created_at, last_used_at, revoked_at
             FROM admin_tokens WHERE org_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(org_id)
        .bind(after_id.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.db)
        .await?)
    }

    async fn find_admin_token(&self, digest: &[u8; 32]) -> StoreResult<Option<FoundAdminToken>> {
        let row: Option<(
            String,
            String,
            String,
            String,
            i64,
            Option<i64>,
            Option<i64>,
            Vec<u8>,
        )> = sql::query(
            "SELECT id, org_id, label, prefix, created_at, last_used_at, revoked_at, digest FROM
                admin_tokens WHERE digest = $1",
        )
        .bind(digest.as_slice())
        .fetch_optional(&self.db)
        .await?;
        Ok(row.map(
            |(id, org_id, label, prefix, created_at, last_used_at, revoked_at, digest)| {
                FoundAdminToken {
                    record: AdminTokenRecord {
                        id,
                        org_id,
                        label,
                        prefix,
                        created_at,
                        last_used_at,
                        revoked_at,
                    },
                    digest,
                }
            },
        ))
    }

    async fn touch_admin_token(&self, token_id: &str, at: i64) -> StoreResult<()> {
        sql::query("UPDATE admin_tokens SET last_used_at = $2 WHERE id = $1")
            .bind(token_id)
            .bind(at)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    async fn insert_link_key(
        &self,
        key: &NewSecret<LinkKeyRecord>,
        audit: AuditDraft,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let reserved = reserve_audit(&mut tx, &key.record.org_id).await?;
        insert_link_key(&mut tx, key).await?;
        write_audit(&mut tx, &key.record.org_id, reserved, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn regenerate_link_key(
        &self,
        org_id: &str,
        old_key_id: &str,
        new_key: &NewSecret<LinkKeyRecord>,
        audit: AuditDraft,
    ) -> StoreResult<LinkKeyRecord> {
        let mut tx = self.begin().await?;
        let reserved = reserve_audit(&mut tx, org_id).await?;
        let old: Option<LinkKeyRecord> = sql::query(
            "SELECT id, org_id, label, prefix, created_at, expires_at, last_used_at, revoked_at,
                replaces_key_id
             FROM link_keys WHERE org_id = $1 AND id = $2",
        )
        .bind(org_id)
        .bind(old_key_id)
        .fetch_optional(&mut tx)
        .await?;
        let old = old.ok_or(StoreError::NotFound("link key"))?;
        if old.revoked_at.is_some() {
            return Err(StoreError::Precondition(
                "link key is already revoked; regenerate its replacement instead",
            ));
        }
        let revoked: LinkKeyRecord = sql::query(
            "UPDATE link_keys SET revoked_at = $3 WHERE org_id = $1 AND id = $2
             RETURNING id, org_id, label, prefix, created_at, expires_at, last_used_at,
             revoked_at, replaces_key_id",
        )
        .bind(org_id)
        .bind(old_key_id)
        .bind(audit.at)
        .fetch_one(&mut tx)
        .await?;
        insert_link_key(&mut tx, new_key).await?;
        write_audit(&mut tx, org_id, reserved, &audit).await?;
        tx.commit().await?;
        Ok(revoked)
    }

    async fn list_link_keys(
        &self,
        org_id: &str,
        after_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<LinkKeyRecord>> {
        Ok(sql::query(
            "SELECT id, org_id, label, prefix, created_at, expires_at, last_used_at, revoked_at,
                replaces_key_id
             FROM link_keys WHERE org_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(org_id)
        .bind(after_id.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.db)
        .await?)
    }

    async fn link_instance(
        &self,
        key_digest: &[u8; 32],
        link: NewLink,
    ) -> StoreResult<LinkOutcome> {
        instances::link_instance(self, key_digest, link).await
    }

    async fn list_instances(
        &self,
        org_id: &str,
        after_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<InstanceRecord>> {
        instances::list_instances(self, org_id, after_id, limit).await
    }

    async fn get_instance(
        &self,
        org_id: &str,
        instance_id: &str,
    ) -> StoreResult<Option<InstanceRecord>> {
        instances::get_instance(self, org_id, instance_id).await
    }

    async fn credentials_of(&self, instance_ids: &[String]) -> StoreResult<Vec<CredentialRecord>> {
        facts::credentials_of(self, instance_ids).await
    }

    async fn put_instance_facts(
        &self,
        facts: &InstanceFacts,
        app_links: &[AppLinkRecord],
    ) -> StoreResult<()> {
        facts::put_instance_facts(self, facts, app_links).await
    }

    async fn instance_facts_of(&self, instance_ids: &[String]) -> StoreResult<Vec<InstanceFacts>> {
        facts::instance_facts_of(self, instance_ids).await
    }

    async fn org_facts(&self, org_id: &str) -> StoreResult<OrgFacts> {
        facts::org_facts(self, org_id).await
    }

    async fn import_facts(&self, org: &OrgFacts) -> StoreResult<()> {
        facts::import_facts(self, org).await
    }

    async fn delete_org_facts(&self, org_id: &str) -> StoreResult<u64> {
        facts::delete_org_facts(self, org_id).await
    }

    async fn forget_deleted(&self) -> StoreResult<()> {
        sightline_runtime::storage::Forget::forget_deleted(&self.db).await?;
        Ok(())
    }

    async fn app_links_of(&self, instance_ids: &[String]) -> StoreResult<Vec<AppLinkRecord>> {
        facts::app_links_of(self, instance_ids).await
    }

    async fn unlink_instance(
        &self,
        org_id: &str,
        instance_id: &str,
        audit: AuditDraft,
    ) -> StoreResult<InstanceRecord> {
        instances::unlink_instance(self, org_id, instance_id, audit).await
    }

    async fn find_credential(&self, digest: &[u8; 32]) -> StoreResult<Option<FoundCredential>> {
        instances::find_credential(self, digest).await
    }

    async fn touch_credential(&self, credential_id: &str, at: i64) -> StoreResult<()> {
        instances::touch_credential(self, credential_id, at).await
    }

    async fn revoke_credential(
        &self,
        org_id: &str,
        credential_id: &str,
        audit: AuditDraft,
    ) -> StoreResult<CredentialRecord> {
        instances::revoke_credential(self, org_id, credential_id, audit).await
    }

    async fn claim_domain(
        &self,
        claim: &DomainRecord,
        audit: AuditDraft,
    ) -> StoreResult<DomainRecord> {
        let mut tx = self.begin().await?;
        let reserved = reserve_audit(&mut tx, &claim.org_id).await?;
        let existing: Option<DomainRecord> = sql::query(
            "SELECT org_id, domain, token, claimed_at, verified_at FROM domains WHERE org_id = $1
                AND domain = $2",
        )
        .bind(&claim.org_id)
        .bind(&claim.domain)
        .fetch_optional(&mut tx)
        .await?;
        if let Some(existing) = existing {
            return Ok(existing);
        }
        sql::query(
            "INSERT INTO domains (org_id, domain, token, claimed_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&claim.org_id)
        .bind(&claim.domain)
        .bind(&claim.token)
        .bind(claim.claimed_at)
        .execute(&mut tx)
        .await?;
        write_audit(&mut tx, &claim.org_id, reserved, &audit).await?;
        tx.commit().await?;
        Ok(claim.clone())
    }

    async fn get_domain(&self, org_id: &str, domain: &str) -> StoreResult<Option<DomainRecord>> {
        Ok(sql::query(
            "SELECT org_id, domain, token, claimed_at, verified_at FROM domains WHERE org_id = $1
                AND domain = $2",
        )
        .bind(org_id)
        .bind(domain)
        .fetch_optional(&self.db)
        .await?)
    }

    async fn mark_domain_verified(
        &self,
        org_id: &str,
        domain: &str,
        audit: AuditDraft,
    ) -> StoreResult<DomainRecord> {
        let mut tx = self.begin().await?;
        let reserved = reserve_audit(&mut tx, org_id).await?;
        let verified: Option<DomainRecord> = sql::query(
            "UPDATE domains SET verified_at = COALESCE(verified_at, $3) WHERE org_id = $1 AND
                domain = $2
             RETURNING org_id, domain, token, claimed_at, verified_at",
        )
        .bind(org_id)
        .bind(domain)
        .bind(audit.at)
        .fetch_optional(&mut tx)
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::AlreadyExists(_) => {
                StoreError::AlreadyExists("verified claim of this domain by another org")
            }
            other => other,
        })?;
        let verified = verified.ok_or(StoreError::NotFound("domain claim"))?;
        write_audit(&mut tx, org_id, reserved, &audit).await?;
        tx.commit().await?;
        Ok(verified)
    }

    async fn import_licenses(
        &self,
        licenses: &[LicenseRecord],
        at: i64,
    ) -> StoreResult<(u32, u32)> {
        let mut tx = self.begin().await?;
        let (mut inserted, mut updated) = (0u32, 0u32);
        for license in licenses {
            let existed: Option<(String,)> = sql::query("SELECT sen FROM licenses WHERE sen = $1")
                .bind(&license.sen)
                .fetch_optional(&mut tx)
                .await?;
            if existed.is_some() {
                sql::query(
                    "UPDATE licenses SET product = $2, domain = $3, imported_at = $4 WHERE
                    sen = $1",
                )
                .bind(&license.sen)
                .bind(&license.product)
                .bind(&license.domain)
                .bind(at)
                .execute(&mut tx)
                .await?;
                updated += 1;
            } else {
                sql::query(
                    "INSERT INTO licenses (sen, product, domain, imported_at) VALUES ($1,
                    $2, $3, $4)",
                )
                .bind(&license.sen)
                .bind(&license.product)
                .bind(&license.domain)
                .bind(at)
                .execute(&mut tx)
                .await?;
                inserted += 1;
            }
        }
        tx.commit().await?;
        Ok((inserted, updated))
    }

    async fn detection_inputs(&self, org_id: &str) -> StoreResult<DetectionInputs> {
        instances::detection_inputs(self, org_id).await
    }

    async fn append_audit(&self, org_id: &str, audit: AuditDraft) -> StoreResult<AuditRecord> {
        audit_chain::append_audit(self, org_id, audit).await
    }

    async fn append_audit_keyed(
        &self,
        org_id: &str,
        audit: AuditDraft,
        key: &str,
    ) -> StoreResult<KeyedAppend> {
        audit_chain::append_audit_keyed(self, org_id, audit, key).await
    }

    async fn resolve_audit_key(
        &self,
        org_id: &str,
        key: &str,
        now: i64,
    ) -> StoreResult<KeyedAppend> {
        audit_chain::resolve_audit_key(self, org_id, key, now).await
    }

    async fn list_audit(
        &self,
        org_id: &str,
        after_seq: i64,
        limit: i64,
        action_prefix: &str,
    ) -> StoreResult<Vec<AuditRecord>> {
        audit_chain::list_audit(self, org_id, after_seq, limit, action_prefix).await
    }

    async fn replay(
        &self,
        org_id: &str,
        method: &str,
        request_key: &str,
        since: i64,
    ) -> StoreResult<Option<Vec<u8>>> {
        audit_chain::replay(self, org_id, method, request_key, since).await
    }

    async fn audit_head(&self, org_id: &str) -> StoreResult<Option<AuditHead>> {
        audit_chain::audit_head(self, org_id).await
    }
}

async fn insert_link_key(tx: &mut Tx, key: &NewSecret<LinkKeyRecord>) -> StoreResult<()> {
    let k = &key.record;
    sql::query(
        "INSERT INTO link_keys (id, org_id, label, prefix, digest, created_at, expires_at,
            replaces_key_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&k.id)
    .bind(&k.org_id)
    .bind(&k.label)
    .bind(&k.prefix)
    .bind(key.digest.as_slice())
    .bind(k.created_at)
    .bind(k.expires_at)
    .bind(&k.replaces_key_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
