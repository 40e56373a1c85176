//! The control plane and replicas as real processes: push, deploy and
//! converge with no skew; a corrupted chunk refused while the serving
//! version keeps serving; rollback; an acknowledged push surviving kill -9 of
//! the control plane; a replica restarted without the control plane serving
//! from its cache.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use shoal_testkit::{
    ChildGuard, CutProxy, HttpClient, S3Server, Samples, TempDir, eventually, metric_sum,
    model_path,
};

mod common;
use common::{cli, converged_on, shoal};

/// Flags for control planes that share one PostgreSQL registry and one
/// artifact directory under `tmp`: several of them are one control plane.
fn shared_stores(pg: &shoal_testkit::PostgresServer, tmp: &TempDir) -> Vec<String> {
    std::fs::create_dir_all(tmp.join("artifacts")).unwrap();
    vec![
        "--registry".into(),
        pg.database("registry"),
        "--artifact-store".into(),
        format!("file://{}", tmp.join("artifacts").display()),
    ]
}

fn start_control(dir: &Path, addr: &str) -> (ChildGuard, String) {
    common::control(dir, addr, &[], &[])
}

fn start_replica(control: &str, dir: &Path) -> (ChildGuard, String) {
    common::replica(control, dir, &["--poll-interval", "1"])
}

/// Sum of the stored (wire) sizes of artifact `sha256`'s chunks.
async fn stored_bytes(http: &HttpClient, control: &str, sha256: &str) -> u64 {
    http.get(&format!("{control}/api/v1/artifacts/{sha256}/manifest"))
        .await
        .json()["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stored"].as_u64().unwrap())
        .sum()
}

async fn predict(http: &HttpClient, replica: &str) -> (u16, String) {
    let r = http
        .post_json(
            &format!("{replica}/v2/models/digits/infer"),
            Samples::load().request(0..2),
        )
        .await;
    (
        r.status.as_u16(),
        r.header("x-shoal-model-version").unwrap_or("").to_owned(),
    )
}

/// A control plane on SQLite and three replicas serving `digits:1`.
struct Fleet {
    ctl: Option<ChildGuard>,
    ctl_dir: std::path::PathBuf,
    control: String,
    replicas: Vec<(ChildGuard, String)>,
    http: HttpClient,
    tmp: TempDir,
}

impl Fleet {
    async fn start(name: &str) -> Fleet {
        let tmp = TempDir::new(name);
        let ctl_dir = tmp.join("control");
        let (ctl, control) = start_control(&ctl_dir, "127.0.0.1:0");
        let replicas: Vec<(ChildGuard, String)> = (0..3)
            .map(|i| start_replica(&control, &tmp.join(&format!("r{i}"))))
            .collect();
        let v1 = cli(
            &control,
            &[
                "model",
                "push",
                "digits",
                model_path("digits-v1.onnx").to_str().unwrap(),
            ],
        );
        assert_eq!(v1["version"], "1");
        cli(&control, &["deploy", "digits:1"]);
        converged_on(&control, "digits:1", 3).await;
        Fleet {
            ctl: Some(ctl),
            ctl_dir,
            control,
            replicas,
            http: HttpClient::new(),
            tmp,
        }
    }

    /// kill -9 of the control plane.
    fn kill_control(&mut self) {
        let ctl = self.ctl.take().expect("a control plane");
        ctl.signal(Signal::SIGKILL);
    }
}

