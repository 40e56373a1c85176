//! The default backend: [tract](https://github.com/sonos/tract), a pure-Rust
//! ONNX engine.
//!
//! Models are optimised once at load time with their dynamic dimensions kept
//! symbolic, so one plan serves every batch size. A small model (at most
//! [`ONE_ROW_PLAN_MAX_BYTES`]) also gets a plan with every dynamic
//! dimension at 1 (one row: the shape most requests have), which tract can
//! specialise: the symbolic plan resolves shapes at each run, which on an
//! MLP like the digits classifier costs more than its arithmetic (7.6 µs a
//! row against 5.4 µs on the specialised plan). Some exported graphs
//! compute shapes in ways tract cannot follow symbolically (PaddleOCR's
//! classifier casts a shape to `int32` before a `Reshape`); those are
//! planned per concrete input shape instead, with the most recently used
//! plans cached, which is how engines with optimisation profiles work too.

use std::sync::{Arc, Mutex};

use half::f16;
use shoal_core::{DataType, Dim, Signature, Tensor, TensorData, TensorSpec};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, TDim,
    TValue, TVec, TractResult, TypedFact, TypedModel, TypedRunnableModel, tract_ndarray,
};
use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid};

use crate::{Backend, LoadError, LoadOptions, Model, RunError};

/// How many per-shape plans a model keeps when it cannot use a symbolic one.
const SHAPE_PLAN_CACHE: usize = 8;

/// The largest model (its ONNX file) that gets a one-row plan beside its
/// symbolic one. A model this small runs a row in microseconds, where the
/// symbolic plan's per-run shape work shows; a larger one spends its run
/// in arithmetic, and a second plan would cost it load time and memory
/// for nothing (its packed weights are the plan's own: digits-slow,
/// 2.6 MB, took 0.67 s to load with one instead of 0.3 s).
pub const ONE_ROW_PLAN_MAX_BYTES: usize = 512 << 10;

/// Loads ONNX models with tract.
pub struct TractBackend {
    onnx: tract_onnx::Onnx,
}

impl Default for TractBackend {
    fn default() -> Self {
        TractBackend {
            onnx: tract_onnx::onnx(),
        }
    }
}

impl std::fmt::Debug for TractBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TractBackend")
    }
}

struct TractModel {
    plans: Plans,
    signature: Signature,
}

enum Plans {
    /// One plan for every input shape, and maybe one specialised for
    /// inputs with every dynamic dimension at 1.
    Symbolic {
        any: Arc<TypedRunnableModel>,
        one_row: Option<(ShapeKey, Arc<TypedRunnableModel>)>,
    },
    /// Plans built on demand for each concrete set of input shapes.
    PerShape(PerShape),
}

/// Input shapes of one request, one shape per input.
type ShapeKey = Vec<Vec<usize>>;

struct PerShape {
    template: InferenceModel,
    /// Most recently used last.
    cache: Mutex<Vec<(ShapeKey, Arc<TypedRunnableModel>)>>,
}

fn prepare_err(e: impl std::fmt::Display) -> LoadError {
    LoadError::Prepare(format!("{e:#}"))
}

/// What a model run by tract reports as its platform.
pub const PLATFORM: &str = "tract_onnx";

impl Backend for TractBackend {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    fn load(&self, bytes: &[u8], options: &LoadOptions) -> Result<Arc<dyn Model>, LoadError> {
        Ok(Arc::new(self.load_model(bytes, options)?))
    }
}

