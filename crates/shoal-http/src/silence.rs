//! Closing connections whose clients went silent.
//!
//! A connection costs a task, buffers and a descriptor, so one whose client
//! stops talking is closed, as nginx does: after [`IDLE_TIMEOUT`] waiting
//! for a next request, after [`READ_TIMEOUT`] in the middle of sending one
//! or of not reading its answer.
//!
//! How: the connection counts the bytes it moves and one timer compares
//! the count every `CHECK` (15 s); [`Silence`] decides, purely, from the
//! count and the number of checks since it last moved. No clock read and no
//! timer reset per request: the timer is polled once per setting and then
//! only its state read.
//!
//! - The server's own HTTP/1.1 loop watches each read and write it waits
//!   on with a [`Watch`] over a [`Counted`] connection, knowing whether it
//!   waits for a request, for the rest of one, or for its reader.
//! - [`Silenced`] wraps a connection served whole by a protocol engine
//!   that cannot say what it waits for. Around gRPC's HTTP/2 it fails the
//!   connection's reads and writes once nothing has moved either way for
//!   [`IDLE_TIMEOUT`]: keep-alive pings keep a live client's connection
//!   moving, and what this catches is a client that never finishes its
//!   connection preface, which HTTP/2 servers otherwise wait on for good.
//!   Around hyper's HTTP/1 connections it fails a write that has waited
//!   [`READ_TIMEOUT`] with nothing written: a client that stopped reading
//!   a streamed answer (an artifact download, a watch stream), which hyper
//!   would otherwise wait on for good (it has no write timeout).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::limit::Quiet;

/// Longest a client may stay silent in the middle of a request (its head
/// or body: answered 408) or while its answer waits to be read: nginx's
/// `client_header_timeout`, `client_body_timeout` and `send_timeout`.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest a kept-alive connection waits for its next request: nginx's
/// `keepalive_timeout`, and longer than the gateway keeps an idle
/// connection to a replica (60 s), so its pool never picks one the
/// replica is about to close.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// How often a connection's silence is checked; a connection closes after
/// between its timeout and its timeout plus this of silence.
pub(crate) const CHECK: Duration = Duration::from_secs(15);

/// What a connection waits for from its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// Its next request.
    Idle,
    /// The rest of a request it started.
    Request,
    /// The client to read what was sent to it.
    Reader,
}

/// The client was silent too long.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Silent;

/// Whether a client has been silent too long, decided at each of its
/// connection's checks from the count of bytes moved: pure, the
/// connection counts and runs the timer. A client silent since just
/// after one check is caught `timeout / CHECK` checks later, so after
/// between its timeout and its timeout plus [`CHECK`] of silence (checks
/// are at least [`CHECK`] apart).
#[derive(Debug, Default)]
pub(crate) struct Silence {
    /// The count at the last check that saw it move.
    seen: u64,
    /// Checks since then.
    checks: u32,
}

impl Silence {
    /// At a check: whether a connection that has moved `moved` bytes in
    /// all, waiting for `waiting`, has been silent too long.
    pub(crate) fn too_long(&mut self, moved: u64, waiting: Waiting) -> bool {
        if moved != self.seen {
            self.seen = moved;
            self.checks = 0;
            return false;
        }
        self.checks += 1;
        let timeout = match waiting {
            Waiting::Idle => IDLE_TIMEOUT,
            Waiting::Request | Waiting::Reader => READ_TIMEOUT,
        };
        CHECK * self.checks >= timeout
    }
}

/// Paces a connection's checks on a timer set every [`CHECK`], cheap to
/// look at on every wake-up of the connection's task (a
/// `tokio::time::Interval` registers its waker at each poll): the timer is
/// polled once per setting, which leaves the task's waker with it, and
/// then only its state is read.
#[derive(Debug, Default)]
pub(crate) struct Tick {
    /// Whether the timer was polled since it was last set.
    armed: bool,
}

impl Tick {
    /// Whether `timer` has fired; if so, sets it again `CHECK` from now (a
    /// check that comes late, a long inference or a busy worker, does not
    /// bring the next ones closer). Call until it says no: that last call
    /// polls the timer anew.
    pub(crate) fn fired(&mut self, mut timer: Pin<&mut Sleep>, cx: &mut Context<'_>) -> bool {
        let fired = if self.armed {
            timer.is_elapsed()
        } else {
            self.armed = true;
            timer.as_mut().poll(cx).is_ready()
        };
        if fired {
            timer.reset(tokio::time::Instant::now() + CHECK);
            self.armed = false;
        }
        fired
    }
}

/// A [`Silence`] and the [`Tick`] of the timer that paces its checks.
#[derive(Debug, Default)]
struct Checks {
    silence: Silence,
    tick: Tick,
}

