//! The backend replicas load versions with: each version's
//! [`LoadOptions::engine`] picks tract, ONNX Runtime, or `auto` — both
//! loaded, each timed on the warm-up input, the faster kept
//! ([`shoal_core::engine::faster`]) and both times logged. Where ONNX
//! Runtime is missing, `ort` fails the load with a message saying how to
//! install it and `auto` uses tract.

use std::sync::Arc;
use std::time::Duration;

use shoal_core::Engine;

use crate::ort::OrtBackend;
use crate::tract::TractBackend;
use crate::{Backend, LoadError, LoadOptions, Model, RunError, best_of, example_inputs};

/// tract, and ONNX Runtime when this machine has it.
#[derive(Debug, Default)]
pub struct Engines {
    tract: TractBackend,
}

/// How long each engine took on the warm-up input under `auto`, and which
/// was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoChoice {
    /// tract's best time.
    pub tract: Duration,
    /// ONNX Runtime's best time.
    pub ort: Duration,
    /// The one kept.
    pub kept: Engine,
}

/// Timed runs per engine under `auto` (after one untimed run); the best counts.
const TIMED_RUNS: usize = 5;

impl Engines {
    /// ONNX Runtime, found and loaded on first use (see
    /// [`crate::ort::find_library`]).
    pub fn ort(&self) -> Result<Arc<OrtBackend>, LoadError> {
        OrtBackend::shared()
    }

    /// Loads `bytes` with both engines, times each on the warm-up input and
    /// keeps the faster; one engine alone when the other cannot load it.
    pub fn load_auto(
        &self,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Result<(Arc<dyn Model>, Option<AutoChoice>), LoadError> {
        let ort = match self.ort() {
            Ok(ort) => ort,
            Err(missing) => {
                tracing::info!(reason = %missing, "engine auto: ONNX Runtime is not available, using tract");
                return Ok((self.tract.load(bytes, options)?, None));
            }
        };
        let tract = self.tract.load(bytes, options);
        let onnxruntime = ort.load(bytes, options);
        let (tract, onnxruntime) = match (tract, onnxruntime) {
            (Ok(t), Ok(o)) => (t, o),
            (Ok(t), Err(e)) => {
                tracing::warn!(error = %e, "engine auto: ONNX Runtime cannot load the model, using tract");
                return Ok((t, None));
            }
            (Err(e), Ok(o)) => {
                tracing::warn!(error = %e, "engine auto: tract cannot load the model, using ONNX Runtime");
                return Ok((o, None));
            }
            (Err(e), Err(_)) => return Err(e),
        };
        let timed = |model: &Arc<dyn Model>| time(model.as_ref());
        let choice = match (timed(&tract), timed(&onnxruntime)) {
            (Ok(t), Ok(o)) => AutoChoice {
                tract: t,
                ort: o,
                kept: shoal_core::engine::faster(t, o),
            },
            (Ok(_), Err(e)) => {
                tracing::warn!(error = %e, "engine auto: ONNX Runtime fails the warm-up input, using tract");
                return Ok((tract, None));
            }
            (Err(e), Ok(_)) => {
                tracing::warn!(error = %e, "engine auto: tract fails the warm-up input, using ONNX Runtime");
                return Ok((onnxruntime, None));
            }
            (Err(e), Err(_)) => return Err(LoadError::WarmUp(e.to_string())),
        };
        tracing::info!(
            tract_us = choice.tract.as_secs_f64() * 1e6,
            onnxruntime_us = choice.ort.as_secs_f64() * 1e6,
            kept = %choice.kept,
            "engine auto: timed both on the warm-up input"
        );
        let kept = match choice.kept {
            Engine::Ort => onnxruntime,
            _ => tract,
        };
        Ok((kept, Some(choice)))
    }
}

/// The best of [`TIMED_RUNS`] runs of `model` on its warm-up input, after
/// one untimed run. Blocks.
fn time(model: &dyn Model) -> Result<Duration, RunError> {
    let inputs =
        example_inputs(model.signature(), 1).map_err(|e| RunError::Engine(e.to_string()))?;
    model.run(inputs.clone())?;
    best_of(TIMED_RUNS, || model.run(inputs.clone()).map(drop))
}

impl Backend for Engines {
    fn platform(&self) -> &'static str {
        crate::tract::PLATFORM
    }

    fn load(&self, bytes: &[u8], options: &LoadOptions) -> Result<Arc<dyn Model>, LoadError> {
        match options.engine {
            Engine::Tract => self.tract.load(bytes, options),
            Engine::Ort => self.ort()?.load(bytes, options),
            Engine::Auto => self.load_auto(bytes, options).map(|(model, _)| model),
        }
    }
}
