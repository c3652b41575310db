//! The store conformance suite: every test is written once and runs against SQLite and PostgreSQL.

use std::sync::Arc;

use sightline_runtime::storage::{self, Database};
use sightline_runtime::token;

use super::*;
use crate::audit::{ChainCheck, ChainVerifier, GENESIS};
use crate::domain::{LINK_KEY_VALIDITY_MS, new_id};

/// A store and a raw handle on the same database, for tampering the way an attacker with database
/// access could.
struct Harness {
    store: Arc<dyn LinkerStore>,
    db: Database,
}

impl Harness {
    async fn sqlite() -> (Self, tempfile::TempDir) {
        let dir = sightline_runtime::testing::private_tempdir().unwrap();
        let url = storage::default_sqlite_url(dir.path(), "linker");
        (Self::open(&url).await, dir)
    }

    async fn postgres() -> (Self, ()) {
        let url = sightline_runtime::testing::fresh_postgres_url()
            .await
            .unwrap();
        (Self::open(&url).await, ())
    }

    async fn open(url: &str) -> Self {
        let db = storage::connect(url, MIGRATIONS).await.unwrap();
        let store: Arc<dyn LinkerStore> = Arc::new(SqlStore::new(db.clone()));
        Self { store, db }
    }

    async fn exec(&self, sqlite: &'static str, postgres: &'static str) {
        match &self.db {
            Database::Sqlite(db) => sqlx::query(sqlite).execute(&db.pool).await.map(drop),
            Database::Postgres(pool) => sqlx::query(postgres).execute(pool).await.map(drop),
        }
        .unwrap();
    }

    async fn count(&self, table_query: &'static str) -> i64 {
        match &self.db {
            Database::Sqlite(db) => sqlx::query_scalar(table_query).fetch_one(&db.pool).await,
            Database::Postgres(pool) => sqlx::query_scalar(table_query).fetch_one(pool).await,
        }
        .unwrap()
    }

    async fn org(&self, at: i64) -> String {
        let org = OrgRecord {
            id: new_id(),
            name: "Acme".into(),
            created_at: at,
        };
        self.store
            .create_org(
                &org,
                AuditDraft::new(at, "operator", "org.created", org.id.clone()),
                GENESIS,
            )
            .await
            .unwrap();
        org.id
    }

    async fn key(&self, org_id: &str, at: i64) -> (String, LinkKeyRecord) {
        let secret = token::generate(token::TokenKind::LinkKey);
        let record = LinkKeyRecord {
            id: new_id(),
            org_id: org_id.into(),
            label: "test".into(),
            prefix: token::display_prefix(&secret),
            created_at: at,
            expires_at: at + LINK_KEY_VALIDITY_MS,
            last_used_at: None,
            revoked_at: None,
            replaces_key_id: None,
        };
        let key = NewSecret {
            record: record.clone(),
            digest: token::digest(&secret),
        };
        self.store
            .insert_link_key(
                &key,
                AuditDraft::new(at, "operator", "link_key.created", record.id.clone()),
            )
            .await
            .unwrap();
        (secret, record)
    }

    async fn link(
        &self,
        key_secret: &str,
        server_id: &str,
        at: i64,
    ) -> StoreResult<(LinkOutcome, String)> {
        let credential = token::generate(token::TokenKind::Instance);
        let instance_id = new_id();
        let link = NewLink {
            instance: InstanceRecord {
                id: instance_id.clone(),
                org_id: String::new(),
                server_id: server_id.into(),
                base_url: format!("https://{server_id}.example.com"),
                product: "jira".into(),
                version: "9.12.0".into(),
                license_sen: format!("SEN-{server_id}"),
                node_count: 2,
                link_key_id: String::new(),
                linked_at: at,
                unlinked_at: None,
            },
            credential: NewSecret {
                record: CredentialRecord {
                    id: new_id(),
                    org_id: String::new(),
                    instance_id: instance_id.clone(),
                    prefix: token::display_prefix(&credential),
                    created_at: at,
                    last_used_at: None,
                    revoked_at: None,
                },
                digest: token::digest(&credential),
            },
        };
        let outcome = self
            .store
            .link_instance(&token::digest(key_secret), link)
            .await?;
        // As LinkInstance does: the metadata goes to the store of the org's location (here, the
        // same).
        let app_link = AppLinkRecord {
            instance_id: outcome.instance.id.clone(),
            url: "https://wiki.example.com".into(),
            product_family: "confluence".into(),
            server_id: "WIKI-1".into(),
            version: "8.5.0".into(),
        };
        self.store
            .put_instance_facts(&InstanceFacts::of(&outcome.instance), &[app_link])
            .await?;
        Ok((outcome, credential))
    }

