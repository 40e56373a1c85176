//! The tract backend on the bundled real models: signatures read from the
//! files, predictions that match the held-out labels, and clear errors.

use shoal_core::{DataType, Dim, Tensor, TensorData};
use shoal_runtime::tract::TractBackend;
use shoal_runtime::{LoadError, LoadOptions, LoadedModel, RunError};
use shoal_testkit::{Samples, model_bytes};

fn load(file: &str) -> LoadedModel {
    load_with(file, &LoadOptions::default())
}

fn load_with(file: &str, options: &LoadOptions) -> LoadedModel {
    LoadedModel::load(&TractBackend::default(), &model_bytes(file), options)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

const CLS: &str = "ch_ppocr_mobile_v2.0_cls_infer.onnx";

fn cls_options() -> LoadOptions {
    let mut options = LoadOptions::default();
    options
        .input_shapes
        .insert("x".into(), vec![None, Some(3), Some(48), Some(192)]);
    options
}

fn digits_input(rows: &[Vec<f32>]) -> Tensor {
    let data: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::new("input", vec![rows.len(), 64], TensorData::Fp32(data)).unwrap()
}

fn labels_of(outputs: &[Tensor]) -> Vec<i64> {
    let label = outputs
        .iter()
        .find(|t| t.name == "label")
        .expect("label output");
    match label.data() {
        TensorData::Int64(v) => v.clone(),
        other => panic!("label is {:?}", other.datatype()),
    }
}

#[test]
fn digits_signature_is_read_from_the_file() {
    let model = load("digits-v1.onnx");
    let sig = model.signature();
    assert_eq!(sig.inputs.len(), 1);
    assert_eq!(sig.inputs[0].name, "input");
    assert_eq!(sig.inputs[0].datatype, DataType::Fp32);
    assert_eq!(
        sig.inputs[0].shape,
        vec![Dim::Dynamic(Some("batch".into())), Dim::Fixed(64)]
    );
    let outputs: Vec<(&str, DataType, Vec<i64>)> = sig
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.datatype, o.oip_shape()))
        .collect();
    assert_eq!(
        outputs,
        vec![
            ("probabilities", DataType::Fp32, vec![-1, 10]),
            ("label", DataType::Int64, vec![-1]),
        ]
    );
    assert_eq!(model.platform(), "tract_onnx");
}

#[test]
fn digits_predictions_match_held_out_accuracy() {
    let samples = Samples::load();
    for (file, name) in [
        ("digits-v1.onnx", "digits-v1"),
        ("digits-v2.onnx", "digits-v2"),
    ] {
        let model = load(file);
        // One batch with every sample…
        let batch = labels_of(
            &model
                .infer_blocking(vec![digits_input(&samples.inputs)])
                .unwrap(),
        );
        // …and one request per sample must agree exactly.
        let single: Vec<i64> = samples
            .inputs
            .iter()
            .map(|row| {
                labels_of(
                    &model
                        .infer_blocking(vec![digits_input(std::slice::from_ref(row))])
                        .unwrap(),
                )[0]
            })
            .collect();
        assert_eq!(
            batch, single,
            "{name}: batched and single predictions differ"
        );
        let correct = batch
            .iter()
            .zip(&samples.labels)
            .filter(|(p, l)| p == l)
            .count();
        #[allow(clippy::cast_precision_loss)]
        let accuracy = correct as f64 / samples.labels.len() as f64;
        let expected = samples.accuracy[name];
        // tract and ONNX Runtime may round differently on a near tie; allow
        // one sample of difference, no more.
        #[allow(clippy::cast_precision_loss)]
        let one = 1.0 / samples.labels.len() as f64;
        assert!(
            (accuracy - expected).abs() <= one + 1e-9,
            "{name}: accuracy {accuracy} but ONNX Runtime measured {expected}"
        );
        assert!(samples.labels.len() >= 50);
    }
}

