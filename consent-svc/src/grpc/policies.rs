//! ConsentService's policy: reading an org's effective policy, the WatchPolicy stream the
//! enforcing services follow, and per-instance overrides.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn get_policy(
    api: &ConsentApi,
    request: Request<pb::GetPolicyRequest>,
) -> GrpcResult<pb::GetPolicyResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.get_ref();
    let (org_id, instance_id) = api.policy_scope(&caller, &r.org_id, &r.instance_id).await?;
    let policy = api.policy(&org_id, instance_id.as_deref()).await?;
    Ok(Response::new(pb::GetPolicyResponse {
        policy: Some(policy),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn watch_policy(
    api: &ConsentApi,
    request: Request<pb::WatchPolicyRequest>,
) -> GrpcResult<<ConsentApi as ConsentService>::WatchPolicyStream> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.get_ref();
    let every_org = r.org_id.is_empty()
        && r.instance_id.is_empty()
        && !matches!(caller, Principal::Instance { .. });
    let watched = if every_org {
        caller.require_service()?;
        Watched::AllOrgs
    } else {
        match api.policy_scope(&caller, &r.org_id, &r.instance_id).await? {
            (org_id, None) => Watched::Org(org_id),
            (org_id, Some(instance_id)) => Watched::Instance {
                org_id,
                instance_id,
            },
        }
    };
    // Subscribe before reading the snapshot, so no change falls between the two.
    let changes = api.hub.subscribe();
    // One slot stays free for the ABORTED that ends a watcher who fell behind.
    let (tx, rx) = mpsc::channel(api.options.watch_buffer + 1);
    let api = api.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = api.shutdown.cancelled() => {}
            () = api.follow(watched, changes, tx) => {}
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn set_instance_override(
    api: &ConsentApi,
    request: Request<pb::SetInstanceOverrideRequest>,
) -> GrpcResult<pb::SetInstanceOverrideResponse> {
    let deadline = Some(api.deadline(&request));
    let (caller, org_id) = api.admin(&request, &request.get_ref().org_id).await?;
    let r = request.get_ref();
    let instance_id = domain::id("instance_id", &r.instance_id)?;
    let reason = domain::text("reason", &r.reason, 500)?;
    let levels = if r.clear {
        None
    } else {
        Some((
            Usage::parse("usage_level", r.usage_level)?,
            Sharing::parse("sharing_level", r.sharing_level)?,
        ))
    };
    // Only the org's own instances: nothing is stored or audited for another id.
    api.directory
        .require_instance(&org_id, &instance_id)
        .await?;
    let turn = api.lock(&org_id).await?;
    let now = api.clock.now_ms();
    let state = api.state(&org_id).await?;
    let org_allows = Allowance::of(&state.consent);
    let record = if let Some((usage, sharing)) = levels {
        domain::check_override(&state.consent, usage, sharing)?;
        Some(OverrideRecord {
            org_id: org_id.clone(),
            instance_id: instance_id.clone(),
            usage_level: usage.name().to_owned(),
            sharing_level: sharing.name().to_owned(),
            reason,
            updated_at: now,
        })
    } else {
        None
    };
    let mut entry = api.entry(
        &org_id,
        &caller,
        if record.is_some() {
            "consent.override_set"
        } else {
            "consent.override_cleared"
        },
        instance_id.clone(),
    );
    if let Some(o) = &record {
        entry
            .attributes
            .insert("usage_level".into(), o.usage_level.clone());
        entry
            .attributes
            .insert("sharing_level".into(), o.sharing_level.clone());
    }
    let after = match &record {
        Some(o) => override_of(o).map(|o| org_allows.lowered_to(o.usage, o.sharing))?,
        None => org_allows,
    };
    // The consent version does not change: every record of the instance so far is covered.
    let purge = domain::purge_between(state.allowance(Some(&instance_id)), after).map(|spec| {
        let next = i64::try_from(state.consent_version).unwrap_or(i64::MAX - 1) + 1;
        api.purge_record(&org_id, Some(&instance_id), spec, next)
    });
    if let Some(purge) = &purge {
        note_purge(&mut entry, purge);
    }
    api.commit(
        turn,
        Change::Override {
            org_id: org_id.clone(),
            instance_id: instance_id.clone(),
            record: record.clone(),
        },
        purge,
        entry,
        vec![instance_id.clone()],
        deadline,
    )
    .await?;
    tracing::info!(%org_id, %instance_id, cleared = record.is_none(), "instance override changed");

    let policy = api.policy(&org_id, Some(&instance_id)).await?;
    Ok(Response::new(pb::SetInstanceOverrideResponse {
        r#override: record.map(|o| pb::InstanceOverride {
            org_id: o.org_id,
            instance_id: o.instance_id,
            usage_level: Usage::from_name(&o.usage_level).map_or(0, |u| u.to_pb() as i32),
            sharing_level: Sharing::from_name(&o.sharing_level).map_or(0, |s| s.to_pb() as i32),
            reason: o.reason,
            updated_at: Some(to_proto(o.updated_at)),
        }),
        policy: Some(policy),
    }))
}
impl ConsentApi {
    /// This replica's store's name among the replicas sharing its database.
    pub(crate) fn origin(&self) -> &str {
        self.store.origin()
    }

    /// Sends every org's policies to every watcher again (after notices may have been missed).
    pub(crate) async fn publish_all(&self) {
        match self.store.orgs().await {
            Ok(orgs) => {
                for org_id in orgs {
                    self.publish(&org_id, Vec::new()).await;
                }
            }
            Err(error) => tracing::error!(%error, "cannot publish the orgs' policies"),
        }
    }

    /// Sends the org's new policies to every watcher.
    pub(crate) async fn publish(&self, org_id: &str, instance_ids: Vec<String>) {
        match self.state(org_id).await {
            Ok(state) => {
                // No receiver is fine: nobody is watching.
                let _ = self.hub.send(Arc::new(state.watch_message(instance_ids)));
            }
            Err(error) => tracing::error!(%org_id, %error, "cannot publish policy"),
        }
    }

    /// Sends a watcher its snapshot, then every change it watches, until it goes or falls behind.
    pub(super) async fn follow(
        &self,
        watched: Watched,
        mut changes: broadcast::Receiver<Arc<pb::WatchPolicyResponse>>,
        tx: mpsc::Sender<Result<pb::WatchPolicyResponse, Status>>,
    ) {
        let snapshot = match self.snapshot(&watched).await {
            Ok(snapshot) => snapshot,
            Err(error) => {
                let _ = tx.send(Err(error.into())).await;
                return;
            }
        };
        // The revision each org's policy was last sent at: a change is sent once, in order, even
        // when it is announced again (a replica hears of another's change after this watcher's
        // snapshot read it, or sends every org anew after its notices were interrupted).
        let mut sent: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for message in snapshot {
            if let Some(policy) = &message.policy {
                sent.insert(policy.org_id.clone(), policy.revision);
            }
            // A snapshot is bounded: wait for a slow reader rather than drop any of it.
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
        // The lease of every watcher: a heartbeat whenever the stream would otherwise be quiet for
        // `heartbeat`, so silence means the stream (or the path to it) is gone.
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + self.options.heartbeat,
            self.options.heartbeat,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let update = tokio::select! {
                () = tx.closed() => return,
                _ = heartbeat.tick() => {
                    let beat = pb::WatchPolicyResponse {
                        heartbeat: true,
                        ..Default::default()
                    };
                    match tx.try_send(Ok(beat)) {
                        // A full buffer: the watcher is not reading; the changes decide its fate.
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => continue,
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
                change = changes.recv() => match change {
                    Ok(update) => update,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        abort(&tx, &format!("watcher fell {missed} changes behind")).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            let Some((org_id, revision)) = update
                .policy
                .as_ref()
                .map(|p| (p.org_id.as_str(), p.revision))
            else {
                continue;
            };
            if sent.get(org_id).is_some_and(|&last| revision <= last) {
                continue;
            }
            let message = match &watched {
                Watched::AllOrgs => update.as_ref().clone(),
                Watched::Org(org) if org == org_id => update.as_ref().clone(),
                Watched::Instance {
                    org_id: org,
                    instance_id,
                } if org == org_id => pb::WatchPolicyResponse {
                    policy: policy::for_instance(&update, instance_id),
                    instance_ids: Vec::new(),
                    instance_policies: Vec::new(),
                    snapshot_complete: false,
                    heartbeat: false,
                },
                Watched::Org(_) | Watched::Instance { .. } => continue,
            };
            if tx.capacity() <= 1 {
                abort(&tx, "watcher fell behind").await;
                return;
            }
            if tx.try_send(Ok(message)).is_err() {
                return;
            }
            sent.insert(org_id.to_owned(), revision);
        }
    }

    /// The first messages of a watch: the current policies, the last marked `snapshot_complete`.
    pub(super) async fn snapshot(
        &self,
        watched: &Watched,
    ) -> Result<Vec<pb::WatchPolicyResponse>, ConsentError> {
        let mut messages = match watched {
            Watched::AllOrgs => {
                let mut all = Vec::new();
                for org_id in self.store.orgs().await? {
                    all.push(self.state(&org_id).await?.watch_message(Vec::new()));
                }
                all
            }
            Watched::Org(org_id) => vec![self.state(org_id).await?.watch_message(Vec::new())],
            Watched::Instance {
                org_id,
                instance_id,
            } => vec![pb::WatchPolicyResponse {
                policy: Some(self.policy(org_id, Some(instance_id)).await?),
                instance_ids: Vec::new(),
                instance_policies: Vec::new(),
                snapshot_complete: false,
                heartbeat: false,
            }],
        };
        match messages.last_mut() {
            Some(last) => last.snapshot_complete = true,
            None => messages.push(pb::WatchPolicyResponse {
                policy: None,
                instance_ids: Vec::new(),
                instance_policies: Vec::new(),
                snapshot_complete: true,
                heartbeat: false,
            }),
        }
        Ok(messages)
    }
}
