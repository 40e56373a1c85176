//! Live sequences of stateful models, held in this replica's memory
//! (`--session-store memory`): for each sequence, the version it started
//! on and its state between steps.
//!
//! - A step with `sequence_start` begins the sequence from the initial
//!   state (restarting one with the same id); other steps need a live one.
//! - Steps of one sequence run one at a time, in the order they arrive:
//!   a second step waits for the first (serialised, not refused: a client
//!   streaming audio may pipeline its chunks, and each step needs the
//!   state the one before produced).
//! - A sequence idle for longer than the idle limit expires; `sequence_end`
//!   frees it after its step. At most `max` are held; a start beyond that
//!   is refused with a retry hint.
//! - A failed step leaves the state as it was, so the step can be retried.
//!
//! Time is tokio's, so expiry is tested with paused time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shoal_core::Tensor;
use shoal_oip::sequence::{SequenceId, Step};
use tokio::time::Instant;

/// How many sequences a replica holds and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceLimits {
    /// Live sequences at most (all models together).
    pub max: usize,
    /// A sequence with no step for this long expires.
    pub idle: Duration,
}

impl Default for SequenceLimits {
    fn default() -> Self {
        SequenceLimits {
            max: 10_000,
            idle: Duration::from_secs(60),
        }
    }
}

/// Why a step cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// No live sequence with this id (never started here, expired, ended).
    #[error(
        "sequence {id} of {model} is not live on this replica: never started, ended, idle for over {idle_secs} s, or its state was lost with the replica that held it (the memory session store keeps it in one replica); send its first step again with sequence_start=true"
    )]
    Unknown {
        /// The model.
        model: String,
        /// The sequence.
        id: SequenceId,
        /// The idle limit.
        idle_secs: u64,
    },
    /// The replica holds as many sequences as it may.
    #[error(
        "this replica holds {max} live sequences, its limit: end finished ones with sequence_end=true, or retry when idle ones expire"
    )]
    TooMany {
        /// The limit.
        max: usize,
    },
}

type Key = (String, SequenceId);

/// A sequence's state and how many steps made it.
#[derive(Debug, Default)]
pub struct Held {
    /// The state the next step takes.
    pub state: Vec<Tensor>,
    /// Steps taken.
    pub steps: u64,
    /// Which start of the sequence id this is (random per start).
    pub run: u64,
}

/// One live sequence.
#[derive(Debug)]
struct Slot {
    version: String,
    state: Arc<tokio::sync::Mutex<Held>>,
    last_used: Mutex<Instant>,
    /// Steps running or waiting: a busy sequence never expires.
    busy: AtomicUsize,
}

impl Slot {
    fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(
            *self
                .last_used
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

/// The live sequences of every model on this replica.
#[derive(Debug)]
pub struct Sequences {
    limits: SequenceLimits,
    live: Mutex<HashMap<Key, Arc<Slot>>>,
    /// When expired sequences were last freed (at most once a second, by
    /// the steps that come).
    swept: Mutex<Instant>,
}

/// A step in progress: holds its sequence (later steps wait) until it is
/// finished or dropped (a failed step: the state stays as it was).
#[derive(Debug)]
pub struct StepGuard<'a> {
    table: &'a Sequences,
    key: Key,
    slot: Arc<Slot>,
    held: tokio::sync::OwnedMutexGuard<Held>,
    started: bool,
}

impl Sequences {
    /// An empty table with these limits.
    pub fn new(limits: SequenceLimits) -> Sequences {
        Sequences {
            limits,
            live: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        }
    }

    /// The limits.
    pub fn limits(&self) -> SequenceLimits {
        self.limits
    }

    /// Live sequences now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// True when none is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<Slot>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expired(&self, slot: &Slot, now: Instant) -> bool {
        slot.busy.load(Ordering::SeqCst) == 0 && slot.idle_for(now) > self.limits.idle
    }

