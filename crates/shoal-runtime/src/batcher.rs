//! Dynamic batching, the I/O shell around [`shoal_core::batch`]: requests
//! to one model version queue here and are run as batches formed by the
//! version's [`BatchPolicy`], each a single inference on the
//! [`InferencePool`], every request handed its own rows back. The callers
//! do the batching themselves (flat combining, see [`Batcher::run`]):
//! no task of the batcher's own sits between a request and its batch.
//!
//! - A request is checked against the model *before* it queues: a bad one
//!   is refused alone and never fails its batch-mates.
//! - Only requests with the same [`batch_key`](batch::batch_key) (inputs, datatypes and
//!   every dimension but the first) share a batch; others wait for the
//!   next one, oldest first.
//! - At most `cap` batches run at once (the model's share of the pool,
//!   or one for a model cheap enough to run inline): while they run,
//!   requests gather, so batches grow with the load.
//! - The queue is bounded: past it a request is refused at once as
//!   overloaded (the HTTP layer answers 503 with `Retry-After`).
//! - A request whose caller went away before its batch formed is dropped;
//!   one whose caller was forming a batch hands forming on. No request
//!   waits for its batch and its run past its deadline.
//! - Callers [`Batcher::admit`] a request as soon as they start
//!   receiving it (refused at once when the queue is full); a batch waits
//!   for more only while some are admitted and not yet queued (see
//!   [`shoal_core::batch`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use shoal_core::Tensor;
use shoal_core::batch::{self, BatchPolicy, Decision};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::pool::millis;
use crate::{InferencePool, LoadedModel, RunError, Share};

/// A request checked and waiting for its batch.
struct Queued {
    /// Which request it is, among this batcher's.
    id: u64,
    key: batch::BatchKey,
    rows: usize,
    inputs: Vec<Tensor>,
    at: Instant,
}

/// A queued request and where its answer goes.
struct Job {
    queued: Queued,
    reply: oneshot::Sender<Reply>,
}

/// Where a request goes, decided as it arrives.
enum Path {
    /// Nothing queued or on its way, a runner free: it runs at once, as a
    /// batch of one (`true`: on its own task).
    Alone(Queued, bool),
    /// It forms the next batch.
    Lead(Queued),
    /// Queued for a batch another caller forms (`true`: who waits for
    /// more requests, to be told).
    Follow(oneshot::Receiver<Reply>, bool),
}

/// What a queued request's caller is told.
enum Reply {
    /// Its own outputs, or why not.
    Done(Result<Vec<Tensor>, RunError>),
    /// Form the next batch: its request (handed back, the oldest queued)
    /// leads it.
    Lead(Forming, Queued),
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
    /// Longest a request may wait for its batch, a thread and the run.
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

/// One model version's batching queue. Its callers do the batching
/// themselves (there is no task of its own): see [`Batcher::run`].
#[derive(Debug)]
pub struct Batcher {
    shared: Arc<Shared>,
}

/// What every caller of one batcher sees.
struct Shared {
    model: LoadedModel,
    policy: BatchPolicy,
    runner: BatchRunner,
    queue: Mutex<Queue>,
    /// Woken when a request queues while the former waits for requests,
    /// or when a batch ends while one forms.
    changed: Notify,
    /// Requests announced and not yet queued.
    arriving: AtomicUsize,
    /// The former waits for more requests (not for a runner): a request
    /// queued, or the last one on its way giving up (refused, or its
    /// client gone), may be what it waits for, and wakes it. Written under
    /// the queue's lock; an atomic so that an `Arrival` dropped while the
    /// lock is held can read it.
    awaiting: AtomicBool,
    /// The next request's id.
    next_id: AtomicU64,
    stats: BatchStats,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("policy", &self.policy)
            .field("runner", &self.runner)
            .field("arriving", &self.arriving)
            .finish_non_exhaustive()
    }
}

/// The queue and who works on it.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// A caller is forming the next batch. Whenever none is, the queue
    /// is empty: whoever stops forming hands the task on to the oldest
    /// request still waiting.
    forming: bool,
    /// Batches (and lone requests) launched and not yet answered, at most
    /// the runner's cap.
    running: usize,
    /// One of them runs on its former's task (the model runs it in a few
    /// microseconds, as an unbatched request would run). One such batch
    /// at a time: a second cheap one beside it waits, gathering requests,
    /// rather than pay a pool thread's hand-off, which costs more than
    /// the run (digits, one row a request, 32 clients: 0.76× the
    /// unbatched throughput allowing two, ≈ 1× with one; BENCHMARKS.md).
    inline: bool,
}

