//! tract against ONNX Runtime on the same inputs, in the same process,
//! alternating rounds: single-sample p50 per model, and the ratio; and
//! `auto` (the engine replicas keep after timing both at load) against
//! ONNX Runtime alone.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use shoal_core::{Tensor, TensorData};
use shoal_runtime::tract::TractBackend;
use shoal_runtime::{Backend, LoadOptions, LoadedModel};

use crate::stats::{Latencies, Spread, Summary};

/// One model's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct EngineComparison {
    /// Model file.
    pub model: String,
    /// Input shape used.
    pub shape: Vec<usize>,
    /// tract, all rounds pooled.
    pub tract: Summary,
    /// ONNX Runtime, all rounds pooled.
    pub onnxruntime: Summary,
    /// Tract p50 ÷ ORT p50 over rounds.
    pub p50_ratio: Spread,
    /// `--engine auto`, loaded as a replica loads it, all rounds pooled.
    pub auto: Summary,
    /// The engine `auto` kept.
    pub auto_kept: String,
    /// Auto p50 ÷ ORT p50 over rounds.
    pub auto_over_ort: Spread,
}

struct Case {
    file: &'static str,
    options: LoadOptions,
    inputs: Vec<Tensor>,
    iterations: usize,
}

fn cases() -> anyhow::Result<Vec<Case>> {
    let row = crate::digits_rows(1)?.remove(0);
    let digits = vec![Tensor::new("input", vec![1, 64], TensorData::Fp32(row))?];
    let mut cls_options = LoadOptions::default();
    cls_options
        .input_shapes
        .insert("x".into(), vec![None, Some(3), Some(48), Some(192)]);
    let n = 3 * 48 * 192;
    #[allow(clippy::cast_precision_loss)]
    let line: Vec<f32> = (0..n).map(|i| ((i % 251) as f32 / 125.0) - 1.0).collect();
    let cls = vec![Tensor::new(
        "x",
        vec![1, 3, 48, 192],
        TensorData::Fp32(line),
    )?];
    Ok(vec![
        Case {
            file: "digits-v1.onnx",
            options: LoadOptions::default(),
            inputs: digits.clone(),
            iterations: 4000,
        },
        Case {
            file: "digits-v2.onnx",
            options: LoadOptions::default(),
            inputs: digits.clone(),
            iterations: 4000,
        },
        Case {
            file: "digits-slow.onnx",
            options: LoadOptions::default(),
            inputs: digits,
            iterations: 30,
        },
        Case {
            file: "ch_ppocr_mobile_v2.0_cls_infer.onnx",
            options: cls_options,
            inputs: cls,
            iterations: 200,
        },
    ])
}

fn time(
    model: &LoadedModel,
    inputs: &[Tensor],
    iterations: usize,
    into: &mut Latencies,
) -> anyhow::Result<f64> {
    let mut round = Latencies::default();
    for _ in 0..iterations {
        let started = Instant::now();
        let out = model.infer_blocking(inputs.to_vec())?;
        let elapsed = started.elapsed();
        std::hint::black_box(out);
        round.record(elapsed);
        into.record(elapsed);
    }
    Ok(round.quantile_us(0.5))
}

/// Runs the comparison: `rounds` alternating rounds per model.
pub fn compare(ort: &dyn Backend, rounds: usize) -> anyhow::Result<Vec<EngineComparison>> {
    let tract = TractBackend::default();
    let dir = crate::models_dir();
    let mut results = Vec::new();
    for case in cases()? {
        let bytes = std::fs::read(dir.join(case.file))?;
        let a = LoadedModel::load(&tract, &bytes, &case.options)?;
        let b = LoadedModel::load(ort, &bytes, &case.options)?;
        let c = LoadedModel::load(
            &shoal_runtime::engines::Engines::default(),
            &bytes,
            &case.options.clone().with_engine(shoal_core::Engine::Auto),
        )?;
        // Same inputs, same answers (to float tolerance) before timing.
        check_same(
            &a.infer_blocking(case.inputs.clone())?,
            &b.infer_blocking(case.inputs.clone())?,
        )?;
        let (mut all_a, mut all_b, mut all_c) = (
            Latencies::default(),
            Latencies::default(),
            Latencies::default(),
        );
        let (mut ratios, mut auto_ratios) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let pa = time(&a, &case.inputs, case.iterations, &mut all_a)?;
            let pb = time(&b, &case.inputs, case.iterations, &mut all_b)?;
            let pc = time(&c, &case.inputs, case.iterations, &mut all_c)?;
            ratios.push(pa / pb);
            auto_ratios.push(pc / pb);
        }
        results.push(EngineComparison {
            model: case.file.to_owned(),
            shape: case.inputs[0].shape().to_vec(),
            tract: all_a.summary(),
            onnxruntime: all_b.summary(),
            p50_ratio: Spread::of(&ratios),
            auto: all_c.summary(),
            auto_kept: c.platform().to_owned(),
            auto_over_ort: Spread::of(&auto_ratios),
        });
    }
    Ok(results)
}

fn check_same(a: &[Tensor], b: &[Tensor]) -> anyhow::Result<()> {
    for (x, y) in a.iter().zip(b) {
        let (Some(xv), Some(yv)) = (x.data().to_f64_vec(), y.data().to_f64_vec()) else {
            continue;
        };
        let diff = xv
            .iter()
            .zip(&yv)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        anyhow::ensure!(
            diff < 1e-3,
            "engines disagree on {}: max difference {diff}",
            x.name
        );
    }
    Ok(())
}

/// ONNX Runtime from `libonnxruntime.so` at `path`, or found as replicas
/// find it.
pub fn ort_backend(path: Option<&Path>) -> anyhow::Result<std::sync::Arc<dyn Backend>> {
    Ok(match path {
        Some(path) => shoal_runtime::ort::OrtBackend::from_library(path)?,
        None => shoal_runtime::ort::OrtBackend::shared()?,
    })
}
