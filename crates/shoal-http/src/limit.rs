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
//! connections to close ([`Reclaim`]): a batch of them (a 64th of the cap,
//! at least one and at most [`RECLAIM_BATCH`]; doubling for asks in a row,
//! while clients keep coming, up to an eighth of the cap), so the next few
//! clients find room without asking again. No more are asked while those asked and
//! those closing make room for every waiting client (and connections
//! picked whose tasks have not run yet count as asked), and an ask wakes only
//! the idle connections it picks (first those idle since before their
//! last silence check, as nginx closes its least recently used keep-alive
//! connections first), so a flood of new clients neither empties
//! the server of its idle connections nor wakes each of them per client. A
//! client still waiting [`RECLAIM_AGAIN`] after it asked asks again (a
//! connection picked may have been handed a request meanwhile). Each
//! connection asked closes after [`RECLAIM_DRAIN`], or after answering a
//! request that comes meanwhile (saying `connection: close`): a client that
//! was only between two requests is not cut mid-request (one idle since
//! before its last silence check closes at once; an HTTP/2
//! connection, gRPC's, served by [`crate::h2`], with no call in flight
//! shuts down gracefully instead: GOAWAY, and the calls sent before the
//! client saw it are answered). Connections with
//! a request in flight are not touched: when none is idle, the new client
//! waits until one closes or goes idle.
//!
//! Metrics, on each role's `/metrics`: `shoal_connections_open` and
//! `shoal_connections_max`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use shoal_telemetry::MetricsRegistry;
use shoal_telemetry::prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::silence::Tick;

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

/// How soon after an ask the next one doubles the batch (see `Batch`):
/// a client that asks within it found the rooms of the last ask taken by
/// the clients before it.
pub const RECLAIM_BURST: Duration = Duration::from_millis(100);

/// How long a client waiting at the cap waits for the room it asked before
/// asking again, whatever is already asked or closing: a connection picked
/// while idle may have been handed a request before it could close, and one
/// that agreed to close may be answering a long request in its drain.
pub const RECLAIM_AGAIN: Duration = Duration::from_millis(100);

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

/// How many idle connections one ask closes: `first` for an ask after a
/// quiet spell, doubling for asks in a row (each within [`RECLAIM_BURST`]
/// of the last: clients keep coming) up to `most`, as TCP's slow start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Batch {
    pub(crate) first: usize,
    pub(crate) most: usize,
}

/// Clients waiting for room at the cap, and the idle connections asked to
/// close for them or closing: pure, [`Reclaim`] keeps it under a lock.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Wanted {
    /// Clients accepted and waiting for room.
    waiting: usize,
    /// Idle connections still asked to close.
    rooms: usize,
    /// Connections that agreed to close and have not closed yet (they
    /// drain first): room on its way.
    closing: usize,
    /// Of `rooms`, those no idle connection was picked for: any
    /// connection may take them once idle (when all were busy).
    open: usize,
    /// The last ask's batch, and when it was made.
    last: Option<(usize, Instant)>,
}

impl Wanted {
    /// A client waits for room at `now`: how many more idle connections to
    /// ask to close. None while those asked and those closing make room
    /// for every waiting client; else a batch (room for it and the next
    /// ones, see [`Batch`]), or as many as clients wait without room on
    /// its way if more.
    pub(crate) fn wait(&mut self, batch: Batch, now: Instant) -> usize {
        self.waiting += 1;
        let coming = self.rooms + self.closing;
        if coming >= self.waiting {
            return 0;
        }
        let size = match self.last {
            Some((size, at)) if now.saturating_duration_since(at) <= RECLAIM_BURST => {
                (size * 2).min(batch.most).max(batch.first)
            }
            _ => batch.first,
        };
        self.last = Some((size, now));
        let more = size.max(self.waiting - coming);
        self.rooms += more;
        more
    }

    /// A client still waits long after it asked: how many idle connections
    /// to ask (again) to close — as many as clients wait, at least a batch,
    /// counting neither the rooms asked nor the connections closing, which
    /// evidently did not make room in time.
    pub(crate) fn again(&mut self, batch: Batch) -> usize {
        self.rooms = self.rooms.max(batch.first.max(self.waiting));
        self.rooms
    }

