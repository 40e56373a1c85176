//! The request path's two policies, written over any attempt so that they
//! can be tested alone, with fake replicas and paused time:
//!
//! - [`Retry`]: another replica after a failure while the retry budget (a
//!   share of requests plus a floor per second) allows, up to a number of
//!   attempts; a stale route (a replica that no longer serves the version)
//!   is retried without spending budget, and so is a request that never
//!   left the gateway (no connection), which spends no attempt either.
//! - [`hedge`]: a second copy once the hedge delay (the model's observed
//!   p95, from [`LatencyWindows`]) has passed without an answer; the first
//!   final answer wins and the other request is dropped, which cancels it.
//!
//! `proxy` supplies the attempts (pick a replica, send, classify).

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

/// What one attempt came to, as far as retrying is concerned.
#[derive(Debug)]
pub(crate) enum Step<T, E> {
    /// A final answer: the request is done.
    Done(T),
    /// The replica's answer says the gateway's view was stale (it no longer
    /// serves the version): not the replica's fault, so retried without
    /// spending budget; the answer is kept in case nothing better comes.
    Stale(T),
    /// A failure another replica may not have (`reason` labels the retry
    /// metric): retried if attempts and budget remain.
    Failed(&'static str, E),
    /// The request was never sent (no connection to the replica): no
    /// replica did any work and nothing can have run twice, so another is
    /// tried without spending budget or an attempt, up to [`MAX_UNSENT`]
    /// times per request. A fleet losing replicas (a crash, a restart, a
    /// region going away) costs its callers nothing while one still
    /// answers.
    Unsent(&'static str, E),
    /// Nowhere left to send it: the request ends with the last failure
    /// seen, else the last stale answer, else this error.
    Stop(E),
}

/// What to do after an attempt.
#[derive(Debug)]
pub(crate) enum Next<T, E> {
    /// Try another replica; `Some(reason)` after a failure (for the retry
    /// metric), `None` after a stale route.
    Again(Option<&'static str>),
    /// The request is over: its answer or error.
    Finish(Result<T, E>),
}

/// Requests never sent (no connection) retried per request on top of its
/// attempts: bounded, since each waits up to the connect timeout, but
/// enough to get past the replicas of a region going down together.
pub(crate) const MAX_UNSENT: usize = 4;

/// Attempts on successive replicas: the caller makes an attempt, tells
/// [`Retry::next`] what it came to and does what it says.
pub(crate) struct Retry<'a, T, E> {
    attempts_left: usize,
    unsent_left: usize,
    budget: Option<&'a TpsBudget>,
    last_error: Option<E>,
    stale: Option<T>,
}

impl<'a, T, E> Retry<'a, T, E> {
    /// A request of at most `max_attempts` attempts (stale ones included;
    /// at least one), whose retries after failures spend `budget` (none:
    /// retried freely). Deposits the request in the budget.
    pub(crate) fn new(max_attempts: usize, budget: Option<&'a TpsBudget>) -> Self {
        if let Some(budget) = budget {
            budget.deposit();
        }
        Retry {
            attempts_left: max_attempts.max(1),
            unsent_left: MAX_UNSENT,
            budget,
            last_error: None,
            stale: None,
        }
    }

    /// After an attempt: another, or the end. The request ends with the
    /// final answer; else the last failure (or the stopping error); else,
    /// when every answer was stale, the last stale answer.
    pub(crate) fn next(&mut self, step: Step<T, E>) -> Next<T, E> {
        if !matches!(step, Step::Unsent(..)) {
            self.attempts_left = self.attempts_left.saturating_sub(1);
        }
        match step {
            Step::Done(answer) => Next::Finish(Ok(answer)),
            Step::Stop(error) => match (self.last_error.take(), self.stale.take()) {
                (Some(failure), _) => Next::Finish(Err(failure)),
                (None, Some(answer)) => Next::Finish(Ok(answer)),
                (None, None) => Next::Finish(Err(error)),
            },
            Step::Stale(answer) => {
                // A fresh chance: whatever failed before is not the answer
                // any more.
                self.last_error = None;
                self.stale = Some(answer);
                if self.attempts_left == 0 {
                    self.finish()
                } else {
                    Next::Again(None)
                }
            }
            Step::Failed(reason, error) => {
                self.last_error = Some(error);
                if self.attempts_left > 0 && self.budget.is_none_or(TpsBudget::withdraw) {
                    Next::Again(Some(reason))
                } else {
                    self.finish()
                }
            }
            Step::Unsent(reason, error) => {
                self.last_error = Some(error);
                if self.unsent_left > 0 {
                    self.unsent_left -= 1;
                    Next::Again(Some(reason))
                } else {
                    self.finish()
                }
            }
        }
    }

    fn finish(&mut self) -> Next<T, E> {
        match (self.last_error.take(), self.stale.take()) {
            (Some(error), _) => Next::Finish(Err(error)),
            (None, Some(answer)) => Next::Finish(Ok(answer)),
            (None, None) => unreachable!("finish follows a failure or a stale answer"),
        }
    }
}

/// Which request of a hedged pair answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answered {
    /// The first copy.
    Primary,
    /// The hedge.
    Backup,
}

/// Runs `primary`; if it has not answered after `delay` (no delay: never
/// hedge), starts `backup()` (which may decline: no other replica, no
/// budget) and returns whichever answers first with an answer `is_final`
/// accepts — or, when the first to answer is not final, the other's
/// answer. The loser is dropped, cancelling its request.
pub(crate) async fn hedge<T, P, B>(
    primary: P,
    delay: Option<Duration>,
    backup: impl FnOnce() -> Option<B>,
    is_final: impl Fn(&T) -> bool,
) -> (T, Answered)
where
    P: Future<Output = T>,
    B: Future<Output = T>,
{
    tokio::pin!(primary);
    let Some(delay) = delay else {
        return (primary.await, Answered::Primary);
    };
    tokio::select! {
        a = &mut primary => return (a, Answered::Primary),
        () = tokio::time::sleep(delay) => {}
    }
    let Some(backup) = backup() else {
        return (primary.await, Answered::Primary);
    };
    tokio::pin!(backup);
    tokio::select! {
        a = &mut primary => if is_final(&a) {
            (a, Answered::Primary)
        } else {
            (backup.await, Answered::Backup)
        },
        b = &mut backup => if is_final(&b) {
            (b, Answered::Backup)
        } else {
            (primary.await, Answered::Primary)
        },
    }
}

/// How long a latency window lasts.
const WINDOW: Duration = Duration::from_secs(10);

/// Fewest answers a window needs for its p95 to mean anything.
const ENOUGH: u64 = 50;

/// One model's latencies over the current window, and the p95 of the
/// window before.
struct Window {
    started: Instant,
    current: hdrhistogram::Histogram<u64>,
    previous_p95_us: Option<u64>,
}

/// Latencies per model over a sliding pair of windows: the hedge delay.
#[derive(Default)]
pub(crate) struct LatencyWindows {
    windows: Mutex<hashbrown::HashMap<String, Window>>,
}

impl LatencyWindows {
    /// Records one answer's time.
    pub(crate) fn record(&self, model: &str, rtt: Duration) {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let window = windows.entry_ref(model).or_insert_with(|| Window {
            started: Instant::now(),
            current: hdrhistogram::Histogram::new(2)
                .unwrap_or_else(|_| unreachable!("2 digits is valid")),
            previous_p95_us: None,
        });
        if window.started.elapsed() >= WINDOW {
            // The finished window's p95 becomes the hedge delay, if it saw
            // enough requests to mean anything.
            window.previous_p95_us =
                (window.current.len() >= ENOUGH).then(|| window.current.value_at_quantile(0.95));
            window.current.reset();
            window.started = Instant::now();
        }
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = window.current.record(us);
    }

