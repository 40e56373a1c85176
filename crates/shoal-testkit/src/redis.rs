//! A real Redis server (Debian's `redis-server`, which `scripts/setup`
//! installs) on a free loopback port, keeping nothing on disk; it can be
//! killed and started again on the same port (empty).

use std::process::{Command, Stdio};

use crate::ChildGuard;
use crate::postgres::{free_port, wait_for_port};

/// A running `redis-server`; stopped on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<ChildGuard>,
}

impl RedisServer {
    /// Starts a server on a free port.
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
        };
        server.run();
        server
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package: run scripts/setup)");
        self.child = Some(ChildGuard(child));
        wait_for_port(self.port, "redis-server");
    }

    /// Its URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            child.signal(nix::sys::signal::Signal::SIGKILL);
            drop(child);
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }
}
