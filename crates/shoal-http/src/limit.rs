//! How many connections a process's servers hold at once.
//!
//! Every connection a server accepts costs a file descriptor, and so does
//! everything else the process opens: a gateway's connections to replicas,
//! a replica's artifact fetches and model files, a control plane's
//! registry. A server that accepts until descriptors run out fails that
//! work too (a gateway would answer 502 for want of a socket to a replica).
//! So, as nginx's `worker_connections`, a process's servers — REST and gRPC
//! together — hold at most [`max_connections`] connections: at the cap the
//! listeners stop accepting, and new connections wait in the kernel's
//! listen backlog until one closes (a warning says so, at most once a
//! minute). The default is half the open-file limit, which a serving role
//! first raises from its soft to its hard limit ([`raise_open_files`]),
//! leaving the other half for what the process opens itself.
//!
//! At the cap, kept-alive connections waiting for their next request make
//! room, as nginx reuses its idle keep-alive connections: once a new client
//! is waiting to be accepted, the listener accepts it and asks idle
//! connections to close ([`Reclaim`]); up to [`RECLAIM_BATCH`] of them do
//! (at most a 64th of the cap), so the next few clients find room without
//! asking again. Each closes after [`RECLAIM_DRAIN`], or after answering a
//! request that comes meanwhile (saying `connection: close`): a client that
//! was only between two requests is not cut mid-request. Connections with
//! a request in flight are not touched: when none is idle, the new client
//! waits until one closes or goes idle.
//!
//! Metrics, on each role's `/metrics`: `shoal_connections_open` and
//! `shoal_connections_max`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use shoal_telemetry::MetricsRegistry;
use shoal_telemetry::prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, futures::Notified};
use tokio::time::Instant;

/// The fewest connections the default allows, however low the open-file
/// limit.
const MIN_DEFAULT: usize = 16;

/// How often at most the cap's warning is logged.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Most idle connections closed at once for clients waiting at the cap
/// (nginx drains at most 32 of its reusable connections at a time).
pub const RECLAIM_BATCH: usize = 32;

/// How long an idle connection asked to make room stays open for one more
/// request, answered with `connection: close`: a client between two
/// requests of a busy run sends its next one within it and gets its answer
/// instead of a connection closed under it (which fails a `POST`).
pub const RECLAIM_DRAIN: Duration = Duration::from_millis(50);

/// The process's open-file limits (`ulimit -n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The limit in force.
    pub soft: u64,
    /// How far the process may raise it.
    pub hard: u64,
}

/// Raises the process's open-file limit from its soft to its hard limit
/// (as Go's runtime does for every program), and says what it is now.
pub fn raise_open_files() -> std::io::Result<OpenFiles> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(OpenFiles { soft, hard })
}

/// The process's open-file limits as they are.
pub fn open_files() -> std::io::Result<OpenFiles> {
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    Ok(OpenFiles { soft, hard })
}

/// The connections a process with `open_files` descriptors allows by
/// default: half of them, at least [`MIN_DEFAULT`] (pure).
pub fn default_max_connections(open_files: u64) -> usize {
    usize::try_from(open_files / 2)
        .unwrap_or(usize::MAX)
        .clamp(MIN_DEFAULT, Semaphore::MAX_PERMITS)
}

/// A cap on connections held at once, shared by the servers given it.
#[derive(Debug, Clone)]
pub struct Connections {
    permits: Arc<Semaphore>,
    max: usize,
    open: Gauge,
    /// When the cap's warning was last logged.
    warned: Arc<Mutex<Option<Instant>>>,
    reclaim: Arc<Reclaim>,
}

/// Clients waiting for room at the cap, and the idle connections still to
/// close for them: pure, [`Reclaim`] keeps it under a lock.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Wanted {
    /// Clients accepted and waiting for room.
    waiting: usize,
    /// Idle connections still asked to close.
    rooms: usize,
}

impl Wanted {
    /// A client waits for room: `batch` idle connections are asked to
    /// close (room for it and the next ones).
    pub(crate) fn wait(&mut self, batch: usize) {
        self.waiting += 1;
        self.rooms = self.rooms.max(batch);
    }

    /// An idle connection offers to close: whether it is still asked to.
    pub(crate) fn claim(&mut self) -> bool {
        if self.waiting == 0 || self.rooms == 0 {
            return false;
        }
        self.rooms -= 1;
        true
    }

