//! InsightsService's uploads: an assessment or a support bundle streamed in chunks, checked,
//! treated at the door and stored whole or not at all.

use super::*;

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn upload_assessment(
    api: &InsightsApi,
    request: Request<Streaming<pb::UploadAssessmentRequest>>,
) -> GrpcResult<pb::UploadAssessmentResponse> {
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let mut stream = request.into_inner();
    let mut bytes = Vec::new();
    let (uploader, _, received) = api
        .receive(
            &mut stream,
            upload::ASSESSMENT_FORMAT,
            api.limits.max_assessment_bytes,
            &mut |chunk| {
                bytes.extend_from_slice(chunk);
                Ok(())
            },
            &caller,
        )
        .await?;
    let parsed = upload::parse_assessment(&bytes, "file")?;
    let keys = api.pseudonyms(&uploader.policy);
    let (assessment, treated) =
        enforce::assessment(parsed, &uploader.rules, keys.as_ref()).map_err(Status::internal)?;
    let upload_id = uuid::Uuid::now_v7().to_string();
    let store = api.data_store_for_write(&uploader.policy).await?;
    let _held = api.hold(&uploader).await?;
    store
        .put_assessment(&StoredAssessment {
            upload_id: upload_id.clone(),
            org_id: uploader.org_id.clone(),
            subject: uploader.subject.clone(),
            stored_at: api.clock.now_ms(),
            consent_version: i64::try_from(uploader.policy.consent_version).unwrap_or(0),
            size_bytes: i64::try_from(received).unwrap_or(i64::MAX),
            body: assessment.encode_to_vec(),
        })
        .await?;
    let report = api
        .keep_readiness(
            ReportOf {
                store: store.as_ref(),
                org_id: &uploader.org_id,
                instance_id: &uploader.instance_id,
                subject: &uploader.subject,
                sharing: api.sharing_of(&uploader),
                source: pb::DataSource::Upload,
                consent_version: uploader.policy.consent_version,
            },
            &assessment,
        )
        .await?;
    metrics::counter!("sightline_insights_uploads_total", "kind" => "assessment").increment(1);
    Ok(Response::new(pb::UploadAssessmentResponse {
        upload_id,
        bytes_received: received,
        report: Some(report),
        removed: treated.removed_counts(),
    }))
}

