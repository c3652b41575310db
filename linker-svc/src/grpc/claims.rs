//! LinkerService's domain claims (proved by a DNS TXT record) and license imports.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn claim_domain(
    api: &LinkerApi,
    request: Request<pb::ClaimDomainRequest>,
) -> GrpcResult<pb::ClaimDomainResponse> {
    let caller = api.authority.caller(&request).await?;
    let org_id = api.admin_of(&caller, &request.get_ref().org_id).await?;
    let domain_name = domain::domain(&request.get_ref().domain)?;
    let now = api.clock.now_ms();
    let token: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let claim = DomainRecord {
        org_id: org_id.clone(),
        domain: domain_name.clone(),
        token,
        claimed_at: now,
        verified_at: None,
    };
    let audit = AuditDraft::new(now, caller.actor(), "domain.claimed", domain_name.clone())
        .until(api.deadline(&request));
    let claim = api
        .store
        .claim_domain(&claim, audit)
        .await
        .map_err(LinkerError::from)?;
    tracing::info!(%org_id, domain = %domain_name, "domain claimed");
    Ok(Response::new(pb::ClaimDomainResponse {
        claim: Some(domain_pb(&claim)),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn verify_domain(
    api: &LinkerApi,
    request: Request<pb::VerifyDomainRequest>,
) -> GrpcResult<pb::VerifyDomainResponse> {
    let caller = api.authority.caller(&request).await?;
    let org_id = api.admin_of(&caller, &request.get_ref().org_id).await?;
    let domain_name = domain::domain(&request.get_ref().domain)?;
    let claim = api
        .store
        .get_domain(&org_id, &domain_name)
        .await
        .map_err(LinkerError::from)?
        .ok_or(LinkerError::NotFound("domain claim"))?;
    if claim.verified_at.is_some() {
        return Ok(Response::new(pb::VerifyDomainResponse {
            claim: Some(domain_pb(&claim)),
        }));
    }
    let expected = dns_claims::record_value(&claim.token);
    let records = api
        .txt
        .txt(&dns_claims::record_name(&domain_name))
        .await
        .map_err(|e| LinkerError::FailedPrecondition(format!("TXT lookup failed: {e}")))?;
    if !records.iter().any(|r| r.trim() == expected) {
        return Err(LinkerError::FailedPrecondition(format!(
            "TXT record {} does not hold the claim's value yet",
            dns_claims::record_name(&domain_name)
        ))
        .into());
    }
    let now = api.clock.now_ms();
    let audit = AuditDraft::new(now, caller.actor(), "domain.verified", domain_name.clone())
        .until(api.deadline(&request));
    let verified = api
        .store
        .mark_domain_verified(&org_id, &domain_name, audit)
        .await
        .map_err(LinkerError::from)?;
    tracing::info!(%org_id, domain = %domain_name, "domain verified");
    Ok(Response::new(pb::VerifyDomainResponse {
        claim: Some(domain_pb(&verified)),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn import_licenses(
    api: &LinkerApi,
    request: Request<pb::ImportLicensesRequest>,
) -> GrpcResult<pb::ImportLicensesResponse> {
    let caller = api.authority.caller(&request).await?;
    caller.require_operator()?;
    let r = request.get_ref();
    if r.licenses.len() > domain::MAX_LICENSES_PER_IMPORT {
        return Err(LinkerError::InvalidArgument {
            field: "licenses",
            reason: format!("has more than {} records", domain::MAX_LICENSES_PER_IMPORT),
        }
        .into());
    }
    let licenses = r
        .licenses
        .iter()
        .map(domain::license)
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = HashSet::new();
    if let Some(dup) = licenses.iter().find(|l| !seen.insert(l.sen.as_str())) {
        return Err(LinkerError::InvalidArgument {
            field: "licenses.sen",
            reason: format!("{} appears twice", dup.sen),
        }
        .into());
    }
    let (inserted, updated) = api
        .store
        .import_licenses(&licenses, api.clock.now_ms())
        .await
        .map_err(LinkerError::from)?;
    tracing::info!(inserted, updated, "licenses imported");
    Ok(Response::new(pb::ImportLicensesResponse {
        inserted,
        updated,
    }))
}
