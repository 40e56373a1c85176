//! What can be checked of `deploy/kubernetes` without a cluster: every
//! manifest is valid against the Kubernetes schemas (and KEDA's, for its
//! objects) — `scripts/validate-kubernetes` — and the manifests agree with
//! the binary: each role starts with exactly the arguments its manifest
//! gives it, answers the probes the manifest declares on the paths it
//! declares, and the control plane answers the URL KEDA's metrics-api
//! scaler reads with the number the ScaledObject expects, to a viewer
//! token. No cluster, image build or KEDA runs here (docs/kubernetes.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use shoal_testkit::{ChildGuard, HttpClient, TempDir, eventually, spawn_server_env};

mod common;
use common::cli;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What `tools/k8s_manifest_facts.py` reads out of the manifests.
fn facts() -> Value {
    let out = std::process::Command::new("python3")
        .arg(repo().join("tools/k8s_manifest_facts.py"))
        .current_dir(repo())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "k8s_manifest_facts.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_manifest_is_valid_against_the_kubernetes_and_keda_schemas() {
    let out = std::process::Command::new(repo().join("scripts/validate-kubernetes"))
        .current_dir(repo())
        .output()
        .expect("scripts/validate-kubernetes");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("are valid"), "{printed}");
}

/// The workload of `role` in the facts.
fn workload<'a>(facts: &'a Value, role: &str) -> &'a Value {
    facts["workloads"]
        .as_object()
        .unwrap()
        .values()
        .find(|w| w["role"] == role)
        .unwrap_or_else(|| panic!("no {role} workload in deploy/kubernetes"))
}

