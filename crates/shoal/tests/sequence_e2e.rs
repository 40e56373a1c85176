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

/// `shoal up` with `args`, Silero VAD pushed as a stateful model and
/// deployed; the child, the gateway, the control plane and the infer URL.
async fn fleet_with_vad(
    tmp: &TempDir,
    args: &[&str],
) -> (shoal_testkit::ChildGuard, String, String, String) {
    let (up, gateway, control) = common::shoal_up(&tmp.join("fleet"), args);
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
    (up, gateway, control, infer)
}

/// The pid of the replica with `id`, from `shoal status`.
fn pid_of(control: &str, id: &str) -> i32 {
    let status = common::cli(control, &["status"]);
    let pid = status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .and_then(|r| r["pid"].as_i64())
        .unwrap();
    i32::try_from(pid).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_through_the_gateway_and_their_loss_with_the_memory_store() {
    let tmp = TempDir::new("sequence-e2e");
    let (_up, gateway, control, infer) = fleet_with_vad(&tmp, &["--replicas", "2"]).await;
    let http = HttpClient::new();

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

    // The README's demo: a sentence spoken by espeak-ng, streamed through
    // the gateway; the model hears speech where the sentence is, and none
    // in the silence around it.
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/vad_demo.py");
    let out = tokio::process::Command::new("python3")
        .arg(demo)
        .args(["--gateway", &gateway, "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let demo: Value = serde_json::from_slice(&out.stdout).unwrap();
    let spoken = (
        demo["spoken"][0].as_f64().unwrap(),
        demo["spoken"][1].as_f64().unwrap(),
    );
    let speech: Vec<(f64, f64)> = demo["speech"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_f64().unwrap(), s[1].as_f64().unwrap()))
        .collect();
    let heard: f64 = speech.iter().map(|(a, b)| b - a).sum();
    assert!(heard > 0.5 * (spoken.1 - spoken.0), "{demo}");
    assert!(
        speech
            .iter()
            .all(|(a, b)| *a >= spoken.0 - 0.1 && *b <= spoken.1 + 0.3),
        "speech heard in the silence: {demo}"
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
    kill(Pid::from_raw(pid_of(&control, &holder)), Signal::SIGKILL).unwrap();
    let r = http
        .post_json(&infer, step_body(12, json!({"sequence_id": 77})))
        .await;
    // 410 naming the replica that held it (the gateway remembers where each
    // sequence's last step went); a 400 saying the state may have been lost
    // when the replica restarted under its old id and was picked again
    // before the gateway saw the restart. Never a 200 with other numbers.
    let err = r.json()["error"].as_str().unwrap_or_default().to_owned();
    eprintln!("the step after the holder died: {} {err}", r.status);
    match r.status.as_u16() {
        410 => assert!(err.contains(&format!("held by replica {holder}")), "{err}"),
        400 => assert!(err.contains("lost with the replica"), "{err}"),
        other => panic!("step after the holder died answered {other}: {err}"),
    }
    // Starting it again works at once, on a live replica.
    let r = http
        .post_json(
            &infer,
            step_body(0, json!({"sequence_id": 77, "sequence_start": true})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// With Redis as the session store, a spoken sentence (espeak-ng, 16 kHz,
/// 576-sample steps) is streamed as one sequence and the replica holding
/// it is SIGKILLed halfway: every step still answers 200, on another
/// replica, and the whole series equals the one of a single uninterrupted
/// process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_sequence_survives_its_replica() {
    let tmp = TempDir::new("sequence-redis");
    let redis = shoal_testkit::RedisServer::start();
    let url = redis.url();
    let (_up, _gateway, control, infer) =
        fleet_with_vad(&tmp, &["--replicas", "3", "--session-store", &url]).await;
    let http = HttpClient::new();
    let clip = tmp.join("clip.json");
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/vad_demo.py");
    let out = tokio::process::Command::new("python3")
        .arg(demo)
        .arg("--save-frames")
        .arg(&clip)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frames: Vec<Vec<f32>> = serde_json::from_slice(&std::fs::read(&clip).unwrap()).unwrap();
    assert!(frames.len() > 100 && frames.iter().all(|f| f.len() == VAD_FRAME));
    let expected = reference(&frames);
    assert!(expected.iter().any(|p| *p > 0.5), "the sentence is heard");
    let half = frames.len() / 2;
    let last = frames.len() - 1;
    let mut served_by: Vec<String> = Vec::new();
    for (k, want) in expected.iter().enumerate() {
        if k == half {
            let holder = served_by.last().cloned().unwrap();
            kill(Pid::from_raw(pid_of(&control, &holder)), Signal::SIGKILL).unwrap();
        }
        let body = json!({
            "parameters": {"sequence_id": 4242, "sequence_start": k == 0, "sequence_end": k == last},
            "inputs": [{"name": "input", "shape": [1, VAD_FRAME], "datatype": "FP32", "data": frames[k]}],
        });
        let r = http.post_json(&infer, body.to_string()).await;
        assert_eq!(r.status, 200, "step {k}: {}", r.text());
        let got = r.json()["outputs"][0]["data"][0].as_f64().unwrap();
        assert!(
            (got - f64::from(*want)).abs() <= 1e-5,
            "step {k}: {got} against {want}"
        );
        served_by.push(r.header("x-shoal-replica").unwrap().to_owned());
    }
    assert_ne!(
        served_by[half - 1],
        served_by[half],
        "another replica took over: {served_by:?}"
    );
}