    async fn verify(&self, org_id: &str) -> ChainCheck {
        let head = self.store.audit_head(org_id).await.unwrap().unwrap();
        let mut verifier = ChainVerifier::default();
        for entry in self.store.list_audit(org_id, 0, 10_000, "").await.unwrap() {
            if !verifier.feed(&entry) {
                break;
            }
        }
        verifier.finish(&head)
    }
}

const T0: i64 = 1_800_000_000_000;

async fn orgs_start_with_an_intact_one_entry_chain(h: Harness) {
    let org = h.org(T0).await;
    assert_eq!(h.store.get_org(&org).await.unwrap().unwrap().name, "Acme");
    assert!(h.store.get_org(&new_id()).await.unwrap().is_none());
    assert!(matches!(
        h.verify(&org).await,
        ChainCheck::Intact { entries: 1, .. }
    ));
    let events = h.store.list_audit(&org, 0, 10, "").await.unwrap();
    assert_eq!(events[0].action, "org.created");
    assert_eq!(events[0].prev_hash, GENESIS.to_vec());
}

async fn a_keyed_entry_is_appended_once_and_a_fenced_key_never(h: Harness) {
    let org = h.org(T0).await;
    let draft =
        |target: &str| AuditDraft::new(T0 + 1, "service:consent", "consent.updated", target);
    let first = h
        .store
        .append_audit_keyed(&org, draft("v1"), "change-1")
        .await
        .unwrap();
    let KeyedAppend::Appended(entry) = first else {
        panic!("{first:?}")
    };
    assert_eq!(entry.seq, 2);
    // A retry appends nothing and returns the same entry; resolving finds it.
    assert_eq!(
        h.store
            .append_audit_keyed(&org, draft("v1 again"), "change-1")
            .await
            .unwrap(),
        KeyedAppend::AlreadyAppended(entry.clone())
    );
    assert_eq!(
        h.store
            .resolve_audit_key(&org, "change-1", T0)
            .await
            .unwrap(),
        KeyedAppend::AlreadyAppended(entry)
    );
    // Resolving an unknown key fences it: a late append with it appends nothing.
    assert_eq!(
        h.store
            .resolve_audit_key(&org, "change-2", T0)
            .await
            .unwrap(),
        KeyedAppend::Fenced
    );
    assert_eq!(
        h.store
            .append_audit_keyed(&org, draft("v2"), "change-2")
            .await
            .unwrap(),
        KeyedAppend::Fenced
    );
    let events = h.store.list_audit(&org, 0, 10, "").await.unwrap();
    assert_eq!(events.len(), 2, "org.created and v1 only");
    assert!(matches!(
        h.verify(&org).await,
        ChainCheck::Intact { entries: 2, .. }
    ));
    // Keys are per org; an unknown org is not found.
    let other = h.org(T0).await;
    assert!(matches!(
        h.store
            .append_audit_keyed(&other, draft("v1"), "change-1")
            .await
            .unwrap(),
        KeyedAppend::Appended(_)
    ));
    assert!(matches!(
        h.store.resolve_audit_key(&new_id(), "change-1", T0).await,
        Err(StoreError::NotFound("org"))
    ));
}

async fn regenerating_a_key_revokes_the_old_one(h: Harness) {
    let org = h.org(T0).await;
    let (_, old) = h.key(&org, T0).await;
    let secret = token::generate(token::TokenKind::LinkKey);
    let new_key = NewSecret {
        record: LinkKeyRecord {
            id: new_id(),
            replaces_key_id: Some(old.id.clone()),
            ..old.clone()
        },
        digest: token::digest(&secret),
    };
    let audit = || AuditDraft::new(T0 + 5, "operator", "link_key.regenerated", "x");
    let revoked = h
        .store
        .regenerate_link_key(&org, &old.id, &new_key, audit())
        .await
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(T0 + 5));
    let again = h
        .store
        .regenerate_link_key(&org, &old.id, &new_key, audit())
        .await
        .unwrap_err();
    assert!(matches!(again, StoreError::Precondition(_)), "{again:?}");
    let other_org = h.org(T0).await;
    let foreign = h
        .store
        .regenerate_link_key(&other_org, &new_key.record.id, &new_key, audit())
        .await
        .unwrap_err();
    assert!(matches!(foreign, StoreError::NotFound(_)), "{foreign:?}");
    let keys = h.store.list_link_keys(&org, None, 10).await.unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys[0].id < keys[1].id);
    let page2 = h
        .store
        .list_link_keys(&org, Some(&keys[0].id), 10)
        .await
        .unwrap();
    assert_eq!(page2, keys[1..].to_vec());
    assert!(matches!(
        h.verify(&org).await,
        ChainCheck::Intact { entries: 3, .. }
    ));
}

