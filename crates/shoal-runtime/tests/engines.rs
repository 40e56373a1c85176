//! tract and ONNX Runtime on every bundled model: the same answers (to
//! float tolerance), `auto` keeping the faster, and where the library is
//! looked for. ONNX Runtime is the `onnxruntime` wheel that
//! `scripts/setup` installs.

use std::ffi::OsString;
use std::path::PathBuf;

use shoal_core::{DataType, Dim, Engine, Tensor, TensorData};
use shoal_runtime::engines::Engines;
use shoal_runtime::ort::{OrtBackend, locate};
use shoal_runtime::tract::TractBackend;
use shoal_runtime::{Backend, LoadOptions, LoadedModel};
use shoal_testkit::{Samples, TempDir, model_bytes, models_dir};

fn ort() -> std::sync::Arc<OrtBackend> {
    OrtBackend::shared().unwrap_or_else(|e| panic!("run scripts/setup first: {e}"))
}

/// Load options a bundled model needs (the PaddleOCR classifier's height
/// and width are unknown in its file).
fn options_for(file: &str) -> LoadOptions {
    let mut options = LoadOptions::default();
    if file.starts_with("ch_ppocr") {
        options
            .input_shapes
            .insert("x".into(), vec![None, Some(3), Some(48), Some(192)]);
    }
    options
}

/// Inputs for `model` with `rows` in a dynamic first dimension: the
/// digits samples for digits models, deterministic values in [-1, 1)
/// otherwise.
fn inputs_for(model: &LoadedModel, rows: usize) -> Vec<Tensor> {
    let samples = Samples::load();
    model
        .signature()
        .inputs
        .iter()
        .enumerate()
        .map(|(k, spec)| {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Dim::Fixed(n) => *n,
                    Dim::Dynamic(_) if i == 0 => rows,
                    Dim::Dynamic(_) => 1,
                })
                .collect();
            let n: usize = shape.iter().product();
            assert_eq!(spec.datatype, DataType::Fp32, "{}", spec.name);
            let data: Vec<f32> = if spec.name == "input" && shape == [rows, 64] {
                samples.inputs[..rows].iter().flatten().copied().collect()
            } else {
                #[allow(clippy::cast_precision_loss)]
                (0..n)
                    .map(|i| (((i * 7919 + k * 104_729) % 2000) as f32 / 1000.0) - 1.0)
                    .collect()
            };
            Tensor::new(spec.name.clone(), shape, TensorData::Fp32(data)).unwrap()
        })
        .collect()
}

fn bundled_models() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(models_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".onnx"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "bundled models: {files:?}");
    files
}

#[test]
fn both_engines_give_the_same_answers_on_every_bundled_model() {
    let ort = ort();
    for file in bundled_models() {
        let bytes = model_bytes(&file);
        let options = options_for(&file);
        let tract = LoadedModel::load(&TractBackend::default(), &bytes, &options)
            .unwrap_or_else(|e| panic!("{file} with tract: {e}"));
        let onnxruntime = LoadedModel::load(ort.as_ref(), &bytes, &options)
            .unwrap_or_else(|e| panic!("{file} with ONNX Runtime: {e}"));
        assert_eq!(tract.platform(), "tract_onnx");
        assert_eq!(onnxruntime.platform(), "onnxruntime_onnx");
        let names = |m: &LoadedModel| -> Vec<String> {
            m.signature()
                .outputs
                .iter()
                .map(|o| o.name.clone())
                .collect()
        };
        assert_eq!(names(&tract), names(&onnxruntime), "{file}: outputs");
        for rows in [1, 3] {
            let inputs = inputs_for(&tract, rows);
            let a = tract.infer_blocking(inputs.clone()).unwrap();
            let b = onnxruntime.infer_blocking(inputs).unwrap();
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.shape(), y.shape(), "{file} {}: shape", x.name);
                match (x.data(), y.data()) {
                    (TensorData::Fp32(p), TensorData::Fp32(q)) => {
                        let worst = p
                            .iter()
                            .zip(q)
                            .map(|(p, q)| (p - q).abs() / p.abs().max(1.0))
                            .fold(0.0_f32, f32::max);
                        assert!(worst < 1e-4, "{file} {}: differs by {worst}", x.name);
                    }
                    (p, q) => assert_eq!(p, q, "{file} {}", x.name),
                }
            }
        }
    }
}

