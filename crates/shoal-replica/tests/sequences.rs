//! Sequences of a stateful model (Silero VAD, state `h` ← `hn`, `c` ←
//! `cn`) through the replica's HTTP surface, in-process: the steps of a
//! sequence give the same numbers as carrying the state by hand; every
//! error case says what is wrong; steps of one sequence are serialised;
//! a sequence stays on the version it started on.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use shoal_core::{ModelName, Tensor, TensorData, Version};
use shoal_replica::sequences::SequenceLimits;
use shoal_replica::store::InstallPolicy;
use shoal_replica::{ArtifactSource, LoadSpec, Replica, ReplicaConfig};
use shoal_runtime::tract::TractBackend;
use shoal_runtime::{LoadOptions, LoadedModel};
use shoal_testkit::{call_router, model_path};

const FILE: &str = "silero_vad_16k_sequence.onnx";
const FRAME: usize = shoal_testkit::VAD_FRAME;

fn state() -> BTreeMap<String, String> {
    [("h", "hn"), ("c", "cn")]
        .into_iter()
        .map(|(i, o)| (i.to_owned(), o.to_owned()))
        .collect()
}

fn frame(k: usize) -> Vec<f32> {
    shoal_testkit::vad_frame(k)
}

/// The speech probability of each frame, state carried by hand through
/// one model: what every sequence must reproduce.
fn reference(frames: usize) -> Vec<f32> {
    reference_of(&(0..frames).map(frame).collect::<Vec<_>>())
}

/// The same for any frames.
fn reference_of(frames: &[Vec<f32>]) -> Vec<f32> {
    let bytes = std::fs::read(model_path(FILE)).unwrap();
    let options = LoadOptions::default().with_state(&state());
    let model = LoadedModel::load(&TractBackend::default(), &bytes, &options).unwrap();
    let steps = frames.iter().map(|samples| {
        vec![Tensor::new("input", vec![1, FRAME], TensorData::Fp32(samples.clone())).unwrap()]
    });
    model
        .run_sequence(steps)
        .unwrap()
        .iter()
        .map(|answer| {
            let TensorData::Fp32(p) = answer[0].data() else {
                panic!("speech_probs is FP32")
            };
            p[0]
        })
        .collect()
}

async fn replica(limits: SequenceLimits, versions: &[&str]) -> (Arc<Replica>, Router) {
    replica_on(None, limits, versions).await
}

/// A replica whose sequences' state is also in the Redis at `store`.
async fn replica_on(
    store: Option<&str>,
    limits: SequenceLimits,
    versions: &[&str],
) -> (Arc<Replica>, Router) {
    let config = ReplicaConfig {
        sequences: limits,
        session_store: store.map(|url| {
            Arc::new(shoal_replica::session_store::RedisStore::new(url, limits.idle).unwrap())
        }),
        ..ReplicaConfig::default()
    };
    let replica = Arc::new(Replica::new(
        "r-seq".into(),
        Arc::new(TractBackend::default()),
        &config,
    ));
    for v in versions {
        load(&replica, v).await;
    }
    let app = shoal_replica::http::router(replica.clone());
    (replica, app)
}

async fn load(replica: &Replica, version: &str) {
    replica
        .load(
            LoadSpec {
                model: ModelName::new("vad").unwrap(),
                version: Version::new(version).unwrap(),
                source: ArtifactSource::Path(model_path(FILE)),
                sha256: None,
                options: LoadOptions::default().with_state(&state()),
            },
            InstallPolicy {
                make_default: true,
                retire_others: false,
            },
        )
        .await
        .unwrap();
}

/// One step: status, body.
async fn step(app: &Router, k: usize, parameters: Value) -> (StatusCode, Value, http::HeaderMap) {
    step_with(app, frame(k), parameters).await
}

/// One step with these samples.
async fn step_with(
    app: &Router,
    samples: Vec<f32>,
    parameters: Value,
) -> (StatusCode, Value, http::HeaderMap) {
    let body = json!({
        "parameters": parameters,
        "inputs": [{"name": "input", "shape": [1, FRAME], "datatype": "FP32", "data": samples}],
    });
    post(app, "/v2/models/vad/infer", &[], &body).await
}