/// The manifest's arguments for `role`, made to run here: the listening
/// port checked against the probes and replaced by a free one, the data
/// directory and token file moved into the test's directory, the control
/// plane's Service URL replaced by the real one, `$(POD_NAME)` filled in,
/// `--advertise` (a cluster DNS name) left to its default.
fn local_args(
    facts: &Value,
    role: &str,
    dir: &Path,
    control: Option<&str>,
    token_file: Option<&Path>,
) -> Vec<String> {
    let w = workload(facts, role);
    let ports: Vec<u64> = w["probes"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    let mut args = Vec::new();
    for arg in w["args"].as_array().unwrap() {
        let arg = arg.as_str().unwrap();
        let (flag, value) = arg.split_once('=').unwrap_or((arg, ""));
        match flag {
            "--addr" => {
                let port: u64 = value.rsplit_once(':').unwrap().1.parse().unwrap();
                assert!(
                    ports.iter().all(|p| *p == port),
                    "{role}: probes on {ports:?}, listening on {port}"
                );
                args.push("--addr=127.0.0.1:0".to_owned());
            }
            "--grpc-addr" => args.push("--grpc-addr=127.0.0.1:0".to_owned()),
            "--data-dir" => args.push(format!("--data-dir={}", dir.display())),
            "--control" => {
                let service = &facts["services"]["shoal-control"];
                let port = service["ports"]["http"]["port"].as_u64().unwrap();
                assert_eq!(value, format!("http://shoal-control:{port}"), "{role}");
                args.push(format!("--control={}", control.unwrap()));
            }
            "--token-file" => args.push(format!("--token-file={}", token_file.unwrap().display())),
            "--advertise" => {}
            _ => args.push(arg.replace("$(POD_NAME)", &format!("shoal-{role}-0"))),
        }
    }
    args
}

/// Environment from the manifest's ConfigMap values (Secrets and the S3
/// store are the cluster's: the test keeps SQLite and local artifacts).
fn local_env(facts: &Value, role: &str) -> Vec<(String, String)> {
    workload(facts, role)["env"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.as_str() != "SHOAL_ARTIFACT_STORE")
        .filter_map(|(name, source)| Some((name.clone(), source["value"].as_str()?.to_owned())))
        .collect()
}

fn start(facts: &Value, role: &str, args: Vec<String>) -> (ChildGuard, String) {
    let env = local_env(facts, role);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (child, addr) = spawn_server_env(common::shoal(), &args, &env);
    (child, format!("http://{addr}"))
}

/// Every probe the manifest declares for `role` answers 200 at `base`.
async fn probes_answer(facts: &Value, role: &str, base: &str) {
    let http = HttpClient::new();
    for (kind, probe) in workload(facts, role)["probes"].as_object().unwrap() {
        assert_eq!(probe["scheme"], "HTTP", "{role} {kind}");
        let url = format!("{base}{}", probe["path"].as_str().unwrap());
        let what = format!("{role}'s {kind} probe {url}");
        let h = http.clone();
        eventually(&what, Duration::from_secs(30), || {
            let (h, url) = (h.clone(), url.clone());
            async move { (h.get(&url).await.status == 200).then_some(()) }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roles_start_with_their_manifests_arguments_and_answer_the_probes_and_the_scaler() {
    let facts = facts();
    let tmp = TempDir::new("kubernetes-e2e");

    let args = local_args(&facts, "control", &tmp.join("control"), None, None);
    let (_control, control) = start(&facts, "control", args);
    let token = std::fs::read_to_string(tmp.join("control").join("admin.token")).unwrap();
    shoal_testkit::tokens::remember_admin_token(&control, token.trim());
    probes_answer(&facts, "control", &control).await;

    let fleet_file = tmp.join("fleet.token");
    std::fs::write(&fleet_file, common::fleet_token(&control)).unwrap();
    let args = local_args(
        &facts,
        "replica",
        &tmp.join("replica"),
        Some(&control),
        Some(&fleet_file),
    );
    let (_replica, replica) = start(&facts, "replica", args);
    let args = local_args(
        &facts,
        "gateway",
        &tmp.join("gateway"),
        Some(&control),
        Some(&fleet_file),
    );
    let (_gateway, gateway) = start(&facts, "gateway", args);

    common::push_and_deploy_digits(&control);
    probes_answer(&facts, "replica", &replica).await;
    probes_answer(&facts, "gateway", &gateway).await;
    // The replica registered under the id its manifest gives it.
    let status = cli(&control, &["status"]);
    assert_eq!(status["replicas"][0]["id"], "shoal-replica-0", "{status}");
    assert_eq!(status["replicas"][0]["tier"], "on-demand", "{status}");

    // KEDA's metrics-api scaler: GET the trigger's path with a viewer
    // token, read the number at `valueLocation`; with AverageValue and a
    // target of 1 the replica count is that number.
    cli(&control, &["scale", "digits", "--min", "2", "--max", "5"]);
    let scaled = &facts["scaled_objects"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .expect("a ScaledObject")
        .clone();
    assert_eq!(scaled["target"], "StatefulSet/shoal-replica");
    let trigger = &scaled["triggers"][0];
    assert_eq!(trigger["type"], "metrics-api");
    assert_eq!(trigger["auth_mode"], "bearer");
    assert_eq!(trigger["metric_type"], "AverageValue");
    assert_eq!(
        trigger["url_port"],
        facts["services"]["shoal-control"]["ports"]["http"]["port"]
    );
    let viewer = cli(
        &control,
        &["token", "create", "--name", "keda", "--role", "viewer"],
    )["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("{control}{}", trigger["url_path"].as_str().unwrap());
    let location = trigger["value_location"].as_str().unwrap().to_owned();
    let target: f64 = trigger["target_value"].as_str().unwrap().parse().unwrap();
    let bearer = format!("Bearer {viewer}");
    let http = HttpClient::new();
    let desired = eventually(
        "the scaler's value to follow `shoal scale --min 2`",
        Duration::from_secs(30),
        || {
            let (http, url, bearer, location) =
                (http.clone(), url.clone(), bearer.clone(), location.clone());
            async move {
                let r = http
                    .send_as(http::Method::GET, &url, &[("authorization", &bearer)], "")
                    .await
                    .ok()?;
                assert_eq!(r.status, 200, "{}", r.text());
                let value = r
                    .json()
                    .pointer(&format!("/{}", location.replace('.', "/")))?
                    .as_f64()?;
                (value >= 2.0).then_some(value)
            }
        },
    )
    .await;
    assert_eq!(
        (desired / target).ceil(),
        2.0,
        "KEDA would run {desired} / {target}"
    );
    // Without a token the scaler is refused (and told why).
    let r = http
        .send_as(http::Method::GET, &url, &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
}