#[test]
fn the_engine_a_version_asks_for_is_the_one_that_runs_it() {
    let _ = ort();
    let engines = Engines::default();
    let bytes = model_bytes("digits-v1.onnx");
    let platform = |engine: Engine| {
        let options = LoadOptions::default().with_engine(engine);
        LoadedModel::load(&engines, &bytes, &options)
            .unwrap()
            .platform()
    };
    assert_eq!(platform(Engine::Tract), "tract_onnx");
    assert_eq!(platform(Engine::Ort), "onnxruntime_onnx");
    let kept = platform(Engine::Auto);
    assert!(["tract_onnx", "onnxruntime_onnx"].contains(&kept), "{kept}");
}

#[test]
fn auto_times_both_engines_and_keeps_the_faster() {
    let _ = ort();
    let engines = Engines::default();
    for file in ["digits-v1.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx"] {
        let options = options_for(file).with_engine(Engine::Auto);
        let (model, choice) = engines.load_auto(&model_bytes(file), &options).unwrap();
        let choice = choice.expect("both engines load the bundled models");
        assert!(choice.tract > std::time::Duration::ZERO);
        assert!(choice.ort > std::time::Duration::ZERO);
        assert_eq!(
            choice.kept,
            shoal_core::engine::faster(choice.tract, choice.ort)
        );
        let expected = match choice.kept {
            Engine::Ort => "onnxruntime_onnx",
            _ => "tract_onnx",
        };
        assert_eq!(model.platform(), expected, "{file}: {choice:?}");
    }
}

#[test]
fn a_model_neither_engine_can_read_fails_under_auto() {
    let _ = ort();
    let options = LoadOptions::default().with_engine(Engine::Auto);
    let err = Engines::default()
        .load(b"not a model", &options)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("parse"), "{err}");
}

/// An environment for [`locate`] with only these variables.
fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
    let vars: Vec<(String, OsString)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
        .collect();
    move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

#[test]
fn the_library_is_found_in_a_python_site_directory_or_named_by_the_environment() {
    let home = TempDir::new("ort-home");
    let capi = home.join(".local/lib/python3.11/site-packages/onnxruntime/capi");
    std::fs::create_dir_all(&capi).unwrap();
    let lib = capi.join("libonnxruntime.so.1.23.2");
    std::fs::write(&lib, b"").unwrap();
    let home_str = home.0.to_str().unwrap();
    let none: [PathBuf; 0] = [];
    assert_eq!(locate(&env(&[("HOME", home_str)]), &none), Ok(lib.clone()));

    // A virtual environment comes first.
    let venv = TempDir::new("ort-venv");
    let venv_capi = venv.join("lib/python3.12/site-packages/onnxruntime/capi");
    std::fs::create_dir_all(&venv_capi).unwrap();
    std::fs::write(venv_capi.join("libonnxruntime.so.1.22.0"), b"").unwrap();
    let found = locate(
        &env(&[
            ("HOME", home_str),
            ("VIRTUAL_ENV", venv.0.to_str().unwrap()),
        ]),
        &none,
    )
    .unwrap();
    assert!(found.starts_with(&venv.0), "{}", found.display());

    // ORT_DYLIB_PATH wins, and a wrong one is named.
    let named = env(&[
        ("HOME", home_str),
        ("ORT_DYLIB_PATH", lib.to_str().unwrap()),
    ]);
    assert_eq!(locate(&named, &none), Ok(lib));
    let wrong = env(&[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")]);
    let err = locate(&wrong, &none).unwrap_err();
    assert!(err.contains("ORT_DYLIB_PATH is /nonexistent"), "{err}");
}

#[test]
fn a_machine_without_onnx_runtime_is_told_how_to_install_it() {
    let empty = TempDir::new("ort-none");
    let err = locate(
        &env(&[("HOME", empty.0.to_str().unwrap())]),
        std::slice::from_ref(&empty.0),
    )
    .unwrap_err();
    assert!(
        err.contains("pip install --user onnxruntime==1.23.2")
            && err.contains("ORT_DYLIB_PATH")
            && err.contains("--engine tract or auto"),
        "{err}"
    );
}
