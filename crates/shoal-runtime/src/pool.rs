//! A bounded pool for blocking inference work.
//!
//! Inference is CPU-bound and would stall every connection if it ran on the
//! async executor. Each call takes one of `threads` permits and runs on
//! tokio's blocking threads; at most `threads` inferences run at once, so the
//! engine never oversubscribes the cores. Waiting calls queue, up to
//! `max_queue`; past that, calls fail fast with [`RunError::Overloaded`] so a
//! gateway can retry on a less busy replica instead of timing out here.
//!
//! A model measured at load to run a row in a few microseconds runs small
//! requests on the calling task instead ([`crate::LoadedModel::runs_inline`]):
//! the hand-off to a blocking thread and back costs more than such an
//! inference, and so little work does not stall the executor. It still
//! takes a permit and its model's share first.
//! A panic in the engine is an error for its request (and a batch's
//! requests) wherever it ran: it never tears the calling task, and its
//! connection, down.
//!
//! [`InferencePool::run_shared`] adds two bounds on what one request, or
//! one model, can cost the others ([`Share`]): each model may hold at most
//! `cap` threads (a replica serving several models leaves one thread for
//! the others, so a model of slow requests cannot starve a fast one), and
//! each request has a deadline: waiting past it is [`RunError::Busy`]
//! (retry elsewhere), running past it is [`RunError::DeadlineExceeded`]
//! (the answer is abandoned; the thread finishes and is then free).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shoal_core::Tensor;
use tokio::sync::{Notify, Semaphore};

use crate::{LoadedModel, RunError};

/// Runs inference on a bounded number of blocking threads.
#[derive(Debug, Clone)]
pub struct InferencePool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    permits: Arc<Semaphore>,
    threads: usize,
    max_queue: usize,
    queued: AtomicUsize,
    /// Requests admitted (see [`InferencePool::admit`]) and not yet run.
    admitted: AtomicUsize,
    /// Threads held per model key (the key shared with each hold). An
    /// entry stays at zero when its model holds none (re-inserting it
    /// would allocate on every request) until the map grows past
    /// [`HELD_KEYS`].
    held: Mutex<HeldCounts>,
    /// Woken when a model gives a thread back and someone waits.
    returned: Notify,
    /// Calls waiting in [`InferencePool::hold`]: without them, a thread
    /// given back wakes nobody (and takes no lock for it).
    holding: AtomicUsize,
}

/// Threads held per model key, the key shared with each [`Held`].
type HeldCounts = hashbrown::HashMap<Arc<str>, usize>;

/// Model keys kept at zero holds before they are swept.
const HELD_KEYS: usize = 64;

/// A request admitted to the pool before it was decoded (see
/// [`InferencePool::admit`]); counts against the queue until dropped.
#[derive(Debug)]
pub struct Admission(Arc<Inner>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How one inference shares the pool with the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share<'a> {
    /// Whose inference it is (the model's name).
    pub key: &'a str,
    /// At most this many of the pool's threads for `key` at once.
    pub cap: usize,
    /// Longest the request may take, waiting and running.
    pub deadline: Duration,
}

/// A model's hold on one thread, returned on drop (also when the caller
/// went away while the inference ran on).
struct Held {
    inner: Arc<Inner>,
    key: Arc<str>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self
            .inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&*self.key) {
            *n -= 1;
            if *n == 0 && held.len() > HELD_KEYS {
                held.retain(|_, n| *n > 0);
            }
        }
        drop(held);
        // After the count went down: a waiter counted after this load
        // takes the lock after it too, and sees the thread free.
        if self.inner.holding.load(Ordering::SeqCst) > 0 {
            self.inner.returned.notify_waiters();
        }
    }
}

/// Counts a call in [`InferencePool::hold`] until it leaves (with a
/// thread, or dropped while waiting).
struct Holding<'a>(&'a AtomicUsize);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A snapshot of the pool's occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Inferences allowed to run at once.
    pub threads: usize,
    /// Inferences running now.
    pub running: usize,
    /// Inferences waiting for a thread.
    pub queued: usize,
}

