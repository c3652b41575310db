//! An org's records as a residency move carries them: read whole from the old location's store and
//! written to the new one.

use super::*;

pub(super) async fn org_records(
    store: &SqlStore,
    org_id: &str,
    part: &Part,
) -> StoreResult<OrgRecords> {
    let mut records = OrgRecords::default();
    match part {
        Part::Data => {
            let rows: Vec<(String, String, i64, i64, i64, Vec<u8>)> = sql::query(
                "SELECT upload_id, subject, stored_at, consent_version, size_bytes, body FROM
                        assessments WHERE org_id = $1",
            )
            .bind(org_id)
            .fetch_all(&store.db)
            .await?;
            records.assessments = rows
                .into_iter()
                .map(
                    |(upload_id, subject, stored_at, consent_version, size_bytes, body)| {
                        StoredAssessment {
                            upload_id,
                            org_id: org_id.to_owned(),
                            subject,
                            stored_at,
                            consent_version,
                            size_bytes,
                            body,
                        }
                    },
                )
                .collect();
            let rows: Vec<(String, i64, i64, Vec<u8>)> = sql::query(
                "SELECT subject, assessed_at, score, report FROM readiness WHERE org_id = $1",
            )
            .bind(org_id)
            .fetch_all(&store.db)
            .await?;
            records.readiness = rows
                .into_iter()
                .map(|(subject, assessed_at, score, report)| StoredReadiness {
                    org_id: org_id.to_owned(),
                    subject,
                    assessed_at,
                    score,
                    report,
                })
                .collect();
            let rows: Vec<(String, i64, i64, String, i64)> = sql::query(
                "SELECT subject, at, score, rules_version, source FROM scores WHERE org_id = $1",
            )
            .bind(org_id)
            .fetch_all(&store.db)
            .await?;
            records.scores = rows
                .into_iter()
                .map(|(subject, at, score, rules_version, source)| StoredScore {
                    org_id: org_id.to_owned(),
                    subject,
                    at,
                    score,
                    rules_version,
                    source,
                })
                .collect();
        }
        Part::Bundles { location } => {
            records.bundles = store
                .bundles(org_id)
                .await?
                .into_iter()
                .filter(|b| &b.location == location)
                .collect();
        }
    }
    Ok(records)
}

pub(super) async fn import(store: &SqlStore, records: &OrgRecords) -> StoreResult<()> {
    let mut tx = store.db.begin().await?;
    for a in &records.assessments {
        SqlStore::insert_assessment(&mut tx, a, "ON CONFLICT (upload_id) DO NOTHING").await?;
    }
    for r in &records.readiness {
        SqlStore::insert_readiness(&mut tx, r, "ON CONFLICT (org_id, subject) DO NOTHING").await?;
    }
    for s in &records.scores {
        SqlStore::insert_score(&mut tx, s, "ON CONFLICT (org_id, subject, at) DO NOTHING").await?;
    }
    for b in &records.bundles {
        SqlStore::insert_bundle(&mut tx, b, "ON CONFLICT (upload_id) DO NOTHING").await?;
    }
    tx.commit().await?;
    Ok(())
}