    /// An ask found `n` fewer idle connections than it wanted: as many of
    /// its rooms are open to any connection that goes idle.
    pub(crate) fn unpicked(&mut self, n: usize) {
        self.open = (self.open + n).min(self.rooms);
    }

    /// An idle connection offers to close, `picked` by an ask or not:
    /// whether it is still asked to (it then counts as closing until
    /// [`Wanted::closed`]). One not picked takes only an open room, so
    /// that a connection only between two requests, which notices asks
    /// first, does not take the room of one idle a while.
    pub(crate) fn claim(&mut self, picked: bool) -> bool {
        if self.waiting == 0 || self.rooms == 0 {
            return false;
        }
        if !picked {
            if self.open == 0 {
                return false;
            }
            self.open -= 1;
        }
        self.rooms -= 1;
        self.open = self.open.min(self.rooms);
        self.closing += 1;
        true
    }

    /// A connection that claimed a room closed.
    pub(crate) fn closed(&mut self) {
        debug_assert!(self.closing > 0, "a connection closed twice");
        self.closing = self.closing.saturating_sub(1);
    }

    /// A waiting client got room (or gave up): once none waits, no idle
    /// connection is asked to close any more.
    pub(crate) fn done(&mut self) {
        self.waiting -= 1;
        if self.waiting == 0 {
            self.rooms = 0;
            self.open = 0;
        }
    }
}

/// How a server's idle connections are asked to make room at the cap.
///
/// Each connection has a slot here: whether it waits for its next
/// request (and, marked by its silence watch, whether it has been for a
/// while), and its task's waker. An ask wakes only as many idle
/// connections as it wants rooms, those idle a while first (from where
/// the last ask stopped, so that the same ones are not woken each time),
/// marking them picked, and bumps a count that the others read when their
/// own task wakes: rooms an ask found no idle connection for are open to
/// any connection once idle (one busy when asked closes then); the picked
/// ones' are not, so a connection only between two requests, which sees
/// asks first, does not take them. Per request a connection sets its flag and its waker
/// (atomics, no lock); the lock is taken per connection (to enter and
/// leave) and per ask.
#[derive(Debug, Default)]
pub struct Reclaim {
    wanted: Mutex<Wanted>,
    /// Asks so far.
    asked: AtomicU64,
    /// Connections picked whose tasks have not yet answered (woken, not
    /// yet run, or busy since): an ask counts them as rooms on their way
    /// rather than picking others, which in a burst of asks would run out
    /// of connections idle a while and pick ones only between requests.
    pending: AtomicUsize,
    slots: Mutex<Slots>,
}

/// The connections watching a [`Reclaim`], and where its next wake-up
/// starts.
#[derive(Debug, Default)]
struct Slots {
    slots: slab::Slab<Arc<Slot>>,
    /// The key after the last connection woken.
    next: usize,
}

/// One connection as its [`Reclaim`] sees it.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// Waiting for its next request.
    idle: AtomicBool,
    /// Waiting for it since before the last check of its silence (at
    /// least `silence::CHECK`): asks pick such connections first.
    quiet: AtomicBool,
    /// Picked by an ask to close.
    picked: AtomicBool,
    waker: AtomicWaker,
}

/// Where a connection's silence watch says it has been idle a while.
pub(crate) struct Quiet(Arc<Slot>);

impl Quiet {
    /// The connection has been waiting since before the last check.
    pub(crate) fn set(&self) {
        self.0.quiet.store(true, Ordering::Relaxed);
    }
}

impl Reclaim {
    fn wanted(&self) -> std::sync::MutexGuard<'_, Wanted> {
        self.wanted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A client waits for room: asks idle connections to close, `batch`
    /// of them unless enough are asked or closing already.
    fn ask(&self, batch: Batch) {
        let more = self.wanted().wait(batch, Instant::now());
        self.wake(more.saturating_sub(self.pending.load(Ordering::Relaxed)));
    }

    /// A client still waits [`RECLAIM_AGAIN`] after it asked: asks again.
    fn again(&self, batch: Batch) {
        let more = self.wanted().again(batch);
        self.wake(more);
    }