/// A request on its way to a batcher (being received or decoded): batches
/// wait for it, within the delay. Dropped when it is queued or given up.
#[derive(Debug)]
pub struct Arrival(Arc<Shared>);

impl Drop for Arrival {
    fn drop(&mut self) {
        if self.0.arriving.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.awaiting.load(Ordering::Acquire)
        {
            self.0.changed.notify_one();
        }
    }
}

/// The duty of forming the next batch, held by one caller at a time.
/// Dropped while held (its caller went away, or was told to lead and had
/// gone), it passes to the oldest request still waiting.
struct Forming {
    shared: Arc<Shared>,
    held: bool,
}

impl Drop for Forming {
    fn drop(&mut self) {
        if self.held {
            let mut queue = self.shared.lock();
            queue.forming = false;
            self.shared.awaiting.store(false, Ordering::Release);
            self.shared.hand_on(queue);
        }
    }
}

/// A batch (or lone request) counted as running until dropped (`true`:
/// on its former's task): then, if a batch is forming, its former is told
/// a runner is free.
struct Running(Arc<Shared>, bool);

impl Drop for Running {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        queue.running -= 1;
        if self.1 {
            queue.inline = false;
        }
        let forming = queue.forming;
        drop(queue);
        if forming {
            self.0.changed.notify_one();
        }
    }
}

impl Batcher {
    /// Batches `model`'s requests by `policy`, on `runner`'s pool.
    pub fn start(model: LoadedModel, policy: BatchPolicy, runner: BatchRunner) -> Batcher {
        Batcher {
            shared: Arc::new(Shared {
                model,
                policy,
                runner,
                queue: Mutex::new(Queue::default()),
                changed: Notify::new(),
                arriving: AtomicUsize::new(0),
                awaiting: AtomicBool::new(false),
                next_id: AtomicU64::new(0),
                stats: BatchStats::default(),
            }),
        }
    }

    /// Admits a request on its way (before it is read and decoded) and
    /// tells the batcher it is coming; keep the [`Arrival`] until
    /// [`Batcher::run`] takes it. Refused at once (`Overloaded`) when the
    /// requests queued and on their way already fill the queue.
    pub fn admit(&self) -> Result<Arrival, RunError> {
        let shared = &self.shared;
        let arriving = shared.arriving.fetch_add(1, Ordering::AcqRel);
        let arrival = Arrival(shared.clone());
        let queued = shared.lock().jobs.len();
        if queued + arriving >= shared.runner.queue.max(1) {
            return Err(RunError::Overloaded {
                queued: queued + arriving,
            });
        }
        Ok(arrival)
    }

    /// What it has done.
    pub fn stats(&self) -> &BatchStats {
        &self.shared.stats
    }

