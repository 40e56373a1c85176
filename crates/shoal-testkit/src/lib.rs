//! Test support shared by Shoal's crates.
//!
//! - [`models_dir`] and [`model_path`] find the bundled models in `models/`.
//! - [`Samples`] is `models/digits-samples.json`: held-out digits with labels
//!   and each model's expected accuracy.
//! - [`ChildGuard`] owns a child process and kills it on drop, so a failing
//!   test never leaves a server behind.

use std::path::PathBuf;
use std::process::Child;

use serde::Deserialize;

/// The repository's `models/` directory.
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// Path of a bundled model file, e.g. `model_path("digits-v1.onnx")`.
pub fn model_path(file: &str) -> PathBuf {
    models_dir().join(file)
}

/// Bytes of a bundled model file.
pub fn model_bytes(file: &str) -> Vec<u8> {
    let path = model_path(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Held-out digits samples (`models/digits-samples.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct Samples {
    /// Each sample: 64 pixel values 0..16.
    pub inputs: Vec<Vec<f32>>,
    /// The true digit of each sample.
    pub labels: Vec<i64>,
    /// Held-out accuracy of each bundled digits model, measured with ONNX
    /// Runtime when the models were built.
    pub accuracy: std::collections::HashMap<String, f64>,
    /// Fraction of samples on which v1 and v2 predict the same label.
    pub agreement_v1_v2: f64,
}

impl Samples {
    /// Loads the bundled samples.
    pub fn load() -> Samples {
        let path = model_path("digits-samples.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad samples file: {e}"))
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
