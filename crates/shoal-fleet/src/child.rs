//! A supervised child process: started, watched, restarted with backoff
//! when it dies, and stopped gracefully (SIGTERM, then SIGKILL after a
//! grace period).

use shoal_telemetry::say;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;

use crate::{FleetState, PARENT_ENV};

/// How long a child gets to stop after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// A child up this long is healthy again: its backoff resets.
const STABLE_AFTER: Duration = Duration::from_secs(30);

fn backoff(attempt: u32) -> Duration {
    (Duration::from_millis(200) * 2u32.saturating_pow(attempt.min(6))).min(Duration::from_secs(10))
}

/// Replaces an `--addr HOST:0` in `args` with `listened`, the address the
/// child got: a restart must come back where the others look for it.
fn pin_port(args: &mut [String], listened: &str) {
    if let Some(i) = args.iter().position(|a| a == "--addr")
        && let Some(value) = args.get_mut(i + 1)
        && value.ends_with(":0")
    {
        *value = listened.to_owned();
    }
}

/// Writes the fleet state to `<data-dir>/fleet.json`.
pub(crate) async fn write_state(state: &tokio::sync::Mutex<FleetState>, data_dir: &Path) {
    let json = serde_json::to_vec_pretty(&*state.lock().await).unwrap_or_default();
    let path = data_dir.join("fleet.json");
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &path));
}

