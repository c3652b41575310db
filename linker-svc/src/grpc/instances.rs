//! LinkerService's instances: linking with a link key (the credential shown once), listing with
//! their metadata, unlinking, validating and revoking credentials, and detection.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn link_instance(
    api: &LinkerApi,
    request: Request<pb::LinkInstanceRequest>,
) -> GrpcResult<pb::LinkInstanceResponse> {
    let presented = auth::bearer(request.metadata())?;
    let parsed = token::parse(presented)
        .map_err(|e| LinkerError::Unauthenticated(format!("malformed link key: {e}")))?;
    if parsed.kind != TokenKind::LinkKey {
        return Err(LinkerError::Unauthenticated(
            "LinkInstance takes a link key as its bearer token".into(),
        )
        .into());
    }
    let key_digest = parsed.digest();
    let peer = PeerKey::of_request(&request);
    api.authority.failures.check(peer)?;
    api.authority
        .limiter
        .check(&format!("link:{}", hex::encode(&key_digest[..8])))?;
    let r = request.get_ref();
    let metadata = domain::metadata(r.metadata.as_ref())?;
    let links = domain::app_links(&r.app_links)?;
    api.residency.check_writable()?;
    let now = api.clock.now_ms();
    let instance_id = domain::new_id();
    let (credential, new_credential) = api.issue(TokenKind::Instance, |prefix| CredentialRecord {
        id: domain::new_id(),
        org_id: String::new(),
        instance_id: instance_id.clone(),
        prefix,
        created_at: now,
        last_used_at: None,
        revoked_at: None,
    });
    let link = NewLink {
        instance: InstanceRecord {
            id: instance_id.clone(),
            org_id: String::new(),
            server_id: metadata.server_id,
            base_url: metadata.base_url,
            product: metadata.product,
            version: metadata.version,
            license_sen: metadata.license_sen,
            node_count: i64::from(metadata.node_count),
            link_key_id: String::new(),
            linked_at: now,
            unlinked_at: None,
        },
        credential: new_credential,
    };
    let outcome = api
        .store
        .link_instance(&key_digest, link)
        .await
        .map_err(|e| {
            let error = LinkerError::from(e);
            if matches!(error, LinkerError::Unauthenticated(_)) {
                api.authority.failures.charge(peer);
            }
            error
        })?;
    tracing::info!(
        org_id = %outcome.instance.org_id,
        instance_id = %outcome.instance.id,
        relinked = outcome.relinked,
        "instance linked"
    );
    let credentials = vec![outcome.credential.clone()];
    let app_links: Vec<AppLinkRecord> = links
        .into_iter()
        .map(|l| AppLinkRecord {
            instance_id: outcome.instance.id.clone(),
            url: l.url,
            product_family: l.product_family,
            server_id: l.server_id,
            version: l.version,
        })
        .collect();
    // The metadata goes to the store of the org's location, under the policy fence.
    let (located, _held) = api.residency.for_write(&outcome.instance.org_id).await?;
    located
        .put_instance_facts(&InstanceFacts::of(&outcome.instance), &app_links)
        .await
        .map_err(LinkerError::from)?;
    Ok(Response::new(pb::LinkInstanceResponse {
        instance: Some(instance_pb(
            &outcome.instance,
            &credentials,
            &app_links,
            now,
        )),
        credential_info: Some(credential_pb(&outcome.credential, now)),
        credential,
        link_key_expires_at: Some(sightline_runtime::time::to_proto(
            outcome.link_key_expires_at,
        )),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn list_instances(
    api: &LinkerApi,
    request: Request<pb::ListInstancesRequest>,
) -> GrpcResult<pb::ListInstancesResponse> {
    let caller = api.authority.caller(&request).await?;
    let r = request.get_ref();
    // Services (enforcement points) check that an instance is an org's.
    let org_id = match caller {
        Principal::Service { .. } => api.admin_of(&Principal::Operator, &r.org_id).await?,
        _ => api.admin_of(&caller, &r.org_id).await?,
    };
    let page = domain::page(r.page_size, &r.page_token)?;
    let mut instances = if r.instance_id.is_empty() {
        api.store
            .list_instances(&org_id, page.after.as_deref(), page.size)
            .await
            .map_err(LinkerError::from)?
    } else {
        let instance_id = domain::id("instance_id", &r.instance_id)?;
        let found = api
            .store
            .get_instance(&org_id, &instance_id)
            .await
            .map_err(LinkerError::from)?
            .ok_or(LinkerError::NotFound("instance"))?;
        vec![found]
    };
    let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    let mut credentials = api
        .store
        .credentials_of(&ids)
        .await
        .map_err(LinkerError::from)?;
    let app_links = api.with_facts(&org_id, &mut instances).await?;
    // Grouped by instance (stable: each instance's own order stays), so a page of n instances
    // is built in n log n, not n².
    credentials.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    let now = api.clock.now_ms();
    Ok(Response::new(pb::ListInstancesResponse {
        next_page_token: next_token(&instances, page.size, |i| i.id.clone()),
        instances: instances
            .iter()
            .map(|i| {
                let own = |id: &str| id.cmp(i.id.as_str());
                instance_pb(
                    i,
                    of_instance(&credentials, |c| own(&c.instance_id)),
                    of_instance(&app_links, |a| own(&a.instance_id)),
                    now,
                )
            })
            .collect(),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn unlink_instance(
    api: &LinkerApi,
    request: Request<pb::UnlinkInstanceRequest>,
) -> GrpcResult<pb::UnlinkInstanceResponse> {
    let caller = api.authority.caller(&request).await?;
    let org_id = api.admin_of(&caller, &request.get_ref().org_id).await?;
    let instance_id = domain::id("instance_id", &request.get_ref().instance_id)?;
    let now = api.clock.now_ms();
    let audit = AuditDraft::new(
        now,
        caller.actor(),
        "instance.unlinked",
        instance_id.clone(),
    )
    .until(api.deadline(&request));
    let mut instance = api
        .store
        .unlink_instance(&org_id, &instance_id, audit)
        .await
        .map_err(LinkerError::from)?;
    let ids = vec![instance.id.clone()];
    let credentials = api
        .store
        .credentials_of(&ids)
        .await
        .map_err(LinkerError::from)?;
    let app_links = api
        .with_facts(&org_id, std::slice::from_mut(&mut instance))
        .await?;
    tracing::info!(%org_id, %instance_id, "instance unlinked");
    Ok(Response::new(pb::UnlinkInstanceResponse {
        instance: Some(instance_pb(&instance, &credentials, &app_links, now)),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn validate_credential(
    api: &LinkerApi,
    request: Request<pb::ValidateCredentialRequest>,
) -> GrpcResult<pb::ValidateCredentialResponse> {
    let caller = api.authority.caller(&request).await?;
    caller.require_service()?;
    let presented = request.get_ref().credential.trim();
    if presented.is_empty() {
        return Err(LinkerError::InvalidArgument {
            field: "credential",
            reason: "is required".into(),
        }
        .into());
    }
    let principal = api.authority.resolve(presented).await?;
    let (kind, org_id, instance_id, credential_id, scopes) = match principal {
        Principal::Operator => (
            pb::CredentialKind::Operator,
            String::new(),
            String::new(),
            "operator".to_owned(),
            vec!["operator"],
        ),
        Principal::Admin { org_id, token_id } => (
            pb::CredentialKind::Admin,
            org_id,
            String::new(),
            token_id,
            vec!["org:admin"],
        ),
        Principal::Instance {
            org_id,
            instance_id,
            credential_id,
        } => (
            pb::CredentialKind::Instance,
            org_id,
            instance_id,
            credential_id,
            vec!["ingest", "upload"],
        ),
        Principal::Service { name } => (
            pb::CredentialKind::Service,
            String::new(),
            String::new(),
            name,
            vec!["service"],
        ),
    };
    Ok(Response::new(pb::ValidateCredentialResponse {
        kind: kind as i32,
        org_id,
        instance_id,
        credential_id,
        scopes: scopes.into_iter().map(str::to_owned).collect(),
        cache_ttl_ms: VALIDATION_CACHE_TTL_MS,
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn revoke_credential(
    api: &LinkerApi,
    request: Request<pb::RevokeCredentialRequest>,
) -> GrpcResult<pb::RevokeCredentialResponse> {
    let caller = api.authority.caller(&request).await?;
    let org_id = api.admin_of(&caller, &request.get_ref().org_id).await?;
    let credential_id = domain::id("credential_id", &request.get_ref().credential_id)?;
    let now = api.clock.now_ms();
    let audit = AuditDraft::new(
        now,
        caller.actor(),
        "credential.revoked",
        credential_id.clone(),
    )
    .until(api.deadline(&request));
    let revoked = api
        .store
        .revoke_credential(&org_id, &credential_id, audit)
        .await
        .map_err(LinkerError::from)?;
    tracing::info!(%org_id, %credential_id, "credential revoked");
    Ok(Response::new(pb::RevokeCredentialResponse {
        credential: Some(credential_pb(&revoked, now)),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn detect_instances(
    api: &LinkerApi,
    request: Request<pb::DetectInstancesRequest>,
) -> GrpcResult<pb::DetectInstancesResponse> {
    let caller = api.authority.caller(&request).await?;
    let org_id = api.admin_of(&caller, &request.get_ref().org_id).await?;
    let mut inputs = api
        .store
        .detection_inputs(&org_id)
        .await
        .map_err(LinkerError::from)?;
    inputs.app_links = api
        .with_facts(&org_id, &mut inputs.linked_instances)
        .await?;
    Ok(Response::new(pb::DetectInstancesResponse {
        instances: crate::detect::detect(&inputs),
    }))
}
