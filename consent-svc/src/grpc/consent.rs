//! ConsentService's consent versions: reading, updating (signed receipt, audit entry, policy
//! change and purge in one step), the history, and verifying a receipt.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn get_consent(
    api: &ConsentApi,
    request: Request<pb::GetConsentRequest>,
) -> GrpcResult<pb::GetConsentResponse> {
    let (_, org_id) = api.reader(&request, &request.get_ref().org_id).await?;
    let (consent, record) = api.consent(&org_id).await?;
    let version = match record {
        Some(record) => api.version_pb(&record)?,
        None => pb::ConsentVersion {
            org_id,
            version: 0,
            settings: Some(consent.to_pb()),
            actor: String::new(),
            reason: "default: nothing is collected until an admin opts in".to_owned(),
            created_at: None,
            receipt: None,
        },
    };
    Ok(Response::new(pb::GetConsentResponse {
        consent: Some(version),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn update_consent(
    api: &ConsentApi,
    request: Request<pb::UpdateConsentRequest>,
) -> GrpcResult<pb::UpdateConsentResponse> {
    let deadline = Some(api.deadline(&request));
    let (caller, org_id) = api.admin(&request, &request.get_ref().org_id).await?;
    let r = request.get_ref();
    let consent = Consent::parse(r.settings.as_ref())?;
    let reason = domain::text("reason", &r.reason, 500)?;
    let request_key = sightline_runtime::idempotency::parse(&r.request_id)
        .map_err(|reason| ConsentError::InvalidArgument {
            field: "request_id",
            reason: reason.to_owned(),
        })?
        .map(sightline_runtime::idempotency::request_key);
    // Locking settles the org's earlier changes, so a first attempt still in flight is found.
    let turn = api.lock(&org_id).await?;
    if let Some(key) = &request_key
        && let Some(first) = api
            .store
            .consent_by_request(&org_id, key)
            .await
            .map_err(ConsentError::from)?
    {
        if consent_of(&first)? != consent {
            return Err(ConsentError::InvalidArgument {
                field: "request_id",
                reason: "was used for a different change".into(),
            }
            .into());
        }
        return Ok(Response::new(pb::UpdateConsentResponse {
            consent: Some(api.version_pb(&first)?),
        }));
    }
    let (before, latest) = api.consent(&org_id).await?;
    let current = latest.as_ref().map_or(0, |l| l.version);
    if r.expected_version != 0 && i64::try_from(r.expected_version).ok() != Some(current) {
        return Err(ConsentError::Aborted(format!(
            "expected_version {} is not the current version {current}",
            r.expected_version
        ))
        .into());
    }
    let version = current + 1;
    let now = api.clock.now_ms();
    let actor = caller.actor();
    let payload = receipt::payload(&Statement {
        org_id: &org_id,
        version,
        consent,
        actor: &actor,
        reason: &reason,
        created_at_ms: now,
        key_id: api.signer.key_id(),
    });
    let record = ConsentRecord {
        org_id: org_id.clone(),
        version,
        usage_level: consent.usage.name().to_owned(),
        sharing_level: consent.sharing.name().to_owned(),
        contribute_metadata: consent.contribute_metadata,
        contribute_in_app_data: consent.contribute_in_app_data,
        compliance_restricted: consent.compliance_restricted,
        actor,
        reason,
        created_at: now,
        receipt_signature: api.signer.sign(&payload),
        receipt_payload: payload,
        key_id: api.signer.key_id().to_owned(),
        request_key,
    };
    let purge = domain::purge_between(Allowance::of(&before), Allowance::of(&consent))
        .map(|spec| api.purge_record(&org_id, None, spec, version));
    let mut entry = api.entry(&org_id, &caller, "consent.updated", format!("v{version}"));
    entry.attributes.extend([
        ("version".to_owned(), version.to_string()),
        ("usage_level".to_owned(), consent.usage.name().to_owned()),
        (
            "sharing_level".to_owned(),
            consent.sharing.name().to_owned(),
        ),
        (
            "contribute_metadata".to_owned(),
            consent.contributes().0.to_string(),
        ),
        (
            "contribute_in_app_data".to_owned(),
            consent.contributes().1.to_string(),
        ),
        (
            "compliance_restricted".to_owned(),
            consent.compliance_restricted.to_string(),
        ),
    ]);
    if let Some(purge) = &purge {
        note_purge(&mut entry, purge);
    }
    api.commit(
        turn,
        Change::Consent(record.clone()),
        purge,
        entry,
        Vec::new(),
        deadline,
    )
    .await?;
    tracing::info!(%org_id, version, usage = consent.usage.name(), sharing = consent.sharing.name(), "consent updated");

    Ok(Response::new(pb::UpdateConsentResponse {
        consent: Some(api.version_pb(&record)?),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn list_consent_history(
    api: &ConsentApi,
    request: Request<pb::ListConsentHistoryRequest>,
) -> GrpcResult<pb::ListConsentHistoryResponse> {
    let (_, org_id) = api.reader(&request, &request.get_ref().org_id).await?;
    let r = request.get_ref();
    let size = page_size(r.page_size);
    let before = if r.page_token.is_empty() {
        None
    } else {
        Some(r.page_token.parse::<i64>().ok().filter(|v| *v > 0).ok_or(
            ConsentError::InvalidArgument {
                field: "page_token",
                reason: "is not a valid page token".into(),
            },
        )?)
    };
    let versions = api
        .store
        .list_consent(&org_id, before, size)
        .await
        .map_err(ConsentError::from)?;
    let next_page_token = match versions.last() {
        Some(last) if i64::try_from(versions.len()).unwrap_or(0) == size && last.version > 1 => {
            last.version.to_string()
        }
        _ => String::new(),
    };
    Ok(Response::new(pb::ListConsentHistoryResponse {
        versions: versions
            .iter()
            .map(|v| api.version_pb(v))
            .collect::<Result<_, _>>()?,
        next_page_token,
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn get_receipt_key(
    api: &ConsentApi,
    request: Request<pb::GetReceiptKeyRequest>,
) -> GrpcResult<pb::GetReceiptKeyResponse> {
    api.credentials.caller(&request, &api.limiter).await?;
    Ok(Response::new(pb::GetReceiptKeyResponse {
        public_key: api.signer.public_key().to_vec(),
        key_id: api.signer.key_id().to_owned(),
        algorithm: "Ed25519".to_owned(),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn verify_receipt(
    api: &ConsentApi,
    request: Request<pb::VerifyReceiptRequest>,
) -> GrpcResult<pb::VerifyReceiptResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let receipt = request
        .get_ref()
        .receipt
        .as_ref()
        .ok_or(ConsentError::InvalidArgument {
            field: "receipt",
            reason: "is required".into(),
        })?;
    let invalid = |reason: &str, consent: Option<pb::ConsentVersion>| {
        Ok(Response::new(pb::VerifyReceiptResponse {
            valid: false,
            reason: reason.to_owned(),
            consent,
        }))
    };
    let Some(parsed) = receipt::Parsed::read(&receipt.payload) else {
        return invalid("payload is not a Sightline consent receipt", None);
    };
    if let Some(own) = caller.org_id()
        && own != parsed.org_id
    {
        return Err(ConsentError::PermissionDenied("the receipt is another org's".into()).into());
    }
    let Some(stated) = parsed.consent() else {
        return invalid("payload states unknown levels", None);
    };
    let stated_pb = pb::ConsentVersion {
        org_id: parsed.org_id.clone(),
        version: u64::try_from(parsed.version).unwrap_or(0),
        settings: Some(stated.to_pb()),
        actor: parsed.actor.clone(),
        reason: parsed.reason.clone(),
        created_at: Some(to_proto(parsed.created_at_ms)),
        receipt: Some(receipt.clone()),
    };
    if parsed.key_id != api.signer.key_id() || receipt.key_id != api.signer.key_id() {
        return invalid("signed by an unknown key", Some(stated_pb));
    }
    if !api.signer.verifies(&receipt.payload, &receipt.signature) {
        return invalid("signature does not verify", Some(stated_pb));
    }
    match api
        .store
        .consent_version(&parsed.org_id, parsed.version)
        .await
        .map_err(ConsentError::from)?
    {
        None => invalid("no such consent version is stored", Some(stated_pb)),
        Some(stored) if stored.receipt_payload != receipt.payload => {
            invalid("does not match the stored version", Some(stated_pb))
        }
        Some(_) => Ok(Response::new(pb::VerifyReceiptResponse {
            valid: true,
            reason: String::new(),
            consent: Some(stated_pb),
        })),
    }
}