    /// A waiting client got room (or gave up): once none waits, no idle
    /// connection is asked to close any more.
    pub(crate) fn done(&mut self) {
        self.waiting -= 1;
        if self.waiting == 0 {
            self.rooms = 0;
        }
    }
}

/// How a server's idle connections are asked to make room at the cap: a
/// count bumped at each ask and a [`Notify`] that wakes the connections
/// waiting for their next request (each polls its wait once, and then
/// reads the count when its task wakes: no lock per request), which then
/// claim a room under [`Wanted`]'s lock.
#[derive(Debug, Default)]
pub struct Reclaim {
    wanted: Mutex<Wanted>,
    /// Asks so far.
    asked: AtomicU64,
    wake: Notify,
}

impl Reclaim {
    fn wanted(&self) -> std::sync::MutexGuard<'_, Wanted> {
        self.wanted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A client waits for room: asks `batch` idle connections to close.
    fn ask(&self, batch: usize) {
        self.wanted().wait(batch);
        self.asked.fetch_add(1, Ordering::Release);
        self.wake.notify_waiters();
    }

    /// Watches, for a connection, whether it is asked to close while idle.
    pub(crate) fn watch(&self) -> Asked<'_> {
        Asked {
            reclaim: self,
            seen: self.asked.load(Ordering::Acquire),
            wait: Box::pin(self.wake.notified()),
            registered: false,
        }
    }
}

/// A waiting client's place in [`Wanted`], given up if dropped waiting.
struct Waiting<'a>(&'a Reclaim);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.wanted().done();
    }
}

/// One connection's watch on its server's asks to close idle connections.
pub(crate) struct Asked<'a> {
    reclaim: &'a Reclaim,
    /// The asks it has answered.
    seen: u64,
    wait: Pin<Box<Notified<'a>>>,
    /// Whether `wait` was polled since it was made.
    registered: bool,
}

impl Asked<'_> {
    /// Whether the connection should close now to make room: it is asked
    /// and `idle` (waiting for its next request). Polled when the
    /// connection's task wakes; the wait is polled once per ask, so that an
    /// ask wakes the task (a connection's task keeps its waker), and
    /// otherwise this is a read of the count. An ask that finds it busy is
    /// looked at again at each of its wake-ups until it is idle.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, idle: bool) -> Poll<()> {
        loop {
            if !self.registered {
                self.registered = true;
                // Ready only if asked meanwhile, which the count shows.
                let _ = self.wait.as_mut().poll(cx);
            }
            let asked = self.reclaim.asked.load(Ordering::Acquire);
            if asked == self.seen || !idle {
                return Poll::Pending;
            }
            self.seen = asked;
            if self.reclaim.wanted().claim() {
                return Poll::Ready(());
            }
            self.wait.set(self.reclaim.wake.notified());
            self.registered = false;
        }
    }
}

/// One connection counted against a [`Connections`] cap, until dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Connections {
    /// A cap of `max` connections (at least one).
    pub fn new(max: usize) -> Connections {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Connections {
            permits: Arc::new(Semaphore::new(max)),
            max,
            open: Gauge::default(),
            warned: Arc::default(),
            reclaim: Arc::default(),
        }
    }

    /// How this cap's idle connections are asked to make room.
    pub fn reclaim(&self) -> &Arc<Reclaim> {
        &self.reclaim
    }

    /// Idle connections asked to close per client waiting at the cap.
    fn batch(&self) -> usize {
        (self.max / 64).clamp(1, RECLAIM_BATCH)
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Room for one more connection, if there is some now.
    pub fn try_admit(&self) -> Option<Admitted> {
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        Some(self.admitted(permit))
    }

    /// Room for a client that is waiting: at once below the cap, else once
    /// a connection closes, idle ones being asked to (with a warning, at
    /// most once a minute).
    pub async fn admit(&self) -> Admitted {
        if let Some(admitted) = self.try_admit() {
            return admitted;
        }
        self.warn();
        let waiting = Waiting(&self.reclaim);
        self.reclaim.ask(self.batch());
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            // The semaphore is never closed.
            .unwrap_or_else(|_| unreachable!("the connection cap is never closed"));
        drop(waiting);
        self.admitted(permit)
    }

    /// Room for the connection `accept` gives: taken before it while below
    /// the cap; at the cap, only once a client is accepted, so that idle
    /// connections are asked to close only for a client that waits.
    pub async fn admit_accepted<T>(&self, accept: impl Future<Output = T>) -> (Admitted, T) {
        if let Some(admitted) = self.try_admit() {
            return (admitted, accept.await);
        }
        let accepted = accept.await;
        (self.admit().await, accepted)
    }

    fn admitted(&self, permit: OwnedSemaphorePermit) -> Admitted {
        self.open.inc();
        Admitted {
            _permit: permit,
            open: self.open.clone(),
        }
    }

    fn warn(&self) {
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        *warned = Some(Instant::now());
        tracing::warn!(
            max = self.max,
            "holding as many connections as allowed: idle ones close to make room for new \
             ones, which wait until one is idle or closes; raise --max-connections (and the \
             open-file limit, ulimit -n) if this server should hold more"
        );
    }

    /// Registers `shoal_connections_open` and `shoal_connections_max` on
    /// `registry`.
    pub fn register(&self, registry: &MetricsRegistry) {
        registry.register(
            "shoal_connections_open",
            "Connections this process's servers (REST and gRPC) hold now",
            self.open.clone(),
        );
        let max = Gauge::<i64, AtomicI64>::default();
        max.set(i64::try_from(self.max).unwrap_or(i64::MAX));
        registry.register(
            "shoal_connections_max",
            "Most connections this process's servers hold at once (--max-connections)",
            max,
        );
    }
}

