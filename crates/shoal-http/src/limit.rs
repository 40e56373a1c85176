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
//! Metrics, on each role's `/metrics`: `shoal_connections_open` and
//! `shoal_connections_max`.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use shoal_telemetry::MetricsRegistry;
use shoal_telemetry::prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The fewest connections the default allows, however low the open-file
/// limit.
const MIN_DEFAULT: usize = 16;

/// How often at most the cap's warning is logged.
const WARN_EVERY: Duration = Duration::from_secs(60);

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

    /// Room for one more connection: at once below the cap, else once one
    /// closes (with a warning, at most once a minute).
    pub async fn admit(&self) -> Admitted {
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.warn();
                Arc::clone(&self.permits)
                    .acquire_owned()
                    .await
                    // The semaphore is never closed.
                    .unwrap_or_else(|_| unreachable!("the connection cap is never closed"))
            }
        };
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
            "holding as many connections as allowed: new ones wait to be accepted until one \
             closes; raise --max-connections (and the open-file limit, ulimit -n) if this \
             server should hold more"
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
        let admitted = self.connections.admit().await;
        let (io, addr) = self.inner.accept().await;
        (Permitted::new(io, admitted), addr)
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
}