    /// Checks `inputs`, queues them for a batch (ending their `arrival`)
    /// and waits for their own outputs.
    ///
    /// The callers batch (flat combining): the first request to queue
    /// while no batch is forming forms the next one — it waits, by the
    /// policy, for the requests on their way and a free runner, takes its
    /// batch and launches it — and the others wait for their answers. A
    /// batch the model runs cheaply runs on the former's task, as an
    /// unbatched request would, one such batch at a time; a costlier one
    /// on a pool thread, which answers every request in it. Forming
    /// passes to the oldest request still waiting. So a batch costs no hop through a
    /// task of the batcher's own, and a request alone (nothing queued or
    /// on its way, a runner free) runs at once, as if unbatched.
    pub async fn run(
        &self,
        inputs: Vec<Tensor>,
        arrival: Option<Arrival>,
    ) -> Result<Vec<Tensor>, RunError> {
        let shared = &self.shared;
        let inputs = shared.model.check(inputs)?;
        let (rows, key) = batch::batch_key(&inputs).ok_or_else(|| {
            RunError::Engine("a batched model's inputs need a batch dimension first".into())
        })?;
        let at = Instant::now();
        let deadline = at.checked_add(shared.runner.deadline);
        let alone = usize::from(arrival.is_some());
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let queued = Queued {
            id,
            key,
            rows,
            inputs,
            at,
        };
        // Decided under the queue's lock, let go before any wait. The
        // arrival ends under it too: a former that then looks at the
        // requests on their way no longer counts this one.
        let path = {
            let mut queue = shared.lock();
            let arrival = arrival;
            if queue.jobs.is_empty()
                && !queue.forming
                && shared.arriving.load(Ordering::Acquire) <= alone
                && let inline = shared.model.runs_inline(&queued.inputs)
                && queue.has_room(&shared.runner, inline)
            {
                queue.running += 1;
                queue.inline |= inline;
                drop(arrival);
                Path::Alone(queued, inline)
            } else if queue.jobs.len() >= shared.runner.queue.max(1) {
                return Err(RunError::Overloaded {
                    queued: queue.jobs.len(),
                });
            } else if queue.forming {
                let (reply, answer) = oneshot::channel();
                queue.jobs.push_back(Job { queued, reply });
                drop(arrival);
                Path::Follow(answer, shared.awaiting.load(Ordering::Acquire))
            } else {
                queue.forming = true;
                drop(arrival);
                Path::Lead(queued)
            }
        };
        let mut answer = match path {
            Path::Alone(queued, inline) => {
                let running = Running(shared.clone(), inline);
                let outputs = shared
                    .runner
                    .pool
                    .run_checked(&shared.model, queued.inputs, shared.runner.share())
                    .await;
                drop(running);
                shared.stats.count(&shared.runner, &[rows]);
                return outputs;
            }
            Path::Follow(answer, awaited) => {
                if awaited {
                    shared.changed.notify_one();
                }
                answer
            }
            Path::Lead(queued) => {
                let forming = Forming {
                    shared: shared.clone(),
                    held: true,
                };
                // Past the deadline while forming: never launched, `Busy`.
                within(deadline, shared.lead(forming, queued))
                    .await
                    .ok_or_else(|| shared.busy())?
            }
        };
        loop {
            let Some(reply) = within(deadline, &mut answer).await else {
                return shared.late(id, &mut answer);
            };
            match reply {
                Ok(Reply::Done(outputs)) => return outputs,
                Ok(Reply::Lead(forming, queued)) => {
                    answer = within(deadline, shared.lead(forming, queued))
                        .await
                        .ok_or_else(|| shared.busy())?;
                }
                Err(_) => return Err(RunError::Engine("the batch was abandoned".into())),
            }
        }
    }
}

