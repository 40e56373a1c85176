//! `shoal drill` against a real `shoal up` fleet in two regions (two
//! gateways, four replicas), each scenario in turn with short durations:
//! losing a replica, a whole region, the control plane or a gateway costs
//! no request and no acknowledged write, and the fleet is whole again; a
//! hung replica costs no request sent after the gateways ejected it; a
//! deploy made while the artifact store is gone waits and finishes.

use nix::sys::signal::Signal;
use serde_json::Value;
use shoal_testkit::TempDir;

mod common;
use common::shoal;

fn drill(data: &std::path::Path, args: &[&str]) -> Value {
    drill_for(data, args, "4s")
}

fn drill_for(data: &std::path::Path, args: &[&str], duration: &str) -> Value {
    shoal_testkit::output_json(
        std::process::Command::new(shoal())
            .arg("drill")
            .args(args)
            .args([
                "--data-dir",
                data.to_str().unwrap(),
                "--rate",
                "50",
                "--duration",
                duration,
                "--recovery-timeout",
                "30s",
                "--json",
            ]),
    )
}

/// No request failed while the artifact store was away (from the fault
/// until the drill put it back): replicas keep serving. (A request may
/// still fail as the rolling deploy switches versions once the store is
/// back — seen once in CI: a rolling-deploy matter this drill does not
/// judge; see the issue notes.)
fn served_throughout_the_outage(report: &Value) {
    let fault = report["fault_ms"].as_f64().unwrap();
    let back = fault + report["restored_ms"].as_f64().expect("the store came back");
    let failed_while_away: u64 = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| {
            let at = b["at_ms"].as_f64().unwrap();
            at + 250.0 > fault && at < back
        })
        .map(|b| b["failed"].as_u64().unwrap())
        .sum();
    assert_eq!(failed_while_away, 0, "{report}");
}

