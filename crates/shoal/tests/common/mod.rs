//! Shoal's roles as real processes, for the end-to-end tests: the binary,
//! the CLI, and `shoal control`, `replica` and `gateway` started on free
//! loopback ports with their data in the test's own directory. Each
//! returns its child (killed when dropped) and its base URL.

#![allow(dead_code)] // each test file uses its own share

use std::path::Path;

use serde_json::Value;
use shoal_testkit::{ChildGuard, spawn_server_env};

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
    start("control", addr, dir, &all, envs)
}

/// `shoal replica` syncing with `control`, plus `args`.
pub(crate) fn replica(control: &str, dir: &Path, args: &[&str]) -> (ChildGuard, String) {
    let mut all = vec!["--control", control];
    all.extend_from_slice(args);
    start("replica", "127.0.0.1:0", dir, &all, &[])
}

/// `shoal gateway` with 200 ms health checks, plus `args` (`--control URL`
/// or `--replica ADDR`…).
pub(crate) fn gateway(dir: &Path, args: &[&str]) -> (ChildGuard, String) {
    let mut all = vec!["--health-interval-ms", "200"];
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
    let out = std::process::Command::new(shoal())
        .args(args)
        .args(["--control", control])
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