/// `work`, or `None` once the request's deadline passes.
async fn within<T>(
    deadline: Option<Instant>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at, work).await.ok(),
        None => Some(work.await),
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request that waited its deadline out before its batch was
    /// launched: `Busy`, as a request that waited for a pool thread (the
    /// HTTP layer answers 503: retry elsewhere).
    fn busy(&self) -> RunError {
        RunError::Busy {
            waited_ms: millis(self.runner.deadline),
        }
    }

    /// What request `id`, whose deadline has passed, is told: its answer
    /// if it has just come; `Busy` while it is still queued or was just
    /// told to form a batch (never launched); else `DeadlineExceeded` (its
    /// batch runs on).
    fn late(
        &self,
        id: u64,
        answer: &mut oneshot::Receiver<Reply>,
    ) -> Result<Vec<Tensor>, RunError> {
        match answer.try_recv() {
            Ok(Reply::Done(outputs)) => return outputs,
            // Dropped here: forming passes on.
            Ok(Reply::Lead(..)) => return Err(self.busy()),
            Err(_) => {}
        }
        if self.lock().jobs.iter().any(|j| j.queued.id == id) {
            return Err(self.busy());
        }
        Err(RunError::DeadlineExceeded {
            deadline_ms: millis(self.runner.deadline),
        })
    }

    /// With nobody forming: the oldest request whose caller still waits
    /// forms the next batch (requests whose callers went away are dropped
    /// on the way). Told after the lock is let go: a `Lead` dropped on
    /// its way hands forming on again, which takes the lock.
    fn hand_on<'a>(self: &'a Arc<Self>, mut queue: MutexGuard<'a, Queue>) {
        loop {
            if queue.forming {
                return;
            }
            let Some(job) = queue.jobs.pop_front() else {
                return;
            };
            if job.reply.is_closed() {
                continue;
            }
            queue.forming = true;
            drop(queue);
            let forming = Forming {
                shared: self.clone(),
                held: true,
            };
            match job.reply.send(Reply::Lead(forming, job.queued)) {
                Ok(()) => return,
                Err(gone) => {
                    // Its caller went away meanwhile: the next one.
                    if let Reply::Lead(mut forming, _) = gone {
                        forming.held = false;
                    }
                    queue = self.lock();
                    queue.forming = false;
                }
            }
        }
    }

    /// Forms a batch led by `own` (queued first, as the oldest) and
    /// launches it; the answer to `own` comes on the channel returned.
    async fn lead(self: &Arc<Self>, forming: Forming, own: Queued) -> oneshot::Receiver<Reply> {
        let (reply, answer) = oneshot::channel();
        {
            let mut queue = self.lock();
            queue.jobs.push_front(Job { queued: own, reply });
        }
        self.form(forming).await;
        answer
    }

    /// Waits, by the policy, for the requests on their way and for a free
    /// runner, then takes the oldest request's batch and launches it,
    /// handing forming on first.
    async fn form(self: &Arc<Self>, mut forming: Forming) {
        loop {
            let wait = {
                let mut queue = self.lock();
                self.awaiting.store(false, Ordering::Release);
                queue.jobs.retain(|j| !j.reply.is_closed());
                let Some(oldest) = queue.jobs.front() else {
                    // Cannot happen while the former's own request waits
                    // (its answer channel is open); kept so that a former
                    // never loops on an empty queue.
                    forming.held = false;
                    queue.forming = false;
                    return;
                };
                let key = &oldest.queued.key;
                let mates: Vec<usize> = (0..queue.jobs.len())
                    .filter(|i| queue.jobs[*i].queued.key == *key)
                    .collect();
                let rows: Vec<usize> = mates.iter().map(|i| queue.jobs[*i].queued.rows).collect();
                let n = self.policy.take(&rows);
                let more_coming = self.arriving.load(Ordering::Acquire) > 0;
                let elements = mates[..n]
                    .iter()
                    .flat_map(|i| &queue.jobs[*i].queued.inputs)
                    .map(|t| t.data().len())
                    .sum();
                let inline = self.model.runs_elements_inline(elements);
                match self.policy.decide(
                    rows[..n].iter().sum(),
                    oldest.queued.at.elapsed(),
                    more_coming,
                ) {
                    Decision::Wait(more) => {
                        self.awaiting.store(true, Ordering::Release);
                        Some(more)
                    }
                    // While the runners are busy, requests gather.
                    Decision::Run if !queue.has_room(&self.runner, inline) => None,
                    Decision::Run => {
                        let mut jobs = Vec::with_capacity(n);
                        for i in mates[..n].iter().rev() {
                            if let Some(job) = queue.jobs.remove(*i) {
                                jobs.push(job);
                            }
                        }
                        jobs.reverse();
                        queue.running += 1;
                        queue.inline |= inline;
                        forming.held = false;
                        queue.forming = false;
                        self.hand_on(queue);
                        self.launch(jobs, inline);
                        return;
                    }
                }
            };
            match wait {
                None => self.changed.notified().await,
                Some(more) => {
                    tokio::select! {
                        () = self.changed.notified() => {}
                        () = tokio::time::sleep(more) => {}
                    }
                }
            }
        }
    }

    /// Runs one batch of queued requests — on this task when the model
    /// runs it cheaply (`inline`), else on a pool thread — and answers
    /// each of them (see [`InferencePool::launch`]).
    fn launch(self: &Arc<Self>, jobs: Vec<Job>, inline: bool) {
        let running = Running(self.clone(), inline);
        // A thread is waited for no longer than the last request in the
        // batch waits for its answer.
        let newest = jobs.iter().map(|j| j.queued.at).max();
        let share = Share {
            deadline: newest
                .and_then(|at| at.checked_add(self.runner.deadline))
                .map_or(self.runner.deadline, |end| {
                    end.saturating_duration_since(Instant::now())
                }),
            ..self.runner.share()
        };
        let rows: Vec<usize> = jobs.iter().map(|j| j.queued.rows).collect();
        let (inputs, replies): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.queued.inputs, j.reply)).unzip();
        let joined = match batch::concat(inputs) {
            Ok(joined) => joined,
            Err(e) => {
                drop(running);
                answer(replies, Err(RunError::Engine(e)));
                return;
            }
        };
        let shared = self.clone();
        self.runner
            .pool
            .launch(&self.model, joined, share, move |outputs| {
                drop(running);
                shared.stats.count(&shared.runner, &rows);
                match outputs
                    .and_then(|outputs| batch::split(outputs, &rows).map_err(RunError::Engine))
                {
                    Ok(per_request) => {
                        for (reply, outputs) in replies.into_iter().zip(per_request) {
                            let _ = reply.send(Reply::Done(Ok(outputs)));
                        }
                    }
                    Err(e) => answer(replies, Err(e)),
                }
            });
    }
}

