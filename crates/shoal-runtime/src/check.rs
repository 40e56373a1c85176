//! What the registry checks before it accepts an artifact as a model
//! version, so that a version which cannot load is refused at push rather
//! than discovered by a rollout.
//!
//! Two levels, each including the one before:
//! - [`Checks::Structure`]: the bytes are an ONNX `ModelProto` with an
//!   operator set, a graph with at least one node and one output. Cheap,
//!   and engine-neutral: the check for artifacts meant for another engine.
//! - [`Checks::Engine`]: the default engine prepares the model (every
//!   operator supported, shapes consistent, the input shape overrides
//!   apply) and runs the same warm-up inference a replica runs before it
//!   declares a version ready. What passes this loads on every replica.

use shoal_core::Signature;

use crate::{Backend, LoadError, LoadOptions, LoadedModel};

/// How far to check an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checks {
    /// ONNX structure only.
    Structure,
    /// Structure, then prepare and warm up with the engine.
    Engine,
}

impl Checks {
    /// The checks that ran, in words (for the audit log and the CLI).
    pub fn describe(self) -> &'static str {
        match self {
            Checks::Structure => "ONNX structure (engine check skipped)",
            Checks::Engine => "ONNX structure, engine prepare and warm-up",
        }
    }
}

/// Checks `bytes` as a model; with [`Checks::Engine`] answers its
/// signature as `backend` reads it. Blocks: run it off the async executor.
pub fn check_model(
    bytes: &[u8],
    options: &LoadOptions,
    checks: Checks,
    backend: &dyn Backend,
) -> Result<Option<Signature>, LoadError> {
    check_structure(bytes)?;
    if checks == Checks::Structure {
        return Ok(None);
    }
    let loaded = LoadedModel::load(backend, bytes, options)?;
    loaded.warm_up()?;
    Ok(Some(loaded.signature().clone()))
}

/// The bytes are an ONNX model with a graph to run.
fn check_structure(bytes: &[u8]) -> Result<(), LoadError> {
    let proto = <tract_onnx::pb::ModelProto as prost::Message>::decode(bytes).map_err(|e| {
        LoadError::Parse(format!(
            "not an ONNX protobuf ({e}); is the file truncated, or not an .onnx model?"
        ))
    })?;
    if proto.opset_import.is_empty() {
        return Err(LoadError::Parse(
            "not an ONNX model: it declares no operator set (opset_import)".into(),
        ));
    }
    let Some(graph) = proto.graph else {
        return Err(LoadError::Parse(
            "not an ONNX model: it has no graph".into(),
        ));
    };
    if graph.node.is_empty() {
        return Err(LoadError::Parse(
            "not an ONNX model: its graph has no nodes".into(),
        ));
    }
    if graph.output.is_empty() {
        return Err(LoadError::Parse(
            "not an ONNX model: its graph has no outputs".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tract::TractBackend;

    fn check(bytes: &[u8], checks: Checks) -> Result<Option<Signature>, String> {
        check_model(
            bytes,
            &LoadOptions::default(),
            checks,
            &TractBackend::default(),
        )
        .map_err(|e| e.to_string())
    }

    fn digits() -> Vec<u8> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/digits-v1.onnx");
        std::fs::read(path).expect("the bundled digits model")
    }

    #[test]
    fn a_real_model_passes_both_levels_and_gives_its_signature() {
        let bytes = digits();
        assert_eq!(check(&bytes, Checks::Structure), Ok(None));
        let signature = check(&bytes, Checks::Engine).unwrap().unwrap();
        assert_eq!(signature.inputs[0].name, "input");
    }

    #[test]
    fn garbage_and_truncated_files_are_refused_with_what_is_wrong() {
        // Deterministic pseudo-random bytes.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let random: Vec<u8> = (0..5_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for checks in [Checks::Structure, Checks::Engine] {
            let e = check(&random, checks).unwrap_err();
            assert!(e.contains("cannot parse the model"), "{e}");
            let bytes = digits();
            let e = check(&bytes[..bytes.len() / 2], checks).unwrap_err();
            assert!(e.contains("cannot parse the model"), "{e}");
            let e = check(b"", checks).unwrap_err();
            assert!(e.contains("not an ONNX model"), "{e}");
        }
    }
}
