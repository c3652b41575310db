//! The SQL of [`LinkerStore`], written once and instantiated for SQLite and PostgreSQL. Both accept
//! `$n` placeholders and `RETURNING`; the backends differ in their migrations and in how a write
//! transaction starts (SQLite takes the write lock up front with `BEGIN IMMEDIATE`; PostgreSQL
//! serialises an org's writes on its row, which every write locks first to reserve an audit seq).

use async_trait::async_trait;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;

use super::{
    AdminTokenRecord, AppLinkRecord, AuditDraft, AuditHead, AuditRecord, CredentialRecord,
    DetectionInputs, DomainRecord, FoundAdminToken, FoundCredential, InstanceFacts, InstanceRecord,
    KeyedAppend, LicenseRecord, LinkKeyRecord, LinkKeyRejection, LinkOutcome, LinkerStore, NewLink,
    NewSecret, OrgFacts, OrgRecord, StoreError, StoreResult,
};
use crate::audit::{self, Canonical};

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

/// Ids one `IN (…)` list holds at most.
const IN_CHUNK: usize = 500;

macro_rules! sql_store {
    ($store:ident, $pool:ty, $db:ty, $begin:literal) => {
        #[derive(Debug, Clone)]
        pub struct $store {
            pool: $pool,
        }

        impl $store {
            pub fn new(pool: $pool) -> Self {
                Self { pool }
            }

            async fn begin(&self) -> StoreResult<sqlx::Transaction<'static, <$pool as PoolDb>::Db>> {
                Ok(self.pool.begin_with($begin).await?)
            }
        }

        /// Inserts or replaces an instance's metadata.
        async fn upsert_facts(
            tx: &mut sqlx::Transaction<'static, <$pool as PoolDb>::Db>,
            facts: &InstanceFacts,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO instance_facts (instance_id, org_id, base_url, product, version, license_sen, node_count)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (instance_id) DO UPDATE SET org_id = excluded.org_id, base_url = excluded.base_url,
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
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        async fn insert_app_link(
            tx: &mut sqlx::Transaction<'static, <$pool as PoolDb>::Db>,
            org_id: &str,
            link: &AppLinkRecord,
        ) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO instance_app_links (instance_id, org_id, url, product_family, server_id, version)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&link.instance_id)
            .bind(org_id)
            .bind(&link.url)
            .bind(&link.product_family)
            .bind(&link.server_id)
            .bind(&link.version)
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        /// Locks the org's row and reserves the next audit seq; NotFound when the org does not exist.
        async fn reserve_audit(
            tx: &mut sqlx::Transaction<'static, <$pool as PoolDb>::Db>,
            org_id: &str,
        ) -> StoreResult<AuditHead> {
            let row: Option<(i64, Vec<u8>)> = sqlx::query_as(
                "UPDATE orgs SET audit_seq = audit_seq + 1 WHERE id = $1 RETURNING audit_seq, audit_head",
            )
            .bind(org_id)
            .fetch_optional(&mut **tx)
            .await?;
            let (seq, prev) = row.ok_or(StoreError::NotFound("org"))?;
            Ok(AuditHead { seq, hash: prev })
        }

        /// Whether `key` is in the org's log (with its entry) or fenced; None when it is neither.
        async fn key_state(
            tx: &mut sqlx::Transaction<'static, <$pool as PoolDb>::Db>,
            org_id: &str,
            key: &str,
        ) -> StoreResult<Option<KeyedAppend>> {
            let row: Option<(Option<i64>,)> = sqlx::query_as(
                "SELECT seq FROM audit_keys WHERE org_id = $1 AND idempotency_key = $2",
            )
            .bind(org_id)
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?;
            match row {
                None => Ok(None),
                Some((None,)) => Ok(Some(KeyedAppend::Fenced)),
                Some((Some(seq),)) => {
                    let record: AuditRecord = sqlx::query_as(
                        "SELECT org_id, seq, occurred_at, actor, service, action, target, attributes, prev_hash, hash
                         FROM audit_events WHERE org_id = $1 AND seq = $2",
                    )
                    .bind(org_id)
                    .bind(seq)
                    .fetch_one(&mut **tx)
                    .await?;
                    Ok(Some(KeyedAppend::AlreadyAppended(record)))
                }
            }
        }

        /// Writes the reserved entry and moves the chain head to it.
        async fn write_audit(
            tx: &mut sqlx::Transaction<'static, <$pool as PoolDb>::Db>,
            org_id: &str,
            reserved: AuditHead,
            draft: &AuditDraft,
        ) -> StoreResult<AuditRecord> {
            // The entry is written last, just before the commit: refuse here, and nothing commits.
            if draft
                .deadline
                .is_some_and(|d| d.saturating_duration_since(std::time::Instant::now()) < crate::store::COMMIT_MARGIN)
            {
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
            sqlx::query(
                "INSERT INTO audit_events (org_id, seq, occurred_at, actor, service, action, target, attributes, prev_hash, hash)
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
            .execute(&mut **tx)
            .await?;
            sqlx::query("UPDATE orgs SET audit_head = $1 WHERE id = $2")
                .bind(hash.as_slice())
                .bind(org_id)
                .execute(&mut **tx)
                .await?;
            if let Some(reply) = &draft.reply {
                // Answers past the retry window go as new ones are kept.
                sqlx::query("DELETE FROM idempotent_replies WHERE org_id = $1 AND created_at < $2")
                    .bind(org_id)
                    .bind(draft.at - sightline_runtime::idempotency::WINDOW_MS)
                    .execute(&mut **tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO idempotent_replies (org_id, method, request_key, sealed, created_at) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(org_id)
                .bind(reply.method)
                .bind(&reply.request_key)
                .bind(&reply.sealed)
                .bind(draft.at)
                .execute(&mut **tx)
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
        impl LinkerStore for $store {
            async fn create_org(&self, org: &OrgRecord, audit: AuditDraft, genesis: [u8; 32]) -> StoreResult<()> {
                let mut tx = self.begin().await?;
                sqlx::query("INSERT INTO orgs (id, name, created_at, audit_seq, audit_head) VALUES ($1, $2, $3, 0, $4)")
                    .bind(&org.id)
                    .bind(&org.name)
                    .bind(org.created_at)
                    .bind(genesis.as_slice())
                    .execute(&mut *tx)
                    .await?;
                let reserved = reserve_audit(&mut tx, &org.id).await?;
                write_audit(&mut tx, &org.id, reserved, &audit).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn get_org(&self, org_id: &str) -> StoreResult<Option<OrgRecord>> {
                Ok(sqlx::query_as("SELECT id, name, created_at FROM orgs WHERE id = $1")
                    .bind(org_id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn insert_admin_token(&self, token: &NewSecret<AdminTokenRecord>, audit: AuditDraft) -> StoreResult<()> {
                let t = &token.record;
                let mut tx = self.begin().await?;
                let reserved = reserve_audit(&mut tx, &t.org_id).await?;
                sqlx::query(
                    "INSERT INTO admin_tokens (id, org_id, label, prefix, digest, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&t.id)
                .bind(&t.org_id)
                .bind(&t.label)
                .bind(&t.prefix)
                .bind(token.digest.as_slice())
                .bind(t.created_at)
                .execute(&mut *tx)
                .await?;
                write_audit(&mut tx, &t.org_id, reserved, &audit).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn revoke_admin_token(&self, org_id: &str, token_id: &str, audit: AuditDraft) -> StoreResult<AdminTokenRecord> {
                let mut tx = self.begin().await?;
                let reserved = reserve_audit(&mut tx, org_id).await?;
                let revoked: Option<AdminTokenRecord> = sqlx::query_as(
                    "UPDATE admin_tokens SET revoked_at = COALESCE(revoked_at, $3) WHERE org_id = $1 AND id = $2
                     RETURNING id, org_id, label, prefix, created_at, last_used_at, revoked_at",
                )
                .bind(org_id)
                .bind(token_id)
                .bind(audit.at)
                .fetch_optional(&mut *tx)
                .await?;
                let revoked = revoked.ok_or(StoreError::NotFound("admin token"))?;
                write_audit(&mut tx, org_id, reserved, &audit).await?;
                tx.commit().await?;
                Ok(revoked)
            }

            async fn find_admin_token(&self, digest: &[u8; 32]) -> StoreResult<Option<FoundAdminToken>> {
                let row: Option<(String, String, String, String, i64, Option<i64>, Option<i64>, Vec<u8>)> = sqlx::query_as(
                    "SELECT id, org_id, label, prefix, created_at, last_used_at, revoked_at, digest FROM admin_tokens WHERE digest = $1",
                )
                .bind(digest.as_slice())
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|(id, org_id, label, prefix, created_at, last_used_at, revoked_at, digest)| FoundAdminToken {
                    record: AdminTokenRecord { id, org_id, label, prefix, created_at, last_used_at, revoked_at },
                    digest,
                }))
            }

            async fn touch_admin_token(&self, token_id: &str, at: i64) -> StoreResult<()> {
                sqlx::query("UPDATE admin_tokens SET last_used_at = $2 WHERE id = $1")
                    .bind(token_id)
                    .bind(at)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn insert_link_key(&self, key: &NewSecret<LinkKeyRecord>, audit: AuditDraft) -> StoreResult<()> {
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
                let old: Option<LinkKeyRecord> = sqlx::query_as(
                    "SELECT id, org_id, label, prefix, created_at, expires_at, last_used_at, revoked_at, replaces_key_id
                     FROM link_keys WHERE org_id = $1 AND id = $2",
                )
                .bind(org_id)
                .bind(old_key_id)
                .fetch_optional(&mut *tx)
                .await?;
                let old = old.ok_or(StoreError::NotFound("link key"))?;
                if old.revoked_at.is_some() {
                    return Err(StoreError::Precondition("link key is already revoked; regenerate its replacement instead"));
                }
                let revoked: LinkKeyRecord = sqlx::query_as(
                    "UPDATE link_keys SET revoked_at = $3 WHERE org_id = $1 AND id = $2
                     RETURNING id, org_id, label, prefix, created_at, expires_at, last_used_at, revoked_at, replaces_key_id",
                )
                .bind(org_id)
                .bind(old_key_id)
                .bind(audit.at)
                .fetch_one(&mut *tx)
                .await?;
                insert_link_key(&mut tx, new_key).await?;
                write_audit(&mut tx, org_id, reserved, &audit).await?;
                tx.commit().await?;
                Ok(revoked)
            }

            async fn list_link_keys(&self, org_id: &str, after_id: Option<&str>, limit: i64) -> StoreResult<Vec<LinkKeyRecord>> {
                Ok(sqlx::query_as(
                    "SELECT id, org_id, label, prefix, created_at, expires_at, last_used_at, revoked_at, replaces_key_id
                     FROM link_keys WHERE org_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                )
                .bind(org_id)
                .bind(after_id.unwrap_or(""))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn link_instance(&self, key_digest: &[u8; 32], link: NewLink) -> StoreResult<LinkOutcome> {
                let now = link.instance.linked_at;
                let key: Option<(String, String, i64, Option<i64>, Vec<u8>)> = sqlx::query_as(
                    "SELECT id, org_id, expires_at, revoked_at, digest FROM link_keys WHERE digest = $1",
                )
                .bind(key_digest.as_slice())
                .fetch_optional(&self.pool)
                .await?;
                let (key_id, org_id, expires_at, revoked_at, stored) =
                    key.ok_or(StoreError::LinkKeyRejected(LinkKeyRejection::Unknown))?;
                if !sightline_runtime::token::digests_equal(&stored, key_digest) {
                    return Err(StoreError::LinkKeyRejected(LinkKeyRejection::Unknown));
                }
                if revoked_at.is_some() {
                    return Err(StoreError::LinkKeyRejected(LinkKeyRejection::Revoked));
                }
                if now >= expires_at {
                    return Err(StoreError::LinkKeyRejected(LinkKeyRejection::Expired));
                }

                let mut tx = self.begin().await?;
                let reserved = reserve_audit(&mut tx, &org_id).await?;
                // Re-check under the lock: the key may have been revoked meanwhile.
                let still_valid: Option<(String,)> = sqlx::query_as(
                    "SELECT id FROM link_keys WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(&key_id)
                .fetch_optional(&mut *tx)
                .await?;
                if still_valid.is_none() {
                    return Err(StoreError::LinkKeyRejected(LinkKeyRejection::Revoked));
                }
                sqlx::query("UPDATE link_keys SET last_used_at = $2 WHERE id = $1")
                    .bind(&key_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;

                let existing: Option<InstanceRecord> = sqlx::query_as(
                    "SELECT id, org_id, server_id, base_url, product, version, license_sen, node_count, link_key_id, linked_at, unlinked_at
                     FROM instances WHERE org_id = $1 AND server_id = $2 AND unlinked_at IS NULL",
                )
                .bind(&org_id)
                .bind(&link.instance.server_id)
                .fetch_optional(&mut *tx)
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
                    sqlx::query("UPDATE instances SET link_key_id = $2 WHERE id = $1")
                        .bind(&instance.id)
                        .bind(&instance.link_key_id)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("UPDATE credentials SET revoked_at = $2 WHERE instance_id = $1 AND revoked_at IS NULL")
                        .bind(&instance.id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                } else {
                    sqlx::query(
                        "INSERT INTO instances (id, org_id, server_id, base_url, product, version, license_sen, node_count, link_key_id, linked_at)
                         VALUES ($1, $2, $3, '', '', '', '', 0, $4, $5)",
                    )
                    .bind(&instance.id)
                    .bind(&instance.org_id)
                    .bind(&instance.server_id)
                    .bind(&instance.link_key_id)
                    .bind(instance.linked_at)
                    .execute(&mut *tx)
                    .await?;
                }
                let mut credential = link.credential.record;
                credential.org_id.clone_from(&org_id);
                credential.instance_id.clone_from(&instance.id);
                sqlx::query(
                    "INSERT INTO credentials (id, org_id, instance_id, prefix, digest, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&credential.id)
                .bind(&credential.org_id)
                .bind(&credential.instance_id)
                .bind(&credential.prefix)
                .bind(link.credential.digest.as_slice())
                .bind(credential.created_at)
                .execute(&mut *tx)
                .await?;
                let draft = AuditDraft::new(now, format!("link_key:{key_id}"), "instance.linked", instance.id.clone())
                    .with("link_key_id", key_id.clone())
                    .with("credential_id", credential.id.clone())
                    .with("server_id", instance.server_id.clone())
                    .with("relinked", relinked.to_string());
                write_audit(&mut tx, &org_id, reserved, &draft).await?;
                tx.commit().await?;
                Ok(LinkOutcome { instance, credential, relinked, link_key_expires_at: expires_at })
            }

            async fn list_instances(&self, org_id: &str, after_id: Option<&str>, limit: i64) -> StoreResult<Vec<InstanceRecord>> {
                Ok(sqlx::query_as(
                    "SELECT id, org_id, server_id, base_url, product, version, license_sen, node_count, link_key_id, linked_at, unlinked_at
                     FROM instances WHERE org_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                )
                .bind(org_id)
                .bind(after_id.unwrap_or(""))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn get_instance(&self, org_id: &str, instance_id: &str) -> StoreResult<Option<InstanceRecord>> {
                Ok(sqlx::query_as(
                    "SELECT id, org_id, server_id, base_url, product, version, license_sen, node_count, link_key_id, linked_at, unlinked_at
                     FROM instances WHERE org_id = $1 AND id = $2",
                )
                .bind(org_id)
                .bind(instance_id)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn credentials_of(&self, instance_ids: &[String]) -> StoreResult<Vec<CredentialRecord>> {
                // One query per page of instances, not one per instance.
                let mut all = Vec::new();
                for chunk in instance_ids.chunks(IN_CHUNK) {
                    let mut query = sqlx::QueryBuilder::<$db>::new(
                        "SELECT id, org_id, instance_id, prefix, created_at, last_used_at, revoked_at
                         FROM credentials WHERE instance_id IN (",
                    );
                    let mut ids = query.separated(", ");
                    for id in chunk {
                        ids.push_bind(id);
                    }
                    query.push(") ORDER BY instance_id, id");
                    all.extend(query.build_query_as::<CredentialRecord>().fetch_all(&self.pool).await?);
                }
                Ok(all)
            }

            async fn put_instance_facts(&self, facts: &InstanceFacts, app_links: &[AppLinkRecord]) -> StoreResult<()> {
                let mut tx = self.begin().await?;
                upsert_facts(&mut tx, facts).await?;
                sqlx::query("DELETE FROM instance_app_links WHERE instance_id = $1")
                    .bind(&facts.instance_id)
                    .execute(&mut *tx)
                    .await?;
                for link in app_links {
                    insert_app_link(&mut tx, &facts.org_id, link).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn instance_facts_of(&self, instance_ids: &[String]) -> StoreResult<Vec<InstanceFacts>> {
                let mut all = Vec::new();
                for chunk in instance_ids.chunks(IN_CHUNK) {
                    let mut query = sqlx::QueryBuilder::<$db>::new(
                        "SELECT instance_id, org_id, base_url, product, version, license_sen, node_count
                         FROM instance_facts WHERE instance_id IN (",
                    );
                    let mut ids = query.separated(", ");
                    for id in chunk {
                        ids.push_bind(id);
                    }
                    query.push(") ORDER BY instance_id");
                    all.extend(query.build_query_as::<InstanceFacts>().fetch_all(&self.pool).await?);
                }
                Ok(all)
            }

            async fn org_facts(&self, org_id: &str) -> StoreResult<OrgFacts> {
                let facts = sqlx::query_as(
                    "SELECT instance_id, org_id, base_url, product, version, license_sen, node_count
                     FROM instance_facts WHERE org_id = $1 ORDER BY instance_id",
                )
                .bind(org_id)
                .fetch_all(&self.pool)
                .await?;
                let app_links = sqlx::query_as(
                    "SELECT instance_id, url, product_family, server_id, version
                     FROM instance_app_links WHERE org_id = $1 ORDER BY instance_id, url",
                )
                .bind(org_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(OrgFacts { facts, app_links })
            }

            async fn import_facts(&self, org: &OrgFacts) -> StoreResult<()> {
                let mut tx = self.begin().await?;
                for facts in &org.facts {
                    upsert_facts(&mut tx, facts).await?;
                }
                for link in &org.app_links {
                    let Some(owner) = org.facts.iter().find(|f| f.instance_id == link.instance_id) else {
                        continue;
                    };
                    sqlx::query("DELETE FROM instance_app_links WHERE instance_id = $1 AND url = $2")
                        .bind(&link.instance_id)
                        .bind(&link.url)
                        .execute(&mut *tx)
                        .await?;
                    insert_app_link(&mut tx, &owner.org_id, link).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn delete_org_facts(&self, org_id: &str) -> StoreResult<u64> {
                let mut tx = self.begin().await?;
                let links = sqlx::query("DELETE FROM instance_app_links WHERE org_id = $1")
                    .bind(org_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                let facts = sqlx::query("DELETE FROM instance_facts WHERE org_id = $1")
                    .bind(org_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(links + facts)
            }

            async fn forget_deleted(&self) -> StoreResult<()> {
                sightline_runtime::storage::Forget::forget_deleted(&self.pool).await?;
                Ok(())
            }

            async fn app_links_of(&self, instance_ids: &[String]) -> StoreResult<Vec<AppLinkRecord>> {
                let mut all = Vec::new();
                for chunk in instance_ids.chunks(IN_CHUNK) {
                    let mut query = sqlx::QueryBuilder::<$db>::new(
                        "SELECT instance_id, url, product_family, server_id, version FROM instance_app_links WHERE instance_id IN (",
                    );
                    let mut ids = query.separated(", ");
                    for id in chunk {
                        ids.push_bind(id);
                    }
                    query.push(") ORDER BY instance_id, url");
                    all.extend(query.build_query_as::<AppLinkRecord>().fetch_all(&self.pool).await?);
                }
                Ok(all)
            }

            async fn unlink_instance(&self, org_id: &str, instance_id: &str, audit: AuditDraft) -> StoreResult<InstanceRecord> {
                let mut tx = self.begin().await?;
                let reserved = reserve_audit(&mut tx, org_id).await?;
                let instance: Option<InstanceRecord> = sqlx::query_as(
                    "UPDATE instances SET unlinked_at = COALESCE(unlinked_at, $3) WHERE org_id = $1 AND id = $2
                     RETURNING id, org_id, server_id, base_url, product, version, license_sen, node_count, link_key_id, linked_at, unlinked_at",
                )
                .bind(org_id)
                .bind(instance_id)
                .bind(audit.at)
                .fetch_optional(&mut *tx)
                .await?;
                let instance = instance.ok_or(StoreError::NotFound("instance"))?;
                sqlx::query("UPDATE credentials SET revoked_at = $2 WHERE instance_id = $1 AND revoked_at IS NULL")
                    .bind(instance_id)
                    .bind(audit.at)
                    .execute(&mut *tx)
                    .await?;
                write_audit(&mut tx, org_id, reserved, &audit).await?;
                tx.commit().await?;
                Ok(instance)
            }

            async fn find_credential(&self, digest: &[u8; 32]) -> StoreResult<Option<FoundCredential>> {
                let row: Option<(String, String, String, String, i64, Option<i64>, Option<i64>, Vec<u8>, Option<i64>)> = sqlx::query_as(
                    "SELECT c.id, c.org_id, c.instance_id, c.prefix, c.created_at, c.last_used_at, c.revoked_at, c.digest, i.unlinked_at
                     FROM credentials c JOIN instances i ON i.id = c.instance_id WHERE c.digest = $1",
                )
                .bind(digest.as_slice())
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|(id, org_id, instance_id, prefix, created_at, last_used_at, revoked_at, digest, unlinked_at)| {
                    FoundCredential {
                        record: CredentialRecord { id, org_id, instance_id, prefix, created_at, last_used_at, revoked_at },
                        digest,
                        instance_unlinked: unlinked_at.is_some(),
                    }
                }))
            }

            async fn touch_credential(&self, credential_id: &str, at: i64) -> StoreResult<()> {
                sqlx::query("UPDATE credentials SET last_used_at = $2 WHERE id = $1")
                    .bind(credential_id)
                    .bind(at)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn revoke_credential(&self, org_id: &str, credential_id: &str, audit: AuditDraft) -> StoreResult<CredentialRecord> {
                let mut tx = self.begin().await?;
                let reserved = reserve_audit(&mut tx, org_id).await?;
                let revoked: Option<CredentialRecord> = sqlx::query_as(
                    "UPDATE credentials SET revoked_at = COALESCE(revoked_at, $3) WHERE org_id = $1 AND id = $2
                     RETURNING id, org_id, instance_id, prefix, created_at, last_used_at, revoked_at",
                )
                .bind(org_id)
                .bind(credential_id)
                .bind(audit.at)
                .fetch_optional(&mut *tx)
                .await?;
                let revoked = revoked.ok_or(StoreError::NotFound("credential"))?;
                write_audit(&mut tx, org_id, reserved, &audit).await?;
                tx.commit().await?;
                Ok(revoked)
            }

            async fn claim_domain(&self, claim: &DomainRecord, audit: AuditDraft) -> StoreResult<DomainRecord> {
                let mut tx = self.begin().await?;
                let reserved = reserve_audit(&mut tx, &claim.org_id).await?;
                let existing: Option<DomainRecord> = sqlx::query_as(
                    "SELECT org_id, domain, token, claimed_at, verified_at FROM domains WHERE org_id = $1 AND domain = $2",
                )
                .bind(&claim.org_id)
                .bind(&claim.domain)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(existing) = existing {
                    return Ok(existing);
                }
                sqlx::query("INSERT INTO domains (org_id, domain, token, claimed_at) VALUES ($1, $2, $3, $4)")
                    .bind(&claim.org_id)
                    .bind(&claim.domain)
                    .bind(&claim.token)
                    .bind(claim.claimed_at)
                    .execute(&mut *tx)
                    .await?;
                write_audit(&mut tx, &claim.org_id, reserved, &audit).await?;
                tx.commit().await?;
                Ok(claim.clone())
            }

            async fn get_domain(&self, org_id: &str, domain: &str) -> StoreResult<Option<DomainRecord>> {
                Ok(sqlx::query_as(
                    "SELECT org_id, domain, token, claimed_at, verified_at FROM domains WHERE org_id = $1 AND domain = $2",
                )
                .bind(org_id)
                .bind(domain)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn mark_domain_verified(&self, org_id: &str, domain: &str, audit: AuditDraft) -> StoreResult<DomainRecord> {
                let mut tx = self.begin().await?;
                let reserved = reserve_audit(&mut tx, org_id).await?;
                let verified: Option<DomainRecord> = sqlx::query_as(
                    "UPDATE domains SET verified_at = COALESCE(verified_at, $3) WHERE org_id = $1 AND domain = $2
                     RETURNING org_id, domain, token, claimed_at, verified_at",
                )
                .bind(org_id)
                .bind(domain)
                .bind(audit.at)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| match StoreError::from(e) {
                    StoreError::AlreadyExists(_) => StoreError::AlreadyExists("verified claim of this domain by another org"),
                    other => other,
                })?;
                let verified = verified.ok_or(StoreError::NotFound("domain claim"))?;
                write_audit(&mut tx, org_id, reserved, &audit).await?;
                tx.commit().await?;
                Ok(verified)
            }

            async fn import_licenses(&self, licenses: &[LicenseRecord], at: i64) -> StoreResult<(u32, u32)> {
                let mut tx = self.begin().await?;
                let (mut inserted, mut updated) = (0u32, 0u32);
                for license in licenses {
                    let existed: Option<(String,)> = sqlx::query_as("SELECT sen FROM licenses WHERE sen = $1")
                        .bind(&license.sen)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if existed.is_some() {
                        sqlx::query("UPDATE licenses SET product = $2, domain = $3, imported_at = $4 WHERE sen = $1")
                            .bind(&license.sen)
                            .bind(&license.product)
                            .bind(&license.domain)
                            .bind(at)
                            .execute(&mut *tx)
                            .await?;
                        updated += 1;
                    } else {
                        sqlx::query("INSERT INTO licenses (sen, product, domain, imported_at) VALUES ($1, $2, $3, $4)")
                            .bind(&license.sen)
                            .bind(&license.product)
                            .bind(&license.domain)
                            .bind(at)
                            .execute(&mut *tx)
                            .await?;
                        inserted += 1;
                    }
                }
                tx.commit().await?;
                Ok((inserted, updated))
            }

            async fn detection_inputs(&self, org_id: &str) -> StoreResult<DetectionInputs> {
                let verified_domains: Vec<(String,)> = sqlx::query_as(
                    "SELECT domain FROM domains WHERE org_id = $1 AND verified_at IS NOT NULL ORDER BY domain",
                )
                .bind(org_id)
                .fetch_all(&self.pool)
                .await?;
                let verified_domains: Vec<String> = verified_domains.into_iter().map(|(d,)| d).collect();
                let mut licenses = Vec::new();
                for domain in &verified_domains {
                    let mut some: Vec<LicenseRecord> = sqlx::query_as(
                        "SELECT sen, product, domain FROM licenses WHERE domain = $1 OR domain LIKE $2 ORDER BY sen",
                    )
                    .bind(domain)
                    .bind(format!("%.{domain}"))
                    .fetch_all(&self.pool)
                    .await?;
                    licenses.append(&mut some);
                }
                let linked_instances: Vec<InstanceRecord> = sqlx::query_as(
                    "SELECT id, org_id, server_id, base_url, product, version, license_sen, node_count, link_key_id, linked_at, unlinked_at
                     FROM instances WHERE org_id = $1 AND unlinked_at IS NULL ORDER BY id",
                )
                .bind(org_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(DetectionInputs { verified_domains, licenses, linked_instances, app_links: Vec::new() })
            }

            async fn append_audit(&self, org_id: &str, audit: AuditDraft) -> StoreResult<AuditRecord> {
                let mut tx = self.begin().await?;
                let reserved = reserve_audit(&mut tx, org_id).await?;
                let record = write_audit(&mut tx, org_id, reserved, &audit).await?;
                tx.commit().await?;
                Ok(record)
            }

            async fn append_audit_keyed(&self, org_id: &str, audit: AuditDraft, key: &str) -> StoreResult<KeyedAppend> {
                let mut tx = self.begin().await?;
                // Reserving locks the org's chain, so the key is checked with no append racing it.
                let reserved = reserve_audit(&mut tx, org_id).await?;
                if let Some(known) = key_state(&mut tx, org_id, key).await? {
                    // Dropping the transaction gives the reserved seq back.
                    return Ok(known);
                }
                let record = write_audit(&mut tx, org_id, reserved, &audit).await?;
                sqlx::query("INSERT INTO audit_keys (org_id, idempotency_key, seq, fenced_at) VALUES ($1, $2, $3, NULL)")
                    .bind(org_id)
                    .bind(key)
                    .bind(record.seq)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(KeyedAppend::Appended(record))
            }

            async fn resolve_audit_key(&self, org_id: &str, key: &str, now: i64) -> StoreResult<KeyedAppend> {
                let mut tx = self.begin().await?;
                let locked = sqlx::query("UPDATE orgs SET audit_seq = audit_seq WHERE id = $1")
                    .bind(org_id)
                    .execute(&mut *tx)
                    .await?;
                if locked.rows_affected() == 0 {
                    return Err(StoreError::NotFound("org"));
                }
                if let Some(known) = key_state(&mut tx, org_id, key).await? {
                    return Ok(known);
                }
                sqlx::query("INSERT INTO audit_keys (org_id, idempotency_key, seq, fenced_at) VALUES ($1, $2, NULL, $3)")
                    .bind(org_id)
                    .bind(key)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(KeyedAppend::Fenced)
            }

            async fn list_audit(&self, org_id: &str, after_seq: i64, limit: i64, action_prefix: &str) -> StoreResult<Vec<AuditRecord>> {
                Ok(sqlx::query_as(
                    "SELECT org_id, seq, occurred_at, actor, service, action, target, attributes, prev_hash, hash
                     FROM audit_events WHERE org_id = $1 AND seq > $2 AND action LIKE $4 ESCAPE '\\' ORDER BY seq LIMIT $3",
                )
                .bind(org_id)
                .bind(after_seq)
                .bind(limit)
                .bind(starts_with_pattern(action_prefix))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn replay(&self, org_id: &str, method: &str, request_key: &str, since: i64) -> StoreResult<Option<Vec<u8>>> {
                let row: Option<(Vec<u8>,)> = sqlx::query_as(
                    "SELECT sealed FROM idempotent_replies WHERE org_id = $1 AND method = $2 AND request_key = $3 AND created_at >= $4",
                )
                .bind(org_id)
                .bind(method)
                .bind(request_key)
                .bind(since)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|(sealed,)| sealed))
            }

            async fn audit_head(&self, org_id: &str) -> StoreResult<Option<AuditHead>> {
                let row: Option<(i64, Vec<u8>)> = sqlx::query_as("SELECT audit_seq, audit_head FROM orgs WHERE id = $1")
                    .bind(org_id)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map(|(seq, hash)| AuditHead { seq, hash }))
            }
        }

        async fn insert_link_key(
            tx: &mut sqlx::Transaction<'static, <$pool as PoolDb>::Db>,
            key: &NewSecret<LinkKeyRecord>,
        ) -> StoreResult<()> {
            let k = &key.record;
            sqlx::query(
                "INSERT INTO link_keys (id, org_id, label, prefix, digest, created_at, expires_at, replaces_key_id)
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
            .execute(&mut **tx)
            .await?;
            Ok(())
        }
    };
}

/// Names the database type behind a pool, for the macro.
pub(crate) trait PoolDb {
    type Db: sqlx::Database;
}

impl PoolDb for SqlitePool {
    type Db = sqlx::Sqlite;
}

impl PoolDb for PgPool {
    type Db = sqlx::Postgres;
}

mod sqlite {
    use super::*;
    sql_store!(SqliteStore, SqlitePool, sqlx::Sqlite, "BEGIN IMMEDIATE");
}

mod postgres {
    use super::*;
    sql_store!(PgStore, PgPool, sqlx::Postgres, "BEGIN");
}

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
