//! Uploading the spool: sealed files streamed to collector-svc over a few concurrent streams, each
//! file removed only once every batch in it is acknowledged; a file the collector refuses is set
//! aside, and uploads stop while the policy forbids them.

use super::*;

impl Agent {
    /// Sends every sealed spool file, oldest first, a batch per file: over `STREAMS` IngestStreams
    /// at once (the collector commits a stream's batches one after another, and several streams'
    /// together), each with up to `WINDOW` batches unacknowledged.
    pub async fn upload(&self, policy: &watch::Receiver<Option<Live>>) -> UploadEnd {
        let files = {
            let mut spool = lock(&self.spool);
            spool.seal();
            match spool.sealed() {
                Ok(files) => files,
                Err(e) => {
                    return UploadEnd::Retry {
                        hint: None,
                        reason: format!("reading the spool: {e}"),
                    };
                }
            }
        };
        if files.is_empty() {
            return UploadEnd::Done {
                batches: 0,
                events: 0,
            };
        }
        let total = files.len() as u64;
        let round = Round {
            queue: Mutex::new(files.into_iter().collect()),
            progress: Mutex::new((total > 1).then(|| Progress::new("uploading the spool"))),
            total,
            done: Mutex::new((0, 0)),
        };
        let streams = (0..STREAMS.min(total as usize)).map(|_| self.upload_stream(&round, policy));
        let ends = futures::future::join_all(streams).await;
        let (done, events_done) = *lock(&round.done);
        self.record(|s| s.last_upload_events = events_done);
        match ends.into_iter().find_map(Result::err) {
            None => UploadEnd::Done {
                batches: done,
                events: events_done,
            },
            Some(end) => end,
        }
    }

    /// One stream of an upload round: takes files from the round's queue until it is empty, the
    /// policy no longer allows uploads, or the stream fails.
    pub(super) async fn upload_stream(
        &self,
        round: &Round,
        policy: &watch::Receiver<Option<Live>>,
    ) -> Result<(), UploadEnd> {
        let (tx, rx) = mpsc::channel::<IngestStreamRequest>(WINDOW);
        let mut pending: VecDeque<(PathBuf, u64)> = VecDeque::new();
        let fill = |pending: &mut VecDeque<(PathBuf, u64)>| -> Result<Vec<IngestStreamRequest>, UploadEnd> {
            let mut out = Vec::new();
            while pending.len() + out.len() < WINDOW {
                // An opt-out during a backlog stops it at the next batch.
                if !uploads_allowed(&policy.borrow()) {
                    break;
                }
                let Some(path) = lock(&round.queue).pop_front() else { break };
                let batch = spool::read(&path).map_err(|e| UploadEnd::Retry {
                    hint: None,
                    reason: format!("{}: {e}", path.display()),
                })?;
                if batch.events.is_empty() {
                    let _ = lock(&self.spool).remove(&path);
                    continue;
                }
                lock(&self.spool).mark_in_flight(&path, true);
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                pending.push_back((path, batch.events.len() as u64));
                out.push(IngestStreamRequest {
                    batch_id: name,
                    events: batch.events,
                });
            }
            Ok(out)
        };
        let end = async {
            // The first window is queued before the call starts, so the stream opens with data.
            let first = fill(&mut pending)?;
            if first.is_empty() {
                return Ok(());
            }
            for request in first {
                let _ = tx.send(request).await;
            }
            let mut collector = self.collector.clone();
            let call = collector.ingest_stream(authed(
                &self.credential,
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ));
            let ack_timeout = self.options.ack_timeout;
            let stalled = || UploadEnd::Retry {
                hint: None,
                reason: format!(
                    "no ack from the collector within {} ms",
                    ack_timeout.as_millis()
                ),
            };
            let mut acks = tokio::time::timeout(ack_timeout, call)
                .await
                .map_err(|_| stalled())?
                .map_err(status_end)?
                .into_inner();
            while let Some((path, count)) = pending.front().cloned() {
                // A collector that stops answering mid-stream is given up on, not waited for.
                let ack = tokio::time::timeout(ack_timeout, acks.message())
                    .await
                    .map_err(|_| stalled())?
                    .map_err(status_end)?
                    .ok_or_else(|| UploadEnd::Retry {
                        hint: None,
                        reason: "the collector ended the stream".into(),
                    })?;
                pending.pop_front();
                if let Some(error) = ack.error {
                    lock(&self.spool).mark_in_flight(&path, false);
                    if error.code == Code::InvalidArgument as u32 {
                        self.set_aside(&path, &error.message);
                    } else {
                        return Err(UploadEnd::Retry {
                            hint: (error.retry_after_ms > 0)
                                .then(|| Duration::from_millis(u64::from(error.retry_after_ms))),
                            reason: format!("batch {}: {}", ack.batch_id, error.message),
                        });
                    }
                } else {
                    // Committed: only now is the file deleted.
                    if let Err(e) = lock(&self.spool).remove(&path) {
                        tracing::warn!(error = %e, "an acknowledged spool file could not be deleted (it is resent, and stored once)");
                    }
                    let stored = ack_accepted(&ack.result);
                    self.record_soon(|s| {
                        s.uploaded_events_total += count;
                        s.accepted_events_total += stored;
                        s.last_upload_at_ms = Some(now_ms());
                    });
                    let (done, events) = {
                        let mut done = lock(&round.done);
                        done.0 += 1;
                        done.1 += count;
                        *done
                    };
                    if let Some(p) = lock(&round.progress).as_mut() {
                        p.update(done, round.total, "batches", &format!("{events} events"));
                    }
                }
                for request in fill(&mut pending)? {
                    let _ = tx.send(request).await;
                }
            }
            Ok(())
        }
        .await;
        let mut spool = lock(&self.spool);
        for (path, _) in &pending {
            spool.mark_in_flight(path, false);
        }
        end
    }

