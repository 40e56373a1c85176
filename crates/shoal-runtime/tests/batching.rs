//! Dynamic batching keeps every request's answer its own: under concurrent
//! load with mixed row counts and bad requests mixed in, each batched
//! answer equals the same request run alone, bad requests are refused
//! alone, and requests did share batches.
//!
//! "Equals": same outputs, shapes and datatypes, integer outputs (the
//! labels) identical, floats within 1e-5 relative. tract multiplies a
//! matrix of one row and of many rows with different kernels, which sum
//! in different orders, so the last bits of a probability depend on the
//! batch it ran in — as with Triton or ONNX Runtime.

use std::sync::Arc;
use std::time::Duration;

use shoal_core::batch::BatchPolicy;
use shoal_core::{Tensor, TensorData};
use shoal_runtime::batcher::{BatchRunner, Batcher};
use shoal_runtime::tract::TractBackend;
use shoal_runtime::{InferencePool, LoadOptions, LoadedModel, RunError};
use shoal_testkit::{Samples, model_bytes};

fn load(file: &str) -> LoadedModel {
    LoadedModel::load(
        &TractBackend::default(),
        &model_bytes(file),
        &LoadOptions::default(),
    )
    .unwrap()
}

fn runner(pool: &InferencePool, queue: usize) -> BatchRunner {
    BatchRunner {
        pool: pool.clone(),
        key: "digits".into(),
        cap: 2,
        deadline: Duration::from_secs(30),
        queue,
        on_batch: None,
    }
}

/// Request `i`: 1 to 5 rows of the digits samples; every seventh is
/// malformed (63 values a row).
fn request(samples: &Samples, i: usize) -> (Vec<Tensor>, bool) {
    let rows = 1 + i % 5;
    let bad = i % 7 == 3;
    let width = if bad { 63 } else { 64 };
    let data: Vec<f32> = (0..rows)
        .flat_map(|r| samples.inputs[(i * 5 + r) % samples.inputs.len()][..width].to_vec())
        .collect();
    let input = Tensor::new("input", vec![rows, width], TensorData::Fp32(data)).unwrap();
    (vec![input], bad)
}

fn same_answer(batched: &[Tensor], alone: &[Tensor], what: &str) {
    assert_eq!(batched.len(), alone.len(), "{what}");
    for (b, a) in batched.iter().zip(alone) {
        assert_eq!(
            (&b.name, b.shape(), b.datatype()),
            (&a.name, a.shape(), a.datatype()),
            "{what}"
        );
        match (b.data(), a.data()) {
            (TensorData::Fp32(x), TensorData::Fp32(y)) => {
                for (x, y) in x.iter().zip(y) {
                    assert!(
                        (x - y).abs() <= 1e-6 + 1e-5 * y.abs(),
                        "{what}: {} {x} vs {y}",
                        b.name
                    );
                }
            }
            (x, y) => assert_eq!(x, y, "{what}: {}", b.name),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_answers_equal_unbatched_ones_under_concurrent_mixed_load() {
    let samples = Samples::load();
    // Unmeasured, batches run on pool threads, two at a time; measured
    // cheap, on the task that formed them, one at a time.
    for (file, measured) in [
        ("digits-v1.onnx", false),
        ("digits-v2.onnx", false),
        ("digits-v1.onnx", true),
    ] {
        let mut model = load(file);
        if measured {
            // Within a limit no machine misses.
            model.measure_row_cost(Duration::from_secs(1)).unwrap();
            assert!(
                model.runs_inline(&request(&samples, 0).0),
                "{file} runs inline"
            );
        }
        let pool = InferencePool::new(2, 1024);
        // A delay long enough for every request to queue while the first
        // batch waits, however slowly the machine runs the tasks: a
        // request that finds none on its way beside it runs at once, so
        // with a short one a busy machine (CI, the tests in parallel)
        // can run most of them alone, one after another.
        let policy = BatchPolicy::new(32, Duration::from_millis(50), vec![]).unwrap();
        let batcher = Arc::new(Batcher::start(model.clone(), policy, runner(&pool, 1024)));
        // Each request's answer alone, first: the batched run below then
        // has the runtime's threads to itself.
        let requests: Vec<(Vec<Tensor>, bool)> = (0..400).map(|i| request(&samples, i)).collect();
        let alone: Vec<Option<Vec<Tensor>>> = requests
            .iter()
            .map(|(inputs, bad)| (!bad).then(|| model.infer_blocking(inputs.clone()).unwrap()))
            .collect();
        // All announced before any runs, as requests still being decoded
        // are: batches wait for them (within the delay).
        let arrivals: Vec<_> = requests.iter().map(|_| batcher.admit().unwrap()).collect();
        let tasks: Vec<_> = requests
            .into_iter()
            .zip(arrivals)
            .map(|((inputs, _), arrival)| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.run(inputs, Some(arrival)).await })
            })
            .collect();
        for (i, (t, alone)) in tasks.into_iter().zip(alone).enumerate() {
            let batched = t.await.unwrap();
            match alone {
                None => assert!(
                    matches!(batched, Err(RunError::Input(_))),
                    "request {i}: {batched:?}"
                ),
                Some(alone) => {
                    same_answer(&batched.unwrap(), &alone, &format!("request {i} of {file}"));
                }
            }
        }
        let stats = batcher.stats();
        let good = (0..400).filter(|i| i % 7 != 3).count() as u64;
        assert_eq!(
            stats.requests(),
            good,
            "every good request went through a batch"
        );
        assert!(
            stats.batches() < stats.requests() / 2,
            "{file} (measured: {measured}): {} batches for {} requests",
            stats.batches(),
            stats.requests()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_as_overloaded() {
    let samples = Samples::load();
    let model = load("digits-slow.onnx");
    let pool = InferencePool::new(1, 1024);
    // One runner, batches of one, a queue of two: the fourth waiting
    // request has no room.
    let policy = BatchPolicy::new(1, Duration::ZERO, vec![]).unwrap();
    let mut r = runner(&pool, 2);
    r.cap = 1;
    let batcher = Arc::new(Batcher::start(model, policy, r));
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (batcher, samples) = (batcher.clone(), samples.clone());
            tokio::spawn(async move { batcher.run(request(&samples, i * 7).0, None).await })
        })
        .collect();
    let mut overloaded = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => {}
            Err(RunError::Overloaded { .. }) => overloaded += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(overloaded > 0, "40 requests at once fit a queue of 2");
}