/// One supervised child.
pub struct Supervised {
    name: String,
    keep_address: bool,
    pid: Mutex<Option<u32>>,
    stopping: AtomicBool,
    /// Wakes a supervisor waiting out a restart backoff when it must stop.
    stop: tokio::sync::Notify,
    addr: tokio::sync::watch::Sender<Option<String>>,
    /// The gRPC address it announced (`shoal gateway … gRPC listening on`),
    /// printed before the REST line.
    grpc_addr: tokio::sync::watch::Sender<Option<String>>,
    /// Set when the child exited before it was ever listening: it cannot
    /// start (an address taken, a bad flag), and restarting will not help.
    never_started: tokio::sync::watch::Sender<Option<String>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Supervised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervised")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Supervised {
    /// Starts `exe args` under supervision. With `keep_address`, a child
    /// started on any port (`--addr …:0`) comes back on the one it first
    /// had, where the rest of the fleet and clients find it (the control
    /// plane, gateways); without, it takes a new one (replicas, which
    /// register wherever they come back, and which gateways then meet as
    /// new endpoints rather than ones still serving out an ejection).
    pub fn spawn(
        name: String,
        exe: PathBuf,
        args: Vec<String>,
        keep_address: bool,
        state: Arc<tokio::sync::Mutex<FleetState>>,
        data_dir: PathBuf,
    ) -> Arc<Supervised> {
        let me = Arc::new(Supervised {
            keep_address,
            name,
            pid: Mutex::new(None),
            stopping: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            addr: tokio::sync::watch::Sender::new(None),
            grpc_addr: tokio::sync::watch::Sender::new(None),
            never_started: tokio::sync::watch::Sender::new(None),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(me.clone().supervise(exe, args, state, data_dir));
        *me.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        me
    }

    /// The child's name (`control`, `replica-0`, `gateway-us-east`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address the child announced on its first start, or why it
    /// never started (it exited before listening, or took over a minute).
    pub async fn address(&self) -> Result<String, String> {
        let mut addr = self.addr.subscribe();
        let mut failed = self.never_started.subscribe();
        let wait = async {
            tokio::select! {
                a = addr.wait_for(Option::is_some) => a.ok().and_then(|a| a.clone()).ok_or_else(|| "gone".to_owned()),
                f = failed.wait_for(Option::is_some) => Err(f.ok().and_then(|f| f.clone()).unwrap_or_default()),
            }
        };
        match tokio::time::timeout(Duration::from_secs(60), wait).await {
            Ok(result) => result,
            Err(_) => Err(format!("{} did not start listening within 60 s", self.name)),
        }
    }

    /// The gRPC address the child announced, if it serves gRPC: known once
    /// [`Supervised::address`] is, since the gRPC line comes first.
    pub fn grpc_address(&self) -> Option<String> {
        self.grpc_addr.borrow().clone()
    }

    /// Sends SIGKILL to the running process; returns its pid.
    pub fn kill(&self) -> Option<u32> {
        let pid = (*self.pid.lock().unwrap_or_else(PoisonError::into_inner))?;
        kill(Pid::from_raw(i32::try_from(pid).ok()?), Signal::SIGKILL).ok()?;
        Some(pid)
    }

    /// Stops the child for good: SIGTERM, then SIGKILL after the grace period.
    pub async fn stop(&self) {
        // Under the pid lock, so the supervisor either sees `stopping`
        // before it records a new child, or we see that child's pid.
        let pid = {
            let pid = self.pid.lock().unwrap_or_else(PoisonError::into_inner);
            self.stopping.store(true, Ordering::SeqCst);
            *pid
        };
        // A supervisor waiting out a restart backoff stops waiting.
        self.stop.notify_one();
        if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut task) = task
            && tokio::time::timeout(STOP_GRACE, &mut task).await.is_err()
        {
            tracing::warn!(child = %self.name, "did not stop within {STOP_GRACE:?}; killing it");
            self.kill();
            let _ = task.await;
        }
    }

    async fn supervise(
        self: Arc<Self>,
        exe: PathBuf,
        mut args: Vec<String>,
        state: Arc<tokio::sync::Mutex<FleetState>>,
        data_dir: PathBuf,
    ) {
        let mut attempt = 0u32;
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let mut command = tokio::process::Command::new(&exe);
            command
                .args(&args)
                .env(PARENT_ENV, std::process::id().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                // Its own process group: Ctrl-C reaches `shoal up` alone,
                // which then stops children in order.
                .process_group(0)
                .kill_on_drop(true);
            if std::env::var_os("RUST_LOG").is_none() {
                command.env("RUST_LOG", "warn");
            }
            let mut child = match command.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(child = %self.name, error = %e, "cannot start; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
            };
            let pid = child.id();
            {
                let mut slot = self.pid.lock().unwrap_or_else(PoisonError::into_inner);
                *slot = pid;
                if self.stopping.load(Ordering::SeqCst)
                    && let Some(p) = pid.and_then(|p| i32::try_from(p).ok())
                {
                    let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
                }
            }
            if let Some(pid) = pid {
                state.lock().await.pids.push((self.name.clone(), pid));
                write_state(&state, &data_dir).await;
            }
            if let Some(stdout) = child.stdout.take() {
                let addr = self.addr.clone();
                let grpc_addr = self.grpc_addr.clone();
                tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(stdout).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some((_, a)) = line.split_once(" gRPC listening on ") {
                            grpc_addr.send_replace(Some(a.trim().to_owned()));
                        } else if let Some((_, url)) = line.split_once("listening on ") {
                            let a = url.split_once("://").map_or(url, |(_, a)| a);
                            addr.send_replace(Some(a.trim().to_owned()));
                        }
                    }
                });
            }
            let started = tokio::time::Instant::now();
            let status = child.wait().await;
            *self.pid.lock().unwrap_or_else(PoisonError::into_inner) = None;
            if let Some(pid) = pid {
                state.lock().await.pids.retain(|(_, p)| *p != pid);
                write_state(&state, &data_dir).await;
            }
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            if self.addr.borrow().is_none() {
                // It never got as far as listening: restarting will not help.
                self.never_started.send_replace(Some(format!(
                    "{} exited ({status}) before it was listening; its error is above",
                    self.name
                )));
                return;
            }
            if started.elapsed() > STABLE_AFTER {
                attempt = 0;
            }
            if self.keep_address
                && let Some(listened) = self.addr.borrow().clone()
            {
                pin_port(&mut args, &listened);
            }
            let wait = backoff(attempt);
            attempt += 1;
            tracing::warn!(child = %self.name, %status, "exited; restarting in {wait:?}");
            say!(
                "{} exited ({status}); restarting in {:.1}s",
                self.name,
                wait.as_secs_f64()
            );
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.stop.notified() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_child_started_on_any_port_comes_back_on_the_one_it_had() {
        let mut args: Vec<String> = ["control", "--addr", "127.0.0.1:0", "--data-dir", "d"]
            .map(str::to_owned)
            .to_vec();
        super::pin_port(&mut args, "127.0.0.1:40123");
        assert_eq!(args[2], "127.0.0.1:40123");
        // A fixed port stays as it was.
        let mut fixed: Vec<String> = ["gateway", "--addr", "127.0.0.1:8080"]
            .map(str::to_owned)
            .to_vec();
        super::pin_port(&mut fixed, "127.0.0.1:9999");
        assert_eq!(fixed[2], "127.0.0.1:8080");
    }
}