    /// Frees every expired sequence; how many.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut table = self.table();
        let before = table.len();
        table.retain(|_, slot| !self.expired(slot, now));
        before - table.len()
    }

    /// Begins `step` of `model`'s sequence: a start makes it anew on
    /// `version` from `initial`; any other step finds the live one. Waits
    /// while another step of the same sequence runs.
    pub async fn begin(
        &self,
        model: &str,
        step: &Step,
        version: &str,
        initial: impl FnOnce() -> Vec<Tensor>,
    ) -> Result<StepGuard<'_>, SequenceError> {
        let key = (model.to_owned(), step.id.clone());
        let now = Instant::now();
        {
            let mut swept = self.swept.lock().unwrap_or_else(PoisonError::into_inner);
            if now.saturating_duration_since(*swept) > Duration::from_secs(1) {
                *swept = now;
                drop(swept);
                self.sweep();
            }
        }
        let slot = {
            let mut table = self.table();
            if step.start {
                if !table.contains_key(&key) && table.len() >= self.limits.max {
                    table.retain(|_, slot| !self.expired(slot, now));
                    if table.len() >= self.limits.max {
                        return Err(SequenceError::TooMany {
                            max: self.limits.max,
                        });
                    }
                }
                let slot = Arc::new(Slot {
                    version: version.to_owned(),
                    state: Arc::new(tokio::sync::Mutex::new(Held {
                        state: initial(),
                        steps: 0,
                        run: rand::random(),
                    })),
                    last_used: Mutex::new(now),
                    busy: AtomicUsize::new(0),
                });
                table.insert(key.clone(), slot.clone());
                // Busy before the table is let go: a sweep never frees a
                // sequence a step is about to take.
                slot.busy.fetch_add(1, Ordering::SeqCst);
                slot
            } else {
                let unknown = || SequenceError::Unknown {
                    model: model.to_owned(),
                    id: step.id.clone(),
                    idle_secs: self.limits.idle.as_secs(),
                };
                let slot = table.get(&key).cloned().ok_or_else(unknown)?;
                if self.expired(&slot, now) {
                    table.remove(&key);
                    return Err(unknown());
                }
                slot.busy.fetch_add(1, Ordering::SeqCst);
                slot
            }
        };
        let held = slot.state.clone().lock_owned().await;
        Ok(StepGuard {
            table: self,
            key,
            slot,
            held,
            started: step.start,
        })
    }

    /// Takes in `model`'s sequence `id` as another replica left it (read
    /// from the shared store), unless it is live here already or there is
    /// no room; true when it is live here now.
    pub fn adopt(&self, model: &str, id: &SequenceId, version: &str, held: Held) -> bool {
        let key = (model.to_owned(), id.clone());
        let mut table = self.table();
        if table.contains_key(&key) {
            return true;
        }
        if table.len() >= self.limits.max {
            return false;
        }
        table.insert(
            key,
            Arc::new(Slot {
                version: version.to_owned(),
                state: Arc::new(tokio::sync::Mutex::new(held)),
                last_used: Mutex::new(Instant::now()),
                busy: AtomicUsize::new(0),
            }),
        );
        true
    }

    /// Forgets `model`'s sequence `id` (its version went away).
    pub fn forget(&self, model: &str, id: &SequenceId) {
        self.table().remove(&(model.to_owned(), id.clone()));
    }
}

impl StepGuard<'_> {
    /// The version the sequence started on.
    pub fn version(&self) -> &str {
        &self.slot.version
    }

    /// The state this step takes.
    pub fn state(&self) -> &[Tensor] {
        &self.held.state
    }

    /// Steps the state this step takes came from.
    pub fn steps(&self) -> u64 {
        self.held.steps
    }

    /// Which start of the sequence id this is.
    pub fn run(&self) -> u64 {
        self.held.run
    }

    /// Whether this step starts the sequence.
    pub fn starts(&self) -> bool {
        self.started
    }

    /// Replaces the state this step takes with a newer one (another
    /// replica advanced the sequence).
    pub fn catch_up(&mut self, held: Held) {
        *self.held = held;
    }

    /// The step succeeded: `next` is the state the next step takes; with
    /// `end`, the sequence is freed.
    pub fn finish(mut self, next: Vec<Tensor>, end: bool) {
        self.held.state = next;
        self.held.steps += 1;
        *self
            .slot
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        if end {
            let mut table = self.table.table();
            if table
                .get(&self.key)
                .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
            {
                table.remove(&self.key);
            }
        }
    }
}

impl Drop for StepGuard<'_> {
    fn drop(&mut self) {
        *self
            .slot
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.slot.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: u64, start: bool) -> Step {
        Step {
            id: SequenceId::Number(id),
            start,
            end: false,
        }
    }

    fn table(max: usize) -> Sequences {
        Sequences::new(SequenceLimits {
            max,
            idle: Duration::from_secs(60),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sequences_expire_and_make_room() {
        let t = table(1);
        t.begin("m", &step(1, true), "1", Vec::new)
            .await
            .unwrap()
            .finish(Vec::new(), false);
        // Full: another start is refused while the first is live.
        assert_eq!(
            t.begin("m", &step(2, true), "1", Vec::new)
                .await
                .unwrap_err(),
            SequenceError::TooMany { max: 1 }
        );
        // A step keeps it alive.
        tokio::time::advance(Duration::from_secs(50)).await;
        t.begin("m", &step(1, false), "1", Vec::new)
            .await
            .unwrap()
            .finish(Vec::new(), false);
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(t.begin("m", &step(1, false), "1", Vec::new).await.is_ok());
        // Idle past the limit: gone, with the limit in the message, and
        // its room goes to a new sequence.
        tokio::time::advance(Duration::from_secs(61)).await;
        let err = t
            .begin("m", &step(1, false), "1", Vec::new)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("idle for over 60 s"), "{err}");
        assert!(t.begin("m", &step(2, true), "1", Vec::new).await.is_ok());
        assert_eq!(t.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_sequence_never_expires_and_sweeps_free_the_rest() {
        let t = table(10);
        let held = t.begin("m", &step(1, true), "1", Vec::new).await.unwrap();
        t.begin("m", &step(2, true), "1", Vec::new)
            .await
            .unwrap()
            .finish(Vec::new(), false);
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(t.sweep(), 1, "only the idle one");
        held.finish(vec![], false);
        assert_eq!(t.len(), 1);
        // Ending frees at once; the same id in another model is another
        // sequence.
        t.begin("other", &step(1, true), "1", Vec::new)
            .await
            .unwrap()
            .finish(Vec::new(), false);
        let mut end = step(1, false);
        end.end = true;
        t.begin("m", &end, "1", Vec::new)
            .await
            .unwrap()
            .finish(Vec::new(), true);
        assert_eq!(t.len(), 1);
        assert!(
            t.begin("other", &step(1, false), "1", Vec::new)
                .await
                .is_ok()
        );
    }
}