impl TractBackend {
    fn load_model(&self, bytes: &[u8], options: &LoadOptions) -> Result<TractModel, LoadError> {
        // Decode the protobuf straight from `bytes`: `model_for_read` would
        // first copy the whole artifact into a buffer of its own, one more
        // model-sized allocation (fresh pages to fault in) per load.
        let proto = <tract_onnx::pb::ModelProto as prost::Message>::decode(bytes)
            .map_err(|e| LoadError::Parse(format!("not an ONNX protobuf: {e}")))?;
        let mut model = self
            .onnx
            .model_for_proto_model(&proto)
            .map_err(|e| LoadError::Parse(format!("{e:#}")))?;
        drop(proto);
        apply_input_shapes(&mut model, options)?;
        name_unknown_dims(&mut model).map_err(prepare_err)?;
        let small = bytes.len() <= ONE_ROW_PLAN_MAX_BYTES;
        let symbolic = model.clone().into_typed().and_then(|typed| {
            let one_row = if small { one_row_plan(&typed) } else { None };
            Ok((
                signature_of(&typed),
                typed.into_optimized()?.into_runnable()?,
                one_row,
            ))
        });
        match symbolic {
            Ok((signature, any, one_row)) => Ok(TractModel {
                plans: Plans::Symbolic { any, one_row },
                signature: signature?,
            }),
            Err(symbolic_err) => {
                tracing::debug!(
                    error = %format!("{symbolic_err:#}"),
                    "no symbolic plan; planning per input shape"
                );
                let per_shape = PerShape {
                    template: model,
                    cache: Mutex::new(Vec::new()),
                };
                let signature = per_shape.signature().map_err(|e| {
                    let detail = match e {
                        LoadError::Parse(m)
                        | LoadError::Prepare(m)
                        | LoadError::Unsupported(m)
                        | LoadError::WarmUp(m)
                        | LoadError::EngineUnavailable(m) => m,
                    };
                    let symbolic = format!("{symbolic_err:#}");
                    if detail == symbolic {
                        LoadError::Prepare(detail)
                    } else {
                        LoadError::Prepare(format!(
                            "{detail}; with dynamic dimensions: {symbolic}. \
                             Fixing the input shape (input_shapes) may help"
                        ))
                    }
                })?;
                Ok(TractModel {
                    plans: Plans::PerShape(per_shape),
                    signature,
                })
            }
        }
    }
}

/// A plan for `typed` with every symbol in its inputs' shapes at 1, and
/// the input shapes it runs; `None` when the inputs have no symbol or
/// tract cannot plan it (logged: the symbolic plan serves those inputs).
fn one_row_plan(typed: &TypedModel) -> Option<(ShapeKey, Arc<TypedRunnableModel>)> {
    let plan = || -> TractResult<Option<(ShapeKey, Arc<TypedRunnableModel>)>> {
        let mut at_one = std::collections::HashMap::new();
        for outlet in typed.input_outlets()? {
            for dim in typed.outlet_fact(*outlet)?.shape.iter() {
                for sym in dim.symbols() {
                    at_one.insert(sym, TDim::from(1));
                }
            }
        }
        if at_one.is_empty() {
            return Ok(None);
        }
        let fixed = typed.set_symbols(&at_one)?;
        let mut shapes = ShapeKey::new();
        for outlet in fixed.input_outlets()? {
            match fixed.outlet_fact(*outlet)?.shape.as_concrete() {
                Some(shape) => shapes.push(shape.to_vec()),
                None => return Ok(None),
            }
        }
        Ok(Some((shapes, fixed.into_optimized()?.into_runnable()?)))
    };
    plan().unwrap_or_else(|e| {
        tracing::debug!(error = %format!("{e:#}"), "no one-row plan; the symbolic plan runs one row too");
        None
    })
}

/// Replaces the declared shapes of the inputs named in `options`.
fn apply_input_shapes(model: &mut InferenceModel, options: &LoadOptions) -> Result<(), LoadError> {
    let outlets = model.input_outlets().map_err(prepare_err)?.to_vec();
    for (name, dims) in &options.input_shapes {
        let Some(ix) = outlets
            .iter()
            .position(|o| &model.node(o.node).name == name)
        else {
            let known: Vec<String> = outlets
                .iter()
                .map(|o| format!("{:?}", model.node(o.node).name))
                .collect();
            return Err(LoadError::Prepare(format!(
                "input_shapes names input {name:?}, but the model's inputs are {}",
                known.join(", ")
            )));
        };
        let fact = model.input_fact_mut(ix).map_err(prepare_err)?;
        if !fact.shape.is_open() && fact.shape.dims().count() != dims.len() {
            return Err(LoadError::Prepare(format!(
                "input_shapes gives input {name:?} {} dimensions, but the model declares {}",
                dims.len(),
                fact.shape.dims().count()
            )));
        }
        let shape: TVec<GenericFactoid<TDim>> = dims
            .iter()
            .map(|d| match d {
                Some(n) => GenericFactoid::Only(TDim::from(*n)),
                None => GenericFactoid::Any,
            })
            .collect();
        fact.shape = tract_onnx::tract_hir::infer::ShapeFactoid::closed(shape);
    }
    Ok(())
}