    /// Bumps the count of asks and wakes `more` idle connections, from
    /// where the last ask stopped.
    fn wake(&self, more: usize) {
        if more == 0 {
            return;
        }
        // Sequentially consistent with the connections' flags (see
        // `Asked::poll`): a connection going idle either sees this count
        // or is seen idle below.
        self.asked.fetch_add(1, Ordering::SeqCst);
        let picked = self.pick(more);
        if picked < more {
            self.wanted().unpicked(more - picked);
        }
    }

    /// Picks and wakes up to `more` idle connections, from where the last
    /// ask stopped: those idle a while first (as nginx closes its least
    /// recently used), then any idle one. Says how many.
    fn pick(&self, more: usize) -> usize {
        let mut slots = self.slots();
        let Slots { slots, next } = &mut *slots;
        let start = *next;
        let mut picked = 0;
        for quiet_only in [true, false] {
            for (key, slot) in slots
                .iter()
                .skip_while(|(key, _)| *key < start)
                .chain(slots.iter().take_while(|(key, _)| *key < start))
            {
                if picked == more {
                    return picked;
                }
                let quiet = slot.quiet.load(Ordering::Relaxed);
                if quiet == quiet_only
                    && slot.idle.load(Ordering::SeqCst)
                    && !slot.picked.swap(true, Ordering::Relaxed)
                {
                    self.pending.fetch_add(1, Ordering::Relaxed);
                    slot.waker.wake();
                    picked += 1;
                    *next = key + 1;
                }
            }
        }
        picked
    }

    /// Watches, for a connection, whether it is asked to close while idle.
    pub(crate) fn watch(&self) -> Asked<'_> {
        let slot = Arc::<Slot>::default();
        let key = self.slots().slots.insert(Arc::clone(&slot));
        Asked {
            reclaim: self,
            seen: self.asked.load(Ordering::SeqCst),
            slot,
            key,
            idle: false,
            claimed: false,
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
    slot: Arc<Slot>,
    /// Its place in the reclaim's slots.
    key: usize,
    /// What `slot` says: whether it waits for its next request.
    idle: bool,
    /// It agreed to close.
    claimed: bool,
}

/// How a connection that agreed to make room closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// At once: it had been idle since before its last silence check, so
    /// its client is not in the middle of sending its next request (as
    /// nginx closes idle keep-alive connections outright when it needs
    /// their room).
    AtOnce,
    /// After [`RECLAIM_DRAIN`], or after answering a request that comes
    /// meanwhile: its client may be only between two requests.
    AfterDrain,
}

/// How the asks see a connection that hyper serves whole, which has no
/// silence watch on its idle wait: by a count of what its client sent
/// (bytes read, calls started), which [`Asked::poll_activity`] reads.
pub(crate) struct Activity {
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    tick: Tick,
    /// The count at the last check, and at the last look.
    at_check: u64,
    at_look: u64,
    /// Whether it was idle at the last check.
    idle_at_check: bool,
}

impl Activity {
    /// Nothing seen yet; the first check `silence::CHECK` from now.
    pub(crate) fn new() -> Activity {
        Activity {
            timer: Box::pin(tokio::time::sleep(crate::silence::CHECK)),
            tick: Tick::default(),
            at_check: 0,
            at_look: 0,
            idle_at_check: false,
        }
    }
}