#[tracing::instrument(skip_all, fields(org_id = tracing::field::Empty, instance_id = tracing::field::Empty))]
pub(super) async fn upload_support_bundle(
    api: &InsightsApi,
    request: Request<Streaming<pb::UploadSupportBundleRequest>>,
) -> GrpcResult<pb::UploadSupportBundleResponse> {
    use std::io::Write;
    let caller = api.credentials.caller(&request, &api.limiter).await?;
    let mut stream = request.into_inner();
    // The zip goes to a private temporary file next to where bundles are kept (0600).
    let incoming_dir = api.bundle_dirs.data_dir.join("bundles").join(".incoming");
    sightline_runtime::secret_file::private_dir(&incoming_dir)
        .map_err(io_error("making the upload directory private"))?;
    let mut incoming = tempfile::NamedTempFile::new_in(&incoming_dir)
        .map_err(io_error("opening a temporary file"))?;
    let mut writer = std::io::BufWriter::with_capacity(256 * 1024, incoming.as_file_mut());
    let received = api
        .receive(
            &mut stream,
            upload::BUNDLE_FORMAT,
            api.limits.max_bundle_bytes,
            &mut |chunk| {
                writer
                    .write_all(chunk)
                    .map_err(|e| Status::internal(format!("writing the upload: {e}")))
            },
            &caller,
        )
        .await;
    let flushed = writer.flush();
    drop(writer);
    let (uploader, digest, bytes_received) = received?;
    flushed.map_err(io_error("writing the upload"))?;
    if uploader.policy.support_bundles_moving {
        return Err(sightline_runtime::ratelimit::retry_after(
            Status::unavailable(
                "the org's support bundles are moving to another location; retry later",
            ),
            u64::from(uploader.policy.retry_after_ms.max(1)),
        ));
    }
    let location = uploader.policy.support_bundle_location();
    // The record goes to the bundles' location's store, the score made from it to the data's.
    let bundle_store = api.stores.get(location).await?;
    let data_store = api.data_store_for_write(&uploader.policy).await?;
    let location_name = location_name(location);
    let dir = api.bundle_dirs.dir(&location_name);
    sightline_runtime::secret_file::private_dir(&dir)
        .map_err(io_error("making the bundle directory private"))?;
    let output =
        tempfile::NamedTempFile::new_in(&dir).map_err(io_error("opening a temporary file"))?;
    let limits = api.limits.bundle;
    let rules = uploader.rules.clone();
    let keys = api.pseudonyms(&uploader.policy);
    let (bundle, output) = tokio::task::spawn_blocking(move || {
        let input = incoming.reopen()?;
        let mut output = output;
        let result = upload::process_bundle(
            std::io::BufReader::new(input),
            std::io::BufWriter::new(output.as_file_mut()),
            limits,
            &rules,
            keys.as_ref(),
        );
        drop(incoming);
        Ok::<_, std::io::Error>(result.map(|b| (b, output)))
    })
    .await
    .map_err(|e| Status::internal(format!("checking the bundle: {e}")))?
    .map_err(io_error("reading the upload"))??;
    let upload_id = uuid::Uuid::now_v7().to_string();
    let file_name = format!("{upload_id}.zip");
    let path = dir.join(&file_name);
    let kept_at = path.clone();
    let _keeping = api.keeping.read().await;
    tokio::task::spawn_blocking(move || upload::keep_file(output, &kept_at))
        .await
        .map_err(|e| Status::internal(format!("keeping the bundle: {e}")))?
        .map_err(io_error("keeping the bundle"))?;
    let scrubbed: BTreeMap<String, u32> = bundle
        .treated
        .scrubbed
        .iter()
        .map(|(class, n)| {
            let name = DataClass::try_from(*class)
                .map(|c| {
                    c.as_str_name()
                        .trim_start_matches("DATA_CLASS_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_default();
            (name, *n)
        })
        .collect();
    let now = api.clock.now_ms();
    let held = api.hold(&uploader).await;
    let stored = match &held {
        Ok(_) => bundle_store
            .put_bundle(&StoredBundle {
                upload_id: upload_id.clone(),
                org_id: uploader.org_id.clone(),
                subject: uploader.subject.clone(),
                location: location_name,
                file_name,
                stored_at: now,
                size_bytes: i64::try_from(bytes_received).unwrap_or(i64::MAX),
                sha256: digest,
                files_read: i64::from(bundle.files_read),
                scrubbed: serde_json::to_string(&scrubbed).unwrap_or_default(),
            })
            .await
            .map_err(Status::from),
        Err(status) => Err(status.clone()),
    };
    if let Err(status) = stored {
        // Whole or not at all: the file goes when its record could not be written.
        let _ = std::fs::remove_file(&path);
        return Err(status);
    }
    let (series, latest) = upload::series_of(&bundle.metrics);
    let at = latest.unwrap_or(now);
    let assessed = crate::health::evaluate(&api.rules, &series, at);
    if assessed.has_data {
        data_store
            .put_score(
                &uploader.org_id,
                &uploader.subject,
                at.div_euclid(HOUR_MS) * HOUR_MS,
                i64::from(assessed.score),
                &api.rules.version,
                pb::DataSource::Upload as i64,
            )
            .await?;
    }
    metrics::counter!("sightline_insights_uploads_total", "kind" => "support_bundle").increment(1);
    Ok(Response::new(pb::UploadSupportBundleResponse {
        upload_id,
        bytes_received,
        files_read: bundle.files_read,
        items_scrubbed: bundle.treated.scrubbed_total(),
        health: Some(pb::InstanceHealth {
            org_id: uploader.org_id.clone(),
            instance_id: uploader.instance_id.clone(),
            score: assessed.score,
            findings: assessed.findings,
            rules_version: api.rules.version.clone(),
            computed_at: Some(to_proto(at)),
            consent_version: uploader.policy.consent_version,
            source: pb::DataSource::Upload as i32,
            has_data: assessed.has_data,
        }),
        scrubbed: bundle.treated.scrubbed_counts(),
        stored_in: location as i32,
    }))
}
impl InsightsApi {
    /// Who uploads, under which policy and rules; refuses what consent does not allow.
    pub(super) async fn uploader(
        &self,
        caller: &Principal,
        header: &pb::UploadHeader,
    ) -> Result<Uploader, Status> {
        let (org_id, instance_id) = match caller {
            Principal::Instance {
                org_id,
                instance_id,
                ..
            } => {
                if ids::optional("header.org_id", &header.org_id)?.is_some_and(|o| &o != org_id) {
                    return Err(Status::permission_denied(
                        "header.org_id: an instance credential uploads for its own org only",
                    ));
                }
                if ids::optional("header.instance_id", &header.instance_id)?
                    .is_some_and(|i| &i != instance_id)
                {
                    return Err(Status::permission_denied(
                        "header.instance_id: an instance credential uploads for its own instance only",
                    ));
                }
                (org_id.clone(), instance_id.clone())
            }
            _ => {
                let org_id = ids::parse("header.org_id", &header.org_id)?;
                caller.require_admin_of(&org_id)?;
                match ids::optional("header.instance_id", &header.instance_id)? {
                    Some(instance_id) => {
                        self.directory
                            .require_instance(&org_id, &instance_id)
                            .await?;
                        (org_id, instance_id)
                    }
                    None => {
                        self.directory.require_org(&org_id).await?;
                        let server_id = header.server_id.trim();
                        if server_id.is_empty()
                            || server_id.len() > 64
                            || !server_id
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        {
                            return Err(Status::invalid_argument(
                                "header.server_id: an upload for an instance that is not linked names its server id (letters, digits, '-', '_'; at most 64)",
                            ));
                        }
                        (org_id, String::new())
                    }
                }
            }
        };
        sightline_runtime::telemetry::note_ids(&org_id, Some(&instance_id));
        let linked = !instance_id.is_empty();
        let policy = self
            .policies
            .policy(&org_id, linked.then_some(instance_id.as_str()))?
            .ok_or_else(|| {
                Status::failed_precondition(
                    "the org has not opted in to collection: uploads are refused while it is DISABLED",
                )
            })?;
        if policy.usage_level() == UsageLevel::Disabled {
            return Err(Status::failed_precondition(
                "the org's (or instance's) consent is DISABLED: nothing is stored",
            ));
        }
        let mut rules = FieldRules::of(&policy);
        if !linked {
            // An instance that is not linked is treated as BASIC, never more openly than the org.
            rules = rules.stricter(&FieldRules::from_rules(
                &sightline_proto::rules::field_rules(
                    sightline_proto::common::v1::SharingLevel::Basic,
                ),
            ));
        }
        let subject = subject_of(&instance_id, header.server_id.trim());
        Ok(Uploader {
            org_id,
            instance_id,
            subject,
            policy,
            rules,
        })
    }

    /// The policy fence, held while an upload's records are written (see [`Policies::hold`]).
    pub(super) async fn hold(&self, uploader: &Uploader) -> Result<Held, Status> {
        let linked = !uploader.instance_id.is_empty();
        self.policies
            .hold(
                &uploader.policy,
                linked.then_some(uploader.instance_id.as_str()),
            )
            .await
    }

    /// Makes, keeps and returns the readiness report of an (already treated) assessment.
    pub(super) async fn keep_readiness(
        &self,
        of: ReportOf<'_>,
        assessment: &pb::Assessment,
    ) -> Result<pb::ReadinessReport, Status> {
        let ReportOf {
            store,
            org_id,
            instance_id,
            subject,
            sharing,
            source,
            consent_version,
        } = of;
        let (blockers, score) = crate::readiness::assess(assessment);
        let now = self.clock.now_ms();
        let report = pb::ReadinessReport {
            org_id: org_id.to_owned(),
            instance_id: instance_id.to_owned(),
            counts: assessment.counts,
            blockers,
            readiness_score: score,
            sharing_level: sharing as i32,
            assessed_at: Some(to_proto(now)),
            source: source as i32,
            consent_version,
        };
        store
            .put_readiness(&StoredReadiness {
                org_id: org_id.to_owned(),
                subject: subject.to_owned(),
                assessed_at: now,
                score: i64::from(score),
                report: report.encode_to_vec(),
            })
            .await?;
        Ok(report)
    }

    /// Reads the header, then the chunks into `sink`, with the size and digest checks; returns the
    /// uploader, the file's SHA-256 and its size.
    pub(super) async fn receive<M: UploadMessage>(
        &self,
        stream: &mut Streaming<M>,
        format: &str,
        limit: u64,
        sink: &mut (dyn FnMut(&[u8]) -> Result<(), Status> + Send),
        caller: &Principal,
    ) -> Result<(Uploader, String, u64), Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("header: the stream is empty"))?;
        let header = match first.part() {
            Some(Part::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "header: the first message must be the header",
                ));
            }
        };
        upload::check_header(&header, format, limit)?;
        let uploader = self.uploader(caller, &header).await?;
        let mut tally = Tally::new(&header);
        while let Some(message) = stream.message().await? {
            match message.part() {
                Some(Part::Chunk(chunk)) => {
                    tally.add(&chunk)?;
                    sink(&chunk)?;
                }
                Some(Part::Header(_)) => {
                    return Err(Status::invalid_argument(
                        "header: repeated; a stream has one header, first",
                    ));
                }
                None => return Err(Status::invalid_argument("part: is required")),
            }
        }
        let received = tally.received();
        let digest = tally.finish(&header)?;
        Ok((uploader, digest, received))
    }
}
