//! A real NATS server with JetStream (Debian's `nats-server`, which
//! `scripts/setup` installs) on a free loopback port, its store in a
//! temporary directory; it can be restarted on the same port and store.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::ChildGuard;
use crate::postgres::{free_port, rand_u32, wait_for_port};

/// A running `nats-server -js`; stopped and its store removed on drop.
#[derive(Debug)]
pub struct NatsServer {
    dir: PathBuf,
    port: u16,
    child: Option<ChildGuard>,
}

impl NatsServer {
    /// Starts a server on a free port.
    pub fn start() -> NatsServer {
        let dir = std::env::temp_dir().join(format!(
            "shoal-nats-{}-{:08x}",
            std::process::id(),
            rand_u32()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = NatsServer {
            dir,
            port: free_port(),
            child: None,
        };
        server.run();
        server
    }

    fn run(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.join("store"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (Debian's nats-server package: run scripts/setup)");
        self.child = Some(ChildGuard(child));
        wait_for_port(self.port, "nats-server");
    }

    /// Its URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: nothing flushed on the way out).
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            child.signal(nix::sys::signal::Signal::SIGKILL);
            drop(child);
        }
    }

    /// Starts it again on the same port, with the same store.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