async fn linking_checks_the_key_digest_revocation_and_expiry(h: Harness) {
    let org = h.org(T0).await;
    let (secret, key) = h.key(&org, T0).await;
    let unknown = h
        .link(&token::generate(token::TokenKind::LinkKey), "S0", T0)
        .await
        .unwrap_err();
    assert!(matches!(
        unknown,
        StoreError::LinkKeyRejected(LinkKeyRejection::Unknown)
    ));
    let (outcome, _) = h
        .link(&secret, "S1", T0 + LINK_KEY_VALIDITY_MS - 1_000)
        .await
        .unwrap();
    assert_eq!(outcome.instance.org_id, org);
    assert_eq!(outcome.instance.link_key_id, key.id);
    assert!(!outcome.relinked);
    let expired = h
        .link(&secret, "S2", T0 + LINK_KEY_VALIDITY_MS + 1_000)
        .await
        .unwrap_err();
    assert!(matches!(
        expired,
        StoreError::LinkKeyRejected(LinkKeyRejection::Expired)
    ));
    let new_key = NewSecret {
        record: LinkKeyRecord {
            id: new_id(),
            ..key.clone()
        },
        digest: token::digest(&token::generate(token::TokenKind::LinkKey)),
    };
    h.store
        .regenerate_link_key(
            &org,
            &key.id,
            &new_key,
            AuditDraft::new(T0, "operator", "link_key.regenerated", "k"),
        )
        .await
        .unwrap();
    let revoked = h.link(&secret, "S3", T0 + 1).await.unwrap_err();
    assert!(matches!(
        revoked,
        StoreError::LinkKeyRejected(LinkKeyRejection::Revoked)
    ));
    assert_eq!(h.count("SELECT COUNT(*) FROM instances").await, 1);
}

