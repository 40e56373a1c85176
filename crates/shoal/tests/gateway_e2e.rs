//! The gateway with real processes: a replica SIGKILLed or hung under a
//! steady stream costs no request (the retried answers name it); sticky sessions; weighted splits that
//! keep users on one version; shadow mirroring; rate limits; serving on with
//! the control plane gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use shoal_testkit::{
    ChildGuard, HttpClient, Samples, TempDir, eventually, metric_sum, model_path, spawn_server,
};
use tokio::sync::Mutex;

mod common;
use common::{cli, shoal};

struct Fleet {
    _tmp: TempDir,
    control: Option<ChildGuard>,
    control_url: String,
    replicas: Vec<(ChildGuard, String)>,
    _gateway: ChildGuard,
    gateway: String,
    http: HttpClient,
}

fn replica_id(addr: &str, status: &Value) -> String {
    let host = addr.trim_start_matches("http://");
    status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == host)
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .unwrap()
}

async fn fleet(replicas: usize, gateway_args: &[&str]) -> Fleet {
    let tmp = TempDir::new("gateway-e2e");
    let (control, control_url) = common::control(&tmp.join("control"), "127.0.0.1:0", &[], &[]);
    let replicas: Vec<(ChildGuard, String)> = (0..replicas)
        .map(|i| {
            common::replica(
                &control_url,
                &tmp.join(&format!("r{i}")),
                &["--threads", "1"],
            )
        })
        .collect();
    let mut args = vec!["--control", control_url.as_str()];
    args.extend_from_slice(gateway_args);
    let (gateway, gateway_url) = common::gateway(&tmp.join("gateway"), &args);
    let f = Fleet {
        control: Some(control),
        control_url,
        replicas,
        _gateway: gateway,
        gateway: gateway_url,
        http: HttpClient::new(),
        _tmp: tmp,
    };
    cli(
        &f.control_url,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v1.onnx").to_str().unwrap(),
        ],
    );
    cli(&f.control_url, &["deploy", "digits:1"]);
    f.wait_serving("digits:1", f.replicas.len()).await;
    f
}

impl Fleet {
    /// Waits until the gateway routes `key` to `n` replicas.
    async fn wait_serving(&self, key: &str, n: usize) {
        let (model, version) = key.split_once(':').unwrap();
        let url = format!(
            "{}/v2/models/{model}/versions/{version}/infer",
            self.gateway
        );
        let http = self.http.clone();
        eventually(
            &format!("the gateway to route {key} to {n} replicas"),
            Duration::from_secs(30),
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let mut seen = BTreeSet::new();
                    for i in 0..(20 * n) {
                        let r = http
                            .send(
                                http::Method::POST,
                                &url,
                                &[("x-session-id", &format!("probe-{i}"))],
                                Samples::load().request(0..1),
                            )
                            .await
                            .ok()?;
                        if r.status != 200 {
                            return None;
                        }
                        seen.insert(r.header("x-shoal-replica")?.to_owned());
                    }
                    (seen.len() >= n).then_some(())
                }
            },
        )
        .await;
    }

    async fn infer(&self, headers: &[(&str, &str)]) -> Result<(String, String), String> {
        let answer = self.answer(headers).await?;
        Ok((answer.replica, answer.version))
    }

    /// An inference's answer through the gateway, or its failure.
    async fn answer(&self, headers: &[(&str, &str)]) -> Result<Answered, String> {
        let r = self
            .http
            .send(
                http::Method::POST,
                &format!("{}/v2/models/digits/infer", self.gateway),
                headers,
                Samples::load().request(0..1),
            )
            .await?;
        if r.status != 200 {
            return Err(format!("{}: {}", r.status, r.text()));
        }
        let header = |name| r.header(name).unwrap_or("").to_owned();
        Ok(Answered {
            replica: header("x-shoal-replica"),
            version: header("x-shoal-model-version"),
            retried_from: r.header("x-shoal-retried-from").map(str::to_owned),
        })
    }
}