/// Gives every request of a batch the same answer (an error).
fn answer(replies: Vec<oneshot::Sender<Reply>>, outputs: Result<Vec<Tensor>, RunError>) {
    for reply in replies {
        let _ = reply.send(Reply::Done(outputs.clone()));
    }
}

impl Queue {
    /// Whether a batch may start now: under the runner's cap, and the only
    /// one on its former's task if it runs there.
    fn has_room(&self, runner: &BatchRunner, inline: bool) -> bool {
        self.running < runner.cap.max(1) && !(inline && self.inline)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shoal_core::batch::BatchPolicy;

    use super::*;
    use crate::pool::tests::{Where, rows, wide};

    /// A lone request runs at once, as a batch of one: where it is when
    /// the model runs it cheaply, else on a pool thread. One batch at a
    /// time runs on its former's task: beside it, a cheap request waits
    /// for it, a costly one goes to a pool thread (up to the cap).
    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_request_runs_at_once_one_inline_at_a_time() {
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
        let cheap = Arc::new(Batcher::start(
            engine.loaded(Some(Duration::from_micros(2))),
            policy.clone(),
            runner.clone(),
        ));
        cheap.run(rows(1), None).await.unwrap();
        cheap.run(rows(1), cheap.admit().ok()).await.unwrap();
        // 100 rows at 2 µs: too long for the task.
        cheap.run(rows(100), None).await.unwrap();
        // Beside a batch running inline: a costly request runs on a pool
        // thread, a cheap one waits for that batch, then runs inline.
        let inline_batch = {
            let mut queue = cheap.shared.lock();
            queue.running += 1;
            queue.inline = true;
            Running(cheap.shared.clone(), true)
        };
        cheap.run(rows(100), None).await.unwrap();
        let waits = spawn_run(&cheap, 1);
        until_queued(&cheap, 1).await;
        assert!(!waits.is_finished());
        drop(inline_batch);
        waits.await.unwrap().unwrap();
        // A model too slow (or never measured) to run inline: a pool thread.
        let slow = Batcher::start(
            engine.loaded(Some(Duration::from_millis(1))),
            policy,
            runner,
        );
        slow.run(rows(1), None).await.unwrap();
        assert_eq!(engine.ran_on(here), [true, true, false, false, true, false]);
        assert_eq!(cheap.stats().batches(), 5, "each ran as a batch of one");
        assert_idle(&cheap);
        assert_idle(&slow);
    }

    /// A batcher of the cheap test engine (runs inline) with one runner,
    /// batches of up to 8 rows within 10 ms, and this deadline.
    fn one_runner(engine: &Arc<Where>, deadline: Duration) -> Arc<Batcher> {
        let policy = BatchPolicy::new(8, Duration::from_millis(10), vec![]).unwrap();
        let runner = BatchRunner {
            pool: InferencePool::new(1, 8),
            key: "m".into(),
            cap: 1,
            deadline,
            queue: 8,
            on_batch: None,
        };
        Arc::new(Batcher::start(
            engine.loaded(Some(Duration::from_micros(1))),
            policy,
            runner,
        ))
    }

    fn spawn_run(
        batcher: &Arc<Batcher>,
        n: usize,
    ) -> tokio::task::JoinHandle<Result<Vec<Tensor>, RunError>> {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.run(rows(n), None).await })
    }

    /// Lets the other tasks run until `queued` requests are queued.
    async fn until_queued(batcher: &Batcher, queued: usize) {
        for _ in 0..1000 {
            if batcher.shared.lock().jobs.len() == queued {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{queued} requests never queued");
    }

    /// Nothing forming, queued or running: the batcher is idle.
    fn assert_idle(batcher: &Batcher) {
        let queue = batcher.shared.lock();
        assert!(!queue.forming, "nobody forms");
        assert!(!queue.inline, "nothing runs inline");
        assert!(queue.jobs.is_empty(), "nothing queued");
        assert_eq!(queue.running, 0, "nothing runs");
    }

    /// Two requests queue while their batch waits for a request on its
    /// way; one caller goes away (its client hung up). When it is the
    /// one forming the batch, the other forms it instead — nobody is left
    /// waiting for a batch nobody forms; when it is the other, the batch
    /// runs without it. Either way the one left gets its own rows.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_caller_gone_is_not_run_and_forming_passes_on() {
        for former_goes in [true, false] {
            let engine = Where::new();
            let batcher = one_runner(&engine, Duration::from_secs(5));
            let on_its_way = batcher.admit().unwrap();
            let former = spawn_run(&batcher, 1);
            until_queued(&batcher, 1).await;
            let follower = spawn_run(&batcher, 2);
            until_queued(&batcher, 2).await;
            let (gone, left, rows_left) = match former_goes {
                true => (former, follower, 2),
                false => (follower, former, 1),
            };
            gone.abort();
            assert!(gone.await.unwrap_err().is_cancelled());
            // The one left waits out the delay for the request on its
            // way, then runs as a batch of its own rows only.
            let answer = left.await.unwrap().unwrap();
            assert_eq!(answer[0].shape(), [rows_left, 1], "{former_goes}");
            let stats = batcher.stats();
            assert_eq!((stats.batches(), stats.rows()), (1, rows_left as u64));
            drop(on_its_way);
            assert_idle(&batcher);
            batcher.run(rows(1), None).await.unwrap();
            assert_eq!(engine.ran_on(std::thread::current().id()).len(), 2);
        }
    }

    /// Only requests of the same shape past the first dimension share a
    /// batch; the others wait for the next one. And the last request on
    /// its way giving up (a bad body, a client gone) wakes the former at
    /// once: nothing more is coming.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn only_requests_of_one_shape_share_a_batch() {
        let engine = Where::new();
        let batcher = one_runner(&engine, Duration::from_secs(5));
        let on_its_way = batcher.admit().unwrap();
        let started = Instant::now();
        let spawn_wide = |n: usize, width: usize| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.run(wide(n, width), None).await })
        };
        let narrow = spawn_wide(1, 1);
        until_queued(&batcher, 1).await;
        let broad = spawn_wide(1, 2);
        until_queued(&batcher, 2).await;
        let narrow_too = spawn_wide(2, 1);
        until_queued(&batcher, 3).await;
        drop(on_its_way);
        for (task, shape) in [(narrow, [1, 1]), (broad, [1, 2]), (narrow_too, [2, 1])] {
            assert_eq!(task.await.unwrap().unwrap()[0].shape(), shape);
        }
        assert_eq!(
            (batcher.stats().batches(), batcher.stats().rows()),
            (2, 4),
            "the narrow ones together, the broad one alone"
        );
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "nobody waited out the delay"
        );
        assert_idle(&batcher);
    }

    /// While every runner is busy, requests wait for one, but no longer
    /// than their deadline; then the batcher is as it was.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_request_waits_for_a_runner_no_longer_than_its_deadline() {
        let engine = Where::new();
        let batcher = one_runner(&engine, Duration::from_millis(50));
        // Another batch holds the only runner.
        batcher.shared.lock().running += 1;
        let started = Instant::now();
        let (former, follower) =
            tokio::join!(batcher.run(rows(1), None), batcher.run(rows(1), None));
        // Never launched: `Busy` (retry elsewhere), as a request that
        // waited for a pool thread.
        for late in [former, follower] {
            assert!(
                matches!(late, Err(RunError::Busy { waited_ms: 50 })),
                "{late:?}"
            );
        }
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        batcher.shared.lock().running -= 1;
        assert_idle(&batcher);
        assert!(engine.ran_on(std::thread::current().id()).is_empty());
        batcher.run(rows(1), None).await.unwrap();
    }
}
