//! Dynamic batching through a `shoal up` fleet: a version pushed with
//! `--max-batch` is recorded with its policy, rolled out, and served in
//! batches (the replicas' `model_batch_rows` histograms count them) to
//! concurrent clients through the gateway with no failed request; bad
//! batching flags are refused with the reason.

use std::sync::atomic::Ordering;
use std::time::Duration;

use shoal_testkit::{HttpClient, TempDir, eventually, metric_sum, model_path};

mod common;
use common::{Traffic, cli, cli_fails, converged_on, shoal_up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_pushed_with_batching_is_served_in_batches() {
    let tmp = TempDir::new("batching-e2e");
    let (_up, gateway, control) = shoal_up(&tmp.join("up"), &["--replicas", "2"]);
    let v2 = model_path("digits-v2.onnx");
    let v2 = v2.to_str().unwrap();

    // Bad flags: refused before anything is stored.
    for (flags, says) in [
        (&["--batch-delay", "1ms"][..], "--max-batch"),
        (&["--max-batch", "0"][..], "max batch 0"),
        (
            &["--max-batch", "8", "--preferred-batch", "16"][..],
            "preferred batch size 16",
        ),
        (
            &["--max-batch", "8", "--batch-delay", "5 parsecs"][..],
            "unknown unit",
        ),
    ] {
        let args = [&["model", "push", "digits", v2][..], flags].concat();
        let e = cli_fails(&control, &args);
        assert!(e.contains(says), "{flags:?}: {e}");
    }

    let pushed = cli(
        &control,
        &[
            "model",
            "push",
            "digits",
            v2,
            "--max-batch",
            "32",
            "--batch-delay",
            "1ms",
            "--preferred-batch",
            "8,16",
        ],
    );
    let batching = serde_json::json!({"max_batch": 32, "delay_us": 1000, "preferred": [8, 16]});
    assert_eq!(pushed["batching"], batching, "{pushed}");
    assert_eq!(pushed["version"], "2", "{pushed}");
    cli(&control, &["deploy", "digits:2"]);
    converged_on(&control, "digits:2", 2).await;

    let traffic = Traffic::start(&gateway, 16);
    eventually("1,000 answers", Duration::from_secs(60), || {
        let ok = traffic.ok.load(Ordering::Relaxed);
        async move { (ok >= 1000).then_some(()) }
    })
    .await;
    let (versions, failures) = traffic.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(versions.iter().all(|v| v == "2"));

    // The replicas ran them in batches.
    let status = cli(&control, &["status"]);
    let http = HttpClient::new();
    let (mut batches, mut rows) = (0.0, 0.0);
    for r in status["replicas"].as_array().unwrap() {
        let url = format!("http://{}/metrics", r["address"].as_str().unwrap());
        let reply = http.get(&url).await;
        let metrics = String::from_utf8_lossy(&reply.body);
        let labels = [("model", "digits"), ("model_version", "2")];
        batches += metric_sum(&metrics, "model_batch_rows_count", &labels);
        rows += metric_sum(&metrics, "model_batch_rows_sum", &labels);
    }
    assert!(batches > 0.0, "no batch ran");
    assert!(
        rows >= 1000.0 && rows >= batches,
        "{rows} rows in {batches} batches"
    );
    eprintln!("{rows} rows in {batches} batches");

    let shown = cli(&control, &["model", "show", "digits:2"]);
    assert_eq!(shown["batching"], batching, "{shown}");
}
