//! A throwaway PostgreSQL server for tests: `initdb` into a temporary
//! directory and `pg_ctl start` on a free loopback port, from Debian's
//! `postgresql` package (scripts/setup installs it). As root (CI), both run
//! as the `postgres` user, since PostgreSQL refuses to run as root. Stopped
//! (immediately) and deleted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running PostgreSQL server.
#[derive(Debug)]
pub struct PostgresServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|p| p.join("pg_ctl").is_file());
    versions.sort();
    versions
        .pop()
        .expect("PostgreSQL's server binaries (scripts/setup installs Debian's postgresql)")
}

fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `program args` as the `postgres` user when this process is root.
fn run(program: &Path, args: &[&str]) {
    let mut command = if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PostgresServer {
    /// Initialises and starts a server; its superuser is `shoal`, trusted
    /// on loopback.
    pub fn start() -> PostgresServer {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "shoal-pg-{}-{:08x}",
            std::process::id(),
            rand_u32()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if as_root() {
            let postgres = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .expect("the postgres user (Debian's postgresql package makes it)");
            std::os::unix::fs::chown(
                &dir,
                Some(postgres.uid.as_raw()),
                Some(postgres.gid.as_raw()),
            )
            .unwrap();
        }
        let data = dir.join("data");
        let data = data.to_str().unwrap();
        run(
            &bin.join("initdb"),
            &[
                "-D",
                data,
                "-U",
                "shoal",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let port = free_port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            dir.display()
        );
        let log = dir.join("log");
        run(
            &bin.join("pg_ctl"),
            &[
                "-D",
                data,
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        PostgresServer { bin, dir, port }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for a new, empty database named `name` on this server.
    pub fn database(&self, name: &str) -> String {
        run(
            &self.bin.join("createdb"),
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "shoal",
                name,
            ],
        );
        format!("postgres://shoal@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs SQL against database `name` with psql (for tests that set up
    /// an older schema by hand).
    pub fn psql(&self, name: &str, sql: &str) {
        run(
            &self.bin.join("psql"),
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "shoal",
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-d",
                name,
                "-c",
                sql,
            ],
        );
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let mut command = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let _ = command
            .args([
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (30 s at most) until `what` accepts connections on loopback
/// `port`; panics naming it otherwise.
// Real time: a blocking wait on another process (tokio's paused clock
// would never move here).
#[allow(clippy::disallowed_types)]
pub(crate) fn wait_for_port(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub(crate) fn rand_u32() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}