    /// The model's hedge delay: the last full window's p95, else the
    /// current one's once it has seen enough; `None` until then.
    pub(crate) fn p95(&self, model: &str) -> Option<Duration> {
        let windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let window = windows.get(model)?;
        window
            .previous_p95_us
            .or_else(|| {
                (window.current.len() >= ENOUGH).then(|| window.current.value_at_quantile(0.95))
            })
            .map(Duration::from_micros)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tower::retry::budget::TpsBudget;

    use super::*;

    /// A budget of retries worth `share` of requests and no floor, over
    /// tower's longest window (a minute), so nothing expires mid-test.
    fn budget(share: f32) -> TpsBudget {
        TpsBudget::new(Duration::from_secs(60), 0, share)
    }

    /// Fake replicas: each answers as its script says; records who was
    /// tried, in order.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Fake {
        Ok,
        Stale,
        Fails,
        Refuses,
    }

    /// One request through `fleet`, each attempt on the next replica not
    /// yet tried: its result, the replicas tried, the budgeted retries.
    fn run_fleet(
        fleet: &[(&str, Fake)],
        max_attempts: usize,
        budget: Option<&TpsBudget>,
    ) -> (Result<String, String>, Vec<String>, Vec<&'static str>) {
        let mut retry = Retry::new(max_attempts, budget);
        let mut tried = Vec::<String>::new();
        let mut retries = Vec::new();
        loop {
            let next = fleet.iter().find(|(id, _)| !tried.iter().any(|t| t == id));
            let step = match next {
                None => Step::Stop("no replica left".to_owned()),
                Some((id, fake)) => {
                    tried.push((*id).to_owned());
                    match fake {
                        Fake::Ok => Step::Done(format!("answer from {id}")),
                        Fake::Stale => Step::Stale(format!("404 from {id}")),
                        Fake::Fails => Step::Failed("server_error", format!("{id} failed")),
                        Fake::Refuses => Step::Unsent("connect", format!("{id} refused")),
                    }
                }
            };
            match retry.next(step) {
                Next::Again(reason) => retries.extend(reason),
                Next::Finish(result) => return (result, tried, retries),
            }
        }
    }