#[test]
fn every_drill_costs_no_request_and_no_acknowledged_write() {
    let tmp = TempDir::new("drill-e2e");
    let data = tmp.join("fleet");
    let (mut up, _, _) =
        common::shoal_up(&data, &["--replicas", "4", "--regions", "us-east,eu-west"]);
    let reports = tmp.join("reports");
    let reports_arg = reports.to_str().unwrap().to_owned();
    // A hung replica: the requests it holds when it stops may fail; once
    // the gateways have ejected it, none does.
    let report = drill(&data, &["replica-hang"]);
    eprintln!("replica-hang: {report}");
    assert_eq!(report["failed_after_recovery"], 0, "{report}");
    assert!(report["capacity_back_ms"].is_number(), "ejected: {report}");
    assert_eq!(report["writes_lost"], 0, "{report}");

    for args in [
        &["replica-loss", "--report", reports_arg.as_str()][..],
        &["region-loss", "--region", "us-east"],
        &["control-plane-loss"],
        &["gateway-loss"],
    ] {
        let report = drill(&data, args);
        eprintln!("{args:?}: {report}");
        assert_eq!(report["failed"], 0, "{args:?}: {report}");
        assert_eq!(report["writes_lost"], 0, "{args:?}: {report}");
        assert!(
            report["writes_acknowledged"].as_u64().unwrap() > 0,
            "{args:?}: {report}"
        );
        assert!(
            report["rto_ms"].is_number(),
            "{args:?}: the fleet came back: {report}"
        );
        assert!(!report["killed"].as_array().unwrap().is_empty());
    }

    // The artifact store goes for the middle third (2 s) and a new version
    // is deployed meanwhile: nothing fails, the deploy waits for the store
    // (replicas cannot fetch it: its digest is new) instead of rolling
    // back, finishes once the store is back, and the store is where it was.
    let report = drill_for(&data, &["artifact-store-loss"], "6s");
    eprintln!("artifact-store-loss: {report}");
    served_throughout_the_outage(&report);
    assert_eq!(report["writes_lost"], 0, "{report}");
    assert!(
        report["rto_ms"].is_number(),
        "the deploy finished: {report}"
    );
    let deploy = report["deploy"].as_str().unwrap();
    assert!(
        deploy.contains("deployed without the store: waited for the store"),
        "{report}"
    );
    assert!(
        report["capacity_back_ms"].as_f64() >= report["restored_ms"].as_f64(),
        "{report}"
    );
    let store = data.join("control").join("artifacts");
    assert!(store.is_dir());
    let left: Vec<_> = std::fs::read_dir(data.join("control"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("artifacts."))
        .collect();
    assert!(left.is_empty(), "moved aside and left: {left:?}");

    // The same fleet drilled as if remote: named by URL, the fault made by
    // --kill-cmd (a replica SIGKILLed; shoal up brings it back by itself)
    // and, for the store, undone by --restore-cmd.
    let fleet: Value =
        serde_json::from_slice(&std::fs::read(data.join("fleet.json")).unwrap()).unwrap();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let control = fleet["control"].as_str().unwrap().to_owned();
    let gateway = fleet["gateways"][0][1].as_str().unwrap().to_owned();
    let replica_pid = fleet["pids"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p[0].as_str().unwrap().starts_with("replica-"))
        .unwrap()[1]
        .as_u64()
        .unwrap();
    let remote = |args: &[&str]| {
        let mut all = vec![
            "--control",
            control.as_str(),
            "--gateway",
            gateway.as_str(),
            "--token",
            token.trim(),
        ];
        all.extend_from_slice(args);
        drill_for(&tmp.join("not-a-fleet"), &all, "6s")
    };
    let kill = format!("kill -KILL {replica_pid}");
    let report = remote(&["replica-loss", "--kill-cmd", &kill]);
    eprintln!("replica-loss by hook: {report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(
        report["rto_ms"].is_number(),
        "seen gone, then whole: {report}"
    );
    assert!(
        report["fault"].as_str().unwrap().contains(&kill),
        "{report}"
    );
    let moved = store.with_extension("hooked");
    let (lose, restore) = (
        format!("mv {} {}", store.display(), moved.display()),
        format!("mv {} {}", moved.display(), store.display()),
    );
    let report = remote(&[
        "artifact-store-loss",
        "--kill-cmd",
        &lose,
        "--restore-cmd",
        &restore,
    ]);
    eprintln!("artifact-store-loss by hook: {report}");
    served_throughout_the_outage(&report);
    assert!(report["restored_ms"].is_number(), "{report}");
    assert!(
        report["deploy"]
            .as_str()
            .unwrap()
            .contains("waited for the store"),
        "{report}"
    );
    assert!(store.is_dir() && !moved.exists());

    // A hook that fails stops the drill with its output; a remote fleet
    // without a hook is refused with what to add.
    let out = std::process::Command::new(shoal())
        .args(["drill", "replica-loss", "--data-dir"])
        .arg(&data)
        .args([
            "--duration",
            "3s",
            "--kill-cmd",
            "echo no such host >&2; false",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--kill-cmd") && err.contains("no such host"),
        "{err}"
    );
    let out = std::process::Command::new(shoal())
        .args([
            "drill",
            "replica-loss",
            "--control",
            &control,
            "--gateway",
            &gateway,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs --kill-cmd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The first drill left its record: markdown naming a PNG chart.
    let written: Vec<std::path::PathBuf> = std::fs::read_dir(&reports)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let md = written
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "md"))
        .unwrap();
    let text = std::fs::read_to_string(md).unwrap();
    assert!(text.starts_with("# Drill: replica-loss"), "{text}");
    let png = written
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    assert!(text.contains(png.file_name().unwrap().to_str().unwrap()));
    assert_eq!(&std::fs::read(png).unwrap()[..4], b"\x89PNG");

    // Asked wrongly, it says what to give.
    let out = std::process::Command::new(shoal())
        .args(["drill", "region-loss", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--region"));
    let out = std::process::Command::new(shoal())
        .args([
            "drill",
            "replica-loss",
            "--data-dir",
            tmp.join("nothing").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `shoal up --data-dir"));

    up.signal(Signal::SIGINT);
    let exited = up.wait_timeout(std::time::Duration::from_secs(30));
    assert!(exited.expect("shoal up exits on SIGINT").success());
}

/// Losing the leader of three control planes on PostgreSQL: no request and
/// no acknowledged write is lost, another member leads (the recovery time
/// is its first act as leader), and `shoal bench failover` times the same
/// thing trial after trial.
#[test]
fn losing_the_leader_of_three_control_planes_costs_nothing() {
    let tmp = TempDir::new("drill-leader");
    let pg = shoal_testkit::PostgresServer::start();
    let registry = pg.database("registry");
    let data = tmp.join("fleet");
    let (_up, _, _) = common::shoal_up(
        &data,
        &[
            "--replicas",
            "2",
            "--control-planes",
            "3",
            "--registry",
            &registry,
        ],
    );
    let report = drill(&data, &["leader-loss"]);
    eprintln!("leader-loss: {report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["writes_lost"], 0, "{report}");
    assert!(report["writes_acknowledged"].as_u64().unwrap() > 0);
    let failover = report["capacity_back_ms"].as_f64().expect("a new leader");
    assert!(failover > 0.0, "{report}");
    assert!(report["rto_ms"].is_number(), "{report}");

    let out = std::process::Command::new(shoal())
        .args(["bench", "failover", "--trials", "2", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bench: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(bench["members"], 3, "{bench}");
    assert_eq!(bench["trials_ms"].as_array().unwrap().len(), 2, "{bench}");
    assert!(bench["max_ms"].as_f64().unwrap() >= bench["median_ms"].as_f64().unwrap());
}