impl Checks {
    /// Called when the connection's work is not done at once: runs the
    /// checks that are due on `timer` and says whether the client has been
    /// silent too long.
    fn silent(
        &mut self,
        mut timer: Pin<&mut Sleep>,
        moved: u64,
        waiting: Waiting,
        cx: &mut Context<'_>,
    ) -> bool {
        while self.tick.fired(timer.as_mut(), cx) {
            if self.silence.too_long(moved, waiting) {
                tracing::debug!(?waiting, "closing a connection whose client went silent");
                return true;
            }
        }
        false
    }
}

/// A connection's timer and [`Silence`], over the count its [`Counted`]
/// keeps.
pub(crate) struct Watch<'a> {
    timer: Pin<&'a mut Sleep>,
    checks: Checks,
    moved: &'a AtomicU64,
    /// Marked when a check finds the connection idle since the one before.
    quiet: Option<Quiet>,
}

impl<'a> Watch<'a> {
    /// Watches the count `moved` with `timer` (set to fire `CHECK` from now).
    pub(crate) fn new(timer: Pin<&'a mut Sleep>, moved: &'a AtomicU64) -> Watch<'a> {
        Watch {
            timer,
            checks: Checks::default(),
            moved,
            quiet: None,
        }
    }

    /// Marks `quiet` when a check finds the connection waiting for its next
    /// request with nothing moved since the check before.
    pub(crate) fn marking(self, quiet: Quiet) -> Watch<'a> {
        Watch {
            quiet: Some(quiet),
            ..self
        }
    }

    /// Runs `work`, a read or write of the connection, checking the
    /// client's silence each time the timer fires meanwhile. The timer is
    /// only looked at when `work` is not done at once, and polled once
    /// per setting (a connection's task keeps its waker): a request costs
    /// no clock read, timer reset or waker registration.
    pub(crate) async fn bound<T>(
        &mut self,
        work: impl Future<Output = T>,
        waiting: Waiting,
    ) -> Result<T, Silent> {
        let mut work = pin!(work);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(done) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(done));
            }
            let moved = self.moved.load(Ordering::Relaxed);
            let before = self.checks.silence.checks;
            if self.checks.silent(self.timer.as_mut(), moved, waiting, cx) {
                return Poll::Ready(Err(Silent));
            }
            // A check now found nothing moved since the one before.
            if waiting == Waiting::Idle
                && self.checks.silence.checks > before
                && let Some(quiet) = &self.quiet
            {
                quiet.set();
            }
            Poll::Pending
        })
        .await
    }
}

/// A connection that counts the bytes it reads and writes.
pub(crate) struct Counted<'a, I> {
    pub(crate) io: &'a mut I,
    pub(crate) moved: &'a AtomicU64,
}

