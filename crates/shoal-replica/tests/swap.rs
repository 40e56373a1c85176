//! Version swaps under continuous load over a real socket: twenty swaps,
//! one refused (corrupt) artifact in the middle, and not one failed request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;
use shoal_replica::{ModelSpec, ReplicaConfig, ReplicaServer};
use shoal_runtime::tract::TractBackend;
use shoal_testkit::{HttpClient, Samples, model_path};
use tokio::sync::Notify;

#[derive(Default)]
struct Seen {
    by_version: Mutex<BTreeMap<String, usize>>,
    failures: Mutex<Vec<String>>,
    total: AtomicUsize,
    changed: Notify,
}

impl Seen {
    fn count(&self, version: &str) -> usize {
        self.by_version
            .lock()
            .unwrap()
            .get(version)
            .copied()
            .unwrap_or(0)
    }
}

const ADMIN: &str = "shoal_swap_admin";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_swaps_under_load_fail_no_request() {
    let config = ReplicaConfig {
        models: vec![ModelSpec {
            name: "digits".parse().unwrap(),
            version: "1".parse().unwrap(),
            path: model_path("digits-v1.onnx"),
        }],
        threads: Some(2),
        admin_tokens: vec![ADMIN.into()],
        ..ReplicaConfig::default()
    };
    let server = ReplicaServer::start(config, Arc::new(TractBackend::default()))
        .await
        .unwrap();
    server.replica.wait_ready().await;
    let base = format!("http://{}", server.addr);
    let seen = Arc::new(Seen::default());
    let done = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Samples::load());

    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (seen, done, samples) = (seen.clone(), done.clone(), samples.clone());
            let url = format!("{base}/v2/models/digits/infer");
            tokio::spawn(async move {
                let http = HttpClient::new();
                let mut i = c;
                while !done.load(Ordering::Relaxed) {
                    let body = samples.request(i % 400..i % 400 + 1 + c);
                    i += 7;
                    match http
                        .send(
                            http::Method::POST,
                            &url,
                            &[("content-type", "application/json")],
                            body,
                        )
                        .await
                    {
                        Ok(r) if r.status == 200 => {
                            let version =
                                r.header("x-shoal-model-version").unwrap_or("?").to_owned();
                            assert_eq!(r.json()["model_version"], version.as_str());
                            *seen.by_version.lock().unwrap().entry(version).or_default() += 1;
                        }
                        Ok(r) => seen.failures.lock().unwrap().push(format!(
                            "{}: {}",
                            r.status,
                            r.text()
                        )),
                        Err(e) => seen.failures.lock().unwrap().push(e),
                    }
                    seen.total.fetch_add(1, Ordering::Relaxed);
                    seen.changed.notify_waiters();
                }
            })
        })
        .collect();

    let http = HttpClient::new();
    let admin = |url: String, body: serde_json::Value| {
        let http = http.clone();
        async move {
            let bearer = format!("Bearer {ADMIN}");
            http.send(
                http::Method::PUT,
                &url,
                &[
                    ("content-type", "application/json"),
                    ("authorization", &bearer),
                ],
                body.to_string(),
            )
            .await
            .unwrap()
        }
    };
    let v1 = model_path("digits-v1.onnx");
    let v2 = model_path("digits-v2.onnx");
    let sha = |p: &std::path::Path| shoal_replica::sha256_hex(&std::fs::read(p).unwrap());
    let (v1_sha, v2_sha) = (sha(&v1), sha(&v2));
    let mut versions = Vec::new();
    for swap in 0..20 {
        let version = (swap + 2).to_string();
        let (path, digest) = if swap % 2 == 0 {
            (&v2, &v2_sha)
        } else {
            (&v1, &v1_sha)
        };
        if swap == 10 {
            // A tampered artifact mid-way is refused; the serving version
            // keeps serving.
            let r = admin(
                format!("{base}/admin/models/digits/versions/bad"),
                json!({"path": path, "sha256": "f".repeat(64)}),
            )
            .await;
            assert_eq!(r.status, 422, "{}", r.text());
        }
        let r = admin(
            format!("{base}/admin/models/digits/versions/{version}"),
            json!({"path": path, "sha256": digest}),
        )
        .await;
        assert_eq!(r.status, 200, "swap {swap}: {}", r.text());
        // Let traffic reach the new version before the next swap.
        while seen.count(&version) < 5 {
            let notified = seen.changed.notified();
            if seen.count(&version) >= 5 {
                break;
            }
            notified.await;
        }
        versions.push(version);
    }
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let failures = seen.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    for v in &versions {
        assert!(
            seen.count(v) >= 5,
            "version {v} served {} requests",
            seen.count(v)
        );
    }
    assert_eq!(seen.count("bad"), 0);
    assert!(seen.total.load(Ordering::Relaxed) >= 100);

    // Every retired version drained and was freed; only the last is loaded.
    assert!(server.replica.store().draining().is_empty());
    let metrics = server.replica.encode_metrics();
    let loaded: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("model_version_loaded{") && l.ends_with(" 1"))
        .collect();
    assert_eq!(
        loaded,
        vec![r#"model_version_loaded{model="digits",model_version="21"} 1"#]
    );
    server.stop().await.unwrap();
}