/// v2 reaches every replica with no skew, and its chunks leave the origin
/// once: the replicas take them from the chunks' owners among their peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_converges_and_its_chunks_leave_the_origin_once() {
    let f = Fleet::start("fleet-converge").await;
    let v2 = cli(
        &f.control,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v2.onnx").to_str().unwrap(),
            "--metric",
            "accuracy=0.98",
        ],
    );
    assert_eq!(v2["version"], "2");
    assert_eq!(
        v2["sha256"],
        "cb588faad879a2350064f49a06a5846b747e6934c3b91c108233706752934ebb"
    );
    let egress = |metrics: &str| {
        metric_sum(
            metrics,
            "shoal_artifact_egress_bytes_total",
            &[("kind", "chunk")],
        ) as u64
    };
    let before = egress(&f.http.get(&format!("{}/metrics", f.control)).await.text());
    cli(&f.control, &["deploy", "digits:2"]);
    converged_on(&f.control, "digits:2", 3).await;
    // Three replicas fetched v2, but its chunks left the origin once: the
    // others took them from the chunks' owner among their peers.
    let after = egress(&f.http.get(&format!("{}/metrics", f.control)).await.text());
    let stored = stored_bytes(&f.http, &f.control, v2["sha256"].as_str().unwrap()).await;
    assert_eq!(after - before, stored, "origin egress for v2");
    for (_, addr) in &f.replicas {
        assert_eq!(predict(&f.http, addr).await, (200, "2".to_owned()));
    }
    let shown = cli(&f.control, &["model", "show", "digits"]);
    assert_eq!(shown["model"]["production"], "2");
    let rollout = cli(&f.control, &["rollout", "status", "digits"]);
    assert_eq!(rollout["state"], "promoted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_chunk_is_refused_and_the_rollout_rolls_back() {
    let f = Fleet::start("fleet-tampered").await;
    // A tampered chunk in the store: refused by the replica that fetches it,
    // which keeps serving v1; nobody else moves, and since the same bytes
    // would be refused again, the rollout rolls back by itself.
    let v3 = cli(
        &f.control,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-slow.onnx").to_str().unwrap(),
        ],
    );
    let sha = v3["sha256"].as_str().unwrap();
    let manifest = f
        .http
        .get(&format!("{}/api/v1/artifacts/{sha}/manifest", f.control))
        .await
        .json();
    let victim = manifest["chunks"][5]["id"].as_str().unwrap().to_owned();
    let chunk_path = f.ctl_dir.join("artifacts/chunks").join(&victim);
    let mut bytes = std::fs::read(&chunk_path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&chunk_path, bytes).unwrap();
    cli(&f.control, &["deploy", "digits:2", "--max-surge", "1"]);
    let control2 = f.control.clone();
    let failed = eventually(
        "a replica to report the corrupt chunk",
        Duration::from_secs(30),
        || {
            let control = control2.clone();
            async move {
                let status = tokio::task::spawn_blocking(move || cli(&control, &["status"]))
                    .await
                    .unwrap();
                status["replicas"].as_array().unwrap().iter().find_map(|r| {
                    let reason = r["failures"]["digits:2"]["reason"].as_str()?;
                    Some((r["id"].as_str().unwrap().to_owned(), reason.to_owned()))
                })
            }
        },
    )
    .await;
    assert!(failed.1.contains("integrity check failed"), "{failed:?}");
    assert!(failed.1.contains(&victim), "{failed:?}");
    for (_, addr) in &f.replicas {
        assert_eq!(
            predict(&f.http, addr).await,
            (200, "1".to_owned()),
            "v1 keeps serving"
        );
    }
    let rollout = common::digits_rollout_until(&f.control, "the rollout to roll back", |r| {
        r["state"] == "rolled_back"
    })
    .await;
    let reason = rollout["reason"].as_str().unwrap();
    assert!(
        reason.contains(&failed.0) && reason.contains("integrity check failed"),
        "{rollout}"
    );
    converged_on(&f.control, "digits:1", 3).await;
    let v3 = cli(&f.control, &["model", "show", "digits:2"]);
    assert_eq!(v3["rolled_back"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_push_survives_kill_9_of_the_control_plane() {
    let mut f = Fleet::start("fleet-push-crash").await;
    // An acknowledged push survives kill -9 of the control plane.
    let v4 = cli(
        &f.control,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v1.onnx").to_str().unwrap(),
            "--label",
            "note=after-crash",
        ],
    );
    assert_eq!(v4["version"], "2");
    f.kill_control();
    let port = f.control.rsplit(':').next().unwrap().to_owned();
    let (_ctl, control_again) = start_control(&f.ctl_dir, &format!("127.0.0.1:{port}"));
    assert_eq!(control_again, f.control);
    let v4 = cli(&f.control, &["model", "show", "digits:2"]);
    assert_eq!(v4["labels"]["note"], "after-crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_control_plane_a_restarted_replica_serves_from_its_cache() {
    let mut f = Fleet::start("fleet-cache").await;
    // With the control plane gone, a replica killed and restarted comes
    // back serving from its cache; the others never stopped.
    f.kill_control();
    let (old, _) = f.replicas.remove(0);
    old.signal(Signal::SIGKILL);
    drop(old);
    let (restarted, addr) = start_replica(&f.control, &f.tmp.join("r0"));
    let ready = format!("{addr}/ready");
    let http2 = f.http.clone();
    eventually(
        "the restarted replica to be ready from its cache",
        Duration::from_secs(20),
        || {
            let (http, ready) = (http2.clone(), ready.clone());
            async move { (http.get(&ready).await.status == 200).then_some(()) }
        },
    )
    .await;
    assert_eq!(predict(&f.http, &addr).await, (200, "1".to_owned()));
    for (_, addr) in &f.replicas {
        assert_eq!(predict(&f.http, addr).await, (200, "1".to_owned()));
    }
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_in_an_s3_compatible_store() {
    let s3 = S3Server::start(&["shoal-models"]);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let tmp = TempDir::new("fleet-s3");
    let ctl_dir = tmp.join("control");

    // A bucket that does not exist stops the control plane at start, with
    // a message that says what to check.
    let out = std::process::Command::new(shoal())
        .args(["control", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(&ctl_dir)
        .args(["--artifact-store", "s3://no-such-bucket/shoal"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("check that the bucket exists"), "{stderr}");
    assert!(stderr.contains("NoSuchBucket"), "{stderr}");

    let (_ctl, control) = common::control(
        &ctl_dir,
        "127.0.0.1:0",
        &["--artifact-store", "s3://shoal-models/fleet"],
        &env,
    );
    let (_replica, addr) = start_replica(&control, &tmp.join("r0"));
    let http = HttpClient::new();
    for (file, version) in [("digits-v1.onnx", "1"), ("digits-v2.onnx", "2")] {
        let pushed = cli(
            &control,
            &[
                "model",
                "push",
                "digits",
                model_path(file).to_str().unwrap(),
            ],
        );
        assert_eq!(pushed["version"], version);
    }
    cli(&control, &["deploy", "digits:2"]);
    converged_on(&control, "digits:2", 1).await;
    assert_eq!(predict(&http, &addr).await, (200, "2".to_owned()));
    // The chunks live in the bucket, not on the control plane's disk.
    assert!(!ctl_dir.join("artifacts").exists());
    let listing = http
        .get(&format!(
            "{}/shoal-models?list-type=2&prefix=fleet/manifests/",
            s3.endpoint
        ))
        .await
        .text();
    assert_eq!(
        listing.matches("<Key>fleet/manifests/").count(),
        2,
        "{listing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_download_resumes_fetching_only_missing_chunks() {
    let tmp = TempDir::new("fleet-resume");
    let (_ctl, control) = start_control(&tmp.join("control"), "127.0.0.1:0");
    // The replica reaches the control plane only through a link the test
    // can cut.
    let link = CutProxy::start(control.trim_start_matches("http://")).await;
    shoal_testkit::tokens::remember_admin_token(&link.url(), &common::admin_token(&control));
    let replica_dir = tmp.join("r0");
    let (_replica, addr) = start_replica(&link.url(), &replica_dir);
    let http = HttpClient::new();

    // A 24 MiB model of random weights: ~400 chunks that barely compress.
    let model = tmp.join("big.onnx");
    let status = std::process::Command::new("python3")
        .arg(model_path("../tools/make_mlp_model.py"))
        .arg(&model)
        .args(["--layers", "24", "--seed", "7"])
        .status()
        .unwrap();
    assert!(status.success(), "make_mlp_model.py (scripts/setup-python)");
    let pushed = cli(&control, &["model", "push", "big", model.to_str().unwrap()]);
    let sha = pushed["sha256"].as_str().unwrap().to_owned();
    let total = stored_bytes(&http, &control, &sha).await;
    assert!(total > 20 << 20, "{total} bytes stored");

    // The link goes down half-way through the download and stays down
    // while the replica retries.
    link.cut_after(total / 2);
    cli(&control, &["deploy", "big:1"]);
    eventually(
        "the link to be cut mid-download",
        Duration::from_secs(30),
        || std::future::ready(link.is_cut().then_some(())),
    )
    .await;
    eventually(
        "the replica to retry during the outage",
        Duration::from_secs(30),
        || std::future::ready((link.refused() >= 3).then_some(())),
    )
    .await;
    let fleet = format!("Bearer {}", common::fleet_token(&link.url()));
    let cached = http
        .send(
            http::Method::GET,
            &format!("{addr}/sync/status"),
            &[("authorization", &fleet)],
            bytes::Bytes::new(),
        )
        .await
        .unwrap()
        .json()["cache_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        cached > total / 4,
        "{cached} of {total} bytes cached when cut"
    );
    let at_restore = link.bytes_down();
    link.restore();

    converged_on(&control, "big:1", 1).await;
    let after_restore = link.bytes_down() - at_restore;
    // Only what was missing crossed the link again (plus HTTP framing,
    // heartbeats and watch events: well under 1 MiB).
    assert!(
        after_restore < total - cached + (1 << 20),
        "{after_restore} bytes after the outage; {cached} of {total} were cached"
    );
    // No chunk was fetched twice: the replica's fetched bytes add up to
    // the artifact exactly.
    let metrics = http.get(&format!("{addr}/metrics")).await.text();
    assert_eq!(
        metric_sum(
            &metrics,
            "shoal_sync_fetched_bytes_total",
            &[("source", "origin")]
        ) as u64,
        total
    );
    // And the model it assembled serves.
    let request = serde_json::json!({
        "inputs": [{"name": "input", "shape": [1, 512], "datatype": "FP32", "data": vec![0.5f32; 512]}]
    });
    let reply = http
        .post_json(&format!("{addr}/v2/models/big/infer"), request.to_string())
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// The registry on a real PostgreSQL server (started by the test): a
/// control plane is killed (-9) and another one, with a data directory of
/// its own, takes over on the same database and artifact store. Everything
/// acknowledged is there, the same tokens work (they live in the
/// registry), and the fleet follows the new control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_on_postgres_is_replaced_by_another_with_nothing_lost() {
    let tmp = TempDir::new("fleet-postgres");
    let pg = shoal_testkit::PostgresServer::start();
    let shared = shared_stores(&pg, &tmp);
    let args: Vec<&str> = shared.iter().map(String::as_str).collect();
    let (first, control) = common::control(&tmp.join("a"), "127.0.0.1:0", &args, &[]);
    let addr = control.trim_start_matches("http://").to_owned();
    let (_replica, replica) = start_replica(&control, &tmp.join("r0"));
    let v1 = cli(
        &control,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v1.onnx").to_str().unwrap(),
        ],
    );
    cli(&control, &["deploy", "digits:1"]);
    converged_on(&control, "digits:1", 1).await;

    first.signal(Signal::SIGKILL);
    drop(first);
    // Another control plane, another data directory, the same database.
    let (_second, again) = common::control(&tmp.join("b"), &addr, &args, &[]);
    assert_eq!(again, control);
    assert!(
        !tmp.join("b/admin.token").exists(),
        "the registry has tokens: no new admin token is made"
    );
    let shown = cli(&control, &["model", "show", "digits:1"]);
    assert_eq!(shown["sha256"], v1["sha256"]);
    cli(
        &control,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v2.onnx").to_str().unwrap(),
        ],
    );
    // The first rollout may have been killed before it was concluded; the
    // new control plane (another member: it takes the lease once the dead
    // one's lapses) concludes it, then the next deploy goes out.
    common::digits_rollout_until(&control, "the first rollout to end", |r| {
        r["state"] == "promoted"
    })
    .await;
    cli(&control, &["deploy", "digits:2"]);
    converged_on(&control, "digits:2", 1).await;
    let http = HttpClient::new();
    assert_eq!(predict(&http, &replica).await, (200, "2".to_owned()));
    let audit = http
        .get(&format!("{control}/api/v1/audit?limit=1000"))
        .await
        .json();
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "version.create").count(),
        2,
        "{actions:?}"
    );
}

/// Two control planes on one PostgreSQL registry accept the same tokens,
/// and a token revoked through one stops working on the other at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_on_one_control_plane_stops_working_on_another_at_once() {
    let tmp = TempDir::new("fleet-tokens-pg");
    let pg = shoal_testkit::PostgresServer::start();
    let shared = shared_stores(&pg, &tmp);
    let args: Vec<&str> = shared.iter().map(String::as_str).collect();
    let (_a, a) = common::control(&tmp.join("a"), "127.0.0.1:0", &args, &[]);
    let (_b, b) = common::control(&tmp.join("b"), "127.0.0.1:0", &args, &[]);
    // b made no admin token of its own: the registry had one.
    let admin = std::fs::read_to_string(tmp.join("a").join("admin.token")).unwrap();
    shoal_testkit::tokens::remember_admin_token(&b, admin.trim());

    let created = cli(&a, &["token", "create", "--name", "ci", "--role", "viewer"]);
    let secret = created["token"].as_str().unwrap().to_owned();
    let http = HttpClient::new();
    let whoami = |url: String| {
        let (http, secret) = (http.clone(), secret.clone());
        async move {
            let bearer = format!("Bearer {secret}");
            http.send_as(
                http::Method::GET,
                &format!("{url}/api/v1/auth/whoami"),
                &[("authorization", bearer.as_str())],
                bytes::Bytes::new(),
            )
            .await
            .unwrap()
            .status
            .as_u16()
        }
    };
    assert_eq!(whoami(b.clone()).await, 200, "a token made on a works on b");
    cli(&a, &["token", "revoke", "ci"]);
    assert_eq!(
        whoami(b.clone()).await,
        401,
        "revoked on a: refused on b at once"
    );
    assert_eq!(whoami(a.clone()).await, 401);
}
