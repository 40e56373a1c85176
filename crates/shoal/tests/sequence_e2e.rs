//! Stateful serving end to end with real processes: `shoal up`, Silero
//! VAD pushed with `--state h=hn --state c=cn`, and a sequence streamed
//! through the gateway — by Triton's own HTTP client (`sequence_id`,
//! `sequence_start`, `sequence_end`, JSON and binary tensors) and by plain
//! HTTP — giving the numbers of running it in one process. With the
//! memory session store, killing the replica that holds a sequence ends
//! it with a clear error, never with wrong numbers.

use std::path::PathBuf;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use shoal_core::{Tensor, TensorData};
use shoal_runtime::tract::TractBackend;
use shoal_runtime::{LoadOptions, LoadedModel};
use shoal_testkit::{HttpClient, TempDir, VAD_FRAME, model_path, vad_frame};

mod common;

const FILE: &str = "silero_vad_16k_sequence.onnx";

/// Each frame's speech probability, the sequence run in this process.
fn reference(frames: &[Vec<f32>]) -> Vec<f32> {
    let bytes = std::fs::read(model_path(FILE)).unwrap();
    let state = [("h", "hn"), ("c", "cn")]
        .into_iter()
        .map(|(i, o)| (i.to_owned(), o.to_owned()))
        .collect();
    let options = LoadOptions::default().with_state(&state);
    let model = LoadedModel::load(&TractBackend::default(), &bytes, &options).unwrap();
    let steps = frames.iter().map(|f| {
        vec![Tensor::new("input", vec![1, VAD_FRAME], TensorData::Fp32(f.clone())).unwrap()]
    });
    model
        .run_sequence(steps)
        .unwrap()
        .into_iter()
        .map(|answer| match answer[0].data() {
            TensorData::Fp32(p) => p[0],
            other => panic!("speech_probs is {other:?}"),
        })
        .collect()
}

fn step_body(k: usize, parameters: Value) -> String {
    json!({
        "parameters": parameters,
        "inputs": [{"name": "input", "shape": [1, VAD_FRAME], "datatype": "FP32", "data": vad_frame(k)}],
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_through_the_gateway_and_their_loss_with_the_memory_store() {
    let tmp = TempDir::new("sequence-e2e");
    let (_up, gateway, control) = common::shoal_up(&tmp.join("fleet"), &["--replicas", "2"]);
    let file = model_path(FILE);
    let file = file.to_str().unwrap();
    // A declaration that does not fit the model is refused at push.
    let err = common::cli_fails(&control, &["model", "push", "vad", file, "--state", "x=hn"]);
    assert!(err.contains("no input \"x\""), "{err}");
    common::cli(
        &control,
        &[
            "model", "push", "vad", file, "--state", "h=hn", "--state", "c=cn",
        ],
    );
    let version = common::cli(&control, &["model", "show", "vad"]);
    assert_eq!(
        version["versions"][0]["state"],
        json!({"h": "hn", "c": "cn"}),
        "{version}"
    );
    common::cli(&control, &["deploy", "vad:1"]);
    let http = HttpClient::new();
    let infer = format!("{gateway}/v2/models/vad/infer");
    shoal_testkit::eventually(
        "vad served through the gateway",
        std::time::Duration::from_secs(30),
        || {
            let (http, infer) = (&http, &infer);
            async move {
                let params =
                    json!({"sequence_id": "probe", "sequence_start": true, "sequence_end": true});
                (http.post_json(infer, step_body(0, params)).await.status == 200).then_some(())
            }
        },
    )
    .await;

    // Triton's client, unchanged, gets the numbers of one process.
    let frames: Vec<Vec<f32>> = (0..24).map(vad_frame).collect();
    let expected = reference(&frames);
    let frames_path: PathBuf = tmp.join("frames.json");
    let expected_path: PathBuf = tmp.join("expected.json");
    std::fs::write(&frames_path, serde_json::to_vec(&frames).unwrap()).unwrap();
    std::fs::write(&expected_path, serde_json::to_vec(&expected).unwrap()).unwrap();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/tritonclient_sequence.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(gateway.trim_start_matches("http://"))
        .arg("vad")
        .arg(&frames_path)
        .arg(&expected_path)
        .arg("11")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Plain HTTP: half a sequence, then its replica dies. Every step
    // before answered with the right number; the next one is refused,
    // saying the state is gone, and never answered with other numbers.
    let mut holder = None;
    for (k, want) in expected.iter().enumerate().take(12) {
        let params = json!({"sequence_id": 77, "sequence_start": k == 0});
        let r = http.post_json(&infer, step_body(k, params)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let got = r.json()["outputs"][0]["data"][0].as_f64().unwrap();
        assert!(
            (got - f64::from(*want)).abs() <= 1e-5,
            "step {k}: {got} against {want}"
        );
        let replica = r.header("x-shoal-replica").unwrap().to_owned();
        assert!(
            holder.as_ref().is_none_or(|h| h == &replica),
            "every step on one replica"
        );
        holder = Some(replica);
    }
    let holder = holder.unwrap();
    let status = common::cli(&control, &["status"]);
    let pid = status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == holder.as_str())
        .and_then(|r| r["pid"].as_i64())
        .unwrap();
    kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGKILL).unwrap();
    let r = http
        .post_json(&infer, step_body(12, json!({"sequence_id": 77})))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let err = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        err.contains("sequence 77 of vad is not live") && err.contains("lost with the replica"),
        "{err}"
    );
    // Starting it again works at once, on a live replica.
    let r = http
        .post_json(
            &infer,
            step_body(0, json!({"sequence_id": 77, "sequence_start": true})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}