    #[test]
    fn a_failure_is_retried_on_another_replica_while_budget_lasts() {
        let b = budget(1.0);
        let fleet = [("r1", Fake::Fails), ("r2", Fake::Ok)];
        let (result, tried, retries) = run_fleet(&fleet, 3, Some(&b));
        assert_eq!(result.unwrap(), "answer from r2");
        assert_eq!(tried, ["r1", "r2"]);
        assert_eq!(retries, ["server_error"]);
    }

    #[test]
    fn an_exhausted_budget_ends_the_request_with_its_failure() {
        // Retries worth half the requests: a retry costs two requests'
        // deposits.
        let b = budget(0.5);
        let fleet = [("r1", Fake::Fails), ("r2", Fake::Fails), ("r3", Fake::Ok)];
        // The first request has deposited one: not enough for a retry.
        let (first, tried, retries) = run_fleet(&fleet, 3, Some(&b));
        assert_eq!(first.unwrap_err(), "r1 failed");
        assert_eq!((tried.len(), retries.len()), (1, 0));
        // The second makes two: one retry, on r2, which fails too; the
        // budget is spent, so r3 is never tried.
        let (second, tried, retries) = run_fleet(&fleet, 3, Some(&b));
        assert_eq!(second.unwrap_err(), "r2 failed");
        assert_eq!((tried.len(), retries.len()), (2, 1));
        let (third, tried, _) = run_fleet(&fleet, 3, Some(&b));
        assert_eq!(
            (third.unwrap_err(), tried.len()),
            ("r1 failed".to_owned(), 1)
        );
        // No budget at all: never a retry.
        let none = budget(0.0);
        let (result, tried, _) =
            run_fleet(&[("r1", Fake::Fails), ("r2", Fake::Ok)], 3, Some(&none));
        assert_eq!(
            (result.unwrap_err(), tried.len()),
            ("r1 failed".to_owned(), 1)
        );
    }

    #[test]
    fn a_stale_route_is_retried_without_spending_budget() {
        let none = budget(0.0);
        let fleet = [("r1", Fake::Stale), ("r2", Fake::Stale), ("r3", Fake::Ok)];
        let (result, tried, retries) = run_fleet(&fleet, 3, Some(&none));
        assert_eq!(result.unwrap(), "answer from r3");
        assert_eq!(tried, ["r1", "r2", "r3"]);
        assert!(retries.is_empty(), "stale routes are not budgeted retries");
        // Only stale answers: the last replica's own answer, not an error.
        let (result, _, _) = run_fleet(&[("r1", Fake::Stale)], 3, Some(&none));
        assert_eq!(result.unwrap(), "404 from r1");
        // A stale answer after a failure forgets the failure.
        let b = budget(1.0);
        let (result, _, _) = run_fleet(&[("r1", Fake::Fails), ("r2", Fake::Stale)], 3, Some(&b));
        assert_eq!(result.unwrap(), "404 from r2");
    }

