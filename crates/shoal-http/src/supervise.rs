//! Background tasks that must not die quietly. A detached task that
//! panics just ends: the rollout controller would stop deciding, or a
//! replica stop converging, while health checks stay green. [`supervise`]
//! runs a long-lived loop and, when it panics, logs the panic as an error
//! and starts it again after a backoff; a loop that returns on its own has
//! finished its work and is not restarted.

use std::future::Future;
use std::time::Duration;

/// Longest pause between restarts of a task that keeps panicking.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Spawns `make()` and keeps it running: each panic is logged with `name`
/// and the task restarted, after 100 ms doubling up to 10 s while it keeps
/// failing. Abort the returned handle to stop it (and the task it runs).
pub fn supervise<F, Fut>(name: &'static str, mut make: F) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let task = tokio::spawn(make());
            // Aborting this supervisor drops `guard`, which aborts the task.
            let guard = AbortOnDrop(task.abort_handle());
            match task.await {
                Ok(()) => return,
                Err(e) if e.is_panic() => {
                    let panic = e.into_panic();
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".into());
                    tracing::error!(task = name, panic = %message, restart_in = ?backoff, "background task panicked; restarting it");
                    drop(guard);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(_) => return,
            }
        }
    })
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_restarted_and_one_that_ends_is_not() {
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let handle = supervise("test", move || {
            let runs = counter.clone();
            async move {
                // Panics twice, then finishes.
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
            }
        });
        handle.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn aborting_the_supervisor_stops_the_task() {
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let handle = supervise("forever", move || {
            let runs = counter.clone();
            async move {
                loop {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(2500)).await;
        handle.abort();
        let before = runs.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            before,
            "the task outlived its supervisor"
        );
    }
}
