//! Test support shared by Shoal's crates.
//!
//! - [`models_dir`] and [`model_path`] find the bundled models in `models/`.
//! - [`Samples`] is `models/digits-samples.json`: held-out digits with labels
//!   and each model's expected accuracy.
//! - [`ChildGuard`] owns a child process and kills it on drop, so a failing
//!   test never leaves a server behind.
//! - [`HttpClient`] is a small pooled HTTP/1 client for talking to real
//!   servers on loopback.
//! - [`S3Server`] is a real S3-compatible server (moto) on loopback.
//! - [`CutProxy`] is a TCP proxy that cuts the link after so many bytes,
//!   for tests of interrupted transfers.
//! - [`PostgresServer`] is a real PostgreSQL server in a temporary
//!   directory on a free port.
//! - [`NatsServer`] is a real NATS server with JetStream on a free port,
//!   which can be killed and restarted on the same port and store.
//! - [`RedisServer`] is a real Redis server on a free port, which can be
//!   killed and restarted (empty) on the same port.
//! - [`tokens`] remembers the tokens of the control planes a test started,
//!   so its requests authenticate.

mod cut_proxy;
mod http_client;
mod nats;
mod postgres;
mod redis;
pub mod tokens;

use std::path::PathBuf;
use std::process::Child;

use serde::Deserialize;

pub use crate::cut_proxy::CutProxy;
pub use crate::http_client::{HttpClient, Reply, call_router};
pub use crate::nats::NatsServer;
pub use crate::postgres::PostgresServer;
pub use crate::redis::RedisServer;

