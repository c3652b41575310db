//! ConsentService's data residency: where an org's data lives and the moves between locations,
//! each carried out by every data owner and reported back.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn get_residency(
    api: &ConsentApi,
    request: Request<pb::GetResidencyRequest>,
) -> GrpcResult<pb::GetResidencyResponse> {
    let (_, org_id) = api.reader(&request, &request.get_ref().org_id).await?;
    Ok(Response::new(pb::GetResidencyResponse {
        residency: Some(api.residency(&org_id).await?.0),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn request_residency_move(
    api: &ConsentApi,
    request: Request<pb::RequestResidencyMoveRequest>,
) -> GrpcResult<pb::RequestResidencyMoveResponse> {
    let deadline = Some(api.deadline(&request));
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let r = request.get_ref();
    let org_id = domain::id("org_id", &r.org_id)?;
    let transition = domain::transition(r.transition)?;
    let scope = domain::scope(r.scope)?;
    match transition {
        pb::MoveTransition::Request => caller.require_admin_of(&org_id)?,
        pb::MoveTransition::Start => caller.require_operator()?,
        pb::MoveTransition::Complete | pb::MoveTransition::Unspecified => {
            if !matches!(caller, Principal::Operator | Principal::Service { .. }) {
                return Err(Status::permission_denied(
                    "only the operator or a service may complete a move",
                ));
            }
        }
    }
    let turn = api.lock(&org_id).await?;
    let (residency, moves) = api.residency(&org_id).await?;
    let current_location = match scope {
        pb::ResidencyScope::SupportBundles => residency.support_bundle_location(),
        _ => residency.location(),
    };
    let open = moves
        .iter()
        .find(|m| m.scope == scope_name(scope) && (m.state == "REQUESTED" || m.state == "MOVING"));
    let now = api.clock.now_ms();
    let (record, expected, new_residency, action) = match transition {
        pb::MoveTransition::Request => {
            let to = domain::location("to_location", r.to_location)?;
            if to == current_location {
                return Err(ConsentError::InvalidArgument {
                    field: "to_location",
                    reason: format!("the data is already in {}", domain::location_name(to)),
                }
                .into());
            }
            if open.is_some() {
                return Err(ConsentError::FailedPrecondition(
                    "a move of this scope is already under way".into(),
                )
                .into());
            }
            let record = MoveRecord {
                move_id: uuid::Uuid::now_v7().to_string(),
                org_id: org_id.clone(),
                scope: scope_name(scope).to_owned(),
                from_location: domain::location_name(current_location).to_owned(),
                to_location: domain::location_name(to).to_owned(),
                state: "REQUESTED".to_owned(),
                requested_at: now,
                started_at: None,
                completed_at: None,
                reported_by: String::new(),
            };
            (record, None, None, "residency.move_requested")
        }
        pb::MoveTransition::Start => {
            let Some(m) = open.filter(|m| m.state == "REQUESTED") else {
                return Err(ConsentError::FailedPrecondition(
                    "no requested move of this scope to start".into(),
                )
                .into());
            };
            let record = MoveRecord {
                state: "MOVING".to_owned(),
                started_at: Some(now),
                ..m.clone()
            };
            let from = MoveFrom {
                state: m.state.clone(),
                reported_by: m.reported_by.clone(),
            };
            (record, Some(from), None, "residency.move_started")
        }
        pb::MoveTransition::Complete | pb::MoveTransition::Unspecified => {
            let Some(m) = open.filter(|m| m.state == "MOVING") else {
                return Err(ConsentError::FailedPrecondition(
                    "no move of this scope is under way".into(),
                )
                .into());
            };
            let from = MoveFrom {
                state: m.state.clone(),
                reported_by: m.reported_by.clone(),
            };
            // A service reports its part as a data owner; the operator finishes the move.
            let mut reported = reported_by(m);
            let waiting = if let Principal::Service { .. } = caller {
                let owner = r.owner.trim();
                let expected = owners(&api.options.residency, scope);
                if owner.is_empty() {
                    return Err(ConsentError::InvalidArgument {
                        field: "owner",
                        reason: "a service names the data owner it reports for".into(),
                    }
                    .into());
                }
                if !expected.iter().any(|o| o == owner) {
                    return Err(ConsentError::InvalidArgument {
                        field: "owner",
                        reason: format!(
                            "{owner} owns no data of this scope (owners: {})",
                            expected.join(", ")
                        ),
                    }
                    .into());
                }
                if !reported.iter().any(|o| o == owner) {
                    reported.push(owner.to_owned());
                    reported.sort();
                }
                expected.iter().any(|o| !reported.contains(o))
            } else {
                false
            };
            if waiting {
                let record = MoveRecord {
                    reported_by: reported.join(","),
                    ..m.clone()
                };
                if record.reported_by == m.reported_by {
                    // Reported before: nothing changes.
                    drop(turn);
                    return Ok(Response::new(pb::RequestResidencyMoveResponse {
                        residency: Some(residency),
                        r#move: Some(move_pb(&record, &api.options.residency)),
                    }));
                }
                (record, Some(from), None, "residency.move_part_done")
            } else {
                let record = MoveRecord {
                    state: "DONE".to_owned(),
                    completed_at: Some(now),
                    reported_by: reported.join(","),
                    ..m.clone()
                };
                let mut location = domain::location_name(residency.location()).to_owned();
                let mut support =
                    domain::location_name(residency.support_bundle_location()).to_owned();
                match scope {
                    pb::ResidencyScope::SupportBundles => support.clone_from(&m.to_location),
                    _ => location.clone_from(&m.to_location),
                }
                let new_residency = ResidencyRecord {
                    org_id: org_id.clone(),
                    location,
                    support_bundle_location: support,
                    updated_at: now,
                };
                (
                    record,
                    Some(from),
                    Some(new_residency),
                    "residency.move_completed",
                )
            }
        }
    };
    let mut entry = api.entry(&org_id, &caller, action, record.move_id.clone());
    entry
        .attributes
        .insert("scope".into(), record.scope.clone());
    entry
        .attributes
        .insert("from".into(), record.from_location.clone());
    entry
        .attributes
        .insert("to".into(), record.to_location.clone());
    if !record.reported_by.is_empty() {
        entry
            .attributes
            .insert("reported_by".into(), record.reported_by.clone());
    }
    api.commit(
        turn,
        Change::Move {
            record: record.clone(),
            expected,
            residency: new_residency,
        },
        None,
        entry,
        Vec::new(),
        deadline,
    )
    .await?;
    tracing::info!(%org_id, move_id = %record.move_id, state = %record.state, "residency move changed");

    Ok(Response::new(pb::RequestResidencyMoveResponse {
        residency: Some(api.residency(&org_id).await?.0),
        r#move: Some(move_pb(&record, &api.options.residency)),
    }))
}
