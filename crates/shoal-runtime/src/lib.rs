//! In-process inference for Shoal replicas.
//!
//! - [`Backend`] and [`Model`] are the seam between Shoal and an inference
//!   engine: a backend loads a model from bytes and reads its [`Signature`];
//!   a model runs checked inputs. [`tract::TractBackend`] (pure Rust) is the
//!   default engine; [`ort::OrtBackend`] runs ONNX Runtime from a library
//!   found at run time; [`engines::Engines`] is the backend replicas use,
//!   choosing per version (`tract`, `ort`, or `auto`: both measured, the
//!   faster kept).
//! - [`LoadedModel`] is what the rest of Shoal holds: a model plus its
//!   signature, which checks every request before the engine sees it.
//! - [`InferencePool`] runs inference off the async executor on a bounded
//!   number of blocking threads, and refuses work when its queue is full.
//! - [`batcher::Batcher`] queues a version's requests and runs them as
//!   dynamic batches, formed by the callers themselves (the policy is
//!   `shoal_core::batch`).
//! - [`LoadedModel::warm_up`] runs one inference before a model is declared
//!   ready, so the first real request does not pay for lazy initialisation.
//! - [`check`] is what the registry runs on an artifact before it accepts
//!   it as a version: ONNX structure, then the engine's prepare and warm-up.
//!
//! Architecture invariant: this crate knows nothing about HTTP, JSON or the
//! control plane. It deals in [`shoal_core::Tensor`]s.

pub mod batcher;
pub mod check;
pub mod engines;
mod error;
pub mod ort;
mod pool;
pub mod tract;

use std::sync::Arc;
use std::time::Duration;

pub use error::{LoadError, RunError};
pub use pool::{Admission, InferencePool, PoolStats, Share};
use shoal_core::batch::BatchPolicy;
use shoal_core::{Engine, InputBounds, Signature, StateSpec, Tensor, TensorData};

/// An inference engine that can load models.
pub trait Backend: Send + Sync + 'static {
    /// Short engine name, reported as the model's platform (e.g. `tract_onnx`).
    fn platform(&self) -> &'static str;

    /// Parses and prepares a model from the bytes of an ONNX file.
    fn load(&self, bytes: &[u8], options: &LoadOptions) -> Result<Arc<dyn Model>, LoadError>;
}

/// How to load a model, beyond its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Input shapes that replace what the file declares (`None` = dynamic),
    /// like the `dims` of a Triton model configuration. Needed when a file
    /// leaves a dimension unknown that the engine must know, e.g. the height
    /// and width of PaddleOCR's classifier (`x`: `[-1, 3, 48, 192]`).
    pub input_shapes: std::collections::BTreeMap<String, Vec<Option<usize>>>,
    /// The largest size each dynamic input dimension may take in a
    /// request (see [`InputBounds`]).
    pub bounds: InputBounds,
    /// A stateful model's state inputs and the outputs feeding them.
    pub state: StateSpec,
    /// How its requests are batched, if they are.
    pub batching: Option<BatchPolicy>,
    /// The engine it asks for (what [`engines::Engines`] loads it with;
    /// a single backend ignores it).
    pub engine: Engine,
}