impl Asked<'_> {
    /// Whether the connection should close now to make room: it is asked
    /// and `idle` (waiting for its next request). Polled when the
    /// connection's task wakes: an idle connection leaves its waker for the
    /// asks, so that one that picks it wakes it. An ask that finds it busy
    /// is looked at again at each of its wake-ups until it is idle.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, idle: bool) -> Poll<Close> {
        if !idle {
            self.busy();
            return Poll::Pending;
        }
        self.slot.waker.register(cx.waker());
        if !self.idle {
            self.idle = true;
            self.slot.idle.store(true, Ordering::SeqCst);
        }
        let asked = self.reclaim.asked.load(Ordering::SeqCst);
        // Picked: it may have seen the count before the ask picked it.
        if asked == self.seen && !self.slot.picked.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        self.seen = asked;
        let picked = self.unpick();
        if !self.reclaim.wanted().claim(picked) {
            return Poll::Pending;
        }
        self.claimed = true;
        let quiet = self.slot.quiet.load(Ordering::Relaxed);
        self.busy();
        Poll::Ready(if quiet {
            Close::AtOnce
        } else {
            Close::AfterDrain
        })
    }

    /// [`Asked::poll`] for a connection `activity` follows, whose client
    /// has sent `count` so far: sending since the last look makes it busy
    /// (no longer quiet: an exchange can start and end within one wake-up
    /// of its task, never seen in flight), and a check (every
    /// `silence::CHECK`) that finds it `idle`, as the one before did, with
    /// nothing sent since, marks it quiet (one whose long answer ends as a
    /// check comes is not).
    pub(crate) fn poll_activity(
        &mut self,
        cx: &mut Context<'_>,
        activity: &mut Activity,
        count: u64,
        idle: bool,
    ) -> Poll<Close> {
        if count != activity.at_look {
            activity.at_look = count;
            self.busy();
        }
        while activity.tick.fired(activity.timer.as_mut(), cx) {
            if count == activity.at_check && idle && activity.idle_at_check {
                self.slot.quiet.store(true, Ordering::Relaxed);
            }
            activity.at_check = count;
            activity.idle_at_check = idle;
        }
        self.poll(cx, idle)
    }

    /// Takes the connection's pick, if an ask picked it: whether one did.
    fn unpick(&self) -> bool {
        let picked = self.slot.picked.swap(false, Ordering::Relaxed);
        if picked {
            self.reclaim.pending.fetch_sub(1, Ordering::Relaxed);
        }
        picked
    }

    /// The connection has a request in hand: asks do not wake it.
    pub(crate) fn busy(&mut self) {
        if self.idle {
            self.idle = false;
            self.slot.idle.store(false, Ordering::Relaxed);
            self.slot.quiet.store(false, Ordering::Relaxed);
        }
    }

    /// Where the connection's silence watch marks it idle a while.
    pub(crate) fn quiet(&self) -> Quiet {
        Quiet(Arc::clone(&self.slot))
    }
}

