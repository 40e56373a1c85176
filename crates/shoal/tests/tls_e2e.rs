//! TLS as a user runs it: `shoal up --tls` serves every member over https
//! with a local CA, a prediction goes through the gateway by curl and by
//! Triton's own client (`ssl=True`), the CLI reaches the control plane
//! with `SHOAL_CA`, and a replica requiring client certificates refuses a
//! client without one (mutual TLS).

use std::path::Path;
use std::process::Command;

use shoal_testkit::{Samples, TempDir, model_path, spawn_until};

mod common;
use common::shoal;

/// Runs curl with `args`; its exit status, stdout, and the headers it saw.
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl (scripts/setup installs it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn infer_args<'a>(url: &'a str, body: &'a str) -> Vec<&'a str> {
    vec![
        "-i",
        url,
        "-H",
        "content-type: application/json",
        "-d",
        body,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_serves_every_member_over_https() {
    let tmp = TempDir::new("tls-up");
    let data = tmp.join(".shoal");
    let (_up, ready) = spawn_until(
        shoal(),
        &[
            "up",
            "--tls",
            "--gateway-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--replicas",
            "2",
            "--grpc-addr",
            "127.0.0.1:0",
        ],
        "shoal up ready:",
    );
    let words: Vec<&str> = ready.split_whitespace().collect();
    let (gateway, control) = (words[4].to_owned(), words[6].to_owned());
    assert!(
        gateway.starts_with("https://") && control.starts_with("https://"),
        "{ready}"
    );
    let ca = data.join("tls/ca.pem");
    let ca = ca.to_str().unwrap();
    let url = format!("{gateway}/v2/models/digits/infer");
    let body = Samples::load().request(0..1);

    // curl, trusting the local CA: a prediction with Shoal's headers.
    let mut args = vec!["--cacert", ca];
    args.extend(infer_args(&url, &body));
    let (code, out) = curl(&args);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("x-shoal-model-version: 1"), "{out}");
    // Without the CA the certificate is not trusted (curl's exit 60), and
    // plain http to the https port gets no answer.
    let (code, out) = curl(&infer_args(&url, &body));
    assert_eq!(code, 60, "{out}");
    let plain = url.replace("https://", "http://");
    let (code, out) = curl(&infer_args(&plain, &body));
    assert!(
        code != 0 || !out.contains("200 OK"),
        "plain http answered: {out}"
    );

    // Triton's client with ssl=True, JSON and binary tensors.
    let samples = Samples::load();
    shoal_testkit::tritonclient_check_tls(
        gateway.trim_start_matches("https://"),
        "digits",
        samples.accuracy["digits-v1"] - 0.01,
        Path::new(ca),
    )
    .await;
    // And its gRPC client with ssl=True on the gateway's gRPC port, which
    // serves TLS with the same certificate.
    let fleet: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("fleet.json")).unwrap()).unwrap();
    let grpc = fleet["grpc"][0][1]
        .as_str()
        .expect("the gateway's gRPC address");
    shoal_testkit::tritonclient_grpc_check_tls(
        grpc,
        gateway.trim_start_matches("https://"),
        "digits",
        samples.accuracy["digits-v1"] - 0.01,
        Path::new(ca),
    )
    .await;

    // The CLI, from the fleet's directory, with the CA: both replicas
    // registered with their https addresses, and healthy.
    let status = |control: String, home: std::path::PathBuf, ca: String| {
        shoal_testkit::output_json(
            Command::new(shoal())
                .current_dir(home)
                .env("SHOAL_CA", ca)
                .args(["status", "--json", "--control", &control]),
        )
    };
    let (c, home, ca_owned) = (control.clone(), tmp.join(""), ca.to_owned());
    let status = shoal_testkit::eventually(
        "both replicas healthy over https",
        std::time::Duration::from_secs(30),
        move || {
            let s = status(c.clone(), home.clone(), ca_owned.clone());
            let healthy = s["replicas"]
                .as_array()
                .is_some_and(|r| r.len() == 2 && r.iter().all(|r| r["healthy"] == true));
            std::future::ready(healthy.then_some(s))
        },
    )
    .await;
    for r in status["replicas"].as_array().unwrap() {
        assert!(
            r["address"].as_str().unwrap().starts_with("https://"),
            "{r}"
        );
    }
    // Without it, the CLI says what to do.
    let out = Command::new(shoal())
        .current_dir(tmp.join(""))
        .env_remove("SHOAL_CA")
        .args(["status", "--control", &control])
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(error.contains("--ca"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let tmp = TempDir::new("tls-mutual");
    let files = shoal_fleet::tls::ensure(&tmp.join("certs"), &[]).unwrap();
    let (ca, cert, key) = (
        files.ca.to_str().unwrap(),
        files.cert.to_str().unwrap(),
        files.key.to_str().unwrap(),
    );
    let digits = format!("digits={}", model_path("digits-v1.onnx").display());
    let (_replica, line) = spawn_until(
        shoal(),
        &[
            "replica",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            tmp.join("r").to_str().unwrap(),
            "--model",
            &digits,
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--ca",
            ca,
            "--require-client-cert",
        ],
        "listening on https://",
    );
    let addr = line.split("https://").nth(1).unwrap().trim().to_owned();
    let ready = format!("https://{addr}/ready");
    // With a client certificate signed by the CA: served.
    let mut ok = None;
    for _ in 0..100 {
        let (code, out) = curl(&["--cacert", ca, "--cert", cert, "--key", key, "-i", &ready]);
        if code == 0 && out.starts_with("HTTP/1.1 200") {
            ok = Some(out);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        ok.is_some(),
        "the replica never answered a client with a certificate"
    );
    let body = Samples::load().request(0..1);
    let url = format!("https://{addr}/v2/models/digits/infer");
    let mut args = vec!["--cacert", ca, "--cert", cert, "--key", key];
    args.extend(infer_args(&url, &body));
    let (code, out) = curl(&args);
    assert!(code == 0 && out.starts_with("HTTP/1.1 200"), "{out}");
    // Without one: the handshake fails, nothing is served.
    let mut args = vec!["--cacert", ca];
    args.extend(infer_args(&url, &body));
    let (code, out) = curl(&args);
    assert_ne!(code, 0, "served without a client certificate: {out}");
    assert!(!out.contains("200 OK"), "{out}");
    // The refused handshake harmed nothing.
    let (code, out) = curl(&["--cacert", ca, "--cert", cert, "--key", key, "-i", &ready]);
    assert!(code == 0 && out.starts_with("HTTP/1.1 200"), "{out}");
}
