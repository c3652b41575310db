//! LinkerService's orgs and their secrets: creating an org, admin tokens and link keys.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn create_org(
    api: &LinkerApi,
    request: Request<pb::CreateOrgRequest>,
) -> GrpcResult<pb::CreateOrgResponse> {
    let caller = api.authority.caller(&request).await?;
    caller.require_operator()?;
    let name = domain::org_name(&request.get_ref().name)?;
    let now = api.clock.now_ms();
    let org = OrgRecord {
        id: domain::new_id(),
        name,
        created_at: now,
    };
    let audit = AuditDraft::new(now, caller.actor(), "org.created", org.id.clone())
        .until(api.deadline(&request));
    api.store
        .create_org(&org, audit, GENESIS)
        .await
        .map_err(LinkerError::from)?;
    tracing::info!(org_id = %org.id, "org created");
    Ok(Response::new(pb::CreateOrgResponse {
        org: Some(org_pb(&org)),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn list_orgs(
    api: &LinkerApi,
    request: Request<pb::ListOrgsRequest>,
) -> GrpcResult<pb::ListOrgsResponse> {
    let caller = api.authority.caller(&request).await?;
    caller.require_operator()?;
    let r = request.get_ref();
    let page = domain::page(r.page_size, &r.page_token)?;
    let orgs = api
        .store
        .list_orgs(page.after.as_deref(), page.size)
        .await
        .map_err(LinkerError::from)?;
    Ok(Response::new(pb::ListOrgsResponse {
        next_page_token: next_token(&orgs, page.size, |o| o.id.clone()),
        orgs: orgs.iter().map(org_pb).collect(),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn list_admin_tokens(
    api: &LinkerApi,
    request: Request<pb::ListAdminTokensRequest>,
) -> GrpcResult<pb::ListAdminTokensResponse> {
    let caller = api.authority.caller(&request).await?;
    let r = request.get_ref();
    let org_id = api.admin_of(&caller, &r.org_id).await?;
    let page = domain::page(r.page_size, &r.page_token)?;
    let tokens = api
        .store
        .list_admin_tokens(&org_id, page.after.as_deref(), page.size)
        .await
        .map_err(LinkerError::from)?;
    let now = api.clock.now_ms();
    Ok(Response::new(pb::ListAdminTokensResponse {
        next_page_token: next_token(&tokens, page.size, |t| t.id.clone()),
        tokens: tokens.iter().map(|t| admin_token_pb(t, now)).collect(),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn create_admin_token(
    api: &LinkerApi,
    request: Request<pb::CreateAdminTokenRequest>,
) -> GrpcResult<pb::CreateAdminTokenResponse> {
    let caller = api.authority.caller(&request).await?;
    let org_id = api.admin_of(&caller, &request.get_ref().org_id).await?;
    let label = domain::label(&request.get_ref().label)?;
    let request_id = request_id(&request.get_ref().request_id)?;
    if let Some(first) = api.replay("CreateAdminToken", &org_id, request_id).await? {
        return Ok(Response::new(first));
    }
    let now = api.clock.now_ms();
    let (secret, token) = api.issue(TokenKind::Admin, |prefix| AdminTokenRecord {
        id: domain::new_id(),
        org_id: org_id.clone(),
        label,
        prefix,
        created_at: now,
        last_used_at: None,
        revoked_at: None,
    });
    let audit = AuditDraft::new(
        now,
        caller.actor(),
        "admin_token.created",
        token.record.id.clone(),
    )
    .until(api.deadline(&request));
    let answer = pb::CreateAdminTokenResponse {
        token: Some(admin_token_pb(&token.record, now)),
        secret,
    };
    let audit = keep_reply(audit, "CreateAdminToken", &org_id, request_id, &answer);
    let stored = api.store.insert_admin_token(&token, audit).await;
    if let Some(first) = api
        .after_race("CreateAdminToken", &org_id, request_id, stored)
        .await?
    {
        return Ok(Response::new(first));
    }
    tracing::info!(%org_id, token_id = %token.record.id, "admin token created");
    Ok(Response::new(answer))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn revoke_admin_token(
    api: &LinkerApi,
    request: Request<pb::RevokeAdminTokenRequest>,
) -> GrpcResult<pb::RevokeAdminTokenResponse> {
    let caller = api.authority.caller(&request).await?;
    let org_id = api.admin_of(&caller, &request.get_ref().org_id).await?;
    let token_id = domain::id("token_id", &request.get_ref().token_id)?;
    let now = api.clock.now_ms();
    let audit = AuditDraft::new(now, caller.actor(), "admin_token.revoked", token_id.clone())
        .until(api.deadline(&request));
    let revoked = api
        .store
        .revoke_admin_token(&org_id, &token_id, audit)
        .await
        .map_err(LinkerError::from)?;
    tracing::info!(%org_id, %token_id, "admin token revoked");
    Ok(Response::new(pb::RevokeAdminTokenResponse {
        token: Some(admin_token_pb(&revoked, now)),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn create_link_key(
    api: &LinkerApi,
    request: Request<pb::CreateLinkKeyRequest>,
) -> GrpcResult<pb::CreateLinkKeyResponse> {
    let caller = api.authority.caller(&request).await?;
    let org_id = api.admin_of(&caller, &request.get_ref().org_id).await?;
    let label = domain::label(&request.get_ref().label)?;
    let request_id = request_id(&request.get_ref().request_id)?;
    if let Some(first) = api.replay("CreateLinkKey", &org_id, request_id).await? {
        return Ok(Response::new(first));
    }
    let now = api.clock.now_ms();
    let (secret, key) = api.issue(TokenKind::LinkKey, |prefix| LinkKeyRecord {
        id: domain::new_id(),
        org_id: org_id.clone(),
        label,
        prefix,
        created_at: now,
        expires_at: now + LINK_KEY_VALIDITY_MS,
        last_used_at: None,
        revoked_at: None,
        replaces_key_id: None,
    });
    let audit = AuditDraft::new(
        now,
        caller.actor(),
        "link_key.created",
        key.record.id.clone(),
    )
    .until(api.deadline(&request))
    .with("expires_at_ms", key.record.expires_at.to_string());
    let answer = pb::CreateLinkKeyResponse {
        key: Some(link_key_pb(&key.record, now)),
        secret,
    };
    let audit = keep_reply(audit, "CreateLinkKey", &org_id, request_id, &answer);
    let stored = api.store.insert_link_key(&key, audit).await;
    if let Some(first) = api
        .after_race("CreateLinkKey", &org_id, request_id, stored)
        .await?
    {
        return Ok(Response::new(first));
    }
    tracing::info!(%org_id, key_id = %key.record.id, "link key created");
    Ok(Response::new(answer))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn regenerate_link_key(
    api: &LinkerApi,
    request: Request<pb::RegenerateLinkKeyRequest>,
) -> GrpcResult<pb::RegenerateLinkKeyResponse> {
    let caller = api.authority.caller(&request).await?;
    let org_id = api.admin_of(&caller, &request.get_ref().org_id).await?;
    let old_id = domain::id("key_id", &request.get_ref().key_id)?;
    let now = api.clock.now_ms();
    let (secret, key) = api.issue(TokenKind::LinkKey, |prefix| LinkKeyRecord {
        id: domain::new_id(),
        org_id: org_id.clone(),
        label: String::new(),
        prefix,
        created_at: now,
        expires_at: now + LINK_KEY_VALIDITY_MS,
        last_used_at: None,
        revoked_at: None,
        replaces_key_id: Some(old_id.clone()),
    });
    let audit = AuditDraft::new(
        now,
        caller.actor(),
        "link_key.regenerated",
        key.record.id.clone(),
    )
    .until(api.deadline(&request))
    .with("revoked_key_id", old_id.clone());
    let revoked = api
        .store
        .regenerate_link_key(&org_id, &old_id, &key, audit)
        .await
        .map_err(LinkerError::from)?;
    tracing::info!(%org_id, old_key_id = %old_id, key_id = %key.record.id, "link key regenerated");
    Ok(Response::new(pb::RegenerateLinkKeyResponse {
        key: Some(link_key_pb(&key.record, now)),
        secret,
        revoked_key: Some(link_key_pb(&revoked, now)),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn list_link_keys(
    api: &LinkerApi,
    request: Request<pb::ListLinkKeysRequest>,
) -> GrpcResult<pb::ListLinkKeysResponse> {
    let caller = api.authority.caller(&request).await?;
    let r = request.get_ref();
    let org_id = api.admin_of(&caller, &r.org_id).await?;
    let page = domain::page(r.page_size, &r.page_token)?;
    let keys = api
        .store
        .list_link_keys(&org_id, page.after.as_deref(), page.size)
        .await
        .map_err(LinkerError::from)?;
    let now = api.clock.now_ms();
    Ok(Response::new(pb::ListLinkKeysResponse {
        next_page_token: next_token(&keys, page.size, |k| k.id.clone()),
        keys: keys.iter().map(|k| link_key_pb(k, now)).collect(),
    }))
}
