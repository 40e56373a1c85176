//! ONNX Runtime as a second engine, loaded at run time from a
//! `libonnxruntime.so` ([`find_library`]: `ORT_DYLIB_PATH`, else the
//! `onnxruntime` Python wheel, else a system library), so the binary stays
//! self-contained and runs without it: versions asking for `ort` then fail
//! to load with a message saying how to install it, and `auto` uses tract.
//!
//! ONNX Runtime sessions run through `&mut`, so a model keeps a pool of
//! idle sessions, one more made whenever more inferences overlap than
//! ever before (bounded by the inference pool's threads), one intra-op
//! thread each (the same budget as one tract inference). Each session holds
//! its own copy of the weights: memory grows with concurrency.
//!
//! Numeric datatypes only (no `BYTES`, no `FP16`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

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

/// The process's ONNX Runtime: ONNX Runtime allows one environment per
/// process, so every backend shares it; the first library loaded stays.
static SHARED: OnceLock<Result<Arc<OrtBackend>, String>> = OnceLock::new();

impl OrtBackend {
    /// ONNX Runtime from `libonnxruntime.so` at `path` (or the library this
    /// process already loaded).
    pub fn from_library(path: &Path) -> Result<Arc<OrtBackend>, LoadError> {
        SHARED
            .get_or_init(|| Self::load(path))
            .clone()
            .map_err(LoadError::EngineUnavailable)
    }

    /// ONNX Runtime from wherever [`find_library`] finds it (once per
    /// process; later calls answer the same).
    pub fn shared() -> Result<Arc<OrtBackend>, LoadError> {
        SHARED
            .get_or_init(|| Self::load(&find_library()?))
            .clone()
            .map_err(LoadError::EngineUnavailable)
    }

    fn load(path: &Path) -> Result<Arc<OrtBackend>, String> {
        let environment = ort::init_from(path)
            .map_err(|e| {
                format!(
                    "cannot load ONNX Runtime from {}: {e}; install onnxruntime=={TESTED_VERSION} \
                     or point ORT_DYLIB_PATH at another libonnxruntime.so",
                    path.display()
                )
            })?
            .with_name("shoal")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime: {e}"))?;
        tracing::info!(library = %path.display(), "ONNX Runtime loaded");
        Ok(Arc::new(OrtBackend {
            environment: Arc::new(environment),
        }))
    }
}

/// The ONNX Runtime version Shoal is tested with (`tools/requirements.txt`).
pub const TESTED_VERSION: &str = "1.23.2";

/// Where `libonnxruntime.so` is: `ORT_DYLIB_PATH` when set, else the
/// `onnxruntime` wheel in a Python site directory (a virtual
/// environment's, the user's, the system's), else a system library. The
/// error says how to install it.
pub fn find_library() -> Result<PathBuf, String> {
    locate(
        &|name| std::env::var_os(name),
        &["/usr/local/lib", "/usr/lib"].map(PathBuf::from),
    )
}

/// [`find_library`] with the environment read through `var` and the
/// system library directories given.
pub fn locate(
    var: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    system: &[PathBuf],
) -> Result<PathBuf, String> {
    if let Some(path) = var("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "ORT_DYLIB_PATH is {} but there is no file there: point it at libonnxruntime.so, \
                 or unset it to look for the onnxruntime Python package",
                path.display()
            ))
        };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(venv) = var("VIRTUAL_ENV") {
        roots.push(PathBuf::from(venv).join("lib"));
    }
    if let Some(home) = var("HOME") {
        roots.push(PathBuf::from(home).join(".local/lib"));
    }
    roots.extend(system.iter().cloned());
    let mut candidates = Vec::new();
    for root in &roots {
        for python in sorted_entries(root, |name| name.starts_with("python3")) {
            for site in ["site-packages", "dist-packages"] {
                candidates.push(python.join(site).join("onnxruntime/capi"));
            }
        }
    }
    for dir in system {
        candidates.push(dir.join("x86_64-linux-gnu"));
        candidates.push(dir.join("aarch64-linux-gnu"));
    }
    for dir in candidates {
        if let Some(found) = sorted_entries(&dir, |name| name.starts_with("libonnxruntime.so"))
            .into_iter()
            .last()
        {
            return Ok(found);
        }
    }
    Err(format!(
        "ONNX Runtime was not found on this machine: install it with \
         `python3 -m pip install --user onnxruntime=={TESTED_VERSION}` (scripts/setup-python does), \
         or set ORT_DYLIB_PATH to a libonnxruntime.so (1.17 or newer); or use --engine tract or auto"
    ))
}

/// The entries of `dir` whose names pass `keep`, sorted (none when `dir`
/// cannot be read).
fn sorted_entries(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(&keep))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

struct OrtModel {
    environment: Arc<ort::environment::Environment>,
    /// The model's bytes, for the sessions made when requests overlap.
    bytes: Vec<u8>,
    /// Sessions not running now.
    idle: Mutex<Vec<Session>>,
    signature: Signature,
}

/// A session built from `bytes`: full graph optimisation, one intra-op
/// thread.
fn session(
    environment: &ort::environment::Environment,
    bytes: &[u8],
) -> Result<Session, LoadError> {
    let prepare = |e: ort::Error| LoadError::Prepare(e.to_string());
    Session::builder(environment)
        .map_err(prepare)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| LoadError::Prepare(e.to_string()))?
        .with_intra_threads(1)
        .map_err(|e| LoadError::Prepare(e.to_string()))?
        .commit_from_memory(bytes)
        .map_err(|e| LoadError::Parse(e.to_string()))
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

/// What a model run by ONNX Runtime reports as its platform (Triton's name).
pub const PLATFORM: &str = "onnxruntime_onnx";

impl Backend for OrtBackend {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    fn load(&self, bytes: &[u8], options: &LoadOptions) -> Result<Arc<dyn Model>, LoadError> {
        let session = session(&self.environment, bytes)?;
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
            environment: self.environment.clone(),
            bytes: bytes.to_vec(),
            idle: Mutex::new(vec![session]),
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

    fn platform(&self) -> &'static str {
        PLATFORM
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let named: Vec<(String, DynValue)> = inputs
            .into_iter()
            .map(|t| {
                let name = t.name.clone();
                to_ort(t).map(|v| (name, v))
            })
            .collect::<Result<_, _>>()?;
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut session = match idle {
            Some(session) => session,
            None => session(&self.environment, &self.bytes)
                .map_err(|e| RunError::Engine(format!("cannot open another session: {e}")))?,
        };
        let answer = self.answer(&mut session, named);
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(session);
        answer
    }
}

impl OrtModel {
    fn answer(
        &self,
        session: &mut Session,
        named: Vec<(String, DynValue)>,
    ) -> Result<Vec<Tensor>, RunError> {
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