async fn relinking_a_server_keeps_its_id_and_revokes_old_credentials(h: Harness) {
    let org = h.org(T0).await;
    let (secret, _) = h.key(&org, T0).await;
    let (first, first_credential) = h.link(&secret, "S1", T0 + 1).await.unwrap();
    let (second, second_credential) = h.link(&secret, "S1", T0 + 2).await.unwrap();
    assert!(second.relinked);
    assert_eq!(first.instance.id, second.instance.id);
    let old = h
        .store
        .find_credential(&token::digest(&first_credential))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old.record.revoked_at, Some(T0 + 2));
    let new = h
        .store
        .find_credential(&token::digest(&second_credential))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(new.record.revoked_at, None);
    assert_eq!(
        h.store
            .app_links_of(std::slice::from_ref(&second.instance.id))
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn unlinking_revokes_every_credential_and_stays_in_its_org(h: Harness) {
    let org = h.org(T0).await;
    let other = h.org(T0).await;
    let (secret, _) = h.key(&org, T0).await;
    let (outcome, credential) = h.link(&secret, "S1", T0).await.unwrap();
    let audit = || AuditDraft::new(T0 + 9, "operator", "instance.unlinked", "i");
    let foreign = h
        .store
        .unlink_instance(&other, &outcome.instance.id, audit())
        .await
        .unwrap_err();
    assert!(matches!(foreign, StoreError::NotFound(_)));
    let unlinked = h
        .store
        .unlink_instance(&org, &outcome.instance.id, audit())
        .await
        .unwrap();
    assert_eq!(unlinked.unlinked_at, Some(T0 + 9));
    let found = h
        .store
        .find_credential(&token::digest(&credential))
        .await
        .unwrap()
        .unwrap();
    assert!(found.instance_unlinked);
    assert_eq!(found.record.revoked_at, Some(T0 + 9));
    assert_eq!(
        h.store
            .list_instances(&other, None, 10)
            .await
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        h.store.list_instances(&org, None, 10).await.unwrap().len(),
        1
    );
}

async fn credentials_and_admin_tokens_are_found_by_digest_and_revoked_per_org(h: Harness) {
    let org = h.org(T0).await;
    let other = h.org(T0).await;
    let admin_secret = token::generate(token::TokenKind::Admin);
    let admin = AdminTokenRecord {
        id: new_id(),
        org_id: org.clone(),
        label: "ops".into(),
        prefix: token::display_prefix(&admin_secret),
        created_at: T0,
        last_used_at: None,
        revoked_at: None,
    };
    h.store
        .insert_admin_token(
            &NewSecret {
                record: admin.clone(),
                digest: token::digest(&admin_secret),
            },
            AuditDraft::new(T0, "operator", "admin_token.created", admin.id.clone()),
        )
        .await
        .unwrap();
    let found = h
        .store
        .find_admin_token(&token::digest(&admin_secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.record, admin);
    h.store.touch_admin_token(&admin.id, T0 + 1).await.unwrap();
    let audit = || AuditDraft::new(T0 + 2, "operator", "admin_token.revoked", "t");
    assert!(matches!(
        h.store.revoke_admin_token(&other, &admin.id, audit()).await,
        Err(StoreError::NotFound(_))
    ));
    let revoked = h
        .store
        .revoke_admin_token(&org, &admin.id, audit())
        .await
        .unwrap();
    assert_eq!(
        (revoked.last_used_at, revoked.revoked_at),
        (Some(T0 + 1), Some(T0 + 2))
    );

    let (secret, _) = h.key(&org, T0).await;
    let (outcome, _) = h.link(&secret, "S1", T0).await.unwrap();
    let audit = || AuditDraft::new(T0 + 3, "operator", "credential.revoked", "c");
    assert!(matches!(
        h.store
            .revoke_credential(&other, &outcome.credential.id, audit())
            .await,
        Err(StoreError::NotFound(_))
    ));
    let revoked = h
        .store
        .revoke_credential(&org, &outcome.credential.id, audit())
        .await
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(T0 + 3));
}

async fn a_domain_is_verified_for_one_org_at_most(h: Harness) {
    let org = h.org(T0).await;
    let other = h.org(T0).await;
    let claim = |org_id: &str, token: &str| DomainRecord {
        org_id: org_id.into(),
        domain: "example.com".into(),
        token: token.into(),
        claimed_at: T0,
        verified_at: None,
    };
    let audit = |action| AuditDraft::new(T0 + 1, "operator", action, "example.com");
    let first = h
        .store
        .claim_domain(&claim(&org, "tok1"), audit("domain.claimed"))
        .await
        .unwrap();
    let again = h
        .store
        .claim_domain(&claim(&org, "tok2"), audit("domain.claimed"))
        .await
        .unwrap();
    assert_eq!(first, again, "a repeated claim returns the first one");
    h.store
        .claim_domain(&claim(&other, "tok3"), audit("domain.claimed"))
        .await
        .unwrap();
    let verified = h
        .store
        .mark_domain_verified(&org, "example.com", audit("domain.verified"))
        .await
        .unwrap();
    assert_eq!(verified.verified_at, Some(T0 + 1));
    let taken = h
        .store
        .mark_domain_verified(&other, "example.com", audit("domain.verified"))
        .await
        .unwrap_err();
    assert!(matches!(taken, StoreError::AlreadyExists(_)), "{taken:?}");
    let missing = h
        .store
        .mark_domain_verified(&org, "nope.com", audit("domain.verified"))
        .await
        .unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)));
}