#[test]
fn probabilities_are_a_distribution() {
    let samples = Samples::load();
    let outputs = load("digits-v2.onnx")
        .infer_blocking(vec![digits_input(&samples.inputs[..3])])
        .unwrap();
    let probs = &outputs[0];
    assert_eq!(probs.name, "probabilities");
    assert_eq!(probs.shape(), &[3, 10]);
    let TensorData::Fp32(v) = probs.data() else {
        panic!("not FP32")
    };
    for row in v.chunks(10) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "row sums to {sum}");
    }
}

#[test]
fn slow_model_agrees_with_v2() {
    let samples = Samples::load();
    let rows = &samples.inputs[..20];
    let slow = labels_of(
        &load("digits-slow.onnx")
            .infer_blocking(vec![digits_input(rows)])
            .unwrap(),
    );
    let v2 = labels_of(
        &load("digits-v2.onnx")
            .infer_blocking(vec![digits_input(rows)])
            .unwrap(),
    );
    assert_eq!(slow, v2);
}

fn text_line(batch: usize, width: usize) -> Tensor {
    let n = batch * 3 * 48 * width;
    #[allow(clippy::cast_precision_loss)]
    let data: Vec<f32> = (0..n).map(|i| ((i % 255) as f32 / 127.5) - 1.0).collect();
    Tensor::new("x", vec![batch, 3, 48, width], TensorData::Fp32(data)).unwrap()
}

#[test]
fn text_orientation_classifier_runs_with_its_configured_shape() {
    let model = load_with(CLS, &cls_options());
    let sig = model.signature();
    assert_eq!(sig.inputs[0].name, "x");
    assert_eq!(sig.inputs[0].oip_shape(), vec![-1, 3, 48, 192]);
    assert_eq!(sig.outputs[0].datatype, DataType::Fp32);
    assert_eq!(sig.outputs[0].oip_shape(), vec![-1, 2]);
    model.warm_up().unwrap();
    // Batches of different sizes each get a plan; all give distributions
    // over the two orientations.
    for batch in [1, 3, 2] {
        let outputs = model.infer_blocking(vec![text_line(batch, 192)]).unwrap();
        assert_eq!(outputs[0].shape(), &[batch, 2]);
        let TensorData::Fp32(v) = outputs[0].data() else {
            panic!("not FP32")
        };
        for row in v.chunks(2) {
            assert!((row[0] + row[1] - 1.0).abs() < 1e-4);
        }
    }
    let err = model.infer_blocking(vec![text_line(1, 100)]).unwrap_err();
    assert!(
        err.to_string().contains("dimension 3 must be 192, not 100"),
        "{err}"
    );
}

#[test]
fn unknown_dimensions_stay_independent() {
    // Without configuration, height and width (both `?` in the file) are
    // separate dynamic dimensions: a 48x192 line is accepted.
    let model = load(CLS);
    assert_eq!(model.signature().inputs[0].oip_shape(), vec![-1, 3, -1, -1]);
    let outputs = model.infer_blocking(vec![text_line(1, 192)]).unwrap();
    assert_eq!(outputs[0].shape(), &[1, 2]);
}

#[test]
fn input_shapes_must_name_real_inputs() {
    let mut options = LoadOptions::default();
    options
        .input_shapes
        .insert("image".into(), vec![None, Some(3)]);
    let err = LoadedModel::load(&TractBackend::default(), &model_bytes(CLS), &options).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot prepare the model: input_shapes names input \"image\", but the model's inputs are \"x\""
    );
    options.input_shapes.clear();
    options.input_shapes.insert("x".into(), vec![None, Some(3)]);
    let err = LoadedModel::load(&TractBackend::default(), &model_bytes(CLS), &options).unwrap_err();
    assert!(
        err.to_string()
            .contains("gives input \"x\" 2 dimensions, but the model declares 4"),
        "{err}"
    );
}

