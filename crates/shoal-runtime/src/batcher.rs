//! Dynamic batching, the I/O shell around [`shoal_core::batch`]: requests
//! to one model version queue here; one task forms batches by the
//! version's [`BatchPolicy`] and runs each on the [`InferencePool`] as a
//! single inference, then hands every request its own rows.
//!
//! - A request is checked against the model *before* it queues: a bad one
//!   is refused alone and never fails its batch-mates.
//! - Only requests with the same [`batch_key`] (inputs, datatypes and
//!   every dimension but the first) share a batch; others wait for the
//!   next one, oldest first.
//! - At most `cap` batches run at once (the model's share of the pool):
//!   while they run, requests gather, so batches grow with the load.
//! - The queue is bounded: past it a request is refused at once as
//!   overloaded (the HTTP layer answers 503 with `Retry-After`).
//! - A request whose caller went away before its batch formed is dropped.
//! - Callers [`Batcher::admit`] a request as soon as they start
//!   receiving it (refused at once when the queue is full); a batch waits
//!   for more only while some are admitted and not yet queued (see
//!   [`shoal_core::batch`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use shoal_core::Tensor;
use shoal_core::batch::{self, BatchPolicy, Decision};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::{InferencePool, LoadedModel, RunError, Share};

struct Job {
    key: batch::BatchKey,
    rows: usize,
    inputs: Vec<Tensor>,
    at: Instant,
    reply: oneshot::Sender<Result<Vec<Tensor>, RunError>>,
}

/// Called with the rows of every batch run (for metrics).
pub type OnBatch = Arc<dyn Fn(usize) + Send + Sync>;

/// Where a batcher runs its batches, and within what.
#[derive(Clone)]
pub struct BatchRunner {
    /// The pool.
    pub pool: InferencePool,
    /// The model's name (its share of the pool).
    pub key: String,
    /// Batches of this model running at once, at most.
    pub cap: usize,
    /// Longest a batch may wait for a thread and run.
    pub deadline: Duration,
    /// Requests waiting to join a batch, at most.
    pub queue: usize,
    /// Told the rows of every batch run.
    pub on_batch: Option<OnBatch>,
}

impl std::fmt::Debug for BatchRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchRunner")
            .field("key", &self.key)
            .field("cap", &self.cap)
            .field("deadline", &self.deadline)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// What a batcher has done.
#[derive(Debug, Default)]
pub struct BatchStats {
    batches: AtomicU64,
    requests: AtomicU64,
    rows: AtomicU64,
}

impl BatchStats {
    /// Batches run.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Requests answered through batches.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Rows run.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }
}

/// One model version's batching queue. Dropping it stops the task once
/// the batches already formed have run.
#[derive(Debug)]
pub struct Batcher {
    model: LoadedModel,
    tx: mpsc::Sender<Job>,
    runner: Arc<BatchRunner>,
    shared: Arc<Shared>,
}

/// What the callers and the batching task both see.
#[derive(Debug)]
struct Shared {
    /// Batches running, at most `cap`.
    runners: Arc<Semaphore>,
    /// Requests announced and not yet queued.
    arriving: AtomicUsize,
    /// Requests queued and not yet taken into a batch.
    pending: AtomicUsize,
    stats: BatchStats,
}