impl<I> Counted<'_, I> {
    fn count(&self, n: usize) {
        if n > 0 {
            // One writer: a load and a store, no locked add.
            let moved = self.moved.load(Ordering::Relaxed);
            self.moved
                .store(moved.wrapping_add(n as u64), Ordering::Relaxed);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<'_, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.io).poll_read(cx, buf);
        self.count(buf.filled().len() - before);
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<'_, I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut *self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.count(n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut *self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.count(n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// A connection that fails (`TimedOut`) once its client has been silent
/// too long: for connections served whole by an engine that cannot say
/// what it waits for (see the module doc). Two watches:
/// - [`Silenced::new`]: reads and writes fail once nothing has moved
///   either way for [`IDLE_TIMEOUT`] (gRPC's HTTP/2, whose pings keep a
///   live client's connection moving);
/// - [`Silenced::answers`]: writes fail once one has waited [`READ_TIMEOUT`]
///   with nothing written (an HTTP/1 client that stopped reading its
///   answer); reads are left to the engine's own timeouts.
pub struct Silenced<I> {
    io: I,
    moved: u64,
    timer: Pin<Box<Sleep>>,
    checks: Checks,
    /// Whether reads count and are watched, else only writes.
    reads: bool,
}

impl<I> Silenced<I> {
    /// Watches both ways of `io` from now.
    pub fn new(io: I) -> Silenced<I> {
        Self::watching(io, true)
    }

    /// Watches `io`'s writes from now.
    pub fn answers(io: I) -> Silenced<I> {
        Self::watching(io, false)
    }

    fn watching(io: I, reads: bool) -> Silenced<I> {
        Silenced {
            io,
            moved: 0,
            timer: Box::pin(tokio::time::sleep(CHECK)),
            checks: Checks::default(),
            reads,
        }
    }

    /// The connection watched.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// Counts `n` bytes moved; when nothing moved (the work is pending),
    /// the error to fail it with if its client has been silent too long.
    fn after(&mut self, n: usize, pending: bool, cx: &mut Context<'_>) -> Option<std::io::Error> {
        self.moved = self.moved.wrapping_add(n as u64);
        let waiting = if self.reads {
            Waiting::Idle
        } else {
            Waiting::Reader
        };
        (pending
            && self
                .checks
                .silent(self.timer.as_mut(), self.moved, waiting, cx))
        .then(|| {
            let message = if self.reads {
                format!(
                    "the client sent and read nothing for {} s",
                    IDLE_TIMEOUT.as_secs()
                )
            } else {
                format!(
                    "the client read nothing of its answer for {} s",
                    READ_TIMEOUT.as_secs()
                )
            };
            std::io::Error::new(std::io::ErrorKind::TimedOut, message)
        })
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Silenced<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.reads {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        match self.after(read, polled.is_pending(), cx) {
            Some(silent) => Poll::Ready(Err(silent)),
            None => polled,
        }
    }
}

impl<I: AsyncWrite + Unpin> Silenced<I> {
    /// A write of the connection (`write`), counted and watched.
    fn watched_write(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut I>, &mut Context<'_>) -> Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        let polled = write(Pin::new(&mut self.io), cx);
        let written = match polled {
            Poll::Ready(Ok(n)) => n,
            _ => 0,
        };
        match self.after(written, polled.is_pending(), cx) {
            Some(silent) => Poll::Ready(Err(silent)),
            None => polled,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Silenced<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.watched_write(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.watched_write(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Silence is judged over whole checks: progress at a check starts
    /// the count again; an idle connection gets more checks than a
    /// request half sent or an answer not read.
    #[test]
    fn silence_is_counted_in_checks_since_the_last_bytes_moved() {
        let silent_checks = |waiting| {
            let mut silence = Silence::default();
            // Bytes moved before the first check.
            assert!(!silence.too_long(100, waiting));
            (1..=100).find(|_| silence.too_long(100, waiting)).unwrap()
        };
        assert_eq!(CHECK * silent_checks(Waiting::Idle), IDLE_TIMEOUT);
        assert_eq!(CHECK * silent_checks(Waiting::Request), READ_TIMEOUT);
        assert_eq!(CHECK * silent_checks(Waiting::Reader), READ_TIMEOUT);
        // A byte between checks, however late, starts the count again.
        let mut silence = Silence::default();
        for _ in 0..3 {
            assert!(!silence.too_long(0, Waiting::Request));
        }
        assert!(!silence.too_long(1, Waiting::Request));
        for _ in 0..3 {
            assert!(!silence.too_long(1, Waiting::Request));
        }
        assert!(silence.too_long(1, Waiting::Request));
    }

    /// A silenced connection whose peer says nothing fails its pending read
    /// between [`IDLE_TIMEOUT`] and one check later; bytes moving either
    /// way, however sparse, keep it open.
    #[tokio::test(start_paused = true)]
    async fn a_silenced_connection_fails_after_the_idle_timeout_of_nothing_moving() {
        let (ours, peer) = tokio::io::duplex(64);
        let mut ours = Silenced::new(ours);
        let start = tokio::time::Instant::now();
        let mut byte = [0u8; 1];
        let failed = tokio::time::timeout(IDLE_TIMEOUT * 2, ours.read(&mut byte))
            .await
            .expect("a silent peer's connection stayed open")
            .unwrap_err();
        assert_eq!(failed.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            failed
                .to_string()
                .contains("sent and read nothing for 75 s"),
            "{failed}"
        );
        let waited = start.elapsed();
        assert!(
            IDLE_TIMEOUT <= waited && waited <= IDLE_TIMEOUT + CHECK,
            "{waited:?}"
        );

        // A byte from the peer every 60 s, then one from us every 60 s:
        // four minutes in all, the connection still reads and writes.
        let (ours, mut peer_end) = tokio::io::duplex(64);
        let mut ours = Silenced::new(ours);
        for _ in 0..4 {
            let read = async {
                ours.read_exact(&mut byte).await.unwrap();
            };
            let send = async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                peer_end.write_all(b"x").await.unwrap();
            };
            tokio::join!(read, send);
        }
        let start = tokio::time::Instant::now();
        for _ in 0..4 {
            // Our writes, with a read pending meanwhile (as HTTP/2 always
            // has one): what we send keeps the connection open too.
            let mut pending_read = [0u8; 1];
            tokio::select! {
                read = ours.read(&mut pending_read) => panic!("read {read:?}"),
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            ours.write_all(b"y").await.unwrap();
            peer_end.read_exact(&mut byte).await.unwrap();
        }
        assert!(start.elapsed() >= Duration::from_secs(240));
        drop(peer);
    }
}
