//! Shadow deployments, bandits and A/B tests with real processes and real
//! traffic through a gateway: the shadow's measured agreement with the
//! primary matches the agreement of the two models on the held-out
//! samples while users only ever see the primary; a bandit shifts traffic
//! to the version that earns more reward; an A/B test reports intervals
//! and significance and promotes the better version; a canary judged on
//! reward as well as errors and latency is rolled back for earning less.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use shoal_testkit::{ChildGuard, HttpClient, Samples, TempDir, eventually, model_path};

mod common;
use common::cli;

async fn status(control: &str) -> Value {
    let c = control.to_owned();
    tokio::task::spawn_blocking(move || cli(&c, &["rollout", "status", "digits"]))
        .await
        .unwrap()
}

/// The label each row of an answer predicts.
fn labels(answer: &Value) -> Vec<i64> {
    let outputs = answer["outputs"].as_array().unwrap();
    let label = outputs.iter().find(|o| o["name"] == "label").unwrap();
    label["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

struct Fleet {
    _children: Vec<ChildGuard>,
    control: String,
    gateway: String,
    _tmp: TempDir,
}

async fn fleet() -> Fleet {
    let tmp = TempDir::new("experiment-e2e");
    let (control_child, control) = common::control(&tmp.join("control"), "127.0.0.1:0", &[], &[]);
    let mut children = vec![control_child];
    for i in 0..2 {
        children.push(common::replica(&control, &tmp.join(&format!("r{i}")), &[]).0);
    }
    let (gateway_child, gateway) = common::gateway(&tmp.join("gw"), &["--control", &control]);
    children.push(gateway_child);
    let v1 = model_path("digits-v1.onnx");
    let v2 = model_path("digits-v2.onnx");
    cli(&control, &["model", "push", "digits", v1.to_str().unwrap()]);
    cli(&control, &["model", "push", "digits", v2.to_str().unwrap()]);
    cli(&control, &["deploy", "digits:1"]);
    common::digits_rollout_until(&control, "version 1 to be deployed", |s| {
        s["state"] == "promoted"
    })
    .await;
    shoal_testkit::until_routed(&gateway, "digits").await;
    Fleet {
        _children: children,
        control,
        gateway,
        _tmp: tmp,
    }
}

/// Sends one request with `id` (and `user`, as the split header) and
/// returns the version that answered.
async fn predict(http: &HttpClient, gateway: &str, id: &str, user: Option<&str>) -> String {
    let samples = Samples::load();
    let mut body: Value = serde_json::from_str(&samples.request(0..1)).unwrap();
    body["id"] = json!(id);
    let mut headers = vec![("content-type", "application/json")];
    if let Some(user) = user {
        headers.push(("x-user-id", user));
    }
    let r = http
        .send(
            http::Method::POST,
            &format!("{gateway}/v2/models/digits/infer"),
            &headers,
            body.to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("x-shoal-model-version").unwrap().to_owned()
}

async fn feedback(http: &HttpClient, gateway: &str, body: Value) -> shoal_testkit::Reply {
    http.post_json(
        &format!("{gateway}/v2/models/digits/feedback"),
        body.to_string(),
    )
    .await
}

/// The reward a simulated user gives each version's predictions.
fn reward(version: &str, rng: &mut StdRng) -> f64 {
    let p = if version == "2" { 0.8 } else { 0.3 };
    if rng.random::<f64>() < p { 1.0 } else { 0.0 }
}

/// Shadow: every request is mirrored to version 2 and compared, in the
/// rollout view and as metrics; an abort leaves version 1 alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_mirrors_every_request_and_compares_the_answers() {
    let f = fleet().await;
    let (control, gateway) = (f.control.as_str(), f.gateway.as_str());
    let http = HttpClient::new();
    let samples = Samples::load();

    // 1. Shadow: every request is mirrored to version 2 and compared.
    cli(
        control,
        &[
            "deploy",
            "digits:2",
            "--strategy",
            "shadow",
            "--percent",
            "100",
        ],
    );
    common::digits_rollout_until(control, "mirroring to start", |s| s["step"] == 1).await;
    let infer = format!("{gateway}/v2/models/digits/infer");
    // Until the gateway has the shadow policy, requests are not mirrored:
    // probe one request at a time, each given ample time (gateways report
    // every second) to show up as compared, so that the baseline holds
    // every mirrored probe.
    let mut before = Value::Null;
    for _ in 0..20 {
        assert_eq!(
            http.post_json(&infer, samples.request(0..1)).await.status,
            200
        );
        let mut s = Value::Null;
        for _ in 0..40 {
            s = status(control).await;
            if s["shadow"]["compared"].as_u64().unwrap() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if s["shadow"]["compared"].as_u64().unwrap() > 0 {
            before = s["shadow"].clone();
            break;
        }
    }
    assert!(before.is_object(), "no mirrored request was ever compared");
    let n = samples.inputs.len();
    let mut correct = 0;
    for start in (0..n).step_by(50) {
        let r = http
            .post_json(&infer, samples.request(start..(start + 50).min(n)))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("x-shoal-model-version"),
            Some("1"),
            "users must only see the primary"
        );
        correct += labels(&r.json())
            .iter()
            .zip(&samples.labels[start..])
            .filter(|(a, b)| a == b)
            .count();
    }
    #[allow(clippy::cast_precision_loss)]
    let tolerance = 2.0 / n as f64 + 1e-9;
    #[allow(clippy::cast_precision_loss)]
    let accuracy = correct as f64 / n as f64;
    assert!(
        (accuracy - samples.accuracy["digits-v1"]).abs() <= tolerance,
        "users saw accuracy {accuracy}, not version 1's"
    );
    let base_rows = before["rows"].as_u64().unwrap();
    let s = common::digits_rollout_until(control, "the shadow comparisons to arrive", |s| {
        s["shadow"]["rows"].as_u64().unwrap() >= base_rows + n as u64
    })
    .await;
    let shadow = &s["shadow"];
    let agreeing = |v: &Value| v["agreement"].as_f64().unwrap() * v["rows"].as_f64().unwrap();
    #[allow(clippy::cast_precision_loss)]
    let agreement = (agreeing(shadow) - agreeing(&before)) / n as f64;
    assert!(
        (agreement - samples.agreement_v1_v2).abs() <= tolerance,
        "shadow agreement {agreement}, offline {}: {s}",
        samples.agreement_v1_v2
    );
    assert_eq!(
        shadow["rows"].as_u64().unwrap(),
        base_rows + n as u64,
        "{s}"
    );
    assert_eq!(
        shadow["candidate_errors"],
        0,
        "{s} {}",
        http.get(&format!("{gateway}/metrics")).await.text()
    );
    assert!(shadow["max_abs_diff"].as_f64().unwrap() > 0.0, "{s}");
    assert!(shadow["latency_diff_ms"].is_number(), "{s}");
    // The same comparison, as metrics.
    let metrics = http.get(&format!("{gateway}/metrics")).await.text();
    let metric = |line: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .unwrap_or_else(|| panic!("no {line} in {metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    let rows = metric("gateway_shadow_rows_total{model=\"digits\",agreement=\"agree\"}")
        + metric("gateway_shadow_rows_total{model=\"digits\",agreement=\"disagree\"}");
    assert_eq!(rows, shadow["rows"].as_f64().unwrap());
    assert!(metric("gateway_shadow_max_abs_diff{model=\"digits\"}") > 0.0);
    let aborted = cli(control, &["rollout", "abort", "digits"]);
    assert_eq!(aborted["targets"], json!([{"version": "1", "weight": 100}]));
    assert!(aborted["shadow"].is_null(), "{aborted}");
}

/// Bandit: version 2 earns more reward and gets most of the traffic;
/// feedback that cannot be credited is refused and harms nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandit_sends_most_traffic_to_the_version_that_earns_more() {
    let f = fleet().await;
    let (control, gateway) = (f.control.as_str(), f.gateway.as_str());
    let http = HttpClient::new();
    let mut rng = StdRng::seed_from_u64(7);

    // 2. Bandit: version 2 earns more reward and gets most of the traffic.
    cli(
        control,
        &["deploy", "digits:2", "--strategy", "bandit", "--floor", "5"],
    );
    let mut i = 0;
    let s = loop {
        let id = format!("bandit-{i}");
        let version = predict(&http, gateway, &id, None).await;
        let r = feedback(
            &http,
            gateway,
            json!({"id": id, "reward": reward(&version, &mut rng)}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["version"], version.as_str());
        i += 1;
        if i % 50 == 0 {
            let s = status(control).await;
            if s["weights"]["2"].as_u64().unwrap_or(0) > 70 {
                break s;
            }
        }
        assert!(
            i < 4000,
            "the bandit never favoured version 2: {}",
            status(control).await
        );
    };
    assert_eq!(s["strategy"], "bandit");
    assert!(
        s["weights"]["1"].as_u64().unwrap() >= 5,
        "the floor keeps exploring: {s}"
    );
    let arms = s["arms"].as_array().unwrap();
    assert_eq!(arms.len(), 2, "{s}");
    assert!(arms.iter().all(|a| a["count"].as_u64().unwrap() > 0), "{s}");

    // Feedback that cannot be credited is refused and harms nothing.
    let r = feedback(&http, gateway, json!({"id": "never-sent", "reward": 1})).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("never-sent"), "{}", r.text());
    let r = feedback(&http, gateway, json!({"reward": 1})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = feedback(&http, gateway, json!({"id": "bandit-0", "reward": "good"})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = http
        .post_json(&format!("{gateway}/v2/models/digits/feedback"), "{not json")
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let metrics = http.get(&format!("{gateway}/metrics")).await.text();
    assert!(
        metrics.contains("gateway_feedback_total{model=\"digits\",model_version=\"2\"}"),
        "{metrics}"
    );
    cli(control, &["rollout", "abort", "digits"]);
}

/// A/B test by user: a fixed 50/50 split, intervals, significance, and
/// the better version promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ab_test_splits_by_user_and_promotes_the_better_version() {
    let f = fleet().await;
    let (control, gateway) = (f.control.as_str(), f.gateway.as_str());
    let http = HttpClient::new();
    let mut rng = StdRng::seed_from_u64(7);

    // 3. A/B test by user: a fixed 50/50 split, intervals, significance,
    // and the better version promoted.
    cli(control, &["deploy", "digits:2", "--strategy", "ab"]);
    // Until the gateway has the split, every user gets version 1.
    eventually(
        "the gateway to split users",
        Duration::from_secs(20),
        || {
            let http = http.clone();
            async move {
                for k in 0..20 {
                    let user = format!("probe-{k}");
                    if predict(&http, gateway, &format!("probe-{k}"), Some(&user)).await == "2" {
                        return Some(());
                    }
                }
                None
            }
        },
    )
    .await;
    let mut i = 0;
    let s = loop {
        let user = format!("user-{i}");
        let version = predict(&http, gateway, &format!("ab-{i}"), Some(&user)).await;
        // A user stays on one version.
        assert_eq!(
            predict(&http, gateway, &format!("ab-{i}-again"), Some(&user)).await,
            version
        );
        let r = feedback(
            &http,
            gateway,
            json!({"user": user, "reward": reward(&version, &mut rng)}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        i += 1;
        if i % 50 == 0 {
            let s = status(control).await;
            let counts: Vec<u64> = s["arms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["count"].as_u64().unwrap())
                .collect();
            if counts.iter().all(|c| *c >= 60) {
                break s;
            }
        }
        assert!(
            i < 2000,
            "the A/B test never collected enough feedback: {}",
            status(control).await
        );
    };
    assert_eq!(s["strategy"], "ab");
    assert_eq!(
        s["weights"],
        json!({"1": 50, "2": 50}),
        "A/B splits stay fixed: {s}"
    );
    assert_eq!(s["significant"], true, "{s}");
    for arm in s["arms"].as_array().unwrap() {
        let (mean, lo, hi) = (
            arm["mean"].as_f64().unwrap(),
            arm["ci95"][0].as_f64().unwrap(),
            arm["ci95"][1].as_f64().unwrap(),
        );
        assert!(lo < mean && mean < hi, "{arm}");
    }
    let d = cli(control, &["rollout", "promote", "digits"]);
    assert_eq!(
        d["targets"],
        json!([{"version": "2", "weight": 100}]),
        "{d}"
    );
    assert_eq!(
        cli(control, &["model", "show", "digits:2"])["status"],
        "production"
    );
}

/// A canary judged on the business metric too: version 1 is as fast and
/// error-free as version 2, but earns less reward, so it is rolled back
/// naming the reward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_earns_less_reward_is_rolled_back() {
    let f = fleet().await;
    let (control, gateway) = (f.control.as_str(), f.gateway.as_str());
    let http = HttpClient::new();
    let mut rng = StdRng::seed_from_u64(7);
    // The baseline is version 2 (the one that earns more).
    cli(control, &["deploy", "digits:2"]);
    common::digits_rollout_until(control, "version 2 to be deployed", |s| {
        s["state"] == "promoted" && s["to"] == "2"
    })
    .await;

    // 4. A canary judged on the business metric too: version 1 is as fast
    // and error-free as version 2, but earns less reward, so it is rolled
    // back naming the reward.
    cli(
        control,
        &[
            "deploy",
            "digits:1",
            "--strategy",
            "canary",
            "--steps",
            "50,100",
            "--bake",
            "1s",
            "--min-requests",
            "20",
            "--min-p99-increase",
            "25ms",
            "--min-reward-ratio",
            "0.9",
        ],
    );
    let mut i = 0;
    let s = loop {
        let id = format!("canary-{i}");
        let version = predict(&http, gateway, &id, None).await;
        let r = feedback(
            &http,
            gateway,
            json!({"id": id, "reward": reward(&version, &mut rng)}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        i += 1;
        if i % 25 == 0 {
            let s = status(control).await;
            if s["state"] != "progressing" && s["state"] != "holding" {
                break s;
            }
        }
        assert!(
            i < 3000,
            "the canary was never judged: {}",
            status(control).await
        );
    };
    assert_eq!(s["state"], "rolled_back", "{s}");
    assert!(s["reason"].as_str().unwrap().contains("mean reward"), "{s}");
    let d = http
        .get(&format!("{control}/api/v1/deployments/digits"))
        .await
        .json();
    assert_eq!(
        d["targets"],
        json!([{"version": "2", "weight": 100}]),
        "{d}"
    );
}