/// A request on its way to a batcher (being received or decoded): batches
/// wait for it, within the delay. Dropped when it is queued or given up.
#[derive(Debug)]
pub struct Arrival(Arc<Shared>);

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.arriving.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Batcher {
    /// Starts batching `model`'s requests by `policy` (call within a tokio
    /// runtime).
    pub fn start(model: LoadedModel, policy: BatchPolicy, runner: BatchRunner) -> Batcher {
        let (tx, rx) = mpsc::channel(runner.queue.max(1));
        let shared = Arc::new(Shared {
            runners: Arc::new(Semaphore::new(runner.cap.max(1))),
            arriving: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            stats: BatchStats::default(),
        });
        let runner = Arc::new(runner);
        tokio::spawn(run_batches(
            model.clone(),
            policy,
            runner.clone(),
            rx,
            shared.clone(),
        ));
        Batcher {
            model,
            tx,
            runner,
            shared,
        }
    }

    /// Admits a request on its way (before it is read and decoded) and
    /// tells the batcher it is coming; keep the [`Arrival`] until
    /// [`Batcher::run`] takes it. Refused at once (`Overloaded`) when the
    /// requests queued and on their way already fill the queue.
    pub fn admit(&self) -> Result<Arrival, RunError> {
        let arriving = self.shared.arriving.fetch_add(1, Ordering::AcqRel);
        let arrival = Arrival(self.shared.clone());
        let pending = self.shared.pending.load(Ordering::Acquire);
        if pending + arriving >= self.runner.queue.max(1) {
            return Err(RunError::Overloaded {
                queued: pending + arriving,
            });
        }
        Ok(arrival)
    }

    /// What it has done.
    pub fn stats(&self) -> &BatchStats {
        &self.shared.stats
    }

    /// Checks `inputs`, queues them for a batch (ending their `arrival`)
    /// and waits for their own outputs. A request with nothing queued or
    /// on its way beside it, and a runner free, runs at once as a batch
    /// of one, without the queue's hops: batching costs a lone caller
    /// nothing. With no other batch running either, a model cheap enough
    /// runs it inline, as an unbatched version would; the hand-off to a
    /// pool thread (≈ 20 µs) is kept for requests that may find mates.
    pub async fn run(
        &self,
        inputs: Vec<Tensor>,
        arrival: Option<Arrival>,
    ) -> Result<Vec<Tensor>, RunError> {
        let inputs = self.model.check(inputs)?;
        let (rows, key) = batch::batch_key(&inputs).ok_or_else(|| {
            RunError::Engine("a batched model's inputs need a batch dimension first".into())
        })?;
        let alone = usize::from(arrival.is_some());
        if self.shared.pending.load(Ordering::Acquire) == 0
            && self.shared.arriving.load(Ordering::Acquire) <= alone
            && let Ok(permit) = self.shared.runners.clone().try_acquire_owned()
        {
            drop(arrival);
            let share = self.runner.share();
            let pool = &self.runner.pool;
            // Ours is the only runner taken: no batch of this model runs.
            let only_one = self.shared.runners.available_permits() + 1 >= self.runner.cap.max(1);
            let outputs = if only_one {
                pool.run_checked(&self.model, inputs, share).await
            } else {
                pool.run_on_pool(&self.model, inputs, share).await
            };
            drop(permit);
            self.shared.stats.count(&self.runner, &[rows]);
            return outputs;
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            key,
            rows,
            inputs,
            at: Instant::now(),
            reply,
        };
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.try_send(job);
        drop(arrival);
        if sent.is_err() {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        }
        match sent {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(RunError::Overloaded {
                    queued: self.runner.queue,
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(RunError::Engine("the batcher has stopped".into()));
            }
        }
        answer
            .await
            .map_err(|_| RunError::Engine("the batch was abandoned".into()))?
    }
}

impl BatchRunner {
    fn share(&self) -> Share<'_> {
        Share {
            key: &self.key,
            cap: self.cap,
            deadline: self.deadline,
        }
    }
}

