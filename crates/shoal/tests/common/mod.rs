//! Shoal's roles as real processes, for the end-to-end tests: the binary,
//! the CLI, and `shoal control`, `replica` and `gateway` started on free
//! loopback ports with their data in the test's own directory. Each
//! returns its child (killed when dropped) and its base URL.

#![allow(dead_code)] // each test file uses its own share

use std::path::Path;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::Value;
use shoal_testkit::{ChildGuard, HttpClient, Samples, spawn_server_env};
use tokio::sync::Mutex;

/// The `shoal` binary under test.
pub(crate) fn shoal() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shoal"))
}

/// Runs a CLI client command against `control`, as JSON.
pub(crate) fn cli(control: &str, args: &[&str]) -> Value {
    shoal_testkit::cli_json(shoal(), control, args)
}

fn start(
    role: &str,
    addr: &str,
    dir: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (ChildGuard, String) {
    let mut all = vec![role, "--addr", addr, "--data-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let (child, addr) = spawn_server_env(shoal(), &all, envs);
    (child, format!("http://{addr}"))
}

/// `shoal control` on `addr` (`127.0.0.1:0` for any port) with 200 ms
/// heartbeats, plus `args` and environment `envs`.
pub(crate) fn control(
    dir: &Path,
    addr: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (ChildGuard, String) {
    let mut all = vec!["--heartbeat-ms", "200"];
    all.extend_from_slice(args);
    let (child, url) = start("control", addr, dir, &all, envs);
    // The first start wrote the admin token; requests and CLI calls of
    // the test present it (shoal_testkit::tokens).
    if let Ok(token) = std::fs::read_to_string(dir.join("admin.token")) {
        shoal_testkit::tokens::remember_admin_token(&url, token.trim());
    }
    (child, url)
}

/// The admin token of the control plane at `control`.
pub(crate) fn admin_token(control: &str) -> String {
    shoal_testkit::tokens::admin_token_for(control).expect("a control plane started by the test")
}

/// A fleet token of `control`, as replicas and gateways get.
pub(crate) fn fleet_token(control: &str) -> String {
    shoal_testkit::tokens::fleet_token(shoal(), control)
}

/// `shoal replica` syncing with `control` with a fleet token, plus `args`.
pub(crate) fn replica(control: &str, dir: &Path, args: &[&str]) -> (ChildGuard, String) {
    let token = fleet_token(control);
    let mut all = vec!["--control", control, "--token", &token];
    all.extend_from_slice(args);
    start("replica", "127.0.0.1:0", dir, &all, &[])
}

/// `shoal gateway` with 200 ms health checks, plus `args` (`--control URL`
/// or `--replica ADDR`…); with `--control`, it presents a fleet token.
pub(crate) fn gateway(dir: &Path, args: &[&str]) -> (ChildGuard, String) {
    let mut all = vec!["--health-interval-ms", "200"];
    let token;
    if let Some(i) = args.iter().position(|a| *a == "--control") {
        token = fleet_token(args[i + 1]);
        all.extend_from_slice(&["--token", &token]);
    }
    all.extend_from_slice(args);
    start("gateway", "127.0.0.1:0", dir, &all, &[])
}

/// Polls `rollout status digits` until `check` accepts it (a minute at most).
pub(crate) async fn digits_rollout_until(
    control: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    shoal_testkit::rollout_until(shoal(), control, "digits", what, check).await
}

/// Runs a CLI client command against `control` that must fail; returns
/// what it printed on stderr.
pub(crate) fn cli_fails(control: &str, args: &[&str]) -> String {
    let mut command = std::process::Command::new(shoal());
    command.args(args).args(["--control", control]);
    if let Some(token) = shoal_testkit::tokens::admin_token_for(control) {
        command.args(["--token", &token]);
    }
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run shoal: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "shoal {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// Runs a CLI client command against `control` from the directory `dir`,
/// with no token given: the CLI finds `.shoal/admin.token` there, as after
/// `shoal up` in the README's tour.
pub(crate) fn cli_in(dir: &Path, control: &str, args: &[&str]) -> Value {
    let out = std::process::Command::new(shoal())
        .current_dir(dir)
        .env_remove("SHOAL_TOKEN")
        .args(args)
        .args(["--json", "--control", control])
        .output()
        .unwrap_or_else(|e| panic!("cannot run shoal: {e}"));
    assert!(
        out.status.success(),
        "shoal {args:?} (in {}) failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Pushes the bundled `digits-v1.onnx` as `digits` and deploys version 1.
pub(crate) fn push_and_deploy_digits(control: &str) {
    cli(
        control,
        &[
            "model",
            "push",
            "digits",
            shoal_testkit::model_path("digits-v1.onnx")
                .to_str()
                .unwrap(),
        ],
    );
    cli(control, &["deploy", "digits:1"]);
}

/// `shoal status --json` of `control`, off the async workers.
pub(crate) async fn status(control: &str) -> Value {
    let control = control.to_owned();
    tokio::task::spawn_blocking(move || cli(&control, &["status"]))
        .await
        .unwrap()
}

/// What each replica serves and should serve in `shoal status --json`:
/// (id, serving, desired, skew).
pub(crate) fn serving_of(status: &Value) -> Vec<(String, Vec<String>, Vec<String>, bool)> {
    status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let list = |k: &str| {
                r[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            };
            (
                r["id"].as_str().unwrap().to_owned(),
                list("serving"),
                list("desired"),
                r["skew"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Waits until `replicas` replicas serve exactly `target` (`MODEL:VERSION`)
/// with no skew.
pub(crate) async fn converged_on(control: &str, target: &str, replicas: usize) {
    let want = vec![target.to_owned()];
    let control = control.to_owned();
    shoal_testkit::eventually(
        &format!("{replicas} replicas serving {target} with no skew"),
        std::time::Duration::from_secs(30),
        || {
            let control = control.clone();
            let want = want.clone();
            async move {
                let status = tokio::task::spawn_blocking(move || cli(&control, &["status"]))
                    .await
                    .unwrap();
                let rows = serving_of(&status);
                (rows.len() == replicas
                    && rows
                        .iter()
                        .all(|(_, s, d, skew)| s == &want && d == &want && !skew))
                .then_some(())
            }
        },
    )
    .await;
}

/// `shoal up` on any ports with its data in `data`, plus `args`; returns
/// the child, the first gateway's URL and the control plane's URL, with
/// the fleet's admin token remembered for CLI calls.
pub(crate) fn shoal_up(data: &Path, args: &[&str]) -> (ChildGuard, String, String) {
    let (up, gateway, control, _) = shoal_up_printing(data, args);
    (up, gateway, control)
}

/// [`shoal_up`], also returning every line it printed up to its ready line.
pub(crate) fn shoal_up_printing(
    data: &Path,
    args: &[&str],
) -> (ChildGuard, String, String, Vec<String>) {
    let mut all = vec![
        "up",
        "--gateway-addr",
        "127.0.0.1:0",
        "--control-addr",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let mut command = std::process::Command::new(shoal());
    command.args(&all);
    let (up, lines) = shoal_testkit::spawn_command_collect(command, "shoal up ready:");
    let ready = lines.last().expect("the ready line");
    let words: Vec<&str> = ready.split_whitespace().collect();
    let (gateway, control) = (words[4].to_owned(), words[6].to_owned());
    shoal_testkit::tokens::remember_admin_token(
        &control,
        std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim(),
    );
    (up, gateway, control, lines)
}

/// Clients sending digits predictions through a gateway until finished,
/// keeping which version answered each and every failure.
pub(crate) struct Traffic {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) ok: Arc<AtomicUsize>,
    pub(crate) versions: Arc<Mutex<Vec<String>>>,
    pub(crate) failures: Arc<Mutex<Vec<String>>>,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// `clients` clients, each one request after another.
    pub(crate) fn start(gateway: &str, clients: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let versions = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, versions, failures) =
                    (stop.clone(), ok.clone(), versions.clone(), failures.clone());
                let url = format!("{gateway}/v2/models/digits/infer");
                tokio::spawn(async move {
                    let http = HttpClient::new();
                    while !stop.load(Ordering::Relaxed) {
                        match http.post_json(&url, Samples::load().request(0..1)).await {
                            r if r.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                versions.lock().await.push(
                                    r.header("x-shoal-model-version").unwrap_or("").to_owned(),
                                );
                            }
                            r => failures
                                .lock()
                                .await
                                .push(format!("{}: {}", r.status, r.text())),
                        }
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            ok,
            versions,
            failures,
            tasks,
        }
    }

    /// Successful requests so far.
    pub(crate) fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients: the versions that answered, and the failures.
    pub(crate) async fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let versions = self.versions.lock().await.clone();
        let failures = self.failures.lock().await.clone();
        (versions, failures)
    }
}
