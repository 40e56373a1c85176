//! JSON bodies of the protocol's metadata endpoints and of errors.
//!
//! Field names follow the protocol exactly; clients written for Triton and
//! KServe parse these documents.

use serde::{Deserialize, Serialize};
use shoal_core::{Signature, TensorSpec};

/// `GET /v2`: the server's name, version and supported protocol extensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerMetadata {
    /// Server name, e.g. `shoal`.
    pub name: String,
    /// Server version.
    pub version: String,
    /// Protocol extensions supported.
    pub extensions: Vec<String>,
}

impl ServerMetadata {
    /// What every Shoal role answers on `GET /v2`: replicas and gateways
    /// speak the same protocol, extensions included.
    pub fn shoal() -> ServerMetadata {
        ServerMetadata {
            name: "shoal".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["binary_tensor_data".into()],
        }
    }
}

/// One tensor in model metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataTensor {
    /// Input or output name.
    pub name: String,
    /// Protocol datatype name, e.g. `FP32`.
    pub datatype: String,
    /// Shape; `-1` marks a dynamic dimension.
    pub shape: Vec<i64>,
}

impl From<&TensorSpec> for MetadataTensor {
    fn from(spec: &TensorSpec) -> Self {
        MetadataTensor {
            name: spec.name.clone(),
            datatype: spec.datatype.as_str().to_owned(),
            shape: spec.oip_shape(),
        }
    }
}

/// `GET /v2/models/{model}[/versions/{version}]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// Model name.
    pub name: String,
    /// Versions available (for a versioned request: just that one).
    pub versions: Vec<String>,
    /// The framework or backend that runs the model.
    pub platform: String,
    /// Inputs.
    pub inputs: Vec<MetadataTensor>,
    /// Outputs.
    pub outputs: Vec<MetadataTensor>,
}

impl ModelMetadata {
    /// Metadata for a model with the given signature.
    pub fn new(name: &str, versions: Vec<String>, platform: &str, signature: &Signature) -> Self {
        ModelMetadata {
            name: name.to_owned(),
            versions,
            platform: platform.to_owned(),
            inputs: signature.inputs.iter().map(MetadataTensor::from).collect(),
            outputs: signature.outputs.iter().map(MetadataTensor::from).collect(),
        }
    }
}

/// An output asked for in an inference request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestOutput {
    /// Output name.
    pub name: String,
    /// Per-output parameters, e.g. Triton's `"binary_data": true` to get
    /// this output as raw bytes after the JSON part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
}
