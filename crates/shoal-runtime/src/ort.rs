//! ONNX Runtime as a second backend, loaded at run time from the
//! `onnxruntime` wheel's `libonnxruntime.so` (set `ORT_DYLIB_PATH`, or call
//! [`OrtBackend::from_library`]). Shoal uses it as the reference engine in
//! benchmarks; it is not built by default because it needs that library at
//! run time, and Shoal's promise is one self-contained binary.
//!
//! Numeric datatypes only (no `BYTES`, no `FP16`).

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};
use shoal_core::{DataType, Dim, Signature, Tensor, TensorData, TensorSpec};

use crate::{Backend, LoadError, LoadOptions, Model, RunError};

/// Loads models with ONNX Runtime, one intra-op thread per session (the
/// same budget as one tract inference).
#[derive(Debug)]
pub struct OrtBackend {
    environment: Arc<ort::environment::Environment>,
}

impl OrtBackend {
    /// Loads `libonnxruntime.so` from `path`.
    pub fn from_library(path: &Path) -> Result<OrtBackend, LoadError> {
        let environment = ort::init_from(path)
            .map_err(|e| LoadError::Prepare(format!("cannot load {}: {e}", path.display())))?
            .with_name("shoal")
            .build()
            .map_err(|e| LoadError::Prepare(e.to_string()))?;
        Ok(OrtBackend {
            environment: Arc::new(environment),
        })
    }
}

struct OrtModel {
    // ONNX Runtime sessions run through `&mut`; one at a time per model.
    session: Mutex<Session>,
    signature: Signature,
}

fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        _ => return None,
    })
}

fn spec_of(
    name: &str,
    ty: &ValueType,
    overrides: Option<&Vec<Option<usize>>>,
) -> Result<TensorSpec, LoadError> {
    let ValueType::Tensor {
        ty,
        shape,
        dimension_symbols,
    } = ty
    else {
        return Err(LoadError::Unsupported(format!("{name:?} is not a tensor")));
    };
    let datatype = datatype_of(*ty)
        .ok_or_else(|| LoadError::Unsupported(format!("{name:?} has element type {ty:?}")))?;
    let mut dims: Vec<Dim> = shape
        .iter()
        .zip(dimension_symbols.iter())
        .map(|(&d, sym)| match usize::try_from(d) {
            Ok(n) => Dim::Fixed(n),
            Err(_) => Dim::Dynamic((!sym.is_empty() && sym != "?").then(|| sym.clone())),
        })
        .collect();
    if let Some(o) = overrides {
        dims = o
            .iter()
            .map(|d| d.map_or(Dim::Dynamic(None), Dim::Fixed))
            .collect();
    }
    Ok(TensorSpec {
        name: name.to_owned(),
        datatype,
        shape: dims,
    })
}

impl Backend for OrtBackend {
    fn platform(&self) -> &'static str {
        "onnxruntime_onnx"
    }

    fn load(&self, bytes: &[u8], options: &LoadOptions) -> Result<Arc<dyn Model>, LoadError> {
        let prepare = |e: ort::Error| LoadError::Prepare(e.to_string());
        let session = Session::builder(&self.environment)
            .map_err(prepare)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| LoadError::Prepare(e.to_string()))?
            .with_intra_threads(1)
            .map_err(|e| LoadError::Prepare(e.to_string()))?
            .commit_from_memory(bytes)
            .map_err(|e| LoadError::Parse(e.to_string()))?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| spec_of(o.name(), o.dtype(), options.input_shapes.get(o.name())))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| spec_of(o.name(), o.dtype(), None))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(OrtModel {
            session: Mutex::new(session),
            signature: Signature { inputs, outputs },
        }))
    }
}

fn to_ort(tensor: Tensor) -> Result<DynValue, RunError> {
    let (name, shape, data) = tensor.into_parts();
    let engine = |e: ort::Error| RunError::Engine(e.to_string());
    Ok(match data {
        TensorData::Fp32(v) => OrtTensor::from_array((shape, v))
            .map_err(engine)?
            .into_dyn(),
        TensorData::Fp64(v) => OrtTensor::from_array((shape, v))
            .map_err(engine)?
            .into_dyn(),
        TensorData::Int64(v) => OrtTensor::from_array((shape, v))
            .map_err(engine)?
            .into_dyn(),
        TensorData::Int32(v) => OrtTensor::from_array((shape, v))
            .map_err(engine)?
            .into_dyn(),
        TensorData::Uint8(v) => OrtTensor::from_array((shape, v))
            .map_err(engine)?
            .into_dyn(),
        TensorData::Bool(v) => OrtTensor::from_array((shape, v))
            .map_err(engine)?
            .into_dyn(),
        other => {
            return Err(RunError::Engine(format!(
                "input {name:?}: the ONNX Runtime backend does not take {} tensors",
                other.datatype()
            )));
        }
    })
}

fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, RunError> {
    let engine = |e: ort::Error| RunError::Engine(e.to_string());
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(RunError::Engine(format!("output {name:?} is not a tensor")));
    };
    macro_rules! extract {
        ($t:ty, $variant:ident) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(engine)?;
            let shape = shape
                .iter()
                .map(|&d| usize::try_from(d).unwrap_or(0))
                .collect();
            (shape, TensorData::$variant(data.to_vec()))
        }};
    }
    let (shape, data) = match ty {
        TensorElementType::Float32 => extract!(f32, Fp32),
        TensorElementType::Float64 => extract!(f64, Fp64),
        TensorElementType::Int64 => extract!(i64, Int64),
        TensorElementType::Int32 => extract!(i32, Int32),
        TensorElementType::Uint8 => extract!(u8, Uint8),
        TensorElementType::Bool => extract!(bool, Bool),
        other => {
            return Err(RunError::Engine(format!(
                "output {name:?} has type {other:?}"
            )));
        }
    };
    Tensor::new(name, shape, data).map_err(|e| RunError::Engine(e.to_string()))
}

impl Model for OrtModel {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let named: Vec<(String, DynValue)> = inputs
            .into_iter()
            .map(|t| {
                let name = t.name.clone();
                to_ort(t).map(|v| (name, v))
            })
            .collect::<Result<_, _>>()?;
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs = session
            .run(named)
            .map_err(|e| RunError::Engine(e.to_string()))?;
        self.signature
            .outputs
            .iter()
            .map(|spec| {
                let value = outputs
                    .get(&spec.name)
                    .ok_or_else(|| RunError::Engine(format!("output {:?} missing", spec.name)))?;
                from_ort(&spec.name, value)
            })
            .collect()
    }
}