/// Gives every input dimension the file leaves unknown (`-1`, `?`) a
/// symbol of its own, so tract can plan for any size there, and two unknown
/// dimensions are never assumed equal (PaddleOCR's classifier declares both
/// height and width as `?`).
fn name_unknown_dims(model: &mut InferenceModel) -> TractResult<()> {
    for ix in 0..model.input_outlets()?.len() {
        let node = model.input_outlets()?[ix].node;
        let name: String = model
            .node(node)
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let unknown: Vec<usize> = model
            .input_fact(ix)?
            .shape
            .dims()
            .enumerate()
            .filter(|(_, d)| matches!(d, GenericFactoid::Any))
            .map(|(axis, _)| axis)
            .collect();
        for axis in unknown {
            let sym = model.symbols.sym(&format!("{name}_dim{axis}"));
            model
                .input_fact_mut(ix)?
                .shape
                .set_dim(axis, TDim::Sym(sym));
        }
    }
    Ok(())
}

impl PerShape {
    /// Inputs as declared (after overrides); outputs typed from plans for
    /// example shapes.
    fn signature(&self) -> Result<Signature, LoadError> {
        let model = &self.template;
        let outlets = model.input_outlets().map_err(prepare_err)?;
        let mut inputs = Vec::with_capacity(outlets.len());
        for (ix, outlet) in outlets.iter().enumerate() {
            let name = model.node(outlet.node).name.clone();
            let fact = model.input_fact(ix).map_err(prepare_err)?;
            let dt = fact.datum_type.concretize().ok_or_else(|| {
                LoadError::Prepare(format!("input {name:?} has no declared element type"))
            })?;
            let shape = fact.shape.dims().map(dim_of_factoid).collect();
            inputs.push(TensorSpec {
                datatype: datatype_or_err(&name, dt)?,
                name,
                shape,
            });
        }
        // Plan for two example shapes, dynamic dimensions at 1 and at 2:
        // output dimensions that differ between them are dynamic.
        let shapes_at = |n: usize| -> Vec<Vec<usize>> {
            inputs
                .iter()
                .map(|spec| {
                    spec.shape
                        .iter()
                        .map(|d| match d {
                            Dim::Fixed(k) => *k,
                            Dim::Dynamic(_) => n,
                        })
                        .collect()
                })
                .collect()
        };
        let one = self.plan_for(&shapes_at(1)).map_err(prepare_err)?;
        let two = self.plan_for(&shapes_at(2)).map_err(prepare_err)?;
        let (one, two) = (one.model(), two.model());
        let mut outputs = Vec::new();
        for (ix, (o1, o2)) in one
            .output_outlets()
            .map_err(prepare_err)?
            .iter()
            .zip(two.output_outlets().map_err(prepare_err)?)
            .enumerate()
        {
            let declared = model.output_outlets().ok().and_then(|o| o.get(ix).copied());
            let name = declared
                .and_then(|o| model.outlet_label(o))
                .or_else(|| one.outlet_label(*o1))
                .map_or_else(|| format!("output_{ix}"), str::to_owned);
            let f1 = one.outlet_fact(*o1).map_err(prepare_err)?;
            let f2 = two.outlet_fact(*o2).map_err(prepare_err)?;
            let shape = f1
                .shape
                .dims()
                .iter()
                .zip(f2.shape.dims())
                .map(|(a, b)| match (a.as_i64(), b.as_i64()) {
                    (Some(a), Some(b)) if a == b => {
                        usize::try_from(a).map_or(Dim::Dynamic(None), Dim::Fixed)
                    }
                    _ => Dim::Dynamic(None),
                })
                .collect();
            outputs.push(TensorSpec {
                datatype: datatype_or_err(&name, f1.datum_type)?,
                name,
                shape,
            });
        }
        Ok(Signature { inputs, outputs })
    }