    /// A batch the collector refuses as invalid is kept aside, not resent forever.
    pub(super) fn set_aside(&self, path: &Path, why: &str) {
        let dir = self.home.spool_dir().join("rejected");
        let moved = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::rename(path, dir.join(path.file_name().unwrap_or_default())));
        self.record(|s| {
            s.rejected_batches_total += 1;
            s.error(
                format!(
                    "the collector refused spool file {} as invalid ({why}); kept under analytics-logs/rejected/{}",
                    path.display(),
                    if moved.is_ok() { "" } else { " (could not be moved)" }
                ),
                now_ms(),
            );
        });
    }

    /// Uploads each upload interval while a live policy allows it, backing off after failures;
    /// as soon as a live policy first arrives when a backlog waits.
    pub(super) async fn upload_loop(self: Arc<Self>, mut policy: watch::Receiver<Option<Live>>) {
        let mut backoff = Backoff::new(self.options.initial_backoff, self.options.max_backoff);
        let mut next = tokio::time::Instant::now();
        let mut was_allowed = uploads_allowed(&policy.borrow());
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                changed = policy.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let allowed = uploads_allowed(&policy.borrow());
                    if allowed && !was_allowed {
                        next = tokio::time::Instant::now();
                    }
                    was_allowed = allowed;
                    continue;
                }
            }
            next = tokio::time::Instant::now() + self.options.upload_every;
            if !uploads_allowed(&policy.borrow()) {
                continue;
            }
            match self.upload(&policy).await {
                UploadEnd::Done { batches, events } => {
                    backoff.reset();
                    if batches > 0 {
                        tracing::info!(batches, events, "uploaded");
                    }
                }
                UploadEnd::Retry { hint, reason } => {
                    let wait = backoff.next(hint);
                    self.record(|s| {
                        s.error(
                            format!("upload: {reason}; retrying in {} ms", wait.as_millis()),
                            now_ms(),
                        )
                    });
                    next = tokio::time::Instant::now() + wait;
                }
                UploadEnd::Rejected(reason) => {
                    self.record(|s| s.error(reason, now_ms()));
                }
            }
        }
    }
}
