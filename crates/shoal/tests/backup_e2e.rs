//! Backup and restore with real processes: `shoal backup` through a
//! running control plane, the control plane killed and its data wiped,
//! `shoal restore` into a new data directory, the same registry and the
//! same artifact bytes, and the fleet serving throughout without
//! reloading anything; a damaged backup refused by `verify` and `restore`;
//! scheduled backups pruned to the newest N.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use shoal_registry::RegistryStore;
use shoal_testkit::{HttpClient, Samples, TempDir, eventually, model_path};

mod common;
use common::{cli, cli_fails, converged_on};

/// Every file under `dir`, by relative path, with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(path.strip_prefix(dir).unwrap().to_owned(), bytes);
            }
        }
    }
    out
}

async fn dump(registry_db: &Path) -> shoal_registry::dump::RegistryDump {
    shoal_registry::sqlite::SqliteRegistry::open(registry_db)
        .await
        .unwrap()
        .dump()
        .await
        .unwrap()
}

/// The sum of a replica's `model_loads_total` series.
async fn loads(http: &HttpClient, replica: &str) -> u64 {
    let text = http.get(&format!("{replica}/metrics")).await.text();
    text.lines()
        .filter(|l| l.starts_with("model_loads_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_control_plane_is_restored_byte_for_byte_and_drives_the_fleet_it_left() {
    let tmp = TempDir::new("backup-e2e");
    let ctl_dir = tmp.join("control");
    let (first, control) = common::control(&ctl_dir, "127.0.0.1:0", &[], &[]);
    let addr = control.trim_start_matches("http://").to_owned();
    let replicas: Vec<_> = (0..2)
        .map(|i| {
            common::replica(
                &control,
                &tmp.join(&format!("r{i}")),
                &["--poll-interval", "1"],
            )
        })
        .collect();
    for file in ["digits-v1.onnx", "digits-v2.onnx"] {
        cli(
            &control,
            &[
                "model",
                "push",
                "digits",
                model_path(file).to_str().unwrap(),
            ],
        );
    }
    cli(&control, &["deploy", "digits:2"]);
    converged_on(&control, "digits:2", 2).await;

    // Predictions to both replicas for the whole test.
    let http = HttpClient::new();
    let urls: Vec<String> = replicas.iter().map(|(_, url)| url.clone()).collect();
    let mut loads_before = 0;
    for url in &urls {
        loads_before += loads(&http, url).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, answered, failed, urls) =
            (stop.clone(), answered.clone(), failed.clone(), urls.clone());
        tokio::spawn(async move {
            let http = HttpClient::new();
            let body = Samples::load().request(0..2);
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            while !stop.load(Ordering::SeqCst) {
                pace.tick().await;
                for url in &urls {
                    let r = http
                        .post_json(&format!("{url}/v2/models/digits/infer"), body.clone())
                        .await;
                    let counter = if r.status.as_u16() == 200 {
                        &answered
                    } else {
                        &failed
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    let backups = tmp.join("backups");
    let backups_arg = backups.to_str().unwrap();
    let record = cli(&control, &["backup", "--to", backups_arg]);
    assert_eq!(record["counts"]["versions"], 2);
    assert_eq!(record["counts"]["replicas"], 2);
    assert_eq!(record["artifacts"].as_array().unwrap().len(), 2);
    let verified = cli(&control, &["backup", "verify", "--from", backups_arg]);
    assert_eq!(verified["id"], record["id"]);
    let listed = cli(&control, &["backup", "list", "--from", backups_arg]);
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // The disaster: the control plane dies and its data is gone.
    first.signal(Signal::SIGKILL);
    drop(first);
    let lost = tmp.join("control.lost");
    std::fs::rename(&ctl_dir, &lost).unwrap();

    let restored = cli(
        &control,
        &[
            "restore",
            "--from",
            backups_arg,
            "--data-dir",
            ctl_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(restored["id"], record["id"]);
    assert_eq!(
        dump(&ctl_dir.join("registry.db")).await,
        dump(&lost.join("registry.db")).await,
        "the restored registry is the one that was lost"
    );
    assert_eq!(
        files(&ctl_dir.join("artifacts")),
        files(&lost.join("artifacts")),
        "every manifest and chunk, byte for byte"
    );

    // The restored control plane, on the old address: the replicas come
    // back to it, see the same desired state, and load nothing again.
    let (_second, again) = common::control(&ctl_dir, &addr, &[], &[]);
    assert_eq!(again, control);
    assert!(
        !ctl_dir.join("admin.token").exists(),
        "the restored registry has its tokens: no new admin token"
    );
    converged_on(&control, "digits:2", 2).await;
    let shown = cli(&control, &["model", "show", "digits"]);
    assert_eq!(shown["versions"].as_array().unwrap().len(), 2);
    stop.store(true, Ordering::SeqCst);
    traffic.await.unwrap();
    let mut loads_after = 0;
    for url in &urls {
        loads_after += loads(&http, url).await;
    }
    assert_eq!(loads_after, loads_before, "no replica reloaded anything");
    assert!(answered.load(Ordering::SeqCst) > 0);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "every prediction answered"
    );

    // A damaged backup: verify and restore say what is wrong; the restore
    // target stays empty.
    let chunks = backups.join("chunks");
    let victim = std::fs::read_dir(&chunks)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    std::fs::write(&victim, bytes).unwrap();
    let refused = cli_fails(&control, &["backup", "verify", "--from", backups_arg]);
    assert!(refused.contains("is damaged"), "{refused}");
    let target = tmp.join("target");
    let refused = cli_fails(
        &control,
        &[
            "restore",
            "--from",
            backups_arg,
            "--data-dir",
            target.to_str().unwrap(),
        ],
    );
    assert!(refused.contains("is damaged"), "{refused}");
    assert!(dump(&target.join("registry.db")).await.models.is_empty());
    assert!(
        !target.join("artifacts").join("chunks").exists()
            || files(&target.join("artifacts").join("chunks")).is_empty()
    );

    // Nothing to take a backup to: the CLI says what to give.
    let refused = cli_fails(&control, &["backup"]);
    assert!(refused.contains("--to"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_keep_the_newest_n() {
    let tmp = TempDir::new("backup-schedule");
    let backups = tmp.join("backups");
    let (_ctl, control) = common::control(
        &tmp.join("control"),
        "127.0.0.1:0",
        &[
            "--backup-to",
            backups.to_str().unwrap(),
            "--backup-every",
            "1s",
            "--backup-keep",
            "2",
        ],
        &[],
    );
    cli(
        &control,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v1.onnx").to_str().unwrap(),
        ],
    );
    let http = HttpClient::new();
    eventually("three scheduled backups", Duration::from_secs(30), || {
        let http = http.clone();
        let control = control.clone();
        async move {
            let text = http.get(&format!("{control}/metrics")).await.text();
            let ok = text
                .lines()
                .find(|l| l.starts_with("shoal_backups_total{result=\"ok\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0);
            (ok >= 3).then_some(())
        }
    })
    .await;
    let listed = cli(
        &control,
        &["backup", "list", "--from", backups.to_str().unwrap()],
    );
    let ids = listed.as_array().unwrap();
    assert!(
        ids.len() <= 3,
        "pruned to two (a third may be in progress): {listed}"
    );
    assert!(ids.len() >= 2, "{listed}");
    cli(
        &control,
        &["backup", "verify", "--from", backups.to_str().unwrap()],
    );

    // A bad schedule is refused before anything starts.
    let out = std::process::Command::new(common::shoal())
        .args(["control", "--backup-every", "0s", "--backup-to", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("too often"));
}

/// Restoring an older backup: the replicas have seen newer revisions than
/// the restored registry holds. The control plane moves its revision past
/// what they report, so they follow the restored state (and every deploy
/// after it) instead of ignoring it as old news.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_a_control_plane_restored_from_an_older_backup() {
    let tmp = TempDir::new("backup-older");
    let ctl_dir = tmp.join("control");
    let (first, control) = common::control(&ctl_dir, "127.0.0.1:0", &[], &[]);
    let addr = control.trim_start_matches("http://").to_owned();
    let _replica = common::replica(&control, &tmp.join("r0"), &["--poll-interval", "1"]);
    for file in ["digits-v1.onnx", "digits-v2.onnx"] {
        cli(
            &control,
            &[
                "model",
                "push",
                "digits",
                model_path(file).to_str().unwrap(),
            ],
        );
    }
    cli(&control, &["deploy", "digits:1"]);
    converged_on(&control, "digits:1", 1).await;
    let backups = tmp.join("backups");
    let old = cli(&control, &["backup", "--to", backups.to_str().unwrap()]);

    // Work the backup does not have: v2 deployed, and more revisions.
    cli(&control, &["deploy", "digits:2"]);
    converged_on(&control, "digits:2", 1).await;
    first.signal(Signal::SIGKILL);
    drop(first);
    std::fs::remove_dir_all(&ctl_dir).unwrap();
    cli(
        &control,
        &[
            "restore",
            "--from",
            backups.to_str().unwrap(),
            "--data-dir",
            ctl_dir.to_str().unwrap(),
        ],
    );
    let (_second, _) = common::control(&ctl_dir, &addr, &[], &[]);
    // The restored truth is digits:1, and the replica goes back to it.
    converged_on(&control, "digits:1", 1).await;
    let status = cli(&control, &["status"]);
    assert!(
        status["revision"].as_u64().unwrap() > old["revision"].as_u64().unwrap(),
        "the revision moved past what the replica had seen: {status}"
    );
    let audit = HttpClient::new()
        .get(&format!("{control}/api/v1/audit?limit=1000"))
        .await
        .json();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "revision.advance"),
        "the move is in the audit log"
    );
    // And a deploy after the restore reaches it too.
    cli(&control, &["deploy", "digits:2"]);
    converged_on(&control, "digits:2", 1).await;
}

/// Backups to an S3-compatible bucket (moto's server, as for artifacts):
/// taken by the control plane, listed and verified by the CLI, restored
/// into a new data directory, and served from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_in_an_s3_bucket_restores() {
    let s3 = shoal_testkit::S3Server::start(&["shoal-backups"]);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let tmp = TempDir::new("backup-s3");
    let (_ctl, control) = common::control(&tmp.join("control"), "127.0.0.1:0", &[], &env);
    cli(
        &control,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v1.onnx").to_str().unwrap(),
        ],
    );
    cli(&control, &["deploy", "digits:1"]);
    let record = cli(&control, &["backup", "--to", "s3://shoal-backups/nightly"]);
    assert_eq!(record["counts"]["versions"], 1);

    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::shoal())
            .args(args)
            .arg("--json")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "shoal {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let listed = run(&["backup", "list", "--from", "s3://shoal-backups/nightly"]);
    assert_eq!(listed[0]["id"], record["id"]);
    run(&["backup", "verify", "--from", "s3://shoal-backups/nightly"]);
    let restored = tmp.join("restored");
    run(&[
        "restore",
        "--from",
        "s3://shoal-backups/nightly",
        "--data-dir",
        restored.to_str().unwrap(),
    ]);
    let (_again, again) = common::control(&restored, "127.0.0.1:0", &[], &[]);
    let token = std::fs::read_to_string(tmp.join("control").join("admin.token")).unwrap();
    shoal_testkit::tokens::remember_admin_token(&again, token.trim());
    let shown = cli(&again, &["model", "show", "digits:1"]);
    assert_eq!(shown["status"], "production");
    let deployments = cli(&again, &["rollout", "status", "digits"]);
    assert!(deployments.is_object(), "{deployments}");
}
