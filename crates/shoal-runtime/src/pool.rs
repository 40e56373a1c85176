//! A bounded pool for blocking inference work.
//!
//! Inference is CPU-bound and would stall every connection if it ran on the
//! async executor. Each call takes one of `threads` permits and runs on
//! tokio's blocking threads; at most `threads` inferences run at once, so the
//! engine never oversubscribes the cores. Waiting calls queue, up to
//! `max_queue`; past that, calls fail fast with [`RunError::Overloaded`] so a
//! gateway can retry on a less busy replica instead of timing out here.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use shoal_core::Tensor;
use tokio::sync::Semaphore;

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
            }),
        }
    }

    /// A pool sized to the machine's cores, with a queue of 64 per core.
    pub fn for_cores() -> InferencePool {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        InferencePool::new(cores, cores * 64)
    }

    /// Checks `inputs` against the model's signature and runs it on a pool
    /// thread.
    pub async fn run(
        &self,
        model: &LoadedModel,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, RunError> {
        let inputs = model.signature().check_inputs(inputs)?;
        let permit = match self.inner.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let queued = self.inner.queued.fetch_add(1, Ordering::Relaxed);
                let slot = QueueSlot(&self.inner.queued);
                if queued >= self.inner.max_queue {
                    return Err(RunError::Overloaded { queued });
                }
                let permit = self
                    .inner
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| RunError::Engine("inference pool closed".into()))?;
                drop(slot);
                permit
            }
        };
        let model = model.model.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            model.run(inputs)
        })
        .await
        .map_err(|e| RunError::Engine(format!("inference task failed: {e}")))?
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

#[cfg(test)]
mod tests {
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
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
            self.started.lock().unwrap().send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
            Ok(inputs)
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
        let loaded = LoadedModel {
            model: Arc::new(model),
            platform: "test",
        };
        (loaded, started_rx, release_tx)
    }

    fn x() -> Vec<Tensor> {
        vec![Tensor::new("x", vec![1], TensorData::Fp32(vec![1.0])).unwrap()]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_at_most_threads_at_once_and_sheds_past_the_queue() {
        let pool = InferencePool::new(1, 1);
        let (model, started, release) = gate();

        let first = tokio::spawn({
            let (pool, model) = (pool.clone(), model.clone());
            async move { pool.run(&model, x()).await }
        });
        let _started = tokio::task::spawn_blocking(move || {
            started.recv().unwrap();
            started
        })
        .await
        .unwrap();
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
}