async fn detection_inputs_match_licenses_to_verified_domains(h: Harness) {
    let org = h.org(T0).await;
    let license = |sen: &str, domain: &str| LicenseRecord {
        sen: sen.into(),
        product: "jira".into(),
        domain: domain.into(),
    };
    let (inserted, updated) = h
        .store
        .import_licenses(
            &[
                license("SEN-1", "example.com"),
                license("SEN-2", "jira.example.com"),
                license("SEN-3", "notexample.com"),
            ],
            T0,
        )
        .await
        .unwrap();
    assert_eq!((inserted, updated), (3, 0));
    assert_eq!(
        h.store
            .import_licenses(&[license("SEN-1", "example.com")], T0)
            .await
            .unwrap(),
        (0, 1)
    );
    let unverified = h.store.detection_inputs(&org).await.unwrap();
    assert!(
        unverified.licenses.is_empty(),
        "nothing matches before a domain is verified"
    );
    let audit = |action| AuditDraft::new(T0, "operator", action, "example.com");
    h.store
        .claim_domain(
            &DomainRecord {
                org_id: org.clone(),
                domain: "example.com".into(),
                token: "t".into(),
                claimed_at: T0,
                verified_at: None,
            },
            audit("domain.claimed"),
        )
        .await
        .unwrap();
    h.store
        .mark_domain_verified(&org, "example.com", audit("domain.verified"))
        .await
        .unwrap();
    let (secret, _) = h.key(&org, T0).await;
    h.link(&secret, "S1", T0).await.unwrap();
    let inputs = h.store.detection_inputs(&org).await.unwrap();
    let sens: Vec<&str> = inputs.licenses.iter().map(|l| l.sen.as_str()).collect();
    assert_eq!(sens, ["SEN-1", "SEN-2"]);
    assert_eq!(inputs.linked_instances.len(), 1);
    // Identity rows only: the metadata is read from the org's location.
    assert_eq!(inputs.linked_instances[0].license_sen, "");
    assert!(inputs.app_links.is_empty());
}

async fn instance_metadata_is_kept_apart_and_moves_whole(h: Harness) {
    let org = h.org(T0).await;
    let other = h.org(T0).await;
    let mut ids = Vec::new();
    for (owner, server) in [(&org, "S1"), (&org, "S2"), (&other, "S3")] {
        let (secret, _) = h.key(owner, T0).await;
        let (outcome, _) = h.link(&secret, server, T0).await.unwrap();
        ids.push(outcome.instance.id);
    }
    // The identity row keeps none of the metadata.
    let identity = h.store.get_instance(&org, &ids[0]).await.unwrap().unwrap();
    assert_eq!(
        (
            identity.base_url.as_str(),
            identity.version.as_str(),
            identity.license_sen.as_str()
        ),
        ("", "", "")
    );
    let facts = h.store.instance_facts_of(&ids).await.unwrap();
    assert_eq!(facts.len(), 3);
    assert_eq!(
        facts
            .iter()
            .find(|f| f.instance_id == ids[0])
            .unwrap()
            .version,
        "9.12.0"
    );
    // Replacing an instance's metadata replaces its app links too.
    let mut newer = facts
        .iter()
        .find(|f| f.instance_id == ids[0])
        .unwrap()
        .clone();
    newer.version = "10.0.0".into();
    h.store.put_instance_facts(&newer, &[]).await.unwrap();
    assert!(
        h.store
            .app_links_of(std::slice::from_ref(&ids[0]))
            .await
            .unwrap()
            .is_empty()
    );
    let held = h.store.org_facts(&org).await.unwrap();
    assert_eq!((held.facts.len(), held.app_links.len()), (2, 1));
    assert!(held.facts.iter().any(|f| f.version == "10.0.0"));
    // A move: delete here, import again (as into another location's store), nothing lost or
    // doubled.
    assert_eq!(h.store.delete_org_facts(&org).await.unwrap(), 3);
    assert_eq!(h.store.org_facts(&org).await.unwrap(), OrgFacts::default());
    assert_eq!(h.store.org_facts(&other).await.unwrap().facts.len(), 1);
    h.store.import_facts(&held).await.unwrap();
    h.store.import_facts(&held).await.unwrap();
    assert_eq!(h.store.org_facts(&org).await.unwrap(), held);
    h.store.forget_deleted().await.unwrap();
}

async fn the_audit_log_pages_filters_and_reports_an_edited_entry(h: Harness) {
    let org = h.org(T0).await;
    for i in 0..5 {
        let action = if i % 2 == 0 {
            "consent.updated"
        } else {
            "residency.requested"
        };
        let record = h
            .store
            .append_audit(
                &org,
                AuditDraft::new(T0 + i, "service:consent", action, format!("v{i}"))
                    .with("level", "BASIC"),
            )
            .await
            .unwrap();
        assert_eq!(record.seq, i + 2);
    }
    let consent = h.store.list_audit(&org, 0, 100, "consent.").await.unwrap();
    assert_eq!(consent.len(), 3);
    let page = h.store.list_audit(&org, 2, 2, "").await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    // An underscore in a prefix is taken literally, not as a wildcard.
    assert!(
        h.store
            .list_audit(&org, 0, 100, "consent_")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        h.verify(&org).await,
        ChainCheck::Intact { entries: 6, .. }
    ));

    h.exec(
        "UPDATE audit_events SET target = 'forged' WHERE seq = 4",
        "UPDATE audit_events SET target = 'forged' WHERE seq = 4",
    )
    .await;
    assert_eq!(
        h.verify(&org).await,
        ChainCheck::Broken {
            entries: 4,
            first_bad_seq: 4,
            problem: "hash mismatch: entry was edited"
        }
    );
}