static PROCESS: OnceLock<Connections> = OnceLock::new();

/// Sets the process's cap; `Err` with the cap in force when it was already
/// set (or a server already started with the default).
pub fn set_max_connections(max: usize) -> Result<(), usize> {
    let mut set = false;
    let connections = PROCESS.get_or_init(|| {
        set = true;
        Connections::new(max)
    });
    if set { Ok(()) } else { Err(connections.max) }
}

/// The cap the process's servers share: the one set, else the default
/// for the open-file limit in force.
pub fn connections() -> &'static Connections {
    PROCESS.get_or_init(|| {
        let soft = open_files().map_or(1024, |files| files.soft);
        Connections::new(default_max_connections(soft))
    })
}

/// The process's cap ([`connections`]).
pub fn max_connections() -> usize {
    connections().max()
}

/// A connection held against a cap: the cap counts it until it is dropped.
#[derive(Debug)]
pub struct Permitted<I> {
    io: I,
    _admitted: Admitted,
}

impl<I> Permitted<I> {
    /// `io`, counted by `admitted`.
    pub fn new(io: I, admitted: Admitted) -> Permitted<I> {
        Permitted {
            io,
            _admitted: admitted,
        }
    }

    /// The connection.
    pub fn get_ref(&self) -> &I {
        &self.io
    }
}

crate::delegate_io!(Permitted, io);

/// A listener that accepts only while its cap has room.
pub struct Capped<L> {
    pub(crate) inner: L,
    pub(crate) connections: Connections,
}

impl<L: axum::serve::Listener> Capped<L> {
    /// The next connection, once the cap has room for it (accept errors,
    /// out of descriptors and the like, are retried by `inner`).
    pub async fn next(&mut self) -> (Permitted<L::Io>, L::Addr) {
        let (admitted, (io, addr)) = self.connections.admit_accepted(self.inner.accept()).await;
        (Permitted::new(io, admitted), addr)
    }

    /// The cap it accepts within.
    pub fn connections(&self) -> &Connections {
        &self.connections
    }
}

impl<L: axum::serve::Listener> axum::serve::Listener for Capped<L> {
    type Io = Permitted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.next().await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_half_the_open_file_limit_within_bounds() {
        assert_eq!(default_max_connections(1024), 512);
        assert_eq!(default_max_connections(20_000), 10_000);
        assert_eq!(default_max_connections(10), MIN_DEFAULT);
        assert_eq!(default_max_connections(0), MIN_DEFAULT);
        // RLIM_INFINITY.
        assert_eq!(default_max_connections(u64::MAX), Semaphore::MAX_PERMITS);
    }

    #[test]
    fn raising_the_open_file_limit_reaches_the_hard_limit() {
        let raised = raise_open_files().unwrap();
        assert_eq!(raised.soft, raised.hard);
        assert_eq!(open_files().unwrap(), raised);
    }