    fn plan_for(&self, shapes: &[Vec<usize>]) -> TractResult<Arc<TypedRunnableModel>> {
        {
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(pos) = cache.iter().position(|(k, _)| k.as_slice() == shapes) {
                let entry = cache.remove(pos);
                let plan = entry.1.clone();
                cache.push(entry);
                return Ok(plan);
            }
        }
        // Plan outside the lock: other shapes keep running meanwhile.
        let mut model = self.template.clone();
        for (ix, shape) in shapes.iter().enumerate() {
            let dt = model.input_fact(ix)?.datum_type;
            let mut fact =
                InferenceFact::shape(shape.iter().map(|&d| TDim::from(d)).collect::<TVec<_>>());
            fact.datum_type = dt;
            model.set_input_fact(ix, fact)?;
        }
        let plan = model.into_optimized()?.into_runnable()?;
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= SHAPE_PLAN_CACHE {
            cache.remove(0);
        }
        cache.push((shapes.to_vec(), plan.clone()));
        Ok(plan)
    }
}

fn dim_of_factoid(d: &GenericFactoid<TDim>) -> Dim {
    match d {
        GenericFactoid::Only(t) => match t.as_i64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Dim::Fixed(n),
            None => Dim::Dynamic(Some(t.to_string())),
        },
        GenericFactoid::Any => Dim::Dynamic(None),
    }
}

fn datatype_or_err(name: &str, dt: DatumType) -> Result<DataType, LoadError> {
    datatype_of(dt).ok_or_else(|| {
        LoadError::Unsupported(format!(
            "{name:?} has element type {dt:?}, which the Open Inference Protocol cannot carry"
        ))
    })
}

fn signature_of(model: &TypedModel) -> Result<Signature, LoadError> {
    let prepare = |e: tract_onnx::prelude::TractError| LoadError::Prepare(format!("{e:#}"));
    let inputs = model
        .input_outlets()
        .map_err(prepare)?
        .iter()
        .map(|outlet| {
            let name = model.node(outlet.node).name.clone();
            spec_of(name, model.outlet_fact(*outlet).map_err(prepare)?)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = model
        .output_outlets()
        .map_err(prepare)?
        .iter()
        .map(|outlet| {
            let name = model
                .outlet_label(*outlet)
                .map_or_else(|| model.node(outlet.node).name.clone(), str::to_owned);
            spec_of(name, model.outlet_fact(*outlet).map_err(prepare)?)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Signature { inputs, outputs })
}

fn spec_of(name: String, fact: &TypedFact) -> Result<TensorSpec, LoadError> {
    let datatype = datatype_or_err(&name, fact.datum_type)?;
    let shape = fact
        .shape
        .dims()
        .iter()
        .map(|d| match d.as_i64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Dim::Fixed(n),
            None => Dim::Dynamic(Some(d.to_string())),
        })
        .collect();
    Ok(TensorSpec {
        name,
        datatype,
        shape,
    })
}

fn datatype_of(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::I8 => DataType::Int8,
        DatumType::I16 => DataType::Int16,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 => DataType::Int64,
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        DatumType::String => DataType::Bytes,
        _ => return None,
    })
}

fn to_tract(tensor: Tensor) -> TractResult<tract_onnx::prelude::Tensor> {
    use tract_onnx::prelude::Tensor as T;
    let (_, shape, data) = tensor.into_parts();
    Ok(match data {
        TensorData::Bool(v) => T::from_shape(&shape, &v)?,
        TensorData::Uint8(v) => T::from_shape(&shape, &v)?,
        TensorData::Uint16(v) => T::from_shape(&shape, &v)?,
        TensorData::Uint32(v) => T::from_shape(&shape, &v)?,
        TensorData::Uint64(v) => T::from_shape(&shape, &v)?,
        TensorData::Int8(v) => T::from_shape(&shape, &v)?,
        TensorData::Int16(v) => T::from_shape(&shape, &v)?,
        TensorData::Int32(v) => T::from_shape(&shape, &v)?,
        TensorData::Int64(v) => T::from_shape(&shape, &v)?,
        TensorData::Fp16(v) => T::from_shape(&shape, &v)?,
        TensorData::Fp32(v) => T::from_shape(&shape, &v)?,
        TensorData::Fp64(v) => T::from_shape(&shape, &v)?,
        TensorData::Bytes(v) => {
            let strings: Vec<String> = v
                .into_iter()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .collect();
            tract_ndarray::ArrayD::from_shape_vec(shape, strings)?.into()
        }
    })
}