#[test]
fn silero_vad_carries_state_through_h_and_c() {
    let model = load("silero_vad_16k_sequence.onnx");
    let sig = model.signature();
    let names: Vec<&str> = sig.inputs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["input", "h", "c"]);
    let frames = 4;
    #[allow(clippy::cast_precision_loss)]
    let audio: Vec<f32> = (0..frames * 576)
        .map(|i| ((i as f32) * 0.05).sin() * 0.3)
        .collect();
    let inputs = vec![
        Tensor::new("input", vec![frames, 576], TensorData::Fp32(audio)).unwrap(),
        Tensor::new("h", vec![1, 1, 128], TensorData::Fp32(vec![0.0; 128])).unwrap(),
        Tensor::new("c", vec![1, 1, 128], TensorData::Fp32(vec![0.0; 128])).unwrap(),
    ];
    let outputs = model.infer_blocking(inputs).unwrap();
    let shapes: Vec<(&str, &[usize])> = outputs
        .iter()
        .map(|t| (t.name.as_str(), t.shape()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("speech_probs", &[4][..]),
            ("hn", &[1, 1, 128][..]),
            ("cn", &[1, 1, 128][..])
        ]
    );
    let TensorData::Fp32(hn) = outputs[1].data() else {
        panic!("hn not FP32")
    };
    assert!(hn.iter().any(|&x| x != 0.0), "state did not change");
    model.warm_up().unwrap();
}

#[test]
fn bad_inputs_are_refused_before_the_engine() {
    let model = load("digits-v1.onnx");
    let wrong = Tensor::new("input", vec![1, 63], TensorData::Fp32(vec![0.0; 63])).unwrap();
    let err = model.infer_blocking(vec![wrong]).unwrap_err();
    assert!(err.is_client_error());
    assert_eq!(
        err.to_string(),
        "input \"input\" has shape [1, 63] but the model expects [batch, 64]; dimension 1 must be 64, not 63"
    );
    let wrong_type = Tensor::new("input", vec![1, 64], TensorData::Int64(vec![0; 64])).unwrap();
    assert!(matches!(
        model.infer_blocking(vec![wrong_type]),
        Err(RunError::Input(_))
    ));
}

#[test]
fn garbage_is_not_a_model() {
    let err = LoadedModel::load(
        &TractBackend::default(),
        b"definitely not onnx",
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, LoadError::Parse(_)), "{err}");
    let mut truncated = model_bytes("digits-v2.onnx");
    truncated.truncate(truncated.len() / 2);
    assert!(
        LoadedModel::load(
            &TractBackend::default(),
            &truncated,
            &LoadOptions::default()
        )
        .is_err()
    );
}

#[test]
fn warm_up_runs_every_digits_model() {
    for file in ["digits-v1.onnx", "digits-v2.onnx", "digits-slow.onnx"] {
        load(file)
            .warm_up()
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

/// Whatever ran before, on any thread and at any batch size, an input gets
/// the same answer to the bit: what any caching of tract's run states must
/// keep (one was tried and reverted, see tract.rs). The VAD's recurrent
/// ops keep state inside a run, and it too answers alike twice.
#[test]
fn runs_leave_no_trace_in_the_next() {
    let samples = Samples::load();
    let model = load("digits-v1.onnx");
    let one = || digits_input(&samples.inputs[..1]);
    let first = model.infer_blocking(vec![one()]).unwrap();
    std::thread::scope(|s| {
        for n in [1, 7, 32, 3] {
            let (model, samples) = (&model, &samples);
            s.spawn(move || {
                for _ in 0..20 {
                    let input = digits_input(&samples.inputs[..n]);
                    assert_eq!(model.infer_blocking(vec![input]).unwrap()[1].shape(), [n]);
                }
            });
        }
    });
    assert_eq!(model.infer_blocking(vec![one()]).unwrap(), first);

    let vad = load("silero_vad_16k_sequence.onnx");
    #[allow(clippy::cast_precision_loss)]
    let inputs = || {
        let audio: Vec<f32> = (0..2 * 576).map(|i| ((i as f32) * 0.07).cos()).collect();
        vec![
            Tensor::new("input", vec![2, 576], TensorData::Fp32(audio)).unwrap(),
            Tensor::new("h", vec![1, 1, 128], TensorData::Fp32(vec![0.1; 128])).unwrap(),
            Tensor::new("c", vec![1, 1, 128], TensorData::Fp32(vec![0.0; 128])).unwrap(),
        ]
    };
    let first = vad.infer_blocking(inputs()).unwrap();
    assert_eq!(vad.infer_blocking(inputs()).unwrap(), first);
}