    /// At the cap, admission waits for a connection to close; the gauges
    /// follow.
    #[tokio::test(start_paused = true)]
    async fn admission_waits_at_the_cap_until_a_connection_closes() {
        let connections = Connections::new(2);
        let registry = MetricsRegistry::new();
        connections.register(&registry);
        let first = connections.admit().await;
        let _second = connections.admit().await;
        assert_eq!(connections.open(), 2);
        let text = registry.encode();
        assert!(text.contains("shoal_connections_open 2\n"), "{text}");
        assert!(text.contains("shoal_connections_max 2\n"), "{text}");
        let mut third = Box::pin(connections.admit());
        // Paused time: the runtime is idle, so an hour passes at once.
        tokio::select! {
            _ = &mut third => panic!("a third connection was admitted under a cap of two"),
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
        drop(first);
        let _third = third.await;
        assert_eq!(connections.open(), 2);
        assert!(registry.encode().contains("shoal_connections_open 2\n"));
        drop(_third);
        assert_eq!(connections.open(), 1);
        assert!(registry.encode().contains("shoal_connections_open 1\n"));
    }

    #[test]
    fn idle_connections_close_only_while_a_client_waits_and_only_as_many_as_asked() {
        let mut wanted = Wanted::default();
        assert!(!wanted.claim(), "asked to close with no client waiting");
        wanted.wait(2);
        assert!(wanted.claim());
        assert!(wanted.claim());
        assert!(!wanted.claim(), "more closed than asked");
        // A second client while the first still waits (one listener for
        // REST, one for gRPC) asks its own batch.
        wanted.wait(2);
        assert!(wanted.claim());
        assert!(wanted.claim());
        assert!(!wanted.claim());
        wanted.done();
        wanted.done();
        assert_eq!(wanted, Wanted::default());
        // A client served before idle connections closed for it (another
        // closed on its own): no one is asked any more.
        wanted.wait(3);
        assert!(wanted.claim());
        wanted.done();
        assert!(!wanted.claim());
        // Two waiting, one served: the other's asks still stand.
        wanted.wait(1);
        wanted.wait(1);
        wanted.done();
        assert!(wanted.claim());
        assert!(!wanted.claim());
    }

    #[test]
    fn a_waiting_client_asks_a_64th_of_the_cap_to_close_within_bounds() {
        assert_eq!(Connections::new(1).batch(), 1);
        assert_eq!(Connections::new(200).batch(), 3);
        assert_eq!(Connections::new(10_000).batch(), RECLAIM_BATCH);
    }

    /// A connection busy when asked does not close, and does once idle, at
    /// its next wake-up; one asked while idle closes at once, woken by the
    /// ask; asks answered are not answered again.
    #[tokio::test(start_paused = true)]
    async fn a_connection_closes_when_asked_while_idle() {
        let connections = Connections::new(1);
        let reclaim = Arc::clone(connections.reclaim());
        let held = connections.admit().await;
        let (mut busy, mut idle) = (reclaim.watch(), reclaim.watch());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(busy.poll(&mut cx, false).is_pending());
        assert!(idle.poll(&mut cx, true).is_pending());
        // Two waiting clients ask two rooms, one each (a cap of one).
        let first = tokio::spawn({
            let connections = connections.clone();
            async move { connections.admit().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(
            *reclaim.wanted(),
            Wanted {
                waiting: 1,
                rooms: 1
            }
        );
        assert!(busy.poll(&mut cx, false).is_pending());
        assert!(idle.poll(&mut cx, true).is_ready());
        assert!(
            idle.poll(&mut cx, true).is_pending(),
            "one ask answered twice"
        );
        assert!(busy.poll(&mut cx, true).is_pending(), "claimed already");
        drop(held);
        let _first = first.await.unwrap();
        assert_eq!(*reclaim.wanted(), Wanted::default());
        // A later ask finds the busy one idle: it closes.
        let mut busy = reclaim.watch();
        assert!(busy.poll(&mut cx, false).is_pending());
        let second = tokio::spawn({
            let connections = connections.clone();
            async move { connections.admit().await }
        });
        tokio::task::yield_now().await;
        assert!(busy.poll(&mut cx, false).is_pending());
        assert!(busy.poll(&mut cx, true).is_ready());
        second.abort();
        let _ = second.await;
        assert_eq!(
            *reclaim.wanted(),
            Wanted::default(),
            "a client that gave up still waits"
        );
    }
}