impl Drop for Asked<'_> {
    fn drop(&mut self) {
        // Out of the slots first: no ask picks it after its pick is taken.
        self.reclaim.slots().slots.remove(self.key);
        self.unpick();
        if self.claimed {
            self.reclaim.wanted().closed();
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

    /// Idle connections an ask closes: a 64th of the cap (at least one, at
    /// most [`RECLAIM_BATCH`]), up to an eighth of it for asks in a row.
    fn batch(&self) -> Batch {
        let first = (self.max / 64).clamp(1, RECLAIM_BATCH);
        Batch {
            first,
            most: first.max(self.max / 8),
        }
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
        let mut acquire = std::pin::pin!(Arc::clone(&self.permits).acquire_owned());
        let permit = loop {
            tokio::select! {
                permit = &mut acquire => break permit,
                () = tokio::time::sleep(RECLAIM_AGAIN) => self.reclaim.again(self.batch()),
            }
        }
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
impl Wanted {
    /// Clients waiting, rooms asked, connections closing.
    fn counts(&self) -> (usize, usize, usize) {
        (self.waiting, self.rooms, self.closing)
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
        let now = Instant::now();
        let fixed = |size| Batch {
            first: size,
            most: size,
        };
        assert!(!wanted.claim(true), "asked to close with no client waiting");
        assert_eq!(wanted.wait(fixed(2), now), 2);
        assert!(wanted.claim(true));
        assert!(wanted.claim(true));
        assert!(!wanted.claim(true), "more closed than asked");
        // A second client while the first still waits: the two closing
        // make room for both.
        assert_eq!(
            wanted.wait(fixed(2), now),
            0,
            "asked more than the clients need"
        );
        assert!(!wanted.claim(true));
        // A third: a batch more.
        assert_eq!(wanted.wait(fixed(2), now), 2);
        assert!(wanted.claim(true));
        // Clients waiting at once past a batch ask as many as they are.
        for _ in 0..3 {
            wanted.wait(fixed(2), now);
        }
        assert_eq!(wanted.counts(), (6, 3, 3));
        for _ in 0..3 {
            assert!(wanted.claim(true));
            wanted.closed();
            wanted.closed();
            wanted.done();
            wanted.done();
        }
        assert_eq!(wanted.counts(), (0, 0, 0));
        // A client served before idle connections closed for it (another
        // closed on its own): no one is asked any more.
        assert_eq!(wanted.wait(fixed(3), now), 3);
        assert!(wanted.claim(true));
        wanted.done();
        assert!(!wanted.claim(true));
        wanted.closed();
        // Two waiting, one served: the asks still stand.
        assert_eq!(wanted.wait(fixed(1), now), 1);
        assert_eq!(wanted.wait(fixed(1), now), 1);
        wanted.done();
        assert!(wanted.claim(true));
        assert!(wanted.claim(true));
        assert!(!wanted.claim(true));
    }

    #[test]
    fn a_waiting_client_asks_a_64th_of_the_cap_to_close_within_bounds() {
        let batch = |max| {
            let Batch { first, most } = Connections::new(max).batch();
            (first, most)
        };
        assert_eq!(batch(1), (1, 1));
        assert_eq!(batch(200), (3, 25));
        assert_eq!(batch(10_000), (RECLAIM_BATCH, 1250));
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
        assert_eq!(reclaim.wanted().counts(), (1, 1, 0));
        assert!(busy.poll(&mut cx, false).is_pending());
        assert!(idle.poll(&mut cx, true).is_ready());
        assert!(
            idle.poll(&mut cx, true).is_pending(),
            "one ask answered twice"
        );
        assert!(busy.poll(&mut cx, true).is_pending(), "claimed already");
        drop(held);
        let _first = first.await.unwrap();
        drop(idle);
        assert_eq!(reclaim.wanted().counts(), (0, 0, 0));
        // A later ask finds no idle connection to pick: the busy one closes
        // once idle.
        drop(busy);
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
        drop(busy);
        assert_eq!(
            reclaim.wanted().counts(),
            (0, 0, 0),
            "a client that gave up still waits"
        );
    }

    /// Wakes counted, for the connections' tasks.
    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl Woken {
        fn count(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }

    /// An ask wakes as many idle connections as it wants rooms, never the
    /// busy ones, and the next ask picks others; a busy one that saw the
    /// ask closes once idle, at its own next wake-up.
    #[tokio::test(start_paused = true)]
    async fn an_ask_wakes_only_the_idle_connections_it_picks() {
        let connections = Connections::new(200);
        let reclaim = Arc::clone(connections.reclaim());
        let mut watches: Vec<_> = (0..100).map(|_| reclaim.watch()).collect();
        let wakers: Vec<Arc<Woken>> = (0..100).map(|_| Arc::default()).collect();
        let poll = |watch: &mut Asked<'_>, woken: &Arc<Woken>, idle: bool| {
            let waker = std::task::Waker::from(Arc::clone(woken));
            watch.poll(&mut Context::from_waker(&waker), idle)
        };
        // Ten busy, ninety idle.
        for (i, (watch, woken)) in watches.iter_mut().zip(&wakers).enumerate() {
            assert!(poll(watch, woken, i >= 10).is_pending());
        }
        let woken = |range: std::ops::Range<usize>| -> usize {
            wakers[range]
                .iter()
                .filter(|woken| woken.count() > 0)
                .count()
        };
        // A client waits: a batch of three (200 / 64) is asked.
        let _first = Waiting(&reclaim);
        reclaim.ask(connections.batch());
        assert_eq!(woken(0..100), 3, "woke other than the three asked");
        assert_eq!(woken(0..10), 0, "woke a busy connection");
        let picked: Vec<usize> = (0..100).filter(|&i| wakers[i].count() > 0).collect();
        for &i in &picked {
            assert!(poll(&mut watches[i], &wakers[i], true).is_ready());
        }
        // Two more clients: the three closing make room for them.
        let _second = Waiting(&reclaim);
        reclaim.ask(connections.batch());
        let _third = Waiting(&reclaim);
        reclaim.ask(connections.batch());
        assert_eq!(woken(0..100), 3, "asked again with room on its way");
        // A fourth, after a quiet spell (asks in a row would ask more): three
        // more, others than the first three.
        tokio::time::advance(RECLAIM_BURST * 2).await;
        let _fourth = Waiting(&reclaim);
        reclaim.ask(connections.batch());
        assert_eq!(woken(0..100), 6);
        assert_eq!(woken(0..10), 0);
        // A busy connection that goes idle sees the ask, but does not take
        // a room an idle one was picked for.
        assert!(
            poll(&mut watches[0], &wakers[0], true).is_pending(),
            "took a picked connection's room"
        );
        let more: Vec<usize> = (0..100)
            .filter(|&i| wakers[i].count() > 0 && !picked.contains(&i))
            .collect();
        assert_eq!(more.len(), 3);
        let ready = more
            .iter()
            .filter(|&&i| poll(&mut watches[i], &wakers[i], true).is_ready())
            .count();
        assert_eq!(ready, 3);
        // The connections that closed leave the count of those closing.
        for i in picked.into_iter().rev() {
            drop(watches.remove(i));
        }
        assert_eq!(reclaim.wanted().closing, 3);
    }

    /// Connections picked whose tasks have not run yet count as rooms on
    /// their way: in a burst of clients each asking as soon as the one
    /// before got room, the asks do not run through the connections idle
    /// a while and on to those only between two requests (which would
    /// drain, and hold every client behind them).
    #[tokio::test(start_paused = true)]
    async fn picks_not_yet_answered_are_not_picked_past() {
        let connections = Connections::new(64);
        let reclaim = Arc::clone(connections.reclaim());
        let mut watches: Vec<_> = (0..6).map(|_| reclaim.watch()).collect();
        let wakers: Vec<Arc<Woken>> = (0..6).map(|_| Arc::default()).collect();
        let poll = |watch: &mut Asked<'_>, woken: &Arc<Woken>, idle: bool| {
            let waker = std::task::Waker::from(Arc::clone(woken));
            watch.poll(&mut Context::from_waker(&waker), idle)
        };
        // All idle; the first four a while (quiet).
        for (i, (watch, woken)) in watches.iter_mut().zip(&wakers).enumerate() {
            assert!(poll(watch, woken, true).is_pending());
            if i < 4 {
                watch.quiet().set();
            }
        }
        let woken = || -> Vec<usize> { (0..6).filter(|&i| wakers[i].count() > 0).collect() };
        // A client asks (a batch of one) and gets room before the one
        // picked has run; the next asks at once, and so on.
        let batch = Batch { first: 1, most: 1 };
        for _ in 0..3 {
            let waiting = Waiting(&reclaim);
            reclaim.ask(batch);
            drop(waiting);
        }
        assert_eq!(woken(), [0], "picked past a pick on its way");
        // It runs, agrees to close (a client waits) and is gone: the next
        // ask picks another connection idle a while.
        let waiting = Waiting(&reclaim);
        reclaim.ask(batch);
        assert!(poll(&mut watches[0], &wakers[0], true).is_ready());
        drop(watches.remove(0));
        drop(waiting);
        let waiting = Waiting(&reclaim);
        reclaim.ask(batch);
        assert_eq!(woken(), [0, 1]);
        drop(waiting);
        assert_eq!(reclaim.pending.load(Ordering::Relaxed), 1);
        // A picked connection that closes for its own reasons takes its
        // pick with it.
        drop(watches.remove(0));
        assert_eq!(reclaim.pending.load(Ordering::Relaxed), 0);
    }

    /// A connection picked while idle that is handed a request before it
    /// can close does not keep the client waiting: after
    /// [`RECLAIM_AGAIN`] the client asks again and another idle one is
    /// woken; so is one that agreed to close and then answers a long
    /// request in its drain.
    #[tokio::test(start_paused = true)]
    async fn a_client_still_waiting_asks_again() {
        let connections = Connections::new(3);
        let reclaim = Arc::clone(connections.reclaim());
        let held: Vec<Admitted> = (0..3).map(|_| connections.try_admit().unwrap()).collect();
        let mut watches: Vec<_> = (0..3).map(|_| reclaim.watch()).collect();
        let wakers: Vec<Arc<Woken>> = (0..3).map(|_| Arc::default()).collect();
        let poll = |watch: &mut Asked<'_>, woken: &Arc<Woken>, idle: bool| {
            let waker = std::task::Waker::from(Arc::clone(woken));
            watch.poll(&mut Context::from_waker(&waker), idle)
        };
        for (watch, woken) in watches.iter_mut().zip(&wakers) {
            assert!(poll(watch, woken, true).is_pending());
        }
        let started = tokio::time::Instant::now();
        let client = tokio::spawn({
            let connections = connections.clone();
            async move { connections.admit().await }
        });
        tokio::task::yield_now().await;
        // The first is picked, and a request comes on it before it looks.
        assert_eq!(
            wakers.iter().map(|w| w.count()).collect::<Vec<_>>(),
            [1, 0, 0]
        );
        assert!(poll(&mut watches[0], &wakers[0], false).is_pending());
        // Paused time: the runtime advances to the client's next ask (and
        // lets the client's task run after its timer fires).
        tokio::time::sleep(RECLAIM_AGAIN).await;
        tokio::task::yield_now().await;
        assert_eq!(wakers[1].count(), 1, "the client did not ask again");
        // The second agrees, and then a request comes during its drain.
        assert!(poll(&mut watches[1], &wakers[1], true).is_ready());
        tokio::time::sleep(RECLAIM_AGAIN).await;
        tokio::task::yield_now().await;
        assert_eq!(wakers[2].count(), 1, "a closing connection held the room");
        assert!(poll(&mut watches[2], &wakers[2], true).is_ready());
        let mut held = held;
        drop(watches.pop());
        drop(held.pop());
        let _admitted = client.await.unwrap();
        assert_eq!(started.elapsed(), RECLAIM_AGAIN * 2);
    }

    #[test]
    fn a_client_asking_again_counts_no_room_on_its_way() {
        let mut wanted = Wanted::default();
        let (two, now) = (Batch { first: 2, most: 2 }, Instant::now());
        assert_eq!(wanted.wait(two, now), 2);
        assert!(wanted.claim(true));
        assert!(wanted.claim(true));
        assert_eq!(wanted.again(two), 2, "counted the ones closing");
        wanted.wait(two, now);
        wanted.wait(two, now);
        assert_eq!(wanted.again(two), 3, "fewer than the clients waiting");
    }

    /// Asks in a row double their batch up to the most; after a quiet
    /// spell an ask starts small again.
    #[test]
    fn asks_in_a_row_double_their_batch_up_to_the_most() {
        let batch = Batch { first: 2, most: 10 };
        let mut wanted = Wanted::default();
        let start = Instant::now();
        let mut asked = Vec::new();
        for i in 0..5 {
            // The last ask's rooms taken and closed, its client served.
            let more = wanted.wait(batch, start + RECLAIM_BURST * i / 2);
            asked.push(more);
            for _ in 0..more {
                assert!(wanted.claim(true));
                wanted.closed();
            }
            wanted.done();
        }
        assert_eq!(asked, [2, 4, 8, 10, 10]);
        assert_eq!(wanted.wait(batch, start + RECLAIM_BURST * 10), 2);
    }

    /// A connection no ask picked takes a room only when an ask found too
    /// few idle connections to pick (all busy): then the first to go idle.
    #[test]
    fn connections_not_picked_take_only_the_rooms_left_open() {
        let mut wanted = Wanted::default();
        let one = Batch { first: 1, most: 1 };
        assert_eq!(wanted.wait(one, Instant::now()), 1);
        assert!(!wanted.claim(false), "took the picked one's room");
        wanted.unpicked(1);
        assert!(wanted.claim(false));
        assert!(!wanted.claim(true), "more closed than asked");
        // Open rooms never outnumber the rooms asked.
        wanted.unpicked(5);
        assert_eq!(wanted.open, 0);
    }
}