/// Decrements the queue counter when a waiting call leaves the queue, even
/// if its future is dropped while waiting (client gone).
struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InferencePool {
    /// A pool running at most `threads` inferences at once with at most
    /// `max_queue` waiting.
    pub fn new(threads: usize, max_queue: usize) -> InferencePool {
        let threads = threads.max(1);
        InferencePool {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(threads)),
                threads,
                max_queue,
                queued: AtomicUsize::new(0),
                admitted: AtomicUsize::new(0),
                held: Mutex::new(hashbrown::HashMap::new()),
                returned: Notify::new(),
                holding: AtomicUsize::new(0),
            }),
        }
    }

    /// How many threads one of `models` models should hold at most: all
    /// of them for a single model, else all but one (at least one).
    pub fn cap_for(&self, models: usize) -> usize {
        if models > 1 {
            (self.inner.threads - 1).max(1)
        } else {
            self.inner.threads
        }
    }

    /// Takes a thread for `key` if it holds fewer than `cap`.
    fn try_hold(&self, key: &str, cap: usize) -> Option<Held> {
        let mut held = self
            .inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (key, n) = match held.get_key_value_mut(key) {
            Some((key, n)) => (key.clone(), n),
            None => {
                let key: Arc<str> = Arc::from(key);
                let n = held.entry(key.clone()).or_insert(0);
                (key, n)
            }
        };
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Held {
            inner: self.inner.clone(),
            key,
        })
    }

    /// Waits until `key` holds fewer than `cap` threads, and takes one.
    async fn hold(&self, key: &str, cap: usize) -> Held {
        self.inner.holding.fetch_add(1, Ordering::SeqCst);
        let _counted = Holding(&self.inner.holding);
        loop {
            let returned = self.inner.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(h) = self.try_hold(key, cap) {
                return h;
            }
            returned.await;
        }
    }

    /// A pool sized to the machine's cores, with a queue of 64 per core.
    pub fn for_cores() -> InferencePool {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        InferencePool::new(cores, cores * 64)
    }

    /// Checks `inputs` against the model's signature and bounds and runs
    /// it on a pool thread, with no per-model cap and no deadline.
    pub async fn run(
        &self,
        model: &LoadedModel,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, RunError> {
        let share = Share {
            key: "",
            cap: self.inner.threads,
            deadline: Duration::MAX,
        };
        self.run_shared(model, inputs, share).await
    }

    /// Checks `inputs` against the model's signature and bounds and runs
    /// it on a pool thread, within `share`'s cap and deadline.
    pub async fn run_shared(
        &self,
        model: &LoadedModel,
        inputs: Vec<Tensor>,
        share: Share<'_>,
    ) -> Result<Vec<Tensor>, RunError> {
        let inputs = model.check(inputs)?;
        self.run_checked(model, inputs, share).await
    }

    /// [`InferencePool::run_shared`] for inputs already checked against
    /// the model (the batcher checks each request as it queues).
    pub(crate) async fn run_checked(
        &self,
        model: &LoadedModel,
        inputs: Vec<Tensor>,
        share: Share<'_>,
    ) -> Result<Vec<Tensor>, RunError> {
        let started = tokio::time::Instant::now();
        let deadline = started.checked_add(share.deadline);
        let (held, permit) = self.acquire(share, deadline).await?;
        // Cheap enough to run where we are: the hand-off to a blocking
        // thread would cost more than the inference (see
        // `LoadedModel::runs_inline`). It still holds its thread and the
        // model's share, so the bounds hold.
        if model.runs_inline(&inputs) {
            let answer = run_caught(&*model.model, inputs);
            drop((held, permit));
            return answer;
        }
        let model = model.model.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _held = held;
            model.run(inputs)
        });
        let finished =
            match deadline {
                Some(at) => tokio::time::timeout_at(at, task).await.map_err(|_| {
                    RunError::DeadlineExceeded {
                        deadline_ms: millis(share.deadline),
                    }
                })?,
                None => task.await,
            };
        finished.map_err(|e| RunError::Engine(format!("inference task failed: {e}")))?
    }

    /// Runs checked `inputs` and hands the answer to `done` without the
    /// caller waiting for it: where the caller is when the model measured
    /// them cheap and a thread of the pool and of `share`'s model is free
    /// at once; else on a pool thread, which calls `done` (a task
    /// waits for a thread first when none is free: `Busy` past the
    /// deadline, `Overloaded` when the queue is full). The batcher launches
    /// its batches so: once launched, a batch answers every request in it
    /// even if the caller that launched it goes away.
    pub(crate) fn launch<F>(
        &self,
        model: &LoadedModel,
        inputs: Vec<Tensor>,
        share: Share<'_>,
        done: F,
    ) where
        F: FnOnce(Result<Vec<Tensor>, RunError>) + Send + 'static,
    {
        fn on_thread<F>(
            model: Arc<dyn crate::Model>,
            hold: (Held, tokio::sync::OwnedSemaphorePermit),
            inputs: Vec<Tensor>,
            done: F,
        ) where
            F: FnOnce(Result<Vec<Tensor>, RunError>) + Send + 'static,
        {
            tokio::task::spawn_blocking(move || {
                let answer = run_caught(&*model, inputs);
                drop(hold);
                done(answer);
            });
        }
        match (
            self.try_hold(share.key, share.cap),
            self.inner.permits.clone().try_acquire_owned(),
        ) {
            (Some(held), Ok(permit)) if model.runs_inline(&inputs) => {
                let answer = run_caught(&*model.model, inputs);
                drop((held, permit));
                done(answer);
            }
            (Some(held), Ok(permit)) => {
                on_thread(model.model.clone(), (held, permit), inputs, done)
            }
            (held, permit) => {
                drop((held, permit));
                let (pool, model) = (self.clone(), model.model.clone());
                let (key, cap, limit) = (share.key.to_owned(), share.cap, share.deadline);
                let deadline = tokio::time::Instant::now().checked_add(limit);
                tokio::spawn(async move {
                    let share = Share {
                        key: &key,
                        cap,
                        deadline: limit,
                    };
                    match pool.acquire(share, deadline).await {
                        Ok(hold) => on_thread(model, hold, inputs, done),
                        Err(e) => done(Err(e)),
                    }
                });
            }
        }
    }

    /// A thread of the pool and of `share`'s model, at once when both are
    /// free, else after waiting in the queue (refused when it is full,
    /// `Busy` past the deadline).
    async fn acquire(
        &self,
        share: Share<'_>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(Held, tokio::sync::OwnedSemaphorePermit), RunError> {
        Ok(
            match (
                self.try_hold(share.key, share.cap),
                self.inner.permits.clone().try_acquire_owned(),
            ) {
                (Some(held), Ok(permit)) => (held, permit),
                (held, permit) => {
                    // Not both at once: wait in the queue, if there is room.
                    drop(permit);
                    drop(held);
                    let queued = self.inner.queued.fetch_add(1, Ordering::Relaxed);
                    let slot = QueueSlot(&self.inner.queued);
                    if queued >= self.inner.max_queue {
                        return Err(RunError::Overloaded { queued });
                    }
                    let wait = async {
                        let held = self.hold(share.key, share.cap).await;
                        let permit = self
                            .inner
                            .permits
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|_| RunError::Engine("inference pool closed".into()))?;
                        Ok::<_, RunError>((held, permit))
                    };
                    let waited =
                        match deadline {
                            Some(at) => tokio::time::timeout_at(at, wait).await.map_err(|_| {
                                RunError::Busy {
                                    waited_ms: millis(share.deadline),
                                }
                            })?,
                            None => wait.await,
                        }?;
                    drop(slot);
                    waited
                }
            },
        )
    }

    /// Admits one request before it is read and decoded, or refuses it at
    /// once (`Overloaded`) when the inferences running, waiting and
    /// admitted already fill the threads and the queue: an overload is
    /// shed before its body is parsed. Hold the [`Admission`] until the
    /// request is handed to [`InferencePool::run_shared`].
    pub fn admit(&self) -> Result<Admission, RunError> {
        let admitted = self.inner.admitted.fetch_add(1, Ordering::AcqRel);
        let admission = Admission(self.inner.clone());
        let running = self.inner.threads - self.inner.permits.available_permits();
        let queued = self.inner.queued.load(Ordering::Relaxed);
        if running + queued + admitted >= self.inner.threads + self.inner.max_queue {
            return Err(RunError::Overloaded {
                queued: queued + admitted,
            });
        }
        Ok(admission)
    }

    /// Inferences that may wait for a thread before more are refused.
    pub fn queue_bound(&self) -> usize {
        self.inner.max_queue
    }

    /// Current occupancy.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            threads: self.inner.threads,
            running: self.inner.threads - self.inner.permits.available_permits(),
            queued: self.inner.queued.load(Ordering::Relaxed),
        }
    }
}