    #[test]
    fn attempts_are_bounded_and_nowhere_to_go_keeps_the_real_failure() {
        let b = budget(1000.0);
        let fleet = [
            ("r1", Fake::Fails),
            ("r2", Fake::Fails),
            ("r3", Fake::Fails),
            ("r4", Fake::Ok),
        ];
        let (result, tried, retries) = run_fleet(&fleet, 3, Some(&b));
        assert_eq!(result.unwrap_err(), "r3 failed");
        assert_eq!((tried.len(), retries.len()), (3, 2));
        // Two replicas, both failing: the third attempt finds none left and
        // the request ends with the last failure, not "no replica left".
        let (result, _, _) = run_fleet(&fleet[..2], 3, Some(&b));
        assert_eq!(result.unwrap_err(), "r2 failed");
        // Nowhere to go at all.
        let (result, _, _) = run_fleet(&[], 3, Some(&b));
        assert_eq!(result.unwrap_err(), "no replica left");
        // Without a budget (metadata reads), retries are bounded only by
        // attempts.
        let (result, tried, _) = run_fleet(&fleet, 2, None);
        assert_eq!(
            (result.unwrap_err(), tried.len()),
            ("r2 failed".to_owned(), 2)
        );
    }

    #[test]
    fn a_request_never_sent_spends_no_attempt_and_no_budget() {
        // A region going down: three replicas refuse connections, with no
        // budget and one attempt the fourth still answers.
        let none = budget(0.0);
        let fleet = [
            ("r1", Fake::Refuses),
            ("r2", Fake::Refuses),
            ("r3", Fake::Refuses),
            ("r4", Fake::Ok),
        ];
        let (result, tried, retries) = run_fleet(&fleet, 1, Some(&none));
        assert_eq!(result.unwrap(), "answer from r4");
        assert_eq!(tried, ["r1", "r2", "r3", "r4"]);
        assert_eq!(retries, ["connect"; 3]);
        // Bounded all the same: past MAX_UNSENT refusals the request ends
        // with the last one.
        let refusing: Vec<(String, Fake)> = (0..MAX_UNSENT + 3)
            .map(|i| (format!("r{i}"), Fake::Refuses))
            .collect();
        let refusing: Vec<(&str, Fake)> =
            refusing.iter().map(|(id, f)| (id.as_str(), *f)).collect();
        let (result, tried, _) = run_fleet(&refusing, 1, Some(&none));
        assert_eq!(tried.len(), MAX_UNSENT + 1);
        assert_eq!(result.unwrap_err(), format!("r{MAX_UNSENT} refused"));
        // A refusal between failures leaves the attempts and the budget to
        // them: r1 fails (one attempt, one retry spent), r2 refuses, r3
        // fails, and the third attempt reaches r4.
        let b = budget(1000.0);
        let fleet = [
            ("r1", Fake::Fails),
            ("r2", Fake::Refuses),
            ("r3", Fake::Fails),
            ("r4", Fake::Ok),
        ];
        let (result, tried, retries) = run_fleet(&fleet, 3, Some(&b));
        assert_eq!(result.unwrap(), "answer from r4");
        assert_eq!(tried.len(), 4);
        assert_eq!(retries, ["server_error", "connect", "server_error"]);
        // Nowhere left after a refusal: the refusal is the answer.
        let (result, _, _) = run_fleet(&[("r1", Fake::Refuses)], 3, Some(&b));
        assert_eq!(result.unwrap_err(), "r1 refused");
    }

