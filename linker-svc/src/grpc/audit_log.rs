//! AuditService: other services append to an org's audit chain (keyed, so a retry appends once),
//! admins list it and verify it.

use super::*;

#[tonic::async_trait]
impl AuditService for LinkerApi {
    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn append_event(
        &self,
        request: Request<audit_pb::AppendEventRequest>,
    ) -> GrpcResult<audit_pb::AppendEventResponse> {
        let caller = self.authority.caller(&request).await?;
        caller.require_service()?;
        let r = request.get_ref();
        let org_id = domain::id("org_id", &r.org_id)?;
        let key = domain::idempotency_key(&r.idempotency_key)?;
        if r.resolve_only {
            // Only the key matters: the entry it names was (or was not) written before.
            let key = key.ok_or(LinkerError::InvalidArgument {
                field: "idempotency_key",
                reason: "is required with resolve_only".into(),
            })?;
            let outcome = self
                .store
                .resolve_audit_key(&org_id, key, self.clock.now_ms())
                .await
                .map_err(LinkerError::from)?;
            return Ok(Response::new(append_response(&org_id, outcome)));
        }
        let mut draft = AuditDraft::new(
            self.clock.now_ms(),
            domain::audit_text("actor", &r.actor, true)?,
            &domain::audit_action("action", &r.action)?,
            domain::audit_text("target", &r.target, false)?,
        )
        .until(self.deadline(&request));
        draft.service = domain::audit_action("service", &r.service)?;
        if r.attributes.len() > 50 {
            return Err(LinkerError::InvalidArgument {
                field: "attributes",
                reason: "has more than 50 entries".into(),
            }
            .into());
        }
        for (key, value) in &r.attributes {
            draft.attributes.insert(
                domain::audit_text("attributes.key", key, true)?,
                domain::audit_text("attributes.value", value, false)?,
            );
        }
        let outcome = match key {
            None => KeyedAppend::Appended(
                self.store
                    .append_audit(&org_id, draft)
                    .await
                    .map_err(LinkerError::from)?,
            ),
            Some(key) => self
                .store
                .append_audit_keyed(&org_id, draft, key)
                .await
                .map_err(LinkerError::from)?,
        };
        Ok(Response::new(append_response(&org_id, outcome)))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn list_events(
        &self,
        request: Request<audit_pb::ListEventsRequest>,
    ) -> GrpcResult<audit_pb::ListEventsResponse> {
        let caller = self.authority.caller(&request).await?;
        let r = request.get_ref();
        let org_id = self.admin_of(&caller, &r.org_id).await?;
        let (size, after) = domain::seq_page(r.page_size, &r.page_token)?;
        let prefix = domain::action_prefix(&r.action_prefix)?;
        let events = self
            .store
            .list_audit(&org_id, after, size, prefix)
            .await
            .map_err(LinkerError::from)?;
        Ok(Response::new(audit_pb::ListEventsResponse {
            next_page_token: next_token(&events, size, |e| e.seq.to_string()),
            events: events.iter().map(audit_pb).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
    async fn verify_chain(
        &self,
        request: Request<audit_pb::VerifyChainRequest>,
    ) -> GrpcResult<audit_pb::VerifyChainResponse> {
        let caller = self.authority.caller(&request).await?;
        let org_id = self.admin_of(&caller, &request.get_ref().org_id).await?;
        let head = self
            .store
            .audit_head(&org_id)
            .await
            .map_err(LinkerError::from)?
            .ok_or(LinkerError::NotFound("org"))?;
        // The head and the entry it names are written in one transaction and entries are never
        // removed, so the entries up to the head read above are one consistent view; entries that
        // concurrent writers append after it are not part of this check.
        let mut verifier = ChainVerifier::default();
        let mut after = 0;
        'pages: while after < head.seq {
            let page = self
                .store
                .list_audit(&org_id, after, 1_000, "")
                .await
                .map_err(LinkerError::from)?;
            for entry in page.iter().take_while(|e| e.seq <= head.seq) {
                if !verifier.feed(entry) {
                    break 'pages;
                }
            }
            match page.last() {
                Some(last) if page.len() == 1_000 => after = last.seq,
                _ => break,
            }
        }
        let response = match verifier.finish(&head) {
            ChainCheck::Intact { entries, head } => audit_pb::VerifyChainResponse {
                intact: true,
                entries_checked: entries,
                first_bad_seq: 0,
                problem: String::new(),
                head_hash: head,
            },
            ChainCheck::Broken {
                entries,
                first_bad_seq,
                problem,
            } => {
                tracing::warn!(%org_id, first_bad_seq, problem, "audit chain broken");
                audit_pb::VerifyChainResponse {
                    intact: false,
                    entries_checked: entries,
                    first_bad_seq,
                    problem: problem.to_owned(),
                    head_hash: head.hash,
                }
            }
        };
        Ok(Response::new(response))
    }
}