/// POSTs `body` to `uri` with `headers`: status, JSON body, headers.
async fn post(
    app: &Router,
    uri: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (StatusCode, Value, http::HeaderMap) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let reply = call_router(app, Method::POST, uri, &all, body.to_string()).await;
    (reply.status, reply.json(), reply.headers)
}

fn prob(body: &Value) -> f32 {
    let outputs = body["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "only the non-state output: {body}");
    assert_eq!(outputs[0]["name"], "speech_probs");
    #[allow(clippy::cast_possible_truncation)]
    let p = outputs[0]["data"][0].as_f64().unwrap() as f32;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_gives_the_numbers_of_carrying_the_state_by_hand() {
    let frames = 32;
    let expected = reference(frames);
    let (replica, app) = replica(SequenceLimits::default(), &["1"]).await;
    let mut got = Vec::new();
    for k in 0..frames {
        let parameters = json!({
            "sequence_id": 7,
            "sequence_start": k == 0,
            "sequence_end": k == frames - 1,
        });
        let (status, body, _) = step(&app, k, parameters).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        got.push(prob(&body));
    }
    for (k, (a, b)) in got.iter().zip(&expected).enumerate() {
        assert!((a - b).abs() <= 1e-5, "frame {k}: {a} against {b}");
    }
    assert!(
        expected.iter().any(|p| *p > 0.1) || expected.iter().any(|p| *p != expected[0]),
        "the test signal moves the model"
    );
    // The last step ended it: nothing is held, and a further step is
    // refused, saying how to start again.
    assert!(replica.sequences().is_empty());
    let (status, body, _) = step(&app, 0, json!({"sequence_id": 7})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = body["error"].as_str().unwrap();
    assert!(
        err.contains("sequence 7 of vad is not live") && err.contains("sequence_start=true"),
        "{err}"
    );

    // Two sequences interleaved do not mix their state; string ids work.
    let mut a = Vec::new();
    for k in 0..4 {
        for id in ["call-a", "call-b"] {
            let (status, body, _) = step(
                &app,
                k,
                json!({"sequence_id": id, "sequence_start": k == 0}),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if id == "call-a" {
                a.push(prob(&body));
            }
        }
    }
    assert_eq!(a, expected[..4].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mistake_gets_a_clear_error_and_harms_nothing() {
    let (_replica, app) = replica(
        SequenceLimits {
            max: 1,
            ..SequenceLimits::default()
        },
        &["1"],
    )
    .await;
    // The metadata shows what clients send and get, not the state.
    let meta = call_router(&app, Method::GET, "/v2/models/vad", &[], Body::empty())
        .await
        .json();
    assert_eq!(meta["inputs"].as_array().unwrap().len(), 1, "{meta}");
    assert_eq!(meta["inputs"][0]["name"], "input");
    assert_eq!(meta["outputs"].as_array().unwrap().len(), 1, "{meta}");
    // No sequence named.
    let (status, body, _) = step(&app, 0, json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let err = body["error"].as_str().unwrap();
    assert!(
        err.contains("stateful model") && err.contains("sequence_id"),
        "{err}"
    );
    // A bad id.
    let (status, body, _) = step(&app, 0, json!({"sequence_id": -1, "sequence_start": true})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // State sent by the client with a step that is not a start.
    let body = json!({
        "parameters": {"sequence_id": 1},
        "inputs": [
            {"name": "input", "shape": [1, FRAME], "datatype": "FP32", "data": frame(0)},
            {"name": "h", "shape": [1, 1, 128], "datatype": "FP32", "data": vec![0.0; 128]},
        ],
    });
    let (status, body, _) = post(&app, "/v2/models/vad/infer", &[], &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("input \"h\" is state"),
        "{body}"
    );
    // A sequence the gateway says another replica held: its state is gone
    // with that replica (410, naming it), not merely unknown (400).
    let moved = json!({
        "parameters": {"sequence_id": 99},
        "inputs": [{"name": "input", "shape": [1, FRAME], "datatype": "FP32", "data": frame(0)}],
    });
    let from = [(shoal_api::replica::SEQUENCE_FROM_HEADER, "r-dead")];
    let (status, body, _) = post(&app, "/v2/models/vad/infer", &from, &moved).await;
    assert_eq!(status, StatusCode::GONE);
    let text = body["error"].as_str().unwrap();
    assert!(
        text.contains("held by replica r-dead") && text.contains("sequence_start=true"),
        "{text}"
    );
    // The one sequence allowed, then a second: 429 with Retry-After.
    let (status, _, _) = step(&app, 0, json!({"sequence_id": 1, "sequence_start": true})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body, headers) =
        step(&app, 0, json!({"sequence_id": 2, "sequence_start": true})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"));
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("sequence_end=true")
    );
    // Restarting the live one is allowed (it is not a new one), and the
    // first sequence was not harmed by any of this.
    let (status, _, _) = step(&app, 0, json!({"sequence_id": 1, "sequence_start": true})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body, _) = step(&app, 1, json!({"sequence_id": 1, "sequence_end": true})).await;
    assert_eq!(status, StatusCode::OK);
    assert!((prob(&body) - reference(2)[1]).abs() <= 1e-5);
    // Ended: room for another.
    let (status, _, _) = step(&app, 0, json!({"sequence_id": 2, "sequence_start": true})).await;
    assert_eq!(status, StatusCode::OK);
    // An initial state given with the start replaces the zeros: starting
    // from the state step 1 of a sequence left gives step 2's numbers.
    let (_, body, _) = step(
        &app,
        0,
        json!({"sequence_id": 2, "sequence_start": true, "shoal_return_state": true}),
    )
    .await;
    let after_one = |name: &str| {
        body["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .unwrap()["data"]
            .clone()
    };
    let given = json!({
        "parameters": {"sequence_id": 2, "sequence_start": true},
        "inputs": [
            {"name": "input", "shape": [1, FRAME], "datatype": "FP32", "data": frame(1)},
            {"name": "h", "shape": [1, 1, 128], "datatype": "FP32", "data": after_one("hn")},
            {"name": "c", "shape": [1, 1, 128], "datatype": "FP32", "data": after_one("cn")},
        ],
    });
    let (status, body, _) = post(&app, "/v2/models/vad/infer", &[], &given).await;
    assert_eq!(status, StatusCode::OK);
    assert!((prob(&body) - reference(2)[1]).abs() <= 1e-5, "{body}");
    // The state itself, on request.
    let (status, body, _) = step(
        &app,
        1,
        json!({"sequence_id": 2, "shoal_return_state": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["speech_probs", "hn", "cn"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_of_one_sequence_are_serialised() {
    // The middle two steps carry the same samples, so whichever runs
    // first, two steps in flight at once must both advance the state.
    let same = frame(9);
    let expected = reference_of(&[frame(0), same.clone(), same.clone(), frame(3)]);
    let (_replica, app) = replica(SequenceLimits::default(), &["1"]).await;
    let (status, _, _) = step(&app, 0, json!({"sequence_id": 3, "sequence_start": true})).await;
    assert_eq!(status, StatusCode::OK);
    let (one, two) = tokio::join!(
        step_with(&app, same.clone(), json!({"sequence_id": 3})),
        step_with(&app, same.clone(), json!({"sequence_id": 3})),
    );
    assert_eq!((one.0, two.0), (StatusCode::OK, StatusCode::OK));
    let (status, body, _) = step(&app, 3, json!({"sequence_id": 3})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        (prob(&body) - expected[3]).abs() <= 1e-5,
        "{} against {}",
        prob(&body),
        expected[3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_stays_on_the_version_it_started_on() {
    let (replica, app) = replica(SequenceLimits::default(), &["1"]).await;
    let (status, body, _) = step(&app, 0, json!({"sequence_id": 5, "sequence_start": true})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["model_version"], "1");
    // Version 2 becomes the default: the live sequence keeps version 1,
    // new ones start on 2.
    load(&replica, "2").await;
    let (_, body, _) = step(&app, 1, json!({"sequence_id": 5})).await;
    assert_eq!(body["model_version"], "1", "{body}");
    let (_, body, _) = step(&app, 0, json!({"sequence_id": 6, "sequence_start": true})).await;
    assert_eq!(body["model_version"], "2", "{body}");
    // Asked for by another version explicitly: refused, not fed across.
    let other = json!({
        "parameters": {"sequence_id": 5},
        "inputs": [{"name": "input", "shape": [1, FRAME], "datatype": "FP32", "data": frame(2)}],
    });
    let (status, _, _) = post(&app, "/v2/models/vad/versions/2/infer", &[], &other).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // Version 1 goes: the sequence cannot go on, and says so (410).
    replica.store().remove("vad", "1").unwrap();
    let (status, body, _) = step(&app, 2, json!({"sequence_id": 5})).await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    let err = body["error"].as_str().unwrap();
    assert!(
        err.contains("began on vad:1") && err.contains("start the sequence again"),
        "{err}"
    );
    // And it is forgotten: the next step is an unknown sequence.
    let (status, _, _) = step(&app, 3, json!({"sequence_id": 5})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// Two replicas sharing one Redis: a sequence moves from one to the other
/// and back and keeps its numbers, including when the first one's memory
/// is stale (the step runs again on the newer state); with Redis down,
/// the replica holding a sequence goes on and says it is degraded, the
/// other cannot take the sequence and says why; Redis back (empty), the
/// holder writes the state through again and the other can take over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_any_replica_continues_a_sequence() {
    let mut redis = shoal_testkit::RedisServer::start();
    let url = redis.url();
    let (_a, app_a) = replica_on(Some(&url), SequenceLimits::default(), &["1"]).await;
    let (b, app_b) = replica_on(Some(&url), SequenceLimits::default(), &["1"]).await;
    let expected = reference(30);
    let check = |k: usize, body: &Value| {
        let got = prob(body);
        assert!(
            (got - expected[k]).abs() <= 1e-5,
            "frame {k}: {got} against {}",
            expected[k]
        );
    };
    let on = |app: &Router, k: usize| {
        let app = app.clone();
        async move {
            step(
                &app,
                k,
                json!({"sequence_id": "moving", "sequence_start": k == 0}),
            )
            .await
        }
    };
    for k in 0..6 {
        let (status, body, _) = on(&app_a, k).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        check(k, &body);
    }
    // B never saw it: it reads it from Redis.
    for k in 6..10 {
        let (status, body, _) = on(&app_b, k).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        check(k, &body);
    }
    // Back on A, whose memory stopped at step 6: its write is refused, and
    // it runs the step again on what B left.
    let (status, body, _) = on(&app_a, 10).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    check(10, &body);
    let metrics = _a.encode_metrics();
    assert!(
        metrics.contains("model_sequence_steps_rerun_total 1"),
        "{metrics}"
    );

    // Redis goes. A holds the sequence and goes on, degraded.
    redis.kill();
    for k in 11..14 {
        let (status, body, _) = on(&app_a, k).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        check(k, &body);
    }
    let ready = _a.ready_state();
    assert!(ready.ready, "degraded is not unready");
    assert!(
        ready.degraded[0].contains("session store"),
        "{:?}",
        ready.degraded
    );
    assert!(_a.encode_metrics().contains("session_store_up 0"));
    // A sequence B does not hold cannot move to it while Redis is down.
    // (B still holds an older copy of "moving", from step 10: a step sent
    // there now would be answered from it, the one case ARCHITECTURE.md's
    // guarantee leaves out; the gateway sends it there only if A fails.)
    let (status, body, headers) = step(&app_b, 0, json!({"sequence_id": "never-here"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("session store cannot be read")
    );

    // Redis is back, empty: A writes its state through with the next step,
    // and B (after dropping its stale copy) takes over from there.
    redis.restart();
    let (status, body, _) = on(&app_a, 14).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    check(14, &body);
    assert!(
        !_a.ready_state()
            .degraded
            .iter()
            .any(|d| d.contains("session"))
    );
    b.sequences().forget(
        "vad",
        &shoal_oip::sequence::SequenceId::Text("moving".into()),
    );
    let (status, body, _) = on(&app_b, 15).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    check(15, &body);
    // The last step ends it everywhere.
    let (status, _, _) = step(
        &app_b,
        16,
        json!({"sequence_id": "moving", "sequence_end": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = on(&app_a, 17).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "ended: unknown everywhere");
}