    /// A fake replica's answer after `after`; sets `dropped` if its request
    /// is cancelled before it answers.
    async fn replica(
        name: &'static str,
        after: Duration,
        good: bool,
        dropped: Arc<AtomicBool>,
    ) -> (&'static str, bool) {
        struct Cancelled(Arc<AtomicBool>);
        impl Drop for Cancelled {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guard = Cancelled(dropped);
        tokio::time::sleep(after).await;
        std::mem::forget(guard);
        (name, good)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_before_the_delay_sends_no_hedge() {
        let started = Instant::now();
        let asked = Cell::new(false);
        let (answer, who) = hedge(
            replica("primary", ms(30), true, Arc::default()),
            Some(ms(50)),
            || {
                asked.set(true);
                Some(replica("backup", ms(1), true, Arc::default()))
            },
            |a| a.1,
        )
        .await;
        assert_eq!((answer.0, who), ("primary", Answered::Primary));
        assert!(!asked.get(), "no hedge before the delay");
        assert_eq!(started.elapsed(), ms(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_fires_at_the_delay_and_the_faster_answer_wins() {
        let started = Instant::now();
        let primary_dropped = Arc::new(AtomicBool::new(false));
        let (answer, who) = hedge(
            replica("primary", ms(500), true, primary_dropped.clone()),
            Some(ms(50)),
            || Some(replica("backup", ms(20), true, Arc::default())),
            |a| a.1,
        )
        .await;
        assert_eq!((answer.0, who), ("backup", Answered::Backup));
        // Fired at 50 ms, answered 20 ms later; the slow primary cancelled.
        assert_eq!(started.elapsed(), ms(70));
        assert!(primary_dropped.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_that_loses_is_cancelled() {
        let started = Instant::now();
        let backup_dropped = Arc::new(AtomicBool::new(false));
        let dropped = backup_dropped.clone();
        let (answer, who) = hedge(
            replica("primary", ms(80), true, Arc::default()),
            Some(ms(50)),
            move || Some(replica("backup", ms(200), true, dropped)),
            |a| a.1,
        )
        .await;
        assert_eq!((answer.0, who), ("primary", Answered::Primary));
        assert_eq!(started.elapsed(), ms(80));
        assert!(
            backup_dropped.load(Ordering::SeqCst),
            "the losing hedge is cancelled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_answer_waits_for_the_other() {
        let started = Instant::now();
        // The primary fails at 60 ms, while the hedge (from 50 ms) is still
        // working: its answer is taken.
        let (answer, who) = hedge(
            replica("primary", ms(60), false, Arc::default()),
            Some(ms(50)),
            || Some(replica("backup", ms(40), true, Arc::default())),
            |a| a.1,
        )
        .await;
        assert_eq!((answer, who), (("backup", true), Answered::Backup));
        assert_eq!(started.elapsed(), ms(90));
        // A hedge that fails first: the primary's answer is taken.
        let (answer, who) = hedge(
            replica("primary", ms(100), true, Arc::default()),
            Some(ms(50)),
            || Some(replica("backup", ms(10), false, Arc::default())),
            |a| a.1,
        )
        .await;
        assert_eq!((answer, who), (("primary", true), Answered::Primary));
    }

    #[tokio::test(start_paused = true)]
    async fn no_delay_or_a_declined_hedge_leaves_the_primary_alone() {
        let (answer, _) = hedge(
            replica("primary", ms(300), true, Arc::default()),
            None,
            || -> Option<std::future::Ready<(&str, bool)>> { unreachable!("never hedged") },
            |a| a.1,
        )
        .await;
        assert_eq!(answer.0, "primary");
        let started = Instant::now();
        let (answer, _) = hedge(
            replica("primary", ms(300), true, Arc::default()),
            Some(ms(10)),
            || None::<std::future::Ready<(&str, bool)>>,
            |a| a.1,
        )
        .await;
        assert_eq!((answer.0, started.elapsed()), ("primary", ms(300)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_hedge_delay_is_the_observed_p95() {
        let w = LatencyWindows::default();
        // Too few answers: no hedging yet.
        for i in 1..=49 {
            w.record("m", ms(i));
        }
        assert_eq!(w.p95("m"), None);
        // 100 answers of 1..=100 ms: p95 about 95 ms (2 significant digits).
        for i in 50..=100 {
            w.record("m", ms(i));
        }
        let p95 = w.p95("m").unwrap();
        assert!((ms(94)..=ms(96)).contains(&p95), "{p95:?}");
        assert_eq!(w.p95("other"), None);
        // The next window: the finished one's p95 holds while the new one
        // fills, then the new one's replaces it.
        tokio::time::advance(WINDOW).await;
        for _ in 0..60 {
            w.record("m", ms(10));
        }
        assert_eq!(w.p95("m"), Some(p95));
        tokio::time::advance(WINDOW).await;
        w.record("m", ms(10));
        let now = w.p95("m").unwrap();
        assert!((ms(9)..=ms(11)).contains(&now), "{now:?}");
        // A quiet window (too few answers) stops hedging.
        tokio::time::advance(WINDOW).await;
        w.record("m", ms(10));
        assert_eq!(w.p95("m"), None);
    }
}
