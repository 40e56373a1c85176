//! A TCP proxy that can cut the network: for tests of what happens when a
//! transfer is interrupted half-way.
//!
//! It forwards every connection to one upstream address and counts the
//! bytes that flow back (upstream → client). Armed with
//! [`CutProxy::cut_after`], it cuts once that many more bytes have passed:
//! every open connection is closed at once and new ones are closed as soon
//! as they are accepted, as if the link had gone down, until
//! [`CutProxy::restore`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Default)]
struct State {
    /// Bytes passed upstream → client since start.
    down: AtomicU64,
    /// Cut when `down` reaches this (u64::MAX: not armed).
    cut_at: AtomicU64,
    cut: AtomicBool,
    /// Connections closed on accept while cut.
    refused: AtomicU64,
    /// Wakes connection tasks when the link goes down.
    changed: tokio::sync::Notify,
}

impl State {
    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    fn go_down(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cut_at.store(u64::MAX, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

/// A proxy to one upstream; stops when dropped.
#[derive(Debug)]
pub struct CutProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to `upstream`
    /// (`HOST:PORT`).
    pub async fn start(upstream: &str) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let upstream = upstream.to_owned();
        let state = Arc::new(State::default());
        state.cut_at.store(u64::MAX, Ordering::SeqCst);
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if shared.is_cut() {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                tokio::spawn(forward(client, upstream.clone(), shared.clone()));
            }
        });
        CutProxy { addr, state, task }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes that have flowed upstream → client so far.
    pub fn bytes_down(&self) -> u64 {
        self.state.down.load(Ordering::SeqCst)
    }

    /// Cuts the link once `bytes` more have flowed upstream → client.
    pub fn cut_after(&self, bytes: u64) {
        self.state
            .cut_at
            .store(self.bytes_down().saturating_add(bytes), Ordering::SeqCst);
    }

    /// True while the link is down.
    pub fn is_cut(&self) -> bool {
        self.state.is_cut()
    }

    /// Connections turned away while the link was down.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Brings the link back up.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.go_down();
    }
}

async fn forward(client: TcpStream, upstream: String, state: Arc<State>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = server_write.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let total = state.down.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                    if total >= state.cut_at.load(Ordering::SeqCst) {
                        state.go_down();
                        break;
                    }
                }
            }
        }
    };
    let cut = async {
        loop {
            let notified = state.changed.notified();
            if state.is_cut() {
                return;
            }
            notified.await;
        }
    };
    // Whichever ends first ends the connection; dropping the halves closes
    // both sockets.
    tokio::select! {
        () = async { tokio::join!(up, down); } => {}
        () = cut => {}
    }
}