fn from_tract(name: String, value: &tract_onnx::prelude::Tensor) -> Result<Tensor, RunError> {
    fn collect<T: tract_onnx::prelude::Datum + Clone>(
        value: &tract_onnx::prelude::Tensor,
    ) -> Result<Vec<T>, RunError> {
        // tract's tensors are dense, in natural order: one copy of the
        // slice, no element-wise walk of an array view.
        value
            .try_as_plain_ram()
            .and_then(|plain| plain.as_slice::<T>().map(<[T]>::to_vec))
            .map_err(|e| RunError::Engine(format!("{e:#}")))
    }
    let data = match value.datum_type() {
        DatumType::Bool => TensorData::Bool(collect(value)?),
        DatumType::U8 => TensorData::Uint8(collect(value)?),
        DatumType::U16 => TensorData::Uint16(collect(value)?),
        DatumType::U32 => TensorData::Uint32(collect(value)?),
        DatumType::U64 => TensorData::Uint64(collect(value)?),
        DatumType::I8 => TensorData::Int8(collect(value)?),
        DatumType::I16 => TensorData::Int16(collect(value)?),
        DatumType::I32 => TensorData::Int32(collect(value)?),
        DatumType::I64 => TensorData::Int64(collect(value)?),
        DatumType::F16 => TensorData::Fp16(collect::<f16>(value)?),
        DatumType::F32 => TensorData::Fp32(collect(value)?),
        DatumType::F64 => TensorData::Fp64(collect(value)?),
        DatumType::String => TensorData::Bytes(
            collect::<String>(value)?
                .into_iter()
                .map(String::into_bytes)
                .collect(),
        ),
        other => {
            return Err(RunError::Engine(format!(
                "output {name:?} has element type {other:?}, which the protocol cannot carry"
            )));
        }
    };
    Tensor::new(name, value.shape().to_vec(), data).map_err(|e| RunError::Engine(e.to_string()))
}

impl Model for TractModel {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn platform(&self) -> &'static str {
        PLATFORM
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let inputs: TVec<TValue> = inputs
            .into_iter()
            .map(|t| to_tract(t).map(TValue::from))
            .collect::<TractResult<_>>()
            .map_err(|e| RunError::Engine(format!("{e:#}")))?;
        // A new tract state every run (plan.run): tract's matmuls keep
        // per-session scratch in a thread-local map that only the thread
        // dropping a state cleans, so states reused across threads would
        // leave entries behind on the others each time one is dropped.
        let plan = match &self.plans {
            Plans::Symbolic {
                one_row: Some((shapes, plan)),
                ..
            } if shapes.len() == inputs.len()
                && shapes
                    .iter()
                    .zip(&inputs)
                    .all(|(s, t)| s.as_slice() == t.shape()) =>
            {
                plan.clone()
            }
            Plans::Symbolic { any, .. } => any.clone(),
            Plans::PerShape(per_shape) => {
                let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
                per_shape
                    .plan_for(&shapes)
                    .map_err(|e| RunError::Engine(format!("{e:#}")))?
            }
        };
        let outputs = plan
            .run(inputs)
            .map_err(|e| RunError::Engine(format!("{e:#}")))?;
        outputs
            .iter()
            .zip(&self.signature.outputs)
            .map(|(value, spec)| from_tract(spec.name.clone(), value))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use shoal_testkit::{Samples, model_bytes};

    use super::*;

