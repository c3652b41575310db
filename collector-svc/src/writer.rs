//! Group commit: batches from every concurrent Ingest and IngestStream call queue here, and each
//! writer task commits as many as are waiting in one transaction (one fsync on SQLite), then answers
//! each. An answer means the batch is durably committed.
//!
//! Each commit takes the policy fence ([`sightline_runtime::policy_stream::Fence`]) for its last
//! revision check, right before the transaction commits, and keeps it until every caller has its
//! answer (the answer carries the hold on): a policy change is applied between commits, never
//! during one, so no batch enforced under a revision older than the one applied is acknowledged as
//! accepted — and a change waits for a COMMIT, not for a commit's inserts.

use std::sync::Arc;
use std::time::Duration;

use crate::error::CollectorError;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use sightline_runtime::policy_stream::{Held, PolicyFollower};

use crate::policy_cache::Policies;
use crate::store::{Batch, BatchOutcome, CollectorStore};

/// Rows one transaction takes at most.
const MAX_GROUP_ROWS: usize = 16_000;

/// A committed batch's outcome, with the commit's hold on the policy fence.
pub type Written = (BatchOutcome, Option<Held>);

type Reply = oneshot::Sender<Result<Written, CollectorError>>;

#[derive(Debug)]
struct Job {
    batch: Batch,
    reply: Reply,
}

/// Who commits a store's batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committers {
    /// One committer on a thread of its own (SQLite, which has one writer anyway): its turn
    /// between two statements never waits behind a batch's decoding or enforcement on the shared
    /// runtime's threads (each of which holds a thread for milliseconds).
    OwnThread,
    /// `n` committers on the shared runtime, each taking what is waiting (a server database, where
    /// commits run side by side).
    Tasks(usize),
}

/// The queue in front of one store.
#[derive(Debug, Clone)]
pub struct Writer {
    queue: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the `committers` of `store`, behind a queue of `queue` batches.
    pub fn start(
        store: Arc<dyn CollectorStore>,
        policies: Arc<Policies>,
        committers: Committers,
        queue: usize,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let run = move || {
            committer(
                rx.clone(),
                store.clone(),
                policies.clone(),
                shutdown.clone(),
            )
        };
        match committers {
            Committers::OwnThread => {
                let own_thread = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|runtime| {
                        let committer = run();
                        std::thread::Builder::new()
                            .name("collector-commit".into())
                            .spawn(move || runtime.block_on(committer))
                    });
                // Without a thread of its own, the committer still runs, on the shared runtime.
                if let Err(error) = own_thread {
                    tracing::warn!(%error, "the committer runs on the shared runtime");
                    tokio::spawn(run());
                }
            }
            Committers::Tasks(n) => {
                for _ in 0..n.max(1) {
                    tokio::spawn(run());
                }
            }
        }
        Self { queue: tx }
    }

    /// Commits one batch (with whatever else is waiting) and answers when it is durable.
    pub async fn write(&self, batch: Batch) -> Result<Written, CollectorError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { batch, reply })
            .await
            .map_err(|_| CollectorError::ShuttingDown)?;
        answer.await.map_err(|_| CollectorError::ShuttingDown)?
    }
}

/// Commits whose sync (and answers) may be pending at once: the committer goes on to the next
/// group while the disk flushes the last one, and waits for the oldest past this many.
const MAX_SYNCING: usize = 2;

/// Takes what is waiting and commits it in one transaction, until shutdown; each commit's answers
/// go out from a task of their own once it is durable, while the next group commits.
async fn committer(
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    store: Arc<dyn CollectorStore>,
    policies: Arc<Policies>,
    shutdown: CancellationToken,
) {
    let mut syncing = tokio::task::JoinSet::new();
    loop {
        while syncing.len() >= MAX_SYNCING {
            syncing.join_next().await;
        }
        let jobs = {
            let mut rx = queue.lock().await;
            let first = tokio::select! {
                job = rx.recv() => job,
                () = shutdown.cancelled() => None,
            };
            let Some(first) = first else { break };
            let mut rows = first.batch.rows.len();
            let mut jobs = vec![first];
            while rows < MAX_GROUP_ROWS {
                match rx.try_recv() {
                    Ok(job) => {
                        rows += job.batch.rows.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            jobs
        };
        if let Some(answers) = commit(store.as_ref(), &policies, jobs).await {
            syncing.spawn(answers);
        }
    }
    // Every commit made is answered before the committer ends.
    while syncing.join_next().await.is_some() {}
}

/// Commits `jobs` in one transaction. The answers, once it is durable, are what remains to do
/// (None: the commit failed and its callers have their answer).
async fn commit(
    store: &dyn CollectorStore,
    policies: &Policies,
    jobs: Vec<Job>,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let (batches, replies): (Vec<Batch>, Vec<Reply>) =
        jobs.into_iter().map(|j| (j.batch, j.reply)).unzip();
    let current = |org: &str, instance: &str| policies.revision(org, instance);
    let started = std::time::Instant::now();
    let result = store
        .commit_fenced(&batches, &current, policies.fence())
        .await;
    metrics::counter!("sightline_collector_commits_total").increment(1);
    match result {
        Ok(committed) => Some(async move {
            let durable = committed.synced().await;
            metrics::histogram!("sightline_collector_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            match durable {
                Ok((outcomes, held)) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok((outcome, Some(held.clone()))));
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "a commit could not be made durable");
                    let error = crate::store::StoreError::from(error);
                    answer_failed(replies, &CollectorError::from(error));
                }
            }
        }),
        Err(error) => {
            answer_failed(replies, &CollectorError::from(error));
            // A database that fails now will likely fail again at once: let it breathe.
            tokio::time::sleep(Duration::from_millis(20)).await;
            None
        }
    }
}

fn answer_failed(replies: Vec<Reply>, error: &CollectorError) {
    for reply in replies {
        let _ = reply.send(Err(error.clone()));
    }
}
