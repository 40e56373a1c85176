//! Schemathesis (from PyPI, installed by scripts/setup-python) against a
//! real control plane, driven by its own `/api/v1/openapi.json`: generated
//! requests, valid and not, to every operation, checked for server errors,
//! responses that break the documented schema or content type, and status
//! codes the document does not list. Authenticated as the first admin, so
//! the generated requests reach the handlers, not just the guard.
//!
//! The two watch streams and the dashboard's event stream are left out:
//! they answer with an endless body
//! (the e2e tests follow them as replicas and gateways do). So is taking a
//! backup, which writes wherever its request says (the backup e2e tests
//! drive it).

use std::process::Command;

use shoal_testkit::TempDir;

mod common;

#[test]
fn schemathesis_finds_nothing_wrong_with_the_control_api() {
    let tmp = TempDir::new("api-fuzz");
    let (_control, control) = common::control(&tmp.join("control"), "127.0.0.1:0", &[], &[]);
    let token = common::admin_token(&control);
    let out = Command::new("python3")
        .current_dir(tmp.join(""))
        .args(["-m", "schemathesis.cli", "run"])
        .arg(format!("{control}/api/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance,response_headers_conformance",
            "--exclude-path-regex",
            "/watch|/backups|/stream",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-examples",
            "40",
            "--seed",
            "20261203",
            "--request-timeout",
            "20",
            "--workers",
            "1",
        ])
        .output()
        .expect("python3 with schemathesis (scripts/setup-python installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
}