    fn load(file: &str) -> TractModel {
        TractBackend::default()
            .load_model(&model_bytes(file), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    fn digits(samples: &Samples, rows: std::ops::Range<usize>) -> Tensor {
        let n = rows.len();
        let data: Vec<f32> = samples.inputs[rows].iter().flatten().copied().collect();
        Tensor::new("input", vec![n, 64], TensorData::Fp32(data)).unwrap()
    }

    fn fp32(t: &Tensor) -> &[f32] {
        match t.data() {
            TensorData::Fp32(v) => v,
            other => panic!("{}: not fp32 but {:?}", t.name, other.datatype()),
        }
    }

    #[test]
    fn small_models_get_a_one_row_plan_for_their_inputs_at_one() {
        assert!(model_bytes("silero_vad_16k_sequence.onnx").len() > ONE_ROW_PLAN_MAX_BYTES);
        let one_row = |file: &str| match load(file).plans {
            Plans::Symbolic { one_row, .. } => one_row.map(|(shapes, _)| shapes),
            Plans::PerShape(_) => panic!("{file}: planned per shape"),
        };
        assert_eq!(one_row("digits-v1.onnx"), Some(vec![vec![1, 64]]));
        assert_eq!(one_row("digits-v2.onnx"), Some(vec![vec![1, 64]]));
        // 1.2 MB: past ONE_ROW_PLAN_MAX_BYTES, its symbolic plan only.
        assert_eq!(one_row("silero_vad_16k_sequence.onnx"), None);
    }

    /// One row runs on the one-row plan, other shapes on the symbolic
    /// one, and both give one row the same answer: shown by putting
    /// digits-v2's one-row plan into digits-v1 (a one-row request then
    /// gets v2's answer, a two-row one v1's), and by each plan's own answer.
    #[test]
    fn one_row_runs_on_its_own_plan_and_answers_as_the_symbolic_one() {
        let samples = Samples::load();
        let v1 = load("digits-v1.onnx");
        let v2 = load("digits-v2.onnx");
        for i in 0..20 {
            let alone = v1.run(vec![digits(&samples, i..i + 1)]).unwrap();
            let Plans::Symbolic { any, .. } = &v1.plans else {
                unreachable!()
            };
            let input: TValue = to_tract(digits(&samples, i..i + 1)).unwrap().into();
            let symbolic = any.run(std::iter::once(input).collect()).unwrap();
            let symbolic = from_tract("probabilities".into(), &symbolic[0]).unwrap();
            for (a, b) in fp32(&alone[0]).iter().zip(fp32(&symbolic)) {
                assert!((a - b).abs() <= 1e-6, "row {i}: {a} vs {b}");
            }
            let pair = v1.run(vec![digits(&samples, i..i + 2)]).unwrap();
            assert_eq!(
                pair[1].data(),
                &TensorData::Int64(vec![
                    labels(&alone)[0],
                    labels(&v1.run(vec![digits(&samples, i + 1..i + 2)]).unwrap())[0],
                ])
            );
        }

        let Plans::Symbolic { one_row, .. } = &v2.plans else {
            unreachable!()
        };
        let mixed = TractModel {
            plans: match v1.plans {
                Plans::Symbolic { any, .. } => Plans::Symbolic {
                    any,
                    one_row: one_row.clone(),
                },
                Plans::PerShape(_) => unreachable!(),
            },
            signature: v1.signature,
        };
        let v1 = load("digits-v1.onnx");
        let differ = (0..samples.inputs.len() - 1)
            .find(|&i| {
                let a = v1.run(vec![digits(&samples, i..i + 1)]).unwrap();
                let b = v2.run(vec![digits(&samples, i..i + 1)]).unwrap();
                labels(&a) != labels(&b)
            })
            .expect("digits-v1 and -v2 disagree on some sample");
        let one =
            |m: &TractModel| labels(&m.run(vec![digits(&samples, differ..differ + 1)]).unwrap());
        assert_eq!(one(&mixed), one(&v2), "one row runs on the one-row plan");
        let two =
            |m: &TractModel| labels(&m.run(vec![digits(&samples, differ..differ + 2)]).unwrap());
        assert_eq!(two(&mixed), two(&v1), "two rows run on the symbolic plan");
    }

    fn labels(outputs: &[Tensor]) -> Vec<i64> {
        match outputs[1].data() {
            TensorData::Int64(v) => v.clone(),
            other => panic!("labels: {:?}", other.datatype()),
        }
    }
}
