//! The dashboard in real browsers: headless Chromium from Debian (and a
//! second pass in Debian's Firefox ESR over WebDriver BiDi), driven
//! by `tools/browser/dashboard_test.mjs` (playwright-core from npm, which
//! `scripts/setup` installs), against a `shoal up` fleet opened through
//! the URL it prints. Screenshots of each step go to
//! `target/test-artifacts/dashboard/`.
//!
//! The steps: the printed URL signs in and shows three healthy replicas; a
//! page without a session shows the sign-in form and no fleet data (the
//! API refuses it), a wrong token is refused, the form signs in from the
//! keyboard and the session signs out; a slow canary of `digits` pushed
//! and deployed from the CLI shows, with its p99 above the baseline's and
//! then its automatic rollback with the reason; a second rollout is
//! aborted by clicking, and the API agrees.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use shoal_testkit::{ChildGuard, TempDir, models_dir};

mod common;
use common::shoal;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The browsers and the driver, or a panic that says how to get them.
fn browser_tools() -> (PathBuf, PathBuf, PathBuf) {
    let path = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let chromium = path("CHROMIUM", "/usr/bin/chromium");
    let firefox = path("FIREFOX", "/usr/bin/firefox-esr");
    let driver = repo().join("tools/browser/node_modules/playwright-core");
    for needed in [&chromium, &firefox, &driver] {
        assert!(
            needed.exists(),
            "the browser tests need Debian's chromium and firefox-esr and playwright-core \
             ({} is missing): run scripts/setup",
            needed.display()
        );
    }
    (
        chromium,
        firefox,
        repo().join("tools/browser/dashboard_test.mjs"),
    )
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let (chromium, firefox, script) = browser_tools();
    let tmp = TempDir::new("dashboard-e2e");
    let data = tmp.join("up");
    let (_up, gateway, control, lines) = common::shoal_up_printing(&data, &["--replicas", "3"]);
    let dashboard = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("dashboard"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("shoal up printed no dashboard URL: {lines:#?}"))
        .to_owned();
    assert!(
        dashboard.starts_with(&format!("{control}/?token=")),
        "{dashboard}"
    );
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let artifacts = repo().join("target/test-artifacts/dashboard");
    let mut node = Command::new("node");
    node.arg(&script)
        .env("DASHBOARD_URL", &dashboard)
        .env("CONTROL", &control)
        .env("GATEWAY", &gateway)
        .env("SHOAL_BIN", shoal())
        .env("SHOAL_TOKEN", token.trim())
        .env("MODELS", models_dir())
        .env("ARTIFACTS", &artifacts)
        .env("CHROMIUM", &chromium)
        .env("FIREFOX", &firefox);
    let mut driver = ChildGuard(
        node.spawn()
            .unwrap_or_else(|e| panic!("cannot start node (scripts/setup installs it): {e}")),
    );
    let status = driver
        .wait_timeout(Duration::from_secs(300))
        .expect("the browser steps did not finish within 5 minutes");
    assert!(
        status.success(),
        "the browser steps failed (their output is above; screenshots in {})",
        artifacts.display()
    );
}