async fn an_action_whose_audit_entry_cannot_be_written_changes_nothing(h: Harness) {
    let org = h.org(T0).await;
    h.exec(
        "CREATE TRIGGER audit_full BEFORE INSERT ON audit_events BEGIN
            SELECT RAISE(ABORT, 'audit log unavailable'); END",
        "ALTER TABLE audit_events ADD CONSTRAINT audit_full CHECK (seq < 0) NOT VALID",
    )
    .await;
    let secret = token::generate(token::TokenKind::LinkKey);
    let key = NewSecret {
        record: LinkKeyRecord {
            id: new_id(),
            org_id: org.clone(),
            label: String::new(),
            prefix: token::display_prefix(&secret),
            created_at: T0,
            expires_at: T0 + LINK_KEY_VALIDITY_MS,
            last_used_at: None,
            revoked_at: None,
            replaces_key_id: None,
        },
        digest: token::digest(&secret),
    };
    let failed = h
        .store
        .insert_link_key(
            &key,
            AuditDraft::new(T0, "operator", "link_key.created", "k"),
        )
        .await;
    assert!(failed.is_err());
    assert_eq!(h.count("SELECT COUNT(*) FROM link_keys").await, 0);
    assert_eq!(
        h.store.audit_head(&org).await.unwrap().unwrap().seq,
        1,
        "the reserved seq rolled back"
    );
}

/// The credentials and app links of a page of instances come in one query per 500 ids, not one
/// per instance: a page larger than that, with an instance relinked (two credentials) among them.
async fn credentials_and_app_links_of_a_large_page_are_all_found(h: Harness) {
    let org = h.org(T0).await;
    let mut ids = Vec::new();
    for n in 0..520 {
        let (secret, _) = h.key(&org, T0 + n).await;
        let (outcome, _) = h.link(&secret, &format!("S{n}"), T0 + n).await.unwrap();
        ids.push(outcome.instance.id);
    }
    let (secret, _) = h.key(&org, T0 + 999).await;
    h.link(&secret, "S7", T0 + 999).await.unwrap();
    let credentials = h.store.credentials_of(&ids).await.unwrap();
    assert_eq!(credentials.len(), 521);
    for id in &ids {
        assert!(credentials.iter().any(|c| &c.instance_id == id));
    }
    assert_eq!(
        credentials
            .iter()
            .filter(|c| c.instance_id == ids[7])
            .count(),
        2
    );
    let links = h.store.app_links_of(&ids).await.unwrap();
    assert_eq!(links.len(), 520);
    // Another org's instances are not listed under this org's ids.
    let other = h.org(T0).await;
    let (secret, _) = h.key(&other, T0).await;
    let (foreign, _) = h.link(&secret, "F1", T0).await.unwrap();
    assert!(
        h.store
            .credentials_of(&ids)
            .await
            .unwrap()
            .iter()
            .all(|c| c.instance_id != foreign.instance.id)
    );
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let (harness, _dir) = super::Harness::sqlite().await;
                    super::$test(harness).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let (harness, _guard) = super::Harness::postgres().await;
                    super::$test(harness).await;
                }
            )*
        }
    };
}

conformance!(
    orgs_start_with_an_intact_one_entry_chain,
    a_keyed_entry_is_appended_once_and_a_fenced_key_never,
    regenerating_a_key_revokes_the_old_one,
    linking_checks_the_key_digest_revocation_and_expiry,
    relinking_a_server_keeps_its_id_and_revokes_old_credentials,
    unlinking_revokes_every_credential_and_stays_in_its_org,
    credentials_and_admin_tokens_are_found_by_digest_and_revoked_per_org,
    a_domain_is_verified_for_one_org_at_most,
    detection_inputs_match_licenses_to_verified_domains,
    the_audit_log_pages_filters_and_reports_an_edited_entry,
    an_action_whose_audit_entry_cannot_be_written_changes_nothing,
    credentials_and_app_links_of_a_large_page_are_all_found,
    instance_metadata_is_kept_apart_and_moves_whole,
);