/// Runs `model`, a panic in the engine turned into an error, as a panic
/// on a blocking thread is: an inference run on the request's own task (or
/// a batch's former's) then answers its caller, and its batch-mates, with
/// a 500 instead of tearing the task, and its connection, down.
fn run_caught(model: &dyn crate::Model, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.run(inputs))).unwrap_or_else(
        |panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_owned());
            Err(RunError::Engine(format!(
                "inference task failed: the engine panicked: {why}"
            )))
        },
    )
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc;

    use shoal_core::{DataType, Dim, Signature, TensorData, TensorSpec};

    use super::*;
    use crate::Model;

    /// An engine whose runs block until the test releases them, so the
    /// pool's occupancy can be driven step by step.
    struct Gate {
        signature: Signature,
        started: Mutex<mpsc::Sender<()>>,
        release: Mutex<mpsc::Receiver<()>>,
    }

    impl Model for Gate {
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn platform(&self) -> &'static str {
            "gate"
        }
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
            self.started.lock().unwrap().send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
            Ok(inputs)
        }
    }

    /// `model` loaded, measured at `row_cost` a row of one element
    /// (`None`: never measured, never inline).
    fn loaded(model: Arc<dyn Model>, row_cost: Option<Duration>) -> LoadedModel {
        LoadedModel {
            model,
            platform: "test",
            bounds: Arc::default(),
            state: Arc::default(),
            batching: None,
            row_cost: row_cost.map(|c| (c, 1, crate::INLINE_MAX)),
            batched_row_cost: None,
        }
    }

    fn gate() -> (LoadedModel, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (started_tx, started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let model = Gate {
            signature: Signature {
                inputs: vec![TensorSpec {
                    name: "x".into(),
                    datatype: DataType::Fp32,
                    shape: vec![Dim::Fixed(1)],
                }],
                outputs: vec![],
            },
            started: Mutex::new(started_tx),
            release: Mutex::new(release_rx),
        };
        (loaded(Arc::new(model), None), started_rx, release_tx)
    }

    fn x() -> Vec<Tensor> {
        vec![Tensor::new("x", vec![1], TensorData::Fp32(vec![1.0])).unwrap()]
    }

    /// Starts a run of the gate that holds one of `pool`'s threads until
    /// released, and returns once it runs (with `started`, which later
    /// runs still report to).
    async fn hold_a_thread(
        pool: &InferencePool,
        model: &LoadedModel,
        started: mpsc::Receiver<()>,
    ) -> (
        tokio::task::JoinHandle<Result<Vec<Tensor>, RunError>>,
        mpsc::Receiver<()>,
    ) {
        let first = tokio::spawn({
            let (pool, model) = (pool.clone(), model.clone());
            async move { pool.run(&model, x()).await }
        });
        let started = tokio::task::spawn_blocking(move || {
            started.recv().unwrap();
            started
        })
        .await
        .unwrap();
        (first, started)
    }

    /// An engine that panics on every run.
    struct Panics(Signature);

    impl Model for Panics {
        fn signature(&self) -> &Signature {
            &self.0
        }
        fn platform(&self) -> &'static str {
            "panics"
        }
        fn run(&self, _: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
            panic!("a kernel's assertion failed");
        }
    }

    /// A panic in the engine is an error for the request, wherever it
    /// ran: on its own task, on a pool thread, launched as a batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_engine_that_panics_answers_an_error() {
        let pool = InferencePool::new(2, 8);
        let signature = Where::new().signature.clone();
        let panics = |row_cost| loaded(Arc::new(Panics(signature.clone())), row_cost);
        let share = Share {
            key: "m",
            cap: 2,
            deadline: Duration::from_secs(30),
        };
        for model in [panics(Some(Duration::from_micros(1))), panics(None)] {
            let ran = pool.run(&model, rows(1)).await;
            assert!(
                matches!(&ran, Err(RunError::Engine(e)) if e.contains("a kernel's assertion failed")),
                "{ran:?}"
            );
            let (tx, answer) = tokio::sync::oneshot::channel();
            pool.launch(&model, rows(1), share, move |outputs| {
                let _ = tx.send(outputs);
            });
            let launched = answer.await.expect("answered");
            assert!(matches!(launched, Err(RunError::Engine(_))), "{launched:?}");
        }
        assert_eq!(pool.stats().running, 0, "every thread given back");
    }

    /// A launch with no thread free waits for one in the queue and hands
    /// its answer on when it has run; the caller does not wait for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_launch_with_no_thread_free_waits_for_one_then_answers() {
        let pool = InferencePool::new(1, 4);
        let (model, started, release) = gate();
        let (first, started) = hold_a_thread(&pool, &model, started).await;
        let (tx, answer) = tokio::sync::oneshot::channel();
        let share = Share {
            key: "m",
            cap: 1,
            deadline: Duration::from_secs(30),
        };
        pool.launch(&model, x(), share, move |outputs| {
            let _ = tx.send(outputs);
        });
        while pool.stats().queued == 0 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        release.send(()).unwrap();
        assert!(first.await.unwrap().is_ok());
        let outputs = answer.await.unwrap().unwrap();
        assert_eq!(outputs.len(), 1);
        drop(started);
        assert_eq!(pool.stats().running + pool.stats().queued, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_at_most_threads_at_once_and_sheds_past_the_queue() {
        let pool = InferencePool::new(1, 1);
        let (model, started, release) = gate();

        let (first, _started) = hold_a_thread(&pool, &model, started).await;
        assert_eq!(pool.stats().running, 1);

        let second = tokio::spawn({
            let (pool, model) = (pool.clone(), model.clone());
            async move { pool.run(&model, x()).await }
        });
        while pool.stats().queued == 0 {
            tokio::task::yield_now().await;
        }
        let third = pool.run(&model, x()).await;
        assert!(
            matches!(third, Err(RunError::Overloaded { queued: 1 })),
            "{third:?}"
        );
        assert_eq!(
            pool.stats().queued,
            1,
            "a refused call must leave the queue"
        );

        release.send(()).unwrap();
        release.send(()).unwrap();
        assert!(first.await.unwrap().is_ok());
        assert!(second.await.unwrap().is_ok());
        assert_eq!(
            pool.stats(),
            PoolStats {
                threads: 1,
                running: 0,
                queued: 0
            }
        );
    }

    #[tokio::test]
    async fn bad_inputs_never_take_a_thread() {
        let pool = InferencePool::new(1, 0);
        let (model, _started, _release) = gate();
        let wrong = vec![Tensor::new("y", vec![1], TensorData::Fp32(vec![1.0])).unwrap()];
        let err = pool.run(&model, wrong).await.unwrap_err();
        assert!(err.is_client_error());
        assert_eq!(pool.stats().running, 0);
    }

    /// Models that hold no thread keep their count at zero (no allocation
    /// per request) until there are too many of them, then are swept.
    #[test]
    fn counts_of_models_holding_nothing_are_kept_then_swept() {
        let pool = InferencePool::new(2, 8);
        let keys = |pool: &InferencePool| pool.inner.held.lock().unwrap().len();
        drop(pool.try_hold("a", 1).unwrap());
        drop(pool.try_hold("a", 1).unwrap());
        assert_eq!(keys(&pool), 1);
        for i in 0..HELD_KEYS * 2 {
            drop(pool.try_hold(&format!("m{i}"), 1).unwrap());
        }
        assert!(keys(&pool) <= HELD_KEYS + 1, "{} keys kept", keys(&pool));
        // Counting still holds: a model at its cap gets no more.
        let a = pool.try_hold("a", 1).unwrap();
        assert!(pool.try_hold("a", 1).is_none());
        drop(a);
        assert!(pool.try_hold("a", 1).is_some());
    }

    fn share(key: &str, cap: usize, secs: u64) -> Share<'_> {
        Share {
            key,
            cap,
            deadline: Duration::from_secs(secs),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_of_slow_requests_leaves_a_thread_for_the_others() {
        let pool = InferencePool::new(2, 16);
        assert_eq!((pool.cap_for(1), pool.cap_for(2)), (2, 1));
        let (slow, slow_started, slow_release) = gate();
        let (fast, fast_started, fast_release) = gate();
        let cap = pool.cap_for(2);
        // Two slow requests: one runs, the other waits for the slow
        // model's only thread although a thread is free.
        let slow_calls: Vec<_> = (0..2)
            .map(|_| {
                let (pool, slow) = (pool.clone(), slow.clone());
                tokio::spawn(
                    async move { pool.run_shared(&slow, x(), share("slow", cap, 60)).await },
                )
            })
            .collect();
        let slow_started = tokio::task::spawn_blocking(move || {
            slow_started.recv().unwrap();
            slow_started
        })
        .await
        .unwrap();
        while pool.stats().queued == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.stats().running, 1);
        // The fast model gets the free thread at once.
        let fast_call = tokio::spawn({
            let (pool, fast) = (pool.clone(), fast.clone());
            async move { pool.run_shared(&fast, x(), share("fast", cap, 60)).await }
        });
        tokio::task::spawn_blocking(move || fast_started.recv().unwrap())
            .await
            .unwrap();
        assert_eq!(pool.stats().running, 2);
        fast_release.send(()).unwrap();
        assert!(fast_call.await.unwrap().is_ok());
        // The slow ones finish in turn.
        slow_release.send(()).unwrap();
        tokio::task::spawn_blocking(move || slow_started.recv().unwrap())
            .await
            .unwrap();
        slow_release.send(()).unwrap();
        for c in slow_calls {
            assert!(c.await.unwrap().is_ok());
        }
        assert_eq!(pool.stats().running, 0);
        assert_eq!(pool.stats().queued, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_past_their_deadline_are_refused_or_abandoned() {
        let pool = InferencePool::new(1, 16);
        let (model, started, release) = gate();
        let running = tokio::spawn({
            let (pool, model) = (pool.clone(), model.clone());
            async move { pool.run_shared(&model, x(), share("m", 1, 5)).await }
        });
        let started = tokio::task::spawn_blocking(move || {
            started.recv().unwrap();
            started
        })
        .await
        .unwrap();
        // A second request waits for the only thread past its deadline.
        // (While a blocking task runs, tokio's paused clock does not move
        // by itself: the test moves it.)
        let waiting = tokio::spawn({
            let (pool, model) = (pool.clone(), model.clone());
            async move { pool.run_shared(&model, x(), share("m", 1, 2)).await }
        });
        while pool.stats().queued == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::advance(Duration::from_millis(2_001)).await;
        assert_eq!(
            waiting.await.unwrap(),
            Err(RunError::Busy { waited_ms: 2000 })
        );
        assert_eq!(pool.stats().queued, 0, "a refused request leaves the queue");
        // The running one overruns its own deadline: abandoned, while the
        // thread stays busy until the engine returns.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            running.await.unwrap(),
            Err(RunError::DeadlineExceeded { deadline_ms: 5000 })
        );
        assert_eq!(pool.stats().running, 1);
        release.send(()).unwrap();
        drop(started);
        while pool.stats().running > 0 {
            tokio::task::yield_now().await;
        }
    }

    /// An engine that notes the thread each run happens on.
    pub(crate) struct Where {
        signature: Signature,
        threads: Mutex<Vec<std::thread::ThreadId>>,
    }

    impl Where {
        /// Takes `x`, `[N, W]` floats, and answers them as they are.
        pub(crate) fn new() -> Arc<Where> {
            Arc::new(Where {
                signature: Signature {
                    inputs: vec![TensorSpec {
                        name: "x".into(),
                        datatype: DataType::Fp32,
                        shape: vec![Dim::Dynamic(None), Dim::Dynamic(None)],
                    }],
                    outputs: vec![],
                },
                threads: Mutex::new(Vec::new()),
            })
        }

        /// Whether each run so far ran on `thread`.
        pub(crate) fn ran_on(&self, thread: std::thread::ThreadId) -> Vec<bool> {
            self.threads
                .lock()
                .unwrap()
                .iter()
                .map(|t| *t == thread)
                .collect()
        }

        /// The engine loaded, measured at `row_cost` a row (`None`: never
        /// measured).
        pub(crate) fn loaded(self: &Arc<Self>, row_cost: Option<Duration>) -> LoadedModel {
            loaded(self.clone(), row_cost)
        }
    }

    impl Model for Where {
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn platform(&self) -> &'static str {
            "where"
        }
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
            self.threads
                .lock()
                .unwrap()
                .push(std::thread::current().id());
            Ok(inputs)
        }
    }

    pub(crate) fn rows(n: usize) -> Vec<Tensor> {
        wide(n, 1)
    }

    /// `n` rows of `width` values.
    pub(crate) fn wide(n: usize, width: usize) -> Vec<Tensor> {
        vec![Tensor::new("x", vec![n, width], TensorData::Fp32(vec![0.0; n * width])).unwrap()]
    }

    #[tokio::test(flavor = "current_thread")]
    async fn small_requests_of_a_cheap_model_run_on_the_calling_thread() {
        let engine = Where::new();
        // Costs measured on a one-row input (one element).
        let model = |row_cost: Option<Duration>| engine.loaded(row_cost);
        let pool = InferencePool::new(2, 8);
        let here = std::thread::current().id();
        let cheap = model(Some(Duration::from_micros(2)));
        // 1 and 10 rows at 2 µs a row: within INLINE_MAX, here.
        for n in [1, 10] {
            assert!(cheap.runs_inline(&rows(n)));
            pool.run(&cheap, rows(n)).await.unwrap();
        }
        // Reckoned at a row alone and the rest at their cost in a batch:
        // 1 + 99 × 0.2 µs is within INLINE_MAX.
        let mut batched = model(Some(Duration::from_micros(2)));
        batched.set_batched_row_cost(Duration::from_nanos(200));
        assert!(batched.runs_inline(&rows(100)));
        assert!(!batched.runs_inline(&rows(200)));
        // 100 rows (200 µs), a model never measured, a slow one: a pool thread.
        assert!(!cheap.runs_inline(&rows(100)));
        pool.run(&cheap, rows(100)).await.unwrap();
        pool.run(&model(None), rows(1)).await.unwrap();
        pool.run(&model(Some(Duration::from_millis(1))), rows(1))
            .await
            .unwrap();
        assert_eq!(engine.ran_on(here), [true, true, false, false, false]);
        // Inline runs hold their thread while they run and give it back.
        assert_eq!(pool.stats().running, 0);
    }
}