/// Who answered an inference, with which version, and which replicas
/// failed it first.
#[derive(Debug, Clone)]
struct Answered {
    replica: String,
    version: String,
    retried_from: Option<String>,
}

/// Client tasks, the failures they saw, who answered, and the answers
/// that were retried.
type Stream = (
    Vec<tokio::task::JoinHandle<()>>,
    Arc<Mutex<Vec<String>>>,
    Arc<Mutex<Vec<String>>>,
    Arc<Mutex<Vec<Answered>>>,
);

/// Runs `clients` loops against the gateway until `stop`, recording who
/// answered and every failure.
fn steady_stream(f: &Arc<Fleet>, clients: usize, stop: Arc<AtomicBool>) -> Stream {
    let failures = Arc::new(Mutex::new(Vec::new()));
    let answered = Arc::new(Mutex::new(Vec::new()));
    let retried = Arc::new(Mutex::new(Vec::new()));
    let tasks = (0..clients)
        .map(|_| {
            let (f, stop, failures, answered, retried) = (
                f.clone(),
                stop.clone(),
                failures.clone(),
                answered.clone(),
                retried.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match f.answer(&[]).await {
                        Ok(answer) => {
                            answered.lock().await.push(answer.replica.clone());
                            if answer.retried_from.is_some() {
                                retried.lock().await.push(answer);
                            }
                        }
                        Err(e) => failures.lock().await.push(e),
                    }
                }
            })
        })
        .collect();
    (tasks, failures, answered, retried)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_hung_replicas_cost_no_request() {
    let f = Arc::new(fleet(3, &["--request-timeout-ms", "500"]).await);
    let status = cli(&f.control_url, &["status"]);
    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, failures, answered, retried) = steady_stream(&f, 4, stop.clone());

    // SIGKILL one replica mid-stream.
    eventually("traffic to flow", Duration::from_secs(10), || {
        let answered = answered.clone();
        async move { (answered.lock().await.len() >= 100).then_some(()) }
    })
    .await;
    let killed = replica_id(&f.replicas[0].1, &status);
    f.replicas[0].0.signal(Signal::SIGKILL);
    let after_kill = answered.lock().await.len();
    eventually(
        "300 more answers after the kill",
        Duration::from_secs(20),
        || {
            let answered = answered.clone();
            async move { (answered.lock().await.len() >= after_kill + 300).then_some(()) }
        },
    )
    .await;
    // The dead replica stops being chosen almost at once: of the last 200
    // answers, none came from it.
    let recent: Vec<String> = answered
        .lock()
        .await
        .iter()
        .rev()
        .take(200)
        .cloned()
        .collect();
    assert!(
        !recent.contains(&killed),
        "the killed replica still answered"
    );

    // SIGSTOP another: requests to it time out and are retried elsewhere;
    // it is ejected at its first timeout.
    let hung = replica_id(&f.replicas[1].1, &status);
    f.replicas[1].0.signal(Signal::SIGSTOP);
    let metrics_url = format!("{}/metrics", f.gateway);
    let http = f.http.clone();
    let needle = format!("gateway_endpoint_ejections_total{{replica_id=\"{hung}\"");
    eventually(
        "the hung replica to be ejected",
        Duration::from_secs(10),
        || {
            let (http, url, needle) = (http.clone(), metrics_url.clone(), needle.clone());
            async move { http.get(&url).await.text().contains(&needle).then_some(()) }
        },
    )
    .await;
    // Counted, not timed: each ejection cost at most the requests that were
    // on their way to it then (one per client), each retried elsewhere.
    let metrics = http.get(&metrics_url).await.text();
    let ejections = metric_sum(
        &metrics,
        "gateway_endpoint_ejections_total",
        &[("replica_id", &hung)],
    );
    let timeouts = metric_sum(&metrics, "gateway_retries_total", &[("reason", "timeout")]);
    assert!(
        ejections >= 1.0 && timeouts <= 4.0 * ejections,
        "{timeouts} requests timed out on the hung replica over {ejections} ejections"
    );
    let after_stop = answered.lock().await.len();
    eventually(
        "200 more answers while one replica hangs",
        Duration::from_secs(20),
        || {
            let answered = answered.clone();
            async move { (answered.lock().await.len() >= after_stop + 200).then_some(()) }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    f.replicas[1].0.signal(Signal::SIGCONT);
    let failures = failures.lock().await;
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    let metrics = f.http.get(&metrics_url).await.text();
    assert!(
        metrics.contains("gateway_retries_total"),
        "retries happened and are counted"
    );
    // Retried answers say so: they name the replicas that failed them
    // (the killed and the hung one only), never the one that answered.
    // Requests that timed out on the hung replica before it was ejected
    // are among them (it takes a health check 500 ms to give up on it, by
    // when the stream has sent it many).
    let retried = retried.lock().await;
    for answer in retried.iter() {
        let from = answer.retried_from.as_deref().unwrap();
        for failed in from.split(',') {
            assert!(
                failed == killed || failed == hung,
                "{answer:?}: retried from a replica that did not fail"
            );
        }
        assert!(
            !from.split(',').any(|failed| failed == answer.replica),
            "{answer:?}: answered by a replica it was retried from"
        );
    }
    assert!(
        retried
            .iter()
            .any(|answer| answer.retried_from.as_deref() == Some(hung.as_str())),
        "no answer said it was retried from the hung replica: {retried:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_splits_shadows_and_no_control_plane() {
    let mut f = fleet(3, &[]).await;

    // Sticky sessions: each key stays on one replica.
    let mut owner = BTreeMap::new();
    for k in 0..30 {
        let key = format!("session-{k}");
        let mut seen = BTreeSet::new();
        for _ in 0..4 {
            seen.insert(f.infer(&[("x-session-id", &key)]).await.unwrap().0);
        }
        assert_eq!(seen.len(), 1, "{key} moved between replicas: {seen:?}");
        owner.insert(key, seen.into_iter().next().unwrap());
    }
    assert!(
        owner.values().collect::<BTreeSet<_>>().len() >= 2,
        "sessions spread over replicas"
    );

    // v2 beside v1, 80/20 by user, and a 100 % shadow of v2.
    cli(
        &f.control_url,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v2.onnx").to_str().unwrap(),
        ],
    );
    cli(
        &f.control_url,
        &[
            "traffic",
            "digits",
            "--weights",
            "1=80,2=20",
            "--shadow",
            "2@100",
        ],
    );
    f.wait_serving("digits:2", 3).await;
    let mut per_user = BTreeMap::new();
    for u in 0..400 {
        let user = format!("user-{u}");
        let (_, v) = f.infer(&[("x-user-id", &user)]).await.unwrap();
        per_user.insert(user, v);
    }
    let on_two = per_user.values().filter(|v| *v == "2").count();
    assert!(
        (50..=110).contains(&on_two),
        "{on_two} of 400 users on v2 (expected about 80)"
    );
    for (user, v) in per_user.iter().take(50) {
        assert_eq!(
            &f.infer(&[("x-user-id", user)]).await.unwrap().1,
            v,
            "{user} changed version"
        );
    }
    let metrics_url = format!("{}/metrics", f.gateway);
    let http = f.http.clone();
    eventually(
        "mirrored requests to succeed",
        Duration::from_secs(10),
        || {
            let (http, url) = (http.clone(), metrics_url.clone());
            async move {
                http.get(&url)
                    .await
                    .text()
                    .contains("gateway_shadow_requests_total{model=\"digits\",outcome=\"success\"}")
                    .then_some(())
            }
        },
    )
    .await;

    // Triton's own client through the gateway, with JSON and binary
    // tensors: the gateway forwards binary bodies and compares binary
    // answers with the shadow's. All traffic on v1 (the check compares
    // answers between requests), v2 still shadowing every request.
    cli(
        &f.control_url,
        &[
            "traffic",
            "digits",
            "--weights",
            "1=100",
            "--shadow",
            "2@100",
        ],
    );
    let probe = &f;
    eventually(
        "all traffic on v1",
        Duration::from_secs(10),
        || async move {
            for _ in 0..20 {
                if probe.infer(&[]).await.ok()?.1 != "1" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let rows = |metrics: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("gateway_shadow_rows_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = rows(&f.http.get(&metrics_url).await.text());
    let samples = Samples::load();
    #[allow(clippy::cast_precision_loss)]
    let min_accuracy = samples.accuracy["digits-v1"] - 1.0 / samples.labels.len() as f64 - 1e-9;
    shoal_testkit::tritonclient_check(
        f.gateway.trim_start_matches("http://"),
        "digits",
        min_accuracy,
    )
    .await;
    let n = samples.labels.len() as u64;
    let http = f.http.clone();
    eventually(
        "the full-batch requests (JSON and binary) to be compared with the shadow",
        Duration::from_secs(10),
        || {
            let (http, url) = (http.clone(), metrics_url.clone());
            async move { (rows(&http.get(&url).await.text()) >= before + 3 * n).then_some(()) }
        },
    )
    .await;

    // A replica leaves: only its sessions move.
    let status = cli(&f.control_url, &["status"]);
    let leaving = replica_id(&f.replicas[2].1, &status);
    let (gone, _) = f.replicas.remove(2);
    gone.signal(Signal::SIGKILL);
    drop(gone);
    for (key, before) in &owner {
        // The first request may still try the dead replica and be retried.
        let now = f.infer(&[("x-session-id", key)]).await.unwrap().0;
        if before != &leaving {
            let now = f.infer(&[("x-session-id", key)]).await.unwrap().0;
            assert_eq!(&now, before, "{key} moved although its replica stayed");
        } else {
            assert_ne!(now, leaving);
        }
    }

    // The control plane goes away: the gateway keeps serving.
    let control = f.control.take().unwrap();
    control.signal(Signal::SIGKILL);
    drop(control);
    for _ in 0..50 {
        f.infer(&[]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_rate_limits() {
    let tmp = TempDir::new("gateway-keys");
    let v1 = format!("digits={}", model_path("digits-v1.onnx").display());
    let (_replica, replica) = spawn_server(
        shoal(),
        &[
            "replica",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            tmp.join("r").to_str().unwrap(),
            "--model",
            &v1,
        ],
    );
    let (_gateway, gateway) = spawn_server(
        shoal(),
        &[
            "gateway",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            tmp.join("g").to_str().unwrap(),
            "--replica",
            &replica,
            "--api-key",
            "team-a:s3cret",
            "--rate-limit",
            "5",
            "--burst",
            "5",
            "--health-interval-ms",
            "100",
        ],
    );
    let http = HttpClient::new();
    let url = format!("http://{gateway}/v2/models/digits/infer");
    let body = Samples::load().request(0..1);
    let r = http.post_json(&url, body.clone()).await;
    assert_eq!(r.status, 401);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("an API key is required")
    );
    let (http2, url2, body2) = (http.clone(), url.clone(), body.clone());
    eventually(
        "the static replica to be routable",
        Duration::from_secs(10),
        || {
            let (http, url, body) = (http2.clone(), url2.clone(), body2.clone());
            async move {
                let r = http
                    .send(http::Method::POST, &url, &[("x-api-key", "s3cret")], body)
                    .await
                    .ok()?;
                (r.status == 200).then_some(())
            }
        },
    )
    .await;
    let mut limited = None;
    for _ in 0..20 {
        let r = http
            .send(
                http::Method::POST,
                &url,
                &[("authorization", "Bearer s3cret")],
                body.clone(),
            )
            .await
            .unwrap();
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 200);
    }
    let r = limited.expect("the rate limit answered 429");
    assert!(r.header("retry-after").is_some());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("rate limit exceeded for team-a")
    );
    // Bad requests are refused at the gateway with a clear message.
    let r = http
        .send(
            http::Method::POST,
            &url,
            &[("x-api-key", "s3cret")],
            "{\"inputs\": 3}",
        )
        .await
        .unwrap();
    assert!(r.status == 400 || r.status == 429, "{}", r.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_cuts_off_a_slow_replica() {
    // Two standalone replicas, one with a latency tail: 3 s added to 6 %
    // of its requests (3 % of all). A gateway hedging after the observed
    // p95 answers every request well before the tail would, and counts its
    // hedges. The tail is long so that a loaded machine (where the p95
    // itself may reach tens of milliseconds) cannot be mistaken for it.
    let tmp = TempDir::new("gateway-hedge");
    let v1 = format!("digits={}", model_path("digits-v1.onnx").display());
    let (_fast, fast) = spawn_server(
        shoal(),
        &[
            "replica",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            tmp.join("f").to_str().unwrap(),
            "--model",
            &v1,
        ],
    );
    // Fault injection is a flag of its own, behind an admin token.
    let tokens = tmp.join("admin-tokens");
    std::fs::write(&tokens, "shoal_hedge_test\n").unwrap();
    let (_slow, slow) = spawn_server(
        shoal(),
        &[
            "replica",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            tmp.join("s").to_str().unwrap(),
            "--model",
            &v1,
            "--allow-fault-injection",
            "--admin-token-file",
            tokens.to_str().unwrap(),
        ],
    );
    let http = HttpClient::new();
    let r = http
        .send(
            http::Method::PUT,
            &format!("http://{slow}/admin/faults/digits/1"),
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer shoal_hedge_test"),
            ],
            serde_json::json!({"latency_ms": 3000, "latency_rate": 0.06}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // Round robin, so the slow replica keeps getting its share.
    let (_gateway, gateway) = spawn_server(
        shoal(),
        &[
            "gateway",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            tmp.join("g").to_str().unwrap(),
            "--replica",
            &fast,
            "--replica",
            &slow,
            "--hedge",
            "--balance",
            "round-robin",
            "--health-interval-ms",
            "100",
            // Health checks read the replicas' admin listing.
            "--token",
            "shoal_hedge_test",
        ],
    );
    let url = format!("http://{gateway}/v2/models/digits/infer");
    let (http2, url2) = (http.clone(), url.clone());
    eventually(
        "both replicas to be routable",
        Duration::from_secs(10),
        || {
            let (http, url) = (http2.clone(), url2.clone());
            async move {
                let m = http
                    .get(&url.replace("/v2/models/digits/infer", "/metrics"))
                    .await
                    .text();
                m.contains("gateway_endpoints{state=\"available\"} 2")
                    .then_some(())
            }
        },
    )
    .await;
    // Learn the p95: the first requests include slow ones.
    for _ in 0..100 {
        assert_eq!(
            http.post_json(&url, Samples::load().request(0..1))
                .await
                .status,
            200
        );
    }
    // A hedge that beats the slow replica says so in its answer; the
    // policy's timing (fired at the p95, loser cancelled) is unit-tested
    // with paused time in shoal-gateway.
    let mut hedge_wins = 0;
    for _ in 0..400 {
        let r = http.post_json(&url, Samples::load().request(0..1)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        if let Some(from) = r.header("x-shoal-hedged-from") {
            let by = r
                .header("x-shoal-replica")
                .expect("the answering replica is named");
            assert_ne!(from, by, "a hedge answers from another replica");
            hedge_wins += 1;
        }
    }
    let metrics = http
        .get(&url.replace("/v2/models/digits/infer", "/metrics"))
        .await
        .text();
    let hedges = metric_sum(&metrics, "gateway_hedges_total", &[]);
    assert!(hedges >= 3.0, "only {hedges} hedges");
    // About 3 % of requests meet the 3 s fault; each is hedged at the p95
    // (milliseconds) and the fast replica's answer wins.
    assert!(
        hedge_wins >= 3,
        "only {hedge_wins} answers came from a hedge"
    );
}