impl LoadOptions {
    /// Options from the registry's input shape overrides (input name to
    /// dimensions, -1 = dynamic).
    pub fn from_dims(
        shapes: &std::collections::BTreeMap<String, Vec<i64>>,
    ) -> Result<LoadOptions, String> {
        let mut options = LoadOptions::default();
        for (input, dims) in shapes {
            let dims = dims
                .iter()
                .map(|&d| match d {
                    -1 => Ok(None),
                    d if d >= 0 => usize::try_from(d).map(Some).map_err(|e| e.to_string()),
                    d => Err(format!(
                        "input {input:?}: dimension {d} must be -1 (dynamic) or a size"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            options.input_shapes.insert(input.clone(), dims);
        }
        Ok(options)
    }

    /// These options with the registry's input bounds (input name to the
    /// largest size of each dimension, -1 = the default bound).
    pub fn with_max_shapes(
        mut self,
        max_shapes: &std::collections::BTreeMap<String, Vec<i64>>,
    ) -> Result<LoadOptions, String> {
        for (input, dims) in max_shapes {
            let dims = dims
                .iter()
                .map(|&d| match d {
                    -1 => Ok(None),
                    d if d >= 1 => usize::try_from(d).map(Some).map_err(|e| e.to_string()),
                    d => Err(format!(
                        "max shape of input {input:?}: {d} must be -1 (the default bound) or at least 1"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.bounds.per_input.insert(input.clone(), dims);
        }
        Ok(self)
    }

    /// Options as the registry records them for a version: input shapes
    /// and bounds (-1 = dynamic, the default bound), state, batching and
    /// engine. What a push is checked with and what replicas load with.
    pub fn from_registry(
        input_shapes: &std::collections::BTreeMap<String, Vec<i64>>,
        max_shapes: &std::collections::BTreeMap<String, Vec<i64>>,
        state: &std::collections::BTreeMap<String, String>,
        batching: Option<BatchPolicy>,
        engine: Engine,
    ) -> Result<LoadOptions, String> {
        Ok(LoadOptions::from_dims(input_shapes)?
            .with_max_shapes(max_shapes)?
            .with_state(state)
            .with_batching(batching)
            .with_engine(engine))
    }

    /// These options with a batching policy (checked against the model
    /// when it loads: every input and output needs a batch dimension).
    pub fn with_batching(mut self, batching: Option<BatchPolicy>) -> LoadOptions {
        self.batching = batching;
        self
    }

    /// These options with the engine the version asks for.
    pub fn with_engine(mut self, engine: Engine) -> LoadOptions {
        self.engine = engine;
        self
    }

    /// These options with the registry's state declaration (state input
    /// to the output feeding it), checked against the model when it loads.
    pub fn with_state(mut self, state: &std::collections::BTreeMap<String, String>) -> LoadOptions {
        self.state = StateSpec::new(state);
        self
    }
}

/// A model prepared by a backend, ready to run. Implementations must be safe
/// to call from several threads at once.
pub trait Model: Send + Sync + 'static {
    /// Inputs and outputs as read from the model file.
    fn signature(&self) -> &Signature;

    /// The engine running it, as Triton names platforms (`tract_onnx`,
    /// `onnxruntime_onnx`).
    fn platform(&self) -> &'static str;

    /// Runs the model. `inputs` have already been checked against
    /// [`Model::signature`] and are in its order. Blocks the calling thread.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError>;
}

/// A model loaded through a backend, with the platform that runs it and
/// the bounds requests must keep to.
#[derive(Clone)]
pub struct LoadedModel {
    model: Arc<dyn Model>,
    platform: &'static str,
    bounds: Arc<InputBounds>,
    state: Arc<StateSpec>,
    batching: Option<Arc<BatchPolicy>>,
    /// What the warm-up input costs, measured at load, how many elements
    /// it holds, and the most a request may cost to run inline (`None`:
    /// not measured, never inline).
    row_cost: Option<(Duration, usize, Duration)>,
    /// What a row costs in a batch, when measured (see
    /// [`LoadedModel::set_batched_row_cost`]).
    batched_row_cost: Option<Duration>,
}

/// Requests a model runs in at most this long (by its measured cost per
/// row) run on the calling task rather than a blocking thread, by default
/// (`shoal replica --inline-max-us`). Tokio's
/// guidance is to yield every 10–100 µs; a blocking hand-off costs tens of
/// microseconds on these machines.
pub const INLINE_MAX: Duration = Duration::from_micros(25);

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("platform", &self.platform)
            .field("signature", self.signature())
            .finish()
    }
}

impl LoadedModel {
    /// Loads `bytes` with `backend`.
    pub fn load(
        backend: &dyn Backend,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Result<LoadedModel, LoadError> {
        let model = backend.load(bytes, options)?;
        options
            .bounds
            .fit(model.signature())
            .map_err(LoadError::Prepare)?;
        options
            .state
            .check(model.signature())
            .map_err(LoadError::Prepare)?;
        if let Some(policy) = &options.batching {
            if !options.state.is_empty() {
                return Err(LoadError::Prepare(
                    "a stateful model's steps cannot be batched: push it with --state or with \
                     --max-batch, not both"
                        .into(),
                ));
            }
            policy
                .check(model.signature())
                .map_err(LoadError::Prepare)?;
        }
        Ok(LoadedModel {
            platform: model.platform(),
            model,
            bounds: Arc::new(options.bounds.clone()),
            state: Arc::new(options.state.clone()),
            batching: options.batching.clone().map(Arc::new),
            row_cost: None,
            batched_row_cost: None,
        })
    }

    /// Measures what one row costs (the best of a few runs on the warm-up
    /// input), so that requests costing at most `inline_max` run inline
    /// ([`LoadedModel::runs_inline`]; zero: never). Blocks; call after
    /// [`LoadedModel::warm_up`]. Answers the cost.
    pub fn measure_row_cost(&mut self, inline_max: Duration) -> Result<Duration, RunError> {
        let inputs = self
            .example(1)
            .map_err(|e| RunError::Engine(e.to_string()))?;
        let best = best_of(5, || self.infer_blocking(inputs.clone()).map(drop))?;
        let elements = inputs.iter().map(|t| t.data().len()).sum::<usize>();
        self.row_cost = Some((best, elements.max(1), inline_max));
        Ok(best)
    }

    /// Records what a row costs in a batch (measured with
    /// [`LoadedModel::batch_costs`]): a request or batch of several rows
    /// is then reckoned as one row alone and the rest at this cost, as
    /// an engine that runs a batch faster per row than one row runs them
    /// (tract's one-row plan, then its batch plan).
    pub fn set_batched_row_cost(&mut self, cost: Duration) {
        self.batched_row_cost = Some(cost);
    }

    /// True when `inputs` (checked) should run on the calling task: the
    /// measured cost of the warm-up input, scaled by how many times more
    /// elements `inputs` hold (rows, and any other dynamic dimension), is
    /// within the limit it was measured with (see [`INLINE_MAX`]). A batch
    /// counts all its rows.
    pub fn runs_inline(&self, inputs: &[Tensor]) -> bool {
        self.runs_elements_inline(inputs.iter().map(|t| t.data().len()).sum())
    }

    /// [`LoadedModel::runs_inline`] for inputs of `elements` elements in
    /// all.
    pub fn runs_elements_inline(&self, elements: usize) -> bool {
        let Some((cost, measured, inline_max)) = self.row_cost else {
            return false;
        };
        if inline_max.is_zero() {
            return false;
        }
        let times = u32::try_from(elements.div_ceil(measured).max(1)).unwrap_or(u32::MAX);
        let total = match self.batched_row_cost {
            Some(batched) if times > 1 => batched
                .checked_mul(times - 1)
                .and_then(|rest| rest.checked_add(cost)),
            _ => cost.checked_mul(times),
        };
        total.is_some_and(|total| total <= inline_max)
    }

    /// Checks `inputs` against the signature and the bounds, in the
    /// model's order.
    pub fn check(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, shoal_core::InputError> {
        self.signature().check_inputs_within(inputs, &self.bounds)
    }

    /// The model's inputs and outputs.
    pub fn signature(&self) -> &Signature {
        self.model.signature()
    }

    /// The state it carries between the steps of a sequence (empty for a
    /// stateless model).
    pub fn state(&self) -> &StateSpec {
        &self.state
    }

    /// How its requests are batched (`None`: each runs alone).
    pub fn batching(&self) -> Option<&BatchPolicy> {
        self.batching.as_deref()
    }

    /// The engine running the model.
    pub fn platform(&self) -> &'static str {
        self.platform
    }

    /// Checks `inputs` against the signature and runs the model on the
    /// calling thread. Use [`InferencePool::run`] from async code.
    pub fn infer_blocking(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let inputs = self.check(inputs)?;
        self.model.run(inputs)
    }

    /// Runs the steps of one sequence on the calling thread, carrying the
    /// state (see [`LoadedModel::state`]) from each step to the next from
    /// the zero state, as a replica does across requests; each step's
    /// outputs without the state. The reference a served sequence must
    /// match.
    pub fn run_sequence(
        &self,
        steps: impl IntoIterator<Item = Vec<Tensor>>,
    ) -> Result<Vec<Vec<Tensor>>, RunError> {
        let mut state = self
            .state
            .initial(self.signature())
            .map_err(RunError::Engine)?;
        let mut answers = Vec::new();
        for mut inputs in steps {
            inputs.append(&mut state);
            let (answer, next) = self
                .state
                .split(self.infer_blocking(inputs)?)
                .map_err(RunError::Engine)?;
            answers.push(answer);
            state = next;
        }
        Ok(answers)
    }

    /// Runs one inference on zero-valued inputs (dynamic dimensions set to
    /// 1), so that lazily built engine state exists before real traffic.
    pub fn warm_up(&self) -> Result<(), LoadError> {
        let inputs = self
            .example(1)
            .map_err(|e| LoadError::WarmUp(e.to_string()))?;
        self.infer_blocking(inputs)
            .map(drop)
            .map_err(|e| LoadError::WarmUp(e.to_string()))
    }

    /// Zero-valued inputs with `rows` in a dynamic first dimension.
    fn example(&self, rows: usize) -> Result<Vec<Tensor>, shoal_core::TensorError> {
        example_inputs(self.signature(), rows)
    }

    /// What a row costs run alone and in a batch of `rows`: the best of
    /// three timings of each, per row. Blocks; for deciding whether
    /// batching pays on this engine ([`shoal_core::batch::pays`]).
    pub fn batch_costs(&self, rows: usize) -> Result<(Duration, Duration), RunError> {
        let per_row = |n: usize| -> Result<Duration, RunError> {
            let inputs = self
                .example(n)
                .map_err(|e| RunError::Engine(e.to_string()))?;
            self.infer_blocking(inputs.clone())?;
            let best = best_of(3, || self.infer_blocking(inputs.clone()).map(drop))?;
            Ok(best / u32::try_from(n.max(1)).unwrap_or(u32::MAX))
        };
        Ok((per_row(1)?, per_row(rows)?))
    }
}

/// The shortest of `runs` timed calls of `run` (the figure least disturbed
/// by the rest of the machine). Blocks.
pub(crate) fn best_of(
    runs: usize,
    mut run: impl FnMut() -> Result<(), RunError>,
) -> Result<Duration, RunError> {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let started = tokio::time::Instant::now();
        run()?;
        best = best.min(started.elapsed());
    }
    Ok(best)
}

/// Zero-valued inputs for `signature` with `rows` in a dynamic first
/// dimension (other dynamic dimensions 1; fixed ones as declared): the
/// warm-up input.
pub(crate) fn example_inputs(
    signature: &Signature,
    rows: usize,
) -> Result<Vec<Tensor>, shoal_core::TensorError> {
    signature
        .inputs
        .iter()
        .map(|spec| {
            let mut shape = spec.example_shape();
            if let (Some(first), Some(shoal_core::Dim::Dynamic(_))) =
                (shape.first_mut(), spec.shape.first())
            {
                *first = rows;
            }
            let data = TensorData::zeros(spec.datatype, shape.iter().product());
            Tensor::new(spec.name.clone(), shape, data)
        })
        .collect()
}