impl BatchStats {
    /// Counts one batch of requests with these rows.
    fn count(&self, runner: &BatchRunner, rows: &[usize]) {
        let total: usize = rows.iter().sum();
        if let Some(on_batch) = &runner.on_batch {
            on_batch(total);
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.requests
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        self.rows.fetch_add(total as u64, Ordering::Relaxed);
    }
}

async fn run_batches(
    model: LoadedModel,
    policy: BatchPolicy,
    runner: Arc<BatchRunner>,
    mut rx: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    loop {
        if queue.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(job) => queue.push_back(job),
                None => return,
            }
        }
        // A free runner first: while every runner is busy, requests gather.
        let Ok(permit) = shared.runners.clone().acquire_owned().await else {
            return;
        };
        let taken = loop {
            while let Ok(job) = rx.try_recv() {
                queue.push_back(job);
            }
            let before = queue.len();
            queue.retain(|j| !j.reply.is_closed());
            shared
                .pending
                .fetch_sub(before - queue.len(), Ordering::AcqRel);
            let Some(oldest) = queue.front() else {
                break Vec::new();
            };
            let mates: Vec<usize> = (0..queue.len())
                .filter(|i| queue[*i].key == oldest.key)
                .collect();
            let rows: Vec<usize> = mates.iter().map(|i| queue[*i].rows).collect();
            let n = policy.take(&rows);
            let decision = if open {
                let more_coming = shared.arriving.load(Ordering::Acquire) > 0;
                policy.decide(rows[..n].iter().sum(), oldest.at.elapsed(), more_coming)
            } else {
                Decision::Run
            };
            match decision {
                Decision::Run => break mates[..n].to_vec(),
                Decision::Wait(more) => {
                    tokio::select! {
                        job = rx.recv() => match job {
                            Some(job) => queue.push_back(job),
                            None => open = false,
                        },
                        () = tokio::time::sleep(more) => {}
                    }
                }
            }
        };
        if taken.is_empty() {
            continue;
        }
        let mut jobs = Vec::with_capacity(taken.len());
        for i in taken.into_iter().rev() {
            if let Some(job) = queue.remove(i) {
                jobs.push(job);
            }
        }
        jobs.reverse();
        shared.pending.fetch_sub(jobs.len(), Ordering::AcqRel);
        let (model, runner, shared) = (model.clone(), runner.clone(), shared.clone());
        tokio::spawn(async move {
            let _permit = permit;
            run_one(&model, &runner, jobs, &shared.stats).await;
        });
    }
}

/// Runs one batch of queued requests (on a pool thread, like a lone
/// request: see [`InferencePool::run_on_pool`]) and answers each of them.
async fn run_one(model: &LoadedModel, runner: &BatchRunner, jobs: Vec<Job>, stats: &BatchStats) {
    let rows: Vec<usize> = jobs.iter().map(|j| j.rows).collect();
    let (inputs, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.inputs, j.reply)).unzip();
    let share = runner.share();
    let answers = match batch::concat(inputs) {
        Ok(joined) => runner
            .pool
            .run_on_pool(model, joined, share)
            .await
            .and_then(|outputs| batch::split(outputs, &rows).map_err(RunError::Engine)),
        Err(e) => Err(RunError::Engine(e)),
    };
    stats.count(runner, &rows);
    match answers {
        Ok(per_request) => {
            for (reply, outputs) in replies.into_iter().zip(per_request) {
                let _ = reply.send(Ok(outputs));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shoal_core::batch::BatchPolicy;

    use super::*;
    use crate::pool::tests::{Where, rows};

    /// A lone request runs where it is when the model is cheap and no
    /// other batch runs; with one running, it goes to a pool thread, where
    /// the hand-off gives later arrivals time to queue behind it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_request_runs_inline_unless_another_batch_runs() {
        let engine = Where::new();
        let pool = InferencePool::new(2, 8);
        let policy = BatchPolicy::new(8, Duration::from_millis(1), vec![]).unwrap();
        let runner = BatchRunner {
            pool,
            key: "m".into(),
            cap: 2,
            deadline: Duration::from_secs(5),
            queue: 8,
            on_batch: None,
        };
        let here = std::thread::current().id();
        let cheap = Batcher::start(
            engine.loaded(Some(Duration::from_micros(2))),
            policy.clone(),
            runner.clone(),
        );
        cheap.run(rows(1), None).await.unwrap();
        let other_batch = cheap.shared.runners.clone().try_acquire_owned().unwrap();
        cheap.run(rows(1), cheap.admit().ok()).await.unwrap();
        drop(other_batch);
        cheap.run(rows(1), cheap.admit().ok()).await.unwrap();
        // A model too slow (or never measured) to run inline: a pool thread.
        let slow = Batcher::start(
            engine.loaded(Some(Duration::from_millis(1))),
            policy,
            runner,
        );
        slow.run(rows(1), None).await.unwrap();
        assert_eq!(engine.ran_on(here), [true, false, true, false]);
        assert_eq!(cheap.stats().batches(), 3, "each ran as a batch of one");
    }
}