/// The sum of every series of metric `name` in Prometheus text whose labels
/// include all of `labels` (`[("reason", "timeout")]`); 0 when none does.
/// `name` is matched whole (`gateway_hedges_total` is not
/// `gateway_hedges_total_x`).
pub fn metric_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (series_labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let has = |(k, v): &(&str, &str)| series_labels.contains(&format!("{k}=\"{v}\""));
            labels
                .iter()
                .all(has)
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// The repository's `models/` directory.
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// Path of a bundled model file, e.g. `model_path("digits-v1.onnx")`.
pub fn model_path(file: &str) -> PathBuf {
    models_dir().join(file)
}

/// Bytes of a bundled model file.
pub fn model_bytes(file: &str) -> Vec<u8> {
    let path = model_path(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Held-out digits samples (`models/digits-samples.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct Samples {
    /// Each sample: 64 pixel values 0..16.
    pub inputs: Vec<Vec<f32>>,
    /// The true digit of each sample.
    pub labels: Vec<i64>,
    /// Held-out accuracy of each bundled digits model, measured with ONNX
    /// Runtime when the models were built.
    pub accuracy: std::collections::HashMap<String, f64>,
    /// Fraction of samples on which v1 and v2 predict the same label.
    pub agreement_v1_v2: f64,
}

impl Samples {
    /// Loads the bundled samples.
    pub fn load() -> Samples {
        let path = model_path("digits-samples.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad samples file: {e}"))
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(i32::MAX));
        nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("kill {pid} {signal}: {e}"));
    }

    /// Waits for the child to exit, for at most `timeout`; `None` if it is
    /// still running then (the guard still kills it on drop).
    pub fn wait_timeout(
        &mut self,
        timeout: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        // Real time: a blocking wait on another process (tokio's paused
        // clock would never move here).
        #[allow(clippy::disallowed_types)]
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) => return Some(status),
                #[allow(clippy::disallowed_types)]
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                _ => return None,
            }
        }
    }
}

/// Starts `program` with `args`, stdout piped, and waits for the line
/// `… listening on http://ADDR` that Shoal's servers print once bound.
/// Returns the guard and the address. Panics (killing the child) if the
/// process exits first; its stderr is inherited so the reason shows.
pub fn spawn_server(program: &std::path::Path, args: &[&str]) -> (ChildGuard, String) {
    spawn_server_env(program, args, &[])
}

/// [`spawn_server`] with extra environment variables for the child.
pub fn spawn_server_env(
    program: &std::path::Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (ChildGuard, String) {
    let mut command = std::process::Command::new(program);
    command.args(args).envs(envs.iter().copied());
    listening_addr(spawn_command_until(command, "listening on http://"))
}

fn listening_addr((guard, line): (ChildGuard, String)) -> (ChildGuard, String) {
    let addr = line
        .split_once("listening on http://")
        .map(|(_, a)| a.trim().to_owned())
        .unwrap_or_default();
    (guard, addr)
}

/// Starts `program` with `args`, stdout piped, and waits for the first
/// line containing `marker`, which it returns. Panics (killing the child)
/// if the process exits first.
pub fn spawn_until(program: &std::path::Path, args: &[&str], marker: &str) -> (ChildGuard, String) {
    let mut command = std::process::Command::new(program);
    command.args(args);
    spawn_command_until(command, marker)
}

/// Spawns `command` with stdout and stdin piped (a child that watches its
/// stdin sees it close when the test process dies), and waits for the
/// first stdout line containing `marker`.
pub fn spawn_command_until(command: std::process::Command, marker: &str) -> (ChildGuard, String) {
    let (guard, mut lines) = spawn_command_collect(command, marker);
    let line = lines.pop().expect("the marker line");
    (guard, line)
}

/// [`spawn_command_until`], returning every stdout line up to and
/// including the marker's.
pub fn spawn_command_collect(
    mut command: std::process::Command,
    marker: &str,
) -> (ChildGuard, Vec<String>) {
    use std::io::BufRead;
    if std::env::var_os("RUST_LOG").is_none() {
        // Quiet children unless asked: test output is for failures.
        command.env("RUST_LOG", "warn");
    }
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let guard = ChildGuard(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("read child stdout");
        let done = line.contains(marker);
        seen.push(line);
        if done {
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return (guard, seen);
        }
    }
    panic!("{program} exited before printing {marker:?}");
}

/// An S3-compatible server on loopback (moto's, through
/// `tools/s3_server.py`, installed by `scripts/setup-python`), with the
/// given buckets created. Killed when dropped.
#[derive(Debug)]
pub struct S3Server {
    /// The server process.
    pub child: ChildGuard,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl S3Server {
    /// Starts the server and creates `buckets`.
    pub fn start(buckets: &[&str]) -> S3Server {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/s3_server.py");
        let mut command = std::process::Command::new(
            std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into()),
        );
        command.arg(script).args(buckets);
        let (child, addr) = listening_addr(spawn_command_until(command, "listening on http://"));
        S3Server {
            child,
            endpoint: format!("http://{addr}"),
        }
    }

    /// The `AWS_*` settings a client needs to use this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_ACCESS_KEY_ID", "shoal".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "shoal".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Samples {
    /// An OIP inference request body for the digits models with `rows`.
    pub fn request(&self, rows: std::ops::Range<usize>) -> String {
        let rows = &self.inputs[rows];
        serde_json::json!({
            "inputs": [{
                "name": "input",
                "shape": [rows.len(), 64],
                "datatype": "FP32",
                "data": rows,
            }]
        })
        .to_string()
    }
}

/// Polls `check` every 50 ms until it returns `Some`, for at most
/// `timeout`; panics with `what` otherwise. For conditions held by other
/// processes, which can only be observed by asking them.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A scratch directory removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(name: &str) -> TempDir {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("shoal-{name}-{}-{seq}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TempDir(dir)
    }

    /// A path inside.
    pub fn join(&self, part: &str) -> PathBuf {
        self.0.join(part)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `program ARGS --json --control CONTROL` (a CLI client command) and
/// returns its output as JSON (`null` for none); panics with its stderr if
/// it fails.
pub fn cli_json(program: &std::path::Path, control: &str, args: &[&str]) -> serde_json::Value {
    let mut command = std::process::Command::new(program);
    command.args(args).args(["--json", "--control", control]);
    if let Some(token) = tokens::admin_token_for(control) {
        command.args(["--token", &token]);
    }
    output_json(&mut command)
}

/// Runs `command`, which must succeed (else panics with its arguments and
/// standard error), and parses its standard output as JSON (`Null` when it
/// is not JSON).
pub fn output_json(command: &mut std::process::Command) -> serde_json::Value {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Polls `program rollout status MODEL` against `control` until `check`
/// accepts the status (for at most a minute) and returns it; panics with
/// `what` and the last status otherwise. `check` may itself panic to fail
/// early (a rollout that ended the wrong way).
pub async fn rollout_until(
    program: &std::path::Path,
    control: &str,
    model: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..600 {
        let (p, c, m) = (program.to_owned(), control.to_owned(), model.to_owned());
        last = tokio::task::spawn_blocking(move || cli_json(&p, &c, &["rollout", "status", &m]))
            .await
            .unwrap_or_else(|e| panic!("rollout status: {e}"));
        if check(&last) {
            return last;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}; last status: {last}");
}

/// Waits (at most 20 s) until `gateway` answers a digits inference for
/// `model` with 200: it has a route.
pub async fn until_routed(gateway: &str, model: &str) {
    let http = HttpClient::new();
    let url = format!("{gateway}/v2/models/{model}/infer");
    let body = Samples::load().request(0..1);
    eventually(
        &format!("the gateway to route {model}"),
        std::time::Duration::from_secs(20),
        || {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            async move { (http.post_json(&url, body).await.status == 200).then_some(()) }
        },
    )
    .await;
}

/// Runs `tools/tritonclient_check.py`: Triton's own Python client, unchanged,
/// against the server at `addr` (`HOST:PORT`) serving digits as `model`,
/// with JSON and binary tensors; panics with its output unless every check
/// passes and the accuracy on the held-out samples is at least
/// `min_accuracy`.
pub async fn tritonclient_check(addr: &str, model: &str, min_accuracy: f64) {
    run_tritonclient_check(addr, model, min_accuracy, None).await;
}

/// [`tritonclient_check`] over https (`ssl=True`), trusting `ca`.
pub async fn tritonclient_check_tls(
    addr: &str,
    model: &str,
    min_accuracy: f64,
    ca: &std::path::Path,
) {
    run_tritonclient_check(addr, model, min_accuracy, Some(ca)).await;
}

async fn run_tritonclient_check(
    addr: &str,
    model: &str,
    min_accuracy: f64,
    ca: Option<&std::path::Path>,
) {
    let samples = model_path("digits-samples.json");
    let accuracy = min_accuracy.to_string();
    let mut args = vec![
        std::ffi::OsStr::new(addr),
        std::ffi::OsStr::new(model),
        samples.as_os_str(),
        std::ffi::OsStr::new(&accuracy),
    ];
    if let Some(ca) = ca {
        args.push(ca.as_os_str());
    }
    run_tool("tritonclient_check.py", &args, "tritonclient[http]").await;
}

/// Runs `tools/SCRIPT` with `args` under python3 and answers its stdout;
/// panics with both outputs when it fails (`package` names what
/// scripts/setup-python installs for it).
async fn run_tool(script: &str, args: &[&std::ffi::OsStr], package: &str) -> Vec<u8> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools")
        .join(script);
    let output = tokio::process::Command::new("python3")
        .arg(&script)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("python3 runs (install the test dependencies with scripts/setup-python)");
    assert!(
        output.status.success(),
        "{} failed (scripts/setup-python installs {package}):\n{}{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Runs `tools/tritonclient_grpc_check.py`: Triton's own gRPC client
/// against `grpc_addr`, its HTTP client against `http_addr` with the same
/// requests (answers must be equal), on the digits samples. Returns the
/// script's JSON summary.
pub async fn tritonclient_grpc_check(
    grpc_addr: &str,
    http_addr: &str,
    model: &str,
    min_accuracy: f64,
) -> serde_json::Value {
    run_tritonclient_grpc_check(grpc_addr, http_addr, model, min_accuracy, None).await
}

/// [`tritonclient_grpc_check`] over TLS on both protocols (`ssl=True`),
/// trusting `ca`.
pub async fn tritonclient_grpc_check_tls(
    grpc_addr: &str,
    http_addr: &str,
    model: &str,
    min_accuracy: f64,
    ca: &std::path::Path,
) -> serde_json::Value {
    run_tritonclient_grpc_check(grpc_addr, http_addr, model, min_accuracy, Some(ca)).await
}

async fn run_tritonclient_grpc_check(
    grpc_addr: &str,
    http_addr: &str,
    model: &str,
    min_accuracy: f64,
    ca: Option<&std::path::Path>,
) -> serde_json::Value {
    let samples = model_path("digits-samples.json");
    let accuracy = min_accuracy.to_string();
    let mut args = vec![
        std::ffi::OsStr::new(grpc_addr),
        std::ffi::OsStr::new(http_addr),
        std::ffi::OsStr::new(model),
        samples.as_os_str(),
        std::ffi::OsStr::new(&accuracy),
    ];
    if let Some(ca) = ca {
        args.push(ca.as_os_str());
    }
    let stdout = run_tool("tritonclient_grpc_check.py", &args, "tritonclient[grpc]").await;
    serde_json::from_slice(&stdout).unwrap_or_else(|e| {
        panic!(
            "the check printed no JSON summary ({e}): {}",
            String::from_utf8_lossy(&stdout)
        )
    })
}

/// Samples in one step of Silero VAD's sequence model (36 ms at 16 kHz).
pub const VAD_FRAME: usize = 576;

/// Frame `k` of a deterministic 16 kHz test signal for Silero VAD: a
/// 220 Hz tone in every other run of eight frames, over faint noise.
pub fn vad_frame(k: usize) -> Vec<f32> {
    (0..VAD_FRAME)
        .map(|i| {
            let n = k * VAD_FRAME + i;
            #[allow(clippy::cast_precision_loss)]
            let t = n as f32 / 16_000.0;
            let tone = if (k / 8) % 2 == 1 { 0.4 } else { 0.0 };
            #[allow(clippy::cast_precision_loss)]
            let noise = 0.01 * (n as f32 * 12.9898).sin();
            tone * (t * 2.0 * std::f32::consts::PI * 220.0).sin() + noise
        })
        .collect()
}
